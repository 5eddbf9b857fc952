//! Which logits tile shape the kernels are built with on this adapter: a short measured
//! autotune over [`LogitsTiles::CANDIDATES`], cached on disk.
//!
//! Why measured: the best register/workgroup-memory trade-off depends on the GPU (register
//! file, workgroup memory per SM/CU, warp or wave width, how its compiler schedules the
//! prefetch), which wgpu does not describe; a few timed calls settle it. Why only the
//! logits shape: the accumulate shape follows from D (`AccTiles::for_dim`), and the logits
//! GEMM carries half the FLOPs with the least reuse headroom.
//!
//! Where the choice comes from, in order:
//! 1. `GpuOptions::tiles` (tests, the tune itself): "option";
//! 2. `ORACLEFLOW_GPU_TILES=ROWSxQUERIESxK` (e.g. 128x128x8): "env"; malformed, or a shape
//!    the device cannot hold, is an input error;
//! 3. `ORACLEFLOW_GPU_TUNE=1`: measured now, whatever the adapter, and cached: "tuned";
//! 4. on a hardware adapter: the cache ("cached"), else measured now and cached ("tuned");
//! 5. on a software adapter (lavapipe): the default, unmeasured ("default"): timing a CPU
//!    emulation says nothing about GPUs and would cost every test process seconds.
//!
//! The cache is `$XDG_CACHE_HOME/oracleflow/gpu-tiles.json` (else `~/.cache/...`), one
//! JSON object keyed by adapter name, driver, driver info, backend and storage dtype, with
//! the candidates' measured rates beside each choice. An unreadable cache is ignored and an
//! unwritable one is a one-line warning: the choice still holds for this process.
//!
//! The measurement: each candidate that fits the device's workgroup memory runs a
//! representative call (B = 256, N = 16384, D = 784 on hardware; a small one on software)
//! on a backend of its own, once to warm up, then best of three.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use crate::dataset::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};
use crate::oracle::{Backend, CentredBatch};

use super::pipelines::LogitsTiles;
use super::GpuOptions;

/// Forces a logits tile shape, ROWSxQUERIESxK.
pub const TILES_ENV: &str = "ORACLEFLOW_GPU_TILES";
/// `1`: measure now (also on software adapters), ignoring the cache.
pub const TUNE_ENV: &str = "ORACLEFLOW_GPU_TUNE";

/// Where a tile choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileSource {
    Default,
    Cached,
    Tuned,
    Env,
    Option,
}

/// The logits tile shape of one backend and where it came from.
#[derive(Clone, Debug)]
pub struct TileChoice {
    pub tiles: LogitsTiles,
    pub source: TileSource,
    /// The measured GFLOP/s of each candidate (tuned or cached), fastest first.
    pub rates: Vec<(LogitsTiles, f64)>,
    /// The cache file read or written, and any warning about it.
    pub note: String,
}

impl fmt::Display for TileChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            TileSource::Default => "default".to_string(),
            TileSource::Cached => "cached".to_string(),
            TileSource::Tuned => "tuned".to_string(),
            TileSource::Env => TILES_ENV.to_string(),
            TileSource::Option => "option".to_string(),
        };
        write!(f, "logits tiles {} ({source}", self.tiles)?;
        if !self.note.is_empty() {
            write!(f, ", {}", self.note)?;
        }
        write!(f, ")")?;
        if !self.rates.is_empty() {
            let rates: Vec<String> = self
                .rates
                .iter()
                .map(|(t, r)| format!("{t} {r:.1}"))
                .collect();
            write!(f, "; GFLOP/s {}", rates.join(", "))?;
        }
        Ok(())
    }
}

/// The shape forced by [`TILES_ENV`], if set (an input error when malformed).
pub fn from_env() -> Result<Option<LogitsTiles>> {
    match std::env::var(TILES_ENV) {
        Ok(v) => LogitsTiles::parse(&v, TILES_ENV).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Input(format!(
            "{TILES_ENV}: not valid UTF-8 (expected ROWSxQUERIESxK, e.g. 128x128x8)"
        ))),
    }
}

fn tune_forced() -> bool {
    std::env::var(TUNE_ENV).is_ok_and(|v| v == "1" || v == "true")
}

/// The cache key of an adapter and storage dtype.
pub fn cache_key(info: &wgpu::AdapterInfo, storage: Dtype) -> String {
    format!(
        "{} | {} {} | {:?} | {:?}",
        info.name, info.driver, info.driver_info, info.backend, storage
    )
}

/// `$XDG_CACHE_HOME/oracleflow/gpu-tiles.json`, else under `~/.cache`.
pub fn cache_file() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("oracleflow").join("gpu-tiles.json"))
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Entry {
    tiles: LogitsTiles,
    /// (shape, GFLOP/s), fastest first
    rates: Vec<(LogitsTiles, f64)>,
}

