//! Sharding: one evaluation split by rows over several workers whose unnormalised states
//! ([`Partial`](crate::oracle::Partial)) merge exactly (docs/DESIGN.md §7).
//!
//! - [`devices`]: several devices of one process (`--devices`): wgpu adapters and the cpu
//!   backend, each on its own thread over its share of the rows, merged in row order.
//! - [`mpi`]: several processes (`mpirun`, cargo feature `mpi`): each rank holds only its
//!   share of the dataset's rows, and an allreduce merges the ranks' states.

pub mod devices;
pub mod mpi;

pub use devices::{DeviceList, ShardedBackend};

use std::ops::Range;

/// Cuts `rows` into consecutive ranges, one per weight, of lengths proportional to the
/// weights (rounded at the cumulative boundaries, so they add up to `rows` exactly).
/// A range may be empty when `rows` is short.
pub fn split_rows(rows: Range<usize>, weights: &[f64]) -> Vec<Range<usize>> {
    let total: f64 = weights.iter().sum();
    let n = rows.len();
    let mut cum = 0.0;
    let mut start = rows.start;
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            cum += w;
            let end = if i + 1 == weights.len() {
                rows.end
            } else {
                rows.start + ((n as f64 * cum / total).round() as usize).min(n)
            };
            let r = start..end.max(start);
            start = r.end;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_covers_the_range_in_order() {
        assert_eq!(split_rows(10..20, &[1.0, 1.0]), vec![10..15, 15..20]);
        assert_eq!(split_rows(0..10, &[3.0, 1.0]), vec![0..8, 8..10]);
        assert_eq!(split_rows(0..2, &[1.0; 4]), vec![0..1, 1..1, 1..2, 2..2]);
        for n in 0..40 {
            let parts = split_rows(5..5 + n, &[1.0, 2.5, 0.5]);
            assert_eq!(parts.iter().map(|r| r.len()).sum::<usize>(), n);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
