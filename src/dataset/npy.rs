//! NumPy `.npy` files: datasets (memory-mapped) and the CLI's f32 arrays (queries, times,
//! outputs).
//!
//! Dataset files, shape (N, ...), C order, little-endian:
//! - `|u1` (8-bit pixels, mapped to [-1, 1]): (N, H, W), (N, C, H, W) with C in {1, 3}, or
//!   channels-last (N, H, W, C) with C in {1, 3} (transposed to planar, one copy);
//! - `<f4`, `<f2` (values as they are, e.g. latents): sample shape = the remaining dims;
//!   the mapped file is handed to [`Dataset::from_raw`] without a copy;
//! - `<f8` is accepted too, converted to f32 (one copy).
//!
//! Labels files: 1-D (or (N, 1)) of any integer dtype (`|u1`, `|i1`, `<i2`, `<u2`, `<i4`,
//! `<u4`, `<i8`, `<u8`), values in 0 ..= u32::MAX.

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;

use half::f16;
use memmap2::Mmap;

use super::limits::{check_alloc, keep_first, product, read_file};
use super::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types understood here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    F64,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
}

impl NpyDtype {
    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 | NpyDtype::I8 => 1,
            NpyDtype::F16 | NpyDtype::I16 | NpyDtype::U16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::F64 | NpyDtype::I64 | NpyDtype::U64 => 8,
        }
    }

    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::U8 => "|u1",
            NpyDtype::I8 => "|i1",
            NpyDtype::I16 => "<i2",
            NpyDtype::U16 => "<u2",
            NpyDtype::I32 => "<i4",
            NpyDtype::U32 => "<u4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U64 => "<u8",
        }
    }

    fn is_integer(self) -> bool {
        !matches!(self, NpyDtype::F16 | NpyDtype::F32 | NpyDtype::F64)
    }
}

/// A parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    /// Byte offset of the data in the file.
    pub data_offset: usize,
}

