//! The projected pass: per-sample bounds for every (query, row) pair from GEMMs over the
//! leading projected coordinates, f32 logits only for the pairs they cannot rule out.
//!
//! Late in a trajectory the weights that count are a few per query. The pruned pass
//! ([`super::partial`]) finds them through tile bounds and per-pair screening, query by
//! query: at t = 0.8 - 0.9 on Fashion-MNIST its bounds and screening took 25 - 45 ms at
//! B = 256, about an eighth of a GEMM's rate. Here one GEMM of the queries' first
//! `levels[l]` projected coordinates against the rows' (the index's `proj`, tile order)
//! bounds every pair at once, at levels[l] / D of the logits' GEMM (16 of 784 coordinates:
//! a fiftieth). Per pair, |x - a y|^2 >= |P_l x - a P_l y|^2 + (|x - P_l x| - a |y - P_l y|)^2
//! (the module docs of `prune`) gives an upper bound on its f32 logit, with the same margin
//! and rounding terms as the pruned pass.
//!
//! **Seed, then one sweep.** (1) Per query, the f32 logits of the `SEED_ROWS` rows nearest
//! to it in the first level's coordinates among those of its `SEED_TILES` nearest tiles
//! (by projected centroid in the head coordinates): their largest is a lower bound on its
//! f32 maximum, so the drop cut lower + ln(`SAMPLE_BUDGET` / n) - 2 err holds from the
//! first tile of (2). A seed below the maximum costs refinements until the sweep reaches
//! the maximum's tile. (Seeding from each task's largest 16-coordinate bound instead
//! computed 4.5 times as many logits at t = 0.7.) (2) Per tile: the bounds at the pass's
//! level (16, 64 or 128 coordinates, by
//! the estimated kept share); the pairs that reach the cut get the bound of the last level
//! (all k coordinates, one dot product with the row's projection), and those still
//! reaching it their f32 logit, which raises the lower bound. Where a quarter of a
//! (query, tile) row's pairs reach the cut, the whole row gets the last level's bound
//! from one GEMM with the tile's rows ([`dense_bounds`]). Only those logits are kept,
//! per query, with their positions; a task that computes over `MAX_COMPUTED` of its
//! pairs gives the call up.
//!
//! **Tile bounds first, at the first level.** Where the pass runs at 16 coordinates (the
//! latest calls), each (query, index tile) pair is bounded first, from one GEMM of the
//! queries' projections with the tiles' centroids: |Px - a y| >= |Px - a c| - a r over
//! the projection and ||Rx| - a |Ry|| >= dist(|Rx|, a [rlo, rhi]) over the residual (the
//! ball bound of the pruned pass, same margin). A tile whose bound is below a query's cut
//! is ruled out whole for that query; the pairs' bounds are then taken tile by tile, for
//! the queries that may need the tile only, as vector FMAs over the tile's
//! dimension-major block of head coordinates. On Fashion-MNIST (B = 256) they rule out
//! 66% of the (query, tile) pairs at t = 0.8 and 82% at t = 0.9; single evaluations on a
//! 2-core AMD EPYC (Zen 3, AVX2), interleaved: t = 0.9 and 0.95 in 0.023 - 0.026 s against
//! 0.029 - 0.033, t = 0.85 0.030 - 0.032 against 0.032 - 0.035, t = 0.8 the same (0.038 -
//! 0.043). At 64 coordinates (t < 0.76 or so) they rule out too few to pay: t = 0.6 - 0.75
//! ran 0 - 10% slower with them.
//!
//! **Weights and certificate.** Per query, m is the largest computed logit (the f32
//! maximum: no pair left out can reach it) and the computed logits at or above
//! m + ln(`SAMPLE_BUDGET` / n) - 2 err get their weights exp(s - m), summed in f64, their
//! rows added one axpy each. Every pair left out, by bound or below the cut, weighs at most
//! `SAMPLE_BUDGET` / n of the normaliser, as in the sparse pass (see its module docs: the
//! same margin, so the same argument that no f32 result can change). The certificate sums
//! (per tile and query) the count of pairs ruled out times exp of the largest of their
//! bounds (in units of the running lower bound, rescaled as it rises), plus the dropped
//! weights, times exp(2 err) for the f32 logits' rounding (added in logs: near t = 1,
//! 2 err reaches hundreds of nats, which only lowers the cut), plus the tiles ruled out
//! whole, their rows times exp of their bound (kept in units of exp(cut), rounded up).
//!
//! **When.** Where the estimated kept share is small (see `CpuBackend`). Measured on
//! Fashion-MNIST (numpy, bounds against the true maximum): 64 coordinates let through 18%
//! of the pairs at t = 0.6, 3.6% at 0.7 and 0.26% at 0.8; all 256 4.9%, 0.46% and 0.01%.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

use super::anchor::{self, project_queries, Anchor, Residuals};
use super::dots::{dot, dots_grid};
use super::screen::{prefetch, RowSum, ROWS_AHEAD};
use super::sparse::{
    count_from, exact_logit, exact_logits_at, row_blocks, PassInputs, Setup, EXACT_AT_ONCE, TILE,
};
use super::{
    env_number, level_norms, logit_geometry, row_keys, smallest, sum_sq, PruneIndex, BOX_DIMS,
    LB_MARGIN, LEAF_ROWS, SEED_ROWS,
};
use crate::dataset::Dataset;
use crate::oracle::cpu::{large_gemm_lib, query_groups, sgemm_with, to_logits, Gemm, GemmLib};
use crate::oracle::partial::Partial;
use crate::oracle::simd::multiversion;
use crate::oracle::state::exp_nonpositive;
use crate::oracle::{CentredBatch, SoftmaxState};

/// Largest estimated kept share (`sparse::kept_share`) at which the caller runs this
/// pass. On Fashion-MNIST (B = 256, 2 threads, `ORACLEFLOW_PRUNE_AT`), with the seeding
/// of [`SEED_TILES`]: at t = 0.6 (estimate 2.7e-3) it ran at 0.066 s against 0.072 - 0.076
/// for the sparse pass with bf16 screening; at t = 0.58 (3.5e-3) at 0.073 - 0.086 against
/// 0.074; at t = 0.56 (5.1e-3) at 0.095 against 0.076 - 0.082. (Before that seeding,
/// 2e-3: at t = 0.6 it ran as the bf16 pass.)
pub const MAX_SHARE: f64 = 3e-3;

/// [`MAX_SHARE`] against a sparse pass without the bf16 screening (a CPU without AVX-512
/// BF16), whose logits then cost a whole f32 GEMM. On Fashion-MNIST (B = 256, 2-core AMD
/// EPYC Zen 3, AVX2, best of 3 single evaluations in two interleaved rounds): at t = 0.54
/// (estimate 7.3e-3) this pass ran in 0.19 s against 0.21 - 0.25 for the sparse pass, at
/// t = 0.56 and 0.58 in 0.15 - 0.16 and 0.13 against 0.24 - 0.28 and 0.22 - 0.25; at t =
/// 0.52 (about 1e-2) in 0.23 - 0.27 against 0.17 - 0.23. With the GEMM of `dense_bounds`
/// (stop 16, same CPU, three interleaved rounds): t = 0.52 (1.05e-2) in 0.13 - 0.16 s
/// against 0.17 - 0.23; t = 0.5 (1.4e-2) 0.16 - 0.17 against 0.17 - 0.23; at t = 0.48
/// (1.9e-2) it gave the call up (over `MAX_COMPUTED`) and the sparse pass ran after it.
pub const MAX_SHARE_F32: f64 = 1.2e-2;

/// [`MAX_SHARE`] against a sparse pass screening in int16 (AVX2). Same machine and data
/// as [`MAX_SHARE_F32`], two interleaved rounds: at t = 0.52 (estimate 1.05e-2) the
/// screened sparse pass ran in 0.155 - 0.182 s against 0.179 - 0.231 for this pass, at
/// t = 0.54 (7.3e-3) 0.156 - 0.162 against 0.149 - 0.179, at t = 0.56 (5.1e-3) 0.18
/// against 0.128 - 0.155.
pub const MAX_SHARE_INT16: f64 = 8e-3;

/// The largest estimated kept share at which the caller runs this pass, by the kernel
/// the sparse pass would screen with (`None`: its logits in f32): [`MAX_SHARE`] for bf16,
/// [`MAX_SHARE_INT16`], else [`MAX_SHARE_F32`]; ORACLEFLOW_PRUNE_PROJ_MAX_SHARE overrides
/// them (read per call).
pub fn max_share(screening: Option<super::lowp::Kind>) -> f64 {
    let tuned = match screening {
        Some(super::lowp::Kind::Bf16) => MAX_SHARE,
        Some(super::lowp::Kind::Int16) => MAX_SHARE_INT16,
        None => MAX_SHARE_F32,
    };
    env_number("ORACLEFLOW_PRUNE_PROJ_MAX_SHARE").unwrap_or(tuned)
}

/// Tiles whose rows the seeding ranks per query (see [`seed_lower`]). With the nearest
/// tile alone, 43% of the queries of a Fashion-MNIST call (B = 256, t = 0.7 - 0.9) were
/// seeded below their maximum, by 150 - 2000 nats, and every pair before their maximum's
/// tile was refined against that loose cut; with 8, a tenth were. Measured
/// (`ORACLEFLOW_PRUNE_AT`): t = 0.62, 0.7, 0.8, 0.9 in 0.057, 0.036, 0.023, 0.017 s
/// against 0.066, 0.044, 0.027, 0.021 (16 tiles: no faster; 32: slower).
const SEED_TILES: usize = 8;

/// See [`dense_bounds`].
const DENSE_REFINE: usize = 4;

/// Whether the sweep takes the f32 logits of the pairs that reach the cut at the pass's
/// level at once, without the last level's bound: that bound costs k multiply-adds a pair
/// against the logit's D, so where k is at least D / 2 it can save at most as much as it
/// costs. Rows where a quarter of the pairs reach the cut take their logits from one grid
/// (as their bounds otherwise, [`dense_bounds`]); a logit below the cut counts as a bound.
/// On `mixture:200000,256,50` (k = D = 256; B = 64, 20 Euler steps, 2-core Zen 5) the
/// late sweeps took 8 ms against 12.3 where each query keeps its component's 4000 rows.
/// The weights are the same bits either way: every pair that reaches the cut gets its
/// logit, by the same products. ORACLEFLOW_PRUNE_DIRECT=0 or 1 overrides it (per call).
fn direct_logits(k: usize, dim: usize) -> bool {
    2 * k >= dim
}

