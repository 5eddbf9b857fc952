//! Carrying out a [`Plan`] on the device: the uploads of a sub-batch, then its passes.
//!
//! One compute pass and one submit per [`Submit`] of the plan (at most
//! `MAX_STEPS_PER_SUBMIT` tile steps over one chunk), each step three dispatches
//! (logits, softmax, accumulate), all queued without waiting; the finalize and the
//! copies to the readback buffer go last. Some platforms reset a device whose
//! submission runs for seconds: a long row range becomes several moderate submissions.

use std::borrow::Cow;

use crate::error::Result;

use super::buffers::{BindGroups, CallBuffers};
use super::health::Waiter;
use super::pipelines::{Kernel, Kernels};
use super::plan::{Plan, Submit};
use super::residency::Residency;

/// Queries `x` (n x `dim`) padded like the rows to `dim4` vec4s (zeros change no dot
/// product); borrowed when there is no padding.
fn padded_queries(x: &[f32], dim: usize, dim4: usize) -> Cow<'_, [f32]> {
    if dim == dim4 * 4 {
        return Cow::Borrowed(x);
    }
    let mut padded = vec![0.0f32; x.len() / dim * dim4 * 4];
    for (dst, src) in padded.chunks_mut(dim4 * 4).zip(x.chunks(dim)) {
        dst[..dim].copy_from_slice(src);
    }
    Cow::Owned(padded)
}

/// Queues the uploads of a sub-batch: queries, logit coefficients, and every step's
/// parameters (the finalize parameters last).
pub(super) fn upload(
    queue: &wgpu::Queue,
    bufs: &CallBuffers,
    plan: &Plan,
    x: &[f32],
    dim: usize,
    coefs: &[[f32; 2]],
) {
    let x = padded_queries(x, dim, plan.dim4);
    queue.write_buffer(&bufs.x, 0, bytemuck::cast_slice(&x));
    queue.write_buffer(&bufs.coefs, 0, bytemuck::cast_slice(coefs));
    queue.write_buffer(&bufs.params, 0, &plan.params_bytes());
}

/// What the passes of one sub-batch need.
pub(super) struct Passes<'a> {
    pub device: &'a wgpu::Device,
    pub queue: &'a wgpu::Queue,
    pub kernels: &'a Kernels,
    pub groups: &'a BindGroups,
    pub bufs: &'a CallBuffers,
    pub plan: &'a Plan,
    /// The dataset buffer (of `residency`) each chunk read of the plan is bound from.
    pub slots: &'a [usize],
    /// Bounds the wait for a ring slot's last reader (streaming).
    pub waiter: &'a Waiter,
}

impl Passes<'_> {
    /// Submits every pass of the plan, the last one copying the results to the readback
    /// buffer. Streaming: chunk k is queued for upload into its slot just before its
    /// first submit (after the submits of chunk k - 1), see `residency` for the ordering.
    pub fn submit(&self, residency: &mut Residency) -> Result<()> {
        let (device, queue, bufs, sizes) = (self.device, self.queue, self.bufs, &self.plan.sizes);
        let mut encoder = device.create_command_encoder(&Default::default());
        // Zero states mean "no row seen" (sum = 0); zero accumulators.
        encoder.clear_buffer(&bufs.states, 0, Some(sizes.states));
        encoder.clear_buffer(&bufs.acc, 0, Some(sizes.acc));
        let mut loaded = None;
        for submit in &self.plan.submits {
            let slot = self.slots[submit.read];
            if loaded != Some(submit.read) {
                loaded = Some(submit.read);
                if let Residency::Streaming(stream) = residency {
                    stream.load(
                        device,
                        queue,
                        self.waiter,
                        slot,
                        self.plan.reads[submit.read],
                    )?;
                }
            }
            self.steps(&mut encoder, submit, slot);
            let done = std::mem::replace(
                &mut encoder,
                device.create_command_encoder(&Default::default()),
            );
            let index = queue.submit([done.finish()]);
            if let Residency::Streaming(stream) = residency {
                stream.read_by(slot, index);
            }
        }
        self.finalize(&mut encoder);
        encoder.copy_buffer_to_buffer(&bufs.mean, 0, &bufs.readback, 0, sizes.mean);
        encoder.copy_buffer_to_buffer(&bufs.states, 0, &bufs.readback, sizes.mean, sizes.states);
        queue.submit([encoder.finish()]);
        Ok(())
    }

    /// One pass over the steps of `submit`, reading dataset buffer `slot`.
    fn steps(&self, encoder: &mut wgpu::CommandEncoder, submit: &Submit, slot: usize) {
        let (k, plan) = (self.kernels, self.plan);
        let groups = self.groups.chunk(slot);
        let mut pass = encoder.begin_compute_pass(&Default::default());
        for i in submit.steps.clone() {
            let offset = [plan.params_offset(i)];
            dispatch(
                &mut pass,
                k.logits_for(plan.logits_tiles()),
                &groups.logits,
                &offset,
                plan.logits_grid(),
            );
            dispatch(
                &mut pass,
                &k.softmax,
                &groups.softmax,
                &offset,
                plan.softmax_grid(),
            );
            dispatch(
                &mut pass,
                &k.accumulate,
                &groups.accumulate,
                &offset,
                plan.accumulate_grid(),
            );
        }
    }

    /// The pass merging the splits into the mean, with the parameters after the steps'.
    fn finalize(&self, encoder: &mut wgpu::CommandEncoder) {
        let plan = self.plan;
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let offset = [plan.params_offset(plan.steps.len())];
        let (kernel, group) = (&self.kernels.finalize, &self.groups.finalize);
        dispatch(&mut pass, kernel, group, &offset, plan.finalize_grid());
    }
}

fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &Kernel,
    group: &wgpu::BindGroup,
    offset: &[u32],
    [x, y, z]: [u32; 3],
) {
    pass.set_pipeline(&kernel.pipeline);
    pass.set_bind_group(0, group, offset);
    pass.dispatch_workgroups(x, y, z);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_padded_with_zeros() {
        let x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        assert_eq!(
            &*padded_queries(&x, 5, 2),
            &[1., 2., 3., 4., 5., 0., 0., 0., 6., 7., 8., 9., 10., 0., 0., 0.]
        );
        assert!(matches!(padded_queries(&x[..8], 4, 1), Cow::Borrowed(_)));
    }
}
