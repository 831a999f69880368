//! Input-gradient saliency: the thesis's map G = ∂CE(f(x), y)/∂x, ∂log p_y/∂x, SmoothGrad and
//! Integrated Gradients, batched. Maps for display are |G| reduced over channels by max.

use crate::error::{CoreError, Result};
use crate::model::Model;
use tch::{Kind, Tensor};

/// The scalar whose input gradient is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Σ_n CE(f(x_n), y_n): the thesis's saliency (3.2, 4.3).
    CrossEntropy,
    /// Σ_n log p_{y_n}(x_n).
    LogProb,
    /// Σ_n Σ_k log p_k(x_n): the "right reasons" gradient of Ross et al. 2017.
    SumLogProbs,
    /// Σ_n Σ_k v_nk log p_k(x_n) with a fresh standard normal v at every call: its input
    /// gradient squared is, in expectation, the squared Frobenius norm of the Jacobian of all
    /// log-probabilities — every direction in which the input moves the prediction, not only
    /// the one the sum of log-probabilities sees.
    ProjectedLogProbs,
}

/// How a displayed saliency map is computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum Method {
    /// ∂CE/∂x (the thesis's map; the default).
    #[default]
    Gradient,
    /// ∂ log p_y / ∂x.
    LogProb,
    /// Mean of ∂CE/∂x over `samples` copies with Gaussian noise of sd `sigma` (x in [0, 1]).
    SmoothGrad { samples: usize, sigma: f64 },
    /// (x − 0) ⊙ mean over a straight path from a black image of ∂ log p_y / ∂x.
    IntegratedGradients { steps: usize },
}

impl std::str::FromStr for Method {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gradient" => Ok(Method::Gradient),
            "log-prob" => Ok(Method::LogProb),
            "smoothgrad" => Ok(Method::SmoothGrad {
                samples: 16,
                sigma: 0.15,
            }),
            "integrated-gradients" => Ok(Method::IntegratedGradients { steps: 32 }),
            _ => Err(CoreError::invalid(format!(
                "unknown saliency method {s:?} (gradient, log-prob, smoothgrad, integrated-gradients)"
            ))),
        }
    }
}

/// Checks that `x` is (N, C, H, W) of the model's input shape and `y` holds N valid classes.
pub fn check_batch(model: &Model, x: &Tensor, y: &Tensor) -> Result<()> {
    let s = &model.spec;
    let want = [s.channels as i64, s.height as i64, s.width as i64];
    let size = x.size();
    if size.len() != 4 || size[1..] != want || size[0] == 0 {
        return Err(CoreError::invalid(format!(
            "images are {size:?}, the model takes (N, {}, {}, {})",
            want[0], want[1], want[2]
        )));
    }
    if y.size() != [size[0]] {
        return Err(CoreError::invalid(format!(
            "{:?} labels for {} images",
            y.size(),
            size[0]
        )));
    }
    // One read back to the host for the three figures (on a GPU each read waits for the
    // device): the smallest and largest label, and whether every pixel is finite.
    let figures = Tensor::f_stack(
        &[
            y.f_min()?.f_to_kind(Kind::Int64)?,
            y.f_max()?.f_to_kind(Kind::Int64)?,
            x.f_isfinite()?.f_all()?.f_to_kind(Kind::Int64)?,
        ],
        0,
    )?
    .f_to_device(tch::Device::Cpu)?;
    let figures = Vec::<i64>::try_from(&figures)?;
    let (lo, hi, finite) = (figures[0], figures[1], figures[2] != 0);
    if lo < 0 || hi >= s.num_classes() {
        return Err(CoreError::invalid(format!(
            "label {} outside 0..{}",
            if lo < 0 { lo } else { hi },
            s.num_classes()
        )));
    }
    if !finite {
        return Err(CoreError::invalid("images hold NaN or infinite values"));
    }
    Ok(())
}

/// The scalar `target` of a batch of logits.
pub fn target_score(logits: &Tensor, y: &Tensor, target: Target) -> Tensor {
    match target {
        Target::CrossEntropy => logits
            .log_softmax(-1, Kind::Float)
            .gather(1, &y.unsqueeze(1), false)
            .sum(Kind::Float)
            .neg(),
        Target::LogProb => logits
            .log_softmax(-1, Kind::Float)
            .gather(1, &y.unsqueeze(1), false)
            .sum(Kind::Float),
        Target::SumLogProbs => logits.log_softmax(-1, Kind::Float).sum(Kind::Float),
        Target::ProjectedLogProbs => {
            let v = tch::no_grad(|| logits.randn_like());
            (logits.log_softmax(-1, Kind::Float) * v).sum(Kind::Float)
        }
    }
}

