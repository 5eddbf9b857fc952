//! The wgpu backend against a plain f64 evaluation of the same centred problem.
//!
//! Runs on whatever adapter wgpu picks; on a machine without a GPU that is lavapipe,
//! which runs the same WGSL. Set ORACLEFLOW_SKIP_GPU=1 to skip; otherwise a missing
//! adapter fails the tests loudly. Sizes are small: lavapipe does a few GFLOP/s.
//!
//! Tolerances: the backend computes logits, weights and weighted sums in f32, so the
//! posterior mean carries f32 rounding of the logits (~1e-7 relative, times the logit
//! scale) and of the sums; 1e-4 relative on the mean leaves room for that and catches
//! any indexing, masking or rescaling bug, which all give errors of order 1.

mod common;

use std::ops::Range;

use oracleflow::dataset::{RawRows, SampleShape};
use oracleflow::oracle::gpu::{adapter_report, GpuBackend, GpuOptions};
use oracleflow::oracle::{Backend, CentredBatch, Posterior};
use oracleflow::{Dataset, Dtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const MEAN_TOL: f64 = 1e-4;
/// Statistics are ratios of f32 sums (1/l, ln l - t/l, l^2/q).
const STATS_TOL: f64 = 1e-3;

fn backend(ds: &Dataset, options: GpuOptions) -> GpuBackend {
    GpuBackend::with_options(ds, options).unwrap_or_else(|e| {
        panic!("no usable GPU adapter ({e}); set ORACLEFLOW_SKIP_GPU=1 to skip the GPU tests")
    })
}

fn gaussian_dataset(n: usize, d: usize, dtype: Dtype, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vals: Vec<f32> = (0..n * d).map(|_| rng.sample(StandardNormal)).collect();
    Dataset::from_raw(
        "gaussian",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        None,
        dtype,
    )
    .unwrap()
}

fn stored(ds: &Dataset, row: usize) -> Vec<f32> {
    let mut out = vec![0.0; ds.dim()];
    ds.stored_row(row, &mut out);
    out
}

/// Queries on the rectified-flow path near rows of `rows`: x = t y + (1 - t) z with t in
/// [0.05, 0.9], and their logit coefficients c_dot = t/(1-t)^2, c_norm = t^2/(2(1-t)^2).
fn queries(
    ds: &Dataset,
    n_queries: usize,
    rows: Range<usize>,
    seed: u64,
) -> (Vec<f32>, Vec<[f32; 2]>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = ds.dim();
    let mut x = Vec::with_capacity(n_queries * d);
    let mut coefs = Vec::with_capacity(n_queries);
    for _ in 0..n_queries {
        let t: f64 = rng.random_range(0.05..0.9);
        let y = stored(ds, rng.random_range(rows.clone()));
        for v in y {
            let z: f64 = rng.sample(StandardNormal);
            x.push((t * v as f64 + (1.0 - t) * z) as f32);
        }
        let s2 = (1.0 - t) * (1.0 - t);
        coefs.push([(t / s2) as f32, (t * t / (2.0 * s2)) as f32]);
    }
    (x, coefs)
}

/// The posterior of one query, computed directly in f64.
struct Reference {
    mean: Vec<f64>,
    top1_weight: f64,
    top1_index: usize,
    entropy: f64,
    ess: f64,
}

fn reference(ds: &Dataset, x: &[f32], coef: [f32; 2], rows: Range<usize>) -> Reference {
    let d = ds.dim();
    let ys: Vec<Vec<f32>> = rows.clone().map(|r| stored(ds, r)).collect();
    let logits: Vec<f64> = ys
        .iter()
        .map(|y| {
            let dot: f64 = x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let sq: f64 = y.iter().map(|&b| b as f64 * b as f64).sum();
            coef[0] as f64 * dot - coef[1] as f64 * sq
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let w: Vec<f64> = e.iter().map(|e| e / z).collect();
    let mut mean = vec![0.0; d];
    for (wi, y) in w.iter().zip(&ys) {
        for (m, &v) in mean.iter_mut().zip(y) {
            *m += wi * v as f64;
        }
    }
    // First maximum: ties go to the smaller row, as in the backends.
    let top = logits.iter().position(|&s| s == m).unwrap();
    Reference {
        mean,
        top1_weight: w[top],
        top1_index: rows.start + top,
        entropy: -w
            .iter()
            .filter(|&&w| w > 0.0)
            .map(|w| w * w.ln())
            .sum::<f64>(),
        ess: 1.0 / w.iter().map(|w| w * w).sum::<f64>(),
    }
}

/// Largest relative error of the mean over the batch; asserts everything else.
fn check(
    ds: &Dataset,
    x: &[f32],
    coefs: &[[f32; 2]],
    rows: Range<usize>,
    got: &Posterior,
    what: &str,
) -> f64 {
    let d = ds.dim();
    assert_eq!(got.mean.len(), coefs.len() * d, "{what}: mean size");
    assert_eq!(got.stats.len(), coefs.len(), "{what}: stats count");
    let mut worst = 0.0f64;
    for (q, &coef) in coefs.iter().enumerate() {
        let r = reference(ds, &x[q * d..(q + 1) * d], coef, rows.clone());
        let mean = &got.mean[q * d..(q + 1) * d];
        let err: f64 = mean
            .iter()
            .zip(&r.mean)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = r.mean.iter().map(|b| b * b).sum::<f64>().sqrt();
        // A single centred row is all zeros: then the mean must be exactly zero too.
        let rel = if norm > 0.0 { err / norm } else { err };
        assert!(
            rel <= MEAN_TOL,
            "{what}: query {q}: relative error of the mean {rel:e} (|ref| = {norm})"
        );
        worst = worst.max(rel);
        let s = got.stats[q];
        assert_eq!(
            s.top1_index as usize, r.top1_index,
            "{what}: query {q}: top-1 row"
        );
        for (name, a, b) in [
            ("top-1 weight", s.top1_weight as f64, r.top1_weight),
            ("ESS", s.ess as f64, r.ess),
        ] {
            assert!(
                (a - b).abs() <= STATS_TOL * b.abs(),
                "{what}: query {q}: {name} {a} vs {b}"
            );
        }
        // Entropy is near 0 for a one-hot posterior: absolute tolerance there.
        assert!(
            (s.entropy as f64 - r.entropy).abs() <= STATS_TOL * r.entropy.max(1.0),
            "{what}: query {q}: entropy {} vs {}",
            s.entropy,
            r.entropy
        );
    }
    eprintln!("{what}: max relative error of the mean {worst:.2e}");
    worst
}

fn run_case(
    gpu: &mut GpuBackend,
    ds: &Dataset,
    n_queries: usize,
    rows: Range<usize>,
    seed: u64,
    what: &str,
) -> f64 {
    let (x, coefs) = queries(ds, n_queries, rows.clone(), seed);
    let got = gpu
        .posterior(&CentredBatch {
            x: &x,
            logit_coefs: &coefs,
            rows: rows.clone(),
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check(ds, &x, &coefs, rows, &got, what)
}

#[test]
fn sizes_that_are_not_tile_multiples() {
    if common::skip_gpu() {
        return;
    }
    for (i, &(n, d, b)) in [(1, 1, 1), (7, 3, 5), (300, 67, 33), (1000, 784, 9)]
        .iter()
        .enumerate()
    {
        let ds = gaussian_dataset(n, d, Dtype::F32, i as u64);
        let mut gpu = backend(&ds, GpuOptions::default());
        run_case(
            &mut gpu,
            &ds,
            b,
            0..n,
            100 + i as u64,
            &format!("N={n} D={d} B={b}"),
        );
    }
}

#[test]
fn row_sub_range_starting_mid_tile() {
    if common::skip_gpu() {
        return;
    }
    let ds = gaussian_dataset(700, 20, Dtype::F32, 1);
    // 64-row tiles: the range starts 37 rows into the first and ends mid-tile.
    let mut gpu = backend(
        &ds,
        GpuOptions {
            tile_rows: Some(64),
            ..Default::default()
        },
    );
    run_case(&mut gpu, &ds, 7, 37..611, 2, "rows 37..611, 64-row tiles");
    run_case(&mut gpu, &ds, 3, 650..651, 3, "a single row");
}

#[test]
fn multi_chunk_residency() {
    if common::skip_gpu() {
        return;
    }
    let (n, d) = (450, 12);
    let ds = gaussian_dataset(n, d, Dtype::F32, 4);
    // 100 rows of 12 f32 per chunk: 5 chunks.
    let mut gpu = backend(
        &ds,
        GpuOptions {
            max_chunk_bytes: Some(100 * d as u64 * 4),
            tile_rows: Some(64),
            ..Default::default()
        },
    );
    assert_eq!(gpu.n_chunks(), 5, "{}", gpu.describe());
    assert!(gpu.describe().contains("5 chunks"), "{}", gpu.describe());
    run_case(
        &mut gpu,
        &ds,
        11,
        130..420,
        5,
        "rows 130..420 over chunks 1..4",
    );
    run_case(&mut gpu, &ds, 4, 0..n, 6, "all rows, 5 chunks");
}

/// Largest relative difference of the means of `a` and `b` (per query, like `check`);
/// asserts equal top-1 rows.
fn agree(a: &Posterior, b: &Posterior, d: usize, what: &str) -> f64 {
    assert_eq!(a.mean.len(), b.mean.len(), "{what}: mean size");
    let mut worst = 0.0f64;
    for (q, (ma, mb)) in a.mean.chunks(d).zip(b.mean.chunks(d)).enumerate() {
        let err: f64 = ma
            .iter()
            .zip(mb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = mb.iter().map(|&y| y as f64 * y as f64).sum::<f64>().sqrt();
        let rel = if norm > 0.0 { err / norm } else { err };
        assert!(
            rel <= MEAN_TOL,
            "{what}: query {q}: streamed vs resident {rel:e}"
        );
        assert_eq!(
            a.stats[q].top1_index, b.stats[q].top1_index,
            "{what}: query {q}: top-1 row, streamed vs resident"
        );
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn streaming_through_a_two_slot_ring() {
    if common::skip_gpu() {
        return;
    }
    // D = 13 (padded to 16): 100 rows per chunk, 5 chunks; a budget of 250 rows streams
    // them through a ring of 2 slots of 100 rows.
    let (n, d) = (450, 13);
    for dtype in [Dtype::F32, Dtype::F16] {
        if dtype == Dtype::F16 && !common::gpu_f16_available() {
            continue;
        }
        let ds = gaussian_dataset(n, d, dtype, 30);
        let row_bytes = 16 * dtype.bytes() as u64;
        let base = GpuOptions {
            max_chunk_bytes: Some(100 * row_bytes),
            tile_rows: Some(64),
            ..Default::default()
        };
        let mut resident = backend(&ds, base.clone());
        let mut streamed = backend(
            &ds,
            GpuOptions {
                max_resident_bytes: Some(250 * (row_bytes + 4)),
                ..base.clone()
            },
        );
        let desc = streamed.describe();
        assert!(!resident.is_streaming(), "{}", resident.describe());
        assert!(streamed.is_streaming(), "{desc}");
        assert_eq!(streamed.n_chunks(), 5, "{desc}");
        assert!(desc.contains("5 chunks"), "{desc}");
        assert!(desc.contains("streaming through 2 device slots"), "{desc}");
        if dtype == Dtype::F16 {
            assert!(desc.contains("f16 storage"), "{desc}");
        }
        // Full range, ranges spanning chunks, repeats (slots already holding their
        // chunks), ranges that reload slots, a single chunk, batches of several sizes.
        let cases: [(usize, Range<usize>); 8] = [
            (11, 0..n),
            (4, 130..420),
            (70, 0..150),
            (1, 0..150),
            (9, 250..n),
            (5, 0..150),
            (3, 120..180),
            (33, 399..401),
        ];
        for (i, (b, rows)) in cases.into_iter().enumerate() {
            let what = format!("{dtype:?} streamed, B={b}, rows {rows:?}");
            let (x, coefs) = queries(&ds, b, rows.clone(), 300 + i as u64);
            let batch = CentredBatch {
                x: &x,
                logit_coefs: &coefs,
                rows: rows.clone(),
            };
            let got = streamed
                .posterior(&batch)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&ds, &x, &coefs, rows.clone(), &got, &what);
            let want = resident.posterior(&batch).unwrap();
            let diff = agree(&got, &want, d, &what);
            eprintln!("{what}: streamed vs resident {diff:.2e}");
        }
    }
}

#[test]
fn streaming_sub_batches_and_long_chunks() {
    if common::skip_gpu() {
        return;
    }
    // Sub-batches re-stream the chunks; 64-row tiles over 5000-row chunks take more than
    // one submission per chunk (MAX_STEPS_PER_SUBMIT = 64 steps).
    let (n, d) = (11000, 4);
    let ds = gaussian_dataset(n, d, Dtype::F32, 31);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            max_chunk_bytes: Some(5000 * 16),
            max_resident_bytes: Some(10000 * 20),
            max_sub_batch: Some(16),
            tile_rows: Some(64),
            ..Default::default()
        },
    );
    assert!(gpu.is_streaming(), "{}", gpu.describe());
    assert_eq!(gpu.n_chunks(), 3, "{}", gpu.describe());
    run_case(&mut gpu, &ds, 40, 0..n, 32, "streamed, 3 sub-batches");
    run_case(
        &mut gpu,
        &ds,
        7,
        4000..10500,
        33,
        "streamed, rows 4000..10500",
    );
}

#[test]
fn splits_merge_like_one_pass() {
    if common::skip_gpu() {
        return;
    }
    // Software adapters use one split; force several so the merge path runs here too,
    // over several chunks and a sub-range whose splits have unequal tile counts.
    let (n, d) = (900, 30);
    let ds = gaussian_dataset(n, d, Dtype::F32, 7);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            splits: Some(5),
            tile_rows: Some(64),
            max_chunk_bytes: Some(400 * 32 * 4),
            ..Default::default()
        },
    );
    assert_eq!(gpu.n_chunks(), 3);
    run_case(&mut gpu, &ds, 6, 0..n, 8, "5 splits, 3 chunks");
    run_case(&mut gpu, &ds, 13, 91..707, 9, "5 splits, rows 91..707");
}

#[test]
fn f16_storage() {
    if !common::gpu_f16_available() {
        return;
    }
    let (n, d) = (300, 67);
    let ds = gaussian_dataset(n, d, Dtype::F16, 10);
    let mut gpu = backend(&ds, GpuOptions::default());
    let desc = gpu.describe();
    // lavapipe has SHADER_F16, so the f16 kernels run here.
    assert!(desc.contains("f16 storage"), "{desc}");
    run_case(&mut gpu, &ds, 17, 0..n, 11, &format!("f16 ({desc})"));
    run_case(&mut gpu, &ds, 5, 55..240, 12, "f16, rows 55..240");

    // The path of devices without SHADER_F16: the same f16 values, held as f32.
    let mut gpu = backend(
        &ds,
        GpuOptions {
            f16_as_f32: true,
            ..Default::default()
        },
    );
    assert!(
        gpu.describe().contains("f16 data held as f32"),
        "{}",
        gpu.describe()
    );
    run_case(&mut gpu, &ds, 9, 0..n, 13, "f16 data held as f32");
}

#[test]
fn one_backend_serves_calls_of_any_batch_size() {
    if common::skip_gpu() {
        return;
    }
    let (n, d) = (400, 40);
    let ds = gaussian_dataset(n, d, Dtype::F32, 13);
    let mut gpu = backend(&ds, GpuOptions::default());
    // Grows the scratch buffers, then reuses them with a smaller batch.
    for (i, &(b, ref rows)) in [(3, 0..n), (70, 10..390), (5, 100..300), (130, 0..n)]
        .iter()
        .enumerate()
    {
        run_case(
            &mut gpu,
            &ds,
            b,
            rows.clone(),
            20 + i as u64,
            &format!("call {i}: B={b} rows {rows:?}"),
        );
    }
}

#[test]
fn batches_larger_than_one_submission() {
    if common::skip_gpu() {
        return;
    }
    let (n, d) = (150, 9);
    let ds = gaussian_dataset(n, d, Dtype::F32, 14);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            max_sub_batch: Some(16),
            ..Default::default()
        },
    );
    run_case(&mut gpu, &ds, 37, 0..n, 15, "37 queries, sub-batches of 16");
}

#[test]
fn the_largest_shapes() {
    if common::skip_gpu() {
        return;
    }
    // B = 4096 queries of D = 8195 values (not a multiple of 4): 128 MiB of queries, more
    // than lavapipe's 128 MiB binding limit, so this also runs as two sub-batches there.
    // Few rows keep it affordable on a CPU adapter.
    let (n, d, b) = (3, 8195, 4096);
    let ds = gaussian_dataset(n, d, Dtype::F32, 16);
    let mut gpu = backend(&ds, GpuOptions::default());
    run_case(&mut gpu, &ds, b, 0..n, 17, "N=3 D=8195 B=4096");
}

#[test]
fn long_chunks_span_several_submissions() {
    if common::skip_gpu() {
        return;
    }
    // 64-row tiles over 4500 rows of one chunk: 71 tile steps, more than one submission
    // holds; the state carries over between them.
    let (n, d) = (4500, 5);
    let ds = gaussian_dataset(n, d, Dtype::F32, 33);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            splits: Some(1),
            tile_rows: Some(64),
            ..Default::default()
        },
    );
    assert_eq!(gpu.n_chunks(), 1);
    run_case(&mut gpu, &ds, 3, 0..n, 34, "71 tile steps");
    run_case(&mut gpu, &ds, 2, 100..4400, 35, "rows 100..4400");
}

