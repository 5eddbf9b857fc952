//! The unnormalised softmax state of a whole batch over one row range ([`Partial`]):
//! what a backend returns before dividing by the normaliser, so that the states of
//! disjoint row ranges (tiles, devices, MPI ranks) merge exactly into the state of their
//! union, and only then become a [`Posterior`].
//!
//! Per query it holds the scalar [`SoftmaxState`] (m, l, t, q, argmax), the weighted sum
//! `acc = sum e_i y_i` (D values), and the sufficient statistics of every other
//! diagnostic, all on the scale exp(m) of the state so that one rescale factor serves all:
//! - posterior variance: `sum_norm = sum e_i |y_i|^2` (tr Cov = sum_norm / l - |acc / l|^2);
//! - entropy and ESS come from t and q inside the state;
//! - exact pruning's certificate: the skipped mass as an absolute bound (f64, in units of
//!   exp(m)), so that it rescales like l; divided by the merged l at the end;
//! - tiles and samples actually visited as counts (with the totals they are shares of), so
//!   the skipped shares of merged parts are shares of the union.

use crate::oracle::state::posterior_variance;
use crate::oracle::{Posterior, QueryStats, SoftmaxState};

/// Unnormalised posterior state of B queries over a row range (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    pub dim: usize,
    pub states: Vec<SoftmaxState>,
    /// B x D: sum_i e_i y_i of the stored (centred) rows.
    pub acc: Vec<f32>,
    /// Per query: sum_i e_i |y_i|^2.
    pub sum_norm: Vec<f32>,
    /// Per query: upper bound on the weight of the samples never computed, in units of
    /// exp(state.max) (0 on dense paths).
    pub skipped_mass: Vec<f64>,
    /// Per query: tiles visited (not skipped whole), and samples whose logit was computed.
    pub tiles_kept: Vec<u64>,
    pub samples_kept: Vec<u64>,
    /// Tiles and samples of the row range (the same for every query).
    pub tiles_total: u64,
    pub samples_total: u64,
}

impl Partial {
    /// The state of no sample at all (the identity of [`Partial::merge`]).
    pub fn empty(n_queries: usize, dim: usize) -> Partial {
        Partial {
            dim,
            states: vec![SoftmaxState::EMPTY; n_queries],
            acc: vec![0.0; n_queries * dim],
            sum_norm: vec![0.0; n_queries],
            skipped_mass: vec![0.0; n_queries],
            tiles_kept: vec![0; n_queries],
            samples_kept: vec![0; n_queries],
            tiles_total: 0,
            samples_total: 0,
        }
    }

    /// A dense pass's state over `rows` samples: nothing skipped. Its tiles are counted in
    /// units of `tile_rows`, so that merged with pruned parts the tile share stays a share.
    pub fn dense(
        dim: usize,
        states: Vec<SoftmaxState>,
        acc: Vec<f32>,
        sum_norm: Vec<f32>,
        rows: usize,
        tile_rows: usize,
    ) -> Partial {
        let n = states.len();
        let tiles = rows.div_ceil(tile_rows.max(1)) as u64;
        Partial {
            dim,
            states,
            acc,
            sum_norm,
            skipped_mass: vec![0.0; n],
            tiles_kept: vec![tiles; n],
            samples_kept: vec![rows as u64; n],
            tiles_total: tiles,
            samples_total: rows as u64,
        }
    }

    pub fn n_queries(&self) -> usize {
        self.states.len()
    }

    /// Merges the state of a disjoint row range into this one: every sum is rescaled to
    /// the larger maximum and added (the rule of [`SoftmaxState::merge`]).
    pub fn merge(&mut self, other: &Partial) {
        assert_eq!(
            self.n_queries(),
            other.n_queries(),
            "partials of other batches"
        );
        assert_eq!(self.dim, other.dim, "partials of other dimensions");
        let dim = self.dim;
        for q in 0..self.n_queries() {
            let (ra, rb) = self.states[q].merge(&other.states[q]);
            let r = q * dim..(q + 1) * dim;
            for (a, b) in self.acc[r.clone()].iter_mut().zip(&other.acc[r]) {
                *a = ra * *a + rb * b;
            }
            self.sum_norm[q] = ra * self.sum_norm[q] + rb * other.sum_norm[q];
            self.skipped_mass[q] =
                ra as f64 * self.skipped_mass[q] + rb as f64 * other.skipped_mass[q];
        }
        for (a, b) in self.tiles_kept.iter_mut().zip(&other.tiles_kept) {
            *a += b;
        }
        for (a, b) in self.samples_kept.iter_mut().zip(&other.samples_kept) {
            *a += b;
        }
        self.tiles_total += other.tiles_total;
        self.samples_total += other.samples_total;
    }

    /// Applies `f` to every query's top-1 row (e.g. stored row -> source index).
    pub fn map_argmax(&mut self, f: impl Fn(u32) -> u32) {
        for s in &mut self.states {
            if s.sum > 0.0 {
                s.argmax = f(s.argmax);
            }
        }
    }

