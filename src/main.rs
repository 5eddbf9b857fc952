//! The `oracleflow` command line: parse, load the data, build the oracle, run, report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
// Usage errors are bad input: exit code 2 (anyhow::bail! would give 1).
use oracleflow::bail_input as bail;

use oracleflow::dataset::{self, npy, Dataset, Dtype};
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{BackendKind, Oracle, Query, Times};
use oracleflow::output;
use oracleflow::report;
use oracleflow::sample::{Guidance, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::{analysis, bench, Path};

#[derive(Parser)]
#[command(
    name = "oracleflow",
    version,
    about = "Exact closed-form (oracle) flow-matching velocity over a whole dataset, on any GPU or CPU",
    after_help = "Exit status: 0 on success; 2 for bad input or usage (a file, flag, --data spec \
                  or output path to fix, or a dataset too large for memory); 1 for internal or \
                  device errors."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample with the oracle velocity and write pictures (samples, trajectories, nearest)
    Sample(SampleArgs),
    /// Exact oracle velocity (= flow-matching training target) for given queries and times
    Velocity(VelocityArgs),
    /// Stage curves: posterior top-1 weight, entropy and training-target difference along
    /// the path, for one or several datasets (the navigation -> refinement transition)
    Stages(StagesArgs),
    /// Print the GPU adapter and a summary of the dataset
    Info(InfoArgs),
    /// Measure oracle throughput (GFLOP/s = 4 B N D / time) beside a plain sgemm
    Bench(BenchArgs),
}

