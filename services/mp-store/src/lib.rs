//! # Layout
//! The Redis data model of Machine Punishment (documented in ARCHITECTURE.md, "Redis data
//! model"): the review queue with exclusive leases ([`lua`] scripts run atomically in Redis),
//! durable marks with idempotency keys, experts and their hashed tokens, proposals, the job
//! streams for workers, model versions and the counters behind the stats.
//!
//! What this crate deliberately does not do: no gRPC, no tensors, no policy beyond the
//! invariants of the data (an image is leased to at most one expert; a mark is stored once
//! per idempotency key; a lease is acted on only by its owner).

mod audit;
mod experts;
pub mod images;
pub use audit::{AuditFilter, AuditRecord};
pub use images::{ImageStore, ModelView, Shape};
mod jobs;
pub mod lua;
mod marks;
pub use marks::{Suggestion, SUGGESTION_TTL_S};
mod project;
mod proposals;
mod queue;
mod review;
pub use review::{ReviewCounts, ReviewLease, Settled, DEFAULT_REVIEW_BELOW};
pub mod server;
mod versions;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A compare-and-set lost: the state moved underneath (a rollback during a commit).
    #[error("{0}")]
    Aborted(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Expert,
    /// An expert who also settles disagreeing marks (the review queue).
    Reviewer,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "expert" => Ok(Role::Expert),
            "reviewer" => Ok(Role::Reviewer),
            "admin" => Ok(Role::Admin),
            _ => Err(StoreError::InvalidArgument(format!(
                "role {s:?} is not expert, reviewer or admin"
            ))),
        }
    }
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Expert => "expert",
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expert {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    /// When its token stops working (Unix ms); `None`: until revoked.
    pub expires_ms: Option<u64>,
    /// When its token was revoked (Unix ms).
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectInfo {
    pub name: String,
    pub classes: Vec<String>,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    /// Where the pixels are (an [`ImageStore`] URL); every node opens it from here unless
    /// `MP_IMAGE_STORE` names another way to the same objects.
    #[serde(default)]
    pub image_store: String,
}

/// One image as stored: 8-bit pixels, row-major, channels interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub id: String,
    pub name: String,
    pub label: u32,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub pixels: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseGrant {
    pub lease_id: String,
    pub image_id: String,
    pub deadline_ms: u64,
    pub seq: u64,
    pub priority: f64,
    pub model_version: u64,
    /// The leased image's size, so that a client can size its mask without another call.
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseInfo {
    pub image_id: String,
    pub expert_id: String,
    /// active, submitted, skipped or expired.
    pub state: String,
    /// Position of the lease and of its release in the server's order of lease events
    /// (`release_seq` is 0 while active).
    pub seq: u64,
    pub release_seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubmitResult {
    pub mark_id: String,
    pub proposal_id: String,
    pub release_seq: u64,
    pub image_id: String,
    pub duplicate: bool,
    /// How many marks the image has with this one.
    pub marks_on_image: u64,
    /// With overlap > 1: the mark waits for settlement and its proposal cannot be committed.
    pub provisional: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MarkRecord {
    pub id: String,
    pub image_id: String,
    pub expert_id: String,
    pub time_ms: u64,
    pub model_version: u64,
    pub width: u32,
    pub height: u32,
    pub values: Vec<i8>,
    pub idempotency_key: String,
    pub proposal_id: String,
}

/// A proposal's record; `result` is the worker's JSON payload once ready.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProposalRecord {
    pub id: String,
    pub status: String,
    pub mark_id: String,
    pub image_id: String,
    pub expert_id: String,
    pub base_version: u64,
    pub committed_version: u64,
    pub message: String,
    pub result: Option<String>,
    pub updated_ms: u64,
    /// With overlap > 1, an expert's own mark's proposal: committing it endorses it.
    pub provisional: bool,
    /// The proposal of a settled mark.
    pub settled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersionRecord {
    pub version: u64,
    pub parent: u64,
    pub created_ms: u64,
    pub reason: String,
    /// NaN (stored as JSON null) when the model's outputs were not finite.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_accuracy: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// NaN for a project without a test split (stored as JSON null).
    #[serde(deserialize_with = "nan_if_null")]
    pub test_accuracy: f64,
    /// Checkpoint file name inside the shared checkpoint directory.
    pub file: String,
}

/// JSON has no NaN: serde_json writes it as `null`; read `null` back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl Job {
    fn from_stream_id(s: redis::streams::StreamId) -> Job {
        Job {
            id: s.id,
            fields: s
                .map
                .iter()
                .map(|(k, v)| (k.clone(), value_string(v)))
                .collect(),
        }
    }

    pub fn get(&self, k: &str) -> Result<&str> {
        self.fields
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| StoreError::Corrupt(format!("job {} lacks {k}", self.id)))
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Counts {
    pub queue_depth: u64,
    pub leases_out: u64,
    pub experts_online: u64,
    pub marks_total: u64,
    pub refine_pending: u64,
    /// Jobs given up on, in every stream's dead letters.
    pub dead_jobs: u64,
}

/// A job given up on: delivered more than the limit without being acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadJob {
    pub stream: String,
    pub job_id: String,
    pub deliveries: u64,
    pub error: String,
    pub dead_ms: u64,
    /// The job's own fields.
    pub fields: HashMap<String, String>,
}

/// Checks that a file name read back from Redis stays inside the directory it is joined to:
/// relative, made of plain components (no `..`, no root), of `[A-Za-z0-9._-]` and `/`, at
/// most 200 bytes. A forged record then cannot make a node read or write elsewhere.
pub fn check_relative_file(name: &str) -> Result<()> {
    use std::path::Component;
    let plain = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && std::path::Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        let head: String = name.chars().take(80).collect();
        Err(StoreError::InvalidArgument(format!(
            "{head:?} is not a plain file name inside the checkpoint directory"
        )))
    }
}

/// Checks an id minted by [`new_id`] (hex, 1 to 64 digits) before it becomes part of a path.
pub fn check_hex_id(what: &str, id: &str) -> Result<()> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        let head: String = id.chars().take(80).collect();
        Err(StoreError::InvalidArgument(format!(
            "{what} {head:?} is not an id of ours"
        )))
    }
}

