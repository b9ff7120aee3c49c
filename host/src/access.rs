//! Who may evaluate: caller API keys per environment (`--api-keys-file`).
//!
//! The key file is JSON, `{"<environment>": ["<key>", "sha256:<hex>", ...]}`:
//! a plain key, or the hex SHA-256 of one, so the file need not hold the
//! keys themselves. A caller presents its key as `Authorization: Bearer
//! <key>` or `X-API-Key: <key>` (OFREP's two schemes). Once a key file is
//! configured every environment needs a key: one the file lists no key for
//! admits nobody.
//!
//! The file is watched like the flag files: a changed file that parses
//! replaces the keys at once (rotation without a restart); one that does not
//! is refused with the file and the reason, and the keys in force stay.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};
use tracing::{error, info};

use crate::store::{Stamp, valid_environment_name};

/// Largest key file read: 16 MiB holds some 200,000 hashed keys.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Shortest plain key accepted: shorter ones can be guessed.
pub const MIN_KEY_CHARS: usize = 16;

/// Longest key looked up; a longer one is unknown.
const MAX_KEY_BYTES: usize = 1024;

/// Presented keys considered per request (the header values of both
/// schemes); more are ignored, so a request cannot make flaghost hash
/// a hundred candidates.
const MAX_PRESENTED: usize = 4;

/// The keys in force, and where they come from.
pub struct ApiKeys {
    file: PathBuf,
    table: ArcSwap<KeyTable>,
    /// The version last read (loaded or refused): an unchanged file is
    /// not read again, nor its refusal logged again.
    seen: Mutex<Seen>,
    /// A reload is under way: a tick that finds one running skips.
    reloading: AtomicBool,
    /// Versions of the file put in force and refused.
    reloads: crate::metrics::Reloads,
    /// Each key's request rate, if limited.
    rate: Option<RateLimit>,
    /// The clock's origin for the rate allowance.
    started: std::time::Instant,
}

/// A version of the key file.
#[derive(Default)]
struct Seen {
    /// Its stamp, when it can vouch for the bytes.
    stamp: Option<Stamp>,
    /// The SHA-256 of its bytes.
    digest: [u8; 32],
}

/// One key: its environments, and its rate allowance.
#[derive(Debug, Default)]
struct Entry {
    environments: Box<[Box<str>]>,
    /// GCRA's theoretical arrival time of the key's next request, in
    /// nanoseconds after [`ApiKeys::started`]. Shared with the entry of the
    /// same key in the next version of the file, so a reload (any edit,
    /// a rotation of other keys) gives no key a fresh burst.
    next_at: Arc<AtomicU64>,
}

/// A per-key request rate (`--api-key-rate-limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests a second, sustained; a key may also burst this many at once.
    pub per_second: u32,
}

/// Environments by key digest.
#[derive(Debug, Default)]
struct KeyTable {
    environments: HashMap<[u8; 32], Entry>,
    /// Environments the file names (for the log line).
    named: usize,
}

/// Why a caller may not evaluate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No key was sent.
    #[error(
        "environment {0:?} needs an API key: send \"Authorization: Bearer <key>\" or \"X-API-Key: <key>\""
    )]
    Missing(String),
    /// The key sent is no key flaghost knows.
    #[error("the API key sent is not valid (unknown, or revoked)")]
    Unknown,
    /// The key is valid, for other environments.
    #[error("the API key sent is not valid for environment {0:?}")]
    OtherEnvironment(String),
    /// The key made its requests for now.
    #[error(
        "this API key is limited to {per_second} requests a second: retry after the time Retry-After gives"
    )]
    RateLimited {
        /// The limit.
        per_second: u32,
        /// When the key may make its next request.
        retry_after: std::time::Duration,
    },
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("API key file {file}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub file: String,
    /// What to fix.
    pub reason: String,
}

impl ApiKeys {
    /// The keys of `file`; an error says what to fix in it.
    pub fn load(file: &Path) -> Result<Self, KeyFileError> {
        let (bytes, stamp) = read(file)?;
        let table = parse(file, &bytes)?;
        Ok(Self {
            file: file.to_path_buf(),
            table: ArcSwap::from_pointee(table),
            seen: Mutex::new(Seen {
                stamp,
                digest: Sha256::digest(&bytes).into(),
            }),
            reloading: AtomicBool::new(false),
            reloads: Default::default(),
            rate: None,
            started: std::time::Instant::now(),
        })
    }

