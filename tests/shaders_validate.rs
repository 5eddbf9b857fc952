//! Every kernel parses and validates with naga, without a device: a WGSL typo fails
//! `cargo test`, not a user's run.
//!
//! A kernel file under `shaders/` is not a module by itself: the backend compiles `const`
//! lines generated from its tile constants, then `shaders/common.wgsl`, then the kernel
//! file. So what is validated is exactly what the backend compiles (`kernel_sources`, with
//! the f16 storage variants), and a separate check makes sure every file on disk is in it.
//! Capabilities::all() because the f16 variants need SHADER_FLOAT16; the backend only
//! compiles those where the device has SHADER_F16.
//!
//! The bind group layouts the backend builds (`layout_entries`, the table
//! `Kernels::new` builds the wgpu layouts from) must match what each shader declares:
//! a mismatch is otherwise only a wgpu validation error at pipeline creation, on a
//! device, or (read-only vs read-write) a layout that forbids what the kernel does.
//!
//! The tile shapes of `logits` and `accumulate` are WGSL `override` constants: every
//! configuration the backend may build (`override_variants`) is resolved with naga's own
//! override pass and checked too.

use std::collections::BTreeMap;

use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::{AddressSpace, StorageAccess};
use oracleflow::oracle::gpu::{
    binding_names, kernel_variants, layout_entries, BindingKind, KernelKind, STEP_PARAMS_BYTES,
};

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

/// What a shader declares at a binding of group 0: (kind, variable name, size in bytes
/// of the uniform).
type Declared = BTreeMap<u32, (BindingKind, String, Option<u32>)>;

