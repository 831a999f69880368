//! The saliency / refinement worker pool: `Worker` actors in a `SyncArbiter`, one model cache
//! per thread, fed by a dispatcher that reads the `refine` and `score` consumer groups.

use crate::data::{
    checkpoint_path, dataset_from_records, load_split, mask_of, proposal_file, write_atomic,
};
use crate::{NodeError, Result};
use actix::prelude::*;
use mp_core::align::{
    attention_share, confidence_ranks, margin_score, priority, AlignConfig, HumanPrior, Ordering,
};
use mp_core::data::{Dataset, Mask, GREEN, RED};
use mp_core::model::Model;
use mp_core::refine::{refine, Proposal, ProposalReport, RefineConfig};
use mp_core::saliency::probabilities_and_maps;
use mp_core::suggest::{FitReport, Propagation, SuggestConfig, Suggester};
use mp_store::{Job, ProjectInfo, Store, Suggestion, REFINE_STREAM, SCORE_STREAM, VIEW_STREAM};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tch::Device;
use tracing::{info, warn};

/// Run the thesis refinement loop for one marked image on a model version.
#[derive(Message)]
#[rtype(result = "Result<Proposal, NodeError>")]
pub struct RefineProposal {
    pub version: u64,
    pub checkpoint: PathBuf,
    pub batch: Dataset,
    pub val: Arc<Dataset>,
    pub cfg: RefineConfig,
}

/// Priorities of images under a model version (lower = reviewed first) and their
/// suggested marks.
#[derive(Message)]
#[rtype(result = "Result<Scored, NodeError>")]
pub struct ScoreImages {
    pub version: u64,
    pub checkpoint: PathBuf,
    pub images: Dataset,
    pub prior: Option<Arc<HumanPrior>>,
    /// The committed marks (their images with the marks), and a key that changes with them:
    /// what the suggester learns from.
    pub marked: Option<(u64, Arc<Dataset>)>,
    /// The suggester the trainer fitted for this pass (a file in the checkpoint directory):
    /// used instead of fitting one here when it was fitted for this worker's propagation.
    pub shared: Option<PathBuf>,
    pub propagation: Propagation,
    pub suggest: SuggestConfig,
    pub ordering: Ordering,
    /// Share of images given a random priority (exploration; alignment and attention orderings).
    pub exploration: f64,
    pub seed: u64,
}

/// What scoring found: a priority per image and, once marks exist, a suggested mark per
/// image (signed confidence, +127 red … −127 green) with the fit that chose the mode.
#[derive(Debug)]
pub struct Scored {
    pub priorities: Vec<f64>,
    /// Each image's view (probabilities, normalised saliency), stored for the gateway.
    pub views: Vec<mp_store::ModelView>,
    pub suggestions: Vec<Option<Vec<i8>>>,
    pub fit: Option<FitReport>,
}

/// Image views (probabilities, normalised saliency of the image's label) under a model
/// version, for images a gateway asked for: the expert is waiting.
#[derive(Message)]
#[rtype(result = "Result<Vec<mp_store::ModelView>, NodeError>")]
pub struct ComputeViews {
    pub version: u64,
    pub checkpoint: PathBuf,
    pub images: Dataset,
}

/// One thread's worker: its own libtorch thread setting, model cache and suggester.
pub struct Worker {
    models: VecDeque<(u64, Model)>,
    cache: usize,
    device: Device,
    /// The suggester of key `.0`: "marks:N" (fitted here on N marks) or "file:F" (the
    /// trainer's, loaded from F).
    suggester: Option<(String, Suggester, FitReport)>,
}

impl Worker {
    pub fn new(device: Device, cache: usize) -> Self {
        tch::set_num_threads(1);
        Worker {
            models: VecDeque::new(),
            cache: cache.max(1),
            device,
            suggester: None,
        }
    }

