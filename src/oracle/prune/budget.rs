//! The sparse pass's drop cut from a budget on the dropped mass, not a per-sample threshold.
//!
//! The per-sample threshold drops a weight below `SAMPLE_BUDGET` / n of the maximum's: safe
//! whatever the other weights are, since n of them stay under `SAMPLE_BUDGET`. But the
//! dropped weights spread over many nats below the threshold and the normaliser is often
//! far above the maximum's weight (early in a trajectory hundreds of samples count), so
//! their total is usually a small part of the budget. Here each query's logits (after phase
//! 1, its chunk maximum m known) are counted into buckets of `BUCKET` nats from `DEPTH`
//! nats under the per-sample threshold up to m; the cut is the highest bucket edge where
//! the buckets' mass bound under it stays within the chunk's budget share of the lower
//! bound on the chunk's normaliser that the same counts give. Measured with numpy on
//! Fashion-MNIST (x_t = t y + (1 - t) eps, 8 queries): the kept share at t = 0.22, 0.26,
//! 0.3, 0.35 falls from 0.69, 0.49, 0.21, 0.065 (per-sample) to 0.53, 0.37, 0.14, 0.035.
//!
//! **Why the cut is safe.** A logit v of a bucket lies below the bucket's upper edge, so
//! its weight is below exp(edge - m); each bucket is bounded by the edge of the bucket
//! above it, which also covers the rounding of v's bucket number (far under a bucket's
//! width), and everything under the histogram's floor by the floor's next edge. The cut
//! is a bucket's lower edge and the bound counts that bucket too. Every f32 weight stands
//! for an exact one within exp(2 err) of it, and so does the normaliser's lower bound: the
//! budget test carries exp(4 err). The chunk's normaliser only grows in the final one
//! (in the final maximum's units), so the chunks' budget shares (rows in the chunk / rows)
//! add up to `SAMPLE_BUDGET` of the final normaliser, the per-sample threshold's guarantee.
//! The cut is never below the per-sample threshold, and the certificate for the chunk is
//! the smaller of this bound and phase 2's own count.

use std::ops::Range;

use rayon::prelude::*;

use super::sparse::TILE;
use crate::oracle::simd::multiversion;

/// Four interleaved counts per bucket (at most 256 buckets).
type Hist = [[u32; 256]; 4];

/// Width of a bucket, nats: the cut lands within two buckets of the ideal one.
const BUCKET: f64 = 0.25;
/// How far under the per-sample threshold the buckets reach: every weight below the floor
/// is bounded by the floor's weight, and n of those stay under exp(-DEPTH) = 3e-4 of the
/// budget.
const DEPTH: f64 = 8.0;

/// One query's buckets: bucket 0 holds the logits under `floor`, bucket i >= 1 those in
/// [floor + (i - 1) BUCKET, floor + i BUCKET); the last reaches the maximum.
#[derive(Clone, Copy)]
struct Buckets {
    /// the floor, relative to the maximum (nats)
    floor: f64,
    /// the floor as an f32 logit
    origin: f32,
    len: usize,
}

impl Buckets {
    fn new(max: f32, threshold: f64) -> Buckets {
        let floor = threshold - DEPTH;
        Buckets {
            floor,
            origin: (max as f64 + floor) as f32,
            // (under 256 for up to 1e9 rows: floor >= ln(2^-31 / 1e9) - MAX_ERR - DEPTH)
            len: ((-floor / BUCKET).ceil() as usize + 3).min(256),
        }
    }

    /// Counts `row` (its largest value `max`) into `hist`: all into bucket 0 at once where
    /// `max` goes there (bucket numbers rise with the value).
    fn count(&self, row: &[f32], max: f32, hist: &mut Hist) {
        let top = (self.len - 1) as f32;
        if bucket_of(max, self.origin, top) == 0 {
            hist[0][0] += row.len() as u32;
            return;
        }
        count_into(row, self.origin, top, hist);
    }

