//! `oracleflow convert`: any dataset spec to an .npy file (f32 or f16), rows in source
//! order, with the labels beside it when there are any.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use half::f16;

use oracleflow::dataset::{npy, Dtype};
use oracleflow::output;

use super::args::DataArgs;
use super::progress;

#[derive(Args)]
pub struct ConvertArgs {
    /// The dataset to convert (any --data spec; see `oracleflow --help`)
    #[arg(long_help = oracleflow::dataset::SPEC_HELP)]
    src: String,
    /// Output .npy: shape (N, *sample_shape), dtype float32 (or float16 with --dtype f16);
    /// labels, when the data has them, go to OUT with `.labels.npy` (int64)
    #[arg(long)]
    out: PathBuf,
    /// Values written as f32 or f16 (f16 halves the bytes on disk, in RAM and on the device)
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
    #[arg(long)]
    force: bool,
}

/// Where the labels of `out` go: `x.npy` -> `x.labels.npy`.
fn labels_path(out: &std::path::Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}.labels.npy"))
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.out.extension().is_none_or(|e| e != "npy") {
        oracleflow::bail_input!("--out {}: must end in .npy", a.out.display());
    }
    let labels_out = labels_path(&a.out);
    output::check_new(&[a.out.as_path(), labels_out.as_path()], a.force)?;
    let ds = DataArgs {
        data: a.src.clone(),
        dtype: a.dtype,
    }
    .load()?;
    let (n, dim) = (ds.n_samples(), ds.dim());
    let mut shape = vec![n];
    shape.extend(&ds.shape.dims);
    let descr = match a.dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| oracleflow::Error::io(dir, e))?;
    }
    let bar = progress(n as u64, "samples");
    // Rows in source order (the dataset stores them sorted by class), one at a time.
    npy::write_npy_with(&a.out, descr, &shape, |w| {
        let mut bytes = Vec::with_capacity(dim * 4);
        for i in 0..n {
            let row = ds
                .row_of_original(i as u32)
                .expect("every source index has a row");
            bytes.clear();
            for v in ds.sample(row) {
                match a.dtype {
                    Dtype::F32 => bytes.extend(v.to_le_bytes()),
                    Dtype::F16 => bytes.extend(f16::from_f32(v).to_le_bytes()),
                }
            }
            w.write_all(&bytes)?;
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let mut reload = a.out.display().to_string();
    if let Some(labels) = ds.labels() {
        let mut by_source = vec![0i64; n];
        for (row, &label) in labels.iter().enumerate() {
            by_source[ds.original_index(row) as usize] = label as i64;
        }
        npy::write_npy_with(&labels_out, "<i8", &[n], |w| {
            by_source
                .iter()
                .try_for_each(|l| w.write_all(&l.to_le_bytes()))
        })?;
        reload = format!("npy:{},{}", a.out.display(), labels_out.display());
    }
    eprintln!(
        "wrote {n} samples of {:?} as {:?} ({} bytes of values); load it with --data {reload}",
        ds.shape.dims,
        a.dtype,
        n * dim * a.dtype.bytes()
    );
    Ok(())
}
