//! Late-t refinement: the posterior of a concentrated query recomputed in f64 over every
//! sample that can matter, from direct distances.
//!
//! The fast backends compute logits as one f32 GEMM, `c_dot x.y - c_norm |y|^2`. Its
//! absolute error is about eps * |x| |y| * alpha / sigma^2, which at late t dwarfs the true
//! logit gap between near-duplicate samples: the weight is then split between them
//! arbitrarily (docs/NUMERICS.md measured velocities off by 2x at 1 - t = 1e-5). Late t is
//! also where the posterior lives on a handful of samples, so the exact answer is cheap:
//!
//! 1. The fast result's top-1 row a is an anchor. Its distance d_a = |x - alpha y_a| is
//!    recomputed in f64. Every row with d_i^2 >= rho^2 = d_a^2 + 2 sigma^2 M has a logit at
//!    least M below the anchor's, so all such rows together weigh at most n e^-M relative
//!    to the maximum; with M = ln n + 30 that is e^-30 (1e-13), invisible in f32.
//! 2. Candidates with d_i < rho are found without touching most rows: by the reverse
//!    triangle inequality their norms |y_i| lie within rho / alpha of |x| / alpha (rows
//!    sorted by norm: two binary searches), and the squared distance of their projections
//!    on K orthonormal directions (a PCA of the data, built the first time it is needed)
//!    is at most (rho / alpha)^2.
//! 3. The survivors' distances are computed exactly in f64, the rows beyond rho dropped, and
//!    the posterior (mean and every statistic) is their softmax in f64.
//!
//! Where a pruned pass recorded the rows it kept for the query (the projected passes, the
//! late ones, do: a few rows a query), they are the survivors instead of step 2's screen.
//! They hold every row whose f32 logit is within ln(n / 2^-31) + 2 err of the f32 maximum
//! (err the logits' rounding bound, `prune::sparse::Setup::thresholds`), hence every row
//! whose exact logit is within ln(n / 2^-31) of the exact maximum; its certificate bounds
//! the others' weight by 2^-31 of the normaliser instead of e^-30, both invisible in f32.
//! On Fashion-MNIST (B = 256) the screen took 6 - 13 ms a call from t = 0.8 (up to 40% of a
//! pruned evaluation), and its basis 60 ms once; the kept rows' distances take under 1 ms.
//!
//! When the norm band or the survivors are too many (early and mid t: the posterior is
//! spread, the f32 errors average out and the fast result already agrees with f64 to
//! about 1e-6), the fast result is kept. A dataset streamed from disk is refined the same
//! way, its candidate rows read from the file (the projections cost one pass over it, made
//! the first time a concentrated query comes; with the norm index, 40 bytes a row in
//! memory).

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::Result;
use crate::oracle::prune::{dot_f64, dot_lanes, orthonormalise, sum_lanes};
use crate::oracle::{Posterior, QueryStats};
use crate::path::PathCoefs;

/// Directions of the projection screen.
const K: usize = 8;
/// Rows used to find the directions (evenly spaced through the dataset).
const PCA_ROWS: usize = 2048;
/// Subspace iterations of the PCA (the screen needs good, not converged, directions).
const PCA_ITERATIONS: usize = 6;
/// Sample rows per parallel task of a PCA iteration.
const PCA_CHUNK: usize = 256;
/// Most rows in the norm band for which the projection screen runs.
const BAND_CAP: usize = 8192;
/// Most candidates whose exact distances are computed.
const SURVIVOR_CAP: usize = 512;
/// ... and where the fast logits' rounding reaches `ROUNDING_NATS` (at most 4096 D f64
/// products per query, 2 - 3 ms at D = 784). A cluster of near-duplicates lies whole inside
/// the radius: 800 copies of a point, where f32 logits cannot tell them apart, went
/// unrefined under the smaller cap (`tests/extremes.rs`). Where the rounding is far below
/// a nat (a spread posterior at mid t) the fast result already agrees with f64, and the
/// small cap keeps the refinement off small datasets there.
const ROUNDING_SURVIVOR_CAP: usize = 4096;
/// Bound on the fast logits' f32 rounding (nats) from which `ROUNDING_SURVIVOR_CAP` applies.
const ROUNDING_NATS: f64 = 1e-3;
/// Logit margin beyond ln n: the dropped rows weigh at most e^-30 of the maximum.
const MARGIN: f64 = 30.0;

