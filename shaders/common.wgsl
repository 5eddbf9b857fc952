// Declarations shared by every kernel. The host compiles each kernel as this file followed
// by the kernel's own file (`src/oracle/gpu/pipelines.rs`), so a kernel file holds only its
// own bindings, constants and entry point.
//
// Before this file the host puts `const` lines generated from its own constants, so the
// sizes it dispatches by are the ones the kernels are compiled with:
//   FINALIZE_WG  threads per workgroup in `finalize` (`FINALIZE_WORKGROUP`)
// The tile shapes of `logits` and `accumulate` are `override` constants in their own files,
// set per pipeline by the host (`Tiles` in pipelines.rs): one source, several shapes.
//
// The next line is the storage type of the dataset, read by `logits` and `accumulate`; the
// host swaps it for vec4<f16> (and puts `enable f16;` first) for f16 datasets. Arithmetic
// is f32 either way.
alias YVec = vec4<f32>;

// Per-dispatch parameters (`StepParams` on the host), one per tile step.
struct Params {
    n_queries: u32,
    dim4: u32,
    tile_rows: u32,
    n_splits: u32,
    split_base: u32,
    split_len: u32,
    range_end: u32,
    step_offset: u32,
    chunk_first_row: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// The scalar online-softmax state of one query and split (`GpuState` on the host),
// indexed split * B + q.
struct QueryState {
    max: f32,
    sum: f32,
    sum_shifted_logit: f32,
    sum_sq: f32,
    // global row index
    argmax: u32,
    scale: f32,
    // sum_j e_j |y_j|^2 on the scale of `sum` (posterior variance; softmax.wgsl)
    sum_norm: f32,
    pad1: u32,
}

// Binding 0 of every kernel, at a dynamic offset of one uniform buffer.
@group(0) @binding(0) var<uniform> p: Params;

// Below every logit the kernels produce; avoids relying on infinities, which WGSL
// implementations may assume absent.
const LOWEST: f32 = -3.0e38;

// Chunk-local rows of one split at this step: [start, start + count), count <= tile_rows.
struct TileRows {
    start: u32,
    count: u32,
}

fn tile_rows(split: u32) -> TileRows {
    let start = p.split_base + split * p.split_len + p.step_offset;
    let end = min(p.split_base + (split + 1u) * p.split_len, p.range_end);
    if start >= end {
        return TileRows(start, 0u);
    }
    return TileRows(start, min(end - start, p.tile_rows));
}
