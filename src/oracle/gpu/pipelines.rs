//! The four kernels of a posterior evaluation, their bind group layouts and pipelines.
//!
//! One WGSL file per kernel under `shaders/`, compiled after `shaders/common.wgsl` (the
//! declarations every kernel shares: `Params`, `QueryState`, `tile_rows`, ...), which is
//! itself preceded by `const` lines generated from host constants (the finalize
//! workgroup size): written once, here, so the kernels are compiled with the values the
//! host dispatches by. The two kernels that read the dataset (`logits`, `accumulate`) come in an f32 and
//! an f16 storage variant made from the same files: the host swaps the
//! `alias YVec = vec4<f32>;` line of common.wgsl and puts `enable f16;` first.
//!
//! Their tile shapes are WGSL `override` constants set at pipeline creation ([`Tiles`]),
//! not generated text: one validated source yields every configuration, the autotune
//! (`tune.rs`) can compare them on a device without editing shaders, and the accumulate
//! shape is specialised to each dataset's D (its column tile divides D/4 where it can).
//! The per-thread register blocks (8 x 8 in `logits`, 8 queries x 2 vec4 in
//! `accumulate`) stay fixed in the code: they are named variables, which is what keeps
//! them in registers.
//! docs/GPU_KERNELS.md gives the FLOP/byte and occupancy argument for the shapes.

use bytemuck::{Pod, Zeroable};

use crate::oracle::SoftmaxState;

const COMMON_WGSL: &str = include_str!("../../../shaders/common.wgsl");
const LOGITS_WGSL: &str = include_str!("../../../shaders/logits.wgsl");
const SOFTMAX_WGSL: &str = include_str!("../../../shaders/softmax.wgsl");
const ACCUMULATE_WGSL: &str = include_str!("../../../shaders/accumulate.wgsl");
const FINALIZE_WGSL: &str = include_str!("../../../shaders/finalize.wgsl");

const F32_STORAGE: &str = "alias YVec = vec4<f32>;";
const F16_STORAGE: &str = "alias YVec = vec4<f16>;";

/// Threads per workgroup in `finalize`, along the vec4 columns (`FINALIZE_WG` in WGSL).
pub(super) const FINALIZE_WORKGROUP: u32 = 64;
/// Workgroup memory the smallest configuration needs ([`LogitsTiles::SMALLEST`], and
/// `accumulate` at its narrowest): the least a device must offer (`device.rs`).
pub(super) const WORKGROUP_BYTES: u32 = 12 * 1024;
/// Most threads per workgroup of any configuration (every adapter offers 256).
pub const MAX_WORKGROUP_THREADS: u32 = 256;

/// Tile shape of the `logits` GEMM: a workgroup of `wg_r` x `wg_q` threads, each keeping an
/// 8-query x 8-row register block, over a `8 wg_r`-row x `8 wg_q`-query block of S,
/// advancing `kt` vec4s of K per step. The WGSL override constants `WG_R`, `WG_Q`, `KT`.
///
/// Written (`Display`, `parse`, `ORACLEFLOW_GPU_TILES`) as ROWSxQUERIESxK: rows and queries
/// per workgroup, K values per step, e.g. `128x128x8` (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LogitsTiles {
    pub wg_r: u32,
    pub wg_q: u32,
    pub kt: u32,
}

