//! How a call is cut, from the adapter's limits and the shapes alone (no device): where
//! the dataset lives, how many queries go together, the splits and tile width of a
//! sub-batch, its tile steps and submissions, the scratch buffer sizes and the dispatch
//! grids. The driver (`mod.rs`) only carries a [`Plan`] out, so every decision here is
//! unit-tested without a GPU.

use std::ops::Range;

use super::options::GpuOptions;
use super::pipelines::{
    GpuState, StepParams, ACC_TILE_COLUMNS, FINALIZE_WORKGROUP, TILE_QUERIES, TILE_ROWS_ALIGN,
};

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
pub(super) const MAX_STEPS_PER_SUBMIT: usize = 64;
/// Default device-memory budget of the dataset, in multiples of `max_buffer_size`.
const DEFAULT_BUDGET_BUFFERS: u64 = 4;

/// What the plan needs to know of the adapter.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Largest buffer one binding may cover (also a bound on any one buffer we make).
    pub max_binding_bytes: u64,
    pub max_buffer_size: u64,
    pub max_workgroups_per_dimension: u32,
    /// Dynamic uniform offsets are multiples of it.
    pub uniform_offset_alignment: u64,
    /// A software adapter (lavapipe): one split, CPU-sized tiles.
    pub is_cpu: bool,
}

impl Limits {
    /// The limits the device was opened with.
    pub fn new(limits: &wgpu::Limits, is_cpu: bool) -> Limits {
        Limits {
            // At most 4 GiB - 1 even where the device allows more (Metal's binding limit
            // is its buffer limit): the kernels index with u32, and every element is at
            // least a byte.
            max_binding_bytes: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size)
                .min(u32::MAX as u64)
                & !15,
            max_buffer_size: limits.max_buffer_size,
            max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            uniform_offset_alignment: limits.min_uniform_buffer_offset_alignment as u64,
            is_cpu,
        }
    }
}

/// Largest dataset chunk buffer: one binding, or less when the options say so.
pub(super) fn chunk_cap(limits: &Limits, options: &GpuOptions) -> u64 {
    options
        .max_chunk_bytes
        .map_or(limits.max_binding_bytes, |c| {
            c.min(limits.max_binding_bytes)
        })
}

/// Device memory the dataset may take before it is streamed instead of resident.
pub(super) fn dataset_budget(limits: &Limits, options: &GpuOptions) -> u64 {
    options.max_resident_bytes.unwrap_or(
        limits
            .max_buffer_size
            .saturating_mul(DEFAULT_BUDGET_BUFFERS),
    )
}

/// Most queries one sub-batch can take: the queries, accumulator and mean (B x D each)
/// and the narrowest logits tile (B x 64) must each fit one binding, and B one
/// dispatch dimension.
pub(super) fn max_sub_batch(limits: &Limits, dim4: usize, option: Option<usize>) -> usize {
    let limit = limits.max_binding_bytes;
    let by_rows = limit / (dim4 as u64 * 16);
    let by_logits = limit / (MIN_TILE_ROWS as u64 * 4);
    let by_grid = limits.max_workgroups_per_dimension as u64;
    let most = by_rows.min(by_logits).min(by_grid).max(1) as usize;
    option.map_or(most, |m| m.clamp(1, most))
}

/// How one sub-batch is cut: `splits` parts of the row range side by side, each walked
/// `tile_rows` rows per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cut {
    pub splits: usize,
    pub tile_rows: usize,
}

