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
        let close = |a: f32, b: f32, rel: f32| (a - b).abs() <= rel * b.abs().max(1.0);
        assert!(
            close(g.top1_weight, w.top1_weight, 100.0 * tol as f32),
            "{what} t={t} q{i}: top-1 weight {} vs {}",
            g.top1_weight,
            w.top1_weight
        );
        assert!(
            close(g.entropy, w.entropy, 100.0 * tol as f32),
            "{what} t={t} q{i}: entropy {} vs {}",
            g.entropy,
            w.entropy
        );
        assert!(
            close(g.ess, w.ess, 100.0 * tol as f32),
            "{what} t={t} q{i}: ESS {} vs {}",
            g.ess,
            w.ess
        );
    }
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
