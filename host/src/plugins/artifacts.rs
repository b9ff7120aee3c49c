//! Compiled components cached on disk, so a restart deserializes instead of
//! compiling (compiling is most of start-up: Cranelift runs per component).
//!
//! An artifact is `<dir>/<component sha256>-<engine hash>.cwasm`. The engine
//! hash is wasmtime's precompile-compatibility hash (wasmtime version, target,
//! every compilation setting): an upgrade or a configuration change looks up
//! another name and recompiles, never loads a mismatched artifact.
//!
//! NB: deserializing runs machine code from the file, so nothing is
//! deserialized that flaghost did not write:
//! - the directory must be flaghost's own and writable by no one else
//!   (checked at start-up; created 0700);
//! - every file is authenticated before it is read as an artifact: it starts
//!   with an HMAC-SHA-256 ([`crate::signing`]) of its name's parts (digest,
//!   engine hash) and its bytes, under a key kept in a file outside the
//!   directory. A file that fails (tampered with, written by anyone else,
//!   moved to another component's name) or does not deserialize is
//!   discarded, logged, and the component compiled again.
//!
//! flaghost writes every file there itself, atomically (a temporary file
//! renamed into place).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::signing::{self, SigningKey, TAG_BYTES};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled from the component's bytes.
    Compiled,
    /// Deserialized from a cached artifact.
    Precompiled,
}

/// A directory of compiled components for one engine configuration.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
    engine_hash: String,
    /// Authenticates the files.
    key: SigningKey,
}

/// What an artifact's tag covers besides its bytes: the file's kind and
/// the parts of its name.
const TAG_DOMAIN: &[u8] = b"flaghost compiled component v1";

/// Feeds [`Hash`] into SHA-256: a hash that is the same in every build,
/// unlike std's `DefaultHasher`, so artifact names survive a rebuild.
struct StableHasher(Sha256);

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl Artifacts {
    /// Artifacts of `engine` in `dir` (created 0700 if missing), signed
    /// with `key`. Refused if the directory is not flaghost's own or others
    /// may write it.
    pub fn new(dir: &Path, engine: &Engine, key: SigningKey) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let metadata = std::fs::metadata(dir)?;
        signing::private(&metadata, 0o022).map_err(|why| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is {why}: its files are loaded as machine code, so it must be \
                     flaghost's own and writable by no one else (chmod 700)",
                    dir.display()
                ),
            )
        })?;
        let mut hasher = StableHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", hasher.finish()),
            key,
        })
    }

    /// The tag of the artifact of `digest` holding `artifact`.
    fn tag(&self, digest: &str, artifact: &[u8]) -> [u8; TAG_BYTES] {
        self.key.tag(&[
            TAG_DOMAIN,
            digest.as_bytes(),
            self.engine_hash.as_bytes(),
            artifact,
        ])
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", self.engine_hash))
    }

    /// The cached artifact of the component whose hex SHA-256 is `digest`,
    /// if there is a usable one. One that fails authentication or does not
    /// deserialize is discarded (logged).
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path(digest);
        if !path.is_file() {
            return None;
        }
        let discard = |why: &str| {
            warn!(artifact = %path.display(), reason = why,
                  "discarding a compiled artifact; compiling the component again");
            let _ = std::fs::remove_file(&path);
            None
        };
        let file = match std::fs::read(&path) {
            Ok(file) => file,
            Err(e) => return discard(&format!("cannot read it: {e}")),
        };
        let Some((tag, artifact)) = file.split_at_checked(TAG_BYTES) else {
            return discard("too short to hold its tag");
        };
        let parts: [&[u8]; 4] = [
            TAG_DOMAIN,
            digest.as_bytes(),
            self.engine_hash.as_bytes(),
            artifact,
        ];
        if !self.key.verify(&parts, tag) {
            return discard(
                "it fails authentication: flaghost did not write it, or not for this component, or under another key",
            );
        }
        match deserialize(engine, artifact) {
            Ok(component) => Some(component),
            Err(e) => discard(&format!("it does not deserialize: {e:#}")),
        }
    }

    /// Caches `artifact` (`Engine::precompile_component`'s output) for the
    /// component whose hex SHA-256 is `digest`. A failure is logged: the
    /// next start compiles again.
    pub fn store(&self, digest: &str, artifact: &[u8]) {
        let path = self.path(digest);
        if let Err(e) = self.write(&path, digest, artifact) {
            warn!(artifact = %path.display(), error = %e,
                  "cannot cache the compiled component; the next start compiles it again");
        }
    }

    fn write(&self, path: &Path, digest: &str, artifact: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        // NB: a temporary file of a unique name (two processes sharing the
        // directory never write the same one), synced, then renamed into
        // place: a reader sees a whole artifact or none.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&self.tag(digest, artifact))?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        debug!(artifact = %path.display(), "compiled component cached");
        Ok(())
    }
}

/// Deserializes an authenticated artifact.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` trusts the bytes to be wasmtime's
    // own serialization. These passed authentication (`Artifacts::load`):
    // their tag, under flaghost's own key (in a 0600 file outside the
    // directory), was written by `Artifacts::write` beside them, for this
    // component's digest and this engine's compatibility hash, from an
    // artifact wasmtime made (see `compiler`). They were read into memory,
    // not mapped: a file rewritten in place under a running flaghost cannot
    // change them after the check (nor kill it with SIGBUS). wasmtime still
    // checks the header and the engine's settings.
    unsafe { Component::deserialize(engine, artifact) }
}
