//! One evaluation, warm, host side included: a static flag, and plugin flags
//! with each isolation strategy side by side.
//!
//! `cargo bench -p flaghost-benches --bench evaluation`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use flaghost::evaluation::evaluate;
use flaghost::plugins::{Isolation, Limits};
use flaghost_benches::{example_flags, typical_context};
use std::hint::black_box;

fn static_flag(c: &mut Criterion) {
    let (_runtime, set) = example_flags(Limits::default());
    let ctx = typical_context();
    c.bench_function("evaluate/static", |b| {
        b.iter(|| evaluate(black_box(&set), black_box("items-per-page"), &ctx, None))
    });
}

fn plugin_flag(c: &mut Criterion) {
    let mut group = c.benchmark_group("evaluate/plugin");
    let ctx = typical_context();
    for (name, isolation) in [("reuse", Isolation::Reuse), ("fresh", Isolation::Fresh)] {
        let (_runtime, set) = example_flags(Limits {
            isolation,
            ..Limits::default()
        });
        // allow-list reads one attribute; percentage-rollout hashes the key.
        for flag in ["eu-pricing-banner", "new-checkout"] {
            let first = evaluate(&set, flag, &ctx, None).expect("evaluates");
            assert_eq!(first.reason.as_str(), "TARGETING_MATCH");
            group.bench_function(format!("{name}/{flag}"), |b| {
                b.iter(|| evaluate(black_box(&set), black_box(flag), &ctx, None))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, static_flag, plugin_flag);
criterion_main!(benches);
