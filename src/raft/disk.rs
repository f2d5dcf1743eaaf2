//! The calls the Raft store makes of a disk ([`Disk`]), and the real one:
//! the files of one directory ([`FileDisk`]).
//!
//! Everything the store keeps (its log file, its small values files)
//! goes through these few calls: write at an offset, read, cut to a
//! length, fdatasync a file, rename, fsync the directory. The simulator
//! supplies its own [`Disk`], which keeps what was synced and loses or
//! tears what was not at a crash, so keyraft's own log file, group commit
//! and recovery run on every simulated seed.
//!
//! Owns: the trait, the real directory's open files and its lock, and
//! where store work runs ([`blocking`], [`settle`], [`Disk::spawn`]).
//! Must not: know what a file holds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// Work a [`Disk`] runs on a thread (or task) of its own.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One directory's files, as the Raft store uses them. Names are plain
/// file names in that directory. Nothing written is durable until the
/// file is synced; no name created or renamed is durable until the
/// directory is.
pub trait Disk: Send + Sync + 'static {
    /// The whole of file `name`, or `None` if there is no such file.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Fills `buf` from `name` at offset `at`.
    fn read_at(&self, name: &str, at: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `bytes` into `name` at offset `at`, creating the file.
    fn write_at(&self, name: &str, at: u64, bytes: &[u8]) -> io::Result<()>;
    /// Cuts (or extends) `name` to `len` bytes, creating the file.
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    /// fdatasync: what was written to `name`, and its length, survive a
    /// crash once this returns.
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Renames `from` over `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// fsync of the directory: the names in it survive a crash.
    fn sync_dir(&self) -> io::Result<()>;
    /// How long a caller waits before a call that syncs: `None` for a real
    /// disk, where the call itself takes that long (and blocks), a drawn
    /// latency for a simulated one, whose calls return at once.
    fn latency(&self) -> Option<Duration>;
    /// Runs `task` (the store's writer) on a thread of its own, or, for a
    /// simulated disk, as a task of the simulation.
    fn spawn(&self, name: &str, task: Task) -> io::Result<()>;
}

/// Runs `f`, a few calls of `disk` that block, where blocking is allowed:
/// tokio's blocking pool for a real disk; for a simulated one, in place,
/// after its latency.
pub(super) async fn blocking<T: Send + 'static>(
    disk: &Arc<dyn Disk>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    if settle(disk.as_ref()).await {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
}

/// Waits out a simulated disk's latency; false for a real disk (whose
/// calls take their time themselves).
pub(super) async fn settle(disk: &dyn Disk) -> bool {
    match disk.latency() {
        Some(latency) => {
            tokio::time::sleep(latency).await;
            true
        }
        None => false,
    }
}

/// The whole of `name`; an empty file, created and made durable, if there
/// is none.
pub(super) fn read_or_create(disk: &dyn Disk, name: &str) -> io::Result<Vec<u8>> {
    if let Some(bytes) = disk.read(name)? {
        return Ok(bytes);
    }
    disk.set_len(name, 0)?;
    disk.sync(name)?;
    disk.sync_dir()?;
    Ok(Vec::new())
}

/// Writes `bytes` as the whole new content of `name`: into `name.new`,
/// synced, renamed over `name`, the directory synced. A crash leaves the
/// old file or the new one.
pub(super) fn replace(disk: &dyn Disk, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.new");
    disk.set_len(&tmp, 0)?;
    disk.write_at(&tmp, 0, bytes)?;
    disk.sync(&tmp)?;
    disk.rename(&tmp, name)?;
    disk.sync_dir()
}

/// The store's directory on the real filesystem, locked against a second
/// store opening it while this one (or its writer thread) lives.
pub struct FileDisk {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
    _lock: Flock<File>,
}

/// Why a directory cannot be the store's.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create or open {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("{0} is in use by another keyraft store")]
    Locked(PathBuf),
}

impl FileDisk {
    /// Creates `dir` if needed (and makes its name durable) and locks it.
    pub fn open(dir: &Path) -> Result<FileDisk, OpenError> {
        let fail = |e| OpenError::Dir(dir.to_path_buf(), e);
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(fail)?;
            if let Some(parent) = dir.parent() {
                crate::durable::fsync_dir(parent).map_err(fail)?;
            }
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(fail)?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
            .map_err(|_| OpenError::Locked(dir.to_path_buf()))?;
        crate::durable::fsync_dir(dir).map_err(fail)?;
        Ok(FileDisk {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<File>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `name`, open for reading and writing (created with `create`).
    fn file(&self, name: &str, create: bool) -> io::Result<Arc<File>> {
        if let Some(f) = self.files().get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(self.dir.join(name))?,
        );
        self.files().insert(name.to_string(), f.clone());
        Ok(f)
    }
}

impl Disk for FileDisk {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let f = match self.file(name, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = vec![0; f.metadata()?.len() as usize];
        f.read_exact_at(&mut bytes, 0)?;
        Ok(Some(bytes))
    }

    fn read_at(&self, name: &str, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(name, false)?.read_exact_at(buf, at)
    }

    fn write_at(&self, name: &str, at: u64, bytes: &[u8]) -> io::Result<()> {
        self.file(name, true)?.write_all_at(bytes, at)
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.file(name, true)?.set_len(len)
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.file(name, false)?.sync_data()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        let mut files = self.files();
        files.remove(to);
        if let Some(f) = files.remove(from) {
            files.insert(to.to_string(), f);
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        crate::durable::fsync_dir(&self.dir)
    }

    fn latency(&self) -> Option<Duration> {
        None
    }

    fn spawn(&self, name: &str, task: Task) -> io::Result<()> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || futures::executor::block_on(task))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_reads_whole_and_a_second_store_is_locked_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("raft");
        let disk = FileDisk::open(&dir).expect("open");
        assert!(disk.read("values").expect("read").is_none());
        disk.write_at("values", 0, b"old").expect("write");
        replace(&disk, "values", b"new bytes").expect("replace");
        disk.write_at("values", 9, b"!").expect("append");
        disk.sync("values").expect("sync");
        assert_eq!(
            disk.read("values").expect("read"),
            Some(b"new bytes!".to_vec())
        );
        assert!(matches!(FileDisk::open(&dir), Err(OpenError::Locked(_))));
        drop(disk);
        assert!(FileDisk::open(&dir).is_ok(), "the lock goes with the store");
    }
}
