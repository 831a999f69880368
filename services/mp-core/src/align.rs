//! Alignment between the model's saliency and human judgement (thesis eq. 6.1), the human
//! prior learnt from committed marks, and review-queue priority.

use crate::data::{Mask, GREEN, RED};
use crate::error::{CoreError, Result};

/// What eq. 6.1 divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalisation {
    /// By the marked pixels (default): small marks still span [-1, 1].
    Marked,
    /// By all pixels |I| (the thesis's form).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlignConfig {
    /// Share of pixels, by |G|, the model counts as salient (S_m): the top decile by default.
    pub top_fraction: f64,
    pub normalisation: Normalisation,
}

impl Default for AlignConfig {
    fn default() -> Self {
        AlignConfig {
            top_fraction: 0.1,
            normalisation: Normalisation::Marked,
        }
    }
}

/// The model's salient set S_m: the `top_fraction` of pixels with the largest |map|
/// (at least one pixel; ties broken by position).
pub fn salient_pixels(map: &[f32], top_fraction: f64) -> Vec<bool> {
    let k = ((map.len() as f64 * top_fraction).round() as usize).clamp(1, map.len().max(1));
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| map[b].abs().total_cmp(&map[a].abs()).then(a.cmp(&b)));
    let mut s = vec![false; map.len()];
    order.iter().take(k).for_each(|&i| s[i] = true);
    s
}

/// A = (|S_m∩S_h| + |N_m∩N_h|)/D − |(S_m∩N_h) ∪ (N_m∩S_h)|/D with S_h = green, N_h = red.
/// `None` when the mask marks nothing (or sizes differ, or the map is not finite).
pub fn alignment(map: &[f32], mask: &Mask, cfg: &AlignConfig) -> Option<f64> {
    if map.len() != mask.values.len() || map.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let s_m = salient_pixels(map, cfg.top_fraction);
    let (mut agree, mut disagree, mut marked) = (0usize, 0usize, 0usize);
    for (&salient, &m) in s_m.iter().zip(&mask.values) {
        match (salient, m) {
            (true, GREEN) | (false, RED) => agree += 1,
            (true, RED) | (false, GREEN) => disagree += 1,
            _ => continue,
        }
        marked += 1;
    }
    if marked == 0 {
        return None;
    }
    let d = match cfg.normalisation {
        Normalisation::Marked => marked,
        Normalisation::All => map.len(),
    } as f64;
    Some((agree as f64 - disagree as f64) / d)
}

/// Per-class and global mean red / green maps of the marks committed so far.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HumanPrior {
    pub width: usize,
    pub height: usize,
    red: Vec<Vec<f32>>,
    green: Vec<Vec<f32>>,
    count: Vec<usize>,
}

impl HumanPrior {
    pub fn new(classes: usize, width: usize, height: usize) -> Self {
        let z = vec![0f32; width * height];
        HumanPrior {
            width,
            height,
            red: vec![z.clone(); classes],
            green: vec![z; classes],
            count: vec![0; classes],
        }
    }

    pub fn marks(&self) -> usize {
        self.count.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.marks() == 0
    }

    pub fn add(&mut self, class: usize, mask: &Mask) -> Result<()> {
        if class >= self.count.len() {
            return Err(CoreError::invalid(format!("class {class} out of range")));
        }
        if (mask.width, mask.height) != (self.width, self.height) {
            return Err(CoreError::invalid(format!(
                "mask is {}x{}, the prior {}x{}",
                mask.width, mask.height, self.width, self.height
            )));
        }
        for (i, &v) in mask.values.iter().enumerate() {
            match v {
                RED => self.red[class][i] += 1.0,
                GREEN => self.green[class][i] += 1.0,
                _ => {}
            }
        }
        self.count[class] += 1;
        Ok(())
    }

    /// Mean red and green maps for one class, or over all classes with `None`.
    pub fn mean_maps(&self, class: Option<usize>) -> Option<(Vec<f32>, Vec<f32>)> {
        let classes: Vec<usize> = match class {
            Some(c) if c < self.count.len() => vec![c],
            Some(_) => return None,
            None => (0..self.count.len()).collect(),
        };
        let n: usize = classes.iter().map(|&c| self.count[c]).sum();
        if n == 0 {
            return None;
        }
        let mut r = vec![0f32; self.width * self.height];
        let mut g = r.clone();
        for c in classes {
            for i in 0..r.len() {
                r[i] += self.red[c][i];
                g[i] += self.green[c][i];
            }
        }
        r.iter_mut()
            .chain(g.iter_mut())
            .for_each(|v| *v /= n as f32);
        Some((r, g))
    }

