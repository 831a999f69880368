//! `mp bench queue`: lease → submit round trip (p50, p99) and leases per second with 1, 8
//! and 32 concurrent simulated experts against a real redis-server and gateway, closed loop
//! and paced; with the CPU each lease costs, the AOF fsync stalls Redis saw, and optionally
//! the transport's floor (an in-memory queue) and the disk's fsync tail under CPU load.

use crate::platform::{runtime, sim_clients, synthetic_project, LocalPlatform};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_api::sim::{self, Outcome, SimConfig};
use mp_api::Client;
use mp_proto::v1 as pb;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::{Request, Response, Status};

#[derive(Args)]
pub struct QueueArgs {
    /// Concurrent experts per run
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub experts: Vec<usize>,
    /// Leases per run
    #[arg(long, default_value_t = 5000)]
    pub leases: usize,
    /// Offered loads (leases/s, all experts together) of the paced runs, where each expert
    /// starts leases on a fixed schedule instead of as fast as replies come back
    #[arg(long, default_value = "2000", value_delimiter = ',')]
    pub paced_rates: Vec<f64>,
    /// Experts in the paced runs
    #[arg(long, default_value_t = 32)]
    pub paced_experts: usize,
    /// Also run the paced load against a queue service that answers from memory (no Redis,
    /// no auth, no durability): the gRPC transport's own share of the round trip.
    #[arg(long)]
    pub transport_floor: bool,
    /// Also time write + fdatasync of a small append-only file, alone and with both cores
    /// kept busy: the disk's own tail under CPU load, which an `appendfsync always` Redis
    /// waits for before it answers
    #[arg(long)]
    pub fsync_probe: bool,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

/// A queue that grants leases from a counter and accepts every submit: the same RPCs and
/// messages as the gateway's, with nothing behind them.
struct MemoryQueue(std::sync::atomic::AtomicU64);

#[tonic::async_trait]
impl pb::queue_service_server::QueueService for MemoryQueue {
    async fn lease(
        &self,
        _: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let seq = self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::LeaseReply {
            lease: Some(pb::Lease {
                lease_id: format!("{seq:032x}"),
                image_id: format!("img-{seq:06}"),
                deadline_ms: 0,
                lease_seq: seq,
                model_version: 1,
                priority: 0.0,
                width: 8,
                height: 8,
            }),
            retry_after_ms: 0,
        }))
    }
    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        Ok(Response::new(pb::HeartbeatReply { deadline_ms: 0 }))
    }
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let seq = self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::SubmitReply {
            mark_id: format!("{seq:032x}"),
            proposal_id: req.into_inner().idempotency_key,
            release_seq: seq,
            marks_on_image: 1,
            ..Default::default()
        }))
    }
    async fn skip(&self, _: Request<pb::SkipRequest>) -> Result<Response<pb::SkipReply>, Status> {
        Ok(Response::new(pb::SkipReply { release_seq: 0 }))
    }
    async fn lease_review(
        &self,
        _: Request<pb::LeaseReviewRequest>,
    ) -> Result<Response<pb::LeaseReviewReply>, Status> {
        Ok(Response::new(pb::LeaseReviewReply { item: None }))
    }
    async fn settle(
        &self,
        _: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleReply>, Status> {
        Err(Status::failed_precondition(
            "nothing to review in a memory queue",
        ))
    }
}

/// Serves [`MemoryQueue`] on a free port until `stop` fires; returns its address.
async fn memory_queue(stop: tokio::sync::oneshot::Receiver<()>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let svc = pb::queue_service_server::QueueServiceServer::new(MemoryQueue(Default::default()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop.await;
                },
            ),
    );
    Ok(addr)
}

/// One run's figures.
struct Row {
    experts: usize,
    load: String,
    leases: usize,
    per_s: f64,
    p50: f64,
    p99: f64,
    /// CPU microseconds per lease of redis-server (NaN without one) and of this process
    /// (gateway and simulated experts).
    redis_us: f64,
    rest_us: f64,
    /// Seconds of the run in which a Redis AOF fsync took ≥ STALL_MS, and the worst one (ms).
    stalls: Option<(usize, u64)>,
}

