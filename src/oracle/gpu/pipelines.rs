//! The four kernels of a posterior evaluation, their bind group layouts and pipelines.
//!
//! One WGSL file per kernel under `shaders/`, compiled after `shaders/common.wgsl` (the
//! declarations every kernel shares: `Params`, `QueryState`, `tile_rows`, ...), which is
//! itself preceded by `const` lines generated from the tile constants below: they are
//! written once, here, and the kernels are compiled with the values the host dispatches
//! by. The two kernels that read the dataset (`logits`, `accumulate`) come in an f32 and
//! an f16 storage variant made from the same files: the host swaps the
//! `alias YVec = vec4<f32>;` line of common.wgsl and puts `enable f16;` first.

use bytemuck::{Pod, Zeroable};

use crate::oracle::SoftmaxState;

const COMMON_WGSL: &str = include_str!("../../../shaders/common.wgsl");
const LOGITS_WGSL: &str = include_str!("../../../shaders/logits.wgsl");
const SOFTMAX_WGSL: &str = include_str!("../../../shaders/softmax.wgsl");
const ACCUMULATE_WGSL: &str = include_str!("../../../shaders/accumulate.wgsl");
const FINALIZE_WGSL: &str = include_str!("../../../shaders/finalize.wgsl");

const F32_STORAGE: &str = "alias YVec = vec4<f32>;";
const F16_STORAGE: &str = "alias YVec = vec4<f16>;";

/// Queries per workgroup in `logits` and `accumulate` (`TILE_Q` in WGSL).
pub(super) const TILE_QUERIES: u32 = 64;
/// Rows per workgroup in `logits`; tile widths are multiples of it (`TILE_R` in WGSL).
pub(super) const TILE_ROWS_ALIGN: u32 = 64;
/// vec4 columns of D per workgroup in `accumulate` (`TILE_C` in WGSL).
pub(super) const ACC_TILE_COLUMNS: u32 = 32;
/// Threads per workgroup in `finalize`, along the vec4 columns (`FINALIZE_WG` in WGSL).
pub(super) const FINALIZE_WORKGROUP: u32 = 64;
/// Workgroup memory the kernels declare, at most (the largest, `accumulate`: 768 vec4).
/// The unit test below checks it against every compiled module.
pub(super) const WORKGROUP_BYTES: u32 = 768 * 16;

// `logits` and `accumulate` run 16 x 16 threads, each holding a 4 x 4 block of queries x
// rows (`logits`) or 4 queries x 2 vec4 columns (`accumulate`): the tiles follow from that
// layout, which the kernels spell out (strides of 16 lanes).
const _: () = assert!(TILE_QUERIES == 16 * 4 && TILE_ROWS_ALIGN == 16 * 4);
const _: () = assert!(ACC_TILE_COLUMNS == 16 * 2);

/// The WGSL `const` declarations of the tile constants, put before common.wgsl.
fn generated_constants() -> String {
    format!(
        "// Generated from src/oracle/gpu/pipelines.rs.\n\
         const TILE_Q: u32 = {TILE_QUERIES}u;\n\
         const TILE_R: u32 = {TILE_ROWS_ALIGN}u;\n\
         const TILE_C: u32 = {ACC_TILE_COLUMNS}u;\n\
         const FINALIZE_WG: u32 = {FINALIZE_WORKGROUP}u;\n"
    )
}

/// Per-dispatch parameters (`struct Params` in common.wgsl); one per tile step, bound at
/// a dynamic offset of one uniform buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct StepParams {
    pub n_queries: u32,
    /// vec4s per (padded) row
    pub dim4: u32,
    /// rows per split per step (Nt), a multiple of [`TILE_ROWS_ALIGN`]
    pub tile_rows: u32,
    pub n_splits: u32,
    /// chunk-local first row of split 0
    pub split_base: u32,
    /// rows per split
    pub split_len: u32,
    /// chunk-local end of the row range
    pub range_end: u32,
    /// rows of each split already done
    pub step_offset: u32,
    /// dataset row of the chunk's first row (for the argmax)
    pub chunk_first_row: u32,
    pub pad: [u32; 3],
}

/// `struct QueryState` in common.wgsl: the scalar online-softmax state of one query and
/// split, plus the last step's rescale factor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct GpuState {
    pub max: f32,
    pub sum: f32,
    pub sum_shifted_logit: f32,
    pub sum_sq: f32,
    pub argmax: u32,
    pub scale: f32,
    /// sum_j e_j |y_j|^2 on the scale of `sum` (for the posterior variance)
    pub sum_norm: f32,
    pub pad: u32,
}

