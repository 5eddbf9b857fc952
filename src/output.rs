//! Writing results safely: nothing the user had is overwritten unless they said
//! `--force`, and every file appears whole or not at all (write a temporary file in the
//! same directory, then rename it into place).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Fails on the first path that exists (unless `force`) or whose directory cannot take
/// new files, before any work is done.
pub fn check_new(paths: &[&Path], force: bool) -> Result<()> {
    for p in paths {
        if p.is_dir() {
            return Err(Error::output(p, "is a directory, expected a file name"));
        }
        if !force && p.exists() {
            return Err(Error::Input(format!(
                "{} already exists (pass --force to overwrite)",
                p.display()
            )));
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        check_writable_dir(dir)?;
    }
    Ok(())
}

/// [`check_new`] for the files `names` inside `dir`.
pub fn check_new_in(dir: &Path, names: &[&str], force: bool) -> Result<()> {
    check_writable_dir(dir)?;
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    check_new(
        &paths.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        force,
    )
}

/// Fails unless files can be created in `dir`, or, when it does not exist yet, in its
/// nearest existing ancestor (where it will be created). Probed with an unnamed temporary
/// file, so nothing is left behind; checked before any work so that an hour of sampling
/// is never lost to a typo in `--out`.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    let mut probe = dir;
    loop {
        match std::fs::metadata(probe) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(Error::output(probe, "exists and is not a directory")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                probe = match probe.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(Error::output(probe, format!("cannot be read: {e}"))),
        }
    }
    tempfile::tempfile_in(probe).map_err(|e| {
        let where_ = if probe == dir {
            String::new()
        } else {
            format!(" (in {})", probe.display())
        };
        Error::output(dir, format!("cannot create files here{where_}: {e}"))
    })?;
    Ok(())
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

    #[test]
    fn unwritable_output_dirs_are_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        check_writable_dir(&dir.path().join("new/deeper")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = check_writable_dir(Path::new("/proc/forbidden")).unwrap_err();
        assert!(matches!(err, Error::Output { .. }), "{err}");
        assert!(err.to_string().starts_with("/proc/forbidden: "), "{err}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(check_writable_dir(&file.join("sub")).is_err());
        assert!(check_new(&[dir.path()], true).is_err());
    }
}
