//! Datasets: every loader ends in one [`Dataset`] (N samples of one shape, optional
//! labels, values stored as f32 or f16).
//!
//! Two decisions made here serve every backend:
//! - **Centred storage.** The stored values are `y - mean` (mean over the whole dataset,
//!   computed in f64). The logit expansion `x.y - |y|^2/2` loses digits to cancellation
//!   when |y| is large; centring makes |y| small. Sample i in user coordinates is
//!   `stored_i + mean`. All backends (and the f64 reference) read the same stored values,
//!   so f16 storage means "the exact oracle of the f16-rounded dataset".
//! - **Class-sorted rows.** Rows are stably sorted by label so that each class is one
//!   contiguous row range: a class-conditional oracle is the same tiled pass over a
//!   sub-range. `original_index` maps a stored row back to its index in the source.

pub mod cifar;
pub mod disk;
pub mod folder;
pub mod idx;
pub mod limits;
pub mod npy;
pub mod safetensors;
pub mod shards;
pub mod spec;
pub mod synthetic;

pub use npy::{read_npy_f32, write_npy_f32};
pub use spec::{load, DataSpec, Source, SPEC_HELP};

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

/// Why sample `row` cannot be stored as `dtype`: a value (after centring) beyond f16's
/// range, or beyond what f32 logits can square (|y|^2 must stay finite), and what to do.
pub(crate) fn too_large(row: usize, dtype: Dtype) -> String {
    match dtype {
        Dtype::F16 => format!(
            "sample {row} does not fit F16 storage (a value beyond 65504 after centring; try \
             --dtype f32)"
        ),
        Dtype::F32 => format!(
            "sample {row} does not fit F32 storage (its squared norm overflows f32; scale the \
             data down)"
        ),
    }
}

/// How the dataset values are held in memory (and on the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

/// Stored (centred) values, row-major N x D.
#[derive(Clone, Debug)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// In the dataset's `.npy` file, read tile by tile (larger than `--memory-budget`).
    Disk(std::sync::Arc<disk::DiskRows>),
}

/// Source rows handed to [`Dataset::from_raw`], borrowed from a decoded file or a mapping.
#[derive(Clone, Copy, Debug)]
pub enum RawRows<'a> {
    /// 8-bit pixels, mapped to [-1, 1] as p / 127.5 - 1.
    U8Pixels(&'a [u8]),
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// bfloat16 values (widened to f32 exactly: bf16 is f32's upper half).
    Bf16(&'a [half::bf16]),
    /// 8-bit pixels in fixed-size records (CIFAR: label bytes, then the pixels): sample i
    /// is the `dim` bytes at `i * record + skip`, read in place from the mapped file.
    U8Records {
        bytes: &'a [u8],
        record: usize,
        skip: usize,
        dim: usize,
    },
    /// Several sources one after another (shards, batch files), read in place.
    Parts(&'a RawParts<'a>),
}

impl RawRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            RawRows::U8Pixels(v) => v.len(),
            RawRows::F32(v) => v.len(),
            RawRows::F16(v) => v.len(),
            RawRows::Bf16(v) => v.len(),
            RawRows::U8Records {
                bytes, record, dim, ..
            } => bytes.len() / record * dim,
            RawRows::Parts(p) => p.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, k: usize) -> f64 {
        match self {
            RawRows::U8Pixels(v) => v[k] as f64 / 127.5 - 1.0,
            RawRows::F32(v) => v[k] as f64,
            RawRows::F16(v) => v[k].to_f64(),
            RawRows::Bf16(v) => v[k].to_f64(),
            &RawRows::U8Records {
                bytes,
                record,
                skip,
                dim,
            } => bytes[k / dim * record + skip + k % dim] as f64 / 127.5 - 1.0,
            RawRows::Parts(p) => p.get(k),
        }
    }
}

