//! The sparse pass's screening dot products in reduced precision, one kernel per CPU:
//! bf16 on AVX-512 BF16 ([`super::bf16`], twice an f32 FMA's multiply-adds per cycle) or
//! 16-bit integers on AVX2 ([`super::int16`]: 1.5 - 1.7 times the f32 GEMM's rate on a
//! 2-core Zen 3, both threads, and a finer rounding than bf16's). Either gives each
//! product within a |y - y~| + b |y~| + c of the exact one, with per-query (a, b, c) and
//! per-row norms, so the sparse pass's bounds and certificate are the same for both.

use super::{bf16, int16};
use crate::dataset::Dataset;

/// Which kernel screens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bf16,
    Int16,
}

impl Kind {
    /// The kernel this CPU runs, bf16 first (the faster); ORACLEFLOW_PRUNE_BF16=0 and
    /// ORACLEFLOW_PRUNE_INT16=0 turn each off (for comparisons; read per call).
    pub fn for_cpu() -> Option<Kind> {
        [Kind::Bf16, Kind::Int16].into_iter().find(|k| {
            let off = std::env::var(k.switch()).is_ok_and(|v| v == "0");
            !off && k.runs_here()
        })
    }

    /// The environment switch that turns this kernel off.
    fn switch(self) -> &'static str {
        match self {
            Kind::Bf16 => "ORACLEFLOW_PRUNE_BF16",
            Kind::Int16 => "ORACLEFLOW_PRUNE_INT16",
        }
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        match self {
            Kind::Bf16 => bf16::supported(),
            Kind::Int16 => int16::supported(),
        }
    }

    /// The name in the profile lines.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bf16 => "bf16",
            Kind::Int16 => "int16",
        }
    }

    /// A typical |y - y~| / |y~| for rows of `dim` values (for the choice whether the
    /// screening pays, never for a bound): bf16's rounding to nearest leaves about u / 3
    /// (u = 2^-8); int16's about sqrt(dim / 12) over the row's scaled norm, which is near
    /// the norm cap (2^15.5) unless one coordinate dominates.
    pub fn typical_err(self, dim: usize) -> f64 {
        match self {
            Kind::Bf16 => 1.0 / 768.0,
            Kind::Int16 => (dim as f64 / 12.0).sqrt() / 46000.0,
        }
    }

    /// The bytes the panels of `n` rows of `dim` values take.
    pub fn bytes_for(self, n: usize, dim: usize) -> usize {
        match self {
            Kind::Bf16 => bf16::Panels::bytes_for(n, dim),
            Kind::Int16 => int16::Panels::bytes_for(n, dim),
        }
    }

    /// Per query of `x` (rows of `dim`), the bound's (a, b, c): the product with a row
    /// is within a |y - y~| + b |y~| + c of the exact one.
    pub fn bound_coefs(self, x: &[f32], dim: usize) -> Vec<[f64; 3]> {
        match self {
            Kind::Bf16 => bf16::query_norms(x, dim)
                .into_iter()
                .map(|n| bf16::bound_coefs(n, dim))
                .collect(),
            Kind::Int16 => int16::Queries::pack(x, dim)
                .norms()
                .iter()
                .map(|&n| int16::bound_coefs(n))
                .collect(),
        }
    }
}

/// The rows in tile order, packed for one kernel.
pub enum Panels {
    Bf16(bf16::Panels),
    Int16(int16::Panels),
}

/// Queries packed for the same kernel.
pub enum Queries {
    Bf16(Vec<u32>),
    Int16(int16::Queries),
}

/// The kernels' working memory, reused between calls.
#[derive(Default)]
pub struct Scratch {
    f: Vec<f32>,
    i: Vec<i32>,
}

impl Panels {
    /// Packs the stored rows at `perm` for `kind`.
    pub fn pack(kind: Kind, ds: &Dataset, perm: &[u32]) -> Panels {
        match kind {
            Kind::Bf16 => Panels::Bf16(bf16::Panels::pack(ds, perm)),
            Kind::Int16 => Panels::Int16(int16::Panels::pack(ds, perm)),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Panels::Bf16(_) => Kind::Bf16,
            Panels::Int16(_) => Kind::Int16,
        }
    }

    /// |y~| per position.
    pub fn norms(&self) -> &[f32] {
        match self {
            Panels::Bf16(p) => p.norms(),
            Panels::Int16(p) => p.norms(),
        }
    }

    /// |y - y~| per position.
    pub fn errs(&self) -> &[f32] {
        match self {
            Panels::Bf16(p) => p.errs(),
            Panels::Int16(p) => p.errs(),
        }
    }

    /// The queries `x` (rows of `dim`) packed for this kernel.
    pub fn pack_queries(&self, x: &[f32], dim: usize) -> Queries {
        match self {
            Panels::Bf16(_) => Queries::Bf16(bf16::pack_queries(x, dim)),
            Panels::Int16(_) => Queries::Int16(int16::Queries::pack(x, dim)),
        }
    }

