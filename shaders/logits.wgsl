// Pass 1 of a tile step: the logits GEMM.
//
//   S[s, q, j] = c_dot[q] * (x_q . y_r) - c_norm[q] * |y_r|^2,   r = first row of split s + j
//
// for every query q and the rows of split s at this step (grid z = split). The dataset
// rows are stored padded to a multiple of 4 values (zeros), so a row is `dim4` vec4s.
//
// Register tiling. A workgroup of WG_R x WG_Q threads owns a TQ-query x TR-row block of S
// (TQ = 8 WG_Q, TR = 8 WG_R; 128 x 128 by default); thread (lx, ly) keeps an 8-query x
// 8-row register block (queries ly + WG_Q i, rows lx + WG_R j) in four mat4x4 accumulators.
// Per vec4 of K a thread reads 8 X and 8 Y vec4s (256 B) from workgroup memory for 256 FMAs
// (512 FLOP, 2 FLOP/B: what keeps a GPU whose workgroup memory delivers 128 B per clock per
// SM/CU and whose ALUs do 128 FMAs per clock compute-bound; today's 4 x 4 block was 1 FLOP/B,
// capped at half of peak by workgroup-memory bandwidth). The strided assignment makes
// neighbouring threads read neighbouring workgroup-memory rows, STRIDE = KT + 1 vec4s apart,
// which puts the 8 threads of a 128-bit load phase on distinct banks.
//
// Double buffering. K advances KT vec4s per step through two halves of workgroup memory:
// while step s computes on half s % 2, each thread already holds its share of step s + 1's
// X and Y tiles in registers (loaded from global memory before the compute, so the loads'
// latency hides behind it) and stores them into the other half afterwards. One barrier per
// step suffices: a half is written at step s only after every thread passed the barrier
// that ended step s - 1, the last step that read it.
//
// Tile shapes are pipeline-overridable constants (WG_R, WG_Q, KT): one source, several
// configurations (`pipelines.rs` lists them and checks each fits the register slots below
// and the device's workgroup memory). Each thread stages at most 4 X and 4 Y vec4s per
// step (8 KT <= 4 WG_R and 8 KT <= 4 WG_Q).
//
// Every index is bounded here (queries by n_queries, rows by the tile's count, K by dim4),
// so the kernel runs with wgpu's runtime checks off (trusted shaders).
//
// p, tile_rows, TileRows and YVec are in common.wgsl, which the host puts first.

// B x dim4, queries padded like the rows
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
// per query (c_dot, c_norm)
@group(0) @binding(2) var<storage, read> coefs: array<vec2<f32>>;
// the chunk's rows
@group(0) @binding(3) var<storage, read> y: array<YVec>;
@group(0) @binding(4) var<storage, read> sq_norms: array<f32>;
// (split * B + q) * tile_rows + j
@group(0) @binding(5) var<storage, read_write> logits: array<f32>;

// threads along the rows
override WG_R: u32 = 16u;
// threads along the queries
override WG_Q: u32 = 16u;
// vec4s of K per step
override KT: u32 = 2u;

// queries per workgroup
override TQ: u32 = 8u * WG_Q;
// rows per workgroup
override TR: u32 = 8u * WG_R;
override WG: u32 = WG_R * WG_Q;
// workgroup-memory row stride in vec4s: one more than KT staggers the banks
override STRIDE: u32 = KT + 1u;
// one half (one K step) of each double buffer
override XS_HALF: u32 = TQ * STRIDE;
override YS_HALF: u32 = TR * STRIDE;
// vec4s of each tile per step
override X_ELEMS: u32 = TQ * KT;
override Y_ELEMS: u32 = TR * KT;

var<workgroup> xs: array<vec4<f32>, 2u * XS_HALF>;
var<workgroup> ys: array<vec4<f32>, 2u * YS_HALF>;

// Element e of the X tile at K offset k0 (zero outside the queries or K).
fn load_x(q0: u32, k0: u32, e: u32) -> vec4<f32> {
    let q = q0 + e / KT;
    let k = k0 + e % KT;
    if e < X_ELEMS && q < p.n_queries && k < p.dim4 {
        return x[q * p.dim4 + k];
    }
    return vec4<f32>();
}

// Element e of the Y tile at K offset k0 (zero outside the tile's rows or K).
fn load_y(tile: TileRows, r0: u32, k0: u32, e: u32) -> vec4<f32> {
    let r = r0 + e / KT;
    let k = k0 + e % KT;
    if e < Y_ELEMS && r < tile.count && k < p.dim4 {
        return vec4<f32>(y[(tile.start + r) * p.dim4 + k]);
    }
    return vec4<f32>();
}

fn store_x(buf: u32, e: u32, v: vec4<f32>) {
    if e < X_ELEMS {
        xs[buf * XS_HALF + (e / KT) * STRIDE + e % KT] = v;
    }
}

fn store_y(buf: u32, e: u32, v: vec4<f32>) {
    if e < Y_ELEMS {
        ys[buf * YS_HALF + (e / KT) * STRIDE + e % KT] = v;
    }
}

