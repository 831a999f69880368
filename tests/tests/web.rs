//! The web client (mp-client compiled to WebAssembly) in a real headless Chromium, against
//! a real gateway serving its bundle and gRPC-web, a redis-server and a refinement worker.
//! Input goes in as a person's pointer and keys on the canvas (WebDriver actions); the page
//! says what it shows in its live region (`#mp-status`), and the assertions read that and
//! what the server stored.
//!
//! Needs `chromium` and `chromedriver` (`deploy/mp test` installs them) and the bundle
//! (`MP_WEB_DIR`, built by the set-up; built here with `deploy/build-web.sh` if missing).

mod common;

use common::Stack;
use mp_client::app::CanvasXf;
use mp_client::mask::{Brush, MarkLayer};
use mp_client::settings::Settings;
use mp_e2e::webdriver::{Browser, CONTROL, ENTER};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SIDE: u32 = mp_e2e::PROJECT_SIDE;
const WINDOW: (u32, u32) = (1100, 760);

/// The bundle: `MP_WEB_DIR` when it holds one, else built now into the target directory.
fn web_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MP_WEB_DIR").map(PathBuf::from) {
        if d.join("index.html").exists() {
            return d;
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join("mp-web-test-bundle");
    let ok = std::process::Command::new(root.join("deploy/build-web.sh"))
        .env("MP_WEB_DIR", &out)
        .status()
        .expect("running deploy/build-web.sh");
    assert!(ok.success(), "deploy/build-web.sh failed");
    out
}

/// Opens the client, types `token` and Enter; returns the time to the first image.
fn sign_in(b: &Browser, addr: &str, token: &str) -> Duration {
    let start = Instant::now();
    b.goto(&format!("{addr}/"));
    b.wait_live("the connect screen", Duration::from_secs(60), |_, s| {
        s["conn"] == "offline"
    });
    b.keys(token);
    b.keys(ENTER);
    b.wait_live("an image", Duration::from_secs(60), |_, s| {
        s["work"] == "marking" && s["image_rect"].is_array()
    });
    start.elapsed()
}

/// Where the image lies on the page, from the live region.
fn canvas_of(state: &Value) -> CanvasXf {
    let r: Vec<f32> = state["image_rect"]
        .as_array()
        .expect("image_rect")
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let (min, scale) = (egui::pos2(r[0], r[1]), r[2]);
    CanvasXf {
        image_rect: egui::Rect::from_min_size(min, egui::vec2(SIDE as f32, SIDE as f32) * scale),
        scale,
    }
}

/// A bent stroke across the image, in page pixels, and the mark the native client's
/// rasteriser makes of exactly those pointer positions (default brush: red, radius 12).
fn stroke_and_native_mark(xf: &CanvasXf) -> (Vec<(i64, i64)>, Vec<i8>) {
    let path: Vec<(i64, i64)> = [[1.2, 2.5], [3.9, 3.3], [4.6, 5.1], [6.7, 5.4]]
        .iter()
        .map(|&p| {
            let s = xf.to_screen(p);
            (s.x.round() as i64, s.y.round() as i64)
        })
        .collect();
    let radius = Settings::default().radius / xf.scale;
    let img: Vec<[f32; 2]> = path
        .iter()
        .map(|&(x, y)| xf.to_image(egui::pos2(x as f32, y as f32)))
        .collect();
    let mut layer = MarkLayer::new(SIDE, SIDE);
    layer.begin_stroke();
    layer.paint_segment(img[0], img[0], radius, Brush::Red);
    for w in img.windows(2) {
        layer.paint_segment(w[0], w[1], radius, Brush::Red);
    }
    (path, layer.values().to_vec())
}

