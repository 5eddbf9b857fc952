//! Datasets larger than the memory budget, read from their `.npy` file tile by tile.
//!
//! A [`Dataset`] whose values are [`Values::Disk`] holds in RAM only what is O(N) and
//! small: the mean, the per-row squared norms, the labels and the row order (12-16 bytes a
//! row, against `D * 2` or `D * 4` for the values). The values stay in the file (`<f4` or
//! `<f2`, the formats `oracleflow convert` writes) and are read, centred and rounded to the
//! storage dtype a tile at a time, exactly as [`Dataset::from_raw`] would have stored them:
//! every backend sees the same numbers as with the in-memory dataset.
//!
//! Reads are explicit positional reads (`pread`) into bounded buffers, not a memory map:
//! the anonymous memory is then exactly our buffers (the page cache holds the file and is
//! neither anonymous nor part of the process's RSS, so even the peak RSS `VmHWM` bounds the
//! peak anonymous memory), a file truncated under us is an I/O error naming the file rather
//! than a SIGBUS, and a class's rows (see below) are gathered with one read per run of
//! consecutive rows. The kernel is told the access is sequential (`posix_fadvise`).
//!
//! Row order: as in memory, rows are seen class-sorted (stably by label), so one class is
//! one contiguous range of rows and the backends keep their row-range interface; a tile of
//! that order is gathered from the file (consecutive source rows coalesced into one read).
//! A class-conditional pass thus reads only its class's bytes, rather than every row with
//! the other classes masked out; unlabelled data (and data stored class by class) is read
//! strictly sequentially.
//!
//! Stats: the mean (summed in f64 in source order, as in memory) and the squared norms of
//! the centred rows need two streaming passes over the file (the norms need the mean). They
//! are cached in a sidecar `DATA.npy.oracleflow-stats` beside the data, keyed by the file's
//! size, modification time, header, row count and storage dtype, and checksummed; a stale or
//! corrupt sidecar is recomputed. When the data's directory is not writable the sidecar
//! goes to `$XDG_CACHE_HOME/oracleflow` (or `~/.cache/oracleflow`); when neither is, the
//! stats are recomputed on every run and a warning says so once.
//!
//! Exact pruning needs the whole dataset reordered (PCA-tree tiles), so a streamed dataset
//! always runs the dense pass.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use half::f16;

use super::limits::{available_memory, keep_first};
use super::npy::{self, NpyDtype};
use super::{Dataset, Dtype, SampleShape, Values};
use crate::error::{Error, Result};

/// Most bytes of one positional read (and of the raw buffer the passes use): transient
/// memory beside the tiles, so small; 1 MiB reads already run at disk speed.
const READ_BYTES: usize = 1 << 20;
/// Fewest rows in a compute tile, whatever the budget (the O(tile) of the memory bound).
pub const MIN_TILE_ROWS: usize = 256;
/// Most bytes in one compute tile: larger tiles buy nothing once the GEMMs are long.
const MAX_TILE_BYTES: u64 = 64 << 20;
/// Tiles alive at once in a streamed pass: computing, queued, being read.
pub const TILES_IN_FLIGHT: u64 = 3;
/// Suffix of the sidecar file beside the data.
pub const SIDECAR_SUFFIX: &str = ".oracleflow-stats";
const SIDECAR_MAGIC: &[u8; 8] = b"OFSTATS1";

/// The memory budget set by `--memory-budget` (0: not set).
static BUDGET: AtomicU64 = AtomicU64::new(0);
/// Whether the "cannot cache the stats" warning was printed.
static WARNED_NO_CACHE: AtomicBool = AtomicBool::new(false);

/// Sets the process's memory budget for resident dataset bytes (`--memory-budget`).
pub fn set_memory_budget(bytes: u64) {
    BUDGET.store(bytes.max(1), Ordering::Relaxed);
}

/// The memory budget for resident dataset bytes: the one set, else half of the available
/// memory (`MemAvailable`, see [`available_memory`]), else unlimited.
pub fn memory_budget() -> u64 {
    match BUDGET.load(Ordering::Relaxed) {
        0 => available_memory().map_or(u64::MAX, |a| a / 2),
        b => b,
    }
}

