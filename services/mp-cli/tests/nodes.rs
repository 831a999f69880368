//! Workers and trainer as real processes: a worker killed mid-refinement does not lose the
//! proposal; two commits racing on one base version — one applies, the other is rebased,
//! no update lost.

mod common;
use common::{spawn, spawn_env, wait_status};
use mp_api::Client;
use mp_proto::rle;
use mp_proto::v1 as pb;
use mp_store::server::RedisServer;
use mp_store::Store;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SIDE: u32 = mp_e2e::PROJECT_SIDE;

async fn gateway(redis_url: &str, ck: &Path) -> mp_e2e::TestGateway {
    mp_e2e::TestGateway::start(mp_e2e::gateway_config(redis_url, ck)).await
}

/// A worker process named `name` on the project whose checkpoints are in `ck`.
fn spawn_worker(
    redis_url: &str,
    ck: &Path,
    name: &str,
    extra: &[&str],
    log: &Path,
) -> common::Proc {
    let ckp = ck.to_str().unwrap();
    let mut args = vec![
        "worker",
        "--redis-url",
        redis_url,
        "--checkpoints",
        ckp,
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    spawn(&args, log)
}

/// Asks the workers for a scoring pass of version 1 over `ids`.
async fn score_pass(store: &Store, ids: &[String]) {
    store
        .add_job(
            mp_store::SCORE_STREAM,
            &[
                ("kind", "score".into()),
                ("version", "1".into()),
                ("images", ids.join(" ")),
            ],
        )
        .await
        .unwrap();
}

/// Leases one image and submits a red mark on its top rows; returns the proposal id.
async fn mark_one(c: &Client, key: &str) -> String {
    let l = c
        .queue
        .clone()
        .lease(pb::LeaseRequest {})
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let mut v = vec![0i8; (SIDE * SIDE) as usize];
    v[..16].iter_mut().for_each(|x| *x = 1);
    let r = c
        .queue
        .clone()
        .submit(pb::SubmitRequest {
            lease_id: l.lease_id,
            mask: Some(rle::encode(SIDE, SIDE, &v)),
            idempotency_key: key.into(),
        })
        .await
        .unwrap()
        .into_inner();
    r.proposal_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_refinement_does_not_lose_the_proposal() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 50, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let addr = gw.addr.clone();
    let ckp = ck.to_str().unwrap().to_string();
    let slow = [
        "--refine-no-early-stop",
        "--refine-max-iterations",
        "100000",
        "--refine-time-budget-ms",
        "4000",
        "--claim-idle-ms",
        "1500",
    ];
    let worker_args = |name: &str| {
        let mut v = vec![
            "worker",
            "--redis-url",
            redis.url().leak(),
            "--checkpoints",
            ckp.clone().leak(),
            "--name",
            name.to_string().leak(),
        ];
        v.extend(slow);
        v
    };
    let mut a = spawn(&worker_args("doomed"), &dir.path().join("a.log"));
    let c = mp_e2e::expert(&addr, &admin, "ann").await;
    let pid = mark_one(&c, "k1").await;
    // "running" is written before the refinement starts, and the refinement runs its whole
    // 4 s budget: a kill now lands mid-refinement (checked below: still "running").
    wait_status(&store, &pid, &["running"], Duration::from_secs(30)).await;
    a.0.kill().unwrap(); // SIGKILL mid-refinement
    a.0.wait().unwrap();
    assert_eq!(store.proposal(&pid).await.unwrap().status, "running");
    let _b = spawn(&worker_args("rescuer"), &dir.path().join("b.log"));
    let p = wait_status(&store, &pid, &["ready"], Duration::from_secs(40)).await;
    let report: mp_core::refine::ProposalReport =
        serde_json::from_str(p.result.as_deref().unwrap()).unwrap();
    assert!(
        report.proposal.iterations > 1
            && report.proposal.saliency_after[0].len() == (SIDE * SIDE) as usize
    );
    assert!(ck
        .join(mp_node::data::proposal_file(&pid).unwrap())
        .exists());
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(log.contains("took over jobs"), "{log}");
    // The expert sees it through the API.
    let seen = c
        .proposals
        .clone()
        .get_proposal(pb::GetProposalRequest { proposal_id: pid })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.status, pb::ProposalStatus::Ready as i32);
    assert_eq!(seen.saliency_after.len(), (SIDE * SIDE) as usize);
}

/// A worker whose refinements run 5 iterations, without early stop.
fn quick_worker(url: &str, checkpoints: &str, log: &Path) -> common::Proc {
    spawn(
        &[
            "worker",
            "--redis-url",
            url,
            "--checkpoints",
            checkpoints,
            "--refine-no-early-stop",
            "--refine-max-iterations",
            "5",
        ],
        log,
    )
}

