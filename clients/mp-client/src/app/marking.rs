//! The marking screen: the image with the model's saliency, the expert's marks and the
//! suggested mark (an outline), and the tools panel.

use super::{CanvasXf, ClientApp, Work, RADIUS_MAX};
use crate::mask::Brush;
use egui::{Color32, Rect, Vec2};

impl ClientApp {
    pub(super) fn tools(&mut self, ui: &mut egui::Ui) {
        ui.heading("Brush");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.brush, Brush::Red, "Red (R)")
                .on_hover_text("Do not look here");
            ui.selectable_value(&mut self.brush, Brush::Green, "Green (G)")
                .on_hover_text("Look here");
        });
        ui.selectable_value(&mut self.brush, Brush::Eraser, "Eraser (E)");
        ui.add(egui::Slider::new(&mut self.settings.radius, 0.0..=RADIUS_MAX).text("radius"))
            .on_hover_text("[ and ] make the brush smaller and larger");
        ui.horizontal(|ui| {
            let (can_undo, can_redo) = self
                .marking()
                .map(|m| (m.layer.can_undo(), m.layer.can_redo()))
                .unwrap_or((false, false));
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .clicked()
            {
                self.undo();
            }
            if ui
                .add_enabled(can_redo, egui::Button::new("Redo"))
                .clicked()
            {
                self.redo();
            }
            if ui.button("Clear").clicked() {
                self.clear();
            }
        });
        if let Some(m) = self.marking() {
            let (r, g) = m.layer.counts();
            ui.label(format!("{r} red, {g} green pixels"));
        }
        ui.separator();
        ui.heading("Saliency");
        ui.checkbox(
            &mut self.settings.show_saliency,
            "Show the model's attention",
        );
        ui.add(egui::Slider::new(&mut self.settings.opacity, 0.0..=1.0).text("opacity"));
        ui.separator();
        ui.heading("Suggestion");
        let suggested = self
            .marking()
            .and_then(|m| m.suggested.as_ref())
            .map(|s| (s.mode.clone(), s.marks));
        match suggested {
            Some((mode, marks)) => {
                ui.label(format!("Suggested from {marks} committed marks ({mode})"));
                ui.checkbox(&mut self.settings.show_suggestion, "Show the outline");
                if ui
                    .button("Accept (A)")
                    .on_hover_text("Take the suggested red and green over; edit, then submit")
                    .clicked()
                {
                    self.accept_suggestion();
                }
            }
            None => {
                ui.small("None for this image yet: suggestions appear once marks are committed.");
            }
        }
        ui.separator();
        ui.horizontal(|ui| {
            ui.label(format!("Zoom {:.0} %", self.zoom * 100.0));
            if ui.button("Fit").clicked() {
                self.fit();
            }
        });
        ui.separator();
        if ui
            .add(egui::Button::new("Submit (Enter)").fill(Color32::from_rgb(40, 110, 60)))
            .clicked()
        {
            self.submit();
        }
        if ui.button("Skip (S)").clicked() {
            self.skip();
        }
        ui.add_space(8.0);
        ui.small(
            "Left drag paints, right or middle drag pans, wheel zooms. \
             [ ] brush size, A accepts the suggestion, Ctrl+Z undo, Ctrl+Shift+Z redo.",
        );
    }

    pub(super) fn marking_screen(&mut self, ui: &mut egui::Ui) {
        let Work::Marking(m) = &self.work else { return };
        let v = &m.view;
        let p = v
            .probabilities
            .get(v.prediction as usize)
            .copied()
            .unwrap_or(0.0);
        ui.horizontal_wrapped(|ui| {
            ui.strong(format!("Image {}", v.name));
            ui.separator();
            ui.label(format!("label: {}", v.label_name));
            ui.separator();
            let verdict = if v.prediction == v.label {
                "right"
            } else {
                "wrong"
            };
            ui.label(format!(
                "prediction: {} ({:.0} %, {verdict})",
                v.prediction_name,
                100.0 * p
            ));
            ui.separator();
            ui.label(format!("model v{}", m.lease.model_version));
            let newest = self
                .stats
                .as_ref()
                .and_then(|s| s.accuracy_history.iter().map(|v| v.version).max())
                .unwrap_or(0);
            if newest > m.lease.model_version {
                ui.separator();
                ui.colored_label(
                    Color32::from_rgb(230, 170, 40),
                    format!(
                        "v{newest} is newer: this view is v{}'s; your marks still count \
                         (the refinement is rebased on the newest model)",
                        m.lease.model_version
                    ),
                );
            }
        });
        let area = ui.available_rect_before_wrap();
        let resp = ui.allocate_rect(area, egui::Sense::click_and_drag());
        let (w, h) = (m.layer.width as f32, m.layer.height as f32);
        let base = (area.width() / w).min(area.height() / h).max(1e-3);
        let scale = base * self.zoom;
        let image_rect = Rect::from_center_size(area.center() + self.pan, Vec2::new(w, h) * scale);
        self.canvas = Some(CanvasXf { image_rect, scale });
        self.canvas_input(ui, area, &resp);

        let Work::Marking(m) = &self.work else { return };
        let ctx = ui.ctx().clone();
        let painter = ui.painter_at(area);
        let xf = self.canvas.unwrap_or(CanvasXf { image_rect, scale });
        let saliency = self
            .settings
            .show_saliency
            .then_some((m.view.saliency.as_slice(), self.settings.opacity));
        self.textures.draw_image(
            &ctx,
            &painter,
            xf.image_rect,
            &m.view,
            saliency,
            &m.layer,
            self.marks_rev,
        );
        if let (true, Some(s)) = (self.settings.show_suggestion, &m.suggested) {
            // Dashed look: every other edge segment bright, the rest dark, so the outline
            // reads on any background.
            for (edges, color) in [
                (&s.red_edges, Color32::from_rgb(255, 90, 90)),
                (&s.green_edges, Color32::from_rgb(90, 255, 120)),
            ] {
                for (k, (a, b)) in edges.iter().enumerate() {
                    let c = if k % 2 == 0 { color } else { Color32::BLACK };
                    painter.line_segment(
                        [xf.to_screen(*a), xf.to_screen(*b)],
                        egui::Stroke::new(2.0, c),
                    );
                }
            }
        }
        if let Some(pos) = resp.hover_pos() {
            let color = match self.brush {
                Brush::Red => Color32::from_rgb(240, 60, 60),
                Brush::Green => Color32::from_rgb(60, 220, 90),
                Brush::Eraser => Color32::WHITE,
            };
            painter.circle_stroke(
                pos,
                self.settings.radius.max(1.0),
                egui::Stroke::new(1.5, color),
            );
        }
    }
}
