//! The latent and CIFAR loaders (`safetensors:`, `shards:`, `cifar10:`, `cifar100:`) on
//! files the tests write: every sample, label and class read back equals what was written.
//!
//! Tolerances: f32 and f16 sources are stored as f32 exactly up to the centring round
//! trip (stored = v - mean in f32, read back as stored + mean): a couple of f32 ulps of
//! |v| + |mean|, so 1e-6 relative to max(1, |v|). bf16 widens to f32 exactly, same bound.
//! With `--dtype f16` the stored values are rounded to f16: 2^-11 relative to the centred
//! value's magnitude (bounded here by 4), so 4e-3 absolute. 8-bit pixels come back within
//! 1e-6 of p/127.5 - 1, and rounding recovers p exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use oracleflow::dataset::{self, npy, Dataset, Dtype, Values};
use oracleflow::Error;
use safetensors::tensor::TensorView;

mod common;

// ------------------------------------------------------------------------------ helpers

/// Values 0.25 * i - 3 + small fractions: exact in f32, f16 and bf16 for i < 32 (so every
/// dtype round trip can be checked exactly), distinct per index.
fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.25 * (i % 32) as f32 - 3.0).collect()
}

/// Gaussian-ish values with full f32 mantissas (for the f32 paths and velocity).
fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = common::rng(seed);
    common::normal(&mut r, n)
}

/// Sample of source index `i` (user coordinates).
fn sample_of(ds: &Dataset, i: u32) -> Vec<f32> {
    ds.sample(ds.row_of_original(i).expect("index present"))
}

fn label_of(ds: &Dataset, i: u32) -> u32 {
    ds.labels().expect("labels")[ds.row_of_original(i).expect("index present")]
}

/// Every sample of `ds` (in source order) against `want` (N x D), within `tol` relative
/// to max(1, |value|).
fn assert_samples(ds: &Dataset, want: &[f32], tol: f64) {
    let d = ds.dim();
    assert_eq!(ds.n_samples() * d, want.len(), "{}: sample count", ds.name);
    for i in 0..ds.n_samples() {
        let got = sample_of(ds, i as u32);
        for (k, (&g, &w)) in got.iter().zip(&want[i * d..(i + 1) * d]).enumerate() {
            let err = (g as f64 - w as f64).abs() / (w.abs() as f64).max(1.0);
            assert!(
                err <= tol,
                "{}: sample {i} value {k}: got {g}, want {w}",
                ds.name
            );
        }
    }
}

fn pixel(p: u8) -> f32 {
    (p as f64 / 127.5 - 1.0) as f32
}

fn assert_pixels(ds: &Dataset, i: u32, want: &[u8]) {
    let got = sample_of(ds, i);
    assert_eq!(got.len(), want.len());
    for (k, (&g, &p)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - pixel(p)).abs() < 1e-6,
            "sample {i} value {k}: {g} vs pixel {p}"
        );
        assert_eq!(((g as f64 + 1.0) * 127.5).round() as u8, p);
    }
}

fn stored(ds: &Dataset) -> &[f32] {
    match ds.values() {
        Values::F32(v) => v,
        Values::F16(_) | Values::Disk(_) => panic!("expected f32 storage in memory"),
    }
}

/// Same samples in the same stored order, same labels, mean and norms, bit for bit.
fn assert_same(a: &Dataset, b: &Dataset) {
    assert_eq!(a.n_samples(), b.n_samples());
    assert_eq!(a.shape, b.shape);
    assert_eq!(a.labels(), b.labels());
    assert_eq!(a.mean(), b.mean());
    assert_eq!(stored(a), stored(b));
    assert_eq!(a.sq_norms(), b.sq_norms());
}

