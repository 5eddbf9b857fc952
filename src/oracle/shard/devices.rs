//! `--devices`: every device of one box on one evaluation.
//!
//! The row range of each call (the class's rows for a class-conditional query) is cut into
//! one consecutive part per device, in proportion to the device's weight (equal by
//! default; `NAME:WEIGHT` states a relative speed). Each device computes its part's
//! [`Partial`] on its own thread; the parts are merged in row order, so the result is
//! deterministic and equals one device's to within f32 rounding (the merge is the same
//! rescale-and-add the backends apply between their own tiles).

use std::ops::Range;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::oracle::cpu::{CpuBackend, CpuOptions};
use crate::oracle::gpu::{self, GpuBackend, GpuOptions};
use crate::oracle::{Backend, CentredBatch, Partial, Posterior};

use super::split_rows;

/// One worker of `--devices`.
#[derive(Clone, Debug, PartialEq)]
pub enum Device {
    /// A wgpu adapter, by its index in `oracleflow info`'s list.
    Adapter(usize),
    /// The cpu backend.
    Cpu,
}

/// The parsed `--devices` list: `all` (every adapter), adapter indices and `cpu`,
/// comma-separated, each optionally `:WEIGHT` (a relative speed; default 1).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceList {
    /// `all` given: every adapter, weighted by `all_weight`.
    all: Option<f64>,
    items: Vec<(Device, f64)>,
}

pub const DEVICES_HELP: &str = "Split each evaluation's rows across several devices, merged \
    exactly: `all` (every GPU adapter `oracleflow info` lists for the first graphics API: \
    Vulkan's, not the same GPUs again through GL), or a comma-separated list of \
    adapter indices and `cpu` (the cpu backend as one more worker), e.g. `0,1`, `all,cpu`, \
    `0:3,cpu:1`. Rows are split in equal parts, or in proportion to the `:WEIGHT` given \
    (a relative speed).";

impl std::str::FromStr for DeviceList {
    type Err = Error;

    fn from_str(text: &str) -> Result<DeviceList> {
        let bad = |why: String| Error::Input(format!("--devices {text}: {why}"));
        let mut list = DeviceList {
            all: None,
            items: Vec::new(),
        };
        for item in text.split(',').map(str::trim) {
            let (name, weight) = match item.split_once(':') {
                Some((n, w)) => {
                    let w: f64 = w
                        .parse()
                        .map_err(|_| bad(format!("weight '{w}' is not a number")))?;
                    if !(w.is_finite() && w > 0.0) {
                        return Err(bad(format!("weight {w} must be positive")));
                    }
                    (n.trim(), w)
                }
                None => (item, 1.0),
            };
            let device = match name {
                "all" if list.all.is_none() => {
                    list.all = Some(weight);
                    continue;
                }
                "all" => return Err(bad("`all` given twice".into())),
                "cpu" => Device::Cpu,
                _ => Device::Adapter(name.parse().map_err(|_| {
                    bad(format!("'{name}' is not `all`, `cpu` or an adapter index"))
                })?),
            };
            if list.items.iter().any(|(d, _)| *d == device) {
                return Err(bad(format!("{name} given twice")));
            }
            list.items.push((device, weight));
        }
        Ok(list)
    }
}

impl DeviceList {
    /// The workers: `all` expanded to the adapters `all_adapters` (their indices), then
    /// the list's own, in list order (one already given by `all` is not repeated).
    pub fn resolve(&self, all_adapters: &[usize]) -> Result<Vec<(Device, f64)>> {
        let mut out: Vec<(Device, f64)> = Vec::new();
        if let Some(w) = self.all {
            if all_adapters.is_empty() {
                return Err(Error::Gpu("--devices all: no GPU adapter found".into()));
            }
            out.extend(all_adapters.iter().map(|&i| (Device::Adapter(i), w)));
        }
        for (d, w) in &self.items {
            if !out.iter().any(|(o, _)| o == d) {
                out.push((d.clone(), *w));
            }
        }
        Ok(out)
    }
}

struct Worker<'d> {
    backend: Box<dyn Backend + 'd>,
    weight: f64,
}

/// A backend made of several: each call's rows split across them, their partial states
/// merged (see the module docs).
pub struct ShardedBackend<'d> {
    workers: Vec<Worker<'d>>,
    has_gpu: bool,
}

