//! The bounds pass (tile bounds, then per-sample screening in levels), which takes the
//! late calls the projected pass gives up. ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED=0 makes the
//! projected pass give up every call after its first tile (as it does where its bounds
//! are too loose): the bounds pass then runs from an estimated kept share of 1e-3 on, as
//! close to f64 as dense, and its certificate bounds the mass it truly left out. Alone in
//! its binary: it sets the variable, which the pass reads per call.

mod common;

use oracleflow::oracle::cpu::Pass;

#[test]
fn bounds_pass_certificate_bounds_the_true_skipped_mass() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED", "0");
    let datasets = common::pruning_datasets();
    let times = [0.4, 0.6, 0.8, 0.9, 0.99, 0.999];
    let passes = common::certificates_checked_on(&datasets, &times, Pass::Bounds, 4);
    assert!(!passes.contains(&Pass::Projected), "{passes:?}");
}

/// The bounds pass's posterior mean as close to the f64 reference as the dense pass's, on
/// random, clustered and real data, whole dataset and one class.
#[test]
fn bounds_pass_equals_dense_and_reference() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED", "0");
    let datasets = common::pruning_datasets();
    let times = [0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 0.999];
    common::pass_as_close_as_dense(&datasets, &times, Pass::Bounds, 60);
}