/// Queries per parallel block of the per-call GEMMs before the sweep (the queries'
/// projections, their products with the tiles' centroids), and tiles per block of the
/// tile bounds. These steps ran as two halves, written for two threads (and the seeds'
/// GEMM whole): on a 16-thread Xeon a t = 0.9 call took 13.7 ms, where the sweep's tasks,
/// list-scheduled on 16 workers from their one-thread times on Zen 3, need about 2 ms.
/// Fixed sizes, not a share of the threads: a row's product is the same bits in any
/// block (tested at these shapes), so the results do not depend on the machine's
/// threads.
const PAR_QUERIES: usize = 32;
const PAR_TILES: usize = 128;

/// Largest share of a task's pairs whose f32 logits the pass computes before it gives the
/// call up (its memory, 8 bytes a pair, and time then go to another pass). On
/// Fashion-MNIST it computes at most 1.8% (t = 0.64, estimated kept share 1.6e-3).
const MAX_COMPUTED: f64 = 0.1;

/// [`MAX_COMPUTED`], or ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED (read per call; the tests set
/// 0 to make the pass give up and its fallback run).
fn max_computed() -> f64 {
    env_number("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED").unwrap_or(MAX_COMPUTED)
}

/// Whether the pass may run (ORACLEFLOW_PRUNE_PROJECTED=0 turns it off, for comparisons:
/// the bounds pass and the bf16 screening then take its calls).
pub fn enabled() -> bool {
    !std::env::var("ORACLEFLOW_PRUNE_PROJECTED").is_ok_and(|v| v == "0")
}

/// The level (index in `LEVELS`) of the pass's GEMM for an estimated kept share: the more
/// weights count, the more pairs a coarse bound lets through to the row-by-row refinement,
/// and the deeper the GEMM pays. Measured on Fashion-MNIST as for [`MAX_SHARE`], pass time
/// at levels 16 / 64 / 128 coordinates: t = 0.6 - / 0.066 / 0.067, t = 0.62 0.071 /
/// 0.056 / 0.058 s, t = 0.66 0.053 / 0.042 / 0.049, t = 0.7 0.040 / 0.035 / 0.041, t = 0.75
/// 0.028 / 0.029 / 0.036, t = 0.8 0.022 / 0.024 / 0.034 (estimates 2.7e-3, 2.0e-3, -,
/// 7e-4, -, 2.9e-4). ORACLEFLOW_PRUNE_PROJ_LEVEL overrides it.
fn level(share: f64) -> usize {
    env_number("ORACLEFLOW_PRUNE_PROJ_LEVEL").unwrap_or(if share > 3.5e-4 { 1 } else { 0 })
}

/// Per query, what its bounds need, in f32 (the bounds' rounding is far inside the
/// margin, see the module docs of `prune`).
#[derive(Clone, Copy)]
struct QueryProj {
    a: f32,
    a2: f32,
    /// 1 / (2 sigma^2)
    inv: f32,
    /// inv |x|^2 + err: the bound at distance 0 (err the f32 logit's rounding bound)
    top: f32,
    /// `LB_MARGIN` (|x| + a |y|max)^2, taken off every distance bound
    margin: f32,
    /// |P_l x|^2 and |x - P_l x| at each level of `Projection::levels`
    sq: [f32; 2],
    tail: [f32; 2],
}

/// The queries' projections and bound terms for one call.
struct Projection<'a> {
    k: usize,
    /// indices in the index's levels: the pass's (its GEMM) and the last
    levels: [usize; 2],
    /// n_q x k: the projections the pairs' bounds take, the queries' own, or with an
    /// anchor those of r = x - gamma c (see [`super::anchor`]); and their residual norms
    px: Vec<f32>,
    rx: Vec<f32>,
    queries: Vec<QueryProj>,
    /// the anchor and per query its gamma: each pair's partial product then gains
    /// gamma c . y, the anchor's stored product
    anchor: Option<(&'a Anchor, Vec<f32>)>,
}

/// Which of `Projection::levels` a bound is taken at.
#[derive(Clone, Copy)]
enum At {
    Pass = 0,
    Last = 1,
}

impl<'a> Projection<'a> {
    /// `None` where some query cannot be pruned (alpha = 0, coefficients not finite).
    fn new(
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        setup: &Setup,
        level: usize,
    ) -> Option<Projection<'a>> {
        let k = index.k;
        let last = index.levels.len() - 1;
        let levels = [level.min(last), last];
        // Blocks of queries side by side (the GEMMs run single-threaded: at B = 256 this
        // step took 2 ms of a 17 ms evaluation at t = 0.9; see [`PAR_QUERIES`]).
        let (px, rx) = project_queries(index, batch.x);
        let queries = Self::terms(index, batch, setup, levels, (&px, &rx), None)?;
        Some(Projection {
            k,
            levels,
            px,
            rx,
            queries,
            anchor: None,
        })
    }

    /// The same queries' projection for bounds from `anchor` (see [`super::anchor`]);
    /// `None` (and the anchor marked stale) where it does not serve them:
    /// x . y = gamma c . y + r . y with r = x - gamma c, and r . y <= P_l r . P_l y +
    /// |r - P_l r| |y - P_l y|. In the distance form of [`bounds`] that is |P_l x|^2 :=
    /// |x|^2 - |r - P_l r|^2 and |x - P_l x| := |r - P_l r|, with gamma c . y added to
    /// each partial product ([`Self::add_anchor`]).
    /// At the first level (the pass's GEMM at `LEVELS[0]` coordinates), without the
    /// queries' own full projection (only r's is taken, see `Anchor::residuals`).
    fn anchored(
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        setup: &Setup,
        anchor: &'a Anchor,
    ) -> Option<Projection<'a>> {
        let res = anchor.residuals(index, batch);
        if !res.useful {
            anchor.mark_stale();
            return None;
        }
        let levels = [0, index.levels.len() - 1];
        let queries = Self::terms(
            index,
            batch,
            setup,
            levels,
            (&res.proj, &res.resid),
            Some(&res),
        )?;
        Some(Projection {
            k: index.k,
            levels,
            px: res.proj,
            rx: res.resid,
            queries,
            anchor: Some((anchor, res.gamma)),
        })
    }

    /// Per query its bound terms from the projections `px` and residual norms `rx` the
    /// bounds take (the queries' own, or r's with the anchor's `res`).
    fn terms(
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        setup: &Setup,
        levels: [usize; 2],
        (px, rx): (&[f32], &[f32]),
        res: Option<&Residuals>,
    ) -> Option<Vec<QueryProj>> {
        let (dim, k) = (index.dim, index.k);
        let n_q = batch.logit_coefs.len();
        let y_max = setup.y_max();
        let (mut sq, mut tail) = (Vec::new(), Vec::new());
        let mut queries = Vec::with_capacity(n_q);
        for q in 0..n_q {
            let (a, inv) = logit_geometry(batch.logit_coefs[q].map(|v| v as f64))?;
            let x = &batch.x[q * dim..(q + 1) * dim];
            let x_sq = sum_sq(x);
            sq.clear();
            tail.clear();
            level_norms(
                &px[q * k..(q + 1) * k],
                rx[q],
                &index.levels,
                &mut sq,
                &mut tail,
            );
            let margin = match res {
                None => LB_MARGIN * (x_sq.sqrt() + a * y_max).powi(2),
                Some(r) => {
                    for (s, t) in sq.iter_mut().zip(&tail) {
                        *s = x_sq - t * t;
                    }
                    LB_MARGIN * (x_sq.sqrt() + 2.0 * r.gamma_c(q) + a * y_max).powi(2)
                        + 2.0 * a * r.rounding(q, y_max)
                }
            };
            queries.push(QueryProj {
                a: a as f32,
                a2: (a * a) as f32,
                inv: inv as f32,
                top: (inv * x_sq + setup.err()[q]) as f32,
                margin: margin as f32,
                sq: levels.map(|l| sq[l] as f32),
                tail: levels.map(|l| tail[l] as f32),
            });
        }
        Some(queries)
    }

    /// With an anchor, gamma c . y added to query q's partial products `row` with the
    /// positions from `t0`.
    fn add_anchor(&self, q: usize, t0: usize, row: &mut [f32]) {
        if let Some((a, gamma)) = &self.anchor {
            a.add_scaled(q, t0, gamma[q], row);
        }
    }

    /// Bounds of queries `q0 + l` for l in `need` (ascending) against the rows at
    /// positions `t0..t0 + nt` at the pass's level into `out` (need.len() x nt): the
    /// partial dot products, then each pair's upper bound on its f32 logit. Within index
    /// tile `Some(ti)`, from the tile's dimension-major block of head coordinates (vector
    /// FMAs over its `LEAF_ROWS` columns, per query); else one GEMM (`need` then a
    /// contiguous run).
    fn tile_bounds(
        &self,
        index: &PruneIndex,
        (q0, need): (usize, &[usize]),
        (t0, nt, ti): (usize, usize, Option<usize>),
        lib: GemmLib,
        out: &mut [f32],
    ) {
        let (k, n_all, hd) = (self.k, index.perm.len(), index.head_dims);
        let level = self.levels[At::Pass as usize];
        let cut = index.levels[level];
        let ysq = &index.lvl_sq[level * n_all + t0..][..nt];
        let yt = &index.lvl_tail[level * n_all + t0..][..nt];
        match ti {
            Some(ti) => {
                debug_assert!(cut <= hd, "the pass's level lies in the head coordinates");
                let block = &index.proj0t[ti * hd * LEAF_ROWS..][..cut * LEAF_ROWS];
                let off = t0 - index.tiles[ti].start;
                if let Some((a, _)) = &self.anchor {
                    for &l in need {
                        a.prefetch(q0 + l, t0, nt);
                    }
                }
                let mut acc = [0.0f32; LEAF_ROWS];
                for (row, &l) in out.chunks_exact_mut(nt).zip(need) {
                    let q = q0 + l;
                    head_dots(block, &self.px[q * k..q * k + cut], &mut acc);
                    row.copy_from_slice(&acc[off..off + nt]);
                }
            }
            None => {
                let first = q0 + need.first().copied().unwrap_or(0);
                debug_assert!(need.windows(2).all(|w| w[1] == w[0] + 1));
                // (m x cut) * (cut x nt): element (c, j) of the rhs is proj[(t0 + j) k + c].
                sgemm_with(
                    lib,
                    Gemm {
                        m: need.len(),
                        n: nt,
                        k: cut,
                    },
                    out,
                    false,
                    (&self.px[first * k..(first + need.len()) * k], k, 1),
                    (&index.proj[t0 * k..(t0 + nt) * k], 1, k),
                );
            }
        }
        for (row, &l) in out.chunks_exact_mut(nt).zip(need) {
            self.add_anchor(q0 + l, t0, row);
            row_bounds(&self.queries[q0 + l], At::Pass, row, ysq, yt);
        }
    }

    /// Per tile of `tiles` and query, an upper bound on the f32 logit of every row of the
    /// tile (T x n_q, tile-major: the sweep reads a tile's queries together): the ball
    /// bound |Px - a y| >= |Px - a c| - a r over the projection plus the residual norms'
    /// range, dist(|Rx|, a [rlo, rhi]), with the same margin and rounding terms as the
    /// pairs' bounds (`Projection::queries`). One GEMM of the tiles' centroids with the
    /// queries' projections, in two halves of the tiles on two threads.
    ///
    /// With an anchor, the same bound for r = x - gamma c, whose noise is gone:
    /// |x - a y|^2 = |x|^2 - |r|^2 - 2 a gamma c . y + |r - a y|^2 exactly, and over a tile
    /// gamma c . y is at most gamma times the largest (gamma < 0: least) stored product
    /// ([`Anchor::tile_extremes`]), |r - a y| bounded as |x - a y| above (the margin is
    /// the anchored pairs' bounds', which covers the stored products' and r's rounding).
    /// In the queries' own coordinates the noise (sigma sqrt(D)) left 12 - 57% of the
    /// (query, tile) pairs to sweep from t = 0.6 on Fashion-MNIST; anchored at t = 0.3
    /// (embedded Fashion-MNIST, the unit test) the bounds rule out 35% of them at t = 0.4,
    /// 67% at 0.6 and 83% at 0.8, against 0%, 10% and 36% in the queries' coordinates.
    ///
    /// Where `cuts` are given (each query's cut before the sweep, which only raises it),
    /// the pairs whose ball bound reaches the cut also get the box bound ([`box_lb2`]):
    /// tiles are elongated along the leading directions, where the ball is loose. On
    /// Fashion-MNIST (B = 256, anchored) it left 40 - 45% of the pairs the ball alone
    /// left to sweep from t = 0.6 on.
    fn tile_ubs(
        &self,
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        tiles: Range<usize>,
        cuts: Option<&[f32]>,
    ) -> Vec<f32> {
        let k = self.k;
        let n_q = self.queries.len();
        let n_t = tiles.len();
        let mut cp = vec![0.0f32; n_t * n_q];
        if n_q == 0 {
            return cp;
        }
        let centres = &index.centres[tiles.start * k..tiles.end * k];
        let tile = &index.tiles[tiles.clone()];
        let c_sq = &index.centre_sq[tiles.clone()];
        // Per query, the bound's terms side by side (the loop below runs over queries).
        let last = At::Last as usize;
        let q = &self.queries;
        let mut terms = TileTerms {
            a: q.iter().map(|q| q.a).collect(),
            x_sq: q.iter().map(|q| q.sq[last]).collect(),
            rx: q.iter().map(|q| q.tail[last]).collect(),
            margin: q.iter().map(|q| q.margin).collect(),
            top: q.iter().map(|q| q.top).collect(),
            inv: q.iter().map(|q| q.inv).collect(),
        };
        // Anchored: |P r|^2 and |R r| in place of x's, and per query |x|^2 - |r|^2 and
        // 2 a gamma for each tile's base term.
        let anchored = self.anchor.as_ref().map(|(anchor, gamma)| {
            let dim = batch.x.len() / n_q;
            let mut per_q = Vec::with_capacity(n_q);
            for (i, qp) in q.iter().enumerate() {
                let pr = &self.px[i * k..(i + 1) * k];
                let pr_sq: f64 = pr.iter().map(|&v| (v as f64).powi(2)).sum();
                let r_sq = pr_sq + (self.rx[i] as f64).powi(2);
                let x = &batch.x[i * dim..(i + 1) * dim];
                let x_sq = sum_sq(x);
                terms.x_sq[i] = pr_sq as f32;
                terms.rx[i] = self.rx[i];
                per_q.push(((x_sq - r_sq) as f32, 2.0 * qp.a * gamma[i]));
            }
            (anchor.tile_extremes(index), per_q)
        });
        cp.par_chunks_mut(PAR_TILES * n_q)
            .zip(centres.par_chunks(PAR_TILES * k))
            .zip(tile.par_chunks(PAR_TILES).zip(c_sq.par_chunks(PAR_TILES)))
            .enumerate()
            .for_each(|(c, ((out, cs), (tile, c_sq)))| {
                sgemm_with(
                    large_gemm_lib(),
                    Gemm {
                        m: tile.len(),
                        n: n_q,
                        k,
                    },
                    out,
                    false,
                    (cs, k, 1),
                    (&self.px, 1, k),
                );
                let mut base = vec![0.0f32; n_q];
                let mut products = vec![0.0f32; n_q];
                for (i, ((row, t), &cs)) in
                    out.chunks_exact_mut(n_q).zip(tile).zip(c_sq).enumerate()
                {
                    let ti = tiles.start + c * PAR_TILES + i;
                    if let Some((ext, per_q)) = &anchored {
                        let ext = &ext[ti * n_q..(ti + 1) * n_q];
                        for ((b, &(b0, g2)), e) in base.iter_mut().zip(per_q).zip(ext) {
                            *b = if e[0] <= e[1] {
                                b0 - g2 * if g2 >= 0.0 { e[1] } else { e[0] }
                            } else {
                                // (a tile the anchor has no products of: no bound at all)
                                f32::NEG_INFINITY
                            };
                        }
                    }
                    let tile_terms = [
                        cs as f32,
                        t.radius as f32 * (1.0 + 1e-6),
                        t.resid_lo as f32 * (1.0 - 1e-6),
                        t.resid_hi as f32 * (1.0 + 1e-6),
                    ];
                    if cuts.is_some() {
                        products.copy_from_slice(row);
                    }
                    tile_row(row, &terms, tile_terms, &base);
                    let Some(cuts) = cuts else { continue };
                    let nb = index.box_dims;
                    let tile = TileBox {
                        terms: &terms,
                        px: &self.px,
                        k,
                        c_head: &index.centres[ti * k..ti * k + nb],
                        bx: &index.boxes[ti * 2 * nb..(ti + 1) * 2 * nb],
                        c_sq: cs as f32,
                        rest_radius: t.rest_radius as f32 * (1.0 + 1e-6),
                        resid: [tile_terms[2], tile_terms[3]],
                    };
                    box_row(row, &products, cuts, &tile, &base);
                }
            });
        cp
    }
}

