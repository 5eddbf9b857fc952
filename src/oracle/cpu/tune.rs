//! Which GEMM library and tile size the CPU dense pass uses on this machine: a short
//! measured autotune (about a second, once per machine), cached on disk.
//!
//! Candidates: the `gemm` crate, faer, and OpenBLAS when one can be loaded at run time
//! (see [`super::blas`]), each with 256-, 512- and 1024-row tiles, and the native AVX-512
//! kernels (see [`super::native`]) with 256-row tiles where the CPU has AVX-512F. Each is timed on the
//! real dense pass (B = 256, N = 8192, D = 512, random data) in interleaved rounds, best
//! of three; the fastest of those that keep results bitwise independent of the batch
//! ([`GemmPlan::batch_invariant`]) wins, or the native kernels where they are within 2% of
//! it (see [`best`]); the others are reported, and can be forced.
//! The result is cached in `$XDG_CACHE_HOME/oracleflow/` (else `~/.cache/oracleflow/`,
//! else the temporary folder), one file per key (CPU model, thread count, build profile,
//! whether an OpenBLAS was found and the native kernels run); the first process to write a key wins, so
//! processes started together all use the same choice (results differ between choices
//! only by f32 rounding, but a run should not change its answer midway).
//!
//! `ORACLEFLOW_CPU_GEMM=LIB[:TILE_ROWS]` (LIB: gemm, faer or openblas) forces a choice
//! and skips the measurement.

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use crate::dataset::{Dataset, Dtype, RawRows, SampleShape};
use crate::error::{Error, Result};
use crate::oracle::CentredBatch;

/// The environment variable that forces a choice.
pub const ENV: &str = "ORACLEFLOW_CPU_GEMM";

/// Tile sizes the autotune tries.
pub const TILE_CANDIDATES: [usize; 3] = [256, 512, 1024];

/// Which library runs the dense pass's two GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmLib {
    /// The `gemm` crate (pure Rust, always there)
    Gemm,
    /// faer's matmul (pure Rust, always there)
    Faer,
    /// OpenBLAS loaded at run time (only where one is installed)
    Openblas,
    /// This crate's AVX-512 kernels (`super::native`; only where the CPU has AVX-512F)
    Native,
}

impl GemmLib {
    pub const ALL: [GemmLib; 4] = [
        GemmLib::Gemm,
        GemmLib::Faer,
        GemmLib::Openblas,
        GemmLib::Native,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmLib::Gemm => "gemm",
            GemmLib::Faer => "faer",
            GemmLib::Openblas => "openblas",
            GemmLib::Native => "native",
        }
    }

    /// Whether this library can run here (OpenBLAS: whether one was found).
    pub fn available(self) -> bool {
        match self {
            GemmLib::Openblas => super::blas::get().is_some(),
            GemmLib::Native => super::native::available(),
            _ => true,
        }
    }

    /// The libraries this machine has.
    pub fn available_here() -> Vec<GemmLib> {
        Self::ALL.into_iter().filter(|l| l.available()).collect()
    }

    /// What the library is, in words (OpenBLAS: the file and its build configuration).
    pub fn describe(self) -> String {
        match self {
            GemmLib::Gemm => "gemm crate 0.19".into(),
            GemmLib::Faer => "faer 0.22 matmul".into(),
            GemmLib::Native => "oracleflow's AVX-512 kernels".into(),
            GemmLib::Openblas => super::blas::get()
                .map(|b| format!("OpenBLAS {}", b.describe))
                .unwrap_or_else(|| "OpenBLAS (not found)".into()),
        }
    }
}

/// The dense pass's GEMM library and dataset rows per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GemmPlan {
    pub lib: GemmLib,
    pub tile_rows: usize,
}

impl Default for GemmPlan {
    fn default() -> Self {
        GemmPlan {
            lib: GemmLib::Gemm,
            tile_rows: super::TILE_ROWS,
        }
    }
}

