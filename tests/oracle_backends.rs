//! Every fast backend against the f64 reference, through the public `Oracle` API.
//! One suite, instantiated per backend (`cpu`, `gpu`) by the macro at the bottom.
//!
//! Tolerances (relative L2 error of the velocity and of x1_hat against f64):
//! - 1e-4 for t <= 0.95 in f32 and f16 storage. f16 storage is held to the same bound
//!   because the reference reads the same f16-rounded (centred) values: storage precision
//!   is a property of the dataset, not an error of the kernels; accumulation is f32 either way.
//! - 2e-4 for 0.95 < t <= 0.99 (measured worst 3.9e-5: rf, f16, N=1000, D=3, t=0.99).
//!   The logits are c_dot * x.y - c_norm |y|^2 with
//!   c_dot = alpha / sigma^2 (9900 at t = 0.99 for rectified flow); the f32 dot product
//!   carries an absolute error of about eps * |x||y| * sqrt(D), so the logit error grows as
//!   1/sigma^2 and the softmax weights of near neighbours move by that much. The velocity
//!   also divides by sigma, amplifying x1_hat's rounding.
//!
//! Stats (top-1 weight, entropy, ESS): relative error at most 10x the velocity tolerance
//! (entropy relative to max(H, 1e-2)); measured worst 7.2e-4 (rf, N=1000, D=3, t=0.97).
//!
//! Top-1 index: equal, except where the reference's best and second logits are closer than
//! the logit rounding bound above (a true near-tie).

mod common;

use common::*;
use oracleflow::dataset::{Dataset, Dtype, RawRows, SampleShape};
use oracleflow::oracle::reference;
use oracleflow::oracle::{BackendKind, Oracle, Query, Times};
use oracleflow::Path;

const TIMES: [f32; 10] = [0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.97, 0.99];

fn tolerance(t: f32) -> f64 {
    if t <= 0.95 {
        1e-4
    } else {
        2e-4
    }
}

/// Compares one evaluation with the reference; returns (velocity error, x1_hat error).
fn check(oracle: &mut Oracle, x: &[f32], t: f32, class: Option<u32>, what: &str) -> (f64, f64) {
    let ds = oracle.dataset();
    let path = oracle.path();
    let q = Query {
        x,
        t: Times::Scalar(t),
        class,
    };
    let got = oracle.evaluate(&q).unwrap();
    let want = reference::evaluate_f64(ds, path, &q, ds.rows_for(class).unwrap());
    let ev = rel_err(&got.velocity, &want.velocity);
    let eh = rel_err(&got.x1_hat, &want.x1_hat);
    let tol = tolerance(t);
    assert!(
        got.velocity
            .iter()
            .chain(&got.x1_hat)
            .all(|v| v.is_finite()),
        "{what} t={t}: non-finite output"
    );
    assert!(
        ev <= tol && eh <= tol,
        "{what} t={t}: velocity err {ev:.2e}, x1_hat err {eh:.2e} > {tol:.0e}"
    );

    let d = ds.dim();
    let (c_dot, _) = path.coefs(t as f64).logit_coefs();
    let y_max = (0..ds.n_samples())
        .map(|r| ds.sq_norms()[r].sqrt() as f64)
        .fold(0.0, f64::max);
    let mut worst_stat = 0.0f64;
    for (i, (g, w)) in got.stats.iter().zip(&want.stats).enumerate() {
        let xn = x[i * d..(i + 1) * d]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let rounding = 1e-5 * (c_dot * (xn + y_max) * y_max * (d as f64).sqrt() + 1.0);
        if want.top2_gap[i] > rounding {
            assert_eq!(
                g.top1_index, w.top1_index,
                "{what} t={t} query {i}: top-1 index"
            );
        }
        // Held relative (a top-1 weight of 4e-4 must not pass at 1e-2 off): 10x the
        // velocity tolerance, since the weights carry the logit rounding once more
        // (exp of the logit error) and the sums are over up to N terms. Entropy can be 0
        // (one sample takes all), so it is relative to max(H, 1e-2).
        let stat_tol = 10.0 * tol;
        let rel = |a: f32, b: f64, floor: f64| (a as f64 - b).abs() / b.abs().max(floor);
        let (e_top1, e_ent, e_ess) = (
            rel(g.top1_weight, w.top1_weight as f64, 0.0),
            rel(g.entropy, w.entropy as f64, 1e-2),
            rel(g.ess, w.ess as f64, 0.0),
        );
        assert!(
            e_top1 <= stat_tol && e_ent <= stat_tol && e_ess <= stat_tol,
            "{what} t={t} q{i}: relative errors top-1 weight {e_top1:.1e} ({} vs {}), \
             entropy {e_ent:.1e} ({} vs {}), ESS {e_ess:.1e} ({} vs {}) > {stat_tol:.0e}",
            g.top1_weight,
            w.top1_weight,
            g.entropy,
            w.entropy,
            g.ess,
            w.ess
        );
        worst_stat = worst_stat.max(e_top1).max(e_ent).max(e_ess);
    }
    eprintln!("{what} t={t}: worst relative stat error {worst_stat:.1e}");
    (ev, eh)
}

