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
    /// How dataset values are stored (computation is always f32). Default: f32, except
    /// that `sample` and `velocity` on the gpu (or auto) backend store f16 when the
    /// dataset in f32 would exceed the device's memory budget and fits it in f16 (said on
    /// stderr and in run.json); `--dtype f32` keeps f32 (streamed through the GPU)
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
}

/// Why the dataset of this run is f16 when --dtype did not say (set once by
/// [`DataArgs::load_for`]).
static AUTO_DTYPE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl DataArgs {
    /// The storage --dtype gives, f32 when not given.
    pub fn dtype(&self) -> Dtype {
        self.dtype.unwrap_or_default()
    }

    /// Why the dataset has its dtype, for run.json: given, default, or chosen.
    pub fn dtype_reason(&self) -> String {
        match (self.dtype, AUTO_DTYPE.get()) {
            (Some(d), _) => format!("--dtype {}", format!("{d:?}").to_lowercase()),
            (None, Some(why)) => why.clone(),
            (None, None) => "default (f32)".into(),
        }
    }

    /// The dataset; under mpirun, this rank's share of its rows (`oracle::shard::mpi`).
    pub fn load(&self) -> Result<Dataset> {
        self.load_as(self.dtype())
    }

    fn load_as(&self, dtype: Dtype) -> Result<Dataset> {
        #[cfg(feature = "mpi")]
        if let Some(rank) = shard::mpi::current() {
            return Ok(shard::mpi::load(&self.data, dtype, rank)?);
        }
        Ok(dataset::load(&self.data, dtype)?)
    }

    /// As [`DataArgs::load`], for the oracle `oracle` builds: without --dtype, on one GPU
    /// (`--backend gpu` or `auto`), a dataset whose f32 copy would exceed the device's
    /// budget but whose f16 copy fits is loaded again as f16 (exactly what `--dtype f16`
    /// loads: the same values, so the same results), and one stderr line says so.
    pub fn load_for(&self, oracle: &OracleArgs) -> Result<Dataset> {
        let ds = self.load()?;
        // Not under mpirun: each rank would decide from its own share, and the ranks'
        // dtypes could differ.
        let one_gpu = matches!(oracle.backend, BackendKind::Gpu | BackendKind::Auto)
            && oracle.devices.is_none()
            && shard::mpi::current().is_none();
        if self.dtype.is_some() || !one_gpu {
            return Ok(ds);
        }
        let gpu = GpuOptions {
            hardware_only: oracle.backend == BackendKind::Auto,
            ..oracle.gpu_options()
        };
        match oracleflow::oracle::gpu::automatic_f16(&ds, &gpu)? {
            Some(why) => {
                eprintln!("{why}");
                let _ = AUTO_DTYPE.set(why);
                drop(ds);
                self.load_as(Dtype::F16)
            }
            None => Ok(ds),
        }
    }

    /// The whole dataset, also under mpirun (in the dtype [`DataArgs::load_for`] chose).
    pub fn load_whole(&self) -> Result<Dataset> {
        let dtype = match (self.dtype, AUTO_DTYPE.get()) {
            (None, Some(_)) => Dtype::F16,
            _ => self.dtype(),
        };
        Ok(dataset::load(&self.data, dtype)?)
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
    /// The GPU settings these flags give.
    pub fn gpu_options(&self) -> GpuOptions {
        GpuOptions {
            max_resident_bytes: self.gpu_memory_mib.map(|m| m << 20),
            // Shown by the backend's description (run.json) when f16 was chosen for it.
            storage_reason: AUTO_DTYPE.get().cloned(),
            exact_dense: self.exact_dense,
            ..GpuOptions::default()
        }
    }

    pub fn build<'d>(&self, ds: &'d Dataset) -> Result<Oracle<'d>> {
        let gpu = self.gpu_options();
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
