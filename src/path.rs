//! Probability paths x_t = alpha(t) * x1 + sigma(t) * x0 (t = 0 noise, t = 1 data).

use std::f64::consts::FRAC_PI_2;

/// Smallest sigma used when forming 1/sigma terms: keeps t -> 1 finite.
/// At sigma = 1e-6 the posterior is one-hot for any dataset with distinct samples.
pub const MIN_SIGMA: f64 = 1e-6;

/// alpha, sigma and their time derivatives at one t.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathCoefs {
    pub alpha: f64,
    pub sigma: f64,
    pub d_alpha: f64,
    pub d_sigma: f64,
}

impl PathCoefs {
    /// sigma clamped away from 0 (see [`MIN_SIGMA`]).
    pub fn sigma_safe(&self) -> f64 {
        self.sigma.max(MIN_SIGMA)
    }

    /// Logit of sample y for query x is `-|x - alpha y|^2 / (2 sigma^2)`; expanded it is
    /// `c_dot * x.y - c_norm * |y|^2` plus a per-query constant. Returns (c_dot, c_norm).
    pub fn logit_coefs(&self) -> (f64, f64) {
        let s2 = self.sigma_safe().powi(2);
        (self.alpha / s2, self.alpha * self.alpha / (2.0 * s2))
    }

    /// Velocity u = a * x1_hat + b * x with a = alpha' - alpha sigma'/sigma, b = sigma'/sigma.
    pub fn velocity_coefs(&self) -> (f64, f64) {
        let s = self.sigma_safe();
        (
            self.d_alpha - self.alpha * self.d_sigma / s,
            self.d_sigma / s,
        )
    }
}

/// A probability path. Rectified flow is the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// alpha = t, sigma = 1 - t
    #[default]
    #[value(name = "rf")]
    RectifiedFlow,
    /// alpha = sin(pi t / 2), sigma = cos(pi t / 2)
    #[value(name = "vp-cosine")]
    VpCosine,
}

impl Path {
    pub fn coefs(self, t: f64) -> PathCoefs {
        match self {
            Path::RectifiedFlow => PathCoefs {
                alpha: t,
                sigma: 1.0 - t,
                d_alpha: 1.0,
                d_sigma: -1.0,
            },
            Path::VpCosine => {
                let (s, c) = (FRAC_PI_2 * t).sin_cos();
                PathCoefs {
                    alpha: s,
                    sigma: c,
                    d_alpha: FRAC_PI_2 * c,
                    d_sigma: -FRAC_PI_2 * s,
                }
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::RectifiedFlow => "rf",
            Path::VpCosine => "vp-cosine",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_finite_differences() {
        for path in [Path::RectifiedFlow, Path::VpCosine] {
            for &t in &[0.1, 0.5, 0.9] {
                let h = 1e-6;
                let (p, m) = (path.coefs(t + h), path.coefs(t - h));
                let c = path.coefs(t);
                assert!(((p.alpha - m.alpha) / (2.0 * h) - c.d_alpha).abs() < 1e-6);
                assert!(((p.sigma - m.sigma) / (2.0 * h) - c.d_sigma).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn rectified_flow_velocity_is_difference_over_one_minus_t() {
        let c = Path::RectifiedFlow.coefs(0.3);
        let (a, b) = c.velocity_coefs();
        assert!((a - 1.0 / 0.7).abs() < 1e-12 && (b + 1.0 / 0.7).abs() < 1e-12);
    }
}