/// Parses a `--memory-budget` value in MiB (fractions allowed: `0.5` is 512 KiB).
pub fn parse_budget_mib(text: &str) -> Result<u64> {
    let mib: f64 = text.trim().parse().map_err(|_| {
        Error::Input(format!(
            "--memory-budget {text}: expected a number of MiB, e.g. 4096"
        ))
    })?;
    if !(mib.is_finite() && mib > 0.0) {
        return Err(Error::Input(format!(
            "--memory-budget {text}: must be a positive number of MiB"
        )));
    }
    let bytes = (mib * 1048576.0).round();
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(Error::Input(format!(
            "--memory-budget {text}: out of range"
        )));
    }
    Ok(bytes as u64)
}

/// The values of a streamed dataset: the file, the centring mean, the row order.
#[derive(Debug)]
pub struct DiskRows {
    path: PathBuf,
    file: File,
    data_offset: u64,
    /// dtype of the values in the file (f32 or f16)
    src: Dtype,
    /// dtype the centred values are rounded to (as the in-memory dataset stores them)
    storage: Dtype,
    n: usize,
    dim: usize,
    mean: Vec<f32>,
    /// Row i of the dataset is source row order[i] (None: the same).
    order: Option<Vec<u32>>,
    budget: u64,
    /// Value bytes read from the file so far (tiles only, not the stats passes).
    bytes_read: AtomicU64,
}

impl DiskRows {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The memory budget this dataset was opened under (bytes).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Dtype the centred values are rounded to.
    pub fn storage(&self) -> Dtype {
        self.storage
    }

    /// Value bytes read from the file by tiles so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Rows of one compute tile: [`TILES_IN_FLIGHT`] f32 tiles fit the budget left after
    /// the per-row arrays, at least [`MIN_TILE_ROWS`] and at most 64 MiB.
    pub fn tile_rows(&self) -> usize {
        let resident = self.n as u64 * 16 + self.dim as u64 * 16 + READ_BYTES as u64;
        let per_tile = self.budget.saturating_sub(resident) / TILES_IN_FLIGHT;
        let row = (self.dim * 4) as u64;
        let rows = (per_tile.min(MAX_TILE_BYTES) / row) as usize;
        rows.max(MIN_TILE_ROWS).min(self.n).max(1)
    }

    /// Bytes of one tile as the f32 values the cpu backend reads.
    pub fn tile_bytes(&self) -> u64 {
        (self.tile_rows() * self.dim * 4) as u64
    }

    fn src_row_bytes(&self) -> usize {
        self.dim * self.src.bytes()
    }

    fn source_row(&self, row: usize) -> usize {
        self.order.as_ref().map_or(row, |o| o[row] as usize)
    }

    /// Calls `f(i, raw)` for each row `rows.start + i` with its raw bytes from the file,
    /// reading runs of consecutive source rows with one read each (at most READ_BYTES).
    fn visit_raw(&self, rows: Range<usize>, mut f: impl FnMut(usize, &[u8])) -> Result<()> {
        let rb = self.src_row_bytes();
        let most = (READ_BYTES / rb).max(1);
        let mut buf = Vec::new();
        let mut i = rows.start;
        while i < rows.end {
            let first = self.source_row(i);
            let mut len = 1;
            while i + len < rows.end && len < most && self.source_row(i + len) == first + len {
                len += 1;
            }
            buf.resize(len * rb, 0);
            self.file
                .read_exact_at(&mut buf, self.data_offset + (first * rb) as u64)
                .map_err(|e| Error::io(&self.path, e))?;
            self.bytes_read
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            for (j, raw) in buf.chunks_exact(rb).enumerate() {
                f(i - rows.start + j, raw);
            }
            i += len;
        }
        Ok(())
    }

