// Pass 3 of a tile step: acc = acc * scale + E * Y_tile for every query (grid z = split).
//
// E = exp(S - m') is this step's weights, computed here while the logits S (pass 1's
// output) are staged, with m' the new running max pass 2 left in the state (pass 2 writes
// no weights: no B x Nt write-back and re-read). Y_tile is the split's rows, and scale the
// per-query rescale factor pass 2 left in the state. The output is B x dim4 vec4s per
// split: the weighted sum of rows, not yet divided by the softmax sum.
//
// Register tiling. A workgroup of WG_C x WG_Q threads owns TQ = 8 WG_Q queries x TC =
// 2 WG_C vec4 columns; thread (lx, ly) keeps queries ly + WG_Q i (i < 8) at columns lx and
// lx + WG_C: 16 vec4 accumulators, held as four 4x4 matrices. Per 4 rows a thread reads 8
// weight and 8 Y vec4s from workgroup memory for 256 FMAs (today's 4 x 2 block: 12 reads for
// 128).
//
// Column tiles per D. WG_C and WG_Q are chosen on the host for each dataset so that TC
// divides dim4 and the workgroup is whole warps where it can (D = 784: dim4 = 196 = 7 x 28,
// so 14 x 16 threads, 7 tiles, no idle lane, where a fixed 32-wide tile leaves 12.5% of
// them idle); they are pipeline-overridable constants, so the one source serves every D.
//
// Double buffering. The loop runs over the tile's rows TJ = 16 at a time through two halves
// of workgroup memory: step s first stages step s + 1's weights and rows into the other
// half (global loads issued before this step's compute), then computes on its own half;
// one barrier per step (a half is rewritten only after the barrier that ended the last
// step reading it).
//
// Every index is bounded here (queries by n_queries, rows by the tile's count, columns by
// dim4), so the kernel runs with wgpu's runtime checks off (trusted shaders).
//
// p, QueryState, tile_rows and YVec are in common.wgsl, which the host puts first.

// this step's logits S (named for what they become), (split * B + q) * tile_rows + j, read
// four rows at a time
@group(0) @binding(1) var<storage, read> weights: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> y: array<YVec>;
@group(0) @binding(3) var<storage, read> states: array<QueryState>;
// (split * B + q) * dim4 + c
@group(0) @binding(4) var<storage, read_write> acc: array<vec4<f32>>;

// threads along the vec4 columns
override WG_C: u32 = 16u;
// threads along the queries
override WG_Q: u32 = 8u;

// rows per step
const TJ: u32 = 16u;
// workgroup-memory stride of one query's weights (TJ / 4 vec4s; no padding: the threads
// of a warp read at most a few distinct queries' weights, broadcast within each)
const WSTR: u32 = 4u;
override TQ: u32 = 8u * WG_Q;
override TC: u32 = 2u * WG_C;
override WG: u32 = WG_C * WG_Q;
override WS_HALF: u32 = TQ * WSTR;
override YS_HALF: u32 = TJ * TC;

// [half][q * WSTR + j / 4]: the weights of four consecutive rows
var<workgroup> ws: array<vec4<f32>, 2u * WS_HALF>;
// [half][j * TC + c]
var<workgroup> ys: array<vec4<f32>, 2u * YS_HALF>;

// Stages the weights exp(s - m') and rows j0 .. j0 + TJ of the tile into half `buf` (zeros
// outside the queries, rows and columns).
fn stage(buf: u32, j0: u32, tile: TileRows, q0: u32, c0: u32, vq0: u32, li: u32) {
    let lane_rows = vec4<u32>(0u, 1u, 2u, 3u);
    for (var e = li; e < TQ * 4u; e += WG) {
        let q = q0 + e / 4u;
        let j = j0 + 4u * (e % 4u);
        var w = vec4<f32>();
        if q < p.n_queries && j < tile.count {
            let s = weights[(vq0 + q) * (p.tile_rows / 4u) + j / 4u];
            let m = states[vq0 + q].max;
            // Slots past the tile's rows hold stale values from earlier steps.
            w = select(vec4<f32>(), exp(s - vec4<f32>(m)), vec4<u32>(j) + lane_rows < vec4<u32>(tile.count));
        }
        ws[buf * WS_HALF + (e / 4u) * WSTR + e % 4u] = w;
    }
    for (var e = li; e < TJ * TC; e += WG) {
        let r = j0 + e / TC;
        let c = c0 + e % TC;
        var v = vec4<f32>();
        if r < tile.count && c < p.dim4 {
            v = vec4<f32>(y[(tile.start + r) * p.dim4 + c]);
        }
        ys[buf * YS_HALF + e] = v;
    }
}

