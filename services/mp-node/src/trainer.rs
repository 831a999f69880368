//! The trainer: `TrainerCore` (a sync actor owning the current model) and the coordinator
//! that runs rounds — intervention rounds in which committed proposals are applied in order
//! (a proposal whose base version was overtaken is rebased: its refinement re-run on the
//! current version), and training phases of CE + persistent guidance from every committed
//! mark, each publishing a versioned checkpoint and refreshing the review queue.

use crate::data::{checkpoint_path, load_split, mask_of, proposal_file, write_atomic};
use crate::{NodeError, Result};
use actix::prelude::*;
use mp_core::data::Dataset;
use mp_core::model::Model;
use mp_core::refine::{refine, Proposal, ProposalReport, RefineConfig};
use mp_core::suggest::{FitReport, Propagation, Suggester};
use mp_core::train::{evaluate, train_with, Eval, GuidanceConfig, TrainConfig, TrainReport};
use mp_store::{ModelVersionRecord, ProjectInfo, Store, COMMIT_STREAM, SCORE_STREAM};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;
use tracing::{info, warn};

pub struct TrainerCore {
    model: Option<Model>,
    device: Device,
}

impl Actor for TrainerCore {
    type Context = SyncContext<Self>;
}

impl TrainerCore {
    fn model(&mut self) -> Result<&mut Model> {
        self.model
            .as_mut()
            .ok_or_else(|| NodeError::Invalid("no model loaded".into()))
    }
}

/// Replace the model with a checkpoint file.
#[derive(Message)]
#[rtype(result = "Result<(), NodeError>")]
pub struct LoadModel(pub PathBuf);

/// Replace the model with checkpoint bytes (a committed proposal).
#[derive(Message)]
#[rtype(result = "Result<(), NodeError>")]
pub struct AdoptWeights(pub Vec<u8>);

#[derive(Message)]
#[rtype(result = "Result<TrainReport, NodeError>")]
pub struct TrainGuided {
    pub train: Arc<Dataset>,
    pub guidance: Vec<usize>,
    pub cfg: TrainConfig,
    /// The suggester fitted for this phase ([`Suggester::to_bytes`]); `None` trains without
    /// propagation.
    pub suggester: Option<Arc<Vec<u8>>>,
}

#[derive(Message)]
#[rtype(result = "Result<Eval, NodeError>")]
pub struct Evaluate(pub Arc<Dataset>);

/// Re-run a refinement on the current model (rebase).
#[derive(Message)]
#[rtype(result = "Result<Proposal, NodeError>")]
pub struct Rebase {
    pub batch: Dataset,
    pub val: Arc<Dataset>,
    pub cfg: RefineConfig,
}

/// Write the current model as `version` to `path`.
#[derive(Message)]
#[rtype(result = "Result<(), NodeError>")]
pub struct SaveVersion {
    pub version: u64,
    pub path: PathBuf,
}

impl Handler<LoadModel> for TrainerCore {
    type Result = Result<(), NodeError>;
    fn handle(&mut self, m: LoadModel, _: &mut SyncContext<Self>) -> Self::Result {
        self.model = Some(Model::load(&m.0, self.device)?);
        Ok(())
    }
}

impl Handler<AdoptWeights> for TrainerCore {
    type Result = Result<(), NodeError>;
    fn handle(&mut self, m: AdoptWeights, _: &mut SyncContext<Self>) -> Self::Result {
        let new = Model::from_bytes(&m.0, self.device, std::path::Path::new("proposal"))?;
        self.model()?.copy_weights_from(&new)?;
        Ok(())
    }
}

impl Handler<TrainGuided> for TrainerCore {
    type Result = Result<TrainReport, NodeError>;
    fn handle(&mut self, m: TrainGuided, _: &mut SyncContext<Self>) -> Self::Result {
        let device = self.device;
        let fitted = match &m.suggester {
            Some(b) => Some(Suggester::from_bytes(b, device)?),
            None => None,
        };
        let model = self.model()?;
        let mut r = train_with(
            model,
            &m.train,
            &m.guidance,
            &m.cfg,
            fitted.as_ref().map(|(s, _)| s),
            &mut |_, _, _, _| {},
        )?;
        r.propagation = fitted.map(|(_, report)| report);
        Ok(r)
    }
}

