//! The screens between images: asking the queue, an empty queue, sending, waiting for the refinement.

use super::{ClientApp, Work};
use crate::platform::Instant;
use mp_proto::v1 as pb;

impl ClientApp {
    pub(super) fn work_screen(&mut self, ui: &mut egui::Ui) {
        match &self.work {
            Work::Idle | Work::Leasing => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Asking the queue for the next image...");
                });
            }
            Work::Empty { retry_at } => {
                let left = retry_at.saturating_duration_since(Instant::now());
                ui.label(format!(
                    "The queue is empty: every image is marked or leased. Checking again in {:.0} s.",
                    left.as_secs_f32().ceil()
                ));
                if ui.button("Check now").clicked() {
                    self.lease();
                }
            }
            Work::Marking(_) => self.marking_screen(ui),
            Work::Submitting { .. } | Work::Skipping { .. } => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Sending...");
                });
            }
            Work::Refining { since, last, .. } => {
                let status = last
                    .as_ref()
                    .and_then(|p| pb::ProposalStatus::try_from(p.status).ok())
                    .map(|s| match s {
                        pb::ProposalStatus::Running => "refining the model",
                        pb::ProposalStatus::Rebasing => "recomputing on the newest model",
                        _ => "waiting for a worker",
                    })
                    .unwrap_or("waiting for a worker");
                let secs = since.elapsed().as_secs_f32();
                ui.vertical_centered(|ui| {
                    ui.add_space(60.0);
                    ui.add(egui::Spinner::new().size(40.0));
                    ui.label(format!("Mark stored. Proposal: {status} ({secs:.0} s)"));
                });
            }
            Work::Choosing { .. } | Work::Deciding { .. } => self.chooser(ui),
        }
    }
}