impl fmt::Display for GemmPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} GEMMs, {}-row tiles", self.lib.name(), self.tile_rows)
    }
}

impl GemmPlan {
    /// Parses `LIB[:TILE_ROWS]`; `what` names the flag or variable in the error.
    pub fn parse(s: &str, what: &str) -> Result<GemmPlan> {
        let (lib, tile) = match s.split_once(':') {
            Some((l, t)) => (l, Some(t)),
            None => (s, None),
        };
        let lib = match lib.trim().to_ascii_lowercase().as_str() {
            "gemm" => GemmLib::Gemm,
            "faer" => GemmLib::Faer,
            "openblas" => GemmLib::Openblas,
            "native" => GemmLib::Native,
            other => {
                return Err(Error::Input(format!(
                    "{what}: unknown GEMM library {other:?} (gemm, faer, openblas or native)"
                )))
            }
        };
        if !lib.available() {
            return Err(Error::Input(match lib {
                GemmLib::Native => {
                    format!("{what}: native asked for but this CPU has no AVX-512F")
                }
                _ => format!(
                    "{what}: openblas asked for but none could be loaded (install \
                     libopenblas0-pthread or set ORACLEFLOW_OPENBLAS to a libopenblas.so)"
                ),
            }));
        }
        let tile_rows = match tile {
            None => super::TILE_ROWS,
            Some(t) => match t.trim().parse::<usize>() {
                Ok(v) if (16..=16384).contains(&v) => v,
                _ => {
                    return Err(Error::Input(format!(
                        "{what}: tile rows {t:?} is not a number in 16..=16384"
                    )))
                }
            },
        };
        Ok(GemmPlan { lib, tile_rows })
    }

    /// Whether a query's result is bitwise the same whatever batch it arrives in (sampling
    /// promises the same samples across --batch; tests/cpu_gemm.rs checks it). faer keeps
    /// it at every shape tried; the gemm crate with 256-row tiles (other tile sizes, 37 and
    /// 1024 rows, change its blocking with the number of queries); OpenBLAS does not (its
    /// small-matrix kernels depend on the batch); the native kernels keep it by construction
    /// (one FMA chain per element, whatever its position). The others are measured and
    /// reported but chosen only when forced.
    pub fn batch_invariant(&self) -> bool {
        match self.lib {
            GemmLib::Faer | GemmLib::Native => true,
            GemmLib::Gemm => self.tile_rows == 256,
            GemmLib::Openblas => false,
        }
    }

    /// Every candidate the autotune measures on this machine. The native kernels only with
    /// 256-row tiles: they read the tile's rows in place in both GEMMs, and a larger tile
    /// leaves the L2 cache between them at D = 784 (Fashion-MNIST, B = 256: 0.243 s per
    /// evaluation at 512 rows against 0.234 s at 256), which the autotune's D = 512
    /// problem does not show (it measured 512 rows 0.2% ahead).
    pub fn candidates() -> Vec<GemmPlan> {
        GemmLib::available_here()
            .into_iter()
            .flat_map(|lib| {
                TILE_CANDIDATES
                    .into_iter()
                    .filter(move |&t| lib != GemmLib::Native || t == super::TILE_ROWS)
                    .map(move |tile_rows| GemmPlan { lib, tile_rows })
            })
            .collect()
    }
}

/// One candidate's measured rate.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub plan: GemmPlan,
    /// 4 B N D / best time, in GFLOP/s, on the autotune's problem
    pub gflops: f64,
}

/// Where the choice came from.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `ORACLEFLOW_CPU_GEMM` or a flag
    Forced,
    /// Read from the cache file
    Cached,
    /// Measured by this process (and cached when the cache could be written)
    Measured,
}

/// The choice, with its evidence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuning {
    pub plan: GemmPlan,
    pub source: Source,
    /// CPU model, thread count and build profile the choice is for
    pub key: String,
    /// The candidates' rates when measured (here or by the process that wrote the cache)
    pub rates: Vec<Rate>,
    pub cache_file: Option<PathBuf>,
    /// What went wrong reading or writing the cache, if anything (the choice still holds)
    pub note: String,
}

