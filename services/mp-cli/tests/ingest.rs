//! `mp project init` on a folder with unreadable files: every one named at once and refused,
//! or left out and listed with `--skip-bad`; the pixels land in the image store, Redis keeps
//! metadata only, and a second process reads them back exactly.

use mp_store::server::RedisServer;
use mp_store::Store;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_names_bad_files_skips_them_on_request_and_stores_pixels_outside_redis() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ds = mp_e2e::shortcut_dataset(40, true, 3);
    mp_core::data::folder::write_split(&data, "train", &ds, false).unwrap();
    let held = mp_e2e::shortcut_dataset(12, false, 4);
    mp_core::data::folder::write_split(&data, "val", &held, false).unwrap();
    let class = &ds.classes[0];
    std::fs::write(data.join(format!("val/{class}/text.jpg")), b"hello").unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let ck = dir.path().join("ck");
    let init = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_mp"))
            .args([
                "project",
                "init",
                "--redis-url",
                &redis.url(),
                "--epochs",
                "1",
            ])
            .arg("--checkpoints")
            .arg(&ck)
            .arg("--data")
            .arg(&data)
            .args(extra)
            .current_dir(dir.path())
            .env("MP_THREADS", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    };
    // A bad file met after the training images were stored: refused, and what was stored
    // is taken back (the folder is streamed, not held in memory).
    let (ok, text) = init(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("text.jpg") && text.contains("--skip-bad"),
        "{text}"
    );
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    assert!(store.project().await.unwrap().is_none());
    assert!(store.image_ids().await.unwrap().is_empty());
    std::fs::write(
        data.join(format!("train/{class}/truncated.png")),
        b"\x89PNG\r\n\x1a\n",
    )
    .unwrap();
    // Refused, naming both files and the way out; nothing stored.
    let (ok, text) = init(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("2 files cannot be read")
            && text.contains("truncated.png")
            && text.contains("text.jpg")
            && text.contains("--skip-bad"),
        "{text}"
    );
    assert!(store.project().await.unwrap().is_none());
    assert!(store.image_ids().await.unwrap().is_empty());
    // Left out and listed.
    let (ok, text) = init(&["--skip-bad"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("left out 2 files") && text.contains("truncated.png"),
        "{text}"
    );
    let ids = store.image_ids().await.unwrap();
    assert_eq!(ids.len(), 40);
    // The pixels are in the image store under the checkpoint directory; Redis has none.
    let images = ck.join("images");
    let pngs = walk(&images);
    assert_eq!(pngs, 40 + 12, "one PNG per stored image");
    let mut c = store.connection();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("mp:img:{}", ids[0]))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!fields.iter().any(|f| f == "pixels"), "{fields:?}");
    // Read back exactly what the folder holds (8-bit gray, same size).
    let want = image::open(data.join("train").join(format!("{}.png", ids[0])))
        .unwrap()
        .to_luma8()
        .into_raw();
    let got = store.image(&ids[0]).await.unwrap();
    assert_eq!((got.width as usize, got.channels), (ds.width, 1));
    assert_eq!(got.pixels, want);

    // The admin token went to a file only its owner reads, not to the output.
    let token_file = dir.path().join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(!text.contains(&token), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let admin = store.authenticate(&token).await.unwrap();
    assert_eq!(admin.role, mp_store::Role::Admin);

    // A second init on the project does nothing: same images, same admin, one version.
    let (ok, text) = init(&["--skip-bad"]);
    assert!(ok && text.contains("nothing to do"), "{text}");
    assert_eq!(store.image_ids().await.unwrap(), ids);
    assert_eq!(store.experts().await.unwrap().len(), 1);
    assert_eq!(store.versions().await.unwrap().len(), 1);

    // --force starts over; with MP_ADMIN_TOKEN the operator's token is the admin's, and
    // neither the output nor the token file carries it.
    let chosen = format!("op_{}", "7".repeat(40));
    let o = Command::new(env!("CARGO_BIN_EXE_mp"))
        .args(["project", "init", "--force", "--skip-bad", "--epochs", "1"])
        .args(["--overlap", "2", "--ordering", "attention"])
        .args(["--redis-url", &redis.url()])
        .arg("--checkpoints")
        .arg(&ck)
        .arg("--data")
        .arg(&data)
        .current_dir(dir.path())
        .env("MP_THREADS", "1")
        .env("MP_ADMIN_TOKEN", &chosen)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && text.contains("--force: deleted"),
        "{text}"
    );
    assert!(!text.contains(&chosen), "{text}");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    assert!(
        store.authenticate(&token).await.is_err(),
        "the old admin is gone"
    );
    assert_eq!(
        store.authenticate(&chosen).await.unwrap().role,
        mp_store::Role::Admin
    );
    assert_eq!(store.experts().await.unwrap().len(), 1);
    assert_eq!(store.image_ids().await.unwrap().len(), 40);
    // `--ordering attention`: the cold start ranks each class's images by the base model's
    // confidence in their label, the most confident of every class first (2·rank/n − 1).
    let queued: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("mp:queue")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut store.connection())
        .await
        .unwrap();
    assert_eq!(queued.len(), 40);
    let ids: Vec<String> = queued.iter().map(|(id, _)| id.clone()).collect();
    let mut by_class: std::collections::BTreeMap<u32, Vec<f64>> = Default::default();
    for ((_, p), r) in queued.iter().zip(store.images(&ids).await.unwrap()) {
        by_class.entry(r.label).or_default().push(*p);
    }
    assert!(by_class.len() > 1, "{by_class:?}");
    for (class, ps) in &by_class {
        let n = ps.len() as f64;
        for (r, p) in ps.iter().enumerate() {
            assert!(
                (p - (2.0 * r as f64 / n - 1.0)).abs() < 1e-9,
                "class {class}: {ps:?}"
            );
        }
    }
    // Overlap: set at init, changed later; out of range refused.
    assert_eq!(store.overlap().await.unwrap(), 2);
    let overlap = |n: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_mp"))
            .args(["project", "overlap", n, "--redis-url", &redis.url()])
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (ok, text) = overlap("3");
    assert!(ok && text.contains("overlap 2 -> 3"), "{text}");
    assert_eq!(store.overlap().await.unwrap(), 3);
    let (ok, text) = overlap("0");
    assert!(!ok && text.contains("overlap must be 1 to 16"), "{text}");
    assert_eq!(store.overlap().await.unwrap(), 3);
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| match e.path().is_dir() {
            true => walk(&e.path()),
            false => usize::from(e.path().extension().is_some_and(|x| x == "png")),
        })
        .sum()
}