/// With a 3-second lease, so that the page's heartbeats must keep it while the expert draws.
#[test]
fn a_browser_marks_submits_and_commits_and_the_mark_is_the_stroke() {
    let s = Stack::start_serving(3_000, true, Some(web_dir()));
    let store = s.store();
    let token = s.expert("web-ada");
    let b = Browser::start(WINDOW.0, WINDOW.1);
    let first_image = sign_in(&b, &s.addr, &token);
    println!(
        "time to first image in the browser: {} ms",
        first_image.as_millis()
    );
    // The token is remembered by the browser for the origin, never put in the URL.
    let url = b.execute("return location.href", json!([]));
    assert!(!url.as_str().unwrap().contains(&token));
    let kept = b.execute(
        "return localStorage.getItem('machine-punishment.client')",
        json!([]),
    );
    assert!(kept.as_str().unwrap_or_default().contains(&token));

    let t = Duration::from_secs(60);
    let (_, st) = b.wait_live("an image", t, |_, s| s["work"] == "marking");
    let image = st["image_id"].as_str().unwrap().to_string();
    let (path, native) = stroke_and_native_mark(&canvas_of(&st));
    assert!(
        native.iter().filter(|&&v| v == 1).count() >= 6,
        "{native:?}"
    );
    b.drag(&path);
    // A second stroke in green, taken back with Ctrl+Z.
    b.keys("g");
    let xf = canvas_of(&st);
    let (a, z) = (xf.to_screen([0.5, 7.5]), xf.to_screen([7.5, 7.5]));
    b.drag(&[(a.x as i64, a.y as i64), (z.x as i64, z.y as i64)]);
    b.chord(&[CONTROL, "z"]);
    // Past the lease's time to live: only the page's heartbeats keep the image.
    std::thread::sleep(Duration::from_millis(4_000));
    let (_, now) = b.wait_live("the image still leased", t, |_, s| s["work"] == "marking");
    assert_eq!(now["lease_id"], st["lease_id"], "the lease changed");
    b.keys(ENTER);
    let (_, st) = b.wait_live("the chooser", t, |_, s| s["work"] == "choosing");
    let proposal_id = st["proposal_id"].as_str().unwrap().to_string();
    // The mark stored is the stroke, pixel for pixel as the native client draws it.
    let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
    let mark = s.rt.block_on(store.mark(&p.mark_id)).unwrap();
    assert_eq!(mark.image_id, image);
    assert_eq!(mark.values, native, "web and native strokes differ");

    b.keys("c");
    b.wait_live("the commit", t, |words, _| words.contains("Committed"));
    let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
    assert!(
        ["committing", "committed"].contains(&p.status.as_str()),
        "{}",
        p.status
    );
    // And the next image comes.
    b.wait_live("the next image", t, |_, s| {
        s["work"] == "marking" && s["image_id"] != json!(image)
    });
    if let Some(out) = std::env::var_os("MP_WEB_SCREENSHOT") {
        std::fs::write(out, b.screenshot()).unwrap();
    }
}

#[test]
fn a_wrong_token_is_shown_on_the_page() {
    let s = Stack::start_serving(60_000, false, Some(web_dir()));
    let b = Browser::start(WINDOW.0, WINDOW.1);
    b.goto(&format!("{}/", s.addr));
    b.wait_live("the connect screen", Duration::from_secs(60), |_, s| {
        s["conn"] == "offline"
    });
    b.keys("not-a-token");
    b.keys(ENTER);
    let (words, st) = b.wait_live("the refusal", Duration::from_secs(30), |w, _| {
        w.contains("refused the token")
    });
    assert_eq!(st["conn"], "offline", "{words}");
}

#[test]
fn a_gateway_restart_mid_session_loses_nothing_and_the_submit_lands_once() {
    let mut s = Stack::start_serving(60_000, false, Some(web_dir()));
    let store = s.store();
    let token = s.expert("web-bo");
    let b = Browser::start(WINDOW.0, WINDOW.1);
    sign_in(&b, &s.addr, &token);
    let t = Duration::from_secs(60);
    let (_, st) = b.wait_live("an image", t, |_, s| s["work"] == "marking");
    let image = st["image_id"].as_str().unwrap().to_string();
    let (path, native) = stroke_and_native_mark(&canvas_of(&st));
    b.drag(&path);
    s.stop_gateway();
    b.keys(ENTER);
    let (words, _) = b.wait_live("the lost connection", t, |_, s| s["conn"] == "down");
    assert!(words.contains("Connection lost"), "{words}");
    std::thread::sleep(Duration::from_millis(500));
    s.start_gateway();
    b.wait_live("the retried submit", t, |_, s| {
        s["conn"] == "up" && ["refining", "choosing"].contains(&s["work"].as_str().unwrap_or(""))
    });
    s.assert_one_mark(&store, &image, native);
}