    /// Divides by the normaliser: the posterior mean and the per-query statistics. A query
    /// whose state is empty (no row) gets NaN, which callers refuse before they get here.
    pub fn finish(self) -> Posterior {
        let dim = self.dim;
        let mut mean = self.acc;
        let mut stats = Vec::with_capacity(self.states.len());
        for (q, state) in self.states.iter().enumerate() {
            let out = &mut mean[q * dim..(q + 1) * dim];
            let inv = 1.0 / state.sum;
            out.iter_mut().for_each(|o| *o *= inv);
            // The same expression as the pruned path's, so one part gives its bits.
            let skipped = |kept: u64, total: u64| {
                if total == 0 {
                    0.0
                } else {
                    1.0 - kept as f32 / total as f32
                }
            };
            stats.push(QueryStats {
                posterior_variance: posterior_variance(self.sum_norm[q], state.sum, out),
                skipped_mass_bound: round_up_f32(self.skipped_mass[q] / state.sum as f64),
                tiles_skipped: skipped(self.tiles_kept[q], self.tiles_total),
                samples_skipped: skipped(self.samples_kept[q], self.samples_total),
                ..state.stats()
            });
        }
        Posterior { mean, stats }
    }
}

/// The smallest f32 >= v (v >= 0): an f32 certificate must still bound the f64 one.
pub(crate) fn round_up_f32(v: f64) -> f32 {
    let f = v as f32;
    if (f as f64) < v {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial of rows with the given logits, values and norms, computed directly in
    /// f64 (shifting by the maximum), then stored as f32.
    fn partial_of(logits: &[f64], ys: &[[f64; 2]], first_row: u32) -> Partial {
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let arg = logits.iter().position(|&s| s == m).unwrap();
        let e: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
        let state = SoftmaxState {
            max: m as f32,
            sum: e.iter().sum::<f64>() as f32,
            sum_shifted_logit: e.iter().zip(logits).map(|(e, s)| e * (s - m)).sum::<f64>() as f32,
            sum_sq: e.iter().map(|e| e * e).sum::<f64>() as f32,
            argmax: first_row + arg as u32,
        };
        let acc: Vec<f32> = (0..2)
            .map(|k| e.iter().zip(ys).map(|(e, y)| e * y[k]).sum::<f64>() as f32)
            .collect();
        let sum_norm = e
            .iter()
            .zip(ys)
            .map(|(e, y)| e * (y[0] * y[0] + y[1] * y[1]))
            .sum::<f64>() as f32;
        Partial::dense(2, vec![state], acc, vec![sum_norm], logits.len(), 2)
    }

    #[test]
    fn merged_parts_equal_the_whole() {
        let logits = [0.5, -3.0, 2.0, 40.0, 39.5, 1.0];
        let ys = [
            [1.0, 2.0],
            [-1.0, 0.5],
            [0.0, 3.0],
            [2.0, -2.0],
            [1.5, 1.0],
            [0.3, 0.3],
        ];
        let whole = partial_of(&logits, &ys, 0).finish();
        for cut in 1..logits.len() {
            let mut a = partial_of(&logits[..cut], &ys[..cut], 0);
            a.merge(&partial_of(&logits[cut..], &ys[cut..], cut as u32));
            let p = a.finish();
            let (s, w) = (p.stats[0], whole.stats[0]);
            assert_eq!(s.top1_index, 3);
            for (x, y) in p.mean.iter().zip(&whole.mean) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
            }
            for (x, y) in [
                (s.top1_weight, w.top1_weight),
                (s.entropy, w.entropy),
                (s.ess, w.ess),
                (s.posterior_variance, w.posterior_variance),
            ] {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "cut {cut}: {x} vs {y}"
                );
            }
            assert_eq!((s.tiles_skipped, s.samples_skipped), (0.0, 0.0));
        }
    }

    #[test]
    fn skipped_mass_and_counts_merge_as_shares_of_the_union() {
        let mut a = partial_of(&[1.0, 0.0], &[[0.0, 0.0], [1.0, 1.0]], 0);
        a.skipped_mass[0] = 0.25; // units of exp(1)
        a.tiles_kept[0] = 3;
        a.tiles_total = 4;
        a.samples_kept[0] = 10;
        a.samples_total = 20;
        let mut b = partial_of(&[3.0], &[[2.0, 2.0]], 2);
        b.skipped_mass[0] = 0.5; // units of exp(3)
        let l_a = a.states[0].sum as f64;
        a.merge(&b);
        let p = a.finish();
        let l = (l_a * (-2f64).exp()) + 1.0;
        let want = (0.25 * (-2f64).exp() + 0.5) / l;
        assert!((p.stats[0].skipped_mass_bound as f64 - want).abs() < 1e-7);
        assert!(p.stats[0].skipped_mass_bound as f64 >= want * (1.0 - 1e-7));
        // b (one dense sample, one tile) adds one visited tile and one computed sample.
        assert!((p.stats[0].tiles_skipped - 1.0 / 5.0).abs() < 1e-6);
        assert!((p.stats[0].samples_skipped - 10.0 / 21.0).abs() < 1e-6);
        assert_eq!(p.stats[0].top1_index, 2);
    }

    #[test]
    fn empty_is_the_identity() {
        let a = partial_of(&[1.0, 2.0], &[[0.0, 1.0], [1.0, 0.0]], 5);
        let mut e = Partial::empty(1, 2);
        e.merge(&a);
        assert_eq!(e, a);
        let mut b = a.clone();
        b.merge(&Partial::empty(1, 2));
        assert_eq!(b, a);
    }
}
