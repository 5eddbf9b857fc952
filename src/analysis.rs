//! What the samples turned out to be: nearest training samples and memorization.

use rayon::prelude::*;

use crate::dataset::Dataset;

/// The two nearest training samples of one point (Euclidean, user coordinates).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Neighbours {
    /// Source index of the nearest training sample
    pub nearest: u32,
    /// Stored row of the nearest sample (for `Dataset::sample`)
    #[serde(skip)]
    pub nearest_row: usize,
    pub distance: f64,
    /// Source index of the second nearest (equals `nearest` when N = 1)
    pub second: u32,
    /// Stored row of the second nearest
    #[serde(skip)]
    pub second_row: usize,
    pub second_distance: f64,
}

impl Neighbours {
    /// Gu et al.'s criterion: memorized when d(nearest) / d(second nearest) < 1/3.
    pub fn memorized(&self) -> bool {
        self.distance < self.second_distance / 3.0
    }
}

/// Extra candidates kept per point, beyond the k wanted, from the f32 screening pass
/// before exact refinement (8 in all for the nearest two).
const SCREEN_MARGIN: usize = 6;
/// Dataset rows per screening tile.
const SCREEN_ROWS: usize = 1024;

/// The two nearest training samples of each point (n x D, user coordinates); see
/// [`nearest_k`].
pub fn nearest_two(ds: &Dataset, points: &[f32]) -> Vec<Neighbours> {
    nearest_two_in(ds, points, 0..ds.n_samples())
}

/// [`nearest_two`] among the stored rows `rows` only (e.g. one class's,
/// `Dataset::rows_for`). `rows` must not be empty.
pub fn nearest_two_in(
    ds: &Dataset,
    points: &[f32],
    rows: std::ops::Range<usize>,
) -> Vec<Neighbours> {
    nearest_k_in(ds, points, 2, rows)
        .into_iter()
        .map(|near| {
            let best = near[0];
            let second = *near.get(1).unwrap_or(&best);
            Neighbours {
                nearest: ds.original_index(best.0),
                nearest_row: best.0,
                distance: best.1,
                second: ds.original_index(second.0),
                second_row: second.0,
                second_distance: second.1,
            }
        })
        .collect()
}

/// The `k` nearest training samples of each point (n x D, user coordinates): per point,
/// min(k, N) pairs (stored row, Euclidean distance), nearest first (ties: lower row first).
///
/// Two passes, as docs/DESIGN.md §2 suggests for precision: a fast screen ranks every row by
/// |y|^2 - 2 p.y (one GEMM per tile, f32, rows split across threads) and keeps the
/// `k + SCREEN_MARGIN` best rows per point; then the distances of those candidates are
/// recomputed exactly by direct differences in f64. The expanded form alone would lose
/// the small distances that matter here (a memorized sample sits at distance ~0).
pub fn nearest_k(ds: &Dataset, points: &[f32], k: usize) -> Vec<Vec<(usize, f64)>> {
    nearest_k_in(ds, points, k, 0..ds.n_samples())
}

/// [`nearest_k`] among the stored rows `rows` only.
pub fn nearest_k_in(
    ds: &Dataset,
    points: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
) -> Vec<Vec<(usize, f64)>> {
    let dim = ds.dim();
    let n = points.len() / dim;
    if n == 0 || k == 0 {
        return vec![Vec::new(); n];
    }
    let keep = k + SCREEN_MARGIN;
    let mean = ds.mean();
    // Centred points, to compare with the stored (centred) rows.
    let centred: Vec<f32> = points
        .chunks(dim)
        .flat_map(|p| p.iter().zip(mean).map(|(&a, &m)| a - m))
        .collect();
    let blocks = rayon::current_num_threads().max(1);
    let per_block = rows.len().div_ceil(blocks).div_ceil(SCREEN_ROWS) * SCREEN_ROWS;
    let partial: Vec<Vec<Vec<(f32, usize)>>> = rows
        .clone()
        .step_by(per_block.max(1))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| screen(ds, &centred, start..(start + per_block).min(rows.end), keep))
        .collect();

    (0..n)
        .into_par_iter()
        .map(|q| {
            // Exact distances in f64: |p - y| = |(p - mean) - stored|.
            let pc: Vec<f64> = points[q * dim..(q + 1) * dim]
                .iter()
                .zip(mean)
                .map(|(&a, &m)| a as f64 - m as f64)
                .collect();
            let mut row = vec![0.0f32; dim];
            let mut exact: Vec<(f64, usize)> = partial
                .iter()
                .flat_map(|block| block[q].iter().map(|&(_, r)| r))
                .map(|r| {
                    ds.stored_row(r, &mut row);
                    let d2: f64 = pc
                        .iter()
                        .zip(&row)
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum();
                    (d2, r)
                })
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            exact.truncate(k);
            exact.into_iter().map(|(d2, r)| (r, d2.sqrt())).collect()
        })
        .collect()
}

