//! The dataset on the device: chunks of whole rows, uploaded once.
//!
//! Each row is padded with zeros to a multiple of 4 values so the kernels read it as
//! vec4s; zeros change neither dot products nor the weighted sums. A chunk's buffer is no
//! larger than one storage binding may cover (and `max_chunk_bytes` when given), so a
//! dataset larger than one binding is a list of bindable buffers.
//!
//! The whole dataset is resident: every chunk stays on the device for the backend's
//! lifetime. Streaming rows through staging buffers, for datasets larger than device
//! memory, is not implemented; such a dataset fails at upload with an `Err` (the device's
//! out-of-memory error, caught by the caller's error scope).

use std::ops::Range;

use crate::dataset::{Dataset, Dtype, Values};
use crate::error::{Error, Result};

/// Rows of one chunk and their buffers.
pub(super) struct Chunk {
    /// Dataset rows held.
    pub rows: Range<usize>,
    /// rows x dim4 vec4s (f32 or f16)
    pub values: wgpu::Buffer,
    /// one f32 per row
    pub sq_norms: wgpu::Buffer,
}

/// Uploads the dataset in chunks of at most `max_chunk_bytes` each, its values held as
/// `storage` (f16 data may be held as f32; f32 data is always held as f32).
pub(super) fn upload(
    device: &wgpu::Device,
    dataset: &Dataset,
    storage: Dtype,
    max_chunk_bytes: u64,
) -> Result<Vec<Chunk>> {
    let dim = dataset.dim();
    let dim_padded = dim.div_ceil(4) * 4;
    let row_bytes = (dim_padded * storage.bytes()) as u64;
    let rows_per_chunk = (max_chunk_bytes / row_bytes) as usize;
    if rows_per_chunk == 0 {
        return Err(Error::Gpu(format!(
            "one sample ({row_bytes} bytes) exceeds the largest buffer the GPU can bind \
             ({max_chunk_bytes} bytes)"
        )));
    }
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
        fill_rows(&values, dataset, rows.clone(), dim_padded, storage)?;
        values.unmap();

        let sq_norms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dataset sq_norms"),
            size: rows.len() as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: true,
        });
        sq_norms
            .get_mapped_range_mut(..)
            .map_err(|e| Error::Gpu(format!("mapping sq_norms: {e}")))?
            .copy_from_slice(bytemuck::cast_slice(&dataset.sq_norms()[rows.clone()]));
        sq_norms.unmap();
        chunks.push(Chunk {
            rows,
            values,
            sq_norms,
        });
    }
    Ok(chunks)
}

/// Writes `rows` into a buffer mapped at creation, converting and padding a block of rows
/// at a time (a few MiB of host memory however large the chunk).
fn fill_rows(
    buffer: &wgpu::Buffer,
    dataset: &Dataset,
    rows: Range<usize>,
    dim_padded: usize,
    storage: Dtype,
) -> Result<()> {
    let dim = dataset.dim();
    let row_bytes = dim_padded * storage.bytes();
    let block_rows = ((4 << 20) / row_bytes).max(1);
    let mut view = buffer
        .get_mapped_range_mut(..)
        .map_err(|e| Error::Gpu(format!("mapping dataset rows: {e}")))?;
    let mut bytes: Vec<u8> = Vec::with_capacity(block_rows * row_bytes);
    let mut block_start = rows.start;
    while block_start < rows.end {
        let block_end = (block_start + block_rows).min(rows.end);
        bytes.clear();
        for row in block_start..block_end {
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
            }
        }
        let offset = (block_start - rows.start) * row_bytes;
        view.slice(offset..offset + bytes.len())
            .copy_from_slice(&bytes);
        block_start = block_end;
    }
    Ok(())
}
