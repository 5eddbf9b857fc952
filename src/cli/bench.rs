//! `oracleflow bench`: oracle throughput beside a plain sgemm of the same shape, and with
//! `--peers` beside the ways researchers compute the oracle today (numpy, PyTorch, FAISS).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use oracleflow::bench::{self, peers};
use oracleflow::oracle::cpu::CpuOptions;
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
    let mut results = vec![bench::sgemm_throughput(b, n, d, a.reps)?];
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
            match Oracle::with_options(&ds, Path::RectifiedFlow, kind, GpuOptions::default(), cpu) {
                Ok(o) => oracles.push((format!("{kind:?}").to_lowercase(), o)),
                Err(e) => eprintln!("{kind:?}: not compared ({e})"),
            }
        }
        if oracles.is_empty() {
            bail!("--backends: none of them could be built for --peers");
        }
        let per_t = (oracles.len() + peers::PEERS.len()) as u64;
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
        let sgemm = results[0].gflops;
        for r in peer_rows.iter().filter(|r| r.what.starts_with("ours")) {
            println!(
                "t = {}: {} at {:.2} of the same-run sgemm rate",
                r.t,
                r.what,
                r.gflops.unwrap_or(0.0) / sgemm
            );
        }
    }
    if let Some(p) = &a.json {
        let json = serde_json::json!({
            "cpu_model": peers::cpu_model(),
            "threads": rayon::current_num_threads(),
            "data": { "spec": ds.name, "n_samples": n, "dim": d, "dtype": ds.dtype() },
            "n_queries": b,
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
