//! Exact pruning (cpu): same results as the dense pass and the f64 reference, a certificate
//! that bounds the truly skipped mass, the same samples, and the fallback to dense.

mod common;

use common::{centred, left_out_mass, path_queries, rel_err};
use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{
    reference, Backend, BackendKind, CentredBatch, Oracle, Query, QueryStats, Times,
};
use oracleflow::sample::{self, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::Path;

fn cpu(ds: &Dataset, path: Path, prune: bool) -> Oracle<'_> {
    Oracle::with_options(
        ds,
        path,
        BackendKind::Cpu,
        GpuOptions::default(),
        CpuOptions { prune },
    )
    .unwrap()
}

const TIMES: [f32; 8] = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 0.999];

#[test]
fn pruned_equals_dense_and_reference() {
    let mut pruned_evals = 0;
    let mut worst = 0.0f64;
    for (name, ds) in common::pruning_datasets() {
        for path in [Path::RectifiedFlow, Path::VpCosine] {
            let mut pruned = cpu(&ds, path, true);
            let mut dense = cpu(&ds, path, false);
            assert!(pruned.describe().contains("exact pruning"));
            assert!(dense.describe().contains("exact dense"));
            for (i, &t) in TIMES.iter().enumerate() {
                for class in [None, Some(1)] {
                    let x = path_queries(&ds, path, t, 12, 100 + i as u64);
                    let q = Query {
                        x: &x,
                        t: Times::Scalar(t),
                        class,
                    };
                    let p = pruned.evaluate(&q).unwrap();
                    let d = dense.evaluate(&q).unwrap();
                    let rows = ds.rows_for(class).unwrap();
                    let want = reference::evaluate_f64(&ds, path, &q, rows);
                    let what = format!("{name} {} t={t} class={class:?}", path.name());
                    let as64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
                    // Within 1e-6 of dense, plus twice dense's own f32 error where that is
                    // larger (two f32 results with independent rounding, e.g. the velocity
                    // (x1_hat - x) / sigma near t = 1): pruning adds nothing beyond rounding.
                    for (got, den, truth, field) in [
                        (&p.velocity, &d.velocity, &want.velocity, "velocity"),
                        (&p.x1_hat, &d.x1_hat, &want.x1_hat, "x1_hat"),
                    ] {
                        let vs_dense = rel_err(got, &as64(den));
                        let dense_err = rel_err(den, truth);
                        let ours_err = rel_err(got, truth);
                        worst = worst.max(vs_dense / (1e-6 + dense_err));
                        assert!(
                            vs_dense <= 1e-6 + 2.0 * dense_err,
                            "{what} {field}: {vs_dense:.2e} from dense (dense vs f64 {dense_err:.2e})"
                        );
                        assert!(
                            ours_err <= 1e-6 + 2.0 * dense_err,
                            "{what} {field}: {ours_err:.2e} from f64, dense {dense_err:.2e}"
                        );
                    }
                    // Stats as close to f64 as dense's, over the batch: f32 logits carry
                    // rounding of their magnitude, so the weights of both paths do too.
                    for field in [|s: &QueryStats| s.top1_weight, |s: &QueryStats| s.ess] {
                        let dev = |got: &[QueryStats]| {
                            got.iter()
                                .zip(&want.stats)
                                .map(|(g, r)| ((field(g) - field(r)) / field(r)).abs())
                                .fold(0.0f32, f32::max)
                        };
                        let (ep, ed) = (dev(&p.stats), dev(&d.stats));
                        assert!(
                            ep <= 2.0 * ed + 1e-6,
                            "{what}: stats {ep:.2e} vs dense {ed:.2e}"
                        );
                    }
                    for ((sp, sd), sr) in p.stats.iter().zip(&d.stats).zip(&want.stats) {
                        assert!(sp.skipped_mass_bound <= 2f32.powi(-30) * 1.001, "{what}");
                        if sr.top1_weight > 0.6 {
                            assert_eq!(sp.top1_index, sr.top1_index, "{what}");
                        }
                        assert_eq!(sd.samples_skipped, 0.0);
                    }
                    if p.stats.iter().any(|s| s.samples_skipped > 0.0) {
                        pruned_evals += 1;
                    }
                }
            }
        }
    }
    eprintln!("largest |pruned - dense| / (1e-6 + |dense - f64|): {worst:.3}");
    // The comparison above is only meaningful if pruning actually skipped samples.
    eprintln!("{pruned_evals} of 96 evaluations pruned");
    assert!(pruned_evals >= 8, "only {pruned_evals} evaluations pruned");
}

