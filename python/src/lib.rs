//! Python bindings of oracleflow: a thin layer over the library, so the same validation,
//! errors and arithmetic as the command line (same bytes for the same inputs and seed).
//!
//! Argument handling lives here; every computation is a library call made with the GIL
//! released (`Python::detach`), so other Python threads run while the engine works.

use std::sync::Mutex;

use numpy::{
    dtype, Element, IntoPyArray, PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use oracleflow::dataset::{self, RawRows, SampleShape};
use oracleflow::field::OracleField;
use oracleflow::oracle::cpu::CpuOptions;
use oracleflow::oracle::gpu::GpuOptions;
use oracleflow::oracle::{BackendKind, Oracle as Engine, Query, QueryStats, Times};
use oracleflow::sample::{Conditioning, Guidance, SampleOptions, Solver};
use oracleflow::schedule::Schedule;
use oracleflow::{analysis, Dataset, Dtype, Error, Path};

/// Queries per oracle call in `velocity`/`denoise`: the CLI's `velocity --batch` default,
/// so both cut a batch the same way (and so give the same bytes).
const VELOCITY_BATCH: usize = 1024;
/// Samples integrated together in `sample`: the CLI's `sample --batch` default.
const SAMPLE_BATCH: usize = 256;

type LockedEngine<'d> = Mutex<Engine<'d>>;

self_cell::self_cell!(
    /// The dataset and the oracle that borrows it, kept together in one Python object.
    struct Cell {
        owner: Dataset,
        // A Mutex is invariant in its contents, so the dependent is not covariant.
        #[not_covariant]
        dependent: LockedEngine,
    }
);

/// A library error as the Python exception a caller expects, with the library's one-line
/// message (the CLI prints the same text after "error: ").
fn py_err(e: Error) -> PyErr {
    let message = e.to_string();
    match &e {
        Error::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        // The dataset loaders name a missing file as "<path>: missing ...".
        Error::Data { path, message: m } if m.starts_with("missing") && !path.exists() => {
            PyFileNotFoundError::new_err(message)
        }
        Error::Gpu(_) => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

fn value_err(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// Parses a setting by its command-line name (`--backend`, `--path`, ...).
fn parse_choice<T: clap::ValueEnum>(what: &str, value: &str) -> PyResult<T> {
    T::from_str(value, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        value_err(format!(
            "{what}={value:?}: expected one of {}",
            names.join(", ")
        ))
    })
}

/// `numpy.asarray(obj)`: accepts arrays, lists and anything with `__array__` (CPU tensors).
fn as_array<'py>(what: &str, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        return Ok(a.clone());
    }
    let np = PyModule::import(obj.py(), "numpy")?;
    let converted = np.call_method1("asarray", (obj,)).map_err(|e| {
        PyTypeError::new_err(format!("{what}: not convertible to a numpy array ({e})"))
    })?;
    Ok(converted.cast_into::<PyUntypedArray>()?)
}

fn is<T: Element>(a: &Bound<'_, PyUntypedArray>) -> bool {
    a.dtype().is_equiv_to(&dtype::<T>(a.py()))
}

/// The values of a numpy array in C order: borrowed when C-contiguous, else copied.
enum Values<'py, T: Element> {
    Borrowed(PyReadonlyArrayDyn<'py, T>),
    Owned(Vec<T>),
}

impl<'py, T: Element + Copy> Values<'py, T> {
    fn of(a: &Bound<'py, PyUntypedArray>) -> PyResult<Self> {
        let typed = a.cast::<PyArrayDyn<T>>()?.readonly();
        // `as_slice` also accepts Fortran order, whose element order is not ours.
        if a.is_c_contiguous() {
            Ok(Values::Borrowed(typed))
        } else {
            Ok(Values::Owned(typed.as_array().iter().copied().collect()))
        }
    }

    fn slice(&self) -> &[T] {
        match self {
            Values::Borrowed(r) => r.as_slice().expect("checked C-contiguous"),
            Values::Owned(v) => v,
        }
    }
}

/// A float array as f32 (float32 borrowed; float16/float64 converted).
fn float_values<'py>(what: &str, a: &Bound<'py, PyUntypedArray>) -> PyResult<Values<'py, f32>> {
    if is::<f32>(a) {
        return Values::of(a);
    }
    if a.dtype().kind() == b'f' {
        let cast = a.call_method1("astype", ("float32",))?;
        return Values::of(cast.cast::<PyUntypedArray>()?);
    }
    Err(value_err(format!(
        "{what}: dtype {} is not a float type (expected float32)",
        a.dtype()
    )))
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// Integer labels as u32 (one per sample; each in [0, 2^32)).
fn label_values(obj: &Bound<'_, PyAny>, n: usize) -> PyResult<Vec<u32>> {
    let a = as_array("labels", obj)?;
    if !matches!(a.dtype().kind(), b'i' | b'u') {
        return Err(value_err(format!(
            "labels: dtype {} is not an integer type",
            a.dtype()
        )));
    }
    if a.ndim() != 1 || a.shape()[0] != n {
        return Err(value_err(format!(
            "labels: shape {} does not hold one label for each of the {n} samples",
            shape_str(a.shape())
        )));
    }
    let wide = a.call_method1("astype", ("int64",))?;
    let values = Values::<i64>::of(wide.cast::<PyUntypedArray>()?)?;
    values
        .slice()
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            u32::try_from(l).map_err(|_| {
                value_err(format!(
                    "labels: label {l} of sample {i} is not in [0, 2^32)"
                ))
            })
        })
        .collect()
}

