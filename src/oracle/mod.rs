//! The oracle: for B queries x at times t, the exact marginal velocity over a dataset.
//!
//!   w_i    = softmax_i(-|x - alpha y_i|^2 / (2 sigma^2))
//!   x1_hat = sum_i w_i y_i
//!   u      = (alpha' - alpha sigma'/sigma) x1_hat + (sigma'/sigma) x
//!
//! Backends see only the centred problem (see `dataset`): queries shifted to
//! `x - alpha * mean`, per-query logit coefficients, and a row range. They return the
//! posterior mean of the stored rows and the per-query statistics; [`Oracle`] turns that
//! into x1_hat and the velocity. The `reference` backend instead evaluates the definition
//! directly in f64, so it shares no arithmetic with the fast paths it checks.

pub mod cpu;
pub mod gpu;
pub mod partial;
pub mod prune;
pub mod reference;
pub mod refine;
pub mod shard;
pub mod simd;
pub mod state;
pub mod stream;

use std::ops::Range;

use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::path::Path;

pub use partial::Partial;
pub use state::{QueryStats, SoftmaxState};

/// Which implementation evaluates the oracle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A real GPU when there is one, else `cpu`.
    #[default]
    Auto,
    Gpu,
    Cpu,
    Reference,
}

/// Time of each query: one for all, or one per query.
#[derive(Clone, Copy, Debug)]
pub enum Times<'a> {
    Scalar(f32),
    PerQuery(&'a [f32]),
}

impl Times<'_> {
    pub fn get(&self, q: usize) -> f32 {
        match self {
            Times::Scalar(t) => *t,
            Times::PerQuery(ts) => ts[q],
        }
    }
}

/// The one check of a query time: t must lie in [0, 1] (0 = noise, 1 = data).
pub fn check_time(t: f32) -> Result<()> {
    if (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(Error::Input(format!("time {t} is outside [0, 1]")))
    }
}

/// The check of a time given by a flag (`--switch-at`, `--t-start`, ...): in [0, 1],
/// with the flag named.
pub fn check_flag_time(flag: &str, t: f64) -> Result<()> {
    if (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(Error::Input(format!("{flag} {t} is outside [0, 1]")))
    }
}

/// One evaluation request.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// B x D, row-major, user coordinates.
    pub x: &'a [f32],
    pub t: Times<'a>,
    /// Restrict the posterior to the samples of one class.
    pub class: Option<u32>,
}

/// Everything one evaluation yields.
#[derive(Clone, Debug, Default)]
pub struct OracleOutput {
    /// B x D
    pub velocity: Vec<f32>,
    /// B x D, the posterior mean of the data
    pub x1_hat: Vec<f32>,
    /// One per query; `top1_index` is the sample's index in the source dataset.
    pub stats: Vec<QueryStats>,
}

/// The centred problem a fast backend solves: the posterior over `rows` for each query.
pub struct CentredBatch<'a> {
    /// B x D, `x - alpha * mean`
    pub x: &'a [f32],
    /// Per query (c_dot, c_norm): logit_i = c_dot * x.y_i - c_norm * |y_i|^2.
    pub logit_coefs: &'a [[f32; 2]],
    pub rows: Range<usize>,
}

/// Posterior mean of the stored rows (B x D) and per-query stats (row indices are stored rows).
#[derive(Clone)]
pub struct Posterior {
    pub mean: Vec<f32>,
    pub stats: Vec<QueryStats>,
}

/// A fast backend: built once for a dataset, reused across calls. `Send` so an oracle can
/// work on another thread (the Python binding releases the GIL around evaluations).
pub trait Backend: Send {
    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior>;
    /// The state over `batch.rows` before normalisation, which merges exactly with other
    /// row ranges' ([`Partial::merge`]): how several devices and MPI ranks combine.
    /// `posterior` equals `partial` then [`Partial::finish`] to within rounding.
    fn partial(&mut self, batch: &CentredBatch<'_>) -> Result<Partial> {
        let _ = batch;
        Err(Error::Input(format!(
            "{} cannot return partial states (for --devices or MPI use the cpu or gpu backend)",
            self.describe()
        )))
    }
    /// Human-readable description (for `info` and run.json).
    fn describe(&self) -> String;
    /// True when the rows are this process's share of a dataset spread over processes
    /// (MPI): top-1 indices then come back as source indices already, and a class this
    /// process holds no sample of is an empty row range rather than an error.
    fn distributed(&self) -> bool {
        false
    }
    /// Per query, the stored rows the last call's pruned pass kept, where it recorded them:
    /// every row whose weight can reach an f32 result is among them (its certificate
    /// bounds the rest), so the late-t refinement need look at no other ([`refine`]).
    fn kept_candidates(&self) -> Option<&[Vec<u32>]> {
        None
    }
    /// Forgets what earlier calls left for later ones (the cpu backend's anchors, see
    /// `prune::anchor`), so that the next call's bits depend on its own queries alone. A
    /// trajectory's calls keep it (each screens the next); separate calls on one oracle,
    /// like the Python binding's, start from nothing, as a fresh process would.
    fn forget_history(&mut self) {}
}

