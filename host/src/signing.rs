//! HMAC-SHA-256 under a key of flaghost's own, kept in a file only its user
//! can read: authenticates bytes flaghost wrote and reads back later from a
//! place others might write (compiled plugin artifacts on disk).
//!
//! The key file holds 32 random bytes. It is created at the first start
//! (mode 0600, written to a temporary file and linked into place, so two
//! instances starting together agree on one key) and reused after, so what
//! was signed before a restart still verifies. A key file that other users
//! can read or write, or that another user owns, is refused: whoever can
//! read it can forge.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a key, and of a tag.
pub const KEY_BYTES: usize = 32;
/// Bytes of a tag (HMAC-SHA-256).
pub const TAG_BYTES: usize = 32;

/// A signing key, loaded from its file. Its bytes are never printed.
#[derive(Clone)]
pub struct SigningKey {
    key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// It could not be read or created.
    #[error("cannot read or create the key file {path}: {reason}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// Others than its owner may read or write it, or another user owns it.
    #[error("the key file {path} is {why}: make it flaghost's own, mode 0600")]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// What is wrong (its mode, its owner).
        why: String,
    },
    /// It does not hold a key.
    #[error("the key file {path} holds {len} bytes, not a key of {KEY_BYTES}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

impl SigningKey {
    /// The key in `path`, created there (random, mode 0600) if the file
    /// does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |e: std::io::Error| KeyError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        if std::fs::symlink_metadata(path).is_err() {
            create(path).map_err(io)?;
        }
        // NB: opened once, without following a symbolic link, and checked
        // and read through that one handle: the file read is the file
        // checked, whatever is renamed into its place meanwhile. Only
        // flaghost's user can make a file flaghost's user owns.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        let exposed = |why: String| KeyError::Exposed {
            path: path.to_owned(),
            why,
        };
        if !metadata.is_file() {
            return Err(exposed("not a regular file".into()));
        }
        private(&metadata, 0o077).map_err(exposed)?;
        let mut bytes = Vec::new();
        file.take(KEY_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let key =
            <[u8; KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Malformed {
                path: path.to_owned(),
                len: bytes.len(),
            })?;
        Ok(Self { key })
    }

    /// A key shared by several instances, from a secret they are all given
    /// (`--cache-signing-key`): its SHA-256, as HMAC would hash a long key.
    pub fn from_secret(secret: &str) -> Self {
        use sha2::Digest;
        Self {
            key: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// A key of these bytes (tests and benches).
    pub fn from_bytes(key: [u8; KEY_BYTES]) -> Self {
        Self { key }
    }

    /// The tag of `parts`, each length-prefixed so no two different lists
    /// of parts sign the same bytes.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_BYTES] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    /// [`SigningKey::tag`] as lower-case hex, for text formats (Redis entries).
    pub fn tag_hex(&self, parts: &[&[u8]]) -> String {
        format!("{:x}", self.mac(parts).finalize().into_bytes())
    }

    /// Whether `tag` is the hex of the tag of `parts` (compared in constant
    /// time); false for text that is not hex.
    pub fn verify_hex(&self, parts: &[&[u8]], tag: &str) -> bool {
        let bytes: Option<Vec<u8>> = (tag.len().is_multiple_of(2))
            .then(|| {
                (0..tag.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(tag.get(i..i + 2)?, 16).ok())
                    .collect()
            })
            .flatten();
        bytes.is_some_and(|bytes| self.verify(parts, &bytes))
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // NB: an HMAC takes a key of any length; 32 bytes cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

/// Writes a new random key to `path`: a temporary file of mode 0600 in the
/// same directory, synced, linked into place only if nothing is there yet
/// (another instance that got there first wins; its key is read back).
fn create(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let key: [u8; KEY_BYTES] = rand::random();
    let mut tmp = tempfile::Builder::new()
        .prefix(".flaghost-key-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(&key)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.error),
    }
}

/// `Err(why)` unless `metadata` is of a file or directory owned by this
/// process's user, with none of the `forbidden` mode bits (`0o077`: no
/// access but its owner's; `0o022`: no one else may write).
pub fn private(metadata: &std::fs::Metadata, forbidden: u32) -> Result<(), String> {
    let uid = rustix::process::geteuid().as_raw();
    if metadata.uid() != uid {
        return Err(format!(
            "owned by user {}, not flaghost's user {uid}",
            metadata.uid()
        ));
    }
    let mode = metadata.mode() & 0o777;
    if mode & forbidden != 0 {
        let what = if forbidden & 0o044 != 0 {
            "readable or writable"
        } else {
            "writable"
        };
        return Err(format!("mode {mode:04o}: {what} by others than its owner"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_verifies_only_its_own_parts_under_its_own_key() {
        let key = SigningKey::from_bytes([7; KEY_BYTES]);
        let tag = key.tag(&[b"name", b"bytes"]);
        assert!(key.verify(&[b"name", b"bytes"], &tag));
        assert!(!key.verify(&[b"name", b"bytez"], &tag));
        // Length prefixes: moving a byte between parts changes the tag.
        assert!(!key.verify(&[b"nameb", b"ytes"], &tag));
        assert!(!SigningKey::from_bytes([8; KEY_BYTES]).verify(&[b"name", b"bytes"], &tag));
        assert!(!key.verify(&[b"name", b"bytes"], &tag[..16]));
    }

    #[test]
    fn a_hex_tag_verifies_and_text_that_is_not_its_hex_does_not() {
        let key = SigningKey::from_secret("a shared secret of the fleet");
        let tag = key.tag_hex(&[b"entry"]);
        assert_eq!(tag.len(), 2 * TAG_BYTES);
        assert!(key.verify_hex(&[b"entry"], &tag));
        assert!(!key.verify_hex(&[b"other"], &tag));
        for bad in ["", "0", &tag[1..], &tag.replace(&tag[..2], "zz"), "é"] {
            assert!(!key.verify_hex(&[b"entry"], bad), "{bad:?}");
        }
        assert!(!SigningKey::from_secret("another secret").verify_hex(&[b"entry"], &tag));
    }

    #[test]
    fn the_key_file_is_created_private_reused_and_refused_when_exposed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("artifacts.key");
        let first = SigningKey::load_or_create(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("file").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SigningKey::load_or_create(&path).expect("reused");
        assert_eq!(first.key, again.key, "the same key after a restart");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = SigningKey::load_or_create(&path).expect_err("readable by others");
        assert!(err.to_string().contains("mode 0644"), "{err}");

        std::fs::write(&path, b"short").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = SigningKey::load_or_create(&path).expect_err("malformed");
        assert!(err.to_string().contains("5 bytes"), "{err}");

        // A symbolic link to a private key file of flaghost's is not read.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("other.key"), &link).expect("symlink");
        SigningKey::load_or_create(&dir.path().join("other.key")).expect("created");
        assert!(
            SigningKey::load_or_create(&link).is_err(),
            "followed a link"
        );
    }
}
