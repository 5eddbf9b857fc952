//! Hand-written AVX-512 kernels for the two GEMM shapes of the dense pass, the fourth
//! library the autotune may choose ([`super::GemmLib::Native`]).
//!
//! Why by hand: the `gemm` crate runs its AVX2 kernel on stable Rust (its AVX-512 one
//! needs a nightly feature) and packs both operands at every call; faer and OpenBLAS pack
//! too. The dense pass calls its GEMMs once per tile with the same queries, and both of
//! its shapes can read the dataset's rows where they are stored:
//!
//! - logits, S = X Y^T ([`Packed::dots`]): the queries are packed once per task into
//!   panels of 32 (dimension-major), the kernel's vector lanes; each step broadcasts one
//!   value of each of 12 dataset rows, read in place. Its result comes out as dataset row
//!   by query and is written transposed (about 2% of its time).
//! - the weighted sum, acc += P Y ([`gemm_rows`]): lanes over 32 columns of a row-major
//!   right-hand side (the tile's rows, read in place), 12 left-hand rows broadcast.
//!
//! Both keep 24 accumulators of 16 lanes in registers (of 32), enough independent FMA
//! chains to cover the FMA latency. Every output element is computed by the same steps
//! whatever its position in a micro-tile, panel or edge (FMA chains over k in order, from
//! zero, in blocks of [`K_BLOCK`] for the logits; the destination added last when
//! accumulating), so a query's result does not depend on the batch it arrives in.

/// Queries per packed panel (two vectors of 16 lanes).
const PANEL: usize = 32;
/// Dataset rows per micro-tile of the logits kernel.
const DOT_ROWS: usize = 12;
/// Left-hand rows per micro-tile of the row-major kernel.
const ROWS: usize = 12;
/// Longest FMA chain of the logits kernel (longer rows are summed in such blocks).
const K_BLOCK: usize = 256;
/// Floats per 64-byte line: packed panels start on one.
const LINE: usize = 16;

/// Whether this CPU runs the kernels (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of a row-major matrix, packed for [`Packed::dots`]: panels of [`PANEL`] rows, each
/// stored dimension-major (the panel's values of dimension 0, then 1, ...), the last one
/// padded with zeros.
pub struct Packed {
    data: Vec<f32>,
    /// where the first panel starts in `data` (a 64-byte line)
    offset: usize,
    rows: usize,
    dim: usize,
}

impl Packed {
    /// Packs the `x.len() / dim` rows of `x` (row-major, `dim` wide).
    pub fn new(x: &[f32], dim: usize) -> Packed {
        assert!(dim > 0 && x.len().is_multiple_of(dim));
        let rows = x.len() / dim;
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![0.0f32; panels * dim * PANEL + LINE];
        let offset = data.as_ptr().align_offset(64).min(LINE);
        for (p, panel) in data[offset..]
            .chunks_exact_mut(dim * PANEL)
            .take(panels)
            .enumerate()
        {
            for (l, row) in x.chunks_exact(dim).skip(p * PANEL).take(PANEL).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    panel[k * PANEL + l] = v;
                }
            }
        }
        Packed {
            data,
            offset,
            rows,
            dim,
        }
    }

    /// s (packed rows by rows of `y`, row-major with row stride `ld`) = [s +] X Y^T, `y`
    /// holding rows of the packed width, contiguous.
    pub fn dots(&self, y: &[f32], s: &mut [f32], ld: usize, accumulate: bool) {
        self.dots_in(y, s, ld, accumulate, false)
    }

    /// The same products laid out the other way: s (rows of `y` by packed rows, row
    /// stride `ld`) = [s +] Y X^T. The kernel's natural layout (no transposed writes):
    /// the better one where the packed side is the smaller.
    pub fn dots_t(&self, y: &[f32], s: &mut [f32], ld: usize, accumulate: bool) {
        self.dots_in(y, s, ld, accumulate, true)
    }

    fn dots_in(&self, y: &[f32], s: &mut [f32], ld: usize, accumulate: bool, t: bool) {
        let n = y.len() / self.dim;
        assert!(available());
        assert_eq!(y.len(), n * self.dim);
        assert!(if t { self.rows <= ld } else { n <= ld });
        if n == 0 || self.rows == 0 {
            return;
        }
        let last = if t {
            (n - 1) * ld + self.rows
        } else {
            (self.rows - 1) * ld + n
        };
        assert!(s.len() >= last);
        // SAFETY: the CPU has AVX-512F (asserted); every read is inside the panels (sized
        // by construction) and `y` (n rows of dim), every write inside `s` (asserted).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            dots_avx512(self, y, n, s, (ld, t), accumulate)
        }
    }
}

