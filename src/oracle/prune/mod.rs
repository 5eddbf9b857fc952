//! Exact pruning for the CPU backend (DESIGN.md section 6): skip the samples whose weight
//! cannot reach an f32 result, and certify how much weight was skipped.
//!
//! **Index (once per dataset, deterministic).** A PCA basis V of k = min(`PROJ_DIMS`, D)
//! directions in order of variance (one f64 symmetric eigendecomposition of a seeded
//! subsample's covariance for D <= `EIGEN_MAX_DIM`, subspace iteration above) gives every
//! stored row its projection Py = V y and residual norm |Ry| = |y - V^T V y|. Within each
//! class (so that a class-conditional row range is a union of tiles) a PCA tree, split at
//! the median of the node's principal direction in the first `TREE_DIMS` projected
//! coordinates, orders the rows into tiles of `LEAF_ROWS / 2 ..= LEAF_ROWS` nearby samples.
//! Each tile keeps its projected centroid c, projected radius r = max |Py - c|, the
//! bounding box of its rows' first `BOX_DIMS` projected coordinates with the radius of the
//! rest, the range [rlo, rhi] of its residual norms and max |y|. Per row and screening level l (the cuts
//! `LEVELS`, e.g. 16, 64, 256 coordinates) it keeps |P_l y|^2 (the first cut_l coordinates)
//! and the tail |y - P_l y| (the norm of everything after them, summed as squares).
//!
//! **Bounds.** For any y and any level, `|x - a y|^2 = |P_l (x - a y)|^2 +
//! |(x - a y) - P_l (x - a y)|^2`, which is at least `|P_l x - a P_l y|^2 +
//! (|x - P_l x| - a |y - P_l y|)^2` (triangle inequality on the tail). The first term is a
//! partial distance: `|P_l x|^2 - 2 a P_l x . P_l y + a^2 |P_l y|^2` from the partial dot
//! product over the first cut_l coordinates. Over a tile, `|Px - a Py| >= |Px - a c| - a r`
//! (or, tighter along the leading directions in which tiles are elongated, the distance
//! from the query's first `BOX_DIMS` coordinates to the scaled box plus that ball bound
//! over the other coordinates; the larger of the two is used) and `||Rx| - a |Ry|| >= dist(|Rx|, a [rlo, rhi])`. The backends' logits are
//! `s = c_dot x.y - c_norm |y|^2 = (|x|^2 - |x - a y|^2) / (2 sigma^2)` (exactly, with
//! `a = 2 c_norm / c_dot` and `1 / (2 sigma^2) = c_dot^2 / (4 c_norm)`), so a lower bound L
//! on `|x - a y|^2` gives the upper bound `(|x|^2 - L) / (2 sigma^2)` on s.
//!
//! **Screening in levels.** Per (query, needed tile), every row gets the level-0 bound
//! (16 coordinates: one block of vector FMAs against the tile's dimension-major copy of
//! them); the rows still above the threshold get their partial dot product extended to the
//! next cut (AVX2 dot products over the alive pairs only), and so on. Each level's bound is
//! a valid lower bound, so a row is skipped at the first level that rules it out; cheap
//! levels reject the far rows, the fine ones pay only for the few left. On Fashion-MNIST
//! at t = 0.5 (numpy, 32 queries along x_t = t y + (1 - t) eps): 50% of pairs survive 16
//! coordinates, 28% survive 64, 7% survive 256, and the tail bound after 256 is what the
//! single 64-d projection of the first version gave (about 4x looser).
//!
//! **Rounding.** The f32 logits differ from the exact ones by at most
//! err = (D + 4) 2^-24 (c_dot |x| |y|max + c_norm |y|max^2) (the classic dot-product bound,
//! valid in any summation order, plus the products and the stored f32 norm). The bounds
//! are evaluated in f32 from f32 projections; their terms are at most (|x| + a |y|max)^2
//! and those roundings move them by ~1e-6 of that, against the margin
//! `LB_MARGIN (|x| + a |y|max)^2` = 1e-3 of it taken off every L. So every logit the
//! dense f32 pass would compute for a sample is at most its ub + err.
//!
//! **Order and the running max.** Per query, the tile whose projected centroid is nearest
//! is evaluated first (f32): its largest logit minus 2 err, m0, is a lower bound on the
//! f32 maximum the final result will have (that sample is never skipped, see below), so
//! every later decision can use m0 as the running max without any rescaling.
//!
//! **Skipping: the margin, and why it cannot change an f32 result.** Weights are measured
//! in units of exp(m0), in which the final normaliser l is >= 1. Tiles are skipped whole
//! while the sum of their bounds n_tile exp(ub + err - m0) stays within `TILE_BUDGET` =
//! 2^-31 (those under 2^-32 / T at once, then the rest smallest first: only the few near
//! the threshold are sorted); then, inside the visited tiles, single samples whose bound
//! exp(ub_i + err - m0) is below `SAMPLE_BUDGET` / (samples in visited tiles) = 2^-31 / n
//! are skipped. Everything skipped therefore weighs at most 2^-30 of l in total: the
//! normaliser moves by a relative 2^-30, and x1_hat = acc / l by at most
//! 2^-30 max|y - x1_hat| / |x1_hat| relative, both 64 times under f32's relative rounding
//! 2^-24 (the dense pass itself commits errors of that size at every add of its
//! accumulation, so its own result is only defined to that precision). The sum of the
//! skipped bounds, rescaled to the final (m, l), is each query's certificate
//! (`QueryStats::skipped_mass_bound`, rounded up to f32).
//!
//! **Shared with the gpu.** The per-query tile half (projections, seed m0, tile bounds,
//! whole tiles skipped within `TILE_BUDGET`) is one implementation, [`TilePlanner`]: this
//! module goes on to screen samples; `oracle::gpu::prune` computes the union of the
//! batch's needed tiles and certifies the tiles it leaves out with the same bounds.
//!
//! **Sparse accumulation.** Where a visited tile's survivors fill at least `GEMM_FILL` of
//! the (query, row) block of the group's union, its logits come from one gather and one
//! small GEMM over that block and the weighted sum takes only the columns whose weight is
//! non-zero for some query; sparser tiles (most of them late in a trajectory) are computed
//! query by query over each one's own survivors with direct dot products, each non-zero
//! weight adding its row to the sum (at t = 0.6 on Fashion-MNIST this computes 3.2% of the
//! pairs where the union GEMMs computed 5.9%).
//!
//! **Grouping.** Queries are ordered by their nearest tile (tree order) and cut into
//! groups of at most `EXACT_GROUP`, one rayon task each, so that a group's union of
//! survivors stays close to each query's own.
//!
//! **Fallback.** Once per dataset: when the first `FALLBACK_DIMS` principal directions
//! leave more than `MAX_RESIDUAL_SHARE` of the variance (isotropic data such as
//! `gaussian:60000,784`), no index is built and every call is dense, having spent only
//! the basis. Per call (the order is `CpuBackend`'s): a sample of exact logits estimates
//! the share of weights that can reach f32 (`sparse::kept_share`); above
//! `sparse::SPARSE_MAX_SHARE` (the navigation stage, alpha = 0) the dense pass runs. At
//! most `projected::MAX_SHARE` (late t) the projected pass ([`projected`]: the same
//! per-sample bounds for every pair at once, from projection GEMMs) runs first; where it
//! declines or gives up, and the share is at most `PROBE_MAX_SHARE`, this module's pass is
//! tried: `PROBE_QUERIES` spread-out queries are screened, and the screening's work plus
//! `EXACT_PENALTY` x 2 D per surviving pair is compared with the dense pass's 2 D per
//! pair; above `DENSE_SWITCH` of it [`posterior`] returns `None` and the caller runs the
//! sparse pass ([`sparse`]: every logit, the weighted sum over the weights that count).
//!
//! **Anchors (first in that order).** The sparse pass's f32 logits GEMM leaves every
//! product of its queries with the rows; kept as an anchor ([`anchor`]), they bound a
//! later call's products with the queries' shared noise taken out, so that 16 coordinates
//! screen nearly as well as the f32 logits themselves. Where the backend holds an anchor
//! for the call's queries and rows, the projected pass's sweep (at most
//! `anchor::PROJECTED_MAX_SHARE`) or else the sparse pass runs screened by it; the
//! order above takes the calls it declines. Anchors are forgotten at every dense or
//! t = 0 call (a trajectory's start, or its navigation stage).
//!
//! **Dropping computed weights.** In the exact pass, a computed logit whose weight bound
//! exp(s + err - m0) is below the per-sample threshold is dropped like a sample skipped by
//! bound (same budget: a sample is one or the other) and its bound joins the certificate;
//! late in a trajectory most survivors of the bounds are such, and the weighted sum then
//! takes only the few that count. `QueryStats::samples_skipped` counts both.
//!
//! **Limits (measured on Fashion-MNIST), without an anchor.** The tail term loses about
//! `2 a |x - P_l x| |y - P_l y| / (2 sigma^2)` nats against the truth, since the noise in x
//! is nearly orthogonal to every y's tail; for t <= 0.45 that still exceeds the logit gaps,
//! the probe finds the bounds too loose and the sparse pass runs.
//! `ORACLEFLOW_PRUNE_PROFILE=1` prints each call's phases (probe, bounds, screening,
//! exact pass) and its kept fractions to stderr.

use crate::oracle::simd::multiversion;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

mod accumulate;
pub mod anchor;
mod basis;
pub mod bf16;
mod budget;
mod dots;
pub mod int16;
pub mod lowp;
pub mod projected;
mod screen;
pub mod sparse;

use basis::{pca_basis, split};

pub(crate) use basis::{dot_f64, dot_lanes, orthonormalise, sum_lanes};
use dots::dot;
use screen::{screen, RowSum, ScreenCount, ScreenInputs};

use crate::dataset::{Dataset, Values};
use crate::oracle::cpu::{large_gemm_lib, sgemm, sgemm_with, stored_rows_f32, Gemm};
use crate::oracle::partial::Partial;
use crate::oracle::{CentredBatch, Posterior, SoftmaxState};

