//! A directory of `.npy` shards (`shards:DIR`), read as one dataset: the rows of every
//! shard, in file-name order, one after another. Each shard is memory-mapped and read in
//! place (f64 shards are converted to f32, one copy per shard).
//!
//! - Data shards: every `*.npy` in DIR whose name does not contain `labels`. All must
//!   hold samples of one shape: float shards (`<f4`, `<f2`, `<f8`, which may be mixed)
//!   of shape (N_i, ...), or 8-bit pixel shards (`|u1`, (N_i, H, W) or (N_i, C, H, W)
//!   with C in {1, 3}; channels-last would need a copy, so it is refused). A shard may
//!   hold no rows.
//! - Labels (optional), either one `labels.npy` holding a label for every row of every
//!   shard, or per shard: `STEM_labels.npy` beside `STEM.npy` (e.g. `shard_000.npy` and
//!   `shard_000_labels.npy`), for every shard. Labels for some shards and not others, a
//!   labels file matching no shard, or both kinds at once are errors. Labels files hold
//!   integers, shape (N_i,) or (N_i, 1) (see [`super::npy::read_labels`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use super::limits::{check_alloc, keep_first, product};
use super::npy::{
    f16s, f32s, map_file, parse_header, read_labels, shape_text, to_f32_values, NpyDtype, NpyHeader,
};
use super::{Dataset, Dtype, RawParts, RawRows, SampleShape};
use crate::error::{Error, Result};

/// The one labels file for all shards.
pub const ALL_LABELS: &str = "labels.npy";

/// What a shards directory holds.
#[derive(Clone, Debug)]
pub struct ShardFiles {
    /// The data shards in name order, each with its labels file when labels are per shard.
    pub shards: Vec<(PathBuf, Option<PathBuf>)>,
    /// The one labels file for all rows, when there is one.
    pub all_labels: Option<PathBuf>,
}

