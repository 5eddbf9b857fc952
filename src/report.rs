//! The files a sampling run leaves behind: pictures (PNG), arrays (.npy) and numbers
//! (run.json, steps.csv). Everything is computed first and written last, each file atomically.

use std::path::Path;

use crate::analysis::Neighbours;
use crate::dataset::{npy, Dataset};
use crate::error::{Error, Result};
use crate::oracle::QueryStats;
use crate::output;
use crate::plot::{line_chart, Chart, Series};
use crate::render::{
    annotated_grid, save_png, stack_vertical, tile_grid, Annotations, GridOptions,
};
use crate::sample::{Conditioning, Guidance, SampleRun, Solver};

const T_AXIS: &str = "t (0 = noise, 1 = data)";

/// A marker where the mean top-1 weight first reaches 0.5: navigation gives way to refinement.
fn transition_marker(t_half: Option<f64>) -> Option<(f64, String)> {
    t_half.map(|t| (t, format!("top-1 weight 0.5 at t = {t:.3}")))
}

/// Drops non-finite points: fields without posterior statistics report NaN for them.
fn finite_only<'a, const K: usize>(series: [Series<'a>; K]) -> Vec<Series<'a>> {
    series
        .into_iter()
        .map(|s| Series {
            name: s.name,
            points: s.points.into_iter().filter(|p| p.1.is_finite()).collect(),
        })
        .collect()
}

/// The files `write_sample_outputs` writes into the output directory.
pub const SAMPLE_FILES: [&str; 7] = [
    "samples.png",
    "samples.npy",
    "trajectory.png",
    "nearest.png",
    "stages.png",
    "run.json",
    "steps.csv",
];

/// Columns of the trajectory picture: the grid indices whose times are closest to
/// `columns` evenly spaced times in [0, 1] (always including t = 0 and t = 1).
pub fn trajectory_columns(times: &[f64], columns: usize) -> Vec<usize> {
    // A run that starts at t = 1 (`--t-start 1`) has one time.
    let columns = columns.clamp(2, times.len().max(2));
    let mut picked: Vec<usize> = (0..columns)
        .map(|c| {
            let target = c as f64 / (columns - 1) as f64;
            (0..times.len())
                .min_by(|&a, &b| {
                    (times[a] - target)
                        .abs()
                        .total_cmp(&(times[b] - target).abs())
                })
                .unwrap()
        })
        .collect();
    picked.dedup();
    picked
}

/// The two stages over t: mean top-1 weight, share of samples past 0.5, and the entropy
/// relative to a uniform posterior over the whole dataset; a marker where the mean
/// top-1 weight first reaches 0.5 (navigation gives way to refinement).
pub fn stages_chart(run: &SampleRun, n_dataset: usize) -> Result<image::RgbImage> {
    let ln_n = (n_dataset.max(2) as f64).ln();
    let curve = |f: fn(&crate::sample::StepSummary) -> f64| -> Vec<(f64, f64)> {
        run.steps.iter().map(|s| (s.t, f(s))).collect()
    };
    let entropy: Vec<(f64, f64)> = run
        .steps
        .iter()
        .map(|s| (s.t, s.mean_entropy / ln_n))
        .collect();
    let series = [
        Series {
            name: "mean top-1 weight",
            points: curve(|s| s.mean_top1_weight),
        },
        Series {
            name: "share with top-1 weight > 0.5",
            points: curve(|s| s.frac_top1_above_half),
        },
        Series {
            name: "mean entropy / ln N",
            points: entropy,
        },
    ];
    let top1: Vec<(f64, f64)> = run
        .steps
        .iter()
        .map(|s| (s.t, s.mean_top1_weight))
        .collect();
    let marker = transition_marker(crate::analysis::crossing(&top1, 0.5));
    let markers: Vec<(f64, &str)> = marker.iter().map(|(t, l)| (*t, l.as_str())).collect();
    line_chart(
        &Chart {
            title: &format!("Navigation, then refinement (N = {n_dataset})"),
            x_label: T_AXIS,
            y_label: "fraction (0 to 1)",
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.05),
            markers: &markers,
        },
        &finite_only(series),
    )
}