impl From<GpuState> for SoftmaxState {
    fn from(g: GpuState) -> SoftmaxState {
        SoftmaxState {
            max: g.max,
            sum: g.sum,
            sum_shifted_logit: g.sum_shifted_logit,
            sum_sq: g.sum_sq,
            argmax: g.argmax,
        }
    }
}

/// The four kernels of a posterior evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Logits,
    Softmax,
    Accumulate,
    Finalize,
}

/// How a kernel binds one buffer (every binding is in group 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingKind {
    /// `var<uniform>`: the step parameters, at a dynamic offset.
    Uniform,
    /// `var<storage, read>`
    ReadOnlyStorage,
    /// `var<storage, read_write>`
    ReadWriteStorage,
}

impl KernelKind {
    pub const ALL: [KernelKind; 4] = [
        KernelKind::Logits,
        KernelKind::Softmax,
        KernelKind::Accumulate,
        KernelKind::Finalize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Logits => "logits",
            KernelKind::Softmax => "softmax",
            KernelKind::Accumulate => "accumulate",
            KernelKind::Finalize => "finalize",
        }
    }

    fn wgsl(self) -> &'static str {
        match self {
            KernelKind::Logits => LOGITS_WGSL,
            KernelKind::Softmax => SOFTMAX_WGSL,
            KernelKind::Accumulate => ACCUMULATE_WGSL,
            KernelKind::Finalize => FINALIZE_WGSL,
        }
    }

    /// Whether the kernel reads the dataset, and so comes in an f16 storage variant.
    pub fn reads_dataset(self) -> bool {
        matches!(self, KernelKind::Logits | KernelKind::Accumulate)
    }

    /// The module compiled for the kernel (`f16`: the f16 storage variant, for kernels
    /// that read the dataset).
    pub fn source(self, f16: bool) -> String {
        module_source(self.wgsl(), f16 && self.reads_dataset())
    }

    /// The kernel's bindings in binding order (entry i is binding i), each with the name
    /// of its WGSL variable. The bind groups (`buffers.rs`) bind the step parameters,
    /// then buffers by these names, in this order.
    pub fn layout(self) -> &'static [(BindingKind, &'static str)] {
        use BindingKind::*;
        match self {
            KernelKind::Logits => &[
                (Uniform, "p"),
                (ReadOnlyStorage, "x"),
                (ReadOnlyStorage, "coefs"),
                (ReadOnlyStorage, "y"),
                (ReadOnlyStorage, "sq_norms"),
                (ReadWriteStorage, "logits"),
            ],
            // The logits are overwritten by the weights.
            KernelKind::Softmax => &[
                (Uniform, "p"),
                (ReadWriteStorage, "logits"),
                (ReadWriteStorage, "states"),
                // the chunk's row norms: sum_j e_j |y_j|^2 for the posterior variance
                (ReadOnlyStorage, "sq_norms"),
            ],
            KernelKind::Accumulate => &[
                (Uniform, "p"),
                (ReadOnlyStorage, "weights"),
                (ReadOnlyStorage, "y"),
                (ReadOnlyStorage, "states"),
                (ReadWriteStorage, "acc"),
            ],
            KernelKind::Finalize => &[
                (Uniform, "p"),
                (ReadOnlyStorage, "acc"),
                (ReadOnlyStorage, "states"),
                (ReadWriteStorage, "mean"),
            ],
        }
    }
}

/// The bind group layout entries of `kernel` as (binding, kind): what `Kernels::new`
/// builds the wgpu layouts from, and what the shader validation test compares with the
/// shaders' own declarations.
pub fn layout_entries(kernel: KernelKind) -> Vec<(u32, BindingKind)> {
    kernel
        .layout()
        .iter()
        .enumerate()
        .map(|(i, &(kind, _))| (i as u32, kind))
        .collect()
}

/// The WGSL variable bound at each binding of `kernel`, as (binding, name).
pub fn binding_names(kernel: KernelKind) -> Vec<(u32, &'static str)> {
    kernel
        .layout()
        .iter()
        .enumerate()
        .map(|(i, &(_, name))| (i as u32, name))
        .collect()
}

/// Bytes of the uniform at binding 0 (`StepParams`, `struct Params` in common.wgsl): the
/// layouts' minimum binding size.
pub const STEP_PARAMS_BYTES: u64 = std::mem::size_of::<StepParams>() as u64;

/// Every kernel source the backend may compile, by name: each of the four kernels after
/// common.wgsl, and the f16 storage variants. The shader validation test checks all of them.
pub fn kernel_sources() -> Vec<(String, String)> {
    kernel_variants()
        .into_iter()
        .map(|(name, _, source)| (name, source))
        .collect()
}