/// Dimensions of the projection behind the per-sample bounds.
pub const PROJ_DIMS: usize = 256;
/// Screening levels: a pair's bound is first taken from the leading `LEVELS[0]` projected
/// dimensions plus the norm of the rest, and refined on the survivors with the next cut
/// (partial distances in PCA order). Cheap levels reject the far samples; the fine ones
/// pay only for the few left. Measured on Fashion-MNIST at t = 0.5: 50% of pairs survive
/// 16 dimensions, 28% survive 64 and 7% survive 256, so the cascade costs about 100
/// multiply-adds per pair where the dense pass costs 2 x 784. The cut at 128 spares the
/// last level a share of the pairs that 64 coordinates leave (its row-by-row dot products
/// of 128 coordinates dominated the screening's time at t = 0.6 - 0.7).
pub const LEVELS: [usize; 4] = [16, 64, 128, 256];
/// Most rows per tile (tiles hold between half this and this).
pub const LEAF_ROWS: usize = 64;
// Survivors of a (query, tile) are one u64 bit mask.
const _: () = assert!(LEAF_ROWS <= 64);
/// Fewest rows in a range for which pruning is tried.
pub const MIN_PRUNE_ROWS: usize = 2 * LEAF_ROWS;
/// Estimated cost of the pruned pass, as a share of the dense pass's, above which the
/// call runs the sparse pass instead (estimated from the probe queries, see [`posterior`]).
/// Calibrated by forcing the pruned pass on Fashion-MNIST (B = 256, 2 threads,
/// `ORACLEFLOW_PRUNE_AT`): estimate 0.10 ran at 0.55 of dense (t = 0.6), 0.16 at 0.85
/// (t = 0.55), 0.28 at 1.0 (t = 0.5), where the sparse pass runs at 0.55 - 0.6.
pub const DENSE_SWITCH: f64 = 0.1;
/// [`DENSE_SWITCH`] where the sparse pass screens in bf16 (0.27 - 0.3 of dense from
/// t = 0.6 on Fashion-MNIST, B = 256). The estimate runs low at late t (the screening's
/// scattered work is slower than its count of multiply-adds): 0.043 ran at 0.37 of dense
/// (t = 0.68), 0.035 at 0.31 (0.7), 0.013 at 0.19 (0.8).
pub const DENSE_SWITCH_BF16: f64 = 0.03;
/// Largest estimated kept share (`sparse::kept_share`, which errs high) at which the
/// bounds' probe is run: above it the weights that count are too spread for the
/// per-sample bounds to pay, and the probe's 10 - 15 ms (at B = 256) would be spent for
/// nothing. On Fashion-MNIST the probe first chooses the bounds at t = 0.68, where the
/// estimate is 8.7e-4 (the true kept share 2e-5); the estimate is 1.5e-3 at t = 0.65 and
/// 0.014 at t = 0.5, where the probe put the bounds at 2.7 times the switch.
pub const PROBE_MAX_SHARE: f64 = 1e-3;
/// Cost of one multiply-add of the exact pass over the survivors (gathered rows, small
/// GEMMs, the group's union) relative to one of the dense pass.
const EXACT_PENALTY: f64 = 2.0;
/// Queries whose per-sample bounds decide the fallback.
const PROBE_QUERIES: usize = 8;
/// Most queries sharing one gathered union of survivors (more inflate the union).
const EXACT_GROUP: usize = 16;
/// Largest share of the variance left outside the projection for which an index is built.
/// The residual term of the bounds loses about 2 a |Rx| |Ry| / (2 sigma^2) nats, so with most
/// of the variance outside the projection they prune nothing before t is close to 1.
pub const MAX_RESIDUAL_SHARE: f64 = 0.5;
/// Leading projected dimensions whose captured variance decides whether to build an index
/// (the leading cuts of the levels must already see most of the structure).
const FALLBACK_DIMS: usize = 64;
/// Largest D whose basis comes from a full eigendecomposition (else subspace iteration).
const EIGEN_MAX_DIM: usize = 2048;
/// Leading projected dimensions the PCA tree splits on.
const TREE_DIMS: usize = 64;
/// Rows of the seeded subsample whose covariance gives the basis.
const BASIS_SAMPLE: usize = 2048;
const BASIS_ITERS: usize = 10;
const SEED: u64 = 0x005e_ed0f_7113;
/// Relative weight budget (units of the final normaliser) for whole tiles, then samples.
const TILE_BUDGET: f64 = 1.0 / (1u64 << 31) as f64;
const SAMPLE_BUDGET: f64 = 1.0 / (1u64 << 31) as f64;
/// Share of the group's (query, union row) block that must be needed pairs for the exact
/// pass of a tile to run as one GEMM over the block; sparser tiles take direct dot
/// products over each query's own survivors.
const GEMM_FILL: f64 = 0.5;
/// Rows of the seed tile whose exact logits give the running max's lower bound m0.
const SEED_ROWS: usize = 4;
/// Share of (|x| + a |y|max)^2 taken off every distance bound for the f32 projections.
const LB_MARGIN: f64 = 1e-3;
/// Leading projected coordinates in which each tile also keeps its bounding box. Tiles are
/// elongated along the leading principal directions, where a ball of radius r is loose:
/// the box bound there plus a ball over the remaining coordinates keeps about a quarter
/// of the tiles the ball alone keeps at t = 0.9 on Fashion-MNIST (numpy, 1024 PCA-tree
/// tiles: 19% -> 5% needed at t = 0.9, 43% -> 18% at 0.8, 55% -> 41% at 0.7); more box
/// coordinates gain under 10% more.
const BOX_DIMS: usize = 16;

/// One tile: positions `start..start + len` of the tile order.
#[derive(Clone, Debug)]
struct Tile {
    start: usize,
    len: usize,
    radius: f64,
    /// ln(len), for the tile's weight bound
    ln_len: f64,
    /// max over the tile of |y - c| in the projected coordinates past `BOX_DIMS`
    rest_radius: f64,
    resid_lo: f64,
    resid_hi: f64,
    max_norm: f64,
}

/// The first step of the index: its PCA basis, found only where the data has the
/// low-dimensional structure the bounds need (see [`Structure::test`]).
pub struct Structure {
    basis: Vec<f32>,
}

impl Structure {
    /// The PCA basis (about 1% of one dense evaluation at B = 256), or `None` where the
    /// projection leaves over `MAX_RESIDUAL_SHARE` of the variance (isotropic data such as
    /// `gaussian:60000,784`): then every call runs dense.
    pub fn test(ds: &Dataset) -> Option<Structure> {
        let clock = std::time::Instant::now();
        let (basis, residual_share) = pca_basis(ds);
        if profiling() {
            eprintln!(
                "prune: structure test {:.3}s, residual share {residual_share:.3}",
                clock.elapsed().as_secs_f64()
            );
        }
        (residual_share <= MAX_RESIDUAL_SHARE).then_some(Structure { basis })
    }
}

/// The per-dataset pruning index (see the module docs).
pub struct PruneIndex {
    dim: usize,
    k: usize,
    /// k x D, orthonormal rows
    basis: Vec<f32>,
    /// stored row at each position of the tile order
    perm: Vec<u32>,
    /// its inverse: the position of each stored row
    pos: Vec<u32>,
    /// N x k projections, tile order
    proj: Vec<f32>,
    /// per tile, its rows' first `head_dims` projected coordinates, dimension-major and
    /// padded to `LEAF_ROWS` columns (T x head_dims x LEAF_ROWS): the first levels' dot
    /// products of one query with a whole tile are then plain vector FMAs
    proj0t: Vec<f32>,
    /// the coordinates in `proj0t`: those of the first two levels (or fewer when k is)
    head_dims: usize,
    /// the level cuts in use (`LEVELS` clipped to k, ascending, the last = k)
    levels: Vec<usize>,
    /// per level l and row p (tile order), at l * N + p: |P_l y|^2, the squared norm of
    /// the row's first levels[l] projected coordinates (f32: screening runs in f32, its
    /// rounding far inside `LB_MARGIN`)
    lvl_sq: Vec<f32>,
    /// per level and row: |y - P_l y|, the norm of everything past levels[l]
    lvl_tail: Vec<f32>,
    tiles: Vec<Tile>,
    /// per tile, the bounding box of its rows' first `box_dims` projected coordinates:
    /// T x 2 x box_dims, lower corner then upper corner
    boxes: Vec<f32>,
    box_dims: usize,
    /// T x k projected centroids (f32 for the GEMM with the queries' projections)
    centres: Vec<f32>,
    /// |c|^2 per tile
    centre_sq: Vec<f64>,
    /// (stored rows, tiles) of each class (or of the whole dataset without labels)
    segments: Vec<(Range<usize>, Range<usize>)>,
    /// the rows in tile order packed for the sparse pass's screening kernel (built at its
    /// first use; `None` where the CPU has no such kernel or the env turns them off, see
    /// `lowp::Kind::for_cpu`)
    panels: std::sync::OnceLock<Option<lowp::Panels>>,
    /// the rows in tile order as f32 (built at the first pruned or sparse call; `None`
    /// where N x D x 4 bytes exceed a quarter of the available memory)
    tiled: std::sync::OnceLock<Option<Vec<f32>>>,
}

impl PruneIndex {
    /// The index, or `None` when the data has no low-dimensional structure for the bounds
    /// to use (the projection leaves over `MAX_RESIDUAL_SHARE` of the variance, e.g.
    /// isotropic Gaussians): then only the basis (about 1% of one dense evaluation at
    /// B = 256) was spent and every call runs dense.
    pub fn build(ds: &Dataset) -> Option<PruneIndex> {
        Some(Self::build_from(ds, Structure::test(ds)?))
    }

