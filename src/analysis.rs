//! What the samples turned out to be: nearest training samples and memorization.

use rayon::prelude::*;

use crate::dataset::Dataset;

/// The two nearest training samples of one point (Euclidean, user coordinates).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Neighbours {
    /// Source index of the nearest training sample
    pub nearest: u32,
    /// Stored row of the nearest sample (for `Dataset::sample`)
    #[serde(skip)]
    pub nearest_row: usize,
    pub distance: f64,
    /// Source index of the second nearest (equals `nearest` when N = 1)
    pub second: u32,
    pub second_distance: f64,
}

impl Neighbours {
    /// Gu et al.'s criterion: memorized when d(nearest) / d(second nearest) < 1/3.
    pub fn memorized(&self) -> bool {
        self.distance < self.second_distance / 3.0
    }
}

/// Brute-force two nearest neighbours of each point (n x D), by direct differences in f64
/// (exact, unlike the expanded dot products the oracle uses). O(n N D): fine for the
/// handfuls of samples one looks at.
pub fn nearest_two(ds: &Dataset, points: &[f32]) -> Vec<Neighbours> {
    let dim = ds.dim();
    let mean = ds.mean();
    points
        .par_chunks(dim)
        .map(|p| {
            // Compare in centred coordinates: |p - y|^2 = |(p - mean) - stored|^2.
            let pc: Vec<f64> = p
                .iter()
                .zip(mean)
                .map(|(&a, &m)| a as f64 - m as f64)
                .collect();
            let mut row = vec![0.0f32; dim];
            let (mut best, mut second) = ((f64::INFINITY, 0usize), (f64::INFINITY, 0usize));
            for r in 0..ds.n_samples() {
                ds.stored_row(r, &mut row);
                let d2: f64 = pc
                    .iter()
                    .zip(&row)
                    .map(|(a, &b)| (a - b as f64).powi(2))
                    .sum();
                if d2 < best.0 {
                    second = best;
                    best = (d2, r);
                } else if d2 < second.0 {
                    second = (d2, r);
                }
            }
            if ds.n_samples() == 1 {
                second = best;
            }
            Neighbours {
                nearest: ds.original_index(best.1),
                nearest_row: best.1,
                distance: best.0.sqrt(),
                second: ds.original_index(second.1),
                second_distance: second.0.sqrt(),
            }
        })
        .collect()
}

/// The posterior along the path at one time, averaged over (training sample, noise) pairs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StagePoint {
    pub t: f64,
    pub mean_top1_weight: f64,
    /// Share of queries whose top-1 sample is the one x_t was built from
    pub own_sample_rate: f64,
    pub mean_entropy: f64,
    pub mean_ess: f64,
    /// |u_cond - u*(x_t, t)|^2 / D averaged over pairs, where u_cond = alpha' y + sigma' x0
    /// is the conditional (training) target: how far the exact marginal velocity is from
    /// what a flow-matching loss regresses on (paper Fig. 2a).
    pub target_difference: f64,
}

/// The stage curve of a dataset: at each time of `times` (each < 1), `n_pairs` queries
/// x_t = alpha y_j + sigma x0 built from random training samples y_j and noise x0 (the
/// same pairs at every time, fixed by `seed`), through the oracle.
pub fn stage_curve(
    oracle: &mut crate::oracle::Oracle<'_>,
    times: &[f64],
    n_pairs: usize,
    seed: u64,
    mut tick: impl FnMut(),
) -> crate::error::Result<Vec<StagePoint>> {
    use rand::{Rng, SeedableRng};
    let ds = oracle.dataset();
    let path = oracle.path();
    let dim = ds.dim();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let rows: Vec<usize> = (0..n_pairs)
        .map(|_| rng.random_range(0..ds.n_samples()))
        .collect();
    let ys: Vec<Vec<f64>> = rows.iter().map(|&r| ds.sample_f64(r)).collect();
    let noise: Vec<Vec<f64>> = (0..n_pairs)
        .map(|k| crate::sample::initial_noise(seed, k, dim))
        .collect();
    let mut curve = Vec::with_capacity(times.len());
    for &t in times {
        if !(0.0..1.0).contains(&t) {
            return Err(crate::error::Error::Input(format!(
                "stage curve time {t} is outside [0, 1)"
            )));
        }
        let c = path.coefs(t);
        let x: Vec<f32> = ys
            .iter()
            .zip(&noise)
            .flat_map(|(y, x0)| {
                y.iter()
                    .zip(x0)
                    .map(|(y, n)| (c.alpha * y + c.sigma * n) as f32)
            })
            .collect();
        let out = oracle.evaluate(&crate::oracle::Query {
            x: &x,
            t: crate::oracle::Times::Scalar(t as f32),
            class: None,
        })?;
        let mut p = StagePoint {
            t,
            ..Default::default()
        };
        for (k, s) in out.stats.iter().enumerate() {
            p.mean_top1_weight += s.top1_weight as f64;
            p.own_sample_rate += (s.top1_index == ds.original_index(rows[k])) as u8 as f64;
            p.mean_entropy += s.entropy as f64;
            p.mean_ess += s.ess as f64;
            let u = &out.velocity[k * dim..(k + 1) * dim];
            p.target_difference += ys[k]
                .iter()
                .zip(&noise[k])
                .zip(u)
                .map(|((y, n), &u)| (c.d_alpha * y + c.d_sigma * n - u as f64).powi(2))
                .sum::<f64>()
                / dim as f64;
        }
        let n = n_pairs as f64;
        p.mean_top1_weight /= n;
        p.own_sample_rate /= n;
        p.mean_entropy /= n;
        p.mean_ess /= n;
        p.target_difference /= n;
        curve.push(p);
        tick();
    }
    Ok(curve)
}

/// The first time at which `value` reaches `level`, interpolated linearly between grid times.
pub fn crossing(points: &[(f64, f64)], level: f64) -> Option<f64> {
    if points.first()?.1 >= level {
        return Some(points[0].0);
    }
    points.windows(2).find_map(|w| {
        let ((t0, v0), (t1, v1)) = (w[0], w[1]);
        (v0 < level && v1 >= level).then(|| t0 + (level - v0) / (v1 - v0) * (t1 - t0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_interpolates() {
        let pts = [(0.0, 0.0), (0.1, 0.2), (0.2, 0.6), (0.3, 1.0)];
        assert!((crossing(&pts, 0.5).unwrap() - 0.175).abs() < 1e-12);
        assert_eq!(crossing(&pts, 0.0), Some(0.0));
        assert_eq!(crossing(&pts, 1.5), None);
    }
}
