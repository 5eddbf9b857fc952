//! `oracleflow sample`: integrate from noise to data with the oracle, write pictures,
//! arrays and run.json.

use std::path::PathBuf;

use anyhow::Result;
// Usage errors are bad input: exit code 2 (anyhow::bail! would give 1).
use clap::Args;
use oracleflow::bail_input as bail;

use oracleflow::field::{FieldSpec, SwitchField};
use oracleflow::oracle::check_flag_time;
use oracleflow::report::{self, FieldRecord, SamplingSettings};
use oracleflow::sample::{self, Conditioning, Guidance, InitFrom, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::{analysis, output};

use oracleflow::oracle::shard;

use super::args::{DataArgs, FieldArgs, OracleArgs};
use super::progress;

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    oracle: OracleArgs,
    #[command(flatten)]
    field: FieldArgs,
    /// Switch fields at this time: --field for t < TS, --then from TS on (a step that
    /// would straddle TS is split there)
    #[arg(long, requires = "then")]
    switch_at: Option<f64>,
    /// The field after --switch-at (oracle, gaussian or external:CMD)
    #[arg(long, requires = "switch_at")]
    then: Option<String>,
    /// Start from these samples (a --data spec, e.g. fashion-mnist:test) noised to
    /// --t-start along the path with the run's seed, instead of from noise at t = 0
    #[arg(long, requires = "t_start")]
    init_from: Option<String>,
    /// The time --init-from samples are noised to (1 = returned as they are)
    #[arg(long, requires = "init_from")]
    t_start: Option<f64>,
    /// Number of samples [default: 64, or with --init-from the number of given samples]
    #[arg(short = 'n', long)]
    n_samples: Option<usize>,
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
    /// Output directory
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Overwrite existing files in the output directory
    #[arg(long)]
    force: bool,
    /// Continue the interrupted run in DIR (or in --out DIR), started with the same
    /// settings: the batches it finished, saved as it went, are not redone, and the result
    /// is the same bytes as an uninterrupted run
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
}

