//! `membrane-policy`: wiring only; see the library for what it does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_policy::{engine::Engine, grpc, objects, store};
use membrane_runtime::{
    flags, grpc as rpc, objects::ObjectsService, store::Store, stream::Publisher,
    stream::Subscriber, telemetry,
};

/// Network policy for Membrane.
#[derive(Debug, Parser)]
#[command(name = "membrane-policy", version)]
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
    /// URL of the identity service, whose stream supplies identities. When
    /// unset, only reserved identities are known (and a warning is logged).
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
    let _telemetry = telemetry::init("membrane-policy", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    let tls = args.tls.files()?;
    let store = Store::connect(&args.etcd, Duration::from_secs(30)).await?;
    let listener = tokio::net::TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("bind {}", args.listen.listen))?;
    let addr = listener.local_addr()?;

    let (objects_tx, objects_rx) = tokio::sync::watch::channel(store::ObjectsSnapshot::default());
    tokio::spawn(store::watch_objects(store.clone(), objects_tx));
    let (sink, identities_rx) = grpc::IdentitySink::new();
    // Without an identity service the sink stays here, idle, so the engine
    // still sees an open (empty) identity input.
    let mut _idle_sink = None;
    match &args.identity_endpoint {
        Some(url) => {
            let channel = rpc::connect_lazy(url, &args.identity_server_name, tls.as_ref())?;
            // The subscriber name identifies this replica to the identity service.
            let subscriber =
                Subscriber::new(format!("membrane-policy@{addr}"), "identity", channel);
            tokio::spawn(subscriber.run(sink, std::future::pending()));
        }
        None => {
            tracing::warn!("no --identity-endpoint: only reserved identities are known");
            _idle_sink = Some(sink);
        }
    }
    let publisher = Publisher::new();
    membrane_runtime::metrics::register_publisher("policy", &publisher);
    let engine = Engine::new(publisher.clone());
    tokio::spawn(engine.clone().run(objects_rx, identities_rx));

    tracing::info!(addr = %addr, identity = ?args.identity_endpoint, "membrane-policy serving");
    let policy_store = store::PolicyStore::new(store);
    let routes = tonic::service::Routes::new(grpc::PolicyService::new(engine))
        .add_service(publisher.service())
        .add_service(ObjectsService::new(Arc::new(objects::PolicyObjects::new(
            policy_store,
        ))));
    rpc::serve(
        listener,
        routes,
        &["membrane.policy.v1.Policy"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await
}
