//! Out-of-core datasets (`dataset::disk`): a .npy several times larger than the memory
//! budget, streamed from disk, gives the in-memory oracle's results (cpu and gpu, f32 and
//! f16, with a class); the stats sidecar is reused, and recomputed when stale or corrupt;
//! the anonymous memory of a streaming `oracleflow velocity` stays within the budget.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use oracleflow::dataset::disk::{self, sidecar_path};
use oracleflow::dataset::{npy, Dataset, Dtype};
use oracleflow::oracle::cpu::CpuOptions;
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{BackendKind, Oracle, OracleOutput, Query, QueryStats, Times};
use oracleflow::Path as FlowPath;

const N: usize = 3000;
const D: usize = 200;
/// 256 KiB: the f32 file (2.4 MB) is ~9 times the budget, the f16 one ~4.6 times.
const BUDGET: u64 = 256 << 10;

fn oracleflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .env("ORACLEFLOW_TEST", "1")
        .env("ORACLEFLOW_MEMORY_REPORT", "1")
        .output()
        .expect("run oracleflow")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An N x D mixture of 5 classes around an offset of 3 (so centring matters), rows in a
/// shuffled class order (so a class's rows are scattered through the file), written as
/// `<f4` or `<f2` with int64 labels beside it.
fn write_data(dir: &Path, n: usize, d: usize, descr: &str) -> (PathBuf, PathBuf) {
    let mut r = common::rng(7);
    let centres = common::normal(&mut r, 5 * d);
    let noise = common::normal(&mut r, n * d);
    let labels: Vec<i64> = (0..n).map(|i| ((i * 7 + i / 3) % 5) as i64).collect();
    let values: Vec<f32> = (0..n * d)
        .map(|k| 3.0 + centres[labels[k / d] as usize * d + k % d] + 0.3 * noise[k])
        .collect();
    let data = dir.join(format!("data{}.npy", &descr[1..]));
    let labels_path = dir.join(format!("labels{}.npy", &descr[1..]));
    npy::write_npy_with(&data, descr, &[n, d], |w| {
        for v in &values {
            match descr {
                "<f4" => w.write_all(&v.to_le_bytes())?,
                _ => w.write_all(&half::f16::from_f32(*v).to_le_bytes())?,
            }
        }
        Ok(())
    })
    .unwrap();
    npy::write_npy_with(&labels_path, "<i8", &[n], |w| {
        labels
            .iter()
            .try_for_each(|l| w.write_all(&l.to_le_bytes()))
    })
    .unwrap();
    (data, labels_path)
}

/// ||a - b|| / ||b||.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The two outputs agree within 1e-6 relative: velocity, x1_hat and every statistic
/// (top-1 indices exactly).
fn assert_equal(got: &OracleOutput, want: &OracleOutput, variance_scale: f64, what: &str) {
    let tol = 1e-6;
    let v = rel(&got.velocity, &want.velocity);
    let h = rel(&got.x1_hat, &want.x1_hat);
    assert!(v < tol && h < tol, "{what}: velocity {v:e}, x1_hat {h:e}");
    let field = |o: &OracleOutput, f: fn(&QueryStats) -> f32| -> Vec<f32> {
        o.stats.iter().map(f).collect()
    };
    for (name, f) in [
        (
            "top1_weight",
            (|s: &QueryStats| s.top1_weight) as fn(&QueryStats) -> f32,
        ),
        ("entropy", |s| s.entropy),
        ("ess", |s| s.ess),
    ] {
        let e = rel(&field(got, f), &field(want, f));
        assert!(e < tol, "{what}: {name} differs by {e:e}");
    }
    // The posterior variance is a difference of two f32 terms, E|y|^2 / D - |x1_hat|^2 / D:
    // its error is relative to those terms (here the mean |y|^2 / D), not to itself.
    let pv = |o: &OracleOutput| field(o, |s| s.posterior_variance);
    for (a, b) in pv(got).iter().zip(&pv(want)) {
        assert!(
            ((a - b) as f64).abs() <= tol * variance_scale,
            "{what}: posterior variance {a} vs {b} (scale {variance_scale})"
        );
    }
    let idx = |o: &OracleOutput| o.stats.iter().map(|s| s.top1_index).collect::<Vec<_>>();
    assert_eq!(idx(got), idx(want), "{what}: top-1 indices");
}

