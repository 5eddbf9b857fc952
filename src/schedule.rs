//! Time grids from t = 0 (noise) to t = 1 (data).

use crate::error::{Error, Result};

/// Time-step shift (paper Tab. 2): `t_m = s t / (1 + (s - 1) t)`. s < 1 puts more steps
/// early (navigation), s = 1 is the identity.
pub fn shift_time(t: f64, shift: f64) -> f64 {
    shift * t / (1.0 + (shift - 1.0) * t)
}

/// A time grid.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `steps` equal steps on [0, 1], then shifted by `shift` (1.0 = uniform).
    Shifted { steps: usize, shift: f64 },
    /// An explicit increasing list of times in [0, 1].
    Explicit(Vec<f64>),
}

impl Schedule {
    pub fn uniform(steps: usize) -> Self {
        Schedule::Shifted { steps, shift: 1.0 }
    }

    /// The grid t_0 < t_1 < ... < t_n; checked, so solvers can rely on it.
    pub fn times(&self) -> Result<Vec<f64>> {
        let times: Vec<f64> = match self {
            Schedule::Shifted { steps, shift } => {
                if *steps == 0 {
                    return Err(Error::Input("--steps must be at least 1".into()));
                }
                if !(*shift > 0.0 && shift.is_finite()) {
                    return Err(Error::Input(format!("--shift {shift} must be > 0")));
                }
                // The ends are set exactly: s t / (1 + (s - 1) t) rounds to 1 - eps or
                // 1 + eps at t = 1 for some s (0.3 gives 0.9999999999999999).
                (0..=*steps)
                    .map(|i| match i {
                        0 => 0.0,
                        i if i == *steps => 1.0,
                        i => shift_time(i as f64 / *steps as f64, *shift).clamp(0.0, 1.0),
                    })
                    .collect()
            }
            Schedule::Explicit(t) => t.clone(),
        };
        if times.len() < 2 {
            return Err(Error::Input("a time grid needs at least two times".into()));
        }
        if times.iter().any(|t| !(0.0..=1.0).contains(t)) {
            return Err(Error::Input(format!("time grid {times:?} leaves [0, 1]")));
        }
        if times.windows(2).any(|w| w[1] <= w[0]) {
            return Err(Error::Input(format!(
                "time grid {times:?} is not strictly increasing"
            )));
        }
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_keeps_endpoints_and_order() {
        for s in [0.1, 0.5, 1.0, 3.0] {
            let t = Schedule::Shifted {
                steps: 20,
                shift: s,
            }
            .times()
            .unwrap();
            assert_eq!((t[0], t[20]), (0.0, 1.0), "endpoints for s = {s}");
            assert!(t.windows(2).all(|w| w[1] > w[0]), "monotone for s = {s}");
        }
    }

    #[test]
    fn every_shift_ends_exactly_at_zero_and_one() {
        // A sweep over shifts and step counts, including the paper's 0.3 (which once gave
        // a last time of 0.9999999999999999).
        for k in 1..=400 {
            let s = k as f64 * 0.0125;
            for steps in [1, 2, 7, 10, 50, 200] {
                let t = Schedule::Shifted { steps, shift: s }.times().unwrap();
                assert_eq!(t[0], 0.0, "s = {s}, steps = {steps}");
                assert_eq!(t[steps], 1.0, "s = {s}, steps = {steps}");
                for (i, ti) in t.iter().enumerate().take(steps).skip(1) {
                    let want = s * (i as f64 / steps as f64)
                        / (1.0 + (s - 1.0) * (i as f64 / steps as f64));
                    assert!((ti - want).abs() < 1e-15, "s = {s} step {i}");
                }
            }
        }
    }

    #[test]
    fn shift_one_is_uniform_and_small_shift_moves_steps_early() {
        let u = Schedule::uniform(10).times().unwrap();
        for (i, t) in u.iter().enumerate() {
            assert!((t - i as f64 / 10.0).abs() < 1e-15);
        }
        let early = Schedule::Shifted {
            steps: 10,
            shift: 0.5,
        }
        .times()
        .unwrap();
        assert!(early[1..10].iter().zip(&u[1..10]).all(|(a, b)| a < b));
        assert!((shift_time(0.5, 0.5) - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn bad_grids_are_refused() {
        assert!(Schedule::Explicit(vec![0.0, 0.5, 0.5, 1.0])
            .times()
            .is_err());
        assert!(Schedule::Explicit(vec![0.0, 1.5]).times().is_err());
        assert!(Schedule::Explicit(vec![0.2]).times().is_err());
        assert!(Schedule::uniform(0).times().is_err());
        assert!(Schedule::Shifted {
            steps: 4,
            shift: 0.0
        }
        .times()
        .is_err());
    }
}
