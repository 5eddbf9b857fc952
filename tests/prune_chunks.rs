//! The sparse pass over many chunks of rows (as on datasets of millions of samples, where
//! one chunk's logits would exceed its memory bound): the same posterior as over one chunk
//! and as the f64 reference, the certificate still bounding what was left out.
//! Alone in its binary: it sets ORACLEFLOW_PRUNE_CHUNK_KIB, which the pass reads per call.

mod common;

use common::{centred, path_queries, rel_err};
use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions, Pass};
use oracleflow::oracle::{reference, Backend, CentredBatch};
use oracleflow::Path;

#[test]
fn many_chunks_equal_one_chunk_and_reference() {
    let ds = dataset::load("embedded@1500", Dtype::F32).unwrap();
    let dim = ds.dim();
    let path = Path::RectifiedFlow;
    let mut checked = 0;
    for (step, t) in [0.35f32, 0.4, 0.45, 0.5, 0.55].into_iter().enumerate() {
        let x = path_queries(&ds, path, t, 12, 70 + step as u64);
        let (xc, coefs) = centred(&ds, path, &x, t);
        let batch = CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: 0..ds.n_samples(),
        };
        let run = |kib: Option<&str>| {
            match kib {
                Some(k) => std::env::set_var("ORACLEFLOW_PRUNE_CHUNK_KIB", k),
                None => std::env::remove_var("ORACLEFLOW_PRUNE_CHUNK_KIB"),
            }
            let mut backend = CpuBackend::with_options(&ds, CpuOptions { prune: true });
            let p = backend.posterior(&batch).unwrap();
            (p, backend.last_pass())
        };
        let (one, pass_one) = run(None);
        // 12 queries x 256 rows x 4 bytes = 12 KiB: one chunk per 256 rows, 6 chunks.
        let (many, pass_many) = run(Some("12"));
        std::env::remove_var("ORACLEFLOW_PRUNE_CHUNK_KIB");
        assert_eq!(pass_one, pass_many, "t={t}");
        if !matches!(pass_one, Pass::Sparse | Pass::SparseScreened) {
            continue;
        }
        checked += 1;
        let want = reference::posterior_f64(&ds, &batch);
        for (q, w) in want.iter().enumerate() {
            let (a, b) = (
                &one.mean[q * dim..(q + 1) * dim],
                &many.mean[q * dim..(q + 1) * dim],
            );
            let (ea, eb) = (rel_err(a, &w.mean), rel_err(b, &w.mean));
            assert!(
                eb <= 1e-6 + 2.0 * ea.max(1e-7),
                "t={t} query {q}: many chunks {eb:.2e} from f64, one chunk {ea:.2e}"
            );
            if w.top1_weight > 0.6 {
                assert_eq!(many.stats[q].top1_index as usize, w.top1_index, "t={t}");
            }
            let cert = many.stats[q].skipped_mass_bound;
            assert!(cert <= 2f32.powi(-30), "t={t}: certificate {cert:e}");
        }
    }
    assert!(checked >= 2, "only {checked} times took the sparse pass");
}