/// The settings of a sampling run, as run.json records them under "sampling".
#[derive(Clone, Debug, serde::Serialize)]
pub struct SamplingSettings {
    pub n: usize,
    pub solver: Solver,
    pub steps: usize,
    pub shift: f64,
    pub times: Vec<f64>,
    pub seed: u64,
    pub batch: usize,
    /// `--class K`
    pub class: Option<u32>,
    /// `--classes all`
    pub classes: Option<&'static str>,
    pub guidance: Option<Guidance>,
    /// `--field` (and what it resolved to)
    pub field: String,
    /// `--switch-at TS --then FIELD`
    pub switch_at: Option<f64>,
    pub then: Option<String>,
    /// `--init-from SPEC --t-start T`
    pub init_from: Option<String>,
    pub t_start: Option<f64>,
}

impl SamplingSettings {
    pub fn set_conditioning(&mut self, conditioning: Conditioning) {
        (self.class, self.classes) = match conditioning {
            Conditioning::Unconditional => (None, None),
            Conditioning::Class(c) => (Some(c), None),
            Conditioning::Balanced => (None, Some("all")),
        };
    }
}

/// The field that was integrated, as run.json records it under "oracle".
#[derive(Clone, Debug, serde::Serialize)]
pub struct FieldRecord {
    /// The oracle backend, where the field has an oracle in it
    pub backend: Option<crate::oracle::BackendKind>,
    pub description: String,
    pub path: crate::Path,
}

/// run.json of a sampling run: every setting, the backend, timings, per-step means and,
/// per sample, its class, nearest training sample and whether it is memorized.
pub fn sample_run_json(
    ds: &Dataset,
    field: &FieldRecord,
    settings: &SamplingSettings,
    run: &SampleRun,
    classes: &[Option<u32>],
    neighbours: &[Neighbours],
    sampling_seconds: f64,
) -> serde_json::Value {
    let memorized = neighbours.iter().filter(|nb| nb.memorized()).count();
    let per_sample: Vec<_> = neighbours
        .iter()
        .enumerate()
        .map(|(i, nb)| {
            serde_json::json!({
                "class": classes[i],
                "nearest": nb.nearest,
                "distance": nb.distance,
                "second_distance": nb.second_distance,
                "memorized": nb.memorized(),
                "last_step": run.final_stats[i],
            })
        })
        .collect();
    serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "data": { "spec": ds.name, "n_samples": ds.n_samples(), "shape": ds.shape, "dtype": ds.dtype() },
        "oracle": field,
        "sampling": settings,
        "timings": {
            "sampling_seconds": sampling_seconds,
            "oracle_evaluations": run.evaluations,
            "seconds_per_evaluation": sampling_seconds / run.evaluations.max(1) as f64,
        },
        "memorized": { "count": memorized, "of": neighbours.len(), "criterion": "d(nearest) / d(second nearest) < 1/3" },
        "steps": run.steps,
        "samples": per_sample,
    })
}

/// Per-query stats of `velocity --stats`: one CSV row per query.
pub fn write_query_stats_csv(path: &Path, times: &[f32], stats: &[QueryStats]) -> Result<()> {
    output::write_atomic(path, |w| {
        writeln!(
            w,
            "query,t,top1_weight,top1_index,entropy,ess,posterior_variance,\
             skipped_mass_bound,tiles_skipped,samples_skipped"
        )?;
        for (q, s) in stats.iter().enumerate() {
            writeln!(
                w,
                "{q},{},{},{},{},{},{},{},{},{}",
                times[q],
                s.top1_weight,
                s.top1_index,
                s.entropy,
                s.ess,
                s.posterior_variance,
                s.skipped_mass_bound,
                s.tiles_skipped,
                s.samples_skipped
            )?;
        }
        Ok(())
    })
}

