//! The f32 dot products of single (query, row) pairs: the logits the pruned, sparse and
//! projected passes compute for the pairs their bounds let through.
//!
//! **One summation scheme for every pair, whichever kernel computes it.** A pair's product
//! is 16 running sums ("lanes"): lane l takes the coordinates k = l (mod 16) in ascending
//! order, each by one fused multiply-add, from zero, the length padded to a multiple of 16
//! with zeros; then the lanes are added in a fixed tree, (l_i + l_{i+8}), then (+4),
//! (+2), (+1). An AVX-512 register holds one pair's lanes, two AVX2 registers do, the
//! scalar fallback an array: the three give the same bits, and so does every grouping of
//! pairs below. The passes depend on that: a pair may be computed by a row's group, a
//! block of rows or alone, and its logit must not depend on which (the batch-invariance
//! and the pass-independence tests compare bits).
//!
//! **Register-blocked.** One lane vector per pair leaves room for a block of R rows by Q
//! queries (4 x 4 on AVX-512: 16 accumulators, each 16-wide load of a row or a query
//! serving four FMAs). The earlier scheme (four accumulators of 16 lanes per pair, so that
//! one pair alone kept four FMA chains in flight) could only group queries of one row, with
//! one load per FMA: on a 2-core Zen 5 such products ran at 10 - 30 GMAC/s, a seventh of
//! the dense pass's GEMM, and were most of the sparse pass's logits time.

/// Lanes per pair.
const LANES: usize = 16;
/// Rows and queries per block of the AVX-512 kernel (16 accumulators).
const R512: usize = 4;
const Q512: usize = 4;
/// Rows and queries per block of the AVX2 kernel (two registers per pair: 12 of 16).
const R256: usize = 2;
const Q256: usize = 3;

/// The lanes' fixed sum tree (see the module docs), on an array.
#[inline(always)]
fn tree(l: &[f32; LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    let p: [f32; 2] = std::array::from_fn(|i| q[i] + q[i + 2]);
    p[0] + p[1]
}

/// The scheme one pair at a time, for CPUs without AVX2 (and as the tests' reference).
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut l = [0.0f32; LANES];
    for k in 0..n.next_multiple_of(LANES) {
        let (x, y) = if k < n { (a[k], b[k]) } else { (0.0, 0.0) };
        l[k % LANES] = x.mul_add(y, l[k % LANES]);
    }
    tree(&l)
}

/// Dot product of `a` and `b` over their common length, by the scheme of the module docs.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0.0f32];
    dots_grid(&[b], &[a], &mut out);
    out[0]
}

/// `out[i] = dot(xs[i], row)` for every i (the row read once for every block of queries).
pub(super) fn dots_with_row(row: &[f32], xs: &[&[f32]], out: &mut [f32]) {
    dots_grid(&[row], xs, out);
}

