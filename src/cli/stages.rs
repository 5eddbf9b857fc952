//! `oracleflow stages`: stage curves along the path for one or several datasets.

use anyhow::Result;
use clap::Args;

use oracleflow::dataset::{self, Dtype};
use oracleflow::report::{self, StageResult, StageSettings};
use oracleflow::{analysis, output};

use super::args::{FieldArgs, OracleArgs, OutDirArgs};
use super::progress;

#[derive(Args)]
pub struct StagesArgs {
    /// Datasets (repeat --data to compare several, e.g. gaussian:1400,512 and gaussian:1400,8192)
    #[arg(long, required = true, long_help = dataset::SPEC_HELP)]
    data: Vec<String>,
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
    #[command(flatten)]
    oracle: OracleArgs,
    /// The field whose velocity is compared with the training target (posterior
    /// statistics only for the oracle; NaN otherwise)
    #[command(flatten)]
    field: FieldArgs,
    /// (training sample, noise) pairs averaged at each time
    #[arg(long, default_value_t = 256)]
    pairs: usize,
    /// Build x_t from the samples of this dataset instead (e.g. fashion-mnist:test): the
    /// posterior then refines towards each query's nearest training sample
    #[arg(long, value_name = "SPEC")]
    queries_from: Option<String>,
    /// The class-conditional posterior of one class (queries from that class only)
    #[arg(long)]
    class: Option<u32>,
    /// Intervals of the time grid on [0, t_max]
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Last time of the grid (< 1)
    #[arg(long, default_value_t = 0.5)]
    t_max: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (stages.png, stages.csv, stages.json)
    #[command(flatten)]
    out: OutDirArgs,
}

pub fn run(a: StagesArgs) -> Result<()> {
    output::check_new_in(&a.out.out, &report::STAGE_FILES, a.out.force)?;
    let times = analysis::stage_times(a.steps, a.t_max)?;
    let queries = a
        .queries_from
        .as_deref()
        .map(|spec| dataset::load(spec, Dtype::F32))
        .transpose()?;
    let spec = a.field.check()?;
    let mut results = Vec::new();
    for data in &a.data {
        let ds = dataset::load(data, a.dtype)?;
        let mut field = a.field.build(&spec, &ds, &a.oracle, &[None])?;
        eprintln!(
            "{data}{}: N = {}, D = {} on {}",
            a.class.map_or(String::new(), |c| format!(", class {c}")),
            ds.rows_for(a.class)?.len(),
            ds.dim(),
            field.describe()
        );
        let bar = progress(times.len() as u64, "times");
        let pairs = analysis::StagePairs {
            n_pairs: a.pairs,
            seed: a.seed,
            queries: queries.as_ref(),
            class: a.class,
        };
        let curve = analysis::stage_curve_of_field(
            field.as_mut(),
            &ds,
            a.oracle.path,
            &times,
            &pairs,
            || bar.inc(1),
        )?;
        bar.finish_and_clear();
        let r = StageResult {
            data: data.clone(),
            n_samples: ds.rows_for(a.class)?.len(),
            dim: ds.dim(),
            backend: field.describe(),
            queries_from: a.queries_from.clone(),
            class: a.class,
            curve,
        };
        let [t50, t90, t99] = r.crossing_times();
        let fmt = |t: Option<f64>| t.map_or("-".into(), |t| format!("{t:.3}"));
        println!(
            "{data}: mean top-1 weight reaches 0.5 at t = {}, 0.9 at t = {}, 0.99 at t = {}",
            fmt(t50),
            fmt(t90),
            fmt(t99)
        );
        if let (Some(q), Some(last)) = (&a.queries_from, r.curve.last()) {
            println!(
                "  queries from {q}: at t = {:.3} the top-1 sample is the query's nearest training sample for {:.1}% of {} queries",
                last.t,
                100.0 * last.nearest_rate,
                a.pairs
            );
        }
        results.push(r);
    }
    let settings = StageSettings {
        path: a.oracle.path,
        pairs: a.pairs,
        seed: a.seed,
        times,
    };
    report::write_stage_outputs(&a.out.out, &settings, &results)?;
    eprintln!("wrote {}/stages.{{png,csv,json}}", a.out.out.display());
    Ok(())
}
