//! Decoy-MNIST (Ross et al. 2017, dtak/rrr `decoy_mnist.py`), seeded and deterministic.
//!
//! Every image gets a 4x4 patch in one of the four corners (row side and column side each
//! chosen by a fair coin). Training (and the shortcut-bearing splits): shade
//! `255 - 25 * label` on a 0–255 scale. Test: shade `255 - 25 * r` for a random class `r`, so
//! a model that reads the shade instead of the digit fails. The ground-truth mark of each
//! image is red on the 16 patch pixels and green on the digit's own pixels (value > 0.3).

use crate::data::{Dataset, Mask, ShortcutSplits, GREEN, RED};
use crate::error::{CoreError, Result};
use crate::rng::Rng;

pub const PATCH: usize = 4;
pub const GREEN_THRESHOLD: f32 = 0.3;

/// Which shade rule a split follows.
pub use crate::data::ShortcutRule as ShadeRule;

#[derive(Debug, Clone)]
pub struct DecoyConfig {
    pub seed: u64,
    /// Digits used for training (the rest of the pool minus `n_val` and `n_test`).
    pub n_train: usize,
    /// Held-out digits for tuning and the refinement guard; shaded by `val_rule` (the
    /// training rule by default: a real project's validation data carries its shortcut).
    pub n_val: usize,
    pub n_test: usize,
    pub val_rule: ShadeRule,
}

impl Default for DecoyConfig {
    fn default() -> Self {
        DecoyConfig {
            seed: 0,
            n_train: 7000,
            n_val: 1000,
            n_test: 2000,
            val_rule: ShadeRule::Label,
        }
    }
}

/// The decoy splits and their clean twins (same digits, no patch).
pub type DecoySplits = ShortcutSplits;

/// The patch corner of one image: `(row0, col0)` of its top-left pixel.
pub fn corner(rng: &mut Rng, side: usize) -> (usize, usize) {
    let row0 = if rng.coin() { 0 } else { side - PATCH };
    let col0 = if rng.coin() { 0 } else { side - PATCH };
    (row0, col0)
}

/// Shade in [0, 1] for a class on the 0–255 rule `255 - 25 * class`.
pub fn shade(class: i64) -> f32 {
    (255.0 - 25.0 * class as f32) / 255.0
}

/// Adds the patch to one grayscale image and returns its ground-truth mark.
pub fn decorate(
    image: &mut [f32],
    side: usize,
    label: i64,
    rule: ShadeRule,
    rng: &mut Rng,
) -> Mask {
    let (row0, col0) = corner(rng, side);
    let class = match rule {
        ShadeRule::Label => label,
        ShadeRule::Random => rng.below(10) as i64,
    };
    let value = shade(class);
    let mut mask = Mask::empty(side, side);
    for (i, &v) in image.iter().enumerate() {
        if v > GREEN_THRESHOLD {
            mask.values[i] = GREEN;
        }
    }
    for r in row0..row0 + PATCH {
        for c in col0..col0 + PATCH {
            image[r * side + c] = value;
            mask.values[r * side + c] = RED;
        }
    }
    mask
}

fn decorate_split(clean: &Dataset, rule: ShadeRule, rng: &mut Rng, prefix: &str) -> Dataset {
    let mut out = Dataset::new(clean.classes.clone(), 1, clean.height, clean.width);
    for i in 0..clean.len() {
        let mut img = clean.image(i).to_vec();
        let mark = decorate(&mut img, clean.width, clean.labels[i], rule, rng);
        out.push(
            &img,
            clean.labels[i],
            Some(mark),
            format!("{prefix}-{i:05}"),
        );
    }
    out
}

fn renamed(ds: Dataset, prefix: &str) -> Dataset {
    let mut ds = ds;
    for (i, n) in ds.names.iter_mut().enumerate() {
        *n = format!("{prefix}-{i:05}");
    }
    ds
}

