//! MPI across processes and nodes (cargo feature `mpi`).
//!
//! Under `mpirun -n R oracleflow ...` (detected by the launcher's environment, so a build
//! with the feature still runs standalone) rank r holds only the source rows
//! `[N r / R, N (r+1) / R)`:
//! - `.npy` data (f32 or f16 values) is memory-mapped and only that slice is read; the
//!   dataset mean is an allreduce of the ranks' f64 sums, so every rank centres alike;
//! - every other loader loads the whole dataset and keeps the rank's rows (the mean is
//!   then computed from all rows on each rank, identically).
//!
//! Each evaluation computes the rank's [`Partial`] over its rows on its own backend
//! (`--backend`, `--devices`), then [`allreduce`] merges the ranks' states with the merge
//! rule: a max-allreduce of the per-query maxima m, each rank rescales its sums by
//! exp(m_rank - m) and a sum-allreduce (in f64) adds them; the top-1 index is a
//! min-allreduce over the ranks holding the maximum. Every rank ends with the same exact
//! result. Commands run on every rank with the same queries and seed; rank 0 alone writes
//! outputs and prints (other ranks print only errors).

use std::sync::OnceLock;

use crate::dataset::Dataset;
use crate::error::Result;
use crate::oracle::{Backend, CentredBatch, Partial, Posterior};

/// This process's place among the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub size: usize,
}

impl Rank {
    /// The source rows `[n r / R, n (r+1) / R)` of this rank.
    pub fn rows(&self, n: usize) -> std::ops::Range<usize> {
        n * self.rank / self.size..n * (self.rank + 1) / self.size
    }
}

static RANK: OnceLock<Rank> = OnceLock::new();

/// The rank, when this process is one of several MPI ranks (set by [`init`]).
pub fn current() -> Option<Rank> {
    RANK.get().copied()
}

/// Whether this process writes outputs and prints: not an MPI rank other than 0.
pub fn is_root() -> bool {
    current().is_none_or(|r| r.rank == 0)
}

/// Whether an MPI launcher started this process (OpenMPI's mpirun, or Slurm's srun / a
/// PMI launcher).
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "SLURM_STEP_NUM_TASKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Rank 0's `values` on every rank (a no-op outside MPI).
pub fn broadcast_from_root(values: &mut Vec<i64>) {
    #[cfg(feature = "mpi")]
    if current().is_some() {
        with_mpi::broadcast(values);
    }
    #[cfg(not(feature = "mpi"))]
    let _ = values;
}

#[cfg(feature = "mpi")]
pub use with_mpi::*;

#[cfg(feature = "mpi")]
mod with_mpi {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::*;
    use crate::dataset::spec::{DataSpec, Source};
    use crate::dataset::{npy, Dtype, RawRows, SampleShape};
    use crate::error::Error;

    pub use mpi::environment::Universe;

