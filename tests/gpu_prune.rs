//! Exact pruning on the gpu backend (whole tiles skipped for the batch): the same results
//! as the dense gpu pass and the f64 reference, a certificate that bounds the truly skipped
//! mass, the fallback to dense, and the CLI's `--exact-dense` and skip columns.
//!
//! Runs on whatever adapter wgpu picks (lavapipe on a machine without a GPU); skips with
//! one loud line when none exists, and fails instead under CI=true or
//! ORACLEFLOW_REQUIRE_GPU=1 (see `tests/common`). Sizes are small: lavapipe does a few
//! GFLOP/s.

mod common;

use std::process::Command;

use common::{centred, left_out_mass, path_queries, rel_err};
use oracleflow::dataset::{self, npy, Dataset, Dtype};
use oracleflow::oracle::cpu::CpuOptions;
use oracleflow::oracle::gpu::{GpuBackend, GpuOptions};
use oracleflow::oracle::{
    reference, Backend, BackendKind, CentredBatch, Oracle, Query, QueryStats, Times,
};
use oracleflow::Path;

fn gpu_oracle(ds: &Dataset, path: Path, exact_dense: bool) -> Oracle<'_> {
    Oracle::with_options(
        ds,
        path,
        BackendKind::Gpu,
        GpuOptions {
            exact_dense,
            ..Default::default()
        },
        CpuOptions::default(),
    )
    .unwrap_or_else(|e| panic!("no usable GPU adapter ({e})"))
}

const TIMES: [f32; 4] = [0.3, 0.6, 0.9, 0.99];

/// Pruned gpu vs dense gpu vs f64 over `TIMES`, both paths' first, classes, odd batches;
/// returns how many evaluations skipped tiles.
fn compare(name: &str, ds: &Dataset, paths: &[Path], batches: &[usize]) -> usize {
    let mut pruned_evals = 0;
    for &path in paths {
        let mut pruned = gpu_oracle(ds, path, false);
        let mut dense = gpu_oracle(ds, path, true);
        assert!(
            pruned.describe().contains("exact pruning ("),
            "{}",
            pruned.describe()
        );
        assert!(
            dense.describe().contains("exact dense"),
            "{}",
            dense.describe()
        );
        for (i, &t) in TIMES.iter().enumerate() {
            for class in [None, Some(1)] {
                let b = batches[i % batches.len()];
                let x = path_queries(ds, path, t, b, 300 + i as u64);
                let q = Query {
                    x: &x,
                    t: Times::Scalar(t),
                    class,
                };
                let p = pruned.evaluate(&q).unwrap();
                let d = dense.evaluate(&q).unwrap();
                let rows = ds.rows_for(class).unwrap();
                let want = reference::evaluate_f64(ds, path, &q, rows);
                let what = format!("{name} {} t={t} class={class:?} B={b}", path.name());
                let as64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
                // Within 1e-6 of dense, plus twice dense's own f32 error where that is
                // larger (as tests/prune.rs: two f32 results with independent rounding).
                for (got, den, truth, field) in [
                    (&p.velocity, &d.velocity, &want.velocity, "velocity"),
                    (&p.x1_hat, &d.x1_hat, &want.x1_hat, "x1_hat"),
                ] {
                    let vs_dense = rel_err(got, &as64(den));
                    let dense_err = rel_err(den, truth);
                    let ours_err = rel_err(got, truth);
                    assert!(
                        vs_dense <= 1e-6 + 2.0 * dense_err,
                        "{what} {field}: {vs_dense:.2e} from dense (dense vs f64 {dense_err:.2e})"
                    );
                    assert!(
                        ours_err <= 1e-6 + 2.0 * dense_err,
                        "{what} {field}: {ours_err:.2e} from f64, dense {dense_err:.2e}"
                    );
                }
                for ((sp, sd), sr) in p.stats.iter().zip(&d.stats).zip(&want.stats) {
                    assert!(
                        sp.skipped_mass_bound <= 2f32.powi(-30),
                        "{what}: certificate {:e}",
                        sp.skipped_mass_bound
                    );
                    assert_eq!(
                        (sd.skipped_mass_bound, sd.tiles_skipped, sd.samples_skipped),
                        (0.0, 0.0, 0.0),
                        "{what}: dense"
                    );
                    if sr.top1_weight > 0.6 {
                        assert_eq!(sp.top1_index, sr.top1_index, "{what}: top-1 row");
                        assert_eq!(sd.top1_index, sr.top1_index, "{what}: dense top-1 row");
                    }
                }
                let skipped = p.stats.iter().any(|s| s.tiles_skipped > 0.0);
                if skipped {
                    pruned_evals += 1;
                    let s: &QueryStats = &p.stats[0];
                    // Whole tiles only, the same for every query of the batch.
                    assert!(s.samples_skipped > 0.0, "{what}");
                    assert!(
                        p.stats.iter().all(|o| o.tiles_skipped == s.tiles_skipped
                            && o.samples_skipped == s.samples_skipped),
                        "{what}"
                    );
                }
                // A few queries from a few clusters: their union leaves most tiles out.
                if t >= 0.9 && name == "clustered" && class.is_none() {
                    assert!(skipped, "{what}: late t on clustered data skipped no tile");
                }
            }
        }
    }
    pruned_evals
}

