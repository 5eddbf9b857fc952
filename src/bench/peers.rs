//! Peers side by side: the ways researchers compute the oracle today, run on the same data
//! and queries in the same process tree as ours (the scripts in `benches/peers/`, python3).
//!
//! Exact peers (numpy and PyTorch, whole set or chunked online softmax) must agree with our
//! velocity to 1e-4 relative; approximate ones (FAISS top-k) report their error. Each is
//! timed at several t, because a peer's speed depends on t (denormal weights slow BLAS).

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};

use crate::dataset::{npy, Dataset};
use crate::error::{Error, Result};
use crate::oracle::{Oracle, Query, Times};

/// The peer scripts: file stem and whether the method is exact.
pub const PEERS: [(&str, bool); 8] = [
    ("numpy_full", true),
    ("numpy_chunked", true),
    ("torch_full", true),
    ("torch_chunked", true),
    // On a CUDA GPU, as the ad-hoc scripts peers run: skipped where torch sees none.
    ("torch_cuda_full", true),
    ("torch_cuda_chunked", true),
    ("faiss_flat", false),
    ("faiss_ivf", false),
];

/// The row holding the best plain sgemm, timed at each t right after ours.
pub const SGEMM_ROW: &str = "best sgemm";

/// Agreement an exact peer must reach with our velocity (relative L2).
pub const EXACT_TOLERANCE: f64 = 1e-4;

/// Where the peer scripts are: `benches/peers` of the source tree this binary was built from.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers")
}

/// One timed implementation at one t.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerRow {
    pub t: f64,
    pub what: String,
    pub exact: bool,
    /// Median seconds per evaluation; None when the peer could not run.
    pub seconds: Option<f64>,
    /// 4 B N D / seconds
    pub gflops: Option<f64>,
    /// Peer seconds / our seconds at the same t (> 1: ours is faster)
    pub ours_faster_by: Option<f64>,
    /// ||v_peer - v_ours|| / ||v_ours||
    pub rel_error: Option<f64>,
    /// Exact peers only: within [`EXACT_TOLERANCE`]
    pub agrees: Option<bool>,
    pub note: String,
}

/// B queries on the rectified-flow path at time t, built from random training samples.
pub fn path_queries(ds: &Dataset, t: f64, n_queries: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dim = ds.dim();
    let mut x = Vec::with_capacity(n_queries * dim);
    for q in 0..n_queries {
        let y = ds.sample_f64(rng.random_range(0..ds.n_samples()));
        let noise = crate::sample::initial_noise(seed, q, dim);
        x.extend(
            y.iter()
                .zip(&noise)
                .map(|(y, n)| (t * y + (1.0 - t) * n) as f32),
        );
    }
    x
}

fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Runs one peer script; Ok(None) with the reason when its library is missing.
fn run_script(
    script: &Path,
    data: &Path,
    queries: &Path,
    t: f64,
    reps: usize,
    out: &Path,
) -> Result<std::result::Result<(f64, String), String>> {
    let output = Command::new("python3")
        .arg(script)
        .args(["--data", &data.to_string_lossy()])
        .args(["--queries", &queries.to_string_lossy()])
        .args(["--t", &t.to_string(), "--reps", &reps.to_string()])
        .args(["--out", &out.to_string_lossy()])
        .output()
        .map_err(|e| Error::io(script, e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
    if output.status.code() == Some(3) {
        return Ok(Err(json["unavailable"]
            .as_str()
            .unwrap_or("unavailable")
            .into()));
    }
    match json["seconds"].as_f64() {
        Some(s) if output.status.success() => {
            Ok(Ok((s, json["note"].as_str().unwrap_or("").into())))
        }
        _ => Ok(Err(format!(
            "failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))),
    }
}

/// Times our oracle (each of `oracles`) and every peer at each t of `times`, on B queries
/// per evaluation; `tick` after each measurement.
pub fn compare(
    ds: &Dataset,
    oracles: &mut [(String, Oracle<'_>)],
    n_queries: usize,
    times: &[f64],
    reps: usize,
    peers_dir: &Path,
    mut tick: impl FnMut(&str),
) -> Result<Vec<PeerRow>> {
    for &t in times {
        if !(t > 0.0 && t < 1.0) {
            return Err(Error::Input(format!("--peer-times: {t} is not in (0, 1)")));
        }
    }
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let dim = ds.dim();
    let data_path = work.path().join("data.npy");
    let values: Vec<f32> = (0..ds.n_samples()).flat_map(|r| ds.sample(r)).collect();
    npy::write_npy_f32(&data_path, &[ds.n_samples(), dim], &values)?;
    drop(values);
    let flops = 4.0 * (n_queries * ds.n_samples() * dim) as f64;
    let mut rows = Vec::new();
    for (k, &t) in times.iter().enumerate() {
        let x = path_queries(ds, t, n_queries, 1000 + k as u64);
        let q_path = work.path().join("queries.npy");
        npy::write_npy_f32(&q_path, &[n_queries, dim], &x)?;
        let mut ours: Option<(f64, Vec<f32>)> = None;
        for (name, oracle) in oracles.iter_mut() {
            let mut out = crate::oracle::OracleOutput::default();
            let seconds = super::median_seconds(reps, || {
                out = oracle.evaluate(&Query {
                    x: &x,
                    t: Times::Scalar(t as f32),
                    class: None,
                })?;
                Ok(())
            })?;
            // Exact pruning's work saved (mean fractions of tiles and of samples skipped)
            // and its certificate at this t.
            let mean = |f: fn(&crate::oracle::QueryStats) -> f32| {
                out.stats.iter().map(|s| f(s) as f64).sum::<f64>() / out.stats.len().max(1) as f64
            };
            let (tiles, skipped) = (mean(|s| s.tiles_skipped), mean(|s| s.samples_skipped));
            let certificate = out
                .stats
                .iter()
                .map(|s| s.skipped_mass_bound as f64)
                .fold(0.0, f64::max);
            let velocity = out.velocity;
            rows.push(PeerRow {
                t,
                what: format!("ours: {name}"),
                exact: true,
                seconds: Some(seconds),
                gflops: Some(flops / seconds / 1e9),
                ours_faster_by: None,
                rel_error: None,
                agrees: None,
                note: format!(
                    "{}; tiles skipped {:.1}%, samples skipped {:.1}%, skipped-mass \
                     certificate <= {certificate:.1e}",
                    oracle.describe(),
                    100.0 * tiles,
                    100.0 * skipped
                ),
            });
            tick(name);
            if ours.is_none() {
                ours = Some((seconds, velocity));
            }
        }
        let (our_seconds, our_velocity) = ours.expect("at least one oracle");
        // The sgemm ceiling timed right after ours, so that the ratio between them is not
        // the difference in machine load between two moments (a shared machine).
        let sgemm = super::sgemm_all(n_queries, ds.n_samples(), dim, reps)?;
        if let Some(best) = sgemm.iter().max_by(|a, b| a.gflops.total_cmp(&b.gflops)) {
            rows.push(PeerRow {
                t,
                what: SGEMM_ROW.into(),
                exact: false,
                seconds: Some(best.seconds),
                gflops: Some(best.gflops),
                ours_faster_by: None,
                rel_error: None,
                agrees: None,
                note: format!(
                    "{} (GFLOP/s on its 2 B N D), timed right after ours",
                    best.description
                ),
            });
        }
        tick("sgemm");
        for (peer, exact) in PEERS {
            let out = work.path().join(format!("{peer}.npy"));
            let script = peers_dir.join(format!("{peer}.py"));
            let row = match run_script(&script, &data_path, &q_path, t, reps, &out)? {
                Ok((seconds, note)) => {
                    let (_, v) = npy::read_npy_f32(&out)?;
                    let err = rel_error(&v, &our_velocity);
                    PeerRow {
                        t,
                        what: peer.into(),
                        exact,
                        seconds: Some(seconds),
                        gflops: Some(flops / seconds / 1e9),
                        ours_faster_by: Some(seconds / our_seconds),
                        rel_error: Some(err),
                        agrees: exact.then_some(err <= EXACT_TOLERANCE),
                        note,
                    }
                }
                Err(why) => PeerRow {
                    t,
                    what: peer.into(),
                    exact,
                    seconds: None,
                    gflops: None,
                    ours_faster_by: None,
                    rel_error: None,
                    agrees: None,
                    note: format!("skipped: {why}"),
                },
            };
            rows.push(row);
            tick(peer);
        }
    }
    Ok(rows)
}

/// The comparison as a table, one block per t.
pub fn table(rows: &[PeerRow]) -> String {
    let mut s = format!(
        "{:>5}  {:<18} {:>10} {:>9} {:>11} {:>10}  {}\n",
        "t", "what", "s/eval", "GFLOP/s", "ours faster", "rel. err", "note"
    );
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    for r in rows {
        let flag = match r.agrees {
            Some(false) => " DISAGREES",
            _ => "",
        };
        s += &format!(
            "{:>5}  {:<18} {:>10} {:>9} {:>11} {:>10}  {}{flag}\n",
            r.t,
            r.what,
            opt(r.seconds, &|v| format!("{v:.4}")),
            opt(r.gflops, &|v| format!("{v:.1}")),
            opt(r.ours_faster_by, &|v| format!("{v:.2}x")),
            opt(r.rel_error, &|v| format!("{v:.1e}")),
            r.note
        );
    }
    s
}

/// The CPU model, from /proc/cpuinfo where there is one.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
