//! Compute nodes and the one-machine mode: `mp worker`, `mp trainer`, `mp up`.

use crate::init::{project_init, InitArgs};
use anyhow::{Context, Result};
use clap::Args;
use mp_node::trainer::TrainerConfig;
use mp_node::worker::WorkerConfig;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tch::Device;

fn device(s: &str) -> Result<Device> {
    mp_core::device::parse(s).map_err(|e| anyhow::anyhow!("--device: {e}"))
}

/// Runs `f` inside an actix System on a multi-threaded tokio runtime until Ctrl-C.
fn actix_main<F, Fut>(f: F) -> Result<()>
where
    F: FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), mp_node::NodeError>> + 'static,
{
    let sys = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let fut = f(rx);
    sys.block_on(async move {
        actix_rt::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = tx.send(true);
        });
        fut.await
    })?;
    Ok(())
}

#[derive(Args, Clone)]
pub struct NodeArgs {
    #[arg(long, env = "MP_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, env = "MP_PREFIX", default_value = "mp")]
    pub prefix: String,
    /// Shared checkpoint directory (a volume in Kubernetes)
    #[arg(long, env = "MP_CHECKPOINTS", default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// auto (CUDA when present), cpu, cuda or cuda:N
    #[arg(long, env = "MP_DEVICE", default_value = "auto")]
    pub device: String,
    /// gRPC health endpoint (empty = none)
    #[arg(long, env = "MP_HEALTH_LISTEN", default_value = "")]
    pub health_listen: String,
    /// A job delivered this many times without being acknowledged (one that brings down
    /// every node that takes it) goes to the dead letters (`mp admin jobs`)
    #[arg(long, env = "MP_MAX_DELIVERIES", default_value_t = mp_store::DEFAULT_MAX_DELIVERIES)]
    pub max_deliveries: u64,
    /// A proposal's saliency maps are kept at most this many pixels a side (mean-pooled
    /// beyond), so that its report stays small whatever the image size
    #[arg(long, env = "MP_REPORT_MAX_SIDE", default_value_t = 256)]
    pub report_max_side: u32,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Worker threads, one model each
    #[arg(long, env = "MP_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Take over jobs of a worker silent this long
    #[arg(long, default_value_t = 30_000)]
    pub claim_idle_ms: u64,
    /// Consumer name (default: worker-HOST-PID)
    #[arg(long)]
    pub name: Option<String>,
    /// Refinement iteration budget
    #[arg(long, default_value_t = 50)]
    pub refine_max_iterations: usize,
    /// Refinement time budget in milliseconds
    #[arg(long, default_value_t = 5000)]
    pub refine_time_budget_ms: u64,
    /// Run every refinement to its budget (no validation guard, halving or plateau stop)
    #[arg(long)]
    pub refine_no_early_stop: bool,
    /// Review-queue order: attention (least saliency on suggested green, most on suggested
    /// red first; before any suggestion, each class's most confident images first),
    /// alignment (eq. 6.1 against own / suggested marks / prior; the margin before any
    /// mark), margin, or random
    #[arg(long, env = "MP_ORDERING", default_value = "attention")]
    pub ordering: String,
    /// Share of images given a random priority instead (alignment and attention orderings),
    /// so that no image is starved by a signal that is wrong about it
    #[arg(long, default_value_t = 0.05, value_parser = share)]
    pub exploration: f64,
    /// How suggested marks are made: union, prototype, segmenter, auto (best
    /// cross-validated fit), or off (no suggestions)
    #[arg(long, env = "MP_PROPAGATION", default_value = "auto")]
    pub propagation: String,
    /// Largest batch of image views computed at once for experts waiting on the gateway
    /// (0: this worker serves no view requests; default 4 on a CPU, where a bigger batch
    /// only makes its first experts wait for its last, and 32 on a GPU)
    #[arg(long, env = "MP_VIEW_BATCH")]
    pub view_batch: Option<usize>,
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let cfg = WorkerConfig {
        redis_url: a.node.redis_url.clone(),
        prefix: a.node.prefix.clone(),
        checkpoints: a.node.checkpoints.clone(),
        threads: a.worker_threads,
        consumer: a
            .name
            .clone()
            .unwrap_or_else(mp_node::worker::default_consumer),
        claim_idle_ms: a.claim_idle_ms,
        max_deliveries: a.node.max_deliveries,
        device: device(&a.node.device)?,
        health_listen: a.node.health_listen.clone(),
        view_batch: a
            .view_batch
            .unwrap_or(mp_node::worker::default_view_batch(device(&a.node.device)?)),
        refine: mp_core::refine::RefineConfig {
            max_iterations: a.refine_max_iterations,
            time_budget_ms: Some(a.refine_time_budget_ms),
            halve_saliency: !a.refine_no_early_stop,
            plateau_window: (!a.refine_no_early_stop).then_some(3),
            val_guard: (!a.refine_no_early_stop).then_some(1.2),
            report_max_side: a.node.report_max_side,
            ..Default::default()
        },
        ordering: a.ordering.parse()?,
        exploration: a.exploration,
        propagation: a.propagation.parse()?,
        ..Default::default()
    };
    mp_node::exit_on_panic("worker");
    actix_main(move |stop| mp_node::worker::run(cfg, stop))
}

