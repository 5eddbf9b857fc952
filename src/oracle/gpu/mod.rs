//! wgpu backend: the tiled online-softmax passes of docs/DESIGN.md §2 as four WGSL kernels.
//!
//! Built once per dataset: device, pipelines, the dataset in chunks (`residency`):
//! resident on the device, or, when it exceeds the device-memory budget, streamed
//! through a ring of chunk-sized slots, chunk k+1 uploading while chunk k computes. A
//! call walks the requested rows in tile steps; per step
//!
//! 1. `logits`:     S = c_dot * X Y_tile^T - c_norm |y|^2          (B x Nt, scratch)
//! 2. `softmax`:    per query, new max m', rescale factor, stats (reads S, writes no P)
//! 3. `accumulate`: acc = acc * scale + exp(S - m') Y_tile         (B x D)
//!
//! The weights exp(S - m') are made by `accumulate` as it stages S (fused softmax): the
//! B x Nt tile is written once, by `logits`, never written back as P and re-read.
//!
//! and after the last step `finalize` merges the splits and divides by the softmax sum.
//!
//! Splits: on a real GPU a small batch cannot fill the device (pass 3 has only B x D
//! outputs), so the row range is cut into `splits` contiguous parts processed side by
//! side, each with its own state and accumulator; they are merged at the end with the
//! same rescale-and-add as [`SoftmaxState::merge`](crate::oracle::SoftmaxState::merge) (which merges the scalar states on the
//! host, so the statistics use the shared formulas). On a software adapter splits = 1.
//!
//! The tile steps are recorded into compute passes of at most `MAX_STEPS_PER_SUBMIT` (64)
//! steps over one chunk, one submit each: a long row range becomes several moderate
//! submissions rather than one (some platforms reset a device whose submission runs for
//! seconds). Each step is still B x tile_rows x D work, so this bounds the steps per
//! submission, not the time. All submissions are queued before waiting once for the
//! readback. A batch larger than the scratch buffers can bind runs as several sub-batches.
//!
//! Pipelining: the sub-batches of a call alternate between two sets of scratch buffers
//! (each with its own readback buffer, bind groups and timestamp queries). Sub-batch i is
//! uploaded and submitted before the host waits for sub-batch i - 1's results, so the
//! device always has the next sub-batch queued while the host unpacks the last one: it
//! never idles on the host's read-back. Sub-batch i reuses the set of i - 2, whose results
//! were read (and its readback buffer unmapped) before i - 1 was waited for. Every
//! sub-batch runs exactly the passes it ran unpipelined, on its own buffers: the results
//! are bit-identical (tests/gpu_backend.rs checks it); only the host's waits moved. The
//! cost is a second set of scratch buffers, made only for calls of several sub-batches.
//!
//! The bind groups of a call are kept with the scratch buffers they bind and reused by
//! later calls while those buffers are; a dataset buffer's groups (a resident chunk's, or
//! a ring slot's, whichever chunk it holds) are made when a call first reads it. After a
//! failed call (out of memory, say) the scratch buffers and groups are dropped and made
//! afresh by the next call, and what the ring slots hold is forgotten.
//!
//! Storage: the dataset's dtype (f16 data may be held as f32 where the device lacks
//! SHADER_F16). When the user did not choose a dtype and an f32 dataset exceeds the
//! device budget but fits in f16, [`automatic_f16`] says so before the backend is built
//! and the CLI loads the dataset again as f16 rather than the backend converting at
//! upload: loading rounds each centred value once (f64 to f16), exactly as `--dtype f16`
//! does, so both give bit-identical results, where converting the stored f32 values
//! would round twice (f64 to f32 to f16) and could differ in the last place. The
//! description then says the f16 storage was chosen automatically.
//!
//! A call of one sub-batch runs in phases, one file each:
//! - `plan`: every decision from the adapter's limits and the shapes alone (splits, tile
//!   width, steps, submissions, buffer sizes, grids), unit-tested without a device;
//! - `buffers`: the scratch buffers and bind groups it needs, reused across calls;
//! - `encode`: the uploads of the queries and parameters, then the passes and submits;
//! - `readback`: the wait for the results and their unpacking into mean and stats.
//!
//! `device` opens the adapter, `pipelines` builds the kernels and their binding layouts
//! (the table the shader validation test checks against the WGSL), `residency` holds the
//! dataset, `options` the knobs, `timing` the per-kernel timestamps (profiling:
//! `ORACLEFLOW_GPU_PROFILE=1` prints each call's, `bench` reports them), `tune` picks the
//! logits tile shape per adapter (a short measured autotune, cached on disk; the
//! accumulate shape follows from D).
//!
//! Exact pruning (`prune`, on by default, off with `--exact-dense`): for resident
//! in-memory datasets, from the first call of at most `prune::LAZY_MAX_BATCH` queries
//! (larger batches need every tile), the rows are held in the tile order of the cpu's
//! [`PruneIndex`](crate::oracle::prune::PruneIndex), and a call walks a list of row
//! ranges, the tiles some query of the batch needs (the cpu's bounds), instead of one
//! range; the plain pass is that list with one range. The certificate, the skipped shares
//! and the fallback to dense are described there.
//!
//! The kernels are register-tiled (8 x 8 outputs per thread in `logits`, 8 queries x 2 vec4
//! columns in `accumulate`) with double-buffered workgroup memory, their tile shapes WGSL
//! override constants (small batches run narrower logits pipelines of the same source, so
//! a batch of 16 does not idle most of a 128-query tile): docs/GPU_KERNELS.md gives the
//! FLOP/byte and occupancy argument.

