//! `oracleflow sample`: integrate from noise to data with the oracle, write pictures,
//! arrays and run.json.

use anyhow::Result;
use clap::Args;

use oracleflow::field::{OracleField, VelocityField};
use oracleflow::report::{self, FieldRecord, SamplingSettings};
use oracleflow::sample::{self, Conditioning, Guidance, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::{analysis, output};

use super::args::{DataArgs, OracleArgs, OutDirArgs};
use super::progress;

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    /// Number of samples
    #[arg(short = 'n', long, default_value_t = 64)]
    n_samples: usize,
    /// Solver steps from t = 0 to t = 1
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, value_enum, default_value_t)]
    solver: Solver,
    /// Time shift s: t_m = s t / (1 + (s - 1) t); s < 1 spends more steps early
    #[arg(long, default_value_t = 1.0)]
    shift: f64,
    /// Explicit time grid instead of --steps/--shift, e.g. 0,0.1,0.3,0.6,1
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["steps", "shift"])]
    times: Option<Vec<f64>>,
    /// Noise seed: sample i starts from noise fixed by (seed, i)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Condition every sample on one class
    #[arg(long, conflicts_with = "classes")]
    class: Option<u32>,
    /// `all`: a balanced set, sample i conditioned on the i-th class in turn
    #[arg(long, value_parser = ["all"])]
    classes: Option<String>,
    /// Classifier-free guidance scale w: u = u_uncond + w (u_cond - u_uncond)
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guidance interval t_lo,t_hi (outside it: the conditional velocity)
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0])]
    cfg_interval: Vec<f64>,
    /// Samples integrated together (each velocity evaluation streams the data once per batch)
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Rows of trajectory.png (samples spread over the set)
    #[arg(long, default_value_t = 8)]
    track: usize,
    /// Columns (times) of trajectory.png
    #[arg(long, default_value_t = 10)]
    columns: usize,
    #[command(flatten)]
    out: OutDirArgs,
}

impl SampleArgs {
    fn conditioning(&self) -> Conditioning {
        match (self.class, &self.classes) {
            (Some(c), _) => Conditioning::Class(c),
            (None, Some(_)) => Conditioning::Balanced,
            (None, None) => Conditioning::Unconditional,
        }
    }

    fn schedule(&self) -> Schedule {
        match &self.times {
            Some(t) => Schedule::Explicit(t.clone()),
            None => Schedule::Shifted {
                steps: self.steps,
                shift: self.shift,
            },
        }
    }
}

pub fn run(a: SampleArgs) -> Result<()> {
    // Everything that can be checked without the data is checked before loading it.
    output::check_new_in(&a.out.out, &report::SAMPLE_FILES, a.out.force)?;
    sample::check_counts(a.n_samples, a.batch)?;
    let schedule = a.schedule();
    let times = sample::sampling_times(&schedule)?;
    let guidance = a
        .cfg_scale
        .map(|scale| Guidance::new(scale, &a.cfg_interval))
        .transpose()?;

    let ds = a.data.load()?;
    let conditioning = a.conditioning();
    let classes = conditioning.classes(&ds, a.n_samples)?;
    sample::check_guidance(&classes, guidance)?;
    let options = SampleOptions {
        schedule,
        solver: a.solver,
        seed: a.seed,
        classes: classes.clone(),
        guidance,
        batch: a.batch,
        tracked: sample::spread_samples(a.n_samples, a.track),
    };

    let mut field = OracleField::new(a.oracle.build(&ds)?);
    eprintln!(
        "{} on {} ({} samples, D = {})",
        field.describe(),
        ds.name,
        ds.n_samples(),
        ds.dim()
    );
    let n_batches = a.n_samples.div_ceil(options.batch);
    let bar = progress(((times.len() - 1) * n_batches) as u64, "steps");
    let start = std::time::Instant::now();
    let run = sample::sample(&mut field, &options, || bar.inc(1))?;
    let sampling_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let neighbours = analysis::nearest_two(&ds, &run.samples);
    let memorized = neighbours.iter().filter(|nb| nb.memorized()).count();
    let oracle = field.oracle();
    let record = FieldRecord {
        backend: oracle.kind(),
        description: oracle.describe(),
        path: a.oracle.path,
    };
    let mut settings = SamplingSettings {
        n: a.n_samples,
        solver: a.solver,
        steps: times.len() - 1,
        shift: a.shift,
        times,
        seed: a.seed,
        batch: options.batch,
        class: None,
        classes: None,
        guidance,
    };
    settings.set_conditioning(conditioning);
    let run_json = report::sample_run_json(
        &ds,
        &record,
        &settings,
        &run,
        &classes,
        &neighbours,
        sampling_seconds,
    );
    report::write_sample_outputs(&a.out.out, &ds, &run, &neighbours, a.columns, &run_json)?;
    eprintln!(
        "wrote {}/{{samples,trajectory,nearest,stages}}.png, samples.npy, steps.csv, run.json: {} samples in {:.1} s, {memorized} of {} memorized",
        a.out.out.display(),
        a.n_samples,
        sampling_seconds,
        a.n_samples
    );
    Ok(())
}
