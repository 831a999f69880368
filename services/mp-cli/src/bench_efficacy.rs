//! `mp bench efficacy`: shortcut-test accuracy against the number K of marked training
//! images, for each saliency loss and each propagation mode (off = the marked images' own
//! marks only; union; prototype; segmenter; and auto = the mode the cross-validated fit
//! picks), over several seeds. References: the clean-trained model scored on the clean test
//! split, and the unguided model (K = 0). The thesis refinement loop (one proposal per marked
//! image, each committed) has its own rows.
//!
//! Every choice is made on the validation split, which carries the shortcut like training
//! (or on a small clean set the expert curates, with `--trusted-val N`, reported as such):
//! λ per loss, K and propagation mode (on the first seed, whose run with the chosen λ is
//! reused), and the propagation mode under auto (cross-validation over the marked images
//! only). The test split is scored, never used for a choice.

use crate::common::{bar, load_splits, DataArgs, ModelChoice, Splits};
use crate::plot::{line_plot, Series};
use crate::report::{machine_line, mean_sd, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_core::data::Dataset;
use mp_core::loss::SaliencyLoss;
use mp_core::model::Model;
use mp_core::refine::{refine, RefineConfig};
use mp_core::suggest::{
    best_fit, calibrated, cross_validate, red_agreement, ModeFit, Propagation, SuggestConfig,
    SuggestMode, Suggester,
};
use mp_core::train::{evaluate, train, train_with, GuidanceConfig, OptimizerKind, TrainConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

impl EfficacyArgs {
    /// The seeds this run covers.
    fn seed_range(&self) -> std::ops::Range<u64> {
        self.seed_from..self.seed_from + self.seeds
    }

    /// "3 seeds" or, for a slice of a study, "1 seed (seed 2)".
    fn seeds_text(&self) -> String {
        let n = format!(
            "{} seed{}",
            self.seeds,
            if self.seeds == 1 { "" } else { "s" }
        );
        match (self.seed_from, self.seeds) {
            (0, _) => n,
            (a, 1) => format!("{n} (seed {a})"),
            (a, k) => format!("{n} (seeds {a}–{})", a + k - 1),
        }
    }
}

#[derive(Args, Clone)]
pub struct EfficacyArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Seeds per configuration
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// The first seed (seeds run from here): split one study over several processes or
    /// machines and merge their tables
    #[arg(long, default_value_t = 0)]
    pub seed_from: u64,
    /// Numbers of marked training images
    #[arg(long, default_value = "10,20", value_delimiter = ',')]
    pub ks: Vec<usize>,
    /// Saliency losses to compare (clip, squared, rrr, rrr-jacobian)
    #[arg(long, default_value = "rrr-jacobian", value_delimiter = ',')]
    pub losses: Vec<String>,
    /// Confound-swap probability of the propagation rows (0 = none; 1, every image trades
    /// its confound, leaves the confound and the label agreeing only by chance)
    #[arg(long, default_value_t = 1.0)]
    pub swap: f64,
    /// Ablation rows at the first K: rrr vs rrr-jacobian, with and without the swap
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ablation: bool,
    /// Propagation modes to run (off, union, prototype, segmenter); with two or more of
    /// union / prototype / segmenter, auto's rows follow from the mode it picks per seed
    #[arg(
        long,
        default_value = "off,union,prototype,segmenter",
        value_delimiter = ','
    )]
    pub propagation: Vec<String>,
    /// Architecture trained in every row: small-cnn or resnet18
    #[arg(long, default_value = "small-cnn")]
    pub arch: String,
    /// A TorchScript module of your own to train in every row instead of --arch (its saved
    /// weights are every seed's starting point)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batch norm of a --model module: frozen (evaluation mode throughout) or batch (batch
    /// statistics in training steps; what training a module from scratch needs)
    #[arg(long, default_value = "batch")]
    pub batch_norm: String,
    /// auto (CUDA when present), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Training epochs of every model (the clean-trained reference included)
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Fixed λ per loss, e.g. rrr=1 (no tuning for that loss)
    #[arg(long, value_delimiter = ',')]
    pub lambda: Vec<String>,
    /// λ candidates, each tried per loss, K and propagation mode on the validation split
    #[arg(long, default_value = "0,0.01,0.1,1", value_delimiter = ',')]
    pub tune_lambdas: Vec<f64>,
    /// Marked images sampled per step
    #[arg(long, default_value_t = 16)]
    pub guidance_batch: usize,
    /// Make every choice on the first N images of the clean validation twin (a small clean
    /// set the expert curates) instead of the validation split with the shortcut
    #[arg(long)]
    pub trusted_val: Option<usize>,
    /// K for the thesis-loop rows (0 = skip them)
    #[arg(long, default_value_t = 10)]
    pub thesis_k: usize,
    /// Iteration budget of each thesis-loop refinement (early stops off but the val guard)
    #[arg(long, default_value_t = 40)]
    pub thesis_iterations: usize,
    /// Unmarked training images the suggestions are checked against (ground-truth marks)
    #[arg(long, default_value_t = 1000)]
    pub check_images: usize,
    /// Markdown file to write the tables into (section efficacy-<data name>)
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Accuracy-vs-K plot (default docs/efficacy-<data name>.png)
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Row {
    method: String,
    loss: String,
    k: Option<usize>,
    mode: Option<Propagation>,
    lambda: Vec<f64>,
    /// Confound-swap probability of the run (0 = none).
    swap: f64,
    test: Vec<f64>,
    val: Vec<f64>,
    seconds: Vec<f64>,
    note: String,
}

