//! The status bar: connection, queue, experts online, my marks, the serving model.

use super::{ClientApp, Conn, Review, Tab, Work};
use egui::{Color32, Vec2};
use serde::Serialize;

/// What the client shows, in words and figures: the web client mirrors it into an ARIA
/// live region beside its canvas (screen readers cannot read a canvas), where browser tests
/// read it too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveStatus {
    /// "offline", "connecting", "up" or "down".
    pub conn: &'static str,
    /// The connection as the status bar says it.
    pub connection: String,
    /// The banner's text, if one is shown.
    pub banner: Option<String>,
    /// "idle", "leasing", "empty", "marking", "submitting", "skipping", "refining",
    /// "choosing" or "deciding".
    pub work: &'static str,
    pub image_id: Option<String>,
    pub lease_id: Option<String>,
    pub proposal_id: Option<String>,
    /// Where the image lies on screen: left, top (points) and points per image pixel.
    pub image_rect: Option<[f32; 3]>,
}

impl ClientApp {
    /// The connection in words, with the colour of its dot.
    pub fn connection_text(&self) -> (Color32, String) {
        match &self.conn {
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
        }
    }

    pub fn live_status(&self) -> LiveStatus {
        let (work, m, proposal) = match &self.work {
            Work::Idle => ("idle", None, None),
            Work::Leasing => ("leasing", None, None),
            Work::Empty { .. } => ("empty", None, None),
            Work::Marking(m) => ("marking", Some(m), None),
            Work::Submitting { m, .. } => ("submitting", Some(m), None),
            Work::Skipping { m } => ("skipping", Some(m), None),
            Work::Refining { m, proposal_id, .. } => ("refining", Some(m), Some(proposal_id)),
            Work::Choosing { m, proposal } => ("choosing", Some(m), Some(&proposal.proposal_id)),
            Work::Deciding { m, proposal, .. } => {
                ("deciding", Some(m), Some(&proposal.proposal_id))
            }
        };
        LiveStatus {
            conn: match self.conn {
                Conn::Offline => "offline",
                Conn::Connecting => "connecting",
                Conn::Up { .. } => "up",
                Conn::Down { .. } => "down",
            },
            connection: self.connection_text().1,
            banner: self.banner.as_ref().map(|b| b.text.clone()),
            work,
            image_id: m.map(|m| m.lease.image_id.clone()),
            lease_id: m.map(|m| m.lease.lease_id.clone()),
            proposal_id: proposal.cloned(),
            image_rect: self
                .canvas
                .filter(|_| work == "marking")
                .map(|c| [c.image_rect.min.x, c.image_rect.min.y, c.scale]),
        }
    }

    pub(super) fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let (dot, text) = self.connection_text();
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
