//! The review screen (reviewers and admins): an image whose experts' marks disagree, each
//! mark side by side with its expert and what its own proposal did; settle it by accepting
//! one, by per-pixel majority, by the union of red, or with an edit of one's own.

use super::ClientApp;
use crate::mask::MarkLayer;
use crate::net::Cmd;
use crate::view::Slot;
use egui::Vec2;
use mp_proto::marks::{merge_majority, merge_union_red};
use mp_proto::v1 as pb;
use pb::settle_request::Method;

/// An image under review.
#[derive(Debug, Clone)]
pub struct ReviewOpen {
    pub item: pb::ReviewItem,
    pub view: pb::ImageView,
    /// Each expert's mark, decoded, in the item's order.
    pub masks: Vec<Vec<i8>>,
    pub majority: Vec<i8>,
    pub union_red: Vec<i8>,
    /// The reviewer's own mark while editing (starts from the majority).
    pub edit: Option<MarkLayer>,
    pub edit_rev: u64,
}

impl ReviewOpen {
    pub fn new(item: pb::ReviewItem, view: pb::ImageView) -> ReviewOpen {
        let masks: Vec<Vec<i8>> = item
            .marks
            .iter()
            .map(|m| {
                m.mask
                    .as_ref()
                    .and_then(|r| mp_proto::rle::decode(r).ok())
                    .unwrap_or_default()
            })
            .collect();
        let refs: Vec<&[i8]> = masks.iter().map(|m| m.as_slice()).collect();
        ReviewOpen {
            majority: merge_majority(&refs),
            union_red: merge_union_red(&refs),
            masks,
            item,
            view,
            edit: None,
            edit_rev: 0,
        }
    }
}

/// Where the reviewer is.
#[derive(Debug, Clone, Default)]
pub enum Review {
    /// Not asked yet (the tab was never opened).
    #[default]
    Idle,
    Leasing,
    /// Nothing waits for review.
    Empty,
    Open(Box<ReviewOpen>),
    Settling(Box<ReviewOpen>),
    /// Settled; the settled mark's proposal (empty: it marks nothing).
    Done {
        image: String,
        how: String,
        reply: pb::SettleReply,
        /// The settled mark's proposal as last seen (watched until ready, then decided here).
        proposal: Option<Box<pb::Proposal>>,
    },
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Accept => "accepted one expert's mark",
        Method::Majority => "per-pixel majority",
        Method::UnionRed => "union of red, intersection of green",
        Method::Own => "the reviewer's own mark",
        Method::Unspecified => "?",
    }
}

fn status_words(status: i32) -> &'static str {
    use pb::ProposalStatus as S;
    match S::try_from(status).unwrap_or(S::Unspecified) {
        S::Endorsed => "endorsed by its expert",
        S::Ready => "its expert has not decided",
        S::Rejected => "rejected by its expert",
        S::Queued | S::Running | S::Rebasing => "still refining",
        S::Failed => "refinement failed",
        _ => "no proposal",
    }
}

impl ClientApp {
    pub fn lease_review(&mut self) {
        if self.connected() {
            self.review = Review::Leasing;
            self.net.send(Cmd::LeaseReview);
        }
    }

    /// Settles the open review item with `method` (`accept`: the mark id for ACCEPT).
    pub fn settle(&mut self, method: Method, accept: &str) {
        let Review::Open(o) = std::mem::take(&mut self.review) else {
            return;
        };
        let mask = match (method, &o.edit) {
            (Method::Own, Some(l)) if !l.is_empty() => Some(l.to_rle()),
            (Method::Own, _) => {
                self.say(super::Level::Warning, "Mark at least one pixel first.");
                self.review = Review::Open(o);
                return;
            }
            _ => None,
        };
        self.net.send(Cmd::Settle(pb::SettleRequest {
            review_lease_id: o.item.review_lease_id.clone(),
            method: method as i32,
            accept_mark_id: accept.to_string(),
            mask,
        }));
        self.review_method = method;
        self.review = Review::Settling(o);
    }