impl Row {
    fn new(method: &str, loss: &str, k: Option<usize>, mode: Option<Propagation>) -> Row {
        Row {
            method: method.into(),
            loss: loss.into(),
            k,
            mode,
            lambda: vec![],
            swap: 0.0,
            test: vec![],
            val: vec![],
            seconds: vec![],
            note: String::new(),
        }
    }

    fn push(&mut self, r: &RunResult) {
        self.val.push(r.val);
        self.test.push(r.test);
        self.seconds.push(r.seconds);
    }
}

#[derive(Clone, Copy, Debug)]
struct RunResult {
    val: f64,
    test: f64,
    seconds: f64,
}

/// How well one mode's suggestions matched: cross-validated on the marks (what auto sees)
/// and against the ground truth of unmarked training images (what the benchmark knows).
#[derive(Clone, Debug, Default)]
struct Quality {
    cv_iou: Vec<f64>,
    true_iou: Vec<f64>,
    precision: Vec<f64>,
    recall: Vec<f64>,
    /// Seeds whose cross-validation chose the hue-jittered variant.
    any_hue: usize,
}

fn fixed_lambda(args: &EfficacyArgs, loss: &str) -> Result<Option<f64>> {
    for kv in &args.lambda {
        let (k, v) = kv.split_once('=').context("--lambda takes LOSS=VALUE")?;
        if k == loss {
            return Ok(Some(v.parse().with_context(|| format!("--lambda {kv}"))?));
        }
    }
    Ok(None)
}

/// A fresh model of `choice` for `ds`'s images and classes, seeded.
pub(crate) fn fresh_model(
    ds: &Dataset,
    seed: u64,
    choice: &ModelChoice,
    device: Device,
) -> Result<Model> {
    tch::manual_seed(seed as i64);
    choice.build(
        ds.classes.clone(),
        (ds.channels, ds.height, ds.width),
        device,
    )
}

/// The unguided base model of the mark-free benchmarks: small CNN, seed 0, `epochs` of CE on
/// the training split (its marks ignored).
pub(crate) fn unguided_base(ds: &Dataset, epochs: usize) -> Result<Model> {
    let mut base = fresh_model(
        ds,
        0,
        &ModelChoice::Builtin(mp_core::model::Arch::SmallCnn),
        mp_core::device::auto(),
    )?;
    let cfg = TrainConfig {
        epochs,
        ..Default::default()
    };
    train(
        &mut base,
        &ds.without_marks(),
        &[],
        &cfg,
        &mut |_, _, _, _| {},
    )?;
    Ok(base)
}

