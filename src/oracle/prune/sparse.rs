//! The sparse pass: every logit exact, the weighted sum over the weights that matter.
//!
//! Between the navigation stage (every weight counts) and the point where the bounds start
//! to skip samples (t ~ 0.55 on Fashion-MNIST) the posterior has already concentrated: at
//! t = 0.3 an exact pruner keeps a tenth of the samples, at t = 0.45 a thousandth, yet the
//! bounds cannot tell which (see the module docs of `prune`). The logits must then all be
//! computed, but the second GEMM of the dense pass, acc += P Y, need not be: it is half
//! the work, and almost all of its weights are too small to reach an f32 result.
//!
//! **Two phases per chunk of rows.** (1) The logits of the chunk, one GEMM per tile of
//! `TILE` rows in the index's tile order (nearby samples together), kept in memory, and
//! each query's maximum m. Then each query's drop cut: at least the per-sample threshold
//! m + ln(`SAMPLE_BUDGET` / n) - 2 err (n the rows of the range, err the f32 rounding bound
//! of a logit, as in the pruned pass), raised where a histogram of the query's logits shows
//! that the weights under a higher cut still add up to less than the budget
//! ([`super::budget`]; at t = 0.3 - 0.42 on Fashion-MNIST it keeps 0.7 - 0.5 times the
//! pairs, 5% less time). (2) Per tile and query, one vectorized pass counts the logits at
//! or above the cut and finds the largest below it;
//! only those at or above get a weight exp(s - m), which enters the normaliser, the
//! entropy and ESS sums, sum e |y|^2 (per tile in f32 lanes, then in f64: a running f32
//! sum over that many weights would round far more than the dense pass's per-tile sums)
//! and the weighted sum. The others are dropped like samples skipped by bound, and (their count) x
//! exp(largest below - m + 2 err) is added to the certificate.
//!
//! **Accumulation.** Per tile and query, one branch-free pass turns the logits into
//! weights (0 below the cut) and sums them in f32 lanes, as the dense pass does per tile;
//! those sums are added in f64 across tiles. The queries are ordered by the tile-order
//! position of their maximum and cut into blocks of `accumulate::QUERY_BLOCK` (6):
//! neighbours keep nearly the same columns. Per (block, tile), the register-blocked kernel
//! of [`super::accumulate`] over the block's union of kept columns (rows read in place
//! from the index's tile-ordered copy), or one axpy per kept weight, whichever costs less
//! with an axpy's multiply-add at `AXPY_COST` kernel ones; the kernel's blocks of a tile
//! take its coordinates strip by strip (`accumulate::STRIP`), so that one strip of the
//! tile's rows serves them all from L2. On Fashion-MNIST at t = 0.3
//! the blocks' unions hold 36% of the pairs for 24% kept (32-query subgroups: 45%; the
//! whole batch: 91%).
//!
//! **Why dropping cannot change an f32 result.** With m the chunk's maximum, the chunk's
//! normaliser is at least 1 in units of exp(m) and later chunks only raise the maximum, so
//! under the per-sample threshold every dropped weight is below `SAMPLE_BUDGET / n` of the
//! final normaliser and all of them together below `SAMPLE_BUDGET` = 2^-31 of it (a raised
//! cut keeps the same total, see [`super::budget`]): x1_hat moves by at most 2^-31
//! max|y - x1_hat| / |x1_hat| relative, 128 times under f32's rounding (the same margin as
//! the pruned path's sample skips). Where 2 err exceeds `MAX_ERR` nats (f32 logits near
//! t = 1 carry rounding of many nats) the pass declines and dense runs.
//!
//! **When.** The caller (`CpuBackend`) first estimates the kept share from a sample
//! ([`kept_share`]): above `SPARSE_MAX_SHARE` (early t) the dense pass runs; else the
//! bounds are tried, and where they would save too little this pass runs. Measured on
//! Fashion-MNIST (B = 256, 2 threads, `ORACLEFLOW_PRUNE_AT`, dense 0.30 - 0.34 s): at
//! t = 0.3, 0.35, 0.4, 0.45 it keeps 24%, 8.9%, 2.6%, 0.64% of the pairs and runs at 1.0,
//! 0.72, 0.57, 0.54 of dense (the logits' GEMM alone is 0.45); its x1_hat is as close to
//! f64 as the dense pass's (both about 1e-6).
//!
//! Memory: the chunk's logits, at most `LOGIT_BYTES` (ORACLEFLOW_PRUNE_CHUNK_KIB overrides
//! it; the maximum and the certificate carry from chunk to chunk) (B = 256 queries: 131072 rows per
//! chunk; Fashion-MNIST's 60000 rows take one chunk of 61 MB).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

use super::accumulate::{accumulate, pack_into, QUERY_BLOCK, STRIP};
use super::anchor::{self, Anchor};
use super::dots::{dots_grid, dots_with_row};
use super::projected::head_dots;
use super::screen::RowSum;
use super::{budget, env_number, lowp, profiling, PruneIndex, LEAF_ROWS, SAMPLE_BUDGET};
use crate::dataset::{Dataset, Values};
use crate::oracle::cpu::{query_groups, to_logits, GemmLib, Partial as CpuPartial, Queries};
use crate::oracle::partial::Partial;
use crate::oracle::simd::multiversion;
use crate::oracle::state::exp_nonpositive;
use crate::oracle::state::{max_first, max_of};
use crate::oracle::{CentredBatch, SoftmaxState};

/// With `ORACLEFLOW_PRUNE_PROFILE`: the screened pairs computed in grids, and the products
/// those grids took (the profile line's share of them).
static GRID_PAIRS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Rows per group of the screened pairs' products ([`screened_exact`]).
const GRID_ROWS: usize = 4;
// (`screened_exact` finds the queries set in two of a group's four rows' bits)
const _: () = assert!(GRID_ROWS == 4);
/// Rows per logits GEMM: four leaf tiles, S (B x 256) and the tile (256 x D) cache-sized.
pub(super) const TILE: usize = 256;
/// Bound on the memory of one chunk's logits, unless ORACLEFLOW_PRUNE_CHUNK_KIB sets it.
const LOGIT_BYTES: usize = 256 << 20;

/// [`LOGIT_BYTES`], or ORACLEFLOW_PRUNE_CHUNK_KIB KiB (read per call; the tests use it to
/// run many chunks on small data).
fn logit_bytes() -> usize {
    env_number::<usize>("ORACLEFLOW_PRUNE_CHUNK_KIB").map_or(LOGIT_BYTES, |k| k.max(1) << 10)
}
/// Cost of one axpy multiply-add against one of the block kernel's (the axpy streams its
/// row for one weight; calibrated at t = 0.3 - 0.45 on Fashion-MNIST against the GEMM the
/// kernel replaced, which ran at about the kernel's rate).
const AXPY_COST: f64 = 4.0;

/// Queries and rows of [`kept_share`]'s sample.
const ESTIMATE_QUERIES: usize = 8;
const ESTIMATE_ROWS: usize = 4096;
/// Above this estimated share of kept weights the sparse pass saves too little of the
/// accumulation to pay for its second pass over the rows: the dense pass runs. On
/// Fashion-MNIST (B = 256, 2 threads) the sparse pass ran 1.14, 1.02 and 0.88 times as
/// fast as dense at estimates of 0.32, 0.43 and 0.54 (t = 0.3, 0.28, 0.26).
pub const SPARSE_MAX_SHARE: f64 = 0.35;

/// [`SPARSE_MAX_SHARE`], or ORACLEFLOW_PRUNE_SPARSE_MAX_SHARE (read per call).
pub fn sparse_max_share() -> f64 {
    env_number("ORACLEFLOW_PRUNE_SPARSE_MAX_SHARE").unwrap_or(SPARSE_MAX_SHARE)
}
/// Largest estimated kept share ([`kept_share`]) at which the bf16 screening runs (see
/// [`screening`] for int16's): it
/// computes in f32 several times the kept pairs, each by its own dot product. On
/// Fashion-MNIST (B = 256): at t = 0.35 (estimate 0.16) 24% of the pairs for 9% kept, 1.4
/// times the f32 screening's time; at t = 0.4 (estimate 0.072) equal; at t = 0.45
/// (estimate 0.032) 0.77 of it. With the AVX-512 dot product for those pairs (stop 10):
/// t = 0.38 (estimate 0.099) 0.186 s against 0.175, t = 0.42 (0.051) 0.141 against 0.155.
pub const BF16_MAX_SHARE: f64 = 0.07;
/// [`BF16_MAX_SHARE`] for the int16 screening (AVX2, no AVX-512 BF16). On Fashion-MNIST
/// (B = 256, 2-core AMD EPYC Zen 3, best of 3 single evaluations in three interleaved
/// rounds, forced with ORACLEFLOW_PRUNE_SCREEN_MAX_SHARE), since the f32 logits of the
/// pairs it lets through took four products per row read (stop 18; since stop 24 they take
/// register blocks of `dots::dots_grid`): t = 0.35 (estimate about 0.15) ran in 0.25 - 0.38 s against
/// 0.35 - 0.43 for the f32 logits, t = 0.37 in 0.23 - 0.28 against 0.31 - 0.33, t = 0.39
/// in 0.22 - 0.24 against 0.25 - 0.27; t = 0.33 (0.21) about equal (0.34 - 0.41 against
/// 0.37 - 0.41, 14% of the pairs computed in f32). (With one product at a time and two
/// sums, stop 17: t = 0.36 ran in 0.35 s against 0.31, so this was 0.08.)
pub const INT16_MAX_SHARE: f64 = 0.16;
/// Largest screening slack (nats, at the largest row norm) at which the screening
/// runs: above it the bound could let through too many pairs to pay. The slack grows with
/// c_dot, but so do the logits' gaps: on Fashion-MNIST the pairs computed in f32 fall
/// from 0.5% at t = 0.6 (slack about 11) to 0.07% at t = 0.8 (about 16).
const SCREEN_MAX_SLACK: f64 = 48.0;
/// Largest slack (nats, at the largest row norm) at which the last call's values screen
/// this one's (see [`Carry`]).
const CARRY_MAX_SLACK: f64 = 8.0;
/// Largest 2 err (nats) at which weights are still dropped.
const MAX_ERR: f64 = 10.0;
/// An anchored call that computes in f32 more than `STALE_FACTOR` times the pairs it
/// keeps plus `STALE_SHARE` of all pairs marks its anchor stale.
const STALE_FACTOR: f64 = 8.0;
const STALE_SHARE: f64 = 0.02;