impl NpyHeader {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Parses the header at the start of `bytes` and checks that exactly the data it
/// announces follows. Rejects Fortran order, big-endian and unknown dtypes.
pub fn parse_header(bytes: &[u8], source: &Path) -> Result<NpyHeader> {
    let (header, expected) = parse_header_prefix(bytes, source)?;
    let got = bytes.len() - header.data_offset;
    check_data_len(&header, expected as u64, got as u64, source)?;
    Ok(header)
}

/// The data after the header must be exactly the `expected` bytes its shape announces:
/// fewer is a truncated file, more is trailing bytes; `got` is what the file holds.
pub(super) fn check_data_len(
    header: &NpyHeader,
    expected: u64,
    got: u64,
    source: &Path,
) -> Result<()> {
    let shape = shape_text(&header.shape);
    if got < expected {
        return Err(Error::data(
            source,
            format!(
                "truncated: shape {shape} of {} needs {expected} bytes of data, found {got}",
                header.dtype.descr()
            ),
        ));
    }
    if got > expected {
        return Err(Error::data(
            source,
            format!(
                "{} unexpected bytes after the data of shape {shape}",
                got - expected
            ),
        ));
    }
    Ok(())
}

/// Parses the header at the start of `bytes` (which may end where the header ends, as
/// when reading from a stream); returns it and the number of data bytes it announces.
pub fn parse_header_prefix(bytes: &[u8], source: &Path) -> Result<(NpyHeader, usize)> {
    let bad = |msg: String| Error::data(source, msg);
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let major = bytes[6];
    let (len_bytes, header_start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        v => return Err(bad(format!(".npy format version {v} is not supported"))),
    };
    if bytes.len() < header_start {
        return Err(bad("truncated .npy header".into()));
    }
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_offset = header_start + header_len;
    if bytes.len() < data_offset {
        return Err(bad(format!(
            "truncated .npy header: {} bytes, header announces {data_offset}",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(&bytes[header_start..data_offset])
        .map_err(|_| bad("the .npy header is not text".into()))?;
    let dict =
        parse_dict(text).map_err(|m| bad(format!("bad .npy header ({m}): {}", text.trim())))?;

    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (key, value) in dict {
        match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("descr", PyValue::List) => {
                return Err(bad(
                    "structured (record) dtypes are not supported; save a plain array".into(),
                ))
            }
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            (k, _) => return Err(bad(format!("unexpected .npy header entry '{k}'"))),
        }
    }
    let (Some(descr), Some(fortran), Some(shape)) = (descr, fortran, shape) else {
        return Err(bad(
            ".npy header lacks one of 'descr', 'fortran_order', 'shape'".into(),
        ));
    };
    if fortran {
        return Err(bad(
            "Fortran-order (column-major) arrays are not supported; save with \
             np.ascontiguousarray(a)"
                .into(),
        ));
    }
    let dtype = parse_descr(&descr).map_err(bad)?;
    let header = NpyHeader {
        dtype,
        shape,
        data_offset,
    };
    let expected = header
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", header.shape)))?;
    // A header may claim any size: refuse what memory cannot hold before a reader
    // allocates it (a truncated file is the likelier story, but the user needs to know
    // either way, and a sparse file really can be that large).
    check_alloc(
        &format!(
            "{}: .npy data of shape {} {descr}",
            source.display(),
            shape_text(&header.shape)
        ),
        Some(expected as u64),
    )?;
    Ok((header, expected))
}

/// Loads a dataset from a `.npy` file (see the module docs), with optional labels from a
/// second `.npy` file. The data file is memory-mapped; `limit` keeps the first samples.
pub fn load(
    data: &Path,
    labels: Option<&Path>,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    let map = map_file(data)?;
    let header = parse_header(&map, data)?;
    let shape = &header.shape;
    let Some((&n_total, rest)) = shape.split_first() else {
        return Err(Error::data(
            data,
            "a 0-d array; a dataset needs shape (N, ...)",
        ));
    };
    if header.n_elements() == 0 {
        return Err(Error::data(
            data,
            format!("empty array, shape {}", shape_text(shape)),
        ));
    }
    let labels = labels
        .map(|path| read_labels(path, n_total, data))
        .transpose()?;
    let n = keep_first(data, n_total, limit)?;
    let dim: usize = rest.iter().product();
    // Copies made on the way to storage: channels-last pixels are transposed, f64 (and
    // unaligned data) converted to f32; then the dataset's own storage.
    let copy = match (header.dtype, rest.len()) {
        (NpyDtype::U8, 3) => 1,
        (NpyDtype::F64, _) => 4,
        _ => 0,
    };
    check_alloc(
        &format!(
            "{}: a dataset of {n} samples x {dim} values",
            data.display()
        ),
        product(&[n, dim, copy + dtype.bytes()]),
    )?;
    let body = &map[header.data_offset..header.data_offset + n * dim * header.dtype.size()];
    let labels = labels.map(|l| l[..n].to_vec());
    let name = data.display().to_string();

    match header.dtype {
        NpyDtype::U8 => {
            let (sample_shape, pixels): (SampleShape, Cow<[u8]>) = match *rest {
                [h, w] => (SampleShape::image(1, h, w), body.into()),
                [c, h, w] if c == 1 || c == 3 => (SampleShape::image(c, h, w), body.into()),
                [h, w, c] if c == 1 || c == 3 => (
                    SampleShape::image(c, h, w),
                    channels_last_to_planar(body, h, w, c).into(),
                ),
                _ => {
                    return Err(Error::data(
                        data,
                        format!(
                            "|u1 data of shape {} is not images: expected (N, H, W), \
                             (N, C, H, W) or (N, H, W, C) with C in {{1, 3}}",
                            shape_text(shape)
                        ),
                    ))
                }
            };
            Dataset::from_raw(
                name,
                sample_shape,
                RawRows::U8Pixels(&pixels),
                labels,
                dtype,
            )
        }
        NpyDtype::F32 | NpyDtype::F16 | NpyDtype::F64 => {
            let dims = if rest.is_empty() {
                vec![1]
            } else {
                rest.to_vec()
            };
            let sample_shape = SampleShape::array(dims);
            match header.dtype {
                NpyDtype::F32 => {
                    let v = f32s(body);
                    Dataset::from_raw(name, sample_shape, RawRows::F32(&v), labels, dtype)
                }
                NpyDtype::F16 => {
                    let v = f16s(body);
                    Dataset::from_raw(name, sample_shape, RawRows::F16(&v), labels, dtype)
                }
                _ => {
                    let v = to_f32_values(body, header.dtype);
                    Dataset::from_raw(name, sample_shape, RawRows::F32(&v), labels, dtype)
                }
            }
        }
        other => Err(Error::data(
            data,
            format!(
                "dtype {} is not supported for dataset values (use <f4, <f2 or |u1)",
                other.descr()
            ),
        )),
    }
}

/// Reads a labels file: integers, shape (N,) or (N, 1), N = `n_samples` of `data`.
pub fn read_labels(path: &Path, n_samples: usize, data: &Path) -> Result<Vec<u32>> {
    let bytes = read_file(path)?;
    let header = parse_header(&bytes, path)?;
    if !header.dtype.is_integer() {
        return Err(Error::data(
            path,
            format!(
                "labels must be integers, found dtype {}",
                header.dtype.descr()
            ),
        ));
    }
    let n = label_count(path, &header.shape, "labels")?;
    if n != n_samples {
        return Err(Error::data(
            path,
            format!("{n} labels, but {} has {n_samples} samples", data.display()),
        ));
    }
    let body = &bytes[header.data_offset..];
    let size = header.dtype.size();
    body.chunks_exact(size)
        .enumerate()
        .map(|(i, b)| {
            let v: i128 = match header.dtype {
                NpyDtype::U8 => b[0] as i128,
                NpyDtype::I8 => b[0] as i8 as i128,
                NpyDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i128,
                NpyDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i128,
                NpyDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i128,
                NpyDtype::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i128,
                NpyDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as i128,
                NpyDtype::U64 => u64::from_le_bytes(b.try_into().unwrap()) as i128,
                _ => unreachable!("checked integer above"),
            };
            u32::try_from(v).map_err(|_| {
                Error::data(
                    path,
                    format!("label {v} at index {i} is outside 0 ..= {}", u32::MAX),
                )
            })
        })
        .collect()
}

/// Reads an array as f32 values: `<f4`, `<f2`, `<f8` or `|u1` (u8 values as they are,
/// 0 ..= 255, not rescaled). Returns (shape, values in C order). NaN, infinities and f64
/// values beyond f32's range are errors naming the file and the first such index.
pub fn read_npy_f32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let header = parse_header(&bytes, path)?;
    if !matches!(
        header.dtype,
        NpyDtype::F32 | NpyDtype::F16 | NpyDtype::F64 | NpyDtype::U8
    ) {
        return Err(Error::data(
            path,
            format!(
                "dtype {} is not supported here (use <f4, <f2, <f8 or |u1)",
                header.dtype.descr()
            ),
        ));
    }
    check_alloc(
        &format!("{}: {} f32 values", path.display(), header.n_elements()),
        product(&[header.n_elements(), 4]),
    )?;
    let values = to_f32_values(&bytes[header.data_offset..], header.dtype);
    // Queries and times feed every posterior: a NaN would silently poison the results.
    if let Some(k) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(
            path,
            format!(
                "value {k} (flat index) is {}, expected finite numbers",
                values[k]
            ),
        ));
    }
    Ok((header.shape, values))
}

/// Writes `data` (C order, product(shape) values) as a `<f4` `.npy` file, atomically
/// (see [`crate::output::write_atomic`]): an error leaves no half-written file at `path`.
pub fn write_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::data(
            path,
            format!(
                "cannot write {} values as shape {}",
                data.len(),
                shape_text(shape)
            ),
        ));
    }
    write_npy_with(path, "<f4", shape, |w| {
        if cfg!(target_endian = "little") {
            w.write_all(bytemuck::cast_slice(data))
        } else {
            data.iter().try_for_each(|v| w.write_all(&v.to_le_bytes()))
        }
    })
}

