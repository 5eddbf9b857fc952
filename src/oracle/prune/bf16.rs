//! Screening dot products in bf16 on AVX-512 BF16 (`vdpbf16ps`): twice the multiply-adds
//! per cycle of f32 FMAs, with a certified error bound, for the sparse pass's logits.
//!
//! Rows (in the index's tile order) and queries are rounded to bf16 (round to nearest
//! even), x~ and y~, and the rounding errors' norms are kept: e_x = |x - x~| per query,
//! e_y = |y - y~| per row. Since x.y - x~.y~ = x.(y - y~) + (x - x~).y~, and the products
//! of bf16 values are exact in f32 while their f32 sums round by at most
//! gamma = 2 (D/2 + 1) 2^-24 of the sum of |products| (any order),
//!   |x.y - dot_bf16(x, y)| <= |x| e_y + e_x |y~| + gamma |x~| |y~| + `TINY`
//! (Cauchy-Schwarz twice; `TINY` covers the values the instruction flushes to zero, below
//! 2^-126). With round to nearest, e is typically 0.3 - 0.4 u |.| (u = 2^-8), where the
//! worst case 2u |x| |y| would be 3 times looser. The sparse pass adds c_dot times this
//! to a screening logit to bound the exact one from above, and computes in f32 only the
//! pairs this bound cannot rule out.
//!
//! Layout: panels of `LANES` = 16 consecutive positions; per panel, per pair of
//! coordinates (2k, 2k + 1), the 16 rows' two bf16 values side by side (one 64-byte
//! vector). The kernel keeps 8 queries x 2 panels of f32 sums in 16 registers and per pair
//! of coordinates loads two panel vectors and broadcasts each query's pair.

use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::oracle::simd::multiversion;

/// Rows per panel (one 512-bit vector of f32 sums).
pub const LANES: usize = 16;
/// Queries per kernel block.
pub const QUERY_BLOCK: usize = 8;

/// The f32 accumulation's share of the bound for dimension `dim` (see the module docs).
pub fn gamma(dim: usize) -> f64 {
    2.0 * (dim.div_ceil(2) as f64 + 1.0) * f64::powi(2.0, -24)
}

/// Absolute margin for flushed subnormal inputs and outputs (see the module docs).
pub const TINY: f64 = 1e-30;

/// Norms of a vector, its bf16 rounding and their difference: (|v|, |v~|, |v - v~|), each
/// rounded up to f32.
fn norms(v: &[f32]) -> [f32; 3] {
    norm_sums(v).map(|s| (s.sqrt() * (1.0 + 1e-6)) as f32)
}

multiversion! {
    /// (|v|^2, |v~|^2, |v - v~|^2) in f64 (v~ the bf16 rounding of v).
    fn norm_sums(v: &[f32]) -> [f64; 3] = norm_sums_body;
}

/// [`norm_sums`] in four lanes per sum (three serial f64 sums waited out the add latency
/// at every value: a quarter of the bf16 panels' packing, once per dataset).
#[inline(always)]
fn norm_sums_body(v: &[f32]) -> [f64; 3] {
    const L: usize = 4;
    let (mut n, mut nq, mut e) = ([0.0f64; L], [0.0f64; L], [0.0f64; L]);
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            let a = c[l] as f64;
            let r = f32::from_bits((bf16(c[l]) as u32) << 16) as f64;
            n[l] += a * a;
            nq[l] += r * r;
            e[l] += (a - r) * (a - r);
        }
    }
    for (l, &a) in chunks.remainder().iter().enumerate() {
        let r = f32::from_bits((bf16(a) as u32) << 16) as f64;
        let a = a as f64;
        n[l] += a * a;
        nq[l] += r * r;
        e[l] += (a - r) * (a - r);
    }
    [n, nq, e].map(|s| (s[0] + s[1]) + (s[2] + s[3]))
}

/// Whether this CPU runs the kernel.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 to bf16, round to nearest even (the inputs are finite).
#[inline(always)]
fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Two bf16 values in one u32, the first in the low half (the instruction's pair order).
#[inline(always)]
fn pair(a: f32, b: f32) -> u32 {
    bf16(a) as u32 | (bf16(b) as u32) << 16
}

multiversion! {
    /// `row` (an even number of values) as bf16 pairs.
    fn pack_row(row: &[f32], out: &mut [u32]) = pack_row_body;
}

#[inline(always)]
fn pack_row_body(row: &[f32], out: &mut [u32]) {
    for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
        *o = pair(c[0], c[1]);
    }
}