/// One task's logits over its row block: per tile, n_q x tile rows, tile after tile; and
/// per query the block's largest logit and its stored row. With screening, a logit that
/// the bound rules out holds that upper bound (below the drop cut) instead.
struct BlockLogits {
    s: Vec<f32>,
    best: Vec<(f32, u32)>,
    /// with screening, per query the largest lower bound from the block's screening
    /// values (before [`screened_exact`]; else -inf)
    lower: Vec<f64>,
    /// pairs computed in f32 after the screening
    exact: u64,
    /// where the call records an anchor: the products before they became logits, in
    /// `s`'s layout
    products: Vec<f32>,
    /// anchored: per query the block's largest upper bound and its position (a candidate
    /// for the query's maximum, whose f32 logit then raises the lower bound)
    seeds: Vec<(f32, u32)>,
    /// per tile of `TILE` rows and query (tile-major), the largest value of the query's
    /// row in `s` (kept up to date as values change): the later steps pass over a row
    /// with no value at or above their cut without reading it
    row_max: Vec<f32>,
}

/// What a sparse call leaves for the next one: for every (query, row) pair a value at or
/// above its f32 logit (the logit itself where computed, else the bound that ruled it
/// out), in phase 1's layout, with the queries and coefficients it was for.
///
/// For the next call's queries x' (same rows, same count), with D = x' - x per query,
///   x'.y = x.y + D.y <= (s_old + err_old + c_norm_old |y|^2) / c_dot_old + |D| |y|,
/// so s_new <= ratio (s_old + err_old + c_norm_old |y|^2) + c_dot_new |D| |y| -
/// c_norm_new |y|^2 + err_new (ratio = c_dot_new / c_dot_old), with no dot product at
/// all. Only with ORACLEFLOW_PRUNE_CARRY=1: the result then depends, within rounding, on
/// the previous call. Heun's step ends at x_{k+1} = x~ + h/2 (k2 - k1), x~ the state of its second
/// evaluation: the next step's first evaluation is that close to the last one, tiny once
/// the posterior has concentrated, and the bound is within a few nats there. The second
/// evaluation (a full step h k1 away) gets its slack checked and screens otherwise.
pub struct Carry {
    rows: Range<usize>,
    threads: usize,
    x: Vec<f32>,
    coefs: Vec<[f32; 2]>,
    err: Vec<f64>,
    /// per query, the stored row of its largest logit
    best_rows: Vec<u32>,
    /// per task of phase 1 (group-major), the values
    s: Vec<Vec<f32>>,
}

/// Per query, the coefficients of the carried bound (see [`Carry`]), in f32:
/// hi = ratio s_old + per_norm |y|^2 + per_y |y| + add, and the cut below which a pair
/// needs no f32 logit.
#[derive(Clone, Copy)]
struct CarryCoefs {
    ratio: f32,
    per_norm: f32,
    per_y: f32,
    add: f32,
    cut: f32,
}

/// The carried values of one task and its queries' coefficients.
struct Incremental<'a> {
    prev: &'a [f32],
    coefs: &'a [CarryCoefs],
}

/// Per query, the coefficients of `carry`'s bound for `batch` (the caller checked
/// [`carry_applies`]) and the cut (a lower bound on the new maximum, from the f32 logit at
/// the last call's best row, plus the drop threshold).
fn carry_screen(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    err: &[f64],
    thresholds: &[f64],
    carry: &Carry,
) -> Vec<CarryCoefs> {
    let dim = ds.dim();
    let n_q = batch.logit_coefs.len();
    let norms = ds.sq_norms();
    let mut scratch = Vec::new();
    let mut coefs = Vec::with_capacity(n_q);
    for (q, delta) in moves(batch, carry).into_iter().enumerate() {
        let ([c_dot, c_norm], [o_dot, o_norm]) = (batch.logit_coefs[q], carry.coefs[q]);
        let x = &batch.x[q * dim..(q + 1) * dim];
        let ratio = c_dot as f64 / o_dot as f64;
        let per_y = c_dot as f64 * delta * (1.0 + 1e-6);
        // err_new twice: the f32 logit's rounding and this bound's own f32 evaluation.
        let add = ratio * carry.err[q] + 2.0 * err[q];
        let r = carry.best_rows[q] as usize;
        // The same value phase 1 computes for that pair (it is always a candidate there).
        let p = index.pos[r] as usize;
        let m_lo = exact_logit(ds, index, x, [c_dot, c_norm], p, norms[r], &mut scratch);
        coefs.push(CarryCoefs {
            ratio: ratio as f32,
            per_norm: (ratio * o_norm as f64 - c_norm as f64) as f32,
            per_y: per_y as f32,
            add: add as f32,
            cut: (m_lo as f64 + thresholds[q]) as f32,
        });
    }
    coefs
}

/// Whether `carry` would screen a sparse call of `batch` (see [`carry_screen`]): then the
/// caller skips the bounds' probe, the sparse pass being the cheaper one.
pub fn carry_applies(
    carry: Option<&Carry>,
    setup: &Setup,
    batch: &CentredBatch<'_>,
    threads: usize,
) -> bool {
    let Some(c) = carry else { return false };
    if !carry_enabled() {
        return false;
    }
    let n_q = batch.logit_coefs.len();
    if c.rows != batch.rows
        || c.threads != threads
        || c.coefs.len() != n_q
        || setup.positions.len() > chunk_rows(n_q)
    {
        return false;
    }
    moves(batch, c).iter().enumerate().all(|(q, delta)| {
        let (c_dot, o_dot) = (batch.logit_coefs[q][0], c.coefs[q][0]);
        let ratio = c_dot as f64 / o_dot as f64;
        c_dot > 0.0
            && o_dot > 0.0
            && c_dot as f64 * delta * setup.y_max + ratio * c.err[q] + 2.0 * setup.err[q]
                <= CARRY_MAX_SLACK
    })
}

/// Reduced-precision screening for one query group (see [`lowp`]).
struct Screening<'a> {
    panels: &'a lowp::Panels,
    /// the group's queries, packed
    xq: &'a lowp::Queries,
    /// per query (a, b, c): a screening logit is within a |y - y~| + b |y~| + c of the f32
    /// one (c_dot times the dot product's bound, plus 2 err: one for the f32 logit's
    /// rounding, one, far more than needed, for the f32 evaluation of the bound itself)
    slack: &'a [[f64; 3]],
}

/// A query group as phase 2 sees it: its queries, their chunk maxima (logit, stored row)
/// and ln drop thresholds, and its local query numbers in the tile order of the maxima.
struct GroupQueries<'a> {
    qs: Range<usize>,
    best: &'a [(f32, u32)],
    thresholds: &'a [f64],
    order: &'a [usize],
}

/// One task's share after phase 2.
struct BlockSums {
    part: CpuPartial,
    /// per query: the dropped weights' exact total, units of exp(m)
    dropped: Vec<f64>,
    /// per query: weights accumulated
    kept: Vec<u64>,
    kept_rows: Vec<Vec<u32>>,
    /// (query, row) pairs accumulated by the block kernel and by axpy
    pairs: [u64; 2],
}

/// What the sparse and projected passes read for one call: the data, its index, the batch
/// (its rows in the index's tile order), the call's [`Setup`], the threads and the GEMM
/// library.
#[derive(Clone, Copy)]
pub struct PassInputs<'a> {
    pub ds: &'a Dataset,
    pub index: &'a PruneIndex,
    pub batch: &'a CentredBatch<'a>,
    pub setup: &'a Setup,
    pub threads: usize,
    pub lib: GemmLib,
}

/// What a call's choice of screening and the sparse pass itself need, computed once per
/// call: the index's positions of the rows, their largest norm, and per query the bound
/// err on how far an f32 logit is from the exact one (see `QueryBound::err`).
pub struct Setup {
    positions: Range<usize>,
    y_max: f64,
    err: Vec<f64>,
    /// per query, the screening's slack (see [`Setup::screen_slack`]), computed the
    /// first time the choice or the pass asks
    slack: std::sync::OnceLock<Vec<[f64; 3]>>,
}

impl Setup {
    /// The index's positions of the rows.
    pub(crate) fn positions(&self) -> Range<usize> {
        self.positions.clone()
    }

    /// The rows' largest norm.
    pub(super) fn y_max(&self) -> f64 {
        self.y_max
    }

    /// Per query, the bound on how far an f32 logit is from the exact one.
    pub(super) fn err(&self) -> &[f64] {
        &self.err
    }

    /// Per query, the ln drop threshold relative to the f32 maximum: a weight below
    /// `SAMPLE_BUDGET` / n of it, lowered by exp(2 err) (an f32 weight e stands for an exact
    /// one of at most e exp(2 err)), cannot reach an f32 result.
    pub(super) fn thresholds(&self) -> Vec<f64> {
        let n = self.positions.len() as f64;
        self.err
            .iter()
            .map(|e| (SAMPLE_BUDGET / n).ln() - 2.0 * e)
            .collect()
    }

    /// `None` where the rows are not a union of the index's tiles.
    pub fn new(index: &PruneIndex, batch: &CentredBatch<'_>) -> Option<Setup> {
        let tiles = index.tiles_for(&batch.rows).filter(|t| !t.is_empty())?;
        let positions = index.positions_for(&batch.rows)?;
        let dim = index.dim;
        let y_max = index.tiles[tiles.clone()]
            .iter()
            .fold(0.0f64, |a, t| a.max(t.max_norm));
        let err = batch
            .logit_coefs
            .iter()
            .zip(batch.x.chunks_exact(dim))
            .map(|(coefs, x)| {
                let [c_dot, c_norm] = coefs.map(|c| c.abs() as f64);
                let x_norm = super::sum_sq(x).sqrt();
                (dim + 4) as f64
                    * f64::powi(2.0, -24)
                    * (c_dot * x_norm * y_max + c_norm * y_max * y_max)
            })
            .collect();
        Some(Setup {
            positions,
            y_max,
            err,
            slack: std::sync::OnceLock::new(),
        })
    }

