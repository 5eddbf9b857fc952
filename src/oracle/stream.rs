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

use rayon::prelude::*;

use crate::dataset::disk::DiskRows;
use crate::dataset::Dataset;
use crate::error::Result;
use crate::oracle::cpu::{run_task, GemmPlan, Partial, MIN_QUERY_GROUP};
use crate::oracle::partial::Partial as PartialState;
use crate::oracle::{prune, CentredBatch, SoftmaxState};


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
    let group = n_queries.div_ceil(threads).max(MIN_QUERY_GROUP);
    let query_groups: Vec<Range<usize>> = (0..n_queries)
        .step_by(group)
        .map(|q| q..(q + group).min(n_queries))
        .collect();

    let mut states = vec![SoftmaxState::EMPTY; n_queries];
    let mut acc = vec![0.0f32; n_queries * dim];
    let mut sum_norm = vec![0.0f32; n_queries];

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
            let tasks: Vec<(usize, usize)> = (0..query_groups.len())
                .flat_map(|g| (0..blocks.len()).map(move |b| (g, b)))
                .collect();
            let partials: Vec<Partial> = tasks
                .par_iter()
                .map(|&(g, b)| {
                    let qs = query_groups[g].clone();
                    run_task(
                        &block,
                        &batch.x[qs.start * dim..qs.end * dim],
                        &batch.logit_coefs[qs],
                        blocks[b].clone(),
                        plan.lib,
                        kernel_tile_rows,
                    )
                })
                .collect();
            // Merge in row order; the kernel's row indices are tile-local.
            for (g, qs) in query_groups.iter().enumerate() {
                for p in &partials[g * blocks.len()..(g + 1) * blocks.len()] {
                    for (local, q) in qs.clone().enumerate() {
                        let mut part = p.states[local];
                        part.argmax += tile.start as u32;
                        let (ra, rb) = states[q].merge(&part);
                        for (o, a) in acc[q * dim..(q + 1) * dim]
                            .iter_mut()
                            .zip(&p.acc[local * dim..(local + 1) * dim])
                        {
                            *o = ra * *o + rb * a;
                        }
                        sum_norm[q] = ra * sum_norm[q] + rb * p.sum_norm[local];
                    }
                }
            }
            let (values, tile_norms) = block.into_tile_values();
            norms = tile_norms;
            let _ = recycle.send(values);
        }
        Ok(())
    })?;

    Ok(PartialState::dense(
        dim,
        states,
        acc,
        sum_norm,
        rows.len(),
        prune::LEAF_ROWS,
    ))
}
