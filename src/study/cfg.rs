//! Classifier-free guidance intervals (paper Tab. 3): where in t guidance buys class
//! consistency and where it costs diversity.
//!
//! For each setting (no guidance, and scale w on each interval) a balanced class-
//! conditional set is sampled from the same noise. Each sample's nearest training sample
//! (exact, over the whole dataset) gives: class consistency = the share whose nearest
//! training sample has the requested class; diversity = distinct nearest training samples
//! per class, averaged over classes (at most the samples per class).

use std::path::Path;

use crate::analysis::{self, Neighbours};
use crate::dataset::{Dataset, SampleShape};
use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::output;
use crate::render::{annotated_grid, save_png, Annotations, GridOptions};
use crate::sample::{self, Conditioning, Guidance, SampleOptions, Solver};
use crate::schedule::Schedule;

/// The files [`write_outputs`] writes.
pub const FILES: [&str; 3] = ["cfg.csv", "cfg.json", "cfg.png"];

/// The paper's guidance intervals, after the unguided baseline.
pub const DEFAULT_INTERVALS: [[f64; 2]; 4] = [[0.0, 1.0], [0.0, 0.1], [0.1, 0.6], [0.9, 1.0]];

#[derive(Clone, Debug, serde::Serialize)]
pub struct CfgOptions {
    /// Samples per class
    pub per_class: usize,
    pub steps: usize,
    pub solver: Solver,
    /// Guidance scale w
    pub scale: f64,
    /// Guidance intervals [t_lo, t_hi], each one setting (the unguided one comes first)
    pub intervals: Vec<[f64; 2]>,
    pub seed: u64,
    pub batch: usize,
}

impl CfgOptions {
    /// Checks the settings (before any data is loaded); returns the guidance per setting.
    pub fn settings(&self) -> Result<Vec<Option<Guidance>>> {
        sample::check_counts(self.per_class, self.batch)?;
        sample::sampling_times(&Schedule::uniform(self.steps))?;
        let mut s = vec![None];
        for iv in &self.intervals {
            s.push(Some(Guidance::new(self.scale, iv)?));
        }
        Ok(s)
    }

    /// Solver steps the study takes for `n_classes` classes (for a progress bar).
    pub fn total_steps(&self, n_classes: usize) -> usize {
        let n = self.per_class * n_classes;
        (1 + self.intervals.len()) * self.steps * n.div_ceil(self.batch)
    }
}

/// One setting's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CfgRow {
    /// "none" or "w on [t_lo, t_hi]"
    pub setting: String,
    pub guidance: Option<Guidance>,
    pub class_consistency: f64,
    /// Distinct nearest training samples per class, averaged over classes
    pub distinct_per_class: f64,
    pub memorized: f64,
    /// Share of samples whose nearest training sample is the unguided run's (from the
    /// same noise): how much the guidance changed what was generated
    pub same_as_unguided: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CfgStudy {
    pub options: CfgOptions,
    pub field: String,
    pub classes: Vec<u32>,
    pub rows: Vec<CfgRow>,
    /// Per setting, the final samples (n x D): for the picture, not for the JSON
    #[serde(skip)]
    pub samples: Vec<Vec<f32>>,
    /// The class each sample was conditioned on
    #[serde(skip)]
    pub requested: Vec<u32>,
}

fn setting_name(g: &Option<Guidance>) -> String {
    match g {
        None => "none".into(),
        Some(g) => format!("w = {} on [{}, {}]", g.scale, g.t_lo, g.t_hi),
    }
}

/// Class consistency and distinct nearest per class of one setting's samples.
pub fn score(ds: &Dataset, requested: &[u32], nb: &[Neighbours]) -> (f64, f64) {
    let labels = ds.labels().expect("checked: labelled");
    let consistent = nb
        .iter()
        .zip(requested)
        .filter(|(n, &c)| labels[n.nearest_row] == c)
        .count();
    let mut classes: Vec<u32> = requested.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let distinct: usize = classes
        .iter()
        .map(|&c| {
            let mut near: Vec<u32> = nb
                .iter()
                .zip(requested)
                .filter(|(_, &r)| r == c)
                .map(|(n, _)| n.nearest)
                .collect();
            near.sort_unstable();
            near.dedup();
            near.len()
        })
        .sum();
    (
        consistent as f64 / nb.len().max(1) as f64,
        distinct as f64 / classes.len().max(1) as f64,
    )
}