    /// Per query (a, b, c): a screening logit of `kind` is within a |y - y~| + b |y~| + c
    /// of the f32 one (c_dot times [`lowp::Kind::bound_coefs`], plus 2 err: one for the
    /// f32 logit's rounding, one, far more than needed, for the f32 evaluation of the
    /// bound itself). Computed once per call (one kind per index), for
    /// [`screening`] and the pass.
    fn screen_slack(&self, batch: &CentredBatch<'_>, kind: lowp::Kind) -> &[[f64; 3]] {
        self.slack.get_or_init(|| {
            let dim = batch.x.len() / batch.logit_coefs.len().max(1);
            kind.bound_coefs(batch.x, dim)
                .into_iter()
                .enumerate()
                .map(|(q, [a, b, c])| {
                    let c_dot = batch.logit_coefs[q][0].abs() as f64;
                    [c_dot * a, c_dot * b, c_dot * c + 2.0 * self.err[q]]
                })
                .collect()
        })
    }
}

/// How the sparse pass gets its logits (the caller chooses: [`carry_applies`],
/// [`screening`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Screen {
    /// one f32 GEMM per tile
    F32,
    /// reduced-precision dot products first ([`lowp`]: bf16 or int16), f32 only where
    /// their bound cannot rule a pair out
    Reduced,
    /// the last sparse call's values first (see [`Carry`])
    Carried,
    /// an earlier call's products first ([`super::anchor`])
    Anchored,
}

/// What the sparse pass does with anchors ([`super::anchor`]): screen with one
/// ([`Screen::Anchored`]), or record this call's products as one (only the unscreened
/// pass computes them all).
pub enum AnchorUse<'a> {
    None,
    Read(&'a Anchor),
    Record(&'a mut Option<Anchor>),
}

/// An anchor and its terms for one call, as phase 1 reads them.
struct Anchored<'a> {
    anchor: &'a Anchor,
    terms: &'a anchor::Terms,
}

/// Whether the carried screening is on (ORACLEFLOW_PRUNE_CARRY=1). Opt-in: a carried call
/// computes other pairs in f32 than a fresh one (and skips the bounds' probe), so its
/// result, equal within rounding, is not bitwise the same: a query's bits would depend on
/// the previous call (a resumed run would differ from an uninterrupted one).
fn carry_enabled() -> bool {
    std::env::var("ORACLEFLOW_PRUNE_CARRY").is_ok_and(|v| v == "1")
}

/// Whether the sparse pass takes its drop cut from the budget (ORACLEFLOW_PRUNE_BUDGET=0
/// turns it off, for comparisons).
fn budget_cuts() -> bool {
    !std::env::var("ORACLEFLOW_PRUNE_BUDGET").is_ok_and(|v| v == "0")
}

/// Rows per chunk of the sparse pass for `n_q` queries (a multiple of `TILE`).
fn chunk_rows(n_q: usize) -> usize {
    (logit_bytes() / 4 / n_q.max(1)).max(TILE) / TILE * TILE
}

/// |x_q - x_old| per query: how far `batch`'s queries moved since `carry`'s.
fn moves(batch: &CentredBatch<'_>, carry: &Carry) -> Vec<f64> {
    let dim = batch.x.len() / batch.logit_coefs.len().max(1);
    batch
        .x
        .chunks_exact(dim)
        .zip(carry.x.chunks_exact(dim))
        .map(|(x, xo)| {
            x.iter()
                .zip(xo)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                * (1.0 + 1e-6)
        })
        .collect()
}

/// The kernel that screens `batch` in reduced precision, where one can run and it pays
/// (else `None`): the CPU has a kernel ([`lowp::Kind::for_cpu`]; the index packs its rows
/// for it here, once),
/// the estimated kept `share` is at most the kernel's largest (`BF16_MAX_SHARE`,
/// `INT16_MAX_SHARE`, or ORACLEFLOW_PRUNE_SCREEN_MAX_SHARE, read per call), and the
/// screening's typical slack stays within `SCREEN_MAX_SLACK` nats (late t, where c_dot
/// grows, it would let too many pairs through).
pub fn screening(
    ds: &Dataset,
    index: &PruneIndex,
    setup: &Setup,
    batch: &CentredBatch<'_>,
    share: f64,
) -> Option<lowp::Kind> {
    let kind = lowp::Kind::for_cpu()?;
    let max_share = env_number("ORACLEFLOW_PRUNE_SCREEN_MAX_SHARE").unwrap_or(match kind {
        lowp::Kind::Bf16 => BF16_MAX_SHARE,
        lowp::Kind::Int16 => INT16_MAX_SHARE,
    });
    if share > max_share || index.screen_kind() != Some(kind) {
        return None;
    }
    let typical = kind.typical_err(ds.dim());
    setup
        .screen_slack(batch, kind)
        .iter()
        .all(|s| (s[0] * typical + s[1]) * setup.y_max + s[2] <= SCREEN_MAX_SLACK)
        .then_some(kind)
}

