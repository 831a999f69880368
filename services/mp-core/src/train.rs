//! Training: plain cross-entropy, or guided — CE + λ·L_saliency over a sampled guidance set
//! (persistent guidance), optionally with mark propagation (the human prior's predicted red
//! mask applied to unmarked images).

use crate::align::HumanPrior;
use crate::data::{Dataset, Mask};
use crate::error::{CoreError, Result};
use crate::loss::{guided_forward, SaliencyLoss};
use crate::model::Model;
use crate::rng::Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

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
    /// Apply the human prior's predicted red mask to every unmarked image of each batch.
    pub propagate: bool,
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
    let _g = tch::no_grad_guard();
    let (mut loss, mut correct) = (0f64, 0i64);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = ds.batch(chunk, model.device());
        let logits = model.forward_t(&x, false);
        loss += crate::saliency::target_score(&logits, &y, crate::saliency::Target::CrossEntropy)
            .double_value(&[]);
        correct += logits
            .argmax(-1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    Ok(Eval {
        loss: loss / ds.len() as f64,
        accuracy: correct as f64 / ds.len() as f64,
    })
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
}

/// The marks a guided batch is penalised on: the image's own mark where `marked` says so,
/// else the prior's mask (propagation) or nothing.
fn batch_marks(
    ds: &Dataset,
    idx: &[usize],
    marked: &[bool],
    prior_mask: Option<&Mask>,
    device: Device,
) -> Tensor {
    let hw = ds.height * ds.width;
    let mut buf = vec![0f32; idx.len() * hw];
    for (k, &i) in idx.iter().enumerate() {
        let src = if marked[i] {
            ds.marks[i].as_ref()
        } else {
            prior_mask
        };
        if let Some(m) = src {
            for (d, &v) in buf[k * hw..(k + 1) * hw].iter_mut().zip(&m.values) {
                *d = v as f32;
            }
        }
    }
    Tensor::from_slice(&buf)
        .reshape([idx.len() as i64, 1, ds.height as i64, ds.width as i64])
        .to_device(device)
}

/// Trains `model` on `ds`. `guidance_set` lists the indices of `ds` whose marks guide the
/// training (ignored without `cfg.guidance`). The prior for propagation is built from them.
pub fn train(
    model: &mut Model,
    ds: &Dataset,
    guidance_set: &[usize],
    cfg: &TrainConfig,
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
    let prior_mask = match guidance {
        Some(g) if g.propagate => {
            let mut prior = HumanPrior::new(ds.classes.len(), ds.width, ds.height);
            for &i in guidance_set {
                if let Some(m) = &ds.marks[i] {
                    prior.add(ds.labels[i] as usize, m)?;
                }
            }
            prior.global_red_mask(0.0)
        }
        _ => None,
    };
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
                    if g.propagate {
                        let marks = batch_marks(ds, chunk, &marked, prior_mask.as_ref(), device);
                        let out = guided_forward(model, g.loss, &x, &y, &marks, true)?;
                        total = &out.ce + &out.saliency * g.lambda;
                    } else {
                        total = model.forward_t(&x, true).cross_entropy_for_logits(&y);
                    }
                    if g.batch_size > 0 {
                        let pick: Vec<usize> = (0..g.batch_size)
                            .map(|_| guidance_set[rng.below(guidance_set.len())])
                            .collect();
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
    })
}
