//! Native CPU backend: f32, multi-threaded, the two GEMMs from the `gemm` crate.
//!
//! Same algorithm as the GPU kernels: stream the dataset in tiles of `TILE_ROWS` rows;
//! per tile, logits S = X * Y_tile^T (one GEMM), online-softmax update per query,
//! acc = acc * scale + P * Y_tile (second GEMM). Work is split into (query group,
//! row block) tasks for rayon; row blocks of one query group are merged with the same
//! rescale-and-add as tiles ([`SoftmaxState::merge`]).
//!
//! Which library runs the two GEMMs (the `gemm` crate, faer, an OpenBLAS found at run
//! time, or this crate's AVX-512 kernels, [`native`]) and how many rows a tile has is chosen per machine by a short measured autotune
//! ([`tune`]), cached on disk; `ORACLEFLOW_CPU_GEMM` forces a choice. Weights below the
//! f32 normal range are flushed to 0 before they reach a GEMM: subnormal operands slow
//! some CPUs' FMA units by two orders of magnitude (measured: numpy 170x on Sapphire
//! Rapids), and such weights are below 2^-126 of the largest one, far below f32 rounding
//! of the normaliser. (`exp_nonpositive` already returns 0 below e^-87; the flush keeps
//! the guarantee whatever computes the weights, and also covers the rescaled
//! accumulator, the GEMM's addend.)

mod blas;
pub mod native;
pub mod tune;

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::dataset::{Dataset, Values};
use crate::error::Result;
use crate::oracle::partial::Partial as PartialState;
use crate::oracle::prune::{self, PruneIndex};
use crate::oracle::simd::multiversion;
use crate::oracle::{Backend, CentredBatch, Posterior, SoftmaxState};

pub use tune::{GemmLib, GemmPlan};

/// Dataset rows per tile when nothing else is chosen: S (B x 256) and the tile (256 x D)
/// stay cache-sized.
pub const TILE_ROWS: usize = 256;
/// Fewest queries worth a task of their own: each GEMM call packs its dataset tile, so the
/// more queries share a call the less packing per FLOP (measured on 2 threads, B = 256:
/// 256 instead of 64 gives about 5% more throughput on every library).
const MIN_QUERY_GROUP: usize = 256;
/// Most f32 values held in partial accumulators at once (1 GiB).
const ACC_BUDGET_FLOATS: usize = 1 << 28;

/// Settings of the CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuOptions {
    /// Exact pruning (see [`crate::oracle::prune`]); false keeps the plain dense pass
    /// (`--exact-dense`). Either way the result is the f32 oracle to within rounding.
    pub prune: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions { prune: true }
    }
}

pub struct CpuBackend<'d> {
    dataset: &'d Dataset,
    threads: usize,
    options: CpuOptions,
    /// Built at the first call that can use it (once per backend, so once per dataset
    /// and run); `Some(None)` when the data has no structure for the bounds (always
    /// dense), which the first call of at least `MIN_PRUNE_ROWS` rows finds out.
    index: Option<Option<PruneIndex>>,
    /// The structure test's basis, from that first call until the index is built from it.
    structure: Option<prune::Structure>,
    record_kept: bool,
    kept: Vec<Vec<u32>>,
    last_pass: Pass,
    /// the last sparse call's logits, for the next one's screening (`prune::sparse::Carry`)
    carry: Option<prune::sparse::Carry>,
    /// the sparse pass's logit buffers, kept from call to call
    buffers: prune::sparse::Buffers,
    /// earlier calls' products for anchored screening (`prune::anchor`), forgotten at
    /// every dense or uniform call (a new trajectory, or its navigation stage)
    anchors: prune::anchor::Anchors,
    /// whether calls may use and record anchors (ORACLEFLOW_PRUNE_ANCHOR=0 or
    /// [`Self::set_anchored`] turn them off)
    anchored: bool,
    /// the kept-share estimate's sample rows, kept from call to call
    estimate: prune::sparse::EstimateRows,
    /// GEMM library and tile rows of the dense pass; None: this machine's tuned choice.
    plan: Option<GemmPlan>,
    /// The last row range's sums for calls where every logit is 0 (see [`uniform_pass`]).
    uniform: Option<UniformSums>,
}

impl<'d> CpuBackend<'d> {
    pub fn new(dataset: &'d Dataset) -> Self {
        Self::with_options(dataset, CpuOptions::default())
    }

    pub fn with_options(dataset: &'d Dataset, options: CpuOptions) -> Self {
        CpuBackend {
            dataset,
            threads: rayon::current_num_threads(),
            options,
            index: None,
            structure: None,
            record_kept: false,
            kept: Vec::new(),
            last_pass: Pass::Dense,
            carry: None,
            buffers: Default::default(),
            anchors: Default::default(),
            anchored: prune::anchor::enabled(),
            estimate: Default::default(),
            plan: None,
            uniform: None,
        }
    }

    /// Runs the dense pass with this GEMM library and tile size instead of the tuned one
    /// (tests and benchmarks of each variant).
    pub fn set_gemm_plan(&mut self, plan: GemmPlan) {
        self.plan = Some(plan);
    }

    /// The GEMM library and tile size the dense pass uses.
    pub fn gemm_plan(&self) -> GemmPlan {
        self.plan.unwrap_or_else(|| tune::tuning().plan)
    }

