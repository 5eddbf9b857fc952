//! Pictures of samples: grids of images (or of views of latents) saved as PNG.
//!
//! A sample is a flat f32 slice of D values in C x H x W planar order (see
//! [`SampleShape`]). How one sample becomes a cell of pixels:
//!
//! - **Images** (`shape.is_image`): values are pixels in [-1, 1], mapped by
//!   [`pixel_to_u8`] (`round((v + 1) * 127.5)` clamped to 0..=255, so -1 -> 0, 0 -> 128,
//!   1 -> 255). This is the exact inverse of the loaders' `p / 127.5 - 1`.
//! - **Arrays** (latents, `!shape.is_image`): there is no fixed value range, so each
//!   shown channel is stretched by *that sample's own* min/max of that channel (min -> 0,
//!   max -> 255; a constant channel is mid-gray 128). Only a view: absolute levels are
//!   not comparable between cells.
//! - **Channels** (both kinds): C >= 3 shows the first three channels as R, G, B (for a
//!   4-channel latent the 4th is not shown); C = 1 or 2 shows the first channel as gray.
//! - **No picture shape** (dims neither `[C, H, W]` nor `[H, W]`, e.g. a flat `[D]` vector):
//!   the D values fill a near-square gray tile row by row (width `ceil(sqrt(D))`), the
//!   unused tail padded with mid-gray.
//!
//! Non-finite values render as 0 (NaN) or the clamped end (±inf), and are ignored when
//! finding a channel's min/max, so one bad value cannot blank a whole view.

use std::path::Path;

use image::{ImageEncoder, Rgb, RgbImage};

use crate::dataset::SampleShape;
use crate::error::Result;
use crate::output::write_atomic;

/// Mid-gray: a constant channel, and the padding of a flat tile.
const MID_GRAY: u8 = 128;

/// How cells are drawn and spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridOptions {
    /// Nearest-neighbour upscale factor of every cell (1 = one pixel per value).
    pub scale: u32,
    /// Pixels of background between cells and around the border of the grid.
    pub pad: u32,
    /// Colour of the padding and of empty cells.
    pub background: [u8; 3],
}

impl GridOptions {
    /// Side in pixels a small cell is upscaled towards (28 x 28 -> 84 x 84).
    const TARGET_SIDE: usize = 84;

    /// Options that make a grid of `shape` readable: small images are upscaled (nearest
    /// neighbour, so pixels stay sharp) to about 84 px on their longer side: scale =
    /// round(84 / longer side), at least 1, so 28 px -> 3 and from 57 px on -> 1.
    /// Padding 2 px, white background.
    pub fn for_shape(shape: &SampleShape) -> Self {
        let (w, h) = cell_size(shape);
        let side = w.max(h).max(1) as usize;
        // Rounded division, so 28 -> 3 and 32 -> 3 (96 px) rather than 2 (64 px).
        let scale = ((Self::TARGET_SIDE + side / 2) / side).max(1);
        GridOptions {
            scale: scale as u32,
            pad: 2,
            background: [255, 255, 255],
        }
    }
}

/// Maps an image value in [-1, 1] to an 8-bit level: `round((v + 1) * 127.5)` clamped
/// to 0..=255 (-1 -> 0, 0 -> 128, 1 -> 255; NaN -> 0).
pub fn pixel_to_u8(v: f32) -> u8 {
    // `as` saturates and sends NaN to 0, which is the documented behaviour.
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// Width and height in values (before `scale`) of one cell for `shape`.
pub fn cell_size(shape: &SampleShape) -> (u32, u32) {
    match layout(shape) {
        Layout::Planes { h, w, .. } => (w as u32, h as u32),
        Layout::Flat { w, h, .. } => (w as u32, h as u32),
    }
}

/// A grid of `cells.len()` rows by the longest row's length columns; `None` cells (and
/// the missing tail of a shorter row) are left as background.
///
/// With (cw, ch) = [`cell_size`], the picture is `cols * cw * scale + (cols + 1) * pad`
/// wide and `rows * ch * scale + (rows + 1) * pad` high; cell (r, c) has its top-left
/// corner at `(pad + c * (cw * scale + pad), pad + r * (ch * scale + pad))`.
///
/// Panics when a sample's length is not `shape.dim()` (a caller bug: the picture would
/// be silently wrong otherwise).
pub fn grid(cells: &[Vec<Option<&[f32]>>], shape: &SampleShape, opts: &GridOptions) -> RgbImage {
    let (cw, ch) = cell_size(shape);
    let scale = opts.scale.max(1);
    let (sw, sh) = (cw * scale, ch * scale);
    let rows = cells.len() as u32;
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let width = cols * sw + (cols + 1) * opts.pad;
    let height = rows * sh + (rows + 1) * opts.pad;
    let mut img = RgbImage::from_pixel(width, height, Rgb(opts.background));

    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let Some(sample) = cell else { continue };
            let x0 = opts.pad + c as u32 * (sw + opts.pad);
            let y0 = opts.pad + r as u32 * (sh + opts.pad);
            blit_cell(&mut img, sample, shape, scale, (x0, y0));
        }
    }
    img
}

