//! The image store: pixels in objects (here the local filesystem, as `mp up` uses it),
//! metadata only in Redis, a bounded cache, and bad objects named, never fatal to a batch.

use mp_store::images::{object_key, Shape};
use mp_store::server::RedisServer;
use mp_store::{ImageRecord, ImageStore, ProjectInfo, Store, StoreError};

const SIDE: u32 = 16;

fn record(i: usize) -> ImageRecord {
    ImageRecord {
        id: format!("val:cat/{i:03} with space.png"),
        name: format!("{i:03}"),
        label: (i % 2) as u32,
        width: SIDE,
        height: SIDE,
        channels: 3,
        // Distinct pixels per image, so that a wrong cache entry shows.
        pixels: (0..(SIDE * SIDE * 3) as usize)
            .map(|p| ((p * 31 + i * 97) % 256) as u8)
            .collect(),
    }
}

async fn project(n: usize) -> (tempfile::TempDir, RedisServer, Store, Vec<ImageRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&server.url(), "t").await.unwrap();
    store
        .set_project(&ProjectInfo {
            name: "p".into(),
            classes: vec!["a".into(), "b".into()],
            width: SIDE,
            height: SIDE,
            channels: 3,
            image_store: dir.path().join("images").display().to_string(),
        })
        .await
        .unwrap();
    let recs: Vec<ImageRecord> = (0..n).map(record).collect();
    store.put_held_out("val", &recs).await.unwrap();
    (dir, server, store, recs)
}

#[tokio::test]
async fn pixels_live_in_the_image_store_and_redis_keeps_only_metadata() {
    let (dir, _server, store, recs) = project(12).await;
    // Every image is one PNG under the project's directory, named by the hash of its id.
    for r in &recs {
        let path = dir.path().join("images").join(object_key(&r.id));
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{}", path.display());
    }
    // Redis: no pixels field, and a few dozen bytes per image.
    let mut c = store.connection();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("t:img:{}", recs[0].id))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!fields.contains(&"pixels".to_string()), "{fields:?}");
    let bytes: usize = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("t:img:{}", recs[0].id))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        bytes < 256,
        "{bytes} bytes of Redis for one image's metadata"
    );
    // Read back exactly, alone and in a batch (order kept).
    assert_eq!(store.image(&recs[3].id).await.unwrap(), recs[3]);
    let ids: Vec<String> = recs.iter().rev().map(|r| r.id.clone()).collect();
    let back = store.images(&ids).await.unwrap();
    assert_eq!(back, recs.iter().rev().cloned().collect::<Vec<_>>());
    // A second handle opens the store from the project record, as another node does.
    let other = Store::connect(&_server.url(), "t").await.unwrap();
    assert_eq!(other.image(&recs[5].id).await.unwrap(), recs[5]);
    assert!(other
        .image_store()
        .await
        .unwrap()
        .url()
        .starts_with("file://"));
    // Views per model version live beside the images.
    let images = store.image_store().await.unwrap();
    assert_eq!(images.view(3, &recs[0].id).await.unwrap(), None);
    let view = mp_store::ModelView {
        probabilities: vec![0.25, 0.75],
        saliency: (0..SIDE * SIDE).map(|i| i as f32 / 256.0).collect(),
    };
    images.put_view(3, &recs[0].id, &view).await.unwrap();
    assert_eq!(images.view(3, &recs[0].id).await.unwrap(), Some(view));
    assert_eq!(images.view(4, &recs[0].id).await.unwrap(), None);
}

#[tokio::test]
async fn a_cache_smaller_than_the_working_set_still_serves_the_right_pixels() {
    let (dir, server, _store, recs) = project(40).await;
    let one = (SIDE * SIDE * 3) as usize;
    // Room for 5 of the 40 images.
    let small = ImageStore::open(dir.path().join("images").to_str().unwrap(), 5 * one).unwrap();
    let store = Store::connect(&server.url(), "t")
        .await
        .unwrap()
        .with_image_store(small);
    let mut rng = 12345u64;
    for _ in 0..400 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (rng >> 33) as usize % recs.len();
        assert_eq!(
            store.image(&recs[i].id).await.unwrap().pixels,
            recs[i].pixels
        );
    }
    let (hits, misses, held) = store.image_store().await.unwrap().cache_stats();
    assert!(
        held <= 5 * one,
        "cache holds {held} bytes, bound {}",
        5 * one
    );
    assert!(misses > 40 && hits > 0, "hits {hits} misses {misses}");
    // Whole batches larger than the cache, twice.
    let ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
    for _ in 0..2 {
        assert_eq!(store.images(&ids).await.unwrap(), recs);
    }
}

#[tokio::test]
async fn a_missing_or_corrupt_image_is_named_and_the_rest_of_the_batch_is_served() {
    let (dir, _server, store, recs) = project(10).await;
    let root = dir.path().join("images");
    std::fs::remove_file(root.join(object_key(&recs[2].id))).unwrap();
    std::fs::write(root.join(object_key(&recs[7].id)), b"\x89PNG garbage").unwrap();
    // A PNG of the wrong size is corrupt too.
    let wrong = mp_store::images::encode_png(
        Shape {
            width: 4,
            height: 4,
            channels: 3,
        },
        &[0; 48],
    )
    .unwrap();
    std::fs::write(root.join(object_key(&recs[8].id)), wrong).unwrap();
    let mut ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
    ids.push("val:never/stored".into());
    let (ok, bad) = store.images_lenient(&ids).await.unwrap();
    assert_eq!(ok.len(), 7);
    assert!(ok.iter().all(|r| recs.contains(r)));
    let named: Vec<&str> = bad.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        named,
        [
            "val:never/stored",
            recs[2].id.as_str(),
            recs[7].id.as_str(),
            recs[8].id.as_str()
        ]
    );
    assert!(
        matches!(bad[1].1, StoreError::NotFound(ref m) if m.contains("missing from the image store"))
    );
    assert!(matches!(bad[2].1, StoreError::Corrupt(ref m) if m.contains(&recs[7].id)));
    assert!(matches!(bad[3].1, StoreError::Corrupt(ref m) if m.contains("4x4")));
    // The strict read refuses; the store records what the nodes reported.
    assert!(store.images(&ids).await.is_err());
    store
        .enqueue(&[(recs[2].id.clone(), 0.5), (recs[4].id.clone(), 0.7)])
        .await
        .unwrap();
    store.report_bad_image(&recs[2].id, "gone").await.unwrap();
    // Out of the queue: the next lease is the good image.
    let l = store.lease("e", 60_000).await.unwrap().unwrap();
    assert_eq!(l.image_id, recs[4].id);
    assert!(store.lease("e", 60_000).await.unwrap().is_none());
    assert_eq!(
        store.bad_images().await.unwrap(),
        [(recs[2].id.clone(), "gone".to_string())]
    );
}

#[test]
fn urls_pick_the_backend_and_unknown_schemes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let local = ImageStore::open(dir.path().join("a/b").to_str().unwrap(), 0).unwrap();
    assert!(local.url().starts_with("file://") && dir.path().join("a/b").is_dir());
    // Cloud stores are configured, not contacted, when opened.
    for url in [
        "s3://bucket/project",
        "gs://bucket/project",
        "az://container/project",
    ] {
        std::env::set_var("AZURE_STORAGE_ACCOUNT_NAME", "account");
        let s = ImageStore::open(url, 0);
        assert!(s.is_ok(), "{url}: {s:?}");
    }
    let e = ImageStore::open("ftp://host/x", 0).unwrap_err();
    assert!(e.to_string().contains("ftp"), "{e}");
}
