//! Argument groups shared by several commands.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use oracleflow::dataset::{self, Dataset, Dtype};
use oracleflow::field::{ExternalField, FieldSpec, GaussianField, OracleField, VelocityField};
use oracleflow::oracle::cpu::CpuOptions;
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::shard::{self, DeviceList, ShardedBackend};
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
    /// The dataset; under mpirun, this rank's share of its rows (`oracle::shard::mpi`).
    pub fn load(&self) -> Result<Dataset> {
        #[cfg(feature = "mpi")]
        if let Some(rank) = shard::mpi::current() {
            return Ok(shard::mpi::load(&self.data, self.dtype, rank)?);
        }
        Ok(dataset::load(&self.data, self.dtype)?)
    }

    /// The whole dataset, also under mpirun.
    pub fn load_whole(&self) -> Result<Dataset> {
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
    /// Evaluate every sample at every step (the plain dense path), instead of exact
    /// pruning, which skips only samples whose total weight is certified below 2^-30 of
    /// the normaliser (cpu; on gpu whole tiles within 2^-31; for comparison and tests)
    #[arg(long)]
    pub exact_dense: bool,
    /// Several devices at once (see `--help`): `all`, or adapter indices and `cpu`,
    /// e.g. `0,1,cpu`; each evaluation's rows are split among them and merged exactly
    #[arg(long, long_help = shard::devices::DEVICES_HELP)]
    pub devices: Option<DeviceList>,
}

impl OracleArgs {
    pub fn build<'d>(&self, ds: &'d Dataset) -> Result<Oracle<'d>> {
        let gpu = GpuOptions {
            max_resident_bytes: self.gpu_memory_mib.map(|m| m << 20),
            exact_dense: self.exact_dense,
            ..GpuOptions::default()
        };
        let cpu = CpuOptions {
            prune: !self.exact_dense,
        };
        let oracle = match &self.devices {
            Some(list) => {
                if self.backend == BackendKind::Reference {
                    oracleflow::bail_input!("--devices: not with --backend reference");
                }
                let sharded = ShardedBackend::new(ds, list, &gpu, cpu)?;
                let kind = if sharded.has_gpu() {
                    BackendKind::Gpu
                } else {
                    BackendKind::Cpu
                };
                Oracle::with_backend(ds, self.path, Box::new(sharded), kind)
            }
            None => Oracle::with_options(ds, self.path, self.backend, gpu, cpu)?,
        };
        // Under mpirun each rank holds its share of the rows: merge the ranks' states.
        if shard::mpi::current().is_some() {
            return Ok(oracle.wrap_backend(|b| Box::new(shard::mpi::MpiBackend::new(b, ds)))?);
        }
        Ok(oracle)
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

/// Which velocity field to integrate or evaluate.
#[derive(Args)]
pub struct FieldArgs {
    /// Velocity field: `oracle` (exact, over the dataset), `gaussian` (exact for the
    /// dataset's Gaussian fit, class-wise with classes), or `external:CMD` (a process
    /// started with `sh -c CMD` that reads x, t, y as .npy on stdin and writes the velocity
    /// as .npy on stdout; see README "External fields")
    #[arg(long, default_value = "oracle")]
    pub field: String,
    /// Seconds an external field may take to answer one evaluation
    #[arg(long, default_value_t = 600.0)]
    pub field_timeout: f64,
}

impl FieldArgs {
    /// Checks the --field spec and timeout (before any data is loaded).
    pub fn check(&self) -> Result<FieldSpec> {
        if !(self.field_timeout.is_finite() && self.field_timeout > 0.0) {
            oracleflow::bail_input!(
                "--field-timeout {} must be a positive number of seconds",
                self.field_timeout
            );
        }
        Ok(self.field.parse()?)
    }

    /// Builds the field `spec` (this group's --field, or another, as --then gives) over
    /// `ds`; a Gaussian field fits the classes in `classes` now (so sampling time is
    /// sampling only).
    pub fn build<'d>(
        &self,
        spec: &FieldSpec,
        ds: &'d Dataset,
        oracle: &OracleArgs,
        classes: &[Option<u32>],
    ) -> Result<Box<dyn VelocityField + 'd>> {
        if shard::mpi::current().is_some() && *spec != FieldSpec::Oracle {
            oracleflow::bail_input!(
                "--field {}: under mpirun only the oracle field runs (each rank holds a share of the rows)",
                self.field
            );
        }
        Ok(match spec {
            FieldSpec::Oracle => Box::new(OracleField::new(oracle.build(ds)?)),
            FieldSpec::Gaussian => {
                let mut g = GaussianField::new(ds, oracle.path);
                let mut wanted: Vec<Option<u32>> = Vec::new();
                for &c in classes {
                    if !wanted.contains(&c) {
                        wanted.push(c);
                    }
                }
                g.prepare(&wanted)?;
                Box::new(g)
            }
            FieldSpec::External(cmd) => Box::new(ExternalField::start(
                cmd,
                &ds.shape.dims,
                oracle.path,
                std::time::Duration::from_secs_f64(self.field_timeout),
            )?),
        })
    }
}