@compute @workgroup_size(WG_R, WG_Q, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let split = wid.z;
    let tile = tile_rows(split);
    let q0 = wid.y * TQ;
    let r0 = wid.x * TR;
    if r0 >= tile.count {
        return;
    }
    let steps = (p.dim4 + KT - 1u) / KT;

    // This thread's share of a step's tiles: elements li, li + WG, ... (named registers:
    // an array indexed in a loop may be moved to memory).
    var xr0 = load_x(q0, 0u, li);
    var xr1 = load_x(q0, 0u, li + WG);
    var xr2 = load_x(q0, 0u, li + 2u * WG);
    var xr3 = load_x(q0, 0u, li + 3u * WG);
    var yr0 = load_y(tile, r0, 0u, li);
    var yr1 = load_y(tile, r0, 0u, li + WG);
    var yr2 = load_y(tile, r0, 0u, li + 2u * WG);
    var yr3 = load_y(tile, r0, 0u, li + 3u * WG);
    store_x(0u, li, xr0);
    store_x(0u, li + WG, xr1);
    store_x(0u, li + 2u * WG, xr2);
    store_x(0u, li + 3u * WG, xr3);
    store_y(0u, li, yr0);
    store_y(0u, li + WG, yr1);
    store_y(0u, li + 2u * WG, yr2);
    store_y(0u, li + 3u * WG, yr3);
    workgroupBarrier();

    // a_lo[j][i] = x_(ly + WG_Q i) . y_(lx + WG_R j) for i, j < 4; a_*: queries i (a) or
    // i + 4 (b), rows j (lo) or j + 4 (hi)
    var a_lo = mat4x4<f32>();
    var a_hi = mat4x4<f32>();
    var b_lo = mat4x4<f32>();
    var b_hi = mat4x4<f32>();
    let xq = WG_Q * STRIDE;
    let yq = WG_R * STRIDE;
    for (var s = 0u; s < steps; s++) {
        let buf = s & 1u;
        let more = s + 1u < steps;
        // Next step's tiles into registers first: their latency hides behind the compute.
        if more {
            let k0 = (s + 1u) * KT;
            xr0 = load_x(q0, k0, li);
            xr1 = load_x(q0, k0, li + WG);
            xr2 = load_x(q0, k0, li + 2u * WG);
            xr3 = load_x(q0, k0, li + 3u * WG);
            yr0 = load_y(tile, r0, k0, li);
            yr1 = load_y(tile, r0, k0, li + WG);
            yr2 = load_y(tile, r0, k0, li + 2u * WG);
            yr3 = load_y(tile, r0, k0, li + 3u * WG);
        }
        let xa = buf * XS_HALF + lid.y * STRIDE;
        let ya = buf * YS_HALF + lid.x * STRIDE;
        for (var kk = 0u; kk < KT; kk++) {
            // Rows: this thread's queries at K offset kk (xta: the first four, xtb: the others).
            let xta = transpose(mat4x4<f32>(
                xs[xa + kk],
                xs[xa + xq + kk],
                xs[xa + 2u * xq + kk],
                xs[xa + 3u * xq + kk],
            ));
            let xtb = transpose(mat4x4<f32>(
                xs[xa + 4u * xq + kk],
                xs[xa + 5u * xq + kk],
                xs[xa + 6u * xq + kk],
                xs[xa + 7u * xq + kk],
            ));
            // Columns: this thread's rows at K offset kk.
            let ylo = mat4x4<f32>(
                ys[ya + kk],
                ys[ya + yq + kk],
                ys[ya + 2u * yq + kk],
                ys[ya + 3u * yq + kk],
            );
            let yhi = mat4x4<f32>(
                ys[ya + 4u * yq + kk],
                ys[ya + 5u * yq + kk],
                ys[ya + 6u * yq + kk],
                ys[ya + 7u * yq + kk],
            );
            a_lo += xta * ylo;
            a_hi += xta * yhi;
            b_lo += xtb * ylo;
            b_hi += xtb * yhi;
        }
        if more {
            let other = 1u - buf;
            store_x(other, li, xr0);
            store_x(other, li + WG, xr1);
            store_x(other, li + 2u * WG, xr2);
            store_x(other, li + 3u * WG, xr3);
            store_y(other, li, yr0);
            store_y(other, li + WG, yr1);
            store_y(other, li + 2u * WG, yr2);
            store_y(other, li + 3u * WG, yr3);
        }
        workgroupBarrier();
    }

    // Constant matrix indices only: a dynamically indexed matrix would be moved to memory.
    let a_lo_t = transpose(a_lo);
    let a_hi_t = transpose(a_hi);
    let b_lo_t = transpose(b_lo);
    let b_hi_t = transpose(b_hi);
    let r = r0 + lid.x;
    let q = q0 + lid.y;
    store_query(split, q, r, tile, a_lo_t[0], a_hi_t[0]);
    store_query(split, q + WG_Q, r, tile, a_lo_t[1], a_hi_t[1]);
    store_query(split, q + 2u * WG_Q, r, tile, a_lo_t[2], a_hi_t[2]);
    store_query(split, q + 3u * WG_Q, r, tile, a_lo_t[3], a_hi_t[3]);
    store_query(split, q + 4u * WG_Q, r, tile, b_lo_t[0], b_hi_t[0]);
    store_query(split, q + 5u * WG_Q, r, tile, b_lo_t[1], b_hi_t[1]);
    store_query(split, q + 6u * WG_Q, r, tile, b_lo_t[2], b_hi_t[2]);
    store_query(split, q + 7u * WG_Q, r, tile, b_lo_t[3], b_hi_t[3]);
}

// Logits of query q at rows r + WG_R j, j < 8 (those inside the tile): lo holds j < 4.
fn store_query(split: u32, q: u32, r: u32, tile: TileRows, lo: vec4<f32>, hi: vec4<f32>) {
    if q >= p.n_queries {
        return;
    }
    let c = coefs[q];
    let out = (split * p.n_queries + q) * p.tile_rows;
    for (var j = 0u; j < 4u; j++) {
        let rj = r + WG_R * j;
        if rj < tile.count {
            logits[out + rj] = c.x * lo[j] - c.y * sq_norms[tile.start + rj];
        }
        let rh = rj + 4u * WG_R;
        if rh < tile.count {
            logits[out + rh] = c.x * hi[j] - c.y * sq_norms[tile.start + rh];
        }
    }
}