/// The rows of a dataset in tile order, as bf16 panels.
pub struct Panels {
    /// coordinate pairs per row: ceil(D / 2)
    pairs: usize,
    /// panel p, pair k, lane l at (p * pairs + k) * LANES + l; padded with zero rows to an
    /// even number of panels plus one spare pair of panels, so the kernel's reads of a
    /// panel pair starting anywhere stay inside
    data: Vec<u32>,
    /// per position: |y~| and |y - y~| (rounded up)
    norm: Vec<f32>,
    err: Vec<f32>,
}

impl Panels {
    /// Packs the stored rows at `perm` (the tile order).
    pub fn pack(ds: &Dataset, perm: &[u32]) -> Panels {
        let dim = ds.dim();
        let pairs = dim.div_ceil(2);
        let n_panels = perm.len().div_ceil(2 * LANES) * 2 + 2;
        debug_assert_eq!(
            Self::bytes_for(perm.len(), dim),
            n_panels * pairs * LANES * 4 + perm.len() * 8
        );
        let mut data = vec![0u32; n_panels * pairs * LANES];
        // Panel by panel in parallel (one thread took 0.11 s on Fashion-MNIST).
        let per_panel: Vec<[f32; 2]> = data
            .par_chunks_mut(pairs * LANES)
            .zip(perm.par_chunks(LANES))
            .flat_map_iter(|(panel, rows)| {
                let mut row = vec![0.0f32; 2 * pairs];
                let mut packed = vec![0u32; pairs];
                let mut out = Vec::with_capacity(rows.len());
                for (lane, &r) in rows.iter().enumerate() {
                    ds.stored_row(r as usize, &mut row[..dim]);
                    let [_, nq, e] = norms(&row[..dim]);
                    out.push([nq, e]);
                    // The row's pairs first (vectorized), then into the panel's lane.
                    pack_row(&row, &mut packed);
                    for (dst, &p) in panel.chunks_exact_mut(LANES).zip(&packed) {
                        dst[lane] = p;
                    }
                }
                out
            })
            .collect();
        let (norm, err) = per_panel.into_iter().map(|[n, e]| (n, e)).unzip();
        Panels {
            pairs,
            data,
            norm,
            err,
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
        let n_panels = n.div_ceil(2 * LANES) * 2 + 2;
        n_panels * dim.div_ceil(2) * LANES * 4 + n * 8
    }
}

/// Per query (|x|, |x~|, |x - x~|), rounded up.
pub fn query_norms(x: &[f32], dim: usize) -> Vec<[f32; 3]> {
    x.chunks_exact(dim).map(norms).collect()
}

/// The bound on |x.y - dot_bf16(x, y)| from the query's [`query_norms`] and the row's
/// |y~| and |y - y~| (see the module docs), as (coefficient of |y - y~|, of |y~|, constant).
pub fn bound_coefs(xn: [f32; 3], dim: usize) -> [f64; 3] {
    let [n, nq, e] = xn.map(|v| v as f64);
    [n, e + gamma(dim) * nq, TINY]
}

/// Queries as bf16 pairs, padded with zero queries to a multiple of `QUERY_BLOCK`.
pub fn pack_queries(x: &[f32], dim: usize) -> Vec<u32> {
    let pairs = dim.div_ceil(2);
    let n_q = x.len() / dim.max(1);
    let n_pad = n_q.div_ceil(QUERY_BLOCK) * QUERY_BLOCK;
    let mut out = vec![0u32; n_pad * pairs];
    for (q, xq) in x.chunks_exact(dim).enumerate() {
        for k in 0..pairs {
            let b = if 2 * k + 1 < dim { xq[2 * k + 1] } else { 0.0 };
            out[q * pairs + k] = pair(xq[2 * k], b);
        }
    }
    out
}

/// bf16 dot products of the packed queries `xq` (a multiple of `QUERY_BLOCK` rows) with
/// the rows at positions `positions`: `out[q * positions.len() + j]` for position
/// `positions.start + j`. `scratch` is reused between calls.
///
/// # Panics
/// Where the CPU lacks the instructions ([`supported`] is false).
pub fn dots(
    panels: &Panels,
    xq: &[u32],
    positions: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(supported(), "bf16 screening needs AVX-512 BF16");
    let pairs = panels.pairs;
    let n_qp = xq.len() / pairs;
    let p0 = positions.start / LANES;
    let n_pan = (positions.end.div_ceil(LANES) - p0).div_ceil(2) * 2;
    let width = n_pan * LANES;
    assert!((p0 + n_pan) * pairs * LANES <= panels.data.len());
    scratch.resize(n_qp * width, 0.0);
    for qb in (0..n_qp).step_by(QUERY_BLOCK) {
        for pp in (0..n_pan).step_by(2) {
            let y = &panels.data[(p0 + pp) * pairs * LANES..(p0 + pp + 2) * pairs * LANES];
            let x = &xq[qb * pairs..(qb + QUERY_BLOCK) * pairs];
            let o = &mut scratch[qb * width + pp * LANES..];
            // SAFETY: supported() was checked above; the slices hold what the kernel
            // reads (8 query rows of `pairs`, 2 panels) and writes (8 rows of 32 at stride
            // `width` starting inside `o`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                block_8x32(x, pairs, y, o, width)
            };
        }
    }
    let off = positions.start - p0 * LANES;
    let n = positions.len();
    for (q, row) in out.chunks_exact_mut(n).enumerate().take(n_qp) {
        row.copy_from_slice(&scratch[q * width + off..q * width + off + n]);
    }
}

