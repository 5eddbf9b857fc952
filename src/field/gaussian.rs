//! The exact velocity when the data is replaced by its Gaussian fit N(mu, Sigma).
//!
//! For x_t = alpha y + sigma x0 with y ~ N(mu, Sigma) and x0 ~ N(0, I), the posterior mean is
//!
//!   x1_hat = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)
//!          = mu + V diag(alpha l_k / (alpha^2 l_k + sigma^2)) V^T (x - alpha mu)
//!
//! with Sigma = V diag(l) V^T from one symmetric eigendecomposition per class (faer), made
//! the first time that class is asked for. The velocity is the oracle's affine map of
//! x1_hat (`PathCoefs::velocity_coefs`), so the two fields differ only in the posterior.
//!
//! Sigma is the maximum-likelihood fit (divided by N, not N - 1). With fewer samples
//! than dimensions it is singular; directions with eigenvalue ~0 get gain 0 for sigma > 0
//! (the fit has no spread there), and at sigma = 0 (t = 1) the gain is 1 / (alpha l_k) on
//! the data's span and 0 off it, the sigma -> 0 limit of the formula.

use std::collections::HashMap;
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Side};

use super::{check_request, FieldEval, VelocityField};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::path::Path;

/// Rows of the data read at a time while forming Sigma (bounds the f64 copy).
const COV_CHUNK_ROWS: usize = 2048;
/// Eigenvalues below this fraction of the largest are treated as 0 (rank deficiency:
/// the decomposition returns them as rounding noise, possibly negative).
const RELATIVE_EIGEN_FLOOR: f64 = 1e-12;

/// The Gaussian fit of one class (or of the whole dataset).
pub struct GaussianFit {
    /// D, user coordinates
    pub mean: Vec<f64>,
    /// D x D, columns are eigenvectors
    pub vectors: Mat<f64>,
    /// D, nondecreasing, clamped at 0
    pub values: Vec<f64>,
    /// Samples the fit is of
    pub n: usize,
    /// Seconds the covariance and its decomposition took
    pub seconds: f64,
}

