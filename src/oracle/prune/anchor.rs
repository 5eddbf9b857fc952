//! Anchored screening: bounds on this call's dot products from an earlier call's, with the
//! noise taken out.
//!
//! **Why the other bounds stop at t ~ 0.5.** A query along a trajectory is
//! x = g eps + z: the initial noise eps, scaled, plus a combination z of posterior means
//! (each sampler step is x' = u x + w x1_hat with scalars u and w, and x1_hat is a
//! weighted mean of rows; the queries are centred, so z is data-like). Projection bounds
//! take x . y <= P x . P y + |R x| |R y| (P the leading principal coordinates, R the rest):
//! the noise puts most of |R x| where no row has any weight, and that product is looser
//! than the logits' gaps until late in the trajectory (see the module docs of `prune`).
//!
//! **The anchor.** One f32 GEMM gives every product c . y of the queries c of some call
//! (the sparse pass's logits GEMM computes them anyway; they are kept, B x N floats). For
//! a later call's query x (same slot), with any scalar gamma and r = x - gamma c:
//!
//!   x . y = gamma (c . y) + P r . P y + R r . R y,   |R r . R y| <= |R r| |R y|,
//!
//! exactly, with P here the first `levels[0]` (16) principal coordinates. gamma is chosen
//! to make |R r| least: both x and c carry the same noise eps, so r is data-like and
//! |R r| is a few units where |R x| is tens. On Fashion-MNIST (numpy, 64 queries of a
//! 50-step Euler trajectory, anchored at t = 0.28) these 16-coordinate bounds let through
//! 0.050 of the pairs at t = 0.4 where 0.032 can reach an f32 result (projection bounds
//! from all 256 coordinates: 0.25), 0.008 at t = 0.5 (0.002; 0.061), 1.0e-3 at t = 0.6
//! (7e-5; 0.0097). The bound holds for any x whatever the anchor: an unrelated one only
//! makes it loose (the pass then finds it stale, see `CpuBackend`).
//!
//! **Rounding.** The stored products are f32 GEMM results, within
//! D 2^-24 / (1 - D 2^-24) |c| |y| of the exact ones (any summation order); the head's
//! products, the projections and the f32 evaluation of the bound are covered, as in the
//! other bounds, by `LB_MARGIN` times the size of the terms: the bound on x . y is widened
//! by e = `LB_MARGIN` (|x| + 2 |gamma c|) |y|max plus the products' rounding, and the
//! logit bounds by 2 err (the f32 logit's rounding, and again for the f32 evaluation).
//!
//! **Per call.** Per query O(D k) for gamma and r's projection; per pair one f32 product
//! from memory, 16 multiply-adds and the bound; the pairs that reach the cut get their f32
//! logit as in the other screened passes (`sparse::screened_exact`).
//!
//! **Whole tiles.** The same identity in distance form, |x - a y|^2 = |x|^2 - |r|^2 -
//! 2 a gamma c . y + |r - a y|^2, bounds a whole index tile with gamma times its largest
//! stored product ([`Anchor::tile_extremes`], once per anchor) and the ball bound on
//! |r - a y|: the projected pass rules out most (query, tile) pairs before any pair's
//! bound (`Projection::tile_ubs`), where the same bound in the queries' own coordinates
//! is as loose as the noise.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use super::{dot_wide, env_number, logit_geometry, project, sum_sq, PruneIndex, LB_MARGIN};
use crate::oracle::simd::multiversion;
use crate::oracle::CentredBatch;

/// Most bytes of stored products, over all anchors, unless
/// ORACLEFLOW_PRUNE_ANCHOR_MIB sets it: B = 256 queries of N = 1M rows take 1 GiB.
const ANCHOR_BYTES: usize = 1 << 30;
/// Anchors kept at once (a guided sampler alternates between two row ranges).
const MAX_ANCHORS: usize = 2;
/// Positions per block of the stored products (see [`Layout`]).
const PANEL: usize = 64;

/// An anchor serves a call where it cuts the squared tail of most queries (past the first
/// level) to at most this share of their own. On Fashion-MNIST (B = 256, 2 Zen 3 cores,
/// `ORACLEFLOW_PRUNE_QUICK`, two interleaved pairs) at 0.9 the anchor served to t = 0.98
/// and the pruned stage from t = 0.6 took 0.77 and 0.82 s, against 0.87 and 0.88 s at 0.5
/// (stale from t = 0.84 on, where the tile bounds in the queries' own coordinates left
/// 11 - 27% of the (query, tile) pairs). Unrelated batches of 256 queries at t = 0.35 -
/// 0.9, one after the other on one oracle, took the same time at 0.5 and 0.9.
const USEFUL_TAIL: f64 = 0.9;