/// nearest.png of a sampling run: compact (sample, nearest training sample) pairs, eight
/// to a row, with d(nearest) / d(second nearest) under each pair (< 1/3: memorized).
pub fn nearest_pairs_picture(
    ds: &Dataset,
    samples: &[&[f32]],
    neighbours: &[Neighbours],
    opts: &GridOptions,
) -> Result<image::RgbImage> {
    let nearest: Vec<Vec<f32>> = neighbours
        .iter()
        .map(|nb| ds.sample(nb.nearest_row))
        .collect();
    let per_row = 8.min(samples.len().max(1));
    let mut cells = Vec::new();
    let mut captions = Vec::new();
    for (s, nb) in samples
        .chunks(per_row)
        .zip(neighbours.chunks(per_row).zip(nearest.chunks(per_row)))
    {
        let (nbs, imgs) = nb;
        cells.push(
            s.iter()
                .zip(imgs)
                .flat_map(|(s, y)| [Some(*s), Some(y.as_slice())])
                .collect::<Vec<_>>(),
        );
        captions.push(
            nbs.iter()
                .enumerate()
                .map(|(k, nb)| {
                    let ratio = nb.distance / nb.second_distance.max(1e-300);
                    let mark = if nb.memorized() { " (mem.)" } else { "" };
                    (2 * k, 2, format!("d1/d2 = {ratio:.2}{mark}"))
                })
                .collect(),
        );
    }
    annotated_grid(
        &cells,
        &ds.shape,
        opts,
        &Annotations {
            title: Some(
                "Pairs: sample | its nearest training sample. d1/d2: distance to the nearest / to the second nearest (< 1/3: memorized)"
                    .into(),
            ),
            column_labels: Vec::new(),
            row_labels: Vec::new(),
            captions,
            group: 2,
            group_gap: 14,
        },
    )
}

