//! The tonic services: thin shells that authenticate, validate, call the store and map errors.

use crate::views::{ModelView, ViewPool, ViewWaiters};
use crate::GatewayConfig;
use mp_proto::rle;
use mp_proto::v1::{self as pb};
use mp_store::{Expert, ProposalRecord, Role, Store, StoreError};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, instrument, warn};

/// The one mapping from store errors to gRPC statuses.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Redis(e) => Status::unavailable(format!("store unavailable: {e}")),
        StoreError::NotFound(m) => Status::not_found(m),
        StoreError::InvalidArgument(m) => Status::invalid_argument(m),
        StoreError::FailedPrecondition(m) => Status::failed_precondition(m),
        StoreError::ResourceExhausted(m) => Status::resource_exhausted(m),
        StoreError::Aborted(m) => Status::aborted(m),
        StoreError::PermissionDenied(m) => Status::permission_denied(m),
        StoreError::Unauthenticated(m) => Status::unauthenticated(m),
        StoreError::Unavailable(m) => Status::unavailable(m),
        StoreError::Corrupt(m) => Status::internal(format!("stored data is corrupt: {m}")),
    }
}

const MAX_ID_LEN: usize = 200;

/// Shared state behind every service.
#[derive(Clone)]
pub struct Gateway {
    store: Arc<tokio::sync::OnceCell<Store>>,
    pub config: Arc<GatewayConfig>,
    pub views: ViewPool,
    /// Experts waiting for views the workers compute.
    pub waiters: ViewWaiters,
    /// Whether a worker listened for view requests lately, and when that was checked.
    view_workers: Cached<bool>,
    project_cache: Cached<Arc<mp_store::ProjectInfo>>,
    auth: crate::auth::AuthCache,
    /// Open `WatchProposal` streams per expert.
    watches: Arc<Mutex<HashMap<String, usize>>>,
    /// Request tokens per expert, and when they were counted.
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

/// One open watch stream, counted while it lives.
struct WatchSlot {
    watches: Arc<Mutex<HashMap<String, usize>>>,
    expert: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watches.lock() {
            if let Some(n) = w.get_mut(&self.expert) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    w.remove(&self.expert);
                }
            }
        }
    }
}

/// A value and when it was read.
type Cached<T> = Arc<Mutex<Option<(Instant, T)>>>;

/// The cached value, if read less than `ttl` ago.
fn cached<T: Clone>(c: &Cached<T>, ttl: Duration) -> Option<T> {
    let c = c.lock().ok()?;
    c.as_ref()
        .filter(|(at, _)| at.elapsed() < ttl)
        .map(|(_, v)| v.clone())
}

fn remember<T>(c: &Cached<T>, v: T) {
    if let Ok(mut c) = c.lock() {
        *c = Some((Instant::now(), v));
    }
}

/// How long the gateway trusts its copy of the project record.
const PROJECT_CACHE_TTL: Duration = Duration::from_secs(5);

/// The longest a call over its expert's rate waits for its ResourceExhausted.
const TARPIT_MAX: Duration = Duration::from_secs(1);

/// A worker that read the view stream within this long counts as listening.
const VIEW_WORKER_SILENCE_MS: u64 = 2_000;

pub(crate) fn check_id(what: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "{what} must hold 1 to {MAX_ID_LEN} characters"
        )));
    }
    Ok(())
}

