//! `mp bench scale`: a project of N synthetic RGB images (128x128 by default) against a real
//! redis-server, the filesystem image store and real worker processes — ingest images/s,
//! Redis memory per image, one full scoring pass (saliency + alignment of every image) with
//! 1 and 2 workers, and lease → submit latency with the whole queue waiting, per N.

use crate::report::{command_args, machine_line, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_core::model::{Arch, Model, ModelSpec};
use mp_store::server::RedisServer;
use mp_store::{ImageRecord, ModelVersionRecord, ProjectInfo, Role, Store, SCORE_STREAM};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ScaleArgs {
    /// Project sizes (images)
    #[arg(long, default_value = "10000,100000", value_delimiter = ',')]
    pub n: Vec<usize>,
    /// Image side (RGB)
    #[arg(long, default_value_t = 128)]
    pub side: u32,
    /// Worker processes of each scoring pass (one thread each)
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// Sequential lease → submit pairs timed per N
    #[arg(long, default_value_t = 2000)]
    pub leases: usize,
    /// Model the workers score with
    #[arg(long, default_value = "small-cnn")]
    pub arch: String,
    /// Pixel cache of each worker (MiB); below the project's size, as on a real cluster
    #[arg(long, default_value_t = 256)]
    pub cache_mb: usize,
    /// Images per score job (a worker takes up to 16 jobs at once)
    #[arg(long, default_value_t = 100)]
    pub score_chunk: usize,
    /// Score only the first M images of each project (default: all; 0: no scoring pass);
    /// the table says when a pass was partial
    #[arg(long)]
    pub score_images: Option<usize>,
    /// Give up a scoring pass after this long (seconds)
    #[arg(long, default_value_t = 3600)]
    pub score_timeout_s: u64,
    /// Where to keep each run's Redis, images and checkpoints (default: a temporary directory)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// The BENCHMARKS.md section to (re)write, so that a partial run (e.g. latency only,
    /// `--score-images 0`) does not replace the full one
    #[arg(long, default_value = "scale")]
    pub section: String,
}

pub struct ScaleRow {
    pub n: usize,
    pub ingest_s: f64,
    pub redis_bytes_per_image: f64,
    pub image_store_bytes_per_image: f64,
    /// (workers, seconds, images/s in all)
    pub passes: Vec<(usize, f64, f64)>,
    /// Images in each scoring pass.
    pub scored: usize,
    pub lease_ms: (f64, f64),
    pub submit_ms: (f64, f64),
    pub pair_ms: (f64, f64),
}

/// A synthetic image of class `label`: a smooth two-colour gradient with a disc whose colour
/// and place depend on the image, so that compression and the model see real variety.
pub fn synthetic_image(i: usize, label: u32, side: u32) -> Vec<u8> {
    let mut r = mp_core::rng::Rng::new(i as u64 * 7919 + 17);
    let s = side as usize;
    let (a, b): ([f64; 3], [f64; 3]) = (
        [r.next_f64(), r.next_f64(), r.next_f64()],
        [r.next_f64(), r.next_f64(), r.next_f64()],
    );
    let (cx, cy) = (r.next_f64() * s as f64, r.next_f64() * s as f64);
    let rad = (0.08 + 0.1 * r.next_f64()) * s as f64;
    let hue = label as f64 / 10.0;
    let disc = [hue, 1.0 - hue, (hue * 3.0).fract()];
    let mut px = vec![0u8; s * s * 3];
    for y in 0..s {
        for x in 0..s {
            let t = (x + y) as f64 / (2 * s) as f64;
            let inside = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2) < rad * rad;
            for k in 0..3 {
                let v = if inside {
                    disc[k]
                } else {
                    a[k] * (1.0 - t) + b[k] * t
                };
                px[(y * s + x) * 3 + k] = (v * 255.0) as u8;
            }
        }
    }
    px
}

/// Image `i` of a synthetic project (class `i % 10`) under the id `id`.
pub(crate) fn synthetic_record(i: usize, id: String, side: u32) -> ImageRecord {
    let label = (i % 10) as u32;
    ImageRecord {
        id,
        name: format!("{i:06}.png"),
        label,
        width: side,
        height: side,
        channels: 3,
        pixels: synthetic_image(i, label, side),
    }
}

