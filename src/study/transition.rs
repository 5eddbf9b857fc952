//! The navigation -> refinement transition against N and D (paper: unit Gaussians, the
//! mean top-1 posterior weight saturates earlier with larger D and later with larger N).
//!
//! Per setting: the stage curve's mean top-1 weight (`analysis::stage_curve`, queries
//! x_t = alpha y + sigma x0 from training samples) on a coarse grid over [0, t_max], then
//! again on a fine grid spanning the coarse intervals where it crosses 0.5, 0.9 and 0.99
//! (the same pairs, so the two passes are one curve); the crossing times are interpolated
//! linearly on the merged grid.

use std::path::Path;

use crate::analysis::{self, StagePoint, TOP1_LEVELS};
use crate::error::{Error, Result};
use crate::oracle::Oracle;
use crate::output;
use crate::plot::{line_chart, Chart, Series};
use crate::render::save_png;

use super::{csv_opt, table_opt};

/// The files [`write_outputs`] writes.
pub const FILES: [&str; 3] = ["transition.csv", "transition.json", "transition.png"];

/// The paper's saturation times (mean top-1 weight ~1) on unit Gaussians, as (N, D, t).
pub const PAPER_SATURATION: [(usize, usize, f64); 6] = [
    (1400, 512, 0.23),
    (1400, 2048, 0.13),
    (1400, 8192, 0.10),
    (100, 1024, 0.15),
    (1000, 1024, 0.17),
    (10000, 1024, 0.19),
];

/// The paper's saturation time for (N, D), where it reports one.
pub fn paper_saturation(n: usize, d: usize) -> Option<f64> {
    PAPER_SATURATION
        .iter()
        .find(|&&(pn, pd, _)| pn == n && pd == d)
        .map(|&(_, _, t)| t)
}

/// How each setting's curve is sampled.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TransitionOptions {
    /// (training sample, noise) pairs averaged at each time
    pub pairs: usize,
    pub seed: u64,
    /// Last time of the grid (< 1)
    pub t_max: f64,
    /// Spacing of the first pass over [0, t_max]
    pub coarse_step: f64,
    /// Spacing of the second pass around the crossings
    pub fine_step: f64,
}

impl TransitionOptions {
    /// Checks the settings (before any data is loaded).
    pub fn check(&self) -> Result<()> {
        if self.pairs == 0 {
            return Err(Error::Input("--pairs must be at least 1".into()));
        }
        if !(self.t_max > 0.0 && self.t_max < 1.0) {
            return Err(Error::Input(format!(
                "--t-max {} must lie in (0, 1)",
                self.t_max
            )));
        }
        if !(self.fine_step > 0.0 && self.fine_step <= self.coarse_step) {
            return Err(Error::Input(format!(
                "--fine-step {} must be > 0 and at most --coarse-step {}",
                self.fine_step, self.coarse_step
            )));
        }
        if self.coarse_step > self.t_max {
            return Err(Error::Input(format!(
                "--coarse-step {} is longer than --t-max {}",
                self.coarse_step, self.t_max
            )));
        }
        Ok(())
    }

    /// The first pass's grid: 0, coarse_step, ..., and t_max.
    pub fn coarse_times(&self) -> Vec<f64> {
        grid(0.0, self.t_max, self.coarse_step)
    }
}

/// `lo, lo + step, ...` up to and including `hi` (the last interval may be shorter).
fn grid(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let n = ((hi - lo) / step - 1e-9).ceil().max(0.0) as usize;
    let mut t: Vec<f64> = (0..n).map(|i| lo + i as f64 * step).collect();
    t.push(hi);
    t
}

