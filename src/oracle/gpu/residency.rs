//! The dataset on the device: chunks of whole rows, either all resident or streamed
//! through a small ring of chunk-sized buffers.
//!
//! Each row is padded with zeros to a multiple of 4 values so the kernels read it as
//! vec4s; zeros change neither dot products nor the weighted sums. A chunk's buffer is no
//! larger than one storage binding may cover (and `max_chunk_bytes` when given), so a
//! dataset larger than one binding is a list of bindable buffers.
//!
//! Resident (the default): every chunk is uploaded once and stays on the device for the
//! backend's lifetime. A dataset larger than device memory then fails at upload with an
//! `Err` (the device's out-of-memory error, caught by the caller's error scope).
//!
//! Streaming (when the dataset is larger than the device-memory budget,
//! `GpuOptions::max_resident_bytes`): the rows stay on the host, packed once in the
//! device layout, and the device holds only [`RING_SLOTS`] chunk-sized slots. A call
//! walks the chunks overlapping its row range in order; each is read from a slot that
//! already holds it, else uploaded with `queue.write_buffer` into a slot other than the
//! previous chunk's, just before the first submission that reads it (`Stream::slots_for`). The kernels, bind group layouts and step parameters are those of the
//! resident path: a slot is bound exactly like a resident chunk (its tail past the
//! chunk's rows is never read: the kernels stop at the chunk-local `range_end`).
//!
//! Why a slot is never overwritten while a submitted compute may still read it (wgpu
//! 30, `Queue::write_buffer` docs and wgpu-core's `queue_write_staging_buffer_impl`):
//! the data is copied at once into fresh staging memory, and the copy into the slot runs
//! "on the next call to `Queue::submit()`, just before the explicitly submitted
//! commands", in the queue's single timeline. wgpu-core records that copy into its
//! pending-writes command buffer after a barrier from the slot's tracked state (the
//! STORAGE reads of earlier submissions) to COPY_DST. So a write issued after the submit
//! that last read the slot is ordered after that compute, and before the submit issued
//! next, which is the one that reads the new chunk. We never write a slot between the
//! submit of the chunk it holds and that chunk's last submit (chunks are walked in
//! order, each written once before its first submit), so no write can overtake a read.
//!
//! What bounds memory and gives the overlap: each write allocates a staging buffer
//! that lives until the next submission finishes. Before writing slot s we wait for the
//! last submission that read s (chunk i - RING_SLOTS) to complete, so at most
//! RING_SLOTS chunks are in flight, and the host copies chunk i into staging while the
//! device still computes chunk i - 1 (the previous slot): upload of k+1 overlaps compute
//! of k. A slot that already holds the wanted chunk (from the previous call, which waited
//! for all its work, or an earlier sub-batch of the same call) is not written again:
//! calls over at most RING_SLOTS chunks upload nothing after the first, and a call over
//! a chunk the ring holds (one class's rows, say) reads it where it is.
//!
//! What cannot be saved: a walk over more chunks than slots uploads every chunk it reads
//! (the previous walk left its last chunks, and this one starts from its first). Walking
//! backwards every other time would reuse two chunks but change the order the chunks are
//! merged in, so the results would depend on the calls before (rounding); we keep the
//! results a function of the inputs alone. A resident dataset is never uploaded again:
//! a call uploads only its queries and step parameters.
//!
//! The cost of streaming: one host copy of the dataset in the storage layout (the
//! backend does not keep the `Dataset`), and one host-to-device copy of every chunk a
//! call reads that the ring does not hold, per sub-batch.
//!
//! A dataset streamed from disk (`dataset::disk`) has no host copy: the ring refills from
//! the file. Its chunks are further cut to the host tile size the memory budget allows, and
//! `load` reads chunk i (centred and rounded as the in-memory dataset stores it) into one
//! reused host buffer right before queueing its upload, while the device still computes
//! chunk i - 1: the disk read of k+1 overlaps the compute of k as the host copy does. A
//! dataset from disk that fits the device's budget is uploaded once, read tile by tile.

