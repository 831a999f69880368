//! Counterfactual confound swap: the red region of an image (its own mark, or a suggestion)
//! is erased and the red region of another image of the batch is pasted in its place, the
//! label unchanged. A shortcut that gave the label away now comes with a random label, as it
//! does where the model is deployed; the model sees the confound, but learns that it carries
//! nothing (CAIPI's counterexamples, Teso & Kersting 2019, made from marks instead of
//! hand-built copies). Works on pixels only: any model, any confound the marks outline.

use crate::rng::Rng;

/// Largest share of an image a red region may cover and still be swapped (a suggestion
/// that marks most of the image is not a confound to transplant).
pub const MAX_RED_SHARE: f64 = 0.25;

/// The confound of one image: the bounding box of the largest 8-connected group of red
/// pixels, grown by one pixel (a suggestion that misses an object's rim, or the hole of a
/// ring, still moves the whole object); stray red specks elsewhere are left alone.
struct Region {
    /// Pixel indices (row-major) of the box.
    pixels: Vec<usize>,
    /// The red weight each box pixel carries along (the largest weight of the group).
    weight: f32,
    top: i64,
    left: i64,
}

fn region(marks: &[f32], w: usize) -> Option<Region> {
    let h = marks.len() / w.max(1);
    let mut seen = vec![false; marks.len()];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..marks.len() {
        if seen[start] || marks[start] <= 0.0 {
            continue;
        }
        let mut group = vec![start];
        seen[start] = true;
        let mut k = 0;
        while k < group.len() {
            let (r, c) = ((group[k] / w) as i64, (group[k] % w) as i64);
            for (dr, dc) in [
                (-1, -1),
                (-1, 0),
                (-1, 1),
                (0, -1),
                (0, 1),
                (1, -1),
                (1, 0),
                (1, 1),
            ] {
                let (rr, cc) = (r + dr, c + dc);
                if rr < 0 || cc < 0 || rr >= h as i64 || cc >= w as i64 {
                    continue;
                }
                let q = rr as usize * w + cc as usize;
                if !seen[q] && marks[q] > 0.0 {
                    seen[q] = true;
                    group.push(q);
                }
            }
            k += 1;
        }
        if group.len() > best.len() {
            best = group;
        }
    }
    if best.is_empty() {
        return None;
    }
    let weight = best.iter().map(|&k| marks[k]).fold(0f32, f32::max);
    let top = (best.iter().map(|&k| k / w).min()? as i64 - 1).max(0);
    let left = (best.iter().map(|&k| k % w).min()? as i64 - 1).max(0);
    let bottom = (best.iter().map(|&k| k / w).max()? as i64 + 1).min(h as i64 - 1);
    let right = (best.iter().map(|&k| k % w).max()? as i64 + 1).min(w as i64 - 1);
    let pixels: Vec<usize> = (top..=bottom)
        .flat_map(|r| (left..=right).map(move |c| r as usize * w + c as usize))
        .collect();
    if pixels.len() as f64 > MAX_RED_SHARE * marks.len() as f64 {
        return None;
    }
    Some(Region {
        pixels,
        weight,
        top,
        left,
    })
}

/// Per-channel median of the pixels outside the red region: what an erased confound is
/// filled with (the background, for most images).
fn fill_values(image: &[f32], red: &[usize], channels: usize, hw: usize) -> Vec<f32> {
    let mut is_red = vec![false; hw];
    red.iter().for_each(|&k| is_red[k] = true);
    (0..channels)
        .map(|c| {
            let mut v: Vec<f32> = (0..hw)
                .filter(|&k| !is_red[k])
                .map(|k| image[c * hw + k])
                .collect();
            if v.is_empty() {
                return 0.0;
            }
            let mid = v.len() / 2;
            *v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1
        })
        .collect()
}

