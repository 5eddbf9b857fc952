//! Screening dot products in 16-bit integers on AVX2 (`vpmaddwd`): the sparse pass's
//! screening where the CPU has no AVX-512 BF16 (see [`super::bf16`], whose interface
//! this module repeats), with a certified error bound.
//!
//! Rows (in the index's tile order) and queries are scaled and rounded to integers,
//! y~ = q_y / s_y and x~ = q_x / s_x (one scale per vector, q within +-32767). The scale
//! is the largest that keeps every coordinate within 16 bits and the integer vector's
//! norm within [`norm_cap`] (cap), so that no sum of integer products can leave i32:
//! |sum_i q_x,i q_y,i| <= |q_x| |q_y| <= (cap + sqrt(D) / 2)^2 < 2^31 at every partial sum
//! (Cauchy-Schwarz; rounding moves each coordinate by at most 1/2). The integer dot
//! product is then exact, and x~.y~ = dot / (s_x s_y) is formed in f32 with three roundings
//! (the i32 to f32 conversion, the product of the inverse scales, the last product), each
//! within 2^-24 of |x~.y~| <= |x~| |y~|. So, as for bf16,
//!   |x.y - screen(x, y)| <= |x| e_y + e_x |y~| + gamma |x~| |y~| + `TINY`
//! with e = |v - v~| per vector, gamma = 4 2^-24 (3 roundings, rounded up) and `TINY`
//! for the underflow of those products (vectors of tiny values have tiny inverse scales).
//!
//! The rounding is finer than bf16's: on Fashion-MNIST a row's scale is about 2300 (its
//! norm near 20 reaches `NORM_CAP`), so e_y is near 2e-4 |y| where bf16 leaves 1.3e-3; a
//! query near t = 0.5 keeps 12 - 13 bits of its largest coordinate.
//!
//! Throughput, measured on a 2-core Zen 3 (`lowp`'s `screen_speed`): about 16 multiply-adds
//! per cycle and core, as many as its f32 FMAs; the gain over the f32 GEMM (1.5 - 1.7
//! times its rate at 2 threads) is the GEMM library's efficiency and the rows' half bytes.
//!
//! Layout: as [`super::bf16::Panels`], panels of `LANES` = 16 consecutive positions; per
//! panel, per pair of coordinates (2k, 2k + 1), the 16 rows' two i16 values side by side
//! (two 256-bit vectors). The kernel keeps `QUERY_BLOCK` = 6 queries x 16 rows of i32
//! sums in 12 registers and per pair of coordinates loads the panel's two vectors and
//! broadcasts each query's pair.

use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::oracle::simd::multiversion;

/// Rows per panel.
pub const LANES: usize = 16;
/// Queries per kernel block.
pub const QUERY_BLOCK: usize = 6;

/// The f32 arithmetic's share of the bound: three roundings of 2^-24, rounded up.
pub const GAMMA: f64 = 4.0 / 16_777_216.0;

/// Absolute margin for underflow: a product of inverse scales or the result below f32's
/// normal range loses at most |dot| 2^-149 <= 2^31 2^-149 of it.
pub const TINY: f64 = 1e-30;

/// The cap on the norm of an integer vector for dimension `dim` (see the module docs):
/// (cap + sqrt(dim) / 2)^2 stays below 2^31.
fn norm_cap(dim: usize) -> f64 {
    (f64::from(i32::MAX)).sqrt() - 0.5 * (dim as f64).sqrt() - 1.0
}

/// The scale of a vector: the largest that keeps its coordinates within +-32767 and its
/// norm within the cap (1 for a zero vector).
fn scale(v: &[f32], cap: f64) -> f32 {
    let [max, sq] = max_and_sq(v);
    if max == 0.0 {
        return 1.0;
    }
    // Rounded down in f32 (the bound holds for any scale at or below the largest), and
    // finite: a vector of subnormal values would ask for more than f32 holds (its
    // coordinates then round to 0, the bound taking the whole vector as error).
    let s = (32767.0 / max).min(cap / sq.sqrt()) * (1.0 - 1e-6);
    s.min(f32::MAX as f64) as f32
}

/// Lanes of the sums below (one f64 sum per value waited out the add's latency).
const L: usize = 8;

multiversion! {
    /// (max |v_i|, |v|^2) in f64.
    fn max_and_sq(v: &[f32]) -> [f64; 2] = max_and_sq_body;
}

