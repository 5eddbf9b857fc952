//! Writing results safely: nothing the user had is overwritten unless they said
//! `--force`, and every file appears whole or not at all (write a temporary file in the
//! same directory, then rename it into place).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Fails on the first path that exists (unless `force`), before any work is done.
pub fn check_new(paths: &[&Path], force: bool) -> Result<()> {
    for p in paths {
        if !force && p.exists() {
            return Err(Error::Input(format!(
                "{} already exists (pass --force to overwrite)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// [`check_new`] for the files `names` inside `dir`.
pub fn check_new_in(dir: &Path, names: &[&str], force: bool) -> Result<()> {
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    check_new(
        &paths.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        force,
    )
}

/// Writes a JSON value, pretty-printed, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        writeln!(w)
    })
}

/// Writes `path` atomically with whatever `fill` writes.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(path, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        fill(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    // Temporary files are created private (0600); results are ordinary files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        let r = write_atomic(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&p, |w| w.write_all(b"whole")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"whole");
        assert!(check_new(&[&p], false).is_err());
        assert!(check_new(&[&p], true).is_ok());
    }
}