enum Engine<'d> {
    Reference,
    Fast(Box<dyn Backend + 'd>),
}

/// The oracle over one dataset, with one backend.
pub struct Oracle<'d> {
    dataset: &'d Dataset,
    path: Path,
    engine: Engine<'d>,
    kind: BackendKind,
    /// Why `auto` did not use a GPU (shown by `describe`, so run.json says why).
    fallback_reason: Option<String>,
    /// Late-t f64 recomputation of concentrated posteriors (built on first use).
    refiner: Option<refine::Refiner>,
    /// Queries whose fast result was replaced by the f64 refinement, over all calls.
    refined: u64,
}

impl<'d> Oracle<'d> {
    pub fn new(dataset: &'d Dataset, path: Path, kind: BackendKind) -> Result<Self> {
        Self::with_gpu_options(dataset, path, kind, gpu::GpuOptions::default())
    }

    /// As [`Oracle::new`], with GPU settings (e.g. a device-memory budget beyond which the
    /// dataset is streamed). `hardware_only` is set from `kind`.
    pub fn with_gpu_options(
        dataset: &'d Dataset,
        path: Path,
        kind: BackendKind,
        gpu_options: gpu::GpuOptions,
    ) -> Result<Self> {
        Self::with_options(dataset, path, kind, gpu_options, cpu::CpuOptions::default())
    }

    /// As [`Oracle::with_gpu_options`], with CPU settings too (e.g. `prune: false` for
    /// `--exact-dense`).
    pub fn with_options(
        dataset: &'d Dataset,
        path: Path,
        kind: BackendKind,
        gpu_options: gpu::GpuOptions,
        cpu_options: cpu::CpuOptions,
    ) -> Result<Self> {
        let gpu_backend = |hardware_only: bool| {
            gpu::GpuBackend::with_options(
                dataset,
                gpu::GpuOptions {
                    hardware_only,
                    ..gpu_options.clone()
                },
            )
        };
        let mut fallback_reason = None;
        let (engine, kind) = match kind {
            BackendKind::Reference => (Engine::Reference, kind),
            BackendKind::Cpu => (
                Engine::Fast(Box::new(cpu::CpuBackend::with_options(
                    dataset,
                    cpu_options,
                ))),
                kind,
            ),
            BackendKind::Gpu => (Engine::Fast(Box::new(gpu_backend(false)?)), kind),
            BackendKind::Auto => match gpu_backend(true) {
                Ok(g) => (Engine::Fast(Box::new(g)), BackendKind::Gpu),
                Err(e) => {
                    fallback_reason = Some(e.to_string());
                    (
                        Engine::Fast(Box::new(cpu::CpuBackend::with_options(
                            dataset,
                            cpu_options,
                        ))),
                        BackendKind::Cpu,
                    )
                }
            },
        };
        Ok(Oracle {
            dataset,
            path,
            engine,
            kind,
            fallback_reason,
            refiner: None,
            refined: 0,
        })
    }

    /// How many query evaluations the late-t refinement recomputed in f64 (see `refine`).
    pub fn refined_queries(&self) -> u64 {
        self.refined
    }

    /// The oracle over `dataset` with a backend built by the caller (several devices, an
    /// MPI rank's); `kind` is what [`Oracle::kind`] reports.
    pub fn with_backend(
        dataset: &'d Dataset,
        path: Path,
        backend: Box<dyn Backend + 'd>,
        kind: BackendKind,
    ) -> Self {
        Oracle {
            dataset,
            path,
            engine: Engine::Fast(backend),
            kind,
            fallback_reason: None,
            refiner: None,
            refined: 0,
        }
    }

    /// Wraps the fast backend (in an MPI reduction, say); the f64 reference cannot be.
    pub fn wrap_backend(
        mut self,
        wrap: impl FnOnce(Box<dyn Backend + 'd>) -> Box<dyn Backend + 'd>,
    ) -> Result<Self> {
        self.engine = match self.engine {
            Engine::Fast(b) => Engine::Fast(wrap(b)),
            Engine::Reference => {
                return Err(Error::Input(
                    "--backend reference evaluates whole datasets only (no --devices, no MPI)"
                        .into(),
                ))
            }
        };
        Ok(self)
    }

    /// The backend actually in use (`auto` resolved).
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Forgets what earlier calls left for later ones ([`Backend::forget_history`]): the
    /// next call gives the bits a fresh oracle would.
    pub fn forget_history(&mut self) {
        if let Engine::Fast(b) = &mut self.engine {
            b.forget_history();
        }
    }

    pub fn describe(&self) -> String {
        let mut what = match &self.engine {
            Engine::Reference => "reference (f64)".to_string(),
            Engine::Fast(b) => b.describe(),
        };
        if let Some(disk) = self.dataset.disk() {
            if !what.contains("streamed from disk") {
                what = format!(
                    "{what}; data read from disk ({}), dense",
                    disk.path().display()
                );
            }
        }
        match &self.fallback_reason {
            Some(why) => format!("{what} (auto: no GPU used: {why})"),
            None => what,
        }
    }

    pub fn dataset(&self) -> &'d Dataset {
        self.dataset
    }

