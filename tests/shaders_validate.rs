//! Every kernel parses and validates with naga, without a device: a WGSL typo fails
//! `cargo test`, not a user's run.
//!
//! Two sets are checked: the files under `shaders/` exactly as they are on disk, and the
//! sources the GPU backend actually compiles (`kernel_sources`, which adds the f16 storage
//! variants). Capabilities::all() because the f16 variants need SHADER_FLOAT16; the
//! backend only compiles those where the device has SHADER_F16.

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
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let source = std::fs::read_to_string(&path).unwrap();
            validate(&path.display().to_string(), &source);
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