use std::ops::Range;

use std::sync::Arc;

use crate::dataset::disk::DiskRows;
use crate::dataset::{Dataset, Dtype, Values};
use crate::error::{Error, Result};

use super::health::Waiter;

/// Device buffers of a streaming backend.
pub(super) const RING_SLOTS: usize = 2;

/// Rows of one chunk and their buffers.
pub(super) struct Chunk {
    /// Dataset rows held.
    pub rows: Range<usize>,
    /// rows x dim4 vec4s (f32 or f16)
    pub values: wgpu::Buffer,
    /// one f32 per row
    pub sq_norms: wgpu::Buffer,
}

/// Where the dataset lives.
pub(super) enum Residency {
    /// Every chunk on the device.
    Resident(Vec<Chunk>),
    Streaming(Stream),
}

/// The rows on the host and a ring of device slots.
pub(super) struct Stream {
    /// Dataset rows of each chunk.
    pub chunks: Vec<Range<usize>>,
    /// RING_SLOTS buffers, each as large as the largest chunk (`rows` unused: see `held`).
    pub slots: Vec<Chunk>,
    /// The chunk each slot holds (None: unknown, e.g. after a failed call).
    held: Vec<Option<usize>>,
    /// The last submission that read each slot.
    last_read: Vec<Option<wgpu::SubmissionIndex>>,
    /// Where the rows come from.
    host: HostRows,
    host_sq_norms: Vec<f32>,
    row_bytes: usize,
    /// Chunks uploaded so far (for tests: what the ring holds is not uploaded again).
    uploads: u64,
}

/// The rows a ring refills from.
enum HostRows {
    /// All rows, padded and converted as on the device.
    Packed(Vec<u8>),
    /// The dataset's file, read a chunk at a time into `staging`.
    Disk {
        disk: Arc<DiskRows>,
        device: Dtype,
        dim_padded: usize,
        staging: Vec<u8>,
    },
}

impl Residency {
    /// Number of chunks the dataset is cut into.
    pub fn n_chunks(&self) -> usize {
        match self {
            Residency::Resident(c) => c.len(),
            Residency::Streaming(s) => s.chunks.len(),
        }
    }

    /// Dataset rows of chunk `c`.
    pub fn chunk_rows(&self, c: usize) -> Range<usize> {
        match self {
            Residency::Resident(chunks) => chunks[c].rows.clone(),
            Residency::Streaming(s) => s.chunks[c].clone(),
        }
    }

    /// Dataset rows of every chunk, in order.
    pub fn all_chunk_rows(&self) -> Vec<Range<usize>> {
        (0..self.n_chunks()).map(|c| self.chunk_rows(c)).collect()
    }

    /// Number of device buffers chunks are bound from (chunks, or ring slots).
    pub fn n_buffers(&self) -> usize {
        match self {
            Residency::Resident(c) => c.len(),
            Residency::Streaming(s) => s.slots.len(),
        }
    }

    /// Device buffers of buffer `i` (see [`Residency::buffers_of`]).
    pub fn buffer(&self, i: usize) -> &Chunk {
        match self {
            Residency::Resident(c) => &c[i],
            Residency::Streaming(s) => &s.slots[i],
        }
    }

    /// The buffer of each chunk of `reads`, the chunks a call reads in order: resident,
    /// the chunk's own; streaming, a ring slot (see [`Stream::slots_for`]).
    pub fn buffers_of(&self, reads: &[usize]) -> Vec<usize> {
        match self {
            Residency::Resident(_) => reads.to_vec(),
            Residency::Streaming(s) => s.slots_for(reads),
        }
    }

    /// Chunks uploaded to ring slots so far (0 when resident).
    pub fn uploads(&self) -> u64 {
        match self {
            Residency::Resident(_) => 0,
            Residency::Streaming(s) => s.uploads,
        }
    }