    /// The weight bound of bucket i (units of the maximum's weight): the upper edge of
    /// bucket i + 1.
    fn bound(&self, i: usize) -> f64 {
        (self.floor + (i + 1) as f64 * BUCKET).exp()
    }
}

multiversion! {
    /// Counts `row` into `hist`: logit v goes to bucket (v - origin) / BUCKET + 1, clamped
    /// to 0..=top.
    fn count_into(row: &[f32], origin: f32, top: f32, hist: &mut Hist) = count_into_body;
}

/// [`count_into`]: the bucket numbers of a tile's width first (vectorized), then, per
/// block of 16, one add where all of them are 0 (most are, away from the query's best
/// rows: the rows lie in tile order, so the far ones come in runs), else four
/// interleaved counts, so that consecutive logits in one bucket do not wait on each
/// other's increment.
#[inline(always)]
fn count_into_body(row: &[f32], origin: f32, top: f32, hist: &mut Hist) {
    const BLOCK: usize = 16;
    // i32 bucket numbers: the conversion from f32 vectorizes (to u8 it went lane by lane).
    let mut idx = [0i32; TILE];
    for chunk in row.chunks(TILE) {
        let idx = &mut idx[..chunk.len()];
        for (i, &v) in idx.iter_mut().zip(chunk) {
            *i = bucket_of(v, origin, top);
        }
        let mut blocks = idx.chunks_exact(BLOCK);
        for b in &mut blocks {
            if b.iter().fold(0i32, |a, &i| a | i) == 0 {
                hist[0][0] += BLOCK as u32;
                continue;
            }
            for c in b.chunks_exact(4) {
                for (h, &i) in hist.iter_mut().zip(c) {
                    h[i as usize] += 1;
                }
            }
        }
        for &i in blocks.remainder() {
            hist[0][i as usize] += 1;
        }
    }
}

/// Logit v's bucket: (v - origin) / BUCKET + 1, clamped to 0..=top (a NaN to 0).
#[inline(always)]
fn bucket_of(v: f32, origin: f32, top: f32) -> i32 {
    let b = (v - origin) * (1.0 / BUCKET) as f32 + 1.0;
    let b = if b > top { top } else { b.max(0.0) };
    // SAFETY: b is in [0, top], top <= 255 (max turns a NaN into 0): in i32's range, so
    // the plain conversion (no saturation steps) is exact.
    unsafe { b.to_int_unchecked::<i32>() }
}

/// Per query: the ln cut relative to its chunk maximum, and where it was raised above the
/// threshold, the bound on what it drops (units of the maximum's weight).
pub(super) struct Cuts {
    pub cut: Vec<f64>,
    pub bound: Vec<Option<f64>>,
}

impl Cuts {
    /// The per-sample thresholds, not raised.
    pub fn none(thresholds: &[f64]) -> Cuts {
        Cuts {
            cut: thresholds.to_vec(),
            bound: vec![None; thresholds.len()],
        }
    }
}

/// One query group's phase-1 logits over a block of positions, as the sparse pass lays
/// them out: tile by tile (`TILE` positions), in each the rows of its queries.
pub(super) struct BlockView<'a> {
    pub queries: Range<usize>,
    pub block_len: usize,
    pub logits: &'a [f32],
    /// per tile of `TILE` rows and query (tile-major), the largest value of the row
    pub row_max: &'a [f32],
}