    pub fn options(&self) -> CpuOptions {
        self.options
    }

    /// Builds the pruning index now (else the first pruned call does); returns its tile
    /// count, or `None` when the data gives the bounds nothing to use (then dense runs).
    pub fn prepare(&mut self) -> Option<usize> {
        if self.dataset.disk().is_some() {
            return None; // streamed from disk: always dense (see oracle::stream)
        }
        let (ds, structure) = (self.dataset, &mut self.structure);
        self.index
            .get_or_insert_with(|| {
                let index = match structure.take() {
                    Some(s) => Some(PruneIndex::build_from(ds, s)),
                    None => PruneIndex::build(ds),
                };
                // The rows in tile order, copied here on both threads: built inside the
                // first pass's tasks, the one that waits for it would leave the copy to
                // one thread (0.1 s on Fashion-MNIST).
                if let Some(i) = &index {
                    i.tiled_rows(ds);
                }
                index
            })
            .as_ref()
            .map(|i| i.n_tiles())
    }

    /// Keep, per query of each call, the stored rows it accumulated (tests; the projected
    /// passes keep them anyway, for the late-t refinement: `Backend::kept_candidates`).
    pub fn record_kept_rows(&mut self, on: bool) {
        self.record_kept = on;
    }

    /// Rows recorded by the last pruned call (empty after a dense one).
    pub fn kept_rows(&self) -> &[Vec<u32>] {
        &self.kept
    }

    /// Whether the last call was pruned (false: it fell back to the dense pass).
    pub fn last_was_pruned(&self) -> bool {
        self.last_pass != Pass::Dense
    }

    /// Whether calls may screen with anchors (`prune::anchor`; on by default, unless
    /// ORACLEFLOW_PRUNE_ANCHOR=0). Anchored calls give the dense result to within
    /// rounding, but which pairs they compute, hence the bits, can depend on the calls
    /// since the trajectory's start (its t = 0 or first dense call, where every anchor is
    /// forgotten); off, a call's bits depend on its own queries alone.
    pub fn set_anchored(&mut self, on: bool) {
        self.anchored = on;
        self.anchors.clear();
    }

    /// Which pass the last call ran.
    pub fn last_pass(&self) -> Pass {
        self.last_pass
    }

    /// The kept-share estimate remembered by the anchor that serves `batch`, where it
    /// stands for this call's (`prune::anchor::Anchor::remembered_share`).
    fn remembered_share(&self, batch: &CentredBatch<'_>) -> Option<f64> {
        let index = self.index.as_ref()?.as_ref()?;
        let positions = index.positions_for(&batch.rows)?;
        let n_q = batch.logit_coefs.len();
        let anchor = self
            .anchored
            .then(|| self.anchors.find(&positions, n_q))??;
        anchor.remembered_share(batch)
    }
}

/// The pass a pruning backend chose for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// every logit and every weight (early t, unstructured data, `--exact-dense`)
    Dense,
    /// logits skipped by bound (`prune::partial`), the rest accumulated sparsely
    Bounds,
    /// every logit, the weighted sum over the weights that can reach f32 (`prune::sparse`)
    Sparse,
    /// the sparse pass with its logits screened in reduced precision first (bf16 or
    /// int16, `prune::lowp`)
    SparseScreened,
    /// the sparse pass screened by the last sparse call's logits (`prune::sparse::Carry`)
    SparseCarried,
    /// per-sample bounds of every pair by projection GEMMs, f32 logits only where they
    /// cannot rule a pair out (`prune::projected`)
    Projected,
    /// the sparse pass screened by an earlier call's products (`prune::anchor`)
    SparseAnchored,
    /// the projected pass's sweep with bounds from an earlier call's products
    /// (`prune::anchor`)
    ProjectedAnchored,
}

/// Partial result of one task: states and weighted sums (not yet normalised).
pub(crate) struct Partial {
    pub(crate) states: Vec<SoftmaxState>,
    pub(crate) acc: Vec<f32>,
    /// Per query: sum_i e_i |y_i|^2, on the same scale as the state's sum (for the
    /// posterior variance).
    pub(crate) sum_norm: Vec<f32>,
}

