//! The status bar: connection, queue, experts online, my marks, the serving model.

use super::{ClientApp, Conn, Review, Tab};
use egui::{Color32, Vec2};

impl ClientApp {
    pub(super) fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let (dot, text) = match &self.conn {
                Conn::Offline => (Color32::GRAY, "Not connected".to_string()),
                Conn::Connecting => (
                    Color32::from_rgb(230, 170, 40),
                    format!("Connecting to {}...", self.settings.addr),
                ),
                Conn::Up { addr, whoami } => (
                    Color32::from_rgb(60, 200, 90),
                    format!("Connected to {addr} as {whoami}"),
                ),
                Conn::Down { why, .. } => (
                    Color32::from_rgb(235, 80, 70),
                    format!("Connection lost, retrying ({why}); nothing drawn is lost"),
                ),
            };
            let (r, _) = ui.allocate_exact_size(Vec2::splat(12.0), egui::Sense::hover());
            ui.painter().circle_filled(r.center(), 5.0, dot);
            ui.label(text);
            if let Some(s) = &self.stats {
                ui.separator();
                ui.label(format!("Queue {}", s.queue_depth));
                ui.separator();
                ui.label(format!("Experts online {}", s.experts_online));
                ui.separator();
                ui.label(format!("My marks {}", self.my_marks()));
                if let Some(v) = s.accuracy_history.last() {
                    ui.separator();
                    ui.label(format!(
                        "Model v{} | val {:.1} %",
                        v.version,
                        100.0 * v.val_accuracy
                    ));
                }
            }
            if self.connected() {
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if ui.button("Disconnect").clicked() {
                        self.disconnect();
                    }
                    ui.separator();
                    for (tab, label) in [
                        (Tab::Dashboard, "Dashboard"),
                        (Tab::Review, "Review"),
                        (Tab::Mark, "Mark"),
                    ] {
                        if ui.selectable_label(self.tab == tab, label).clicked() && self.tab != tab
                        {
                            self.tab = tab;
                            match tab {
                                Tab::Review if matches!(self.review, Review::Idle) => {
                                    self.lease_review()
                                }
                                Tab::Dashboard => self.refresh_dashboard(),
                                _ => {}
                            }
                        }
                    }
                });
            }
        });
    }
}
