//! Helpers shared by the integration tests: seeded data, queries on the path, errors.
#![allow(dead_code)]

pub mod backend;

use oracleflow::dataset::{Dataset, Dtype, RawRows, SampleShape};
use oracleflow::oracle::reference::{self, ReferenceOutput};
use oracleflow::oracle::{BackendKind, Oracle, OracleOutput, Query, Times};
use oracleflow::Path;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// N x D unit Gaussians plus `offset` (an offset exercises the centring), with labels i % 3.
pub fn gaussian_dataset(n: usize, d: usize, seed: u64, dtype: Dtype) -> Dataset {
    let mut r = rng(seed);
    let vals: Vec<f32> = normal(&mut r, n * d).iter().map(|v| v + 0.5).collect();
    let labels = (0..n as u32).map(|i| i % 3).collect();
    Dataset::from_raw(
        format!("gaussian {n}x{d}"),
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        Some(labels),
        dtype,
    )
    .unwrap()
}

/// Clustered data: `n` rows of D = 96 in 12 tight, well separated clusters (labels =
/// cluster), the case the pruning bounds are for.
pub fn clustered_dataset(n: usize, dtype: Dtype) -> Dataset {
    let (v, l) = oracleflow::dataset::synthetic::mixture_with(n, 96, 12, 5, 3.0, 0.3);
    Dataset::from_raw(
        "mixture",
        SampleShape::array(vec![96]),
        RawRows::F32(&v),
        Some(l),
        dtype,
    )
    .unwrap()
}

/// B queries on the path at time t: x_t = alpha y + sigma x0 for random samples y
/// (what a sampler sees), except every fourth query is pure noise scaled by 2.
pub fn path_queries(ds: &Dataset, path: Path, t: f32, b: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let c = path.coefs(t as f64);
    let d = ds.dim();
    let mut x = Vec::with_capacity(b * d);
    for q in 0..b {
        let noise = normal(&mut r, d);
        if q % 4 == 3 {
            x.extend(noise.iter().map(|v| 2.0 * v));
        } else {
            let y = ds.sample_f64(r.random_range(0..ds.n_samples()));
            x.extend(
                y.iter()
                    .zip(&noise)
                    .map(|(y, n)| (c.alpha * y + c.sigma * *n as f64) as f32),
            );
        }
    }
    x
}

/// The centred batch that `Oracle` hands a backend (see `Oracle::evaluate`): the queries
/// less alpha times the dataset mean, and their logit coefficients.
pub fn centred(ds: &Dataset, path: Path, x: &[f32], t: f32) -> (Vec<f32>, Vec<[f32; 2]>) {
    let c = path.coefs(t as f64);
    let d = ds.dim();
    let mut xc = x.to_vec();
    for row in xc.chunks_exact_mut(d) {
        for (v, m) in row.iter_mut().zip(ds.mean()) {
            *v -= (c.alpha * *m as f64) as f32;
        }
    }
    let (a, b) = c.logit_coefs();
    (xc, vec![[a as f32, b as f32]; x.len() / d])
}

/// The f64 posterior mass, over `rows`, of the rows not in `kept`: what a pruned call truly
/// left out for query `xq` (uncentred) at `t`. `samples` holds every row as f64
/// (`Dataset::sample_f64`).
pub fn left_out_mass(
    samples: &[Vec<f64>],
    rows: std::ops::Range<usize>,
    kept: &[u32],
    path: Path,
    t: f32,
    xq: &[f32],
) -> f64 {
    let c = path.coefs(t as f64);
    let two_s2 = 2.0 * c.sigma_safe().powi(2);
    let mut is_kept = vec![false; samples.len()];
    kept.iter().for_each(|&r| is_kept[r as usize] = true);
    let logits: Vec<(f64, bool)> = rows
        .map(|r| {
            let d2: f64 = samples[r]
                .iter()
                .zip(xq)
                .map(|(y, &x)| (x as f64 - c.alpha * y).powi(2))
                .sum();
            (-d2 / two_s2, is_kept[r])
        })
        .collect();
    let m = logits.iter().fold(f64::NEG_INFINITY, |a, l| a.max(l.0));
    let z: f64 = logits.iter().map(|l| (l.0 - m).exp()).sum();
    logits
        .iter()
        .filter(|l| !l.1)
        .map(|l| (l.0 - m).exp() / z)
        .sum()
}