/// What [`box_row`] reads besides the row: the queries' terms and projections (k each);
/// the tile's projected centroid's first `box_dims` coordinates, its bounding box there
/// (lower corner, then upper), |c|^2, the radius of its rows over the other coordinates
/// and its residual norms' range [rlo, rhi] (rounded outwards).
struct TileBox<'a> {
    terms: &'a TileTerms,
    px: &'a [f32],
    k: usize,
    c_head: &'a [f32],
    bx: &'a [f32],
    c_sq: f32,
    rest_radius: f32,
    resid: [f32; 2],
}

multiversion! {
    /// One tile's bounds `row` (`tile_row`'s, per query), lowered to the box bound's where
    /// they reach the query's cut (NaN bounds, needed anyway, are left as they are);
    /// `products` holds P x . c per query, `base` the anchored term.
    fn box_row(row: &mut [f32], products: &[f32], cuts: &[f32], t: &TileBox<'_>, base: &[f32]) = box_row_body;
}

#[inline(always)]
fn box_row_body(row: &mut [f32], products: &[f32], cuts: &[f32], t: &TileBox<'_>, base: &[f32]) {
    let (q, k) = (t.terms, t.k);
    let nb = t.c_head.len();
    let [rlo, rhi] = t.resid;
    for (qi, ub) in row.iter_mut().enumerate() {
        if *ub < cuts[qi] || ub.is_nan() {
            continue;
        }
        let pr_head = &t.px[qi * k..qi * k + nb];
        let lb2 = box_lb2(q, qi, products[qi], pr_head, t);
        let gap = (q.a[qi] * rlo - q.rx[qi])
            .max(q.rx[qi] - q.a[qi] * rhi)
            .max(0.0);
        let d2 = (base[qi] + lb2 + gap * gap - q.margin[qi]).max(0.0);
        *ub = ub.min(q.top[qi] - q.inv[qi] * d2);
    }
}

/// The box bound on |P x - a P y|^2 over a tile's rows y, for query `qi` of `q` (x its
/// projection, or r's with an anchor: `pr_head` its first `box_dims` coordinates,
/// `product` = P x . c): the distance from P x's first coordinates to the scaled box
/// a [lo, hi], squared, plus a ball bound over the rest (their share of |P x - a c|^2,
/// less a times the rest radius) - as `prune::tile_bound`, in f32 like the ball bound
/// beside it (the rounding is far inside the margin).
#[inline(always)]
fn box_lb2(q: &TileTerms, qi: usize, product: f32, pr_head: &[f32], t: &TileBox<'_>) -> f32 {
    let a = q.a[qi];
    let dp2 = (q.x_sq[qi] - 2.0 * a * product + a * a * t.c_sq).max(0.0);
    let nb = pr_head.len();
    let (lo, hi) = t.bx.split_at(nb);
    // The squares lane by lane, then summed in a fixed tree (one vector of 16 lanes where
    // the CPU has AVX-512, and the same bits wherever it runs).
    let mut sq = [[0.0f32; BOX_DIMS]; 2];
    for (d, &x) in pr_head.iter().enumerate().take(BOX_DIMS) {
        let off = x - a * t.c_head[d];
        let out = (a * lo[d] - x).max(x - a * hi[d]).max(0.0);
        sq[0][d] = off * off;
        sq[1][d] = out * out;
    }
    let [head, boxd] = sq.map(tree_sum);
    let rest = ((dp2 - head).max(0.0).sqrt() - a * t.rest_radius).max(0.0);
    boxd + rest * rest
}

/// The sum of 16 values in a fixed pairwise order.
#[inline(always)]
fn tree_sum(mut v: [f32; BOX_DIMS]) -> f32 {
    let mut n = BOX_DIMS;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// Per query, the terms of its tile bounds (see `Projection::tile_ubs`).
struct TileTerms {
    a: Vec<f32>,
    /// |Px|^2 and |Rx|
    x_sq: Vec<f32>,
    rx: Vec<f32>,
    margin: Vec<f32>,
    top: Vec<f32>,
    inv: Vec<f32>,
}

multiversion! {
    /// One tile's bounds over every query: `row` holds the products Px . c in, the upper
    /// bounds on the tile's f32 logits out. `tile` is [|c|^2, r, rlo, rhi], rounded
    /// outwards to f32; `base` per query a term added to the squared distance's bound (0,
    /// or the anchored bound's, see `Projection::tile_ubs`). In f32 like the pairs' bounds
    /// (`bounds`): the squared distances' rounding is far inside the margin.
    fn tile_row(row: &mut [f32], q: &TileTerms, tile: [f32; 4], base: &[f32]) = tile_row_body;
}

#[inline(always)]
fn tile_row_body(row: &mut [f32], q: &TileTerms, [c_sq, r, rlo, rhi]: [f32; 4], base: &[f32]) {
    let pos = |x: f32| if x > 0.0 { x } else { 0.0 };
    let n = row.len();
    let (a, x_sq, rx) = (&q.a[..n], &q.x_sq[..n], &q.rx[..n]);
    let (margin, top, inv) = (&q.margin[..n], &q.top[..n], &q.inv[..n]);
    let base = &base[..n];
    for i in 0..n {
        let dp2 = pos(x_sq[i] - 2.0 * a[i] * row[i] + a[i] * a[i] * c_sq);
        let ball = pos(dp2.sqrt() - a[i] * r);
        let gap = pos((a[i] * rlo - rx[i]).max(rx[i] - a[i] * rhi));
        row[i] = top[i] - inv[i] * pos(base[i] + ball * ball + gap * gap - margin[i]);
    }
}

multiversion! {
    /// Per query of a tile whose bound `ub` is below its `cut`: `rows` x exp(ub - cut)
    /// added to its sum (in units of exp(cut)), vectorized: the difference in f64, exp in
    /// f32, raised by a relative 2^-16 for their rounding and at least e^-87 (exp's
    /// smallest normal result; from there the term is rounded up to it), so that each term
    /// stays an upper bound.
    fn skip_terms(ub: &[f32], cuts: &[f32], rows: f32, sum: &mut [f64]) = skip_terms_body;
}

#[inline(always)]
fn skip_terms_body(ub: &[f32], cuts: &[f32], rows: f32, sum: &mut [f64]) {
    const UP: f32 = 1.0 + 1.0 / (1 << 16) as f32;
    for ((&u, &c), s) in ub.iter().zip(cuts).zip(sum.iter_mut()) {
        let d = ((u as f64 - c as f64) as f32).max(-87.0);
        let e = exp_nonpositive(d) * UP;
        *s += if u < c { (rows * e) as f64 } else { 0.0 };
    }
}

multiversion! {
    /// Per column of a tile's dimension-major block (`LEAF_ROWS` columns, one per row of
    /// the tile), its dot product with `x` over the block's first x.len() coordinates.
    pub(super) fn head_dots(block: &[f32], x: &[f32], acc: &mut [f32; LEAF_ROWS]) = head_dots_body;
}

#[inline(always)]
fn head_dots_body(block: &[f32], x: &[f32], out: &mut [f32; LEAF_ROWS]) {
    // A local array, so that the sums stay in registers across the coordinates.
    let mut acc = [0.0f32; LEAF_ROWS];
    for (col, &xd) in block.chunks_exact(LEAF_ROWS).zip(x) {
        let col: &[f32; LEAF_ROWS] = col.try_into().expect("LEAF_ROWS columns");
        for (a, &y) in acc.iter_mut().zip(col) {
            *a = xd.mul_add(y, *a);
        }
    }
    *out = acc;
}

multiversion! {
    /// [`bounds`] over one (query, tile) row, vectorized.
    fn row_bounds(qp: &QueryProj, at: At, d: &mut [f32], ysq: &[f32], yt: &[f32]) = row_bounds_body;
}

#[inline(always)]
fn row_bounds_body(qp: &QueryProj, at: At, d: &mut [f32], ysq: &[f32], yt: &[f32]) {
    bounds(qp, at, d, ysq, yt)
}

/// Per pair of one query's row: the partial dot product over the level's coordinates in,
/// the upper bound on the f32 logit out.
#[inline(always)]
fn bounds(qp: &QueryProj, at: At, d: &mut [f32], ysq: &[f32], yt: &[f32]) {
    let (a, a2, inv, top, margin) = (qp.a, qp.a2, qp.inv, qp.top, qp.margin);
    let (xs, xt) = (qp.sq[at as usize], qp.tail[at as usize]);
    // `if x > 0 { x } else { 0 }` rather than `max`: one vector max, no NaN handling.
    let pos = |x: f32| if x > 0.0 { x } else { 0.0 };
    for ((v, &ys), &yt) in d.iter_mut().zip(ysq).zip(yt) {
        // (Not clamped at 0: with an anchor this is no squared distance, see
        // `Projection::new`; without, a negative value is rounding and only lowers L.)
        let dp2 = xs - 2.0 * a * *v + a2 * ys;
        let g = xt - a * yt;
        *v = top - inv * pos(dp2 + g * g - margin);
    }
}

/// What one task (query group, row block) of sweep (2) found, per query of the group.
struct TaskOut {
    /// (position, f32 logit) of every pair computed, in position order
    logits: Vec<Vec<(u32, f32)>>,
    /// the pairs ruled out by bound: sum over tiles of their count times exp(largest
    /// bound - lower), in units of exp(lower)
    cert: Vec<f64>,
    /// the tiles ruled out whole by their bounds (`Projection::tile_ubs`): sum over them
    /// of their rows times exp(bound - cut), in units of exp(cut), with the query's f32
    /// cut at the end of the task (kept apart: near t = 1 the cut lies hundreds of nats
    /// below lower, where exp(cut - lower) leaves the f64 range)
    tile_cert: Vec<(f64, f32)>,
    /// the query's lower bound on its f32 maximum at the end of the task
    lower: Vec<f64>,
}

/// The projected pass over `inputs.batch.rows` (see [`PassInputs`]), its GEMM's level chosen from the estimated kept `share`; `None` where some
/// query cannot be pruned or a task gives up (over `MAX_COMPUTED` of its pairs computed):
/// then the caller runs another pass. `kept`, if given, receives per query the stored rows
/// accumulated. `anchor` gives the anchored bounds; `seeds`, where there is none, an
/// anchor (a stale one, say) whose remembered rows seed the lower bounds.
pub fn partial(
    inputs: PassInputs<'_>,
    share: f64,
    kept: Option<&mut Vec<Vec<u32>>>,
    anchor: Option<&Anchor>,
    seeds: Option<&Anchor>,
) -> Option<Partial> {
    let direct = env_number::<u8>("ORACLEFLOW_PRUNE_DIRECT").map_or_else(
        || direct_logits(inputs.index.k, inputs.ds.dim()),
        |v| v != 0,
    );
    partial_with(inputs, share, kept, (anchor, seeds), direct)
}

/// [`partial`], the sweep's pairs that reach the cut taking their f32 logits at once where
/// `direct` (see [`direct_logits`]).
fn partial_with(
    inputs: PassInputs<'_>,
    share: f64,
    kept: Option<&mut Vec<Vec<u32>>>,
    (anchor, seeds): (Option<&Anchor>, Option<&Anchor>),
    direct: bool,
) -> Option<Partial> {
    let PassInputs {
        ds,
        index,
        batch,
        setup,
        threads,
        lib,
    } = inputs;
    let clock = std::time::Instant::now();
    let dim = ds.dim();
    let n_q = batch.logit_coefs.len();
    let err = setup.err();
    // Large rounding bounds (near t = 1 f32 logits carry many nats of it) only lower the
    // cut: the logits' gaps there are far larger, so the bounds still rule most pairs out.
    if n_q == 0 || err.iter().any(|e| !e.is_finite()) {
        return None;
    }
    // Anchored bounds are tight from the first level on (see [`super::anchor`]).
    // (The queries' own projection is taken where no anchor is given, and for an
    // anchored call's seeds only where it remembers none.)
    let proj = match anchor {
        Some(a) => Projection::anchored(index, batch, setup, a)?,
        None => Projection::new(index, batch, setup, level(share))?,
    };
    let t_proj = clock.elapsed().as_secs_f64();
    let positions = setup.positions();
    let n_rows = positions.len();
    let thresholds = setup.thresholds();
    let groups = query_groups(n_q, threads);
    let blocks = row_blocks(positions.clone(), threads);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..blocks.len()).map(move |b| (g, b)))
        .collect();

    // (1) Per query, a lower bound on its f32 maximum: the largest f32 logit over a few
    // rows of the tile whose projected centroid is nearest (any computed logit is one).
    // With an anchor, the rows that held each query's maximum in the last anchored call
    // (late in a trajectory mostly the same row) instead of the nearest tiles'.
    // (Only rows of this call: a row remembered from a call on other rows bounds nothing.)
    // (Without anchored bounds, the rows remembered by a stale anchor: late in a
    // trajectory they still hold the maximum, where the nearest tiles' search took 3 - 7
    // ms a call on Fashion-MNIST.)
    let memory = anchor.or(seeds);
    let remembered: Option<Vec<usize>> = memory.and_then(|a| {
        (0..batch.logit_coefs.len())
            .map(|q| a.best(q).filter(|p| positions.contains(p)))
            .collect()
    });
    let lower = match &remembered {
        Some(best) => remembered_lower(ds, index, batch, best),
        None if anchor.is_none() => seed_lower(ds, index, batch, &proj),
        None => seed_lower(ds, index, batch, &Projection::new(index, batch, setup, 0)?),
    };
    let t_lower = clock.elapsed().as_secs_f64();
    let tiles = index
        .tiles_for(&batch.rows)
        .expect("the rows are a union of tiles (Setup)");
    // Tile bounds first where the pass runs at the first level (the latest calls), so that
    // the pairs' bounds are taken only in the tiles some query may need (see the module
    // docs).
    // (With an anchor, anchored tile bounds: those of r, whose noise is gone.)
    let first_level = proj.levels[At::Pass as usize] == 0;
    let tile_bounds = anchor.is_none() || share <= anchor::tile_bounds_max_share();
    let cuts: Vec<f32> = (0..n_q)
        .map(|q| (lower[q] + thresholds[q]) as f32)
        .collect();
    let ubs = (first_level && tile_bounds)
        .then(|| proj.tile_ubs(index, batch, tiles.clone(), Some(&cuts)));
    let t_seed = clock.elapsed().as_secs_f64();

    // (2) Every pair's bound at the pass's level; the last level and f32 for the few that
    // reach the cut.
    let found: Vec<Option<TaskOut>> = tasks
        .par_iter()
        .map(|&(g, b)| {
            let qs = groups[g].clone();
            sweep(
                ds,
                index,
                batch,
                &proj,
                &qs,
                &blocks[b],
                lib,
                &lower[qs.clone()],
                &thresholds[qs.clone()],
                ubs.as_ref().map(|u| (&tiles, u.as_slice())),
                direct,
            )
        })
        .collect();
    // A task that computed too many logits gave up: the bounds were too loose for this
    // call, and another pass takes it.
    let found: Vec<TaskOut> = found.into_iter().collect::<Option<_>>()?;
    let t_sweep = clock.elapsed().as_secs_f64();

    // Per query: its computed logits in position order, and the certificate so far in
    // units of exp(lower[q]).
    let mut logits: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_q];
    let mut cert = vec![0.0f64; n_q];
    // The tile bounds' part of each certificate (see `TaskOut::tile_cert`), in units of
    // exp(m + 2 err) once m is known: (sum, cut) per task.
    let mut tile_cert: Vec<Vec<(f64, f32)>> = vec![Vec::new(); n_q];
    let mut lower = lower;
    for (&(g, _), t) in tasks.iter().zip(&found) {
        for (q, &lo) in groups[g].clone().zip(&t.lower) {
            lower[q] = lower[q].max(lo);
        }
    }
    for (&(g, _), t) in tasks.iter().zip(found) {
        for (((q, l), c), lo) in groups[g].clone().zip(t.logits).zip(t.cert).zip(t.lower) {
            logits[q].extend(l);
            cert[q] += c * (lo - lower[q]).exp();
        }
        for (q, tc) in groups[g].clone().zip(t.tile_cert) {
            tile_cert[q].push(tc);
        }
    }
    let computed: usize = logits.iter().map(Vec::len).sum();
    let record = kept.is_some();
    let per_query: Vec<Weighed> = (0..n_q)
        .into_par_iter()
        .map(|q| weigh(ds, index, &logits[q], thresholds[q], record))
        .collect();

    let mut states = Vec::with_capacity(n_q);
    let mut acc = vec![0.0f32; n_q * dim];
    let mut sum_norm = vec![0.0f32; n_q];
    let mut part_kept = Vec::with_capacity(n_q);
    let mut tiles_kept = Vec::with_capacity(n_q);
    let mut kept_rows = Vec::new();
    for (q, w) in per_query.into_iter().enumerate() {
        if !(w.state.sum > 0.0 && w.state.sum.is_finite()) {
            return None;
        }
        acc[q * dim..(q + 1) * dim].copy_from_slice(&w.acc);
        sum_norm[q] = w.sum_norm;
        // The certificate in units of exp(m), with exp(2 err) for the f32 logits' rounding.
        let ruled_out = cert[q] * (lower[q] - w.state.max as f64).exp();
        // (In logs: near t = 1, 2 err reaches hundreds of nats.)
        let left_out = ruled_out + w.dropped;
        cert[q] = if left_out > 0.0 {
            (left_out.ln() + 2.0 * err[q]).exp()
        } else {
            0.0
        };
        // exp(cut - m + 2 err) is at most SAMPLE_BUDGET / n (times f32's rounding of cut).
        let m = w.state.max as f64;
        cert[q] += tile_cert[q]
            .iter()
            .map(|&(sum, cut)| sum * (cut as f64 - m + 2.0 * err[q]).exp())
            .sum::<f64>();
        part_kept.push(w.kept);
        // A tile counts as visited where any of its pairs got an f32 logit.
        tiles_kept.push(tiles_touched(index, logits[q].iter().map(|l| l.0)));
        if let Some(a) = memory {
            a.set_best(q, index.pos[w.state.argmax as usize] as usize);
        }
        states.push(w.state);
        if record {
            kept_rows.push(w.kept_rows);
        }
    }
    if super::profiling() {
        let all = (n_q * n_rows) as f64;
        eprintln!(
            "prune: projected pass {:.2} ms (projection {:.2}, seeds {:.2}, tile bounds {:.2}, sweep {:.2}, weights {:.2}) from {} coordinates: {:.5} of pairs computed, {:.5} accumulated, {} (query, tile) pairs swept",
            clock.elapsed().as_secs_f64() * 1e3,
            t_proj * 1e3,
            (t_lower - t_proj) * 1e3,
            (t_seed - t_lower) * 1e3,
            (t_sweep - t_seed) * 1e3,
            (clock.elapsed().as_secs_f64() - t_sweep) * 1e3,
            index.levels[proj.levels[0]],
            computed as f64 / all,
            part_kept.iter().sum::<u64>() as f64 / all,
            SWEPT.swap(0, Relaxed),
        );
    }
    let n_index_tiles = index.tiles_for(&batch.rows).map_or(0, |t| t.len()) as u64;
    let mut part = Partial::dense(dim, states, acc, sum_norm, n_rows, super::LEAF_ROWS);
    part.skipped_mass = cert;
    part.samples_kept = part_kept;
    part.tiles_kept = tiles_kept;
    part.tiles_total = n_index_tiles;
    if let Some(k) = kept {
        *k = kept_rows;
    }
    Some(part)
}