impl Backend for CpuBackend<'_> {
    fn kept_candidates(&self) -> Option<&[Vec<u32>]> {
        // The projected passes record every call (few rows a query); the others only
        // for tests.
        matches!(self.last_pass, Pass::Projected | Pass::ProjectedAnchored)
            .then_some(self.kept.as_slice())
    }

    fn describe(&self) -> String {
        let mode = if let Some(disk) = self.dataset.disk() {
            crate::oracle::stream::describe(disk)
        } else if matches!(self.index, Some(None)) {
            "exact pruning off: no low-dimensional structure for its bounds, dense".to_string()
        } else if self.options.prune {
            format!(
                "exact pruning ({}-row tiles, {}-d projection bounds)",
                prune::LEAF_ROWS,
                prune::PROJ_DIMS.min(self.dataset.dim())
            )
        } else {
            "exact dense".to_string()
        };
        format!(
            "cpu: {} threads, {}, {:?} storage, {mode}",
            self.threads,
            self.gemm_plan(),
            self.dataset.dtype()
        )
    }

    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior> {
        Ok(self.partial(batch)?.finish())
    }

    fn forget_history(&mut self) {
        self.anchors.clear();
        self.carry = None;
    }

    fn partial(&mut self, batch: &CentredBatch<'_>) -> Result<PartialState> {
        self.last_pass = Pass::Dense;
        self.kept.clear();
        if let Some(disk) = self.dataset.disk() {
            return crate::oracle::stream::partial(
                disk,
                self.dataset,
                batch,
                self.threads,
                self.gemm_plan(),
            );
        }
        // At t = 0 (alpha = 0) every logit is 0: the posterior is the uniform average of
        // the rows, the same for every query, whatever the queries are (both modes: it
        // prunes nothing, and `--exact-dense` then gives the same samples bit for bit).
        if batch
            .logit_coefs
            .iter()
            .all(|&[c_dot, c_norm]| c_dot == 0.0 && c_norm == 0.0)
        {
            self.anchors.clear();
            return Ok(uniform_pass(self.dataset, batch, &mut self.uniform));
        }
        let prunable = self.options.prune && batch.rows.len() >= prune::MIN_PRUNE_ROWS;
        // The first such call tests the data's structure (the index's basis, about 1% of
        // a dense evaluation); data without any is dense from then on, skipping the
        // estimate below.
        if prunable && self.index.is_none() && self.structure.is_none() {
            match prune::Structure::test(self.dataset) {
                Some(s) => self.structure = Some(s),
                None => self.index = Some(None),
            }
        }
        let unstructured = matches!(self.index, Some(None));
        if prunable && !unstructured {
            // Early in a trajectory the weights are spread over most samples: neither the
            // bounds nor the sparse pass can save anything, and the plain pass runs having
            // spent only the estimate; the index is built at the first call that can use
            // it (a single early evaluation never pays for it).
            // (Late in a trajectory the anchor remembers the estimate of its last call.)
            let remembered = self.remembered_share(batch);
            let mut share = remembered.unwrap_or_else(|| {
                prune::sparse::kept_share(self.dataset, batch, &mut self.estimate)
            });
            if prune::profiling() {
                let how = if remembered.is_some() {
                    " (remembered)"
                } else {
                    ""
                };
                eprintln!("prune: est. kept share {share:.5}{how}");
            }
            if share > prune::sparse::sparse_max_share() {
                self.anchors.clear();
                return Ok(dense_pass(
                    self.dataset,
                    batch,
                    self.threads,
                    self.gemm_plan(),
                ));
            }
            self.prepare();
            let lib = self.gemm_plan().lib;
            if let Some(Some(index)) = &self.index {
                use prune::sparse::Screen;
                // Rows that are no union of the index's tiles (a shard's) run dense.
                if let Some(setup) = prune::sparse::Setup::new(index, batch) {
                    let inputs = prune::sparse::PassInputs {
                        ds: self.dataset,
                        index,
                        batch,
                        setup: &setup,
                        threads: self.threads,
                        lib,
                    };
                    // An earlier call of this trajectory left its products: they screen
                    // this call with the noise taken out (`prune::anchor`).
                    let n_q = batch.logit_coefs.len();
                    let anchor = self
                        .anchored
                        .then(|| self.anchors.find(&setup.positions(), n_q))
                        .flatten();
                    if let Some(anchor) = anchor {
                        // Few weights count: the projected pass's sweep with anchored
                        // bounds (it gives the call up where they let too many through).
                        if share <= prune::anchor::projected_max_share() {
                            // (Always recorded: the late-t refinement's candidates.)
                            let kept = Some(&mut self.kept);
                            let part =
                                prune::projected::partial(inputs, share, kept, Some(anchor), None);
                            if let Some(part) = part {
                                anchor.remember_share(share, batch);
                                self.last_pass = Pass::ProjectedAnchored;
                                return Ok(part);
                            }
                        }
                        // Declined (the anchor went stale, say): the other passes choose
                        // by this call's own estimate.
                        if remembered.is_some() {
                            share =
                                prune::sparse::kept_share(self.dataset, batch, &mut self.estimate);
                        }
                        // (An anchor the projected pass found stale serves no pass.)
                        let kept = self.record_kept.then_some(&mut self.kept);
                        let part = (!anchor.is_stale())
                            .then(|| {
                                prune::sparse::partial(
                                    inputs,
                                    prune::sparse::Screen::Anchored,
                                    &mut self.carry,
                                    &mut self.buffers,
                                    kept,
                                    prune::sparse::AnchorUse::Read(anchor),
                                )
                            })
                            .flatten();
                        if let Some(part) = part {
                            self.last_pass = Pass::SparseAnchored;
                            return Ok(part);
                        }
                    }
                    // Opt-in (ORACLEFLOW_PRUNE_CARRY=1): the last sparse call's logits, where
                    // they bound this call's closely (the first evaluation of a Heun step,
                    // next to the last step's second), screen it without any dot product:
                    // then the sparse pass is the cheaper one and the bounds' probe is
                    // skipped. Else screening in bf16 or int16 where few weights are kept
                    // (it computes in f32 every pair its slack cannot rule out) and the slack
                    // is small.
                    let carried = prune::sparse::carry_applies(
                        self.carry.as_ref(),
                        &setup,
                        batch,
                        self.threads,
                    );
                    // The screening kernel, where the sparse pass screens.
                    let kernel = (!carried)
                        .then(|| {
                            prune::sparse::screening(self.dataset, index, &setup, batch, share)
                        })
                        .flatten();
                    let screen = match (carried, kernel) {
                        (true, _) => Screen::Carried,
                        (false, Some(_)) => Screen::Reduced,
                        (false, None) => Screen::F32,
                    };
                    // Few weights count: per-sample bounds of every pair from projection
                    // GEMMs (the bounds' probe runs only where this declines: a query that
                    // cannot be pruned, or bounds that let through too many pairs).
                    if screen != Screen::Carried
                        && share <= prune::projected::max_share(kernel)
                        && prune::projected::enabled()
                    {
                        let kept = Some(&mut self.kept);
                        // (A stale anchor's remembered rows still seed the lower bounds.)
                        let seeds = self
                            .anchored
                            .then(|| self.anchors.find_any(&setup.positions(), n_q))
                            .flatten();
                        if let Some(part) =
                            prune::projected::partial(inputs, share, kept, None, seeds)
                        {
                            self.last_pass = Pass::Projected;
                            return Ok(part);
                        }
                    }
                    let kept = self.record_kept.then_some(&mut self.kept);
                    if screen != Screen::Carried && share <= prune::PROBE_MAX_SHARE {
                        let switch = if kernel == Some(prune::lowp::Kind::Bf16) {
                            prune::DENSE_SWITCH_BF16
                        } else {
                            prune::DENSE_SWITCH
                        };
                        if let Some(part) =
                            prune::partial(self.dataset, index, batch, self.threads, switch, kept)
                        {
                            self.last_pass = Pass::Bounds;
                            return Ok(part);
                        }
                    }
                    // The bounds are too loose to skip logits: all of them exact, the
                    // weighted sum over the weights that can reach an f32 result.
                    let kept = self.record_kept.then_some(&mut self.kept);
                    let mut recorded = None;
                    let anchors = if self.anchored {
                        prune::sparse::AnchorUse::Record(&mut recorded)
                    } else {
                        prune::sparse::AnchorUse::None
                    };
                    let part = prune::sparse::partial(
                        inputs,
                        screen,
                        &mut self.carry,
                        &mut self.buffers,
                        kept,
                        anchors,
                    );
                    if let Some(a) = recorded {
                        self.anchors.insert(a);
                    }
                    if let Some(part) = part {
                        self.last_pass = match screen {
                            Screen::Carried => Pass::SparseCarried,
                            Screen::Reduced => Pass::SparseScreened,
                            Screen::F32 => Pass::Sparse,
                            Screen::Anchored => Pass::SparseAnchored,
                        };
                        return Ok(part);
                    }
                }
            }
        }
        // The plain pass over every row (also the fallback when bounds cannot prune).
        Ok(dense_pass(
            self.dataset,
            batch,
            self.threads,
            self.gemm_plan(),
        ))
    }
}