    /// The suggester for the marks of `key`, fitted (with its cross-validated mode choice)
    /// when the marks changed.
    fn suggester(
        &mut self,
        key: u64,
        marked: &Dataset,
        propagation: Propagation,
        cfg: &SuggestConfig,
    ) -> Result<Option<(&Suggester, &FitReport)>> {
        let key = format!("marks:{key}");
        if self.suggester.as_ref().is_none_or(|(k, _, _)| *k != key) {
            let idx: Vec<usize> = (0..marked.len()).collect();
            self.suggester = mp_core::suggest::fit(propagation, marked, &idx, cfg, self.device)?
                .map(|(s, r)| (key, s, r));
            if let Some((_, _, r)) = &self.suggester {
                info!(marks = marked.len(), choice = %r.summary(), "suggester fitted");
            }
        }
        Ok(self.suggester.as_ref().map(|(_, s, r)| (s, r)))
    }

    /// The trainer's suggester from `file`, if it was fitted for `propagation`; `Ok(false)`
    /// when it was not (this worker then fits its own).
    fn load_suggester(&mut self, file: &std::path::Path, propagation: Propagation) -> Result<bool> {
        let key = format!("file:{}", file.display());
        if self.suggester.as_ref().is_some_and(|(k, _, _)| *k == key) {
            return Ok(true);
        }
        let bytes =
            std::fs::read(file).map_err(|e| NodeError::Io(format!("{}: {e}", file.display())))?;
        let (s, r) = Suggester::from_bytes(&bytes, self.device)?;
        if r.requested != propagation {
            return Ok(false);
        }
        info!(file = %file.display(), choice = %r.summary(), "suggester loaded");
        self.suggester = Some((key, s, r));
        Ok(true)
    }

    fn model(&mut self, version: u64, path: &std::path::Path) -> Result<&Model> {
        if let Some(i) = self.models.iter().position(|(v, _)| *v == version) {
            let m = self.models.remove(i).expect("index in range");
            self.models.push_front(m);
        } else {
            let m = Model::load(path, self.device)?;
            self.models.push_front((version, m));
            self.models.truncate(self.cache);
        }
        Ok(&self.models[0].1)
    }
}

impl Actor for Worker {
    type Context = SyncContext<Self>;
}

impl Handler<ComputeViews> for Worker {
    type Result = Result<Vec<mp_store::ModelView>, NodeError>;

    fn handle(&mut self, msg: ComputeViews, _: &mut SyncContext<Self>) -> Self::Result {
        let model = self.model(msg.version, &msg.checkpoint)?;
        let ds = &msg.images;
        let idx: Vec<usize> = (0..ds.len()).collect();
        let mut views = Vec::with_capacity(ds.len());
        for chunk in idx.chunks(64) {
            let (x, y) = ds.batch(chunk, model.device());
            let (probs, maps) = probabilities_and_maps(model, &x, &y)?;
            views.extend(
                probs
                    .into_iter()
                    .zip(&maps)
                    .map(|(p, m)| mp_store::ModelView {
                        saliency: mp_core::render::normalise(m),
                        probabilities: p,
                    }),
            );
        }
        Ok(views)
    }
}

impl Handler<RefineProposal> for Worker {
    type Result = Result<Proposal, NodeError>;

    fn handle(&mut self, msg: RefineProposal, _: &mut SyncContext<Self>) -> Self::Result {
        crate::failpoint("refine");
        let model = self.model(msg.version, &msg.checkpoint)?;
        Ok(refine(model, &msg.batch, &msg.val, &msg.cfg)?)
    }
}

/// Suggestion weights in [−1, 1] as signed bytes; a suggested pixel never rounds to 0.
pub fn quantise(w: &[f32]) -> Vec<i8> {
    w.iter()
        .map(|&v| {
            if v == 0.0 || !v.is_finite() {
                0
            } else {
                let q = (v.clamp(-1.0, 1.0) * 127.0).round() as i8;
                if q == 0 {
                    v.signum() as i8
                } else {
                    q
                }
            }
        })
        .collect()
}

fn sign_mask(width: usize, height: usize, q: &[i8]) -> Mask {
    Mask {
        width,
        height,
        values: q
            .iter()
            .map(|&v| match v.signum() {
                1 => RED,
                -1 => GREEN,
                _ => 0,
            })
            .collect(),
    }
}

impl Handler<ScoreImages> for Worker {
    type Result = Result<Scored, NodeError>;

