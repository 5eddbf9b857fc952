//! The studies as commands: each runs end to end on small inputs and writes its files;
//! transition's crossing times against an independent f64 computation; nearest against
//! brute force; the stage curves' t = 0 values against their closed forms.

use std::path::Path;
use std::process::Command;

use oracleflow::analysis::{stage_curve_from, stage_pairs};
use oracleflow::dataset::{self, npy, synthetic, Dataset, Dtype, RawRows, SampleShape};
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::study::transition::{self, TransitionOptions};

fn oracleflow(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "oracleflow {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn csv(path: &Path) -> (String, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let rows = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    (header, rows)
}

/// A PNG that opens and is not blank.
fn check_png(path: &Path) {
    let img = image::open(path).unwrap().to_rgb8();
    let first = *img.get_pixel(0, 0);
    assert!(
        img.pixels().any(|p| *p != first),
        "{} is one colour",
        path.display()
    );
}

#[test]
fn transition_command_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tr");
    let stdout = oracleflow(&[
        "transition",
        "--dims",
        "32,128",
        "--n",
        "60",
        "--ns",
        "20",
        "--dim",
        "32",
        "--pairs",
        "8",
        "--t-max",
        "0.9",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("paper"), "table printed: {stdout}");
    let (header, rows) = csv(&out.join("transition.csv"));
    assert_eq!(header, "n,d,t_top1_0.5,t_top1_0.9,t_top1_0.99");
    let nd: Vec<(&str, &str)> = rows.iter().map(|r| (&*r[0], &*r[1])).collect();
    assert_eq!(nd, [("60", "32"), ("60", "128"), ("20", "32")]);
    for r in &rows {
        let t: Vec<f64> = r[2..].iter().map(|v| v.parse().unwrap()).collect();
        assert!(t[0] <= t[1] && t[1] <= t[2], "crossings in order: {r:?}");
    }
    let j = json(&out.join("transition.json"));
    assert_eq!(j["settings"].as_array().unwrap().len(), 3);
    assert_eq!(
        j["paper_reference"]["settings"].as_array().unwrap().len(),
        6
    );
    // The grid is no coarser than 0.005 around the crossings.
    let curve: Vec<f64> = j["settings"][0]["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["t"].as_f64().unwrap())
        .collect();
    let t50 = j["settings"][0]["t_top1_0.5"].as_f64().unwrap();
    let t99 = j["settings"][0]["t_top1_0.99"].as_f64().unwrap();
    for w in curve.windows(2) {
        if w[1] > t50 && w[0] < t99 {
            assert!(
                w[1] - w[0] <= 0.005 + 1e-12,
                "grid step {w:?} near the transition"
            );
        }
    }
    check_png(&out.join("transition.png"));
}

/// Mean top-1 posterior weight at time t over the given (sample, noise) pairs, in f64
/// with a log-sum-exp, from the definition w_i ~ exp(-|x - t y_i|^2 / (2 (1 - t)^2)).
fn top1_f64(data: &[Vec<f64>], pairs: &[(usize, Vec<f64>)], t: f64) -> f64 {
    let s2 = 2.0 * (1.0 - t) * (1.0 - t);
    pairs
        .iter()
        .map(|(j, x0)| {
            let x: Vec<f64> = data[*j]
                .iter()
                .zip(x0)
                .map(|(y, n)| t * y + (1.0 - t) * n)
                .collect();
            let logits: Vec<f64> = data
                .iter()
                .map(|y| {
                    -x.iter()
                        .zip(y)
                        .map(|(a, b)| (a - t * b).powi(2))
                        .sum::<f64>()
                        / s2
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            1.0 / logits.iter().map(|l| (l - m).exp()).sum::<f64>()
        })
        .sum::<f64>()
        / pairs.len() as f64
}

#[test]
fn transition_crossings_match_an_f64_computation() {
    let (n, d, data_seed, seed, n_pairs) = (80usize, 64usize, 3u64, 11u64, 12usize);
    let spec = format!("gaussian:{n},{d},{data_seed}");
    let ds = dataset::load(&spec, Dtype::F32).unwrap();
    let mut oracle = Oracle::new(&ds, oracleflow::Path::RectifiedFlow, BackendKind::Cpu).unwrap();
    let opts = TransitionOptions {
        pairs: n_pairs,
        seed,
        t_max: 0.6,
        coarse_step: 0.02,
        fine_step: 0.0025,
    };
    let r = transition::measure(&mut oracle, &opts, &spec, |_| {}).unwrap();

    // The same data and pairs, everything else from scratch in f64 on a 0.0005 grid.
    let raw = synthetic::gaussian(n, d, data_seed);
    let data: Vec<Vec<f64>> = raw
        .chunks(d)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let pairs: Vec<(usize, Vec<f64>)> = stage_pairs(seed, n_pairs, n)
        .into_iter()
        .enumerate()
        .map(|(k, j)| (j, oracleflow::sample::initial_noise(seed, k, d)))
        .collect();
    let grid: Vec<(f64, f64)> = (0..=1200)
        .map(|i| {
            let t = 0.0005 * i as f64;
            (t, top1_f64(&data, &pairs, t))
        })
        .collect();
    for (k, level) in [0.5, 0.9, 0.99].into_iter().enumerate() {
        let want = oracleflow::analysis::crossing(&grid, level).expect("crossed before 0.6");
        let got = r.crossings[k].expect("crossed");
        assert!(
            (got - want).abs() < 0.01,
            "level {level}: engine {got}, f64 {want}"
        );
    }
}

/// Brute-force nearest and second nearest, by original index, in f64.
fn brute_nearest(ds: &Dataset, p: &[f32]) -> [(usize, f64); 2] {
    let mut d: Vec<(usize, f64)> = (0..ds.n_samples())
        .map(|i| {
            let y = ds.sample_f64(ds.row_of_original(i as u32).unwrap());
            let dist = y
                .iter()
                .zip(p)
                .map(|(a, &b)| (a - b as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            (i, dist)
        })
        .collect();
    d.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    [d[0], d[1]]
}

#[test]
fn nearest_command_equals_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset::load("embedded@300", Dtype::F32).unwrap();
    let d = ds.dim();
    // Exact training samples (memorized), slightly perturbed ones, and blends of two.
    let mut samples = Vec::new();
    for k in 0..9u32 {
        let a = ds.sample(ds.row_of_original(k * 31).unwrap());
        let b = ds.sample(ds.row_of_original(k * 17 + 5).unwrap());
        samples.extend(a.iter().zip(&b).map(|(x, y)| match k % 3 {
            0 => *x,
            1 => x + 0.02 * (y - x),
            _ => 0.5 * (x + y),
        }));
    }
    let npy_path = dir.path().join("s.npy");
    npy::write_npy_f32(&npy_path, &[9, 1, 28, 28], &samples).unwrap();
    let out = dir.path().join("nn");
    let stdout = oracleflow(&[
        "nearest",
        "--data",
        "embedded@300",
        "--samples",
        npy_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("memorized"), "{stdout}");
    let (header, rows) = csv(&out.join("nearest.csv"));
    assert_eq!(header, "sample,nearest,d1,second,d2");
    assert_eq!(rows.len(), 9);
    let mut memorized = 0;
    for (i, r) in rows.iter().enumerate() {
        let want = brute_nearest(&ds, &samples[i * d..(i + 1) * d]);
        assert_eq!(r[0], i.to_string());
        assert_eq!(r[1].parse::<usize>().unwrap(), want[0].0, "sample {i}");
        assert_eq!(r[3].parse::<usize>().unwrap(), want[1].0, "sample {i}");
        assert!((r[2].parse::<f64>().unwrap() - want[0].1).abs() < 1e-4);
        assert!((r[4].parse::<f64>().unwrap() - want[1].1).abs() < 1e-4);
        memorized += (want[0].1 < want[1].1 / 3.0) as usize;
    }
    assert!(memorized >= 3, "the exact copies are memorized");
    let j = json(&out.join("nearest.json"));
    assert_eq!(j["memorized"]["count"], memorized);
    assert!((j["memorized"]["fraction"].as_f64().unwrap() - memorized as f64 / 9.0).abs() < 1e-12);
    check_png(&out.join("nearest.png"));
}

/// `n` rows of norm `norm` in `d` dimensions, in +/- pairs (so the mean is exactly 0).
fn symmetric_rows(n_half: usize, d: usize, norm: f64, seed: u64) -> Vec<f32> {
    let raw = synthetic::gaussian(n_half, d, seed);
    raw.chunks(d)
        .flat_map(|v| {
            let len = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let u: Vec<f32> = v.iter().map(|&x| (x as f64 * norm / len) as f32).collect();
            let neg: Vec<f32> = u.iter().map(|x| -x).collect();
            [u, neg].concat()
        })
        .collect()
}

#[test]
fn stage_curves_start_at_their_closed_forms() {
    // Training rows +/- v_k with |v_k|^2 = D: the mean is 0 and every |y - mean|^2 / D = 1.
    // At t = 0 on the rf path x_t = x0 and every logit is equal, so the mean top-1 weight
    // is 1/N; u* = mean - x0 and u_cond = y - x0, so the target difference is
    // |y - mean|^2 / D averaged over the pairs, here exactly the per-dimension variance
    // of the data (total variance / D) = 1.
    let (n_half, d) = (30, 24);
    let shape = SampleShape::array(vec![d]);
    let train = symmetric_rows(n_half, d, (d as f64).sqrt(), 1);
    let ds =
        Dataset::from_raw("sym", shape.clone(), RawRows::F32(&train), None, Dtype::F32).unwrap();
    // Held-out queries of norm 2 sqrt(D): |y - mean|^2 / D = 4 for each.
    let held = symmetric_rows(5, d, 2.0 * (d as f64).sqrt(), 2);
    let queries = Dataset::from_raw("held", shape, RawRows::F32(&held), None, Dtype::F32).unwrap();
    let n = (2 * n_half) as f64;
    // The last time is late enough that the noise's cross term x0.(q - y_i) (1 - t) / t
    // can no longer reorder the training samples by distance to the query.
    let times = [0.0, 0.3, 0.6, 0.9999];
    for (source, variance) in [(None, 1.0), (Some(&queries), 4.0)] {
        let mut oracle =
            Oracle::new(&ds, oracleflow::Path::RectifiedFlow, BackendKind::Cpu).unwrap();
        let curve = stage_curve_from(&mut oracle, &times, 16, 7, source, None, || {}).unwrap();
        let p0 = &curve[0];
        assert!((p0.mean_top1_weight - 1.0 / n).abs() < 1e-6, "{p0:?}");
        assert!((p0.mean_ess - n).abs() < 1e-3 * n, "{p0:?}");
        assert!(
            (p0.target_difference - variance).abs() < 1e-4 * variance,
            "t = 0 target difference {} vs {variance}",
            p0.target_difference
        );
        // Late on the path the posterior sits on the query's nearest training sample.
        let last = curve.last().unwrap();
        assert_eq!(last.nearest_rate, 1.0, "{last:?}");
        match source {
            None => assert_eq!(last.own_sample_rate, 1.0),
            Some(_) => assert!(last.own_sample_rate.is_nan()),
        }
    }
}

#[test]
fn stages_with_held_out_queries_writes_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    // Held-out queries: embedded samples 400.. (the training set is the first 300).
    let all = dataset::load("embedded@460", Dtype::F32).unwrap();
    let held: Vec<f32> = (400..460u32)
        .flat_map(|i| all.sample(all.row_of_original(i).unwrap()))
        .collect();
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[60, 784], &held).unwrap();
    let out = dir.path().join("st");
    let stdout = oracleflow(&[
        "stages",
        "--data",
        "embedded@300",
        "--queries-from",
        q.to_str().unwrap(),
        "--pairs",
        "12",
        "--steps",
        "8",
        "--t-max",
        "0.96",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("0.9 at t ="), "{stdout}");
    let (header, rows) = csv(&out.join("stages.csv"));
    assert_eq!(
        header,
        "data,n_samples,dim,t,mean_top1_weight,own_sample_rate,mean_entropy,mean_ess,target_difference,nearest_rate,mean_posterior_variance"
    );
    assert_eq!(rows.len(), 9);
    let last: f64 = rows[8][9].parse().unwrap();
    assert!(
        last > 0.5,
        "late in the path top-1 is mostly the nearest: {last}"
    );
    let j = json(&out.join("stages.json"));
    let s = &j["datasets"][0];
    assert!(s["t_top1_half"].as_f64().is_some());
    assert!(s.get("t_top1_0.9").is_some() && s.get("t_top1_saturated").is_some());
    assert_eq!(s["queries_from"], q.to_str().unwrap());
    check_png(&out.join("stages.png"));
}

#[test]
fn shift_study_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sh");
    let stdout = oracleflow(&[
        "study",
        "shift",
        "--data",
        "embedded@200",
        "-n",
        "6",
        "--steps",
        "4",
        "--reference-steps",
        "16",
        "--shifts",
        "1,0.3",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("same image as reference"), "{stdout}");
    let (header, rows) = csv(&out.join("shift.csv"));
    assert_eq!(
        header,
        "shift,steps,solver,same_as_reference,memorized,mean_nearest_distance"
    );
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let f: f64 = r[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&f) && (f * 6.0).fract().abs() < 1e-9);
    }
    let j = json(&out.join("shift.json"));
    assert_eq!(j["study"]["rows"].as_array().unwrap().len(), 2);
    check_png(&out.join("shift.png"));
}

#[test]
fn cfg_study_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cfg");
    let stdout = oracleflow(&[
        "study",
        "cfg",
        "--data",
        "embedded@300",
        "--per-class",
        "2",
        "--steps",
        "6",
        "--interval",
        "0,1",
        "--interval",
        "0.9,1",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("class consistency"), "{stdout}");
    let (header, rows) = csv(&out.join("cfg.csv"));
    assert_eq!(
        header,
        "setting,scale,t_lo,t_hi,class_consistency,distinct_per_class,samples_per_class,memorized,same_as_unguided"
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][0], "none");
    assert_eq!((&*rows[1][2], &*rows[1][3]), ("0", "1"));
    // The unguided run agrees with itself; distinct nearest per class is at most 2.
    assert_eq!(rows[0][8], "1");
    for r in &rows {
        let distinct: f64 = r[5].parse().unwrap();
        assert!((1.0..=2.0).contains(&distinct));
    }
    let j = json(&out.join("cfg.json"));
    assert_eq!(j["study"]["classes"].as_array().unwrap().len(), 10);
    check_png(&out.join("cfg.png"));
}

/// `study switch`: at TS = 1 oracle -> gaussian is the oracle alone (every sample a
/// training image), at TS = 0 gaussian -> oracle too; the other ends are the Gaussian
/// field alone (nothing memorized). `study resume` at T = 1 returns the held-out images
/// themselves, so each lands on its own nearest training image.
#[test]
fn switch_and_resume_studies() {
    let dir = tempfile::tempdir().unwrap();
    let sw = dir.path().join("sw");
    let common = [
        "--data",
        "embedded@300",
        "--backend",
        "cpu",
        "-n",
        "6",
        "--steps",
        "8",
    ];
    let mut args = vec![
        "study",
        "switch",
        "--at",
        "0,1",
        "--out",
        sw.to_str().unwrap(),
    ];
    args.extend(common);
    oracleflow(&args);
    let (header, rows) = csv(&sw.join("switch.csv"));
    assert_eq!(header, "setting,at,share,memorized,mean_nearest_distance");
    let share = |setting: &str, at: &str| -> f64 {
        rows.iter()
            .find(|r| r[0] == setting && r[1] == at)
            .unwrap_or_else(|| panic!("{setting} at {at}: {rows:?}"))[2]
            .parse()
            .unwrap()
    };
    assert_eq!(share("oracle -> gaussian", "1"), 1.0);
    assert_eq!(share("gaussian -> oracle", "0"), 1.0);
    assert_eq!(share("oracle -> gaussian", "0"), 0.0);
    assert_eq!(share("gaussian -> oracle", "1"), 0.0);
    assert!(sw.join("switch.png").is_file() && sw.join("switch.json").is_file());

    let rs = dir.path().join("rs");
    let mut args = vec![
        "study",
        "resume",
        "--init-from",
        "embedded@300",
        "--at",
        "1",
        "--out",
        rs.to_str().unwrap(),
    ];
    args.extend(common);
    oracleflow(&args);
    let (_, rows) = csv(&rs.join("resume.csv"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][2].parse::<f64>().unwrap(), 1.0, "{rows:?}");
}