    /// The index from the basis [`Structure::test`] found (the rest of [`Self::build`]).
    pub fn build_from(ds: &Dataset, structure: Structure) -> PruneIndex {
        let (n, dim) = (ds.n_samples(), ds.dim());
        let clock = std::time::Instant::now();
        let lap = |what: &str| {
            if profiling() {
                eprintln!(
                    "prune: index {what} at {:.3}s",
                    clock.elapsed().as_secs_f64()
                );
            }
        };
        let basis = structure.basis;
        let k = basis.len() / dim;

        // Projections and residual norms of every stored row, in row blocks.
        const BLOCK: usize = 2048;
        let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
        let blocks: Vec<(Vec<f32>, Vec<f32>)> = starts
            .par_iter()
            .map(|&s| {
                let rows = s..(s + BLOCK).min(n);
                let nr = rows.len();
                let mut scratch = Vec::new();
                let y = stored_rows_f32(ds, rows, &mut scratch);
                let (p, r) = project(y, nr, dim, &basis, k);
                (p, r)
            })
            .collect();
        let mut proj_rows = Vec::with_capacity(n * k);
        let mut resid_rows = Vec::with_capacity(n);
        for (p, r) in blocks {
            proj_rows.extend(p);
            resid_rows.extend(r);
        }

        lap("projections");
        let seg_rows: Vec<Range<usize>> = match ds.labels() {
            Some(_) => ds
                .class_counts()
                .iter()
                .map(|(c, _)| ds.rows_for(Some(*c)).expect("class present"))
                .collect(),
            None => std::iter::once(0..n).collect(),
        };
        // The classes' trees in parallel (each class's is one task below `split`'s own
        // threshold for splitting in parallel), then laid out one after another.
        let trees: Vec<(Range<usize>, Vec<u32>, Vec<usize>)> = seg_rows
            .into_par_iter()
            .map(|rows| {
                let mut ids: Vec<u32> = rows.clone().map(|r| r as u32).collect();
                let leaves = split(&mut ids, &proj_rows, k, TREE_DIMS.min(k));
                (rows, ids, leaves)
            })
            .collect();
        let mut perm = Vec::with_capacity(n);
        let mut tiles = Vec::new();
        let mut segments = Vec::new();
        for (rows, ids, leaves) in trees {
            let first_tile = tiles.len();
            let mut pos = perm.len();
            for len in leaves {
                tiles.push(Tile {
                    start: pos,
                    len,
                    radius: 0.0,
                    ln_len: (len as f64).ln(),
                    rest_radius: 0.0,
                    resid_lo: 0.0,
                    resid_hi: 0.0,
                    max_norm: 0.0,
                });
                pos += len;
            }
            perm.extend(ids);
            segments.push((rows, first_tile..tiles.len()));
        }

        lap("tree");
        let levels = level_cuts(k);
        let nl = levels.len();
        // The rows' projections in tile order and their level norms, in parallel.
        let mut proj = vec![0.0f32; n * k];
        let mut row_sq = vec![0.0f64; n * nl];
        let mut row_tail = vec![0.0f64; n * nl];
        let resid: Vec<f32> = perm.iter().map(|&row| resid_rows[row as usize]).collect();
        proj.par_chunks_mut(k)
            .zip(row_sq.par_chunks_mut(nl))
            .zip(row_tail.par_chunks_mut(nl))
            .zip(perm.par_iter())
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(sq, tail), (((p, rs), rt), &row)| {
                    p.copy_from_slice(&proj_rows[row as usize * k..(row as usize + 1) * k]);
                    sq.clear();
                    tail.clear();
                    level_norms(p, resid_rows[row as usize], &levels, sq, tail);
                    rs.copy_from_slice(sq);
                    rt.copy_from_slice(tail);
                },
            );
        // Level-major, so that a tile's rows are contiguous at every level.
        let level_major = |v: &[f64]| -> Vec<f32> {
            (0..nl)
                .flat_map(|l| (0..n).map(move |p| v[p * nl + l] as f32))
                .collect()
        };
        let (lvl_sq, lvl_tail) = (level_major(&row_sq), level_major(&row_tail));
        let head_dims = levels[1.min(nl - 1)];
        let mut proj0t = vec![0.0f32; tiles.len() * head_dims * LEAF_ROWS];
        for (t, tile) in tiles.iter().enumerate() {
            let block = &mut proj0t[t * head_dims * LEAF_ROWS..(t + 1) * head_dims * LEAF_ROWS];
            for j in 0..tile.len {
                let p = &proj[(tile.start + j) * k..(tile.start + j) * k + head_dims];
                for (d, &v) in p.iter().enumerate() {
                    block[d * LEAF_ROWS + j] = v;
                }
            }
        }
        let norms = ds.sq_norms();
        let nb = BOX_DIMS.min(k);
        let mut centres = vec![0.0f64; tiles.len() * k];
        let mut boxes = vec![0.0f32; tiles.len() * 2 * nb];
        // Per tile, in parallel: its centroid, radii, box and norm ranges.
        let tiles_stats = tiles
            .par_iter_mut()
            .zip(centres.par_chunks_mut(k))
            .zip(boxes.par_chunks_mut(2 * nb));
        tiles_stats.for_each(|((tile, c), bx)| {
            let pos = tile.start..tile.start + tile.len;
            for i in pos.clone() {
                for (cj, &v) in c.iter_mut().zip(&proj[i * k..(i + 1) * k]) {
                    *cj += v as f64;
                }
            }
            // Rounded to f32 here, so the radius is measured from the centre the queries use.
            c.iter_mut()
                .for_each(|v| *v = (*v / tile.len as f64) as f32 as f64);
            let (mut rad, mut lo, mut hi, mut mx) = (0.0f64, f64::INFINITY, 0.0f64, 0.0f64);
            let mut rest = 0.0f64;
            let (blo, bhi) = bx.split_at_mut(nb);
            blo.fill(f32::INFINITY);
            bhi.fill(f32::NEG_INFINITY);
            for i in pos {
                let p = &proj[i * k..(i + 1) * k];
                let sq = |r: Range<usize>| -> f64 {
                    c[r.clone()]
                        .iter()
                        .zip(&p[r])
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum()
                };
                let head = sq(0..nb);
                let tail = sq(nb..k);
                rad = rad.max((head + tail).sqrt());
                rest = rest.max(tail.sqrt());
                for d in 0..nb {
                    blo[d] = blo[d].min(p[d]);
                    bhi[d] = bhi[d].max(p[d]);
                }
                lo = lo.min(resid[i] as f64);
                hi = hi.max(resid[i] as f64);
                mx = mx.max((norms[perm[i] as usize] as f64).sqrt());
            }
            // Rounded outwards, so that f64 rounding here cannot tighten a bound.
            tile.radius = rad * (1.0 + 1e-9);
            tile.rest_radius = rest * (1.0 + 1e-9);
            tile.resid_lo = lo * (1.0 - 1e-9);
            tile.resid_hi = hi * (1.0 + 1e-9);
            tile.max_norm = mx * (1.0 + 1e-9);
        });
        lap("tiles");
        let mut pos = vec![0u32; n];
        for (p, &r) in perm.iter().enumerate() {
            pos[r as usize] = p as u32;
        }
        PruneIndex {
            dim,
            k,
            basis,
            perm,
            pos,
            proj,
            proj0t,
            head_dims,
            levels,
            lvl_sq,
            lvl_tail,
            tiles,
            boxes,
            box_dims: nb,
            centre_sq: centres
                .chunks_exact(k)
                .map(|c| c.iter().map(|&v| (v as f32 as f64).powi(2)).sum())
                .collect(),
            centres: centres.iter().map(|&v| v as f32).collect(),
            segments,
            panels: std::sync::OnceLock::new(),
            tiled: std::sync::OnceLock::new(),
        }
    }

    pub fn n_tiles(&self) -> usize {
        self.tiles.len()
    }

    pub fn proj_dims(&self) -> usize {
        self.k
    }

    /// The stored row at each position of the tile order (tiles are runs of positions).
    pub fn perm(&self) -> &[u32] {
        &self.perm
    }

    /// Positions (in the tile order of [`PruneIndex::perm`]) of tile `t`.
    pub fn tile_positions(&self, t: usize) -> Range<usize> {
        let tile = &self.tiles[t];
        tile.start..tile.start + tile.len
    }

    /// The screening panels of the rows (see `panels`), packed at the first call.
    /// Not packed where they would take over a quarter of the available memory (the
    /// sparse pass then computes its logits in f32).
    fn screen_panels(&self, ds: &Dataset) -> Option<&lowp::Panels> {
        self.panels
            .get_or_init(|| {
                let kind = self.panel_kind()?;
                Some(lowp::Panels::pack(kind, ds, &self.perm))
            })
            .as_ref()
    }

    /// The kind of [`Self::screen_panels`] without building them (0.1 s on Fashion-MNIST,
    /// which a call that only asks, and then runs another pass, need not pay): the built
    /// panels', else the CPU's where there is room for them.
    fn screen_kind(&self) -> Option<lowp::Kind> {
        match self.panels.get() {
            Some(built) => built.as_ref().map(|p| p.kind()),
            None => self.panel_kind(),
        }
    }

    /// The CPU's screening kind where its panels of every row fit in a quarter of the
    /// available memory.
    fn panel_kind(&self) -> Option<lowp::Kind> {
        let kind = lowp::Kind::for_cpu()?;
        let bytes = kind.bytes_for(self.perm.len(), self.dim) as u64;
        let room = crate::dataset::limits::available_memory().is_none_or(|a| bytes <= a / 4);
        room.then_some(kind)
    }

    /// The rows in tile order as f32, N x D, where they fit in a quarter of the available
    /// memory (and ORACLEFLOW_PRUNE_TILED is not 0). The pruned and sparse passes read
    /// rows a tile at a time and the exact logits row by row: from the stored order each
    /// row is a scattered read (a gather copy per tile, and a cache-missing row for each
    /// exact logit), from this copy a tile is one contiguous block. The values are the
    /// stored rows' f32 values, so every result is the same bits either way
    /// (tests/prune_tiled.rs). On Fashion-MNIST (188 MB, built in about 0.1 s at the first
    /// call that prunes) the bounds pass at t = 0.8 takes 0.042 s instead of 0.054. Built
    /// by the first caller: callers outside the passes' parallel tasks (a rayon task
    /// waiting on the build would leave it one thread; see `CpuBackend::prepare`).
    pub(crate) fn tiled_rows(&self, ds: &Dataset) -> Option<&[f32]> {
        self.tiled
            .get_or_init(|| {
                let bytes = (self.perm.len() * self.dim * 4) as u64;
                let room =
                    crate::dataset::limits::available_memory().is_none_or(|a| bytes <= a / 4);
                let off = std::env::var("ORACLEFLOW_PRUNE_TILED").is_ok_and(|v| v == "0");
                (room && !off).then(|| {
                    let dim = self.dim;
                    let mut rows = vec![0.0f32; self.perm.len() * dim];
                    rows.par_chunks_mut(dim * LEAF_ROWS)
                        .zip(self.perm.par_chunks(LEAF_ROWS))
                        .for_each(|(out, perm)| {
                            for (o, &r) in out.chunks_exact_mut(dim).zip(perm) {
                                ds.stored_row(r as usize, o);
                            }
                        });
                    rows
                })
            })
            .as_deref()
    }

    /// The stored rows' |y|^2 at `positions` of the tile order, into the first
    /// `positions.len()` values of `out`.
    fn sq_norms_at(&self, ds: &Dataset, positions: Range<usize>, out: &mut [f32]) {
        let norms = ds.sq_norms();
        for (n, &r) in out.iter_mut().zip(&self.perm[positions]) {
            *n = norms[r as usize];
        }
    }

    /// The rows at `positions` of the tile order as f32 (N x D): a slice of
    /// [`Self::tiled_rows`] where that exists, else gathered into `scratch`.
    fn rows_at<'a>(
        &'a self,
        ds: &Dataset,
        positions: Range<usize>,
        scratch: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let dim = self.dim;
        if let Some(t) = self.tiled_rows(ds) {
            return &t[positions.start * dim..positions.end * dim];
        }
        scratch.resize(positions.len() * dim, 0.0);
        for (p, o) in positions.zip(scratch.chunks_exact_mut(dim)) {
            ds.stored_row(self.perm[p] as usize, o);
        }
        scratch
    }

    /// Tiles covering exactly `rows` (all rows, or one class), if any.
    pub fn tiles_covering(&self, rows: &Range<usize>) -> Option<Range<usize>> {
        self.tiles_for(rows)
    }

    /// The index positions of `rows` where they are a non-empty union of tiles.
    pub(crate) fn positions_for(&self, rows: &Range<usize>) -> Option<Range<usize>> {
        let tiles = self.tiles_for(rows).filter(|t| !t.is_empty())?;
        let (first, last) = (&self.tiles[tiles.start], &self.tiles[tiles.end - 1]);
        Some(first.start..last.start + last.len)
    }

    /// Tiles covering exactly `rows` (all rows, or one class), if any.
    fn tiles_for(&self, rows: &Range<usize>) -> Option<Range<usize>> {
        let n = self.perm.len();
        if *rows == (0..n) {
            return Some(0..self.tiles.len());
        }
        self.segments
            .iter()
            .find(|(r, _)| r == rows)
            .map(|(_, t)| t.clone())
    }
}

