//! IDX files (the MNIST family): `*-images-idx3-ubyte` (magic 0x00000803, N x H x W u8
//! pixels) and `*-labels-idx1-ubyte` (magic 0x00000801, N u8 labels), raw or gzipped.
//!
//! The parsers take bytes (gzipped or not, recognised by the gzip magic), so files on disk
//! and the embedded default dataset go through the same code. Every check is exact: the
//! magic, the dimensions, and the number of data bytes (a truncated file or trailing bytes
//! are errors that name the file).

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::limits::{check_alloc, keep_first, product, read_file};
use super::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Decoded images: `pixels` is N x H x W, row-major.
#[derive(Clone, Debug)]
pub struct IdxImages {
    pub n_images: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// Decodes an images file from its bytes (gzipped or raw). `source` names it in errors.
pub fn decode_images(bytes: &[u8], source: &Path) -> Result<IdxImages> {
    let (dims, pixels) = decode(bytes, IMAGES_MAGIC, 3, source, |dims| {
        if dims.contains(&0) {
            let [n, h, w] = dims else { unreachable!() };
            return Err(Error::data(
                source,
                format!("empty IDX images file ({n} images of {h}x{w})"),
            ));
        }
        Ok(())
    })?;
    Ok(IdxImages {
        n_images: dims[0],
        height: dims[1],
        width: dims[2],
        pixels,
    })
}

/// Decodes a labels file from its bytes (gzipped or raw). `source` names it in errors.
pub fn decode_labels(bytes: &[u8], source: &Path) -> Result<Vec<u32>> {
    let (_, body) = decode(bytes, LABELS_MAGIC, 1, source, |_| Ok(()))?;
    Ok(body.iter().map(|&l| l as u32).collect())
}

/// Reads and decodes an images file.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    decode_images(&read_file(path)?, path)
}

/// Reads and decodes a labels file.
pub fn read_labels(path: &Path) -> Result<Vec<u32>> {
    decode_labels(&read_file(path)?, path)
}

/// The labels file that goes with an images file: the same name with `images-idx3`
/// replaced by `labels-idx1` (so the same `.gz`-ness), when such a file exists.
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    if !name.contains("images-idx3") {
        return None;
    }
    let labels = images.with_file_name(name.replace("images-idx3", "labels-idx1"));
    labels.is_file().then_some(labels)
}

/// Loads an images file, with the labels file found beside it by [`labels_path_for`]
/// when there is one. `limit` keeps only the first samples.
pub fn load(images: &Path, limit: Option<usize>, dtype: Dtype) -> Result<Dataset> {
    let labels = labels_path_for(images);
    load_pair(images, labels.as_deref(), limit, dtype)
}

/// Loads an images file and, when given, its labels file (no search beside the images).
pub fn load_pair(
    images: &Path,
    labels: Option<&Path>,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    let decoded = read_images(images)?;
    let labels = labels
        .map(|path| read_labels(path).map(|l| (l, path)))
        .transpose()?;
    build(
        images.display().to_string(),
        decoded,
        images,
        labels.as_ref().map(|(l, p)| (l.as_slice(), *p)),
        limit,
        dtype,
    )
}

/// Builds a dataset from in-memory IDX bytes (gzipped or raw), e.g. `include_bytes!` data.
/// `name` names the dataset and the source in errors.
pub fn from_bytes(
    name: &str,
    images: &[u8],
    labels: Option<&[u8]>,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    let source = Path::new(name);
    let decoded = decode_images(images, source)?;
    let labels = labels.map(|b| decode_labels(b, source)).transpose()?;
    build(
        name.to_string(),
        decoded,
        source,
        labels.as_deref().map(|l| (l, source)),
        limit,
        dtype,
    )
}