/// The cuts for a chunk from its phase-1 logits (`views`), the queries' chunk maxima,
/// per-sample ln thresholds and f32 logit error bounds `err`, the dropped mass within
/// `budget` (the chunk's share of `SAMPLE_BUDGET`) of the normaliser.
///
/// With `screened`, the logits under the per-sample threshold may be screening bounds
/// (at or above the exact logit; every value from the threshold up is exact, see
/// `sparse::screened_exact`): they still bound the dropped mass from above, but the
/// normaliser's lower bound then takes only the buckets from one above the threshold's
/// (one more for the rounding of a value's bucket number).
pub(super) fn cuts(
    views: &[BlockView<'_>],
    best: &[(f32, u32)],
    thresholds: &[f64],
    err: &[f64],
    budget: f64,
    screened: bool,
) -> Cuts {
    let buckets: Vec<Buckets> = best
        .iter()
        .zip(thresholds)
        .map(|(b, &t)| Buckets::new(b.0, t))
        .collect();
    let counts: Vec<Vec<Hist>> = views
        .par_iter()
        .map(|v| {
            let n_q = v.queries.len();
            let mut hist = vec![[[0u32; 256]; 4]; n_q];
            let tiles = (0..v.block_len).step_by(TILE);
            for ((t0, w), tops) in tiles
                .zip(v.logits.chunks(n_q * TILE))
                .zip(v.row_max.chunks_exact(n_q))
            {
                let nt = TILE.min(v.block_len - t0);
                for (local, (row, &top)) in w.chunks_exact(nt).zip(tops).enumerate() {
                    buckets[v.queries.start + local].count(row, top, &mut hist[local]);
                }
            }
            hist
        })
        .collect();
    let mut merged: Vec<Vec<u64>> = buckets.iter().map(|b| vec![0; b.len]).collect();
    for (v, hist) in views.iter().zip(&counts) {
        for (q, h) in v.queries.clone().zip(hist) {
            for (i, m) in merged[q].iter_mut().enumerate() {
                *m += h.iter().map(|l| l[i] as u64).sum::<u64>();
            }
        }
    }
    let mut out = Cuts::none(thresholds);
    for (q, (b, hist)) in buckets.iter().zip(&merged).enumerate() {
        // The normaliser's lower bound: each logit at its bucket's lower edge.
        let exact_from = if screened {
            (DEPTH / BUCKET) as usize + 2
        } else {
            1
        };
        let z_low: f64 = hist
            .iter()
            .enumerate()
            .skip(exact_from)
            .map(|(i, &c)| c as f64 * (b.floor + (i - 1) as f64 * BUCKET).exp())
            .sum();
        let allowed = budget * z_low * (-4.0 * err[q]).exp();
        // The highest bucket j whose bound, with every bucket under it, fits: the cut is
        // its lower edge.
        let mut mass = 0.0;
        let mut best_j = None;
        for (j, &c) in hist.iter().enumerate() {
            mass += c as f64 * b.bound(j);
            if mass > allowed {
                break;
            }
            best_j = Some((j, mass));
        }
        if let Some((j, mass)) = best_j.filter(|&(j, _)| j >= 1) {
            let cut = b.floor + (j - 1) as f64 * BUCKET;
            if cut > thresholds[q] {
                out.cut[q] = cut;
                out.bound[q] = Some(mass);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts (whichever version this CPU runs) equal one bucket computation per
    /// logit, on rows with runs under the floor, above the top and in between.
    #[test]
    fn counts_match_a_plain_count() {
        let mut state = 99u64;
        let mut next = || crate::oracle::prune::tests::lcg(&mut state);
        for n in [0usize, 1, 15, 16, 17, 255, 256, 257, 700] {
            let row: Vec<f32> = (0..n)
                .map(|j| match (j / 40) % 3 {
                    0 => -100.0 + next() as f32,
                    1 => 20.0 * next() as f32,
                    _ => 100.0,
                })
                .collect();
            let (origin, top) = (-10.0f32, 60.0f32);
            let mut hist = [[0u32; 256]; 4];
            count_into(&row, origin, top, &mut hist);
            let mut want = [0u32; 256];
            for &v in &row {
                want[((v - origin) * (1.0 / BUCKET) as f32 + 1.0).clamp(0.0, top) as usize] += 1;
            }
            // And through `Buckets::count` with the row's maximum, on the row and on its
            // first run alone (all under the floor: counted without reading).
            let buckets = Buckets {
                floor: 0.0,
                origin,
                len: top as usize + 1,
            };
            let max = |r: &[f32]| r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut by_max = [[0u32; 256]; 4];
            buckets.count(&row, max(&row), &mut by_max);
            let run = &row[..n.min(40)];
            let mut run_hist = [[0u32; 256]; 4];
            buckets.count(run, max(run), &mut run_hist);
            assert_eq!(
                run_hist[0][0] as usize,
                run.len(),
                "n {n}: the run under the floor"
            );
            for (i, &w) in want.iter().enumerate() {
                let sum = |h: &Hist| h.iter().map(|h| h[i]).sum::<u32>();
                assert_eq!(sum(&hist), w, "n {n} bucket {i}");
                assert_eq!(sum(&by_max), w, "n {n} bucket {i} (count)");
            }
        }
    }

    /// The cut's bound holds against the exact sum of the weights it drops, and the cut
    /// drops weights the per-sample threshold keeps where many small weights count; also
    /// where the values under the threshold are only upper bounds (`screened`: each
    /// raised by up to 30 nats, staying under the threshold).
    #[test]
    fn the_bound_covers_what_the_cut_drops() {
        for screened in [false, true] {
            bound_covers_what_the_cut_drops(screened);
        }
    }

    fn bound_covers_what_the_cut_drops(screened: bool) {
        let mut state = 12345u64;
        // uniform in [0, 1)
        let mut next = || (crate::oracle::prune::tests::lcg(&mut state) + 1.0) / 2.0;
        let mut raised = 0;
        for case in 0..40 {
            let n = 1 + (next() * 3000.0) as usize;
            let spread = 1.0 + next() * 60.0;
            let n_q = 1 + case % 3;
            // Logits in tile-major layout over one block, each query's maximum at 0.
            let mut rows = vec![vec![0.0f32; n]; n_q];
            for row in rows.iter_mut() {
                for v in row.iter_mut() {
                    *v = -(spread * next()) as f32;
                }
                row[(next() * n as f64) as usize % n] = 0.0;
            }
            let threshold = (2f64.powi(-31) / n as f64).ln();
            // What the pass sees: with screening, bounds in place of the logits under the
            // threshold.
            let seen: Vec<Vec<f32>> = rows
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|&v| {
                            let lift = if screened { 30.0 * next() } else { 0.0 };
                            let under = (threshold - 1e-3).min(v as f64 + lift) as f32;
                            if (v as f64) < threshold {
                                under.max(v)
                            } else {
                                v
                            }
                        })
                        .collect()
                })
                .collect();
            let (mut logits, mut row_max) = (Vec::new(), Vec::new());
            for t0 in (0..n).step_by(TILE) {
                for row in &seen {
                    let part = &row[t0..(t0 + TILE).min(n)];
                    logits.extend_from_slice(part);
                    row_max.push(part.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
                }
            }
            let budget = 2f64.powi(-31);
            let views = [BlockView {
                queries: 0..n_q,
                block_len: n,
                logits: &logits,
                row_max: &row_max,
            }];
            let best = vec![(0.0f32, 0u32); n_q];
            let cuts = cuts(
                &views,
                &best,
                &vec![threshold; n_q],
                &vec![0.0; n_q],
                budget,
                screened,
            );
            for (q, row) in rows.iter().enumerate() {
                let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
                let dropped: f64 = row
                    .iter()
                    .filter(|&&v| (v as f64) < cuts.cut[q])
                    .map(|&v| (v as f64).exp())
                    .sum();
                assert!(cuts.cut[q] >= threshold);
                assert!(
                    dropped <= budget * z,
                    "case {case} (screened {screened}): {dropped} > {budget} * {z}"
                );
                if let Some(bound) = cuts.bound[q] {
                    assert!(
                        dropped <= bound,
                        "case {case} (screened {screened}): bound {bound} < {dropped}"
                    );
                    raised += 1;
                }
            }
        }
        assert!(
            raised > 10,
            "the cut rose above the threshold for {raised} queries (screened {screened})"
        );
    }
}
