//! `bench --model` (cost model and projections), `bench --sweep` (scaling slopes) and
//! `--cpu-gemm` end to end. Timings are never asserted; the counts and the shape of the
//! output are.

use std::process::{Command, Output};

fn oracleflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        // Forced, so that no test process pays for (or races on) the autotune.
        .env("ORACLEFLOW_CPU_GEMM", "gemm")
        .args(args)
        .output()
        .expect("run oracleflow")
}

#[test]
fn model_prints_counts_and_labelled_estimates() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("model.json");
    let o = oracleflow(&[
        "bench",
        "--model",
        "--samples",
        "1280000",
        "--dim",
        "4096",
        "--dtype",
        "f16",
        "--reps",
        "1",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "ESTIMATES",
        "H100 SXM roofline",
        "8x H100 MPI",
        "RTX 4090",
        "Apple M2",
        "this CPU",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    let (n, d, b) = (1.28e6, 4096.0, 256.0);
    assert_eq!(
        j["flops_per_eval"].as_f64().unwrap(),
        4.0 * b * n * d + 10.0 * b * n
    );
    assert_eq!(
        j["bytes_per_eval"].as_f64().unwrap(),
        n * d * 2.0 + 4.0 * n + 8.0 * b * d
    );
    assert_eq!(j["evaluations"]["heun"], 99);
    assert_eq!(j["projections_are_estimates"], true);
    let h100 = j["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["target"] == "H100 SXM roofline")
        .unwrap();
    let per = h100["seconds_per_eval"].as_f64().unwrap();
    assert!((per - j["flops_per_eval"].as_f64().unwrap() / 67e12).abs() < 1e-9 * per);
    assert!(j["measured_here"]["oracle_gflops"].as_f64().unwrap() > 0.0);
}

#[test]
fn model_defaults_to_the_dataset_and_refuses_zero() {
    let o = oracleflow(&["bench", "--model", "--data", "embedded@100", "--reps", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("N = 100, D = 784, B = 256"), "{text}");
    let o = oracleflow(&["bench", "--model", "--samples", "0", "--dim", "3"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--samples"), "{err}");
}

#[test]
fn sweep_fits_three_slopes() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("sweep.json");
    let o = oracleflow(&[
        "bench",
        "--sweep",
        "--reps",
        "1",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(j["points"].as_array().unwrap().len(), 12);
    let slopes = j["slopes"].as_array().unwrap();
    assert_eq!(slopes.len(), 3);
    for s in slopes {
        // Work is linear in each of N, D and B: any sane run lands well inside (0, 2).
        let v = s["slope"].as_f64().unwrap();
        assert!(v > 0.0 && v < 2.0, "{s}");
    }
}

#[test]
fn cpu_gemm_flag_forces_and_refuses_bad_values() {
    let o = oracleflow(&[
        "bench",
        "--data",
        "embedded@100",
        "--batch",
        "4",
        "--reps",
        "1",
        "--backends",
        "cpu",
        "--cpu-gemm",
        "faer:512",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("faer GEMMs, 512-row tiles"), "{text}");
    let o = oracleflow(&["bench", "--data", "embedded@100", "--cpu-gemm", "mkl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cpu-gemm"));
}
