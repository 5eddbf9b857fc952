//! Several devices on one evaluation (`--devices`, `oracle::shard::devices`): each takes a
//! share of the rows and their partial states merge exactly.
//!
//! Tolerances:
//! - Against one device of the same kind (cpu shards vs one cpu backend): 1e-6 relative (L2)
//!   on velocity and x1_hat. The same logits are computed (the GEMM sums over D in the same
//!   order whatever the tile), only the order of the rescale-and-add merges changes, which
//!   moves results by a few f32 roundings (~1e-7).
//! - lavapipe + cpu against one device: lavapipe's own logits round differently from the
//!   cpu's, by ~1e-7 times the logit scale c_dot |x||y| (1/sigma^2 late in the path). At the
//!   times tested (t <= 0.9) that stays within 1e-6 relative; beyond it the two single
//!   devices differ from each other by as much (see tests/oracle_backends.rs for their
//!   tolerances against f64), so we compare against the f64 reference there.
//! - x1_hat is held to twice that (2e-6): measured worst 1.07e-6 (two pruned cpu shards vs
//!   one on Fashion-MNIST, t = 0.6, class 0; the shards prune and group queries differently,
//!   so logits of up to ~3e3 are summed in another order) and 1.04e-6 (lavapipe + cpu vs
//!   lavapipe, f16, t = 0.3); the velocity stays within 1e-6 in every case (worst 7.4e-7).
//! - On Fashion-MNIST (D = 784, |x||y| ~ 400) the f32 logits themselves round differently
//!   from one evaluation to another (lavapipe vs cpu, or the cpu GEMM over other tile
//!   widths), by ~1e-7 c_dot |x||y|: at t <= 0.6 (c_dot <= 3.75) results stay within 5e-6
//!   (measured worst: 1.4e-6 velocity, 1.7e-6 x1_hat, lavapipe + cpu vs one device); at
//!   t = 0.9 (c_dot = 90) even two dense cpu shards differ from one cpu by 3.8e-5, as two
//!   single devices do. There the f64 reference (1e-4) is the judge, not one device.
//! - Against the f64 reference: 1e-4 (the backends' own tolerance).
//! - Stats (top-1 weight, entropy, ESS, posterior variance): 1e-4 relative to max(|v|, 1e-2)
//!   against one device; top-1 index equal. Entropy (ln l - t/l) and variance
//!   (sum_norm/l - |mean|^2) are differences of f32 sums whose rounding the merge order moves,
//!   by up to ~5e-5 measured.

mod common;

use std::process::Command;

use common::*;
use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
use oracleflow::oracle::shard::{DeviceList, ShardedBackend};
use oracleflow::oracle::{
    reference, Backend, BackendKind, Oracle, OracleOutput, Query, QueryStats, Times,
};
use oracleflow::Path;

const PATH: Path = Path::RectifiedFlow;
const STATS_TOL: f64 = 1e-4;
const ALL_TIMES: [f32; 5] = [0.0, 0.3, 0.6, 0.9, 0.97];
const EARLY_TIMES: [f32; 3] = [0.0, 0.3, 0.6];
/// Fashion-MNIST (D = 784, |y| ~ 20): see the module docs.
const FASHION_TOL: f64 = 5e-6;

fn evaluate(oracle: &mut Oracle, x: &[f32], t: f32, class: Option<u32>) -> OracleOutput {
    oracle
        .evaluate(&Query {
            x,
            t: Times::Scalar(t),
            class,
        })
        .unwrap()
}

/// (velocity, x1_hat) relative L2 differences and the largest difference of each stat.
fn compare(a: &OracleOutput, b: &OracleOutput) -> (f64, f64, [f64; 4]) {
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let ev = rel_err(&a.velocity, &wide(&b.velocity));
    let eh = rel_err(&a.x1_hat, &wide(&b.x1_hat));
    let mut es = [0.0f64; 4];
    for (s, w) in a.stats.iter().zip(&b.stats) {
        for ((e, x), y) in es.iter_mut().zip(stats_values(s)).zip(stats_values(w)) {
            *e = e.max((x - y).abs() / y.abs().max(1e-2));
        }
    }
    (ev, eh, es)
}

fn stats_values(s: &QueryStats) -> [f64; 4] {
    [
        s.top1_weight as f64,
        s.entropy as f64,
        s.ess as f64,
        s.posterior_variance as f64,
    ]
}

fn cpu(ds: &Dataset, prune: bool) -> Box<dyn Backend + '_> {
    Box::new(CpuBackend::with_options(ds, CpuOptions { prune }))
}

