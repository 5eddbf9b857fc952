//! Every GEMM variant of the CPU dense pass (library x tile rows, as the autotune may
//! choose) against the f64 reference, on the backend_suite's cases: sizes that are no
//! multiple of any tile, D not a multiple of 4, row ranges (classes are row ranges of the
//! class-sorted set) starting and ending inside tiles, f16 storage. And the subnormal
//! flush: weights below the f32 normal range never reach a GEMM, results unchanged.
//! Tolerances: `tests/common/backend.rs` (1e-4 relative on the mean).

mod common;

use common::backend::*;
use oracleflow::dataset::{RawRows, SampleShape};
use oracleflow::oracle::cpu::{flush_subnormal_weights, CpuBackend, CpuOptions, GemmPlan};
use oracleflow::oracle::{Backend, CentredBatch};
use oracleflow::{Dataset, Dtype};

/// Every library here with the autotune's tiles and an odd small one (tile edges).
fn plans() -> Vec<GemmPlan> {
    let mut plans = GemmPlan::candidates();
    for lib in oracleflow::oracle::cpu::GemmLib::available_here() {
        plans.push(GemmPlan { lib, tile_rows: 37 });
    }
    plans
}

fn dense<'d>(ds: &'d Dataset, plan: GemmPlan) -> CpuBackend<'d> {
    let mut be = CpuBackend::with_options(ds, CpuOptions { prune: false });
    be.set_gemm_plan(plan);
    be
}

#[test]
fn every_variant_matches_the_f64_reference() {
    let cases: Vec<(Dataset, usize, std::ops::Range<usize>)> = vec![
        (unit_gaussian_dataset(1, 1, Dtype::F32, 0), 1, 0..1),
        (unit_gaussian_dataset(7, 3, Dtype::F32, 1), 5, 0..7),
        (unit_gaussian_dataset(1300, 67, Dtype::F32, 2), 33, 0..1300),
        (unit_gaussian_dataset(1000, 784, Dtype::F32, 3), 9, 0..1000),
        (unit_gaussian_dataset(2517, 5, Dtype::F32, 4), 70, 0..2517),
        (unit_gaussian_dataset(1100, 21, Dtype::F32, 5), 6, 37..1061),
        (unit_gaussian_dataset(700, 21, Dtype::F32, 6), 3, 255..257),
        (unit_gaussian_dataset(1400, 30, Dtype::F16, 7), 17, 3..1397),
    ];
    for plan in plans() {
        for (k, (ds, b, rows)) in cases.iter().enumerate() {
            let mut be = dense(ds, plan);
            let what = format!(
                "{plan}: N={} D={} B={b} rows {rows:?} {:?}",
                ds.n_samples(),
                ds.dim(),
                ds.dtype()
            );
            run_case(&mut be, ds, *b, rows.clone(), 50 + k as u64, &what);
        }
    }
}

#[test]
fn variants_agree_with_each_other_bitwise_across_batch_splits() {
    // Row blocks depend on the rows and threads only: a query's result does not depend on
    // the batch it arrives in (sampling relies on it) for every plan the autotune may
    // choose; OpenBLAS is not (its small-matrix kernels change with the batch).
    let mut bad = Vec::new();
    for d in [40, 300] {
        let ds = unit_gaussian_dataset(3000, d, Dtype::F32, 9);
        // 600 queries: two query groups on 2 threads (groups hold at least 256).
        let (x, coefs) = centred_queries(&ds, 600, 0..3000, 11);
        for plan in plans().into_iter().filter(|p| p.batch_invariant()) {
            let mut be = dense(&ds, plan);
            let whole = be
                .posterior(&CentredBatch {
                    x: &x,
                    logit_coefs: &coefs,
                    rows: 0..3000,
                })
                .unwrap();
            for from in [140, 300, 599] {
                let part = be
                    .posterior(&CentredBatch {
                        x: &x[from * d..],
                        logit_coefs: &coefs[from..],
                        rows: 0..3000,
                    })
                    .unwrap();
                if whole.mean[from * d..] != part.mean[..] {
                    bad.push(format!("{plan} D={d} from {from}"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "not bitwise across batch splits: {bad:?}");
}

#[test]
fn flush_zeroes_exactly_the_subnormal_weights() {
    let sub = f32::MIN_POSITIVE / 4.0;
    let mut w = [
        1.0,
        sub,
        f32::MIN_POSITIVE,
        0.0,
        f32::from_bits(1),
        0.5,
        1e-37,
    ];
    flush_subnormal_weights(&mut w);
    assert_eq!(w, [1.0, 0.0, f32::MIN_POSITIVE, 0.0, 0.0, 0.5, 1e-37]);
}

/// A set whose weights for the queries below span the f32 subnormal range: rows r_j e_k
/// with r_j^2 from 0 to 150 (signs and coordinates alternating), queried at x = 0 with
/// c_dot = 0, c_norm = 1, so logit_j = -|y_j|^2 and weight_j = e^(min|y|^2 - |y_j|^2):
/// e^-87.3 is the smallest normal f32, e^-103.3 the smallest subnormal.
fn subnormal_set(d: usize) -> (Dataset, Vec<f32>, Vec<[f32; 2]>) {
    let n = 1500;
    let mut vals = vec![0.0f32; n * d];
    for j in 0..n {
        let r = (150.0 * j as f32 / (n - 1) as f32).sqrt();
        vals[j * d + j % d] = if j % 2 == 0 { r } else { -r };
    }
    let ds = Dataset::from_raw(
        "subnormal",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        None,
        Dtype::F32,
    )
    .unwrap();
    let b = 3;
    (ds, vec![0.0; b * d], vec![[0.0, 1.0]; b])
}

#[test]
fn subnormal_weights_are_flushed_and_results_unchanged() {
    let d = 16;
    let (ds, x, coefs) = subnormal_set(d);
    let n = ds.n_samples();
    // The logits the pass sees are c_dot <x, y> - c_norm |y|^2 = -|y|^2 (stored, centred).
    let norms = ds.sq_norms();
    let least = norms.iter().copied().fold(f32::INFINITY, f32::min);
    let subnormal = norms
        .iter()
        .filter(|&&s| {
            let w = (least - s).exp();
            w > 0.0 && w < f32::MIN_POSITIVE
        })
        .count();
    assert!(
        subnormal >= 100,
        "the set must produce subnormal weights: {subnormal}"
    );
    for plan in plans() {
        let mut be = dense(&ds, plan);
        run_case_with(
            &mut be,
            &ds,
            &x,
            &coefs,
            0..n,
            &format!("subnormal, {plan}"),
        );
    }
}

fn run_case_with(
    be: &mut CpuBackend<'_>,
    ds: &Dataset,
    x: &[f32],
    coefs: &[[f32; 2]],
    rows: std::ops::Range<usize>,
    what: &str,
) {
    let got = be
        .posterior(&CentredBatch {
            x,
            logit_coefs: coefs,
            rows: rows.clone(),
        })
        .unwrap();
    check_posterior(ds, x, coefs, rows, &got, what);
}
