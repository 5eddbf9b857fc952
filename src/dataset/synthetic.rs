//! Synthetic data the engine generates itself: unit Gaussians (the paper's scaling study)
//! and Gaussian mixtures (class-conditional tests). Deterministic per seed (ChaCha8), and
//! rows are drawn in order, so the first M rows of an N-row draw equal an M-row draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Scale of the component means of [`mixture`]: means ~ N(0, scale^2 I).
pub const MIXTURE_MEAN_SCALE: f32 = 1.0;
/// Standard deviation of each component of [`mixture`] around its mean.
pub const MIXTURE_STD: f32 = 0.1;

/// `n_samples` x `dim` values drawn from N(0, I), row-major.
pub fn gaussian(n_samples: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_samples * dim)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// A `k`-component Gaussian mixture: component means ~ N(0, I) * [`MIXTURE_MEAN_SCALE`],
/// each sample = its component's mean + [`MIXTURE_STD`] * N(0, I). Sample i belongs to
/// component `i % k` (balanced classes); returns (N x D values, labels = component).
pub fn mixture(n_samples: usize, dim: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    mixture_with(n_samples, dim, k, seed, MIXTURE_MEAN_SCALE, MIXTURE_STD)
}

/// [`mixture`] with a chosen mean scale and per-component standard deviation.
pub fn mixture_with(
    n_samples: usize,
    dim: usize,
    k: usize,
    seed: u64,
    mean_scale: f32,
    std: f32,
) -> (Vec<f32>, Vec<u32>) {
    assert!(k > 0, "a mixture needs at least one component");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Means first, so that the rows do not depend on n_samples.
    let means: Vec<f32> = (0..k * dim)
        .map(|_| mean_scale * rng.sample::<f32, _>(StandardNormal))
        .collect();
    let mut values = Vec::with_capacity(n_samples * dim);
    let mut labels = Vec::with_capacity(n_samples);
    for i in 0..n_samples {
        let c = i % k;
        let mean = &means[c * dim..(c + 1) * dim];
        values.extend(
            mean.iter()
                .map(|&m| m + std * rng.sample::<f32, _>(StandardNormal)),
        );
        labels.push(c as u32);
    }
    (values, labels)
}
