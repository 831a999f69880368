//! The project lead's dashboard: validation accuracy by version, marks per expert per day,
//! the agreement matrix, the queue and the leases out, the review queue, and what each
//! expert's commits did — all from the public API (GetStats, GetAgreement, Audit).

use super::ClientApp;
use crate::net::{Cmd, Dashboard};
use crate::platform::Instant;
use egui::{Color32, Pos2, Rect, Stroke, Vec2};
use mp_proto::v1 as pb;
use std::collections::BTreeMap;
use std::time::Duration;

/// How often the open dashboard refreshes.
pub const DASHBOARD_EVERY: Duration = Duration::from_secs(5);

/// Marks per expert (name) per UTC day, from the audit trail's `mark` records.
pub fn marks_per_day(audit: &pb::AuditReport) -> BTreeMap<String, BTreeMap<String, u32>> {
    let mut out: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    for r in audit.records.iter().filter(|r| r.kind == "mark") {
        let who = if r.who_name.is_empty() {
            r.who.clone()
        } else {
            r.who_name.clone()
        };
        *out.entry(who)
            .or_default()
            .entry(day(r.time_ms))
            .or_default() += 1;
    }
    out
}

/// YYYY-MM-DD (UTC) of a time in milliseconds (days to civil date, H. Hinnant).
pub fn day(time_ms: u64) -> String {
    let z = (time_ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A colour from red (κ ≤ 0) through amber to green (κ = 1).
fn kappa_color(k: f64) -> Color32 {
    let t = k.clamp(0.0, 1.0) as f32;
    let (r, g) = if t < 0.5 {
        (220.0, 60.0 + 300.0 * t)
    } else {
        (220.0 - 340.0 * (t - 0.5), 210.0)
    };
    Color32::from_rgb(r as u8, g as u8, 70)
}

/// Validation (and test) accuracy by version as lines.
fn accuracy_plot(ui: &mut egui::Ui, versions: &[pb::ModelVersion], size: Vec2) {
    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    let p = ui.painter_at(rect);
    let text = ui.visuals().text_color();
    p.rect_stroke(
        rect,
        2.0,
        Stroke::new(1.0, Color32::GRAY),
        egui::StrokeKind::Inside,
    );
    let font = egui::FontId::proportional(11.0);
    if versions.is_empty() {
        p.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "no version",
            font,
            text,
        );
        return;
    }
    let inner = Rect::from_min_max(
        rect.min + Vec2::new(36.0, 10.0),
        rect.max - Vec2::new(10.0, 20.0),
    );
    let accs = versions
        .iter()
        .flat_map(|v| [v.val_accuracy, v.test_accuracy])
        .filter(|a| a.is_finite() && *a > 0.0);
    let lo = accs.clone().fold(1.0f64, f64::min).clamp(0.0, 0.9);
    let first = versions.first().map(|v| v.version).unwrap_or(1) as f32;
    let span = (versions.last().map(|v| v.version).unwrap_or(1) as f32 - first).max(1.0);
    let at = |v: u64, a: f64| {
        Pos2::new(
            inner.left() + inner.width() * (v as f32 - first) / span,
            inner.bottom() - inner.height() * ((a - lo) / (1.0 - lo).max(1e-6)) as f32,
        )
    };
    for (label, y) in [(format!("{:.0} %", 100.0 * lo), lo), ("100 %".into(), 1.0)] {
        p.text(
            Pos2::new(rect.left() + 2.0, at(0, y).y),
            egui::Align2::LEFT_CENTER,
            label,
            font.clone(),
            text,
        );
    }
    p.text(
        Pos2::new(inner.center().x, rect.bottom() - 8.0),
        egui::Align2::CENTER_CENTER,
        match versions.last().map(|v| v.version) {
            Some(last) if last as f32 > first => format!("model version v{first} … v{last}"),
            _ => format!("model version v{first}"),
        },
        font.clone(),
        text,
    );
    for (pick, color, name) in [
        (
            (|v: &pb::ModelVersion| v.val_accuracy) as fn(&pb::ModelVersion) -> f64,
            Color32::from_rgb(90, 160, 255),
            "validation",
        ),
        (
            |v: &pb::ModelVersion| v.test_accuracy,
            Color32::from_rgb(240, 170, 60),
            "test",
        ),
    ] {
        let pts: Vec<Pos2> = versions
            .iter()
            .filter(|v| pick(v).is_finite() && pick(v) > 0.0)
            .map(|v| at(v.version, pick(v)))
            .collect();
        if pts.len() > 1 {
            p.add(egui::Shape::line(pts.clone(), Stroke::new(2.0, color)));
        }
        for q in &pts {
            p.circle_filled(*q, 2.5, color);
        }
        let y = if name == "test" { 14.0 } else { 2.0 };
        p.text(
            Pos2::new(inner.right() - 70.0, rect.top() + y + 4.0),
            egui::Align2::LEFT_TOP,
            name,
            font.clone(),
            color,
        );
    }
}

impl ClientApp {
    pub fn refresh_dashboard(&mut self) {
        if self.connected() {
            self.net.send(Cmd::Dashboard);
            self.next_dashboard = Instant::now() + DASHBOARD_EVERY;
        }
    }

    pub(super) fn dashboard_screen(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("Project dashboard");
            if ui.button("Refresh").clicked() {
                self.refresh_dashboard();
            }
        });
        let Some(d) = self.dashboard.clone() else {
            ui.horizontal(|ui| {
                ui.add(egui::Spinner::new());
                ui.label("Loading...");
            });
            return;
        };
        let d: &Dashboard = &d;
        let s = &d.stats;
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                for (k, v) in [
                    ("queue", s.queue_depth),
                    ("leases out", s.leases_out),
                    ("experts online", s.experts_online),
                    ("marks", s.marks_total),
                    ("refinements waiting", s.refine_jobs_pending),
                    ("dead jobs", s.dead_jobs),
                ] {
                    ui.group(|ui| {
                        ui.vertical(|ui| {
                            ui.small(k);
                            ui.strong(v.to_string());
                        });
                    });
                }
            });
            ui.add_space(6.0);
            ui.strong(format!(
                "Review (overlap {}): {} waiting for a reviewer, {} held by one, {} with all \
                 their marks not yet settled, {} settled",
                s.overlap.max(1),
                s.review_queued,
                s.review_leased,
                s.review_unsettled,
                s.review_settled
            ));
            ui.add_space(6.0);
            ui.strong("Accuracy by model version");
            let w = ui.available_width().min(640.0);
            accuracy_plot(ui, &s.accuracy_history, Vec2::new(w, 180.0));
            ui.add_space(6.0);
            ui.columns(2, |cols| {
                cols[0].strong("Marks per expert per day");
                match &d.audit {
                    Ok(a) => marks_table(&mut cols[0], a),
                    Err(e) => {
                        cols[0].label(format!("(the audit trail is for admins: {e})"));
                    }
                }
                cols[1].strong("Agreement between experts (pixel-wise κ)");
                match &d.agreement {
                    Ok(r) => agreement_matrix(&mut cols[1], r),
                    Err(e) => {
                        cols[1].label(format!("(agreement is for admins: {e})"));
                    }
                }
            });
            if let Ok(a) = &d.audit {
                if !a.impact.is_empty() {
                    ui.add_space(6.0);
                    ui.strong("What each expert's commits did");
                    egui::Grid::new("impact").striped(true).show(ui, |ui| {
                        ui.strong("expert");
                        ui.strong("commits");
                        ui.strong("val accuracy moved");
                        ui.end_row();
                        for i in &a.impact {
                            ui.label(&i.name);
                            ui.label(i.commits.to_string());
                            ui.label(format!("{:+.2} points", 100.0 * i.accuracy_delta));
                            ui.end_row();
                        }
                    });
                }
            }
            if let Ok(r) = &d.agreement {
                if !r.images.is_empty() {
                    ui.add_space(6.0);
                    ui.strong("Images the experts agree on least");
                    egui::Grid::new("least").striped(true).show(ui, |ui| {
                        for i in r.images.iter().take(5) {
                            ui.label(&i.image_id);
                            ui.label(i.experts.join(", "));
                            let k = i.figures.as_ref().and_then(|f| f.kappa);
                            ui.label(k.map(|k| format!("κ {k:.2}")).unwrap_or("κ -".into()));
                            ui.end_row();
                        }
                    });
                }
            }
        });
    }
}