/// Writes a `.npy` file of dtype `descr` (e.g. `<f4`, `<f2`, `<i8`) and `shape` whose
/// little-endian C-order body `fill` streams, atomically: the caller never holds the whole
/// array, and an error leaves no half-written file at `path`.
pub fn write_npy_with(
    path: &Path,
    descr: &str,
    shape: &[usize],
    fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    let header = header_bytes(descr, shape);
    crate::output::write_atomic(path, |w| {
        w.write_all(&header)?;
        fill(w)
    })
}

/// The preamble and header of a .npy of `descr` (e.g. `<f4`) and `shape`, C order.
pub fn header_bytes(descr: &str, shape: &[usize]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_text(shape)
    );
    // Version 1.0: 10-byte preamble; pad the header with spaces and a final newline so
    // the data starts at a multiple of 64 bytes.
    let (version, preamble) = if header.len() + 1 + 10 + 64 <= u16::MAX as usize {
        (1u8, 10)
    } else {
        (2u8, 12)
    };
    let total = (preamble + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - preamble - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out
}

/// An in-memory `<f4` .npy (for pipes).
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = header_bytes("<f4", shape);
    data.iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// An in-memory `<i8` .npy (for pipes).
pub fn encode_i64(shape: &[usize], data: &[i64]) -> Vec<u8> {
    let mut out = header_bytes("<i8", shape);
    data.iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    map_file_as(path, ".npy")
}

