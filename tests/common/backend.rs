//! The backend-level problem (`Backend::posterior` over a `CentredBatch`): seeded data,
//! queries on the path in centred coordinates, and the check against the one f64
//! reference of that problem (`oracle::reference::posterior_f64`).
//!
//! Tolerances: a backend computes logits, weights and weighted sums in f32, so the
//! posterior mean carries f32 rounding of the logits (~1e-7 relative, times the logit
//! scale) and of the sums; 1e-4 relative on the mean leaves room for that and catches
//! any indexing, masking or rescaling bug, which all give errors of order 1.
#![allow(dead_code)]

use std::ops::Range;

use oracleflow::dataset::{RawRows, SampleShape};
use oracleflow::oracle::{reference, Backend, CentredBatch, Posterior};
use oracleflow::{Dataset, Dtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub const MEAN_TOL: f64 = 1e-4;
/// Statistics are ratios of f32 sums (1/l, ln l - t/l, l^2/q).
pub const STATS_TOL: f64 = 1e-3;

pub fn unit_gaussian_dataset(n: usize, d: usize, dtype: Dtype, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vals: Vec<f32> = (0..n * d).map(|_| rng.sample(StandardNormal)).collect();
    Dataset::from_raw(
        "gaussian",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        None,
        dtype,
    )
    .unwrap()
}

pub fn stored(ds: &Dataset, row: usize) -> Vec<f32> {
    let mut out = vec![0.0; ds.dim()];
    ds.stored_row(row, &mut out);
    out
}

/// Queries on the rectified-flow path near rows of `rows`: x = t y + (1 - t) z with t in
/// [0.05, 0.9], and their logit coefficients c_dot = t/(1-t)^2, c_norm = t^2/(2(1-t)^2).
pub fn centred_queries(
    ds: &Dataset,
    n_queries: usize,
    rows: Range<usize>,
    seed: u64,
) -> (Vec<f32>, Vec<[f32; 2]>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = ds.dim();
    let mut x = Vec::with_capacity(n_queries * d);
    let mut coefs = Vec::with_capacity(n_queries);
    for _ in 0..n_queries {
        let t: f64 = rng.random_range(0.05..0.9);
        let y = stored(ds, rng.random_range(rows.clone()));
        for v in y {
            let z: f64 = rng.sample(StandardNormal);
            x.push((t * v as f64 + (1.0 - t) * z) as f32);
        }
        let s2 = (1.0 - t) * (1.0 - t);
        coefs.push([(t / s2) as f32, (t * t / (2.0 * s2)) as f32]);
    }
    (x, coefs)
}

/// Largest relative error of the mean over the batch; asserts everything else.
pub fn check_posterior(
    ds: &Dataset,
    x: &[f32],
    coefs: &[[f32; 2]],
    rows: Range<usize>,
    got: &Posterior,
    what: &str,
) -> f64 {
    let d = ds.dim();
    assert_eq!(got.mean.len(), coefs.len() * d, "{what}: mean size");
    assert_eq!(got.stats.len(), coefs.len(), "{what}: stats count");
    let want = reference::posterior_f64(
        ds,
        &CentredBatch {
            x,
            logit_coefs: coefs,
            rows,
        },
    );
    let mut worst = 0.0f64;
    for (q, r) in want.iter().enumerate() {
        let mean = &got.mean[q * d..(q + 1) * d];
        let err: f64 = mean
            .iter()
            .zip(&r.mean)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = r.mean.iter().map(|b| b * b).sum::<f64>().sqrt();
        // A single centred row is all zeros: then the mean must be exactly zero too.
        let rel = if norm > 0.0 { err / norm } else { err };
        assert!(
            rel <= MEAN_TOL,
            "{what}: query {q}: relative error of the mean {rel:e} (|ref| = {norm})"
        );
        worst = worst.max(rel);
        let s = got.stats[q];
        assert_eq!(
            s.top1_index as usize, r.top1_index,
            "{what}: query {q}: top-1 row"
        );
        for (name, a, b) in [
            ("top-1 weight", s.top1_weight as f64, r.top1_weight),
            ("ESS", s.ess as f64, r.ess),
        ] {
            assert!(
                (a - b).abs() <= STATS_TOL * b.abs(),
                "{what}: query {q}: {name} {a} vs {b}"
            );
        }
        // Entropy is near 0 for a one-hot posterior: absolute tolerance there.
        assert!(
            (s.entropy as f64 - r.entropy).abs() <= STATS_TOL * r.entropy.max(1.0),
            "{what}: query {q}: entropy {} vs {}",
            s.entropy,
            r.entropy
        );
    }
    eprintln!("{what}: max relative error of the mean {worst:.2e}");
    worst
}

pub fn run_case(
    backend: &mut dyn Backend,
    ds: &Dataset,
    n_queries: usize,
    rows: Range<usize>,
    seed: u64,
    what: &str,
) -> f64 {
    let (x, coefs) = centred_queries(ds, n_queries, rows.clone(), seed);
    let got = backend
        .posterior(&CentredBatch {
            x: &x,
            logit_coefs: &coefs,
            rows: rows.clone(),
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check_posterior(ds, &x, &coefs, rows, &got, what)
}
