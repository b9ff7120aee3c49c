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

    /// `bytes` (whose hex SHA-256 is `digest`) as a component: from its
    /// artifact if there is a usable one, else compiled (and its artifact
    /// written for the next start).
    pub fn component(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Origin)> {
        let path = self.path(digest);
        if path.is_file() {
            match deserialize(engine, &path) {
                Ok(component) => return Ok((component, Origin::Precompiled)),
                Err(e) => {
                    warn!(artifact = %path.display(), error = %e,
                          "discarding an unusable compiled artifact; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::from_binary(engine, bytes)?;
        if let Err(e) = self.write(&path, &component) {
            warn!(artifact = %path.display(), error = %e,
                  "cannot cache the compiled component; the next start compiles it again");
        }
        Ok((component, Origin::Compiled))
    }

    fn write(&self, path: &Path, component: &Component) -> wasmtime::Result<()> {
        use std::io::Write as _;
        let bytes = component.serialize()?;
        // NB: a temporary file of a unique name (two processes sharing the
        // directory never write the same one), synced, then renamed into
        // place: a reader sees a whole artifact or none.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)?;
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
    // `Artifacts::write` above, from components wasmtime compiled, renamed
    // into place whole; the directory is flaghost's own (documented: writable
    // by flaghost only). wasmtime still checks the header and the engine
    // compatibility, and the name carries the engine hash, so an artifact
    // of another wasmtime or configuration is never opened.
    unsafe { Component::deserialize(engine, &bytes) }
}