#[test]
fn nan_logits_keep_a_valid_argmax() {
    if common::skip_gpu() {
        return;
    }
    // A NaN query makes every logit of the tile NaN: no logit beats the running maximum,
    // and the argmax must still be a row of the tile (not an index past the dataset).
    let (n, d) = (10, 4);
    let ds = gaussian_dataset(n, d, Dtype::F32, 36);
    for splits in [1, 2] {
        let mut gpu = backend(
            &ds,
            GpuOptions {
                splits: Some(splits),
                ..Default::default()
            },
        );
        let x = [f32::NAN; 4];
        for rows in [0..n, 3..n] {
            let post = gpu
                .posterior(&CentredBatch {
                    x: &x,
                    logit_coefs: &[[1.0, 0.5]],
                    rows: rows.clone(),
                })
                .unwrap();
            let top = post.stats[0].top1_index as usize;
            assert!(rows.contains(&top), "splits {splits}, rows {rows:?}: {top}");
        }
    }
}

#[test]
fn trusted_shaders_agree() {
    if common::skip_gpu() {
        return;
    }
    // Without wgpu's bounds checks an indexing bug would read or write out of bounds
    // silently; the same cases must still match (a sub-range over chunks and splits).
    let (n, d) = (500, 21);
    let ds = gaussian_dataset(n, d, Dtype::F32, 18);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            trusted_shaders: true,
            splits: Some(3),
            max_chunk_bytes: Some(150 * 24 * 4),
            ..Default::default()
        },
    );
    run_case(&mut gpu, &ds, 70, 33..480, 19, "trusted shaders");
}