/// Largest estimated kept share (`sparse::kept_share`) at which an anchored call runs the
/// projected pass's sweep (above it the sparse pass, screened by the anchor);
/// ORACLEFLOW_PRUNE_ANCHOR_PROJ_MAX_SHARE overrides it (read per call). With the anchored
/// tile bounds, on Fashion-MNIST (B = 256, 2 Zen 3 cores, per call sparse / projected):
/// share 0.06 0.15 / 0.21 s, 0.042 0.135 / 0.15, 0.030 0.13 / 0.11, 0.020 0.13 / 0.087,
/// 0.014 0.13 / 0.073.
pub const PROJECTED_MAX_SHARE: f64 = 0.035;

/// Largest estimated kept share at which an anchored projected pass first bounds whole
/// tiles, with the anchor (`Projection::tile_ubs`); ORACLEFLOW_PRUNE_ANCHOR_TILES_MAX_SHARE
/// overrides it. Every anchored projected call: on Fashion-MNIST (B = 256, 2 Zen 3 cores,
/// `ORACLEFLOW_PRUNE_QUICK`) the 48 projected calls' sweeps took 0.86 s with them, 1.35 s
/// with them from a share of 1e-3 only, 1.67 s with the bounds in the queries' own
/// coordinates from 1e-3 (the noise left 12 - 57% of the (query, tile) pairs to sweep).
pub const TILE_BOUNDS_MAX_SHARE: f64 = 1.0;

/// [`TILE_BOUNDS_MAX_SHARE`] or its override.
pub fn tile_bounds_max_share() -> f64 {
    env_number("ORACLEFLOW_PRUNE_ANCHOR_TILES_MAX_SHARE").unwrap_or(TILE_BOUNDS_MAX_SHARE)
}

/// [`PROJECTED_MAX_SHARE`] or its override.
pub fn projected_max_share() -> f64 {
    env_number("ORACLEFLOW_PRUNE_ANCHOR_PROJ_MAX_SHARE").unwrap_or(PROJECTED_MAX_SHARE)
}

/// Whether anchored screening is on (ORACLEFLOW_PRUNE_ANCHOR=0 turns it off, for
/// comparisons).
pub fn enabled() -> bool {
    !std::env::var("ORACLEFLOW_PRUNE_ANCHOR").is_ok_and(|v| v == "0")
}

/// `ANCHOR_BYTES` or ORACLEFLOW_PRUNE_ANCHOR_MIB, and at most a quarter of the available
/// memory (as the index's tile-ordered copy of the rows).
fn budget_bytes() -> usize {
    let set = env_number::<usize>("ORACLEFLOW_PRUNE_ANCHOR_MIB").map_or(ANCHOR_BYTES, |m| m << 20);
    match crate::dataset::limits::available_memory() {
        Some(a) => set.min((a / 4).try_into().unwrap_or(usize::MAX)),
        None => set,
    }
}

/// Whether an anchor of `n_q` queries over `n_pos` positions fits the memory budget.
pub fn fits(n_q: usize, n_pos: usize) -> bool {
    n_q.checked_mul(n_pos + 2 * PANEL)
        .and_then(|v| v.checked_mul(4))
        .is_some_and(|b| b <= budget_bytes())
}

/// The queries of one call and their products with every row of its positions.
pub struct Anchor {
    /// the index positions the products cover
    positions: Range<usize>,
    n_q: usize,
    dim: usize,
    /// n_q x D, the queries (centred, as the call got them)
    x: Vec<f32>,
    /// n_q x k, their projections, and per query its residual norm |R c|
    proj: Vec<f32>,
    resid: Vec<f32>,
    /// per query |c|
    norm: Vec<f64>,
    /// c_q . y_p in f32 (the GEMM's own results), laid out by [`Layout`]
    products: Vec<f32>,
    /// set when a call's bounds let through far more pairs than it kept
    stale: AtomicBool,
    /// per query, the position of its largest f32 logit in the last call that used the
    /// anchor (u32::MAX: none yet): that row's logit seeds the next call's lower bound
    best: Vec<AtomicU32>,
    /// per index tile and query (tile-major), the least and largest stored product over
    /// the tile's rows (built at the first anchored tile bounds, see
    /// [`Anchor::tile_extremes`])
    extremes: OnceLock<Vec<[f32; 2]>>,
    /// the kept-share estimate of the last call the anchor served with the projected
    /// pass, and that call's alpha per query (see [`Anchor::remembered_share`])
    share: Mutex<Option<(f64, Vec<f64>)>>,
}

