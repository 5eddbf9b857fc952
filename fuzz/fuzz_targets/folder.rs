//! A folder holding one image file with arbitrary bytes (PNG, JPEG or garbage; the
//! format is guessed from the content, as the loader does).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{folder, Dtype};

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
        let path = dir().path().join("image.png");
        std::fs::write(&path, data).expect("write fuzz input");
        let _ = folder::load(dir().path(), None, Dtype::F32);
    }
);
