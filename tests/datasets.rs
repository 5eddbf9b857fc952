//! Dataset loaders and the spec syntax, on the real Fashion-MNIST files (Debian's
//! `dataset-fashion-mnist`, installed here and in CI) and on files the tests write.
//!
//! Pixel tolerance: a sample read back is `(stored + mean)` where stored = `(p/127.5 - 1) -
//! mean` was rounded to f32, so a pixel comes back within a couple of f32 ulps of
//! p/127.5 - 1 (|v| <= 1): 1e-6 is tight, and `round((v + 1) * 127.5)` recovers p exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use image::{GrayImage, Rgb, RgbImage};
use oracleflow::dataset::{self, idx, npy, synthetic, Dataset, Dtype, Values};
use oracleflow::Error;

mod common;

fn pixel(p: u8) -> f32 {
    (p as f64 / 127.5 - 1.0) as f32
}

/// Sample of source index `i` (user coordinates).
fn sample_of(ds: &Dataset, i: u32) -> Vec<f32> {
    ds.sample(ds.row_of_original(i).expect("index present"))
}

/// Label of source index `i`.
fn label_of(ds: &Dataset, i: u32) -> u32 {
    ds.labels().unwrap()[ds.row_of_original(i).unwrap()]
}

fn assert_pixels(got: &[f32], want: &[u8]) {
    assert_eq!(got.len(), want.len());
    for (k, (&g, &p)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - pixel(p)).abs() < 1e-6,
            "value {k}: got {g}, want {} (pixel {p})",
            pixel(p)
        );
        assert_eq!(((g as f64 + 1.0) * 127.5).round() as u8, p);
    }
}

fn stored(ds: &Dataset) -> &[f32] {
    match ds.values() {
        Values::F32(v) => v,
        _ => panic!("expected f32 storage"),
    }
}

/// Same samples in the same stored order, same labels and mean.
fn assert_same(a: &Dataset, b: &Dataset) {
    assert_eq!(a.n_samples(), b.n_samples());
    assert_eq!(a.shape, b.shape);
    assert_eq!(a.labels(), b.labels());
    assert_eq!(a.mean(), b.mean());
    assert_eq!(stored(a), stored(b));
    assert_eq!(a.sq_norms(), b.sq_norms());
}

fn expect_err_naming(result: Result<Dataset, Error>, path: &Path, what: &str) -> String {
    let err = result.expect_err(what).to_string();
    let name = path.display().to_string();
    assert!(
        err.contains(&name),
        "{what}: error '{err}' does not name {name}"
    );
    assert!(!err.contains('\n'), "error should be one line: {err}");
    err
}

fn assert_spec_error(spec: &str) {
    match dataset::load(spec, Dtype::F32) {
        Err(Error::Spec { .. }) => {}
        Err(e) => panic!("{spec:?}: expected a spec error, got {e}"),
        Ok(_) => panic!("{spec:?}: expected a spec error, got a dataset"),
    }
}

fn gunzip(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_images_bytes(n: u32, h: u32, w: u32, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x803u32, n, h, w] {
        b.extend(v.to_be_bytes());
    }
    b.extend(pixels);
    b
}

// ---------------------------------------------------------------- Fashion-MNIST, embedded

#[test]
fn fashion_mnist_train_prefix() {
    let Some(fmnist) = common::fashion_mnist() else {
        return;
    };
    let ds = dataset::load("fashion-mnist@500", Dtype::F32).unwrap();
    assert_eq!(ds.name, "fashion-mnist@500");
    assert_eq!(ds.n_samples(), 500);
    assert_eq!(ds.shape.dims, vec![1, 28, 28]);
    assert!(ds.shape.is_image);
    assert_eq!(ds.dim(), 784);
    let labels = ds.labels().expect("Fashion-MNIST has labels");
    assert_eq!(labels.len(), 500);
    assert!(labels.iter().all(|&l| l < 10));
    assert_eq!(ds.class_counts().len(), 10);
    for row in 0..ds.n_samples() {
        assert!(ds.sample(row).iter().all(|&v| (-1.0..=1.0).contains(&v)));
    }
    // Sample 0 is the first image of the file, pixel for pixel.
    let raw = gunzip(&fmnist.join("train-images-idx3-ubyte.gz"));
    assert_pixels(&sample_of(&ds, 0), &raw[16..16 + 784]);
    let raw_labels = gunzip(&fmnist.join("train-labels-idx1-ubyte.gz"));
    for i in 0..500u32 {
        assert_eq!(label_of(&ds, i), raw_labels[8 + i as usize] as u32);
    }
}