/// Random Gaussian data, sizes that are not multiples of any tile, both paths, both dtypes.
pub fn random_sweep(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let cases = [
        (1, 1, 1),
        (2, 5, 3),
        (37, 13, 7),
        (300, 67, 33),
        (1000, 3, 70),
        (2500, 100, 19),
        (1500, 784, 5),
    ];
    for dtype in [Dtype::F32, Dtype::F16] {
        for (seed, &(n, d, b)) in cases.iter().enumerate() {
            let ds = gaussian_dataset(n, d, seed as u64, dtype);
            for path in [Path::RectifiedFlow, Path::VpCosine] {
                let mut oracle = Oracle::new(&ds, path, kind).unwrap();
                let (mut worst_strict, mut worst_late) = (0.0f64, 0.0f64);
                for (k, &t) in TIMES.iter().enumerate() {
                    let x = path_queries(&ds, path, t, b, 1000 + k as u64);
                    let what = format!("{kind:?} {dtype:?} {} N={n} D={d} B={b}", path.name());
                    let (ev, eh) = check(&mut oracle, &x, t, None, &what);
                    let e = ev.max(eh);
                    if t <= 0.95 {
                        worst_strict = worst_strict.max(e);
                    } else {
                        worst_late = worst_late.max(e);
                    }
                }
                eprintln!(
                    "max rel err {kind:?} {dtype:?} {:>9} N={n:<5} D={d:<4} B={b:<3}: t<=0.95 {worst_strict:.2e}, t in (0.95,0.99] {worst_late:.2e}",
                    path.name()
                );
            }
        }
    }
}

/// Per-query times in one batch equal separate scalar-time calls.
pub fn per_query_times(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(200, 30, 7, Dtype::F32);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    let times: Vec<f32> = (0..12).map(|i| i as f32 / 12.0).collect();
    let x = path_queries(&ds, Path::RectifiedFlow, 0.5, times.len(), 3);
    let q = Query {
        x: &x,
        t: Times::PerQuery(&times),
        class: None,
    };
    let got = oracle.evaluate(&q).unwrap();
    let want = reference::evaluate_f64(&ds, Path::RectifiedFlow, &q, 0..200);
    assert!(rel_err(&got.velocity, &want.velocity) <= 1e-4);
}

/// Real Fashion-MNIST (3000 training images), unconditional and class-conditional; the
/// class-conditional oracle equals the oracle over a dataset of that class alone.
pub fn fashion_mnist(kind: BackendKind) {
    if !enabled(kind) || common::fashion_mnist().is_none() {
        return;
    }
    let ds = oracleflow::dataset::load("fashion-mnist@3000", Dtype::F32).unwrap();
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for (k, &t) in [0.0f32, 0.2, 0.5, 0.8, 0.95].iter().enumerate() {
        let x = path_queries(&ds, Path::RectifiedFlow, t, 16, 50 + k as u64);
        let (ev, eh) = check(&mut oracle, &x, t, None, &format!("{kind:?} fashion-mnist"));
        let (cv, ch) = check(
            &mut oracle,
            &x,
            t,
            Some(3),
            &format!("{kind:?} fashion-mnist class 3"),
        );
        eprintln!(
            "fashion-mnist {kind:?} t={t}: rel err {:.2e}, class 3: {:.2e}",
            ev.max(eh),
            cv.max(ch)
        );
    }

    // The class subset as a dataset of its own.
    let rows = ds.rows_for(Some(3)).unwrap();
    let vals: Vec<f32> = rows.clone().flat_map(|r| ds.sample(r)).collect();
    let sub = Dataset::from_raw(
        "class 3",
        ds.shape.clone(),
        RawRows::F32(&vals),
        None,
        Dtype::F32,
    )
    .unwrap();
    let mut sub_oracle = Oracle::new(&sub, Path::RectifiedFlow, kind).unwrap();
    for t in [0.3f32, 0.9] {
        let x = path_queries(&ds, Path::RectifiedFlow, t, 8, 77);
        let cond = oracle
            .evaluate(&Query {
                x: &x,
                t: Times::Scalar(t),
                class: Some(3),
            })
            .unwrap();
        let alone = sub_oracle
            .evaluate(&Query {
                x: &x,
                t: Times::Scalar(t),
                class: None,
            })
            .unwrap();
        let alone64: Vec<f64> = alone.velocity.iter().map(|&v| v as f64).collect();
        assert!(
            rel_err(&cond.velocity, &alone64) <= 1e-4,
            "class-conditional differs from class subset at t={t}"
        );
        for (c, a) in cond.stats.iter().zip(&alone.stats) {
            // Subset indices are positions within the class; map them back.
            assert_eq!(
                c.top1_index,
                ds.original_index(rows.start + a.top1_index as usize)
            );
        }
    }
}

