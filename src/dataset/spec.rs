//! The one dataset spec syntax (`--data`), parsed into a [`DataSpec`] and loaded into a
//! [`Dataset`]. See [`SPEC_HELP`] for the grammar.

use std::path::{Path, PathBuf};

use super::cifar::{Cifar, Split};
use super::limits::{check_alloc, product};
use super::{cifar, folder, idx, npy, safetensors, shards, synthetic};
use super::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};

/// The spec grammar, for `--help`.
pub const SPEC_HELP: &str = "\
Dataset spec, one of:
  embedded                   the first 2000 Fashion-MNIST training images (1x28x28, 10
                             classes), built into the binary
  fashion-mnist[:train]      Fashion-MNIST training set (60000 images, 10 classes) from
  fashion-mnist:test         /usr/share/datasets/fashion-mnist/ (test set: 10000 images);
                             apt-get install dataset-fashion-mnist, or point
                             ORACLEFLOW_FASHION_MNIST_DIR at a folder of the .gz files
  PATH-idx3-ubyte[.gz]       IDX images (MNIST family), raw or gzipped; labels from the
  idx:PATH                   *-labels-idx1-ubyte[.gz] file beside it when there is one
  DIR | folder:DIR           PNG/JPEG images, all one size (gray -> 1 channel, else RGB);
                             if DIR holds sub-folders, each is a class and the label is
                             its index among the sorted sub-folder names
  PATH.npy                   |u1 images (N,H,W), (N,C,H,W) or (N,H,W,C), C in {1,3}, as
  npy:DATA.npy[,LABELS.npy]  pixels; <f4 / <f2 arrays (N,...) taken as they are (latents);
                             LABELS: integer array of length N
  safetensors:FILE[:TENSOR]  an F32, F16 or BF16 tensor (N,...) of a .safetensors file;
                             TENSOR may be left out when the file holds one tensor
                             besides its labels; labels: an integer tensor of length N
                             named labels, label or y, when the file holds one
  shards:DIR                 every *.npy in DIR in name order, rows concatenated (<f4,
                             <f2, <f8 or |u1, one sample shape); labels: STEM_labels.npy
                             beside each STEM.npy, or one labels.npy for all rows
  cifar10:DIR[:SPLIT]        CIFAR-10 binary batches (cifar-10-batches-bin): SPLIT is
                             train (default: data_batch_1.bin, data_batch_2.bin, ...),
                             test (test_batch.bin) or all (train, then test); 3x32x32
  cifar100:DIR[:SPLIT]       CIFAR-100 binary (train.bin, test.bin), fine labels (100)
  gaussian:N,D[,SEED]        N samples of N(0, I) in D dimensions (SEED defaults to 0)
  mixture:N,D,K[,SEED]       N samples of a K-component Gaussian mixture in D dimensions,
                             labels = component
Append @M to any of these to keep only the first M samples, e.g. fashion-mnist@3000.
8-bit pixels are mapped to [-1, 1] as p/127.5 - 1.";

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Environment variable naming another directory holding the Fashion-MNIST files.
pub const FASHION_MNIST_DIR_ENV: &str = "ORACLEFLOW_FASHION_MNIST_DIR";

/// The Fashion-MNIST directory: `$ORACLEFLOW_FASHION_MNIST_DIR` when set, else
/// [`FASHION_MNIST_DIR`].
pub fn fashion_mnist_dir() -> PathBuf {
    std::env::var_os(FASHION_MNIST_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR))
}

/// The (images, labels) files of a Fashion-MNIST split in [`fashion_mnist_dir`].
pub fn fashion_mnist_files(test: bool) -> (PathBuf, PathBuf) {
    let prefix = if test { "t10k" } else { "train" };
    let dir = fashion_mnist_dir();
    (
        dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
    )
}

/// The embedded default dataset (see `scripts/make_embedded.sh` and
/// `assets/LICENSE-fashion-mnist.txt`).
const EMBEDDED_IMAGES: &[u8] =
    include_bytes!("../../assets/fashion-mnist-2000-images-idx3-ubyte.gz");
