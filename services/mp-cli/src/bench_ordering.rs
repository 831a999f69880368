//! `mp bench ordering`: does a review-queue signal put the images that carry the shortcut
//! first, before anyone has marked anything? On a set where only some training images carry
//! the shortcut (`mp data … --shortcut-share S`), the unguided base model scores every
//! training image with each mark-free signal; the ground-truth marks say which images
//! carry a shortcut (a red part). Reported per signal: the share of shortcut images among
//! the first 10 / 20 / 50 of the queue, and the AUC (the chance that a shortcut image is
//! ranked before a clean one; 0.5 is random).

use crate::common::{load_splits, DataArgs};
use crate::report::{machine_line, today, write_section};
use anyhow::{bail, Result};
use clap::Args;
use mp_core::align::margin_score;
use mp_core::reliance::{reliance, RelianceConfig};
use mp_core::saliency::probabilities_and_maps;
use std::path::PathBuf;

#[derive(Args)]
pub struct OrderingArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Epochs of the base model
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Share of positives among the first `k` of `order`.
fn precision_at(order: &[usize], positive: &[bool], k: usize) -> f64 {
    let k = k.min(order.len());
    order[..k].iter().filter(|&&i| positive[i]).count() as f64 / k.max(1) as f64
}

/// Mann–Whitney AUC of `first` (higher = reviewed earlier) for `positive`; ties count half.
fn auc(first: &[f64], positive: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..first.len()).collect();
    idx.sort_by(|&a, &b| first[a].total_cmp(&first[b]));
    // Average ranks (1-based) with ties.
    let mut rank = vec![0f64; idx.len()];
    let mut s = 0;
    while s < idx.len() {
        let mut e = s;
        while e + 1 < idx.len() && first[idx[e + 1]] == first[idx[s]] {
            e += 1;
        }
        let r = (s + e) as f64 / 2.0 + 1.0;
        for &i in &idx[s..=e] {
            rank[i] = r;
        }
        s = e + 1;
    }
    let np = positive.iter().filter(|&&p| p).count() as f64;
    let nn = positive.len() as f64 - np;
    let sum: f64 = (0..rank.len())
        .filter(|&i| positive[i])
        .map(|i| rank[i])
        .sum();
    (sum - np * (np + 1.0) / 2.0) / (np * nn)
}

/// `first` (higher first) as a rank within each class, the best of every class in turn.
fn per_class(first: &[f64], labels: &[i64]) -> Vec<f64> {
    mp_core::align::confidence_ranks(first, labels)
        .into_iter()
        .map(|r| -r)
        .collect()
}

/// Share of Σ|g| on the `share` most salient pixels.
fn concentration(map: &[f32], share: f64) -> f64 {
    let mut v: Vec<f64> = map.iter().map(|x| x.abs() as f64).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = v.iter().sum();
    let k = ((share * v.len() as f64).ceil() as usize).min(v.len());
    if total > 0.0 {
        v[..k].iter().sum::<f64>() / total
    } else {
        0.0
    }
}

