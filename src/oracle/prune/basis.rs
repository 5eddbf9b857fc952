//! The index's geometry: the PCA basis and the PCA tree that orders rows into tiles.

use faer::{Mat, Side};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{
    BASIS_ITERS, BASIS_SAMPLE, EIGEN_MAX_DIM, FALLBACK_DIMS, LEAF_ROWS, MAX_RESIDUAL_SHARE,
    PROJ_DIMS, SEED,
};
use crate::dataset::Dataset;
use crate::oracle::cpu::{sgemm, Gemm};
use crate::oracle::simd::multiversion;

/// C = S^T S (dim x dim) of the m x dim rows `s`, its rows computed in blocks side by side:
/// one GEMM of 2 m dim^2 FLOPs was most of the structure test (about 50 ms at D = 784 on
/// one thread, whatever the machine's threads; a 16-thread host spent 15% over dense on
/// `gaussian:60000,784` mostly here). Each block runs the same GEMM on fewer output rows,
/// which sums every element over the same k in the same order: the same bits (tested).
fn covariance(s: &[f32], m: usize, dim: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut c = vec![0.0f32; dim * dim];
    let block = dim.div_ceil(rayon::current_num_threads()).max(16);
    c.par_chunks_mut(block * dim)
        .enumerate()
        .for_each(|(b, out)| {
            let r0 = b * block;
            sgemm(
                Gemm {
                    m: out.len() / dim,
                    n: dim,
                    k: m,
                },
                out,
                false,
                (&s[r0..], 1, dim),
                (s, dim, 1),
            );
        });
    c
}

/// k orthonormal directions of largest variance (approximately: any orthonormal basis
/// keeps the bounds valid, a better one only makes them tighter). Empty when a quick test
/// finds no low-dimensional structure.
/// Also returns the share of the (subsample's) variance the basis leaves in the residual.
pub(super) fn pca_basis(ds: &Dataset) -> (Vec<f32>, f64) {
    let (n, dim) = (ds.n_samples(), ds.dim());
    let k = PROJ_DIMS.min(dim);
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
    let c = covariance(&s, m, dim);
    let trace: f64 = (0..dim).map(|d| c[d * dim + d] as f64).sum();
    let share = |captured: f64| {
        if trace > 0.0 {
            (1.0 - captured / trace).max(0.0)
        } else {
            0.0
        }
    };
    // Cheap structure test first (a few subspace iterations for the leading directions):
    // any FALLBACK_DIMS orthonormal directions capture at most what the leading ones do,
    // so when these leave more than MAX_RESIDUAL_SHARE outside, no index is worth building
    // and the eigendecomposition (about 1 s at D = 784) is not spent.
    let kp = FALLBACK_DIMS.min(dim);
    if kp < dim {
        let mut probe_rng = ChaCha8Rng::seed_from_u64(SEED ^ 1);
        let (_, captured) = subspace(&c, dim, kp, 3, &mut probe_rng);
        if share(captured) > MAX_RESIDUAL_SHARE {
            return (Vec::new(), share(captured));
        }
    }
    if dim <= EIGEN_MAX_DIM {
        // One symmetric eigendecomposition (O(D^3), well under a second at D = 784): the
        // exact principal directions, in order, which the levels' cuts rely on.
        let cm = Mat::<f64>::from_fn(dim, dim, |i, j| c[i * dim + j] as f64);
        if let Ok(eig) = cm.self_adjoint_eigen(Side::Lower) {
            let vals: Vec<f64> = (0..dim).map(|i| eig.S().column_vector()[i]).collect();
            let mut order: Vec<usize> = (0..dim).collect();
            order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
            let u = eig.U();
            let mut basis = vec![0.0f32; k * dim];
            for (j, &col) in order[..k].iter().enumerate() {
                for d in 0..dim {
                    basis[j * dim + d] = u[(d, col)] as f32;
                }
            }
            let captured: f64 = order[..FALLBACK_DIMS.min(k)]
                .iter()
                .map(|&i| vals[i].max(0.0))
                .sum();
            return (basis, share(captured));
        }
    }
    let (v32, captured) = subspace(&c, dim, k, BASIS_ITERS, &mut rng);
    (v32, share(captured))
}

