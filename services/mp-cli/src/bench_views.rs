//! `mp bench views`: what an expert waits for an image view (`GetImage`: pixels, prediction,
//! saliency) with many experts at once, on a real model size (ResNet-18 at 224x224 by
//! default) — against a real redis-server, a real `mp gateway` process and real `mp worker`
//! processes. Three phases: views the scoring pass stored; views not stored, computed by the
//! workers in dynamic batches; views not stored with no worker listening (the gateway computes
//! them itself, one at a time).

use crate::bench_scale::{
    pct, publish_bench_version, score_all, start_workers, synthetic_record, Workers,
};
use crate::common::ModelChoice;
use crate::report::{command_args, machine_line, today, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use mp_proto::v1 as pb;
use mp_store::server::RedisServer;
use mp_store::{ImageRecord, ProjectInfo, Role, Store};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ViewsArgs {
    /// Training images in the project (synthetic RGB)
    #[arg(long, default_value_t = 256)]
    pub n: usize,
    /// Image side
    #[arg(long, default_value_t = 224)]
    pub side: u32,
    /// Built-in architecture (ignored with --model)
    #[arg(long, default_value = "resnet18")]
    pub arch: String,
    /// A TorchScript module instead of a built-in architecture
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Experts asking at once
    #[arg(long, default_value_t = 32)]
    pub experts: usize,
    /// How long the experts ask for stored views (seconds)
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Views not stored yet that each expert asks for, per phase
    #[arg(long, default_value_t = 2)]
    pub misses: usize,
    /// Worker processes (one thread for jobs and one for views each)
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The workers' largest view batch (`mp worker --view-batch`): one phase each
    #[arg(long, default_value = "4,32", value_delimiter = ',')]
    pub view_batch: Vec<usize>,
    /// Pixel cache of the gateway and each worker (MiB)
    #[arg(long, default_value_t = 256)]
    pub cache_mb: usize,
    /// Where to keep Redis, images and checkpoints (default: a temporary directory)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    #[arg(long, default_value = "views")]
    pub section: String,
}

/// Latencies of one phase (ms) and its wall time.
struct Phase {
    name: String,
    ms: Vec<f64>,
    /// Requests whose view was not stored when asked (the miss phases count only these).
    misses: usize,
    seconds: f64,
}

struct Gateway(std::process::Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A new version with v1's weights under another name: no view of it is stored.
async fn fresh_version(store: &Store, checkpoints: &Path, version: u64) -> Result<()> {
    std::fs::copy(
        checkpoints.join("v1.safetensors"),
        checkpoints.join(format!("v{version}.safetensors")),
    )?;
    publish_bench_version(store, version, 1, "views benchmark").await?;
    store.set_serving_version(version).await?;
    Ok(())
}

/// Every expert: lease → GetImage (timed) → skip, until `until` or `per_expert` requests.
/// With `only_misses`, a request whose view was already stored is not counted.
async fn ask(
    addr: &str,
    tokens: &[String],
    store: &Store,
    until: Instant,
    per_expert: usize,
    only_misses: bool,
    name: String,
) -> Result<Phase> {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for token in tokens {
        let c = mp_api::Client::new(addr, token)?;
        let store = store.clone();
        set.spawn(async move {
            let mut ms = Vec::new();
            let mut misses = 0;
            let mut asked = 0;
            while Instant::now() < until && asked < per_expert {
                let lease = c
                    .queue
                    .clone()
                    .lease(pb::LeaseRequest {})
                    .await?
                    .into_inner();
                let Some(l) = lease.lease else {
                    tokio::time::sleep(Duration::from_millis(lease.retry_after_ms.max(10) as u64))
                        .await;
                    continue;
                };
                let version = store.serving_version().await?;
                let stored = store
                    .image_store()
                    .await?
                    .view(version, &l.image_id)
                    .await?
                    .is_some();
                let t = Instant::now();
                let v = c
                    .images
                    .clone()
                    .get_image(pb::GetImageRequest {
                        image_id: l.image_id.clone(),
                        model_version: 0,
                    })
                    .await?
                    .into_inner();
                let took = t.elapsed().as_secs_f64() * 1e3;
                if v.saliency.len() != (v.width * v.height) as usize {
                    bail!("image {} came without its saliency", l.image_id);
                }
                if !stored {
                    misses += 1;
                }
                if !only_misses || !stored {
                    ms.push(took);
                    asked += 1;
                }
                c.queue
                    .clone()
                    .skip(pb::SkipRequest {
                        lease_id: l.lease_id,
                    })
                    .await?;
            }
            Ok::<_, anyhow::Error>((ms, misses))
        });
    }
    let mut phase = Phase {
        name,
        ms: Vec::new(),
        misses: 0,
        seconds: 0.0,
    };
    while let Some(r) = set.join_next().await {
        let (ms, misses) = r??;
        phase.ms.extend(ms);
        phase.misses += misses;
    }
    phase.seconds = start.elapsed().as_secs_f64();
    Ok(phase)
}

struct Outcome {
    phases: Vec<Phase>,
    /// Scoring pass: seconds, images.
    pass: (f64, usize),
    model: String,
}

async fn bench(a: &ViewsArgs, dir: &Path) -> Result<Outcome> {
    let redis = RedisServer::start_free(&dir.join("redis"))?;
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let store = Store::connect(&redis.url(), "mp").await?;
    let classes: Vec<String> = (0..10).map(|c| format!("c{c}")).collect();
    store
        .set_project(&ProjectInfo {
            name: "views benchmark".into(),
            classes: classes.clone(),
            width: a.side,
            height: a.side,
            channels: 3,
            image_store: checkpoints.join("images").display().to_string(),
        })
        .await?;
    let rec = |i: usize, id: String| synthetic_record(i, id, a.side);
    let val: Vec<ImageRecord> = (0..32)
        .map(|i| rec(a.n + i, format!("val:{:06}.png", a.n + i)))
        .collect();
    store.put_held_out("val", &val).await?;
    let train: Vec<ImageRecord> = (0..a.n).map(|i| rec(i, format!("{i:06}.png"))).collect();
    store.put_images(&train).await?;
    let mut rng = mp_core::rng::Rng::new(7);
    let items: Vec<(String, f64)> = train
        .iter()
        .map(|r| (r.id.clone(), rng.next_f64()))
        .collect();
    store.enqueue(&items).await?;
    drop(train);
    tch::manual_seed(0);
    let choice = ModelChoice::new(&a.arch, a.model.as_deref())?;
    let side = a.side as usize;
    let model = choice.build(classes, (3, side, side), tch::Device::Cpu)?;
    model.save(&checkpoints.join("v1.safetensors"))?;
    drop(model);
    publish_bench_version(&store, 1, 0, "views benchmark").await?;
    store.set_serving_version(1).await?;
    store.ensure_job_groups().await?;

    // The scoring pass stores every image's view.
    let url = redis.url();
    let batch_flag = |b: usize| vec!["--view-batch".to_string(), b.to_string()];
    let first = a.view_batch.first().copied().unwrap_or(32);
    let flags = batch_flag(first);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut workers: Workers = start_workers(
        &url,
        &checkpoints,
        dir,
        &format!("views-b{first}"),
        a.workers,
        a.cache_mb,
        &flags,
    )
    .await?;
    let ids = store.image_ids().await?;
    println!(
        "scoring pass: {} images, {} worker(s)",
        ids.len(),
        a.workers
    );
    let pass_s = score_all(&store, &mut workers, &ids, 1, 32, 7200, dir).await?;
    println!(
        "  {pass_s:.1} s ({:.1} images/s)",
        ids.len() as f64 / pass_s
    );

    // The gateway, as its own process.
    let port = free_port()?;
    let addr = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let _gateway = Gateway(
        std::process::Command::new(std::env::current_exe()?)
            .arg("gateway")
            .env("MP_LISTEN", format!("127.0.0.1:{port}"))
            .env("MP_REDIS_URL", &url)
            .env("MP_CHECKPOINTS", &checkpoints)
            .env("MP_METRICS_LISTEN", "")
            .env("MP_IMAGE_CACHE_MB", a.cache_mb.to_string())
            .env("MP_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let mut tokens = Vec::new();
    for e in 0..a.experts {
        tokens.push(store.create_expert(&format!("e{e}"), Role::Expert).await?.1);
    }
    let probe = mp_api::Client::new(&addr, &tokens[0])?;
    let t = Instant::now();
    while probe
        .stats
        .clone()
        .get_stats(pb::StatsRequest {})
        .await
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the gateway did not answer (log in {})", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut phases = Vec::new();
    println!("stored views: {} experts for {} s", a.experts, a.seconds);
    let until = Instant::now() + Duration::from_secs(a.seconds);
    phases.push(
        ask(
            &addr,
            &tokens,
            &store,
            until,
            usize::MAX,
            false,
            "stored by the scoring pass".into(),
        )
        .await?,
    );
    let far = Instant::now() + Duration::from_secs(3600);
    let mut version = 1;
    for (k, &b) in a.view_batch.iter().enumerate() {
        if k > 0 {
            drop(workers);
            let flags = batch_flag(b);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            workers = start_workers(
                &url,
                &checkpoints,
                dir,
                &format!("views-b{b}"),
                a.workers,
                a.cache_mb,
                &flags,
            )
            .await?;
        }
        println!("views not stored, workers listening (view batch {b})");
        version += 1;
        fresh_version(&store, &checkpoints, version).await?;
        phases.push(
            ask(
                &addr,
                &tokens,
                &store,
                far,
                a.misses,
                true,
                format!("not stored: computed by the workers, view batch ≤ {b}"),
            )
            .await?,
        );
    }
    println!("views not stored, no worker");
    drop(workers);
    // Until the workers' last announcement is older than the gateway's window.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fresh_version(&store, &checkpoints, version + 1).await?;
    phases.push(
        ask(
            &addr,
            &tokens,
            &store,
            far,
            a.misses,
            true,
            "not stored: computed by the gateway alone".into(),
        )
        .await?,
    );
    Ok(Outcome {
        phases,
        pass: (pass_s, ids.len()),
        model: choice.describe(),
    })
}

/// Requests per view batch, from the logs of the workers started with view batch `b`.
fn batch_sizes(dir: &Path, b: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(&format!("worker-views-b{b}-")) {
            continue;
        }
        for line in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            if line.contains("views computed") {
                if let Some(n) = line
                    .split("requests=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|r| r.parse().ok())
                {
                    out.push(n);
                }
            }
        }
    }
    out
}

pub fn run(a: ViewsArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().join("views"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let rt = crate::platform::runtime()?;
    let out = rt
        .block_on(bench(&a, &dir))
        .with_context(|| format!("logs in {}", dir.display()))?;
    let batches: Vec<(usize, Vec<usize>)> = a
        .view_batch
        .iter()
        .map(|&b| (b, batch_sizes(&dir, b)))
        .collect();
    let text = render(&a, &out, &batches);
    println!("{text}");
    write_section(&a.out, &a.section, &text)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn render(a: &ViewsArgs, o: &Outcome, batches: &[(usize, Vec<usize>)]) -> String {
    let mut s = format!(
        "## Image views: GetImage with {e} experts at once, {m} at {side}x{side}\n\n\
         `mp bench views {}` — {}, {}.\n\n\
         A real redis-server, one `mp gateway` process, {w} `mp worker` processes (one thread \
         for jobs and one for views each, libtorch on one thread), the filesystem image store; \
         {n} synthetic RGB images, 10 classes, the model freshly initialised (the cost does not \
         depend on its weights). Each of {e} experts runs its own client: lease → `GetImage` \
         (timed, at the client) → skip, all at once. First the scoring pass stores every \
         image's view ({pass:.1} s for {imgs} images, {rate:.2} images/s with {w} workers); \
         then a new serving version appears (as at the start of a round) and each expert asks \
         for {k} views not stored yet — with the workers listening (one phase per largest view \
         batch), then with none.\n\n\
         | views | requests | p50 ms | p95 ms | p99 ms | max ms | views/s |\n|---|---|---|---|---|---|---|\n",
        command_args(),
        machine_line(),
        today(),
        e = a.experts,
        m = o.model,
        side = a.side,
        w = a.workers,
        n = a.n,
        pass = o.pass.0,
        imgs = o.pass.1,
        rate = o.pass.1 as f64 / o.pass.0,
        k = a.misses,
    );
    for p in &o.phases {
        let mut ms = p.ms.clone();
        if ms.is_empty() {
            s.push_str(&format!("| {} | 0 | | | | | |\n", p.name));
            continue;
        }
        let n = ms.len();
        s.push_str(&format!(
            "| {} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            p.name,
            pct(&mut ms, 0.5),
            pct(&mut ms, 0.95),
            pct(&mut ms, 0.99),
            pct(&mut ms, 1.0),
            n as f64 / p.seconds,
        ));
    }
    if let Some(stored) = o.phases.first().filter(|p| !p.ms.is_empty()) {
        let mut ms = stored.ms.clone();
        let p99 = pct(&mut ms, 0.99);
        s.push_str(&format!(
            "\nTarget: `GetImage` p99 ≤ 50 ms at {} experts — **{}** ({p99:.1} ms) for views the \
             scoring pass stored{}.\n",
            a.experts,
            if p99 <= 50.0 { "met" } else { "missed" },
            if stored.misses > 0 {
                format!(" ({} of its requests found no stored view)", stored.misses)
            } else {
                String::new()
            }
        ));
    }
    for (b, sizes) in batches.iter().filter(|(_, v)| !v.is_empty()) {
        s.push_str(&format!(
            "With view batch ≤ {b} the workers formed {} batches of {:.1} requests on average \
             (largest {}).\n",
            sizes.len(),
            sizes.iter().sum::<usize>() as f64 / sizes.len() as f64,
            sizes.iter().max().copied().unwrap_or(0),
        ));
    }
    s
}
