//! Every sampling and velocity option run through the binary, with what it must change in
//! the files: dtype, solver, batch, path, shift, per-query times, class, bench, the contents
//! of run.json and steps.csv, and the `auto` backend's choice and reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use oracleflow::dataset::{self, npy, Dtype};
use oracleflow::oracle::{reference, Query, Times};

fn oracleflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .output()
        .expect("run oracleflow")
}

fn ok(args: &[&str]) {
    let o = oracleflow(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Runs `sample` on embedded@200 with the cpu backend and extra args; returns the out dir.
fn sample(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "sample",
        "--data",
        "embedded@200",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    ok(&args);
    out
}

/// Oracle evaluations of one batch: every step has the solver's stages, except the last
/// (to t = 1), which is one evaluation returning x1_hat.
fn evaluations_per_batch(steps: usize, per_step: usize) -> u64 {
    ((steps - 1) * per_step + 1) as u64
}

#[test]
fn solvers_batches_and_run_json_contents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (solver, per_step) in [("euler", 1), ("heun", 2), ("rk4", 4)] {
        let out = sample(d, solver, &["-n", "5", "--steps", "6", "--solver", solver]);
        let j = json(&out.join("run.json"));
        assert_eq!(j["sampling"]["solver"], solver);
        assert_eq!(
            j["timings"]["oracle_evaluations"],
            evaluations_per_batch(6, per_step)
        );
        // run.json: the grid, per-step means at each grid time, per-sample records.
        let times: Vec<f64> = j["sampling"]["times"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(times.len(), 7);
        assert_eq!((times[0], times[6]), (0.0, 1.0));
        let steps = j["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 6);
        let csv = std::fs::read_to_string(out.join("steps.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next().unwrap(),
            "step,t,mean_top1_weight,mean_entropy,mean_ess,frac_top1_above_half,mean_posterior_variance"
        );
        for (i, (line, s)) in lines.zip(steps).enumerate() {
            let f: Vec<f64> = line.split(',').map(|v| v.parse().unwrap()).collect();
            assert_eq!(f[0] as usize, i);
            assert!((f[1] - times[i]).abs() <= 1e-15);
            assert!((s["t"].as_f64().unwrap() - times[i]).abs() <= 1e-15);
            // serde_json parses floats to within 1 ulp (no float_roundtrip feature).
            let same = |a: f64, b: f64| (a - b).abs() <= 1e-15 * a.abs().max(1.0);
            assert!(same(f[2], s["mean_top1_weight"].as_f64().unwrap()));
            assert!(same(f[3], s["mean_entropy"].as_f64().unwrap()));
            assert!(same(f[4], s["mean_ess"].as_f64().unwrap()));
            assert!(same(f[5], s["frac_top1_above_half"].as_f64().unwrap()));
            assert!((0.0..=1.0).contains(&f[2]) && f[3] >= 0.0 && f[4] >= 1.0);
            assert!(same(f[6], s["mean_posterior_variance"].as_f64().unwrap()) && f[6] >= 0.0);
        }
        let samples = j["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 5);
        for s in samples {
            assert!(s["distance"].as_f64().unwrap() <= s["second_distance"].as_f64().unwrap());
            assert_eq!(
                s["memorized"].as_bool().unwrap(),
                s["distance"].as_f64().unwrap() < s["second_distance"].as_f64().unwrap() / 3.0
            );
            assert!(s["last_step"]["top1_weight"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(j["data"]["n_samples"], 200);
        assert_eq!(j["oracle"]["backend"], "cpu");
    }

    // A batch below the sample count: three batches, the same samples (cpu rows are split
    // independently of the batch).
    let whole = sample(d, "whole", &["-n", "5", "--steps", "6", "--batch", "5"]);
    let split = sample(d, "split", &["-n", "5", "--steps", "6", "--batch", "2"]);
    let j = json(&split.join("run.json"));
    assert_eq!(j["sampling"]["batch"], 2);
    assert_eq!(
        j["timings"]["oracle_evaluations"],
        3 * evaluations_per_batch(6, 2)
    );
    assert_eq!(
        std::fs::read(whole.join("samples.npy")).unwrap(),
        std::fs::read(split.join("samples.npy")).unwrap()
    );
}

#[test]
fn dtype_path_and_shift_options() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f16 = sample(d, "f16", &["-n", "4", "--steps", "10", "--dtype", "f16"]);
    let j = json(&f16.join("run.json"));
    assert_eq!(j["data"]["dtype"], "f16");
    assert!(j["oracle"]["description"].as_str().unwrap().contains("F16"));
    assert_eq!(j["memorized"]["count"], 4);

    let vp = sample(
        d,
        "vp",
        &["-n", "4", "--steps", "10", "--path", "vp-cosine"],
    );
    let j = json(&vp.join("run.json"));
    assert_eq!(j["oracle"]["path"], "vp-cosine");
    assert_eq!(j["memorized"]["count"], 4);
    let rf = sample(d, "rf", &["-n", "4", "--steps", "10"]);
    assert_ne!(
        std::fs::read(vp.join("steps.csv")).unwrap(),
        std::fs::read(rf.join("steps.csv")).unwrap(),
        "the path changes the trajectory"
    );

    // Every shift gives a grid from exactly 0 to exactly 1 (0.3 once ended at 1 - 1e-16).
    for shift in ["0.1", "0.3", "0.5", "0.7", "2"] {
        let out = sample(
            d,
            &format!("shift{shift}"),
            &["-n", "2", "--steps", "7", "--shift", shift],
        );
        let j = json(&out.join("run.json"));
        let times = j["sampling"]["times"].as_array().unwrap();
        assert_eq!(times[0], 0.0);
        assert_eq!(times[7], 1.0, "shift {shift}");
        let s: f64 = shift.parse().unwrap();
        let t1 = s * (1.0 / 7.0) / (1.0 + (s - 1.0) / 7.0);
        assert!((times[1].as_f64().unwrap() - t1).abs() < 1e-15);
    }
}

/// A 2-sample run with `--backend auto` (the default) and an optional Vulkan ICD override;
/// returns run.json's "oracle" record.
fn auto_run(dir: &Path, name: &str, icd: Option<&str>) -> serde_json::Value {
    let out = dir.join(name);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oracleflow"));
    cmd.args([
        "sample",
        "--data",
        "embedded@100",
        "-n",
        "2",
        "--steps",
        "4",
        "--out",
    ])
    .arg(&out);
    if let Some(icd) = icd {
        cmd.env("VK_ICD_FILENAMES", icd);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json(&out.join("run.json"))["oracle"].clone()
}

#[test]
fn auto_backend_says_what_it_chose_and_why() {
    let dir = tempfile::tempdir().unwrap();
    // Whatever the machine: a hardware GPU is used, or cpu with the reason. With the Vulkan
    // loader pointed at nothing there is no Vulkan adapter: still never a failure.
    for (name, icd) in [("auto", None), ("no-icd", Some("/nonexistent.json"))] {
        let j = auto_run(dir.path(), name, icd);
        let description = j["description"].as_str().unwrap();
        match j["backend"].as_str().unwrap() {
            "gpu" => assert!(!description.contains("no GPU used"), "{description}"),
            "cpu" => assert!(
                description.contains("auto: no GPU used: "),
                "{name}: the fallback says why: {description}"
            ),
            other => panic!("auto chose {other}"),
        }
    }
}

#[test]
fn velocity_per_query_times_and_class() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = dataset::load("embedded@300", Dtype::F32).unwrap();
    let times = [0.1f32, 0.5, 0.8, 0.95];
    let x: Vec<f32> = times
        .iter()
        .enumerate()
        .flat_map(|(k, &t)| {
            common::path_queries(&ds, oracleflow::Path::RectifiedFlow, t, 1, k as u64)
        })
        .collect();
    let (q, tp, v) = (d.join("q.npy"), d.join("t.npy"), d.join("v.npy"));
    npy::write_npy_f32(&q, &[4, 784], &x).unwrap();
    npy::write_npy_f32(&tp, &[4], &times).unwrap();
    for class in [None, Some(3u32)] {
        let class_s = class.map(|c| c.to_string());
        let mut args = vec![
            "velocity",
            "--data",
            "embedded@300",
            "--backend",
            "cpu",
            "--queries",
            q.to_str().unwrap(),
            "--times",
            tp.to_str().unwrap(),
            "--out",
            v.to_str().unwrap(),
            "--force",
        ];
        if let Some(c) = &class_s {
            args.extend(["--class", c.as_str()]);
        }
        ok(&args);
        let (shape, got) = npy::read_npy_f32(&v).unwrap();
        assert_eq!(shape, vec![4, 784]);
        // The reference over the rows the test picks by label.
        let labels = ds.labels().unwrap();
        let rows: Vec<usize> = (0..ds.n_samples())
            .filter(|&r| class.is_none_or(|c| labels[r] == c))
            .collect();
        let range = rows[0]..rows[rows.len() - 1] + 1;
        assert_eq!(
            range.len(),
            rows.len(),
            "class rows are contiguous when stored"
        );
        let want = reference::evaluate_f64(
            &ds,
            oracleflow::Path::RectifiedFlow,
            &Query {
                x: &x,
                t: Times::PerQuery(&times),
                class,
            },
            range,
        );
        let err = common::rel_err(&got, &want.velocity);
        assert!(err < 1e-4, "class {class:?}: {err:.1e}");
    }
}

#[test]
fn bench_measures_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("bench.json");
    let o = oracleflow(&[
        "bench",
        "--data",
        "embedded@200",
        "--batch",
        "8",
        "--reps",
        "1",
        "--backends",
        "cpu",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("sgemm") && table.contains("cpu"), "{table}");
    let j = json(&j);
    assert!(j["threads"].as_u64().unwrap() >= 1 && j["cpu_model"].is_string());
    let rows = j["measurements"].as_array().unwrap();
    // One sgemm per GEMM library here (and the gemm crate's own driver), then the oracle.
    let what = |r: &serde_json::Value| r["what"].as_str().unwrap().to_string();
    assert!(rows.iter().filter(|r| what(r).contains("sgemm")).count() >= 3);
    assert_eq!(rows.iter().filter(|r| what(r) == "cpu oracle").count(), 1);
    assert!(j["best_sgemm_gflops"].as_f64().unwrap() > 0.0);
    assert!(j["cpu_gemm"]["plan"]["tile_rows"].as_u64().unwrap() >= 16);
    for r in rows {
        assert_eq!(
            (
                r["n_samples"].as_u64(),
                r["dim"].as_u64(),
                r["n_queries"].as_u64()
            ),
            (Some(200), Some(784), Some(8))
        );
        assert!(r["seconds"].as_f64().unwrap() > 0.0 && r["gflops"].as_f64().unwrap() > 0.0);
    }
}

/// `bench --peers` smoke run: the numpy peers run on the same data and agree with ours to
/// 1e-4 (numpy is required under CI; elsewhere the test says it skipped them).
#[test]
fn bench_peers_agree_with_ours() {
    let numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !numpy && std::env::var("CI").is_err() {
        eprintln!("SKIPPED bench --peers: python3 with numpy is missing (pip install numpy)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("peers.json");
    let o = oracleflow(&[
        "bench",
        "--data",
        "embedded@300",
        "--batch",
        "4",
        "--reps",
        "1",
        "--backends",
        "cpu",
        "--peers",
        "--peer-times",
        "0.3,0.8",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json(&j);
    let peers = j["peers"].as_array().unwrap();
    for name in ["numpy_full", "numpy_chunked"] {
        let rows: Vec<_> = peers.iter().filter(|r| r["what"] == name).collect();
        assert_eq!(rows.len(), 2, "{name} at both times");
        for r in rows {
            assert_eq!(r["agrees"], true, "{r}");
            assert!(r["rel_error"].as_f64().unwrap() <= 1e-4);
            assert!(r["ours_faster_by"].as_f64().unwrap() > 0.0);
        }
    }
    // PyTorch on the CPU and on CUDA: where torch (or a CUDA device) is missing, a row that
    // says why; where it runs (an H200 ran all four), an exact peer that agrees.
    for name in [
        "torch_full",
        "torch_chunked",
        "torch_cuda_full",
        "torch_cuda_chunked",
    ] {
        let rows: Vec<_> = peers.iter().filter(|r| r["what"] == name).collect();
        assert_eq!(rows.len(), 2, "{name} at both times");
        for r in rows {
            let skipped = r["note"].as_str().unwrap().starts_with("skipped: ");
            assert!(skipped || r["agrees"] == true, "{r}");
        }
    }
    let ours: Vec<_> = peers.iter().filter(|r| r["what"] == "ours: cpu").collect();
    assert_eq!(ours.len(), 2);
    // Each of ours reports the pruning's skipped fractions and its certificate (issue 8).
    for r in ours {
        let note = r["note"].as_str().unwrap();
        for what in [
            "tiles skipped ",
            "samples skipped ",
            "skipped-mass certificate <= ",
        ] {
            assert!(note.contains(what), "{what:?} in {note}");
        }
    }
    // The sgemm ceiling, timed at each t next to ours.
    let sgemm: Vec<_> = peers.iter().filter(|r| r["what"] == "best sgemm").collect();
    assert_eq!(sgemm.len(), 2);
    assert!(sgemm.iter().all(|r| r["gflops"].as_f64().unwrap() > 0.0));
}

/// Ctrl-C: the run stops within about a second (at the next evaluation), exits 130 and
/// leaves no output file behind.
#[test]
fn ctrl_c_stops_with_130_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args([
            "sample",
            "--data",
            "gaussian:4000,256",
            "--backend",
            "cpu",
            "-n",
            "64",
            "--steps",
            "100000",
            "--out",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = std::time::Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed().as_secs() < 20,
            "still running 20 s after Ctrl-C"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left: {left:?}");
}

/// `convert` writes the dataset's values (f32, or f16 rounded) in source order with its
/// labels beside it, and the result loads back as the same dataset.
#[test]
fn convert_round_trips_in_source_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = dataset::load("embedded@120", Dtype::F32).unwrap();
    // f32: the centring (stored = y - mean) rounds once each way; f16: half precision.
    for (dtype, tol) in [("f32", 1e-6f32), ("f16", 1e-3)] {
        let out = dir.path().join(format!("sub/{dtype}.npy"));
        ok(&[
            "convert",
            "embedded@120",
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
        let labels = dir.path().join(format!("sub/{dtype}.labels.npy"));
        let spec = format!("npy:{},{}", out.display(), labels.display());
        let back = dataset::load(&spec, Dtype::F32).unwrap();
        assert_eq!((back.n_samples(), back.dim()), (120, 784));
        for i in 0..120u32 {
            let (a, b) = (
                src.row_of_original(i).unwrap(),
                back.row_of_original(i).unwrap(),
            );
            let (va, vb) = (src.sample(a), back.sample(b));
            let err = va
                .iter()
                .zip(&vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(err <= tol, "{dtype} sample {i}: {err}");
            assert_eq!(
                src.labels().unwrap()[a],
                back.labels().unwrap()[b],
                "label of {i}"
            );
        }
        // Not overwritten without --force.
        let o = oracleflow(&["convert", "embedded@10", "--out", out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
    }
}

/// `--exact-dense` keeps the plain path; the default (exact pruning) gives the same samples
/// within 1e-6 relative, and run.json reports per step the certificate and what was skipped.
#[test]
fn exact_dense_and_pruning_agree_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = ["-n", "8", "--steps", "12", "--solver", "euler"];
    let pruned = sample(d, "pruned", &args);
    let mut dense_args = args.to_vec();
    dense_args.push("--exact-dense");
    let dense = sample(d, "dense", &dense_args);
    let (_, a) = npy::read_npy_f32(pruned.join("samples.npy")).unwrap();
    let (_, b) = npy::read_npy_f32(dense.join("samples.npy")).unwrap();
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    assert!(common::rel_err(&a, &b64) <= 1e-6);
    for dir in [&pruned, &dense] {
        let j = json(&dir.join("run.json"));
        for s in j["steps"].as_array().unwrap() {
            let cert = s["max_skipped_mass_bound"].as_f64().unwrap();
            let skipped = s["mean_samples_skipped"].as_f64().unwrap();
            assert!((0.0..=2f64.powi(-30)).contains(&cert), "certificate {cert}");
            assert!((0.0..=1.0).contains(&skipped));
        }
    }
    let j = json(&dense.join("run.json"));
    assert!(j["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["mean_samples_skipped"].as_f64() == Some(0.0)));
    assert!(j["oracle"]["description"]
        .as_str()
        .unwrap()
        .contains("dense"));
}

/// `sample` saves its finished batches; a run killed part-way continues with `--resume`
/// without redoing them and ends with the same bytes as an uninterrupted run.
#[test]
fn resume_after_interrupt_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let run_args = |out: &Path| -> Vec<String> {
        [
            "sample",
            "--data",
            "embedded@600",
            "--backend",
            "cpu",
            "-n",
            "12",
            "--batch",
            "3",
            "--steps",
            "400",
            "--exact-dense",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.to_string_lossy().into_owned()])
        .collect()
    };
    let whole = dir.path().join("whole");
    let args = run_args(&whole);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let cut = dir.path().join("cut");
    let args = run_args(&cut);
    let mut child = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once the first batch is saved (and before the last one is).
    let checkpoint = cut.join(".oracleflow-partial/checkpoint.bin");
    let start = std::time::Instant::now();
    while !checkpoint.is_file() {
        assert!(start.elapsed().as_secs() < 60, "no batch saved in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    if status.code() == Some(0) {
        eprintln!("the run finished before Ctrl-C arrived; nothing to resume");
        return;
    }
    assert_eq!(status.code(), Some(130));
    assert!(!cut.join("samples.npy").exists(), "no result files yet");
    // Without --resume the interrupted run is not silently redone or overwritten.
    let plain = oracleflow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(plain.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&plain.stderr).contains("--resume"));
    // Other settings are refused.
    let mut other: Vec<&str> = args.iter().map(String::as_str).collect();
    other.extend(["--seed", "5", "--resume"]);
    assert_eq!(oracleflow(&other).status.code(), Some(2));
    // `sample --resume DIR`: the run's directory named by --resume itself (no --out).
    let cut_dir = cut.to_string_lossy().into_owned();
    let mut resume: Vec<&str> = args[..args.len() - 2].iter().map(String::as_str).collect();
    assert_eq!(args[args.len() - 2], "--out");
    resume.extend(["--resume", &cut_dir]);
    let o = oracleflow(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("batches already done"));
    for f in [
        "samples.npy",
        "steps.csv",
        "trajectory.png",
        "nearest.png",
        "samples.png",
    ] {
        assert_eq!(
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(cut.join(f)).unwrap(),
            "{f} differs from the uninterrupted run"
        );
    }
    let (a, b) = (json(&whole.join("run.json")), json(&cut.join("run.json")));
    assert_eq!(a["samples"], b["samples"]);
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(
        a["timings"]["oracle_evaluations"],
        b["timings"]["oracle_evaluations"]
    );
    assert!(
        !cut.join(".oracleflow-partial").exists(),
        "the saved batches are removed"
    );
}
