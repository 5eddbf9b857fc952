//! Per-sample screening in levels (see the module docs of `prune`): which samples of the
//! needed tiles each query must compute, and the certificate of those it skips.

use std::ops::Range;

use super::dots::dot;
#[cfg(target_arch = "x86_64")]
use super::dots::{dot_avx2, dot_avx512};
use super::{PruneIndex, QueryBound, LB_MARGIN, LEAF_ROWS};

/// What screening found and cost.
#[derive(Clone, Copy, Default, Debug)]
pub(super) struct ScreenCount {
    /// (query, sample) pairs left for the exact pass
    pub(super) survivors: usize,
    /// multiply-adds of the screening GEMMs plus per-pair bound evaluations (weighted)
    pub(super) work: f64,
}

/// Fewest alive rows of a tile for which a level inside `head_dims` is computed for the
/// whole tile from its dimension-major block rather than row by row.
const WHOLE_TILE_ROWS: usize = 16;

/// Cost of evaluating one pair's bound, in multiply-adds of a GEMM (it is scalar f64 work).
const PAIR_COST: f64 = 8.0;

/// Per-sample bounds for queries `qids` (with their bounds `qb` and needed tiles `needed`,
/// in the same order) over their needed tiles: bit j of
/// `masks[i * T + t]` is set when sample j of tile t must be computed for query qids[i];
/// the skipped samples' bounds go to `cert` (units of exp(m0)).
///
/// Each (query, tile) goes through the levels: at level l the partial dot product over the
/// first `levels[l]` projected coordinates gives |P_l (x - a y)|^2 exactly (up to f32
/// rounding, inside the margin) and the tails give (|x - P_l x| - a |y - P_l y|)^2 as a
/// lower bound on the rest. A sample whose bound reaches the threshold is skipped at that
/// level; the survivors' partial dot products are extended by the next levels' coordinates
/// (one GEMM over the queries and the column span still alive).
/// What [`screen`] reads: the index, the queries' projections `px`, their bounds `qb`
/// and needed tiles `needed` (per query of `qids`), and the tiles to screen.
pub(super) struct ScreenInputs<'a> {
    pub index: &'a PruneIndex,
    pub px: &'a [f32],
    pub qb: &'a [&'a QueryBound],
    pub needed: &'a [&'a [bool]],
    pub qids: &'a [usize],
    pub tile_range: Range<usize>,
}

pub(super) fn screen(
    inputs: &ScreenInputs<'_>,
    masks: &mut [u64],
    cert: &mut [f64],
) -> ScreenCount {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { screen_avx512(inputs, masks, cert) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { screen_avx2(inputs, masks, cert) };
    }
    screen_impl(inputs, masks, cert, dot)
}

/// [`screen_impl`] compiled for an ISA's features (the build targets baseline x86-64),
/// with that ISA's dot product.
macro_rules! screen_for {
    ($name:ident, $features:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            inputs: &ScreenInputs<'_>,
            masks: &mut [u64],
            cert: &mut [f64],
        ) -> ScreenCount {
            // SAFETY (of the calls to the dot product): this function only runs where the
            // features it is compiled for are.
            let dot = |a: &[f32], b: &[f32]| unsafe { $dot(a, b) };
            screen_impl(inputs, masks, cert, dot)
        }
    };
}
screen_for!(screen_avx2, "avx2,fma", dot_avx2);
screen_for!(screen_avx512, "avx512f,avx2,fma", dot_avx512);

/// A weighted sum of rows, sum_j w_j y_j, added row by row: `CHUNK` rows at a time into an
/// f32 sum, each chunk then into the f64 total. The rows summed together (a tile's, a
/// query's kept ones) lie close, so one running f32 sum of them grows with each row and
/// carries the rounding of its largest partial sums (2e-6 relative on duplicate rows,
/// against the dense pass's 1e-7 in stored order). As [`super::accumulate`]'s kernel.
pub(super) struct RowSum {
    chunk: Vec<f32>,
    rows: usize,
}

impl RowSum {
    const CHUNK: usize = 16;

    pub(super) fn new(dim: usize) -> Self {
        RowSum {
            chunk: vec![0.0; dim],
            rows: 0,
        }
    }

    /// total += w y (the chunk's sum goes into `total` every `CHUNK` rows and at `finish`).
    pub(super) fn add(&mut self, w: f32, y: &[f32], total: &mut [f64]) {
        axpy(w, y, &mut self.chunk);
        self.rows += 1;
        if self.rows == Self::CHUNK {
            self.finish(total);
        }
    }

    /// Adds the rows since the last chunk into `total` and starts anew.
    pub(super) fn finish(&mut self, total: &mut [f64]) {
        if self.rows > 0 {
            for (t, c) in total.iter_mut().zip(&mut self.chunk) {
                *t += *c as f64;
                *c = 0.0;
            }
            self.rows = 0;
        }
    }
}

