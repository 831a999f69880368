//! The chooser: saliency before and after the refinement, the validation figures, the impact curves; commit or reject.

use super::{words, ClientApp, Work};
use crate::view;
use egui::{Color32, Vec2};

impl ClientApp {
    pub(super) fn chooser(&mut self, ui: &mut egui::Ui) {
        let (m, proposal, deciding) = match &self.work {
            Work::Choosing { m, proposal } => (m, proposal, false),
            Work::Deciding { m, proposal, .. } => (m, proposal, true),
            _ => return,
        };
        ui.heading("Before and after: where the model looks");
        ui.small(
            "Each map is scaled to its own 99th percentile: compare where the model looks; \
             the curves below show how its attention moved.",
        );
        let ctx = ui.ctx().clone();
        let avail = ui.available_size();
        let side = ((avail.x - 24.0) / 2.0).min(avail.y * 0.5).max(64.0);
        let (w, h) = (m.layer.width as f32, m.layer.height as f32);
        let size = Vec2::new(w, h) * (side / w.max(h));
        // Proposals made before maps were bounded carry no map size: the image's.
        let (map_w, map_h) = match (proposal.map_width, proposal.map_height) {
            (0, _) | (_, 0) => (proposal.width, proposal.height),
            size => size,
        };
        ui.horizontal(|ui| {
            for (title, sal, slot) in [
                ("Before", &proposal.saliency_before, view::Slot::Before),
                ("After", &proposal.saliency_after, view::Slot::After),
            ] {
                ui.vertical(|ui| {
                    ui.label(title);
                    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
                    self.textures.draw_overlay(
                        &ctx,
                        &ui.painter_at(rect),
                        rect,
                        &m.view,
                        view::Map {
                            values: sal,
                            width: map_w,
                            height: map_h,
                        },
                        &m.layer,
                        slot,
                        &proposal.proposal_id,
                    );
                });
            }
        });
        egui::Grid::new("numbers")
            .num_columns(3)
            .striped(true)
            .show(ui, |ui| {
                ui.label("");
                ui.strong("before");
                ui.strong("after");
                ui.end_row();
                ui.label("validation accuracy (val split, as in the status bar)");
                ui.label(format!("{:.2} %", 100.0 * proposal.val_accuracy_before));
                ui.label(format!("{:.2} %", 100.0 * proposal.val_accuracy_after));
                ui.end_row();
                ui.label("validation loss");
                ui.label(format!("{:.4}", proposal.val_loss_before));
                ui.label(format!("{:.4}", proposal.val_loss_after));
                ui.end_row();
            });
        if let (Some(first), Some(last)) = (proposal.curve.first(), proposal.curve.last()) {
            let why = match proposal.stop_reason.as_str() {
                "" => String::new(),
                r => format!("; stopped: {}", words(r)),
            };
            ui.label(format!(
                "Saliency loss on your marks {:.4} -> {:.4} over {} iteration(s){why}",
                first.saliency_loss, last.saliency_loss, last.iteration
            ));
        }
        if !proposal.message.is_empty() {
            ui.label(&proposal.message);
        }
        ui.label("Share of the model's attention on your marks during refinement:");
        let plot_h = (ui.available_height() - 40.0).clamp(80.0, 220.0);
        let (rect, _) = ui.allocate_exact_size(
            Vec2::new(ui.available_width().min(520.0), plot_h),
            egui::Sense::hover(),
        );
        view::impact_plot(&ui.painter_at(rect), rect, &proposal.curve, ui.visuals());
        let mut decision = None;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    !deciding,
                    egui::Button::new("Commit (C)").fill(Color32::from_rgb(40, 110, 60)),
                )
                .clicked()
            {
                decision = Some(true);
            }
            if ui
                .add_enabled(!deciding, egui::Button::new("Reject (X)"))
                .clicked()
            {
                decision = Some(false);
            }
            if deciding {
                ui.add(egui::Spinner::new());
            }
        });
        if let Some(commit) = decision {
            self.decide(commit);
        }
    }
}
