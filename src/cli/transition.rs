//! `oracleflow transition`: when the posterior collapses onto one training sample, against
//! D and N (the paper's unit-Gaussian scaling study), beside the paper's values.

use anyhow::Result;
use clap::Args;
use oracleflow::bail_input as bail;

use oracleflow::dataset::{self, Dtype};
use oracleflow::output;
use oracleflow::study::transition::{self, Tick, TransitionOptions};

use super::args::{OracleArgs, OutDirArgs};
use super::progress;

#[derive(Args)]
pub struct TransitionArgs {
    /// Sweep D on unit Gaussians with --n samples (default, with --ns: the paper's sweeps
    /// --dims 512,2048,8192 and --ns 100,1000,10000)
    #[arg(long, value_delimiter = ',')]
    dims: Option<Vec<usize>>,
    /// Samples of the --dims sweep
    #[arg(long, default_value_t = 1400)]
    n: usize,
    /// Sweep N on unit Gaussians in --dim dimensions
    #[arg(long, value_delimiter = ',')]
    ns: Option<Vec<usize>>,
    /// Dimension of the --ns sweep
    #[arg(long, default_value_t = 1024)]
    dim: usize,
    /// Further datasets, each one setting (repeat --data; see `--help` of `sample`)
    #[arg(long, long_help = dataset::SPEC_HELP)]
    data: Vec<String>,
    /// Seed of the synthetic Gaussian data
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
    #[command(flatten)]
    oracle: OracleArgs,
    /// (training sample, noise) pairs averaged at each time
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Seed of the pairs (samples and noise)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Last time of the grid (< 1)
    #[arg(long, default_value_t = 0.4)]
    t_max: f64,
    /// Spacing of the first pass over [0, t_max]
    #[arg(long, default_value_t = 0.02)]
    coarse_step: f64,
    /// Spacing of the second pass over the coarse intervals holding the crossings of 0.5,
    /// 0.9 and 0.99
    #[arg(long, default_value_t = 0.0025)]
    fine_step: f64,
    /// Output directory (transition.csv, transition.json, transition.png)
    #[command(flatten)]
    out: OutDirArgs,
}

impl TransitionArgs {
    /// The settings as dataset specs: the sweeps asked for (both of the paper's when
    /// nothing is asked for), then --data.
    fn specs(&self) -> Vec<String> {
        let none_asked = self.dims.is_none() && self.ns.is_none() && self.data.is_empty();
        let paper_dims = vec![512, 2048, 8192];
        let paper_ns = vec![100, 1000, 10000];
        let dims = match (&self.dims, none_asked) {
            (Some(d), _) => d.clone(),
            (None, true) => paper_dims,
            (None, false) => Vec::new(),
        };
        let ns = match (&self.ns, none_asked) {
            (Some(n), _) => n.clone(),
            (None, true) => paper_ns,
            (None, false) => Vec::new(),
        };
        let seed = self.data_seed;
        dims.iter()
            .map(|d| format!("gaussian:{},{d},{seed}", self.n))
            .chain(
                ns.iter()
                    .map(|n| format!("gaussian:{n},{},{seed}", self.dim)),
            )
            .chain(self.data.iter().cloned())
            .collect()
    }
}

pub fn run(a: TransitionArgs) -> Result<()> {
    output::check_new_in(&a.out.out, &transition::FILES, a.out.force)?;
    let opts = TransitionOptions {
        pairs: a.pairs,
        seed: a.seed,
        t_max: a.t_max,
        coarse_step: a.coarse_step,
        fine_step: a.fine_step,
    };
    opts.check()?;
    let specs = a.specs();
    if specs.is_empty() {
        bail!("transition: no setting (give --dims, --ns or --data)");
    }
    let bar = progress(0, "times");
    let mut results = Vec::new();
    for spec in &specs {
        let ds = dataset::load(spec, a.dtype)?;
        let mut oracle = a.oracle.build(&ds)?;
        bar.println(format!(
            "{spec}: N = {}, D = {} on {}",
            ds.n_samples(),
            ds.dim(),
            oracle.describe()
        ));
        let r = transition::measure(&mut oracle, &opts, spec, |t| match t {
            Tick::Grow(n) => bar.inc_length(n as u64),
            Tick::Done => bar.inc(1),
        })?;
        results.push(r);
    }
    bar.finish_and_clear();
    print!("{}", transition::table(&results));
    transition::write_outputs(&a.out.out, &opts, a.oracle.path, &results)?;
    eprintln!("wrote {}/transition.{{csv,json,png}}", a.out.out.display());
    Ok(())
}