fn record(method: &'static str, started: Instant, code: tonic::Code) {
    metrics::counter!("mp_rpc_total", "method" => method, "code" => format!("{code:?}"))
        .increment(1);
    metrics::histogram!("mp_rpc_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}

pub(crate) fn observed<T>(
    method: &'static str,
    started: Instant,
    r: Result<T, Status>,
) -> Result<T, Status> {
    record(
        method,
        started,
        r.as_ref()
            .map(|_| tonic::Code::Ok)
            .unwrap_or_else(|s| s.code()),
    );
    r
}

impl Gateway {
    /// A place for one more watch stream of `expert`, or `ResourceExhausted` past
    /// `watches_per_expert` for it or `watches_total` on this gateway.
    fn watch_slot(&self, expert: &str) -> Result<WatchSlot, Status> {
        let mut w = self
            .watches
            .lock()
            .map_err(|_| Status::internal("watch table poisoned"))?;
        let total: usize = w.values().sum();
        let mine = w.get(expert).copied().unwrap_or(0);
        if mine >= self.config.watches_per_expert {
            return Err(Status::resource_exhausted(format!(
                "{mine} proposals watched at once already: at most {} per expert",
                self.config.watches_per_expert
            )));
        }
        if total >= self.config.watches_total {
            return Err(Status::resource_exhausted(format!(
                "this gateway serves {total} watch streams already: try again later"
            )));
        }
        *w.entry(expert.to_string()).or_default() += 1;
        Ok(WatchSlot {
            watches: self.watches.clone(),
            expert: expert.to_string(),
        })
    }

    pub fn new(config: GatewayConfig, views: ViewPool) -> Self {
        Gateway {
            store: Arc::new(tokio::sync::OnceCell::new()),
            config: Arc::new(config),
            views,
            waiters: ViewWaiters::default(),
            view_workers: Default::default(),
            project_cache: Default::default(),
            auth: Default::default(),
            watches: Default::default(),
            buckets: Default::default(),
        }
    }

    /// The store, once the first connection to Redis succeeded.
    pub fn store(&self) -> Result<&Store, Status> {
        self.store
            .get()
            .ok_or_else(|| Status::unavailable("store not connected yet"))
    }

    pub fn set_store(&self, store: Store) {
        if self.store.set(store.clone()).is_ok() {
            self.auth.follow(store.clone());
            if self.config.view_wait_ms > 0 {
                self.waiters.follow(store);
            }
        }
    }

    /// The expert behind the request's bearer token.
    pub async fn expert<T>(&self, req: &Request<T>) -> Result<Expert, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization metadata (Bearer token)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?
            .trim();
        let e = match self.auth.get(token) {
            Some(e) => e,
            None => {
                let epoch = self.auth.epoch();
                let e = self.store()?.authenticate(token).await.map_err(status)?;
                let _ = self.store()?.touch_online(&e.id).await;
                self.auth.put(token, &e, epoch);
                e
            }
        };
        if let Some(wait) = self.over_rate(&e)? {
            // Answered once the bucket would have a token again (at most TARPIT_MAX later),
            // not at once: a client that ignores ResourceExhausted and retries in a loop
            // spends its own time, not the gateway's and the other experts'.
            tokio::time::sleep(wait.min(TARPIT_MAX)).await;
            return Err(Status::resource_exhausted(format!(
                "more than {} requests a second: slow down",
                self.config.requests_per_expert_s
            )));
        }
        Ok(e)
    }

    /// Per-expert token bucket (`requests_per_expert_s`, bursts of twice that; 0: off;
    /// admins exempt): one expert cannot take the gateway from the others. `Some(wait)`
    /// when the expert is over its rate: the time until its bucket refills one token.
    fn over_rate(&self, e: &Expert) -> Result<Option<Duration>, Status> {
        let rate = self.config.requests_per_expert_s;
        if rate <= 0.0 || e.role == Role::Admin {
            return Ok(None);
        }
        let burst = 2.0 * rate;
        let mut b = self
            .buckets
            .lock()
            .map_err(|_| Status::internal("rate table poisoned"))?;
        let now = Instant::now();
        let (tokens, at) = b.entry(e.id.clone()).or_insert((burst, now));
        *tokens = (*tokens + rate * now.duration_since(*at).as_secs_f64()).min(burst);
        *at = now;
        if *tokens < 1.0 {
            // Refused calls run up a debt (at most TARPIT_MAX's worth): the more an expert
            // ignores the refusals, the longer its calls wait for them; one that slows
            // down is served again once the debt is paid.
            *tokens = (*tokens - 1.0).max(-rate * TARPIT_MAX.as_secs_f64());
            return Ok(Some(Duration::from_secs_f64((1.0 - *tokens) / rate)));
        }
        *tokens -= 1.0;
        Ok(None)
    }

    async fn admin<T>(&self, req: &Request<T>) -> Result<Expert, Status> {
        let e = self.expert(req).await?;
        if e.role != Role::Admin {
            return Err(Status::permission_denied("this call needs the admin role"));
        }
        Ok(e)
    }

    /// An expert sees a proposal (reads, watches, decides) only when it is its own; an admin
    /// sees all.
    fn owner_or_admin(e: &Expert, p: &ProposalRecord, what: &str) -> Result<(), Status> {
        if p.expert_id != e.id && e.role != Role::Admin {
            return Err(Status::permission_denied(format!(
                "only the expert who marked the image (or an admin) {what} proposal {}",
                p.id
            )));
        }
        Ok(())
    }

    /// An expert sees an image only while it holds its lease or once it has marked it, and
    /// never a held-out (val, test) image: their ids are guessable and carry labels. An admin
    /// sees all.
    async fn may_see_image(&self, e: &Expert, id: &str) -> Result<(), Status> {
        if e.role == Role::Admin {
            return Ok(());
        }
        if id.starts_with("val:") || id.starts_with("test:") {
            return Err(Status::permission_denied(format!(
                "image {id:?} is held out (val/test): admins only"
            )));
        }
        if !self.store()?.may_view(&e.id, id).await.map_err(status)? {
            return Err(Status::permission_denied(format!(
                "image {id:?}: an expert sees only the images it holds a lease on or has marked"
            )));
        }
        Ok(())
    }

    /// A view of a version other than the serving one: only of one of the
    /// `view_versions` newest (each other version would cost a model load).
    async fn check_view_version(&self, version: u64) -> Result<(), Status> {
        let newest = self.store()?.newest_version().await.map_err(status)?;
        let window = self.config.view_versions.max(1);
        if version > newest {
            return Err(Status::not_found(format!(
                "model version {version} does not exist"
            )));
        }
        if version + window <= newest {
            return Err(Status::failed_precondition(format!(
                "model version {version} is older than the {window} newest (newest {newest}); views are computed for those and the serving version only"
            )));
        }
        Ok(())
    }

    async fn model_view(
        &self,
        version: u64,
        image: mp_store::ImageRecord,
    ) -> Result<ModelView, Status> {
        let store = self.store()?;
        let images = store.image_store().await.map_err(status)?;
        match images.view(version, &image.id).await {
            Ok(Some(v)) if v.saliency.len() == (image.width * image.height) as usize => {
                return Ok(v)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(image = %image.id, error = %e, "stored view unreadable"),
        }
        if self.config.view_wait_ms > 0 && self.view_workers_listening().await {
            match self.view_from_workers(version, &image.id).await {
                Some(v) if v.saliency.len() == (image.width * image.height) as usize => {
                    return Ok(v)
                }
                _ => {
                    debug!(image = %image.id, version, "no worker served the view in time; computing it here")
                }
            }
        }
        let rec = store.version(version).await.map_err(status)?;
        let file = self.config.checkpoints.join(&rec.file);
        let id = image.id.clone();
        let view = self
            .views
            .view(version, file, image)
            .await
            .map_err(Status::internal)?;
        if let Err(e) = images.put_view(version, &id, &view).await {
            tracing::warn!(image = %id, error = %e, "view not stored");
        }
        Ok(view)
    }

    /// The project record, read from Redis at most every [`PROJECT_CACHE_TTL`] (it changes
    /// only when a project is initialised; every image view needs its class names).
    async fn project(&self) -> Result<Arc<mp_store::ProjectInfo>, Status> {
        if let Some(p) = cached(&self.project_cache, PROJECT_CACHE_TTL) {
            return Ok(p);
        }
        let p = Arc::new(
            self.store()?
                .project()
                .await
                .map_err(status)?
                .ok_or_else(|| Status::failed_precondition("no project loaded"))?,
        );
        remember(&self.project_cache, p.clone());
        Ok(p)
    }

    /// Whether some worker reads view requests (checked at most once a second).
    async fn view_workers_listening(&self) -> bool {
        if let Some(listening) = cached(&self.view_workers, Duration::from_secs(1)) {
            return listening;
        }
        let Ok(store) = self.store() else {
            return false;
        };
        let listening = store
            .view_workers(VIEW_WORKER_SILENCE_MS)
            .await
            .is_ok_and(|n| n > 0);
        remember(&self.view_workers, listening);
        listening
    }

    /// Asks the workers for a view (one request however many experts wait for it) and
    /// waits up to `view_wait_ms` for their announcement; `None` when none came.
    async fn view_from_workers(&self, version: u64, image: &str) -> Option<ModelView> {
        let store = self.store().ok()?;
        let images = store.image_store().await.ok()?;
        let (ready, first) = self.waiters.register(version, image);
        let answer = async {
            // Written between the miss and the registration?
            if let Ok(Some(v)) = images.view(version, image).await {
                return Some(v);
            }
            if first {
                if let Err(e) = store.request_view(version, image).await {
                    warn!(error = %e, "asking the workers for a view failed");
                    return None;
                }
            }
            let wait = Duration::from_millis(self.config.view_wait_ms);
            tokio::time::timeout(wait, ready).await.ok()?.ok()?;
            images.view(version, image).await.ok().flatten()
        }
        .await;
        self.waiters.forget(version, image);
        answer
    }
}

/// A stored suggestion as the API's: the mask (sign of each pixel's confidence) and the
/// confidence scaled to 0–255. `None` when it does not fit the image (a forged record, or an
/// image replaced since).
pub fn suggestion_to_pb(
    s: &mp_store::Suggestion,
    width: u32,
    height: u32,
) -> Option<pb::Suggestion> {
    if s.values.len() != width as usize * height as usize {
        return None;
    }
    let signs: Vec<i8> = s.values.iter().map(|v| v.signum()).collect();
    Some(pb::Suggestion {
        mask: Some(mp_proto::rle::encode(width, height, &signs)),
        confidence: s
            .values
            .iter()
            .map(|&v| ((v.unsigned_abs() as u32 * 255 + 63) / 127).min(255) as u8)
            .collect(),
        mode: s.mode.clone(),
        marks: s.marks,
    })
}

/// The agreement report of the project's images marked by several experts, with the
/// experts named.
pub async fn agreement_report(
    store: &Store,
) -> Result<mp_core::agreement::Report, mp_store::StoreError> {
    // Experts are shown by name; two of one name are told apart by their ids.
    let mut names = store.expert_names().await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for n in names.values() {
        *seen.entry(n.clone()).or_default() += 1;
    }
    for (id, n) in names.iter_mut() {
        if seen[n.as_str()] > 1 {
            *n = format!("{n}#{id}");
        }
    }
    let marks: Vec<mp_core::agreement::MarkInput> = store
        .marks_of_images_with(2)
        .await?
        .into_iter()
        .map(|m| mp_core::agreement::MarkInput {
            class: m.image_id.split('/').next().unwrap_or_default().to_string(),
            expert: names.get(&m.expert_id).cloned().unwrap_or(m.expert_id),
            image_id: m.image_id,
            time_ms: m.time_ms,
            values: m.values,
        })
        .collect();
    Ok(mp_core::agreement::report(&marks))
}

fn figures_to_pb(f: &mp_core::agreement::Figures) -> Option<pb::AgreementFigures> {
    Some(pb::AgreementFigures {
        red_iou: f.red_iou,
        green_iou: f.green_iou,
        kappa: f.kappa,
        n: f.n as u32,
    })
}

pub fn agreement_to_pb(overlap: u32, r: mp_core::agreement::Report) -> pb::AgreementReport {
    let keyed = |v: &[(String, mp_core::agreement::Figures)]| {
        v.iter()
            .map(|(k, f)| pb::KeyedAgreement {
                key: k.clone(),
                figures: figures_to_pb(f),
            })
            .collect()
    };
    let mut images = r.images.clone();
    images.sort_by(|a, b| {
        let key = |i: &mp_core::agreement::ImageAgreement| i.figures.kappa.unwrap_or(f64::MAX);
        key(a).total_cmp(&key(b))
    });
    pb::AgreementReport {
        overlap,
        overall: figures_to_pb(&r.overall),
        pairs: r
            .pairs
            .iter()
            .map(|((a, b), f)| pb::PairAgreement {
                expert_a: a.clone(),
                expert_b: b.clone(),
                figures: figures_to_pb(f),
            })
            .collect(),
        experts: keyed(&r.experts),
        classes: keyed(&r.classes),
        days: keyed(&r.days),
        images: images
            .iter()
            .map(|i| pb::ImageAgreement {
                image_id: i.image_id.clone(),
                class_name: i.class.clone(),
                experts: i.experts.clone(),
                day: i.day.clone(),
                figures: figures_to_pb(&i.figures),
            })
            .collect(),
    }
}

pub fn proposal_to_pb(p: &ProposalRecord) -> pb::Proposal {
    use pb::ProposalStatus as S;
    let status = match p.status.as_str() {
        "queued" => S::Queued,
        "running" => S::Running,
        "ready" => S::Ready,
        "committing" => S::Committing,
        "committed" => S::Committed,
        "rejected" => S::Rejected,
        "failed" => S::Failed,
        "rebasing" => S::Rebasing,
        "endorsed" => S::Endorsed,
        _ => S::Unspecified,
    };
    let mut out = pb::Proposal {
        proposal_id: p.id.clone(),
        mark_id: p.mark_id.clone(),
        image_id: p.image_id.clone(),
        expert_id: p.expert_id.clone(),
        status: status as i32,
        base_version: p.base_version,
        committed_version: p.committed_version,
        message: p.message.clone(),
        provisional: p.provisional,
        settled: p.settled,
        ..Default::default()
    };
    if let Some(r) = p
        .result
        .as_deref()
        .and_then(|s| serde_json::from_str::<mp_core::refine::ProposalReport>(s).ok())
    {
        out.width = r.width;
        out.height = r.height;
        (out.map_width, out.map_height) = r.map_size();
        out.saliency_before = r
            .proposal
            .saliency_before
            .into_iter()
            .next()
            .unwrap_or_default();
        out.saliency_after = r
            .proposal
            .saliency_after
            .into_iter()
            .next()
            .unwrap_or_default();
        out.val_loss_before = r.proposal.val_before.loss;
        out.val_loss_after = r.proposal.val_after.loss;
        out.val_accuracy_before = r.proposal.val_before.accuracy;
        out.val_accuracy_after = r.proposal.val_after.accuracy;
        out.stop_reason = format!("{:?}", r.proposal.stop);
        out.curve = r
            .proposal
            .curve
            .iter()
            .map(|c| pb::ImpactPoint {
                iteration: c.iteration as u32,
                share_red: c.share_red,
                share_green: c.share_green,
                saliency_loss: c.saliency_loss,
                ce: c.ce,
                val_loss: c.val_loss,
            })
            .collect();
    }
    out
}

fn version_to_pb(v: &mp_store::ModelVersionRecord) -> pb::ModelVersion {
    pb::ModelVersion {
        version: v.version,
        parent: v.parent,
        created_ms: v.created_ms,
        reason: v.reason.clone(),
        val_accuracy: v.val_accuracy,
        val_loss: v.val_loss,
        test_accuracy: v.test_accuracy,
    }
}

#[tonic::async_trait]
impl pb::queue_service_server::QueueService for Gateway {
    #[instrument(skip(self, req), fields(expert))]
    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            tracing::Span::current().record("expert", e.id.as_str());
            let grant = self
                .store()?
                .lease_limited(
                    &e.id,
                    self.config.lease_ttl_ms,
                    self.config.leases_per_expert,
                )
                .await
                .map_err(status)?;
            Ok(Response::new(match grant {
                Some(g) => pb::LeaseReply {
                    lease: Some(pb::Lease {
                        lease_id: g.lease_id,
                        image_id: g.image_id,
                        deadline_ms: g.deadline_ms,
                        lease_seq: g.seq,
                        model_version: g.model_version,
                        priority: g.priority,
                        width: g.width,
                        height: g.height,
                    }),
                    retry_after_ms: 0,
                },
                None => pb::LeaseReply {
                    lease: None,
                    retry_after_ms: 1000,
                },
            }))
        }
        .await;
        observed("lease", t, r)
    }

    #[instrument(skip(self, req), fields(expert))]
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            let id = &req.get_ref().lease_id;
            check_id("lease_id", id)?;
            let deadline = self
                .store()?
                .heartbeat(id, &e.id, self.config.lease_ttl_ms)
                .await
                .map_err(status)?;
            Ok(Response::new(pb::HeartbeatReply {
                deadline_ms: deadline,
            }))
        }
        .await;
        observed("heartbeat", t, r)
    }

    #[instrument(skip(self, req), fields(expert, lease))]
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            let body = req.get_ref();
            check_id("lease_id", &body.lease_id)?;
            tracing::Span::current().record("lease", body.lease_id.as_str());
            check_id("idempotency_key", &body.idempotency_key)?;
            let mask = body
                .mask
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("mask is required"))?;
            // The lease's owner and the mask's size against the leased image first, so that
            // nothing is decoded for a lease that is not the caller's or a size that cannot
            // fit; the submit script checks all again in the round trip that stores the mark.
            self.store()?
                .check_submit(
                    &body.lease_id,
                    &e.id,
                    &body.idempotency_key,
                    mask.width,
                    mask.height,
                )
                .await
                .map_err(status)?;
            let values = rle::decode(mask).map_err(|e| Status::invalid_argument(e.to_string()))?;
            if values.iter().all(|&v| v == 0) {
                return Err(Status::invalid_argument(
                    "mask marks no pixel; skip the image instead",
                ));
            }
            let r = self
                .store()?
                .submit(
                    &body.lease_id,
                    &e.id,
                    &body.idempotency_key,
                    mask.width,
                    mask.height,
                    &values,
                )
                .await
                .map_err(status)?;
            if !r.duplicate {
                debug!(expert = %e.id, image = %r.image_id, mark = %r.mark_id, "mark stored");
            }
            // With overlap, the mark that completes an image's set settles it (or sends it
            // to review) now; a crash before that is caught by the reaper's sweep.
            let mut settled_proposal_id = String::new();
            let mut in_review = false;
            if r.provisional {
                let store = self.store()?;
                let overlap = store.overlap().await.map_err(status)?;
                if r.marks_on_image >= u64::from(overlap) {
                    match crate::review::settle_or_review(store, &r.image_id)
                        .await
                        .map_err(status)?
                    {
                        crate::review::Outcome::Settled(s) => {
                            // The settled proposal goes to whoever completed the set.
                            if store
                                .proposal(&s.proposal_id)
                                .await
                                .is_ok_and(|p| p.expert_id == e.id)
                            {
                                settled_proposal_id = s.proposal_id;
                            }
                        }
                        crate::review::Outcome::InReview => in_review = true,
                        crate::review::Outcome::Waiting => {}
                    }
                }
            }
            Ok(Response::new(pb::SubmitReply {
                mark_id: r.mark_id,
                proposal_id: r.proposal_id,
                release_seq: r.release_seq,
                duplicate: r.duplicate,
                provisional: r.provisional,
                marks_on_image: r.marks_on_image.min(u64::from(u32::MAX)) as u32,
                settled_proposal_id,
                in_review,
            }))
        }
        .await;
        observed("submit", t, r)
    }

    #[instrument(skip(self, req), fields(expert))]
    async fn skip(&self, req: Request<pb::SkipRequest>) -> Result<Response<pb::SkipReply>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            check_id("lease_id", &req.get_ref().lease_id)?;
            let seq = self
                .store()?
                .skip(&req.get_ref().lease_id, &e.id)
                .await
                .map_err(status)?;
            Ok(Response::new(pb::SkipReply { release_seq: seq }))
        }
        .await;
        observed("skip", t, r)
    }

    async fn lease_review(
        &self,
        req: Request<pb::LeaseReviewRequest>,
    ) -> Result<Response<pb::LeaseReviewReply>, Status> {
        let t = Instant::now();
        let r = self.lease_review_rpc(&req).await;
        observed("lease_review", t, r)
    }

    async fn settle(
        &self,
        req: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleReply>, Status> {
        let t = Instant::now();
        let r = self.settle_rpc(&req).await;
        observed("settle", t, r)
    }
}

