//! Platform subcommands: gateway, project init, expert-sim, admin, bench queue.

use crate::common::{bar, parse_size};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mp_api::sim::{self, MarkSource, Outcome, SimConfig};
use mp_api::Client;
use mp_core::data::folder::{load_image_folder_with_progress, FolderOptions};
use mp_core::data::Dataset;
use mp_core::model::{Arch, Model, ModelSpec};
use mp_core::train::{evaluate, predict, train, TrainConfig};
use mp_gateway::GatewayConfig;
use mp_store::{ImageRecord, ModelVersionRecord, ProjectInfo, Role, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[derive(Args)]
pub struct GatewayArgs {
    /// TOML config file (keys as in GatewayConfig; MP_* variables override it)
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub redis_url: Option<String>,
    #[arg(long)]
    pub checkpoints: Option<PathBuf>,
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
}

impl GatewayArgs {
    pub fn config(&self) -> Result<GatewayConfig> {
        let mut c = GatewayConfig::load(self.config.as_deref())?;
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.redis_url {
            c.redis_url = v.clone();
        }
        if let Some(v) = &self.checkpoints {
            c.checkpoints = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            c.metrics_listen = v.clone();
        }
        if let Some(v) = self.lease_ttl_ms {
            c.lease_ttl_ms = v;
        }
        Ok(c)
    }
}

pub fn gateway(a: GatewayArgs) -> Result<()> {
    let cfg = a.config()?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        mp_gateway::run(listener, cfg, shutdown).await?;
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum ProjectCmd {
    /// Load an image folder into Redis, train (or take) the base model, fill the review queue, create an admin
    Init(InitArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Image folder (ROOT/{train,val,test}/{class}/*.png)
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, default_value = "mp")]
    pub prefix: String,
    /// Shared checkpoint directory
    #[arg(long, default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// Base model to start from: a TorchScript module of your own (`torch.jit.save`; needs
    /// --config) or one of our checkpoints (else one is trained)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Project config (TOML: classes in output order, input size, resize policy, mean/std,
    /// batch norm) for a TorchScript --model; default DATA/project.toml
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value = "small-cnn")]
    pub arch: String,
    #[arg(long, value_parser = parse_size)]
    pub resize: Option<(u32, u32)>,
    #[arg(long, default_value = "admin")]
    pub admin_name: String,
    /// The queue's first order, before any mark: margin (alignment and margin orderings) or
    /// random
    #[arg(long, default_value = "alignment")]
    pub ordering: String,
    /// Where the pixels go: a directory, or an s3://, gs:// or az:// URL (credentials from
    /// the environment, as each provider's tools read them). Default: `images` in the
    /// checkpoint directory, which every node already shares
    #[arg(long, env = "MP_IMAGE_STORE")]
    pub image_store: Option<String>,
    /// Leave out files that cannot be read or decoded (they are listed) instead of refusing
    #[arg(long)]
    pub skip_bad: bool,
}

impl InitArgs {
    /// Defaults for a project on `data`: a small CNN trained 4 epochs, prefix `mp`.
    pub fn new(data: PathBuf, redis_url: String, checkpoints: PathBuf) -> Self {
        InitArgs {
            data,
            redis_url,
            prefix: "mp".into(),
            checkpoints,
            model: None,
            config: None,
            epochs: 4,
            arch: "small-cnn".into(),
            resize: None,
            admin_name: "admin".into(),
            ordering: "alignment".into(),
            image_store: None,
            skip_bad: false,
        }
    }
}

/// The id of a training image of a dataset: `class/name`.
pub fn image_id(ds: &Dataset, i: usize) -> String {
    format!("{}/{}", ds.classes[ds.labels[i] as usize], ds.names[i])
}

/// An image of a dataset as stored: id `class/name`, 8-bit interleaved pixels.
pub fn image_record(ds: &Dataset, i: usize) -> ImageRecord {
    let (w, h, c) = (ds.width, ds.height, ds.channels);
    let img = ds.image(i);
    let mut pixels = vec![0u8; w * h * c];
    for p in 0..w * h {
        for k in 0..c {
            pixels[p * c + k] = (img[k * w * h + p].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    ImageRecord {
        id: image_id(ds, i),
        name: ds.names[i].clone(),
        label: ds.labels[i] as u32,
        width: w as u32,
        height: h as u32,
        channels: c as u32,
        pixels,
    }
}

/// Initial priorities: the uncertainty margin of every image (no mark exists yet).
pub fn margin_priorities(model: &Model, ds: &Dataset) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(ds.len());
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(512) {
        let (x, _) = ds.batch(chunk, model.device());
        let probs = predict(model, &x);
        for k in 0..chunk.len() {
            let p = Vec::<f32>::try_from(&probs.get(k as i64))?;
            out.push(mp_core::align::margin_score(&p));
        }
    }
    Ok(out)
}

/// Initialises the project; returns the admin token.
pub fn project_init(a: InitArgs) -> Result<String> {
    let config = match &a.model {
        Some(p) if crate::project::is_torchscript_file(p)? => {
            let path = a
                .config
                .clone()
                .unwrap_or_else(|| a.data.join("project.toml"));
            if !path.is_file() {
                bail!(
                    "--model {} is a TorchScript module: its project config (classes in output order, input size, normalisation) is needed; pass --config FILE (looked for {})",
                    p.display(),
                    path.display()
                );
            }
            Some(crate::project::ProjectConfig::load(&path)?)
        }
        _ => None,
    };
    let pb = bar(0, "decoding images");
    let mut f = load_image_folder_with_progress(
        &a.data,
        &FolderOptions {
            resize: a.resize.or(config.as_ref().and_then(|c| c.resize())),
            grayscale: config.as_ref().map(|c| c.input.channels == 1),
            skip_bad: a.skip_bad,
        },
        &|done, total| {
            pb.set_length(total);
            pb.set_position(done);
        },
    )
    .map_err(|e| match e {
        e @ (mp_core::CoreError::Image { .. } | mp_core::CoreError::BadImages { .. }) => {
            anyhow::anyhow!("{e}\n(pass --skip-bad to leave such files out)")
        }
        e => e.into(),
    })?;
    pb.finish_and_clear();
    if !f.skipped.is_empty() {
        println!(
            "left out {} files that cannot be read as images (--skip-bad):",
            f.skipped.len()
        );
        for (p, why) in &f.skipped {
            println!("  {}: {why}", p.display());
        }
    }
    if let Some(c) = &config {
        c.relabel(&mut f.train, "train")?;
        if let Some(v) = f.val.as_mut() {
            c.relabel(v, "val")?;
        }
        if let Some(t) = f.test.as_mut() {
            c.relabel(t, "test")?;
        }
    }
    // No val/: hold out part of train (never the test split: it is for scoring only).
    let (train_all, val) = match f.val.clone() {
        Some(v) => (f.train.clone(), v),
        None => {
            let (t, v) = crate::common::carve_val(&f.train, 0);
            println!(
                "{} has no val/ split: {} of its {} training images ({:.0} % per class) are held out as val",
                a.data.display(),
                v.len(),
                f.train.len(),
                100.0 * crate::common::CARVED_VAL_SHARE
            );
            (t, v)
        }
    };
    let test = f.test.clone();
    let train_ds = train_all.without_marks();
    std::fs::create_dir_all(&a.checkpoints)
        .with_context(|| format!("creating {}", a.checkpoints.display()))?;
    let mut model = match (&a.model, &config) {
        (Some(p), Some(c)) => crate::project::import_module(p, c, mp_core::device::auto())?,
        (Some(p), None) => Model::load(p, mp_core::device::auto())?,
        (None, _) => {
            tch::manual_seed(0);
            let spec = ModelSpec {
                arch: a.arch.parse::<Arch>()?,
                classes: train_ds.classes.clone(),
                channels: train_ds.channels,
                height: train_ds.height,
                width: train_ds.width,
                version: 1,
                script: None,
            };
            let mut m = Model::new(spec, mp_core::device::auto())?;
            let cfg = TrainConfig {
                epochs: a.epochs,
                ..Default::default()
            };
            let pb = bar(
                (a.epochs * train_ds.len().div_ceil(cfg.batch_size)) as u64,
                "base model",
            );
            train(&mut m, &train_ds, &[], &cfg, &mut |_, _, _, _| pb.inc(1))?;
            pb.finish_and_clear();
            m
        }
    };
    model.spec.version = 1;
    let v = evaluate(&model, &val, 512)?;
    let t = test
        .as_ref()
        .map(|t| evaluate(&model, t, 512))
        .transpose()?;
    let file = "v1.safetensors".to_string();
    model.save(&a.checkpoints.join(&file))?;
    let prios = match a.ordering.parse::<mp_core::align::Ordering>()? {
        mp_core::align::Ordering::Random => {
            let mut rng = mp_core::rng::Rng::new(mp_store::now_ms());
            (0..train_ds.len())
                .map(|_| 2.0 * rng.next_f64() - 1.0)
                .collect()
        }
        _ => margin_priorities(&model, &train_ds)?,
    };
    let items: Vec<(String, f64)> = (0..train_ds.len())
        .map(|i| image_id(&train_ds, i))
        .zip(prios)
        .collect();
    let images_url = match &a.image_store {
        Some(u) => u.clone(),
        None => a
            .checkpoints
            .canonicalize()
            .with_context(|| format!("resolving {}", a.checkpoints.display()))?
            .join("images")
            .display()
            .to_string(),
    };
    let images = mp_store::ImageStore::open(&images_url, 0)?;
    let token = runtime()?.block_on(async {
        let store = Store::connect(&a.redis_url, &a.prefix)
            .await
            .with_context(|| format!("connecting to {}", a.redis_url))?;
        store
            .set_project(&ProjectInfo {
                name: a.data.display().to_string(),
                classes: train_ds.classes.clone(),
                width: train_ds.width as u32,
                height: train_ds.height as u32,
                channels: train_ds.channels as u32,
                image_store: images.url().to_string(),
            })
            .await?;
        let store = store.with_image_store(images);
        let total = train_ds.len() + val.len() + test.as_ref().map_or(0, |t| t.len());
        let pb = bar(total as u64, "storing images");
        for (split, ds) in [
            ("train", Some(&train_ds)),
            ("val", Some(&val)),
            ("test", test.as_ref()),
        ] {
            let Some(ds) = ds else { continue };
            let idx: Vec<usize> = (0..ds.len()).collect();
            for chunk in idx.chunks(500) {
                let records: Vec<ImageRecord> = chunk
                    .iter()
                    .map(|&i| {
                        let mut r = image_record(ds, i);
                        if split != "train" {
                            r.id = format!("{split}:{}", r.id);
                        }
                        r
                    })
                    .collect();
                match split {
                    "train" => store.put_images(&records).await?,
                    _ => store.put_held_out(split, &records).await?,
                }
                pb.inc(chunk.len() as u64);
            }
        }
        pb.finish_and_clear();
        println!("images stored in {}", store.image_store().await?.url());
        store
            .publish_version(&ModelVersionRecord {
                version: 1,
                parent: 0,
                created_ms: mp_store::now_ms(),
                reason: "base model".into(),
                val_accuracy: v.accuracy,
                val_loss: v.loss,
                test_accuracy: t.map(|t| t.accuracy).unwrap_or(f64::NAN),
                file,
            })
            .await?;
        store.ensure_job_groups().await?;
        let queued = store.enqueue(&items).await?;
        let (_, token) = store.create_expert(&a.admin_name, Role::Admin).await?;
        println!(
            "project {}: {} images queued, model v1 val acc {:.2} %{}",
            a.data.display(),
            queued,
            100.0 * v.accuracy,
            t.map(|t| format!(" test acc {:.2} %", 100.0 * t.accuracy))
                .unwrap_or_else(|| ", no test split".into())
        );
        anyhow::Ok(token)
    })?;
    Ok(token)
}

#[derive(Args, Clone)]
pub struct SimArgs {
    /// Gateway address
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Admin token (the simulated experts get their own tokens from it)
    #[arg(long, env = "MP_TOKEN")]
    pub token: String,
    #[arg(long, default_value_t = 4)]
    pub experts: usize,
    /// Total leases to take
    #[arg(long, default_value_t = 100)]
    pub leases: usize,
    /// Image folder whose marks/ the experts answer with (else a synthetic red block)
    #[arg(long)]
    pub marks: Option<PathBuf>,
    /// Share of each mark's pixels kept
    #[arg(long, default_value_t = 1.0)]
    pub partial: f64,
    /// Probability of flipping a marked pixel's colour
    #[arg(long, default_value_t = 0.0)]
    pub noise: f64,
    #[arg(long, default_value_t = 0.0)]
    pub skip_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub abandon_rate: f64,
    /// Milliseconds each expert looks at an image
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// Wait for the queue to refill instead of stopping when it is empty
    #[arg(long)]
    pub wait: bool,
    /// Wait for each proposal and commit it (reject it if validation accuracy fell > 5 points)
    #[arg(long)]
    pub commit: bool,
    /// Probability of accepting an image's suggested mark (when its red part overlaps the
    /// ground truth by at least --accept-min-iou) instead of painting the ground truth
    #[arg(long, default_value_t = 0.0)]
    pub accept: f64,
    #[arg(long, default_value_t = 0.5)]
    pub accept_min_iou: f64,
}

/// One client per simulated expert, each with a token created through the admin API.
pub async fn sim_clients(
    addr: &str,
    admin_token: &str,
    n: usize,
    tag: &str,
) -> Result<Vec<Client>> {
    let admin = Client::connect(addr, admin_token).await?;
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let r = mp_api::create_expert(
            &admin,
            &format!("{tag}-{k}"),
            "expert",
            Duration::from_secs(10),
        )
        .await
        .map_err(|s| anyhow::anyhow!("creating expert: {}", s.message()))?;
        out.push(Client::new(addr, &r.token)?);
    }
    Ok(out)
}

pub fn expert_sim(a: SimArgs) -> Result<()> {
    runtime()?.block_on(async {
        let clients = sim_clients(&a.addr, &a.token, a.experts, "sim").await?;
        let cfg = SimConfig {
            experts: a.experts,
            leases: a.leases,
            marks: a.marks.clone().map(MarkSource::Folder).unwrap_or(MarkSource::Synthetic),
            partial: a.partial,
            noise: a.noise,
            skip_rate: a.skip_rate,
            abandon_rate: a.abandon_rate,
            think: Duration::from_millis(a.think_ms),
            stop_when_empty: !a.wait,
            commit: a.commit,
            accept: a.accept,
            accept_min_iou: a.accept_min_iou,
            ..Default::default()
        };
        let r = sim::run(clients, cfg).await;
        if a.accept > 0.0 {
            let done: Vec<_> = r.events.iter().filter(|e| e.outcome == Outcome::Submitted).collect();
            println!(
                "suggestions: {} of {} submitted images had one, {} accepted; pixels painted {}, accepted {}",
                done.iter().filter(|e| e.suggested).count(),
                done.len(),
                done.iter().filter(|e| e.accepted > 0).count(),
                done.iter().map(|e| e.painted).sum::<usize>(),
                done.iter().map(|e| e.accepted).sum::<usize>()
            );
        }
        if a.commit {
            let mut decisions: std::collections::BTreeMap<String, usize> = Default::default();
            for e in &r.events {
                if let Some(d) = &e.decision {
                    *decisions.entry(d.clone()).or_default() += 1;
                }
            }
            println!("proposals: {decisions:?}");
        }
        println!(
            "{} experts, {} leases in {:.1} s: {} submitted, {} skipped, {} abandoned, {} failed, {} retries",
            a.experts,
            r.events.len(),
            r.elapsed.as_secs_f64(),
            r.count(Outcome::Submitted),
            r.count(Outcome::Skipped),
            r.count(Outcome::Abandoned),
            r.count(Outcome::Failed),
            r.retries
        );
        for e in r.errors.iter().take(5) {
            println!("  error: {e}");
        }
        if r.count(Outcome::Failed) > 0 {
            bail!("{} operations failed", r.count(Outcome::Failed));
        }
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Create an expert (or admin) and print its token
    CreateExpert {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long, env = "MP_TOKEN")]
        token: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "expert")]
        role: String,
    },
}

pub fn admin(cmd: AdminCmd) -> Result<()> {
    let AdminCmd::CreateExpert {
        addr,
        token,
        name,
        role,
    } = cmd;
    runtime()?.block_on(async {
        let c = Client::connect(&addr, &token).await?;
        let r = c
            .admin
            .clone()
            .create_expert(mp_proto::v1::CreateExpertRequest { name, role })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        println!("expert {} token {}", r.expert_id, r.token);
        Ok(())
    })
}

/// A synthetic project for queue tests and benchmarks: `n` images of 8x8, no model file.
pub async fn synthetic_project(store: &Store, n: usize, images: &Path) -> Result<String> {
    store
        .set_project(&ProjectInfo {
            name: "synthetic".into(),
            classes: vec!["a".into(), "b".into()],
            width: 8,
            height: 8,
            channels: 1,
            image_store: images.display().to_string(),
        })
        .await?;
    let records: Vec<ImageRecord> = (0..n)
        .map(|i| ImageRecord {
            id: format!("a/{i:06}"),
            name: format!("{i:06}"),
            label: (i % 2) as u32,
            width: 8,
            height: 8,
            channels: 1,
            pixels: vec![(i % 251) as u8; 64],
        })
        .collect();
    store.put_images(&records).await?;
    store
        .publish_version(&ModelVersionRecord {
            version: 1,
            parent: 0,
            created_ms: mp_store::now_ms(),
            reason: "synthetic".into(),
            val_accuracy: 0.0,
            val_loss: 0.0,
            test_accuracy: 0.0,
            file: "missing.safetensors".into(),
        })
        .await?;
    store.ensure_job_groups().await?;
    let items: Vec<(String, f64)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), (i % 997) as f64 / 997.0))
        .collect();
    store.enqueue(&items).await?;
    let (_, token) = store.create_expert("admin", Role::Admin).await?;
    Ok(token)
}

/// A redis-server and an in-process gateway on free ports, for benchmarks.
pub struct LocalPlatform {
    /// The directory it keeps its data in (Redis's files, checkpoints, images).
    pub dir: PathBuf,
    pub redis: mp_store::server::RedisServer,
    pub addr: String,
    pub store: Store,
    gateway: mp_gateway::Spawned,
}

impl LocalPlatform {
    pub async fn start(dir: &Path, lease_ttl_ms: u64) -> Result<LocalPlatform> {
        let redis = mp_store::server::RedisServer::start_free(dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cfg = GatewayConfig {
            redis_url: redis.url(),
            metrics_listen: String::new(),
            checkpoints: dir.join("checkpoints"),
            lease_ttl_ms,
            ..Default::default()
        };
        let gateway = mp_gateway::Spawned::start(listener, cfg)?;
        let store = Store::connect(&redis.url(), "mp").await?;
        Ok(LocalPlatform {
            dir: dir.to_path_buf(),
            redis,
            addr: format!("http://{}", gateway.local_addr),
            store,
            gateway,
        })
    }

    pub async fn stop(self) {
        self.gateway.stop().await
    }
}
