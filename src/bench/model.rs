//! The cost model of the exact oracle (`bench --model`): FLOPs and bytes per evaluation
//! and per 50-step trajectory, and projected times on stated hardware. Every projected
//! time is an ESTIMATE from the counts below and peak numbers, not a measurement.
//!
//! Counts, per evaluation of B queries against N samples of D values (s bytes each):
//! * FLOPs = 4 B N D (logits X Y^T and weighted sum P Y, 2 B N D each) + 10 B N (logit
//!   affine map, running max, exp, sums: about 10 operations per logit, counted as one
//!   FLOP each; negligible once D >> 10).
//! * Bytes = N D s (the dataset read once) + 4 N (squared norms) + 8 B D (queries in,
//!   velocities out) — the ideal, one pass over the data. Arithmetic intensity is then
//!   about 4 B / s FLOP per byte (256 at B = 256, f32): compute-bound on every device
//!   listed unless B is tiny. Today's GPU kernels read the data once per 64-query block,
//!   i.e. ceil(B / 64) times, which is still compute-bound at these B.
//! * Trajectory of 50 steps on [0, 1]: Euler 50 evaluations; Heun 2 per step except the
//!   last (t = 1 returns the posterior mean directly), 2 * 49 + 1 = 99.
//!
//! Projection: time = max(FLOPs / (peak * efficiency), bytes / bandwidth), with efficiency
//! 1 (the roofline bound) and an assumed efficiency for today's kernels.

use crate::dataset::Dtype;

/// Steps of the trajectory the model prices.
pub const STEPS: usize = 50;

/// A device's stated peak numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Device {
    pub name: &'static str,
    /// FP32 (non-tensor-core) peak, FLOP/s
    pub peak_flops: f64,
    /// Memory bandwidth, bytes/s
    pub bandwidth: f64,
    pub source: &'static str,
}

/// Stated peaks (vendor numbers; boost clocks, dense FP32, no tensor cores: the oracle's
/// accumulation is f32 and our kernels use no matrix units).
pub fn devices() -> Vec<Device> {
    vec![
        Device {
            name: "H100 SXM",
            peak_flops: 67e12,
            bandwidth: 3.35e12,
            source: "NVIDIA H100 Tensor Core GPU datasheet: FP32 67 TFLOP/s, HBM3 3.35 TB/s",
        },
        Device {
            name: "RTX 4090",
            peak_flops: 82.6e12,
            bandwidth: 1.008e12,
            source: "NVIDIA Ada Lovelace architecture whitepaper: FP32 82.6 TFLOP/s, GDDR6X 1008 GB/s",
        },
        Device {
            name: "Apple M2",
            peak_flops: 3.6e12,
            bandwidth: 100e9,
            source: "Apple M2 announcement (June 2022): 10-core GPU 3.6 TFLOP/s, 100 GB/s unified memory",
        },
    ]
}

/// Efficiency assumed for today's WGSL kernels on real GPUs: issue 12's read-through
/// estimates 28-38% of FP32 peak (64x64 tiles, 4x4 per thread, no double buffering).
pub const GPU_KERNEL_EFFICIENCY: f64 = 0.33;

/// Interconnect assumed for eight H100s under MPI: wgpu has no GPU-direct MPI, so each
/// rank's partial state is copied to the host (PCIe Gen5 x16, ~50 GB/s effective) and
/// back, and a ring allreduce runs over 400 Gb/s InfiniBand NDR (~50 GB/s, ~2 us per
/// message) — the worst case of one rank per node; NVLink within one node is faster.
pub const MPI_RANKS: usize = 8;
pub const LINK_BYTES_PER_S: f64 = 50e9;
pub const LINK_LATENCY_S: f64 = 2e-6;
pub const PCIE_BYTES_PER_S: f64 = 50e9;

/// The problem being priced.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Problem {
    pub n_samples: usize,
    pub dim: usize,
    pub n_queries: usize,
    pub dtype: Dtype,
}

impl Problem {
    pub fn flops(&self) -> f64 {
        let (n, d, b) = (
            self.n_samples as f64,
            self.dim as f64,
            self.n_queries as f64,
        );
        4.0 * b * n * d + 10.0 * b * n
    }