/// The screen's index over one dataset's stored rows.
pub struct Refiner {
    /// (|y_i|, i), ascending by norm (f32: 8 bytes a row, the band is widened for it).
    by_norm: Vec<(f32, u32)>,
    /// Built on first use: K x D directions and the N x K projections of the rows.
    basis: Option<Basis>,
}

struct Basis {
    dirs: Vec<f64>,
    /// N x K, each computed in f64 and rounded once to f32 (half the memory: at most
    /// 2^-24 |p| <= 2^-24 |y_i| off, which the screen allows for).
    proj: Vec<f32>,
}

/// What the refinement needs of one query.
pub struct RefineQuery<'a> {
    /// The centred query `x - alpha * mean`, in f64.
    pub x: &'a [f64],
    pub alpha: f64,
    /// sigma as the logits use it (`PathCoefs::sigma_safe`).
    pub sigma: f64,
    /// Rows the posterior is over (a class, or all).
    pub rows: Range<usize>,
    /// The fast result's top-1 stored row.
    pub anchor: usize,
    /// The stored rows a pruned pass kept for this query, where it recorded them: a
    /// superset of the rows that can matter (see the module docs), which replaces the
    /// projection screen.
    pub kept: Option<&'a [u32]>,
}

impl Refiner {
    pub fn new(ds: &Dataset) -> Self {
        let mut by_norm: Vec<(f32, u32)> = ds
            .sq_norms()
            .iter()
            .enumerate()
            .map(|(i, &s)| (s.sqrt(), i as u32))
            .collect();
        by_norm.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Refiner {
            by_norm,
            basis: None,
        }
    }

    /// The screen's first cut for `q`: (rho^2, r, |x| / alpha, the norm band lo..hi, the
    /// survivors' cap), or None where the query cannot be refined or its band holds over
    /// `BAND_CAP` rows.
    fn band(&self, ds: &Dataset, q: &RefineQuery<'_>) -> Result<Option<Band>> {
        if q.alpha.is_nan() || q.alpha <= 0.0 || q.rows.is_empty() {
            return Ok(None);
        }
        let n = q.rows.len() as f64;
        let two_s2 = 2.0 * q.sigma * q.sigma;
        let rho2 = dist2(ds, q, &mut Vec::new(), q.anchor)? + two_s2 * (n.ln() + MARGIN);
        // In units of y: candidates satisfy |x / alpha - y| < r.
        let r = rho2.sqrt() / q.alpha;
        let x_norm = dot_lanes(q.x, q.x, |v| v).sqrt() / q.alpha;
        // The stored norms are f32 roundings: widen the band by their relative error.
        let slack = 1e-6 * (x_norm + r);
        let lo = self
            .by_norm
            .partition_point(|e| (e.0 as f64) < x_norm - r - slack);
        let hi = self
            .by_norm
            .partition_point(|e| e.0 as f64 <= x_norm + r + slack);
        // The fast logits c_dot x.y - c_norm |y|^2 (c_dot = alpha / sigma^2, c_norm =
        // alpha^2 / (2 sigma^2), |x| = alpha x_norm, |y| at most the band's largest norm)
        // carry about 2^-24 of their terms' magnitude.
        let y_max = if hi > lo {
            self.by_norm[hi - 1].0 as f64
        } else {
            0.0
        };
        let rounding = f64::powi(2.0, -24) * q.alpha * q.alpha / (q.sigma * q.sigma)
            * (x_norm * y_max + 0.5 * y_max * y_max);
        let cap = if rounding >= ROUNDING_NATS {
            ROUNDING_SURVIVOR_CAP
        } else {
            SURVIVOR_CAP
        };
        Ok((hi - lo <= BAND_CAP).then_some(Band {
            rho2,
            r,
            x_norm,
            rows: lo..hi,
            cap,
        }))
    }

