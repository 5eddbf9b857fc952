//! `oracleflow info`: the GPU adapter, and a summary of a dataset.

use anyhow::Result;
use clap::Args;

use oracleflow::dataset::{self, Dtype};

#[derive(Args)]
pub struct InfoArgs {
    /// Also load and summarise a dataset
    #[arg(long, long_help = dataset::SPEC_HELP)]
    data: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    dtype: Dtype,
}

pub fn run(a: InfoArgs) -> Result<()> {
    match oracleflow::oracle::gpu::adapter_report() {
        Ok(report) => println!("{report}"),
        Err(e) => println!("gpu: none ({e})"),
    }
    // The GPU kernels' tile shapes and where they came from (default / cached / tuned /
    // ORACLEFLOW_GPU_TILES); an input error (a malformed ORACLEFLOW_GPU_TILES) fails.
    match oracleflow::oracle::gpu::tune::report() {
        Ok(lines) => lines.iter().for_each(|l| println!("  {l}")),
        Err(e @ oracleflow::Error::Input(_)) => return Err(e.into()),
        Err(_) => {}
    }
    // The indices `--devices` takes.
    let adapters = oracleflow::oracle::gpu::adapter_list();
    if !adapters.is_empty() {
        println!("adapters (--devices):");
        for line in adapters {
            println!("  {line}");
        }
    }
    println!(
        "cpu: {}, {} threads",
        oracleflow::bench::peers::cpu_model(),
        rayon::current_num_threads()
    );
    // The dense pass's GEMM library and tiles: measured on first use here (about a
    // second), then read from the cache.
    use oracleflow::oracle::cpu::GemmLib;
    for lib in GemmLib::ALL {
        let state = if lib.available() {
            "available"
        } else {
            "not found"
        };
        println!("  {:<9} {state}: {}", lib.name(), lib.describe());
    }
    println!("  {}", oracleflow::oracle::cpu::tune::tuning());
    println!(
        "  exact pruning's bf16 screening: {}",
        if oracleflow::oracle::prune::bf16::supported() {
            "available (AVX-512 BF16)"
        } else {
            "not on this CPU (the sparse pass computes its logits in f32)"
        }
    );
    if let Some(spec) = a.data {
        let ds = dataset::load(&spec, a.dtype)?;
        println!("dataset: {}", ds.name);
        println!("  samples: {}", ds.n_samples());
        println!(
            "  sample shape: {:?} ({}) = {} values",
            ds.shape.dims,
            if ds.shape.is_image { "image" } else { "array" },
            ds.dim()
        );
        println!("  storage: {:?}", ds.dtype());
        match ds.labels() {
            Some(_) => println!("  classes: {:?}", ds.class_counts()),
            None => println!("  classes: none (unlabelled)"),
        }
    }
    Ok(())
}
