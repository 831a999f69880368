//! `mp bench speed`: this engine against `benches/torch_reference.py` doing the same
//! computations (same model, sizes, device and thread count), timed in the same run, plus the
//! product-level proposal latency on real Decoy-MNIST marks. `--arch resnet18 --side 224`
//! gives the rows for a real architecture; `--device cuda` the same rows on a GPU.

use crate::common::{load_splits, DataArgs};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_core::loss::{guided_forward, SaliencyLoss};
use mp_core::model::{Arch, Model, ModelSpec};
use mp_core::refine::{refine, RefineConfig};
use mp_core::saliency::{saliency_maps, Method};
use mp_core::train::{train, OptimizerKind, TrainConfig};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct SpeedArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Python with torch 2.11 for the reference
    #[arg(long, env = "MP_PYTHON", default_value = "python3")]
    pub python: String,
    #[arg(long, default_value = "benches/torch_reference.py")]
    pub script: PathBuf,
    /// Threads for both engines
    #[arg(long, default_value_t = 2)]
    pub bench_threads: i32,
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Rust / PyTorch rounds, interleaved; the best median of each side is kept
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Proposals timed for the latency percentiles
    #[arg(long, default_value_t = 30)]
    pub proposals: usize,
    /// cpu, cuda or cuda:N, for both engines
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// small-cnn or resnet18 (the same layout in the reference script)
    #[arg(long, default_value = "small-cnn")]
    pub arch: String,
    /// A TorchScript module (10 outputs) timed in both engines instead of --arch: the engine
    /// imports it (batch norm frozen), the reference loads it with torch.jit.load and keeps
    /// it in evaluation mode
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Input side in pixels
    #[arg(long, default_value_t = 28)]
    pub side: i64,
    /// Input channels (default: 1 for small-cnn, 3 for resnet18)
    #[arg(long)]
    pub channels: Option<i64>,
    /// Iterations of the fixed-length refinement row
    #[arg(long, default_value_t = 20)]
    pub refine_iterations: usize,
    /// Validation images of the fixed-length refinement row
    #[arg(long, default_value_t = 256)]
    pub val_images: i64,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