impl Anchor {
    /// An anchor from `batch`'s queries and their f32 products with the rows at
    /// `positions` (laid out by [`Layout`]).
    pub(super) fn new(
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        positions: Range<usize>,
        products: Vec<f32>,
    ) -> Anchor {
        let dim = index.dim;
        let n_q = batch.logit_coefs.len();
        debug_assert_eq!(products.len(), Layout::new(&positions, n_q).len());
        let (proj, resid) = project_queries(index, batch.x);
        let norm = batch
            .x
            .chunks_exact(dim)
            .map(|x| x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
            .collect();
        Anchor {
            positions,
            n_q,
            dim,
            x: batch.x.to_vec(),
            proj,
            resid,
            norm,
            products,
            stale: AtomicBool::new(false),
            best: (0..n_q).map(|_| AtomicU32::new(u32::MAX)).collect(),
            extremes: OnceLock::new(),
            share: Mutex::new(None),
        }
    }

    /// The kept-share estimate (`sparse::kept_share`) this call may take instead of its
    /// own: that of the last call the anchor served with the projected pass, where no
    /// query's alpha is below what it was then. Along a trajectory the posterior only
    /// concentrates as t (alpha) grows, so the old estimate errs high, and it chose the
    /// pass this call would. Only the choice of pass takes the estimate (every pass is
    /// exact); the estimate's sample cost 0.7 - 1 ms of a 6 - 8 ms late call on
    /// Fashion-MNIST (B = 256, 2 Zen 5 cores): reading its 12.8 MB of rows.
    pub fn remembered_share(&self, batch: &CentredBatch<'_>) -> Option<f64> {
        let guard = self.share.lock().ok()?;
        let (share, alphas) = guard.as_ref()?;
        let later = batch.logit_coefs.len() == alphas.len()
            && batch.logit_coefs.iter().zip(alphas).all(|(c, &was)| {
                logit_geometry(c.map(|v| v as f64)).is_some_and(|(a, _)| a >= was)
            });
        later.then_some(*share)
    }

    /// Records `share` as the estimate of this call (`batch`), which the anchor served
    /// with the projected pass.
    pub fn remember_share(&self, share: f64, batch: &CentredBatch<'_>) {
        let alphas: Option<Vec<f64>> = batch
            .logit_coefs
            .iter()
            .map(|c| logit_geometry(c.map(|v| v as f64)).map(|(a, _)| a))
            .collect();
        if let Ok(mut s) = self.share.lock() {
            *s = alphas.map(|a| (share, a));
        }
    }

    /// Per index tile and query (T x n_q, tile-major), the least and largest stored
    /// product c_q . y over the tile's rows: what the anchored tile bounds take for
    /// gamma c . y (`Projection::tile_ubs`). Tiles outside the anchor's positions get
    /// [inf, -inf] (no call the anchor serves reaches them). One pass over the products,
    /// once per anchor.
    pub(super) fn tile_extremes(&self, index: &PruneIndex) -> &[[f32; 2]] {
        self.extremes.get_or_init(|| {
            let n_q = self.n_q;
            let layout = Layout::new(&self.positions, n_q);
            let mut ext = vec![[f32::INFINITY, f32::NEG_INFINITY]; index.tiles.len() * n_q];
            ext.par_chunks_mut(n_q)
                .zip(&index.tiles)
                .for_each(|(row, t)| {
                    let (start, end) = (t.start, t.start + t.len);
                    if start < self.positions.start || end > self.positions.end {
                        return;
                    }
                    for (q, e) in row.iter_mut().enumerate() {
                        for (at, run) in layout.runs(q, start..end) {
                            for &v in &self.products[at..at + run.len()] {
                                e[0] = e[0].min(v);
                                e[1] = e[1].max(v);
                            }
                        }
                    }
                });
            ext
        })
    }

    /// Whether this anchor serves a call of `n_q` queries over `positions`.
    pub fn serves(&self, positions: &Range<usize>, n_q: usize) -> bool {
        self.n_q == n_q
            && self.positions.start <= positions.start
            && positions.end <= self.positions.end
    }

    /// Query q's best position in the last call that used the anchor, if any.
    pub(super) fn best(&self, q: usize) -> Option<usize> {
        let p = self.best.get(q)?.load(Relaxed);
        (p != u32::MAX).then_some(p as usize)
    }

    /// Records query q's best position in this call.
    pub(super) fn set_best(&self, q: usize, position: usize) {
        if let Some(b) = self.best.get(q) {
            b.store(position as u32, Relaxed);
        }
    }

    /// Whether the anchor was marked stale (by this call's first pass, say).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Relaxed)
    }