/// Evaluates `queries` at several times, unconditional and for class 2, on both datasets.
fn compare(disk_ds: &Dataset, mem: &Dataset, kind: BackendKind, gpu: GpuOptions, what: &str) {
    let path = FlowPath::RectifiedFlow;
    let mut a =
        Oracle::with_options(disk_ds, path, kind, gpu.clone(), CpuOptions::default()).unwrap();
    // The streamed pass is dense, so it is compared with the in-memory dense pass: pruning
    // computes its logits in other GEMM shapes, whose f32 rounding at late t differs from
    // dense's by more than 1e-6 where dense's own error does (tests/prune.rs bounds that).
    let mut b = Oracle::with_options(mem, path, kind, gpu, CpuOptions { prune: false }).unwrap();
    assert!(a.describe().contains("disk"), "{}", a.describe());
    let variance_scale = mem.sq_norms().iter().map(|&v| v as f64).sum::<f64>()
        / (mem.n_samples() * mem.dim()) as f64;
    for (t, class) in [
        (0.3f32, None),
        (0.8, None),
        (0.7, Some(2u32)),
        (0.95, Some(4)),
    ] {
        let x = common::path_queries(mem, path, t, 9, 11);
        let q = Query {
            x: &x,
            t: Times::Scalar(t),
            class,
        };
        let got = a.evaluate(&q).unwrap();
        let want = b.evaluate(&q).unwrap();
        assert_equal(
            &got,
            &want,
            variance_scale,
            &format!("{what}, t = {t}, class {class:?}"),
        );
    }
}

fn datasets(data: &Path, labels: &Path, dtype: Dtype) -> (Dataset, Dataset) {
    let streamed = disk::open(data, Some(labels), None, dtype, BUDGET).unwrap();
    let mem = npy::load(data, Some(labels), None, dtype).unwrap();
    assert!(streamed.disk().is_some() && mem.disk().is_none());
    // The same stored problem: mean, norms, row order, labels.
    assert_eq!(streamed.mean(), mem.mean());
    assert_eq!(streamed.sq_norms(), mem.sq_norms());
    assert_eq!(streamed.labels(), mem.labels());
    assert_eq!(streamed.class_counts(), mem.class_counts());
    for row in [0, 1, 777, N - 1] {
        assert_eq!(streamed.original_index(row), mem.original_index(row));
        assert_eq!(streamed.sample(row), mem.sample(row));
    }
    (streamed, mem)
}

#[test]
fn streamed_equals_in_memory_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for (descr, dtype) in [
        ("<f4", Dtype::F32),
        ("<f4", Dtype::F16),
        ("<f2", Dtype::F16),
    ] {
        let (data, labels) = write_data(dir.path(), N, D, descr);
        let file_bytes = std::fs::metadata(&data).unwrap().len();
        assert!(file_bytes > 4 * BUDGET, "the file must be several budgets");
        let (s, m) = datasets(&data, &labels, dtype);
        compare(
            &s,
            &m,
            BackendKind::Cpu,
            GpuOptions::default(),
            &format!("cpu {descr} as {dtype:?}"),
        );
        // The tiles read: every row at least once.
        assert!(s.disk().unwrap().bytes_read() >= file_bytes - 128);
    }
}

#[test]
fn streamed_equals_in_memory_on_gpu() {
    if !common::enabled(BackendKind::Gpu) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (descr, dtype) in [("<f4", Dtype::F32), ("<f2", Dtype::F16)] {
        let (data, labels) = write_data(dir.path(), N, D, descr);
        let (s, m) = datasets(&data, &labels, dtype);
        // Resident (uploaded once from the file) and streamed through the device ring
        // (refilled from the file on every call).
        for (ring, gpu) in [
            (false, GpuOptions::default()),
            (
                true,
                GpuOptions {
                    max_resident_bytes: Some(200 << 10),
                    ..GpuOptions::default()
                },
            ),
        ] {
            let o = Oracle::with_options(
                &s,
                FlowPath::RectifiedFlow,
                BackendKind::Gpu,
                gpu.clone(),
                CpuOptions::default(),
            )
            .unwrap();
            assert_eq!(
                o.describe().contains("refilled from disk"),
                ring,
                "{}",
                o.describe()
            );
            drop(o);
            compare(
                &s,
                &m,
                BackendKind::Gpu,
                gpu,
                &format!("gpu {descr}, ring {ring}"),
            );
        }
    }
}

