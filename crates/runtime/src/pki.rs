//! A development PKI: one CA per local cluster and a leaf certificate per
//! component, written as PEM files that [`TlsFiles`] loads.
//!
//! Why it exists: every Membrane gRPC listener requires mTLS (see
//! [`crate::tls`]), so a local cluster needs a CA and certificates before the
//! first process starts. Generating them here (rather than shelling out to
//! `openssl`) keeps the names, lifetimes and file modes in one place, and lets
//! later features (a relay, extra services) issue certificates the same way.
//!
//! Layout of a PKI directory:
//! - `ca.pem`, `ca-key.pem`: the CA (ECDSA P-256, self-signed).
//! - `NAME.pem`, `NAME-key.pem`: one leaf per component, valid for both
//!   `serverAuth` and `clientAuth`, because every component is both a gRPC
//!   server and a client of other components.
//!
//! Everything is reused when present and still valid for more than
//! [`REUSE_MARGIN`], so running `membrane up` repeatedly does not churn
//! certificates that running processes already loaded.
//!
//! Naming convention (the server name a client expects):
//! - a service `ipam` → `ipam.membrane.local` ([`LeafSpec::service`]),
//! - a node `node-1` → `node-1.nodes.membrane.local` and `node-1` ([`LeafSpec::node`]),
//! - a client-only identity such as the CLI → `cli.membrane.local` ([`LeafSpec::client`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::TlsFiles;

/// DNS suffix under which every Membrane component is named.
pub const DOMAIN: &str = "membrane.local";

/// A certificate that expires sooner than this is replaced instead of reused:
/// a local cluster started now should not break tomorrow.
pub const REUSE_MARGIN: Duration = Duration::from_secs(24 * 60 * 60);

/// Lifetime of a newly created CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Lifetime of a newly issued leaf certificate.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// [`renew_if_due`]'s usual margin: a third of [`LEAF_VALIDITY`] (30 days).
pub const RENEW_MARGIN: Duration = Duration::from_secs(LEAF_VALIDITY.as_secs() / 3);

/// Certificates start being valid this long before "now", so a peer whose
/// clock is slightly behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// The CA's subject. It is fixed because, without parsing the CA certificate,
/// a reloaded CA signs with the subject it was created with only if both come
/// from here (checked on load by [`Ca::load_or_create`]).
const CA_COMMON_NAME: &str = "Membrane development CA";
const ORGANIZATION: &str = "Membrane";

/// Errors of the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done (`read`, `write`, `create directory`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// rcgen refused to build a key or certificate.
    #[error("generate certificate `{name}`: {source}")]
    Generate {
        /// The certificate's name (`ca`, `ipam`, ...).
        name: String,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// A certificate or key is not usable (bad PEM, wrong CA, expiring, missing a name).
    #[error("certificate `{name}` is not valid: {reason}")]
    Invalid {
        /// The certificate's name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// A PEM certificate and its PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
}

/// What a leaf certificate is for: its file name and its DNS names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// File stem (`ipam` → `ipam.pem`, `ipam-key.pem`) and common name.
    pub name: String,
    /// Subject alternative names; IP addresses become IP SANs.
    pub dns_names: Vec<String>,
}

/// The files of a PKI directory after [`ensure_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// `ca.pem`.
    pub ca: PathBuf,
    /// Per leaf name: the CA, its certificate and its key.
    pub leaves: BTreeMap<String, TlsFiles>,
}

/// A loaded or freshly created CA, able to issue leaf certificates.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// Makes sure `dir` holds a CA valid for more than [`REUSE_MARGIN`] and a leaf
/// certificate for every spec, reusing what is there and still valid (signed
/// by this CA, not expiring soon, naming every requested DNS name).
pub fn ensure_bundle(dir: &Path, leaves: &[LeafSpec]) -> Result<Bundle, PkiError> {
    let ca = Ca::load_or_create(dir)?;
    let mut files = BTreeMap::new();
    for leaf in leaves {
        files.insert(leaf.name.clone(), ca.ensure_leaf(dir, leaf)?);
    }
    Ok(Bundle {
        ca: ca_path(dir),
        leaves: files,
    })
}