/// Draws one sample's cell, upscaled by `scale`, with its top-left corner at `at`.
fn blit_cell(img: &mut RgbImage, sample: &[f32], shape: &SampleShape, scale: u32, at: (u32, u32)) {
    let (cw, ch) = cell_size(shape);
    let pixels = render_cell(sample, shape);
    for y in 0..ch * scale {
        for x in 0..cw * scale {
            let p = pixels[((y / scale) * cw + x / scale) as usize];
            img.put_pixel(at.0 + x, at.1 + y, Rgb(p));
        }
    }
}

/// Text around a grid of samples (see [`annotated_grid`]).
#[derive(Clone, Debug, Default)]
pub struct Annotations {
    /// One line above everything.
    pub title: Option<String>,
    /// A label above each column (an empty string for none), e.g. the time of the column.
    pub column_labels: Vec<String>,
    /// A label left of each row, e.g. the setting the row shows.
    pub row_labels: Vec<String>,
    /// Under each row: (first column, columns spanned, text), centred under the span,
    /// e.g. the distances of a (sample, nearest) pair.
    pub captions: Vec<Vec<(usize, usize, String)>>,
    /// Columns come in groups of this many (e.g. sample | nearest), with `group_gap`
    /// extra pixels between groups; 0 = no groups.
    pub group: usize,
    pub group_gap: u32,
}

/// Pixel sizes of the annotation fonts.
const TITLE_PX: u32 = 18;
const LABEL_PX: u32 = 14;
const CAPTION_PX: u32 = 13;