#[test]
fn certificate_bounds_the_true_skipped_mass() {
    // The projected pass itself (not only the sparse pass's drops) is among those checked.
    let pass = oracleflow::oracle::cpu::Pass::Projected;
    common::certificates_checked_on(&common::pruning_datasets(), &TIMES[2..], pass, 4);
}

#[test]
fn same_samples_from_the_same_seed() {
    let ds = dataset::load("embedded@1000", Dtype::F32).unwrap();
    let options = SampleOptions {
        init: None,
        schedule: Schedule::uniform(12),
        solver: Solver::Heun,
        seed: 11,
        classes: vec![None, Some(3), None, Some(7), None, None],
        guidance: None,
        batch: 6,
        tracked: vec![],
    };
    let run = |prune: bool| {
        let mut o = oracleflow::field::OracleField::new(cpu(&ds, Path::RectifiedFlow, prune));
        sample::sample(&mut o, &options, || {}).unwrap()
    };
    let (a, b, dense) = (run(true), run(true), run(false));
    assert_eq!(a.samples, b.samples, "pruned sampling is deterministic");
    let dense64: Vec<f64> = dense.samples.iter().map(|&v| v as f64).collect();
    let e = rel_err(&a.samples, &dense64);
    assert!(e <= 1e-6, "pruned vs dense samples: {e:.2e}");
    assert!(
        a.final_stats
            .iter()
            .flatten()
            .any(|s| s.samples_skipped > 0.5),
        "late steps were pruned"
    );
}

#[test]
fn unstructured_data_falls_back_to_dense() {
    // Isotropic Gaussians in 400 dimensions: no bound is tight at mid t.
    let ds = common::gaussian_dataset(1000, 400, 9, Dtype::F32);
    let mut backend = CpuBackend::with_options(&ds, CpuOptions { prune: true });
    let path = Path::RectifiedFlow;
    let x = path_queries(&ds, path, 0.3, 16, 1);
    let (xc, coefs) = centred(&ds, path, &x, 0.3);
    let post = backend
        .posterior(&CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: 0..ds.n_samples(),
        })
        .unwrap();
    assert!(!backend.last_was_pruned());
    assert!(post.stats.iter().all(|s| s.samples_skipped == 0.0));
    // t = 0: all logits equal, nothing can be skipped.
    let (xc, coefs) = centred(&ds, path, &x, 0.0);
    backend
        .posterior(&CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: 0..ds.n_samples(),
        })
        .unwrap();
    assert!(!backend.last_was_pruned());
}

