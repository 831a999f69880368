//! `mp bench efficacy`: decoy-test accuracy against the number K of marked training images,
//! for each saliency loss, with and without mark propagation, over several seeds; the clean
//! model and the unguided decoy baseline as references; the thesis refinement loop (one
//! proposal per marked image, each committed) as its own rows. Hyper-parameters may be
//! chosen on the validation split (`--tune`), never on the test split.

use crate::common::{bar, load_splits, DataArgs, Splits};
use crate::plot::{line_plot, Series};
use crate::report::{machine_line, mean_sd, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_core::data::Dataset;
use mp_core::loss::SaliencyLoss;
use mp_core::model::{Arch, Model, ModelSpec};
use mp_core::refine::{refine, RefineConfig};
use mp_core::train::{evaluate, train, GuidanceConfig, OptimizerKind, TrainConfig};
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

#[derive(Args, Clone)]
pub struct EfficacyArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Seeds per configuration
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Numbers of marked training images ("all" = every marked image)
    #[arg(long, default_value = "5,10,25,50,100,all", value_delimiter = ',')]
    pub ks: Vec<String>,
    /// Saliency losses to compare
    #[arg(long, default_value = "clip,squared,rrr", value_delimiter = ',')]
    pub losses: Vec<String>,
    /// Propagation settings to run: off, on, or both
    #[arg(long, default_value = "both")]
    pub propagation: String,
    /// Training epochs of every model
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// λ per loss, e.g. rrr=1000,clip=10 (defaults: rrr 1000, clip 1, squared 1)
    #[arg(long, value_delimiter = ',')]
    pub lambda: Vec<String>,
    /// Marked images sampled per step
    #[arg(long, default_value_t = 16)]
    pub guidance_batch: usize,
    /// Choose λ per loss on the validation split first (K = --tune-k, propagation on)
    #[arg(long)]
    pub tune: bool,
    /// λ candidates for --tune
    #[arg(long, default_value = "1,10,100,1000,10000", value_delimiter = ',')]
    pub tune_lambdas: Vec<f64>,
    #[arg(long, default_value_t = 10)]
    pub tune_k: usize,
    /// K for the thesis-loop rows (0 = skip them)
    #[arg(long, default_value_t = 10)]
    pub thesis_k: usize,
    /// Markdown file to write the table into
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Accuracy-vs-K plot
    #[arg(long, default_value = "docs/efficacy.png")]
    pub plot: PathBuf,
}

#[derive(Clone, Debug)]
struct Row {
    method: String,
    loss: String,
    k: Option<usize>,
    propagate: bool,
    lambda: Option<f64>,
    test: Vec<f64>,
    val: Vec<f64>,
    seconds: Vec<f64>,
}

fn lambda_for(args: &EfficacyArgs, loss: &str) -> Result<f64> {
    for kv in &args.lambda {
        let (k, v) = kv.split_once('=').context("--lambda takes LOSS=VALUE")?;
        if k == loss {
            return v.parse().with_context(|| format!("--lambda {kv}"));
        }
    }
    Ok(match loss {
        "rrr" => 1000.0,
        _ => 1.0,
    })
}

fn fresh_model(ds: &Dataset, seed: u64) -> Result<Model> {
    tch::manual_seed(seed as i64);
    Ok(Model::new(
        ModelSpec {
            arch: Arch::SmallCnn,
            classes: ds.classes.clone(),
            channels: ds.channels,
            height: ds.height,
            width: ds.width,
            version: 1,
        },
        Device::cuda_if_available(),
    )?)
}

struct Runner<'a> {
    args: &'a EfficacyArgs,
    splits: &'a Splits,
    /// Marked training images in a seeded order per seed.
    order: Vec<Vec<usize>>,
}

impl Runner<'_> {
    fn config(&self, seed: u64, guidance: Option<GuidanceConfig>) -> TrainConfig {
        TrainConfig {
            epochs: self.args.epochs,
            batch_size: self.args.batch,
            lr: self.args.lr,
            optimizer: OptimizerKind::Adam,
            seed,
            guidance,
        }
    }

    /// Trains one model; returns it with its (val, test) accuracy and seconds.
    fn run(
        &self,
        train_ds: &Dataset,
        seed: u64,
        k: usize,
        guidance: Option<GuidanceConfig>,
    ) -> Result<(Model, f64, f64, f64)> {
        let mut model = fresh_model(train_ds, seed)?;
        let set = &self.order[seed as usize][..k];
        let t = Instant::now();
        train(
            &mut model,
            train_ds,
            set,
            &self.config(seed, guidance),
            &mut |_, _, _, _| {},
        )?;
        let secs = t.elapsed().as_secs_f64();
        let val = evaluate(&model, &self.splits.val, 512)?.accuracy;
        let test = evaluate(&model, &self.splits.test, 512)?.accuracy;
        Ok((model, val, test, secs))
    }
}

