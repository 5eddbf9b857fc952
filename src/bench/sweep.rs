//! `bench --sweep`: time our dense CPU pass while N, D and B vary one at a time around a
//! base point, and fit log-log slopes of time against each (least squares on ln t vs ln x).
//! A slope of 1 is linear scaling; below 1 means fixed costs or thin GEMMs at the small
//! end (B below the GEMM's register block), above 1 means a cache level was outgrown.

use crate::dataset::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::Result;
use crate::oracle::cpu::tune::bench_values;
use crate::oracle::cpu::{CpuBackend, CpuOptions};
use crate::oracle::{Backend, CentredBatch};

/// Base point: N, D, B.
pub const BASE: (usize, usize, usize) = (16384, 512, 128);
/// Values each axis takes (the others stay at the base).
pub const N_VALUES: [usize; 4] = [4096, 8192, 16384, 32768];
pub const D_VALUES: [usize; 4] = [128, 256, 512, 1024];
pub const B_VALUES: [usize; 4] = [32, 64, 128, 256];

#[derive(Clone, Debug, serde::Serialize)]
pub struct Point {
    pub axis: &'static str,
    pub n_samples: usize,
    pub dim: usize,
    pub n_queries: usize,
    /// Median seconds per evaluation
    pub seconds: f64,
    /// 4 B N D / seconds
    pub gflops: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Slope {
    pub axis: &'static str,
    /// d ln(time) / d ln(axis), least squares over the axis's points
    pub slope: f64,
}

/// Least-squares slope of ln y against ln x.
pub fn loglog_slope(x: &[f64], y: &[f64]) -> f64 {
    let lx: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let n = lx.len() as f64;
    let (mx, my) = (lx.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
    let sxy: f64 = lx.iter().zip(&ly).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = lx.iter().map(|a| (a - mx) * (a - mx)).sum();
    sxy / sxx
}

fn time_point(axis: &'static str, n: usize, d: usize, b: usize, reps: usize) -> Result<Point> {
    let seed = 0x2545_f491 ^ (n * 31 + d * 7 + b) as u64;
    let values = bench_values(n * d, seed);
    let ds = Dataset::from_raw(
        "sweep",
        SampleShape::array(vec![d]),
        RawRows::F32(&values),
        None,
        Dtype::F32,
    )?;
    drop(values);
    let x = bench_values(b * d, seed + 1);
    let coefs = vec![[2.0f32, 0.5f32]; b];
    let mut be = CpuBackend::with_options(&ds, CpuOptions { prune: false });
    let batch = CentredBatch {
        x: &x,
        logit_coefs: &coefs,
        rows: 0..n,
    };
    let seconds = super::median_seconds(reps, || be.posterior(&batch).map(|_| ()))?;
    Ok(Point {
        axis,
        n_samples: n,
        dim: d,
        n_queries: b,
        seconds,
        gflops: 4.0 * (b * n * d) as f64 / seconds / 1e9,
    })
}

/// Every point of the sweep and the three fitted slopes; `tick` after each point.
pub fn sweep(reps: usize, mut tick: impl FnMut()) -> Result<(Vec<Point>, Vec<Slope>)> {
    let (n0, d0, b0) = BASE;
    let mut points = Vec::new();
    let mut slopes = Vec::new();
    for (axis, values) in [("N", N_VALUES), ("D", D_VALUES), ("B", B_VALUES)] {
        let mut xs = Vec::new();
        let mut ts = Vec::new();
        for v in values {
            let (n, d, b) = match axis {
                "N" => (v, d0, b0),
                "D" => (n0, v, b0),
                _ => (n0, d0, v),
            };
            let p = time_point(axis, n, d, b, reps)?;
            xs.push(v as f64);
            ts.push(p.seconds);
            points.push(p);
            tick();
        }
        slopes.push(Slope {
            axis,
            slope: loglog_slope(&xs, &ts),
        });
    }
    Ok((points, slopes))
}

/// The sweep as text.
pub fn table(points: &[Point], slopes: &[Slope]) -> String {
    let mut s = format!(
        "{:<5} {:>7} {:>6} {:>6} {:>10} {:>9}\n",
        "axis", "N", "D", "B", "s/eval", "GFLOP/s"
    );
    for p in points {
        s += &format!(
            "{:<5} {:>7} {:>6} {:>6} {:>10.4} {:>9.1}\n",
            p.axis, p.n_samples, p.dim, p.n_queries, p.seconds, p.gflops
        );
    }
    let fitted: Vec<String> = slopes
        .iter()
        .map(|s| format!("{} {:.2}", s.axis, s.slope))
        .collect();
    s += &format!(
        "log-log slopes of time (1 = linear): {}\n",
        fitted.join(", ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_power_law_is_its_exponent() {
        let x = [1.0, 2.0, 4.0, 8.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 3.0 * v.powf(1.5)).collect();
        assert!((loglog_slope(&x, &y) - 1.5).abs() < 1e-12);
    }
}