impl fmt::Display for Tuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = match self.source {
            Source::Forced => format!("forced by {ENV} or a flag"),
            Source::Cached => format!(
                "autotuned, cached in {}",
                self.cache_file
                    .as_ref()
                    .map_or("?".into(), |p| p.display().to_string())
            ),
            Source::Measured => "autotuned by this run".into(),
        };
        write!(f, "cpu GEMM: {} ({src})", self.plan)?;
        if !self.plan.batch_invariant() {
            write!(
                f,
                "\n  note: with this choice a query's result may differ in the last bits \
                 with the batch it arrives in"
            )?;
        }
        if !self.rates.is_empty() {
            let rates: Vec<String> = self
                .rates
                .iter()
                .map(|r| {
                    let star = if r.plan.batch_invariant() { "" } else { "*" };
                    format!(
                        "{}:{}{star} {:.1}",
                        r.plan.lib.name(),
                        r.plan.tile_rows,
                        r.gflops
                    )
                })
                .collect();
            write!(
                f,
                "\n  measured GFLOP/s (B 256, N 8192, D 512; * = not batch-invariant, never \
                 chosen unless forced): {}",
                rates.join(", ")
            )?;
        }
        if !self.note.is_empty() {
            write!(f, "\n  note: {}", self.note)?;
        }
        Ok(())
    }
}

static TUNING: OnceLock<Tuning> = OnceLock::new();

/// The choice for this process: forced, cached, or measured now (once).
pub fn tuning() -> &'static Tuning {
    TUNING.get_or_init(|| {
        let threads = rayon::current_num_threads();
        let key = cache_key(threads);
        if let Ok(v) = std::env::var(ENV) {
            match GemmPlan::parse(&v, ENV) {
                Ok(plan) => return forced(plan, key),
                Err(e) => eprintln!("warning: {e}; autotuning instead"),
            }
        }
        choose(threads, key)
    })
}

fn forced(plan: GemmPlan, key: String) -> Tuning {
    Tuning {
        plan,
        source: Source::Forced,
        key,
        rates: Vec::new(),
        cache_file: None,
        note: String::new(),
    }
}

/// Forces `plan` for this process (a flag); an error when the dense pass already ran with
/// another choice.
pub fn force(plan: GemmPlan) -> Result<()> {
    let key = cache_key(rayon::current_num_threads());
    let t = TUNING.get_or_init(|| forced(plan, key));
    if t.plan != plan {
        return Err(Error::Input(format!(
            "--cpu-gemm: the CPU backend already runs with {}",
            t.plan
        )));
    }
    Ok(())
}

fn cache_key(threads: usize) -> String {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!(
        "{} | {threads} threads | {profile} | openblas {} | native {} | candidates 3",
        crate::bench::peers::cpu_model(),
        if GemmLib::Openblas.available() {
            "found"
        } else {
            "absent"
        },
        if GemmLib::Native.available() {
            "avx512"
        } else {
            "absent"
        }
    )
}

/// Where the choice for `key` may be cached: the user's cache folder, then the system's
/// temporary folder (so that a read-only or missing home does not make every process
/// tune again). A readable name plus a hash of the whole key.
fn cache_files(key: &str) -> Vec<PathBuf> {
    let user = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("oracleflow"));
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let name = format!("cpu-gemm-{hash:016x}.json");
    user.into_iter()
        .chain([std::env::temp_dir().join("oracleflow-cache")])
        .map(|dir| dir.join(&name))
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cached {
    key: String,
    plan: GemmPlan,
    rates: Vec<Rate>,
}

fn read_cache(path: &PathBuf, key: &str) -> Option<Cached> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: Cached = serde_json::from_str(&text).ok()?;
    (c.key == key && c.plan.lib.available() && c.plan.tile_rows > 0).then_some(c)
}