/// The shards of `dir` and their labels (see the module docs).
pub fn files(dir: &Path) -> Result<ShardFiles> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::data(dir, "not a directory of .npy shards"));
    }
    let mut any_entry = false;
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        any_entry = true;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.ends_with(".npy") && entry.path().is_file() {
            names.push(name.to_string());
        }
    }
    names.sort();
    let (label_names, data_names): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| n.contains("labels"));
    if data_names.is_empty() {
        return Err(Error::data(
            dir,
            if !any_entry {
                "empty directory, no .npy shards".to_string()
            } else if label_names.is_empty() {
                "no .npy shards in the directory".to_string()
            } else {
                format!(
                    "only labels files ({}), no data shards",
                    label_names.join(", ")
                )
            },
        ));
    }

    let global = label_names.iter().any(|n| n == ALL_LABELS);
    if global && label_names.len() > 1 {
        return Err(Error::data(
            dir,
            format!(
                "both {ALL_LABELS} and per-shard labels files ({}); keep one kind",
                label_names
                    .iter()
                    .filter(|n| *n != ALL_LABELS)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let labels_of = |data: &str| format!("{}_labels.npy", data.trim_end_matches(".npy"));
    if !global {
        if let Some(orphan) = label_names
            .iter()
            .find(|l| !data_names.iter().any(|d| labels_of(d) == **l))
        {
            return Err(Error::data(
                dir.join(orphan),
                format!(
                    "labels file matching no shard (per-shard labels of STEM.npy are \
                     STEM_labels.npy; labels for all shards are {ALL_LABELS})"
                ),
            ));
        }
        if !label_names.is_empty() {
            if let Some(bare) = data_names
                .iter()
                .find(|d| !label_names.contains(&labels_of(d)))
            {
                return Err(Error::data(
                    dir.join(bare),
                    format!(
                        "no labels file {} for this shard, while other shards have one",
                        labels_of(bare)
                    ),
                ));
            }
        }
    }
    let per_shard = !global && !label_names.is_empty();
    let shards = data_names
        .iter()
        .map(|d| (dir.join(d), per_shard.then(|| dir.join(labels_of(d)))))
        .collect();
    Ok(ShardFiles {
        shards,
        all_labels: global.then(|| dir.join(ALL_LABELS)),
    })
}

/// One mapped shard and what its header says.
struct Shard {
    path: PathBuf,
    labels: Option<PathBuf>,
    map: Mmap,
    header: NpyHeader,
    rows: usize,
}

/// A shard's rows as the dataset reads them.
enum Values<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    U8(&'a [u8]),
}

/// Loads every shard of `dir` as one dataset (see the module docs), keeping the first
/// `limit` samples when given.
pub fn load(dir: &Path, limit: Option<usize>, dtype: Dtype) -> Result<Dataset> {
    let ShardFiles {
        shards: files,
        all_labels: global_labels,
    } = files(dir)?;

    // Every shard's header, checked against the first shard's sample shape.
    let mut shards: Vec<Shard> = Vec::with_capacity(files.len());
    let mut first: Option<(SampleShape, bool)> = None;
    for (path, labels) in files {
        let map = map_file(&path)?;
        let header = parse_header(&map, &path)?;
        let Some((&rows, rest)) = header.shape.split_first() else {
            return Err(Error::data(
                &path,
                "a 0-d array; a shard needs shape (N, ...)",
            ));
        };
        if rest.contains(&0) {
            return Err(Error::data(
                &path,
                format!("samples of no values, shape {}", shape_text(&header.shape)),
            ));
        }
        // A shard of no rows passes the header's size check whatever its sample shape.
        if product(rest).is_none_or(|p| p > isize::MAX as u64) {
            return Err(Error::data(
                &path,
                format!("sample shape of {} overflows", shape_text(&header.shape)),
            ));
        }
        let pixels = match header.dtype {
            NpyDtype::F32 | NpyDtype::F16 | NpyDtype::F64 => false,
            NpyDtype::U8 => true,
            other => {
                return Err(Error::data(
                    &path,
                    format!(
                        "dtype {} is not supported for shards (use <f4, <f2, <f8 or |u1)",
                        other.descr()
                    ),
                ))
            }
        };
        let shape = if pixels {
            match *rest {
                [h, w] => SampleShape::image(1, h, w),
                [c, h, w] if c == 1 || c == 3 => SampleShape::image(c, h, w),
                _ => {
                    return Err(Error::data(
                        &path,
                        format!(
                            "|u1 shard of shape {} is not planar images: expected (N, H, W) \
                             or (N, C, H, W) with C in {{1, 3}}",
                            shape_text(&header.shape)
                        ),
                    ))
                }
            }
        } else {
            SampleShape::array(if rest.is_empty() {
                vec![1]
            } else {
                rest.to_vec()
            })
        };
        match &first {
            None => first = Some((shape, pixels)),
            Some((s, p)) if *s != shape || *p != pixels => {
                let kind = |p: bool| if p { "8-bit pixels" } else { "float values" };
                return Err(Error::data(
                    &path,
                    format!(
                        "samples of shape {} ({}), but the first shard {} holds samples of \
                         shape {} ({}); every shard must hold samples of one shape",
                        shape_text(&shape.dims),
                        kind(pixels),
                        shards[0].path.display(),
                        shape_text(&s.dims),
                        kind(*p)
                    ),
                ));
            }
            Some(_) => {}
        }
        shards.push(Shard {
            path,
            labels,
            map,
            header,
            rows,
        });
    }
    let (shape, _) = first.expect("at least one shard");
    let dim = shape.dim();
    let n_total = shards
        .iter()
        .try_fold(0usize, |acc, s| acc.checked_add(s.rows))
        .ok_or_else(|| Error::data(dir, "the shards' row counts overflow"))?;
    if n_total == 0 {
        return Err(Error::data(dir, "the shards hold no samples"));
    }

    // Labels, read before any value is converted: per shard, or one file for all rows.
    let labels: Option<Vec<u32>> = match &global_labels {
        Some(path) => Some(read_labels(path, n_total, dir)?),
        None if shards[0].labels.is_some() => {
            check_alloc(
                &format!("{}: {n_total} labels", dir.display()),
                product(&[n_total, 4]),
            )?;
            let mut all = Vec::with_capacity(n_total);
            for s in &shards {
                let l = s.labels.as_ref().expect("every shard has labels");
                all.extend(read_labels(l, s.rows, &s.path)?);
            }
            Some(all)
        }
        None => None,
    };
    let n = keep_first(dir, n_total, limit)?;
    let labels = labels.map(|mut l| {
        l.truncate(n);
        l
    });

    // The rows used, shard by shard; f64 shards (and unaligned float data) are converted.
    let copies: usize = {
        let mut left = n;
        shards
            .iter()
            .map(|s| {
                let take = left.min(s.rows);
                left -= take;
                match s.header.dtype {
                    NpyDtype::F64 => take,
                    _ => 0,
                }
            })
            .sum()
    };
    check_alloc(
        &format!("{}: a dataset of {n} samples x {dim} values", dir.display()),
        product(&[copies, dim, 4])
            .zip(product(&[n, dim, dtype.bytes()]))
            .and_then(|(a, b)| a.checked_add(b)),
    )?;
    let mut values: Vec<Values> = Vec::with_capacity(shards.len());
    let mut left = n;
    for s in &shards {
        let take = left.min(s.rows);
        left -= take;
        let size = s.header.dtype.size();
        let start = s.header.data_offset;
        let body = &s.map[start..start + take * dim * size];
        values.push(match s.header.dtype {
            NpyDtype::F32 => Values::F32(f32s(body)),
            NpyDtype::F16 => Values::F16(f16s(body)),
            NpyDtype::F64 => Values::F32(Cow::Owned(to_f32_values(body, NpyDtype::F64))),
            _ => Values::U8(body),
        });
    }
    let parts = RawParts::new(
        values
            .iter()
            .map(|v| match v {
                Values::F32(v) => RawRows::F32(v),
                Values::F16(v) => RawRows::F16(v),
                Values::U8(v) => RawRows::U8Pixels(v),
            })
            .collect(),
    );
    Dataset::from_raw(
        dir.display().to_string(),
        shape,
        RawRows::Parts(&parts),
        labels,
        dtype,
    )
}