fn load(spec: &str) -> Dataset {
    dataset::load(spec, Dtype::F32).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn load_err(spec: &str) -> String {
    match dataset::load(spec, Dtype::F32) {
        Ok(_) => panic!("{spec}: loaded, expected an error"),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "one line: {text}");
            text
        }
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A safetensors file written by the crate itself: (name, dtype, shape, little-endian data).
fn write_safetensors(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.to_string(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_le(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect()
}

fn i64_le(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file written by hand with one F32 tensor "x" of shape (n, d) whose data
/// starts `pad` bytes past an 8-byte boundary (the format allows any header length).
fn write_safetensors_unaligned(path: &Path, n: usize, d: usize, data: &[f32], pad: usize) {
    let mut header = format!(
        "{{\"x\":{{\"dtype\":\"F32\",\"shape\":[{n},{d}],\"data_offsets\":[0,{}]}}}}",
        n * d * 4
    );
    while (8 + header.len()) % 8 != pad {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(f32_le(data));
    std::fs::write(path, bytes).unwrap();
}

// ------------------------------------------------------------------------------ safetensors

#[test]
fn safetensors_f32_with_labels_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("latents.safetensors");
    let (n, shape) = (7, [2usize, 3]);
    let v = random_values(n * 6, 1);
    let labels: Vec<i64> = vec![2, 0, 1, 2, 0, 1, 1];
    write_safetensors(
        &f,
        &[
            (
                "latents",
                safetensors::Dtype::F32,
                vec![n, 2, 3],
                f32_le(&v),
            ),
            ("labels", safetensors::Dtype::I64, vec![n], i64_le(&labels)),
        ],
    );
    // The tensor may be left out (one data tensor besides the labels) or named.
    for spec in [
        format!("safetensors:{}", s(&f)),
        format!("safetensors:{}:latents", s(&f)),
    ] {
        let ds = load(&spec);
        assert_eq!(ds.shape.dims, shape);
        assert!(!ds.shape.is_image);
        assert_samples(&ds, &v, 1e-6);
        for (i, &l) in labels.iter().enumerate() {
            assert_eq!(label_of(&ds, i as u32), l as u32);
        }
        // Class-sorted rows: class 0 first (source 1, 4), then 1 (2, 5, 6), then 2 (0, 3).
        assert_eq!(ds.class_counts(), vec![(0, 2), (1, 3), (2, 2)]);
        let order: Vec<u32> = (0..n).map(|r| ds.original_index(r)).collect();
        assert_eq!(order, vec![1, 4, 2, 5, 6, 0, 3]);
    }
    // @M keeps the first M samples and their labels.
    let ds = load(&format!("safetensors:{}@4", s(&f)));
    assert_samples(&ds, &v[..4 * 6], 1e-6);
    assert_eq!(ds.class_counts(), vec![(0, 1), (1, 1), (2, 2)]);
}

#[test]
fn safetensors_f16_and_bf16_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (6, 5);
    let v = values(n * d);
    let half = dir.path().join("h.safetensors");
    write_safetensors(
        &half,
        &[("x", safetensors::Dtype::F16, vec![n, d], f16_le(&v))],
    );
    let brain = dir.path().join("b.safetensors");
    let bf: Vec<u8> = v
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    write_safetensors(&brain, &[("x", safetensors::Dtype::BF16, vec![n, d], bf)]);
    for f in [&half, &brain] {
        let ds = load(&format!("safetensors:{}", s(f)));
        assert_eq!(ds.shape.dims, [d]);
        assert!(ds.labels().is_none());
        assert_samples(&ds, &v, 1e-6);
        // --dtype f16: stored values rounded to f16 (these are exact in f16 after centring
        // only approximately, hence the f16 bound).
        let ds16 = dataset::load(&format!("safetensors:{}@4", s(f)), Dtype::F16).unwrap();
        assert_eq!(ds16.dtype(), Dtype::F16);
        assert_samples(&ds16, &v[..4 * d], 4e-3);
    }
    // bf16 keeps f32's exponent range: values far beyond f16's widen exactly too (their
    // mean is 0, so centring leaves them as they are).
    let big = dir.path().join("big.safetensors");
    let vals = [1.0e18f32, -1.0e18, 3.0e-20, -3.0e-20];
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    write_safetensors(&big, &[("x", safetensors::Dtype::BF16, vec![4], bf)]);
    let ds = load(&format!("safetensors:{}", s(&big)));
    assert_eq!(ds.mean(), &[0.0]);
    for (i, &x) in vals.iter().enumerate() {
        assert_eq!(sample_of(&ds, i as u32)[0], bf16::from_f32(x).to_f32());
    }
}

#[test]
fn safetensors_picks_tensors_by_name_and_lists_them_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("two.safetensors");
    let a = values(8);
    let b = random_values(12, 2);
    write_safetensors(
        &f,
        &[
            ("a", safetensors::Dtype::F32, vec![4, 2], f32_le(&a)),
            ("b", safetensors::Dtype::F32, vec![4, 3], f32_le(&b)),
            // A float tensor named y is data, not labels.
            (
                "y",
                safetensors::Dtype::F32,
                vec![4],
                f32_le(&[1.0, 2.0, 3.0, 4.0]),
            ),
        ],
    );
    let ds = load(&format!("safetensors:{}:b", s(&f)));
    assert_samples(&ds, &b, 1e-6);
    assert!(ds.labels().is_none());
    let ds = load(&format!("safetensors:{}:y", s(&f)));
    assert_eq!(ds.shape.dims, [1]);
    assert_samples(&ds, &[1.0, 2.0, 3.0, 4.0], 1e-6);
    let err = load_err(&format!("safetensors:{}", s(&f)));
    assert!(
        err.contains(&s(&f)) && err.contains("'a', 'b', 'y'") && err.contains(":NAME"),
        "{err}"
    );
    let err = load_err(&format!("safetensors:{}:c", s(&f)));
    assert!(
        err.contains("no tensor named 'c'") && err.contains("'a', 'b', 'y'"),
        "{err}"
    );
    // Integer labels named `label` (the second name looked for), u8.
    let g = dir.path().join("lab.safetensors");
    write_safetensors(
        &g,
        &[
            ("x", safetensors::Dtype::F32, vec![3, 2], f32_le(&values(6))),
            ("label", safetensors::Dtype::U8, vec![3], vec![5, 5, 1]),
        ],
    );
    let ds = load(&format!("safetensors:{}", s(&g)));
    assert_eq!(ds.class_counts(), vec![(1, 1), (5, 2)]);
    assert_eq!(label_of(&ds, 2), 1);
}

#[test]
fn safetensors_unaligned_data_is_read_through_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let v = random_values(15, 3);
    for pad in [1, 2, 3, 4] {
        let f = dir.path().join(format!("u{pad}.safetensors"));
        write_safetensors_unaligned(&f, 5, 3, &v, pad);
        let ds = load(&format!("safetensors:{}", s(&f)));
        assert_samples(&ds, &v, 1e-6);
    }
}

#[test]
fn safetensors_equals_the_same_data_as_npy() {
    let dir = tempfile::tempdir().unwrap();
    let v = random_values(40 * 9, 4);
    let st = dir.path().join("d.safetensors");
    write_safetensors(
        &st,
        &[("x", safetensors::Dtype::F32, vec![40, 9], f32_le(&v))],
    );
    let np = dir.path().join("d.npy");
    npy::write_npy_f32(&np, &[40, 9], &v).unwrap();
    assert_same(&load(&format!("safetensors:{}", s(&st))), &load(&s(&np)));
}

/// `velocity` through the CLI on a safetensors dataset and on the same values as .npy:
/// the same stored values give the same bytes.
#[test]
fn velocity_on_safetensors_equals_velocity_on_npy() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d, b) = (300, 16, 8);
    let v: Vec<f32> = random_values(n * d, 5)
        .iter()
        .map(|x| x * 0.5 + 0.25)
        .collect();
    let st = dir.path().join("d.safetensors");
    write_safetensors(
        &st,
        &[("x", safetensors::Dtype::F32, vec![n, d], f32_le(&v))],
    );
    let np = dir.path().join("d.npy");
    npy::write_npy_f32(&np, &[n, d], &v).unwrap();
    let q = dir.path().join("q.npy");
    npy::write_npy_f32(&q, &[b, d], &random_values(b * d, 6)).unwrap();
    let run = |data: String, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_oracleflow"))
            .args(["velocity", "--data", &data, "--queries", &s(&q)])
            .args(["--t", "0.7", "--backend", "cpu", "--out", &s(out)])
            .env("ORACLEFLOW_TEST", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        npy::read_npy_f32(out).unwrap()
    };
    let (shape_a, a) = run(
        format!("safetensors:{}", s(&st)),
        &dir.path().join("va.npy"),
    );
    let (shape_b, b_) = run(s(&np), &dir.path().join("vb.npy"));
    assert_eq!(shape_a, [b, d]);
    assert_eq!(shape_a, shape_b);
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(a, b_, "velocities differ between safetensors and npy");
}

