//! The platform on one machine for the client tests: a redis-server on a free port, a
//! project, the gateway and (optionally) a refinement worker, all in this process except
//! Redis. Shared by the native client's tests (`client.rs`) and the web client's (`web.rs`).
#![allow(dead_code)]

use egui_kittest::Harness;
use mp_client::settings::{Settings, Store as SettingsStore};
use mp_client::{ClientApp, Net};
use mp_store::server::RedisServer;
use mp_store::Store;

pub struct Stack {
    pub rt: tokio::runtime::Runtime,
    pub redis: RedisServer,
    gateway: Option<mp_e2e::TestGateway>,
    /// Its `listen` is the first gateway's bound address, so a restart keeps the address.
    gateway_config: mp_gateway::GatewayConfig,
    worker: Option<(
        tokio::sync::watch::Sender<bool>,
        std::thread::JoinHandle<()>,
    )>,
    pub addr: String,
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub fn start(lease_ttl_ms: u64, with_worker: bool) -> Stack {
        Self::start_serving(lease_ttl_ms, with_worker, None)
    }

    /// [`Stack::start`] with the gateway serving the web client's bundle from `web_dir`.
    pub fn start_serving(
        lease_ttl_ms: u64,
        with_worker: bool,
        web_dir: Option<std::path::PathBuf>,
    ) -> Stack {
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
            web_dir,
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
    pub fn start_gateway(&mut self) {
        let g = self
            .rt
            .block_on(mp_e2e::TestGateway::start(self.gateway_config.clone()));
        self.gateway_config.listen = g.listen.clone();
        self.addr = g.addr.clone();
        self.gateway = Some(g);
    }

    pub fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            self.rt.block_on(g.stop());
        }
    }

    pub fn expert(&self, name: &str) -> String {
        self.rt
            .block_on(mp_e2e::expert_token(&self.addr, &self.admin, name))
    }

    pub fn store(&self) -> Store {
        self.rt
            .block_on(Store::connect(&self.redis.url(), "mp"))
            .unwrap()
    }

    /// Exactly one mark is stored, on `image`, with `values`: a retried submit landed once.
    pub fn assert_one_mark(&self, store: &Store, image: &str, values: Vec<i8>) {
        let marks = self.rt.block_on(store.mark_ids()).unwrap();
        assert_eq!(marks.len(), 1, "stored once");
        let mark = self.rt.block_on(store.mark(&marks[0])).unwrap();
        assert_eq!((mark.image_id.as_str(), mark.values), (image, values));
    }

    /// A client app connected as a new expert, driven by a headless harness.
    pub fn client(&self, name: &str) -> Harness<'static, ClientApp> {
        let settings = Settings {
            addr: self.addr.clone(),
            token: self.expert(name),
            radius: 0.0,
            ..Default::default()
        };
        let mut app = ClientApp::new(Net::spawn(None), settings, SettingsStore::Nowhere);
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