/// One browser and three simulated experts lease from one queue at once: no image is ever
/// held by two of them.
#[test]
fn a_browser_and_three_other_experts_never_share_an_image() {
    let s = Stack::start_serving(60_000, false, Some(web_dir()));
    let token = s.expert("web-cy");
    let b = Browser::start(WINDOW.0, WINDOW.1);
    sign_in(&b, &s.addr, &token);
    let addr = s.addr.clone();
    let admin = s.admin.clone();
    // Each simulated expert leases, holds the image a moment, and skips, again and again,
    // recording (image, from, to) in ms.
    let others: Vec<_> = (0..3)
        .map(|k| {
            let (addr, admin) = (addr.clone(), admin.clone());
            s.rt.spawn(async move {
                let c = mp_e2e::expert(&addr, &admin, &format!("sim-{k}")).await;
                let mut held = Vec::new();
                for _ in 0..8 {
                    let r = c.queue.clone().lease(mp_proto::v1::LeaseRequest {}).await;
                    let Some(lease) = r.ok().and_then(|r| r.into_inner().lease) else {
                        continue;
                    };
                    let from = mp_store::now_ms();
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let to = mp_store::now_ms();
                    let _ = c
                        .queue
                        .clone()
                        .skip(mp_proto::v1::SkipRequest {
                            lease_id: lease.lease_id.clone(),
                        })
                        .await;
                    held.push((lease.image_id, from, to));
                }
                held
            })
        })
        .collect();
    // Meanwhile the browser's expert skips (S) through images, noting each one shown.
    let mut shown: Vec<(String, u64, u64)> = Vec::new();
    let t = Duration::from_secs(60);
    for _ in 0..5 {
        let (_, st) = b.wait_live("an image", t, |_, s| s["work"] == "marking");
        let image = st["image_id"].as_str().unwrap().to_string();
        let from = mp_store::now_ms();
        std::thread::sleep(Duration::from_millis(200));
        // Still held until the skip goes out.
        shown.push((image.clone(), from, mp_store::now_ms()));
        b.keys("s");
        b.wait_live("the skip", t, |_, s| s["image_id"] != json!(image));
    }
    let mut all: Vec<(usize, String, u64, u64)> =
        shown.into_iter().map(|(i, a, z)| (0, i, a, z)).collect();
    for (k, h) in others.into_iter().enumerate() {
        for (i, a, z) in s.rt.block_on(h).unwrap() {
            all.push((k + 1, i, a, z));
        }
    }
    assert!(all.len() >= 10, "too few leases: {all:?}");
    for x in &all {
        for y in &all {
            if x.0 != y.0 && x.1 == y.1 {
                // Inside each holder's window the image was theirs alone.
                assert!(
                    x.3 <= y.2 || y.3 <= x.2,
                    "image {} shown to {} and {} at once",
                    x.1,
                    x.0,
                    y.0
                );
            }
        }
    }
}

/// Without a browser: the page, its files and gRPC-web on the gateway's one port, nothing
/// outside the bundle, and a gateway without a bundle that says how to build one.
#[test]
fn the_gateway_serves_the_bundle_beside_grpc() {
    let dir = web_dir();
    let s = Stack::start_serving(60_000, false, Some(dir.clone()));
    let http = reqwest::blocking::Client::new();
    let page = http.get(format!("{}/", s.addr)).send().unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("connect-src 'self'"));
    assert!(page.text().unwrap().contains("mp-canvas"));
    // The module, compressed for a browser that accepts gzip, plain for one that does not.
    let gz = http
        .get(format!("{}/mp_client_bg.wasm", s.addr))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(gz.headers()["content-type"], "application/wasm");
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    let raw = http
        .get(format!("{}/mp_client_bg.wasm", s.addr))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(&raw[..4], b"\0asm");
    assert_eq!(
        raw.len() as u64,
        std::fs::metadata(dir.join("mp_client_bg.wasm"))
            .unwrap()
            .len()
    );
    // Nothing but plain names in the bundle directory (a two-segment path is a gRPC one:
    // tonic answers it as an unknown method).
    // Sent as raw HTTP/1.1, so that no client normalises the path first.
    let raw_get = |path: &str| -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(s.addr.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    };
    for bad in [
        "/..%2fCargo.toml",
        "/%2e%2e",
        "/%2e%2e/%2e%2e/Cargo.toml",
        "/../../Cargo.toml",
        "/.stamp",
        "/a/b",
        "/web/index.html",
    ] {
        let answer = raw_get(bad);
        let status = answer.lines().next().unwrap_or_default().to_string();
        let unimplemented = answer.to_ascii_lowercase().contains("grpc-status: 12");
        assert!(
            status.contains(" 404 ") || status.contains(" 400 ") || unimplemented,
            "{bad}: {status}"
        );
        assert!(
            !answer.contains("[workspace]") && !answer.contains("mp-canvas"),
            "{bad}"
        );
    }
    // gRPC-web over HTTP/1.1 on the same port: a call without a token gets its gRPC status.
    let r = http
        .post(format!("{}/mp.v1.StatsService/GetStats", s.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "16", "Unauthenticated");
    drop(s);

    let bare = Stack::start_serving(60_000, false, None);
    let r = http.get(format!("{}/", bare.addr)).send().unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("deploy/build-web.sh"));
}