mod buffers;
mod device;
mod encode;
mod health;
mod options;
mod pipelines;
mod plan;
mod prune;
mod readback;
mod residency;
mod timing;
pub mod tune;

use std::ops::Range;

use crate::dataset::{Dataset, Dtype};
use crate::error::{Error, Result};
use crate::oracle::prune::PruneIndex;
use crate::oracle::{Backend, CentredBatch, Partial, Posterior, QueryStats, SoftmaxState};

pub use device::{adapter_list, adapter_report, all_devices};
pub use health::{wait_limit_from_env, DEFAULT_WAIT_LIMIT, WAIT_LIMIT_ENV};
pub use options::{memory_budget_from_env, GpuOptions, MEMORY_ENV};
pub use pipelines::{
    binding_names, kernel_sources, kernel_variants, layout_entries, override_variants, AccTiles,
    BindingKind, KernelKind, LogitsTiles, Tiles, STEP_PARAMS_BYTES,
};
pub use timing::{profile_from_env, KernelTimes, ProfileLog, PROFILE_ENV};
pub use tune::{TileChoice, TileSource};

use buffers::Buffers;
use device::Gpu;
use health::Waiter;
use pipelines::Kernels;
use plan::{Limits, Plan};
use residency::Residency;
use timing::Timer;

/// The oracle posterior on a GPU through wgpu.
pub struct GpuBackend<'d> {
    /// Read by exact pruning's bounds (the seed tiles' logits, on the host).
    dataset: &'d Dataset,
    /// Exact pruning's index, when the device holds the rows in its tile order (`prune`).
    pruning: Option<PruneIndex>,
    /// Pruning may still be set up: the index is built at the first call it can serve
    /// (`prune::worth_building`), and the rows moved into its order then.
    prune_pending: bool,
    /// The device rows the last call computed when it skipped tiles (None: dense).
    last_kept: Option<Vec<Range<usize>>>,
    gpu: Gpu,
    /// What the plans read of the device's limits.
    limits: Limits,
    kernels: Kernels,
    residency: Residency,
    /// How the values are held on the device (f16 data may be held as f32).
    storage: Dtype,
    dataset_dtype: Dtype,
    n_samples: usize,
    dim: usize,
    /// vec4s per padded row
    dim4: usize,
    options: GpuOptions,
    /// Two sets of scratch buffers, alternated by the sub-batches of a call (pipelining).
    buffers: [Buffers; 2],
    /// Bounds every wait for the device (see `health`).
    waiter: Waiter,
    /// Kernels compiled without wgpu's bounds checks.
    trusted: bool,
    /// Per-kernel timestamps, one per scratch set (when profiling on a device that has
    /// them; see `timing`).
    timers: Option<[Timer; 2]>,
    /// Print each call's kernel times to stderr (`ORACLEFLOW_GPU_PROFILE=1`).
    print_profile: bool,
    /// The tile shapes the kernels were built with, and where the logits one came from.
    tile_choice: TileChoice,
}

