//! Times the gpu backend's pruned pass against its dense pass, per call (setup excluded),
//! with the share of rows the batch's union of tiles keeps: the measurement behind
//! `gpu::prune::DENSE_SHARE`.
//!
//!     cargo run --example gpu_prune_timing -- [DATA] [B,B,..] [T,T,..]
//!
//! e.g. `-- fashion-mnist 1,4,16,64 0.5,0.7,0.9,0.99`. Queries: x_t = t y + (1 - t) eps
//! for random stored rows y (rectified flow).

use std::time::Instant;

use oracleflow::dataset::{self, Dtype};
use oracleflow::oracle::gpu::{GpuBackend, GpuOptions};
use oracleflow::oracle::{Backend, CentredBatch};
use oracleflow::Path;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn main() -> oracleflow::error::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data = args.get(1).map_or("embedded", String::as_str);
    let list = |i: usize, d: &str| -> Vec<f64> {
        args.get(i)
            .map_or(d, String::as_str)
            .split(',')
            .map(|v| v.parse().expect("a number"))
            .collect()
    };
    let batches = list(2, "1,4,16,64");
    let times = list(3, "0.5,0.7,0.9,0.99");
    let ds = dataset::load(data, Dtype::F32)?;
    let d = ds.dim();
    let clock = Instant::now();
    let mut pruned = GpuBackend::with_options(&ds, GpuOptions::default())?;
    let setup_pruned = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let mut dense = GpuBackend::with_options(
        &ds,
        GpuOptions {
            exact_dense: true,
            ..Default::default()
        },
    )?;
    let setup_dense = clock.elapsed().as_secs_f64();
    println!("{}", pruned.describe());
    println!("setup: pruned {setup_pruned:.2} s (index build + upload), dense {setup_dense:.2} s");
    println!("B,t,kept_share,dense_s,pruned_s,speedup");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let path = Path::RectifiedFlow;
    for &b in &batches {
        let b = b as usize;
        for &t in &times {
            let c = path.coefs(t);
            let mut x = vec![0.0f32; b * d];
            for q in 0..b {
                let y = ds.sample_f64(rng.random_range(0..ds.n_samples()));
                for (k, v) in x[q * d..(q + 1) * d].iter_mut().enumerate() {
                    let e: f64 = rng.sample(StandardNormal);
                    *v = (c.alpha * y[k] + c.sigma * e - c.alpha * ds.mean()[k] as f64) as f32;
                }
            }
            let (lc, ln) = c.logit_coefs();
            let coefs = vec![[lc as f32, ln as f32]; b];
            let batch = CentredBatch {
                x: &x,
                logit_coefs: &coefs,
                rows: 0..ds.n_samples(),
            };
            let time = |g: &mut GpuBackend<'_>| -> oracleflow::error::Result<f64> {
                g.posterior(&batch)?; // warm: buffers, bind groups
                let clock = Instant::now();
                for _ in 0..2 {
                    g.posterior(&batch)?;
                }
                Ok(clock.elapsed().as_secs_f64() / 2.0)
            };
            let td = time(&mut dense)?;
            let tp = time(&mut pruned)?;
            let kept = if pruned.last_was_pruned() {
                pruned.kept_rows().len() as f64 / ds.n_samples() as f64
            } else {
                1.0
            };
            println!("{b},{t},{kept:.4},{td:.3},{tp:.3},{:.2}", td / tp);
        }
    }
    Ok(())
}
