//! The shared tier in Redis.
//!
//! # Keys
//!
//! - `feature_flags:{environment}`: the environment's resolved flag set, a
//!   JSON [`SetEntry`]: the flags as flaghost evaluates them (a flagd
//!   document with `$ref`s resolved), the digest of the flag file they came
//!   from, and when the entry was written and expires;
//! - `feature_flags:{environment}:{flagKey}`: one flag's resolved
//!   definition, a JSON [`FlagEntry`], for tools that read a single flag.
//!
//! Both are written with the TTL (`SET … EX`) in one round trip (a
//! `MULTI`/`EXEC` pipeline), and written again before they expire, or as
//! soon as any of them is found missing, while this instance serves the set.
//!
//! Entries are untrusted input: anyone who can write to Redis can plant one.
//! One is read with a size cap (`GETRANGE`, so an oversized value is never
//! fetched whole), parsed by the same bounded code as flag files, and with a
//! shared `--cache-signing-key` it must carry a valid HMAC-SHA-256
//! ([`crate::signing`]) and not have expired. An entry that does not read
//! back (another format, garbage, over the cap, unsigned or forged, a plugin
//! not loaded here) is a miss: logged, and overwritten by the flag store's set.
//!
//! Invalidations are published on [`CHANNEL`] so that every instance drops
//! its snapshot; each instance ignores its own messages. With a signing key
//! they are signed too, and an unsigned, forged, replayed or old one is
//! ignored: an invalidation makes the next requests wait for a refresh, so
//! anyone who can publish on Redis could otherwise hold them again and again.

mod link;
mod tls;

pub use tls::RedisTls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use self::link::Link;
use super::{CacheError, CacheEvent, FlagCache, LinkStatus};
use crate::flags::{DocumentLimits, FlagSet, RuleBinder, parse_flag_file};
use crate::signing::SigningKey;

/// Key prefix of everything flaghost writes.
pub const PREFIX: &str = "feature_flags";
/// Pub/sub channel of invalidations.
pub const CHANNEL: &str = "feature_flags:invalidations";
/// The format of a [`SetEntry`]; bumped when the layout changes, so an older
/// instance reads a newer entry as a miss instead of misreading it.
pub const SET_FORMAT: &str = "flaghost.flag-set/1";
/// The format of a [`FlagEntry`].
pub const FLAG_FORMAT: &str = "flaghost.flag/1";
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time Redis has to answer a request before it is skipped.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// Bytes at the start of a set entry that hold its digest: the format,
/// the environment (a name of at most 128 bytes) and the digest come first.
const DIGEST_WITHIN: usize = 1023;
/// Keys per `SCAN` step and per `UNLINK`.
const SCAN_BATCH: usize = 500;

/// The key of an environment's flag set.
pub fn set_key(environment: &str) -> String {
    format!("{PREFIX}:{environment}")
}

/// The key of one flag.
pub fn flag_key(environment: &str, flag: &str) -> String {
    format!("{PREFIX}:{environment}:{flag}")
}

/// What is stored under `feature_flags:{environment}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetEntry<'a> {
    /// [`SET_FORMAT`].
    pub format: &'a str,
    /// The environment.
    pub environment: &'a str,
    /// SHA-256 of the flag file the set was built from.
    pub digest: &'a str,
    /// Unix milliseconds when written.
    pub written_at: u64,
    /// Unix milliseconds when the entry expires (the key's TTL).
    pub expires_at: u64,
    /// The flags, as a flagd document that parses alone.
    #[serde(borrow)]
    pub flag_set: &'a RawValue,
    /// Hex HMAC-SHA-256 of the fields above (see [`set_signature`]), when
    /// the writer had a `--cache-signing-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What an entry's signature covers: every field, each length-prefixed by
/// [`SigningKey::tag`], the flag set as its exact bytes in the entry.
fn set_signed_parts<'p>(
    environment: &'p str,
    digest: &'p str,
    written_at: &'p str,
    expires_at: &'p str,
    flag_set: &'p str,
) -> [&'p [u8]; 6] {
    [
        SET_FORMAT.as_bytes(),
        environment.as_bytes(),
        digest.as_bytes(),
        written_at.as_bytes(),
        expires_at.as_bytes(),
        flag_set.as_bytes(),
    ]
}

