//! Helpers shared by the tests that run `mp` as real processes.

use mp_store::Store;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    spawn_env(args, log, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_mp"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("MP_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Waits until proposal `pid` reaches one of `want`; fails after `within`.
pub async fn wait_status(
    store: &Store,
    pid: &str,
    want: &[&str],
    within: Duration,
) -> mp_store::ProposalRecord {
    let start = Instant::now();
    loop {
        let p = store.proposal(pid).await.unwrap();
        if want.contains(&p.status.as_str()) {
            return p;
        }
        assert!(
            start.elapsed() < within,
            "proposal {pid} stuck in {} ({}), wanted {want:?}",
            p.status,
            p.message
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