#[test]
fn fashion_mnist_test_split() {
    if common::fashion_mnist().is_none() {
        return;
    }
    let ds = dataset::load("fashion-mnist:test", Dtype::F16).unwrap();
    assert_eq!(ds.n_samples(), 10_000);
    assert_eq!(ds.dtype(), Dtype::F16);
    assert_eq!(ds.shape.dims, vec![1, 28, 28]);
    // The test split is balanced: 1000 per class.
    assert_eq!(
        ds.class_counts(),
        (0..10).map(|c| (c, 1000)).collect::<Vec<_>>()
    );
    let v = ds.sample(0);
    assert!(v.iter().all(|&x| (-1.001..=1.001).contains(&x)));
}

#[test]
fn embedded_is_the_first_2000_training_images() {
    let ds = dataset::load("embedded", Dtype::F32).unwrap();
    assert_eq!(ds.n_samples(), 2000);
    assert_eq!(ds.shape.dims, vec![1, 28, 28]);
    assert_eq!(ds.class_counts().len(), 10);
    if common::fashion_mnist().is_some() {
        let full = dataset::load("fashion-mnist@2000", Dtype::F32).unwrap();
        assert_same(&ds, &full);
    }

    let small = dataset::load("embedded@100", Dtype::F32).unwrap();
    assert_eq!(small.n_samples(), 100);
    // Different means (100 vs 2000 samples): equal up to f32 rounding of the centring.
    for (a, b) in sample_of(&small, 99).iter().zip(sample_of(&ds, 99)) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn raw_and_gzipped_idx_give_the_same_dataset() {
    let Some(fmnist) = common::fashion_mnist() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let gz = fmnist.join(format!("{name}.gz"));
        std::fs::write(dir.path().join(name), gunzip(&gz)).unwrap();
        std::fs::copy(&gz, dir.path().join(format!("{name}.gz"))).unwrap();
    }
    let raw_path = dir.path().join("t10k-images-idx3-ubyte");
    let gz_path = dir.path().join("t10k-images-idx3-ubyte.gz");
    // Unprefixed paths by their suffix, and idx: for any name; labels found beside.
    let raw = dataset::load(raw_path.to_str().unwrap(), Dtype::F32).unwrap();
    let gz = dataset::load(&format!("idx:{}", gz_path.display()), Dtype::F32).unwrap();
    let reference = dataset::load("fashion-mnist:test", Dtype::F32).unwrap();
    assert_same(&raw, &gz);
    assert_same(&raw, &reference);
    assert!(raw.labels().is_some());

    // Without a labels file beside it: unlabelled.
    let alone = tempfile::tempdir().unwrap();
    let lone = alone.path().join("t10k-images-idx3-ubyte");
    std::fs::copy(&raw_path, &lone).unwrap();
    let ds = idx::load(&lone, Some(10), Dtype::F32).unwrap();
    assert!(ds.labels().is_none());
    assert_eq!(ds.n_samples(), 10);
}

// ---------------------------------------------------------------- broken IDX files

