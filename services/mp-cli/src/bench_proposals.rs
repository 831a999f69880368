//! `mp bench proposals`: what an expert sees in the chooser. One refinement proposal per
//! marked image from the unguided base model, with the earlier defaults (stop as soon as the
//! saliency loss halved, no minimum) and the current ones (stop when the marked image's red
//! share of attention halved, at least `min_iterations`), on the same images: iterations,
//! the drop of the red share, the rise of the green share and the validation figures per
//! proposal.

use crate::common::{load_splits, DataArgs};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_core::refine::{refine, HalveOn, Proposal, RefineConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ProposalsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Marked training images, one proposal each
    #[arg(long, default_value_t = 30)]
    pub images: usize,
    /// Epochs of the base model
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Summary {
    iterations: f64,
    red_drop: f64,
    green_rise: f64,
    red_after: f64,
    val_change: f64,
    ms: f64,
    stops: BTreeMap<String, usize>,
}

fn summarise(ps: &[Proposal]) -> Summary {
    let mut stops = BTreeMap::new();
    for p in ps {
        *stops.entry(format!("{:?}", p.stop)).or_default() += 1;
    }
    let shares: Vec<((f64, f64), (f64, f64))> = ps.iter().map(|p| p.shares()).collect();
    Summary {
        iterations: median(ps.iter().map(|p| p.iterations as f64).collect()),
        red_drop: median(shares.iter().map(|((r0, _), (r1, _))| r0 - r1).collect()),
        green_rise: median(shares.iter().map(|((_, g0), (_, g1))| g1 - g0).collect()),
        red_after: median(shares.iter().map(|(_, (r1, _))| *r1).collect()),
        val_change: median(
            ps.iter()
                .map(|p| p.val_after.accuracy - p.val_before.accuracy)
                .collect(),
        ),
        ms: median(ps.iter().map(|p| p.elapsed_ms as f64).collect()),
        stops,
    }
}

pub fn run(a: ProposalsArgs) -> Result<()> {
    let splits = load_splits(&a.data)?;
    let marked = splits.train.marked_indices();
    if marked.len() < a.images || a.images == 0 {
        bail!(
            "--images {}: {} training images carry a mark",
            a.images,
            marked.len()
        );
    }
    let ds = &splits.train;
    let base = crate::bench_efficacy::unguided_base(ds, a.epochs)?;
    let mut order = marked.clone();
    mp_core::rng::Rng::new(7).shuffle(&mut order);
    let before = RefineConfig {
        halve_on: HalveOn::SaliencyLoss,
        min_iterations: 0,
        ..Default::default()
    };
    let after = RefineConfig::default();
    let mut rows = Vec::new();
    for (name, cfg) in [("earlier defaults", &before), ("current defaults", &after)] {
        let mut ps = Vec::new();
        for &i in &order[..a.images] {
            ps.push(refine(&base, &ds.subset(&[i]), &splits.val, cfg)?);
        }
        rows.push((name, summarise(&ps)));
    }
    let mut s = format!(
        "## Proposals on {}: what the chooser shows\n\nCommand: `mp bench proposals {}`  \nDate: {}; machine: {}. \
         One proposal per marked training image ({} images, the same for both settings) from the unguided base model (small CNN, {} epochs); \
         validation figures on the whole val split ({} images), as the status bar's. Medians per proposal. Earlier defaults: stop once the saliency loss halved \
         (with `rrr` it often halves after one step while the attention barely moves). Current: stop once the marked image's share of attention on red halved, \
         after at least {} iterations; the other criteria (validation guard 1.2×, plateau over 3, 50 iterations, 5 s) as before.\n\n\
         | settings | iterations | red share drop | red share after | green share rise | val acc change (points) | ms | stops |\n|---|---|---|---|---|---|---|---|\n",
        splits.name,
        crate::report::command_args(),
        today(),
        machine_line(),
        a.images,
        a.epochs,
        splits.val.len(),
        after.min_iterations
    );
    for (name, m) in &rows {
        s.push_str(&format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {:+.2} | {:.0} | {} |\n",
            m.iterations,
            m.red_drop,
            m.red_after,
            m.green_rise,
            100.0 * m.val_change,
            m.ms,
            m.stops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!("{s}");
    write_section(&a.out, &format!("proposals-{}", splits.name), &s)?;
    Ok(())
}