/// What is stored under `feature_flags:{environment}:{flagKey}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagEntry<'a> {
    /// [`FLAG_FORMAT`].
    pub format: &'a str,
    /// The environment.
    pub environment: &'a str,
    /// The flag's key.
    pub flag_key: &'a str,
    /// SHA-256 of the flag file the flag came from.
    pub digest: &'a str,
    /// Unix milliseconds when the entry expires.
    pub expires_at: u64,
    /// The flag's definition, flagd format, `$ref`s resolved.
    pub flag: &'a RawValue,
    /// Hex HMAC-SHA-256 of [`FLAG_FORMAT`], `environment`, `flagKey`,
    /// `digest`, `expiresAt` (decimal) and `flag` (its bytes), each
    /// length-prefixed, when the writer had a `--cache-signing-key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// An invalidation, as published.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Invalidation {
    /// One environment, or all when absent.
    environment: Option<String>,
    /// The instance that sent it.
    origin: String,
    /// Unix milliseconds when it was sent.
    #[serde(default)]
    sent_at: u64,
    /// Hex HMAC-SHA-256 of [`INVALIDATION_FORMAT`], the environment (`*`
    /// for all), the origin and `sentAt`, when the sender had a signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

/// What an invalidation's signature starts with.
const INVALIDATION_FORMAT: &str = "flaghost.invalidation/1";

/// How old a signed invalidation may be when it arrives; older ones (and a
/// second copy of one already taken) are replays.
const INVALIDATION_MAX_AGE_MS: u64 = 30_000;

impl Invalidation {
    fn signed_parts(&self) -> [Vec<u8>; 4] {
        [
            INVALIDATION_FORMAT.as_bytes().to_vec(),
            self.environment
                .as_deref()
                .unwrap_or("*")
                .as_bytes()
                .to_vec(),
            self.origin.as_bytes().to_vec(),
            self.sent_at.to_string().into_bytes(),
        ]
    }

    fn sign(mut self, key: Option<&SigningKey>) -> Self {
        self.signature = key.map(|key| {
            let parts = self.signed_parts();
            key.tag_hex(&parts.each_ref().map(Vec::as_slice))
        });
        self
    }

    /// Whether to act on it: always without a key; with one, when it is
    /// signed with it, recent, and not one already taken (`seen`: the
    /// recent ones by origin and time).
    fn trusted(
        &self,
        key: Option<&SigningKey>,
        now_ms: u64,
        seen: &mut std::collections::VecDeque<(String, u64)>,
    ) -> Result<(), &'static str> {
        let Some(key) = key else { return Ok(()) };
        let Some(tag) = self.signature.as_deref() else {
            return Err("unsigned, and --cache-signing-key is set");
        };
        let parts = self.signed_parts();
        if !key.verify_hex(&parts.each_ref().map(Vec::as_slice), tag) {
            return Err("its signature does not verify");
        }
        if now_ms.abs_diff(self.sent_at) > INVALIDATION_MAX_AGE_MS {
            return Err("sent too long ago (a replay?)");
        }
        seen.retain(|(_, at)| now_ms.abs_diff(*at) <= INVALIDATION_MAX_AGE_MS);
        if seen
            .iter()
            .any(|(origin, at)| *origin == self.origin && *at == self.sent_at)
        {
            return Err("already taken (a replay)");
        }
        // NB: bounded: a key holder floods nothing it could not already.
        if seen.len() >= 10_000 {
            seen.pop_front();
        }
        seen.push_back((self.origin.clone(), self.sent_at));
        Ok(())
    }
}

/// How to reach Redis. Its `Debug` redacts a password in the URL.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host[:port][/db]`.
    pub url: String,
    /// How long entries live.
    pub ttl: Duration,
    /// How long a request may wait for Redis before it is served from memory.
    pub response_timeout: Duration,
    /// Shared by every instance: entries are signed with it, and one that
    /// is unsigned or does not verify is a miss. `None`: entries are
    /// trusted as read.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Largest entry read or written; a larger one is a miss (or not written).
    pub max_entry_bytes: usize,
    /// Bounds on the flag document an entry holds: the same as on files.
    pub documents: DocumentLimits,
    /// Certificates for a `rediss://` URL.
    pub tls: RedisTls,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact_url(&self.url))
            .field("ttl", &self.ttl)
            .field("response_timeout", &self.response_timeout)
            .field("signing_key", &self.signing_key)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("documents", &self.documents)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Default of [`RedisOptions::max_entry_bytes`]: the largest flag file
