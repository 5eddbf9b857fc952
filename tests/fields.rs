//! Velocity fields: the Gaussian field against its closed form, the external-process
//! protocol (agreement with the built-in Gaussian field, and each way a process can
//! misbehave), switching fields at a time, starting from given samples, and the
//! posterior variance against the f64 reference.

mod common;

use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Output};

use oracleflow::dataset::{npy, Dataset, Dtype, RawRows, SampleShape};
use oracleflow::field::{GaussianField, OracleField, SwitchField, VelocityField};
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::sample::{self, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::Path;

fn oracleflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .env("ORACLEFLOW_TEST", "1")
        .output()
        .expect("run oracleflow")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Whether python3 with numpy is here. CI sets ORACLEFLOW_REQUIRE_NUMPY=1 (after
/// installing numpy), so there a missing numpy fails instead of skipping.
fn have_numpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("ORACLEFLOW_REQUIRE_NUMPY").is_none(),
            "python3 with numpy is required (ORACLEFLOW_REQUIRE_NUMPY is set)"
        );
        eprintln!("skipped: python3 with numpy not found");
    }
    ok
}

/// N x D values with a full (non-diagonal) covariance and a non-zero mean: y = A z + b.
fn correlated(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = common::rng(seed);
    let a = common::normal(&mut r, d * d);
    let b = common::normal(&mut r, d);
    let z = common::normal(&mut r, n * d);
    (0..n)
        .flat_map(|i| {
            let z = &z[i * d..(i + 1) * d];
            let (a, b) = (&a, &b);
            (0..d).map(move |j| 0.3 * (0..d).map(|k| a[j * d + k] * z[k]).sum::<f32>() + b[j])
        })
        .collect()
}

fn dataset(vals: &[f32], d: usize, labels: Option<Vec<u32>>) -> Dataset {
    Dataset::from_raw(
        "correlated",
        SampleShape::array(vec![d]),
        RawRows::F32(vals),
        labels,
        Dtype::F32,
    )
    .unwrap()
}

/// Solves A z = v (A symmetric positive definite) by Gaussian elimination in f64.
fn solve(mut a: Vec<f64>, mut v: Vec<f64>) -> Vec<f64> {
    let d = v.len();
    for col in 0..d {
        let piv = (col..d)
            .max_by(|&i, &j| a[i * d + col].abs().total_cmp(&a[j * d + col].abs()))
            .unwrap();
        for k in 0..d {
            a.swap(col * d + k, piv * d + k);
        }
        v.swap(col, piv);
        for row in col + 1..d {
            let f = a[row * d + col] / a[col * d + col];
            for k in col..d {
                a[row * d + k] -= f * a[col * d + k];
            }
            v[row] -= f * v[col];
        }
    }
    let mut z = vec![0.0; d];
    for row in (0..d).rev() {
        let s: f64 = (row + 1..d).map(|k| a[row * d + k] * z[k]).sum();
        z[row] = (v[row] - s) / a[row * d + row];
    }
    z
}