impl GaussianFit {
    /// Fits the stored rows `rows` of `ds` (centred by the dataset mean).
    pub fn of_rows(ds: &Dataset, rows: std::ops::Range<usize>) -> Result<Self> {
        let start = Instant::now();
        let dim = ds.dim();
        let n = rows.len();
        if n == 0 {
            return Err(Error::Input("gaussian field: no samples to fit".into()));
        }
        // Mean of the stored rows first (they are centred by the whole dataset's mean, so
        // a class mean is an offset from it); Sigma then from rows minus that offset.
        let mut offset = vec![0.0f64; dim];
        let mut row = vec![0.0f32; dim];
        for r in rows.clone() {
            ds.stored_row(r, &mut row);
            offset
                .iter_mut()
                .zip(&row)
                .for_each(|(o, &v)| *o += v as f64);
        }
        offset.iter_mut().for_each(|o| *o /= n as f64);
        let mut sigma = Mat::<f64>::zeros(dim, dim);
        for first in rows.clone().step_by(COV_CHUNK_ROWS) {
            let chunk_rows = first..(first + COV_CHUNK_ROWS).min(rows.end);
            let mut chunk = Mat::<f64>::zeros(chunk_rows.len(), dim);
            for (i, r) in chunk_rows.enumerate() {
                ds.stored_row(r, &mut row);
                for (j, (&v, o)) in row.iter().zip(&offset).enumerate() {
                    chunk[(i, j)] = v as f64 - o;
                }
            }
            matmul(
                sigma.as_mut(),
                Accum::Add,
                chunk.transpose(),
                chunk.as_ref(),
                1.0 / n as f64,
                faer::get_global_parallelism(),
            );
        }
        let eig = sigma.self_adjoint_eigen(Side::Lower).map_err(|e| {
            Error::Input(format!(
                "gaussian field: eigendecomposition of the {dim} x {dim} covariance failed: {e:?}"
            ))
        })?;
        let raw: Vec<f64> = (0..dim).map(|k| eig.S().column_vector()[k]).collect();
        let top = raw.iter().cloned().fold(0.0f64, f64::max);
        let values = raw
            .iter()
            .map(|&l| {
                if l > RELATIVE_EIGEN_FLOOR * top {
                    l
                } else {
                    0.0
                }
            })
            .collect();
        let mean = ds
            .mean()
            .iter()
            .zip(&offset)
            .map(|(&m, o)| m as f64 + o)
            .collect();
        Ok(GaussianFit {
            mean,
            vectors: eig.U().to_owned(),
            values,
            n,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Per eigen-direction gain of (x - alpha mu) in x1_hat at (alpha, sigma).
    fn gains(&self, alpha: f64, sigma: f64) -> Vec<f64> {
        self.values
            .iter()
            .map(|&l| {
                if l == 0.0 {
                    0.0
                } else if sigma == 0.0 {
                    1.0 / alpha
                } else {
                    alpha * l / (alpha * alpha * l + sigma * sigma)
                }
            })
            .collect()
    }

    /// x1_hat for states `x` (B x D) at per-state (alpha, sigma).
    pub fn posterior_mean(&self, x: &[f64], coefs: &[(f64, f64)]) -> Vec<f64> {
        let dim = self.mean.len();
        let b = coefs.len();
        let centred =
            Mat::<f64>::from_fn(b, dim, |q, j| x[q * dim + j] - coefs[q].0 * self.mean[j]);
        let mut proj = Mat::<f64>::zeros(b, dim);
        let par = faer::get_global_parallelism();
        matmul(
            proj.as_mut(),
            Accum::Replace,
            centred.as_ref(),
            self.vectors.as_ref(),
            1.0,
            par,
        );
        for (q, &(alpha, sigma)) in coefs.iter().enumerate() {
            for (k, g) in self.gains(alpha, sigma).into_iter().enumerate() {
                proj[(q, k)] *= g;
            }
        }
        let mut hat = Mat::<f64>::zeros(b, dim);
        matmul(
            hat.as_mut(),
            Accum::Replace,
            proj.as_ref(),
            self.vectors.transpose(),
            1.0,
            par,
        );
        let mut out = Vec::with_capacity(b * dim);
        for q in 0..b {
            out.extend((0..dim).map(|j| self.mean[j] + hat[(q, j)]));
        }
        out
    }
}

/// The Gaussian field of a dataset: one fit per class asked for (None = all samples).
pub struct GaussianField<'d> {
    dataset: &'d Dataset,
    path: Path,
    fits: HashMap<Option<u32>, GaussianFit>,
    evaluations: usize,
}

impl<'d> GaussianField<'d> {
    /// No work yet: each fit is made on first use (or by [`GaussianField::prepare`]).
    pub fn new(dataset: &'d Dataset, path: Path) -> Self {
        GaussianField {
            dataset,
            path,
            fits: HashMap::new(),
            evaluations: 0,
        }
    }

    /// The fit of a class (None = all samples), made now if not yet.
    pub fn fit(&mut self, class: Option<u32>) -> Result<&GaussianFit> {
        if !self.fits.contains_key(&class) {
            let rows = self.dataset.rows_for(class)?;
            let fit = GaussianFit::of_rows(self.dataset, rows)?;
            eprintln!(
                "gaussian field: fit of {} ({} samples, D = {}) in {:.2} s",
                class.map_or("all samples".to_string(), |c| format!("class {c}")),
                fit.n,
                self.dataset.dim(),
                fit.seconds
            );
            self.fits.insert(class, fit);
        }
        Ok(&self.fits[&class])
    }

    /// Makes the fits of these classes now (so their cost is not charged to sampling).
    pub fn prepare(&mut self, classes: &[Option<u32>]) -> Result<()> {
        classes.iter().try_for_each(|&c| self.fit(c).map(|_| ()))
    }
}

impl VelocityField for GaussianField<'_> {
    fn dim(&self) -> usize {
        self.dataset.dim()
    }

    fn describe(&self) -> String {
        format!(
            "gaussian: exact velocity of the Gaussian fit of {} (path {})",
            self.dataset.name,
            self.path.name()
        )
    }

    fn accepts_classes(&self) -> bool {
        self.dataset.labels().is_some()
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        let dim = self.dim();
        check_request(dim, x, t, classes)?;
        t.iter()
            .try_for_each(|&t| crate::oracle::check_time(t as f32))?;
        let mut out = FieldEval {
            velocity: vec![0.0; x.len()],
            x1_hat: vec![0.0; x.len()],
            stats: None,
        };
        let groups = super::class_groups(classes);
        self.evaluations += 1;
        let path = self.path;
        for (class, members) in groups {
            let xs: Vec<f64> = members
                .iter()
                .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let coefs: Vec<_> = members.iter().map(|&i| path.coefs(t[i])).collect();
            let ab: Vec<(f64, f64)> = coefs.iter().map(|c| (c.alpha, c.sigma)).collect();
            let hat = self.fit(class)?.posterior_mean(&xs, &ab);
            for (k, &i) in members.iter().enumerate() {
                let (a, b) = coefs[k].velocity_coefs();
                for j in 0..dim {
                    let h = hat[k * dim + j];
                    out.x1_hat[i * dim + j] = h;
                    out.velocity[i * dim + j] = a * h + b * x[i * dim + j];
                }
            }
        }
        Ok(out)
    }

    fn evaluations(&self) -> usize {
        self.evaluations
    }
}