/// ([`crate::flags::DEFAULT_MAX_FILE_BYTES`]), plus what its `$ref`s may add
/// once resolved (an entry holds the resolved rules), plus the envelope; as
/// [`DocumentLimits::max_entry_bytes`] gives for other bounds.
pub const DEFAULT_MAX_ENTRY_BYTES: usize =
    crate::flags::DEFAULT_MAX_FILE_BYTES + crate::flags::DEFAULT_MAX_EXPANSION_BYTES + (1 << 20);

impl RedisOptions {
    /// Checks that `url` is a Redis URL; the error never repeats a password.
    pub fn check_url(url: &str) -> Result<(), String> {
        let info =
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| bad_url(url, &e))?;
        if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            return Err(format!(
                "{}: #insecure would turn off the check of Redis's certificate; give the CA that signs it with --redis-ca-file (FLAGHOST_REDIS_CA_FILE) instead",
                redact_url(url)
            ));
        }
        Ok(())
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn is_tls(url: &str) -> bool {
        redis::IntoConnectionInfo::into_connection_info(url)
            .is_ok_and(|info| matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }))
    }
}

/// Why `url` was refused, without repeating its password.
fn bad_url(url: &str, e: &redis::RedisError) -> String {
    format!(
        "{} is not a Redis URL ({:?}): write redis://[user:password@]host[:port][/db], \
         rediss://... for TLS or redis+unix:///path",
        redact_url(url),
        e.kind()
    )
}

/// `url` with its password (in the user part or a `password` query
/// parameter) replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparsable url>".into();
    };
    if parsed.password().is_some() {
        // NB: fails only for URLs that cannot have a password at all.
        let _ = parsed.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let secret = matches!(k.as_ref(), "pass" | "password");
            (
                k.into_owned(),
                if secret { "***".into() } else { v.into_owned() },
            )
        })
        .collect();
    if !pairs.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Flag sets in Redis.
pub struct RedisCache {
    link: Arc<Link>,
    ttl: Duration,
    signing_key: Option<Arc<SigningKey>>,
    max_entry_bytes: usize,
    /// Turns entries back into flag sets.
    reader: Arc<EntryReader>,
    /// This instance, in published invalidations.
    instance: String,
    events: broadcast::Sender<CacheEvent>,
    tasks: Vec<JoinHandle<()>>,
}

impl RedisCache {
    /// A cache on `options`, binding plugin rules read back to `binder`.
    /// Connects in the background: an unreachable Redis is not an error
    /// (flaghost serves from memory and moves to Redis when it answers).
    pub fn connect(
        options: &RedisOptions,
        binder: Arc<dyn RuleBinder + Send + Sync>,
    ) -> Result<Self, CacheError> {
        let url = redact_url(&options.url);
        let refuse = |e: redis::RedisError| CacheError {
            backend: "redis",
            reason: bad_url(&options.url, &e),
        };
        let info = redis::IntoConnectionInfo::into_connection_info(options.url.as_str())
            .map_err(refuse)?;
        // NB: without TCP_NODELAY a flag-set write (one large pipeline) waits
        // on Nagle and delayed ACKs: 36 ms instead of a few for 1,000 flags.
        // Keepalive and a user timeout: a peer that vanished without closing
        // (a partition, a killed VM) is an error within ~30 s.
        let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5));
        let tcp = redis::io::tcp::TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(keepalive);
        #[cfg(target_os = "linux")]
        let tcp = tcp.set_user_timeout(Duration::from_secs(30));
        let info = info.set_tcp_settings(tcp);
        let client = if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            tls::install_crypto_provider();
            let certificates = options.tls.certificates().map_err(|reason| CacheError {
                backend: "redis",
                reason,
            })?;
            redis::Client::build_with_tls(info, certificates).map_err(|e| CacheError {
                backend: "redis",
                reason: format!("{url}: cannot set up TLS with the certificates given ({e})"),
            })?
        } else {
            if options.tls.is_set() {
                return Err(CacheError {
                    backend: "redis",
                    reason: format!(
                        "{url}: TLS certificates are configured but the URL is not rediss://"
                    ),
                });
            }
            redis::Client::open(info).map_err(refuse)?
        };
        let (events, _) = broadcast::channel(64);
        let link = Arc::new(
            Link::new(
                client.clone(),
                url,
                options.response_timeout,
                CONNECT_TIMEOUT,
                events.clone(),
            )
            .map_err(|e| CacheError {
                backend: "redis",
                reason: e.to_string(),
            })?,
        );
        let instance = format!("{:016x}", rand::random::<u64>());
        let tasks = vec![
            tokio::spawn(link.clone().supervise()),
            tokio::spawn(listen(
                link.clone(),
                client.clone(),
                instance.clone(),
                options.signing_key.clone(),
                events.clone(),
            )),
        ];
        Ok(Self {
            link,
            ttl: options.ttl,
            signing_key: options.signing_key.clone(),
            max_entry_bytes: options.max_entry_bytes,
            reader: Arc::new(EntryReader::new(
                binder,
                options.signing_key.clone(),
                options.documents,
            )),
            instance,
            events,
            tasks,
        })
    }
}

