//! wgpu backend: the tiled online-softmax passes of DESIGN §2 as four WGSL kernels.
//!
//! Built once per dataset: device, pipelines, the dataset in chunks (`residency`):
//! resident on the device, or, when it exceeds the device-memory budget, streamed
//! through a ring of chunk-sized slots, chunk k+1 uploading while chunk k computes. A
//! call walks the requested rows in tile steps; per step
//!
//! 1. `logits`:     S = c_dot * X Y_tile^T - c_norm |y|^2          (B x Nt, scratch)
//! 2. `softmax`:    per query, new max, rescale factor, P = exp(S - m) in place, stats
//! 3. `accumulate`: acc = acc * scale + P Y_tile                   (B x D)
//!
//! and after the last step `finalize` merges the splits and divides by the softmax sum.
//!
//! Splits: on a real GPU a small batch cannot fill the device (pass 3 has only B x D
//! outputs), so the row range is cut into `splits` contiguous parts processed side by
//! side, each with its own state and accumulator; they are merged at the end with the
//! same rescale-and-add as [`SoftmaxState::merge`] (which merges the scalar states on the
//! host, so the statistics use the shared formulas). On a software adapter splits = 1.
//!
//! The tile steps are recorded into compute passes of at most `MAX_STEPS_PER_SUBMIT` (64)
//! steps over one chunk, one submit each: a long row range becomes several moderate
//! submissions rather than one (some platforms reset a device whose submission runs for
//! seconds). Each step is still B x tile_rows x D work, so this bounds the steps per
//! submission, not the time. All submissions are queued before waiting once for the
//! readback. A batch larger than the scratch buffers can bind runs as several sub-batches.
//!
//! The bind groups of a call are kept with the scratch buffers they bind and reused by
//! later calls while those buffers are; a dataset buffer's groups (a resident chunk's, or
//! a ring slot's, whichever chunk it holds) are made when a call first reads it. After a
//! failed call (out of memory, say) the scratch buffers and groups are dropped and made
//! afresh by the next call, and what the ring slots hold is forgotten.

mod device;
mod pipelines;
mod residency;

use std::borrow::Cow;
use std::ops::Range;

use crate::dataset::{Dataset, Dtype};
use crate::error::{Error, Result};
use crate::oracle::{Backend, CentredBatch, Posterior, QueryStats, SoftmaxState};

pub use device::adapter_report;
pub use pipelines::kernel_sources;

use device::Gpu;
use pipelines::{
    GpuState, Kernels, StepParams, ACC_TILE_COLUMNS, FINALIZE_WORKGROUP, TILE_QUERIES,
    TILE_ROWS_ALIGN,
};
use residency::Residency;

/// Enough workgroups per dispatch to fill a large GPU a few times over.
const TARGET_WORKGROUPS: usize = 1024;
/// Most splits of the row range (each costs a B x D accumulator).
const MAX_SPLITS: usize = 64;
/// Fewest rows worth a split of their own.
const MIN_SPLIT_ROWS: usize = 256;
/// Tile width bounds (rows per split per step).
const MIN_TILE_ROWS: usize = 64;
const MAX_TILE_ROWS: usize = 1024;
/// Tile width on software adapters: few dispatches, each still cache-sized.
const CPU_TILE_ROWS: usize = 256;
/// Most tile steps recorded into one submission.
const MAX_STEPS_PER_SUBMIT: usize = 64;

/// Knobs of [`GpuBackend::with_options`]; the defaults suit normal use.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Refuse software adapters (lavapipe): what `--backend auto` wants.
    pub hardware_only: bool,
    /// Largest dataset chunk buffer, in bytes (below the device's binding limit), e.g. to
    /// force multi-chunk residency in tests.
    pub max_chunk_bytes: Option<u64>,
    /// Parts the row range is cut into and processed side by side (default: chosen from
    /// the batch and the adapter; 1 on software adapters).
    pub splits: Option<usize>,
    /// Rows per split per tile step, rounded up to a multiple of 64, at most 1024
    /// (default: chosen).
    pub tile_rows: Option<usize>,
    /// Hold f16 data as f32 even where the device has SHADER_F16: the path taken on
    /// devices without it (exact: every f16 is an f32).
    pub f16_as_f32: bool,
    /// Most queries evaluated together (default: as many as the scratch buffers can
    /// bind); larger batches run as several sub-batches.
    pub max_sub_batch: Option<usize>,
    /// Compile the kernels without wgpu's runtime bounds checks (they bound their own
    /// indices). Faster; off by default.
    pub trusted_shaders: bool,
    /// Device memory the dataset may take, in bytes; a larger dataset is streamed through
    /// a ring of chunk-sized slots (chunks cut so the ring fits the budget) instead of
    /// being resident. Default: 4 x the adapter's `max_buffer_size`. wgpu exposes no
    /// free-memory query, so the default keeps the dataset resident (the faster path)
    /// unless it is clearly larger than any device would hold; set a budget to stream
    /// smaller datasets (a device whose memory is shared with other work, say).
    pub max_resident_bytes: Option<u64>,
}

