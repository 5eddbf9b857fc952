//! Per-sample screening in levels (see the module docs of `prune`): which samples of the
//! needed tiles each query must compute, and the certificate of those it skips.

use std::ops::Range;

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
    screen_impl(inputs, masks, cert, dot8)
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

/// Dot product with AVX2 FMAs ([`dots_avx2`] with one vector).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: this function only runs where the features dots_avx2 needs are.
    let [d] = unsafe { dots_avx2(b, [a]) };
    d
}

/// Dot products of one row with `Q` vectors at once, the row's vectors loaded once for all
/// of them: per product two accumulators of 8 lanes, then the lanes' sum and the last
/// coordinates one by one. The same steps for any `Q`, so that a product is bitwise the
/// same whichever group it is computed in; with `Q` = 4, eight FMA chains are in flight
/// where one product's two wait out the FMA's latency. On Fashion-MNIST (2-core Zen 3
/// EPYC, best of 3 in three interleaved rounds) the int16-screened pass's f32 logits took
/// 0.099 - 0.102 s at t = 0.33 against 0.11 - 0.16 one product at a time, 0.061 - 0.073
/// at t = 0.36 against 0.068 - 0.084. (Four accumulators per product, two products at
/// once, ran 0.11 s at t = 0.33 and moved the f32 logits' rounding enough to flip
/// tests/prune.rs's comparison of the stats with dense, which holds with these sums.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_avx2<const Q: usize>(row: &[f32], xs: [&[f32]; Q]) -> [f32; Q] {
    use std::arch::x86_64::*;
    let n = xs.iter().fold(row.len(), |m, x| m.min(x.len()));
    let pr = row.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut s = [[_mm256_setzero_ps(); 2]; Q];
    let mut i = 0;
    // SAFETY: every load reads 8 floats at i..i + 8 <= n, inside the row and every vector
    // (each at least n long).
    unsafe {
        while i + 16 <= n {
            let (y0, y1) = (_mm256_loadu_ps(pr.add(i)), _mm256_loadu_ps(pr.add(i + 8)));
            for (acc, p) in s.iter_mut().zip(&px) {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), y0, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i + 8)), y1, acc[1]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let y = _mm256_loadu_ps(pr.add(i));
            for (acc, p) in s.iter_mut().zip(&px) {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), y, acc[0]);
            }
            i += 8;
        }
    }
    let mut out = [0.0f32; Q];
    for ((o, a), x) in out.iter_mut().zip(&s).zip(&xs) {
        let mut l = [0.0f32; 8];
        // SAFETY: l holds 8 floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), _mm256_add_ps(a[0], a[1])) };
        let mut v = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
        for j in i..n {
            v += x[j] * row[j];
        }
        *o = v;
    }
    out
}

/// Dot product with AVX-512 FMAs: four accumulators of 16 lanes (one FMA chain would wait
/// out its latency at every step: a 784-long product took about 4 times as long), the last
/// partial vector by a masked load ([`dots_avx512`] with one vector).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: this function only runs where the features dots_avx512 needs are.
    let [d] = unsafe { dots_avx512(b, [a]) };
    d
}

/// Dot products of one row with `Q` vectors at once, the row's vectors loaded once for all
/// of them: per product four accumulators of 16 lanes (one FMA chain would wait out its
/// latency at every step: a 784-long product took about 4 times as long), the last partial
/// vector by a masked load. The same steps and final sum for any `Q`, so that a product
/// is bitwise the same whichever group it is computed in.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn dots_avx512<const Q: usize>(row: &[f32], xs: [&[f32]; Q]) -> [f32; Q] {
    use std::arch::x86_64::*;
    let n = xs.iter().fold(row.len(), |m, x| m.min(x.len()));
    let pr = row.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut s = [[_mm512_setzero_ps(); 4]; Q];
    let mut i = 0;
    // SAFETY: full loads at i..i + 16 <= n, the masked one only the
    // n - i < 16 lanes left, inside the row and every vector (each at least n long).
    unsafe {
        while i + 64 <= n {
            for u in 0..4 {
                let y = _mm512_loadu_ps(pr.add(i + 16 * u));
                for (acc, p) in s.iter_mut().zip(&px) {
                    acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i + 16 * u)), y, acc[u]);
                }
            }
            i += 64;
        }
        let mut u = 0;
        while i + 16 <= n {
            let y = _mm512_loadu_ps(pr.add(i));
            for (acc, p) in s.iter_mut().zip(&px) {
                acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i)), y, acc[u]);
            }
            u += 1;
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u16 << (n - i)) - 1;
            let y = _mm512_maskz_loadu_ps(m, pr.add(i));
            for (acc, p) in s.iter_mut().zip(&px) {
                acc[3] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p.add(i)), y, acc[3]);
            }
        }
        s.map(|a| {
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[0], a[1]),
                _mm512_add_ps(a[2], a[3]),
            ))
        })
    }
}

