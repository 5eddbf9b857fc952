//! Helpers shared by the integration tests: seeded data, queries on the path, errors.
#![allow(dead_code)]

pub mod backend;

use oracleflow::dataset::{Dataset, Dtype, RawRows, SampleShape};
use oracleflow::oracle::BackendKind;
use oracleflow::Path;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// N x D unit Gaussians plus `offset` (an offset exercises the centring), with labels i % 3.
pub fn gaussian_dataset(n: usize, d: usize, seed: u64, dtype: Dtype) -> Dataset {
    let mut r = rng(seed);
    let vals: Vec<f32> = normal(&mut r, n * d).iter().map(|v| v + 0.5).collect();
    let labels = (0..n as u32).map(|i| i % 3).collect();
    Dataset::from_raw(
        format!("gaussian {n}x{d}"),
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        Some(labels),
        dtype,
    )
    .unwrap()
}

/// B queries on the path at time t: x_t = alpha y + sigma x0 for random samples y
/// (what a sampler sees), except every fourth query is pure noise scaled by 2.
pub fn path_queries(ds: &Dataset, path: Path, t: f32, b: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let c = path.coefs(t as f64);
    let d = ds.dim();
    let mut x = Vec::with_capacity(b * d);
    for q in 0..b {
        let noise = normal(&mut r, d);
        if q % 4 == 3 {
            x.extend(noise.iter().map(|v| 2.0 * v));
        } else {
            let y = ds.sample_f64(r.random_range(0..ds.n_samples()));
            x.extend(
                y.iter()
                    .zip(&noise)
                    .map(|(y, n)| (c.alpha * y + c.sigma * *n as f64) as f32),
            );
        }
    }
    x
}

/// ||a - b|| / ||b||, with b the f64 truth.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// True when GPU tests were explicitly switched off. Otherwise a missing adapter fails.
pub fn skip_gpu() -> bool {
    std::env::var("ORACLEFLOW_SKIP_GPU").is_ok_and(|v| v == "1")
}

/// Whether a test for `kind` should run (prints why not).
pub fn enabled(kind: BackendKind) -> bool {
    if kind == BackendKind::Gpu && skip_gpu() {
        eprintln!("ORACLEFLOW_SKIP_GPU=1: skipping GPU test");
        return false;
    }
    true
}
