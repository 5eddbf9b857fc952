//! An optional OpenBLAS, found at run time (`dlopen`), so a machine without one still
//! builds and runs: then the CPU backend simply never offers it.
//!
//! Looked for, in order: the file named by `ORACLEFLOW_OPENBLAS`, Debian's
//! `libopenblas.so.0` (package libopenblas0-pthread or -openmp) and `libopenblas.so`. Both
//! the plain LP64 interface (`cblas_sgemm`, 32-bit sizes) and the ILP64 build that numpy
//! wheels bundle (`scipy_cblas_sgemm64_`, 64-bit sizes) are understood.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm32 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);
type Sgemm64 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    i64,
    i64,
    i64,
    f32,
    *const f32,
    i64,
    *const f32,
    i64,
    f32,
    *mut f32,
    i64,
);

enum Entry {
    Lp64(Sgemm32),
    Ilp64(Sgemm64),
}

pub struct OpenBlas {
    sgemm: Entry,
    /// What was loaded: file and OpenBLAS's own configuration string.
    pub describe: String,
}

static LIB: OnceLock<Option<OpenBlas>> = OnceLock::new();

/// The loaded OpenBLAS, or None when none is installed (looked for once per process).
pub fn get() -> Option<&'static OpenBlas> {
    LIB.get_or_init(load).as_ref()
}

fn sym(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: handle came from a successful dlopen; dlsym only reads the name.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn load() -> Option<OpenBlas> {
    let mut names: Vec<String> = Vec::new();
    if let Ok(p) = std::env::var("ORACLEFLOW_OPENBLAS") {
        names.push(p);
    }
    names.extend(["libopenblas.so.0".into(), "libopenblas.so".into()]);
    for name in names {
        let Ok(c) = CString::new(name.clone()) else {
            continue;
        };
        // SAFETY: dlopen of a shared library by name; a failure returns null.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            continue;
        }
        // Our rayon tasks are the parallelism: OpenBLAS's own threads would oversubscribe.
        for (gemm, threads, config, ilp64) in [
            (
                "cblas_sgemm",
                "openblas_set_num_threads",
                "openblas_get_config",
                false,
            ),
            (
                "scipy_cblas_sgemm64_",
                "scipy_openblas_set_num_threads64_",
                "scipy_openblas_get_config64_",
                true,
            ),
        ] {
            let Some(f) = sym(handle, gemm) else {
                continue;
            };
            if let Some(t) = sym(handle, threads) {
                // SAFETY: openblas_set_num_threads(int) per OpenBLAS's cblas.h.
                unsafe {
                    let set: unsafe extern "C" fn(c_int) = std::mem::transmute(t);
                    set(1);
                }
            }
            let cfg = sym(handle, config)
                .map(|p| {
                    // SAFETY: openblas_get_config returns a static NUL-terminated string.
                    unsafe {
                        let get: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(p);
                        CStr::from_ptr(get()).to_string_lossy().into_owned()
                    }
                })
                .unwrap_or_default();
            // SAFETY: the symbol is cblas_sgemm with the LP64 or ILP64 prototype above.
            let sgemm = unsafe {
                if ilp64 {
                    Entry::Ilp64(std::mem::transmute::<*mut c_void, Sgemm64>(f))
                } else {
                    Entry::Lp64(std::mem::transmute::<*mut c_void, Sgemm32>(f))
                }
            };
            return Some(OpenBlas {
                sgemm,
                describe: format!("{name} ({})", cfg.trim()),
            });
        }
    }
    None
}

/// One operand as BLAS sees it: (transposed?, leading dimension), from (row, col) strides
/// of which one is 1.
fn operand(rs: usize, cs: usize, rows: usize, cols: usize) -> (c_int, usize) {
    if cs == 1 && (rs >= cols || rows == 1) {
        (NO_TRANS, rs.max(cols))
    } else {
        debug_assert!(rs == 1);
        (TRANS, cs.max(rows))
    }
}

impl OpenBlas {
    /// dst (m x n, row-major, contiguous) = [dst +] lhs * rhs; operands as in
    /// [`super::sgemm`] (bounds already checked there), each with one unit stride.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        lhs: (&[f32], usize, usize),
        rhs: (&[f32], usize, usize),
    ) {
        let (ta, lda) = operand(lhs.1, lhs.2, m, k);
        let (tb, ldb) = operand(rhs.1, rhs.2, k, n);
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the caller checked every index against the slices; the leading dimensions
        // are the operands' strides, so BLAS reads exactly the elements the strides name.
        unsafe {
            match self.sgemm {
                Entry::Lp64(f) => {
                    let c = |v: usize| i32::try_from(v).expect("GEMM size fits in i32");
                    f(
                        ROW_MAJOR,
                        ta,
                        tb,
                        c(m),
                        c(n),
                        c(k),
                        1.0,
                        lhs.0.as_ptr(),
                        c(lda),
                        rhs.0.as_ptr(),
                        c(ldb),
                        beta,
                        dst.as_mut_ptr(),
                        c(n),
                    )
                }
                Entry::Ilp64(f) => f(
                    ROW_MAJOR,
                    ta,
                    tb,
                    m as i64,
                    n as i64,
                    k as i64,
                    1.0,
                    lhs.0.as_ptr(),
                    lda as i64,
                    rhs.0.as_ptr(),
                    ldb as i64,
                    beta,
                    dst.as_mut_ptr(),
                    n as i64,
                ),
            }
        }
    }
}
