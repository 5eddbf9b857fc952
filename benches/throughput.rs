//! Oracle throughput beside a plain sgemm of the same shape, measured in one run.
//!
//!     cargo bench --bench throughput
//!
//! Defaults: Fashion-MNIST train (N = 60000, D = 784), B = 256, f32 storage, cpu and gpu.
//! Environment overrides: ORACLEFLOW_BENCH_DATA (a --data spec), ORACLEFLOW_BENCH_B,
//! ORACLEFLOW_BENCH_REPS, ORACLEFLOW_BENCH_DTYPE (f32|f16), ORACLEFLOW_SKIP_GPU=1.
//! GFLOP/s counts 4 B N D per oracle evaluation (two GEMMs) and 2 B N D for the sgemm.

use oracleflow::bench::{oracle_throughput, sgemm_throughput};
use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::BackendKind;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let spec: String = env_or("ORACLEFLOW_BENCH_DATA", "fashion-mnist".to_string());
    let b: usize = env_or("ORACLEFLOW_BENCH_B", 256);
    let reps: usize = env_or("ORACLEFLOW_BENCH_REPS", 3);
    let dtype = match std::env::var("ORACLEFLOW_BENCH_DTYPE").as_deref() {
        Ok("f16") => Dtype::F16,
        _ => Dtype::F32,
    };
    let ds = dataset::load(&spec, dtype).unwrap_or_else(|e| panic!("{e}"));
    let (n, d) = (ds.n_samples(), ds.dim());
    println!("{spec}: N = {n}, D = {d}, B = {b}, {dtype:?} storage, median of {reps}");
    let mut rows = vec![sgemm_throughput(b, n, d, reps).expect("sgemm")];
    let mut kinds = vec![BackendKind::Cpu];
    if std::env::var("ORACLEFLOW_SKIP_GPU").as_deref() != Ok("1") {
        kinds.push(BackendKind::Gpu);
    }
    for kind in kinds {
        match oracle_throughput(&ds, kind, b, reps) {
            Ok(m) => rows.push(m),
            Err(e) => println!("{kind:?}: not measured: {e}"),
        }
    }
    print!("{}", oracleflow::bench::table(&rows));
}
