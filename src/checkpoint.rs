//! A sampling run's state after its finished batches, saved bit for bit so that a resumed
//! run ends byte-identical to an uninterrupted one: every number is stored as its
//! little-endian bits (no decimal round trip), the per-step sums undivided.

use crate::error::{Error, Result};
use crate::oracle::QueryStats;
use crate::sample::{SampleRun, StepSummary, Trajectory};

const MAGIC: &[u8; 8] = b"OFCKPT01";

/// The state after `batches_done` batches.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub batches_done: usize,
    /// Cumulative: samples, noise and stats of the finished batches; per-step sums (not
    /// yet divided by the sample count); field evaluations so far.
    pub run: SampleRun,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend(v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend(v.to_bits().to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend(v.to_bits().to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| self.f32(x));
    }
    fn f64s(&mut self, v: &[f64]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| self.f64(x));
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        let n = self.u64()? as usize;
        // A length can not exceed what is left (4 bytes an element at least).
        (n <= self.0.len() / 4).then_some(n)
    }
    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_bits(self.u64()?))
    }
    fn f32(&mut self) -> Option<f32> {
        Some(f32::from_bits(u32::from_le_bytes(
            self.take(4)?.try_into().ok()?,
        )))
    }
    fn f32s(&mut self) -> Option<Vec<f32>> {
        (0..self.len()?).map(|_| self.f32()).collect()
    }
    fn f64s(&mut self) -> Option<Vec<f64>> {
        (0..self.len()?).map(|_| self.f64()).collect()
    }
}

fn step_fields(s: &StepSummary) -> [f64; 10] {
    [
        s.t,
        s.mean_top1_weight,
        s.mean_entropy,
        s.mean_ess,
        s.frac_top1_above_half,
        s.mean_posterior_variance,
        s.max_skipped_mass_bound,
        s.mean_tiles_skipped,
        s.mean_samples_skipped,
        0.0,
    ]
}

fn stats_fields(s: &QueryStats) -> [f32; 8] {
    [
        s.top1_weight,
        f32::from_bits(s.top1_index),
        s.entropy,
        s.ess,
        s.skipped_mass_bound,
        s.tiles_skipped,
        s.samples_skipped,
        s.posterior_variance,
    ]
}

impl Checkpoint {
    /// The bytes of the state `run` after `batches_done` batches (read back by
    /// [`Checkpoint::decode`]).
    pub fn encode(batches_done: usize, r: &SampleRun) -> Vec<u8> {
        let mut w = Writer(MAGIC.to_vec());
        w.u64(batches_done as u64);
        w.u64(r.evaluations as u64);
        w.f64s(&r.times);
        w.f32s(&r.samples);
        w.f32s(&r.noise);
        w.u64(r.final_stats.len() as u64);
        for s in &r.final_stats {
            match s {
                Some(s) => {
                    w.u64(1);
                    stats_fields(s).iter().for_each(|&v| w.f32(v));
                }
                None => w.u64(0),
            }
        }
        w.u64(r.steps.len() as u64);
        for s in &r.steps {
            step_fields(s).iter().for_each(|&v| w.f64(v));
        }
        w.u64(r.trajectories.len() as u64);
        for tr in &r.trajectories {
            w.u64(tr.sample as u64);
            w.u64(tr.x.len() as u64);
            tr.x.iter().for_each(|v| w.f32s(v));
            w.u64(tr.x1_hat.len() as u64);
            tr.x1_hat.iter().for_each(|v| w.f32s(v));
        }
        w.0
    }

    /// Decodes [`Checkpoint::encode`]'s bytes; `source` names the file in errors.
    pub fn decode(bytes: &[u8], source: &std::path::Path) -> Result<Checkpoint> {
        let bad = || Error::data(source, "not a complete oracleflow checkpoint");
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(bad)?;
        Self::decode_body(&mut Reader(rest)).ok_or_else(bad)
    }

    fn decode_body(r: &mut Reader<'_>) -> Option<Checkpoint> {
        let batches_done = r.u64()? as usize;
        let evaluations = r.u64()? as usize;
        let times = r.f64s()?;
        let samples = r.f32s()?;
        let noise = r.f32s()?;
        let mut final_stats = Vec::new();
        for _ in 0..r.len()? {
            final_stats.push(match r.u64()? {
                1 => {
                    let v: Vec<f32> = (0..8).map(|_| r.f32()).collect::<Option<_>>()?;
                    Some(QueryStats {
                        top1_weight: v[0],
                        top1_index: v[1].to_bits(),
                        entropy: v[2],
                        ess: v[3],
                        skipped_mass_bound: v[4],
                        tiles_skipped: v[5],
                        samples_skipped: v[6],
                        posterior_variance: v[7],
                    })
                }
                _ => None,
            });
        }
        let mut steps = Vec::new();
        for _ in 0..r.len()? {
            let v: Vec<f64> = (0..10).map(|_| r.f64()).collect::<Option<_>>()?;
            steps.push(StepSummary {
                t: v[0],
                mean_top1_weight: v[1],
                mean_entropy: v[2],
                mean_ess: v[3],
                frac_top1_above_half: v[4],
                mean_posterior_variance: v[5],
                max_skipped_mass_bound: v[6],
                mean_tiles_skipped: v[7],
                mean_samples_skipped: v[8],
            });
        }
        let mut trajectories = Vec::new();
        for _ in 0..r.len()? {
            let sample = r.u64()? as usize;
            let x = (0..r.len()?).map(|_| r.f32s()).collect::<Option<_>>()?;
            let x1_hat = (0..r.len()?).map(|_| r.f32s()).collect::<Option<_>>()?;
            trajectories.push(Trajectory { sample, x, x1_hat });
        }
        r.0.is_empty().then_some(Checkpoint {
            batches_done,
            run: SampleRun {
                times,
                samples,
                noise,
                final_stats,
                steps,
                trajectories,
                evaluations,
            },
        })
    }
}