/// Reads entries back into flag sets (parsing them, and checking their
/// plugin configurations in the plugins: blocking work). Public for the
/// property tests, which feed it mutated entries without a Redis.
pub struct EntryReader {
    /// Rebinds plugin rules of sets read back.
    binder: Arc<dyn RuleBinder + Send + Sync>,
    /// Entries must be signed with it, when set.
    signing_key: Option<Arc<SigningKey>>,
    /// Bounds on the document an entry holds.
    documents: DocumentLimits,
    /// The last set read back per environment, by digest: an entry whose
    /// digest did not change is not parsed again.
    read_back: Mutex<HashMap<String, Arc<FlagSet>>>,
}

impl EntryReader {
    /// A reader binding plugin rules with `binder`, requiring entries
    /// signed with `signing_key` when given, bounding documents by
    /// `documents`.
    pub fn new(
        binder: Arc<dyn RuleBinder + Send + Sync>,
        signing_key: Option<Arc<SigningKey>>,
        documents: DocumentLimits,
    ) -> Self {
        Self {
            binder,
            signing_key,
            documents,
            read_back: Mutex::new(HashMap::new()),
        }
    }

    /// Reads an entry back into a flag set; `Err` says why it is unusable.
    pub fn read_entry(&self, environment: &str, bytes: &[u8]) -> Result<Arc<FlagSet>, String> {
        let entry: SetEntry<'_> =
            serde_json::from_slice(bytes).map_err(|e| format!("not a flag-set entry: {e}"))?;
        if entry.format != SET_FORMAT {
            return Err(format!(
                "format {:?}, this flaghost reads {SET_FORMAT:?}",
                entry.format
            ));
        }
        if entry.environment != environment || entry.digest.is_empty() {
            return Err(format!(
                "entry names environment {:?}, digest {:?}",
                entry.environment, entry.digest
            ));
        }
        if let Some(key) = &self.signing_key {
            let Some(tag) = entry.signature.as_deref() else {
                return Err("unsigned, and --cache-signing-key is set".into());
            };
            let (written_at, expires_at) =
                (entry.written_at.to_string(), entry.expires_at.to_string());
            let parts = set_signed_parts(
                entry.environment,
                entry.digest,
                &written_at,
                &expires_at,
                entry.flag_set.get(),
            );
            if !key.verify_hex(&parts, tag) {
                return Err(
                    "its signature does not verify: forged, altered, or written with another --cache-signing-key"
                        .into(),
                );
            }
            // NB: signed, so its expiry cannot be moved; an old entry
            // planted again (an earlier version of the flags) is refused.
            if entry.expires_at < unix_millis(SystemTime::now()) {
                return Err(format!("it expired at {} (Unix ms)", entry.expires_at));
            }
        }
        if let Some(set) = self.read_back().get(environment)
            && set.digest == entry.digest
        {
            return Ok(set.clone());
        }
        let file = format!("redis key {}", set_key(environment));
        let mut set = parse_flag_file(
            &file,
            environment,
            entry.flag_set.get().as_bytes(),
            &*self.binder,
            &self.documents,
        )
        .map_err(|e| e.to_string())?;
        set.digest = entry.digest.to_owned();
        let set = Arc::new(set);
        self.read_back().insert(environment.to_owned(), set.clone());
        Ok(set)
    }