/// The closed form, in f64: x1_hat = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu).
fn closed_form(ys: &[Vec<f64>], x: &[f64], alpha: f64, sigma: f64) -> Vec<f64> {
    let d = x.len();
    let n = ys.len() as f64;
    let mu: Vec<f64> = (0..d)
        .map(|j| ys.iter().map(|y| y[j]).sum::<f64>() / n)
        .collect();
    let mut cov = vec![0.0; d * d];
    for y in ys {
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] += (y[i] - mu[i]) * (y[j] - mu[j]) / n;
            }
        }
    }
    let mut m = cov.iter().map(|c| alpha * alpha * c).collect::<Vec<_>>();
    (0..d).for_each(|i| m[i * d + i] += sigma * sigma);
    let r: Vec<f64> = (0..d).map(|j| x[j] - alpha * mu[j]).collect();
    let z = solve(m, r);
    (0..d)
        .map(|i| mu[i] + alpha * (0..d).map(|k| cov[i * d + k] * z[k]).sum::<f64>())
        .collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn gaussian_field_matches_its_closed_form() {
    // Full rank (N > D) and rank-deficient (N < D), whole set and class-wise; both paths.
    for (n, d) in [(400, 12), (7, 12)] {
        let vals = correlated(n, d, 5);
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
        let ds = dataset(&vals, d, Some(labels.clone()));
        for path in [Path::RectifiedFlow, Path::VpCosine] {
            let mut field = GaussianField::new(&ds, path);
            let mut r = common::rng(11);
            for &t in &[0.0, 0.2, 0.6, 0.95] {
                for class in [None, Some(0u32), Some(1)] {
                    let x: Vec<f64> = common::normal(&mut r, 3 * d)
                        .iter()
                        .map(|&v| v as f64 * 1.5)
                        .collect();
                    let out = field.evaluate(&x, &[t; 3], &[class; 3]).unwrap();
                    assert!(out.stats.is_none());
                    let rows: Vec<Vec<f64>> = (0..n)
                        .filter(|&i| class.is_none_or(|c| labels[i] == c))
                        .map(|i| vals[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect())
                        .collect();
                    let c = path.coefs(t);
                    let (a, b) = c.velocity_coefs();
                    for q in 0..3 {
                        let xq = &x[q * d..(q + 1) * d];
                        let want = closed_form(&rows, xq, c.alpha, c.sigma);
                        let got = &out.x1_hat[q * d..(q + 1) * d];
                        // f32 storage of the data: ~1e-7 relative; eigen-solve in f64.
                        let e = rel(got, &want);
                        assert!(
                            e < 1e-5,
                            "N {n} {path:?} t {t} class {class:?}: x1_hat rel {e:e}"
                        );
                        let u: Vec<f64> = want.iter().zip(xq).map(|(h, x)| a * h + b * x).collect();
                        let e = rel(&out.velocity[q * d..(q + 1) * d], &u);
                        assert!(e < 1e-5, "velocity rel {e:e}");
                    }
                }
            }
        }
        // At t = 1 (sigma = 0) x1_hat is the projection of x onto the data's affine span:
        // x itself when Sigma has full rank.
        let mut field = GaussianField::new(&ds, Path::RectifiedFlow);
        let x: Vec<f64> = vals[..d].iter().map(|&v| v as f64).collect();
        let out = field.evaluate(&x, &[1.0], &[None]).unwrap();
        assert!(out.x1_hat.iter().all(|v| v.is_finite()));
        // A training sample lies in the span either way.
        assert!(
            rel(&out.x1_hat, &x) < 1e-5,
            "N {n}: t = 1 on a training sample"
        );
    }
}

fn write_data(dir: &FsPath, vals: &[f32], n: usize, d: usize) -> PathBuf {
    let p = dir.join("data.npy");
    npy::write_npy_f32(&p, &[n, d], vals).unwrap();
    p
}

fn read_samples(dir: &FsPath) -> Vec<f32> {
    npy::read_npy_f32(dir.join("samples.npy")).unwrap().1
}

#[test]
fn external_gaussian_example_matches_the_gaussian_field() {
    if !have_numpy() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (300, 16);
    let data = write_data(tmp.path(), &correlated(n, d, 3), n, d);
    let data_spec = format!("npy:{}", data.display());
    let ext = format!(
        "external:python3 {} {} --path vp-cosine",
        example("external_gaussian.py"),
        data.display()
    );
    let mut samples = Vec::new();
    for (name, field) in [("builtin", "gaussian"), ("external", ext.as_str())] {
        let out = tmp.path().join(name);
        let o = oracleflow(&[
            "sample",
            "--data",
            &data_spec,
            "--field",
            field,
            "--path",
            "vp-cosine",
            "-n",
            "10",
            "--steps",
            "12",
            "--solver",
            "heun",
            "--batch",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        samples.push(read_samples(&out));
    }
    // The external field's states and velocities cross the pipe as f32 (rounding ~6e-8
    // per evaluation); 24 evaluations stay far inside 1e-4.
    let a: Vec<f64> = samples[0].iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = samples[1].iter().map(|&v| v as f64).collect();
    let e = rel(&b, &a);
    assert!(e < 1e-4, "external vs builtin gaussian: rel {e:e}");
}

/// `velocity` with an external field that misbehaves: one line naming the command.
fn protocol_error(script: &str, timeout: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (20, 4);
    let data = write_data(tmp.path(), &correlated(n, d, 1), n, d);
    let q = tmp.path().join("q.npy");
    npy::write_npy_f32(&q, &[3, d], &[0.1; 12]).unwrap();
    let field = format!("external:{script}");
    let o = oracleflow(&[
        "velocity",
        "--data",
        &format!("npy:{}", data.display()),
        "--field",
        &field,
        "--field-timeout",
        timeout,
        "--queries",
        q.to_str().unwrap(),
        "--t",
        "0.5",
        "--out",
        tmp.path().join("v.npy").to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{script}: succeeded");
    assert!(!tmp.path().join("v.npy").exists());
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(lines[0].contains(script), "names the command: {err}");
    lines[0].to_string()
}

/// A stdlib-only python script that reads the request and answers with `reply` (bytes).
fn replying(reply: &str) -> String {
    format!(
        "python3 -c \"import sys,struct; sys.stdin.buffer.read(64); {reply}; sys.stdout.buffer.flush(); sys.stdin.buffer.read()\""
    )
}

/// A .npy of `descr` and `shape` with zero data, as python source for its bytes.
fn npy_bytes(descr: &str, shape: &str, n_bytes: usize) -> String {
    format!(
        "h=\\\"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\\\"; h=h+' '*(118-len(h))+chr(10); sys.stdout.buffer.write(b'\\\\x93NUMPY\\\\x01\\\\x00'+struct.pack('<H',len(h))+h.encode()+bytes({n_bytes}))"
    )
}

#[test]
fn external_protocol_errors_are_one_line() {
    let e = protocol_error("exit 3", "600");
    assert!(e.contains("exited") && e.contains('3'), "{e}");
    let e = protocol_error("echo this is not npy", "600");
    assert!(e.contains("not .npy"), "{e}");
    let e = protocol_error("sleep 30", "1");
    assert!(e.contains("no reply within 1 s"), "{e}");
    let e = protocol_error(&replying(&npy_bytes("<f4", "(3, 5)", 60)), "600");
    assert!(e.contains("shape [3, 5], expected [3, 4]"), "{e}");
    let e = protocol_error(&replying(&npy_bytes("<f8", "(3, 4)", 96)), "600");
    assert!(e.contains("dtype <f8, not float32"), "{e}");
}

fn options(n: usize, times: Vec<f64>) -> SampleOptions {
    SampleOptions {
        schedule: Schedule::Explicit(times),
        solver: Solver::Heun,
        seed: 4,
        classes: vec![None; n],
        guidance: None,
        batch: 8,
        tracked: vec![],
        init: None,
    }
}

#[test]
fn switching_at_the_ends_is_one_field_and_inside_splits_the_step() {
    let ds = dataset(&correlated(300, 10, 8), 10, None);
    let oracle = || -> Box<dyn VelocityField + '_> {
        Box::new(OracleField::new(
            Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap(),
        ))
    };
    let gaussian = || -> Box<dyn VelocityField + '_> {
        Box::new(GaussianField::new(&ds, Path::RectifiedFlow))
    };
    let opts = options(6, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    let alone =
        |mut f: Box<dyn VelocityField + '_>| sample::sample(f.as_mut(), &opts, || {}).unwrap();
    let o = alone(oracle());
    let g = alone(gaussian());
    let at = |ts: f64| {
        let mut f = SwitchField::new(oracle(), gaussian(), ts).unwrap();
        sample::sample(&mut f, &opts, || {}).unwrap()
    };
    assert_eq!(
        at(0.0).samples,
        g.samples,
        "--switch-at 0 is the second field alone"
    );
    assert_eq!(
        at(1.0).samples,
        o.samples,
        "--switch-at 1 is the first field alone"
    );
    assert_eq!(at(0.5).times, o.times, "a grid time is not added twice");
    // Inside a step: TS joins the grid, and the steps up to it are the first field's.
    let mid = at(0.4);
    assert_eq!(mid.times, vec![0.0, 0.25, 0.4, 0.5, 0.75, 1.0]);
    let mut first = oracle();
    let until = sample::sample(first.as_mut(), &options(6, vec![0.0, 0.25, 0.4]), || {});
    // A grid ending before 1 is refused; integrate by hand up to 0.4 instead.
    assert!(until.is_err());
    let x0: Vec<f64> = (0..6)
        .flat_map(|i| sample::initial_noise(4, i, 10))
        .collect();
    let x_ts = sample::integrate(
        first.as_mut(),
        Solver::Heun,
        &[0.0, 0.25, 0.4],
        x0,
        &[None; 6],
        |_, _, _| {},
    )
    .unwrap();
    let mut second = gaussian();
    let x1 = sample::integrate(
        second.as_mut(),
        Solver::Heun,
        &[0.4, 0.5, 0.75, 1.0],
        x_ts,
        &[None; 6],
        |_, _, _| {},
    )
    .unwrap();
    let want: Vec<f32> = x1.iter().map(|&v| v as f32).collect();
    assert_eq!(
        mid.samples, want,
        "oracle up to 0.4 exactly, gaussian after"
    );
    // Stats only where the oracle ran.
    assert!(mid.steps[1].mean_top1_weight.is_finite() && mid.steps[2].mean_top1_weight.is_nan());
}

#[test]
fn init_from_at_t_start_one_returns_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = oracleflow(&[
        "sample",
        "--data",
        "embedded@300",
        "--init-from",
        "embedded@5",
        "--t-start",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_samples(&out);
    let ds = oracleflow::dataset::load("embedded@5", Dtype::F32).unwrap();
    let want: Vec<f32> = (0..5).flat_map(|r| ds.sample(r)).collect();
    assert_eq!(got, want);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["samples"].as_array().unwrap().len(), 5);
    for s in run["samples"].as_array().unwrap() {
        assert_eq!(s["same_nearest_as_start"], true);
        assert_eq!(s["start_nearest"], s["nearest"]);
    }
    assert_eq!(run["init_from"]["same_nearest_as_start"]["count"], 5);

    // From T < 1 with -n fewer: 3 samples, integrated from T (the grid starts there).
    let out2 = tmp.path().join("run2");
    let o = oracleflow(&[
        "sample",
        "--data",
        "embedded@300",
        "--init-from",
        "embedded@5",
        "--t-start",
        "0.6",
        "-n",
        "3",
        "--steps",
        "10",
        "--field",
        "gaussian",
        "--switch-at",
        "0.8",
        "--then",
        "oracle",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_samples(&out2).len(), 3 * 784);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("run.json")).unwrap()).unwrap();
    let times: Vec<f64> = run["sampling"]["integration_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(times.first(), Some(&0.6));
    assert!(times.contains(&0.8) && times.last() == Some(&1.0));
    // More than given is refused.
    let o = oracleflow(&[
        "sample",
        "--data",
        "embedded@300",
        "--init-from",
        "embedded@5",
        "--t-start",
        "0.5",
        "-n",
        "9",
        "--out",
        tmp.path().join("run3").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("holds only 5"));
}

/// Posterior variance tr Cov_w(y) / D from a backend against the f64 definition.
fn check_posterior_variance(kind: BackendKind) {
    let ds = common::gaussian_dataset(700, 48, 2, Dtype::F32);
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, kind).unwrap();
    for &t in &[0.05f32, 0.3, 0.6, 0.9, 0.99] {
        let x = common::path_queries(&ds, Path::RectifiedFlow, t, 16, 3);
        let (got, want) = common::evaluate_with_f64(&mut oracle, &ds, &x, t);
        for (g, w) in got.stats.iter().zip(&want.stats) {
            // f32: the two terms (~|y|^2 / D ~ 1) cancel, so absolute error ~1e-6 is the
            // floor; relative 1e-3 where the variance is large.
            let err = (g.posterior_variance - w.posterior_variance).abs();
            assert!(
                err <= 1e-3 * w.posterior_variance + 2e-5,
                "{kind:?} t {t}: {} vs {}",
                g.posterior_variance,
                w.posterior_variance
            );
        }
    }
}

#[test]
fn posterior_variance_matches_the_reference_on_cpu() {
    check_posterior_variance(BackendKind::Cpu);
}

#[test]
fn posterior_variance_matches_the_reference_on_gpu() {
    if !common::enabled(BackendKind::Gpu) {
        return;
    }
    check_posterior_variance(BackendKind::Gpu);
}