/// Publishes checkpoint `v{version}.safetensors` as `version` (no figures: a benchmark's).
pub(crate) async fn publish_bench_version(
    store: &Store,
    version: u64,
    parent: u64,
    reason: &str,
) -> Result<()> {
    store
        .publish_version(&ModelVersionRecord {
            version,
            parent,
            created_ms: mp_store::now_ms(),
            reason: reason.into(),
            val_accuracy: 0.0,
            val_loss: 0.0,
            test_accuracy: f64::NAN,
            file: format!("v{version}.safetensors"),
        })
        .await?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

pub(crate) fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

pub(crate) struct Workers(pub Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` real `mp worker` processes (one thread each, `cache_mb` of pixel cache, `extra`
/// flags), started when every one says so; logs in `logs/worker-{tag}-{w}.log`.
pub(crate) async fn start_workers(
    redis_url: &str,
    checkpoints: &Path,
    logs: &Path,
    tag: &str,
    n: usize,
    cache_mb: usize,
    extra: &[&str],
) -> Result<Workers> {
    let exe = std::env::current_exe()?;
    let mut procs = Workers(Vec::new());
    let log_of = |w: usize| logs.join(format!("worker-{tag}-{w}.log"));
    for w in 0..n {
        let log = std::fs::File::create(log_of(w))?;
        procs.0.push(
            std::process::Command::new(&exe)
                .args(["worker", "--redis-url", redis_url, "--checkpoints"])
                .arg(checkpoints)
                .args(["--worker-threads", "1", "--name"])
                .arg(format!("bench-{tag}-{w}"))
                .args(extra)
                .env("MP_THREADS", "1")
                .env("MP_IMAGE_CACHE_MB", cache_mb.to_string())
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }
    // Started when every worker says so (its model is loaded on the first job).
    let t = Instant::now();
    while !(0..n).all(|w| {
        std::fs::read_to_string(log_of(w)).is_ok_and(|s| s.contains("worker pool started"))
    }) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("workers did not start (logs in {})", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(procs)
}

/// Appends score jobs of `chunk` images for `version` and waits until the workers are
/// through them; seconds taken.
pub(crate) async fn score_all(
    store: &Store,
    procs: &mut Workers,
    ids: &[String],
    version: u64,
    chunk: usize,
    timeout_s: u64,
    logs: &Path,
) -> Result<f64> {
    let start = Instant::now();
    for chunk in ids.chunks(chunk.max(1)) {
        store
            .add_job(
                SCORE_STREAM,
                &[
                    ("kind", "score".into()),
                    ("version", version.to_string()),
                    ("images", chunk.join(" ")),
                ],
            )
            .await?;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store.backlog(SCORE_STREAM, "score").await? == 0 {
            break;
        }
        for c in &mut procs.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a worker exited ({s}); logs in {}", logs.display());
            }
        }
        if start.elapsed() > Duration::from_secs(timeout_s) {
            bail!("scoring pass over {timeout_s} s");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

async fn scoring_pass(
    a: &ScaleArgs,
    store: &Store,
    redis_url: &str,
    checkpoints: &Path,
    logs: &Path,
    workers: usize,
    pass: usize,
) -> Result<f64> {
    let mut procs = start_workers(
        redis_url,
        checkpoints,
        logs,
        &pass.to_string(),
        workers,
        a.cache_mb,
        &[],
    )
    .await?;
    let mut ids = store.image_ids().await?;
    ids.truncate(a.score_images.unwrap_or(usize::MAX));
    score_all(
        store,
        &mut procs,
        &ids,
        1,
        a.score_chunk,
        a.score_timeout_s,
        logs,
    )
    .await
}

/// A project after ingest and scoring, its Redis still running for the latency phase.
struct Sized {
    row: ScaleRow,
    store: Store,
    _redis: RedisServer,
}

async fn one_size(a: &ScaleArgs, n: usize, dir: &Path) -> Result<Sized> {
    std::fs::create_dir_all(dir)?;
    let redis = RedisServer::start_free(&dir.join("redis"))?;
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let images = checkpoints.join("images");
    let store = Store::connect(&redis.url(), "mp").await?;
    let classes: Vec<String> = (0..10).map(|c| format!("c{c}")).collect();
    store
        .set_project(&ProjectInfo {
            name: format!("synthetic {n}"),
            classes: classes.clone(),
            width: a.side,
            height: a.side,
            channels: 3,
            image_store: images.display().to_string(),
        })
        .await?;
    let rec = |i: usize, id: String| synthetic_record(i, id, a.side);
    let val: Vec<ImageRecord> = (0..200)
        .map(|i| rec(n + i, format!("val:c{}/{:06}.png", i % 10, n + i)))
        .collect();
    store.put_held_out("val", &val).await?;
    let mem0 = store.used_memory().await?;
    // Ingest: encode + write the pixels, the metadata, the queue entry. Generating the
    // synthetic pixels is not counted.
    let pb = crate::common::bar(n as u64, &format!("ingest {n}"));
    let mut ingest = Duration::ZERO;
    let mut rng = mp_core::rng::Rng::new(n as u64);
    for start in (0..n).step_by(1000) {
        let chunk: Vec<ImageRecord> = (start..(start + 1000).min(n))
            .map(|i| rec(i, format!("c{}/{i:06}.png", i % 10)))
            .collect();
        let items: Vec<(String, f64)> = chunk
            .iter()
            .map(|r| (r.id.clone(), rng.next_f64()))
            .collect();
        let t = Instant::now();
        store.put_images(&chunk).await?;
        store.enqueue(&items).await?;
        ingest += t.elapsed();
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let mem1 = store.used_memory().await?;
    let image_bytes = dir_bytes(&images) as f64 / (n + val.len()) as f64;
    // Version 1: a freshly initialised model (scoring cost does not depend on its weights).
    tch::manual_seed(0);
    let model = Model::new(
        ModelSpec {
            arch: a.arch.parse::<Arch>()?,
            classes,
            channels: 3,
            height: a.side as usize,
            width: a.side as usize,
            version: 1,
            script: None,
        },
        tch::Device::Cpu,
    )?;
    model.save(&checkpoints.join("v1.safetensors"))?;
    publish_bench_version(&store, 1, 0, "scale benchmark").await?;
    store.ensure_job_groups().await?;
    let mut passes = Vec::new();
    let scored = a.score_images.unwrap_or(n).min(n);
    for (k, &w) in a.workers.iter().enumerate().filter(|_| scored > 0) {
        println!("n {n}: scoring pass over {scored} images with {w} worker(s)");
        let s = scoring_pass(a, &store, &redis.url(), &checkpoints, dir, w, k).await?;
        println!("  {s:.1} s, {:.0} images/s", scored as f64 / s);
        passes.push((w, s, scored as f64 / s));
    }
    store.create_expert("bench", Role::Expert).await?;
    Ok(Sized {
        row: ScaleRow {
            n,
            ingest_s: ingest.as_secs_f64(),
            redis_bytes_per_image: (mem1 as f64 - mem0 as f64) / n as f64,
            image_store_bytes_per_image: image_bytes,
            passes,
            scored,
            lease_ms: (0.0, 0.0),
            submit_ms: (0.0, 0.0),
            pair_ms: (0.0, 0.0),
        },
        store,
        _redis: redis,
    })
}

/// Lease → submit on every project's queue, one expert, sequential, the projects taking
/// turns lease by lease: each size sees the same moments of the machine (disk, steal time),
/// so a difference between them is the queue's size, not the minute it ran in.
async fn latencies(a: &ScaleArgs, sized: &mut [Sized]) -> Result<()> {
    let side = a.side;
    let mut mask = vec![0i8; (side * side) as usize];
    mask[..side as usize * 8].iter_mut().for_each(|v| *v = 1);
    let mut t: Vec<[Vec<f64>; 3]> = sized.iter().map(|_| Default::default()).collect();
    for i in 0..a.leases {
        for (s, times) in sized.iter().zip(t.iter_mut()) {
            let t0 = Instant::now();
            let Some(l) = s.store.lease("bench", 60_000).await? else {
                bail!("the queue of {} ran dry after {i} leases", s.row.n);
            };
            let t1 = Instant::now();
            s.store
                .submit(&l.lease_id, "bench", &format!("k{i}"), side, side, &mask)
                .await?;
            let t2 = Instant::now();
            times[0].push((t1 - t0).as_secs_f64() * 1e3);
            times[1].push((t2 - t1).as_secs_f64() * 1e3);
            times[2].push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    for (s, mut times) in sized.iter_mut().zip(t) {
        let mut p = |k: usize| (pct(&mut times[k], 0.5), pct(&mut times[k], 0.99));
        s.row.lease_ms = p(0);
        s.row.submit_ms = p(1);
        s.row.pair_ms = p(2);
    }
    Ok(())
}

pub fn run(a: ScaleArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let rt = crate::platform::runtime()?;
    let mut sized = Vec::new();
    for &n in &a.n {
        let dir = base.join(format!("n{n}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let s = rt.block_on(one_size(&a, n, &dir))?;
        println!(
            "n {n}: ingest {:.0} images/s, Redis {:.0} B/image",
            n as f64 / s.row.ingest_s,
            s.row.redis_bytes_per_image,
        );
        sized.push(s);
    }
    rt.block_on(latencies(&a, &mut sized))?;
    let rows: Vec<ScaleRow> = sized.into_iter().map(|s| s.row).collect();
    for n in &a.n {
        let _ = std::fs::remove_dir_all(base.join(format!("n{n}")));
    }
    for r in &rows {
        println!(
            "n {}: lease→submit p50 {:.2} ms p99 {:.2} ms",
            r.n, r.pair_ms.0, r.pair_ms.1
        );
    }
    write_section(&a.out, &a.section, &render(&a, &rows))?;
    println!("wrote {}", a.out.display());
    Ok(())
}

pub fn render(a: &ScaleArgs, rows: &[ScaleRow]) -> String {
    let title = match a.score_images {
        Some(0) => "Scale: lease latency, N synthetic RGB {side}x{side} images (no scoring pass)",
        _ => "Scale: N synthetic RGB {side}x{side} images",
    }
    .replace("{side}", &a.side.to_string());
    let mut s = format!(
        "## {title}\n\n`mp bench scale {}` — {}, {}.\n\n\
         A real redis-server (AOF, fsync always), the filesystem image store, `mp worker` \
         processes with one thread each and a {cache} MiB pixel cache, the `{arch}` model \
         freshly initialised at {side}x{side}x3, 10 classes. Ingest counts PNG encoding, the \
         object writes, the metadata and the queue entry (not making the synthetic pixels). \
         Redis bytes per image: `used_memory` after ingest minus before, over N (metadata, \
         split membership, queue entry). A scoring pass is every image's saliency, alignment \
         and priority written back, from the first job appended to the last acknowledged \
         (workers already started). Lease → submit: one expert, sequential, with the queue \
         full (less the images leased before), through the store's Lua scripts (the gateway \
         adds the same gRPC cost at any N); the sizes take turns lease by lease, each in its \
         own redis-server, so both see the same moments of the machine.\n\n",
        command_args(),
        machine_line(),
        today(),
        side = a.side,
        cache = a.cache_mb,
        arch = a.arch,
    );
    s.push_str("| N | ingest images/s | Redis B/image | image store B/image |");
    for w in &a.workers {
        s.push_str(&format!(" scoring pass, {w} worker(s) |"));
    }
    s.push_str(
        " lease p50/p99 ms | submit p50/p99 ms | lease→submit p50/p99 ms |\n|---|---|---|---|",
    );
    for _ in &a.workers {
        s.push_str("---|");
    }
    s.push_str("---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |",
            r.n,
            r.n as f64 / r.ingest_s,
            r.redis_bytes_per_image,
            r.image_store_bytes_per_image
        ));
        for k in 0..a.workers.len() {
            match r.passes.get(k) {
                Some((w, secs, ips)) if r.scored == r.n => s.push_str(&format!(
                    " {secs:.0} s ({ips:.0} img/s, {:.0} per worker) |",
                    ips / *w as f64
                )),
                Some((w, secs, ips)) => s.push_str(&format!(
                    " {:.0} s projected from {} images in {secs:.0} s ({ips:.0} img/s, {:.0} per worker) |",
                    r.n as f64 / ips,
                    r.scored,
                    ips / *w as f64
                )),
                None => s.push_str(" not run |"),
            }
        }
        s.push_str(&format!(
            " {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
            r.lease_ms.0, r.lease_ms.1, r.submit_ms.0, r.submit_ms.1, r.pair_ms.0, r.pair_ms.1
        ));
    }
    if let (Some(small), Some(big)) = (rows.first(), rows.last()) {
        if big.n > small.n {
            s.push_str(&format!(
                "\nLease → submit at N = {} against N = {}: p50 {:+.1} %, p99 {:+.1} % (target: within 10 %).\n",
                big.n,
                small.n,
                100.0 * (big.pair_ms.0 / small.pair_ms.0 - 1.0),
                100.0 * (big.pair_ms.1 / small.pair_ms.1 - 1.0)
            ));
        }
        if let Some(&(w, secs, _)) = big.passes.first() {
            let per_image = secs * w as f64 / big.scored as f64;
            s.push_str(&format!(
                "\nPlanning a cluster: one worker thread here costs {:.2} ms per image per scoring \
                 pass, so a pass over N images on K such workers takes about N x {:.2} ms / K \
                 (1M images on 16 workers: {:.0} min). Assumptions: workers scale linearly (the \
                 table's 1 → 2 worker rows measure how closely on this 2-core machine), Redis \
                 and the image store are not the bottleneck (ingest and the cache above show \
                 their headroom), and a GPU worker's cost per image is the CUDA saliency rate of \
                 the same model measured in the speed section, not this CPU figure.\n",
                per_image * 1e3,
                per_image * 1e3,
                1e6 * per_image / 16.0 / 60.0
            ));
        }
    }
    s
}
