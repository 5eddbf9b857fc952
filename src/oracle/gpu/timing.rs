//! Per-kernel GPU times from timestamp queries.
//!
//! Why: a call's wall time says how long the host waited, not where the device spent it;
//! tuning the kernels (tile shapes, the fused softmax) needs each kernel's share. Host
//! timers cannot see inside a submission, so the device writes a timestamp at the start
//! of every compute pass and after every dispatch (`TIMESTAMP_QUERY` and
//! `TIMESTAMP_QUERY_INSIDE_PASSES`, both requested at device creation where the adapter
//! has them). The interval between two consecutive timestamps of one pass is charged to
//! the kernel dispatched between them: wgpu puts a barrier between dependent dispatches
//! (every step's kernels are), so the intervals do not overlap and their sum is the
//! pass's busy time. Intervals never span two passes (a pass's first timestamp starts a
//! new interval), so time spent between submissions is nobody's.
//!
//! The queries of a call are resolved in its last submission into a small buffer and
//! copied behind the results into the readback buffer: they come back with the one map
//! the call waits for anyway, at no extra wait. Ticks become milliseconds with the
//! queue's timestamp period.
//!
//! Timing is on only when asked for (`ORACLEFLOW_GPU_PROFILE=1`, or a [`ProfileLog`] in
//! the options, which `bench` gives) and the device has both features; otherwise nothing
//! is written or read and no time is reported: a device without timestamps is not an
//! error.

use std::sync::{Arc, Mutex};

use super::pipelines::KernelKind;

/// Environment variable: when `1`, every call prints its per-kernel times to stderr.
pub const PROFILE_ENV: &str = "ORACLEFLOW_GPU_PROFILE";

/// The device features per-kernel timing needs.
pub(super) const FEATURES: wgpu::Features =
    wgpu::Features::TIMESTAMP_QUERY.union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

/// Most queries of one query set (wgpu's limit); a call uses as many sets as it needs.
const SET_QUERIES: u32 = wgpu::QUERY_SET_MAX_QUERIES;

/// Whether `ORACLEFLOW_GPU_PROFILE` asks for per-call times (any value but empty or `0`).
pub fn profile_from_env() -> bool {
    std::env::var(PROFILE_ENV).is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// Milliseconds each kernel took over one call (all its steps, passes and sub-batches),
/// and the call's host wall time.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct KernelTimes {
    pub logits_ms: f64,
    pub softmax_ms: f64,
    pub accumulate_ms: f64,
    pub finalize_ms: f64,
    /// From the call's entry to its results on the host.
    pub wall_ms: f64,
    /// Host time in the call's submits: the queries' and parameters' uploads, encoding
    /// the passes and handing them to the queue. With one sub-batch (B up to the
    /// sub-batch limit) the device idles meanwhile.
    pub submit_ms: f64,
    /// Host time from handing the last pass over to the results on the host: waiting for
    /// the device (its kernels, and the gaps between and around them), the readback's
    /// mapping and unpacking. Less any earlier sub-batch's overlap, wall is about submit +
    /// wait.
    pub wait_ms: f64,
}

impl KernelTimes {
    /// The kernels' sum: the device's busy time within the call.
    pub fn kernels_ms(&self) -> f64 {
        self.logits_ms + self.softmax_ms + self.accumulate_ms + self.finalize_ms
    }

    fn add(&mut self, kind: KernelKind, ms: f64) {
        *match kind {
            KernelKind::Logits => &mut self.logits_ms,
            KernelKind::Softmax => &mut self.softmax_ms,
            KernelKind::Accumulate => &mut self.accumulate_ms,
            KernelKind::Finalize => &mut self.finalize_ms,
        } += ms;
    }

    /// Adds the kernel times of `other` (another sub-batch of the same call).
    pub fn add_kernels(&mut self, other: &KernelTimes) {
        self.logits_ms += other.logits_ms;
        self.softmax_ms += other.softmax_ms;
        self.accumulate_ms += other.accumulate_ms;
        self.finalize_ms += other.finalize_ms;
    }

    /// The per-field median of `calls` (None when empty): what `bench` reports over its
    /// timed repetitions.
    pub fn median(calls: &[KernelTimes]) -> Option<KernelTimes> {
        if calls.is_empty() {
            return None;
        }
        let med = |f: fn(&KernelTimes) -> f64| {
            let mut v: Vec<f64> = calls.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Some(KernelTimes {
            logits_ms: med(|t| t.logits_ms),
            softmax_ms: med(|t| t.softmax_ms),
            accumulate_ms: med(|t| t.accumulate_ms),
            finalize_ms: med(|t| t.finalize_ms),
            wall_ms: med(|t| t.wall_ms),
            submit_ms: med(|t| t.submit_ms),
            wait_ms: med(|t| t.wait_ms),
        })
    }

    /// One line: each kernel's ms and the kernels' share of the wall time.
    pub fn line(&self) -> String {
        format!(
            "logits {:.3} ms, softmax {:.3} ms, accumulate {:.3} ms, finalize {:.3} ms; \
             kernels {:.3} ms = {:.0}% of {:.3} ms wall (host: submits {:.3} ms, waits and \
             readbacks {:.3} ms)",
            self.logits_ms,
            self.softmax_ms,
            self.accumulate_ms,
            self.finalize_ms,
            self.kernels_ms(),
            100.0 * self.kernels_ms() / self.wall_ms.max(f64::MIN_POSITIVE),
            self.wall_ms,
            self.submit_ms,
            self.wait_ms
        )
    }
}

/// Where a backend records every call's [`KernelTimes`], shared with whoever gave it in
/// [`GpuOptions::profile`](super::GpuOptions::profile) (e.g. `bench`).
#[derive(Clone, Debug, Default)]
pub struct ProfileLog(Arc<Mutex<Vec<KernelTimes>>>);

impl ProfileLog {
    /// The calls recorded since the last take, in order.
    pub fn take(&self) -> Vec<KernelTimes> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn push(&self, t: KernelTimes) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }
}

