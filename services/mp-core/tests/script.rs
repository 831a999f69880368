//! A user's own TorchScript module through the engine: import checks, every saliency method,
//! guided training and refinement, checkpoints, export back to PyTorch (checked by PyTorch
//! itself), and the batch-norm choice. The modules are made by the venv's PyTorch
//! (`tests/fixtures/torch_module.py`; `MP_PYTHON`, else `python3`).

use mp_core::data::{Dataset, Mask, RED};
use mp_core::loss::{guided_forward, SaliencyLoss};
use mp_core::model::{Arch, BatchNorm, Model, ModelSpec, ScriptSpec};
use mp_core::refine::{refine, RefineConfig};
use mp_core::saliency::{self, Method, Target};
use mp_core::train::{train, TrainConfig};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const SIDE: usize = 16;

fn python() -> String {
    std::env::var("MP_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn fixture_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torch_module.py")
}

/// The fixture modules, made once per test binary.
fn modules() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(python())
            .arg(fixture_script())
            .arg("make")
            .arg(dir.path())
            .args(["--side", &SIDE.to_string()])
            .output()
            .expect("running the venv's python (set MP_PYTHON)");
        assert!(
            out.status.success(),
            "torch_module.py make failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn spec(channels: usize, batch_norm: BatchNorm) -> ModelSpec {
    ModelSpec {
        arch: Arch::TorchScript,
        classes: vec!["a".into(), "b".into(), "c".into()],
        channels,
        height: SIDE,
        width: SIDE,
        version: 1,
        script: Some(ScriptSpec {
            module: String::new(),
            mean: vec![0.5, 0.4, 0.3],
            std: vec![0.25, 0.2, 0.3],
            batch_norm,
        }),
    }
}

fn import(file: &str, spec: ModelSpec) -> mp_core::Result<Model> {
    let bytes = std::fs::read(modules().join(file)).unwrap();
    Model::import(bytes, spec, Device::Cpu)
}

/// Three classes told apart by a stroke (row, column or diagonal) in the middle, of the
/// wrong class in 40 % of the images; a 4x4 patch in the corner, pure red, green or blue by
/// class, always gives the label away. Red marks the patch.
fn shortcut_data(n: usize, seed: u64) -> Dataset {
    let mut rng = mp_core::rng::Rng::new(seed);
    let mut ds = Dataset::new(vec!["a".into(), "b".into(), "c".into()], 3, SIDE, SIDE);
    let hw = SIDE * SIDE;
    for i in 0..n {
        let label = i % 3;
        let mut img: Vec<f32> = (0..3 * hw).map(|_| 0.1 * rng.next_f64() as f32).collect();
        let stroke = if rng.next_f64() < 0.4 {
            (label + 1 + (rng.next_f64() * 2.0) as usize) % 3
        } else {
            label
        };
        for k in 6..14 {
            let (r, c) = match stroke {
                0 => (10, k),
                1 => (k, 10),
                _ => (k, k),
            };
            for ch in 0..3 {
                img[ch * hw + r * SIDE + c] += 0.4;
            }
        }
        let mut mask = Mask::empty(SIDE, SIDE);
        for r in 1..5 {
            for c in 1..5 {
                for ch in 0..3 {
                    img[ch * hw + r * SIDE + c] = if ch == label { 1.0 } else { 0.0 };
                }
                mask.values[r * SIDE + c] = RED;
            }
        }
        ds.push(&img, label as i64, Some(mask), format!("i{i}"));
    }
    ds
}

