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
//! Each tile keeps its projected centroid c, projected radius r = max |Py - c|, the range
//! [rlo, rhi] of its residual norms and max |y|. Per row and screening level l (the cuts
//! `LEVELS`, e.g. 16, 64, 256 coordinates) it keeps |P_l y|^2 (the first cut_l coordinates)
//! and the tail |y - P_l y| (the norm of everything after them, summed as squares).
//!
//! **Bounds.** For any y and any level, `|x - a y|^2 = |P_l (x - a y)|^2 +
//! |(x - a y) - P_l (x - a y)|^2`, which is at least `|P_l x - a P_l y|^2 +
//! (|x - P_l x| - a |y - P_l y|)^2` (triangle inequality on the tail). The first term is a
//! partial distance: `|P_l x|^2 - 2 a P_l x . P_l y + a^2 |P_l y|^2` from the partial dot
//! product over the first cut_l coordinates. Over a tile, `|Px - a Py| >= |Px - a c| - a r`
//! and `||Rx| - a |Ry|| >= dist(|Rx|, a [rlo, rhi])`. The backends' logits are
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
//! in units of exp(m0), in which the final normaliser l is >= 1. Tiles are skipped whole,
//! smallest bound first, while the sum of their bounds n_tile exp(ub + err - m0) stays
//! within `TILE_BUDGET` = 2^-31; then, inside the visited tiles, single samples whose bound
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
//! **Sparse accumulation.** A visited tile's logits are computed only for the union over
//! the query group of the samples that survived, with one gather and one small GEMM; the
//! weighted sum then takes only the columns whose weight is non-zero for some query.
//!
//! **Grouping.** Queries are ordered by their nearest tile (tree order) and cut into
//! groups of at most `EXACT_GROUP`, one rayon task each, so that a group's union of
//! survivors stays close to each query's own.
//!
//! **Fallback.** Once per dataset: when the first `FALLBACK_DIMS` principal directions
//! leave more than `MAX_RESIDUAL_SHARE` of the variance (isotropic data such as
//! `gaussian:60000,784`), no index is built and every call is dense, having spent only
//! the basis. Per call: `PROBE_QUERIES` spread-out queries are screened first, and the
//! screening's work plus `EXACT_PENALTY` x 2 D per surviving pair is compared with the
//! dense pass's 2 D per pair; above `DENSE_SWITCH` of it (early t, unstructured data,
//! alpha = 0), [`posterior`] returns `None` and the caller runs the plain dense pass.
//!
//! **Limits (measured on Fashion-MNIST).** The tail term loses about
//! `2 a |x - P_l x| |y - P_l y| / (2 sigma^2)` nats against the truth, since the noise in x
//! is nearly orthogonal to every y's tail; for t <= 0.45 that still exceeds the logit gaps,
//! the probe finds the bounds too loose and the dense pass runs.
//! `ORACLEFLOW_PRUNE_PROFILE=1` prints each call's phases (probe, bounds, screening,
//! exact pass) and its kept fractions to stderr.

use std::ops::Range;

use rayon::prelude::*;

mod basis;
mod screen;

use basis::{pca_basis, split};

pub(crate) use basis::orthonormalise;
use screen::{dot8, screen};

use crate::dataset::Dataset;
use crate::oracle::cpu::{sgemm, stored_rows_f32, Gemm};
use crate::oracle::partial::Partial;
use crate::oracle::{CentredBatch, Posterior, SoftmaxState};

/// Dimensions of the projection behind the per-sample bounds.
pub const PROJ_DIMS: usize = 256;
/// Screening levels: a pair's bound is first taken from the leading `LEVELS[0]` projected
/// dimensions plus the norm of the rest, and refined on the survivors with the next cut
/// (partial distances in PCA order). Cheap levels reject the far samples; the fine ones
/// pay only for the few left. Measured on Fashion-MNIST at t = 0.5: 50% of pairs survive
/// 16 dimensions, 28% survive 64 and 7% survive 256, so the cascade costs about 100
/// multiply-adds per pair where the dense pass costs 2 x 784.
pub const LEVELS: [usize; 3] = [16, 64, 256];
/// Most rows per tile (tiles hold between half this and this).
pub const LEAF_ROWS: usize = 64;
// Survivors of a (query, tile) are one u64 bit mask.
const _: () = assert!(LEAF_ROWS <= 64);
/// Fewest rows in a range for which pruning is tried.
pub const MIN_PRUNE_ROWS: usize = 2 * LEAF_ROWS;
/// Estimated cost of the pruned pass, as a share of the dense pass's, above which the call
/// runs dense (estimated from the probe queries, see [`posterior`]).
pub const DENSE_SWITCH: f64 = 0.15;
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
/// Share of (|x| + a |y|max)^2 taken off every distance bound for the f32 projections.
const LB_MARGIN: f64 = 1e-3;

