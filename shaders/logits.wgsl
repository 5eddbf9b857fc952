// Pass 1 of a tile step: the logits GEMM.
//
//   S[s, q, j] = c_dot[q] * (x_q . y_r) - c_norm[q] * |y_r|^2,   r = first row of split s + j
//
// for every query q and the rows of split s at this step (grid z = split). The dataset
// rows are stored padded to a multiple of 4 values (zeros), so a row is `dim4` vec4s.
//
// Workgroup: 16 x 16 threads own a 64-query x 64-row block of S; thread (lx, ly) keeps a
// 4 x 4 register block (queries ly + 16 i, rows lx + 16 j). The strided assignment makes
// neighbouring threads read neighbouring shared-memory slots. K (the sample dimension)
// advances 16 values per step through workgroup tiles of X and Y.
//
// p, tile_rows, TileRows, TILE_Q and YVec are in common.wgsl, which the host puts first.

// B x dim4, queries padded like the rows
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
// per query (c_dot, c_norm)
@group(0) @binding(2) var<storage, read> coefs: array<vec2<f32>>;
// the chunk's rows
@group(0) @binding(3) var<storage, read> y: array<YVec>;
@group(0) @binding(4) var<storage, read> sq_norms: array<f32>;
// (split * B + q) * tile_rows + j
@group(0) @binding(5) var<storage, read_write> logits: array<f32>;

const TILE_R: u32 = 64u;
// vec4s of K per step
const K4: u32 = 4u;
// shared-memory row stride in vec4s: one more than K4 staggers the banks
const STRIDE: u32 = 5u;

var<workgroup> xs: array<vec4<f32>, 320>; // TILE_Q * STRIDE
var<workgroup> ys: array<vec4<f32>, 320>; // TILE_R * STRIDE

// Columns are the four queries (rows) of this thread at K offset kk.
fn x_block(base: u32, kk: u32) -> mat4x4<f32> {
    return mat4x4<f32>(
        xs[base + kk],
        xs[base + 16u * STRIDE + kk],
        xs[base + 32u * STRIDE + kk],
        xs[base + 48u * STRIDE + kk],
    );
}

fn y_block(base: u32, kk: u32) -> mat4x4<f32> {
    return mat4x4<f32>(
        ys[base + kk],
        ys[base + 16u * STRIDE + kk],
        ys[base + 32u * STRIDE + kk],
        ys[base + 48u * STRIDE + kk],
    );
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let split = wid.z;
    let tile = tile_rows(split);
    let q0 = wid.y * TILE_Q;
    let r0 = wid.x * TILE_R;
    if r0 >= tile.count {
        return;
    }

    // Each thread stages one vec4 of X and one of Y per K step.
    let ld_row = li / K4;
    let ld_k = li % K4;
    let xq = q0 + ld_row;
    let yr = r0 + ld_row;
    let x_ok = xq < p.n_queries;
    let y_ok = yr < tile.count;
    let x_base = xq * p.dim4;
    let y_base = (tile.start + yr) * p.dim4;
    let xa = lid.y * STRIDE;
    let ya = lid.x * STRIDE;

    // dots[j][i] = x_(ly + 16 i) . y_(lx + 16 j)
    var dots = mat4x4<f32>();
    for (var k4 = 0u; k4 < p.dim4; k4 += K4) {
        let k = k4 + ld_k;
        var xv = vec4<f32>();
        if x_ok && k < p.dim4 {
            xv = x[x_base + k];
        }
        var yv = vec4<f32>();
        if y_ok && k < p.dim4 {
            yv = vec4<f32>(y[y_base + k]);
        }
        xs[ld_row * STRIDE + ld_k] = xv;
        ys[ld_row * STRIDE + ld_k] = yv;
        workgroupBarrier();
        // Unrolled by hand: naga keeps loops as loops.
        dots += transpose(x_block(xa, 0u)) * y_block(ya, 0u);
        dots += transpose(x_block(xa, 1u)) * y_block(ya, 1u);
        dots += transpose(x_block(xa, 2u)) * y_block(ya, 2u);
        dots += transpose(x_block(xa, 3u)) * y_block(ya, 3u);
        workgroupBarrier();
    }

    // Constant matrix indices only: a dynamically indexed matrix would be moved to memory.
    let rows = transpose(dots);
    store_query(split, q0 + lid.y, r0 + lid.x, tile, rows[0]);
    store_query(split, q0 + lid.y + 16u, r0 + lid.x, tile, rows[1]);
    store_query(split, q0 + lid.y + 32u, r0 + lid.x, tile, rows[2]);
    store_query(split, q0 + lid.y + 48u, r0 + lid.x, tile, rows[3]);
}

// Logits of query q at rows r, r + 16, r + 32, r + 48 (those inside the tile).
fn store_query(split: u32, q: u32, r: u32, tile: TileRows, dots: vec4<f32>) {
    if q >= p.n_queries {
        return;
    }
    let c = coefs[q];
    let out = (split * p.n_queries + q) * p.tile_rows;
    for (var j = 0u; j < 4u; j++) {
        let rj = r + 16u * j;
        if rj < tile.count {
            logits[out + rj] = c.x * dots[j] - c.y * sq_norms[tile.start + rj];
        }
    }
}
