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
//! reaching it their f32 logit, which raises the lower bound. Only those logits are kept,
//! per query, with their positions; a task that computes over `MAX_COMPUTED` of its
//! pairs gives the call up.
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
//! 2 err reaches hundreds of nats, which only lowers the cut).
//!
//! **When.** Where the estimated kept share is small (see `CpuBackend`). Measured on
//! Fashion-MNIST (numpy, bounds against the true maximum): 64 coordinates let through 18%
//! of the pairs at t = 0.6, 3.6% at 0.7 and 0.26% at 0.8; all 256 4.9%, 0.46% and 0.01%.

use std::ops::Range;

use rayon::prelude::*;

use super::screen::{dot, RowSum};
use super::sparse::{count_from, exact_logit, row_blocks, PassInputs, Setup, TILE};
use super::{
    level_norms, logit_geometry, project, row_keys, smallest, PruneIndex, LB_MARGIN, SEED_ROWS,
};
use crate::dataset::Dataset;
use crate::oracle::cpu::{query_groups, sgemm_with, Gemm, GemmLib};
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

/// Tiles whose rows the seeding ranks per query (see [`seed_lower`]). With the nearest
/// tile alone, 43% of the queries of a Fashion-MNIST call (B = 256, t = 0.7 - 0.9) were
/// seeded below their maximum, by 150 - 2000 nats, and every pair before their maximum's
/// tile was refined against that loose cut; with 8, a tenth were. Measured
/// (`ORACLEFLOW_PRUNE_AT`): t = 0.62, 0.7, 0.8, 0.9 in 0.057, 0.036, 0.023, 0.017 s
/// against 0.066, 0.044, 0.027, 0.021 (16 tiles: no faster; 32: slower).
const SEED_TILES: usize = 8;

/// Largest share of a task's pairs whose f32 logits the pass computes before it gives the
/// call up (its memory, 8 bytes a pair, and time then go to another pass). On
/// Fashion-MNIST it computes at most 1.8% (t = 0.64, estimated kept share 1.6e-3).
const MAX_COMPUTED: f64 = 0.1;

