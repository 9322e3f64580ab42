//! mTLS on a real listener: certificates from the development PKI; a client
//! needs a certificate from the cluster CA, and checks the server's name.

use std::time::Duration;

use membrane_runtime::grpc;
use membrane_runtime::pki::{LeafSpec, ensure_bundle};
use membrane_runtime::tls::{TlsFiles, install_crypto_provider};

async fn serve_health(tls: TlsFiles) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
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
    url
}

const T: Duration = Duration::from_secs(3);

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_cluster_ca_get_through() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = ensure_bundle(
        dir.path(),
        &[LeafSpec::service("ipam"), LeafSpec::client("cli")],
    )
    .expect("pki");
    let url = serve_health(bundle.leaves["ipam"].clone()).await;
    let cli = bundle.leaves["cli"].clone();

    grpc::check_health(&url, "ipam.membrane.local", Some(&cli), T)
        .await
        .expect("valid client gets through");

    // Wrong server name: the client refuses the server.
    let err = grpc::check_health(&url, "policy.membrane.local", Some(&cli), T)
        .await
        .expect_err("name mismatch");
    assert!(format!("{err:#}").contains("not valid for name"), "{err:#}");

    // A client certificate from another CA: the server refuses the client.
    let other = tempfile::tempdir().expect("tmp");
    let foreign = ensure_bundle(other.path(), &[LeafSpec::client("cli")]).expect("pki");
    let mixed = TlsFiles {
        ca: cli.ca.clone(),
        ..foreign.leaves["cli"].clone()
    };
    assert!(
        grpc::check_health(&url, "ipam.membrane.local", Some(&mixed), T)
            .await
            .is_err()
    );

    // No client certificate at all (plain TLS client): refused too.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(&cli.ca).expect("ca"),
                ))
                .domain_name("ipam.membrane.local"),
        )
        .expect("tls");
    let result = async {
        let ch = channel.connect().await?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(anyhow::Error::from)?;
        Ok::<_, anyhow::Error>(())
    };
    assert!(
        tokio::time::timeout(T, result)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "no client cert must fail"
    );

    // Plain text against a TLS listener fails as well.
    let plain = url.replace("https://", "http://");
    assert!(grpc::check_health(&plain, "", None, T).await.is_err());
}
