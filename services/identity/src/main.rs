//! `membrane-identity`: wiring only; see the library for what it does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_identity::config::{IdentityConfig, parse_duration};
use membrane_identity::labels::{DEFAULT_EXCLUDES, LabelFilter};
use membrane_identity::numbers::IdRange;
use membrane_identity::{grpc, store};
use membrane_runtime::{flags, grpc as rpc, store::Store, stream::Publisher, telemetry};

/// Security identities and the ipcache for Membrane.
#[derive(Debug, Parser)]
#[command(name = "membrane-identity", version)]
struct Args {
    #[command(flatten)]
    listen: flags::ListenFlags,
    #[command(flatten)]
    tls: flags::TlsFlags,
    #[command(flatten)]
    etcd: flags::EtcdFlags,
    #[command(flatten)]
    telemetry: flags::TelemetryFlags,
    #[command(flatten)]
    metrics: flags::MetricsFlags,
    /// Numbers for global identities, FIRST-LAST (inside 256-16777215).
    #[arg(long, env = "MEMBRANE_IDENTITY_RANGE", default_value = "256-65535")]
    identity_range: String,
    /// Label keys that do not count towards an identity, comma separated:
    /// exact keys, or prefixes ending in `*`. Replaces the default list.
    #[arg(
        long,
        env = "MEMBRANE_IDENTITY_LABEL_FILTER_EXCLUDE",
        value_delimiter = ',',
        default_values_t = DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    )]
    label_filter_exclude: Vec<String>,
    /// TTL of each node's lease in seconds; nodes heartbeat well within it.
    #[arg(long, env = "MEMBRANE_IDENTITY_LEASE_TTL", default_value_t = 30)]
    lease_ttl: i64,
    /// How long an unreferenced identity is kept (e.g. `60s`, `500ms`).
    #[arg(long, env = "MEMBRANE_IDENTITY_GC_GRACE", default_value = "60s")]
    gc_grace: String,
    /// How often to look for identities to collect.
    #[arg(long, env = "MEMBRANE_IDENTITY_GC_INTERVAL", default_value = "10s")]
    gc_interval: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = telemetry::init("membrane-identity", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    anyhow::ensure!(args.lease_ttl > 0, "--lease-ttl must be positive");
    let config = IdentityConfig {
        range: IdRange::parse(&args.identity_range)?,
        filter: LabelFilter::new(&args.label_filter_exclude)?,
        lease_ttl_secs: args.lease_ttl,
        gc_grace: parse_duration("gc-grace", &args.gc_grace)?,
        gc_interval: parse_duration("gc-interval", &args.gc_interval)?,
    };
    let tls = args.tls.files()?;
    let store = Store::connect(&args.etcd, Duration::from_secs(30)).await?;
    let identities = store::IdentityStore::open(store.clone(), config).await?;
    tokio::spawn(identities.clone().run_gc());

    let publisher = Publisher::new();
    membrane_runtime::metrics::register_publisher("identity", &publisher);
    tokio::spawn(membrane_runtime::store::feed_publisher(
        store,
        store::keys::ROOT.into(),
        Arc::new(grpc::IdentityResources),
        publisher.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("bind {}", args.listen.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        range = %identities.config().range,
        "membrane-identity serving"
    );
    let routes = tonic::service::Routes::new(grpc::IdentityService::new(identities))
        .add_service(publisher.service());
    rpc::serve(
        listener,
        routes,
        &["membrane.identity.v1.Identity"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await
}