/// (Query, index tile) pairs the sweep took the pairs' bounds in, this call (for
/// `ORACLEFLOW_PRUNE_PROFILE`).
static SWEPT: AtomicU64 = AtomicU64::new(0);

/// Sweep (2) for queries `qs` over the positions `block`, from their lower bounds `lower`
/// and ln drop thresholds.
#[allow(clippy::too_many_arguments)]
fn sweep(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    proj: &Projection,
    qs: &Range<usize>,
    block: &Range<usize>,
    lib: GemmLib,
    lower: &[f64],
    thresholds: &[f64],
    tile_ubs: Option<(&Range<usize>, &[f32])>,
    direct: bool,
) -> Option<TaskOut> {
    let (dim, k, n_all) = (ds.dim(), proj.k, index.perm.len());
    let [pass, last] = proj.levels;
    // (direct: the pairs that reach the cut at the pass's level take their f32 logits
    // without the last level's bound)
    let direct = pass < last && direct;
    let refine = pass < last && !direct;
    let (ysq, yt) = (
        &index.lvl_sq[last * n_all..(last + 1) * n_all],
        &index.lvl_tail[last * n_all..(last + 1) * n_all],
    );
    let norms = ds.sq_norms();
    let n_q = qs.len();
    let mut lower = lower.to_vec();
    let mut out = TaskOut {
        logits: vec![Vec::new(); n_q],
        cert: vec![0.0; n_q],
        tile_cert: Vec::new(),
        lower: Vec::new(),
    };
    // Per query, the tiles ruled out whole: in units of exp(cuts[l]) (`TaskOut::tile_cert`).
    let mut tile_sum = vec![0.0f64; n_q];
    let mut bnd = vec![0.0f32; n_q * TILE];
    let mut need = Vec::with_capacity(n_q);
    let mut counts = Vec::with_capacity(n_q);
    let mut dense = DenseRows::default();
    let mut one = Vec::new();
    let most = (max_computed() * (n_q * block.len()) as f64) as usize;
    let mut computed = 0usize;
    let n_all_q = batch.logit_coefs.len();
    // Per query its cut as f32 (kept up to date as its lower bound rises).
    let mut cuts: Vec<f32> = (0..n_q)
        .map(|l| (lower[l] + thresholds[l]) as f32)
        .collect();
    // The sweep's steps: at the first level (with or without tile bounds), each index
    // tile's rows within the block (a tile may straddle two blocks), its head products
    // from the tile's dimension-major block; else runs of `TILE` rows.
    let leaf_steps = tile_ubs.is_some() || pass == 0;
    let steps: Vec<(usize, usize, Option<usize>)> = match leaf_steps {
        true => {
            let first = index
                .tiles
                .partition_point(|t| t.start + t.len <= block.start);
            let end = index.tiles.partition_point(|t| t.start < block.end);
            (first..end)
                .map(|ti| {
                    let tile = &index.tiles[ti];
                    let t0 = tile.start.max(block.start);
                    (t0, (tile.start + tile.len).min(block.end) - t0, Some(ti))
                })
                .collect()
        }
        false => block
            .clone()
            .step_by(TILE)
            .map(|t0| (t0, TILE.min(block.end - t0), None))
            .collect(),
    };
    for &(t0, nt, ti) in &steps {
        if computed > most {
            return None;
        }
        need.clear();
        match (tile_ubs, ti) {
            (Some((tiles, ubs)), Some(ti)) => {
                // Per query the tile's bound: where it is below the cut, no row of the
                // tile can reach it; the certificate terms of those in one vectorized
                // pass, then the others.
                let ub = &ubs[(ti - tiles.start) * n_all_q + qs.start..][..n_q];
                skip_terms(ub, &cuts, nt as f32, &mut tile_sum);
                for (l, (&u, &c)) in ub.iter().zip(&cuts).enumerate() {
                    // (a NaN bound, which `skip_terms` leaves out, is needed)
                    if u >= c || u.is_nan() {
                        need.push(l);
                    }
                }
            }
            _ => need.extend(0..n_q),
        }
        if need.is_empty() {
            continue;
        }
        if super::profiling() {
            SWEPT.fetch_add(need.len() as u64, Relaxed);
        }
        let bnd = &mut bnd[..need.len() * nt];
        proj.tile_bounds(index, (qs.start, &need), (t0, nt, ti), lib, bnd);
        // Per query, the pairs that reach its cut and the largest bound below it.
        counts.clear();
        let cuts_now = need.iter().map(|&l| (lower[l] + thresholds[l]) as f32);
        counts.extend(
            bnd.chunks_exact(nt)
                .zip(cuts_now)
                .map(|(row, c)| count_from(row, c)),
        );
        if refine || direct {
            let exact = direct.then_some((ds, batch));
            dense_bounds(
                proj,
                index,
                (qs.start, &need, &counts),
                (t0, nt),
                exact,
                &mut dense,
            );
        }
        let mut dense_ub = dense.out.chunks_exact(nt);
        for (i, (&l, row)) in need.iter().zip(bnd.chunks_exact_mut(nt)).enumerate() {
            let q = qs.start + l;
            let dense_ub = match dense.rows.get(i) {
                Some(true) => dense_ub.next(),
                _ => None,
            };
            // (direct: the row's f32 logits, where the grid took them)
            let exact_row = dense_ub.filter(|_| direct);
            // (lower[l] is as it was when `counts` were taken: only this row raises it)
            let mut cut = (lower[l] + thresholds[l]) as f32;
            let (reach, below) = counts[i];
            if reach == 0 {
                // The common case: the whole tile ruled out, by bounds below the cut.
                out.cert[l] += nt as f64 * (below as f64 - lower[l]).exp();
                continue;
            }
            let qp = &proj.queries[q];
            let x = &batch.x[q * dim..(q + 1) * dim];
            let pq = &proj.px[q * k..(q + 1) * k];
            // The candidates in batches of `EXACT_AT_ONCE`, their logits computed together
            // (each bitwise as alone), then taken in order against the cut in force, which
            // an earlier one may have raised: as one at a time, except that a candidate a
            // raised cut rules out had its logit computed for nothing.
            let mut j = 0;
            while j < nt {
                let (mut at, mut d_at) =
                    ([0usize; EXACT_AT_ONCE], [f32::NEG_INFINITY; EXACT_AT_ONCE]);
                let mut len = 0;
                while j < nt && len < EXACT_AT_ONCE {
                    let (jj, p) = (j, t0 + j);
                    j += 1;
                    if row[jj] < cut {
                        continue;
                    }
                    // A logit below the cut is a bound like any other (not kept).
                    if let Some(ex) = exact_row {
                        if ex[jj] < cut {
                            row[jj] = ex[jj];
                            continue;
                        }
                    }
                    if refine {
                        let d = match dense_ub {
                            Some(ub) => ub[jj],
                            None => {
                                let mut d = [dot(pq, &index.proj[p * k..(p + 1) * k])];
                                proj.add_anchor(q, p, &mut d);
                                bounds(qp, At::Last, &mut d, &ysq[p..p + 1], &yt[p..p + 1]);
                                d[0]
                            }
                        };
                        if d < cut {
                            row[jj] = d;
                            continue;
                        }
                        d_at[len] = d;
                    }
                    at[len] = jj;
                    len += 1;
                }
                let ps: [usize; EXACT_AT_ONCE] = std::array::from_fn(|i| t0 + at[i]);
                let ns: [f32; EXACT_AT_ONCE] =
                    std::array::from_fn(|i| norms[index.perm[ps[i]] as usize]);
                let mut got = [0.0f32; EXACT_AT_ONCE];
                if let Some(ex) = exact_row {
                    for (g, &jj) in got.iter_mut().zip(&at).take(len) {
                        *g = ex[jj];
                    }
                } else if len > 0 {
                    let (ps, ns) = (&ps[..len], &ns[..len]);
                    let coefs = batch.logit_coefs[q];
                    exact_logits_at(ds, index, x, coefs, (ps, ns), &mut one, &mut got[..len]);
                }
                for ((&jj, &d), &s) in at.iter().zip(&d_at).zip(&got).take(len) {
                    if row[jj] < cut {
                        continue;
                    }
                    if refine && d < cut {
                        row[jj] = d;
                        continue;
                    }
                    out.logits[l].push(((t0 + jj) as u32, s));
                    computed += 1;
                    // Marked as computed: not counted as ruled out below.
                    row[jj] = f32::INFINITY;
                    if s as f64 > lower[l] {
                        // The certificate so far is in units of exp(lower): rescaled.
                        out.cert[l] *= (lower[l] - s as f64).exp();
                        lower[l] = s as f64;
                        cut = (lower[l] + thresholds[l]) as f32;
                        // The tiles' part is in units of exp(cut): rescaled.
                        tile_sum[l] *= (cuts[l] as f64 - cut as f64).exp();
                        cuts[l] = cut;
                    }
                }
            }
            // The pairs ruled out, each by a bound below the cut then in force (which only
            // rose): their count and the largest of those bounds.
            let (in_tile, largest) = count_from(row, f32::INFINITY);
            let n_out = nt - in_tile;
            if n_out > 0 {
                out.cert[l] += n_out as f64 * (largest as f64 - lower[l]).exp();
            }
        }
    }
    out.lower = lower;
    out.tile_cert = tile_sum.into_iter().zip(cuts).collect();
    Some(out)
}