/// [`grid`] with text: a title, column labels above, row labels to the left and a
/// caption band under every row (when any row has captions). Cells keep the sizes of
/// [`grid`]; the text is black on the background, in the embedded DejaVu Sans.
pub fn annotated_grid(
    cells: &[Vec<Option<&[f32]>>],
    shape: &SampleShape,
    opts: &GridOptions,
    ann: &Annotations,
) -> Result<RgbImage> {
    use crate::plot::{draw_text, text_width, TextItem};
    let (cw, ch) = cell_size(shape);
    let scale = opts.scale.max(1);
    let (sw, sh) = (cw * scale, ch * scale);
    let rows = cells.len() as u32;
    let cols = cells
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(ann.column_labels.len()) as u32;
    let title_h = if ann.title.is_some() {
        TITLE_PX + 12
    } else {
        0
    };
    let labels_h = if ann.column_labels.iter().any(|l| !l.is_empty()) {
        LABEL_PX + 8
    } else {
        0
    };
    let caption_h = if ann.captions.iter().any(|r| !r.is_empty()) {
        CAPTION_PX + 8
    } else {
        0
    };
    let left_w = ann
        .row_labels
        .iter()
        .map(|l| text_width(l, LABEL_PX))
        .max()
        .map_or(0, |w| w + 12);
    let gaps = |c: usize| match ann.group {
        0 => 0,
        g => (c / g) as u32 * ann.group_gap,
    };
    let grid_w = left_w + cols * sw + (cols + 1) * opts.pad + gaps(cols.saturating_sub(1) as usize);
    let title_w = ann
        .title
        .as_deref()
        .map_or(0, |t| text_width(t, TITLE_PX) + 16);
    let width = grid_w.max(title_w);
    let top = title_h + labels_h;
    let row_h = sh + opts.pad + caption_h;
    let height = top + opts.pad + rows * row_h;
    let mut img = RgbImage::from_pixel(width, height, Rgb(opts.background));
    let cell_x = |c: usize| left_w + opts.pad + c as u32 * (sw + opts.pad) + gaps(c);
    let cell_y = |r: usize| top + opts.pad + r as u32 * row_h;

    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            if let Some(sample) = cell {
                blit_cell(&mut img, sample, shape, scale, (cell_x(c), cell_y(r)));
            }
        }
    }

    let black = [0, 0, 0];
    let mut text = Vec::new();
    if let Some(t) = &ann.title {
        text.push(TextItem {
            x: 8,
            y: 6,
            size: TITLE_PX,
            text: t.clone(),
            rgb: black,
        });
    }
    // Centred in a span of cells starting at column c, clamped to the picture.
    let centred = |c: usize, span: usize, w: u32| -> i32 {
        let last = c + span.max(1) - 1;
        let span_w = cell_x(last) + sw - cell_x(c);
        (cell_x(c) as i32 + (span_w as i32 - w as i32) / 2).max(0)
    };
    for (c, l) in ann.column_labels.iter().enumerate() {
        if !l.is_empty() {
            text.push(TextItem {
                x: centred(c, 1, text_width(l, LABEL_PX)),
                y: (title_h + 3) as i32,
                size: LABEL_PX,
                text: l.clone(),
                rgb: black,
            });
        }
    }
    for (r, l) in ann.row_labels.iter().enumerate().take(rows as usize) {
        text.push(TextItem {
            x: 6,
            y: (cell_y(r) + sh / 2) as i32 - LABEL_PX as i32 / 2,
            size: LABEL_PX,
            text: l.clone(),
            rgb: black,
        });
    }
    for (r, caps) in ann.captions.iter().enumerate().take(rows as usize) {
        for (c, span, l) in caps {
            text.push(TextItem {
                x: centred(*c, *span, text_width(l, CAPTION_PX)),
                y: (cell_y(r) + sh + 3) as i32,
                size: CAPTION_PX,
                text: l.clone(),
                rgb: black,
            });
        }
    }
    draw_text(&mut img, &text)?;
    Ok(img)
}

/// `samples` laid out row-major in `cols` columns (the last row may be short); see
/// [`grid`]. `cols` of 0 is taken as 1.
pub fn tile_grid(
    samples: &[&[f32]],
    shape: &SampleShape,
    cols: usize,
    opts: &GridOptions,
) -> RgbImage {
    let cells: Vec<Vec<Option<&[f32]>>> = samples
        .chunks(cols.max(1))
        .map(|row| row.iter().map(|s| Some(*s)).collect())
        .collect();
    grid(&cells, shape, opts)
}

/// `parts` one above the other, left-aligned, `gap` background rows between them (none
/// above the first or below the last); as wide as the widest part.
pub fn stack_vertical(parts: &[RgbImage], gap: u32, background: [u8; 3]) -> RgbImage {
    let width = parts.iter().map(RgbImage::width).max().unwrap_or(0);
    let height = parts.iter().map(RgbImage::height).sum::<u32>()
        + gap * (parts.len().saturating_sub(1) as u32);
    let mut img = RgbImage::from_pixel(width, height, Rgb(background));
    let mut y0 = 0;
    for part in parts {
        for (x, y, p) in part.enumerate_pixels() {
            img.put_pixel(x, y0 + y, *p);
        }
        y0 += part.height() + gap;
    }
    img
}

/// Writes `img` as a PNG at `path`, atomically (whole file or none).
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    write_atomic(path, |w| {
        image::codecs::png::PngEncoder::new(w)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(std::io::Error::other)
    })
}

/// Where a sample's values go in its cell.
enum Layout {
    /// C x H x W planes.
    Planes { c: usize, h: usize, w: usize },
    /// D values in a w x h tile, row by row.
    Flat { w: usize, h: usize },
}

fn layout(shape: &SampleShape) -> Layout {
    match shape.chw() {
        Some((c, h, w)) => Layout::Planes { c, h, w },
        None => {
            let d = shape.dim();
            // Smallest w with w * w >= d; at least 1 x 1 so an empty sample still has a cell.
            let mut w = (d as f64).sqrt() as usize;
            while w * w < d {
                w += 1;
            }
            let w = w.max(1);
            let h = d.div_ceil(w).max(1);
            Layout::Flat { w, h }
        }
    }
}

