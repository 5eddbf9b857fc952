//! CIFAR binary batches from arbitrary bytes: the input is the one training batch and the
//! test batch of a CIFAR-10 folder, and the train.bin of a CIFAR-100 folder.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oracleflow::dataset::cifar::{self, Cifar, Split};
use oracleflow::dataset::Dtype;

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
    DIR.get_or_init(|| {
        let d = scratch();
        std::fs::create_dir(d.path().join("c10")).expect("mkdir");
        std::fs::create_dir(d.path().join("c100")).expect("mkdir");
        d
    })
}

fuzz_target!(
    init: {
        // Keep the loaders under the fuzzer's 2 GiB RSS limit: anything larger must be
        // refused by the size checks (that is part of what is tested).
        std::env::set_var("ORACLEFLOW_MAX_MEMORY", (1u64 << 30).to_string());
    },
    |data: &[u8]| {
        let (c10, c100) = (dir().path().join("c10"), dir().path().join("c100"));
        for f in [c10.join("data_batch_1.bin"), c10.join("test_batch.bin"), c100.join("train.bin")] {
            std::fs::write(&f, data).expect("write fuzz input");
        }
        let _ = cifar::load(&c10, Cifar::Cifar10, Split::Train, None, Dtype::F32);
        let _ = cifar::load(&c10, Cifar::Cifar10, Split::All, Some(2), Dtype::F16);
        let _ = cifar::load(&c100, Cifar::Cifar100, Split::Train, None, Dtype::F32);
    }
);