/// Rows asked for ([`prefetch`]) ahead of their turn where kept rows are added one by one
/// (`RowSum`). On Fashion-MNIST (2-core Zen 5, quick bench) the projected pass's weighted
/// sums at t = 0.46 - 0.56 took 8.8 - 1.3 ms a call against 13.7 - 2.0 without; 4 rows
/// ahead were no faster.
pub(super) const ROWS_AHEAD: usize = 2;

/// Asks the CPU to bring `v` into cache, one prefetch per 64-byte line: issued ahead of
/// the work that reads `v` (the next rows of a sum, the anchor's products of a tile), its
/// memory latencies overlap with the work before.
pub(super) fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing and cannot fault, and
        // the address lies in `v` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// acc += w y, with AVX-512 or AVX2 FMAs where the CPU has them (the same bits: each
/// element is one fused multiply-add whatever the vector width).
fn axpy(w: f32, y: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { axpy_avx512(w, y, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { axpy_avx2(w, y, acc) };
    }
    acc.iter_mut().zip(y).for_each(|(a, &v)| *a += w * v);
}

/// [`axpy`]'s loop compiled for AVX2 + FMA (it vectorises as written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(w: f32, y: &[f32], acc: &mut [f32]) {
    axpy_fused(w, y, acc)
}

/// [`axpy`]'s loop compiled for AVX-512 (16 lanes: half the AVX2 loop's steps, which
/// the sparse pass's axpy path spent about 3% of the quick bench's time in on Zen 5).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn axpy_avx512(w: f32, y: &[f32], acc: &mut [f32]) {
    axpy_fused(w, y, acc)
}

#[inline(always)]
fn axpy_fused(w: f32, y: &[f32], acc: &mut [f32]) {
    acc.iter_mut()
        .zip(y)
        .for_each(|(a, &v)| *a = w.mul_add(v, *a));
}