/// The fine grid: from the start of the first coarse interval where the mean top-1 weight
/// crosses any level to the end of the last such interval, at `fine_step`, without the
/// coarse times already measured. Empty when no level is crossed inside the grid.
pub fn fine_times(coarse: &[StagePoint], fine_step: f64) -> Vec<f64> {
    let brackets: Vec<(f64, f64)> = TOP1_LEVELS
        .iter()
        .filter_map(|&level| {
            let i = coarse.iter().position(|p| p.mean_top1_weight >= level)?;
            (i > 0).then(|| (coarse[i - 1].t, coarse[i].t))
        })
        .collect();
    let Some(lo) = brackets.iter().map(|b| b.0).reduce(f64::min) else {
        return Vec::new();
    };
    let hi = brackets.iter().map(|b| b.1).fold(lo, f64::max);
    grid(lo, hi, fine_step)
        .into_iter()
        .filter(|t| coarse.iter().all(|p| (p.t - t).abs() > 1e-9))
        .collect()
}

/// One setting's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TransitionResult {
    /// The dataset spec
    pub data: String,
    pub n: usize,
    pub d: usize,
    /// The oracle's description (backend)
    pub backend: String,
    /// First times the mean top-1 weight reaches 0.5, 0.9, 0.99
    pub crossings: [Option<f64>; 3],
    /// The paper's saturation time for this (N, D), where it reports one
    pub paper_saturation: Option<f64>,
    /// The merged coarse and fine grid, ascending
    pub curve: Vec<StagePoint>,
}

/// What a setting's progress reports: more work was found (`Grow`), or one time is done.
pub enum Tick {
    Grow(usize),
    Done,
}

/// Measures one setting: the coarse pass, then the fine pass around the crossings.
pub fn measure(
    oracle: &mut Oracle<'_>,
    opts: &TransitionOptions,
    data: &str,
    mut tick: impl FnMut(Tick),
) -> Result<TransitionResult> {
    opts.check()?;
    let coarse_t = opts.coarse_times();
    tick(Tick::Grow(coarse_t.len()));
    let mut curve = analysis::stage_curve(oracle, &coarse_t, opts.pairs, opts.seed, || {
        tick(Tick::Done)
    })?;
    let fine_t = fine_times(&curve, opts.fine_step);
    if !fine_t.is_empty() {
        tick(Tick::Grow(fine_t.len()));
        curve.extend(analysis::stage_curve(
            oracle,
            &fine_t,
            opts.pairs,
            opts.seed,
            || tick(Tick::Done),
        )?);
        curve.sort_by(|a, b| a.t.total_cmp(&b.t));
    }
    let ds = oracle.dataset();
    Ok(TransitionResult {
        data: data.to_string(),
        n: ds.n_samples(),
        d: ds.dim(),
        backend: oracle.describe(),
        crossings: analysis::top1_crossings(&curve),
        paper_saturation: paper_saturation(ds.n_samples(), ds.dim()),
        curve,
    })
}

/// The table printed at the end: ours beside the paper's saturation time.
pub fn table(results: &[TransitionResult]) -> String {
    let mut s = format!(
        "{:>7} {:>6}  {:>9} {:>9} {:>9}  {:>15}\n",
        "N", "D", "t(0.5)", "t(0.9)", "t(0.99)", "paper t(sat.)"
    );
    for r in results {
        let [a, b, c] = r.crossings;
        s += &format!(
            "{:>7} {:>6}  {:>9} {:>9} {:>9}  {:>15}\n",
            r.n,
            r.d,
            table_opt(a, 3),
            table_opt(b, 3),
            table_opt(c, 3),
            table_opt(r.paper_saturation, 2)
        );
    }
    s
}

fn setting_name(r: &TransitionResult) -> String {
    if r.data.starts_with("gaussian:") {
        format!("N = {}, D = {}", r.n, r.d)
    } else {
        format!("{} (N = {}, D = {})", r.data, r.n, r.d)
    }
}

