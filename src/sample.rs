//! Sampling: integrate dx/dt = u(x, t) from noise (t = 0) to data (t = 1) with the oracle.
//!
//! The solver state is f64 (so solver order is visible down to small errors); the field is
//! evaluated in f32 by the oracle. The final step to t = 1 returns the posterior mean
//! x1_hat at the step's start, never dividing by sigma(1) = 0.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::{Error, Result};
use crate::oracle::{Oracle, Query, QueryStats, Times};
use crate::schedule::Schedule;

/// ODE solver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// 1st order, 1 evaluation per step
    Euler,
    /// 2nd order (trapezoidal predictor-corrector), 2 evaluations per step
    #[default]
    Heun,
    /// classic 4th-order Runge-Kutta, 4 evaluations per step
    Rk4,
}

impl Solver {
    pub fn evaluations_per_step(self) -> usize {
        match self {
            Solver::Euler => 1,
            Solver::Heun => 2,
            Solver::Rk4 => 4,
        }
    }
}

/// Classifier-free guidance with the oracle: `u = u_uncond + scale (u_cond - u_uncond)`
/// for t in [t_lo, t_hi]; outside the interval the conditional velocity alone.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Guidance {
    pub scale: f64,
    pub t_lo: f64,
    pub t_hi: f64,
}

impl Guidance {
    fn active(&self, t: f64) -> bool {
        (self.t_lo..=self.t_hi).contains(&t)
    }
}

/// One evaluation of a velocity field for a batch.
#[derive(Clone, Debug, Default)]
pub struct FieldEval {
    pub velocity: Vec<f64>,
    pub x1_hat: Vec<f64>,
    pub stats: Vec<QueryStats>,
}

/// A velocity field over batches of states (B x D, f64) at one time.
pub trait Field {
    fn dim(&self) -> usize;
    fn eval(&mut self, x: &[f64], t: f64) -> Result<FieldEval>;
}

/// The oracle as a field: per-sample classes (None = unconditional) and optional guidance.
pub struct OracleField<'o, 'd> {
    pub oracle: &'o mut Oracle<'d>,
    /// One per sample of the batch being integrated.
    pub classes: Vec<Option<u32>>,
    pub guidance: Option<Guidance>,
    /// Oracle evaluations made (each streams the relevant rows once).
    pub evaluations: usize,
}

impl OracleField<'_, '_> {
    fn evaluate(&mut self, x: &[f32], t: f64, class: Option<u32>) -> Result<FieldEval> {
        self.evaluations += 1;
        let out = self.oracle.evaluate(&Query {
            x,
            t: Times::Scalar(t as f32),
            class,
        })?;
        Ok(FieldEval {
            velocity: out.velocity.iter().map(|&v| v as f64).collect(),
            x1_hat: out.x1_hat.iter().map(|&v| v as f64).collect(),
            stats: out.stats,
        })
    }
}

impl Field for OracleField<'_, '_> {
    fn dim(&self) -> usize {
        self.oracle.dataset().dim()
    }

    fn eval(&mut self, x: &[f64], t: f64) -> Result<FieldEval> {
        let dim = self.dim();
        let n = x.len() / dim;
        assert_eq!(n, self.classes.len(), "one class entry per sample");
        let mut out = FieldEval {
            velocity: vec![0.0; x.len()],
            x1_hat: vec![0.0; x.len()],
            stats: vec![QueryStats::default(); n],
        };
        // One oracle call per distinct class: each streams only that class's rows.
        let mut groups: Vec<(Option<u32>, Vec<usize>)> = Vec::new();
        for (i, c) in self.classes.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| g == c) {
                Some((_, members)) => members.push(i),
                None => groups.push((*c, vec![i])),
            }
        }
        for (class, members) in groups {
            let xs: Vec<f32> = members
                .iter()
                .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().map(|&v| v as f32))
                .collect();
            let mut eval = self.evaluate(&xs, t, class)?;
            if let (Some(g), Some(_)) = (self.guidance, class) {
                if g.active(t) {
                    let uncond = self.evaluate(&xs, t, None)?;
                    // u is affine in x1_hat at fixed (x, t), so guiding both keeps them consistent.
                    for (c, u) in eval.velocity.iter_mut().zip(&uncond.velocity) {
                        *c = u + g.scale * (*c - u);
                    }
                    for (c, u) in eval.x1_hat.iter_mut().zip(&uncond.x1_hat) {
                        *c = u + g.scale * (*c - u);
                    }
                }
            }
            for (k, &i) in members.iter().enumerate() {
                let (src, dst) = (k * dim..(k + 1) * dim, i * dim..(i + 1) * dim);
                out.velocity[dst.clone()].copy_from_slice(&eval.velocity[src.clone()]);
                out.x1_hat[dst].copy_from_slice(&eval.x1_hat[src]);
                out.stats[i] = eval.stats[k];
            }
        }
        Ok(out)
    }
}

