//! `mp project init`: an image folder streamed into the project a chunk at a time — listed,
//! decoded on all cores, fitted to the model's input, scored by the base model and stored in
//! the image store (pixels) and Redis (metadata, queue) — so that a folder far larger than
//! memory can be brought in.

use crate::common::{bar, parse_size};
use crate::platform::runtime;
use crate::project::{ProjectConfig, ProjectPlace};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_core::data::folder::{list_image_folder, DecodeOptions, FolderListing, Listed};
use mp_core::data::Dataset;
use mp_core::model::{Arch, Model, ModelSpec};
use mp_core::train::{evaluate, predict, train, Eval, TrainConfig};
use mp_store::{ImageRecord, ModelVersionRecord, ProjectInfo, Role, Store};
use std::path::PathBuf;

/// Images decoded, scored and stored at a time by `project init`.
pub const INIT_CHUNK: usize = 256;

#[derive(Args)]
pub struct InitArgs {
    /// Image folder (ROOT/{train,val,test}/{class}/*.png)
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub place: ProjectPlace,
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
    /// The queue's first order, before any mark, for the workers' ordering: attention (each
    /// class's most confident images first), alignment and margin (least certain first),
    /// or random
    #[arg(long, default_value = "attention")]
    pub ordering: String,
    /// Where the pixels go: a directory, or an s3://, gs:// or az:// URL (credentials from
    /// the environment, as each provider's tools read them). Default: `images` in the
    /// checkpoint directory, which every node already shares
    #[arg(long, env = "MP_IMAGE_STORE")]
    pub image_store: Option<String>,
    /// Leave out files that cannot be read or decoded (they are listed) instead of refusing
    #[arg(long)]
    pub skip_bad: bool,
    /// Start over when the prefix already holds a project: delete it (every key under the
    /// prefix) and initialise again. Without it a second init does nothing
    #[arg(long)]
    pub force: bool,
    /// Where the admin token goes (created with mode 0600; never printed unless
    /// --print-token). Not used when MP_ADMIN_TOKEN gives the token
    #[arg(long, default_value = "admin.token")]
    pub token_file: PathBuf,
    /// Also print the admin token on stdout (for scripts)
    #[arg(long)]
    pub print_token: bool,
    /// How many different experts mark each image, in turn and blind (1: one; `mp project
    /// overlap N` changes it later)
    #[arg(long, default_value_t = 1)]
    pub overlap: u32,
    /// With overlap > 1: images whose marks agree less (pixel-wise Fleiss' kappa) go to a
    /// reviewer; the others are merged by majority
    #[arg(long, default_value_t = mp_store::DEFAULT_REVIEW_BELOW)]
    pub review_below: f64,
    /// The admin's token chosen by the operator (from the environment only, MP_ADMIN_TOKEN:
    /// a Kubernetes Secret, say); else one is made
    #[arg(skip)]
    pub admin_token: Option<String>,
}

impl InitArgs {
    /// Defaults for a project on `data`: a small CNN trained 4 epochs, prefix `mp`.
    pub fn new(data: PathBuf, redis_url: String, checkpoints: PathBuf) -> Self {
        InitArgs {
            data,
            place: ProjectPlace {
                redis_url,
                prefix: "mp".into(),
                checkpoints,
            },
            model: None,
            config: None,
            epochs: 4,
            arch: "small-cnn".into(),
            resize: None,
            admin_name: "admin".into(),
            ordering: "attention".into(),
            image_store: None,
            skip_bad: false,
            force: false,
            token_file: PathBuf::from("admin.token"),
            print_token: false,
            overlap: 1,
            review_below: mp_store::DEFAULT_REVIEW_BELOW,
            admin_token: None,
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

/// Each image's class probabilities, in batches.
fn probabilities(model: &Model, ds: &Dataset) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ds.len());
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(512) {
        let (x, _) = ds.batch(chunk, model.device());
        let probs = predict(model, &x);
        for k in 0..chunk.len() {
            out.push(Vec::<f32>::try_from(&probs.get(k as i64))?);
        }
    }
    Ok(out)
}

/// Initial priorities: the uncertainty margin of every image (no mark exists yet).
pub fn margin_priorities(model: &Model, ds: &Dataset) -> Result<Vec<f64>> {
    Ok(probabilities(model, ds)?
        .iter()
        .map(|p| mp_core::align::margin_score(p))
        .collect())
}

/// The project config a TorchScript `--model` needs; `None` for our own checkpoints and the
/// built-in architectures.
fn project_config(a: &InitArgs) -> Result<Option<ProjectConfig>> {
    match &a.model {
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
            Ok(Some(ProjectConfig::load(&path)?))
        }
        _ => Ok(None),
    }
}