fn marks_table(ui: &mut egui::Ui, audit: &pb::AuditReport) {
    let per = marks_per_day(audit);
    let mut days: Vec<String> = per.values().flat_map(|d| d.keys().cloned()).collect();
    days.sort();
    days.dedup();
    let days: Vec<String> = days.into_iter().rev().take(7).rev().collect();
    if per.is_empty() {
        ui.label("No mark yet.");
        return;
    }
    egui::Grid::new("marks_per_day")
        .striped(true)
        .show(ui, |ui| {
            ui.strong("expert");
            for d in &days {
                ui.strong(&d[5..]);
            }
            ui.end_row();
            for (who, by_day) in &per {
                ui.label(who);
                for d in &days {
                    ui.label(by_day.get(d).map(|n| n.to_string()).unwrap_or_default());
                }
                ui.end_row();
            }
        });
}

fn agreement_matrix(ui: &mut egui::Ui, r: &pb::AgreementReport) {
    let mut names: Vec<&str> = r
        .pairs
        .iter()
        .flat_map(|p| [p.expert_a.as_str(), p.expert_b.as_str()])
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        ui.label(if r.overlap <= 1 {
            "Each image goes to one expert (overlap 1): nothing to compare."
        } else {
            "No image has two experts' marks yet."
        });
        return;
    }
    let kappa = |a: &str, b: &str| {
        r.pairs
            .iter()
            .find(|p| (p.expert_a == a && p.expert_b == b) || (p.expert_a == b && p.expert_b == a))
            .and_then(|p| p.figures.as_ref())
            .and_then(|f| f.kappa.map(|k| (k, f.n)))
    };
    egui::Grid::new("agreement").show(ui, |ui| {
        ui.label("");
        for n in &names {
            ui.strong(*n);
        }
        ui.end_row();
        for a in &names {
            ui.strong(*a);
            for b in &names {
                if a == b {
                    ui.label("—");
                    continue;
                }
                match kappa(a, b) {
                    Some((k, n)) => {
                        ui.colored_label(kappa_color(k), format!("{k:.2}"))
                            .on_hover_text(format!("{n} images marked by both"));
                    }
                    None => {
                        ui.label("");
                    }
                }
            }
            ui.end_row();
        }
    });
    if let Some(o) = &r.overall {
        ui.small(format!(
            "Overall: κ {}, red IoU {}, over {} images",
            o.kappa.map(|k| format!("{k:.2}")).unwrap_or("-".into()),
            o.red_iou.map(|k| format!("{k:.2}")).unwrap_or("-".into()),
            o.n
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_marks_per_expert_per_day_come_from_the_audit_trail() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(1_795_000_000_000), "2026-11-18");
        let rec = |kind: &str, who: &str, t: u64| pb::AuditRecord {
            kind: kind.into(),
            who: format!("id-{who}"),
            who_name: who.into(),
            time_ms: t,
            ..Default::default()
        };
        let a = pb::AuditReport {
            records: vec![
                rec("mark", "ann", 0),
                rec("mark", "ann", 1000),
                rec("mark", "ann", 86_400_000),
                rec("decision", "ann", 0),
                rec("mark", "bob", 0),
            ],
            impact: vec![],
        };
        let m = marks_per_day(&a);
        assert_eq!(m["ann"]["1970-01-01"], 2);
        assert_eq!(m["ann"]["1970-01-02"], 1);
        assert_eq!(m["bob"].len(), 1);
    }
}