/// Re-issues the leaf `leaf` in `dir` from the CA in `dir` (for
/// [`LEAF_VALIDITY`], with a new key) when it has less than `margin` left,
/// no longer verifies against the CA, lacks one of its names, or is missing.
/// Returns whether it did. The key and then the certificate are each
/// replaced atomically; processes using [`crate::tls::ReloadingTls`] pick
/// the pair up for new connections.
///
/// Needs the CA key (`ca-key.pem`): run it where the CA lives (in a local
/// cluster, next to `membrane up`), e.g. with [`crate::tls::spawn_renewal`].
/// A CA that expires within [`REUSE_MARGIN`] is an error here: renewing
/// leaves under it would not help, and replacing the CA is a cluster-wide
/// decision.
pub fn renew_if_due(dir: &Path, leaf: &LeafSpec, margin: Duration) -> Result<bool, PkiError> {
    if margin >= LEAF_VALIDITY {
        return Err(PkiError::Invalid {
            name: leaf.name.clone(),
            reason: format!(
                "renewal margin {}s is not below the leaf validity {}s: every check would renew",
                margin.as_secs(),
                LEAF_VALIDITY.as_secs()
            ),
        });
    }
    let ca = Ca::load(dir)?;
    let files = leaf_files(dir, &leaf.name);
    if ca.leaf_is_valid_for(&files, leaf, margin) {
        return Ok(false);
    }
    let issued = ca.issue(&leaf.name, &leaf.dns_names, LEAF_VALIDITY)?;
    write_file(&files.key, &issued.key_pem, 0o600)?;
    write_file(&files.cert, &issued.cert_pem, 0o644)?;
    Ok(true)
}

/// The TLS files a leaf named `name` has (or will have) in `dir`.
pub fn leaf_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: ca_path(dir),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    }
}

fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca-key.pem")
}

// === impl LeafSpec ===

impl LeafSpec {
    /// A leaf with explicit names.
    pub fn new(name: impl Into<String>, dns_names: impl IntoIterator<Item = String>) -> Self {
        Self {
            name: name.into(),
            dns_names: dns_names.into_iter().collect(),
        }
    }

    /// A cluster service (`ipam`): named `ipam.membrane.local`.
    pub fn service(name: &str) -> Self {
        Self::new(name, [service_server_name(name)])
    }

    /// A node (`node-1`): named `node-1.nodes.membrane.local` and `node-1`.
    pub fn node(name: &str) -> Self {
        Self::new(name, [node_server_name(name), name.to_string()])
    }

    /// A client identity (`cli`): named `cli.membrane.local`. The same shape
    /// as a service; a separate constructor keeps call sites readable.
    pub fn client(name: &str) -> Self {
        Self::service(name)
    }
}

/// The server name of a cluster service: `ipam` → `ipam.membrane.local`.
pub fn service_server_name(service: &str) -> String {
    format!("{service}.{DOMAIN}")
}

/// The server name of a node: `node-1` → `node-1.nodes.membrane.local`.
pub fn node_server_name(node: &str) -> String {
    format!("{node}.nodes.{DOMAIN}")
}

// === impl IssuedCert ===

