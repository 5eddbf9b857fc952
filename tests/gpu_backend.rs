//! The wgpu backend against a plain f64 evaluation of the same centred problem.
//!
//! Runs on whatever adapter wgpu picks; on a machine without a GPU that is lavapipe,
//! which runs the same WGSL. Set ORACLEFLOW_SKIP_GPU=1 to skip; otherwise a missing
//! adapter fails the tests loudly. Sizes are small: lavapipe does a few GFLOP/s.
//!
//! Data, queries, the f64 reference and the tolerances are shared with the backend suite
//! (`tests/common/backend.rs`); here are the GPU-only cases (chunks, streaming, splits,
//! submissions, f16 kernels, NaN tiles, trusted shaders, adapters).

mod common;

use std::ops::Range;

use common::backend::*;

use oracleflow::dataset::{RawRows, SampleShape};
use oracleflow::oracle::gpu::{adapter_report, GpuBackend, GpuOptions};
use oracleflow::oracle::{Backend, CentredBatch, Posterior};
use oracleflow::{Dataset, Dtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

fn backend(ds: &Dataset, options: GpuOptions) -> GpuBackend<'_> {
    GpuBackend::with_options(ds, options).unwrap_or_else(|e| {
        panic!("no usable GPU adapter ({e}); set ORACLEFLOW_SKIP_GPU=1 to skip the GPU tests")
    })
}

#[test]
fn row_sub_range_starting_mid_tile() {
    if common::skip_gpu() {
        return;
    }
    let ds = unit_gaussian_dataset(700, 20, Dtype::F32, 1);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 4);
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
        let ds = unit_gaussian_dataset(n, d, dtype, 30);
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
            let (x, coefs) = centred_queries(&ds, b, rows.clone(), 300 + i as u64);
            let batch = CentredBatch {
                x: &x,
                logit_coefs: &coefs,
                rows: rows.clone(),
            };
            let got = streamed
                .posterior(&batch)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            check_posterior(&ds, &x, &coefs, rows.clone(), &got, &what);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 31);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 7);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F16, 10);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 13);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 14);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 16);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 33);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 36);
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
    let ds = unit_gaussian_dataset(n, d, Dtype::F32, 18);
    let mut gpu = backend(
        &ds,
        GpuOptions {
            trusted_shaders: Some(true),
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
    let ds = unit_gaussian_dataset(10, 4, Dtype::F32, 31);
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
    let ds = unit_gaussian_dataset(4, 4, Dtype::F32, 32);
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
        let ds = unit_gaussian_dataset(n, d, Dtype::F32, 40);
        let mut gpu = backend(
            &ds,
            GpuOptions {
                tile_rows: tile,
                ..Default::default()
            },
        );
        let (x, coefs) = centred_queries(&ds, b, 0..n, 41);
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

/// A device that does not finish within the wait limit ends the call with an error that
/// says so (and names the setting), within about the limit, never a hang; a backend opened
/// afterwards with the default limit works. The workload takes lavapipe tens of
/// milliseconds; a hardware GPU, or a GL adapter that runs submissions synchronously, may
/// finish it before the first poll, so there a correct result is accepted too.
#[test]
fn a_device_that_does_not_finish_ends_in_a_bounded_error() {
    if common::skip_gpu() {
        return;
    }
    use oracleflow::oracle::gpu::WAIT_LIMIT_ENV;
    use std::time::{Duration, Instant};
    let ds = unit_gaussian_dataset(4000, 256, Dtype::F32, 21);
    let rows = 0..ds.n_samples();
    let (x, coefs) = centred_queries(&ds, 32, rows.clone(), 22);
    let batch = CentredBatch {
        x: &x,
        logit_coefs: &coefs,
        rows: rows.clone(),
    };
    let mut gpu = backend(
        &ds,
        GpuOptions {
            wait_limit: Some(Duration::ZERO),
            ..Default::default()
        },
    );
    // lavapipe on Vulkan runs submissions asynchronously, so its first poll finds the work
    // unfinished; GL (llvmpipe) and fast hardware may finish before it.
    let report = adapter_report().unwrap();
    let must_time_out = report.contains("backend: Vulkan") && report.contains("(software");
    let start = Instant::now();
    match gpu.posterior(&batch) {
        Err(e) => {
            let msg = e.to_string();
            eprintln!("zero wait limit: {msg}");
            assert!(
                msg.contains("did not finish") && msg.contains(WAIT_LIMIT_ENV),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        Ok(got) => {
            assert!(
                !must_time_out,
                "lavapipe (Vulkan) cannot finish this before the first poll"
            );
            check_posterior(&ds, &x, &coefs, rows.clone(), &got, "finished in time");
        }
    }
    // Bounded: the zero limit gives up after one poll slice, not after the work.
    assert!(start.elapsed() < Duration::from_secs(30));
    drop(gpu);
    let mut gpu = backend(&ds, GpuOptions::default());
    let got = gpu.posterior(&batch).unwrap();
    check_posterior(&ds, &x, &coefs, rows, &got, "default limit");
}

/// A lost device (destroyed here, as a driver reset would lose it) makes every later call
/// fail with an error naming the loss: no panic, no hang.
#[test]
fn a_lost_device_is_reported_not_a_panic() {
    if common::skip_gpu() {
        return;
    }
    let ds = unit_gaussian_dataset(300, 16, Dtype::F32, 23);
    let mut gpu = backend(&ds, GpuOptions::default());
    run_case(&mut gpu, &ds, 3, 0..300, 24, "before the loss");
    gpu.lose_device();
    let (x, coefs) = centred_queries(&ds, 3, 0..300, 25);
    for attempt in 0..2 {
        let err = gpu
            .posterior(&CentredBatch {
                x: &x,
                logit_coefs: &coefs,
                rows: 0..300,
            })
            .err()
            .unwrap_or_else(|| panic!("attempt {attempt}: a lost device gave a result"));
        let msg = err.to_string();
        eprintln!("attempt {attempt}: {msg}");
        assert!(msg.contains("device destroyed"), "attempt {attempt}: {msg}");
        assert!(matches!(err, oracleflow::Error::Gpu(_)), "{msg}");
    }
}
