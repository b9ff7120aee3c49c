//! Redis over TLS (`rediss://`) as an ACL user, against a real
//! `redis-server` with TLS on (Debian's build has it) and certificates made
//! at test time: a CA of the test's own, a server certificate for
//! 127.0.0.1, a client certificate (the server asks for one). A Redis that
//! cannot be trusted, or that refuses flaghost's user, is never an error to a
//! caller: flaghost serves from memory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flaghost::cache::{RedisOptions, RedisTls};
use flaghost_tests::{Dirs, Flaghost, answer_limits, eventually};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

const USER: &str = "flaghost";
const PASSWORD: &str = "acl-password-9d2f61";
const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// The README's ACL rules for flaghost's user (after `on >PASSWORD`).
const ACL: &str = "resetkeys ~feature_flags:* resetchannels &feature_flags:* -@all \
                   +getrange +set +unlink +scan +pttl +exists +publish +subscribe \
                   +unsubscribe +ping +echo +multi +exec +discard";

#[test]
fn the_readme_grants_the_acl_this_test_runs_with() {
    let readme = std::fs::read_to_string(flaghost_tests::root().join("README.md")).expect("README");
    let wanted = ACL.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        readme.contains(&format!("ACL SETUSER flaghost on >PASSWORD {wanted}")),
        "README.md's ACL line differs from the one tests/redis_tls.rs checks: {wanted}"
    );
}