    /// These keys, each limited to `rate` (`None`: unlimited).
    pub fn with_rate_limit(mut self, rate: Option<RateLimit>) -> Self {
        self.rate = rate.filter(|r| r.per_second > 0);
        self
    }

    /// How many environments and keys are in force (for the log).
    pub fn counts(&self) -> (usize, usize) {
        let table = self.table.load();
        (table.named, table.environments.len())
    }

    /// Versions of the file put in force and refused.
    pub fn reloads(&self) -> &crate::metrics::Reloads {
        &self.reloads
    }

    /// Whether a caller sending `headers` may evaluate in `environment`.
    pub fn admit(&self, environment: &str, headers: &HeaderMap) -> Result<(), Denied> {
        let presented = presented(headers);
        if presented.is_empty() {
            return Err(Denied::Missing(environment.to_owned()));
        }
        let table = self.table.load();
        let mut known = false;
        for key in presented {
            // NB: looked up by digest: the table holds no key, and the
            // lookup's timing depends on the digest, not on how much of a
            // key a guess got right.
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            if let Some(entry) = table.environments.get(&digest) {
                if entry.environments.iter().any(|e| &**e == environment) {
                    return self.within_rate(entry);
                }
                known = true;
            }
        }
        Err(if known {
            Denied::OtherEnvironment(environment.to_owned())
        } else {
            Denied::Unknown
        })
    }

    /// Whether `headers` carry a key of this file's, for any environment
    /// (no rate is spent): a caller trusted to join its trace to ours.
    pub fn recognises(&self, headers: &HeaderMap) -> bool {
        let table = self.table.load();
        presented(headers).into_iter().any(|key| {
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            table.environments.contains_key(&digest)
        })
    }

    /// Whether `entry`'s key may make one more request now (GCRA: a key
    /// makes `per_second` requests a second, in a burst or spread).
    fn within_rate(&self, entry: &Entry) -> Result<(), Denied> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let interval = 1_000_000_000 / u64::from(rate.per_second);
        let tolerance = interval * u64::from(rate.per_second - 1);
        let now = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut next_at = entry.next_at.load(Ordering::Acquire);
        loop {
            let earliest = next_at.saturating_sub(tolerance);
            if now < earliest {
                return Err(Denied::RateLimited {
                    per_second: rate.per_second,
                    retry_after: std::time::Duration::from_nanos(earliest - now),
                });
            }
            let after = next_at.max(now) + interval;
            match entry.next_at.compare_exchange_weak(
                next_at,
                after,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => next_at = current,
            }
        }
    }

    /// Reads the file again if it changed: a file that parses replaces the
    /// keys; one that does not is refused (logged once) and the keys stay.
    /// Blocking (a `stat`, and a read when the file changed).
    pub fn reload(&self) {
        let stamp = std::fs::metadata(&self.file).ok().map(|m| Stamp::of(&m));
        if stamp.is_some() && self.seen().stamp == stamp {
            return;
        }
        let (bytes, stamp) = match read(&self.file) {
            Ok(read) => read,
            Err(e) => {
                // NB: a missing or unreadable file keeps the keys: deleting
                // it must not open every environment.
                let digest = Sha256::digest(e.reason.as_bytes()).into();
                if self.seen().digest != digest {
                    *self.seen() = Seen {
                        stamp: None,
                        digest,
                    };
                    self.reloads.refused();
                    error!(file = %self.file.display(), reason = %e.reason,
                           "API key file unreadable: the keys loaded before stay in force");
                }
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if self.seen().digest == digest {
            // The same bytes (touched, or not settled when last read).
            self.seen().stamp = stamp;
            return;
        }
        *self.seen() = Seen { stamp, digest };
        match parse(&self.file, &bytes) {
            Ok(mut table) => {
                let before = self.table.load();
                for (digest, entry) in &mut table.environments {
                    if let Some(kept) = before.environments.get(digest) {
                        entry.next_at = kept.next_at.clone();
                    }
                }
                info!(file = %self.file.display(), environments = table.named,
                      keys = table.environments.len(), "API keys reloaded");
                self.table.store(Arc::new(table));
                self.reloads.accepted();
            }
            Err(e) => {
                self.reloads.refused();
                error!(file = %self.file.display(), reason = %e.reason,
                       "API key file refused: the keys loaded before stay in force");
            }
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`ApiKeys::reload`] on a blocking thread, unless one is under way.
    pub fn reload_in_background(self: &Arc<Self>) {
        if self.reloading.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the reload ends (a panic included), so
        /// one failed reload cannot stop every later one.
        struct Done(Arc<ApiKeys>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.reloading.store(false, Ordering::Release);
            }
        }
        let done = Done(self.clone());
        tokio::task::spawn_blocking(move || done.0.reload());
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (environments, keys) = self.counts();
        f.debug_struct("ApiKeys")
            .field("file", &self.file)
            .field("environments", &environments)
            .field("keys", &keys)
            .finish()
    }
}

/// The keys a request presents: bearer tokens and `X-API-Key` values.
fn presented(headers: &HeaderMap) -> Vec<&str> {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            // NB: the scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let api_key = headers
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim);
    bearer
        .chain(api_key)
        .filter(|k| !k.is_empty())
        .take(MAX_PRESENTED)
        // NB: no key is this long; a longer one is unknown without hashing it.
        .map(|k| if k.len() > MAX_KEY_BYTES { "" } else { k })
        .collect()
}

