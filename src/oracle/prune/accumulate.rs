//! The sparse pass's weighted sum over one tile: acc_q += sum_j w_qj y_j for a block of up
//! to `QUERY_BLOCK` queries, over only the columns (rows of the tile) where some query of
//! the block has a non-zero weight, read where they lie (the index's tile-ordered rows).
//!
//! Why not a GEMM: the union of kept columns must be gathered into a contiguous copy for
//! one (a tile's 256 rows of 3 KB each, per block of queries), and a GEMM's blocking pays
//! only for many queries, whose union is wide: on Fashion-MNIST at t = 0.3 the unions of
//! 32 queries held 45% of the pairs for 24% kept, those of 8 queries 36%. This kernel keeps
//! the sums of a block of `QUERY_BLOCK` queries over 64 coordinates (AVX-512; 16 with
//! AVX2) in registers and streams the union's rows through them (four loads of a row's
//! coordinates, four FMAs per query; two and two with AVX2), without any copy.
//!
//! Order: every sum starts at 0 and adds up to `CHUNK` columns in ascending order, then is
//! added to acc; the result depends only on the weights and rows, never on threads.
//!
//! Rounding: the rows of a tile lie close together, so a running f32 sum over all of them
//! grows with every column and carries the rounding of its largest partial sums (2e-6
//! relative on 256 duplicate rows, where the dense pass's stored order gave 1e-7). Sums of
//! `CHUNK` columns, added to acc, carry about CHUNK / 2 + columns / CHUNK / 2 roundings
//! rather than columns / 2.

use std::ops::Range;

/// Coordinates per strip (the `dims` of [`accumulate`]): at 128, a tile's 256 rows take
/// 128 KB, which stays in L2 while every query block of the tile streams its union's rows
/// through the registers. A whole tile of Fashion-MNIST's rows (800 KB) does not: at t =
/// 0.3 the AVX2 kernel then waited on its row loads from L3 and memory.
/// A multiple of the widest kernel's step (64), so that every coordinate takes the same
/// kernel, and thus the same roundings (FMA or not), as without strips.
pub(super) const STRIP: usize = 128;
const _: () = assert!(STRIP.is_multiple_of(64));
/// Queries per register block: with two vectors of coordinates each (AVX2), 12 independent
/// sums in flight, as many as a GEMM micro-kernel keeps (6 x 2), and AVX2's 16 registers
/// still hold the row's two vectors and a weight (AVX-512's 32 hold four vectors each).
/// With 8 queries and one vector (8 sums, just enough to cover the FMA's latency at two per
/// cycle) the AVX2 kernel ran at 16 - 18 GMAC/s against 20 - 25 for this shape (one thread
/// of a Zen 3 EPYC, a tile's rows in L2, interleaved), and smaller blocks have narrower
/// unions.
pub(super) const QUERY_BLOCK: usize = 6;
/// Columns ahead whose row segment the AVX-512 kernel prefetches.
const PREFETCH: usize = 8;
/// Columns per sum added to acc (see the module docs).
const CHUNK: usize = 16;

/// acc[q] += sum over the columns j of `cols` of w[q][j] rows[j] at the coordinates
/// `dims`, for the queries `qs` (at most `QUERY_BLOCK`). `wt` holds the block's weights
/// as [`pack`] lays them out, `rows` the tile's rows (`dim` each), `acc` each query's sum
/// (q * dim). Every coordinate's sum is the same whatever range it is taken in: the caller
/// cuts the coordinates into strips so that one strip of a tile's rows stays in cache for
/// every query block (see `STRIP`).
pub(super) fn accumulate(
    wt: &[f32],
    rows: &[f32],
    dim: usize,
    dims: Range<usize>,
    qs: &[usize],
    cols: &[usize],
    acc: &mut [f32],
) {
    assert!(dims.end <= dim);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            return unsafe { accumulate_avx512(wt, rows, dim, dims, qs, cols, acc) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { accumulate_avx2(wt, rows, dim, dims, qs, cols, acc) };
        }
    }
    accumulate_tail(wt, rows, dim, dims, qs, cols, acc);
}

