//! Evaluation counters: exact counts across reloads, threads and sets.

use std::sync::Arc;

use serde_json::json;

use super::{ERROR_CODES, Evaluations, FlagTotals, REASONS};
use crate::evaluation::{ErrorCode, Reason};
use crate::flags::{DocumentLimits, FlagSet, parse_flag_file};
use crate::plugins::PluginSet;

fn set(environment: &str, flags: serde_json::Value) -> Arc<FlagSet> {
    let file = json!({ "flags": flags });
    Arc::new(
        parse_flag_file(
            "t.json",
            environment,
            file.to_string().as_bytes(),
            &PluginSet::default(),
            &DocumentLimits::default(),
        )
        .expect("valid"),
    )
}

fn two_flags(environment: &str) -> Arc<FlagSet> {
    set(
        environment,
        json!({
            "alpha": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
            "beta": {"state": "ENABLED", "variants": {"x": 1, "y": 2, "z": 3}, "defaultVariant": "z"}
        }),
    )
}

/// `flag` served `variant` for `reason`, `n` times.
fn serve(
    evaluations: &Evaluations,
    set: &FlagSet,
    flag: &str,
    variant: &str,
    reason: Reason,
    n: u64,
) {
    let flag = set.flags.get(flag).expect("flag");
    let ordinal = flag.variants.get(variant).map(|v| v.ordinal);
    let counter = evaluations.counter(set);
    for _ in 0..n {
        counter.served(flag, ordinal, reason);
    }
}

fn reasons(pairs: &[(Reason, u64)]) -> [u64; REASONS.len()] {
    let mut row = [0; REASONS.len()];
    for &(reason, n) in pairs {
        row[reason as usize] = n;
    }
    row
}

fn totals_of(
    evaluations: &Evaluations,
    sets: &[Arc<FlagSet>],
    environment: &str,
    flag: &str,
) -> FlagTotals {
    evaluations
        .totals(sets)
        .remove(&(environment.to_owned(), flag.to_owned()))
        .unwrap_or_default()
}

#[test]
fn counts_are_exact_by_flag_variant_reason_and_code() {
    let evaluations = Evaluations::default();
    let set = two_flags("prod");
    serve(&evaluations, &set, "alpha", "on", Reason::Static, 3);
    serve(
        &evaluations,
        &set,
        "alpha",
        "off",
        Reason::TargetingMatch,
        2,
    );
    serve(&evaluations, &set, "alpha", "off", Reason::Stale, 1);
    // No variant: counted as served without one.
    serve(&evaluations, &set, "beta", "", Reason::Disabled, 4);
    let counter = evaluations.counter(&set);
    let beta = set.flags.get("beta").expect("beta");
    counter.failed(beta, ErrorCode::TypeMismatch);
    counter.failed(beta, ErrorCode::General);
    counter.not_found();
    counter.not_found();
    // A variant ordinal the flag does not have counts as none served.
    counter.served(beta, Some(99), Reason::Default);

    let sets = [set.clone()];
    let alpha = totals_of(&evaluations, &sets, "prod", "alpha");
    assert_eq!(alpha.variants.len(), 2);
    assert_eq!(alpha.variants["on"], reasons(&[(Reason::Static, 3)]));
    assert_eq!(
        alpha.variants["off"],
        reasons(&[(Reason::TargetingMatch, 2), (Reason::Stale, 1)])
    );
    assert_eq!(alpha.unserved, [0; REASONS.len()]);
    assert_eq!(alpha.errors, [0; ERROR_CODES.len()]);

    let beta = totals_of(&evaluations, &sets, "prod", "beta");
    assert!(beta.variants.is_empty(), "{beta:?}");
    assert_eq!(
        beta.unserved,
        reasons(&[
            (Reason::Disabled, 4),
            (Reason::Error, 2),
            (Reason::Default, 1)
        ])
    );
    let mut errors = [0; ERROR_CODES.len()];
    errors[ErrorCode::TypeMismatch as usize] = 1;
    errors[ErrorCode::General as usize] = 1;
    assert_eq!(beta.errors, errors);

    let missing = totals_of(&evaluations, &sets, "prod", "");
    let mut errors = [0; ERROR_CODES.len()];
    errors[ErrorCode::FlagNotFound as usize] = 2;
    assert_eq!(missing.errors, errors);

    // Reading twice reads the same: nothing is counted twice.
    assert_eq!(evaluations.totals(&sets), evaluations.totals(&sets));
}

