//! TLS to Redis (`rediss://`): rustls with the ring provider, Mozilla's
//! roots unless a CA file is given, and an optional client certificate.

use std::path::{Path, PathBuf};

use redis::{ClientTlsConfig, TlsCertificates};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Certificates for a `rediss://` connection, as files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM file of the CA certificates that sign Redis's certificate; only
    /// these are then trusted. `None`: Mozilla's roots (public CAs).
    pub ca_file: Option<PathBuf>,
    /// PEM files of a client certificate and its key, for a Redis that
    /// asks for one (`tls-auth-clients yes`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Option names, for errors.
pub const CA_FILE_OPTION: &str = "--redis-ca-file (FLAGHOST_REDIS_CA_FILE)";
/// Option names, for errors.
pub const CLIENT_CERT_OPTION: &str = "--redis-client-cert / --redis-client-key (FLAGHOST_REDIS_CLIENT_CERT / FLAGHOST_REDIS_CLIENT_KEY)";

impl RedisTls {
    /// Whether any file is configured.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some()
    }

    /// The certificates read and checked: each file must hold what its
    /// option says, so a wrong file is a start-up error naming it, not a
    /// handshake that fails on every connect.
    pub fn certificates(&self) -> Result<TlsCertificates, String> {
        let root_cert = match &self.ca_file {
            None => None,
            Some(file) => {
                let pem = read(CA_FILE_OPTION, file)?;
                let count = CertificateDer::pem_slice_iter(&pem)
                    .map(|c| c.map(drop))
                    .collect::<Result<Vec<()>, _>>()
                    .map_err(|e| format!("{CA_FILE_OPTION}: {}: {e}", file.display()))?
                    .len();
                if count == 0 {
                    return Err(format!(
                        "{CA_FILE_OPTION}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        file.display()
                    ));
                }
                Some(pem)
            }
        };
        let client_tls = match &self.client_cert {
            None => None,
            Some((cert_file, key_file)) => {
                let client_cert = read(CLIENT_CERT_OPTION, cert_file)?;
                if CertificateDer::pem_slice_iter(&client_cert)
                    .next()
                    .is_none()
                {
                    return Err(format!(
                        "{CLIENT_CERT_OPTION}: {} holds no PEM certificate",
                        cert_file.display()
                    ));
                }
                let client_key = read(CLIENT_CERT_OPTION, key_file)?;
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                    format!(
                        "{CLIENT_CERT_OPTION}: {} holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                        key_file.display()
                    )
                })?;
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

fn read(option: &str, file: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(file).map_err(|e| format!("{option}: cannot read {} ({e})", file.display()))
}

/// Installs rustls's ring provider as the process's default, once. The
/// `redis` crate builds rustls without one, and rustls panics on the
/// first handshake when it cannot pick one.
pub fn install_crypto_provider() {
    // NB: Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
