//! The compute device by name (`auto`, `cpu`, `cuda`, `cuda:N`).
//!
//! libtorch ships its CUDA kernels in `libtorch_cuda.so`. Our binaries call no symbol of it
//! directly, so the linker (with `--as-needed`) leaves it out and libtorch then reports no
//! CUDA even on a GPU machine. Instead of linking it into every binary (half a second and
//! hundreds of megabytes mapped at every start on CPU machines), it is loaded here on demand:
//! only when CUDA is asked for, or when `auto` finds an NVIDIA driver.

use crate::error::{CoreError, Result};
use std::sync::OnceLock;
use tch::Device;

/// True when an NVIDIA kernel driver is present (cheap; no library is loaded).
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia").exists()
        || std::path::Path::new("/dev/nvidiactl").exists()
}

/// Loads `libtorch_cuda.so` once (found through the binary's RUNPATH or LD_LIBRARY_PATH) so
/// that libtorch registers its CUDA backend; returns whether CUDA is then usable.
pub fn load_cuda() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        // Load before asking libtorch anything: its first CUDA query fixes the CUDA hooks
        // for the life of the process (the CPU stub when the library is not there yet).
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept for the
        // life of the process (never dlclosed), as libtorch's registries require.
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if h.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let e = unsafe { libc::dlerror() };
            let msg = if e.is_null() {
                String::new()
            } else {
                unsafe { std::ffi::CStr::from_ptr(e) }
                    .to_string_lossy()
                    .into_owned()
            };
            tracing::warn!("cannot load {name:?}: {msg}");
            eprintln!("warning: cannot load {name:?}: {msg}");
        }
        tch::Cuda::is_available()
    })
}

/// The device named by `s`: `cpu`, `cuda` / `cuda:N` (an error when CUDA cannot be used),
/// or `auto` (the first GPU when a driver and libtorch's CUDA half are present, else CPU).
pub fn parse(s: &str) -> Result<Device> {
    match s.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if nvidia_driver_present() && load_cuda() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        c if c == "cuda" || c.starts_with("cuda:") => {
            let idx = match c.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    CoreError::invalid(format!("device {c:?}: cuda:N with N a GPU index"))
                })?,
            };
            if !load_cuda() {
                return Err(CoreError::invalid(format!(
                    "device {c:?}: CUDA is not available (no NVIDIA driver, or libtorch without CUDA)"
                )));
            }
            let n = tch::Cuda::device_count() as usize;
            if idx >= n {
                return Err(CoreError::invalid(format!(
                    "device {c:?}: only {n} GPU(s) present"
                )));
            }
            Ok(Device::Cuda(idx))
        }
        o => Err(CoreError::invalid(format!(
            "device {o:?}: auto, cpu, cuda or cuda:N"
        ))),
    }
}

/// `auto`: the first GPU when a driver and libtorch's CUDA half are present, else the CPU.
/// Use this instead of `Device::cuda_if_available`, which cannot see CUDA before it is loaded.
pub fn auto() -> Device {
    parse("auto").unwrap_or(Device::Cpu)
}

/// Waits for the device's queued work (CUDA kernels run asynchronously); a no-op on CPU.
/// Timings of GPU work must call this before reading the clock.
pub fn synchronize(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(parse("cpu").unwrap(), Device::Cpu);
        assert!(parse("tpu")
            .unwrap_err()
            .to_string()
            .contains("auto, cpu, cuda"));
        assert!(parse("cuda:x").is_err());
        // Without a GPU, cuda is a clear error and auto is the CPU.
        if !nvidia_driver_present() {
            assert!(parse("cuda")
                .unwrap_err()
                .to_string()
                .contains("not available"));
            assert_eq!(parse("auto").unwrap(), Device::Cpu);
        }
    }
}
