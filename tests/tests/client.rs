//! The annotation client (headless, through egui_kittest) against the real thing: a
//! redis-server on a free port, the gateway, and a refinement worker, all in this process
//! except Redis. Input goes in as a person's pointer and keys; assertions read the screen
//! and what the server stored.

use egui::Key;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use mp_client::app::{Conn, Work};
use mp_client::settings::Settings;
use mp_client::{ClientApp, Net};
use mp_store::server::RedisServer;
use mp_store::Store;
use std::time::{Duration, Instant};

const SIDE: u32 = mp_e2e::PROJECT_SIDE;

struct Stack {
    rt: tokio::runtime::Runtime,
    redis: RedisServer,
    gateway: Option<mp_e2e::TestGateway>,
    /// Its `listen` is the first gateway's bound address, so a restart keeps the address.
    gateway_config: mp_gateway::GatewayConfig,
    worker: Option<(
        tokio::sync::watch::Sender<bool>,
        std::thread::JoinHandle<()>,
    )>,
    addr: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn start(lease_ttl_ms: u64, with_worker: bool) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let checkpoints = dir.path().join("checkpoints");
        let url = redis.url();
        let admin = rt.block_on(async {
            let store = Store::connect(&url, "mp").await.unwrap();
            mp_e2e::platform_project(&store, 40, &checkpoints).await
        });
        let gateway_config = mp_gateway::GatewayConfig {
            lease_ttl_ms,
            reaper_interval_ms: 100,
            ..mp_e2e::gateway_config(&url, &checkpoints)
        };
        let worker = with_worker.then(|| {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let cfg = mp_node::worker::WorkerConfig {
                redis_url: url.clone(),
                prefix: "mp".into(),
                checkpoints: checkpoints.clone(),
                threads: 1,
                consumer: "client-test-worker".into(),
                refine: mp_core::refine::RefineConfig {
                    max_iterations: 10,
                    ..Default::default()
                },
                ..Default::default()
            };
            let th = std::thread::spawn(move || {
                let sys = actix_rt::System::with_tokio_rt(|| {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()
                        .unwrap()
                });
                sys.block_on(async move { mp_node::worker::run(cfg, rx).await.unwrap() });
            });
            (tx, th)
        });
        let mut stack = Stack {
            rt,
            redis,
            gateway: None,
            gateway_config,
            worker,
            addr: String::new(),
            admin,
            _dir: dir,
        };
        stack.start_gateway();
        stack
    }

    /// Starts the gateway (again on the first one's address).
    fn start_gateway(&mut self) {
        let g = self
            .rt
            .block_on(mp_e2e::TestGateway::start(self.gateway_config.clone()));
        self.gateway_config.listen = g.listen.clone();
        self.addr = g.addr.clone();
        self.gateway = Some(g);
    }

    fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            self.rt.block_on(g.stop());
        }
    }

    fn expert(&self, name: &str) -> String {
        self.rt
            .block_on(mp_e2e::expert_token(&self.addr, &self.admin, name))
    }

    fn store(&self) -> Store {
        self.rt
            .block_on(Store::connect(&self.redis.url(), "mp"))
            .unwrap()
    }

    /// A client app connected as a new expert, driven by a headless harness.
    fn client(&self, name: &str) -> Harness<'static, ClientApp> {
        let settings = Settings {
            addr: self.addr.clone(),
            token: self.expert(name),
            radius: 0.0,
            ..Default::default()
        };
        let mut app = ClientApp::new(Net::spawn(None), settings, None);
        app.connect();
        Harness::builder()
            .with_size([1100.0, 760.0])
            .build_ui_state(|ui, app: &mut ClientApp| app.ui(ui), app)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some((tx, th)) = self.worker.take() {
            let _ = tx.send(true);
            let _ = th.join();
        }
        // Dropping the gateway's handle shuts it down.
        self.gateway.take();
    }
}

