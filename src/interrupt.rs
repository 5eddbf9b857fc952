//! Ctrl-C: the first press asks the work to stop at the next oracle evaluation (so within
//! one evaluation, and before any output file is written, since commands write last); a
//! second press ends the process at once. Both exit with 130.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once, from `main`).
pub fn install() {
    let installed = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("error: interrupted again: stopping now");
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping after the current evaluation (Ctrl-C again to stop now)");
    });
    // Without a handler Ctrl-C still ends the process (exit by signal); nothing to report.
    let _ = installed;
}

/// Err([`Error::Interrupted`]) once Ctrl-C was pressed.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
