//! # Layout
//! End-to-end tests of the whole product live in `tests/`; this library holds the shared
//! fixtures: a small shortcut dataset that a classifier learns the wrong way.

use mp_core::data::{Dataset, Mask, RED};
use mp_core::rng::Rng;

/// Side of the fixture images.
pub const SIDE: usize = 14;

/// Four classes told apart by where a faint, noisy bar lies (the real cue). With `shortcut`,
/// a bright 3x3 patch in the top-left corner has a shade that encodes the label; without it,
/// the shade is random. Every image carries its ground-truth mark: red on the patch.
pub fn shortcut_dataset(n: usize, shortcut: bool, seed: u64) -> Dataset {
    let classes = (0..4).map(|c| c.to_string()).collect();
    let mut ds = Dataset::new(classes, 1, SIDE, SIDE);
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let label = (i % 4) as i64;
        let mut img: Vec<f32> = (0..SIDE * SIDE)
            .map(|_| 0.4 * rng.next_f64() as f32)
            .collect();
        let row = 4 + 2 * label as usize + rng.below(2);
        let col = 3 + rng.below(5);
        for c in col..col + 5 {
            img[row * SIDE + c] += 0.4;
        }
        let shade_class = if shortcut { label } else { rng.below(4) as i64 };
        let shade = 0.3 + 0.2 * shade_class as f32;
        let mut mask = Mask::empty(SIDE, SIDE);
        for r in 0..3 {
            for c in 0..3 {
                img[r * SIDE + c] = shade;
                mask.values[r * SIDE + c] = RED;
            }
        }
        ds.push(&img, label, Some(mask), format!("s{i}"));
    }
    ds
}
