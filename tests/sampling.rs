//! Sampling: solver orders, guidance, memorization end to end, determinism.

mod common;

use common::rel_err;
use oracleflow::analysis::nearest_two;
use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::field::{FieldEval, OracleField, VelocityField};
use oracleflow::oracle::{BackendKind, Oracle, QueryStats};
use oracleflow::sample::{initial_noise, integrate, sample, Guidance, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::Path;

/// The exact oracle of a tiny dataset, in f64: isolates the solvers from f32 rounding.
struct ExactField {
    data: Vec<Vec<f64>>,
    path: Path,
}

impl VelocityField for ExactField {
    fn dim(&self) -> usize {
        self.data[0].len()
    }
    fn describe(&self) -> String {
        "exact f64 oracle".into()
    }
    fn accepts_classes(&self) -> bool {
        false
    }
    fn evaluations(&self) -> usize {
        0
    }
    fn evaluate(
        &mut self,
        x: &[f64],
        t: &[f64],
        _classes: &[Option<u32>],
    ) -> oracleflow::Result<FieldEval> {
        let mut out = FieldEval {
            stats: Some(Vec::new()),
            ..Default::default()
        };
        for (q, xq) in x.chunks(self.dim()).enumerate() {
            let c = self.path.coefs(t[q]);
            let (a, b) = c.velocity_coefs();
            let logits: Vec<f64> = self
                .data
                .iter()
                .map(|y| {
                    -xq.iter()
                        .zip(y)
                        .map(|(p, q)| (p - c.alpha * q).powi(2))
                        .sum::<f64>()
                        / (2.0 * c.sigma_safe().powi(2))
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for k in 0..xq.len() {
                let hat: f64 = w.iter().zip(&self.data).map(|(w, y)| w / z * y[k]).sum();
                out.x1_hat.push(hat);
                out.velocity.push(a * hat + b * xq[k]);
            }
            out.stats.as_mut().unwrap().push(QueryStats::default());
        }
        Ok(out)
    }
}

fn grid_to(t_end: f64, steps: usize) -> Vec<f64> {
    (0..=steps)
        .map(|i| t_end * i as f64 / steps as f64)
        .collect()
}

fn error_at(
    field: &mut ExactField,
    solver: Solver,
    steps: usize,
    t_end: f64,
    x0: &[f64],
    truth: &[f64],
) -> f64 {
    let x = integrate(
        field,
        solver,
        &grid_to(t_end, steps),
        x0.to_vec(),
        &[None],
        |_, _, _| {},
    )
    .unwrap();
    x.iter()
        .zip(truth)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Observed orders log2(e(h) / e(h/2)) must be near 1, 2, 4.
fn assert_orders(field: &mut ExactField, t_end: f64, x0: &[f64], truth: &[f64], what: &str) {
    for (solver, order, base) in [
        (Solver::Euler, 1.0, 32),
        (Solver::Heun, 2.0, 32),
        (Solver::Rk4, 4.0, 16),
    ] {
        let errs: Vec<f64> = [base, 2 * base, 4 * base]
            .iter()
            .map(|&s| error_at(field, solver, s, t_end, x0, truth))
            .collect();
        for w in errs.windows(2) {
            let observed = (w[0] / w[1]).log2();
            assert!(
                (observed - order).abs() < 0.35,
                "{what} {solver:?}: observed order {observed:.2} (errors {errs:?}), expected {order}"
            );
        }
    }
}

#[test]
fn solver_orders_on_one_sample_vp_path() {
    // N = 1 on the VP-cosine path: the trajectory is exactly x_t = alpha y + sigma x0.
    let y = vec![0.7, -1.2, 0.3];
    let x0 = vec![0.5, 0.1, -0.9];
    let mut field = ExactField {
        data: vec![y.clone()],
        path: Path::VpCosine,
    };
    let t_end = 0.9;
    let c = Path::VpCosine.coefs(t_end);
    let truth: Vec<f64> = y
        .iter()
        .zip(&x0)
        .map(|(y, x)| c.alpha * y + c.sigma * x)
        .collect();
    assert_orders(&mut field, t_end, &x0, &truth, "N=1 vp-cosine");
}

#[test]
fn solver_orders_on_two_symmetric_samples() {
    // N = 2, y = +-a, rectified flow: curved trajectories; truth from RK4 with 4096 steps.
    let a = vec![1.0, 0.5];
    let minus_a: Vec<f64> = a.iter().map(|v| -v).collect();
    let mut field = ExactField {
        data: vec![a, minus_a],
        path: Path::RectifiedFlow,
    };
    let x0 = vec![0.3, -0.2];
    let t_end = 0.7;
    let truth = integrate(
        &mut field,
        Solver::Rk4,
        &grid_to(t_end, 4096),
        x0.clone(),
        &[None],
        |_, _, _| {},
    )
    .unwrap();
    assert_orders(&mut field, t_end, &x0, &truth, "N=2 rf");
}

#[test]
fn oracle_field_follows_the_exact_one_sample_trajectory() {
    // Through the real oracle (cpu, f32): RK4 reaches the exact x_t to f32 accuracy.
    let ds = common::gaussian_dataset(1, 8, 3, Dtype::F32);
    let y = ds.sample_f64(0);
    let oracle = Oracle::new(&ds, Path::VpCosine, BackendKind::Cpu).unwrap();
    let x0 = initial_noise(5, 0, 8);
    let mut field = OracleField::new(oracle);
    let x = integrate(
        &mut field,
        Solver::Rk4,
        &grid_to(0.9, 64),
        x0.clone(),
        &[None],
        |_, _, _| {},
    )
    .unwrap();
    let c = Path::VpCosine.coefs(0.9);
    let truth: Vec<f64> = y
        .iter()
        .zip(&x0)
        .map(|(y, x)| c.alpha * y + c.sigma * x)
        .collect();
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    assert!(rel_err(&xf, &truth) < 1e-5);
}

fn options(
    n: usize,
    steps: usize,
    classes: Vec<Option<u32>>,
    guidance: Option<Guidance>,
) -> SampleOptions {
    assert_eq!(classes.len(), n);
    SampleOptions {
        schedule: Schedule::uniform(steps),
        solver: Solver::Euler,
        seed: 7,
        classes,
        guidance,
        batch: 64,
        tracked: vec![0],
        init: None,
    }
}

fn small_real() -> Dataset {
    dataset::load("embedded@400", Dtype::F32).unwrap()
}

#[test]
fn cfg_with_scale_one_or_outside_interval_is_conditional() {
    let ds = small_real();
    let mut oracle =
        OracleField::new(Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap());
    let classes = vec![Some(2), Some(5), Some(2), Some(7)];
    let cond = sample(&mut oracle, &options(4, 8, classes.clone(), None), || {}).unwrap();
    let unit = Guidance {
        scale: 1.0,
        t_lo: 0.0,
        t_hi: 1.0,
    };
    let w1 = sample(
        &mut oracle,
        &options(4, 8, classes.clone(), Some(unit)),
        || {},
    )
    .unwrap();
    let cond64: Vec<f64> = cond.samples.iter().map(|&v| v as f64).collect();
    assert!(
        rel_err(&w1.samples, &cond64) < 1e-5,
        "w = 1 is conditional sampling"
    );
    assert!(
        w1.evaluations > cond.evaluations,
        "guidance did evaluate the unconditional field"
    );

    // Interval between grid times (steps at 0, 0.125, ...): never active.
    let outside = Guidance {
        scale: 3.0,
        t_lo: 0.13,
        t_hi: 0.24,
    };
    let g = sample(
        &mut oracle,
        &options(4, 8, classes.clone(), Some(outside)),
        || {},
    )
    .unwrap();
    assert_eq!(
        g.samples, cond.samples,
        "outside the interval: exactly conditional"
    );

    // Strong guidance inside the interval changes the trajectories, and stays in class.
    let strong = Guidance {
        scale: 2.5,
        t_lo: 0.1,
        t_hi: 0.6,
    };
    let g = sample(
        &mut oracle,
        &options(4, 8, classes.clone(), Some(strong)),
        || {},
    )
    .unwrap();
    assert_ne!(g.samples, cond.samples);
    let labels_of = |run: &oracleflow::sample::SampleRun| -> Vec<u32> {
        nearest_two(&ds, &run.samples)
            .iter()
            .map(|nb| ds.labels().unwrap()[ds.row_of_original(nb.nearest).unwrap()])
            .collect()
    };
    assert_eq!(
        labels_of(&cond),
        vec![2, 5, 2, 7],
        "conditional samples land in their class"
    );
    assert_eq!(
        labels_of(&g),
        vec![2, 5, 2, 7],
        "guided samples land in their class"
    );
}

#[test]
fn oracle_samples_memorize_training_images() {
    let ds = small_real();
    for kind in [BackendKind::Cpu, BackendKind::Gpu] {
        if !common::enabled(kind) {
            continue;
        }
        let mut oracle = OracleField::new(Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap());
        let mut opts = options(6, 12, vec![None; 6], None);
        opts.solver = Solver::Heun;
        let run = sample(&mut oracle, &opts, || {}).unwrap();
        let nb = nearest_two(&ds, &run.samples);
        for (i, n) in nb.iter().enumerate() {
            let y = ds.sample_f64(n.nearest_row);
            let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(
                n.distance <= 1e-3 * norm,
                "{kind:?} sample {i}: distance {} to nearest",
                n.distance
            );
            assert!(n.memorized());
            assert_eq!(
                n.nearest,
                run.final_stats[i].unwrap().top1_index,
                "{kind:?} sample {i}: nearest = last top-1"
            );
        }
        assert_eq!(run.steps.len(), 12);
        assert!(run.steps[0].mean_top1_weight < 0.01 && run.steps[11].mean_top1_weight > 0.99);
    }
}

#[test]
fn same_seed_same_samples_across_batch_sizes() {
    let ds = small_real();
    let mut oracle =
        OracleField::new(Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap());
    let mut a = options(5, 6, vec![None; 5], None);
    let run_a = sample(&mut oracle, &a, || {}).unwrap();
    let again = sample(&mut oracle, &a, || {}).unwrap();
    assert_eq!(
        run_a.samples, again.samples,
        "same seed, backend, batch: identical"
    );
    a.batch = 2;
    let run_b = sample(&mut oracle, &a, || {}).unwrap();
    assert_eq!(
        run_a.noise, run_b.noise,
        "noise of sample i depends on (seed, i) only"
    );
    // The cpu backend splits rows independently of the batch: bitwise equal.
    assert_eq!(
        run_a.samples, run_b.samples,
        "cpu: identical across batch sizes"
    );
    // Also when a batch is split into several query groups (B > 128 on 2 threads).
    let mut big = options(140, 4, vec![None; 140], None);
    big.batch = 140;
    let whole = sample(&mut oracle, &big, || {}).unwrap();
    big.batch = 9;
    let pieces = sample(&mut oracle, &big, || {}).unwrap();
    assert_eq!(
        whole.samples, pieces.samples,
        "cpu: identical with query groups"
    );
    let top = |r: &oracleflow::sample::SampleRun| {
        r.final_stats
            .iter()
            .map(|s| s.unwrap().top1_index)
            .collect::<Vec<_>>()
    };
    assert_eq!(top(&run_a), top(&run_b));
    // The noise of sample i is ChaCha8 seeded with the seed, on stream i, drawn here.
    let dim = ds.dim();
    for i in 0..5 {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        rng.set_stream(i as u64);
        let want: Vec<f32> = (0..dim)
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
            .collect();
        assert_eq!(
            &run_a.noise[i * dim..(i + 1) * dim],
            want.as_slice(),
            "noise of sample {i}"
        );
    }
    assert_ne!(initial_noise(7, 3, dim), initial_noise(8, 3, dim));
}