#[test]
fn pruned_gpu_equals_dense_gpu_and_reference_clustered() {
    if common::skip_gpu() {
        return;
    }
    let ds = common::clustered_dataset(2400, Dtype::F32);
    let n = compare(
        "clustered",
        &ds,
        &[Path::RectifiedFlow, Path::VpCosine],
        &[3, 5],
    );
    eprintln!("clustered: {n} of 16 evaluations skipped tiles");
    assert!(n >= 4, "only {n} evaluations skipped tiles");
}

#[test]
fn pruned_gpu_equals_dense_gpu_and_reference_fashion_mnist() {
    if common::skip_gpu() {
        return;
    }
    // The embedded Fashion-MNIST images (always present), then the package's when there.
    let ds = dataset::load("embedded@1500", Dtype::F32).unwrap();
    // The batch's union of tiles: one query or three (64 random queries need nearly every
    // tile of Fashion-MNIST, and then run dense).
    let n = compare("embedded", &ds, &[Path::RectifiedFlow], &[1, 3]);
    eprintln!("embedded Fashion-MNIST: {n} of 8 evaluations skipped tiles");
    assert!(n >= 1, "only {n} evaluations skipped tiles");
    if common::fashion_mnist().is_some() {
        let ds = dataset::load("fashion-mnist@4000", Dtype::F32).unwrap();
        let n = compare("fashion-mnist", &ds, &[Path::RectifiedFlow], &[1, 3]);
        eprintln!("Fashion-MNIST train: {n} of 8 evaluations skipped tiles");
        assert!(n >= 1, "only {n} evaluations skipped tiles");
    }
}