/// Per query of `batch`, how far (relative) the posterior mean moves when each logit
/// carries the rounding of its f32 evaluation and nothing else: sum_i w_i e_i
/// |y_i - mean| / |mean|, with e_i = 2^-24 (|c_dot x.y_i| + c_norm |y_i|^2) (half an ulp of
/// each term, twice) and w the f64 weights. Any two f32 evaluations of the logits (another
/// summation order, a dot product instead of a GEMM) differ by about this much where the
/// posterior is split between distant samples with large logits; the dense pass's own
/// error may be far smaller there by luck.
pub fn logit_rounding_effect(ds: &Dataset, batch: &oracleflow::oracle::CentredBatch) -> Vec<f64> {
    let d = ds.dim();
    let ys = oracleflow::oracle::reference::stored_rows_f64(ds, batch.rows.clone());
    (0..batch.logit_coefs.len())
        .map(|q| {
            let terms = logit_terms(batch, q, &ys);
            let m = terms.iter().fold(f64::NEG_INFINITY, |a, t| a.max(t.0));
            let w: Vec<f64> = terms.iter().map(|t| (t.0 - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let mut mean = vec![0.0f64; d];
            for (wi, y) in w.iter().zip(&ys) {
                mean.iter_mut().zip(y).for_each(|(a, b)| *a += wi / z * b);
            }
            let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
            let moved: f64 = w
                .iter()
                .zip(&terms)
                .zip(&ys)
                .map(|((wi, t), y)| {
                    let dist = y
                        .iter()
                        .zip(&mean)
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f64>();
                    wi / z * t.1 * dist.sqrt()
                })
                .sum();
            moved / norm
        })
        .collect()
}

/// Per row y of `ys` (the batch's stored rows in f64), query `q`'s f64 logit
/// c_dot x.y - c_norm |y|^2 and half an ulp of each of its terms, 2^-24 (|c_dot x.y| +
/// c_norm |y|^2): about what its f32 evaluation's rounding moves it.
pub fn logit_terms(
    batch: &oracleflow::oracle::CentredBatch,
    q: usize,
    ys: &[Vec<f64>],
) -> Vec<(f64, f64)> {
    let d = batch.x.len() / batch.logit_coefs.len();
    let x = &batch.x[q * d..(q + 1) * d];
    let [c_dot, c_norm] = batch.logit_coefs[q].map(|c| c as f64);
    let u = f64::powi(2.0, -24);
    ys.iter()
        .map(|y| {
            let dot: f64 = x.iter().zip(y).map(|(&a, b)| a as f64 * b).sum();
            let sq: f64 = y.iter().map(|b| b * b).sum();
            (
                c_dot * dot - c_norm * sq,
                u * ((c_dot * dot).abs() + c_norm.abs() * sq),
            )
        })
        .collect()
}

/// Asserts that a pruned posterior mean `got` is as close to the f64 truth `want` as the
/// dense pass's `dense` is: within 1e-6 + 2 max(|dense - f64|, `floor`) relative (`floor`:
/// an error every f32 evaluation shares, e.g. [`logit_rounding_effect`]; 0 for none).
/// Returns (|got - f64|, |dense - f64|).
pub fn assert_as_close_as_dense(
    got: &[f32],
    dense: &[f32],
    want: &[f64],
    floor: f64,
    what: &str,
) -> (f64, f64) {
    let (ours, dense_err) = (rel_err(got, want), rel_err(dense, want));
    assert!(
        ours <= 1e-6 + 2.0 * dense_err.max(floor),
        "{what}: {ours:.2e} from f64, dense {dense_err:.2e}, shared f32 floor {floor:.2e}"
    );
    (ours, dense_err)
}

/// ||a - b|| / ||b||, with b the f64 truth.
/// One evaluation of the queries `x` at time `t` (rectified flow, every sample) and the
/// f64 reference's for the same queries.
pub fn evaluate_with_f64(
    oracle: &mut Oracle,
    ds: &Dataset,
    x: &[f32],
    t: f32,
) -> (OracleOutput, ReferenceOutput) {
    let q = Query {
        x,
        t: Times::Scalar(t),
        class: None,
    };
    let got = oracle.evaluate(&q).unwrap();
    let want = reference::evaluate_f64(ds, Path::RectifiedFlow, &q, 0..ds.n_samples());
    (got, want)
}

pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// True when a GPU test should return early: no usable adapter (see [`gpu_available`]).
pub fn skip_gpu() -> bool {
    !gpu_available()
}

/// Whether a test for `kind` should run (see [`gpu_available`] for GPU tests).
pub fn enabled(kind: BackendKind) -> bool {
    kind != BackendKind::Gpu || gpu_available()
}

// ------------------------------------------------------------------ skip or fail
//
// On a machine with only Rust (no Vulkan driver, no dataset package) `cargo test` passes:
// the tests that need what is missing skip, with one loud line per test binary naming what
// was skipped and what to install. Under CI (`CI=true`) or `ORACLEFLOW_REQUIRE_GPU=1` they
// run, and what is missing fails them.

/// True when missing GPUs and datasets must fail the tests instead of skipping them.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ORACLEFLOW_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Why GPU tests cannot run here, probed once per test binary by opening the GPU backend
/// on a tiny dataset (an adapter the backend cannot use counts as none). None: they can.
fn gpu_missing() -> Option<&'static str> {
    static PROBE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            if std::env::var("ORACLEFLOW_SKIP_GPU").is_ok_and(|v| v == "1") {
                return Some("ORACLEFLOW_SKIP_GPU=1 is set".into());
            }
            let ds = gaussian_dataset(4, 3, 0, oracleflow::Dtype::F32);
            let probe = oracleflow::oracle::Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Gpu)
                .map(drop);
            probe.err().map(|e| format!("no usable GPU adapter ({e})"))
        })
        .as_deref()
}

