//! The backend's options: plain data, read by the planning (`plan`) and at setup.
//!
//! The device-memory budget of the dataset: wgpu 30 reports no device memory size
//! (`AdapterInfo` has none, `Limits` bound single buffers and bindings; the native memory
//! budgets of `VK_EXT_memory_budget` / DXGI are used inside wgpu only as the
//! `MemoryBudgetThresholds` at which allocations fail, and `generate_allocator_report`
//! counts what wgpu itself allocated). So the default budget is derived from the one
//! size it does report, `max_buffer_size` (4 x; see `plan::dataset_budget`), and the user
//! can set the real figure: `--gpu-memory-mib`, or [`MEMORY_ENV`] where no flag reaches
//! (the Python binding, tests). `info` prints the budget in force and where it came from.

use crate::error::{Error, Result};

/// Environment variable: the device-memory budget of the dataset, in MiB (the default of
/// [`GpuOptions::max_resident_bytes`]; `--gpu-memory-mib` wins over it).
pub const MEMORY_ENV: &str = "ORACLEFLOW_GPU_MEMORY_MIB";

/// The budget `ORACLEFLOW_GPU_MEMORY_MIB` sets, in bytes (None: unset).
pub fn memory_budget_from_env() -> Result<Option<u64>> {
    parse_memory_mib(std::env::var(MEMORY_ENV).ok().as_deref())
}

/// A positive whole number of MiB; anything else is bad input, named.
fn parse_memory_mib(value: Option<&str>) -> Result<Option<u64>> {
    let Some(s) = value else {
        return Ok(None);
    };
    match s.trim().parse::<u64>() {
        Ok(m) if m > 0 && m < 1 << 40 => Ok(Some(m << 20)),
        _ => Err(Error::Input(format!(
            "{MEMORY_ENV}={s:?} is not a positive whole number of MiB"
        ))),
    }
}

/// Knobs of [`GpuBackend::with_options`](super::GpuBackend::with_options); the defaults suit normal use.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Refuse software adapters (lavapipe): what `--backend auto` wants.
    pub hardware_only: bool,
    /// Largest dataset chunk buffer, in bytes (below the device's binding limit), e.g. to
    /// force multi-chunk residency in tests.
    pub max_chunk_bytes: Option<u64>,
    /// Parts the row range is cut into and processed side by side (default: chosen from
    /// the batch and the adapter; 1 on software adapters).
    pub splits: Option<usize>,
    /// Rows per split per tile step, rounded up to a multiple of 64, at most 1024
    /// (default: chosen).
    pub tile_rows: Option<usize>,
    /// Hold f16 data as f32 even where the device has SHADER_F16: the path taken on
    /// devices without it (exact: every f16 is an f32).
    pub f16_as_f32: bool,
    /// Most queries evaluated together (default: as many as the scratch buffers can
    /// bind); larger batches run as several sub-batches.
    pub max_sub_batch: Option<usize>,
    /// Compile the kernels without wgpu's runtime bounds checks (every kernel bounds its own
    /// indices, and the tests run them both ways on lavapipe). Default: on for hardware
    /// adapters (the checks cost speed there), off on software ones, so that the CI runs
    /// under the checks and an indexing bug shows as a wrong result, not a stray write.
    pub trusted_shaders: Option<bool>,
    /// Device memory the dataset may take, in bytes; a larger dataset is streamed through
    /// a ring of chunk-sized slots (chunks cut so the ring fits the budget) instead of
    /// being resident. Default: `ORACLEFLOW_GPU_MEMORY_MIB` when set, else 4 x the
    /// adapter's `max_buffer_size` (wgpu reports no memory size: see the module docs), which
    /// keeps the dataset resident (the faster path) unless it is clearly larger than any
    /// device would hold; set a budget to stream smaller datasets (a device whose memory
    /// is shared with other work, say).
    pub max_resident_bytes: Option<u64>,
    /// Longest wait for one submission or read-back before the device is taken as hung
    /// (default: `ORACLEFLOW_GPU_TIMEOUT_S`, else 600 s).
    pub wait_limit: Option<std::time::Duration>,
    /// Open the adapter of this index in [`adapter_list`](super::adapter_list) (`--devices`)
    /// instead of the preferred one.
    pub adapter: Option<usize>,
    /// Record every call's per-kernel GPU times here (where the device has timestamp
    /// queries; nothing is recorded otherwise). `ORACLEFLOW_GPU_PROFILE=1` turns the
    /// timing on too, printing each call's times to stderr.
    pub profile: Option<super::timing::ProfileLog>,
    /// Why the dataset is f16 when that was chosen for this device rather than asked for
    /// ([`automatic_f16`](super::automatic_f16)): the description says so.
    pub storage_reason: Option<String>,
    /// Build the logits kernel with this tile shape instead of the autotune's choice
    /// (`tune.rs`; also `ORACLEFLOW_GPU_TILES`). An input error where the device's
    /// workgroup memory cannot hold it.
    pub tiles: Option<super::pipelines::LogitsTiles>,
    /// Evaluate every row at every call (`--exact-dense`), instead of exact pruning's
    /// skipping of whole tiles (`gpu::prune`; resident in-memory datasets only).
    pub exact_dense: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_budget_values() {
        assert_eq!(parse_memory_mib(None).unwrap(), None);
        assert_eq!(parse_memory_mib(Some(" 3 ")).unwrap(), Some(3 << 20));
        for bad in ["", "0", "-1", "1.5", "abc", "99999999999999"] {
            let e = parse_memory_mib(Some(bad)).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{bad}: {e}");
            assert!(e.to_string().contains(MEMORY_ENV), "{bad}: {e}");
        }
    }
}
