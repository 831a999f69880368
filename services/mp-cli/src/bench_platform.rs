//! `mp bench platform`: the whole loop on Decoy-MNIST — redis-server, gateway, trainer and
//! workers as separate processes, simulated experts answering with the Decoy marks and
//! committing the proposals — decoy-test accuracy against committed marks, wall-clock, and
//! refinement throughput with 1 and 2 workers.

use crate::common::mnist_dir;
use crate::nodes::Children;
use crate::platform::{project_init, runtime, sim_clients, InitArgs};
use crate::plot::{line_plot, Series};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_api::sim::{self, MarkSource, Outcome, SimConfig};
use mp_store::Store;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct PlatformArgs {
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    /// Marked images in the intervention round
    #[arg(long, default_value_t = 10)]
    pub marks: usize,
    /// Concurrent simulated experts
    #[arg(long, default_value_t = 5)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 6)]
    pub epochs_per_round: usize,
    /// Refine jobs timed for throughput with 1 and 2 workers (0 = skip)
    #[arg(long, default_value_t = 12)]
    pub throughput_jobs: usize,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    #[arg(long, default_value = "docs/platform.png")]
    pub plot: PathBuf,
}

pub fn run(a: PlatformArgs) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut redis = mp_store::server::RedisServer::start_free(&dir.join("redis"))?;
    let url = redis.url();
    let data = dir.join("data");
    crate::commands::data(crate::commands::DataCmd::DecoyMnist {
        out: data.clone(),
        mnist: Some(mnist_dir(&a.mnist)?),
        seed: 0,
        n_train: 7000,
        n_val: 1000,
        n_test: 2000,
    })?;
    let ck = dir.join("checkpoints");
    let admin = project_init(InitArgs::new(data.clone(), url.clone(), ck.clone()))?;
    let setup_s = t0.elapsed().as_secs_f64();
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
    kids.spawn_trainer(
        &url,
        &ckp,
        a.marks,
        a.epochs_per_round,
        &logs.join("trainer.log"),
    )?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let store = Store::connect(&url, "mp").await?;
        let mut workers = Children(Vec::new());
        for k in 0..a.workers {
            workers.spawn_worker(
                &url,
                &ckp,
                &format!("w{k}"),
                &logs.join(format!("worker-{k}.log")),
            )?;
        }
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The intervention round: experts mark and commit.
        let loop_start = Instant::now();
        let clients = sim_clients(&addr, &admin, a.experts, "expert").await?;
        let cfg = SimConfig {
            experts: a.experts,
            leases: a.marks,
            marks: MarkSource::Folder(data.clone()),
            commit: true,
            reject_below: 1.0,
            ..Default::default()
        };
        let r = sim::run(clients, cfg).await;
        if r.count(Outcome::Submitted) != a.marks {
            bail!(
                "only {} of {} marks submitted: {:?}",
                r.count(Outcome::Submitted),
                a.marks,
                r.errors.first()
            );
        }
        let marks_done = loop_start.elapsed().as_secs_f64();
        // The training phase that ends the round.
        let trained = loop {
            let v = store.versions().await?;
            if let Some(t) = v.iter().find(|x| x.reason.starts_with("guided training")) {
                break t.clone();
            }
            if loop_start.elapsed() > Duration::from_secs(3600) {
                bail!("no guided training within an hour; see {}", logs.display());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let loop_s = loop_start.elapsed().as_secs_f64();
        let versions = store.versions().await?;
        let latencies: Vec<f64> = r
            .events
            .iter()
            .filter_map(|e| e.proposal_latency)
            .map(|d| d.as_secs_f64())
            .collect();
        drop(workers);
        // Refinement throughput with 1 and 2 workers.
        let mut throughput = Vec::new();
        if a.throughput_jobs > 0 {
            for n in [1usize, 2] {
                let mut ws = Children(Vec::new());
                for k in 0..n {
                    ws.spawn_worker(
                        &url,
                        &ckp,
                        &format!("t{n}-{k}"),
                        &logs.join(format!("throughput-{n}-{k}.log")),
                    )?;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                let clients = sim_clients(&addr, &admin, 4, &format!("tp{n}")).await?;
                let start = Instant::now();
                let cfg = SimConfig {
                    experts: 4,
                    leases: a.throughput_jobs,
                    marks: MarkSource::Folder(data.clone()),
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
                        bail!("throughput run stuck");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                throughput.push((n, ids.len(), start.elapsed().as_secs_f64()));
            }
        }
        anyhow::Ok((versions, trained, marks_done, loop_s, latencies, throughput))
    });
    drop(kids);
    redis.stop();
    let (versions, trained, marks_done, loop_s, latencies, throughput) =
        result.with_context(|| format!("logs in {}", logs.display()))?;
    let mut text = format!(
        "## Platform end to end: Decoy-MNIST through gateway, queue, workers and trainer\n\nCommand: `mp bench platform {}`  \nDate: {}; machine: {}. \
         redis-server, gateway, trainer and {} workers as separate processes on this machine; {} simulated experts lease through the gRPC API, \
         answer with the Decoy ground-truth marks (red patch, green digit), wait for each proposal and commit it. The round ends after {} committed marks; \
         the trainer then fine-tunes the current model for {} epochs with CE + persistent guidance (rrr, λ = 1, propagation of the marks' red union) \
         and publishes the next version. Set-up (Decoy data + base model) {:.0} s.\n\n\
         | version | reason | committed marks | val acc % | decoy-test acc % |\n|---|---|---|---|---|\n",
        std::env::args().skip(3).collect::<Vec<_>>().join(" "),
        today(),
        machine_line(),
        a.workers,
        a.experts,
        a.marks,
        a.epochs_per_round,
        setup_s
    );
    let mut committed = 0usize;
    let mut points = Vec::new();
    for v in &versions {
        if v.reason.starts_with("commit") {
            committed += 1;
        }
        points.push((committed as f64, 100.0 * v.test_accuracy, 0.0));
        text.push_str(&format!(
            "| v{} | {} | {} | {:.2} | {:.2} |\n",
            v.version,
            v.reason,
            committed,
            100.0 * v.val_accuracy,
            100.0 * v.test_accuracy
        ));
    }
    let mut lat = latencies.clone();
    lat.sort_by(|x, y| x.total_cmp(y));
    let med = lat.get(lat.len() / 2).copied().unwrap_or(f64::NAN);
    text.push_str(&format!(
        "\n**Result: {:.2} % decoy-test accuracy with {} marked images** (base model {:.2} %); marks submitted and committed in {:.0} s \
         (proposal ready p50 {:.1} s after submit), whole loop including the training phase {:.0} s.\n",
        100.0 * trained.test_accuracy,
        a.marks,
        100.0 * versions.first().map(|v| v.test_accuracy).unwrap_or(f64::NAN),
        marks_done,
        med,
        loop_s
    ));
    if !throughput.is_empty() {
        text.push_str("\nRefinement throughput (proposals from submit to ready, default refinement settings):\n\n| workers | proposals | seconds | proposals/s |\n|---|---|---|---|\n");
        for (n, j, sec) in &throughput {
            text.push_str(&format!(
                "| {n} | {j} | {sec:.1} | {:.2} |\n",
                *j as f64 / sec
            ));
        }
    }
    text.push_str(&format!(
        "\n![accuracy vs committed marks]({})\n",
        a.plot.display()
    ));
    println!("{text}");
    write_section(&a.out, "platform", &text)?;
    line_plot(
        &a.plot,
        "Decoy-test accuracy through the platform",
        "committed marks (each commit is a version; the last point is the guided training phase)",
        "decoy-test accuracy %",
        (-0.5, a.marks as f64 + 0.5),
        (50.0, 100.0),
        &[Series {
            label: "model versions".into(),
            points,
            dashed: false,
        }],
    )?;
    Ok(())
}