fn resolve_k(k: &str, marked: usize) -> Result<usize> {
    if k == "all" {
        return Ok(marked);
    }
    let v: usize = k
        .parse()
        .with_context(|| format!("K {k:?} is not a number or \"all\""))?;
    if v > marked {
        bail!("K = {v} but only {marked} training images carry a mark");
    }
    Ok(v)
}

pub fn run(args: EfficacyArgs) -> Result<()> {
    let splits = load_splits(&args.data)?;
    let marked = splits.train.marked_indices();
    if marked.is_empty() {
        bail!("{}: no training image carries a mark", splits.name);
    }
    let order: Vec<Vec<usize>> = (0..args.seeds)
        .map(|s| {
            let mut v = marked.clone();
            mp_core::rng::Rng::new(s ^ 0x6d61726b).shuffle(&mut v);
            v
        })
        .collect();
    let runner = Runner {
        args: &args,
        splits: &splits,
        order,
    };
    let props: Vec<bool> = match args.propagation.as_str() {
        "off" => vec![false],
        "on" => vec![true],
        "both" => vec![false, true],
        o => bail!("--propagation {o:?}: off, on or both"),
    };
    let ks: Vec<usize> = args
        .ks
        .iter()
        .map(|k| resolve_k(k, marked.len()))
        .collect::<Result<_>>()?;
    let losses: Vec<SaliencyLoss> = args
        .losses
        .iter()
        .map(|l| l.parse())
        .collect::<Result<_, _>>()?;
    let start = Instant::now();

    // λ per loss: given, default, or tuned on the validation split.
    let mut lambdas: Vec<(String, f64)> = Vec::new();
    let mut tuning: Vec<String> = Vec::new();
    for loss in &losses {
        let name = loss.name().to_string();
        let mut lambda = lambda_for(&args, &name)?;
        if args.tune {
            let pb = bar(args.tune_lambdas.len() as u64, &format!("tune {name}"));
            let mut best = (f64::NEG_INFINITY, lambda);
            for &l in &args.tune_lambdas {
                let g = GuidanceConfig {
                    loss: *loss,
                    lambda: l,
                    batch_size: args.guidance_batch,
                    propagate: true,
                };
                let (_, val, _, _) =
                    runner.run(&splits.train, 0, args.tune_k.min(marked.len()), Some(g))?;
                tuning.push(format!("| {name} | {l} | {:.2} |", 100.0 * val));
                if val > best.0 {
                    best = (val, l);
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
            lambda = best.1;
        }
        lambdas.push((name, lambda));
    }

    let mut rows: Vec<Row> = Vec::new();
    let n_runs = args.seeds as usize
        * (1 + usize::from(splits.clean.is_some())
            + losses.len()
                * ks.iter()
                    .map(|&k| {
                        if k == 0 {
                            0
                        } else if k == marked.len() {
                            1
                        } else {
                            props.len()
                        }
                    })
                    .sum::<usize>());
    let pb = bar(n_runs as u64, "efficacy");
    let row =
        |method: &str, loss: &str, k: Option<usize>, propagate: bool, lambda: Option<f64>| Row {
            method: method.into(),
            loss: loss.into(),
            k,
            propagate,
            lambda,
            test: vec![],
            val: vec![],
            seconds: vec![],
        };
    let mut baselines: Vec<Model> = Vec::new();
    if let Some((clean_train, _)) = &splits.clean {
        let mut r = row("clean-trained", "-", None, false, None);
        for seed in 0..args.seeds {
            let (_, val, test, secs) = runner.run(clean_train, seed, 0, None)?;
            r.val.push(val);
            r.test.push(test);
            r.seconds.push(secs);
            pb.inc(1);
        }
        rows.push(r);
    }
    let mut r = row("decoy baseline (K = 0)", "-", Some(0), false, None);
    for seed in 0..args.seeds {
        let (m, val, test, secs) = runner.run(&splits.train, seed, 0, None)?;
        baselines.push(m);
        r.val.push(val);
        r.test.push(test);
        r.seconds.push(secs);
        pb.inc(1);
    }
    rows.push(r);
    for (loss, (name, lambda)) in losses.iter().zip(&lambdas) {
        for &k in ks.iter().filter(|&&k| k > 0) {
            for &p in &props {
                if p && k == marked.len() {
                    continue; // every image has its own mark: nothing to propagate
                }
                let method = if p { "guided + propagation" } else { "guided" };
                let mut r = row(method, name, Some(k), p, Some(*lambda));
                for seed in 0..args.seeds {
                    let g = GuidanceConfig {
                        loss: *loss,
                        lambda: *lambda,
                        batch_size: args.guidance_batch,
                        propagate: p,
                    };
                    let (_, val, test, secs) = runner.run(&splits.train, seed, k, Some(g))?;
                    r.val.push(val);
                    r.test.push(test);
                    r.seconds.push(secs);
                    pb.inc(1);
                }
                rows.push(r);
            }
        }
    }
    pb.finish_and_clear();

    // The thesis loop: one refinement proposal per marked image, each committed in turn.
    if args.thesis_k > 0 {
        for loss in ["clip", "rrr"] {
            let mut r = row(
                "thesis refinement loop",
                loss,
                Some(args.thesis_k),
                false,
                None,
            );
            for seed in 0..args.seeds {
                let t = Instant::now();
                let mut current = baselines[seed as usize].try_clone()?;
                for &i in &runner.order[seed as usize][..args.thesis_k.min(marked.len())] {
                    let batch = splits.train.subset(&[i]);
                    let cfg = RefineConfig {
                        loss: loss.parse()?,
                        ..Default::default()
                    };
                    let p = refine(&current, &batch, &splits.val, &cfg)?;
                    current = Model::from_bytes(
                        &p.weights,
                        current.device(),
                        std::path::Path::new("proposal"),
                    )?;
                }
                r.val.push(evaluate(&current, &splits.val, 512)?.accuracy);
                r.test.push(evaluate(&current, &splits.test, 512)?.accuracy);
                r.seconds.push(t.elapsed().as_secs_f64());
            }
            rows.push(r);
        }
    }

    let text = render(
        &args,
        &splits,
        &rows,
        &lambdas,
        &tuning,
        start.elapsed().as_secs_f64(),
    );
    println!("{text}");
    write_section(&args.out, "efficacy", &text)?;
    plot(&args, &rows, marked.len())?;
    println!(
        "table written to {}, plot to {}",
        args.out.display(),
        args.plot.display()
    );
    Ok(())
}

fn pct(v: &[f64]) -> String {
    let (m, sd) = mean_sd(v);
    format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * sd)
}

fn render(
    args: &EfficacyArgs,
    splits: &Splits,
    rows: &[Row],
    lambdas: &[(String, f64)],
    tuning: &[String],
    secs: f64,
) -> String {
    let mut s = String::new();
    s.push_str(&format!("## Efficacy on {}\n\n", splits.name));
    s.push_str(&format!(
        "Command: `mp bench efficacy {}`  \nDate: {}; machine: {}; total {:.0} s.  \n",
        std::env::args().skip(3).collect::<Vec<_>>().join(" "),
        today(),
        machine_line(),
        secs
    ));
    s.push_str(&format!(
        "{} train / {} val / {} test images; small CNN (thesis 3.1.3), Adam lr {}, batch {}, {} epochs, guidance batch {}, {} seeds (mean ± sd). \
         Val is a held-out split (for Decoy-MNIST: random shades, disjoint digits); test is never used for choices. \
         λ: {}.\n\n",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        args.lr,
        args.batch,
        args.epochs,
        args.guidance_batch,
        args.seeds,
        lambdas.iter().map(|(l, v)| format!("{l} {v}")).collect::<Vec<_>>().join(", ")
    ));
    s.push_str("| method | loss | K marked | λ | val acc % | test acc % | s per run |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} |\n",
            r.method,
            r.loss,
            r.k.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
            r.lambda
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            pct(&r.val),
            pct(&r.test),
            mean_sd(&r.seconds).0
        ));
    }
    if !tuning.is_empty() {
        s.push_str(&format!(
            "\nλ chosen on the validation split (K = {}, propagation on, seed 0):\n\n| loss | λ | val acc % |\n|---|---|---|\n{}\n",
            args.tune_k,
            tuning.join("\n")
        ));
    }
    s.push_str(&format!("\n![accuracy vs K]({})\n", args.plot.display()));
    s
}

