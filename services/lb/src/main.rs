//! `membrane-lb`: wiring only; see the library for what it does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_lb::{grpc, maglev, model, objects, reconcile, store};
use membrane_runtime::{
    flags, grpc as rpc, objects::ObjectsService, store::Store, stream::Publisher,
    stream::Subscriber, telemetry,
};

/// Service load balancing for Membrane.
#[derive(Debug, Parser)]
#[command(name = "membrane-lb", version)]
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
    /// CIDR that ClusterIPs are allocated from.
    #[arg(long, env = "MEMBRANE_SERVICE_CIDR", default_value = "10.96.0.0/16")]
    service_cidr: ipnet::Ipv4Net,
    /// Pool of LoadBalancer addresses (on the underlay, so `external` reaches them).
    #[arg(long, env = "MEMBRANE_LB_POOL", default_value = "10.99.0.128/27")]
    lb_pool: ipnet::Ipv4Net,
    /// Algorithm for services without the `service.membrane.io/lb-algorithm` annotation: random or maglev.
    #[arg(long, env = "MEMBRANE_LB_ALGORITHM", default_value = "maglev", value_parser = store::parse_algorithm)]
    lb_algorithm: model::Algorithm,
    /// Maglev table size M (a prime from 251 to 131071; see the docs for the list).
    #[arg(long, env = "MEMBRANE_LB_MAGLEV_TABLE_SIZE", default_value_t = maglev::DEFAULT_TABLE_SIZE)]
    maglev_table_size: u32,
    /// Maglev seed, base64 of 12 bytes. When unset, one is generated once and stored in etcd.
    #[arg(long, env = "MEMBRANE_LB_MAGLEV_SEED")]
    maglev_seed: Option<String>,
    /// Serve `membrane.stream.v1.DesiredState` (off until nodes subscribe to lb,
    /// since `membrane status` expects every node on a served stream).
    #[arg(long, env = "MEMBRANE_LB_PUBLISH", default_value_t = false)]
    publish: bool,
    /// URL of the identity service, whose stream supplies pods for selectors.
    #[arg(long, env = "MEMBRANE_IDENTITY_ENDPOINT")]
    identity_endpoint: Option<String>,
    /// Name the identity service's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_IDENTITY_SERVER_NAME",
        default_value = "identity.membrane.local"
    )]
    identity_server_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = telemetry::init("membrane-lb", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    let config = model::LbConfig {
        service_cidr: args.service_cidr,
        lb_pool: args.lb_pool,
        default_algorithm: args.lb_algorithm,
        table_size: maglev::TableSize::new("--maglev-table-size", args.maglev_table_size.into())?,
    };
    let seed = args
        .maglev_seed
        .as_deref()
        .map(|s| maglev::Seed::from_base64("--maglev-seed", s))
        .transpose()?;
    let tls = args.tls.files()?;
    let store = Store::connect(&args.etcd, Duration::from_secs(30)).await?;
    let lb = store::LbStore::open(store, config, seed).await?;
    let listener = tokio::net::TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("bind {}", args.listen.listen))?;
    let addr = listener.local_addr()?;

    let (sink, pods) = grpc::PodSink::new();
    let mut _idle_sink = None;
    match &args.identity_endpoint {
        Some(url) => {
            let channel = rpc::connect_lazy(url, &args.identity_server_name, tls.as_ref())?;
            let subscriber = Subscriber::new(format!("membrane-lb@{addr}"), "identity", channel);
            tokio::spawn(subscriber.run(sink, std::future::pending()));
        }
        None => {
            tracing::warn!("no --identity-endpoint: selectors match no pods; Endpoints still work");
            _idle_sink = Some(sink);
        }
    }
    let (changes_tx, changes) = tokio::sync::watch::channel(0);
    tokio::spawn(lb.clone().watch_changes(changes_tx));
    let publisher = Publisher::new();
    // Nodes following this replica's stream, registered in etcd for every replica.
    tokio::spawn(
        lb.clone()
            .register_nodes(addr.to_string(), publisher.connected_nodes()),
    );
    membrane_runtime::metrics::register_publisher("lb", &publisher);
    let (published_tx, published) = tokio::sync::watch::channel(reconcile::Published::default());
    tokio::spawn(reconcile::run(
        lb.clone(),
        publisher.clone(),
        changes,
        pods,
        published_tx,
    ));

    tracing::info!(addr = %addr, seed = %lb.seed().to_base64(), publish = args.publish, "membrane-lb serving");
    let mut routes =
        tonic::service::Routes::new(grpc::LbService::new(published, publisher.clone()))
            .add_service(ObjectsService::new(Arc::new(objects::LbObjects::new(lb))));
    if args.publish {
        routes = routes.add_service(publisher.service());
    }
    rpc::serve(
        listener,
        routes,
        &["membrane.lb.v1.LoadBalancer"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await
}
