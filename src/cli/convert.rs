//! `oracleflow convert`: any dataset spec to an .npy file (f32 or f16), rows in source
//! order, with the labels beside it when there are any.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use half::f16;

use oracleflow::dataset::{npy, synthetic, DataSpec, Dtype, Source};
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
    let parsed = DataSpec::parse(&a.src)?;
    // Synthetic sources are generated a block at a time (a 10 GB draw never sits in RAM);
    // every other source is loaded (a large .npy source streams from its file) and written
    // row by row in source order.
    let synthetic = match parsed.source {
        Source::Gaussian {
            n_samples,
            dim,
            seed,
        } => Some((n_samples, dim, 0, seed)),
        Source::Mixture {
            n_samples,
            dim,
            k,
            seed,
        } => Some((n_samples, dim, k, seed)),
        _ => None,
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| oracleflow::Error::io(dir, e))?;
    }
    let descr = match a.dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
    };
    let encode = |values: &[f32], bytes: &mut Vec<u8>| {
        bytes.clear();
        for &v in values {
            match a.dtype {
                Dtype::F32 => bytes.extend(v.to_le_bytes()),
                Dtype::F16 => bytes.extend(f16::from_f32(v).to_le_bytes()),
            }
        }
    };
    let (n, dims, labels): (usize, Vec<usize>, Option<Vec<i64>>) =
        if let Some((n_all, dim, k, seed)) = synthetic {
            let n = match parsed.limit {
                Some(m) if m > n_all => oracleflow::bail_input!(
                    "{}: @{m} asks for more than the {n_all} samples generated",
                    a.src
                ),
                Some(m) => m,
                None => n_all,
            };
            let block = ((8 << 20) / (dim * 4)).clamp(1, n);
            let bar = progress(n as u64, "samples");
            let mut values = vec![0.0f32; block * dim];
            let mut block_labels = vec![0u32; block];
            let mut labels = (k > 0).then(|| Vec::with_capacity(n));
            let mut gaussian = synthetic::GaussianStream::new(seed);
            let mut mixture = (k > 0).then(|| synthetic::MixtureStream::new(dim, k, seed));
            npy::write_npy_with(&a.out, descr, &[n, dim], |w| {
                let mut bytes = Vec::new();
                for start in (0..n).step_by(block) {
                    let rows = block.min(n - start);
                    let (v, l) = (&mut values[..rows * dim], &mut block_labels[..rows]);
                    match (&mut mixture, &mut labels) {
                        (Some(m), Some(all)) => {
                            m.fill(v, l);
                            all.extend(l.iter().map(|&c| c as i64));
                        }
                        _ => gaussian.fill(v),
                    }
                    encode(v, &mut bytes);
                    w.write_all(&bytes)?;
                    bar.inc(rows as u64);
                }
                Ok(())
            })?;
            bar.finish_and_clear();
            (n, vec![dim], labels)
        } else {
            // Loaded as f32 so the values are rounded once, to the output dtype.
            let ds = DataArgs {
                data: a.src.clone(),
                dtype: Some(Dtype::F32),
            }
            .load()?;
            let (n, dim) = (ds.n_samples(), ds.dim());
            let mut shape = vec![n];
            shape.extend(&ds.shape.dims);
            // Stored row of each source index (rows are sorted by class).
            let mut row_of = vec![0u32; n];
            for row in 0..n {
                row_of[ds.original_index(row) as usize] = row as u32;
            }
            let bar = progress(n as u64, "samples");
            npy::write_npy_with(&a.out, descr, &shape, |w| {
                let mut bytes = Vec::with_capacity(dim * 4);
                for &row in &row_of {
                    encode(&ds.sample(row as usize), &mut bytes);
                    w.write_all(&bytes)?;
                    bar.inc(1);
                }
                Ok(())
            })?;
            bar.finish_and_clear();
            let labels = ds
                .labels()
                .map(|l| row_of.iter().map(|&r| l[r as usize] as i64).collect());
            (n, ds.shape.dims.clone(), labels)
        };
    let dim: usize = dims.iter().product();
    let mut reload = a.out.display().to_string();
    if let Some(labels) = labels {
        npy::write_npy_with(&labels_out, "<i8", &[n], |w| {
            labels
                .iter()
                .try_for_each(|l| w.write_all(&l.to_le_bytes()))
        })?;
        reload = format!("npy:{},{}", a.out.display(), labels_out.display());
    }
    eprintln!(
        "wrote {n} samples of {dims:?} as {:?} ({} bytes of values); load it with --data {reload}",
        a.dtype,
        n * dim * a.dtype.bytes()
    );
    Ok(())
}
