//! The node's data directory: created if missing, checked to be writable, and
//! locked for the life of the process.
//!
//! Two nodes on one directory would share one Raft log; redb refuses the
//! second with "Database already open", which names neither the directory nor
//! the culprit. The lock file taken here first carries the holder's PID, so
//! the refusal can say both. It is an advisory lock (`flock`), released by the
//! kernel when the process ends, however it ends: a crashed node never leaves
//! a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "tempalias.lock";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data_dir {dir} (TEMPALIAS_DATA_DIR) is not a writable directory: {error}. \
         The node keeps its database and cluster secret there; choose a directory this user can write"
    )]
    NotWritable { dir: PathBuf, error: std::io::Error },
    #[error(
        "data_dir {dir} is in use by another tempalias process{}; stop it, or give this node its own data_dir (TEMPALIAS_DATA_DIR)",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
}

/// Holds the lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates `dir` if needed and locks it for this process.
///
/// # Errors
/// [`DataDirError::InUse`] when another process holds the lock,
/// [`DataDirError::NotWritable`] when the directory cannot be created or written.
pub fn lock(dir: &Path) -> Result<DataDirLock, DataDirError> {
    let not_writable = |error| DataDirError::NotWritable {
        dir: dir.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(not_writable)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(not_writable(e)),
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|_| file.flush())
        .map_err(not_writable)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_directory_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let held = lock(&data).unwrap();
        let e = lock(&data).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&data.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        drop(held);
        lock(&data).unwrap();
    }

    /// A directory that cannot be created (here: below a regular file, which
    /// fails for root too) is reported as `data_dir`, not as a file in it.
    #[test]
    fn an_unusable_directory_is_named_as_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = lock(&file.join("data")).unwrap_err().to_string();
        assert!(e.starts_with("data_dir "), "{e}");
        assert!(e.contains("TEMPALIAS_DATA_DIR"), "{e}");
        assert!(!e.contains(LOCK_FILE), "{e}");
    }
}
