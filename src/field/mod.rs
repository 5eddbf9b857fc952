//! Velocity fields: what the solvers integrate.
//!
//! A field maps B states x (B x D, f64), one time and one optional class per state, to
//! the velocity u(x, t), the posterior mean x1_hat it implies, and per-query diagnostics
//! where the field has them. The exact oracle is one field ([`OracleField`]); others (a
//! Gaussian fit, a user's network in another process, a switch between two fields at a
//! time) implement the same trait, so sampling, guidance and the studies work with any.
//!
//! Guidance is a wrapper ([`Guided`]) rather than part of a field: it needs nothing but
//! the field's conditional and unconditional velocities.

pub mod external;
pub mod gaussian;
pub mod oracle;
pub mod switch;

pub use external::ExternalField;
pub use gaussian::GaussianField;
pub use oracle::OracleField;
pub use switch::SwitchField;

use crate::error::{Error, Result};
use crate::oracle::QueryStats;

/// One evaluation of a field for a batch of B states.
#[derive(Clone, Debug, Default)]
pub struct FieldEval {
    /// B x D
    pub velocity: Vec<f64>,
    /// B x D, the posterior mean of the data (for fields that only give a velocity, the
    /// x1_hat that velocity implies on the run's path).
    pub x1_hat: Vec<f64>,
    /// One per state, when the field knows the posterior over training samples.
    pub stats: Option<Vec<QueryStats>>,
}

/// A velocity field over batches of states.
pub trait VelocityField {
    /// Values per state.
    fn dim(&self) -> usize;

    /// One line for logs and run.json.
    fn describe(&self) -> String;

    /// Whether per-state classes are understood (conditional fields, guidance).
    fn accepts_classes(&self) -> bool;

    /// The field at states `x` (B x D), times `t` (B) and classes (B; None = unconditional).
    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval>;

    /// Evaluations made so far (for the oracle: dataset passes).
    fn evaluations(&self) -> usize;

    /// Times at which the field changes (a switch): solvers put them into their grid so
    /// that no step straddles one.
    fn breakpoints(&self) -> Vec<f64> {
        Vec::new()
    }

    /// Called by a solver before the evaluations of a step from t0 to t1, so that a field
    /// with a breakpoint uses one side for the whole step (its end point included).
    fn begin_step(&mut self, _t0: f64, _t1: f64) {}

    /// The oracle backend in use, if the field has an oracle in it (for run.json).
    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        None
    }
}

/// Which field: `oracle`, `gaussian` or `external:CMD` (as `--field` gives it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSpec {
    Oracle,
    Gaussian,
    External(String),
}

impl std::str::FromStr for FieldSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "oracle" => Ok(FieldSpec::Oracle),
            "gaussian" => Ok(FieldSpec::Gaussian),
            _ => match s.strip_prefix("external:") {
                Some(cmd) if !cmd.trim().is_empty() => Ok(FieldSpec::External(cmd.to_string())),
                _ => Err(Error::Input(format!(
                    "--field '{s}': expected oracle, gaussian or external:COMMAND"
                ))),
            },
        }
    }
}

/// Groups state indices by class, groups in order of first appearance, members in batch
/// order (fields that evaluate one class at a time).
pub(crate) fn class_groups(classes: &[Option<u32>]) -> Vec<(Option<u32>, Vec<usize>)> {
    let mut groups: Vec<(Option<u32>, Vec<usize>)> = Vec::new();
    for (i, c) in classes.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| g == c) {
            Some((_, members)) => members.push(i),
            None => groups.push((*c, vec![i])),
        }
    }
    groups
}

/// A borrowed field is a field: studies lend one field (and its costly set-up, such as a
/// Gaussian fit) to several runs, e.g. both sides of a [`SwitchField`] at many switch times.
impl<F: VelocityField + ?Sized> VelocityField for &mut F {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn accepts_classes(&self) -> bool {
        (**self).accepts_classes()
    }
    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        (**self).evaluate(x, t, classes)
    }
    fn evaluations(&self) -> usize {
        (**self).evaluations()
    }
    fn breakpoints(&self) -> Vec<f64> {
        (**self).breakpoints()
    }
    fn begin_step(&mut self, t0: f64, t1: f64) {
        (**self).begin_step(t0, t1)
    }
    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        (**self).backend()
    }
}

/// Checks the shapes of one evaluation request against a field of dimension `dim`;
/// returns B.
pub fn check_request(dim: usize, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<usize> {
    if dim == 0 || x.is_empty() || !x.len().is_multiple_of(dim) {
        return Err(Error::Input(format!(
            "states hold {} values, not a positive multiple of the sample size {dim}",
            x.len()
        )));
    }
    let b = x.len() / dim;
    if t.len() != b || classes.len() != b {
        return Err(Error::Input(format!(
            "{b} states with {} times and {} classes",
            t.len(),
            classes.len()
        )));
    }
    Ok(b)
}

/// Classifier-free guidance: `u = u_uncond + scale (u_cond - u_uncond)` for t in
/// [t_lo, t_hi]; outside the interval, or for unconditional states, the field as it is.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Guidance {
    pub scale: f64,
    pub t_lo: f64,
    pub t_hi: f64,
}

