//! `mp bench queue`: lease → submit round trip (p50, p99) and leases per second with 1, 8
//! and 32 concurrent simulated experts against a real redis-server and gateway.

use crate::platform::{runtime, sim_clients, synthetic_project, LocalPlatform};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_api::sim::{self, Outcome, SimConfig};
use std::path::PathBuf;
use std::time::Duration;

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
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

pub fn run(a: QueueArgs) -> Result<()> {
    let rows = runtime()?.block_on(async {
        let mut rows = Vec::new();
        let closed = a.experts.iter().map(|&n| (n, None));
        let paced = a.paced_rates.iter().map(|&r| (a.paced_experts, Some(r)));
        for (n, rate) in closed.chain(paced) {
            let dir = tempfile::tempdir()?;
            let p = LocalPlatform::start(dir.path(), 60_000).await?;
            let admin = synthetic_project(&p.store, a.leases + 100).await?;
            let clients = sim_clients(&p.addr, &admin, n, "bench").await?;
            // Warm the connections.
            for c in &clients {
                let _ = c.stats.clone().get_stats(mp_proto::v1::StatsRequest {}).await;
            }
            let pace = rate.map(|r| Duration::from_secs_f64(n as f64 / r)).unwrap_or_default();
            let cfg = SimConfig { experts: n, leases: a.leases, heartbeat: false, pace, ..Default::default() };
            let r = sim::run(clients, cfg).await;
            p.stop().await;
            if r.count(Outcome::Failed) > 0 {
                bail!("{} operations failed: {:?}", r.count(Outcome::Failed), r.errors.first());
            }
            let mut rt: Vec<Duration> = r.events.iter().filter(|e| e.outcome == Outcome::Submitted).map(|e| e.round_trip).collect();
            let per_s = r.events.len() as f64 / r.elapsed.as_secs_f64();
            let load = rate.map(|r| format!("paced, {r:.0}/s offered")).unwrap_or_else(|| "closed loop".into());
            println!("{n:>3} experts ({load}): {} leases in {:.2} s, {per_s:.0} leases/s, round trip p50 {:.2} ms p99 {:.2} ms", r.events.len(), r.elapsed.as_secs_f64(), pct(&mut rt, 0.5), pct(&mut rt, 0.99));
            rows.push((n, load, r.events.len(), per_s, pct(&mut rt, 0.5), pct(&mut rt, 0.99)));
        }
        anyhow::Ok(rows)
    })?;
    let mut s = format!(
        "## Review queue: lease → submit round trip\n\nCommand: `mp bench queue {}`  \nDate: {}; machine: {}. \
         A real redis-server (AOF, `appendfsync always`), the gateway and the simulated experts (one gRPC connection each) \
         all on this machine; each lease is answered with a submit of an 8x8 mask (Lua lease claim, durable mark, proposal, refine job).\n\n\
         *Closed loop*: each expert leases again as soon as its submit returns, so the run measures capacity and, by Little's law, \
         its round trip is experts / throughput. *Paced*: each expert starts a lease on a fixed schedule (the offered load spread over the experts) \
         and the round trip is timed from the scheduled start, so a stall cannot hide behind a late start.\n\n\
         | experts | load | leases | leases/s | round trip p50 ms | p99 ms |\n|---|---|---|---|---|---|\n",
        std::env::args().skip(3).collect::<Vec<_>>().join(" "),
        today(),
        machine_line()
    );
    for (n, load, l, ps, p50, p99) in rows {
        s.push_str(&format!(
            "| {n} | {load} | {l} | {ps:.0} | {p50:.2} | {p99:.2} |\n"
        ));
    }
    println!("{s}");
    write_section(&a.out, "queue", &s)
}