impl std::fmt::Debug for IssuedCert {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

// === impl Ca ===

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA in memory, valid from (about) now for `validity`.
    pub fn create(validity: Duration) -> Result<Self, PkiError> {
        let gen_err = |source| PkiError::Generate {
            name: "ca".to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = ca_params();
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(ca_params(), key),
        })
    }

    /// Loads `ca.pem` / `ca-key.pem` from `dir`, or creates and writes a new
    /// CA when they are missing, unreadable, do not belong together, or expire
    /// within [`REUSE_MARGIN`]. Leaves signed by a replaced CA no longer
    /// verify, so [`Ca::ensure_leaf`] reissues them.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        create_dir(dir)?;
        match Self::load(dir) {
            Ok(ca) => return Ok(ca),
            Err(e) => tracing::debug!(error = %e, dir = %dir.display(), "creating a new CA"),
        }
        let ca = Self::create(CA_VALIDITY)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// Loads an existing CA from `dir` and checks it is usable for more than
    /// [`REUSE_MARGIN`].
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let invalid = |reason: String| PkiError::Invalid {
            name: "ca".to_string(),
            reason,
        };
        let cert_pem = read_to_string(&ca_path(dir))?;
        let key_pem = read_to_string(&ca_key_path(dir))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("parse ca.pem: {e}")))?;
        let not_after =
            der::not_after(&cert_der).map_err(|e| invalid(format!("parse ca.pem: {e}")))?;
        if not_after < unix_now() + REUSE_MARGIN.as_secs() {
            return Err(invalid("expires within 24 hours".to_string()));
        }
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("parse ca-key.pem: {e}")))?;
        let ca = Self {
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(), key),
        };
        // A probe leaf proves the key belongs to the certificate and that the
        // reconstructed subject matches what the certificate says.
        let probe = ca.issue(
            "probe",
            &[service_server_name("probe")],
            Duration::from_secs(3600),
        )?;
        ca.verify(
            &probe.cert_pem,
            &[service_server_name("probe")],
            Duration::ZERO,
        )
        .map_err(|e| invalid(format!("key does not match certificate: {e}")))?;
        Ok(ca)
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        create_dir(dir)?;
        write_file(&ca_key_path(dir), &self.issuer.key().serialize_pem(), 0o600)?;
        write_file(&ca_path(dir), &self.cert_pem, 0o644)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate for `name` with `dns_names` as subject
    /// alternative names, valid for server and client authentication.
    pub fn issue(
        &self,
        name: &str,
        dns_names: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let gen_err = |source| PkiError::Generate {
            name: name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Checks that `cert_pem` was signed by this CA, is usable as a server
    /// certificate for every name in `dns_names` and as a client certificate,
    /// and is still valid `valid_for` from now.
    pub fn verify(
        &self,
        cert_pem: &str,
        dns_names: &[String],
        valid_for: Duration,
    ) -> Result<(), String> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("parse certificate: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("ca certificate: {e}"))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let at = UnixTime::since_unix_epoch(Duration::from_secs(unix_now()) + valid_for);

        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("server verifier: {e}"))?;
        for dns in dns_names {
            let server_name =
                ServerName::try_from(dns.clone()).map_err(|e| format!("name `{dns}`: {e}"))?;
            server
                .verify_server_cert(&cert, &[], &server_name, &[], at)
                .map_err(|e| format!("as server `{dns}`: {e}"))?;
        }
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        client
            .verify_client_cert(&cert, &[], at)
            .map_err(|e| format!("as client: {e}"))?;
        Ok(())
    }

    /// Makes sure `dir` holds a valid certificate and key for `leaf`, issuing
    /// them (for [`LEAF_VALIDITY`]) unless the existing ones verify against this
    /// CA for more than [`REUSE_MARGIN`] and name every requested DNS name.
    pub fn ensure_leaf(&self, dir: &Path, leaf: &LeafSpec) -> Result<TlsFiles, PkiError> {
        create_dir(dir)?;
        let files = leaf_files(dir, &leaf.name);
        if self.existing_leaf_is_valid(&files, leaf) {
            // Tighten the mode in case someone loosened it.
            set_mode(&files.key, 0o600)?;
            return Ok(files);
        }
        let issued = self.issue(&leaf.name, &leaf.dns_names, LEAF_VALIDITY)?;
        write_file(&files.key, &issued.key_pem, 0o600)?;
        write_file(&files.cert, &issued.cert_pem, 0o644)?;
        Ok(files)
    }

    fn existing_leaf_is_valid(&self, files: &TlsFiles, leaf: &LeafSpec) -> bool {
        self.leaf_is_valid_for(files, leaf, REUSE_MARGIN)
    }

    fn leaf_is_valid_for(&self, files: &TlsFiles, leaf: &LeafSpec, margin: Duration) -> bool {
        let (Ok(cert_pem), Ok(key_pem)) = (
            std::fs::read_to_string(&files.cert),
            std::fs::read_to_string(&files.key),
        ) else {
            return false;
        };
        if KeyPair::from_pem(&key_pem).is_err() {
            return false;
        }
        match self.verify(&cert_pem, &leaf.dns_names, margin) {
            Ok(()) => true,
            Err(reason) => {
                tracing::debug!(leaf = %leaf.name, %reason, "reissuing certificate");
                false
            }
        }
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = Duration::from_secs(unix_now());
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PkiError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        PkiError::Io {
            action: "chmod",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes through a temporary file created with `mode` and renamed into
/// place, so a key is never readable by others, not even briefly, and a
/// reader never sees half a file.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err)
}

/// Just enough DER to read a certificate's `notAfter`: rustls verifies leaf
/// lifetimes but treats a CA as a bare trust anchor, and rcgen can only parse
/// certificates with a feature this crate does not enable.
pub(crate) mod der {
    /// Seconds since the Unix epoch at which the certificate expires.
    pub(crate) fn not_after(cert: &[u8]) -> Result<u64, String> {
        let (cert, _) = expect(cert, 0x30, "certificate")?;
        let (tbs, _) = expect(cert, 0x30, "tbsCertificate")?;
        let (tag, _, mut rest) = tlv(tbs)?;
        if tag == 0xa0 {
            // Explicit version; the serial number follows.
            rest = tlv(rest)?.2;
        }
        let rest = tlv(rest)?.2; // signature algorithm
        let rest = tlv(rest)?.2; // issuer
        let (validity, _) = expect(rest, 0x30, "validity")?;
        let rest = tlv(validity)?.2; // notBefore
        let (tag, time, _) = tlv(rest)?;
        parse_time(tag, time)
    }

    fn expect<'a>(input: &'a [u8], want: u8, what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
        let (tag, content, rest) = tlv(input)?;
        if tag != want {
            return Err(format!("{what}: unexpected tag {tag:#x}"));
        }
        Ok((content, rest))
    }

    /// Splits one tag-length-value off `input`: (tag, content, rest).
    fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
        let truncated = || "truncated DER".to_string();
        let (&tag, input) = input.split_first().ok_or_else(truncated)?;
        let (&first, mut input) = input.split_first().ok_or_else(truncated)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || input.len() < n {
                return Err("bad DER length".to_string());
            }
            let (bytes, rest) = input.split_at(n);
            input = rest;
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if input.len() < len {
            return Err(truncated());
        }
        let (content, rest) = input.split_at(len);
        Ok((tag, content, rest))
    }

    /// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
    fn parse_time(tag: u8, bytes: &[u8]) -> Result<u64, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "time is not ASCII".to_string())?;
        let digits = text
            .strip_suffix('Z')
            .ok_or_else(|| format!("time `{text}` is not UTC"))?;
        let num = |s: &str| s.parse::<u64>().map_err(|_| format!("bad time `{text}`"));
        let (year, rest) = match (tag, digits.len()) {
            (0x17, 12) => {
                let yy = num(&digits[..2])?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, &digits[2..])
            }
            (0x18, 14) => (num(&digits[..4])?, &digits[4..]),
            _ => return Err(format!("unsupported time `{text}` (tag {tag:#x})")),
        };
        let (month, day) = (num(&rest[0..2])?, num(&rest[2..4])?);
        let (hour, min, sec) = (num(&rest[4..6])?, num(&rest[6..8])?, num(&rest[8..10])?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return Err(format!("bad date `{text}`"));
        }
        Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    /// algorithm), for years ≥ 1970.
    fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn utc_and_generalized_times_convert_to_unix_seconds() {
            assert_eq!(parse_time(0x17, b"700101000000Z"), Ok(0));
            assert_eq!(parse_time(0x17, b"240229120000Z"), Ok(1_709_208_000));
            assert_eq!(parse_time(0x18, b"20240229120000Z"), Ok(1_709_208_000));
            assert!(parse_time(0x17, b"2402291200Z").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(spec: &LeafSpec) -> Vec<String> {
        spec.dns_names.clone()
    }

    #[test]
    fn a_certificate_issued_by_the_ca_verifies_against_it_for_each_san() {
        let ca = Ca::create(CA_VALIDITY).expect("ca");
        let spec = LeafSpec::node("node-1");
        let leaf = ca
            .issue(&spec.name, &names(&spec), LEAF_VALIDITY)
            .expect("issue");
        assert_eq!(
            spec.dns_names,
            vec![
                "node-1.nodes.membrane.local".to_string(),
                "node-1".to_string()
            ]
        );
        ca.verify(&leaf.cert_pem, &names(&spec), REUSE_MARGIN)
            .expect("leaf verifies for server and client auth");
    }

    #[test]
    fn a_certificate_does_not_verify_for_a_name_it_lacks_or_against_another_ca() {
        let ca = Ca::create(CA_VALIDITY).expect("ca");
        let other = Ca::create(CA_VALIDITY).expect("other ca");
        let leaf = ca
            .issue("ipam", &names(&LeafSpec::service("ipam")), LEAF_VALIDITY)
            .expect("issue");
        let err = ca
            .verify(
                &leaf.cert_pem,
                &["policy.membrane.local".to_string()],
                Duration::ZERO,
            )
            .expect_err("wrong name");
        assert!(err.contains("policy.membrane.local"), "{err}");
        other
            .verify(
                &leaf.cert_pem,
                &names(&LeafSpec::service("ipam")),
                Duration::ZERO,
            )
            .expect_err("another CA");
    }

    #[test]
    fn a_certificate_expiring_within_the_margin_does_not_verify_for_the_margin() {
        let ca = Ca::create(CA_VALIDITY).expect("ca");
        let leaf = ca
            .issue(
                "cli",
                &names(&LeafSpec::client("cli")),
                Duration::from_secs(3600),
            )
            .expect("issue");
        ca.verify(
            &leaf.cert_pem,
            &names(&LeafSpec::client("cli")),
            Duration::ZERO,
        )
        .expect("valid now");
        ca.verify(
            &leaf.cert_pem,
            &names(&LeafSpec::client("cli")),
            REUSE_MARGIN,
        )
        .expect_err("not valid tomorrow");
    }

    #[test]
    fn the_bundle_is_written_with_private_keys_readable_only_by_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = ensure_bundle(
            dir.path(),
            &[
                LeafSpec::service("ipam"),
                LeafSpec::node("node-1"),
                LeafSpec::client("cli"),
            ],
        )
        .expect("bundle");
        assert_eq!(bundle.ca, dir.path().join("ca.pem"));
        for file in [
            "ca.pem",
            "ca-key.pem",
            "ipam.pem",
            "ipam-key.pem",
            "node-1.pem",
            "cli-key.pem",
        ] {
            assert!(dir.path().join(file).is_file(), "{file} missing");
        }
        for key in [
            "ca-key.pem",
            "ipam-key.pem",
            "node-1-key.pem",
            "cli-key.pem",
        ] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key} mode {mode:o}");
        }
        let ipam = &bundle.leaves["ipam"];
        assert_eq!(ipam, &leaf_files(dir.path(), "ipam"));
        // The files load as a rustls identity.
        ipam.server_config().expect("server config");
    }

    #[test]
    fn ensuring_the_bundle_again_reuses_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = [LeafSpec::service("ipam"), LeafSpec::node("node-1")];
        ensure_bundle(dir.path(), &specs).expect("first");
        let read = |f: &str| std::fs::read(dir.path().join(f)).expect("read");
        let before: Vec<_> = [
            "ca.pem",
            "ca-key.pem",
            "ipam.pem",
            "ipam-key.pem",
            "node-1.pem",
        ]
        .iter()
        .map(|f| read(f))
        .collect();
        ensure_bundle(dir.path(), &specs).expect("second");
        let after: Vec<_> = [
            "ca.pem",
            "ca-key.pem",
            "ipam.pem",
            "ipam-key.pem",
            "node-1.pem",
        ]
        .iter()
        .map(|f| read(f))
        .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_leaf_is_reissued_when_its_names_change_or_its_ca_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        ca.ensure_leaf(dir.path(), &LeafSpec::service("ipam"))
            .expect("leaf");
        let first = std::fs::read(dir.path().join("ipam.pem")).expect("read");

        let renamed = LeafSpec::new("ipam", ["ipam.example".to_string()]);
        ca.ensure_leaf(dir.path(), &renamed).expect("leaf");
        let second = std::fs::read(dir.path().join("ipam.pem")).expect("read");
        assert_ne!(first, second);

        // A CA that expires within the margin is replaced, and leaves follow.
        Ca::create(Duration::from_secs(3600))
            .expect("short ca")
            .save(dir.path())
            .expect("save");
        let new_ca = Ca::load_or_create(dir.path()).expect("replaced ca");
        let leaf = new_ca.ensure_leaf(dir.path(), &renamed).expect("leaf");
        let cert = std::fs::read_to_string(leaf.cert).expect("read");
        new_ca
            .verify(&cert, &renamed.dns_names, REUSE_MARGIN)
            .expect("signed by the new CA");
    }

    #[test]
    fn the_ca_expiry_is_read_from_the_certificate() {
        let ca = Ca::create(Duration::from_secs(7200)).expect("ca");
        let not_after = der::not_after(&ca.cert_der).expect("parse");
        let expected = unix_now() + 7200;
        assert!(
            not_after.abs_diff(expected) <= 5,
            "{not_after} vs {expected}"
        );
    }
}