impl LogitsTiles {
    /// 128 rows x 128 queries, K step 8: 256 threads, 24 KiB of workgroup memory.
    pub const DEFAULT: LogitsTiles = LogitsTiles {
        wg_r: 16,
        wg_q: 16,
        kt: 2,
    };
    /// 64 rows x 64 queries, K step 8: 64 threads, 12 KiB, for devices with little
    /// workgroup memory (WebGPU's minimum is 16 KiB).
    pub const SMALLEST: LogitsTiles = LogitsTiles {
        wg_r: 8,
        wg_q: 8,
        kt: 2,
    };
    /// The configurations the autotune (`tune.rs`) times, the default first; the first
    /// that fits a device's workgroup memory is the untuned choice.
    pub const CANDIDATES: [LogitsTiles; 6] = [
        LogitsTiles::DEFAULT,
        // 128 x 64 (18 KiB, 128 threads): small batches waste fewer query lanes, and
        // more workgroups fit an SM/CU
        LogitsTiles {
            wg_r: 16,
            wg_q: 8,
            kt: 2,
        },
        // 128 x 64 with a K step of 16 (30 KiB): half the barriers
        LogitsTiles {
            wg_r: 16,
            wg_q: 8,
            kt: 4,
        },
        // 256 x 64 (30 KiB, 256 threads): X reused over more rows
        LogitsTiles {
            wg_r: 32,
            wg_q: 8,
            kt: 2,
        },
        // 64 x 128 (18 KiB, 128 threads): large batches, short row tiles
        LogitsTiles {
            wg_r: 8,
            wg_q: 16,
            kt: 2,
        },
        LogitsTiles::SMALLEST,
    ];

    /// Dataset rows per workgroup (`TR`).
    pub fn rows(self) -> u32 {
        8 * self.wg_r
    }

    /// Queries per workgroup (`TQ`).
    pub fn queries(self) -> u32 {
        8 * self.wg_q
    }

    pub fn threads(self) -> u32 {
        self.wg_r * self.wg_q
    }

    /// Workgroup memory: two halves of (TQ + TR) rows of KT + 1 vec4s.
    pub fn workgroup_bytes(self) -> u32 {
        2 * (self.queries() + self.rows()) * (self.kt + 1) * 16
    }

    /// Why the kernel cannot run this shape, if it cannot: each thread stages at most 4 X
    /// and 4 Y vec4s per step (the named registers of logits.wgsl), rows per workgroup are
    /// a power of two from 64 (the plan's tile widths are multiples of them).
    pub fn check(self) -> std::result::Result<(), String> {
        let LogitsTiles { wg_r, wg_q, kt } = self;
        if !wg_r.is_power_of_two() || !(8..=32).contains(&wg_r) {
            return Err(format!(
                "{} rows per workgroup: must be 64, 128 or 256",
                self.rows()
            ));
        }
        if !wg_q.is_power_of_two() || !(2..=32).contains(&wg_q) {
            return Err(format!(
                "{} queries per workgroup: must be a power of two from 16 to 256",
                self.queries()
            ));
        }
        if !(1..=8).contains(&kt) {
            return Err(format!("K step {}: must be 4 to 32 values", 4 * kt));
        }
        if 2 * kt > wg_r || 2 * kt > wg_q {
            return Err(format!(
                "K step {} is too long for {} rows x {} queries (each thread stages at most 4 \
                 query and 4 row vec4s per step)",
                4 * kt,
                self.rows(),
                self.queries()
            ));
        }
        if self.threads() > MAX_WORKGROUP_THREADS {
            return Err(format!(
                "{} threads per workgroup (at most {MAX_WORKGROUP_THREADS})",
                self.threads()
            ));
        }
        Ok(())
    }

    /// Parses ROWSxQUERIESxK (`what` names the source in the error).
    pub fn parse(s: &str, what: &str) -> crate::error::Result<LogitsTiles> {
        let bad = |why: String| {
            crate::error::Error::Input(format!(
                "{what}: `{s}` is not a logits tile ROWSxQUERIESxK (e.g. 128x128x8): {why}"
            ))
        };
        let parts: Vec<&str> = s.trim().split('x').collect();
        let [r, q, k] = parts[..] else {
            return Err(bad("three numbers separated by x expected".into()));
        };
        let num = |t: &str| -> crate::error::Result<u32> {
            t.parse::<u32>()
                .map_err(|_| bad(format!("`{t}` is not a whole number")))
        };
        let (r, q, k) = (num(r)?, num(q)?, num(k)?);
        if r % 8 != 0 || q % 8 != 0 || k % 4 != 0 {
            return Err(bad("rows and queries must be multiples of 8, K of 4".into()));
        }
        let t = LogitsTiles {
            wg_r: r / 8,
            wg_q: q / 8,
            kt: k / 4,
        };
        t.check().map_err(bad)?;
        Ok(t)
    }