    /// Centred stored values of `rows` as f32 (rounded to the storage dtype first), row-major.
    pub fn read_f32(&self, rows: Range<usize>, out: &mut Vec<f32>) -> Result<()> {
        let dim = self.dim;
        out.clear();
        out.resize(rows.len() * dim, 0.0);
        let (src, storage, mean) = (self.src, self.storage, &self.mean);
        self.visit_raw(rows, |i, raw| {
            let dst = &mut out[i * dim..(i + 1) * dim];
            centre_row(src, storage, raw, mean, |k, v| dst[k] = v.to_f32());
        })
    }

    /// Centred stored values of `rows` in the device layout: each row padded with zeros to
    /// `dim_padded` values, as f16 (`device` F16, storage f16) or f32 bytes.
    pub fn read_padded(
        &self,
        rows: Range<usize>,
        device: Dtype,
        dim_padded: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let row_bytes = dim_padded * device.bytes();
        out.clear();
        out.resize(rows.len() * row_bytes, 0);
        let (src, storage, mean) = (self.src, self.storage, &self.mean);
        self.visit_raw(rows, |i, raw| {
            let dst = &mut out[i * row_bytes..(i + 1) * row_bytes];
            centre_row(src, storage, raw, mean, |k, v| match device {
                Dtype::F32 => dst[k * 4..k * 4 + 4].copy_from_slice(&v.to_f32().to_ne_bytes()),
                Dtype::F16 => {
                    let h = match v {
                        Stored::F16(h) => h,
                        Stored::F32(x) => f16::from_f32(x),
                    };
                    dst[k * 2..k * 2 + 2].copy_from_slice(&h.to_ne_bytes())
                }
            });
        })
    }
}

/// One stored value: the centred value rounded to the storage dtype.
#[derive(Clone, Copy)]
enum Stored {
    F32(f32),
    F16(f16),
}

impl Stored {
    fn to_f32(self) -> f32 {
        match self {
            Stored::F32(x) => x,
            Stored::F16(h) => h.to_f32(),
        }
    }

    fn to_f64(self) -> f64 {
        match self {
            Stored::F32(x) => x as f64,
            Stored::F16(h) => h.to_f64(),
        }
    }
}

fn raw_value(src: Dtype, raw: &[u8], k: usize) -> f64 {
    match src {
        Dtype::F32 => f32::from_le_bytes(raw[k * 4..k * 4 + 4].try_into().expect("4 bytes")) as f64,
        Dtype::F16 => f16::from_le_bytes([raw[k * 2], raw[k * 2 + 1]]).to_f64(),
    }
}

/// The arithmetic of [`Dataset::from_raw`]: `(raw as f64 - mean as f64)` rounded once to
/// the storage dtype.
fn centre_row(
    src: Dtype,
    storage: Dtype,
    raw: &[u8],
    mean: &[f32],
    mut put: impl FnMut(usize, Stored),
) {
    for (k, &m) in mean.iter().enumerate() {
        let c = raw_value(src, raw, k) - m as f64;
        put(
            k,
            match storage {
                Dtype::F32 => Stored::F32(c as f32),
                Dtype::F16 => Stored::F16(f16::from_f64(c)),
            },
        );
    }
}

/// Whether an `.npy` dataset of `n` rows of `dim` values held as `dtype` exceeds `budget`.
fn exceeds(n: usize, dim: usize, dtype: Dtype, budget: u64) -> bool {
    let per_row = (dim * dtype.bytes() + 12) as u64;
    (n as u64).saturating_mul(per_row) > budget
}

/// The `.npy` header of `data` and its file's length.
fn read_header(data: &Path) -> Result<(npy::NpyHeader, u64)> {
    let mut file = File::open(data).map_err(|e| Error::io(data, e))?;
    let len = file.metadata().map_err(|e| Error::io(data, e))?.len();
    let mut head = Vec::new();
    file.by_ref()
        .take(1 << 20)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(data, e))?;
    if head.len() as u64 == len {
        // The whole file is read: the in-memory loader's checks and messages.
        return Ok((npy::parse_header(&head, data)?, len));
    }
    let (header, expected) = npy::parse_header_prefix(&head, data)?;
    let got = len - header.data_offset as u64;
    npy::check_data_len(&header, expected as u64, got, data)?;
    Ok((header, len))
}