/// PEM files of a CA, a server certificate it signed for 127.0.0.1, and a
/// client certificate it signed.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "flaghost test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, purpose, stem: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, stem);
            params.extended_key_usages = vec![purpose];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer).expect("signed");
            write(dir.path(), &format!("{stem}.crt"), &cert.pem());
            write(dir.path(), &format!("{stem}.key"), &key.serialize_pem());
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, "client");
        write(dir.path(), "ca.crt", &ca_cert.pem());
        // Another CA, which signed nothing here.
        let other_key = KeyPair::generate().expect("key");
        let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_cert = other.self_signed(&other_key).expect("CA");
        write(dir.path(), "other-ca.crt", &other_cert.pem());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self, ca: &str, client: bool) -> RedisTls {
        RedisTls {
            ca_file: Some(self.path(ca)),
            client_cert: client.then(|| (self.path("client.crt"), self.path("client.key"))),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write PEM");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// `redis-server` with TLS on `tls_port` (client certificates required),
/// a plain port for the test's own look, and one ACL user allowed only
/// flaghost's keys and channel; the default user off.
struct TlsRedis {
    child: Child,
    tls_port: u16,
    plain_port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(pki: &Pki) -> Self {
        let (tls_port, plain_port) = (free_port(), free_port());
        let dir = tempfile::tempdir().expect("tmp");
        let child = Command::new("redis-server")
            .args(["--port", &plain_port.to_string()])
            .args(["--tls-port", &tls_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--tls-cert-file")
            .arg(pki.path("server.crt"))
            .arg("--tls-key-file")
            .arg(pki.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.crt"))
            .args(["--tls-auth-clients", "yes"])
            // NB: what the README tells an operator to grant flaghost: its
            // keys, its channel, and the commands it sends.
            .args(["--user", USER, "on", &format!(">{PASSWORD}")])
            .args(ACL.split_whitespace())
            .args(["--user", "default", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server (.ci/run installs it)");
        let server = Self {
            child,
            tls_port,
            plain_port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.look::<String>(&["PING"]).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self, password: &str) -> String {
        format!("rediss://{USER}:{password}@127.0.0.1:{}", self.tls_port)
    }

    /// A command on the plain port, as the ACL user.
    fn look<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!(
            "redis://{USER}:{PASSWORD}@127.0.0.1:{}",
            self.plain_port
        ))?;
        let mut conn = client.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut conn)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn flags() -> serde_json::Value {
    json!({ "flags": { "banner": {
        "state": "ENABLED",
        "variants": { "on": true, "off": false },
        "defaultVariant": "on"
    } } })
}

fn options(url: String, tls: RedisTls) -> RedisOptions {
    RedisOptions {
        url,
        ttl: Duration::from_secs(60),
        response_timeout: Duration::from_millis(500),
        signing_key: None,
        max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        documents: Default::default(),
        tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaghost_caches_in_redis_over_tls_as_an_acl_user() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki);
    let dirs = Dirs::new().flag_file("production", &flags());
    let mut config = dirs.config("production", answer_limits());
    config.check_interval = Duration::from_millis(200);
    config.redis = Some(options(redis.url(PASSWORD), pki.tls("ca.crt", true)));
    config.admin_token = Some(ADMIN_TOKEN.into());
    let fh = Flaghost::start(&config).await.expect("starts");
    let on_redis = eventually(Duration::from_secs(10), || async {
        fh.cache_backend().await == "redis"
    })
    .await;
    assert!(on_redis, "flaghost reaches Redis over TLS as {USER}");
    let (status, body) = fh.evaluate("banner", json!({})).await;
    assert_eq!((status, &body["value"]), (200, &json!(true)), "{body}");
    let written = eventually(Duration::from_secs(5), || async {
        redis.look::<u32>(&["EXISTS", "feature_flags:production"]) == Ok(1)
    })
    .await;
    assert!(written, "the flag set is cached in Redis, through TLS");
    // Invalidation deletes the keys and publishes on flaghost's channel,
    // both within what the ACL user may do.
    let (status, answer) = {
        let response = fh
            .client
            .post(format!("{}/admin/v1/cache/invalidate", fh.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("reaches flaghost");
        (
            response.status().as_u16(),
            response.json::<serde_json::Value>().await.expect("JSON"),
        )
    };
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["keysDeleted"].as_u64().is_some_and(|n| n >= 1),
        "{answer}"
    );
    assert!(answer.get("sharedCacheError").is_none(), "{answer}");
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_refusing_redis_is_served_around_never_an_error() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki);
    let dirs = Dirs::new().flag_file("production", &flags());
    for (case, url, tls) in [
        (
            "a CA that did not sign Redis's certificate",
            redis.url(PASSWORD),
            pki.tls("other-ca.crt", true),
        ),
        (
            "no client certificate where Redis asks for one",
            redis.url(PASSWORD),
            pki.tls("ca.crt", false),
        ),
        (
            "a wrong ACL password",
            redis.url("wrong-password-123"),
            pki.tls("ca.crt", true),
        ),
    ] {
        let mut config = dirs.config("production", answer_limits());
        config.check_interval = Duration::from_millis(200);
        config.redis = Some(options(url, tls));
        let fh = Flaghost::start(&config)
            .await
            .expect("starts without Redis");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(fh.cache_backend().await, "memory-fallback", "{case}");
        let (status, body) = fh.evaluate("banner", json!({})).await;
        assert_eq!(
            (status, &body["value"]),
            (200, &json!(true)),
            "{case}: {body}"
        );
        fh.stop().await.expect("clean stop");
    }
    assert_eq!(
        redis.look::<u32>(&["EXISTS", "feature_flags:production"]),
        Ok(0),
        "nothing was written by a flaghost Redis should not trust or admit"
    );
}

#[tokio::test]
async fn certificate_files_that_cannot_work_stop_start_up_naming_the_option() {
    let pki = Pki::new();
    let dirs = Dirs::new().flag_file("production", &flags());
    std::fs::write(pki.path("empty.crt"), "").expect("write");
    for (tls, says) in [
        (
            RedisTls {
                ca_file: Some(pki.path("empty.crt")),
                client_cert: None,
            },
            "--redis-ca-file (FLAGHOST_REDIS_CA_FILE)",
        ),
        (
            RedisTls {
                ca_file: Some(pki.path("missing.crt")),
                client_cert: None,
            },
            "cannot read",
        ),
        (
            RedisTls {
                ca_file: None,
                // A certificate where the key should be.
                client_cert: Some((pki.path("client.crt"), pki.path("client.crt"))),
            },
            "no unencrypted PEM private key",
        ),
        (
            RedisTls {
                ca_file: None,
                // The server's key beside the client's certificate.
                client_cert: Some((pki.path("client.crt"), pki.path("server.key"))),
            },
            "cannot be used together",
        ),
    ] {
        let mut config = dirs.config("production", answer_limits());
        config.redis = Some(options("rediss://127.0.0.1:1".into(), tls));
        let error = format!(
            "{:#}",
            Flaghost::start(&config).await.err().expect("refused")
        );
        assert!(error.contains(says), "{error}");
    }
}
