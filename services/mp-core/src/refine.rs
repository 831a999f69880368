//! The refinement loop (thesis 4.4): from the current model and a marked batch, iterate
//! loss → backward → clip grad norm → step, measure the impact curves, keep the best
//! weights, stop on any configured criterion, and return a [`Proposal`].

use crate::data::{Dataset, Mask};
use crate::error::{CoreError, Result};
use crate::loss::{check_marks, guided_forward, SaliencyLoss};
use crate::model::Model;
use crate::saliency::{impact_shares, maps_to_vecs, saliency_maps, Method};
use crate::train::{evaluate, Eval, OptimizerKind};
use std::time::{Duration, Instant};

/// Every parameter of the loop is configuration (SPEC §2).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RefineConfig {
    pub loss: SaliencyLoss,
    /// Weight of CE on the marked batch (author's code: 0.2).
    pub alpha: f64,
    /// Weight of the saliency loss (author's code: 1).
    pub beta: f64,
    /// Scale the saliency loss so that it starts at the magnitude of CE (author's
    /// normalising scale).
    pub normalise: bool,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub clip_grad_norm: f64,
    /// (d) iteration budget.
    pub max_iterations: usize,
    /// (d) time budget in milliseconds.
    pub time_budget_ms: Option<u64>,
    /// (a) stop when validation loss ≥ this × the loss before refinement.
    pub val_guard: Option<f64>,
    /// (b) stop when the measure `halve_on` names has fallen to half of its start.
    pub halve_saliency: bool,
    pub halve_on: HalveOn,
    /// (c) stop when green-minus-red share has not improved over this many iterations.
    pub plateau_window: Option<usize>,
    /// Iterations run before (b) or (c) may stop the loop (the guard and budgets always may).
    pub min_iterations: usize,
    /// Validation images used for the guard at every iteration (the first N of the
    /// validation set). The proposal's reported validation figures (before and after) are
    /// measured on the whole validation set passed in, like a model version's.
    pub val_images: usize,
    /// The report an expert is shown keeps saliency maps of at most this many pixels a
    /// side (larger images' maps are mean-pooled), so that its JSON in Redis and the
    /// `Proposal` message stay small whatever the image size.
    #[serde(default = "default_report_max_side")]
    pub report_max_side: u32,
    /// … and at most this many impact-curve points (evenly spaced; the first, the best and
    /// the last always kept).
    #[serde(default = "default_report_max_points")]
    pub report_max_points: usize,
}

fn default_report_max_side() -> u32 {
    256
}

fn default_report_max_points() -> usize {
    512
}

/// What criterion (b) halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HalveOn {
    /// The saliency loss (thesis 4.4): with `rrr` it often halves after one step while the
    /// attention has hardly moved.
    SaliencyLoss,
    /// The share of the marked images' attention on red pixels: stops once the model looks
    /// half as much at what the expert marked red.
    RedShare,
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            loss: SaliencyLoss::Rrr,
            alpha: 0.2,
            beta: 1.0,
            normalise: false,
            optimizer: OptimizerKind::Sgd,
            lr: 1e-2,
            clip_grad_norm: 1.0,
            max_iterations: 50,
            time_budget_ms: Some(5_000),
            val_guard: Some(1.2),
            halve_saliency: true,
            halve_on: HalveOn::RedShare,
            plateau_window: Some(3),
            min_iterations: 5,
            val_images: 256,
            report_max_side: default_report_max_side(),
            report_max_points: default_report_max_points(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    ValidationGuard,
    SaliencyHalved,
    Plateau,
    IterationBudget,
    TimeBudget,
}

/// One point of the impact curves (thesis fig. 6.7), measured on the weights of that
/// iteration before its update.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImpactPoint {
    pub iteration: usize,
    pub share_red: f64,
    pub share_green: f64,
    pub saliency_loss: f64,
    pub ce: f64,
    pub val_loss: f64,
}