/// `out[r * xs.len() + q] = dot(xs[q], rows[r])` for every row r and query q, bitwise as
/// [`dot`] one pair at a time, computed in register blocks of rows by queries. The rows and
/// vectors may differ in length; each pair takes the shorter.
pub(super) fn dots_grid(rows: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let nq = xs.len();
    assert_eq!(out.len(), rows.len() * nq);
    if nq == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernels are compiled for (checked above).
        return unsafe { grid_with::<R512, Q512>(rows, xs, out, Isa::Avx512) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { grid_with::<R256, Q256>(rows, xs, out, Isa::Avx2) };
    }
    for (r, o) in rows.iter().zip(out.chunks_exact_mut(nq)) {
        for (x, o) in xs.iter().zip(o) {
            *o = dot_scalar(x, r);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Isa {
    Avx512,
    Avx2,
}

/// [`dots_grid`] in blocks of at most `R` rows by `Q` queries (at most 4 each), each block
/// by the kernel of its own shape (a short last block of rows or queries computes no
/// padding).
///
/// # Safety
/// The CPU must have the features of `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn grid_with<const R: usize, const Q: usize>(
    rows: &[&[f32]],
    xs: &[&[f32]],
    out: &mut [f32],
    isa: Isa,
) {
    const { assert!(R <= 4 && Q <= 4) };
    let nq = xs.len();
    for (rb, rows_b) in rows.chunks(R).enumerate() {
        for (qb, xs_b) in xs.chunks(Q).enumerate() {
            let mut put = |r: usize, v: &[f32]| {
                let at = (rb * R + r) * nq + qb * Q;
                out[at..at + v.len()].copy_from_slice(v);
            };
            // The kernel of shape (r, q) on this block.
            macro_rules! shape {
                ($r:literal, $q:literal) => {{
                    let rr: [&[f32]; $r] = std::array::from_fn(|i| rows_b[i]);
                    let xq: [&[f32]; $q] = std::array::from_fn(|i| xs_b[i]);
                    // SAFETY: the caller guarantees the features of `isa`.
                    let v = unsafe { kernel::<$r, $q>(isa, rr, xq) };
                    v.iter().enumerate().for_each(|(r, v)| put(r, v));
                }};
            }
            match (rows_b.len(), xs_b.len()) {
                (1, 1) => shape!(1, 1),
                (1, 2) => shape!(1, 2),
                (1, 3) => shape!(1, 3),
                (1, _) => shape!(1, 4),
                (2, 1) => shape!(2, 1),
                (2, 2) => shape!(2, 2),
                (2, 3) => shape!(2, 3),
                (2, _) => shape!(2, 4),
                (3, 1) => shape!(3, 1),
                (3, 2) => shape!(3, 2),
                (3, 3) => shape!(3, 3),
                (3, _) => shape!(3, 4),
                (_, 1) => shape!(4, 1),
                (_, 2) => shape!(4, 2),
                (_, 3) => shape!(4, 3),
                (_, _) => shape!(4, 4),
            }
        }
    }
}

/// One block's products with the ISA's kernel.
///
/// # Safety
/// The CPU must have the features of `isa`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel<const R: usize, const Q: usize>(
    isa: Isa,
    rows: [&[f32]; R],
    xs: [&[f32]; Q],
) -> [[f32; Q]; R] {
    let n = rows
        .iter()
        .chain(&xs)
        .fold(usize::MAX, |m, v| m.min(v.len()));
    // SAFETY: the caller guarantees the features; every slice is at least n long.
    unsafe {
        match isa {
            Isa::Avx512 => {
                block_avx512::<R, Q>(rows.map(|r| r.as_ptr()), xs.map(|x| x.as_ptr()), n)
            }
            Isa::Avx2 => block_avx2::<R, Q>(rows.map(|r| r.as_ptr()), xs.map(|x| x.as_ptr()), n),
        }
    }
}

/// [`dot`] compiled into an AVX-512 caller (no per-call dispatch).
///
/// # Safety
/// The CPU must have AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the caller guarantees the features.
    let [[v]] = unsafe { kernel::<1, 1>(Isa::Avx512, [b], [a]) };
    v
}

/// [`dot`] compiled into an AVX2 caller (no per-call dispatch).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the caller guarantees the features.
    let [[v]] = unsafe { kernel::<1, 1>(Isa::Avx2, [b], [a]) };
    v
}

/// The lane tree of one AVX2 register's 8 lanes after the first step (h_i = l_i + l_{i+8}).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tree8(h: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)))
}

/// R x Q pairs' products, one 16-lane accumulator each, over `n` coordinates (the last
/// partial vector by masked loads, its missing lanes zeros).
///
/// # Safety
/// AVX-512F and FMA; every pointer readable for `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn block_avx512<const R: usize, const Q: usize>(
    pr: [*const f32; R],
    px: [*const f32; Q],
    n: usize,
) -> [[f32; Q]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); Q]; R];
    // One step over 16 coordinates from i, the lanes of mask m (a macro, not a closure:
    // LLVM left a closure out of line in some shapes, its sums then in memory).
    macro_rules! step {
        ($i:expr, $m:expr) => {{
            let (i, m): (usize, __mmask16) = ($i, $m);
            let mut y = [_mm512_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: the lanes of m lie in i..n, inside every row.
                y[r] = unsafe { _mm512_maskz_loadu_ps(m, pr[r].add(i)) };
            }
            for q in 0..Q {
                // SAFETY: as above, inside every query.
                let x = unsafe { _mm512_maskz_loadu_ps(m, px[q].add(i)) };
                for r in 0..R {
                    acc[r][q] = _mm512_fmadd_ps(x, y[r], acc[r][q]);
                }
            }
        }};
    }
    let mut i = 0;
    while i + LANES <= n {
        step!(i, 0xffff);
        i += LANES;
    }
    if i < n {
        step!(i, (1u16 << (n - i)) - 1);
    }
    let mut out = [[0.0f32; Q]; R];
    for r in 0..R {
        for q in 0..Q {
            let a = acc[r][q];
            let lo = _mm512_castps512_ps256(a);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
            // SAFETY: AVX2 is among this function's features.
            out[r][q] = unsafe { tree8(_mm256_add_ps(lo, hi)) };
        }
    }
    out
}

