// Pass 3 of a tile step: acc = acc * scale + P * Y_tile for every query (grid z = split).
//
// P is this step's weights (the logits buffer after pass 2), Y_tile the split's rows, and
// scale the per-query rescale factor pass 2 left in the state. The output is B x dim4 vec4s
// per split: the weighted sum of rows, not yet divided by the softmax sum.
//
// Workgroup: 16 x 16 threads own 64 queries x 32 vec4 columns (128 values of D); thread
// (lx, ly) keeps queries ly + 16 i (i < 4) at columns lx and lx + 16: 8 vec4 accumulators,
// held as two 4x4 matrices. The loop runs over the tile's rows 16 at a time through
// workgroup tiles of P (64 x 16) and Y (16 x 32 vec4).
//
// p, QueryState, tile_rows, TILE_Q and YVec are in common.wgsl, which the host puts first.

// the weights, (split * B + q) * tile_rows + j, read four rows at a time
@group(0) @binding(1) var<storage, read> weights: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> y: array<YVec>;
@group(0) @binding(3) var<storage, read> states: array<QueryState>;
// (split * B + q) * dim4 + c
@group(0) @binding(4) var<storage, read_write> acc: array<vec4<f32>>;

// vec4 columns per workgroup
const TILE_C: u32 = 32u;
// rows per step
const TILE_J: u32 = 16u;

// [q][j / 4]: the weights of four consecutive rows
var<workgroup> ws: array<vec4<f32>, 256>; // TILE_Q * TILE_J / 4
// [j][c]
var<workgroup> ys: array<vec4<f32>, 512>; // TILE_J * TILE_C

// Columns: rows 4 jj .. 4 jj + 3 of the Y tile at vec4 column c.
fn y_block(jj: u32, c: u32) -> mat4x4<f32> {
    let r = 4u * jj;
    return mat4x4<f32>(
        ys[r * TILE_C + c],
        ys[(r + 1u) * TILE_C + c],
        ys[(r + 2u) * TILE_C + c],
        ys[(r + 3u) * TILE_C + c],
    );
}

// Columns: this thread's four queries' weights for rows 4 jj .. 4 jj + 3.
fn w_block(jj: u32, ly: u32) -> mat4x4<f32> {
    return mat4x4<f32>(
        ws[ly * 4u + jj],
        ws[(ly + 16u) * 4u + jj],
        ws[(ly + 32u) * 4u + jj],
        ws[(ly + 48u) * 4u + jj],
    );
}

// acc = acc * scale + sum for query q of the split starting at vq0, columns c and c + 16.
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
    if c + 16u < p.dim4 {
        acc[k + 16u] = acc[k + 16u] * scale + sum1;
    }
}

@compute @workgroup_size(16, 16, 1)
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
    let c0 = wid.x * TILE_C;
    let q0 = wid.y * TILE_Q;
    let vq0 = split * p.n_queries;

    // Each thread stages one vec4 of weights (query li / 4, rows 4 (li % 4) ..) per step.
    let wq = q0 + li / 4u;
    let w_ok = wq < p.n_queries;
    let w_base = (vq0 + wq) * (p.tile_rows / 4u);
    let lane_rows = vec4<u32>(0u, 1u, 2u, 3u);

    // sums0[i] = column lx, sums1[i] = column lx + 16, for query ly + 16 i
    var sums0 = mat4x4<f32>();
    var sums1 = mat4x4<f32>();
    for (var j0 = 0u; j0 < tile.count; j0 += TILE_J) {
        let j = j0 + 4u * (li % 4u);
        var w = vec4<f32>();
        if w_ok && j < tile.count {
            // Slots past the tile's rows hold stale values from earlier steps.
            w = select(vec4<f32>(), weights[w_base + j / 4u], vec4<u32>(j) + lane_rows < vec4<u32>(tile.count));
        }
        ws[li] = w;
        for (var e = li; e < TILE_J * TILE_C; e += 256u) {
            let r = j0 + e / TILE_C;
            let c = c0 + e % TILE_C;
            var v = vec4<f32>();
            if r < tile.count && c < p.dim4 {
                v = vec4<f32>(y[(tile.start + r) * p.dim4 + c]);
            }
            ys[e] = v;
        }
        workgroupBarrier();
        // Unrolled by hand: naga keeps loops as loops.
        let w0 = w_block(0u, lid.y);
        sums0 += y_block(0u, lid.x) * w0;
        sums1 += y_block(0u, lid.x + 16u) * w0;
        let w1 = w_block(1u, lid.y);
        sums0 += y_block(1u, lid.x) * w1;
        sums1 += y_block(1u, lid.x + 16u) * w1;
        let w2 = w_block(2u, lid.y);
        sums0 += y_block(2u, lid.x) * w2;
        sums1 += y_block(2u, lid.x + 16u) * w2;
        let w3 = w_block(3u, lid.y);
        sums0 += y_block(3u, lid.x) * w3;
        sums1 += y_block(3u, lid.x + 16u) * w3;
        workgroupBarrier();
    }

    // Constant matrix indices only: a dynamically indexed matrix would be moved to memory.
    let c = c0 + lid.x;
    store(vq0, q0 + lid.y, c, sums0[0], sums1[0]);
    store(vq0, q0 + lid.y + 16u, c, sums0[1], sums1[1]);
    store(vq0, q0 + lid.y + 32u, c, sums0[2], sums1[2]);
    store(vq0, q0 + lid.y + 48u, c, sums0[3], sums1[3]);
}
