//! A project's own model: the project config (TOML), importing a TorchScript module with it,
//! and `mp export` back to PyTorch.
//!
//! ```toml
//! # project.toml
//! classes = ["benign", "malignant"]   # in the order of the module's outputs
//! batch_norm = "frozen"                # or "batch"
//!
//! [input]
//! channels = 3
//! height = 224
//! width = 224
//! resize = "stretch"                   # or "refuse": images of another size are an error
//! mean = [0.485, 0.456, 0.406]         # (x - mean) / std on pixels in [0, 1]; omit for none
//! std = [0.229, 0.224, 0.225]
//! ```

use crate::platform::runtime;
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_core::model::{Arch, BatchNorm, Model, ModelSpec, ScriptSpec};
use mp_store::Store;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Class names in the order of the model's outputs.
    pub classes: Vec<String>,
    #[serde(default)]
    pub batch_norm: BatchNorm,
    pub input: InputConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default)]
    pub resize: ResizePolicy,
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizePolicy {
    /// Every image is resized to the input size (marks nearest-neighbour).
    #[default]
    Stretch,
    /// An image of another size is refused, naming the file.
    Refuse,
}

impl ProjectConfig {
    pub fn load(path: &Path) -> Result<ProjectConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading project config {}", path.display()))?;
        let c: ProjectConfig =
            toml::from_str(&text).with_context(|| format!("project config {}", path.display()))?;
        if c.classes.len() < 2 {
            bail!("{}: `classes` needs at least 2 names", path.display());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = c.classes.iter().find(|n| !seen.insert(n.as_str())) {
            bail!("{}: class {d:?} is listed twice", path.display());
        }
        Ok(c)
    }

    /// The (width, height) images are resized to, if the policy resizes.
    pub fn resize(&self) -> Option<(u32, u32)> {
        (self.input.resize == ResizePolicy::Stretch)
            .then_some((self.input.width as u32, self.input.height as u32))
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            arch: Arch::TorchScript,
            classes: self.classes.clone(),
            channels: self.input.channels,
            height: self.input.height,
            width: self.input.width,
            version: 1,
            script: Some(ScriptSpec {
                module: String::new(),
                mean: self.input.mean.clone(),
                std: self.input.std.clone(),
                batch_norm: self.batch_norm,
            }),
        }
    }
}

/// True for a file that looks like a TorchScript archive (a zip), as opposed to one of our
/// safetensors checkpoints.
pub fn is_torchscript_file(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("opening model {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok((n == 4 && magic == *b"PK\x03\x04") || matches!(ext.as_str(), "pt" | "pth" | "ts"))
}

/// Imports a user's module for `config` on `device`, with a one-paragraph report.
pub fn import_module(path: &Path, config: &ProjectConfig, device: tch::Device) -> Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let model = Model::import(bytes, config.spec(), device)
        .with_context(|| format!("importing {}", path.display()))?;
    let kinds = model.layer_kinds()?;
    let count = |pat: &str| kinds.iter().filter(|(_, t)| t.contains(pat)).count();
    let params: i64 = model
        .var_store()
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    println!(
        "imported {}: {} trainable parameters, {} layers ({} batch norm, {} dropout; batch norm {}), input {}x{}x{}, {} classes",
        path.display(),
        params,
        kinds.len().saturating_sub(1),
        count("BatchNorm"),
        count("Dropout"),
        match config.batch_norm {
            BatchNorm::Frozen => "frozen: evaluation mode everywhere",
            BatchNorm::Batch => "batch statistics in training steps",
        },
        config.input.channels,
        config.input.height,
        config.input.width,
        config.classes.len()
    );
    Ok(model)
}

/// Where a project lives: its Redis, key prefix and checkpoint directory.
#[derive(Args, Clone)]
pub struct ProjectPlace {
    #[arg(long, env = "MP_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, default_value = "mp")]
    pub prefix: String,
    /// The project's (shared) checkpoint directory
    #[arg(long, default_value = "checkpoints")]
    pub checkpoints: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model version to export (default: the current one)
    #[arg(long)]
    pub version: Option<u64>,
    #[command(flatten)]
    pub place: ProjectPlace,
    /// Output directory (default: export-v<N>)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Writes a version as `model.pt` (TorchScript, for an imported module) and
/// `state_dict.safetensors`.
pub fn export(a: ExportArgs) -> Result<Vec<PathBuf>> {
    let rec = runtime()?.block_on(async {
        let store = Store::connect(&a.place.redis_url, &a.place.prefix)
            .await
            .with_context(|| format!("connecting to {}", a.place.redis_url))?;
        let v = match a.version {
            Some(v) => v,
            None => store.current_version().await?,
        };
        store
            .version(v)
            .await
            .with_context(|| format!("model version {v}"))
    })?;
    let path = a.place.checkpoints.join(&rec.file);
    let model = Model::load(&path, tch::Device::Cpu)?;
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("export-v{}", rec.version)));
    let files = model.export(&out)?;
    for f in &files {
        println!("{}", f.display());
    }
    if model.spec.arch != Arch::TorchScript {
        println!(
            "version {} is a built-in {}: state_dict only (TorchScript export is for imported modules)",
            rec.version, model.spec.arch
        );
    }
    Ok(files)
}
