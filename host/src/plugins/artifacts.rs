//! Compiled components cached on disk, so a restart deserializes instead of
//! compiling (compiling is most of start-up: Cranelift runs per component).
//!
//! An artifact is `<dir>/<component sha256>-<engine hash>.cwasm`. The engine
//! hash is wasmtime's precompile-compatibility hash (wasmtime version, target,
//! every compilation setting): an upgrade or a configuration change looks up
//! another name and recompiles, never loads a mismatched artifact. A file that
//! does not deserialize is discarded and rewritten.
//!
//! NB: deserializing runs machine code from the file, so the directory must be
//! writable by flaghost only (as its binary is). flaghost writes every file
//! there itself, atomically (a temporary file renamed into place).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};
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
}

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
    /// Artifacts of `engine` in `dir` (created if missing).
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = StableHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", hasher.finish()),
        })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", self.engine_hash))
    }

    /// The cached artifact of the component whose hex SHA-256 is `digest`,
    /// if there is a usable one. One that does not deserialize is discarded.
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path(digest);
        if !path.is_file() {
            return None;
        }
        match deserialize(engine, &path) {
            Ok(component) => Some(component),
            Err(e) => {
                warn!(artifact = %path.display(), error = %e,
                      "discarding an unusable compiled artifact; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Caches `artifact` (`Engine::precompile_component`'s output) for the
    /// component whose hex SHA-256 is `digest`. A failure is logged: the
    /// next start compiles again.
    pub fn store(&self, digest: &str, artifact: &[u8]) {
        let path = self.path(digest);
        if let Err(e) = self.write(&path, artifact) {
            warn!(artifact = %path.display(), error = %e,
                  "cannot cache the compiled component; the next start compiles it again");
        }
    }

    fn write(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        // NB: a temporary file of a unique name (two processes sharing the
        // directory never write the same one), synced, then renamed into
        // place: a reader sees a whole artifact or none.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        debug!(artifact = %path.display(), "compiled component cached");
        Ok(())
    }
}

/// Loads an artifact this module wrote.
///
/// NB: read into memory, not mapped (`deserialize_file` maps it): a mapped
/// file truncated or rewritten in place under a running flaghost would kill
/// the process with SIGBUS on the next call into the plugin.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    let bytes = std::fs::read(path)?;
    // SAFETY: `Component::deserialize` trusts the bytes to be wasmtime's
    // own serialization. Files in the artifact directory are written only by
    // `Artifacts::write` above, from artifacts wasmtime made (see `compiler`), renamed
    // into place whole; the directory is flaghost's own (documented: writable
    // by flaghost only). wasmtime still checks the header and the engine
    // compatibility, and the name carries the engine hash, so an artifact
    // of another wasmtime or configuration is never opened.
    unsafe { Component::deserialize(engine, &bytes) }
}