#[test]
fn corrupt_idx_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    let good = idx_images_bytes(3, 4, 5, &pixels);

    // A valid small file loads.
    let ok = dir.path().join("ok-images-idx3-ubyte");
    std::fs::write(&ok, &good).unwrap();
    let ds = idx::load(&ok, None, Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![1, 4, 5]);
    assert_pixels(&sample_of(&ds, 2), &pixels[40..60]);

    let truncated = dir.path().join("cut-images-idx3-ubyte");
    std::fs::write(&truncated, &good[..good.len() - 1]).unwrap();
    let err = expect_err_naming(idx::load(&truncated, None, Dtype::F32), &truncated, "cut");
    assert!(err.contains("truncated"), "{err}");

    let long = dir.path().join("long-images-idx3-ubyte");
    std::fs::write(&long, [good.as_slice(), &[0]].concat()).unwrap();
    expect_err_naming(idx::load(&long, None, Dtype::F32), &long, "trailing");

    let short_header = dir.path().join("hdr-images-idx3-ubyte");
    std::fs::write(&short_header, &good[..10]).unwrap();
    expect_err_naming(
        idx::load(&short_header, None, Dtype::F32),
        &short_header,
        "short header",
    );

    let magic = dir.path().join("magic-images-idx3-ubyte");
    let mut bad = good.clone();
    bad[3] = 0x01; // a labels magic
    std::fs::write(&magic, &bad).unwrap();
    let err = expect_err_naming(idx::load(&magic, None, Dtype::F32), &magic, "magic");
    assert!(err.contains("magic"), "{err}");

    // Truncated gzip stream.
    let gz = gzip(&good);
    let cut_gz = dir.path().join("cut-images-idx3-ubyte.gz");
    std::fs::write(&cut_gz, &gz[..gz.len() / 2]).unwrap();
    expect_err_naming(idx::load(&cut_gz, None, Dtype::F32), &cut_gz, "cut gzip");

    // Gzipped but truncated IDX content.
    let cut_content = dir.path().join("cutc-images-idx3-ubyte.gz");
    std::fs::write(&cut_content, gzip(&good[..good.len() - 7])).unwrap();
    expect_err_naming(
        dataset::load(cut_content.to_str().unwrap(), Dtype::F32),
        &cut_content,
        "cut content",
    );

    // Labels beside the images, but one too few.
    let images = dir.path().join("few-images-idx3-ubyte");
    let labels = dir.path().join("few-labels-idx1-ubyte");
    std::fs::write(&images, &good).unwrap();
    let mut l = Vec::new();
    l.extend(0x801u32.to_be_bytes());
    l.extend(2u32.to_be_bytes());
    l.extend([0u8, 1]);
    std::fs::write(&labels, &l).unwrap();
    expect_err_naming(idx::load(&images, None, Dtype::F32), &labels, "label count");
}

#[test]
fn missing_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let idx_path = dir.path().join("none-images-idx3-ubyte.gz");
    expect_err_naming(
        dataset::load(idx_path.to_str().unwrap(), Dtype::F32),
        &idx_path,
        "missing idx",
    );
    let folder = dir.path().join("no-folder");
    expect_err_naming(
        dataset::load(&format!("folder:{}", folder.display()), Dtype::F32),
        &folder,
        "missing folder",
    );
    let npy_path = dir.path().join("none.npy");
    expect_err_naming(
        dataset::load(npy_path.to_str().unwrap(), Dtype::F32),
        &npy_path,
        "missing npy",
    );
    // Existing data, missing labels.
    let data = dir.path().join("d.npy");
    npy::write_npy_f32(&data, &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let labels = dir.path().join("l.npy");
    expect_err_naming(
        dataset::load(
            &format!("npy:{},{}", data.display(), labels.display()),
            Dtype::F32,
        ),
        &labels,
        "missing labels",
    );
}

// ---------------------------------------------------------------- image folders

fn gray(w: u32, h: u32, seed: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 37 + y * 91 + seed * 53) % 256) as u8])
    })
}

fn rgb(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = x * 29 + y * 71 + seed * 13;
        Rgb([
            (v % 256) as u8,
            ((v * 3 + 1) % 256) as u8,
            255 - (v % 256) as u8,
        ])
    })
}

/// Planar C x H x W bytes of an RGB image.
fn planar(img: &RgbImage) -> Vec<u8> {
    (0..3)
        .flat_map(|c| img.pixels().map(move |p| p[c]))
        .collect()
}