/// Where each folder class goes in the model's output order; every folder class must be one
/// of the model's (classes without images are allowed: the model still has their outputs).
fn class_map(folder: &[String], model: &[String], whose: &str) -> Result<Vec<i64>> {
    folder
        .iter()
        .map(|c| {
            model
                .iter()
                .position(|k| k == c)
                .map(|i| i as i64)
                .with_context(|| format!("class folder {c:?} is not in {whose} {model:?}"))
        })
        .collect()
}

/// The files that could not be read or decoded. Without `--skip-bad` the first one turns the
/// rest of the pass into a check: nothing more is stored, every file is still decoded so
/// that all bad ones are named at once, and what was stored is taken back.
struct BadFiles {
    skip: bool,
    files: std::collections::BTreeMap<PathBuf, String>,
}

impl BadFiles {
    fn add(&mut self, bad: Vec<(PathBuf, String)>) {
        self.files.extend(bad);
    }

    fn refusing(&self) -> bool {
        !self.skip && !self.files.is_empty()
    }

    fn refusal(&self) -> anyhow::Error {
        let bad: Vec<(PathBuf, String)> = self.files.clone().into_iter().collect();
        match mp_core::data::folder::refuse_bad(bad) {
            Err(e) => anyhow::anyhow!("{e}\n(pass --skip-bad to leave such files out)"),
            Ok(()) => anyhow::anyhow!("no bad file"),
        }
    }
}

/// Mean CE and accuracy over chunks, weighted by their sizes.
#[derive(Default)]
struct Scores {
    n: usize,
    loss: f64,
    correct: f64,
}

impl Scores {
    fn add(&mut self, e: &Eval, n: usize) {
        self.n += n;
        self.loss += e.loss * n as f64;
        self.correct += e.accuracy * n as f64;
    }

    fn eval(&self) -> Option<Eval> {
        (self.n > 0).then(|| Eval {
            loss: self.loss / self.n as f64,
            accuracy: self.correct / self.n as f64,
        })
    }
}

/// The built-in architecture's base model, trained on the training files decoded in memory
/// (demo-sized data; an imported model needs no training pass). `None` when a bad file
/// turned init into a refusal.
fn train_base_model(
    a: &InitArgs,
    listing: &FolderListing,
    files: &[Listed],
    resize: Option<(u32, u32)>,
    bad: &mut BadFiles,
) -> Result<Option<Model>> {
    let pb = bar(files.len() as u64, "decoding train");
    let d = listing.decode(
        files,
        DecodeOptions {
            grayscale: None,
            size: resize,
            resize: resize.is_some(),
            marks: false,
        },
        &|n| pb.inc(n),
    )?;
    pb.finish_and_clear();
    bad.add(d.bad);
    if bad.refusing() {
        return Ok(None);
    }
    let train_ds = d.dataset;
    if train_ds.is_empty() {
        bail!("{}: train/ holds no readable image", a.data.display());
    }
    tch::manual_seed(0);
    let spec = ModelSpec::for_dataset(a.arch.parse::<Arch>()?, &train_ds);
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
    Ok(Some(m))
}