/// A dataset from a numpy array (N, ...): uint8 pixels are mapped to [-1, 1] as
/// p / 127.5 - 1 (as the CLI maps 8-bit images); float32/float16 are taken as they are.
fn dataset_from_array(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    labels: Option<&Bound<'_, PyAny>>,
    dtype: Dtype,
) -> PyResult<Dataset> {
    let a = as_array("data", data)?;
    if !(is::<u8>(&a) || is::<f32>(&a) || is::<half::f16>(&a)) {
        return Err(value_err(format!(
            "data: dtype {} is not supported (pass float32, float16 or uint8 pixels)",
            a.dtype()
        )));
    }
    let shape = a.shape().to_vec();
    if shape.len() < 2 {
        return Err(value_err(format!(
            "data: shape {} is not (N, ...) with at least one value per sample (for scalars use data.reshape(-1, 1))",
            shape_str(&shape)
        )));
    }
    let name = format!("array{}", shape_str(&shape));
    let labels = labels.map(|l| label_values(l, shape[0])).transpose()?;
    let sample_shape = SampleShape::array(shape[1..].to_vec());
    // Dataset::from_raw reads the rows once (centring and sorting them into its own
    // storage), so the array itself is borrowed, never copied, when C-contiguous.
    let result = if is::<u8>(&a) {
        let v = Values::<u8>::of(&a)?;
        let raw = RawRows::U8Pixels(v.slice());
        py.detach(|| Dataset::from_raw(name, sample_shape, raw, labels, dtype))
    } else if is::<f32>(&a) {
        let v = Values::<f32>::of(&a)?;
        let raw = RawRows::F32(v.slice());
        py.detach(|| Dataset::from_raw(name, sample_shape, raw, labels, dtype))
    } else {
        let v = Values::<half::f16>::of(&a)?;
        let raw = RawRows::F16(v.slice());
        py.detach(|| Dataset::from_raw(name, sample_shape, raw, labels, dtype))
    };
    result.map_err(py_err)
}

/// Per-query classes: one for all (`int`), one per query (`(B,)`, -1 = unconditional), or
/// none.
fn query_classes(cls: Option<&Bound<'_, PyAny>>, n_queries: usize) -> PyResult<Vec<Option<u32>>> {
    let Some(cls) = cls else {
        return Ok(vec![None; n_queries]);
    };
    if let Ok(c) = cls.extract::<i64>() {
        let c = u32::try_from(c)
            .map_err(|_| value_err(format!("cls={c}: a class is an integer in [0, 2^32)")))?;
        return Ok(vec![Some(c); n_queries]);
    }
    let a = as_array("cls", cls)?;
    if !matches!(a.dtype().kind(), b'i' | b'u') || a.ndim() != 1 || a.shape()[0] != n_queries {
        return Err(value_err(format!(
            "cls: expected an int or an integer array ({n_queries},), got dtype {} shape {}",
            a.dtype(),
            shape_str(a.shape())
        )));
    }
    let wide = a.call_method1("astype", ("int64",))?;
    let values = Values::<i64>::of(wide.cast::<PyUntypedArray>()?)?;
    values
        .slice()
        .iter()
        .map(|&c| match c {
            -1 => Ok(None),
            c => u32::try_from(c).map(Some).map_err(|_| {
                value_err(format!(
                    "cls: class {c} is not in [0, 2^32) (-1 = unconditional)"
                ))
            }),
        })
        .collect()
}