/// [`block_avx512`] with two AVX2 registers per pair (lanes 0 - 7 and 8 - 15).
///
/// # Safety
/// AVX2 and FMA; every pointer readable for `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_avx2<const R: usize, const Q: usize>(
    pr: [*const f32; R],
    px: [*const f32; Q],
    n: usize,
) -> [[f32; Q]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[[_mm256_setzero_ps(); 2]; Q]; R];
    // Lane masks for the last partial vector (sign bit set = load).
    let mask = |lanes: usize, from: usize| {
        let m: [i32; 8] = std::array::from_fn(|l| if from + l < lanes { -1 } else { 0 });
        // SAFETY: m holds 8 ints.
        unsafe { _mm256_loadu_si256(m.as_ptr().cast()) }
    };
    macro_rules! step {
        ($i:expr, $m:expr) => {{
            let (i, m): (usize, [__m256i; 2]) = ($i, $m);
            for h in 0..2 {
                let mut y = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    // SAFETY: the masked lanes lie in i..n, inside every row.
                    y[r] = unsafe { _mm256_maskload_ps(pr[r].add(i + 8 * h), m[h]) };
                }
                for q in 0..Q {
                    // SAFETY: as above, inside every query.
                    let x = unsafe { _mm256_maskload_ps(px[q].add(i + 8 * h), m[h]) };
                    for r in 0..R {
                        acc[r][q][h] = _mm256_fmadd_ps(x, y[r], acc[r][q][h]);
                    }
                }
            }
        }};
    }
    let full = [_mm256_set1_epi32(-1); 2];
    let mut i = 0;
    while i + LANES <= n {
        step!(i, full);
        i += LANES;
    }
    if i < n {
        step!(i, [mask(n - i, 0), mask(n - i, 8)]);
    }
    let mut out = [[0.0f32; Q]; R];
    for r in 0..R {
        for q in 0..Q {
            let a = acc[r][q];
            // SAFETY: AVX2 is among this function's features.
            out[r][q] = unsafe { tree8(_mm256_add_ps(a[0], a[1])) };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of a grid is bitwise [`dot`] alone and the scalar scheme (so the same on
    /// every ISA), and within f32 summation's bound of the f64 product, at lengths around
    /// the vector widths and grid shapes around the kernels' blocks.
    #[test]
    fn grids_are_bitwise_single_dots_and_the_scalar_scheme() {
        let mut seed = 5u64;
        let mut next = || (2.0 * crate::oracle::prune::tests::lcg(&mut seed) - 1.0) as f32;
        for n in [1usize, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 784] {
            let rows: Vec<Vec<f32>> = (0..6).map(|_| (0..n).map(|_| next()).collect()).collect();
            let vs: Vec<Vec<f32>> = (0..10)
                .map(|_| (0..n).map(|_| 3.0 * next()).collect())
                .collect();
            for nr in [1usize, 2, 3, 4, 5, 6] {
                for m in [0usize, 1, 2, 3, 4, 5, 9, 10] {
                    let rs: Vec<&[f32]> = rows[..nr].iter().map(|v| v.as_slice()).collect();
                    let xs: Vec<&[f32]> = vs[..m].iter().map(|v| v.as_slice()).collect();
                    let mut out = vec![f32::NAN; nr * m];
                    dots_grid(&rs, &xs, &mut out);
                    // The AVX2 kernels too where the CPU runs them (dots_grid picks
                    // AVX-512 where it can).
                    #[cfg(target_arch = "x86_64")]
                    if crate::oracle::simd::avx2() {
                        let mut o2 = vec![f32::NAN; nr * m];
                        // SAFETY: the CPU has AVX2 and FMA (checked).
                        unsafe { grid_with::<R256, Q256>(&rs, &xs, &mut o2, Isa::Avx2) };
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&o2), bits(&out), "AVX2: n {n} rows {nr} queries {m}");
                    }
                    for (r, row) in rs.iter().enumerate() {
                        let mut one = vec![f32::NAN; m];
                        dots_with_row(row, &xs, &mut one);
                        assert_eq!(&one[..], &out[r * m..(r + 1) * m]);
                        for (q, x) in xs.iter().enumerate() {
                            let o = out[r * m + q];
                            let id = format!("n {n} rows {nr} queries {m} ({r}, {q})");
                            assert_eq!(o.to_bits(), dot(x, row).to_bits(), "{id}");
                            assert_eq!(o.to_bits(), dot_scalar(x, row).to_bits(), "{id}");
                            let want: f64 =
                                x.iter().zip(*row).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let scale: f64 = x
                                .iter()
                                .zip(*row)
                                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                                .sum();
                            let bound = (n + 2) as f64 * f64::powi(2.0, -24) * scale;
                            assert!((o as f64 - want).abs() <= bound, "{id}: {o} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The scalar scheme is the sum tree over the lanes as the module docs state it.
    #[test]
    fn lanes_take_every_sixteenth_coordinate() {
        // Coordinate k contributes 2^k to lane k mod 16 (exact in f32 for k < 24): the lane
        // tree adds them exactly, so the dot is the plain sum; the tree's order shows in
        // rounding only, checked bitwise against the kernels above.
        let a: Vec<f32> = (0..20).map(|k| (k as f32).exp2()).collect();
        let b = vec![1.0f32; 20];
        assert_eq!(dot_scalar(&a, &b), ((1u32 << 20) - 1) as f32);
        assert_eq!(dot(&a, &b), ((1u32 << 20) - 1) as f32);
    }
}