// ------------------------------------------------------------------------------ shards

fn write_f16_npy(path: &Path, shape: &[usize], v: &[f32]) {
    npy::write_npy_with(path, "<f2", shape, |w| w.write_all(&f16_le(v))).unwrap();
}

fn write_f64_npy(path: &Path, shape: &[usize], v: &[f32]) {
    npy::write_npy_with(path, "<f8", shape, |w| {
        v.iter()
            .try_for_each(|&x| w.write_all(&(x as f64).to_le_bytes()))
    })
    .unwrap();
}

fn write_labels(path: &Path, labels: &[i64]) {
    npy::write_npy_with(path, "<i8", &[labels.len()], |w| {
        w.write_all(&i64_le(labels))
    })
    .unwrap();
}

fn write_u8_npy(path: &Path, shape: &[usize], pixels: &[u8]) {
    npy::write_npy_with(path, "|u1", shape, |w| w.write_all(pixels)).unwrap();
}

#[test]
fn shards_concatenate_in_name_order_with_per_shard_labels() {
    let dir = tempfile::tempdir().unwrap();
    let d = 4;
    let all = values(10 * d);
    // Name order a, b, c: 3 rows f32, 5 rows f16, 2 rows f64 (mixed float dtypes).
    npy::write_npy_f32(dir.path().join("a.npy"), &[3, 2, 2], &all[..3 * d]).unwrap();
    write_f16_npy(&dir.path().join("b.npy"), &[5, 2, 2], &all[3 * d..8 * d]);
    write_f64_npy(&dir.path().join("c.npy"), &[2, 2, 2], &all[8 * d..]);
    let labels: [i64; 10] = [1, 0, 1, 2, 2, 0, 1, 0, 2, 1];
    write_labels(&dir.path().join("a_labels.npy"), &labels[..3]);
    write_labels(&dir.path().join("b_labels.npy"), &labels[3..8]);
    write_labels(&dir.path().join("c_labels.npy"), &labels[8..]);
    let spec = format!("shards:{}", s(dir.path()));
    let ds = load(&spec);
    assert_eq!(ds.shape.dims, [2, 2]);
    assert_samples(&ds, &all, 1e-6);
    for (i, &l) in labels.iter().enumerate() {
        assert_eq!(label_of(&ds, i as u32), l as u32);
    }
    assert_eq!(ds.class_counts(), vec![(0, 3), (1, 4), (2, 3)]);
    // @M across a shard boundary: the 3 rows of a and 2 of b.
    let ds = load(&format!("{spec}@5"));
    assert_samples(&ds, &all[..5 * d], 1e-6);
    assert_eq!(ds.class_counts(), vec![(0, 1), (1, 2), (2, 2)]);
    // f16 storage.
    let ds = dataset::load(&spec, Dtype::F16).unwrap();
    assert_eq!(ds.dtype(), Dtype::F16);
    assert_samples(&ds, &all, 4e-3);
}

