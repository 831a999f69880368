//! Platform subcommands: gateway, project init, expert-sim, admin, bench queue.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mp_api::sim::{self, MarkSource, Outcome, SimConfig};
use mp_api::Client;
use mp_gateway::GatewayConfig;
use mp_store::{ImageRecord, ModelVersionRecord, ProjectInfo, Role, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[derive(Args)]
pub struct GatewayArgs {
    /// TOML config file (keys as in GatewayConfig; MP_* variables override it)
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub redis_url: Option<String>,
    #[arg(long)]
    pub checkpoints: Option<PathBuf>,
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    /// The web client's bundle (deploy/build-web.sh), served from / (also MP_WEB_DIR)
    #[arg(long)]
    pub web_dir: Option<PathBuf>,
}

impl GatewayArgs {
    pub fn config(&self) -> Result<GatewayConfig> {
        let mut c = GatewayConfig::load(self.config.as_deref())?;
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.redis_url {
            c.redis_url = v.clone();
        }
        if let Some(v) = &self.checkpoints {
            c.checkpoints = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            c.metrics_listen = v.clone();
        }
        if let Some(v) = self.lease_ttl_ms {
            c.lease_ttl_ms = v;
        }
        if let Some(v) = &self.web_dir {
            c.web_dir = Some(v.clone());
        }
        Ok(c)
    }
}

pub fn gateway(a: GatewayArgs) -> Result<()> {
    let cfg = a.config()?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        mp_gateway::run(listener, cfg, shutdown).await?;
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum ProjectCmd {
    /// Load an image folder into Redis, train (or take) the base model, fill the review queue, create an admin
    Init(Box<crate::init::InitArgs>),
    /// How many different experts mark each image (each in turn, blind; never twice to one)
    Overlap {
        /// 1 to 16
        n: u32,
        #[command(flatten)]
        place: crate::project::ProjectPlace,
    },
    /// With overlap > 1: the agreement (pixel-wise Fleiss' kappa) below which an image's
    /// marks go to a reviewer instead of being merged by majority
    ReviewBelow {
        /// -1 to 1 (default 0.4)
        kappa: f64,
        #[command(flatten)]
        place: crate::project::ProjectPlace,
    },
}

#[derive(Args, Clone)]
pub struct SimArgs {
    /// Gateway address
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Admin token (the simulated experts get their own tokens from it)
    #[arg(long, env = "MP_TOKEN")]
    pub token: String,
    #[arg(long, default_value_t = 4)]
    pub experts: usize,
    /// Total leases to take
    #[arg(long, default_value_t = 100)]
    pub leases: usize,
    /// Image folder whose marks/ the experts answer with (else a synthetic red block)
    #[arg(long)]
    pub marks: Option<PathBuf>,
    /// Share of each mark's pixels kept
    #[arg(long, default_value_t = 1.0)]
    pub partial: f64,
    /// Probability of flipping a marked pixel's colour
    #[arg(long, default_value_t = 0.0)]
    pub noise: f64,
    /// How the experts mark: `careful=6,sloppy=2,adversarial=1` — careful: the ground truth;
    /// sloppy: its outline off by 2 px and 60 % of it; adversarial: its colours swapped.
    /// Expert k gets the k-th profile (cycling)
    #[arg(long, default_value = "careful")]
    pub mix: String,
    #[arg(long, default_value_t = 0.0)]
    pub skip_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub abandon_rate: f64,
    /// Milliseconds each expert looks at an image
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// Wait for the queue to refill instead of stopping when it is empty
    #[arg(long)]
    pub wait: bool,
    /// Wait for each proposal and commit it (reject it if validation accuracy fell > 5 points)
    #[arg(long)]
    pub commit: bool,
    /// Probability of accepting an image's suggested mark (when its red part overlaps the
    /// ground truth by at least --accept-min-iou) instead of painting the ground truth
    #[arg(long, default_value_t = 0.0)]
    pub accept: f64,
    #[arg(long, default_value_t = 0.5)]
    pub accept_min_iou: f64,
    /// Simulated reviewers (overlap > 1): each settles the images whose marks disagree by
    /// accepting the mark closest to the ground truth (with --commit, commits the result)
    #[arg(long, default_value_t = 0)]
    pub reviewers: usize,
}

/// One client per simulated expert, each with a token created through the admin API.
pub async fn sim_clients(
    addr: &str,
    admin_token: &str,
    n: usize,
    tag: &str,
) -> Result<Vec<Client>> {
    sim_clients_with_role(addr, admin_token, n, tag, "expert").await
}

/// One client per simulated user of role `role`.
pub async fn sim_clients_with_role(
    addr: &str,
    admin_token: &str,
    n: usize,
    tag: &str,
    role: &str,
) -> Result<Vec<Client>> {
    let admin = Client::connect(addr, admin_token).await?;
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let r = mp_api::create_expert(&admin, &format!("{tag}-{k}"), role, Duration::from_secs(10))
            .await
            .map_err(|s| anyhow::anyhow!("creating expert: {}", s.message()))?;
        out.push(Client::new(addr, &r.token)?);
    }
    Ok(out)
}

pub fn expert_sim(a: SimArgs) -> Result<()> {
    runtime()?.block_on(async {
        let clients = sim_clients(&a.addr, &a.token, a.experts, "sim").await?;
        let cfg = SimConfig {
            experts: a.experts,
            profiles: sim::parse_mix(&a.mix).map_err(|e| anyhow::anyhow!("--mix: {e}"))?,
            leases: a.leases,
            marks: a.marks.clone().map(MarkSource::Folder).unwrap_or(MarkSource::Synthetic),
            partial: a.partial,
            noise: a.noise,
            skip_rate: a.skip_rate,
            abandon_rate: a.abandon_rate,
            think: Duration::from_millis(a.think_ms),
            stop_when_empty: !a.wait,
            commit: a.commit,
            accept: a.accept,
            accept_min_iou: a.accept_min_iou,
            ..Default::default()
        };
        let reviewers =
            sim_clients_with_role(&a.addr, &a.token, a.reviewers, "sim-reviewer", "reviewer")
                .await?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reviewing: Vec<_> = reviewers
            .into_iter()
            .map(|c| {
                tokio::spawn(sim::review(
                    c,
                    cfg.clone(),
                    done.clone(),
                    Duration::from_secs(3),
                ))
            })
            .collect();
        let r = sim::run(clients, cfg).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in reviewing {
            let rr = t.await?;
            let mut how: std::collections::BTreeMap<String, usize> = Default::default();
            for (_, h, st) in &rr.settled {
                *how.entry(format!("{h} → {st}")).or_default() += 1;
            }
            println!("reviewer: {} settled {how:?}", rr.settled.len());
            for e in rr.errors.iter().take(5) {
                println!("  review error: {e}");
            }
        }
        let settled: Vec<_> = r.events.iter().filter_map(|e| e.settled_decision.as_ref()).collect();
        let in_review = r.events.iter().filter(|e| e.in_review).count();
        if !settled.is_empty() || in_review > 0 {
            println!(
                "settlement: {} images settled by majority ({} committed), {} sent to review",
                settled.len(),
                settled.iter().filter(|d| d.as_str() == "committed").count(),
                in_review
            );
        }
        if a.accept > 0.0 {
            let done: Vec<_> = r.events.iter().filter(|e| e.outcome == Outcome::Submitted).collect();
            println!(
                "suggestions: {} of {} submitted images had one, {} accepted; pixels painted {}, accepted {}",
                done.iter().filter(|e| e.suggested).count(),
                done.len(),
                done.iter().filter(|e| e.accepted > 0).count(),
                done.iter().map(|e| e.painted).sum::<usize>(),
                done.iter().map(|e| e.accepted).sum::<usize>()
            );
        }
        if a.commit {
            let mut decisions: std::collections::BTreeMap<String, usize> = Default::default();
            for e in &r.events {
                if let Some(d) = &e.decision {
                    *decisions.entry(d.clone()).or_default() += 1;
                }
            }
            println!("proposals: {decisions:?}");
        }
        println!(
            "{} experts, {} leases in {:.1} s: {} submitted, {} skipped, {} abandoned, {} failed, {} retries",
            a.experts,
            r.events.len(),
            r.elapsed.as_secs_f64(),
            r.count(Outcome::Submitted),
            r.count(Outcome::Skipped),
            r.count(Outcome::Abandoned),
            r.count(Outcome::Failed),
            r.retries
        );
        for e in r.errors.iter().take(5) {
            println!("  error: {e}");
        }
        if r.count(Outcome::Failed) > 0 {
            bail!("{} operations failed", r.count(Outcome::Failed));
        }
        Ok(())
    })
}

/// The gateway and the admin's token, for every admin subcommand.
#[derive(Args, Clone)]
pub struct AdminConn {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[arg(long, env = "MP_TOKEN")]
    pub token: String,
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Create an expert (or admin) and print its token
    CreateExpert {
        #[command(flatten)]
        conn: AdminConn,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "expert")]
        role: String,
        /// Days the token is valid for (default: until revoked)
        #[arg(long)]
        ttl_days: Option<f64>,
    },
    /// Refuse an expert's token from now on, on every gateway (its marks stay)
    RevokeToken {
        #[command(flatten)]
        conn: AdminConn,
        /// The expert's id (see list-experts)
        #[arg(long)]
        expert: String,
    },
    /// Every expert: id, name, role, marks, created, expiry, revocation
    ListExperts {
        #[command(flatten)]
        conn: AdminConn,
    },
    /// The jobs given up on (delivered too often without being acknowledged), newest first
    Jobs {
        #[command(flatten)]
        conn: AdminConn,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// The audit trail — marks, decisions, commits, versions, rollbacks, round ends, token
    /// changes — with who, when, versions and accuracies before and after, and each expert's
    /// impact (commits and the validation accuracy they moved)
    Audit {
        #[command(flatten)]
        conn: AdminConn,
        /// Only records by or about this expert (id)
        #[arg(long)]
        expert: Option<String>,
        #[arg(long)]
        image: Option<String>,
        /// Only records with this version before or after
        #[arg(long)]
        version: Option<u64>,
        /// The newest this many
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// One JSON record per line (for export), no tables
        #[arg(long)]
        jsonl: bool,
    },
}

