//! The projected pass at its first level (16 coordinates), where it bounds each (query,
//! tile) pair first and takes the pairs' bounds only in the tiles some query may need:
//! ORACLEFLOW_PRUNE_PROJ_LEVEL=0 makes every call of the pass run so (on Fashion-MNIST it
//! does from an estimated kept share of 3.5e-4, t >= 0.76 or so). Its certificate bounds
//! the mass it truly left out, and its posterior mean is as close to the f64 reference as
//! the dense pass's. Alone in its binary: it sets the variable, which the pass reads per
//! call.

mod common;

use oracleflow::oracle::cpu::Pass;

#[test]
fn first_level_certificate_bounds_the_true_skipped_mass() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_LEVEL", "0");
    let times = [0.6, 0.7, 0.8, 0.9, 0.99, 0.999];
    common::certificates_checked_on(&common::pruning_datasets(), &times, Pass::Projected, 4);
}

#[test]
fn first_level_equals_dense_and_reference() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_LEVEL", "0");
    let times = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999];
    common::pass_as_close_as_dense(&common::pruning_datasets(), &times, Pass::Projected, 80);
}