/// One tile: positions `start..start + len` of the tile order.
#[derive(Clone, Debug)]
struct Tile {
    start: usize,
    len: usize,
    radius: f64,
    resid_lo: f64,
    resid_hi: f64,
    max_norm: f64,
}

/// The per-dataset pruning index (see the module docs).
pub struct PruneIndex {
    dim: usize,
    k: usize,
    /// k x D, orthonormal rows
    basis: Vec<f32>,
    /// stored row at each position of the tile order
    perm: Vec<u32>,
    /// N x k projections, tile order
    proj: Vec<f32>,
    /// per tile, its rows' first `levels[0]` projected coordinates, dimension-major and
    /// padded to `LEAF_ROWS` columns (T x levels[0] x LEAF_ROWS): the first level's dot
    /// products of one query with a whole tile are then plain vector FMAs
    proj0t: Vec<f32>,
    /// the level cuts in use (`LEVELS` clipped to k, ascending, the last = k)
    levels: Vec<usize>,
    /// per level l and row p (tile order), at l * N + p: |P_l y|^2, the squared norm of
    /// the row's first levels[l] projected coordinates (f32: screening runs in f32, its
    /// rounding far inside `LB_MARGIN`)
    lvl_sq: Vec<f32>,
    /// per level and row: |y - P_l y|, the norm of everything past levels[l]
    lvl_tail: Vec<f32>,
    tiles: Vec<Tile>,
    /// T x k projected centroids (f32 for the GEMM with the queries' projections)
    centres: Vec<f32>,
    /// |c|^2 per tile
    centre_sq: Vec<f64>,
    /// (stored rows, tiles) of each class (or of the whole dataset without labels)
    segments: Vec<(Range<usize>, Range<usize>)>,
}

