//! A folder of PNG/JPEG images, all one size.
//!
//! - Files are taken in sorted name order; hidden entries and files that are not
//!   `.png`/`.jpg`/`.jpeg` (any case) are skipped.
//! - When the folder holds sub-folders instead of images, each sub-folder is a class: a
//!   sample's label is the index of its sub-folder in the sorted list of sub-folder names
//!   (empty sub-folders keep their index). Samples come class by class, then by file name.
//! - Gray images (L, LA, 8 or 16 bit) give 1 channel; any other colour type gives RGB, 3
//!   channels. When a folder mixes gray and colour images, all become RGB (gray replicated).
//!   Alpha is dropped; 16-bit images are reduced to 8 bits.
//! - Samples are stored planar, C x H x W, as 8-bit pixels (mapped to [-1, 1]).

use std::path::{Path, PathBuf};

use image::{ColorType, DynamicImage};
use rayon::prelude::*;

use super::limits::{check_alloc, keep_first, product};
use super::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};

/// The image files of a folder, in load order, with their labels when it has classes.
#[derive(Clone, Debug)]
pub struct FolderListing {
    pub files: Vec<PathBuf>,
    /// One label per file (index into `class_names`), when the folder has class sub-folders.
    pub labels: Option<Vec<u32>>,
    /// Sorted sub-folder names (the classes), when the folder has class sub-folders.
    pub class_names: Option<Vec<String>>,
}

/// Lists the images of `dir` (see the module docs for the rules).
pub fn list(dir: &Path) -> Result<FolderListing> {
    let (files, subdirs) = entries(dir)?;
    if !files.is_empty() && !subdirs.is_empty() {
        return Err(Error::data(
            dir,
            format!(
                "holds both image files and sub-folders (e.g. {} and {}/); use either images \
                 or one sub-folder of images per class",
                file_name(&files[0]),
                file_name(&subdirs[0])
            ),
        ));
    }
    if !files.is_empty() {
        return Ok(FolderListing {
            files,
            labels: None,
            class_names: None,
        });
    }
    let mut all = Vec::new();
    let mut labels = Vec::new();
    let mut class_names = Vec::new();
    for (class, sub) in subdirs.iter().enumerate() {
        let (class_files, _) = entries(sub)?;
        labels.extend(std::iter::repeat_n(class as u32, class_files.len()));
        all.extend(class_files);
        class_names.push(file_name(sub));
    }
    if all.is_empty() {
        return Err(Error::data(
            dir,
            "no .png/.jpg/.jpeg images (neither in the folder nor in sub-folders)",
        ));
    }
    Ok(FolderListing {
        files: all,
        labels: Some(labels),
        class_names: Some(class_names),
    })
}

/// Loads the images of `dir`; `limit` keeps the first samples in load order (and decodes
/// only those).
pub fn load(dir: &Path, limit: Option<usize>, dtype: Dtype) -> Result<Dataset> {
    let listing = list(dir)?;
    let n = keep_first(dir, listing.files.len(), limit)?;
    let files = &listing.files[..n];

    // All images are one size (checked below), so the first header tells the memory the
    // decoded images (RGB at most) and the dataset will take: refuse before decoding.
    let (w, h) = image::ImageReader::open(&files[0])
        .map_err(|e| Error::io(&files[0], e))?
        .with_guessed_format()
        .map_err(|e| Error::io(&files[0], e))?
        .into_dimensions()
        .map_err(|e| Error::data(&files[0], format!("cannot decode image: {e}")))?;
    check_alloc(
        &format!("{}: {n} images of {w}x{h} pixels", dir.display()),
        product(&[n, w as usize, h as usize, 3, 1 + dtype.bytes()]),
    )?;

    let decoded: Vec<Decoded> = files
        .par_iter()
        .map(|path| decode(path))
        .collect::<Result<_>>()?;

    let (width, height) = (decoded[0].width, decoded[0].height);
    for (d, path) in decoded.iter().zip(files) {
        if (d.width, d.height) != (width, height) {
            return Err(Error::data(
                path,
                format!(
                    "image is {}x{} pixels, but {} is {width}x{height}; all images must be one size",
                    d.width,
                    d.height,
                    files[0].display()
                ),
            ));
        }
    }
    let channels = if decoded.iter().all(|d| d.channels == 1) {
        1
    } else {
        3
    };

    // Planar C x H x W per sample; a gray image in an RGB folder fills all three planes.
    let plane = width * height;
    let dim = channels * plane;
    let mut pixels = vec![0u8; n * dim];
    for (d, out) in decoded.iter().zip(pixels.chunks_exact_mut(dim)) {
        for c in 0..channels {
            let src_c = c.min(d.channels - 1);
            for (o, px) in out[c * plane..(c + 1) * plane]
                .iter_mut()
                .zip(d.pixels.chunks_exact(d.channels))
            {
                *o = px[src_c];
            }
        }
    }

    let labels = listing.labels.map(|l| l[..n].to_vec());
    Dataset::from_raw(
        dir.display().to_string(),
        SampleShape::image(channels, height, width),
        RawRows::U8Pixels(&pixels),
        labels,
        dtype,
    )
}

/// One decoded image: interleaved 8-bit pixels with 1 (gray) or 3 (RGB) channels.
struct Decoded {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
}

fn decode(path: &Path) -> Result<Decoded> {
    let image = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::data(path, format!("cannot decode image: {e}")))?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let gray = matches!(
        image.color(),
        ColorType::L8 | ColorType::La8 | ColorType::L16 | ColorType::La16
    );
    let (channels, pixels) = if gray {
        (1, DynamicImage::into_luma8(image).into_raw())
    } else {
        (3, DynamicImage::into_rgb8(image).into_raw())
    };
    Ok(Decoded {
        width,
        height,
        channels,
        pixels,
    })
}

/// Image files and sub-folders of `dir`, each sorted by name; hidden entries skipped.
fn entries(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // fs::metadata follows symlinks.
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            subdirs.push(path);
        } else if meta.is_file() && is_image_name(&path) {
            files.push(path);
        }
    }
    files.sort();
    subdirs.sort();
    Ok((files, subdirs))
}

fn is_image_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e.eq_ignore_ascii_case("png")
            || e.eq_ignore_ascii_case("jpg")
            || e.eq_ignore_ascii_case("jpeg")
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
