//! Classifier-free guidance against its formula u_uncond + w (u_cond - u_uncond), computed
//! here from separate conditional and unconditional evaluations: inside the interval, at its
//! exact ends, just outside, and inside the stages of Heun and RK4.

mod common;

use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::field::{FieldEval, Guidance, Guided, OracleField, VelocityField};
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::sample::{initial_noise, sample, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::Path;

fn small_real() -> Dataset {
    dataset::load("embedded@300", Dtype::F32).unwrap()
}

fn states(dim: usize, n: usize, t: f64, ds: &Dataset) -> Vec<f64> {
    // x_t built from training samples and noise, as a sampler meets them.
    (0..n)
        .flat_map(|i| {
            let y = ds.sample_f64(i * 7);
            let x0 = initial_noise(3, i, dim);
            (0..dim)
                .map(move |k| t * y[k] + (1.0 - t) * x0[k])
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn guided_value_is_the_formula_at_the_ends_and_inside() {
    let ds = small_real();
    let dim = ds.dim();
    let mut field =
        OracleField::new(Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap());
    let classes = [Some(2), None, Some(5), Some(2)];
    let w = 2.5;
    let g = Guidance::new(w, &[0.25, 0.5]).unwrap();
    for t in [0.25, 0.3, 0.5, 0.2499, 0.5001, 0.1, 0.9] {
        let x = states(dim, classes.len(), t, &ds);
        let ts = vec![t; classes.len()];
        let cond: FieldEval = field.evaluate(&x, &ts, &classes).unwrap();
        let uncond = field.evaluate(&x, &ts, &[None; 4]).unwrap();
        let mut guided = Guided {
            field: &mut field,
            guidance: g,
        };
        let got = guided.evaluate(&x, &ts, &classes).unwrap();
        let inside = (0.25..=0.5).contains(&t);
        // The unconditional values here come from one call over all four states, Guided's
        // from one call per class group: equal up to f32 rounding of the evaluation
        // (measured < 1e-6 relative), so 1e-5 relative per state.
        for (q, c) in classes.iter().enumerate() {
            let r = q * dim..(q + 1) * dim;
            let formula = |got: &[f64], cond: &[f64], uncond: &[f64]| -> (f64, f64) {
                let want: Vec<f64> = if inside && c.is_some() {
                    uncond
                        .iter()
                        .zip(cond)
                        .map(|(u, c)| u + w * (c - u))
                        .collect()
                } else {
                    cond.to_vec()
                };
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>();
                let norm = want.iter().map(|b| b * b).sum::<f64>();
                let gap = cond
                    .iter()
                    .zip(uncond)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>();
                ((err / norm).sqrt(), (gap / norm).sqrt())
            };
            let (ev, gap) = formula(
                &got.velocity[r.clone()],
                &cond.velocity[r.clone()],
                &uncond.velocity[r.clone()],
            );
            let (eh, _) = formula(
                &got.x1_hat[r.clone()],
                &cond.x1_hat[r.clone()],
                &uncond.x1_hat[r],
            );
            assert!(
                ev <= 1e-5 && eh <= 1e-5,
                "t={t} state {q} ({c:?}): velocity {ev:.1e}, x1_hat {eh:.1e}"
            );
            if c.is_some() && t < 0.6 {
                // Not vacuous: guidance moves the velocity far more than the tolerance.
                assert!(
                    gap > 1e-3,
                    "t={t} state {q}: cond and uncond differ by only {gap:.1e}"
                );
            }
        }
    }
}

/// Records the times at which unconditional evaluations were asked for.
struct Recorder<'a, 'd> {
    inner: &'a mut OracleField<'d>,
    uncond_times: Vec<f64>,
    cond_times: Vec<f64>,
}

impl VelocityField for Recorder<'_, '_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn accepts_classes(&self) -> bool {
        true
    }
    fn evaluations(&self) -> usize {
        self.inner.evaluations()
    }
    fn evaluate(
        &mut self,
        x: &[f64],
        t: &[f64],
        classes: &[Option<u32>],
    ) -> oracleflow::Result<FieldEval> {
        if classes.iter().all(|c| c.is_none()) {
            self.uncond_times.push(t[0]);
        } else {
            self.cond_times.push(t[0]);
        }
        self.inner.evaluate(x, t, classes)
    }
}

#[test]
fn guidance_applies_inside_solver_stages() {
    // Grid 0, 0.5, 1: RK4's first step evaluates at 0, 0.25, 0.25, 0.5; Heun's at 0 and 0.5.
    // An interval [0.25, 0.25] is met only by RK4's midpoint stages.
    let ds = small_real();
    let mut oracle =
        OracleField::new(Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap());
    let opts = |solver, lo, hi| SampleOptions {
        init: None,
        schedule: Schedule::Explicit(vec![0.0, 0.5, 1.0]),
        solver,
        seed: 4,
        classes: vec![Some(1), Some(7)],
        guidance: Some(Guidance::new(3.0, &[lo, hi]).unwrap()),
        batch: 8,
        tracked: vec![],
    };
    for (solver, lo, hi, want) in [
        // Two classes: one unconditional call per class group at each guided stage.
        (Solver::Rk4, 0.25, 0.25, vec![0.25; 4]),
        (Solver::Heun, 0.25, 0.25, vec![]),
        // Heun meets 0.5 as the corrector of step 1 and the start of step 2.
        (Solver::Heun, 0.5, 0.5, vec![0.5; 4]),
        (Solver::Euler, 0.0, 0.0, vec![0.0; 2]),
    ] {
        let mut rec = Recorder {
            inner: &mut oracle,
            uncond_times: vec![],
            cond_times: vec![],
        };
        sample(&mut rec, &opts(solver, lo, hi), || {}).unwrap();
        assert_eq!(rec.uncond_times, want, "{solver:?} on [{lo}, {hi}]");
        assert!(!rec.cond_times.is_empty());
    }
}