#[test]
fn counts_survive_reloads_and_leave_with_their_flag() {
    let evaluations = Evaluations::default();
    let first = two_flags("prod");
    serve(&evaluations, &first, "alpha", "on", Reason::Static, 5);
    serve(&evaluations, &first, "beta", "x", Reason::Static, 7);
    evaluations.counter(&first).not_found();

    // The next version keeps alpha (a variant renamed, the others reordered),
    // drops beta, adds gamma; both versions serve for a while.
    let second = set(
        "prod",
        json!({
            "alpha": {"state": "ENABLED", "variants": {"off": false, "yes": true}, "defaultVariant": "yes"},
            "gamma": {"state": "ENABLED", "variants": {"g": "g"}, "defaultVariant": "g"}
        }),
    );
    serve(&evaluations, &second, "alpha", "yes", Reason::Static, 2);
    serve(&evaluations, &second, "gamma", "g", Reason::Static, 1);
    let both = [first.clone(), second.clone()];
    assert_eq!(
        totals_of(&evaluations, &both, "prod", "alpha").variants["on"],
        reasons(&[(Reason::Static, 5)])
    );
    assert_eq!(
        totals_of(&evaluations, &both, "prod", "beta").variants["x"],
        reasons(&[(Reason::Static, 7)]),
        "beta is still served by the first version"
    );

    // The first version retires: its counts are folded in, once.
    drop(both);
    drop(first);
    let sets = [second.clone()];
    for _ in 0..2 {
        let totals = evaluations.totals(&sets);
        let alpha = &totals[&("prod".to_owned(), "alpha".to_owned())];
        assert!(
            !alpha.variants.contains_key("on"),
            "a variant no set has is dropped with its counts"
        );
        assert_eq!(alpha.variants["yes"], reasons(&[(Reason::Static, 2)]));
        assert!(
            !totals.contains_key(&("prod".to_owned(), "beta".to_owned())),
            "a flag no set has is dropped"
        );
        assert_eq!(
            totals[&("prod".to_owned(), "gamma".to_owned())].variants["g"],
            reasons(&[(Reason::Static, 1)])
        );
        assert_eq!(
            totals[&("prod".to_owned(), String::new())].errors[ErrorCode::FlagNotFound as usize],
            1
        );
    }
    serve(&evaluations, &second, "alpha", "yes", Reason::Static, 1);
    assert_eq!(
        totals_of(&evaluations, &sets, "prod", "alpha").variants["yes"],
        reasons(&[(Reason::Static, 3)])
    );
}

#[test]
fn environments_with_the_same_flags_count_apart() {
    let evaluations = Evaluations::default();
    let (prod, staging) = (two_flags("prod"), two_flags("staging"));
    serve(&evaluations, &prod, "alpha", "on", Reason::Static, 1);
    serve(&evaluations, &staging, "alpha", "on", Reason::Static, 2);
    let sets = [prod, staging];
    assert_eq!(
        totals_of(&evaluations, &sets, "prod", "alpha").variants["on"][Reason::Static as usize],
        1
    );
    assert_eq!(
        totals_of(&evaluations, &sets, "staging", "alpha").variants["on"][Reason::Static as usize],
        2
    );
}

