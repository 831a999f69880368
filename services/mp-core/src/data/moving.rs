//! Shortcuts that move: the MNIST digit at a random place on a larger canvas and, beside it, a
//! small object whose *kind* gives the label away — at a position (and size) that differs in
//! every image, so that "where" the shortcut is carries no information, only "what" it is.
//!
//! - [`MovingKind::Sticker`] (RGB): a coloured sticker (disc or square, 4–7 px) whose hue is
//!   `36° · class`; the digit stays gray. Colour alone gives it away.
//! - [`MovingKind::Shapes`] (grayscale): a small shape (5–9 px) whose kind is the class —
//!   square, disc, triangle up, triangle down, diamond, ring, plus, cross, hollow square,
//!   stripes — drawn at a random gray level like the digit's strokes. Only its form gives it
//!   away: an object, not a colour.
//! - [`MovingKind::Color`] (RGB, 64 px and up): the digit enlarged, in a random colour, on a
//!   textured background (random coloured gratings and grain), with a coloured sticker
//!   (6–11 px) whose hue is `36° · class`: a colour benchmark for real architectures.
//!
//! Training and validation images follow the shortcut rule (kind = label), as a real
//! project's would; test images get the kind of a random class. With
//! [`MovingConfig::shortcut_share`] below 1, only that share of the training and validation
//! images carries an object (a ruler in some dermoscopy photos, not all); the others are
//! their clean twin, marked green on the digit only. Every test image carries one, so the
//! test measures what the object does to the model wherever it appears. The ground-truth mark of an
//! image is red on the object's bounding box and green on the digit's own pixels (> 0.3).
//! Every split has a clean twin (the same digit at the same place, no object).

use crate::data::{Dataset, Mask, ShortcutRule, ShortcutSplits, GREEN, RED};
use crate::error::{CoreError, Result};
use crate::rng::Rng;