/// What an expert is shown and may commit: new weights tied to the base version.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Proposal {
    pub base_version: u64,
    /// The proposed model as checkpoint bytes (safetensors with metadata); its `version`
    /// metadata is the base version, the committer assigns the next.
    #[serde(skip)]
    pub weights: Vec<u8>,
    /// Saliency maps (H*W each, ∂CE/∂x) of the marked images before and after.
    pub saliency_before: Vec<Vec<f32>>,
    pub saliency_after: Vec<Vec<f32>>,
    pub val_before: Eval,
    pub val_after: Eval,
    pub curve: Vec<ImpactPoint>,
    pub best_iteration: usize,
    pub iterations: usize,
    pub stop: StopReason,
    pub elapsed_ms: u64,
}

/// A proposal as stored for the expert's chooser: the image size and the figures (the
/// weights travel as a checkpoint file beside it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProposalReport {
    /// The image's size.
    pub width: u32,
    pub height: u32,
    /// The saliency maps' size: the image's, or smaller (mean-pooled) for large images.
    /// Absent in reports written before maps were bounded: the image's size.
    #[serde(default)]
    pub map_width: u32,
    #[serde(default)]
    pub map_height: u32,
    pub proposal: Proposal,
}

impl ProposalReport {
    /// The report of `proposal` for the expert's marked image (the batch's first): only
    /// that image's maps, pooled to at most `cfg.report_max_side` a side, and at most
    /// `cfg.report_max_points` curve points. Its size is bounded whatever the image's.
    pub fn bounded(width: u32, height: u32, mut proposal: Proposal, cfg: &RefineConfig) -> Self {
        let side = cfg.report_max_side.max(1);
        let f = width.max(height).div_ceil(side).max(1);
        let (mw, mh) = (width.div_ceil(f), height.div_ceil(f));
        let keep = |maps: &mut Vec<Vec<f32>>| {
            maps.truncate(1);
            for m in maps.iter_mut() {
                *m = mean_pool(m, width, height, f);
            }
        };
        keep(&mut proposal.saliency_before);
        keep(&mut proposal.saliency_after);
        proposal.weights = Vec::new();
        proposal.curve = thin_curve(
            std::mem::take(&mut proposal.curve),
            proposal.best_iteration,
            cfg.report_max_points,
        );
        ProposalReport {
            width,
            height,
            map_width: mw,
            map_height: mh,
            proposal,
        }
    }

    /// The maps' size (the image's for reports written before maps were bounded).
    pub fn map_size(&self) -> (u32, u32) {
        if self.map_width == 0 || self.map_height == 0 {
            (self.width, self.height)
        } else {
            (self.map_width, self.map_height)
        }
    }
}

/// Mean of each `f`×`f` cell of a `width`×`height` map (cells cut by the border average
/// what they hold). A map of the wrong length is returned empty rather than misread.
pub fn mean_pool(map: &[f32], width: u32, height: u32, f: u32) -> Vec<f32> {
    let (w, h, f) = (width as usize, height as usize, f.max(1) as usize);
    if map.len() != w * h {
        return Vec::new();
    }
    if f == 1 {
        return map.to_vec();
    }
    let (mw, mh) = (w.div_ceil(f), h.div_ceil(f));
    let mut sum = vec![0f64; mw * mh];
    let mut n = vec![0u32; mw * mh];
    for y in 0..h {
        for x in 0..w {
            let i = (y / f) * mw + x / f;
            sum[i] += map[y * w + x] as f64;
            n[i] += 1;
        }
    }
    sum.iter()
        .zip(&n)
        .map(|(s, &n)| (s / n as f64) as f32)
        .collect()
}

/// At most `max` points of an impact curve, evenly spaced, keeping the first, the one of
/// `best` and the last.
fn thin_curve(curve: Vec<ImpactPoint>, best: usize, max: usize) -> Vec<ImpactPoint> {
    let max = max.max(3);
    if curve.len() <= max {
        return curve;
    }
    let last = curve.len() - 1;
    let mut keep: Vec<usize> = (0..max - 1).map(|k| k * last / (max - 2)).collect();
    if let Some(b) = curve.iter().position(|p| p.iteration == best) {
        keep.push(b);
    }
    keep.sort_unstable();
    keep.dedup();
    keep.into_iter().map(|i| curve[i]).collect()
}

