//! Anchored screening (`prune::anchor`): along sampler trajectories, where each call's
//! queries share their noise with an earlier call's, the passes screened by that call's
//! products give the dense result. Every call of the pruned backend is checked against
//! the dense backend and the f64 reference on the same states (posterior mean as close to
//! f64 as dense's), and its certificate against the mass it truly left out.

mod common;

use common::*;
use oracleflow::dataset::Dataset;
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions, Pass};
use oracleflow::oracle::{reference, Backend, CentredBatch, Posterior};
use oracleflow::path::Path;
use rand::Rng;

/// An Euler trajectory of `b` queries in `steps` steps from t = 0 on `rows` (noise from
/// `seed`), the velocity from `backend`'s mean as a sampler's: calls `each(t, x, batch,
/// posterior, backend)` after every call.
#[allow(clippy::too_many_arguments)]
fn trajectory(
    backend: &mut CpuBackend<'_>,
    ds: &Dataset,
    path: Path,
    rows: std::ops::Range<usize>,
    (b, steps, seed): (usize, usize, u64),
    mut each: impl FnMut(f32, &[f32], &CentredBatch<'_>, &Posterior, &CpuBackend<'_>),
) {
    let dim = ds.dim();
    let mut x = normal(&mut rng(seed), b * dim);
    for k in 0..steps {
        let t = k as f32 / steps as f32;
        let (xc, coefs) = centred(ds, path, &x, t);
        let batch = CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: rows.clone(),
        };
        let p = backend.posterior(&batch).unwrap();
        each(t, &x, &batch, &p, backend);
        // The Euler step: v = a x1_hat + b x.
        let (va, vb) = path.coefs(t as f64).velocity_coefs();
        let h = 1.0 / steps as f64;
        for q in 0..b {
            for (j, m) in ds.mean().iter().enumerate() {
                let at = q * dim + j;
                let hat = p.mean[at] as f64 + *m as f64;
                let v = va * hat + vb * x[at] as f64;
                x[at] = (x[at] as f64 + h * v) as f32;
            }
        }
    }
}

/// One pruned call's context: the data (and its rows in f64), the path, t and the
/// (uncentred) queries.
struct Call<'a> {
    ds: &'a Dataset,
    samples: &'a [Vec<f64>],
    path: Path,
    t: f32,
    x: &'a [f32],
}

impl Call<'_> {
    /// Checks the call `pruned` just made on `batch` (posterior `p`): per query, the mean
    /// as close to the f64 reference as `dense`'s, and the certificate against the mass it
    /// truly left out. Returns how many queries left any out.
    fn check(
        &self,
        dense: &mut CpuBackend<'_>,
        pruned: &CpuBackend<'_>,
        batch: &CentredBatch<'_>,
        p: &Posterior,
        what: &str,
    ) -> usize {
        let (ds, dim) = (self.ds, self.ds.dim());
        let d = dense.posterior(batch).unwrap();
        let rounding = logit_rounding_effect(ds, batch);
        let mut left_out = 0;
        for (q, w) in reference::posterior_f64(ds, batch).iter().enumerate() {
            let what = format!("{what} query {q} ({:?})", pruned.last_pass());
            let span = q * dim..(q + 1) * dim;
            let dense_q = &d.mean[span.clone()];
            assert_as_close_as_dense(&p.mean[span.clone()], dense_q, &w.mean, rounding[q], &what);
            let kept = &pruned.kept_rows()[q];
            let rows = batch.rows.clone();
            let xq = &self.x[span];
            let skipped = left_out_mass(self.samples, rows, kept, self.path, self.t, xq);
            assert_certifies(skipped, p.stats[q].skipped_mass_bound as f64, &what);
            left_out += (skipped > 0.0) as usize;
        }
        left_out
    }
}