    /// The predicted mask for an image of `class`: the class's own prior once it has
    /// `min_class_marks` marks, the global prior before. A pixel is red (green) where more
    /// than `threshold` of the marks had it red (green); red wins.
    pub fn predict(&self, class: usize, min_class_marks: usize, threshold: f32) -> Option<Mask> {
        let use_class = self
            .count
            .get(class)
            .is_some_and(|&n| n >= min_class_marks.max(1));
        let (r, g) = self.mean_maps(if use_class { Some(class) } else { None })?;
        let values = r
            .iter()
            .zip(&g)
            .map(|(&r, &g)| {
                if r > threshold {
                    RED
                } else if g > threshold {
                    GREEN
                } else {
                    0
                }
            })
            .collect();
        Some(Mask {
            width: self.width,
            height: self.height,
            values,
        })
    }

    /// Red where more than `threshold` of all marks had red (0 = the union): what mark
    /// propagation applies to unmarked images.
    pub fn global_red_mask(&self, threshold: f32) -> Option<Mask> {
        let (r, _) = self.mean_maps(None)?;
        Some(Mask {
            width: self.width,
            height: self.height,
            values: r
                .iter()
                .map(|&v| if v > threshold { RED } else { 0 })
                .collect(),
        })
    }
}

/// Why an image got its priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityBasis {
    /// Alignment against the image's own marks.
    OwnMarks,
    /// Alignment against the suggested mark (learned propagation).
    Suggestion,
    /// Alignment against the human prior's prediction.
    Prior,
    /// No mark anywhere yet: top-1 minus top-2 probability.
    Margin,
}

/// Review-queue priority: lower is reviewed first. Alignment lives in [-1, 1]; the margin
/// fallback in [0, 1] is mapped to [-1, 1] so both scales sort alike.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Priority {
    pub score: f64,
    pub basis: PriorityBasis,
}

/// How the review queue orders images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ordering {
    /// Lowest alignment first (eq. 6.1 against the image's own mark, else its suggested mark,
    /// else the prior), the margin before any mark exists.
    Alignment,
    /// Smallest top-1 minus top-2 probability first (uncertainty sampling), marks ignored.
    Margin,
    /// Uniformly random.
    Random,
}

impl std::str::FromStr for Ordering {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alignment" => Ok(Ordering::Alignment),
            "margin" => Ok(Ordering::Margin),
            "random" => Ok(Ordering::Random),
            _ => Err(CoreError::invalid(format!(
                "unknown ordering {s:?} (alignment, margin, random)"
            ))),
        }
    }
}

impl Ordering {
    pub fn name(&self) -> &'static str {
        match self {
            Ordering::Alignment => "alignment",
            Ordering::Margin => "margin",
            Ordering::Random => "random",
        }
    }
}

/// Top-1 minus top-2 probability mapped to [-1, 1] (lower = less certain).
pub fn margin_score(probs: &[f32]) -> f64 {
    let mut sorted: Vec<f32> = probs.iter().copied().filter(|p| p.is_finite()).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let margin = match sorted.as_slice() {
        [a, b, ..] => (a - b) as f64,
        [a] => *a as f64,
        [] => 0.0,
    };
    2.0 * margin.clamp(0.0, 1.0) - 1.0
}

