//! Exact pruning on the gpu: whole tiles skipped for the batch, with the cpu's bounds and
//! certificate.
//!
//! **Why.** Once the posterior concentrates, nearly every weight exp(s - m) underflows in
//! f32, yet the dense passes still pay both products over every row. The cpu backend
//! screens per (query, sample) (`oracle::prune`); a GPU cannot skip per query inside a
//! tile step without diverging, so here the unit is the tile, and a tile is computed
//! when any query of the batch needs it.
//!
//! **How.** At the first call of at most [`LAZY_MAX_BATCH`] queries (in-memory datasets
//! that stay resident; streamed and disk datasets stay dense; larger batches never leave
//! tiles out, so a run of them never pays for an index) the backend builds the same
//! [`PruneIndex`] as the cpu, on the host, and uploads the rows again in its tile order
//! (`perm`): device row p holds stored row perm[p],
//! gathered block by block into the upload's staging buffer (no second host copy), so
//! every tile, and every class segment, is one contiguous run of device rows. Per call,
//! [`prune::TilePlanner`] gives each query its needed tiles (the cpu's bounds and
//! decisions, one implementation); the union over the batch becomes a list of device row
//! ranges (adjacent tiles merged, short gaps filled), and the plan walks those ranges
//! instead of one (`Plan::over`: the same steps, submissions and kernels). Argmax indices
//! come back as device rows and are mapped to stored rows through perm.
//!
//! **Certificate.** A tile left out for the batch is unneeded by every query, so for each
//! query it is in the set the query's own plan may skip, whose bounds sum to at most
//! `TILE_BUDGET` = 2^-31 in units of exp(m0) (m0: a lower bound on the f32 maximum the
//! pass will find, from the query's seed tile). The sum of the left-out tiles' bounds,
//! rescaled by exp(m0 - m) to the final maximum m read back from the device, bounds the
//! skipped weight on the state's scale; divided by l it is the query's
//! `skipped_mass_bound`, at most 2^-31 (see `oracle::prune`'s module docs for why that
//! margin cannot change an f32 result). There is no per-sample screening here, so the
//! certificate is within half the cpu's 2^-30.
//!
//! **When it runs dense.** The probe queries' own needs are a lower bound on the batch's
//! union: if they already cover more than [`DENSE_SHARE`] of the rows (early t, alpha =
//! 0, unstructured data) the plan stops there, having bounded only a few queries; else
//! the whole batch is bounded and the union's share decides.

use std::ops::Range;

use rayon::prelude::*;

use crate::dataset::{Dataset, Dtype};
use crate::oracle::partial::round_up_f32;
use crate::oracle::prune::{self, PruneIndex, TilePlanner};
use crate::oracle::{CentredBatch, Partial, QueryStats, SoftmaxState};

use super::options::GpuOptions;
use super::plan::{self, Limits};
use super::residency;

/// Share of the batch's rows above which the union of needed tiles runs as the plain dense
/// pass. Measured on lavapipe (`cargo run --example gpu_prune_timing -- fashion-mnist
/// 1,4,16,64 0.5,0.7,0.9,0.99`, Fashion-MNIST train, per call after a warm-up): the passes
/// read the rows at a rate nearly independent of B, so a pruned call costs about its kept
/// share of a dense one (share 0.05 -> 16.7x faster, 0.19 -> 6.1x, 0.29 -> 2.4x, 0.59 ->
/// 1.6x, 0.94 -> 1.0x) plus the host's bounds and a step per range. 0.8 leaves a margin for
/// the fragmented ranges of a large union and for the timing noise of a shared machine.
pub(super) const DENSE_SHARE: f64 = 0.8;
/// Queries bounded first, spread over the batch: their union decides the early fallback.
const PROBE_QUERIES: usize = 8;
/// Kept ranges separated by at most this many rows are merged (the gap's rows computed):
/// a step costs three dispatches and a tile's width of work however few rows it holds.
const MERGE_GAP: usize = 64;

/// The device rows of a pruned call and what its certificate needs.
pub(super) struct PrunedRows {
    /// Device rows (positions of the tile order) computed, ascending and disjoint.
    pub ranges: Vec<Range<usize>>,
    /// Per query: lower bound m0 on its f32 maximum logit, and the sum of the left-out
    /// tiles' weight bounds in units of exp(m0).
    pub m0: Vec<f64>,
    pub cert: Vec<f64>,
    /// Tiles of the batch's rows computed (whole tiles; gaps merged count as computed),
    /// and their total.
    pub tiles_kept: u64,
    pub tiles_total: u64,
    /// Rows computed, and the rows of the batch.
    pub samples_kept: u64,
    pub samples_total: u64,
}