#[test]
fn shards_equal_their_concatenation_as_one_npy() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let d = 6;
    let all = random_values(23 * d, 7);
    // Uneven shards (the searched path of the multi-part reader), and an empty one.
    let rows = [7usize, 0, 11, 5];
    let mut at = 0;
    for (k, r) in rows.iter().enumerate() {
        npy::write_npy_f32(
            shards.join(format!("shard_{k:03}.npy")),
            &[*r, d],
            &all[at * d..(at + r) * d],
        )
        .unwrap();
        at += r;
    }
    let labels: Vec<i64> = (0..23).map(|i| (i * 7 % 5) as i64).collect();
    write_labels(&shards.join("labels.npy"), &labels);
    let one = dir.path().join("all.npy");
    npy::write_npy_f32(&one, &[23, d], &all).unwrap();
    let one_labels = dir.path().join("all_labels.npy");
    write_labels(&one_labels, &labels);
    let a = load(&format!("shards:{}", s(&shards)));
    let b = load(&format!("npy:{},{}", s(&one), s(&one_labels)));
    assert_same(&a, &b);
    // Equal-size shards (the divided path).
    let even = dir.path().join("even");
    std::fs::create_dir(&even).unwrap();
    for k in 0..4 {
        let r = if k < 3 { 6 } else { 5 };
        npy::write_npy_f32(
            even.join(format!("part{k}.npy")),
            &[r, d],
            &all[k * 6 * d..(k * 6 + r) * d],
        )
        .unwrap();
    }
    let a = load(&format!("shards:{}", s(&even)));
    let b = load(&s(&one));
    assert_same(&a, &b);
}