/// Sources read as one (see [`RawRows::Parts`]), without copying them together.
#[derive(Debug)]
pub struct RawParts<'a> {
    parts: Vec<RawRows<'a>>,
    /// Flat index of each part's first value.
    starts: Vec<usize>,
    len: usize,
    /// The length of every part when all but the last have one length (the last no
    /// longer): the part of value k is then k / length, no search per value.
    uniform: Option<usize>,
}

impl<'a> RawParts<'a> {
    /// Empty parts are dropped; the callers give each part a whole number of samples.
    pub fn new(parts: Vec<RawRows<'a>>) -> Self {
        let parts: Vec<RawRows<'a>> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for p in &parts {
            starts.push(len);
            len += p.len();
        }
        let first = parts.first().map_or(0, |p| p.len());
        let uniform = (first > 0
            && parts.iter().rev().skip(1).all(|p| p.len() == first)
            && parts.last().is_some_and(|p| p.len() <= first))
        .then_some(first);
        RawParts {
            parts,
            starts,
            len,
            uniform,
        }
    }

    pub(crate) fn get(&self, k: usize) -> f64 {
        let p = match self.uniform {
            Some(l) => k / l,
            None => self.starts.partition_point(|&s| s <= k) - 1,
        };
        self.parts[p].get(k - self.starts[p])
    }
}

/// What a sample is: an image (C x H x W, values in [-1, 1]) or a plain array (latents).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SampleShape {
    /// Per-sample dimensions, e.g. `[1, 28, 28]`, `[4, 32, 32]` or `[D]`.
    pub dims: Vec<usize>,
    /// True when the samples are pixels (render them as images).
    pub is_image: bool,
}

