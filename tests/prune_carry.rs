//! The sparse pass screened by the previous call's logits (opt-in, ORACLEFLOW_PRUNE_CARRY=1):
//! as close to the f64 reference as the dense pass, with a certificate that bounds what it
//! left out. Alone in its binary: it sets the variable, which the pass reads per call.

mod common;

use common::{centred, left_out_mass, path_queries};
use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
use oracleflow::oracle::{reference, Backend, CentredBatch};
use oracleflow::Path;

/// The sparse pass screened by the previous call's logits: a second call on states moved a
/// little (as Heun's second evaluation of a step) takes it, and agrees with the f64
/// reference as closely as the dense pass, with a certificate that bounds what it left out.
#[test]
fn carried_screening_equals_reference() {
    use oracleflow::oracle::cpu::Pass;
    // Opt-in (see `prune::sparse::Carry`): alone in this binary, so no other test sees it.
    std::env::set_var("ORACLEFLOW_PRUNE_CARRY", "1");
    let ds = dataset::load("embedded@1500", Dtype::F32).unwrap();
    let dim = ds.dim();
    let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
    let path = Path::RectifiedFlow;
    let mut carried = 0;
    for (step, t) in [0.3f32, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
        .into_iter()
        .enumerate()
    {
        let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        pruned.record_kept_rows(true);
        let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
        let x = path_queries(&ds, path, t, 12, 90 + step as u64);
        // A small move, different per query and coordinate.
        let moved: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| v + 0.002 * (((i * 7919) % 13) as f32 - 6.0) / 6.0)
            .collect();
        for (call, xs) in [&x, &moved].into_iter().enumerate() {
            let (xc, coefs) = centred(&ds, path, xs, t);
            let batch = CentredBatch {
                x: &xc,
                logit_coefs: &coefs,
                rows: 0..ds.n_samples(),
            };
            let p = pruned.posterior(&batch).unwrap();
            if call == 0 || pruned.last_pass() != Pass::SparseCarried {
                continue;
            }
            carried += 1;
            let d = dense.posterior(&batch).unwrap();
            let want = reference::posterior_f64(&ds, &batch);
            for (q, w) in want.iter().enumerate() {
                let (got, den) = (
                    &p.mean[q * dim..(q + 1) * dim],
                    &d.mean[q * dim..(q + 1) * dim],
                );
                let what = format!("t={t} query {q}");
                common::assert_as_close_as_dense(got, den, &w.mean, 0.0, &what);
                assert_eq!(p.stats[q].top1_index as usize, w.top1_index, "t={t}");
                let cert = p.stats[q].skipped_mass_bound as f64;
                assert!(cert <= 2f64.powi(-30), "t={t}: certificate {cert:e}");
                let xq = &xs[q * dim..(q + 1) * dim];
                let kept = &pruned.kept_rows()[q];
                let left = left_out_mass(&samples, 0..ds.n_samples(), kept, path, t, xq);
                assert!(
                    left <= cert * (1.0 + 1e-3),
                    "t={t} query {q}: left out {left:e} > certificate {cert:e}"
                );
            }
        }
    }
    eprintln!("{carried} calls screened by the previous call's logits");
    assert!(carried >= 3, "only {carried} calls used the carried logits");
}