#[derive(Subcommand)]
pub enum ReportCmd {
    /// How far experts agree on the images several of them marked (project overlap > 1):
    /// red and green IoU and Fleiss' kappa, overall, per expert pair, per expert, per class,
    /// per day, and the images they agree on least
    Agreement {
        #[command(flatten)]
        conn: AdminConn,
        /// Images listed (lowest agreement first)
        #[arg(long, default_value_t = 10)]
        images: usize,
    },
}

pub fn report(cmd: ReportCmd) -> Result<()> {
    runtime()?.block_on(async {
        match cmd {
            ReportCmd::Agreement { conn, images } => {
                let c = Client::connect(&conn.addr, &conn.token).await?;
                let r = c
                    .stats
                    .clone()
                    .get_agreement(mp_proto::v1::AgreementRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                print!("{}", agreement_tables(&r, images));
            }
        }
        Ok(())
    })
}

/// The agreement report as plain-text tables.
pub fn agreement_tables(r: &mp_proto::v1::AgreementReport, images: usize) -> String {
    use std::fmt::Write;
    let fig = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let row = |f: &Option<mp_proto::v1::AgreementFigures>| {
        let f = (*f).unwrap_or_default();
        format!(
            "{:>8} {:>9} {:>7} {:>6}",
            fig(f.red_iou),
            fig(f.green_iou),
            fig(f.kappa),
            f.n
        )
    };
    let head = format!(
        "{:>8} {:>9} {:>7} {:>6}",
        "red IoU", "green IoU", "kappa", "n"
    );
    let mut out = String::new();
    let n = r.overall.as_ref().map_or(0, |f| f.n);
    let _ = writeln!(
        out,
        "overlap {}: {n} image(s) marked by two experts or more",
        r.overlap
    );
    if n == 0 {
        if r.overlap <= 1 {
            let _ = writeln!(
                out,
                "(each image goes to one expert: `mp project overlap N` sends it to N)"
            );
        }
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<24} {head}\n{:<24} {}",
        "overall",
        "",
        row(&r.overall)
    );
    let _ = writeln!(out, "\nper expert pair\n{:<24} {head}", "");
    for p in &r.pairs {
        let _ = writeln!(
            out,
            "{:<24} {}",
            format!("{} / {}", p.expert_a, p.expert_b),
            row(&p.figures)
        );
    }
    for (title, list) in [
        ("per expert (against the others)", &r.experts),
        ("per class", &r.classes),
        ("per day (UTC)", &r.days),
    ] {
        let _ = writeln!(out, "\n{title}\n{:<24} {head}", "");
        for k in list {
            let _ = writeln!(out, "{:<24} {}", k.key, row(&k.figures));
        }
    }
    let _ = writeln!(out, "\nleast agreement\n{:<24} {head}  experts", "image");
    for i in r.images.iter().take(images) {
        let _ = writeln!(
            out,
            "{:<24} {}  {}",
            i.image_id,
            row(&i.figures),
            i.experts.join(", ")
        );
    }
    out
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A Unix time in ms as UTC `YYYY-MM-DD HH:MM`, or `-` for 0.
fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = (ms / 1000) as i64;
    let rem = secs.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}",
        crate::report::date_of(secs),
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn admin(cmd: AdminCmd) -> Result<()> {
    runtime()?.block_on(async {
        match cmd {
            AdminCmd::CreateExpert {
                conn,
                name,
                role,
                ttl_days,
            } => {
                let ttl_s = match ttl_days {
                    None => 0,
                    Some(d) if d.is_finite() && d > 0.0 => (d * 86_400.0).ceil() as u64,
                    Some(d) => bail!("--ttl-days {d}: give a positive number of days"),
                };
                let c = Client::connect(&conn.addr, &conn.token).await?;
                let r = c
                    .admin
                    .clone()
                    .create_expert(mp_proto::v1::CreateExpertRequest { name, role, ttl_s })
                    .await
                    .map_err(refused)?
                    .into_inner();
                println!("expert {} token {}", r.expert_id, r.token);
            }
            AdminCmd::RevokeToken { conn, expert } => {
                let c = Client::connect(&conn.addr, &conn.token).await?;
                c.admin
                    .clone()
                    .revoke_expert(mp_proto::v1::RevokeExpertRequest {
                        expert_id: expert.clone(),
                    })
                    .await
                    .map_err(refused)?;
                println!("expert {expert}: token revoked on every gateway");
            }
            AdminCmd::ListExperts { conn } => {
                let c = Client::connect(&conn.addr, &conn.token).await?;
                let r = c
                    .admin
                    .clone()
                    .list_experts(mp_proto::v1::ListExpertsRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                println!(
                    "{:<12}  {:<20}  {:<6}  {:>6}  {:<16}  {:<16}  revoked (UTC)",
                    "id", "name", "role", "marks", "created (UTC)", "expires (UTC)"
                );
                for e in r.experts {
                    println!(
                        "{:<12}  {:<20}  {:<6}  {:>6}  {:<16}  {:<16}  {}",
                        e.expert_id,
                        e.name,
                        e.role,
                        e.marks,
                        when(e.created_ms),
                        when(e.expires_ms),
                        when(e.revoked_ms)
                    );
                }
            }
            AdminCmd::Audit {
                conn,
                expert,
                image,
                version,
                limit,
                jsonl,
            } => {
                let c = Client::connect(&conn.addr, &conn.token).await?;
                let r = c
                    .admin
                    .clone()
                    .audit(mp_proto::v1::AuditRequest {
                        expert: expert.unwrap_or_default(),
                        image_id: image.unwrap_or_default(),
                        version: version.unwrap_or(0),
                        limit,
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                for rec in &r.records {
                    let fields: std::collections::BTreeMap<&String, &String> =
                        rec.fields.iter().collect();
                    if jsonl {
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": rec.id, "kind": rec.kind, "who": rec.who,
                                "who_name": rec.who_name, "time_ms": rec.time_ms, "fields": fields,
                            })
                        );
                    } else {
                        let f: Vec<String> =
                            fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        let who = if rec.who_name.is_empty() {
                            rec.who.clone()
                        } else {
                            format!("{} ({})", rec.who_name, rec.who)
                        };
                        println!(
                            "{}  {:<20} {:<24} {}",
                            when(rec.time_ms),
                            rec.kind,
                            who,
                            f.join(" ")
                        );
                    }
                }
                if !jsonl {
                    println!("\nimpact of each expert's commits on validation accuracy");
                    println!("{:<24} {:>8} {:>16}", "expert", "commits", "accuracy moved");
                    for i in &r.impact {
                        let who = if i.name.is_empty() {
                            i.expert_id.clone()
                        } else {
                            i.name.clone()
                        };
                        println!(
                            "{who:<24} {:>8} {:>+15.2}%",
                            i.commits,
                            100.0 * i.accuracy_delta
                        );
                    }
                }
            }
            AdminCmd::Jobs { conn, limit } => {
                let c = Client::connect(&conn.addr, &conn.token).await?;
                let r = c
                    .admin
                    .clone()
                    .dead_jobs(mp_proto::v1::DeadJobsRequest { limit })
                    .await
                    .map_err(refused)?
                    .into_inner();
                println!("{} jobs given up on", r.jobs.len());
                for j in r.jobs {
                    let mut fields: Vec<String> =
                        j.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    fields.sort();
                    println!(
                        "{}  {}  {}  delivered {} times: {}\n    {}",
                        when(j.dead_ms),
                        j.stream,
                        j.job_id,
                        j.deliveries,
                        j.error,
                        fields.join(" ")
                    );
                }
            }
        }
        Ok(())
    })
}