/// The screening pass over `rows`: per point, the `keep` rows with the smallest
/// |y|^2 - 2 p.y (ascending).
fn screen(
    ds: &Dataset,
    centred: &[f32],
    rows: std::ops::Range<usize>,
    keep: usize,
) -> Vec<Vec<(f32, usize)>> {
    use crate::oracle::cpu::{sgemm, stored_rows_f32, Gemm};
    let dim = ds.dim();
    let n = centred.len() / dim;
    let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::with_capacity(keep + 1); n];
    let mut dots = vec![0.0f32; n * SCREEN_ROWS];
    let mut scratch = Vec::new();
    for start in rows.clone().step_by(SCREEN_ROWS) {
        let tile = start..(start + SCREEN_ROWS).min(rows.end);
        let nt = tile.len();
        let y = stored_rows_f32(ds, tile.clone(), &mut scratch);
        let s = &mut dots[..n * nt];
        sgemm(
            Gemm {
                m: n,
                n: nt,
                k: dim,
            },
            s,
            false,
            (centred, dim, 1),
            (y, 1, dim),
        );
        for (q, scores) in s.chunks_exact(nt).enumerate() {
            let list = &mut best[q];
            for (j, (&dot, &norm)) in scores.iter().zip(&ds.sq_norms()[tile.clone()]).enumerate() {
                let score = norm - 2.0 * dot;
                if list.len() < keep || score < list[list.len() - 1].0 {
                    let at = list.partition_point(|&(v, _)| v <= score);
                    list.insert(at, (score, tile.start + j));
                    list.truncate(keep);
                }
            }
        }
    }
    best
}

/// The posterior along the path at one time, averaged over (training sample, noise) pairs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StagePoint {
    pub t: f64,
    pub mean_top1_weight: f64,
    /// Share of queries whose top-1 sample is the one x_t was built from
    pub own_sample_rate: f64,
    pub mean_entropy: f64,
    pub mean_ess: f64,
    /// Mean tr Cov_w(y) / D of the posterior (NaN, like the other posterior stats, for a
    /// field without them)
    pub mean_posterior_variance: f64,
    /// |u_cond - u*(x_t, t)|^2 / D averaged over pairs, where u_cond = alpha' y + sigma' x0
    /// is the conditional (training) target: how far the exact marginal velocity is from
    /// what a flow-matching loss regresses on (paper Fig. 2a). At t = 0 on the rf path
    /// (x_t = x0, u* = mean - x0, u_cond = y - x0) it is |y - mean|^2 / D averaged over the
    /// pairs: the dataset's total variance / D in expectation.
    pub target_difference: f64,
    /// Share of queries whose top-1 sample is the nearest training sample of the sample
    /// x_t was built from (for training queries: that sample itself, up to duplicates)
    pub nearest_rate: f64,
}

/// The grid of a stage curve: `steps` equal intervals on [0, t_max], t_max < 1.
pub fn stage_times(steps: usize, t_max: f64) -> crate::error::Result<Vec<f64>> {
    if steps == 0 {
        return Err(crate::error::Error::Input(
            "--steps must be at least 1".into(),
        ));
    }
    if !(t_max > 0.0 && t_max < 1.0) {
        return Err(crate::error::Error::Input(format!(
            "--t-max {t_max} must lie in (0, 1)"
        )));
    }
    Ok((0..=steps)
        .map(|i| t_max * i as f64 / steps as f64)
        .collect())
}

/// The (training row, noise index) pairs of a stage curve: `n_pairs` rows drawn uniformly
/// (with replacement) from `0..n_rows` by ChaCha8 seeded with `seed`; pair k's noise is
/// `sample::initial_noise(seed, k, D)`. Public so a test can rebuild the same queries.
pub fn stage_pairs(seed: u64, n_pairs: usize, n_rows: usize) -> Vec<usize> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n_pairs).map(|_| rng.random_range(0..n_rows)).collect()
}

/// The stage curve of a dataset: at each time of `times` (each < 1), `n_pairs` queries
/// x_t = alpha y_j + sigma x0 built from random training samples y_j and noise x0 (the
/// same pairs at every time, fixed by `seed`, see [`stage_pairs`]), through the oracle.
pub fn stage_curve(
    oracle: &mut crate::oracle::Oracle<'_>,
    times: &[f64],
    n_pairs: usize,
    seed: u64,
    tick: impl FnMut(),
) -> crate::error::Result<Vec<StagePoint>> {
    stage_curve_from(oracle, times, n_pairs, seed, None, None, tick)
}