impl<'d> GpuBackend<'d> {
    /// `hardware_only`: refuse CPU adapters (lavapipe), as `--backend auto` wants.
    pub fn new(dataset: &'d Dataset, hardware_only: bool) -> Result<Self> {
        Self::with_options(
            dataset,
            GpuOptions {
                hardware_only,
                ..Default::default()
            },
        )
    }

    pub fn with_options(dataset: &'d Dataset, mut options: GpuOptions) -> Result<Self> {
        if options.max_resident_bytes.is_none() {
            options.max_resident_bytes = options::memory_budget_from_env()?;
        }
        let want_f16 = dataset.dtype() == Dtype::F16;
        let limit = match options.wait_limit {
            Some(limit) => limit,
            None => health::wait_limit_from_env()?,
        };
        let gpu = device::open(options.hardware_only, want_f16, options.adapter)?;
        // f16 data on a device without SHADER_F16 is held as f32: exact, twice the memory.
        let storage =
            if want_f16 && !options.f16_as_f32 && gpu.features.contains(wgpu::Features::SHADER_F16)
            {
                Dtype::F16
            } else {
                Dtype::F32
            };
        let limits = Limits::new(&gpu.limits, gpu.is_cpu());
        let tile_choice = tune::choose(
            &options,
            &gpu.info,
            gpu.is_cpu(),
            storage,
            limits.workgroup_bytes,
            |t| tune::time_candidate(t, &options, dataset.dtype(), gpu.is_cpu()),
        )?;
        let tiles = Tiles::new(
            tile_choice.tiles,
            dataset.dim().div_ceil(4),
            limits.workgroup_bytes,
        );
        let limits = limits.with_tiles(tiles);
        let trusted = options.trusted_shaders.unwrap_or(!gpu.is_cpu());
        let print_profile = timing::profile_from_env();
        // No timestamps on the device: no timings, silently (not an error).
        let timers = ((print_profile || options.profile.is_some()) && gpu.has_timestamps())
            .then(|| [Timer::new(), Timer::new()]);
        let prune_pending = prune::eligible(dataset, storage, &limits, &options);
        let built = scoped(&gpu.device, || {
            let kernels = Kernels::new(&gpu.device, storage == Dtype::F16, trusted, &tiles);
            let residency = place(&gpu.device, dataset, storage, &limits, &options, None)?;
            Ok((kernels, residency))
        });
        let (kernels, residency) = built.map_err(|e| match e {
            Error::Gpu(m) => Error::Gpu(format!("{m} (setting up for {})", dataset.name)),
            e => e,
        })?;
        Ok(GpuBackend {
            dataset,
            pruning: None,
            prune_pending,
            last_kept: None,
            limits,
            kernels,
            residency,
            storage,
            dataset_dtype: dataset.dtype(),
            n_samples: dataset.n_samples(),
            dim: dataset.dim(),
            dim4: dataset.dim().div_ceil(4),
            waiter: Waiter {
                health: gpu.health.clone(),
                limit,
            },
            gpu,
            options,
            buffers: [Buffers::new(), Buffers::new()],
            trusted,
            timers,
            print_profile,
            tile_choice,
        })
    }

    /// Number of chunks the dataset is cut into (each a device buffer when resident).
    pub fn n_chunks(&self) -> usize {
        self.residency.n_chunks()
    }

    /// Destroys the device, as a driver reset or a removed GPU would lose it: lets tests
    /// check what later calls report (an error naming the loss; never a panic or a hang).
    #[doc(hidden)]
    pub fn lose_device(&self) {
        self.gpu.device.destroy();
    }