/// One sample as w x h RGB pixels, row-major (unscaled).
fn render_cell(sample: &[f32], shape: &SampleShape) -> Vec<[u8; 3]> {
    assert_eq!(
        sample.len(),
        shape.dim(),
        "sample has {} values but shape {:?} needs {}",
        sample.len(),
        shape.dims,
        shape.dim()
    );
    match layout(shape) {
        Layout::Planes { c, h, w } => {
            let plane = h * w;
            let levels: Vec<Vec<u8>> = (0..c.min(3))
                .filter(|&k| c >= 3 || k == 0)
                .map(|k| to_levels(&sample[k * plane..(k + 1) * plane], shape.is_image))
                .collect();
            (0..plane)
                .map(|i| match &levels[..] {
                    [r, g, b] => [r[i], g[i], b[i]],
                    [v] => [v[i]; 3],
                    _ => unreachable!("one or three channels are shown"),
                })
                .collect()
        }
        Layout::Flat { w, h, .. } => {
            let mut levels = to_levels(sample, shape.is_image);
            levels.resize(w * h, MID_GRAY);
            levels.into_iter().map(|v| [v; 3]).collect()
        }
    }
}

/// One channel's values as 8-bit levels: the fixed pixel mapping for images, the
/// channel's own min/max stretch otherwise.
fn to_levels(values: &[f32], is_image: bool) -> Vec<u8> {
    if is_image {
        return values.iter().map(|&v| pixel_to_u8(v)).collect();
    }
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    // Filtered values cannot be NaN, so this is "constant, or no finite values".
    if hi <= lo {
        return vec![MID_GRAY; values.len()];
    }
    // In f64 so a huge range cannot overflow to inf.
    let span = hi as f64 - lo as f64;
    values
        .iter()
        .map(|&v| {
            ((v as f64 - lo as f64) / span * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BG: [u8; 3] = [10, 20, 30];

    fn opts(scale: u32, pad: u32) -> GridOptions {
        GridOptions {
            scale,
            pad,
            background: BG,
        }
    }

    fn px(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
        img.get_pixel(x, y).0
    }

    #[test]
    fn pixel_mapping() {
        assert_eq!(pixel_to_u8(-1.0), 0);
        assert_eq!(pixel_to_u8(0.0), 128);
        assert_eq!(pixel_to_u8(1.0), 255);
        assert_eq!(pixel_to_u8(-3.0), 0);
        assert_eq!(pixel_to_u8(3.0), 255);
        assert_eq!(pixel_to_u8(f32::NAN), 0);
        // Inverse of the loaders' p / 127.5 - 1 for every 8-bit level.
        for p in 0..=255u8 {
            assert_eq!(pixel_to_u8(p as f32 / 127.5 - 1.0), p);
        }
    }

    #[test]
    fn grid_size_and_cell_placement() {
        // 1 x 2 x 3 gray images (h = 2, w = 3), scale 2, pad 1, 2 rows x 3 columns.
        let shape = SampleShape::image(1, 2, 3);
        let a = [-1.0f32; 6];
        let mut b = [1.0f32; 6];
        b[5] = -1.0; // bottom-right value of the cell
        let cells = vec![
            vec![Some(&a[..]), None, Some(&a[..])],
            vec![None, None, Some(&b[..])],
        ];
        let img = grid(&cells, &shape, &opts(2, 1));
        assert_eq!(img.dimensions(), (3 * 6 + 4, 2 * 4 + 3));

        // Cell (1, 2) starts at x = 1 + 2 * (6 + 1) = 15, y = 1 + 1 * (4 + 1) = 6.
        let (x0, y0) = (15, 6);
        assert_eq!(px(&img, x0, y0), [255; 3]);
        assert_eq!(px(&img, x0 + 3, y0 + 1), [255; 3]);
        // Value (row 1, col 2) covers the 2 x 2 block at (4..6, 2..4) of the cell.
        for (dx, dy) in [(4, 2), (5, 2), (4, 3), (5, 3)] {
            assert_eq!(px(&img, x0 + dx, y0 + dy), [0; 3]);
        }
        assert_eq!(px(&img, x0 + 3, y0 + 3), [255; 3]);
        // Padding before and after the cell, the border, and empty cells are background.
        assert_eq!(px(&img, x0 - 1, y0), BG);
        assert_eq!(px(&img, x0, y0 - 1), BG);
        assert_eq!(px(&img, x0 + 6, y0 + 4), BG);
        assert_eq!(px(&img, 0, 0), BG);
        assert_eq!(px(&img, 1 + 7, 1), BG); // cell (0, 1) is None
        assert_eq!(px(&img, 1, 1), [0; 3]); // cell (0, 0)
    }

    #[test]
    fn short_rows_are_filled_with_background() {
        let shape = SampleShape::image(1, 1, 1);
        let v = [1.0f32];
        let cells = vec![vec![Some(&v[..])], vec![Some(&v[..]), Some(&v[..])]];
        let img = grid(&cells, &shape, &opts(1, 0));
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(px(&img, 1, 0), BG);
        assert_eq!(px(&img, 1, 1), [255; 3]);
    }

    #[test]
    fn gray_and_rgb_images() {
        // Gray [H, W] (no channel dim): r = g = b.
        let gray = SampleShape {
            dims: vec![1, 2],
            is_image: true,
        };
        let img = grid(&[vec![Some(&[-1.0, 0.0][..])]], &gray, &opts(1, 0));
        assert_eq!(px(&img, 0, 0), [0; 3]);
        assert_eq!(px(&img, 1, 0), [128; 3]);

        // RGB, planar: value (c, y, x) is at c * h * w + y * w + x.
        let rgb = SampleShape::image(3, 1, 2);
        let s = [1.0, -1.0, /* G */ -1.0, 0.0, /* B */ 0.0, 1.0];
        let img = grid(&[vec![Some(&s[..])]], &rgb, &opts(1, 0));
        assert_eq!(px(&img, 0, 0), [255, 0, 128]);
        assert_eq!(px(&img, 1, 0), [0, 128, 255]);
    }

    #[test]
    fn latent_views_stretch_each_channel() {
        // 4 channels of 1 x 2: the first three become R, G, B, each by its own min/max.
        let shape = SampleShape::array(vec![4, 1, 2]);
        let s = [
            5.0, 7.0, /* G */ -0.1, -0.3, /* B */ 2.0, 2.0, /* ignored */ 9.0, 1.0,
        ];
        let img = grid(&[vec![Some(&s[..])]], &shape, &opts(1, 0));
        assert_eq!(px(&img, 0, 0), [0, 255, MID_GRAY]);
        assert_eq!(px(&img, 1, 0), [255, 0, MID_GRAY]);

        // Two channels: the first alone, as gray; NaN ignored for the range.
        let shape = SampleShape::array(vec![2, 1, 3]);
        let s = [1.0, 2.0, 3.0, /* ignored */ 100.0, -100.0, 0.0];
        let img = grid(&[vec![Some(&s[..])]], &shape, &opts(1, 0));
        assert_eq!(px(&img, 0, 0), [0; 3]);
        assert_eq!(px(&img, 1, 0), [128; 3]);
        assert_eq!(px(&img, 2, 0), [255; 3]);

        let s = [1.0, f32::NAN, 3.0, 0.0, 0.0, 0.0];
        let img = grid(&[vec![Some(&s[..])]], &shape, &opts(1, 0));
        assert_eq!(px(&img, 0, 0), [0; 3]);
        assert_eq!(px(&img, 2, 0), [255; 3]);
    }

    #[test]
    fn flat_vectors_become_near_square_tiles() {
        let shape = SampleShape::array(vec![5]);
        assert_eq!(cell_size(&shape), (3, 2));
        assert_eq!(cell_size(&SampleShape::array(vec![16])), (4, 4));
        assert_eq!(cell_size(&SampleShape::array(vec![17])), (5, 4));
        assert_eq!(cell_size(&SampleShape::array(vec![1])), (1, 1));

        let s = [0.0, 1.0, 2.0, 3.0, 4.0];
        let img = grid(&[vec![Some(&s[..])]], &shape, &opts(1, 0));
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(px(&img, 0, 0), [0; 3]);
        assert_eq!(px(&img, 2, 0), [128; 3]); // 2 of 0..4
        assert_eq!(px(&img, 1, 1), [255; 3]);
        assert_eq!(px(&img, 2, 1), [MID_GRAY; 3]); // padding
    }

    #[test]
    fn options_for_shape() {
        assert_eq!(
            GridOptions::for_shape(&SampleShape::image(1, 28, 28)).scale,
            3
        );
        assert_eq!(
            GridOptions::for_shape(&SampleShape::image(3, 32, 32)).scale,
            3
        );
        assert_eq!(
            GridOptions::for_shape(&SampleShape::array(vec![4, 8, 8])).scale,
            11
        );
        assert_eq!(
            GridOptions::for_shape(&SampleShape::image(3, 256, 256)).scale,
            1
        );
        assert_eq!(
            GridOptions::for_shape(&SampleShape::image(3, 64, 512)).scale,
            1
        );
    }

    #[test]
    fn tile_grid_is_row_major() {
        let shape = SampleShape::image(1, 1, 1);
        let vals: Vec<[f32; 1]> = (0..5).map(|i| [i as f32 / 2.0 - 1.0]).collect();
        let samples: Vec<&[f32]> = vals.iter().map(|v| &v[..]).collect();
        let img = tile_grid(&samples, &shape, 2, &opts(1, 1));
        assert_eq!(img.dimensions(), (2 + 3, 3 + 4));
        for (i, v) in vals.iter().enumerate() {
            let (r, c) = ((i / 2) as u32, (i % 2) as u32);
            assert_eq!(px(&img, 1 + 2 * c, 1 + 2 * r), [pixel_to_u8(v[0]); 3]);
        }
        assert_eq!(px(&img, 3, 5), BG); // the missing sixth cell
    }

    #[test]
    fn stacking() {
        let a = RgbImage::from_pixel(3, 2, Rgb([1, 1, 1]));
        let b = RgbImage::from_pixel(5, 1, Rgb([2, 2, 2]));
        let img = stack_vertical(&[a, b], 2, BG);
        assert_eq!(img.dimensions(), (5, 2 + 2 + 1));
        assert_eq!(px(&img, 2, 1), [1; 3]);
        assert_eq!(px(&img, 3, 0), BG); // right of the narrower part
        assert_eq!(px(&img, 0, 2), BG); // the gap
        assert_eq!(px(&img, 4, 4), [2; 3]);
    }

    #[test]
    fn saved_png_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let shape = SampleShape::image(3, 4, 5);
        let s: Vec<f32> = (0..60).map(|i| i as f32 / 30.0 - 1.0).collect();
        let img = tile_grid(
            &[&s[..], &s[..], &s[..]],
            &shape,
            2,
            &GridOptions::for_shape(&shape),
        );
        save_png(&path, &img).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        // Only the PNG itself is left in the directory (no temporary file).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn annotated_grid_draws_text_in_its_margins() {
        let shape = SampleShape::image(1, 4, 4);
        let v = [1.0f32; 16];
        let cells = vec![vec![Some(&v[..]), Some(&v[..])]; 2];
        let ann = Annotations {
            title: Some("Title".into()),
            column_labels: vec!["t = 0".into(), "t = 1".into()],
            row_labels: vec!["x_t".into(), "x1_hat".into()],
            captions: vec![vec![(0, 2, "d1/d2 = 0.10".into())]; 2],
            group: 0,
            group_gap: 0,
        };
        let o = GridOptions {
            scale: 10,
            pad: 2,
            background: [255; 3],
        };
        let img = annotated_grid(&cells, &shape, &o, &ann).unwrap();
        let plain = grid(&cells, &shape, &o);
        assert!(img.width() > plain.width() && img.height() > plain.height());
        // Dark text pixels appear above the cells, left of them and under each row.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
                .count()
        };
        let left = img.width() - plain.width() + 2;
        let top = 30 + 22;
        assert!(dark(0, img.width(), 0, 30) > 10, "title");
        assert!(dark(left, img.width(), 30, top) > 10, "column labels");
        assert!(dark(0, left - 2, top, img.height()) > 10, "row labels");
        assert!(
            dark(left, img.width(), top + 2 + 40, top + 2 + 40 + 21) > 10,
            "caption"
        );
        // The cells themselves are drawn unchanged (white, value 1).
        assert_eq!(img.get_pixel(left + 5, top + 5).0, [255; 3]);
    }

    #[test]
    #[should_panic(expected = "needs 4")]
    fn wrong_sample_length_panics() {
        let shape = SampleShape::image(1, 2, 2);
        grid(&[vec![Some(&[0.0; 3][..])]], &shape, &opts(1, 0));
    }
}