struct Runner<'a> {
    args: &'a EfficacyArgs,
    /// `--arch` / `--model` and `--device`, parsed once.
    model: ModelChoice,
    device: Device,
    /// The split every choice is made on.
    choose: Dataset,
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

    /// Trains one model on `train_ds`; scores it on the choice split and on `test`.
    fn run(
        &self,
        train_ds: &Dataset,
        test: &Dataset,
        seed: u64,
        k: usize,
        guidance: Option<GuidanceConfig>,
        suggester: Option<&Suggester>,
    ) -> Result<(Model, RunResult)> {
        let mut model = fresh_model(train_ds, seed, &self.model, self.device)?;
        let set = &self.order[seed as usize][..k];
        let t = Instant::now();
        train_with(
            &mut model,
            train_ds,
            set,
            &self.config(seed, guidance.clone()),
            suggester,
            &mut |_, _, _, _| {},
        )?;
        let seconds = t.elapsed().as_secs_f64();
        let val = evaluate(&model, &self.choose, 512)?.accuracy;
        let test = evaluate(&model, test, 512)?.accuracy;
        // One line per finished run on stderr, so a study cut short (a time limit, a lost
        // machine) still leaves every result it reached.
        let what = match &guidance {
            None => "no guidance".to_string(),
            Some(g) => format!(
                "{} λ {} propagation {} swap {}",
                g.loss.name(),
                g.lambda,
                g.propagation,
                g.swap
            ),
        };
        eprintln!(
            "run done: seed {seed} K {k} {what}: val {:.2} % test {:.2} % in {seconds:.0} s",
            100.0 * val,
            100.0 * test
        );
        Ok((model, RunResult { val, test, seconds }))
    }
}

fn learned(mode: Propagation) -> Option<SuggestMode> {
    match mode {
        Propagation::Union => Some(SuggestMode::Union),
        Propagation::Prototype => Some(SuggestMode::Prototype),
        Propagation::Segmenter => Some(SuggestMode::Segmenter),
        _ => None,
    }
}

fn mode_of(m: SuggestMode) -> Propagation {
    match m {
        SuggestMode::Union => Propagation::Union,
        SuggestMode::Prototype => Propagation::Prototype,
        SuggestMode::Segmenter => Propagation::Segmenter,
    }
}