/// N = 1: the rectified-flow velocity is exactly (y - x) / (1 - t).
pub fn single_sample(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(1, 50, 11, Dtype::F32);
    let y = ds.sample_f64(0);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for t in [0.0f32, 0.4, 0.9, 0.99] {
        let x = normal(&mut rng(5), 3 * 50);
        let out = oracle
            .evaluate(&Query {
                x: &x,
                t: Times::Scalar(t),
                class: None,
            })
            .unwrap();
        let want: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(k, &xv)| (y[k % 50] - xv as f64) / (1.0 - t as f64))
            .collect();
        assert!(rel_err(&out.velocity, &want) <= 1e-6, "N=1 t={t}");
        for s in &out.stats {
            assert_eq!((s.top1_weight, s.top1_index, s.ess), (1.0, 0, 1.0));
            assert!(s.entropy.abs() < 1e-6);
        }
    }
}

/// Closed forms written here, not taken from `Path::coefs`: VP-cosine with N = 1 (the
/// velocity along x_t = alpha y + sigma x0 is alpha' y + sigma' x0), and N = 2 on both paths
/// (the posterior is a logistic function of the two squared distances).
pub fn closed_forms(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    use std::f64::consts::FRAC_PI_2;
    let (d, seed) = (37, 21);
    let one = gaussian_dataset(1, d, seed, Dtype::F32);
    let y = one.sample_f64(0);
    let mut oracle = Oracle::new(&one, Path::VpCosine, kind).unwrap();
    for t in [0.05f64, 0.3, 0.6, 0.9, 0.99] {
        let (alpha, sigma) = ((FRAC_PI_2 * t).sin(), (FRAC_PI_2 * t).cos());
        let (d_alpha, d_sigma) = (FRAC_PI_2 * sigma, -FRAC_PI_2 * alpha);
        let x0: Vec<f64> = normal(&mut rng(3), d).iter().map(|&v| v as f64).collect();
        let x: Vec<f32> = (0..d)
            .map(|k| (alpha * y[k] + sigma * x0[k]) as f32)
            .collect();
        // The f32 rounding of x moves the exact velocity by B (x_f32 - x), B = sigma'/sigma.
        let want: Vec<f64> = (0..d)
            .map(|k| {
                d_alpha * y[k]
                    + d_sigma * x0[k]
                    + d_sigma / sigma * (x[k] as f64 - (alpha * y[k] + sigma * x0[k]))
            })
            .collect();
        let got = oracle
            .evaluate(&Query {
                x: &x,
                t: Times::Scalar(t as f32),
                class: None,
            })
            .unwrap();
        let err = rel_err(&got.velocity, &want);
        assert!(err <= 1e-5, "{kind:?} vp-cosine N=1 t={t}: {err:.1e}");
    }

    let two = gaussian_dataset(2, d, seed + 1, Dtype::F32);
    let (y0, y1) = (two.sample_f64(0), two.sample_f64(1));
    for path in [Path::RectifiedFlow, Path::VpCosine] {
        let mut oracle = Oracle::new(&two, path, kind).unwrap();
        for t in [0.1f64, 0.4, 0.7] {
            let (alpha, sigma) = match path {
                Path::RectifiedFlow => (t, 1.0 - t),
                Path::VpCosine => ((FRAC_PI_2 * t).sin(), (FRAC_PI_2 * t).cos()),
            };
            let x: Vec<f32> = normal(&mut rng(8), d).iter().map(|v| v * 0.3).collect();
            let d2 = |y: &[f64]| -> f64 {
                x.iter()
                    .zip(y)
                    .map(|(&a, b)| (a as f64 - alpha * b).powi(2))
                    .sum()
            };
            let w0 = 1.0 / (1.0 + ((d2(&y0) - d2(&y1)) / (2.0 * sigma * sigma)).exp());
            let hat: Vec<f64> = (0..d).map(|k| w0 * y0[k] + (1.0 - w0) * y1[k]).collect();
            let got = oracle
                .evaluate(&Query {
                    x: &x,
                    t: Times::Scalar(t as f32),
                    class: None,
                })
                .unwrap();
            let err = rel_err(&got.x1_hat, &hat);
            assert!(err <= 1e-5, "{kind:?} {path:?} N=2 t={t}: x1_hat {err:.1e}");
            let top1 = w0.max(1.0 - w0);
            let e_top1 = (got.stats[0].top1_weight as f64 - top1).abs() / top1;
            assert!(
                e_top1 <= 1e-5,
                "{kind:?} {path:?} N=2 t={t}: top-1 {e_top1:.1e}"
            );
        }
    }
}