/// Prints a line per call to stderr under ORACLEFLOW_PRUNE_PROFILE=1 (for tuning).
fn profile(line: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("ORACLEFLOW_PRUNE_PROFILE").is_ok_and(|v| v == "1")) {
        eprintln!("gpu prune: {}", line());
    }
}

/// Device rows holding `rows` (stored rows): one range for all rows or one class (their
/// tiles are contiguous in the tile order), else the positions of those rows, merged into
/// runs (a row range cut across tiles: correct, but fragmented).
pub(super) fn dense_ranges(index: &PruneIndex, rows: &Range<usize>) -> Vec<Range<usize>> {
    if let Some(tiles) = index.tiles_covering(rows) {
        if !tiles.is_empty() {
            let first = index.tile_positions(tiles.start).start;
            let last = index.tile_positions(tiles.end - 1).end;
            return std::iter::once(first..last).collect();
        }
    }
    let mut out: Vec<Range<usize>> = Vec::new();
    for (p, &r) in index.perm().iter().enumerate() {
        if rows.contains(&(r as usize)) {
            match out.last_mut() {
                Some(last) if last.end == p => last.end = p + 1,
                _ => out.push(p..p + 1),
            }
        }
    }
    out
}

/// The union of the tiles the batch's queries need, or `None` when the dense pass is the
/// better choice (rows not a union of tiles, too few rows, a query that cannot prune, or
/// a union over [`DENSE_SHARE`] of the rows).
pub(super) fn plan(
    ds: &Dataset,
    index: &PruneIndex,
    batch: &CentredBatch<'_>,
) -> Option<PrunedRows> {
    let Some(planner) = TilePlanner::new(ds, index, batch) else {
        profile(|| format!("rows {:?} are not tiles or too few: dense", batch.rows));
        return None;
    };
    let tiles = planner.tiles();
    let n_q = batch.logit_coefs.len();
    let n_rows = batch.rows.len();
    let tile_len = |t: usize| index.tile_positions(tiles.start + t).len();
    let union_rows = |need: &[bool]| -> usize {
        need.iter()
            .enumerate()
            .filter(|(_, &v)| v)
            .map(|(t, _)| tile_len(t))
            .sum()
    };
    let too_many = |rows: usize| rows as f64 > DENSE_SHARE * n_rows as f64;

    // The probe: a few spread-out queries first; their union only grows with the rest.
    let probe: Vec<usize> = (0..n_q).step_by((n_q / PROBE_QUERIES).max(1)).collect();
    let probed: Vec<_> = probe.par_iter().map(|&q| planner.query(q)).collect();
    let mut need = vec![false; tiles.len()];
    for p in &probed {
        if !p.m0.is_finite() {
            profile(|| format!("a query cannot prune (m0 = {}): dense", p.m0));
            return None;
        }
        need.iter_mut().zip(&p.need).for_each(|(u, &v)| *u |= v);
    }
    if too_many(union_rows(&need)) {
        profile(|| {
            format!(
                "probe keeps {:.4} of rows: dense",
                union_rows(&need) as f64 / n_rows as f64
            )
        });
        return None;
    }
    let mut queries: Vec<Option<_>> = (0..n_q).map(|_| None).collect();
    for (&q, p) in probe.iter().zip(probed) {
        queries[q] = Some(p);
    }
    let rest: Vec<_> = (0..n_q)
        .into_par_iter()
        .map(|q| queries[q].is_none().then(|| planner.query(q)))
        .collect();
    let queries: Vec<_> = queries
        .into_iter()
        .zip(rest)
        .map(|(a, b)| a.or(b).expect("every query bounded"))
        .collect();
    for p in &queries {
        if !p.m0.is_finite() {
            profile(|| format!("a query cannot prune (m0 = {}): dense", p.m0));
            return None;
        }
        need.iter_mut().zip(&p.need).for_each(|(u, &v)| *u |= v);
    }
    // Fill short gaps between needed tiles: fewer, longer ranges.
    let mut computed = need.clone();
    let mut t = 0;
    while t < need.len() {
        if computed[t] {
            t += 1;
            continue;
        }
        let gap_end = (t..need.len()).find(|&u| computed[u]).unwrap_or(need.len());
        let gap_rows: usize = (t..gap_end).map(tile_len).sum();
        if t > 0 && gap_end < need.len() && gap_rows <= MERGE_GAP {
            computed[t..gap_end].iter_mut().for_each(|c| *c = true);
        }
        t = gap_end;
    }
    let kept_rows = union_rows(&computed);
    let own: f64 = queries
        .iter()
        .map(|p| union_rows(&p.need) as f64)
        .sum::<f64>()
        / (n_q * n_rows) as f64;
    profile(|| {
        format!(
            "batch keeps {:.4} of rows (queries alone {own:.4} on average){}",
            kept_rows as f64 / n_rows as f64,
            if too_many(kept_rows) { ": dense" } else { "" }
        )
    });
    if too_many(kept_rows) {
        return None;
    }
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for (t, _) in computed.iter().enumerate().filter(|(_, &c)| c) {
        let pos = index.tile_positions(tiles.start + t);
        match ranges.last_mut() {
            Some(last) if last.end == pos.start => last.end = pos.end,
            _ => ranges.push(pos),
        }
    }
    // Per query: the bounds of the tiles left out for the batch (each unneeded by this
    // query too, so the sum stays within its own skippable set's budget).
    let cert = queries
        .iter()
        .map(|p| {
            computed
                .iter()
                .zip(&p.ln_bound)
                .filter(|(&c, _)| !c)
                .map(|(_, &lw)| lw.exp())
                .sum::<f64>()
        })
        .collect();
    Some(PrunedRows {
        ranges,
        m0: queries.iter().map(|p| p.m0).collect(),
        cert,
        tiles_kept: computed.iter().filter(|&&c| c).count() as u64,
        tiles_total: tiles.len() as u64,
        samples_kept: kept_rows as u64,
        samples_total: n_rows as u64,
    })
}

