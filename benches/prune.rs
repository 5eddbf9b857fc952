//! Exact pruning over a whole sampling trajectory, beside our dense pass and a numpy peer,
//! all in one run on the same machine.
//!
//!     cargo bench --bench prune
//!
//! A Heun trajectory (uniform grid, rectified flow, cpu) is integrated twice: with the plain
//! dense pass and with exact pruning. Every evaluation's queries are saved as .npy and
//! replayed by `benches/peers/numpy_replay.py` (PSPC-style chunked online softmax with the
//! matmul expansion; numpy + OpenBLAS). Per step it reports the speed-up of pruning over
//! dense beside the ideal (1 / the fraction of samples an exact pruner must keep: all but a
//! tail of relative weight below 2^-24, from the dense weights of a few queries), the
//! skipped fractions and the largest certificate; then dense vs pruned on unstructured
//! data (gaussian), where pruning must fall back to dense.
//!
//! Environment: ORACLEFLOW_PRUNE_DATA (default fashion-mnist), ORACLEFLOW_PRUNE_B (256),
//! ORACLEFLOW_PRUNE_STEPS (50), ORACLEFLOW_PRUNE_OUT (target/prune-bench),
//! ORACLEFLOW_PRUNE_PYTHON (python3; "none" skips the peer), ORACLEFLOW_PRUNE_GAUSSIAN
//! (a --data spec, default gaussian:60000,784; "none" skips), ORACLEFLOW_PRUNE_IDEAL_Q (8).
//! ORACLEFLOW_PRUNE_AT=0.3,0.5,0.7,0.9 instead times single evaluations at those times
//! (ORACLEFLOW_PRUNE_REPS each, best kept); with ORACLEFLOW_PRUNE_PROFILE=1 the pruned
//! pass prints its phases per call.
//! ORACLEFLOW_PRUNE_QUICK=1 integrates the pruned trajectory alone and prints its stage
//! times (for development: no dense pass, peer or plot).
//! Writes prune_steps.csv, prune_speedup.png and summary.txt in the output folder.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use oracleflow::dataset::{self, write_npy_f32, Dataset, Dtype};
use oracleflow::field::{FieldEval, VelocityField};
use oracleflow::oracle::cpu::CpuOptions;
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::prune::PruneIndex;
use oracleflow::oracle::{BackendKind, Oracle, OracleOutput, Query, QueryStats, Times};
use oracleflow::plot::{line_chart, Chart, Series};
use oracleflow::sample::{initial_noise, integrate, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::Path;
use rayon::prelude::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One evaluation: both oracles on the same states, timed back to back.
struct Eval {
    t: f64,
    dense_s: f64,
    pruned_s: f64,
    x: Vec<f32>,
    stats: Vec<QueryStats>,
    /// |u_pruned - u_dense| / |u_dense|
    rel_diff: f64,
    /// x1_hat of both, for the comparison with f64 (first queries only)
    x1_dense: Vec<f32>,
    x1_pruned: Vec<f32>,
}

/// A field that evaluates both oracles at every call (alternating which goes first, so
/// that load changes on a shared machine hit both alike) and advances with the pruned one.
struct Both<'a, 'd> {
    /// (`None`: the pruned oracle alone, ORACLEFLOW_PRUNE_QUICK)
    dense: Option<Oracle<'d>>,
    pruned: Oracle<'d>,
    log: &'a mut Vec<Eval>,
}

impl VelocityField for Both<'_, '_> {
    fn dim(&self) -> usize {
        self.pruned.dataset().dim()
    }
    fn describe(&self) -> String {
        "dense and pruned oracles, side by side".into()
    }
    fn accepts_classes(&self) -> bool {
        false
    }
    fn evaluations(&self) -> usize {
        self.log.len()
    }
    fn evaluate(
        &mut self,
        x: &[f64],
        t: &[f64],
        _classes: &[Option<u32>],
    ) -> oracleflow::Result<FieldEval> {
        let t = t[0];
        let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let q = Query {
            x: &xs,
            t: Times::Scalar(t as f32),
            class: None,
        };
        let timed = |o: &mut Oracle<'_>| {
            let start = Instant::now();
            let out = o.evaluate(&q);
            (out, start.elapsed().as_secs_f64())
        };
        let Some(dense) = self.dense.as_mut() else {
            let (p, pruned_s) = timed(&mut self.pruned);
            let p = p?;
            if std::env::var("ORACLEFLOW_PRUNE_PROFILE").is_ok() {
                eprintln!("quick: t = {t:.3}: {pruned_s:.4} s");
            }
            self.log.push(Eval {
                t,
                dense_s: f64::NAN,
                pruned_s,
                x: Vec::new(),
                stats: Vec::new(),
                rel_diff: f64::NAN,
                x1_dense: Vec::new(),
                x1_pruned: Vec::new(),
            });
            return Ok(advance(p));
        };
        let ((d, dense_s), (p, pruned_s)) = if self.log.len().is_multiple_of(2) {
            let d = timed(dense);
            (d, timed(&mut self.pruned))
        } else {
            let p = timed(&mut self.pruned);
            (timed(dense), p)
        };
        let (d, p) = (d?, p?);
        let dim = d.x1_hat.len() / d.stats.len().max(1);
        let num: f64 = p
            .velocity
            .iter()
            .zip(&d.velocity)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let den: f64 = d.velocity.iter().map(|&b| (b as f64).powi(2)).sum();
        self.log.push(Eval {
            t,
            dense_s,
            pruned_s,
            x: xs,
            stats: p.stats.clone(),
            rel_diff: (num / den.max(1e-300)).sqrt(),
            x1_dense: d.x1_hat[..d.x1_hat.len().min(IDEAL_KEEP_MAX * dim)].to_vec(),
            x1_pruned: p.x1_hat[..p.x1_hat.len().min(IDEAL_KEEP_MAX * dim)].to_vec(),
        });
        Ok(advance(p))
    }
}

