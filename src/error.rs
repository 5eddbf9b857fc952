//! One error type for the crate. Every variant renders as a single line that names
//! the file or the setting at fault, so the CLI can print it and exit non-zero.
//!
//! Exit codes (see [`exit_code`]): 2 for bad input or usage (the user can fix it: a bad
//! file, flag, spec or output path, a dataset too large for memory), 1 for everything
//! else (device trouble, internal errors, errors from outside this crate).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },

    /// The OS error is part of the message and deliberately not a `source()`: printing
    /// the chain would repeat it ("... (os error 2): ... (os error 2)").
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("invalid --data spec '{spec}': {message}")]
    Spec { spec: String, message: String },

    #[error("invalid input: {0}")]
    Input(String),

    /// An output file or directory that cannot be written (checked before any work).
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },

    /// Refused before allocating: `what` would need `needed` bytes, `available` are free.
    #[error(
        "{what}: needs {} of memory, only {} available",
        bytes_text(*needed),
        bytes_text(*available)
    )]
    TooLarge {
        what: String,
        needed: u64,
        available: u64,
    },

    #[error("GPU: {0}")]
    Gpu(String),

    /// A bug or a broken invariant, not the user's input.
    #[error("internal error: {0}")]
    Internal(String),

    /// Ctrl-C: the work stopped at the next evaluation, before any output was written.
    #[error("interrupted (Ctrl-C): stopped before writing any output")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub fn output(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Output {
            path: path.into(),
            message: message.into(),
        }
    }

    /// 2 when the user can fix it (input, usage, output path, size), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Data { .. }
            | Error::Io { .. }
            | Error::Spec { .. }
            | Error::Input(_)
            | Error::Output { .. }
            | Error::TooLarge { .. } => 2,
            Error::Gpu(_) | Error::Internal(_) => 1,
            Error::Interrupted => 130,
        }
    }
}

/// The process exit code for an error that reached `main`: the first [`Error`] in the
/// chain decides (see [`Error::exit_code`]); anything else is an internal error, 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Error>())
        .map_or(1, Error::exit_code)
}

/// The error as one line: the contexts and causes joined by ": ", leaving out a cause whose
/// text the line already holds (so an OS error is never printed twice), with any line
/// breaks inside a message folded into spaces.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Return early from a function returning `anyhow::Result` with an [`Error::Input`] (exit
/// code 2): the usage errors of the command line. Same syntax as `anyhow::bail!`.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::Input(format!($($arg)*)).into())
    };
}

/// Bytes in the largest binary unit that keeps the number at least 1, e.g. "7.5 GiB".
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_print_once_and_exit_2() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = anyhow::Error::from(Error::io("x.npy", io));
        let line = one_line(&err);
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        assert!(line.starts_with("x.npy: "), "{line}");
        assert_eq!(exit_code(&err), 2);
        let ctx = err.context("loading the queries");
        assert_eq!(exit_code(&ctx), 2);
        assert_eq!(one_line(&ctx).matches("not found").count(), 1);
    }

    #[test]
    fn classification() {
        assert_eq!(exit_code(&Error::Gpu("lost".into()).into()), 1);
        assert_eq!(exit_code(&Error::Internal("bug".into()).into()), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("something else")), 1);
        assert_eq!(exit_code(&Error::Input("--batch".into()).into()), 2);
        let big = Error::TooLarge {
            what: "gaussian:1,1".into(),
            needed: 3 << 30,
            available: 1 << 30,
        };
        assert_eq!(
            big.to_string(),
            "gaussian:1,1: needs 3.0 GiB (3221225472 bytes) of memory, only 1.0 GiB \
             (1073741824 bytes) available"
        );
        assert_eq!(exit_code(&big.into()), 2);
        let f = || -> anyhow::Result<()> { bail_input!("--batch {} must be at least 1", 0) };
        let e = f().unwrap_err();
        assert_eq!(exit_code(&e), 2);
        assert_eq!(one_line(&e), "invalid input: --batch 0 must be at least 1");
    }
}
