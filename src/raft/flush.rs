//! Durability of the Raft store: sled plus a real fsync ([`Disk`]), and
//! the group-commit thread that acknowledges appends once flushed.
//!
//! Owns: every flush of the store's data file, and the order in which an
//! append's callback, the committed log id and a shutdown flush are
//! answered. Must not: write log entries (the store does, on the blocking
//! pool, before it hands the callback here) or run on an async worker.

use std::fs::File;
use std::io;
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::IOFlushed;

use super::store::COMMITTED;
use super::TypeConfig;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// sled and a real fsync. sled 0.34's `flush` ends in `sync_file_range`,
/// which neither flushes the drive's write cache nor the file's size, so a
/// vote or entry it calls durable can vanish on power loss. Every flush here
/// is followed by `fdatasync` of sled's data file, which does both.
#[derive(Clone)]
pub(super) struct Disk {
    pub(super) db: sled::Db,
    pub(super) file: Arc<File>,
    /// Unit tests only: a slow disk, milliseconds the fsync thread's next
    /// flush takes more.
    #[cfg(test)]
    pub(super) slow: Arc<std::sync::atomic::AtomicU64>,
}

impl Disk {
    pub(super) fn flush(&self) -> io::Result<()> {
        #[cfg(test)]
        if std::thread::current().name() == Some("raft-fsync") {
            std::thread::sleep(std::time::Duration::from_millis(
                self.slow.swap(0, std::sync::atomic::Ordering::Relaxed),
            ));
        }
        self.db.flush().map_err(io_err)?;
        self.file.sync_data()
    }
}

pub(super) fn fsync_gone() -> io::Error {
    io_err("the Raft store's fsync thread ended")
}

/// What the store's fsync thread is asked to do, in order.
pub(super) enum Job {
    /// An append's callback, for once a flush that started after its
    /// entries were written is done.
    Flushed(IOFlushed<TypeConfig>),
    /// The committed log id, which openraft allows a store to lose: written
    /// by the thread (and made durable by its next flush), never waited for.
    Committed(Vec<u8>),
    /// Flush what was asked before this, and answer (on shutdown).
    Flush(tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// Jobs taken into one flush at most: one that keeps arriving must not put
/// off the flush the earlier ones wait for.
const JOBS_PER_FLUSH: usize = 256;

/// Group commit: one fsync acknowledges every append written before it
/// started, in order. Appends are written on the blocking pool, never here,
/// so a slow fsync holds up no append (openraft's core waits for each).
/// The thread ends when the last [`LogStore`] is dropped.
pub(super) fn spawn_fsync(db: Disk, meta: sled::Tree) -> io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("raft-fsync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let (mut callbacks, mut answers) = (Vec::new(), Vec::new());
                for job in std::iter::once(first).chain(rx.try_iter().take(JOBS_PER_FLUSH)) {
                    match job {
                        Job::Flushed(callback) => callbacks.push(callback),
                        Job::Committed(bytes) => {
                            if let Err(e) = meta.insert(COMMITTED, bytes) {
                                tracing::warn!("cannot record the committed log id: {e}");
                            }
                        }
                        Job::Flush(answer) => answers.push(answer),
                    }
                }
                if callbacks.is_empty() && answers.is_empty() {
                    continue;
                }
                let flushed = db.flush().map_err(|e| e.to_string());
                for callback in callbacks {
                    callback.io_completed(flushed.clone().map_err(io::Error::other));
                }
                for answer in answers {
                    let _ = answer.send(flushed.clone().map_err(io::Error::other));
                }
            }
        })?;
    Ok(tx)
}