type CacheMap = BTreeMap<String, Entry>;

fn read_map(path: &PathBuf) -> CacheMap {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Adds `entry` under `key` to the cache file (written whole to a temporary file, then
/// renamed into place, so a reader never sees half a file).
fn write_entry(path: &PathBuf, key: &str, entry: &Entry) -> std::io::Result<()> {
    let dir = path.parent().expect("cache file has a folder");
    std::fs::create_dir_all(dir)?;
    let mut map = read_map(path);
    map.insert(key.to_string(), entry.clone());
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(&map)?)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The default shape, or the first candidate that fits `workgroup_bytes`.
pub fn default_for(workgroup_bytes: u32) -> LogitsTiles {
    LogitsTiles::CANDIDATES
        .into_iter()
        .find(|t| t.workgroup_bytes() <= workgroup_bytes)
        .unwrap_or(LogitsTiles::SMALLEST)
}

/// What the backend opened on `info` builds its kernels with (see the module docs).
/// `measure` times one candidate (GFLOP/s); it is called only when tuning.
pub(super) fn choose(
    options: &GpuOptions,
    info: &wgpu::AdapterInfo,
    is_cpu: bool,
    storage: Dtype,
    workgroup_bytes: u32,
    measure: impl FnMut(LogitsTiles) -> Result<f64>,
) -> Result<TileChoice> {
    let device = Device {
        info,
        is_cpu,
        storage,
        workgroup_bytes,
    };
    choose_with(options, &device, cache_file(), tune_forced(), measure)
}

/// What [`choose`] knows of the device.
struct Device<'a> {
    info: &'a wgpu::AdapterInfo,
    is_cpu: bool,
    storage: Dtype,
    workgroup_bytes: u32,
}

/// [`choose`] with the cache file and the forced tune given (tests).
fn choose_with(
    options: &GpuOptions,
    device: &Device<'_>,
    file: Option<PathBuf>,
    forced: bool,
    measure: impl FnMut(LogitsTiles) -> Result<f64>,
) -> Result<TileChoice> {
    let Device {
        info,
        is_cpu,
        storage,
        workgroup_bytes,
    } = *device;
    let fits = |t: LogitsTiles, what: &str| -> Result<LogitsTiles> {
        t.check()
            .map_err(|why| Error::Input(format!("{what}: logits tiles {t}: {why}")))?;
        if t.workgroup_bytes() > workgroup_bytes {
            return Err(Error::Input(format!(
                "{what}: logits tiles {t} need {} B of workgroup memory, adapter {} has {} B",
                t.workgroup_bytes(),
                info.name,
                workgroup_bytes
            )));
        }
        Ok(t)
    };
    let plain = |tiles, source| TileChoice {
        tiles,
        source,
        rates: Vec::new(),
        note: String::new(),
    };
    if let Some(t) = options.tiles {
        return Ok(plain(fits(t, "GpuOptions::tiles")?, TileSource::Option));
    }
    if let Some(t) = from_env()? {
        return Ok(plain(fits(t, TILES_ENV)?, TileSource::Env));
    }
    if is_cpu && !forced {
        return Ok(plain(default_for(workgroup_bytes), TileSource::Default));
    }
    let key = cache_key(info, storage);
    if !forced {
        if let Some(path) = &file {
            if let Some(e) = read_map(path).get(&key) {
                if e.tiles.check().is_ok() && e.tiles.workgroup_bytes() <= workgroup_bytes {
                    return Ok(TileChoice {
                        tiles: e.tiles,
                        source: TileSource::Cached,
                        rates: e.rates.clone(),
                        note: path.display().to_string(),
                    });
                }
            }
        }
    }
    let rates = tune(workgroup_bytes, measure);
    let Some(&(tiles, _)) = rates.first() else {
        eprintln!("warning: no GPU tile candidate could be timed; using the default");
        return Ok(plain(default_for(workgroup_bytes), TileSource::Default));
    };
    let entry = Entry {
        tiles,
        rates: rates.clone(),
    };
    let note = match &file {
        Some(path) => match write_entry(path, &key, &entry) {
            Ok(()) => format!("cached in {}", path.display()),
            Err(e) => {
                eprintln!(
                    "warning: GPU tile choice not cached ({}: {e})",
                    path.display()
                );
                "not cached".into()
            }
        },
        None => {
            eprintln!("warning: GPU tile choice not cached (no HOME or XDG_CACHE_HOME)");
            "not cached".into()
        }
    };
    Ok(TileChoice {
        tiles,
        source: TileSource::Tuned,
        rates,
        note,
    })
}

/// Times every candidate that fits; (shape, GFLOP/s), fastest first. A candidate whose
/// timing fails is left out with a one-line warning.
fn tune(
    workgroup_bytes: u32,
    mut measure: impl FnMut(LogitsTiles) -> Result<f64>,
) -> Vec<(LogitsTiles, f64)> {
    let mut rates = Vec::new();
    for t in LogitsTiles::CANDIDATES {
        if t.workgroup_bytes() > workgroup_bytes {
            continue;
        }
        match measure(t) {
            Ok(r) => rates.push((t, r)),
            Err(e) => eprintln!("warning: GPU tiles {t} not timed: {e}"),
        }
    }
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    rates
}

/// GFLOP/s (4 B N D per call) of backends built with `tiles` on the adapter `options`
/// names, on random data in `dtype`: a warm-up call, then the best of three.
pub(super) fn time_candidate(
    tiles: LogitsTiles,
    options: &GpuOptions,
    dtype: Dtype,
    is_cpu: bool,
) -> Result<f64> {
    use rand::{Rng, SeedableRng};
    // Representative on a GPU; small on a CPU emulation (a forced tune, tests).
    let (n, d, b) = if is_cpu {
        (1024, 128, 32)
    } else {
        (16384, 784, 256)
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let vals: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let ds = Dataset::from_raw(
        "tile autotune",
        SampleShape::array(vec![d]),
        RawRows::F32(&vals),
        None,
        dtype,
    )?;
    let mut gpu = super::GpuBackend::with_options(
        &ds,
        GpuOptions {
            tiles: Some(tiles),
            ..options.clone()
        },
    )?;
    let x: Vec<f32> = (0..b * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let coefs = vec![[1.0f32 / d as f32, 0.5 / d as f32]; b];
    let batch = CentredBatch {
        x: &x,
        logit_coefs: &coefs,
        rows: 0..n,
    };
    gpu.posterior(&batch)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        gpu.posterior(&batch)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(4.0 * (n * d * b) as f64 / best / 1e9)
}

/// The tile choices of the preferred adapter, one line per storage dtype it supports,
/// for `oracleflow info` (tunes now on a hardware adapter without a cached choice).
pub fn report() -> Result<Vec<String>> {
    // A malformed override is an input error even where no adapter opens.
    from_env()?;
    let gpu = super::device::open(false, true, None)?;
    let workgroup_bytes = gpu.limits.max_compute_workgroup_storage_size;
    let mut dtypes = vec![Dtype::F32];
    if gpu.features.contains(wgpu::Features::SHADER_F16) {
        dtypes.push(Dtype::F16);
    }
    let options = GpuOptions::default();
    let mut out = Vec::new();
    for dtype in dtypes {
        let choice = choose(
            &options,
            &gpu.info,
            gpu.is_cpu(),
            dtype,
            workgroup_bytes,
            |t| time_candidate(t, &options, dtype, gpu.is_cpu()),
        )?;
        out.push(format!("{dtype:?} storage: {choice}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: "test adapter".into(),
            vendor: 0,
            device: 0,
            device_type: wgpu::DeviceType::DiscreteGpu,
            driver: "drv".into(),
            driver_info: "1.0".into(),
            backend: wgpu::Backend::Vulkan,
            ..wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan)
        }
    }

    #[test]
    fn the_cache_round_trips_and_keeps_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("gpu-tiles.json");
        let a = Entry {
            tiles: LogitsTiles::CANDIDATES[2],
            rates: vec![
                (LogitsTiles::CANDIDATES[2], 3.0),
                (LogitsTiles::DEFAULT, 2.0),
            ],
        };
        write_entry(&path, "a", &a).unwrap();
        let b = Entry {
            tiles: LogitsTiles::DEFAULT,
            rates: vec![],
        };
        write_entry(&path, "b", &b).unwrap();
        let map = read_map(&path);
        assert_eq!(map["a"].tiles, a.tiles);
        assert_eq!(map["a"].rates, a.rates);
        assert_eq!(map["b"].tiles, LogitsTiles::DEFAULT);
        // A corrupt file reads as empty and is replaced by the next write.
        std::fs::write(&path, "{not json").unwrap();
        assert!(read_map(&path).is_empty());
        write_entry(&path, "a", &a).unwrap();
        assert_eq!(read_map(&path)["a"].tiles, a.tiles);
    }

    #[test]
    fn options_and_small_devices_decide_without_measuring() {
        let never = |_| -> Result<f64> { panic!("must not measure") };
        let forced = GpuOptions {
            tiles: Some(LogitsTiles::SMALLEST),
            ..Default::default()
        };
        let c = choose(&forced, &info(), false, Dtype::F32, 32 << 10, never).unwrap();
        assert_eq!(
            (c.tiles, c.source),
            (LogitsTiles::SMALLEST, TileSource::Option)
        );
        // A shape the device cannot hold is an input error naming both sizes.
        let big = GpuOptions {
            tiles: Some(LogitsTiles::DEFAULT),
            ..Default::default()
        };
        let e = choose(&big, &info(), false, Dtype::F32, 16 << 10, never).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        assert!(e.to_string().contains("16384 B"), "{e}");
        // Software adapters take the default that fits, unmeasured (unless the tune is
        // forced through the environment, which this test process does not set).
        if std::env::var_os(TUNE_ENV).is_none() && std::env::var_os(TILES_ENV).is_none() {
            let c = choose(
                &GpuOptions::default(),
                &info(),
                true,
                Dtype::F32,
                32 << 10,
                never,
            )
            .unwrap();
            assert_eq!(
                (c.tiles, c.source),
                (LogitsTiles::DEFAULT, TileSource::Default)
            );
            assert_eq!(c.to_string(), "logits tiles 128x128x8 (default)");
        }
        assert_eq!(default_for(16 << 10), LogitsTiles::SMALLEST);
        assert_eq!(default_for(20 << 10), LogitsTiles::CANDIDATES[1]);
    }

    /// A hardware adapter: measured once and cached per key; the next backend reads the
    /// cache without measuring; another dtype is another key; a forced tune measures
    /// again; a cached shape the device cannot hold is measured afresh.
    #[test]
    fn hardware_choices_are_measured_once_then_cached() {
        let dir = tempfile::tempdir().unwrap();
        let file = Some(dir.path().join("oracleflow").join("gpu-tiles.json"));
        let info = info();
        let dev = |storage, workgroup_bytes| Device {
            info: &info,
            is_cpu: false,
            storage,
            workgroup_bytes,
        };
        let none = GpuOptions::default();
        let mut calls = 0;
        // 64 x 128 fastest.
        let mut measure = |t: LogitsTiles| -> Result<f64> {
            calls += 1;
            Ok(if t == LogitsTiles::CANDIDATES[4] {
                5.0
            } else {
                1.0
            })
        };
        let mut choose = |dtype, workgroup_bytes, retune| {
            choose_with(
                &none,
                &dev(dtype, workgroup_bytes),
                file.clone(),
                retune,
                &mut measure,
            )
            .unwrap()
        };
        let c = choose(Dtype::F32, 32 << 10, false);
        assert_eq!(
            (c.tiles, c.source),
            (LogitsTiles::CANDIDATES[4], TileSource::Tuned)
        );
        assert_eq!(c.rates.len(), LogitsTiles::CANDIDATES.len());
        assert!(c.to_string().contains("tuned, cached in"), "{c}");
        let c = choose(Dtype::F32, 32 << 10, false);
        assert_eq!(
            (c.tiles, c.source),
            (LogitsTiles::CANDIDATES[4], TileSource::Cached)
        );
        assert_eq!(c.rates.len(), LogitsTiles::CANDIDATES.len());
        let after_first = LogitsTiles::CANDIDATES.len();
        assert_eq!(
            choose(Dtype::F16, 32 << 10, false).source,
            TileSource::Tuned
        );
        assert_eq!(choose(Dtype::F32, 32 << 10, true).source, TileSource::Tuned);
        // 64 x 128 (18 KiB) does not fit 16 KiB: measured again among what fits.
        let c = choose(Dtype::F32, 16 << 10, false);
        assert_eq!(
            (c.tiles, c.source),
            (LogitsTiles::SMALLEST, TileSource::Tuned)
        );
        assert_eq!(calls, 3 * after_first + 1);
        // An unwritable cache: still a choice, noted.
        let c = choose_with(
            &none,
            &dev(Dtype::F32, 32 << 10),
            Some(PathBuf::from("/proc/no/such/dir/gpu-tiles.json")),
            false,
            |_| Ok(1.0),
        )
        .unwrap();
        assert_eq!(
            (c.source, c.note.as_str()),
            (TileSource::Tuned, "not cached")
        );
    }

    #[test]
    fn the_tune_keeps_the_fastest_that_fits_and_skips_failures() {
        let rates = tune(20 << 10, |t| {
            if t == LogitsTiles::SMALLEST {
                Err(Error::Gpu("boom".into()))
            } else {
                Ok(t.kt as f64 * 10.0 - t.wg_q as f64)
            }
        });
        assert!(rates.iter().all(|(t, _)| t.workgroup_bytes() <= 20 << 10));
        assert!(!rates.iter().any(|(t, _)| *t == LogitsTiles::SMALLEST));
        assert!(rates.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(rates[0].0, LogitsTiles::CANDIDATES[1]);
    }
}
