//! IDX images and labels from arbitrary bytes (raw or gzipped): an `Err`, never a panic,
//! an abort or an allocation beyond what the header (checked against memory) announces.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{idx, Dtype};

fuzz_target!(
    init: {
        // Keep the loaders under the fuzzer's 2 GiB RSS limit: anything larger must be
        // refused by the size checks (that is part of what is tested).
        std::env::set_var("ORACLEFLOW_MAX_MEMORY", (1u64 << 30).to_string());
    },
    |data: &[u8]| {
        let _ = idx::decode_labels(data, Path::new("fuzz-labels-idx1-ubyte"));
        let _ = idx::from_bytes("fuzz-images-idx3-ubyte", data, None, None, Dtype::F32);
        // The same bytes as images and as their own labels (a length mismatch path), and f16.
        let _ = idx::from_bytes("fuzz-images-idx3-ubyte", data, Some(data), Some(1), Dtype::F16);
    }
);
