//! TLS material that follows its files: replaced certificate, key or CA
//! files are picked up by the next handshake, without a restart.
//!
//! How: the rustls configs built here never hold a certificate or a CA
//! themselves. The server's certificate resolver, the client's certificate
//! resolver and both peer verifiers ask a shared [`ReloadingTls`] for the
//! current material at every handshake. That call checks the files' metadata
//! (mtime, size, inode) at most once per [`RELOAD_INTERVAL`] and, when they
//! changed, loads and checks the new material. A background task does the
//! same every [`WATCH_INTERVAL`] so that an idle process also notices (and
//! warns about) expiry.
//!
//! Invariants:
//! - A handshake always uses one complete, consistent set: new files that do
//!   not load (a key that does not match its certificate, bad PEM, a missing
//!   file) leave the previous material in place. Writers that replace the
//!   key and the certificate one after the other (each atomically, as
//!   [`crate::pki`] does) briefly show a mismatched pair: that is only
//!   reported if it persists for [`SETTLE_TIME`].
//! - Connections keep the material they were established with; only new
//!   connections see new files.
//! - A certificate (ours or a CA) within [`EXPIRY_WARNING`] of expiry, or
//!   expired, is logged at WARN when loaded and then at least hourly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use super::{TlsError, TlsFiles};

/// The files are looked at (metadata only) at most this often per process.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// How often the background task looks at the files when no handshake does.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(30);

/// A certificate this close to expiry (or past it) is logged at WARN.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// New files that fail to load are retried quietly for this long (a writer
/// may be between the key and the certificate) before a WARN.
pub const SETTLE_TIME: Duration = Duration::from_secs(3);

/// How often an expiry warning is repeated.
const WARN_EVERY: Duration = Duration::from_secs(60 * 60);

/// ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";

/// mTLS material loaded from [`TlsFiles`] and reloaded when they change.
/// Cheap to clone; clones (and every [`ReloadingTls::load`] of the same
/// files in this process) share one copy and one watcher.
#[derive(Clone)]
pub struct ReloadingTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

struct State {
    current: Arc<Material>,
    /// What the files looked like when `current` was loaded (or last refused for good).
    stamps: Stamps,
    checked: Instant,
    /// New files that failed to load, and since when.
    failing: Option<(Stamps, Instant)>,
    last_warned: Option<Instant>,
}

/// One consistent set: our certificate and key, and verifiers for the CA.
struct Material {
    key: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<dyn ServerCertVerifier>,
    /// Seconds since the epoch.
    cert_not_after: u64,
    /// Earliest expiry among the CA certificates.
    ca_not_after: u64,
}

/// Metadata of the three files; any difference means "look again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamps([Option<(SystemTime, u64, u64)>; 3]);

