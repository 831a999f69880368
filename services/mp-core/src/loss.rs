//! Saliency losses, differentiable into the weights by double backpropagation.
//!
//! Marks M are (N, 1, H, W) in {-1 green, 0, +1 red} and broadcast over channels.

use crate::error::{CoreError, Result};
use crate::model::Model;
use crate::saliency::{forward_with_input_gradient, Target};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum SaliencyLoss {
    /// Thesis eq. 4.1: Σ M ⊙ clip(|G|, 0, max), G = ∂CE/∂x; per image, mean over the batch.
    Clip { max: f64 },
    /// The author's later code: mean over red of G² plus mean over green of 1/(1+G²).
    Squared,
    /// Ross et al. 2017: Σ (R ⊙ ∂(Σ_k log p_k)/∂x)², R the red mask; per image, mean over
    /// the batch. Green marks are ignored.
    Rrr,
    /// `rrr` on the whole Jacobian of the log-probabilities, estimated with one random
    /// projection per step (Hutchinson): Σ (R ⊙ ∂(Σ_k v_k log p_k)/∂x)², v ~ N(0, I). The sum
    /// of log-probabilities leaves every direction orthogonal to it free, so a model can keep
    /// using a red region by shifting probability between classes that sum does not see;
    /// this penalises all of them, at the cost of `rrr`.
    RrrJacobian,
}

impl SaliencyLoss {
    pub const NAMES: [&'static str; 4] = ["clip", "squared", "rrr", "rrr-jacobian"];

    /// The scalar whose input gradient this loss constrains.
    pub fn target(&self) -> Target {
        match self {
            SaliencyLoss::Rrr => Target::SumLogProbs,
            SaliencyLoss::RrrJacobian => Target::ProjectedLogProbs,
            _ => Target::CrossEntropy,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SaliencyLoss::Clip { .. } => "clip",
            SaliencyLoss::Squared => "squared",
            SaliencyLoss::Rrr => "rrr",
            SaliencyLoss::RrrJacobian => "rrr-jacobian",
        }
    }

    /// The loss from an input gradient `g` (N, C, H, W) and marks (N, 1, H, W). Marks are
    /// −1 / 0 / +1 from an expert, or weights in [−1, 1] from a suggestion (a pixel red with
    /// confidence 0.7 counts 0.7 of a red pixel); for −1 / 0 / +1 both readings agree.
    pub fn from_gradient(&self, g: &Tensor, marks: &Tensor) -> Tensor {
        let n = g.size()[0] as f64;
        match *self {
            SaliencyLoss::Clip { max } => (marks * g.abs().clamp(0.0, max)).sum(Kind::Float) / n,
            SaliencyLoss::Squared => {
                let red = marks.clamp_min(0.0).expand_as(g);
                let green = marks.neg().clamp_min(0.0).expand_as(g);
                let g2 = g.square();
                let mean_over = |sel: &Tensor, v: Tensor| {
                    // Σ weights (a count for −1 / 0 / +1 marks); nothing selected gives 0.
                    let count = sel.sum(Kind::Float).clamp_min(1e-6);
                    (sel * v).sum(Kind::Float) / count
                };
                let red_term = mean_over(&red, g2.shallow_clone());
                let green_term = mean_over(&green, (g2 + 1.0).reciprocal());
                red_term + green_term
            }
            SaliencyLoss::Rrr | SaliencyLoss::RrrJacobian => {
                let red = marks.clamp_min(0.0);
                (g.square() * red).sum(Kind::Float) / n
            }
        }
    }
}

impl std::str::FromStr for SaliencyLoss {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "clip" => Ok(SaliencyLoss::Clip { max: 0.5 }),
            "squared" => Ok(SaliencyLoss::Squared),
            "rrr" => Ok(SaliencyLoss::Rrr),
            "rrr-jacobian" => Ok(SaliencyLoss::RrrJacobian),
            _ => Err(CoreError::invalid(format!(
                "unknown saliency loss {s:?} (clip, squared, rrr, rrr-jacobian)"
            ))),
        }
    }
}

