// After the last tile step: merge the splits of each query and divide by the softmax sum.
//
//   M = max_s m_s,  r_s = exp(m_s - M),  mean_q = sum_s r_s acc_s / sum_s r_s sum_s
//
// the same rescale-and-add as `SoftmaxState::merge` (the host merges the scalar states
// with that function for the statistics). One thread per (query, vec4 column).
//
// p, QueryState and LOWEST are in common.wgsl, which the host puts first.

// (split * B + q) * dim4 + c
@group(0) @binding(1) var<storage, read> acc: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> states: array<QueryState>;
// q * dim4 + c
@group(0) @binding(3) var<storage, read_write> mean: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let q = gid.y;
    if c >= p.dim4 || q >= p.n_queries {
        return;
    }
    var m = LOWEST;
    for (var s = 0u; s < p.n_splits; s++) {
        let st = states[s * p.n_queries + q];
        if st.sum > 0.0 {
            m = max(m, st.max);
        }
    }
    var total = 0.0;
    var sum = vec4<f32>();
    for (var s = 0u; s < p.n_splits; s++) {
        let vq = s * p.n_queries + q;
        let st = states[vq];
        if st.sum > 0.0 {
            let r = exp(st.max - m);
            total += r * st.sum;
            sum += r * acc[vq * p.dim4 + c];
        }
    }
    mean[q * p.dim4 + c] = sum / total;
}
