//! The paper's studies, one module each: the computation, the table it prints and the
//! files it writes (PNG, CSV, JSON). The commands (`src/cli/transition.rs`,
//! `src/cli/study.rs`) only parse settings, load data and show progress.
//!
//! Adding a study: `src/study/NAME.rs` with its options, `run` and `write_outputs` (the
//! files' shapes live there), `pub mod NAME;` here, and one variant with its arguments
//! in `src/cli/study.rs`. The mixing studies (`switch`, `resume`) share `mixing.rs`.

pub mod cfg;
pub mod mixing;
pub mod nearest;
pub mod shift;
pub mod transition;

/// A CSV cell for an optional number (empty when absent).
pub fn csv_opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

/// A table cell for an optional number, `digits` after the point ("-" when absent).
pub fn table_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}
