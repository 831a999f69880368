//! Line plots as PNG (plotters, bitmap backend, a system TrueType font through ab_glyph).

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if !ok {
        bail!("no TrueType font found for plots (apt-get install fonts-dejavu-core)");
    }
    Ok(())
}

/// One line: label, points (x, y, y_error).
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
    pub dashed: bool,
}

/// A line plot with error bars; x on a log-like axis via `x_labels` when given.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    series: &[Series],
) -> Result<()> {
    register_font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(&color).stroke_width(2);
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(
                    s.points.iter().map(|p| (p.0, p.1)),
                    8,
                    6,
                    style,
                ))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().map(|p| (p.0, p.1)), style))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 3, style.filled())),
            )?;
            chart.draw_series(
                s.points
                    .iter()
                    .filter(|p| p.2 > 0.0)
                    .map(|p| ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, style, 6)),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_plot_is_drawn_with_its_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/plot.png");
        let series = [
            Series {
                label: "guided".into(),
                points: vec![(0.0, 50.0, 2.0), (1.0, 90.0, 1.0)],
                dashed: false,
            },
            Series {
                label: "baseline".into(),
                points: vec![(0.0, 70.0, 0.0), (1.0, 70.0, 0.0)],
                dashed: true,
            },
        ];
        line_plot(&p, "title", "x", "y", (0.0, 1.0), (0.0, 100.0), &series).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1000, 640));
        let coloured = img
            .pixels()
            .filter(|px| px[0] != px[1] || px[1] != px[2])
            .count();
        assert!(
            coloured > 500,
            "series should be drawn in colour: {coloured}"
        );
    }
}
