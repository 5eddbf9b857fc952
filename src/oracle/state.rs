//! The online-softmax state of one query, and how two partial states merge.
//!
//! Over the logits s_i seen so far, with running max m and e_i = exp(s_i - m):
//!   l = sum e_i,  t = sum e_i (s_i - m),  q = sum e_i^2,  acc = sum e_i y_i.
//! Then top-1 weight = 1/l, entropy = ln l - t/l, ESS = l^2/q, posterior mean = acc/l.
//! When the max grows from m to m', every sum is rescaled by r = exp(m - m')
//! (q by r^2, and t also shifts by l (m - m')). Merging two states is that rescale and
//! an add: exact and associative, so tiles, devices and machines combine the same way.

use super::simd::multiversion;

/// Per-query diagnostics of the posterior.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct QueryStats {
    /// max_i w_i
    pub top1_weight: f32,
    /// index of the sample with the largest weight (the nearest after scaling)
    pub top1_index: u32,
    /// -sum w ln w (nats)
    pub entropy: f32,
    /// effective sample size 1 / sum w^2
    pub ess: f32,
    /// Exact pruning's certificate: an upper bound on the total weight (relative to the
    /// normaliser) of the samples whose logits were never computed. 0 on the dense path.
    pub skipped_mass_bound: f32,
    /// Share of the dataset's tiles skipped whole for this query (0 on the dense path).
    pub tiles_skipped: f32,
    /// Share of the samples left out of this query's weighted sum: logit never computed
    /// (bound-pruned) or computed and below the drop threshold (sparse pass); 0 when dense.
    pub samples_skipped: f32,
    /// tr Cov_w(y) / D = (sum_i w_i |y_i|^2 - |x1_hat|^2) / D: how far the posterior is
    /// from one sample (0 when one-hot). Translation-invariant, so backends compute it
    /// from the centred rows they hold.
    pub posterior_variance: f32,
}

/// Scalar part of one query's online-softmax state (the weighted sum lives beside it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxState {
    pub max: f32,
    pub sum: f32,
    pub sum_shifted_logit: f32,
    pub sum_sq: f32,
    pub argmax: u32,
}

impl Default for SoftmaxState {
    fn default() -> Self {
        SoftmaxState::EMPTY
    }
}

impl SoftmaxState {
    /// No sample seen yet.
    pub const EMPTY: SoftmaxState = SoftmaxState {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        sum_shifted_logit: 0.0,
        sum_sq: 0.0,
        argmax: 0,
    };

    /// Merges `other` into `self`; returns the factors (for self, for other) by which the
    /// two weighted sums must be scaled before they are added.
    pub fn merge(&mut self, other: &SoftmaxState) -> (f32, f32) {
        if other.sum == 0.0 {
            return (1.0, 0.0);
        }
        if self.sum == 0.0 {
            *self = *other;
            return (0.0, 1.0);
        }
        let m = self.max.max(other.max);
        let (ra, rb) = ((self.max - m).exp(), (other.max - m).exp());
        let ta = ra * (self.sum_shifted_logit + self.sum * (self.max - m));
        let tb = rb * (other.sum_shifted_logit + other.sum * (other.max - m));
        let argmax =
            if other.max > self.max || (other.max == self.max && other.argmax < self.argmax) {
                other.argmax
            } else {
                self.argmax
            };
        *self = SoftmaxState {
            max: m,
            sum: ra * self.sum + rb * other.sum,
            sum_shifted_logit: ta + tb,
            sum_sq: ra * ra * self.sum_sq + rb * rb * other.sum_sq,
            argmax,
        };
        (ra, rb)
    }

    pub fn stats(&self) -> QueryStats {
        let l = self.sum;
        QueryStats {
            top1_weight: 1.0 / l,
            top1_index: self.argmax,
            entropy: (l.ln() - self.sum_shifted_logit / l).max(0.0),
            ess: l * l / self.sum_sq,
            // Filled in by the backend once the posterior mean is known (NaN where a
            // backend does not compute it).
            posterior_variance: f32::NAN,
            ..QueryStats::default()
        }
    }
}