/// Swaps confounds within a batch, in place: `x` is (N, C, H, W), `marks` (N, 1, H, W) with
/// red weights > 0. Each image with a confound region (its box at most `MAX_RED_SHARE` of the
/// image) is, with probability `p`, given another such image's box, aligned by the top-left
/// corners, after its own box was filled with its background; the boxes are marked red with
/// their group's weight. Returns how many images were changed.
#[allow(clippy::too_many_arguments)]
pub fn swap_confounds(
    x: &mut [f32],
    marks: &mut [f32],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    p: f64,
    rng: &mut Rng,
) -> usize {
    let hw = height * width;
    let il = channels * hw;
    if p <= 0.0 || x.len() != n * il || marks.len() != n * hw {
        return 0;
    }
    let regions: Vec<Option<Region>> = (0..n)
        .map(|i| region(&marks[i * hw..(i + 1) * hw], width))
        .collect();
    let eligible: Vec<usize> = (0..n).filter(|&i| regions[i].is_some()).collect();
    if eligible.len() < 2 {
        return 0;
    }
    let src_x = x.to_vec();
    let mut changed = 0;
    for &i in &eligible {
        if rng.next_f64() >= p {
            continue;
        }
        // A partner other than i.
        let mut j = eligible[rng.below(eligible.len() - 1)];
        if j == i {
            j = eligible[eligible.len() - 1];
        }
        let (ri, rj) = (
            regions[i].as_ref().expect("eligible"),
            regions[j].as_ref().expect("eligible"),
        );
        let fill = fill_values(&src_x[i * il..(i + 1) * il], &ri.pixels, channels, hw);
        for &k in &ri.pixels {
            for (c, &f) in fill.iter().enumerate() {
                x[i * il + c * hw + k] = f;
            }
            marks[i * hw + k] = marks[i * hw + k].max(ri.weight);
        }
        let (dy, dx) = (ri.top - rj.top, ri.left - rj.left);
        for &k in &rj.pixels {
            let (r, c) = ((k / width) as i64 + dy, (k % width) as i64 + dx);
            if r < 0 || c < 0 || r >= height as i64 || c >= width as i64 {
                continue;
            }
            let t = r as usize * width + c as usize;
            for ch in 0..channels {
                x[i * il + ch * hw + t] = src_x[j * il + ch * hw + k];
            }
            marks[i * hw + t] = marks[i * hw + t].max(rj.weight);
        }
        changed += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: usize = 8;

    /// Two 1x8x8 images: background 0.1, a red 2x2 confound of value 0.9 at (1, 1) in image
    /// 0 and of 0.5 at (5, 5) in image 1; a green pixel at (7, 0) of image 0; a stray red
    /// speck at (7, 7) of image 0.
    fn batch() -> (Vec<f32>, Vec<f32>) {
        let n = S * S;
        let mut x = vec![0.1f32; 2 * n];
        let mut m = vec![0f32; 2 * n];
        for (i, (r0, v)) in [(1usize, 0.9f32), (5, 0.5)].into_iter().enumerate() {
            for r in r0..r0 + 2 {
                for c in r0..r0 + 2 {
                    x[i * n + r * S + c] = v;
                    m[i * n + r * S + c] = 1.0;
                }
            }
        }
        m[7 * S] = -1.0;
        m[7 * S + 7] = 0.6;
        (x, m)
    }

    #[test]
    fn confounds_trade_places_and_stray_specks_stay() {
        let (mut x, mut m) = batch();
        let n = S * S;
        let mut rng = Rng::new(1);
        assert_eq!(swap_confounds(&mut x, &mut m, 2, 1, S, S, 1.0, &mut rng), 2);
        // Image 0: its box (rows and columns 0..4) holds image 1's box, whose confound sat
        // one pixel in: 0.5 at (1..3, 1..3); no 0.9 is left.
        for r in 0..4 {
            for c in 0..4 {
                let want = if (1..3).contains(&r) && (1..3).contains(&c) {
                    0.5
                } else {
                    0.1
                };
                assert_eq!(x[r * S + c], want, "({r}, {c})");
                assert_eq!(m[r * S + c], 1.0, "the box is red");
            }
        }
        assert!(!x[..n].contains(&0.9));
        // Image 1 carries 0.9 in its own box (rows and columns 4..8).
        assert_eq!(x[n + 5 * S + 5], 0.9);
        assert_eq!(x[n + 6 * S + 6], 0.9);
        assert_eq!(x[n], 0.1);
        // The green pixel and the speck outside the boxes are untouched.
        assert_eq!(m[7 * S], -1.0);
        assert_eq!(m[7 * S + 7], 0.6);
    }

    #[test]
    fn nothing_changes_without_two_confounds_or_with_p_zero() {
        let (mut x, mut m) = batch();
        let (x0, m0) = (x.clone(), m.clone());
        let mut rng = Rng::new(2);
        assert_eq!(swap_confounds(&mut x, &mut m, 2, 1, S, S, 0.0, &mut rng), 0);
        assert_eq!((&x, &m), (&x0, &m0));
        // Only one image has a red region.
        m[S * S..].iter_mut().for_each(|v| *v = 0.0);
        let m1 = m.clone();
        assert_eq!(swap_confounds(&mut x, &mut m, 2, 1, S, S, 1.0, &mut rng), 0);
        assert_eq!((x, m), (x0, m1));
        // A red region over half the image is not a confound to move.
        let (mut x, mut m) = batch();
        m[S * S..S * S + 32].iter_mut().for_each(|v| *v = 1.0);
        assert_eq!(swap_confounds(&mut x, &mut m, 2, 1, S, S, 1.0, &mut rng), 0);
    }
}
