//! The scratch buffers of a call and their bind groups, kept across calls.
//!
//! Each scratch buffer grows (by powers of two) when a larger sub-batch arrives and is
//! otherwise reused. The bind groups of a call are kept with the scratch buffers they
//! bind and reused by later calls while those buffers are; a dataset buffer's groups (a
//! resident chunk's, or a ring slot's, whichever chunk it holds) are made when a call
//! first reads it.
//!
//! The backend keeps two [`Buffers`], one per parity of a call's sub-batches, so that
//! one sub-batch can be queued while the previous one's results are read back (see the
//! pipelining in `mod.rs`); the second set is made only when a call has several
//! sub-batches, so single sub-batch calls cost no extra device memory.

use super::pipelines::{binding_names, Kernel, Kernels, StepParams};
use super::plan::{Limits, Sizes};
use super::residency::Residency;

/// A query-sized buffer that grows when a larger batch arrives.
struct Scratch {
    label: &'static str,
    usage: wgpu::BufferUsages,
    buffer: Option<wgpu::Buffer>,
}

impl Scratch {
    fn new(label: &'static str, usage: wgpu::BufferUsages) -> Scratch {
        Scratch {
            label,
            usage,
            buffer: None,
        }
    }

    /// A buffer of at least `bytes` (grown by powers of two up to `cap`).
    fn get(&mut self, device: &wgpu::Device, bytes: u64, cap: u64) -> &wgpu::Buffer {
        let bytes = bytes.max(16);
        if self.buffer.as_ref().is_none_or(|b| b.size() < bytes) {
            let size = bytes.next_power_of_two().min(cap).max(bytes);
            self.buffer = Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(self.label),
                size,
                usage: self.usage,
                mapped_at_creation: false,
            }));
        }
        self.buffer.as_ref().expect("just made")
    }
}

/// The scratch buffers, and the bind groups over them.
pub(super) struct Buffers {
    x: Scratch,
    coefs: Scratch,
    logits: Scratch,
    states: Scratch,
    acc: Scratch,
    mean: Scratch,
    params: Scratch,
    readback: Scratch,
    groups: Option<BindGroups>,
}

/// The scratch buffers one call uses (handles to those of [`Buffers`]).
pub(super) struct CallBuffers {
    pub x: wgpu::Buffer,
    pub coefs: wgpu::Buffer,
    pub logits: wgpu::Buffer,
    pub states: wgpu::Buffer,
    pub acc: wgpu::Buffer,
    pub mean: wgpu::Buffer,
    pub params: wgpu::Buffer,
    pub readback: wgpu::Buffer,
}

/// The bind groups over one set of scratch buffers.
pub(super) struct BindGroups {
    /// The buffers bound: params, x, coefs, logits, states, acc, mean.
    bound: [wgpu::Buffer; 7],
    /// Per dataset buffer (resident chunk or ring slot): its (logits, softmax, accumulate)
    /// groups, made when a call first reads the buffer (softmax reads the chunk's row norms
    /// for the posterior variance).
    chunks: Vec<Option<ChunkGroups>>,
    pub finalize: wgpu::BindGroup,
}

/// The bind groups of the three step kernels over one dataset buffer.
pub(super) struct ChunkGroups {
    pub logits: wgpu::BindGroup,
    pub softmax: wgpu::BindGroup,
    pub accumulate: wgpu::BindGroup,
}

impl BindGroups {
    /// The step groups of dataset buffer `i`, made by [`Buffers::groups`].
    pub fn chunk(&self, i: usize) -> &ChunkGroups {
        self.chunks[i].as_ref().expect("made by Buffers::groups")
    }
}

/// A bind group of `kernel`: the step parameters at binding 0 (one `StepParams` at a
/// dynamic offset), then `buffers` whole at bindings 1, 2, ..., each named by the WGSL
/// variable it binds: the names must be those of the kernel's layout table, in order.
fn bind_group(
    device: &wgpu::Device,
    kernel: &Kernel,
    params: &wgpu::Buffer,
    buffers: &[(&str, &wgpu::Buffer)],
) -> wgpu::BindGroup {
    let names: Vec<&str> = buffers.iter().map(|&(name, _)| name).collect();
    let layout_names: Vec<&str> = binding_names(kernel.kind).iter().map(|&(_, n)| n).collect();
    assert_eq!(names, layout_names[1..], "bind group of {:?}", kernel.kind);
    let params = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: params,
        offset: 0,
        size: wgpu::BufferSize::new(std::mem::size_of::<StepParams>() as u64),
    });
    let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(params)
        .chain(buffers.iter().map(|(_, b)| b.as_entire_binding()))
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &kernel.layout,
        entries: &entries,
    })
}

