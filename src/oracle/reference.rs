//! Ground truth: the oracle from its definition, in f64, one sample at a time.
//! Slow (B x N x D f64 work, no tiling); for tests and `--backend reference` on small data.

use std::ops::Range;

use crate::dataset::Dataset;
use crate::oracle::{OracleOutput, Query, QueryStats};
use crate::path::Path;

/// The reference result in full precision, with what tests need to judge near-ties.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    pub velocity: Vec<f64>,
    pub x1_hat: Vec<f64>,
    pub stats: Vec<QueryStats>,
    /// Per query: largest minus second-largest logit (infinite with one sample).
    /// A gap near f32 rounding means the top-1 index is a true near-tie.
    pub top2_gap: Vec<f64>,
}

pub fn evaluate_f64(
    ds: &Dataset,
    path: Path,
    query: &Query<'_>,
    rows: Range<usize>,
) -> ReferenceOutput {
    let dim = ds.dim();
    let n_queries = query.x.len() / dim;
    let samples: Vec<Vec<f64>> = rows.clone().map(|r| ds.sample_f64(r)).collect();
    let mut out = ReferenceOutput {
        velocity: Vec::with_capacity(n_queries * dim),
        x1_hat: Vec::with_capacity(n_queries * dim),
        stats: Vec::with_capacity(n_queries),
        top2_gap: Vec::with_capacity(n_queries),
    };
    for q in 0..n_queries {
        let x: Vec<f64> = query.x[q * dim..(q + 1) * dim]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let c = path.coefs(query.t.get(q) as f64);
        let two_s2 = 2.0 * c.sigma_safe().powi(2);
        let logits: Vec<f64> = samples
            .iter()
            .map(|y| {
                let d2: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(a, b)| (a - c.alpha * b).powi(2))
                    .sum();
                -d2 / two_s2
            })
            .collect();
        let (mut best, mut second, mut arg) = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0);
        for (i, &s) in logits.iter().enumerate() {
            if s > best {
                (second, best, arg) = (best, s, i);
            } else if s > second {
                second = s;
            }
        }
        let e: Vec<f64> = logits.iter().map(|s| (s - best).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut hat = vec![0.0f64; dim];
        for (w, y) in e.iter().zip(&samples) {
            for (h, v) in hat.iter_mut().zip(y) {
                *h += w / z * v;
            }
        }
        // Filter on the normalised weight: w / z can underflow to 0 where w did not.
        let entropy: f64 = -e
            .iter()
            .map(|w| w / z)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
        let sum_sq: f64 = e.iter().map(|w| (w / z).powi(2)).sum();
        // tr Cov_w(y) / D by its definition, sum_i w_i |y_i - x1_hat|^2 / D (no cancellation).
        let variance: f64 = e
            .iter()
            .zip(&samples)
            .map(|(w, y)| {
                w / z
                    * y.iter()
                        .zip(&hat)
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f64>()
            })
            .sum::<f64>()
            / dim as f64;
        let (a, b) = c.velocity_coefs();
        out.velocity
            .extend(hat.iter().zip(&x).map(|(h, xv)| a * h + b * xv));
        out.x1_hat.extend(hat);
        out.stats.push(QueryStats {
            top1_weight: (1.0 / z) as f32,
            top1_index: ds.original_index(rows.start + arg),
            entropy: entropy.max(0.0) as f32,
            ess: (1.0 / sum_sq) as f32,
            posterior_variance: variance as f32,
        });
        out.top2_gap.push(best - second);
    }
    out
}

pub fn evaluate(ds: &Dataset, path: Path, query: &Query<'_>, rows: Range<usize>) -> OracleOutput {
    let r = evaluate_f64(ds, path, query, rows);
    OracleOutput {
        velocity: r.velocity.iter().map(|&v| v as f32).collect(),
        x1_hat: r.x1_hat.iter().map(|&v| v as f32).collect(),
        stats: r.stats,
    }
}