/// dst (m x n, row stride `ld`) = [dst +] lhs (m x k, row stride `lrs`) * rhs (k x n,
/// row stride `rrs`), all row-major with unit column stride.
pub fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    (lhs, lrs): (&[f32], usize),
    (rhs, rrs): (&[f32], usize),
) {
    assert!(available());
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(n <= ld && k <= lrs && n <= rrs);
    assert!(dst.len() >= (m - 1) * ld + n);
    assert!(lhs.len() >= (m - 1) * lrs + k);
    assert!(rhs.len() >= (k - 1) * rrs + n);
    // SAFETY: AVX-512F is there (asserted) and every index stays within the slices
    // (asserted above: the kernels touch rows < m, k and columns < n, k only).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        rows_avx512(
            (m, n, k),
            dst.as_mut_ptr(),
            ld,
            accumulate,
            (lhs.as_ptr(), lrs),
            (rhs.as_ptr(), rrs),
        )
    }
}

/// The lane mask of the first `c` of 16 lanes (all of them from 16 on).
#[cfg(target_arch = "x86_64")]
fn mask(c: usize) -> u16 {
    if c >= 16 {
        u16::MAX
    } else {
        (1u16 << c) - 1
    }
}

/// Runs `$body` with `$r` (1 to 12) as the constant `$R`.
#[cfg(target_arch = "x86_64")]
macro_rules! with_rows {
    ($r:expr, $R:ident => $body:expr) => {
        match $r {
            1 => {
                const $R: usize = 1;
                $body
            }
            2 => {
                const $R: usize = 2;
                $body
            }
            3 => {
                const $R: usize = 3;
                $body
            }
            4 => {
                const $R: usize = 4;
                $body
            }
            5 => {
                const $R: usize = 5;
                $body
            }
            6 => {
                const $R: usize = 6;
                $body
            }
            7 => {
                const $R: usize = 7;
                $body
            }
            8 => {
                const $R: usize = 8;
                $body
            }
            9 => {
                const $R: usize = 9;
                $body
            }
            10 => {
                const $R: usize = 10;
                $body
            }
            11 => {
                const $R: usize = 11;
                $body
            }
            _ => {
                const $R: usize = 12;
                $body
            }
        }
    };
}

/// Writes R x V vectors of sums (`[[__m512; V]; R]`), row r at `dst + r * ld`, lanes
/// masked by `masks[v]`; with `accumulate` added to what is there. A macro, so that the
/// sums stay in registers (a function taking them by reference was not inlined: 2.7% of a
/// dense evaluation). Expanded inside the kernels' unsafe blocks, on the caller's ranges.
#[cfg(target_arch = "x86_64")]
macro_rules! store_sums {
    ($sums:expr, $dst:expr, $ld:expr, $masks:expr, $accumulate:expr) => {
        for (r, row) in $sums.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                let d = $dst.add(r * $ld + 16 * v);
                let a = if $accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps($masks[v], d), a)
                } else {
                    a
                };
                _mm512_mask_storeu_ps(d, $masks[v], a);
            }
        }
    };
}

/// [`Packed::dots`] and [`Packed::dots_t`]: blocks of 12 dataset rows (in L1/L2 while
/// every panel passes over them), each against every panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dots_avx512(
    p: &Packed,
    y: &[f32],
    n: usize,
    s: &mut [f32],
    (ld, transposed): (usize, bool),
    acc: bool,
) {
    let k = p.dim;
    let panels = p.rows.div_ceil(PANEL);
    let mut j = 0;
    while j < n {
        let r = (n - j).min(DOT_ROWS);
        for q in 0..panels {
            let q0 = q * PANEL;
            let lanes = (p.rows - q0).min(PANEL);
            // SAFETY: panel q holds k * PANEL floats from its start; rows j..j + r of y
            // exist; the writes are rows q0..q0 + lanes, columns j..j + r of s.
            unsafe {
                let panel = p.data.as_ptr().add(p.offset + q * k * PANEL);
                let at = if transposed { j * ld + q0 } else { q0 * ld + j };
                let out = s.as_mut_ptr().add(at);
                let yb = y.as_ptr().add(j * k);
                with_rows!(r, R => dot_tile::<R>(k, panel, yb, out, (ld, transposed), lanes, acc));
            }
        }
        j += r;
    }
}