/// transition.png: mean top-1 weight against t, one curve per setting.
pub fn chart(opts: &TransitionOptions, results: &[TransitionResult]) -> Result<image::RgbImage> {
    let names: Vec<String> = results.iter().map(setting_name).collect();
    let series: Vec<Series> = results
        .iter()
        .zip(&names)
        .map(|(r, name)| Series {
            name,
            points: r.curve.iter().map(|p| (p.t, p.mean_top1_weight)).collect(),
        })
        .collect();
    line_chart(
        &Chart {
            title: &format!(
                "Navigation -> refinement: mean top-1 posterior weight ({} pairs per time)",
                opts.pairs
            ),
            x_label: "t (dimensionless; 0 = noise, 1 = data)",
            y_label: "mean top-1 weight (0 to 1)",
            x_range: (0.0, opts.t_max),
            y_range: (0.0, 1.05),
            markers: &[],
        },
        &series,
    )
}

/// transition.json: settings, the paper's reference values, and per setting the crossing
/// times and the whole curve.
pub fn json(
    opts: &TransitionOptions,
    path: crate::Path,
    results: &[TransitionResult],
) -> serde_json::Value {
    let settings: Vec<_> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "data": r.data, "n": r.n, "d": r.d, "backend": r.backend,
                "t_top1_0.5": r.crossings[0], "t_top1_0.9": r.crossings[1],
                "t_top1_0.99": r.crossings[2],
                "paper_saturation": r.paper_saturation,
                "curve": r.curve,
            })
        })
        .collect();
    let paper: Vec<_> = PAPER_SATURATION
        .iter()
        .map(|&(n, d, t)| serde_json::json!({ "n": n, "d": d, "saturation_t": t }))
        .collect();
    serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "path": path,
        "options": opts,
        "levels": TOP1_LEVELS,
        "paper_reference": {
            "source": "From Navigation to Refinement, unit Gaussians: time at which the mean top-1 weight saturates (~1)",
            "settings": paper,
        },
        "settings": settings,
    })
}

/// Writes transition.csv (one row per setting: `n,d,t_top1_0.5,t_top1_0.9,t_top1_0.99`,
/// an empty cell where the level is not reached by t_max), transition.json and
/// transition.png.
pub fn write_outputs(
    dir: &Path,
    opts: &TransitionOptions,
    path: crate::Path,
    results: &[TransitionResult],
) -> Result<()> {
    let png = chart(opts, results)?;
    let json = json(opts, path, results);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    output::write_atomic(&dir.join("transition.csv"), |w| {
        writeln!(w, "n,d,t_top1_0.5,t_top1_0.9,t_top1_0.99")?;
        for r in results {
            let [a, b, c] = r.crossings;
            writeln!(
                w,
                "{},{},{},{},{}",
                r.n,
                r.d,
                csv_opt(a),
                csv_opt(b),
                csv_opt(c)
            )?;
        }
        Ok(())
    })?;
    output::write_json(&dir.join("transition.json"), &json)?;
    save_png(&dir.join("transition.png"), &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(t: f64, v: f64) -> StagePoint {
        StagePoint {
            t,
            mean_top1_weight: v,
            ..Default::default()
        }
    }

    #[test]
    fn grids() {
        let g = grid(0.0, 0.5, 0.02);
        assert_eq!(g.len(), 26);
        assert!((g[25] - 0.5).abs() < 1e-12 && (g[24] - 0.48).abs() < 1e-12);
        let g = grid(0.0, 0.05, 0.02);
        assert_eq!(g, vec![0.0, 0.02, 0.04, 0.05]);
        // Brackets of 0.5 (0.1..0.2) and 0.9, 0.99 (0.2..0.3): fine grid over 0.1..0.3.
        let coarse = [
            pt(0.0, 0.0),
            pt(0.1, 0.2),
            pt(0.2, 0.6),
            pt(0.3, 1.0),
            pt(0.4, 1.0),
        ];
        let f = fine_times(&coarse, 0.05);
        assert_eq!(f.len(), 2);
        assert!((f[0] - 0.15).abs() < 1e-12 && (f[1] - 0.25).abs() < 1e-12);
        assert!(fine_times(&coarse[..2], 0.05).is_empty());
    }
}
