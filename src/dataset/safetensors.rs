//! safetensors files (`safetensors:FILE[:TENSOR]`), e.g. latents saved from PyTorch.
//!
//! The header is parsed and validated by the `safetensors` crate (Hugging Face's own
//! implementation: tensor offsets contiguous, each matching its shape and dtype, the last
//! ending exactly at the end of the file). The file is memory-mapped and the chosen tensor
//! handed to [`Dataset::from_raw`] in place (copied once only when its data is not aligned
//! to its element size, which files written by the crate or by PyTorch always are).
//!
//! - Data: an `F32`, `F16` or `BF16` tensor of shape (N, ...); a sample is one row (a
//!   1-D tensor gives samples of one value). bf16 is widened to f32 exactly.
//! - Which tensor: the one named by `:TENSOR`; without it, the file's only tensor besides
//!   the labels tensor.
//! - Labels (optional): the first of the tensors named `labels`, `label`, `y` that has an
//!   integer dtype (U8, I8, U16, I16, U32, I32, U64, I64), shape (N,) or (N, 1), values
//!   in 0 ..= u32::MAX. A float tensor of one of those names is not taken as labels.

use std::borrow::Cow;
use std::path::Path;

use ::safetensors::tensor::{Metadata, SafeTensorError, TensorInfo};
use ::safetensors::{Dtype as StDtype, SafeTensors};
use half::{bf16, f16};

use super::limits::{check_alloc, keep_first, product};
use super::npy::{f16s, f32s, halves, label_count, map_file_as, shape_text};
use super::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};

/// Names a labels tensor may have, in the order they are looked for.
pub const LABEL_NAMES: [&str; 3] = ["labels", "label", "y"];

/// The format's own limit on the JSON header (the crate refuses larger ones).
const MAX_HEADER: u64 = 100_000_000;

/// Loads tensor `tensor` (or the only data tensor) of a safetensors file as a dataset,
/// keeping the first `limit` samples when given. See the module docs.
pub fn load(
    path: &Path,
    tensor: Option<&str>,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    let map = map_file_as(path, "safetensors")?;
    let (header_len, metadata) = read_metadata(&map, path)?;
    let data = &map[8 + header_len..];
    let mut names: Vec<String> = metadata.tensors().into_keys().collect();
    names.sort();
    let info = |name: &str| metadata.info(name).expect("a name from the header");

    let labels_name = LABEL_NAMES
        .iter()
        .copied()
        .filter(|&n| Some(n) != tensor)
        .find(|&n| metadata.info(n).is_some_and(|i| is_integer(i.dtype)));
    let name: String = match tensor {
        Some(t) => {
            if metadata.info(t).is_none() {
                return Err(Error::data(
                    path,
                    format!("no tensor named '{t}'; the file holds {}", listing(&names)),
                ));
            }
            t.to_string()
        }
        None => {
            let candidates: Vec<&String> = names
                .iter()
                .filter(|n| Some(n.as_str()) != labels_name)
                .collect();
            match candidates[..] {
                [only] => only.clone(),
                [] => {
                    return Err(Error::data(
                        path,
                        format!(
                            "no data tensor: the file holds {}",
                            if names.is_empty() {
                                "no tensors".to_string()
                            } else {
                                listing(&names)
                            }
                        ),
                    ))
                }
                _ => {
                    return Err(Error::data(
                        path,
                        format!(
                            "holds several tensors ({}); name one: safetensors:{}:NAME",
                            listing(&names),
                            path.display()
                        ),
                    ))
                }
            }
        }
    };
    let ti = info(&name);
    let Some((&n_total, rest)) = ti.shape.split_first() else {
        return Err(Error::data(
            path,
            format!("tensor '{name}' is a scalar; a dataset needs shape (N, ...)"),
        ));
    };
    if ti.shape.contains(&0) {
        return Err(Error::data(
            path,
            format!("tensor '{name}' is empty, shape {}", shape_text(&ti.shape)),
        ));
    }
    let elem = match ti.dtype {
        StDtype::F32 => 4,
        StDtype::F16 | StDtype::BF16 => 2,
        other => {
            return Err(Error::data(
                path,
                format!(
                    "tensor '{name}' has dtype {other}; dataset values must be F32, F16 or BF16"
                ),
            ))
        }
    };
    let labels = labels_name
        .map(|l| read_labels(path, l, info(l), data, n_total))
        .transpose()?;
    let n = keep_first(path, n_total, limit)?;
    let dim: usize = rest.iter().product();
    let start = ti.data_offsets.0;
    let body = &data[start..start + n * dim * elem];
    // Copied once when not aligned to its element size (a hand-made file); then the
    // dataset's own storage.
    let aligned = (8 + header_len + start).is_multiple_of(elem);
    let copy = if aligned { 0 } else { 4 };
    check_alloc(
        &format!(
            "{}: a dataset of {n} samples x {dim} values",
            path.display()
        ),
        product(&[n, dim, copy + dtype.bytes()]),
    )?;
    let labels = labels.map(|mut l| {
        l.truncate(n);
        l
    });
    let shape = SampleShape::array(if rest.is_empty() {
        vec![1]
    } else {
        rest.to_vec()
    });
    let source = path.display().to_string();
    match ti.dtype {
        StDtype::F32 => {
            let v = f32s(body);
            Dataset::from_raw(source, shape, RawRows::F32(&v), labels, dtype)
        }
        StDtype::F16 => {
            let v: Cow<[f16]> = f16s(body);
            Dataset::from_raw(source, shape, RawRows::F16(&v), labels, dtype)
        }
        _ => {
            let v = bf16s(body);
            Dataset::from_raw(source, shape, RawRows::Bf16(&v), labels, dtype)
        }
    }
}