    /// The exact posterior of `q` as (centred mean in f64, stats with stored-row top-1), or
    /// None when the screen is not selective enough to be cheap. The mean stays f64: at late
    /// t the velocity (x1_hat - x) / sigma would magnify its f32 rounding. The basis must
    /// exist wherever the query's band needs it ([`refine_batch`] builds it first; read-only
    /// here, so that queries refine in parallel).
    /// `band` is the query's [`Self::band`].
    fn refine(
        &self,
        ds: &Dataset,
        q: &RefineQuery<'_>,
        band: Option<Band>,
    ) -> Result<Option<(Vec<f64>, QueryStats)>> {
        let Some(band) = band else {
            return Ok(None);
        };
        let mut row = Vec::new();
        let two_s2 = 2.0 * q.sigma * q.sigma;
        let d = ds.dim();
        let rho2 = band.rho2;
        let survivors = match band.kept(q) {
            Some(kept) => kept
                .iter()
                .map(|&i| i as usize)
                .filter(|i| q.rows.contains(i))
                .collect(),
            None => match self.screen(q, band) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        // Exact distances; keep the rows inside rho (the anchor always is).
        let mut cands = Vec::with_capacity(survivors.len());
        for i in survivors {
            let d2 = dist2(ds, q, &mut row, i)?;
            if d2 < rho2 {
                cands.push((i, d2));
            }
        }
        if cands.is_empty() {
            return Ok(None);
        }
        // Ascending row order: ties go to the smaller row, as in the backends.
        cands.sort_by_key(|c| c.0);
        let d2_min = cands.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
        let e: Vec<f64> = cands
            .iter()
            .map(|c| (-(c.1 - d2_min) / two_s2).exp())
            .collect();
        let z: f64 = e.iter().sum();
        let mut mean = vec![0.0f64; d];
        let mut ys = Vec::with_capacity(cands.len());
        for (&(i, _), &ei) in cands.iter().zip(&e) {
            read_rows(ds, i..i + 1, &mut row)?;
            let y: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for (m, v) in mean.iter_mut().zip(&y) {
                *m += ei / z * v;
            }
            ys.push(y);
        }
        let (top, _) = cands
            .iter()
            .enumerate()
            .fold((0, f64::INFINITY), |best, (k, c)| {
                if c.1 < best.1 {
                    (k, c.1)
                } else {
                    best
                }
            });
        let w: Vec<f64> = e.iter().map(|e| e / z).collect();
        let variance = w
            .iter()
            .zip(&ys)
            .map(|(wi, y)| {
                wi * y
                    .iter()
                    .zip(&mean)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / d as f64;
        let stats = QueryStats {
            top1_weight: w[top] as f32,
            top1_index: cands[top].0 as u32,
            entropy: (-w
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>())
            .max(0.0) as f32,
            ess: (1.0 / w.iter().map(|p| p * p).sum::<f64>()) as f32,
            posterior_variance: variance as f32,
            ..QueryStats::default()
        };
        Ok(Some((mean, stats)))
    }

    /// Step 2's screen: the rows of the norm band whose projections lie within r of the
    /// query's (in units of y), or None where they are over the band's cap.
    fn screen(&self, q: &RefineQuery<'_>, band: Band) -> Option<Vec<usize>> {
        let Band {
            r,
            x_norm,
            rows: band,
            cap,
            ..
        } = band;
        let basis = self.basis.as_ref().expect("built for every band");
        let d = q.x.len();
        let px: Vec<f64> = (0..K)
            .map(|k| {
                let dir = &basis.dirs[k * d..(k + 1) * d];
                dir.iter().zip(q.x).map(|(a, b)| a * b).sum::<f64>() / q.alpha
            })
            .collect();
        let mut survivors = Vec::new();
        for &(norm, i) in &self.by_norm[band] {
            let i = i as usize;
            if !q.rows.contains(&i) {
                continue;
            }
            // The f32 projections are each off by at most 2^-24 |y_i|: widen by K of them.
            let ri = r + (K as f64).sqrt() * 6e-8 * norm as f64 * (1.0 + 1e-6);
            let p = &basis.proj[i * K..(i + 1) * K];
            let s: f64 = p
                .iter()
                .zip(&px)
                .map(|(&a, b)| (a as f64 - b).powi(2))
                .sum();
            if s <= ri * ri * (1.0 + 1e-9) + 1e-12 * (x_norm * x_norm + 1.0) {
                survivors.push(i);
                if survivors.len() > cap {
                    return None;
                }
            }
        }
        Some(survivors)
    }
}

/// The norm band of one query (see `Refiner::band`).
struct Band {
    rho2: f64,
    r: f64,
    x_norm: f64,
    rows: Range<usize>,
    /// most survivors worth their exact distances (`SURVIVOR_CAP`, or
    /// `ROUNDING_SURVIVOR_CAP` where the fast logits' rounding reaches `ROUNDING_NATS`)
    cap: usize,
}

impl Band {
    /// The rows a pruned pass kept for `q`, where it recorded them and they are within
    /// the cap: then they are the survivors, and no screen runs.
    fn kept<'q>(&self, q: &RefineQuery<'q>) -> Option<&'q [u32]> {
        q.kept.filter(|k| k.len() <= self.cap)
    }
}

/// |x - alpha y_i|^2 in f64 for the query `q` and stored row i (read into `row`).
fn dist2(ds: &Dataset, q: &RefineQuery<'_>, row: &mut Vec<f32>, i: usize) -> Result<f64> {
    read_rows(ds, i..i + 1, row)?;
    // (In lanes: one running f64 sum waits out the add's latency at every term; late in a
    // trajectory the bands' sums over D took most of the refinement's time.)
    Ok(sum_lanes(q.x, row, |x, y| (x - q.alpha * y as f64).powi(2)))
}

/// Refines every query of a fast result `post` (over `rows`, queries `x` in user
/// coordinates at path coefficients `coefs`) where the screen is cheap: replaces their
/// stats (keeping the fast pass's pruning certificate and shares) and returns their f64
/// centred means (None where the fast result stands) and how many were refined.
pub fn refine_batch(
    refiner: &mut Refiner,
    ds: &Dataset,
    x: &[f32],
    coefs: &[PathCoefs],
    rows: &Range<usize>,
    kept: Option<&[Vec<u32>]>,
    post: &mut Posterior,
) -> Result<(Vec<Option<Vec<f64>>>, u64)> {
    let dim = ds.dim();
    // The centred queries in f64 (the backends got them rounded to f32).
    let xc: Vec<Vec<f64>> = coefs
        .par_iter()
        .enumerate()
        .map(|(q, c)| {
            x[q * dim..(q + 1) * dim]
                .iter()
                .zip(ds.mean())
                .map(|(&v, &m)| v as f64 - c.alpha * m as f64)
                .collect()
        })
        .collect();
    let query = |q: usize| RefineQuery {
        x: &xc[q],
        alpha: coefs[q].alpha,
        sigma: coefs[q].sigma_safe(),
        rows: rows.clone(),
        anchor: post.stats[q].top1_index as usize,
        kept: kept.and_then(|k| k.get(q)).map(Vec::as_slice),
    };
    // Every query's band, in parallel (late in a trajectory, one at a time on one thread,
    // they took 0.3 - 0.6 ms of a 6 - 9 ms call on Fashion-MNIST at B = 256). The basis
    // next, where some query's band needs its screen (not where a pruned pass kept few
    // enough candidates); then every query on its own thread (each result depends on its
    // query alone).
    let bands: Vec<Option<Band>> = (0..coefs.len())
        .into_par_iter()
        .map(|q| refiner.band(ds, &query(q)))
        .collect::<Result<_>>()?;
    let screens =
        |(q, b): (usize, &Option<Band>)| b.as_ref().is_some_and(|b| b.kept(&query(q)).is_none());
    if refiner.basis.is_none() && bands.iter().enumerate().any(screens) {
        refiner.basis = Some(Basis::new(ds)?);
    }
    let refiner = &*refiner;
    let results: Vec<Option<(Vec<f64>, QueryStats)>> = bands
        .into_par_iter()
        .enumerate()
        .map(|(q, band)| refiner.refine(ds, &query(q), band))
        .collect::<Result<_>>()?;
    let mut exact_means = vec![None; coefs.len()];
    let mut refined = 0;
    for (q, result) in results.into_iter().enumerate() {
        if let Some((mean, stats)) = result {
            exact_means[q] = Some(mean);
            let fast = post.stats[q];
            post.stats[q] = QueryStats {
                skipped_mass_bound: fast.skipped_mass_bound,
                tiles_skipped: fast.tiles_skipped,
                samples_skipped: fast.samples_skipped,
                ..stats
            };
            refined += 1;
        }
    }
    Ok((exact_means, refined))
}

impl Basis {
    /// K orthonormal directions of largest variance of the stored rows (subspace iteration
    /// on an evenly spaced subset, seeded: deterministic), and every row's projections.
    fn new(ds: &Dataset) -> Result<Self> {
        let (n, d) = (ds.n_samples(), ds.dim());
        let step = n.div_ceil(PCA_ROWS).max(1);
        let mut row = Vec::new();
        let mut sample: Vec<Vec<f64>> = Vec::with_capacity(n.div_ceil(step));
        for i in (0..n).step_by(step) {
            read_rows(ds, i..i + 1, &mut row)?;
            sample.push(row.iter().map(|&v| v as f64).collect());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
        // At most d orthonormal directions exist; the rows beyond stay zero, which keeps
        // |P v| <= |v| (their projections are 0 for queries and rows alike).
        let used = K.min(d) * d;
        let mut dirs = vec![0.0f64; K * d];
        dirs[..used]
            .iter_mut()
            .for_each(|v| *v = rng.random::<f64>() - 0.5);
        orthonormalise(&mut dirs[..used], d, &mut rng);
        for _ in 0..PCA_ITERATIONS {
            // dirs <- Y^T Y dirs, then orthonormalised.
            // In fixed chunks of the sample on every thread, summed in chunk order: the
            // same bits whatever the thread count.
            let parts: Vec<Vec<f64>> = sample
                .par_chunks(PCA_CHUNK)
                .map(|chunk| {
                    let mut part = vec![0.0f64; K * d];
                    for y in chunk {
                        for k in 0..K {
                            let c = dot_f64(&dirs[k * d..(k + 1) * d], y);
                            for (o, v) in part[k * d..(k + 1) * d].iter_mut().zip(y) {
                                *o += c * v;
                            }
                        }
                    }
                    part
                })
                .collect();
            let mut next = vec![0.0f64; K * d];
            for part in parts {
                next.iter_mut().zip(part).for_each(|(o, v)| *o += v);
            }
            orthonormalise(&mut next[..used], d, &mut rng);
            dirs = next;
        }
        let project = |y: &[f32], out: &mut [f32]| project_row(&dirs, y, out);
        if ds.disk().is_none() {
            // In memory: every thread converts and projects its own rows (copying them
            // into one block first took most of the 0.1 s this step cost on
            // Fashion-MNIST).
            let mut proj = vec![0.0f32; n * K];
            proj.par_chunks_mut(K * PCA_CHUNK)
                .enumerate()
                .for_each(|(c, out)| {
                    let mut y = vec![0.0f32; d];
                    for (i, o) in out.chunks_exact_mut(K).enumerate() {
                        ds.stored_row(c * PCA_CHUNK + i, &mut y);
                        project(&y, o);
                    }
                });
            return Ok(Basis { dirs, proj });
        }
        // Projections block by block (a streamed dataset is read once, in tiles).
        let mut proj = Vec::with_capacity(n * K);
        let block = 4096;
        let mut values = Vec::new();
        for start in (0..n).step_by(block) {
            let rows = start..(start + block).min(n);
            read_rows(ds, rows, &mut values)?;
            let mut part = vec![0.0f32; values.len() / d * K];
            values
                .par_chunks(d)
                .zip(part.par_chunks_mut(K))
                .for_each(|(y, o)| project(y, o));
            proj.extend(part);
        }
        Ok(Basis { dirs, proj })
    }
}

/// One row's projections on the K directions `dirs` (K rows of y's length), each
/// [`dot_lanes`] in f64 rounded once to f32: with AVX-512 the eight running sums are one
/// vector (products and sums in the same order, so the same bits), else `dot_lanes`.
fn project_row(dirs: &[f64], y: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        unsafe { project_row_avx512(dirs, y, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: as above.
        unsafe { project_row_avx2(dirs, y, out) };
        return;
    }
    for (o, dir) in out.iter_mut().zip(dirs.chunks_exact(y.len())) {
        *o = dot_lanes(dir, y, |v| v as f64) as f32;
    }
}

/// [`project_row`] with each direction's eight lanes in two AVX2 vectors (lanes 0 - 3 and
/// 4 - 7; multiplies and adds apart, as `dot_lanes`). LLVM vectorized `dot_lanes` of an
/// f32 row two lanes at a time, with shuffles: the projections of Fashion-MNIST's rows
/// took about 0.4 s of CPU, at the first concentrated query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn project_row_avx2(dirs: &[f64], y: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = y.len();
    let full = d / 8 * 8;
    for (o, dir) in out.iter_mut().zip(dirs.chunks_exact(d)) {
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        // SAFETY: the loads read 8 values at i..i + 8 <= full <= d, inside y and dir.
        unsafe {
            while i < full {
                let yv = _mm256_loadu_ps(y.as_ptr().add(i));
                let y_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(yv));
                let y_hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(yv));
                let d_lo = _mm256_loadu_pd(dir.as_ptr().add(i));
                let d_hi = _mm256_loadu_pd(dir.as_ptr().add(i + 4));
                lo = _mm256_add_pd(lo, _mm256_mul_pd(d_lo, y_lo));
                hi = _mm256_add_pd(hi, _mm256_mul_pd(d_hi, y_hi));
                i += 8;
            }
        }
        let mut l = [0.0f64; 8];
        // SAFETY: l holds 8 values, 4 per store.
        unsafe {
            _mm256_storeu_pd(l.as_mut_ptr(), lo);
            _mm256_storeu_pd(l.as_mut_ptr().add(4), hi);
        }
        *o = lanes_then_tail(&l, dir, y, full);
    }
}