/// The sidecar's checksum (FNV-1a 64 over everything before it), for forging one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

#[test]
fn sidecar_is_reused_and_recomputed_when_stale_or_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (data, labels) = write_data(dir.path(), 600, 40, "<f4");
    let side = sidecar_path(&data);
    assert!(!side.exists());
    let first = disk::open(&data, Some(&labels), None, Dtype::F32, 1).unwrap();
    let mean = first.mean().to_vec();
    let written = std::fs::read(&side).expect("sidecar written beside the data");
    assert_eq!(written.len(), 8 + 8 + 16 + 8 * 3 + 2 + (40 + 600) * 4 + 8);

    // Reused: a forged sidecar (valid key and checksum, mean[0] changed) is believed.
    let mut forged = written.clone();
    let mean_at = written.len() - 8 - (40 + 600) * 4;
    forged[mean_at..mean_at + 4].copy_from_slice(&12345.0f32.to_le_bytes());
    let body = forged.len() - 8;
    let sum = fnv1a(&forged[..body]);
    forged[body..].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&side, &forged).unwrap();
    let reused = disk::open(&data, Some(&labels), None, Dtype::F32, 1).unwrap();
    assert_eq!(reused.mean()[0], 12345.0, "the sidecar's stats were used");
    assert_eq!(
        std::fs::read(&side).unwrap(),
        forged,
        "a valid sidecar is not rewritten"
    );

    // Stale: touching the data file (new modification time) recomputes and rewrites it.
    let file = std::fs::File::options().write(true).open(&data).unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(file);
    let touched = disk::open(&data, Some(&labels), None, Dtype::F32, 1).unwrap();
    assert_eq!(touched.mean(), &mean[..]);
    let rewritten = std::fs::read(&side).unwrap();
    assert_ne!(rewritten[..mean_at], written[..mean_at], "new key (mtime)");
    assert_eq!(
        rewritten[mean_at..rewritten.len() - 8],
        written[mean_at..written.len() - 8]
    );

    // Corrupt (a flipped byte, then a truncated file, then garbage): recomputed, rewritten.
    for damage in 0..3 {
        let mut bad = std::fs::read(&side).unwrap();
        match damage {
            0 => bad[mean_at + 9] ^= 0x40,
            1 => bad.truncate(bad.len() / 2),
            _ => bad = b"not a sidecar".to_vec(),
        }
        std::fs::write(&side, &bad).unwrap();
        let again = disk::open(&data, Some(&labels), None, Dtype::F32, 1).unwrap();
        assert_eq!(again.mean(), &mean[..], "damage {damage}");
        assert_eq!(std::fs::read(&side).unwrap(), rewritten, "damage {damage}");
    }

    // Another storage dtype has other norms: a sidecar of its own key.
    let f16 = disk::open(&data, Some(&labels), None, Dtype::F16, 1).unwrap();
    let mem16 = npy::load(&data, Some(&labels), None, Dtype::F16).unwrap();
    assert_eq!(f16.sq_norms(), mem16.sq_norms());
}

fn write_queries(dir: &Path, ds: &Dataset, t: f32) -> PathBuf {
    let x = common::path_queries(ds, FlowPath::RectifiedFlow, t, 6, 3);
    let q = dir.join(format!("q{t}.npy"));
    npy::write_npy_f32(&q, &[6, ds.dim()], &x).unwrap();
    q
}

