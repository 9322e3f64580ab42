//! Certificates replaced on disk under a running server and client: new
//! connections use the new files, no restart. Renewal re-issues a leaf from
//! the CA, and a certificate close to expiry is logged at WARN.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_runtime::grpc;
use membrane_runtime::pki::{self, Ca, LeafSpec, ensure_bundle};
use membrane_runtime::tls::{self, RenewalPolicy, TlsFiles, install_crypto_provider};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

const T: Duration = Duration::from_secs(5);
const IPAM: &str = "ipam.membrane.local";

async fn serve_health(tls: TlsFiles) -> (String, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        grpc::serve(
            listener,
            tonic::service::Routes::default(),
            &[],
            Some(&tls),
            std::future::pending(),
        )
        .await
    });
    (format!("https://{addr}"), addr)
}

/// Lets the server's once-per-second look at its files happen.
async fn past_reload_interval() {
    tokio::time::sleep(tls::RELOAD_INTERVAL + Duration::from_millis(200)).await;
}

/// Replaces `path` atomically, as a careful operator (or `pki`) would.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-test");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn der_of(pem_file: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_file)
        .expect("pem")
        .as_ref()
        .to_vec()
}

/// A rustls server verifier that records what it is shown, then verifies
/// normally.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("lock") = Some(end_entity.as_ref().to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Opens a new TLS connection as the client `client` and returns the
/// certificate the server presented (DER).
async fn served_certificate(addr: std::net::SocketAddr, client: &TlsFiles) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&client.ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add");
    }
    let seen = Arc::new(Mutex::new(None));
    let verifier = Recording {
        inner: rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("verifier"),
        seen: seen.clone(),
    };
    let chain: Vec<_> = CertificateDer::pem_file_iter(&client.cert)
        .expect("cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&client.key).expect("key");
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(IPAM).expect("name"), tcp)
        .await
        .expect("handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN h2"
    );
    seen.lock()
        .expect("lock")
        .clone()
        .expect("a certificate was presented")
}

async fn health(url: &str, client: &TlsFiles) -> anyhow::Result<()> {
    grpc::check_health(url, IPAM, Some(client), T).await
}

#[tokio::test]
async fn replaced_server_files_serve_new_connections_and_a_rotated_ca_refuses_old_clients() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = ensure_bundle(
        dir.path(),
        &[LeafSpec::service("ipam"), LeafSpec::client("cli")],
    )
    .expect("pki");
    let server = bundle.leaves["ipam"].clone();
    let cli = bundle.leaves["cli"].clone();
    let (url, addr) = serve_health(server.clone()).await;

    // Certificate A.
    health(&url, &cli)
        .await
        .expect("client trusted by the CA gets through");
    let cert_a = der_of(&server.cert);
    assert_eq!(served_certificate(addr, &cli).await, cert_a);
    // A connection made now must survive the replacement below.
    let mut open = tonic_health::pb::health_client::HealthClient::new(
        grpc::connect(&url, IPAM, Some(&cli))
            .await
            .expect("connect"),
    );
    let check = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    open.check(check.clone())
        .await
        .expect("open connection works");

    // Certificate B: same CA, another serial and another SAN set.
    let ca = Ca::load(dir.path()).expect("ca");
    let b = ca
        .issue(
            "ipam",
            &[IPAM.to_string(), "ipam-b.example".to_string()],
            pki::LEAF_VALIDITY,
        )
        .expect("issue b");
    replace(&server.key, &b.key_pem);
    replace(&server.cert, &b.cert_pem);
    past_reload_interval().await;
    let cert_b = der_of(&server.cert);
    assert_ne!(cert_a, cert_b);
    assert_eq!(
        served_certificate(addr, &cli).await,
        cert_b,
        "a new connection sees certificate B without a restart"
    );
    health(&url, &cli).await.expect("new connection with B");
    open.check(check.clone())
        .await
        .expect("the connection opened with A still works");

    // Keep the pre-rotation client material aside: an "old client".
    let old_dir = tempfile::tempdir().expect("tmp");
    let old = TlsFiles {
        ca: old_dir.path().join("ca.pem"),
        cert: old_dir.path().join("cli.pem"),
        key: old_dir.path().join("cli-key.pem"),
    };
    for (from, to) in [
        (&cli.ca, &old.ca),
        (&cli.cert, &old.cert),
        (&cli.key, &old.key),
    ] {
        std::fs::copy(from, to).expect("copy");
    }

    // Rotate the CA: new CA file, server and client certificates from it.
    Ca::create(pki::CA_VALIDITY)
        .expect("new ca")
        .save(dir.path())
        .expect("save ca");
    ensure_bundle(
        dir.path(),
        &[LeafSpec::service("ipam"), LeafSpec::client("cli")],
    )
    .expect("reissue from the new CA");
    past_reload_interval().await;

    // The same `cli` files (now from the new CA), in this same process:
    // the client reloads too.
    health(&url, &cli)
        .await
        .expect("new client accepted after the CA rotation");
    assert!(
        health(&url, &old).await.is_err(),
        "the old client neither trusts the new server nor is trusted"
    );
    // The old client certificate, even with the new CA trusted, is refused
    // by the server.
    let old_cert_new_trust = TlsFiles {
        ca: cli.ca.clone(),
        ..old.clone()
    };
    let err = health(&url, &old_cert_new_trust)
        .await
        .expect_err("old client certificate refused by the server");
    assert!(
        !format!("{err:#}").contains("not valid for name"),
        "{err:#}"
    );

    // No client certificate at all: refused.
    let no_cert = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(&cli.ca).expect("ca"),
                ))
                .domain_name(IPAM),
        )
        .expect("tls");
    let result = async {
        let ch = no_cert.connect().await?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(check.clone())
            .await
            .map_err(anyhow::Error::from)?;
        Ok::<_, anyhow::Error>(())
    };
    assert!(
        tokio::time::timeout(T, result)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "a client without a certificate is refused"
    );
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_previous_certificate() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = ensure_bundle(
        dir.path(),
        &[LeafSpec::service("ipam"), LeafSpec::client("cli")],
    )
    .expect("pki");
    let server = bundle.leaves["ipam"].clone();
    let cli = bundle.leaves["cli"].clone();
    let (url, addr) = serve_health(server.clone()).await;
    let cert_a = der_of(&server.cert);
    health(&url, &cli).await.expect("serving with A");

    // A key that does not belong to the certificate: refused, A stays.
    let stray = Ca::load(dir.path())
        .expect("ca")
        .issue("stray", &["stray.example".to_string()], pki::LEAF_VALIDITY)
        .expect("issue");
    replace(&server.key, &stray.key_pem);
    past_reload_interval().await;
    assert_eq!(served_certificate(addr, &cli).await, cert_a);
    health(&url, &cli).await.expect("still serving with A");
}