/// Opens `data` as a streamed dataset when its resident size (values as `dtype`, plus the
/// per-row arrays) exceeds `budget`; `None` when it fits (load it in memory as usual).
pub fn open_if_over_budget(
    data: &Path,
    labels: Option<&Path>,
    limit: Option<usize>,
    dtype: Dtype,
    budget: u64,
) -> Result<Option<Dataset>> {
    let (header, _) = read_header(data)?;
    let Some((&n_total, rest)) = header.shape.split_first() else {
        return Ok(None); // refused by the in-memory loader with its own message
    };
    let n = limit.map_or(n_total, |m| m.min(n_total));
    let dim: usize = rest.iter().product();
    if n == 0 || dim == 0 {
        return Ok(None);
    }
    // u8 pixels become 4-byte values in memory; what counts is the stored size.
    if !exceeds(n, dim, dtype, budget) {
        return Ok(None);
    }
    if !matches!(header.dtype, NpyDtype::F32 | NpyDtype::F16) {
        // Under the default budget, load it in memory as before (the loader's own size
        // check refuses what the machine cannot hold); a budget the user set is a promise.
        if BUDGET.load(Ordering::Relaxed) == 0 {
            return Ok(None);
        }
        return Err(Error::data(
            data,
            format!(
                "{} values need {} MiB in memory, more than --memory-budget ({} MiB); only \
                 <f4 and <f2 files are streamed from disk: convert it first with \
                 `oracleflow convert npy:{} --out DATA.npy [--dtype f16]`, or raise \
                 --memory-budget",
                header.dtype.descr(),
                (n as u64 * (dim * dtype.bytes()) as u64) >> 20,
                budget >> 20,
                data.display()
            ),
        ));
    }
    open(data, labels, limit, dtype, budget).map(Some)
}

/// Opens `data` (`<f4` or `<f2`, shape (N, ...)) as a streamed dataset whatever its size.
pub fn open(
    data: &Path,
    labels: Option<&Path>,
    limit: Option<usize>,
    dtype: Dtype,
    budget: u64,
) -> Result<Dataset> {
    let (header, file_len) = read_header(data)?;
    let src = match header.dtype {
        NpyDtype::F32 => Dtype::F32,
        NpyDtype::F16 => Dtype::F16,
        other => {
            return Err(Error::data(
                data,
                format!(
                    "dtype {} cannot be streamed from disk (only <f4 and <f2); convert it \
                     first with `oracleflow convert npy:{} --out DATA.npy [--dtype f16]`",
                    other.descr(),
                    data.display()
                ),
            ))
        }
    };
    let Some((&n_total, rest)) = header.shape.split_first() else {
        return Err(Error::data(
            data,
            "a 0-d array; a dataset needs shape (N, ...)",
        ));
    };
    if header.n_elements() == 0 {
        return Err(Error::data(
            data,
            format!("empty array, shape {:?}", header.shape),
        ));
    }
    if n_total > u32::MAX as usize {
        return Err(Error::data(data, "more than 2^32 samples"));
    }
    let labels = labels
        .map(|path| npy::read_labels(path, n_total, data))
        .transpose()?;
    let n = keep_first(data, n_total, limit)?;
    let dim: usize = rest.iter().product();
    let dims = if rest.is_empty() {
        vec![1]
    } else {
        rest.to_vec()
    };
    let file = File::open(data).map_err(|e| Error::io(data, e))?;
    advise_sequential(&file);
    pin_mmap_threshold();
    let mut disk = DiskRows {
        path: data.to_path_buf(),
        file,
        data_offset: header.data_offset as u64,
        src,
        storage: dtype,
        n,
        dim,
        mean: vec![0.0; dim],
        order: None,
        budget,
        bytes_read: AtomicU64::new(0),
    };
    let key = SidecarKey::of(&disk, file_len)?;
    let (mean, norms) = match read_sidecar(&disk, &key) {
        Some(stats) => stats,
        None => {
            let stats = compute_stats(&mut disk)?;
            write_sidecar(&disk, &key, &stats.0, &stats.1);
            stats
        }
    };
    disk.mean = mean.clone();

    // Stable sort by label, as Dataset::from_raw: each class one contiguous row range.
    let mut order: Vec<u32> = (0..n as u32).collect();
    let labels = labels.map(|l| l[..n].to_vec());
    if let Some(l) = &labels {
        order.sort_by_key(|&i| l[i as usize]);
    }
    let identity = order.iter().enumerate().all(|(i, &o)| i as u32 == o);
    let sq_norms: Vec<f32> = order.iter().map(|&i| norms[i as usize]).collect();
    let labels = labels.map(|l| order.iter().map(|&i| l[i as usize]).collect::<Vec<_>>());
    let mut class_rows: Vec<(u32, Range<usize>)> = Vec::new();
    if let Some(l) = &labels {
        for (i, &c) in l.iter().enumerate() {
            match class_rows.last_mut() {
                Some((last, r)) if *last == c => r.end = i + 1,
                _ => class_rows.push((c, i..i + 1)),
            }
        }
    }
    if !identity {
        disk.order = Some(order.clone());
    }
    Ok(Dataset {
        name: data.display().to_string(),
        shape: SampleShape::array(dims),
        n_samples: n,
        dim,
        values: Values::Disk(Arc::new(disk)),
        mean,
        sq_norms,
        labels,
        original_index: order,
        class_rows,
    })
}

/// glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
/// which tile-sized blocks come from the threads' heaps and freed ones linger there: the
/// peak anonymous memory then grows past the budget by several tiles. Pinning the threshold
/// at its default keeps every tile-sized buffer its own mapping, returned on free.
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tunable; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn advise_sequential(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only sets a read-ahead hint.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// The two streaming passes: the f32 mean (summed in f64 in source order) and the squared
/// norms of the stored centred rows (source order), with a progress bar over both.
fn compute_stats(disk: &mut DiskRows) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, dim, src, storage) = (disk.n, disk.dim, disk.src, disk.storage);
    let bar = indicatif::ProgressBar::new(2 * n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} rows: mean and norms of {msg} ({eta} left)",
        )
        .expect("valid template"),
    );
    bar.set_message(disk.path.display().to_string());
    let mut mean64 = vec![0.0f64; dim];
    let mut bad: Option<usize> = None;
    visit_source(disk, |row, raw| {
        for (k, m) in mean64.iter_mut().enumerate() {
            let v = raw_value(src, raw, k);
            if !v.is_finite() && bad.is_none() {
                bad = Some(row);
            }
            *m += v;
        }
        bar.inc(1);
    })?;
    if let Some(row) = bad {
        return Err(Error::data(
            &disk.path,
            format!("sample {row} holds a non-finite value"),
        ));
    }
    let mean: Vec<f32> = mean64.iter().map(|m| (m / n as f64) as f32).collect();
    let mut norms = Vec::with_capacity(n);
    visit_source(disk, |_, raw| {
        let mut s = 0.0f64;
        centre_row(src, storage, raw, &mean, |_, v| {
            let x = v.to_f64();
            s += x * x;
        });
        norms.push(s as f32);
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    if let Some(row) = norms.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(&disk.path, super::too_large(row, storage)));
    }
    Ok((mean, norms))
}

/// Every source row 0..n in order, READ_BYTES at a time.
fn visit_source(disk: &DiskRows, mut f: impl FnMut(usize, &[u8])) -> Result<()> {
    let rb = disk.src_row_bytes();
    let most = (READ_BYTES / rb).max(1);
    let mut buf = Vec::new();
    for start in (0..disk.n).step_by(most) {
        let len = most.min(disk.n - start);
        buf.resize(len * rb, 0);
        disk.file
            .read_exact_at(&mut buf, disk.data_offset + (start * rb) as u64)
            .map_err(|e| Error::io(&disk.path, e))?;
        for (j, raw) in buf.chunks_exact(rb).enumerate() {
            f(start + j, raw);
        }
    }
    Ok(())
}

/// What a sidecar must match to be used.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SidecarKey {
    file_len: u64,
    mtime_ns: i128,
    data_offset: u64,
    n: u64,
    dim: u64,
    src: u8,
    storage: u8,
}