/// The sparse pass (every logit, the weighted sum over the weights that can reach f32):
/// taken between the navigation stage and the point where the bounds skip logits, and the
/// projected pass (per-sample bounds of every pair from projection GEMMs) after it, on
/// clustered and real data, f32 and f16 storage, whole dataset and one class; the posterior
/// mean as close to the f64 reference as the dense pass's (1e-6 plus twice dense's own
/// error), the same top-1 sample, and a certificate within the budget that bounds the mass
/// it truly left out.
#[test]
fn sparse_and_projected_passes_equal_dense_and_reference() {
    use oracleflow::oracle::cpu::Pass;
    let (mut sparse_calls, mut screened_calls, mut projected_calls) = (0, 0, 0);
    let real = |dtype| dataset::load("embedded@1500", dtype).unwrap();
    for (name, ds) in [
        ("clustered", common::clustered_dataset(1200, Dtype::F32)),
        ("fashion-mnist", real(Dtype::F32)),
        ("fashion-mnist f16", real(Dtype::F16)),
    ] {
        let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        pruned.record_kept_rows(true);
        let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
        let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
        let path = Path::RectifiedFlow;
        for step in 0..19 {
            let t = 0.05 + 0.05 * step as f32;
            for class in [None, Some(2)] {
                let rows = ds.rows_for(class).unwrap();
                let x = path_queries(&ds, path, t, 12, 40 + step);
                let (xc, coefs) = centred(&ds, path, &x, t);
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: rows.clone(),
                };
                let p = pruned.posterior(&batch).unwrap();
                match pruned.last_pass() {
                    Pass::Sparse => sparse_calls += 1,
                    Pass::SparseScreened => screened_calls += 1,
                    Pass::Projected => projected_calls += 1,
                    _ => continue,
                }
                let d = dense.posterior(&batch).unwrap();
                let want = reference::posterior_f64(&ds, &batch);
                // The screened passes' logits are dot products, dense's a GEMM: where a
                // posterior is split between distant samples with large logits, the two
                // f32 orders alone move the mean by up to this much (see the low-dimension
                // test).
                let rounding = common::logit_rounding_effect(&ds, &batch);
                let what = format!("{name} t={t} class={class:?}");
                let dim = ds.dim();
                for (q, w) in want.iter().enumerate() {
                    let (got, den) = (
                        &p.mean[q * dim..(q + 1) * dim],
                        &d.mean[q * dim..(q + 1) * dim],
                    );
                    let query = format!("{what} query {q}");
                    common::assert_as_close_as_dense(got, den, &w.mean, rounding[q], &query);
                    if w.top1_weight > 0.6 {
                        assert_eq!(p.stats[q].top1_index as usize, w.top1_index, "{what}");
                    }
                    let cert = p.stats[q].skipped_mass_bound as f64;
                    assert!(cert <= 2f64.powi(-30), "{what}: certificate {cert:e}");
                    // The truly left-out mass, from f64 logits of the rows not kept.
                    let xq = &x[q * dim..(q + 1) * dim];
                    let kept = &pruned.kept_rows()[q];
                    let left = left_out_mass(&samples, rows.clone(), kept, path, t, xq);
                    assert!(
                        left <= cert * (1.0 + 1e-3),
                        "{what} query {q}: left out {left:e} > certificate {cert:e}"
                    );
                }
            }
        }
    }
    eprintln!(
        "{sparse_calls} calls took the sparse pass, {screened_calls} its screening in \
         reduced precision, {projected_calls} the projected pass"
    );
    assert!(
        projected_calls >= 4,
        "only {projected_calls} calls took the projected pass"
    );
    if let Some(kind) = oracleflow::oracle::prune::lowp::Kind::for_cpu() {
        assert!(
            screened_calls >= 4,
            "only {screened_calls} calls screened in {}",
            kind.name()
        );
    } else {
        eprintln!("SKIPPED: screening in reduced precision (this CPU has no kernel for it)");
    }
    // Where the CPU screens, from an estimated kept share of 0.16 (int16), few calls are
    // left to the f32 logits: both kinds together, and a few of these.
    assert!(
        sparse_calls >= 4 && sparse_calls + screened_calls >= 10,
        "only {sparse_calls} calls took the sparse pass, {screened_calls} screened"
    );
}

