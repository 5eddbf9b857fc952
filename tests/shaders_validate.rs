//! Every kernel parses and validates with naga, without a device: a WGSL typo fails
//! `cargo test`, not a user's run.
//!
//! A kernel file under `shaders/` is not a module by itself: the backend compiles
//! `shaders/common.wgsl` followed by it. Two sets are checked: common.wgsl alone and
//! followed by each kernel file as they are on disk, and the sources the GPU backend
//! actually compiles (`kernel_sources`, which adds the f16 storage variants).
//! Capabilities::all() because the f16 variants need SHADER_FLOAT16; the backend only
//! compiles those where the device has SHADER_F16.

use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(name: &str, source: &str) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: parse error\n{}", e.emit_to_string(source)));
    Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: invalid\n{}", e.emit_to_string(source)));
}

#[test]
fn every_shader_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let common_path = dir.join("common.wgsl");
    let common = std::fs::read_to_string(&common_path).expect("shaders/common.wgsl exists");
    validate(&common_path.display().to_string(), &common);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") && path != common_path {
            let kernel = std::fs::read_to_string(&path).unwrap();
            let name = format!("common.wgsl + {}", path.display());
            validate(&name, &format!("{common}\n{kernel}"));
            n += 1;
        }
    }
    assert!(n >= 4, "expected the four kernels in {}", dir.display());
}

#[test]
fn every_compiled_variant_validates() {
    let sources = oracleflow::oracle::gpu::kernel_sources();
    assert!(sources.iter().any(|(name, _)| name.contains("f16")));
    for (name, source) in &sources {
        validate(name, source);
    }
}