/// The index to hold the device rows in, or `None` for the plain order: pruning off
/// (`--exact-dense`), a dataset on disk, one streamed through the device (its ring walks
/// chunks of stored rows), too few rows, or data without the low-dimensional structure
/// the bounds need (`PruneIndex::build` says so, having spent only the basis).
pub(super) fn eligible(
    ds: &Dataset,
    storage: Dtype,
    limits: &Limits,
    options: &GpuOptions,
) -> bool {
    !(options.exact_dense
        || ds.disk().is_some()
        || ds.n_samples() < prune::MIN_PRUNE_ROWS
        || ds.n_samples() > u32::MAX as usize
        || residency::resident_bytes(ds, storage) > plan::dataset_budget(limits, options))
}

/// Whether `batch` is the first call worth building the index for: few enough queries
/// that their union of needed tiles can leave tiles out (`LAZY_MAX_BATCH`), and alpha > 0
/// (at alpha = 0 every logit is equal and nothing can be skipped).
pub(super) fn worth_building(batch: &CentredBatch<'_>) -> bool {
    batch.logit_coefs.len() <= LAZY_MAX_BATCH && batch.logit_coefs.iter().any(|c| c[0] > 0.0)
}

/// Most queries of a call that makes the backend build its index (and move the rows into
/// its tile order). Measured on lavapipe on Fashion-MNIST (see [`DENSE_SHARE`]): the
/// union keeps 0.05-0.19 of the rows for one query, 0.29-0.59 for 4, 0.94 for 16 at
/// t = 0.99 and all of them for 64, so larger batches never leave enough out to pay for
/// an index (about 2.4 s of host time for Fashion-MNIST), and a sampling run of many
/// queries never builds one.
pub(super) const LAZY_MAX_BATCH: usize = 8;

/// The pruning mode, for the backend's description (run.json says which path ran).
pub(super) fn describe(
    index: Option<&PruneIndex>,
    pending: bool,
    options: &GpuOptions,
    ds: &Dataset,
) -> String {
    match index {
        Some(i) => format!(
            "exact pruning ({} tiles of <= {} rows, whole tiles skipped for the batch)",
            i.n_tiles(),
            prune::LEAF_ROWS
        ),
        None if pending => format!(
            "exact pruning (whole tiles skipped for the batch; the index is built at the \
             first call of at most {LAZY_MAX_BATCH} queries, dense until then)"
        ),
        None if options.exact_dense => "exact dense".to_string(),
        None if ds.disk().is_some() => "exact pruning off: dataset on disk, dense".to_string(),
        None => "exact pruning off: streamed, too small or no low-dimensional structure, dense"
            .to_string(),
    }
}

