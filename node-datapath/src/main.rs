//! `membrane-node-datapath`: wiring only; see [`membrane_node_datapath::agent`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    membrane_node_datapath::agent::main(membrane_node_datapath::agent::Args::parse()).await
}
