//! Bakes an rpath to libtorch into the binary so it runs without LD_LIBRARY_PATH, and
//! compiles the small C++ shim (`csrc/script_shim.cpp`) against the same libtorch headers
//! tch uses.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/script_shim.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report its libtorch (DEP_TCH_LIBTORCH_LIB)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let root = PathBuf::from(&lib)
        .parent()
        .map(PathBuf::from)
        .expect("libtorch lib directory has a parent");
    let include = root.join("include");
    // Wheels and the C++ distribution both build with the C++11 ABI since PyTorch 2.7.
    let abi = std::env::var("MP_TORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=MP_TORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/script_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("mp_script_shim");
}
