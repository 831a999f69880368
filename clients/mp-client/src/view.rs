//! Drawing: the image with the saliency map blended over it, the marks, and the impact
//! curves. Textures are rebuilt only when what they show changes.

use crate::mask::MarkLayer;
use egui::{Color32, ColorImage, Painter, Pos2, Rect, Stroke, TextureHandle, TextureOptions};
use mp_proto::v1 as pb;
use std::collections::HashMap;

/// The whole texture.
const FULL_UV: Rect = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));

/// Which picture a texture belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Image,
    Saliency,
    Marks,
    Before,
    After,
    /// The k-th picture of the review screen.
    Review(u8),
}

/// Textures by slot, each with the key of what it shows.
#[derive(Default)]
pub struct Textures {
    slots: HashMap<Slot, (String, TextureHandle)>,
}

impl Textures {
    fn get(
        &mut self,
        ctx: &egui::Context,
        slot: Slot,
        key: String,
        make: impl FnOnce() -> ColorImage,
    ) -> egui::TextureId {
        match self.slots.get(&slot) {
            Some((k, t)) if *k == key => t.id(),
            _ => {
                let t = ctx.load_texture(format!("{slot:?}"), make(), TextureOptions::NEAREST);
                let id = t.id();
                self.slots.insert(slot, (key, t));
                id
            }
        }
    }

    /// The image itself, tinted by `tint` (white: as it is).
    fn draw_base(
        &mut self,
        ctx: &egui::Context,
        painter: &Painter,
        rect: Rect,
        view: &pb::ImageView,
        tint: Color32,
    ) {
        let key = format!("{}@{}", view.image_id, view.model_version);
        let img = self.get(ctx, Slot::Image, key, || image_of(view));
        painter.image(img, rect, FULL_UV, tint);
    }

    /// The image, its saliency (values and opacity) when shown, and the marks.
    #[allow(clippy::too_many_arguments)]
    pub fn draw_image(
        &mut self,
        ctx: &egui::Context,
        painter: &Painter,
        rect: Rect,
        view: &pb::ImageView,
        saliency: Option<(&[f32], f32)>,
        layer: &MarkLayer,
        marks_rev: u64,
    ) {
        self.draw_base(ctx, painter, rect, view, Color32::WHITE);
        if let Some((s, opacity)) = saliency {
            if s.len() == (view.width * view.height) as usize {
                let key = format!("{}@{}/{opacity:.3}", view.image_id, view.model_version);
                let t = self.get(ctx, Slot::Saliency, key, || {
                    heat(view.width, view.height, s, opacity)
                });
                painter.image(t, rect, FULL_UV, Color32::WHITE);
            }
        }
        let t = self.get(ctx, Slot::Marks, format!("{marks_rev}"), || {
            marks_image(layer, 150)
        });
        painter.image(t, rect, FULL_UV, Color32::WHITE);
    }

    /// The image with a mark over it (`values`, one per pixel): a reviewer's side-by-side
    /// pictures. Rebuilt when `key` changes.
    #[allow(clippy::too_many_arguments)]
    pub fn draw_marked(
        &mut self,
        ctx: &egui::Context,
        painter: &Painter,
        rect: Rect,
        view: &pb::ImageView,
        values: &[i8],
        slot: Slot,
        key: &str,
    ) {
        self.draw_base(ctx, painter, rect, view, Color32::WHITE);
        if values.len() == (view.width * view.height) as usize {
            let t = self.get(ctx, slot, key.to_string(), || {
                values_image(view.width, view.height, values, 150)
            });
            painter.image(t, rect, FULL_UV, Color32::WHITE);
        }
        painter.rect_stroke(
            rect,
            0.0,
            Stroke::new(1.0, Color32::GRAY),
            egui::StrokeKind::Outside,
        );
    }