/// Appends to `wt` the block's weights of the columns `cols`, column-major, QUERY_BLOCK
/// per column (0 past the block's end): what [`accumulate`] takes.
pub(super) fn pack_into(w: &[f32], nt: usize, qs: &[usize], cols: &[usize], wt: &mut Vec<f32>) {
    assert!(qs.len() <= QUERY_BLOCK);
    let start = wt.len();
    wt.resize(start + cols.len() * QUERY_BLOCK, 0.0);
    let wt = &mut wt[start..];
    for (c, &j) in cols.iter().enumerate() {
        for (i, &q) in qs.iter().enumerate() {
            wt[c * QUERY_BLOCK + i] = w[q * nt + j];
        }
    }
}

/// [`pack_into`] a fresh vector.
#[cfg(test)]
fn pack(w: &[f32], nt: usize, qs: &[usize], cols: &[usize]) -> Vec<f32> {
    let mut wt = Vec::new();
    pack_into(w, nt, qs, cols, &mut wt);
    wt
}

/// What the vector kernels' unchecked loads and stores rely on: every column's weights,
/// every column's row and every query's sum lie inside their slices.
fn check_bounds(wt: &[f32], rows: &[f32], dim: usize, qs: &[usize], cols: &[usize], acc: &[f32]) {
    assert!(wt.len() >= cols.len() * QUERY_BLOCK);
    assert!(cols.iter().all(|&j| (j + 1) * dim <= rows.len()));
    assert!(qs.iter().all(|&q| (q + 1) * dim <= acc.len()));
}

/// The kernel with AVX-512: per 64 coordinates, the block's sums in 24 zmm registers
/// while every column's row streams through (four loads, 24 FMAs); then 32 and 16
/// coordinates where that many are left; the last few by [`accumulate_tail`].
///
/// 64 rather than 32 coordinates a step: a column's six weight broadcasts then serve 24
/// FMAs instead of 12. One thread of a 2-core Zen 5 EPYC, a tile of 256 Fashion-MNIST-sized
/// rows (784 coordinates) in cache, strips of `STRIP`, blocks of 6 queries over 48 - 256
/// union columns: 105 - 110 GMAC/s against 78 - 88 for 32 a step (the dense pass's GEMM:
/// about 112 a thread).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn accumulate_avx512(
    wt: &[f32],
    rows: &[f32],
    dim: usize,
    dims: Range<usize>,
    qs: &[usize],
    cols: &[usize],
    acc: &mut [f32],
) {
    check_bounds(wt, rows, dim, qs, cols, acc);
    let mut d0 = dims.start;
    while d0 + 64 <= dims.end {
        // SAFETY: the CPU has AVX-512F and FMA (this function's features); d0 + 64 <= dim.
        unsafe { step_avx512::<4>(wt, rows, dim, d0, qs, cols, acc) };
        d0 += 64;
    }
    if d0 + 32 <= dims.end {
        // SAFETY: as above, with d0 + 32 <= dim.
        unsafe { step_avx512::<2>(wt, rows, dim, d0, qs, cols, acc) };
        d0 += 32;
    }
    if d0 + 16 <= dims.end {
        // SAFETY: as above, with d0 + 16 <= dim (784 = 12 x 64 + 16).
        unsafe { step_avx512::<1>(wt, rows, dim, d0, qs, cols, acc) };
        d0 += 16;
    }
    accumulate_tail(wt, rows, dim, d0..dims.end, qs, cols, acc);
}