pub const GREEN_THRESHOLD: f32 = 0.3;
/// Shape kinds in class order (for [`MovingKind::Shapes`]).
pub const SHAPES: [&str; 10] = [
    "square",
    "disc",
    "triangle-up",
    "triangle-down",
    "diamond",
    "ring",
    "plus",
    "cross",
    "hollow-square",
    "stripes",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovingKind {
    Sticker,
    Shapes,
    Color,
}

impl MovingKind {
    pub fn name(&self) -> &'static str {
        match self {
            MovingKind::Sticker => "moving-sticker",
            MovingKind::Shapes => "moving-shapes",
            MovingKind::Color => "decoy-color",
        }
    }

    fn channels(&self) -> usize {
        match self {
            MovingKind::Sticker | MovingKind::Color => 3,
            MovingKind::Shapes => 1,
        }
    }

    /// Smallest and largest object side in pixels.
    fn sizes(&self) -> (usize, usize) {
        match self {
            MovingKind::Sticker => (4, 7),
            MovingKind::Shapes => (5, 9),
            MovingKind::Color => (6, 11),
        }
    }

    /// The smallest canvas side: the colour benchmark is for real architectures.
    pub fn min_size(&self) -> usize {
        match self {
            MovingKind::Sticker | MovingKind::Shapes => 28,
            MovingKind::Color => 64,
        }
    }

    /// The default canvas side.
    pub fn default_size(&self) -> usize {
        match self {
            MovingKind::Sticker | MovingKind::Shapes => 36,
            MovingKind::Color => 64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct MovingConfig {
    pub kind: MovingKind,
    pub seed: u64,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    /// Side of the square canvas (the 28-pixel digit is placed inside it).
    pub size: usize,
    pub val_rule: ShortcutRule,
    /// Share of training and validation images that carry the object (1: all).
    pub shortcut_share: f64,
}

impl MovingConfig {
    pub fn new(kind: MovingKind) -> Self {
        MovingConfig {
            kind,
            seed: 0,
            n_train: 7000,
            n_val: 1000,
            n_test: 2000,
            size: kind.default_size(),
            val_rule: ShortcutRule::Label,
            shortcut_share: 1.0,
        }
    }
}

/// Bounding box `(row0, col0, height, width)` of the pixels above `t`.
fn bbox(img: &[f32], side: usize, t: f32) -> Option<(usize, usize, usize, usize)> {
    let (mut r0, mut c0, mut r1, mut c1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, &v) in img.iter().enumerate() {
        if v > t {
            let (r, c) = (i / side, i % side);
            r0 = r0.min(r);
            c0 = c0.min(c);
            r1 = r1.max(r);
            c1 = c1.max(c);
        }
    }
    (r0 != usize::MAX).then(|| (r0, c0, r1 - r0 + 1, c1 - c0 + 1))
}

/// Is pixel `(y, x)` of an `s`-pixel box inside shape `kind`? Coordinates are pixel centres
/// in [0, 1].
pub fn shape_contains(kind: usize, y: usize, x: usize, s: usize) -> bool {
    let (u, v) = ((x as f64 + 0.5) / s as f64, (y as f64 + 0.5) / s as f64);
    let (du, dv) = (u - 0.5, v - 0.5);
    let d2 = du * du + dv * dv;
    let w = 0.5 / s as f64; // half a pixel: thin parts stay at least one pixel wide
    const E: f64 = 1e-9; // pixel centres on a boundary count as inside, symmetrically
    match kind {
        0 => true,
        1 => d2 <= 0.25 + E,
        2 => du.abs() <= v / 2.0 + w + E,
        3 => du.abs() <= (1.0 - v) / 2.0 + w + E,
        4 => du.abs() + dv.abs() <= 0.5 + E,
        5 => (0.07..=0.25 + w + E).contains(&d2),
        6 => du.abs() <= 0.08 + w + E || dv.abs() <= 0.08 + w + E,
        7 => (u - v).abs() <= 0.2 + w + E || (u + v - 1.0).abs() <= 0.2 + w + E,
        8 => du.abs().max(dv.abs()) >= 0.3 - w - E,
        _ => ((v * 5.0 + E).floor() as i64) % 2 == 0,
    }
}

/// RGB of hue `36° · class` at full saturation and brightness `value`.
pub fn class_colour(class: usize, value: f32) -> [f32; 3] {
    hue_colour((class % 10) as f32 * 36.0 / 60.0, value)
}

/// RGB of hue `60° · h` (h in [0, 6)) at full saturation and brightness `value`.
fn hue_colour(h: f32, value: f32) -> [f32; 3] {
    let h = h.rem_euclid(6.0);
    let x = 1.0 - ((h % 2.0) - 1.0).abs();
    let (r, g, b) = match h as usize {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    [r * value, g * value, b * value]
}

/// A textured RGB background (3 planes): a muted random colour, two random gratings with a
/// random amplitude per channel, and grain.
fn texture(side: usize, rng: &mut Rng) -> Vec<f32> {
    let hw = side * side;
    let base: Vec<f32> = (0..3).map(|_| 0.2 + 0.3 * rng.next_f64() as f32).collect();
    let mut out = vec![0f32; 3 * hw];
    for k in 0..3 {
        out[k * hw..(k + 1) * hw].fill(base[k]);
    }
    for _ in 0..2 {
        let f = 0.03 + 0.2 * rng.next_f64();
        let th = std::f64::consts::PI * rng.next_f64();
        let ph = 2.0 * std::f64::consts::PI * rng.next_f64();
        let amp: Vec<f32> = (0..3).map(|_| 0.04 + 0.1 * rng.next_f64() as f32).collect();
        let (ct, st) = (th.cos(), th.sin());
        for y in 0..side {
            for x in 0..side {
                let v = (2.0 * std::f64::consts::PI * f * (x as f64 * ct + y as f64 * st) + ph)
                    .sin() as f32;
                for k in 0..3 {
                    out[k * hw + y * side + x] += amp[k] * v;
                }
            }
        }
    }
    for v in out.iter_mut() {
        *v = (*v + 0.06 * (rng.next_f64() as f32 - 0.5)).clamp(0.0, 1.0);
    }
    out
}

/// The `h`×`w` box of a 28-pixel digit at `(br, bc)` resampled (bilinear) to `nh`×`nw`.
fn resample(
    digit: &[f32],
    (br, bc, h, w): (usize, usize, usize, usize),
    nh: usize,
    nw: usize,
) -> Vec<f32> {
    let at = |r: isize, c: isize| -> f32 {
        if r < 0 || c < 0 || r >= h as isize || c >= w as isize {
            0.0
        } else {
            digit[(br + r as usize) * 28 + bc + c as usize]
        }
    };
    let mut out = vec![0f32; nh * nw];
    for y in 0..nh {
        for x in 0..nw {
            let sy = (y as f32 + 0.5) * h as f32 / nh as f32 - 0.5;
            let sx = (x as f32 + 0.5) * w as f32 / nw as f32 - 0.5;
            let (y0, x0) = (sy.floor(), sx.floor());
            let (fy, fx) = (sy - y0, sx - x0);
            let (y0, x0) = (y0 as isize, x0 as isize);
            out[y * nw + x] = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                + fy * ((1.0 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1));
        }
    }
    out
}

/// One decorated image, its clean twin and its ground-truth mark.
struct Made {
    image: Vec<f32>,
    clean: Vec<f32>,
    mark: Mask,
}

fn make(
    digit: &[f32],
    label: i64,
    rule: ShortcutRule,
    share: f64,
    cfg: &MovingConfig,
    rng: &mut Rng,
) -> Made {
    let (s_side, d_side) = (cfg.size, 28usize);
    let (br, bc, dh, dw) = bbox(digit, d_side, 0.1).unwrap_or((0, 0, 1, 1));
    // The colour benchmark enlarges the digit (1.4–2x, kept inside the canvas).
    let (bh, bw, boxed) = if cfg.kind == MovingKind::Color {
        let f = (1.4 + 0.6 * rng.next_f64()).min((s_side - 2) as f64 / dh.max(dw) as f64);
        let (nh, nw) = (
            ((dh as f64 * f) as usize).max(1),
            ((dw as f64 * f) as usize).max(1),
        );
        (nh, nw, resample(digit, (br, bc, dh, dw), nh, nw))
    } else {
        let b: Vec<f32> = (0..dh * dw)
            .map(|i| digit[(br + i / dw) * d_side + bc + i % dw])
            .collect();
        (dh, dw, b)
    };
    // The digit's tight box at a random place on the canvas.
    let r0 = rng.below(s_side - bh + 1);
    let c0 = rng.below(s_side - bw + 1);
    let hw = s_side * s_side;
    let mut gray = vec![0f32; hw];
    for r in 0..bh {
        for c in 0..bw {
            gray[(r0 + r) * s_side + c0 + c] = boxed[r * bw + c];
        }
    }
    let mut mark = Mask::empty(s_side, s_side);
    for (i, &v) in gray.iter().enumerate() {
        if v > GREEN_THRESHOLD {
            mark.values[i] = GREEN;
        }
    }
    // The object: a size, then a position whose box keeps one pixel away from the digit's.
    let (lo, hi) = cfg.kind.sizes();
    let mut size = lo + rng.below(hi - lo + 1);
    let (or, oc) = loop {
        let free =
            |r: usize, c: usize| r + size < r0 || r > r0 + bh || c + size < c0 || c > c0 + bw;
        let spots: Vec<(usize, usize)> = (0..=s_side - size)
            .flat_map(|r| (0..=s_side - size).map(move |c| (r, c)))
            .filter(|&(r, c)| free(r, c))
            .collect();
        if !spots.is_empty() {
            break spots[rng.below(spots.len())];
        }
        if size > 3 {
            size -= 1;
        } else {
            // A digit filling the canvas: overlap is unavoidable.
            break (rng.below(s_side - size + 1), rng.below(s_side - size + 1));
        }
    };
    let class = match rule {
        ShortcutRule::Label => label as usize,
        ShortcutRule::Random => rng.below(10),
    };
    let channels = cfg.kind.channels();
    let mut clean = vec![0f32; channels * hw];
    if cfg.kind == MovingKind::Color {
        // A random colour for the digit, blended over the texture by its stroke intensity.
        let bg = texture(s_side, rng);
        let ink = hue_colour(
            6.0 * rng.next_f64() as f32,
            0.85 + 0.15 * rng.next_f64() as f32,
        );
        for k in 0..3 {
            for (p, &a) in gray.iter().enumerate() {
                clean[k * hw + p] = bg[k * hw + p] * (1.0 - a) + ink[k] * a;
            }
        }
    } else {
        for k in 0..channels {
            clean[k * hw..(k + 1) * hw].copy_from_slice(&gray);
        }
    }
    // Drawn only below 1, so a full share keeps the bytes of every earlier seed.
    if share < 1.0 && rng.next_f64() >= share {
        return Made {
            image: clean.clone(),
            clean,
            mark,
        };
    }
    let mut image = clean.clone();
    match cfg.kind {
        MovingKind::Sticker | MovingKind::Color => {
            let colour = class_colour(class, 0.85 + 0.15 * rng.next_f64() as f32);
            let disc = rng.coin();
            for y in 0..size {
                for x in 0..size {
                    if !disc || shape_contains(1, y, x, size) {
                        let i = (or + y) * s_side + oc + x;
                        for (k, &v) in colour.iter().enumerate() {
                            image[k * hw + i] = v;
                        }
                    }
                }
            }
        }
        MovingKind::Shapes => {
            let level = 0.6 + 0.4 * rng.next_f64() as f32;
            for y in 0..size {
                for x in 0..size {
                    if shape_contains(class, y, x, size) {
                        image[(or + y) * s_side + oc + x] = level;
                    }
                }
            }
        }
    }
    for y in 0..size {
        for x in 0..size {
            mark.values[(or + y) * s_side + oc + x] = RED;
        }
    }
    Made { image, clean, mark }
}

fn split(
    digits: &Dataset,
    idx: &[usize],
    rule: ShortcutRule,
    share: f64,
    cfg: &MovingConfig,
    rng: &mut Rng,
    prefix: &str,
) -> (Dataset, Dataset) {
    let c = cfg.kind.channels();
    let mut out = Dataset::new(digits.classes.clone(), c, cfg.size, cfg.size);
    let mut clean = out.clone();
    for (n, &i) in idx.iter().enumerate() {
        let label = digits.labels[i];
        let m = make(digits.image(i), label, rule, share, cfg, rng);
        let name = format!("{prefix}-{n:05}");
        clean.push(&m.clean, label, None, name.clone());
        out.push(&m.image, label, Some(m.mark), name);
    }
    (out, clean)
}

/// Shuffles the digits with `cfg.seed`, splits them and decorates each split. The same
/// seed gives the same bytes.
pub fn moving_shortcut(digits: &Dataset, cfg: &MovingConfig) -> Result<ShortcutSplits> {
    if digits.channels != 1 || digits.width != 28 || digits.height != 28 {
        return Err(CoreError::invalid(
            "moving shortcuts need 28x28 grayscale digits",
        ));
    }
    let lo = cfg.kind.min_size();
    if !(lo..=256).contains(&cfg.size) {
        return Err(CoreError::invalid(format!(
            "{} is at least {lo}x{lo} and at most 256x256 (canvas {})",
            cfg.kind.name(),
            cfg.size
        )));
    }
    if digits.classes.len() > 10 {
        return Err(CoreError::invalid(
            "moving shortcuts have 10 kinds of object",
        ));
    }
    if !(cfg.shortcut_share > 0.0 && cfg.shortcut_share <= 1.0) {
        return Err(CoreError::invalid(format!(
            "the shortcut share is in (0, 1] (got {})",
            cfg.shortcut_share
        )));
    }
    let need = cfg.n_train + cfg.n_val + cfg.n_test;
    if need > digits.len() || cfg.n_train == 0 || cfg.n_test == 0 {
        return Err(CoreError::invalid(format!(
            "{} split {}/{}/{} needs {need} digits, {} available",
            cfg.kind.name(),
            cfg.n_train,
            cfg.n_val,
            cfg.n_test,
            digits.len()
        )));
    }
    let mut rng = Rng::new(cfg.seed ^ 0x6d6f76);
    let order = rng.permutation(digits.len());
    let (train, clean_train) = split(
        digits,
        &order[..cfg.n_train],
        ShortcutRule::Label,
        cfg.shortcut_share,
        cfg,
        &mut rng,
        "train",
    );
    let (val, clean_val) = split(
        digits,
        &order[cfg.n_train..cfg.n_train + cfg.n_val],
        cfg.val_rule,
        cfg.shortcut_share,
        cfg,
        &mut rng,
        "val",
    );
    let (test, clean_test) = split(
        digits,
        &order[cfg.n_train + cfg.n_val..need],
        ShortcutRule::Random,
        1.0,
        cfg,
        &mut rng,
        "test",
    );
    Ok(ShortcutSplits {
        train,
        val,
        test,
        clean_train,
        clean_val,
        clean_test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 fake digits: a 12x8 block in the middle of a 28x28 image.
    fn fake_digits() -> Dataset {
        let mut ds = Dataset::new((0..10).map(|d| d.to_string()).collect(), 1, 28, 28);
        for i in 0..200 {
            let mut img = vec![0f32; 784];
            for r in 8..20 {
                for c in 10..18 {
                    img[r * 28 + c] = if (r + c + i) % 3 == 0 { 0.2 } else { 0.9 };
                }
            }
            ds.push(&img, (i % 10) as i64, None, format!("d{i}"));
        }
        ds
    }

    fn cfg(kind: MovingKind, n_train: usize, n_val: usize, n_test: usize) -> MovingConfig {
        MovingConfig {
            n_train,
            n_val,
            n_test,
            ..MovingConfig::new(kind)
        }
    }

    fn red_box(m: &Mask) -> (usize, usize, usize, usize) {
        let red: Vec<f32> = m.values.iter().map(|&v| (v == RED) as u8 as f32).collect();
        bbox(&red, m.width, 0.5).expect("a red box")
    }

    #[test]
    fn objects_move_keep_off_the_digit_and_follow_the_rule() {
        for kind in [MovingKind::Sticker, MovingKind::Shapes, MovingKind::Color] {
            let cfg = cfg(kind, 120, 30, 50);
            let s = moving_shortcut(&fake_digits(), &cfg).unwrap();
            let side = kind.default_size();
            assert_eq!(s.train.channels, kind.channels());
            assert_eq!((s.train.width, s.train.height), (side, side));
            let mut places = std::collections::HashSet::new();
            let mut sizes = std::collections::HashSet::new();
            for i in 0..s.train.len() {
                let m = s.train.marks[i].as_ref().unwrap();
                let (r, c, h, w) = red_box(m);
                assert_eq!(h, w, "square box");
                assert_eq!(m.red_count(), h * w, "the red mark is exactly the box");
                places.insert((r, c));
                sizes.insert(h);
                // Outside the box the image is its clean twin; green is the digit there.
                let hw = side * side;
                for p in 0..hw {
                    let inside = m.values[p] == RED;
                    for k in 0..kind.channels() {
                        if !inside {
                            assert_eq!(
                                s.train.image(i)[k * hw + p],
                                s.clean_train.image(i)[k * hw + p]
                            );
                        }
                    }
                    if !inside && kind != MovingKind::Color {
                        assert_eq!(
                            m.values[p] == GREEN,
                            s.clean_train.image(i)[p] > GREEN_THRESHOLD
                        );
                    }
                }
                // The object is drawn (something differs from the clean twin inside the box).
                assert_ne!(s.train.image(i), s.clean_train.image(i));
            }
            assert!(places.len() > 60, "{kind:?}: only {} places", places.len());
            assert!(sizes.len() >= 3, "{kind:?}: sizes {sizes:?}");
            let again = moving_shortcut(&fake_digits(), &cfg).unwrap();
            assert_eq!(again.train.images, s.train.images);
            assert_eq!(again.test.images, s.test.images);
        }
    }

    #[test]
    fn sticker_hue_and_shape_kind_encode_the_label_in_train_and_val_only() {
        // Sticker: the colour of the box's most saturated pixel is the label's hue.
        for kind in [MovingKind::Sticker, MovingKind::Color] {
            sticker_hue_is_the_label_in_train_and_val_only(kind);
        }

        // Shapes: the drawn pixels inside the box are exactly the label's shape.
        let cfg = cfg(MovingKind::Shapes, 100, 50, 50);
        let s = moving_shortcut(&fake_digits(), &cfg).unwrap();
        let kind_of = |ds: &Dataset, i: usize| -> Option<usize> {
            let m = ds.marks[i].as_ref().unwrap();
            let (r, c, n, _) = red_box(m);
            (0..10).find(|&k| {
                (0..n).all(|y| {
                    (0..n).all(|x| {
                        shape_contains(k, y, x, n) == (ds.image(i)[(r + y) * 36 + c + x] > 0.5)
                    })
                })
            })
        };
        for ds in [&s.train, &s.val] {
            for i in 0..ds.len() {
                assert_eq!(kind_of(ds, i), Some(ds.labels[i] as usize), "image {i}");
            }
        }
        let off = (0..s.test.len())
            .filter(|&i| kind_of(&s.test, i) != Some(s.test.labels[i] as usize))
            .count();
        assert!(off > s.test.len() / 2, "{off}");
    }

    fn sticker_hue_is_the_label_in_train_and_val_only(kind: MovingKind) {
        let s = moving_shortcut(&fake_digits(), &cfg(kind, 100, 50, 50)).unwrap();
        let side = kind.default_size();
        let hue_class = |ds: &Dataset, i: usize| -> usize {
            let hw = side * side;
            let m = ds.marks[i].as_ref().unwrap();
            let p = (0..hw)
                .filter(|&p| m.values[p] == RED)
                .max_by(|&a, &b| {
                    let sat = |p: usize| {
                        let v = [ds.image(i)[p], ds.image(i)[hw + p], ds.image(i)[2 * hw + p]];
                        v.iter().cloned().fold(0f32, f32::max)
                            - v.iter().cloned().fold(1f32, f32::min)
                    };
                    sat(a).total_cmp(&sat(b))
                })
                .unwrap();
            let px = [ds.image(i)[p], ds.image(i)[hw + p], ds.image(i)[2 * hw + p]];
            (0..10)
                .min_by(|&a, &b| {
                    let d = |c: usize| {
                        let want = class_colour(c, 1.0);
                        let scale = px.iter().cloned().fold(0f32, f32::max);
                        (0..3).map(|k| (want[k] * scale - px[k]).abs()).sum::<f32>()
                    };
                    d(a).total_cmp(&d(b))
                })
                .unwrap()
        };
        for ds in [&s.train, &s.val] {
            for i in 0..ds.len() {
                assert_eq!(hue_class(ds, i) as i64, ds.labels[i]);
            }
        }
        let off = (0..s.test.len())
            .filter(|&i| hue_class(&s.test, i) as i64 != s.test.labels[i])
            .count();
        assert!(off > s.test.len() / 2, "{kind:?}: {off}");
    }

    #[test]
    fn every_shape_is_distinct_at_every_size() {
        for s in 5..=9 {
            let masks: Vec<Vec<bool>> = (0..10)
                .map(|k| {
                    (0..s * s)
                        .map(|p| shape_contains(k, p / s, p % s, s))
                        .collect()
                })
                .collect();
            for a in 0..10 {
                assert!(masks[a].iter().any(|&v| v), "shape {a} empty at {s}");
                for b in a + 1..10 {
                    assert_ne!(
                        masks[a], masks[b],
                        "{} = {} at size {s}",
                        SHAPES[a], SHAPES[b]
                    );
                }
            }
        }
    }

    #[test]
    fn a_shortcut_share_leaves_the_other_images_clean_and_every_test_image_decorated() {
        let full = moving_shortcut(&fake_digits(), &cfg(MovingKind::Sticker, 120, 30, 50)).unwrap();
        let part = MovingConfig {
            shortcut_share: 0.3,
            ..cfg(MovingKind::Sticker, 120, 30, 50)
        };
        let s = moving_shortcut(&fake_digits(), &part).unwrap();
        let has_red = |m: &Mask| m.values.contains(&RED);
        for (ds, clean, lo, hi) in [
            (&s.train, &s.clean_train, 20, 60),
            (&s.val, &s.clean_val, 3, 18),
        ] {
            let mut decorated = 0;
            for i in 0..ds.len() {
                let m = ds.marks[i].as_ref().unwrap();
                assert!(
                    m.values.contains(&GREEN),
                    "the digit is always marked green"
                );
                if has_red(m) {
                    decorated += 1;
                    assert_ne!(ds.image(i), clean.image(i));
                } else {
                    assert_eq!(ds.image(i), clean.image(i), "no object: the clean twin");
                }
            }
            assert!(
                (lo..=hi).contains(&decorated),
                "{decorated} of {}",
                ds.len()
            );
        }
        assert!(s.test.marks.iter().all(|m| has_red(m.as_ref().unwrap())));
        // A full share draws nothing more: the same bytes as before the option existed.
        let again = MovingConfig {
            shortcut_share: 1.0,
            ..cfg(MovingKind::Sticker, 120, 30, 50)
        };
        let same = moving_shortcut(&fake_digits(), &again).unwrap();
        assert_eq!(same.train.images, full.train.images);
    }

    #[test]
    fn refuses_bad_configs() {
        let d = fake_digits();
        assert!(moving_shortcut(&d, &MovingConfig::new(MovingKind::Sticker)).is_err());
        let small = MovingConfig {
            n_train: 10,
            n_val: 0,
            n_test: 10,
            size: 20,
            ..MovingConfig::new(MovingKind::Shapes)
        };
        assert!(moving_shortcut(&d, &small).is_err());
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let c = MovingConfig {
                shortcut_share: share,
                ..cfg(MovingKind::Sticker, 120, 30, 50)
            };
            assert!(moving_shortcut(&d, &c).is_err(), "share {share}");
        }
    }
}