fn build(
    name: String,
    images: IdxImages,
    images_path: &Path,
    labels: Option<(&[u32], &Path)>,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    if let Some((labels, labels_path)) = labels {
        if labels.len() != images.n_images {
            return Err(Error::data(
                labels_path,
                format!(
                    "{} labels, but {} has {} images",
                    labels.len(),
                    images_path.display(),
                    images.n_images
                ),
            ));
        }
    }
    let n = keep_first(images_path, images.n_images, limit)?;
    let dim = images.height * images.width;
    Dataset::from_raw(
        name,
        SampleShape::image(1, images.height, images.width),
        RawRows::U8Pixels(&images.pixels[..n * dim]),
        labels.map(|(l, _)| l[..n].to_vec()),
        dtype,
    )
}

/// Reads the header and the data that follows it from raw or gzipped bytes (gzip is
/// recognised by its magic), checking the magic, `check_dims`, the memory the data needs
/// (before allocating it) and that exactly that much data follows. Gzip is decompressed
/// as a stream, so a gzip bomb or a lying header never allocates more than the header
/// announces.
fn decode(
    bytes: &[u8],
    magic: u32,
    ndims: usize,
    source: &Path,
    check_dims: impl FnOnce(&[usize]) -> Result<()>,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let gzipped = bytes.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read + '_> = if gzipped {
        Box::new(MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let gz_err =
        |e: std::io::Error| Error::data(source, format!("cannot decompress gzip data: {e}"));

    let kind = if magic == IMAGES_MAGIC {
        "images (idx3-ubyte)"
    } else {
        "labels (idx1-ubyte)"
    };
    let header_len = 4 + 4 * ndims;
    let mut header = Vec::with_capacity(header_len);
    (&mut reader)
        .take(header_len as u64)
        .read_to_end(&mut header)
        .map_err(gz_err)?;
    if header.len() < 4 {
        return Err(Error::data(
            source,
            format!(
                "not an IDX {kind} file: {} bytes, too short for a header",
                header.len()
            ),
        ));
    }
    let got = be_u32(&header[..4]);
    if got != magic {
        let hint = match got {
            IMAGES_MAGIC => " (this is an images file)",
            LABELS_MAGIC => " (this is a labels file)",
            _ => "",
        };
        return Err(Error::data(
            source,
            format!("not an IDX {kind} file: magic 0x{got:08x}, expected 0x{magic:08x}{hint}"),
        ));
    }
    if header.len() < header_len {
        return Err(Error::data(
            source,
            format!(
                "truncated IDX header: {} bytes, expected {header_len}",
                header.len()
            ),
        ));
    }
    let dims: Vec<usize> = header[4..]
        .chunks_exact(4)
        .map(|c| be_u32(c) as usize)
        .collect();
    check_dims(&dims)?;
    let dims_text = dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x");
    let expected = product(&dims);
    check_alloc(
        &format!("{}: IDX data of {dims_text} bytes", source.display()),
        expected,
    )?;
    let expected = expected.expect("checked above") as usize;

    // Read at most one byte past the data: enough to tell trailing bytes. Reserve only
    // what the input can hold (raw: the bytes present; gzip: a generous ratio), so a
    // truncated file whose header claims gigabytes does not take them.
    let plausible = if gzipped {
        bytes.len().saturating_mul(16)
    } else {
        bytes.len()
    };
    let mut body = Vec::with_capacity(expected.min(plausible) + 1);
    (&mut reader)
        .take(expected as u64 + 1)
        .read_to_end(&mut body)
        .map_err(gz_err)?;
    if body.len() < expected {
        return Err(Error::data(
            source,
            format!(
                "truncated: header says {dims_text} = {expected} bytes of data, found {}",
                body.len()
            ),
        ));
    }
    if body.len() > expected {
        let extra = if gzipped {
            "unexpected bytes".to_string()
        } else {
            format!("{} unexpected bytes", bytes.len() - header_len - expected)
        };
        return Err(Error::data(
            source,
            format!("{extra} after the {dims_text} = {expected} bytes of data"),
        ));
    }
    Ok((dims, body))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