#[inline(always)]
fn screen_impl(
    inputs: &ScreenInputs<'_>,
    masks: &mut [u64],
    cert: &mut [f64],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) -> ScreenCount {
    let ScreenInputs {
        index,
        px,
        qb,
        needed,
        qids,
        ..
    } = *inputs;
    let tile_range = inputs.tile_range.clone();
    let (dim, k) = (index.dim, index.k);
    let levels = &index.levels;
    let n_t = tile_range.len();
    let nq_all = qids.len();
    let mut qlist: Vec<usize> = Vec::with_capacity(nq_all);
    let mut qsel: Vec<usize> = Vec::with_capacity(nq_all);
    let hd = index.head_dims;
    let mut dots = vec![0.0f32; nq_all * LEAF_ROWS];
    let mut tmp = vec![0.0f32; nq_all * LEAF_ROWS];
    let mut alive = vec![0u64; nq_all];
    let mut l2_max = vec![0.0f64; nq_all];
    let mut n_skip = vec![0usize; nq_all];
    let mut l2_skip = vec![0.0f32; nq_all];
    let mut l2buf = [0.0f32; LEAF_ROWS];
    let n_all = index.perm.len();
    let mut count = ScreenCount::default();
    let t0 = tile_range.start;
    for (t, tile) in index.tiles[tile_range].iter().enumerate() {
        qlist.clear();
        let (nt, pos0) = (tile.len, tile.start);
        let full = if nt == 64 { u64::MAX } else { (1u64 << nt) - 1 };
        for (l, need) in needed.iter().enumerate() {
            if !need[t] {
                continue;
            }
            if qb[l].prunable {
                qlist.push(l);
            } else {
                masks[l * n_t + t] = full;
                count.survivors += nt;
            }
        }
        if qlist.is_empty() {
            continue;
        }
        for (i, &l) in qlist.iter().enumerate() {
            let b = qb[l];
            let err = b.err(tile.max_norm, dim);
            // Survival lw > ln_thr, with lw = ln_weight(l2), is l2 < l2_max (solved once
            // per tile); the skipped samples' bound comes from their smallest l2.
            let margin = LB_MARGIN * (b.x_norm + b.a * tile.max_norm).powi(2);
            let lb_max = b.x_sq - (b.ln_sample_thr + b.m0 - err) / b.inv;
            l2_max[i] = if lb_max > 0.0 {
                lb_max + margin
            } else {
                f64::NEG_INFINITY
            };
            alive[i] = full;
            n_skip[i] = 0;
            l2_skip[i] = f32::INFINITY;
        }
        let nq = qlist.len();
        let mut prev = 0;
        for (lv, &cut) in levels.iter().enumerate() {
            // Coordinates prev..cut of each alive (query, row) pair, added to its partial
            // dot product: direct dot products over the alive pairs only (per-tile GEMM
            // calls cost more than the few multiply-adds they would do here).
            let kd = cut - prev;
            let mut any = false;
            for (i, &al) in alive[..nq].iter().enumerate() {
                if al == 0 {
                    continue;
                }
                any = true;
                let q = qids[qlist[i]];
                let xrow = &px[q * k + prev..q * k + cut];
                let trow = &mut tmp[i * LEAF_ROWS..(i + 1) * LEAF_ROWS];
                if cut <= hd && (lv == 0 || al.count_ones() as usize >= WHOLE_TILE_ROWS) {
                    // The whole tile at once, from its dimension-major block: vector FMAs
                    // over 64 rows beat per-row dot products of this length once a
                    // quarter of the rows are alive.
                    let block = &index.proj0t[(t0 + t) * hd * LEAF_ROWS..][..hd * LEAF_ROWS];
                    let mut acc = [0.0f32; LEAF_ROWS];
                    for (d, col) in block[prev * LEAF_ROWS..cut * LEAF_ROWS]
                        .chunks_exact(LEAF_ROWS)
                        .enumerate()
                    {
                        let xd = xrow[d];
                        for (a, &y) in acc.iter_mut().zip(col) {
                            *a += xd * y;
                        }
                    }
                    trow.copy_from_slice(&acc);
                    count.work += (kd * LEAF_ROWS) as f64;
                    continue;
                }
                let mut bits = al;
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let yrow = &index.proj[(pos0 + j) * k + prev..(pos0 + j) * k + cut];
                    trow[j] = dot(xrow, yrow);
                }
                count.work += (kd * al.count_ones() as usize) as f64;
            }
            if !any {
                break;
            }
            qsel.clear();
            qsel.extend((0..nq).filter(|&i| alive[i] != 0));
            for &i in qsel.iter() {
                let b = qb[qlist[i]];
                // f32 from here: the bound's terms are at most (|x| + a |y|)^2 and f32
                // rounding moves them by ~1e-7 of that, against LB_MARGIN = 1e-3 of it.
                let (a, a2) = (b.a as f32, (b.a * b.a) as f32);
                let (xs, xt) = (b.lv_sq[lv] as f32, b.lv_tail[lv] as f32);
                let ysq = &index.lvl_sq[lv * n_all + pos0..lv * n_all + pos0 + nt];
                let yt = &index.lvl_tail[lv * n_all + pos0..lv * n_all + pos0 + nt];
                let lim = l2_max[i] as f32;
                let drow = &mut dots[i * LEAF_ROWS..i * LEAF_ROWS + nt];
                let trow = &tmp[i * LEAF_ROWS..(i + 1) * LEAF_ROWS];
                let old = alive[i];
                let mut m = 0u64;
                if lv == 0 && old == full {
                    // Every column alive: one branch-free pass.
                    for j in 0..nt {
                        let d = trow[j];
                        drow[j] = d;
                        let dp2 = (xs - 2.0 * a * d + a2 * ysq[j]).max(0.0);
                        let g = xt - a * yt[j];
                        l2buf[j] = dp2 + g * g;
                    }
                    for (j, &l2) in l2buf[..nt].iter().enumerate() {
                        m |= ((l2 < lim) as u64) << j;
                    }
                    let mn = l2buf[..nt]
                        .iter()
                        .map(|&v| if v < lim { f32::INFINITY } else { v })
                        .fold(f32::INFINITY, f32::min);
                    l2_skip[i] = l2_skip[i].min(mn);
                    n_skip[i] += nt - m.count_ones() as usize;
                    count.work += PAIR_COST * nt as f64;
                    alive[i] = m;
                    continue;
                } else {
                    let mut bits = old;
                    while bits != 0 {
                        let j = bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let d = drow[j] + trow[j];
                        drow[j] = d;
                        let dp2 = (xs - 2.0 * a * d + a2 * ysq[j]).max(0.0);
                        let g = xt - a * yt[j];
                        let l2 = dp2 + g * g;
                        l2buf[j] = l2;
                        m |= ((l2 < lim) as u64) << j;
                    }
                }
                let mut gone = old & !m;
                n_skip[i] += gone.count_ones() as usize;
                while gone != 0 {
                    let j = gone.trailing_zeros() as usize;
                    gone &= gone - 1;
                    l2_skip[i] = l2_skip[i].min(l2buf[j]);
                }
                count.work += PAIR_COST * old.count_ones() as f64;
                alive[i] = m;
            }
            prev = cut;
        }
        for (i, &l) in qlist.iter().enumerate() {
            let b = qb[l];
            if n_skip[i] > 0 {
                let err = b.err(tile.max_norm, dim);
                let lw = b.ln_weight(l2_skip[i] as f64, tile.max_norm, err);
                cert[l] += n_skip[i] as f64 * lw.exp();
            }
            count.survivors += alive[i].count_ones() as usize;
            masks[l * n_t + t] = alive[i];
        }
    }
    count
}