/// Default device-memory budget of the dataset, in multiples of `max_buffer_size`.
const DEFAULT_BUDGET_BUFFERS: u64 = 4;

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

struct Buffers {
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

/// The bind groups over one set of scratch buffers.
struct BindGroups {
    /// The buffers bound: params, x, coefs, logits, states, acc, mean.
    bound: [wgpu::Buffer; 7],
    /// Per dataset buffer (resident chunk or ring slot): (logits, accumulate, softmax),
    /// made when a call first reads the buffer (softmax reads the chunk's row norms).
    chunks: Vec<Option<(wgpu::BindGroup, wgpu::BindGroup, wgpu::BindGroup)>>,
    finalize: wgpu::BindGroup,
}

/// A bind group of `layout`: the step parameters at binding 0 (one `StepParams` at a
/// dynamic offset), then `buffers` whole.
fn bind_group(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    params: &wgpu::Buffer,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let params = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: params,
        offset: 0,
        size: wgpu::BufferSize::new(std::mem::size_of::<StepParams>() as u64),
    });
    let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(params)
        .chain(buffers.iter().map(|b| b.as_entire_binding()))
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout,
        entries: &entries,
    })
}

impl Buffers {
    fn new() -> Buffers {
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
}

/// How one sub-batch is cut.
#[derive(Clone, Copy, Debug)]
struct Plan {
    splits: usize,
    tile_rows: usize,
}

/// The oracle posterior on a GPU through wgpu.
pub struct GpuBackend {
    gpu: Gpu,
    kernels: Kernels,
    residency: Residency,
    /// How the values are held on the device (f16 data may be held as f32).
    storage: Dtype,
    dataset_dtype: Dtype,
    n_samples: usize,
    dim: usize,
    /// vec4s per padded row
    dim4: usize,
    options: GpuOptions,
    buffers: Buffers,
}

impl GpuBackend {
    /// `hardware_only`: refuse CPU adapters (lavapipe), as `--backend auto` wants.
    pub fn new(dataset: &Dataset, hardware_only: bool) -> Result<Self> {
        Self::with_options(
            dataset,
            GpuOptions {
                hardware_only,
                ..Default::default()
            },
        )
    }

    pub fn with_options(dataset: &Dataset, options: GpuOptions) -> Result<Self> {
        let want_f16 = dataset.dtype() == Dtype::F16;
        let gpu = device::open(options.hardware_only, want_f16)?;
        // f16 data on a device without SHADER_F16 is held as f32: exact, twice the memory.
        let storage =
            if want_f16 && !options.f16_as_f32 && gpu.features.contains(wgpu::Features::SHADER_F16)
            {
                Dtype::F16
            } else {
                Dtype::F32
            };
        let built = scoped(&gpu.device, || {
            let kernels = Kernels::new(&gpu.device, storage == Dtype::F16, options.trusted_shaders);
            let chunk_cap = options
                .max_chunk_bytes
                .map_or(gpu.max_binding_bytes(), |c| c.min(gpu.max_binding_bytes()));
            let budget = options.max_resident_bytes.unwrap_or(
                gpu.limits
                    .max_buffer_size
                    .saturating_mul(DEFAULT_BUDGET_BUFFERS),
            );
            let residency = if residency::resident_bytes(dataset, storage) > budget {
                Residency::Streaming(residency::stream(
                    &gpu.device,
                    dataset,
                    storage,
                    chunk_cap,
                    budget,
                )?)
            } else {
                Residency::Resident(residency::upload(&gpu.device, dataset, storage, chunk_cap)?)
            };
            Ok((kernels, residency))
        });
        let (kernels, residency) = built.map_err(|e| match e {
            Error::Gpu(m) => Error::Gpu(format!("{m} (setting up for {})", dataset.name)),
            e => e,
        })?;
        Ok(GpuBackend {
            gpu,
            kernels,
            residency,
            storage,
            dataset_dtype: dataset.dtype(),
            n_samples: dataset.n_samples(),
            dim: dataset.dim(),
            dim4: dataset.dim().div_ceil(4),
            options,
            buffers: Buffers::new(),
        })
    }