pub fn run(args: EfficacyArgs) -> Result<()> {
    let splits = load_splits(&args.data)?;
    let marked = splits.train.marked_indices();
    if marked.is_empty() {
        bail!("{}: no training image carries a mark", splits.name);
    }
    if let Some(&k) = args.ks.iter().find(|&&k| k == 0 || k > marked.len()) {
        bail!(
            "K = {k}: choose 1..={} (training images with a mark)",
            marked.len()
        );
    }
    let modes: Vec<Propagation> = args
        .propagation
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_, _>>()?;
    if modes.contains(&Propagation::Auto) {
        bail!("auto's rows follow from the modes it picks: list union, prototype, segmenter");
    }
    let learned_modes: Vec<SuggestMode> = modes.iter().filter_map(|&m| learned(m)).collect();
    let losses: Vec<SaliencyLoss> = args
        .losses
        .iter()
        .map(|l| l.parse())
        .collect::<Result<_, _>>()?;
    let choose = match args.trusted_val {
        None => splits.val.clone(),
        Some(n) => {
            let (_, clean_val, _) = splits.clean.as_ref().context(
                "--trusted-val needs clean twins (Decoy-MNIST, or a folder written by mp data)",
            )?;
            if n == 0 || n > clean_val.len() {
                bail!(
                    "--trusted-val {n}: the clean val twin has {} images",
                    clean_val.len()
                );
            }
            clean_val.subset(&(0..n).collect::<Vec<_>>())
        }
    };
    let order: Vec<Vec<usize>> = (0..args.seed_range().end)
        .map(|s| {
            let mut v = marked.clone();
            mp_core::rng::Rng::new(s ^ 0x6d61726b).shuffle(&mut v);
            v
        })
        .collect();
    let device = mp_core::device::parse(&args.device)?;
    let runner = Runner {
        args: &args,
        model: ModelChoice::with_batch_norm(
            &args.arch,
            args.model.as_deref(),
            args.batch_norm.parse()?,
        )?,
        device,
        choose,
        order,
    };
    let start = Instant::now();
    let suggest_cfg = SuggestConfig::default();

    // The propagation fits per (K, seed): every learned mode cross-validated on the marks,
    // its calibrated suggester, and its suggestions checked against the ground truth.
    let mut fits: HashMap<(usize, u64), Vec<ModeFit>> = HashMap::new();
    let mut quality: HashMap<(usize, SuggestMode), Quality> = HashMap::new();
    let mut picks: HashMap<usize, Vec<SuggestMode>> = HashMap::new();
    let mut suggesters: HashMap<(usize, u64, SuggestMode), Suggester> = HashMap::new();
    if !learned_modes.is_empty() {
        let pb = bar(
            (args.ks.len() as u64) * args.seeds * learned_modes.len() as u64,
            "suggesters",
        );
        for &k in &args.ks {
            for seed in args.seed_range() {
                let set = &runner.order[seed as usize][..k];
                let folds = suggest_cfg.folds.min(k);
                let check: Vec<usize> = runner.order[seed as usize][k..]
                    .iter()
                    .copied()
                    .take(args.check_images)
                    .collect();
                let cfg = SuggestConfig {
                    seed,
                    ..suggest_cfg.clone()
                };
                let mut per = Vec::new();
                for &m in &learned_modes {
                    let f = if folds >= 2 {
                        cross_validate(m, &splits.train, set, folds, &cfg, device)?
                    } else {
                        ModeFit {
                            mode: m,
                            red_iou: f64::NAN,
                            green_iou: f64::NAN,
                            red_threshold: 0.5,
                            green_threshold: 0.5,
                            seconds: 0.0,
                            hue_jitter: false,
                        }
                    };
                    let s = calibrated(&f, &splits.train, set, &cfg, device)?.suggester;
                    let (iou, precision, recall) =
                        red_agreement(&s, &splits.train, &check, device)?;
                    let q = quality.entry((k, m)).or_default();
                    q.cv_iou.push(f.red_iou);
                    q.true_iou.push(iou);
                    q.precision.push(precision);
                    q.recall.push(recall);
                    q.any_hue += f.hue_jitter as usize;
                    suggesters.insert((k, seed, m), s);
                    per.push(f);
                    pb.inc(1);
                }
                if learned_modes.len() >= 2 {
                    let pick = best_fit(&per).map(|f| f.mode).unwrap_or(learned_modes[0]);
                    picks.entry(k).or_default().push(pick);
                }
                fits.insert((k, seed), per);
            }
        }
        pb.finish_and_clear();
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut tuning: Vec<String> = Vec::new();
    let mut baselines: Vec<Model> = Vec::new();
    let n_main = losses.len() * args.ks.len() * modes.len() + if args.ablation { 3 } else { 0 };
    let pb = bar(
        (args.seeds as usize * (2 + n_main) + n_main * args.tune_lambdas.len()) as u64,
        "efficacy",
    );
    if let Some((clean_train, _, clean_test)) = &splits.clean {
        let mut r = Row::new("clean-trained (scored on the clean test)", "-", None, None);
        let mut on_shortcut = Vec::new();
        for seed in args.seed_range() {
            let (m, res) = runner.run(clean_train, clean_test, seed, 0, None, None)?;
            on_shortcut.push(evaluate(&m, &splits.test, 512)?.accuracy);
            r.push(&res);
            pb.inc(1);
        }
        let (m, sd) = mean_sd(&on_shortcut);
        r.note = format!(
            "{:.2} ± {:.2} % on the shortcut test",
            100.0 * m,
            100.0 * sd
        );
        rows.push(r);
    }
    let mut r = Row::new("unguided (K = 0)", "-", Some(0), None);
    for seed in args.seed_range() {
        let (m, res) = runner.run(&splits.train, &splits.test, seed, 0, None, None)?;
        baselines.push(m);
        r.push(&res);
        pb.inc(1);
    }
    rows.push(r);

    let run_config = |loss: SaliencyLoss,
                      k: usize,
                      mode: Propagation,
                      swap: f64,
                      method: String,
                      tuning: &mut Vec<String>|
     -> Result<Row> {
        let name = loss.name();
        let guidance = |lambda: f64| GuidanceConfig {
            batch_size: args.guidance_batch,
            swap,
            ..GuidanceConfig::new(loss, lambda, mode)
        };
        let sugg = |seed: u64| learned(mode).and_then(|m| suggesters.get(&(k, seed, m)));
        // λ on the choice split, the first seed; the chosen λ's run is that seed's result.
        let (lambda, seed0) = match fixed_lambda(&args, name)? {
            Some(l) => (l, None),
            None => {
                let mut best: Option<(f64, RunResult)> = None;
                // λ = 0 without the swap is no guidance at all, not a configuration of it.
                for &l in args.tune_lambdas.iter().filter(|&&l| l > 0.0 || swap > 0.0) {
                    let (_, res) = runner.run(
                        &splits.train,
                        &splits.test,
                        args.seed_from,
                        k,
                        Some(guidance(l)),
                        sugg(args.seed_from),
                    )?;
                    tuning.push(format!(
                        "| {name} | {k} | {mode} | {swap} | {l} | {:.2} |",
                        100.0 * res.val
                    ));
                    if best.is_none_or(|(_, b)| res.val > b.val) {
                        best = Some((l, res));
                    }
                    pb.inc(1);
                }
                let (l, res) = best.context("--tune-lambdas is empty")?;
                (l, Some(res))
            }
        };
        let mut r = Row::new(&method, name, Some(k), Some(mode));
        r.swap = swap;
        for seed in args.seed_range() {
            let res = match (seed, seed0) {
                (s, Some(res)) if s == args.seed_from => res,
                _ => {
                    runner
                        .run(
                            &splits.train,
                            &splits.test,
                            seed,
                            k,
                            Some(guidance(lambda)),
                            sugg(seed),
                        )?
                        .1
                }
            };
            r.lambda.push(lambda);
            r.push(&res);
            pb.inc(1);
        }
        Ok(r)
    };
    for loss in &losses {
        let name = loss.name();
        for &k in &args.ks {
            for &mode in &modes {
                let (method, swap) = match mode {
                    Propagation::Off => ("own marks only".to_string(), 0.0),
                    m => (format!("own marks + {m} propagation"), args.swap),
                };
                rows.push(run_config(*loss, k, mode, swap, method, &mut tuning)?);
            }
            // Auto: per seed, the run of the mode the cross-validated fit picked.
            if let Some(p) = picks.get(&k) {
                let mut r = Row::new(
                    "own marks + auto propagation",
                    name,
                    Some(k),
                    Some(Propagation::Auto),
                );
                r.swap = args.swap;
                for (seed, m) in p.iter().enumerate() {
                    let src = rows
                        .iter()
                        .find(|x| x.loss == name && x.k == Some(k) && x.mode == Some(mode_of(*m)))
                        .context("auto's pick has a row")?;
                    r.lambda.push(src.lambda[seed]);
                    r.val.push(src.val[seed]);
                    r.test.push(src.test[seed]);
                    r.seconds.push(src.seconds[seed]);
                }
                let mut counts: Vec<String> = learned_modes
                    .iter()
                    .map(|m| (m, p.iter().filter(|x| *x == m).count()))
                    .filter(|(_, n)| *n > 0)
                    .map(|(m, n)| format!("{} ×{n}", m.name()))
                    .collect();
                counts.sort();
                r.note = format!("picked {}", counts.join(", "));
                rows.push(r);
            }
        }
    }
    // Ablation at the first K with the mode auto picked most: which part of the guidance
    // does the work — the loss (rrr's sum of log-probabilities vs the whole Jacobian) and the
    // confound swap.
    if args.ablation {
        let k = args.ks[0];
        let picked = picks.get(&k).and_then(|p| {
            learned_modes
                .iter()
                .copied()
                .max_by_key(|m| p.iter().filter(|x| *x == m).count())
        });
        if let Some(m) = picked.or(learned_modes.first().copied()) {
            let mode = mode_of(m);
            for (loss, swap) in [
                (SaliencyLoss::Rrr, 0.0),
                (SaliencyLoss::Rrr, args.swap),
                (SaliencyLoss::RrrJacobian, 0.0),
                (SaliencyLoss::RrrJacobian, args.swap),
            ] {
                let done = rows.iter().any(|r| {
                    r.loss == loss.name()
                        && r.k == Some(k)
                        && r.mode == Some(mode)
                        && r.swap == swap
                });
                if !done {
                    let method = format!("ablation: own marks + {mode} propagation");
                    rows.push(run_config(loss, k, mode, swap, method, &mut tuning)?);
                }
            }
        }
    }
    pb.finish_and_clear();

    // The thesis loop: one refinement proposal per marked image, each committed in turn.
    let thesis_k = args.thesis_k.min(marked.len());
    if thesis_k > 0 {
        for loss in &losses {
            let mut r = Row::new("thesis refinement loop", loss.name(), Some(thesis_k), None);
            let mut iterations = Vec::new();
            for seed in args.seed_range() {
                let t = Instant::now();
                let mut current = baselines[(seed - args.seed_from) as usize].try_clone()?;
                for &i in &runner.order[seed as usize][..thesis_k] {
                    let batch = splits.train.subset(&[i]);
                    let cfg = RefineConfig {
                        loss: *loss,
                        max_iterations: args.thesis_iterations,
                        time_budget_ms: None,
                        halve_saliency: false,
                        plateau_window: None,
                        min_iterations: 0,
                        ..Default::default()
                    };
                    let p = refine(&current, &batch, &runner.choose, &cfg)?;
                    iterations.push(p.iterations as f64);
                    current = Model::from_bytes(
                        &p.weights,
                        current.device(),
                        std::path::Path::new("proposal"),
                    )?;
                }
                r.val
                    .push(evaluate(&current, &runner.choose, 512)?.accuracy);
                r.test.push(evaluate(&current, &splits.test, 512)?.accuracy);
                r.seconds.push(t.elapsed().as_secs_f64());
            }
            r.note = format!(
                "budget {} iterations per proposal, {:.1} run on average (the val guard stops the rest)",
                args.thesis_iterations,
                mean_sd(&iterations).0
            );
            rows.push(r);
        }
    }

    let plot_path = args
        .plot
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("docs/efficacy-{}.png", splits.name)));
    let text = render(
        &args,
        (&runner.model, device),
        &splits,
        &rows,
        &tuning,
        &quality,
        &learned_modes,
        &plot_path,
        start.elapsed().as_secs_f64(),
    );
    println!("{text}");
    write_section(&args.out, &format!("efficacy-{}", splits.name), &text)?;
    // The tables are the result; a machine without a font still gets them and a clean exit.
    match plot(&splits.name, &plot_path, &rows, &args.ks) {
        Ok(()) => println!(
            "tables written to {}, plot to {}",
            args.out.display(),
            plot_path.display()
        ),
        Err(e) => {
            println!("tables written to {}", args.out.display());
            eprintln!("warning: no plot: {e:#}");
        }
    }
    Ok(())
}