#[test]
fn shards_of_pixels_are_images() {
    let dir = tempfile::tempdir().unwrap();
    let px: Vec<u8> = (0..5 * 3 * 2 * 2).map(|i| (i * 37 % 256) as u8).collect();
    write_u8_npy(&dir.path().join("0.npy"), &[2, 3, 2, 2], &px[..24]);
    write_u8_npy(&dir.path().join("1.npy"), &[3, 3, 2, 2], &px[24..]);
    let ds = load(&format!("shards:{}", s(dir.path())));
    assert_eq!(ds.shape, oracleflow::dataset::SampleShape::image(3, 2, 2));
    for i in 0..5 {
        assert_pixels(&ds, i, &px[i as usize * 12..(i as usize + 1) * 12]);
    }
}

#[test]
fn shards_refuse_mismatches_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    npy::write_npy_f32(p("a.npy"), &[2, 3], &values(6)).unwrap();
    npy::write_npy_f32(p("b.npy"), &[2, 4], &values(8)).unwrap();
    let spec = format!("shards:{}", s(dir.path()));
    let err = load_err(&spec);
    assert!(
        err.contains(&s(&p("b.npy"))) && err.contains("(4,)") && err.contains("(3,)"),
        "{err}"
    );
    std::fs::remove_file(p("b.npy")).unwrap();
    write_u8_npy(&p("b.npy"), &[2, 1, 3], &[0; 6]);
    let err = load_err(&spec);
    assert!(
        err.contains(&s(&p("b.npy"))) && err.contains("8-bit pixels"),
        "{err}"
    );
    std::fs::remove_file(p("b.npy")).unwrap();
    npy::write_npy_f32(p("b.npy"), &[1, 3], &values(3)).unwrap();
    // Labels for one shard only.
    write_labels(&p("a_labels.npy"), &[0, 1]);
    let err = load_err(&spec);
    assert!(
        err.contains(&s(&p("b.npy"))) && err.contains("b_labels.npy"),
        "{err}"
    );
    // A labels file that matches no shard.
    write_labels(&p("b_labels.npy"), &[0]);
    write_labels(&p("z_labels.npy"), &[0]);
    let err = load_err(&spec);
    assert!(
        err.contains(&s(&p("z_labels.npy"))) && err.contains("no shard"),
        "{err}"
    );
    std::fs::remove_file(p("z_labels.npy")).unwrap();
    // Now consistent: loads.
    assert_eq!(load(&spec).class_counts(), vec![(0, 2), (1, 1)]);
    // Both kinds of labels at once.
    write_labels(&p("labels.npy"), &[0, 0, 0]);
    let err = load_err(&spec);
    assert!(err.contains("both labels.npy and per-shard"), "{err}");
}

// ------------------------------------------------------------------------------ CIFAR

/// CIFAR records: label byte(s), then 3072 pixels derived from (file seed, record).
fn cifar_records(labels: &[Vec<u8>], seed: u8) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut bytes = Vec::new();
    let mut images = Vec::new();
    for (r, l) in labels.iter().enumerate() {
        let img: Vec<u8> = (0..3072)
            .map(|k| (k * 13 + r * 101 + seed as usize * 57) as u8)
            .collect();
        bytes.extend(l);
        bytes.extend(&img);
        images.push(img);
    }
    (bytes, images)
}

struct Cifar10 {
    dir: tempfile::TempDir,
    /// Images and labels of the training batches in order, then of the test batch.
    train: Vec<(Vec<u8>, u32)>,
    test: Vec<(Vec<u8>, u32)>,
}