    /// Marks this anchor stale: later calls find none (and the next sparse call of f32
    /// logits records a fresh one).
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Relaxed);
    }

    /// out[i] += g c_q . y_(p0 + i): query q's stored products from position `p0`, scaled.
    pub(super) fn add_scaled(&self, q: usize, p0: usize, g: f32, out: &mut [f32]) {
        let layout = Layout::new(&self.positions, self.n_q);
        for (at, run) in layout.runs(q, p0..p0 + out.len()) {
            let src = &self.products[at..at + run.len()];
            scaled_add(&mut out[run], src, g);
        }
    }

    /// Asks the CPU to bring query q's stored products over positions `p0..p0 + len` into
    /// cache (what [`Self::add_scaled`] will read): issued for all of a tile's queries
    /// before their head products, the memory latencies overlap with that work instead
    /// of following one another.
    pub(super) fn prefetch(&self, q: usize, p0: usize, len: usize) {
        let layout = Layout::new(&self.positions, self.n_q);
        for (at, run) in layout.runs(q, p0..p0 + len) {
            super::screen::prefetch(&self.products[at..at + run.len()]);
        }
    }

    /// Per query of `batch`: gamma, r = x - gamma c and r's projections (see
    /// [`Residuals`]). Of the queries' own projection only the first level's coordinates
    /// are taken (gamma needs P x . P c there, the staleness test |R x| past them): a
    /// GEMM 16 wide instead of `k`, where r's projection is the call's one full projection.
    pub(super) fn residuals(&self, index: &PruneIndex, batch: &CentredBatch<'_>) -> Residuals {
        let (dim, k) = (self.dim, index.k);
        let l0 = index.levels[0];
        let n_q = self.n_q;
        // n_q x l0, and |x - P_l0 x| per query.
        let (px, rx) = project_queries_to(index, batch.x, l0);
        // gamma per query: the least |R (x - gamma c)|, from R x . R c = x . c - P x . P c.
        // Per query on every thread (one at a time, its two f64 sums over D took about
        // 0.3 ms of a 5 ms late call on Fashion-MNIST at B = 256: most threads waited).
        let mut r = vec![0.0f32; n_q * dim];
        let per_q: Vec<(f32, f64, f64)> = r
            .par_chunks_mut(dim)
            .enumerate()
            .map(|(q, rq)| {
                let (x, c) = (
                    &batch.x[q * dim..(q + 1) * dim],
                    &self.x[q * dim..(q + 1) * dim],
                );
                let (pxq, pcq) = (&px[q * l0..(q + 1) * l0], &self.proj[q * k..(q + 1) * k]);
                let xc = dot_wide(x, c);
                let head: f64 = pxq[..l0]
                    .iter()
                    .zip(&pcq[..l0])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let cc = tail_sq(pcq, self.resid[q], l0);
                let g = if cc > 0.0 { (xc - head) / cc } else { 0.0 };
                let gamma = if g.is_finite() { g as f32 } else { 0.0 };
                let gq = gamma as f64;
                for ((o, &a), &b) in rq.iter_mut().zip(x).zip(c) {
                    *o = (a as f64 - gq * b as f64) as f32;
                }
                (gamma, gq.abs() * self.norm[q], sum_sq(x).sqrt())
            })
            .collect();
        let gamma: Vec<f32> = per_q.iter().map(|p| p.0).collect();
        let gc: Vec<f64> = per_q.iter().map(|p| p.1).collect();
        let x_norm: Vec<f64> = per_q.iter().map(|p| p.2).collect();
        let (proj, resid) = project_queries(index, &r);
        let u = dim as f64 * f64::powi(2.0, -24);
        // How much the anchor takes off: queries whose squared tail past the first level
        // it cuts to at most `USEFUL_TAIL` of itself (one from another trajectory takes off
        // next to nothing).
        let helped = (0..n_q)
            .filter(|&q| {
                let with = tail_sq(&proj[q * k..(q + 1) * k], resid[q], l0);
                let without = (rx[q] as f64).powi(2);
                with <= USEFUL_TAIL * without
            })
            .count();
        Residuals {
            useful: 2 * helped >= n_q,
            gamma,
            proj,
            resid,
            x_norm,
            gc,
            gamma_d: u / (1.0 - u),
        }
    }

    /// Per query of `batch` the terms of its bounds (see [`Terms`]), with `err` the f32
    /// logits' rounding bounds and `y_max` the rows' largest norm; `None` (and the anchor
    /// marked stale) where it does not serve these queries (see `Residuals::useful`).
    pub(super) fn terms(
        &self,
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        err: &[f64],
        y_max: f64,
    ) -> Option<Terms> {
        let k = index.k;
        let l0 = index.levels[0];
        let n_q = self.n_q;
        let res = self.residuals(index, batch);
        if !res.useful {
            self.mark_stale();
            return None;
        }
        let mut rh = vec![0.0f32; n_q * l0];
        let (mut ca, mut cc) = (vec![0.0f32; n_q], vec![0.0f32; n_q]);
        for q in 0..n_q {
            rh[q * l0..(q + 1) * l0].copy_from_slice(&res.proj[q * k..q * k + l0]);
            let c_dot = (batch.logit_coefs[q][0] as f64).abs();
            let rho = tail_sq(&res.proj[q * k..(q + 1) * k], res.resid[q], l0).sqrt();
            ca[q] = (c_dot * rho * (1.0 + 1e-6)) as f32;
            cc[q] = (c_dot * res.widening(q, y_max) + 2.0 * err[q]) as f32;
        }
        Some(Terms {
            l0,
            gamma: res.gamma,
            rh,
            ca,
            cc,
        })
    }
}

