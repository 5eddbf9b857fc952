//! `oracleflow velocity`: the exact oracle velocity (the flow-matching training target)
//! for queries and times read from .npy files.

use std::path::PathBuf;

use anyhow::Result;
// Usage errors are bad input: exit code 2 (anyhow::bail! would give 1).
use clap::Args;
use oracleflow::bail_input as bail;

use oracleflow::dataset::npy;
use oracleflow::field::FieldSpec;
use oracleflow::oracle::{check_time, shard};
use oracleflow::{output, report};

use super::args::{DataArgs, FieldArgs, OracleArgs};
use super::progress;

#[derive(Args)]
pub struct VelocityArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    #[command(flatten)]
    field: FieldArgs,
    /// Queries x_t, a .npy of shape (B, ...) with D values per query
    #[arg(long)]
    queries: PathBuf,
    /// One time for every query (0 = noise, 1 = data)
    #[arg(long, conflicts_with = "times", required_unless_present = "times")]
    t: Option<f32>,
    /// One time per query, a .npy of B values
    #[arg(long)]
    times: Option<PathBuf>,
    /// Condition on one class (the oracle over that class's samples only)
    #[arg(long)]
    class: Option<u32>,
    /// Velocity output (.npy, same shape as the queries)
    #[arg(long)]
    out: PathBuf,
    /// Also write the posterior mean x1_hat (.npy)
    #[arg(long)]
    x1_hat: Option<PathBuf>,
    /// Also write per-query stats (CSV: top-1 weight and index, entropy, ESS, posterior
    /// variance tr Cov / D); only fields with a posterior over samples (the oracle) have them
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Queries per oracle call (bounds memory; each call streams the dataset once)
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Overwrite existing output files
    #[arg(long)]
    force: bool,
}

pub fn run(a: VelocityArgs) -> Result<()> {
    let outputs: Vec<&std::path::Path> = [Some(&a.out), a.x1_hat.as_ref(), a.stats.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| p.as_path())
        .collect();
    output::check_new(&outputs, a.force)?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let spec = a.field.check()?;
    if a.stats.is_some() && spec != FieldSpec::Oracle {
        bail!(
            "--stats: the {} field has no posterior over training samples (only the oracle has)",
            a.field.field
        );
    }

    // Queries and times first: a bad one is refused before the dataset is loaded (which
    // may mean a pass over a file larger than memory).
    let (shape, x) = npy::read_npy_f32(&a.queries)?;
    let n_queries = shape.first().copied().unwrap_or(0);
    let times = match (&a.times, a.t) {
        (Some(p), _) => {
            let (tshape, t) = npy::read_npy_f32(p)?;
            if t.len() != n_queries {
                bail!(
                    "{}: {} times (shape {tshape:?}) for {n_queries} queries",
                    p.display(),
                    t.len()
                );
            }
            t
        }
        (None, Some(t)) => vec![t; n_queries],
        (None, None) => unreachable!("clap requires --t or --times"),
    };
    times.iter().try_for_each(|&t| check_time(t))?;

    let ds = a.data.load_for(&a.oracle)?;
    let dim = ds.dim();
    if shape.is_empty() || shape[1..].iter().product::<usize>() != dim {
        bail!(
            "{}: queries of shape {shape:?} do not hold {dim} values per query (dataset {})",
            a.queries.display(),
            ds.name
        );
    }
    // Under mpirun a rank may hold no sample of the class (others do): it adds nothing,
    // and a class no rank holds is refused by the merged result on every rank alike.
    if shard::mpi::current().is_none() || ds.labels().is_none() {
        ds.rows_for(a.class)?;
    }

    let mut field = a.field.build(&spec, &ds, &a.oracle, &[a.class])?;
    if a.class.is_some() && !field.accepts_classes() {
        bail!("--class: the field ({}) has no classes", field.describe());
    }
    let root = shard::mpi::is_root();
    if root {
        eprintln!(
            "{} on {} ({} samples, D = {dim})",
            field.describe(),
            ds.name,
            ds.n_samples()
        );
    }

    let bar = progress(n_queries as u64, "queries");
    let started = std::time::Instant::now();
    let mut velocity = Vec::with_capacity(x.len());
    let mut x1_hat = Vec::with_capacity(x.len());
    let mut stats = Vec::with_capacity(n_queries);
    for start in (0..n_queries).step_by(a.batch) {
        let end = (start + a.batch).min(n_queries);
        let xs: Vec<f64> = x[start * dim..end * dim]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let ts: Vec<f64> = times[start..end].iter().map(|&t| t as f64).collect();
        let out = field.evaluate(&xs, &ts, &vec![a.class; end - start])?;
        velocity.extend(out.velocity.iter().map(|&v| v as f32));
        x1_hat.extend(out.x1_hat.iter().map(|&v| v as f32));
        stats.extend(out.stats.into_iter().flatten());
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    if let Some(disk) = ds.disk() {
        // What out-of-core evaluation costs: the bytes read per second of evaluation.
        let secs = started.elapsed().as_secs_f64();
        let bytes = disk.bytes_read() as f64;
        eprintln!(
            "streamed {:.3} GB from {} in {secs:.2} s ({:.3} GB/s)",
            bytes / 1e9,
            disk.path().display(),
            bytes / 1e9 / secs.max(1e-9)
        );
    }
    // Under mpirun every rank holds the same result: rank 0 alone writes it.
    if !root {
        return Ok(());
    }

    npy::write_npy_f32(&a.out, &shape, &velocity)?;
    if let Some(p) = &a.x1_hat {
        npy::write_npy_f32(p, &shape, &x1_hat)?;
    }
    if let Some(p) = &a.stats {
        report::write_query_stats_csv(p, &times, &stats)?;
    }
    eprintln!("wrote {} ({n_queries} queries)", a.out.display());
    Ok(())
}
