//! # Layout
//! End-to-end tests of the whole product live in `tests/`; this library holds the shared
//! fixtures: a small shortcut dataset that a classifier learns the wrong way, and a small
//! project stored in a real Redis for the platform tests.

pub mod webdriver;

use mp_core::data::{Dataset, Mask, RED};
use mp_core::rng::Rng;

/// Side of the fixture images.
pub const SIDE: usize = 14;

/// Four classes told apart by where a faint, noisy bar lies (the real cue). With `shortcut`,
/// a flat 3x3 patch has a shade that encodes the label; without it, the shade is random. The
/// patch moves: it sits anywhere in the band above the bars or the strip left of them, so
/// that the union of a few marks does not cover it in other images. Every image carries its
/// ground-truth mark: red on the patch.
pub fn shortcut_dataset(n: usize, shortcut: bool, seed: u64) -> Dataset {
    let classes = (0..4).map(|c| c.to_string()).collect();
    let mut ds = Dataset::new(classes, 1, SIDE, SIDE);
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let label = (i % 4) as i64;
        let mut img: Vec<f32> = (0..SIDE * SIDE)
            .map(|_| 0.4 * rng.next_f64() as f32)
            .collect();
        let row = 4 + 2 * label as usize + rng.below(2);
        let col = 3 + rng.below(5);
        for c in col..col + 5 {
            img[row * SIDE + c] += 0.3;
        }
        let shade_class = if shortcut { label } else { rng.below(4) as i64 };
        let shade = 0.3 + 0.2 * shade_class as f32;
        let mut mask = Mask::empty(SIDE, SIDE);
        // Top band (rows 0..4, any column) or left strip (columns 0..3, any row).
        let (r0, c0) = if rng.coin() {
            (rng.below(2), rng.below(SIDE - 2))
        } else {
            (rng.below(SIDE - 2), 0)
        };
        for r in r0..r0 + 3 {
            for c in c0..c0 + 3 {
                img[r * SIDE + c] = shade;
                mask.values[r * SIDE + c] = RED;
            }
        }
        ds.push(&img, label, Some(mask), format!("s{i}"));
    }
    ds
}

/// Side of the platform fixture's images.
pub const PROJECT_SIDE: u32 = 8;

/// Stores a project of `n` training images (8x8, two classes), 32 val and 32 test images,
/// a freshly initialised small CNN as version 1 in `checkpoints`, queues every training
/// image, and returns an admin token.
pub async fn platform_project(
    store: &mp_store::Store,
    n: usize,
    checkpoints: &std::path::Path,
) -> String {
    use mp_store::{ImageRecord, ModelVersionRecord, ProjectInfo, Role};
    let side = PROJECT_SIDE;
    store
        .set_project(&ProjectInfo {
            name: "t".into(),
            classes: vec!["a".into(), "b".into()],
            width: side,
            height: side,
            channels: 1,
            image_store: checkpoints.with_file_name("images").display().to_string(),
        })
        .await
        .expect("project");
    let rec = |id: String, i: usize| ImageRecord {
        name: id.rsplit('/').next().unwrap_or_default().to_string(),
        id,
        label: (i % 2) as u32,
        width: side,
        height: side,
        channels: 1,
        pixels: (0..(side * side) as usize)
            .map(|p| ((p * 7 + i * 13) % 256) as u8)
            .collect(),
    };
    let train: Vec<ImageRecord> = (0..n).map(|i| rec(format!("a/{i:05}"), i)).collect();
    store.put_images(&train).await.expect("images");
    for split in ["val", "test"] {
        let held: Vec<ImageRecord> = (0..32)
            .map(|i| rec(format!("{split}:a/{i:03}"), i + 7))
            .collect();
        store.put_held_out(split, &held).await.expect("held out");
    }
    std::fs::create_dir_all(checkpoints).expect("checkpoints dir");
    tch::manual_seed(0);
    let spec = mp_core::model::ModelSpec {
        arch: mp_core::model::Arch::SmallCnn,
        classes: vec!["a".into(), "b".into()],
        channels: 1,
        height: side as usize,
        width: side as usize,
        version: 1,
        script: None,
    };
    mp_core::model::Model::new(spec, tch::Device::Cpu)
        .expect("model")
        .save(&checkpoints.join("v1.safetensors"))
        .expect("save");
    store
        .publish_version(&ModelVersionRecord {
            version: 1,
            parent: 0,
            created_ms: 0,
            reason: "base".into(),
            val_accuracy: 0.5,
            val_loss: 0.7,
            test_accuracy: 0.5,
            file: "v1.safetensors".into(),
        })
        .await
        .expect("version");
    store.ensure_job_groups().await.expect("groups");
    let items: Vec<(String, f64)> = train
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), (i % 101) as f64 / 101.0))
        .collect();
    store.enqueue(&items).await.expect("enqueue");
    store
        .create_expert("admin", Role::Admin)
        .await
        .expect("admin")
        .1
}