    fn handle(&mut self, msg: ScoreImages, _: &mut SyncContext<Self>) -> Self::Result {
        // Load the trainer's suggester, else fit (or reuse) one here — before the model:
        // it needs `&mut self`, the model `&self`.
        let shared = match &msg.shared {
            Some(file) if msg.propagation != Propagation::Off => {
                match self.load_suggester(file, msg.propagation) {
                    Ok(used) => used,
                    Err(e) => {
                        warn!(file = %file.display(), error = %e, "the trainer's suggester is unreadable; fitting one here");
                        false
                    }
                }
            }
            _ => false,
        };
        let fit = if shared {
            self.suggester.as_ref().map(|(_, _, r)| r.clone())
        } else {
            match &msg.marked {
                Some((key, marked)) => self
                    .suggester(*key, marked, msg.propagation, &msg.suggest)?
                    .map(|(_, r)| r.clone()),
                None => None,
            }
        };
        self.model(msg.version, &msg.checkpoint)?;
        let model = &self.models[0].1;
        let suggester = self
            .suggester
            .as_ref()
            .filter(|_| fit.is_some())
            .map(|(_, s, _)| s);
        let ds = &msg.images;
        let mut rng = mp_core::rng::Rng::new(msg.seed);
        let cfg = AlignConfig::default();
        let hw = ds.width * ds.height;
        let mut priorities = Vec::with_capacity(ds.len());
        let mut suggestions = Vec::with_capacity(ds.len());
        let mut views = Vec::with_capacity(ds.len());
        let idx: Vec<usize> = (0..ds.len()).collect();
        // The `attention` ordering's cold start needs the whole pass: (position, label,
        // confidence) of the images without a suggestion, ranked per class at the end.
        let mut cold: Vec<(usize, i64, f64)> = Vec::new();
        for chunk in idx.chunks(64) {
            let (x, y) = ds.batch(chunk, model.device());
            let (probs, maps) = probabilities_and_maps(model, &x, &y)?;
            let weights = match suggester {
                Some(s) => Some(
                    Vec::<f32>::try_from(&s.weights(&x)?.flatten(0, -1).to_device(Device::Cpu))
                        .map_err(mp_core::CoreError::from)?,
                ),
                None => None,
            };
            for ((k, &i), p) in chunk.iter().enumerate().zip(probs) {
                let q = weights.as_ref().map(|w| quantise(&w[k * hw..(k + 1) * hw]));
                let suggested = q.as_ref().map(|q| sign_mask(ds.width, ds.height, q));
                let score = match msg.ordering {
                    Ordering::Random => 2.0 * rng.next_f64() - 1.0,
                    Ordering::Margin => margin_score(&p),
                    Ordering::Alignment | Ordering::Attention
                        if rng.next_f64() < msg.exploration =>
                    {
                        2.0 * rng.next_f64() - 1.0
                    }
                    Ordering::Attention => {
                        match q
                            .as_ref()
                            .and_then(|q| attention_share(&maps[k], ds.width, q))
                        {
                            Some(a) => a,
                            None => {
                                let label = ds.labels[i];
                                let conf = p.get(label as usize).map_or(f64::NAN, |&c| c as f64);
                                cold.push((priorities.len(), label, conf));
                                0.0 // replaced below
                            }
                        }
                    }
                    Ordering::Alignment => {
                        priority(
                            &maps[k],
                            &p,
                            ds.labels[i] as usize,
                            None,
                            suggested.as_ref(),
                            msg.prior.as_deref(),
                            &cfg,
                        )
                        .score
                    }
                };
                priorities.push(score);
                suggestions.push(q);
                views.push(mp_store::ModelView {
                    saliency: mp_core::render::normalise(&maps[k]),
                    probabilities: p,
                });
            }
        }
        if !cold.is_empty() {
            let conf: Vec<f64> = cold.iter().map(|c| c.2).collect();
            let labels: Vec<i64> = cold.iter().map(|c| c.1).collect();
            for (&(at, _, _), r) in cold.iter().zip(confidence_ranks(&conf, &labels)) {
                priorities[at] = r;
            }
        }
        Ok(Scored {
            priorities,
            views,
            suggestions,
            fit,
        })
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub redis_url: String,
    pub prefix: String,
    pub checkpoints: PathBuf,
    /// Worker threads (one model each).
    pub threads: usize,
    /// Consumer name in the groups; unique per process.
    pub consumer: String,
    /// Jobs silent this long on another consumer are taken over.
    pub claim_idle_ms: u64,
    /// A job delivered this many times without being acknowledged is given up on.
    pub max_deliveries: u64,
    pub refine: RefineConfig,
    /// How the review queue is ordered (attention by default).
    pub ordering: Ordering,
    pub exploration: f64,
    /// How suggested marks are made from the committed marks.
    pub propagation: Propagation,
    pub suggest: SuggestConfig,
    pub device: Device,
    pub health_listen: String,
    /// Largest batch of image views computed at once for waiting experts (0: this worker
    /// serves no view requests).
    pub view_batch: usize,
}

/// The largest view batch by device: 4 on a CPU (the cost per view is flat there, so a big
/// batch only makes its first experts wait for its last: BENCHMARKS.md, "Image views"), 32
/// on a GPU (where a batch costs little more than one view).
pub fn default_view_batch(device: Device) -> usize {
    if device.is_cuda() {
        32
    } else {
        4
    }
}

/// A view request older than this is dropped: its expert was served by the gateway.
const VIEW_REQUEST_MAX_AGE_MS: u64 = 30_000;

/// `worker-HOST-PID`: unique across pods (where every PID is 1) and processes.
pub fn default_consumer() -> String {
    crate::consumer_name("worker")
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            prefix: "mp".into(),
            checkpoints: PathBuf::from("checkpoints"),
            threads: 1,
            consumer: default_consumer(),
            claim_idle_ms: 30_000,
            max_deliveries: mp_store::DEFAULT_MAX_DELIVERIES,
            refine: RefineConfig::default(),
            ordering: Ordering::Attention,
            exploration: 0.05,
            propagation: Propagation::Auto,
            suggest: SuggestConfig::default(),
            device: mp_core::device::auto(),
            health_listen: String::new(),
            view_batch: default_view_batch(mp_core::device::auto()),
        }
    }
}