/// One forward pass with `x` watched, returning the logits and ∂target/∂x (N, C, H, W).
/// With `create_graph` the gradient stays differentiable into the weights (double backprop).
pub fn forward_with_input_gradient(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    target: Target,
    train: bool,
    create_graph: bool,
) -> Result<(Tensor, Tensor)> {
    let x = x.f_detach()?.f_set_requires_grad(true)?;
    let logits = model.forward_t(&x, train);
    let score = target_score(&logits, y, target);
    let mut g = Tensor::f_run_backward(&[&score], &[&x], create_graph, create_graph)?;
    let g = g
        .pop()
        .ok_or_else(|| CoreError::invalid("no input gradient"))?;
    Ok((logits, g))
}

/// Raw attribution (N, C, H, W) of `method` for a batch; no graph kept.
pub fn attribution(model: &Model, x: &Tensor, y: &Tensor, method: Method) -> Result<Tensor> {
    check_batch(model, x, y)?;
    let grad = |x: &Tensor, t: Target| -> Result<Tensor> {
        Ok(forward_with_input_gradient(model, x, y, t, false, false)?.1)
    };
    match method {
        Method::Gradient => grad(x, Target::CrossEntropy),
        Method::LogProb => grad(x, Target::LogProb),
        Method::SmoothGrad { samples, sigma } => {
            if samples == 0 || !(sigma.is_finite() && sigma >= 0.0) {
                return Err(CoreError::invalid(
                    "smoothgrad needs samples > 0 and sigma >= 0",
                ));
            }
            let mut acc = x.zeros_like();
            for _ in 0..samples {
                let noisy = x + x.randn_like() * sigma;
                acc += grad(&noisy, Target::CrossEntropy)?;
            }
            Ok(acc / samples as f64)
        }
        Method::IntegratedGradients { steps } => {
            if steps == 0 {
                return Err(CoreError::invalid("integrated gradients needs steps > 0"));
            }
            let mut acc = x.zeros_like();
            for k in 1..=steps {
                let point = x * (k as f64 / steps as f64);
                acc += grad(&point, Target::LogProb)?;
            }
            Ok(x * acc / steps as f64)
        }
    }
}

/// |attribution| reduced over channels by max: (N, H, W).
pub fn saliency_maps(model: &Model, x: &Tensor, y: &Tensor, method: Method) -> Result<Tensor> {
    Ok(attribution(model, x, y, method)?.abs().amax(1, false))
}

/// One row per image.
pub type Rows = Vec<Vec<f32>>;

/// What an image view shows, for a batch: each image's class probabilities and its raw
/// gradient map for its label (one `Vec` per image each). The scoring pass, the workers'
/// view batches and the gateway all compute views with this.
pub fn probabilities_and_maps(model: &Model, x: &Tensor, y: &Tensor) -> Result<(Rows, Rows)> {
    let probs = crate::train::predict(model, x).f_to_device(tch::Device::Cpu)?;
    let maps = maps_to_vecs(&saliency_maps(model, x, y, Method::Gradient)?)?;
    let probs = (0..probs.size()[0])
        .map(|k| Ok(Vec::<f32>::try_from(&probs.get(k))?))
        .collect::<Result<Vec<_>>>()?;
    Ok((probs, maps))
}

/// Maps (N, H, W) as one `Vec<f32>` per image.
pub fn maps_to_vecs(maps: &Tensor) -> Result<Vec<Vec<f32>>> {
    let maps = maps.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?;
    let n = maps.size()[0];
    (0..n)
        .map(|i| Ok(Vec::<f32>::try_from(&maps.get(i).flatten(0, -1))?))
        .collect()
}