/// Random identifier: 16 bytes as hex.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system random source");
    hex::encode(b)
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL_S: u64 = 7 * 24 * 3600;
/// Experts seen within this window count as online.
pub const ONLINE_WINDOW_MS: u64 = 60_000;
pub const REFINE_STREAM: &str = "jobs:refine";
pub const SCORE_STREAM: &str = "jobs:score";
pub const COMMIT_STREAM: &str = "jobs:commit";
/// Image views a gateway asked the workers for (one entry per missing view).
pub const VIEW_STREAM: &str = "jobs:view";
/// The streams whose jobs can be given up on (dead letters: `{stream}:dead`).
pub const JOB_STREAMS: [&str; 3] = [REFINE_STREAM, SCORE_STREAM, COMMIT_STREAM];
/// A job delivered this many times without being acknowledged is given up on.
pub const DEFAULT_MAX_DELIVERIES: u64 = 5;
/// The most experts one image may go to (project overlap).
pub const MAX_OVERLAP: u32 = 16;

struct Scripts {
    lease: redis::Script,
    heartbeat: redis::Script,
    skip: redis::Script,
    submit: redis::Script,
    reclaim: redis::Script,
    enqueue: redis::Script,
    may_view: redis::Script,
    decide: redis::Script,
    publish: redis::Script,
    dead_letter: redis::Script,
    import_mark: redis::Script,
    queue_review: redis::Script,
    lease_review: redis::Script,
    settle: redis::Script,
}

/// Every connection's timeouts and retries.
fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(2)
}

/// A handle on the store: cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    /// For the connections a multiplexed one cannot serve (subscriptions).
    client: redis::Client,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
    /// The project's image store, opened on first use (see [`Store::image_store`]).
    images: std::sync::Arc<tokio::sync::OnceCell<std::sync::Arc<ImageStore>>>,
}

pub(crate) fn lease_error(word: &str, lease: &str) -> StoreError {
    match word {
        "not_found" => StoreError::NotFound(format!("lease {lease} does not exist")),
        "not_owner" => {
            StoreError::PermissionDenied(format!("lease {lease} belongs to another expert"))
        }
        "expired" => StoreError::FailedPrecondition(format!(
            "lease {lease} expired; the image went back to the queue"
        )),
        "submitted" => {
            StoreError::FailedPrecondition(format!("lease {lease} was already submitted"))
        }
        "skipped" => StoreError::FailedPrecondition(format!("lease {lease} was skipped")),
        other => StoreError::Corrupt(format!("lease script answered {other:?}")),
    }
}