/// Redis's latency monitor records fsyncs at least this slow.
const STALL_MS: u64 = 3;

/// Runs the simulated experts and measures their lease → submit round trips and the CPU
/// spent per lease.
async fn measure(
    clients: Vec<Client>,
    cfg: SimConfig,
    redis: Option<&mp_store::server::RedisServer>,
    load: String,
) -> Result<Row> {
    use mp_store::server::cpu_time;
    let redis_cpu = || redis.and_then(|r| r.cpu_time());
    let experts = cfg.experts;
    let before = (redis_cpu(), cpu_time("self"));
    let r = sim::run(clients, cfg).await;
    let after = (redis_cpu(), cpu_time("self"));
    if r.count(Outcome::Failed) > 0 {
        bail!(
            "{} operations failed: {:?}",
            r.count(Outcome::Failed),
            r.errors.first()
        );
    }
    let mut rt: Vec<Duration> = r
        .events
        .iter()
        .filter(|e| e.outcome == Outcome::Submitted)
        .map(|e| e.round_trip)
        .collect();
    if rt.is_empty() {
        bail!("no submit went through: {:?}", r.errors.first());
    }
    let leases = r.events.len();
    let per_lease = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() * 1e6 / leases as f64,
        _ => f64::NAN,
    };
    let row = Row {
        experts,
        load,
        leases,
        per_s: leases as f64 / r.elapsed.as_secs_f64(),
        p50: pct(&mut rt, 0.5),
        p99: pct(&mut rt, 0.99),
        redis_us: per_lease(before.0, after.0),
        rest_us: per_lease(before.1, after.1),
        stalls: None,
    };
    println!(
        "{:>3} experts ({}): {} leases in {:.2} s, {:.0} leases/s, round trip p50 {:.2} ms p99 {:.2} ms; \
         CPU per lease: redis-server {:.0} us, gateway + experts {:.0} us",
        row.experts, row.load, row.leases, r.elapsed.as_secs_f64(), row.per_s, row.p50, row.p99, row.redis_us, row.rest_us
    );
    Ok(row)
}

const PROBE_N: usize = 3000;