#[derive(Args)]
pub struct TrainerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Epochs of each training phase between intervention rounds
    #[arg(long, default_value_t = 6)]
    pub epochs_per_round: usize,
    /// Committed marks that end a round
    #[arg(long, default_value_t = 10)]
    pub round_marks: usize,
    /// Seconds after which a round with at least one commit ends (0 = none)
    #[arg(long, default_value_t = 0)]
    pub round_seconds: u64,
    /// Saliency loss of persistent guidance (clip, squared, rrr, rrr-jacobian)
    #[arg(long, default_value = "rrr-jacobian")]
    pub loss: String,
    #[arg(long, default_value_t = mp_node::trainer::DEFAULT_LAMBDA)]
    pub lambda: f64,
    /// Probability that an image of a propagated batch trades its confound with another's
    #[arg(long, default_value_t = mp_node::trainer::DEFAULT_SWAP)]
    pub swap: f64,
    /// How committed marks reach unmarked images: off, union, prototype, segmenter, or auto
    /// (the mode with the best cross-validated fit on the marks)
    #[arg(long, default_value = "auto")]
    pub propagation: String,
    /// Rescore every image after this many commits of a round, so that suggestions and
    /// priorities learn from the round's marks (0 = only when a round starts)
    #[arg(long, default_value_t = 3)]
    pub rescore_every: usize,
    /// Days after which settled proposals' weights and old suggester fits are removed from
    /// the checkpoint directory (0: kept for ever; model versions are always kept)
    #[arg(long, env = "MP_RETENTION_DAYS", default_value_t = 7.0)]
    pub retention_days: f64,
    /// Take over commit jobs of a trainer silent this long (one that died mid-commit)
    #[arg(long, default_value_t = 60_000)]
    pub claim_idle_ms: u64,
}

pub fn trainer(a: TrainerArgs) -> Result<()> {
    let mut cfg = TrainerConfig {
        redis_url: a.node.redis_url.clone(),
        prefix: a.node.prefix.clone(),
        checkpoints: a.node.checkpoints.clone(),
        epochs_per_round: a.epochs_per_round,
        round_marks: a.round_marks,
        round_seconds: a.round_seconds,
        device: device(&a.node.device)?,
        health_listen: a.node.health_listen.clone(),
        rescore_every: a.rescore_every,
        max_deliveries: a.node.max_deliveries,
        retention_days: a.retention_days,
        claim_idle_ms: a.claim_idle_ms,
        refine: mp_core::refine::RefineConfig {
            report_max_side: a.node.report_max_side,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.guidance.loss = a.loss.parse()?;
    cfg.guidance.lambda = a.lambda;
    cfg.guidance.propagation = a.propagation.parse()?;
    cfg.guidance.swap = a.swap;
    mp_node::exit_on_panic("trainer");
    actix_main(move |stop| mp_node::trainer::run(cfg, stop))
}

#[derive(Args)]
pub struct UpArgs {
    /// Working directory: redis data, checkpoints, demo data, admin token
    #[arg(long, env = "MP_UP_DIR", default_value = "mp-data")]
    pub dir: PathBuf,
    /// Image folder of the project (default: Decoy-MNIST written into DIR/data)
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    /// Your own TorchScript model as the base model (with --config), instead of training one
    #[arg(long, requires = "data")]
    pub model: Option<PathBuf>,
    /// Project config of --model (default: DATA/project.toml)
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    #[arg(long, default_value_t = 6390)]
    pub redis_port: u16,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 10)]
    pub round_marks: usize,
    #[arg(long, default_value_t = 6)]
    pub epochs_per_round: usize,
    /// Start the services, print the address and token, and stop again (smoke test)
    #[arg(long)]
    pub check: bool,
    /// Also print the admin token (it is always in DIR/admin.token, mode 0600)
    #[arg(long)]
    pub print_token: bool,
    /// The web client's bundle (deploy/build-web.sh; `deploy/mp up` builds it): the gateway
    /// serves it from / so that experts open the client in a browser
    #[arg(long, env = "MP_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
}