const EMBEDDED_LABELS: &[u8] =
    include_bytes!("../../assets/fashion-mnist-2000-labels-idx1-ubyte.gz");

/// Where the samples come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Embedded,
    FashionMnist {
        test: bool,
    },
    Idx(PathBuf),
    Folder(PathBuf),
    Npy {
        data: PathBuf,
        labels: Option<PathBuf>,
    },
    Safetensors {
        path: PathBuf,
        tensor: Option<String>,
    },
    Shards(PathBuf),
    Cifar {
        dir: PathBuf,
        kind: Cifar,
        split: Split,
    },
    Gaussian {
        n_samples: usize,
        dim: usize,
        seed: u64,
    },
    Mixture {
        n_samples: usize,
        dim: usize,
        k: usize,
        seed: u64,
    },
}

/// A parsed spec: a source and an optional limit (`@M`, keep the first M samples).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSpec {
    pub source: Source,
    pub limit: Option<usize>,
}

/// Parses and loads a dataset spec (see [`SPEC_HELP`]). The dataset is named by the spec.
pub fn load(spec: &str, dtype: Dtype) -> Result<Dataset> {
    let parsed = DataSpec::parse(spec)?;
    let mut ds = parsed.load(spec.trim(), dtype)?;
    ds.name = spec.trim().to_string();
    Ok(ds)
}

impl DataSpec {
    /// Parses a spec without touching the file system beyond telling a directory from a
    /// file for unprefixed paths.
    pub fn parse(spec: &str) -> Result<DataSpec> {
        let spec = spec.trim();
        let (base, limit) = split_limit(spec)?;
        let source = parse_source(spec, base)?;
        Ok(DataSpec { source, limit })
    }

    /// Loads the samples; `spec` is the original text, for error messages.
    pub fn load(&self, spec: &str, dtype: Dtype) -> Result<Dataset> {
        let limit = self.limit;
        match &self.source {
            Source::Embedded => idx::from_bytes(
                "embedded",
                EMBEDDED_IMAGES,
                Some(EMBEDDED_LABELS),
                limit,
                dtype,
            ),
            Source::FashionMnist { test } => {
                let (images, labels) = fashion_mnist_files(*test);
                for path in [&images, &labels] {
                    if !path.is_file() {
                        return Err(Error::data(
                            path,
                            format!(
                                "missing: install Fashion-MNIST with `apt-get install \
                                 dataset-fashion-mnist` (or set {FASHION_MNIST_DIR_ENV})"
                            ),
                        ));
                    }
                }
                idx::load_pair(&images, Some(&labels), limit, dtype)
            }
            Source::Idx(path) => idx::load(path, limit, dtype),
            Source::Folder(dir) => folder::load(dir, limit, dtype),
            Source::Npy { data, labels } => {
                // Larger than the memory budget: streamed from the file (dataset::disk).
                let budget = super::disk::memory_budget();
                match super::disk::open_if_over_budget(
                    data,
                    labels.as_deref(),
                    limit,
                    dtype,
                    budget,
                )? {
                    Some(ds) => Ok(ds),
                    None => npy::load(data, labels.as_deref(), limit, dtype),
                }
            }
            Source::Safetensors { path, tensor } => {
                safetensors::load(path, tensor.as_deref(), limit, dtype)
            }
            Source::Shards(dir) => shards::load(dir, limit, dtype),
            &Source::Cifar {
                ref dir,
                kind,
                split,
            } => cifar::load(dir, kind, split, limit, dtype),
            &Source::Gaussian {
                n_samples,
                dim,
                seed,
            } => {
                let n = synthetic_rows(spec, n_samples, limit)?;
                // The generated f32 values, then the dataset's storage of them.
                check_alloc(spec, product(&[n, dim, 4 + dtype.bytes()]))?;
                let values = synthetic::gaussian(n, dim, seed);
                Dataset::from_raw(
                    spec,
                    SampleShape::array(vec![dim]),
                    RawRows::F32(&values),
                    None,
                    dtype,
                )
            }
            &Source::Mixture {
                n_samples,
                dim,
                k,
                seed,
            } => {
                let n = synthetic_rows(spec, n_samples, limit)?;
                // Component means, generated values and labels, then the dataset's storage.
                let needed = product(&[k, dim, 4]).zip(product(&[
                    n,
                    dim.saturating_mul(4 + dtype.bytes()).saturating_add(4),
                ]));
                check_alloc(spec, needed.and_then(|(a, b)| a.checked_add(b)))?;
                let (values, labels) = synthetic::mixture(n, dim, k, seed);
                Dataset::from_raw(
                    spec,
                    SampleShape::array(vec![dim]),
                    RawRows::F32(&values),
                    Some(labels),
                    dtype,
                )
            }
        }
    }
}

