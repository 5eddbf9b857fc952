//! CIFAR-10 and CIFAR-100, "binary version" (`cifar-10-batches-bin/`,
//! `cifar-100-binary/`): `cifar10:DIR[:train|test|all]`, `cifar100:DIR[:train|test|all]`.
//!
//! A file is a run of fixed-size records: the label byte(s), then 3 x 32 x 32 u8 pixels,
//! planar (all red, then green, then blue; rows top to bottom). Samples are (3, 32, 32)
//! images mapped to [-1, 1] like other 8-bit pixels. The files are memory-mapped and read
//! in place (the pixels interleave with the labels, so a record view, not a copy).
//!
//! - CIFAR-10: records of 1 + 3072 bytes, label 0 ..= 9. Train = `data_batch_1.bin`,
//!   `data_batch_2.bin`, ... in batch-number order (numbered from 1 with no gap: a missing
//!   batch is an error, not a silently smaller set); test = `test_batch.bin`.
//! - CIFAR-100: records of 2 + 3072 bytes: coarse label (0 ..= 19), fine label
//!   (0 ..= 99); the label used is the fine one. Train = `train.bin`, test = `test.bin`.
//! - The split: `train` (the default), `test`, or `all` (train, then test).

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::limits::{check_alloc, keep_first, product};
use super::npy::map_file_as;
use super::{Dataset, Dtype, RawParts, RawRows, SampleShape};
use crate::error::{Error, Result};

/// Pixels per image: 3 channels of 32 x 32.
pub const PIXELS: usize = 3 * 32 * 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Cifar10,
    Cifar100,
}

impl Cifar {
    /// Label bytes at the start of each record.
    pub fn label_bytes(self) -> usize {
        match self {
            Cifar::Cifar10 => 1,
            Cifar::Cifar100 => 2,
        }
    }

    /// Bytes per record: the label byte(s) and the pixels.
    pub fn record(self) -> usize {
        self.label_bytes() + PIXELS
    }

    fn name(self) -> &'static str {
        match self {
            Cifar::Cifar10 => "CIFAR-10",
            Cifar::Cifar100 => "CIFAR-100",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
    /// Train, then test.
    All,
}

/// The batch files of `split` in `dir`, in the order their records are read.
pub fn files(dir: &Path, kind: Cifar, split: Split) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::data(
            dir,
            format!(
                "not a directory; {} wants the folder of its binary batches",
                kind.name()
            ),
        ));
    }
    let existing = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::data(
                &p,
                format!(
                    "missing: {} {} batch file (the dataset's binary version)",
                    kind.name(),
                    if name.starts_with("test") {
                        "test"
                    } else {
                        "training"
                    }
                ),
            ))
        }
    };
    let train = || -> Result<Vec<PathBuf>> {
        match kind {
            Cifar::Cifar100 => Ok(vec![existing("train.bin")?]),
            Cifar::Cifar10 => {
                let mut numbers: Vec<u64> = Vec::new();
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let entry = entry.map_err(|e| Error::io(dir, e))?;
                    let name = entry.file_name();
                    let Some(k) = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("data_batch_"))
                        .and_then(|n| n.strip_suffix(".bin"))
                        .and_then(|n| n.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    numbers.push(k);
                }
                numbers.sort_unstable();
                if numbers.is_empty() {
                    return Err(Error::data(
                        dir,
                        "no CIFAR-10 training batches (data_batch_1.bin, data_batch_2.bin, ...)",
                    ));
                }
                // 1, 2, ... with no gap: a lost batch would silently shrink the set.
                if let Some(missing) = (1u64..).zip(&numbers).find(|(i, k)| i != *k) {
                    return Err(Error::data(
                        dir.join(format!("data_batch_{}.bin", missing.0)),
                        format!(
                            "missing: the CIFAR-10 training batches must be numbered from 1 \
                             without gaps; found {}",
                            numbers
                                .iter()
                                .map(|k| format!("data_batch_{k}.bin"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                Ok(numbers
                    .iter()
                    .map(|k| dir.join(format!("data_batch_{k}.bin")))
                    .collect())
            }
        }
    };
    let test = || {
        existing(match kind {
            Cifar::Cifar10 => "test_batch.bin",
            Cifar::Cifar100 => "test.bin",
        })
    };
    Ok(match split {
        Split::Train => train()?,
        Split::Test => vec![test()?],
        Split::All => {
            let mut v = train()?;
            v.push(test()?);
            v
        }
    })
}

/// Loads a CIFAR split from `dir` (see the module docs), keeping the first `limit` images
/// when given.
pub fn load(
    dir: &Path,
    kind: Cifar,
    split: Split,
    limit: Option<usize>,
    dtype: Dtype,
) -> Result<Dataset> {
    let files = files(dir, kind, split)?;
    let record = kind.record();
    // Every file is checked (size, a whole number of records) before any is read.
    let mut maps: Vec<(PathBuf, Mmap)> = Vec::with_capacity(files.len());
    for path in files {
        let map = map_file_as(&path, kind.name())?;
        if !map.len().is_multiple_of(record) {
            return Err(Error::data(
                &path,
                format!(
                    "{} bytes is not a whole number of {}-byte {} records ({} label byte{} \
                     + 3x32x32 pixels)",
                    map.len(),
                    record,
                    kind.name(),
                    kind.label_bytes(),
                    if kind.label_bytes() == 1 { "" } else { "s" }
                ),
            ));
        }
        maps.push((path, map));
    }
    let n_total: usize = maps.iter().map(|(_, m)| m.len() / record).sum();
    let n = keep_first(dir, n_total, limit)?;
    check_alloc(&format!("{}: {n} labels", dir.display()), product(&[n, 4]))?;

    // The records used, file by file, and their labels (checked against the class count).
    let (label_at, classes) = match kind {
        Cifar::Cifar10 => (0, 10u32),
        Cifar::Cifar100 => (1, 100u32),
    };
    let mut labels = Vec::with_capacity(n);
    let mut parts = Vec::with_capacity(maps.len());
    let mut left = n;
    for (path, map) in &maps {
        let take = left.min(map.len() / record);
        left -= take;
        let bytes = &map[..take * record];
        for (i, r) in bytes.chunks_exact(record).enumerate() {
            if kind == Cifar::Cifar100 && r[0] >= 20 {
                return Err(Error::data(
                    path,
                    format!(
                        "record {i} has coarse label {}, outside 0 ..= 19: not a CIFAR-100 file?",
                        r[0]
                    ),
                ));
            }
            let label = r[label_at] as u32;
            if label >= classes {
                return Err(Error::data(
                    path,
                    format!(
                        "record {i} has label {label}, outside 0 ..= {}: not a {} file?",
                        classes - 1,
                        kind.name()
                    ),
                ));
            }
            labels.push(label);
        }
        parts.push(RawRows::U8Records {
            bytes,
            record,
            skip: kind.label_bytes(),
            dim: PIXELS,
        });
    }
    let parts = RawParts::new(parts);
    Dataset::from_raw(
        dir.display().to_string(),
        SampleShape::image(3, 32, 32),
        RawRows::Parts(&parts),
        Some(labels),
        dtype,
    )
}