/// The file's bytes, at most [`MAX_FILE_BYTES`], and its stamp when it can
/// vouch for them.
fn read(file: &Path) -> Result<(Vec<u8>, Option<Stamp>), KeyFileError> {
    let fail = |reason: String| KeyFileError {
        file: file.display().to_string(),
        reason,
    };
    // NB: a FIFO or device at the path must not block the open (and with
    // it every later reload): checked first, and opened without blocking.
    let before = std::fs::metadata(file).map_err(|e| fail(format!("cannot read it ({e})")))?;
    if !before.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    let mut opened = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(file)
            .map_err(|e| fail(format!("cannot open it ({e})")))?
    };
    let meta = opened
        .metadata()
        .map_err(|e| fail(format!("cannot stat it ({e})")))?;
    if !meta.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(fail(format!(
            "is over {} MiB: list hashed keys of the environments this instance serves",
            MAX_FILE_BYTES >> 20
        )));
    }
    let mut bytes = Vec::new();
    (&mut opened)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read it ({e})")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(fail(format!(
            "is over {} MiB: list hashed keys of the environments this instance serves",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok((bytes, Stamp::of(&meta).settled()))
}

/// The key table `bytes` of `file` describe.
fn parse(file: &Path, bytes: &[u8]) -> Result<KeyTable, KeyFileError> {
    let fail = |reason: String| KeyFileError {
        file: file.display().to_string(),
        reason,
    };
    let entries: Entries = serde_json::from_slice(bytes).map_err(|e| {
        fail(format!(
            "{e}: the file is {{\"<environment>\": [\"<key>\", \"sha256:<64 hex digits>\", ...]}}"
        ))
    })?;
    let mut table = KeyTable::default();
    let mut by_digest: HashMap<[u8; 32], Vec<Box<str>>> = HashMap::new();
    let mut seen_environments = std::collections::HashSet::new();
    for (environment, keys) in entries.0 {
        if !valid_environment_name(&environment) {
            return Err(fail(format!(
                "{environment:?} is not an environment name: use letters, digits, '_', '.' and '-'"
            )));
        }
        if !seen_environments.insert(environment.clone()) {
            return Err(fail(format!(
                "environment {environment:?} is listed twice: merge its keys into one list"
            )));
        }
        for (index, entry) in keys.iter().enumerate() {
            let digest = digest_of(entry).map_err(|why| {
                fail(format!(
                    "environment {environment:?}, key #{}: {why}",
                    index + 1
                ))
            })?;
            // NB: environments are unique, so a key listed twice under one
            // is the last one pushed.
            let environments = by_digest.entry(digest).or_default();
            if environments.last().is_none_or(|e| **e != *environment) {
                environments.push(environment.as_str().into());
            }
        }
        table.named += 1;
    }
    table.environments = by_digest
        .into_iter()
        .map(|(digest, environments)| {
            (
                digest,
                Entry {
                    environments: environments.into_boxed_slice(),
                    next_at: Arc::default(),
                },
            )
        })
        .collect();
    Ok(table)
}

