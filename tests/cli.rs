//! The `oracleflow` binary end to end: files written and readable, bad input refused with
//! one line naming the problem, nothing half-written, nothing overwritten without --force.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use oracleflow::dataset::{self, npy, Dtype};
use oracleflow::oracle::{reference, Query, Times};

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

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn sample_writes_pictures_arrays_and_run_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let args = [
        "sample",
        "--data",
        "embedded@300",
        "-n",
        "6",
        "--steps",
        "8",
        "--backend",
        "cpu",
        "--track",
        "3",
        "--columns",
        "5",
        "--out",
        out_s,
    ];
    let o = oracleflow(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        files_in(&out),
        [
            "nearest.png",
            "run.json",
            "samples.npy",
            "samples.png",
            "stages.png",
            "steps.csv",
            "trajectory.png"
        ]
    );
    let (shape, samples) = npy::read_npy_f32(out.join("samples.npy")).unwrap();
    assert_eq!(shape, vec![6, 1, 28, 28]);
    assert!(samples.iter().all(|v| v.is_finite()));
    let traj = image::open(out.join("trajectory.png")).unwrap();
    // 5 columns of 84 px cells; two blocks (x_t, x1_hat) of 3 rows.
    assert!(traj.width() >= 5 * 84 && traj.height() >= 6 * 84);
    image::open(out.join("samples.png")).unwrap();
    image::open(out.join("nearest.png")).unwrap();
    image::open(out.join("stages.png")).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(json["sampling"]["n"], 6);
    assert_eq!(json["steps"].as_array().unwrap().len(), 8);
    assert_eq!(json["memorized"]["count"], 6, "the oracle memorizes");
    assert_eq!(
        std::fs::read_to_string(out.join("steps.csv"))
            .unwrap()
            .lines()
            .count(),
        9
    );

    // A second run into the same directory is refused, and changes nothing.
    let before = std::fs::read(out.join("run.json")).unwrap();
    let o = oracleflow(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("run.json")).unwrap(), before);
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(oracleflow(&forced).status.success());
}

