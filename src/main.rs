//! The `oracleflow` command line: parse, then hand over to the command (`cli/`).
//!
//! The data path, from here down: command (cli/) -> dataset (dataset/) -> field (field/:
//! the oracle, backed by oracle/{reference,cpu,gpu}) -> solver (sample.rs) -> analysis
//! (analysis.rs) -> report and pictures (report.rs, render.rs, plot.rs).

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "oracleflow",
    version,
    about = "Exact closed-form (oracle) flow-matching velocity over a whole dataset, on any GPU or CPU",
    after_help = "Exit status: 0 on success; 2 for bad input or usage (a file, flag, --data spec \
                  or output path to fix, or a dataset too large for memory; the error names it); \
                  1 for internal or device errors; 130 when interrupted by Ctrl-C (no output written)."
)]
struct Cli {
    #[command(subcommand)]
    command: cli::Command,
    /// Memory the dataset may take in RAM, in MiB (fractions allowed); a larger .npy
    /// dataset (<f4 or <f2) is streamed from disk tile by tile, its mean and norms cached
    /// in DATA.npy.oracleflow-stats beside it (default: half of the available memory)
    #[arg(long, global = true, value_name = "MIB")]
    memory_budget: Option<String>,
}

fn main() -> ExitCode {
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" when the
    // variable is missing (containers, CI), which reads like our own failure. Set it while
    // the process is still single-threaded, the only time changing the environment is sound.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    oracleflow::interrupt::install();
    // Under mpirun (feature `mpi`): MPI lives until the end of main; the ranks then hold
    // shares of the dataset (oracle::shard::mpi).
    #[cfg(feature = "mpi")]
    let universe = oracleflow::oracle::shard::mpi::init();
    let result = cli::refuse_mpirun_without_mpi()
        .and_then(|()| cli::set_memory_budget(cli.memory_budget.as_deref()))
        .and_then(|()| cli.command.run());
    cli::memory_report();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", oracleflow::error::one_line(&e));
            let code = oracleflow::error::exit_code(&e);
            // The other ranks would wait for this one in their next collective.
            #[cfg(feature = "mpi")]
            if universe.is_some()
                && oracleflow::oracle::shard::mpi::current().is_some_and(|r| r.size > 1)
            {
                oracleflow::oracle::shard::mpi::abort(code as i32);
            }
            ExitCode::from(code)
        }
    }
}
