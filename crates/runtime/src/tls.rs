//! mTLS for gRPC: every listener asks for a client certificate signed by the
//! cluster CA, every client presents its own and checks the server's name.
//!
//! Certificates change while processes run: [`crate::grpc::serve`] and
//! [`crate::grpc::connect_lazy`] use [`ReloadingTls`], so replaced
//! certificate, key or CA files apply to every new connection without a
//! restart (see `reload` for how and when). [`spawn_renewal`] re-issues
//! leaf certificates before they expire, where the CA key is at hand.
//!
//! Module map:
//! - `reload`: [`ReloadingTls`], rustls configs whose certificate and CA follow the files.
//! - `io`: the TLS accept loop handed to tonic ([`incoming`]) and the client [`connector`].
//! - `renew`: [`spawn_renewal`] around [`crate::pki::renew_if_due`].

mod io;
mod reload;
mod renew;

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use self::io::{HANDSHAKE_TIMEOUT, ServerTlsStream, connector, incoming};
pub use self::reload::{
    EXPIRY_WARNING, RELOAD_INTERVAL, ReloadingTls, SETTLE_TIME, WATCH_INTERVAL,
};
pub use self::renew::{RenewalPolicy, spawn_renewal, spawn_renewal_with};

/// The three PEM files a process needs for mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

/// Errors reading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("read tls file `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file was read but is not usable.
    #[error("tls file `{path}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Installs rustls' ring crypto provider for the process. Call first thing in
/// `main`; calling again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })
}

impl TlsFiles {
    /// Loads the files as [`ReloadingTls`] (one shared copy per process).
    pub fn reloading(&self) -> Result<ReloadingTls, TlsError> {
        ReloadingTls::load(self)
    }

    /// Server side, as a static tonic config: present our certificate,
    /// require a client certificate. Read once; prefer [`Self::reloading`].
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(read(&self.ca)?)))
    }

    /// Client side, as a static tonic config: trust only the cluster CA,
    /// present our certificate, and expect the server's certificate to name
    /// `server_name`. Read once; prefer [`Self::reloading`].
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(identity)
            .domain_name(server_name))
    }
}
