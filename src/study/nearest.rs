//! `oracleflow nearest`: the exact nearest and second-nearest training samples of given
//! samples (any generator's), their distances and the memorized share.

use std::path::Path;

use crate::analysis::Neighbours;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::output;
use crate::render::{annotated_grid, save_png, Annotations, GridOptions};

/// The files [`write_outputs`] writes.
pub const FILES: [&str; 3] = ["nearest.csv", "nearest.json", "nearest.png"];

/// Triples (sample | nearest | second nearest) shown in nearest.png, four to a row.
pub const PICTURE_SAMPLES: usize = 32;
const TRIPLES_PER_ROW: usize = 4;

/// Share of samples memorized (d1 / d2 < 1/3).
pub fn memorized_share(nb: &[Neighbours]) -> f64 {
    nb.iter().filter(|n| n.memorized()).count() as f64 / nb.len().max(1) as f64
}

/// nearest.png: for the first [`PICTURE_SAMPLES`] samples, sample | nearest | second
/// nearest, with d1, d2 and their ratio under each triple.
pub fn picture(ds: &Dataset, samples: &[f32], nb: &[Neighbours]) -> Result<image::RgbImage> {
    let dim = ds.dim();
    let shown = nb.len().min(PICTURE_SAMPLES);
    let images: Vec<[Vec<f32>; 2]> = nb[..shown]
        .iter()
        .map(|n| [ds.sample(n.nearest_row), ds.sample(n.second_row)])
        .collect();
    let mut cells = Vec::new();
    let mut captions = Vec::new();
    for start in (0..shown).step_by(TRIPLES_PER_ROW) {
        let end = (start + TRIPLES_PER_ROW).min(shown);
        let mut row: Vec<Option<&[f32]>> = Vec::new();
        let mut caps = Vec::new();
        for (i, n) in nb.iter().enumerate().take(end).skip(start) {
            row.push(Some(&samples[i * dim..(i + 1) * dim]));
            row.push(Some(&images[i][0]));
            row.push(Some(&images[i][1]));
            caps.push((
                3 * (i - start),
                3,
                format!(
                    "d1 = {:.2}, d2 = {:.2}, d1/d2 = {:.2}",
                    n.distance,
                    n.second_distance,
                    n.distance / n.second_distance.max(1e-300)
                ),
            ));
        }
        cells.push(row);
        captions.push(caps);
    }
    let per_row = TRIPLES_PER_ROW.min(shown.max(1));
    let column_labels: Vec<String> = (0..per_row)
        .flat_map(|_| ["sample", "nearest", "2nd nearest"].map(String::from))
        .collect();
    annotated_grid(
        &cells,
        &ds.shape,
        &GridOptions::for_shape(&ds.shape),
        &Annotations {
            title: Some(format!(
                "Nearest training samples in {} (Euclidean distance in data units; memorized: d1/d2 < 1/3), samples 0 to {} of {}, row-major",
                ds.name,
                shown.saturating_sub(1),
                nb.len()
            )),
            column_labels,
            row_labels: Vec::new(),
            captions,
            group: 3,
            group_gap: 16,
        },
    )
}

/// Writes nearest.csv (`sample,nearest,d1,second,d2`; indices from 0 in the dataset's
/// source order), nearest.json (the memorized share and every row) and nearest.png.
pub fn write_outputs(
    dir: &Path,
    ds: &Dataset,
    samples_file: &Path,
    samples: &[f32],
    nb: &[Neighbours],
) -> Result<()> {
    let png = picture(ds, samples, nb)?;
    let memorized = nb.iter().filter(|n| n.memorized()).count();
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "data": { "spec": ds.name, "n_samples": ds.n_samples(), "shape": ds.shape },
        "samples": samples_file,
        "criterion": "memorized when d(nearest) / d(second nearest) < 1/3",
        "memorized": { "count": memorized, "of": nb.len(), "fraction": memorized_share(nb) },
        "neighbours": nb,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    output::write_atomic(&dir.join("nearest.csv"), |w| {
        writeln!(w, "sample,nearest,d1,second,d2")?;
        for (i, n) in nb.iter().enumerate() {
            writeln!(
                w,
                "{i},{},{},{},{}",
                n.nearest, n.distance, n.second, n.second_distance
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join("nearest.json"), &json)?;
    save_png(&dir.join("nearest.png"), &png)
}