/// The resource bindings naga finds in `source`, by binding number. Any binding outside
/// group 0, or not a buffer, is an error: the backend binds nothing else.
fn declared(name: &str, source: &str) -> Result<Declared, Vec<String>> {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: parse error\n{}", e.emit_to_string(source)));
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    let mut out = Declared::new();
    let mut errors = Vec::new();
    for (_, g) in module.global_variables.iter() {
        let Some(rb) = &g.binding else { continue };
        let var = g.name.clone().unwrap_or_default();
        let kind = match g.space {
            AddressSpace::Uniform => BindingKind::Uniform,
            AddressSpace::Storage { access } if access == StorageAccess::LOAD => {
                BindingKind::ReadOnlyStorage
            }
            AddressSpace::Storage { access } if access.contains(StorageAccess::STORE) => {
                BindingKind::ReadWriteStorage
            }
            space => {
                errors.push(format!("{name}: `{var}` is in {space:?}, not a buffer"));
                continue;
            }
        };
        if rb.group != 0 {
            errors.push(format!("{name}: `{var}` is in group {}, not 0", rb.group));
        }
        let size = (kind == BindingKind::Uniform).then(|| layouter[g.ty].size);
        if let Some((_, other, _)) = out.insert(rb.binding, (kind, var.clone(), size)) {
            errors.push(format!(
                "{name}: binding {} declared twice ({other}, {var})",
                rb.binding
            ));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Every difference between the backend's layout of `kernel` and what `source` declares,
/// one line each (empty: they match).
fn layout_mismatches(name: &str, kernel: KernelKind, source: &str) -> Vec<String> {
    let shader = match declared(name, source) {
        Ok(d) => d,
        Err(errors) => return errors,
    };
    let names: BTreeMap<u32, &str> = binding_names(kernel).into_iter().collect();
    let rust: BTreeMap<u32, BindingKind> = layout_entries(kernel).into_iter().collect();
    let mut out = Vec::new();
    for (binding, kind) in &rust {
        match shader.get(binding) {
            None => out.push(format!(
                "{name}: binding {binding} ({kind:?} `{}`) is in the Rust layout but not declared \
                 by the shader",
                names[binding]
            )),
            Some((declared, var, size)) => {
                if declared != kind {
                    out.push(format!(
                        "{name}: binding {binding} `{var}` is {declared:?} in the shader, {kind:?} in \
                         the Rust layout"
                    ));
                }
                if var != names[binding] {
                    out.push(format!(
                        "{name}: binding {binding} is `{var}` in the shader, `{}` in the Rust layout",
                        names[binding]
                    ));
                }
                if let Some(size) = size {
                    if *size as u64 != STEP_PARAMS_BYTES {
                        out.push(format!(
                            "{name}: uniform `{var}` is {size} B, StepParams {STEP_PARAMS_BYTES} B"
                        ));
                    }
                }
            }
        }
    }
    for (binding, (kind, var, _)) in &shader {
        if !rust.contains_key(binding) {
            out.push(format!(
                "{name}: binding {binding} ({kind:?} `{var}`) is declared by the shader but not in \
                 the Rust layout"
            ));
        }
    }
    out
}

#[test]
fn bind_group_layouts_match_the_shaders() {
    let variants = kernel_variants();
    for kernel in KernelKind::ALL {
        assert!(
            variants.iter().any(|(_, k, _)| *k == kernel),
            "{kernel:?} has no compiled source"
        );
    }
    let mut mismatches = Vec::new();
    for (name, kernel, source) in &variants {
        assert!(!layout_entries(*kernel).is_empty(), "{name}: empty layout");
        mismatches.extend(layout_mismatches(name, *kernel, source));
    }
    assert!(
        mismatches.is_empty(),
        "bind group layouts differ from the shaders:\n{}",
        mismatches.join("\n")
    );
}

/// The comparison above catches each kind of mismatch (so its passing means something):
/// a binding missing on either side, a read-only binding made read-write, a renamed one.
#[test]
fn layout_mismatches_are_reported() {
    let source = KernelKind::Finalize.source(false);
    assert!(layout_mismatches("finalize", KernelKind::Finalize, &source).is_empty());
    let cases = [
        (
            "@group(0) @binding(3) var<storage, read_write> mean",
            "@group(0) @binding(7) var<storage, read_write> mean",
            ["binding 3", "not declared by the shader"],
        ),
        (
            "@group(0) @binding(1) var<storage, read> acc",
            "@group(0) @binding(1) var<storage, read_write> acc",
            ["binding 1", "ReadWriteStorage in the shader"],
        ),
        (
            "@group(0) @binding(2) var<storage, read> states",
            "@group(0) @binding(2) var<storage, read> states_",
            ["binding 2", "`states_` in the shader"],
        ),
    ];
    for (from, to, [what, how]) in cases {
        assert!(source.contains(from), "finalize.wgsl lacks `{from}`");
        // Renaming a variable breaks the kernel's body: rename its uses too.
        let mutated = if from.ends_with("states") {
            source.replace("states", "states_")
        } else {
            source.replace(from, to)
        };
        let found = layout_mismatches("finalize", KernelKind::Finalize, &mutated);
        assert!(
            found.iter().any(|m| m.contains(what) && m.contains(how)),
            "`{to}`: {found:?}"
        );
    }
    // A binding the Rust layout lacks: the finalize layout (bindings 0..3) against the
    // accumulate shader (0..4).
    let accumulate = KernelKind::Accumulate.source(false);
    let found = layout_mismatches("accumulate", KernelKind::Finalize, &accumulate);
    assert!(
        found
            .iter()
            .any(|m| m.contains("binding 4") && m.contains("not in the Rust layout")),
        "{found:?}"
    );
}

/// Every tile configuration the backend may build (each logits candidate, the accumulate
/// shapes of several D on a 32 KiB and a 16 KiB device), f32 and f16: the override
/// constants resolve (naga's own pass, as wgpu runs it at pipeline creation), the resolved
/// module validates, and its workgroup size and workgroup memory are the host's figures,
/// which size the grids and decide what fits a device.
#[test]
fn every_tile_configuration_resolves_and_validates() {
    let variants = oracleflow::oracle::gpu::override_variants();
    assert!(variants.len() >= 10, "{} variants", variants.len());
    for (name, kernel, constants, size, bytes) in variants {
        for f16 in [false, true] {
            let source = kernel.source(f16);
            let module = naga::front::wgsl::parse_str(&source)
                .unwrap_or_else(|e| panic!("{name}: parse error\n{}", e.emit_to_string(&source)));
            let info = Validator::new(ValidationFlags::all(), Capabilities::all())
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name}: invalid\n{}", e.emit_to_string(&source)));
            let overrides: Vec<String> = module
                .overrides
                .iter()
                .filter_map(|(_, o)| o.name.clone())
                .collect();
            for (key, _) in &constants {
                assert!(
                    overrides.iter().any(|o| o == key),
                    "{name}: the host sets `{key}`, which the shader does not declare ({overrides:?})"
                );
            }
            let constants: naga::back::PipelineConstants =
                constants.iter().map(|&(k, v)| (k.to_string(), v)).collect();
            let (resolved, _) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, "main")),
                &constants,
            )
            .unwrap_or_else(|e| panic!("{name} (f16 {f16}): overrides: {e}"));
            Validator::new(ValidationFlags::all(), Capabilities::all())
                .validate(&resolved)
                .unwrap_or_else(|e| panic!("{name} (f16 {f16}): resolved module invalid: {e}"));
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(resolved.to_ctx()).unwrap();
            let declared: u32 = resolved
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == AddressSpace::WorkGroup)
                .map(|(_, g)| layouter[g.ty].size)
                .sum();
            assert_eq!(declared, bytes, "{name} (f16 {f16}): workgroup memory");
            assert_eq!(
                resolved.entry_points[0].workgroup_size, size,
                "{name} (f16 {f16}): workgroup size"
            );
        }
    }
}

/// A constant the host would set that no shader declares fails pipeline creation on a
/// device; the check above must catch it here (so its passing means something).
#[test]
fn an_unknown_override_is_refused_by_naga() {
    let source = KernelKind::Logits.source(false);
    let module = naga::front::wgsl::parse_str(&source).unwrap();
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap();
    let constants: naga::back::PipelineConstants =
        [("NO_SUCH_TILE".to_string(), 8.0)].into_iter().collect();
    assert!(naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .is_err());
}