#[test]
fn ties_go_to_the_smaller_row() {
    if common::skip_gpu() {
        return;
    }
    // Rows 3 and 9 identical, query on them: equal logits, top-1 must be row 3.
    let d = 8;
    let mut rng = ChaCha8Rng::seed_from_u64(30);
    let mut vals: Vec<f32> = (0..16 * d).map(|_| rng.sample(StandardNormal)).collect();
    let row3: Vec<f32> = vals[3 * d..4 * d].to_vec();
    vals[9 * d..10 * d].copy_from_slice(&row3);
    let ds = Dataset::from_raw(
        "ties",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        None,
        Dtype::F32,
    )
    .unwrap();
    let mut gpu = backend(
        &ds,
        GpuOptions {
            splits: Some(2),
            ..Default::default()
        },
    );
    let x = stored(&ds, 3);
    let post = gpu
        .posterior(&CentredBatch {
            x: &x,
            logit_coefs: &[[50.0, 25.0]],
            rows: 0..16,
        })
        .unwrap();
    assert_eq!(post.stats[0].top1_index, 3);
    assert!(
        (post.stats[0].ess - 2.0).abs() < 1e-3,
        "{:?}",
        post.stats[0]
    );
}

#[test]
fn bad_inputs_are_errors() {
    if common::skip_gpu() {
        return;
    }
    let ds = gaussian_dataset(10, 4, Dtype::F32, 31);
    let mut gpu = backend(&ds, GpuOptions::default());
    let x = [0.0f32; 8];
    for (x, coefs, rows) in [
        (&x[..7], &[[1.0, 1.0]; 2][..], 0..10),
        (&x[..], &[[1.0, 1.0]; 2][..], 0..11),
        (&x[..], &[[1.0, 1.0]; 2][..], 5..5),
    ] {
        assert!(gpu
            .posterior(&CentredBatch {
                x,
                logit_coefs: coefs,
                rows
            })
            .is_err());
    }
}