    /// Whether the ring refills from the dataset's file (not a host copy).
    pub fn refills_from_disk(&self) -> bool {
        matches!(self, Residency::Streaming(s) if matches!(s.host, HostRows::Disk { .. }))
    }

    pub fn is_streaming(&self) -> bool {
        matches!(self, Residency::Streaming(_))
    }

    /// Forgets what the slots hold (after a failed call).
    pub fn invalidate(&mut self) {
        if let Residency::Streaming(s) = self {
            s.held.iter_mut().for_each(|h| *h = None);
            s.last_read.iter_mut().for_each(|h| *h = None);
        }
    }
}

impl Stream {
    /// The slot each chunk of `reads` (a call's, in order) is read from. A chunk a slot
    /// already holds is read from there (no upload: the ring keeps what is on it across
    /// calls and sub-batches). Otherwise the chunk goes to a slot other than the previous
    /// read's (so its upload never waits for the chunk computing just before it),
    /// preferring one whose chunk this call does not read later. Consecutive reads always
    /// use different slots, as the ordering argument of the module docs needs.
    pub fn slots_for(&self, reads: &[usize]) -> Vec<usize> {
        let n = self.slots.len();
        let mut held = self.held.clone();
        let mut prev: Option<usize> = None;
        let mut out = Vec::with_capacity(reads.len());
        for (i, &c) in reads.iter().enumerate() {
            let later = &reads[i + 1..];
            let slot = held
                .iter()
                .position(|&h| h == Some(c))
                .or_else(|| {
                    (0..n).find(|&s| Some(s) != prev && held[s].is_none_or(|h| !later.contains(&h)))
                })
                .or_else(|| (0..n).find(|&s| Some(s) != prev))
                .unwrap_or(0);
            held[slot] = Some(c);
            prev = Some(slot);
            out.push(slot);
        }
        out
    }

    /// Makes slot `slot` hold chunk `c`, to be read by the next submission: waits for the
    /// last submission that read the slot, then queues the upload (see the module docs
    /// for why this ordering is safe).
    pub fn load(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        waiter: &Waiter,
        slot: usize,
        c: usize,
    ) -> Result<()> {
        if self.held[slot] == Some(c) {
            return Ok(());
        }
        if let Some(index) = self.last_read[slot].take() {
            waiter.wait(
                device,
                Some(index),
                "reading a streamed chunk",
                |finished| finished,
            )?;
        }
        let rows = self.chunks[c].clone();
        let dst = &self.slots[slot];
        let bytes: &[u8] = match &mut self.host {
            HostRows::Packed(v) => &v[rows.start * self.row_bytes..rows.end * self.row_bytes],
            HostRows::Disk {
                disk,
                device,
                dim_padded,
                staging,
            } => {
                disk.read_padded(rows.clone(), *device, *dim_padded, staging)?;
                staging
            }
        };
        queue.write_buffer(&dst.values, 0, bytes);
        queue.write_buffer(
            &dst.sq_norms,
            0,
            bytemuck::cast_slice(&self.host_sq_norms[rows]),
        );
        self.held[slot] = Some(c);
        self.uploads += 1;
        Ok(())
    }

    /// Records that `index` read slot `slot`.
    pub fn read_by(&mut self, slot: usize, index: wgpu::SubmissionIndex) {
        self.last_read[slot] = Some(index);
    }
}

/// Rows per chunk and bytes per (padded) row.
fn rows_per_chunk(dataset: &Dataset, storage: Dtype, max_chunk_bytes: u64) -> Result<(usize, u64)> {
    let dim_padded = dataset.dim().div_ceil(4) * 4;
    let row_bytes = (dim_padded * storage.bytes()) as u64;
    let rows_per_chunk = (max_chunk_bytes / row_bytes) as usize;
    if rows_per_chunk == 0 {
        return Err(Error::Gpu(format!(
            "one sample ({row_bytes} bytes) exceeds the largest buffer the GPU can bind \
             ({max_chunk_bytes} bytes)"
        )));
    }
    Ok((rows_per_chunk, row_bytes))
}