/// 8 queries x 2 panels: out[i * stride + l] = sum_k x_i[k] . y[panel l / 16][k][l % 16].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_8x32(x: &[u32], pairs: usize, y: &[u32], out: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    assert!(x.len() >= QUERY_BLOCK * pairs && y.len() >= 2 * pairs * LANES);
    assert!(out.len() >= (QUERY_BLOCK - 1) * stride + 2 * LANES);
    let mut acc = [_mm512_setzero_ps(); 2 * QUERY_BLOCK];
    let (xp, yp) = (x.as_ptr(), y.as_ptr());
    // SAFETY: every read is inside x (row i < 8, k < pairs) and y (two panels of `pairs`
    // vectors of 16 u32), every write inside out (asserted above); a __m512bh is 32 bf16
    // values, the same 64 bytes as a __m512i.
    unsafe {
        for k in 0..pairs {
            let y0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(yp.add(k * LANES) as *const __m512i));
            let y1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                yp.add((pairs + k) * LANES) as *const __m512i
            ));
            for i in 0..QUERY_BLOCK {
                let xb: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(i * pairs + k) as i32));
                acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], xb, y0);
                acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], xb, y1);
            }
        }
        let op = out.as_mut_ptr();
        for i in 0..QUERY_BLOCK {
            _mm512_storeu_ps(op.add(i * stride), acc[2 * i]);
            _mm512_storeu_ps(op.add(i * stride + LANES), acc[2 * i + 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lowp::{tests as shared, Kind};
    use super::*;

    /// Every bf16 dot product within its bound of the f64 one, on random rows at odd D,
    /// for position ranges that start and end inside panels.
    #[test]
    fn dots_are_within_the_bound() {
        if !supported() {
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16 (bf16 screening unused here)");
            return;
        }
        let (n, dim, n_q) = (300, 37, 11);
        let mut seed = 7u64;
        let mut next = || (2.0 * crate::oracle::prune::tests::lcg(&mut seed)) as f32;
        let v: Vec<f32> = (0..n * dim).map(|_| next()).collect();
        let ds = shared::dataset(&v, dim);
        let perm: Vec<u32> = (0..n as u32).rev().collect();
        let x: Vec<f32> = (0..n_q * dim).map(|_| next() * 3.0).collect();
        let ranges = [0..n, 5..203, 17..18, 250..300];
        let worst = shared::worst_error(Kind::Bf16, &ds, &perm, &x, &ranges);
        // Not vacuous: some error comes within a factor 4 of its bound.
        assert!(worst > 0.25, "largest error / bound {worst}");
    }
}