impl Proposal {
    /// Mean red / green share of the first and best curve points.
    pub fn shares(&self) -> ((f64, f64), (f64, f64)) {
        let first = self.curve.first().map(|p| (p.share_red, p.share_green));
        let best = self
            .curve
            .iter()
            .find(|p| p.iteration == self.best_iteration)
            .map(|p| (p.share_red, p.share_green));
        (first.unwrap_or_default(), best.unwrap_or_default())
    }
}

fn mean_shares(maps: &[Vec<f32>], marks: &[Mask]) -> (f64, f64) {
    let n = maps.len().max(1) as f64;
    let (r, g) = maps
        .iter()
        .zip(marks)
        .map(|(m, k)| impact_shares(m, k))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    (r / n, g / n)
}

/// Runs the loop on `batch` (every image must carry a mark) starting from `base`, which is
/// left untouched, guarding with `val`.
pub fn refine(
    base: &Model,
    batch: &Dataset,
    val: &Dataset,
    cfg: &RefineConfig,
) -> Result<Proposal> {
    let start = Instant::now();
    if batch.is_empty() || batch.marks.iter().any(|m| m.is_none()) {
        return Err(CoreError::invalid(
            "refinement needs a non-empty batch of marked images",
        ));
    }
    if val.is_empty() {
        return Err(CoreError::invalid("refinement needs validation images"));
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) || cfg.max_iterations == 0 {
        return Err(CoreError::invalid(
            "refinement needs lr > 0 and max_iterations > 0",
        ));
    }
    let device = base.device();
    let idx: Vec<usize> = (0..batch.len()).collect();
    let (x, y) = batch.batch(&idx, device);
    crate::saliency::check_batch(base, &x, &y)?;
    let marks_t = batch.mark_batch(&idx, device);
    check_marks(&x, &marks_t)?;
    let marks: Vec<Mask> = batch.marks.iter().flatten().cloned().collect();
    let full_val = val;
    let val_idx: Vec<usize> = (0..val.len().min(cfg.val_images.max(1))).collect();
    let val = val.subset(&val_idx);
    // The guard's images stay on the device for the whole loop (evaluated every iteration).
    let guard_set = crate::train::EvalSet::new(&val, device, 256)?;

    let model = base.try_clone()?;
    let mut best = base.try_clone()?;
    let mut opt = cfg.optimizer.build(model.var_store(), cfg.lr)?;
    let saliency_before = maps_to_vecs(&saliency_maps(base, &x, &y, Method::Gradient)?)?;
    let guard_before = guard_set.evaluate(base)?;

    let mut curve: Vec<ImpactPoint> = Vec::new();
    let mut scale = 1.0;
    let mut start_saliency = f64::NAN;
    let mut start_red = f64::NAN;
    let mut best_loss = f64::INFINITY;
    let mut best_iteration = 0;
    let mut progress_best = f64::NEG_INFINITY;
    let mut since_progress = 0usize;
    let mut iteration = 0;
    let stop = loop {
        let out = guided_forward(&model, cfg.loss, &x, &y, &marks_t, false)?;
        let sal = out.saliency.double_value(&[]);
        let ce = out.ce.double_value(&[]);
        if !sal.is_finite() || !ce.is_finite() {
            return Err(CoreError::invalid(format!(
                "refinement diverged at iteration {iteration} (saliency {sal}, ce {ce})"
            )));
        }
        if iteration == 0 {
            start_saliency = sal;
            if cfg.normalise && sal.abs() > 1e-12 {
                scale = (ce.abs().max(1e-3)) / sal.abs();
            }
        }
        let maps = if cfg.loss.target() == crate::saliency::Target::CrossEntropy {
            maps_to_vecs(&out.gradient.detach().abs().amax(1, false))?
        } else {
            maps_to_vecs(&saliency_maps(&model, &x, &y, Method::Gradient)?)?
        };
        let (share_red, share_green) = mean_shares(&maps, &marks);
        if iteration == 0 {
            start_red = share_red;
        }
        let current_val = if iteration == 0 {
            guard_before
        } else {
            guard_set.evaluate(&model)?
        };
        curve.push(ImpactPoint {
            iteration,
            share_red,
            share_green,
            saliency_loss: sal,
            ce,
            val_loss: current_val.loss,
        });
        let total = cfg.alpha * ce + cfg.beta * scale * sal;
        // (a) validation guard: these weights are not eligible.
        if let Some(g) = cfg.val_guard {
            if iteration > 0 && current_val.loss >= g * guard_before.loss {
                break StopReason::ValidationGuard;
            }
        }
        if total < best_loss {
            best_loss = total;
            best_iteration = iteration;
            best.copy_weights_from(&model)?;
        }
        let may_stop = iteration > 0 && iteration + 1 >= cfg.min_iterations;
        // (b) the saliency loss, or the red share, fell to half of its start.
        let halved = match cfg.halve_on {
            HalveOn::SaliencyLoss => sal <= start_saliency - start_saliency.abs() / 2.0,
            HalveOn::RedShare => share_red <= start_red / 2.0,
        };
        if cfg.halve_saliency && may_stop && halved {
            break StopReason::SaliencyHalved;
        }
        // (c) green-vs-red share stopped improving.
        if let Some(w) = cfg.plateau_window {
            let progress = share_green - share_red;
            if progress > progress_best + 1e-6 {
                progress_best = progress;
                since_progress = 0;
            } else {
                since_progress += 1;
                if since_progress >= w.max(1) && may_stop {
                    break StopReason::Plateau;
                }
            }
        }
        // (d) budgets.
        if iteration + 1 >= cfg.max_iterations {
            break StopReason::IterationBudget;
        }
        if let Some(ms) = cfg.time_budget_ms {
            if start.elapsed() >= Duration::from_millis(ms) {
                break StopReason::TimeBudget;
            }
        }
        let loss = &out.ce * cfg.alpha + &out.saliency * (cfg.beta * scale);
        opt.zero_grad();
        loss.backward();
        if cfg.clip_grad_norm > 0.0 {
            opt.clip_grad_norm(cfg.clip_grad_norm);
        }
        opt.step();
        iteration += 1;
    };
    let saliency_after = maps_to_vecs(&saliency_maps(&best, &x, &y, Method::Gradient)?)?;
    // The reported figures: the whole validation set, like a model version's.
    let (val_before, val_after) = if full_val.len() == val.len() {
        (guard_before, guard_set.evaluate(&best)?)
    } else {
        (
            evaluate(base, full_val, 256)?,
            evaluate(&best, full_val, 256)?,
        )
    };
    Ok(Proposal {
        base_version: base.spec.version,
        weights: best.to_bytes()?,
        saliency_before,
        saliency_after,
        val_before,
        val_after,
        curve,
        best_iteration,
        iterations: iteration + 1,
        stop,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Mask;
    use crate::model::{Arch, ModelSpec};
    use crate::train::{train, TrainConfig};
    use tch::Device;

    /// Two classes told apart by a bright bar in the middle (the real cue) and, in the
    /// training data, also by a bright corner (the shortcut).
    fn shortcut_data(n: usize, with_shortcut: bool) -> Dataset {
        let mut ds = Dataset::new(vec!["a".into(), "b".into()], 1, 12, 12);
        let mut rng = crate::rng::Rng::new(9);
        for i in 0..n {
            let label = (i % 2) as i64;
            let mut img: Vec<f32> = (0..144).map(|_| 0.1 * rng.next_f64() as f32).collect();
            let row = if label == 0 { 4 } else { 7 };
            // The bar is dimmer than the corner so that three epochs learn the corner
            // whatever the seed (across 20 seeds the first red share stays ≥ 0.099).
            for c in 3..9 {
                img[row * 12 + c] = 0.5;
            }
            let cue = if with_shortcut {
                label == 1
            } else {
                rng.coin()
            };
            if cue {
                for r in 0..3 {
                    for c in 0..3 {
                        img[r * 12 + c] = 1.0;
                    }
                }
            }
            let mut m = Mask::empty(12, 12);
            for r in 0..3 {
                for c in 0..3 {
                    m.values[r * 12 + c] = 1;
                }
            }
            ds.push(&img, label, Some(m), format!("i{i}"));
        }
        ds
    }

    #[test]
    fn refinement_lowers_the_red_share_and_leaves_the_base_untouched() {
        tch::manual_seed(0);
        let spec = ModelSpec {
            arch: Arch::SmallCnn,
            classes: vec!["a".into(), "b".into()],
            channels: 1,
            height: 12,
            width: 12,
            version: 3,
            script: None,
        };
        let mut model = Model::new(spec, Device::Cpu).unwrap();
        let data = shortcut_data(256, true);
        train(
            &mut model,
            &data,
            &[],
            &TrainConfig {
                epochs: 3,
                ..Default::default()
            },
            &mut |_, _, _, _| {},
        )
        .unwrap();
        let weights = |m: &Model| -> Vec<(String, Vec<f32>)> {
            let mut v: Vec<(String, Vec<f32>)> = m
                .var_store()
                .variables()
                .into_iter()
                .map(|(k, t)| (k, Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let before = weights(&model);
        let batch = data.subset(&[1, 3, 5, 7]);
        let val = shortcut_data(64, false);
        let cfg = RefineConfig {
            lr: 3e-3,
            max_iterations: 40,
            time_budget_ms: None,
            halve_saliency: false,
            plateau_window: None,
            val_guard: Some(3.0),
            ..Default::default()
        };
        let p = refine(&model, &batch, &val, &cfg).unwrap();
        assert!(weights(&model) == before, "base model changed");
        assert_eq!(p.base_version, 3);
        let ((red0, _), (red1, _)) = p.shares();
        assert!(
            red0 > 0.05,
            "the shortcut should draw saliency at first: {red0}"
        );
        assert!(red1 < 0.5 * red0, "red share {red0} -> {red1}");
        assert_eq!(p.saliency_after.len(), 4);
        assert_eq!(p.curve.len(), p.iterations);
        let proposed =
            Model::from_bytes(&p.weights, Device::Cpu, std::path::Path::new("p")).unwrap();
        let batch_maps = {
            let idx: Vec<usize> = (0..4).collect();
            let (x, y) = batch.batch(&idx, Device::Cpu);
            maps_to_vecs(&saliency_maps(&proposed, &x, &y, Method::Gradient).unwrap()).unwrap()
        };
        assert_eq!(batch_maps, p.saliency_after);
    }

    #[test]
    fn stopping_criteria_fire() {
        tch::manual_seed(1);
        let spec = ModelSpec {
            arch: Arch::SmallCnn,
            classes: vec!["a".into(), "b".into()],
            channels: 1,
            height: 12,
            width: 12,
            version: 0,
            script: None,
        };
        let model = Model::new(spec, Device::Cpu).unwrap();
        let data = shortcut_data(16, true);
        let batch = data.subset(&[0, 1]);
        let base = RefineConfig {
            time_budget_ms: None,
            halve_saliency: false,
            plateau_window: None,
            val_guard: None,
            max_iterations: 5,
            ..Default::default()
        };
        let p = refine(&model, &batch, &data, &base).unwrap();
        assert_eq!((p.stop, p.iterations), (StopReason::IterationBudget, 5));
        let p = refine(
            &model,
            &batch,
            &data,
            &RefineConfig {
                lr: 1.0,
                val_guard: Some(1.0001),
                max_iterations: 50,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(p.stop, StopReason::ValidationGuard);
        assert!(p.val_after.loss < 1.0001 * p.val_before.loss);
        let p = refine(
            &model,
            &batch,
            &data,
            &RefineConfig {
                time_budget_ms: Some(0),
                max_iterations: 50,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!((p.stop, p.iterations), (StopReason::TimeBudget, 1));
        let p = refine(
            &model,
            &batch,
            &data,
            &RefineConfig {
                plateau_window: Some(1),
                lr: 0.0 + 1e-12,
                max_iterations: 50,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(p.stop, StopReason::Plateau);
        let p = refine(
            &model,
            &batch,
            &data,
            &RefineConfig {
                halve_saliency: true,
                alpha: 0.0,
                optimizer: OptimizerKind::Adam,
                lr: 1e-2,
                max_iterations: 200,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(p.stop, StopReason::SaliencyHalved);
        let unmarked = data.without_marks().subset(&[0]);
        assert!(refine(&model, &unmarked, &data, &base).is_err());
    }

    #[test]
    fn a_report_stays_small_whatever_the_image_size() {
        let (w, h) = (1000u32, 600u32);
        let n = (w * h) as usize;
        let map = |v: f32| (0..n).map(|i| v + (i % 7) as f32).collect::<Vec<f32>>();
        let curve: Vec<ImpactPoint> = (0..5000)
            .map(|i| ImpactPoint {
                iteration: i,
                share_red: 1.0 / (1.0 + i as f64),
                share_green: 0.0,
                saliency_loss: 0.0,
                ce: 0.0,
                val_loss: 0.0,
            })
            .collect();
        let p = Proposal {
            base_version: 2,
            weights: vec![1; 1000],
            saliency_before: vec![map(1.0), map(2.0), map(3.0)],
            saliency_after: vec![map(0.0), map(0.0), map(0.0)],
            val_before: crate::train::Eval {
                loss: 1.0,
                accuracy: 0.5,
            },
            val_after: crate::train::Eval {
                loss: 1.0,
                accuracy: 0.5,
            },
            curve,
            best_iteration: 4321,
            iterations: 5000,
            stop: StopReason::IterationBudget,
            elapsed_ms: 1,
        };
        let r = ProposalReport::bounded(w, h, p, &RefineConfig::default());
        assert_eq!((r.width, r.height), (w, h));
        assert_eq!(r.map_size(), (250, 150), "pooled by 4");
        assert_eq!(
            r.proposal.saliency_before.len(),
            1,
            "the marked image's maps only"
        );
        assert_eq!(r.proposal.saliency_before[0].len(), 250 * 150);
        assert_eq!(r.proposal.saliency_after[0].len(), 250 * 150);
        let c = &r.proposal.curve;
        assert!(c.len() <= 512, "{}", c.len());
        assert_eq!(c.first().unwrap().iteration, 0);
        assert_eq!(c.last().unwrap().iteration, 4999);
        assert!(c.iter().any(|p| p.iteration == 4321), "the best point kept");
        assert!(c.windows(2).all(|p| p[0].iteration < p[1].iteration));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.len() < 2 << 20, "{} bytes", json.len());
        // Small images keep their maps as they are.
        let small = ProposalReport::bounded(
            2,
            2,
            Proposal {
                saliency_before: vec![vec![1.0, 2.0, 3.0, 4.0]],
                saliency_after: vec![vec![4.0, 3.0, 2.0, 1.0]],
                curve: Vec::new(),
                ..r.proposal.clone()
            },
            &RefineConfig::default(),
        );
        assert_eq!(small.map_size(), (2, 2));
        assert_eq!(small.proposal.saliency_before[0], vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn mean_pooling_averages_each_cell_and_the_cut_border_cells() {
        // 3×3 by 2: cells of 4, 2, 2 and 1 pixels.
        let m = [1.0, 3.0, 5.0, 3.0, 1.0, 7.0, 2.0, 2.0, 9.0];
        assert_eq!(mean_pool(&m, 3, 3, 2), vec![2.0, 6.0, 2.0, 9.0]);
        assert!(mean_pool(&m, 4, 3, 2).is_empty(), "wrong length");
    }
}