#[tokio::test]
async fn renewal_reissues_a_leaf_that_is_due_and_the_server_presents_it() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = ensure_bundle(
        dir.path(),
        &[LeafSpec::service("ipam"), LeafSpec::client("cli")],
    )
    .expect("pki");
    let server = bundle.leaves["ipam"].clone();
    let cli = bundle.leaves["cli"].clone();

    // A leaf with two hours left.
    let short = Ca::load(dir.path())
        .expect("ca")
        .issue("ipam", &[IPAM.to_string()], Duration::from_secs(2 * 3600))
        .expect("issue");
    replace(&server.key, &short.key_pem);
    replace(&server.cert, &short.cert_pem);
    let (url, addr) = serve_health(server.clone()).await;
    let short_der = der_of(&server.cert);
    assert_eq!(served_certificate(addr, &cli).await, short_der);

    // Not due with a one-hour margin; due with a day.
    let spec = LeafSpec::service("ipam");
    assert!(!pki::renew_if_due(dir.path(), &spec, Duration::from_secs(3600)).expect("check"));
    assert_eq!(der_of(&server.cert), short_der);
    let renewal = tls::spawn_renewal_with(
        dir.path(),
        vec![spec.clone()],
        RenewalPolicy {
            check_every: Duration::from_millis(100),
            margin: pki::REUSE_MARGIN,
        },
    );
    for _ in 0..100 {
        if der_of(&server.cert) != short_der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = der_of(&server.cert);
    assert_ne!(renewed, short_der, "the leaf was renewed on disk");
    past_reload_interval().await;
    assert_eq!(served_certificate(addr, &cli).await, renewed);
    health(&url, &cli)
        .await
        .expect("served with the renewed leaf");
    // Renewed for the full validity: nothing more to do.
    assert!(!pki::renew_if_due(dir.path(), &spec, pki::RENEW_MARGIN).expect("check"));
    renewal.abort();
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_certificate_within_seven_days_of_expiry_is_logged_at_warn() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::load_or_create(dir.path()).expect("ca");
    let files = pki::leaf_files(dir.path(), "node-1");
    let leaf = ca
        .issue(
            "node-1",
            &["node-1".to_string()],
            Duration::from_secs(3 * 24 * 3600),
        )
        .expect("issue");
    std::fs::write(&files.cert, &leaf.cert_pem).expect("write");
    std::fs::write(&files.key, &leaf.key_pem).expect("write");

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let loaded = tracing::subscriber::with_default(subscriber, || files.reloading());
    loaded.expect("an expiring certificate still loads");
    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
    assert!(
        logs.contains("WARN") && logs.contains("expires soon") && logs.contains("node-1.pem"),
        "{logs}"
    );
}