impl SidecarKey {
    fn of(disk: &DiskRows, file_len: u64) -> Result<SidecarKey> {
        let meta = disk.file.metadata().map_err(|e| Error::io(&disk.path, e))?;
        let mtime = meta.modified().map_err(|e| Error::io(&disk.path, e))?;
        let mtime_ns = match mtime.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        Ok(SidecarKey {
            file_len,
            mtime_ns,
            data_offset: disk.data_offset,
            n: disk.n as u64,
            dim: disk.dim as u64,
            src: disk.src as u8,
            storage: disk.storage as u8,
        })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(SIDECAR_MAGIC);
        b.extend_from_slice(&self.file_len.to_le_bytes());
        b.extend_from_slice(&self.mtime_ns.to_le_bytes());
        b.extend_from_slice(&self.data_offset.to_le_bytes());
        b.extend_from_slice(&self.n.to_le_bytes());
        b.extend_from_slice(&self.dim.to_le_bytes());
        b.push(self.src);
        b.push(self.storage);
        b
    }
}

/// The sidecar beside the data: `DATA.npy.oracleflow-stats`.
pub fn sidecar_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(SIDECAR_SUFFIX);
    PathBuf::from(name)
}

/// The fallback sidecar in the user's cache directory, named by a hash of the data's
/// absolute path.
fn cache_sidecar_path(data: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let abs = std::fs::canonicalize(data).ok()?;
    let name = abs.file_name()?.to_string_lossy().to_string();
    let hash = fnv1a(abs.as_os_str().as_encoded_bytes());
    Some(
        base.join("oracleflow")
            .join(format!("{hash:016x}-{name}{SIDECAR_SUFFIX}")),
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The stats from a sidecar (beside the data, else in the cache) matching `key`; `None`
/// when there is none, or it is stale, truncated or corrupt (then they are recomputed).
fn read_sidecar(disk: &DiskRows, key: &SidecarKey) -> Option<(Vec<f32>, Vec<f32>)> {
    let candidates = [
        Some(sidecar_path(&disk.path)),
        cache_sidecar_path(&disk.path),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|p| parse_sidecar(&std::fs::read(p).ok()?, key, disk.dim, disk.n))
}

fn parse_sidecar(
    bytes: &[u8],
    key: &SidecarKey,
    dim: usize,
    n: usize,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let head = key.bytes();
    let body = (dim + n) * 4;
    if bytes.len() != head.len() + body + 8 || bytes[..head.len()] != head[..] {
        return None;
    }
    let (content, sum) = bytes.split_at(bytes.len() - 8);
    if fnv1a(content).to_le_bytes() != sum {
        return None;
    }
    let floats: Vec<f32> = content[head.len()..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    if floats.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let (mean, norms) = floats.split_at(dim);
    Some((mean.to_vec(), norms.to_vec()))
}

/// Writes the sidecar (atomically: a temporary file renamed), beside the data or in the
/// cache; warns once when neither can be written.
fn write_sidecar(disk: &DiskRows, key: &SidecarKey, mean: &[f32], norms: &[f32]) {
    let mut bytes = key.bytes();
    bytes.reserve((mean.len() + norms.len()) * 4 + 8);
    for v in mean.iter().chain(norms) {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let sum = fnv1a(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    let write = |path: &Path| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    };
    let beside = sidecar_path(&disk.path);
    if write(&beside).is_ok() {
        return;
    }
    if let Some(cache) = cache_sidecar_path(&disk.path) {
        if write(&cache).is_ok() {
            return;
        }
    }
    if !WARNED_NO_CACHE.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: cannot write the stats sidecar {} (nor one in the cache directory): \
             the mean and norms of {} are recomputed on every run",
            beside.display(),
            disk.path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parsing() {
        assert_eq!(parse_budget_mib("1").unwrap(), 1 << 20);
        assert_eq!(parse_budget_mib("0.5").unwrap(), 1 << 19);
        for bad in ["0", "-1", "nan", "inf", "x", ""] {
            assert!(
                matches!(parse_budget_mib(bad), Err(Error::Input(_))),
                "{bad}"
            );
        }
    }
}