impl Handler<Evaluate> for TrainerCore {
    type Result = Result<Eval, NodeError>;
    fn handle(&mut self, m: Evaluate, _: &mut SyncContext<Self>) -> Self::Result {
        Ok(evaluate(self.model()?, &m.0, 512)?)
    }
}

impl Handler<Rebase> for TrainerCore {
    type Result = Result<Proposal, NodeError>;
    fn handle(&mut self, m: Rebase, _: &mut SyncContext<Self>) -> Self::Result {
        Ok(refine(self.model()?, &m.batch, &m.val, &m.cfg)?)
    }
}

impl Handler<SaveVersion> for TrainerCore {
    type Result = Result<(), NodeError>;
    fn handle(&mut self, m: SaveVersion, _: &mut SyncContext<Self>) -> Self::Result {
        let model = self.model()?;
        model.spec.version = m.version;
        model.save(&m.path)?;
        // A version is published only when its file loads back as this model (read on the
        // CPU: no second copy of the model in GPU memory).
        let back = Model::load(&m.path, Device::Cpu)?;
        if back.spec != model.spec {
            return Err(NodeError::Invalid(format!(
                "{} does not load back as the model saved",
                m.path.display()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub redis_url: String,
    pub prefix: String,
    pub checkpoints: PathBuf,
    /// Epochs of each training phase (thesis 6.5.2: human intervention every N epochs).
    pub epochs_per_round: usize,
    /// A round ends once this many marks were committed in it.
    pub round_marks: usize,
    /// ... or after this long with at least one commit (0 = no time limit).
    pub round_seconds: u64,
    pub train: TrainConfig,
    pub guidance: GuidanceConfig,
    pub refine: RefineConfig,
    /// Rescore every image of the serving version after this many commits of a round, so
    /// that suggestions and priorities learn from the marks as they arrive (0 = only at the
    /// start of a round).
    pub rescore_every: usize,
    pub device: Device,
    pub health_listen: String,
    /// Images per score job (workers share the rescoring).
    pub score_chunk: usize,
    /// A commit job delivered this many times without being acknowledged is given up on.
    pub max_deliveries: u64,
    /// Settled proposals' weights and old suggester fits are removed after this many days
    /// (0: kept for ever). Model versions are always kept.
    pub retention_days: f64,
    /// Commit jobs silent this long on another (dead) trainer are taken over.
    pub claim_idle_ms: u64,
}

/// λ of the round's persistent guidance (rrr on the whole Jacobian): the value the
/// validation split picks on every benchmark set once the swap trades every confound; 0.1
/// costs 4–5 points on the moving sets (BENCHMARKS.md, "Efficacy", "Platform end to end").
pub const DEFAULT_LAMBDA: f64 = 0.01;
/// Probability that an image of a guided batch trades its confound with another's: every
/// image, so that confound and label agree only by chance (with 0.5 the kept half still
/// teaches the shortcut; measured in BENCHMARKS.md, "Efficacy on moving-sticker").
pub const DEFAULT_SWAP: f64 = 1.0;

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            prefix: "mp".into(),
            checkpoints: PathBuf::from("checkpoints"),
            epochs_per_round: 6,
            round_marks: 10,
            round_seconds: 0,
            train: TrainConfig {
                epochs: 2,
                ..Default::default()
            },
            guidance: GuidanceConfig {
                swap: DEFAULT_SWAP,
                ..GuidanceConfig::new(
                    mp_core::loss::SaliencyLoss::RrrJacobian,
                    DEFAULT_LAMBDA,
                    mp_core::suggest::Propagation::Auto,
                )
            },
            refine: RefineConfig::default(),
            rescore_every: 3,
            device: mp_core::device::auto(),
            health_listen: String::new(),
            max_deliveries: mp_store::DEFAULT_MAX_DELIVERIES,
            retention_days: 7.0,
            claim_idle_ms: 60_000,
            score_chunk: 500,
        }
    }
}

struct Coordinator {
    store: Store,
    cfg: TrainerConfig,
    core: Addr<TrainerCore>,
    project: ProjectInfo,
    train: Arc<Dataset>,
    index: HashMap<String, usize>,
    val: Arc<Dataset>,
    test: Option<Arc<Dataset>>,
    version: u64,
    round_commits: usize,
    /// Proposals already counted towards the round: one sent back for review after a rebase
    /// and committed again counts once.
    counted: std::collections::HashSet<String>,
    round_started: Instant,
    /// A mid-round rescoring (its suggester fit) is under way.
    rescoring: Arc<std::sync::atomic::AtomicBool>,
}

/// A suggester fitted by the trainer and written to the checkpoint directory.
struct SharedFit {
    /// Relative to the checkpoint directory.
    file: String,
    bytes: Arc<Vec<u8>>,
}

/// Fits the suggester on the marked images (`marked`: their images with their marks) once,
/// on a blocking thread, and writes it to `suggesters/` in the checkpoint directory for the
/// workers: every worker of a pass loads this fit instead of fitting its own (a fit with
/// its cross-validation costs about a minute of a CPU core). `None` without propagation or
/// marks.
async fn fit_shared(
    cfg: &TrainerConfig,
    propagation: Propagation,
    marked: Dataset,
) -> Result<Option<SharedFit>> {
    if propagation == Propagation::Off || marked.is_empty() {
        return Ok(None);
    }
    let (suggest, device) = (cfg.guidance.suggest.clone(), cfg.device);
    let fitted = tokio::task::spawn_blocking(move || {
        let idx: Vec<usize> = (0..marked.len()).collect();
        let t = Instant::now();
        let fit = mp_core::suggest::fit(propagation, &marked, &idx, &suggest, device)?;
        fit.map(|(s, r): (Suggester, FitReport)| {
            Ok::<_, NodeError>((s.to_bytes(&r)?, r, t.elapsed().as_secs_f64()))
        })
        .transpose()
    })
    .await
    .map_err(|e| NodeError::Invalid(format!("suggester fit: {e}")))??;
    let Some((bytes, report, seconds)) = fitted else {
        return Ok(None);
    };
    let file = format!(
        "suggesters/m{}-{}.safetensors",
        report.marks,
        mp_store::now_ms()
    );
    write_atomic(&cfg.checkpoints.join(&file), &bytes).await?;
    info!(%file, choice = %report.summary(), seconds, "suggester fitted for the workers");
    Ok(Some(SharedFit {
        file,
        bytes: Arc::new(bytes),
    }))
}

/// Score jobs for every image under `version` (the workers share them), naming the
/// suggester they apply when the trainer fitted one.
async fn score_all(
    store: &Store,
    cfg: &TrainerConfig,
    version: u64,
    suggester: Option<&str>,
) -> Result<()> {
    let ids = store.image_ids().await?;
    for chunk in ids.chunks(cfg.score_chunk.max(1)) {
        let mut fields = vec![
            ("kind", "score".to_string()),
            ("version", version.to_string()),
            ("images", chunk.join(" ")),
            ("enqueued_ms", mp_store::now_ms().to_string()),
        ];
        if let Some(f) = suggester {
            fields.push(("suggester", f.to_string()));
        }
        store.add_job(SCORE_STREAM, &fields).await?;
    }
    Ok(())
}

impl Coordinator {
    async fn evaluate(&self) -> Result<(Eval, Option<Eval>)> {
        let v = self.core.send(Evaluate(self.val.clone())).await??;
        let t = match &self.test {
            Some(t) => Some(self.core.send(Evaluate(t.clone())).await??),
            None => None,
        };
        Ok((v, t))
    }

    /// Saves the trainer's model as the next version (its file written durably and loaded
    /// back) and evaluates it; nothing is published yet.
    async fn save_version(&mut self, reason: String) -> Result<ModelVersionRecord> {
        let version = self.store.newest_version().await?.max(self.version) + 1;
        let file = format!("v{version}.safetensors");
        self.core
            .send(SaveVersion {
                version,
                path: self.cfg.checkpoints.join(&file),
            })
            .await??;
        let (v, t) = self.evaluate().await?;
        Ok(ModelVersionRecord {
            version,
            parent: self.version,
            created_ms: mp_store::now_ms(),
            reason,
            val_accuracy: v.accuracy,
            val_loss: v.loss,
            test_accuracy: t.map(|t| t.accuracy).unwrap_or(f64::NAN),
            file,
        })
    }

    fn published(&mut self, rec: &ModelVersionRecord) {
        self.version = rec.version;
        info!(version = rec.version, reason = %rec.reason, val_acc = rec.val_accuracy,
            test_acc = rec.test_accuracy, "published");
    }

    /// Saves the trainer's model as the next version and makes it current, only on top of
    /// the version it was trained from ([`StoreError::Aborted`](mp_store::StoreError) when a
    /// rollback came in between).
    async fn publish(&mut self, reason: String) -> Result<u64> {
        let rec = self.save_version(reason).await?;
        self.store.publish_version(&rec).await?;
        self.published(&rec);
        Ok(rec.version)
    }

    /// Publishes the trainer's model (the proposal's weights, adopted) as the version that
    /// commits `pid`; the proposal's status and its mark's place in the guidance change in
    /// the same step.
    async fn publish_commit(
        &mut self,
        pid: &str,
        reason: String,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let rec = self.save_version(reason).await?;
        match self.store.publish_commit(&rec, pid, fields).await? {
            None => {
                // Tests kill the trainer here: published, the commit job not acknowledged.
                crate::failpoint("commit-published");
                self.published(&rec);
                if self.counted.insert(pid.to_string()) {
                    self.round_commits += 1;
                }
            }
            Some(v) => info!(proposal = %pid, version = v, "already committed; left as it is"),
        }
        Ok(())
    }

    /// Applies a `committing` proposal (or finishes one whose rebase was interrupted). A
    /// proposal in any other state — committed already, by a job delivered before — is left
    /// alone, so a redelivered commit job never applies a mark twice.
    async fn apply_commit(&mut self, pid: &str) -> Result<()> {
        let p = self.store.proposal(pid).await?;
        if p.status != "committing" && p.status != "rebasing" {
            return Ok(());
        }
        if p.base_version == self.version && p.status == "committing" {
            let path = self.cfg.checkpoints.join(proposal_file(pid)?);
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| NodeError::Io(format!("{}: {e}", path.display())))?;
            self.core.send(AdoptWeights(bytes)).await??;
            return self.publish_commit(pid, format!("commit {pid}"), &[]).await;
        }
        // Overtaken: re-run the refinement on the current version.
        self.store
            .update_proposal(
                pid,
                "rebasing",
                &[(
                    "message",
                    format!("rebasing from v{} onto v{}", p.base_version, self.version),
                )],
            )
            .await?;
        let mark = self.store.mark(&p.mark_id).await?;
        let image = self.store.image(&p.image_id).await?;
        let mut batch =
            crate::data::dataset_from_records(std::slice::from_ref(&image), &self.project)?;
        batch.marks[0] = Some(mask_of(&mark)?);
        let proposal = self
            .core
            .send(Rebase {
                batch,
                val: self.val.clone(),
                cfg: self.cfg.refine.clone(),
            })
            .await??;
        // The refinement's own validation guard already kept every ineligible iterate out
        // of the choice: any best iteration past the start passed it, on the same images.
        // (Comparing the reported whole-split figures here instead refused rebased proposals
        // that the guard had passed.)
        let improved = proposal.best_iteration > 0;
        let base = self.version;
        let file = proposal_file(pid)?;
        write_atomic(&self.cfg.checkpoints.join(&file), &proposal.weights).await?;
        let report = serde_json::to_string(&ProposalReport::bounded(
            image.width,
            image.height,
            proposal.clone(),
            &self.cfg.refine,
        ))
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
        if improved {
            self.core.send(AdoptWeights(proposal.weights)).await??;
            self.publish_commit(
                pid,
                format!("commit {pid} (rebased onto v{base})"),
                &[
                    ("base_version", base.to_string()),
                    ("result", report),
                    ("message", format!("rebased onto v{base} and applied")),
                ],
            )
            .await
        } else {
            // Not committed: the mark stays out of the guidance.
            self.store
                .update_proposal(pid, "ready", &[("base_version", base.to_string()), ("result", report), ("message", format!("rebased onto v{base}; it no longer passes the validation guard: review it again"))])
                .await?;
            Ok(())
        }
    }

    /// Loads Redis's current version into the trainer when it differs from the trainer's
    /// (a rollback), or always with `force` (the trainer's weights are no longer a published
    /// version's: a commit failed after adopting a proposal).
    async fn follow_current(&mut self, force: bool) -> Result<()> {
        let cur = self.store.current_version().await?;
        if cur == self.version && !force {
            return Ok(());
        }
        if cur == self.version {
            info!(version = cur, "reloading the current version");
        } else {
            info!(
                from = self.version,
                to = cur,
                "current version changed outside the trainer; loading it"
            );
        }
        self.core
            .send(LoadModel(checkpoint_path(
                &self.cfg.checkpoints,
                &self.store.version(cur).await?,
            )))
            .await??;
        self.version = cur;
        Ok(())
    }

    /// The committed marks as (index in the training split, mark), one per image.
    async fn guidance(&self) -> Result<Vec<(usize, mp_core::data::Mask)>> {
        let mut out: Vec<(usize, mp_core::data::Mask)> = Vec::new();
        for m in &self.store.guidance_marks().await? {
            if let Some(&i) = self.index.get(&m.image_id) {
                let mask = mask_of(m)?;
                match out.iter_mut().find(|(j, _)| *j == i) {
                    Some(slot) => slot.1 = mask,
                    None => out.push((i, mask)),
                }
            }
        }
        Ok(out)
    }

    /// The training images with every committed mark, and the indices of the marked ones.
    async fn guided_train(&self) -> Result<(Dataset, Vec<usize>)> {
        let mut train = (*self.train).clone();
        let mut guidance = Vec::new();
        for (i, mask) in self.guidance().await? {
            train.marks[i] = Some(mask);
            guidance.push(i);
        }
        Ok((train, guidance))
    }

    /// Only the marked training images, with their marks (what the suggester learns from).
    async fn marked_images(&self) -> Result<Dataset> {
        let marks = self.guidance().await?;
        let idx: Vec<usize> = marks.iter().map(|(i, _)| *i).collect();
        let mut ds = self.train.subset(&idx);
        for (k, (_, mask)) in marks.into_iter().enumerate() {
            ds.marks[k] = Some(mask);
        }
        Ok(ds)
    }

    /// A training phase: CE + guidance from every committed mark, then a new round.
    async fn training_phase(&mut self) -> Result<()> {
        let (train, guidance) = self.guided_train().await?;
        let mut cfg = self.cfg.train.clone();
        cfg.epochs = self.cfg.epochs_per_round;
        cfg.seed = self.version;
        cfg.guidance = (!guidance.is_empty()).then(|| self.cfg.guidance.clone());
        info!(
            marks = guidance.len(),
            epochs = cfg.epochs,
            "training phase"
        );
        // One fit serves the guided training and every worker of the next scoring pass.
        let shared = match &cfg.guidance {
            Some(g) => fit_shared(&self.cfg, g.propagation, train.subset(&guidance)).await?,
            None => None,
        };
        let r = self
            .core
            .send(TrainGuided {
                train: Arc::new(train),
                guidance: guidance.clone(),
                cfg,
                suggester: shared.as_ref().map(|s| s.bytes.clone()),
            })
            .await??;
        let propagation = r
            .propagation
            .as_ref()
            .map(|p| format!(", propagation {}", p.summary()))
            .unwrap_or_default();
        let v = match self
            .publish(format!(
                "guided training, {} marks{propagation}, {:.0} s",
                guidance.len(),
                r.seconds
            ))
            .await
        {
            Ok(v) => v,
            Err(NodeError::Store(e @ mp_store::StoreError::Aborted(_))) => {
                warn!(error = %e, "the current version moved during training; its result is dropped");
                self.follow_current(true).await?;
                self.version
            }
            Err(e) => return Err(e),
        };
        self.start_round(v, shared.map(|s| s.file)).await
    }

    /// Freezes `version` for the round and rescores every image with it (and with the
    /// suggester in `suggester`, a file in the checkpoint directory, when there is one).
    async fn start_round(&mut self, version: u64, suggester: Option<String>) -> Result<()> {
        self.store.set_serving_version(version).await?;
        score_all(&self.store, &self.cfg, version, suggester.as_deref()).await?;
        self.round_commits = 0;
        self.round_started = Instant::now();
        info!(version, "round started");
        Ok(())
    }

    /// Mid-round: after every `rescore_every` commits (unless the round is about to end),
    /// rescore under the serving version with the marks so far.
    async fn maybe_rescore(&self) -> Result<()> {
        let n = self.cfg.rescore_every;
        if n > 0
            && self.round_commits > 0
            && self.round_commits.is_multiple_of(n)
            && !self.round_over()
        {
            let serving = self.store.serving_version().await?;
            if self
                .rescoring
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                info!(
                    commits = self.round_commits,
                    "a rescoring is still being prepared; this one is left out"
                );
                return Ok(());
            }
            info!(
                commits = self.round_commits,
                version = serving,
                "rescoring with the round's marks"
            );
            // The suggester is fitted off the coordinator, so commits go on meanwhile.
            let marked = self.marked_images().await?;
            let (store, cfg, busy) = (self.store.clone(), self.cfg.clone(), self.rescoring.clone());
            tokio::spawn(async move {
                let r = async {
                    let shared = fit_shared(&cfg, cfg.guidance.propagation, marked).await?;
                    score_all(
                        &store,
                        &cfg,
                        serving,
                        shared.as_ref().map(|s| s.file.as_str()),
                    )
                    .await
                }
                .await;
                if let Err(e) = r {
                    warn!(error = %e, "mid-round rescoring failed");
                }
                busy.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
        Ok(())
    }

    fn round_over(&self) -> bool {
        self.round_commits >= self.cfg.round_marks.max(1)
            || (self.cfg.round_seconds > 0
                && self.round_commits > 0
                && self.round_started.elapsed() >= Duration::from_secs(self.cfg.round_seconds))
    }
}

/// Runs the trainer until `stop` turns true. Call inside an actix `System`.
pub async fn run(cfg: TrainerConfig, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    let Some((store, project)) = crate::connect(&cfg.redis_url, &cfg.prefix, &stop).await? else {
        return Ok(());
    };
    let train = load_split(&store, &project, "train", None).await?;
    let index = train
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    let val = load_split(&store, &project, "val", None).await?;
    let test = load_split(&store, &project, "test", None).await?;
    let device = cfg.device;
    let core = SyncArbiter::start(1, move || TrainerCore {
        model: None,
        device,
    });
    let version = store.current_version().await?;
    core.send(LoadModel(checkpoint_path(
        &cfg.checkpoints,
        &store.version(version).await?,
    )))
    .await??;
    let (health_tx, health_rx) = tokio::sync::watch::channel(true);
    if !cfg.health_listen.is_empty() {
        tokio::spawn(crate::serve_health(
            cfg.health_listen.clone(),
            health_rx,
            stop.clone(),
        ));
    }
    let mut co = Coordinator {
        store: store.clone(),
        cfg: cfg.clone(),
        core,
        project,
        train: Arc::new(train),
        index,
        val: Arc::new(val),
        test: (!test.is_empty()).then(|| Arc::new(test)),
        version,
        round_commits: 0,
        counted: Default::default(),
        round_started: Instant::now(),
        rescoring: Default::default(),
    };
    info!(version, "trainer started");
    let consumer = crate::consumer_name("trainer");
    let mut last_trim = Instant::now();
    let mut last_gc: Option<Instant> = None;
    while !*stop.borrow() {
        // Acknowledged jobs do not stay in Redis for ever (every minute), settled proposals'
        // weights not on disk (every hour: retention is counted in days).
        if last_gc.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_gc = Some(Instant::now());
            if cfg.retention_days > 0.0 {
                let keep = Duration::from_secs_f64(cfg.retention_days * 86_400.0);
                match crate::data::collect_garbage(&store, &cfg.checkpoints, keep).await {
                    Ok(n) if n > 0 => info!(files = n, "old proposal weights and fits removed"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "retention failed"),
                }
            }
        }
        if last_trim.elapsed() >= Duration::from_secs(60) {
            last_trim = Instant::now();
            match store.trim_streams().await {
                Ok(n) if n > 0 => info!(entries = n, "job streams trimmed"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "trimming the job streams failed"),
            }
        }
        // Rollback (or another writer): follow Redis's current version.
        if let Err(e) = co.follow_current(false).await {
            let _ = health_tx.send(false);
            warn!(error = %e, "store unavailable");
            crate::nap(&mut stop, 500).await;
            continue;
        }
        let _ = health_tx.send(true);
        let mut jobs = store
            .reclaim_jobs(
                COMMIT_STREAM,
                "commit",
                &consumer,
                cfg.claim_idle_ms,
                16,
                cfg.max_deliveries,
            )
            .await
            .unwrap_or_default();
        jobs.extend(
            store
                .read_jobs(COMMIT_STREAM, "commit", &consumer, 16, 300)
                .await
                .unwrap_or_default(),
        );
        for job in jobs {
            let pid = job.get("proposal")?.to_string();
            let mut result = co.apply_commit(&pid).await;
            // A rollback while the commit was prepared: rebase onto the new current version.
            for _ in 0..3 {
                let Err(NodeError::Store(e @ mp_store::StoreError::Aborted(_))) = &result else {
                    break;
                };
                warn!(proposal = %pid, error = %e, "the current version moved; committing again on top of it");
                co.follow_current(true).await?;
                result = co.apply_commit(&pid).await;
            }
            if result.is_err() {
                // The adopted weights are no published version's: back to the current one.
                if let Err(e) = co.follow_current(true).await {
                    warn!(error = %e, "could not reload the current version");
                }
            }
            match result {
                Ok(()) => {
                    store.ack(COMMIT_STREAM, "commit", &job.id).await?;
                    co.maybe_rescore().await?;
                }
                Err(NodeError::Store(e @ mp_store::StoreError::Redis(_))) => {
                    warn!(error = %e, "commit deferred");
                    let _ = store
                        .note_job_error(COMMIT_STREAM, &job.id, &e.to_string())
                        .await;
                }
                // The checkpoint disk is full: nothing was published (the version file is
                // written before Redis hears of it); the job stays pending and is retried
                // once it has been idle `claim_idle_ms`, until the operator frees space.
                Err(e) if e.is_out_of_space() => {
                    warn!(proposal = %pid, error = %e, "checkpoint disk full: commit deferred");
                    let _ = store
                        .note_job_error(COMMIT_STREAM, &job.id, &e.to_string())
                        .await;
                }
                Err(e) => {
                    warn!(proposal = %pid, error = %e, "commit failed");
                    let _ = store
                        .update_proposal(&pid, "failed", &[("message", e.to_string())])
                        .await;
                    store.ack(COMMIT_STREAM, "commit", &job.id).await?;
                }
            }
        }
        let admin_end: Option<String> = {
            let mut c = store.connection();
            redis::cmd("GETDEL")
                .arg(format!("{}:round:end", store.prefix()))
                .query_async(&mut c)
                .await
                .unwrap_or(None)
        };
        if co.round_over() || admin_end.is_some() {
            co.training_phase().await?;
        }
    }
    info!("trainer stopped");
    Ok(())
}
