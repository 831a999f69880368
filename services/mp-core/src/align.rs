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
    /// Least attention on what the suggested mark calls relevant first
    /// ([`attention_share`]: the saliency mass on suggested green minus that on suggested
    /// red); before any suggestion exists, the most confident images of each class first
    /// ([`confidence_ranks`]).
    Attention,
}

impl std::str::FromStr for Ordering {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alignment" => Ok(Ordering::Alignment),
            "margin" => Ok(Ordering::Margin),
            "random" => Ok(Ordering::Random),
            "attention" => Ok(Ordering::Attention),
            _ => Err(CoreError::invalid(format!(
                "unknown ordering {s:?} (alignment, attention, margin, random)"
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
            Ordering::Attention => "attention",
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

/// The cold start of the `attention` ordering, before any suggestion exists: the most
/// confident images of each class first. Where a shortcut agrees with the object, the
/// decision is over-determined and the model is surest; uncertainty sampling (the margin)
/// ranks exactly those images last. `confidence[i]` is image i's probability of its label,
/// `labels[i]` its class; the score is the image's rank within its class as a share of the
/// class, mapped to [-1, 1] (lowest first), so the head of the queue takes every class in
/// turn. A non-finite confidence ranks last in its class.
pub fn confidence_ranks(confidence: &[f64], labels: &[i64]) -> Vec<f64> {
    let key = |i: usize| {
        let c = confidence.get(i).copied().unwrap_or(f64::NAN);
        if c.is_finite() {
            c
        } else {
            f64::NEG_INFINITY
        }
    };
    let mut out = vec![1.0; labels.len()];
    let mut classes: Vec<i64> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    for c in classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        let n = idx.len() as f64;
        for (r, &i) in idx.iter().enumerate() {
            out[i] = 2.0 * r as f64 / n - 1.0;
        }
    }
    out
}

/// Where the model's attention goes, against a suggested mark: the share of the saliency
/// mass Σ|g| that falls on suggested green (grown by one pixel: gradient saliency spreads
/// beside what it reads), minus the share on suggested red weighted by the red confidence;
/// in [-1, 1], low when the model looks at what an expert would paint red, or at anything
/// but what they would paint green. Unlike eq. 6.1, which counts the *marked* pixels the
/// model covers, this counts where the *model's* attention lies, so a suggestion with green
/// only (before any shortcut was marked) already singles out an image whose attention is
/// pulled off the object. `suggested` holds the quantised guidance weights of one image
/// (red > 0, green < 0, magnitude = confidence · 127), row-major with `width` columns.
/// `None` when nothing is suggested, the sizes differ or the map is not finite or all zero.
pub fn attention_share(map: &[f32], width: usize, suggested: &[i8]) -> Option<f64> {
    if width == 0
        || map.len() != suggested.len()
        || !map.len().is_multiple_of(width)
        || suggested.iter().all(|&q| q == 0)
        || map.iter().any(|v| !v.is_finite())
    {
        return None;
    }
    let total: f64 = map.iter().map(|v| v.abs() as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let height = map.len() / width;
    // Green, or beside green (the 3x3 neighbourhood).
    let near_green = |i: usize| {
        let (r, c) = (i / width, i % width);
        (r.saturating_sub(1)..=(r + 1).min(height - 1)).any(|rr| {
            (c.saturating_sub(1)..=(c + 1).min(width - 1)).any(|cc| suggested[rr * width + cc] < 0)
        })
    };
    let (mut on_green, mut on_red) = (0f64, 0f64);
    for (i, (&m, &q)) in map.iter().zip(suggested).enumerate() {
        if q > 0 {
            on_red += m.abs() as f64 * q as f64 / 127.0;
        } else if near_green(i) {
            on_green += m.abs() as f64;
        }
    }
    Some(((on_green - on_red) / total).clamp(-1.0, 1.0))
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
    fn attention_share_follows_the_saliency_mass() {
        // 3x4 image; green on column 0 (grown: columns 0-1), red (confidence 1) on column 3.
        let sug: Vec<i8> = (0..12)
            .map(|i| match i % 4 {
                0 => -127,
                3 => 127,
                _ => 0,
            })
            .collect();
        let on = |cols: &[usize]| -> Vec<f32> {
            (0..12)
                .map(|i| if cols.contains(&(i % 4)) { 1.0 } else { 0.0 })
                .collect()
        };
        // All attention on the object (or right beside it): 1; all on the red: -1.
        assert_eq!(attention_share(&on(&[0]), 4, &sug), Some(1.0));
        assert_eq!(attention_share(&on(&[1]), 4, &sug), Some(1.0));
        assert_eq!(attention_share(&on(&[3]), 4, &sug), Some(-1.0));
        // Off the object, on nothing marked: 0; half object half red: 0.
        assert_eq!(attention_share(&on(&[2]), 4, &sug), Some(0.0));
        assert_eq!(attention_share(&on(&[0, 3]), 4, &sug), Some(0.0));
        // Green only (no shortcut marked yet): attention pulled off the object scores lower.
        let green_only: Vec<i8> = sug.iter().map(|&q| q.min(0)).collect();
        let reads = attention_share(&on(&[0]), 4, &green_only).unwrap();
        let pulled = attention_share(&on(&[0, 3]), 4, &green_only).unwrap();
        assert!(pulled < reads, "{pulled} < {reads}");
        // Red weighted by its confidence.
        let half: Vec<i8> = sug.iter().map(|&q| if q > 0 { 64 } else { q }).collect();
        let s = attention_share(&on(&[3]), 4, &half).unwrap();
        assert!((s + 64.0 / 127.0).abs() < 1e-9, "{s}");
        // Nothing suggested, wrong size, NaN, no attention at all: no score.
        assert_eq!(attention_share(&on(&[0]), 4, &[0; 12]), None);
        assert_eq!(attention_share(&on(&[0])[..8], 4, &sug), None);
        let mut nan = on(&[0]);
        nan[5] = f32::NAN;
        assert_eq!(attention_share(&nan, 4, &sug), None);
        assert_eq!(attention_share(&[0.0; 12], 4, &sug), None);
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
        assert_eq!(
            "attention".parse::<Ordering>().unwrap(),
            Ordering::Attention
        );
        assert!("best".parse::<Ordering>().is_err());
    }

    #[test]
    fn confidence_ranks_take_each_class_in_turn() {
        // Class 0: confidences 0.9, 0.5; class 1: 0.2, 0.99, NaN.
        let conf = [0.9, 0.2, 0.5, 0.99, f64::NAN];
        let labels = [0, 1, 0, 1, 1];
        let r = confidence_ranks(&conf, &labels);
        // Each class's most confident image scores -1 (first), the next 2·rank/n - 1.
        assert_eq!(r[0], -1.0);
        assert_eq!(r[3], -1.0);
        assert_eq!(r[2], 0.0);
        assert!((r[1] - (2.0 / 3.0 - 1.0)).abs() < 1e-12);
        assert!((r[4] - (4.0 / 3.0 - 1.0)).abs() < 1e-12);
        assert!(confidence_ranks(&[], &[]).is_empty());
    }
}