/// `out[i] = dot(xs[i], row)` for every i, bitwise as [`dot`] one at a time, with the
/// row read once per four vectors (AVX-512 and AVX2). (For the bf16 screening's f32 logits, grouped
/// by row, this measured no faster than a dot product per pair on Fashion-MNIST: reading
/// the rows bounds both. Its callers get a stored row converted once for all its vectors.)
pub(super) fn dots_with_row(row: &[f32], xs: &[&[f32]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        let mut chunks = xs.chunks_exact(4);
        let mut o = out.chunks_exact_mut(4);
        for (x, o) in (&mut chunks).zip(&mut o) {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            o.copy_from_slice(&unsafe { dots_avx512(row, [x[0], x[1], x[2], x[3]]) });
        }
        for (x, o) in chunks.remainder().iter().zip(o.into_remainder()) {
            // SAFETY: as above.
            *o = unsafe { dots_avx512(row, [*x]) }[0];
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let mut chunks = xs.chunks_exact(4);
        let mut o = out.chunks_exact_mut(4);
        for (x, o) in (&mut chunks).zip(&mut o) {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            o.copy_from_slice(&unsafe { dots_avx2(row, [x[0], x[1], x[2], x[3]]) });
        }
        for (x, o) in chunks.remainder().iter().zip(o.into_remainder()) {
            // SAFETY: as above.
            *o = unsafe { dots_avx2(row, [*x]) }[0];
        }
        return;
    }
    for (x, o) in xs.iter().zip(out) {
        *o = dot(x, row);
    }
}

/// Dot product, with AVX-512 or AVX2 FMAs where the CPU has them (else [`dot8`]).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { dot_avx2(a, b) };
    }
    dot8(a, b)
}

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

/// acc += w y, with AVX2 FMAs where the CPU has them.
fn axpy(w: f32, y: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { axpy_avx2(w, y, acc) };
    }
    acc.iter_mut().zip(y).for_each(|(a, &v)| *a += w * v);
}

/// [`axpy`]'s loop compiled for AVX2 + FMA (it vectorises as written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(w: f32, y: &[f32], acc: &mut [f32]) {
    acc.iter_mut()
        .zip(y)
        .for_each(|(a, &v)| *a = w.mul_add(v, *a));
}

/// Dot product with eight running sums (so that it vectorises).
#[inline(always)]
pub(super) fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One row's products with several vectors are bitwise [`dot`]'s (and within f32's
    /// summation bound of f64), at lengths around the vector widths and steps and for
    /// group sizes around the kernels' four.
    #[test]
    fn dots_with_row_are_bitwise_dot() {
        let mut seed = 5u64;
        let mut next = || (2.0 * crate::oracle::prune::tests::lcg(&mut seed) - 1.0) as f32;
        for n in [
            1usize, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 784,
        ] {
            let row: Vec<f32> = (0..n).map(|_| next()).collect();
            let vs: Vec<Vec<f32>> = (0..9)
                .map(|_| (0..n).map(|_| 3.0 * next()).collect())
                .collect();
            for m in 0..=9 {
                let xs: Vec<&[f32]> = vs[..m].iter().map(|v| v.as_slice()).collect();
                let mut out = vec![f32::NAN; m];
                dots_with_row(&row, &xs, &mut out);
                for (x, o) in xs.iter().zip(&out) {
                    assert_eq!(o.to_bits(), dot(x, &row).to_bits(), "n {n} m {m}");
                    // And within f32 summation's bound of the f64 product.
                    let want: f64 = x.iter().zip(&row).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let scale: f64 = x
                        .iter()
                        .zip(&row)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let bound = (n + 2) as f64 * f64::powi(2.0, -24) * scale;
                    assert!((*o as f64 - want).abs() <= bound, "n {n}: {o} vs {want}");
                }
            }
        }
    }
}