fn synthetic_rows(spec: &str, n_samples: usize, limit: Option<usize>) -> Result<usize> {
    match limit {
        Some(m) if m > n_samples => Err(spec_error(
            spec,
            format!("@{m} asks for more than the {n_samples} samples generated"),
        )),
        Some(m) => Ok(m),
        None => Ok(n_samples),
    }
}

fn spec_error(spec: &str, message: impl Into<String>) -> Error {
    Error::Spec {
        spec: spec.to_string(),
        message: message.into(),
    }
}

const FORMS: &str = "expected embedded, fashion-mnist[:test], a *-idx3-ubyte[.gz] file, a \
                     directory, a .npy file, safetensors:FILE[:TENSOR], shards:DIR, \
                     cifar10:DIR[:test], cifar100:DIR[:test], gaussian:N,D[,SEED] or \
                     mixture:N,D,K[,SEED] (optionally followed by @M); see --help";

/// Splits a trailing `@M`. A path may contain '@': only an all-digit tail is a limit,
/// except after a dataset name, where anything after '@' must be a count.
fn split_limit(spec: &str) -> Result<(&str, Option<usize>)> {
    let Some((base, tail)) = spec.rsplit_once('@') else {
        return Ok((spec, None));
    };
    if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) {
        let m: usize = tail
            .parse()
            .map_err(|_| spec_error(spec, format!("sample count '@{tail}' is too large")))?;
        if m == 0 {
            return Err(spec_error(spec, "@0 keeps no samples"));
        }
        return Ok((base, Some(m)));
    }
    let named = base == "embedded"
        || base.starts_with("fashion-mnist")
        || base.starts_with("gaussian:")
        || base.starts_with("mixture:");
    if named {
        return Err(spec_error(
            spec,
            format!("'@{tail}': '@' must be followed by a sample count, e.g. @1000"),
        ));
    }
    Ok((spec, None))
}