/// Euler trajectories of 12 queries in 25 steps, for rectified flow and VP cosine, on
/// every row and on class 1: every pruned call against dense and f64, and its
/// certificates; both anchored passes must have run.
#[test]
fn anchored_passes_along_trajectories_equal_dense_reference_and_certificates() {
    let mut passes = Vec::new();
    let mut checked = 0usize;
    for (name, ds) in pruning_datasets() {
        let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
        for (i, path) in [Path::RectifiedFlow, Path::VpCosine]
            .into_iter()
            .enumerate()
        {
            for class in [None, Some(1)] {
                let rows = ds.rows_for(class).unwrap();
                let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
                pruned.record_kept_rows(true);
                let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
                let shape = (12, 25, 40 + i as u64);
                trajectory(
                    &mut pruned,
                    &ds,
                    path,
                    rows.clone(),
                    shape,
                    |t, x, batch, p, be| {
                        let pass = be.last_pass();
                        passes.push(pass);
                        if pass == Pass::Dense {
                            return;
                        }
                        let what = format!("{name} {} class {class:?} t={t}", path.name());
                        let call = Call {
                            ds: &ds,
                            samples: &samples,
                            path,
                            t,
                            x,
                        };
                        checked += call.check(&mut dense, be, batch, p, &what);
                    },
                );
            }
        }
    }
    eprintln!("{checked} queries left mass out");
    assert!(checked >= 20, "only {checked} queries left any mass out");
    assert_took(&passes, Pass::SparseAnchored, 4);
    assert_took(&passes, Pass::ProjectedAnchored, 4);
}

/// A trajectory's bits depend on its own calls only: after another trajectory (whose
/// anchors the new one's t = 0 call forgets), every call gives the same bits as on a
/// fresh backend. This is what makes a sampler's batches, and a resumed run, reproducible.
#[test]
fn a_trajectory_does_not_depend_on_the_one_before() {
    let ds = oracleflow::dataset::load("embedded@1500", oracleflow::dataset::Dtype::F32).unwrap();
    let path = Path::RectifiedFlow;
    let rows = 0..ds.n_samples();
    let run = |backend: &mut CpuBackend<'_>, seed: u64| {
        let mut out = Vec::new();
        trajectory(
            backend,
            &ds,
            path,
            rows.clone(),
            (12, 25, seed),
            |_, _, _, p, be| {
                out.push((p.mean.clone(), p.stats.clone(), be.last_pass()));
            },
        );
        out
    };
    let mut fresh = CpuBackend::with_options(&ds, CpuOptions { prune: true });
    let want = run(&mut fresh, 5);
    let mut used = CpuBackend::with_options(&ds, CpuOptions { prune: true });
    run(&mut used, 6);
    let got = run(&mut used, 5);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "call {k}");
    }
    let passes: Vec<Pass> = want.iter().map(|c| c.2).collect();
    eprintln!("{passes:?}");
    let anchored = passes
        .iter()
        .filter(|p| matches!(p, Pass::SparseAnchored | Pass::ProjectedAnchored));
    assert!(anchored.count() >= 4, "too few anchored calls");
}

/// A guided sampler's calls: every step on all rows and on class 1, with one backend (its
/// anchors serve row ranges inside theirs; a row remembered from one range must not seed
/// the other). Each call against dense and f64, and its certificate.
#[test]
fn anchored_calls_on_alternating_row_ranges() {
    let mut anchored = 0usize;
    for (name, ds) in pruning_datasets().into_iter().skip(1) {
        let dim = ds.dim();
        let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
        let path = Path::RectifiedFlow;
        let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        pruned.record_kept_rows(true);
        let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
        let (b, steps) = (12usize, 25usize);
        let mut x = normal(&mut rng(77), b * dim);
        for k in 0..steps {
            let t = k as f32 / steps as f32;
            let (xc, coefs) = centred(&ds, path, &x, t);
            let mut whole = Vec::new();
            for class in [None, Some(1)] {
                let rows = ds.rows_for(class).unwrap();
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: rows.clone(),
                };
                let p = pruned.posterior(&batch).unwrap();
                let pass = pruned.last_pass();
                anchored += matches!(pass, Pass::SparseAnchored | Pass::ProjectedAnchored) as usize;
                if pass != Pass::Dense {
                    let call = Call {
                        ds: &ds,
                        samples: &samples,
                        path,
                        t,
                        x: &x,
                    };
                    call.check(
                        &mut dense,
                        &pruned,
                        &batch,
                        &p,
                        &format!("{name} class {class:?} t={t}"),
                    );
                }
                if class.is_none() {
                    whole = p.mean;
                }
            }
            let (va, vb) = path.coefs(t as f64).velocity_coefs();
            for (at, xv) in x.iter_mut().enumerate() {
                let hat = whole[at] as f64 + ds.mean()[at % dim] as f64;
                *xv = (*xv as f64 + (va * hat + vb * *xv as f64) / steps as f64) as f32;
            }
        }
    }
    eprintln!("{anchored} anchored calls");
    assert!(anchored >= 8, "only {anchored} anchored calls");
}