#[inline(always)]
fn max_and_sq_body(v: &[f32]) -> [f64; 2] {
    let (mut max, mut sq) = ([0.0f32; L], [0.0f64; L]);
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            max[l] = if c[l].abs() > max[l] {
                c[l].abs()
            } else {
                max[l]
            };
            sq[l] += c[l] as f64 * c[l] as f64;
        }
    }
    for (l, &a) in chunks.remainder().iter().enumerate() {
        max[l] = if a.abs() > max[l] { a.abs() } else { max[l] };
        sq[l] += a as f64 * a as f64;
    }
    let m = max.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    [m as f64, sq.iter().sum()]
}

multiversion! {
    /// `v` scaled by `s` and rounded to integers into `q` (same length); returns the
    /// squared norms (|v~|^2, |v - v~|^2, |v|^2) in f64, where v~ = q / s with 1 / s taken
    /// in f32 (`inv`): the values the kernel's result stands for.
    fn quantize(v: &[f32], s: f32, inv: f32, q: &mut [i16]) -> [f64; 3] = quantize_body;
}

#[inline(always)]
fn quantize_body(v: &[f32], s: f32, inv: f32, q: &mut [i16]) -> [f64; 3] {
    let (mut nq, mut e, mut n) = ([0.0f64; L], [0.0f64; L], [0.0f64; L]);
    let step = |a: f32, o: &mut i16, nq: &mut f64, e: &mut f64, n: &mut f64| {
        // (Ties to even: any rounding serves, the norms below are of what it gives.)
        let r = (a * s).round_ties_even().clamp(-32767.0, 32767.0);
        *o = r as i16;
        let back = r as f64 * inv as f64;
        let a = a as f64;
        *nq += back * back;
        *e += (a - back) * (a - back);
        *n += a * a;
    };
    let n_all = v.len().min(q.len());
    let (v, q) = (&v[..n_all], &mut q[..n_all]);
    let mut vc = v.chunks_exact(L);
    let mut qc = q.chunks_exact_mut(L);
    for (c, o) in (&mut vc).zip(&mut qc) {
        for l in 0..L {
            step(c[l], &mut o[l], &mut nq[l], &mut e[l], &mut n[l]);
        }
    }
    for (l, (&a, o)) in vc.remainder().iter().zip(qc.into_remainder()).enumerate() {
        step(a, o, &mut nq[l], &mut e[l], &mut n[l]);
    }
    [nq, e, n].map(|s| s.iter().sum())
}

/// Square roots rounded up to f32.
fn up(s: f64) -> f32 {
    (s.sqrt() * (1.0 + 1e-6)) as f32
}

/// Whether this CPU runs the kernel.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two i16 values in one u32, the first in the low half (the instruction's pair order).
fn pair(a: i16, b: i16) -> u32 {
    a as u16 as u32 | (b as u16 as u32) << 16
}

/// The rows of a dataset in tile order, as i16 panels.
pub struct Panels {
    /// coordinate pairs per row: ceil(D / 2)
    pairs: usize,
    /// panel p, pair k, lane l at (p * pairs + k) * LANES + l; one spare panel at the end
    data: Vec<u32>,
    /// per position: |y~| and |y - y~| (rounded up), and 1 / s_y
    norm: Vec<f32>,
    err: Vec<f32>,
    inv: Vec<f32>,
}

impl Panels {
    /// Packs the stored rows at `perm` (the tile order).
    pub fn pack(ds: &Dataset, perm: &[u32]) -> Panels {
        let dim = ds.dim();
        let pairs = dim.div_ceil(2);
        let n_panels = perm.len().div_ceil(LANES) + 1;
        debug_assert_eq!(
            Self::bytes_for(perm.len(), dim),
            n_panels * pairs * LANES * 4 + perm.len() * 12
        );
        let cap = norm_cap(dim);
        let mut data = vec![0u32; n_panels * pairs * LANES];
        let per_row: Vec<[f32; 3]> = data
            .par_chunks_mut(pairs * LANES)
            .zip(perm.par_chunks(LANES))
            .flat_map_iter(|(panel, rows)| {
                let mut row = vec![0.0f32; dim];
                let mut q = vec![0i16; 2 * pairs];
                let mut out = Vec::with_capacity(rows.len());
                for (lane, &r) in rows.iter().enumerate() {
                    ds.stored_row(r as usize, &mut row);
                    let s = scale(&row, cap);
                    let inv = 1.0 / s;
                    let [nq, e, _] = quantize(&row, s, inv, &mut q[..dim]);
                    out.push([up(nq), up(e), inv]);
                    for (k, dst) in panel.chunks_exact_mut(LANES).enumerate() {
                        dst[lane] = pair(q[2 * k], q[2 * k + 1]);
                    }
                }
                out
            })
            .collect();
        Panels {
            pairs,
            data,
            norm: per_row.iter().map(|v| v[0]).collect(),
            err: per_row.iter().map(|v| v[1]).collect(),
            inv: per_row.iter().map(|v| v[2]).collect(),
        }
    }