/// `LEVELS` clipped to k: ascending, distinct, ending at k.
fn level_cuts(k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = LEVELS.iter().map(|&l| l.min(k)).collect();
    v.push(k);
    v.dedup();
    v
}

/// Appends, per level, the squared norm of the first `levels[l]` coordinates of `p` and
/// the norm of the rest of the vector (`p`'s later coordinates and the residual `r`).
/// Tails are sums of squares, never differences, so small ones carry no cancellation.
fn level_norms(p: &[f32], r: f32, levels: &[usize], sq: &mut Vec<f64>, tail: &mut Vec<f64>) {
    let sum_sq = |v: &[f32]| v.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    let nl = levels.len();
    let (mut head, mut prev) = (0.0f64, 0);
    for &cut in levels {
        head += sum_sq(&p[prev..cut]);
        sq.push(head);
        prev = cut;
    }
    // Suffix sums, from the last level back.
    let mut rest = (r as f64).powi(2);
    let mut tails = [0.0f64; LEVELS.len() + 1];
    for l in (0..nl).rev() {
        if l + 1 < nl {
            rest += sum_sq(&p[levels[l]..levels[l + 1]]);
        }
        tails[l] = rest.sqrt();
    }
    tail.extend_from_slice(&tails[..nl]);
}

/// Projections (nr x k) and residual norms of `nr` rows `y` (nr x dim).
///
/// The residual norm comes from Pythagoras, |R y|^2 = |y|^2 - |P y|^2 in f64 (the basis is
/// orthonormal), rather than from |y - P^T P y|: that took a second GEMM of the same size,
/// a third of the index's build and of every call's query projection. The subtraction
/// carries the rounding of the f32 P y (its GEMM's, typically sqrt(D) 2^-24 |y| per
/// coordinate, and its own, 2^-24 |P y|): about 2 (sqrt(D) + sqrt(k)) 2^-24 |y|^2 in
/// |P y|^2, which `RESID_SLACK` times that added before the root covers. Where the residual
/// holds less than `PYTHAGORAS_MIN` of |y|^2, that would be too much of it: those rows
/// (none on Fashion-MNIST; every row where the basis spans the data) are back-projected,
/// whose error is that of P y alone.
fn project(y: &[f32], nr: usize, dim: usize, basis: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut p = vec![0.0f32; nr * k];
    let lib = large_gemm_lib();
    // (nr x dim) * (dim x k): element (d, j) of the rhs is basis[j * dim + d].
    sgemm_with(
        lib,
        Gemm {
            m: nr,
            n: k,
            k: dim,
        },
        &mut p,
        false,
        (y, dim, 1),
        (basis, 1, dim),
    );
    let slack = RESID_SLACK * 2.0 * ((dim as f64).sqrt() + (k as f64).sqrt()) * f64::powi(2.0, -24);
    let mut small = Vec::new();
    let mut r: Vec<f32> = y
        .chunks_exact(dim)
        .zip(p.chunks_exact(k))
        .enumerate()
        .map(|(i, (row, pr))| {
            let (yy, pp) = (sum_sq(row), sum_sq(pr));
            if yy - pp < PYTHAGORAS_MIN * yy {
                small.push(i);
            }
            ((yy - pp).max(0.0) + slack * yy).sqrt() as f32
        })
        .collect();
    if !small.is_empty() {
        let (mut ps, mut ys) = (Vec::new(), Vec::new());
        for &i in &small {
            ps.extend_from_slice(&p[i * k..(i + 1) * k]);
            ys.extend_from_slice(&y[i * dim..(i + 1) * dim]);
        }
        let mut back = vec![0.0f32; small.len() * dim];
        sgemm_with(
            lib,
            Gemm {
                m: small.len(),
                n: dim,
                k,
            },
            &mut back,
            false,
            (&ps, k, 1),
            (basis, dim, 1),
        );
        for ((&i, a), b) in small
            .iter()
            .zip(ys.chunks_exact(dim))
            .zip(back.chunks_exact(dim))
        {
            r[i] = distance(a, b) as f32;
        }
    }
    (p, r)
}

/// The residual norms' allowance for the projections' rounding (see [`project`]), in units
/// of its typical size.
const RESID_SLACK: f64 = 4.0;
/// Least share of |y|^2 in the residual for [`project`]'s subtraction.
const PYTHAGORAS_MIN: f64 = 1e-2;

multiversion! {
    /// |a - b| in f64.
    fn distance(a: &[f32], b: &[f32]) -> f64 = distance_body;
}

/// [`distance`], summed in lanes ([`pair_lanes`]; a single running sum was a third of the
/// index's projection step).
#[inline(always)]
fn distance_body(a: &[f32], b: &[f32]) -> f64 {
    pair_lanes(a, b, |u, v| (u - v) * (u - v)).sqrt()
}

multiversion! {
    /// |v|^2 in f64.
    fn sum_sq(v: &[f32]) -> f64 = sum_sq_body;
}

multiversion! {
    /// a . b of two f32 vectors in f64.
    fn dot_wide(a: &[f32], b: &[f32]) -> f64 = dot_wide_body;
}

#[inline(always)]
fn dot_wide_body(a: &[f32], b: &[f32]) -> f64 {
    pair_lanes(a, b, |u, v| u * v)
}

#[inline(always)]
fn sum_sq_body(v: &[f32]) -> f64 {
    pair_lanes(v, v, |u, _| u * u)
}

/// sum_i f(a_i, b_i) in f64 (the values widened from f32), in 8 independent running sums
/// over whole chunks, the rest into the first lanes, the lanes added in order: a single
/// f64 running sum waits out its add latency at every coordinate. The callers' versions
/// (see `multiversion!`) run the same operations: the same bits.
#[inline(always)]
fn pair_lanes(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += f(u as f64, v as f64);
        }
    }
    for ((s, &u), &v) in acc.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
        *s += f(u as f64, v as f64);
    }
    acc.iter().sum::<f64>()
}

/// Per-query quantities behind the bounds.
struct QueryBound {
    /// false at alpha = 0 (all logits equal): nothing can be skipped
    prunable: bool,
    a: f64,
    /// 1 / (2 sigma^2)
    inv: f64,
    c_dot: f64,
    c_norm: f64,
    x_sq: f64,
    x_norm: f64,
    resid: f64,
    px_sq: f64,
    /// per level: |P_l x|^2 and |x - P_l x| (as the index's `lvl_sq`, `lvl_tail`)
    lv_sq: [f64; LEVELS.len() + 1],
    lv_tail: [f64; LEVELS.len() + 1],
    /// lower bound on the f32 maximum logit (see the module docs)
    m0: f64,
    /// the tile of the seed (queries are grouped by it, so that a group's survivors overlap)
    seed_tile: usize,
    /// ln of the per-sample skip threshold
    ln_sample_thr: f64,
    /// certificate so far, in units of exp(m0)
    cert: f64,
    needed_tiles: usize,
}

impl QueryBound {
    /// Bound on how far an f32 logit of a row with |y| <= y_max is above the exact one.
    fn err(&self, y_max: f64, dim: usize) -> f64 {
        (dim + 4) as f64
            * f64::powi(2.0, -24)
            * (self.c_dot * self.x_norm * y_max + self.c_norm * y_max * y_max)
    }

    /// ln of the bound on one f32 weight exp(s - m0), from a lower bound l2 on
    /// |x - a y|^2 (before the margin) for rows with |y| <= y_max.
    fn ln_weight(&self, l2: f64, y_max: f64, err: f64) -> f64 {
        let margin = LB_MARGIN * (self.x_norm + self.a * y_max).powi(2);
        let lb = (l2 - margin).max(0.0);
        self.inv * (self.x_sq - lb) + err - self.m0
    }
}

/// The tiled pruned posterior of `batch`, or `None` where dense evaluation is the better
/// choice (rows not a union of tiles, bounds too loose). `kept`, when given, receives per
/// query the stored rows whose logits were computed (for tests of the certificate).
pub fn posterior(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    threads: usize,
    kept: Option<&mut Vec<Vec<u32>>>,
) -> Option<Posterior> {
    partial(ds, index, batch, threads, DENSE_SWITCH, kept).map(Partial::finish)
}