/// Per-query times: one float for all, or B values (any shape holding B values).
fn query_times(t: &Bound<'_, PyAny>, n_queries: usize) -> PyResult<Vec<f32>> {
    // Arrays go the array way: numpy 2 deprecates float() of a one-element array.
    if t.cast::<PyUntypedArray>().is_err() {
        if let Ok(t) = t.extract::<f64>() {
            return Ok(vec![t as f32; n_queries]);
        }
    }
    let a = as_array("t", t)?;
    let values = float_values("t", &a)?;
    let values = values.slice();
    if a.ndim() == 0 {
        return Ok(vec![values[0]; n_queries]);
    }
    if values.len() != n_queries {
        return Err(value_err(format!(
            "t: shape {} does not hold one time for each of the {n_queries} queries",
            shape_str(a.shape())
        )));
    }
    Ok(values.to_vec())
}

/// The queries (B, ...) as f32 rows of the dataset's D values; returns the array's shape.
fn queries<'py>(ds: &Dataset, x: &Bound<'py, PyAny>) -> PyResult<(Vec<usize>, Values<'py, f32>)> {
    let a = as_array("x", x)?;
    let shape = a.shape().to_vec();
    if shape.is_empty() || shape[1..].iter().product::<usize>() != ds.dim() {
        return Err(value_err(format!(
            "x: shape {} does not hold {} values per query (dataset {}, sample shape {})",
            shape_str(&shape),
            ds.dim(),
            ds.name,
            shape_str(&ds.shape.dims)
        )));
    }
    Ok((shape, float_values("x", &a)?))
}

/// A flat f32 vector as a numpy array of `shape`, without a copy.
fn shaped<'py>(py: Python<'py>, v: Vec<f32>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, v)
        .reshape(shape.to_vec())?
        .into_any())
}

fn stats_dict<'py>(py: Python<'py>, stats: &[QueryStats]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let col = |f: fn(&QueryStats) -> f32| stats.iter().map(f).collect::<Vec<f32>>();
    d.set_item("top1", col(|s| s.top1_weight).into_pyarray(py))?;
    let index: Vec<i64> = stats.iter().map(|s| s.top1_index as i64).collect();
    d.set_item("top1_index", index.into_pyarray(py))?;
    d.set_item("entropy", col(|s| s.entropy).into_pyarray(py))?;
    d.set_item("ess", col(|s| s.ess).into_pyarray(py))?;
    d.set_item(
        "posterior_variance",
        col(|s| s.posterior_variance).into_pyarray(py),
    )?;
    Ok(d)
}

/// The exact (closed-form) flow-matching oracle over a dataset.
///
/// Oracle(data, *, labels=None, path="rf", backend="auto", dtype="f32",
///        memory_budget_mib=None)
///
/// data: a --data spec string as on the command line ("embedded", "fashion-mnist",
///     "fashion-mnist@2000", "npy:x.npy,y.npy", "gaussian:1000,16", ...) or a numpy
///     array (N, ...) of float32, float16 or uint8. uint8 values are pixels, mapped to
///     [-1, 1] as p / 127.5 - 1 (as the command line maps 8-bit images); floats are taken
///     as they are. The array is read in place (no copy when C-contiguous) into the
///     oracle's own centred, class-sorted storage.
/// labels: integer array (N,) for class-conditional use (array data only; a spec brings
///     its own labels).
/// path: "rf" (rectified flow, alpha = t, sigma = 1 - t) or "vp-cosine".
/// backend: "auto" (a real GPU when there is one, else "cpu"), "gpu", "cpu" or
///     "reference" (direct f64 evaluation, slow; for checking).
/// dtype: storage of the dataset values, "f32" or "f16" (computation is always f32).
/// memory_budget_mib: GPU memory the dataset may occupy, in MiB (the CLI's
///     --gpu-memory-mib): a larger dataset is streamed through the GPU chunk by chunk on
///     every evaluation. Default: resident when it fits. No effect on the "cpu" and
///     "reference" backends, which read the dataset from host memory.
///
/// Raises ValueError for bad input (the library's one-line message), FileNotFoundError
/// for a missing data file, RuntimeError when the GPU fails.
#[pyclass(module = "oracleflow", name = "Oracle", frozen)]
struct Oracle {
    cell: Cell,
    memory_budget_mib: Option<u64>,
}

