//! Generates the gRPC code from proto/keyraft.proto with protox, so building
//! keyraft needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/keyraft.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(["proto/keyraft.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