fn axpy(x: &[f64], h: f64, k: &[f64]) -> Vec<f64> {
    x.iter().zip(k).map(|(a, b)| a + h * b).collect()
}

/// One step from t0 to t1. Returns the new state and the field at (x, t0).
pub fn step(
    field: &mut dyn Field,
    solver: Solver,
    x: &[f64],
    t0: f64,
    t1: f64,
) -> Result<(Vec<f64>, FieldEval)> {
    let k1 = field.eval(x, t0)?;
    if t1 >= 1.0 {
        let x1 = k1.x1_hat.clone();
        return Ok((x1, k1));
    }
    let h = t1 - t0;
    let next = match solver {
        Solver::Euler => axpy(x, h, &k1.velocity),
        Solver::Heun => {
            let k2 = field.eval(&axpy(x, h, &k1.velocity), t1)?.velocity;
            x.iter()
                .zip(k1.velocity.iter().zip(&k2))
                .map(|(a, (p, q))| a + 0.5 * h * (p + q))
                .collect()
        }
        Solver::Rk4 => {
            let tm = t0 + 0.5 * h;
            let k2 = field.eval(&axpy(x, 0.5 * h, &k1.velocity), tm)?.velocity;
            let k3 = field.eval(&axpy(x, 0.5 * h, &k2), tm)?.velocity;
            let k4 = field.eval(&axpy(x, h, &k3), t1)?.velocity;
            (0..x.len())
                .map(|i| x[i] + h / 6.0 * (k1.velocity[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]))
                .collect()
        }
    };
    Ok((next, k1))
}

/// Integrates over `times`; `on_step(i, x_i, field at (x_i, t_i))` sees every step.
pub fn integrate(
    field: &mut dyn Field,
    solver: Solver,
    times: &[f64],
    x0: Vec<f64>,
    mut on_step: impl FnMut(usize, &[f64], &FieldEval),
) -> Result<Vec<f64>> {
    let mut x = x0;
    for (i, w) in times.windows(2).enumerate() {
        let (next, eval) = step(field, solver, &x, w[0], w[1])?;
        on_step(i, &x, &eval);
        x = next;
    }
    Ok(x)
}

/// The starting noise of sample `index`: depends on (seed, index) only, not on batching.
pub fn initial_noise(seed: u64, index: usize, dim: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    (0..dim)
        .map(|_| rng.sample::<f32, _>(StandardNormal) as f64)
        .collect()
}

/// What to sample.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub schedule: Schedule,
    pub solver: Solver,
    pub seed: u64,
    /// One entry per sample (so `len()` is the number of samples); None = unconditional.
    pub classes: Vec<Option<u32>>,
    pub guidance: Option<Guidance>,
    /// Samples integrated together (all share each streamed dataset pass).
    pub batch: usize,
    /// Samples whose whole trajectory is kept (x_t and x1_hat at every grid time).
    pub tracked: Vec<usize>,
}

/// Mean diagnostics over all samples at one grid time.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepSummary {
    pub t: f64,
    pub mean_top1_weight: f64,
    pub mean_entropy: f64,
    pub mean_ess: f64,
    /// Share of samples whose top-1 weight exceeds 0.5 (refinement has begun)
    pub frac_top1_above_half: f64,
}

