//! Compiles every `.proto` under `membrane/` with protoc (Debian `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "membrane/common/v1/common.proto",
        "membrane/stream/v1/stream.proto",
        "membrane/objects/v1/objects.proto",
        "membrane/ipam/v1/ipam.proto",
        "membrane/node/v1/node.proto",
        "membrane/observer/v1/observer.proto",
        "membrane/identity/v1/identity.proto",
        "membrane/policy/v1/policy.proto",
        "membrane/lb/v1/lb.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // Type names let resources travel as `google.protobuf.Any` on the stream.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure().compile_with_config(config, &protos, &["."])?;
    Ok(())
}