#[derive(Args)]
struct SampleArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    /// Number of samples
    #[arg(short = 'n', long, default_value_t = 64)]
    n_samples: usize,
    /// Solver steps from t = 0 to t = 1
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, value_enum, default_value_t)]
    solver: Solver,
    /// Time shift s: t_m = s t / (1 + (s - 1) t); s < 1 spends more steps early
    #[arg(long, default_value_t = 1.0)]
    shift: f64,
    /// Explicit time grid instead of --steps/--shift, e.g. 0,0.1,0.3,0.6,1
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["steps", "shift"])]
    times: Option<Vec<f64>>,
    /// Noise seed: sample i starts from noise fixed by (seed, i)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Condition every sample on one class
    #[arg(long, conflicts_with = "classes")]
    class: Option<u32>,
    /// `all`: a balanced set, sample i conditioned on the i-th class in turn
    #[arg(long, value_parser = ["all"])]
    classes: Option<String>,
    /// Classifier-free guidance scale w: u = u_uncond + w (u_cond - u_uncond)
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guidance interval t_lo,t_hi (outside it: the conditional velocity)
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0])]
    cfg_interval: Vec<f64>,
    /// Samples integrated together (each velocity evaluation streams the data once per batch)
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Rows of trajectory.png (samples spread over the set)
    #[arg(long, default_value_t = 8)]
    track: usize,
    /// Columns (times) of trajectory.png
    #[arg(long, default_value_t = 10)]
    columns: usize,
    /// Output directory
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing files in the output directory
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct StagesArgs {
    /// Datasets (repeat --data to compare several, e.g. gaussian:1400,512 and gaussian:1400,8192)
    #[arg(long, required = true, long_help = dataset::SPEC_HELP)]
    data: Vec<String>,
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
    #[command(flatten)]
    oracle: OracleArgs,
    /// (training sample, noise) pairs averaged at each time
    #[arg(long, default_value_t = 256)]
    pairs: usize,
    /// Intervals of the time grid on [0, t_max]
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Last time of the grid (< 1)
    #[arg(long, default_value_t = 0.5)]
    t_max: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (stages.png, stages.csv, stages.json)
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct BenchArgs {
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
    /// GPU memory the dataset may occupy, in MiB; a larger dataset is streamed through the
    /// GPU chunk by chunk on every evaluation (default: keep it resident when it fits)
    #[arg(long)]
    gpu_memory_mib: Option<u64>,
}

impl OracleArgs {
    fn build<'d>(&self, ds: &'d Dataset) -> Result<Oracle<'d>> {
        let gpu = GpuOptions {
            max_resident_bytes: self.gpu_memory_mib.map(|m| m << 20),
            ..GpuOptions::default()
        };
        Ok(Oracle::with_gpu_options(ds, self.path, self.backend, gpu)?)
    }
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
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" when the
    // variable is missing (containers, CI), which reads like our own failure. Set it while
    // the process is still single-threaded, the only time changing the environment is sound.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(a) => sample(a),
        Command::Velocity(a) => velocity(a),
        Command::Bench(a) => bench(a),
        Command::Stages(a) => stages(a),
        Command::Info(a) => info(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", oracleflow::error::one_line(&e));
            ExitCode::from(oracleflow::error::exit_code(&e))
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
    ds.rows_for(a.class)?;

    let mut oracle = a.oracle.build(&ds)?;
    eprintln!(
        "oracle: {} on {} ({} samples, D = {dim})",
        oracle.describe(),
        ds.name,
        ds.n_samples()
    );

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

fn sample(a: SampleArgs) -> Result<()> {
    output::check_new_in(&a.out, &report::SAMPLE_FILES, a.force)?;
    if a.n_samples == 0 {
        bail!("-n must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let schedule = match &a.times {
        Some(t) => Schedule::Explicit(t.clone()),
        None => Schedule::Shifted {
            steps: a.steps,
            shift: a.shift,
        },
    };
    let times = schedule.times()?;
    if times[0] != 0.0 || *times.last().unwrap() != 1.0 {
        bail!("--times must run from 0 to 1");
    }

    let ds = load(&a.data)?;
    let classes: Vec<Option<u32>> = match (a.class, &a.classes) {
        (Some(c), _) => {
            ds.rows_for(Some(c))?;
            vec![Some(c); a.n_samples]
        }
        (None, Some(_)) => {
            let counts = ds.class_counts();
            if counts.is_empty() {
                bail!("--classes all: dataset {} has no labels", ds.name);
            }
            (0..a.n_samples)
                .map(|i| Some(counts[i % counts.len()].0))
                .collect()
        }
        (None, None) => vec![None; a.n_samples],
    };
    let guidance = match a.cfg_scale {
        Some(scale) => {
            if !scale.is_finite() {
                bail!("--cfg-scale {scale} must be a finite number");
            }
            if classes[0].is_none() {
                bail!("--cfg-scale needs --class K or --classes all");
            }
            let [t_lo, t_hi] = a.cfg_interval[..] else {
                bail!("--cfg-interval takes two times, t_lo,t_hi");
            };
            if !(0.0..=1.0).contains(&t_lo) || !(t_lo..=1.0).contains(&t_hi) {
                bail!("--cfg-interval {t_lo},{t_hi}: need 0 <= t_lo <= t_hi <= 1");
            }
            Some(Guidance { scale, t_lo, t_hi })
        }
        None => None,
    };
    let tracked: Vec<usize> = (0..a.track.min(a.n_samples))
        .map(|k| k * a.n_samples / a.track.min(a.n_samples))
        .collect();
    let options = SampleOptions {
        schedule,
        solver: a.solver,
        seed: a.seed,
        classes: classes.clone(),
        guidance,
        batch: a.batch,
        tracked,
    };

    let mut oracle = a.oracle.build(&ds)?;
    eprintln!(
        "oracle: {} on {} ({} samples, D = {})",
        oracle.describe(),
        ds.name,
        ds.n_samples(),
        ds.dim()
    );
    let n_batches = a.n_samples.div_ceil(options.batch);
    let bar = progress(((times.len() - 1) * n_batches) as u64, "steps");
    let start = std::time::Instant::now();
    let run = oracleflow::sample::sample(&mut oracle, &options, || bar.inc(1))?;
    let sampling_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let neighbours = analysis::nearest_two(&ds, &run.samples);
    let memorized = neighbours.iter().filter(|nb| nb.memorized()).count();
    let per_sample: Vec<_> = (0..a.n_samples)
        .map(|i| {
            serde_json::json!({
                "class": classes[i],
                "nearest": neighbours[i].nearest,
                "distance": neighbours[i].distance,
                "second_distance": neighbours[i].second_distance,
                "memorized": neighbours[i].memorized(),
                "last_step": run.final_stats[i],
            })
        })
        .collect();
    let run_json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "data": { "spec": ds.name, "n_samples": ds.n_samples(), "shape": ds.shape, "dtype": ds.dtype() },
        "oracle": { "backend": oracle.kind(), "description": oracle.describe(), "path": a.oracle.path },
        "sampling": {
            "n": a.n_samples, "solver": a.solver, "steps": times.len() - 1, "shift": a.shift,
            "times": times, "seed": a.seed, "batch": options.batch,
            "class": a.class, "classes": a.classes, "guidance": guidance,
        },
        "timings": {
            "sampling_seconds": sampling_seconds,
            "oracle_evaluations": run.evaluations,
            "seconds_per_evaluation": sampling_seconds / run.evaluations.max(1) as f64,
        },
        "memorized": { "count": memorized, "of": a.n_samples, "criterion": "d(nearest) / d(second nearest) < 1/3" },
        "steps": run.steps,
        "samples": per_sample,
    });
    report::write_sample_outputs(&a.out, &ds, &run, &neighbours, a.columns, &run_json)?;
    eprintln!(
        "wrote {}/{{samples,trajectory,nearest,stages}}.png, samples.npy, steps.csv, run.json: {} samples in {:.1} s, {memorized} of {} memorized",
        a.out.display(),
        a.n_samples,
        sampling_seconds,
        a.n_samples
    );
    Ok(())
}

