//! The bounds pass (tile bounds, then per-sample screening in levels), which takes the
//! late calls the projected pass gives up. ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED=0 makes the
//! projected pass give up every call after its first tile (as it does where its bounds
//! are too loose): the bounds pass then runs from an estimated kept share of 1e-3 on, as
//! close to f64 as dense, and its certificate bounds the mass it truly left out. Alone in
//! its binary: it sets the variable, which the pass reads per call.

mod common;

use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::cpu::Pass;

#[test]
fn bounds_pass_certificate_bounds_the_true_skipped_mass() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED", "0");
    let datasets = vec![
        ("random", common::gaussian_dataset(900, 100, 3, Dtype::F32)),
        ("clustered", common::clustered_dataset(1200, Dtype::F32)),
        (
            "fashion-mnist",
            dataset::load("embedded@1500", Dtype::F32).unwrap(),
        ),
    ];
    let times = [0.4, 0.6, 0.8, 0.9, 0.99, 0.999];
    let (checked, passes) = common::check_certificates(&datasets, &times);
    assert!(checked >= 20, "only {checked} queries had skipped samples");
    let bounds = passes.iter().filter(|&&p| p == Pass::Bounds).count();
    eprintln!("{bounds} calls took the bounds pass");
    assert!(bounds >= 4, "only {bounds} calls took the bounds pass");
    assert!(!passes.contains(&Pass::Projected), "{passes:?}");
}

/// The bounds pass's posterior mean as close to the f64 reference as the dense pass's, on
/// random, clustered and real data, whole dataset and one class.
#[test]
fn bounds_pass_equals_dense_and_reference() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED", "0");
    let datasets = vec![
        ("random", common::gaussian_dataset(900, 100, 3, Dtype::F32)),
        ("clustered", common::clustered_dataset(1200, Dtype::F32)),
        (
            "fashion-mnist",
            dataset::load("embedded@1500", Dtype::F32).unwrap(),
        ),
    ];
    let times = [0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 0.999];
    let bounds = common::pass_as_close_as_dense(&datasets, &times, Pass::Bounds, 60);
    eprintln!("{bounds} calls took the bounds pass");
    assert!(bounds >= 4, "only {bounds} calls took the bounds pass");
}