/// The coordinates d0..d0 + 16 V of every query's sum: per `CHUNK` columns, the block's
/// sums in QUERY_BLOCK x V zmm registers while each column's row piece streams through (V
/// loads, QUERY_BLOCK broadcasts, V QUERY_BLOCK FMAs), then into acc. The caller ran
/// `check_bounds` and has d0 + 16 V <= dim.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn step_avx512<const V: usize>(
    wt: &[f32],
    rows: &[f32],
    dim: usize,
    d0: usize,
    qs: &[usize],
    cols: &[usize],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut c0 = 0;
    while c0 < cols.len() {
        let c1 = (c0 + CHUNK).min(cols.len());
        let mut s = [[_mm512_setzero_ps(); V]; QUERY_BLOCK];
        for c in c0..c1 {
            let j = cols[c];
            // The rows' coordinates at d0 lie 4 D bytes apart: no hardware prefetcher
            // follows that, so the column PREFETCH ahead is fetched by hand.
            if let Some(&ahead) = cols.get(c + PREFETCH) {
                let p = rows.as_ptr().wrapping_add(ahead * dim + d0) as *const i8;
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * v));
                }
            }
            // SAFETY: row j's coordinates d0..d0 + 16 V lie inside `rows`, the column's
            // QUERY_BLOCK weights inside `wt` (`check_bounds`, the caller's d0).
            unsafe {
                let y = rows.as_ptr().add(j * dim + d0);
                let mut yv = [_mm512_setzero_ps(); V];
                for (v, yv) in yv.iter_mut().enumerate() {
                    *yv = _mm512_loadu_ps(y.add(16 * v));
                }
                let w = wt.as_ptr().add(c * QUERY_BLOCK);
                for (i, si) in s.iter_mut().enumerate() {
                    let wi = _mm512_set1_ps(*w.add(i));
                    for (sv, &yv) in si.iter_mut().zip(&yv) {
                        *sv = _mm512_fmadd_ps(wi, yv, *sv);
                    }
                }
            }
        }
        for (&q, si) in qs.iter().zip(&s) {
            for (v, &sv) in si.iter().enumerate() {
                // SAFETY: query q's coordinates d0..d0 + 16 V lie inside `acc`
                // (`check_bounds`, the caller's d0).
                unsafe {
                    let a = acc.as_mut_ptr().add(q * dim + d0 + 16 * v);
                    _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), sv));
                }
            }
        }
        c0 = c1;
    }
}

/// The kernel with AVX2: per `CHUNK` columns, per 16 coordinates, the block's sums in 12
/// ymm registers (two loads, 12 FMAs per column); then 8 coordinates in 6 registers where
/// that many are left; the last few by [`accumulate_tail`].
///
/// Chunks outside, coordinates inside: a chunk's rows (16 of 3 KB on Fashion-MNIST) are
/// then read front to back while they stay in cache, where coordinates outside read one
/// 64-byte piece of every kept row per step, scattered over the whole tile (perf at t =
/// 0.33: bound by those loads). Every sum adds the same products in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(
    wt: &[f32],
    rows: &[f32],
    dim: usize,
    dims: Range<usize>,
    qs: &[usize],
    cols: &[usize],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    check_bounds(wt, rows, dim, qs, cols, acc);
    let d_end = dims.end - dims.len() % 8;
    let mut c0 = 0;
    while c0 < cols.len() {
        let c1 = (c0 + CHUNK).min(cols.len());
        let mut d0 = dims.start;
        while d0 + 16 <= d_end {
            let mut s = [_mm256_setzero_ps(); 2 * QUERY_BLOCK];
            for (c, &j) in (c0..c1).zip(&cols[c0..c1]) {
                // SAFETY: row j's coordinates d0..d0 + 16 lie inside `rows`, the column's
                // QUERY_BLOCK weights inside `wt` (`check_bounds`, d0 + 16 <= dim).
                unsafe {
                    let y = rows.as_ptr().add(j * dim + d0);
                    let (y0, y1) = (_mm256_loadu_ps(y), _mm256_loadu_ps(y.add(8)));
                    let w = wt.as_ptr().add(c * QUERY_BLOCK);
                    for i in 0..QUERY_BLOCK {
                        let wi = _mm256_set1_ps(*w.add(i));
                        s[2 * i] = _mm256_fmadd_ps(wi, y0, s[2 * i]);
                        s[2 * i + 1] = _mm256_fmadd_ps(wi, y1, s[2 * i + 1]);
                    }
                }
            }
            for (i, &q) in qs.iter().enumerate() {
                // SAFETY: query q's coordinates d0..d0 + 16 lie inside `acc` (`check_bounds`).
                unsafe {
                    let a = acc.as_mut_ptr().add(q * dim + d0);
                    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), s[2 * i]));
                    let a = a.add(8);
                    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), s[2 * i + 1]));
                }
            }
            d0 += 16;
        }
        if d0 < d_end {
            // 8 coordinates left: one ymm of sums per query.
            let mut s = [_mm256_setzero_ps(); QUERY_BLOCK];
            for (c, &j) in (c0..c1).zip(&cols[c0..c1]) {
                // SAFETY: row j's coordinates d0..d0 + 8 and the column's weights lie
                // inside their slices (`check_bounds`, d0 + 8 <= d_end).
                unsafe {
                    let y = _mm256_loadu_ps(rows.as_ptr().add(j * dim + d0));
                    let w = wt.as_ptr().add(c * QUERY_BLOCK);
                    for (i, si) in s.iter_mut().enumerate() {
                        *si = _mm256_fmadd_ps(_mm256_set1_ps(*w.add(i)), y, *si);
                    }
                }
            }
            for (&q, &si) in qs.iter().zip(&s) {
                // SAFETY: query q's coordinates d0..d0 + 8 lie inside `acc` (as above).
                unsafe {
                    let a = acc.as_mut_ptr().add(q * dim + d0);
                    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), si));
                }
            }
        }
        c0 = c1;
    }
    accumulate_tail(wt, rows, dim, d_end..dims.end, qs, cols, acc);
}