/// `kill -9` of the trainer right after it published a commit, before it acknowledged the
/// job: the version and the mark's guidance entry are there, once; a new trainer takes the
/// job over, finds the proposal committed and publishes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_commit_applies_the_mark_once() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 50, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let (url, ckp) = (redis.url(), ck.to_str().unwrap().to_string());
    let _w = quick_worker(&url, &ckp, &dir.path().join("w.log"));
    let trainer = [
        "trainer",
        "--redis-url",
        &url,
        "--checkpoints",
        &ckp,
        "--claim-idle-ms",
        "1000",
    ];
    let mut t = spawn_env(
        &trainer,
        &dir.path().join("t1.log"),
        &[("MP_FAILPOINTS", "commit-published=kill")],
    );
    let ann = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let pid = mark_one(&ann, "a").await;
    wait_status(&store, &pid, &["ready"], Duration::from_secs(60)).await;
    mp_e2e::commit(&ann, &pid).await;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = t.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the trainer was not killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let check = |store: Store, pid: String| async move {
        let p = store.proposal(&pid).await.unwrap();
        assert_eq!((p.status.as_str(), p.committed_version), ("committed", 2));
        assert_eq!(store.current_version().await.unwrap(), 2);
        assert_eq!(store.versions().await.unwrap().len(), 2);
        assert_eq!(store.guidance_marks().await.unwrap().len(), 1);
        let commits = store
            .audit(&mp_store::AuditFilter::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == "commit")
            .count();
        assert_eq!(commits, 1);
    };
    check(store.clone(), pid.clone()).await;
    // The commit job is still pending on the dead trainer; a new one takes it over.
    let pending = |store: Store| async move {
        let mut c = store.connection();
        let v: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(format!("{}:jobs:commit", store.prefix()))
            .arg("commit")
            .query_async(&mut c)
            .await
            .unwrap();
        match v.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(pending(store.clone()).await, 1);
    let _t2 = spawn(&trainer, &dir.path().join("t2.log"));
    let start = Instant::now();
    while pending(store.clone()).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check(store.clone(), pid.clone()).await;
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The checkpoint disk full when a commit comes: nothing is published and nothing half
/// written is left; the commit waits (the job stays pending, its error noted) and goes
/// through once space is freed. Needs a tmpfs of its own, so root; elsewhere it says so
/// and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_checkpoint_disk_defers_the_commit_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&ck)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("not run: mounting a tmpfs needs root");
        return;
    }
    let _mounted = Mounted(ck.clone());
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let admin = mp_e2e::platform_project(&store, 50, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let (url, ckp) = (redis.url(), ck.to_str().unwrap().to_string());
    let _w = quick_worker(&url, &ckp, &dir.path().join("w.log"));
    let tlog = dir.path().join("t.log");
    let mut t = spawn(
        &[
            "trainer",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
            "--claim-idle-ms",
            "500",
        ],
        &tlog,
    );
    let ann = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let pid = mark_one(&ann, "a").await;
    wait_status(&store, &pid, &["ready"], Duration::from_secs(60)).await;
    // Fill the disk.
    let filler = ck.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let files = |ck: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    let before = files(&ck);
    mp_e2e::commit(&ann, &pid).await;
    let start = Instant::now();
    while !std::fs::read_to_string(&tlog)
        .unwrap()
        .contains("checkpoint disk full")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            std::fs::read_to_string(&tlog).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // a retry or two, still full
    assert_eq!(store.proposal(&pid).await.unwrap().status, "committing");
    assert_eq!(store.current_version().await.unwrap(), 1);
    assert_eq!(store.versions().await.unwrap().len(), 1);
    assert!(store.guidance_marks().await.unwrap().is_empty());
    assert_eq!(files(&ck), before, "nothing half written is left");
    assert!(
        t.0.try_wait().unwrap().is_none(),
        "the trainer keeps running"
    );
    // Space freed: the commit goes through.
    std::fs::remove_file(&filler).unwrap();
    let p = wait_status(&store, &pid, &["committed"], Duration::from_secs(60)).await;
    assert_eq!(p.committed_version, 2);
    let v2 = store.version(2).await.unwrap();
    mp_core::model::Model::load(&ck.join(&v2.file), tch::Device::Cpu).unwrap();
    assert_eq!(store.guidance_marks().await.unwrap().len(), 1);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commits_racing_on_one_base_version_one_applies_the_other_is_rebased() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 50, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let addr = gw.addr.clone();
    let (url, ckp) = (redis.url(), ck.to_str().unwrap().to_string());
    let _w = spawn(
        &[
            "worker",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
            "--refine-no-early-stop",
            "--refine-max-iterations",
            "10",
        ],
        &dir.path().join("w.log"),
    );
    let _t = spawn(
        &[
            "trainer",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
            "--round-marks",
            "100",
        ],
        &dir.path().join("t.log"),
    );
    let ann = mp_e2e::expert(&addr, &admin, "ann").await;
    let bob = mp_e2e::expert(&addr, &admin, "bob").await;
    let pa = mark_one(&ann, "a").await;
    let pb_ = mark_one(&bob, "b").await;
    for p in [&pa, &pb_] {
        let r = wait_status(&store, p, &["ready"], Duration::from_secs(60)).await;
        assert_eq!(r.base_version, 1);
    }
    let commit = |id: &str| pb::DecideRequest {
        proposal_id: id.into(),
        decision: pb::decide_request::Decision::Commit as i32,
    };
    let (mut pa_c, mut pb_c) = (ann.proposals.clone(), bob.proposals.clone());
    let (ra, rb) = tokio::join!(pa_c.decide(commit(&pa)), pb_c.decide(commit(&pb_)));
    assert_eq!(
        ra.unwrap().into_inner().status,
        pb::ProposalStatus::Committing as i32
    );
    assert_eq!(
        rb.unwrap().into_inner().status,
        pb::ProposalStatus::Committing as i32
    );
    let a = wait_status(
        &store,
        &pa,
        &["committed", "ready"],
        Duration::from_secs(60),
    )
    .await;
    let b = wait_status(
        &store,
        &pb_,
        &["committed", "ready"],
        Duration::from_secs(60),
    )
    .await;
    // Exactly one applied on its own base; the other was rebased onto the version it made.
    let (first, second) = if a.committed_version == 2 {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(
        (
            first.status.as_str(),
            first.committed_version,
            first.base_version
        ),
        ("committed", 2, 1)
    );
    assert_eq!(
        second.base_version, 2,
        "the later commit must be rebased onto v2: {second:?}"
    );
    assert!(second.message.contains("rebased"), "{}", second.message);
    if second.status == "committed" {
        assert_eq!(second.committed_version, 3);
        let v3 = store.version(3).await.unwrap();
        assert_eq!(v3.parent, 2, "v3 must build on v2: no update lost");
    }
    // The committed marks guide training from now on; one handed back does not (yet).
    let guidance: Vec<String> = store
        .guidance_marks()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.proposal_id)
        .collect();
    assert!(guidance.contains(&first.id), "{guidance:?}");
    assert_eq!(
        guidance.contains(&second.id),
        second.status == "committed",
        "{guidance:?} {second:?}"
    );
    // Commit jobs delivered again (a trainer that died before acknowledging them) change
    // nothing: no version, no second guidance entry.
    let newest = store.newest_version().await.unwrap();
    for p in [&pa, &pb_] {
        store
            .add_job(
                mp_store::COMMIT_STREAM,
                &[("proposal", p.to_string()), ("expert", "again".to_string())],
            )
            .await
            .unwrap();
    }
    let start = Instant::now();
    while store
        .backlog(mp_store::COMMIT_STREAM, "commit")
        .await
        .unwrap()
        > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "commit jobs stuck"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.newest_version().await.unwrap(), newest);
    assert_eq!(store.guidance_marks().await.unwrap().len(), guidance.len());
    // Rollback through the API: the trainer follows.
    let admin_c = Client::new(&addr, &admin).unwrap();
    admin_c
        .admin
        .clone()
        .rollback(pb::RollbackRequest { version: 1 })
        .await
        .unwrap();
    assert_eq!(store.current_version().await.unwrap(), 1);
    let e = admin_c
        .admin
        .clone()
        .rollback(pb::RollbackRequest { version: 99 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.path().join("t.log")).unwrap();
        if log.contains("loading it") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "trainer did not follow the rollback: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn up_starts_everything_prints_address_and_token_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // A small image folder with marks: the shortcut fixture written in the project's format.
    let data = dir.path().join("data");
    let ds = mp_e2e::shortcut_dataset(120, true, 3);
    mp_core::data::folder::write_split(&data, "train", &ds, true).unwrap();
    let held = mp_e2e::shortcut_dataset(40, false, 4);
    mp_core::data::folder::write_split(&data, "val", &held, false).unwrap();
    mp_core::data::folder::write_split(&data, "test", &held, false).unwrap();
    let grpc = mp_store::server::free_port().unwrap();
    let redis = mp_store::server::free_port().unwrap();
    let up = || {
        Command::new(env!("CARGO_BIN_EXE_mp"))
            .args([
                "up",
                "--check",
                "--workers",
                "1",
                "--listen",
                &format!("127.0.0.1:{grpc}"),
                "--redis-port",
                &redis.to_string(),
            ])
            .arg("--dir")
            .arg(dir.path().join("up"))
            .arg("--data")
            .arg(&data)
            .env("MP_THREADS", "1")
            .output()
            .unwrap()
    };
    let out = up();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("initialising the project"), "{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Machine Punishment is up")
            && stdout.contains(&format!("127.0.0.1:{grpc}")),
        "{stdout}"
    );
    // The admin token is in a file only its owner reads, never in the output.
    let token_file = dir.path().join("up/admin.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("mp_") && token.len() > 40, "{token}");
    assert!(!stdout.contains(&token), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert!(dir.path().join("up/checkpoints/v1.safetensors").exists());
    assert!(
        dir.path().join("up/redis/appendonlydir").exists(),
        "redis must run with AOF"
    );
    // Everything stopped: nothing listens any more.
    for port in [grpc, redis] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open"
        );
    }
    // A second start finds the project and its token: nothing is initialised again.
    let again = up();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout}");
    assert!(
        stdout.contains("Machine Punishment is up") && !stdout.contains("initialising"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
}

/// Learned propagation through the real processes: after a few committed marks on data whose
/// shortcut moves, the trainer's training phase reports the propagation mode it chose, the
/// workers write suggested marks, the image view carries them, and a simulated expert who
/// accepts them submits exactly the suggestion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggested_marks_reach_the_image_view_and_can_be_accepted() {
    use mp_api::sim::{self, MarkSource, Outcome, SimConfig};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ds = mp_e2e::shortcut_dataset(160, true, 5);
    mp_core::data::folder::write_split(&data, "train", &ds, true).unwrap();
    let held = mp_e2e::shortcut_dataset(60, false, 6);
    mp_core::data::folder::write_split(&data, "val", &held, false).unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let ck = dir.path().join("ck");
    let (url, ckp) = (redis.url(), ck.to_str().unwrap().to_string());
    let init = Command::new(env!("CARGO_BIN_EXE_mp"))
        .args([
            "project",
            "init",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
        ])
        // The queue order this test was written against (the margin, then alignment): what
        // it checks is propagation, not which images an ordering brings first.
        .args(["--epochs", "2", "--ordering", "alignment", "--data"])
        .arg(&data)
        .arg("--token-file")
        .arg(dir.path().join("admin.token"))
        .env("MP_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&init.stdout).to_string();
    assert!(
        init.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let store = Store::connect(&url, "mp").await.unwrap();
    let gw = gateway(&url, &ck).await;
    let _w = spawn(
        &[
            "worker",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
            "--ordering",
            "alignment",
        ],
        &dir.path().join("w.log"),
    );
    let _t = spawn(
        &[
            "trainer",
            "--redis-url",
            &url,
            "--checkpoints",
            &ckp,
            "--round-marks",
            "6",
            "--epochs-per-round",
            "1",
            "--rescore-every",
            "3",
        ],
        &dir.path().join("t.log"),
    );
    let experts = |n: usize, tag: &'static str| {
        let (addr, admin) = (gw.addr.clone(), admin.clone());
        async move {
            let mut v = Vec::new();
            for k in 0..n {
                v.push(mp_e2e::expert(&addr, &admin, &format!("{tag}{k}")).await);
            }
            v
        }
    };
    // Round 1: six ground-truth marks, committed.
    let r = sim::run(
        experts(2, "a").await,
        SimConfig {
            experts: 2,
            leases: 6,
            marks: MarkSource::Folder(data.clone()),
            commit: true,
            reject_below: 1.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.count(Outcome::Submitted), 6, "{:?}", r.errors);
    // The training phase names the propagation mode it chose and how each mode fitted.
    let start = Instant::now();
    let trained = loop {
        let v = store.versions().await.unwrap();
        if let Some(t) = v.iter().find(|x| x.reason.starts_with("guided training")) {
            break t.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no training phase"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        trained.val_loss.is_finite() && trained.val_accuracy > 0.0,
        "{trained:?}"
    );
    assert!(
        trained.reason.contains("propagation")
            && trained.reason.contains("cross-validated red IoU")
            && trained.reason.contains("segmenter"),
        "{}",
        trained.reason
    );
    // The next round's scoring writes a suggestion for the unmarked images.
    let marked: Vec<String> = store
        .guidance_marks()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.image_id)
        .collect();
    let unmarked: Vec<String> = store
        .image_ids()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| !marked.contains(i))
        .collect();
    let start = Instant::now();
    let (image, s) = loop {
        if store.serving_version().await.unwrap() == trained.version {
            // Mid-round scoring left suggestions from fewer marks: wait for the round's six.
            if let Some(s) = store
                .suggestion(trained.version, &unmarked[0])
                .await
                .unwrap()
                .filter(|s| s.marks == 6)
            {
                break (unmarked[0].clone(), s);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no suggestion written"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s.marks, 6);
    assert!(["union", "prototype", "segmenter"].contains(&s.mode.as_str()));
    // Through the API, as the client sees it (an admin: no lease needed).
    let c = mp_api::Client::new(&gw.addr, &admin).unwrap();
    let view = c
        .images
        .clone()
        .get_image(pb::GetImageRequest {
            image_id: image,
            model_version: trained.version,
        })
        .await
        .unwrap()
        .into_inner();
    let sug = view.suggestion.expect("the view carries the suggestion");
    let mask = rle::decode(sug.mask.as_ref().unwrap()).unwrap();
    let side = mp_e2e::SIDE * mp_e2e::SIDE;
    assert_eq!((mask.len(), sug.confidence.len()), (side, side));
    for (m, c) in mask.iter().zip(&sug.confidence) {
        assert_eq!(*m == 0, *c == 0, "confidence only where suggested");
    }
    // Wait for the new version's scoring to be through.
    let start = Instant::now();
    for id in &unmarked {
        while store
            .suggestion(trained.version, id)
            .await
            .unwrap()
            .is_none_or(|s| s.marks != 6)
        {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{id} never scored"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The suggestions find the moving patch in most images the experts never marked.
    let truth: std::collections::HashMap<String, Vec<i8>> = (0..ds.len())
        .map(|i| {
            (
                format!("{}/{}", ds.classes[ds.labels[i] as usize], ds.names[i]),
                ds.marks[i].clone().unwrap().values,
            )
        })
        .collect();
    let mut found = 0;
    for id in &unmarked {
        let s = store
            .suggestion(trained.version, id)
            .await
            .unwrap()
            .unwrap();
        if mp_api::sim::red_iou(&s.values, &truth[id]) >= 0.3 {
            found += 1;
        }
    }
    assert!(
        found * 10 >= unmarked.len() * 6,
        "the patch found in {found} of {} images ({}; {})",
        unmarked.len(),
        s.mode,
        trained.reason
    );
    // One fit in the trainer served the worker: it loaded the trainer's suggesters and
    // fitted none itself.
    let wlog = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
    let tlog = std::fs::read_to_string(dir.path().join("t.log")).unwrap();
    assert!(tlog.contains("suggester fitted for the workers"), "{tlog}");
    assert!(
        wlog.contains("suggester loaded") && !wlog.contains("suggester fitted"),
        "{wlog}"
    );
    // An expert who accepts every suggestion submits it unchanged and paints nothing; where
    // the suggester found nothing, they paint.
    let r = sim::run(
        experts(1, "b").await,
        SimConfig {
            experts: 1,
            leases: 8,
            marks: MarkSource::Folder(data.clone()),
            accept: 1.0,
            accept_min_iou: 0.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.count(Outcome::Submitted), 8, "{:?}", r.errors);
    let mut accepted = 0;
    for e in &r.events {
        let mark = store.mark(e.mark_id.as_ref().unwrap()).await.unwrap();
        if !e.suggested {
            assert!(e.painted > 0 && e.accepted == 0, "{e:?}");
            continue;
        }
        accepted += 1;
        assert!(e.accepted > 0 && e.painted == 0, "{e:?}");
        let stored = store
            .suggestion(trained.version, &e.image_id)
            .await
            .unwrap()
            .unwrap();
        let signs: Vec<i8> = stored.values.iter().map(|v| v.signum()).collect();
        assert_eq!(mark.values, signs, "the submitted mark is the suggestion");
    }
    assert!(
        accepted > 0,
        "no leased image had a suggestion: {:?}",
        r.events
    );
    // Blind overlap: once a project has several experts per image, an image someone has
    // marked comes without its suggestion (the suggester learnt from those marks); an
    // image nobody marked keeps it.
    let marked_one = r
        .events
        .iter()
        .find(|e| e.suggested)
        .unwrap()
        .image_id
        .clone();
    let fresh = unmarked
        .iter()
        .find(|id| !r.events.iter().any(|e| &&e.image_id == id))
        .unwrap()
        .clone();
    let suggested = |id: String| {
        let c = c.clone();
        async move {
            c.images
                .clone()
                .get_image(pb::GetImageRequest {
                    image_id: id,
                    model_version: trained.version,
                })
                .await
                .unwrap()
                .into_inner()
                .suggestion
                .is_some()
        }
    };
    assert!(suggested(marked_one.clone()).await, "overlap 1: shown");
    store.set_overlap(2).await.unwrap();
    assert!(!suggested(marked_one).await, "overlap 2: marked blind");
    assert!(suggested(fresh).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_corrupt_image_is_reported_and_skipped_and_the_worker_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 30, &ck).await;
    // Break two training images in the image store: one deleted, one overwritten.
    let images = ck.with_file_name("images");
    let ids = store.image_ids().await.unwrap();
    let (gone, garbled) = (ids[3].clone(), ids[11].clone());
    std::fs::remove_file(images.join(mp_store::images::object_key(&gone))).unwrap();
    std::fs::write(images.join(mp_store::images::object_key(&garbled)), b"junk").unwrap();
    let gw = gateway(&redis.url(), &ck).await;
    let mut w = spawn_worker(&redis.url(), &ck, "w", &[], &dir.path().join("w.log"));
    // A scoring pass over every training image, the bad ones included.
    score_pass(&store, &ids).await;
    let start = Instant::now();
    let bad = loop {
        let bad = store.bad_images().await.unwrap();
        if bad.len() == 2 {
            break bad;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{bad:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let named: Vec<&str> = bad.iter().map(|(id, _)| id.as_str()).collect();
    let mut want = [gone.as_str(), garbled.as_str()];
    want.sort();
    assert_eq!(named, want);
    assert!(
        bad.iter().any(|(_, why)| why.contains("missing")),
        "{bad:?}"
    );
    // The job was finished (acknowledged), and the same worker still serves refinements.
    let mut c = store.connection();
    let start = Instant::now();
    loop {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(format!("mp:{}", mp_store::SCORE_STREAM))
            .arg("score")
            .query_async(&mut c)
            .await
            .unwrap();
        if pending.0 == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "score job never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.0.try_wait().unwrap().is_none(), "the worker stopped");
    // The pass stored every good image's view; the gateway serves that one.
    let good = &ids[0];
    let stored = store
        .image_store()
        .await
        .unwrap()
        .view(1, good)
        .await
        .unwrap()
        .expect("the scoring pass stored the view");
    assert_eq!(stored.saliency.len(), (SIDE * SIDE) as usize);
    let e = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let seen = mp_api::Client::new(&gw.addr, &admin)
        .unwrap()
        .images
        .clone()
        .get_image(pb::GetImageRequest {
            image_id: good.clone(),
            model_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (seen.saliency, seen.probabilities),
        (stored.saliency, stored.probabilities)
    );
    assert!(store
        .image_store()
        .await
        .unwrap()
        .view(1, &gone)
        .await
        .unwrap()
        .is_none());
    let pid = mark_one(&e, "k1").await;
    wait_status(&store, &pid, &["ready"], Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
    assert!(
        log.contains("image left out") && log.contains(&garbled),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_not_stored_are_computed_by_a_worker_for_every_waiting_expert() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 30, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let mut w = spawn_worker(&redis.url(), &ck, "views", &[], &dir.path().join("w.log"));
    let start = Instant::now();
    while store.view_workers(2000).await.unwrap() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker never listened: {}",
            std::fs::read_to_string(dir.path().join("w.log")).unwrap()
        );
        assert!(w.0.try_wait().unwrap().is_none(), "the worker stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No scoring pass ran: no view is stored. Eight experts ask at once, two of them for
    // the same image.
    let ids = store.image_ids().await.unwrap();
    let images = store.image_store().await.unwrap();
    assert!(images.view(1, &ids[0]).await.unwrap().is_none());
    // Admins see every image without a lease.
    let e = mp_api::Client::new(&gw.addr, &admin).unwrap();
    let asked: Vec<String> = (0..7)
        .map(|i| ids[i].clone())
        .chain([ids[0].clone()])
        .collect();
    let replies = futures::future::join_all(asked.iter().map(|id| {
        let mut c = e.images.clone();
        let id = id.clone();
        async move {
            c.get_image(pb::GetImageRequest {
                image_id: id,
                model_version: 1,
            })
            .await
            .unwrap()
            .into_inner()
        }
    }))
    .await;
    // One request per image reached the workers, and each view was stored by the worker.
    let mut c = store.connection();
    let requests: u64 = redis::cmd("XLEN")
        .arg(format!("mp:{}", mp_store::VIEW_STREAM))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(requests, 7);
    let log = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
    assert!(log.contains("views computed"), "{log}");
    for (id, r) in asked.iter().zip(&replies) {
        let stored = images
            .view(1, id)
            .await
            .unwrap()
            .expect("stored by the worker");
        assert_eq!(r.saliency, stored.saliency);
        assert_eq!(r.saliency.len(), (SIDE * SIDE) as usize);
    }
    assert_eq!(replies[0].saliency, replies[7].saliency);
    // The worker's batch computes what the gateway computes alone, image by image.
    drop(w);
    let alone = mp_e2e::TestGateway::start(mp_gateway::GatewayConfig {
        view_wait_ms: 0,
        ..mp_e2e::gateway_config(&redis.url(), &ck)
    })
    .await;
    let views_dir = ck.with_file_name("images").join("views");
    std::fs::remove_dir_all(&views_dir).unwrap();
    let e2 = mp_api::Client::new(&alone.addr, &admin).unwrap();
    for (id, r) in asked.iter().zip(&replies).take(3) {
        let own = e2
            .images
            .clone()
            .get_image(pb::GetImageRequest {
                image_id: id.clone(),
                model_version: 1,
            })
            .await
            .unwrap()
            .into_inner();
        let diff = own
            .saliency
            .iter()
            .zip(&r.saliency)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "saliency differs by {diff}");
        let pdiff = own
            .probabilities
            .iter()
            .zip(&r.probabilities)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(pdiff < 1e-5, "probabilities differ by {pdiff}");
    }
}

/// A worker whose actor panics stops with a clear log line and status 70 (never a worker
/// that answers every job with an error while its health says Serving), leaving its job
/// unacknowledged; a job that brings down every worker that takes it is given up on after
/// `--max-deliveries`, its proposal failed, visible in the stats and the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_stops_and_a_poison_job_goes_to_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 20, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let ckp = ck.to_str().unwrap().to_string();
    let url = redis.url();
    let worker = |log: &str, extra: &[&str]| {
        common::Proc(
            Command::new(env!("CARGO_BIN_EXE_mp"))
                .args(["worker", "--redis-url", &url, "--checkpoints", &ckp])
                .args(["--claim-idle-ms", "300", "--max-deliveries", "2"])
                .args(extra)
                .env("RUST_LOG", "info")
                .env("MP_THREADS", "1")
                .env("MP_FAILPOINTS", "refine")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let c = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let pid = mark_one(&c, "k1").await;
    for (n, log) in ["a.log", "b.log"].into_iter().enumerate() {
        let mut w = worker(log, &[]);
        let start = Instant::now();
        let code = loop {
            if let Some(s) = w.0.try_wait().unwrap() {
                break s.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "worker {n} did not stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(code, Some(mp_node::PANIC_EXIT));
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
        assert!(
            text.contains("panicked") && text.contains("failpoint refine"),
            "{text}"
        );
        // Not acknowledged, not failed: the job waits for another worker.
        let p = store.proposal(&pid).await.unwrap();
        assert_eq!(p.status, "running", "{}", p.message);
        assert_eq!(store.counts().await.unwrap().dead_jobs, 0);
    }
    // The third delivery is over the limit: given up on, not run.
    let _w = worker("c.log", &[]);
    let p = wait_status(&store, &pid, &["failed"], Duration::from_secs(30)).await;
    assert!(
        p.message.contains("given up after 3 deliveries"),
        "{}",
        p.message
    );
    let admin_c = Client::new(&gw.addr, &admin).unwrap();
    let stats = admin_c
        .stats
        .clone()
        .get_stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.dead_jobs, 1);
    let dead = admin_c
        .admin
        .clone()
        .dead_jobs(pb::DeadJobsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].stream.as_str(),
            dead[0].deliveries,
            dead[0].fields.get("proposal")
        ),
        ("jobs:refine", 3, Some(&pid))
    );
    let e = c
        .admin
        .clone()
        .dead_jobs(pb::DeadJobsRequest { limit: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // The CLI shows it.
    let out = Command::new(env!("CARGO_BIN_EXE_mp"))
        .args(["admin", "jobs", "--addr", &gw.addr, "--token", &admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 jobs given up on") && text.contains(&pid),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mp up` keeps its children running: a worker killed with SIGKILL is started again (after
/// a back-off), and `mp up` says so instead of stopping everything.
#[test]
fn up_starts_a_crashed_child_again() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ds = mp_e2e::shortcut_dataset(60, true, 3);
    mp_core::data::folder::write_split(&data, "train", &ds, true).unwrap();
    let held = mp_e2e::shortcut_dataset(20, false, 4);
    mp_core::data::folder::write_split(&data, "val", &held, false).unwrap();
    let grpc = mp_store::server::free_port().unwrap();
    let redis = mp_store::server::free_port().unwrap();
    let up_dir = dir.path().join("up");
    let mut up = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_mp"))
            .args(["up", "--workers", "1", "--epochs-per-round", "1"])
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--redis-port", &redis.to_string()])
            .arg("--dir")
            .arg(&up_dir)
            .arg("--data")
            .arg(&data)
            .env("MP_THREADS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = up.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str, within: Duration| {
        let start = Instant::now();
        while !seen.contains(what) {
            let left = within.saturating_sub(start.elapsed());
            assert!(!left.is_zero(), "no {what:?} in:\n{seen}");
            if let Ok(l) = rx.recv_timeout(left) {
                seen.push_str(&l);
                seen.push('\n');
            }
        }
    };
    wait_for("Machine Punishment is up", Duration::from_secs(120));
    let log_file = up_dir.join("logs/worker-0.log");
    let started = |n: usize| {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            if log.matches("worker pool started").count() >= n {
                return;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let ps = Command::new("ps").args(["-ef"]).output().unwrap();
                panic!(
                    "{log}\n{}",
                    String::from_utf8_lossy(&ps.stdout)
                        .lines()
                        .filter(|l| l.contains("mp worker"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    started(1);
    let pattern = format!(
        "{}/checkpoints --name worker-0",
        up_dir.canonicalize().unwrap().display()
    );
    let pgrep = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pgrep.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no worker process matching {pattern}"))
        .to_string();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("worker-0 exited", Duration::from_secs(10));
    wait_for("worker-0 started again", Duration::from_secs(10));
    // The new worker joins (its output goes on in the same log).
    started(2);
    // Still up, and stops cleanly on Ctrl-C.
    assert!(up.0.try_wait().unwrap().is_none(), "{seen}");
    Command::new("kill")
        .args(["-INT", &up.0.id().to_string()])
        .status()
        .unwrap();
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Retention: a settled proposal's weights go once old enough; an open proposal's stay, a
/// recent one's stay, model versions stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_settled_proposal_weights_only() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 8, &ck).await;
    let gw = gateway(&redis.url(), &ck).await;
    let c = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let (settled, open, recent) = (
        mark_one(&c, "k1").await,
        mark_one(&c, "k2").await,
        mark_one(&c, "k3").await,
    );
    for pid in [&settled, &recent] {
        store.update_proposal(pid, "rejected", &[]).await.unwrap();
    }
    let week_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 86_400);
    let weights = |pid: &str| ck.join(mp_node::data::proposal_file(pid).unwrap());
    for (pid, aged) in [(&settled, true), (&open, true), (&recent, false)] {
        std::fs::create_dir_all(weights(pid).parent().unwrap()).unwrap();
        std::fs::write(weights(pid), b"w").unwrap();
        if aged {
            std::fs::File::options()
                .write(true)
                .open(weights(pid))
                .unwrap()
                .set_modified(week_ago)
                .unwrap();
        }
    }
    let n = mp_node::data::collect_garbage(&store, &ck, Duration::from_secs(7 * 86_400))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(!weights(&settled).exists());
    assert!(weights(&open).exists() && weights(&recent).exists());
    assert!(ck.join("v1.safetensors").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attention_ordering_starts_with_each_classs_most_confident_images() {
    // Before any mark exists, a worker with `--ordering attention` queues the images by their
    // confidence rank within their class (the model is surest where a shortcut agrees with
    // the object), not by the margin.
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    mp_e2e::platform_project(&store, N, &ck).await;
    let ids = store.image_ids().await.unwrap();
    // A sentinel priority outside [-1, 1]: the pass has finished when none is left.
    let sentinel: Vec<(String, f64)> = ids.iter().map(|id| (id.clone(), 5.0)).collect();
    store.enqueue(&sentinel).await.unwrap();
    let _w = spawn_worker(
        &redis.url(),
        &ck,
        "w",
        &["--ordering", "attention", "--exploration", "0"],
        &dir.path().join("w.log"),
    );
    score_pass(&store, &ids).await;
    let mut c = store.connection();
    let start = Instant::now();
    let queued: Vec<(String, f64)> = loop {
        let q: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg("mp:queue")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .unwrap();
        if q.len() == N && q.iter().all(|(_, p)| *p < 2.0) {
            break q;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the scoring pass never re-queued every image"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Expected: ranks of each image's probability of its label (from the views the pass
    // stored) within its class.
    let views = store.image_store().await.unwrap();
    let records = store.images(&ids).await.unwrap();
    let mut conf = Vec::new();
    let mut labels = Vec::new();
    for r in &records {
        let v = views.view(1, &r.id).await.unwrap().expect("view stored");
        conf.push(v.probabilities[r.label as usize] as f64);
        labels.push(r.label as i64);
    }
    let want = mp_core::align::confidence_ranks(&conf, &labels);
    let got: std::collections::HashMap<&str, f64> =
        queued.iter().map(|(id, p)| (id.as_str(), *p)).collect();
    let same = records
        .iter()
        .zip(&want)
        .filter(|(r, w)| (got[r.id.as_str()] - **w).abs() < 1e-9)
        .count();
    assert!(
        same == N,
        "{same} of {N} images queued at their confidence rank: {queued:?} want {want:?}"
    );
}