/// The digest an entry stands for: its own hex after `sha256:`, or the
/// SHA-256 of a plain key.
fn digest_of(entry: &str) -> Result<[u8; 32], String> {
    if let Some(hex) = entry.strip_prefix("sha256:") {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "\"sha256:\" must be followed by 64 hex digits (the SHA-256 of the key, as `printf %s KEY | sha256sum` prints it), found {} characters",
                hex.len()
            ));
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("bad hex digit ({e})"))?;
        }
        return Ok(digest);
    }
    if entry.len() == 64 && entry.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "looks like a SHA-256 without its prefix: write \"sha256:<hex>\" for a hashed key (as it stands, the hex itself would be the key)"
                .into(),
        );
    }
    let lower = entry.to_ascii_lowercase();
    if lower.starts_with("sha256") || lower.starts_with("sha-256") {
        return Err(
            "starts like a hashed entry but not with \"sha256:\" exactly (lower case, a colon): fix the prefix"
                .into(),
        );
    }
    if entry.trim() != entry {
        return Err("has spaces around it: a header cannot carry them, remove them".into());
    }
    if !entry.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "holds a character an HTTP header cannot carry: use printable ASCII without spaces"
                .into(),
        );
    }
    if entry.len() < MIN_KEY_CHARS {
        return Err(format!(
            "is {} characters: a key needs at least {MIN_KEY_CHARS} (shorter ones can be guessed)",
            entry.len()
        ));
    }
    Ok(Sha256::digest(entry.as_bytes()).into())
}

