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
        check_with_rustls(root_cert.as_deref(), client_tls.as_ref())?;
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// Builds the TLS configuration the connection will use, once, so what
/// rustls refuses (a CA it will not take as a trust anchor, a key that does
/// not match its certificate or that it cannot use) stops start-up naming
/// the option, instead of failing every connect later.
fn check_with_rustls(ca: Option<&[u8]>, client: Option<&ClientTlsConfig>) -> Result<(), String> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("{CA_FILE_OPTION}: {e}"))?;
            roots.add(cert).map_err(|e| {
                format!("{CA_FILE_OPTION}: a certificate cannot be a trust anchor: {e}")
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots);
    if let Some(client) = client {
        let certs = CertificateDer::pem_slice_iter(&client.client_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{CLIENT_CERT_OPTION}: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&client.client_key)
            .map_err(|e| format!("{CLIENT_CERT_OPTION}: {e}"))?;
        builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!("{CLIENT_CERT_OPTION}: the certificate and key cannot be used together: {e}")
        })?;
    }
    Ok(())
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