/// Times PROBE_N appends of 4 KB, each followed by fdatasync, while `busy` threads spin.
fn fsync_probe(busy: usize) -> Result<Vec<Duration>> {
    use std::io::Write;
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("probe.aof"))?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..busy)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    let block = [b'x'; 4096];
    let mut times = Vec::with_capacity(PROBE_N);
    let r = (|| -> std::io::Result<()> {
        for _ in 0..PROBE_N {
            f.write_all(&block)?;
            let t = std::time::Instant::now();
            f.sync_data()?;
            times.push(t.elapsed());
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for h in spinners {
        let _ = h.join();
    }
    r?;
    Ok(times)
}

pub fn run(a: QueueArgs) -> Result<()> {
    let rows = runtime()?.block_on(async {
        let mut rows = Vec::new();
        let closed = a.experts.iter().map(|&n| (n, None));
        let paced = a.paced_rates.iter().map(|&r| (a.paced_experts, Some(r)));
        let pace = |n: usize, rate: Option<f64>| {
            rate.map(|r| Duration::from_secs_f64(n as f64 / r))
                .unwrap_or_default()
        };
        for (n, rate) in closed.chain(paced) {
            let dir = tempfile::tempdir()?;
            let p = LocalPlatform::start(dir.path(), 60_000).await?;
            let admin = synthetic_project(&p.store, a.leases + 100, &p.dir.join("images")).await?;
            let clients = sim_clients(&p.addr, &admin, n, "bench").await?;
            // Warm the connections.
            for c in &clients {
                let _ = c.stats.clone().get_stats(pb::StatsRequest {}).await;
            }
            let cfg = SimConfig {
                experts: n,
                leases: a.leases,
                heartbeat: false,
                pace: pace(n, rate),
                ..Default::default()
            };
            let load = rate
                .map(|r| format!("paced, {r:.0}/s offered"))
                .unwrap_or_else(|| "closed loop".into());
            p.store.monitor_latency(STALL_MS).await?;
            let mut row = measure(clients, cfg, Some(&p.redis), load).await;
            if let Ok(r) = row.as_mut() {
                let h = p.store.latency_history("aof-fsync-always").await?;
                let worst = h.iter().map(|&(_, ms)| ms).max().unwrap_or(0);
                println!(
                    "    Redis fsync ≥ {STALL_MS} ms in {} seconds of the run, worst {worst} ms",
                    h.len()
                );
                r.stalls = Some((h.len(), worst));
            }
            p.stop().await;
            rows.push(row?);
        }
        if a.transport_floor {
            for &rate in &a.paced_rates {
                let n = a.paced_experts;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let addr = memory_queue(rx).await?;
                let clients = (0..n)
                    .map(|_| Client::new(&addr, "floor"))
                    .collect::<Result<Vec<_>, _>>()?;
                for c in &clients {
                    let _ = c
                        .queue
                        .clone()
                        .heartbeat(pb::HeartbeatRequest::default())
                        .await;
                }
                let cfg = SimConfig {
                    experts: n,
                    leases: a.leases,
                    heartbeat: false,
                    pace: pace(n, Some(rate)),
                    ..Default::default()
                };
                let row = measure(
                    clients,
                    cfg,
                    None,
                    format!(
                        "paced, {rate:.0}/s offered; transport floor: in-memory queue, no Redis"
                    ),
                )
                .await;
                let _ = tx.send(());
                rows.push(row?);
            }
        }
        anyhow::Ok(rows)
    })?;
    let mut s = format!(
        "## Review queue: lease → submit round trip\n\nCommand: `mp bench queue {}`  \nDate: {}; machine: {}. \
         A real redis-server (AOF, `appendfsync always`), the gateway and the simulated experts (one gRPC connection each) \
         all on this machine; each lease is answered with a submit of an 8x8 mask (Lua lease claim, durable mark, proposal, refine job).\n\n\
         *Closed loop*: each expert leases again as soon as its submit returns, so the run measures capacity and, by Little's law, \
         its round trip is experts / throughput. *Paced*: each expert starts a lease on a fixed schedule (the offered load spread over the experts) \
         and the round trip is timed from the scheduled start, so a stall cannot hide behind a late start. \
         *Transport floor* (with `--transport-floor`): the same experts and RPCs against a queue service that answers from memory, \
         so the gRPC client and server alone. CPU per lease: CPU time of redis-server, and of this process (gateway and experts), \
         during the run divided by the leases. *fsync stalls*: seconds of the run in which Redis's latency monitor saw an AOF fsync \
         take ≥ {STALL_MS} ms, and the worst.\n\n\
         | experts | load | leases | leases/s | round trip p50 ms | p99 ms | CPU/lease redis-server µs | CPU/lease gateway + experts µs | fsync stalls: s, worst ms |\n|---|---|---|---|---|---|---|---|---|\n",
        crate::report::command_args(),
        today(),
        machine_line()
    );
    for r in rows {
        let redis = if r.redis_us.is_nan() {
            "–".to_string()
        } else {
            format!("{:.0}", r.redis_us)
        };
        let stalls = r
            .stalls
            .map(|(n, w)| format!("{n}, {w}"))
            .unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {redis} | {:.0} | {stalls} |\n",
            r.experts, r.load, r.leases, r.per_s, r.p50, r.p99, r.rest_us
        ));
    }
    if a.fsync_probe {
        s.push_str(&format!(
            "\nfsync probe (`--fsync-probe`): {PROBE_N} appends of 4 KB to a file, each followed by fdatasync, \
             in a temporary directory on the disk the runs used.\n\n\
             | other load | fdatasync p50 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|\n"
        ));
        for busy in [0, 2] {
            let mut t = fsync_probe(busy)?;
            let load = if busy == 0 {
                "none".to_string()
            } else {
                format!("{busy} threads spinning")
            };
            let q = [0.5, 0.99, 0.999, 1.0].map(|q| pct(&mut t, q));
            println!(
                "fsync probe, {load}: p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms max {:.3} ms",
                q[0], q[1], q[2], q[3]
            );
            s.push_str(&format!(
                "| {load} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                q[0], q[1], q[2], q[3]
            ));
        }
    }
    println!("{s}");
    write_section(&a.out, "queue", &s)
}