    fn constants(self) -> Vec<(&'static str, f64)> {
        vec![
            ("WG_R", self.wg_r as f64),
            ("WG_Q", self.wg_q as f64),
            ("KT", self.kt as f64),
        ]
    }
}

impl std::fmt::Display for LogitsTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.rows(), self.queries(), 4 * self.kt)
    }
}

/// Tile shape of `accumulate`: `wg_c` x `wg_q` threads, each keeping 8 queries x 2 vec4
/// columns, over `8 wg_q` queries x `2 wg_c` vec4 columns. The WGSL overrides `WG_C`, `WG_Q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccTiles {
    pub wg_c: u32,
    pub wg_q: u32,
}

impl AccTiles {
    /// Widest column tile: 32 vec4 (16 threads).
    const MAX_WG_C: u32 = 16;

    /// The shape for rows of `dim4` vec4s within `workgroup_bytes` of workgroup memory:
    /// the one that keeps the most lanes busy, counting both the idle columns of the last
    /// column tile and the idle lanes of a workgroup that is no whole number of 32-lane
    /// warps; among equals, 64 queries before 128, 32, 16, and wider column tiles first.
    /// D = 784 (dim4 = 196 = 7 x 28): 28-column tiles of 14 x 16 = 224 threads (7 warps),
    /// no idle lane, where a fixed 32-wide tile leaves 12.5% of them idle.
    pub fn for_dim(dim4: usize, workgroup_bytes: u32) -> AccTiles {
        let dim4 = dim4.max(1) as u32;
        let mut best = AccTiles { wg_c: 1, wg_q: 2 };
        let mut best_eff = 0.0;
        for wg_q in [8, 16, 4, 2] {
            for wg_c in (1..=Self::MAX_WG_C).rev() {
                let t = AccTiles { wg_c, wg_q };
                let threads = wg_c * wg_q;
                if threads > MAX_WORKGROUP_THREADS || t.workgroup_bytes() > workgroup_bytes {
                    continue;
                }
                let columns = dim4.div_ceil(t.columns()) * t.columns();
                let eff = (dim4 as f64 / columns as f64)
                    * (threads as f64 / threads.next_multiple_of(32) as f64);
                if eff > best_eff + 1e-9 {
                    (best, best_eff) = (t, eff);
                }
            }
        }
        best
    }

    /// vec4 columns per workgroup (`TC`).
    pub fn columns(self) -> u32 {
        2 * self.wg_c
    }

    /// Queries per workgroup (`TQ`).
    pub fn queries(self) -> u32 {
        8 * self.wg_q
    }

    /// Two halves of the weights (TQ x 4 vec4) and the rows (16 x TC vec4).
    pub fn workgroup_bytes(self) -> u32 {
        2 * (self.queries() * 4 + 16 * self.columns()) * 16
    }

    fn constants(self) -> Vec<(&'static str, f64)> {
        vec![("WG_C", self.wg_c as f64), ("WG_Q", self.wg_q as f64)]
    }
}

/// The tile shapes one backend's kernels are built with (and its plans dispatch by).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub logits: LogitsTiles,
    /// A second logits pipeline for batches of at most its queries ([`Tiles::NARROW`]):
    /// the tuned shape's 64 or 128 query lanes would mostly idle on a batch of 16.
    pub narrow: Option<LogitsTiles>,
    /// A third for batches of 33 to 64 queries ([`Tiles::MEDIUM`]) where the tuned shape
    /// has more query lanes.
    pub medium: Option<LogitsTiles>,
    pub acc: AccTiles,
}

impl Tiles {
    /// 128 rows x 32 queries (64 threads, 15 KiB): small batches.
    pub const NARROW: LogitsTiles = LogitsTiles {
        wg_r: 16,
        wg_q: 4,
        kt: 2,
    };

    /// 128 rows x 64 queries (128 threads, 18 KiB): batches of 33 to 64 queries.
    pub const MEDIUM: LogitsTiles = LogitsTiles {
        wg_r: 16,
        wg_q: 8,
        kt: 2,
    };