#[test]
fn certificate_bounds_the_true_skipped_mass() {
    if common::skip_gpu() {
        return;
    }
    let mut checked = 0;
    for (name, ds) in [
        ("clustered", common::clustered_dataset(2400, Dtype::F32)),
        (
            "embedded",
            dataset::load("embedded@1500", Dtype::F32).unwrap(),
        ),
    ] {
        let mut backend = GpuBackend::with_options(&ds, GpuOptions::default()).unwrap();
        let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
        for path in [Path::RectifiedFlow, Path::VpCosine] {
            for t in [0.6f32, 0.8, 0.9, 0.99] {
                for class in [None, Some(2)] {
                    let x = path_queries(&ds, path, t, 7, 17);
                    let (xc, coefs) = centred(&ds, path, &x, t);
                    let rows = ds.rows_for(class).unwrap();
                    let post = backend
                        .posterior(&CentredBatch {
                            x: &xc,
                            logit_coefs: &coefs,
                            rows: rows.clone(),
                        })
                        .unwrap();
                    if !backend.last_was_pruned() {
                        continue;
                    }
                    let kept = backend.kept_rows();
                    let mut is_kept = vec![false; ds.n_samples()];
                    kept.iter().for_each(|&r| is_kept[r as usize] = true);
                    assert!(
                        kept.iter().all(|&r| rows.contains(&(r as usize))),
                        "{name}: kept rows outside the class"
                    );
                    let n_skipped = rows.clone().filter(|&r| !is_kept[r]).count();
                    for q in 0..coefs.len() {
                        let xq = &x[q * ds.dim()..(q + 1) * ds.dim()];
                        let skipped = left_out_mass(&samples, rows.clone(), &kept, path, t, xq);
                        let cert = post.stats[q].skipped_mass_bound as f64;
                        let what =
                            format!("{name} {} t={t} class={class:?} query {q}", path.name());
                        assert!(
                            skipped <= cert * (1.0 + 1e-3),
                            "{what}: true skipped mass {skipped:e} > certificate {cert:e}"
                        );
                        assert!(cert <= 2f64.powi(-30), "{what}: certificate {cert:e}");
                        let share = n_skipped as f32 / rows.len() as f32;
                        assert!(
                            (post.stats[q].samples_skipped - share).abs() < 1e-6,
                            "{what}: samples_skipped {} vs {share}",
                            post.stats[q].samples_skipped
                        );
                        checked += (n_skipped > 0) as usize;
                    }
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} queries had skipped rows");
}

#[test]
fn partial_state_carries_the_skip_counts() {
    if common::skip_gpu() {
        return;
    }
    let ds = common::clustered_dataset(2400, Dtype::F32);
    let mut backend = GpuBackend::with_options(&ds, GpuOptions::default()).unwrap();
    let path = Path::RectifiedFlow;
    let x = path_queries(&ds, path, 0.95, 5, 3);
    let (xc, coefs) = centred(&ds, path, &x, 0.95);
    let batch = CentredBatch {
        x: &xc,
        logit_coefs: &coefs,
        rows: 0..ds.n_samples(),
    };
    let part = backend.partial(&batch).unwrap();
    assert!(backend.last_was_pruned());
    let kept = backend.kept_rows().len() as u64;
    assert_eq!(part.samples_total, ds.n_samples() as u64);
    assert!(part.tiles_kept[0] < part.tiles_total);
    assert!(part.samples_kept.iter().all(|&k| k == kept));
    assert!(kept < part.samples_total);
    let post = backend.posterior(&batch).unwrap();
    let fin = part.finish();
    for (a, b) in fin.stats.iter().zip(&post.stats) {
        assert_eq!(a.tiles_skipped, b.tiles_skipped);
        assert_eq!(a.samples_skipped, b.samples_skipped);
        assert_eq!(a.top1_index, b.top1_index);
        let (ca, cb) = (a.skipped_mass_bound as f64, b.skipped_mass_bound as f64);
        assert!((ca - cb).abs() <= 1e-5 * cb.max(1e-300), "{ca:e} vs {cb:e}");
    }
    assert!(
        rel_err(
            &fin.mean,
            &post.mean.iter().map(|&v| v as f64).collect::<Vec<_>>()
        ) < 1e-6
    );
}

#[test]
fn unstructured_data_and_early_t_run_dense() {
    if common::skip_gpu() {
        return;
    }
    // Clustered data at t = 0 (alpha = 0: all logits equal) and at an early t.
    let ds = common::clustered_dataset(2400, Dtype::F32);
    let mut backend = GpuBackend::with_options(&ds, GpuOptions::default()).unwrap();
    let path = Path::RectifiedFlow;
    for t in [0.0f32, 0.05] {
        let x = path_queries(&ds, path, t, 7, 1);
        let (xc, coefs) = centred(&ds, path, &x, t);
        let post = backend
            .posterior(&CentredBatch {
                x: &xc,
                logit_coefs: &coefs,
                rows: 0..ds.n_samples(),
            })
            .unwrap();
        assert!(!backend.last_was_pruned(), "t = {t}");
        assert!(post.stats.iter().all(|s| s.tiles_skipped == 0.0));
    }
    // Isotropic Gaussians: no index at all (found at the first small late call).
    let ds = common::gaussian_dataset(1000, 400, 9, Dtype::F32);
    let mut backend = GpuBackend::with_options(&ds, GpuOptions::default()).unwrap();
    assert!(backend
        .describe()
        .contains("index is built at the first call"));
    let x = path_queries(&ds, path, 0.9, 3, 2);
    let (xc, coefs) = centred(&ds, path, &x, 0.9);
    backend
        .posterior(&CentredBatch {
            x: &xc,
            logit_coefs: &coefs,
            rows: 0..ds.n_samples(),
        })
        .unwrap();
    assert!(!backend.last_was_pruned());
    assert!(
        backend.describe().contains("exact pruning off"),
        "{}",
        backend.describe()
    );
}

fn oracleflow(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .env("ORACLEFLOW_TEST", "1")
        .output()
        .expect("run oracleflow")
}

#[test]
fn cli_velocity_writes_skip_columns_and_exact_dense_is_dense() {
    if common::skip_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset::load("embedded@2000", Dtype::F32).unwrap();
    let x = path_queries(&ds, Path::RectifiedFlow, 0.99, 1, 1);
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[1, 1, 28, 28], &x).unwrap();
    let want = reference::evaluate_f64(
        &ds,
        Path::RectifiedFlow,
        &Query {
            x: &x,
            t: Times::Scalar(0.99),
            class: None,
        },
        0..ds.n_samples(),
    );
    let mut skipped = Vec::new();
    for dense in [false, true] {
        let (v, s) = (
            dir.path().join(format!("v{dense}.npy")),
            dir.path().join(format!("s{dense}.csv")),
        );
        let mut args = vec![
            "velocity",
            "--data",
            "embedded@2000",
            "--queries",
            q.to_str().unwrap(),
            "--t",
            "0.99",
            "--out",
            v.to_str().unwrap(),
            "--stats",
            s.to_str().unwrap(),
            "--backend",
            "gpu",
        ];
        if dense {
            args.push("--exact-dense");
        }
        let o = oracleflow(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (_, got) = npy::read_npy_f32(&v).unwrap();
        assert!(rel_err(&got, &want.velocity) < 1e-4);
        let csv = std::fs::read_to_string(&s).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (cm, ct, cs) = (
            col("skipped_mass_bound"),
            col("tiles_skipped"),
            col("samples_skipped"),
        );
        let rows: Vec<Vec<f64>> = lines
            .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len(), 1);
        for r in &rows {
            assert!(r[cm] <= 2f64.powi(-30), "certificate {}", r[cm]);
            if dense {
                assert_eq!((r[cm], r[ct], r[cs]), (0.0, 0.0, 0.0), "--exact-dense");
            }
        }
        skipped.push(rows[0][ct]);
    }
    assert!(
        skipped[0] > 0.0,
        "t = 0.99 on Fashion-MNIST skipped no tile"
    );
}
