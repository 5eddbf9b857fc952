//! The mixing studies of the paper: swap the field mid-trajectory, or start from noised
//! held-out images, and see where samples land.
//!
//! - `switch`: for each switch time TS, sample with oracle -> gaussian and with
//!   gaussian -> oracle (`SwitchField`, the step straddling TS split at TS) from the same
//!   noise, and report the memorized share (d(nearest) / d(second nearest) < 1/3).
//! - `resume`: for each start time T, noise held-out images to T with the run's seed and
//!   integrate the oracle from T to 1; report how often the result is the start image's own
//!   nearest training image (and the memorized share).
//!
//! Each writes NAME.csv (`setting,at,share,memorized,mean_nearest_distance`), NAME.json
//! and NAME.png (the shares against the time).

use std::path::Path;

use crate::analysis;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::field::{SwitchField, VelocityField};
use crate::output;
use crate::plot::{line_chart, Chart, Series};
use crate::render::save_png;
use crate::sample::{self, InitFrom, SampleOptions, Solver};
use crate::schedule::Schedule;

/// The files of study `name` (`switch` or `resume`).
pub fn files(name: &str) -> [String; 3] {
    ["csv", "json", "png"].map(|e| format!("{name}.{e}"))
}

/// Sampling settings shared by every run of a study.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MixOptions {
    pub n: usize,
    pub steps: usize,
    pub solver: Solver,
    pub seed: u64,
    pub batch: usize,
    /// The switch times (switch) or start times (resume)
    pub times: Vec<f64>,
}

impl MixOptions {
    /// Checks the settings (before any data is loaded).
    pub fn check(&self) -> Result<()> {
        sample::check_counts(self.n, self.batch)?;
        sample::sampling_times(&Schedule::uniform(self.steps))?;
        if self.times.is_empty() || self.times.iter().any(|t| !(0.0..=1.0).contains(t)) {
            return Err(Error::Input(format!(
                "--at {:?}: need at least one time, each in [0, 1]",
                self.times
            )));
        }
        Ok(())
    }

    fn options(&self, init: Option<InitFrom>) -> SampleOptions {
        SampleOptions {
            schedule: Schedule::uniform(self.steps),
            solver: self.solver,
            seed: self.seed,
            classes: vec![None; self.n],
            guidance: None,
            batch: self.batch,
            tracked: Vec::new(),
            init,
        }
    }
}

/// One run: a setting (e.g. "oracle -> gaussian") at one time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MixRow {
    pub setting: String,
    pub at: f64,
    /// switch: the memorized share; resume: the share landing on the start image's nearest
    pub share: f64,
    pub memorized: f64,
    pub mean_nearest_distance: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MixStudy {
    pub name: String,
    /// What `share` measures
    pub share_is: String,
    pub options: MixOptions,
    pub rows: Vec<MixRow>,
}

fn summarize(ds: &Dataset, samples: &[f32], targets: Option<&[u32]>) -> (f64, f64, f64) {
    let nb = analysis::nearest_two(ds, samples);
    let n = nb.len().max(1) as f64;
    let memorized = super::nearest::memorized_share(&nb);
    let mean_d = nb.iter().map(|x| x.distance).sum::<f64>() / n;
    let share = match targets {
        Some(t) => nb.iter().zip(t).filter(|(x, &t)| x.nearest == t).count() as f64 / n,
        None => memorized,
    };
    (share, memorized, mean_d)
}

/// `switch`: both directions between `oracle` and `gaussian` at every time of the options.
pub fn switch(
    oracle: &mut dyn VelocityField,
    gaussian: &mut dyn VelocityField,
    ds: &Dataset,
    opts: &MixOptions,
    mut tick: impl FnMut(),
) -> Result<MixStudy> {
    opts.check()?;
    let mut rows = Vec::new();
    for forward in [true, false] {
        for &ts in &opts.times {
            let (first, second): (Box<dyn VelocityField + '_>, Box<dyn VelocityField + '_>) =
                if forward {
                    (Box::new(&mut *oracle), Box::new(&mut *gaussian))
                } else {
                    (Box::new(&mut *gaussian), Box::new(&mut *oracle))
                };
            let mut field = SwitchField::new(first, second, ts)?;
            let run = sample::sample(&mut field, &opts.options(None), &mut tick)?;
            let (share, memorized, mean_d) = summarize(ds, &run.samples, None);
            rows.push(MixRow {
                setting: if forward {
                    "oracle -> gaussian"
                } else {
                    "gaussian -> oracle"
                }
                .into(),
                at: ts,
                share,
                memorized,
                mean_nearest_distance: mean_d,
            });
        }
    }
    Ok(MixStudy {
        name: "switch".into(),
        share_is: "memorized share (d1/d2 < 1/3)".into(),
        options: opts.clone(),
        rows,
    })
}