/// The sum of a row range's rows and of their squared norms (f64 sums rounded once).
pub(crate) struct UniformSums {
    rows: Range<usize>,
    sum: Vec<f32>,
    sum_norm: f32,
}

/// Rows per chunk of [`uniform_pass`]'s sums: fixed, so that the sums are the same bits
/// whatever the thread count.
const UNIFORM_CHUNK: usize = 4096;

/// The pass where every logit is 0 (t = 0): each query's state is n weights of 1 (the
/// first row its top-1, as the dense pass's first maximum), its sum the rows' sum. That
/// sum and the norms' are computed once per row range, in f64 (the dense pass's f32 GEMM
/// tiles give the same to within their rounding), and kept in `cache`. O(N D) once, then
/// O(B D) per call, instead of two GEMMs.
pub(crate) fn uniform_pass(
    ds: &Dataset,
    batch: &CentredBatch<'_>,
    cache: &mut Option<UniformSums>,
) -> PartialState {
    let (dim, rows) = (ds.dim(), batch.rows.clone());
    if cache.as_ref().is_none_or(|c| c.rows != rows) {
        let starts: Vec<usize> = rows.clone().step_by(UNIFORM_CHUNK).collect();
        let parts: Vec<(Vec<f64>, f64)> = starts
            .par_iter()
            .map(|&start| {
                let chunk = start..(start + UNIFORM_CHUNK).min(rows.end);
                let mut scratch = Vec::new();
                let y = stored_rows_f32(ds, chunk.clone(), &mut scratch);
                let mut sum = vec![0.0f64; dim];
                for row in y.chunks_exact(dim) {
                    sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                }
                let norms = ds.sq_norms()[chunk].iter().map(|&v| v as f64).sum();
                (sum, norms)
            })
            .collect();
        let mut sum = vec![0.0f64; dim];
        let mut sum_norm = 0.0f64;
        for (s, n) in parts {
            sum.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
            sum_norm += n;
        }
        *cache = Some(UniformSums {
            rows: rows.clone(),
            sum: sum.into_iter().map(|v| v as f32).collect(),
            sum_norm: sum_norm as f32,
        });
    }
    let c = cache.as_ref().expect("just filled");
    let n_q = batch.logit_coefs.len();
    let n = rows.len() as f32;
    let state = SoftmaxState {
        max: 0.0,
        sum: n,
        sum_shifted_logit: 0.0,
        sum_sq: n,
        argmax: rows.start as u32,
    };
    let states = if rows.is_empty() {
        vec![SoftmaxState::EMPTY; n_q]
    } else {
        vec![state; n_q]
    };
    let acc: Vec<f32> = (0..n_q).flat_map(|_| c.sum.iter().copied()).collect();
    let sum_norm = vec![c.sum_norm; n_q];
    PartialState::dense(dim, states, acc, sum_norm, rows.len(), prune::LEAF_ROWS)
}