fn stages(a: StagesArgs) -> Result<()> {
    output::check_new_in(&a.out, &report::STAGE_FILES, a.force)?;
    if a.pairs == 0 || a.steps == 0 || !(a.t_max > 0.0 && a.t_max < 1.0) {
        bail!("need --pairs >= 1, --steps >= 1 and 0 < --t-max < 1");
    }
    let times: Vec<f64> = (0..=a.steps)
        .map(|i| a.t_max * i as f64 / a.steps as f64)
        .collect();
    let mut results = Vec::new();
    let mut summaries = Vec::new();
    for spec in &a.data {
        let ds = dataset::load(spec, a.dtype)?;
        let mut oracle = a.oracle.build(&ds)?;
        eprintln!(
            "{spec}: N = {}, D = {} on {}",
            ds.n_samples(),
            ds.dim(),
            oracle.describe()
        );
        let bar = progress(times.len() as u64, "times");
        let curve = analysis::stage_curve(&mut oracle, &times, a.pairs, a.seed, || bar.inc(1))?;
        bar.finish_and_clear();
        let r = report::StageResult {
            data: spec.clone(),
            n_samples: ds.n_samples(),
            dim: ds.dim(),
            curve,
        };
        let (t50, t99) = r.crossings();
        println!(
            "{spec}: mean top-1 weight reaches 0.5 at t = {}, 0.99 at t = {}",
            t50.map_or("-".into(), |t| format!("{t:.3}")),
            t99.map_or("-".into(), |t| format!("{t:.3}"))
        );
        summaries.push(serde_json::json!({
            "data": spec, "n_samples": ds.n_samples(), "dim": ds.dim(),
            "backend": oracle.describe(), "t_top1_half": t50, "t_top1_saturated": t99,
            "curve": r.curve,
        }));
        results.push(r);
    }
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "path": a.oracle.path, "pairs": a.pairs, "seed": a.seed, "times": times,
        "saturation_level": 0.99,
        "datasets": summaries,
    });
    report::write_stage_outputs(&a.out, &results, &json)?;
    eprintln!("wrote {}/stages.{{png,csv,json}}", a.out.display());
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.batch == 0 || a.reps == 0 {
        bail!("--batch and --reps must be at least 1");
    }
    if let Some(p) = &a.json {
        output::check_new(&[p.as_path()], a.force)?;
    }
    let ds = load(&a.data)?;
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
