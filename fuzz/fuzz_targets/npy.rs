//! `.npy` files from arbitrary bytes, through the same paths the CLI uses: the dataset
//! loader (memory-mapped), the f32 reader (queries, times) and the labels reader.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{npy, Dtype};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(
    init: {
        // Keep the loaders under the fuzzer's 2 GiB RSS limit: anything larger must be
        // refused by the size checks (that is part of what is tested).
        std::env::set_var("ORACLEFLOW_MAX_MEMORY", (1u64 << 30).to_string());
    },
    |data: &[u8]| {
        let path = dir().path().join("fuzz.npy");
        std::fs::write(&path, data).expect("write fuzz input");
        let _ = npy::parse_header(data, &path);
        let _ = npy::load(&path, None, None, Dtype::F32);
        let _ = npy::load(&path, Some(&path), Some(1), Dtype::F16);
        let _ = npy::read_npy_f32(&path);
    }
);
