//! Size checks made before allocating, shared by every loader (and home of
//! [`keep_first`], so the loaders need nothing from `spec`, which needs them).
//!
//! An allocation the machine cannot satisfy aborts the process (no error, a backtrace, exit
//! 134). So every loader computes the bytes it is about to allocate from headers and
//! counts, and [`check_alloc`] refuses them with the bytes needed and available first.

use std::path::Path;

use crate::error::{Error, Result};

/// Bytes the process may still allocate: `MemAvailable` from /proc/meminfo, lowered to
/// the cgroup's remaining limit (containers) when there is one and to
/// `$ORACLEFLOW_MAX_MEMORY` when set. `None` when unknown (not Linux): then nothing is
/// refused here.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut available = kib.saturating_mul(1024);
    if let Some(limit) = cgroup_remaining() {
        available = available.min(limit);
    }
    if let Some(cap) = user_cap() {
        available = available.min(cap);
    }
    Some(available)
}

/// Environment variable capping the memory the loaders may take, in bytes (e.g. to keep
/// a shared machine usable, or under a fuzzer's memory limit).
pub const MAX_MEMORY_ENV: &str = "ORACLEFLOW_MAX_MEMORY";

fn user_cap() -> Option<u64> {
    std::env::var(MAX_MEMORY_ENV).ok()?.trim().parse().ok()
}

/// cgroup v2 `memory.max - memory.current` ("max" = no limit).
fn cgroup_remaining() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(name));
    let max: u64 = read("memory.max").ok()?.trim().parse().ok()?;
    let current: u64 = read("memory.current").ok()?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses to go on when `what` would need more than the available memory. `None` for
/// `bytes` means the size overflowed 64 bits (an absurd header): refused too.
pub fn check_alloc(what: &str, bytes: Option<u64>) -> Result<()> {
    let available = available_memory();
    match (bytes, available) {
        (Some(needed), Some(available)) if needed > available => Err(Error::TooLarge {
            what: what.to_string(),
            needed,
            available,
        }),
        (None, available) => Err(Error::TooLarge {
            what: what.to_string(),
            needed: u64::MAX,
            available: available.unwrap_or(0),
        }),
        _ => Ok(()),
    }
}

/// `a * b * ...` in u64, `None` on overflow.
pub fn product(factors: &[usize]) -> Option<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
}

/// Reads a whole file after checking that its size fits in memory.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    check_alloc(&path.display().to_string(), Some(len))?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// How many of a source's `n_samples` to keep for `limit` (all when None); asking for more
/// samples than `source` has is an error naming it.
pub fn keep_first(source: &Path, n_samples: usize, limit: Option<usize>) -> Result<usize> {
    match limit {
        None => Ok(n_samples),
        Some(m) if m <= n_samples => Ok(m),
        Some(m) => Err(Error::data(
            source,
            format!("has {n_samples} samples; @{m} asks for more"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_refused_with_both_numbers() {
        let err = check_alloc("x", Some(u64::MAX / 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x: needs ") && err.contains("available"),
            "{err}"
        );
        assert!(check_alloc("x", None).is_err());
        assert!(check_alloc("x", Some(1024)).is_ok());
        assert_eq!(product(&[usize::MAX, 2]), None);
        assert_eq!(product(&[3, 4]), Some(12));
    }
}