/// Maps a dataset file read-only; an empty file is an error ("not a `format` file").
pub(crate) fn map_file_as(path: &Path, format: &str) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::data(
            path,
            format!("empty file, not a {format} file"),
        ));
    }
    // SAFETY: the mapping is read-only and lives only while the dataset is built; as with
    // any file mapping, another process truncating the file meanwhile would be undefined
    // behaviour, which we accept for a read of a dataset file.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Little-endian f32 data, borrowed when aligned (always so for numpy's 64-byte headers on
/// a page-aligned mapping), else copied once.
pub(crate) fn f32s(bytes: &[u8]) -> Cow<'_, [f32]> {
    if cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice(bytes) {
            return Cow::Borrowed(v);
        }
    }
    Cow::Owned(to_f32_values(bytes, NpyDtype::F32))
}

/// Little-endian f16 data, borrowed when aligned, else copied once.
pub(crate) fn f16s(bytes: &[u8]) -> Cow<'_, [f16]> {
    halves(bytes, f16::from_le_bytes)
}

/// Little-endian 2-byte values (f16, bf16), borrowed when aligned, else decoded once.
pub(crate) fn halves<T: bytemuck::Pod>(bytes: &[u8], from_le: fn([u8; 2]) -> T) -> Cow<'_, [T]> {
    if cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice(bytes) {
            return Cow::Borrowed(v);
        }
    }
    Cow::Owned(
        bytes
            .chunks_exact(2)
            .map(|b| from_le([b[0], b[1]]))
            .collect(),
    )
}

/// Converts float or u8 data to f32 values (u8 as 0 ..= 255).
pub(super) fn to_f32_values(bytes: &[u8], dtype: NpyDtype) -> Vec<f32> {
    match dtype {
        NpyDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        NpyDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        NpyDtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        NpyDtype::U8 => bytes.iter().map(|&b| b as f32).collect(),
        other => unreachable!("to_f32_values({other:?})"),
    }
}

