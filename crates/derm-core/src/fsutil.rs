//! Atomic file writes: nothing a user made is left half-written by a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A sibling temporary name for `path` (same folder, so the rename stays on one file system).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to a temporary sibling, syncs it, and renames it over `path`. Parent folders are
/// created.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = temp_sibling(path);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value).map_err(|e| Error::Parse { path: path.into(), msg: e.to_string() })?;
    write_atomic(path, s.as_bytes())
}

/// Reads and parses a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Parse { path: path.into(), msg: e.to_string() })
}

/// Creates a folder and its parents, naming it on failure.
pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Removes what earlier processes left of their temporary siblings of `path` (a run killed
/// while writing leaves `.<name>.tmp-<pid>` behind). Only called under a [`DirLock`], so no
/// other live writer owns them.
pub fn remove_stale_temps(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let mine = temp_sibling(path);
    let Ok(entries) = std::fs::read_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == mine || !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if removed.is_ok() {
            tracing::debug!(path = %p.display(), "removed a stale temporary file");
        }
    }
}

/// An exclusive lock on an output folder, held while a run writes there: a second run into the
/// same folder is refused instead of interleaving checkpoints. The lock is the operating
/// system's (`flock` on `<dir>/.derm.lock`), so a run killed with SIGKILL releases it at once.
#[derive(Debug)]
pub struct DirLock {
    /// Held open: closing it (on drop, or when the process dies) releases the lock.
    _file: std::fs::File,
    path: PathBuf,
}

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".derm.lock";

impl DirLock {
    /// Locks `dir` (created if needed), or fails naming the folder and the process holding it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // An advisory lock on the open file (flock on Unix, LockFileEx on Windows); the system
        // drops it when the process ends, however it ends.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                use std::io::Read;
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::Locked { path: dir.to_path_buf(), holder: holder.trim().to_string() });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        {
            use std::io::Seek;
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            file.rewind().map_err(|e| Error::io(&path, e))?;
        }
        let cmd: Vec<String> = std::env::args().collect();
        writeln!(file, "pid {} ({})", std::process::id(), cmd.join(" ")).map_err(|e| Error::io(&path, e))?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let first = DirLock::acquire(&run).unwrap();
        assert!(first.path().ends_with(LOCK_FILE));
        let e = DirLock::acquire(&run).unwrap_err().to_string();
        assert!(e.contains("run") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        // Another folder is independent.
        let _other = DirLock::acquire(&d.path().join("other")).unwrap();
        drop(first);
        DirLock::acquire(&run).unwrap();
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed_and_others_kept() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("last");
        std::fs::create_dir_all(d.path().join(".last.tmp-999999")).unwrap();
        std::fs::write(d.path().join(".last.tmp-1"), b"x").unwrap();
        std::fs::write(d.path().join(".best.tmp-1"), b"x").unwrap();
        std::fs::create_dir_all(temp_sibling(&target)).unwrap();
        remove_stale_temps(&target);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".best.tmp-1".to_string(), format!(".last.tmp-{}", std::process::id())]);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b.json");
        write_json(&p, &vec![1, 2]).unwrap();
        write_json(&p, &vec![3]).unwrap();
        let v: Vec<i32> = read_json(&p).unwrap();
        assert_eq!(v, vec![3]);
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let e = read_json::<Vec<i32>>(&d.path().join("a/none.json")).unwrap_err();
        assert!(e.to_string().contains("none.json"));
    }
}
