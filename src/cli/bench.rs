//! `oracleflow bench`: oracle throughput beside a plain sgemm of the same shape.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use oracleflow::oracle::BackendKind;
use oracleflow::{bench, output};

use super::args::DataArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Queries per evaluation (B)
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Backends to time, in one run, beside a plain sgemm of the same shape
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [BackendKind::Cpu, BackendKind::Gpu])]
    backends: Vec<BackendKind>,
    /// Timed repetitions per measurement (median reported)
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also write the measurements as JSON
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    force: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(p) = &a.json {
        output::check_new(&[p.as_path()], a.force)?;
    }
    bench::check_settings(a.batch, a.reps)?;
    let ds = a.data.load()?;
    let (b, n, d) = (a.batch, ds.n_samples(), ds.dim());
    println!(
        "{}: N = {n}, D = {d}, B = {b}, {:?} storage; median of {} runs",
        ds.name,
        ds.dtype(),
        a.reps
    );
    let mut results = vec![bench::sgemm_throughput(b, n, d, a.reps)?];
    for &kind in &a.backends {
        match bench::oracle_throughput(&ds, kind, b, a.reps) {
            Ok(m) => results.push(m),
            Err(e) => eprintln!("{kind:?}: not measured ({e})"),
        }
    }
    print!("{}", bench::table(&results));
    if let Some(p) = &a.json {
        output::write_json(p, &serde_json::to_value(&results)?)?;
    }
    Ok(())
}