/// [`posterior`] before the division by the normaliser: the state that merges with other
/// row ranges' (see [`Partial`]); `None` likewise, or where the estimated cost exceeds
/// `switch` of the dense pass's (`DENSE_SWITCH`, or `DENSE_SWITCH_BF16` where the
/// alternative is the sparse pass with bf16 screening).
pub fn partial(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    threads: usize,
    switch: f64,
    kept: Option<&mut Vec<Vec<u32>>>,
) -> Option<Partial> {
    let dim = index.dim;
    let n_q = batch.logit_coefs.len();
    let n_rows = batch.rows.len();
    let clock = std::time::Instant::now();
    let bounder = Bounder::new(ds, index, batch)?;
    let tile_range = bounder.tile_range.clone();
    let tiles = &index.tiles[tile_range.clone()];
    let px = &bounder.px;
    let bound = |q: usize| -> (QueryBound, Vec<bool>) {
        let (b, need, _) = bounder.bound(q);
        (b, need)
    };

    // Fallback test first, on a few spread-out queries: when their per-sample bounds leave
    // more than DENSE_SWITCH of their pairs, the sparse pass is cheaper (and little was spent).
    let probe: Vec<usize> = (0..n_q).step_by((n_q / PROBE_QUERIES).max(1)).collect();
    // Bounds and screening query by query, on every thread.
    let (probed, counts): (Vec<(QueryBound, Vec<bool>)>, Vec<ScreenCount>) = probe
        .par_iter()
        .map(|&q| {
            let (b, need) = bound(q);
            let mut masks = vec![0u64; tiles.len()];
            let inputs = ScreenInputs {
                index,
                px,
                qb: &[&b],
                needed: &[&need[..]],
                qids: &[q],
                tile_range: tile_range.clone(),
            };
            let count = screen(&inputs, &mut masks, &mut [0.0]);
            ((b, need), count)
        })
        .unzip();
    let probe_count = counts
        .iter()
        .fold(ScreenCount::default(), |a, c| ScreenCount {
            survivors: a.survivors + c.survivors,
            work: a.work + c.work,
        });
    // Cost model in multiply-adds: the screening's own, plus two products of length D per
    // survivor at EXACT_PENALTY times the dense pass's cost per multiply-add (gathered
    // small GEMMs run slower than the dense pass's large ones).
    let dense_work = (probe.len() * n_rows * 2 * dim) as f64;
    let pruned_work = probe_count.work + EXACT_PENALTY * (probe_count.survivors * 2 * dim) as f64;
    let profile = profiling();
    let t_probe = clock.elapsed().as_secs_f64();
    if profile {
        eprintln!(
            "prune: {:.3}s to the probe; probe keeps {:.4} of pairs, est. cost {:.3} of dense ({:.3} screening)",
            t_probe,
            probe_count.survivors as f64 / (probe.len() * n_rows) as f64,
            pruned_work / dense_work,
            probe_count.work / dense_work
        );
    }
    if pruned_work > switch * dense_work {
        return None;
    }
    // The probe queries' bounds are kept, the others computed now.
    let mut known: Vec<Option<(QueryBound, Vec<bool>)>> = (0..n_q).map(|_| None).collect();
    for (&q, p) in probe.iter().zip(probed) {
        known[q] = Some(p);
    }
    let (qb, needed): (Vec<QueryBound>, Vec<Vec<bool>>) = known
        .into_par_iter()
        .enumerate()
        .map(|(q, p)| p.unwrap_or_else(|| bound(q)))
        .unzip();
    let t_bound = clock.elapsed().as_secs_f64();
    if profile {
        let g = |i: usize| PROFILE_BOUNDS[i].swap(0, Relaxed) as f64 * 1e-9;
        eprintln!(
            "prune: bounds (thread s): seed {:.4}, tile bounds {:.4}, tile skipping {:.4}",
            g(0),
            g(1),
            g(2)
        );
    }

    // Per query group: per-sample bounds, then exact logits and sparse accumulation.
    // Queries in tree order of their nearest tile: neighbours share survivors, so each
    // group's union of survivors (what its GEMMs compute) stays close to each one's own.
    let mut order: Vec<usize> = (0..n_q).collect();
    order.sort_by_key(|&q| (qb[q].seed_tile, q));
    let group = n_q.div_ceil(threads.max(1)).clamp(1, EXACT_GROUP);
    let groups: Vec<Vec<usize>> = order.chunks(group).map(|c| c.to_vec()).collect();
    let record = kept.is_some();
    let results: Vec<GroupResult> = groups
        .par_iter()
        .map(|qs| {
            let mut masks = vec![0u64; qs.len() * tiles.len()];
            let mut cert = vec![0.0f64; qs.len()];
            let c0 = std::time::Instant::now();
            let inputs = ScreenInputs {
                index,
                px,
                qb: &qs.iter().map(|&q| &qb[q]).collect::<Vec<_>>(),
                needed: &qs.iter().map(|&q| &needed[q][..]).collect::<Vec<_>>(),
                qids: qs,
                tile_range: tile_range.clone(),
            };
            let sc = screen(&inputs, &mut masks, &mut cert);
            let c1 = std::time::Instant::now();
            let bounds: Vec<&QueryBound> = qs.iter().map(|&q| &qb[q]).collect();
            let mut r = run_group(
                ds,
                index,
                batch,
                &bounds,
                &masks,
                qs,
                tile_range.clone(),
                record,
            );
            r.cert.iter_mut().zip(&cert).for_each(|(a, c)| *a += c);
            r.timing = [
                (c1 - c0).as_secs_f64(),
                c1.elapsed().as_secs_f64(),
                sc.survivors as f64,
                sc.work,
            ];
            r
        })
        .collect();

    if profile {
        let sum = |i: usize| results.iter().map(|r| r.timing[i]).sum::<f64>();
        let computed: usize = results.iter().flat_map(|r| &r.computed).sum();
        let pairs = (n_q * n_rows) as f64;
        eprintln!(
            "prune: bounds {:.3}s, screen {:.3}s (thread s), exact {:.3}s (thread s), total {:.3}s; \
             survivors {:.5}, computed {:.5} of pairs, screening work {:.4} of dense",
            t_bound - t_probe,
            sum(0),
            sum(1),
            clock.elapsed().as_secs_f64(),
            sum(2) / pairs,
            computed as f64 / pairs,
            sum(3) / (pairs * 2.0 * dim as f64),
        );
    }
    let mut part = Partial::empty(n_q, dim);
    part.tiles_total = tiles.len() as u64;
    part.samples_total = n_rows as u64;
    let mut kept_rows = vec![Vec::new(); if record { n_q } else { 0 }];
    for (qs, mut r) in groups.iter().zip(results) {
        for (local, &q) in qs.iter().enumerate() {
            let st = r.states[local];
            if st.sum == 0.0 || !st.sum.is_finite() {
                return None;
            }
            for (o, &a) in part.acc[q * dim..(q + 1) * dim]
                .iter_mut()
                .zip(&r.acc[local * dim..(local + 1) * dim])
            {
                *o = a as f32;
            }
            let b = &qb[q];
            part.states[q] = st;
            part.sum_norm[q] = r.sum_norm[local];
            // The certificate in units of exp(final m) (divided by l when normalised).
            part.skipped_mass[q] = (b.cert + r.cert[local]) * (b.m0 - st.max as f64).exp();
            part.tiles_kept[q] = b.needed_tiles as u64;
            part.samples_kept[q] = (r.computed[local] - r.dropped[local]) as u64;
            if record {
                kept_rows[q] = std::mem::take(&mut r.kept[local]);
            }
        }
    }
    if let Some(k) = kept {
        *k = kept_rows;
    }
    Some(part)
}

/// A lower bound on |P x - a P y|^2 over the rows y of `tile`, from `dp2` = |P x - a c|^2
/// (c its projected centroid): the larger of the ball bound (|P x - a c| - a r)^2 and the
/// box bound, which splits the coordinates at `nb` = `head.len()`: the distance from the
/// query's first nb coordinates to the scaled bounding box `a [lo, hi]`, plus a ball
/// bound over the rest (their share of dp2 minus the rest radius). The f32 inputs' rounding
/// is within the margin `ln_weight` takes off (each term moves the bound by at most its
/// own rounding, see the module docs).
fn tile_bound(
    b: &QueryBound,
    tile: &Tile,
    dp2: f64,
    pq_head: &[f32],
    c_head: &[f32],
    bx: &[f32],
) -> f64 {
    let a = b.a;
    let ball = (dp2.sqrt() - a * tile.radius).max(0.0).powi(2);
    let nb = pq_head.len();
    let (lo, hi) = bx.split_at(nb);
    let (mut head, mut boxd) = (0.0f64, 0.0f64);
    for d in 0..nb {
        let x = pq_head[d] as f64;
        head += (x - a * c_head[d] as f64).powi(2);
        boxd += (a * lo[d] as f64 - x)
            .max(x - a * hi[d] as f64)
            .max(0.0)
            .powi(2);
    }
    let rest = ((dp2 - head).max(0.0).sqrt() - a * tile.rest_radius).max(0.0);
    ball.max(boxd + rest * rest)
}

/// ln(budget / (2 n)): below it, n bounds together weigh under budget / 2.
fn tiny_bound(budget: f64, n: usize) -> f64 {
    (budget / (2 * n.max(1)) as f64).ln()
}

/// Skips (calls `skip` on) the entries of smallest bound `exp(lw[i])` while their sum stays
/// within `budget`, and returns that sum. The entries below budget / (2 n) go first without
/// sorting (together they weigh under budget / 2; late in a trajectory nearly all are
/// there), then the rest smallest first, so that only the few near the threshold are sorted.
fn skip_smallest(lw: &[f64], budget: f64, mut skip: impl FnMut(usize)) -> f64 {
    let tiny = tiny_bound(budget, lw.len());
    // Bounds this far below `tiny` are counted as exp(negligible) each, without an exp.
    let negligible = tiny - 64.0;
    let neg_w = negligible.exp();
    let mut cum = 0.0f64;
    let mut rest: Vec<(f64, usize)> = Vec::new();
    for (i, &w) in lw.iter().enumerate() {
        if w < tiny {
            cum += if w < negligible { neg_w } else { w.exp() };
            skip(i);
        } else {
            rest.push((w, i));
        }
    }
    rest.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (w, i) in rest {
        let wt = w.exp();
        // (a NaN bound stops the skipping)
        if cum + wt > budget || wt.is_nan() {
            break;
        }
        cum += wt;
        skip(i);
    }
    cum
}

/// Thread time of the per-query bound phases (seed, tile bounds, tile skipping), in ns,
/// summed over the queries of a call for the profile.
static PROFILE_BOUNDS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// One query's share of a [`TilePlan`].
#[derive(Clone, Debug)]
pub struct QueryTiles {
    /// Lower bound on the f32 maximum logit the exact pass will find (from the seed tile);
    /// -inf where nothing may be skipped (e.g. alpha = 0).
    pub m0: f64,
    /// Per tile of [`TilePlan::tiles`]: whether the query needs it (false: its bound is
    /// among the smallest, whose sum stays within the tile budget of 2^-31).
    pub need: Vec<bool>,
    /// Per tile: ln of the bound on the tile's total weight, in units of exp(m0), so that
    /// the skipped mass of any subset of the unneeded tiles is the sum of their exp.
    pub ln_bound: Vec<f64>,
    /// Sum of the unneeded tiles' bounds, units of exp(m0) (at most 2^-31).
    pub cert: f64,
}

/// The tile-level half of exact pruning for a batch: per query, the whole tiles it needs
/// and the bounds of those it may skip (the cpu backend goes on to per-sample screening;
/// the gpu backend computes, for the whole batch, the union of the needed tiles).
#[derive(Clone, Debug)]
pub struct TilePlan {
    /// The index's tiles covering the batch's rows.
    pub tiles: Range<usize>,
    pub queries: Vec<QueryTiles>,
}

/// The per-query tile bounds shared by both backends: prepared once per batch, then
/// evaluated per query (a caller may bound a few probe queries before the rest).
pub struct TilePlanner<'a>(Bounder<'a>);

impl<'a> TilePlanner<'a> {
    /// `None` when the rows are not a union of the index's tiles (all rows or one class)
    /// or fewer than `MIN_PRUNE_ROWS`.
    pub fn new(
        ds: &'a Dataset,
        index: &'a PruneIndex,
        batch: &'a CentredBatch<'a>,
    ) -> Option<Self> {
        Bounder::new(ds, index, batch).map(TilePlanner)
    }

    /// The index's tiles covering the batch's rows.
    pub fn tiles(&self) -> Range<usize> {
        self.0.tile_range.clone()
    }

    /// Query `q`'s tiles (the same bounds and decisions as the cpu path's).
    pub fn query(&self, q: usize) -> QueryTiles {
        let (b, need, ln_bound) = self.0.bound(q);
        QueryTiles {
            m0: b.m0,
            need,
            ln_bound,
            cert: b.cert,
        }
    }
}

/// [`TilePlanner`] over every query of the batch (in parallel).
pub fn tile_plan(ds: &Dataset, index: &PruneIndex, batch: &CentredBatch<'_>) -> Option<TilePlan> {
    let planner = TilePlanner::new(ds, index, batch)?;
    let queries = (0..batch.logit_coefs.len())
        .into_par_iter()
        .map(|q| planner.query(q))
        .collect();
    Some(TilePlan {
        tiles: planner.tiles(),
        queries,
    })
}