    pub fn path(&self) -> Path {
        self.path
    }

    pub fn evaluate(&mut self, query: &Query<'_>) -> Result<OracleOutput> {
        // Every command's long work is a sequence of evaluations: stop here on Ctrl-C.
        crate::interrupt::check()?;
        let ds = self.dataset;
        let dim = ds.dim();
        if query.x.is_empty() || !query.x.len().is_multiple_of(dim) {
            return Err(Error::Input(format!(
                "queries hold {} values, not a multiple of the sample size {dim}",
                query.x.len()
            )));
        }
        let n_queries = query.x.len() / dim;
        if let Some(k) = query.x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "query {} holds a non-finite value ({})",
                k / dim,
                query.x[k]
            )));
        }
        if let Times::PerQuery(ts) = query.t {
            if ts.len() != n_queries {
                return Err(Error::Input(format!(
                    "{} times for {n_queries} queries",
                    ts.len()
                )));
            }
        }
        (0..n_queries).try_for_each(|q| check_time(query.t.get(q)))?;
        let rows = match (ds.rows_for(query.class), &self.engine) {
            (Err(_), Engine::Fast(b)) if b.distributed() && ds.labels().is_some() => 0..0,
            (rows, _) => rows?,
        };
        match &mut self.engine {
            Engine::Reference => Ok(reference::evaluate(ds, self.path, query, rows)),
            Engine::Fast(backend) => {
                let clock = std::time::Instant::now();
                let coefs: Vec<_> = (0..n_queries)
                    .map(|q| self.path.coefs(query.t.get(q) as f64))
                    .collect();
                // (Per query on every thread, here and below: late in a trajectory a pruned
                // call takes a few ms, and these loops over every query's D values were a
                // tenth of it on one thread.)
                let mut x = query.x.to_vec();
                x.par_chunks_mut(dim)
                    .zip(coefs.par_iter())
                    .for_each(|(xq, c)| {
                        for (v, m) in xq.iter_mut().zip(ds.mean()) {
                            *v -= (c.alpha * *m as f64) as f32;
                        }
                    });
                let logit_coefs: Vec<[f32; 2]> = coefs
                    .iter()
                    .map(|c| {
                        let (a, b) = c.logit_coefs();
                        [a as f32, b as f32]
                    })
                    .collect();
                let t_centred = clock.elapsed().as_secs_f64();
                let mut post = backend.posterior(&CentredBatch {
                    x: &x,
                    logit_coefs: &logit_coefs,
                    rows: rows.clone(),
                })?;
                let t_post = clock.elapsed().as_secs_f64();
                // Late-t f64 refinement, where the rows are all here (not an MPI rank's).
                let exact_means = if backend.distributed() {
                    vec![None; n_queries]
                } else {
                    let refiner = self.refiner.get_or_insert_with(|| refine::Refiner::new(ds));
                    let kept = backend.kept_candidates();
                    let (exact, n) =
                        refine::refine_batch(refiner, ds, query.x, &coefs, &rows, kept, &mut post)?;
                    self.refined += n;
                    exact
                };
                let t_refined = clock.elapsed().as_secs_f64();
                let mut x1_hat = post.mean;
                let mut velocity = vec![0.0f32; x1_hat.len()];
                x1_hat
                    .par_chunks_mut(dim)
                    .zip(velocity.par_chunks_mut(dim))
                    .zip(query.x.par_chunks(dim))
                    .zip(coefs.par_iter().zip(&exact_means))
                    .for_each(|(((hq, vq), xq), (c, exact))| {
                        let (a, b) = c.velocity_coefs();
                        let exact = exact.as_deref();
                        for (k, ((h, v), (&xv, &m))) in hq
                            .iter_mut()
                            .zip(vq)
                            .zip(xq.iter().zip(ds.mean()))
                            .enumerate()
                        {
                            let centred = exact.map_or(*h as f64, |e| e[k]);
                            let hat = centred + m as f64;
                            *h = hat as f32;
                            *v = (a * hat + b * xv as f64) as f32;
                        }
                    });
                if prune::profiling() {
                    eprintln!(
                        "oracle: {:.2} ms (centring {:.2}, posterior {:.2}, refinement {:.2}, velocity {:.2})",
                        clock.elapsed().as_secs_f64() * 1e3,
                        t_centred * 1e3,
                        (t_post - t_centred) * 1e3,
                        (t_refined - t_post) * 1e3,
                        (clock.elapsed().as_secs_f64() - t_refined) * 1e3
                    );
                }
                let source_indices = backend.distributed();
                let stats = post
                    .stats
                    .into_iter()
                    .map(|s| QueryStats {
                        top1_index: if source_indices {
                            s.top1_index
                        } else {
                            ds.original_index(s.top1_index as usize)
                        },
                        ..s
                    })
                    .collect();
                Ok(OracleOutput {
                    velocity,
                    x1_hat,
                    stats,
                })
            }
        }
    }
}