/// A gateway running in this process, for tests: `mp_gateway::run` on `cfg.listen`
/// (`127.0.0.1:0` picks a free port).
pub struct TestGateway {
    /// `http://host:port`
    pub addr: String,
    /// The bound address, to start a gateway again on the same port.
    pub listen: String,
    gateway: mp_gateway::Spawned,
}

impl TestGateway {
    pub async fn start(mut cfg: mp_gateway::GatewayConfig) -> TestGateway {
        let listener = tokio::net::TcpListener::bind(cfg.listen.as_str())
            .await
            .expect("bind gateway");
        let listen = listener.local_addr().expect("local addr").to_string();
        cfg.listen = listen.clone();
        let gw = TestGateway {
            addr: format!("http://{listen}"),
            listen,
            gateway: mp_gateway::Spawned::start(listener, cfg).expect("start gateway"),
        };
        gw.wait_for_store().await;
        gw
    }

    /// Waits (up to 10 s, then goes on) until the gateway has connected to Redis: until a
    /// call with an unknown token is refused as such rather than as `Unavailable`. On a
    /// busy machine the first calls would otherwise find no store yet.
    async fn wait_for_store(&self) {
        let Ok(probe) = mp_api::Client::new(&self.addr, "probe") else {
            return;
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < until {
            match probe
                .stats
                .clone()
                .get_stats(mp_proto::v1::StatsRequest {})
                .await
            {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                _ => return,
            }
        }
    }

    /// Shuts the gateway down and waits until it has stopped.
    pub async fn stop(self) {
        self.gateway.stop().await
    }
}

/// The test gateway's configuration: no metrics port, a free gRPC port.
pub fn gateway_config(redis_url: &str, checkpoints: &std::path::Path) -> mp_gateway::GatewayConfig {
    mp_gateway::GatewayConfig {
        listen: "127.0.0.1:0".into(),
        redis_url: redis_url.into(),
        metrics_listen: String::new(),
        checkpoints: checkpoints.into(),
        ..Default::default()
    }
}

/// The token of a new expert called `name`, created with the `admin` token.
pub async fn expert_token(addr: &str, admin: &str, name: &str) -> String {
    let a = mp_api::Client::new(addr, admin).expect("admin client");
    mp_api::create_expert(&a, name, "expert", std::time::Duration::from_secs(10))
        .await
        .expect("create expert")
        .token
}

/// `c` commits its proposal `proposal_id` (which must be `ready`).
pub async fn commit(c: &mp_api::Client, proposal_id: &str) {
    c.proposals
        .clone()
        .decide(mp_proto::v1::DecideRequest {
            proposal_id: proposal_id.into(),
            decision: mp_proto::v1::decide_request::Decision::Commit as i32,
        })
        .await
        .expect("commit");
}

/// A client for a new expert called `name`, created with the `admin` token.
pub async fn expert(addr: &str, admin: &str, name: &str) -> mp_api::Client {
    mp_api::Client::new(addr, &expert_token(addr, admin, name).await).expect("client")
}