/// Shuffles the digits with `cfg.seed`, splits them into train / val / test and decorates
/// each split. The same seed gives the same bytes.
pub fn decoy_mnist(digits: &Dataset, cfg: &DecoyConfig) -> Result<DecoySplits> {
    if digits.channels != 1 || digits.width != digits.height || digits.width < 2 * PATCH {
        return Err(CoreError::invalid(
            "decoy-mnist needs square grayscale digits of side >= 8",
        ));
    }
    let need = cfg.n_train + cfg.n_val + cfg.n_test;
    if need > digits.len() || cfg.n_train == 0 || cfg.n_test == 0 {
        return Err(CoreError::invalid(format!(
            "decoy-mnist split {}/{}/{} needs {need} digits, {} available",
            cfg.n_train,
            cfg.n_val,
            cfg.n_test,
            digits.len()
        )));
    }
    let mut rng = Rng::new(cfg.seed);
    let order = rng.permutation(digits.len());
    let train_idx = &order[..cfg.n_train];
    let val_idx = &order[cfg.n_train..cfg.n_train + cfg.n_val];
    let test_idx = &order[cfg.n_train + cfg.n_val..need];
    let clean_train = renamed(digits.subset(train_idx), "train");
    let clean_val = renamed(digits.subset(val_idx), "val");
    let clean_test = renamed(digits.subset(test_idx), "test");
    let train = decorate_split(&clean_train, ShadeRule::Label, &mut rng, "train");
    let val = decorate_split(&clean_val, cfg.val_rule, &mut rng, "val");
    let test = decorate_split(&clean_test, ShadeRule::Random, &mut rng, "test");
    Ok(DecoySplits {
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

    /// 200 synthetic "digits": a blob in the middle whose brightness varies.
    fn fake_digits() -> Dataset {
        let mut ds = Dataset::new((0..10).map(|d| d.to_string()).collect(), 1, 28, 28);
        for i in 0..200 {
            let mut img = vec![0f32; 784];
            for r in 8..20 {
                for c in 10..18 {
                    img[r * 28 + c] = 0.2 + 0.8 * ((r + c + i) % 5) as f32 / 4.0;
                }
            }
            ds.push(&img, (i % 10) as i64, None, format!("d{i}"));
        }
        ds
    }

    fn patch_of(img: &[f32], mask: &Mask) -> ((usize, usize), f32) {
        let first = mask.values.iter().position(|&v| v == RED).unwrap();
        let (r0, c0) = (first / 28, first % 28);
        for r in 0..28 {
            for c in 0..28 {
                let inside = (r0..r0 + 4).contains(&r) && (c0..c0 + 4).contains(&c);
                assert_eq!(mask.values[r * 28 + c] == RED, inside, "red at {r},{c}");
            }
        }
        assert!(r0 == 0 || r0 == 24, "row corner");
        assert!(c0 == 0 || c0 == 24, "column corner");
        ((r0, c0), img[first])
    }

    #[test]
    fn follows_shade_and_position_rules_and_is_deterministic() {
        let digits = fake_digits();
        let cfg = DecoyConfig {
            seed: 11,
            n_train: 120,
            n_val: 30,
            n_test: 50,
            val_rule: ShadeRule::Random,
        };
        let s = decoy_mnist(&digits, &cfg).unwrap();
        let mut corners = std::collections::HashSet::new();
        for i in 0..s.train.len() {
            let mask = s.train.marks[i].as_ref().unwrap();
            let (pos, value) = patch_of(s.train.image(i), mask);
            corners.insert(pos);
            assert_eq!(mask.red_count(), 16);
            assert!((value - shade(s.train.labels[i])).abs() < 1e-6);
            // The rest of the image is the clean digit; green is exactly its bright pixels.
            for (k, (&a, &b)) in s
                .train
                .image(i)
                .iter()
                .zip(s.clean_train.image(i))
                .enumerate()
            {
                if mask.values[k] != RED {
                    assert_eq!(a, b);
                    assert_eq!(mask.values[k] == GREEN, b > GREEN_THRESHOLD);
                }
            }
        }
        assert_eq!(corners.len(), 4, "all four corners occur");
        // Test shades are not tied to the label.
        let mismatched = (0..s.test.len())
            .filter(|&i| {
                let (_, v) = patch_of(s.test.image(i), s.test.marks[i].as_ref().unwrap());
                (v - shade(s.test.labels[i])).abs() > 1e-6
            })
            .count();
        assert!(mismatched > s.test.len() / 2, "{mismatched}");
        let again = decoy_mnist(&digits, &cfg).unwrap();
        assert_eq!(again.train.images, s.train.images);
        assert_eq!(again.test.images, s.test.images);
        let other = decoy_mnist(&digits, &DecoyConfig { seed: 12, ..cfg }).unwrap();
        assert_ne!(other.train.images, s.train.images);
    }

    #[test]
    fn refuses_a_split_larger_than_the_pool() {
        let err = decoy_mnist(&fake_digits(), &DecoyConfig::default()).unwrap_err();
        assert!(err.to_string().contains("10000 digits"), "{err}");
    }
}
