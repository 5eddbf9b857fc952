//! `oracleflow bench`: oracle throughput beside a plain sgemm of the same shape, and with
//! `--peers` beside the ways researchers compute the oracle today (numpy, PyTorch, FAISS);
//! `--model` prints the cost model and projected times, `--sweep` fits how time scales.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use oracleflow::bench::{self, model, peers, sweep};
use oracleflow::oracle::cpu::{tune, CpuOptions, GemmPlan};
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::{output, Path};

use super::args::DataArgs;
use super::progress;

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
    /// Also run the peer implementations of benches/peers/ (python3: numpy full-set and
    /// chunked, PyTorch and FAISS when importable) on the same data and queries, check the
    /// exact ones agree with ours to 1e-4, and print each one's time and our ratio
    #[arg(long)]
    peers: bool,
    /// Times at which --peers compares (a peer's speed depends on t)
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.5, 0.9])]
    peer_times: Vec<f64>,
    /// Folder of the peer scripts
    #[arg(long, default_value_os_t = peers::default_dir())]
    peers_dir: PathBuf,
    /// Time our cpu backend on the plain dense path (no exact pruning) in --peers
    #[arg(long)]
    exact_dense: bool,
    /// Force the cpu backend's GEMM library and tile rows, LIB[:TILE_ROWS] with LIB one of
    /// gemm, faer, openblas, native (default: this machine's autotuned choice; the environment
    /// variable ORACLEFLOW_CPU_GEMM does the same)
    #[arg(long, value_name = "LIB[:TILE_ROWS]")]
    cpu_gemm: Option<String>,
    /// Print the cost model instead (FLOPs and bytes per evaluation and per 50-step
    /// trajectory) and projected times, labelled estimates, on an H100, eight H100s under
    /// MPI, an RTX 4090, an Apple M2 and this CPU (from a short measurement here)
    #[arg(long, conflicts_with_all = ["peers", "sweep"])]
    model: bool,
    /// --model: N to price (default: the dataset's; with --dim too, no dataset is loaded)
    #[arg(long, requires = "model")]
    samples: Option<usize>,
    /// --model: D to price (default: the dataset's)
    #[arg(long, requires = "model")]
    dim: Option<usize>,
    /// Time our dense cpu pass on synthetic data while N, D and B vary one at a time, and
    /// fit log-log slopes of time against each
    #[arg(long, conflicts_with = "peers")]
    sweep: bool,
    /// Also write the measurements as JSON (with the CPU model, threads and peers' BLAS)
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
    if let Some(spec) = &a.cpu_gemm {
        tune::force(GemmPlan::parse(spec, "--cpu-gemm")?)?;
    }
    if a.model {
        return run_model(&a);
    }
    if a.sweep {
        return run_sweep(&a);
    }
    if a.peers && !a.peers_dir.join("common.py").is_file() {
        oracleflow::bail_input!(
            "--peers-dir {}: no peer scripts there (common.py missing)",
            a.peers_dir.display()
        );
    }
    let ds = a.data.load()?;
    let (b, n, d) = (a.batch, ds.n_samples(), ds.dim());
    println!(
        "{}: N = {n}, D = {d}, B = {b}, {:?} storage; median of {} runs; CPU: {}",
        ds.name,
        ds.dtype(),
        a.reps,
        peers::cpu_model()
    );
    let tuning = tune::tuning();
    println!("{tuning}");
    let mut results = bench::sgemm_all(b, n, d, a.reps)?;
    for &kind in &a.backends {
        match bench::oracle_throughput(&ds, kind, b, a.reps) {
            Ok(m) => results.push(m),
            Err(e) => eprintln!("{kind:?}: not measured ({e})"),
        }
    }
    print!("{}", bench::table(&results));

    let mut peer_rows = Vec::new();
    if a.peers {
        let mut oracles: Vec<(String, Oracle)> = Vec::new();
        for &kind in &a.backends {
            let cpu = CpuOptions {
                prune: !a.exact_dense,
            };
            let gpu = GpuOptions {
                exact_dense: a.exact_dense,
                ..GpuOptions::default()
            };
            match Oracle::with_options(&ds, Path::RectifiedFlow, kind, gpu, cpu) {
                Ok(o) => oracles.push((format!("{kind:?}").to_lowercase(), o)),
                Err(e) => eprintln!("{kind:?}: not compared ({e})"),
            }
        }
        if oracles.is_empty() {
            bail!("--backends: none of them could be built for --peers");
        }
        let per_t = (oracles.len() + peers::PEERS.len() + 1) as u64;
        let bar = progress(per_t * a.peer_times.len() as u64, "measurements");
        peer_rows = peers::compare(
            &ds,
            &mut oracles,
            b,
            &a.peer_times,
            a.reps,
            &a.peers_dir,
            |what| {
                bar.set_message(what.to_string());
                bar.inc(1)
            },
        )?;
        bar.finish_and_clear();
        println!("\nours and the peers (same data, same queries, same run):");
        print!("{}", peers::table(&peer_rows));
        for r in peer_rows.iter().filter(|r| r.what.starts_with("ours")) {
            // The sgemm timed next to ours at this t (else the one of the table above).
            let sgemm = peer_rows
                .iter()
                .find(|p| p.t == r.t && p.what == peers::SGEMM_ROW)
                .and_then(|p| p.gflops)
                .unwrap_or_else(|| bench::best_sgemm(&results));
            let best_peer = peer_rows
                .iter()
                .filter(|p| p.t == r.t && p.exact && !p.what.starts_with("ours"))
                .filter(|p| p.what != peers::SGEMM_ROW)
                .filter_map(|p| p.gflops)
                .fold(0.0, f64::max);
            println!(
                "t = {}: {} at {:.2} of the best same-run sgemm rate, {:.2}x the best exact peer",
                r.t,
                r.what,
                r.gflops.unwrap_or(0.0) / sgemm,
                r.gflops.unwrap_or(0.0) / best_peer
            );
        }
    }
    if let Some(p) = &a.json {
        let json = serde_json::json!({
            "cpu_model": peers::cpu_model(),
            "threads": rayon::current_num_threads(),
            "data": { "spec": ds.name, "n_samples": n, "dim": d, "dtype": ds.dtype() },
            "n_queries": b,
            "cpu_gemm": tuning,
            "best_sgemm_gflops": bench::best_sgemm(&results),
            "measurements": results,
            "peers": peer_rows,
        });
        output::write_json(p, &json)?;
    }
    if let Some(bad) = peer_rows.iter().find(|r| r.agrees == Some(false)) {
        bail!(
            "{} at t = {} disagrees with ours: relative error {:.1e} > {:.0e}",
            bad.what,
            bad.t,
            bad.rel_error.unwrap_or(f64::NAN),
            peers::EXACT_TOLERANCE
        );
    }
    Ok(())
}