    /// The screening products of `xq` with the rows at `positions`:
    /// `out[q * positions.len() + j]` for position `positions.start + j`.
    ///
    /// # Panics
    /// Where `xq` was packed for the other kernel.
    pub fn dots(
        &self,
        xq: &Queries,
        positions: std::ops::Range<usize>,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        match (self, xq) {
            (Panels::Bf16(p), Queries::Bf16(x)) => bf16::dots(p, x, positions, out, &mut scratch.f),
            (Panels::Int16(p), Queries::Int16(x)) => {
                int16::dots(p, x, positions, out, &mut scratch.i)
            }
            _ => panic!("queries packed for another screening kernel"),
        }
    }
}

/// What the kernels' tests share: a dataset from raw f32 rows, and every screening
/// product checked against its bound.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::dataset::{Dtype, RawRows, SampleShape};

    /// `v`'s rows of `dim` values as a dataset (stored centred).
    pub(in crate::oracle::prune) fn dataset(v: &[f32], dim: usize) -> Dataset {
        Dataset::from_raw(
            "screening",
            SampleShape::array(vec![dim]),
            RawRows::F32(v),
            None,
            Dtype::F32,
        )
        .unwrap()
    }

    /// Asserts every screening product of the queries `x` with the rows at each range of
    /// `positions` (of the tile order `perm`) within the kernel's bound of the f64 product
    /// with the stored row; returns the largest error / bound.
    pub(in crate::oracle::prune) fn worst_error(
        kind: Kind,
        ds: &Dataset,
        perm: &[u32],
        x: &[f32],
        positions: &[std::ops::Range<usize>],
    ) -> f64 {
        let dim = ds.dim();
        let n_q = x.len() / dim;
        let panels = Panels::pack(kind, ds, perm);
        let xq = panels.pack_queries(x, dim);
        let coefs = kind.bound_coefs(x, dim);
        let mut row = vec![0.0f32; dim];
        let mut scratch = Scratch::default();
        let mut worst = 0.0f64;
        for positions in positions {
            let mut out = vec![f32::NAN; n_q * positions.len()];
            panels.dots(&xq, positions.clone(), &mut out, &mut scratch);
            for (q, [a, b, c]) in coefs.iter().copied().enumerate() {
                let xr = &x[q * dim..(q + 1) * dim];
                for (j, p) in positions.clone().enumerate() {
                    ds.stored_row(perm[p] as usize, &mut row);
                    let exact: f64 = xr
                        .iter()
                        .zip(&row)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let got = out[q * positions.len() + j] as f64;
                    let bound = a * panels.errs()[p] as f64 + b * panels.norms()[p] as f64 + c;
                    worst = worst.max((got - exact).abs() / bound);
                    assert!(
                        (got - exact).abs() <= bound,
                        "{kind:?} q {q} position {p}: {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
        worst
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use rayon::prelude::*;

    /// `cargo test --release --lib screen_speed -- --ignored --nocapture`: each kernel
    /// this CPU runs against the f32 GEMM on the same shapes (256 queries, 256-row tiles,
    /// 60000 rows of 784), on every thread, with the packing's time.
    #[test]
    #[ignore]
    fn screen_speed() {
        let (n, dim) = (60000, 784);
        let v = crate::dataset::synthetic::gaussian(n, dim, 1);
        let ds = tests::dataset(&v, dim);
        let perm: Vec<u32> = (0..n as u32).collect();
        let x: Vec<f32> = (0..256 * dim).map(|i| (i % 7) as f32 * 0.1).collect();
        let starts: Vec<usize> = (0..n).step_by(256).collect();
        for kind in [Kind::Bf16, Kind::Int16]
            .into_iter()
            .filter(|k| k.runs_here())
        {
            let t = std::time::Instant::now();
            let panels = Panels::pack(kind, &ds, &perm);
            eprintln!("{}: packing {:.3}s", kind.name(), t.elapsed().as_secs_f64());
            let xq = panels.pack_queries(&x, dim);
            for _ in 0..3 {
                let t = std::time::Instant::now();
                starts.par_iter().for_each_init(
                    || (vec![0.0f32; 256 * 256], Scratch::default()),
                    |(out, scratch), &t0| {
                        let r = t0..(t0 + 256).min(n);
                        panels.dots(&xq, r.clone(), &mut out[..256 * r.len()], scratch);
                    },
                );
                let screen = t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                starts.par_iter().for_each_init(
                    || (vec![0.0f32; 256 * 256], Vec::new()),
                    |(out, y), &t0| {
                        let r = t0..(t0 + 256).min(n);
                        let yy = crate::oracle::cpu::stored_rows_f32(&ds, r.clone(), y);
                        crate::oracle::cpu::sgemm(
                            crate::oracle::cpu::Gemm {
                                m: 256,
                                n: r.len(),
                                k: dim,
                            },
                            &mut out[..256 * r.len()],
                            false,
                            (&x, dim, 1),
                            (yy, 1, dim),
                        );
                    },
                );
                let f = t.elapsed().as_secs_f64();
                eprintln!("{}: {screen:.3}s, f32 GEMM {f:.3}s", kind.name());
            }
        }
    }
}