impl Buffers {
    pub fn new() -> Buffers {
        use wgpu::BufferUsages as U;
        Buffers {
            x: Scratch::new("queries", U::STORAGE | U::COPY_DST),
            coefs: Scratch::new("logit coefs", U::STORAGE | U::COPY_DST),
            logits: Scratch::new("logits", U::STORAGE),
            states: Scratch::new("states", U::STORAGE | U::COPY_SRC | U::COPY_DST),
            acc: Scratch::new("acc", U::STORAGE | U::COPY_DST),
            mean: Scratch::new("mean", U::STORAGE | U::COPY_SRC),
            params: Scratch::new("step params", U::UNIFORM | U::COPY_DST),
            readback: Scratch::new("readback", U::MAP_READ | U::COPY_DST),
            groups: None,
        }
    }

    /// Scratch buffers of at least `sizes`: bound ones within one binding, the params and
    /// readback buffers within one buffer.
    pub fn for_call(
        &mut self,
        device: &wgpu::Device,
        limits: &Limits,
        sizes: &Sizes,
    ) -> CallBuffers {
        let (binding, buffer) = (limits.max_binding_bytes, limits.max_buffer_size);
        CallBuffers {
            x: self.x.get(device, sizes.x, binding).clone(),
            coefs: self.coefs.get(device, sizes.coefs, binding).clone(),
            logits: self.logits.get(device, sizes.logits, binding).clone(),
            states: self.states.get(device, sizes.states, binding).clone(),
            acc: self.acc.get(device, sizes.acc, binding).clone(),
            mean: self.mean.get(device, sizes.mean, binding).clone(),
            params: self.params.get(device, sizes.params, buffer).clone(),
            readback: self.readback.get(device, sizes.readback, buffer).clone(),
        }
    }

    /// The bind groups over `bufs`: those of the previous call while it used the same
    /// buffers, plus the groups of the dataset buffers `read` (indices into `residency`'s
    /// buffers) this call reads for the first time.
    pub fn groups(
        &mut self,
        device: &wgpu::Device,
        kernels: &Kernels,
        residency: &Residency,
        bufs: &CallBuffers,
        read: &[usize],
    ) -> &BindGroups {
        let bound = [
            bufs.params.clone(),
            bufs.x.clone(),
            bufs.coefs.clone(),
            bufs.logits.clone(),
            bufs.states.clone(),
            bufs.acc.clone(),
            bufs.mean.clone(),
        ];
        let params = &bufs.params;
        if self.groups.as_ref().is_none_or(|g| g.bound != bound) {
            self.groups = Some(BindGroups {
                chunks: (0..residency.n_buffers()).map(|_| None).collect(),
                finalize: bind_group(
                    device,
                    &kernels.finalize,
                    params,
                    &[
                        ("acc", &bufs.acc),
                        ("states", &bufs.states),
                        ("mean", &bufs.mean),
                    ],
                ),
                bound,
            });
        }
        let groups = self.groups.as_mut().expect("just made");
        for &i in read {
            let chunk = residency.buffer(i);
            groups.chunks[i].get_or_insert_with(|| ChunkGroups {
                logits: bind_group(
                    device,
                    &kernels.logits,
                    params,
                    &[
                        ("x", &bufs.x),
                        ("coefs", &bufs.coefs),
                        ("y", &chunk.values),
                        ("sq_norms", &chunk.sq_norms),
                        ("logits", &bufs.logits),
                    ],
                ),
                softmax: bind_group(
                    device,
                    &kernels.softmax,
                    params,
                    &[
                        ("logits", &bufs.logits),
                        ("states", &bufs.states),
                        ("sq_norms", &chunk.sq_norms),
                    ],
                ),
                accumulate: bind_group(
                    device,
                    &kernels.accumulate,
                    params,
                    &[
                        ("weights", &bufs.logits),
                        ("y", &chunk.values),
                        ("states", &bufs.states),
                        ("acc", &bufs.acc),
                    ],
                ),
            });
        }
        groups
    }
}