fn choose(threads: usize, key: String) -> Tuning {
    let files = cache_files(&key);
    for f in &files {
        if let Some(c) = read_cache(f, &key) {
            return Tuning {
                plan: c.plan,
                source: Source::Cached,
                key,
                rates: c.rates,
                cache_file: Some(f.clone()),
                note: String::new(),
            };
        }
    }
    let rates = measure(threads, 3);
    let plan = best(&rates);
    let mut tuning = Tuning {
        plan,
        source: Source::Measured,
        key: key.clone(),
        rates: rates.clone(),
        cache_file: None,
        note: String::new(),
    };
    let cached = Cached { key, plan, rates };
    let mut errors = Vec::new();
    for f in files {
        match write_first(&f, &cached) {
            Ok(None) => {
                tuning.cache_file = Some(f);
                return tuning;
            }
            // Another process wrote the choice first: use it, so all agree.
            Ok(Some(theirs)) => {
                tuning.plan = theirs.plan;
                tuning.rates = theirs.rates;
                tuning.source = Source::Cached;
                tuning.cache_file = Some(f);
                return tuning;
            }
            Err(e) => errors.push(format!("{}: {e}", f.display())),
        }
    }
    tuning.note = format!("cache not written ({})", errors.join("; "));
    tuning
}

/// Writes `c` to `path` unless a valid file is there already (then returns that one).
/// Atomic: written to a temporary file, then hard-linked into place, which fails when the
/// name exists (a stale or unreadable file is replaced).
fn write_first(path: &PathBuf, c: &Cached) -> std::io::Result<Option<Cached>> {
    let dir = path.parent().expect("cache file has a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(c)?)?;
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Some(theirs) = read_cache(path, &c.key) {
                return Ok(Some(theirs));
            }
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Within this share of the fastest rate, the native kernels are preferred (see [`best`]).
const NATIVE_TIE: f64 = 0.02;

/// The fastest batch-invariant candidate (the default plan when none was measured), or the
/// native kernels where they are within `NATIVE_TIE` of it. The autotune's problem cannot
/// tell them from faer (200.8 against 201.7 GFLOP/s here, the order changing from run to
/// run), while on the real pass they are the faster (Fashion-MNIST, B = 256: 0.233 - 0.236 s
/// per evaluation against faer's 0.235 - 0.242) and the closer to f64: their logits sum in
/// blocks of 256 products (over a whole trajectory, dense x1_hat within 6.7e-6 of f64
/// against 1.2e-5 with faer).
pub fn best(rates: &[Rate]) -> GemmPlan {
    let invariant = || rates.iter().filter(|r| r.plan.batch_invariant());
    let Some(top) = invariant().max_by(|a, b| a.gflops.total_cmp(&b.gflops)) else {
        return GemmPlan::default();
    };
    invariant()
        .filter(|r| r.plan.lib == GemmLib::Native && r.gflops >= (1.0 - NATIVE_TIE) * top.gflops)
        .max_by(|a, b| a.gflops.total_cmp(&b.gflops))
        .unwrap_or(top)
        .plan
}

/// `len` fixed pseudo-random values of about the spread of U(-0.5, 0.5) (a seeded
/// Gaussian draw scaled by 0.29), for timings whose work does not depend on the values.
pub(crate) fn bench_values(len: usize, seed: u64) -> Vec<f32> {
    let mut v = crate::dataset::synthetic::gaussian(len, 1, seed);
    v.iter_mut().for_each(|x| *x *= 0.29);
    v
}

/// Times every candidate on the dense pass (B = 256, N = 8192, D = 512, `threads` tasks):
/// one warm-up each, then `rounds` interleaved rounds, best time of each.
pub fn measure(threads: usize, rounds: usize) -> Vec<Rate> {
    let (n, d, b) = (8192usize, 512usize, 256usize);
    // A fixed pseudo-random set: the values do not change the work done.
    let values = bench_values(n * d, 0x9e37_79b9);
    let Ok(ds) = Dataset::from_raw(
        "autotune",
        SampleShape::array(vec![d]),
        RawRows::F32(&values),
        None,
        Dtype::F32,
    ) else {
        return Vec::new();
    };
    let x = bench_values(b * d, 0x7f4a_7c15);
    let coefs = vec![[2.0f32, 0.5f32]; b];
    let batch = CentredBatch {
        x: &x,
        logit_coefs: &coefs,
        rows: 0..n,
    };
    let plans = GemmPlan::candidates();
    let mut best_s = vec![f64::INFINITY; plans.len()];
    for round in 0..=rounds {
        for (p, plan) in plans.iter().enumerate() {
            let (wall, cpu) = (Instant::now(), process_cpu_seconds());
            std::hint::black_box(super::dense_pass(&ds, &batch, threads, *plan));
            // On a machine shared with other jobs, wall time mostly measures how long this
            // process waited for a core; CPU time per thread measures the work. Whichever
            // is smaller, with CPU time spread over the threads that ran.
            let cpu = (process_cpu_seconds() - cpu) / threads as f64;
            let secs = wall
                .elapsed()
                .as_secs_f64()
                .min(if cpu > 0.0 { cpu } else { f64::MAX });
            if round > 0 {
                best_s[p] = best_s[p].min(secs);
            }
        }
    }
    let flops = 4.0 * (b * n * d) as f64;
    plans
        .into_iter()
        .zip(best_s)
        .map(|(plan, s)| Rate {
            plan,
            gflops: flops / s / 1e9,
        })
        .collect()
}

/// CPU seconds this process has used (all threads); 0 where the clock is unavailable.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plans_and_refuses_bad_ones() {
        assert_eq!(
            GemmPlan::parse("faer:512", "x").unwrap(),
            GemmPlan {
                lib: GemmLib::Faer,
                tile_rows: 512
            }
        );
        assert_eq!(GemmPlan::parse("GEMM", "x").unwrap(), GemmPlan::default());
        for bad in ["mkl", "gemm:0", "faer:abc", "gemm:99999"] {
            let e = GemmPlan::parse(bad, "--cpu-gemm").unwrap_err().to_string();
            assert!(e.contains("--cpu-gemm"), "{bad}: {e}");
        }
    }

    #[test]
    fn native_kernels_win_a_near_tie_only() {
        let rate = |lib, tile_rows, gflops| Rate {
            plan: GemmPlan { lib, tile_rows },
            gflops,
        };
        let mut rates = vec![
            rate(GemmLib::Gemm, 256, 190.0),
            rate(GemmLib::Faer, 256, 201.7),
            rate(GemmLib::Openblas, 512, 250.0), // not batch-invariant: never chosen
            rate(GemmLib::Native, 256, 200.8),
        ];
        assert_eq!(best(&rates).lib, GemmLib::Native);
        rates[3].gflops = 190.0;
        assert_eq!(best(&rates).lib, GemmLib::Faer);
        assert_eq!(best(&[]), GemmPlan::default());
    }

    #[test]
    fn cache_first_writer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("c.json");
        let mine = Cached {
            key: "k".into(),
            plan: GemmPlan::default(),
            rates: Vec::new(),
        };
        assert!(write_first(&path, &mine).unwrap().is_none());
        let other = Cached {
            key: "k".into(),
            plan: GemmPlan {
                lib: GemmLib::Faer,
                tile_rows: 1024,
            },
            rates: Vec::new(),
        };
        let theirs = write_first(&path, &other).unwrap().expect("first one kept");
        assert_eq!(theirs.plan, GemmPlan::default());
        // A file for another key is not a valid cache: replaced.
        let stale = Cached {
            key: "other".into(),
            plan: other.plan,
            rates: Vec::new(),
        };
        std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
        assert!(write_first(&path, &other).unwrap().is_none());
        assert_eq!(read_cache(&path, "k").unwrap().plan, other.plan);
    }
}