/// What every query's tile bounds share: the batch's projections and their products with
/// the tile centres (one GEMM), for the tiles covering the batch's rows.
struct Bounder<'a> {
    ds: &'a Dataset,
    index: &'a PruneIndex,
    batch: &'a CentredBatch<'a>,
    tile_range: Range<usize>,
    /// n_q x k query projections and the n_q residual norms
    px: Vec<f32>,
    rx: Vec<f32>,
    /// n_q x T: projected query . tile centre
    pc: Vec<f32>,
}

impl<'a> Bounder<'a> {
    /// `None` when the rows are not a union of tiles or too few to prune.
    fn new(ds: &'a Dataset, index: &'a PruneIndex, batch: &'a CentredBatch<'a>) -> Option<Self> {
        let (dim, k) = (index.dim, index.k);
        let n_q = batch.logit_coefs.len();
        let tile_range = index.tiles_for(&batch.rows)?;
        if batch.rows.len() < MIN_PRUNE_ROWS {
            return None;
        }
        // Query projections and residual norms.
        let (px, rx) = project(batch.x, n_q, dim, &index.basis, k);
        // Projected query . tile centroid, all pairs (n_q x T): one GEMM. Its f32 rounding,
        // and that of the expanded distance below, is far inside LB_MARGIN.
        let n_tiles = tile_range.len();
        let mut pc = vec![0.0f32; n_q * n_tiles];
        sgemm(
            Gemm {
                m: n_q,
                n: n_tiles,
                k,
            },
            &mut pc,
            false,
            (&px, k, 1),
            (
                &index.centres[tile_range.start * k..tile_range.end * k],
                1,
                k,
            ),
        );
        Some(Bounder {
            ds,
            index,
            batch,
            tile_range,
            px,
            rx,
            pc,
        })
    }

    /// Query `q`'s bound quantities, its needed tiles (false: skipped within
    /// `TILE_BUDGET`) and per tile the ln of the bound on its total weight in units of
    /// exp(m0) (-inf where the query is not prunable).
    fn bound(&self, q: usize) -> (QueryBound, Vec<bool>, Vec<f64>) {
        let (ds, index, batch) = (self.ds, self.index, self.batch);
        let (dim, k) = (index.dim, index.k);
        let x = batch.x;
        let (px, rx, pc) = (&self.px, &self.rx, &self.pc);
        let tile_range = self.tile_range.clone();
        let tiles = &index.tiles[tile_range.clone()];
        let n_tiles = tiles.len();
        let [c_dot, c_norm] = batch.logit_coefs[q].map(|v| v as f64);
        let xq = &x[q * dim..(q + 1) * dim];
        let x_sq: f64 = xq.iter().map(|&v| (v as f64).powi(2)).sum();
        let pq = &px[q * k..(q + 1) * k];
        let geometry = logit_geometry([c_dot, c_norm]);
        let prunable = geometry.is_some();
        let (a, inv) = geometry.unwrap_or((0.0, 0.0));
        let mut b = QueryBound {
            prunable,
            a,
            inv,
            c_dot,
            c_norm,
            x_sq,
            x_norm: x_sq.sqrt(),
            resid: rx[q] as f64,
            px_sq: pq.iter().map(|&v| (v as f64).powi(2)).sum(),
            lv_sq: [0.0; LEVELS.len() + 1],
            lv_tail: [0.0; LEVELS.len() + 1],
            m0: f64::NEG_INFINITY,
            seed_tile: 0,
            ln_sample_thr: f64::NEG_INFINITY,
            cert: 0.0,
            needed_tiles: tiles.len(),
        };
        let (mut sq, mut tail) = (Vec::new(), Vec::new());
        level_norms(pq, rx[q], &index.levels, &mut sq, &mut tail);
        b.lv_sq[..sq.len()].copy_from_slice(&sq);
        b.lv_tail[..tail.len()].copy_from_slice(&tail);
        let mut need = vec![true; tiles.len()];
        if !prunable {
            return (b, need, vec![f64::NEG_INFINITY; tiles.len()]);
        }
        // |Px - a c|^2 per tile; the nearest tile seeds the running max.
        let c_sq = &index.centre_sq[tile_range.clone()];
        let dp2: Vec<f64> = pc[q * n_tiles..(q + 1) * n_tiles]
            .iter()
            .zip(c_sq)
            .map(|(&d, &cs)| (b.px_sq - 2.0 * b.a * d as f64 + b.a * b.a * cs).max(0.0))
            .collect();
        b.seed_tile = (0..n_tiles)
            .min_by(|&i, &j| dp2[i].total_cmp(&dp2[j]).then(i.cmp(&j)))
            .expect("tiles");
        let c0 = std::time::Instant::now();
        b.m0 = seed_max(ds, index, &b, xq, pq, tile_range.start + b.seed_tile);
        let c1 = std::time::Instant::now();
        // Tile screening: each tile's weight bound, then the smallest ones skipped within
        // the budget.
        let nb = index.box_dims;
        let boxes = &index.boxes[tile_range.start * 2 * nb..tile_range.end * 2 * nb];
        let pq_head = &pq[..nb];
        let tiny = tiny_bound(TILE_BUDGET, n_tiles);
        let c_head = |t: usize| &index.centres[(tile_range.start + t) * k..][..nb];
        let lw: Vec<f64> = tiles
            .iter()
            .zip(&dp2)
            .zip(boxes.chunks_exact(2 * nb))
            .enumerate()
            .map(|(t, ((tile, &dp2), bx))| {
                let gap = (b.a * tile.resid_lo - b.resid)
                    .max(b.resid - b.a * tile.resid_hi)
                    .max(0.0);
                let err = b.err(tile.max_norm, dim);
                let lw = |l2: f64| tile.ln_len + b.ln_weight(l2, tile.max_norm, err);
                // The ball bound alone first: it rules out most far tiles by a wide margin.
                let ball = (dp2.sqrt() - b.a * tile.radius).max(0.0).powi(2) + gap * gap;
                let lw_ball = lw(ball);
                if lw_ball < tiny {
                    return lw_ball;
                }
                lw(tile_bound(&b, tile, dp2, pq_head, c_head(t), bx) + gap * gap)
            })
            .collect();
        let c2 = std::time::Instant::now();
        b.cert = skip_smallest(&lw, TILE_BUDGET, |t| need[t] = false);
        if profiling() {
            for (slot, span) in PROFILE_BOUNDS.iter().zip([c1 - c0, c2 - c1, c2.elapsed()]) {
                slot.fetch_add(span.as_nanos() as u64, Relaxed);
            }
        }
        b.needed_tiles = need.iter().filter(|&&v| v).count();
        let visited: usize = tiles
            .iter()
            .zip(&need)
            .filter(|(_, &v)| v)
            .map(|(t, _)| t.len)
            .sum();
        b.ln_sample_thr = (SAMPLE_BUDGET / visited.max(1) as f64).ln();
        (b, need, lw)
    }
}

/// The number environment variable `name` holds, if it is set and parses: the passes'
/// measurement and test overrides of their tuned constants (read per call, so that a
/// test binary can set one before its calls).
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Whether to print per-call phase timings (ORACLEFLOW_PRUNE_PROFILE=1), for tuning.
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ORACLEFLOW_PRUNE_PROFILE").is_ok_and(|v| v == "1"))
}

/// A lower bound on the largest f32 logit the exact pass will compute over `tile`: the
/// largest logit computed here in f32, minus twice the rounding bound (this evaluation and
/// the exact pass's are each within `err` of the exact value, in any summation order).
///
/// Only the `SEED_ROWS` rows nearest the query in the tile's leading `head_dims` projected
/// coordinates are computed (any computed row gives a valid bound; late in a trajectory the
/// nearest in projection is the nearest): a sixteenth of the tile's dot products.
fn seed_max(
    ds: &Dataset,
    index: &PruneIndex,
    b: &QueryBound,
    xq: &[f32],
    pq: &[f32],
    t: usize,
) -> f64 {
    let tile = &index.tiles[t];
    let norms = ds.sq_norms();
    let mut scratch = Vec::new();
    let mut m = f64::NEG_INFINITY;
    for p in seed_rows(index, b.a, pq, t) {
        let row = index.perm[p] as usize;
        let y = stored_rows_f32(ds, row..row + 1, &mut scratch);
        let dot = dot(xq, y) as f64;
        m = m.max(b.c_dot * dot - b.c_norm * norms[row] as f64);
    }
    m - 2.0 * b.err(tile.max_norm, index.dim)
}

/// The positions of the `SEED_ROWS` rows of tile `t` nearest to a query (projection `pq`,
/// scale `a`) in the index's head coordinates; late in a trajectory the nearest sample is
/// among them. Any of their f32 logits is a lower bound on the query's f32 maximum.
fn seed_rows(index: &PruneIndex, a: f64, pq: &[f32], t: usize) -> Vec<usize> {
    let scale = [(a * a) as f32, 2.0 * a as f32];
    let keys = row_keys(index, scale, pq, t, index.head_dims);
    smallest(keys, SEED_ROWS)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Per row of tile `t`: |P x - a P y|^2 less the query's own |P x|^2 over the first `dims`
/// projected coordinates (a level cut inside the head coordinates), from the tile's
/// dimension-major block (vector FMAs over its `LEAF_ROWS` columns), with the row's
/// position. `scale` is [a^2, 2 a].
fn row_keys<'a>(
    index: &'a PruneIndex,
    [a2, two_a]: [f32; 2],
    pq: &[f32],
    t: usize,
    dims: usize,
) -> impl Iterator<Item = (f32, usize)> + 'a {
    let tile = &index.tiles[t];
    let block = &index.proj0t[t * index.head_dims * LEAF_ROWS..][..dims * LEAF_ROWS];
    let mut acc = [0.0f32; LEAF_ROWS];
    for (col, &xd) in block.chunks_exact(LEAF_ROWS).zip(pq) {
        for (a, &y) in acc.iter_mut().zip(col) {
            *a += xd * y;
        }
    }
    let level = index
        .levels
        .iter()
        .position(|&c| c == dims)
        .expect("a level cut");
    let n_all = index.perm.len();
    let sq = &index.lvl_sq[level * n_all + tile.start..][..tile.len];
    (0..tile.len).map(move |j| (a2 * sq[j] - two_a * acc[j], tile.start + j))
}

/// The `n` smallest of `items` by key, ties to the smaller index (in that order; fewer
/// where there are fewer items): one pass, each item compared with the worst kept.
fn smallest(items: impl Iterator<Item = (f32, usize)>, n: usize) -> Vec<(f32, usize)> {
    let before = |x: &(f32, usize), y: &(f32, usize)| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1));
    let mut kept: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    for item in items {
        if kept.len() == n && kept.last().is_none_or(|w| before(w, &item).is_lt()) {
            continue;
        }
        let at = kept.partition_point(|k| before(k, &item).is_lt());
        kept.insert(at, item);
        kept.truncate(n);
    }
    kept
}