/// `bench --model`: the cost model of the given or the dataset's N, D and B, with rates
/// measured here on a short problem.
fn run_model(a: &BenchArgs) -> Result<()> {
    let (n, d) = match (a.samples, a.dim) {
        (Some(n), Some(d)) => (n, d),
        (n, d) => {
            let ds = a.data.load()?;
            (n.unwrap_or(ds.n_samples()), d.unwrap_or(ds.dim()))
        }
    };
    if n == 0 || d == 0 {
        oracleflow::bail_input!("--samples and --dim must be at least 1");
    }
    let problem = model::Problem {
        n_samples: n,
        dim: d,
        n_queries: a.batch,
        dtype: a.data.dtype(),
    };
    // Short measurement: the autotune's shape (B = 256, N = 8192, D = 512).
    let (mb, mn, md) = (256, 8192, 512);
    let tuning = tune::tuning();
    let sgemm = bench::sgemm_all(mb, mn, md, a.reps)?;
    let ds = oracleflow::dataset::load(&format!("gaussian:{mn},{md}"), a.data.dtype())?;
    let ours = oracle_dense(&ds, mb, a.reps)?;
    let cpu = model::CpuRates {
        cpu_model: peers::cpu_model(),
        threads: rayon::current_num_threads(),
        oracle_gflops: ours.gflops,
        sgemm_gflops: bench::best_sgemm(&sgemm),
        memory_bytes_per_s: bench::memory_read_rate(a.reps)?,
        what: format!("B = {mb}, N = {mn}, D = {md}, {}", tuning.plan),
    };
    let projections = model::project(&problem, &cpu);
    print!("{}", model::report(&problem, &cpu, &projections));
    if let Some(p) = &a.json {
        let json = serde_json::json!({
            "problem": problem,
            "flops_per_eval": problem.flops(),
            "bytes_per_eval": problem.bytes(),
            "evaluations": {
                "euler": model::evaluations(oracleflow::sample::Solver::Euler),
                "heun": model::evaluations(oracleflow::sample::Solver::Heun),
            },
            "devices": model::devices(),
            "gpu_kernel_efficiency_assumed": model::GPU_KERNEL_EFFICIENCY,
            "measured_here": cpu,
            "cpu_gemm": tuning,
            "sgemm": sgemm,
            "projections_are_estimates": true,
            "projections": projections,
        });
        output::write_json(p, &json)?;
    }
    Ok(())
}

/// Our cpu backend's dense pass (no pruning), timed like `oracle_throughput`.
fn oracle_dense(ds: &oracleflow::Dataset, b: usize, reps: usize) -> Result<bench::Measurement> {
    let mut oracle = Oracle::with_options(
        ds,
        Path::RectifiedFlow,
        BackendKind::Cpu,
        GpuOptions::default(),
        CpuOptions { prune: false },
    )?;
    let dim = ds.dim();
    let x: Vec<f32> = (0..b * dim)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let seconds = bench::median_seconds(reps, || {
        oracle.evaluate(&oracleflow::oracle::Query {
            x: &x,
            t: oracleflow::oracle::Times::Scalar(0.5),
            class: None,
        })?;
        Ok(())
    })?;
    Ok(bench::Measurement {
        what: "cpu dense".into(),
        description: oracle.describe(),
        n_samples: ds.n_samples(),
        dim,
        n_queries: b,
        seconds,
        gflops: 4.0 * (b * ds.n_samples() * dim) as f64 / seconds / 1e9,
        reps,
        gpu_kernels: None,
    })
}

/// `bench --sweep`: time against N, D and B on synthetic data, with fitted slopes.
fn run_sweep(a: &BenchArgs) -> Result<()> {
    let tuning = tune::tuning();
    println!(
        "sweep of our dense cpu pass (synthetic data, base N, D, B = {:?}); CPU: {}; {} threads",
        sweep::BASE,
        peers::cpu_model(),
        rayon::current_num_threads()
    );
    println!("{tuning}");
    let total = (sweep::N_VALUES.len() + sweep::D_VALUES.len() + sweep::B_VALUES.len()) as u64;
    let bar = progress(total, "points");
    let (points, slopes) = sweep::sweep(a.reps, || bar.inc(1))?;
    bar.finish_and_clear();
    print!("{}", sweep::table(&points, &slopes));
    if let Some(p) = &a.json {
        let json = serde_json::json!({
            "cpu_model": peers::cpu_model(),
            "threads": rayon::current_num_threads(),
            "cpu_gemm": tuning,
            "points": points,
            "slopes": slopes,
        });
        output::write_json(p, &json)?;
    }
    Ok(())
}