#[test]
fn gray_png_folder_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // Names sort as b, c, d; also a non-image file and a hidden file, both skipped.
    let imgs = [gray(4, 3, 1), gray(4, 3, 2), gray(4, 3, 3)];
    for (name, img) in ["b.png", "c.png", "d.PNG"].iter().zip(&imgs) {
        img.save_with_format(dir.path().join(name), image::ImageFormat::Png)
            .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join(".hidden.png"), "junk").unwrap();

    let ds = dataset::load(dir.path().to_str().unwrap(), Dtype::F32).unwrap();
    assert_eq!(ds.n_samples(), 3);
    assert_eq!(ds.shape.dims, vec![1, 3, 4]);
    assert!(ds.shape.is_image);
    assert!(ds.labels().is_none());
    for (i, img) in imgs.iter().enumerate() {
        assert_pixels(&sample_of(&ds, i as u32), img.as_raw());
    }
    let two = dataset::load(&format!("folder:{}@2", dir.path().display()), Dtype::F32).unwrap();
    assert_eq!(two.n_samples(), 2);
}

#[test]
fn rgb_and_mixed_png_folder_round_trips_planar() {
    let dir = tempfile::tempdir().unwrap();
    let a = rgb(5, 2, 1);
    let b = gray(5, 2, 7);
    a.save(dir.path().join("a.png")).unwrap();
    b.save(dir.path().join("b.png")).unwrap();
    let ds = folder_load(dir.path());
    assert_eq!(ds.shape.dims, vec![3, 2, 5]);
    assert_pixels(&sample_of(&ds, 0), &planar(&a));
    // The gray image is replicated into the three planes.
    let b3: Vec<u8> = (0..3).flat_map(|_| b.as_raw().clone()).collect();
    assert_pixels(&sample_of(&ds, 1), &b3);
}

fn folder_load(dir: &Path) -> Dataset {
    oracleflow::dataset::folder::load(dir, None, Dtype::F32).unwrap()
}

#[test]
fn class_subfolders_give_sorted_index_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = Vec::new(); // (source index, label, image)
    for (class, name) in ["ants", "bees", "cats"].iter().enumerate() {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        for j in 0..(class as u32 + 1) {
            let img = rgb(3, 3, class as u32 * 10 + j);
            img.save(sub.join(format!("{j}.png"))).unwrap();
            want.push((class as u32, img));
        }
    }
    let ds = folder_load(dir.path());
    assert_eq!(ds.n_samples(), 6);
    assert_eq!(ds.class_counts(), vec![(0, 1), (1, 2), (2, 3)]);
    for (i, (label, img)) in want.iter().enumerate() {
        assert_eq!(label_of(&ds, i as u32), *label);
        assert_pixels(&sample_of(&ds, i as u32), &planar(img));
    }
}

#[test]
fn bad_folders_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    gray(4, 4, 0).save(dir.path().join("a.png")).unwrap();
    gray(4, 5, 0).save(dir.path().join("b.png")).unwrap();
    let odd = dir.path().join("b.png");
    let err = expect_err_naming(
        oracleflow::dataset::folder::load(dir.path(), None, Dtype::F32),
        &odd,
        "mismatched sizes",
    );
    assert!(err.contains("4x5") && err.contains("4x4"), "{err}");
    assert!(err.contains("a.png"), "{err}");

    let junk = tempfile::tempdir().unwrap();
    let bad = junk.path().join("x.png");
    std::fs::write(&bad, "not a png").unwrap();
    expect_err_naming(
        oracleflow::dataset::folder::load(junk.path(), None, Dtype::F32),
        &bad,
        "undecodable",
    );

    let empty = tempfile::tempdir().unwrap();
    expect_err_naming(
        oracleflow::dataset::folder::load(empty.path(), None, Dtype::F32),
        empty.path(),
        "empty folder",
    );

    let both = tempfile::tempdir().unwrap();
    gray(2, 2, 0).save(both.path().join("a.png")).unwrap();
    std::fs::create_dir(both.path().join("sub")).unwrap();
    expect_err_naming(
        oracleflow::dataset::folder::load(both.path(), None, Dtype::F32),
        both.path(),
        "files and sub-folders",
    );
}

// ---------------------------------------------------------------- .npy