/// The logits' geometry from their coefficients `[c_dot, c_norm]`: (a, 1 / (2 sigma^2)),
/// with s = (|x|^2 - |x - a y|^2) / (2 sigma^2) (see the module docs); `None` where the
/// query cannot be pruned (alpha = 0: all logits equal, or coefficients not finite).
fn logit_geometry([c_dot, c_norm]: [f64; 2]) -> Option<(f64, f64)> {
    (c_dot > 0.0 && c_norm > 0.0 && c_dot.is_finite() && c_norm.is_finite())
        .then(|| (2.0 * c_norm / c_dot, c_dot * c_dot / (4.0 * c_norm)))
}

/// Drops the computed logits `row` (of `tile`, one query with bounds `b`) whose exact
/// weight is below the query's per-sample threshold: s + err - m0 < ln(SAMPLE_BUDGET / n).
/// They share the budget of the samples skipped by bound (a sample is skipped one way or
/// the other, never both), become -inf (weight 0, outside every sum) and add their bound
/// to `cert` (units of exp(m0)). Returns how many were dropped and whether any logit is
/// left. Late in a trajectory most survivors of the bounds are such, and the weighted sum
/// (half the exact pass) then takes only the few that count.
fn drop_small(
    row: &mut [f32],
    b: &QueryBound,
    dim: usize,
    tile: &Tile,
    cert: &mut f64,
) -> (usize, bool) {
    let err = b.err(tile.max_norm, dim);
    let (mut dropped, mut any) = (0, false);
    for v in row.iter_mut() {
        let lw = *v as f64 + err - b.m0;
        if lw < b.ln_sample_thr {
            *cert += lw.exp();
            *v = f32::NEG_INFINITY;
            dropped += 1;
        } else {
            any = true;
        }
    }
    (dropped, any)
}

struct GroupResult {
    states: Vec<SoftmaxState>,
    /// per query: the weighted sum of rows, over the tiles in f64 (tiles in index order lie
    /// close together, so a running f32 sum of theirs would grow with every tile and carry
    /// its rounding: 1e-5 relative at alpha = 0 on rank-2 data, against dense's 2e-7)
    acc: Vec<f64>,
    /// per query: sum_j e_j |y_j|^2 on the state's scale (for the posterior variance)
    sum_norm: Vec<f32>,
    /// per-sample skips' bounds, units of exp(m0)
    cert: Vec<f64>,
    computed: Vec<usize>,
    /// per query: computed logits dropped by [`drop_small`]
    dropped: Vec<usize>,
    kept: Vec<Vec<u32>>,
    /// screening s, exact s, survivors, screening work (for the profile)
    timing: [f64; 4],
}

/// One tile's exact pass query by query, over each query's own survivors only: direct dot
/// products (the GEMM over the group's union would compute every (query, union row) pair,
/// most of them for nothing when the survivors are sparse), then each non-zero weight's
/// row added to the query's sum. The same state updates as the GEMM path of [`run_group`].
#[allow(clippy::too_many_arguments)]
fn direct_tile(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    qb: &[&QueryBound],
    tile: &Tile,
    (masks, t, n_t): (&[u64], usize, usize),
    qids: &[usize],
    (ybuf, row_sum): (&mut [f32], &mut RowSum),
    r: &mut GroupResult,
    record: bool,
) {
    let dim = index.dim;
    let norms = ds.sq_norms();
    let pos0 = tile.start;
    // Query l's survivors in this tile are masks[l * n_t + t].
    let tile_masks = || masks.iter().skip(t).step_by(n_t.max(1));
    let all = tile_masks().fold(0u64, |a, &m| a | m);
    // The tile's needed rows as f32 slices: borrowed from the tile-ordered copy or f32
    // data, else converted once.
    let mut rows: [&[f32]; LEAF_ROWS] = [&[]; LEAF_ROWS];
    match (index.tiled_rows(ds), ds.values()) {
        (Some(tiled), _) => {
            for j in (0..tile.len).filter(|&j| all >> j & 1 == 1) {
                rows[j] = &tiled[(pos0 + j) * dim..(pos0 + j + 1) * dim];
            }
        }
        (None, Values::F32(v)) => {
            for j in (0..tile.len).filter(|&j| all >> j & 1 == 1) {
                let row = index.perm[pos0 + j] as usize;
                rows[j] = &v[row * dim..(row + 1) * dim];
            }
        }
        (None, _) => {
            for j in (0..tile.len).filter(|&j| all >> j & 1 == 1) {
                ds.stored_row(
                    index.perm[pos0 + j] as usize,
                    &mut ybuf[j * dim..(j + 1) * dim],
                );
            }
            let ybuf = &*ybuf;
            for j in (0..tile.len).filter(|&j| all >> j & 1 == 1) {
                rows[j] = &ybuf[j * dim..(j + 1) * dim];
            }
        }
    }
    let mut cols = [0usize; LEAF_ROWS];
    let mut s = [0.0f32; LEAF_ROWS];
    for (l, &mask) in tile_masks().enumerate() {
        if mask == 0 {
            continue;
        }
        let q = qids[l];
        let xq = &batch.x[q * dim..(q + 1) * dim];
        let [c_dot, c_norm] = batch.logit_coefs[q];
        let mut n = 0;
        let mut bits = mask;
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            cols[n] = j;
            s[n] = c_dot * dot(xq, rows[j]) - c_norm * norms[index.perm[pos0 + j] as usize];
            n += 1;
        }
        let row = &mut s[..n];
        r.computed[l] += n;
        let (n_dropped, any) = drop_small(row, qb[l], dim, tile, &mut r.cert[l]);
        r.dropped[l] += n_dropped;
        if record {
            let kept = cols[..n]
                .iter()
                .zip(row.iter())
                .filter(|(_, s)| s.is_finite());
            r.kept[l].extend(kept.map(|(&j, _)| index.perm[pos0 + j]));
        }
        if !any {
            continue;
        }
        let st = &mut r.states[l];
        let (was_empty, old_max) = (st.sum == 0.0, st.max);
        let scale = st.absorb_tile(row, 0);
        if was_empty || st.max > old_max {
            st.argmax = index.perm[pos0 + cols[st.argmax as usize]];
        }
        let acc = &mut r.acc[l * dim..(l + 1) * dim];
        if scale != 1.0 {
            acc.iter_mut().for_each(|a| *a *= scale as f64);
        }
        // Into the f64 sum in chunks (`RowSum`): a running f32 sum over every row of the
        // group would carry far more rounding than the dense pass's per-tile GEMMs.
        let mut tile_norm = 0.0f32;
        for (&e, &j) in row.iter().zip(&cols[..n]) {
            if e != 0.0 {
                tile_norm += e * norms[index.perm[pos0 + j] as usize];
                row_sum.add(e, rows[j], acc);
            }
        }
        row_sum.finish(acc);
        r.sum_norm[l] = scale * r.sum_norm[l] + tile_norm;
    }
}