impl<'d> ShardedBackend<'d> {
    /// Opens every device of `list` over `dataset` (each holds the whole dataset, reading
    /// only its share of the rows per call).
    pub fn new(
        dataset: &'d Dataset,
        list: &DeviceList,
        gpu_options: &GpuOptions,
        cpu_options: CpuOptions,
    ) -> Result<Self> {
        let all_adapters = if list.all.is_some() {
            gpu::all_devices()
        } else {
            Vec::new()
        };
        let mut backends: Vec<(Box<dyn Backend + 'd>, f64)> = Vec::new();
        let devices = list.resolve(&all_adapters)?;
        let has_gpu = devices.iter().any(|(d, _)| *d != Device::Cpu);
        for (device, weight) in devices {
            let backend: Box<dyn Backend + 'd> = match device {
                Device::Cpu => Box::new(CpuBackend::with_options(dataset, cpu_options)),
                Device::Adapter(i) => Box::new(GpuBackend::with_options(
                    dataset,
                    GpuOptions {
                        adapter: Some(i),
                        hardware_only: false,
                        // A device reads a share of the stored rows, not a union of
                        // tiles: the tile order would scatter it (see gpu::prune).
                        exact_dense: true,
                        ..gpu_options.clone()
                    },
                )?),
            };
            backends.push((backend, weight));
        }
        Ok(ShardedBackend {
            has_gpu,
            ..Self::from_backends(backends)
        })
    }

    /// Any backends, with their weights (tests; e.g. two cpu backends).
    pub fn from_backends(backends: Vec<(Box<dyn Backend + 'd>, f64)>) -> Self {
        assert!(!backends.is_empty(), "no backend to shard over");
        ShardedBackend {
            workers: backends
                .into_iter()
                .map(|(backend, weight)| Worker { backend, weight })
                .collect(),
            has_gpu: false,
        }
    }

    /// Whether a worker is a GPU adapter (the backend kind reported).
    pub fn has_gpu(&self) -> bool {
        self.has_gpu
    }

    pub fn n_workers(&self) -> usize {
        self.workers.len()
    }

    /// The row parts of `rows`, one per worker.
    pub fn parts(&self, rows: Range<usize>) -> Vec<Range<usize>> {
        let weights: Vec<f64> = self.workers.iter().map(|w| w.weight).collect();
        split_rows(rows, &weights)
    }
}

impl Backend for ShardedBackend<'_> {
    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior> {
        Ok(self.partial(batch)?.finish())
    }

    fn forget_history(&mut self) {
        for w in &mut self.workers {
            w.backend.forget_history();
        }
    }

    fn partial(&mut self, batch: &CentredBatch<'_>) -> Result<Partial> {
        let parts = self.parts(batch.rows.clone());
        let dim = batch.x.len() / batch.logit_coefs.len().max(1);
        let n_queries = batch.logit_coefs.len();
        let results: Vec<Result<Partial>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .zip(parts)
                .map(|(w, rows)| {
                    scope.spawn(move || {
                        if rows.is_empty() {
                            return Ok(Partial::empty(n_queries, dim));
                        }
                        w.backend.partial(&CentredBatch {
                            x: batch.x,
                            logit_coefs: batch.logit_coefs,
                            rows,
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Gpu("a --devices worker panicked".into())))
                })
                .collect()
        });
        // In row order: the merge is deterministic whatever thread finished first.
        let mut merged = Partial::empty(n_queries, dim);
        for part in results {
            merged.merge(&part?);
        }
        Ok(merged)
    }

    fn describe(&self) -> String {
        let total: f64 = self.workers.iter().map(|w| w.weight).sum();
        let each: Vec<String> = self
            .workers
            .iter()
            .map(|w| {
                format!(
                    "[{:.0}% of rows] {}",
                    100.0 * w.weight / total,
                    w.backend.describe()
                )
            })
            .collect();
        format!(
            "{} devices, rows split and merged exactly: {}",
            self.workers.len(),
            each.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_lists() {
        let l: DeviceList = "all,cpu".parse().unwrap();
        assert_eq!(
            l.resolve(&[0, 1]).unwrap(),
            vec![
                (Device::Adapter(0), 1.0),
                (Device::Adapter(1), 1.0),
                (Device::Cpu, 1.0)
            ]
        );
        let l: DeviceList = "0:3, cpu:1".parse().unwrap();
        assert_eq!(
            l.resolve(&[]).unwrap(),
            vec![(Device::Adapter(0), 3.0), (Device::Cpu, 1.0)]
        );
        for bad in ["", "gpu", "0,0", "cpu:0", "cpu:x", "all,all", "1:-2"] {
            let e = bad.parse::<DeviceList>().unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{bad}: {e}");
            assert!(e.to_string().contains("--devices"), "{e}");
        }
        assert!("all".parse::<DeviceList>().unwrap().resolve(&[]).is_err());
        // `all,0` does not open adapter 0 twice.
        let l: DeviceList = "all,0".parse().unwrap();
        assert_eq!(l.resolve(&[0]).unwrap(), vec![(Device::Adapter(0), 1.0)]);
    }
}