/// `mp project init`: initialises the project unless the prefix holds one already (then
/// nothing is done, unless `--force`), and hands the admin token over without logging it.
pub fn init_command(mut a: InitArgs) -> Result<()> {
    a.admin_token = std::env::var("MP_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let (file, print, given) = (a.token_file.clone(), a.print_token, a.admin_token.is_some());
    let Some(token) = project_init(a)? else {
        return Ok(());
    };
    if given {
        println!("the admin's token is the one in MP_ADMIN_TOKEN");
    } else {
        crate::common::write_secret(&file, &token)?;
        println!("admin token written to {} (mode 0600)", file.display());
    }
    if print {
        println!("{token}");
    }
    Ok(())
}

/// Connects to the project at `place`, refusing when no project was initialised there.
async fn existing_project(place: &ProjectPlace) -> Result<Store> {
    let store = Store::connect(&place.redis_url, &place.prefix)
        .await
        .with_context(|| format!("connecting to {}", place.redis_url))?;
    if store.project().await?.is_none() {
        bail!(
            "no project under prefix {}: run `mp project init` first",
            place.prefix
        );
    }
    Ok(store)
}

/// `mp project overlap N`: how many different experts mark each image from now on.
pub fn overlap_command(n: u32, place: &ProjectPlace) -> Result<()> {
    runtime()?.block_on(async {
        let store = existing_project(place).await?;
        let before = store.overlap().await?;
        store.set_overlap(n).await?;
        println!(
            "overlap {before} -> {n}: each image now goes to {n} different expert(s), in turn"
        );
        Ok(())
    })
}

/// `mp project review-below K`: the agreement below which marks go to a reviewer.
pub fn review_below_command(kappa: f64, place: &ProjectPlace) -> Result<()> {
    runtime()?.block_on(async {
        let store = existing_project(place).await?;
        let before = store.review_below().await?;
        store.set_review_below(kappa).await?;
        println!(
            "review below kappa {before} -> {kappa}: images whose marks agree less go to a reviewer"
        );
        Ok(())
    })
}

/// Initialises the project; returns the admin token, or `None` when the prefix already
/// holds a project and `force` is off (nothing is done: init is safe to run twice).
///
/// The folder is listed first, then streamed `INIT_CHUNK` images at a time: decoded (on all
/// cores), fitted to the model's input (channels, resize policy), scored by the base model
/// (queue priority, or val/test accuracy) and stored; memory holds one chunk, never the
/// folder. The project, its first version, its queue and its admin are written only after
/// every image is stored, so a refused init leaves no project behind.
pub fn project_init(a: InitArgs) -> Result<Option<String>> {
    let rt = runtime()?;
    let store = rt
        .block_on(Store::connect(&a.place.redis_url, &a.place.prefix))
        .with_context(|| format!("connecting to {}", a.place.redis_url))?;
    if let Some(p) = rt.block_on(store.project())? {
        if !a.force {
            println!(
                "{} already holds the project {} (prefix {}): nothing to do (--force deletes it and starts over)",
                a.place.redis_url, p.name, a.place.prefix
            );
            return Ok(None);
        }
        let n = rt.block_on(store.delete_project())?;
        println!(
            "--force: deleted the project {} ({n} keys under {}:)",
            p.name, a.place.prefix
        );
    }
    let config = project_config(&a)?;
    let ordering = a.ordering.parse::<mp_core::align::Ordering>()?;
    let listing = list_image_folder(&a.data)?;
    let resize = a.resize.or(config.as_ref().and_then(|c| c.resize()));
    let train_all = listing.splits[0].clone().unwrap_or_default();
    // No val/: hold out part of train (never the test split: it is for scoring only).
    let (train_files, val_files) = match &listing.splits[1] {
        Some(v) => (train_all, v.clone()),
        None => {
            let labels: Vec<i64> = train_all.iter().map(|l| l.class as i64).collect();
            let (t, v) = crate::common::carve_indices(&labels, listing.classes.len(), 0);
            let pick = |idx: &[usize]| idx.iter().map(|&i| train_all[i].clone()).collect();
            println!(
                "{} has no val/ split: {} of its {} training images ({:.0} % per class) are held out as val",
                a.data.display(),
                v.len(),
                train_all.len(),
                100.0 * crate::common::CARVED_VAL_SHARE
            );
            (pick(&t), pick(&v))
        }
    };
    let test_files = listing.splits[2].clone().unwrap_or_default();
    std::fs::create_dir_all(&a.place.checkpoints)
        .with_context(|| format!("creating {}", a.place.checkpoints.display()))?;
    let mut bad = BadFiles {
        skip: a.skip_bad,
        files: Default::default(),
    };
    let model = match (&a.model, &config) {
        (Some(p), Some(c)) => Some(crate::project::import_module(
            p,
            c,
            mp_core::device::auto(),
        )?),
        (Some(p), None) => Some(Model::load(p, mp_core::device::auto())?),
        (None, _) => train_base_model(&a, &listing, &train_files, resize, &mut bad)?,
    };
    let (classes, shape, map) = match &model {
        Some(m) => {
            let s = &m.spec;
            if let Some((w, h)) = a.resize {
                if (w as usize, h as usize) != (s.width, s.height) {
                    bail!(
                        "--resize {w}x{h} does not match the model's input {}x{}",
                        s.width,
                        s.height
                    );
                }
            }
            let whose = match &config {
                Some(_) => "the project config's classes",
                None => "the model's classes",
            };
            let map = class_map(&listing.classes, &s.classes, whose)?;
            (s.classes.clone(), (s.channels, s.width, s.height), map)
        }
        None => (listing.classes.clone(), (1, 0, 0), Vec::new()),
    };
    let opts = match model {
        Some(_) => DecodeOptions {
            grayscale: Some(shape.0 == 1),
            size: Some((shape.1 as u32, shape.2 as u32)),
            resize: resize.is_some(),
            marks: false,
        },
        // Refusing already: the rest is only checked for files that cannot be decoded.
        None => DecodeOptions {
            resize: true,
            ..Default::default()
        },
    };
    let images_url = match &a.image_store {
        Some(u) => u.clone(),
        None => a
            .place
            .checkpoints
            .canonicalize()
            .with_context(|| format!("resolving {}", a.place.checkpoints.display()))?
            .join("images")
            .display()
            .to_string(),
    };
    let images = mp_store::ImageStore::open(&images_url, 0)?;
    let store = store.with_image_store(images);

    let total = train_files.len() + val_files.len() + test_files.len();
    let pb = bar(total as u64, "storing images");
    let mut rng = mp_core::rng::Rng::new(mp_store::now_ms());
    let mut items: Vec<(String, f64)> = Vec::new();
    // (label, confidence) of every training image, in `items`' order (attention ordering).
    let mut cold: Vec<(i64, f64)> = Vec::new();
    let mut stored: Vec<String> = Vec::new();
    let (mut val, mut test) = (Scores::default(), Scores::default());
    for (split, files) in [
        ("train", &train_files),
        ("val", &val_files),
        ("test", &test_files),
    ] {
        for chunk in files.chunks(INIT_CHUNK) {
            let d = listing
                .decode(chunk, opts, &|n| pb.inc(n))
                .with_context(|| match resize {
                    Some(_) => "fitting the image to the model's input".to_string(),
                    None => format!(
                        "the model's input is {}x{} and the resize policy is to refuse other sizes",
                        shape.1, shape.2
                    ),
                })?;
            bad.add(d.bad);
            let Some(model) = model.as_ref().filter(|_| !bad.refusing()) else {
                continue; // checking only: every bad file is named at once
            };
            let mut ds = d.dataset;
            for l in ds.labels.iter_mut() {
                *l = map[*l as usize];
            }
            ds.classes = classes.clone();
            if ds.is_empty() {
                continue;
            }
            let mut records: Vec<ImageRecord> =
                (0..ds.len()).map(|i| image_record(&ds, i)).collect();
            if split == "train" {
                let prios =
                    match ordering {
                        mp_core::align::Ordering::Random => {
                            (0..ds.len()).map(|_| 2.0 * rng.next_f64() - 1.0).collect()
                        }
                        mp_core::align::Ordering::Attention => {
                            // Ranked per class over the whole split once it is read.
                            let probs = probabilities(model, &ds)?;
                            cold.extend(ds.labels.iter().zip(&probs).map(|(&l, p)| {
                                (l, p.get(l as usize).map_or(f64::NAN, |&c| c as f64))
                            }));
                            vec![0.0; ds.len()]
                        }
                        _ => margin_priorities(model, &ds)?,
                    };
                items.extend(records.iter().map(|r| r.id.clone()).zip(prios));
                rt.block_on(store.put_images(&records))?;
            } else {
                let e = evaluate(model, &ds, 512)?;
                match split {
                    "val" => val.add(&e, ds.len()),
                    _ => test.add(&e, ds.len()),
                }
                for r in records.iter_mut() {
                    r.id = format!("{split}:{}", r.id);
                }
                rt.block_on(store.put_held_out(split, &records))?;
            }
            stored.extend(records.into_iter().map(|r| r.id));
        }
    }
    pb.finish_and_clear();
    if !cold.is_empty() {
        let (labels, conf): (Vec<i64>, Vec<f64>) = cold.into_iter().unzip();
        for (item, r) in items
            .iter_mut()
            .zip(mp_core::align::confidence_ranks(&conf, &labels))
        {
            item.1 = r;
        }
    }
    if bad.refusing() {
        rt.block_on(store.forget_images(&stored))?;
        return Err(bad.refusal());
    }
    let model = model.context("no base model")?;
    if !bad.files.is_empty() {
        println!(
            "left out {} files that cannot be read as images (--skip-bad):",
            bad.files.len()
        );
        for (p, why) in &bad.files {
            println!("  {}: {why}", p.display());
        }
    }
    if items.is_empty() {
        bail!("{}: train/ holds no readable image", a.data.display());
    }
    let v = val
        .eval()
        .with_context(|| format!("{}: no readable validation image", a.data.display()))?;
    let t = test.eval();
    let file = "v1.safetensors".to_string();
    model.save(&a.place.checkpoints.join(&file))?;
    let token = rt.block_on(async {
        println!("images stored in {}", store.image_store().await?.url());
        store
            .set_project(&ProjectInfo {
                name: a.data.display().to_string(),
                classes: classes.clone(),
                width: shape.1 as u32,
                height: shape.2 as u32,
                channels: shape.0 as u32,
                image_store: store.image_store().await?.url().to_string(),
            })
            .await?;
        store.set_overlap(a.overlap).await?;
        store.set_review_below(a.review_below).await?;
        store
            .publish_version(&ModelVersionRecord {
                version: 1,
                parent: 0,
                created_ms: mp_store::now_ms(),
                reason: "base model".into(),
                val_accuracy: v.accuracy,
                val_loss: v.loss,
                test_accuracy: t.as_ref().map(|t| t.accuracy).unwrap_or(f64::NAN),
                file,
            })
            .await?;
        store.ensure_job_groups().await?;
        let queued = store.enqueue(&items).await?;
        let token = match &a.admin_token {
            Some(t) => {
                store
                    .create_expert_with_token(&a.admin_name, Role::Admin, t)
                    .await?;
                t.clone()
            }
            None => store.create_expert(&a.admin_name, Role::Admin).await?.1,
        };
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
    Ok(Some(token))
}