    /// Number of chunks the dataset is cut into (each a device buffer when resident).
    pub fn n_chunks(&self) -> usize {
        self.residency.n_chunks()
    }

    /// Whether the dataset is streamed through a ring of device slots.
    pub fn is_streaming(&self) -> bool {
        self.residency.is_streaming()
    }

    /// Most queries one sub-batch can take: the queries, accumulator and mean (B x D each)
    /// and the narrowest logits tile (B x 64) must each fit one binding, and B one
    /// dispatch dimension.
    fn max_sub_batch(&self) -> usize {
        let limit = self.gpu.max_binding_bytes();
        let by_rows = limit / (self.dim4 as u64 * 16);
        let by_logits = limit / (MIN_TILE_ROWS as u64 * 4);
        let by_grid = self.gpu.limits.max_compute_workgroups_per_dimension as u64;
        let most = by_rows.min(by_logits).min(by_grid).max(1) as usize;
        self.options
            .max_sub_batch
            .map_or(most, |m| m.clamp(1, most))
    }

    fn plan(&self, n_queries: usize, n_rows: usize) -> Plan {
        let limit = self.gpu.max_binding_bytes() as usize;
        let query_blocks = n_queries.div_ceil(TILE_QUERIES as usize);
        let column_blocks = self.dim4.div_ceil(ACC_TILE_COLUMNS as usize);
        let max_splits = (limit / (n_queries * self.dim4 * 16))
            .min(limit / (n_queries * MIN_TILE_ROWS * 4))
            .clamp(1, MAX_SPLITS);
        let splits = self
            .options
            .splits
            .unwrap_or_else(|| {
                if self.gpu.is_cpu() {
                    1
                } else {
                    TARGET_WORKGROUPS
                        .div_ceil(query_blocks * column_blocks)
                        .min(n_rows / MIN_SPLIT_ROWS)
                }
            })
            .clamp(1, max_splits)
            .min(n_rows);
        // Every bound below is a multiple of the workgroup's 64 rows; the logits scratch
        // (splits x B x tile_rows) must fit one binding (at least 64 wide, by max_splits).
        let align = TILE_ROWS_ALIGN as usize;
        let split_rows = n_rows.div_ceil(splits).next_multiple_of(align);
        let by_memory = limit / (splits * n_queries * 4) / align * align;
        let tile_rows = self
            .options
            .tile_rows
            .unwrap_or_else(|| {
                if self.gpu.is_cpu() {
                    CPU_TILE_ROWS
                } else {
                    MIN_TILE_ROWS * TARGET_WORKGROUPS.div_ceil(query_blocks * splits)
                }
            })
            .next_multiple_of(align)
            .clamp(MIN_TILE_ROWS, MAX_TILE_ROWS)
            .min(split_rows)
            .min(by_memory);
        Plan { splits, tile_rows }
    }

