//! The expert's marks at the image's own resolution: brush strokes rasterised to pixels,
//! undo / redo, and the run-length encoding that travels to the gateway.
//!
//! Values follow the API: +1 red ("do not look here"), −1 green ("look here"), 0 unmarked.

use mp_proto::v1::RleMask;

/// What the brush paints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Brush {
    Red,
    Green,
    Eraser,
}

impl Brush {
    pub fn value(self) -> i8 {
        match self {
            Brush::Red => 1,
            Brush::Green => -1,
            Brush::Eraser => 0,
        }
    }
}

/// Undo history is bounded so a long session does not grow without limit.
const MAX_HISTORY: usize = 200;

/// One image's marks with an undo / redo history of whole strokes.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkLayer {
    pub width: u32,
    pub height: u32,
    values: Vec<i8>,
    undo: Vec<Vec<i8>>,
    redo: Vec<Vec<i8>>,
}

impl MarkLayer {
    pub fn new(width: u32, height: u32) -> MarkLayer {
        MarkLayer {
            width,
            height,
            values: vec![0; (width * height) as usize],
            undo: Vec::new(),
            redo: Vec::new(),
        }
    }

    /// Row-major values, one per pixel.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    pub fn get(&self, x: u32, y: u32) -> i8 {
        self.values[(y * self.width + x) as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|&v| v == 0)
    }

    /// (red, green) pixel counts.
    pub fn counts(&self) -> (usize, usize) {
        let red = self.values.iter().filter(|&&v| v > 0).count();
        let green = self.values.iter().filter(|&&v| v < 0).count();
        (red, green)
    }

    /// Starts a stroke: everything painted until the next call undoes as one step.
    pub fn begin_stroke(&mut self) {
        self.snapshot();
    }

    fn snapshot(&mut self) {
        self.undo.push(self.values.clone());
        if self.undo.len() > MAX_HISTORY {
            self.undo.remove(0);
        }
        self.redo.clear();
    }

    /// Paints the capsule around the segment `a`–`b` (image pixel coordinates, where pixel
    /// (x, y) covers [x, x+1) × [y, y+1)): every pixel whose centre lies within `radius`
    /// pixels of the segment, and always the pixels under `a` and `b` themselves, so a
    /// radius of 0 paints a one-pixel line.
    pub fn paint_segment(&mut self, a: [f32; 2], b: [f32; 2], radius: f32, brush: Brush) {
        let v = brush.value();
        let r = radius.max(0.0);
        let (w, h) = (self.width as i64, self.height as i64);
        let x0 = (a[0].min(b[0]) - r - 1.0).floor().max(0.0) as i64;
        let x1 = ((a[0].max(b[0]) + r + 1.0).ceil() as i64).min(w - 1);
        let y0 = (a[1].min(b[1]) - r - 1.0).floor().max(0.0) as i64;
        let y1 = ((a[1].max(b[1]) + r + 1.0).ceil() as i64).min(h - 1);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let c = [x as f32 + 0.5, y as f32 + 0.5];
                if distance_to_segment(c, a, b) <= r {
                    self.values[(y * w + x) as usize] = v;
                }
            }
        }
        // The segment itself: step through it in sub-pixel increments so the pixels it
        // crosses are painted even with radius 0.
        let len = ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
        let steps = (len * 4.0).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f32 / steps as f32;
            let p = [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])];
            let (px, py) = (p[0].floor() as i64, p[1].floor() as i64);
            if (0..w).contains(&px) && (0..h).contains(&py) {
                self.values[(py * w + px) as usize] = v;
            }
        }
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    pub fn undo(&mut self) -> bool {
        match self.undo.pop() {
            Some(prev) => {
                self.redo.push(std::mem::replace(&mut self.values, prev));
                true
            }
            None => false,
        }
    }

    pub fn redo(&mut self) -> bool {
        match self.redo.pop() {
            Some(next) => {
                self.undo.push(std::mem::replace(&mut self.values, next));
                true
            }
            None => false,
        }
    }

    /// Clears every mark (undoable).
    pub fn clear(&mut self) {
        if !self.is_empty() {
            self.snapshot();
            self.values.iter_mut().for_each(|v| *v = 0);
        }
    }

    /// Takes over a suggested mark (one undoable step): every pixel the suggestion marks red
    /// or green gets that value; the expert's other pixels stay. False when the suggestion
    /// does not fit this image or marks nothing new.
    pub fn accept(&mut self, suggested: &[i8]) -> bool {
        if suggested.len() != self.values.len()
            || suggested
                .iter()
                .zip(&self.values)
                .all(|(&s, &v)| s == 0 || s.signum() == v)
        {
            return false;
        }
        self.snapshot();
        for (v, &s) in self.values.iter_mut().zip(suggested) {
            if s != 0 {
                *v = s.signum();
            }
        }
        true
    }

    pub fn to_rle(&self) -> RleMask {
        mp_proto::rle::encode(self.width, self.height, &self.values)
    }
}

