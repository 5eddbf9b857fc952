//! safetensors files from arbitrary bytes, memory-mapped as the CLI does: with the tensor
//! left out (the only data tensor, labels found by name), named, and as f16 storage.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{safetensors, Dtype};

/// A scratch directory in RAM (/dev/shm) where there is one: faster, and a disk filled by
/// other work on the machine does not stop the run.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| scratch())
}

fuzz_target!(
    init: {
        // Keep the loaders under the fuzzer's 2 GiB RSS limit: anything larger must be
        // refused by the size checks (that is part of what is tested).
        std::env::set_var("ORACLEFLOW_MAX_MEMORY", (1u64 << 30).to_string());
    },
    |data: &[u8]| {
        let path = dir().path().join("fuzz.safetensors");
        std::fs::write(&path, data).expect("write fuzz input");
        let _ = safetensors::load(&path, None, None, Dtype::F32);
        let _ = safetensors::load(&path, Some("x"), Some(1), Dtype::F16);
        let _ = safetensors::load(&path, Some("labels"), None, Dtype::F32);
    }
);
