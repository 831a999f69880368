//! Keyboard shortcuts and the canvas: painting strokes, panning and zooming.

use super::{ClientApp, Work, RADIUS_MAX};
use crate::mask::Brush;
use egui::{Key, Modifiers, PointerButton, Rect, Vec2};

impl ClientApp {
    pub(super) fn shortcuts(&mut self, ui: &egui::Ui) {
        if ui.ctx().egui_wants_keyboard_input() {
            return;
        }
        #[derive(PartialEq)]
        enum A {
            Red,
            Green,
            Eraser,
            Smaller,
            Bigger,
            Undo,
            Redo,
            Submit,
            Skip,
            Accept,
            Commit,
            Reject,
        }
        let mut actions = Vec::new();
        ui.input_mut(|i| {
            if i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z) {
                actions.push(A::Redo);
            }
            if i.consume_key(Modifiers::COMMAND, Key::Z) {
                actions.push(A::Undo);
            }
            for (key, a) in [
                (Key::R, A::Red),
                (Key::G, A::Green),
                (Key::E, A::Eraser),
                (Key::OpenBracket, A::Smaller),
                (Key::CloseBracket, A::Bigger),
                (Key::Enter, A::Submit),
                (Key::S, A::Skip),
                (Key::A, A::Accept),
                (Key::C, A::Commit),
                (Key::X, A::Reject),
            ] {
                if i.consume_key(Modifiers::NONE, key) {
                    actions.push(a);
                }
            }
        });
        for a in actions {
            match a {
                A::Red => self.brush = Brush::Red,
                A::Green => self.brush = Brush::Green,
                A::Eraser => self.brush = Brush::Eraser,
                A::Smaller => self.settings.radius = (self.settings.radius - 2.0).max(0.0),
                A::Bigger => self.settings.radius = (self.settings.radius + 2.0).min(RADIUS_MAX),
                A::Undo => self.undo(),
                A::Redo => self.redo(),
                A::Submit => self.submit(),
                A::Skip => self.skip(),
                A::Accept => self.accept_suggestion(),
                // In the chooser only (decide ignores them elsewhere).
                A::Commit => self.decide(true),
                A::Reject => self.decide(false),
            }
        }
    }

    /// Paints with the primary button and pans with the secondary or middle one; the
    /// wheel zooms around the pointer. Raw pointer events are used so that every pointer
    /// position of a stroke counts, however many arrive in one frame.
    pub(super) fn canvas_input(&mut self, ui: &egui::Ui, area: Rect, resp: &egui::Response) {
        let Some(xf) = self.canvas else { return };
        let radius = self.settings.radius / xf.scale;
        let brush = self.brush;
        let events = ui.input(|i| i.events.clone());
        let mut changed = false;
        if let Work::Marking(m) = &mut self.work {
            for ev in events {
                match ev {
                    egui::Event::PointerButton {
                        pos,
                        button: PointerButton::Primary,
                        pressed: true,
                        ..
                    } if area.contains(pos) => {
                        let p = xf.to_image(pos);
                        m.layer.begin_stroke();
                        m.layer.paint_segment(p, p, radius, brush);
                        self.stroke = Some(p);
                        changed = true;
                    }
                    egui::Event::PointerMoved(pos) => {
                        if let Some(last) = self.stroke {
                            let p = xf.to_image(pos);
                            m.layer.paint_segment(last, p, radius, brush);
                            self.stroke = Some(p);
                            changed = true;
                        }
                    }
                    egui::Event::PointerButton {
                        pos,
                        button: PointerButton::Primary,
                        pressed: false,
                        ..
                    } => {
                        if let Some(last) = self.stroke.take() {
                            m.layer.paint_segment(last, xf.to_image(pos), radius, brush);
                            changed = true;
                        }
                    }
                    egui::Event::PointerGone => self.stroke = None,
                    _ => {}
                }
            }
        }
        if changed {
            self.marks_rev += 1;
        }
        if resp.dragged_by(PointerButton::Secondary) || resp.dragged_by(PointerButton::Middle) {
            self.pan += resp.drag_delta();
        }
        if resp.hovered() {
            let (scroll, pinch, pointer) = ui.input(|i| {
                (
                    i.smooth_scroll_delta.y,
                    i.zoom_delta(),
                    i.pointer.hover_pos(),
                )
            });
            let factor = pinch * (scroll * 0.002).exp();
            if (factor - 1.0).abs() > 1e-4 {
                let new_zoom = (self.zoom * factor).clamp(0.25, 40.0);
                let f = new_zoom / self.zoom;
                let p = pointer.unwrap_or(area.center());
                let centre = xf.image_rect.center();
                let new_centre = p - (p - centre) * f;
                self.pan += new_centre - centre;
                self.zoom = new_zoom;
            }
        }
    }

    pub fn fit(&mut self) {
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
    }
}