fn check_against_reference(
    ds: &Dataset,
    got: &OracleOutput,
    x: &[f32],
    t: f32,
    class: Option<u32>,
) {
    let q = Query {
        x,
        t: Times::Scalar(t),
        class,
    };
    let want = reference::evaluate_f64(ds, PATH, &q, ds.rows_for(class).unwrap());
    let ev = rel_err(&got.velocity, &want.velocity);
    let eh = rel_err(&got.x1_hat, &want.x1_hat);
    assert!(
        ev < 1e-4 && eh < 1e-4,
        "t={t} class={class:?}: vs f64 {ev:e} {eh:e}"
    );
}

/// Shards against one device on `ds`, at several times, unconditional and per class.
fn check_shards(
    ds: &Dataset,
    mut single: Oracle,
    mut sharded: Oracle,
    times: &[f32],
    tol: f64,
    what: &str,
) -> (f64, f64) {
    let classes: Vec<Option<u32>> = std::iter::once(None)
        .chain(ds.class_counts().iter().take(2).map(|(c, _)| Some(*c)))
        .collect();
    let (mut worst, mut worst_stats) = (0.0f64, 0.0f64);
    for &t in times {
        for &class in &classes {
            let x = path_queries(ds, PATH, t, 13, 7 + (t * 10.0) as u64);
            let a = evaluate(&mut sharded, &x, t, class);
            let b = evaluate(&mut single, &x, t, class);
            let (ev, eh, es) = compare(&a, &b);
            assert!(
                ev < tol && eh < 2.0 * tol && es.iter().all(|&e| e < STATS_TOL),
                "{what} t={t} class={class:?}: velocity {ev:e}, x1_hat {eh:e}, \
                 stats (top-1 weight, entropy, ESS, variance) {es:?}"
            );
            for (q, (s, w)) in a.stats.iter().zip(&b.stats).enumerate() {
                assert_eq!(s.top1_index, w.top1_index, "{what} t={t} query {q}");
            }
            check_against_reference(ds, &a, &x, t, class);
            worst = worst.max(ev).max(eh);
            worst_stats = es.iter().fold(worst_stats, |m, &e| m.max(e));
        }
    }
    eprintln!("{what}: max relative difference to one device {worst:e} (stats {worst_stats:e})");
    (worst, worst_stats)
}

#[test]
fn cpu_shards_equal_one_cpu_on_gaussians_odd_sizes_f32_and_f16() {
    for dtype in [Dtype::F32, Dtype::F16] {
        // Odd N and D; weights 1:2:1 put the cuts mid-tile.
        let ds = gaussian_dataset(1001, 37, 3, dtype);
        let single = Oracle::with_backend(&ds, PATH, cpu(&ds, false), BackendKind::Cpu);
        let shards = ShardedBackend::from_backends(vec![
            (cpu(&ds, false), 1.0),
            (cpu(&ds, false), 2.0),
            (cpu(&ds, false), 1.0),
        ]);
        let sharded = Oracle::with_backend(&ds, PATH, Box::new(shards), BackendKind::Cpu);
        check_shards(
            &ds,
            single,
            sharded,
            &ALL_TIMES,
            1e-6,
            &format!("3 cpu shards {dtype:?}"),
        );
    }
}

#[test]
fn more_shards_than_rows_of_a_class() {
    // Class 2 has 3 rows here: some of the 5 shards get none and add nothing.
    let ds = gaussian_dataset(8, 5, 4, Dtype::F32);
    let single = Oracle::with_backend(&ds, PATH, cpu(&ds, false), BackendKind::Cpu);
    let shards = ShardedBackend::from_backends((0..5).map(|_| (cpu(&ds, false), 1.0)).collect());
    let sharded = Oracle::with_backend(&ds, PATH, Box::new(shards), BackendKind::Cpu);
    check_shards(
        &ds,
        single,
        sharded,
        &ALL_TIMES,
        1e-6,
        "5 cpu shards over 8 rows",
    );
}