#[test]
fn sample_with_classes_and_guidance_stays_in_class() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cfg");
    let o = oracleflow(&[
        "sample",
        "--data",
        "embedded@400",
        "-n",
        "10",
        "--steps",
        "10",
        "--classes",
        "all",
        "--cfg-scale",
        "2.5",
        "--cfg-interval",
        "0.1,0.6",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(json["sampling"]["guidance"]["t_lo"], 0.1);
    let ds = dataset::load("embedded@400", Dtype::F32).unwrap();
    for (i, s) in json["samples"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s["class"], i as u64 % 10, "balanced classes");
        let row = ds
            .row_of_original(s["nearest"].as_u64().unwrap() as u32)
            .unwrap();
        assert_eq!(
            ds.labels().unwrap()[row] as u64,
            i as u64 % 10,
            "sample {i} lands in its class"
        );
    }
    let o = oracleflow(&[
        "sample",
        "--cfg-scale",
        "2",
        "--cfg-interval",
        "0.5",
        "--class",
        "1",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("two times"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn velocity_matches_the_reference_and_writes_stats() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset::load("embedded@500", Dtype::F32).unwrap();
    let x = common::path_queries(&ds, oracleflow::Path::RectifiedFlow, 0.6, 5, 1);
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[5, 1, 28, 28], &x).unwrap();
    let (v, h, s) = (
        dir.path().join("v.npy"),
        dir.path().join("h.npy"),
        dir.path().join("s.csv"),
    );
    let o = oracleflow(&[
        "velocity",
        "--data",
        "embedded@500",
        "--queries",
        q.to_str().unwrap(),
        "--t",
        "0.6",
        "--out",
        v.to_str().unwrap(),
        "--x1-hat",
        h.to_str().unwrap(),
        "--stats",
        s.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, got) = npy::read_npy_f32(&v).unwrap();
    assert_eq!(shape, vec![5, 1, 28, 28]);
    let want = reference::evaluate_f64(
        &ds,
        oracleflow::Path::RectifiedFlow,
        &Query {
            x: &x,
            t: Times::Scalar(0.6),
            class: None,
        },
        0..500,
    );
    assert!(common::rel_err(&got, &want.velocity) < 1e-4);
    let (_, hat) = npy::read_npy_f32(&h).unwrap();
    assert!(common::rel_err(&hat, &want.x1_hat) < 1e-4);
    let csv = std::fs::read_to_string(&s).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "query,t,top1_weight,top1_index,entropy,ess,posterior_variance,skipped_mass_bound,tiles_skipped,samples_skipped"
    );
    assert_eq!(csv.lines().count(), 6);
    let first: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(first[3].parse::<u32>().unwrap(), want.stats[0].top1_index);
}

#[test]
fn bad_input_fails_with_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = d.join("v.npy");
    let vs = v.to_str().unwrap();

    let velocity = |queries: &Path, data: &str, t: &str| {
        oracleflow(&[
            "velocity",
            "--data",
            data,
            "--queries",
            queries.to_str().unwrap(),
            "--t",
            t,
            "--out",
            vs,
        ])
    };
    let fails_naming = |o: Output, what: &str| {
        let err = stderr(&o);
        assert!(!o.status.success(), "should fail: {what}");
        assert!(
            err.contains(what) && err.trim().lines().count() == 1,
            "error should name {what}: {err}"
        );
    };

    // Missing queries file.
    fails_naming(
        velocity(Path::new("/nonexistent/q.npy"), "embedded@50", "0.5"),
        "/nonexistent/q.npy",
    );
    // Queries of the wrong size.
    let q = d.join("q.npy");
    npy::write_npy_f32(&q, &[2, 5], &[0.0; 10]).unwrap();
    fails_naming(velocity(&q, "embedded@50", "0.5"), "q.npy");
    // Not an npy file at all.
    let junk = d.join("junk.npy");
    std::fs::write(&junk, b"hello").unwrap();
    fails_naming(velocity(&junk, "embedded@50", "0.5"), "junk.npy");
    // A bad data spec and a time outside [0, 1].
    fails_naming(velocity(&q, "nonsense:1", "0.5"), "nonsense");
    npy::write_npy_f32(&q, &[1, 784], &[0.0; 784]).unwrap();
    fails_naming(velocity(&q, "embedded@50", "1.5"), "1.5");

    // A class the data does not have.
    let o = oracleflow(&[
        "sample",
        "--data",
        "gaussian:20,4",
        "--class",
        "3",
        "-n",
        "2",
        "--out",
        d.join("s").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("no labels"),
        "{}",
        stderr(&o)
    );

    assert_eq!(
        files_in(d),
        ["junk.npy", "q.npy"],
        "no output was left behind"
    );
}

#[test]
fn info_reports_dataset() {
    let o = oracleflow(&["info", "--data", "embedded"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("samples: 2000") && out.contains("[1, 28, 28]"),
        "{out}"
    );
}

#[test]
fn gpu_streaming_under_a_memory_budget_matches_cpu() {
    if common::skip_gpu() {
        return;
    }
    // 600 x 784 f32 values are 1.8 MiB: a 1 MiB budget makes the GPU stream the dataset.
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset::load("embedded@600", Dtype::F32).unwrap();
    let x = common::path_queries(&ds, oracleflow::Path::RectifiedFlow, 0.4, 6, 2);
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[6, 784], &x).unwrap();
    let run = |backend: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{backend}.npy"));
        let mut args = vec![
            "velocity",
            "--data",
            "embedded@600",
            "--queries",
            q.to_str().unwrap(),
            "--t",
            "0.4",
        ];
        args.extend(["--backend", backend, "--out", out.to_str().unwrap()]);
        args.extend(extra);
        let o = oracleflow(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        (npy::read_npy_f32(&out).unwrap().1, stderr(&o))
    };
    let (cpu, _) = run("cpu", &[]);
    // --dtype f32: without it the GPU would store the dataset as f16, which fits 1 MiB.
    let (gpu, log) = run("gpu", &["--gpu-memory-mib", "1", "--dtype", "f32"]);
    assert!(log.contains("streaming"), "{log}");
    let cpu64: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
    assert!(common::rel_err(&gpu, &cpu64) < 1e-5);
}

/// `info` shows the GPU kernels' tile shape and where it came from; a malformed
/// ORACLEFLOW_GPU_TILES is a one-line input error (exit 2) naming the variable.
#[test]
fn info_shows_the_gpu_tiles_and_refuses_a_bad_override() {
    let run = |tiles: &str| {
        Command::new(env!("CARGO_BIN_EXE_oracleflow"))
            .arg("info")
            .env("ORACLEFLOW_TEST", "1")
            .env("ORACLEFLOW_GPU_TILES", tiles)
            .output()
            .expect("run oracleflow")
    };
    let o = run("128x96");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ORACLEFLOW_GPU_TILES")
            && err.contains("128x96")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    if common::skip_gpu() {
        return;
    }
    let o = run("64x64x8");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("logits tiles 64x64x8 (ORACLEFLOW_GPU_TILES)"),
        "{out}"
    );
}
