//! How much a decision rests on a small region, before anyone has marked anything.
//!
//! The pixels the saliency map ranks highest — a small share of the image, grown by a
//! pixel — are filled with the image's own per-channel median (its background, for most
//! images), and the drop of the labelled class's probability is measured. A shortcut (a
//! sticker, a ruler, a watermark, a hospital token) is small and decides on its own, so
//! erasing it moves the prediction; the object an expert would paint green is spread out,
//! and losing its few brightest pixels rarely does. Only forward passes and a saliency map
//! are needed: it works on a user's TorchScript model as on the built-in ones, and needs
//! no mark, so it can order the review queue from the first lease on.

use crate::error::{CoreError, Result};
use crate::model::Model;
use tch::{Device, Kind, Tensor};

/// Which pixels are erased.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelianceConfig {
    /// Share of the image's pixels, taken by saliency from the top.
    pub share: f64,
    /// The chosen pixels grown by this many pixels (gradient saliency sits on edges; the
    /// inside of a small object must go too).
    pub grow: usize,
}

impl Default for RelianceConfig {
    fn default() -> Self {
        RelianceConfig {
            share: 0.02,
            grow: 1,
        }
    }
}

/// The pixels (row-major indices of an `h`×`w` map) that `cfg` erases: the top
/// `ceil(share · h · w)` by saliency (ties by index), grown by `cfg.grow` in the 8-neighbourhood.
pub fn erased_pixels(map: &[f32], w: usize, cfg: &RelianceConfig) -> Vec<bool> {
    let n = map.len();
    let mut out = vec![false; n];
    if n == 0 || w == 0 {
        return out;
    }
    let h = n / w;
    let k = ((cfg.share.clamp(0.0, 1.0) * n as f64).ceil() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let key = |i: usize| {
        let v = map[i].abs();
        if v.is_finite() {
            v
        } else {
            0.0
        }
    };
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let g = cfg.grow as i64;
    for &i in &order[..k] {
        let (r, c) = ((i / w) as i64, (i % w) as i64);
        for rr in (r - g).max(0)..=(r + g).min(h as i64 - 1) {
            for cc in (c - g).max(0)..=(c + g).min(w as i64 - 1) {
                out[rr as usize * w + cc as usize] = true;
            }
        }
    }
    out
}

/// `image` (C·H·W, row-major) with the `erase`d pixels set to each channel's median.
pub fn fill_with_median(image: &[f32], channels: usize, erase: &[bool]) -> Vec<f32> {
    let hw = erase.len();
    let mut out = image.to_vec();
    for c in 0..channels {
        let plane = &mut out[c * hw..(c + 1) * hw];
        let mut sorted: Vec<f32> = plane.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            continue;
        }
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted[sorted.len() / 2];
        for (v, &e) in plane.iter_mut().zip(erase) {
            if e {
                *v = median;
            }
        }
    }
    out
}

/// For a batch `x` (N, C, H, W) with labels `y`, the probabilities `probs` of the intact
/// images and their saliency `maps` (H·W each): how much the labelled class's probability
/// falls when the most salient pixels are erased, per image, in [-1, 1] (higher: the
/// decision rests more on a small region).
pub fn reliance(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    probs: &[Vec<f32>],
    maps: &[Vec<f32>],
    cfg: &RelianceConfig,
) -> Result<Vec<f64>> {
    let size = x.size();
    let [n, c, h, w] = size[..] else {
        return Err(CoreError::invalid(
            "reliance needs a batch of shape (N, C, H, W)",
        ));
    };
    let (n, c, hw) = (n as usize, c as usize, (h * w) as usize);
    if probs.len() != n || maps.len() != n || maps.iter().any(|m| m.len() != hw) {
        return Err(CoreError::invalid(
            "reliance needs one probability row and one H·W map per image",
        ));
    }
    let flat = Vec::<f32>::try_from(
        &x.f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .flatten(0, -1),
    )?;
    let labels = Vec::<i64>::try_from(&y.f_to_device(Device::Cpu)?)?;
    let per = c * hw;
    let mut erased = Vec::with_capacity(flat.len());
    for k in 0..n {
        let mask = erased_pixels(&maps[k], w as usize, cfg);
        erased.extend(fill_with_median(&flat[k * per..(k + 1) * per], c, &mask));
    }
    let xe = Tensor::from_slice(&erased)
        .reshape(size.as_slice())
        .to_device(x.device());
    let after = crate::train::predict(model, &xe).f_to_device(Device::Cpu)?;
    (0..n)
        .map(|k| {
            let label = labels[k] as usize;
            let before = probs[k].get(label).copied().unwrap_or(0.0) as f64;
            let now = after.f_double_value(&[k as i64, label as i64])?;
            let d = before - now;
            Ok(if d.is_finite() {
                d.clamp(-1.0, 1.0)
            } else {
                0.0
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_pixels_grown_by_one_are_erased() {
        // 4x4 map, the largest value at (1, 1), then (3, 3).
        let mut map = vec![0.0f32; 16];
        map[5] = 9.0;
        map[15] = 3.0;
        let one = RelianceConfig {
            share: 1.0 / 16.0,
            grow: 0,
        };
        let e = erased_pixels(&map, 4, &one);
        assert_eq!(e.iter().filter(|&&b| b).count(), 1);
        assert!(e[5]);
        let grown = erased_pixels(&map, 4, &RelianceConfig { grow: 1, ..one });
        let idx: Vec<usize> = (0..16).filter(|&i| grown[i]).collect();
        assert_eq!(idx, vec![0, 1, 2, 4, 5, 6, 8, 9, 10]);
        // Two pixels: the second is (3, 3), grown into the corner only.
        let two = erased_pixels(
            &map,
            4,
            &RelianceConfig {
                share: 2.0 / 16.0,
                grow: 1,
            },
        );
        assert_eq!(two.iter().filter(|&&b| b).count(), 9 + 3);
        // A NaN never ranks first.
        map[0] = f32::NAN;
        assert!(!erased_pixels(&map, 4, &one)[0]);
    }

    #[test]
    fn erased_pixels_take_each_channels_median() {
        // Two channels of 3 pixels; erase the middle one.
        let img = [0.1, 0.9, 0.2, 0.5, 0.7, 0.4];
        let out = fill_with_median(&img, 2, &[false, true, false]);
        assert_eq!(out, vec![0.1, 0.2, 0.2, 0.5, 0.5, 0.4]);
    }

    #[test]
    fn one_drop_per_image_in_range_and_bad_shapes_refused() {
        use crate::model::{Arch, ModelSpec};
        let ds = {
            let mut d = crate::data::Dataset::new(vec!["a".into(), "b".into()], 1, 8, 8);
            let mut img = vec![0.0f32; 64];
            img[27] = 1.0;
            d.push(&img, 1, None, "x".into());
            d
        };
        tch::manual_seed(0);
        let model = Model::new(ModelSpec::for_dataset(Arch::SmallCnn, &ds), Device::Cpu).unwrap();
        let (x, y) = ds.batch(&[0], Device::Cpu);
        let (probs, maps) = crate::saliency::probabilities_and_maps(&model, &x, &y).unwrap();
        let d = reliance(&model, &x, &y, &probs, &maps, &RelianceConfig::default()).unwrap();
        assert_eq!(d.len(), 1);
        assert!(d[0].is_finite() && (-1.0..=1.0).contains(&d[0]));
        // Wrong shapes are refused, not a panic.
        assert!(reliance(&model, &x, &y, &probs, &[], &RelianceConfig::default()).is_err());
    }
}