    pub fn bytes(&self) -> f64 {
        let (n, d, b) = (
            self.n_samples as f64,
            self.dim as f64,
            self.n_queries as f64,
        );
        n * d * self.dtype.bytes() as f64 + 4.0 * n + 8.0 * b * d
    }

    /// Bytes of one rank's partial state (max, normaliser, weighted sum, per query), f32.
    pub fn state_bytes(&self) -> f64 {
        4.0 * self.n_queries as f64 * (self.dim as f64 + 2.0)
    }
}

/// Evaluations in a trajectory of `STEPS` steps.
pub fn evaluations(solver: crate::sample::Solver) -> usize {
    let per = solver.evaluations_per_step();
    per * (STEPS - 1) + 1
}

/// One projected time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Projection {
    pub target: String,
    /// Seconds per evaluation (estimate)
    pub seconds_per_eval: f64,
    pub seconds_euler: f64,
    pub seconds_heun: f64,
    /// Whether compute or memory bounds it
    pub bound: &'static str,
    pub assumptions: String,
}

fn projection(
    p: &Problem,
    target: String,
    flops_per_s: f64,
    bytes_per_s: f64,
    extra_s: f64,
    assumptions: String,
) -> Projection {
    let compute = p.flops() / flops_per_s;
    let memory = p.bytes() / bytes_per_s;
    let per = compute.max(memory) + extra_s;
    let e = evaluations(crate::sample::Solver::Euler) as f64;
    let h = evaluations(crate::sample::Solver::Heun) as f64;
    Projection {
        target,
        seconds_per_eval: per,
        seconds_euler: per * e,
        seconds_heun: per * h,
        bound: if compute >= memory {
            "compute"
        } else {
            "memory"
        },
        assumptions,
    }
}

/// What was measured on this machine for the CPU projection.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuRates {
    pub cpu_model: String,
    pub threads: usize,
    /// Our dense pass, 4 B N D / s, on the short measurement
    pub oracle_gflops: f64,
    /// The best plain sgemm of the same run, 2 B N D / s
    pub sgemm_gflops: f64,
    /// A plain read of a large buffer, bytes/s
    pub memory_bytes_per_s: f64,
    pub what: String,
}

/// Projections for `p`: each device at its roofline and at today's kernel efficiency,
/// eight H100s under MPI, and this CPU from measured rates.
pub fn project(p: &Problem, cpu: &CpuRates) -> Vec<Projection> {
    let mut out = Vec::new();
    for d in devices() {
        out.push(projection(
            p,
            format!("{} roofline", d.name),
            d.peak_flops,
            d.bandwidth,
            0.0,
            format!("100% of stated peak; {}", d.source),
        ));
        out.push(projection(
            p,
            format!("{} today's kernels", d.name),
            d.peak_flops * GPU_KERNEL_EFFICIENCY,
            d.bandwidth,
            0.0,
            format!(
                "{:.0}% of FP32 peak (issue 12's read-through of the WGSL kernels)",
                100.0 * GPU_KERNEL_EFFICIENCY
            ),
        ));
    }
    let h100 = &devices()[0];
    let r = MPI_RANKS as f64;
    let shard = Problem {
        n_samples: p.n_samples.div_ceil(MPI_RANKS),
        ..*p
    };
    let state = p.state_bytes();
    let allreduce = 2.0 * (r - 1.0) / r * state / LINK_BYTES_PER_S
        + 2.0 * (r - 1.0) * LINK_LATENCY_S
        + 2.0 * state / PCIE_BYTES_PER_S;
    for (label, eff) in [
        ("roofline", 1.0),
        ("today's kernels", GPU_KERNEL_EFFICIENCY),
    ] {
        out.push(projection(
            &shard,
            format!("8x H100 MPI {label}"),
            h100.peak_flops * eff,
            h100.bandwidth,
            allreduce,
            format!(
                "N/8 rows per rank at {:.0}% of peak, plus a ring allreduce of B(D+2) f32 = \
                 {:.2} MB per evaluation ({:.3} ms): host-staged over PCIe Gen5 (50 GB/s) and \
                 InfiniBand NDR 400 Gb/s (50 GB/s, 2 us latency)",
                100.0 * eff,
                state / 1e6,
                allreduce * 1e3
            ),
        ));
    }
    out.push(projection(
        p,
        format!("this CPU ({} threads)", cpu.threads),
        cpu.oracle_gflops * 1e9,
        cpu.memory_bytes_per_s,
        0.0,
        format!(
            "measured here: our dense pass {:.1} GFLOP/s, memory read {:.1} GB/s ({}); a set \
             larger than RAM is read from disk instead (slower)",
            cpu.oracle_gflops,
            cpu.memory_bytes_per_s / 1e9,
            cpu.what
        ),
    ));
    out
}