    pub(super) fn on_review_leased(&mut self, r: Option<Box<(pb::ReviewItem, pb::ImageView)>>) {
        if !matches!(self.review, Review::Leasing) {
            return;
        }
        self.review = match r {
            Some(b) => {
                let (item, view) = *b;
                Review::Open(Box::new(ReviewOpen::new(item, view)))
            }
            None => Review::Empty,
        };
    }

    pub(super) fn on_settled(&mut self, reply: pb::SettleReply) {
        if let Review::Settling(o) = std::mem::take(&mut self.review) {
            if !reply.proposal_id.is_empty() && !reply.duplicate {
                self.net.send(Cmd::Watch {
                    proposal_id: reply.proposal_id.clone(),
                });
            }
            self.review = Review::Done {
                image: o.view.name.clone(),
                how: method_name(self.review_method).to_string(),
                reply,
                proposal: None,
            };
        }
    }

    /// A proposal update for the settled mark under review, if it is that one.
    pub(super) fn on_review_proposal(&mut self, p: &pb::Proposal) {
        if let Review::Done {
            reply, proposal, ..
        } = &mut self.review
        {
            if reply.proposal_id == p.proposal_id {
                *proposal = Some(Box::new(p.clone()));
            }
        }
    }

    pub(super) fn review_screen(&mut self, ui: &mut egui::Ui) {
        match &self.review {
            Review::Idle => {
                ui.label("Images whose experts' marks disagree wait here for a reviewer.");
                if ui.button("Review the next image").clicked() {
                    self.lease_review();
                }
            }
            Review::Leasing => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Asking for the image whose marks agree least...");
                });
            }
            Review::Empty => {
                ui.label("Nothing waits for review: every image with all its marks is settled.");
                if ui.button("Check again").clicked() {
                    self.lease_review();
                }
            }
            Review::Settling(_) => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Settling...");
                });
            }
            Review::Done {
                image,
                how,
                reply,
                proposal,
            } => {
                ui.heading(format!("Image {image} settled: {how}"));
                if reply.proposal_id.is_empty() {
                    ui.label("The settled mark marks nothing: there is nothing to learn from it.");
                } else {
                    ui.label(format!(
                        "Only the settled mark can become guidance. Its proposal {} is yours \
                         to commit once refined.",
                        reply.proposal_id
                    ));
                    use pb::ProposalStatus as S;
                    let status = proposal
                        .as_ref()
                        .map(|p| S::try_from(p.status).unwrap_or(S::Unspecified));
                    let mut decide = None;
                    match (status, proposal) {
                        (Some(S::Ready), Some(p)) => {
                            ui.label(format!(
                                "Refined: validation accuracy {:.1} % before, {:.1} % after.",
                                100.0 * p.val_accuracy_before,
                                100.0 * p.val_accuracy_after
                            ));
                            ui.horizontal(|ui| {
                                if ui.button("Commit the settled mark").clicked() {
                                    decide = Some(true);
                                }
                                if ui.button("Reject it").clicked() {
                                    decide = Some(false);
                                }
                            });
                        }
                        (Some(s), _) if s != S::Queued && s != S::Running => {
                            let name = s.as_str_name().trim_start_matches("PROPOSAL_STATUS_");
                            ui.label(format!("Proposal: {}", name.to_lowercase()));
                        }
                        _ => {
                            ui.horizontal(|ui| {
                                ui.add(egui::Spinner::new());
                                ui.label("Refining the model with the settled mark...");
                            });
                        }
                    }
                    if let Some(commit) = decide {
                        self.net.send(Cmd::Decide {
                            proposal_id: reply.proposal_id.clone(),
                            commit,
                        });
                    }
                }
                if reply.duplicate {
                    ui.label("(The image had been settled already; nothing changed.)");
                }
                if ui.button("Review the next image").clicked() {
                    self.lease_review();
                }
            }
            Review::Open(_) => self.review_open(ui),
        }
    }

    fn review_open(&mut self, ui: &mut egui::Ui) {
        let Review::Open(o) = &mut self.review else {
            return;
        };
        ui.heading(format!(
            "Review image {}: {} experts, agreement κ {:.2}",
            o.view.name,
            o.item.marks.len(),
            o.item.kappa
        ));
        ui.small("Red: the model should not look here. Green: it should. Lowest agreement first.");
        let ctx = ui.ctx().clone();
        let n = o.item.marks.len() + 2;
        let avail = ui.available_width();
        let side = ((avail - 12.0 * n as f32) / n as f32).clamp(80.0, 260.0);
        let (w, h) = (o.view.width as f32, o.view.height as f32);
        let size = Vec2::new(w, h) * (side / w.max(h).max(1.0));
        let mut action: Option<(Method, String)> = None;
        let mut start_edit = false;
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal_top(|ui| {
                for (k, (m, values)) in o.item.marks.iter().zip(&o.masks).enumerate() {
                    ui.vertical(|ui| {
                        ui.strong(if m.expert_name.is_empty() {
                            m.expert_id.as_str()
                        } else {
                            m.expert_name.as_str()
                        });
                        let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
                        self.textures.draw_marked(
                            &ctx,
                            &ui.painter_at(rect),
                            rect,
                            &o.view,
                            values,
                            Slot::Review(k.min(250) as u8),
                            &m.mark_id,
                        );
                        ui.small(status_words(m.proposal_status));
                        if m.val_accuracy_before > 0.0 || m.val_accuracy_after > 0.0 {
                            ui.small(format!(
                                "val {:.1} to {:.1} %",
                                100.0 * m.val_accuracy_before,
                                100.0 * m.val_accuracy_after
                            ));
                        }
                        if ui.button("Accept this mark").clicked() {
                            action = Some((Method::Accept, m.mark_id.clone()));
                        }
                    });
                }
                for (k, (title, values, method)) in [
                    ("Majority", &o.majority, Method::Majority),
                    ("Union of red", &o.union_red, Method::UnionRed),
                ]
                .into_iter()
                .enumerate()
                {
                    ui.vertical(|ui| {
                        ui.strong(title);
                        let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
                        self.textures.draw_marked(
                            &ctx,
                            &ui.painter_at(rect),
                            rect,
                            &o.view,
                            values,
                            Slot::Review(251 + k as u8),
                            &format!("{}/{title}", o.item.review_lease_id),
                        );
                        ui.small(method_name(method));
                        if ui.button(format!("Settle: {title}")).clicked() {
                            action = Some((method, String::new()));
                        }
                    });
                }
            });
        });
        ui.separator();
        match &mut o.edit {
            None => {
                if ui
                    .button("Edit a mark of my own (from the majority)")
                    .clicked()
                {
                    start_edit = true;
                }
            }
            Some(layer) => {
                ui.label("Your mark: drag to paint with the brush (B: red / green), then settle.");
                let big = size * 1.6;
                let (rect, resp) = ui.allocate_exact_size(big, egui::Sense::drag());
                if let Some(pos) = resp.interact_pointer_pos() {
                    let p = [
                        (pos.x - rect.min.x) / big.x * w,
                        (pos.y - rect.min.y) / big.y * h,
                    ];
                    if resp.drag_started() {
                        layer.begin_stroke();
                    }
                    layer.paint_segment(p, p, (w.max(h) / 40.0).max(0.5), self.brush);
                    o.edit_rev += 1;
                }
                self.textures.draw_marked(
                    &ctx,
                    &ui.painter_at(rect),
                    rect,
                    &o.view,
                    layer.values(),
                    Slot::Review(253),
                    &format!("{}/edit/{}", o.item.review_lease_id, o.edit_rev),
                );
                ui.horizontal(|ui| {
                    if ui.button("Settle with my mark").clicked() {
                        action = Some((Method::Own, String::new()));
                    }
                    if ui.button("Undo").clicked() && layer.undo() {
                        o.edit_rev += 1;
                    }
                });
            }
        }
        if start_edit {
            let mut layer = MarkLayer::new(o.view.width, o.view.height);
            layer.accept(&o.majority);
            o.edit = Some(layer);
        }
        if let Some((method, accept)) = action {
            self.settle(method, &accept);
        }
    }
}