    /// `logits` for rows of `dim4` vec4s on a device with `workgroup_bytes`: the
    /// accumulate shape follows from D ([`AccTiles::for_dim`]); the narrow and medium
    /// logits shapes are added where `logits` has more query lanes and the device holds
    /// them.
    pub fn new(logits: LogitsTiles, dim4: usize, workgroup_bytes: u32) -> Tiles {
        let smaller = |t: LogitsTiles| {
            (logits.queries() > t.queries() && t.workgroup_bytes() <= workgroup_bytes).then_some(t)
        };
        Tiles {
            logits,
            narrow: smaller(Self::NARROW),
            medium: smaller(Self::MEDIUM),
            acc: AccTiles::for_dim(dim4, workgroup_bytes),
        }
    }

    /// The logits shape a sub-batch of `n_queries` runs: the one with the fewest query
    /// lanes that still takes it in one query tile (else the tuned shape).
    pub fn logits_for(&self, n_queries: usize) -> LogitsTiles {
        [self.narrow, self.medium]
            .into_iter()
            .flatten()
            .find(|t| n_queries <= t.queries() as usize)
            .unwrap_or(self.logits)
    }

    /// Rows of the widest logits workgroup (tile widths are multiples of it).
    pub fn logits_rows(&self) -> u32 {
        [self.narrow, self.medium]
            .into_iter()
            .flatten()
            .map(|t| t.rows())
            .fold(self.logits.rows(), u32::max)
    }

    /// The override constants of `kernel`'s pipeline.
    pub fn constants(&self, kernel: KernelKind) -> Vec<(&'static str, f64)> {
        match kernel {
            KernelKind::Logits => self.logits.constants(),
            KernelKind::Accumulate => self.acc.constants(),
            KernelKind::Softmax | KernelKind::Finalize => Vec::new(),
        }
    }
}

impl Default for Tiles {
    /// The default logits shape with the accumulate shape of D = 784 (plan unit tests).
    fn default() -> Tiles {
        Tiles::new(LogitsTiles::DEFAULT, 196, 32 * 1024)
    }
}

