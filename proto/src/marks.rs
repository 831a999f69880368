//! Merging several experts' marks of one image into one (a settlement): values per pixel
//! are +1 red ("not here"), −1 green ("look here"), 0 none. Shared by the gateway, which
//! settles, and the clients, which preview the merge for a reviewer.

/// Per-pixel majority: red where more than half the marks are red, green where more than
/// half are green, nothing elsewhere.
pub fn merge_majority(masks: &[&[i8]]) -> Vec<i8> {
    let pixels = masks.iter().map(|m| m.len()).min().unwrap_or(0);
    let half = masks.len() / 2;
    (0..pixels)
        .map(|i| {
            let red = masks.iter().filter(|m| m[i] == 1).count();
            let green = masks.iter().filter(|m| m[i] == -1).count();
            if red > half {
                1
            } else if green > half {
                -1
            } else {
                0
            }
        })
        .collect()
}

/// The cautious merge: red wherever any mark is red (whatever one expert saw as a shortcut
/// is kept away from), green only where every mark is green.
pub fn merge_union_red(masks: &[&[i8]]) -> Vec<i8> {
    let pixels = masks.iter().map(|m| m.len()).min().unwrap_or(0);
    (0..pixels)
        .map(|i| {
            if masks.iter().any(|m| m[i] == 1) {
                1
            } else if !masks.is_empty() && masks.iter().all(|m| m[i] == -1) {
                -1
            } else {
                0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_take_the_majority_or_the_union_of_red() {
        let (r, g) = (1, -1);
        let a = [r, r, g, 0, g];
        let b = [r, 0, g, 0, g];
        let c = [0, 0, g, r, 0];
        let m: [&[i8]; 3] = [&a, &b, &c];
        assert_eq!(merge_majority(&m), vec![r, 0, g, 0, g]);
        assert_eq!(merge_union_red(&m), vec![r, r, g, r, 0]);
        let same: [&[i8]; 2] = [&a, &a];
        assert_eq!(merge_majority(&same), a.to_vec());
        // Two raters who disagree: neither colour has a majority of two.
        let two: [&[i8]; 2] = [&[r, g], &[g, r]];
        assert_eq!(merge_majority(&two), vec![0, 0]);
    }
}