impl SampleShape {
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        SampleShape {
            dims: vec![channels, height, width],
            is_image: true,
        }
    }

    pub fn array(dims: Vec<usize>) -> Self {
        SampleShape {
            dims,
            is_image: false,
        }
    }

    pub fn dim(&self) -> usize {
        self.dims.iter().product()
    }

    /// (channels, height, width) when the sample can be viewed as a picture.
    pub fn chw(&self) -> Option<(usize, usize, usize)> {
        match self.dims[..] {
            [c, h, w] => Some((c, h, w)),
            [h, w] => Some((1, h, w)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Dataset {
    /// A short human-readable description (the spec it was loaded from).
    pub name: String,
    pub shape: SampleShape,
    n_samples: usize,
    dim: usize,
    values: Values,
    mean: Vec<f32>,
    sq_norms: Vec<f32>,
    labels: Option<Vec<u32>>,
    original_index: Vec<u32>,
    /// (label, rows) for every label present, ascending.
    class_rows: Vec<(u32, Range<usize>)>,
}

impl Dataset {
    /// Builds a dataset from source rows (N x D, row-major): sorts rows by label, centres
    /// them and stores them as `dtype`. `labels`, when given, has one entry per row.
    pub fn from_raw(
        name: impl Into<String>,
        shape: SampleShape,
        raw: RawRows<'_>,
        labels: Option<Vec<u32>>,
        dtype: Dtype,
    ) -> Result<Dataset> {
        Self::from_raw_part(name, shape, raw, labels, dtype, None)
    }

    /// As [`Dataset::from_raw`] for one part of a larger dataset (an MPI rank's rows):
    /// `part = Some((mean, first))` centres with the whole dataset's `mean` (so that every
    /// part's logits share one dropped constant) and numbers the rows from source index
    /// `first`.
    pub fn from_raw_part(
        name: impl Into<String>,
        shape: SampleShape,
        raw: RawRows<'_>,
        labels: Option<Vec<u32>>,
        dtype: Dtype,
        part: Option<(&[f32], u32)>,
    ) -> Result<Dataset> {
        let name = name.into();
        let dim = shape.dim();
        if dim == 0 || raw.is_empty() || !raw.len().is_multiple_of(dim) {
            return Err(Error::data(
                &name,
                format!(
                    "{} values do not form samples of {dim} values each",
                    raw.len()
                ),
            ));
        }
        let n_samples = raw.len() / dim;
        if n_samples > u32::MAX as usize {
            return Err(Error::data(&name, "more than 2^32 samples"));
        }
        // Stored values, row norms, row order and labels, and the f64 and f32 means;
        // refused before allocating.
        let per_row = dim.saturating_mul(dtype.bytes()).saturating_add(12);
        limits::check_alloc(
            &format!("{name}: a dataset of {n_samples} samples x {dim} values"),
            limits::product(&[n_samples, per_row])
                .and_then(|rows| rows.checked_add(limits::product(&[dim, 12])?)),
        )?;
        if let Some(l) = &labels {
            if l.len() != n_samples {
                return Err(Error::data(
                    &name,
                    format!("{} labels for {n_samples} samples", l.len()),
                ));
            }
        }

        // Stable sort by label: each class becomes one contiguous range of rows.
        let mut order: Vec<u32> = (0..n_samples as u32).collect();
        if let Some(l) = &labels {
            order.sort_by_key(|&i| l[i as usize]);
        }

        let mut mean64 = vec![0.0f64; dim];
        for i in 0..n_samples {
            for (k, m) in mean64.iter_mut().enumerate() {
                *m += raw.get(i * dim + k);
            }
        }
        // NaN/Inf would poison every posterior (through the mean, every row): name the sample.
        if mean64.iter().any(|m| !m.is_finite()) {
            let bad = (0..raw.len())
                .find(|&k| !raw.get(k).is_finite())
                .unwrap_or(0);
            return Err(Error::data(
                &name,
                format!("sample {} holds a non-finite value", bad / dim),
            ));
        }
        let mean: Vec<f32> = match part {
            Some((mean, _)) => mean.to_vec(),
            None => mean64
                .iter()
                .map(|m| (m / n_samples as f64) as f32)
                .collect(),
        };

        let mut sq_norms = Vec::with_capacity(n_samples);
        let centred_row = |src: usize, k: usize| raw.get(src * dim + k) - mean[k] as f64;
        let values = match dtype {
            Dtype::F32 => {
                let mut v = Vec::with_capacity(n_samples * dim);
                for &src in &order {
                    let start = v.len();
                    v.extend((0..dim).map(|k| centred_row(src as usize, k) as f32));
                    sq_norms.push(sq_norm(v[start..].iter().map(|&x| x as f64)));
                }
                Values::F32(v)
            }
            Dtype::F16 => {
                let mut v = Vec::with_capacity(n_samples * dim);
                for &src in &order {
                    let start = v.len();
                    v.extend((0..dim).map(|k| f16::from_f64(centred_row(src as usize, k))));
                    sq_norms.push(sq_norm(v[start..].iter().map(|x| x.to_f64())));
                }
                Values::F16(v)
            }
        };

        // Values beyond the storage range (65504 for f16) become infinite when stored.
        if let Some(row) = sq_norms.iter().position(|v| !v.is_finite()) {
            return Err(Error::data(&name, too_large(order[row] as usize, dtype)));
        }

        let labels = labels.map(|l| order.iter().map(|&i| l[i as usize]).collect::<Vec<_>>());
        let class_rows = match &labels {
            Some(l) => {
                let mut rows: Vec<(u32, Range<usize>)> = Vec::new();
                for (i, &c) in l.iter().enumerate() {
                    match rows.last_mut() {
                        Some((last, r)) if *last == c => r.end = i + 1,
                        _ => rows.push((c, i..i + 1)),
                    }
                }
                rows
            }
            None => Vec::new(),
        };

        Ok(Dataset {
            name,
            shape,
            n_samples,
            dim,
            values,
            mean,
            sq_norms,
            labels,
            original_index: match part {
                Some((_, first)) => order.iter().map(|&i| i + first).collect(),
                None => order,
            },
            class_rows,
        })
    }

    /// The samples whose source index lies in `range` (an MPI rank's share of a dataset
    /// loaded whole), with their stored values, labels and source indices unchanged.
    pub fn keep_source_range(&self, range: Range<u32>) -> Dataset {
        let keep: Vec<usize> = (0..self.n_samples)
            .filter(|&r| range.contains(&self.original_index[r]))
            .collect();
        let dim = self.dim;
        let values = match &self.values {
            Values::F32(v) => Values::F32(
                keep.iter()
                    .flat_map(|&r| &v[r * dim..(r + 1) * dim])
                    .copied()
                    .collect(),
            ),
            Values::F16(v) => Values::F16(
                keep.iter()
                    .flat_map(|&r| &v[r * dim..(r + 1) * dim])
                    .copied()
                    .collect(),
            ),
            // A streamed dataset's kept rows are read into memory (a rank's share is meant
            // to fit; the values keep their storage rounding).
            Values::Disk(d) => {
                let mut row = vec![0.0f32; dim];
                let mut out = Vec::with_capacity(keep.len() * dim);
                for &r in &keep {
                    self.stored_row(r, &mut row);
                    out.extend_from_slice(&row);
                }
                match d.storage() {
                    Dtype::F32 => Values::F32(out),
                    Dtype::F16 => Values::F16(out.iter().map(|&v| f16::from_f32(v)).collect()),
                }
            }
        };
        let labels = self
            .labels
            .as_ref()
            .map(|l| keep.iter().map(|&r| l[r]).collect::<Vec<_>>());
        let mut class_rows: Vec<(u32, Range<usize>)> = Vec::new();
        for (i, &c) in labels.iter().flatten().enumerate() {
            match class_rows.last_mut() {
                Some((last, r)) if *last == c => r.end = i + 1,
                _ => class_rows.push((c, i..i + 1)),
            }
        }
        Dataset {
            name: self.name.clone(),
            shape: self.shape.clone(),
            n_samples: keep.len(),
            dim,
            values,
            mean: self.mean.clone(),
            sq_norms: keep.iter().map(|&r| self.sq_norms[r]).collect(),
            labels,
            original_index: keep.iter().map(|&r| self.original_index[r]).collect(),
            class_rows,
        }
    }

    pub fn n_samples(&self) -> usize {
        self.n_samples
    }

    /// Values per sample (D).
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn dtype(&self) -> Dtype {
        match &self.values {
            Values::F32(_) => Dtype::F32,
            Values::F16(_) => Dtype::F16,
            Values::Disk(d) => d.storage(),
        }
    }

    /// The file a streamed dataset is read from (None: the values are in memory).
    pub fn disk(&self) -> Option<&std::sync::Arc<disk::DiskRows>> {
        match &self.values {
            Values::Disk(d) => Some(d),
            _ => None,
        }
    }

    /// A tile of f32 rows as a dataset of its own (values and norms only): the streamed
    /// passes hand each tile to the in-memory kernels. Take the values back with
    /// [`Dataset::into_tile_values`].
    pub(crate) fn tile(dim: usize, values: Vec<f32>, sq_norms: Vec<f32>) -> Dataset {
        Dataset {
            name: String::new(),
            shape: SampleShape::array(vec![dim]),
            n_samples: sq_norms.len(),
            dim,
            values: Values::F32(values),
            mean: Vec::new(),
            sq_norms,
            labels: None,
            original_index: Vec::new(),
            class_rows: Vec::new(),
        }
    }

    /// The values and norms of a [`Dataset::tile`], for reuse.
    pub(crate) fn into_tile_values(self) -> (Vec<f32>, Vec<f32>) {
        match self.values {
            Values::F32(v) => (v, self.sq_norms),
            _ => (Vec::new(), self.sq_norms),
        }
    }

    /// Stored (centred) values, N x D in class-sorted row order.
    pub fn values(&self) -> &Values {
        &self.values
    }

    /// The dataset mean that was subtracted before storage (D values).
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// |stored row|^2 per row, computed in f64 from the stored values.
    pub fn sq_norms(&self) -> &[f32] {
        &self.sq_norms
    }

    /// Labels in stored row order.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// (label, number of samples) for every class present.
    pub fn class_counts(&self) -> Vec<(u32, usize)> {
        self.class_rows.iter().map(|(c, r)| (*c, r.len())).collect()
    }

    /// Source index of stored row `row`.
    pub fn original_index(&self, row: usize) -> u32 {
        self.original_index[row]
    }

    /// Stored row of source index `index` (inverse of [`Dataset::original_index`]).
    pub fn row_of_original(&self, index: u32) -> Option<usize> {
        self.original_index.iter().position(|&i| i == index)
    }

    /// The rows the oracle averages over: all of them, or the samples of one class.
    pub fn rows_for(&self, class: Option<u32>) -> Result<Range<usize>> {
        let Some(class) = class else {
            return Ok(0..self.n_samples);
        };
        if self.labels.is_none() {
            return Err(Error::Input(format!(
                "--class {class}: dataset '{}' has no labels",
                self.name
            )));
        }
        self.class_rows
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| {
                Error::Input(format!(
                    "--class {class}: dataset '{}' has no sample of that class",
                    self.name
                ))
            })
    }

    /// Stored (centred) row as f32.
    pub fn stored_row(&self, row: usize, out: &mut [f32]) {
        let r = row * self.dim..(row + 1) * self.dim;
        match &self.values {
            Values::F32(v) => out.copy_from_slice(&v[r]),
            // (half's slice conversion uses the CPU's F16C where it has it)
            Values::F16(v) => v[r].convert_to_f32_slice(out),
            Values::Disk(d) => {
                let mut row_values = Vec::with_capacity(self.dim);
                // One row's read failing (the file truncated under us) has no way out
                // of this infallible accessor; the streamed passes report I/O errors.
                if let Err(e) = d.read_f32(row..row + 1, &mut row_values) {
                    panic!("{e}");
                }
                out.copy_from_slice(&row_values);
            }
        }
    }

    /// Sample `row` in user coordinates (stored + mean), f64.
    pub fn sample_f64(&self, row: usize) -> Vec<f64> {
        let mut out = vec![0.0f32; self.dim];
        self.stored_row(row, &mut out);
        out.iter()
            .zip(&self.mean)
            .map(|(&v, &m)| v as f64 + m as f64)
            .collect()
    }

    /// Sample `row` in user coordinates (stored + mean), f32.
    pub fn sample(&self, row: usize) -> Vec<f32> {
        self.sample_f64(row).into_iter().map(|v| v as f32).collect()
    }
}

fn sq_norm(values: impl Iterator<Item = f64>) -> f32 {
    values.map(|x| x * x).sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_class_sorted_and_centred() {
        let raw = [0.0f32, 10.0, 1.0, 11.0, 2.0, 12.0];
        let ds = Dataset::from_raw(
            "t",
            SampleShape::array(vec![2]),
            RawRows::F32(&raw),
            Some(vec![1, 0, 1]),
            Dtype::F32,
        )
        .unwrap();
        assert_eq!(ds.rows_for(Some(0)).unwrap(), 0..1);
        assert_eq!(ds.rows_for(Some(1)).unwrap(), 1..3);
        assert_eq!(ds.original_index(0), 1);
        assert_eq!(ds.sample(0), vec![1.0, 11.0]);
        assert_eq!(ds.mean(), &[1.0, 11.0]);
        assert!(ds.rows_for(Some(7)).is_err());
    }

    #[test]
    fn non_finite_or_f16_overflowing_values_are_refused() {
        let shape = || SampleShape::array(vec![2]);
        let nan = [0.0f32, 1.0, f32::NAN, 2.0];
        let err = Dataset::from_raw("d.npy", shape(), RawRows::F32(&nan), None, Dtype::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("d.npy") && err.contains("sample 1"), "{err}");
        // 100 zeros and one 1e5: only the last sample leaves f16's range once centred.
        let mut big = vec![0.0f32; 202];
        big[200] = 1e5;
        assert!(Dataset::from_raw("b", shape(), RawRows::F32(&big), None, Dtype::F32).is_ok());
        let err = Dataset::from_raw("b", shape(), RawRows::F32(&big), None, Dtype::F16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample 100") && err.contains("F16"), "{err}");
    }
}