/// The WGSL `const` declarations of the constants the host dispatches by that are not
/// overrides, put before common.wgsl.
fn generated_constants() -> String {
    format!(
        "// Generated from src/oracle/gpu/pipelines.rs.\n\
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
    /// rows per split per step (Nt), a multiple of 64 and of the logits tile's rows
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
            // Reads the logits: accumulate turns them into weights as it stages them, so
            // no B x Nt tile of weights is written back and re-read.
            KernelKind::Softmax => &[
                (Uniform, "p"),
                (ReadOnlyStorage, "logits"),
                (ReadWriteStorage, "states"),
                // the chunk's row norms: sum_j e_j |y_j|^2 for the posterior variance
                (ReadOnlyStorage, "sq_norms"),
            ],
            // `weights`: the logits S, which accumulate turns into exp(S - m') as it stages
            // them (the name is what they become; the bind groups bind by it).
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

/// One tile configuration: (name, kernel, override constants, workgroup size, workgroup
/// memory in bytes).
pub type OverrideVariant = (String, KernelKind, Vec<(&'static str, f64)>, [u32; 3], u32);

/// The override constants of every tile configuration the backend may build, per kernel
/// that has any: each logits candidate, and the accumulate shapes of a few widths of D on
/// a 32 KiB and a 16 KiB device, as (name, kernel, constants, workgroup size, workgroup
/// bytes the host expects). The shader validation test resolves each with naga.
pub fn override_variants() -> Vec<OverrideVariant> {
    let mut out = Vec::new();
    for t in LogitsTiles::CANDIDATES
        .into_iter()
        .chain([Tiles::NARROW, Tiles::MEDIUM])
    {
        let tiles = Tiles {
            logits: t,
            ..Tiles::default()
        };
        out.push((
            format!("logits {t}"),
            KernelKind::Logits,
            tiles.constants(KernelKind::Logits),
            [t.wg_r, t.wg_q, 1],
            t.workgroup_bytes(),
        ));
    }
    for dim4 in [1, 5, 196, 2048] {
        for bytes in [32 * 1024, 16 * 1024] {
            let acc = AccTiles::for_dim(dim4, bytes);
            let tiles = Tiles {
                acc,
                ..Tiles::default()
            };
            out.push((
                format!("accumulate dim4 {dim4} in {} KiB: {acc:?}", bytes / 1024),
                KernelKind::Accumulate,
                tiles.constants(KernelKind::Accumulate),
                [acc.wg_c, acc.wg_q, 1],
                acc.workgroup_bytes(),
            ));
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
    /// `layout`: share another pipeline's bind group layout (the narrow logits pipeline
    /// takes the logits bind groups), else a new one.
    fn new(
        device: &wgpu::Device,
        kind: KernelKind,
        f16_storage: bool,
        trusted: bool,
        constants: &[(&str, f64)],
        layout: Option<&wgpu::BindGroupLayout>,
    ) -> Kernel {
        let name = kind.name();
        let layout = layout
            .cloned()
            .unwrap_or_else(|| self::layout(device, kind));
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
                // The tile shapes (WGSL `override`s): one source, many configurations.
                constants,
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
    /// The logits kernels for small batches ([`Tiles::narrow`], [`Tiles::medium`]), with
    /// the bind group layout of `logits` (they take its bind groups).
    pub logits_small: Vec<(LogitsTiles, Kernel)>,
    pub softmax: Kernel,
    pub accumulate: Kernel,
    pub finalize: Kernel,
}

impl Kernels {
    /// `f16_storage`: the dataset buffers hold f16 (needs SHADER_F16 on the device);
    /// `tiles`: the shapes the override constants are set to (the plans must use the same).
    /// Compilation errors are wgpu validation errors: call inside an error scope.
    pub fn new(device: &wgpu::Device, f16_storage: bool, trusted: bool, tiles: &Tiles) -> Kernels {
        let kernel = |kind| {
            Kernel::new(
                device,
                kind,
                f16_storage,
                trusted,
                &tiles.constants(kind),
                None,
            )
        };
        let logits = kernel(KernelKind::Logits);
        let logits_small = [tiles.narrow, tiles.medium]
            .into_iter()
            .flatten()
            .map(|t| {
                let kernel = Kernel::new(
                    device,
                    KernelKind::Logits,
                    f16_storage,
                    trusted,
                    &t.constants(),
                    Some(&logits.layout),
                );
                (t, kernel)
            })
            .collect();
        Kernels {
            logits,
            logits_small,
            softmax: kernel(KernelKind::Softmax),
            accumulate: kernel(KernelKind::Accumulate),
            finalize: kernel(KernelKind::Finalize),
        }
    }

    /// The logits kernel built for `tiles` ([`Tiles::logits_for`] of a sub-batch).
    pub fn logits_for(&self, tiles: LogitsTiles) -> &Kernel {
        self.logits_small
            .iter()
            .find(|(t, _)| *t == tiles)
            .map_or(&self.logits, |(_, k)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads per workgroup in `softmax` (`WG` in softmax.wgsl; its grid is one
    /// workgroup per query and split, whatever the size).
    const SOFTMAX_WORKGROUP: u32 = 64;

    /// Workgroup memory and size of `source` once its overrides are set to `constants`
    /// (what a pipeline built with them gets).
    pub(crate) fn resolved(source: &str, constants: &[(&str, f64)]) -> (u32, [u32; 3]) {
        let module = naga::front::wgsl::parse_str(source)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(source)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(source)));
        let constants: naga::back::PipelineConstants =
            constants.iter().map(|&(k, v)| (k.to_string(), v)).collect();
        let (module, _) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some((naga::ShaderStage::Compute, "main")),
            &constants,
        )
        .unwrap_or_else(|e| panic!("overrides {constants:?}: {e}"));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let bytes: u32 = module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| layouter[g.ty].size)
            .sum();
        let [entry] = &module.entry_points[..] else {
            panic!("one entry point expected");
        };
        (bytes, entry.workgroup_size)
    }

    /// The workgroup memory and sizes of every configuration the backend may build agree
    /// with the host's figures (which size the dispatch grids and pick what fits a device).
    #[test]
    fn compiled_kernels_match_the_host_constants() {
        let defaults = Tiles::default();
        for (name, kind, source) in kernel_variants() {
            let (bytes, size) = resolved(&source, &defaults.constants(kind));
            let (want_bytes, want_size) = match kind {
                KernelKind::Logits => (
                    defaults.logits.workgroup_bytes(),
                    [defaults.logits.wg_r, defaults.logits.wg_q, 1],
                ),
                KernelKind::Accumulate => (
                    defaults.acc.workgroup_bytes(),
                    [defaults.acc.wg_c, defaults.acc.wg_q, 1],
                ),
                KernelKind::Softmax => (bytes, [SOFTMAX_WORKGROUP, 1, 1]),
                KernelKind::Finalize => (0, [FINALIZE_WORKGROUP, 1, 1]),
            };
            assert_eq!((bytes, size), (want_bytes, want_size), "{name}");
        }
        for (name, kind, constants, size, bytes) in override_variants() {
            let source = kind.source(false);
            assert_eq!(resolved(&source, &constants), (bytes, size), "{name}");
            assert!(size[0] * size[1] <= MAX_WORKGROUP_THREADS, "{name}");
        }
        assert_eq!(LogitsTiles::SMALLEST.workgroup_bytes(), WORKGROUP_BYTES);
        assert!(LogitsTiles::DEFAULT.workgroup_bytes() <= 32 * 1024);
    }

    #[test]
    fn every_candidate_is_valid_and_round_trips() {
        for t in LogitsTiles::CANDIDATES {
            t.check().unwrap();
            assert_eq!(LogitsTiles::parse(&t.to_string(), "test").unwrap(), t);
        }
        assert_eq!(LogitsTiles::DEFAULT.to_string(), "128x128x8");
        for bad in [
            "",
            "128x64",
            "128x64x16x1",
            "a x64x16",
            "100x64x16",
            "128x64x40",
            "512x64x16",
            "64x8x16",
        ] {
            let e = LogitsTiles::parse(bad, "ORACLEFLOW_GPU_TILES").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("ORACLEFLOW_GPU_TILES") && !msg.contains('\n'),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn accumulate_column_tiles_divide_d_where_they_can() {
        let big = 32 * 1024;
        // D = 784: 196 vec4 = 7 tiles of 28, 14 x 16 = 224 threads (7 whole warps).
        let t = AccTiles::for_dim(196, big);
        assert_eq!(
            (t.wg_c, t.wg_q, t.columns(), t.queries()),
            (14, 16, 28, 128)
        );
        assert_eq!(196 % t.columns(), 0);
        // D = 3072: 768 = 24 x 32, 64 queries.
        let t = AccTiles::for_dim(768, big);
        assert_eq!((t.columns(), t.queries()), (32, 64));
        for dim4 in 1..300 {
            for bytes in [big, 16 * 1024, WORKGROUP_BYTES] {
                let t = AccTiles::for_dim(dim4, bytes);
                assert!(t.workgroup_bytes() <= bytes, "dim4 {dim4}: {t:?}");
                assert!(t.wg_c * t.wg_q <= MAX_WORKGROUP_THREADS);
                // Better than the old fixed 32-column tile of 256 threads, or as good.
                let idle = dim4.div_ceil(t.columns() as usize) * t.columns() as usize - dim4;
                let old_idle = dim4.div_ceil(32) * 32 - dim4;
                let lanes = (t.wg_c * t.wg_q) as usize;
                let eff = (dim4 as f64 / (dim4 + idle) as f64) * lanes as f64
                    / lanes.next_multiple_of(32) as f64;
                assert!(
                    eff + 1e-9 >= dim4 as f64 / (dim4 + old_idle) as f64 || dim4 % 2 == 1,
                    "dim4 {dim4} in {bytes} B: {t:?}, {eff}"
                );
            }
        }
    }
}