struct Ctx {
    store: Store,
    cfg: WorkerConfig,
    project: ProjectInfo,
    val: Arc<Dataset>,
    addr: Addr<Worker>,
    prior: tokio::sync::Mutex<(usize, Option<Arc<HumanPrior>>)>,
    /// The committed marks as a dataset, rebuilt when their number changed.
    marked: tokio::sync::Mutex<(usize, Option<Arc<Dataset>>)>,
}

impl Ctx {
    async fn checkpoint(&self, version: u64) -> Result<PathBuf> {
        Ok(checkpoint_path(
            &self.cfg.checkpoints,
            &self.store.version(version).await?,
        ))
    }

    /// The human prior from every stored mark, rebuilt when the number of marks changed.
    async fn prior(&self) -> Result<Option<Arc<HumanPrior>>> {
        let ids = self.store.mark_ids().await?;
        let mut cached = self.prior.lock().await;
        if cached.0 == ids.len() {
            return Ok(cached.1.clone());
        }
        let mut prior = HumanPrior::new(
            self.project.classes.len(),
            self.project.width as usize,
            self.project.height as usize,
        );
        for id in &ids {
            let m = self.store.mark(id).await?;
            let label = self.store.image_meta(&m.image_id).await?.label as usize;
            prior.add(label, &mask_of(&m)?)?;
        }
        let p = (!prior.is_empty()).then(|| Arc::new(prior));
        *cached = (ids.len(), p.clone());
        Ok(p)
    }

    /// The committed marks (the guidance set) with their images, for the suggester; the key
    /// is their number (the guidance set only grows).
    async fn marked(&self) -> Result<Option<(u64, Arc<Dataset>)>> {
        let marks = self.store.guidance_marks().await?;
        let mut cached = self.marked.lock().await;
        if cached.0 != marks.len() {
            let ids: Vec<String> = marks.iter().map(|m| m.image_id.clone()).collect();
            let records = crate::data::images_skipping_bad(&self.store, &ids).await?;
            let mut ds = dataset_from_records(&records, &self.project)?;
            let by_image: HashMap<&str, &mp_store::MarkRecord> =
                marks.iter().map(|m| (m.image_id.as_str(), m)).collect();
            for (i, r) in records.iter().enumerate() {
                ds.marks[i] = Some(mask_of(by_image[r.id.as_str()])?);
            }
            *cached = (marks.len(), (!ds.is_empty()).then(|| Arc::new(ds)));
        }
        Ok(cached.1.clone().map(|d| (cached.0 as u64, d)))
    }

