//! The backend's options: plain data, read by the planning (`plan`) and at setup.

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
    /// being resident. Default: 4 x the adapter's `max_buffer_size`. wgpu exposes no
    /// free-memory query, so the default keeps the dataset resident (the faster path)
    /// unless it is clearly larger than any device would hold; set a budget to stream
    /// smaller datasets (a device whose memory is shared with other work, say).
    pub max_resident_bytes: Option<u64>,
    /// Longest wait for one submission or read-back before the device is taken as hung
    /// (default: `ORACLEFLOW_GPU_TIMEOUT_S`, else 600 s).
    pub wait_limit: Option<std::time::Duration>,
    /// Open the adapter of this index in [`adapter_list`](super::adapter_list) (`--devices`)
    /// instead of the preferred one.
    pub adapter: Option<usize>,
    /// Evaluate every row at every call (`--exact-dense`), instead of exact pruning's
    /// skipping of whole tiles (`gpu::prune`; resident in-memory datasets only).
    pub exact_dense: bool,
}
