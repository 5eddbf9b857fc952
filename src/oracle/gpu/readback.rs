//! The read-back phase: wait for the GPU, map the readback buffer, and turn its bytes
//! (the padded mean, then the per-split states) into the caller's mean and stats.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::oracle::{QueryStats, SoftmaxState};

use super::health::Waiter;
use super::pipelines::GpuState;
use super::plan::Plan;

/// Maps `buffer`, waits for the GPU (bounded: see [`Waiter`]; for `submission` only when
/// given, else for everything queued), hands its first `bytes` to `read` and unmaps it.
pub(super) fn read_back(
    device: &wgpu::Device,
    waiter: &Waiter,
    buffer: &wgpu::Buffer,
    bytes: u64,
    submission: Option<wgpu::SubmissionIndex>,
    read: impl FnOnce(&[u8]),
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let _ = tx.send(r);
    });
    let mut mapped = None;
    let waited = waiter.wait(
        device,
        submission,
        "the evaluation and its read-back",
        |_| {
            if mapped.is_none() {
                mapped = rx.try_recv().ok();
            }
            mapped.is_some()
        },
    );
    if let Err(e) = waited {
        // The map request may still be pending: unmapping cancels it, so the buffer is
        // usable again should the caller retry.
        buffer.unmap();
        return Err(e);
    }
    mapped
        .expect("the wait ends only once mapped")
        .map_err(|e| Error::Gpu(format!("reading results back: {e}")))?;
    let out = buffer
        .get_mapped_range(0..bytes)
        .map(|view| read(&view))
        .map_err(|e| Error::Gpu(format!("reading results back: {e}")));
    // Unmapped on every path: a mapped buffer cannot be used by the next submission.
    buffer.unmap();
    out
}

/// Unpacks the readback bytes of `plan` (`plan.sizes.readback` of them): writes the
/// n x `dim` mean (dropping the row padding) and pushes n stats, each the merge of the
/// query's split states (host-side, with the shared [`SoftmaxState::merge`]); pushes each
/// query's merged state and sum_j e_j |y_j|^2 to `states_out` when given.
pub(super) fn unpack(
    bytes: &[u8],
    plan: &Plan,
    dim: usize,
    mean: &mut [f32],
    stats: &mut Vec<QueryStats>,
    mut states_out: Option<&mut Vec<(SoftmaxState, f32)>>,
) {
    let (mean_read, states_read) = bytes.split_at(plan.sizes.mean as usize);
    let device_mean = pod_slice::<f32>(mean_read);
    for (dst, src) in mean.chunks_mut(dim).zip(device_mean.chunks(plan.dim4 * 4)) {
        dst.copy_from_slice(&src[..dim]);
    }
    let states = pod_slice::<GpuState>(states_read);
    let n_queries = plan.n_queries;
    for q in 0..n_queries {
        let mut merged = SoftmaxState::EMPTY;
        // sum_j e_j |y_j|^2 rides along with the softmax sum, rescaled the same way.
        let mut sum_norm = 0.0f32;
        for s in 0..plan.cut.splits {
            let st = states[s * n_queries + q];
            let (ra, rb) = merged.merge(&st.into());
            sum_norm = ra * sum_norm + rb * st.sum_norm;
        }
        if let Some(out) = states_out.as_deref_mut() {
            out.push((merged, sum_norm));
        }
        let mut st = merged.stats();
        st.posterior_variance = crate::oracle::state::posterior_variance(
            sum_norm,
            merged.sum,
            &mean[q * dim..(q + 1) * dim],
        );
        stats.push(st);
    }
}

/// `bytes` as a slice of `T`: cast in place where aligned (mapped memory is, in practice),
/// copied otherwise.
pub(super) fn pod_slice<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}
