//! Line charts as images (stage curves over t), drawn with `plotters` into an RGB buffer.
//! Text uses DejaVu Sans embedded in the binary, so no system font is needed.

use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// One curve: a name for the legend and its (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Curve colours, in order (matplotlib's tab10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One line of text to draw on a picture: top-left corner, pixel size, colour.
pub struct TextItem {
    pub x: i32,
    pub y: i32,
    pub size: u32,
    pub text: String,
    pub rgb: [u8; 3],
}

/// Pixel width of `text` at `size` in the embedded font (to lay out captions).
pub fn text_width(text: &str, size: u32) -> u32 {
    register_font();
    let font = ("sans-serif", size as f64).into_font();
    font.box_size(text).map_or(0, |(w, _)| w)
}

/// Draws `items` onto `img` with the embedded DejaVu Sans (for grids of samples with
/// their times, labels and distances).
pub fn draw_text(img: &mut RgbImage, items: &[TextItem]) -> Result<()> {
    register_font();
    let (w, h) = img.dimensions();
    let root = BitMapBackend::with_buffer(img.as_mut(), (w, h)).into_drawing_area();
    for it in items {
        let [r, g, b] = it.rgb;
        let style = ("sans-serif", it.size as f64)
            .into_font()
            .color(&RGBColor(r, g, b));
        root.draw_text(&it.text, &style, (it.x, it.y))
            .map_err(|e| Error::Input(format!("drawing text '{}': {e}", it.text)))?;
    }
    root.present()
        .map_err(|e| Error::Input(format!("drawing text: {e}")))?;
    Ok(())
}

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // The embedded font is valid; if registration ever failed, text would be missing
        // from the chart but the curves would still be drawn.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// A line chart's frame: title, axis labels and ranges, vertical markers (x, label).
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub markers: &'a [(f64, &'a str)],
}

/// Draws `series` in `chart` (900 x 520 px).
pub fn line_chart(chart: &Chart<'_>, series: &[Series<'_>]) -> Result<RgbImage> {
    register_font();
    let (w, h) = (900u32, 520u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(&mut buf, (w, h), chart, series)
        .map_err(|e| Error::Input(format!("drawing chart '{}': {e}", chart.title)))?;
    Ok(RgbImage::from_raw(w, h, buf).expect("buffer sized w * h * 3"))
}

fn draw(
    buf: &mut [u8],
    size: (u32, u32),
    c: &Chart<'_>,
    series: &[Series<'_>],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (x_range, y_range) = (c.x_range, c.y_range);
    let mut chart = ChartBuilder::on(&root)
        .caption(c.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for &(x, label) in c.markers {
        let grey = RGBColor(120, 120, 120);
        chart.draw_series(LineSeries::new(
            [(x, y_range.0), (x, y_range.1)],
            grey.stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            label.to_string(),
            (x + 0.01 * (x_range.1 - x_range.0), y_range.1),
            ("sans-serif", 14).into_font().color(&grey),
        )))?;
    }
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_curves_and_text() {
        let s = Series {
            name: "rising",
            points: (0..=10)
                .map(|i| (i as f64 / 10.0, (i as f64 / 10.0).powi(2)))
                .collect(),
        };
        let chart = Chart {
            title: "test",
            x_label: "t",
            y_label: "y",
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.0),
            markers: &[(0.5, "half")],
        };
        let img = line_chart(&chart, &[s]).unwrap();
        assert_eq!(img.dimensions(), (900, 520));
        let coloured = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(coloured > 200, "curve drawn ({coloured} px)");
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(dark > 300, "text and axes drawn ({dark} px)");
    }
}