/// [`stage_curve`] with the y_j drawn from `queries` (e.g. a held-out test set) when given,
/// instead of from the training set. The posterior can then not pick y_j itself: late in
/// the path it settles on y_j's nearest training sample, which `nearest_rate` tracks
/// (`own_sample_rate` is NaN: no training sample is "the one x_t came from").
///
/// With `class`, the posterior is the class-conditional one (over that class's training
/// samples) and the y_j are drawn from that class's samples of the query set.
pub fn stage_curve_from(
    oracle: &mut crate::oracle::Oracle<'_>,
    times: &[f64],
    n_pairs: usize,
    seed: u64,
    queries: Option<&Dataset>,
    class: Option<u32>,
    tick: impl FnMut(),
) -> crate::error::Result<Vec<StagePoint>> {
    let (ds, path) = (oracle.dataset(), oracle.path());
    let mut field = crate::field::oracle::OracleRef(oracle);
    let pairs = StagePairs {
        n_pairs,
        seed,
        queries,
        class,
    };
    stage_curve_of_field(&mut field, ds, path, times, &pairs, tick)
}

/// Which (sample, noise) pairs a stage curve averages over.
#[derive(Clone, Copy, Debug)]
pub struct StagePairs<'q> {
    pub n_pairs: usize,
    pub seed: u64,
    /// Draw the samples from this set (e.g. held-out data) instead of the training set.
    pub queries: Option<&'q Dataset>,
    /// Class-conditional posterior, samples of that class.
    pub class: Option<u32>,
}

/// [`stage_curve_from`] for any field over `ds` on `path`: the target difference is defined
/// for every field; the posterior statistics are NaN for fields without them.
pub fn stage_curve_of_field(
    field: &mut dyn crate::field::VelocityField,
    ds: &Dataset,
    path: crate::Path,
    times: &[f64],
    pairs: &StagePairs<'_>,
    mut tick: impl FnMut(),
) -> crate::error::Result<Vec<StagePoint>> {
    let StagePairs {
        n_pairs,
        seed,
        queries,
        class,
    } = *pairs;
    if n_pairs == 0 {
        return Err(crate::error::Error::Input(
            "--pairs must be at least 1".into(),
        ));
    }
    let dim = ds.dim();
    let source = queries.unwrap_or(ds);
    if source.dim() != dim {
        return Err(crate::error::Error::Input(format!(
            "--queries-from {}: samples of {} values, but {} has {dim}",
            source.name,
            source.dim(),
            ds.name
        )));
    }
    let train_rows = ds.rows_for(class)?;
    let source_rows = source.rows_for(class)?;
    let rows: Vec<usize> = stage_pairs(seed, n_pairs, source_rows.len())
        .into_iter()
        .map(|r| source_rows.start + r)
        .collect();
    let ys: Vec<Vec<f64>> = rows.iter().map(|&r| source.sample_f64(r)).collect();
    // The training sample each y_j is closest to: itself for training queries (up to exact
    // duplicates), found exactly for held-out ones.
    let targets: Vec<u32> = match queries {
        None => rows.iter().map(|&r| ds.original_index(r)).collect(),
        Some(q) => {
            let points: Vec<f32> = rows.iter().flat_map(|&r| q.sample(r)).collect();
            nearest_two_in(ds, &points, train_rows)
                .iter()
                .map(|nb| nb.nearest)
                .collect()
        }
    };
    let noise: Vec<Vec<f64>> = (0..n_pairs)
        .map(|k| crate::sample::initial_noise(seed, k, dim))
        .collect();
    let mut curve = Vec::with_capacity(times.len());
    for &t in times {
        if !(0.0..1.0).contains(&t) {
            return Err(crate::error::Error::Input(format!(
                "stage curve time {t} is outside [0, 1)"
            )));
        }
        let c = path.coefs(t);
        // Rounded to f32 as the oracle's queries always were (same curve as before).
        let x: Vec<f64> = ys
            .iter()
            .zip(&noise)
            .flat_map(|(y, x0)| {
                y.iter()
                    .zip(x0)
                    .map(|(y, n)| (c.alpha * y + c.sigma * n) as f32 as f64)
            })
            .collect();
        let out = field.evaluate(&x, &vec![t; n_pairs], &vec![class; n_pairs])?;
        let mut p = StagePoint {
            t,
            ..Default::default()
        };
        match &out.stats {
            Some(stats) => {
                for (k, s) in stats.iter().enumerate() {
                    p.mean_top1_weight += s.top1_weight as f64;
                    if queries.is_none() {
                        p.own_sample_rate +=
                            (s.top1_index == ds.original_index(rows[k])) as u8 as f64;
                    }
                    p.nearest_rate += (s.top1_index == targets[k]) as u8 as f64;
                    p.mean_entropy += s.entropy as f64;
                    p.mean_ess += s.ess as f64;
                    p.mean_posterior_variance += s.posterior_variance as f64;
                }
            }
            None => {
                p.mean_top1_weight = f64::NAN;
                p.own_sample_rate = f64::NAN;
                p.nearest_rate = f64::NAN;
                p.mean_entropy = f64::NAN;
                p.mean_ess = f64::NAN;
                p.mean_posterior_variance = f64::NAN;
            }
        }
        for k in 0..n_pairs {
            // The oracle's velocity was f32; keep the curve's arithmetic as it was.
            let u = &out.velocity[k * dim..(k + 1) * dim];
            p.target_difference += ys[k]
                .iter()
                .zip(&noise[k])
                .zip(u)
                .map(|((y, n), &u)| (c.d_alpha * y + c.d_sigma * n - u).powi(2))
                .sum::<f64>()
                / dim as f64;
        }
        let n = n_pairs as f64;
        p.mean_top1_weight /= n;
        p.own_sample_rate = match queries {
            None => p.own_sample_rate / n,
            Some(_) => f64::NAN,
        };
        p.nearest_rate /= n;
        p.mean_entropy /= n;
        p.mean_ess /= n;
        p.mean_posterior_variance /= n;
        p.target_difference /= n;
        curve.push(p);
        tick();
    }
    Ok(curve)
}