    /// |y~| per position.
    pub fn norms(&self) -> &[f32] {
        &self.norm
    }

    /// |y - y~| per position.
    pub fn errs(&self) -> &[f32] {
        &self.err
    }

    /// The bytes [`Panels::pack`] allocates for `n` rows of `dim` values.
    pub fn bytes_for(n: usize, dim: usize) -> usize {
        (n.div_ceil(LANES) + 1) * dim.div_ceil(2) * LANES * 4 + n * 12
    }
}

/// Queries as i16 pairs (padded with zero queries to a multiple of `QUERY_BLOCK`), with
/// their inverse scales and norms.
pub struct Queries {
    pairs: usize,
    data: Vec<u32>,
    inv: Vec<f32>,
    /// per query (|x|, |x~|, |x - x~|), rounded up
    norms: Vec<[f32; 3]>,
}

impl Queries {
    /// Packs the queries `x` (rows of `dim`).
    pub fn pack(x: &[f32], dim: usize) -> Queries {
        let pairs = dim.div_ceil(2);
        let n_q = x.len() / dim.max(1);
        let n_pad = n_q.div_ceil(QUERY_BLOCK) * QUERY_BLOCK;
        let cap = norm_cap(dim);
        let mut data = vec![0u32; n_pad * pairs];
        let mut inv = vec![1.0f32; n_pad];
        let mut norms = Vec::with_capacity(n_q);
        let mut q = vec![0i16; 2 * pairs];
        for (i, xq) in x.chunks_exact(dim).enumerate() {
            let s = scale(xq, cap);
            inv[i] = 1.0 / s;
            let [nq, e, n] = quantize(xq, s, inv[i], &mut q[..dim]);
            norms.push([up(n), up(nq), up(e)]);
            for (k, o) in data[i * pairs..(i + 1) * pairs].iter_mut().enumerate() {
                *o = pair(q[2 * k], q[2 * k + 1]);
            }
        }
        Queries {
            pairs,
            data,
            inv,
            norms,
        }
    }

    /// Per query (|x|, |x~|, |x - x~|), rounded up.
    pub fn norms(&self) -> &[[f32; 3]] {
        &self.norms
    }
}

/// The bound on |x.y - screen(x, y)| from the query's norms (|x|, |x~|, |x - x~|) and the
/// row's |y~| and |y - y~| (see the module docs), as (coefficient of |y - y~|, of |y~|,
/// constant).
pub fn bound_coefs(xn: [f32; 3]) -> [f64; 3] {
    let [n, nq, e] = xn.map(|v| v as f64);
    [n, e + GAMMA * nq, TINY]
}

/// Screening dot products of the packed queries `xq` with the rows at positions
/// `positions`: `out[q * positions.len() + j]` for position `positions.start + j`, for
/// every query of `xq` (padding included). `scratch` is reused between calls.
///
/// # Panics
/// Where the CPU lacks AVX2 ([`supported`] is false).
pub fn dots(
    panels: &Panels,
    xq: &Queries,
    positions: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<i32>,
) {
    assert!(supported(), "int16 screening needs AVX2");
    let pairs = panels.pairs;
    assert_eq!(xq.pairs, pairs);
    let n_qp = xq.inv.len();
    let p0 = positions.start / LANES;
    let n_pan = positions.end.div_ceil(LANES) - p0;
    let width = n_pan * LANES;
    assert!((p0 + n_pan) * pairs * LANES <= panels.data.len());
    scratch.resize(n_qp * width, 0);
    for qb in (0..n_qp).step_by(QUERY_BLOCK) {
        let x = &xq.data[qb * pairs..(qb + QUERY_BLOCK) * pairs];
        for p in 0..n_pan {
            let y = &panels.data[(p0 + p) * pairs * LANES..(p0 + p + 1) * pairs * LANES];
            let o = &mut scratch[qb * width + p * LANES..];
            // SAFETY: supported() was checked above; the slices hold what the kernel
            // reads (6 query rows of `pairs`, one panel) and writes (6 rows of 16 at
            // stride `width` starting inside `o`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                block_6x16(x, pairs, y, o, width)
            };
        }
    }
    let off = positions.start - p0 * LANES;
    let n = positions.len();
    let inv_y = &panels.inv[positions.clone()];
    for (q, row) in out.chunks_exact_mut(n).enumerate().take(n_qp) {
        let src = &scratch[q * width + off..q * width + off + n];
        let iq = xq.inv[q];
        for ((o, &d), &iy) in row.iter_mut().zip(src).zip(inv_y) {
            *o = d as f32 * (iq * iy);
        }
    }
}