/// Writes samples.png, samples.npy, trajectory.png, nearest.png, stages.png, steps.csv
/// and run.json.
pub fn write_sample_outputs(
    dir: &Path,
    ds: &Dataset,
    run: &SampleRun,
    neighbours: &[Neighbours],
    columns: usize,
    run_json: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dim = ds.dim();
    let shape = &ds.shape;
    let opts = GridOptions::for_shape(shape);
    let n = run.samples.len() / dim;
    let samples: Vec<&[f32]> = run.samples.chunks(dim).collect();
    let cols = (n as f64).sqrt().ceil() as usize;

    // Build every picture before writing any file.
    let samples_png = tile_grid(&samples, shape, cols, &opts);

    let picked = trajectory_columns(&run.times, columns);
    let rows =
        |field: fn(&crate::sample::Trajectory) -> &Vec<Vec<f32>>| -> Vec<Vec<Option<&[f32]>>> {
            run.trajectories
                .iter()
                .map(|tr| {
                    picked
                        .iter()
                        .map(|&i| Some(field(tr)[i].as_slice()))
                        .collect()
                })
                .collect()
        };
    let x_rows = rows(|tr| &tr.x);
    let hat_rows = rows(|tr| &tr.x1_hat);
    let t_labels: Vec<String> = picked
        .iter()
        .map(|&i| format!("t = {:.2}", run.times[i]))
        .collect();
    let band = |cells: &[Vec<Option<&[f32]>>], title: &str| {
        annotated_grid(
            cells,
            shape,
            &opts,
            &Annotations {
                title: Some(title.to_string()),
                column_labels: t_labels.clone(),
                row_labels: run
                    .trajectories
                    .iter()
                    .map(|tr| format!("#{}", tr.sample))
                    .collect(),
                ..Annotations::default()
            },
        )
    };
    let trajectory_png = stack_vertical(
        &[
            band(&x_rows, "x_t: the state along the path (rows: samples)")?,
            band(
                &hat_rows,
                "x1_hat: the posterior mean E[x1 | x_t] at the same times",
            )?,
        ],
        4 * opts.pad.max(2),
        [90, 90, 90],
    );

    let nearest_png = nearest_pairs_picture(ds, &samples, neighbours, &opts)?;
    let stages_png = stages_chart(run, ds.n_samples())?;

    let mut sample_shape = vec![n];
    sample_shape.extend(&shape.dims);
    npy::write_npy_f32(dir.join("samples.npy"), &sample_shape, &run.samples)?;
    save_png(&dir.join("samples.png"), &samples_png)?;
    save_png(&dir.join("trajectory.png"), &trajectory_png)?;
    save_png(&dir.join("nearest.png"), &nearest_png)?;
    save_png(&dir.join("stages.png"), &stages_png)?;
    output::write_atomic(&dir.join("steps.csv"), |w| {
        writeln!(
            w,
            "step,t,mean_top1_weight,mean_entropy,mean_ess,frac_top1_above_half,mean_posterior_variance"
        )?;
        for (i, s) in run.steps.iter().enumerate() {
            writeln!(
                w,
                "{i},{},{},{},{},{},{}",
                s.t,
                s.mean_top1_weight,
                s.mean_entropy,
                s.mean_ess,
                s.frac_top1_above_half,
                s.mean_posterior_variance
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join("run.json"), run_json)
}

/// The files `write_stage_outputs` writes.
pub const STAGE_FILES: [&str; 3] = ["stages.png", "stages.csv", "stages.json"];

/// One dataset's stage curve, as `oracleflow stages` measured it.
pub struct StageResult {
    pub data: String,
    pub n_samples: usize,
    pub dim: usize,
    /// The oracle's description (backend)
    pub backend: String,
    /// `--queries-from`: the spec the y_j of x_t came from, when not the training set
    pub queries_from: Option<String>,
    /// `--class`: the class-conditional posterior of that class
    pub class: Option<u32>,
    pub curve: Vec<crate::analysis::StagePoint>,
}

impl StageResult {
    fn series(&self, f: fn(&crate::analysis::StagePoint) -> f64) -> Vec<(f64, f64)> {
        self.curve.iter().map(|p| (p.t, f(p))).collect()
    }

    /// Times at which the mean top-1 weight reaches 0.5 and 0.99.
    pub fn crossings(&self) -> (Option<f64>, Option<f64>) {
        let [t50, _, t99] = self.crossing_times();
        (t50, t99)
    }

    /// Times at which the mean top-1 weight reaches each of `analysis::TOP1_LEVELS`.
    pub fn crossing_times(&self) -> [Option<f64>; 3] {
        crate::analysis::top1_crossings(&self.curve)
    }
}

/// One dataset: all its curves on [0, 1]. Several: the mean top-1 weight of each (the
/// scaling study: how the transition moves with N and D).
pub fn stages_comparison_chart(results: &[StageResult]) -> Result<image::RgbImage> {
    let t_max = results
        .iter()
        .flat_map(|r| r.curve.last().map(|p| p.t))
        .fold(0.0, f64::max);
    let x_range = (0.0, t_max.max(1e-3));
    if let [r] = results {
        let d0 = r
            .curve
            .first()
            .map_or(1.0, |p| p.target_difference)
            .max(1e-30);
        let ln_n = (r.n_samples.max(2) as f64).ln();
        let marker = transition_marker(r.crossings().0);
        let markers: Vec<(f64, &str)> = marker.iter().map(|(t, l)| (*t, l.as_str())).collect();
        let series = [
            Series {
                name: "mean top-1 weight",
                points: r.series(|p| p.mean_top1_weight),
            },
            match r.queries_from {
                None => Series {
                    name: "top-1 is the sample x_t came from",
                    points: r.series(|p| p.own_sample_rate),
                },
                Some(_) => Series {
                    name: "top-1 is the query's nearest training sample",
                    points: r.series(|p| p.nearest_rate),
                },
            },
            Series {
                name: "mean entropy / ln N",
                points: r
                    .curve
                    .iter()
                    .map(|p| (p.t, p.mean_entropy / ln_n))
                    .collect(),
            },
            Series {
                name: "target difference / its value at t = 0",
                points: r
                    .curve
                    .iter()
                    .map(|p| (p.t, p.target_difference / d0))
                    .collect(),
            },
        ];
        line_chart(
            &Chart {
                title: &format!(
                    "{}{} (N = {}, D = {}){}",
                    r.data,
                    r.class.map_or(String::new(), |c| format!(", class {c}")),
                    r.n_samples,
                    r.dim,
                    r.queries_from
                        .as_ref()
                        .map_or(String::new(), |q| format!(", x_t built from {q}"))
                ),
                x_label: T_AXIS,
                y_label: "fraction (0 to 1)",
                x_range,
                y_range: (0.0, 1.05),
                markers: &markers,
            },
            &finite_only(series),
        )
    } else {
        let series: Vec<Series> = results
            .iter()
            .map(|r| Series {
                name: &r.data,
                points: r.series(|p| p.mean_top1_weight),
            })
            .collect();
        line_chart(
            &Chart {
                title: "Mean top-1 posterior weight along the path",
                x_label: T_AXIS,
                y_label: "mean top-1 weight",
                x_range,
                y_range: (0.0, 1.05),
                markers: &[],
            },
            &series,
        )
    }
}

/// The settings of a stage-curve run, as stages.json records them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageSettings {
    pub path: crate::Path,
    pub pairs: usize,
    pub seed: u64,
    pub times: Vec<f64>,
}

/// stages.json: the settings, and per dataset its crossings and curve.
pub fn stages_json(settings: &StageSettings, results: &[StageResult]) -> serde_json::Value {
    let datasets: Vec<_> = results
        .iter()
        .map(|r| {
            let [t50, t90, t99] = r.crossing_times();
            serde_json::json!({
                "data": r.data, "n_samples": r.n_samples, "dim": r.dim,
                "backend": r.backend, "t_top1_half": t50, "t_top1_saturated": t99,
                "curve": r.curve,
                "t_top1_0.9": t90,
                "queries_from": r.queries_from,
                "class": r.class,
                "nearest_rate_at_t_max": r.curve.last().map(|p| p.nearest_rate),
            })
        })
        .collect();
    serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "path": settings.path, "pairs": settings.pairs, "seed": settings.seed,
        "times": settings.times,
        "saturation_level": 0.99,
        "datasets": datasets,
    })
}

/// Writes stages.png, stages.csv (one row per dataset and time) and stages.json.
pub fn write_stage_outputs(
    dir: &Path,
    settings: &StageSettings,
    results: &[StageResult],
) -> Result<()> {
    let json = stages_json(settings, results);
    let chart = stages_comparison_chart(results)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save_png(&dir.join("stages.png"), &chart)?;
    output::write_atomic(&dir.join("stages.csv"), |w| {
        writeln!(w, "data,n_samples,dim,t,mean_top1_weight,own_sample_rate,mean_entropy,mean_ess,target_difference,nearest_rate,mean_posterior_variance")?;
        for r in results {
            for p in &r.curve {
                writeln!(
                    w,
                    "{},{},{},{},{},{},{},{},{},{},{}",
                    r.data,
                    r.n_samples,
                    r.dim,
                    p.t,
                    p.mean_top1_weight,
                    p.own_sample_rate,
                    p.mean_entropy,
                    p.mean_ess,
                    p.target_difference,
                    p.nearest_rate,
                    p.mean_posterior_variance
                )?;
            }
        }
        Ok(())
    })?;
    output::write_json(&dir.join("stages.json"), &json)
}