/// The sparse pass over `inputs.batch.rows` (see [`PassInputs`]), its logits obtained as
/// `screen` says (the caller checks [`carry_applies`] and [`screening`]); `None`
/// where every query has alpha = 0 (all weights equal, nothing to drop) or the f32
/// rounding is too large to drop anything. `carry` is read for
/// [`Screen::Carried`] and left holding this call's values. `kept`, if given, receives per
/// query the stored rows accumulated.
pub fn partial(
    inputs: PassInputs<'_>,
    screen: Screen,
    carry: &mut Option<Carry>,
    buffers: &mut Buffers,
    kept: Option<&mut Vec<Vec<u32>>>,
    mut anchors: AnchorUse<'_>,
) -> Option<Partial> {
    let PassInputs {
        ds,
        index,
        batch,
        setup,
        threads,
        lib,
    } = inputs;
    if batch.logit_coefs.iter().all(|c| c[0] == 0.0) {
        return None;
    }
    let clock = std::time::Instant::now();
    let dim = ds.dim();
    let n_q = batch.logit_coefs.len();
    let positions = setup.positions.clone();
    let n_rows = positions.len();
    // Each f32 logit, the maximum's included, is within err of its exact value (see
    // `QueryBound::err`), so an f32 weight e stands for an exact one of at most
    // e exp(2 err): the threshold is lowered by that factor, and where it is large (f32
    // logits near t = 1 carry rounding of many nats) nothing is dropped: dense runs.
    let err = &setup.err;
    if err.iter().any(|&e| 2.0 * e > MAX_ERR) {
        return None;
    }
    let thresholds = setup.thresholds();
    let groups = query_groups(n_q, threads);
    let chunk = chunk_rows(n_q);
    let record = kept.is_some();

    let n_chunks = n_rows.div_ceil(chunk);
    let previous = carry.take().filter(|_| screen == Screen::Carried).map(|c| {
        let coefs = carry_screen(ds, index, batch, err, &thresholds, &c);
        (c, coefs)
    });
    let low_screen = (screen == Screen::Reduced)
        .then(|| index.screen_panels(ds))
        .flatten()
        .map(|panels| {
            let slack = setup.screen_slack(batch, panels.kind());
            let xq: Vec<lowp::Queries> = groups
                .iter()
                .map(|qs| panels.pack_queries(&batch.x[qs.start * dim..qs.end * dim], dim))
                .collect();
            (panels, xq, slack)
        });
    let anchor = match (&anchors, screen) {
        (AnchorUse::Read(a), Screen::Anchored) => Some(*a),
        _ => None,
    };
    let anchor_terms = match anchor {
        Some(a) => Some(a.terms(index, batch, err, setup.y_max)?),
        None => None,
    };
    let anchored = anchor
        .zip(anchor_terms.as_ref())
        .map(|(anchor, terms)| Anchored { anchor, terms });
    // This call's products, query-major over its positions, where it records an anchor.
    let mut anchor_products = match (&anchors, screen) {
        (AnchorUse::Record(_), Screen::F32) if anchor::fits(n_q, n_rows) => {
            Some(vec![0.0f32; anchor::Layout::new(&positions, n_q).len()])
        }
        _ => None,
    };
    let mut screened = 0u64;
    let mut run = CpuPartial::empty(n_q, dim);
    let mut dropped = vec![0.0f64; n_q];
    let mut n_kept = vec![0u64; n_q];
    let mut kept_rows = vec![Vec::new(); if record { n_q } else { 0 }];
    let mut pairs = [0u64; 2];
    let (mut t_logits, mut t_screen, mut t_cuts) = (0.0, 0.0, 0.0);
    for c0 in positions.clone().step_by(chunk) {
        let cpos = c0..(c0 + chunk).min(positions.end);
        let blocks = row_blocks(cpos.clone(), threads);
        let tasks: Vec<(usize, usize)> = (0..groups.len())
            .flat_map(|g| (0..blocks.len()).map(move |b| (g, b)))
            .collect();

        let c1 = std::time::Instant::now();
        let mut spare = std::mem::take(&mut buffers.logits);
        spare.resize_with(tasks.len(), Vec::new);
        let mut logits: Vec<BlockLogits> = tasks
            .par_iter()
            .zip(spare)
            .map(|(&(g, b), buf)| {
                let qs = groups[g].clone();
                let scr = low_screen.as_ref().map(|(panels, xq, slack)| Screening {
                    panels,
                    xq: &xq[g],
                    slack: &slack[qs.clone()],
                });
                let prev = previous.as_ref().map(|(c, coefs)| Incremental {
                    prev: &c.s[g * blocks.len() + b],
                    coefs: &coefs[qs.clone()],
                });
                let how = Phase1 {
                    screen: scr,
                    previous: prev,
                    anchored: anchored.as_ref(),
                    record: anchor_products.is_some(),
                };
                block_logits(ds, index, batch, qs, &blocks[b], lib, how, buf)
            })
            .collect();
        if let Some(products) = anchor_products.as_mut() {
            let layout = anchor::Layout::new(&positions, n_q);
            for (&(g, b), l) in tasks.iter().zip(&mut logits) {
                let qs = groups[g].clone();
                let tiles = blocks[b].clone().step_by(TILE);
                for (t0, tile) in tiles.zip(l.products.chunks(qs.len() * TILE)) {
                    let nt = tile.len() / qs.len();
                    for (q, row) in qs.clone().zip(tile.chunks_exact(nt)) {
                        layout.store(q, t0, row, products);
                    }
                }
                l.products = Vec::new();
            }
        }
        t_screen += c1.elapsed().as_secs_f64();
        if low_screen.is_some() || anchored.is_some() {
            // Per query, the cut from the largest lower bound over the chunk's blocks:
            // within 2 slack of the maximum, so the f32 logits go to hardly more pairs
            // than are kept (a block's own lower bound, rising tile by tile from far
            // rows, let through 13 times the kept pairs at t = 0.44 on Fashion-MNIST).
            let mut lower = vec![f64::NEG_INFINITY; n_q];
            for (&(g, _), l) in tasks.iter().zip(&logits) {
                for (q, &lo) in groups[g].clone().zip(&l.lower) {
                    lower[q] = lower[q].max(lo);
                }
            }
            // Anchored: each block's best candidate gets its f32 logit, a lower bound on
            // the maximum far closer than the bounds' own (their slack is wider than the
            // reduced precision's).
            if anchored.is_some() {
                // (and the row that held the maximum in the last anchored call)
                // (one of this call's rows: a row remembered from a call on other rows
                // bounds nothing here)
                let mut cands: Vec<Vec<u32>> = (0..n_q)
                    .map(|q| {
                        let best = anchor.and_then(|a| a.best(q));
                        let here = best.filter(|p| positions.contains(p));
                        here.map(|p| p as u32).into_iter().collect()
                    })
                    .collect();
                for (&(g, _), l) in tasks.iter().zip(&logits) {
                    for (q, &(_, p)) in groups[g].clone().zip(&l.seeds) {
                        if p != u32::MAX {
                            cands[q].push(p);
                        }
                    }
                }
                let norms = ds.sq_norms();
                lower
                    .par_iter_mut()
                    .zip(&cands)
                    .enumerate()
                    .for_each(|(q, (lo, ps))| {
                        let mut one = Vec::new();
                        let x = &batch.x[q * dim..(q + 1) * dim];
                        for &p in ps {
                            let r = index.perm[p as usize] as usize;
                            let coefs = batch.logit_coefs[q];
                            let s =
                                exact_logit(ds, index, x, coefs, p as usize, norms[r], &mut one);
                            *lo = lo.max(s as f64);
                        }
                    });
            }
            let cuts: Vec<f32> = lower
                .iter()
                .zip(&thresholds)
                .map(|(lo, thr)| (lo + thr) as f32)
                .collect();
            tasks.par_iter().zip(&mut logits).for_each(|(&(g, b), l)| {
                let qs = groups[g].clone();
                screened_exact(ds, index, batch, qs.clone(), &blocks[b], &cuts[qs], l)
            });
        }
        t_logits += c1.elapsed().as_secs_f64();
        screened += logits.iter().map(|l| l.exact).sum::<u64>();
        // Each query's maximum over the chunk (ties to the lower stored row, as dense).
        let mut best = vec![(f32::NEG_INFINITY, u32::MAX); n_q];
        for (&(g, _), l) in tasks.iter().zip(&logits) {
            for (q, &cand) in groups[g].clone().zip(&l.best) {
                raise(&mut best[q], cand);
            }
        }
        // Per query, the drop cut from the chunk's share of the budget (see [`budget`]),
        // where every logit is exact or the screening's bounds lie under the per-sample
        // threshold (not the carried screening's).
        let c2 = std::time::Instant::now();
        let cuts = if screen != Screen::Carried && budget_cuts() {
            let views: Vec<budget::BlockView<'_>> = tasks
                .iter()
                .zip(&logits)
                .map(|(&(g, b), l)| budget::BlockView {
                    queries: groups[g].clone(),
                    block_len: blocks[b].len(),
                    logits: &l.s,
                    row_max: &l.row_max,
                })
                .collect();
            let share = cpos.len() as f64 / n_rows as f64;
            let screened = matches!(screen, Screen::Reduced | Screen::Anchored);
            budget::cuts(
                &views,
                &best,
                &thresholds,
                err,
                SAMPLE_BUDGET * share,
                screened,
            )
        } else {
            budget::Cuts::none(&thresholds)
        };
        t_cuts += c2.elapsed().as_secs_f64();
        // Per query group, its queries (local numbers) in the tile order of their maxima.
        let orders: Vec<Vec<usize>> = groups
            .iter()
            .map(|qs| {
                let mut o: Vec<usize> = (0..qs.len()).collect();
                o.sort_by_key(|&l| (index.pos[best[qs.start + l].1 as usize], l));
                o
            })
            .collect();
        // Kept for the next call's screening (see [`Carry`]) before phase 2 turns the
        // logits into weights, where the carry is on and the rows took one chunk.
        let keep = (carry_enabled() && n_chunks == 1)
            .then(|| logits.iter().map(|l| l.s.clone()).collect::<Vec<_>>());
        let sums: Vec<BlockSums> = tasks
            .par_iter()
            .zip(&mut logits)
            .map(|(&(g, b), l)| {
                let qs = groups[g].clone();
                block_sums(
                    ds,
                    index,
                    GroupQueries {
                        qs: qs.clone(),
                        best: &best[qs.clone()],
                        thresholds: &cuts.cut[qs],
                        order: &orders[g],
                    },
                    &blocks[b],
                    (&mut l.s, &l.row_max),
                    record,
                )
            })
            .collect();
        buffers.logits = logits.into_iter().map(|l| l.s).collect();

        // Merge the chunk: every block of a query shares its max, so this is an add; then
        // into the running state, rescaling the certificate with it.
        let before: Vec<f32> = run.states.iter().map(|s| s.max).collect();
        let mut dropped_chunk = vec![0.0f64; n_q];
        let mut parts = Vec::with_capacity(sums.len());
        for (&(g, _), s) in tasks.iter().zip(sums) {
            for (local, q) in groups[g].clone().enumerate() {
                dropped_chunk[q] += s.dropped[local];
                n_kept[q] += s.kept[local];
                if record {
                    kept_rows[q].extend_from_slice(&s.kept_rows[local]);
                }
            }
            pairs[0] += s.pairs[0];
            pairs[1] += s.pairs[1];
            parts.push(s.part);
        }
        run.absorb(&groups, &parts, 0);
        // Phase 2 bounds each tile's dropped weights by their count times the largest; where
        // the cut rose, the buckets' bound is the tighter one.
        for (d, b) in dropped_chunk.iter_mut().zip(&cuts.bound) {
            *d = b.map_or(*d, |b| d.min(b));
        }
        for q in 0..n_q {
            let m = run.states[q].max as f64;
            let old = if before[q] == f32::NEG_INFINITY {
                0.0
            } else {
                dropped[q] * (before[q] as f64 - m).exp()
            };
            dropped[q] = old + dropped_chunk[q] * (best[q].0 as f64 - m).exp();
        }
        if let Some(values) = keep {
            *carry = Some(Carry {
                rows: batch.rows.clone(),
                threads,
                x: batch.x.to_vec(),
                coefs: batch.logit_coefs.to_vec(),
                err: err.clone(),
                best_rows: best.iter().map(|b| b.1).collect(),
                s: values,
            });
        }
    }

    if profiling() {
        let all = (n_q * n_rows) as f64;
        eprintln!(
            "prune: sparse pass {:.3}s (logits {:.3}s{}, cuts {:.3}s): accumulated {:.4} of pairs ({:.4} by the block kernel, {:.4} by axpy)",
            clock.elapsed().as_secs_f64(),
            t_logits,
            if previous.is_some() {
                format!(", from the last call's, {:.4} of pairs exact", screened as f64 / all)
            } else if anchored.is_some() {
                let [in_grids, products] = GRID_PAIRS.each_ref().map(|c| c.swap(0, Relaxed));
                format!(
                    ", anchored screening {:.3}s, {:.4} of pairs exact, {:.2} of them in grids \
                     of {:.2}x the products",
                    t_screen,
                    screened as f64 / all,
                    in_grids as f64 / screened.max(1) as f64,
                    products as f64 / in_grids.max(1) as f64,
                )
            } else if let Some((panels, ..)) = &low_screen {
                format!(
                    ", {} screening {:.3}s, {:.4} of pairs exact",
                    panels.kind().name(),
                    t_screen,
                    screened as f64 / all
                )

            } else {
                String::new()
            },
            t_cuts,
            n_kept.iter().sum::<u64>() as f64 / all,
            pairs[0] as f64 / all,
            pairs[1] as f64 / all,
        );
    }
    let CpuPartial {
        states,
        acc,
        sum_norm,
    } = run;
    if states.iter().any(|s| s.sum == 0.0 || !s.sum.is_finite()) {
        return None;
    }
    // An anchor whose bounds let through far more pairs than count (a trajectory that
    // left it, e.g. another field took over) is not used again.
    if let Some(a) = anchor {
        let kept_all: u64 = n_kept.iter().sum();
        if screened as f64 > STALE_FACTOR * kept_all as f64 + STALE_SHARE * (n_q * n_rows) as f64 {
            a.mark_stale();
        }
    }
    if let (Some(products), AnchorUse::Record(slot)) = (anchor_products, &mut anchors) {
        **slot = Some(Anchor::new(index, batch, positions.clone(), products));
    }
    // Each query's maximum, for the next anchored call's seed.
    let anchor_now = match &anchors {
        AnchorUse::Read(a) => Some(*a),
        AnchorUse::Record(Some(a)) => Some(a),
        _ => None,
    };
    if let Some(a) = anchor_now {
        for (q, s) in states.iter().enumerate() {
            a.set_best(q, index.pos[s.argmax as usize] as usize);
        }
    }
    for (d, e) in dropped.iter_mut().zip(err) {
        *d *= (2.0 * e).exp();
    }
    let mut part = Partial::dense(dim, states, acc, sum_norm, n_rows, super::LEAF_ROWS);
    part.skipped_mass = dropped;
    // Skipped here means left out of the weighted sum (the logit was computed).
    part.samples_kept = n_kept;
    if let Some(k) = kept {
        *k = kept_rows;
    }
    Some(part)
}