#[tonic::async_trait]
impl pb::image_service_server::ImageService for Gateway {
    #[instrument(skip(self, req))]
    async fn get_image(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::ImageView>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            let body = req.get_ref();
            check_id("image_id", &body.image_id)?;
            self.may_see_image(&e, &body.image_id).await?;
            let image = self.store()?.image(&body.image_id).await.map_err(status)?;
            let project = self.project().await?;
            let serving = self.store()?.serving_version().await.map_err(status)?;
            let version = match body.model_version {
                0 => serving,
                v => v,
            };
            if version != serving {
                self.check_view_version(version).await?;
            }
            let view = self.model_view(version, image.clone()).await?;
            // A suggestion is an extra: a damaged one is logged and left out, not an error.
            let suggestion = match self.store()?.suggestion(version, &image.id).await {
                Ok(s) => s.and_then(|s| suggestion_to_pb(&s, image.width, image.height)),
                Err(mp_store::StoreError::Corrupt(e)) => {
                    tracing::warn!(image = %image.id, version, error = %e, "unreadable suggestion ignored");
                    None
                }
                Err(e) => return Err(status(e)),
            };
            // Blind overlap: the suggester learnt from the marks, so an image that others
            // have marked already comes without one (it could echo their marks).
            let suggestion = match suggestion {
                Some(_) if self.store()?.marked_by_others(&image.id).await.map_err(status)? => {
                    None
                }
                s => s,
            };
            let prediction = view
                .probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0);
            let name = |i: u32| project.classes.get(i as usize).cloned().unwrap_or_default();
            Ok(Response::new(pb::ImageView {
                image_id: image.id.clone(),
                name: image.name.clone(),
                width: image.width,
                height: image.height,
                channels: image.channels,
                label: image.label,
                label_name: name(image.label),
                prediction,
                prediction_name: name(prediction),
                probabilities: view.probabilities,
                saliency: view.saliency,
                model_version: version,
                classes: project.classes.clone(),
                pixels: image.pixels,
                suggestion,
            }))
        }
        .await;
        observed("get_image", t, r)
    }
}