// === impl ReloadingTls ===

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads `files` (failing when they do not form a usable set), or returns
    /// the process's existing copy after checking the files for changes.
    /// Inside a Tokio runtime, a watcher task runs as long as any copy lives.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        static CACHE: OnceLock<Mutex<HashMap<TlsFiles, Weak<Inner>>>> = OnceLock::new();
        let mut cache = CACHE
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, weak| weak.strong_count() > 0);
        if let Some(inner) = cache.get(files).and_then(Weak::upgrade) {
            let tls = Self { inner };
            tls.refresh();
            return Ok(tls);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = Stamps::of(files);
        let material = Material::load(files, &provider)?;
        let warned = warn_if_expiring(files, &material);
        let inner = Arc::new(Inner {
            files: files.clone(),
            provider,
            state: Mutex::new(State {
                current: Arc::new(material),
                stamps,
                checked: Instant::now(),
                failing: None,
                last_warned: warned.then(Instant::now),
            }),
        });
        cache.insert(files.clone(), Arc::downgrade(&inner));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(watch(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// The files this material comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// A server config that presents the current certificate and requires a
    /// client certificate from the current CA, with ALPN `h2`.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.config_error(e))?
            .with_client_cert_verifier(Arc::new(ClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(CertResolver(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A client config that trusts only the current CA and presents the
    /// current certificate, with ALPN `h2`. The server name is checked by the
    /// caller's connector (`ServerName` given to the handshake).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(self.inner.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.config_error(e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(ClientResolver(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    fn config_error(&self, e: rustls::Error) -> TlsError {
        TlsError::Invalid {
            path: self.inner.files.cert.clone(),
            reason: format!("tls config: {e}"),
        }
    }

    /// Looks at the files now, whatever [`RELOAD_INTERVAL`] says.
    pub fn refresh(&self) {
        let mut st = self.inner.lock();
        self.inner.check(&mut st);
    }

    /// The certificate chain currently presented, end entity first.
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current().key.cert.clone()
    }

    fn current(&self) -> Arc<Material> {
        let mut st = self.inner.lock();
        if st.checked.elapsed() >= RELOAD_INTERVAL {
            self.inner.check(&mut st);
        }
        st.current.clone()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads when the files changed; warns about expiry. Holds the lock
    /// while reading three small files, which is what every handshake would
    /// otherwise race to do.
    fn check(&self, st: &mut State) {
        st.checked = Instant::now();
        let stamps = Stamps::of(&self.files);
        if stamps != st.stamps {
            match Material::load(&self.files, &self.provider) {
                Ok(material) => {
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        ca = %self.files.ca.display(),
                        expires_in = %human(material.cert_not_after.saturating_sub(unix_now())),
                        "tls files changed; new connections use the new certificate and CA"
                    );
                    st.current = Arc::new(material);
                    st.stamps = stamps;
                    st.failing = None;
                    st.last_warned = None;
                }
                Err(e) => {
                    let since = match &st.failing {
                        Some((s, since)) if *s == stamps => *since,
                        _ => Instant::now(),
                    };
                    if since.elapsed() >= SETTLE_TIME {
                        tracing::warn!(
                            error = %e,
                            "tls files changed but do not load; keeping the previous certificate and CA"
                        );
                        // Do not retry (or warn) again until the files change.
                        st.stamps = stamps;
                        st.failing = None;
                    } else {
                        tracing::debug!(error = %e, "tls files changed but do not load yet; retrying");
                        st.failing = Some((stamps, since));
                    }
                }
            }
        }
        if st.last_warned.is_none_or(|at| at.elapsed() >= WARN_EVERY)
            && warn_if_expiring(&self.files, &st.current)
        {
            st.last_warned = Some(Instant::now());
        }
    }
}

/// Checks the material periodically while any copy of it lives.
async fn watch(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut st = inner.lock();
        inner.check(&mut st);
    }
}

/// Logs a WARN when our certificate or a CA expires within
/// [`EXPIRY_WARNING`]; returns whether it did.
fn warn_if_expiring(files: &TlsFiles, m: &Material) -> bool {
    let now = unix_now();
    let soon = now + EXPIRY_WARNING.as_secs();
    let mut warned = false;
    for (what, path, not_after) in [
        ("certificate", &files.cert, m.cert_not_after),
        ("CA certificate", &files.ca, m.ca_not_after),
    ] {
        if not_after <= now {
            tracing::warn!(
                file = %path.display(),
                expired_ago = %human(now - not_after),
                "tls {what} has expired: peers will refuse it until it is renewed"
            );
            warned = true;
        } else if not_after <= soon {
            tracing::warn!(
                file = %path.display(),
                expires_in = %human(not_after - now),
                "tls {what} expires soon: renew it (pki::renew_if_due)"
            );
            warned = true;
        }
    }
    warned
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 2 * 3600 => format!("{}h", s / 3600),
        s if s >= 120 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === impl Stamps ===

impl Stamps {
    fn of(files: &TlsFiles) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), m.ino()))
        };
        Stamps([stamp(&files.ca), stamp(&files.cert), stamp(&files.key)])
    }
}

// === impl Material ===

impl Material {
    fn load(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let invalid = |path: &Path, reason: String| TlsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let cert_pem = super::read(&files.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&files.cert, format!("parse certificates: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(&files.cert, "no certificate in file".into()));
        };
        let cert_not_after = crate::pki::der::not_after(leaf)
            .map_err(|e| invalid(&files.cert, format!("parse certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&super::read(&files.key)?)
            .map_err(|e| invalid(&files.key, format!("parse private key: {e}")))?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            invalid(
                &files.key,
                format!("does not fit `{}`: {e}", files.cert.display()),
            )
        })?;

        let ca_pem = super::read(&files.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        let mut ca_not_after = u64::MAX;
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| invalid(&files.ca, format!("parse certificates: {e}")))?;
            ca_not_after = ca_not_after.min(
                crate::pki::der::not_after(&cert)
                    .map_err(|e| invalid(&files.ca, format!("parse certificate: {e}")))?,
            );
            roots
                .add(cert)
                .map_err(|e| invalid(&files.ca, format!("not a CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid(&files.ca, "no certificate in file".into()));
        }
        let roots = Arc::new(roots);
        // No root hints: the hints would have to outlive a CA change, and
        // every Membrane client sends its one certificate regardless.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .clear_root_hint_subjects()
                .build()
                .map_err(|e| invalid(&files.ca, format!("client verifier: {e}")))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| invalid(&files.ca, format!("server verifier: {e}")))?;
        Ok(Self {
            key: Arc::new(key),
            client_verifier,
            server_verifier,
            cert_not_after,
            ca_not_after,
        })
    }
}

// === resolvers and verifiers that ask for the current material ===

#[derive(Debug)]
struct CertResolver(ReloadingTls);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

#[derive(Debug)]
struct ClientResolver(ReloadingTls);

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct ClientVerifier(ReloadingTls);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ServerVerifier(ReloadingTls);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server_verifier.supported_verify_schemes()
    }
}