/// Largest sample block [`kept_share`] keeps between calls (B = 4096 rows of D = 784: 12.8
/// MB).
const SAMPLE_BYTES: usize = 32 << 20;

/// [`kept_share`]'s sample rows, kept from call to call for one row range.
#[derive(Default)]
pub struct EstimateRows {
    rows: Range<usize>,
    values: Vec<f32>,
}

/// An estimate of the share of the weights the sparse pass would keep, from the exact
/// logits of `ESTIMATE_QUERIES` spread-out queries over `ESTIMATE_ROWS` evenly spaced rows
/// (the share of those within the drop threshold of their largest). The sample's maximum
/// is at most the true one, so the estimate errs high: towards the dense pass. About 0.5%
/// of a dense evaluation at B = 256.
///
/// `sample` keeps the sample's rows, gathered once per row range into one contiguous f32
/// block (where it stays under `SAMPLE_BYTES`; before, an f32 dataset's rows were read in
/// place with a stride and other storage was converted at every call), and the products
/// are taken row by row with `dots_with_row` (a GEMM of so few queries spent most of its
/// time packing the sample): 1.2 ms per call on Fashion-MNIST at B = 256 against 1.4 - 2.9
/// ms. What remains is reading the 12.8 MB sample from memory.
pub fn kept_share(ds: &Dataset, batch: &CentredBatch<'_>, sample: &mut EstimateRows) -> f64 {
    let dim = ds.dim();
    let n_q = batch.logit_coefs.len();
    let rows = batch.rows.clone();
    if n_q == 0 || rows.is_empty() {
        return 1.0;
    }
    let step = (rows.len() / ESTIMATE_ROWS).max(1);
    let picked: Vec<usize> = rows.clone().step_by(step).collect();
    let bytes = picked.len() * dim * 4;
    let gather = |out: &mut Vec<f32>| {
        out.resize(picked.len() * dim, 0.0);
        for (&r, o) in picked.iter().zip(out.chunks_exact_mut(dim)) {
            ds.stored_row(r, o);
        }
    };
    let mut gathered = Vec::new();
    let (ys, stride): (&[f32], usize) = match ds.values() {
        // Too large to keep: an f32 dataset's every step-th row in place (a strided
        // operand), other storage converted for this call.
        Values::F32(v) if bytes > SAMPLE_BYTES => (&v[rows.start * dim..], step * dim),
        _ if bytes > SAMPLE_BYTES => {
            gather(&mut gathered);
            (&gathered, dim)
        }
        _ => {
            if sample.rows != rows {
                sample.rows = rows.clone();
                gather(&mut sample.values);
            }
            (&sample.values, dim)
        }
    };
    let norms = ds.sq_norms();
    let ln_thr = (SAMPLE_BUDGET / batch.rows.len() as f64).ln() as f32;
    let queries: Vec<usize> = (0..n_q).step_by((n_q / ESTIMATE_QUERIES).max(1)).collect();
    let xs: Vec<f32> = queries
        .iter()
        .flat_map(|&q| batch.x[q * dim..(q + 1) * dim].iter().copied())
        .collect();
    // The products row by row (each sample row read once for all the queries; a GEMM of so
    // few queries spent most of its time packing the sample), rows split over the threads,
    // then laid out query-major.
    let n = picked.len();
    let x_rows: Vec<&[f32]> = xs.chunks_exact(dim).collect();
    let mut by_row = vec![0.0f32; n * x_rows.len()];
    by_row
        .par_chunks_mut(x_rows.len() * 256)
        .enumerate()
        .for_each(|(c, out)| {
            for (i, o) in out.chunks_exact_mut(x_rows.len()).enumerate() {
                let j = c * 256 + i;
                dots_with_row(&ys[j * stride..j * stride + dim], &x_rows, o);
            }
        });
    let mut s = vec![0.0f32; x_rows.len() * n];
    for (j, d) in by_row.chunks_exact(x_rows.len()).enumerate() {
        for (q, &v) in d.iter().enumerate() {
            s[q * n + j] = v;
        }
    }
    let shares: Vec<f64> = queries
        .iter()
        .zip(s.chunks_exact_mut(n))
        .map(|(&q, row)| {
            let [c_dot, c_norm] = batch.logit_coefs[q];
            for (v, &r) in row.iter_mut().zip(&picked) {
                *v = c_dot * *v - c_norm * norms[r];
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            row.iter().filter(|&&v| v >= m + ln_thr).count() as f64 / row.len() as f64
        })
        .collect();
    shares.iter().sum::<f64>() / shares.len() as f64
}

/// Phase 1 for queries `qs` over the positions `block`: the logits, tile by tile. With
/// `screen`, upper bounds on them from the reduced-precision dot products instead, and
/// per query the largest lower bound ([`screened_exact`] then computes in f32 the pairs
/// that may count).
#[allow(clippy::too_many_arguments)]
fn block_logits(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    qs: Range<usize>,
    block: &Range<usize>,
    lib: GemmLib,
    how: Phase1<'_>,
    mut s: Vec<f32>,
) -> BlockLogits {
    let Phase1 {
        screen,
        previous,
        anchored,
        record,
    } = how;
    let dim = ds.dim();
    let n_q = qs.len();
    let norms = ds.sq_norms();
    let x = &batch.x[qs.start * dim..qs.end * dim];
    // Only the unscreened pass computes every logit by GEMM.
    let queries = (screen.is_none() && previous.is_none() && anchored.is_none())
        .then(|| Queries::new(lib, x, dim));
    // (sized once: grown tile by tile, it was copied and page-faulted again and again)
    let mut products = Vec::with_capacity(if record { n_q * block.len() } else { 0 });
    let n_all = index.perm.len();
    let mut seeds = vec![(f32::NEG_INFINITY, u32::MAX); if anchored.is_some() { n_q } else { 0 }];
    sized(&mut s, n_q * block.len());
    let mut best = vec![(f32::NEG_INFINITY, u32::MAX); n_q];
    let mut lower = vec![f64::NEG_INFINITY; n_q];
    let mut exact = 0u64;
    let (mut y, mut scratch, mut one) = (Vec::new(), lowp::Scratch::default(), vec![0.0f32; dim]);
    let mut nsq = [0.0f32; TILE];
    let mut row_max = Vec::with_capacity(n_q * block.len().div_ceil(TILE));
    for (t0, out) in block.clone().step_by(TILE).zip(s.chunks_mut(n_q * TILE)) {
        let tile = t0..(t0 + TILE).min(block.end);
        let nt = tile.len();
        let rows = &index.perm[tile.clone()];
        if let Some(inc) = &previous {
            let prev = &inc.prev[(t0 - block.start) * n_q..][..n_q * nt];
            for (q, (row, old)) in out
                .chunks_exact_mut(nt)
                .zip(prev.chunks_exact(nt))
                .enumerate()
            {
                let [c_dot, c_norm] = batch.logit_coefs[qs.start + q];
                let k = inc.coefs[q];
                let xq = &x[q * dim..(q + 1) * dim];
                let b = &mut best[q];
                for (j, ((v, &o), &r)) in row.iter_mut().zip(old).zip(rows).enumerate() {
                    let n = norms[r as usize];
                    let hi = k.ratio * o + k.per_norm * n + k.per_y * n.sqrt() + k.add;
                    if hi < k.cut {
                        *v = hi;
                        continue;
                    }
                    *v = exact_logit(ds, index, xq, [c_dot, c_norm], t0 + j, n, &mut one);
                    exact += 1;
                    raise(b, (*v, r));
                }
                row_max.push(max_of(row));
            }
            continue;
        }
        index.sq_norms_at(ds, tile.clone(), &mut nsq);
        if let Some(an) = anchored {
            anchored_values(an, index, qs.clone(), tile.clone(), out);
            let tails = &index.lvl_tail[tile.start..tile.end];
            debug_assert!(tile.end <= n_all);
            for (q, row) in out.chunks_exact_mut(nt).enumerate() {
                let [c_dot, c_norm] = batch.logit_coefs[qs.start + q];
                let (ca, cc) = (an.terms.ca[qs.start + q], an.terms.cc[qs.start + q]);
                let k = [c_dot, c_norm, ca, 0.0, cc];
                let lo = screen_bounds(row, &nsq[..nt], tails, tails, k);
                lower[q] = lower[q].max(lo as f64);
                let (m, i) = max_first(row);
                if m > seeds[q].0 {
                    seeds[q] = (m, (t0 + i) as u32);
                }
                row_max.push(m);
            }
            continue;
        }
        let Some(scr) = &screen else {
            let queries = queries
                .as_ref()
                .expect("the unscreened pass has its queries");
            queries.dots(index.rows_at(ds, tile.clone(), &mut y), out);
            if record {
                products.extend_from_slice(out);
            }
            for (q, row) in out.chunks_exact_mut(nt).enumerate() {
                to_logits(row, &nsq[..nt], batch.logit_coefs[qs.start + q]);
                row_max.push(raise_to_row_max(&mut best[q], row, rows));
            }
            exact += (n_q * nt) as u64;
            continue;
        };
        scr.panels.dots(scr.xq, tile.clone(), out, &mut scratch);
        let (nsq, yn, ye) = (
            &nsq[..nt],
            &scr.panels.norms()[tile.clone()],
            &scr.panels.errs()[tile.clone()],
        );
        for (q, row) in out.chunks_exact_mut(nt).enumerate() {
            let [c_dot, c_norm] = batch.logit_coefs[qs.start + q];
            let [ca, cb, cc] = scr.slack[q].map(|v| v as f32);
            // Every pair's upper bound in place, and the largest lower bound. The pairs
            // that may reach the cut get their f32 logits in [`screened_exact`], once the
            // lower bounds of every block are known.
            let lo = screen_bounds(row, nsq, yn, ye, [c_dot, c_norm, ca, cb, cc]);
            lower[q] = lower[q].max(lo as f64);
            row_max.push(max_of(row));
        }
    }
    BlockLogits {
        s,
        best,
        lower,
        exact,
        products,
        seeds,
        row_max,
    }
}

/// How phase 1 gets a block's values: screened in reduced precision, from the last call's
/// values, from an anchor, or every logit by GEMM (then `record` keeps the products).
struct Phase1<'a> {
    screen: Option<Screening<'a>>,
    previous: Option<Incremental<'a>>,
    anchored: Option<&'a Anchored<'a>>,
    record: bool,
}