/// The dense pass over `batch.rows` on `threads` tasks with `plan`'s GEMMs and tiles.
pub(crate) fn dense_pass(
    ds: &Dataset,
    batch: &CentredBatch<'_>,
    threads: usize,
    plan: GemmPlan,
) -> PartialState {
    let tile_rows = plan.tile_rows.max(1);
    let dim = ds.dim();
    let n_queries = batch.logit_coefs.len();
    let rows = batch.rows.clone();

    let query_groups = query_groups(n_queries, threads);
    let n_tiles = rows.len().div_ceil(tile_rows);
    // Row blocks depend on the rows and the thread count, not on the batch, so a query's
    // result is bitwise the same whatever batch it arrives in (capped only when the
    // per-block accumulators of a huge batch would exceed ACC_BUDGET_FLOATS).
    let budget_blocks = (ACC_BUDGET_FLOATS / (n_queries * dim).max(1)).max(1);
    let row_blocks = threads.min(n_tiles).min(budget_blocks).max(1);
    let tiles_per_block = n_tiles.div_ceil(row_blocks);
    let row_ranges: Vec<Range<usize>> = (0..row_blocks)
        .map(|b| {
            let start = rows.start + b * tiles_per_block * tile_rows;
            start.min(rows.end)..(start + tiles_per_block * tile_rows).min(rows.end)
        })
        .filter(|r| !r.is_empty())
        .collect();

    let partials = run_tasks(ds, batch, &query_groups, &row_ranges, plan);
    // Merge the row blocks of each query group, in row order (normalised by the caller).
    let mut merged = Partial::empty(n_queries, dim);
    merged.absorb(&query_groups, &partials, 0);
    let Partial {
        states,
        acc,
        sum_norm: sum_norms,
    } = merged;
    PartialState::dense(dim, states, acc, sum_norms, rows.len(), prune::LEAF_ROWS)
}

/// Sets weights below the f32 normal range (2^-126) to 0 so that no subnormal operand
/// reaches the GEMM; weights are exp(s - max) >= 0.
#[inline]
pub fn flush_subnormal_weights(weights: &mut [f32]) {
    for w in weights {
        *w = flushed(*w);
    }
}

/// One weight as [`flush_subnormal_weights`] leaves it (a select, so that loops vectorize).
#[inline(always)]
fn flushed(w: f32) -> f32 {
    if w < f32::MIN_POSITIVE {
        0.0
    } else {
        w
    }
}

multiversion! {
    /// A row of the GEMM's dot products x.y turned into logits c_dot x.y - c_norm |y|^2
    /// (`norms` the rows' |y|^2).
    pub(crate) fn to_logits(row: &mut [f32], norms: &[f32], coefs: [f32; 2]) = to_logits_body;
}

#[inline(always)]
fn to_logits_body(row: &mut [f32], norms: &[f32], [c_dot, c_norm]: [f32; 2]) {
    for (v, &n) in row.iter_mut().zip(norms) {
        *v = c_dot * *v - c_norm * n;
    }
}

multiversion! {
    /// [`flush_subnormal_weights`], returning sum e_j |y_j|^2 over the row's weights
    /// (`norms` the rows' |y|^2), summed in 16 lanes.
    fn flush_and_weigh_norms(weights: &mut [f32], norms: &[f32]) -> f32 = flush_and_norm_body;
}

#[inline(always)]
fn flush_and_norm_body(weights: &mut [f32], norms: &[f32]) -> f32 {
    // Whole blocks of 16 (one vector each), then the rest.
    const LANES: usize = 16;
    let mut lanes = [0.0f32; LANES];
    let norms = &norms[..weights.len()];
    let mut w = weights.chunks_exact_mut(LANES);
    let mut n = norms.chunks_exact(LANES);
    for (w, n) in (&mut w).zip(&mut n) {
        for w in w.iter_mut() {
            *w = flushed(*w);
        }
        for ((s, &w), &n) in lanes.iter_mut().zip(w.iter()).zip(n) {
            *s += w * n;
        }
    }
    for ((w, &n), s) in w
        .into_remainder()
        .iter_mut()
        .zip(n.remainder())
        .zip(&mut lanes)
    {
        *w = flushed(*w);
        *s += *w * n;
    }
    lanes.iter().sum()
}

/// The batch's queries in groups of at least [`MIN_QUERY_GROUP`], one per thread where the
/// batch is large enough.
pub(crate) fn query_groups(n_queries: usize, threads: usize) -> Vec<Range<usize>> {
    let group = n_queries.div_ceil(threads.max(1)).max(MIN_QUERY_GROUP);
    (0..n_queries)
        .step_by(group)
        .map(|q| q..(q + group).min(n_queries))
        .collect()
}