/// The cut of `n_queries` (at most [`max_sub_batch`]) against `n_rows` rows.
pub(super) fn cut(
    limits: &Limits,
    options: &GpuOptions,
    n_queries: usize,
    dim4: usize,
    n_rows: usize,
) -> Cut {
    let limit = limits.max_binding_bytes as usize;
    let query_blocks = n_queries.div_ceil(TILE_QUERIES as usize);
    let column_blocks = dim4.div_ceil(ACC_TILE_COLUMNS as usize);
    let max_splits = (limit / (n_queries * dim4 * 16))
        .min(limit / (n_queries * MIN_TILE_ROWS * 4))
        .clamp(1, MAX_SPLITS);
    let splits = options
        .splits
        .unwrap_or_else(|| {
            if limits.is_cpu {
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
    let tile_rows = options
        .tile_rows
        .unwrap_or_else(|| {
            if limits.is_cpu {
                CPU_TILE_ROWS
            } else {
                MIN_TILE_ROWS * TARGET_WORKGROUPS.div_ceil(query_blocks * splits)
            }
        })
        .next_multiple_of(align)
        .clamp(MIN_TILE_ROWS, MAX_TILE_ROWS)
        .min(split_rows)
        .min(by_memory);
    Cut { splits, tile_rows }
}

/// One tile step: the chunk it reads and its parameters.
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    pub chunk: usize,
    pub params: StepParams,
}

/// The tile steps over `rows`, chunk by chunk (`chunk_rows`: the dataset rows of each
/// chunk, in order). Within each chunk the rows are cut into `cut.splits` contiguous
/// parts walked side by side.
pub(super) fn steps(
    n_queries: usize,
    dim4: usize,
    cut: Cut,
    rows: &Range<usize>,
    chunk_rows: &[Range<usize>],
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (c, chunk_rows) in chunk_rows.iter().enumerate() {
        let start = rows.start.max(chunk_rows.start);
        let end = rows.end.min(chunk_rows.end);
        if start >= end {
            continue;
        }
        let split_len = (end - start).div_ceil(cut.splits);
        for step_offset in (0..split_len).step_by(cut.tile_rows) {
            steps.push(Step {
                chunk: c,
                params: StepParams {
                    n_queries: n_queries as u32,
                    dim4: dim4 as u32,
                    tile_rows: cut.tile_rows as u32,
                    n_splits: cut.splits as u32,
                    split_base: (start - chunk_rows.start) as u32,
                    split_len: split_len as u32,
                    range_end: (end - chunk_rows.start) as u32,
                    step_offset: step_offset as u32,
                    chunk_first_row: chunk_rows.start as u32,
                    pad: [0; 3],
                },
            });
        }
    }
    steps
}

/// One submission: a run of at most [`MAX_STEPS_PER_SUBMIT`] steps over one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Submit {
    /// Index into [`Plan::reads`]: which chunk read of the call it belongs to.
    pub read: usize,
    /// Indices into [`Plan::steps`].
    pub steps: Range<usize>,
}

/// The chunks `steps` read, in call order, and the submissions that carry them out.
pub(super) fn submits(steps: &[Step]) -> (Vec<usize>, Vec<Submit>) {
    let mut reads: Vec<usize> = Vec::new();
    let mut submits = Vec::new();
    let mut first = 0;
    for group in steps
        .chunk_by(|a, b| a.chunk == b.chunk)
        .flat_map(|g| g.chunks(MAX_STEPS_PER_SUBMIT))
    {
        if reads.last() != Some(&group[0].chunk) {
            reads.push(group[0].chunk);
        }
        submits.push(Submit {
            read: reads.len() - 1,
            steps: first..first + group.len(),
        });
        first += group.len();
    }
    (reads, submits)
}

/// Bytes of each scratch buffer of a sub-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Sizes {
    /// Queries, padded like the rows (B x dim4 vec4).
    pub x: u64,
    /// (c_dot, c_norm) per query.
    pub coefs: u64,
    /// splits x B x tile_rows f32.
    pub logits: u64,
    /// splits x B `GpuState`.
    pub states: u64,
    /// splits x B x dim4 vec4.
    pub acc: u64,
    /// B x dim4 vec4.
    pub mean: u64,
    /// Every step's `StepParams` and the finalize's, `params_stride` apart.
    pub params: u64,
    pub params_stride: u64,
    /// The mean, then the states.
    pub readback: u64,
}

/// Everything one sub-batch does, decided before touching the device.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    pub n_queries: usize,
    pub dim4: usize,
    pub cut: Cut,
    pub steps: Vec<Step>,
    /// The chunks read, in call order (a chunk the call reads is read once).
    pub reads: Vec<usize>,
    pub submits: Vec<Submit>,
    pub sizes: Sizes,
}