/// Per query of `qs` (n_q x tile.len() in `out`), gamma C + P r . P y over the positions
/// `tile`: the head products from each index tile's dimension-major block of head
/// coordinates (`PruneIndex::proj0t`, as the projected pass's), then the anchor's
/// products (see [`super::anchor`]).
fn anchored_values(
    an: &Anchored<'_>,
    index: &PruneIndex,
    qs: Range<usize>,
    tile: Range<usize>,
    out: &mut [f32],
) {
    let nt = tile.len();
    let (l0, hd) = (an.terms.l0, index.head_dims);
    let mut acc = [0.0f32; LEAF_ROWS];
    // Index tile by index tile, every query.
    let first = index
        .tiles
        .partition_point(|t| t.start + t.len <= tile.start);
    for (ti, t) in index.tiles.iter().enumerate().skip(first) {
        if t.start >= tile.end {
            break;
        }
        let (p, end) = (t.start.max(tile.start), (t.start + t.len).min(tile.end));
        let block = &index.proj0t[ti * hd * LEAF_ROWS..][..l0 * LEAF_ROWS];
        let (off, cols) = (p - t.start, p - tile.start..end - tile.start);
        for (row, q) in out.chunks_exact_mut(nt).zip(qs.clone()) {
            head_dots(block, &an.terms.rh[q * l0..(q + 1) * l0], &mut acc);
            let row = &mut row[cols.clone()];
            row.copy_from_slice(&acc[off..off + row.len()]);
            an.anchor.add_scaled(q, p, an.terms.gamma[q], row);
        }
    }
}

/// The screened pass's second step for queries `qs` over `block` (after every block's
/// [`block_logits`]): per tile, the pairs whose screening bound in `l.s` reaches the cut,
/// lower[q] + thresholds[q] (`lower` the largest lower bound over all blocks), get their
/// f32 logits in place of their bounds, computed in groups of rows (see the body); the
/// others stay (phase 2 drops them whatever their exact value, and the
/// certificate uses the bound). The pair behind lower[q] reaches the cut, so each query
/// gets an f32 logit at or above it in some block.
fn screened_exact(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    qs: Range<usize>,
    block: &Range<usize>,
    cuts: &[f32],
    l: &mut BlockLogits,
) {
    let dim = ds.dim();
    let n_q = qs.len();
    let norms = ds.sq_norms();
    let x = &batch.x[qs.start * dim..qs.end * dim];
    // Per row of a tile, its pending queries as bits (`words` per row).
    let words = n_q.div_ceil(64);
    let mut bits = vec![0u64; TILE * words];
    let (mut changed, mut with_pairs) = (Vec::new(), Vec::new());
    let (mut xs, mut d): (Vec<&[f32]>, Vec<f32>) = (Vec::new(), Vec::new());
    let (mut tile_rows, mut grid_queries, mut own) = (Vec::new(), Vec::new(), Vec::new());
    let mut slot = vec![0u32; n_q];
    // (without the tile-ordered rows: where row j of the tile lies in `tile_rows`)
    let mut row_slot = [0usize; TILE];
    let mut grid_bits = vec![0u64; words];
    for (t0, out) in block.clone().step_by(TILE).zip(l.s.chunks_mut(n_q * TILE)) {
        let nt = TILE.min(block.end - t0);
        let rows = &index.perm[t0..t0 + nt];
        let ti = (t0 - block.start) / TILE;
        let row_max = &mut l.row_max[ti * n_q..(ti + 1) * n_q];
        let bits = &mut bits[..nt * words];
        bits.fill(0);
        changed.clear();
        let mut n_pairs = 0u64;
        for (q, row) in out.chunks_exact(nt).enumerate() {
            if row_max[q] < cuts[q] {
                continue;
            }
            changed.push(q);
            let (w, shift, cut) = (q / 64, q % 64, cuts[q]);
            // Branch-free: a quarter of a row's values reach the cut at t = 0.3, at random.
            for (j, &v) in row.iter().enumerate() {
                let reach = u64::from(v >= cut);
                bits[j * words + w] |= reach << shift;
                n_pairs += reach;
            }
        }
        l.exact += n_pairs;
        if n_pairs == 0 {
            continue;
        }
        with_pairs.clear();
        with_pairs
            .extend((0..nt).filter(|&j| bits[j * words..(j + 1) * words].iter().any(|&b| b != 0)));
        // The rows where they lie in tile order, else only those with pairs converted.
        let tiled = index.tiled_rows(ds);
        if tiled.is_none() {
            tile_rows.resize(with_pairs.len() * dim, 0.0);
            for (i, (&j, o)) in with_pairs
                .iter()
                .zip(tile_rows.chunks_exact_mut(dim))
                .enumerate()
            {
                ds.stored_row(rows[j] as usize, o);
                row_slot[j] = i;
            }
        }
        let row = |j: usize| match tiled {
            Some(all) => &all[(t0 + j) * dim..(t0 + j + 1) * dim],
            None => &tile_rows[row_slot[j] * dim..(row_slot[j] + 1) * dim],
        };
        let mut put = |j: usize, q: usize, dq: f32| {
            let nsq = norms[rows[j] as usize];
            let [c_dot, c_norm] = batch.logit_coefs[qs.start + q];
            let v = c_dot * dq - c_norm * nsq;
            out[q * nt + j] = v;
            raise(&mut l.best[q], (v, rows[j]));
        };
        // Rows in groups of `GRID_ROWS`. The queries pending in at least two rows of a
        // group take one grid of products with all of its rows (register blocks, see
        // [`super::dots`]: a few products more, at about three times the rate); each row's
        // other queries then take the row's own products. Bitwise the same either way.
        for group in with_pairs.chunks(GRID_ROWS) {
            let of = |g: usize, w: usize| group.get(g).map_or(0, |&j| bits[j * words + w]);
            grid_queries.clear();
            for (w, gb) in grid_bits.iter_mut().enumerate() {
                let [a, b, c, e] = [0, 1, 2, 3].map(|g| of(g, w));
                // (set in at least two of the four)
                *gb = (a & b) | (a & c) | (a & e) | (b & c) | (b & e) | (c & e);
                for_bits(*gb, |i| {
                    let q = 64 * w + i;
                    slot[q] = grid_queries.len() as u32;
                    grid_queries.push(q);
                });
            }
            let width = grid_queries.len();
            if width > 0 {
                xs.clear();
                xs.extend(grid_queries.iter().map(|&q| &x[q * dim..(q + 1) * dim]));
                let group_rows: [&[f32]; GRID_ROWS] =
                    std::array::from_fn(|g| row(group[g.min(group.len() - 1)]));
                d.resize(group.len() * width, 0.0);
                dots_grid(&group_rows[..group.len()], &xs, &mut d);
                let mut used = 0;
                for (g, &j) in group.iter().enumerate() {
                    for (w, &gb) in grid_bits.iter().enumerate() {
                        for_bits(bits[j * words + w] & gb, |i| {
                            let q = 64 * w + i;
                            put(j, q, d[g * width + slot[q] as usize]);
                            used += 1;
                        });
                    }
                }
                if profiling() {
                    GRID_PAIRS[0].fetch_add(used, Relaxed);
                    GRID_PAIRS[1].fetch_add((group.len() * width) as u64, Relaxed);
                }
            }
            for &j in group {
                own.clear();
                for (w, &gb) in grid_bits.iter().enumerate() {
                    for_bits(bits[j * words + w] & !gb, |i| own.push(64 * w + i));
                }
                xs.clear();
                xs.extend(own.iter().map(|&q| &x[q * dim..(q + 1) * dim]));
                d.resize(own.len(), 0.0);
                dots_with_row(row(j), &xs, &mut d);
                for (&q, &dq) in own.iter().zip(&d) {
                    put(j, q, dq);
                }
            }
        }
        // The rows that changed.
        for &q in &changed {
            row_max[q] = max_of(&out[q * nt..(q + 1) * nt]);
        }
    }
}

/// Calls `f(i)` for every set bit i of `b`, ascending.
fn for_bits(mut b: u64, mut f: impl FnMut(usize)) {
    while b != 0 {
        f(b.trailing_zeros() as usize);
        b &= b - 1;
    }
}

/// `positions` cut into at most `threads` blocks of whole `TILE`s (the last may be
/// shorter): one per task of a query group.
pub(super) fn row_blocks(positions: Range<usize>, threads: usize) -> Vec<Range<usize>> {
    let n_tiles = positions.len().div_ceil(TILE);
    let per_block = n_tiles.div_ceil(threads.clamp(1, n_tiles.max(1))).max(1);
    (0..n_tiles)
        .step_by(per_block)
        .map(|t| {
            positions.start + t * TILE
                ..(positions.start + (t + per_block) * TILE).min(positions.end)
        })
        .collect()
}

/// `s` made `len` long, its values left as they are: every user writes them all first.
/// (A buffer taken back from [`Buffers`] keeps its pages: a fresh one of tens of MB costs
/// a page fault per 4 KB, 10 - 15 ms per call at B = 256 on Fashion-MNIST.)
fn sized(s: &mut Vec<f32>, len: usize) {
    if s.len() < len {
        s.resize(len, 0.0);
    }
    s.truncate(len);
}