/// (N, H, W, C) -> (N, C, H, W).
fn channels_last_to_planar(bytes: &[u8], h: usize, w: usize, c: usize) -> Vec<u8> {
    let plane = h * w;
    let mut out = vec![0u8; bytes.len()];
    for (src, dst) in bytes
        .chunks_exact(plane * c)
        .zip(out.chunks_exact_mut(plane * c))
    {
        for (p, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                dst[ch * plane + p] = v;
            }
        }
    }
    out
}

/// Python tuple syntax: `()`, `(3,)`, `(3, 4)`.
/// The number of labels in a labels array of `shape`: (N,) or (N, 1); else an error
/// naming `what` (the labels file, or a tensor of a safetensors file).
pub(super) fn label_count(path: &Path, shape: &[usize], what: &str) -> Result<usize> {
    match shape {
        [n] | [n, 1] => Ok(*n),
        _ => Err(Error::data(
            path,
            format!("{what} must be 1-D, found shape {}", shape_text(shape)),
        )),
    }
}

pub(super) fn shape_text(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn parse_descr(descr: &str) -> std::result::Result<NpyDtype, String> {
    let mut chars = descr.chars();
    let order = chars.next().unwrap_or(' ');
    let code = chars.as_str();
    let dtype = match code {
        "f2" => NpyDtype::F16,
        "f4" => NpyDtype::F32,
        "f8" => NpyDtype::F64,
        "u1" | "B" => NpyDtype::U8,
        "i1" | "b" => NpyDtype::I8,
        "i2" => NpyDtype::I16,
        "u2" => NpyDtype::U16,
        "i4" => NpyDtype::I32,
        "u4" => NpyDtype::U32,
        "i8" => NpyDtype::I64,
        "u8" => NpyDtype::U64,
        _ => {
            return Err(format!(
                "dtype '{descr}' is not supported (use <f4, <f2 or |u1; integer labels)"
            ))
        }
    };
    match order {
        '<' => Ok(dtype),
        '|' | '=' | '>' if dtype.size() == 1 => Ok(dtype),
        '>' => Err(format!(
            "big-endian dtype '{descr}' is not supported; save with a.astype('<{code}')"
        )),
        _ => Err(format!(
            "dtype '{descr}' has no little-endian byte order; save with a.astype('<{code}')"
        )),
    }
}

/// The values a `.npy` header dict holds.
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
    /// A list (a structured dtype's descr); its content is not needed.
    List,
}

/// Parses the Python dict literal of a `.npy` header.
fn parse_dict(text: &str) -> std::result::Result<Vec<(String, PyValue)>, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = p.value()?;
        out.push((key, value));
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at offset {}", c as char, self.i))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at offset {}", self.i)),
        };
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .position(|&c| c == quote)
            .ok_or("unterminated string")?;
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn value(&mut self) -> std::result::Result<PyValue, String> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(PyValue::Bool(true))
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(PyValue::Bool(false))
        } else if rest.starts_with(b"(") {
            self.i += 1;
            let mut dims = Vec::new();
            loop {
                self.ws();
                if self.eat(b')') {
                    break;
                }
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                let d = digits
                    .parse::<usize>()
                    .map_err(|_| format!("expected a dimension at offset {start}"))?;
                self.eat(b'L'); // Python 2 long literals
                dims.push(d);
                self.ws();
                if !self.eat(b',') {
                    self.ws();
                    self.expect(b')')?;
                    break;
                }
            }
            Ok(PyValue::Tuple(dims))
        } else if rest.starts_with(b"[") {
            let mut depth = 0usize;
            while let Some(&c) = self.s.get(self.i) {
                self.i += 1;
                match c {
                    b'[' => depth += 1,
                    b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(PyValue::List);
                        }
                    }
                    _ => {}
                }
            }
            Err("unterminated list".into())
        } else {
            self.string().map(PyValue::Str)
        }
    }
}
