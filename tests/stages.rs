//! Stage curves: the paper's qualitative facts on synthetic unit Gaussians, and the
//! `stages` command's files.

mod common;

use oracleflow::analysis::{crossing, stage_curve};
use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::Path;

fn saturation(spec: &str) -> (f64, Vec<oracleflow::analysis::StagePoint>) {
    let ds = dataset::load(spec, Dtype::F32).unwrap();
    let mut oracle = Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Cpu).unwrap();
    let times: Vec<f64> = (0..=40).map(|i| 0.5 * i as f64 / 40.0).collect();
    let curve = stage_curve(&mut oracle, &times, 48, 3, || {}).unwrap();
    let top1: Vec<(f64, f64)> = curve.iter().map(|p| (p.t, p.mean_top1_weight)).collect();
    (
        crossing(&top1, 0.99).expect("saturates before t = 0.5"),
        curve,
    )
}

#[test]
fn saturation_comes_earlier_with_dimension_and_later_with_more_samples() {
    // Paper (unit Gaussians): larger D saturates earlier, larger N later.
    let (t_d256, curve) = saturation("gaussian:400,256");
    let (t_d2048, _) = saturation("gaussian:400,2048");
    let (t_n4000, _) = saturation("gaussian:4000,256");
    assert!(t_d2048 < t_d256, "D: {t_d2048} !< {t_d256}");
    assert!(t_n4000 > t_d256, "N: {t_n4000} !> {t_d256}");

    // At t = 0 the posterior is uniform; late, it sits on the sample x_t came from and the
    // marginal velocity equals the conditional training target.
    let first = curve.first().unwrap();
    let last = curve.last().unwrap();
    assert!((first.mean_top1_weight - 1.0 / 400.0).abs() < 1e-6);
    assert!((first.mean_ess - 400.0).abs() < 0.1);
    assert_eq!(last.own_sample_rate, 1.0);
    assert!(last.target_difference < 1e-6 * first.target_difference);
}

#[test]
fn stages_command_writes_chart_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("st");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args([
            "stages",
            "--data",
            "gaussian:200,64",
            "--data",
            "embedded@300",
            "--pairs",
            "16",
            "--steps",
            "10",
        ])
        .args(["--backend", "cpu", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(out.join("stages.png")).unwrap();
    let csv = std::fs::read_to_string(out.join("stages.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 11);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("stages.json")).unwrap()).unwrap();
    assert_eq!(json["datasets"].as_array().unwrap().len(), 2);
    assert!(json["datasets"][0]["t_top1_half"].as_f64().is_some());
}