/// Memory the sparse pass keeps from call to call: the chunk's logits (one buffer per
/// task; at most `LOGIT_BYTES` in all, unless ORACLEFLOW_PRUNE_CHUNK_KIB sets it).
#[derive(Default)]
pub struct Buffers {
    logits: Vec<Vec<f32>>,
}

/// `best` raised to `cand` (a logit and its stored row) where that is larger, ties to the
/// lower row (as the dense pass's first maximum in row order).
pub(super) fn raise(best: &mut (f32, u32), cand: (f32, u32)) {
    if cand.0 > best.0 || (cand.0 == best.0 && cand.1 < best.1) {
        *best = cand;
    }
}

/// `best` raised to the largest of a row of logits (`rows` their stored rows), as
/// [`raise`] for each in turn: the row's maximum first (vectorized), then its ties.
fn raise_to_row_max(best: &mut (f32, u32), row: &[f32], rows: &[u32]) -> f32 {
    let m = max_of(row);
    if m >= best.0 {
        for (&v, &r) in row.iter().zip(rows) {
            if v == m {
                raise(best, (v, r));
            }
        }
    }
    m
}

/// The f32 logit of query `xq` (coefficients `c_dot`, `c_norm`) with the row at position
/// `p` of the tile order (squared norm `norm`) by one dot product: a screened pass's value
/// for a pair its bound could not rule out ([`exact_logits_at`] with one row).
pub(super) fn exact_logit(
    ds: &Dataset,
    index: &PruneIndex,
    xq: &[f32],
    coefs: [f32; 2],
    p: usize,
    norm: f32,
    scratch: &mut Vec<f32>,
) -> f32 {
    let mut s = [0.0f32];
    exact_logits_at(ds, index, xq, coefs, (&[p], &[norm]), scratch, &mut s);
    s[0]
}

/// [`exact_logit`] for the rows at positions `ps` (at most [`EXACT_AT_ONCE`], squared norms
/// `norms`) at once, bitwise as one at a time: their products are independent sums, one
/// row's alone waits out its lanes' FMA latency (see [`super::dots`]). The rows are read
/// where the index keeps them in tile order, else converted into `scratch`.
pub(super) fn exact_logits_at(
    ds: &Dataset,
    index: &PruneIndex,
    xq: &[f32],
    [c_dot, c_norm]: [f32; 2],
    (ps, norms): (&[usize], &[f32]),
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (dim, n) = (index.dim, ps.len());
    assert!(n <= EXACT_AT_ONCE && norms.len() == n && out.len() == n);
    if n == 0 {
        return;
    }
    let tiled = index.tiled_rows(ds);
    if tiled.is_none() {
        scratch.resize(n * dim, 0.0);
        for (&p, o) in ps.iter().zip(scratch.chunks_exact_mut(dim)) {
            ds.stored_row(index.perm[p] as usize, o);
        }
    }
    let ys: [&[f32]; EXACT_AT_ONCE] = std::array::from_fn(|i| {
        let i = i.min(n - 1);
        match tiled {
            Some(rows) => &rows[ps[i] * dim..(ps[i] + 1) * dim],
            None => &scratch[i * dim..(i + 1) * dim],
        }
    });
    let mut d = [0.0f32; EXACT_AT_ONCE];
    dots_grid(&ys[..n], &[xq], &mut d[..n]);
    for ((o, &dq), &nsq) in out.iter_mut().zip(&d).zip(norms) {
        *o = c_dot * dq - c_norm * nsq;
    }
}

/// Most rows [`exact_logits_at`] takes at once.
pub(super) const EXACT_AT_ONCE: usize = 4;

/// Phase 2 for queries `qs` (with their chunk maxima `best` and drop thresholds) over the
/// positions `block`, whose logits `s` phase 1 computed: weights, sums, and the kept
/// weights' accumulation.
fn block_sums(
    ds: &Dataset,
    index: &PruneIndex,
    group: GroupQueries<'_>,
    block: &Range<usize>,
    (s, row_max): (&mut [f32], &[f32]),
    record: bool,
) -> BlockSums {
    let GroupQueries {
        qs,
        best,
        thresholds,
        order,
    } = group;
    let dim = ds.dim();
    let n_q = qs.len();
    // Sums over up to n kept weights: per tile and query in f32 lanes (as the dense pass's
    // per-tile sums), then in f64 (a running f32 sum of that many terms would carry
    // rounding far above the dense pass's).
    let mut sums = vec![[0.0f64; 4]; n_q];
    let mut out = BlockSums {
        part: CpuPartial::empty(n_q, dim),
        dropped: vec![0.0; n_q],
        kept: vec![0; n_q],
        kept_rows: vec![Vec::new(); if record { n_q } else { 0 }],
        pairs: [0; 2],
    };
    let mut y = Vec::new();
    let mut one = vec![0.0f32; dim];
    // The kernel's blocks of the current tile (see below), reused from tile to tile.
    let mut plan: Vec<(Range<usize>, Range<usize>, Range<usize>)> = Vec::new();
    let (mut plan_qs, mut plan_cols, mut plan_wt) = (Vec::new(), Vec::new(), Vec::new());
    let mut tile_norms = [0.0f32; TILE];
    let tiled = index.tiled_rows(ds);
    let mut kq = vec![0usize; n_q];
    let mut row_sum = RowSum::new(dim);
    // The kernel's sums in f32 over one tile at a time, then added to a running sum in
    // f64: consecutive tiles lie close together, so a running f32 sum over all of them
    // would grow with every tile and carry its rounding (8e-5 relative near alpha = 0 on
    // 1-d data, against dense's 6e-6). It costs about 5% of the pass at t = 0.32 on
    // Fashion-MNIST (0.009 s of 0.23).
    let mut tile_acc = vec![0.0f32; n_q * dim];
    let mut acc = vec![0.0f64; n_q * dim];
    for (t0, w) in block.clone().step_by(TILE).zip(s.chunks_mut(n_q * TILE)) {
        let tile = t0..(t0 + TILE).min(block.end);
        let nt = tile.len();
        let rows = &index.perm[tile.clone()];
        index.sq_norms_at(ds, tile.clone(), &mut tile_norms);
        kq.fill(0);
        let mut n_pairs = 0u64;
        for (q, row) in w.chunks_exact_mut(nt).enumerate() {
            let m = best[q].0;
            let cut = (m as f64 + thresholds[q]) as f32;
            // (count_from's result, where nothing reaches the cut)
            let top = row_max[(t0 - block.start) / TILE * n_q + q];
            let (kept, below_max) = if top < cut {
                (0, top)
            } else {
                count_from(row, cut)
            };
            if kept < nt {
                // Each dropped weight is at most exp(below_max - m) (times exp(2 err), at the end).
                out.dropped[q] += (nt - kept) as f64 * (below_max as f64 - m as f64).exp();
            }
            if kept == 0 {
                continue;
            }
            kq[q] = kept;
            if record {
                let kept_here = row.iter().zip(rows).filter(|(v, _)| **v >= cut);
                out.kept_rows[q].extend(kept_here.map(|(_, &r)| r));
            }
            let tile_sums = weigh_kept(row, m, cut, &tile_norms[..nt]);
            for (a, v) in sums[q].iter_mut().zip(tile_sums) {
                *a += v as f64;
            }
            out.kept[q] += kept as u64;
            n_pairs += kept as u64;
        }
        if n_pairs == 0 {
            continue;
        }
        // Blocks of queries whose maxima lie close in the tile order keep close weights:
        // per block, the kernel over its union of kept columns where that union is dense
        // for it, else one axpy per kept weight. The kernel's blocks (queries, columns and
        // packed weights, as ranges of the plan's buffers) are then summed strip by strip
        // of coordinates, so that the tile's rows stay in cache for every block (see
        // `accumulate::STRIP`).
        plan.clear();
        plan_qs.clear();
        plan_cols.clear();
        plan_wt.clear();
        for g in order.chunks(QUERY_BLOCK) {
            let k_g: usize = g.iter().map(|&q| kq[q]).sum();
            if k_g == 0 {
                continue;
            }
            let mut union = [false; TILE];
            for &q in g.iter().filter(|&&q| kq[q] > 0) {
                for (u, &e) in union.iter_mut().zip(&w[q * nt..(q + 1) * nt]) {
                    *u |= e != 0.0;
                }
            }
            let c0 = plan_cols.len();
            plan_cols.extend((0..nt).filter(|&j| union[j]));
            let nc = plan_cols.len() - c0;
            if (g.len() * nc) as f64 <= AXPY_COST * k_g as f64 {
                // The queries with none kept still hold logits in their rows: left out.
                let q0 = plan_qs.len();
                plan_qs.extend(g.iter().copied().filter(|&q| kq[q] > 0));
                let w0 = plan_wt.len();
                pack_into(w, nt, &plan_qs[q0..], &plan_cols[c0..], &mut plan_wt);
                out.pairs[0] += ((plan_qs.len() - q0) * nc) as u64;
                plan.push((q0..plan_qs.len(), c0..plan_cols.len(), w0..plan_wt.len()));
            } else {
                plan_cols.truncate(c0);
                // One axpy per kept weight, each row read on its own (`RowSum`: in chunks,
                // into the f64 sums).
                for &q in g.iter().filter(|&&q| kq[q] > 0) {
                    let acc = &mut acc[q * dim..(q + 1) * dim];
                    for (j, &e) in w[q * nt..(q + 1) * nt].iter().enumerate() {
                        if e != 0.0 {
                            let y = index.rows_at(ds, t0 + j..t0 + j + 1, &mut one);
                            row_sum.add(e, y, acc);
                        }
                    }
                    row_sum.finish(acc);
                }
                out.pairs[1] += k_g as u64;
            }
        }
        if !plan.is_empty() {
            if tiled.is_none() {
                index.rows_at(ds, tile.clone(), &mut y);
            }
            let y = tiled.map_or(&y[..], |rows| &rows[t0 * dim..(t0 + nt) * dim]);
            for d0 in (0..dim).step_by(STRIP) {
                let dims = d0..(d0 + STRIP).min(dim);
                for (qs, cols, wt) in &plan {
                    let (qs, cols) = (&plan_qs[qs.clone()], &plan_cols[cols.clone()]);
                    accumulate(
                        &plan_wt[wt.clone()],
                        y,
                        dim,
                        dims.clone(),
                        qs,
                        cols,
                        &mut tile_acc,
                    );
                }
            }
        }
        for q in (0..n_q).filter(|&q| kq[q] > 0) {
            let sums = &mut tile_acc[q * dim..(q + 1) * dim];
            for (a, v) in acc[q * dim..(q + 1) * dim].iter_mut().zip(sums.iter_mut()) {
                *a += *v as f64;
                *v = 0.0;
            }
        }
    }
    for (o, &a) in out.part.acc.iter_mut().zip(&acc) {
        *o = a as f32;
    }
    for (q, st) in out.part.states.iter_mut().enumerate() {
        let [sum, sum_shifted_logit, sum_sq, sum_norm] = sums[q];
        out.part.sum_norm[q] = sum_norm as f32;
        *st = SoftmaxState {
            max: best[q].0,
            sum: sum as f32,
            sum_shifted_logit: sum_shifted_logit as f32,
            sum_sq: sum_sq as f32,
            // Every block of the chunk carries the chunk's argmax, so merging them keeps it.
            argmax: best[q].1,
        };
    }
    out
}

