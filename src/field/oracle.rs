//! The exact oracle as a velocity field.

use super::{check_request, FieldEval, VelocityField};
use crate::error::Result;
use crate::oracle::{Oracle, Query, QueryStats, Times};

/// The oracle over a dataset; states of different classes go to the oracle in one call
/// per class, so each call streams only that class's rows.
pub struct OracleField<'d> {
    oracle: Oracle<'d>,
    evaluations: usize,
}

impl<'d> OracleField<'d> {
    pub fn new(oracle: Oracle<'d>) -> Self {
        OracleField {
            oracle,
            evaluations: 0,
        }
    }

    pub fn oracle(&self) -> &Oracle<'d> {
        &self.oracle
    }

    pub fn oracle_mut(&mut self) -> &mut Oracle<'d> {
        &mut self.oracle
    }

    pub fn into_oracle(self) -> Oracle<'d> {
        self.oracle
    }
}

impl VelocityField for OracleField<'_> {
    fn dim(&self) -> usize {
        self.oracle.dataset().dim()
    }

    fn describe(&self) -> String {
        format!("oracle: {}", self.oracle.describe())
    }

    fn accepts_classes(&self) -> bool {
        self.oracle.dataset().labels().is_some()
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        self.evaluations += super::class_groups(classes).len();
        evaluate_oracle(&mut self.oracle, x, t, classes)
    }

    fn evaluations(&self) -> usize {
        self.evaluations
    }

    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        Some(self.oracle.kind())
    }
}

/// The oracle as a field: one oracle call per class present (states grouped by class).
pub fn evaluate_oracle(
    oracle: &mut Oracle<'_>,
    x: &[f64],
    t: &[f64],
    classes: &[Option<u32>],
) -> Result<FieldEval> {
    let dim = oracle.dataset().dim();
    let n = check_request(dim, x, t, classes)?;
    let mut out = FieldEval {
        velocity: vec![0.0; x.len()],
        x1_hat: vec![0.0; x.len()],
        stats: Some(vec![QueryStats::default(); n]),
    };
    for (class, members) in super::class_groups(classes) {
        let xs: Vec<f32> = members
            .iter()
            .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().map(|&v| v as f32))
            .collect();
        let ts: Vec<f32> = members.iter().map(|&i| t[i] as f32).collect();
        let eval = oracle.evaluate(&Query {
            x: &xs,
            t: Times::PerQuery(&ts),
            class,
        })?;
        let stats = out.stats.as_mut().expect("oracle stats");
        for (k, &i) in members.iter().enumerate() {
            let (src, dst) = (k * dim..(k + 1) * dim, i * dim..(i + 1) * dim);
            for (o, &v) in out.velocity[dst.clone()]
                .iter_mut()
                .zip(&eval.velocity[src.clone()])
            {
                *o = v as f64;
            }
            for (o, &v) in out.x1_hat[dst].iter_mut().zip(&eval.x1_hat[src]) {
                *o = v as f64;
            }
            stats[i] = eval.stats[k];
        }
    }
    Ok(out)
}

/// A borrowed oracle as a field (for code that holds an `Oracle` itself).
pub struct OracleRef<'a, 'd>(pub &'a mut Oracle<'d>);

impl VelocityField for OracleRef<'_, '_> {
    fn dim(&self) -> usize {
        self.0.dataset().dim()
    }

    fn describe(&self) -> String {
        format!("oracle: {}", self.0.describe())
    }

    fn accepts_classes(&self) -> bool {
        self.0.dataset().labels().is_some()
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        evaluate_oracle(self.0, x, t, classes)
    }

    fn evaluations(&self) -> usize {
        0
    }

    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        Some(self.0.kind())
    }
}
