//! wgpu backend (placeholder until the kernels land).

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::oracle::{Backend, CentredBatch, Posterior};

pub struct GpuBackend {}

impl GpuBackend {
    /// `hardware_only`: refuse CPU adapters (lavapipe), as `--backend auto` wants.
    pub fn new(_dataset: &Dataset, _hardware_only: bool) -> Result<Self> {
        Err(Error::Gpu("not built yet".into()))
    }
}

impl Backend for GpuBackend {
    fn posterior(&mut self, _batch: &CentredBatch<'_>) -> Result<Posterior> {
        Err(Error::Gpu("not built yet".into()))
    }
    fn describe(&self) -> String {
        "gpu".into()
    }
}

/// Adapter description for `oracleflow info` (placeholder).
pub fn adapter_report() -> Result<String> {
    Err(Error::Gpu("not built yet".into()))
}