impl SpeedArgs {
    fn arch(&self) -> Result<Arch> {
        Ok(match self.model {
            Some(_) => Arch::TorchScript,
            None => self.arch.parse::<Arch>()?,
        })
    }
    /// The model under test on `d`.
    fn build(&self, d: Device) -> Result<Model> {
        let spec = self.spec()?;
        crate::common::ModelChoice::new(&self.arch, self.model.as_deref())?.build(
            spec.classes,
            (spec.channels, spec.height, spec.width),
            d,
        )
    }
    fn channels(&self) -> Result<i64> {
        Ok(self.channels.unwrap_or(match self.arch()? {
            Arch::SmallCnn => 1,
            Arch::Resnet18 | Arch::TorchScript => 3,
        }))
    }
    fn device(&self) -> Result<Device> {
        Ok(mp_core::device::parse(&self.device)?)
    }
    fn spec(&self) -> Result<ModelSpec> {
        Ok(ModelSpec {
            arch: self.arch()?,
            classes: (0..10).map(|d| d.to_string()).collect(),
            channels: self.channels()? as usize,
            height: self.side as usize,
            width: self.side as usize,
            version: 1,
            script: None,
        })
    }
    /// The default configuration keeps the historical section name.
    fn section(&self) -> Result<String> {
        let d = self.device()?;
        Ok(
            if d == Device::Cpu && self.arch()? == Arch::SmallCnn && self.side == 28 {
                "speed".into()
            } else {
                let dev = if d == Device::Cpu { "cpu" } else { "cuda" };
                match &self.model {
                    Some(p) => format!(
                        "speed-{dev}-torchscript-{}-{}",
                        p.file_stem()
                            .map(|f| f.to_string_lossy())
                            .unwrap_or_default(),
                        self.side
                    ),
                    None => format!("speed-{dev}-{}-{}", self.arch, self.side),
                }
            },
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Median seconds of `f`; on a GPU each repetition waits for its kernels before the clock
/// is read.
fn timed(d: Device, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    sync(d);
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        sync(d);
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(median(out))
}

fn sync(d: Device) {
    mp_core::device::synchronize(d)
}

const OPS: [&str; 5] = [
    "ce_step",
    "guided_step",
    "saliency_b1",
    "saliency_b64",
    "proposal_fixed",
];

fn small_spec() -> ModelSpec {
    ModelSpec {
        arch: Arch::SmallCnn,
        classes: (0..10).map(|d| d.to_string()).collect(),
        channels: 1,
        height: 28,
        width: 28,
        version: 1,
        script: None,
    }
}

/// The Rust side of every operation, on random inputs, as the reference script does it.
fn rust_round(a: &SpeedArgs) -> Result<Vec<f64>> {
    tch::manual_seed(0);
    let d = a.device()?;
    let spec = a.spec()?;
    let (c, side) = (a.channels()?, a.side);
    let model = a.build(d)?;
    let mut opt = tch::nn::Adam::default().build(model.var_store(), 1e-3)?;
    let b = a.batch;
    let x = Tensor::rand([b, c, side, side], (Kind::Float, d));
    let y = Tensor::randint(10, [b], (Kind::Int64, d));
    // The red mark: the top-left square of a seventh of the side (4 px at 28).
    let m = (side / 7).max(1);
    let marks = Tensor::zeros([b, 1, side, side], (Kind::Float, d));
    let _ = marks.narrow(2, 0, m).narrow(3, 0, m).fill_(1.0);
    let ce = timed(d, 5, a.reps, || {
        let loss = model.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.backward_step(&loss);
        Ok(())
    })?;
    let guided = timed(d, 5, a.reps, || {
        let out = guided_forward(&model, SaliencyLoss::Rrr, &x, &y, &marks, true)?;
        opt.backward_step(&(&out.ce + &out.saliency * 10.0));
        Ok(())
    })?;
    let (x1, y1) = (x.narrow(0, 0, 1), y.narrow(0, 0, 1));
    let s1 = timed(d, 5, a.reps * 4, || {
        saliency_maps(&model, &x1, &y1, Method::Gradient)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    let s64 = timed(d, 5, a.reps, || {
        saliency_maps(&model, &x, &y, Method::Gradient)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    // A fixed-length refinement on one random image, validation on random images.
    let (cu, su) = (c as usize, side as usize);
    let px = cu * su * su;
    let mut batch = mp_core::data::Dataset::new(spec.classes.clone(), cu, su, su);
    let img = Vec::<f32>::try_from(&x1.to_device(Device::Cpu).flatten(0, -1))?;
    let mut mask = mp_core::data::Mask::empty(su, su);
    for r in 0..m as usize {
        for col in 0..m as usize {
            mask.values[r * su + col] = 1;
        }
    }
    batch.push(&img, y1.int64_value(&[0]), Some(mask), "x".into());
    let nv = a.val_images;
    let mut val = mp_core::data::Dataset::new(spec.classes.clone(), cu, su, su);
    let vx = Vec::<f32>::try_from(&Tensor::rand([nv * px as i64], (Kind::Float, Device::Cpu)))?;
    let vy = Vec::<i64>::try_from(&Tensor::randint(10, [nv], (Kind::Int64, Device::Cpu)))?;
    for i in 0..nv as usize {
        val.push(&vx[i * px..(i + 1) * px], vy[i], None, format!("v{i}"));
    }
    let cfg = RefineConfig {
        loss: SaliencyLoss::Rrr,
        normalise: false,
        max_iterations: a.refine_iterations,
        time_budget_ms: None,
        val_guard: Some(1e9),
        halve_saliency: false,
        plateau_window: None,
        val_images: nv as usize,
        ..Default::default()
    };
    let prop = timed(d, 1, (a.reps / 6).max(3), || {
        refine(&model, &batch, &val, &cfg)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    Ok(vec![ce, guided, s1, s64, prop])
}

/// The GPU's name as the reference's torch reports it (for the report line).
fn gpu_name(python: &str) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.cuda.get_device_name(0))"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn torch_round(a: &SpeedArgs) -> Result<(Vec<f64>, String)> {
    let module: Vec<String> = match &a.model {
        Some(p) => vec!["--module".into(), p.display().to_string()],
        None => vec![],
    };
    let out = Command::new(&a.python)
        .arg(&a.script)
        .args(&module)
        .args([
            "--threads",
            &a.bench_threads.to_string(),
            "--batch",
            &a.batch.to_string(),
            "--reps",
            &a.reps.to_string(),
            "--device",
            &a.device,
            "--arch",
            &a.arch,
            "--side",
            &a.side.to_string(),
            "--channels",
            &a.channels()?.to_string(),
            "--refine-iterations",
            &a.refine_iterations.to_string(),
            "--val-images",
            &a.val_images.to_string(),
        ])
        .output()
        .with_context(|| format!("running {} {}", a.python, a.script.display()))?;
    if !out.status.success() {
        bail!(
            "reference script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reference output is not JSON")?;
    let times = OPS
        .iter()
        .map(|k| {
            v[k].as_f64()
                .with_context(|| format!("reference lacks {k}"))
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok((times, v["torch"].as_str().unwrap_or("?").to_string()))
}

/// Proposal latency with the product's default refinement settings, on real marked images
/// and a briefly trained decoy model.
fn proposal_latency(a: &SpeedArgs) -> Result<Option<Latency>> {
    if a.arch()? != Arch::SmallCnn {
        return Ok(None);
    }
    let Ok(splits) = load_splits(&a.data) else {
        return Ok(None);
    };
    let d = a.device()?;
    tch::manual_seed(0);
    let spec = ModelSpec {
        classes: splits.train.classes.clone(),
        channels: splits.train.channels,
        height: splits.train.height,
        width: splits.train.width,
        ..small_spec()
    };
    let mut model = Model::new(spec, d)?;
    let cfg = TrainConfig {
        epochs: 1,
        optimizer: OptimizerKind::Adam,
        ..Default::default()
    };
    let t = Instant::now();
    train(&mut model, &splits.train, &[], &cfg, &mut |_, _, _, _| {})?;
    sync(d);
    let epoch_s = t.elapsed().as_secs_f64();
    let marked = splits.train.marked_indices();
    let mut lat = Vec::new();
    let mut iters = 0usize;
    for &i in marked.iter().take(a.proposals) {
        let t = Instant::now();
        let p = refine(
            &model,
            &splits.train.subset(&[i]),
            &splits.val,
            &RefineConfig::default(),
        )?;
        lat.push(t.elapsed().as_secs_f64());
        iters += p.iterations;
    }
    if lat.is_empty() {
        return Ok(None);
    }
    let mean_iters = iters as f64 / lat.len() as f64;
    Ok(Some(Latency {
        lat,
        iters: mean_iters,
        epoch_s,
        train_images: splits.train.len(),
    }))
}

struct Latency {
    lat: Vec<f64>,
    iters: f64,
    epoch_s: f64,
    train_images: usize,
}

pub fn run(a: SpeedArgs) -> Result<()> {
    tch::set_num_threads(a.bench_threads);
    let d = a.device()?;
    let section = a.section()?;
    let mut rust = [f64::INFINITY; 5];
    let mut torch = [f64::INFINITY; 5];
    let mut version = String::new();
    for round in 0..a.rounds.max(1) {
        eprintln!("round {} of {}", round + 1, a.rounds.max(1));
        for (best, v) in rust.iter_mut().zip(rust_round(&a)?) {
            *best = best.min(v);
        }
        let (t, ver) = torch_round(&a)?;
        version = ver;
        for (best, v) in torch.iter_mut().zip(t) {
            *best = best.min(v);
        }
    }
    let latency = proposal_latency(&a)?;
    let names = [
        "CE training step (batch {b})",
        "guided step, rrr double backprop (batch {b})",
        "saliency map, batch 1",
        "saliency maps, batch {b}",
        "refinement proposal, {it} fixed iterations, 1 image, val {nv} (maps, val before and after, weights serialised)",
    ];
    let where_ = match d {
        Device::Cpu => format!("both engines on CPU with {} threads", a.bench_threads),
        _ => format!(
            "both engines on {} (CUDA), host threads {}",
            gpu_name(&a.python).unwrap_or_else(|| "the GPU".into()),
            a.bench_threads
        ),
    };
    let model_line = match a.arch()? {
        Arch::SmallCnn => "small CNN (thesis 3.1.3)".to_string(),
        Arch::Resnet18 => "ResNet-18 (the same layout in both: 3x3 stem up to 64 px, else the ImageNet stem; batch norm in training mode for steps, evaluation mode for saliency)".to_string(),
        Arch::TorchScript => format!(
            "TorchScript module {} (loaded in both, evaluation mode throughout: the engine's frozen batch norm)",
            a.model
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    };
    let mut s = format!(
        "## Speed: engine (tch) vs PyTorch {version}{}\n\nCommand: `mp bench speed {}`  \nDate: {}; machine: {}; {where_}, \
         median of {} repetitions, best of {} interleaved rounds. Same {model_line}, {}x{}x{} inputs, random data.\n\n\
         | operation | engine ms | PyTorch ms | ratio engine/PyTorch | engine per second |\n|---|---|---|---|---|\n",
        if section == "speed" { String::new() } else { format!(" ({})", &section["speed-".len()..]) },
        crate::report::command_args(),
        today(),
        machine_line(),
        a.reps,
        a.rounds.max(1),
        a.channels()?,
        a.side,
        a.side,
    );
    for (i, n) in names.iter().enumerate() {
        let per_s = match i {
            2 => format!("{:.0} maps/s", 1.0 / rust[i]),
            3 => format!("{:.0} maps/s", a.batch as f64 / rust[i]),
            _ => format!("{:.1} /s", 1.0 / rust[i]),
        };
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |\n",
            n.replace("{b}", &a.batch.to_string())
                .replace("{it}", &a.refine_iterations.to_string())
                .replace("{nv}", &a.val_images.to_string()),
            1e3 * rust[i],
            1e3 * torch[i],
            rust[i] / torch[i],
            per_s
        ));
    }
    match &latency {
        Some(l) => s.push_str(&format!(
            "\nOne epoch of CE training on {} real Decoy-MNIST images (batch 64, Adam): {:.1} s ({:.0} images/s). \
             Proposal latency with the default refinement settings (rrr, early stops on, val guard on 256 images) on {} real Decoy-MNIST marked images, \
             that model: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; {:.1} iterations on average.\n",
            l.train_images,
            l.epoch_s,
            l.train_images as f64 / l.epoch_s,
            l.lat.len(),
            1e3 * percentile(&l.lat, 0.5),
            1e3 * percentile(&l.lat, 0.9),
            1e3 * percentile(&l.lat, 1.0),
            l.iters
        )),
        None if a.arch()? != Arch::SmallCnn => {}
        None => s.push_str("\nProposal latency on real data skipped: no dataset (pass --data or --mnist).\n"),
    }
    println!("{s}");
    write_section(&a.out, &section, &s)?;
    Ok(())
}
