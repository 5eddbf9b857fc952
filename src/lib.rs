//! oracleflow: the exact closed-form ("oracle") velocity of flow matching over a whole
//! training set, on any GPU (wgpu) or on the CPU, with the diagnostics of the two stages
//! of generation.

pub mod analysis;
pub mod bench;
pub mod checkpoint;
pub mod dataset;
pub mod error;
pub mod field;
pub mod interrupt;
pub mod oracle;
pub mod output;
pub mod path;
pub mod plot;
pub mod render;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod study;

pub use dataset::{Dataset, Dtype};
pub use error::{Error, Result};
pub use path::Path;