    /// Starts MPI when an MPI launcher started this process; the returned universe must
    /// live until the end of `main` (dropping it finalizes MPI).
    pub fn init() -> Option<Universe> {
        if !launched_by_mpi() {
            return None;
        }
        let universe = mpi::initialize()?;
        let world = universe.world();
        let _ = RANK.set(Rank {
            rank: world.rank() as usize,
            size: world.size() as usize,
        });
        Some(universe)
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// Ends every rank (after an error on one: the others would wait forever in the next
    /// collective).
    pub fn abort(code: i32) -> ! {
        world().abort(code)
    }

    /// Rank 0's vector on every rank: its length, then its values.
    pub fn broadcast(values: &mut Vec<i64>) {
        use mpi::topology::Communicator as _;
        let comm = world();
        let root = comm.process_at_rank(0);
        let mut len = values.len() as u64;
        mpi::collective::Root::broadcast_into(&root, &mut len);
        values.resize(len as usize, 0);
        mpi::collective::Root::broadcast_into(&root, &mut values[..]);
    }

    /// Sums `values` over the ranks (in place).
    pub fn sum_f64(values: &mut [f64]) {
        let send = values.to_vec();
        world().all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    /// The rank's share of the dataset `spec` (see the module docs).
    pub fn load(spec: &str, dtype: Dtype, rank: Rank) -> Result<Dataset> {
        let parsed = DataSpec::parse(spec)?;
        if let Source::Npy { data, labels } = &parsed.source {
            if let Some(ds) = load_npy_part(data, labels.as_deref(), parsed.limit, dtype, rank)? {
                let mut ds = ds;
                ds.name = spec.trim().to_string();
                return Ok(ds);
            }
        }
        let ds = crate::dataset::load(spec, dtype)?;
        check_enough(ds.n_samples(), rank, spec)?;
        let rows = rank.rows(ds.n_samples());
        Ok(ds.keep_source_range(rows.start as u32..rows.end as u32))
    }

    fn check_enough(n: usize, rank: Rank, what: &str) -> Result<()> {
        if n < rank.size {
            return Err(Error::Input(format!(
                "{what}: {n} samples for {} MPI ranks (each rank needs one)",
                rank.size
            )));
        }
        Ok(())
    }

    /// The slice of an f32 or f16 .npy; `None` for other value types (loaded whole).
    fn load_npy_part(
        data: &std::path::Path,
        labels: Option<&std::path::Path>,
        limit: Option<usize>,
        dtype: Dtype,
        rank: Rank,
    ) -> Result<Option<Dataset>> {
        let map = npy::map_file(data)?;
        let header = npy::parse_header(&map, data)?;
        let f32_values = match header.dtype {
            npy::NpyDtype::F32 => true,
            npy::NpyDtype::F16 => false,
            _ => return Ok(None),
        };
        let Some((&n_total, rest)) = header.shape.split_first() else {
            return Ok(None);
        };
        let n = limit.map_or(n_total, |l| l.min(n_total));
        let dim: usize = rest.iter().product::<usize>().max(1);
        if n == 0 || dim == 0 {
            return Ok(None);
        }
        check_enough(n, rank, &data.display().to_string())?;
        let rows = rank.rows(n);
        let size = header.dtype.size();
        let body = &map[header.data_offset + rows.start * dim * size
            ..header.data_offset + rows.end * dim * size];
        let labels = labels
            .map(|p| npy::read_labels(p, n_total, data))
            .transpose()?
            .map(|l| l[rows.clone()].to_vec());
        let shape = SampleShape::array(if rest.is_empty() {
            vec![1]
        } else {
            rest.to_vec()
        });
        let f32s;
        let f16s;
        let raw = if f32_values {
            f32s = npy::f32s(body);
            RawRows::F32(&f32s)
        } else {
            f16s = npy::f16s(body);
            RawRows::F16(&f16s)
        };
        // The global mean: the ranks' f64 sums added, divided as the whole-file load does.
        let mut sums = vec![0.0f64; dim + 1];
        for i in 0..rows.len() {
            for (k, s) in sums[..dim].iter_mut().enumerate() {
                *s += raw.get(i * dim + k);
            }
        }
        sums[dim] = rows.len() as f64;
        sum_f64(&mut sums);
        let mean: Vec<f32> = sums[..dim].iter().map(|s| (s / sums[dim]) as f32).collect();
        Dataset::from_raw_part(
            data.display().to_string(),
            shape,
            raw,
            labels,
            dtype,
            Some((&mean, rows.start as u32)),
        )
        .map(Some)
    }

    /// Merges the ranks' partial states into the state of all rows, on every rank.
    /// Top-1 indices must already be source indices (the same numbering on every rank).
    pub fn allreduce(part: &mut Partial) {
        let comm = world();
        let nq = part.n_queries();
        let dim = part.dim;
        let local_max: Vec<f32> = part
            .states
            .iter()
            .map(|s| {
                if s.sum > 0.0 {
                    s.max
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mut max = vec![0.0f32; nq];
        comm.all_reduce_into(&local_max[..], &mut max[..], SystemOperation::max());
        // Every sum rescaled to the global max, then added in f64.
        let per_q = 7;
        let mut buf = vec![0.0f64; nq * per_q + nq * dim + 2];
        for q in 0..nq {
            let s = part.states[q];
            if s.sum == 0.0 {
                continue;
            }
            let shift = s.max as f64 - max[q] as f64;
            let r = shift.exp();
            let b = &mut buf[q * per_q..(q + 1) * per_q];
            b[0] = r * s.sum as f64;
            b[1] = r * (s.sum_shifted_logit as f64 + s.sum as f64 * shift);
            b[2] = r * r * s.sum_sq as f64;
            b[3] = r * part.sum_norm[q] as f64;
            b[4] = r * part.skipped_mass[q];
            for (o, &a) in buf[nq * per_q + q * dim..nq * per_q + (q + 1) * dim]
                .iter_mut()
                .zip(&part.acc[q * dim..(q + 1) * dim])
            {
                *o = r * a as f64;
            }
        }
        for q in 0..nq {
            buf[q * per_q + 5] = part.tiles_kept[q] as f64;
            buf[q * per_q + 6] = part.samples_kept[q] as f64;
        }
        let n = buf.len();
        buf[n - 2] = part.tiles_total as f64;
        buf[n - 1] = part.samples_total as f64;
        let mut total = vec![0.0f64; n];
        comm.all_reduce_into(&buf[..], &mut total[..], SystemOperation::sum());
        // Top-1: the smallest source index among the ranks holding the maximum.
        let local_arg: Vec<u32> = (0..nq)
            .map(|q| {
                let s = part.states[q];
                if s.sum > 0.0 && s.max == max[q] {
                    s.argmax
                } else {
                    u32::MAX
                }
            })
            .collect();
        let mut arg = vec![0u32; nq];
        comm.all_reduce_into(&local_arg[..], &mut arg[..], SystemOperation::min());

        for q in 0..nq {
            let b = &total[q * per_q..(q + 1) * per_q];
            let st = &mut part.states[q];
            st.max = max[q];
            st.sum = b[0] as f32;
            st.sum_shifted_logit = b[1] as f32;
            st.sum_sq = b[2] as f32;
            st.argmax = arg[q];
            part.sum_norm[q] = b[3] as f32;
            part.skipped_mass[q] = b[4];
            part.tiles_kept[q] = b[5] as u64;
            part.samples_kept[q] = b[6] as u64;
            for (a, &t) in part.acc[q * dim..(q + 1) * dim]
                .iter_mut()
                .zip(&total[nq * per_q + q * dim..nq * per_q + (q + 1) * dim])
            {
                *a = t as f32;
            }
        }
        part.tiles_total = total[n - 2] as u64;
        part.samples_total = total[n - 1] as u64;
    }
}

/// A backend over this rank's rows whose results are those of all ranks' rows: the local
/// backend's partial state, merged across the ranks by an allreduce.
pub struct MpiBackend<'d> {
    inner: Box<dyn Backend + 'd>,
    dataset: &'d Dataset,
}

impl<'d> MpiBackend<'d> {
    pub fn new(inner: Box<dyn Backend + 'd>, dataset: &'d Dataset) -> Self {
        MpiBackend { inner, dataset }
    }
}

impl Backend for MpiBackend<'_> {
    fn posterior(&mut self, batch: &CentredBatch<'_>) -> Result<Posterior> {
        let part = self.partial(batch)?;
        if let Some(q) = part.states.iter().position(|s| s.sum == 0.0) {
            // Only possible for a class no rank holds; the same on every rank.
            return Err(crate::error::Error::Input(format!(
                "query {q}: no sample of its class on any MPI rank"
            )));
        }
        Ok(part.finish())
    }

    fn forget_history(&mut self) {
        self.inner.forget_history();
    }

    fn partial(&mut self, batch: &CentredBatch<'_>) -> Result<Partial> {
        let n_queries = batch.logit_coefs.len();
        // A rank may hold no row of a class: it adds nothing (but still takes part).
        let mut part = if batch.rows.is_empty() {
            Partial::empty(n_queries, self.dataset.dim())
        } else {
            self.inner.partial(batch)?
        };
        part.map_argmax(|row| self.dataset.original_index(row as usize));
        #[cfg(feature = "mpi")]
        allreduce(&mut part);
        Ok(part)
    }

    fn describe(&self) -> String {
        match current() {
            Some(r) => format!(
                "MPI: {} ranks, each over its 1/{} of the rows on {}",
                r.size,
                r.size,
                self.inner.describe()
            ),
            None => self.inner.describe(),
        }
    }

    fn distributed(&self) -> bool {
        true
    }
}
