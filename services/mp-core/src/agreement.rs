//! How far experts agree on the images several of them marked (project overlap > 1): IoU of
//! their red marks and of their green marks, and a pixel-wise Fleiss' κ over {red, none,
//! green} — per image, per expert pair, per expert (against the others), per class and per
//! day.

use crate::data::{GREEN, RED};
use std::collections::BTreeMap;

/// One expert's mark on one image, as the report needs it.
#[derive(Debug, Clone)]
pub struct MarkInput {
    pub image_id: String,
    pub class: String,
    pub expert: String,
    pub time_ms: u64,
    /// One value per pixel: [`RED`], [`GREEN`] or 0.
    pub values: Vec<i8>,
}

/// Mean agreement over what was measured; `None` where nothing could be (no red pixel in
/// either mark of any pair, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    pub red_iou: Option<f64>,
    pub green_iou: Option<f64>,
    pub kappa: Option<f64>,
    /// Images (or image pairs, for a pair or an expert) behind the figures.
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImageAgreement {
    pub image_id: String,
    pub class: String,
    pub experts: Vec<String>,
    /// Day (UTC, YYYY-MM-DD) of the image's last mark.
    pub day: String,
    pub figures: Figures,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub overall: Figures,
    pub images: Vec<ImageAgreement>,
    /// (expert a, expert b) with a < b.
    pub pairs: Vec<((String, String), Figures)>,
    pub experts: Vec<(String, Figures)>,
    pub classes: Vec<(String, Figures)>,
    pub days: Vec<(String, Figures)>,
}

/// Intersection over union of the pixels holding `value` in both masks; `None` when neither
/// holds any.
pub fn iou(a: &[i8], b: &[i8], value: i8) -> Option<f64> {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        let (p, q) = (x == value, y == value);
        inter += (p && q) as usize;
        union += (p || q) as usize;
    }
    (union > 0).then(|| inter as f64 / union as f64)
}

/// Fleiss' κ of several raters' masks, pixel by pixel, over the categories {red, none,
/// green}. `None` with fewer than two masks, masks of different sizes, or when every pixel
/// of every mask falls in one category (agreement by chance is then total).
pub fn fleiss_kappa(masks: &[&[i8]]) -> Option<f64> {
    let n = masks.len();
    let pixels = masks.first()?.len();
    if n < 2 || pixels == 0 || masks.iter().any(|m| m.len() != pixels) {
        return None;
    }
    let nf = n as f64;
    let mut totals = [0f64; 3];
    let mut p_sum = 0.0;
    for i in 0..pixels {
        let mut counts = [0f64; 3];
        for m in masks {
            counts[match m[i] {
                RED => 0,
                GREEN => 2,
                _ => 1,
            }] += 1.0;
        }
        p_sum += (counts.iter().map(|c| c * c).sum::<f64>() - nf) / (nf * (nf - 1.0));
        for j in 0..3 {
            totals[j] += counts[j];
        }
    }
    let p_bar = p_sum / pixels as f64;
    let pe: f64 = totals
        .iter()
        .map(|t| (t / (pixels as f64 * nf)).powi(2))
        .sum();
    (pe < 1.0 - 1e-12).then(|| (p_bar - pe) / (1.0 - pe))
}

/// The agreement a settlement goes by: Fleiss' κ, or 1 where κ is undefined because every
/// mark puts every pixel in one category (the marks are then identical).
pub fn settlement_kappa(masks: &[&[i8]]) -> f64 {
    fleiss_kappa(masks).unwrap_or(1.0)
}

/// Running means of the three figures.
#[derive(Default)]
struct Acc {
    red: (f64, usize),
    green: (f64, usize),
    kappa: (f64, usize),
    n: usize,
}

