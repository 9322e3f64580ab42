//! `membrane-ipam`: wiring only; see the library for what it does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_ipam::{grpc, objects, pool, store};
use membrane_runtime::{
    flags, grpc as rpc, objects::ObjectsService, store::Store, stream::Publisher, telemetry,
};

/// Cluster-pool IPAM for Membrane.
#[derive(Debug, Parser)]
#[command(name = "membrane-ipam", version)]
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
    /// CIDR that node pod CIDRs are carved from.
    #[arg(long, env = "MEMBRANE_CLUSTER_CIDR", default_value = "10.200.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, env = "MEMBRANE_NODE_MASK_SIZE", default_value_t = 24)]
    node_mask_size: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = telemetry::init("membrane-ipam", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    let config = pool::PoolConfig::new(&args.cluster_cidr, args.node_mask_size)?;
    let tls = args.tls.files()?;
    let store = Store::connect(&args.etcd, Duration::from_secs(30)).await?;
    let ipam = store::IpamStore::open(store.clone(), config).await?;

    let publisher = Publisher::new();
    membrane_runtime::metrics::register_publisher("ipam", &publisher);
    tokio::spawn(membrane_runtime::store::feed_publisher(
        store,
        "ipam/".into(),
        Arc::new(grpc::IpamResources),
        publisher.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("bind {}", args.listen.listen))?;
    tracing::info!(addr = %listener.local_addr()?, pool = %config, "membrane-ipam serving");
    let routes = tonic::service::Routes::new(grpc::IpamService::new(ipam.clone()))
        .add_service(publisher.service())
        .add_service(ObjectsService::new(Arc::new(objects::NodeObjects::new(
            ipam,
        ))));
    rpc::serve(
        listener,
        routes,
        &["membrane.ipam.v1.Ipam"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await
}