/// An image's metadata as Redis holds it; the pixels are filled in from the image store.
pub(crate) fn image_from_hash(id: &str, h: &HashMap<String, Vec<u8>>) -> Result<ImageRecord> {
    Ok(ImageRecord {
        id: id.to_string(),
        name: text(h, "name"),
        label: field(h, "label")?,
        width: field(h, "width")?,
        height: field(h, "height")?,
        channels: field(h, "channels")?,
        pixels: Vec::new(),
    })
}

/// `{'ok', n}` → n; `{error word}` → the lease error.
pub(crate) fn number_answer(v: &[redis::Value], lease_id: &str) -> Result<u64> {
    let words: Vec<String> = v.iter().map(value_string).collect();
    match words.first().map(String::as_str) {
        Some("ok") => Ok(words.get(1).and_then(|s| s.parse().ok()).unwrap_or(0)),
        Some(w) => Err(lease_error(w, lease_id)),
        None => Err(StoreError::Corrupt("empty script answer".into())),
    }
}

pub(crate) fn field<T: std::str::FromStr>(h: &HashMap<String, Vec<u8>>, k: &str) -> Result<T> {
    let raw = h
        .get(k)
        .ok_or_else(|| StoreError::Corrupt(format!("missing field {k}")))?;
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("field {k} unreadable")))
}

pub(crate) fn text(h: &HashMap<String, Vec<u8>>, k: &str) -> String {
    h.get(k)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

impl Store {
    /// Connects to `url` (redis://host:port); every key starts with `prefix:`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Store> {
        use redis::IntoConnectionInfo;
        // Requests are small and pipelined on one connection: without TCP_NODELAY, Nagle's
        // algorithm holds each one back until the previous reply's acknowledgement.
        let info = url
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info)?;
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
        Ok(Store {
            conn,
            client,
            prefix: prefix.to_string(),
            scripts: std::sync::Arc::new(Scripts {
                lease: lua::script(lua::LEASE),
                heartbeat: lua::script(lua::HEARTBEAT),
                skip: lua::script(lua::SKIP),
                submit: lua::script(lua::SUBMIT),
                reclaim: lua::script(lua::RECLAIM),
                enqueue: lua::script(lua::ENQUEUE),
                may_view: lua::script(lua::MAY_VIEW),
                decide: lua::script(lua::DECIDE),
                publish: lua::script(lua::PUBLISH),
                dead_letter: lua::script(lua::DEAD_LETTER),
                import_mark: lua::script(lua::IMPORT_MARK),
                queue_review: lua::script(lua::QUEUE_REVIEW),
                lease_review: lua::script(lua::LEASE_REVIEW),
                settle: lua::script(lua::SETTLE),
            }),
            images: Default::default(),
        })
    }

    /// A handle with a connection of its own to the same server (for blocking reads that
    /// must not hold up the shared one), sharing this handle's image store and its cache.
    pub async fn own_connection(&self) -> Result<Store> {
        Ok(Store {
            conn: ConnectionManager::new_with_config(self.client.clone(), manager_config()).await?,
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            scripts: self.scripts.clone(),
            images: self.images.clone(),
        })
    }

    fn k(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Turns on Redis's own latency monitor: from now on it records every event (a command,
    /// an AOF write or fsync, a fork…) that takes at least `threshold_ms`.
    pub async fn monitor_latency(&self, threshold_ms: u64) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("latency-monitor-threshold")
            .arg(threshold_ms)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// What the latency monitor recorded for one event (`aof-fsync-always`, `command`, …):
    /// for each second in which it happened, (unix time s, worst latency ms); oldest first.
    pub async fn latency_history(&self, event: &str) -> Result<Vec<(u64, u64)>> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("LATENCY")
            .arg("HISTORY")
            .arg(event)
            .query_async(&mut c)
            .await?)
    }
}

pub(crate) fn value_string(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        redis::Value::Double(d) => d.to_string(),
        redis::Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}