impl Acc {
    fn add(&mut self, red: Option<f64>, green: Option<f64>, kappa: Option<f64>) {
        for (acc, v) in [
            (&mut self.red, red),
            (&mut self.green, green),
            (&mut self.kappa, kappa),
        ] {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                acc.0 += v;
                acc.1 += 1;
            }
        }
        self.n += 1;
    }

    fn figures(&self) -> Figures {
        let mean = |(s, k): (f64, usize)| (k > 0).then(|| s / k as f64);
        Figures {
            red_iou: mean(self.red),
            green_iou: mean(self.green),
            kappa: mean(self.kappa),
            n: self.n,
        }
    }
}

/// The day (UTC, YYYY-MM-DD) of a time in milliseconds since the epoch.
pub fn day_of(time_ms: u64) -> String {
    // Days to civil date (H. Hinnant's algorithm).
    let z = (time_ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}")
}

/// The agreement report of `marks`: only images marked by at least two different experts
/// count (an expert's later mark of an image replaces its earlier one); masks of another
/// size than the image's first are left out.
pub fn report(marks: &[MarkInput]) -> Report {
    let mut by_image: BTreeMap<&str, BTreeMap<&str, &MarkInput>> = BTreeMap::new();
    for m in marks {
        let e = by_image.entry(&m.image_id).or_default();
        match e.get(m.expert.as_str()) {
            Some(prev) if prev.time_ms > m.time_ms => {}
            _ => {
                e.insert(&m.expert, m);
            }
        }
    }
    let mut overall = Acc::default();
    let mut pairs: BTreeMap<(String, String), Acc> = BTreeMap::new();
    let mut experts: BTreeMap<String, Acc> = BTreeMap::new();
    let mut classes: BTreeMap<String, Acc> = BTreeMap::new();
    let mut days: BTreeMap<String, Acc> = BTreeMap::new();
    let mut images = Vec::new();
    for (image, by_expert) in by_image {
        let first = by_expert
            .values()
            .next()
            .map(|m| m.values.len())
            .unwrap_or(0);
        let ms: Vec<&MarkInput> = by_expert
            .values()
            .copied()
            .filter(|m| m.values.len() == first && first > 0)
            .collect();
        if ms.len() < 2 {
            continue;
        }
        // The image's IoUs: the means over its pairs.
        let mut pair_means = Acc::default();
        for (i, a) in ms.iter().enumerate() {
            for b in &ms[i + 1..] {
                let (r, g) = (
                    iou(&a.values, &b.values, RED),
                    iou(&a.values, &b.values, GREEN),
                );
                let k = fleiss_kappa(&[&a.values, &b.values]);
                pair_means.add(r, g, None);
                pairs
                    .entry((a.expert.clone(), b.expert.clone()))
                    .or_default()
                    .add(r, g, k);
                experts.entry(a.expert.clone()).or_default().add(r, g, k);
                experts.entry(b.expert.clone()).or_default().add(r, g, k);
            }
        }
        let values: Vec<&[i8]> = ms.iter().map(|m| m.values.as_slice()).collect();
        let kappa = fleiss_kappa(&values);
        let means = pair_means.figures();
        let (r, g) = (means.red_iou, means.green_iou);
        overall.add(r, g, kappa);
        let class = ms[0].class.clone();
        let day = day_of(ms.iter().map(|m| m.time_ms).max().unwrap_or(0));
        classes.entry(class.clone()).or_default().add(r, g, kappa);
        days.entry(day.clone()).or_default().add(r, g, kappa);
        images.push(ImageAgreement {
            image_id: image.to_string(),
            class,
            experts: ms.iter().map(|m| m.expert.clone()).collect(),
            day,
            figures: Figures {
                red_iou: r,
                green_iou: g,
                kappa,
                n: 1,
            },
        });
    }
    let list = |m: BTreeMap<String, Acc>| m.into_iter().map(|(k, a)| (k, a.figures())).collect();
    Report {
        overall: overall.figures(),
        images,
        pairs: pairs.into_iter().map(|(k, a)| (k, a.figures())).collect(),
        experts: list(experts),
        classes: list(classes),
        days: list(days),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(image: &str, expert: &str, values: &[i8]) -> MarkInput {
        MarkInput {
            image_id: image.into(),
            class: image.split('/').next().unwrap().into(),
            expert: expert.into(),
            time_ms: 1_764_201_600_000, // 2025-11-27
            values: values.to_vec(),
        }
    }

    #[test]
    fn iou_and_kappa_by_hand() {
        let a = [1, 1, 0, -1];
        let b = [1, 0, 0, -1];
        assert_eq!(iou(&a, &b, RED), Some(0.5));
        assert_eq!(iou(&a, &b, GREEN), Some(1.0));
        assert_eq!(iou(&[0, 0], &[0, 0], RED), None);
        // Identical masks with more than one category: κ = 1.
        assert!((fleiss_kappa(&[&a, &a, &a]).unwrap() - 1.0).abs() < 1e-12);
        // Wikipedia's worked example would need 14 raters; a small one by hand instead:
        // 2 raters, 4 pixels, a/b above. Per pixel P_i: 1, 0, 1, 1 → P̄ = 0.75.
        // Proportions: red 3/8, none 3/8, green 2/8 → Pe = (9 + 9 + 4) / 64 = 22/64.
        let k = fleiss_kappa(&[&a, &b]).unwrap();
        let pe = 22.0 / 64.0;
        assert!((k - (0.75 - pe) / (1.0 - pe)).abs() < 1e-12, "{k}");
        // Total disagreement below chance is negative.
        assert!(fleiss_kappa(&[&[1, -1], &[-1, 1]]).unwrap() < 0.0);
        // Everything in one category: undefined.
        assert_eq!(fleiss_kappa(&[&[0, 0], &[0, 0]]), None);
        assert_eq!(fleiss_kappa(&[&a]), None);
        assert_eq!(fleiss_kappa(&[&a, &[1, 1]]), None);
    }

    #[test]
    fn report_groups_by_image_pair_expert_class_and_day() {
        let marks = vec![
            mark("cat/1", "ann", &[1, 1, 0, 0]),
            mark("cat/1", "bob", &[1, 1, 0, 0]),
            mark("cat/1", "cy", &[0, 0, 1, 1]),
            mark("dog/1", "ann", &[1, 0, -1, 0]),
            mark("dog/1", "bob", &[1, 0, -1, 0]),
            // One expert only: not in the report.
            mark("dog/2", "ann", &[1, 0, 0, 0]),
        ];
        let r = report(&marks);
        assert_eq!(r.images.len(), 2);
        assert_eq!(r.images[0].experts, vec!["ann", "bob", "cy"]);
        assert_eq!(r.images[0].day, "2025-11-27");
        // cat/1: pairs ann-bob 1, ann-cy 0, bob-cy 0 → 1/3.
        let cat = &r.images[0].figures;
        assert!((cat.red_iou.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(cat.green_iou, None);
        let ab = &r
            .pairs
            .iter()
            .find(|(k, _)| k == &("ann".into(), "bob".into()))
            .unwrap()
            .1;
        assert_eq!((ab.red_iou, ab.green_iou, ab.n), (Some(1.0), Some(1.0), 2));
        let cy = &r.experts.iter().find(|(k, _)| k == "cy").unwrap().1;
        assert_eq!((cy.red_iou, cy.n), (Some(0.0), 2));
        let ann = &r.experts.iter().find(|(k, _)| k == "ann").unwrap().1;
        assert_eq!(ann.n, 3);
        assert!((ann.red_iou.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.classes.len(), 2);
        assert_eq!(r.classes[1].1.red_iou, Some(1.0));
        assert_eq!(r.days, vec![("2025-11-27".to_string(), r.overall)]);
        assert_eq!(r.overall.n, 2);
        assert!((r.overall.red_iou.unwrap() - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_798_761_599_000), "2026-12-31");
    }

    #[test]
    fn settlement_kappa_is_one_for_identical_single_category_marks() {
        let (r, g) = (RED, GREEN);
        let all_red: [&[i8]; 2] = [&[r, r], &[r, r]];
        assert_eq!(settlement_kappa(&all_red), 1.0);
        let two: [&[i8]; 2] = [&[r, g], &[g, r]];
        assert!(settlement_kappa(&two) < 0.0);
    }
}
