//! The product's promise at test scale: a handful of marks fix a model that learned a
//! shortcut from the whole training set.

use mp_core::loss::SaliencyLoss;
use mp_core::model::{Arch, Model, ModelSpec};
use mp_core::refine::{refine, RefineConfig};
use mp_core::saliency::{maps_to_vecs, saliency_maps, Method};
use mp_core::suggest::{Propagation, SuggestMode};
use mp_core::train::{evaluate, train, GuidanceConfig, TrainConfig};
use mp_e2e::{shortcut_dataset, SIDE};
use tch::Device;

fn fresh(seed: i64) -> Model {
    tch::manual_seed(seed);
    let spec = ModelSpec {
        arch: Arch::SmallCnn,
        classes: (0..4).map(|c| c.to_string()).collect(),
        channels: 1,
        height: SIDE,
        width: SIDE,
        version: 1,
        script: None,
    };
    Model::new(spec, Device::Cpu).unwrap()
}

fn red_share(model: &Model, ds: &mp_core::data::Dataset) -> f64 {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let (x, y) = ds.batch(&idx, Device::Cpu);
    let maps = maps_to_vecs(&saliency_maps(model, &x, &y, Method::Gradient).unwrap()).unwrap();
    let total: f64 = maps
        .iter()
        .zip(&ds.marks)
        .map(|(m, k)| mp_core::saliency::impact_shares(m, k.as_ref().unwrap()).0)
        .sum();
    total / ds.len() as f64
}

#[test]
fn eight_marks_with_learned_propagation_undo_a_moving_shortcut_learnt_from_all_images() {
    tch::set_num_threads(1);
    let train_ds = shortcut_dataset(800, true, 1);
    let test = shortcut_dataset(400, false, 2);
    let cfg = TrainConfig {
        epochs: 6,
        ..Default::default()
    };

    let mut plain = fresh(0);
    train(&mut plain, &train_ds, &[], &cfg, &mut |_, _, _, _| {}).unwrap();
    let plain_acc = evaluate(&plain, &test, 256).unwrap().accuracy;
    let plain_red = red_share(&plain, &test);

    let marked: Vec<usize> = (0..8).collect();
    let guided_cfg = TrainConfig {
        guidance: Some(GuidanceConfig {
            batch_size: 8,
            swap: 0.5,
            ..GuidanceConfig::new(SaliencyLoss::RrrJacobian, 0.1, Propagation::Auto)
        }),
        ..cfg
    };
    let mut guided = fresh(0);
    let report = train(
        &mut guided,
        &train_ds,
        &marked,
        &guided_cfg,
        &mut |_, _, _, _| {},
    )
    .unwrap();
    // The patch moves, so the union of eight marks would land on bars elsewhere: the
    // cross-validated choice must be a learned mode.
    let fit = report.propagation.expect("propagation report");
    eprintln!("propagation: {}", fit.summary());
    assert_ne!(fit.chosen, SuggestMode::Union, "{}", fit.summary());
    let guided_acc = evaluate(&guided, &test, 256).unwrap().accuracy;
    let guided_red = red_share(&guided, &test);

    eprintln!("plain: acc {plain_acc:.3} red share {plain_red:.3}; guided: acc {guided_acc:.3} red share {guided_red:.3}");
    assert!(
        plain_acc < 0.75,
        "the fixture should teach the shortcut: {plain_acc}"
    );
    // The ceiling: the same model trained on twins of the training images whose patch shade
    // is random. Eight marks must close at least half the gap from the shortcut to it.
    let mut clean = fresh(0);
    train(
        &mut clean,
        &shortcut_dataset(800, false, 1),
        &[],
        &cfg,
        &mut |_, _, _, _| {},
    )
    .unwrap();
    let clean_acc = evaluate(&clean, &test, 256).unwrap().accuracy;
    eprintln!("clean-trained: acc {clean_acc:.3}");
    assert!(
        guided_acc - plain_acc >= 0.5 * (clean_acc - plain_acc),
        "guided {guided_acc} vs plain {plain_acc}, clean-trained {clean_acc}"
    );
    assert!(
        guided_red < 0.5 * plain_red,
        "red share {plain_red} -> {guided_red}"
    );

    // One refinement proposal on a single marked image moves saliency off the shortcut.
    let p = refine(
        &plain,
        &train_ds.subset(&[3]),
        &test,
        &RefineConfig {
            time_budget_ms: None,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "stop {:?} iterations {} best {} curve {:?}",
        p.stop, p.iterations, p.best_iteration, p.curve
    );
    let ((r0, _), (r1, _)) = p.shares();
    assert!(r1 < r0, "proposal red share {r0} -> {r1}");
}