impl Plan {
    /// The plan of `n_queries` (at most [`max_sub_batch`]) against `rows` of a dataset
    /// cut into chunks of `chunk_rows`.
    pub fn new(
        limits: &Limits,
        options: &GpuOptions,
        n_queries: usize,
        dim4: usize,
        rows: &Range<usize>,
        chunk_rows: &[Range<usize>],
    ) -> Plan {
        let cut = cut(limits, options, n_queries, dim4, rows.len());
        let steps = steps(n_queries, dim4, cut, rows, chunk_rows);
        let (reads, submits) = submits(&steps);
        let row_bytes = dim4 as u64 * 16;
        let n_virtual = (cut.splits * n_queries) as u64;
        let mean = n_queries as u64 * row_bytes;
        let states = n_virtual * std::mem::size_of::<GpuState>() as u64;
        let params_stride = (std::mem::size_of::<StepParams>() as u64)
            .next_multiple_of(limits.uniform_offset_alignment);
        let sizes = Sizes {
            x: mean,
            coefs: n_queries as u64 * 8,
            logits: n_virtual * cut.tile_rows as u64 * 4,
            states,
            acc: n_virtual * row_bytes,
            mean,
            params: (steps.len() as u64 + 1) * params_stride,
            params_stride,
            readback: mean + states,
        };
        Plan {
            n_queries,
            dim4,
            cut,
            steps,
            reads,
            submits,
            sizes,
        }
    }

    /// The parameters of the finalize pass (it reads only these fields).
    pub fn finalize_params(&self) -> StepParams {
        StepParams {
            n_queries: self.n_queries as u32,
            dim4: self.dim4 as u32,
            n_splits: self.cut.splits as u32,
            ..Default::default()
        }
    }

    /// The contents of the params buffer: every step's parameters, then the finalize's,
    /// each at a multiple of `params_stride`.
    pub fn params_bytes(&self) -> Vec<u8> {
        let stride = self.sizes.params_stride as usize;
        let mut params = vec![0u8; self.sizes.params as usize];
        let finalize = self.finalize_params();
        for (i, p) in self
            .steps
            .iter()
            .map(|s| &s.params)
            .chain(std::iter::once(&finalize))
            .enumerate()
        {
            params[i * stride..i * stride + std::mem::size_of::<StepParams>()]
                .copy_from_slice(bytemuck::bytes_of(p));
        }
        params
    }

    /// Dynamic offset of step `i`'s parameters (`steps.len()`: the finalize's).
    pub fn params_offset(&self, i: usize) -> u32 {
        (i as u64 * self.sizes.params_stride) as u32
    }

    fn query_blocks(&self) -> u32 {
        self.n_queries.div_ceil(TILE_QUERIES as usize) as u32
    }

    /// Workgroups of `logits`: row tiles x query tiles x splits.
    pub fn logits_grid(&self) -> [u32; 3] {
        [
            (self.cut.tile_rows as u32).div_ceil(TILE_ROWS_ALIGN),
            self.query_blocks(),
            self.cut.splits as u32,
        ]
    }

    /// Workgroups of `softmax`: one per query and split.
    pub fn softmax_grid(&self) -> [u32; 3] {
        [self.n_queries as u32, self.cut.splits as u32, 1]
    }

    /// Workgroups of `accumulate`: column tiles x query tiles x splits.
    pub fn accumulate_grid(&self) -> [u32; 3] {
        [
            (self.dim4 as u32).div_ceil(ACC_TILE_COLUMNS),
            self.query_blocks(),
            self.cut.splits as u32,
        ]
    }

    /// Workgroups of `finalize`: column blocks x queries.
    pub fn finalize_grid(&self) -> [u32; 3] {
        [
            (self.dim4 as u32).div_ceil(FINALIZE_WORKGROUP),
            self.n_queries as u32,
            1,
        ]
    }
}
