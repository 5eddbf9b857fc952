//! Argument groups shared by several commands.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{BackendKind, Oracle};
use oracleflow::Path;

/// Which dataset, and how it is stored.
#[derive(Args)]
pub struct DataArgs {
    /// The dataset (see "--data spec" in `--help`)
    #[arg(long, default_value = "embedded", long_help = dataset::SPEC_HELP)]
    pub data: String,
    /// How dataset values are stored on the device (computation is always f32)
    #[arg(long, value_enum, default_value_t)]
    pub dtype: Dtype,
}

impl DataArgs {
    pub fn load(&self) -> Result<Dataset> {
        Ok(dataset::load(&self.data, self.dtype)?)
    }
}

/// The probability path and where the oracle runs.
#[derive(Args)]
pub struct OracleArgs {
    /// Probability path
    #[arg(long, value_enum, default_value_t)]
    pub path: Path,
    /// Where to evaluate: auto = a real GPU if present, else cpu
    #[arg(long, value_enum, default_value_t)]
    pub backend: BackendKind,
    /// GPU memory the dataset may occupy, in MiB; a larger dataset is streamed through the
    /// GPU chunk by chunk on every evaluation (default: keep it resident when it fits)
    #[arg(long)]
    pub gpu_memory_mib: Option<u64>,
}

impl OracleArgs {
    pub fn build<'d>(&self, ds: &'d Dataset) -> Result<Oracle<'d>> {
        let gpu = GpuOptions {
            max_resident_bytes: self.gpu_memory_mib.map(|m| m << 20),
            ..GpuOptions::default()
        };
        Ok(Oracle::with_gpu_options(ds, self.path, self.backend, gpu)?)
    }
}

/// An output directory, and whether files already in it may be replaced.
#[derive(Args)]
pub struct OutDirArgs {
    /// Output directory
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite existing files in the output directory
    #[arg(long)]
    pub force: bool,
}