/// True when GPU tests can run. Otherwise: under [`required`] it panics (the test fails),
/// else it says once, loudly, that GPU tests are skipped and returns false.
pub fn gpu_available() -> bool {
    let Some(why) = gpu_missing() else {
        return true;
    };
    if required() {
        panic!(
            "GPU tests required (CI=true or ORACLEFLOW_REQUIRE_GPU=1) but {why}; install a \
             Vulkan driver (Debian: apt-get install mesa-vulkan-drivers)"
        );
    }
    announce_skip(
        "gpu",
        &format!(
            "GPU tests ({why}); to run them install a Vulkan driver (Debian: apt-get install \
             mesa-vulkan-drivers for lavapipe)"
        ),
    );
    false
}

/// True when GPU tests of f16 storage can run: a usable adapter with SHADER_F16 (lavapipe
/// and most GPUs; not the GL fallback). Otherwise skip or fail as [`gpu_available`] does.
pub fn gpu_f16_available() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !gpu_available() {
        return false;
    }
    let has_f16 = *PROBE.get_or_init(|| {
        let ds = gaussian_dataset(4, 3, 0, oracleflow::Dtype::F16);
        oracleflow::oracle::Oracle::new(&ds, Path::RectifiedFlow, BackendKind::Gpu)
            .is_ok_and(|o| o.describe().contains("f16 storage"))
    });
    if has_f16 {
        return true;
    }
    if required() {
        panic!(
            "GPU f16 tests required (CI=true or ORACLEFLOW_REQUIRE_GPU=1) but the adapter has \
             no SHADER_F16; install a Vulkan driver (Debian: apt-get install mesa-vulkan-drivers)"
        );
    }
    announce_skip(
        "gpu-f16",
        "GPU f16-storage tests (the adapter has no SHADER_F16); to run them install a Vulkan \
         driver (Debian: apt-get install mesa-vulkan-drivers for lavapipe)",
    );
    false
}