/// [`MAX_COMPUTED`], or ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED (read per call; the tests set
/// 0 to make the pass give up and its fallback run).
fn max_computed() -> f64 {
    std::env::var("ORACLEFLOW_PRUNE_PROJ_MAX_COMPUTED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_COMPUTED)
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
    let env = std::env::var("ORACLEFLOW_PRUNE_PROJ_LEVEL").ok();
    if let Some(l) = env.and_then(|v| v.parse().ok()) {
        return l;
    }
    if share > 3.5e-4 {
        1
    } else {
        0
    }
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
struct Projection {
    k: usize,
    /// indices in the index's levels: the pass's (its GEMM) and the last
    levels: [usize; 2],
    /// n_q x k
    px: Vec<f32>,
    queries: Vec<QueryProj>,
}

/// Which of `Projection::levels` a bound is taken at.
#[derive(Clone, Copy)]
enum At {
    Pass = 0,
    Last = 1,
}

impl Projection {
    /// `None` where some query cannot be pruned (alpha = 0, coefficients not finite).
    fn new(
        index: &PruneIndex,
        batch: &CentredBatch<'_>,
        setup: &Setup,
        level: usize,
    ) -> Option<Projection> {
        let (dim, k) = (index.dim, index.k);
        let n_q = batch.logit_coefs.len();
        let last = index.levels.len() - 1;
        let levels = [level.min(last), last];
        // Two halves of the queries on two threads (the GEMMs run single-threaded: at
        // B = 256 this step took 2 ms of a 17 ms evaluation at t = 0.9).
        let half = n_q.div_ceil(2).max(1);
        let parts: Vec<(Vec<f32>, Vec<f32>)> = batch
            .x
            .par_chunks(half * dim)
            .map(|xs| project(xs, xs.len() / dim, dim, &index.basis, k))
            .collect();
        let (mut px, mut rx) = (Vec::with_capacity(n_q * k), Vec::with_capacity(n_q));
        for (p, r) in parts {
            px.extend(p);
            rx.extend(r);
        }
        let (mut sq, mut tail) = (Vec::new(), Vec::new());
        let mut queries = Vec::with_capacity(n_q);
        for q in 0..n_q {
            let (a, inv) = logit_geometry(batch.logit_coefs[q].map(|v| v as f64))?;
            let x = &batch.x[q * dim..(q + 1) * dim];
            let x_sq: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            sq.clear();
            tail.clear();
            level_norms(
                &px[q * k..(q + 1) * k],
                rx[q],
                &index.levels,
                &mut sq,
                &mut tail,
            );
            queries.push(QueryProj {
                a: a as f32,
                a2: (a * a) as f32,
                inv: inv as f32,
                top: (inv * x_sq + setup.err()[q]) as f32,
                margin: (LB_MARGIN * (x_sq.sqrt() + a * setup.y_max()).powi(2)) as f32,
                sq: levels.map(|l| sq[l] as f32),
                tail: levels.map(|l| tail[l] as f32),
            });
        }
        Some(Projection {
            k,
            levels,
            px,
            queries,
        })
    }

    /// Bounds of queries `qs` against the tile at positions `t0..t0 + nt` at the pass's
    /// level: the GEMM of its leading coordinates into `out` (qs.len() x nt), then each
    /// pair's upper bound on its f32 logit in place.
    fn tile_bounds(
        &self,
        index: &PruneIndex,
        qs: &Range<usize>,
        (t0, nt): (usize, usize),
        lib: GemmLib,
        out: &mut [f32],
    ) {
        let (k, n_all) = (self.k, index.perm.len());
        let level = self.levels[At::Pass as usize];
        let cut = index.levels[level];
        // (n_q x cut) * (cut x nt): element (c, j) of the rhs is proj[(t0 + j) k + c].
        sgemm_with(
            lib,
            Gemm {
                m: qs.len(),
                n: nt,
                k: cut,
            },
            out,
            false,
            (&self.px[qs.start * k..qs.end * k], k, 1),
            (&index.proj[t0 * k..(t0 + nt) * k], 1, k),
        );
        let ysq = &index.lvl_sq[level * n_all + t0..][..nt];
        let yt = &index.lvl_tail[level * n_all + t0..][..nt];
        for (row, qp) in out.chunks_exact_mut(nt).zip(&self.queries[qs.clone()]) {
            pass_bounds(qp, row, ysq, yt);
        }
    }
}

multiversion! {
    /// [`bounds`] at the pass's level over one (query, tile) row, vectorized.
    fn pass_bounds(qp: &QueryProj, d: &mut [f32], ysq: &[f32], yt: &[f32]) = pass_bounds_body;
}

#[inline(always)]
fn pass_bounds_body(qp: &QueryProj, d: &mut [f32], ysq: &[f32], yt: &[f32]) {
    bounds(qp, At::Pass, d, ysq, yt)
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
        let dp2 = pos(xs - 2.0 * a * *v + a2 * ys);
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
    /// the query's lower bound on its f32 maximum at the end of the task
    lower: Vec<f64>,
}

/// The projected pass over `inputs.batch.rows` (see [`PassInputs`]), its GEMM's level chosen from the estimated kept `share`; `None` where some
/// query cannot be pruned or a task gives up (over `MAX_COMPUTED` of its pairs computed):
/// then the caller runs another pass. `kept`, if given, receives per query the stored rows
/// accumulated.
pub fn partial(
    inputs: PassInputs<'_>,
    share: f64,
    kept: Option<&mut Vec<Vec<u32>>>,
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
    let proj = Projection::new(index, batch, setup, level(share))?;
    let t_proj = clock.elapsed().as_secs_f64();
    let positions = setup.positions();
    let n_rows = positions.len();
    let thresholds = setup.thresholds();
    let groups = query_groups(n_q, threads);
    let blocks = row_blocks(positions, threads);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..blocks.len()).map(move |b| (g, b)))
        .collect();

    // (1) Per query, a lower bound on its f32 maximum: the largest f32 logit over a few
    // rows of the tile whose projected centroid is nearest (any computed logit is one).
    let lower = seed_lower(ds, index, batch, &proj);
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
        part_kept.push(w.kept);
        // A tile counts as visited where any of its pairs got an f32 logit.
        tiles_kept.push(tiles_touched(index, logits[q].iter().map(|l| l.0)));
        states.push(w.state);
        if record {
            kept_rows.push(w.kept_rows);
        }
    }
    if super::profiling() {
        let all = (n_q * n_rows) as f64;
        eprintln!(
            "prune: projected pass {:.3}s (projection {:.3}s, seeds {:.3}s, sweep {:.3}s) from {} coordinates: {:.5} of pairs computed, {:.5} accumulated",
            clock.elapsed().as_secs_f64(),
            t_proj,
            t_seed,
            t_sweep - t_seed,
            index.levels[proj.levels[0]],
            computed as f64 / all,
            part_kept.iter().sum::<u64>() as f64 / all,
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
) -> Option<TaskOut> {
    let (dim, k, n_all) = (ds.dim(), proj.k, index.perm.len());
    let [pass, last] = proj.levels;
    let refine = pass < last;
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
        lower: Vec::new(),
    };
    let mut bnd = vec![0.0f32; n_q * TILE];
    let mut one = Vec::new();
    let most = (max_computed() * (n_q * block.len()) as f64) as usize;
    let mut computed = 0usize;
    for t0 in block.clone().step_by(TILE) {
        if computed > most {
            return None;
        }
        let nt = TILE.min(block.end - t0);
        let bnd = &mut bnd[..n_q * nt];
        proj.tile_bounds(index, qs, (t0, nt), lib, bnd);
        for (l, row) in bnd.chunks_exact_mut(nt).enumerate() {
            let q = qs.start + l;
            let mut cut = (lower[l] + thresholds[l]) as f32;
            let (reach, below) = count_from(row, cut);
            if reach == 0 {
                // The common case: the whole tile ruled out, by bounds below the cut.
                out.cert[l] += nt as f64 * (below as f64 - lower[l]).exp();
                continue;
            }
            let qp = &proj.queries[q];
            let x = &batch.x[q * dim..(q + 1) * dim];
            let pq = &proj.px[q * k..(q + 1) * k];
            for (j, v) in row.iter_mut().enumerate() {
                if *v < cut {
                    continue;
                }
                let p = t0 + j;
                if refine {
                    let mut d = [dot(pq, &index.proj[p * k..(p + 1) * k])];
                    bounds(qp, At::Last, &mut d, &ysq[p..p + 1], &yt[p..p + 1]);
                    if d[0] < cut {
                        *v = v.min(d[0]);
                        continue;
                    }
                }
                let r = index.perm[p] as usize;
                let s = exact_logit(ds, index, x, batch.logit_coefs[q], p, norms[r], &mut one);
                out.logits[l].push((p as u32, s));
                computed += 1;
                // Marked as computed: not counted as ruled out below.
                *v = f32::INFINITY;
                if s as f64 > lower[l] {
                    // The certificate so far is in units of exp(lower): rescaled.
                    out.cert[l] *= (lower[l] - s as f64).exp();
                    lower[l] = s as f64;
                    cut = (lower[l] + thresholds[l]) as f32;
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
    Some(out)
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
    sgemm_with(
        GemmLib::Gemm,
        Gemm {
            m: n_q,
            n: n_t,
            k: hd,
        },
        &mut pc,
        false,
        (&proj.px, k, 1),
        (centres, 1, k),
    );
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
    for &(p, s) in logits {
        let d = s - m;
        if s < cut {
            dropped += (d as f64).exp();
            continue;
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