pub fn run(a: OrderingArgs) -> Result<()> {
    let splits = load_splits(&a.data)?;
    let ds = &splits.train;
    let positive: Vec<bool> = ds
        .marks
        .iter()
        .map(|m| m.as_ref().is_some_and(|m| m.red_count() > 0))
        .collect();
    let np = positive.iter().filter(|&&p| p).count();
    if np == 0 || np == ds.len() {
        bail!(
            "{} of {} training images carry a red mark: the ordering bench needs a set with the shortcut in some images only (mp data … --shortcut-share)",
            np,
            ds.len()
        );
    }
    let base = crate::bench_efficacy::unguided_base(ds, a.epochs)?;
    let test_acc = mp_core::train::evaluate(&base, &splits.test, 512)?.accuracy;
    let erase: Vec<(String, RelianceConfig)> = [(0.02, 1), (0.05, 1), (0.1, 1), (0.2, 1), (0.3, 1)]
        .into_iter()
        .map(|(share, grow)| {
            (
                format!(
                    "erase the top {:.0} % salient pixels{}: drop of p(label)",
                    100.0 * share,
                    if grow > 0 { ", grown by 1" } else { "" }
                ),
                RelianceConfig { share, grow },
            )
        })
        .collect();
    // Higher = reviewed earlier, per signal.
    let mut margin = Vec::with_capacity(ds.len());
    let mut conc = Vec::with_capacity(ds.len());
    let mut drops: Vec<Vec<f64>> = vec![Vec::with_capacity(ds.len()); erase.len()];
    let mut left: Vec<Vec<f64>> = vec![Vec::with_capacity(ds.len()); erase.len()];
    let mut conf = Vec::with_capacity(ds.len());
    let idx: Vec<usize> = (0..ds.len()).collect();
    let t = std::time::Instant::now();
    for chunk in idx.chunks(64) {
        let (x, y) = ds.batch(chunk, base.device());
        let (probs, maps) = probabilities_and_maps(&base, &x, &y)?;
        margin.extend(probs.iter().map(|p| -margin_score(p)));
        conc.extend(maps.iter().map(|m| concentration(m, 0.02)));
        let labels = Vec::<i64>::try_from(&y)?;
        let before: Vec<f64> = probs
            .iter()
            .zip(&labels)
            .map(|(p, &l)| p[l as usize] as f64)
            .collect();
        conf.extend(before.iter().copied());
        for ((d, l), (_, c)) in drops.iter_mut().zip(left.iter_mut()).zip(&erase) {
            let r = reliance(&base, &x, &y, &probs, &maps, c)?;
            l.extend(r.iter().zip(&before).map(|(r, b)| b - r));
            d.extend(r);
        }
    }
    let per_image_ms = 1e3 * t.elapsed().as_secs_f64() / ds.len() as f64;
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        (
            "margin (the `alignment` ordering's cold start): least certain first".into(),
            margin,
        ),
        (
            "saliency concentration: share of Σ|g| on the top 2 % pixels".into(),
            conc,
        ),
    ];
    rows.push(("p(label), most confident first".into(), conf.clone()));
    rows.push((
        "p(label), most confident first per class (the `attention` ordering's cold start)".into(),
        per_class(&conf, &ds.labels),
    ));
    rows.push((
        "p(label) left after erasing the top 2 %, per class".into(),
        per_class(&left[0], &ds.labels),
    ));
    rows.extend(erase.iter().map(|(n, _)| n.clone()).zip(drops));
    rows.extend(
        erase
            .iter()
            .map(|(n, _)| n.replace("drop of p(label)", "p(label) left, highest first"))
            .zip(left),
    );
    let base_rate = np as f64 / ds.len() as f64;
    let mut s = format!(
        "## Queue signals on {}: are the shortcut images reviewed first?\n\nCommand: `mp bench ordering {}`  \nDate: {}; machine: {}. \
         Unguided base model (small CNN, {} epochs, seed 0; {:.2} % test accuracy). {} of the {} training images carry the shortcut (a red part in their ground-truth mark); \
         a random order finds them at that rate ({:.1} %). Each signal ranks every training image with no mark anywhere; shown: the share of shortcut images among the first 10 / 20 / 50, \
         and the AUC (the chance a shortcut image comes before a clean one). All signals but the margin come from the gradient map and forward passes only. \
         Scoring with every signal took {:.1} ms per image.\n\n\
         | signal | first 10 | first 20 | first 50 | AUC |\n|---|---|---|---|---|\n| random | {:.1} % | {:.1} % | {:.1} % | 0.500 |\n",
        splits.name,
        crate::report::command_args(),
        today(),
        machine_line(),
        a.epochs,
        100.0 * test_acc,
        np,
        ds.len(),
        100.0 * base_rate,
        per_image_ms,
        100.0 * base_rate,
        100.0 * base_rate,
        100.0 * base_rate,
    );
    for (name, first) in &rows {
        let mut order: Vec<usize> = (0..first.len()).collect();
        order.sort_by(|&x, &y| first[y].total_cmp(&first[x]).then(x.cmp(&y)));
        s.push_str(&format!(
            "| {name} | {:.0} % | {:.0} % | {:.0} % | {:.3} |\n",
            100.0 * precision_at(&order, &positive, 10),
            100.0 * precision_at(&order, &positive, 20),
            100.0 * precision_at(&order, &positive, 50),
            auc(first, &positive)
        ));
    }
    println!("{s}");
    write_section(&a.out, &format!("ordering-{}", splits.name), &s)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_precision_by_hand() {
        let pos = [true, false, true, false];
        // Perfect: both positives score highest.
        assert_eq!(auc(&[0.9, 0.1, 0.8, 0.2], &pos), 1.0);
        assert_eq!(auc(&[0.1, 0.9, 0.2, 0.8], &pos), 0.0);
        // All tied: one half.
        assert_eq!(auc(&[0.5; 4], &pos), 0.5);
        // One of the four pairs misordered.
        assert_eq!(auc(&[0.9, 0.5, 0.4, 0.1], &pos), 0.75);
        assert_eq!(precision_at(&[0, 2, 1, 3], &pos, 2), 1.0);
        assert_eq!(precision_at(&[1, 0, 2, 3], &pos, 2), 0.5);
        assert!((concentration(&[4.0, 1.0, 0.0, 0.0], 0.25) - 0.8).abs() < 1e-12);
    }
}
