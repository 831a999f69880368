//! Compiles mp/v1/mp.proto with protox (pure Rust; no protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=mp/v1/mp.proto");
    let fds = protox::compile(["mp/v1/mp.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