/// The field's answer from the pruned oracle's output (the trajectory advances with it).
fn advance(p: OracleOutput) -> FieldEval {
    FieldEval {
        velocity: p.velocity.iter().map(|&v| v as f64).collect(),
        x1_hat: p.x1_hat.iter().map(|&v| v as f64).collect(),
        stats: Some(p.stats),
    }
}

fn oracle(ds: &Dataset, prune: bool) -> Oracle<'_> {
    Oracle::with_options(
        ds,
        Path::RectifiedFlow,
        BackendKind::Cpu,
        GpuOptions::default(),
        CpuOptions { prune },
    )
    .expect("cpu oracle")
}

/// The trajectory's evaluations, side by side with dense unless `pruned_only`.
fn trajectory(ds: &Dataset, b: usize, times: &[f64], pruned_only: bool) -> Vec<Eval> {
    let mut log = Vec::new();
    let x0: Vec<f64> = (0..b).flat_map(|i| initial_noise(7, i, ds.dim())).collect();
    let mut field = Both {
        dense: (!pruned_only).then(|| oracle(ds, false)),
        pruned: oracle(ds, true),
        log: &mut log,
    };
    let classes = vec![None; x0.len() / field.dim()];
    integrate(&mut field, Solver::Heun, times, x0, &classes, |_, _, _| {}).expect("trajectory");
    log
}

/// ORACLEFLOW_PRUNE_QUICK: the pruned trajectory alone, its time per stage.
fn quick(ds: &Dataset, b: usize, times: &[f64]) {
    let log = trajectory(ds, b, times, true);
    let stage = |lo: f64, hi: f64| -> f64 {
        log.iter()
            .filter(|e| e.t >= lo && e.t < hi)
            .map(|e| e.pruned_s)
            .sum()
    };
    println!(
        "pruned {:.2} s: t < 0.29 {:.2}, 0.29 - 0.43 {:.2}, 0.43 - 0.6 {:.2}, from 0.6 {:.2}",
        stage(0.0, 2.0),
        stage(0.0, 0.29),
        stage(0.29, 0.43),
        stage(0.43, 0.6),
        stage(0.6, 2.0)
    );
}

/// Fraction of samples an exact pruner must keep for query x at t: all but the largest
/// set of smallest weights whose total is below 2^-24 of the whole (f64, from the data).
/// Most queries per evaluation whose x1_hat is kept for the f64 comparison.
const IDEAL_KEEP_MAX: usize = 32;