/// The class-conditional oracle equals the oracle over the rows the test itself picks by
/// label (labels scattered over the source order, so class rows are not contiguous there),
/// and its top-1 index maps back to the source index.
pub fn class_rows_by_label_filter(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let (n, d) = (301, 19);
    let vals = normal(&mut rng(31), n * d);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 4).collect();
    let ds = Dataset::from_raw(
        "labelled",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        Some(labels.clone()),
        Dtype::F32,
    )
    .unwrap();
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for class in 0..4u32 {
        let members: Vec<usize> = (0..n).filter(|&i| labels[i] == class).collect();
        let sub_vals: Vec<f32> = members
            .iter()
            .flat_map(|&i| vals[i * d..(i + 1) * d].iter().copied())
            .collect();
        let sub = Dataset::from_raw(
            "class",
            SampleShape::array(vec![d]),
            RawRows::F32(&sub_vals),
            None,
            Dtype::F32,
        )
        .unwrap();
        let mut sub_oracle = Oracle::new(&sub, Path::RectifiedFlow, kind).unwrap();
        for t in [0.2f32, 0.8] {
            let x = path_queries(&sub, Path::RectifiedFlow, t, 9, 40 + class as u64);
            let q = |class| Query {
                x: &x,
                t: Times::Scalar(t),
                class,
            };
            let cond = oracle.evaluate(&q(Some(class))).unwrap();
            let alone = sub_oracle.evaluate(&q(None)).unwrap();
            let want =
                reference::evaluate_f64(&sub, Path::RectifiedFlow, &q(None), 0..members.len());
            let err = rel_err(&cond.velocity, &want.velocity);
            assert!(err <= 1e-4, "{kind:?} class {class} t={t}: {err:.1e}");
            for (c, a) in cond.stats.iter().zip(&alone.stats) {
                assert_eq!(
                    c.top1_index as usize, members[a.top1_index as usize],
                    "{kind:?} class {class} t={t}: top-1 index in source order"
                );
            }
        }
    }
    assert!(oracle
        .evaluate(&Query {
            x: &vals[..d],
            t: Times::Scalar(0.5),
            class: Some(9),
        })
        .is_err());
}