/// One micro-tile of the logits: rows `yb` (R rows of k) against one panel, written to
/// `out` for the first `lanes` queries: query q's R values at `out + q * ld`, or
/// `transposed`, row r's `lanes` values at `out + r * ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn dot_tile<const R: usize>(
    k: usize,
    panel: *const f32,
    yb: *const f32,
    out: *mut f32,
    (ld, transposed): (usize, bool),
    lanes: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut total = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY (whole body): the caller's ranges; tmp holds R x PANEL floats.
    unsafe {
        // Chains of at most K_BLOCK products, summed: a single chain over k rounds every
        // step at the size of the whole sum (twice the gemm crate's error at k = 784).
        for k0 in (0..k).step_by(K_BLOCK) {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for kk in k0..(k0 + K_BLOCK).min(k) {
                let a0 = _mm512_loadu_ps(panel.add(kk * PANEL));
                let a1 = _mm512_loadu_ps(panel.add(kk * PANEL + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*yb.add(r * k + kk));
                    acc[0] = _mm512_fmadd_ps(a0, b, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a1, b, acc[1]);
                }
            }
            for (sum, a) in total.iter_mut().zip(&acc) {
                sum[0] = _mm512_add_ps(sum[0], a[0]);
                sum[1] = _mm512_add_ps(sum[1], a[1]);
            }
        }
        if transposed {
            let masks = [lanes.min(16), lanes.saturating_sub(16)].map(mask);
            store_sums!(&total, out, ld, masks, accumulate);
            return;
        }
        let mut tmp = [[0.0f32; PANEL]; R];
        for (row, a) in tmp.iter_mut().zip(&total) {
            _mm512_storeu_ps(row.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), a[1]);
        }
        for l in 0..lanes {
            let row = out.add(l * ld);
            for (r, sums) in tmp.iter().enumerate() {
                let o = row.add(r);
                *o = if accumulate { *o + sums[l] } else { sums[l] };
            }
        }
    }
}

/// [`gemm_rows`]: column blocks of 32 (one of 16 at an edge of 16 or fewer), each
/// against blocks of 12 left-hand rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn rows_avx512(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ld: usize,
    accumulate: bool,
    (lhs, lrs): (*const f32, usize),
    (rhs, rrs): (*const f32, usize),
) {
    let mut j = 0;
    while j < n {
        let cols = (n - j).min(2 * 16);
        let masks = [mask(cols), mask(cols.saturating_sub(16))];
        let mut i = 0;
        while i < m {
            let r = (m - i).min(ROWS);
            // SAFETY: rows i..i + r and columns j..j + cols are inside every operand.
            unsafe {
                let (d, a, b) = (dst.add(i * ld + j), lhs.add(i * lrs), rhs.add(j));
                if cols > 16 {
                    with_rows!(r, R => rows_tile::<R, 2>(k, d, ld, accumulate, (a, lrs), (b, rrs), masks));
                } else {
                    with_rows!(r, R => rows_tile::<R, 1>(k, d, ld, accumulate, (a, lrs), (b, rrs), masks));
                }
            }
            i += r;
        }
        j += cols;
    }
}

