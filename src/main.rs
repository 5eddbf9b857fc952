//! The `oracleflow` command line: parse, load the data, build the oracle, run, report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use oracleflow::dataset::{self, npy, Dataset, Dtype};
use oracleflow::oracle::{BackendKind, Oracle, Query, Times};
use oracleflow::output;
use oracleflow::Path;

#[derive(Parser)]
#[command(
    name = "oracleflow",
    version,
    about = "Exact closed-form (oracle) flow-matching velocity over a whole dataset, on any GPU or CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exact oracle velocity (= flow-matching training target) for given queries and times
    Velocity(VelocityArgs),
    /// Print the GPU adapter and a summary of the dataset
    Info(InfoArgs),
}

#[derive(Args)]
struct DataArgs {
    /// The dataset (see "--data spec" in `--help`)
    #[arg(long, default_value = "embedded", long_help = dataset::SPEC_HELP)]
    data: String,
    /// How dataset values are stored on the device (computation is always f32)
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
}

#[derive(Args)]
struct OracleArgs {
    /// Probability path
    #[arg(long, value_enum, default_value_t)]
    path: Path,
    /// Where to evaluate: auto = a real GPU if present, else cpu
    #[arg(long, value_enum, default_value_t)]
    backend: BackendKind,
}

#[derive(Args)]
struct VelocityArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
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
    /// Also write per-query stats (CSV: top-1 weight and index, entropy, ESS)
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Queries per oracle call (bounds memory; each call streams the dataset once)
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Overwrite existing output files
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Also load and summarise a dataset
    #[arg(long, long_help = dataset::SPEC_HELP)]
    data: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Velocity(a) => velocity(a),
        Command::Info(a) => info(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(data: &DataArgs) -> Result<Dataset> {
    Ok(dataset::load(&data.data, data.dtype)?)
}

fn velocity(a: VelocityArgs) -> Result<()> {
    let outputs: Vec<&std::path::Path> = [Some(&a.out), a.x1_hat.as_ref(), a.stats.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| p.as_path())
        .collect();
    output::check_new(&outputs, a.force)?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }

    let ds = load(&a.data)?;
    let dim = ds.dim();
    let (shape, x) = npy::read_npy_f32(&a.queries)?;
    if shape.is_empty() || shape[1..].iter().product::<usize>() != dim {
        bail!(
            "{}: queries of shape {shape:?} do not hold {dim} values per query (dataset {})",
            a.queries.display(),
            ds.name
        );
    }
    let n_queries = shape[0];
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
    if let Some(bad) = times.iter().find(|t| !(0.0..=1.0).contains(*t)) {
        bail!("time {bad} is outside [0, 1]");
    }

    let mut oracle = Oracle::new(&ds, a.oracle.path, a.oracle.backend)?;
    eprintln!("oracle: {} on {} ({} samples, D = {dim})", oracle.describe(), ds.name, ds.n_samples());

    let bar = progress(n_queries as u64, "queries");
    let mut velocity = Vec::with_capacity(x.len());
    let mut x1_hat = Vec::with_capacity(x.len());
    let mut stats = Vec::with_capacity(n_queries);
    for start in (0..n_queries).step_by(a.batch) {
        let end = (start + a.batch).min(n_queries);
        let out = oracle.evaluate(&Query {
            x: &x[start * dim..end * dim],
            t: Times::PerQuery(&times[start..end]),
            class: a.class,
        })?;
        velocity.extend(out.velocity);
        x1_hat.extend(out.x1_hat);
        stats.extend(out.stats);
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();

    npy::write_npy_f32(&a.out, &shape, &velocity)?;
    if let Some(p) = &a.x1_hat {
        npy::write_npy_f32(p, &shape, &x1_hat)?;
    }
    if let Some(p) = &a.stats {
        output::write_atomic(p, |w| {
            writeln!(w, "query,t,top1_weight,top1_index,entropy,ess")?;
            for (q, s) in stats.iter().enumerate() {
                writeln!(
                    w,
                    "{q},{},{},{},{},{}",
                    times[q], s.top1_weight, s.top1_index, s.entropy, s.ess
                )?;
            }
            Ok(())
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    eprintln!("wrote {} ({n_queries} queries)", a.out.display());
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    match oracleflow::oracle::gpu::adapter_report() {
        Ok(report) => println!("{report}"),
        Err(e) => println!("gpu: none ({e})"),
    }
    println!("cpu: {} threads", rayon::current_num_threads());
    if let Some(spec) = a.data {
        let ds = dataset::load(&spec, a.dtype)?;
        println!("dataset: {}", ds.name);
        println!("  samples: {}", ds.n_samples());
        println!(
            "  sample shape: {:?} ({}) = {} values",
            ds.shape.dims,
            if ds.shape.is_image { "image" } else { "array" },
            ds.dim()
        );
        println!("  storage: {:?}", ds.dtype());
        match ds.labels() {
            Some(_) => println!("  classes: {:?}", ds.class_counts()),
            None => println!("  classes: none (unlabelled)"),
        }
    }
    Ok(())
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
fn progress(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{eta}} left)"
        ))
        .expect("valid template"),
    );
    bar
}
