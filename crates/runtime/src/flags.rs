//! Flag groups shared by every binary. Each flag also reads an environment
//! variable, so compose files and Kubernetes manifests configure with `env:`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::tls::TlsFiles;

/// Where a gRPC server listens.
#[derive(Debug, Clone, Args)]
pub struct ListenFlags {
    /// Address the gRPC server binds (`127.0.0.1:0` picks a free port).
    #[arg(
        long = "listen",
        env = "MEMBRANE_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
}

/// mTLS material. When all three are set, every listener requires a client
/// certificate signed by the CA and every client presents one.
#[derive(Debug, Clone, Args, Default)]
pub struct TlsFlags {
    /// PEM file with the CA that signs every Membrane certificate.
    #[arg(long = "tls-ca", env = "MEMBRANE_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// PEM certificate of this process.
    #[arg(long = "tls-cert", env = "MEMBRANE_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of this process.
    #[arg(long = "tls-key", env = "MEMBRANE_TLS_KEY")]
    pub key: Option<PathBuf>,
}

impl TlsFlags {
    /// The TLS files, `None` when TLS is off. Setting only some is an error.
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key must be given together"),
        }
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, Args)]
pub struct EtcdFlags {
    /// etcd client URLs, comma separated.
    #[arg(
        long = "etcd-endpoints",
        env = "MEMBRANE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Key prefix under which this cluster keeps its state.
    #[arg(
        long = "etcd-prefix",
        env = "MEMBRANE_ETCD_PREFIX",
        default_value = "/membrane"
    )]
    pub prefix: String,
}

/// Logging and tracing.
#[derive(Debug, Clone, Args, Default)]
pub struct TelemetryFlags {
    /// Log filter in `tracing` syntax, e.g. `info,membrane_ipam=debug`.
    #[arg(long = "log", env = "MEMBRANE_LOG", default_value = "info")]
    pub log: String,
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`. Off when unset.
    #[arg(long = "otlp-endpoint", env = "MEMBRANE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Args, Default)]
pub struct MetricsFlags {
    /// Address of the plain-HTTP `/metrics` endpoint (Prometheus text
    /// format), e.g. `10.99.0.1:9101`. Off when unset.
    #[arg(long = "metrics-listen", env = "MEMBRANE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    /// Every group flattened into one command, as a binary does.
    #[derive(Debug, Parser)]
    struct All {
        #[command(flatten)]
        listen: ListenFlags,
        #[command(flatten)]
        tls: TlsFlags,
        #[command(flatten)]
        etcd: EtcdFlags,
        #[command(flatten)]
        telemetry: TelemetryFlags,
        #[command(flatten)]
        metrics: MetricsFlags,
    }

    #[test]
    fn every_group_fits_in_one_command_without_clashing_names() {
        All::command().debug_assert();
        let all = All::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:7101",
            "--metrics-listen",
            "127.0.0.1:9101",
        ])
        .expect("parse");
        assert_eq!(all.listen.listen.port(), 7101);
        assert_eq!(all.metrics.metrics_listen.map(|a| a.port()), Some(9101));
    }
}