/// tr Cov_w(y) / D from sum_i e_i |y_i|^2 (`sum_norm`, weights e not yet normalised),
/// the softmax sum l and the normalised posterior mean (all of centred rows). Clamped at 0:
/// for a one-hot posterior the two terms cancel to within f32 rounding.
pub fn posterior_variance(sum_norm: f32, sum: f32, mean: &[f32]) -> f32 {
    let mean_sq: f32 = mean.iter().map(|m| m * m).sum();
    ((sum_norm / sum - mean_sq) / mean.len().max(1) as f32).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(logits: &[f32], offset: u32) -> SoftmaxState {
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let argmax = logits.iter().position(|&s| s == m).unwrap() as u32 + offset;
        let e: Vec<f32> = logits.iter().map(|s| (s - m).exp()).collect();
        SoftmaxState {
            max: m,
            sum: e.iter().sum(),
            sum_shifted_logit: e.iter().zip(logits).map(|(e, s)| e * (s - m)).sum(),
            sum_sq: e.iter().map(|e| e * e).sum(),
            argmax,
        }
    }

    #[test]
    fn merge_equals_state_of_concatenation() {
        let a = [0.5f32, -3.0, 2.0];
        let b = [4.0f32, 1.0];
        let mut s = state_of(&a, 0);
        s.merge(&state_of(&b, 3));
        let whole = state_of(&[0.5, -3.0, 2.0, 4.0, 1.0], 0);
        assert_eq!(s.argmax, whole.argmax);
        for (x, y) in [
            (s.sum, whole.sum),
            (s.sum_shifted_logit, whole.sum_shifted_logit),
            (s.sum_sq, whole.sum_sq),
            (s.max, whole.max),
        ] {
            assert!((x - y).abs() < 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
        let st = s.stats();
        let w: Vec<f64> = [0.5f64, -3.0, 2.0, 4.0, 1.0]
            .iter()
            .map(|s| s.exp())
            .collect();
        let z: f64 = w.iter().sum();
        let h: f64 = -w.iter().map(|x| x / z * (x / z).ln()).sum::<f64>();
        assert!((st.entropy as f64 - h).abs() < 1e-5);
        assert!((st.top1_weight as f64 - 4f64.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn merging_empty_is_identity() {
        let a = state_of(&[1.0, 2.0], 0);
        let mut e = SoftmaxState::EMPTY;
        assert_eq!(e.merge(&a), (0.0, 1.0));
        assert_eq!(e, a);
        let mut b = a;
        assert_eq!(b.merge(&SoftmaxState::EMPTY), (1.0, 0.0));
        assert_eq!(b, a);
    }
}

impl SoftmaxState {
    /// Absorbs one tile of logits (rows `first_row..`) in place: on return `logits[j]`
    /// holds `exp(s_j - m_new)`, the weight to accumulate with, and the returned factor
    /// `exp(m_old - m_new)` is what the existing weighted sum must be scaled by first.
    pub fn absorb_tile(&mut self, logits: &mut [f32], first_row: u32) -> f32 {
        let (tile_max, tile_arg) = max_first(logits);
        let empty = self.sum == 0.0;
        let m_new = if empty {
            tile_max
        } else {
            self.max.max(tile_max)
        };
        let [sum, shifted, sq] = weigh(logits, m_new);
        let scale = if empty { 0.0 } else { (self.max - m_new).exp() };
        if empty || tile_max > self.max {
            self.argmax = first_row + tile_arg as u32;
        }
        if empty {
            self.sum_shifted_logit = shifted;
        } else {
            self.sum_shifted_logit =
                scale * (self.sum_shifted_logit + self.sum * (self.max - m_new)) + shifted;
        }
        self.sum = scale * self.sum + sum;
        self.sum_sq = scale * scale * self.sum_sq + sq;
        self.max = m_new;
        scale
    }
}

multiversion! {
    /// Overwrites each logit s (all <= `m`) with its weight exp(s - m) and returns
    /// (sum e, sum e (s - m), sum e^2): one tile's share of a state whose max is `m`.
    pub fn weigh(logits: &mut [f32], m: f32) -> [f32; 3] = weigh_body;
}

#[inline(always)]
fn weigh_body(logits: &mut [f32], m: f32) -> [f32; 3] {
    // Sixteen independent partial sums per quantity (a single running sum is a serial
    // dependency the compiler may not reorder), over fixed-size blocks of 16 that LLVM
    // turns into one vector each (a loop indexing lanes by j % 8 stayed scalar: 6 cycles
    // per weight, 5% of a dense evaluation).
    const LANES: usize = 16;
    let (mut s0, mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let mut chunks = logits.chunks_exact_mut(LANES);
    for c in &mut chunks {
        // Plain loops over arrays (array::from_fn's closures were not inlined into the
        // vector versions).
        let (mut d, mut e) = ([0.0f32; LANES], [0.0f32; LANES]);
        for l in 0..LANES {
            d[l] = c[l] - m;
            e[l] = exp_nonpositive(d[l]);
        }
        for ((s, &e), &d) in s1.iter_mut().zip(&e).zip(&d) {
            *s += e * d;
        }
        for (s, &e) in s2.iter_mut().zip(&e) {
            *s += e * e;
        }
        for (s, &e) in s0.iter_mut().zip(&e) {
            *s += e;
        }
        c.copy_from_slice(&e);
    }
    for (l, c) in chunks.into_remainder().iter_mut().enumerate() {
        let d = *c - m;
        let e = exp_nonpositive(d);
        s0[l] += e;
        s1[l] += e * d;
        s2[l] += e * e;
        *c = e;
    }
    [s0, s1, s2].map(|l| l.iter().sum::<f32>())
}

multiversion! {
    /// The largest of `s` and the first position holding it; NaNs are passed over, and
    /// (-inf, 0) is returned where there is nothing larger than -inf.
    pub fn max_first(s: &[f32]) -> (f32, usize) = max_first_body;
}

multiversion! {
    /// The largest of `s` ([`max_first`]'s, without the position): NaNs are passed over,
    /// -inf where there is nothing larger.
    pub fn max_of(s: &[f32]) -> f32 = max_of_body;
}

#[inline(always)]
fn max_first_body(s: &[f32]) -> (f32, usize) {
    // The maximum (vectorized), then the first position holding it (an early-exit scan).
    let max = max_of_body(s);
    (max, s.iter().position(|&v| v == max).unwrap_or(0))
}

#[inline(always)]
fn max_of_body(s: &[f32]) -> f32 {
    // In independent lanes with compares and selects (vectorizes).
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// e^d for d <= 0 (a softmax weight), branch-free so that loops over it vectorize:
/// e^d = 2^k e^r with k = round(d / ln 2), |r| <= ln 2 / 2, e^r from Cephes' expf
/// polynomial (about 1 ulp), 2^k built from its exponent bits. Below -87 (where e^d
/// would leave the normal f32 range) it returns 0.
#[inline(always)]
pub fn exp_nonpositive(d: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that k * LN2_HI is exact for the k that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    let x = d.max(-87.0);
    let shifted = x * LOG2E + ROUNDER;
    let k = shifted - ROUNDER;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let k_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let two_k = f32::from_bits(((k_int + 127) as u32) << 23);
    if d < -87.0 {
        0.0
    } else {
        e_r * two_k
    }
}

#[cfg(test)]
mod tile_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Rows of logits at or below 0 (-80 to 0, some far below, ties at the maximum) of
    /// lengths around the vector widths.
    fn rows() -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000]
            .iter()
            .map(|&n| {
                let mut row: Vec<f32> = (0..n).map(|_| -80.0 * rng.random::<f32>()).collect();
                for v in row.iter_mut().step_by(5) {
                    *v = -200.0 * rng.random::<f32>();
                }
                if n > 3 {
                    row[n / 3] = 0.0;
                    row[n - 1] = 0.0;
                }
                row
            })
            .collect()
    }

    /// The vector versions (whichever this CPU runs) equal the baseline bitwise, and the
    /// sums equal f64 ones within f32 rounding.
    #[test]
    fn weigh_and_max_first_match_the_baseline_and_f64() {
        for row in rows() {
            let (mut a, mut b) = (row.clone(), row.clone());
            let sa = weigh(&mut a, 0.0);
            let sb = weigh_body(&mut b, 0.0);
            assert_eq!(sa.map(f32::to_bits), sb.map(f32::to_bits));
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let e: Vec<f64> = row.iter().map(|&v| (v as f64).exp()).collect();
            let want = [
                e.iter().sum::<f64>(),
                e.iter().zip(&row).map(|(e, &v)| e * v as f64).sum(),
                e.iter().map(|e| e * e).sum(),
            ];
            for (got, want) in sa.iter().zip(want) {
                assert!((*got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
            let naive = row
                .iter()
                .enumerate()
                .fold(
                    (f32::NEG_INFINITY, 0),
                    |(m, i), (j, &v)| if v > m { (v, j) } else { (m, i) },
                );
            assert_eq!(max_first(&row), naive);
            assert_eq!(max_first_body(&row), naive);
        }
        assert_eq!(max_first(&[f32::NAN, -1.0, f32::NAN, 2.0, 2.0]), (2.0, 3));
        assert_eq!(max_first(&[f32::NEG_INFINITY; 3]), (f32::NEG_INFINITY, 0));
        assert_eq!(max_first(&[]), (f32::NEG_INFINITY, 0));
    }

    #[test]
    fn exp_nonpositive_is_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let d = -87.0 * i as f32 / 200_000.0;
            let want = (d as f64).exp();
            let rel = ((exp_nonpositive(d) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn absorbing_tiles_equals_merging_states() {
        let logits = [0.5f32, -3.0, 2.0, 4.0, 1.0, 4.0];
        let mut s = SoftmaxState::EMPTY;
        let mut a = logits[..2].to_vec();
        assert_eq!(s.absorb_tile(&mut a, 0), 0.0);
        let mut b = logits[2..].to_vec();
        let r = s.absorb_tile(&mut b, 2);
        assert!((r - (0.5f32 - 4.0).exp()).abs() < 1e-7);
        assert_eq!(s.argmax, 3, "ties keep the first row");
        let mut whole = SoftmaxState::EMPTY;
        whole.absorb_tile(&mut logits.to_vec(), 0);
        assert!((s.sum - whole.sum).abs() < 1e-6);
        assert!((s.sum_shifted_logit - whole.sum_shifted_logit).abs() < 1e-5);
        assert!((s.sum_sq - whole.sum_sq).abs() < 1e-6);
    }
}