multiversion! {
    /// out[i] += g src[i], vectorized (a bound's term: its rounding is inside the margin).
    fn scaled_add(out: &mut [f32], src: &[f32], g: f32) = scaled_add_body;
}

#[inline(always)]
fn scaled_add_body(out: &mut [f32], src: &[f32], g: f32) {
    for (o, &c) in out.iter_mut().zip(src) {
        *o += g * c;
    }
}

/// |v - P_l v|^2 from v's projection `p` (k coordinates) and residual norm `r`.
fn tail_sq(p: &[f32], r: f32, l: usize) -> f64 {
    p[l..].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() + (r as f64).powi(2)
}

/// Per query of a call against an anchor: gamma, and r = x - gamma c's projections.
pub(super) struct Residuals {
    pub(super) gamma: Vec<f32>,
    /// n_q x k: P r, and |R r| past all k coordinates
    pub(super) proj: Vec<f32>,
    pub(super) resid: Vec<f32>,
    /// |x| and |gamma c|
    x_norm: Vec<f64>,
    gc: Vec<f64>,
    /// D 2^-24 / (1 - D 2^-24): the stored products' relative rounding bound
    gamma_d: f64,
    /// whether the anchor cuts the squared tail of most queries to `USEFUL_TAIL` of itself
    /// or less (else it belongs to another trajectory, or the noise it takes out is small
    /// by now)
    pub(super) useful: bool,
}

impl Residuals {
    /// How far query q's bound on x . y is widened for rounding (module docs): e =
    /// `LB_MARGIN` (|x| + 2 |gamma c|) |y|max, the stored products' rounding
    /// D 2^-24 / (1 - D 2^-24) |gamma c| |y|max, and r's own rounding to f32 (within
    /// 2^-24 (|x| + |gamma c|) in norm, twice that taken).
    pub(super) fn widening(&self, q: usize, y_max: f64) -> f64 {
        LB_MARGIN * (self.x_norm[q] + 2.0 * self.gc[q]) * y_max + self.rounding(q, y_max)
    }

    /// The stored products' and r's rounding alone (see [`Self::widening`]).
    pub(super) fn rounding(&self, q: usize, y_max: f64) -> f64 {
        let (x, gc) = (self.x_norm[q], self.gc[q]);
        self.gamma_d * gc * y_max + f64::powi(2.0, -23) * (x + gc) * y_max
    }

    /// |gamma c| for query q.
    pub(super) fn gamma_c(&self, q: usize) -> f64 {
        self.gc[q]
    }
}

/// Per query of a call, the terms of its anchored bounds on the f32 logits:
/// c_dot (gamma C + P r . P y) - c_norm |y|^2 +- (ca |R y| + cc), with C the anchor's
/// stored product and |R y| the row's tail past `l0` coordinates.
pub(super) struct Terms {
    pub(super) l0: usize,
    pub(super) gamma: Vec<f32>,
    /// n_q x l0: P r
    pub(super) rh: Vec<f32>,
    /// |c_dot| |R r|
    pub(super) ca: Vec<f32>,
    /// |c_dot| e + 2 err
    pub(super) cc: Vec<f32>,
}

