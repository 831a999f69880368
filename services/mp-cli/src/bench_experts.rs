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
    let ordering = p.orderings.first().cloned().unwrap_or("alignment".into());
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
    println!("{s}");
    write_section(&p.out, &format!("experts-{name}"), &s)?;
    Ok(())
}