multiversion! {
    /// One (tile, query) row of logits `s` (maximum `m`) turned into weights in place:
    /// exp(s - m) where s reaches `cut`, else 0; returns the row's sums of e, e (s - m),
    /// e^2 and e |y|^2 (`norms` the rows' |y|^2).
    fn weigh_kept(s: &mut [f32], m: f32, cut: f32, norms: &[f32]) -> [f32; 4] = weigh_kept_body;
}

/// [`weigh_kept`]: branch-free, the exponentials of a block in a plain map (what LLVM's
/// loop vectorizer handles), then the sums in independent lanes (as the dense pass's
/// `weigh`).
#[inline(always)]
fn weigh_kept_body(s: &mut [f32], m: f32, cut: f32, norms: &[f32]) -> [f32; 4] {
    const LANES: usize = 8;
    const BLOCK: usize = 64;
    let mut lanes = [[0.0f32; LANES]; 4];
    let mut e = [0.0f32; BLOCK];
    for (block, nb) in s.chunks_mut(BLOCK).zip(norms.chunks(BLOCK)) {
        let e = &mut e[..block.len()];
        for (e, &v) in e.iter_mut().zip(block.iter()) {
            let x = exp_nonpositive(v - m);
            *e = if v >= cut { x } else { 0.0 };
        }
        for (j, ((v, &e), &n)) in block.iter_mut().zip(e.iter()).zip(nb).enumerate() {
            let l = j % LANES;
            let d = if e > 0.0 { *v - m } else { 0.0 };
            lanes[0][l] += e;
            lanes[1][l] += e * d;
            lanes[2][l] += e * e;
            lanes[3][l] += e * n;
            *v = e;
        }
    }
    lanes.map(|l| l.iter().sum::<f32>())
}

multiversion! {
    /// One (tile, query) row of screening products (bf16 or int16) `v` turned in place into upper
    /// bounds on the f32 logits, c_dot v - c_norm |y|^2 + slack (slack = ca |y - y~| +
    /// cb |y~| + cc, `k` = [c_dot, c_norm, ca, cb, cc]); returns the largest lower bound,
    /// c_dot v - c_norm |y|^2 - slack (-inf for an empty row).
    fn screen_bounds(v: &mut [f32], nsq: &[f32], yn: &[f32], ye: &[f32], k: [f32; 5]) -> f32 = screen_bounds_body;
}

/// [`screen_bounds`]: one pass in independent lanes.
#[inline(always)]
fn screen_bounds_body(v: &mut [f32], nsq: &[f32], yn: &[f32], ye: &[f32], k: [f32; 5]) -> f32 {
    const L: usize = 16;
    let [c_dot, c_norm, ca, cb, cc] = k;
    let n = v.len().min(nsq.len()).min(yn.len()).min(ye.len());
    let (v, nsq, yn, ye) = (&mut v[..n], &nsq[..n], &yn[..n], &ye[..n]);
    let mut lo = [f32::NEG_INFINITY; L];
    let step = |v: &mut f32, n: f32, yl: f32, el: f32, lo: &mut f32| {
        let base = c_dot * *v - c_norm * n;
        let slack = ca * el + cb * yl + cc;
        let l = base - slack;
        *lo = if l > *lo { l } else { *lo };
        *v = base + slack;
    };
    let mut vc = v.chunks_exact_mut(L);
    let (mut nc, mut yc, mut ec) = (nsq.chunks_exact(L), yn.chunks_exact(L), ye.chunks_exact(L));
    for (((v, n), y), e) in (&mut vc).zip(&mut nc).zip(&mut yc).zip(&mut ec) {
        for i in 0..L {
            step(&mut v[i], n[i], y[i], e[i], &mut lo[i]);
        }
    }
    let rest = vc.into_remainder();
    for (i, v) in rest.iter_mut().enumerate() {
        step(
            v,
            nc.remainder()[i],
            yc.remainder()[i],
            ec.remainder()[i],
            &mut lo[i],
        );
    }
    lo.into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

multiversion! {
    /// How many of `s` reach `cut`, and the largest of the others (-inf if none).
    pub(super) fn count_from(s: &[f32], cut: f32) -> (usize, f32) = count_from_body;
}

/// [`count_from`]: one pass in independent lanes of compares and selects, so that it
/// vectorizes (`f32::max`'s NaN rules kept it from vectorizing well; a closure need not be
/// inlined into the ISA's version).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (fixed-length indexed lanes: see the body)
fn count_from_body(s: &[f32], cut: f32) -> (usize, f32) {
    const LANES: usize = 16;
    let (mut kept, mut below) = ([0u32; LANES], [f32::NEG_INFINITY; LANES]);
    // Whole chunks of fixed length first (so that the lanes stay in registers; a shorter
    // last chunk in the same loop made LLVM keep them in memory behind masked stores), then
    // the rest.
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[f32; LANES] = c.try_into().expect("LANES long");
        for l in 0..LANES {
            let keep = c[l] >= cut;
            kept[l] += keep as u32;
            let v = if keep { f32::NEG_INFINITY } else { c[l] };
            below[l] = if v > below[l] { v } else { below[l] };
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let keep = v >= cut;
        kept[l] += keep as u32;
        let v = if keep { f32::NEG_INFINITY } else { v };
        below[l] = if v > below[l] { v } else { below[l] };
    }
    let mut largest = f32::NEG_INFINITY;
    for b in below {
        largest = if b > largest { b } else { largest };
    }
    (kept.iter().sum::<u32>() as usize, largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The vector versions of phase 2's row steps (whichever this CPU runs) equal the
    /// baseline bitwise and a plain f64 evaluation.
    #[test]
    fn row_steps_match_the_baseline_and_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for n in [0usize, 1, 7, 8, 15, 16, 17, 64, 65, 256, 1000] {
            let row: Vec<f32> = (0..n).map(|_| -60.0 * rng.random::<f32>()).collect();
            let norms: Vec<f32> = (0..n).map(|_| 10.0 * rng.random::<f32>()).collect();
            let cut = -20.0f32;
            let want_kept = row.iter().filter(|&&v| v >= cut).count();
            let want_below = row
                .iter()
                .filter(|&&v| v < cut)
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(count_from(&row, cut), (want_kept, want_below));
            assert_eq!(count_from_body(&row, cut), (want_kept, want_below));
            let (mut a, mut b) = (row.clone(), row.clone());
            let sa = weigh_kept(&mut a, 0.0, cut, &norms);
            let sb = weigh_kept_body(&mut b, 0.0, cut, &norms);
            assert_eq!(sa.map(f32::to_bits), sb.map(f32::to_bits));
            assert_eq!(a, b);
            let mut want = [0.0f64; 4];
            for ((&v, &n), &w) in row.iter().zip(&norms).zip(&a) {
                let e = if v >= cut { (v as f64).exp() } else { 0.0 };
                assert!((w as f64 - e).abs() <= 2.5e-7 * e);
                let d = if v >= cut { v as f64 } else { 0.0 };
                want[0] += e;
                want[1] += e * d;
                want[2] += e * e;
                want[3] += e * n as f64;
            }
            for (got, want) in sa.iter().zip(want) {
                assert!((*got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30));
            }
        }
    }

    /// The screening bounds step (whichever version this CPU runs) gives bitwise
    /// the per-pair formulas it replaced, and its lower bound is their largest.
    #[test]
    fn screen_bounds_match_the_per_pair_formulas() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let k = [3.5f32, 1.25, 0.8, 0.003, 1e-3];
        let [c_dot, c_norm, ca, cb, cc] = k;
        for n in [0usize, 1, 15, 16, 17, 33, 256] {
            let mut draw =
                |scale: f32| -> Vec<f32> { (0..n).map(|_| scale * rng.random::<f32>()).collect() };
            let (v, nsq, yn, ye) = (draw(40.0), draw(30.0), draw(6.0), draw(0.05));
            let mut want_lo = f32::NEG_INFINITY;
            let mut want = v.clone();
            for (((w, &n), &yl), &el) in want.iter_mut().zip(&nsq).zip(&yn).zip(&ye) {
                want_lo = want_lo.max(c_dot * *w - c_norm * n - (ca * el + cb * yl + cc));
                *w = c_dot * *w - c_norm * n + (ca * el + cb * yl + cc);
            }
            let (mut got, mut base) = (v.clone(), v.clone());
            let lo = screen_bounds(&mut got, &nsq, &yn, &ye, k);
            let lo_base = screen_bounds_body(&mut base, &nsq, &yn, &ye, k);
            assert_eq!(got, want);
            assert_eq!(base, want);
            assert_eq!(lo.to_bits(), want_lo.to_bits());
            assert_eq!(lo_base.to_bits(), want_lo.to_bits());
        }
    }
}
