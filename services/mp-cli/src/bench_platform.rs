//! `mp bench platform`: the whole loop — redis-server, gateway, trainer and workers as
//! separate processes, simulated experts answering through the gRPC API with the dataset's
//! ground-truth marks (or accepting the platform's suggested marks) and committing the
//! proposals — for one or several queue orderings and seeds: test accuracy after each
//! round against committed marks, pixels painted vs accepted, accuracy per minute of
//! simulated expert time, and refinement throughput with 1 and 2 workers.
//!
//! Every run of a dataset starts from the same base model (trained once, on the training
//! split with its shortcut), in a fresh Redis.

use crate::common::mnist_dir;
use crate::init::{project_init, InitArgs};
use crate::nodes::Children;
use crate::platform::{runtime, sim_clients};
use crate::plot::{line_plot, Series};
use crate::report::{machine_line, mean_sd, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_api::sim::{self, ExpertTime, LeaseEvent, MarkSource, Outcome, SimConfig};
use mp_store::{ModelVersionRecord, Store};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct PlatformArgs {
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    /// An image folder with marks (e.g. from mp data moving-sticker); default: Decoy-MNIST
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Committed marks that end a round
    #[arg(long, default_value_t = 10)]
    pub marks: usize,
    /// Rounds (each: `marks` committed marks, then a training phase)
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Concurrent simulated experts
    #[arg(long, default_value_t = 5)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 6)]
    pub epochs_per_round: usize,
    /// λ of the trainer's persistent guidance
    #[arg(long, default_value_t = mp_node::trainer::DEFAULT_LAMBDA)]
    pub lambda: f64,
    /// Confound-swap probability of the trainer's guided batches
    #[arg(long, default_value_t = mp_node::trainer::DEFAULT_SWAP)]
    pub swap: f64,
    /// Queue orderings to compare: alignment, attention, margin, random
    #[arg(long, default_value = "attention", value_delimiter = ',')]
    pub orderings: Vec<String>,
    /// Runs per ordering
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Probability that a simulated expert accepts a suggested mark that looks right
    #[arg(long, default_value_t = 0.0)]
    pub accept: f64,
    /// Refine jobs timed for throughput with 1 and 2 workers (0 = skip)
    #[arg(long, default_value_t = 12)]
    pub throughput_jobs: usize,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Plot (default docs/platform-<data name>.png)
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Who marks: how many experts, how (profiles), how many per image, who reviews.
#[derive(Debug, Clone)]
pub struct Crowd {
    pub experts: usize,
    pub profiles: Vec<sim::Profile>,
    pub overlap: u32,
    pub reviewers: usize,
    pub review_below: f64,
}

impl Crowd {
    /// `experts` careful experts, one per image, no reviewer.
    pub fn careful(experts: usize) -> Crowd {
        Crowd {
            experts,
            profiles: Vec::new(),
            overlap: 1,
            reviewers: 0,
            review_below: mp_store::DEFAULT_REVIEW_BELOW,
        }
    }
}

/// One run of the loop: one ordering, one seed.
pub struct Run {
    ordering: String,
    pub seed: u64,
    versions: Vec<ModelVersionRecord>,
    pub events: Vec<LeaseEvent>,
    /// Wall-clock seconds of each round (marks, proposals, commits, training phase).
    round_seconds: Vec<f64>,
    proposal_latency: Vec<f64>,
    logs: PathBuf,
    /// The guidance at the end: (the committing expert's name, image id, mark values).
    pub committed: Vec<(String, String, Vec<i8>)>,
}

impl Run {
    /// Committed marks with a red part: marks that outline a shortcut (a queue that finds
    /// the images carrying one spends the experts' time where a mark teaches most).
    pub fn on_shortcut(&self) -> usize {
        self.committed
            .iter()
            .filter(|(_, _, v)| v.contains(&mp_core::data::RED))
            .count()
    }

    /// (committed marks, test accuracy) at the base model and after each training phase.
    pub fn curve(&self) -> Vec<(usize, f64)> {
        let mut out = Vec::new();
        let mut committed = 0usize;
        for v in &self.versions {
            if v.reason.starts_with("commit") {
                committed += 1;
            }
            if v.version == 1 || v.reason.starts_with("guided training") {
                out.push((committed, v.test_accuracy));
            }
        }
        out
    }

    fn submitted(&self) -> impl Iterator<Item = &LeaseEvent> {
        self.events
            .iter()
            .filter(|e| e.outcome == Outcome::Submitted)
    }
}

pub struct Env<'a> {
    pub a: &'a PlatformArgs,
    pub data: &'a Path,
    pub base: &'a Path,
    pub dir: &'a Path,
}

pub fn run_once(env: &Env, ordering: &str, seed: u64, crowd: &Crowd) -> Result<Run> {
    let a = env.a;
    let dir = env.dir.join(format!(
        "{ordering}-{seed}-o{}-{}",
        crowd.overlap,
        crowd.profiles.len()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut redis = mp_store::server::RedisServer::start_free(&dir.join("redis"))?;
    let url = redis.url();
    let ck = dir.join("checkpoints");
    let mut init = InitArgs::new(env.data.to_path_buf(), url.clone(), ck.clone());
    init.model = Some(env.base.to_path_buf());
    init.ordering = ordering.to_string();
    init.overlap = crowd.overlap;
    init.review_below = crowd.review_below;
    let admin = project_init(init)?.context("a fresh Redis holds no project")?;
    let port = mp_store::server::free_port()?;
    let addr = format!("http://127.0.0.1:{port}");
    let ckp = ck.display().to_string();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut kids = Children(Vec::new());
    kids.spawn_gateway(
        &format!("127.0.0.1:{port}"),
        &url,
        &ckp,
        &["--metrics-listen", ""],
        &logs.join("gateway.log"),
    )?;
    let (lambda, swap) = (a.lambda.to_string(), a.swap.to_string());
    kids.spawn_trainer(
        &url,
        &ckp,
        a.marks,
        a.epochs_per_round,
        &["--lambda", &lambda, "--swap", &swap],
        &logs.join("trainer.log"),
    )?;
    for k in 0..a.workers {
        kids.spawn_worker(
            &url,
            &ckp,
            &format!("w{k}"),
            &["--ordering", ordering],
            &logs.join(format!("worker-{k}.log")),
        )?;
    }
    let rt = runtime()?;
    let result = rt.block_on(async {
        let store = Store::connect(&url, "mp").await?;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let clients = sim_clients(&addr, &admin, crowd.experts, "expert").await?;
        let reviewers = crate::platform::sim_clients_with_role(
            &addr,
            &admin,
            crowd.reviewers,
            "reviewer",
            "reviewer",
        )
        .await?;
        let mut events = Vec::new();
        let mut round_seconds = Vec::new();
        for round in 0..a.rounds {
            let t = Instant::now();
            let cfg = SimConfig {
                experts: crowd.experts,
                profiles: crowd.profiles.clone(),
                // With overlap N each image takes N marks and makes one committed mark.
                leases: a.marks * crowd.overlap as usize,
                marks: MarkSource::Folder(env.data.to_path_buf()),
                commit: true,
                reject_below: 1.0,
                accept: a.accept,
                // A simulated expert waits as long as the platform needs: on a loaded CPU a
                // proposal can queue behind the workers' suggester fits for minutes, and an
                // expert who gives up would leave the round short of its committed marks.
                proposal_timeout: Duration::from_secs(1800),
                seed: seed * 1000 + round as u64,
                ..Default::default()
            };
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reviewing: Vec<_> = reviewers
                .iter()
                .map(|c| {
                    tokio::spawn(sim::review(
                        c.clone(),
                        cfg.clone(),
                        done.clone(),
                        Duration::from_secs(3),
                    ))
                })
                .collect();
            let r = sim::run(clients.clone(), cfg.clone()).await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            for t in reviewing {
                let rr = t.await?;
                if let Some(e) = rr.errors.first() {
                    eprintln!("reviewer: {e}");
                }
            }
            if r.count(Outcome::Submitted) != cfg.leases {
                bail!(
                    "round {}: only {} of {} marks submitted: {:?}",
                    round + 1,
                    r.count(Outcome::Submitted),
                    cfg.leases,
                    r.errors.first()
                );
            }
            events.extend(r.events);
            if crowd.overlap > 1 {
                // Settled marks that mark nothing make no proposal: the round may hold fewer
                // commits than `marks`; end it once every settled proposal is decided.
                let commits = store
                    .versions()
                    .await?
                    .iter()
                    .filter(|v| v.reason.starts_with("commit"))
                    .count();
                if commits < a.marks * (round + 1) {
                    store.request_round_end().await?;
                }
            }
            // The training phase that ends the round publishes a "guided training" version.
            loop {
                let trained = store
                    .versions()
                    .await?
                    .iter()
                    .filter(|v| v.reason.starts_with("guided training"))
                    .count();
                if trained > round {
                    break;
                }
                if t.elapsed() > Duration::from_secs(3600) {
                    bail!("round {}: no guided training within an hour", round + 1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            round_seconds.push(t.elapsed().as_secs_f64());
        }
        let latencies = events
            .iter()
            .filter_map(|e| e.proposal_latency)
            .map(|d| d.as_secs_f64())
            .collect();
        let mut committed = Vec::new();
        for m in store.guidance_marks().await? {
            let name = store.expert(&m.expert_id).await.map(|e| e.name)?;
            committed.push((name, m.image_id, m.values));
        }
        anyhow::Ok((
            store.versions().await?,
            events,
            round_seconds,
            latencies,
            committed,
        ))
    });
    drop(kids);
    redis.stop();
    let (versions, events, round_seconds, proposal_latency, committed) =
        result.with_context(|| format!("logs in {}", logs.display()))?;
    Ok(Run {
        ordering: ordering.to_string(),
        seed,
        versions,
        events,
        round_seconds,
        proposal_latency,
        logs,
        committed,
    })
}

/// Proposals per second with 1 and 2 workers on a fresh project from the base model.
fn throughput(env: &Env, jobs: usize) -> Result<Vec<(usize, usize, f64)>> {
    let dir = env.dir.join("throughput");
    std::fs::create_dir_all(&dir)?;
    let mut redis = mp_store::server::RedisServer::start_free(&dir.join("redis"))?;
    let url = redis.url();
    let ck = dir.join("checkpoints");
    let mut init = InitArgs::new(env.data.to_path_buf(), url.clone(), ck.clone());
    init.model = Some(env.base.to_path_buf());
    let admin = project_init(init)?.context("a fresh Redis holds no project")?;
    let port = mp_store::server::free_port()?;
    let addr = format!("http://127.0.0.1:{port}");
    let ckp = ck.display().to_string();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut kids = Children(Vec::new());
    kids.spawn_gateway(
        &format!("127.0.0.1:{port}"),
        &url,
        &ckp,
        &["--metrics-listen", ""],
        &logs.join("gateway.log"),
    )?;
    let rt = runtime()?;
    let out = rt.block_on(async {
        let store = Store::connect(&url, "mp").await?;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = Vec::new();
        for n in [1usize, 2] {
            let mut ws = Children(Vec::new());
            for k in 0..n {
                ws.spawn_worker(
                    &url,
                    &ckp,
                    &format!("t{n}-{k}"),
                    &[],
                    &logs.join(format!("throughput-{n}-{k}.log")),
                )?;
            }
            let clients = sim_clients(&addr, &admin, 4, &format!("tp{n}")).await?;
            let start = Instant::now();
            let cfg = SimConfig {
                experts: 4,
                leases: jobs,
                marks: MarkSource::Folder(env.data.to_path_buf()),
                ..Default::default()
            };
            let r = sim::run(clients, cfg).await;
            let ids: Vec<String> = r
                .events
                .iter()
                .filter_map(|e| e.proposal_id.clone())
                .collect();
            loop {
                let mut done = 0;
                for id in &ids {
                    if matches!(
                        store.proposal(id).await?.status.as_str(),
                        "ready" | "failed"
                    ) {
                        done += 1;
                    }
                }
                if done == ids.len() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(1800) {
                    bail!("throughput run stuck; logs in {}", logs.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out.push((n, ids.len(), start.elapsed().as_secs_f64()));
        }
        anyhow::Ok(out)
    });
    drop(kids);
    redis.stop();
    out
}

/// The image folder the runs use: `--data`, else Decoy-MNIST made in `dir`.
pub fn data_folder(a: &PlatformArgs, dir: &Path) -> Result<PathBuf> {
    Ok(match &a.data {
        Some(d) => d.clone(),
        None => {
            let d = dir.join("decoy-mnist");
            crate::commands::data(crate::commands::DataCmd::DecoyMnist(
                crate::commands::GenArgs::new(d.clone(), Some(mnist_dir(&a.mnist)?)),
            ))?;
            d
        }
    })
}

/// Trains the base model every run starts from (the training split, shortcut and all).
pub fn base_model(data: &Path, dir: &Path) -> Result<PathBuf> {
    let redis = mp_store::server::RedisServer::start_free(&dir.join("base-redis"))?;
    let ck = dir.join("base");
    project_init(InitArgs::new(data.to_path_buf(), redis.url(), ck.clone()))?;
    drop(redis);
    Ok(ck.join("v1.safetensors"))
}

pub fn run(a: PlatformArgs) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let data = data_folder(&a, dir)?;
    let name = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    for o in &a.orderings {
        o.parse::<mp_core::align::Ordering>()?;
    }
    if a.marks == 0 || a.rounds == 0 || a.seeds == 0 {
        bail!("--marks, --rounds and --seeds must be positive");
    }
    let base = base_model(&data, dir)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let clean = clean_reference(&data)?;
    let env = Env {
        a: &a,
        data: &data,
        base: &base,
        dir,
    };
    let mut runs = Vec::new();
    for seed in 0..a.seeds {
        for o in &a.orderings {
            let t = Instant::now();
            let r = run_once(&env, o, seed, &Crowd::careful(a.experts))?;
            eprintln!(
                "{name}: {o} seed {seed}: {:?} in {:.0} s (logs {})",
                r.curve(),
                t.elapsed().as_secs_f64(),
                r.logs.display()
            );
            runs.push(r);
        }
    }
    let tp = if a.throughput_jobs > 0 {
        throughput(&env, a.throughput_jobs)?
    } else {
        Vec::new()
    };
    let plot_path = a
        .plot
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("docs/platform-{name}.png")));
    let text = render(&a, &name, &runs, &tp, clean, setup_s, &plot_path);
    println!("{text}");
    write_section(&a.out, &format!("platform-{name}"), &text)?;
    // The tables are the result; a machine without a font still gets them and a clean exit.
    if let Err(e) = plot(&a, &name, &runs, &plot_path) {
        eprintln!("warning: no plot: {e:#}");
    }
    Ok(())
}

/// The clean-trained reference on the clean test split, when the data has clean twins
/// (trained like the base model: small CNN, 4 epochs, seed 0).
fn clean_reference(data: &Path) -> Result<Option<f64>> {
    let args = crate::common::DataArgs {
        data: Some(data.to_path_buf()),
        mnist: None,
        data_seed: 0,
        resize: None,
    };
    let splits = crate::common::load_splits(&args)?;
    let Some((clean_train, _, clean_test)) = &splits.clean else {
        return Ok(None);
    };
    tch::manual_seed(0);
    let mut m = mp_core::model::Model::new(
        mp_core::model::ModelSpec::for_dataset(mp_core::model::Arch::SmallCnn, clean_train),
        mp_core::device::auto(),
    )?;
    mp_core::train::train(
        &mut m,
        clean_train,
        &[],
        &Default::default(),
        &mut |_, _, _, _| {},
    )?;
    Ok(Some(
        mp_core::train::evaluate(&m, clean_test, 512)?.accuracy,
    ))
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

fn render(
    a: &PlatformArgs,
    name: &str,
    runs: &[Run],
    tp: &[(usize, usize, f64)],
    clean: Option<f64>,
    setup_s: f64,
    plot_path: &Path,
) -> String {
    let time = ExpertTime::default();
    let mut s = format!(
        "## Platform end to end on {name}: gateway, queue, workers and trainer\n\n\
         Command: `mp bench platform {}`  \nDate: {}; machine: {}. \
         redis-server, gateway, trainer and {} workers as separate processes on this machine; {} simulated experts lease through the gRPC API, \
         answer with the dataset's ground-truth marks (red on the shortcut, green on the digit){}, wait for each proposal and commit it. \
         A round ends after {} committed marks; the trainer then fine-tunes the current model for {} epochs with CE + persistent guidance \
         (rrr-jacobian, λ = {}, confound swap {}, propagation auto: the suggester with the best cross-validated fit on the committed marks) and publishes the next version. \
         Every run starts from the same base model (trained on the training split, shortcut included) in a fresh Redis; base model and data {:.0} s.\n\n",
        crate::report::command_args(),
        today(),
        machine_line(),
        a.workers,
        a.experts,
        if a.accept > 0.0 {
            format!(
                " or, with probability {}, accept the image's suggested mark when its red part overlaps the ground truth's by IoU ≥ 0.5",
                a.accept
            )
        } else {
            String::new()
        },
        a.marks,
        a.epochs_per_round,
        a.lambda,
        a.swap,
        setup_s
    );
    if let Some(c) = clean {
        s.push_str(&format!(
            "Clean-trained reference (same CNN and epochs, trained and scored on the clean twins): **{} %** on the clean test split.\n\n",
            pct(c)
        ));
    }
    // The first run in full.
    if let Some(r) = runs.first() {
        s.push_str(&format!(
            "Run 1 ({} ordering, seed {}), every version:\n\n| version | reason | committed marks | val acc % | test acc % |\n|---|---|---|---|---|\n",
            r.ordering, r.seed
        ));
        let mut committed = 0usize;
        for v in &r.versions {
            if v.reason.starts_with("commit") {
                committed += 1;
            }
            s.push_str(&format!(
                "| v{} | {} | {} | {} | {} |\n",
                v.version,
                v.reason,
                committed,
                pct(v.val_accuracy),
                pct(v.test_accuracy)
            ));
        }
        let mut lat = r.proposal_latency.clone();
        lat.sort_by(|x, y| x.total_cmp(y));
        let last = r.curve().last().copied().unwrap_or((0, f64::NAN));
        s.push_str(&format!(
            "\n**Run 1: {} % test accuracy with {} committed marks** (base model {} %{}); rounds took {} s (proposal ready p50 {:.1} s after submit).\n",
            pct(last.1),
            last.0,
            pct(r.curve().first().map(|c| c.1).unwrap_or(f64::NAN)),
            clean
                .map(|c| format!(
                    "; {:.2} points {} the clean-trained model — within 2 points: {}",
                    (100.0 * (c - last.1)).abs(),
                    if last.1 <= c { "below" } else { "above" },
                    if 100.0 * (c - last.1) <= 2.0 { "met" } else { "missed" }
                ))
                .unwrap_or_default(),
            r.round_seconds
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" + "),
            lat.get(lat.len() / 2).copied().unwrap_or(f64::NAN)
        ));
    }
    // Orderings: test accuracy after each round, mean ± sd over seeds.
    if runs.len() > 1 {
        s.push_str(&format!(
            "\nTest accuracy after each round by queue ordering ({} run(s) each; mean ± sd):\n\n| ordering | base | {} |\n|---|---|{}\n",
            a.seeds,
            (1..=a.rounds)
                .map(|r| format!("{} marks", r * a.marks))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(a.rounds)
        ));
        for o in &a.orderings {
            let rs: Vec<&Run> = runs.iter().filter(|r| &r.ordering == o).collect();
            let col = |k: usize| {
                let v: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.curve().get(k).map(|c| c.1))
                    .collect();
                let (m, sd) = mean_sd(&v);
                format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * sd)
            };
            s.push_str(&format!(
                "| {o} | {} | {} |\n",
                col(0),
                (1..=a.rounds).map(col).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    // Suggestions and expert time.
    s.push_str(&format!(
        "\nExpert effort (simulated time: {} s to look at an image, {} s to accept a suggestion, {} s per painted pixel):\n\n\
         | ordering | seed | marks | on the shortcut (red) | with a suggestion | accepted | pixels painted | pixels accepted | expert minutes | final test acc % | points gained per expert minute |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        time.look_s, time.accept_s, time.per_painted_pixel_s
    ));
    for r in runs {
        let sub: Vec<&LeaseEvent> = r.submitted().collect();
        let minutes: f64 = r.events.iter().map(|e| time.seconds(e)).sum::<f64>() / 60.0;
        let c = r.curve();
        let (first, last) = (c.first().map(|x| x.1), c.last().map(|x| x.1));
        let gain = match (first, last) {
            (Some(f), Some(l)) if minutes > 0.0 => format!("{:.2}", 100.0 * (l - f) / minutes),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |\n",
            r.ordering,
            r.seed,
            sub.len(),
            r.on_shortcut(),
            sub.iter().filter(|e| e.suggested).count(),
            sub.iter().filter(|e| e.accepted > 0).count(),
            sub.iter().map(|e| e.painted).sum::<usize>(),
            sub.iter().map(|e| e.accepted).sum::<usize>(),
            minutes,
            last.map(pct).unwrap_or_else(|| "-".into()),
            gain
        ));
    }
    if !tp.is_empty() {
        s.push_str("\nRefinement throughput (proposals from submit to ready, default refinement settings):\n\n| workers | proposals | seconds | proposals/s |\n|---|---|---|---|\n");
        for (n, j, sec) in tp {
            s.push_str(&format!(
                "| {n} | {j} | {sec:.1} | {:.2} |\n",
                *j as f64 / sec
            ));
        }
    }
    s.push_str(&format!(
        "\n![accuracy vs committed marks]({})\n",
        plot_path.display()
    ));
    s
}

fn plot(a: &PlatformArgs, name: &str, runs: &[Run], path: &Path) -> Result<()> {
    let mut series = Vec::new();
    for o in &a.orderings {
        let rs: Vec<&Run> = runs.iter().filter(|r| &r.ordering == o).collect();
        let points: Vec<(f64, f64, f64)> = (0..=a.rounds)
            .filter_map(|k| {
                let v: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.curve().get(k).map(|c| c.1))
                    .collect();
                (!v.is_empty()).then(|| {
                    let (m, sd) = mean_sd(&v);
                    ((k * a.marks) as f64, 100.0 * m, 100.0 * sd)
                })
            })
            .collect();
        series.push(Series {
            label: format!("{o} ordering"),
            points,
            dashed: false,
        });
    }
    line_plot(
        path,
        &format!("{name}: test accuracy through the platform"),
        "committed marks (a training phase after each round)",
        "test accuracy %",
        (-0.5, (a.marks * a.rounds) as f64 + 0.5),
        (0.0, 100.0),
        &series,
    )
}