/// The vector kernels' end of one projection, as `dot_lanes` ends: the eight lanes summed
/// in its order, then the coordinates from `full` one by one, rounded once to f32.
fn lanes_then_tail(l: &[f64; 8], dir: &[f64], y: &[f32], full: usize) -> f32 {
    let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for (&a, &b) in dir[full..].iter().zip(&y[full..]) {
        s += a * b as f64;
    }
    s as f32
}

/// [`project_row`] with each direction's eight lanes in one AVX-512 vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn project_row_avx512(dirs: &[f64], y: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = y.len();
    let full = d / 8 * 8;
    for (o, dir) in out.iter_mut().zip(dirs.chunks_exact(d)) {
        let mut acc = _mm512_setzero_pd();
        let mut i = 0;
        // SAFETY: the loads read 8 values at i..i + 8 <= full <= d, inside y and dir.
        unsafe {
            while i < full {
                let yv = _mm512_cvtps_pd(_mm256_loadu_ps(y.as_ptr().add(i)));
                let xv = _mm512_loadu_pd(dir.as_ptr().add(i));
                acc = _mm512_add_pd(acc, _mm512_mul_pd(xv, yv));
                i += 8;
            }
        }
        let mut lanes = [0.0f64; 8];
        // SAFETY: lanes holds 8 values.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), acc) };
        *o = lanes_then_tail(&lanes, dir, y, full);
    }
}