/// Device bytes the whole dataset takes resident (values and squared norms).
pub(super) fn resident_bytes(dataset: &Dataset, storage: Dtype) -> u64 {
    let dim_padded = dataset.dim().div_ceil(4) * 4;
    dataset.n_samples() as u64 * (dim_padded * storage.bytes() + 4) as u64
}

/// Sets up streaming: chunks of at most `max_chunk_bytes`, further cut so that the
/// RING_SLOTS slots (values and squared norms) fit `budget` bytes; the rows packed on the
/// host.
pub(super) fn stream(
    device: &wgpu::Device,
    dataset: &Dataset,
    storage: Dtype,
    max_chunk_bytes: u64,
    budget: u64,
) -> Result<Stream> {
    let (by_binding, row_bytes) = rows_per_chunk(dataset, storage, max_chunk_bytes)?;
    let by_budget = (budget / RING_SLOTS as u64 / (row_bytes + 4)) as usize;
    if by_budget == 0 {
        return Err(Error::Gpu(format!(
            "a device-memory budget of {budget} bytes cannot hold {RING_SLOTS} samples of \
             {row_bytes} bytes for streaming"
        )));
    }
    // From disk: a chunk is also one host tile (the host buffer it is read into).
    let by_host = dataset
        .disk()
        .map_or(usize::MAX, |d| (d.tile_bytes() / row_bytes).max(1) as usize);
    let rows_per_chunk = by_binding.min(by_budget).min(by_host);
    let n = dataset.n_samples();
    let chunks: Vec<Range<usize>> = (0..n)
        .step_by(rows_per_chunk)
        .map(|start| start..(start + rows_per_chunk).min(n))
        .collect();
    let slot_rows = chunks.iter().map(|r| r.len()).max().unwrap_or(1) as u64;
    let slots = (0..RING_SLOTS.min(chunks.len()))
        .map(|_| Chunk {
            rows: 0..0,
            values: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("dataset ring slot"),
                size: slot_rows * row_bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            sq_norms: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("dataset ring slot sq_norms"),
                size: slot_rows * 4,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        })
        .collect::<Vec<_>>();
    let dim_padded = dataset.dim().div_ceil(4) * 4;
    let host = match dataset.disk() {
        Some(disk) => HostRows::Disk {
            disk: disk.clone(),
            device: storage,
            dim_padded,
            staging: Vec::new(),
        },
        None => {
            let mut host_values = vec![0u8; n * row_bytes as usize];
            fill_rows(dataset, 0..n, None, dim_padded, storage, |offset, bytes| {
                host_values[offset..offset + bytes.len()].copy_from_slice(bytes);
            })?;
            HostRows::Packed(host_values)
        }
    };
    Ok(Stream {
        held: vec![None; slots.len()],
        last_read: vec![None; slots.len()],
        chunks,
        slots,
        host,
        host_sq_norms: dataset.sq_norms().to_vec(),
        row_bytes: row_bytes as usize,
        uploads: 0,
    })
}