/// The late-t refinement (`oracle::refine`) from the rows a projected pass kept gives the
/// same posterior as from its own screen over the norm band: the same queries refined, the
/// same top-1, means within 1e-9 of each other and of f64 (the kept rows leave out at most
/// 2^-31 of the weight, the screen e^-30).
#[test]
fn refinement_from_kept_rows_equals_the_screens() {
    use oracleflow::oracle::refine::{refine_batch, Refiner};
    let real = dataset::load("embedded@1500", Dtype::F32).unwrap();
    let clustered = common::clustered_dataset(1200, Dtype::F32);
    let (mut with_kept, mut refined) = (0, 0);
    for (name, ds) in [("fashion-mnist", &real), ("clustered", &clustered)] {
        let mut pruned = CpuBackend::with_options(ds, CpuOptions { prune: true });
        let mut refiner = Refiner::new(ds);
        let path = Path::RectifiedFlow;
        let dim = ds.dim();
        for (i, &t) in [0.7f32, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999]
            .iter()
            .enumerate()
        {
            for class in [None, Some(2)] {
                let rows = ds.rows_for(class).unwrap();
                let x = path_queries(ds, path, t, 12, 70 + i as u64);
                let (xc, coefs) = centred(ds, path, &x, t);
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: rows.clone(),
                };
                let fast = pruned.posterior(&batch).unwrap();
                let Some(kept) = pruned.kept_candidates() else {
                    continue;
                };
                with_kept += 1;
                let what = format!("{name} t={t} class={class:?}");
                let path_coefs = vec![path.coefs(t as f64); x.len() / dim];
                let (mut a, mut b) = (fast.clone(), fast);
                let refine = |kept, post: &mut _, refiner: &mut Refiner| {
                    refine_batch(refiner, ds, &x, &path_coefs, &rows, kept, post).unwrap()
                };
                let (from_kept, n_kept) = refine(Some(kept), &mut a, &mut refiner);
                let (from_screen, n_screen) = refine(None, &mut b, &mut refiner);
                assert!(n_kept >= n_screen, "{what}: {n_kept} < {n_screen} refined");
                refined += n_screen;
                // (f64 at the queries as given: the backends got their centred f32
                // roundings, the refinement works from them in f64.)
                let query = Query {
                    x: &x,
                    t: Times::Scalar(t),
                    class,
                };
                let want = reference::evaluate_f64(ds, path, &query, rows.clone());
                for (q, (k, s)) in from_kept.iter().zip(&from_screen).enumerate() {
                    // (Where the screen let through too many rows, few kept rows may
                    // still be refined: then against f64 alone.)
                    let Some(k) = k else {
                        assert!(s.is_none(), "{what} query {q}: refined by the screen only");
                        continue;
                    };
                    let truth: Vec<f64> = want.x1_hat[q * dim..(q + 1) * dim]
                        .iter()
                        .zip(ds.mean())
                        .map(|(h, &m)| h - m as f64)
                        .collect();
                    let scale = truth.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
                    let others = [(s.as_ref(), "the screen's"), (Some(&truth), "f64")];
                    for (other, vs) in others.into_iter().filter_map(|(o, v)| Some((o?, v))) {
                        let diff = k
                            .iter()
                            .zip(other)
                            .map(|(u, v)| (u - v).powi(2))
                            .sum::<f64>()
                            .sqrt();
                        assert!(diff <= 1e-9 * scale, "{what} query {q}: {diff:e} from {vs}");
                    }
                    let (sa, sf) = (&a.stats[q], &want.stats[q]);
                    assert_eq!(ds.original_index(sa.top1_index as usize), sf.top1_index);
                    let (wa, wf) = (sa.top1_weight, sf.top1_weight);
                    assert!((wa - wf).abs() <= 1e-6, "{what} query {q}: {wa} {wf}");
                }
            }
        }
    }
    eprintln!("{with_kept} calls handed over their kept rows, {refined} queries refined");
    assert!(
        with_kept >= 8 && refined >= 40,
        "{with_kept} calls, {refined} queries"
    );
}