/// The timestamp queries of one sub-batch: query sets reused across calls, the buffer
/// they are resolved into, and what each timestamp closes.
pub(super) struct Timer {
    sets: Vec<wgpu::QuerySet>,
    resolve: Option<wgpu::Buffer>,
    /// Per timestamp written this call: the kernel dispatched since the previous
    /// timestamp, None at the start of a pass.
    labels: Vec<Option<KernelKind>>,
}

impl Timer {
    pub fn new() -> Timer {
        Timer {
            sets: Vec::new(),
            resolve: None,
            labels: Vec::new(),
        }
    }

    /// Bytes the resolved timestamps of `n_queries` take (what the readback buffer holds
    /// past the results).
    pub fn bytes(n_queries: usize) -> u64 {
        n_queries as u64 * wgpu::QUERY_SIZE as u64
    }

    /// Makes room for `n_queries` timestamps and forgets the last call's.
    pub fn prepare(&mut self, device: &wgpu::Device, n_queries: usize) {
        self.labels.clear();
        let sets = n_queries.div_ceil(SET_QUERIES as usize);
        while self.sets.len() < sets {
            self.sets
                .push(device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: SET_QUERIES,
                }));
        }
        // Each set resolves to its own 256-aligned block (QUERY_RESOLVE_BUFFER_ALIGNMENT
        // divides a whole set's 32 KiB), so the used queries are contiguous.
        let bytes = Self::bytes(sets * SET_QUERIES as usize).max(8);
        if self.resolve.as_ref().is_none_or(|b| b.size() < bytes) {
            self.resolve = Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("resolved timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }));
        }
    }

    /// Writes the next timestamp into `pass`: the end of `kernel`, or (None) the start of
    /// the pass.
    pub fn stamp(&mut self, pass: &mut wgpu::ComputePass<'_>, kernel: Option<KernelKind>) {
        let i = self.labels.len() as u32;
        pass.write_timestamp(&self.sets[(i / SET_QUERIES) as usize], i % SET_QUERIES);
        self.labels.push(kernel);
    }

    /// Resolves this call's timestamps and copies them to `readback` at `offset`.
    pub fn resolve(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        readback: &wgpu::Buffer,
        offset: u64,
    ) {
        let n = self.labels.len() as u32;
        let resolve = self.resolve.as_ref().expect("made by prepare");
        for (s, set) in self.sets.iter().enumerate() {
            let first = s as u32 * SET_QUERIES;
            if first >= n {
                break;
            }
            let used = (n - first).min(SET_QUERIES);
            encoder.resolve_query_set(set, 0..used, resolve, Self::bytes(first as usize));
        }
        encoder.copy_buffer_to_buffer(resolve, 0, readback, offset, Self::bytes(n as usize));
    }

    /// The kernel times of this call from its resolved timestamps (`ticks`, one per
    /// query) and the queue's timestamp period (ns per tick).
    pub fn times(&self, ticks: &[u64], period_ns: f32) -> KernelTimes {
        kernel_times(&self.labels, ticks, period_ns)
    }
}

/// Charges each interval between consecutive timestamps to the kernel that closes it
/// (None opens a pass: no interval ends there). A timestamp going backwards (a driver
/// that resets its counter) counts as zero rather than as a huge wrapped value.
fn kernel_times(labels: &[Option<KernelKind>], ticks: &[u64], period_ns: f32) -> KernelTimes {
    let mut out = KernelTimes::default();
    for (i, (label, &t)) in labels.iter().zip(ticks).enumerate() {
        if let Some(kind) = label {
            let dt = t.saturating_sub(ticks[i - 1]);
            out.add(*kind, dt as f64 * period_ns as f64 / 1e6);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_go_to_the_kernel_that_closes_them() {
        use KernelKind::*;
        let labels = [
            None,
            Some(Logits),
            Some(Softmax),
            Some(Accumulate),
            Some(Logits),
            None,
            Some(Finalize),
        ];
        // 1 tick = 2 ns; a second pass starts at 1000 (the gap 90 -> 1000 is nobody's).
        let ticks = [0, 10, 15, 35, 90, 1000, 1001];
        let t = kernel_times(&labels, &ticks, 2.0);
        let close = |a: f64, ticks: f64| (a - ticks * 2e-6).abs() <= 1e-15;
        assert!(close(t.logits_ms, 10.0 + 55.0), "{t:?}");
        assert!(close(t.softmax_ms, 5.0), "{t:?}");
        assert!(close(t.accumulate_ms, 20.0), "{t:?}");
        assert!(close(t.finalize_ms, 1.0), "{t:?}");
        assert!(close(t.kernels_ms(), 91.0), "{t:?}");
        // Backwards counts as zero.
        let t = kernel_times(&[None, Some(Logits)], &[5, 3], 1.0);
        assert_eq!(t.logits_ms, 0.0);
    }

    #[test]
    fn median_per_field() {
        let t = |l: f64, w: f64| KernelTimes {
            logits_ms: l,
            wall_ms: w,
            ..Default::default()
        };
        assert_eq!(KernelTimes::median(&[]), None);
        let m = KernelTimes::median(&[t(3.0, 1.0), t(1.0, 9.0), t(2.0, 5.0)]).unwrap();
        assert_eq!((m.logits_ms, m.wall_ms), (2.0, 5.0));
        assert!(m.line().contains("logits 2.000 ms"), "{}", m.line());
    }
}