fn parse_source(spec: &str, base: &str) -> Result<Source> {
    match base {
        "" => return Err(spec_error(spec, format!("empty spec; {FORMS}"))),
        "embedded" => return Ok(Source::Embedded),
        "fashion-mnist" | "fashion-mnist:train" => return Ok(Source::FashionMnist { test: false }),
        "fashion-mnist:test" => return Ok(Source::FashionMnist { test: true }),
        s if s.starts_with("fashion-mnist:") => {
            return Err(spec_error(
                spec,
                "the Fashion-MNIST splits are fashion-mnist (train) and fashion-mnist:test",
            ))
        }
        _ => {}
    }

    if let Some((prefix, rest)) = base.split_once(':') {
        let path_arg = |what: &str| -> Result<PathBuf> {
            if rest.is_empty() {
                Err(spec_error(spec, format!("{prefix}: needs {what}")))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        match prefix {
            "idx" => return Ok(Source::Idx(path_arg("a path")?)),
            "folder" => return Ok(Source::Folder(path_arg("a directory")?)),
            "npy" => {
                path_arg("a path")?;
                return Ok(npy_source(rest));
            }
            "safetensors" => {
                path_arg("a path")?;
                return Ok(safetensors_source(rest));
            }
            "shards" => return Ok(Source::Shards(path_arg("a directory")?)),
            "cifar10" | "cifar100" => {
                path_arg("a directory")?;
                let kind = if prefix == "cifar10" {
                    Cifar::Cifar10
                } else {
                    Cifar::Cifar100
                };
                let (dir, split) = cifar_split(rest).map_err(|m| spec_error(spec, m))?;
                if dir.is_empty() {
                    return Err(spec_error(spec, format!("{prefix}: needs a directory")));
                }
                return Ok(Source::Cifar {
                    dir: PathBuf::from(dir),
                    kind,
                    split,
                });
            }
            "gaussian" => {
                let nums = numbers(spec, rest, 2, 3, "gaussian:N,D[,SEED]")?;
                return Ok(Source::Gaussian {
                    n_samples: positive(spec, nums[0], "N")?,
                    dim: positive(spec, nums[1], "D")?,
                    seed: nums.get(2).copied().unwrap_or(0),
                });
            }
            "mixture" => {
                let nums = numbers(spec, rest, 3, 4, "mixture:N,D,K[,SEED]")?;
                let (n_samples, k) = (positive(spec, nums[0], "N")?, positive(spec, nums[2], "K")?);
                // Sample i belongs to component i % K: components beyond N would be empty.
                if k > n_samples {
                    return Err(spec_error(
                        spec,
                        format!(
                            "K = {k} components for N = {n_samples} samples; K must be at most N"
                        ),
                    ));
                }
                return Ok(Source::Mixture {
                    n_samples,
                    dim: positive(spec, nums[1], "D")?,
                    k,
                    seed: nums.get(3).copied().unwrap_or(0),
                });
            }
            _ => {} // maybe a path with a ':' in it (or a drive letter)
        }
    }

    if base.ends_with("-idx3-ubyte") || base.ends_with("-idx3-ubyte.gz") {
        return Ok(Source::Idx(PathBuf::from(base)));
    }
    if base.ends_with(".npy") {
        return Ok(npy_source(base));
    }
    let path = Path::new(base);
    if path.is_dir() {
        return Ok(Source::Folder(path.to_path_buf()));
    }
    if path.exists() {
        return Err(spec_error(
            spec,
            format!(
                "cannot tell the format of file '{base}' from its name; write idx:{base} \
                 or npy:{base}"
            ),
        ));
    }
    Err(spec_error(
        spec,
        format!("not a dataset name and no such file or directory; {FORMS}"),
    ))
}

/// `DATA.npy` or `DATA.npy,LABELS.npy` (a path that exists as given is never split).
fn npy_source(rest: &str) -> Source {
    if !Path::new(rest).exists() {
        if let Some((data, labels)) = rest.rsplit_once(',') {
            return Source::Npy {
                data: PathBuf::from(data),
                labels: Some(PathBuf::from(labels)),
            };
        }
    }
    Source::Npy {
        data: PathBuf::from(rest),
        labels: None,
    }
}

/// `FILE` or `FILE:TENSOR` (a path that exists as given is never split).
fn safetensors_source(rest: &str) -> Source {
    if !Path::new(rest).exists() {
        if let Some((path, tensor)) = rest.rsplit_once(':') {
            if !path.is_empty() && !tensor.is_empty() {
                return Source::Safetensors {
                    path: PathBuf::from(path),
                    tensor: Some(tensor.to_string()),
                };
            }
        }
    }
    Source::Safetensors {
        path: PathBuf::from(rest),
        tensor: None,
    }
}

/// `DIR`, `DIR:train`, `DIR:test` or `DIR:all` (a directory that exists as given, colon
/// and all, is never split). An unknown split after an existing directory is an error.
fn cifar_split(rest: &str) -> std::result::Result<(&str, Split), String> {
    if !Path::new(rest).exists() {
        if let Some((dir, split)) = rest.rsplit_once(':') {
            match split {
                "train" => return Ok((dir, Split::Train)),
                "test" => return Ok((dir, Split::Test)),
                "all" => return Ok((dir, Split::All)),
                _ if Path::new(dir).is_dir() => {
                    return Err(format!(
                        "unknown split '{split}': the splits are train (the default), test \
                         and all"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok((rest, Split::Train))
}

fn numbers(spec: &str, text: &str, min: usize, max: usize, form: &str) -> Result<Vec<u64>> {
    let nums = text
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| spec_error(spec, format!("expected {form} with whole numbers")))?;
    if nums.len() < min || nums.len() > max {
        return Err(spec_error(
            spec,
            format!("expected {form}, got {} numbers", nums.len()),
        ));
    }
    Ok(nums)
}

fn positive(spec: &str, v: u64, what: &str) -> Result<usize> {
    match usize::try_from(v) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(spec_error(spec, format!("{what} must be at least 1"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> DataSpec {
        DataSpec::parse(s).unwrap()
    }

    #[test]
    fn grammar() {
        assert_eq!(parse("embedded").source, Source::Embedded);
        assert_eq!(
            parse("fashion-mnist@3000"),
            DataSpec {
                source: Source::FashionMnist { test: false },
                limit: Some(3000)
            }
        );
        assert_eq!(
            parse("fashion-mnist:test").source,
            Source::FashionMnist { test: true }
        );
        assert_eq!(
            parse("x/train-images-idx3-ubyte.gz").source,
            Source::Idx("x/train-images-idx3-ubyte.gz".into())
        );
        assert_eq!(parse("idx:foo").source, Source::Idx("foo".into()));
        assert_eq!(
            parse("npy:a.npy,b.npy@7"),
            DataSpec {
                source: Source::Npy {
                    data: "a.npy".into(),
                    labels: Some("b.npy".into())
                },
                limit: Some(7)
            }
        );
        assert_eq!(
            parse("gaussian:10,4").source,
            Source::Gaussian {
                n_samples: 10,
                dim: 4,
                seed: 0
            }
        );
        assert_eq!(
            parse("mixture:10,4,3,9").source,
            Source::Mixture {
                n_samples: 10,
                dim: 4,
                k: 3,
                seed: 9
            }
        );
        assert_eq!(
            parse("safetensors:x.st:latents@9"),
            DataSpec {
                source: Source::Safetensors {
                    path: "x.st".into(),
                    tensor: Some("latents".into())
                },
                limit: Some(9)
            }
        );
        assert_eq!(
            parse("safetensors:x.st").source,
            Source::Safetensors {
                path: "x.st".into(),
                tensor: None
            }
        );
        assert_eq!(parse("shards:d").source, Source::Shards("d".into()));
        assert_eq!(
            parse("cifar10:d").source,
            Source::Cifar {
                dir: "d".into(),
                kind: Cifar::Cifar10,
                split: Split::Train
            }
        );
        assert_eq!(
            parse("cifar100:d:test@5"),
            DataSpec {
                source: Source::Cifar {
                    dir: "d".into(),
                    kind: Cifar::Cifar100,
                    split: Split::Test
                },
                limit: Some(5)
            }
        );
        assert_eq!(
            parse("cifar10:d:all").source,
            Source::Cifar {
                dir: "d".into(),
                kind: Cifar::Cifar10,
                split: Split::All
            }
        );
        // A '@' in a path that is not followed by a count is part of the path.
        assert_eq!(
            parse("run@home/x.npy").source,
            Source::Npy {
                data: "run@home/x.npy".into(),
                labels: None
            }
        );
    }

    #[test]
    fn bad_specs() {
        for s in [
            "",
            "embedded@0",
            "embedded@x",
            "fashion-mnist:val",
            "gaussian:10",
            "gaussian:0,4",
            "gaussian:a,b",
            "mixture:10,4",
            "mixture:2,4,3",
            "idx:",
            "safetensors:",
            "shards:",
            "cifar10:",
            "cifar100::test",
            "no-such-thing",
        ] {
            assert!(
                matches!(DataSpec::parse(s), Err(Error::Spec { .. })),
                "{s:?} should be a spec error"
            );
        }
    }
}