#[test]
fn cpu_shards_equal_one_cpu_on_fashion_mnist_dense_and_pruned() {
    let Some(_) = fashion_mnist() else { return };
    let ds = dataset::load("fashion-mnist@6000", Dtype::F32).unwrap();
    for prune in [false, true] {
        let single = Oracle::with_backend(&ds, PATH, cpu(&ds, prune), BackendKind::Cpu);
        let shards =
            ShardedBackend::from_backends(vec![(cpu(&ds, prune), 1.0), (cpu(&ds, prune), 1.0)]);
        let sharded = Oracle::with_backend(&ds, PATH, Box::new(shards), BackendKind::Cpu);
        // Dense: the same logits, merged in another order, at every time. Pruned: each
        // shard groups its queries and survivors differently, which reorders the sums of
        // logits up to ~1e5 late in the path (see the module docs).
        check_shards(
            &ds,
            single,
            sharded,
            &EARLY_TIMES,
            FASHION_TOL,
            &format!("2 cpu shards (prune {prune}), Fashion-MNIST"),
        );
    }
}

#[test]
fn lavapipe_and_cpu_equal_one_device() {
    if skip_gpu() {
        return;
    }
    let list: DeviceList = "0,cpu".parse().unwrap();
    for (spec, dtype) in [
        ("gaussian:999,61", Dtype::F32),
        ("gaussian:999,61", Dtype::F16),
        ("fashion-mnist@3001", Dtype::F32),
    ] {
        if spec.starts_with("fashion") && fashion_mnist().is_none() {
            continue;
        }
        let ds = dataset::load(spec, dtype).unwrap();
        let opts = Default::default();
        let make = || {
            let b = ShardedBackend::new(&ds, &list, &opts, CpuOptions { prune: false }).unwrap();
            assert!(b.has_gpu() && b.n_workers() == 2);
            Oracle::with_backend(&ds, PATH, Box::new(b), BackendKind::Gpu)
        };
        let what = format!("lavapipe + cpu, {spec} {dtype:?}");
        let cpu_single = Oracle::with_backend(&ds, PATH, cpu(&ds, false), BackendKind::Cpu);
        // On Fashion-MNIST late in the path two devices' logits (up to ~1e5) round apart by
        // more than 1e-6 whatever the sharding: there the f64 reference judges (module docs).
        let (times, tol): (&[f32], f64) = if spec.starts_with("fashion") {
            (&EARLY_TIMES, FASHION_TOL)
        } else {
            (&ALL_TIMES, 1e-6)
        };
        check_shards(
            &ds,
            cpu_single,
            make(),
            times,
            tol,
            &format!("{what} vs cpu"),
        );
        if dtype == Dtype::F16 && !gpu_f16_available() {
            continue;
        }
        let gpu_single = Oracle::new(&ds, PATH, BackendKind::Gpu).unwrap();
        check_shards(
            &ds,
            gpu_single,
            make(),
            times,
            tol,
            &format!("{what} vs lavapipe"),
        );
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_oracleflow"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

#[test]
fn info_lists_adapters_with_indices() {
    if skip_gpu() {
        return;
    }
    let out = bin().arg("info").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("adapters (--devices):"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("0: ")),
        "{text}"
    );
}

#[test]
fn velocity_with_devices_equals_one_device() {
    if skip_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset::load("gaussian:500,20", Dtype::F32).unwrap();
    // t = 0.5: at t = 0.7 lavapipe's and the cpu's own logits already round apart by
    // 1.25e-6 here (measured), whatever the split; see the module docs.
    let x = path_queries(&ds, PATH, 0.5, 9, 1);
    let q = dir.path().join("q.npy");
    oracleflow::dataset::write_npy_f32(&q, &[9, 20], &x).unwrap();
    let run = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let st = bin()
            .args([
                "velocity",
                "--data",
                "gaussian:500,20",
                "--t",
                "0.5",
                "--queries",
            ])
            .arg(&q)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        oracleflow::dataset::read_npy_f32(&out).unwrap().1
    };
    let one = run(&["--backend", "cpu"], "one.npy");
    let many = run(&["--devices", "all,cpu"], "many.npy");
    let one64: Vec<f64> = one.iter().map(|&v| v as f64).collect();
    let e = rel_err(&many, &one64);
    eprintln!("velocity --devices all,cpu vs --backend cpu: {e:e}");
    assert!(e < 1e-6, "{e:e}");
    // A bad list is bad input (exit 2) naming the flag.
    let st = bin()
        .args([
            "velocity",
            "--data",
            "gaussian:500,20",
            "--t",
            "0.5",
            "--queries",
        ])
        .arg(&q)
        .arg("--out")
        .arg(dir.path().join("bad.npy"))
        .args(["--devices", "0,0"])
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&st.stderr).contains("--devices"));
}

/// A build without the `mpi` feature started by mpirun would have every rank do the whole
/// work and write the same files: it refuses (bad usage, exit 2) and says how to build.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_under_mpirun() {
    let out = bin()
        .arg("info")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features mpi"));
}