    /// A picture for the chooser: the image dimmed, the saliency map at full opacity scaled
    /// to its own 99th percentile, the marks faint. Built once per proposal and slot.
    #[allow(clippy::too_many_arguments)]
    pub fn draw_overlay(
        &mut self,
        ctx: &egui::Context,
        painter: &Painter,
        rect: Rect,
        view: &pb::ImageView,
        saliency: Map<'_>,
        layer: &MarkLayer,
        slot: Slot,
        proposal_id: &str,
    ) {
        // The image dimmed, so that the attention map reads clearly on top of it.
        self.draw_base(ctx, painter, rect, view, Color32::from_gray(140));
        if saliency.values.len() == (saliency.width * saliency.height) as usize
            && saliency.width > 0
        {
            let t = self.get(ctx, slot, proposal_id.to_string(), || {
                let saliency = &saliency.resized(view.width, view.height);
                let scale = percentile_scale(saliency);
                let scaled: Vec<f32> = saliency.iter().map(|v| v / scale).collect();
                let mut heat = heat(view.width, view.height, &scaled, 1.0);
                // Outline the marks faintly on top, so the eye can compare.
                for (px, &v) in heat.pixels.iter_mut().zip(layer.values()) {
                    if v != 0 {
                        *px = blend(*px, mark_color(v, 110));
                    }
                }
                heat
            });
            painter.image(t, rect, FULL_UV, Color32::WHITE);
        }
        painter.rect_stroke(
            rect,
            0.0,
            Stroke::new(1.0, Color32::GRAY),
            egui::StrokeKind::Outside,
        );
    }
}

/// A saliency map and its size, which may be smaller than the image's (pooled).
#[derive(Clone, Copy)]
pub struct Map<'a> {
    pub values: &'a [f32],
    pub width: u32,
    pub height: u32,
}

impl Map<'_> {
    /// The map at `width`×`height`, each pixel taking the value of the map cell it falls
    /// in (nearest neighbour: a pooled cell stays one block).
    pub fn resized(&self, width: u32, height: u32) -> Vec<f32> {
        if (width, height) == (self.width, self.height) {
            return self.values.to_vec();
        }
        let (w, h) = (width as usize, height as usize);
        let (mw, mh) = (self.width as usize, self.height as usize);
        (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                self.values[(y * mh / h).min(mh - 1) * mw + (x * mw / w).min(mw - 1)]
            })
            .collect()
    }
}

/// The 99th percentile of a map's finite values (1 when there are none or it is 0): dividing
/// by it makes any map visible whatever the gradients' magnitude (as the image view does).
pub fn percentile_scale(map: &[f32]) -> f32 {
    let mut v: Vec<f32> = map.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 1.0;
    }
    let k = ((v.len() - 1) as f32 * 0.99).round() as usize;
    let (_, p, _) = v.select_nth_unstable_by(k, f32::total_cmp);
    if *p > 0.0 {
        *p
    } else {
        1.0
    }
}

/// The image's pixels as a texture (gray or RGB, 8 bits).
pub fn image_of(v: &pb::ImageView) -> ColorImage {
    let (w, h) = (v.width as usize, v.height as usize);
    let n = w * h;
    match v.channels {
        3 if v.pixels.len() == 3 * n => {
            let rgba: Vec<u8> = v
                .pixels
                .chunks(3)
                .flat_map(|c| [c[0], c[1], c[2], 255])
                .collect();
            ColorImage::from_rgba_unmultiplied([w, h], &rgba)
        }
        _ if v.pixels.len() >= n => ColorImage::from_gray([w, h], &v.pixels[..n]),
        _ => ColorImage::new(
            [w.max(1), h.max(1)],
            vec![Color32::DARK_GRAY; w.max(1) * h.max(1)],
        ),
    }
}

/// Saliency in [0, 1] as an inferno heat map whose alpha grows with the value.
pub fn heat(width: u32, height: u32, s: &[f32], opacity: f32) -> ColorImage {
    let pixels = s
        .iter()
        .map(|&v| {
            let v = if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let [r, g, b] = inferno(v);
            let a = (opacity.clamp(0.0, 1.0) * (0.15 + 0.85 * v) * 255.0) as u8;
            Color32::from_rgba_unmultiplied(r, g, b, a)
        })
        .collect();
    ColorImage::new([width as usize, height as usize], pixels)
}

fn mark_color(v: i8, alpha: u8) -> Color32 {
    if v > 0 {
        Color32::from_rgba_unmultiplied(235, 40, 40, alpha)
    } else {
        Color32::from_rgba_unmultiplied(40, 210, 70, alpha)
    }
}

fn blend(under: Color32, over: Color32) -> Color32 {
    let a = over.a() as f32 / 255.0;
    let mix = |u: u8, o: u8| (u as f32 * (1.0 - a) + o as f32 * a) as u8;
    let [ur, ug, ub, ua] = under.to_srgba_unmultiplied();
    let [or, og, ob, _] = over.to_srgba_unmultiplied();
    Color32::from_rgba_unmultiplied(mix(ur, or), mix(ug, og), mix(ub, ob), ua.max(over.a()))
}

/// The marks as a texture: red and green, transparent elsewhere.
pub fn marks_image(layer: &MarkLayer, alpha: u8) -> ColorImage {
    values_image(layer.width, layer.height, layer.values(), alpha)
}