/// One supervised child: how to start it again, and its restarts.
pub struct Kid {
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    started: std::time::Instant,
    restarts: u32,
    /// When a crashed child is due to start again.
    due: Option<std::time::Instant>,
}

/// Child processes stopped with SIGINT (then SIGKILL) when dropped.
#[derive(Default)]
pub struct Children(pub Vec<Kid>);

/// A child that ran this long before exiting starts again at once (its back-off resets).
const STEADY: Duration = Duration::from_secs(60);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

impl Children {
    pub fn spawn(&mut self, name: &str, args: &[String], log: &std::path::Path) -> Result<()> {
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = start(name, args, log)?;
        self.0.push(Kid {
            name: name.to_string(),
            args: args.to_vec(),
            log: log.to_path_buf(),
            child: Some(child),
            started: std::time::Instant::now(),
            restarts: 0,
            due: None,
        });
        Ok(())
    }

    /// `mp gateway` on `listen`, with `extra` flags.
    pub fn spawn_gateway(
        &mut self,
        listen: &str,
        redis_url: &str,
        checkpoints: &str,
        extra: &[&str],
        log: &std::path::Path,
    ) -> Result<()> {
        let mut args = strings(&[
            "gateway",
            "--listen",
            listen,
            "--redis-url",
            redis_url,
            "--checkpoints",
            checkpoints,
        ]);
        args.extend(strings(extra));
        self.spawn("gateway", &args, log)
    }

    /// `mp trainer` with the given round size and training phase, and `extra` flags.
    pub fn spawn_trainer(
        &mut self,
        redis_url: &str,
        checkpoints: &str,
        round_marks: usize,
        epochs_per_round: usize,
        extra: &[&str],
        log: &std::path::Path,
    ) -> Result<()> {
        let mut args = strings(&[
            "trainer",
            "--redis-url",
            redis_url,
            "--checkpoints",
            checkpoints,
            "--round-marks",
            &round_marks.to_string(),
            "--epochs-per-round",
            &epochs_per_round.to_string(),
        ]);
        args.extend(strings(extra));
        self.spawn("trainer", &args, log)
    }

    /// `mp worker` named `consumer` (its consumer name in the job groups), with `extra` flags.
    pub fn spawn_worker(
        &mut self,
        redis_url: &str,
        checkpoints: &str,
        consumer: &str,
        extra: &[&str],
        log: &std::path::Path,
    ) -> Result<()> {
        let mut args = strings(&[
            "worker",
            "--redis-url",
            redis_url,
            "--checkpoints",
            checkpoints,
            "--name",
            consumer,
        ]);
        args.extend(strings(extra));
        self.spawn(consumer, &args, log)
    }

    /// Restarts crashed children: one that exited is started again after a back-off (1 s,
    /// doubling to 60 s; at once again after a minute of steady running). Returns what it
    /// did, one line per event, for the operator.
    pub fn supervise(&mut self) -> Vec<String> {
        let now = std::time::Instant::now();
        let mut said = Vec::new();
        for k in &mut self.0 {
            if let Some(c) = k.child.as_mut() {
                let Ok(Some(status)) = c.try_wait() else {
                    continue;
                };
                k.child = None;
                if k.started.elapsed() >= STEADY {
                    k.restarts = 0;
                }
                let wait = Duration::from_secs(1u64 << k.restarts.min(6)).min(STEADY);
                k.restarts += 1;
                k.due = Some(now + wait);
                said.push(format!(
                    "{} exited ({status}); starting it again in {} s (restart {}; log {})",
                    k.name,
                    wait.as_secs(),
                    k.restarts,
                    k.log.display()
                ));
            }
            if k.due.is_some_and(|d| now >= d) {
                k.due = None;
                match start(&k.name, &k.args, &k.log) {
                    Ok(c) => {
                        k.child = Some(c);
                        k.started = now;
                        said.push(format!("{} started again", k.name));
                    }
                    Err(e) => {
                        k.due = Some(now + STEADY.min(Duration::from_secs(10)));
                        said.push(format!("{} did not start: {e:#}", k.name));
                    }
                }
            }
        }
        said
    }
}

