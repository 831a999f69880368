//! # Layout
//! The Redis data model of Machine Punishment (documented in ARCHITECTURE.md, "Redis data
//! model"): the review queue with exclusive leases ([`lua`] scripts run atomically in Redis),
//! durable marks with idempotency keys, experts and their hashed tokens, proposals, the job
//! streams for workers, model versions and the counters behind the stats.
//!
//! What this crate deliberately does not do: no gRPC, no tensors, no policy beyond the
//! invariants of the data (an image is leased to at most one expert; a mark is stored once
//! per idempotency key; a lease is acted on only by its owner).

pub mod lua;
pub mod server;

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
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Expert,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "expert" => Ok(Role::Expert),
            "admin" => Ok(Role::Admin),
            _ => Err(StoreError::InvalidArgument(format!(
                "role {s:?} is not expert or admin"
            ))),
        }
    }
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Expert => "expert",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expert {
    pub id: String,
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectInfo {
    pub name: String,
    pub classes: Vec<String>,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersionRecord {
    pub version: u64,
    pub parent: u64,
    pub created_ms: u64,
    pub reason: String,
    pub val_accuracy: f64,
    pub val_loss: f64,
    pub test_accuracy: f64,
    /// Checkpoint file name inside the shared checkpoint directory.
    pub file: String,
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

struct Scripts {
    lease: redis::Script,
    heartbeat: redis::Script,
    skip: redis::Script,
    submit: redis::Script,
    reclaim: redis::Script,
    enqueue: redis::Script,
}

/// A handle on the store: cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
}

fn lease_error(word: &str, lease: &str) -> StoreError {
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

fn image_from_hash(id: &str, h: &HashMap<String, Vec<u8>>) -> Result<ImageRecord> {
    Ok(ImageRecord {
        id: id.to_string(),
        name: text(h, "name"),
        label: field(h, "label")?,
        width: field(h, "width")?,
        height: field(h, "height")?,
        channels: field(h, "channels")?,
        pixels: h.get("pixels").cloned().unwrap_or_default(),
    })
}

/// `{'ok', n}` → n; `{error word}` → the lease error.
fn number_answer(v: &[redis::Value], lease_id: &str) -> Result<u64> {
    let words: Vec<String> = v.iter().map(value_string).collect();
    match words.first().map(String::as_str) {
        Some("ok") => Ok(words.get(1).and_then(|s| s.parse().ok()).unwrap_or(0)),
        Some(w) => Err(lease_error(w, lease_id)),
        None => Err(StoreError::Corrupt("empty script answer".into())),
    }
}

fn field<T: std::str::FromStr>(h: &HashMap<String, Vec<u8>>, k: &str) -> Result<T> {
    let raw = h
        .get(k)
        .ok_or_else(|| StoreError::Corrupt(format!("missing field {k}")))?;
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("field {k} unreadable")))
}

fn text(h: &HashMap<String, Vec<u8>>, k: &str) -> String {
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
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Store {
            conn,
            prefix: prefix.to_string(),
            scripts: std::sync::Arc::new(Scripts {
                lease: lua::script(lua::LEASE),
                heartbeat: lua::script(lua::HEARTBEAT),
                skip: lua::script(lua::SKIP),
                submit: lua::script(lua::SUBMIT),
                reclaim: lua::script(lua::RECLAIM),
                enqueue: lua::script(lua::ENQUEUE),
            }),
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

    // ------------------------------------------------------------ project and images

    pub async fn set_project(&self, info: &ProjectInfo) -> Result<()> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(info).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _: () = c.set(self.k("project"), json).await?;
        Ok(())
    }

    pub async fn project(&self) -> Result<Option<ProjectInfo>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(self.k("project")).await?;
        v.map(|s| {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("project: {e}")))
        })
        .transpose()
    }

    /// Stores training images (the ones that can be queued) in pipelined batches.
    pub async fn put_images(&self, images: &[ImageRecord]) -> Result<()> {
        self.put_split(images, "images").await
    }

    /// Stores images of a held-out split (`val`, `test`): never queued, used by workers and
    /// the trainer for the validation guard and for reporting.
    pub async fn put_held_out(&self, split: &str, images: &[ImageRecord]) -> Result<()> {
        self.put_split(images, &format!("split:{split}")).await
    }

    async fn put_split(&self, images: &[ImageRecord], set: &str) -> Result<()> {
        let mut c = self.conn.clone();
        for chunk in images.chunks(500) {
            let mut pipe = redis::pipe();
            for im in chunk {
                pipe.hset_multiple(
                    self.k(&format!("img:{}", im.id)),
                    &[
                        ("name", im.name.as_bytes().to_vec()),
                        ("label", im.label.to_string().into_bytes()),
                        ("width", im.width.to_string().into_bytes()),
                        ("height", im.height.to_string().into_bytes()),
                        ("channels", im.channels.to_string().into_bytes()),
                        ("pixels", im.pixels.clone()),
                    ],
                )
                .ignore();
                pipe.sadd(self.k(set), &im.id).ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        Ok(())
    }

    pub async fn image(&self, id: &str) -> Result<ImageRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("img:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("image {id:?} does not exist")));
        }
        image_from_hash(id, &h)
    }

    pub async fn image_ids(&self) -> Result<Vec<String>> {
        self.members("images").await
    }

    /// Ids of a held-out split, sorted.
    pub async fn held_out_ids(&self, split: &str) -> Result<Vec<String>> {
        self.members(&format!("split:{split}")).await
    }

    async fn members(&self, set: &str) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = c.smembers(self.k(set)).await?;
        v.sort();
        Ok(v)
    }

    /// Many images at once (pipelined); unknown ids are an error.
    pub async fn images(&self, ids: &[String]) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut c = self.conn.clone();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(self.k(&format!("img:{id}")));
            }
            let hs: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(&mut c).await?;
            for (id, h) in chunk.iter().zip(hs) {
                if h.is_empty() {
                    return Err(StoreError::NotFound(format!("image {id:?} does not exist")));
                }
                out.push(image_from_hash(id, &h)?);
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ queue

    /// Queues (or re-prioritises) images that are neither leased nor marked.
    pub async fn enqueue(&self, items: &[(String, f64)]) -> Result<u64> {
        let mut c = self.conn.clone();
        let mut total = 0u64;
        for chunk in items.chunks(1000) {
            let mut inv = self.scripts.enqueue.prepare_invoke();
            inv.arg(&self.prefix);
            for (id, p) in chunk {
                inv.arg(id).arg(*p);
            }
            let r: (String, u64) = inv.invoke_async(&mut c).await?;
            total += r.1;
        }
        Ok(total)
    }

    /// Claims the lowest-priority image for `expert` for `ttl_ms`; `None` when the queue is empty.
    pub async fn lease(&self, expert: &str, ttl_ms: u64) -> Result<Option<LeaseGrant>> {
        let mut c = self.conn.clone();
        let lease_id = new_id();
        let v: Vec<redis::Value> = self
            .scripts
            .lease
            .arg(&self.prefix)
            .arg(&lease_id)
            .arg(expert)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") if words.len() == 8 => Ok(Some(LeaseGrant {
                lease_id,
                image_id: words[1].clone(),
                priority: words[2].parse().unwrap_or(0.0),
                deadline_ms: words[3].parse().unwrap_or(0),
                seq: words[4].parse().unwrap_or(0),
                model_version: words[5].parse().unwrap_or(0),
                width: words[6].parse().unwrap_or(0),
                height: words[7].parse().unwrap_or(0),
            })),
            Some("empty") => Ok(None),
            other => Err(StoreError::Corrupt(format!(
                "lease script answered {other:?}"
            ))),
        }
    }

    pub async fn heartbeat(&self, lease_id: &str, expert: &str, ttl_ms: u64) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .heartbeat
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        number_answer(&v, lease_id)
    }

    pub async fn skip(&self, lease_id: &str, expert: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .skip
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .invoke_async(&mut c)
            .await?;
        number_answer(&v, lease_id)
    }

    /// What a lease refers to (any state), or NotFound.
    pub async fn lease_info(&self, lease_id: &str) -> Result<LeaseInfo> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("lease:{lease_id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!(
                "lease {lease_id} does not exist"
            )));
        }
        Ok(LeaseInfo {
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            state: text(&h, "state"),
            seq: field(&h, "seq").unwrap_or(0),
            release_seq: field(&h, "release_seq").unwrap_or(0),
        })
    }

    /// Stores `values` (one per pixel, row-major) as the mark for the leased image, atomically
    /// with the lease release, the queued proposal and its refine job. A repeat of
    /// `idempotency_key` by the same expert returns the first result and stores nothing.
    pub async fn submit(
        &self,
        lease_id: &str,
        expert: &str,
        idempotency_key: &str,
        width: u32,
        height: u32,
        values: &[i8],
    ) -> Result<SubmitResult> {
        if idempotency_key.is_empty() || idempotency_key.len() > 128 {
            return Err(StoreError::InvalidArgument(
                "idempotency_key must hold 1 to 128 characters".into(),
            ));
        }
        let mut c = self.conn.clone();
        let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        let v: Vec<redis::Value> = self
            .scripts
            .submit
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .arg(idempotency_key)
            .arg(new_id())
            .arg(new_id())
            .arg(width)
            .arg(height)
            .arg(bytes)
            .arg(IDEMPOTENCY_TTL_S)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some(w @ ("ok" | "dup")) if words.len() == 5 => Ok(SubmitResult {
                mark_id: words[1].clone(),
                proposal_id: words[2].clone(),
                release_seq: words[3].parse().unwrap_or(0),
                image_id: words[4].clone(),
                duplicate: w == "dup",
            }),
            Some("bad_size") if words.len() == 4 => Err(StoreError::InvalidArgument(format!(
                "mask is {width}x{height} but image {} is {}x{}",
                words[1], words[2], words[3]
            ))),
            Some(w) => Err(lease_error(w, lease_id)),
            None => Err(StoreError::Corrupt("empty submit answer".into())),
        }
    }

    /// Returns expired leases to the queue; how many.
    pub async fn reclaim(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let r: (String, u64) = self
            .scripts
            .reclaim
            .arg(&self.prefix)
            .invoke_async(&mut c)
            .await?;
        Ok(r.1)
    }

    // ------------------------------------------------------------ marks

    pub async fn mark(&self, id: &str) -> Result<MarkRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("mark:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("mark {id} does not exist")));
        }
        Ok(MarkRecord {
            id: id.to_string(),
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            time_ms: field(&h, "time_ms")?,
            model_version: field(&h, "model_version")?,
            width: field(&h, "width")?,
            height: field(&h, "height")?,
            values: h
                .get("mask")
                .map(|b| b.iter().map(|&x| x as i8).collect())
                .unwrap_or_default(),
            idempotency_key: text(&h, "idempotency_key"),
            proposal_id: text(&h, "proposal"),
        })
    }

    /// Every mark id, in the order marks were stored.
    pub async fn mark_ids(&self) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        Ok(c.lrange(self.k("marks"), 0, -1).await?)
    }

    // ------------------------------------------------------------ experts

    /// Creates an expert; returns (id, token). Only the token's SHA-256 is stored.
    pub async fn create_expert(&self, name: &str, role: Role) -> Result<(String, String)> {
        if name.trim().is_empty() || name.len() > 100 {
            return Err(StoreError::InvalidArgument(
                "expert name must hold 1 to 100 characters".into(),
            ));
        }
        let id = new_id()[..12].to_string();
        let token = format!("mp_{}{}", new_id(), new_id());
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.k(&format!("expert:{id}")),
                &[
                    ("name", name),
                    ("role", role.as_str()),
                    ("created_ms", &now_ms().to_string()),
                ],
            )
            .ignore()
            .set(self.k(&format!("token:{}", hash_token(&token))), &id)
            .ignore()
            .sadd(self.k("experts"), &id)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok((id, token))
    }

    pub async fn expert(&self, id: &str) -> Result<Expert> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("expert:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("expert {id} does not exist")));
        }
        Ok(Expert {
            id: id.to_string(),
            name: text(&h, "name"),
            role: text(&h, "role").parse()?,
        })
    }

    /// The expert a bearer token belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Expert> {
        if token.is_empty() || token.len() > 200 {
            return Err(StoreError::Unauthenticated(
                "missing or malformed token".into(),
            ));
        }
        let mut c = self.conn.clone();
        let id: Option<String> = c
            .get(self.k(&format!("token:{}", hash_token(token))))
            .await?;
        let id = id.ok_or_else(|| StoreError::Unauthenticated("unknown token".into()))?;
        self.expert(&id).await
    }

    pub async fn touch_online(&self, expert: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.zadd(self.k("online"), expert, now_ms()).await?;
        Ok(())
    }

    /// (expert id, name, marks) for every expert with marks.
    pub async fn marks_per_expert(&self) -> Result<Vec<(String, String, u64)>> {
        let mut c = self.conn.clone();
        let h: HashMap<String, u64> = c.hgetall(self.k("marks_per_expert")).await?;
        let mut out = Vec::new();
        for (id, n) in h {
            let name = self.expert(&id).await.map(|e| e.name).unwrap_or_default();
            out.push((id, name, n));
        }
        out.sort();
        Ok(out)
    }

    // ------------------------------------------------------------ proposals

    pub async fn proposal(&self, id: &str) -> Result<ProposalRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("proposal:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!(
                "proposal {id} does not exist"
            )));
        }
        Ok(ProposalRecord {
            id: id.to_string(),
            status: text(&h, "status"),
            mark_id: text(&h, "mark"),
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            base_version: field(&h, "base_version").unwrap_or(0),
            committed_version: field(&h, "committed_version").unwrap_or(0),
            message: text(&h, "message"),
            result: h
                .get("result")
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            updated_ms: field(&h, "updated_ms").unwrap_or(0),
        })
    }

    /// Sets a proposal's status and extra fields (e.g. `result`, `message`).
    pub async fn update_proposal(
        &self,
        id: &str,
        status: &str,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let mut c = self.conn.clone();
        let key = self.k(&format!("proposal:{id}"));
        let exists: bool = c.exists(&key).await?;
        if !exists {
            return Err(StoreError::NotFound(format!(
                "proposal {id} does not exist"
            )));
        }
        let mut items: Vec<(&str, String)> = vec![
            ("status", status.to_string()),
            ("updated_ms", now_ms().to_string()),
        ];
        items.extend(fields.iter().cloned());
        let _: () = c.hset_multiple(&key, &items).await?;
        Ok(())
    }

    // ------------------------------------------------------------ models

    pub async fn current_version(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Option<u64> = c.get(self.k("model:current")).await?;
        Ok(v.unwrap_or(0))
    }

    /// The version frozen for the current round: leases, scores and image views use it.
    /// Falls back to the current version.
    pub async fn serving_version(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Option<u64> = c.get(self.k("model:serving")).await?;
        match v {
            Some(v) => Ok(v),
            None => self.current_version().await,
        }
    }

    /// Starts a round on `version`.
    pub async fn set_serving_version(&self, version: u64) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("model:serving"), version).await?;
        Ok(())
    }

    /// Makes an existing version current and serving (rollback).
    pub async fn rollback(&self, version: u64) -> Result<()> {
        self.version(version).await?;
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(self.k("model:current"), version)
            .ignore()
            .set(self.k("model:serving"), version)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Asks the trainer to end the intervention round.
    pub async fn request_round_end(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("round:end"), now_ms()).await?;
        Ok(())
    }

    /// Records a version and makes it current.
    pub async fn publish_version(&self, rec: &ModelVersionRecord) -> Result<()> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.k("model:versions"), rec.version, json)
            .ignore()
            .set(self.k("model:current"), rec.version)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    pub async fn versions(&self) -> Result<Vec<ModelVersionRecord>> {
        let mut c = self.conn.clone();
        let h: HashMap<u64, String> = c.hgetall(self.k("model:versions")).await?;
        let mut v: Vec<ModelVersionRecord> = h
            .into_values()
            .map(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| StoreError::Corrupt(format!("model version: {e}")))
            })
            .collect::<Result<_>>()?;
        v.sort_by_key(|r| r.version);
        Ok(v)
    }

    pub async fn version(&self, version: u64) -> Result<ModelVersionRecord> {
        let mut c = self.conn.clone();
        let s: Option<String> = c.hget(self.k("model:versions"), version).await?;
        let s = s.ok_or_else(|| {
            StoreError::NotFound(format!("model version {version} does not exist"))
        })?;
        serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("model version: {e}")))
    }

    // ------------------------------------------------------------ guidance

    /// Adds a committed mark to the guidance set (once).
    pub async fn add_guidance(&self, mark_id: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let added: u64 = c.sadd(self.k("guidance:set"), mark_id).await?;
        if added == 1 {
            let _: () = c.rpush(self.k("guidance"), mark_id).await?;
        }
        Ok(added == 1)
    }

    /// Committed marks, in commit order.
    pub async fn guidance_marks(&self) -> Result<Vec<MarkRecord>> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.lrange(self.k("guidance"), 0, -1).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.mark(&id).await?);
        }
        Ok(out)
    }

    // ------------------------------------------------------------ jobs and stats

    /// Appends a job to a stream (`jobs:refine`, `jobs:score`, `jobs:commit`).
    pub async fn add_job(&self, stream: &str, fields: &[(&str, String)]) -> Result<String> {
        let mut c = self.conn.clone();
        Ok(c.xadd(self.k(stream), "*", fields).await?)
    }

    /// New jobs for `consumer` of `group`, waiting up to `block_ms`.
    pub async fn read_jobs(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block_ms: usize,
    ) -> Result<Vec<Job>> {
        let mut c = self.conn.clone();
        let opts = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count)
            .block(block_ms);
        let r: Option<redis::streams::StreamReadReply> =
            c.xread_options(&[self.k(stream)], &[">"], &opts).await?;
        Ok(r.map(|r| {
            r.keys
                .into_iter()
                .flat_map(|k| k.ids)
                .map(Job::from_stream_id)
                .collect()
        })
        .unwrap_or_default())
    }

    /// Takes over jobs delivered to a consumer that has been silent for `min_idle_ms`
    /// (a worker that died mid-job).
    pub async fn reclaim_jobs(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Job>> {
        let mut c = self.conn.clone();
        let r: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(self.k(stream))
            .arg(group)
            .arg(consumer)
            .arg(min_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        if let redis::Value::Array(parts) = r {
            if let Some(redis::Value::Array(entries)) = parts.get(1) {
                for e in entries {
                    if let redis::Value::Array(pair) = e {
                        if let (Some(id), Some(redis::Value::Array(kv))) =
                            (pair.first(), pair.get(1))
                        {
                            let mut fields = HashMap::new();
                            for ch in kv.chunks(2) {
                                if let [k, v] = ch {
                                    fields.insert(value_string(k), value_string(v));
                                }
                            }
                            out.push(Job {
                                id: value_string(id),
                                fields,
                            });
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    pub async fn ack(&self, stream: &str, group: &str, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: u64 = c.xack(self.k(stream), group, &[id]).await?;
        Ok(())
    }

    /// Creates the job streams and their consumer groups if missing.
    pub async fn ensure_job_groups(&self) -> Result<()> {
        let mut c = self.conn.clone();
        for (stream, group) in [
            (REFINE_STREAM, "refine"),
            (SCORE_STREAM, "score"),
            (COMMIT_STREAM, "commit"),
        ] {
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.k(stream))
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut c)
                .await;
            if let Err(e) = r {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    pub async fn counts(&self) -> Result<Counts> {
        let mut c = self.conn.clone();
        let since = now_ms().saturating_sub(ONLINE_WINDOW_MS);
        let (queue_depth, leases_out, experts_online, marks_total): (u64, u64, u64, u64) =
            redis::pipe()
                .zcard(self.k("queue"))
                .zcard(self.k("leases"))
                .zcount(self.k("online"), since, "+inf")
                .llen(self.k("marks"))
                .query_async(&mut c)
                .await?;
        let refine_pending = self
            .stream_backlog(REFINE_STREAM, "refine")
            .await
            .unwrap_or(0);
        Ok(Counts {
            queue_depth,
            leases_out,
            experts_online,
            marks_total,
            refine_pending,
        })
    }

    /// Entries not yet delivered plus delivered but unacknowledged, for a stream's group.
    pub async fn stream_backlog(&self, stream: &str, group: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.k(stream))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        for g in groups {
            if g.get("name").map(value_string).as_deref() == Some(group) {
                let num = |k: &str| {
                    g.get(k)
                        .map(value_string)
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                return Ok(num("lag") + num("pending"));
            }
        }
        Ok(0)
    }
}

fn value_string(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        redis::Value::Double(d) => d.to_string(),
        redis::Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}
