//! Sampling: integrate dx/dt = u(x, t) from noise (t = 0) to data (t = 1) with any
//! [`VelocityField`] (the oracle by default).
//!
//! The solver state is f64 (so solver order is visible down to small errors); the oracle
//! evaluates in f32. The final step to t = 1 returns the posterior mean x1_hat at the
//! step's start, never dividing by sigma(1) = 0.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub use crate::checkpoint::Checkpoint;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
pub use crate::field::Guidance;
use crate::field::{FieldEval, Guided, VelocityField};
use crate::oracle::QueryStats;
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

fn axpy(x: &[f64], h: f64, k: &[f64]) -> Vec<f64> {
    x.iter().zip(k).map(|(a, b)| a + h * b).collect()
}

/// The field at one time for the whole batch.
fn eval_at(
    field: &mut dyn VelocityField,
    x: &[f64],
    t: f64,
    classes: &[Option<u32>],
) -> Result<FieldEval> {
    field.evaluate(x, &vec![t; classes.len()], classes)
}

/// One step from t0 to t1 for states `x` with one class entry each. Returns the new state
/// and the field at (x, t0).
pub fn step(
    field: &mut dyn VelocityField,
    solver: Solver,
    x: &[f64],
    classes: &[Option<u32>],
    t0: f64,
    t1: f64,
) -> Result<(Vec<f64>, FieldEval)> {
    field.begin_step(t0, t1);
    let k1 = eval_at(field, x, t0, classes)?;
    if t1 >= 1.0 {
        let x1 = k1.x1_hat.clone();
        return Ok((x1, k1));
    }
    let h = t1 - t0;
    let next = match solver {
        Solver::Euler => axpy(x, h, &k1.velocity),
        Solver::Heun => {
            let k2 = eval_at(field, &axpy(x, h, &k1.velocity), t1, classes)?.velocity;
            x.iter()
                .zip(k1.velocity.iter().zip(&k2))
                .map(|(a, (p, q))| a + 0.5 * h * (p + q))
                .collect()
        }
        Solver::Rk4 => {
            let tm = t0 + 0.5 * h;
            let k2 = eval_at(field, &axpy(x, 0.5 * h, &k1.velocity), tm, classes)?.velocity;
            let k3 = eval_at(field, &axpy(x, 0.5 * h, &k2), tm, classes)?.velocity;
            let k4 = eval_at(field, &axpy(x, h, &k3), t1, classes)?.velocity;
            (0..x.len())
                .map(|i| x[i] + h / 6.0 * (k1.velocity[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]))
                .collect()
        }
    };
    Ok((next, k1))
}

