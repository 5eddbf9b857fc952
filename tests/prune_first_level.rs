//! The projected pass at its first level (16 coordinates), where it bounds each (query,
//! tile) pair first and takes the pairs' bounds only in the tiles some query may need:
//! ORACLEFLOW_PRUNE_PROJ_LEVEL=0 makes every call of the pass run so (on Fashion-MNIST it
//! does from an estimated kept share of 3.5e-4, t >= 0.76 or so). Its certificate bounds
//! the mass it truly left out, and its posterior mean is as close to the f64 reference as
//! the dense pass's. Alone in its binary: it sets the variable, which the pass reads per
//! call.

mod common;

use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::cpu::Pass;

fn datasets() -> Vec<(&'static str, oracleflow::Dataset)> {
    vec![
        ("random", common::gaussian_dataset(900, 100, 3, Dtype::F32)),
        ("clustered", common::clustered_dataset(1200, Dtype::F32)),
        (
            "fashion-mnist",
            dataset::load("embedded@1500", Dtype::F32).unwrap(),
        ),
    ]
}

#[test]
fn first_level_certificate_bounds_the_true_skipped_mass() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_LEVEL", "0");
    let times = [0.6, 0.7, 0.8, 0.9, 0.99, 0.999];
    let (checked, passes) = common::check_certificates(&datasets(), &times);
    assert!(checked >= 20, "only {checked} queries had skipped samples");
    let projected = passes.iter().filter(|&&p| p == Pass::Projected).count();
    eprintln!("{projected} calls took the projected pass");
    assert!(
        projected >= 4,
        "only {projected} calls took the projected pass"
    );
}

#[test]
fn first_level_equals_dense_and_reference() {
    std::env::set_var("ORACLEFLOW_PRUNE_PROJ_LEVEL", "0");
    let times = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999];
    let projected = common::pass_as_close_as_dense(&datasets(), &times, Pass::Projected, 80);
    eprintln!("{projected} calls took the projected pass");
    assert!(
        projected >= 4,
        "only {projected} calls took the projected pass"
    );
}