#[test]
fn counts_from_many_threads_add_up() {
    // More threads than shards: the later ones share the last shard.
    let evaluations = Arc::new(Evaluations::default());
    let set = two_flags("prod");
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let (evaluations, set) = (evaluations.clone(), set.clone());
            std::thread::spawn(move || {
                serve(
                    &evaluations,
                    &set,
                    "beta",
                    "y",
                    Reason::TargetingMatch,
                    10_000,
                );
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("counted");
    }
    assert_eq!(
        totals_of(&evaluations, &[set], "prod", "beta").variants["y"],
        reasons(&[(Reason::TargetingMatch, 240_000)])
    );
}

#[test]
fn reloads_leave_no_blocks_behind_without_a_scraper() {
    let evaluations = Evaluations::default();
    for _ in 0..50 {
        let set = two_flags("prod");
        serve(&evaluations, &set, "alpha", "on", Reason::Static, 1);
    }
    assert!(
        evaluations.tallies.lock().expect("lock").live.len() <= 1,
        "retired blocks are folded when the next set counts"
    );
    let set = two_flags("prod");
    assert_eq!(
        totals_of(&evaluations, &[set], "prod", "alpha").variants["on"][Reason::Static as usize],
        50
    );
}

#[test]
fn a_set_counted_by_two_registries_counts_in_both() {
    let (one, two) = (Evaluations::default(), Evaluations::default());
    let set = two_flags("prod");
    serve(&one, &set, "alpha", "on", Reason::Static, 2);
    serve(&two, &set, "alpha", "on", Reason::Static, 3);
    serve(&two, &set, "alpha", "on", Reason::Static, 4);
    let sets = [set];
    assert_eq!(
        totals_of(&one, &sets, "prod", "alpha").variants["on"][Reason::Static as usize],
        2
    );
    assert_eq!(
        totals_of(&two, &sets, "prod", "alpha").variants["on"][Reason::Static as usize],
        7
    );
}

#[test]
fn scrapes_while_sets_come_and_go_never_go_backwards() {
    // Sets of one environment are made, counted into and dropped on other
    // threads while scrapes fold them: every count is seen once, and no
    // total ever shrinks (a Prometheus counter must not).
    let evaluations = Arc::new(Evaluations::default());
    let anchor = two_flags("prod");
    let (threads, versions, per_version) = (4, 50, 100);
    let counting: Vec<_> = (0..threads)
        .map(|_| {
            let evaluations = evaluations.clone();
            std::thread::spawn(move || {
                for _ in 0..versions {
                    let set = two_flags("prod");
                    serve(
                        &evaluations,
                        &set,
                        "alpha",
                        "on",
                        Reason::Static,
                        per_version,
                    );
                }
            })
        })
        .collect();
    let sets = [anchor];
    let read = || {
        totals_of(&evaluations, &sets, "prod", "alpha")
            .variants
            .get("on")
            .map_or(0, |r| r[Reason::Static as usize])
    };
    let mut last = 0;
    while !counting.iter().all(std::thread::JoinHandle::is_finished) {
        let now = read();
        assert!(now >= last, "went back from {last} to {now}");
        last = now;
    }
    for thread in counting {
        thread.join().expect("counted");
    }
    assert_eq!(read(), threads * versions * per_version);
    assert!(
        evaluations.tallies.lock().expect("lock").live.len() <= 1,
        "every dropped set's block is folded"
    );
}

#[test]
fn a_set_too_large_to_shard_counts_in_one_block_every_thread_shares() {
    let set = two_flags("prod");
    let one = super::SetCounters::bounded(0, &set, 0);
    assert_eq!(one.shards, 1, "nothing fits the bound: one shard");
    assert_eq!(one.lines.len() * 8, one.stride, "one shard's counters only");
    let sharded = super::SetCounters::bounded(0, &set, usize::MAX);
    assert_eq!(sharded.shards, super::shards());

    // Counted through the one block from more threads than shards: exact.
    let evaluations = Arc::new(Evaluations::default());
    set.counters
        .set(Arc::new(super::SetCounters::bounded(
            evaluations.id,
            &set,
            0,
        )))
        .expect("not counted yet");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (evaluations, set) = (evaluations.clone(), set.clone());
            std::thread::spawn(move || {
                serve(&evaluations, &set, "alpha", "off", Reason::Default, 5_000);
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("counted");
    }
    // (Counted into the block the set holds, not registered: summed here.)
    let mut totals = super::Totals::new();
    set.counters.get().expect("block").add_to(&mut totals);
    assert_eq!(
        totals[&("prod".to_owned(), "alpha".to_owned())].variants["off"],
        reasons(&[(Reason::Default, 40_000)])
    );
}

#[test]
fn without_a_scraper_names_that_change_at_every_reload_stay_bounded() {
    let evaluations = Evaluations {
        max_retired_rows: 16,
        ..Evaluations::default()
    };
    let rows = |evaluations: &Evaluations| -> usize {
        let tallies = evaluations.tallies.lock().expect("lock");
        tallies.retired.values().map(|c| 1 + c.variants.len()).sum()
    };
    // Each version keeps one flag and renames the other.
    let renamed = |i: usize| {
        set(
            "prod",
            json!({
                format!("flag-{i}"): {"state": "ENABLED",
                    "variants": {format!("v{i}"): true}, "defaultVariant": format!("v{i}")},
                "steady": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}
            }),
        )
    };
    let mut last = renamed(0);
    for i in 0..200 {
        last = renamed(i);
        let (flag, variant) = (format!("flag-{i}"), format!("v{i}"));
        serve(&evaluations, &last, &flag, &variant, Reason::Static, 1);
        serve(&evaluations, &last, "steady", "on", Reason::Static, 1);
        assert!(
            rows(&evaluations) <= 16,
            "reload {i}: {}",
            rows(&evaluations)
        );
    }
    // What the set in force counted is still there, and the flag every
    // version kept lost none of its counts.
    let sets = [last];
    assert_eq!(
        totals_of(&evaluations, &sets, "prod", "flag-199").variants["v199"]
            [Reason::Static as usize],
        1
    );
    assert_eq!(
        totals_of(&evaluations, &sets, "prod", "steady").variants["on"][Reason::Static as usize],
        200
    );
    // Below the bound nothing is dropped before a scrape.
    let kept = Evaluations::default();
    for i in 0..50 {
        let set = renamed(i);
        serve(
            &kept,
            &set,
            &format!("flag-{i}"),
            &format!("v{i}"),
            Reason::Static,
            1,
        );
        serve(&kept, &set, "steady", "on", Reason::Static, 1);
    }
    assert_eq!(
        rows(&kept),
        2 * 49 + 2,
        "the 49 retired renamed flags, each with its variant, and the kept one"
    );
}
