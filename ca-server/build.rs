//! Compiles Istio's certificate service proto without a system `protoc`: protox parses it,
//! tonic-prost-build generates the server and the client (tests and the bench use the client).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto_dir}");
    let fds = protox::compile(["istio/v1/auth/ca.proto"], [proto_dir])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