/// The stored (centred) values of `rows` as f32, row-major: from memory, or read from the
/// file of a streamed dataset.
fn read_rows(ds: &Dataset, rows: Range<usize>, out: &mut Vec<f32>) -> Result<()> {
    if let Some(disk) = ds.disk() {
        return disk.read_f32(rows, out);
    }
    let d = ds.dim();
    out.clear();
    out.resize(rows.len() * d, 0.0);
    for (i, dst) in rows.zip(out.chunks_mut(d)) {
        ds.stored_row(i, dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's projections (whichever version this CPU runs) are bitwise `dot_lanes`'s,
    /// at lengths around the lane count.
    #[test]
    fn project_row_is_bitwise_dot_lanes() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for d in [1usize, 7, 8, 9, 17, 784] {
            let dirs: Vec<f64> = (0..K * d).map(|_| rng.random::<f64>() - 0.5).collect();
            let y: Vec<f32> = (0..d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let mut out = vec![f32::NAN; K];
            project_row(&dirs, &y, &mut out);
            for (o, dir) in out.iter().zip(dirs.chunks_exact(d)) {
                let want = dot_lanes(dir, &y, |v| v as f64) as f32;
                assert_eq!(o.to_bits(), want.to_bits(), "d {d}");
            }
        }
    }
}