#[test]
fn hardware_only_refuses_software_adapters() {
    if common::skip_gpu() {
        return;
    }
    let ds = gaussian_dataset(4, 4, Dtype::F32, 32);
    match GpuBackend::new(&ds, true) {
        Ok(gpu) => assert!(!gpu.describe().contains("Cpu"), "{}", gpu.describe()),
        Err(e) => {
            // Only acceptable when the adapter wgpu finds is a software one.
            let report = adapter_report().expect("an adapter exists");
            assert!(report.contains("software"), "{e}\n{report}");
        }
    }
}

#[test]
fn adapter_report_names_the_limits() {
    if common::skip_gpu() {
        return;
    }
    let report = adapter_report().expect("an adapter");
    for key in [
        "backend",
        "max storage buffer binding",
        "SHADER_F16",
        "subgroup",
    ] {
        assert!(report.contains(key), "{key} missing from\n{report}");
    }
}

/// Not a check: prints the throughput of a few shapes (`cargo test --release --test
/// gpu_backend -- --ignored --nocapture`).
#[test]
#[ignore]
fn throughput_probe() {
    for &(n, d, b, tile) in &[
        (4000usize, 784usize, 256usize, None),
        (4000, 784, 256, Some(64)),
        (20000, 784, 16, None),
        (1000, 8190, 64, None),
    ] {
        let ds = gaussian_dataset(n, d, Dtype::F32, 40);
        let mut gpu = backend(
            &ds,
            GpuOptions {
                tile_rows: tile,
                ..Default::default()
            },
        );
        let (x, coefs) = queries(&ds, b, 0..n, 41);
        let batch = CentredBatch {
            x: &x,
            logit_coefs: &coefs,
            rows: 0..n,
        };
        gpu.posterior(&batch).unwrap();
        let t0 = std::time::Instant::now();
        let reps = 2;
        for _ in 0..reps {
            gpu.posterior(&batch).unwrap();
        }
        let secs = t0.elapsed().as_secs_f64() / reps as f64;
        let gflop = 4.0 * (n * d * b) as f64 / 1e9;
        eprintln!(
            "N={n} D={d} B={b} tile={tile:?}: {:.1} ms, {:.2} GFLOP/s",
            secs * 1e3,
            gflop / secs
        );
    }
}
