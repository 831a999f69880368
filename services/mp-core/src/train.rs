//! Training: plain cross-entropy, or guided — CE + λ·L_saliency over a sampled guidance set
//! (persistent guidance), optionally with mark propagation (suggested marks, weighted by
//! their confidence, applied to the unmarked images of every batch; see [`crate::suggest`]).

use crate::data::Dataset;
use crate::error::{CoreError, Result};
use crate::loss::{guided_forward, SaliencyLoss};
use crate::model::Model;
use crate::rng::Rng;
use crate::suggest::{FitReport, Propagation, SuggestConfig, Suggester};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

impl OptimizerKind {
    pub fn build(&self, vs: &nn::VarStore, lr: f64) -> Result<nn::Optimizer> {
        Ok(match self {
            OptimizerKind::Adam => nn::Adam::default().build(vs, lr)?,
            OptimizerKind::Sgd => nn::Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(vs, lr)?,
        })
    }
}

/// Persistent guidance: which loss, how strong, and how marks reach unmarked images.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuidanceConfig {
    pub loss: SaliencyLoss,
    pub lambda: f64,
    /// Marked images sampled (with replacement) per step.
    pub batch_size: usize,
    /// How marks reach the unmarked images of each batch.
    pub propagation: Propagation,
    #[serde(default)]
    pub suggest: SuggestConfig,
    /// Probability that an image of a propagated batch trades its red region (own mark or
    /// suggestion) with another image's ([`crate::counterfactual`]); 0 = off.
    #[serde(default)]
    pub swap: f64,
}

impl GuidanceConfig {
    pub fn new(loss: SaliencyLoss, lambda: f64, propagation: Propagation) -> Self {
        GuidanceConfig {
            loss,
            lambda,
            batch_size: 16,
            propagation,
            suggest: SuggestConfig::default(),
            swap: 0.0,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub seed: u64,
    pub guidance: Option<GuidanceConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 4,
            batch_size: 64,
            lr: 1e-3,
            optimizer: OptimizerKind::Adam,
            seed: 0,
            guidance: None,
        }
    }
}

/// Loss and accuracy of a model on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Eval {
    pub loss: f64,
    pub accuracy: f64,
}

/// Progress after each step: (epoch, step in epoch, steps per epoch, last CE).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, usize, f64);

/// Mean CE and accuracy of `model` on `ds`, in batches, without gradients.
pub fn evaluate(model: &Model, ds: &Dataset, batch_size: usize) -> Result<Eval> {
    if ds.is_empty() {
        return Err(CoreError::invalid("cannot evaluate on an empty dataset"));
    }
    let idx: Vec<usize> = (0..ds.len()).collect();
    let parts = idx
        .chunks(batch_size.max(1))
        .map(|chunk| ds.batch(chunk, model.device()));
    evaluate_parts(model, parts, ds.len())
}

fn evaluate_parts<P: std::borrow::Borrow<(Tensor, Tensor)>>(
    model: &Model,
    parts: impl Iterator<Item = P>,
    n: usize,
) -> Result<Eval> {
    let _g = tch::no_grad_guard();
    let (mut loss, mut correct) = (0f64, 0i64);
    for p in parts {
        let (x, y) = p.borrow();
        let logits = model.forward_t(x, false);
        loss += crate::saliency::target_score(&logits, y, crate::saliency::Target::CrossEntropy)
            .double_value(&[]);
        correct += logits
            .argmax(-1, false)
            .eq_tensor(y)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    Ok(Eval {
        loss: loss / n as f64,
        accuracy: correct as f64 / n as f64,
    })
}

/// A dataset's images and labels as tensors already on the model's device, in evaluation
/// batches: for a set evaluated again and again (the refinement's validation guard, every
/// iteration) without rebuilding and copying its pixels each time. On a GPU at 224² that copy
/// cost more than the refinement's own work.
pub struct EvalSet {
    parts: Vec<(Tensor, Tensor)>,
    n: usize,
}

impl EvalSet {
    pub fn new(ds: &Dataset, device: tch::Device, batch_size: usize) -> Result<EvalSet> {
        if ds.is_empty() {
            return Err(CoreError::invalid("cannot evaluate on an empty dataset"));
        }
        let idx: Vec<usize> = (0..ds.len()).collect();
        Ok(EvalSet {
            parts: idx
                .chunks(batch_size.max(1))
                .map(|chunk| ds.batch(chunk, device))
                .collect(),
            n: ds.len(),
        })
    }

    /// The same figures as [`evaluate`] on the dataset this set was made from.
    pub fn evaluate(&self, model: &Model) -> Result<Eval> {
        evaluate_parts(model, self.parts.iter(), self.n)
    }
}

/// Predicted class probabilities (N, classes) for a batch of images.
pub fn predict(model: &Model, x: &Tensor) -> Tensor {
    let _g = tch::no_grad_guard();
    model.forward_t(x, false).softmax(-1, Kind::Float)
}

/// What a training run did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub seconds: f64,
    pub final_ce: f64,
    pub guidance_images: usize,
    /// The propagation mode used and how it was chosen (None without propagation).
    pub propagation: Option<FitReport>,
}

