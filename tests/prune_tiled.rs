//! The pruned and sparse passes read rows from the index's tile-ordered f32 copy where it
//! fits in memory, else gather them from the stored order: the same bits either way, in
//! every pass the backend picks across t, on real and clustered data, f32 and f16, whole
//! dataset and one class.
//! Alone in its binary: it sets ORACLEFLOW_PRUNE_TILED, which the index reads when it
//! first needs the copy, and ORACLEFLOW_PRUNE_PROJECTED, which the backend reads per call.

mod common;

use common::{centred, path_queries};
use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
use oracleflow::oracle::{Backend, CentredBatch};
use oracleflow::Path;

#[test]
fn tile_ordered_copy_gives_the_same_bits_as_gathers() {
    let mut passes = std::collections::BTreeSet::new();
    // Late calls: the projected pass, then (with it off) the bounds pass.
    for (projected, (name, dtype)) in ["1", "0"].into_iter().flat_map(|p| {
        [
            ("fashion-mnist", Dtype::F32),
            ("fashion-mnist", Dtype::F16),
            ("clustered", Dtype::F16),
        ]
        .map(|d| (p, d))
    }) {
        std::env::set_var("ORACLEFLOW_PRUNE_PROJECTED", projected);
        let ds = match name {
            "clustered" => common::clustered_dataset(1200, dtype),
            _ => dataset::load("embedded@1500", dtype).unwrap(),
        };
        let path = Path::RectifiedFlow;
        std::env::remove_var("ORACLEFLOW_PRUNE_TILED");
        let mut copy = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        std::env::set_var("ORACLEFLOW_PRUNE_TILED", "0");
        let mut gathers = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        for (i, t) in [0.1f32, 0.35, 0.45, 0.5, 0.6, 0.8, 0.95, 0.999]
            .into_iter()
            .enumerate()
        {
            for class in [None, Some(3)] {
                let x = path_queries(&ds, path, t, 12, 300 + i as u64);
                let (xc, coefs) = centred(&ds, path, &x, t);
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: ds.rows_for(class).unwrap(),
                };
                let a = copy.posterior(&batch).unwrap();
                let b = gathers.posterior(&batch).unwrap();
                let what = format!("{name} {dtype:?} t={t} class={class:?}");
                assert_eq!(copy.last_pass(), gathers.last_pass(), "{what}");
                assert_eq!(a.mean, b.mean, "{what} ({:?})", copy.last_pass());
                assert_eq!(a.stats, b.stats, "{what} ({:?})", copy.last_pass());
                passes.insert(format!("{:?}", copy.last_pass()));
            }
        }
        std::env::remove_var("ORACLEFLOW_PRUNE_TILED");
    }
    eprintln!("passes seen: {passes:?}");
    for pass in ["Bounds", "Sparse", "Projected"] {
        assert!(passes.contains(pass), "no {pass} pass among {passes:?}");
    }
}