/// Integrates over `times`; `on_step(i, x_i, field at (x_i, t_i))` sees every step.
pub fn integrate(
    field: &mut dyn VelocityField,
    solver: Solver,
    times: &[f64],
    x0: Vec<f64>,
    classes: &[Option<u32>],
    mut on_step: impl FnMut(usize, &[f64], &FieldEval),
) -> Result<Vec<f64>> {
    let mut x = x0;
    for (i, w) in times.windows(2).enumerate() {
        let (next, eval) = step(field, solver, &x, classes, w[0], w[1])?;
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

/// Which class each sample is conditioned on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Conditioning {
    #[default]
    Unconditional,
    /// Every sample on one class.
    Class(u32),
    /// A balanced set: sample i on the i-th class (in label order) in turn.
    Balanced,
}

impl Conditioning {
    /// The class of each of `n` samples; checks that the dataset has the class(es).
    pub fn classes(self, ds: &Dataset, n: usize) -> Result<Vec<Option<u32>>> {
        match self {
            Conditioning::Unconditional => Ok(vec![None; n]),
            Conditioning::Class(c) => {
                ds.rows_for(Some(c))?;
                Ok(vec![Some(c); n])
            }
            Conditioning::Balanced => {
                let counts = ds.class_counts();
                if counts.is_empty() {
                    return Err(Error::Input(format!(
                        "--classes all: dataset {} has no labels",
                        ds.name
                    )));
                }
                Ok((0..n).map(|i| Some(counts[i % counts.len()].0)).collect())
            }
        }
    }
}

/// Checks the sample count and batch size (before any work: the CLI calls it first too).
pub fn check_counts(n_samples: usize, batch: usize) -> Result<()> {
    if n_samples == 0 {
        return Err(Error::Input("-n must be at least 1".into()));
    }
    if batch == 0 {
        return Err(Error::Input("--batch must be at least 1".into()));
    }
    Ok(())
}

/// Guidance needs conditional samples.
pub fn check_guidance(classes: &[Option<u32>], guidance: Option<Guidance>) -> Result<()> {
    if guidance.is_some() && classes.iter().all(|c| c.is_none()) {
        return Err(Error::Input(
            "--cfg-scale needs --class K or --classes all".into(),
        ));
    }
    Ok(())
}

/// The time grid of a sampling run: the schedule's, which must run from 0 to 1.
pub fn sampling_times(schedule: &Schedule) -> Result<Vec<f64>> {
    let times = schedule.times()?;
    if times[0] != 0.0 || *times.last().unwrap() != 1.0 {
        return Err(Error::Input(format!(
            "--times must run from 0 to 1 (got {} .. {})",
            times[0],
            times.last().unwrap()
        )));
    }
    Ok(times)
}

/// The grid a run integrates over: the user's `times` from `t_start` on (t_start put in
/// first), with the field's breakpoints inside (t_start, 1) added so that no step straddles
/// one. `t_start = 1` gives the one time [1] (no step: the start is the result).
pub fn integration_times(times: &[f64], t_start: f64, breakpoints: &[f64]) -> Result<Vec<f64>> {
    crate::oracle::check_flag_time("--t-start", t_start)?;
    let mut grid: Vec<f64> = std::iter::once(t_start)
        .chain(times.iter().copied().filter(|&t| t > t_start))
        .chain(
            breakpoints
                .iter()
                .copied()
                .filter(|&b| b > t_start && b < 1.0),
        )
        .collect();
    grid.sort_by(f64::total_cmp);
    grid.dedup();
    Ok(grid)
}

/// Samples to start from instead of noise: each is noised to `t_start` along the path,
/// x_T = alpha(T) y + sigma(T) x0 with x0 the sample's own seeded noise, and integrated
/// from T to 1.
#[derive(Clone, Debug)]
pub struct InitFrom {
    pub path: crate::Path,
    pub t_start: f64,
    /// At least n x D values (user coordinates); sample i starts from row i.
    pub samples: Vec<f32>,
}

/// Rows of the trajectory picture: `track` samples spread evenly over `n`.
pub fn spread_samples(n: usize, track: usize) -> Vec<usize> {
    let k = track.min(n);
    (0..k).map(|i| i * n / k).collect()
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
    /// Start from given samples noised to a time instead of from noise at t = 0.
    pub init: Option<InitFrom>,
}

/// Mean diagnostics over all samples at one grid time (NaN where the field has no stats).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepSummary {
    pub t: f64,
    pub mean_top1_weight: f64,
    pub mean_entropy: f64,
    pub mean_ess: f64,
    /// Share of samples whose top-1 weight exceeds 0.5 (refinement has begun)
    pub frac_top1_above_half: f64,
    /// Mean tr Cov_w(y) / D of the posterior
    pub mean_posterior_variance: f64,
    /// Exact pruning: the largest certified bound on the skipped weight (relative to the
    /// normaliser) over the samples at this step's first evaluation; 0 when dense
    pub max_skipped_mass_bound: f64,
    /// Exact pruning: mean share of tiles skipped whole, and of samples never computed
    pub mean_tiles_skipped: f64,
    pub mean_samples_skipped: f64,
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
    /// Stats of the last evaluation (at the last grid time before 1) per sample, where the
    /// field gives them
    pub final_stats: Vec<Option<QueryStats>>,
    pub steps: Vec<StepSummary>,
    pub trajectories: Vec<Trajectory>,
    /// Field evaluations made (for the oracle: dataset passes)
    pub evaluations: usize,
}

/// Samples `options.classes.len()` trajectories of `field` in batches; `tick` is called
/// after every step of every batch (for a progress bar).
pub fn sample(
    field: &mut dyn VelocityField,
    options: &SampleOptions,
    tick: impl FnMut(),
) -> Result<SampleRun> {
    sample_resumable(field, options, None, |_, _| Ok(()), tick)
}

