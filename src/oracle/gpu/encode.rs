//! Carrying out a [`Plan`] on the device: the uploads of a sub-batch, then its passes.
//!
//! One compute pass and one submit per [`Submit`] of the plan (at most
//! `MAX_STEPS_PER_SUBMIT` tile steps over one chunk), each step three dispatches
//! (logits, softmax, accumulate), all queued without waiting; the finalize and the
//! copies to the readback buffer go last. Some platforms reset a device whose
//! submission runs for seconds: a long row range becomes several moderate submissions.
//!
//! With a [`Timer`] (profiling on a device with timestamp queries) each pass also writes
//! a timestamp at its start and after every dispatch, resolved in the last submission
//! behind the results in the readback buffer (see `timing`): the kernels' order and the
//! submissions are the same with or without it, so timing does not change the results.

use std::borrow::Cow;

use crate::error::Result;

use super::buffers::{BindGroups, CallBuffers};
use super::health::Waiter;
use super::pipelines::KernelKind;
use super::pipelines::{Kernel, Kernels};
use super::plan::{Plan, Submit};
use super::residency::Residency;
use super::timing::Timer;

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
    /// Timestamps `timer` writes for the plan: one per pass start, one per dispatch.
    pub fn n_timestamps(plan: &Plan) -> usize {
        plan.submits
            .iter()
            .map(|s| 1 + 3 * s.steps.len())
            .sum::<usize>()
            + 2
    }

    /// Submits every pass of the plan, the last one copying the results (and the
    /// timestamps of `timer`, prepared for [`Passes::n_timestamps`], right after them) to
    /// the readback buffer. Streaming: chunk k is queued for upload into its slot just
    /// before its first submit (after the submits of chunk k - 1), see `residency` for
    /// the ordering. Returns the last submission's index (what the read-back waits for).
    pub fn submit(
        &self,
        residency: &mut Residency,
        mut timer: Option<&mut Timer>,
    ) -> Result<wgpu::SubmissionIndex> {
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
            self.steps(&mut encoder, submit, slot, timer.as_deref_mut());
            let done = std::mem::replace(
                &mut encoder,
                device.create_command_encoder(&Default::default()),
            );
            let index = queue.submit([done.finish()]);
            if let Residency::Streaming(stream) = residency {
                stream.read_by(slot, index);
            }
        }
        self.finalize(&mut encoder, timer.as_deref_mut());
        encoder.copy_buffer_to_buffer(&bufs.mean, 0, &bufs.readback, 0, sizes.mean);
        encoder.copy_buffer_to_buffer(&bufs.states, 0, &bufs.readback, sizes.mean, sizes.states);
        if let Some(timer) = timer {
            timer.resolve(&mut encoder, &bufs.readback, sizes.readback);
        }
        Ok(queue.submit([encoder.finish()]))
    }

    /// One pass over the steps of `submit`, reading dataset buffer `slot`.
    fn steps(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        submit: &Submit,
        slot: usize,
        mut timer: Option<&mut Timer>,
    ) {
        let (k, plan) = (self.kernels, self.plan);
        let groups = self.groups.chunk(slot);
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let mut stamp = |pass: &mut wgpu::ComputePass<'_>, kind| {
            if let Some(t) = timer.as_deref_mut() {
                t.stamp(pass, kind);
            }
        };
        stamp(&mut pass, None);
        for i in submit.steps.clone() {
            let offset = [plan.params_offset(i)];
            dispatch(
                &mut pass,
                k.logits_for(plan.logits_tiles()),
                &groups.logits,
                &offset,
                plan.logits_grid(),
            );
            stamp(&mut pass, Some(KernelKind::Logits));
            dispatch(
                &mut pass,
                &k.softmax,
                &groups.softmax,
                &offset,
                plan.softmax_grid(),
            );
            stamp(&mut pass, Some(KernelKind::Softmax));
            dispatch(
                &mut pass,
                &k.accumulate,
                &groups.accumulate,
                &offset,
                plan.accumulate_grid(),
            );
            stamp(&mut pass, Some(KernelKind::Accumulate));
        }
    }

    /// The pass merging the splits into the mean, with the parameters after the steps'.
    fn finalize(&self, encoder: &mut wgpu::CommandEncoder, mut timer: Option<&mut Timer>) {
        let plan = self.plan;
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let offset = [plan.params_offset(plan.steps.len())];
        let (kernel, group) = (&self.kernels.finalize, &self.groups.finalize);
        if let Some(t) = timer.as_deref_mut() {
            t.stamp(&mut pass, None);
        }
        dispatch(&mut pass, kernel, group, &offset, plan.finalize_grid());
        if let Some(t) = timer {
            t.stamp(&mut pass, Some(KernelKind::Finalize));
        }
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
