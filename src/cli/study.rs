//! `oracleflow study NAME`: the paper's studies, one subcommand each. The work and the
//! files live in `oracleflow::study::NAME`; this file holds each study's arguments.
//!
//! Adding a study: its library module (`src/study/NAME.rs`), then here an args struct, a
//! `Study` variant and its arm in `run`.

use anyhow::Result;
use clap::{Args, Subcommand};

use oracleflow::field::{GaussianField, OracleField, VelocityField};
use oracleflow::output;
use oracleflow::sample::Solver;
use oracleflow::study::{cfg, mixing, shift};

use super::args::{DataArgs, OracleArgs, OutDirArgs};
use super::progress;

#[derive(Args)]
pub struct StudyArgs {
    #[command(subcommand)]
    study: Study,
}

#[derive(Subcommand)]
enum Study {
    /// Few-step sampling with a time shift: the share of samples that end on the same
    /// training image as an accurate run from the same noise, per shift
    Shift(ShiftArgs),
    /// Classifier-free guidance intervals: class consistency and diversity of the nearest
    /// training images, per guidance interval
    Cfg(CfgArgs),
    /// Swap the field mid-trajectory: memorized share for oracle -> gaussian and
    /// gaussian -> oracle at each switch time TS
    Switch(MixArgs),
    /// Start from held-out images noised to time T: how often the result is the start
    /// image's own nearest training image, per T
    Resume(ResumeArgs),
}

pub fn run(a: StudyArgs) -> Result<()> {
    match a.study {
        Study::Shift(a) => run_shift(a),
        Study::Cfg(a) => run_cfg(a),
        Study::Switch(a) => run_switch(a),
        Study::Resume(a) => run_resume(a),
    }
}

/// Settings of the mixing studies.
#[derive(Args)]
struct MixArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    /// Samples per run
    #[arg(short = 'n', long, default_value_t = 32)]
    n_samples: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, value_enum, default_value_t = Solver::Euler)]
    solver: Solver,
    /// The times: switch times TS (switch) or start times T (resume)
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])]
    at: Vec<f64>,
    /// Noise seed (every run starts from the same noise)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples integrated together
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Output directory (NAME.csv, NAME.json, NAME.png)
    #[command(flatten)]
    out: OutDirArgs,
}

impl MixArgs {
    fn options(&self) -> mixing::MixOptions {
        mixing::MixOptions {
            n: self.n_samples,
            steps: self.steps,
            solver: self.solver,
            seed: self.seed,
            batch: self.batch,
            times: self.at.clone(),
        }
    }
}

#[derive(Args)]
struct ResumeArgs {
    #[command(flatten)]
    mix: MixArgs,
    /// Held-out samples to start from (a --data spec)
    #[arg(long, default_value = "fashion-mnist:test")]
    init_from: String,
}

/// The oracle over `ds` as a field, announced on stderr as the field of study `name`.
fn oracle_field<'d>(
    oracle: &OracleArgs,
    ds: &'d oracleflow::Dataset,
    name: &str,
) -> Result<OracleField<'d>> {
    let field = OracleField::new(oracle.build(ds)?);
    eprintln!(
        "study {name}: {} on {} ({} samples, D = {})",
        field.describe(),
        ds.name,
        ds.n_samples(),
        ds.dim()
    );
    Ok(field)
}

fn finish_mix(dir: &std::path::Path, study: &mixing::MixStudy) -> Result<()> {
    print!("{}", mixing::table(study));
    mixing::write_outputs(dir, study)?;
    eprintln!("wrote {}/{}.{{csv,json,png}}", dir.display(), study.name);
    Ok(())
}

fn run_switch(a: MixArgs) -> Result<()> {
    let files = mixing::files("switch");
    output::check_new_in(
        &a.out.out,
        &files.each_ref().map(|f| f.as_str()),
        a.out.force,
    )?;
    let opts = a.options();
    opts.check()?;
    let ds = a.data.load()?;
    let mut oracle = OracleField::new(a.oracle.build(&ds)?);
    let mut gaussian = GaussianField::new(&ds, a.oracle.path);
    gaussian.prepare(&[None])?;
    eprintln!(
        "study switch: {} and the Gaussian fit of {}",
        oracle.describe(),
        ds.name
    );
    let runs = 2 * opts.times.len() * opts.n.div_ceil(opts.batch) * opts.steps;
    let bar = progress(runs as u64, "steps");
    let study = mixing::switch(&mut oracle, &mut gaussian, &ds, &opts, || bar.inc(1))?;
    bar.finish_and_clear();
    finish_mix(&a.out.out, &study)
}