/// Uploads the dataset in chunks of at most `max_chunk_bytes` each, its values held as
/// `storage` (f16 data may be held as f32; f32 data is always held as f32). With `order`
/// (exact pruning's tile order, in-memory datasets only), device row p holds stored row
/// `order[p]`, gathered block by block into the same staging buffer as the plain order.
pub(super) fn upload(
    device: &wgpu::Device,
    dataset: &Dataset,
    storage: Dtype,
    max_chunk_bytes: u64,
    order: Option<&[u32]>,
) -> Result<Vec<Chunk>> {
    let dim = dataset.dim();
    let dim_padded = dim.div_ceil(4) * 4;
    let (rows_per_chunk, row_bytes) = rows_per_chunk(dataset, storage, max_chunk_bytes)?;
    let n = dataset.n_samples();
    let mut chunks = Vec::with_capacity(n.div_ceil(rows_per_chunk));
    for start in (0..n).step_by(rows_per_chunk) {
        let rows = start..(start + rows_per_chunk).min(n);
        let values = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dataset rows"),
            size: rows.len() as u64 * row_bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = values
                .get_mapped_range_mut(..)
                .map_err(|e| Error::Gpu(format!("mapping dataset rows: {e}")))?;
            fill_rows(
                dataset,
                rows.clone(),
                order,
                dim_padded,
                storage,
                |offset, bytes| {
                    view.slice(offset..offset + bytes.len())
                        .copy_from_slice(bytes);
                },
            )?;
        }
        values.unmap();
        let sq_norms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dataset sq_norms"),
            size: rows.len() as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: true,
        });
        let gathered: Vec<f32>;
        let norms = match order {
            Some(o) => {
                let all = dataset.sq_norms();
                gathered = o[rows.clone()].iter().map(|&r| all[r as usize]).collect();
                &gathered[..]
            }
            None => &dataset.sq_norms()[rows.clone()],
        };
        sq_norms
            .get_mapped_range_mut(..)
            .map_err(|e| Error::Gpu(format!("mapping sq_norms: {e}")))?
            .copy_from_slice(bytemuck::cast_slice(norms));
        sq_norms.unmap();
        chunks.push(Chunk {
            rows,
            values,
            sq_norms,
        });
    }
    Ok(chunks)
}

/// Converts and pads `rows` a block at a time (a few MiB of host memory however many
/// rows), handing each block to `write` with its byte offset from the first row. With
/// `order`, row p of the output is stored row `order[p]` (never for disk datasets).
fn fill_rows(
    dataset: &Dataset,
    rows: Range<usize>,
    order: Option<&[u32]>,
    dim_padded: usize,
    storage: Dtype,
    mut write: impl FnMut(usize, &[u8]),
) -> Result<()> {
    let dim = dataset.dim();
    let row_bytes = dim_padded * storage.bytes();
    let block_rows = ((4 << 20) / row_bytes).max(1);
    let mut bytes: Vec<u8> = Vec::with_capacity(block_rows * row_bytes);
    let mut block_start = rows.start;
    while block_start < rows.end {
        let block_end = (block_start + block_rows).min(rows.end);
        bytes.clear();
        if let Some(disk) = dataset.disk() {
            assert!(
                order.is_none(),
                "disk datasets are uploaded in stored order"
            );
            disk.read_padded(block_start..block_end, storage, dim_padded, &mut bytes)?;
            write((block_start - rows.start) * row_bytes, &bytes);
            block_start = block_end;
            continue;
        }
        for pos in block_start..block_end {
            let row = order.map_or(pos, |o| o[pos] as usize);
            let r = row * dim..(row + 1) * dim;
            match (dataset.values(), storage) {
                (Values::F32(v), Dtype::F32) => {
                    bytes.extend_from_slice(bytemuck::cast_slice(&v[r]));
                    bytes.resize(bytes.len() + (dim_padded - dim) * 4, 0);
                }
                (Values::F16(v), Dtype::F16) => {
                    bytes.extend_from_slice(bytemuck::cast_slice(&v[r]));
                    bytes.resize(bytes.len() + (dim_padded - dim) * 2, 0);
                }
                // f16 data on a device without SHADER_F16: held as f32, which is exact.
                (Values::F16(v), Dtype::F32) => {
                    for x in &v[r] {
                        bytes.extend_from_slice(&x.to_f32().to_ne_bytes());
                    }
                    bytes.resize(bytes.len() + (dim_padded - dim) * 4, 0);
                }
                (Values::F32(_), Dtype::F16) => {
                    unreachable!("f32 datasets are held as f32")
                }
                (Values::Disk(_), _) => unreachable!("read above"),
            }
        }
        let offset = (block_start - rows.start) * row_bytes;
        write(offset, &bytes);
        block_start = block_end;
    }
    Ok(())
}