/// The share an ideal exact pruner keeps for query `x` at `t`, and its f64 x1_hat.
fn ideal_keep(ds: &Dataset, samples: &[Vec<f32>], x: &[f32], t: f64) -> (f64, Vec<f64>) {
    let c = Path::RectifiedFlow.coefs(t);
    let two_s2 = 2.0 * c.sigma_safe().powi(2);
    let mut logits: Vec<f64> = samples
        .par_iter()
        .map(|y| {
            let d2: f64 = x
                .iter()
                .zip(y)
                .map(|(&a, &b)| (a as f64 - c.alpha * b as f64).powi(2))
                .sum();
            -d2 / two_s2
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    logits.iter_mut().for_each(|s| *s = (*s - m).exp());
    let z: f64 = logits.iter().sum();
    let mut mean = vec![0.0f64; x.len()];
    for (w, y) in logits.iter().zip(samples) {
        if *w > 0.0 {
            mean.iter_mut()
                .zip(y)
                .for_each(|(a, &v)| *a += w / z * v as f64);
        }
    }
    logits.sort_unstable_by(|a, b| a.total_cmp(b));
    let (mut tail, mut dropped) = (0.0, 0usize);
    for w in &logits {
        if tail + w >= z * 2f64.powi(-24) {
            break;
        }
        tail += w;
        dropped += 1;
    }
    (1.0 - dropped as f64 / ds.n_samples() as f64, mean)
}

/// Dense and pruned evaluations at fixed times, on x_t = alpha y + sigma eps for training
/// rows y (the states an oracle trajectory visits), each timed `reps` times (best kept).
fn at_times(ds: &Dataset, b: usize, ts: &[f64], reps: usize) {
    // Repeated calls on the same states would screen each other with the (opt-in) carry:
    // single evaluations are timed without it.
    // SAFETY: set before any other thread reads the environment (rayon's workers only run
    // the passes).
    unsafe { std::env::set_var("ORACLEFLOW_PRUNE_CARRY", "0") };
    use rand::{Rng, SeedableRng};
    let (n, d) = (ds.n_samples(), ds.dim());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let rows: Vec<usize> = (0..b).map(|_| rng.random_range(0..n)).collect();
    let noise: Vec<f32> = (0..b * d)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    let mut dense = oracle(ds, false);
    let mut pruned = oracle(ds, true);
    println!(
        "   t   dense s  pruned s  speed-up   kept     tiles skipped  max cert  rel diff  \
         dense-f64 pruned-f64"
    );
    let samples: Vec<Vec<f32>> = (0..n).map(|i| ds.sample(i)).collect();
    for &t in ts {
        let c = Path::RectifiedFlow.coefs(t);
        let mut x = vec![0.0f32; b * d];
        for (q, &r) in rows.iter().enumerate() {
            let y = ds.sample(r);
            for j in 0..d {
                x[q * d + j] = (c.alpha * y[j] as f64 + c.sigma * noise[q * d + j] as f64) as f32;
            }
        }
        let q = Query {
            x: &x,
            t: Times::Scalar(t as f32),
            class: None,
        };
        let mut best = [f64::INFINITY; 2];
        let mut outs = Vec::new();
        let only = std::env::var("ORACLEFLOW_PRUNE_ONLY").is_ok();
        for _ in 0..reps {
            for (k, o) in [&mut dense, &mut pruned].into_iter().enumerate() {
                if only && k == 0 && !outs.is_empty() {
                    continue;
                }
                let start = Instant::now();
                let out = o.evaluate(&q).expect("evaluate");
                best[k] = best[k].min(start.elapsed().as_secs_f64());
                if outs.len() < 2 {
                    outs.push(out);
                }
            }
        }
        let (dv, pv) = (&outs[0].velocity, &outs[1].velocity);
        let num: f64 = pv
            .iter()
            .zip(dv)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let den: f64 = dv.iter().map(|&b| (b as f64).powi(2)).sum();
        let st = &outs[1].stats;
        let mean =
            |f: fn(&QueryStats) -> f32| st.iter().map(|s| f(s) as f64).sum::<f64>() / b as f64;
        let cert = st.iter().map(|s| s.skipped_mass_bound).fold(0.0, f32::max);
        // x1_hat of the first queries against f64.
        let mut errs = [0.0f64; 2];
        for qi in 0..b.min(8) {
            let (_, want) = ideal_keep(ds, &samples, &x[qi * d..(qi + 1) * d], t);
            let den: f64 = want.iter().map(|v| v * v).sum();
            for (e, o) in errs.iter_mut().zip(&outs) {
                let g = &o.x1_hat[qi * d..(qi + 1) * d];
                let num: f64 = g
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - b).powi(2))
                    .sum();
                *e = e.max((num / den.max(1e-300)).sqrt());
            }
        }
        println!(
            "{t:5.3} {:8.4} {:9.4} {:8.1}x {:8.5} {:8.4} {cert:14.3e} {:9.1e} {:9.1e} {:9.1e}",
            best[0],
            best[1],
            best[0] / best[1],
            1.0 - mean(|s| s.samples_skipped),
            mean(|s| s.tiles_skipped),
            (num / den.max(1e-300)).sqrt(),
            errs[0],
            errs[1]
        );
    }
}

