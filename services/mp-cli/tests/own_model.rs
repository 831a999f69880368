//! A user's own PyTorch model through the whole platform, as real processes against a real
//! redis-server: `mp project init --model net.pt --config project.toml` → an expert marks an
//! image → a worker refines the module → the expert commits → the trainer publishes v2 →
//! `mp export --version 2` → PyTorch loads both exported files and reproduces the engine's
//! logits. And the init refusals: wrong output size, wrong channels, not TorchScript.

mod common;
use common::{spawn, wait_status};
use mp_core::model::Model;
use mp_proto::rle;
use mp_proto::v1 as pb;
use mp_store::server::RedisServer;
use mp_store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const SIDE: u32 = 16;
/// Output order of the module (the folder classes sort as a, b, c).
const CLASSES: [&str; 3] = ["c", "a", "b"];

fn python() -> String {
    std::env::var("MP_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torch_module.py")
}

fn mp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mp"))
        .args(args)
        .env("MP_THREADS", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// ROOT/{train,val}/{a,b,c}/*.png, 16x16 RGB: class k has a bright patch in channel k.
fn image_folder(root: &Path) {
    let mut seed = 7u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        (seed >> 16) as u8
    };
    for (split, n) in [("train", 12), ("val", 4)] {
        for (k, class) in ["a", "b", "c"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
                    let mut p = [rnd() / 4, rnd() / 4, rnd() / 4];
                    if (2..6).contains(&x) && (2..6).contains(&y) {
                        p[k] = 255;
                    }
                    image::Rgb(p)
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}

fn config(path: &Path, channels: usize) {
    let mean = vec!["0.5"; channels].join(", ");
    let std = vec!["0.25"; channels].join(", ");
    std::fs::write(
        path,
        format!(
            "classes = [{}]\nbatch_norm = \"frozen\"\n\n[input]\nchannels = {channels}\nheight = {SIDE}\nwidth = {SIDE}\nresize = \"stretch\"\nmean = [{mean}]\nstd = [{std}]\n",
            CLASSES.map(|c| format!("{c:?}")).join(", ")
        ),
    )
    .unwrap();
}

fn modules(dir: &Path) {
    let out = Command::new(python())
        .arg(fixture())
        .arg("make")
        .arg(dir)
        .args(["--side", &SIDE.to_string()])
        .output()
        .expect("running the venv's python (set MP_PYTHON)");
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refine_commit_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    modules(d);
    image_folder(&d.join("data"));
    config(&d.join("project.toml"), 3);
    let redis = RedisServer::start_free(&d.join("redis")).unwrap();
    let url = redis.url();
    let ck = d.join("ck");
    let ckp = ck.to_str().unwrap();
    let init = |model: &str, cfg: &Path| {
        mp(&[
            "project",
            "init",
            "--data",
            d.join("data").to_str().unwrap(),
            "--model",
            d.join(model).to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--redis-url",
            &url,
            "--checkpoints",
            ckp,
            "--token-file",
            d.join("admin.token").to_str().unwrap(),
        ])
    };

    // Refusals first: nothing is stored by a refused init.
    let o = init("wrong_out.pt", &d.join("project.toml"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("output is [2, 4]") && text(&o).contains("expected [2, 3]"),
        "{}",
        text(&o)
    );
    let o = init("init_state.pt", &d.join("project.toml"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a TorchScript module"),
        "{}",
        text(&o)
    );
    config(&d.join("gray.toml"), 1);
    let o = init("net.pt", &d.join("gray.toml"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not accept a [2, 1, 16, 16] input"),
        "{}",
        text(&o)
    );
    let store = Store::connect(&url, "mp").await.unwrap();
    assert!(store.versions().await.unwrap().is_empty());

    let o = init("net.pt", &d.join("project.toml"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 batch norm, 1 dropout"), "{}", text(&o));
    let admin = std::fs::read_to_string(d.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let project = store.project().await.unwrap().unwrap();
    assert_eq!(project.classes, CLASSES.map(String::from).to_vec());

    let gw = mp_e2e::TestGateway::start(mp_e2e::gateway_config(&url, &ck)).await;
    let _w = spawn(
        &[
            "worker",
            "--redis-url",
            &url,
            "--checkpoints",
            ckp,
            "--refine-no-early-stop",
            "--refine-max-iterations",
            "8",
        ],
        &d.join("w.log"),
    );
    let _t = spawn(
        &[
            "trainer",
            "--redis-url",
            &url,
            "--checkpoints",
            ckp,
            "--round-marks",
            "100",
        ],
        &d.join("t.log"),
    );
    let c = mp_e2e::expert(&gw.addr, &admin, "ann").await;
    let lease = c
        .queue
        .clone()
        .lease(pb::LeaseRequest {})
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    // The image view is served through the imported module (prediction and saliency).
    let view = c
        .images
        .clone()
        .get_image(pb::GetImageRequest {
            image_id: lease.image_id.clone(),
            model_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(view.saliency.len(), (SIDE * SIDE) as usize);
    let mut v = vec![0i8; (SIDE * SIDE) as usize];
    for y in 2..6 {
        for x in 2..6 {
            v[(y * SIDE + x) as usize] = 1;
        }
    }
    let pid = c
        .queue
        .clone()
        .submit(pb::SubmitRequest {
            lease_id: lease.lease_id,
            mask: Some(rle::encode(SIDE, SIDE, &v)),
            idempotency_key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .proposal_id;
    wait_status(&store, &pid, &["ready"], Duration::from_secs(120)).await;
    mp_e2e::commit(&c, &pid).await;
    let p = wait_status(&store, &pid, &["committed"], Duration::from_secs(120)).await;
    assert_eq!(p.committed_version, 2);

    let out = d.join("export");
    let o = mp(&[
        "export",
        "model",
        "--version",
        "2",
        "--redis-url",
        &url,
        "--checkpoints",
        ckp,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The engine's logits of v2 on normalised input against PyTorch's on both files.
    let v1 = Model::load(&ck.join("v1.safetensors"), Device::Cpu).unwrap();
    let v2 = Model::load(&ck.join("v2.safetensors"), Device::Cpu).unwrap();
    tch::manual_seed(3);
    let x = Tensor::rand([6, 3, SIDE as i64, SIDE as i64], (Kind::Float, Device::Cpu));
    let (l1, l2) = tch::no_grad(|| (v1.forward_t(&x, false), v2.forward_t(&x, false)));
    assert!(
        (&l1 - &l2).abs().max().double_value(&[]) > 0.0,
        "the commit changed nothing"
    );
    ((x - 0.5) / 0.25).write_npy(d.join("x.npy")).unwrap();
    l2.write_npy(d.join("y.npy")).unwrap();
    let o = Command::new(python())
        .arg(fixture())
        .arg("check")
        .args([&out, &d.join("x.npy"), &d.join("y.npy")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["torchscript", "state_dict"] {
        let diff = r[k].as_f64().unwrap();
        assert!(diff <= 1e-5, "{k}: max abs diff {diff} ({r})");
    }
}
