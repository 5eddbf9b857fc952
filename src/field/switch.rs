//! Two fields joined at a time TS: the first for t < TS, the second from TS on.
//!
//! Solvers put TS into their grid ([`VelocityField::breakpoints`]) and announce each step
//! ([`VelocityField::begin_step`]), so a whole step, end points included, uses one field:
//! steps ending at or before TS the first, steps starting at or after TS the second.
//! Outside a solver (a single evaluation) the time alone decides.

use super::{check_request, FieldEval, VelocityField};
use crate::error::{Error, Result};

pub struct SwitchField<'f> {
    first: Box<dyn VelocityField + 'f>,
    second: Box<dyn VelocityField + 'f>,
    at: f64,
    /// Set by `begin_step`: which field the current step uses (true = second).
    step_uses_second: Option<bool>,
}

impl<'f> SwitchField<'f> {
    pub fn new(
        first: Box<dyn VelocityField + 'f>,
        second: Box<dyn VelocityField + 'f>,
        at: f64,
    ) -> Result<Self> {
        crate::oracle::check_flag_time("--switch-at", at)?;
        if first.dim() != second.dim() {
            return Err(Error::Input(format!(
                "--then: the fields have {} and {} values per sample",
                first.dim(),
                second.dim()
            )));
        }
        Ok(SwitchField {
            first,
            second,
            at,
            step_uses_second: None,
        })
    }

    fn uses_second(&self, t: f64) -> bool {
        self.step_uses_second.unwrap_or(t >= self.at)
    }
}

impl VelocityField for SwitchField<'_> {
    fn dim(&self) -> usize {
        self.first.dim()
    }

    fn describe(&self) -> String {
        format!(
            "{} for t < {}, then {}",
            self.first.describe(),
            self.at,
            self.second.describe()
        )
    }

    fn accepts_classes(&self) -> bool {
        // A side never used (TS = 0 or 1) need not accept classes.
        (self.at <= 0.0 || self.first.accepts_classes())
            && (self.at >= 1.0 || self.second.accepts_classes())
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        let dim = self.dim();
        let b = check_request(dim, x, t, classes)?;
        let (second, first): (Vec<usize>, Vec<usize>) =
            (0..b).partition(|&q| self.uses_second(t[q]));
        if first.is_empty() {
            return self.second.evaluate(x, t, classes);
        }
        if second.is_empty() {
            return self.first.evaluate(x, t, classes);
        }
        let mut out = FieldEval {
            velocity: vec![0.0; x.len()],
            x1_hat: vec![0.0; x.len()],
            stats: Some(Vec::new()),
        };
        let mut stats = vec![None; b];
        for (members, field) in [(first, &mut self.first), (second, &mut self.second)] {
            let xs: Vec<f64> = members
                .iter()
                .flat_map(|&q| x[q * dim..(q + 1) * dim].iter().copied())
                .collect();
            let ts: Vec<f64> = members.iter().map(|&q| t[q]).collect();
            let cs: Vec<Option<u32>> = members.iter().map(|&q| classes[q]).collect();
            let e = field.evaluate(&xs, &ts, &cs)?;
            for (k, &q) in members.iter().enumerate() {
                let (src, dst) = (k * dim..(k + 1) * dim, q * dim..(q + 1) * dim);
                out.velocity[dst.clone()].copy_from_slice(&e.velocity[src.clone()]);
                out.x1_hat[dst].copy_from_slice(&e.x1_hat[src]);
                stats[q] = e.stats.as_ref().map(|s| s[k]);
            }
        }
        // Stats only when every state has them.
        out.stats = stats.into_iter().collect();
        Ok(out)
    }

    fn evaluations(&self) -> usize {
        self.first.evaluations() + self.second.evaluations()
    }

    fn breakpoints(&self) -> Vec<f64> {
        let mut b = self.first.breakpoints();
        b.extend(self.second.breakpoints());
        b.push(self.at);
        b
    }

    fn begin_step(&mut self, t0: f64, t1: f64) {
        // The grid holds TS, so a step lies on one side (t1 <= TS or t0 >= TS); its end
        // point belongs to it too.
        let second = t0 >= self.at;
        self.step_uses_second = Some(second);
        if second {
            self.second.begin_step(t0, t1)
        } else {
            self.first.begin_step(t0, t1)
        }
    }

    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        self.first.backend().or(self.second.backend())
    }
}