    async fn refine_job(&self, job: &Job) -> Result<()> {
        let pid = job.get("proposal")?.to_string();
        let p = self.store.proposal(&pid).await?;
        if !matches!(p.status.as_str(), "queued" | "running") {
            return Ok(()); // done before (a redelivered job)
        }
        self.store
            .update_proposal(&pid, "running", &[("worker", self.cfg.consumer.clone())])
            .await?;
        let result = async {
            let mark = self.store.mark(job.get("mark")?).await?;
            let image = self.store.image(job.get("image")?).await?;
            let version: u64 = job
                .get("base_version")?
                .parse()
                .map_err(|_| NodeError::Invalid("base_version".into()))?;
            let mut batch = dataset_from_records(std::slice::from_ref(&image), &self.project)?;
            batch.marks[0] = Some(mask_of(&mark)?);
            let checkpoint = self.checkpoint(version).await?;
            let proposal = self
                .addr
                .send(RefineProposal {
                    version,
                    checkpoint,
                    batch,
                    val: self.val.clone(),
                    cfg: self.cfg.refine.clone(),
                })
                .await??;
            Ok::<_, NodeError>((proposal, image))
        }
        .await;
        match result {
            Ok((proposal, image)) => {
                let file = proposal_file(&pid)?;
                write_atomic(&self.cfg.checkpoints.join(&file), &proposal.weights).await?;
                let report =
                    ProposalReport::bounded(image.width, image.height, proposal, &self.cfg.refine);
                let json = serde_json::to_string(&report)
                    .map_err(|e| NodeError::Invalid(e.to_string()))?;
                self.store
                    .update_proposal(&pid, "ready", &[("result", json), ("weights", file)])
                    .await?;
                info!(proposal = %pid, iterations = report.proposal.iterations, ms = report.proposal.elapsed_ms, "proposal ready");
            }
            // Redis or the image store unreachable: the job stays pending and is retried.
            Err(NodeError::Store(
                e @ (mp_store::StoreError::Redis(_) | mp_store::StoreError::Unavailable(_)),
            )) => return Err(e.into()),
            Err(e) => {
                warn!(proposal = %pid, error = %e, "refinement failed");
                self.store
                    .update_proposal(&pid, "failed", &[("message", e.to_string())])
                    .await?;
            }
        }
        Ok(())
    }

