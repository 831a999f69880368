//! Compiles mp/v1/mp.proto with protox (pure Rust; no protoc needed).
//!
//! For the web client (`wasm32`) only the clients are generated, without tonic's transport
//! (`connect()`): they run over gRPC-web through `tonic-web-wasm-client`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=mp/v1/mp.proto");
    let fds = protox::compile(["mp/v1/mp.proto"], ["."])?;
    let web = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "wasm32");
    tonic_prost_build::configure()
        .build_server(!web)
        .build_transport(!web)
        .compile_fds(fds)?;
    Ok(())
}