/// Writes an .npy file with any header fields, for formats the crate does not write.
fn write_npy_raw(path: &Path, descr: &str, fortran: bool, shape: &str, data: &[u8]) {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn npy_f32_round_trips_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("x.npy");
    let values: Vec<f32> = (0..4 * 2 * 3)
        .map(|i| (i as f32 * 0.37).sin() * 5.0)
        .collect();
    npy::write_npy_f32(&data, &[4, 2, 3], &values).unwrap();

    // The writer's output reads back bit for bit, and leaves no temporary file.
    let (shape, back) = npy::read_npy_f32(&data).unwrap();
    assert_eq!(shape, vec![4, 2, 3]);
    assert_eq!(back, values);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let labels = dir.path().join("y.npy");
    let l: [i64; 4] = [3, 1, 3, 0];
    write_npy_raw(&labels, "<i8", false, "(4,)", bytemuck::cast_slice(&l));

    let spec = format!("npy:{},{}", data.display(), labels.display());
    let ds = dataset::load(&spec, Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![2, 3]);
    assert!(!ds.shape.is_image);
    assert_eq!(ds.n_samples(), 4);
    for i in 0..4u32 {
        assert_eq!(label_of(&ds, i), l[i as usize] as u32);
        let got = sample_of(&ds, i);
        let want = &values[i as usize * 6..(i as usize + 1) * 6];
        for (g, w) in got.iter().zip(want) {
            // f32 values pass through centring in f64 and one f32 rounding each way.
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
    let two = dataset::load(&format!("{spec}@2"), Dtype::F32).unwrap();
    assert_eq!(two.n_samples(), 2);
    assert_eq!(two.labels().unwrap().len(), 2);
    // After a path, '@' not followed by a count is part of the path.
    let at = dir.path().join("y.npy@x");
    expect_err_naming(
        dataset::load(&format!("{spec}@x"), Dtype::F32),
        &at,
        "@x path",
    );
    assert!(dataset::load(&format!("{spec}@5"), Dtype::F32).is_err());

    // Unprefixed path, 1-D data: scalar samples.
    let flat = dir.path().join("flat.npy");
    npy::write_npy_f32(&flat, &[3], &[1.0, 2.0, 4.0]).unwrap();
    let ds = dataset::load(flat.to_str().unwrap(), Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![1]);
    assert_eq!(ds.mean(), &[7.0 / 3.0]);
}

#[test]
fn npy_f16_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.npy");
    let values: Vec<f16> = (0..3 * 8)
        .map(|i| f16::from_f32(i as f32 / 8.0 - 1.0))
        .collect();
    write_npy_raw(&path, "<f2", false, "(3, 8)", bytemuck::cast_slice(&values));
    let ds = dataset::load(path.to_str().unwrap(), Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![8]);
    for i in 0..3u32 {
        let got = sample_of(&ds, i);
        for (g, w) in got.iter().zip(&values[i as usize * 8..]) {
            assert!((g - w.to_f32()).abs() < 1e-6);
        }
    }
    let (shape, back) = npy::read_npy_f32(&path).unwrap();
    assert_eq!(shape, vec![3, 8]);
    assert_eq!(back, values.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
}

#[test]
fn npy_u8_images_in_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (n, c, h, w) = (2usize, 3usize, 4usize, 5usize);
    let planar: Vec<u8> = (0..n * c * h * w).map(|i| (i * 7 % 256) as u8).collect();
    let sample = c * h * w;

    let nchw = dir.path().join("nchw.npy");
    write_npy_raw(&nchw, "|u1", false, "(2, 3, 4, 5)", &planar);
    let ds = dataset::load(nchw.to_str().unwrap(), Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![3, 4, 5]);
    assert!(ds.shape.is_image);
    for i in 0..n {
        assert_pixels(
            &sample_of(&ds, i as u32),
            &planar[i * sample..(i + 1) * sample],
        );
    }

    // Channels last: the same pictures.
    let mut nhwc = vec![0u8; planar.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                nhwc[i * sample + p * c + ch] = planar[i * sample + ch * h * w + p];
            }
        }
    }
    let last = dir.path().join("nhwc.npy");
    write_npy_raw(&last, "|u1", false, "(2, 4, 5, 3)", &nhwc);
    assert_same(
        &dataset::load(last.to_str().unwrap(), Dtype::F32).unwrap(),
        &ds,
    );

    // (N, H, W): one channel; labels as u8.
    let nhw = dir.path().join("nhw.npy");
    write_npy_raw(&nhw, "|u1", false, "(6, 4, 5)", &planar);
    let labels = dir.path().join("l.npy");
    write_npy_raw(&labels, "|u1", false, "(6,)", &[5, 4, 3, 2, 1, 0]);
    let ds = npy::load(&nhw, Some(&labels), None, Dtype::F32).unwrap();
    assert_eq!(ds.shape.dims, vec![1, 4, 5]);
    assert_eq!(label_of(&ds, 0), 5);
    assert_pixels(&sample_of(&ds, 5), &planar[5 * 20..6 * 20]);

    // u8 read as plain values (not rescaled) by read_npy_f32.
    let (shape, v) = npy::read_npy_f32(&nhw).unwrap();
    assert_eq!(shape, vec![6, 4, 5]);
    assert_eq!(v[1], planar[1] as f32);
}