impl SampleArgs {
    /// The run's directory: --out DIR, or the DIR of --resume DIR (both: the same one).
    fn out_dir(&self) -> Result<PathBuf> {
        Ok(match (&self.out, &self.resume) {
            (Some(out), Some(Some(dir))) if out != dir => {
                bail!(
                    "--resume {}: not the --out directory {}",
                    dir.display(),
                    out.display()
                )
            }
            (Some(out), _) => out.clone(),
            (None, Some(Some(dir))) => dir.clone(),
            (None, _) => bail!("--resume without DIR needs --out DIR"),
        })
    }

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

/// Where a run saves its finished batches until it completes.
fn partial_dir(out: &std::path::Path) -> std::path::PathBuf {
    out.join(".oracleflow-partial")
}

pub fn run(a: SampleArgs) -> Result<()> {
    let out_dir = a.out_dir()?;
    // Everything that can be checked without the data is checked before loading it.
    output::check_new_in(&out_dir, &report::SAMPLE_FILES, a.force)?;
    let partial = partial_dir(&out_dir);
    let checkpoint_path = partial.join("checkpoint.bin");
    match (a.resume.is_some(), checkpoint_path.is_file()) {
        (true, false) => bail!("--resume: {} holds no interrupted run", out_dir.display()),
        (false, true) if !a.force => bail!(
            "{} holds an interrupted run: pass --resume to continue it, or --force to start over",
            out_dir.display()
        ),
        _ => {}
    }
    sample::check_counts(a.n_samples.unwrap_or(1), a.batch)?;
    let schedule = a.schedule();
    let times = sample::sampling_times(&schedule)?;
    let guidance = a
        .cfg_scale
        .map(|scale| Guidance::new(scale, &a.cfg_interval))
        .transpose()?;
    let first_spec = a.field.check()?;
    let then_spec: Option<FieldSpec> = a.then.as_deref().map(str::parse).transpose()?;
    // Checked before the data is loaded (the field and the grid check them again).
    if let Some(ts) = a.switch_at {
        check_flag_time("--switch-at", ts)?;
    }
    if let Some(t) = a.t_start {
        check_flag_time("--t-start", t)?;
    }

    let ds = a.data.load_for(&a.oracle)?;
    // Under mpirun `ds` is this rank's share of the rows (all the oracle needs), but the
    // memorization check and the pictures need every sample: rank 0 loads them whole too.
    let root = shard::mpi::is_root();
    let full = match shard::mpi::current() {
        Some(r) if r.rank == 0 => Some(a.data.load_whole()?),
        _ => None,
    };
    let whole = full.as_ref().unwrap_or(&ds);
    let init_ds = a
        .init_from
        .as_deref()
        .map(|spec| oracleflow::dataset::load(spec, ds.dtype()))
        .transpose()?;
    let n_samples = match (&init_ds, a.n_samples) {
        (None, n) => n.unwrap_or(64),
        (Some(init), n) => {
            if init.dim() != ds.dim() {
                bail!(
                    "--init-from {}: samples of {} values, the dataset's have {}",
                    init.name,
                    init.dim(),
                    ds.dim()
                );
            }
            match n {
                Some(n) if n > init.n_samples() => bail!(
                    "-n {n}: --init-from {} holds only {} samples",
                    init.name,
                    init.n_samples()
                ),
                Some(n) => n,
                None => init.n_samples(),
            }
        }
    };
    let conditioning = a.conditioning();
    let classes = if shard::mpi::current().is_some() {
        // From rank 0's whole dataset, so that every rank samples the same classes.
        let mut coded: Vec<i64> = match &full {
            Some(w) => conditioning
                .classes(w, n_samples)?
                .iter()
                .map(|c| c.map_or(-1, i64::from))
                .collect(),
            None => Vec::new(),
        };
        shard::mpi::broadcast_from_root(&mut coded);
        coded.into_iter().map(|c| u32::try_from(c).ok()).collect()
    } else {
        conditioning.classes(&ds, n_samples)?
    };
    sample::check_guidance(&classes, guidance)?;
    // Gaussian fits are made for every class sampled (and the unconditional one for CFG).
    let mut fit_classes = classes.clone();
    if guidance.is_some() {
        fit_classes.push(None);
    }
    let init = init_ds.as_ref().map(|init| InitFrom {
        path: a.oracle.path,
        t_start: a.t_start.expect("clap requires --t-start"),
        samples: (0..n_samples).flat_map(|r| init.sample(r)).collect(),
    });
    let options = SampleOptions {
        schedule,
        solver: a.solver,
        seed: a.seed,
        classes: classes.clone(),
        guidance,
        batch: a.batch,
        tracked: sample::spread_samples(n_samples, a.track),
        init,
    };

    let mut field = a.field.build(&first_spec, &ds, &a.oracle, &fit_classes)?;
    if let (Some(ts), Some(then)) = (a.switch_at, &then_spec) {
        let second = a.field.build(then, &ds, &a.oracle, &fit_classes)?;
        field = Box::new(SwitchField::new(field, second, ts)?);
    }
    if root {
        eprintln!(
            "{} on {} ({} samples, D = {})",
            field.describe(),
            ds.name,
            whole.n_samples(),
            ds.dim()
        );
    }
    let t_start = a.t_start.unwrap_or(0.0);
    let n_steps = sample::integration_times(&times, t_start, &field.breakpoints())?.len() - 1;
    let n_batches = n_samples.div_ceil(options.batch);
    let bar = progress((n_steps * n_batches) as u64, "steps");
    let mut settings = SamplingSettings {
        n: n_samples,
        solver: a.solver,
        steps: times.len() - 1,
        shift: a.shift,
        times: times.clone(),
        seed: a.seed,
        batch: options.batch,
        class: None,
        classes: None,
        guidance,
        field: a.field.field.clone(),
        switch_at: a.switch_at,
        then: a.then.clone(),
        init_from: a.init_from.clone(),
        t_start: a.t_start,
    };
    settings.set_conditioning(conditioning);
    // What a resumed run must share with the interrupted one.
    let fingerprint = serde_json::to_string_pretty(&serde_json::json!({
        "data": ds.name, "dtype": ds.dtype(), "path": a.oracle.path,
        "field": field.describe(), "track": a.track, "sampling": settings,
    }))?;
    let settings_path = partial.join("settings.json");
    let resume = if a.resume.is_some() {
        let saved = std::fs::read_to_string(&settings_path)
            .map_err(|e| oracleflow::Error::io(&settings_path, e))?;
        if saved != fingerprint {
            bail!(
                "--resume: {} was started with other settings (see {})",
                out_dir.display(),
                settings_path.display()
            );
        }
        let bytes = std::fs::read(&checkpoint_path)
            .map_err(|e| oracleflow::Error::io(&checkpoint_path, e))?;
        let cp = oracleflow::checkpoint::Checkpoint::decode(&bytes, &checkpoint_path)?;
        if root {
            eprintln!(
                "resuming: {} of {n_batches} batches already done",
                cp.batches_done
            );
        }
        bar.inc((cp.batches_done * n_steps) as u64);
        Some(cp)
    } else {
        if root && partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| oracleflow::Error::io(&partial, e))?;
        }
        None
    };
    // Each finished batch is saved (atomically) so that an interrupted run can resume.
    let save = |batches_done: usize, run: &sample::SampleRun| -> oracleflow::Result<()> {
        if batches_done == n_batches || !root {
            return Ok(());
        }
        std::fs::create_dir_all(&partial).map_err(|e| oracleflow::Error::io(&partial, e))?;
        if !settings_path.is_file() {
            output::write_atomic(&settings_path, |w| w.write_all(fingerprint.as_bytes()))?;
        }
        let bytes = oracleflow::checkpoint::Checkpoint::encode(batches_done, run);
        output::write_atomic(&checkpoint_path, |w| w.write_all(&bytes))
    };
    let start = std::time::Instant::now();
    let run = sample::sample_resumable(field.as_mut(), &options, resume, save, || bar.inc(1))
        .inspect_err(|e| {
            if matches!(e, oracleflow::Error::Interrupted) && checkpoint_path.is_file() {
                eprintln!(
                    "the finished batches are saved in {}: continue with the same command and --resume",
                    partial.display()
                );
            }
        })?;
    let sampling_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // Every rank holds the same samples: rank 0 alone analyses and writes them.
    if !root {
        return Ok(());
    }
    let ds = whole;

    let neighbours = analysis::nearest_two(ds, &run.samples);
    let memorized = neighbours.iter().filter(|nb| nb.memorized()).count();
    let record = FieldRecord {
        backend: field.backend(),
        description: field.describe(),
        path: a.oracle.path,
    };
    let mut run_json = report::sample_run_json(
        ds,
        &record,
        &settings,
        &run,
        &classes,
        &neighbours,
        sampling_seconds,
    );
    run_json["sampling"]["integration_times"] = serde_json::json!(run.times);
    run_json["data"]["dtype_reason"] = serde_json::json!(a.data.dtype_reason());
    let mut summary = format!("{memorized} of {n_samples} memorized");
    if let Some(init) = &options.init {
        // Per sample: the nearest training sample of its start image (the given sample)
        // and whether the result landed on that same training sample.
        let starts = analysis::nearest_two(ds, &init.samples);
        let mut same = 0;
        for (i, (st, nb)) in starts.iter().zip(&neighbours).enumerate() {
            same += (st.nearest == nb.nearest) as usize;
            let entry = &mut run_json["samples"][i];
            entry["start_nearest"] = serde_json::json!(st.nearest);
            entry["start_distance"] = serde_json::json!(st.distance);
            entry["same_nearest_as_start"] = serde_json::json!(st.nearest == nb.nearest);
        }
        run_json["init_from"] = serde_json::json!({
            "spec": a.init_from,
            "t_start": init.t_start,
            "same_nearest_as_start": { "count": same, "of": n_samples },
        });
        summary.push_str(&format!(
            ", {same} of {n_samples} landed on their start image's nearest training sample"
        ));
    }
    report::write_sample_outputs(&out_dir, ds, &run, &neighbours, a.columns, &run_json)?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| oracleflow::Error::io(&partial, e))?;
    }
    eprintln!(
        "wrote {}/{{samples,trajectory,nearest,stages}}.png, samples.npy, steps.csv, run.json: {} samples in {:.1} s, {summary}",
        out_dir.display(),
        n_samples,
        sampling_seconds,
    );
    Ok(())
}