/// Human-readable seconds.
pub fn human(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.2} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// The cost model and projections as text.
pub fn report(p: &Problem, cpu: &CpuRates, projections: &[Projection]) -> String {
    let e = evaluations(crate::sample::Solver::Euler) as f64;
    let h = evaluations(crate::sample::Solver::Heun) as f64;
    let mut s = format!(
        "cost model: N = {}, D = {}, B = {}, {:?} storage (compute in f32)\n",
        p.n_samples, p.dim, p.n_queries, p.dtype
    );
    s += &format!(
        "  per evaluation: {:.3e} FLOP (4 B N D + 10 B N), {:.3e} bytes (N D s + 4 N + 8 B D), \
         {:.0} FLOP/byte\n",
        p.flops(),
        p.bytes(),
        p.flops() / p.bytes()
    );
    s += &format!(
        "  per {STEPS}-step trajectory of B queries: Euler {e:.0} evaluations = {:.3e} FLOP, \
         {:.3e} bytes; Heun {h:.0} evaluations = {:.3e} FLOP, {:.3e} bytes\n",
        p.flops() * e,
        p.bytes() * e,
        p.flops() * h,
        p.bytes() * h
    );
    s += &format!(
        "  measured here ({}, {} threads): our dense pass {:.1} GFLOP/s, best sgemm {:.1} \
         GFLOP/s, memory read {:.1} GB/s\n",
        cpu.cpu_model,
        cpu.threads,
        cpu.oracle_gflops,
        cpu.sgemm_gflops,
        cpu.memory_bytes_per_s / 1e9
    );
    s += "projected times (ESTIMATES from the counts above and stated peaks, not measurements):\n";
    s += &format!(
        "  {:<28} {:>11} {:>13} {:>13}  {:<7}  assumptions\n",
        "target", "per eval", "Euler 50", "Heun 50", "bound"
    );
    for pr in projections {
        s += &format!(
            "  {:<28} {:>11} {:>13} {:>13}  {:<7}  {}\n",
            pr.target,
            human(pr.seconds_per_eval),
            human(pr.seconds_euler),
            human(pr.seconds_heun),
            pr.bound,
            pr.assumptions
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_projection_follow_the_formulas() {
        let p = Problem {
            n_samples: 1_280_000,
            dim: 4096,
            n_queries: 256,
            dtype: Dtype::F16,
        };
        let f = 4.0 * 256.0 * 1.28e6 * 4096.0 + 10.0 * 256.0 * 1.28e6;
        assert_eq!(p.flops(), f);
        assert_eq!(
            p.bytes(),
            1.28e6 * 4096.0 * 2.0 + 4.0 * 1.28e6 + 8.0 * 256.0 * 4096.0
        );
        assert_eq!(evaluations(crate::sample::Solver::Euler), 50);
        assert_eq!(evaluations(crate::sample::Solver::Heun), 99);
        let cpu = CpuRates {
            cpu_model: "x".into(),
            threads: 2,
            oracle_gflops: 100.0,
            sgemm_gflops: 100.0,
            memory_bytes_per_s: 10e9,
            what: String::new(),
        };
        let pr = project(&p, &cpu);
        let h100 = pr.iter().find(|x| x.target == "H100 SXM roofline").unwrap();
        assert!((h100.seconds_per_eval - f / 67e12).abs() < 1e-12);
        assert_eq!(h100.bound, "compute");
        let cpu_row = pr.last().unwrap();
        assert!((cpu_row.seconds_per_eval - f / 100e9).abs() / (f / 100e9) < 1e-12);
        // Eight ranks: an eighth of the work plus the allreduce, so between 1/8 and 1/7.
        let eight = pr
            .iter()
            .find(|x| x.target == "8x H100 MPI roofline")
            .unwrap();
        let ratio = eight.seconds_per_eval / h100.seconds_per_eval;
        assert!(ratio > 0.125 && ratio < 0.14, "{ratio}");
    }
}