/// [`kernel_sources`] with the kernel each source is compiled for.
pub fn kernel_variants() -> Vec<(String, KernelKind, String)> {
    let mut out = Vec::new();
    for kernel in KernelKind::ALL {
        if kernel.reads_dataset() {
            for (f16, suffix) in [(false, "f32"), (true, "f16")] {
                let name = format!("{} ({suffix})", kernel.name());
                out.push((name, kernel, kernel.source(f16)));
            }
        } else {
            out.push((kernel.name().to_string(), kernel, kernel.source(false)));
        }
    }
    out
}

/// The module compiled for a kernel: the generated constants, common.wgsl, then the
/// kernel's own file. With `f16`, `enable f16;` goes first (a directive must precede every
/// declaration) and the storage alias of common.wgsl becomes vec4<f16>.
fn module_source(kernel: &str, f16: bool) -> String {
    assert!(
        COMMON_WGSL.contains(F32_STORAGE),
        "common.wgsl lacks the storage alias line"
    );
    let constants = generated_constants();
    if f16 {
        let common = COMMON_WGSL.replace(F32_STORAGE, F16_STORAGE);
        format!("enable f16;\n{constants}\n{common}\n{kernel}")
    } else {
        format!("{constants}\n{COMMON_WGSL}\n{kernel}")
    }
}

fn layout(device: &wgpu::Device, kernel: KernelKind) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = layout_entries(kernel)
        .into_iter()
        .map(|(binding, kind)| {
            let (ty, has_dynamic_offset, min_binding_size) = match kind {
                BindingKind::Uniform => (
                    wgpu::BufferBindingType::Uniform,
                    true,
                    wgpu::BufferSize::new(STEP_PARAMS_BYTES),
                ),
                BindingKind::ReadOnlyStorage => (
                    wgpu::BufferBindingType::Storage { read_only: true },
                    false,
                    None,
                ),
                BindingKind::ReadWriteStorage => (
                    wgpu::BufferBindingType::Storage { read_only: false },
                    false,
                    None,
                ),
            };
            wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset,
                    min_binding_size,
                },
                count: None,
            }
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(kernel.name()),
        entries: &entries,
    })
}

/// One compute pipeline with its bind group layout.
pub(super) struct Kernel {
    pub kind: KernelKind,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Kernel {
    fn new(device: &wgpu::Device, kind: KernelKind, f16_storage: bool, trusted: bool) -> Kernel {
        let name = kind.name();
        let layout = layout(device, kind);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(kind.source(f16_storage).into()),
        };
        let module = if trusted {
            // SAFETY: every kernel bounds its own indices (each load and store is guarded
            // by the row count, query count or dim4 in its parameters, and the buffers
            // are sized for them on the host) and every loop has a bound from uniforms.
            unsafe {
                device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            device.create_shader_module(desc)
        };
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Kernel {
            kind,
            pipeline,
            layout,
        }
    }
}

/// The pipelines of one backend, built once.
pub(super) struct Kernels {
    pub logits: Kernel,
    pub softmax: Kernel,
    pub accumulate: Kernel,
    pub finalize: Kernel,
}

impl Kernels {
    /// `f16_storage`: the dataset buffers hold f16 (needs SHADER_F16 on the device).
    /// Compilation errors are wgpu validation errors: call inside an error scope.
    pub fn new(device: &wgpu::Device, f16_storage: bool, trusted: bool) -> Kernels {
        let kernel = |kind| Kernel::new(device, kind, f16_storage, trusted);
        Kernels {
            logits: kernel(KernelKind::Logits),
            softmax: kernel(KernelKind::Softmax),
            accumulate: kernel(KernelKind::Accumulate),
            finalize: kernel(KernelKind::Finalize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workgroup memory and sizes of the compiled modules agree with the host's
    /// constants (the tile constants themselves are generated into the modules).
    #[test]
    fn compiled_kernels_match_the_host_constants() {
        let mut largest = 0;
        for (name, source) in kernel_sources() {
            let module = naga::front::wgsl::parse_str(&source)
                .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&source)));
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).unwrap();
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                .map(|(_, g)| layouter[g.ty].size)
                .sum();
            assert!(
                bytes <= WORKGROUP_BYTES,
                "{name}: {bytes} B of workgroup memory"
            );
            largest = largest.max(bytes);
            let [entry] = &module.entry_points[..] else {
                panic!("{name}: one entry point expected");
            };
            let expected = if name.starts_with("finalize") {
                [FINALIZE_WORKGROUP, 1, 1]
            } else if name.starts_with("softmax") {
                [64, 1, 1]
            } else {
                [16, 16, 1]
            };
            assert_eq!(entry.workgroup_size, expected, "{name}");
        }
        assert_eq!(largest, WORKGROUP_BYTES);
    }
}
