//! Rendering saliency for people: |G| normalised by its 99th percentile, coloured with an
//! inferno-like colormap and alpha-blended over the image; before/after panels.

use crate::data::{Mask, GREEN, RED};
use image::{Rgb, RgbImage};

/// The value at quantile `q` in [0, 1] of the finite entries of `map` (0 when none).
pub fn percentile(map: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = map.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    v[k]
}

/// |map| / its 99th percentile, clipped to [0, 1]; an all-zero map stays zero.
pub fn normalise(map: &[f32]) -> Vec<f32> {
    let abs: Vec<f32> = map
        .iter()
        .map(|v| if v.is_finite() { v.abs() } else { 0.0 })
        .collect();
    let mut p = percentile(&abs, 0.99);
    if p <= 0.0 {
        p = abs.iter().copied().fold(0.0, f32::max);
    }
    if p <= 0.0 {
        return vec![0.0; abs.len()];
    }
    abs.iter().map(|v| (v / p).min(1.0)).collect()
}

const INFERNO: [[f32; 3]; 6] = [
    [0.0, 0.0, 4.0],
    [66.0, 10.0, 104.0],
    [147.0, 38.0, 103.0],
    [221.0, 81.0, 58.0],
    [252.0, 165.0, 10.0],
    [252.0, 255.0, 164.0],
];

/// Colour of a value in [0, 1].
pub fn colormap(v: f32) -> [u8; 3] {
    let t = v.clamp(0.0, 1.0) * (INFERNO.len() - 1) as f32;
    let i = (t.floor() as usize).min(INFERNO.len() - 2);
    let f = t - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (INFERNO[i][c] * (1.0 - f) + INFERNO[i + 1][c] * f).round() as u8;
    }
    out
}

/// An image (C, H, W in [0, 1]) as RGB pixels.
pub fn image_rgb(pixels: &[f32], channels: usize, width: usize, height: usize) -> RgbImage {
    let hw = width * height;
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        if channels == 1 {
            let g = q(pixels[i]);
            Rgb([g, g, g])
        } else {
            Rgb([q(pixels[i]), q(pixels[hw + i]), q(pixels[2 * hw + i])])
        }
    })
}

/// The saliency map coloured and blended over the image with opacity `alpha`.
pub fn overlay(base: &RgbImage, map: &[f32], alpha: f32) -> RgbImage {
    let norm = normalise(map);
    let w = base.width();
    RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let i = (y * w + x) as usize;
        let c = colormap(norm[i]);
        let p = base.get_pixel(x, y);
        let mut o = [0u8; 3];
        for k in 0..3 {
            o[k] = (p[k] as f32 * (1.0 - alpha) + c[k] as f32 * alpha).round() as u8;
        }
        Rgb(o)
    })
}

/// Marks painted over the image: red and green at opacity `alpha`.
pub fn mark_overlay(base: &RgbImage, mask: &Mask, alpha: f32) -> RgbImage {
    let w = base.width();
    RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let p = base.get_pixel(x, y);
        let tint = match mask.values[(y * w + x) as usize] {
            RED => Some([230.0, 30.0, 30.0]),
            GREEN => Some([30.0, 200.0, 60.0]),
            _ => None,
        };
        match tint {
            Some(t) => Rgb([
                (p[0] as f32 * (1.0 - alpha) + t[0] * alpha) as u8,
                (p[1] as f32 * (1.0 - alpha) + t[1] * alpha) as u8,
                (p[2] as f32 * (1.0 - alpha) + t[2] * alpha) as u8,
            ]),
            None => *p,
        }
    })
}

/// Nearest-neighbour upscale by an integer factor.
pub fn upscale(img: &RgbImage, factor: u32) -> RgbImage {
    let f = factor.max(1);
    RgbImage::from_fn(img.width() * f, img.height() * f, |x, y| {
        *img.get_pixel(x / f, y / f)
    })
}

/// Panels side by side with a gap of `gap` pixels on a dark background.
pub fn hstack(panels: &[RgbImage], gap: u32) -> RgbImage {
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(1);
    let w =
        panels.iter().map(|p| p.width()).sum::<u32>() + gap * panels.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(w.max(1), h, Rgb([24, 24, 28]));
    let mut x0 = 0;
    for p in panels {
        image::imageops::overlay(&mut out, p, x0 as i64, 0);
        x0 += p.width() + gap;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_uses_the_99th_percentile_and_survives_degenerate_maps() {
        let mut map: Vec<f32> = (0..200).map(|i| i as f32).collect();
        map[199] = 1e6; // one outlier must not wash the map out
        let n = normalise(&map);
        assert_eq!(n[199], 1.0);
        assert!(n[100] > 0.4 && n[100] < 0.6, "{}", n[100]);
        assert!(normalise(&[0.0; 9]).iter().all(|&v| v == 0.0));
        assert!(normalise(&[f32::NAN, 1.0]).iter().all(|v| v.is_finite()));
        assert_eq!(colormap(0.0), [0, 0, 4]);
        assert_eq!(colormap(1.0), [252, 255, 164]);
    }

    #[test]
    fn overlay_blends_and_panels_stack() {
        let base = image_rgb(&[0.0, 1.0, 0.5, 0.25], 1, 2, 2);
        let o = overlay(&base, &[0.0, 0.0, 0.0, 1.0], 1.0);
        assert_eq!(o.get_pixel(1, 1).0, colormap(1.0));
        assert_eq!(overlay(&base, &[0.0, 0.0, 0.0, 1.0], 0.0), base);
        let s = hstack(&[upscale(&base, 3), o], 2);
        assert_eq!((s.width(), s.height()), (6 + 2 + 2, 6));
        let m = Mask::from_values(2, 2, vec![1, 0, 0, -1]).unwrap();
        let mo = mark_overlay(&base, &m, 1.0);
        assert_eq!(mo.get_pixel(0, 0).0, [230, 30, 30]);
        assert_eq!(mo.get_pixel(1, 0), base.get_pixel(1, 0));
    }
}