/// Past t = 0.99 up to t = 1 (sigma clamped at `MIN_SIGMA`): outputs stay finite and x1_hat
/// is the sample the query sits on. The velocity divides the f32 rounding of x1_hat - x by
/// sigma, so it is checked against the reference only up to t = 0.999 (at 1e-3 relative:
/// the logit rounding grows as 1/sigma^2, the velocity's as 1/sigma).
pub fn late_times(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(500, 24, 17, Dtype::F32);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for (k, &t) in [0.995f32, 0.999, 0.9999, 1.0].iter().enumerate() {
        let x = path_queries(&ds, Path::RectifiedFlow, t, 12, 60 + k as u64);
        let (got, want) = evaluate_with_f64(&mut oracle, &ds, &x, t);
        assert!(
            got.velocity
                .iter()
                .chain(&got.x1_hat)
                .all(|v| v.is_finite()),
            "{kind:?} t={t}: non-finite output"
        );
        let eh = rel_err(&got.x1_hat, &want.x1_hat);
        assert!(eh <= 1e-5, "{kind:?} t={t}: x1_hat {eh:.1e}");
        if t <= 0.999 {
            let ev = rel_err(&got.velocity, &want.velocity);
            assert!(ev <= 1e-3, "{kind:?} t={t}: velocity {ev:.1e}");
        }
        for (g, w) in got.stats.iter().zip(&want.stats) {
            assert_eq!(g.top1_index, w.top1_index, "{kind:?} t={t}");
        }
    }
}

/// Duplicated samples share their weight: x1_hat is unchanged and the top-1 weight halves.
pub fn duplicated_samples(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let base = gaussian_dataset(40, 20, 12, Dtype::F32);
    let vals: Vec<f32> = (0..40).flat_map(|r| base.sample(r)).collect();
    let twice: Vec<f32> = vals.iter().chain(&vals).copied().collect();
    let dup = Dataset::from_raw(
        "dup",
        SampleShape::array(vec![20]),
        RawRows::F32(&twice),
        None,
        Dtype::F32,
    )
    .unwrap();
    let single = Dataset::from_raw(
        "single",
        SampleShape::array(vec![20]),
        RawRows::F32(&vals),
        None,
        Dtype::F32,
    )
    .unwrap();
    let mut a = Oracle::new(&dup, Path::RectifiedFlow, kind).unwrap();
    let mut b = Oracle::new(&single, Path::RectifiedFlow, kind).unwrap();
    let t = 0.97;
    let x = path_queries(&single, Path::RectifiedFlow, t, 8, 9);
    let q = Query {
        x: &x,
        t: Times::Scalar(t),
        class: None,
    };
    let (oa, ob) = (a.evaluate(&q).unwrap(), b.evaluate(&q).unwrap());
    let ob64: Vec<f64> = ob.x1_hat.iter().map(|&v| v as f64).collect();
    assert!(rel_err(&oa.x1_hat, &ob64) <= 1e-4);
    for (sa, sb) in oa.stats.iter().zip(&ob.stats) {
        assert!((sa.top1_weight - sb.top1_weight / 2.0).abs() < 1e-3);
        assert!((sa.ess - 2.0 * sb.ess).abs() < 1e-2 * sb.ess);
        assert_eq!(
            sa.top1_index % 40,
            sb.top1_index,
            "top-1 is a copy of the same sample"
        );
        assert!(sa.top1_index < 40, "ties go to the first copy");
    }
}

/// Queries very far from all data: finite velocity (no 0/0), posterior on the extreme sample.
pub fn far_queries(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(500, 16, 13, Dtype::F32);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for scale in [1e3f32, 1e5] {
        let x: Vec<f32> = normal(&mut rng(21), 4 * 16)
            .iter()
            .map(|v| v * scale)
            .collect();
        for t in [0.0f32, 0.5, 0.99] {
            let q = Query {
                x: &x,
                t: Times::Scalar(t),
                class: None,
            };
            let out = oracle.evaluate(&q).unwrap();
            assert!(
                out.velocity
                    .iter()
                    .chain(&out.x1_hat)
                    .all(|v| v.is_finite()),
                "scale {scale} t={t}"
            );
            for s in &out.stats {
                assert!(s.top1_weight.is_finite() && s.entropy.is_finite() && s.ess.is_finite());
                assert!(s.top1_weight > 0.0 && s.top1_weight <= 1.0 + 1e-6 && s.ess >= 1.0 - 1e-4);
            }
            if scale == 1e3 {
                let want = reference::evaluate_f64(&ds, Path::RectifiedFlow, &q, 0..500);
                assert!(
                    rel_err(&out.x1_hat, &want.x1_hat) <= 1e-3,
                    "scale {scale} t={t}"
                );
            }
        }
    }
}