/// Exact logits and sparse accumulation for queries `qids` (bounds `qb`) over the samples
/// in `masks`.
#[allow(clippy::too_many_arguments)]
fn run_group(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    qb: &[&QueryBound],
    masks: &[u64],
    qids: &[usize],
    tile_range: Range<usize>,
    record: bool,
) -> GroupResult {
    let dim = index.dim;
    let gq = qids.len();
    let n_t = tile_range.len();
    let norms = ds.sq_norms();
    let mut r = GroupResult {
        states: vec![SoftmaxState::EMPTY; gq],
        acc: vec![0.0f64; gq * dim],
        sum_norm: vec![0.0f32; gq],
        cert: vec![0.0; gq],
        computed: vec![0; gq],
        dropped: vec![0; gq],
        kept: vec![Vec::new(); if record { gq } else { 0 }],
        timing: [0.0; 4],
    };
    let mut union: Vec<usize> = Vec::with_capacity(LEAF_ROWS);
    let mut qsurv: Vec<usize> = Vec::with_capacity(gq);
    let mut ybuf = vec![0.0f32; LEAF_ROWS * dim];
    let mut xbuf = vec![0.0f32; gq * dim];
    let mut logits = vec![0.0f32; gq * LEAF_ROWS];
    let mut cols: Vec<usize> = Vec::with_capacity(LEAF_ROWS);
    let mut pbuf = vec![0.0f32; gq * LEAF_ROWS];
    let mut ycols = vec![0.0f32; LEAF_ROWS * dim];
    let mut tmp = vec![0.0f32; gq * dim];
    let mut row_sum = RowSum::new(dim);

    for (t, tile) in index.tiles[tile_range].iter().enumerate() {
        let all = (0..gq).fold(0u64, |a, l| a | masks[l * n_t + t]);
        if all == 0 {
            continue;
        }
        let pos0 = tile.start;
        union.clear();
        union.extend((0..tile.len).filter(|&j| all >> j & 1 == 1));
        qsurv.clear();
        qsurv.extend((0..gq).filter(|&l| masks[l * n_t + t] != 0));
        let (nu, nqs) = (union.len(), qsurv.len());
        let pairs: usize = qsurv
            .iter()
            .map(|&l| masks[l * n_t + t].count_ones() as usize)
            .sum();
        if (pairs as f64) < GEMM_FILL * (nu * nqs) as f64 {
            direct_tile(
                ds,
                index,
                batch,
                qb,
                tile,
                (masks, t, n_t),
                qids,
                (&mut ybuf, &mut row_sum),
                &mut r,
                record,
            );
            continue;
        }
        for (u, &j) in union.iter().enumerate() {
            let out = &mut ybuf[u * dim..(u + 1) * dim];
            match index.tiled_rows(ds) {
                Some(tiled) => out.copy_from_slice(&tiled[(pos0 + j) * dim..(pos0 + j + 1) * dim]),
                None => ds.stored_row(index.perm[pos0 + j] as usize, out),
            }
        }
        for (i, &l) in qsurv.iter().enumerate() {
            let q = qids[l];
            xbuf[i * dim..(i + 1) * dim].copy_from_slice(&batch.x[q * dim..(q + 1) * dim]);
        }
        let s = &mut logits[..nqs * nu];
        sgemm(
            Gemm {
                m: nqs,
                n: nu,
                k: dim,
            },
            s,
            false,
            (&xbuf[..nqs * dim], dim, 1),
            (&ybuf[..nu * dim], 1, dim),
        );
        for (i, &l) in qsurv.iter().enumerate() {
            let [c_dot, c_norm] = batch.logit_coefs[qids[l]];
            let row = &mut s[i * nu..(i + 1) * nu];
            for (v, &j) in row.iter_mut().zip(&union) {
                *v = c_dot * *v - c_norm * norms[index.perm[pos0 + j] as usize];
            }
            r.computed[l] += nu;
            let (n_dropped, any) = drop_small(row, qb[l], index.dim, tile, &mut r.cert[l]);
            r.dropped[l] += n_dropped;
            if record {
                let kept = union.iter().zip(row.iter()).filter(|(_, s)| s.is_finite());
                r.kept[l].extend(kept.map(|(&j, _)| index.perm[pos0 + j]));
            }
            if !any {
                row.fill(0.0);
                continue;
            }
            let st = &mut r.states[l];
            let (was_empty, old_max) = (st.sum == 0.0, st.max);
            let scale = st.absorb_tile(row, 0);
            // absorb_tile numbered the columns 0..; map a new argmax to its stored row.
            if was_empty || st.max > old_max {
                st.argmax = index.perm[pos0 + union[st.argmax as usize]];
            }
            // The row now holds the weights e_j: sum e_j |y_j|^2 rides along with l.
            let tile_norm: f32 = row
                .iter()
                .zip(&union)
                .map(|(e, &j)| e * norms[index.perm[pos0 + j] as usize])
                .sum();
            r.sum_norm[l] = scale * r.sum_norm[l] + tile_norm;
            if scale != 1.0 {
                r.acc[l * dim..(l + 1) * dim]
                    .iter_mut()
                    .for_each(|a| *a *= scale as f64);
            }
        }
        // Sparse accumulation: only the columns with a non-zero weight for some query.
        cols.clear();
        cols.extend((0..nu).filter(|&u| (0..nqs).any(|i| s[i * nu + u] != 0.0)));
        if cols.is_empty() {
            continue;
        }
        let nc = cols.len();
        let (p, y): (&[f32], &[f32]) = if nc == nu {
            (&s[..nqs * nu], &ybuf[..nu * dim])
        } else {
            for i in 0..nqs {
                for (c, &u) in cols.iter().enumerate() {
                    pbuf[i * nc + c] = s[i * nu + u];
                }
            }
            for (c, &u) in cols.iter().enumerate() {
                ycols[c * dim..(c + 1) * dim].copy_from_slice(&ybuf[u * dim..(u + 1) * dim]);
            }
            (&pbuf[..nqs * nc], &ycols[..nc * dim])
        };
        sgemm(
            Gemm {
                m: nqs,
                n: dim,
                k: nc,
            },
            &mut tmp[..nqs * dim],
            false,
            (p, nc, 1),
            (y, dim, 1),
        );
        for (i, &l) in qsurv.iter().enumerate() {
            r.acc[l * dim..(l + 1) * dim]
                .iter_mut()
                .zip(&tmp[i * dim..(i + 1) * dim])
                .for_each(|(a, &t)| *a += t as f64);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The residual norms' sum of squares and distance (whichever version this CPU runs)
    /// equal their baselines bitwise and plain f64 sums within rounding.
    #[test]
    fn sum_sq_and_distance_match_the_baseline_and_f64() {
        let mut state = 99u64;
        let mut next = || lcg(&mut state) as f32;
        for n in [0usize, 1, 7, 8, 9, 100, 784] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let want: f64 = a.iter().map(|&u| (u as f64).powi(2)).sum();
            assert_eq!(sum_sq(&a).to_bits(), sum_sq_body(&a).to_bits());
            assert!((sum_sq(&a) - want).abs() <= 1e-14 * want.max(1.0));
            // And the back-projection's distance, likewise.
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = a
                .iter()
                .zip(&b)
                .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert_eq!(distance(&a, &b).to_bits(), distance_body(&a, &b).to_bits());
            assert!((distance(&a, &b) - want).abs() <= 1e-14 * want.max(1.0));
        }
    }

    /// Residual norms from Pythagoras match |y - P^T P y| in f64, never below it by more
    /// than rounding, on rows with large, small and no residual.
    #[test]
    fn residual_norms_match_the_back_projection() {
        let (dim, k) = (40usize, 8usize);
        let mut state = 7u64;
        let mut next = || 2.0 * lcg(&mut state) - 1.0;
        // An orthonormal basis: k unit vectors, each in its own pair of coordinates.
        let mut basis = vec![0.0f32; k * dim];
        for j in 0..k {
            basis[j * dim + 2 * j] = 0.6;
            basis[j * dim + 2 * j + 1] = 0.8;
        }
        let mut rows = Vec::new();
        for scale in [1.0, 1e-3, 0.0] {
            for _ in 0..4 {
                let mut y = vec![0.0f64; dim];
                for j in 0..k {
                    let c = 10.0 * next();
                    for (v, &b) in y.iter_mut().zip(&basis[j * dim..(j + 1) * dim]) {
                        *v += c * b as f64;
                    }
                }
                // Residual in the coordinates no basis vector touches.
                for v in y.iter_mut().skip(2 * k) {
                    *v += scale * next();
                }
                rows.extend(y.iter().map(|&v| v as f32));
            }
        }
        let nr = rows.len() / dim;
        let (p, r) = project(&rows, nr, dim, &basis, k);
        for i in 0..nr {
            let y = &rows[i * dim..(i + 1) * dim];
            let mut back = vec![0.0f64; dim];
            for j in 0..k {
                let b = &basis[j * dim..(j + 1) * dim];
                let c: f64 = b.iter().zip(y).map(|(&u, &v)| u as f64 * v as f64).sum();
                assert!((c - p[i * k + j] as f64).abs() <= 1e-5 * (1.0 + c.abs()));
                for (o, &u) in back.iter_mut().zip(b) {
                    *o += c * u as f64;
                }
            }
            let want = y
                .iter()
                .zip(&back)
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm = sum_sq(y).sqrt();
            let got = r[i] as f64;
            // Never below the true norm beyond the back-projection's own rounding; above it
            // by at most the slack's share, slack |y|^2 / (2 |R y|) with |R y| >= 0.1 |y|
            // where the subtraction is taken (slack = RESID_SLACK 2 (sqrt(D) + sqrt(k))
            // 2^-24: under 3e-5 |y| here).
            assert!(got >= want - 1e-6 * norm, "row {i}: {got} < {want}");
            assert!(got <= want + 3e-5 * norm, "row {i}: {got} vs {want}");
            // Rows whose residual is (nearly) 0 are back-projected: within rounding of it.
            if want < 0.01 * norm {
                assert!(got <= want + 1e-5 * norm, "row {i}: {got} vs {want}");
            }
        }
    }

    /// `smallest` keeps what a full sort would put first, ties to the smaller index.
    #[test]
    fn smallest_matches_a_sort() {
        let mut seed = 3u64;
        let mut next = || lcg(&mut seed);
        for len in [0usize, 1, 5, 8, 9, 100] {
            // Few distinct keys, so that ties occur.
            let items: Vec<(f32, usize)> = (0..len)
                .map(|i| ((next() * 6.0).floor() as f32, i))
                .collect();
            for n in [1usize, 4, 8] {
                let mut sorted = items.clone();
                sorted.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
                sorted.truncate(n);
                assert_eq!(smallest(items.iter().copied(), n), sorted);
            }
        }
    }

    /// A small deterministic generator (the tests need no crate for it): uniform in
    /// [-1, 1). The passes' own test modules use it too.
    pub(super) fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    #[test]
    fn tile_bound_never_exceeds_the_closest_row() {
        let mut seed = 5u64;
        let (k, nb, rows) = (24usize, 8usize, 40usize);
        for case in 0..200 {
            // Rows stretched along the leading coordinates, as PCA-tree tiles are.
            let y: Vec<f32> = (0..rows * k)
                .map(|i| (lcg(&mut seed) * 8.0 / (1.0 + (i % k) as f64)) as f32)
                .collect();
            let mut c = vec![0.0f64; k];
            for r in 0..rows {
                for d in 0..k {
                    c[d] += y[r * k + d] as f64 / rows as f64;
                }
            }
            let c: Vec<f32> = c.iter().map(|&v| v as f32).collect();
            let dist = |r: usize, ds: Range<usize>| -> f64 {
                ds.map(|d| (y[r * k + d] as f64 - c[d] as f64).powi(2))
                    .sum()
            };
            let mut bx = vec![f32::INFINITY; nb];
            bx.extend(vec![f32::NEG_INFINITY; nb]);
            for r in 0..rows {
                for d in 0..nb {
                    bx[d] = bx[d].min(y[r * k + d]);
                    bx[nb + d] = bx[nb + d].max(y[r * k + d]);
                }
            }
            let tile = Tile {
                start: 0,
                len: rows,
                radius: (0..rows).map(|r| dist(r, 0..k).sqrt()).fold(0.0, f64::max),
                ln_len: (rows as f64).ln(),
                rest_radius: (0..rows).map(|r| dist(r, nb..k).sqrt()).fold(0.0, f64::max),
                resid_lo: 0.0,
                resid_hi: 0.0,
                max_norm: 1.0,
            };
            let a = 0.2 + (case % 7) as f64 * 0.3;
            // Queries near the tile, inside it and far away.
            let spread = [0.5, 3.0, 30.0][case % 3];
            let px: Vec<f32> = (0..k)
                .map(|d| (a * c[d] as f64 + lcg(&mut seed) * spread) as f32)
                .collect();
            let dp2: f64 = (0..k)
                .map(|d| (px[d] as f64 - a * c[d] as f64).powi(2))
                .sum();
            let b = QueryBound {
                prunable: true,
                a,
                inv: 1.0,
                c_dot: 1.0,
                c_norm: 1.0,
                x_sq: 0.0,
                x_norm: 0.0,
                resid: 0.0,
                px_sq: 0.0,
                lv_sq: [0.0; LEVELS.len() + 1],
                lv_tail: [0.0; LEVELS.len() + 1],
                m0: 0.0,
                seed_tile: 0,
                ln_sample_thr: 0.0,
                cert: 0.0,
                needed_tiles: 0,
            };
            let lb = tile_bound(&b, &tile, dp2, &px[..nb], &c[..nb], &bx);
            let closest = (0..rows)
                .map(|r| {
                    (0..k)
                        .map(|d| (px[d] as f64 - a * y[r * k + d] as f64).powi(2))
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                lb <= closest * (1.0 + 1e-9) + 1e-9,
                "case {case}: bound {lb} above the closest row's {closest}"
            );
            let ball = (dp2.sqrt() - a * tile.radius).max(0.0).powi(2);
            assert!(
                lb >= ball,
                "case {case}: the box part may only tighten the ball"
            );
        }
    }

    #[test]
    fn skip_smallest_stays_within_the_budget() {
        let mut seed = 9u64;
        for n in [1usize, 5, 100, 3000] {
            let lw: Vec<f64> = (0..n).map(|_| lcg(&mut seed) * 200.0 - 120.0).collect();
            let budget = 1e-9;
            let mut skipped = vec![false; n];
            let cum = skip_smallest(&lw, budget, |i| skipped[i] = true);
            let total: f64 = (0..n).filter(|&i| skipped[i]).map(|i| lw[i].exp()).sum();
            assert!(cum <= budget && total <= cum * (1.0 + 1e-12), "n = {n}");
            // Everything not skipped is larger than the budget left (greedy by size).
            let left = budget - cum;
            for i in (0..n).filter(|&i| !skipped[i]) {
                assert!(lw[i].exp() > left, "n = {n}: entry {i} would have fit");
            }
        }
        // A NaN bound is never skipped, nor anything after it in the sorted order.
        let mut skipped = vec![false; 3];
        skip_smallest(&[f64::NAN, -1e3, 0.0], 1e-9, |i| skipped[i] = true);
        assert_eq!(skipped, [false, true, false]);
    }
}