type ProposalStream = Pin<Box<dyn Stream<Item = Result<pb::Proposal, Status>> + Send>>;

fn terminal(s: &str) -> bool {
    matches!(s, "committed" | "rejected" | "failed" | "endorsed")
}

#[tonic::async_trait]
impl pb::proposal_service_server::ProposalService for Gateway {
    async fn get_proposal(
        &self,
        req: Request<pb::GetProposalRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            check_id("proposal_id", &req.get_ref().proposal_id)?;
            let p = self
                .store()?
                .proposal(&req.get_ref().proposal_id)
                .await
                .map_err(status)?;
            Self::owner_or_admin(&e, &p, "reads")?;
            Ok(Response::new(proposal_to_pb(&p)))
        }
        .await;
        observed("get_proposal", t, r)
    }

    type WatchProposalStream = ProposalStream;

    async fn watch_proposal(
        &self,
        req: Request<pb::GetProposalRequest>,
    ) -> Result<Response<ProposalStream>, Status> {
        let e = self.expert(&req).await?;
        let id = req.get_ref().proposal_id.clone();
        check_id("proposal_id", &id)?;
        // The bound first: a caller over it costs no Redis read.
        let slot = self.watch_slot(&e.id)?;
        let first = self.store()?.proposal(&id).await.map_err(status)?;
        Self::owner_or_admin(&e, &first, "watches")?;
        let store = self.store()?.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = (first.status.clone(), first.updated_ms);
            if tx.send(Ok(proposal_to_pb(&first))).await.is_err() || terminal(&first.status) {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(30 * 60);
            // Polls back off while nothing changes (100 ms doubling to 2 s), and start
            // fast again on a change.
            let mut pause = Duration::from_millis(100);
            while Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = tx.closed() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                match store.proposal(&id).await {
                    Ok(p) => {
                        if (p.status.clone(), p.updated_ms) != last {
                            pause = Duration::from_millis(100);
                            last = (p.status.clone(), p.updated_ms);
                            if tx.send(Ok(proposal_to_pb(&p))).await.is_err() || terminal(&p.status)
                            {
                                return;
                            }
                        }
                    }
                    Err(StoreError::Redis(e)) => {
                        warn!(proposal = %id, error = %e, "watch: store unavailable, retrying")
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn decide(
        &self,
        req: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        let t = Instant::now();
        let r = async {
            let e = self.expert(&req).await?;
            let body = req.get_ref();
            check_id("proposal_id", &body.proposal_id)?;
            let p = self
                .store()?
                .proposal(&body.proposal_id)
                .await
                .map_err(status)?;
            Self::owner_or_admin(&e, &p, "decides")?;
            let decision = pb::decide_request::Decision::try_from(body.decision).map_err(|_| {
                Status::invalid_argument(format!("unknown decision {}", body.decision))
            })?;
            let commit = match decision {
                pb::decide_request::Decision::Commit => true,
                pb::decide_request::Decision::Reject => false,
                pb::decide_request::Decision::Unspecified => {
                    return Err(Status::invalid_argument(
                        "decision must be COMMIT or REJECT",
                    ))
                }
            };
            // One script: the status check, the new status and the commit job together.
            self.store()?
                .decide(&p.id, &e.id, commit)
                .await
                .map_err(status)?;
            let p = self.store()?.proposal(&p.id).await.map_err(status)?;
            Ok(Response::new(proposal_to_pb(&p)))
        }
        .await;
        observed("decide", t, r)
    }
}

#[tonic::async_trait]
impl pb::model_service_server::ModelService for Gateway {
    async fn current_model(
        &self,
        req: Request<pb::CurrentModelRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        self.expert(&req).await?;
        let v = self.store()?.current_version().await.map_err(status)?;
        let rec = self.store()?.version(v).await.map_err(status)?;
        Ok(Response::new(version_to_pb(&rec)))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        self.expert(&req).await?;
        let v = self.store()?.versions().await.map_err(status)?;
        Ok(Response::new(pb::HistoryReply {
            versions: v.iter().map(version_to_pb).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::stats_service_server::StatsService for Gateway {
    async fn get_stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        let e = self.expert(&req).await?;
        let c = self.store()?.counts().await.map_err(status)?;
        // Other experts' names and counts are for admins; an expert sees its own, read
        // without fetching anyone's name.
        let per = match e.role {
            Role::Admin => self.store()?.marks_per_expert().await.map_err(status)?,
            Role::Expert | Role::Reviewer => {
                let counts = self.store()?.marks_counts().await.map_err(status)?;
                counts
                    .get(&e.id)
                    .map(|&n| (e.id.clone(), e.name.clone(), n))
                    .into_iter()
                    .collect()
            }
        };
        let versions = self.store()?.versions().await.map_err(status)?;
        let review = self.store()?.review_counts().await.map_err(status)?;
        let overlap = self.store()?.overlap().await.map_err(status)?;
        Ok(Response::new(pb::Stats {
            review_unsettled: review.unsettled,
            review_queued: review.queued,
            review_leased: review.leased,
            review_settled: review.settled,
            overlap,
            queue_depth: c.queue_depth,
            leases_out: c.leases_out,
            experts_online: c.experts_online,
            marks_total: c.marks_total,
            refine_jobs_pending: c.refine_pending,
            dead_jobs: c.dead_jobs,
            marks_per_expert: per
                .into_iter()
                .map(|(id, name, n)| pb::ExpertCount {
                    expert_id: id,
                    name,
                    marks: n,
                })
                .collect(),
            accuracy_history: versions.iter().map(version_to_pb).collect(),
            whoami: e.id,
        }))
    }

    async fn get_agreement(
        &self,
        req: Request<pb::AgreementRequest>,
    ) -> Result<Response<pb::AgreementReport>, Status> {
        self.admin(&req).await?;
        let store = self.store()?;
        let r = agreement_report(store).await.map_err(status)?;
        Ok(Response::new(agreement_to_pb(
            store.overlap().await.map_err(status)?,
            r,
        )))
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Gateway {
    async fn create_expert(
        &self,
        req: Request<pb::CreateExpertRequest>,
    ) -> Result<Response<pb::CreateExpertReply>, Status> {
        let by = self.admin(&req).await?;
        let body = req.get_ref();
        let role: Role = if body.role.is_empty() {
            Role::Expert
        } else {
            body.role.parse().map_err(status)?
        };
        let expires = match body.ttl_s {
            0 => None,
            t if t > 100 * 365 * 86_400 => {
                return Err(Status::invalid_argument("ttl_s: at most 100 years"))
            }
            t => Some(mp_store::now_ms() + t * 1000),
        };
        let (id, token) = self
            .store()?
            .create_expert_by(&body.name, role, expires, &by.id)
            .await
            .map_err(status)?;
        info!(expert = %id, name = %body.name, role = role.as_str(), "expert created");
        Ok(Response::new(pb::CreateExpertReply {
            expert_id: id,
            token,
        }))
    }

    async fn revoke_expert(
        &self,
        req: Request<pb::RevokeExpertRequest>,
    ) -> Result<Response<pb::RevokeExpertReply>, Status> {
        let e = self.admin(&req).await?;
        let id = &req.get_ref().expert_id;
        check_id("expert_id", id)?;
        if *id == e.id {
            return Err(Status::failed_precondition(
                "an admin cannot revoke its own token (another admin can)",
            ));
        }
        self.store()?
            .revoke_expert_by(id, &e.id)
            .await
            .map_err(status)?;
        // This gateway forgets at once, whatever its subscription's state.
        self.auth.invalidate();
        info!(expert = %id, by = %e.id, "token revoked");
        Ok(Response::new(pb::RevokeExpertReply {}))
    }

    async fn list_experts(
        &self,
        req: Request<pb::ListExpertsRequest>,
    ) -> Result<Response<pb::ListExpertsReply>, Status> {
        self.admin(&req).await?;
        let store = self.store()?;
        let marks = store.marks_counts().await.map_err(status)?;
        let experts = store.experts().await.map_err(status)?;
        Ok(Response::new(pb::ListExpertsReply {
            experts: experts
                .into_iter()
                .map(|e| pb::ExpertInfo {
                    marks: marks.get(&e.id).copied().unwrap_or(0),
                    expert_id: e.id,
                    name: e.name,
                    role: e.role.as_str().to_string(),
                    created_ms: e.created_ms,
                    expires_ms: e.expires_ms.unwrap_or(0),
                    revoked_ms: e.revoked_ms.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let e = self.admin(&req).await?;
        let v = req.get_ref().version;
        self.store()?.rollback_by(v, &e.id).await.map_err(status)?;
        info!(expert = %e.id, version = v, "rollback");
        let rec = self.store()?.version(v).await.map_err(status)?;
        Ok(Response::new(version_to_pb(&rec)))
    }

    async fn end_round(
        &self,
        req: Request<pb::EndRoundRequest>,
    ) -> Result<Response<pb::EndRoundReply>, Status> {
        let e = self.admin(&req).await?;
        self.store()?
            .request_round_end_by(&e.id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EndRoundReply {}))
    }

    async fn audit(
        &self,
        req: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditReport>, Status> {
        self.admin(&req).await?;
        let body = req.get_ref();
        let store = self.store()?;
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let filter = mp_store::AuditFilter {
            expert: opt(&body.expert),
            image: opt(&body.image_id),
            version: (body.version > 0).then_some(body.version),
            limit: match body.limit {
                0 => 1000,
                n => n.min(100_000) as usize,
            },
        };
        // One read of the trail: the records asked for, and every commit for the impact.
        let all = store.audit_all().await.map_err(status)?;
        let records = filter.apply(&all);
        let names = store.expert_names().await.map_err(status)?;
        let mut impact: std::collections::BTreeMap<String, (u32, f64)> = Default::default();
        for r in all.iter().filter(|r| r.kind == "commit") {
            let acc = |k: &str| r.fields.get(k).and_then(|v| v.parse::<f64>().ok());
            let e = impact.entry(r.who.clone()).or_default();
            e.0 += 1;
            if let (Some(a), Some(b)) = (acc("accuracy_before"), acc("accuracy_after")) {
                e.1 += b - a;
            }
        }
        Ok(Response::new(pb::AuditReport {
            records: records
                .into_iter()
                .map(|r| pb::AuditRecord {
                    id: r.id,
                    kind: r.kind,
                    who_name: names.get(&r.who).cloned().unwrap_or_default(),
                    who: r.who,
                    time_ms: r.time_ms,
                    fields: r.fields.into_iter().collect(),
                })
                .collect(),
            impact: impact
                .into_iter()
                .map(|(id, (commits, delta))| pb::ExpertImpact {
                    name: names.get(&id).cloned().unwrap_or_default(),
                    expert_id: id,
                    commits,
                    accuracy_delta: delta,
                })
                .collect(),
        }))
    }

    async fn dead_jobs(
        &self,
        req: Request<pb::DeadJobsRequest>,
    ) -> Result<Response<pb::DeadJobsReply>, Status> {
        self.admin(&req).await?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => (n as usize).min(1000),
        };
        let jobs = self.store()?.dead_jobs(limit).await.map_err(status)?;
        Ok(Response::new(pb::DeadJobsReply {
            jobs: jobs
                .into_iter()
                .map(|j| pb::DeadJob {
                    stream: j.stream,
                    job_id: j.job_id,
                    deliveries: j.deliveries,
                    error: j.error,
                    dead_ms: j.dead_ms,
                    fields: j.fields,
                })
                .collect(),
        }))
    }
}
