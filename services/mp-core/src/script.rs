//! A user's TorchScript module (scripted or traced in PyTorch, saved with `torch.jit.save`),
//! driven through libtorch's C API (torch-sys) and one C++ shim for what that API lacks:
//! the module's buffers (batch-norm running statistics), which a PyTorch `state_dict` carries
//! next to the parameters.
//!
//! The parameters and buffers handed out here share storage with the module: an optimiser
//! step on them, or a `copy_` into them, changes what the module computes and what
//! [`ScriptModule::save`] writes.
//!
//! Imported modules are kept, by content, in a process-wide registry ([`register`],
//! [`module_bytes`]): a checkpoint names its module by content hash (`module-<hash>.pt`), so a
//! worker that loads twenty versions of one model reads and hashes the module once. The
//! registry only grows with the distinct modules a process has seen (one per project).

use crate::error::{CoreError, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Tensor};
use torch_sys::{CModule_, C_tensor};

type NamedTensorCb = extern "C" fn(*mut c_void, *const c_char, *mut c_void);

extern "C" {
    fn mp_module_named_buffers(
        module: *mut c_void,
        data: *mut c_void,
        f: NamedTensorCb,
    ) -> *mut c_char;
    fn mp_module_kinds(module: *mut c_void, out: *mut *mut c_char) -> *mut c_char;
}

/// A loaded TorchScript module. Owned by one thread at a time, like a `tch::Tensor`.
pub struct ScriptModule {
    ptr: NonNull<CModule_>,
}

// Same contract as tch's `CModule`: moved between threads, never shared.
unsafe impl Send for ScriptModule {}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        unsafe { torch_sys::atm_free(self.ptr.as_ptr()) };
    }
}

impl std::fmt::Debug for ScriptModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptModule")
    }
}

/// The error libtorch left for this thread, if any.
fn torch_error() -> Option<String> {
    unsafe {
        let p = torch_sys::get_and_reset_last_err();
        if p.is_null() {
            return None;
        }
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        libc::free(p as *mut c_void);
        Some(s)
    }
}

/// libtorch's messages carry a C++ backtrace after the first lines; a person needs the first.
fn first_lines(s: &str) -> String {
    s.lines()
        .take_while(|l| !l.starts_with("Exception raised from"))
        .filter(|l| !l.trim().is_empty())
        .take(6)
        .collect::<Vec<_>>()
        .join(" ")
}

fn shim_result(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let s = unsafe { CStr::from_ptr(err).to_string_lossy().into_owned() };
    unsafe { libc::free(err as *mut c_void) };
    Err(CoreError::invalid(first_lines(&s)))
}

fn device_int(d: Device) -> Result<i32> {
    match d {
        Device::Cpu => Ok(-1),
        Device::Cuda(i) => Ok(i as i32),
        other => Err(CoreError::invalid(format!(
            "TorchScript modules run on cpu or cuda, not {other:?}"
        ))),
    }
}

extern "C" fn push_named(data: *mut c_void, name: *const c_char, t: *mut C_tensor) {
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let v = unsafe { &mut *(data as *mut Vec<(String, Tensor)>) };
    v.push((name, unsafe { Tensor::from_ptr(t) }));
}

extern "C" fn push_named_void(data: *mut c_void, name: *const c_char, t: *mut c_void) {
    push_named(data, name, t as *mut C_tensor)
}