/// The Fashion-MNIST directory when its four files are there. Otherwise: under
/// [`required`] it panics, else it says once, loudly, that the tests needing it are skipped
/// and returns None.
pub fn fashion_mnist() -> Option<std::path::PathBuf> {
    use oracleflow::dataset::spec;
    let files = [
        spec::fashion_mnist_files(false),
        spec::fashion_mnist_files(true),
    ];
    let missing: Vec<String> = files
        .iter()
        .flat_map(|(i, l)| [i, l])
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some(spec::fashion_mnist_dir());
    }
    let install = format!(
        "apt-get install dataset-fashion-mnist, or set {} to a folder holding the files",
        spec::FASHION_MNIST_DIR_ENV
    );
    if required() {
        panic!(
            "Fashion-MNIST required (CI=true or ORACLEFLOW_REQUIRE_GPU=1) but missing: {}; {install}",
            missing.join(", ")
        );
    }
    announce_skip(
        "fashion-mnist",
        &format!(
            "tests that need Fashion-MNIST (missing {}); to run them: {install}",
            missing[0]
        ),
    );
    None
}

/// One loud line per reason and test binary, written to the process's stderr directly (not
/// through the test harness, which hides the output of tests that pass).
fn announce_skip(reason: &'static str, text: &str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.contains(&reason) {
        return;
    }
    said.push(reason);
    let binary = std::env::args()
        .next()
        .map(|a| {
            let name = std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(a);
            // Cargo names test binaries NAME-HASH.
            name.rsplit_once('-')
                .map_or(name.clone(), |(n, _)| n.to_string())
        })
        .unwrap_or_default();
    // One write, so the line is not interleaved with the harness's own output.
    let line = format!(
        "\n!!! SKIPPED in tests/{binary}.rs: {text}; CI=true or ORACLEFLOW_REQUIRE_GPU=1 \
         makes this a failure !!!\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The pruning tests' datasets: random (D = 100, above the projection's 64 dimensions,
/// so the residual bounds are exercised), clustered, and embedded Fashion-MNIST.
pub fn pruning_datasets() -> Vec<(&'static str, Dataset)> {
    vec![
        ("random", gaussian_dataset(900, 100, 3, Dtype::F32)),
        ("clustered", clustered_dataset(1200, Dtype::F32)),
        (
            "fashion-mnist",
            oracleflow::dataset::load("embedded@1500", Dtype::F32).unwrap(),
        ),
    ]
}

/// [`check_certificates`], asserting that at least 20 queries skipped samples and at least
/// `at_least` calls took `pass` (so the pass itself was checked). Returns the passes.
pub fn certificates_checked_on(
    datasets: &[(&str, Dataset)],
    times: &[f32],
    pass: oracleflow::oracle::cpu::Pass,
    at_least: usize,
) -> Vec<oracleflow::oracle::cpu::Pass> {
    let (checked, passes) = check_certificates(datasets, times);
    assert!(checked >= 20, "only {checked} queries had skipped samples");
    assert_took(&passes, pass, at_least);
    passes
}

/// Asserts that at least `at_least` of `passes` are `pass` (and says how many).
pub fn assert_took(
    passes: &[oracleflow::oracle::cpu::Pass],
    pass: oracleflow::oracle::cpu::Pass,
    at_least: usize,
) {
    let n = passes.iter().filter(|&&p| p == pass).count();
    eprintln!("{n} calls took the {pass:?} pass");
    assert!(n >= at_least, "only {n} calls took the {pass:?} pass");
}

/// Asserts that a call's certificate `cert` bounds the mass it truly left out, `skipped`
/// (to f32's rounding of the certificate), and stays within the 2^-30 budget.
pub fn assert_certifies(skipped: f64, cert: f64, what: &str) {
    assert!(
        skipped <= cert * (1.0 + 1e-3),
        "{what}: true skipped mass {skipped:e} > certificate {cert:e}"
    );
    assert!(
        cert <= 2f64.powi(-30) * 1.001,
        "{what}: certificate {cert:e}"
    );
}

/// Per dataset, path (rectified flow, VP cosine) and t of `times`: one pruned call of 8
/// queries on every row, and for each query the f64 mass its call truly left out, checked
/// against the call's certificate (which must also stay within the 2^-30 budget), and the
/// reported share of skipped samples against the rows it kept. Returns how many queries
/// skipped any sample and which pass each pruned call took.
pub fn check_certificates(
    datasets: &[(&str, oracleflow::dataset::Dataset)],
    times: &[f32],
) -> (usize, Vec<oracleflow::oracle::cpu::Pass>) {
    use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
    use oracleflow::oracle::{Backend, CentredBatch};
    let (mut checked, mut passes) = (0, Vec::new());
    for (name, ds) in datasets {
        let mut backend = CpuBackend::with_options(ds, CpuOptions { prune: true });
        backend.record_kept_rows(true);
        let samples: Vec<Vec<f64>> = (0..ds.n_samples()).map(|r| ds.sample_f64(r)).collect();
        for path in [Path::RectifiedFlow, Path::VpCosine] {
            for &t in times {
                let x = path_queries(ds, path, t, 8, 7);
                let (xc, coefs) = centred(ds, path, &x, t);
                let post = backend
                    .posterior(&CentredBatch {
                        x: &xc,
                        logit_coefs: &coefs,
                        rows: 0..ds.n_samples(),
                    })
                    .unwrap();
                if !backend.last_was_pruned() {
                    continue;
                }
                passes.push(backend.last_pass());
                for (q, kept) in backend.kept_rows().iter().enumerate() {
                    let xq = &x[q * ds.dim()..(q + 1) * ds.dim()];
                    let skipped = left_out_mass(&samples, 0..ds.n_samples(), kept, path, t, xq);
                    let mut is_kept = vec![false; ds.n_samples()];
                    kept.iter().for_each(|&r| is_kept[r as usize] = true);
                    let cert = post.stats[q].skipped_mass_bound as f64;
                    let what = format!(
                        "{name} {} t={t} query {q} ({:?})",
                        path.name(),
                        backend.last_pass()
                    );
                    assert_certifies(skipped, cert, &what);
                    let n_skipped = is_kept.iter().filter(|&&k| !k).count();
                    let share = n_skipped as f32 / ds.n_samples() as f32;
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
    (checked, passes)
}

/// Per dataset, class (whole dataset, class 1) and t in `times`, 12 rectified-flow queries
/// (seeds from `seed` on): wherever the pruned backend's call took `pass`, its posterior
/// mean is as close to the f64 reference as the dense pass's (`assert_as_close_as_dense`);
/// and at least 4 calls took `pass`.
pub fn pass_as_close_as_dense(
    datasets: &[(&str, Dataset)],
    times: &[f32],
    pass: oracleflow::oracle::cpu::Pass,
    seed: u64,
) {
    use oracleflow::oracle::cpu::{CpuBackend, CpuOptions};
    use oracleflow::oracle::{reference, Backend, CentredBatch};
    let mut passes = Vec::new();
    for (name, ds) in datasets {
        let mut pruned = CpuBackend::with_options(ds, CpuOptions { prune: true });
        let mut dense = CpuBackend::with_options(ds, CpuOptions { prune: false });
        let dim = ds.dim();
        for (i, &t) in times.iter().enumerate() {
            for class in [None, Some(1)] {
                let x = path_queries(ds, Path::RectifiedFlow, t, 12, seed + i as u64);
                let (xc, coefs) = centred(ds, Path::RectifiedFlow, &x, t);
                let batch = CentredBatch {
                    x: &xc,
                    logit_coefs: &coefs,
                    rows: ds.rows_for(class).unwrap(),
                };
                let p = pruned.posterior(&batch).unwrap();
                passes.push(pruned.last_pass());
                if pruned.last_pass() != pass {
                    continue;
                }
                let d = dense.posterior(&batch).unwrap();
                let rounding = logit_rounding_effect(ds, &batch);
                for (q, w) in reference::posterior_f64(ds, &batch).iter().enumerate() {
                    assert_as_close_as_dense(
                        &p.mean[q * dim..(q + 1) * dim],
                        &d.mean[q * dim..(q + 1) * dim],
                        &w.mean,
                        rounding[q],
                        &format!("{name} t={t} class={class:?} query {q}"),
                    );
                }
            }
        }
    }
    assert_took(&passes, pass, 4);
}
