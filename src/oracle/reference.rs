//! Ground truth: the oracle from its definition, in f64, one sample at a time.
//! Slow (B x N x D f64 work, no tiling); for tests and `--backend reference` on small data.

use std::ops::Range;

use crate::dataset::Dataset;
use crate::oracle::{CentredBatch, OracleOutput, Query, QueryStats};
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
            ..QueryStats::default()
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

/// The posterior of one query of a centred batch, in f64.
#[derive(Clone, Debug)]
pub struct PosteriorF64 {
    /// Posterior mean of the stored (centred) rows.
    pub mean: Vec<f64>,
    pub top1_weight: f64,
    /// Stored row (first maximum: ties go to the smaller row, as in the backends).
    pub top1_index: usize,
    pub entropy: f64,
    pub ess: f64,
}

/// The stored rows `rows` (f32, as the backends see them) in f64.
pub fn stored_rows_f64(ds: &Dataset, rows: std::ops::Range<usize>) -> Vec<Vec<f64>> {
    let mut row = vec![0.0f32; ds.dim()];
    rows.map(|r| {
        ds.stored_row(r, &mut row);
        row.iter().map(|&v| v as f64).collect()
    })
    .collect()
}

/// The problem a fast backend solves ([`crate::oracle::Backend::posterior`]), from its
/// definition in f64: logits `c_dot x.y - c_norm |y|^2` over the stored rows of the range,
/// softmax, weighted mean. The ground truth of the backend-level tests.
pub fn posterior_f64(ds: &Dataset, batch: &CentredBatch<'_>) -> Vec<PosteriorF64> {
    let d = ds.dim();
    let ys = stored_rows_f64(ds, batch.rows.clone());
    batch
        .logit_coefs
        .iter()
        .enumerate()
        .map(|(q, coef)| {
            let x = &batch.x[q * d..(q + 1) * d];
            let logits: Vec<f64> = ys
                .iter()
                .map(|y| {
                    let dot: f64 = x.iter().zip(y).map(|(&a, b)| a as f64 * b).sum();
                    let sq: f64 = y.iter().map(|b| b * b).sum();
                    coef[0] as f64 * dot - coef[1] as f64 * sq
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let w: Vec<f64> = e.iter().map(|e| e / z).collect();
            let mut mean = vec![0.0; d];
            for (wi, y) in w.iter().zip(&ys) {
                for (m, v) in mean.iter_mut().zip(y) {
                    *m += wi * v;
                }
            }
            let top = logits.iter().position(|&s| s == m).unwrap_or(0);
            PosteriorF64 {
                mean,
                top1_weight: w[top],
                top1_index: batch.rows.start + top,
                entropy: -w
                    .iter()
                    .filter(|&&w| w > 0.0)
                    .map(|w| w * w.ln())
                    .sum::<f64>(),
                ess: 1.0 / w.iter().map(|w| w * w).sum::<f64>(),
            }
        })
        .collect()
}