    /// View requests as one batch per version (dynamic batching: whatever arrived while the
    /// previous batch was computed), on the view thread; each view is stored, then announced.
    /// Uses `store`, a connection of the view loop's own, so that no other job's blocking
    /// read delays an expert's view.
    async fn view_jobs(&self, store: &Store, addr: &Addr<Worker>, jobs: &[Job]) -> Result<usize> {
        let now = mp_store::now_ms();
        let mut by_version: HashMap<u64, Vec<String>> = HashMap::new();
        for j in jobs {
            let fresh = j
                .fields
                .get("t")
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|t| now.saturating_sub(t) < VIEW_REQUEST_MAX_AGE_MS);
            let (Ok(v), Ok(id)) = (j.get("version"), j.get("image")) else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            let ids = by_version.entry(v).or_default();
            if fresh && !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
        }
        let images = store.image_store().await?;
        let mut served = 0;
        for (version, ids) in by_version {
            // Another worker (or the scoring pass) may have written some meanwhile.
            let mut missing = Vec::new();
            for id in ids {
                if !matches!(images.view(version, &id).await, Ok(Some(_))) {
                    missing.push(id);
                }
            }
            let records = crate::data::images_skipping_bad(store, &missing).await?;
            if records.is_empty() {
                continue;
            }
            let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
            let ds = dataset_from_records(&records, &self.project)?;
            let checkpoint = checkpoint_path(&self.cfg.checkpoints, &store.version(version).await?);
            let views = addr
                .send(ComputeViews {
                    version,
                    checkpoint,
                    images: ds,
                })
                .await??;
            let items: Vec<(&str, &mp_store::ModelView)> =
                ids.iter().copied().zip(&views).collect();
            images.put_views(version, &items).await?;
            store.views_ready(version, &ids).await?;
            served += ids.len();
        }
        Ok(served)
    }

    /// Score jobs of one version (and one suggester) merged into one batch (dynamic batching
    /// across jobs).
    async fn score_jobs(&self, jobs: &[Job]) -> Result<()> {
        let mut by_pass: HashMap<(u64, Option<String>), Vec<String>> = HashMap::new();
        for j in jobs {
            let v: u64 = j
                .get("version")?
                .parse()
                .map_err(|_| NodeError::Invalid("version".into()))?;
            let ids = j.fields.get("images").map(String::as_str).unwrap_or("");
            let ids: Vec<String> = if ids.is_empty() {
                self.store.image_ids().await?
            } else {
                ids.split(' ').map(String::from).collect()
            };
            // A suggester file is named by the trainer, relative to the checkpoint directory;
            // anything else is ignored.
            let shared = j
                .fields
                .get("suggester")
                .filter(|f| {
                    f.starts_with("suggesters/") && mp_store::check_relative_file(f).is_ok()
                })
                .cloned();
            by_pass.entry((v, shared)).or_default().extend(ids);
        }
        let prior = self.prior().await?;
        // Read (when they changed) even with the trainer's suggester: a worker whose
        // propagation differs from the trainer's fits its own.
        let marked = self.marked().await?;
        for ((version, shared), ids) in by_pass {
            let records = crate::data::images_skipping_bad(&self.store, &ids).await?;
            if records.is_empty() {
                continue;
            }
            // The images that could be read, in the order they are scored.
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            let images = dataset_from_records(&records, &self.project)?;
            let checkpoint = self.checkpoint(version).await?;
            let seed = mp_store::now_ms();
            let scored = self
                .addr
                .send(ScoreImages {
                    version,
                    checkpoint,
                    images,
                    prior: prior.clone(),
                    marked: marked.clone(),
                    shared: shared.map(|f| self.cfg.checkpoints.join(f)),
                    propagation: self.cfg.propagation,
                    suggest: self.cfg.suggest.clone(),
                    ordering: self.cfg.ordering,
                    exploration: self.cfg.exploration,
                    seed,
                })
                .await??;
            // Views and suggestions first: an image must not be leased before they are there.
            let views: Vec<(&str, &mp_store::ModelView)> =
                ids.iter().map(String::as_str).zip(&scored.views).collect();
            self.store
                .image_store()
                .await?
                .put_views(version, &views)
                .await?;
            let written: Vec<&str> = views.iter().map(|(id, _)| *id).collect();
            self.store.views_ready(version, &written).await?;
            if let Some(fit) = &scored.fit {
                let items: Vec<(String, Suggestion)> = ids
                    .iter()
                    .zip(&scored.suggestions)
                    .filter_map(|(id, q)| {
                        q.as_ref().map(|q| {
                            (
                                id.clone(),
                                Suggestion {
                                    mode: fit.chosen.name().to_string(),
                                    marks: fit.marks as u32,
                                    values: q.clone(),
                                },
                            )
                        })
                    })
                    .collect();
                self.store.put_suggestions(version, &items).await?;
            }
            let items: Vec<(String, f64)> = ids.into_iter().zip(scored.priorities).collect();
            let n = self.store.enqueue(&items).await?;
            info!(
                version,
                scored = items.len(),
                queued = n,
                suggestions = scored.fit.is_some(),
                "scored"
            );
        }
        Ok(())
    }
}