/// k orthonormal directions by subspace iteration on C (dim x dim), as f32 rows, with the
/// variance the first `FALLBACK_DIMS` of them capture (the iteration orders its directions
/// roughly by variance).
fn subspace(
    c: &[f32],
    dim: usize,
    k: usize,
    iters: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, f64) {
    let mut v: Vec<f64> = (0..k * dim)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    orthonormalise(&mut v, dim, rng);
    let mut v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let mut w = vec![0.0f32; dim * k];
    // W = C V^T (dim x k); element (d, j) of the rhs is v32[j * dim + d].
    let c_times = |v32: &[f32], w: &mut [f32]| {
        sgemm(
            Gemm {
                m: dim,
                n: k,
                k: dim,
            },
            w,
            false,
            (c, dim, 1),
            (v32, 1, dim),
        )
    };
    for _ in 0..iters {
        c_times(&v32, &mut w);
        for j in 0..k {
            for d in 0..dim {
                v[j * dim + d] = w[d * k + j] as f64;
            }
        }
        orthonormalise(&mut v, dim, rng);
        v32 = v.iter().map(|&x| x as f32).collect();
    }
    // Captured variance: sum_j v_j^T C v_j, against trace(C).
    c_times(&v32, &mut w);
    // (subspace iteration orders its directions roughly by variance)
    let captured: f64 = (0..FALLBACK_DIMS.min(k))
        .map(|j| {
            (0..dim)
                .map(|d| v[j * dim + d] * w[d * k + j] as f64)
                .sum::<f64>()
        })
        .sum();
    (v32, captured)
}

multiversion! {
    /// Modified Gram-Schmidt (twice, for f64 orthogonality) on the rows of `v` (k x dim);
    /// a row that collapses (rank-deficient data) is replaced by a fresh random one.
    /// Compiled for the CPU's vectors, its dot products over 8 running sums
    /// ([`dot_lanes`]): with one running sum it was most of the structure test's
    /// subspace iteration.
    pub(crate) fn orthonormalise(v: &mut [f64], dim: usize, rng: &mut ChaCha8Rng) =
        orthonormalise_body;
}

#[inline(always)]
fn orthonormalise_body(v: &mut [f64], dim: usize, rng: &mut ChaCha8Rng) {
    let k = v.len() / dim;
    for j in 0..k {
        for attempt in 0..4 {
            for _ in 0..2 {
                for i in 0..j {
                    let (head, tail) = v.split_at_mut(j * dim);
                    let (vi, vj) = (&head[i * dim..(i + 1) * dim], &mut tail[..dim]);
                    let dot = dot_lanes(vi, vj, |x| x);
                    vj.iter_mut().zip(vi).for_each(|(b, a)| *b -= dot * a);
                }
            }
            let vj = &mut v[j * dim..(j + 1) * dim];
            let norm = dot_lanes(vj, vj, |x| x).sqrt();
            if norm > 1e-8 || attempt == 3 {
                vj.iter_mut().for_each(|x| *x /= norm.max(1e-300));
                break;
            }
            vj.iter_mut()
                .for_each(|x| *x = rng.sample::<f64, _>(StandardNormal));
        }
    }
}