/// Output of one guided forward pass.
pub struct Guided {
    pub logits: Tensor,
    /// Mean cross-entropy of the batch.
    pub ce: Tensor,
    /// The saliency loss, with its graph into the weights.
    pub saliency: Tensor,
    /// The input gradient the loss was built from (kept with its graph).
    pub gradient: Tensor,
}

/// Checks marks against a batch: (N, 1, H, W), finite, values in {-1, 0, 1}.
pub fn check_marks(x: &Tensor, marks: &Tensor) -> Result<()> {
    let xs = x.size();
    let ms = marks.size();
    if ms.len() != 4 || ms[0] != xs[0] || ms[1] != 1 || ms[2..] != xs[2..] {
        return Err(CoreError::invalid(format!(
            "marks are {ms:?}, expected ({}, 1, {}, {})",
            xs[0], xs[2], xs[3]
        )));
    }
    let ok = marks
        .eq(0.0)
        .logical_or(&marks.eq(1.0))
        .logical_or(&marks.eq(-1.0));
    if ok.all().int64_value(&[]) == 0 {
        return Err(CoreError::invalid("mark values must be -1, 0 or 1"));
    }
    Ok(())
}

/// One forward pass giving CE and the saliency loss on the same batch (double backprop
/// ready: call `backward` on any combination of `ce` and `saliency`).
pub fn guided_forward(
    model: &Model,
    loss: SaliencyLoss,
    x: &Tensor,
    y: &Tensor,
    marks: &Tensor,
    train: bool,
) -> Result<Guided> {
    let (logits, gradient) = forward_with_input_gradient(model, x, y, loss.target(), train, true)?;
    let saliency = loss.from_gradient(&gradient, marks);
    let ce = logits.cross_entropy_for_logits(y);
    Ok(Guided {
        logits,
        ce,
        saliency,
        gradient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelSpec};
    use tch::{nn::OptimizerConfig, Device};

    #[test]
    fn each_loss_sends_a_finite_nonzero_gradient_to_every_weight_tensor() {
        tch::manual_seed(5);
        let spec = ModelSpec {
            arch: Arch::SmallCnn,
            classes: vec!["0".into(), "1".into()],
            channels: 1,
            height: 8,
            width: 8,
            version: 0,
            script: None,
        };
        let model = Model::new(spec, Device::Cpu).unwrap();
        let x = Tensor::rand([4, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let marks = Tensor::zeros([4, 1, 8, 8], (Kind::Float, Device::Cpu));
        let _ = marks.narrow(2, 0, 3).fill_(1.0); // red on the top rows
        let _ = marks.narrow(2, 5, 3).fill_(-1.0); // green on the bottom rows
        for name in SaliencyLoss::NAMES {
            // Clip at a level the gradients exceed would stop the gradient: test below it.
            let loss: SaliencyLoss = match name {
                "clip" => SaliencyLoss::Clip { max: 10.0 },
                other => other.parse().unwrap(),
            };
            let mut opt = tch::nn::Sgd::default()
                .build(model.var_store(), 0.0)
                .unwrap();
            opt.zero_grad();
            let out = guided_forward(&model, loss, &x, &y, &marks, true).unwrap();
            let v = out.saliency.double_value(&[]);
            assert!(v.is_finite() && v != 0.0, "{name}: loss {v}");
            out.saliency.backward();
            for (var, t) in model.var_store().variables() {
                let g = t.grad();
                assert!(g.defined(), "{name}: no gradient for {var}");
                let norm = g.norm().double_value(&[]);
                assert!(
                    norm.is_finite() && norm > 0.0,
                    "{name}: {var} gradient norm {norm}"
                );
            }
        }
    }

    fn t(v: &[f32], shape: [i64; 4]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    fn value(loss: SaliencyLoss, g: &Tensor, m: &Tensor) -> f64 {
        loss.from_gradient(g, m).double_value(&[])
    }

    #[test]
    fn each_loss_matches_hand_computed_values() {
        let clip = SaliencyLoss::Clip { max: 0.5 };
        let (sq, rrr) = (SaliencyLoss::Squared, SaliencyLoss::Rrr);
        // One image, one channel, 2x2: G = [1, -2; 3, 0.5], red on the top row, green at (1, 0).
        let g = t(&[1.0, -2.0, 3.0, 0.5], [1, 1, 2, 2]);
        let m = t(&[1.0, 1.0, -1.0, 0.0], [1, 1, 2, 2]);
        // clip: Σ M·min(|G|, 0.5) = 0.5 + 0.5 − 0.5.
        assert!((value(clip, &g, &m) - 0.5).abs() < 1e-6);
        // squared: mean over red of G² = (1 + 4) / 2, plus mean over green of 1/(1 + G²) = 1/10.
        assert!((value(sq, &g, &m) - 2.6).abs() < 1e-6);
        // rrr: Σ red·G² = 1 + 4.
        assert!((value(rrr, &g, &m) - 5.0).abs() < 1e-6);

        // Two channels share the mark: G = [1, 2] and [3, 4], red on the first pixel.
        let g = t(&[1.0, 2.0, 3.0, 4.0], [1, 2, 1, 2]);
        let m = t(&[1.0, 0.0], [1, 1, 1, 2]);
        assert!((value(rrr, &g, &m) - 10.0).abs() < 1e-6);
        assert!((value(sq, &g, &m) - 5.0).abs() < 1e-6); // (1 + 9) / 2, no green
        assert!((value(clip, &g, &m) - 1.0).abs() < 1e-6);

        // A batch is averaged per image: rrr sums 5 and 1 -> 3.
        let g = t(&[1.0, 2.0, 1.0, 0.0], [2, 1, 1, 2]);
        let m = t(&[1.0, 1.0, 1.0, 0.0], [2, 1, 1, 2]);
        assert!((value(rrr, &g, &m) - 3.0).abs() < 1e-6);

        // Suggested marks weigh by confidence: red 0.25 on G = 2.
        let g = t(&[2.0, 1.0], [1, 1, 1, 2]);
        let m = t(&[0.25, 0.0], [1, 1, 1, 2]);
        assert!((value(rrr, &g, &m) - 1.0).abs() < 1e-6); // 0.25 · 4
        assert!((value(sq, &g, &m) - 4.0).abs() < 1e-6); // weighted mean of G² over red
        assert!((value(clip, &g, &m) - 0.125).abs() < 1e-6); // 0.25 · 0.5
                                                             // Green with confidence 0.5 on G = 1: weighted mean of 1/(1 + 1) = 0.5.
        let m = t(&[0.0, -0.5], [1, 1, 1, 2]);
        assert!((value(sq, &g, &m) - 0.5).abs() < 1e-6);
        assert!((value(rrr, &g, &m)).abs() < 1e-9, "rrr ignores green");
    }

    #[test]
    fn bad_marks_are_refused() {
        let x = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        let wrong = Tensor::zeros([2, 1, 4, 5], (Kind::Float, Device::Cpu));
        assert!(check_marks(&x, &wrong).is_err());
        let bad = Tensor::full([2, 1, 4, 4], 0.5, (Kind::Float, Device::Cpu));
        assert!(check_marks(&x, &bad)
            .unwrap_err()
            .to_string()
            .contains("-1, 0 or 1"));
        let nan = Tensor::full([2, 1, 4, 4], f64::NAN, (Kind::Float, Device::Cpu));
        assert!(check_marks(&x, &nan).is_err());
        let ok = Tensor::ones([2, 1, 4, 4], (Kind::Float, Device::Cpu)).neg();
        assert!(check_marks(&x, &ok).is_ok());
    }
}
