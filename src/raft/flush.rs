//! Durability of the Raft store: sled plus a real fsync ([`Disk`]), and
//! the writer thread that writes appends to the log file and acknowledges
//! them once synced (group commit).
//!
//! Owns: every write of appended entries, every sync of the log file, and
//! the order in which appends, the committed log id,
//! barriers and a shutdown flush are carried out and answered. Must not:
//! run on an async worker, or make an append wait (openraft's core waits
//! for each `append` call, and answers heartbeats only in between).
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::{mpsc, Mutex, MutexGuard};

use openraft::storage::IOFlushed;

use super::logfile::{LogFile, Records};
use super::recent::Recent;
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
        self.db.flush().map_err(io_err)?;
        self.file.sync_data()
    }

    /// Unit tests only: waits out the slow disk set in `slow`.
    fn slow_down(&self) {
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_millis(
            self.slow.swap(0, std::sync::atomic::Ordering::Relaxed),
        ));
    }
}

/// The log file, locked: a poisoned lock means a write may be half done,
/// so the log is not used again.
pub(super) fn locked(log: &Mutex<LogFile>) -> io::Result<MutexGuard<'_, LogFile>> {
    log.lock()
        .map_err(|_| io_err("the Raft log file is unusable after a panic"))
}

pub(super) fn fsync_gone() -> io::Error {
    io_err("the Raft store's fsync thread ended")
}

/// What the store's writer thread is asked to do, in order.
pub(super) enum Job {
    /// An append: its entries (already in [`Recent`] as append number
    /// `append`) to write, and its callback, for once a flush that started
    /// after they were written is done.
    Write {
        records: Records,
        append: u64,
        callback: IOFlushed<TypeConfig>,
    },
    /// The committed log id, which openraft allows a store to lose: written
    /// by the thread (and made durable by its next flush), never waited for.
    Committed(Vec<u8>),
    /// Flush what was asked before this, and answer (on shutdown).
    Flush(tokio::sync::oneshot::Sender<io::Result<()>>),
    /// Answered once every append asked before this is written (not yet
    /// flushed): a truncation or purge of sled comes after them.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Jobs taken into one flush at most: one that keeps arriving must not put
/// off the flush the earlier ones wait for.
const JOBS_PER_FLUSH: usize = 256;

/// Group commit: writes each append's entries to the log file in order,
/// then one fdatasync acknowledges every append written before it started. An append only
/// hands its entries over ([`Recent`] serves reads of them until they are
/// written), so a slow fsync holds up no append, and no append pays a trip
/// through the blocking pool. After a failed write or fsync every later
/// append fails too: the log must not go on past a hole. The thread ends when the last
/// [`LogStore`](super::store::LogStore) is dropped.
pub(super) fn spawn_fsync(
    db: Disk,
    log: Arc<Mutex<LogFile>>,
    meta: sled::Tree,
    recent: Arc<Recent>,
) -> io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("raft-fsync".into())
        .spawn(move || {
            let mut broken: Option<String> = None;
            while let Ok(first) = rx.recv() {
                let (mut callbacks, mut answers) = (Vec::new(), Vec::new());
                for job in std::iter::once(first).chain(rx.try_iter().take(JOBS_PER_FLUSH)) {
                    match job {
                        Job::Write {
                            records,
                            append,
                            callback,
                        } => {
                            let written = match &broken {
                                Some(why) => Err(why.clone()),
                                None => locked(&log)
                                    .and_then(|mut l| l.append(&records))
                                    .map_err(|e| e.to_string()),
                            };
                            match written {
                                Ok(()) => {
                                    recent.written(append);
                                    callbacks.push(callback);
                                }
                                Err(why) => {
                                    callback.io_completed(Err(io::Error::other(why.clone())));
                                    broken = Some(why);
                                }
                            }
                        }
                        Job::Committed(bytes) => {
                            if let Err(e) = meta.insert(COMMITTED, bytes) {
                                tracing::warn!("cannot record the committed log id: {e}");
                            }
                        }
                        Job::Flush(answer) => answers.push(answer),
                        Job::Barrier(answer) => {
                            let _ = answer.send(());
                        }
                    }
                }
                if callbacks.is_empty() && answers.is_empty() {
                    continue;
                }
                db.slow_down();
                // The file as it is now: a purge that rewrote it since made
                // what was written to the old one durable in the new one.
                let mut flushed = locked(&log)
                    .map(|l| l.file())
                    .and_then(|f| f.sync_data())
                    .map_err(|e| e.to_string());
                if let Err(why) = &flushed {
                    // After a failed fsync the kernel may have dropped the
                    // pages it could not write: a later fsync that succeeds
                    // proves nothing about them, so nothing more is written.
                    broken.get_or_insert_with(|| why.clone());
                }
                if !answers.is_empty() && flushed.is_ok() {
                    flushed = db.flush().map_err(|e| e.to_string());
                }
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
