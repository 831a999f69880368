//! The README's picture of the web client: opens a running gateway's page in headless
//! Chromium, signs in, paints red over the leased image's shortcut (from the project's
//! ground-truth mark) and green across the middle of the digit, and saves a screenshot.
//!
//! ```sh
//! deploy/mp up &   # then, with an expert token:
//! cargo run --release -p mp-e2e --example web_screenshot -- \
//!   http://127.0.0.1:50051 TOKEN ~/.cache/machine-punishment/up/data docs/client-web.png
//! ```
//! It also prints the time from opening the page to the first image.

use mp_e2e::webdriver::{Browser, ENTER};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn wait(b: &Browser, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    b.wait_live(what, Duration::from_secs(60), |_, s| cond(s)).1
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, token, data, out] = &args[..] else {
        eprintln!("usage: web_screenshot ADDR TOKEN DATA_DIR OUT.png");
        std::process::exit(2);
    };
    let b = Browser::start(1200, 800);
    let start = Instant::now();
    b.goto(&format!("{addr}/"));
    wait(&b, "connect screen", |s| s["conn"] == "offline");
    b.keys(token);
    b.keys(ENTER);
    let s = wait(&b, "image", |s| s["image_rect"].is_array());
    println!("time to first image: {} ms", start.elapsed().as_millis());
    let image = s["image_id"].as_str().unwrap().to_string();
    let r: Vec<f64> = s["image_rect"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let at = |x: f64, y: f64| {
        (
            (r[0] + x * r[2]).round() as i64,
            (r[1] + y * r[2]).round() as i64,
        )
    };
    let (class, name) = image.split_once('/').expect("image id class/name");
    let mark = Path::new(data).join(format!("marks/{class}/{name}.png"));
    let img = image::open(&mark).expect("ground-truth mark").to_rgb8();
    let (w, h) = img.dimensions();
    // Red: one stroke along each row of the shortcut.
    for y in 0..h {
        let xs: Vec<u32> = (0..w).filter(|&x| img.get_pixel(x, y)[0] > 127).collect();
        if let (Some(&a), Some(&z)) = (xs.first(), xs.last()) {
            let yy = y as f64 + 0.5;
            b.drag(&[at(a as f64 + 0.5, yy), at(z as f64 + 0.5, yy)]);
        }
    }
    // Green: across the middle of the image, where the digit is.
    b.keys("g");
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    b.drag(&[
        at(cx - 5.0, cy - 3.0),
        at(cx, cy + 1.0),
        at(cx + 5.0, cy - 3.0),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(out, b.screenshot()).expect("writing the screenshot");
    println!("{image}: screenshot in {out}");
}
