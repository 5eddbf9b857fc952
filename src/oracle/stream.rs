//! The cpu backend's pass over a dataset streamed from disk (`dataset::disk`).
//!
//! A reader thread reads the requested rows a tile at a time (centred and rounded as the
//! in-memory dataset stores them, see [`DiskRows::read_f32`]) and hands each tile over a
//! one-slot channel, so it reads tile k+1 while tile k computes; buffers come back to it
//! for reuse. At most [`TILES_IN_FLIGHT`](crate::dataset::disk::TILES_IN_FLIGHT) tiles
//! exist at once (computing, queued, being read), and `DiskRows::tile_rows` sizes them to
//! the memory budget. Each tile runs the dense kernel of the in-memory path (`cpu::run_task`
//! over (query group x row block) tasks) and its partial states are merged into the running
//! ones in row order with [`SoftmaxState::merge`]: the same exact rescale-and-add as row
//! blocks, so the result is the in-memory oracle's to within f32 rounding.
//!
//! Dense only: exact pruning needs the whole dataset reordered into PCA-tree tiles.

use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;

use crate::dataset::disk::DiskRows;
use crate::dataset::Dataset;
use crate::error::Result;
use crate::oracle::cpu::{query_groups, run_tasks, GemmPlan, Partial};
use crate::oracle::partial::Partial as PartialState;
use crate::oracle::{prune, CentredBatch};

/// The backend's mode, for `describe`.
pub fn describe(disk: &DiskRows) -> String {
    format!(
        "streamed from disk ({}: {}-row tiles of {:.1} MiB read ahead by a reader thread, \
         memory budget {:.1} MiB), exact dense (pruning needs the whole dataset reordered)",
        disk.path().display(),
        disk.tile_rows(),
        disk.tile_bytes() as f64 / 1048576.0,
        disk.budget() as f64 / 1048576.0
    )
}

/// The unnormalised state over `batch.rows` of `ds`, whose values are in `disk`.
pub(crate) fn partial(
    disk: &Arc<DiskRows>,
    ds: &Dataset,
    batch: &CentredBatch<'_>,
    threads: usize,
    plan: GemmPlan,
) -> Result<PartialState> {
    // Row blocks are whole kernel tiles, as in the in-memory dense pass.
    let kernel_tile_rows = plan.tile_rows.max(1);
    let dim = ds.dim();
    let n_queries = batch.logit_coefs.len();
    let rows = batch.rows.clone();
    let tile_rows = disk.tile_rows();
    let threads = threads.max(1);
    let query_groups = query_groups(n_queries, threads);
    let mut merged = Partial::empty(n_queries, dim);

    std::thread::scope(|scope| -> Result<()> {
        let (tiles, incoming) = mpsc::sync_channel::<Result<(Range<usize>, Vec<f32>)>>(1);
        let (recycle, recycled) = mpsc::channel::<Vec<f32>>();
        let reader_rows = rows.clone();
        scope.spawn(move || {
            let mut start = reader_rows.start;
            while start < reader_rows.end {
                let tile = start..(start + tile_rows).min(reader_rows.end);
                let mut buf = recycled.try_recv().unwrap_or_default();
                let read = disk
                    .read_f32(tile.clone(), &mut buf)
                    .map(|()| (tile.clone(), buf));
                let failed = read.is_err();
                // A closed channel: the consumer stopped (an error or Ctrl-C).
                if tiles.send(read).is_err() || failed {
                    return;
                }
                start = tile.end;
            }
        });

        let mut norms = Vec::new();
        for message in incoming.iter() {
            let (tile, values) = message?;
            crate::interrupt::check()?;
            norms.clear();
            norms.extend_from_slice(&ds.sq_norms()[tile.clone()]);
            let block = Dataset::tile(dim, values, std::mem::take(&mut norms));
            let len = tile.len();
            let kernel_tiles = len.div_ceil(kernel_tile_rows);
            let per_block =
                kernel_tiles.div_ceil(threads.min(kernel_tiles).max(1)) * kernel_tile_rows;
            let blocks: Vec<Range<usize>> = (0..len)
                .step_by(per_block)
                .map(|s| s..(s + per_block).min(len))
                .collect();
            let partials = run_tasks(&block, batch, &query_groups, &blocks, plan);
            // In row order; the kernel's row indices are local to the tile.
            merged.absorb(&query_groups, &partials, tile.start as u32);
            let (values, tile_norms) = block.into_tile_values();
            norms = tile_norms;
            let _ = recycle.send(values);
        }
        Ok(())
    })?;

    let Partial {
        states,
        acc,
        sum_norm,
    } = merged;
    Ok(PartialState::dense(
        dim,
        states,
        acc,
        sum_norm,
        rows.len(),
        prune::LEAF_ROWS,
    ))
}
