//! Adapter choice and device creation: which GPU, which features, which limits.

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

use super::health::Health;
use super::options::{self, GpuOptions};
use super::pipelines::WORKGROUP_BYTES;
use super::plan::{self, Limits};
use super::timing;

/// An open device and what was negotiated for it.
pub(super) struct Gpu {
    pub info: wgpu::AdapterInfo,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// What the device reported outside error scopes (lost, stray errors).
    pub health: Health,
}

impl Gpu {
    pub fn is_cpu(&self) -> bool {
        is_cpu_adapter(&self.info)
    }

    /// Whether the device can time each kernel (see `timing`).
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(timing::FEATURES)
    }
}

/// Software rasterisers report `DeviceType::Cpu` on Vulkan; on GL the name gives them away.
fn is_cpu_adapter(info: &wgpu::AdapterInfo) -> bool {
    let name = info.name.to_lowercase();
    info.device_type == wgpu::DeviceType::Cpu
        || [
            "llvmpipe",
            "lavapipe",
            "softpipe",
            "swiftshader",
            "microsoft basic render",
        ]
        .iter()
        .any(|s| name.contains(s))
}

/// Runs `f` with the process's one wgpu instance, one caller at a time.
///
/// Why one instance and a lock: creating wgpu instances from several threads at once
/// races inside NVIDIA's Linux driver (wgpu issue 5930 reports crashes). On an H200, test
/// binaries whose 16 threads each opened their own instance and device hung after the
/// first few; the backends, the `--devices` workers and Python threads open devices
/// concurrently in the same way. Enumerating adapters and opening devices are rare and
/// cheap next to the work, so they are serialized too; the devices then run
/// independently.
fn with_instance<T>(f: impl FnOnce(&wgpu::Instance) -> T) -> T {
    static INSTANCE: OnceLock<Mutex<wgpu::Instance>> = OnceLock::new();
    let instance = INSTANCE.get_or_init(|| {
        // lavapipe prints a harmless warning at start-up when XDG_RUNTIME_DIR is unset; it
        // is not set here (changing the environment while other threads may read it is
        // unsound).
        Mutex::new(wgpu::Instance::new(
            wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
        ))
    });
    // A panic while holding the lock leaves the instance as it was: keep using it.
    f(&instance.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Every adapter wgpu finds, in its order: the indices `--devices` and `info` use.
fn all_adapters() -> Vec<wgpu::Adapter> {
    with_instance(|i| pollster::block_on(i.enumerate_adapters(wgpu::Backends::all())))
}

/// One line per adapter, `index: name (backend, device type)`, for `info` and errors.
pub fn adapter_list() -> Vec<String> {
    all_adapters()
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            format!(
                "{i}: {} ({:?}, {:?})",
                info.name, info.backend, info.device_type
            )
        })
        .collect()
}

/// What `--devices all` means: the indices of the adapters of the first graphics API
/// found (Vulkan before GL, ...): the same GPU is listed once per API, and counting it
/// twice would have two workers share one device.
pub fn all_devices() -> Vec<usize> {
    let all = all_adapters();
    let Some(first) = all.first().map(|a| a.get_info().backend) else {
        return Vec::new();
    };
    (0..all.len())
        .filter(|&i| all[i].get_info().backend == first)
        .collect()
}

/// The adapter of index `index` in [`adapter_list`].
fn adapter_at(index: usize) -> Result<wgpu::Adapter> {
    let mut all = all_adapters();
    if index >= all.len() {
        return Err(Error::Input(format!(
            "--devices: no adapter {index} ({} found; `oracleflow info` lists them)",
            all.len()
        )));
    }
    Ok(all.swap_remove(index))
}

