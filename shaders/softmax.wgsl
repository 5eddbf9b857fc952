// Pass 2 of a tile step: the online-softmax statistics of one query (one split) per
// workgroup. It writes no weights: `accumulate` computes e_j = exp(s_j - m') itself while it
// stages the logits, so the B x Nt tile is written once (by `logits`) and read twice from
// cache (here) and once by `accumulate`, instead of being written back as P and re-read.
//
// Over this step's logits s_j: tile max and argmax (ties -> smaller row), new running max
// m' = max(m, tile max), and the running sums rescaled by r = exp(m - m') (see
// src/oracle/state.rs), with e_j = exp(s_j - m'):
//   sum' = r sum + sum_j e_j
//   sum_shifted_logit' = r (sum_shifted_logit + sum (m - m')) + sum_j e_j (s_j - m')
//   sum_sq' = r^2 sum_sq + sum_j e_j^2
//   sum_norm' = r sum_norm + sum_j e_j |y_j|^2   (for the posterior variance)
// m' is kept in the state's `max` and r in its `scale` for pass 3 (acc = acc * r + E Y,
// E = exp(S - m')): the same expressions as when this pass wrote E, so the statistics and
// weights are those of the unfused passes.
// A state with sum == 0 has seen no row (buffers start zeroed); its max is ignored.
//
// p, QueryState, tile_rows and LOWEST are in common.wgsl, which the host puts first.

@group(0) @binding(1) var<storage, read> logits: array<f32>;
// split * B + q
@group(0) @binding(2) var<storage, read_write> states: array<QueryState>;
// |y_j|^2 of the chunk's rows, chunk-local (as in logits.wgsl)
@group(0) @binding(3) var<storage, read> sq_norms: array<f32>;

const WG: u32 = 64u;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_arg: array<u32, WG>;
var<workgroup> red_sum: array<f32, WG>;
var<workgroup> red_shift: array<f32, WG>;
var<workgroup> red_sq: array<f32, WG>;
var<workgroup> red_norm: array<f32, WG>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let q = wid.x;
    let split = wid.y;
    if q >= p.n_queries {
        return;
    }
    let tile = tile_rows(split);
    let vq = split * p.n_queries + q;
    if tile.count == 0u {
        if li == 0u {
            states[vq].scale = 1.0;
        }
        return;
    }
    let base = vq * p.tile_rows;

    // Tile max and its first position. Each thread scans j = li, li + WG, ... in order,
    // so a strict > keeps its first occurrence. The position starts at the tile's first
    // row (as in the CPU backend): if no logit beats LOWEST (all NaN, say) the argmax is
    // still a row of the tile, never an index past the dataset.
    var m = LOWEST;
    var arg = 0u;
    for (var j = li; j < tile.count; j += WG) {
        let s = logits[base + j];
        if s > m {
            m = s;
            arg = j;
        }
    }
    red_max[li] = m;
    red_arg[li] = arg;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if li < stride {
            let om = red_max[li + stride];
            let oa = red_arg[li + stride];
            let mine = red_max[li];
            if om > mine || (om == mine && oa < red_arg[li]) {
                red_max[li] = om;
                red_arg[li] = oa;
            }
        }
        workgroupBarrier();
    }
    let tile_max = red_max[0];
    let tile_arg = red_arg[0];

    let old = states[vq];
    let has_old = old.sum > 0.0;
    var m_new = tile_max;
    if has_old {
        m_new = max(old.max, tile_max);
    }

    var sum = 0.0;
    var shift = 0.0;
    var sq = 0.0;
    var norm = 0.0;
    for (var j = li; j < tile.count; j += WG) {
        let d = logits[base + j] - m_new;
        let e = exp(d);
        sum += e;
        shift += e * d;
        sq += e * e;
        norm += e * sq_norms[tile.start + j];
    }
    red_sum[li] = sum;
    red_shift[li] = shift;
    red_sq[li] = sq;
    red_norm[li] = norm;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if li < stride {
            red_sum[li] += red_sum[li + stride];
            red_shift[li] += red_shift[li + stride];
            red_sq[li] += red_sq[li + stride];
            red_norm[li] += red_norm[li + stride];
        }
        workgroupBarrier();
    }

    if li == 0u {
        let tile_row = p.chunk_first_row + tile.start + tile_arg;
        var st: QueryState;
        st.max = m_new;
        if has_old {
            let r = exp(old.max - m_new);
            st.sum = r * old.sum + red_sum[0];
            st.sum_shifted_logit = r * (old.sum_shifted_logit + old.sum * (old.max - m_new))
                + red_shift[0];
            st.sum_sq = r * r * old.sum_sq + red_sq[0];
            st.sum_norm = r * old.sum_norm + red_norm[0];
            // Rows arrive in increasing order within a split: on a tie the old one is smaller.
            st.argmax = select(old.argmax, tile_row, tile_max > old.max);
            st.scale = r;
        } else {
            st.sum = red_sum[0];
            st.sum_shifted_logit = red_shift[0];
            st.sum_sq = red_sq[0];
            st.sum_norm = red_norm[0];
            st.argmax = tile_row;
            st.scale = 0.0;
        }
        states[vq] = st;
    }
}