/// A stale anchor's remembered rows seed the projected pass's lower bounds
/// (`Anchors::find_any`): after a trajectory's anchored calls, batches of unrelated
/// queries (the same count, the same rows) late on the path find the anchor stale, and
/// the rows it remembers (the trajectory's maxima, then the last batch's) seed them. Any
/// computed logit is a lower bound: every such call against dense, f64 and its
/// certificate.
#[test]
fn a_stale_anchors_rows_seed_unrelated_queries() {
    let ds = oracleflow::dataset::load("embedded@1500", oracleflow::dataset::Dtype::F32).unwrap();
    let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
    let path = Path::RectifiedFlow;
    let rows = 0..ds.n_samples();
    let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
    pruned.record_kept_rows(true);
    let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
    let mut anchored = 0;
    trajectory(
        &mut pruned,
        &ds,
        path,
        rows.clone(),
        (12, 25, 40),
        |_, _, _, _, be| {
            anchored += matches!(be.last_pass(), Pass::ProjectedAnchored) as usize;
        },
    );
    assert!(
        anchored >= 2,
        "the trajectory made {anchored} anchored projected calls"
    );
    let mut seeded = 0;
    for (i, t) in [0.8f32, 0.85, 0.9, 0.95].into_iter().enumerate() {
        // Noisy training rows, as a trajectory's states late on the path.
        let c = path.coefs(t as f64);
        let mut r = rng(90 + i as u64);
        let mut x = Vec::new();
        for _ in 0..12 {
            let y = ds.sample_f64(r.random_range(0..ds.n_samples()));
            let eps = normal(&mut r, y.len());
            x.extend(
                y.iter()
                    .zip(&eps)
                    .map(|(y, e)| (c.alpha * y + c.sigma * *e as f64) as f32),
            );
        }
        let (xc, coefs) = centred(&ds, path, &x, t);
        let batch = CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: rows.clone(),
        };
        let p = pruned.posterior(&batch).unwrap();
        if pruned.last_pass() != Pass::Projected {
            continue;
        }
        seeded += 1;
        let call = Call {
            ds: &ds,
            samples: &samples,
            path,
            t,
            x: &x,
        };
        call.check(&mut dense, &pruned, &batch, &p, &format!("unrelated t={t}"));
    }
    assert!(
        seeded >= 3,
        "only {seeded} calls took the projected pass after the anchor"
    );
}

/// Separate calls on one oracle (the Python binding's): after `forget_history` a call
/// gives the bits of a fresh oracle, where the anchor its predecessor left would change
/// which pairs it computes. Noise queries at t = 0.3 (on a Zen 5 CPU the second of two
/// identical calls ran anchored and moved x1_hat by 9e-6), and later t.
#[test]
fn forgetting_history_gives_a_fresh_oracles_bits() {
    use oracleflow::oracle::{BackendKind, Oracle, Query, Times};
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let ds = oracleflow::dataset::load("embedded", oracleflow::dataset::Dtype::F32).unwrap();
    let dim = ds.dim();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f32> = (0..40 * dim)
        .map(|_| {
            let v: f64 = rand_distr::StandardNormal.sample(&mut rng);
            v as f32
        })
        .collect();
    let mut used = Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap();
    for t in [0.3f32, 0.35, 0.5, 0.8] {
        let query = Query {
            x: &x,
            t: Times::Scalar(t),
            class: None,
        };
        let mut fresh = Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap();
        let want = fresh.evaluate(&query).unwrap();
        // (the same call twice on one oracle: the first leaves its anchor)
        used.evaluate(&query).unwrap();
        used.forget_history();
        let got = used.evaluate(&query).unwrap();
        assert!(got.velocity == want.velocity, "t = {t}: velocity");
        assert!(got.x1_hat == want.x1_hat, "t = {t}: x1_hat");
        used.forget_history();
    }
}