    /// One sub-batch: queries `x` (n x D) against `rows`; writes n x D of `mean` and
    /// pushes n stats.
    fn run(
        &mut self,
        x: &[f32],
        coefs: &[[f32; 2]],
        rows: Range<usize>,
        mean: &mut [f32],
        stats: &mut Vec<QueryStats>,
    ) -> Result<()> {
        let n_queries = coefs.len();
        let plan = self.plan(n_queries, rows.len());
        let (dim, dim4) = (self.dim, self.dim4);
        let steps = self.steps(n_queries, &rows, plan);

        let device = self.gpu.device.clone();
        let queue = self.gpu.queue.clone();
        let limit = self.gpu.max_binding_bytes();
        let max_buffer = self.gpu.limits.max_buffer_size;
        let align = self.gpu.limits.min_uniform_buffer_offset_alignment as u64;
        let params_stride = (std::mem::size_of::<StepParams>() as u64).next_multiple_of(align);
        let row_bytes = dim4 as u64 * 16;
        let n_virtual = (plan.splits * n_queries) as u64;
        let mean_bytes = n_queries as u64 * row_bytes;
        let states_bytes = n_virtual * std::mem::size_of::<GpuState>() as u64;
        let b = &mut self.buffers;
        let x_buf = b.x.get(&device, mean_bytes, limit).clone();
        let coefs_buf = b.coefs.get(&device, n_queries as u64 * 8, limit).clone();
        let logits_buf = b
            .logits
            .get(&device, n_virtual * plan.tile_rows as u64 * 4, limit)
            .clone();
        let states_buf = b.states.get(&device, states_bytes, limit).clone();
        let acc_buf = b.acc.get(&device, n_virtual * row_bytes, limit).clone();
        let mean_buf = b.mean.get(&device, mean_bytes, limit).clone();
        let params_buf = b
            .params
            .get(
                &device,
                (steps.len() as u64 + 1) * params_stride,
                max_buffer,
            )
            .clone();
        let readback = b
            .readback
            .get(&device, mean_bytes + states_bytes, max_buffer)
            .clone();

        // Uploads: queries padded like the rows, coefficients, every step's parameters
        // (the finalize parameters last).
        if dim == dim4 * 4 {
            queue.write_buffer(&x_buf, 0, bytemuck::cast_slice(x));
        } else {
            let mut padded = vec![0.0f32; n_queries * dim4 * 4];
            for (dst, src) in padded.chunks_mut(dim4 * 4).zip(x.chunks(dim)) {
                dst[..dim].copy_from_slice(src);
            }
            queue.write_buffer(&x_buf, 0, bytemuck::cast_slice(&padded));
        }
        queue.write_buffer(&coefs_buf, 0, bytemuck::cast_slice(coefs));
        let mut params = vec![0u8; (steps.len() + 1) * params_stride as usize];
        let finalize = StepParams {
            n_queries: n_queries as u32,
            dim4: dim4 as u32,
            n_splits: plan.splits as u32,
            ..Default::default()
        };
        for (i, p) in steps
            .iter()
            .map(|(_, p)| p)
            .chain(std::iter::once(&finalize))
            .enumerate()
        {
            let at = i * params_stride as usize;
            params[at..at + std::mem::size_of::<StepParams>()]
                .copy_from_slice(bytemuck::bytes_of(p));
        }
        queue.write_buffer(&params_buf, 0, &params);

        // Bind groups: those of the previous call while it used the same buffers, plus
        // the groups of the chunks this call reads for the first time.
        let k = &self.kernels;
        let bound = [
            params_buf.clone(),
            x_buf.clone(),
            coefs_buf.clone(),
            logits_buf.clone(),
            states_buf.clone(),
            acc_buf.clone(),
            mean_buf.clone(),
        ];
        if b.groups.as_ref().is_none_or(|g| g.bound != bound) {
            b.groups = Some(BindGroups {
                chunks: (0..self.residency.n_buffers()).map(|_| None).collect(),
                finalize: bind_group(
                    &device,
                    &k.finalize.layout,
                    &params_buf,
                    &[&acc_buf, &states_buf, &mean_buf],
                ),
                bound,
            });
        }
        // The dataset buffer each chunk of the call is read from, in call order.
        let mut buffer_of = Vec::new();
        for &(c, _) in &steps {
            if buffer_of.last().is_none_or(|&(last, _)| last != c) {
                buffer_of.push((c, self.residency.buffer_of(c, buffer_of.len())));
            }
        }
        let groups = b.groups.as_mut().expect("just made");
        for &(_, i) in &buffer_of {
            let chunk = self.residency.buffer(i);
            groups.chunks[i].get_or_insert_with(|| {
                (
                    bind_group(
                        &device,
                        &k.logits.layout,
                        &params_buf,
                        &[
                            &x_buf,
                            &coefs_buf,
                            &chunk.values,
                            &chunk.sq_norms,
                            &logits_buf,
                        ],
                    ),
                    bind_group(
                        &device,
                        &k.accumulate.layout,
                        &params_buf,
                        &[&logits_buf, &chunk.values, &states_buf, &acc_buf],
                    ),
                    bind_group(
                        &device,
                        &k.softmax.layout,
                        &params_buf,
                        &[&logits_buf, &states_buf, &chunk.sq_norms],
                    ),
                )
            });
        }
        let groups = &*groups;

        // One pass and one submit per run of at most MAX_STEPS_PER_SUBMIT steps over one
        // chunk, queued without waiting; the finalize and the copies to the readback buffer
        // go last.
        let query_blocks = n_queries.div_ceil(TILE_QUERIES as usize) as u32;
        let splits = plan.splits as u32;
        let mut encoder = device.create_command_encoder(&Default::default());
        // Zero states mean "no row seen" (sum = 0); zero accumulators.
        encoder.clear_buffer(&states_buf, 0, Some(states_bytes));
        encoder.clear_buffer(&acc_buf, 0, Some(n_virtual * row_bytes));
        // Streaming: chunk k is queued for upload into its slot just before its first
        // submit (after the submits of chunk k - 1), see `residency` for the ordering.
        let mut first = 0;
        let mut ordinal = 0;
        let mut current: Option<usize> = None;
        for group in steps
            .chunk_by(|a, b| a.0 == b.0)
            .flat_map(|g| g.chunks(MAX_STEPS_PER_SUBMIT))
        {
            let c = group[0].0;
            if current.is_some_and(|cur| cur != c) {
                ordinal += 1;
            }
            let (chunk, i) = buffer_of[ordinal];
            debug_assert_eq!(chunk, c);
            if current != Some(c) {
                current = Some(c);
                if let Residency::Streaming(stream) = &mut self.residency {
                    stream.load(&device, &queue, i, c)?;
                }
            }
            let (logits_group, accumulate_group, softmax_group) =
                groups.chunks[i].as_ref().expect("made above");
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for i in first..first + group.len() {
                    let offset = [(i as u64 * params_stride) as u32];
                    pass.set_pipeline(&k.logits.pipeline);
                    pass.set_bind_group(0, logits_group, &offset);
                    pass.dispatch_workgroups(
                        (plan.tile_rows as u32).div_ceil(TILE_ROWS_ALIGN),
                        query_blocks,
                        splits,
                    );
                    pass.set_pipeline(&k.softmax.pipeline);
                    pass.set_bind_group(0, softmax_group, &offset);
                    pass.dispatch_workgroups(n_queries as u32, splits, 1);
                    pass.set_pipeline(&k.accumulate.pipeline);
                    pass.set_bind_group(0, accumulate_group, &offset);
                    pass.dispatch_workgroups(
                        (dim4 as u32).div_ceil(ACC_TILE_COLUMNS),
                        query_blocks,
                        splits,
                    );
                }
            }
            first += group.len();
            let done = std::mem::replace(
                &mut encoder,
                device.create_command_encoder(&Default::default()),
            );
            let index = queue.submit([done.finish()]);
            if let Residency::Streaming(stream) = &mut self.residency {
                stream.read_by(i, index);
            }
        }
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&k.finalize.pipeline);
            pass.set_bind_group(
                0,
                &groups.finalize,
                &[(steps.len() as u64 * params_stride) as u32],
            );
            pass.dispatch_workgroups(
                (dim4 as u32).div_ceil(FINALIZE_WORKGROUP),
                n_queries as u32,
                1,
            );
        }
        encoder.copy_buffer_to_buffer(&mean_buf, 0, &readback, 0, mean_bytes);
        encoder.copy_buffer_to_buffer(&states_buf, 0, &readback, mean_bytes, states_bytes);
        queue.submit([encoder.finish()]);

        read_back(&device, &readback, mean_bytes + states_bytes, |bytes| {
            let (mean_read, states_read) = bytes.split_at(mean_bytes as usize);
            let device_mean = pod_slice::<f32>(mean_read);
            for (dst, src) in mean.chunks_mut(dim).zip(device_mean.chunks(dim4 * 4)) {
                dst.copy_from_slice(&src[..dim]);
            }
            let states = pod_slice::<GpuState>(states_read);
            for q in 0..n_queries {
                let mut merged = SoftmaxState::EMPTY;
                let mut sum_norm = 0.0f32;
                for s in 0..plan.splits {
                    let st = states[s * n_queries + q];
                    let (ra, rb) = merged.merge(&st.into());
                    sum_norm = ra * sum_norm + rb * st.sum_norm;
                }
                let mut st = merged.stats();
                st.posterior_variance = crate::oracle::state::posterior_variance(
                    sum_norm,
                    merged.sum,
                    &mean[q * dim..(q + 1) * dim],
                );
                stats.push(st);
            }
        })
    }

    /// The tile steps over `rows`: (chunk index, parameters) in order. Within each chunk
    /// the rows are cut into `plan.splits` contiguous parts walked side by side.
    fn steps(&self, n_queries: usize, rows: &Range<usize>, plan: Plan) -> Vec<(usize, StepParams)> {
        let mut steps = Vec::new();
        for c in 0..self.residency.n_chunks() {
            let chunk_rows = self.residency.chunk_rows(c);
            let start = rows.start.max(chunk_rows.start);
            let end = rows.end.min(chunk_rows.end);
            if start >= end {
                continue;
            }
            let split_len = (end - start).div_ceil(plan.splits);
            for step_offset in (0..split_len).step_by(plan.tile_rows) {
                steps.push((
                    c,
                    StepParams {
                        n_queries: n_queries as u32,
                        dim4: self.dim4 as u32,
                        tile_rows: plan.tile_rows as u32,
                        n_splits: plan.splits as u32,
                        split_base: (start - chunk_rows.start) as u32,
                        split_len: split_len as u32,
                        range_end: (end - chunk_rows.start) as u32,
                        step_offset: step_offset as u32,
                        chunk_first_row: chunk_rows.start as u32,
                        pad: [0; 3],
                    },
                ));
            }
        }
        steps
    }
}