/// The marks a guided batch `x` is penalised on: the image's own mark where `marked` says
/// so, else the suggester's confidence-weighted suggestion (propagation) or nothing.
pub fn batch_marks(
    ds: &Dataset,
    idx: &[usize],
    marked: &[bool],
    x: &Tensor,
    suggester: Option<&Suggester>,
) -> Result<Tensor> {
    let device = x.device();
    let own: Vec<usize> = idx.iter().copied().filter(|&i| marked[i]).collect();
    let mut marks = ds.mark_batch(idx, device);
    if own.len() < idx.len() {
        // Zero the marks of images outside the guidance set (a benchmark's dataset may carry
        // every image's ground truth), then fill in the suggestions.
        let keep: Vec<f32> = idx.iter().map(|&i| marked[i] as u8 as f32).collect();
        let keep = Tensor::from_slice(&keep)
            .reshape([idx.len() as i64, 1, 1, 1])
            .to_device(device);
        marks = &marks * &keep;
        if let Some(s) = suggester {
            marks += s.weights(x)? * (1.0 - keep);
        }
    }
    Ok(marks)
}

/// Trains `model` on `ds`. `guidance_set` lists the indices of `ds` whose marks guide the
/// training (ignored without `cfg.guidance`); with propagation, the suggester is fitted on
/// them first ([`crate::suggest::fit`]) and its report returned.
pub fn train(
    model: &mut Model,
    ds: &Dataset,
    guidance_set: &[usize],
    cfg: &TrainConfig,
    progress: Progress<'_>,
) -> Result<TrainReport> {
    let fitted = match cfg.guidance.as_ref().filter(|_| !guidance_set.is_empty()) {
        Some(g) => {
            crate::suggest::fit(g.propagation, ds, guidance_set, &g.suggest, model.device())?
        }
        None => None,
    };
    let (suggester, report) = match fitted {
        Some((s, r)) => (Some(s), Some(r)),
        None => (None, None),
    };
    let mut out = train_with(model, ds, guidance_set, cfg, suggester.as_ref(), progress)?;
    out.propagation = report;
    Ok(out)
}

/// The batch with its confounds swapped ([`crate::counterfactual::swap_confounds`]).
fn swapped(x: &Tensor, marks: &Tensor, p: f64, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
    let size = x.size();
    let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
    let device = x.device();
    let mut xv = Vec::<f32>::try_from(&x.to_device(tch::Device::Cpu).contiguous().flatten(0, -1))?;
    let mut mv = Vec::<f32>::try_from(
        &marks
            .to_device(tch::Device::Cpu)
            .contiguous()
            .flatten(0, -1),
    )?;
    crate::counterfactual::swap_confounds(
        &mut xv, &mut mv, n as usize, c as usize, h as usize, w as usize, p, rng,
    );
    Ok((
        Tensor::from_slice(&xv)
            .reshape([n, c, h, w])
            .to_device(device),
        Tensor::from_slice(&mv)
            .reshape([n, 1, h, w])
            .to_device(device),
    ))
}