fn pct(v: &[f64]) -> String {
    let (m, sd) = mean_sd(v);
    format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * sd)
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &EfficacyArgs,
    (model, device): (&ModelChoice, Device),
    splits: &Splits,
    rows: &[Row],
    tuning: &[String],
    quality: &HashMap<(usize, SuggestMode), Quality>,
    learned_modes: &[SuggestMode],
    plot_path: &std::path::Path,
    secs: f64,
) -> String {
    let mut s = String::new();
    s.push_str(&format!("## Efficacy on {}\n\n", splits.name));
    s.push_str(&format!(
        "Command: `mp bench efficacy {}`  \nDate: {}; machine: {}; total {:.0} s.  \n",
        crate::report::command_args(),
        today(),
        machine_line(),
        secs
    ));
    let choice = match args.trusted_val {
        None => format!(
            "the validation split ({} images, which carries the shortcut like training)",
            splits.val.len()
        ),
        Some(n) => format!(
            "a trusted clean set: the first {n} images of the clean validation twin (an option: a small set the expert curates)"
        ),
    };
    s.push_str(&format!(
        "{} train / {} val / {} test images ({}x{}x{}); {} on {}, Adam lr {}, batch {}, {} epochs, guidance batch {}, {} (mean ± sd). \
         Every choice — λ per loss, K and propagation mode (candidates {}), the propagation mode under auto — is made on {choice}; \
         the test split has the shortcut of a random class and is only scored.{}\n\n",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        splits.train.width,
        splits.train.height,
        splits.train.channels,
        model.describe(),
        match device {
            Device::Cuda(i) => format!("GPU {i} (CUDA)"),
            _ => "CPU".to_string(),
        },
        args.lr,
        args.batch,
        args.epochs,
        args.guidance_batch,
        args.seeds_text(),
        args.tune_lambdas.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
        splits.notes.iter().map(|n| format!(" {n}.")).collect::<String>(),
    ));
    s.push_str("| method | loss | swap | K marked | λ | val acc % | test acc % | s per run | note |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let mut lambdas = r.lambda.clone();
        lambdas.dedup();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |\n",
            r.method,
            r.loss,
            if r.mode.is_some() {
                r.swap.to_string()
            } else {
                "-".into()
            },
            r.k.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
            if lambdas.is_empty() {
                "-".into()
            } else {
                lambdas
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            },
            pct(&r.val),
            pct(&r.test),
            mean_sd(&r.seconds).0,
            r.note
        ));
    }
    if !learned_modes.is_empty() {
        s.push_str("\nSuggestion quality per mode (mean over seeds): red IoU cross-validated on the marked images (what auto decides on), and red IoU, pixel precision and recall against the ground truth of up to ");
        s.push_str(&format!(
            "{} unmarked training images (what only a benchmark knows); last, the seeds whose cross-validation chose the segmenter trained on random hues:\n\n| K | mode | CV red IoU | true red IoU | precision | recall | any hue |\n|---|---|---|---|---|---|---|\n",
            args.check_images
        ));
        for &k in &args.ks {
            for m in learned_modes {
                if let Some(q) = quality.get(&(k, *m)) {
                    s.push_str(&format!(
                        "| {k} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} of {} |\n",
                        m.name(),
                        mean_sd(&q.cv_iou).0,
                        mean_sd(&q.true_iou).0,
                        mean_sd(&q.precision).0,
                        mean_sd(&q.recall).0,
                        q.any_hue,
                        q.cv_iou.len()
                    ));
                }
            }
        }
    }
    s.push_str(&verdict(rows));
    if !tuning.is_empty() {
        s.push_str(&format!(
            "\n<details><summary>λ on the choice split (seed {})</summary>\n\n| loss | K | propagation | swap | λ | val acc % |\n|---|---|---|---|---|---|\n{}\n\n</details>\n",
            args.seed_from,
            tuning.join("\n")
        ));
    }
    s.push_str(&format!("\n![accuracy vs K]({})\n", plot_path.display()));
    s
}