/// A synthetic project for queue tests and benchmarks: `n` images of 8x8, no model file.
pub async fn synthetic_project(store: &Store, n: usize, images: &Path) -> Result<String> {
    store
        .set_project(&ProjectInfo {
            name: "synthetic".into(),
            classes: vec!["a".into(), "b".into()],
            width: 8,
            height: 8,
            channels: 1,
            image_store: images.display().to_string(),
        })
        .await?;
    let records: Vec<ImageRecord> = (0..n)
        .map(|i| ImageRecord {
            id: format!("a/{i:06}"),
            name: format!("{i:06}"),
            label: (i % 2) as u32,
            width: 8,
            height: 8,
            channels: 1,
            pixels: vec![(i % 251) as u8; 64],
        })
        .collect();
    store.put_images(&records).await?;
    store
        .publish_version(&ModelVersionRecord {
            version: 1,
            parent: 0,
            created_ms: mp_store::now_ms(),
            reason: "synthetic".into(),
            val_accuracy: 0.0,
            val_loss: 0.0,
            test_accuracy: 0.0,
            file: "missing.safetensors".into(),
        })
        .await?;
    store.ensure_job_groups().await?;
    let items: Vec<(String, f64)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), (i % 997) as f64 / 997.0))
        .collect();
    store.enqueue(&items).await?;
    let (_, token) = store.create_expert("admin", Role::Admin).await?;
    Ok(token)
}

/// A redis-server and an in-process gateway on free ports, for benchmarks.
pub struct LocalPlatform {
    /// The directory it keeps its data in (Redis's files, checkpoints, images).
    pub dir: PathBuf,
    pub redis: mp_store::server::RedisServer,
    pub addr: String,
    pub store: Store,
    gateway: mp_gateway::Spawned,
}

impl LocalPlatform {
    pub async fn start(dir: &Path, lease_ttl_ms: u64) -> Result<LocalPlatform> {
        let redis = mp_store::server::RedisServer::start_free(dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cfg = GatewayConfig {
            redis_url: redis.url(),
            metrics_listen: String::new(),
            checkpoints: dir.join("checkpoints"),
            lease_ttl_ms,
            ..Default::default()
        };
        let gateway = mp_gateway::Spawned::start(listener, cfg)?;
        let store = Store::connect(&redis.url(), "mp").await?;
        Ok(LocalPlatform {
            dir: dir.to_path_buf(),
            redis,
            addr: format!("http://{}", gateway.local_addr),
            store,
            gateway,
        })
    }

    pub async fn stop(self) {
        self.gateway.stop().await
    }
}