/// Serves the gateway's view requests until `stop`: reads whatever requests are waiting (up
/// to `view_batch`), computes them as one batch on a thread of their own (so that no score
/// batch or refinement makes an expert wait), stores and announces the views.
async fn serve_views(
    ctx: Arc<Ctx>,
    addr: Addr<Worker>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Same pixels as the other jobs: the image store (and its cache) is shared.
    let store = loop {
        match ctx.store.own_connection().await {
            Ok(s) => break s,
            Err(e) => {
                warn!(error = %e, "view loop: connecting failed");
                crate::nap(&mut stop, 1000).await;
                if *stop.borrow() {
                    return;
                }
            }
        }
    };
    info!(batch = ctx.cfg.view_batch, "serving view requests");
    let mut said = std::time::Instant::now() - Duration::from_secs(60);
    while !*stop.borrow() {
        if said.elapsed() > Duration::from_millis(500) {
            said = std::time::Instant::now();
            if let Err(e) = store.view_worker_alive(&ctx.cfg.consumer).await {
                warn!(error = %e, "announcing the view loop failed");
            }
        }
        let jobs = match store
            .read_jobs(
                VIEW_STREAM,
                "view",
                &ctx.cfg.consumer,
                ctx.cfg.view_batch,
                100,
            )
            .await
        {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "reading view requests failed");
                crate::nap(&mut stop, 500).await;
                continue;
            }
        };
        if jobs.is_empty() {
            continue;
        }
        let t = std::time::Instant::now();
        match ctx.view_jobs(&store, &addr, &jobs).await {
            Ok(n) => info!(
                requests = jobs.len(),
                computed = n,
                ms = t.elapsed().as_millis() as u64,
                "views computed"
            ),
            Err(e) => warn!(error = %e, "view requests failed; the gateway computes them"),
        }
        // At most once: a request that failed is served by the gateway after its wait.
        for j in &jobs {
            let _ = store.ack(VIEW_STREAM, "view", &j.id).await;
        }
    }
}