/// The targets, checked on this run's numbers.
fn verdict(rows: &[Row]) -> String {
    let mean = |r: &Row| mean_sd(&r.test).0 * 100.0;
    let clean = rows.iter().find(|r| r.method.starts_with("clean-trained"));
    let mut s = String::from("\nTargets, on this run:\n");
    let best_at = |k: usize, pred: &dyn Fn(&Row) -> bool| {
        rows.iter()
            .filter(|r| r.k == Some(k) && pred(r))
            .max_by(|a, b| mean(a).total_cmp(&mean(b)))
    };
    let mut ks: Vec<usize> = rows.iter().filter_map(|r| r.k).filter(|&k| k > 0).collect();
    ks.sort_unstable();
    ks.dedup();
    for k in ks {
        // Auto's row when several modes ran; with one learned mode, that mode's row.
        let auto = best_at(k, &|r| r.mode == Some(Propagation::Auto)).or_else(|| {
            best_at(k, &|r| {
                r.mode.is_some_and(|m| m != Propagation::Off) && !r.method.starts_with("ablation")
            })
        });
        let own = best_at(k, &|r| r.mode == Some(Propagation::Off));
        let name = |r: &Row| match r.mode {
            Some(m) => format!("{m} propagation"),
            None => r.method.clone(),
        };
        if let (Some(a), Some(c)) = (auto, clean) {
            let gap = mean(c) - mean(a);
            s.push_str(&format!(
                "- K = {k}: {} {:.2} % vs clean-trained {:.2} %: {:.2} points {} — within 2 points: **{}**.\n",
                name(a),
                mean(a),
                mean(c),
                gap.abs(),
                if gap >= 0.0 { "below" } else { "above" },
                if gap <= 2.0 { "met" } else { "missed" }
            ));
        }
        if let (Some(a), Some(o)) = (auto, own) {
            let d = mean(a) - mean(o);
            s.push_str(&format!(
                "- K = {k}: {} {:+.2} points over own marks only ({:.2} %) — at least +5: **{}**.\n",
                name(a),
                d,
                mean(o),
                if d >= 5.0 { "met" } else { "missed" }
            ));
        }
    }
    s
}

