//! How a call is cut, from the adapter's limits and the shapes alone (no device): where
//! the dataset lives, how many queries go together, the splits and tile width of a
//! sub-batch, its tile steps and submissions, the scratch buffer sizes and the dispatch
//! grids. The driver (`mod.rs`) only carries a [`Plan`] out, so every decision here is
//! unit-tested without a GPU.

use std::ops::Range;

use super::options::GpuOptions;
use super::pipelines::{GpuState, LogitsTiles, StepParams, Tiles, FINALIZE_WORKGROUP};

/// Enough workgroups per dispatch to fill a large GPU a few times over.
const TARGET_WORKGROUPS: usize = 1024;
/// Most splits of the row range (each costs a B x D accumulator).
const MAX_SPLITS: usize = 64;
/// Fewest rows worth a split of their own.
const MIN_SPLIT_ROWS: usize = 256;
/// Tile width bounds (rows per split per step); widths are also multiples of the logits
/// workgroup's rows ([`Limits::row_align`]).
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
    /// Workgroup memory a kernel may declare (which tile shapes fit).
    pub workgroup_bytes: u32,
    /// The tile shapes the kernels were built with (set by [`Limits::with_tiles`]).
    pub tiles: Tiles,
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
            workgroup_bytes: limits.max_compute_workgroup_storage_size,
            tiles: Tiles::default(),
        }
    }

    /// The same limits for kernels built with `tiles`.
    pub fn with_tiles(self, tiles: Tiles) -> Limits {
        Limits { tiles, ..self }
    }

    /// Tile widths are multiples of this: 64, or the logits workgroup's rows if more.
    pub fn row_align(&self) -> usize {
        (self.tiles.logits_rows() as usize).max(MIN_TILE_ROWS)
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
/// and the narrowest logits tile (B x [`Limits::row_align`]) must each fit one binding, and
/// B one dispatch dimension.
pub(super) fn max_sub_batch(limits: &Limits, dim4: usize, option: Option<usize>) -> usize {
    let limit = limits.max_binding_bytes;
    let by_rows = limit / (dim4 as u64 * 16);
    let by_logits = limit / (limits.row_align() as u64 * 4);
    let by_grid = limits.max_workgroups_per_dimension as u64;
    let most = by_rows.min(by_logits).min(by_grid).max(1) as usize;
    option.map_or(most, |m| m.clamp(1, most))
}

/// The queries of each sub-batch of `n_queries`, at most `most` (from [`max_sub_batch`])
/// each, in order.
pub(super) fn sub_batches(n_queries: usize, most: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n_queries)
        .step_by(most)
        .map(move |q0| q0..(q0 + most).min(n_queries))
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
    let tiles = &limits.tiles;
    let align = limits.row_align();
    // Workgroups of one split's accumulate, and of one row tile of its logits.
    let acc_blocks = n_queries.div_ceil(tiles.acc.queries() as usize)
        * dim4.div_ceil(tiles.acc.columns() as usize);
    let query_blocks = n_queries.div_ceil(tiles.logits_for(n_queries).queries() as usize);
    let max_splits = (limit / (n_queries * dim4 * 16))
        .min(limit / (n_queries * align * 4))
        .clamp(1, MAX_SPLITS);
    let splits = options
        .splits
        .unwrap_or_else(|| {
            if limits.is_cpu {
                1
            } else {
                TARGET_WORKGROUPS
                    .div_ceil(acc_blocks)
                    .min(n_rows / MIN_SPLIT_ROWS)
            }
        })
        .clamp(1, max_splits)
        .min(n_rows);
    // Every bound below is a multiple of `align` (the logits workgroup's rows, at least
    // 64); the logits scratch (splits x B x tile_rows) must fit one binding (at least one
    // `align` wide, by max_splits).
    let split_rows = n_rows.div_ceil(splits).next_multiple_of(align);
    let by_memory = limit / (splits * n_queries * 4) / align * align;
    let tile_rows = options
        .tile_rows
        .unwrap_or_else(|| {
            if limits.is_cpu {
                CPU_TILE_ROWS
            } else {
                align * TARGET_WORKGROUPS.div_ceil(query_blocks * splits)
            }
        })
        .next_multiple_of(align)
        .clamp(align, MAX_TILE_ROWS.max(align))
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
    /// The shapes the grids are cut by (those the kernels were built with).
    pub tiles: Tiles,
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
    /// cut into chunks of `chunk_rows` (the backend calls [`Plan::over`]).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn new(
        limits: &Limits,
        options: &GpuOptions,
        n_queries: usize,
        dim4: usize,
        rows: &Range<usize>,
        chunk_rows: &[Range<usize>],
    ) -> Plan {
        Self::over(
            limits,
            options,
            n_queries,
            dim4,
            std::slice::from_ref(rows),
            chunk_rows,
        )
    }

    /// As [`Plan::new`] over a list of disjoint, ascending row ranges (the tiles exact
    /// pruning keeps, `gpu::prune`): cut as their total rows, the steps of each range in
    /// turn (chunks still in call order, so `submits` reads each chunk once).
    pub fn over(
        limits: &Limits,
        options: &GpuOptions,
        n_queries: usize,
        dim4: usize,
        ranges: &[Range<usize>],
        chunk_rows: &[Range<usize>],
    ) -> Plan {
        let n_rows = ranges.iter().map(|r| r.len()).sum();
        let cut = cut(limits, options, n_queries, dim4, n_rows);
        let steps: Vec<Step> = ranges
            .iter()
            .flat_map(|rows| steps(n_queries, dim4, cut, rows, chunk_rows))
            .collect();
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
            tiles: limits.tiles,
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

    fn query_blocks(&self, per_block: u32) -> u32 {
        self.n_queries.div_ceil(per_block as usize) as u32
    }

    /// The logits shape this sub-batch runs.
    pub fn logits_tiles(&self) -> LogitsTiles {
        self.tiles.logits_for(self.n_queries)
    }

    /// Workgroups of `logits`: row tiles x query tiles x splits.
    pub fn logits_grid(&self) -> [u32; 3] {
        [
            (self.cut.tile_rows as u32).div_ceil(self.logits_tiles().rows()),
            self.query_blocks(self.logits_tiles().queries()),
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
            (self.dim4 as u32).div_ceil(self.tiles.acc.columns()),
            self.query_blocks(self.tiles.acc.queries()),
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

#[cfg(test)]
mod tests {
    use super::super::pipelines::AccTiles;
    use super::*;

    /// Limits of a device with storage bindings of `binding` bytes, buffers of `buffer`
    /// bytes and `grid` workgroups per dispatch dimension.
    fn limits(binding: u64, buffer: u64, grid: u32, is_cpu: bool) -> Limits {
        Limits::new(
            &wgpu::Limits {
                max_storage_buffer_binding_size: binding,
                max_buffer_size: buffer,
                max_compute_workgroups_per_dimension: grid,
                ..wgpu::Limits::downlevel_defaults()
            },
            is_cpu,
        )
    }

    /// From a tiny device to a large one, software and hardware.
    fn devices() -> Vec<Limits> {
        let mut out = Vec::new();
        for is_cpu in [false, true] {
            out.push(limits(4096, 1 << 20, 65535, is_cpu));
            out.push(limits(64 << 10, 1 << 20, 100, is_cpu));
            out.push(limits(128 << 20, 256 << 20, 65535, is_cpu));
            out.push(limits(u64::MAX, u64::MAX, 65535, is_cpu));
        }
        // Other tile shapes: 256-row and 64-row logits workgroups, narrow and wide
        // accumulate tiles.
        let shapes = [
            (
                LogitsTiles {
                    wg_r: 32,
                    wg_q: 8,
                    kt: 4,
                },
                AccTiles { wg_c: 1, wg_q: 2 },
            ),
            (LogitsTiles::SMALLEST, AccTiles { wg_c: 14, wg_q: 16 }),
        ];
        for (logits, acc) in shapes {
            for l in [
                limits(4096, 1 << 20, 65535, false),
                limits(64 << 10, 1 << 20, 100, true),
            ] {
                for (narrow, medium) in [(None, None), (Some(Tiles::NARROW), Some(Tiles::MEDIUM))] {
                    out.push(l.with_tiles(Tiles {
                        logits,
                        narrow,
                        medium,
                        acc,
                    }));
                }
            }
        }
        out
    }

    fn options(splits: Option<usize>, tile_rows: Option<usize>) -> GpuOptions {
        GpuOptions {
            splits,
            tile_rows,
            ..Default::default()
        }
    }

    /// Chunks of `per_chunk` rows (the last one shorter) over `n` rows.
    fn chunks(n: usize, per_chunk: usize) -> Vec<Range<usize>> {
        (0..n)
            .step_by(per_chunk)
            .map(|r| r..(r + per_chunk).min(n))
            .collect()
    }

    /// Checks everything a plan promises: a valid cut, each row of `rows` visited exactly
    /// once, submissions that partition the steps, every buffer within its binding and
    /// every grid within the dispatch limit. `what` names the case in failures.
    fn check(
        plan: &Plan,
        limits: &Limits,
        rows: &Range<usize>,
        chunk_rows: &[Range<usize>],
        what: &str,
    ) {
        let cut = plan.cut;
        assert!(
            cut.splits >= 1 && cut.splits <= MAX_SPLITS.min(rows.len()),
            "{what}: {cut:?}"
        );
        assert!(
            cut.tile_rows >= MIN_TILE_ROWS && cut.tile_rows <= MAX_TILE_ROWS,
            "{what}: {cut:?}"
        );
        assert_eq!(cut.tile_rows % limits.row_align(), 0, "{what}: {cut:?}");
        check_coverage(plan, rows, chunk_rows, what);
        check_submits(plan, rows, chunk_rows, what);
        check_sizes_and_grids(plan, limits, what);
    }

    /// Each row of `rows` visited exactly once, computed per tile as the kernels do
    /// (`tile_rows` in common.wgsl), and in increasing order within each split (the
    /// kernels' tie rule relies on it); no other row visited.
    fn check_coverage(plan: &Plan, rows: &Range<usize>, chunk_rows: &[Range<usize>], what: &str) {
        let cut = plan.cut;
        let n_samples = chunk_rows.last().map_or(0, |c| c.end);
        let mut seen = vec![0u32; n_samples];
        let mut last_of_split: Vec<Option<usize>> = vec![None; cut.splits];
        for step in &plan.steps {
            let p = &step.params;
            let chunk = &chunk_rows[step.chunk];
            assert_eq!(p.chunk_first_row as usize, chunk.start, "{what}");
            assert!(p.range_end as usize <= chunk.len(), "{what}: {p:?}");
            assert_eq!(
                (p.n_queries as usize, p.dim4 as usize),
                (plan.n_queries, plan.dim4)
            );
            assert_eq!(
                (p.n_splits as usize, p.tile_rows as usize),
                (cut.splits, cut.tile_rows)
            );
            for split in 0..p.n_splits {
                let start = p.split_base + split * p.split_len + p.step_offset;
                let end = (p.split_base + (split + 1) * p.split_len).min(p.range_end);
                if start >= end {
                    continue;
                }
                let count = (end - start).min(p.tile_rows);
                let first = (p.chunk_first_row + start) as usize;
                if let Some(last) = last_of_split[split as usize] {
                    assert!(
                        first > last,
                        "{what}: split {split} goes back to row {first}"
                    );
                }
                last_of_split[split as usize] = Some(first + count as usize - 1);
                for n in &mut seen[first..first + count as usize] {
                    *n += 1;
                }
            }
        }
        for (r, &n) in seen.iter().enumerate() {
            let want = u32::from(rows.contains(&r));
            assert_eq!(n, want, "{what}: row {r} visited {n} times");
        }
    }

    /// Submissions: the steps in order, at most MAX_STEPS_PER_SUBMIT each, one chunk
    /// each; every chunk overlapping the rows is read once, in order.
    fn check_submits(plan: &Plan, rows: &Range<usize>, chunk_rows: &[Range<usize>], what: &str) {
        let mut next = 0;
        for s in &plan.submits {
            assert_eq!(s.steps.start, next, "{what}");
            assert!(
                !s.steps.is_empty() && s.steps.len() <= MAX_STEPS_PER_SUBMIT,
                "{what}"
            );
            for step in &plan.steps[s.steps.clone()] {
                assert_eq!(step.chunk, plan.reads[s.read], "{what}");
            }
            next = s.steps.end;
        }
        assert_eq!(next, plan.steps.len(), "{what}");
        let overlapping: Vec<usize> = (0..chunk_rows.len())
            .filter(|&c| chunk_rows[c].start < rows.end && rows.start < chunk_rows[c].end)
            .collect();
        assert_eq!(plan.reads, overlapping, "{what}");
    }

    /// Every bound buffer within one binding, the others within one buffer; every grid
    /// within the dispatch limit and covering its tile, columns and queries.
    fn check_sizes_and_grids(plan: &Plan, limits: &Limits, what: &str) {
        let (cut, s) = (plan.cut, &plan.sizes);
        for (name, bytes) in [
            ("x", s.x),
            ("coefs", s.coefs),
            ("logits", s.logits),
            ("states", s.states),
            ("acc", s.acc),
            ("mean", s.mean),
        ] {
            assert!(
                bytes <= limits.max_binding_bytes,
                "{what}: {name} {bytes} B"
            );
        }
        assert!(s.readback <= limits.max_buffer_size, "{what}: readback");
        assert!(s.params <= limits.max_buffer_size, "{what}: params");
        assert_eq!(s.x, (plan.n_queries * plan.dim4 * 16) as u64, "{what}");
        let n_virtual = (cut.splits * plan.n_queries) as u64;
        assert_eq!(s.logits, n_virtual * cut.tile_rows as u64 * 4, "{what}");
        assert_eq!(s.acc, n_virtual * plan.dim4 as u64 * 16, "{what}");
        for grid in [
            plan.logits_grid(),
            plan.softmax_grid(),
            plan.accumulate_grid(),
            plan.finalize_grid(),
        ] {
            assert!(
                grid.iter()
                    .all(|&g| g >= 1 && g <= limits.max_workgroups_per_dimension),
                "{what}: grid {grid:?}"
            );
        }
        // The logits grid covers a whole tile, the accumulate and finalize grids every
        // vec4 column, the query grids every query.
        let [rows_x, queries_y, splits_z] = plan.logits_grid();
        let tiles = &limits.tiles;
        assert_eq!(plan.tiles, *tiles, "{what}");
        let lt = tiles.logits_for(plan.n_queries);
        assert_eq!(lt, plan.logits_tiles(), "{what}");
        if lt != tiles.logits {
            // A small-batch shape: no more query lanes, still one query tile.
            assert!(lt.queries() <= tiles.logits.queries(), "{what}");
            assert!(plan.n_queries <= lt.queries() as usize, "{what}");
        }
        assert!(rows_x * lt.rows() >= cut.tile_rows as u32, "{what}");
        assert!(queries_y * lt.queries() >= plan.n_queries as u32, "{what}");
        assert!(
            plan.accumulate_grid()[1] * tiles.acc.queries() >= plan.n_queries as u32,
            "{what}"
        );
        assert_eq!(splits_z as usize, cut.splits, "{what}");
        assert!(
            plan.accumulate_grid()[0] * tiles.acc.columns() >= plan.dim4 as u32,
            "{what}"
        );
        assert!(
            plan.finalize_grid()[0] * FINALIZE_WORKGROUP >= plan.dim4 as u32,
            "{what}"
        );
    }

    #[test]
    fn limits_keep_bindings_u32_indexable_and_16_byte_aligned() {
        assert_eq!(
            limits(u64::MAX, u64::MAX, 1, false).max_binding_bytes,
            u32::MAX as u64 - 15
        );
        assert_eq!(limits(1000, 1 << 20, 1, false).max_binding_bytes, 992);
        // Metal: the binding limit is the buffer limit.
        assert_eq!(
            limits(1 << 30, 1 << 20, 1, false).max_binding_bytes,
            1 << 20
        );
        let l = limits(1 << 20, 1 << 20, 1, false);
        assert_eq!(l.uniform_offset_alignment, 256);
    }

    #[test]
    fn chunk_cap_and_dataset_budget() {
        let l = limits(1 << 20, 1 << 24, 65535, false);
        let default = GpuOptions::default();
        assert_eq!(chunk_cap(&l, &default), 1 << 20);
        let small = GpuOptions {
            max_chunk_bytes: Some(1000),
            ..Default::default()
        };
        assert_eq!(chunk_cap(&l, &small), 1000);
        let large = GpuOptions {
            max_chunk_bytes: Some(1 << 40),
            ..Default::default()
        };
        assert_eq!(chunk_cap(&l, &large), 1 << 20, "never past one binding");
        assert_eq!(dataset_budget(&l, &default), 4 << 24);
        let budget = GpuOptions {
            max_resident_bytes: Some(12345),
            ..Default::default()
        };
        assert_eq!(dataset_budget(&l, &budget), 12345);
        let huge = limits(u64::MAX, u64::MAX, 65535, false);
        assert_eq!(dataset_budget(&huge, &default), u64::MAX, "saturates");
    }

    #[test]
    fn sub_batches_fit_every_binding_and_the_grid() {
        for l in devices() {
            for dim4 in [1, 4, 196, 768, 25_000] {
                let most = max_sub_batch(&l, dim4, None);
                assert!(most >= 1);
                if (dim4 as u64 * 16) > l.max_binding_bytes {
                    // Not even one row fits: the dataset upload refuses it first.
                    continue;
                }
                let what = format!("{l:?}, dim4 {dim4}: {most}");
                assert!(
                    most as u64 * dim4 as u64 * 16 <= l.max_binding_bytes,
                    "{what}"
                );
                assert!(
                    most as u64 * MIN_TILE_ROWS as u64 * 4 <= l.max_binding_bytes,
                    "{what}"
                );
                assert!(
                    most as u64 <= l.max_workgroups_per_dimension as u64,
                    "{what}"
                );
                // The option only lowers it, and at least one query goes.
                assert_eq!(max_sub_batch(&l, dim4, Some(0)), 1);
                assert_eq!(max_sub_batch(&l, dim4, Some(7)), most.min(7));
                assert_eq!(max_sub_batch(&l, dim4, Some(usize::MAX)), most);
            }
        }
    }

    #[test]
    fn a_batch_larger_than_a_sub_batch_is_cut_into_plans_that_fit() {
        // Tiny bindings: 4096 B hold 8 queries of 128 logits (the default logits
        // workgroup's rows), 64 queries of D <= 4.
        let l = limits(4096, 1 << 20, 65535, false);
        let most = max_sub_batch(&l, 1, None);
        assert_eq!(most, 8);
        let n_queries = 3 * most + 5;
        let batches: Vec<Range<usize>> = sub_batches(n_queries, most).collect();
        assert_eq!(batches.len(), 4);
        let mut next = 0;
        for b in &batches {
            assert_eq!(b.start, next);
            assert!(!b.is_empty() && b.len() <= most);
            next = b.end;
            let rows = 3..1000;
            let chunk_rows = chunks(1000, 300);
            let plan = Plan::new(&l, &GpuOptions::default(), b.len(), 1, &rows, &chunk_rows);
            check(&plan, &l, &rows, &chunk_rows, &format!("queries {b:?}"));
        }
        assert_eq!(next, n_queries);
        assert_eq!(sub_batches(0, most).count(), 0);
    }

    #[test]
    fn every_plan_covers_every_row_once() {
        let forced = [
            (None, None),
            (Some(5), None),
            (None, Some(100)),
            (Some(3), Some(1)),
            (Some(1000), Some(5000)),
        ];
        let mut n_plans = 0;
        for l in devices() {
            for dim in [1, 3, 13, 16, 784] {
                let dim4 = usize::div_ceil(dim, 4);
                if (dim4 as u64 * 16) > l.max_binding_bytes {
                    continue;
                }
                let most = max_sub_batch(&l, dim4, None);
                for n_queries in [1, 7, 65, most] {
                    let n_queries = n_queries.min(most);
                    for (n, per_chunk, rows) in [
                        (1, 1, 0..1),
                        (300, 300, 0..300),
                        (300, 300, 17..18),
                        (5000, 5000, 63..4097),
                        (5000, 700, 0..5000),
                        (5000, 700, 699..1401),
                        (9000, 100, 50..8950),
                        (70_000, 65_536, 0..70_000),
                    ] {
                        let chunk_rows = chunks(n, per_chunk);
                        for (splits, tile_rows) in forced {
                            let plan = Plan::new(
                                &l,
                                &options(splits, tile_rows),
                                n_queries,
                                dim4,
                                &rows,
                                &chunk_rows,
                            );
                            let what = format!(
                                "{l:?} D={dim} B={n_queries} rows {rows:?} of {n} by {per_chunk}, \
                                 forced {splits:?} {tile_rows:?}"
                            );
                            check(&plan, &l, &rows, &chunk_rows, &what);
                            n_plans += 1;
                        }
                    }
                }
            }
        }
        assert!(n_plans > 1000, "{n_plans} plans checked");
    }

    #[test]
    fn software_adapters_take_one_split_of_cpu_sized_tiles() {
        let l = limits(128 << 20, 256 << 20, 65535, true);
        let c = cut(&l, &GpuOptions::default(), 4, 4, 100_000);
        assert_eq!(
            c,
            Cut {
                splits: 1,
                tile_rows: CPU_TILE_ROWS
            }
        );
        // Fewer rows than a tile: the tile shrinks to them (rounded to 64).
        let c = cut(&l, &GpuOptions::default(), 4, 4, 70);
        assert_eq!(
            c,
            Cut {
                splits: 1,
                tile_rows: 128
            }
        );
    }

    #[test]
    fn hardware_splits_a_small_batch_to_fill_the_device() {
        let l = limits(128 << 20, 256 << 20, 65535, false);
        // One query, D = 16: 1024 workgroups wanted, one per split: the most splits, and
        // 1024-row tiles (1024 / (1 query block x 64 splits) = 16 workgroups of 64 rows).
        let c = cut(&l, &GpuOptions::default(), 1, 4, 1_000_000);
        assert_eq!(
            c,
            Cut {
                splits: MAX_SPLITS,
                tile_rows: 1024
            }
        );
        // Splits only where each has MIN_SPLIT_ROWS rows.
        let c = cut(&l, &GpuOptions::default(), 1, 4, 1000);
        assert_eq!(c.splits, 1000 / MIN_SPLIT_ROWS);
        assert_eq!(c.tile_rows, 384, "one split's 334 rows, rounded up to 128");
        // A full batch, D = 1024: accumulate tiles of 64 queries x 32 columns, 16 x 8 = 128
        // workgroups per split: 8 splits; logits: 8 query blocks x 8 splits = 64
        // workgroups per 128 rows, 16 x 128 = 2048 rows wanted, at most 1024.
        let l = l.with_tiles(Tiles::new(LogitsTiles::DEFAULT, 256, 32 << 10));
        assert_eq!((l.tiles.acc.queries(), l.tiles.acc.columns()), (64, 32));
        let c = cut(&l, &GpuOptions::default(), 1024, 256, 1_000_000);
        assert_eq!(
            c,
            Cut {
                splits: 8,
                tile_rows: 1024
            }
        );
    }

    #[test]
    fn many_chunks_one_read_each_and_bounded_submissions() {
        // 64-row logits workgroups and tiles: a 100-row chunk is 2 steps, a 10 000-row
        // chunk 157 (3 submissions).
        let l = limits(128 << 20, 256 << 20, 65535, true).with_tiles(Tiles {
            logits: LogitsTiles::SMALLEST,
            narrow: None,
            medium: None,
            ..Tiles::default()
        });
        let opts = options(None, Some(64));
        let mut chunk_rows = chunks(5000, 100);
        chunk_rows.push(5000..15_000);
        let rows = 150..15_000;
        let plan = Plan::new(&l, &opts, 3, 2, &rows, &chunk_rows);
        check(&plan, &l, &rows, &chunk_rows, "many chunks");
        assert_eq!(plan.reads, (1..=50).collect::<Vec<_>>());
        let last: Vec<&Submit> = plan.submits.iter().filter(|s| s.read == 49).collect();
        let lens: Vec<usize> = last.iter().map(|s| s.steps.len()).collect();
        assert_eq!(lens, [64, 64, 29]);
        assert_eq!(plan.submits.len(), 49 + 3);
    }

    #[test]
    fn params_hold_every_step_then_the_finalize_at_aligned_offsets() {
        let l = limits(128 << 20, 256 << 20, 65535, true);
        let rows = 10..1000;
        let chunk_rows = chunks(1000, 300);
        let plan = Plan::new(&l, &options(Some(2), Some(64)), 5, 4, &rows, &chunk_rows);
        let bytes = plan.params_bytes();
        assert_eq!(bytes.len() as u64, plan.sizes.params);
        let stride = plan.sizes.params_stride as usize;
        assert_eq!(stride % 256, 0);
        let at = |i: usize| -> StepParams {
            let offset = plan.params_offset(i) as usize;
            assert_eq!(offset, i * stride);
            bytemuck::pod_read_unaligned(&bytes[offset..offset + std::mem::size_of::<StepParams>()])
        };
        for (i, step) in plan.steps.iter().enumerate() {
            assert_eq!(bytemuck::bytes_of(&at(i)), bytemuck::bytes_of(&step.params));
        }
        let finalize = at(plan.steps.len());
        assert_eq!(
            (finalize.n_queries, finalize.dim4, finalize.n_splits),
            (5, 4, 2)
        );
    }

    #[test]
    fn padded_dims_size_buffers_by_vec4() {
        // D = 13 is held as 4 vec4 per row.
        let l = limits(128 << 20, 256 << 20, 65535, false);
        let rows = 0..500;
        let plan = Plan::new(
            &l,
            &options(Some(1), Some(64)),
            3,
            13usize.div_ceil(4),
            &rows,
            &chunks(500, 500),
        );
        assert_eq!(plan.sizes.x, 3 * 4 * 16);
        assert_eq!(plan.sizes.mean, 3 * 4 * 16);
        assert_eq!(plan.sizes.readback, 3 * 4 * 16 + 3 * 32);
        assert_eq!(plan.accumulate_grid(), [1, 1, 1]);
        assert_eq!(plan.finalize_grid(), [1, 3, 1]);
    }
}