/// The coordinates `dims`, one at a time (the whole kernel on CPUs without AVX2),
/// in the same order: per coordinate, `CHUNK` columns at a time in ascending order from 0,
/// each chunk's sum then into acc.
fn accumulate_tail(
    wt: &[f32],
    rows: &[f32],
    dim: usize,
    dims: Range<usize>,
    qs: &[usize],
    cols: &[usize],
    acc: &mut [f32],
) {
    for d in dims {
        for (k, chunk) in cols.chunks(CHUNK).enumerate() {
            let mut s = [0.0f32; QUERY_BLOCK];
            for (c, &j) in chunk.iter().enumerate() {
                let c = k * CHUNK + c;
                let y = rows[j * dim + d];
                for (si, &w) in s
                    .iter_mut()
                    .zip(&wt[c * QUERY_BLOCK..(c + 1) * QUERY_BLOCK])
                {
                    *si += w * y;
                }
            }
            for (&si, &q) in s.iter().zip(qs) {
                acc[q * dim + d] += si;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a tile of one row repeated, the sums carry the rounding of chunk sums, not that
    /// of one running sum over the tile's columns.
    #[test]
    fn duplicate_rows_sum_to_few_roundings() {
        for dim in [1, 5, 16, 48, 784] {
            let nt = 256;
            let row: Vec<f32> = (0..dim).map(|d| 0.1 + 1.37 * d as f32).collect();
            let rows: Vec<f32> = (0..nt).flat_map(|_| row.iter().copied()).collect();
            let w: Vec<f32> = (0..QUERY_BLOCK * nt)
                .map(|i| 0.5 + (i % 13) as f32 / 7.0)
                .collect();
            let qs: Vec<usize> = (0..QUERY_BLOCK).collect();
            let cols: Vec<usize> = (0..nt).collect();
            let mut acc = vec![0.0f32; QUERY_BLOCK * dim];
            accumulate(
                &pack(&w, nt, &qs, &cols),
                &rows,
                dim,
                0..dim,
                &qs,
                &cols,
                &mut acc,
            );
            // At most CHUNK / 2 + nt / CHUNK / 2 roundings of the whole sum (16 for 256
            // columns), with room; one running sum carries up to nt / 2 (128).
            let bound = 2.0 * (nt as f64).sqrt() * f64::powi(2.0, -24);
            for q in 0..QUERY_BLOCK {
                let ws: f64 = w[q * nt..(q + 1) * nt].iter().map(|&v| v as f64).sum();
                for d in 0..dim {
                    let want = ws * row[d] as f64;
                    let got = acc[q * dim + d] as f64;
                    assert!(
                        (got - want).abs() <= bound * want.abs(),
                        "dim {dim} query {q} coord {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Against an f64 sum, on random weights with zeros, odd dims (tails) and short blocks.
    #[test]
    fn equals_the_f64_sum() {
        let mut seed = 7u64;
        let mut next = || crate::oracle::prune::tests::lcg(&mut seed);
        // Dims with and without the 8-wide remainder (24, 40) and scalar tails.
        for (dim, nt, nq) in [
            (784, 256, QUERY_BLOCK),
            (37, 50, 3),
            (5, 9, QUERY_BLOCK),
            (64, 1, 1),
            (52, 30, QUERY_BLOCK - 1),
            (100, 40, QUERY_BLOCK),
            (24, 33, 2),
            (40, 17, QUERY_BLOCK),
        ] {
            let n_all = nq + 2;
            let w: Vec<f32> = (0..n_all * nt)
                .map(|_| {
                    let v = next();
                    if v < 0.3 {
                        0.0
                    } else {
                        v as f32
                    }
                })
                .collect();
            let rows: Vec<f32> = (0..nt * dim).map(|_| next() as f32).collect();
            let qs: Vec<usize> = (0..nq).map(|i| n_all - 1 - i).collect();
            assert!(
                (0..nq).all(|i| !qs[..i].contains(&qs[i])),
                "a block's queries are distinct"
            );
            let cols: Vec<usize> = (0..nt)
                .filter(|&j| qs.iter().any(|&q| w[q * nt + j] != 0.0))
                .collect();
            let start: Vec<f32> = (0..n_all * dim).map(|_| next() as f32).collect();
            let wt = pack(&w, nt, &qs, &cols);
            // The dispatched kernel and every variant this CPU can run.
            let mut variants = vec![("dispatched", start.clone()), ("plain", start.clone())];
            accumulate(&wt, &rows, dim, 0..dim, &qs, &cols, &mut variants[0].1);
            accumulate_tail(&wt, &rows, dim, 0..dim, &qs, &cols, &mut variants[1].1);
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
                {
                    let mut acc = start.clone();
                    // SAFETY: the CPU has the features (checked above).
                    unsafe { accumulate_avx512(&wt, &rows, dim, 0..dim, &qs, &cols, &mut acc) };
                    variants.push(("avx512", acc));
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    let mut acc = start.clone();
                    // SAFETY: as above.
                    unsafe { accumulate_avx2(&wt, &rows, dim, 0..dim, &qs, &cols, &mut acc) };
                    variants.push(("avx2", acc));
                }
            }
            // Cut into strips of whole vectors, every sum is the same.
            for width in [32, 96, STRIP] {
                let mut strips = start.clone();
                for d0 in (0..dim).step_by(width) {
                    let dims = d0..(d0 + width).min(dim);
                    accumulate(&wt, &rows, dim, dims, &qs, &cols, &mut strips);
                }
                assert_eq!(strips, variants[0].1, "strips of {width}, dim {dim}");
            }
            for (name, acc) in &variants {
                for q in 0..n_all {
                    for d in 0..dim {
                        let mut want = start[q * dim + d] as f64;
                        if qs.contains(&q) {
                            want += (0..nt)
                                .map(|j| w[q * nt + j] as f64 * rows[j * dim + d] as f64)
                                .sum::<f64>();
                        }
                        let got = acc[q * dim + d] as f64;
                        let scale: f64 = 1.0
                            + (0..nt)
                                .map(|j| (w[q * nt + j] as f64 * rows[j * dim + d] as f64).abs())
                                .sum::<f64>();
                        // Within f32 summation's bound over the column count (plus the add).
                        assert!(
                            (got - want).abs() <= (nt + 2) as f64 * f64::powi(2.0, -24) * scale,
                            "{name}: dim {dim} nt {nt} query {q} coord {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
