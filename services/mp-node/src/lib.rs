//! # Layout
//! The compute nodes. Models live only here, each owned by one thread of an actix
//! `SyncArbiter` (a `tch::Tensor` is `Send`, not `Sync`); the async side of each node reads
//! jobs from Redis, fetches the data, sends one message per unit of work, writes results.
//! - [`data`]: stored images and marks → `mp-core` datasets and masks; checkpoint paths.
//! - [`worker`]: the `Worker` actor (`RefineProposal`, `ScoreImages`) and its dispatcher
//!   (consumer groups `refine` and `score`, XAUTOCLAIM of jobs of dead workers).
//! - [`trainer`]: the `TrainerCore` actor owning the current model, and the coordinator:
//!   rounds, commits with optimistic concurrency (rebase), guided training, versioned
//!   checkpoints, rollback.
//!
//! Deliberately absent: no gRPC API of its own (the gateway is the API; nodes only serve
//! health), no state outside Redis and the checkpoint directory.

pub mod data;
pub mod trainer;
pub mod worker;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Core(#[from] mp_core::CoreError),
    #[error(transparent)]
    Store(#[from] mp_store::StoreError),
    #[error("{0}")]
    Io(String),
    #[error("actor mailbox: {0}")]
    Mailbox(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<actix::MailboxError> for NodeError {
    fn from(e: actix::MailboxError) -> Self {
        NodeError::Mailbox(e.to_string())
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

impl NodeError {
    /// Whether the error is a full disk (or quota): a condition an operator clears, so the
    /// work is retried rather than given up on.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            NodeError::Core(mp_core::CoreError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.kind() == std::io::ErrorKind::QuotaExceeded
                    || source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }
}

/// Connects to Redis (retrying while it does not answer) and waits for a project to be
/// loaded; `None` if `stop` turned true first. Also makes sure the job groups exist.
pub async fn connect(
    url: &str,
    prefix: &str,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<(mp_store::Store, mp_store::ProjectInfo)>> {
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(500));
    let store = loop {
        match mp_store::Store::connect(url, prefix).await {
            Ok(s) => break s,
            Err(e) => tracing::warn!(error = %e, "redis not answering; retrying"),
        }
        if *stop.borrow() {
            return Ok(None);
        }
        pause().await;
    };
    loop {
        if let Some(p) = store.project().await? {
            store.ensure_job_groups().await?;
            return Ok(Some((store, p)));
        }
        if *stop.borrow() {
            return Ok(None);
        }
        pause().await;
    }
}

/// `ROLE-HOST-PID`: one consumer name per process, unique across pods (where every PID is
/// 1) and across machines — never a default shared by two processes.
pub fn consumer_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{role}-{host}-{}", std::process::id())
}

/// The exit status of a node that stopped on a panic (EX_SOFTWARE).
pub const PANIC_EXIT: i32 = 70;

/// Makes a panic on any thread of this process (an actor's: tch panics on CUDA out of memory,
/// for one) end the process with one clear log line and status [`PANIC_EXIT`], instead of
/// leaving a node whose actor is gone answering every job with a mailbox error while its
/// health says Serving. The jobs it held stay unacknowledged and go to the other nodes; its
/// supervisor (`mp up`, Kubernetes) starts it again.
pub fn exit_on_panic(role: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(
            role,
            thread,
            at,
            panic = %msg,
            "a {role} thread panicked: the process stops (status {PANIC_EXIT}); the jobs it held go to the other nodes"
        );
        std::process::exit(PANIC_EXIT);
    }));
}

/// Fault injection for the reliability tests: panics when `MP_FAILPOINTS` (names separated
/// by commas) holds `name`. Unset in production, where it costs one environment lookup.
pub fn failpoint(name: &str) {
    if let Ok(v) = std::env::var("MP_FAILPOINTS") {
        for f in v.split(',').map(str::trim) {
            if f == name {
                panic!("failpoint {name}");
            }
            if f.strip_suffix("=kill") == Some(name) {
                tracing::warn!(failpoint = name, "killing this process (SIGKILL)");
                // As `kill -9` from outside: no unwinding, no flushing, no clean-up.
                // SAFETY: kill(2) on our own pid with a constant signal has no memory effects.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
        }
    }
}

/// Sleeps `ms` milliseconds, or less if `stop` changes first (so a node shuts down
/// promptly from any of its waits).
pub async fn nap(stop: &mut tokio::sync::watch::Receiver<bool>, ms: u64) {
    tokio::select! {
        _ = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
        _ = stop.changed() => {}
    }
}

/// Health on `addr` (gRPC health protocol), Serving while `serving` says so.
pub async fn serve_health(
    addr: String,
    serving: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (reporter, svc) = tonic_health::server::health_reporter();
    let mut s = serving.clone();
    tokio::spawn(async move {
        loop {
            let st = if *s.borrow() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", st).await;
            if s.changed().await.is_err() {
                return;
            }
        }
    });
    let Ok(listener) = tokio::net::TcpListener::bind(&addr).await else {
        tracing::warn!(%addr, "health port unavailable");
        return;
    };
    let _ = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = stop.changed().await;
            },
        )
        .await;
}