/// `guidance.batch_size` indices drawn with replacement from the guidance set.
pub fn sample_guidance(rng: &mut Rng, guidance_set: &[usize], n: usize) -> Vec<usize> {
    if guidance_set.is_empty() {
        return Vec::new();
    }
    (0..n)
        .map(|_| guidance_set[rng.below(guidance_set.len())])
        .collect()
}

/// [`train`] with a suggester fitted by the caller (or none: no propagation, whatever
/// `cfg.guidance.propagation` says).
pub fn train_with(
    model: &mut Model,
    ds: &Dataset,
    guidance_set: &[usize],
    cfg: &TrainConfig,
    suggester: Option<&Suggester>,
    progress: Progress<'_>,
) -> Result<TrainReport> {
    if ds.is_empty() || cfg.batch_size == 0 || !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return Err(CoreError::invalid(
            "training needs images, batch_size > 0 and lr > 0",
        ));
    }
    if (ds.channels, ds.height, ds.width)
        != (model.spec.channels, model.spec.height, model.spec.width)
    {
        return Err(CoreError::invalid(format!(
            "dataset images are {}x{}x{}, the model takes {}x{}x{}",
            ds.channels,
            ds.height,
            ds.width,
            model.spec.channels,
            model.spec.height,
            model.spec.width
        )));
    }
    if let Some(&i) = guidance_set
        .iter()
        .find(|&&i| i >= ds.len() || ds.marks[i].is_none())
    {
        return Err(CoreError::invalid(format!(
            "guidance image {i} has no mark"
        )));
    }
    let start = std::time::Instant::now();
    let device = model.device();
    let mut rng = Rng::new(cfg.seed);
    let mut opt = cfg.optimizer.build(model.var_store(), cfg.lr)?;
    let mut marked = vec![false; ds.len()];
    guidance_set.iter().for_each(|&i| marked[i] = true);
    let guidance = cfg.guidance.as_ref().filter(|_| !guidance_set.is_empty());
    let suggester = suggester.filter(|_| guidance.is_some());
    let per_epoch = ds.len().div_ceil(cfg.batch_size);
    let (mut steps, mut last) = (0usize, f64::NAN);
    for epoch in 0..cfg.epochs {
        let order = rng.permutation(ds.len());
        for (s, chunk) in order.chunks(cfg.batch_size).enumerate() {
            let (x, y) = ds.batch(chunk, device);
            let loss = match guidance {
                None => model.forward_t(&x, true).cross_entropy_for_logits(&y),
                Some(g) => {
                    let mut total;
                    if let Some(sg) = suggester {
                        let marks = batch_marks(ds, chunk, &marked, &x, Some(sg))?;
                        let (x, marks) = if g.swap > 0.0 {
                            swapped(&x, &marks, g.swap, &mut rng)?
                        } else {
                            (x.shallow_clone(), marks)
                        };
                        let out = guided_forward(model, g.loss, &x, &y, &marks, true)?;
                        total = &out.ce + &out.saliency * g.lambda;
                    } else {
                        total = model.forward_t(&x, true).cross_entropy_for_logits(&y);
                    }
                    if g.batch_size > 0 {
                        let pick = sample_guidance(&mut rng, guidance_set, g.batch_size);
                        let (gx, gy) = ds.batch(&pick, device);
                        let gm = ds.mark_batch(&pick, device);
                        let out = guided_forward(model, g.loss, &gx, &gy, &gm, true)?;
                        total += &out.saliency * g.lambda;
                    }
                    total
                }
            };
            last = loss.double_value(&[]);
            if !last.is_finite() {
                return Err(CoreError::invalid(format!(
                    "loss became {last} at epoch {epoch} step {s}; lower lr or lambda"
                )));
            }
            opt.backward_step(&loss);
            steps += 1;
            progress(epoch, s, per_epoch, last);
        }
    }
    Ok(TrainReport {
        steps,
        seconds: start.elapsed().as_secs_f64(),
        final_ce: last,
        guidance_images: guidance_set.len(),
        propagation: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Mask, RED};
    use crate::suggest::{SuggestMode, Suggester};
    use tch::Device;

    /// Three 2x2 images, each with its own mark: red on pixel i.
    fn three() -> Dataset {
        let mut ds = Dataset::new(vec!["a".into(), "b".into()], 1, 2, 2);
        for i in 0..3 {
            let mut m = Mask::empty(2, 2);
            m.values[i] = RED;
            m.values[3] = -1;
            ds.push(
                &[0.1, 0.2, 0.3, 0.4],
                (i % 2) as i64,
                Some(m),
                format!("i{i}"),
            );
        }
        ds
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn an_eval_set_gives_the_same_figures_as_evaluate_in_any_batching() {
        tch::manual_seed(3);
        let spec = crate::model::ModelSpec {
            arch: crate::model::Arch::SmallCnn,
            classes: vec!["a".into(), "b".into()],
            channels: 1,
            height: 8,
            width: 8,
            version: 1,
            script: None,
        };
        let model = Model::new(spec, Device::Cpu).unwrap();
        let mut ds = Dataset::new(vec!["a".into(), "b".into()], 1, 8, 8);
        let px = Vec::<f32>::try_from(&Tensor::rand([7 * 64], (Kind::Float, Device::Cpu))).unwrap();
        for i in 0..7 {
            ds.push(
                &px[i * 64..(i + 1) * 64],
                (i % 2) as i64,
                None,
                format!("v{i}"),
            );
        }
        let want = evaluate(&model, &ds, 256).unwrap();
        for b in [1, 3, 256] {
            let got = EvalSet::new(&ds, Device::Cpu, b)
                .unwrap()
                .evaluate(&model)
                .unwrap();
            assert!((got.loss - want.loss).abs() < 1e-5, "batch {b}");
            assert_eq!(got.accuracy, want.accuracy);
        }
        let empty = Dataset::new(vec!["a".into()], 1, 8, 8);
        assert!(EvalSet::new(&empty, Device::Cpu, 4).is_err());
    }

    #[test]
    fn batch_marks_use_own_marks_of_the_guidance_set_only_and_suggestions_elsewhere() {
        let ds = three();
        let idx = [0usize, 1, 2];
        let (x, _) = ds.batch(&idx, Device::Cpu);
        let marked = [true, false, false];
        // Without a suggester the unguided images get nothing, although the dataset has
        // their ground truth.
        let m = batch_marks(&ds, &idx, &marked, &x, None).unwrap();
        assert_eq!(
            values(&m),
            vec![1., 0., 0., -1., 0., 0., 0., 0., 0., 0., 0., 0.]
        );
        // With the union of the guidance set's red marks, every other image gets red on
        // pixel 0 (and green where every marked image had green).
        let s = Suggester::fit_mode(
            SuggestMode::Union,
            &ds,
            &[0],
            &Default::default(),
            Device::Cpu,
        )
        .unwrap();
        let m = batch_marks(&ds, &idx, &marked, &x, Some(&s)).unwrap();
        assert_eq!(
            values(&m),
            vec![1., 0., 0., -1., 1., 0., 0., -1., 1., 0., 0., -1.]
        );
        // Two images in the guidance set: each keeps its own mark.
        let m = batch_marks(&ds, &idx, &[true, true, false], &x, Some(&s)).unwrap();
        assert_eq!(&values(&m)[..8], &[1., 0., 0., -1., 0., 1., 0., -1.]);
    }

    #[test]
    fn guidance_is_sampled_with_replacement_from_the_guidance_set_only() {
        let mut rng = Rng::new(4);
        assert!(sample_guidance(&mut rng, &[], 8).is_empty());
        let set = [3usize, 7, 11];
        let pick = sample_guidance(&mut rng, &set, 3000);
        assert_eq!(pick.len(), 3000);
        for v in set {
            let n = pick.iter().filter(|&&p| p == v).count();
            assert!((850..1150).contains(&n), "{v} drawn {n} times of 3000");
        }
        assert!(pick.iter().all(|p| set.contains(p)));
    }
}
