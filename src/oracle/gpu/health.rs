//! Device trouble turned into errors instead of panics or hangs.
//!
//! wgpu's defaults are hostile to a long batch job: an error outside any error scope
//! panics, a lost device is only reported to a callback, and `poll(wait_indefinitely)`
//! waits forever on a GPU that never finishes. Here:
//! - the device-lost callback and the uncaptured-error handler record what happened, and
//!   every wait checks the record ([`Health::check`]);
//! - every wait polls in short slices ([`Waiter::wait`]) so that Ctrl-C is honoured within
//!   a slice and a submission that takes longer than the limit (default
//!   [`DEFAULT_WAIT_LIMIT`], or `ORACLEFLOW_GPU_TIMEOUT_S`) ends with an error saying so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long one wait for the GPU may last before it is taken as hung. A single
/// submission is at most 64 tile steps (see `plan`), well under a second on a real GPU
/// and a few seconds on lavapipe; ten minutes only trips on a device that stopped.
pub const DEFAULT_WAIT_LIMIT: Duration = Duration::from_secs(600);

/// Environment variable overriding [`DEFAULT_WAIT_LIMIT`], in seconds (fractions allowed).
pub const WAIT_LIMIT_ENV: &str = "ORACLEFLOW_GPU_TIMEOUT_S";

/// One poll slice: how often a wait looks at Ctrl-C, the device's health and the clock.
const SLICE: Duration = Duration::from_millis(50);

/// The wait limit: `ORACLEFLOW_GPU_TIMEOUT_S` when set, else the default.
pub fn wait_limit_from_env() -> Result<Duration> {
    parse_wait_limit(std::env::var(WAIT_LIMIT_ENV).ok().as_deref())
}

/// A positive number of seconds (fractions allowed), or the default for None; anything
/// else is bad input, named.
fn parse_wait_limit(value: Option<&str>) -> Result<Duration> {
    let Some(s) = value else {
        return Ok(DEFAULT_WAIT_LIMIT);
    };
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(Error::Input(format!(
            "{WAIT_LIMIT_ENV}={s:?} is not a positive number of seconds"
        ))),
    }
}

/// What the device reported outside our error scopes.
#[derive(Clone, Default)]
pub(super) struct Health {
    lost: Arc<Mutex<Option<String>>>,
    stray: Arc<Mutex<Option<String>>>,
}

impl Health {
    /// Installs the device-lost callback and the uncaptured-error handler on `device`.
    pub fn watch(device: &wgpu::Device) -> Self {
        let health = Health::default();
        let lost = health.lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            let what = match reason {
                wgpu::DeviceLostReason::Destroyed => "destroyed".to_string(),
                wgpu::DeviceLostReason::Unknown => {
                    "lost (driver reset, removal or a fault)".to_string()
                }
            };
            let what = if message.is_empty() {
                what
            } else {
                format!("{what}: {message}")
            };
            lost.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(what);
        });
        let stray = health.stray.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            // Keep the first: later errors are usually its consequences.
            stray
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| first_line(&e.to_string()));
        }));
        health
    }

    /// Err when the device was lost or reported an error no scope caught.
    pub fn check(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(Error::Gpu(format!("device {why}")));
        }
        if let Some(e) = self.stray.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(Error::Gpu(format!("device error: {e}")));
        }
        Ok(())
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error")
        .to_string()
}

/// How the backend waits for its device: the health record and the time limit.
#[derive(Clone)]
pub(super) struct Waiter {
    pub health: Health,
    pub limit: Duration,
}

impl Waiter {
    /// Polls `device` until `done(finished)` holds (`finished`: the last poll saw the
    /// awaited work complete), in slices of at most 50 ms: returns early with
    /// `Error::Interrupted` on Ctrl-C, with the device's trouble when it was lost, and
    /// with a timeout error naming `what` once the limit has passed. `submission` narrows
    /// the wait to one submission (None: everything queued), so that a pipelined call
    /// waits for its previous sub-batch, not for the one it just queued.
    pub fn wait(
        &self,
        device: &wgpu::Device,
        mut submission: Option<wgpu::SubmissionIndex>,
        what: &str,
        mut done: impl FnMut(bool) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            self.health.check()?;
            let slice = SLICE.min(self.limit.saturating_sub(start.elapsed()));
            let finished = match device.poll(wgpu::PollType::Wait {
                submission_index: submission.clone(),
                timeout: Some(slice),
            }) {
                Ok(_) => true,
                Err(wgpu::PollError::Timeout) => false,
                // A submission a lost device refused has an index no poll will accept:
                // wait for everything instead, which reports the loss (health, above).
                Err(wgpu::PollError::WrongSubmissionIndex(..)) if submission.is_some() => {
                    submission = None;
                    continue;
                }
                Err(e) => return Err(Error::Gpu(format!("waiting for the GPU ({what}): {e}"))),
            };
            self.health.check()?;
            if done(finished) {
                return Ok(());
            }
            crate::interrupt::check()?;
            if start.elapsed() >= self.limit {
                return Err(Error::Gpu(format!(
                    "did not finish {what} within {:.3} s; it may be hung \
                     (raise the limit with {WAIT_LIMIT_ENV}=SECONDS)",
                    self.limit.as_secs_f64()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_limit_values() {
        assert_eq!(parse_wait_limit(None).unwrap(), DEFAULT_WAIT_LIMIT);
        assert_eq!(
            parse_wait_limit(Some(" 2.5 ")).unwrap(),
            Duration::from_millis(2500)
        );
        for bad in ["", "0", "-1", "abc", "inf", "NaN", "1e10"] {
            let e = parse_wait_limit(Some(bad)).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{bad}: {e}");
            assert!(e.to_string().contains(WAIT_LIMIT_ENV), "{bad}: {e}");
        }
    }
}