/// The levels of the mean top-1 weight whose first crossing times the studies report.
pub const TOP1_LEVELS: [f64; 3] = [0.5, 0.9, 0.99];

/// First times at which the mean top-1 weight of `curve` reaches each of [`TOP1_LEVELS`].
pub fn top1_crossings(curve: &[StagePoint]) -> [Option<f64>; 3] {
    let top1: Vec<(f64, f64)> = curve.iter().map(|p| (p.t, p.mean_top1_weight)).collect();
    TOP1_LEVELS.map(|level| crossing(&top1, level))
}

/// The first time at which `value` reaches `level`, interpolated linearly between grid times.
pub fn crossing(points: &[(f64, f64)], level: f64) -> Option<f64> {
    if points.first()?.1 >= level {
        return Some(points[0].0);
    }
    points.windows(2).find_map(|w| {
        let ((t0, v0), (t1, v1)) = (w[0], w[1]);
        (v0 < level && v1 >= level).then(|| t0 + (level - v0) / (v1 - v0) * (t1 - t0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dataset::{Dtype, RawRows, SampleShape};
    use rand::{Rng, SeedableRng};

    /// Every distance by direct differences: the definition nearest_two must match.
    fn brute_force(ds: &Dataset, p: &[f32]) -> Vec<(f64, usize)> {
        let mut d: Vec<(f64, usize)> = (0..ds.n_samples())
            .map(|r| {
                let y = ds.sample_f64(r);
                (
                    y.iter()
                        .zip(p)
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum::<f64>()
                        .sqrt(),
                    r,
                )
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        d
    }

    #[test]
    fn nearest_two_matches_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n, d) = (2500, 37);
        let vals: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        for dtype in [Dtype::F32, Dtype::F16] {
            let ds = Dataset::from_raw(
                "t",
                SampleShape::array(vec![d]),
                RawRows::F32(&vals),
                None,
                dtype,
            )
            .unwrap();
            // Points: exact training samples (distance 0), near ones, and random ones.
            let mut points: Vec<f32> = Vec::new();
            for k in 0..12 {
                let base = ds.sample(k * 150);
                let jitter = [0.0f32, 1e-3, 0.3][k % 3];
                points.extend(
                    base.iter()
                        .map(|v| v + jitter * rng.random_range(-1.0..1.0f32)),
                );
            }
            let got = nearest_two(&ds, &points);
            for (q, nb) in got.iter().enumerate() {
                let want = brute_force(&ds, &points[q * d..(q + 1) * d]);
                assert_eq!(nb.nearest_row, want[0].1, "{dtype:?} point {q}");
                assert!(
                    (nb.distance - want[0].0).abs() < 1e-9
                        && (nb.second_distance - want[1].0).abs() < 1e-9
                );
                if q % 3 == 0 {
                    assert!(
                        nb.distance < 1e-6 && nb.memorized(),
                        "{dtype:?} point {q} is a training sample"
                    );
                }
            }
        }
        let ds = Dataset::from_raw(
            "t",
            SampleShape::array(vec![d]),
            RawRows::F32(&vals),
            None,
            Dtype::F32,
        )
        .unwrap();
        assert!(nearest_two(&ds, &[]).is_empty());
    }

    #[test]
    fn crossing_interpolates() {
        let pts = [(0.0, 0.0), (0.1, 0.2), (0.2, 0.6), (0.3, 1.0)];
        assert!((crossing(&pts, 0.5).unwrap() - 0.175).abs() < 1e-12);
        assert_eq!(crossing(&pts, 0.0), Some(0.0));
        assert_eq!(crossing(&pts, 1.5), None);
    }
}