/// Mark values (one per pixel) as a texture: red and green, transparent elsewhere.
pub fn values_image(width: u32, height: u32, values: &[i8], alpha: u8) -> ColorImage {
    let pixels = values
        .iter()
        .map(|&v| match v {
            0 => Color32::TRANSPARENT,
            v => mark_color(v, alpha),
        })
        .collect();
    ColorImage::new([width as usize, height as usize], pixels)
}

/// Matplotlib's inferno colour map, interpolated between nine of its stops.
pub fn inferno(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 9] = [
        [0.0, 0.0, 4.0],
        [31.0, 12.0, 72.0],
        [85.0, 15.0, 109.0],
        [136.0, 34.0, 106.0],
        [186.0, 54.0, 85.0],
        [227.0, 89.0, 51.0],
        [249.0, 140.0, 10.0],
        [249.0, 201.0, 50.0],
        [252.0, 255.0, 164.0],
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let c = |k: usize| (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    [c(0), c(1), c(2)]
}

/// Thesis fig. 6.7: the share of saliency on red and on green pixels over the refinement
/// iterations.
pub fn impact_plot(
    painter: &Painter,
    rect: Rect,
    curve: &[pb::ImpactPoint],
    visuals: &egui::Visuals,
) {
    let text = visuals.text_color();
    painter.rect_stroke(
        rect,
        2.0,
        Stroke::new(1.0, Color32::GRAY),
        egui::StrokeKind::Inside,
    );
    let inner = rect
        .shrink2(egui::vec2(34.0, 16.0))
        .translate(egui::vec2(10.0, -4.0));
    let font = egui::FontId::proportional(11.0);
    if curve.len() < 2 {
        painter.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "no curve",
            font,
            text,
        );
        return;
    }
    let max_it = curve.iter().map(|p| p.iteration).max().unwrap_or(1).max(1) as f32;
    let max_y = curve
        .iter()
        .flat_map(|p| [p.share_red, p.share_green])
        .fold(0.0f64, f64::max)
        .max(1e-6) as f32;
    let at = |it: u32, y: f64| {
        Pos2::new(
            inner.left() + inner.width() * it as f32 / max_it,
            inner.bottom() - inner.height() * (y as f32 / max_y),
        )
    };
    painter.line_segment(
        [inner.left_bottom(), inner.right_bottom()],
        Stroke::new(1.0, text),
    );
    painter.line_segment(
        [inner.left_bottom(), inner.left_top()],
        Stroke::new(1.0, text),
    );
    painter.text(
        inner.left_top() - egui::vec2(4.0, 0.0),
        egui::Align2::RIGHT_TOP,
        format!("{:.0}%", 100.0 * max_y),
        font.clone(),
        text,
    );
    painter.text(
        inner.left_bottom() - egui::vec2(4.0, 0.0),
        egui::Align2::RIGHT_BOTTOM,
        "0",
        font.clone(),
        text,
    );
    painter.text(
        inner.right_bottom() + egui::vec2(0.0, 2.0),
        egui::Align2::RIGHT_TOP,
        format!("iteration {max_it:.0}"),
        font.clone(),
        text,
    );
    for (color, name, pick) in [
        (Color32::from_rgb(235, 60, 60), "red", 0),
        (Color32::from_rgb(60, 210, 90), "green", 1),
    ] {
        let pts: Vec<Pos2> = curve
            .iter()
            .map(|p| {
                at(
                    p.iteration,
                    if pick == 0 {
                        p.share_red
                    } else {
                        p.share_green
                    },
                )
            })
            .collect();
        painter.add(egui::Shape::line(pts, Stroke::new(2.0, color)));
        let y = inner.top() + 4.0 + 14.0 * pick as f32;
        painter.text(
            Pos2::new(inner.right() - 4.0, y),
            egui::Align2::RIGHT_TOP,
            format!("share on {name}"),
            font.clone(),
            color,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_map_is_drawn_at_the_image_size_in_blocks() {
        let m = Map {
            values: &[1.0, 2.0, 3.0, 4.0],
            width: 2,
            height: 2,
        };
        let r = m.resized(4, 3);
        assert_eq!(
            r,
            vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
        );
        assert_eq!(m.resized(2, 2), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn percentile_scale_is_the_99th_percentile() {
        let a: Vec<f32> = (0..200).rev().map(|i| i as f32).collect();
        assert_eq!(percentile_scale(&a), 197.0);
        assert_eq!(percentile_scale(&[0.0, 0.0, f32::NAN]), 1.0);
        assert_eq!(percentile_scale(&[]), 1.0);
    }
}