impl Guidance {
    /// `interval` is `[t_lo, t_hi]` (as `--cfg-interval t_lo,t_hi` gives it).
    pub fn new(scale: f64, interval: &[f64]) -> Result<Self> {
        if !scale.is_finite() {
            return Err(Error::Input(format!("--cfg-scale {scale} is not finite")));
        }
        let [t_lo, t_hi] = interval[..] else {
            return Err(Error::Input(format!(
                "--cfg-interval takes two times t_lo,t_hi, got {} values",
                interval.len()
            )));
        };
        if !(0.0..=1.0).contains(&t_lo) || !(t_lo..=1.0).contains(&t_hi) {
            return Err(Error::Input(format!(
                "--cfg-interval {t_lo},{t_hi}: need 0 <= t_lo <= t_hi <= 1"
            )));
        }
        Ok(Guidance { scale, t_lo, t_hi })
    }

    /// Whether guidance applies at time t (the interval's ends included).
    pub fn active(&self, t: f64) -> bool {
        (self.t_lo..=self.t_hi).contains(&t)
    }
}

/// A field with classifier-free guidance applied to its conditional states.
pub struct Guided<'f> {
    pub field: &'f mut dyn VelocityField,
    pub guidance: Guidance,
}

impl VelocityField for Guided<'_> {
    fn dim(&self) -> usize {
        self.field.dim()
    }

    fn describe(&self) -> String {
        let g = self.guidance;
        format!(
            "{} with guidance w = {} on [{}, {}]",
            self.field.describe(),
            g.scale,
            g.t_lo,
            g.t_hi
        )
    }

    fn accepts_classes(&self) -> bool {
        true
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        let dim = self.dim();
        check_request(dim, x, t, classes)?;
        let mut eval = self.field.evaluate(x, t, classes)?;
        // The guided states go through the unconditional field one class at a time, in
        // batch order: the same calls as the conditional pass makes, so results do not
        // depend on how classes are mixed in a batch.
        let active: Vec<Option<u32>> = (0..t.len())
            .map(|q| classes[q].filter(|_| self.guidance.active(t[q])))
            .collect();
        let w = self.guidance.scale;
        for (_, guided) in class_groups(&active)
            .into_iter()
            .filter(|(c, _)| c.is_some())
        {
            let xs: Vec<f64> = guided
                .iter()
                .flat_map(|&q| x[q * dim..(q + 1) * dim].iter().copied())
                .collect();
            let ts: Vec<f64> = guided.iter().map(|&q| t[q]).collect();
            let uncond = self.field.evaluate(&xs, &ts, &vec![None; guided.len()])?;
            for (k, &q) in guided.iter().enumerate() {
                let (src, dst) = (k * dim..(k + 1) * dim, q * dim..(q + 1) * dim);
                // u is affine in x1_hat at fixed (x, t), so guiding both keeps them consistent.
                for (c, u) in eval.velocity[dst.clone()]
                    .iter_mut()
                    .zip(&uncond.velocity[src.clone()])
                {
                    *c = u + w * (*c - u);
                }
                for (c, u) in eval.x1_hat[dst].iter_mut().zip(&uncond.x1_hat[src]) {
                    *c = u + w * (*c - u);
                }
            }
        }
        Ok(eval)
    }

    fn evaluations(&self) -> usize {
        self.field.evaluations()
    }

    fn breakpoints(&self) -> Vec<f64> {
        self.field.breakpoints()
    }

    fn begin_step(&mut self, t0: f64, t1: f64) {
        self.field.begin_step(t0, t1)
    }

    fn backend(&self) -> Option<crate::oracle::BackendKind> {
        self.field.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_checks_its_interval() {
        assert!(Guidance::new(2.5, &[0.1, 0.6]).is_ok());
        assert!(Guidance::new(2.5, &[0.6, 0.1]).is_err());
        assert!(Guidance::new(2.5, &[0.1]).is_err());
        assert!(Guidance::new(2.5, &[-0.1, 0.5]).is_err());
        assert!(Guidance::new(f64::NAN, &[0.0, 1.0]).is_err());
        let g = Guidance::new(1.0, &[0.25, 0.5]).unwrap();
        assert!(g.active(0.25) && g.active(0.5) && g.active(0.3));
        assert!(!g.active(0.2499) && !g.active(0.5001));
    }
}