impl Oracle {
    fn dataset(&self) -> &Dataset {
        self.cell.borrow_owner()
    }

    /// Runs `f` on the engine with the GIL released.
    fn with_engine<T: Send>(
        &self,
        py: Python<'_>,
        f: impl for<'d> FnOnce(&mut Engine<'d>) -> oracleflow::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            self.cell.with_dependent(|_, engine| {
                // A panic inside the engine surfaces as a Python exception and poisons the
                // lock; the oracle holds no state between calls that a panic could break.
                let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
                // Each call as a fresh process would run it (the CLI's): no anchors from
                // earlier calls, whose screening would change which pairs are computed,
                // hence the bits (`Oracle::forget_history`).
                engine.forget_history();
                f(&mut engine)
            })
        })
        .map_err(py_err)
    }

    /// Runs `f` on the engine as a velocity field (the solvers integrate fields, which own
    /// their oracle), with the GIL released. The oracle is lent to the field for the call
    /// and put back afterwards; a cheap f64-reference oracle holds its place meanwhile.
    fn with_field<T: Send>(
        &self,
        py: Python<'_>,
        f: impl for<'d> FnOnce(&mut OracleField<'d>) -> oracleflow::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            self.cell.with_dependent(|ds, engine| {
                let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
                engine.forget_history();
                let stand_in = Engine::new(ds, engine.path(), BackendKind::Reference)?;
                let mut field = OracleField::new(std::mem::replace(&mut *engine, stand_in));
                let result = f(&mut field);
                *engine = field.into_oracle();
                result
            })
        })
        .map_err(py_err)
    }

    /// velocity, x1_hat and stats of each query, in batches of VELOCITY_BATCH and one
    /// engine call per distinct class.
    fn evaluate(
        &self,
        py: Python<'_>,
        x: &[f32],
        times: &[f32],
        classes: &[Option<u32>],
    ) -> PyResult<(Vec<f32>, Vec<f32>, Vec<QueryStats>)> {
        let dim = self.dataset().dim();
        let n = times.len();
        let mut groups: Vec<(Option<u32>, Vec<usize>)> = Vec::new();
        for (q, c) in classes.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| g == c) {
                Some((_, members)) => members.push(q),
                None => groups.push((*c, vec![q])),
            }
        }
        let run = |engine: &mut Engine<'_>| {
            let mut velocity = vec![0.0f32; n * dim];
            let mut x1_hat = vec![0.0f32; n * dim];
            let mut stats = vec![QueryStats::default(); n];
            for (class, members) in &groups {
                // One class for all queries (the usual case): the queries as they are.
                let gathered: Vec<f32>;
                let (xs, ts): (&[f32], Vec<f32>) = if members.len() == n {
                    (x, times.to_vec())
                } else {
                    gathered = members
                        .iter()
                        .flat_map(|&q| &x[q * dim..(q + 1) * dim])
                        .copied()
                        .collect();
                    (&gathered, members.iter().map(|&q| times[q]).collect())
                };
                for start in (0..members.len()).step_by(VELOCITY_BATCH) {
                    let end = (start + VELOCITY_BATCH).min(members.len());
                    let out = engine.evaluate(&Query {
                        x: &xs[start * dim..end * dim],
                        t: Times::PerQuery(&ts[start..end]),
                        class: *class,
                    })?;
                    for (k, &q) in members[start..end].iter().enumerate() {
                        let (src, dst) = (k * dim..(k + 1) * dim, q * dim..(q + 1) * dim);
                        velocity[dst.clone()].copy_from_slice(&out.velocity[src.clone()]);
                        x1_hat[dst].copy_from_slice(&out.x1_hat[src]);
                        stats[q] = out.stats[k];
                    }
                }
            }
            Ok((velocity, x1_hat, stats))
        };
        self.with_engine(py, run)
    }

    /// velocity, x1_hat and stats for the Python arguments (x, t, cls); returns the
    /// shape of x too.
    #[allow(clippy::type_complexity)]
    fn evaluate_args(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        t: &Bound<'_, PyAny>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Vec<usize>, Vec<f32>, Vec<f32>, Vec<QueryStats>)> {
        let (shape, xs) = queries(self.dataset(), x)?;
        let times = query_times(t, shape[0])?;
        let classes = query_classes(cls, shape[0])?;
        let (velocity, x1_hat, stats) = self.evaluate(py, xs.slice(), &times, &classes)?;
        Ok((shape, velocity, x1_hat, stats))
    }
}