fn plot(args: &EfficacyArgs, rows: &[Row], all: usize) -> Result<()> {
    let x_of = |k: usize| ((k as f64) + 1.0).log10();
    let mut series = Vec::new();
    let max_x = x_of(all);
    for r in rows.iter().filter(|r| r.k.is_none() || r.k == Some(0)) {
        let (m, _) = mean_sd(&r.test);
        series.push(Series {
            label: r.method.clone(),
            points: vec![(0.0, 100.0 * m, 0.0), (max_x, 100.0 * m, 0.0)],
            dashed: true,
        });
    }
    let mut keys: Vec<(String, bool)> = Vec::new();
    for r in rows.iter().filter(|r| r.method.starts_with("guided")) {
        if !keys.contains(&(r.loss.clone(), r.propagate)) {
            keys.push((r.loss.clone(), r.propagate));
        }
    }
    for (loss, p) in keys {
        let mut pts: Vec<(f64, f64, f64)> = rows
            .iter()
            .filter(|r| {
                r.method.starts_with("guided")
                    && r.loss == loss
                    && (r.propagate == p || r.k == Some(all))
            })
            .map(|r| {
                let (m, sd) = mean_sd(&r.test);
                (x_of(r.k.unwrap_or(0)), 100.0 * m, 100.0 * sd)
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series {
            label: format!("{loss}{}", if p { " + propagation" } else { "" }),
            points: pts,
            dashed: false,
        });
    }
    line_plot(
        &args.plot,
        "Decoy-test accuracy vs marked training images",
        "log10(K + 1), K = marked training images",
        "test accuracy %",
        (0.0, max_x * 1.02),
        (0.0, 100.0),
        &series,
    )
}