    /// The logits tile shape the kernels were built with, and where it came from.
    pub fn tile_choice(&self) -> &TileChoice {
        &self.tile_choice
    }

    /// Whether the dataset is streamed through a ring of device slots.
    pub fn is_streaming(&self) -> bool {
        self.residency.is_streaming()
    }

    /// Whether calls are timed per kernel (profiling asked for, and the device can).
    pub fn is_profiling(&self) -> bool {
        self.timers.is_some()
    }

    /// Dataset chunks uploaded to ring slots so far (streaming; 0 when resident): lets
    /// tests check that what the ring holds is not uploaded again.
    #[doc(hidden)]
    pub fn stream_uploads(&self) -> u64 {
        self.residency.uploads()
    }

    /// Whether the last call skipped tiles (false: dense, by choice or by fallback).
    pub fn last_was_pruned(&self) -> bool {
        self.last_kept.is_some()
    }

    /// The stored rows the last pruned call computed (the same for every query of its
    /// batch; empty after a dense call), for tests of the certificate.
    pub fn kept_rows(&self) -> Vec<u32> {
        match (&self.pruning, &self.last_kept) {
            (Some(index), Some(ranges)) => ranges
                .iter()
                .flat_map(|r| index.perm()[r.clone()].iter().copied())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Uploads and submits one sub-batch, queries `x` (n x D) against the device rows `rows`, on scratch
    /// set `set`, without waiting for it: [`GpuBackend::finish`] reads its results.
    fn submit(
        &mut self,
        set: usize,
        x: &[f32],
        coefs: &[[f32; 2]],
        rows: &[Range<usize>],
        queries: Range<usize>,
    ) -> Result<Submitted> {
        let residency = &mut self.residency;
        let n_queries = coefs.len();
        let chunk_rows = residency.all_chunk_rows();
        let plan = Plan::over(
            &self.limits,
            &self.options,
            n_queries,
            self.dim4,
            rows,
            &chunk_rows,
        );
        // The device buffer each chunk read is bound from: its own, or a ring slot.
        let slots = residency.buffers_of(&plan.reads);
        let (device, queue) = (&self.gpu.device, &self.gpu.queue);

        // The timestamps ride behind the results in the readback buffer.
        let mut sizes = plan.sizes;
        let mut timer = self.timers.as_mut().map(|t| &mut t[set]);
        if let Some(timer) = timer.as_deref_mut() {
            let n = encode::Passes::n_timestamps(&plan);
            timer.prepare(device, n);
            sizes.readback += Timer::bytes(n);
        }
        let buffers = &mut self.buffers[set];
        let bufs = buffers.for_call(device, &self.limits, &sizes);
        encode::upload(queue, &bufs, &plan, x, self.dim, coefs);
        let groups = buffers.groups(device, &self.kernels, residency, &bufs, &slots);
        let passes = encode::Passes {
            device,
            queue,
            kernels: &self.kernels,
            groups,
            bufs: &bufs,
            plan: &plan,
            slots: &slots,
            waiter: &self.waiter,
        };
        let last = passes.submit(residency, timer)?;
        Ok(Submitted {
            set,
            queries,
            last,
            readback: bufs.readback,
            readback_bytes: sizes.readback,
            plan,
        })
    }

    /// Waits for the sub-batch `done` and reads its results: writes its n x D of `mean`
    /// (the call's whole mean) and pushes its n stats; returns its kernel times when timed.
    fn finish(
        &self,
        done: Submitted,
        mean: &mut [f32],
        stats: &mut Vec<QueryStats>,
        states: Option<&mut Vec<(SoftmaxState, f32)>>,
    ) -> Result<Option<KernelTimes>> {
        let dim = self.dim;
        let mean = &mut mean[done.queries.start * dim..done.queries.end * dim];
        let timer = self.timers.as_ref().map(|t| &t[done.set]);
        let period = self.gpu.queue.get_timestamp_period();
        let mut times = None;
        readback::read_back(
            &self.gpu.device,
            &self.waiter,
            &done.readback,
            done.readback_bytes,
            Some(done.last),
            |bytes| {
                let plan = &done.plan;
                let (results, stamps) = bytes.split_at(plan.sizes.readback as usize);
                readback::unpack(results, plan, dim, mean, stats, states);
                times = timer.map(|t| t.times(&readback::pod_slice::<u64>(stamps), period));
            },
        )?;
        Ok(times)
    }
}

/// A sub-batch submitted and not yet read back.
struct Submitted {
    /// Its scratch set.
    set: usize,
    /// Its queries in the call.
    queries: Range<usize>,
    /// The submission that copies its results to `readback`.
    last: wgpu::SubmissionIndex,
    readback: wgpu::Buffer,
    readback_bytes: u64,
    plan: Plan,
}

/// Whether an f32 dataset should be stored as f16 on the GPU `options` open, when the
/// user did not choose: Some(why, one line) when its f32 copy exceeds the device budget
/// (see `options`) while its f16 copy fits and the device has SHADER_F16; None otherwise
/// (f16 already, fits in f32, or would stream anyway). Opens the adapter, not a device.
pub fn automatic_f16(dataset: &Dataset, options: &GpuOptions) -> Result<Option<String>> {
    if dataset.dtype() != Dtype::F32 {
        return Ok(None);
    }
    let Some((limits, has_f16)) = device::adapter_limits(options)? else {
        // No adapter: the backend's own error (or auto's fallback) comes later.
        return Ok(None);
    };
    let mut options = options.clone();
    if options.max_resident_bytes.is_none() {
        options.max_resident_bytes = options::memory_budget_from_env()?;
    }
    let budget = plan::dataset_budget(&limits, &options);
    let f32_bytes = residency::resident_bytes(dataset, Dtype::F32);
    let f16_bytes = residency::resident_bytes(dataset, Dtype::F16);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(
        (has_f16 && !options.f16_as_f32 && f32_bytes > budget && f16_bytes <= budget).then(|| {
            format!(
                "gpu: storing {} as f16: in f32 it would take {:.1} MiB, over the device budget \
             of {:.1} MiB, and fits in f16 ({:.1} MiB); --dtype f32 keeps f32 (streamed)",
                dataset.name,
                mib(f32_bytes),
                mib(budget),
                mib(f16_bytes)
            )
        }),
    )
}

/// Puts the dataset on the device: resident, or streamed through a ring of slots when it
/// exceeds the budget.
fn place(
    device: &wgpu::Device,
    dataset: &Dataset,
    storage: Dtype,
    limits: &Limits,
    options: &GpuOptions,
    order: Option<&[u32]>,
) -> Result<Residency> {
    let chunk_cap = plan::chunk_cap(limits, options);
    let budget = plan::dataset_budget(limits, options);
    Ok(if residency::resident_bytes(dataset, storage) > budget {
        Residency::Streaming(residency::stream(
            device, dataset, storage, chunk_cap, budget,
        )?)
    } else {
        Residency::Resident(residency::upload(
            device, dataset, storage, chunk_cap, order,
        )?)
    })
}

/// Runs `f` with wgpu's validation and out-of-memory errors turned into `Err` (by
/// default wgpu panics on them).
fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    match (validation.or(oom), out) {
        (Some(e), _) => Err(Error::Gpu(e.to_string())),
        (None, out) => out,
    }
}

impl Backend for GpuBackend<'_> {
    /// The device's normalised mean as it is; with pruning, the statistics carry the
    /// certificate and skipped shares (`prune::finish_stats`).
    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior> {
        let pruned = self.prune_plan(batch);
        let mut states = Vec::with_capacity(batch.logit_coefs.len());
        let mut post = self.evaluate(batch, pruned.as_ref(), Some(&mut states))?;
        if let Some(p) = &pruned {
            prune::finish_stats(p, &states, &mut post.stats);
        }
        Ok(post)
    }