/// One micro-tile of [`gemm_rows`]: R rows by V vectors of columns (masked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn rows_tile<const R: usize, const V: usize>(
    k: usize,
    dst: *mut f32,
    ld: usize,
    accumulate: bool,
    (lhs, lrs): (*const f32, usize),
    (rhs, rrs): (*const f32, usize),
    masks: [u16; 2],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // SAFETY (whole body): the caller's ranges; masked lanes are neither read nor written.
    unsafe {
        // The products' chain starts from zero and the destination is added last: started
        // from the destination (the dense pass's running sum), every step would round at
        // its size (x1_hat 25 times further from f64 on Fashion-MNIST).
        for kk in 0..k {
            let mut b = [_mm512_setzero_ps(); V];
            for (v, b) in b.iter_mut().enumerate() {
                *b = _mm512_maskz_loadu_ps(masks[v], rhs.add(kk * rrs + 16 * v));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*lhs.add(r * lrs + kk));
                for (acc, &b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_fmadd_ps(a, b, *acc);
                }
            }
        }
        store_sums!(&acc, dst, ld, masks, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Whether the kernels cannot run here, said in one loud line (the test then checks
    /// nothing).
    fn skipped() -> bool {
        let skip = !available();
        if skip {
            eprintln!("SKIPPED: no AVX-512F on this CPU, the native kernels are not used");
        }
        skip
    }

    fn values(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// Both kernels against f64 sums at edge sizes (panels, micro-tiles and column blocks
    /// cut anywhere), overwriting and accumulating, with row strides wider than the rows.
    /// Tolerance: k ulp-sized roundings of terms of magnitude <= 1, 1e-6 * k absolute.
    #[test]
    fn kernels_match_f64() {
        if skipped() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (31, 13, 16),
            (32, 12, 17),
            (33, 25, 64),
            (70, 40, 33),
            (12, 48, 5),
            (13, 47, 100),
        ] {
            let tol = 1e-6 * k as f64;
            let (x, y) = (values(m * k, &mut rng), values(n * k, &mut rng));
            let xy = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|kk| x[i * k + kk] as f64 * y[j * k + kk] as f64)
                    .sum()
            };
            // rows: (m x k, stride k + 1) * (k x n, stride n + 2).
            let (lrs, rrs) = (k + 1, n + 2);
            let (a, b) = (values(m * lrs, &mut rng), values(k * rrs, &mut rng));
            let ab = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|kk| a[i * lrs + kk] as f64 * b[kk * rrs + j] as f64)
                    .sum()
            };
            for accumulate in [false, true] {
                let what = format!("{m}x{n}x{k}, accumulate {accumulate}");
                // dots: m packed rows of k against n rows of k, into an m x (n + 3) buffer.
                let (ld, init) = (n + 3, values(m * (n + 3), &mut rng));
                let mut s = init.clone();
                Packed::new(&x, k).dots(&y, &mut s, ld, accumulate);
                check(
                    &s,
                    &init,
                    (m, n, ld),
                    accumulate,
                    tol,
                    &xy,
                    &format!("dots {what}"),
                );
                // dots_t: the same products, rows of y by packed rows, into n x (m + 2).
                let (ldt, init) = (m + 2, values(n * (m + 2), &mut rng));
                let mut s = init.clone();
                Packed::new(&x, k).dots_t(&y, &mut s, ldt, accumulate);
                let yx = |j: usize, i: usize| xy(i, j);
                check(
                    &s,
                    &init,
                    (n, m, ldt),
                    accumulate,
                    tol,
                    &yx,
                    &format!("dots_t {what}"),
                );
                // rows, into stride n + 3.
                let init = values(m * ld, &mut rng);
                let mut d = init.clone();
                gemm_rows((m, n, k), &mut d, ld, accumulate, (&a, lrs), (&b, rrs));
                check(
                    &d,
                    &init,
                    (m, n, ld),
                    accumulate,
                    tol,
                    &ab,
                    &format!("rows {what}"),
                );
            }
        }
    }

    /// `got` (rows x ld) holds `want(i, j)` (plus `init` when accumulating) within `tol` in
    /// its first `cols` columns and `init` untouched past them.
    fn check(
        got: &[f32],
        init: &[f32],
        (rows, cols, ld): (usize, usize, usize),
        accumulate: bool,
        tol: f64,
        want: &dyn Fn(usize, usize) -> f64,
        what: &str,
    ) {
        for i in 0..rows {
            for j in 0..ld {
                let (g, before) = (got[i * ld + j] as f64, init[i * ld + j] as f64);
                if j >= cols {
                    assert_eq!(g, before, "{what}: padding ({i},{j}) untouched");
                    continue;
                }
                let w = want(i, j) + if accumulate { before } else { 0.0 };
                assert!((g - w).abs() <= tol, "{what} ({i},{j}): {g} vs {w}");
            }
        }
    }

    /// A row's products are bitwise the same whichever panel lane, micro-tile row or
    /// column block computes them (the batch invariance the dense pass promises).
    #[test]
    fn results_do_not_depend_on_position() {
        if skipped() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let (m, n, k) = (45, 30, 50);
        let (x, y) = (values(m * k, &mut rng), values(n * k, &mut rng));
        let mut all = vec![0.0f32; m * n];
        Packed::new(&x, k).dots(&y, &mut all, n, false);
        for i in [0, 7, 31, 32, 44] {
            for j0 in [0, 5, 29] {
                let mut one = vec![0.0f32; n - j0];
                Packed::new(&x[i * k..(i + 1) * k], k).dots(&y[j0 * k..], &mut one, n - j0, false);
                assert_eq!(
                    &one[..],
                    &all[i * n + j0..(i + 1) * n],
                    "dots row {i} from {j0}"
                );
            }
        }
        let b = values(k * n, &mut rng);
        let mut all = vec![0.0f32; m * n];
        gemm_rows((m, n, k), &mut all, n, false, (&x, k), (&b, n));
        for i in [0, 11, 12, 44] {
            for j0 in [0, 3, 17] {
                let mut one = vec![0.0f32; n - j0];
                let rhs = &b[j0..];
                gemm_rows(
                    (1, n - j0, k),
                    &mut one,
                    n - j0,
                    false,
                    (&x[i * k..], k),
                    (rhs, n),
                );
                assert_eq!(
                    &one[..],
                    &all[i * n + j0..(i + 1) * n],
                    "rows row {i} from {j0}"
                );
            }
        }
    }
}
