//! Exact pruning for the CPU backend (DESIGN.md section 6): skip the samples whose weight
//! cannot reach an f32 result, and certify how much weight was skipped.
//!
//! **Index (once per dataset, deterministic).** A k-dimensional PCA basis V (subspace
//! iteration on a seeded subsample's covariance) gives every stored row its projection
//! Py = V y and residual norm |Ry| = |y - V^T V y|. Within each class (so that a
//! class-conditional row range is a union of tiles) a PCA tree, split at the median of the
//! node's principal direction in the projected space, orders the rows into tiles of
//! `LEAF_ROWS / 2 ..= LEAF_ROWS` nearby samples. Each tile keeps its projected centroid c,
//! projected radius r = max |Py - c|, the range [rlo, rhi] of its residual norms and max |y|.
//!
//! **Bounds.** For any y, `|x - a y|^2 = |Px - a Py|^2 + |Rx - a Ry|^2`, which is at least
//! `|Px - a Py|^2 + (|Rx| - a |Ry|)^2` (triangle inequality in each part). Over a tile,
//! `|Px - a Py| >= |Px - a c| - a r` and `||Rx| - a |Ry|| >= dist(|Rx|, a [rlo, rhi])`. The
//! backends' logits are `s = c_dot x.y - c_norm |y|^2 = (|x|^2 - |x - a y|^2) / (2 sigma^2)`
//! (exactly, with `a = 2 c_norm / c_dot` and `1 / (2 sigma^2) = c_dot^2 / (4 c_norm)`), so
//! a lower bound L on `|x - a y|^2` gives the upper bound `(|x|^2 - L) / (2 sigma^2)` on s.
//!
//! **Rounding.** The f32 logits differ from the exact ones by at most
//! err = (D + 4) 2^-24 (c_dot |x| |y|max + c_norm |y|max^2) (the classic dot-product bound
//! plus the products and the stored f32 norm), and the f32 projections behind L by far less
//! than the margin `LB_MARGIN (|x| + a |y|max)^2` taken off L. So every logit the dense
//! f32 pass would compute for a sample of the tile is at most ub + err.
//!
//! **Order and the running max.** Per query, the tile whose projected centroid is nearest
//! is evaluated first, exactly (f64): its largest logit minus err, m0, is a lower bound on
//! the f32 maximum the final result will have (that sample is never skipped, see below),
//! so every later decision can use m0 as the running max without any rescaling.
//!
//! **Skipping, and why it cannot change an f32 result.** Weights are measured in units of
//! exp(m0), in which the final normaliser l is >= 1. Tiles are skipped whole, smallest
//! bound first, while the sum of their bounds n_tile exp(ub + err - m0) stays within
//! 2^-31; then, inside the visited tiles, single samples whose bound exp(ub_i + err - m0)
//! is below 2^-31 / (samples in visited tiles) are skipped. Everything skipped therefore
//! weighs at most 2^-30 of l in total: the normaliser moves by a relative 2^-30, and
//! x1_hat = acc / l by at most 2^-30 max|y - x1_hat|, both 64 times under f32's relative
//! rounding 2^-24 (dense accumulation itself commits errors of that size at every add).
//! The sum of the skipped bounds, rescaled to the final (m, l), is each query's certificate
//! (`QueryStats::skipped_mass_bound`).
//!
//! **Sparse accumulation.** A visited tile's logits are computed only for the union over
//! the query group of the samples that survived, with one gather and one small GEMM; the
//! weighted sum then takes only the columns whose weight is non-zero for some query.
//!
//! **Grouping.** Queries are ordered by their nearest tile (tree order) and cut into
//! groups of at most `EXACT_GROUP`, one rayon task each, so that a group's union of
//! survivors stays close to each query's own.
//!
//! **Fallback.** Once per dataset: when the projection leaves more than
//! `MAX_RESIDUAL_SHARE` of the variance (isotropic data such as `gaussian:60000,784`), no
//! index is built and every call is dense, having spent only the basis. Per call: the
//! per-sample bounds of `PROBE_QUERIES` spread-out queries are evaluated
//! first; when they leave more than `DENSE_SWITCH` of the (query, sample) pairs (early t,
//! unstructured data, alpha = 0), [`posterior`] returns `None` and the caller runs the plain
//! dense pass. That test costs O(B (T k + D k)) plus the probe's screening, about 1-3% of a
//! dense evaluation.
//!
//! **Limits (measured on Fashion-MNIST).** The residual term loses about
//! `2 a |Rx| |Ry| / (2 sigma^2)` nats against the truth, since the noise in x is nearly
//! orthogonal to every Ry; in the middle of the trajectory (t = 0.3-0.6) that exceeds the
//! logit gaps, so the bounds keep most samples and the dense pass runs.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::oracle::cpu::{sgemm, stored_rows_f32, Gemm};
use crate::oracle::partial::Partial;
use crate::oracle::{CentredBatch, Posterior, SoftmaxState};