/// The header, parsed and checked against the file by the crate; its errors are turned
/// into one line saying what is wrong (with the byte counts where the crate has none).
fn read_metadata(bytes: &[u8], path: &Path) -> Result<(usize, Metadata)> {
    let bad = |msg: String| Error::data(path, msg);
    let len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(bad(format!(
            "truncated safetensors header: {len} bytes, the 8-byte header length alone needs 8"
        )));
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > len - 8 {
        return Err(bad(format!(
            "truncated safetensors header: the header length {n} runs past the end of the \
             file ({len} bytes)"
        )));
    }
    if n > MAX_HEADER {
        return Err(bad(format!(
            "safetensors header of {n} bytes, beyond the format's limit of {MAX_HEADER}"
        )));
    }
    let header = &bytes[8..8 + n as usize];
    SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            SafeTensorError::InvalidHeader(e) => format!("safetensors header is not UTF-8 ({e})"),
            SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
                format!("bad safetensors header: {e}")
            }
            SafeTensorError::InvalidOffset(name) => format!(
                "tensor '{name}': its data_offsets do not start where the previous tensor's \
                 data ends"
            ),
            SafeTensorError::TensorInvalidInfo => {
                "a tensor's data_offsets do not span its shape times its dtype size".into()
            }
            SafeTensorError::ValidationOverflow => "a tensor's shape overflows 64-bit sizes".into(),
            SafeTensorError::MisalignedSlice => {
                "a sub-byte tensor does not end on a byte boundary".into()
            }
            SafeTensorError::MetadataIncompleteBuffer => {
                // Parsed fine, so parsing again gives the end the tensors claim.
                let have = len - 8 - n;
                match serde_json::from_slice::<Metadata>(header).map(|m| m.data_len() as u64) {
                    Ok(end) if end > have => format!(
                        "truncated: the tensors' data_offsets end at {end} bytes past the \
                         header, the file holds {have}"
                    ),
                    Ok(end) => format!("{} unexpected bytes after the tensors' data", have - end),
                    Err(_) => "tensor data does not cover the file exactly".into(),
                }
            }
            other => format!("bad safetensors file: {other}"),
        })
    })
}

fn is_integer(d: StDtype) -> bool {
    matches!(
        d,
        StDtype::U8
            | StDtype::I8
            | StDtype::U16
            | StDtype::I16
            | StDtype::U32
            | StDtype::I32
            | StDtype::U64
            | StDtype::I64
    )
}

/// The labels tensor `name`: integers, shape (N,) or (N, 1).
fn read_labels(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    data: &[u8],
    n_samples: usize,
) -> Result<Vec<u32>> {
    let n = label_count(path, &info.shape, &format!("labels tensor '{name}'"))?;
    if n != n_samples {
        return Err(Error::data(
            path,
            format!("labels tensor '{name}' holds {n} labels for {n_samples} samples"),
        ));
    }
    check_alloc(&format!("{}: {n} labels", path.display()), product(&[n, 4]))?;
    let size = info.dtype.bitsize() / 8;
    let body = &data[info.data_offsets.0..info.data_offsets.1];
    body.chunks_exact(size)
        .enumerate()
        .map(|(i, b)| {
            let v: i128 = match info.dtype {
                StDtype::U8 => b[0] as i128,
                StDtype::I8 => b[0] as i8 as i128,
                StDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i128,
                StDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i128,
                StDtype::U32 => u32::from_le_bytes(b.try_into().expect("4 bytes")) as i128,
                StDtype::I32 => i32::from_le_bytes(b.try_into().expect("4 bytes")) as i128,
                StDtype::U64 => u64::from_le_bytes(b.try_into().expect("8 bytes")) as i128,
                _ => i64::from_le_bytes(b.try_into().expect("8 bytes")) as i128,
            };
            u32::try_from(v).map_err(|_| {
                Error::data(
                    path,
                    format!(
                        "label {v} at index {i} of tensor '{name}' is outside 0 ..= {}",
                        u32::MAX
                    ),
                )
            })
        })
        .collect()
}

/// Little-endian bf16 data, borrowed when aligned, else copied once.
fn bf16s(bytes: &[u8]) -> Cow<'_, [bf16]> {
    halves(bytes, bf16::from_le_bytes)
}

/// `'a', 'b', 'c'` (at most 20 names, then how many more).
fn listing(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(20)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 20 {
        text.push_str(&format!(" and {} more", names.len() - 20));
    }
    text
}