/// (file name, descr, fortran_order, shape, data, a word the error must contain)
type BadNpy<'a> = (&'a str, &'a str, bool, &'a str, &'a [u8], &'a str);

#[test]
fn bad_npy_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let four = [0u8; 16];
    let cases: [BadNpy; 7] = [
        ("c8.npy", "<c8", false, "(2,)", &four, "dtype"),
        ("i4.npy", "<i4", false, "(2, 2)", &four, "dtype"),
        ("be.npy", ">f4", false, "(2, 2)", &four, "big-endian"),
        ("fortran.npy", "<f4", true, "(2, 2)", &four, "Fortran"),
        ("short.npy", "<f4", false, "(2, 3)", &four, "truncated"),
        ("u8vec.npy", "|u1", false, "(4, 4)", &four, "images"),
        ("empty.npy", "<f4", false, "(0, 4)", &[], "empty"),
    ];
    for (name, descr, fortran, shape, data, word) in cases {
        let path = dir.path().join(name);
        write_npy_raw(&path, descr, fortran, shape, data);
        let err = expect_err_naming(npy::load(&path, None, None, Dtype::F32), &path, name);
        assert!(err.contains(word), "{name}: '{err}' should mention {word}");
    }

    let not_npy = dir.path().join("text.npy");
    std::fs::write(&not_npy, "hello, world").unwrap();
    expect_err_naming(
        npy::load(&not_npy, None, None, Dtype::F32),
        &not_npy,
        "text",
    );

    // Labels: wrong length, float dtype, negative value.
    let data = dir.path().join("d.npy");
    npy::write_npy_f32(&data, &[3, 1], &[0.0, 1.0, 2.0]).unwrap();
    let label_cases: [(&str, &str, &str, Vec<u8>); 3] = [
        ("l2.npy", "<i4", "(2,)", vec![0; 8]),
        ("lf.npy", "<f4", "(3,)", vec![0; 12]),
        (
            "lneg.npy",
            "<i4",
            "(3,)",
            [0i32, -1, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    for (name, descr, shape, bytes) in label_cases {
        let labels = dir.path().join(name);
        write_npy_raw(&labels, descr, false, shape, &bytes);
        expect_err_naming(
            npy::load(&data, Some(&labels), None, Dtype::F32),
            &labels,
            name,
        );
    }
}

#[test]
fn npy_writer_leaves_nothing_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    // Shape and data disagree: nothing written.
    assert!(npy::write_npy_f32(&path, &[2, 3], &[1.0; 5]).is_err());
    // Directory in the way of the target: the rename fails, the temp file is removed.
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), "x").unwrap();
    let err = npy::write_npy_f32(&path, &[1], &[1.0]).unwrap_err();
    assert!(err.to_string().contains("out.npy"), "{err}");
    let names: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names, vec![path.clone()], "no temporary file left behind");
    // Missing directory: an error naming the file.
    let nowhere = dir.path().join("missing").join("x.npy");
    let err = npy::write_npy_f32(&nowhere, &[1], &[1.0]).unwrap_err();
    assert!(err.to_string().contains("x.npy"), "{err}");
}

// ---------------------------------------------------------------- synthetic, specs

