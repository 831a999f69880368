//! Helpers shared by the tests that run `mp` as real processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mp ARGS` with one libtorch thread, info logs into `log`.
pub fn spawn(args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_mp"))
            .args(args)
            .env("RUST_LOG", "info")
            .env("MP_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}