/// Share of Σ|map| on red and on green pixels of a mask (thesis 4.4.6): `(red, green)`.
pub fn impact_shares(map: &[f32], mask: &crate::data::Mask) -> (f64, f64) {
    let (mut total, mut red, mut green) = (0f64, 0f64, 0f64);
    for (&v, &m) in map.iter().zip(&mask.values) {
        let v = v.abs() as f64;
        total += v;
        match m {
            crate::data::RED => red += v,
            crate::data::GREEN => green += v,
            _ => {}
        }
    }
    if total <= 0.0 {
        (0.0, 0.0)
    } else {
        (red / total, green / total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelSpec};
    use tch::Device;

    fn tiny() -> Model {
        tch::manual_seed(3);
        let spec = ModelSpec {
            arch: Arch::SmallCnn,
            classes: vec!["0".into(), "1".into(), "2".into()],
            channels: 1,
            height: 8,
            width: 8,
            version: 0,
            script: None,
        };
        Model::new(spec, Device::Cpu).unwrap()
    }

    #[test]
    fn gradient_saliency_matches_finite_differences() {
        let m = tiny();
        // Pixels from the crate's own generator (libtorch's global one is shared with the
        // tests running beside this one).
        let mut rng = crate::rng::Rng::new(11);
        let px: Vec<f32> = (0..128).map(|_| rng.next_f64() as f32).collect();
        let x = Tensor::from_slice(&px).reshape([2, 1, 8, 8]);
        let y = Tensor::from_slice(&[1i64, 2]);
        for (method, target) in [
            (Method::Gradient, Target::CrossEntropy),
            (Method::LogProb, Target::LogProb),
        ] {
            let g = attribution(&m, &x, &y, method).unwrap();
            let eps = 1e-3;
            for &(n, i) in &[(0i64, 5i64), (0, 27), (1, 40), (1, 63)] {
                let flat = x.flatten(0, -1);
                let idx = n * 64 + i;
                let plus = flat.copy();
                let _ = plus.get(idx).f_add_scalar_(eps).unwrap();
                let minus = flat.copy();
                let _ = minus.get(idx).f_sub_scalar_(eps).unwrap();
                let f = |t: &Tensor| {
                    let logits = m.forward_t(&t.view([2, 1, 8, 8]), false);
                    target_score(&logits, &y, target).double_value(&[])
                };
                let (fp, f0, fm) = (f(&plus), f(&x), f(&minus));
                let an = g.flatten(0, -1).double_value(&[idx]);
                // Central difference, or a one-sided one where a ReLU or max-pool switch
                // lies within `eps` on the other side (the model's weights come from
                // libtorch's global generator, which parallel tests share).
                let fds = [(fp - fm) / (2.0 * eps), (fp - f0) / eps, (f0 - fm) / eps];
                assert!(
                    fds.iter()
                        .any(|fd| (fd - an).abs() <= 1e-3 + 0.05 * an.abs()),
                    "{method:?} pixel {idx}: finite differences {fds:?} vs gradient {an}"
                );
            }
        }
    }

    #[test]
    fn all_methods_give_finite_maps_of_image_shape_and_refuse_bad_batches() {
        let m = tiny();
        let x = Tensor::rand([3, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        for s in ["gradient", "log-prob", "smoothgrad", "integrated-gradients"] {
            let maps = saliency_maps(&m, &x, &y, s.parse().unwrap()).unwrap();
            assert_eq!(maps.size(), [3, 8, 8]);
            assert!(maps.isfinite().all().int64_value(&[]) == 1);
            assert!(maps.sum(Kind::Float).double_value(&[]) > 0.0, "{s}");
        }
        let bad_shape = Tensor::rand([3, 1, 9, 8], (Kind::Float, Device::Cpu));
        assert!(saliency_maps(&m, &bad_shape, &y, Method::Gradient).is_err());
        let bad_label = Tensor::from_slice(&[0i64, 1, 3]);
        let e = saliency_maps(&m, &x, &bad_label, Method::Gradient).unwrap_err();
        assert!(e.to_string().contains("label 3"), "{e}");
        let nan = x.copy();
        let _ = nan.get(0).get(0).get(0).get(0).fill_(f64::NAN);
        let e = saliency_maps(&m, &nan, &y, Method::Gradient).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
    }

    #[test]
    fn projected_log_probs_estimate_the_whole_jacobian() {
        // E over v of |∂(Σ_k v_k log p_k)/∂x|² = Σ_k |∂ log p_k/∂x|² (Hutchinson).
        let m = tiny();
        tch::manual_seed(9);
        let x = Tensor::rand([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64]);
        let grad_of = |f: &dyn Fn(&Tensor) -> Tensor| {
            let xg = x.detach().set_requires_grad(true);
            let logits = m.forward_t(&xg, false);
            let s = f(&logits);
            Tensor::run_backward(&[&s], &[&xg], false, false).remove(0)
        };
        let frobenius: f64 = (0..3)
            .map(|k| {
                let g = grad_of(&|l: &Tensor| l.log_softmax(-1, Kind::Float).get(0).get(k));
                g.square().sum(Kind::Float).double_value(&[])
            })
            .sum();
        let draws = 4000;
        let mean: f64 = (0..draws)
            .map(|_| {
                let (_, g) = forward_with_input_gradient(
                    &m,
                    &x,
                    &y,
                    Target::ProjectedLogProbs,
                    false,
                    false,
                )
                .unwrap();
                g.square().sum(Kind::Float).double_value(&[])
            })
            .sum::<f64>()
            / draws as f64;
        assert!(
            (mean / frobenius - 1.0).abs() < 0.1,
            "estimate {mean} vs Frobenius norm² {frobenius}"
        );
    }

    #[test]
    fn impact_shares_split_the_mass() {
        let mask = crate::data::Mask::from_values(2, 2, vec![1, -1, 0, 0]).unwrap();
        let (r, g) = impact_shares(&[3.0, 1.0, 0.0, 4.0], &mask);
        assert!((r - 0.375).abs() < 1e-12 && (g - 0.125).abs() < 1e-12);
    }
}