#[test]
fn velocity_sample_and_stages_stream_under_a_tiny_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (data, labels) = write_data(dir.path(), N, D, "<f4");
    let spec = format!("npy:{},{}", data.display(), labels.display());
    let mem = npy::load(&data, Some(&labels), None, Dtype::F32).unwrap();
    let q = write_queries(dir.path(), &mem, 0.7);
    let run = |budget: &str, tag: &str, backend: &str| {
        let (v, h, s) = (
            dir.path().join(format!("v{tag}.npy")),
            dir.path().join(format!("h{tag}.npy")),
            dir.path().join(format!("s{tag}.csv")),
        );
        let o = oracleflow(&[
            "velocity",
            "--data",
            &spec,
            "--queries",
            q.to_str().unwrap(),
            "--t",
            "0.7",
            "--class",
            "3",
            "--out",
            v.to_str().unwrap(),
            "--x1-hat",
            h.to_str().unwrap(),
            "--stats",
            s.to_str().unwrap(),
            "--backend",
            backend,
            "--memory-budget",
            budget,
            // Streaming is dense: compared with the dense pass in memory (the pruned
            // passes' agreement with dense and f64 is tests/prune.rs's, with tolerances
            // that include f32 logits' rounding; at t = 0.7 it moves the velocity by ~1e-6).
            "--exact-dense",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        (
            o,
            npy::read_npy_f32(&v).unwrap().1,
            npy::read_npy_f32(&h).unwrap().1,
        )
    };
    let (o_mem, v_mem, h_mem) = run("4096", "mem", "cpu");
    assert!(
        !stderr(&o_mem).contains("streamed from disk"),
        "{}",
        stderr(&o_mem)
    );
    let mut backends = vec!["cpu"];
    if common::enabled(BackendKind::Gpu) {
        backends.push("gpu");
    }
    for backend in backends {
        let (o, v, h) = run("1", &format!("disk{backend}"), backend);
        if backend == "cpu" {
            assert!(stderr(&o).contains("streamed from disk"), "{}", stderr(&o));
        }
        assert!(
            rel(&v, &v_mem) < 1e-6 && rel(&h, &h_mem) < 1e-6,
            "{backend}"
        );
    }

    // sample and stages: the same outputs as in memory.
    let sample = |budget: &str, out: &Path| {
        let o = oracleflow(&[
            "sample",
            "--data",
            &spec,
            "-n",
            "4",
            "--steps",
            "6",
            "--backend",
            "cpu",
            "--class",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--memory-budget",
            budget,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        npy::read_npy_f32(out.join("samples.npy")).unwrap().1
    };
    let a = sample("4096", &dir.path().join("s_mem"));
    let b = sample("0.25", &dir.path().join("s_disk"));
    assert!(rel(&b, &a) < 1e-5, "samples differ by {:e}", rel(&b, &a));

    let stages = |budget: &str, out: &Path| {
        let o = oracleflow(&[
            "stages",
            "--data",
            &spec,
            "--pairs",
            "16",
            "--steps",
            "5",
            "--backend",
            "cpu",
            "--out",
            out.to_str().unwrap(),
            "--memory-budget",
            budget,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let csv = std::fs::read_to_string(out.join("stages.csv")).unwrap();
        csv.lines()
            .skip(1)
            .flat_map(|l| {
                l.split(',')
                    .filter_map(|f| f.parse::<f32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<f32>>()
    };
    let a = stages("4096", &dir.path().join("g_mem"));
    let b = stages("0.25", &dir.path().join("g_disk"));
    assert!(!a.is_empty());
    assert!(
        rel(&b, &a) < 1e-5,
        "stage curves differ by {:e}",
        rel(&b, &a)
    );
}

/// kB of one field of a `memory: VmHWM: ... RssAnon: ...` report line.
fn reported_kib(o: &Output, field: &str) -> u64 {
    let err = stderr(o);
    let line = err
        .lines()
        .find(|l| l.starts_with("memory:"))
        .expect("memory report");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.starts_with(field))
        .expect(field);
    words[at + 1].parse().unwrap()
}

/// Peak RssAnon (sampled every 2 ms from /proc/PID/status) and the exit report.
fn run_measured(args: &[&str]) -> (u64, Output) {
    let child = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
        .args(args)
        .env("ORACLEFLOW_MEMORY_REPORT", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0u64;
            while let Ok(text) = std::fs::read_to_string(&status) {
                if text.contains("State:\tZ") {
                    break;
                }
                if let Some(kib) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak = peak.max(kib);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        sampler.join().unwrap()
    });
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    (peak, out)
}

/// The threads the child's rayon pool runs: RAYON_NUM_THREADS when set, else the cores.
fn worker_threads() -> u64 {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
}

#[test]
fn anonymous_memory_stays_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    // 48 MiB of f32 values against an 8 MiB budget.
    let (n, d) = (49152, 256);
    let (data, _) = write_data(dir.path(), n, d, "<f4");
    let mem_probe = disk::open(&data, None, Some(8), Dtype::F32, 1).unwrap();
    let q = write_queries(dir.path(), &mem_probe, 0.5);
    let out = dir.path().join("v.npy");
    let args = |budget: &'static str, data: String| {
        vec![
            "velocity".to_string(),
            "--data".into(),
            data,
            "--queries".into(),
            q.display().to_string(),
            "--t".into(),
            "0.5".into(),
            "--out".into(),
            out.display().to_string(),
            "--force".into(),
            "--backend".into(),
            "cpu".into(),
            "--memory-budget".into(),
            budget.into(),
        ]
    };
    let run = |a: Vec<String>| run_measured(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // Baseline: the same command on 8 rows in memory.
    let (base_anon, base) = run(args("64", format!("{}@8", data.display())));
    let (anon, streamed) = run(args("8", data.display().to_string()));
    let (mem_anon, _) = run(args("1024", data.display().to_string()));
    let budget_kib = 8 * 1024;
    // O(B D + tile): the queries and outputs are tiny here; the tiles are ~2 MiB, and the
    // kernels' scratch and the allocator's slack get two of them and 2 MiB, plus 256 KiB
    // per worker thread (its scratch, stack and malloc arena: on a 16-thread machine the
    // streamed run peaked 2.2 MiB above what 2 threads need).
    let allowance_kib = 6 * 1024 + 256 * worker_threads();
    let file_kib = std::fs::metadata(&data).unwrap().len() / 1024;
    eprintln!(
        "file {file_kib} KiB, budget {budget_kib} KiB: peak RssAnon streamed {anon} KiB \
         (exit VmHWM {} KiB), in memory {mem_anon} KiB, baseline {base_anon} KiB (VmHWM {} KiB)",
        reported_kib(&streamed, "VmHWM"),
        reported_kib(&base, "VmHWM")
    );
    assert!(file_kib > 5 * budget_kib);
    assert!(
        anon <= base_anon + budget_kib + allowance_kib,
        "peak RssAnon {anon} KiB > baseline {base_anon} + budget {budget_kib} + {allowance_kib}"
    );
    // The peak of all resident memory too (pread leaves the file in the page cache, not
    // in the process): this also covers peaks the 2 ms sampling could miss.
    assert!(
        reported_kib(&streamed, "VmHWM")
            <= reported_kib(&base, "VmHWM") + budget_kib + allowance_kib,
        "{}",
        stderr(&streamed)
    );
    // And in memory the same file takes its size.
    assert!(mem_anon > base_anon + file_kib * 9 / 10);
}

#[test]
fn bad_input_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = write_data(dir.path(), 300, 16, "<f4");
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[1, 16], &[0.0; 16]).unwrap();
    let velocity = |data: &str, budget: &str| {
        oracleflow(&[
            "velocity",
            "--data",
            data,
            "--queries",
            q.to_str().unwrap(),
            "--t",
            "0.5",
            "--out",
            dir.path().join("v.npy").to_str().unwrap(),
            "--force",
            "--backend",
            "cpu",
            &format!("--memory-budget={budget}"),
        ])
    };
    let refused = |o: Output, needle: &str| {
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let err = stderr(&o);
        let first = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        assert!(first.contains(needle), "{needle:?} not in {err}");
    };
    let spec = data.display().to_string();
    for budget in ["0", "-3", "nan", "lots"] {
        refused(velocity(&spec, budget), "--memory-budget");
    }
    // A missing file, a truncated one, and a directory where the file should be.
    refused(velocity("/nonexistent/x.npy", "0.01"), "/nonexistent/x.npy");
    let bytes = std::fs::read(&data).unwrap();
    let cut = dir.path().join("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    refused(velocity(cut.to_str().unwrap(), "0.01"), "cut.npy");
    let folder = dir.path().join("dir.npy");
    std::fs::create_dir(&folder).unwrap();
    refused(
        velocity(&format!("npy:{}", folder.display()), "0.01"),
        "dir.npy",
    );
    // Formats that are not streamed say to convert first.
    let wide = dir.path().join("wide.npy");
    npy::write_npy_with(&wide, "<f8", &[300, 16], |w| {
        (0..300 * 16).try_for_each(|i| w.write_all(&(i as f64).to_le_bytes()))
    })
    .unwrap();
    refused(
        velocity(wide.to_str().unwrap(), "0.01"),
        "oracleflow convert",
    );
    // A corrupt sidecar is not an error: recomputed.
    std::fs::write(sidecar_path(&data), b"junk").unwrap();
    let o = velocity(&spec, "0.01");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(sidecar_path(&data)).unwrap().len() > 100);
}

#[test]
fn convert_generates_synthetic_sources_block_by_block() {
    use oracleflow::dataset::synthetic;
    let dir = tempfile::tempdir().unwrap();
    // Several 8 MiB blocks of 4-byte values: the block seams must not show.
    let (n, d) = (6000, 1000);
    let g = dir.path().join("g.npy");
    let o = oracleflow(&[
        "convert",
        "gaussian:6000,1000,4",
        "--out",
        g.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, got) = npy::read_npy_f32(&g).unwrap();
    assert_eq!(shape, vec![n, d]);
    assert!(got == synthetic::gaussian(n, d, 4), "gaussian rows differ");

    let m = dir.path().join("m.npy");
    let o = oracleflow(&[
        "convert",
        "mixture:6000,1000,7,2@5000",
        "--out",
        m.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (values, labels) = synthetic::mixture(5000, d, 7, 2);
    let (shape, got) = npy::read_npy_f32(&m).unwrap();
    assert_eq!(shape, vec![5000, d]);
    let want: Vec<f32> = values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert!(got == want, "mixture rows differ");
    let got_labels = npy::read_labels(&dir.path().join("m.labels.npy"), 5000, &m).unwrap();
    assert_eq!(got_labels, labels);
}

#[test]
fn unwritable_sidecar_falls_back_to_the_cache_then_recomputes_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = write_data(dir.path(), 400, 16, "<f4");
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[1, 16], &[3.0; 16]).unwrap();
    // The sidecar's place beside the data is taken (by a directory: even root cannot
    // replace it with a file), so the stats cannot be written there.
    std::fs::create_dir(sidecar_path(&data)).unwrap();
    let run = |cache: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
            .args([
                "velocity",
                "--data",
                data.to_str().unwrap(),
                "--queries",
                q.to_str().unwrap(),
                "--t",
                "0.5",
                "--out",
                dir.path().join("v.npy").to_str().unwrap(),
                "--force",
                "--backend",
                "cpu",
                "--memory-budget",
                "0.01",
            ])
            .env("XDG_CACHE_HOME", cache)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let cache = dir.path().join("cache");
    let err = run(&cache);
    assert!(!err.contains("warning"), "{err}");
    // (The folder may also hold the CPU GEMM autotune's cache, where this build's choice
    // was not cached elsewhere yet: only sidecars count.)
    let cached: Vec<_> = std::fs::read_dir(cache.join("oracleflow"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".oracleflow-stats")
        })
        .collect();
    assert_eq!(cached.len(), 1, "one sidecar in the cache");
    // No usable cache either (a file where the directory should be): one warning.
    let blocked = dir.path().join("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    let err = run(&blocked);
    assert_eq!(
        err.matches("warning: cannot write the stats sidecar")
            .count(),
        1,
        "{err}"
    );
}