/// The rows of one tile whose last-level bounds (or f32 logits) [`dense_bounds`] takes in
/// one grid: which (query, tile) rows, their queries, the grid's products (rows by
/// queries) and the bounds (or logits).
#[derive(Default)]
struct DenseRows {
    rows: Vec<bool>,
    queries: Vec<usize>,
    products: Vec<f32>,
    out: Vec<f32>,
    /// the tile's rows where the index keeps none in tile order (f32 logits)
    scratch: Vec<f32>,
}

/// Where at least 1 / `DENSE_REFINE` of a (query, tile) row's pairs reach the cut at the
/// pass's level (`counts`' first, per query l of `need`), the row's last-level bounds (all
/// k coordinates) from one grid of products (`dots::dots_grid`) of the tile's projected
/// rows (positions `t0..t0 + nt`) with those queries' projections, into `dense.out` row
/// after row (the rows marked in `dense.rows`); the sweep refines the other rows' pairs
/// one dot product each, as it reaches them. The pairs that reach the cut lie in the
/// tiles near each query: at t = 0.54 on Fashion-MNIST, 20% of the pairs reach it, 18% of
/// them in rows where a quarter do (rows holding 26% of the pairs), and one dot product
/// per pair, its row's projection read from memory, ran at about a twentieth of a GEMM's
/// rate. With `exact` (the sweep's direct mode, [`direct_logits`]), the same rows' f32
/// logits instead, from the tile's stored rows and the queries, bitwise as
/// `exact_logits_at` gives them.
fn dense_bounds(
    proj: &Projection,
    index: &PruneIndex,
    (q0, need, counts): (usize, &[usize], &[(usize, f32)]),
    (t0, nt): (usize, usize),
    exact: Option<(&Dataset, &CentredBatch<'_>)>,
    dense: &mut DenseRows,
) {
    let (k, n_all) = (proj.k, index.perm.len());
    dense.rows.clear();
    let dense_row = |&(reach, _): &(usize, f32)| reach > 0 && reach * DENSE_REFINE >= nt;
    dense.rows.extend(counts.iter().map(dense_row));
    let marked = need.iter().zip(&dense.rows);
    dense.queries.clear();
    dense
        .queries
        .extend(marked.filter_map(|(&l, &d)| d.then_some(q0 + l)));
    dense.out.clear();
    if dense.queries.is_empty() {
        return;
    }
    // The products by register blocks of dot products (`dots::dots_grid`), rows by
    // queries, then transposed: a GEMM call for so few queries spent most of its time in
    // the call (about 2 of the 10 ms of a call at t = 0.6 on Fashion-MNIST, 2-core Zen 5).
    let m = dense.queries.len();
    // (With `exact`, the rows' stored values and the queries', as `exact_logits_at`
    // takes them: the same bits.)
    let (rows, xs): (Vec<&[f32]>, Vec<&[f32]>) = match exact {
        Some((ds, batch)) => {
            let dim = ds.dim();
            let y = index.rows_at(ds, t0..t0 + nt, &mut dense.scratch);
            let xs = dense
                .queries
                .iter()
                .map(|&q| &batch.x[q * dim..(q + 1) * dim]);
            (y.chunks_exact(dim).collect(), xs.collect())
        }
        None => {
            let rows = index.proj[t0 * k..(t0 + nt) * k].chunks_exact(k);
            let xs = dense.queries.iter().map(|&q| &proj.px[q * k..(q + 1) * k]);
            (rows.collect(), xs.collect())
        }
    };
    dense.products.resize(nt * m, 0.0);
    dots_grid(&rows, &xs, &mut dense.products);
    dense.out.resize(m * nt, 0.0);
    for (j, by_q) in dense.products.chunks_exact(m).enumerate() {
        for (i, &v) in by_q.iter().enumerate() {
            dense.out[i * nt + j] = v;
        }
    }
    if let Some((ds, batch)) = exact {
        // (the rows' |y|^2 gathered once for all the queries)
        let mut nsq = [0.0f32; TILE];
        index.sq_norms_at(ds, t0..t0 + nt, &mut nsq);
        for (&q, s) in dense.queries.iter().zip(dense.out.chunks_exact_mut(nt)) {
            to_logits(s, &nsq[..nt], batch.logit_coefs[q]);
        }
        return;
    }
    let last = proj.levels[At::Last as usize];
    let ysq = &index.lvl_sq[last * n_all + t0..][..nt];
    let yt = &index.lvl_tail[last * n_all + t0..][..nt];
    for (&q, ub) in dense.queries.iter().zip(dense.out.chunks_exact_mut(nt)) {
        proj.add_anchor(q, t0, ub);
        row_bounds(&proj.queries[q], At::Last, ub, ysq, yt);
    }
}

/// Per query, the largest f32 logit over the `SEED_ROWS` rows nearest to it in the first
/// level's coordinates among the rows of the `SEED_TILES` tiles whose projected centroids
/// are nearest to it in the head coordinates (the index keeps each tile's head
/// coordinates dimension-major for such small products; the first level's are the
/// leading rows of that block): any computed logit is a lower bound on the f32 maximum,
/// and late in a trajectory these hold the nearest sample.
fn seed_lower(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    proj: &Projection,
) -> Vec<f64> {
    let (dim, k) = (ds.dim(), proj.k);
    let n_q = batch.logit_coefs.len();
    let tiles = index
        .tiles_for(&batch.rows)
        .expect("the rows are a union of tiles (Setup)");
    let hd = index.head_dims;
    // |c|^2 over the head coordinates per tile, and every query's products with the
    // centroids' head coordinates (one GEMM).
    let centres = &index.centres[tiles.start * k..tiles.end * k];
    let c_sq: Vec<f32> = centres
        .chunks_exact(k)
        .map(|c| c[..hd].iter().map(|v| v * v).sum())
        .collect();
    let n_t = tiles.len();
    let mut pc = vec![0.0f32; n_q * n_t];
    pc.par_chunks_mut(PAR_QUERIES * n_t)
        .zip(proj.px.par_chunks(PAR_QUERIES * k))
        .for_each(|(out, px)| {
            sgemm_with(
                GemmLib::Gemm,
                Gemm {
                    m: out.len() / n_t,
                    n: n_t,
                    k: hd,
                },
                out,
                false,
                (px, k, 1),
                (centres, 1, k),
            )
        });
    let norms = ds.sq_norms();
    // level 0's coordinates, inside the head block
    let sd = index.levels[0].min(hd);
    (0..n_q)
        .into_par_iter()
        .map(|q| {
            let a = proj.queries[q].a;
            let row = &pc[q * n_t..(q + 1) * n_t];
            // |P x - a c|^2 less the query's own |P x|^2, over the head coordinates: the
            // `SEED_TILES` nearest tiles.
            let d = |t: usize| a * a * c_sq[t] - 2.0 * a * row[t];
            let near = smallest((0..n_t).map(|t| (d(t), t)), SEED_TILES);
            // Their rows by the first level's coordinates.
            let pq = &proj.px[q * k..(q + 1) * k];
            let scale = [a * a, 2.0 * a];
            let rows = near
                .iter()
                .flat_map(|&(_, t)| row_keys(index, scale, pq, tiles.start + t, sd));
            let cand = smallest(rows, SEED_ROWS);
            let x = &batch.x[q * dim..(q + 1) * dim];
            let mut one = Vec::new();
            cand.iter()
                .map(|&(_, p)| {
                    let r = index.perm[p] as usize;
                    exact_logit(ds, index, x, batch.logit_coefs[q], p, norms[r], &mut one) as f64
                })
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// Per query, the f32 logit of its row at position `best[q]` (a lower bound on its f32
/// maximum, as any computed logit).
fn remembered_lower(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    best: &[usize],
) -> Vec<f64> {
    let dim = ds.dim();
    let norms = ds.sq_norms();
    best.par_iter()
        .enumerate()
        .map(|(q, &p)| {
            let x = &batch.x[q * dim..(q + 1) * dim];
            let r = index.perm[p] as usize;
            let mut one = Vec::new();
            exact_logit(ds, index, x, batch.logit_coefs[q], p, norms[r], &mut one) as f64
        })
        .collect()
}

/// One query's result from its computed logits.
struct Weighed {
    state: SoftmaxState,
    acc: Vec<f32>,
    sum_norm: f32,
    /// computed weights dropped below the cut, units of exp(m)
    dropped: f64,
    /// weights accumulated, and their stored rows (if recorded)
    kept: u64,
    kept_rows: Vec<u32>,
}

/// The weights of one query's computed logits `logits` ((position, f32 logit), in
/// position order): exp(s - m) for those at or above m + `threshold`, m the largest
/// (ties to the lower stored row, as the dense pass's first maximum in row order); the
/// others are dropped. Sums in f64, rows added one axpy each (`RowSum`).
fn weigh(
    ds: &Dataset,
    index: &PruneIndex,
    logits: &[(u32, f32)],
    threshold: f64,
    record: bool,
) -> Weighed {
    let dim = ds.dim();
    let norms = ds.sq_norms();
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    for &(p, s) in logits {
        super::sparse::raise(&mut best, (s, index.perm[p as usize]));
    }
    let m = best.0;
    let cut = (m as f64 + threshold) as f32;
    let mut sums = [0.0f64; 4];
    let mut dropped = 0.0f64;
    // In f64, rows added in chunks (`RowSum`): near-duplicate data keeps thousands.
    let mut acc = vec![0.0f64; dim];
    let mut row_sum = RowSum::new(dim);
    let mut one = Vec::new();
    let mut kept_rows = Vec::new();
    let mut kept = 0;
    // The kept pairs' rows lie far apart: each is asked for `ROWS_AHEAD` rows before it is
    // added (where the rows are kept in tile order).
    let tiled = index.tiled_rows(ds);
    let row_of = |p: u32| tiled.map(|t| &t[p as usize * dim..(p as usize + 1) * dim]);
    let mut ahead = logits.iter().filter(|l| l.1 >= cut).map(|l| l.0);
    for row in ahead.by_ref().take(ROWS_AHEAD).filter_map(row_of) {
        prefetch(row);
    }
    for &(p, s) in logits {
        let d = s - m;
        if s < cut {
            dropped += (d as f64).exp();
            continue;
        }
        if let Some(next) = ahead.next().and_then(row_of) {
            prefetch(next);
        }
        let e = exp_nonpositive(d);
        let r = index.perm[p as usize];
        sums[0] += e as f64;
        sums[1] += e as f64 * d as f64;
        sums[2] += e as f64 * e as f64;
        sums[3] += e as f64 * norms[r as usize] as f64;
        row_sum.add(
            e,
            index.rows_at(ds, p as usize..p as usize + 1, &mut one),
            &mut acc,
        );
        kept += 1;
        if record {
            kept_rows.push(r);
        }
    }
    row_sum.finish(&mut acc);
    Weighed {
        state: SoftmaxState {
            max: m,
            sum: sums[0] as f32,
            sum_shifted_logit: sums[1] as f32,
            sum_sq: sums[2] as f32,
            argmax: best.1,
        },
        acc: acc.iter().map(|&a| a as f32).collect(),
        sum_norm: sums[3] as f32,
        dropped,
        kept,
        kept_rows,
    }
}

/// How many of the index's tiles hold at least one of `positions` (ascending).
fn tiles_touched(index: &PruneIndex, positions: impl Iterator<Item = u32>) -> u64 {
    let mut n = 0u64;
    let mut end = 0usize;
    for p in positions {
        let p = p as usize;
        if p >= end {
            let t = index.tiles.partition_point(|t| t.start + t.len <= p);
            end = index.tiles[t].start + index.tiles[t].len;
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gemm crate's products, cut into row blocks as the parallel steps above cut
    /// them, are bitwise the rows of one product, at the shapes those steps run
    /// (Fashion-MNIST: D = 784, k = 256, 1280 tiles, B = 256; head dims 64).
    #[test]
    fn row_blocks_of_a_product_are_its_rows_bitwise() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let normal = StandardNormal;
        // (rows, columns, depth, rows per block); lhs row-major, rhs as (rhs, 1, depth):
        // the queries' projections, the tile bounds' products, the seeds' products.
        for (m, n, depth, block) in [
            (256usize, 256usize, 784usize, PAR_QUERIES),
            (256, 784, 256, PAR_QUERIES),
            (1280, 256, 256, PAR_TILES),
            (256, 1280, 64, PAR_QUERIES),
            (37, 100, 33, 16),
        ] {
            let lhs: Vec<f32> = (0..m * depth).map(|_| normal.sample(&mut rng)).collect();
            let rhs: Vec<f32> = (0..n * depth).map(|_| normal.sample(&mut rng)).collect();
            let product = |rows: &[f32], out: &mut [f32]| {
                let g = Gemm {
                    m: rows.len() / depth,
                    n,
                    k: depth,
                };
                sgemm_with(
                    GemmLib::Gemm,
                    g,
                    out,
                    false,
                    (rows, depth, 1),
                    (&rhs, 1, depth),
                )
            };
            let mut whole = vec![0.0f32; m * n];
            product(&lhs, &mut whole);
            let mut blocks = vec![0.0f32; m * n];
            for (rows, out) in lhs.chunks(block * depth).zip(blocks.chunks_mut(block * n)) {
                product(rows, out);
            }
            let same = whole
                .iter()
                .zip(&blocks)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{m} x {n} x {depth} in blocks of {block}");
        }
    }
    use crate::dataset::{self, Dtype};
    use crate::Path;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// Embedded Fashion-MNIST's first 1500 rows, their index, and the stored rows in f64.
    fn fixture() -> (Dataset, PruneIndex, Vec<Vec<f64>>) {
        let ds = dataset::load("embedded@1500", Dtype::F32).unwrap();
        let index = PruneIndex::build(&ds).expect("Fashion-MNIST has structure");
        let dim = ds.dim();
        let rows = (0..ds.n_samples())
            .map(|r| {
                let mut y = vec![0.0f32; dim];
                ds.stored_row(r, &mut y);
                y.iter().map(|&v| v as f64).collect()
            })
            .collect();
        (ds, index, rows)
    }

    /// `n_q` rectified-flow queries at t, x_t = alpha y + sigma eps from rows (q 97) mod n,
    /// centred like the stored rows (the mean is alpha's), and their logit coefficients.
    fn queries_at(rows: &[Vec<f64>], t: f64, n_q: usize, seed: u64) -> (Vec<f32>, [f64; 2]) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let c = Path::RectifiedFlow.coefs(t);
        let mut xc = Vec::new();
        for q in 0..n_q {
            for &v in &rows[(q * 97) % rows.len()] {
                let e: f64 = StandardNormal.sample(&mut rng);
                xc.push((c.alpha * v + c.sigma * e) as f32);
            }
        }
        let (a, b) = c.logit_coefs();
        (xc, [a, b])
    }

    /// The queries `xc` with their logit coefficients, on every row of the index.
    fn every_row<'a>(index: &PruneIndex, xc: &'a [f32], coefs: &'a [[f32; 2]]) -> CentredBatch<'a> {
        CentredBatch {
            x: xc,
            logit_coefs: coefs,
            rows: 0..index.perm.len(),
        }
    }

    /// The setup and projection (GEMM at `level`) of the queries `xc` on every row.
    fn projection(
        index: &PruneIndex,
        xc: &[f32],
        [a, b]: [f64; 2],
        level: usize,
    ) -> (Setup, Projection<'static>) {
        let coefs = vec![[a as f32, b as f32]; xc.len() / index.dim];
        let batch = every_row(index, xc, &coefs);
        let setup = Setup::new(index, &batch).expect("all rows");
        let proj = Projection::new(index, &batch, &setup, level).expect("prunable");
        (setup, proj)
    }

    /// The exact logits (f64) of query x against every row, in tile order.
    fn exact_logits(
        index: &PruneIndex,
        rows: &[Vec<f64>],
        x: &[f32],
        [a, b]: [f64; 2],
    ) -> Vec<f64> {
        index
            .perm
            .iter()
            .map(|&r| {
                let y = &rows[r as usize];
                let dot: f64 = x.iter().zip(y).map(|(&u, v)| u as f64 * v).sum();
                a * dot - b * y.iter().map(|v| v * v).sum::<f64>()
            })
            .collect()
    }

    /// The grid's last-level bounds of whole (query, tile) rows equal the sweep's per-pair
    /// ones (a dot product each) up to the dot products' rounding, hold against every
    /// exact f64 logit, and are taken exactly for the rows where a quarter of the pairs
    /// reach the cut.
    #[test]
    fn dense_bounds_equal_the_pairs_bounds_and_hold() {
        let (ds, index, rows) = fixture();
        let (n, dim, k) = (ds.n_samples(), ds.dim(), index.k);
        let n_q = 10;
        for t in [0.55, 0.65, 0.8] {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 9);
            let (_, proj) = projection(&index, &xc, [a, b], 1);
            let last = proj.levels[At::Last as usize];
            let logits: Vec<Vec<f64>> = (0..n_q)
                .map(|q| exact_logits(&index, &rows, &xc[q * dim..(q + 1) * dim], [a, b]))
                .collect();
            // Every other query's rows marked (all pairs reach), the others not (none do),
            // and one of a quarter reaching: marked.
            let need: Vec<usize> = (0..n_q).collect();
            let mut dense = DenseRows::default();
            for t0 in (0..n).step_by(TILE) {
                let nt = TILE.min(n - t0);
                let counts: Vec<(usize, f32)> = (0..n_q)
                    .map(|l| match l % 3 {
                        0 => (nt, 0.0),
                        1 => (0, 0.0),
                        _ => (nt.div_ceil(DENSE_REFINE), 0.0),
                    })
                    .collect();
                dense_bounds(
                    &proj,
                    &index,
                    (0, &need, &counts),
                    (t0, nt),
                    None,
                    &mut dense,
                );
                let marked: Vec<usize> = (0..n_q).filter(|l| l % 3 != 1).collect();
                let want: Vec<bool> = (0..n_q).map(|l| marked.contains(&l)).collect();
                assert_eq!(dense.rows, want, "t = {t}, tile at {t0}");
                assert_eq!(dense.out.len(), marked.len() * nt);
                for (&q, ub) in marked.iter().zip(dense.out.chunks_exact(nt)) {
                    let pq = &proj.px[q * k..(q + 1) * k];
                    for (j, &u) in ub.iter().enumerate() {
                        let p = t0 + j;
                        let mut d = [dot(pq, &index.proj[p * k..(p + 1) * k])];
                        let (ysq, yt) = (
                            &index.lvl_sq[last * n + p..][..1],
                            &index.lvl_tail[last * n + p..][..1],
                        );
                        bounds(&proj.queries[q], At::Last, &mut d, ysq, yt);
                        let s = logits[q][p];
                        assert!(u as f64 >= s, "t = {t}, query {q}, position {p}: {u} < {s}");
                        assert!(
                            // (rounding of terms of the size of `top`, which cancel)
                            (u - d[0]).abs() <= 1e-5 * (1.0 + proj.queries[q].top.abs()),
                            "t = {t}, query {q}, position {p}: {u} against {}",
                            d[0]
                        );
                    }
                }
            }
        }
    }

    /// With `exact`, the grid gives every marked row's f32 logits, bitwise those of
    /// `exact_logit` (the sweep's one pair at a time).
    #[test]
    fn dense_logits_are_the_pairs_logits_bitwise() {
        let (ds, index, rows) = fixture();
        let (n, dim) = (ds.n_samples(), ds.dim());
        let n_q = 7;
        for t in [0.55, 0.9] {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 3);
            let (_, proj) = projection(&index, &xc, [a, b], 1);
            let coefs = vec![[a as f32, b as f32]; n_q];
            let batch = every_row(&index, &xc, &coefs);
            let need: Vec<usize> = (0..n_q).collect();
            let mut dense = DenseRows::default();
            let mut scratch = Vec::new();
            for t0 in (0..n).step_by(TILE) {
                let nt = TILE.min(n - t0);
                // (queries 0, 2, 4, 6 marked)
                let counts: Vec<(usize, f32)> = (0..n_q)
                    .map(|l| if l % 2 == 0 { (nt, 0.0) } else { (0, 0.0) })
                    .collect();
                let exact = Some((&ds, &batch));
                dense_bounds(
                    &proj,
                    &index,
                    (0, &need, &counts),
                    (t0, nt),
                    exact,
                    &mut dense,
                );
                let marked: Vec<usize> = (0..n_q).step_by(2).collect();
                assert_eq!(dense.out.len(), marked.len() * nt);
                for (&q, s) in marked.iter().zip(dense.out.chunks_exact(nt)) {
                    for (j, &v) in s.iter().enumerate() {
                        let p = t0 + j;
                        let norm = ds.sq_norms()[index.perm[p] as usize];
                        let x = &xc[q * dim..(q + 1) * dim];
                        let want = exact_logit(&ds, &index, x, coefs[q], p, norm, &mut scratch);
                        assert_eq!(v.to_bits(), want.to_bits(), "t = {t}, query {q}, at {p}");
                    }
                }
            }
        }
    }

    /// The sweep with the pairs' f32 logits taken at once (`direct`) and with the last
    /// level's bounds first give the same weights, sums and maxima bit for bit (every pair
    /// that reaches the cut gets its logit either way), with certificates within the
    /// budget, from mid to late t.
    #[test]
    fn direct_and_refined_sweeps_weigh_the_same_bits() {
        let (ds, index, rows) = fixture();
        let n_q = 12;
        let mut direct_rows = 0;
        for t in [0.5, 0.6, 0.75, 0.9, 0.99] {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 17);
            let coefs = vec![[a as f32, b as f32]; n_q];
            let batch = every_row(&index, &xc, &coefs);
            let setup = Setup::new(&index, &batch).expect("all rows");
            let run = |direct: bool| {
                let inputs = PassInputs {
                    ds: &ds,
                    index: &index,
                    batch: &batch,
                    setup: &setup,
                    threads: 2,
                    lib: GemmLib::Gemm,
                };
                partial_with(inputs, 1e-3, None, (None, None), direct)
            };
            let (Some(refined), Some(direct)) = (run(false), run(true)) else {
                panic!("t = {t}: the pass gave up");
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&refined.acc), bits(&direct.acc), "t = {t}");
            assert_eq!(bits(&refined.sum_norm), bits(&direct.sum_norm), "t = {t}");
            assert_eq!(refined.samples_kept, direct.samples_kept, "t = {t}");
            for (q, (r, d)) in refined.states.iter().zip(&direct.states).enumerate() {
                let fields = |s: &SoftmaxState| {
                    [s.max, s.sum, s.sum_shifted_logit, s.sum_sq].map(f32::to_bits)
                };
                assert_eq!(fields(r), fields(d), "t = {t}, query {q}");
                assert_eq!(r.argmax, d.argmax, "t = {t}, query {q}");
            }
            for &c in refined.skipped_mass.iter().chain(&direct.skipped_mass) {
                assert!(
                    (0.0..=2f64.powi(-30)).contains(&c),
                    "t = {t}: certificate {c}"
                );
            }
            direct_rows += direct.samples_kept.iter().filter(|&&k| k > 0).count();
        }
        assert!(direct_rows > 0, "no query kept any row");
    }

    /// Every tile bound is at least the exact logit (f64, from the stored rows) of every
    /// row of its tile, on real data from mid to late t, and late the bounds rule out most
    /// (query, tile) pairs.
    #[test]
    fn tile_bounds_hold_and_rule_out_most_tiles_late() {
        let (ds, index, rows) = fixture();
        let dim = ds.dim();
        let n_q = 12;
        let n_t = index.tiles.len();
        for t in [0.5f64, 0.7, 0.9, 0.99] {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 5);
            let (setup, proj) = projection(&index, &xc, [a, b], 0);
            let coefs = vec![[a as f32, b as f32]; n_q];
            let batch = every_row(&index, &xc, &coefs);
            // (every pair's box bound too: no cut)
            let every = vec![f32::NEG_INFINITY; n_q];
            let ubs = proj.tile_ubs(&index, &batch, 0..n_t, Some(&every));
            let balls = proj.tile_ubs(&index, &batch, 0..n_t, None);
            let tighter = ubs.iter().zip(&balls).filter(|(u, b)| u < b).count();
            assert!(ubs.iter().zip(&balls).all(|(u, b)| u <= b));
            let mut ruled_out = 0;
            for q in 0..n_q {
                let logits = exact_logits(&index, &rows, &xc[q * dim..(q + 1) * dim], [a, b]);
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                for (ti, tile) in index.tiles.iter().enumerate() {
                    let ub = ubs[ti * n_q + q] as f64;
                    for &s in &logits[tile.start..tile.start + tile.len] {
                        assert!(ub >= s, "t = {t}, query {q}, tile {ti}: bound {ub} < {s}");
                    }
                    // Below the drop cut of a query whose maximum is known.
                    ruled_out += (ub < max + setup.thresholds()[q]) as usize;
                }
            }
            let share = ruled_out as f64 / (n_q * n_t) as f64;
            eprintln!(
                "t = {t}: tile bounds rule out {share:.3} of the (query, tile) pairs; the box \
                 tightens {:.3} of them",
                tighter as f64 / (n_q * n_t) as f64
            );
            if t >= 0.9 {
                assert!(share > 0.3, "t = {t}: {share}");
            }
        }
    }

    /// With an anchor (the same queries' noise at t = 0.3, its f32 products with every
    /// row), every tile bound is at least the exact logit of every row of its tile, and
    /// late it rules out more (query, tile) pairs than the bound in the queries' own
    /// coordinates.
    #[test]
    fn anchored_tile_bounds_hold_and_beat_the_plain_ones() {
        let (ds, index, rows) = fixture();
        let dim = ds.dim();
        let n_q = 12;
        let n_t = index.tiles.len();
        let n = index.perm.len();
        let (c, [ca, cb]) = queries_at(&rows, 0.3, n_q, 5);
        let c_coefs = vec![[ca as f32, cb as f32]; n_q];
        let anchor_batch = CentredBatch {
            x: &c,
            logit_coefs: &c_coefs,
            rows: 0..n,
        };
        let layout = anchor::Layout::new(&(0..n), n_q);
        let mut products = vec![0.0f32; layout.len()];
        let mut y = vec![0.0f32; dim];
        for q in 0..n_q {
            let cq = &c[q * dim..(q + 1) * dim];
            let row: Vec<f32> = (0..n)
                .map(|p| {
                    ds.stored_row(index.perm[p] as usize, &mut y);
                    cq.iter().zip(&y).map(|(&u, &v)| u * v).sum::<f32>()
                })
                .collect();
            layout.store(q, 0, &row, &mut products);
        }
        let anchor = Anchor::new(&index, &anchor_batch, 0..n, products);
        for t in [0.4f64, 0.6, 0.7, 0.8] {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 5);
            let coefs = vec![[a as f32, b as f32]; n_q];
            let batch = every_row(&index, &xc, &coefs);
            let setup = Setup::new(&index, &batch).expect("all rows");
            // (every pair's box bound too: no cut)
            let every = vec![f32::NEG_INFINITY; n_q];
            let plain = Projection::new(&index, &batch, &setup, 0).expect("prunable");
            let anchored = Projection::anchored(&index, &batch, &setup, &anchor)
                .expect("the anchor serves its own trajectory");
            let (ubs, plain_ubs) = (
                anchored.tile_ubs(&index, &batch, 0..n_t, Some(&every)),
                plain.tile_ubs(&index, &batch, 0..n_t, Some(&every)),
            );
            let mut ruled_out = [0usize; 2];
            for q in 0..n_q {
                let logits = exact_logits(&index, &rows, &xc[q * dim..(q + 1) * dim], [a, b]);
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let cut = max + setup.thresholds()[q];
                for (ti, tile) in index.tiles.iter().enumerate() {
                    let ub = ubs[ti * n_q + q] as f64;
                    for &s in &logits[tile.start..tile.start + tile.len] {
                        assert!(ub >= s, "t = {t}, query {q}, tile {ti}: bound {ub} < {s}");
                    }
                    ruled_out[0] += (ub < cut) as usize;
                    ruled_out[1] += ((plain_ubs[ti * n_q + q] as f64) < cut) as usize;
                }
            }
            let share = ruled_out.map(|r| r as f64 / (n_q * n_t) as f64);
            eprintln!(
                "t = {t}: anchored tile bounds rule out {:.3} of the (query, tile) pairs, plain ones {:.3}",
                share[0], share[1]
            );
            if t >= 0.6 {
                assert!(share[0] > share[1], "t = {t}: {share:?}");
            }
        }
        // The anchor hands a served call's kept-share estimate to later calls of its
        // queries at no smaller alpha only (not to earlier ones, nor to another batch).
        let at = |t: f64, n_q: usize| {
            let (xc, [a, b]) = queries_at(&rows, t, n_q, 5);
            (xc, vec![[a as f32, b as f32]; n_q])
        };
        let remembered = |(x, coefs): &(Vec<f32>, Vec<[f32; 2]>)| {
            anchor.remembered_share(&CentredBatch {
                x,
                logit_coefs: coefs,
                rows: 0..n,
            })
        };
        let (at5, at6, at7) = (at(0.5, n_q), at(0.6, n_q), at(0.7, n_q));
        assert_eq!(remembered(&at6), None, "nothing remembered yet");
        anchor.remember_share(
            0.01,
            &CentredBatch {
                x: &at6.0,
                logit_coefs: &at6.1,
                rows: 0..n,
            },
        );
        assert_eq!(remembered(&at6), Some(0.01));
        assert_eq!(remembered(&at7), Some(0.01));
        assert_eq!(remembered(&at5), None, "an earlier t");
        assert_eq!(remembered(&at(0.7, n_q - 1)), None, "another batch");
    }
}
