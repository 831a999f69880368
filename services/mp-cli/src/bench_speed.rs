//! `mp bench speed`: this engine against `benches/torch_reference.py` doing the same
//! computations (same model, sizes and thread count), timed in the same run, plus the
//! product-level proposal latency on real Decoy-MNIST marks.

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
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
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

fn timed(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(median(out))
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
    }
}

/// The Rust side of every operation, on random inputs, as the reference script does it.
fn rust_round(a: &SpeedArgs) -> Result<Vec<f64>> {
    tch::manual_seed(0);
    let model = Model::new(small_spec(), Device::Cpu)?;
    let mut opt = tch::nn::Adam::default().build(model.var_store(), 1e-3)?;
    let b = a.batch;
    let x = Tensor::rand([b, 1, 28, 28], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [b], (Kind::Int64, Device::Cpu));
    let marks = Tensor::zeros([b, 1, 28, 28], (Kind::Float, Device::Cpu));
    let _ = marks.narrow(2, 0, 4).narrow(3, 0, 4).fill_(1.0);
    let ce = timed(5, a.reps, || {
        let loss = model.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.backward_step(&loss);
        Ok(())
    })?;
    let guided = timed(5, a.reps, || {
        let out = guided_forward(&model, SaliencyLoss::Rrr, &x, &y, &marks, true)?;
        opt.backward_step(&(&out.ce + &out.saliency * 10.0));
        Ok(())
    })?;
    let (x1, y1) = (x.narrow(0, 0, 1), y.narrow(0, 0, 1));
    let s1 = timed(5, a.reps * 4, || {
        saliency_maps(&model, &x1, &y1, Method::Gradient)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    let s64 = timed(5, a.reps, || {
        saliency_maps(&model, &x, &y, Method::Gradient)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    // A fixed-length refinement on one random image, validation on 256 random images.
    let mut batch = mp_core::data::Dataset::new(model.spec.classes.clone(), 1, 28, 28);
    let img = Vec::<f32>::try_from(&x1.flatten(0, -1))?;
    let mut mask = mp_core::data::Mask::empty(28, 28);
    for r in 0..4 {
        for c in 0..4 {
            mask.values[r * 28 + c] = 1;
        }
    }
    batch.push(&img, y1.int64_value(&[0]), Some(mask), "x".into());
    let mut val = mp_core::data::Dataset::new(model.spec.classes.clone(), 1, 28, 28);
    let vx = Vec::<f32>::try_from(&Tensor::rand([256 * 784], (Kind::Float, Device::Cpu)))?;
    let vy = Vec::<i64>::try_from(&Tensor::randint(10, [256], (Kind::Int64, Device::Cpu)))?;
    for i in 0..256 {
        val.push(&vx[i * 784..(i + 1) * 784], vy[i], None, format!("v{i}"));
    }
    let cfg = RefineConfig {
        loss: SaliencyLoss::Rrr,
        normalise: false,
        max_iterations: 20,
        time_budget_ms: None,
        val_guard: Some(1e9),
        halve_saliency: false,
        plateau_window: None,
        val_images: 256,
        ..Default::default()
    };
    let prop = timed(1, (a.reps / 6).max(3), || {
        refine(&model, &batch, &val, &cfg)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    Ok(vec![ce, guided, s1, s64, prop])
}

fn torch_round(a: &SpeedArgs) -> Result<(Vec<f64>, String)> {
    let out = Command::new(&a.python)
        .arg(&a.script)
        .args([
            "--threads",
            &a.bench_threads.to_string(),
            "--batch",
            &a.batch.to_string(),
            "--reps",
            &a.reps.to_string(),
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
fn proposal_latency(a: &SpeedArgs) -> Result<Option<(Vec<f64>, f64)>> {
    let Ok(splits) = load_splits(&a.data) else {
        return Ok(None);
    };
    tch::manual_seed(0);
    let spec = ModelSpec {
        classes: splits.train.classes.clone(),
        channels: splits.train.channels,
        height: splits.train.height,
        width: splits.train.width,
        ..small_spec()
    };
    let mut model = Model::new(spec, Device::Cpu)?;
    let cfg = TrainConfig {
        epochs: 1,
        optimizer: OptimizerKind::Adam,
        ..Default::default()
    };
    train(&mut model, &splits.train, &[], &cfg, &mut |_, _, _, _| {})?;
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
    Ok(Some((lat, mean_iters)))
}

pub fn run(a: SpeedArgs) -> Result<()> {
    tch::set_num_threads(a.bench_threads);
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
        "refinement proposal, 20 fixed iterations, 1 image, val 256",
    ];
    let mut s = format!(
        "## Speed: engine (tch) vs PyTorch {version}\n\nCommand: `mp bench speed {}`  \nDate: {}; machine: {}; both engines on CPU with {} threads, \
         median of {} repetitions, best of {} interleaved rounds. Same small CNN (thesis 3.1.3), 28x28 inputs, random data.\n\n\
         | operation | engine ms | PyTorch ms | ratio engine/PyTorch | engine per second |\n|---|---|---|---|---|\n",
        std::env::args().skip(3).collect::<Vec<_>>().join(" "),
        today(),
        machine_line(),
        a.bench_threads,
        a.reps,
        a.rounds.max(1)
    );
    for (i, n) in names.iter().enumerate() {
        let per_s = match i {
            2 => format!("{:.0} maps/s", 1.0 / rust[i]),
            3 => format!("{:.0} maps/s", a.batch as f64 / rust[i]),
            _ => format!("{:.1} /s", 1.0 / rust[i]),
        };
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |\n",
            n.replace("{b}", &a.batch.to_string()),
            1e3 * rust[i],
            1e3 * torch[i],
            rust[i] / torch[i],
            per_s
        ));
    }
    match &latency {
        Some((lat, iters)) => s.push_str(&format!(
            "\nProposal latency with the default refinement settings (rrr, early stops on, val guard on 256 images) on {} real Decoy-MNIST marked images, \
             model trained 1 epoch: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; {:.1} iterations on average.\n",
            lat.len(),
            1e3 * percentile(lat, 0.5),
            1e3 * percentile(lat, 0.9),
            1e3 * percentile(lat, 1.0),
            iters
        )),
        None => s.push_str("\nProposal latency on real data skipped: no dataset (pass --data or --mnist).\n"),
    }
    println!("{s}");
    write_section(&a.out, "speed", &s)?;
    Ok(())
}