fn main() {
    let spec: String = env_or("ORACLEFLOW_PRUNE_DATA", "fashion-mnist".to_string());
    let b: usize = env_or("ORACLEFLOW_PRUNE_B", 256);
    let steps: usize = env_or("ORACLEFLOW_PRUNE_STEPS", 50);
    let out = PathBuf::from(env_or(
        "ORACLEFLOW_PRUNE_OUT",
        "target/prune-bench".to_string(),
    ));
    let python: String = env_or("ORACLEFLOW_PRUNE_PYTHON", "python3".to_string());
    let gaussian: String = env_or(
        "ORACLEFLOW_PRUNE_GAUSSIAN",
        "gaussian:60000,784".to_string(),
    );
    let ideal_q: usize = env_or("ORACLEFLOW_PRUNE_IDEAL_Q", 8);
    std::fs::create_dir_all(&out).expect("output folder");
    let mut summary = String::new();
    let mut say = |s: String| {
        println!("{s}");
        summary.push_str(&s);
        summary.push('\n');
    };

    let ds = dataset::load(&spec, Dtype::F32).unwrap_or_else(|e| panic!("{e}"));
    // ORACLEFLOW_PRUNE_AT=0.3,0.5,...: single evaluations at those times only.
    if let Ok(at) = std::env::var("ORACLEFLOW_PRUNE_AT") {
        let ts: Vec<f64> = at
            .split(',')
            .map(|v| v.trim().parse().expect("t"))
            .collect();
        at_times(&ds, b, &ts, env_or("ORACLEFLOW_PRUNE_REPS", 2));
        return;
    }
    let (n, d) = (ds.n_samples(), ds.dim());
    say(format!(
        "{spec}: N = {n}, D = {d}, B = {b}, {steps}-step Heun (rf), cpu, {} threads",
        rayon::current_num_threads()
    ));
    // Timed here for the report; the pruned oracle builds its own on first use, inside its
    // first evaluation, so the pruned total includes one build.
    let start = Instant::now();
    let built = PruneIndex::build(&ds);
    let build_s = start.elapsed().as_secs_f64();
    match built {
        Some(index) => say(format!(
            "index: {} tiles, {}-d projection, built in {build_s:.2} s (the pruned total includes one)",
            index.n_tiles(),
            index.proj_dims(),
        )),
        None => say("index: none (no low-dimensional structure): pruned runs dense".into()),
    }

    let times = Schedule::uniform(steps).times().expect("grid");
    if std::env::var("ORACLEFLOW_PRUNE_QUICK").is_ok() {
        quick(&ds, b, &times);
        return;
    }
    let evals = trajectory(&ds, b, &times, false);
    let dense_total: f64 = evals.iter().map(|e| e.dense_s).sum();
    let pruned_evals: f64 = evals.iter().map(|e| e.pruned_s).sum();
    let pruned_total = pruned_evals;
    let dense = &evals;

    // The numpy peer replays the dense trajectory's queries.
    let mut numpy: Option<Vec<f64>> = None;
    if python != "none" {
        let data: Vec<f32> = (0..n).flat_map(|i| ds.sample(i)).collect();
        write_npy_f32(out.join("data.npy"), &[n, d], &data).expect("data.npy");
        drop(data);
        let xs: Vec<f32> = dense.iter().flat_map(|e| e.x.iter().copied()).collect();
        write_npy_f32(out.join("queries.npy"), &[dense.len(), b, d], &xs).expect("npy");
        let ts: Vec<f32> = dense.iter().map(|e| e.t as f32).collect();
        write_npy_f32(out.join("times.npy"), &[dense.len()], &ts).expect("times.npy");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/numpy_replay.py");
        match std::process::Command::new(&python)
            .arg(script)
            .arg(&out)
            .status()
        {
            Ok(s) if s.success() => {
                let csv = std::fs::read_to_string(out.join("numpy_times.csv")).expect("csv");
                numpy = Some(
                    csv.lines()
                        .skip(1)
                        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
                        .collect(),
                );
            }
            other => say(format!("numpy peer not measured ({other:?})")),
        }
        for f in ["data.npy", "queries.npy"] {
            let _ = std::fs::remove_file(out.join(f));
        }
    }

    // Ideal keep fraction from the dense weights of the first few queries of every eval.
    let samples: Vec<Vec<f32>> = (0..n).map(|i| ds.sample(i)).collect();
    let mut csv = String::from(
        "eval,t,dense_s,pruned_s,numpy_s,speedup,ideal_keep,kept,tiles_skipped,max_cert,\
         rel_diff,dense_x1_err,pruned_x1_err\n",
    );
    let (mut pts_speed, mut pts_ideal) = (Vec::new(), Vec::new());
    let mut max_cert = 0.0f32;
    say(
        "   t   dense s  pruned s  speed-up  ideal  kept    tiles skipped  max cert  \
         rel diff  dense-f64 pruned-f64"
            .into(),
    );
    let mut max_diff = 0.0f64;
    let mut max_errs = [0.0f64; 2];
    for (i, e) in evals.iter().enumerate() {
        let (de, pe) = (e, e);
        max_diff = max_diff.max(e.rel_diff);
        let n_ideal = ideal_q.min(b).min(IDEAL_KEEP_MAX);
        let ideal: Vec<(f64, Vec<f64>)> = (0..n_ideal)
            .map(|q| ideal_keep(&ds, &samples, &de.x[q * d..(q + 1) * d], de.t))
            .collect();
        let keep: f64 = ideal.iter().map(|i| i.0).sum::<f64>() / n_ideal as f64;
        // Largest relative distance of dense's and pruned's x1_hat from f64, over those queries.
        let f64_err = |got: &[f32]| {
            ideal
                .iter()
                .enumerate()
                .map(|(q, (_, want))| {
                    let g = &got[q * d..(q + 1) * d];
                    let num: f64 = g
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (*a as f64 - b).powi(2))
                        .sum();
                    let den: f64 = want.iter().map(|b| b * b).sum();
                    (num / den.max(1e-300)).sqrt()
                })
                .fold(0.0f64, f64::max)
        };
        let (dense_err, pruned_err) = (f64_err(&e.x1_dense), f64_err(&e.x1_pruned));
        max_errs = [max_errs[0].max(dense_err), max_errs[1].max(pruned_err)];
        let mean = |f: fn(&QueryStats) -> f32| {
            pe.stats.iter().map(|s| f(s) as f64).sum::<f64>() / pe.stats.len() as f64
        };
        let kept = 1.0 - mean(|s| s.samples_skipped);
        let tiles = mean(|s| s.tiles_skipped);
        let cert = pe
            .stats
            .iter()
            .map(|s| s.skipped_mass_bound)
            .fold(0.0, f32::max);
        max_cert = max_cert.max(cert);
        let speed = e.dense_s / e.pruned_s;
        let np = numpy.as_ref().map_or(f64::NAN, |v| v[i]);
        csv.push_str(&format!(
            "{i},{:.4},{:.5},{:.5},{np:.5},{speed:.3},{keep:.6},{kept:.6},{tiles:.6},{cert:e},\
             {:.3e},{dense_err:.3e},{pruned_err:.3e}\n",
            e.t, e.dense_s, e.pruned_s, e.rel_diff
        ));
        say(format!(
            "{:5.3} {:8.4} {:9.4} {speed:8.1}x {keep:7.4} {kept:7.4} {tiles:8.4} {cert:14.3e} \
             {:9.1e} {dense_err:9.1e} {pruned_err:9.1e}",
            e.t, e.dense_s, e.pruned_s, e.rel_diff
        ));
        pts_speed.push((de.t, speed.log10()));
        pts_ideal.push((de.t, (1.0 / keep.max(1.0 / n as f64)).log10()));
    }
    std::fs::write(out.join("prune_steps.csv"), csv).expect("csv");
    let y_hi = pts_ideal
        .iter()
        .chain(&pts_speed)
        .map(|p| p.1)
        .fold(1.0, f64::max)
        .ceil();
    let y_lo = pts_speed.iter().map(|p| p.1).fold(0.0, f64::min).floor();
    let img = line_chart(
        &Chart {
            title: "exact pruning vs dense per evaluation (Heun, cpu)",
            x_label: "t",
            y_label: "log10 speed-up",
            x_range: (0.0, 1.0),
            y_range: (y_lo, y_hi),
            markers: &[],
        },
        &[
            Series {
                name: "pruned vs dense (measured)",
                points: pts_speed,
            },
            Series {
                name: "ideal: 1 / fraction an exact pruner must keep",
                points: pts_ideal,
            },
        ],
    )
    .expect("chart");
    img.save(out.join("prune_speedup.png")).expect("png");

    say(format!(
        "trajectory total ({} evaluations): dense {dense_total:.2} s, pruned {pruned_total:.2} s \
         (incl. its index build), speed-up {:.2}x; largest |u_pruned - u_dense| / |u_dense| \
         {max_diff:.1e}",
        evals.len(),
        dense_total / pruned_total
    ));
    say(format!(
        "x1_hat vs f64 (first {} queries of each evaluation): dense within {:.1e}, pruned within \
         {:.1e}",
        ideal_q.min(b).min(IDEAL_KEEP_MAX),
        max_errs[0],
        max_errs[1]
    ));
    if let Some(np) = &numpy {
        let t: f64 = np.iter().sum();
        say(format!(
            "numpy peer (chunked online softmax, OpenBLAS): {t:.2} s; pruned is {:.2}x faster",
            t / pruned_total
        ));
    }
    let late: Vec<f64> = evals
        .iter()
        .filter(|e| e.t >= 0.6)
        .map(|e| e.dense_s / e.pruned_s)
        .collect();
    if !late.is_empty() {
        say(format!(
            "per-evaluation speed-up for t >= 0.6: min {:.1}x, median {:.1}x",
            late.iter().cloned().fold(f64::INFINITY, f64::min),
            median(late.clone())
        ));
    }
    say(format!(
        "largest certificate (skipped mass bound): {max_cert:e}"
    ));
    drop(samples);

    if gaussian != "none" {
        let g = dataset::load(&gaussian, Dtype::F32).unwrap_or_else(|e| panic!("{e}"));
        let g_steps = (steps / 5).max(2);
        let g_times = Schedule::uniform(g_steps).times().expect("grid");
        let gb = b.min(64);
        let ge = trajectory(&g, gb, &g_times, false);
        let td: f64 = ge.iter().map(|e| e.dense_s).sum();
        let tp: f64 = ge.iter().map(|e| e.pruned_s).sum();
        let pruned_evals = ge
            .iter()
            .filter(|e| e.stats.iter().any(|s| s.samples_skipped > 0.0))
            .count();
        say(format!(
            "{gaussian}: {g_steps}-step Heun, B = {gb}: dense {td:.2} s, pruned {tp:.2} s \
             (incl. the structure test; {pruned_evals} of {} evaluations pruned), \
             pruned/dense = {:.3}",
            ge.len(),
            tp / td
        ));
    }
    let mut f = std::fs::File::create(out.join("summary.txt")).expect("summary");
    f.write_all(summary.as_bytes()).expect("summary");
    println!("wrote {}", out.display());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