#[pymethods]
impl Oracle {
    #[new]
    #[pyo3(signature = (data, *, labels=None, path="rf", backend="auto", dtype="f32", memory_budget_mib=None, exact_dense=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        labels: Option<&Bound<'_, PyAny>>,
        path: &str,
        backend: &str,
        dtype: &str,
        memory_budget_mib: Option<i64>,
        exact_dense: bool,
    ) -> PyResult<Self> {
        let path: Path = parse_choice("path", path)?;
        let backend: BackendKind = parse_choice("backend", backend)?;
        let dtype: Dtype = parse_choice("dtype", dtype)?;
        let memory_budget_mib = memory_budget_mib
            .map(|m| {
                u64::try_from(m)
                    .ok()
                    // Bounded so that the byte count (m << 20) cannot overflow.
                    .filter(|m| (1..1 << 40).contains(m))
                    .ok_or_else(|| value_err(format!("memory_budget_mib={m}: need at least 1")))
            })
            .transpose()?;
        let dataset = if let Ok(spec) = data.cast::<PyString>() {
            if labels.is_some() {
                return Err(value_err(
                    "labels: only for array data (a --data spec brings its own labels)".into(),
                ));
            }
            let spec: String = spec.extract()?;
            py.detach(|| dataset::load(&spec, dtype)).map_err(py_err)?
        } else {
            dataset_from_array(py, data, labels, dtype)?
        };
        let gpu = GpuOptions {
            max_resident_bytes: memory_budget_mib.map(|m| m << 20),
            exact_dense,
            ..GpuOptions::default()
        };
        // Exact pruning is the default on both backends; exact_dense=True keeps the plain
        // pass (the CLI's --exact-dense).
        let cpu = CpuOptions {
            prune: !exact_dense,
        };
        // Opening a GPU and uploading the dataset can take a while: without the GIL.
        let cell = py.detach(|| {
            Cell::try_new(dataset, |ds| {
                Engine::with_options(ds, path, backend, gpu, cpu).map(Mutex::new)
            })
        });
        Ok(Oracle {
            cell: cell.map_err(py_err)?,
            memory_budget_mib,
        })
    }

    /// Number of samples N in the dataset.
    #[getter]
    fn n(&self) -> usize {
        self.dataset().n_samples()
    }

    /// Shape of one sample, e.g. (1, 28, 28).
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.dataset().shape.dims)
    }

    /// The backend in use, described (e.g. "cpu: 16 threads, gemm crate, F32 storage").
    #[getter]
    fn backend(&self) -> String {
        self.cell
            .with_dependent(|_, e| e.lock().unwrap_or_else(|p| p.into_inner()).describe())
    }

    /// {label: number of samples} for a labelled dataset, else {}.
    #[getter]
    fn class_counts(&self) -> std::collections::BTreeMap<u32, usize> {
        self.dataset().class_counts().into_iter().collect()
    }

    /// The GPU memory budget given (MiB), or None.
    #[getter]
    fn memory_budget_mib(&self) -> Option<u64> {
        self.memory_budget_mib
    }

    fn __repr__(&self) -> String {
        let ds = self.dataset();
        format!(
            "Oracle({}: {} samples of shape {}, {})",
            ds.name,
            ds.n_samples(),
            shape_str(&ds.shape.dims),
            self.backend()
        )
    }

    /// velocity(x, t, *, cls=None) -> numpy.ndarray
    ///
    /// The exact marginal velocity u(x, t) = E[d/dt x_t | x_t = x] over the dataset: the
    /// flow-matching training target. x: (B, ...) float32 with the dataset's values per
    /// query (other float dtypes are converted). t: a float in [0, 1] or B times (0 =
    /// noise, 1 = data). cls: None, an int (the oracle over that class's samples only)
    /// or B ints (-1 = unconditional). Returns float32 shaped like x. Same bytes for the
    /// same batch (as the CLI's `velocity`); a query in another batch agrees to float32
    /// rounding (the CPU GEMM blocks by batch size).
    #[pyo3(signature = (x, t, *, cls=None))]
    fn velocity<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        cls: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (shape, velocity, _, _) = self.evaluate_args(py, x, t, cls)?;
        shaped(py, velocity, &shape)
    }

    /// denoise(x, t, *, cls=None) -> (x1_hat, stats)
    ///
    /// The posterior mean x1_hat = E[x_1 | x_t = x] (the optimal denoiser), shaped like
    /// x, and the posterior's per-query statistics, a dict of (B,) arrays: "top1" (the
    /// largest weight), "top1_index" (its sample's index in the source data), "entropy"
    /// (nats), "ess" (effective sample size 1 / sum w^2) and "posterior_variance"
    /// (tr Cov_w(y) / D, 0 when one sample takes all the weight). Arguments as for velocity.
    #[pyo3(signature = (x, t, *, cls=None))]
    fn denoise<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        cls: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let (shape, _, x1_hat, stats) = self.evaluate_args(py, x, t, cls)?;
        Ok((shaped(py, x1_hat, &shape)?, stats_dict(py, &stats)?))
    }

    /// nearest(x, k=2) -> (indices, distances)
    ///
    /// The k nearest dataset samples of each point of x (B, ...) in Euclidean distance:
    /// indices (B, k) int64 into the source data and distances (B, k) float64, nearest
    /// first (ties: lower index first). A float32 screening pass keeps the k + 6 best
    /// candidates per point, whose distances are then computed exactly in float64.
    #[pyo3(signature = (x, k=2))]
    fn nearest<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        k: i64,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let ds = self.dataset();
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| (1..=ds.n_samples()).contains(&k))
            .ok_or_else(|| {
                value_err(format!(
                    "k={k}: need 1 <= k <= {} (the samples)",
                    ds.n_samples()
                ))
            })?;
        let (shape, xs) = queries(ds, x)?;
        let points = xs.slice();
        let near = py.detach(|| analysis::nearest_k(ds, points, k));
        let b = shape[0];
        let indices: Vec<i64> = near
            .iter()
            .flatten()
            .map(|&(row, _)| ds.original_index(row) as i64)
            .collect();
        let distances: Vec<f64> = near.iter().flatten().map(|&(_, d)| d).collect();
        Ok((
            PyArray1::from_vec(py, indices).reshape([b, k])?.into_any(),
            PyArray1::from_vec(py, distances)
                .reshape([b, k])?
                .into_any(),
        ))
    }
}

