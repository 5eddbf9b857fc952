//! Throughput measurement: oracle evaluations against a plain sgemm of the same shape,
//! measured side by side in one run (absolute times on a shared machine are noise; the
//! ratios are what to compare).

pub mod model;
pub mod peers;
pub mod sweep;

use std::time::Instant;

use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::Result;
use crate::oracle::cpu::{self, GemmLib};
use crate::oracle::gpu::{GpuOptions, KernelTimes, ProfileLog};
use crate::oracle::{BackendKind, Oracle, Query, Times};
use crate::path::Path;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    /// What was timed ("cpu oracle", "plain sgemm", ...)
    pub what: String,
    pub description: String,
    pub n_samples: usize,
    pub dim: usize,
    pub n_queries: usize,
    /// Median seconds per evaluation over `reps` timed runs (after one warm-up)
    pub seconds: f64,
    /// Useful flops per second: 4 B N D for an oracle evaluation, 2 B N D for one GEMM
    pub gflops: f64,
    pub reps: usize,
    /// GPU rows: the median per-kernel milliseconds of the timed runs, from the device's
    /// timestamp queries (None where the device has none, and for every other row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_kernels: Option<KernelTimes>,
}

/// Checks the batch size and repetitions of a benchmark.
pub fn check_settings(n_queries: usize, reps: usize) -> Result<()> {
    if n_queries == 0 {
        return Err(crate::error::Error::Input(
            "--batch must be at least 1".into(),
        ));
    }
    if reps == 0 {
        return Err(crate::error::Error::Input(
            "--reps must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Median of `reps` timings of `f` after one untimed warm-up run.
pub fn median_seconds(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times one oracle evaluation of `n_queries` noise-like queries at t = 0.5. A GPU
/// backend also times each kernel where its device has timestamp queries.
pub fn oracle_throughput(
    ds: &Dataset,
    kind: BackendKind,
    n_queries: usize,
    reps: usize,
) -> Result<Measurement> {
    let log = ProfileLog::default();
    let gpu = GpuOptions {
        profile: Some(log.clone()),
        ..Default::default()
    };
    let mut oracle = Oracle::with_gpu_options(ds, Path::RectifiedFlow, kind, gpu)?;
    let dim = ds.dim();
    // Deterministic pseudo-noise: the values do not change the work done.
    let x: Vec<f32> = (0..n_queries * dim)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let seconds = median_seconds(reps, || {
        oracle.evaluate(&Query {
            x: &x,
            t: Times::Scalar(0.5),
            class: None,
        })?;
        Ok(())
    })?;
    // The first call was the untimed warm-up.
    let calls = log.take();
    let gpu_kernels = KernelTimes::median(calls.get(1..).unwrap_or_default());
    let flops = 4.0 * n_queries as f64 * ds.n_samples() as f64 * dim as f64;
    Ok(Measurement {
        what: format!("{kind:?} oracle").to_lowercase(),
        description: oracle.describe(),
        n_samples: ds.n_samples(),
        dim,
        n_queries,
        seconds,
        gflops: flops / seconds / 1e9,
        reps,
        gpu_kernels,
    })
}

/// Times a plain multi-threaded sgemm (B x D) * (D x N) with the `gemm` crate: the rate a
/// BLAS-backed `cdist` would run at on this machine, the ceiling for the CPU backend.
pub fn sgemm_throughput(
    n_queries: usize,
    n_samples: usize,
    dim: usize,
    reps: usize,
) -> Result<Measurement> {
    let lhs = vec![0.5f32; n_queries * dim];
    let rhs = vec![0.25f32; n_samples * dim];
    let mut dst = vec![0.0f32; n_queries * n_samples];
    let threads = rayon::current_num_threads();
    let seconds = median_seconds(reps, || {
        // SAFETY: the strides describe row-major (B x D), (N x D) read as (D x N), and a
        // row-major (B x N) destination, all within the allocations above.
        unsafe {
            gemm::gemm(
                n_queries,
                n_samples,
                dim,
                dst.as_mut_ptr(),
                1,
                n_samples as isize,
                false,
                lhs.as_ptr(),
                1,
                dim as isize,
                rhs.as_ptr(),
                dim as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        Ok(())
    })?;
    let flops = 2.0 * n_queries as f64 * n_samples as f64 * dim as f64;
    Ok(Measurement {
        what: "plain sgemm".into(),
        description: format!("gemm crate, {threads} threads, (B x D) * (D x N)"),
        n_samples,
        dim,
        n_queries,
        seconds,
        gflops: flops / seconds / 1e9,
        reps,
        gpu_kernels: None,
    })
}

/// Times a plain sgemm (B x D) * (D x N) with one library on every thread: the N columns
/// split into one block per rayon thread, each a single-threaded GEMM (how the CPU
/// backend runs them too, and fair to every library: OpenBLAS is held to one thread of its
/// own so it does not oversubscribe).
pub fn sgemm_throughput_lib(
    lib: GemmLib,
    n_queries: usize,
    n_samples: usize,
    dim: usize,
    reps: usize,
) -> Result<Measurement> {
    use crate::dataset::limits::{check_alloc, product};
    let floats = product(&[n_queries + n_samples, dim])
        .zip(product(&[n_queries, n_samples]))
        .and_then(|(a, b)| a.checked_add(b));
    check_alloc("the sgemm benchmark", floats.and_then(|f| f.checked_mul(4)))?;
    let lhs: Vec<f32> = (0..n_queries * dim).map(|i| (i % 7) as f32 * 0.1).collect();
    let rhs: Vec<f32> = (0..n_samples * dim).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut dst = vec![0.0f32; n_queries * n_samples];
    let threads = rayon::current_num_threads();
    let cols = n_samples.div_ceil(threads);
    let seconds = median_seconds(reps, || {
        // Column block c of dst (row-major B x N) is not contiguous: each task writes its
        // own (B x cols) buffer instead; the copy-out is not timed work of a GEMM.
        dst.par_chunks_mut(n_queries * cols)
            .enumerate()
            .for_each(|(c, out)| {
                let start = c * cols;
                let nc = cols.min(n_samples - start);
                cpu::sgemm_with(
                    lib,
                    cpu::Gemm {
                        m: n_queries,
                        n: nc,
                        k: dim,
                    },
                    out,
                    false,
                    (&lhs, dim, 1),
                    (&rhs[start * dim..], 1, dim),
                );
            });
        Ok(())
    })?;
    std::hint::black_box(&dst);
    let flops = 2.0 * n_queries as f64 * n_samples as f64 * dim as f64;
    Ok(Measurement {
        what: format!("sgemm {}", lib.name()),
        description: format!(
            "{}, {threads} threads x 1-thread GEMMs, (B x D) * (D x N/{threads})",
            lib.describe()
        ),
        n_samples,
        dim,
        n_queries,
        seconds,
        gflops: flops / seconds / 1e9,
        reps,
        gpu_kernels: None,
    })
}

/// The plain sgemm of every library available here (the gemm crate's own parallel driver
/// too); the best of them is the ceiling the oracle is compared with.
pub fn sgemm_all(
    n_queries: usize,
    n_samples: usize,
    dim: usize,
    reps: usize,
) -> Result<Vec<Measurement>> {
    let mut out = vec![sgemm_throughput(n_queries, n_samples, dim, reps)?];
    for lib in GemmLib::available_here() {
        out.push(sgemm_throughput_lib(lib, n_queries, n_samples, dim, reps)?);
    }
    Ok(out)
}

/// The best rate among the sgemm rows of `rows`.
pub fn best_sgemm(rows: &[Measurement]) -> f64 {
    rows.iter()
        .filter(|m| m.what.contains("sgemm"))
        .map(|m| m.gflops)
        .fold(0.0, f64::max)
}

/// Bytes per second of a plain parallel read (sum) of a 256 MiB buffer: the memory rate
/// the cost model uses for this CPU.
pub fn memory_read_rate(reps: usize) -> Result<f64> {
    let n = 32 << 20;
    let buf: Vec<u64> = (0..n as u64).collect();
    let seconds = median_seconds(reps, || {
        // Integer wrapping adds: no serial float dependency, so the loop vectorizes and
        // the read, not the adder, is what is timed.
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        Ok(())
    })?;
    Ok((n * 8) as f64 / seconds)
}

/// One line per measurement, with its rate relative to the best sgemm among them; under
/// a GPU row, its per-kernel times and each one's share of the call (or one note that the
/// device has no timestamps).
pub fn table(rows: &[Measurement]) -> String {
    let base = match best_sgemm(rows) {
        b if b > 0.0 => b,
        _ => rows.first().map_or(1.0, |m| m.gflops),
    };
    rows.iter()
        .map(|m| {
            let mut line = format!(
                "{:<15} {:>9.4} s/eval {:>8.2} GFLOP/s  {:>5.2} x best sgemm  {}\n",
                m.what,
                m.seconds,
                m.gflops,
                m.gflops / base,
                m.description
            );
            match &m.gpu_kernels {
                Some(k) => line += &format!("{:<15} {}\n", "", kernel_shares(k)),
                None if m.description.starts_with("gpu:") => {
                    line += &format!(
                        "{:<15} no per-kernel times: the device has no timestamp queries\n",
                        ""
                    )
                }
                None => {}
            }
            line
        })
        .collect()
}

/// Each kernel's milliseconds and share of the call's wall time.
fn kernel_shares(k: &KernelTimes) -> String {
    let wall = k.wall_ms.max(f64::MIN_POSITIVE);
    let part = |name: &str, ms: f64| format!("{name} {ms:.3} ms ({:.0}%)", 100.0 * ms / wall);
    format!(
        "per kernel: {}, {}, {}, {}; kernels {:.0}% of the {:.3} ms call; host: {}, {}",
        part("logits", k.logits_ms),
        part("softmax", k.softmax_ms),
        part("accumulate", k.accumulate_ms),
        part("finalize", k.finalize_ms),
        100.0 * k.kernels_ms() / wall,
        k.wall_ms,
        part("submits", k.submit_ms),
        part("waits and readbacks", k.wait_ms),
    )
}