/// Steps the UI until `cond` holds (replies arrive on the network thread).
fn wait_until(
    h: &mut Harness<'_, ClientApp>,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&ClientApp) -> bool,
) {
    let start = Instant::now();
    loop {
        h.step();
        if cond(h.state()) {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}; work {:?}, banner {:?}, conn {:?}",
                std::mem::discriminant(&h.state().work),
                h.state().banner,
                h.state().conn
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn leased_image(app: &ClientApp) -> Option<String> {
    app.marking().map(|m| m.lease.image_id.clone())
}

/// A horizontal radius-0 stroke over pixels (x0..=x1, y).
fn stroke(h: &mut Harness<'_, ClientApp>, x0: u32, x1: u32, y: u32) {
    let xf = h.state().canvas.expect("canvas drawn");
    let a = xf.to_screen([x0 as f32 + 0.5, y as f32 + 0.5]);
    let b = xf.to_screen([x1 as f32 + 0.5, y as f32 + 0.5]);
    h.hover_at(a);
    h.drag_at(a);
    h.hover_at(b);
    h.drop_at(b);
    h.step();
}

#[test]
fn two_clients_at_once_get_different_images() {
    let s = Stack::start(60_000, false);
    let mut a = s.client("alice");
    let mut b = s.client("bob");
    let t = Duration::from_secs(20);
    wait_until(&mut a, "alice's image", t, |app| app.marking().is_some());
    wait_until(&mut b, "bob's image", t, |app| app.marking().is_some());
    let (ia, ib) = (leased_image(a.state()), leased_image(b.state()));
    assert_ne!(ia, ib, "two experts hold the same image");
    // Each sees the image and the model's view of it.
    a.step();
    assert!(a.query_by_label_contains("prediction:").is_some());
    assert!(a.query_by_label_contains("Connected to").is_some());
    // The status bar counts both experts online once stats arrive.
    wait_until(&mut a, "stats", t, |app| {
        app.stats.as_ref().is_some_and(|s| s.experts_online >= 2)
    });
}

#[test]
fn mark_refine_commit_then_reject_against_a_real_worker() {
    let s = Stack::start(60_000, true);
    let store = s.store();
    let mut h = s.client("carol");
    let t = Duration::from_secs(60);
    for commit in [true, false] {
        wait_until(&mut h, "an image", t, |app| app.marking().is_some());
        let image = leased_image(h.state()).unwrap();
        assert_eq!(h.state().marking().unwrap().layer.width, SIDE);
        stroke(&mut h, 1, 5, 2);
        h.key_press(Key::Enter);
        h.step();
        wait_until(&mut h, "the chooser", t, |app| {
            matches!(app.work, Work::Choosing { .. })
        });
        assert!(h.query_by_label_contains("validation accuracy").is_some());
        let proposal_id = match &h.state().work {
            Work::Choosing { proposal, .. } => proposal.proposal_id.clone(),
            _ => unreachable!(),
        };
        // The mark the server stored is exactly the stroke.
        let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
        let mark = s.rt.block_on(store.mark(&p.mark_id)).unwrap();
        assert_eq!(mark.image_id, image);
        let expected: Vec<i8> = (0..SIDE * SIDE)
            .map(|i| i8::from(i / SIDE == 2 && (1..=5).contains(&(i % SIDE))))
            .collect();
        assert_eq!(mark.values, expected);

        h.get_by_label(if commit { "Commit" } else { "Reject" })
            .click();
        h.step();
        let word = if commit { "Committed" } else { "Rejected" };
        wait_until(&mut h, word, t, |app| {
            app.banner
                .as_ref()
                .is_some_and(|b| b.text.starts_with(word))
        });
        let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
        let want = if commit { "committing" } else { "rejected" };
        assert_eq!(p.status, want);
    }
    wait_until(&mut h, "my marks counted", t, |app| app.my_marks() == 2);
}

#[test]
fn an_expired_lease_is_explained_and_the_drawing_comes_back() {
    let s = Stack::start(1_500, false);
    let t = Duration::from_secs(20);
    // Heartbeats keep a lease while the expert works, well past its time to live.
    let mut h = s.client("dave");
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let lease = h.state().marking().unwrap().lease.lease_id.clone();
    stroke(&mut h, 0, 3, 0);
    let until = Instant::now() + Duration::from_millis(3_500);
    wait_until(&mut h, "time to pass", t, |_| Instant::now() > until);
    assert_eq!(h.state().marking().unwrap().lease.lease_id, lease);
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the proposal screen", t, |app| {
        matches!(app.work, Work::Refining { .. })
    });

    // Now a client whose heartbeats stop (a laptop lid closed mid-image).
    let mut h = s.client("erin");
    h.state_mut().heartbeat_override = Some(Duration::from_secs(3600));
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let image = leased_image(h.state()).unwrap();
    stroke(&mut h, 2, 6, 4);
    let drawn = h.state().marking().unwrap().layer.values().to_vec();
    // Past the lease's own deadline, then submit.
    let deadline = h.state().marking().unwrap().lease.deadline_ms;
    while mp_store::now_ms() <= deadline + 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the expiry message", t, |app| {
        app.banner
            .as_ref()
            .is_some_and(|b| b.text.contains("expired"))
    });
    assert!(h.query_by_label_contains("Your lease on image").is_some());
    // The image went back to the queue at its priority, so it comes straight back,
    // with the drawing.
    wait_until(&mut h, "the image again", t, |app| {
        leased_image(app).as_deref() == Some(image.as_str())
    });
    assert_eq!(h.state().marking().unwrap().layer.values(), &drawn[..]);
}

#[test]
fn a_gateway_restart_mid_submit_loses_nothing_drawn() {
    let mut s = Stack::start(60_000, false);
    let store = s.store();
    let t = Duration::from_secs(30);
    let mut h = s.client("fay");
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let image = leased_image(h.state()).unwrap();
    stroke(&mut h, 1, 6, 3);
    let drawn = h.state().marking().unwrap().layer.values().to_vec();
    s.stop_gateway();
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the lost connection", t, |app| {
        matches!(app.conn, Conn::Down { .. })
    });
    assert!(h.query_by_label_contains("Connection lost").is_some());
    match &h.state().work {
        Work::Submitting { m, .. } => assert_eq!(m.layer.values(), &drawn[..]),
        _ => panic!("the submit should be waiting to be retried"),
    }
    std::thread::sleep(Duration::from_millis(500));
    s.start_gateway();
    wait_until(&mut h, "the retried submit", t, |app| {
        matches!(app.work, Work::Refining { .. }) && matches!(app.conn, Conn::Up { .. })
    });
    let marks = s.rt.block_on(store.mark_ids()).unwrap();
    assert_eq!(marks.len(), 1, "stored once");
    let mark = s.rt.block_on(store.mark(&marks[0])).unwrap();
    assert_eq!(
        (mark.image_id.as_str(), mark.values),
        (image.as_str(), drawn)
    );
}