/// The file's entries in order, duplicates kept (a JSON map would keep
/// only the last of an environment listed twice, dropping keys unseen).
struct Entries(Vec<(String, Vec<String>)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of environments, each a list of keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Vec<String>>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const KEY: &str = "prod-key-0123456789abcdef";
    const STAGING: &str = "staging-key-0123456789abcdef";

    fn keys(text: &str) -> Result<ApiKeys, KeyFileError> {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("keys.json");
        std::fs::write(&file, text).expect("write");
        ApiKeys::load(&file)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn a_key_admits_its_environment_either_way_and_no_other() {
        let hashed = crate::sha256_hex(STAGING.as_bytes());
        let keys = keys(&format!(
            r#"{{"production": ["{KEY}"], "staging": ["sha256:{hashed}"]}}"#
        ))
        .expect("loads");
        let bearer = format!("Bearer {KEY}");
        for sent in [
            headers(&[("authorization", &bearer)]),
            headers(&[("authorization", &format!("bearer  {KEY} "))]),
            headers(&[("x-api-key", KEY)]),
            // A wrong key beside the right one: the right one admits.
            headers(&[("x-api-key", "nope"), ("authorization", &bearer)]),
        ] {
            assert_eq!(keys.admit("production", &sent), Ok(()), "{sent:?}");
        }
        assert_eq!(
            keys.admit("staging", &headers(&[("x-api-key", STAGING)])),
            Ok(())
        );
        assert_eq!(
            keys.admit("staging", &headers(&[("authorization", &bearer)])),
            Err(Denied::OtherEnvironment("staging".into()))
        );
        assert_eq!(
            keys.admit("production", &headers(&[("x-api-key", "sha256:whatever")])),
            Err(Denied::Unknown)
        );
        // The file's hash is no key: only the key it hashes is.
        assert_eq!(
            keys.admit(
                "staging",
                &headers(&[("x-api-key", &format!("sha256:{hashed}"))])
            ),
            Err(Denied::Unknown)
        );
        assert_eq!(
            keys.admit(
                "production",
                &headers(&[("authorization", &format!("Basic {KEY}"))])
            ),
            Err(Denied::Missing("production".into()))
        );
        // An environment the file does not name admits nobody.
        assert_eq!(
            keys.admit("dev", &headers(&[("x-api-key", KEY)])),
            Err(Denied::OtherEnvironment("dev".into()))
        );
        assert_eq!(keys.counts(), (2, 2));
    }

    #[test]
    fn a_rate_limited_key_bursts_its_rate_then_waits_and_others_are_not_held_up() {
        let keys = keys(&format!(
            r#"{{"production": ["{KEY}"], "staging": ["{STAGING}"]}}"#
        ))
        .expect("loads")
        .with_rate_limit(Some(RateLimit { per_second: 3 }));
        let prod = headers(&[("x-api-key", KEY)]);
        for _ in 0..3 {
            assert_eq!(keys.admit("production", &prod), Ok(()));
        }
        match keys.admit("production", &prod) {
            Err(Denied::RateLimited {
                per_second: 3,
                retry_after,
            }) => {
                assert!(
                    retry_after <= std::time::Duration::from_millis(334),
                    "{retry_after:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Another key has its own allowance; a refused key is not charged.
        assert_eq!(
            keys.admit("staging", &headers(&[("x-api-key", STAGING)])),
            Ok(())
        );
        assert_eq!(
            keys.admit("staging", &prod),
            Err(Denied::OtherEnvironment("staging".into()))
        );
        std::thread::sleep(std::time::Duration::from_millis(340));
        assert_eq!(
            keys.admit("production", &prod),
            Ok(()),
            "one more after a third of a second"
        );
    }

    #[test]
    fn a_bad_key_file_says_where_and_what_to_fix() {
        for (text, says) in [
            ("[]", "an object of environments"),
            (r#"{"production": "k"}"#, "expected a sequence"),
            (r#"{"production": [1]}"#, "expected a string"),
            (
                r#"{"../x": ["prod-key-0123456789abcdef"]}"#,
                "not an environment name",
            ),
            (r#"{"production": ["short"]}"#, "key #1: is 5 characters"),
            (r#"{"production": ["sha256:abc"]}"#, "64 hex digits"),
            (
                r#"{"production": ["ef5c6728735591e25f14ce6e259493aea3bb151a770728af091b91fd66f8f991"]}"#,
                "without its prefix",
            ),
            (
                r#"{"production": ["SHA256:ef5c6728735591e25f14ce6e259493aea3bb151a770728af091b91fd66f8f991"]}"#,
                "not with \"sha256:\" exactly",
            ),
            (
                r#"{"production": [" prod-key-0123456789abcdef"]}"#,
                "spaces around",
            ),
            (
                r#"{"production": ["prod-key-01234567\u00e9"]}"#,
                "printable ASCII",
            ),
            (
                r#"{"production": ["prod-key-0123456789abcdef"], "production": []}"#,
                "listed twice",
            ),
            ("{", "EOF"),
        ] {
            let error = keys(text).expect_err(text).to_string();
            assert!(error.contains("keys.json"), "{error}");
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn a_fifo_or_a_huge_file_is_refused_without_blocking_or_reading_it() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("keys.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let error = ApiKeys::load(&fifo).expect_err("a FIFO").to_string();
        assert!(error.contains("not a regular file"), "{error}");
        let huge = dir.path().join("huge.json");
        std::fs::File::create(&huge)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .expect("sparse file");
        let error = ApiKeys::load(&huge).expect_err("too large").to_string();
        assert!(error.contains("is over 16 MiB"), "{error}");
    }

    #[test]
    fn a_refused_reload_keeps_the_keys_and_a_good_one_rotates_them() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("keys.json");
        std::fs::write(&file, format!(r#"{{"production": ["{KEY}"]}}"#)).expect("write");
        let keys = ApiKeys::load(&file).expect("loads");
        let old = headers(&[("x-api-key", KEY)]);
        let new = headers(&[("x-api-key", STAGING)]);
        std::fs::write(&file, "{not json").expect("write");
        keys.reload();
        assert_eq!(keys.admit("production", &old), Ok(()));
        std::fs::remove_file(&file).expect("rm");
        keys.reload();
        assert_eq!(keys.admit("production", &old), Ok(()));
        std::fs::write(&file, format!(r#"{{"production": ["{STAGING}"]}}"#)).expect("write");
        keys.reload();
        assert_eq!(keys.admit("production", &new), Ok(()));
        assert_eq!(keys.admit("production", &old), Err(Denied::Unknown));
    }

    #[test]
    fn a_reload_gives_a_key_that_stays_no_fresh_allowance() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("keys.json");
        std::fs::write(&file, format!(r#"{{"production": ["{KEY}"]}}"#)).expect("write");
        let keys = ApiKeys::load(&file)
            .expect("loads")
            .with_rate_limit(Some(RateLimit { per_second: 1 }));
        let prod = headers(&[("x-api-key", KEY)]);
        let staging = headers(&[("x-api-key", STAGING)]);
        // NB: 1 a second: the allowance comes back only after a second.
        assert_eq!(keys.admit("production", &prod), Ok(()));
        // Another key added (an edit an attacker with one key might wait for).
        std::fs::write(
            &file,
            format!(r#"{{"production": ["{KEY}"], "staging": ["{STAGING}"]}}"#),
        )
        .expect("write");
        keys.reload();
        assert_eq!(keys.admit("staging", &staging), Ok(()), "the new key");
        assert!(
            matches!(
                keys.admit("production", &prod),
                Err(Denied::RateLimited { .. })
            ),
            "the kept key's allowance is still spent"
        );
    }
}
