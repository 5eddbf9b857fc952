//! Time-step shift with few steps (paper Tab. 2): does a cheap solver still land on the
//! training image an accurate one reaches from the same noise?
//!
//! A reference run (default 200 Heun steps, no shift) and, for each shift s, a few-step
//! run (default 10 Euler steps on t_m = s t / (1 + (s - 1) t)) from the same noise
//! (noise fixed by (seed, sample index)). Each final sample is matched to its nearest
//! training sample (exact, `analysis::nearest_two`); the study reports the share whose
//! nearest training sample equals the reference's, and the memorized share.

use std::path::Path;

use super::nearest::memorized_share;
use crate::analysis;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::output;
use crate::plot::{line_chart, Chart, Series};
use crate::render::save_png;
use crate::sample::{self, SampleOptions, Solver};
use crate::schedule::Schedule;

/// The files [`write_outputs`] writes.
pub const FILES: [&str; 3] = ["shift.csv", "shift.json", "shift.png"];

/// What to compare.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShiftOptions {
    /// Samples per run
    pub n: usize,
    /// Steps and solver of the few-step runs
    pub steps: usize,
    pub solver: Solver,
    /// Shifts of the few-step runs
    pub shifts: Vec<f64>,
    /// Steps and solver of the reference run (no shift)
    pub reference_steps: usize,
    pub reference_solver: Solver,
    pub seed: u64,
    pub batch: usize,
}

impl ShiftOptions {
    /// Checks the settings (before any data is loaded).
    pub fn check(&self) -> Result<()> {
        sample::check_counts(self.n, self.batch)?;
        if self.shifts.is_empty() {
            return Err(Error::Input("--shifts needs at least one shift".into()));
        }
        for &s in &self.shifts {
            sample::sampling_times(&Schedule::Shifted {
                steps: self.steps,
                shift: s,
            })?;
        }
        sample::sampling_times(&Schedule::uniform(self.reference_steps))?;
        Ok(())
    }

    /// Solver steps the whole study takes (for a progress bar).
    pub fn total_steps(&self) -> usize {
        let batches = self.n.div_ceil(self.batch);
        (self.reference_steps + self.shifts.len() * self.steps) * batches
    }

    fn run(&self, steps: usize, shift: f64, solver: Solver) -> SampleOptions {
        SampleOptions {
            init: None,
            schedule: Schedule::Shifted { steps, shift },
            solver,
            seed: self.seed,
            classes: vec![None; self.n],
            guidance: None,
            batch: self.batch,
            tracked: Vec::new(),
        }
    }
}

/// One few-step run against the reference.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShiftRow {
    pub shift: f64,
    /// Share of samples whose nearest training sample is the reference's
    pub same_as_reference: f64,
    /// Share memorized (d(nearest) / d(second nearest) < 1/3)
    pub memorized: f64,
    /// Mean distance to the nearest training sample
    pub mean_nearest_distance: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ShiftStudy {
    pub options: ShiftOptions,
    pub field: String,
    pub reference_memorized: f64,
    pub rows: Vec<ShiftRow>,
}

/// Runs the reference, then every shift; `tick` after every solver step.
pub fn run(
    field: &mut dyn VelocityField,
    ds: &Dataset,
    opts: &ShiftOptions,
    mut tick: impl FnMut(),
) -> Result<ShiftStudy> {
    opts.check()?;
    let reference = sample::sample(
        field,
        &opts.run(opts.reference_steps, 1.0, opts.reference_solver),
        &mut tick,
    )?;
    let ref_nb = analysis::nearest_two(ds, &reference.samples);
    let mut rows = Vec::new();
    for &shift in &opts.shifts {
        let r = sample::sample(field, &opts.run(opts.steps, shift, opts.solver), &mut tick)?;
        let nb = analysis::nearest_two(ds, &r.samples);
        let same = nb
            .iter()
            .zip(&ref_nb)
            .filter(|(a, b)| a.nearest == b.nearest)
            .count();
        rows.push(ShiftRow {
            shift,
            same_as_reference: same as f64 / opts.n as f64,
            memorized: memorized_share(&nb),
            mean_nearest_distance: nb.iter().map(|n| n.distance).sum::<f64>() / opts.n as f64,
        });
    }
    Ok(ShiftStudy {
        options: opts.clone(),
        field: field.describe(),
        reference_memorized: memorized_share(&ref_nb),
        rows,
    })
}

/// The printed table.
pub fn table(s: &ShiftStudy) -> String {
    let o = &s.options;
    let mut t = format!(
        "{} {:?} steps vs {} {:?} steps (no shift), {} samples\n{:>6}  {:>22}  {:>10}  {:>12}\n",
        o.steps,
        o.solver,
        o.reference_steps,
        o.reference_solver,
        o.n,
        "shift",
        "same image as reference",
        "memorized",
        "mean d(near.)"
    );
    for r in &s.rows {
        t += &format!(
            "{:>6}  {:>22.3}  {:>10.3}  {:>12.3}\n",
            r.shift, r.same_as_reference, r.memorized, r.mean_nearest_distance
        );
    }
    t += &format!("reference: {:.3} memorized\n", s.reference_memorized);
    t
}

/// shift.png: the shares against the shift.
pub fn chart(s: &ShiftStudy) -> Result<image::RgbImage> {
    let o = &s.options;
    let curve = |f: fn(&ShiftRow) -> f64| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = s.rows.iter().map(|r| (r.shift, f(r))).collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let same = format!(
        "same training image as {} {:?} steps",
        o.reference_steps, o.reference_solver
    );
    let series = [
        Series {
            name: &same,
            points: curve(|r| r.same_as_reference),
        },
        Series {
            name: "memorized (d1/d2 < 1/3)",
            points: curve(|r| r.memorized),
        },
    ];
    let x_max = s.rows.iter().map(|r| r.shift).fold(1.0, f64::max) * 1.05;
    line_chart(
        &Chart {
            title: &format!(
                "Time shift with {} {:?} steps ({} samples)",
                o.steps, o.solver, o.n
            ),
            x_label:
                "shift s (dimensionless; t_m = s t / (1 + (s - 1) t), s < 1: more steps early)",
            y_label: "share of samples (0 to 1)",
            x_range: (0.0, x_max),
            y_range: (0.0, 1.05),
            markers: &[],
        },
        &series,
    )
}

/// Writes shift.csv (`shift,steps,solver,same_as_reference,memorized,mean_nearest_distance`),
/// shift.json and shift.png.
pub fn write_outputs(dir: &Path, s: &ShiftStudy) -> Result<()> {
    let png = chart(s)?;
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "study": s,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    output::write_atomic(&dir.join("shift.csv"), |w| {
        writeln!(
            w,
            "shift,steps,solver,same_as_reference,memorized,mean_nearest_distance"
        )?;
        for r in &s.rows {
            writeln!(
                w,
                "{},{},{:?},{},{},{}",
                r.shift,
                s.options.steps,
                s.options.solver,
                r.same_as_reference,
                r.memorized,
                r.mean_nearest_distance
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join("shift.json"), &json)?;
    save_png(&dir.join("shift.png"), &png)
}
