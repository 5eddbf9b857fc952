//! Every kernel parses and validates with naga, without a device: a WGSL typo fails
//! `cargo test`, not a user's run.
//!
//! A kernel file under `shaders/` is not a module by itself: the backend compiles `const`
//! lines generated from its tile constants, then `shaders/common.wgsl`, then the kernel
//! file. So what is validated is exactly what the backend compiles (`kernel_sources`, with
//! the f16 storage variants), and a separate check makes sure every file on disk is in it.
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
fn every_shader_file_is_compiled() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let sources = oracleflow::oracle::gpu::kernel_sources();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let text = std::fs::read_to_string(&path).unwrap();
            let users = sources.iter().filter(|(_, s)| s.contains(&text)).count();
            // common.wgsl is in the f32 variants verbatim (the f16 ones swap a line).
            assert!(users > 0, "{} is in no compiled kernel", path.display());
            n += 1;
        }
    }
    assert!(
        n >= 5,
        "expected common.wgsl and the four kernels in {}",
        dir.display()
    );
}

#[test]
fn every_compiled_variant_validates() {
    let sources = oracleflow::oracle::gpu::kernel_sources();
    assert!(sources.iter().any(|(name, _)| name.contains("f16")));
    for (name, source) in &sources {
        validate(name, source);
    }
}