/// Dimensions of the projection behind the per-sample bounds.
pub const PROJ_DIMS: usize = 64;
/// Most rows per tile (tiles hold between half this and this).
pub const LEAF_ROWS: usize = 64;
// Survivors of a (query, tile) are one u64 bit mask.
const _: () = assert!(LEAF_ROWS <= 64);
/// Fewest rows in a range for which pruning is tried.
pub const MIN_PRUNE_ROWS: usize = 2 * LEAF_ROWS;
/// Share of (query, sample) pairs left by the bounds above which dense is cheaper.
pub const DENSE_SWITCH: f64 = 0.1;
/// Queries whose per-sample bounds decide the fallback.
const PROBE_QUERIES: usize = 8;
/// Most queries sharing one gathered union of survivors (more inflate the union).
const EXACT_GROUP: usize = 32;
/// Largest share of the variance left outside the projection for which an index is built.
/// The residual term of the bounds loses about 2 a |Rx| |Ry| / (2 sigma^2) nats, so with most
/// of the variance outside the projection they prune nothing before t is close to 1.
pub const MAX_RESIDUAL_SHARE: f64 = 0.5;
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
    /// |Py|^2, tile order
    proj_sq: Vec<f64>,
    /// |Ry|, tile order
    resid: Vec<f32>,
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
            let leaves = split(&mut ids, &proj_rows, k);
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

        let mut proj = Vec::with_capacity(n * k);
        let mut proj_sq = Vec::with_capacity(n);
        let mut resid = Vec::with_capacity(n);
        for &row in &perm {
            let p = &proj_rows[row as usize * k..(row as usize + 1) * k];
            proj.extend_from_slice(p);
            proj_sq.push(p.iter().map(|&v| (v as f64).powi(2)).sum());
            resid.push(resid_rows[row as usize]);
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
            proj_sq,
            resid,
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

/// k orthonormal directions of largest variance (approximately: any orthonormal basis
/// keeps the bounds valid, a better one only makes them tighter). k = D gives the identity.
/// Also returns the share of the (subsample's) variance the basis leaves in the residual.
fn pca_basis(ds: &Dataset) -> (Vec<f32>, f64) {
    let (n, dim) = (ds.n_samples(), ds.dim());
    let k = PROJ_DIMS.min(dim);
    if k == dim {
        let mut id = vec![0.0f32; dim * dim];
        (0..dim).for_each(|i| id[i * dim + i] = 1.0);
        return (id, 0.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let m = BASIS_SAMPLE.min(n);
    let mut rows: Vec<usize> = if m == n {
        (0..n).collect()
    } else {
        rand::seq::index::sample(&mut rng, n, m).into_vec()
    };
    rows.sort_unstable();
    let mut s = vec![0.0f32; m * dim];
    for (i, &r) in rows.iter().enumerate() {
        ds.stored_row(r, &mut s[i * dim..(i + 1) * dim]);
    }
    // C = S^T S (dim x dim); the stored rows are already centred.
    let mut c = vec![0.0f32; dim * dim];
    sgemm(
        Gemm {
            m: dim,
            n: dim,
            k: m,
        },
        &mut c,
        false,
        (&s, 1, dim),
        (&s, dim, 1),
    );
    let mut v: Vec<f64> = (0..k * dim)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    orthonormalise(&mut v, dim, &mut rng);
    let mut v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let mut w = vec![0.0f32; dim * k];
    for _ in 0..BASIS_ITERS {
        // W = C V^T (dim x k); element (d, j) of the rhs is v32[j * dim + d].
        sgemm(
            Gemm {
                m: dim,
                n: k,
                k: dim,
            },
            &mut w,
            false,
            (&c, dim, 1),
            (&v32, 1, dim),
        );
        for j in 0..k {
            for d in 0..dim {
                v[j * dim + d] = w[d * k + j] as f64;
            }
        }
        orthonormalise(&mut v, dim, &mut rng);
        v32 = v.iter().map(|&x| x as f32).collect();
    }
    // Captured variance: sum_j v_j^T C v_j, against trace(C).
    sgemm(
        Gemm {
            m: dim,
            n: k,
            k: dim,
        },
        &mut w,
        false,
        (&c, dim, 1),
        (&v32, 1, dim),
    );
    let captured: f64 = (0..k)
        .map(|j| {
            (0..dim)
                .map(|d| v[j * dim + d] * w[d * k + j] as f64)
                .sum::<f64>()
        })
        .sum();
    let trace: f64 = (0..dim).map(|d| c[d * dim + d] as f64).sum();
    let residual = if trace > 0.0 {
        (1.0 - captured / trace).max(0.0)
    } else {
        0.0
    };
    (v32, residual)
}

/// Modified Gram-Schmidt (twice, for f64 orthogonality) on the rows of `v` (k x dim);
/// a row that collapses (rank-deficient data) is replaced by a fresh random one.
fn orthonormalise(v: &mut [f64], dim: usize, rng: &mut ChaCha8Rng) {
    let k = v.len() / dim;
    for j in 0..k {
        for attempt in 0..4 {
            for _ in 0..2 {
                for i in 0..j {
                    let (head, tail) = v.split_at_mut(j * dim);
                    let (vi, vj) = (&head[i * dim..(i + 1) * dim], &mut tail[..dim]);
                    let dot: f64 = vi.iter().zip(vj.iter()).map(|(a, b)| a * b).sum();
                    vj.iter_mut().zip(vi).for_each(|(b, a)| *b -= dot * a);
                }
            }
            let vj = &mut v[j * dim..(j + 1) * dim];
            let norm = vj.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-8 || attempt == 3 {
                vj.iter_mut().for_each(|x| *x /= norm.max(1e-300));
                break;
            }
            vj.iter_mut()
                .for_each(|x| *x = rng.sample::<f64, _>(StandardNormal));
        }
    }
}

/// PCA-tree split of `ids` (stored rows) in place; returns the leaf sizes in order.
fn split(ids: &mut [u32], proj: &[f32], k: usize) -> Vec<usize> {
    let n = ids.len();
    if n <= LEAF_ROWS {
        return vec![n];
    }
    let row = |i: u32| &proj[i as usize * k..(i as usize + 1) * k];
    let mut mean = vec![0.0f64; k];
    for &i in ids.iter() {
        mean.iter_mut()
            .zip(row(i))
            .for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centred = |i: u32| row(i).iter().zip(&mean).map(|(&v, m)| v as f64 - m);
    // Power iteration for the node's principal direction, from its farthest point.
    let far = *ids
        .iter()
        .max_by(|&&a, &&b| {
            let (da, db) = (
                centred(a).map(|x| x * x).sum::<f64>(),
                centred(b).map(|x| x * x).sum::<f64>(),
            );
            da.total_cmp(&db).then(b.cmp(&a))
        })
        .expect("non-empty");
    let mut dir: Vec<f64> = centred(far).collect();
    for _ in 0..4 {
        let mut w = vec![0.0f64; k];
        for &i in ids.iter() {
            let s: f64 = centred(i).zip(&dir).map(|(a, b)| a * b).sum();
            w.iter_mut().zip(centred(i)).for_each(|(w, a)| *w += s * a);
        }
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            break;
        }
        dir = w.into_iter().map(|x| x / norm).collect();
    }
    let mut keyed: Vec<(f64, u32)> = ids
        .iter()
        .map(|&i| (centred(i).zip(&dir).map(|(a, b)| a * b).sum(), i))
        .collect();
    let mid = n / 2;
    keyed.select_nth_unstable_by(mid, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    // Within each half, keep the rows ascending (only membership matters).
    let (lo, hi) = keyed.split_at_mut(mid);
    lo.sort_unstable_by_key(|e| e.1);
    hi.sort_unstable_by_key(|e| e.1);
    for (slot, e) in ids.iter_mut().zip(&keyed) {
        *slot = e.1;
    }
    let (l, r) = ids.split_at_mut(mid);
    let (mut a, b) = if n > 8192 {
        rayon::join(|| split(l, proj, k), || split(r, proj, k))
    } else {
        (split(l, proj, k), split(r, proj, k))
    };
    a.extend(b);
    a
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
    let k = index.k;
    let n_q = batch.logit_coefs.len();
    let tile_range = index.tiles_for(&batch.rows)?;
    let n_rows = batch.rows.len();
    if n_rows < MIN_PRUNE_ROWS {
        return None;
    }
    let tiles = &index.tiles[tile_range.clone()];
    let x = batch.x;

    // Query projections and residual norms.
    let (px, rx) = project(x, n_q, dim, &index.basis, k);
    // Projected query . tile centroid, all pairs (n_q x T): one GEMM. Its f32 rounding,
    // and that of the expanded distance below, is far inside LB_MARGIN.
    let n_tiles = tiles.len();
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
    // Per query: the quantities behind its bounds, its seed, and the tiles it needs.
    let bound = |q: usize| -> (QueryBound, Vec<bool>) {
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
            m0: f64::NEG_INFINITY,
            seed_tile: 0,
            ln_sample_thr: f64::NEG_INFINITY,
            cert: 0.0,
            needed_tiles: tiles.len(),
        };
        let mut need = vec![true; tiles.len()];
        if !prunable {
            return (b, need);
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
        (b, need)
    };

    // Fallback test first, on a few spread-out queries: when their per-sample bounds leave
    // more than DENSE_SWITCH of their pairs, the dense pass is cheaper (and little was spent).
    let probe: Vec<usize> = (0..n_q).step_by((n_q / PROBE_QUERIES).max(1)).collect();
    let probed: Vec<(QueryBound, Vec<bool>)> = probe.par_iter().map(|&q| bound(q)).collect();
    let mut probe_masks = vec![0u64; probe.len() * tiles.len()];
    let mut probe_cert = vec![0.0f64; probe.len()];
    let survivors = screen(
        index,
        &px,
        &probed.iter().map(|p| &p.0).collect::<Vec<_>>(),
        &probed.iter().map(|p| &p.1[..]).collect::<Vec<_>>(),
        &probe,
        tile_range.clone(),
        &mut probe_masks,
        &mut probe_cert,
    );
    if survivors as f64 > DENSE_SWITCH * (probe.len() * n_rows) as f64 {
        return None;
    }
    let (qb, needed): (Vec<QueryBound>, Vec<Vec<bool>>) =
        (0..n_q).into_par_iter().map(bound).unzip();

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
            screen(
                index,
                &px,
                &qs.iter().map(|&q| &qb[q]).collect::<Vec<_>>(),
                &qs.iter().map(|&q| &needed[q][..]).collect::<Vec<_>>(),
                qs,
                tile_range.clone(),
                &mut masks,
                &mut cert,
            );
            let mut r = run_group(ds, index, batch, &masks, qs, tile_range.clone(), record);
            r.cert = cert;
            r
        })
        .collect();

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

/// Exact (f64) largest logit over `tile`, minus its rounding bound.
fn seed_max(ds: &Dataset, index: &PruneIndex, b: &QueryBound, xq: &[f32], tile: &Tile) -> f64 {
    let norms = ds.sq_norms();
    let mut y = vec![0.0f32; index.dim];
    let mut m = f64::NEG_INFINITY;
    for pos in tile.start..tile.start + tile.len {
        let row = index.perm[pos] as usize;
        ds.stored_row(row, &mut y);
        let dot: f64 = xq.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        m = m.max(b.c_dot * dot - b.c_norm * norms[row] as f64);
    }
    m - b.err(tile.max_norm, index.dim)
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
}

/// Per-sample bounds for queries `qids` (with their bounds `qb` and needed tiles `needed`,
/// in the same order) over their needed tiles: bit j of
/// `masks[i * T + t]` is set when sample j of tile t must be computed for query qids[i];
/// the skipped samples' bounds go to `cert` (units of exp(m0)). Returns the set bits.
#[allow(clippy::too_many_arguments)]
fn screen(
    index: &PruneIndex,
    px: &[f32],
    qb: &[&QueryBound],
    needed: &[&[bool]],
    qids: &[usize],
    tile_range: Range<usize>,
    masks: &mut [u64],
    cert: &mut [f64],
) -> usize {
    let (dim, k) = (index.dim, index.k);
    let n_t = tile_range.len();
    let mut qlist: Vec<usize> = Vec::with_capacity(qids.len());
    let mut pxs = vec![0.0f32; qids.len() * k];
    let mut dots = vec![0.0f32; qids.len() * LEAF_ROWS];
    let mut count = 0usize;
    for (t, tile) in index.tiles[tile_range].iter().enumerate() {
        qlist.clear();
        qlist.extend((0..qids.len()).filter(|&i| needed[i][t]));
        if qlist.is_empty() {
            continue;
        }
        let (nt, pos0, nq) = (tile.len, tile.start, qlist.len());
        for (i, &l) in qlist.iter().enumerate() {
            let q = qids[l];
            pxs[i * k..(i + 1) * k].copy_from_slice(&px[q * k..(q + 1) * k]);
        }
        // Projected dot products of the needing queries with the tile's rows.
        sgemm(
            Gemm { m: nq, n: nt, k },
            &mut dots[..nq * nt],
            false,
            (&pxs[..nq * k], k, 1),
            (&index.proj[pos0 * k..(pos0 + nt) * k], 1, k),
        );
        for (i, &l) in qlist.iter().enumerate() {
            let b = qb[l];
            let mask = &mut masks[l * n_t + t];
            if !b.prunable {
                *mask = if nt == 64 { u64::MAX } else { (1u64 << nt) - 1 };
                count += nt;
                continue;
            }
            let err = b.err(tile.max_norm, dim);
            // Survival lw > ln_thr, with lw = ln_weight(l2), is l2 < l2_max (solved once
            // per tile); the skipped samples' bound comes from their smallest l2.
            let margin = LB_MARGIN * (b.x_norm + b.a * tile.max_norm).powi(2);
            let lb_max = b.x_sq - (b.ln_sample_thr + b.m0 - err) / b.inv;
            let l2_max = if lb_max > 0.0 {
                lb_max + margin
            } else {
                f64::NEG_INFINITY
            };
            let (mut n_skip, mut l2_min_skipped) = (0usize, f64::INFINITY);
            let mut m = 0u64;
            let (a, a2) = (b.a, b.a * b.a);
            for j in 0..nt {
                let p = pos0 + j;
                let dp2 =
                    (b.px_sq - 2.0 * a * dots[i * nt + j] as f64 + a2 * index.proj_sq[p]).max(0.0);
                let gap = b.resid - a * index.resid[p] as f64;
                let l2 = dp2 + gap * gap;
                if l2 < l2_max {
                    m |= 1 << j;
                } else {
                    n_skip += 1;
                    l2_min_skipped = l2_min_skipped.min(l2);
                }
            }
            if n_skip > 0 {
                let lw = b.ln_weight(l2_min_skipped, tile.max_norm, err);
                cert[l] += n_skip as f64 * lw.exp();
            }
            count += m.count_ones() as usize;
            *mask = m;
        }
    }
    count
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