/// Runs the pool until `stop` turns true. Call inside an actix `System`.
pub async fn run(cfg: WorkerConfig, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    let Some((store, project)) = crate::connect(&cfg.redis_url, &cfg.prefix, &stop).await? else {
        return Ok(());
    };
    // The whole val split: proposals report their figures on it, like model versions
    // (the per-iteration guard uses the first `refine.val_images`).
    let val = Arc::new(load_split(&store, &project, "val", None).await?);
    let (device, threads) = (cfg.device, cfg.threads.max(1));
    let addr = SyncArbiter::start(threads, move || Worker::new(device, 3));
    let (health_tx, health_rx) = tokio::sync::watch::channel(true);
    if !cfg.health_listen.is_empty() {
        tokio::spawn(crate::serve_health(
            cfg.health_listen.clone(),
            health_rx,
            stop.clone(),
        ));
    }
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        cfg: cfg.clone(),
        project,
        val,
        addr,
        prior: tokio::sync::Mutex::new((usize::MAX, None)),
        marked: tokio::sync::Mutex::new((usize::MAX, None)),
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(threads));
    let mut tasks = tokio::task::JoinSet::new();
    if cfg.view_batch > 0 {
        // A thread of its own (and a model cache of its own) for the views.
        let views = SyncArbiter::start(1, move || Worker::new(device, 2));
        tasks.spawn(serve_views(ctx.clone(), views, stop.clone()));
    }
    info!(consumer = %cfg.consumer, threads, "worker pool started");
    let mut last_claim = std::time::Instant::now() - Duration::from_secs(3600);
    let mut last_touch = std::time::Instant::now();
    // Jobs this pool is working on, by stream: kept fresh (their idle time reset) so that a
    // long batch is not taken over as if this worker had died, and never taken over by
    // this pool itself.
    let inflight: Arc<std::sync::Mutex<HashMap<&'static str, HashSet<String>>>> =
        Default::default();
    while !*stop.borrow() {
        while tasks.try_join_next().is_some() {}
        if last_touch.elapsed() > Duration::from_millis((cfg.claim_idle_ms / 3).clamp(100, 10_000))
        {
            last_touch = std::time::Instant::now();
            let held: Vec<(&'static str, Vec<String>)> = inflight
                .lock()
                .expect("inflight lock")
                .iter()
                .map(|(s, ids)| (*s, ids.iter().cloned().collect()))
                .collect();
            for (stream, ids) in held {
                let group = if stream == REFINE_STREAM {
                    "refine"
                } else {
                    "score"
                };
                if let Err(e) = store.touch_jobs(stream, group, &cfg.consumer, &ids).await {
                    warn!(error = %e, "keeping jobs claimed failed");
                }
            }
        }
        let mut jobs: Vec<(&'static str, Job)> = Vec::new();
        if last_claim.elapsed() > Duration::from_millis((cfg.claim_idle_ms / 2).clamp(200, 5000)) {
            last_claim = std::time::Instant::now();
            for (stream, group) in [(REFINE_STREAM, "refine"), (SCORE_STREAM, "score")] {
                match store
                    .reclaim_jobs(
                        stream,
                        group,
                        &cfg.consumer,
                        cfg.claim_idle_ms,
                        8,
                        cfg.max_deliveries,
                    )
                    .await
                {
                    Ok(v) => {
                        let mine = inflight.lock().expect("inflight lock");
                        let v: Vec<Job> = v
                            .into_iter()
                            .filter(|j| !mine.get(stream).is_some_and(|s| s.contains(&j.id)))
                            .collect();
                        drop(mine);
                        if !v.is_empty() {
                            info!(stream, n = v.len(), "took over jobs of a silent worker");
                        }
                        jobs.extend(v.into_iter().map(|j| (stream, j)));
                    }
                    Err(e) => warn!(error = %e, "reclaim failed"),
                }
            }
        }
        let free = permits.available_permits();
        if free > 0 {
            match store
                .read_jobs(REFINE_STREAM, "refine", &cfg.consumer, free, 200)
                .await
            {
                Ok(v) => jobs.extend(v.into_iter().map(|j| (REFINE_STREAM, j))),
                Err(e) => {
                    let _ = health_tx.send(false);
                    warn!(error = %e, "reading refine jobs failed");
                    crate::nap(&mut stop, 500).await;
                    continue;
                }
            }
            let _ = health_tx.send(true);
            if let Ok(v) = store
                .read_jobs(SCORE_STREAM, "score", &cfg.consumer, 16, 1)
                .await
            {
                jobs.extend(v.into_iter().map(|j| (SCORE_STREAM, j)));
            }
        } else {
            crate::nap(&mut stop, 50).await;
        }
        {
            let mut mine = inflight.lock().expect("inflight lock");
            for (s, j) in &jobs {
                mine.entry(*s).or_default().insert(j.id.clone());
            }
        }
        let done = |stream: &'static str, ids: Vec<String>| {
            let inflight = inflight.clone();
            move || {
                if let Some(s) = inflight.lock().expect("inflight lock").get_mut(stream) {
                    for id in &ids {
                        s.remove(id);
                    }
                }
            }
        };
        let (refines, scores): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|(s, _)| *s == REFINE_STREAM);
        if !scores.is_empty() {
            let ctx = ctx.clone();
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
            let release = done(
                SCORE_STREAM,
                scores.iter().map(|(_, j)| j.id.clone()).collect(),
            );
            tasks.spawn(async move {
                let jobs: Vec<Job> = scores.into_iter().map(|(_, j)| j).collect();
                match ctx.score_jobs(&jobs).await {
                    Ok(()) => {
                        for j in &jobs {
                            let _ = ctx.store.ack(SCORE_STREAM, "score", &j.id).await;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "score jobs failed; they will be retried");
                        for j in &jobs {
                            let _ = ctx
                                .store
                                .note_job_error(SCORE_STREAM, &j.id, &e.to_string())
                                .await;
                        }
                    }
                }
                release();
                drop(permit);
            });
        }
        for (_, job) in refines {
            let ctx = ctx.clone();
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
            let release = done(REFINE_STREAM, vec![job.id.clone()]);
            tasks.spawn(async move {
                match ctx.refine_job(&job).await {
                    Ok(()) => {
                        let _ = ctx.store.ack(REFINE_STREAM, "refine", &job.id).await;
                    }
                    Err(e) => {
                        warn!(job = %job.id, error = %e, "refine job failed; it will be retried");
                        let _ = ctx
                            .store
                            .note_job_error(REFINE_STREAM, &job.id, &e.to_string())
                            .await;
                    }
                }
                release();
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    info!("worker pool stopped");
    Ok(())
}