/// `resume`: the first `opts.n` samples of `held_out`, noised to each T, integrated by
/// `field` from T to 1.
pub fn resume(
    field: &mut dyn VelocityField,
    ds: &Dataset,
    held_out: &Dataset,
    path: crate::Path,
    opts: &MixOptions,
    mut tick: impl FnMut(),
) -> Result<MixStudy> {
    opts.check()?;
    if held_out.dim() != ds.dim() || held_out.n_samples() < opts.n {
        return Err(Error::Input(format!(
            "--init-from {}: need {} samples of {} values, it has {} of {}",
            held_out.name,
            opts.n,
            ds.dim(),
            held_out.n_samples(),
            held_out.dim()
        )));
    }
    let starts: Vec<f32> = (0..opts.n).flat_map(|r| held_out.sample(r)).collect();
    let targets: Vec<u32> = analysis::nearest_two(ds, &starts)
        .iter()
        .map(|nb| nb.nearest)
        .collect();
    let mut rows = Vec::new();
    for &t_start in &opts.times {
        let init = InitFrom {
            path,
            t_start,
            samples: starts.clone(),
        };
        let run = sample::sample(field, &opts.options(Some(init)), &mut tick)?;
        let (share, memorized, mean_d) = summarize(ds, &run.samples, Some(&targets));
        rows.push(MixRow {
            // "oracle", "gaussian", "external" (the description's first word)
            setting: field
                .describe()
                .split(':')
                .next()
                .unwrap_or("field")
                .to_string(),
            at: t_start,
            share,
            memorized,
            mean_nearest_distance: mean_d,
        });
    }
    Ok(MixStudy {
        name: "resume".into(),
        share_is: "share landing on the start image's own nearest training image".into(),
        options: opts.clone(),
        rows,
    })
}

/// The printed table.
pub fn table(s: &MixStudy) -> String {
    let mut t = format!(
        "{}: {} samples, {} {:?} steps; share = {}\n{:<22} {:>6} {:>7} {:>10} {:>13}\n",
        s.name,
        s.options.n,
        s.options.steps,
        s.options.solver,
        s.share_is,
        "setting",
        "at",
        "share",
        "memorized",
        "mean d(near.)"
    );
    for r in &s.rows {
        let setting: String = r.setting.chars().take(22).collect();
        t += &format!(
            "{setting:<22} {:>6} {:>7.3} {:>10.3} {:>13.3}\n",
            r.at, r.share, r.memorized, r.mean_nearest_distance
        );
    }
    t
}

/// The shares against the time, one line per setting.
pub fn chart(s: &MixStudy) -> Result<image::RgbImage> {
    let mut settings: Vec<&str> = Vec::new();
    for r in &s.rows {
        if !settings.contains(&r.setting.as_str()) {
            settings.push(&r.setting);
        }
    }
    let series: Vec<Series> = settings
        .iter()
        .map(|name| Series {
            name,
            points: s
                .rows
                .iter()
                .filter(|r| r.setting == *name)
                .map(|r| (r.at, r.share))
                .collect(),
        })
        .collect();
    let x_label = match s.name.as_str() {
        "switch" => "switch time TS (0 = noise, 1 = data)",
        _ => "start time T of the noised held-out image (0 = noise, 1 = data)",
    };
    line_chart(
        &Chart {
            title: &format!("study {}: {} ({} samples)", s.name, s.share_is, s.options.n),
            x_label,
            y_label: "share of samples (0 to 1)",
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.05),
            markers: &[],
        },
        &series,
    )
}

/// Writes NAME.csv, NAME.json and NAME.png into `dir`.
pub fn write_outputs(dir: &Path, s: &MixStudy) -> Result<()> {
    let png = chart(s)?;
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "study": s,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    output::write_atomic(&dir.join(format!("{}.csv", s.name)), |w| {
        writeln!(w, "setting,at,share,memorized,mean_nearest_distance")?;
        for r in &s.rows {
            writeln!(
                w,
                "{},{},{},{},{}",
                r.setting.replace(',', ";"),
                r.at,
                r.share,
                r.memorized,
                r.mean_nearest_distance
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join(format!("{}.json", s.name)), &json)?;
    save_png(&dir.join(format!("{}.png", s.name)), &png)
}