impl PruneIndex {
    /// The index, or `None` when the data has no low-dimensional structure for the bounds
    /// to use (the projection leaves over `MAX_RESIDUAL_SHARE` of the variance, e.g.
    /// isotropic Gaussians): then only the basis (about 1% of one dense evaluation at
    /// B = 256) was spent and every call runs dense.
    pub fn build(ds: &Dataset) -> Option<PruneIndex> {
        let (n, dim) = (ds.n_samples(), ds.dim());
        let (basis, residual_share) = pca_basis(ds);
        if residual_share > MAX_RESIDUAL_SHARE {
            return None;
        }
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

        let seg_rows: Vec<Range<usize>> = match ds.labels() {
            Some(_) => ds
                .class_counts()
                .iter()
                .map(|(c, _)| ds.rows_for(Some(*c)).expect("class present"))
                .collect(),
            None => std::iter::once(0..n).collect(),
        };
        let mut perm = Vec::with_capacity(n);
        let mut tiles = Vec::new();
        let mut segments = Vec::new();
        for rows in seg_rows {
            let mut ids: Vec<u32> = rows.clone().map(|r| r as u32).collect();
            let leaves = split(&mut ids, &proj_rows, k, TREE_DIMS.min(k));
            let first_tile = tiles.len();
            let mut pos = perm.len();
            for len in leaves {
                tiles.push(Tile {
                    start: pos,
                    len,
                    radius: 0.0,
                    resid_lo: 0.0,
                    resid_hi: 0.0,
                    max_norm: 0.0,
                });
                pos += len;
            }
            perm.extend(ids);
            segments.push((rows, first_tile..tiles.len()));
        }

        let levels = level_cuts(k);
        let nl = levels.len();
        let mut proj = Vec::with_capacity(n * k);
        let mut row_sq = Vec::with_capacity(n * nl);
        let mut row_tail = Vec::with_capacity(n * nl);
        let mut resid = Vec::with_capacity(n);
        for &row in &perm {
            let p = &proj_rows[row as usize * k..(row as usize + 1) * k];
            proj.extend_from_slice(p);
            let r = resid_rows[row as usize];
            level_norms(p, r, &levels, &mut row_sq, &mut row_tail);
            resid.push(r);
        }
        // Level-major, so that a tile's rows are contiguous at every level.
        let level_major = |v: &[f64]| -> Vec<f32> {
            (0..nl)
                .flat_map(|l| (0..n).map(move |p| v[p * nl + l] as f32))
                .collect()
        };
        let (lvl_sq, lvl_tail) = (level_major(&row_sq), level_major(&row_tail));
        let cut0 = levels[0];
        let mut proj0t = vec![0.0f32; tiles.len() * cut0 * LEAF_ROWS];
        for (t, tile) in tiles.iter().enumerate() {
            let block = &mut proj0t[t * cut0 * LEAF_ROWS..(t + 1) * cut0 * LEAF_ROWS];
            for j in 0..tile.len {
                let p = &proj[(tile.start + j) * k..(tile.start + j) * k + cut0];
                for (d, &v) in p.iter().enumerate() {
                    block[d * LEAF_ROWS + j] = v;
                }
            }
        }
        let norms = ds.sq_norms();
        let mut centres = vec![0.0f64; tiles.len() * k];
        for (t, tile) in tiles.iter_mut().enumerate() {
            let c = &mut centres[t * k..(t + 1) * k];
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
            for i in pos {
                let d2: f64 = c
                    .iter()
                    .zip(&proj[i * k..(i + 1) * k])
                    .map(|(a, &b)| (a - b as f64).powi(2))
                    .sum();
                rad = rad.max(d2.sqrt());
                lo = lo.min(resid[i] as f64);
                hi = hi.max(resid[i] as f64);
                mx = mx.max((norms[perm[i] as usize] as f64).sqrt());
            }
            // Rounded outwards, so that f64 rounding here cannot tighten a bound.
            tile.radius = rad * (1.0 + 1e-9);
            tile.resid_lo = lo * (1.0 - 1e-9);
            tile.resid_hi = hi * (1.0 + 1e-9);
            tile.max_norm = mx * (1.0 + 1e-9);
        }
        Some(PruneIndex {
            dim,
            k,
            basis,
            perm,
            proj,
            proj0t,
            levels,
            lvl_sq,
            lvl_tail,
            tiles,
            centre_sq: centres
                .chunks_exact(k)
                .map(|c| c.iter().map(|&v| (v as f32 as f64).powi(2)).sum())
                .collect(),
            centres: centres.iter().map(|&v| v as f32).collect(),
            segments,
        })
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

    /// Tiles covering exactly `rows` (all rows, or one class), if any.
    pub fn tiles_covering(&self, rows: &Range<usize>) -> Option<Range<usize>> {
        self.tiles_for(rows)
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
fn project(y: &[f32], nr: usize, dim: usize, basis: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut p = vec![0.0f32; nr * k];
    // (nr x dim) * (dim x k): element (d, j) of the rhs is basis[j * dim + d].
    sgemm(
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
    let mut back = vec![0.0f32; nr * dim];
    sgemm(
        Gemm { m: nr, n: dim, k },
        &mut back,
        false,
        (&p, k, 1),
        (basis, dim, 1),
    );
    let r = y
        .chunks_exact(dim)
        .zip(back.chunks_exact(dim))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect();
    (p, r)
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
    partial(ds, index, batch, threads, kept).map(Partial::finish)
}

/// [`posterior`] before the division by the normaliser: the state that merges with other
/// row ranges' (see [`Partial`]); `None` likewise.
pub fn partial(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
    threads: usize,
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
    // more than DENSE_SWITCH of their pairs, the dense pass is cheaper (and little was spent).
    let probe: Vec<usize> = (0..n_q).step_by((n_q / PROBE_QUERIES).max(1)).collect();
    let probed: Vec<(QueryBound, Vec<bool>)> = probe.par_iter().map(|&q| bound(q)).collect();
    let mut probe_masks = vec![0u64; probe.len() * tiles.len()];
    let mut probe_cert = vec![0.0f64; probe.len()];
    let probe_count = screen(
        index,
        px,
        &probed.iter().map(|p| &p.0).collect::<Vec<_>>(),
        &probed.iter().map(|p| &p.1[..]).collect::<Vec<_>>(),
        &probe,
        tile_range.clone(),
        &mut probe_masks,
        &mut probe_cert,
    );
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
    if pruned_work > DENSE_SWITCH * dense_work {
        return None;
    }
    let (qb, needed): (Vec<QueryBound>, Vec<Vec<bool>>) =
        (0..n_q).into_par_iter().map(bound).unzip();
    let t_bound = clock.elapsed().as_secs_f64();

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
            let sc = screen(
                index,
                px,
                &qs.iter().map(|&q| &qb[q]).collect::<Vec<_>>(),
                &qs.iter().map(|&q| &needed[q][..]).collect::<Vec<_>>(),
                qs,
                tile_range.clone(),
                &mut masks,
                &mut cert,
            );
            let c1 = std::time::Instant::now();
            let mut r = run_group(ds, index, batch, &masks, qs, tile_range.clone(), record);
            r.cert = cert;
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
            part.acc[q * dim..(q + 1) * dim]
                .copy_from_slice(&r.acc[local * dim..(local + 1) * dim]);
            let b = &qb[q];
            part.states[q] = st;
            part.sum_norm[q] = r.sum_norm[local];
            // The certificate in units of exp(final m) (divided by l when normalised).
            part.skipped_mass[q] = (b.cert + r.cert[local]) * (b.m0 - st.max as f64).exp();
            part.tiles_kept[q] = b.needed_tiles as u64;
            part.samples_kept[q] = r.computed[local] as u64;
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
        let prunable = c_dot > 0.0 && c_norm > 0.0 && c_dot.is_finite() && c_norm.is_finite();
        let mut b = QueryBound {
            prunable,
            a: if prunable { 2.0 * c_norm / c_dot } else { 0.0 },
            inv: if prunable {
                c_dot * c_dot / (4.0 * c_norm)
            } else {
                0.0
            },
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
        b.m0 = seed_max(ds, index, &b, xq, &tiles[b.seed_tile]);
        // Tile screening: skip the tiles of smallest bound within the budget.
        let mut w: Vec<(f64, usize)> = tiles
            .iter()
            .zip(&dp2)
            .enumerate()
            .map(|(t, (tile, &dp2))| {
                let lp = (dp2.sqrt() - b.a * tile.radius).max(0.0);
                let gap = (b.a * tile.resid_lo - b.resid)
                    .max(b.resid - b.a * tile.resid_hi)
                    .max(0.0);
                let err = b.err(tile.max_norm, dim);
                let lw = b.ln_weight(lp * lp + gap * gap, tile.max_norm, err);
                ((tile.len as f64).ln() + lw, t)
            })
            .collect();
        let ln_bound: Vec<f64> = w.iter().map(|&(lw, _)| lw).collect();
        w.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut cum = 0.0f64;
        for &(lw, t) in &w {
            let wt = lw.exp();
            if cum + wt > TILE_BUDGET {
                break;
            }
            cum += wt;
            need[t] = false;
        }
        b.cert = cum;
        b.needed_tiles = need.iter().filter(|&&v| v).count();
        let visited: usize = tiles
            .iter()
            .zip(&need)
            .filter(|(_, &v)| v)
            .map(|(t, _)| t.len)
            .sum();
        b.ln_sample_thr = (SAMPLE_BUDGET / visited.max(1) as f64).ln();
        (b, need, ln_bound)
    }
}

/// Whether to print per-call phase timings (ORACLEFLOW_PRUNE_PROFILE=1), for tuning.
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ORACLEFLOW_PRUNE_PROFILE").is_ok_and(|v| v == "1"))
}

/// A lower bound on the largest f32 logit the exact pass will compute over `tile`: the
/// largest logit computed here in f32, minus twice the rounding bound (this evaluation and
/// the exact pass's are each within `err` of the exact value, in any summation order).
fn seed_max(ds: &Dataset, index: &PruneIndex, b: &QueryBound, xq: &[f32], tile: &Tile) -> f64 {
    let norms = ds.sq_norms();
    let mut y = vec![0.0f32; index.dim];
    let mut m = f64::NEG_INFINITY;
    for pos in tile.start..tile.start + tile.len {
        let row = index.perm[pos] as usize;
        ds.stored_row(row, &mut y);
        let dot = dot8(xq, &y) as f64;
        m = m.max(b.c_dot * dot - b.c_norm * norms[row] as f64);
    }
    m - 2.0 * b.err(tile.max_norm, index.dim)
}

struct GroupResult {
    states: Vec<SoftmaxState>,
    acc: Vec<f32>,
    /// per query: sum_j e_j |y_j|^2 on the state's scale (for the posterior variance)
    sum_norm: Vec<f32>,
    /// per-sample skips' bounds, units of exp(m0)
    cert: Vec<f64>,
    computed: Vec<usize>,
    kept: Vec<Vec<u32>>,
    /// screening s, exact s, survivors, screening work (for the profile)
    timing: [f64; 4],
}

/// Exact logits and sparse accumulation for queries `qids` over the samples in `masks`.
fn run_group(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
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
        acc: vec![0.0f32; gq * dim],
        sum_norm: vec![0.0f32; gq],
        cert: vec![0.0; gq],
        computed: vec![0; gq],
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
        for (u, &j) in union.iter().enumerate() {
            ds.stored_row(
                index.perm[pos0 + j] as usize,
                &mut ybuf[u * dim..(u + 1) * dim],
            );
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
                    .for_each(|a| *a *= scale);
            }
            r.computed[l] += nu;
            if record {
                r.kept[l].extend(union.iter().map(|&j| index.perm[pos0 + j]));
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
                .for_each(|(a, t)| *a += t);
        }
    }
    r
}