/// PCA-tree split of `ids` (stored rows) in place, on the first k of each row's `stride`
/// projected coordinates; returns the leaf sizes in order.
pub(super) fn split(ids: &mut [u32], proj: &[f32], stride: usize, k: usize) -> Vec<usize> {
    let n = ids.len();
    if n <= LEAF_ROWS {
        return vec![n];
    }
    let row = |i: u32| &proj[i as usize * stride..i as usize * stride + k];
    let mut mean = vec![0.0f64; k];
    for &i in ids.iter() {
        mean.iter_mut()
            .zip(row(i))
            .for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    // The node's rows centred, in f64 and contiguous: every pass below reads them (from
    // the strided f32 projections each pass was a chain of scalar conversions and serial
    // sums, 0.13 s for Fashion-MNIST's tree).
    let mut centred = vec![0.0f64; n * k];
    for (c, &i) in centred.chunks_exact_mut(k).zip(ids.iter()) {
        for ((c, &v), m) in c.iter_mut().zip(row(i)).zip(&mean) {
            *c = v as f64 - m;
        }
    }
    let keys = split_keys(&centred, k, ids);
    let mut keyed: Vec<(f64, u32)> = keys.into_iter().zip(ids.iter().copied()).collect();
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
    let (mut a, b) = if n > 2048 {
        rayon::join(|| split(l, proj, stride, k), || split(r, proj, stride, k))
    } else {
        (split(l, proj, stride, k), split(r, proj, stride, k))
    };
    a.extend(b);
    a
}

multiversion! {
    /// Each row's coordinate along the node's principal direction: power iteration on the
    /// centred rows (`centred`, n x k, of stored rows `ids`) from the farthest one (ties
    /// to the lower row).
    fn split_keys(centred: &[f64], k: usize, ids: &[u32]) -> Vec<f64> = split_keys_body;
}

#[inline(always)]
fn split_keys_body(centred: &[f64], k: usize, ids: &[u32]) -> Vec<f64> {
    let rows = || centred.chunks_exact(k);
    let dot = |a: &[f64], b: &[f64]| dot_lanes(a, b, |v| v);
    // The farthest row's position (largest |c|, ties to the lower stored row).
    let far = rows()
        .zip(ids)
        .enumerate()
        .map(|(at, (c, &i))| (dot(c, c), i, at))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .map_or(0, |(_, _, at)| at);
    let mut dir: Vec<f64> = centred[far * k..(far + 1) * k].to_vec();
    let mut w = vec![0.0f64; k];
    for _ in 0..4 {
        w.iter_mut().for_each(|w| *w = 0.0);
        for c in rows() {
            let s = dot(c, &dir);
            w.iter_mut().zip(c).for_each(|(w, &a)| *w += s * a);
        }
        let norm = dot(&w, &w).sqrt();
        if norm == 0.0 {
            break;
        }
        dir.iter_mut().zip(&w).for_each(|(d, &w)| *d = w / norm);
    }
    rows().map(|c| dot(c, &dir)).collect()
}

multiversion! {
    /// [`dot_lanes`] of two f64 vectors, compiled for the CPU's vectors (the same bits).
    pub(crate) fn dot_f64(a: &[f64], b: &[f64]) -> f64 = dot_f64_body;
}

#[inline(always)]
fn dot_f64_body(a: &[f64], b: &[f64]) -> f64 {
    dot_lanes(a, b, |v| v)
}

/// sum_i a_i f(b_i) in f64 over 8 independent running sums (a single running sum cannot
/// vectorize and waits out the add latency at every step; the order changes only f64
/// rounding: far below the f32 the refiner's screen allows for, and the PCA tree's keys).
#[inline(always)]
pub(crate) fn dot_lanes<T: Copy>(a: &[f64], b: &[T], f: impl Fn(T) -> f64) -> f64 {
    sum_lanes(a, b, |x, y| x * f(y))
}

/// sum_i g(a_i, b_i) in [`dot_lanes`]' order (8 running sums over whole chunks, added
/// pairwise, then the rest one by one): the refinement's f64 distances and norms.
#[inline(always)]
pub(crate) fn sum_lanes<T: Copy>(a: &[f64], b: &[T], g: impl Fn(f64, T) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += g(x[l], y[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in ra.iter().zip(rb) {
        s += g(x, y);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked covariance equals one GEMM over all rows bitwise, whatever the
    /// threads, and an f64 S^T S within f32 rounding.
    #[test]
    fn covariance_blocks_equal_one_gemm_and_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // The last is the structure test's own shape (BASIS_SAMPLE rows of Fashion-MNIST's D).
        for (m, dim) in [
            (1usize, 1usize),
            (300, 7),
            (257, 100),
            (2048, 196),
            (2048, 784),
        ] {
            let s: Vec<f32> = (0..m * dim)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect();
            let mut one = vec![0.0f32; dim * dim];
            sgemm(
                Gemm {
                    m: dim,
                    n: dim,
                    k: m,
                },
                &mut one,
                false,
                (&s, 1, dim),
                (&s, dim, 1),
            );
            for threads in [1, 2, 3, 5] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let c = pool.install(|| covariance(&s, m, dim));
                let same = c.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "m {m}, dim {dim}, {threads} threads");
            }
            // (The f64 check on the small shapes: the last would take minutes unoptimised.)
            if m * dim * dim > 100_000_000 {
                continue;
            }
            for i in 0..dim {
                for j in 0..dim {
                    let exact: f64 = (0..m)
                        .map(|r| s[r * dim + i] as f64 * s[r * dim + j] as f64)
                        .sum();
                    let scale: f64 = (0..m)
                        .map(|r| (s[r * dim + i] as f64 * s[r * dim + j] as f64).abs())
                        .sum();
                    let err = (one[i * dim + j] as f64 - exact).abs();
                    assert!(err <= 1e-5 * scale + 1e-30, "({i}, {j}): {err} of {scale}");
                }
            }
        }
    }
}