/// Without anchors (`CpuBackend::set_anchored`), a query's result does not depend on the
/// calls before it: the same states twice, around other calls, give the same bits, in
/// every pass the backend picks across t. (With anchors, a trajectory's bits depend on
/// its own calls only: tests/prune_anchor.rs.)
#[test]
fn results_do_not_depend_on_earlier_calls() {
    let ds = dataset::load("embedded@1500", Dtype::F32).unwrap();
    let path = Path::RectifiedFlow;
    let mut backend = CpuBackend::with_options(&ds, CpuOptions { prune: true });
    backend.set_anchored(false);
    let mut passes = std::collections::BTreeSet::new();
    for (i, t) in [0.1f32, 0.35, 0.45, 0.5, 0.6, 0.8, 0.95]
        .into_iter()
        .enumerate()
    {
        let x = path_queries(&ds, path, t, 12, 200 + i as u64);
        // The same states moved a little, evaluated in between (as a sampler's next call).
        let near: Vec<f32> = x.iter().map(|v| v + 1e-3).collect();
        let mut eval = |xs: &[f32]| {
            let (xc, coefs) = centred(&ds, path, xs, t);
            let p = backend
                .posterior(&CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: 0..ds.n_samples(),
                })
                .unwrap();
            (p, backend.last_pass())
        };
        let (first, pass) = eval(&x);
        eval(&near);
        let (again, _) = eval(&x);
        passes.insert(format!("{pass:?}"));
        assert_eq!(first.mean, again.mean, "t={t} ({pass:?})");
        assert_eq!(first.stats, again.stats, "t={t} ({pass:?})");
    }
    eprintln!("passes seen: {passes:?}");
    assert!(passes.len() >= 3, "only {passes:?}");
}

/// Low and odd dimensions (2-D toy data is common in flow-matching work; the projection
/// levels and bf16 panels are clipped or padded there): every pass against dense and f64.
/// Here the logits reach 1e3 and some posteriors are split between distant samples, so
/// the f32 rounding of the logits alone moves the mean by up to ~1e-5 (see
/// `logit_rounding_effect`): the screened passes' exact logits (dot products) and the
/// dense pass's (GEMM) then differ by that much, and the tolerance includes twice it.
#[test]
fn low_and_odd_dimensions_equal_dense_and_reference() {
    use oracleflow::dataset::{RawRows, SampleShape};
    let mut passes = std::collections::BTreeSet::new();
    let (mut worst, mut largest_rounding) = (0.0f64, 0.0f64);
    for dim in [1usize, 2, 3, 5, 8, 16, 17, 33, 65] {
        let (v, l) = dataset::synthetic::mixture_with(3000, dim, 8, 11, 3.0, 0.3);
        let shape = SampleShape::array(vec![dim]);
        let ds =
            Dataset::from_raw("mixture", shape, RawRows::F32(&v), Some(l), Dtype::F32).unwrap();
        let mut pruned = CpuBackend::with_options(&ds, CpuOptions { prune: true });
        let mut dense = CpuBackend::with_options(&ds, CpuOptions { prune: false });
        for (i, t) in [0.05f32, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999]
            .into_iter()
            .enumerate()
        {
            for class in [None, Some(2)] {
                let x = path_queries(&ds, Path::RectifiedFlow, t, 16, 5 + i as u64);
                let (xc, coefs) = centred(&ds, Path::RectifiedFlow, &x, t);
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: ds.rows_for(class).unwrap(),
                };
                let p = pruned.posterior(&batch).unwrap();
                let d = dense.posterior(&batch).unwrap();
                passes.insert(format!("{:?}", pruned.last_pass()));
                let want = reference::posterior_f64(&ds, &batch);
                let rounding = common::logit_rounding_effect(&ds, &batch);
                for (q, w) in want.iter().enumerate() {
                    let what = format!("dim {dim} t={t} class={class:?} query {q}");
                    let (ours, dense_err) = common::assert_as_close_as_dense(
                        &p.mean[q * dim..(q + 1) * dim],
                        &d.mean[q * dim..(q + 1) * dim],
                        &w.mean,
                        rounding[q],
                        &what,
                    );
                    worst = worst.max(ours / (1e-6 + 2.0 * dense_err));
                    largest_rounding = largest_rounding.max(rounding[q]);
                    let cert = p.stats[q].skipped_mass_bound;
                    assert!(
                        cert <= 2f32.powi(-30) * 1.001,
                        "{what}: certificate {cert:e}"
                    );
                }
            }
        }
    }
    eprintln!(
        "passes seen: {passes:?}; largest |ours - f64| / (1e-6 + 2 |dense - f64|): {worst:.2}, \
         largest rounding effect {largest_rounding:.1e}"
    );
    assert!(passes.len() >= 3, "only {passes:?}");
}