#[test]
fn gaussian_is_deterministic_per_seed() {
    let a = synthetic::gaussian(200, 50, 7);
    assert_eq!(a, synthetic::gaussian(200, 50, 7));
    assert_ne!(a, synthetic::gaussian(200, 50, 8));
    // 10000 draws of N(0, 1): mean within ~5 standard errors (0.01) of 0, variance of 1.
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    assert!(mean.abs() < 0.05, "mean {mean}");
    assert!((var - 1.0).abs() < 0.06, "variance {var}");

    let ds = dataset::load("gaussian:200,50,7", Dtype::F32).unwrap();
    assert_eq!(ds.n_samples(), 200);
    assert_eq!(ds.shape.dims, vec![50]);
    assert!(ds.labels().is_none());
    let first = sample_of(&ds, 3);
    for (g, w) in first.iter().zip(&a[150..200]) {
        assert!((g - w).abs() < 1e-5);
    }
    // @M keeps the first M rows of the same draw.
    let ten = dataset::load("gaussian:200,50,7@10", Dtype::F32).unwrap();
    assert_eq!(ten.n_samples(), 10);
    assert_eq!(sample_of(&ten, 3).len(), 50);
    for (g, w) in sample_of(&ten, 3).iter().zip(&a[150..200]) {
        assert!((g - w).abs() < 1e-5);
    }
    // Seed 0 by default.
    assert_same(
        &dataset::load("gaussian:20,3", Dtype::F32).unwrap(),
        &dataset::load("gaussian:20,3,0", Dtype::F32).unwrap(),
    );
}

#[test]
fn mixture_labels_are_components() {
    let (values, labels) = synthetic::mixture(30, 16, 3, 1);
    assert_eq!(values.len(), 30 * 16);
    assert_eq!(labels, (0..30).map(|i| i % 3).collect::<Vec<u32>>());
    let ds = dataset::load("mixture:30,16,3,1", Dtype::F32).unwrap();
    assert_eq!(ds.class_counts(), vec![(0, 10), (1, 10), (2, 10)]);
    // Samples of one component are much closer to each other than to another component's.
    let d = |a: u32, b: u32| -> f32 {
        sample_of(&ds, a)
            .iter()
            .zip(sample_of(&ds, b))
            .map(|(x, y)| (x - y).powi(2))
            .sum()
    };
    assert!(d(0, 3) * 10.0 < d(0, 1), "{} vs {}", d(0, 3), d(0, 1));
}

#[test]
fn limits_and_bad_specs() {
    if common::fashion_mnist().is_some() {
        assert_eq!(
            dataset::load("fashion-mnist:test@250", Dtype::F32)
                .unwrap()
                .n_samples(),
            250
        );
    }
    // More than there is: an error (not a silent clamp).
    assert!(dataset::load("embedded@2001", Dtype::F32).is_err());
    assert_spec_error("gaussian:10,2@11");

    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("data.bin");
    std::fs::write(&unknown, "x").unwrap();
    for spec in [
        "",
        "nonsense",
        "embedded@0",
        "embedded@abc",
        "fashion-mnist:validation",
        "gaussian:10",
        "gaussian:10,0",
        "gaussian:1,2,3,4",
        "mixture:10,2",
        "mixture:10,2,0",
        "idx:",
        "npy:",
        unknown.to_str().unwrap(),
    ] {
        assert_spec_error(spec);
    }
    // The help names every form.
    for form in [
        "embedded",
        "fashion-mnist:test",
        "idx:",
        "folder:",
        "npy:",
        "gaussian:",
        "mixture:",
        "@M",
    ] {
        assert!(dataset::SPEC_HELP.contains(form), "{form}");
    }
}

#[test]
fn jpeg_folder_loads() {
    // JPEG is lossy: check the layout and that a flat colour comes back close.
    let dir = tempfile::tempdir().unwrap();
    let flat = RgbImage::from_pixel(16, 8, Rgb([200, 40, 90]));
    flat.save(dir.path().join("a.jpg")).unwrap();
    flat.save(dir.path().join("b.JPEG")).unwrap();
    let ds = folder_load(dir.path());
    assert_eq!(ds.n_samples(), 2);
    assert_eq!(ds.shape.dims, vec![3, 8, 16]);
    let s = sample_of(&ds, 1);
    for (c, want) in [200u8, 40, 90].iter().enumerate() {
        let got = s[c * 128 + 37];
        assert!((got - pixel(*want)).abs() < 0.05, "channel {c}: {got}");
    }
}
