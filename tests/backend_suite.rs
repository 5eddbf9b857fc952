//! One backend-level suite (`Backend::posterior` over a `CentredBatch`), written once and
//! instantiated for every fast backend, against the one f64 reference of that problem
//! (`oracle::reference::posterior_f64`). Tolerances: `tests/common/backend.rs`.
//!
//! Cases: sizes that are no multiple of any tile, D not a multiple of 4 (the GPU pads D to
//! vec4), row ranges that start and end inside a tile, one row, one sample, f16 storage.

mod common;

use common::backend::*;
use oracleflow::oracle::cpu::CpuBackend;
use oracleflow::oracle::gpu::GpuBackend;
use oracleflow::oracle::{Backend, BackendKind};
use oracleflow::{Dataset, Dtype};

fn make(kind: BackendKind, ds: &Dataset) -> Box<dyn Backend + '_> {
    match kind {
        BackendKind::Cpu => Box::new(CpuBackend::new(ds)),
        BackendKind::Gpu => Box::new(GpuBackend::new(ds, false).unwrap_or_else(|e| {
            panic!("no usable GPU adapter ({e}); set ORACLEFLOW_SKIP_GPU=1 to skip GPU tests")
        })),
        other => unreachable!("{other:?} has no backend-level implementation"),
    }
}

pub fn sizes_that_are_not_tile_multiples(kind: BackendKind) {
    for (i, &(n, d, b)) in [
        (1, 1, 1),
        (7, 3, 5),
        (300, 67, 33),
        (1000, 784, 9),
        (517, 5, 70),
    ]
    .iter()
    .enumerate()
    {
        let ds = unit_gaussian_dataset(n, d, Dtype::F32, i as u64);
        let mut be = make(kind, &ds);
        run_case(
            &mut *be,
            &ds,
            b,
            0..n,
            100 + i as u64,
            &format!("{kind:?} N={n} D={d} B={b}"),
        );
    }
}

pub fn row_ranges_inside_tiles(kind: BackendKind) {
    // The cpu tiles are 256 rows, the gpu's depend on the adapter: these ranges start and
    // end inside tiles of any size above 37 and cross several.
    let ds = unit_gaussian_dataset(700, 21, Dtype::F32, 1);
    let mut be = make(kind, &ds);
    for (k, rows) in [37..611, 255..257, 256..700, 0..1, 650..651, 699..700]
        .into_iter()
        .enumerate()
    {
        let what = format!("{kind:?} rows {rows:?}");
        run_case(&mut *be, &ds, 5 + k, rows, 10 + k as u64, &what);
    }
}

pub fn one_sample_and_f16(kind: BackendKind) {
    // One sample: the posterior is one-hot whatever the query (a centred single row is 0).
    let one = unit_gaussian_dataset(1, 13, Dtype::F32, 2);
    let mut be = make(kind, &one);
    run_case(&mut *be, &one, 4, 0..1, 3, &format!("{kind:?} one sample"));
    // f16 storage, D = 30 (not a multiple of 4 either), the reference reads the same values.
    let half = unit_gaussian_dataset(400, 30, Dtype::F16, 4);
    let mut be = make(kind, &half);
    run_case(&mut *be, &half, 17, 3..397, 5, &format!("{kind:?} f16"));
}

macro_rules! backend_suite {
    ($name:ident, $kind:expr) => {
        mod $name {
            use super::*;
            fn on() -> bool {
                common::enabled($kind)
            }
            #[test]
            fn sizes_not_tile_multiples() {
                if on() {
                    sizes_that_are_not_tile_multiples($kind);
                }
            }
            #[test]
            fn row_ranges_start_and_end_inside_tiles() {
                if on() {
                    row_ranges_inside_tiles($kind);
                }
            }
            #[test]
            fn one_sample_and_f16_storage() {
                if on() {
                    one_sample_and_f16($kind);
                }
            }
        }
    };
}

backend_suite!(cpu, BackendKind::Cpu);
backend_suite!(gpu, BackendKind::Gpu);