/// The classes of the n samples, as the CLI's --class / --classes all.
fn sample_classes(
    ds: &Dataset,
    n: usize,
    classes: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<Option<u32>>> {
    let Some(classes) = classes else {
        return Ok(vec![None; n]);
    };
    let check = |c: i64| -> PyResult<u32> {
        let c = u32::try_from(c)
            .map_err(|_| value_err(format!("classes: class {c} is not in [0, 2^32)")))?;
        ds.rows_for(Some(c)).map_err(py_err)?;
        Ok(c)
    };
    if let Ok(s) = classes.extract::<String>() {
        if s != "all" {
            return Err(value_err(format!(
                "classes={s:?}: expected \"all\", an int or a list of n ints"
            )));
        }
        return Conditioning::Balanced.classes(ds, n).map_err(py_err);
    }
    if let Ok(c) = classes.extract::<i64>() {
        return Ok(vec![Some(check(c)?); n]);
    }
    let list: Vec<i64> = classes.extract().map_err(|_| {
        value_err("classes: expected None, \"all\", an int or a list of n ints".into())
    })?;
    if list.len() != n {
        return Err(value_err(format!(
            "classes: {} classes for n = {n} samples",
            list.len()
        )));
    }
    list.into_iter().map(|c| check(c).map(Some)).collect()
}

/// sample(oracle, n, *, steps=50, solver="heun", shift=1.0, seed=0, classes=None,
///        cfg_scale=None, cfg_interval=None, return_trajectory=False)
///
/// Integrates dx/dt = u(x, t) with the oracle velocity from Gaussian noise (t = 0) to
/// data (t = 1), as `oracleflow sample` does: the same noise for the same seed (sample
/// i starts from noise fixed by (seed, i)) and the same bytes as its samples.npy.
///
/// steps, shift: the time grid, t_i = s u / (1 + (s - 1) u) at u = i / steps.
/// solver: "euler", "heun" or "rk4".
/// classes: None (unconditional), an int (every sample of that class), a list of n ints,
///     or "all" (a balanced set: sample i of the i-th class present, in turn).
/// cfg_scale: classifier-free guidance w, u = u_uncond + w (u_cond - u_uncond), applied
///     for t in cfg_interval = (t_lo, t_hi) (default (0, 1)); needs classes.
/// Returns the samples (n, ...) float32, and with return_trajectory=True also x_t at
/// every grid time, (steps + 1, n, ...) float32 (the last entry is the samples).
#[pyfunction]
#[pyo3(signature = (oracle, n, *, steps=50, solver="heun", shift=1.0, seed=0, classes=None, cfg_scale=None, cfg_interval=None, return_trajectory=false))]
#[allow(clippy::too_many_arguments)]
fn sample<'py>(
    py: Python<'py>,
    oracle: &Oracle,
    n: i64,
    steps: i64,
    solver: &str,
    shift: f64,
    seed: u64,
    classes: Option<&Bound<'py, PyAny>>,
    cfg_scale: Option<f64>,
    cfg_interval: Option<(f64, f64)>,
    return_trajectory: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let ds = oracle.dataset();
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| value_err(format!("n={n}: need at least one sample")))?;
    let steps =
        usize::try_from(steps).map_err(|_| value_err(format!("steps={steps}: need at least 1")))?;
    let solver: Solver = parse_choice("solver", solver)?;
    let schedule = Schedule::Shifted { steps, shift };
    schedule.times().map_err(py_err)?;
    let classes = sample_classes(ds, n, classes)?;
    let guidance = match (cfg_scale, cfg_interval) {
        (Some(scale), interval) => {
            if classes.iter().any(|c| c.is_none()) {
                return Err(value_err("cfg_scale needs classes".into()));
            }
            let (t_lo, t_hi) = interval.unwrap_or((0.0, 1.0));
            Some(Guidance::new(scale, &[t_lo, t_hi]).map_err(py_err)?)
        }
        (None, Some(_)) => return Err(value_err("cfg_interval needs cfg_scale".into())),
        (None, None) => None,
    };
    let options = SampleOptions {
        init: None,
        schedule,
        solver,
        seed,
        classes,
        guidance,
        batch: SAMPLE_BATCH,
        tracked: if return_trajectory {
            (0..n).collect()
        } else {
            Vec::new()
        },
    };
    let run = oracle.with_field(py, |field| {
        oracleflow::sample::sample(field, &options, || {})
    })?;
    let mut shape = vec![n];
    shape.extend(&ds.shape.dims);
    let samples = shaped(py, run.samples, &shape)?;
    if !return_trajectory {
        return Ok(samples);
    }
    // Trajectories come per sample (time-major inside); the array is (time, sample, ...).
    let n_times = run.times.len();
    let dim = ds.dim();
    let mut trajectory = vec![0.0f32; n_times * n * dim];
    for tr in &run.trajectories {
        for (i, x) in tr.x.iter().enumerate() {
            let at = (i * n + tr.sample) * dim;
            trajectory[at..at + dim].copy_from_slice(x);
        }
    }
    let mut tshape = vec![n_times];
    tshape.extend(&shape);
    let trajectory = shaped(py, trajectory, &tshape)?;
    Ok(PyTuple::new(py, [samples, trajectory])?.into_any())
}

/// Exact closed-form (oracle) flow-matching velocity over a whole dataset, on any GPU or
/// CPU. See Oracle and sample.
#[pymodule]
fn _oracleflow(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Oracle>()?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