/// 6 queries x 16 rows: out[i * stride + l] = sum_k x_i[k] . y[k][l] (pairs of i16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_6x16(x: &[u32], pairs: usize, y: &[u32], out: &mut [i32], stride: usize) {
    use std::arch::x86_64::*;
    assert!(x.len() >= QUERY_BLOCK * pairs && y.len() >= pairs * LANES);
    assert!(out.len() >= (QUERY_BLOCK - 1) * stride + LANES);
    let mut acc = [_mm256_setzero_si256(); 2 * QUERY_BLOCK];
    let (xp, yp) = (x.as_ptr(), y.as_ptr());
    // SAFETY: every read is inside x (row i < 6, k < pairs) and y (`pairs` groups of 16
    // u32), every write inside out (asserted above).
    unsafe {
        for k in 0..pairs {
            let y0 = _mm256_loadu_si256(yp.add(k * LANES) as *const __m256i);
            let y1 = _mm256_loadu_si256(yp.add(k * LANES + 8) as *const __m256i);
            for i in 0..QUERY_BLOCK {
                let xb = _mm256_set1_epi32(*xp.add(i * pairs + k) as i32);
                acc[2 * i] = _mm256_add_epi32(acc[2 * i], _mm256_madd_epi16(xb, y0));
                acc[2 * i + 1] = _mm256_add_epi32(acc[2 * i + 1], _mm256_madd_epi16(xb, y1));
            }
        }
        let op = out.as_mut_ptr();
        for i in 0..QUERY_BLOCK {
            _mm256_storeu_si256(op.add(i * stride) as *mut __m256i, acc[2 * i]);
            _mm256_storeu_si256(op.add(i * stride + 8) as *mut __m256i, acc[2 * i + 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lowp::{tests as shared, Kind};
    use super::*;

    /// Every screening dot product within the bound of the f64 one, on random rows at odd
    /// D (and a zero row), for position ranges that start and end inside panels.
    #[test]
    fn dots_are_within_the_bound() {
        if !supported() {
            eprintln!("SKIPPED: this CPU has no AVX2 (int16 screening unused here)");
            return;
        }
        let (n, dim, n_q) = (300, 37, 11);
        let mut seed = 11u64;
        let mut next = || (2.0 * crate::oracle::prune::tests::lcg(&mut seed)) as f32;
        let mut v: Vec<f32> = (0..n * dim).map(|i| next() * (1 + i % 5) as f32).collect();
        v[40 * dim..41 * dim].fill(0.0);
        let ds = shared::dataset(&v, dim);
        let perm: Vec<u32> = (0..n as u32).rev().collect();
        let x: Vec<f32> = (0..n_q * dim).map(|_| next() * 3.0).collect();
        let ranges = [0..n, 5..203, 17..18, 250..300];
        let worst = shared::worst_error(Kind::Int16, &ds, &perm, &x, &ranges);
        // Not vacuous: the errors are a sizeable share of their bound.
        assert!(worst > 0.05, "largest error / bound {worst}");
    }

    /// No i32 overflow at the extremes: rows and queries of one large coordinate, or of
    /// nearly equal ones (the norm cap binds), give the f64 products within the bound.
    #[test]
    fn extreme_vectors_do_not_overflow() {
        if !supported() {
            return;
        }
        // Each row with its negative, so that the centred rows are these (up to the
        // rounding of the subnormal ones' mean).
        let dim = 1001;
        let mut v = vec![1.0f32; dim];
        v.extend((0..dim).map(|i| if i == 3 { 1e6 } else { 0.0 }));
        v.extend((0..dim).map(|i| if i % 2 == 0 { 1e-3 } else { -1e-3 }));
        // Subnormal values: a scale beyond f32's range, kept finite.
        v.extend((0..dim).map(|i| if i % 3 == 0 { 1e-40 } else { 0.0 }));
        let neg: Vec<f32> = v.iter().map(|a| -a).collect();
        v.extend(neg);
        let n = 8;
        let ds = shared::dataset(&v, dim);
        let perm: Vec<u32> = (0..n as u32).collect();
        // Queries: the stored rows themselves (every pair of extremes).
        let mut x = vec![0.0f32; n * dim];
        for (r, row) in x.chunks_exact_mut(dim).enumerate() {
            ds.stored_row(r, row);
        }
        shared::worst_error(Kind::Int16, &ds, &perm, &x, std::slice::from_ref(&(0..n)));
        let panels = Panels::pack(&ds, &perm);
        // The flat row's integer square is within 0.2% of 2^31 (the cap binds there).
        let s = 1.0 / panels.inv[0] as f64;
        assert!(dim as f64 * (s.round() * s.round()) > 0.998 * 2f64.powi(31));
    }
}