    fn read_back(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<FlagSet>>> {
        // Entries are replaced whole: a panic elsewhere cannot leave one torn.
        self.read_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl RedisCache {
    /// One `SCAN` step: the next cursor and the keys matching `pattern`.
    async fn scan_page(
        &self,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<String>), CacheError> {
        self.link
            .run("scan", |mut c| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_BATCH)
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    /// `SCAN`s keys matching `pattern` and `UNLINK`s them in batches.
    async fn unlink_matching(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys) = self.scan_page(cursor, pattern).await?;
            if !keys.is_empty() {
                deleted += self
                    .link
                    .run("unlink", |mut c| async move {
                        redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async::<u64>(&mut c)
                            .await
                    })
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn publish(&self, environment: Option<&str>) -> Result<(), CacheError> {
        let message = serde_json::to_string(
            &Invalidation {
                environment: environment.map(str::to_owned),
                origin: self.instance.clone(),
                sent_at: unix_millis(SystemTime::now()),
                signature: None,
            }
            .sign(self.signing_key.as_deref()),
        )
        .unwrap_or_default();
        self.link
            .run("publish", |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(CHANNEL)
                    .arg(message)
                    .query_async::<u64>(&mut c)
                    .await
            })
            .await
            .map(drop)
    }
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// JSON text as a raw value (serialised JSON always is one).
fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("an empty object is JSON"))
}

/// The set's entry and its flags' entries, serialised, signed with `key`
/// if given.
pub fn encode(
    set: &FlagSet,
    ttl: Duration,
    key: Option<&SigningKey>,
) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let now = SystemTime::now();
    let (written_at, expires_at) = (unix_millis(now), unix_millis(now + ttl));
    let (written_text, expires_text) = (written_at.to_string(), expires_at.to_string());
    let flag_set = raw(set.document());
    let signature = key.map(|key| {
        key.tag_hex(&set_signed_parts(
            &set.environment,
            &set.digest,
            &written_text,
            &expires_text,
            flag_set.get(),
        ))
    });
    let entry = SetEntry {
        format: SET_FORMAT,
        environment: &set.environment,
        digest: &set.digest,
        written_at,
        expires_at,
        flag_set: &flag_set,
        signature,
    };
    let flags = set
        .flags
        .iter()
        .map(|(flag_key_name, flag)| {
            let definition = &flag.definition;
            let signature = key.map(|key| {
                key.tag_hex(&[
                    FLAG_FORMAT.as_bytes(),
                    set.environment.as_bytes(),
                    flag_key_name.as_bytes(),
                    set.digest.as_bytes(),
                    expires_text.as_bytes(),
                    definition.get().as_bytes(),
                ])
            });
            let entry = FlagEntry {
                format: FLAG_FORMAT,
                environment: &set.environment,
                flag_key: flag_key_name,
                digest: &set.digest,
                expires_at,
                flag: definition,
                signature,
            };
            (
                flag_key(&set.environment, flag_key_name),
                serde_json::to_vec(&entry).unwrap_or_default(),
            )
        })
        .collect();
    (serde_json::to_vec(&entry).unwrap_or_default(), flags)
}

#[async_trait]
impl FlagCache for RedisCache {
    async fn get(&self, environment: &str) -> Result<Option<Arc<FlagSet>>, CacheError> {
        let key = set_key(environment);
        let cap = self.max_entry_bytes;
        // NB: GETRANGE fetches at most one byte over the cap, so a planted
        // value of gigabytes is never read whole. A missing key reads as
        // empty, as an empty value would: neither is an entry.
        let bytes: Vec<u8> = self
            .link
            .run("get", |mut c| async move {
                redis::cmd("GETRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(cap)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        if bytes.len() > cap {
            warn!(key = %set_key(environment), cap,
                  "entry in redis over the size cap (--cache-max-entry-mib): treated as a miss and overwritten");
            return Ok(None);
        }
        // NB: parsing binds plugin rules, which runs guest code (their
        // configuration checks): off the async workers.
        let (reader, env) = (self.reader.clone(), environment.to_owned());
        let read = tokio::task::spawn_blocking(move || reader.read_entry(&env, &bytes))
            .await
            .unwrap_or_else(|_| Err("reading it panicked; see the logs".into()));
        match read {
            Ok(set) => Ok(Some(set)),
            Err(why) => {
                warn!(key = %set_key(environment), reason = %why,
                      "unreadable entry in redis: treated as a miss and overwritten");
                Ok(None)
            }
        }
    }

    async fn put(&self, set: &FlagSet) -> Result<(), CacheError> {
        if !self.link.is_up() {
            // NB: before encoding, which costs more than the whole refresh.
            return Err(CacheError {
                backend: "redis",
                reason: "write: redis is unreachable; serving from memory".into(),
            });
        }
        let ttl = self.ttl.as_secs().max(1);
        let (entry, flags) = encode(set, self.ttl, self.signing_key.as_deref());
        if entry.len() > self.max_entry_bytes {
            return Err(CacheError {
                backend: "redis",
                reason: format!(
                    "write: the entry of {} is {} bytes, over the cap of {} (--cache-max-entry-mib); not written",
                    set.environment,
                    entry.len(),
                    self.max_entry_bytes
                ),
            });
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(set_key(&set.environment))
            .arg(entry)
            .arg("EX")
            .arg(ttl)
            .ignore();
        for (key, value) in flags {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        let result = self
            .link
            .run("write", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
        if self.link.is_up() {
            self.link.note_write(&result);
        }
        if result.is_ok() {
            debug!(environment = %set.environment, digest = %set.digest, flags = set.flags.len(),
                   "flag set written to redis");
        }
        result
    }

    async fn invalidate(&self, environment: Option<&str>) -> Result<u64, CacheError> {
        let deleted = match environment {
            Some(env) => {
                let key = set_key(env);
                let own: u64 = self
                    .link
                    .run("unlink", |mut c| async move {
                        redis::cmd("UNLINK").arg(&key).query_async(&mut c).await
                    })
                    .await?;
                own + self.unlink_matching(&format!("{PREFIX}:{env}:*")).await?
            }
            None => self.unlink_matching(&format!("{PREFIX}:*")).await?,
        };
        self.reader.read_back().clear();
        self.publish(environment).await?;
        info!(
            environment = environment.unwrap_or("*"),
            keys = deleted,
            "redis entries invalidated"
        );
        Ok(deleted)
    }

    async fn due(&self, sets: &[Arc<FlagSet>]) -> Result<Vec<String>, CacheError> {
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip: per set, the set key's remaining time and how many
        // of its flag keys exist.
        let mut pipe = redis::pipe();
        for set in sets {
            pipe.cmd("PTTL").arg(set_key(&set.environment));
            let keys: Vec<String> = set
                .flags
                .keys()
                .map(|k| flag_key(&set.environment, k))
                .collect();
            if keys.is_empty() {
                pipe.cmd("ECHO").arg(0);
            } else {
                pipe.cmd("EXISTS").arg(keys);
            }
        }
        let answers: Vec<i64> = self
            .link
            .run(
                "check",
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        // NB: written again once half the TTL is gone, so a set stays in
        // Redis while an instance serves it, whether or not requests come.
        let renew_below = i64::try_from(self.ttl.as_millis() / 2).unwrap_or(i64::MAX);
        let mut gone = Vec::new();
        let mut held = Vec::new();
        for (set, answer) in sets.iter().zip(answers.chunks(2)) {
            let [pttl, flags_held] = answer else { continue };
            let lacking = usize::try_from(*flags_held).unwrap_or(0) < set.flags.len();
            if *pttl == -2 {
                gone.push(set.environment.clone());
            } else if *pttl < renew_below || lacking {
                held.push(set);
            }
        }
        if held.is_empty() {
            return Ok(gone);
        }
        // A set key that is there may hold another instance's newer version
        // (its file changed first): renew only our own, known by its digest
        // near the start of the entry, or an older instance would overwrite
        // (and, with a signing key, sign anew) a version it no longer has.
        let mut pipe = redis::pipe();
        for set in &held {
            pipe.cmd("GETRANGE")
                .arg(set_key(&set.environment))
                .arg(0)
                .arg(DIGEST_WITHIN);
        }
        let heads: Vec<Vec<u8>> = self
            .link
            .run(
                "check",
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        for (set, head) in held.iter().zip(heads) {
            let ours = format!("\"digest\":\"{}\"", set.digest);
            if head.is_empty() || head.windows(ours.len()).any(|w| w == ours.as_bytes()) {
                gone.push(set.environment.clone());
            }
        }
        Ok(gone)
    }

    async fn environments(&self) -> Result<Vec<String>, CacheError> {
        let mut cursor = 0u64;
        let mut found = Vec::new();
        loop {
            let pattern = format!("{PREFIX}:*");
            let (next, keys) = self.scan_page(cursor, &pattern).await?;
            found.extend(keys.into_iter().filter_map(|k| {
                let env = k.strip_prefix(PREFIX)?.strip_prefix(':')?;
                (!env.contains(':') && crate::store::valid_environment_name(env))
                    .then(|| env.to_owned())
            }));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn wait_connected(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.link.until_up())
            .await
            .is_ok()
    }

    fn events(&self) -> broadcast::Receiver<CacheEvent> {
        self.events.subscribe()
    }

    fn status(&self) -> LinkStatus {
        self.link.status()
    }

    fn describe(&self) -> String {
        format!(
            "redis {}, ttl {}s",
            self.link.status().url,
            self.ttl.as_secs()
        )
    }
}

/// Listens for other instances' invalidations while the link is up, and
/// subscribes again after any disconnection.
async fn listen(
    link: Arc<Link>,
    client: redis::Client,
    instance: String,
    signing_key: Option<Arc<SigningKey>>,
    events: broadcast::Sender<CacheEvent>,
) {
    let mut attempt = 0u32;
    let mut seen = std::collections::VecDeque::new();
    let mut refused_logged = false;
    loop {
        link.until_up().await;
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(link::backoff(attempt)).await;
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(CONNECT_TIMEOUT, subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => {
                warn!(attempt, error = %e, "cannot subscribe to invalidations; retrying");
                continue;
            }
            Err(_) => {
                warn!(
                    attempt,
                    "cannot subscribe to invalidations: no answer; retrying"
                );
                continue;
            }
        };
        info!(
            channel = CHANNEL,
            "listening for invalidations from other instances"
        );
        attempt = 0;
        let mut messages = pubsub.into_on_message();
        loop {
            // NB: when the link goes down the subscription is dropped too: it
            // may sit on a half-open socket that would never say so.
            let message = tokio::select! {
                message = messages.next() => message,
                () = link.until_down() => None,
            };
            let Some(message) = message else { break };
            let Ok(invalidation) =
                serde_json::from_slice::<Invalidation>(message.get_payload_bytes())
            else {
                warn!(
                    channel = CHANNEL,
                    "ignoring a message that is not an invalidation"
                );
                continue;
            };
            if invalidation.origin == instance {
                continue;
            }
            let now = unix_millis(SystemTime::now());
            if let Err(why) = invalidation.trusted(signing_key.as_deref(), now, &mut seen) {
                // NB: once at warn per subscription: a flood must not
                // flood the log too.
                if std::mem::replace(&mut refused_logged, true) {
                    debug!(channel = CHANNEL, reason = why, "ignoring an invalidation");
                } else {
                    warn!(channel = CHANNEL, reason = why, from = %invalidation.origin,
                          "ignoring an invalidation (further ones are logged at debug)");
                }
                continue;
            }
            debug!(environment = ?invalidation.environment, from = %invalidation.origin,
                   "invalidation from another instance");
            let _ = events.send(CacheEvent::Invalidated(invalidation.environment));
        }
        warn!(
            channel = CHANNEL,
            "invalidation subscription lost; subscribing again when redis answers"
        );
        // NB: invalidations sent while unsubscribed are lost: drop snapshots.
        let _ = events.send(CacheEvent::Reconnected);
        // A subscription that drops as soon as it is made must not spin.
        tokio::time::sleep(link::BACKOFF_START).await;
    }
}
