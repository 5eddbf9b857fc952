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