/// [`sample`], continuing from `resume` (the state after its finished batches, which are
/// not redone) and showing `on_batch(batches_done, state)` the state after every finished
/// batch (to save it; the state is lent, not copied, so runs that save nothing pay nothing). Batches are fixed by `options.batch`, so a resumed run computes exactly what the
/// uninterrupted one would have, in the same order.
pub fn sample_resumable(
    field: &mut dyn VelocityField,
    options: &SampleOptions,
    resume: Option<Checkpoint>,
    mut on_batch: impl FnMut(usize, &SampleRun) -> Result<()>,
    mut tick: impl FnMut(),
) -> Result<SampleRun> {
    let user_times = sampling_times(&options.schedule)?;
    let t_start = options.init.as_ref().map_or(0.0, |i| i.t_start);
    let times = integration_times(&user_times, t_start, &field.breakpoints())?;
    check_counts(options.classes.len(), options.batch)?;
    if let Some(init) = &options.init {
        if init.samples.len() < options.classes.len() * field.dim() {
            return Err(Error::Input(format!(
                "--init-from holds {} samples, fewer than the {} asked for",
                init.samples.len() / field.dim().max(1),
                options.classes.len()
            )));
        }
    }
    if options.classes.iter().any(|c| c.is_some()) && !field.accepts_classes() {
        return Err(Error::Input(format!(
            "classes were asked for, but the field ({}) has none",
            field.describe()
        )));
    }
    check_guidance(&options.classes, options.guidance)?;
    let evaluations_before = field.evaluations();
    let mut guided;
    let field: &mut dyn VelocityField = match options.guidance {
        Some(guidance) => {
            guided = Guided { field, guidance };
            &mut guided
        }
        None => field,
    };
    let dim = field.dim();
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
    let mut first_batch = 0;
    if let Some(cp) = resume {
        let fits = cp.run.times == run.times
            && cp.run.steps.len() == run.steps.len()
            && cp.run.samples.len() == (cp.batches_done * options.batch).min(n) * dim
            && cp.run.trajectories.len() == run.trajectories.len();
        if !fits {
            return Err(Error::Input(
                "--resume: the saved batches do not fit this run's settings".into(),
            ));
        }
        first_batch = cp.batches_done;
        run = cp.run;
    }
    let evaluations_done = run.evaluations;
    let to_f32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();

    for (batch_index, start) in (0..n).step_by(options.batch).enumerate().skip(first_batch) {
        let end = (start + options.batch).min(n);
        let noise: Vec<f64> = (start..end)
            .flat_map(|i| initial_noise(options.seed, i, dim))
            .collect();
        run.noise.extend(to_f32(&noise));
        let x0 = match &options.init {
            None => noise,
            Some(init) => {
                let c = init.path.coefs(init.t_start);
                let ys = &init.samples[start * dim..end * dim];
                // At T = 1 the start is the sample itself (sigma(1) may be 6e-17, not 0).
                if init.t_start >= 1.0 {
                    ys.iter().map(|&y| y as f64).collect()
                } else {
                    ys.iter()
                        .zip(&noise)
                        .map(|(&y, n)| c.alpha * y as f64 + c.sigma * n)
                        .collect()
                }
            }
        };
        let mut last_stats = vec![None; end - start];
        let trajectories = &mut run.trajectories;
        let steps = &mut run.steps;
        let classes = &options.classes[start..end];
        let x = integrate(field, options.solver, &times, x0, classes, |i, x, eval| {
            let s = &mut steps[i];
            match &eval.stats {
                Some(stats) => {
                    for st in stats {
                        s.mean_top1_weight += st.top1_weight as f64;
                        s.mean_entropy += st.entropy as f64;
                        s.mean_ess += st.ess as f64;
                        s.frac_top1_above_half += (st.top1_weight > 0.5) as u8 as f64;
                        s.mean_posterior_variance += st.posterior_variance as f64;
                        s.max_skipped_mass_bound =
                            s.max_skipped_mass_bound.max(st.skipped_mass_bound as f64);
                        s.mean_tiles_skipped += st.tiles_skipped as f64;
                        s.mean_samples_skipped += st.samples_skipped as f64;
                    }
                    last_stats = stats.iter().map(|&st| Some(st)).collect();
                }
                None => {
                    s.mean_top1_weight = f64::NAN;
                    s.mean_entropy = f64::NAN;
                    s.mean_ess = f64::NAN;
                    s.frac_top1_above_half = f64::NAN;
                    s.mean_posterior_variance = f64::NAN;
                    s.mean_tiles_skipped = f64::NAN;
                    s.mean_samples_skipped = f64::NAN;
                    last_stats = vec![None; last_stats.len()];
                }
            }
            for tr in trajectories
                .iter_mut()
                .filter(|tr| (start..end).contains(&tr.sample))
            {
                let r = (tr.sample - start) * dim..(tr.sample - start + 1) * dim;
                tr.x.push(to_f32(&x[r.clone()]));
                tr.x1_hat.push(to_f32(&eval.x1_hat[r]));
            }
            tick();
        })?;
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
        run.evaluations = evaluations_done + field.evaluations() - evaluations_before;
        on_batch(batch_index + 1, &run)?;
    }
    for s in &mut run.steps {
        s.mean_top1_weight /= n as f64;
        s.mean_entropy /= n as f64;
        s.mean_ess /= n as f64;
        s.frac_top1_above_half /= n as f64;
        s.mean_posterior_variance /= n as f64;
        s.mean_tiles_skipped /= n as f64;
        s.mean_samples_skipped /= n as f64;
    }
    Ok(run)
}