fn cifar10(batches: &[usize], test: usize) -> Cifar10 {
    let dir = tempfile::tempdir().unwrap();
    let mut train = Vec::new();
    let write = |name: &str, n: usize, seed: u8, into: &mut Vec<(Vec<u8>, u32)>| {
        let labels: Vec<Vec<u8>> = (0..n)
            .map(|r| vec![((r * 3 + seed as usize) % 10) as u8])
            .collect();
        let (bytes, images) = cifar_records(&labels, seed);
        std::fs::write(dir.path().join(name), bytes).unwrap();
        into.extend(images.into_iter().zip(labels.iter().map(|l| l[0] as u32)));
    };
    for (k, &n) in batches.iter().enumerate() {
        write(
            &format!("data_batch_{}.bin", k + 1),
            n,
            k as u8 + 1,
            &mut train,
        );
    }
    let mut t = Vec::new();
    write("test_batch.bin", test, 0, &mut t);
    // Files the loader must ignore.
    std::fs::write(dir.path().join("batches.meta.txt"), "airplane\n").unwrap();
    Cifar10 {
        dir,
        train,
        test: t,
    }
}

fn assert_cifar(ds: &Dataset, want: &[(Vec<u8>, u32)]) {
    assert_eq!(ds.shape, oracleflow::dataset::SampleShape::image(3, 32, 32));
    assert_eq!(ds.n_samples(), want.len());
    for (i, (img, label)) in want.iter().enumerate() {
        assert_pixels(ds, i as u32, img);
        assert_eq!(label_of(ds, i as u32), *label);
    }
    let mut counts = std::collections::BTreeMap::new();
    want.iter()
        .for_each(|(_, l)| *counts.entry(*l).or_insert(0) += 1);
    assert_eq!(ds.class_counts(), counts.into_iter().collect::<Vec<_>>());
}

#[test]
fn cifar10_train_test_and_all() {
    let c = cifar10(&[4, 3, 5], 6);
    let dir = s(c.dir.path());
    assert_cifar(&load(&format!("cifar10:{dir}")), &c.train);
    assert_cifar(&load(&format!("cifar10:{dir}:train")), &c.train);
    assert_cifar(&load(&format!("cifar10:{dir}:test")), &c.test);
    let all: Vec<_> = c.train.iter().chain(&c.test).cloned().collect();
    assert_cifar(&load(&format!("cifar10:{dir}:all")), &all);
    // @M across batch files; f16 storage holds 8-bit pixels within 2^-11 of |v| <= 2.
    assert_cifar(&load(&format!("cifar10:{dir}@6")), &c.train[..6]);
    let ds = dataset::load(&format!("cifar10:{dir}:test@2"), Dtype::F16).unwrap();
    assert_eq!(ds.dtype(), Dtype::F16);
    for (i, (img, _)) in c.test[..2].iter().enumerate() {
        let got = sample_of(&ds, i as u32);
        for (g, &p) in got.iter().zip(img) {
            assert!((g - pixel(p)).abs() < 2e-3);
        }
    }
}

#[test]
fn cifar10_batches_are_read_in_number_order() {
    // Ten batches: name order would put data_batch_10 before data_batch_2.
    let c = cifar10(&[1; 10], 1);
    assert_cifar(&load(&format!("cifar10:{}", s(c.dir.path()))), &c.train);
}

#[test]
fn cifar100_uses_the_fine_label() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, n: usize, seed: u8| {
        let labels: Vec<Vec<u8>> = (0..n)
            .map(|r| vec![(r % 20) as u8, ((r * 37 + seed as usize) % 100) as u8])
            .collect();
        let (bytes, images) = cifar_records(&labels, seed);
        std::fs::write(dir.path().join(name), bytes).unwrap();
        images
            .into_iter()
            .zip(labels.iter().map(|l| l[1] as u32))
            .collect::<Vec<_>>()
    };
    let train = write("train.bin", 9, 1);
    let test = write("test.bin", 4, 2);
    let d = s(dir.path());
    assert_cifar(&load(&format!("cifar100:{d}")), &train);
    assert_cifar(&load(&format!("cifar100:{d}:test")), &test);
    let all: Vec<_> = train.iter().chain(&test).cloned().collect();
    assert_cifar(&load(&format!("cifar100:{d}:all@11")), &all[..11]);
}