/// t = 0: every sample weighs 1/N, x1_hat is the dataset mean, entropy ln N, ESS N.
pub fn time_zero_is_uniform(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(777, 9, 14, Dtype::F32);
    let n = 777.0f64;
    let mean: Vec<f64> = (0..9)
        .map(|k| (0..777).map(|r| ds.sample_f64(r)[k]).sum::<f64>() / n)
        .collect();
    let mut oracle = Oracle::new(&ds, Path::VpCosine, kind).unwrap();
    let x = normal(&mut rng(1), 5 * 9);
    let out = oracle
        .evaluate(&Query {
            x: &x,
            t: Times::Scalar(0.0),
            class: None,
        })
        .unwrap();
    let want: Vec<f64> = (0..5).flat_map(|_| mean.clone()).collect();
    assert!(rel_err(&out.x1_hat, &want) <= 1e-5);
    for s in &out.stats {
        assert!((s.top1_weight as f64 - 1.0 / n).abs() < 1e-7);
        assert!((s.entropy as f64 - n.ln()).abs() < 1e-4);
        assert!((s.ess as f64 - n).abs() < 1e-2);
    }
}

/// A NaN or infinite query is refused with an error, never a panic or a NaN velocity.
pub fn non_finite_queries_are_refused(kind: BackendKind) {
    if !enabled(kind) {
        return;
    }
    let ds = gaussian_dataset(10, 4, 15, Dtype::F32);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let x = [0.0, 1.0, 2.0, 3.0, 0.0, bad, 0.0, 0.0];
        let err = oracle
            .evaluate(&Query {
                x: &x,
                t: Times::Scalar(0.5),
                class: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("query 1"), "{err}");
    }
}

macro_rules! backend_suite {
    ($name:ident, $kind:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn random_sweep_matches_reference() {
                random_sweep($kind);
            }
            #[test]
            fn per_query_times_match_scalar_calls() {
                per_query_times($kind);
            }
            #[test]
            fn fashion_mnist_matches_reference() {
                fashion_mnist($kind);
            }
            #[test]
            fn single_sample_is_exact() {
                single_sample($kind);
            }
            #[test]
            fn duplicated_samples_share_weight() {
                duplicated_samples($kind);
            }
            #[test]
            fn far_queries_stay_finite() {
                far_queries($kind);
            }
            #[test]
            fn time_zero_is_uniform_average() {
                time_zero_is_uniform($kind);
            }
            #[test]
            fn closed_forms_hold() {
                closed_forms($kind);
            }
            #[test]
            fn class_rows_equal_label_filter() {
                class_rows_by_label_filter($kind);
            }
            #[test]
            fn late_times_up_to_one() {
                late_times($kind);
            }
            #[test]
            fn non_finite_queries_are_refused_with_an_error() {
                non_finite_queries_are_refused($kind);
            }
        }
    };
}

backend_suite!(cpu, BackendKind::Cpu);
backend_suite!(gpu, BackendKind::Gpu);

#[test]
fn reference_refuses_non_finite_queries() {
    non_finite_queries_are_refused(BackendKind::Reference);
}

/// What f16 storage costs against the f32 dataset (a property of the data, not of a
/// kernel): x1_hat moves by about the f16 rounding of the pixels (2^-11 relative).
#[test]
fn f16_storage_against_f32_data() {
    if common::fashion_mnist().is_none() {
        return;
    }
    let f32_ds = oracleflow::dataset::load("fashion-mnist@2000", Dtype::F32).unwrap();
    let f16_ds = oracleflow::dataset::load("fashion-mnist@2000", Dtype::F16).unwrap();
    let mut a = Oracle::new(&f32_ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap();
    let mut b = Oracle::new(&f16_ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap();
    for t in [0.1f32, 0.5, 0.9, 0.99] {
        let x = path_queries(&f32_ds, Path::RectifiedFlow, t, 16, 5);
        let q = Query {
            x: &x,
            t: Times::Scalar(t),
            class: None,
        };
        let (oa, ob) = (a.evaluate(&q).unwrap(), b.evaluate(&q).unwrap());
        let hat64: Vec<f64> = oa.x1_hat.iter().map(|&v| v as f64).collect();
        let v64: Vec<f64> = oa.velocity.iter().map(|&v| v as f64).collect();
        let (eh, ev) = (rel_err(&ob.x1_hat, &hat64), rel_err(&ob.velocity, &v64));
        eprintln!("f16 vs f32 storage, fashion-mnist t={t}: x1_hat {eh:.1e}, velocity {ev:.1e}");
        assert!(eh <= 2e-3, "t={t}: x1_hat moved by {eh:.1e}");
    }
}
