//! The `--data` spec parser on arbitrary text; small synthetic specs are also loaded (the
//! size check must refuse large ones before allocating).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::{DataSpec, Dtype, Source};

fuzz_target!(
    init: {
        // Keep the loaders under the fuzzer's 2 GiB RSS limit: anything larger must be
        // refused by the size checks (that is part of what is tested).
        std::env::set_var("ORACLEFLOW_MAX_MEMORY", (1u64 << 30).to_string());
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(spec) = DataSpec::parse(text) else {
            return;
        };
        let small = match spec.source {
            Source::Gaussian { n_samples, dim, .. } | Source::Mixture { n_samples, dim, .. } => {
                n_samples.saturating_mul(dim) <= 1 << 16
            }
            _ => false,
        };
        if small {
            let _ = spec.load(text, Dtype::F32);
    }
    }
);