impl ScriptModule {
    /// Loads a module saved by `torch.jit.save` onto `device`.
    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<ScriptModule> {
        let dev = device_int(device)?;
        let ptr = unsafe {
            torch_sys::atm_load_str_on_device(bytes.as_ptr() as *const c_char, bytes.len(), dev)
        };
        if let Some(e) = torch_error() {
            return Err(CoreError::invalid(format!(
                "not a TorchScript module ({})",
                first_lines(&e)
            )));
        }
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| CoreError::invalid("libtorch returned no module".to_string()))?;
        Ok(ScriptModule { ptr })
    }

    /// `module(x)`; the module must return one tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let args = [x.as_ptr() as *mut C_tensor];
        let out = unsafe { torch_sys::atm_forward(self.ptr.as_ptr(), args.as_ptr(), 1) };
        if let Some(e) = torch_error() {
            return Err(CoreError::invalid(format!(
                "the module's forward failed: {}",
                first_lines(&e)
            )));
        }
        if out.is_null() {
            return Err(CoreError::invalid("the module's forward returned nothing"));
        }
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Training or evaluation mode for every submodule (batch norm, dropout).
    pub fn set_train(&self, train: bool) {
        unsafe {
            if train {
                torch_sys::atm_train(self.ptr.as_ptr())
            } else {
                torch_sys::atm_eval(self.ptr.as_ptr())
            }
        }
        // Neither call can fail for a loaded module; clear any stale message anyway.
        let _ = torch_error();
    }

    /// Parameters by dotted name (`layer1.0.conv1.weight`), sharing storage with the module.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        unsafe {
            torch_sys::atm_named_parameters(
                self.ptr.as_ptr(),
                &mut v as *mut _ as *mut c_void,
                push_named,
            )
        };
        match torch_error() {
            Some(e) => Err(CoreError::invalid(first_lines(&e))),
            None => Ok(v),
        }
    }

    /// Buffers by dotted name (`bn1.running_mean`), sharing storage with the module.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        let err = unsafe {
            mp_module_named_buffers(
                self.ptr.as_ptr() as *mut c_void,
                &mut v as *mut _ as *mut c_void,
                push_named_void,
            )
        };
        shim_result(err)?;
        Ok(v)
    }

    /// (submodule name, qualified type name) for the module and every submodule.
    pub fn kinds(&self) -> Result<Vec<(String, String)>> {
        let mut out: *mut c_char = std::ptr::null_mut();
        let err = unsafe { mp_module_kinds(self.ptr.as_ptr() as *mut c_void, &mut out) };
        shim_result(err)?;
        let s = unsafe { CStr::from_ptr(out).to_string_lossy().into_owned() };
        unsafe { libc::free(out as *mut c_void) };
        Ok(s.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect())
    }

    /// Writes the module, with its current parameters and buffers, for `torch.jit.load`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let p = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| CoreError::invalid(format!("path {} holds a NUL", path.display())))?;
        unsafe { torch_sys::atm_save(self.ptr.as_ptr(), p.as_ptr()) };
        match torch_error() {
            Some(e) => Err(CoreError::io(path, std::io::Error::other(first_lines(&e)))),
            None => Ok(()),
        }
    }
}

/// The name a module is stored and referred to under: `module-<first 16 hex of sha256>.pt`.
pub fn module_name(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    format!("module-{}.pt", &hex::encode(d)[..16])
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Vec<u8>>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Keeps `bytes` as a known module; returns its name.
pub fn register(bytes: Vec<u8>) -> String {
    let name = module_name(&bytes);
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.clone())
        .or_insert_with(|| Arc::new(bytes));
    name
}

/// The bytes of module `name`: from the registry, else from a file of that name in one of
/// `dirs` (checked against its hash, then registered).
pub fn module_bytes(name: &str, dirs: &[&Path]) -> Result<Arc<Vec<u8>>> {
    if let Some(b) = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
    {
        return Ok(b.clone());
    }
    for d in dirs {
        let p = d.join(name);
        if !p.is_file() {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| CoreError::io(&p, e))?;
        if module_name(&bytes) != name {
            return Err(CoreError::invalid(format!(
                "{}: content does not match its name (a different module under the same file name)",
                p.display()
            )));
        }
        register(bytes);
        return module_bytes(name, &[]);
    }
    Err(CoreError::invalid(format!(
        "TorchScript module {name} not found (looked in {})",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}