fn adapter(hardware_only: bool) -> Result<wgpu::Adapter> {
    let adapter = with_instance(|i| {
        pollster::block_on(i.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
    })
    .map_err(|e| Error::Gpu(format!("no adapter: {e}")))?;
    let info = adapter.get_info();
    if hardware_only && is_cpu_adapter(&info) {
        return Err(Error::Gpu(format!(
            "only a software adapter ({}, {:?}) is available",
            info.name, info.backend
        )));
    }
    Ok(adapter)
}

/// The limits and SHADER_F16 support of the adapter `options` would open (None when there
/// is none): what a choice made before opening the device needs.
pub(super) fn adapter_limits(options: &GpuOptions) -> Result<Option<(Limits, bool)>> {
    let adapter = match options.adapter {
        Some(i) => adapter_at(i)?,
        None => match adapter(options.hardware_only) {
            Ok(a) => a,
            Err(_) => return Ok(None),
        },
    };
    let is_cpu = is_cpu_adapter(&adapter.get_info());
    let has_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    // `open` requests these limits as the adapter gives them, so the plan sees the same.
    Ok(Some((Limits::new(&adapter.limits(), is_cpu), has_f16)))
}

/// Opens the preferred adapter. Features: SHADER_F16 when the adapter has it and
/// `want_f16`; the timestamp queries of `timing` when it has both (requesting them costs
/// nothing until a call writes a timestamp, which only profiling does). Limits: the adapter's own for what the kernels need (binding and buffer
/// sizes, workgroup memory and size, storage buffers per stage), downlevel defaults
/// for the rest.
pub(super) fn open(hardware_only: bool, want_f16: bool, index: Option<usize>) -> Result<Gpu> {
    let adapter = match index {
        Some(i) => adapter_at(i)?,
        None => adapter(hardware_only)?,
    };
    let info = adapter.get_info();
    let have = adapter.limits();
    let mut features = if want_f16 {
        adapter.features() & wgpu::Features::SHADER_F16
    } else {
        wgpu::Features::empty()
    };
    if adapter.features().contains(timing::FEATURES) {
        features |= timing::FEATURES;
    }

    // The kernels bind at most 5 storage buffers, use 16 x 16 workgroups and 12 KiB of
    // workgroup memory.
    if have.max_storage_buffers_per_shader_stage < 5
        || have.max_compute_workgroup_storage_size < WORKGROUP_BYTES
        || have.max_compute_invocations_per_workgroup < 256
    {
        return Err(Error::Gpu(format!(
            "adapter {} is too small: {} storage buffers per stage, {} B workgroup memory, \
             {} invocations per workgroup",
            info.name,
            have.max_storage_buffers_per_shader_stage,
            have.max_compute_workgroup_storage_size,
            have.max_compute_invocations_per_workgroup
        )));
    }
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: have.max_storage_buffer_binding_size,
        max_buffer_size: have.max_buffer_size,
        max_storage_buffers_per_shader_stage: have.max_storage_buffers_per_shader_stage,
        max_compute_workgroup_storage_size: have.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: have.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size_x: have.max_compute_workgroup_size_x,
        max_compute_workgroup_size_y: have.max_compute_workgroup_size_y,
        max_compute_workgroups_per_dimension: have.max_compute_workgroups_per_dimension,
        ..wgpu::Limits::downlevel_defaults()
    };
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("oracleflow"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) =
        with_instance(|_| pollster::block_on(adapter.request_device(&descriptor)))
            .map_err(|e| Error::Gpu(format!("opening {}: {e}", info.name)))?;
    let health = Health::watch(&device);
    Ok(Gpu {
        info,
        device,
        queue,
        features,
        limits,
        health,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// What `oracleflow info` prints about the GPU: the adapter wgpu would pick (software
/// ones included) and the limits and features that matter to the kernels.
pub fn adapter_report() -> Result<String> {
    let adapter = adapter(false)?;
    let info = adapter.get_info();
    let l = adapter.limits();
    let f = adapter.features();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut s = String::new();
    let _ = writeln!(s, "gpu: {}", info.name);
    let _ = writeln!(
        s,
        "  backend: {:?}, device type: {:?}{}",
        info.backend,
        info.device_type,
        if is_cpu_adapter(&info) {
            " (software: `--backend auto` will not use it)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "  driver: {} {}", info.driver, info.driver_info);
    let _ = writeln!(
        s,
        "  max storage buffer binding: {}, max buffer: {}",
        mib(l.max_storage_buffer_binding_size),
        mib(l.max_buffer_size)
    );
    let _ = writeln!(
        s,
        "  workgroup memory: {} KiB, invocations per workgroup: {}",
        l.max_compute_workgroup_storage_size / 1024,
        l.max_compute_invocations_per_workgroup
    );
    let _ = writeln!(
        s,
        "  SHADER_F16: {}, SUBGROUP: {} (subgroup size {}..{})",
        yes(f.contains(wgpu::Features::SHADER_F16)),
        yes(f.contains(wgpu::Features::SUBGROUP)),
        info.subgroup_min_size,
        info.subgroup_max_size
    );
    let budget = plan::dataset_budget(
        &Limits::new(&l, is_cpu_adapter(&info)),
        &GpuOptions {
            max_resident_bytes: options::memory_budget_from_env()?,
            ..Default::default()
        },
    );
    let _ = writeln!(
        s,
        "  device budget for the dataset: {} ({}; larger datasets stream through the GPU)",
        mib(budget),
        if std::env::var_os(options::MEMORY_ENV).is_some() {
            format!("from {}", options::MEMORY_ENV)
        } else {
            format!(
                "default: 4 x max buffer, as wgpu reports no memory size; \
                 --gpu-memory-mib or {} sets it",
                options::MEMORY_ENV
            )
        }
    );
    let _ = writeln!(
        s,
        "  per-kernel timestamps: {} (TIMESTAMP_QUERY {}, inside passes {}; {}=1 prints them)",
        if f.contains(timing::FEATURES) {
            "available"
        } else {
            "not available"
        },
        yes(f.contains(wgpu::Features::TIMESTAMP_QUERY)),
        yes(f.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)),
        timing::PROFILE_ENV
    );
    Ok(s.trim_end().to_string())
}
