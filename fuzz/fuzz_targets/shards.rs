//! A shards directory from arbitrary bytes: byte 0 picks the layout, bytes 1..3 where the
//! rest is split into two `.npy` files: shards `a.npy` and `b.npy`; or shard `a.npy` with
//! `b` as `labels.npy` (labels for all rows) or as `a_labels.npy` (per-shard labels).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{shards, Dtype};

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
        let Some((&[layout, lo, hi], rest)) = data.split_first_chunk::<3>() else {
            return;
        };
        let split = (u16::from_le_bytes([lo, hi]) as usize).min(rest.len());
        let (a, b) = rest.split_at(split);
        let d = dir().path();
        for name in ["a.npy", "b.npy", "labels.npy", "a_labels.npy"] {
            let _ = std::fs::remove_file(d.join(name));
        }
        let second = match layout % 3 {
            0 => "b.npy",
            1 => "labels.npy",
            _ => "a_labels.npy",
        };
        std::fs::write(d.join("a.npy"), a).expect("write fuzz input");
        std::fs::write(d.join(second), b).expect("write fuzz input");
        let _ = shards::load(d, None, Dtype::F32);
        let _ = shards::load(d, Some(1), Dtype::F16);
    }
);