// acc = acc * scale + sum for query q of the split starting at vq0, columns c and c + WG_C.
fn store(vq0: u32, q: u32, c: u32, sum0: vec4<f32>, sum1: vec4<f32>) {
    if q >= p.n_queries {
        return;
    }
    let vq = vq0 + q;
    let scale = states[vq].scale;
    let k = vq * p.dim4 + c;
    if c < p.dim4 {
        acc[k] = acc[k] * scale + sum0;
    }
    if c + WG_C < p.dim4 {
        acc[k + WG_C] = acc[k + WG_C] * scale + sum1;
    }
}

@compute @workgroup_size(WG_C, WG_Q, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let split = wid.z;
    let tile = tile_rows(split);
    if tile.count == 0u {
        return;
    }
    let c0 = wid.x * TC;
    let q0 = wid.y * TQ;
    let vq0 = split * p.n_queries;
    let steps = (tile.count + TJ - 1u) / TJ;

    stage(0u, 0u, tile, q0, c0, vq0, li);
    workgroupBarrier();

    // s0a[i]: column lx, query ly + WG_Q i; s0b: queries i + 4; s1*: column lx + WG_C
    var s0a = mat4x4<f32>();
    var s0b = mat4x4<f32>();
    var s1a = mat4x4<f32>();
    var s1b = mat4x4<f32>();
    let wq = WG_Q * WSTR;
    for (var s = 0u; s < steps; s++) {
        let buf = s & 1u;
        if s + 1u < steps {
            stage(1u - buf, (s + 1u) * TJ, tile, q0, c0, vq0, li);
        }
        let wa = buf * WS_HALF + lid.y * WSTR;
        let ya = buf * YS_HALF + lid.x;
        for (var jj = 0u; jj < TJ / 4u; jj++) {
            // Columns: the weights of rows 4 jj .. 4 jj + 3 for this thread's queries.
            let wa_m = mat4x4<f32>(
                ws[wa + jj],
                ws[wa + wq + jj],
                ws[wa + 2u * wq + jj],
                ws[wa + 3u * wq + jj],
            );
            let wb_m = mat4x4<f32>(
                ws[wa + 4u * wq + jj],
                ws[wa + 5u * wq + jj],
                ws[wa + 6u * wq + jj],
                ws[wa + 7u * wq + jj],
            );
            // Columns: rows 4 jj .. 4 jj + 3 of the Y tile at this thread's two columns.
            let r = ya + 4u * jj * TC;
            let y0 = mat4x4<f32>(ys[r], ys[r + TC], ys[r + 2u * TC], ys[r + 3u * TC]);
            let r1 = r + WG_C;
            let y1 = mat4x4<f32>(ys[r1], ys[r1 + TC], ys[r1 + 2u * TC], ys[r1 + 3u * TC]);
            s0a += y0 * wa_m;
            s0b += y0 * wb_m;
            s1a += y1 * wa_m;
            s1b += y1 * wb_m;
        }
        workgroupBarrier();
    }

    // Constant matrix indices only: a dynamically indexed matrix would be moved to memory.
    let c = c0 + lid.x;
    let q = q0 + lid.y;
    store(vq0, q, c, s0a[0], s1a[0]);
    store(vq0, q + WG_Q, c, s0a[1], s1a[1]);
    store(vq0, q + 2u * WG_Q, c, s0a[2], s1a[2]);
    store(vq0, q + 3u * WG_Q, c, s0a[3], s1a[3]);
    store(vq0, q + 4u * WG_Q, c, s0b[0], s1b[0]);
    store(vq0, q + 5u * WG_Q, c, s0b[1], s1b[1]);
    store(vq0, q + 6u * WG_Q, c, s0b[2], s1b[2]);
    store(vq0, q + 7u * WG_Q, c, s0b[3], s1b[3]);
}