/// The projections (n x k) and residual norms of the queries `x` (n x D), in blocks of
/// 32 queries side by side (each row's projection is the same bits in any block).
pub(super) fn project_queries(index: &PruneIndex, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    project_queries_to(index, x, index.k)
}

/// [`project_queries`] onto the first `l` basis directions only (n x l, and the norms of
/// the rest).
fn project_queries_to(index: &PruneIndex, x: &[f32], l: usize) -> (Vec<f32>, Vec<f32>) {
    let dim = index.dim;
    let basis = &index.basis[..l * dim];
    let parts: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(32 * dim)
        .map(|xs| project(xs, xs.len() / dim, dim, basis, l))
        .collect();
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for (a, b) in parts {
        p.extend(a);
        r.extend(b);
    }
    (p, r)
}

/// The anchors a backend keeps from call to call (see the module docs).
#[derive(Default)]
pub struct Anchors {
    list: Vec<Anchor>,
}

impl Anchors {
    /// Forgets every anchor (a new trajectory: its queries share no noise with the old).
    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// The anchor serving a call of `n_q` queries over `positions`, if any and not stale.
    pub fn find(&self, positions: &Range<usize>, n_q: usize) -> Option<&Anchor> {
        self.find_any(positions, n_q)
            .filter(|a| !a.stale.load(Relaxed))
    }

    /// [`Anchors::find`], stale anchors included: their remembered rows still seed the
    /// projected pass's lower bounds (`projected::partial`).
    pub fn find_any(&self, positions: &Range<usize>, n_q: usize) -> Option<&Anchor> {
        self.list.iter().find(|a| a.serves(positions, n_q))
    }

    /// Keeps `anchor`, replacing any for the same queries and positions and dropping the
    /// oldest beyond `MAX_ANCHORS` or the memory budget.
    pub fn insert(&mut self, anchor: Anchor) {
        self.list
            .retain(|a| !(a.n_q == anchor.n_q && a.positions == anchor.positions));
        self.list.push(anchor);
        let bytes = |l: &[Anchor]| l.iter().map(|a| a.products.len() * 4).sum::<usize>();
        while self.list.len() > MAX_ANCHORS
            || (self.list.len() > 1 && bytes(&self.list) > budget_bytes())
        {
            self.list.remove(0);
        }
    }
}

/// Where the products live: by blocks of `PANEL` index positions (aligned to multiples of
/// it), each block all queries' `PANEL` products, query after query. A sweep over a few
/// positions for every query then reads one contiguous run (query-major rows, 240 KB
/// apart at N = 60000, cost a memory latency per query and tile).
pub(super) struct Layout {
    first_block: usize,
    n_q: usize,
    blocks: usize,
}

impl Layout {
    pub(super) fn new(positions: &Range<usize>, n_q: usize) -> Layout {
        let first_block = positions.start / PANEL;
        let blocks = positions.end.div_ceil(PANEL) - first_block;
        Layout {
            first_block,
            n_q,
            blocks: if positions.is_empty() { 0 } else { blocks },
        }
    }

    /// Floats the layout takes.
    pub(super) fn len(&self) -> usize {
        self.blocks * self.n_q * PANEL
    }

    /// Where query q's product with position p is.
    pub(super) fn at(&self, q: usize, p: usize) -> usize {
        (p / PANEL - self.first_block) * self.n_q * PANEL + q * PANEL + p % PANEL
    }

    /// Stores `row`, query q's products from position `p0`, into `out`.
    pub(super) fn store(&self, q: usize, p0: usize, row: &[f32], out: &mut [f32]) {
        for (at, run) in self.runs(q, p0..p0 + row.len()) {
            out[at..at + run.len()].copy_from_slice(&row[run]);
        }
    }

    /// Query q's products over `positions` as runs within one block each: where the run
    /// starts in the products, and its positions relative to positions.start.
    fn runs(
        &self,
        q: usize,
        positions: Range<usize>,
    ) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        let (start, end) = (positions.start, positions.end);
        let mut p = start;
        std::iter::from_fn(move || {
            (p < end).then(|| {
                let stop = ((p / PANEL + 1) * PANEL).min(end);
                let run = (self.at(q, p), p - start..stop - start);
                p = stop;
                run
            })
        })
    }
}