/// Samples every setting; `tick` after every solver step.
pub fn run(
    field: &mut dyn VelocityField,
    ds: &Dataset,
    opts: &CfgOptions,
    mut tick: impl FnMut(),
) -> Result<CfgStudy> {
    let settings = opts.settings()?;
    let counts = ds.class_counts();
    if counts.is_empty() {
        return Err(Error::Input(format!(
            "study cfg: dataset {} has no labels",
            ds.name
        )));
    }
    let n = opts.per_class * counts.len();
    let classes = Conditioning::Balanced.classes(ds, n)?;
    let requested: Vec<u32> = classes.iter().map(|c| c.expect("balanced")).collect();
    let mut rows = Vec::new();
    let mut samples = Vec::new();
    let mut unguided: Vec<u32> = Vec::new();
    for guidance in settings {
        let run = sample::sample(
            field,
            &SampleOptions {
                init: None,
                schedule: Schedule::uniform(opts.steps),
                solver: opts.solver,
                seed: opts.seed,
                classes: classes.clone(),
                guidance,
                batch: opts.batch,
                tracked: Vec::new(),
            },
            &mut tick,
        )?;
        let nb = analysis::nearest_two(ds, &run.samples);
        let (class_consistency, distinct_per_class) = score(ds, &requested, &nb);
        if guidance.is_none() {
            unguided = nb.iter().map(|n| n.nearest).collect();
        }
        let same = nb
            .iter()
            .zip(&unguided)
            .filter(|(a, &b)| a.nearest == b)
            .count();
        rows.push(CfgRow {
            same_as_unguided: same as f64 / n as f64,
            setting: setting_name(&guidance),
            guidance,
            class_consistency,
            distinct_per_class,
            memorized: super::nearest::memorized_share(&nb),
        });
        samples.push(run.samples);
    }
    Ok(CfgStudy {
        options: opts.clone(),
        field: field.describe(),
        classes: counts.iter().map(|c| c.0).collect(),
        rows,
        samples,
        requested,
    })
}

/// The printed table.
pub fn table(s: &CfgStudy) -> String {
    let o = &s.options;
    let mut t = format!(
        "{} classes x {} samples, {} {:?} steps\n{:<22} {:>17} {:>22} {:>10} {:>16}\n",
        s.classes.len(),
        o.per_class,
        o.steps,
        o.solver,
        "guidance",
        "class consistency",
        "distinct nearest/class",
        "memorized",
        "same as unguided"
    );
    for r in &s.rows {
        t += &format!(
            "{:<22} {:>17.3} {:>17.2} of {:<2} {:>10.3} {:>16.3}\n",
            r.setting,
            r.class_consistency,
            r.distinct_per_class,
            o.per_class,
            r.memorized,
            r.same_as_unguided
        );
    }
    t
}

/// cfg.png: one row per setting, the first `per_row_per_class` samples of each class.
pub fn picture(s: &CfgStudy, shape: &SampleShape) -> Result<image::RgbImage> {
    let dim = shape.dim();
    let per_class = s.options.per_class.min(2);
    let mut cells = Vec::new();
    let mut captions = Vec::new();
    for (row, samples) in s.rows.iter().zip(&s.samples) {
        let mut cols: Vec<Option<&[f32]>> = Vec::new();
        for &c in &s.classes {
            cols.extend(
                s.requested
                    .iter()
                    .enumerate()
                    .filter(|&(_, &r)| r == c)
                    .take(per_class)
                    .map(|(i, _)| Some(&samples[i * dim..(i + 1) * dim])),
            );
        }
        let span = cols.len();
        cells.push(cols);
        captions.push(vec![(
            0,
            span,
            format!(
                "class consistency {:.2}, distinct nearest per class {:.1} of {}, memorized {:.2}, same image as unguided {:.2}",
                row.class_consistency,
                row.distinct_per_class,
                s.options.per_class,
                row.memorized,
                row.same_as_unguided
            ),
        )]);
    }
    let column_labels: Vec<String> = s
        .classes
        .iter()
        .flat_map(|c| {
            (0..per_class).map(move |k| {
                if k == 0 {
                    format!("class {c}")
                } else {
                    String::new()
                }
            })
        })
        .collect();
    annotated_grid(
        &cells,
        shape,
        &GridOptions::for_shape(shape),
        &Annotations {
            title: Some(format!(
                "Guidance intervals: samples per requested class (rows: guidance setting, {} {:?} steps, same noise)",
                s.options.steps, s.options.solver
            )),
            column_labels,
            row_labels: s.rows.iter().map(|r| r.setting.clone()).collect(),
            captions,
            group: per_class,
            group_gap: 8,
        },
    )
}

/// Writes cfg.csv (`setting,scale,t_lo,t_hi,class_consistency,distinct_per_class,
/// samples_per_class,memorized,same_as_unguided`),
/// cfg.json and cfg.png.
pub fn write_outputs(dir: &Path, s: &CfgStudy, shape: &SampleShape) -> Result<()> {
    let png = picture(s, shape)?;
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "study": s,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    output::write_atomic(&dir.join("cfg.csv"), |w| {
        writeln!(w, "setting,scale,t_lo,t_hi,class_consistency,distinct_per_class,samples_per_class,memorized,same_as_unguided")?;
        for r in &s.rows {
            let (scale, lo, hi) = match r.guidance {
                Some(g) => (g.scale.to_string(), g.t_lo.to_string(), g.t_hi.to_string()),
                None => Default::default(),
            };
            writeln!(
                w,
                "{},{scale},{lo},{hi},{},{},{},{},{}",
                r.setting.replace(',', ";"),
                r.class_consistency,
                r.distinct_per_class,
                s.options.per_class,
                r.memorized,
                r.same_as_unguided
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join("cfg.json"), &json)?;
    save_png(&dir.join("cfg.png"), &png)
}