#[test]
fn cifar_errors_name_the_file() {
    let c = cifar10(&[2, 2], 1);
    let dir = c.dir.path();
    let spec = format!("cifar10:{}", s(dir));
    // An unknown split after an existing directory is a spec error.
    assert!(matches!(
        dataset::load(&format!("{spec}:val"), Dtype::F32),
        Err(Error::Spec { .. })
    ));
    // A gap in the numbering.
    std::fs::rename(dir.join("data_batch_2.bin"), dir.join("data_batch_3.bin")).unwrap();
    let err = load_err(&spec);
    assert!(
        err.contains("data_batch_2.bin") && err.contains("missing"),
        "{err}"
    );
    std::fs::rename(dir.join("data_batch_3.bin"), dir.join("data_batch_2.bin")).unwrap();
    // A record cut short.
    let f = dir.join("data_batch_2.bin");
    let mut b = std::fs::read(&f).unwrap();
    b.pop();
    std::fs::write(&f, &b).unwrap();
    let err = load_err(&spec);
    assert!(err.contains(&s(&f)) && err.contains("3073-byte"), "{err}");
    // cifar100 on a CIFAR-10 folder: train.bin is missing.
    let err = load_err(&format!("cifar100:{}", s(dir)));
    assert!(
        err.contains("train.bin") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn new_spec_forms_are_documented() {
    for form in [
        "safetensors:FILE[:TENSOR]",
        "shards:DIR",
        "cifar10:DIR[:SPLIT]",
        "cifar100:DIR[:SPLIT]",
        "STEM_labels.npy",
        "labels, label or y",
    ] {
        assert!(dataset::SPEC_HELP.contains(form), "SPEC_HELP lacks {form}");
    }
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    for form in [
        "safetensors:FILE[:TENSOR]",
        "shards:DIR",
        "cifar10:DIR",
        "cifar100:DIR",
    ] {
        assert!(readme.contains(form), "README lacks {form}");
    }
}

/// The fuzz corpora of these loaders (fuzz/corpus/, seeds and inputs the fuzzers kept)
/// replayed through the same calls as the fuzz targets, in this test build, which checks
/// integer overflow (the fuzz build does not): every input ends in Ok or Err, no panic.
#[test]
fn fuzz_corpora_replay_without_panics() {
    use oracleflow::dataset::cifar::{self, Cifar, Split};
    use oracleflow::dataset::{safetensors as st, shards};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let inputs = |target: &str| -> Vec<Vec<u8>> {
        let mut v: Vec<_> = std::fs::read_dir(root.join(target))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(v.len() >= 4, "{target}: corpus missing");
        v.sort();
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fuzz.safetensors");
    for data in inputs("safetensors") {
        std::fs::write(&f, &data).unwrap();
        let _ = st::load(&f, None, None, Dtype::F32);
        let _ = st::load(&f, Some("x"), Some(1), Dtype::F16);
        let _ = st::load(&f, Some("labels"), None, Dtype::F32);
    }
    let (c10, c100) = (dir.path().join("c10"), dir.path().join("c100"));
    std::fs::create_dir(&c10).unwrap();
    std::fs::create_dir(&c100).unwrap();
    for data in inputs("cifar") {
        for f in [
            c10.join("data_batch_1.bin"),
            c10.join("test_batch.bin"),
            c100.join("train.bin"),
        ] {
            std::fs::write(f, &data).unwrap();
        }
        let _ = cifar::load(&c10, Cifar::Cifar10, Split::Train, None, Dtype::F32);
        let _ = cifar::load(&c10, Cifar::Cifar10, Split::All, Some(2), Dtype::F16);
        let _ = cifar::load(&c100, Cifar::Cifar100, Split::Train, None, Dtype::F32);
    }
    let sh = dir.path().join("sh");
    for data in inputs("shards") {
        let Some((&[layout, lo, hi], rest)) = data.split_first_chunk::<3>() else {
            continue;
        };
        let split = (u16::from_le_bytes([lo, hi]) as usize).min(rest.len());
        let (a, b) = rest.split_at(split);
        let _ = std::fs::remove_dir_all(&sh);
        std::fs::create_dir(&sh).unwrap();
        let second = ["b.npy", "labels.npy", "a_labels.npy"][layout as usize % 3];
        std::fs::write(sh.join("a.npy"), a).unwrap();
        std::fs::write(sh.join(second), b).unwrap();
        let _ = shards::load(&sh, None, Dtype::F32);
        let _ = shards::load(&sh, Some(1), Dtype::F16);
    }
}
