//! The commands: one file each, plus the argument groups they share (`args`).
//!
//! Each command reads its arguments, calls the library and shows its errors; checks and
//! file formats live in the library, so the Python binding and the CLI agree.

mod args;
mod bench;
mod convert;
mod info;
mod nearest;
mod sample;
mod stages;
mod study;
mod transition;
mod velocity;

use anyhow::Result;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum Command {
    /// Sample with the oracle velocity and write pictures (samples, trajectories, nearest)
    Sample(sample::SampleArgs),
    /// Exact oracle velocity (= flow-matching training target) for given queries and times
    Velocity(velocity::VelocityArgs),
    /// Stage curves: posterior top-1 weight, entropy and training-target difference along
    /// the path, for one or several datasets (the navigation -> refinement transition)
    Stages(stages::StagesArgs),
    /// When the posterior collapses onto one training sample, against D and N (unit
    /// Gaussians), beside the paper's values
    Transition(transition::TransitionArgs),
    /// Exact nearest and second-nearest training samples of samples in a .npy, and the
    /// memorized share
    Nearest(nearest::NearestArgs),
    /// The paper's studies: shift (few-step time shift), cfg (guidance intervals)
    Study(study::StudyArgs),
    /// Print the GPU adapter and a summary of the dataset
    Info(info::InfoArgs),
    /// Measure oracle throughput (GFLOP/s = 4 B N D / time) beside a plain sgemm
    Bench(bench::BenchArgs),
    /// Write any dataset spec to an .npy file (f32 or f16), labels beside it
    Convert(convert::ConvertArgs),
}

impl Command {
    pub fn run(self) -> Result<()> {
        if oracleflow::oracle::shard::mpi::current().is_some()
            && !matches!(self, Command::Sample(_) | Command::Velocity(_))
        {
            oracleflow::bail_input!(
                "under mpirun only `velocity` and `sample` run (each rank holds a share of the rows)"
            );
        }
        match self {
            Command::Sample(a) => sample::run(a),
            Command::Velocity(a) => velocity::run(a),
            Command::Stages(a) => stages::run(a),
            Command::Transition(a) => transition::run(a),
            Command::Nearest(a) => nearest::run(a),
            Command::Study(a) => study::run(a),
            Command::Info(a) => info::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Convert(a) => convert::run(a),
        }
    }
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
/// Without the `mpi` feature, a run started by mpirun with several ranks is refused: every
/// rank would do the whole work and write the same files.
pub fn refuse_mpirun_without_mpi() -> Result<()> {
    #[cfg(not(feature = "mpi"))]
    if std::env::var("OMPI_COMM_WORLD_SIZE").is_ok_and(|n| n != "1") {
        oracleflow::bail_input!(
            "started by mpirun, but this oracleflow was built without MPI (cargo build --features mpi)"
        );
    }
    Ok(())
}

/// Applies the global `--memory-budget MIB` (see `dataset::disk`).
pub fn set_memory_budget(text: Option<&str>) -> Result<()> {
    if let Some(text) = text {
        let bytes = oracleflow::dataset::disk::parse_budget_mib(text)?;
        oracleflow::dataset::disk::set_memory_budget(bytes);
    }
    Ok(())
}

/// With `ORACLEFLOW_MEMORY_REPORT` set, prints peak resident memory (VmHWM) and anonymous
/// memory (RssAnon) at exit, from /proc/self/status: for memory measurements
/// (tests/stream.rs, the README's numbers).
pub fn memory_report() {
    if std::env::var_os("ORACLEFLOW_MEMORY_REPORT").is_none() {
        return;
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let fields: Vec<String> = status
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("RssAnon"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        eprintln!("memory: {}", fields.join(" "));
    }
}

/// Hidden on MPI ranks other than 0 (they print only errors).
pub fn progress(len: u64, unit: &str) -> ProgressBar {
    if !oracleflow::oracle::shard::mpi::is_root() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{eta}} left)"
        ))
        .expect("valid template"),
    );
    bar
}
