//! `oracleflow nearest`: exact nearest and second-nearest training samples of the samples
//! in a .npy file, with distances, the memorized share and a picture.

use std::path::PathBuf;

use anyhow::Result;
// Usage errors are bad input: exit code 2 (anyhow::bail! would give 1).
use clap::Args;
use oracleflow::bail_input as bail;

use oracleflow::dataset::npy;
use oracleflow::study::nearest;
use oracleflow::{analysis, output};

use super::args::{DataArgs, OutDirArgs};

#[derive(Args)]
pub struct NearestArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Samples to match, a .npy of shape (B, ...) with D values per sample (f32, or
    /// anything `sample` writes)
    #[arg(long)]
    samples: PathBuf,
    /// Output directory (nearest.csv, nearest.json, nearest.png)
    #[command(flatten)]
    out: OutDirArgs,
}

pub fn run(a: NearestArgs) -> Result<()> {
    output::check_new_in(&a.out.out, &nearest::FILES, a.out.force)?;
    let (shape, samples) = npy::read_npy_f32(&a.samples)?;
    let ds = a.data.load()?;
    let dim = ds.dim();
    if shape.is_empty() || shape[0] == 0 || shape[1..].iter().product::<usize>() != dim {
        bail!(
            "{}: samples of shape {shape:?} do not hold {dim} values per sample (dataset {})",
            a.samples.display(),
            ds.name
        );
    }
    eprintln!(
        "{} samples against {} ({} samples, D = {dim})",
        shape[0],
        ds.name,
        ds.n_samples()
    );
    // Screened with one GEMM per dataset tile, then refined exactly in f64 (no B x N matrix).
    let nb = analysis::nearest_two(&ds, &samples);
    let share = nearest::memorized_share(&nb);
    nearest::write_outputs(&a.out.out, &ds, &a.samples, &samples, &nb)?;
    println!(
        "memorized (d1/d2 < 1/3): {} of {} = {:.3}",
        nb.iter().filter(|n| n.memorized()).count(),
        nb.len(),
        share
    );
    eprintln!("wrote {}/nearest.{{csv,json,png}}", a.out.out.display());
    Ok(())
}