/// Every (query group, row block) task of `ds` on rayon, group-major: the partial of
/// group g and block b is at `g * blocks.len() + b`.
pub(crate) fn run_tasks(
    ds: &Dataset,
    batch: &CentredBatch<'_>,
    groups: &[Range<usize>],
    blocks: &[Range<usize>],
    plan: GemmPlan,
) -> Vec<Partial> {
    let dim = ds.dim();
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..blocks.len()).map(move |b| (g, b)))
        .collect();
    tasks
        .par_iter()
        .map(|&(g, b)| {
            let qs = groups[g].clone();
            run_task(
                ds,
                &batch.x[qs.start * dim..qs.end * dim],
                &batch.logit_coefs[qs],
                blocks[b].clone(),
                plan.lib,
                plan.tile_rows.max(1),
            )
        })
        .collect()
}

impl Partial {
    /// No row yet, for `n_queries` queries of `dim` values.
    pub(crate) fn empty(n_queries: usize, dim: usize) -> Self {
        Partial {
            states: vec![SoftmaxState::EMPTY; n_queries],
            acc: vec![0.0; n_queries * dim],
            sum_norm: vec![0.0; n_queries],
        }
    }

    /// Merges the task partials of [`run_tasks`] (group-major) into this running state,
    /// blocks in row order; `row_offset` is added to their top-1 rows (a tile's rows are
    /// local to it).
    pub(crate) fn absorb(
        &mut self,
        groups: &[Range<usize>],
        partials: &[Partial],
        row_offset: u32,
    ) {
        let n_blocks = partials.len() / groups.len().max(1);
        let dim = self.acc.len() / self.states.len().max(1);
        for (g, qs) in groups.iter().enumerate() {
            for p in &partials[g * n_blocks..(g + 1) * n_blocks] {
                for (local, q) in qs.clone().enumerate() {
                    let mut part = p.states[local];
                    part.argmax += row_offset;
                    let (ra, rb) = self.states[q].merge(&part);
                    for (o, a) in self.acc[q * dim..(q + 1) * dim]
                        .iter_mut()
                        .zip(&p.acc[local * dim..(local + 1) * dim])
                    {
                        *o = ra * *o + rb * a;
                    }
                    self.sum_norm[q] = ra * self.sum_norm[q] + rb * p.sum_norm[local];
                }
            }
        }
    }
}

/// One (query group, row block) task: the tiled online softmax over `rows`.
pub(crate) fn run_task(
    ds: &Dataset,
    x: &[f32],
    coefs: &[[f32; 2]],
    rows: Range<usize>,
    lib: GemmLib,
    tile_rows: usize,
) -> Partial {
    let dim = ds.dim();
    let n_q = coefs.len();
    let mut states = vec![SoftmaxState::EMPTY; n_q];
    let mut acc = vec![0.0f32; n_q * dim];
    let mut sum_norm = vec![0.0f32; n_q];
    let mut logits = vec![0.0f32; n_q * tile_rows];
    let mut converted = Vec::new();
    let norms = ds.sq_norms();
    let queries = Queries::new(lib, x, dim);

    for start in rows.clone().step_by(tile_rows) {
        let tile = start..(start + tile_rows).min(rows.end);
        let nt = tile.len();
        let y = stored_rows_f32(ds, tile.clone(), &mut converted);
        let s = &mut logits[..n_q * nt];
        queries.dots(y, s);
        for (q, row) in s.chunks_exact_mut(nt).enumerate() {
            to_logits(row, &norms[tile.clone()], coefs[q]);
            let scale = states[q].absorb_tile(row, tile.start as u32);
            // The row now holds the weights e_j: sum e_j |y_j|^2 rides along with l.
            let tile_norm = flush_and_weigh_norms(row, &norms[tile.clone()]);
            sum_norm[q] = scale * sum_norm[q] + tile_norm;
            if scale != 1.0 {
                // The accumulator is the GEMM's addend: keep it free of subnormals too.
                acc[q * dim..(q + 1) * dim].iter_mut().for_each(|a| {
                    *a *= scale;
                    if a.abs() < f32::MIN_POSITIVE {
                        *a = 0.0;
                    }
                });
            }
        }
        // acc += P * Y_tile: (n_q x nt) * (nt x dim)
        sgemm_with(
            lib,
            Gemm {
                m: n_q,
                n: dim,
                k: nt,
            },
            &mut acc,
            true,
            (s, nt, 1),
            (y, dim, 1),
        );
    }
    Partial {
        states,
        acc,
        sum_norm,
    }
}

/// Stored rows `rows` as f32: borrowed when stored as f32, else converted into `scratch`.
pub(crate) fn stored_rows_f32<'a>(
    ds: &'a Dataset,
    rows: Range<usize>,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let dim = ds.dim();
    match ds.values() {
        Values::F32(v) => &v[rows.start * dim..rows.end * dim],
        Values::F16(v) => {
            // half's slice conversion uses the CPU's F16C (8 values per instruction) where
            // it has it; one value at a time cost 0.5 s per dense evaluation at B = 256 on
            // Fashion-MNIST (two query groups convert every row), twice the evaluation.
            let src = &v[rows.start * dim..rows.end * dim];
            scratch.resize(src.len(), 0.0);
            src.convert_to_f32_slice(scratch);
            scratch
        }
        // The streamed passes read their tiles themselves (oracle::stream); a stray read
        // here has no error path, and a failed one means the file changed under us.
        Values::Disk(d) => {
            if let Err(e) = d.read_f32(rows, scratch) {
                panic!("{e}");
            }
            scratch
        }
    }
}