fn run_resume(a: ResumeArgs) -> Result<()> {
    let files = mixing::files("resume");
    let m = &a.mix;
    output::check_new_in(
        &m.out.out,
        &files.each_ref().map(|f| f.as_str()),
        m.out.force,
    )?;
    let opts = m.options();
    opts.check()?;
    let ds = m.data.load()?;
    let held_out = oracleflow::dataset::load(&a.init_from, m.data.dtype())?;
    let mut oracle = OracleField::new(m.oracle.build(&ds)?);
    eprintln!(
        "study resume: {} on {}, starting from {}",
        oracle.describe(),
        ds.name,
        held_out.name
    );
    let runs = opts.times.len() * opts.n.div_ceil(opts.batch) * opts.steps;
    let bar = progress(runs as u64, "steps");
    let study = mixing::resume(&mut oracle, &ds, &held_out, m.oracle.path, &opts, || {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    finish_mix(&m.out.out, &study)
}

#[derive(Args)]
struct ShiftArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    /// Samples per run
    #[arg(short = 'n', long, default_value_t = 64)]
    n_samples: usize,
    /// Steps of the few-step runs
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Solver of the few-step runs
    #[arg(long, value_enum, default_value_t = Solver::Euler)]
    solver: Solver,
    /// Shifts s of the few-step runs (t_m = s t / (1 + (s - 1) t))
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.7, 0.5, 0.3, 0.1])]
    shifts: Vec<f64>,
    /// Steps of the reference run (no shift)
    #[arg(long, default_value_t = 200)]
    reference_steps: usize,
    #[arg(long, value_enum, default_value_t = Solver::Heun)]
    reference_solver: Solver,
    /// Noise seed (every run starts from the same noise)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples integrated together
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Output directory (shift.csv, shift.json, shift.png)
    #[command(flatten)]
    out: OutDirArgs,
}

fn run_shift(a: ShiftArgs) -> Result<()> {
    output::check_new_in(&a.out.out, &shift::FILES, a.out.force)?;
    let opts = shift::ShiftOptions {
        n: a.n_samples,
        steps: a.steps,
        solver: a.solver,
        shifts: a.shifts,
        reference_steps: a.reference_steps,
        reference_solver: a.reference_solver,
        seed: a.seed,
        batch: a.batch,
    };
    opts.check()?;
    let ds = a.data.load()?;
    let mut field = oracle_field(&a.oracle, &ds, "shift")?;
    let bar = progress(opts.total_steps() as u64, "steps");
    let study = shift::run(&mut field, &ds, &opts, || bar.inc(1))?;
    bar.finish_and_clear();
    print!("{}", shift::table(&study));
    shift::write_outputs(&a.out.out, &study)?;
    eprintln!("wrote {}/shift.{{csv,json,png}}", a.out.out.display());
    Ok(())
}

#[derive(Args)]
struct CfgArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    /// Samples per class
    #[arg(long, default_value_t = 10)]
    per_class: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, value_enum, default_value_t = Solver::Heun)]
    solver: Solver,
    /// Guidance scale w: u = u_uncond + w (u_cond - u_uncond) inside the interval
    #[arg(long, default_value_t = 2.5)]
    scale: f64,
    /// Guidance intervals t_lo,t_hi, one setting each (repeat the flag); the unguided
    /// baseline always comes first. Default: 0,1 0,0.1 0.1,0.6 0.9,1
    #[arg(long = "interval", value_name = "T_LO,T_HI", value_parser = parse_interval)]
    intervals: Vec<[f64; 2]>,
    /// Noise seed (every setting starts from the same noise)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples integrated together
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Output directory (cfg.csv, cfg.json, cfg.png)
    #[command(flatten)]
    out: OutDirArgs,
}

/// `t_lo,t_hi` (checked further by `Guidance::new`).
fn parse_interval(s: &str) -> std::result::Result<[f64; 2], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("'{s}': {e}"))?;
    match v[..] {
        [lo, hi] => Ok([lo, hi]),
        _ => Err(format!("'{s}': expected two times t_lo,t_hi")),
    }
}

fn run_cfg(a: CfgArgs) -> Result<()> {
    output::check_new_in(&a.out.out, &cfg::FILES, a.out.force)?;
    let intervals = if a.intervals.is_empty() {
        cfg::DEFAULT_INTERVALS.to_vec()
    } else {
        a.intervals
    };
    let opts = cfg::CfgOptions {
        per_class: a.per_class,
        steps: a.steps,
        solver: a.solver,
        scale: a.scale,
        intervals,
        seed: a.seed,
        batch: a.batch,
    };
    opts.settings()?;
    let ds = a.data.load()?;
    let mut field = oracle_field(&a.oracle, &ds, "cfg")?;
    let bar = progress(opts.total_steps(ds.class_counts().len()) as u64, "steps");
    let study = cfg::run(&mut field, &ds, &opts, || bar.inc(1))?;
    bar.finish_and_clear();
    print!("{}", cfg::table(&study));
    cfg::write_outputs(&a.out.out, &study, &ds.shape)?;
    eprintln!("wrote {}/cfg.{{csv,json,png}}", a.out.out.display());
    Ok(())
}
