//! `mp bench experts`: simulated experts who disagree (issue 13, item 7). The whole platform
//! (redis-server, gateway, trainer, workers as processes) runs one round per configuration
//! and seed: careful experts only, a third of them sloppy or adversarial with one expert per
//! image, and the same crowd with overlap and a reviewer. Test accuracy after the round, and
//! how the marks were settled.

use crate::bench_platform::{base_model, run_once, Crowd, Env, PlatformArgs, Run};
use crate::report::{machine_line, mean_sd, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_api::sim;
use std::time::Instant;

#[derive(Args)]
pub struct ExpertsArgs {
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// The crowd with bad experts: expert k marks as the k-th profile
    #[arg(long, default_value = "careful=4,sloppy=1,adversarial=1")]
    pub mix: String,
    /// Experts per image in the overlapping configuration
    #[arg(long, default_value_t = 3)]
    pub overlap: u32,
    #[arg(long, default_value_t = 1)]
    pub reviewers: usize,
    #[arg(long, default_value_t = mp_store::DEFAULT_REVIEW_BELOW)]
    pub review_below: f64,
    /// Leave-one-expert-out on the first seed's one-expert-per-image run with the mixed
    /// crowd: the base model fine-tuned (as the trainer's training phase does) with every
    /// committed mark, then without each expert's, scored on the test split
    #[arg(long)]
    pub leave_one_out: bool,
}

/// Test accuracy of the base model fine-tuned with the guidance `marks` (image id, values)
/// the way the trainer's training phase does (its default configuration, `epochs` epochs).
fn guided_accuracy(
    base: &std::path::Path,
    splits: &crate::common::Splits,
    marks: &[(&str, &[i8])],
    epochs: usize,
) -> Result<f64> {
    let mut train = splits.train.clone();
    let index: std::collections::HashMap<String, usize> = (0..train.len())
        .map(|i| (crate::init::image_id(&train, i), i))
        .collect();
    let mut guidance = Vec::new();
    for (id, values) in marks {
        let Some(&i) = index.get(*id) else {
            bail!("committed mark of {id}: no such training image");
        };
        train.marks[i] = Some(mp_core::data::Mask {
            width: train.width,
            height: train.height,
            values: values.to_vec(),
        });
        guidance.push(i);
    }
    let t = mp_node::trainer::TrainerConfig::default();
    let mut cfg = t.train.clone();
    cfg.epochs = epochs;
    cfg.seed = 1;
    cfg.guidance = (!guidance.is_empty()).then(|| t.guidance.clone());
    let device = mp_core::device::auto();
    let mut model = mp_core::model::Model::load(base, device)?;
    mp_core::train::train(&mut model, &train, &guidance, &cfg, &mut |_, _, _, _| {})?;
    Ok(mp_core::train::evaluate(&model, &splits.test, 512)?.accuracy)
}

/// One leave-one-expert-out row.
struct LooRow {
    expert: String,
    profile: String,
    marks: usize,
    /// Test accuracy without the expert's marks.
    accuracy: f64,
}

/// Test accuracy with every committed mark, and one row per expert who committed.
fn leave_one_out(
    run: &Run,
    profiles: &[sim::Profile],
    base: &std::path::Path,
    data: &std::path::Path,
    epochs: usize,
) -> Result<(f64, Vec<LooRow>)> {
    let splits = crate::common::load_splits(&crate::common::DataArgs {
        data: Some(data.to_path_buf()),
        mnist: None,
        data_seed: 0,
        resize: None,
    })?;
    let all: Vec<(&str, &[i8])> = run
        .committed
        .iter()
        .map(|(_, id, v)| (id.as_str(), v.as_slice()))
        .collect();
    let with_all = guided_accuracy(base, &splits, &all, epochs)?;
    let mut names: Vec<&str> = run.committed.iter().map(|(n, _, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    let mut rows = Vec::new();
    for name in names {
        let rest: Vec<(&str, &[i8])> = run
            .committed
            .iter()
            .filter(|(n, _, _)| n != name)
            .map(|(_, id, v)| (id.as_str(), v.as_slice()))
            .collect();
        let acc = guided_accuracy(base, &splits, &rest, epochs)?;
        // Simulated experts are called `expert-k`; expert k marks as the k-th profile.
        let profile = name
            .rsplit('-')
            .next()
            .and_then(|k| k.parse::<usize>().ok())
            .and_then(|k| profiles.get(k % profiles.len().max(1)))
            .map(|p| format!("{p:?}").to_lowercase())
            .unwrap_or_else(|| "careful".into());
        let n = run.committed.len() - rest.len();
        eprintln!("leave out {name} ({profile}, {n} marks): {acc:.4} (all: {with_all:.4})");
        rows.push(LooRow {
            expert: name.to_string(),
            profile,
            marks: n,
            accuracy: acc,
        });
    }
    Ok((with_all, rows))
}

struct Config {
    name: String,
    crowd: Crowd,
}

pub fn run(a: ExpertsArgs) -> Result<()> {
    let p = &a.platform;
    if p.marks == 0 || p.seeds == 0 {
        bail!("--marks and --seeds must be positive");
    }
    let profiles = sim::parse_mix(&a.mix).map_err(|e| anyhow::anyhow!("--mix: {e}"))?;
    let n = profiles.len().max(1);
    let configs = [
        Config {
            name: format!("{n} careful experts, overlap 1"),
            crowd: Crowd::careful(n),
        },
        Config {
            name: format!("{}, overlap 1", a.mix),
            crowd: Crowd {
                profiles: profiles.clone(),
                ..Crowd::careful(n)
            },
        },
        Config {
            name: format!(
                "{}, overlap {} + {} reviewer(s), review below κ {}",
                a.mix, a.overlap, a.reviewers, a.review_below
            ),
            crowd: Crowd {
                profiles: profiles.clone(),
                overlap: a.overlap,
                reviewers: a.reviewers,
                review_below: a.review_below,
                ..Crowd::careful(n)
            },
        },
    ];
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let data = crate::bench_platform::data_folder(p, dir)?;
    let base = base_model(&data, dir)?;
    let env = Env {
        a: p,
        data: &data,
        base: &base,
        dir,
    };
    let ordering = p.orderings.first().cloned().unwrap_or("attention".into());
    let mut results: Vec<(usize, Run)> = Vec::new();
    for seed in 0..p.seeds {
        for (k, c) in configs.iter().enumerate() {
            let t = Instant::now();
            let r = run_once(&env, &ordering, seed, &c.crowd)?;
            eprintln!(
                "{}: seed {seed}: {:?} in {:.0} s",
                c.name,
                r.curve(),
                t.elapsed().as_secs_f64()
            );
            results.push((k, r));
        }
    }
    let name = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let mut s = format!(
        "## Simulated experts who disagree: overlap and review on {name}\n\n\
         Command: `mp bench experts {}`  \nDate: {}; machine: {}. The whole platform as processes (redis-server, gateway, trainer, {} workers); \
         one round per run: the experts mark until {} images have their marks, every proposal is decided (experts commit whatever the validation says; \
         with overlap their own proposals only endorse, and the settled mark's proposal is committed by whoever settled it), then the trainer fine-tunes for {} epochs with guidance. \
         Profiles — careful: the ground truth; sloppy: its outline off by 2 px and 60 % of it; adversarial: its colours swapped (red on the digit, green on the shortcut). \
         The simulated reviewer accepts the mark closest to the ground truth (red IoU). Every run starts from the same base model in a fresh Redis; total {:.0} s.\n\n\
         | experts | seeds | test acc % after the round (mean ± sd) | per seed | settled by majority | settled by review |\n|---|---|---|---|---|---|\n",
        crate::report::command_args(),
        today(),
        machine_line(),
        p.workers,
        p.marks,
        p.epochs_per_round,
        t0.elapsed().as_secs_f64()
    );
    let base_acc = results
        .first()
        .and_then(|(_, r)| r.curve().first().map(|c| c.1))
        .unwrap_or(f64::NAN);
    for (k, c) in configs.iter().enumerate() {
        let rs: Vec<&Run> = results
            .iter()
            .filter(|(i, _)| *i == k)
            .map(|(_, r)| r)
            .collect();
        let accs: Vec<f64> = rs
            .iter()
            .filter_map(|r| r.curve().last().map(|c| c.1))
            .collect();
        let (m, sd) = mean_sd(&accs);
        let majority: usize = rs
            .iter()
            .map(|r| {
                r.events
                    .iter()
                    .filter(|e| e.settled_decision.is_some())
                    .count()
            })
            .sum();
        let review: usize = rs
            .iter()
            .map(|r| r.events.iter().filter(|e| e.in_review).count())
            .sum();
        s.push_str(&format!(
            "| {} | {} | {:.2} ± {:.2} | {} | {} | {} |\n",
            c.name,
            accs.len(),
            100.0 * m,
            100.0 * sd,
            accs.iter()
                .map(|x| format!("{:.2}", 100.0 * x))
                .collect::<Vec<_>>()
                .join(", "),
            if c.crowd.overlap > 1 {
                majority.to_string()
            } else {
                "-".into()
            },
            if c.crowd.overlap > 1 {
                review.to_string()
            } else {
                "-".into()
            },
        ));
    }
    s.push_str(&format!(
        "\nBase model (before any mark): {:.2} % test accuracy.\n",
        100.0 * base_acc
    ));
    if a.leave_one_out {
        if let Some((_, run)) = results.iter().find(|(k, r)| *k == 1 && r.seed == 0) {
            let (all, rows) = leave_one_out(run, &profiles, &base, &data, p.epochs_per_round)?;
            s.push_str(&format!(
                "\nLeave one expert out (the run \"{}\", seed 0): the base model fine-tuned offline as the trainer's training phase does ({} epochs, its guidance settings, one seed) with the {} committed marks, then without each expert's; test accuracy. With every mark: **{:.2} %**.\n\n\
                 | expert | profile | committed marks | test acc % without them | change from leaving them out |\n|---|---|---|---|---|\n",
                configs[1].name,
                p.epochs_per_round,
                run.committed.len(),
                100.0 * all
            ));
            for r in rows {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.2} | {:+.2} points |\n",
                    r.expert,
                    r.profile,
                    r.marks,
                    100.0 * r.accuracy,
                    100.0 * (r.accuracy - all)
                ));
            }
        }
    }
    println!("{s}");
    write_section(&p.out, &format!("experts-{name}"), &s)?;
    Ok(())
}