/// Maps `buffer`, waits for the GPU, hands its first `bytes` to `read` and unmaps it.
fn read_back(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    bytes: u64,
    read: impl FnOnce(&[u8]),
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
    rx.recv()
        .map_err(|_| Error::Gpu("readback callback dropped".into()))?
        .map_err(|e| Error::Gpu(format!("reading results back: {e}")))?;
    let out = buffer
        .get_mapped_range(0..bytes)
        .map(|view| read(&view))
        .map_err(|e| Error::Gpu(format!("reading results back: {e}")));
    // Unmapped on every path: a mapped buffer cannot be used by the next submission.
    buffer.unmap();
    out
}

/// `bytes` as a slice of `T`: cast in place where aligned (mapped memory is, in practice),
/// copied otherwise.
fn pod_slice<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// Runs `f` with wgpu's validation and out-of-memory errors turned into `Err` (by
/// default wgpu panics on them).
fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    match (validation.or(oom), out) {
        (Some(e), _) => Err(Error::Gpu(e.to_string())),
        (None, out) => out,
    }
}

impl Backend for GpuBackend {
    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior> {
        let n_queries = batch.logit_coefs.len();
        let dim = self.dim;
        if batch.x.len() != n_queries * dim {
            return Err(Error::Input(format!(
                "{} query values for {n_queries} queries of {dim} values",
                batch.x.len()
            )));
        }
        let rows = batch.rows.clone();
        if rows.is_empty() || rows.end > self.n_samples {
            return Err(Error::Input(format!(
                "rows {rows:?} are empty or outside the {} samples",
                self.n_samples
            )));
        }
        let mut mean = vec![0.0f32; n_queries * dim];
        let mut stats = Vec::with_capacity(n_queries);
        let per_batch = self.max_sub_batch();
        let device = self.gpu.device.clone();
        for q0 in (0..n_queries).step_by(per_batch) {
            let q1 = (q0 + per_batch).min(n_queries);
            let done = scoped(&device, || {
                self.run(
                    &batch.x[q0 * dim..q1 * dim],
                    &batch.logit_coefs[q0..q1],
                    rows.clone(),
                    &mut mean[q0 * dim..q1 * dim],
                    &mut stats,
                )
            });
            if done.is_err() {
                // A buffer whose creation failed is unusable: start afresh next call; what
                // the ring slots hold is unknown.
                self.buffers = Buffers::new();
                self.residency.invalidate();
            }
            done?;
        }
        Ok(Posterior { mean, stats })
    }

    fn describe(&self) -> String {
        let storage = match (self.dataset_dtype, self.storage) {
            (Dtype::F16, Dtype::F32) => "f16 data held as f32",
            (_, Dtype::F16) => "f16 storage",
            (_, Dtype::F32) => "f32 storage",
        };
        let n = self.residency.n_chunks();
        let streaming = if self.residency.is_streaming() {
            format!(
                ", streaming through {} device slot{}",
                self.residency.n_buffers(),
                if self.residency.n_buffers() == 1 {
                    ""
                } else {
                    "s"
                }
            )
        } else {
            String::new()
        };
        format!(
            "gpu: {} ({:?}, {:?}), {storage}, {n} chunk{}{streaming}",
            self.gpu.info.name,
            self.gpu.info.backend,
            self.gpu.info.device_type,
            if n == 1 { "" } else { "s" }
        )
    }
}
