//! Run-length coding of masks (row-major; values in {-1, 0, 1}).

use crate::v1::RleMask;

/// Largest accepted mask side.
pub const MAX_SIDE: u32 = 4096;

/// Why a run-length mask was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RleError {
    Size { width: u32, height: u32 },
    Mismatch { values: usize, lengths: usize },
    TooManyRuns { runs: usize, pixels: u64 },
    ZeroRun { index: usize },
    Value { index: usize, value: i32 },
    Total { got: u64, want: u64 },
}

impl std::fmt::Display for RleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RleError::Size { width, height } => {
                write!(f, "mask size {width}x{height} outside 1..{MAX_SIDE}")
            }
            RleError::Mismatch { values, lengths } => {
                write!(f, "rle has {values} values but {lengths} lengths")
            }
            RleError::TooManyRuns { runs, pixels } => {
                write!(f, "rle has {runs} runs for {pixels} pixels")
            }
            RleError::ZeroRun { index } => write!(f, "rle run {index} has length 0"),
            RleError::Value { index, value } => write!(
                f,
                "rle run {index} has value {value}; only -1, 0, 1 are allowed"
            ),
            RleError::Total { got, want } => {
                write!(f, "rle runs cover {got} pixels, the mask has {want}")
            }
        }
    }
}

impl std::error::Error for RleError {}

/// Encodes row-major values.
pub fn encode(width: u32, height: u32, values: &[i8]) -> RleMask {
    let mut out = RleMask {
        width,
        height,
        values: Vec::new(),
        lengths: Vec::new(),
    };
    for &v in values {
        match (out.values.last(), out.lengths.last_mut()) {
            (Some(&last), Some(len)) if last == v as i32 => *len += 1,
            _ => {
                out.values.push(v as i32);
                out.lengths.push(1);
            }
        }
    }
    out
}

/// Decodes and validates: size within limits, as many values as lengths, no empty run,
/// values in {-1, 0, 1}, runs covering exactly width * height pixels.
pub fn decode(m: &RleMask) -> Result<Vec<i8>, RleError> {
    if m.width == 0 || m.height == 0 || m.width > MAX_SIDE || m.height > MAX_SIDE {
        return Err(RleError::Size {
            width: m.width,
            height: m.height,
        });
    }
    if m.values.len() != m.lengths.len() {
        return Err(RleError::Mismatch {
            values: m.values.len(),
            lengths: m.lengths.len(),
        });
    }
    let want = m.width as u64 * m.height as u64;
    if m.values.len() as u64 > want {
        return Err(RleError::TooManyRuns {
            runs: m.values.len(),
            pixels: want,
        });
    }
    let mut total = 0u64;
    for (i, (&v, &len)) in m.values.iter().zip(&m.lengths).enumerate() {
        if len == 0 {
            return Err(RleError::ZeroRun { index: i });
        }
        if !(-1..=1).contains(&v) {
            return Err(RleError::Value { index: i, value: v });
        }
        total += len as u64;
        if total > want {
            return Err(RleError::Total { got: total, want });
        }
    }
    if total != want {
        return Err(RleError::Total { got: total, want });
    }
    let mut out = Vec::with_capacity(want as usize);
    for (&v, &len) in m.values.iter().zip(&m.lengths) {
        out.extend(std::iter::repeat_n(v as i8, len as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_malformed_case() {
        let v = vec![0i8, 0, 1, 1, 1, -1, 0, 0, 0];
        let m = encode(3, 3, &v);
        assert_eq!(
            (m.values.clone(), m.lengths.clone()),
            (vec![0, 1, -1, 0], vec![2, 3, 1, 3])
        );
        assert_eq!(decode(&m).unwrap(), v);
        let bad = |f: &dyn Fn(&mut RleMask)| {
            let mut b = m.clone();
            f(&mut b);
            decode(&b).unwrap_err()
        };
        assert!(matches!(bad(&|b| b.width = 0), RleError::Size { .. }));
        assert!(matches!(
            bad(&|b| b.height = MAX_SIDE + 1),
            RleError::Size { .. }
        ));
        assert!(matches!(
            bad(&|b| {
                b.values.pop();
            }),
            RleError::Mismatch { .. }
        ));
        assert!(matches!(
            bad(&|b| b.lengths[1] = 0),
            RleError::ZeroRun { index: 1 }
        ));
        assert!(matches!(
            bad(&|b| b.values[2] = 2),
            RleError::Value { index: 2, value: 2 }
        ));
        assert!(matches!(
            bad(&|b| b.lengths[3] = 2),
            RleError::Total { got: 8, want: 9 }
        ));
        assert!(matches!(
            bad(&|b| b.lengths[0] = u32::MAX),
            RleError::Total { .. }
        ));
        let many = RleMask {
            width: 1,
            height: 2,
            values: vec![0, 1, 0],
            lengths: vec![1, 1, 1],
        };
        assert!(matches!(decode(&many), Err(RleError::TooManyRuns { .. })));
        assert!(bad(&|b| b.values[2] = 7).to_string().contains("value 7"));
    }

    use proptest::prelude::*;

    /// Masks of any size up to 64x64 with runs of any length.
    fn mask() -> impl Strategy<Value = (u32, u32, Vec<i8>)> {
        (1u32..=64, 1u32..=64).prop_flat_map(|(w, h)| {
            let n = (w * h) as usize;
            // Long runs as well as noise: a run length per value, cut to the size.
            prop::collection::vec((-1i8..=1, 1usize..=200), 1..=n).prop_map(move |runs| {
                let mut v: Vec<i8> = runs
                    .into_iter()
                    .flat_map(|(x, k)| std::iter::repeat_n(x, k))
                    .take(n)
                    .collect();
                v.resize(n, 0);
                (w, h, v)
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn encode_then_decode_gives_the_mask_back((w, h, v) in mask()) {
            let m = encode(w, h, &v);
            prop_assert_eq!(decode(&m).unwrap(), v.clone());
            // Minimal: no two neighbouring runs share a value, no empty run.
            prop_assert!(m.values.windows(2).all(|p| p[0] != p[1]));
            prop_assert!(m.lengths.iter().all(|&l| l > 0));
            prop_assert_eq!(m.lengths.iter().map(|&l| l as u64).sum::<u64>(), (w * h) as u64);
        }

        #[test]
        fn decode_never_panics_and_whatever_it_accepts_is_consistent(
            w in 0u32..=70, h in 0u32..=70,
            values in prop::collection::vec(-3i32..=3, 0..40),
            lengths in prop::collection::vec(0u32..=5000, 0..40),
        ) {
            let m = RleMask { width: w, height: h, values, lengths };
            if let Ok(v) = decode(&m) {
                prop_assert_eq!(v.len() as u64, w as u64 * h as u64);
                prop_assert!(v.iter().all(|x| (-1..=1).contains(x)));
                // Re-encoding is the canonical form of the same pixels.
                prop_assert_eq!(decode(&encode(w, h, &v)).unwrap(), v);
            }
        }
    }
}