/// Starts `mp ARGS` with its output appended to `log`.
fn start(name: &str, args: &[String], log: &std::path::Path) -> Result<Child> {
    let exe = std::env::current_exe()?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // A child outlives no supervisor: killed with SIGKILL, `mp up` takes its children along.
    // SAFETY: prctl is async-signal-safe and touches only the child's own attributes.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {name}"))
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in self.0.iter().filter_map(|k| k.child.as_ref()) {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(c.id().to_string())
                .status();
        }
        let start = std::time::Instant::now();
        for c in self.0.iter_mut().filter_map(|k| k.child.as_mut()) {
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn up(a: UpArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let mut redis = mp_store::server::RedisServer::start(&dir.join("redis"), a.redis_port)
        .with_context(|| format!("starting redis-server on port {}", a.redis_port))?;
    let url = redis.url();
    let data = match &a.data {
        Some(d) => d.clone(),
        None => {
            let d = dir.join("data");
            // Version 2 of the demo data: val carries the shortcut, clean twins in clean/.
            if !d.join(".complete-2").exists() {
                println!("writing Decoy-MNIST to {}", d.display());
                crate::commands::data(crate::commands::DataCmd::DecoyMnist(
                    crate::commands::GenArgs::new(d.clone(), a.mnist.clone()),
                ))?;
                std::fs::write(d.join(".complete-2"), b"")?;
            }
            d
        }
    };
    let checkpoints = dir.join("checkpoints");
    let token_file = dir.join("admin.token");
    let initialised = crate::platform::runtime()?.block_on(async {
        let s = mp_store::Store::connect(&url, "mp").await?;
        anyhow::Ok(s.project().await?.is_some())
    })?;
    if !initialised {
        println!(
            "initialising the project ({})",
            if a.model.is_some() {
                "imports your model"
            } else {
                "trains the base model"
            }
        );
        let token = project_init(InitArgs {
            model: a.model.clone(),
            config: a.config.clone(),
            ..InitArgs::new(data.clone(), url.clone(), checkpoints.clone())
        })?
        .context("the project appeared while it was being initialised")?;
        crate::common::write_secret(&token_file, &token)?;
    } else if !token_file.exists() {
        // The project is there but its token file went: a new admin, not a new project.
        let token = crate::platform::runtime()?.block_on(async {
            let s = mp_store::Store::connect(&url, "mp").await?;
            anyhow::Ok(s.create_expert("admin", mp_store::Role::Admin).await?.1)
        })?;
        crate::common::write_secret(&token_file, &token)?;
        println!(
            "{} was missing: a new admin token is in it",
            token_file.display()
        );
    }
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let ck = checkpoints.display().to_string();
    let mut kids = Children(Vec::new());
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let web_dir = a
        .web_dir
        .as_ref()
        .filter(|d| d.join("index.html").exists())
        .and_then(|d| d.canonicalize().ok())
        .map(|d| d.display().to_string());
    let web_flags: Vec<&str> = match &web_dir {
        Some(d) => vec!["--web-dir", d],
        None => vec![],
    };
    kids.spawn_gateway(&a.listen, &url, &ck, &web_flags, &logs.join("gateway.log"))?;
    kids.spawn_trainer(
        &url,
        &ck,
        a.round_marks,
        a.epochs_per_round,
        &[],
        &logs.join("trainer.log"),
    )?;
    for k in 0..a.workers {
        kids.spawn_worker(
            &url,
            &ck,
            &format!("worker-{k}"),
            &[],
            &logs.join(format!("worker-{k}.log")),
        )?;
    }
    println!("Machine Punishment is up");
    println!("  gateway      http://{}", a.listen);
    println!("  admin token  in {} (mode 0600)", token_file.display());
    if a.print_token {
        println!("               {token}");
    }
    println!("  experts      (token: mp admin create-expert --token <admin token> --name NAME)");
    match &web_dir {
        Some(_) => println!(
            "    in a browser  open http://{}/ and paste the token",
            a.listen
        ),
        None => println!("    in a browser  not built (deploy/build-web.sh, then --web-dir)"),
    }
    println!(
        "    native        mp-client --addr http://{} --token <expert token>",
        a.listen
    );
    println!(
        "  redis        127.0.0.1:{} (user {}, password in {}; data in {})",
        a.redis_port,
        mp_store::server::REDIS_USER,
        dir.join("redis/redis.password").display(),
        dir.join("redis").display()
    );
    println!("  logs         {}", logs.display());
    println!(
        "  try:  mp expert-sim --addr http://{} --token \"$(cat {})\" --marks {} --experts 4 --leases 10 --commit",
        a.listen,
        token_file.display(),
        data.display()
    );
    println!("Ctrl-C stops everything.");
    let (tx, rx) = std::sync::mpsc::channel();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
        }
        let _ = tx.send(());
    });
    let deadline = a
        .check
        .then(|| std::time::Instant::now() + Duration::from_secs(3));
    loop {
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        for line in kids.supervise() {
            println!("{line}");
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            break;
        }
    }
    println!("stopping");
    drop(kids);
    redis.stop();
    Ok(())
}

/// A share in [0, 1].
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}