/// The outline of the red (`+1`) or green (`-1`) region of a mask: unit edges between a pixel
/// of that value and a neighbour (or the border) without it, as pairs of image points.
pub fn outline(width: u32, height: u32, values: &[i8], value: i8) -> Vec<([f32; 2], [f32; 2])> {
    let (w, h) = (width as i64, height as i64);
    let at = |x: i64, y: i64| -> bool {
        (0..w).contains(&x) && (0..h).contains(&y) && values[(y * w + x) as usize] == value
    };
    let mut edges = Vec::new();
    if values.len() as i64 != w * h {
        return edges;
    }
    for y in 0..h {
        for x in 0..w {
            if !at(x, y) {
                continue;
            }
            let (fx, fy) = (x as f32, y as f32);
            if !at(x, y - 1) {
                edges.push(([fx, fy], [fx + 1.0, fy]));
            }
            if !at(x, y + 1) {
                edges.push(([fx, fy + 1.0], [fx + 1.0, fy + 1.0]));
            }
            if !at(x - 1, y) {
                edges.push(([fx, fy], [fx, fy + 1.0]));
            }
            if !at(x + 1, y) {
                edges.push(([fx + 1.0, fy], [fx + 1.0, fy + 1.0]));
            }
        }
    }
    edges
}

/// Euclidean distance from `p` to the segment `a`–`b`.
pub fn distance_to_segment(p: [f32; 2], a: [f32; 2], b: [f32; 2]) -> f32 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let len2 = dx * dx + dy * dy;
    let t = if len2 == 0.0 {
        0.0
    } else {
        (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2).clamp(0.0, 1.0)
    };
    let (qx, qy) = (a[0] + t * dx, a[1] + t * dy);
    ((p[0] - qx).powi(2) + (p[1] - qy).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radius_zero_paints_the_crossed_pixels_only() {
        let mut m = MarkLayer::new(10, 10);
        m.begin_stroke();
        m.paint_segment([1.5, 2.5], [6.5, 2.5], 0.0, Brush::Red);
        let painted: Vec<(u32, u32)> = (0..10)
            .flat_map(|y| (0..10).map(move |x| (x, y)))
            .filter(|&(x, y)| m.get(x, y) != 0)
            .collect();
        assert_eq!(painted, (1..=6).map(|x| (x, 2)).collect::<Vec<_>>());
        assert_eq!(m.counts(), (6, 0));
    }

    #[test]
    fn capsule_covers_centres_within_radius() {
        let mut m = MarkLayer::new(20, 20);
        m.begin_stroke();
        m.paint_segment([5.0, 10.0], [15.0, 10.0], 1.6, Brush::Green);
        for y in 0..20 {
            for x in 0..20 {
                let c = [x as f32 + 0.5, y as f32 + 0.5];
                let inside = distance_to_segment(c, [5.0, 10.0], [15.0, 10.0]) <= 1.6
                    || (y == 10 && (5..=15).contains(&x));
                assert_eq!(m.get(x, y) == -1, inside, "pixel {x},{y}");
            }
        }
    }

    #[test]
    fn strokes_undo_redo_and_clear() {
        let mut m = MarkLayer::new(8, 8);
        m.begin_stroke();
        m.paint_segment([0.5, 0.5], [3.5, 0.5], 0.0, Brush::Red);
        let after_first = m.values().to_vec();
        m.begin_stroke();
        m.paint_segment([0.5, 4.5], [0.5, 7.5], 0.0, Brush::Green);
        assert_eq!(m.counts(), (4, 4));
        assert!(m.undo());
        assert_eq!(m.values(), &after_first[..]);
        assert!(m.redo());
        assert_eq!(m.counts(), (4, 4));
        m.begin_stroke();
        m.paint_segment([0.5, 0.5], [1.5, 0.5], 0.0, Brush::Eraser);
        assert_eq!(m.counts(), (2, 4));
        m.clear();
        assert!(m.is_empty());
        assert!(m.undo());
        assert_eq!(m.counts(), (2, 4));
        assert!(!m.redo() || m.is_empty());
    }

    #[test]
    fn strokes_off_the_image_are_clipped() {
        let mut m = MarkLayer::new(4, 4);
        m.begin_stroke();
        m.paint_segment([-10.0, -10.0], [20.0, 20.0], 0.8, Brush::Red);
        assert_eq!(m.counts().0, 4 + 3 + 3);
        let rle = m.to_rle();
        assert_eq!(mp_proto::rle::decode(&rle).unwrap(), m.values());
    }

    #[test]
    fn accepting_a_suggestion_is_one_undo_step_and_keeps_other_pixels() {
        let mut l = MarkLayer::new(3, 2);
        l.begin_stroke();
        l.paint_segment([0.5, 0.5], [0.5, 0.5], 0.0, Brush::Green);
        assert_eq!(l.values(), &[-1, 0, 0, 0, 0, 0]);
        // Wrong size or nothing new: refused, no undo step.
        assert!(!l.accept(&[1, 1]));
        assert!(!l.accept(&[-1, 0, 0, 0, 0, 0]));
        assert!(l.accept(&[0, 1, 1, 0, -1, 0]));
        assert_eq!(l.values(), &[-1, 1, 1, 0, -1, 0]);
        assert!(l.undo());
        assert_eq!(l.values(), &[-1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn outline_surrounds_the_region() {
        // A 2x1 red region in a 3x2 image: 6 unit edges around it.
        let v = [1, 1, 0, 0, -1, 0];
        let red = outline(3, 2, &v, 1);
        assert_eq!(red.len(), 6);
        assert!(red.contains(&([0.0, 0.0], [1.0, 0.0])));
        assert!(red.contains(&([2.0, 0.0], [2.0, 1.0])));
        assert!(
            !red.contains(&([1.0, 0.0], [1.0, 1.0])),
            "no edge between two red pixels"
        );
        assert_eq!(outline(3, 2, &v, -1).len(), 4);
        assert!(outline(3, 3, &v, 1).is_empty(), "wrong size draws nothing");
    }
}