/// Fills the certificate and the kept counts of a pruned call's partial state: each
/// query's left-out bound, rescaled from exp(m0) to the final maximum read back.
pub(super) fn fill_partial(p: &PrunedRows, part: &mut Partial) {
    for q in 0..part.n_queries() {
        let st = part.states[q];
        part.skipped_mass[q] = p.cert[q] * (p.m0[q] - st.max as f64).exp();
        part.tiles_kept[q] = p.tiles_kept;
        part.samples_kept[q] = p.samples_kept;
    }
    part.tiles_total = p.tiles_total;
    part.samples_total = p.samples_total;
}

/// The same statistics for a normalised result (`posterior`): as [`Partial::finish`]
/// computes them from the filled partial state.
pub(super) fn finish_stats(
    p: &PrunedRows,
    states: &[(SoftmaxState, f32)],
    stats: &mut [QueryStats],
) {
    let share = |kept: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            1.0 - kept as f32 / total as f32
        }
    };
    for (q, ((st, _), out)) in states.iter().zip(stats).enumerate() {
        let mass = p.cert[q] * (p.m0[q] - st.max as f64).exp();
        out.skipped_mass_bound = round_up_f32(mass / st.sum as f64);
        out.tiles_skipped = share(p.tiles_kept, p.tiles_total);
        out.samples_skipped = share(p.samples_kept, p.samples_total);
    }
}

/// Maps the argmax of each query (a device row: a position of the tile order) to its
/// stored row. Where every logit is equal by construction (alpha = 0: both coefficients
/// 0), the tie goes to the first stored row of `rows`, as the plain order's pass gives it
/// (ties between rows of equal f32 logits otherwise go to the first in tile order).
pub(super) fn map_argmax(
    index: &PruneIndex,
    rows: &Range<usize>,
    coefs: &[[f32; 2]],
    stats: &mut [QueryStats],
    states: Option<&mut Vec<(SoftmaxState, f32)>>,
    first_state: usize,
) {
    let perm = index.perm();
    let map = |q: usize, arg: u32| -> u32 {
        if coefs[q] == [0.0, 0.0] {
            rows.start as u32
        } else {
            perm[arg as usize]
        }
    };
    for (q, st) in stats.iter_mut().enumerate() {
        st.top1_index = map(q, st.top1_index);
    }
    if let Some(states) = states {
        for (q, (st, _)) in states[first_state..].iter_mut().enumerate() {
            if st.sum > 0.0 {
                st.argmax = map(q, st.argmax);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::{Limits, Plan};
    use super::*;

    fn cpu_limits() -> Limits {
        Limits::new(&wgpu::Limits::downlevel_defaults(), true)
    }

    /// Every row of `ranges` is walked by exactly one (step, split), none outside them,
    /// and each chunk is read once, in order.
    #[test]
    fn a_list_of_ranges_walks_exactly_its_rows() {
        let chunk_rows = vec![0..300, 300..600, 600..700];
        let ranges = vec![10..74, 138..330, 330..331, 520..650];
        for splits in [1, 3] {
            let options = GpuOptions {
                splits: Some(splits),
                tile_rows: Some(64),
                ..Default::default()
            };
            let plan = Plan::over(&cpu_limits(), &options, 5, 4, &ranges, &chunk_rows);
            let mut seen = vec![0u32; 700];
            for step in &plan.steps {
                let p = step.params;
                for split in 0..p.n_splits {
                    let start = p.split_base + split * p.split_len + p.step_offset;
                    let end = (p.split_base + (split + 1) * p.split_len).min(p.range_end);
                    let end = end.min(start + p.tile_rows);
                    for r in start..end.max(start) {
                        seen[(p.chunk_first_row + r) as usize] += 1;
                    }
                }
            }
            for (r, &n) in seen.iter().enumerate() {
                let want = ranges.iter().any(|g| g.contains(&r)) as u32;
                assert_eq!(n, want, "row {r}, {splits} splits");
            }
            assert_eq!(plan.reads, vec![0, 1, 2]);
        }
    }
}