/// One task's queries, for its logits tile after tile: packed once for the native
/// kernels (the libraries pack them at every call).
pub(crate) struct Queries<'a> {
    lib: GemmLib,
    x: &'a [f32],
    dim: usize,
    packed: Option<native::Packed>,
}

impl<'a> Queries<'a> {
    /// The rows of `x` (row-major, `dim` wide) for `lib`'s GEMMs.
    pub(crate) fn new(lib: GemmLib, x: &'a [f32], dim: usize) -> Self {
        let packed = (lib == GemmLib::Native && native::available() && dim > 0)
            .then(|| native::Packed::new(x, dim));
        Queries {
            lib,
            x,
            dim,
            packed,
        }
    }

    /// S = X Y^T: every query against every row of `y` (samples, `dim` wide), into `s`
    /// (queries by rows of y, row-major).
    pub(crate) fn dots(&self, y: &[f32], s: &mut [f32]) {
        let (m, n) = (self.x.len() / self.dim.max(1), y.len() / self.dim.max(1));
        if let Some(p) = &self.packed {
            return p.dots(y, &mut s[..m * n], n, false);
        }
        // column j of the rhs is row j of y
        sgemm_with(
            self.lib,
            Gemm { m, n, k: self.dim },
            &mut s[..m * n],
            false,
            (self.x, self.dim, 1),
            (y, 1, self.dim),
        );
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// dst (m x n, row-major, contiguous) = [dst +] lhs (m x k) * rhs (k x n), where each
/// operand is (slice, row stride, column stride). Bounds are checked here so the unsafe
/// call below cannot read or write outside the slices.
pub(crate) fn sgemm(
    g: Gemm,
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    sgemm_with(GemmLib::Gemm, g, dst, accumulate, lhs, rhs)
}

/// For a few large GEMMs outside the dense pass (the pruning index's projections): the
/// native kernels where the CPU has them (at this CPU's FMA peak), else the gemm crate.
pub(crate) fn large_gemm_lib() -> GemmLib {
    if native::available() {
        GemmLib::Native
    } else {
        GemmLib::Gemm
    }
}

/// [`sgemm`] with the chosen library; OpenBLAS falls back to the `gemm` crate when it is
/// not loaded or an operand has no unit stride (BLAS needs one per operand).
pub(crate) fn sgemm_with(
    lib: GemmLib,
    g: Gemm,
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(g.m > 0 && g.n > 0 && g.k > 0);
    assert!(dst.len() >= g.m * g.n);
    assert!(lhs.0.len() > last(g.m, g.k, lhs.1, lhs.2));
    assert!(rhs.0.len() > last(g.k, g.n, rhs.1, rhs.2));
    let unit = |o: (&[f32], usize, usize)| o.1 == 1 || o.2 == 1;
    match lib {
        GemmLib::Openblas if unit(lhs) && unit(rhs) => {
            if let Some(b) = blas::get() {
                return b.sgemm(g.m, g.n, g.k, dst, accumulate, lhs, rhs);
            }
        }
        // The native kernels' two layouts: a row-major rhs, or one whose columns are
        // contiguous rows (the dataset's, for logits; the lhs is packed for this call, so
        // small calls on strided rows, like the projected pass's per-tile bounds, are left
        // to the gemm crate).
        // (With k = 1 both strides of a column-rows rhs are 1: row-major only where its
        // row stride spans the columns.)
        GemmLib::Native
            if native::available()
                && lhs.2 == 1
                && ((rhs.2 == 1 && rhs.1 >= g.n)
                    || (rhs.1 == 1 && rhs.2 == g.k && lhs.1 == g.k)) =>
        {
            if rhs.2 == 1 && rhs.1 >= g.n {
                native::gemm_rows(
                    (g.m, g.n, g.k),
                    dst,
                    g.n,
                    accumulate,
                    (lhs.0, lhs.1),
                    (rhs.0, rhs.1),
                );
            } else {
                // Pack the smaller side (its panels stay in cache while the other streams).
                let (a, b) = (&lhs.0[..g.m * g.k], &rhs.0[..g.n * g.k]);
                if g.n < g.m {
                    native::Packed::new(b, g.k).dots_t(a, dst, g.n, accumulate);
                } else {
                    native::Packed::new(a, g.k).dots(b, dst, g.n, accumulate);
                }
            }
            return;
        }
        GemmLib::Faer => {
            use faer::{Accum, MatMut, MatRef, Par};
            // SAFETY: as for the gemm crate below: the strides stay within the slices
            // (asserted above) and dst is a unique borrow aliasing neither operand.
            unsafe {
                let d = MatMut::from_raw_parts_mut(dst.as_mut_ptr(), g.m, g.n, g.n as isize, 1);
                let a = MatRef::from_raw_parts(
                    lhs.0.as_ptr(),
                    g.m,
                    g.k,
                    lhs.1 as isize,
                    lhs.2 as isize,
                );
                let b = MatRef::from_raw_parts(
                    rhs.0.as_ptr(),
                    g.k,
                    g.n,
                    rhs.1 as isize,
                    rhs.2 as isize,
                );
                let beta = if accumulate {
                    Accum::Add
                } else {
                    Accum::Replace
                };
                faer::linalg::matmul::matmul(d, beta, a, b, 1.0f32, Par::Seq);
            }
            return;
        }
        _ => {}
    }
    // SAFETY: every index the GEMM touches is within the slices (asserted above), and
    // dst does not alias lhs or rhs (it is a unique borrow).
    unsafe {
        gemm::gemm(
            g.m,
            g.n,
            g.k,
            dst.as_mut_ptr(),
            1,
            g.n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    /// The vector versions of the dense pass's row steps (whichever this CPU runs) equal
    /// the baseline bitwise, and the weighted norm sum equals an f64 one.
    #[test]
    fn row_steps_match_the_baseline_and_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for n in [0usize, 1, 7, 8, 9, 31, 256, 257, 1000] {
            let dots: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 40.0 - 20.0).collect();
            let norms: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 30.0).collect();
            let (mut a, mut b) = (dots.clone(), dots.clone());
            to_logits(&mut a, &norms, [1.5, 0.25]);
            to_logits_body(&mut b, &norms, [1.5, 0.25]);
            assert_eq!(a, b);
            // Weights with subnormals and zeros among them.
            let mut w: Vec<f32> = a.iter().map(|&v| (v - 40.0).exp()).collect();
            for v in w.iter_mut().step_by(3) {
                *v = f32::MIN_POSITIVE / 4.0;
            }
            let mut w2 = w.clone();
            let sa = flush_and_weigh_norms(&mut w, &norms);
            let sb = flush_and_norm_body(&mut w2, &norms);
            assert_eq!(sa.to_bits(), sb.to_bits());
            assert_eq!(w, w2);
            assert!(w.iter().all(|&v| v == 0.0 || v >= f32::MIN_POSITIVE));
            let want: f64 = w
                .iter()
                .zip(&norms)
                .map(|(&e, &n)| e as f64 * n as f64)
                .sum();
            assert!((sa as f64 - want).abs() <= 1e-6 * want.abs().max(f64::MIN_POSITIVE));
        }
    }

    use super::*;

    /// Where every logit is 0 (t = 0), the closed form equals the dense pass: the same
    /// top-1 and statistics, means within 1e-6 of the rows' rms norm, for the whole set and
    /// a row range starting and ending inside chunks, f32 and f16 storage.
    #[test]
    fn uniform_pass_equals_the_dense_pass() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for dtype in [crate::Dtype::F32, crate::Dtype::F16] {
            let (n, dim) = (9000usize, 13usize);
            let v: Vec<f32> = (0..n * dim)
                .map(|_| rng.random::<f32>() * 4.0 - 1.0)
                .collect();
            let ds = Dataset::from_raw(
                "uniform",
                crate::dataset::SampleShape::array(vec![dim]),
                crate::dataset::RawRows::F32(&v),
                None,
                dtype,
            )
            .unwrap();
            let x: Vec<f32> = (0..3 * dim).map(|_| rng.random::<f32>()).collect();
            let coefs = vec![[0.0f32, 0.0f32]; 3];
            for rows in [0..n, 37..8191] {
                let batch = CentredBatch {
                    x: &x,
                    logit_coefs: &coefs,
                    rows: rows.clone(),
                };
                let fast = uniform_pass(&ds, &batch, &mut None).finish();
                let dense = dense_pass(&ds, &batch, 2, GemmPlan::default()).finish();
                for (a, b) in fast.stats.iter().zip(&dense.stats) {
                    assert_eq!(a.top1_index, b.top1_index);
                    assert_eq!(a.top1_weight, b.top1_weight);
                    assert!((a.entropy - b.entropy).abs() <= 1e-5 * b.entropy.abs());
                    assert!((a.ess - b.ess).abs() <= 1e-5 * b.ess);
                    let pv = (a.posterior_variance - b.posterior_variance).abs();
                    assert!(pv <= 1e-5 * b.posterior_variance.abs());
                }
                // The stored rows are centred: their mean is near 0, so the means are
                // compared on the rows' scale (rms norm).
                let scale = (ds.sq_norms()[rows.clone()]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>()
                    / rows.len() as f64)
                    .sqrt();
                let worst = fast
                    .mean
                    .iter()
                    .zip(&dense.mean)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .fold(0.0, f64::max);
                assert!(
                    worst <= 1e-6 * scale,
                    "{dtype:?} {rows:?}: {worst} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn tile_weights_below_the_normal_range_come_out_zero() {
        // The tile step as run_task does it: absorb (weights e^(s - max)), then flush.
        // Logits 88 and 100 below the max have subnormal e^s (libm's exp returns them);
        // 10 and 87 below, normal ones.
        for d in [-88.0f32, -100.0] {
            assert!(
                d.exp() > 0.0 && d.exp() < f32::MIN_POSITIVE,
                "e^{d} is subnormal"
            );
        }
        let mut state = SoftmaxState::EMPTY;
        let mut row = [0.0f32, -88.0, -100.0, -200.0, -10.0, -87.0];
        state.absorb_tile(&mut row, 0);
        flush_subnormal_weights(&mut row);
        assert_eq!(&row[..4], &[1.0, 0.0, 0.0, 0.0]);
        assert!((row[4] - (-10.0f32).exp()).abs() <= 1e-6 * row[4]);
        assert!(row[5] >= f32::MIN_POSITIVE, "e^-87 is normal and kept");
    }
}
