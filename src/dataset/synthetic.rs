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

/// The rows of [`gaussian`] (same seed, same values, in order) generated a block at a time,
/// for writers that must not hold the whole draw (`oracleflow convert`).
pub struct GaussianStream {
    rng: ChaCha8Rng,
}

impl GaussianStream {
    pub fn new(seed: u64) -> Self {
        GaussianStream {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `out.len()` values of the draw.
    pub fn fill(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.rng.sample::<f32, _>(StandardNormal);
        }
    }
}

/// The rows and labels of [`mixture`] (same seed, same values, in order) a block at a time.
pub struct MixtureStream {
    rng: ChaCha8Rng,
    means: Vec<f32>,
    dim: usize,
    k: usize,
    next: usize,
}

impl MixtureStream {
    pub fn new(dim: usize, k: usize, seed: u64) -> Self {
        assert!(k > 0, "a mixture needs at least one component");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let means: Vec<f32> = (0..k * dim)
            .map(|_| MIXTURE_MEAN_SCALE * rng.sample::<f32, _>(StandardNormal))
            .collect();
        MixtureStream {
            rng,
            means,
            dim,
            k,
            next: 0,
        }
    }

    /// The next `labels.len()` rows into `values` (rows x dim) and their labels.
    pub fn fill(&mut self, values: &mut [f32], labels: &mut [u32]) {
        for (row, label) in values.chunks_exact_mut(self.dim).zip(labels) {
            let c = self.next % self.k;
            self.next += 1;
            let mean = &self.means[c * self.dim..(c + 1) * self.dim];
            for (v, &m) in row.iter_mut().zip(mean) {
                *v = m + MIXTURE_STD * self.rng.sample::<f32, _>(StandardNormal);
            }
            *label = c as u32;
        }
    }
}