    /// The device normalises in its finalize pass; the state is rebuilt from the merged
    /// split states read back beside the mean: acc = mean * l (one rounding per value).
    fn partial(&mut self, batch: &CentredBatch<'_>) -> Result<Partial> {
        let pruned = self.prune_plan(batch);
        let mut states = Vec::with_capacity(batch.logit_coefs.len());
        let post = self.evaluate(batch, pruned.as_ref(), Some(&mut states))?;
        let dim = self.dim;
        let mut acc = post.mean;
        for (q, (state, _)) in states.iter().enumerate() {
            acc[q * dim..(q + 1) * dim]
                .iter_mut()
                .for_each(|v| *v *= state.sum);
        }
        let (st, sum_norm): (Vec<SoftmaxState>, Vec<f32>) = states.into_iter().unzip();
        let mut part = Partial::dense(
            dim,
            st,
            acc,
            sum_norm,
            batch.rows.len(),
            crate::oracle::prune::LEAF_ROWS,
        );
        if let Some(p) = &pruned {
            prune::fill_partial(p, &mut part);
        }
        Ok(part)
    }

    fn describe(&self) -> String {
        self.description()
    }
}

impl GpuBackend<'_> {
    /// The tiles exact pruning keeps for `batch`, or `None` for the dense pass (pruning
    /// off or unavailable, or bounds too loose: see `prune::plan`).
    fn prune_plan(&mut self, batch: &CentredBatch<'_>) -> Option<prune::PrunedRows> {
        self.last_kept = None;
        if self.prune_pending && prune::worth_building(batch) {
            self.prune_pending = false;
            self.set_up_pruning();
        }
        let index = self.pruning.as_ref()?;
        if batch.rows.is_empty() || batch.rows.end > self.n_samples {
            return None;
        }
        let plan = prune::plan(self.dataset, index, batch);
        self.last_kept = plan.as_ref().map(|p| p.ranges.clone());
        plan
    }

    /// Builds the pruning index and moves the device rows into its tile order; on any
    /// failure (no low-dimensional structure, or the upload) the backend stays dense as
    /// it was.
    fn set_up_pruning(&mut self) {
        let Some(index) = PruneIndex::build(self.dataset) else {
            return;
        };
        let device = self.gpu.device.clone();
        let placed = scoped(&device, || {
            place(
                &device,
                self.dataset,
                self.storage,
                &self.limits,
                &self.options,
                Some(index.perm()),
            )
        });
        if let Ok(residency) = placed {
            self.residency = residency;
            // The cached bind groups name the old dataset buffers.
            self.buffers = [Buffers::new(), Buffers::new()];
            self.pruning = Some(index);
        }
    }

    /// Evaluates `batch` over its rows, or over the kept tiles of `pruned`; argmax
    /// indices come back as stored rows.
    fn evaluate(
        &mut self,
        batch: &CentredBatch<'_>,
        pruned: Option<&prune::PrunedRows>,
        mut states: Option<&mut Vec<(SoftmaxState, f32)>>,
    ) -> Result<Posterior> {
        let n_queries = batch.logit_coefs.len();
        let dim = self.dim;
        if batch.x.len() != n_queries * dim {
            return Err(Error::Input(format!(
                "{} query values for {n_queries} queries of {dim} values",
                batch.x.len()
            )));
        }
        let rows = batch.rows.clone();
        if rows.is_empty() || rows.end > self.n_samples {
            return Err(Error::Input(format!(
                "rows {rows:?} are empty or outside the {} samples",
                self.n_samples
            )));
        }
        // A lost device fails every call the same way, before any work is queued.
        self.waiter.health.check()?;
        // The device rows to walk: the stored rows themselves, or their positions in the
        // tile order when the device holds that order (pruned: only the kept tiles').
        let ranges = match (&self.pruning, pruned) {
            (_, Some(p)) => p.ranges.clone(),
            (Some(index), None) => prune::dense_ranges(index, &rows),
            (None, None) => vec![rows.clone()],
        };
        let first_state = states.as_ref().map_or(0, |s| s.len());
        let start = std::time::Instant::now();
        let mut times: Option<KernelTimes> = None;
        let mut mean = vec![0.0f32; n_queries * dim];
        let mut stats = Vec::with_capacity(n_queries);
        let most = plan::max_sub_batch(&self.limits, self.dim4, self.options.max_sub_batch);
        let subs: Vec<Range<usize>> = plan::sub_batches(n_queries, most).collect();
        let device = self.gpu.device.clone();
        // Sub-batch i is submitted before sub-batch i - 1 is read back (see the module
        // docs); the last iteration submits nothing and reads the last sub-batch.
        let mut pending: Option<Submitted> = None;
        // Host time in submits and in waits with readbacks (for the profile).
        let (mut submit_ms, mut wait_ms) = (0.0, 0.0);
        let ms_since = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        for i in 0..=subs.len() {
            let done = scoped(&device, || {
                let clock = std::time::Instant::now();
                let submitted = match subs.get(i) {
                    Some(q) => Some(self.submit(
                        i % 2,
                        &batch.x[q.start * dim..q.end * dim],
                        &batch.logit_coefs[q.clone()],
                        &ranges,
                        q.clone(),
                    )?),
                    None => None,
                };
                submit_ms += ms_since(clock);
                let clock = std::time::Instant::now();
                let read = match pending.take() {
                    Some(p) => self.finish(p, &mut mean, &mut stats, states.as_deref_mut())?,
                    None => None,
                };
                wait_ms += ms_since(clock);
                Ok((submitted, read))
            });
            match done {
                Ok((submitted, read)) => {
                    pending = submitted;
                    if let Some(t) = read {
                        times
                            .get_or_insert_with(KernelTimes::default)
                            .add_kernels(&t);
                    }
                }
                Err(e) => {
                    // A buffer whose creation failed is unusable: start afresh next call;
                    // what the ring slots hold is unknown.
                    self.buffers = [Buffers::new(), Buffers::new()];
                    self.residency.invalidate();
                    // Errors of a lost device's calls are its consequences: name the cause.
                    self.waiter.health.check()?;
                    return Err(e);
                }
            }
        }
        if let Some(mut t) = times {
            t.wall_ms = ms_since(start);
            t.submit_ms = submit_ms;
            t.wait_ms = wait_ms;
            if self.print_profile {
                eprintln!("gpu profile: B = {n_queries}, rows {rows:?}: {}", t.line());
            }
            if let Some(log) = &self.options.profile {
                log.push(t);
            }
        }
        if let Some(index) = &self.pruning {
            prune::map_argmax(
                index,
                &rows,
                batch.logit_coefs,
                &mut stats,
                states,
                first_state,
            );
        }
        Ok(Posterior { mean, stats })
    }

    fn description(&self) -> String {
        let storage = match (self.dataset_dtype, self.storage) {
            (Dtype::F16, Dtype::F32) => "f16 data held as f32".to_string(),
            (_, Dtype::F16) => match &self.options.storage_reason {
                Some(_) => {
                    "f16 storage (chosen automatically: f32 exceeds the device budget)".to_string()
                }
                None => "f16 storage".to_string(),
            },
            (_, Dtype::F32) => "f32 storage".to_string(),
        };
        let n = self.residency.n_chunks();
        let streaming = if self.residency.is_streaming() {
            format!(
                ", streaming through {} device slot{}{}",
                self.residency.n_buffers(),
                if self.residency.n_buffers() == 1 {
                    ""
                } else {
                    "s"
                },
                if self.residency.refills_from_disk() {
                    " refilled from disk"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        };
        let mode = prune::describe(
            self.pruning.as_ref(),
            self.prune_pending,
            &self.options,
            self.dataset,
        );
        format!(
            "gpu: {} ({:?}, {:?}), {storage}{}, {n} chunk{}{streaming}, {mode}",
            self.gpu.info.name,
            self.gpu.info.backend,
            self.gpu.info.device_type,
            if self.trusted {
                ", unchecked shaders"
            } else {
                ""
            },
            if n == 1 { "" } else { "s" }
        ) + &format!(
            "; {}, accumulate tiles {} columns x {} queries",
            self.tile_choice,
            self.limits.tiles.acc.columns(),
            self.limits.tiles.acc.queries()
        )
    }
}