/// Priority of one image from its saliency map, class probabilities, its own mark if any,
/// its suggested mark if any, and the prior.
pub fn priority(
    map: &[f32],
    probs: &[f32],
    label: usize,
    own: Option<&Mask>,
    suggested: Option<&Mask>,
    prior: Option<&HumanPrior>,
    cfg: &AlignConfig,
) -> Priority {
    if let Some(a) = own.and_then(|m| alignment(map, m, cfg)) {
        return Priority {
            score: a,
            basis: PriorityBasis::OwnMarks,
        };
    }
    if let Some(a) = suggested.and_then(|m| alignment(map, m, cfg)) {
        return Priority {
            score: a,
            basis: PriorityBasis::Suggestion,
        };
    }
    if let Some(a) = prior
        .and_then(|p| p.predict(label, 3, 0.0))
        .and_then(|m| alignment(map, &m, cfg))
    {
        return Priority {
            score: a,
            basis: PriorityBasis::Prior,
        };
    }
    Priority {
        score: margin_score(probs),
        basis: PriorityBasis::Margin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(values: &[i8]) -> Mask {
        Mask::from_values(values.len(), 1, values.to_vec()).unwrap()
    }

    #[test]
    fn alignment_on_hand_computed_masks() {
        // 10 pixels, top decile = pixel 0 only.
        let map = [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let marked = AlignConfig::default();
        let all = AlignConfig {
            normalisation: Normalisation::All,
            ..marked
        };
        // Perfect: green where salient, red where not.
        let m = mask(&[-1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(alignment(&map, &m, &marked), Some(1.0));
        assert_eq!(alignment(&map, &m, &all), Some(0.4));
        // Worst: red where salient, green where not.
        let m = mask(&[1, -1, -1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(alignment(&map, &m, &marked), Some(-1.0));
        assert_eq!(alignment(&map, &m, &all), Some(-0.3));
        // Mixed: 2 agree (green 0, red 1), 2 disagree (green 2, green 3) -> 0.
        let m = mask(&[-1, 1, -1, -1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(alignment(&map, &m, &marked), Some(0.0));
        // 3 agree, 1 disagree over 4 marked -> 0.5; over 10 pixels -> 0.2.
        let m = mask(&[-1, 1, 1, -1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(alignment(&map, &m, &marked), Some(0.5));
        assert_eq!(alignment(&map, &m, &all), Some(0.2));
        // Nothing marked, size mismatch, NaN: no score.
        assert_eq!(alignment(&map, &mask(&[0; 10]), &marked), None);
        assert_eq!(alignment(&map[..9], &m, &marked), None);
        let mut nan = map;
        nan[3] = f32::NAN;
        assert_eq!(alignment(&nan, &m, &marked), None);
        // A larger salient share: top 30 % = pixels 0, 1, 2.
        let map = [9.0, 8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let cfg = AlignConfig {
            top_fraction: 0.3,
            ..marked
        };
        assert_eq!(
            alignment(&map, &mask(&[-1, -1, 1, 1, 1, 0, 0, 0, 0, 0]), &cfg),
            Some(0.6)
        );
    }

    #[test]
    fn prior_predicts_per_class_then_global_and_priority_falls_back_to_margin() {
        let mut p = HumanPrior::new(2, 4, 1);
        assert!(p.is_empty() && p.predict(0, 1, 0.0).is_none());
        p.add(0, &Mask::from_values(4, 1, vec![1, 0, 0, -1]).unwrap())
            .unwrap();
        p.add(1, &Mask::from_values(4, 1, vec![0, 1, 0, 0]).unwrap())
            .unwrap();
        assert!(p.add(2, &Mask::empty(4, 1)).is_err());
        assert!(p.add(0, &Mask::empty(3, 1)).is_err());
        assert_eq!(p.predict(0, 1, 0.0).unwrap().values, vec![1, 0, 0, -1]);
        assert_eq!(p.predict(0, 5, 0.0).unwrap().values, vec![1, 1, 0, -1]);
        assert_eq!(p.predict(0, 5, 0.5).unwrap().values, vec![0, 0, 0, 0]);
        assert_eq!(p.global_red_mask(0.0).unwrap().values, vec![1, 1, 0, 0]);

        let map = [0.0, 0.0, 0.0, 5.0];
        let cfg = AlignConfig {
            top_fraction: 0.25,
            ..Default::default()
        };
        let none = priority(&map, &[0.7, 0.3], 0, None, None, None, &cfg);
        assert_eq!(none.basis, PriorityBasis::Margin);
        assert!((none.score - (2.0 * 0.4 - 1.0)).abs() < 1e-6);
        let with_prior = priority(&map, &[0.7, 0.3], 0, None, None, Some(&p), &cfg);
        assert_eq!(with_prior.basis, PriorityBasis::Prior);
        let own = Mask::from_values(4, 1, vec![0, 0, 0, 1]).unwrap();
        let p_own = priority(&map, &[0.7, 0.3], 0, Some(&own), None, Some(&p), &cfg);
        assert_eq!((p_own.basis, p_own.score), (PriorityBasis::OwnMarks, -1.0));
        // A suggestion comes before the prior: green where the model looks -> aligned.
        let sug = Mask::from_values(4, 1, vec![0, 0, 0, -1]).unwrap();
        let p_sug = priority(&map, &[0.7, 0.3], 0, None, Some(&sug), Some(&p), &cfg);
        assert_eq!((p_sug.basis, p_sug.score), (PriorityBasis::Suggestion, 1.0));
        assert!((margin_score(&[0.2, 0.5, 0.3]) - (2.0 * 0.2 - 1.0)).abs() < 1e-6);
        assert_eq!("random".parse::<Ordering>().unwrap(), Ordering::Random);
        assert!("best".parse::<Ordering>().is_err());
    }
}
