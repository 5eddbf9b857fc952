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
        let on = |name: &str| !std::env::var(name).is_ok_and(|v| v == "0");
        if on("ORACLEFLOW_PRUNE_BF16") && bf16::supported() {
            Some(Kind::Bf16)
        } else if on("ORACLEFLOW_PRUNE_INT16") && int16::supported() {
            Some(Kind::Int16)
        } else {
            None
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