fn plot(name: &str, path: &std::path::Path, rows: &[Row], ks: &[usize]) -> Result<()> {
    let max_x = ks.iter().copied().max().unwrap_or(1) as f64 + 1.0;
    let mut series = Vec::new();
    for r in rows.iter().filter(|r| r.k.is_none() || r.k == Some(0)) {
        let (m, _) = mean_sd(&r.test);
        series.push(Series {
            label: r.method.clone(),
            points: vec![(0.0, 100.0 * m, 0.0), (max_x, 100.0 * m, 0.0)],
            dashed: true,
        });
    }
    let mut keys: Vec<(String, Option<Propagation>)> = Vec::new();
    for r in rows
        .iter()
        .filter(|r| r.mode.is_some() && !r.method.starts_with("ablation"))
    {
        if !keys.contains(&(r.loss.clone(), r.mode)) {
            keys.push((r.loss.clone(), r.mode));
        }
    }
    for (loss, mode) in keys {
        let mut pts: Vec<(f64, f64, f64)> = rows
            .iter()
            .filter(|r| r.loss == loss && r.mode == mode && !r.method.starts_with("ablation"))
            .map(|r| {
                let (m, sd) = mean_sd(&r.test);
                (r.k.unwrap_or(0) as f64, 100.0 * m, 100.0 * sd)
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series {
            label: format!(
                "{loss}, {}",
                match mode {
                    Some(Propagation::Off) | None => "own marks only".to_string(),
                    Some(m) => format!("{m} propagation"),
                }
            ),
            points: pts,
            dashed: false,
        });
    }
    line_plot(
        path,
        &format!("{name}: test accuracy vs marked training images"),
        "K = marked training images",
        "test accuracy %",
        (0.0, max_x),
        (0.0, 100.0),
        &series,
    )
}