/// x_t and x1_hat of one tracked sample at every grid time (the last is t = 1).
#[derive(Clone, Debug, Default)]
pub struct Trajectory {
    pub sample: usize,
    pub x: Vec<Vec<f32>>,
    pub x1_hat: Vec<Vec<f32>>,
}

#[derive(Clone, Debug)]
pub struct SampleRun {
    pub times: Vec<f64>,
    /// n x D, the final samples
    pub samples: Vec<f32>,
    pub noise: Vec<f32>,
    /// Stats of the last evaluation (at the last grid time before 1) per sample
    pub final_stats: Vec<QueryStats>,
    pub steps: Vec<StepSummary>,
    pub trajectories: Vec<Trajectory>,
    pub evaluations: usize,
}

/// Samples `options.classes.len()` trajectories in batches; `tick` is called after every
/// step of every batch (for a progress bar).
pub fn sample(
    oracle: &mut Oracle<'_>,
    options: &SampleOptions,
    mut tick: impl FnMut(),
) -> Result<SampleRun> {
    let times = options.schedule.times()?;
    if *times.first().unwrap() != 0.0 {
        return Err(Error::Input("a sampling grid must start at t = 0".into()));
    }
    if options.batch == 0 || options.classes.is_empty() {
        return Err(Error::Input(
            "need at least one sample and a batch of at least 1".into(),
        ));
    }
    let dim = oracle.dataset().dim();
    let n = options.classes.len();
    let n_steps = times.len() - 1;
    let mut run = SampleRun {
        times: times.clone(),
        samples: Vec::with_capacity(n * dim),
        noise: Vec::with_capacity(n * dim),
        final_stats: Vec::with_capacity(n),
        steps: times[..n_steps]
            .iter()
            .map(|&t| StepSummary {
                t,
                ..Default::default()
            })
            .collect(),
        trajectories: options
            .tracked
            .iter()
            .filter(|&&s| s < n)
            .map(|&s| Trajectory {
                sample: s,
                ..Default::default()
            })
            .collect(),
        evaluations: 0,
    };
    let to_f32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();

    for start in (0..n).step_by(options.batch) {
        let end = (start + options.batch).min(n);
        let x0: Vec<f64> = (start..end)
            .flat_map(|i| initial_noise(options.seed, i, dim))
            .collect();
        run.noise.extend(to_f32(&x0));
        let mut field = OracleField {
            oracle,
            classes: options.classes[start..end].to_vec(),
            guidance: options.guidance,
            evaluations: 0,
        };
        let mut last_stats = Vec::new();
        let trajectories = &mut run.trajectories;
        let steps = &mut run.steps;
        let x = integrate(&mut field, options.solver, &times, x0, |i, x, eval| {
            let s = &mut steps[i];
            for st in &eval.stats {
                s.mean_top1_weight += st.top1_weight as f64;
                s.mean_entropy += st.entropy as f64;
                s.mean_ess += st.ess as f64;
                s.frac_top1_above_half += (st.top1_weight > 0.5) as u8 as f64;
            }
            for tr in trajectories
                .iter_mut()
                .filter(|tr| (start..end).contains(&tr.sample))
            {
                let r = (tr.sample - start) * dim..(tr.sample - start + 1) * dim;
                tr.x.push(to_f32(&x[r.clone()]));
                tr.x1_hat.push(to_f32(&eval.x1_hat[r]));
            }
            last_stats = eval.stats.clone();
            tick();
        })?;
        run.evaluations += field.evaluations;
        for tr in run
            .trajectories
            .iter_mut()
            .filter(|tr| (start..end).contains(&tr.sample))
        {
            let r = (tr.sample - start) * dim..(tr.sample - start + 1) * dim;
            tr.x.push(to_f32(&x[r.clone()]));
            tr.x1_hat.push(to_f32(&x[r]));
        }
        run.samples.extend(to_f32(&x));
        run.final_stats.extend(last_stats);
    }
    for s in &mut run.steps {
        s.mean_top1_weight /= n as f64;
        s.mean_entropy /= n as f64;
        s.mean_ess /= n as f64;
        s.frac_top1_above_half /= n as f64;
    }
    Ok(run)
}