fn logits(m: &Model, x: &Tensor) -> Tensor {
    tch::no_grad(|| m.forward_t(x, false))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn buffer(m: &Model, name: &str) -> Tensor {
    let bytes = m.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(v.data(), &shape, Kind::Float)
}

#[test]
fn an_imported_module_trains_refines_saves_and_goes_back_to_pytorch() {
    tch::jit::set_graph_executor_optimize(false);
    tch::manual_seed(0);
    let mut model = import("net.pt", spec(3, BatchNorm::Frozen)).unwrap();
    let kinds = model.layer_kinds().unwrap();
    assert!(
        kinds.iter().any(|(_, t)| t.contains("BatchNorm2d")),
        "{kinds:?}"
    );
    // The checkpoint holds the state_dict: parameters and buffers under PyTorch's names.
    let bytes = model.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    for n in [
        "features.0.weight",
        "features.1.running_mean",
        "features.1.num_batches_tracked",
        "head.bias",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    assert_eq!(
        st.tensor("features.1.num_batches_tracked").unwrap().dtype(),
        safetensors::Dtype::I64
    );
    let running = buffer(&model, "features.1.running_mean");

    let data = shortcut_data(240, 1);
    let val = shortcut_data(60, 2);
    let rep = train(
        &mut model,
        &data.without_marks(),
        &[],
        &TrainConfig {
            epochs: 6,
            batch_size: 32,
            lr: 3e-3,
            ..Default::default()
        },
        &mut |_, _, _, _| {},
    )
    .unwrap();
    assert!(rep.final_ce.is_finite(), "{rep:?}");
    let acc = mp_core::train::evaluate(&model, &val, 64).unwrap().accuracy;
    assert!(acc > 0.9, "CE training on the shortcut data reached {acc}");
    // Frozen batch norm: training moved the weights, never the running statistics.
    assert_eq!(
        max_diff(&running, &buffer(&model, "features.1.running_mean")),
        0.0
    );

    // Every saliency method works through the module.
    let (x, y) = val.batch(&[0, 1, 2, 3], Device::Cpu);
    for m in ["gradient", "log-prob", "smoothgrad", "integrated-gradients"] {
        let maps = saliency::saliency_maps(&model, &x, &y, m.parse::<Method>().unwrap()).unwrap();
        assert_eq!(maps.size(), [4, SIDE as i64, SIDE as i64], "{m}");
        assert!(maps.isfinite().all().int64_value(&[]) == 1, "{m}");
        assert!(maps.sum(Kind::Float).double_value(&[]) > 0.0, "{m}");
    }
    // The three losses build a second-order graph into the module's weights.
    let marks = val.mark_batch(&[0, 1, 2, 3], Device::Cpu);
    for loss in [
        SaliencyLoss::Clip { max: 1.0 },
        SaliencyLoss::Squared,
        SaliencyLoss::Rrr,
        SaliencyLoss::RrrJacobian,
    ] {
        let g = guided_forward(&model, loss, &x, &y, &marks, true).unwrap();
        let w = model.var_store().trainable_variables();
        let grads = Tensor::run_backward(&[&g.saliency], &w, false, false);
        let total: f64 = grads
            .iter()
            .map(|t| t.abs().sum(Kind::Float).double_value(&[]))
            .sum();
        assert!(total > 0.0 && total.is_finite(), "{loss:?}: {total}");
    }

    // Refinement on marked images moves attention off the patch.
    let batch = data.subset(&[0, 1, 2, 3, 4, 5]);
    let p = refine(
        &model,
        &batch,
        &val,
        &RefineConfig {
            // The thesis's loss, on the ∂CE/∂x the shares are measured with.
            loss: SaliencyLoss::Clip { max: 1.0 },
            lr: 3e-3,
            max_iterations: 30,
            time_budget_ms: None,
            halve_saliency: false,
            plateau_window: None,
            val_guard: Some(3.0),
            ..Default::default()
        },
    )
    .unwrap();
    // The loop lowers the saliency loss on the patch through the module's second-order graph.
    let start = p.curve[0].saliency_loss;
    let best = p.curve[p.best_iteration].saliency_loss;
    assert!(best < 0.8 * start, "saliency loss {start} -> {best}");
    let proposed = Model::from_bytes(&p.weights, Device::Cpu, Path::new("proposal")).unwrap();
    assert!(max_diff(&logits(&proposed, &x), &logits(&model, &x)) > 0.0);
    model.copy_weights_from(&proposed).unwrap();
    assert_eq!(max_diff(&logits(&proposed, &x), &logits(&model, &x)), 0.0);

    // A checkpoint writes the module beside itself and loads back to the same outputs.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("v2.safetensors");
    model.spec.version = 2;
    model.save(&ckpt).unwrap();
    let module_file = dir.path().join(&model.spec.script.as_ref().unwrap().module);
    assert!(module_file.is_file());
    let back = Model::load(&ckpt, Device::Cpu).unwrap();
    assert_eq!(back.spec, model.spec);
    assert_eq!(max_diff(&logits(&back, &x), &logits(&model, &x)), 0.0);

    // Export, then PyTorch loads both files and reproduces the engine's logits.
    let out = dir.path().join("export");
    let files = model.export(&out).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let s = model.spec.script.as_ref().unwrap();
    let norm = |t: &Tensor| {
        let m = Tensor::from_slice(&s.mean).reshape([1, 3, 1, 1]);
        let d = Tensor::from_slice(&s.std).reshape([1, 3, 1, 1]);
        (t - m) / d
    };
    let (xa, _) = val.batch(&(0..16).collect::<Vec<_>>(), Device::Cpu);
    let want = logits(&model, &xa);
    let x_npy = dir.path().join("x.npy");
    let y_npy = dir.path().join("y.npy");
    norm(&xa).write_npy(&x_npy).unwrap();
    want.write_npy(&y_npy).unwrap();
    let outp = std::process::Command::new(python())
        .arg(fixture_script())
        .args(["check"])
        .args([&out, &x_npy, &y_npy])
        .output()
        .unwrap();
    assert!(
        outp.status.success(),
        "torch_module.py check: {}",
        String::from_utf8_lossy(&outp.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&outp.stdout).unwrap();
    for k in ["torchscript", "state_dict"] {
        let d = report[k].as_f64().unwrap();
        assert!(d <= 1e-5, "{k}: max abs diff {d} ({report})");
    }
}

#[test]
fn a_traced_module_imports_and_trains_too() {
    let mut model = import("traced.pt", spec(3, BatchNorm::Frozen)).unwrap();
    let data = shortcut_data(32, 3);
    let (x, y) = data.batch(&(0..8).collect::<Vec<_>>(), Device::Cpu);
    let before = logits(&model, &x);
    train(
        &mut model,
        &data,
        &[],
        &TrainConfig {
            epochs: 1,
            batch_size: 8,
            ..Default::default()
        },
        &mut |_, _, _, _| {},
    )
    .unwrap();
    assert!(max_diff(&before, &logits(&model, &x)) > 0.0);
    let maps = saliency::saliency_maps(&model, &x, &y, Method::Gradient).unwrap();
    assert_eq!(maps.size(), [8, SIDE as i64, SIDE as i64]);
}

#[test]
fn modules_that_do_not_fit_are_refused_with_the_reason() {
    let e = import("wrong_out.pt", spec(3, BatchNorm::Frozen))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("output is [2, 4]") && e.contains("expected [2, 3]"),
        "{e}"
    );
    let e = import("tuple_out.pt", spec(3, BatchNorm::Frozen))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not accept") || e.contains("forward"),
        "{e}"
    );
    let mut one = spec(3, BatchNorm::Frozen);
    one.channels = 1;
    one.script.as_mut().unwrap().mean = vec![0.5];
    one.script.as_mut().unwrap().std = vec![0.25];
    let e = import("net.pt", one).unwrap_err().to_string();
    assert!(
        e.contains("[2, 1, 16, 16]") && e.contains("does not accept"),
        "{e}"
    );
    let e = import("init_state.pt", spec(3, BatchNorm::Frozen))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a TorchScript module"), "{e}");
    let e = Model::import(
        b"not a module".to_vec(),
        spec(3, BatchNorm::Frozen),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a TorchScript module"), "{e}");
    let mut bad = spec(3, BatchNorm::Frozen);
    bad.script.as_mut().unwrap().std = vec![0.0, 1.0, 1.0];
    let e = import("net.pt", bad).unwrap_err().to_string();
    assert!(e.contains("positive stds"), "{e}");
}

/// The batch-norm choice, measured: how far image 0's guided input gradient moves when the
/// other images of its batch change.
fn coupling(bn: BatchNorm) -> f64 {
    let model = import("net.pt", spec(3, bn)).unwrap();
    let a = shortcut_data(8, 5);
    let b = shortcut_data(8, 6);
    let grad0 = |ds: &Dataset| {
        let idx: Vec<usize> = (0..8).collect();
        let (mut x, y) = ds.batch(&idx, Device::Cpu);
        // Same image 0 in both batches.
        let (x0, _) = a.batch(&[0], Device::Cpu);
        x = Tensor::cat(&[x0, x.narrow(0, 1, 7)], 0);
        let (_, g) = saliency::forward_with_input_gradient(
            &model,
            &x,
            &y,
            Target::CrossEntropy,
            true,
            false,
        )
        .unwrap();
        g.get(0)
    };
    let (ga, gb) = (grad0(&a), grad0(&b));
    max_diff(&ga, &gb) / ga.abs().max().double_value(&[])
}

#[test]
fn frozen_batch_norm_keeps_the_images_of_a_batch_independent() {
    let frozen = coupling(BatchNorm::Frozen);
    let batch = coupling(BatchNorm::Batch);
    // The figure README.md quotes (`-- --nocapture`).
    eprintln!("image 0's input gradient moved by {frozen:.2e} (frozen) and {batch:.3} (batch statistics) of its largest value when the other 7 images changed");
    assert!(frozen < 1e-5, "frozen: {frozen}");
    assert!(
        batch > 1e-3,
        "batch statistics should couple the images: {batch}"
    );
}
