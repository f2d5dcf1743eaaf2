//! The Raft store's writer: it writes appends to the log file and
//! acknowledges them once synced (group commit).
//!
//! Owns: every write of appended entries, every sync of the log file, and
//! the order in which appends, the committed log id, barriers and a
//! shutdown flush are carried out and answered. Must not: run on an async
//! worker (on a real disk it has a thread of its own), or make an append
//! wait (openraft's core waits for each `append` call, and answers
//! heartbeats only in between).
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::IOFlushed;
use tokio::sync::mpsc;

use super::disk::{self, Disk};
use super::layout::{COMMITTED, LOG};
use super::logfile::{LogFile, Records};
use super::recent::Recent;
use super::values::{self, Shared};
use super::TypeConfig;
use crate::plant::{self, Plant};

/// The log file, locked: a poisoned lock means a write may be half done,
/// so the log is not used again.
pub(super) fn locked(log: &Mutex<LogFile>) -> io::Result<MutexGuard<'_, LogFile>> {
    log.lock()
        .map_err(|_| io::Error::other("the Raft log file is unusable after a panic"))
}

pub(super) fn fsync_gone() -> io::Error {
    io::Error::other("the Raft store's writer ended")
}

/// What the store's writer is asked to do, in order.
pub(super) enum Job {
    /// An append: its entries (already in [`Recent`] as append number
    /// `append`) to write, and its callback, for once a sync that started
    /// after they were written is done.
    Write {
        records: Records,
        append: u64,
        callback: IOFlushed<TypeConfig>,
    },
    /// The committed log id, which openraft allows a store to lose: written
    /// by the writer (and made durable by a later sync), never waited for.
    Committed(Vec<u8>),
    /// Sync what was asked before this, and every values file, and answer
    /// (on shutdown).
    Flush(tokio::sync::oneshot::Sender<io::Result<()>>),
    /// Answered once every append asked before this is written (not yet
    /// synced): a truncation or purge comes after them.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The write or fsync that failed, shared by every job it fails: after it
/// the log file is broken, and nothing more is written (see `sync`).
type Failed = Arc<io::Error>;

/// Jobs taken into one sync at most: one that keeps arriving must not put
/// off the sync the earlier ones wait for.
const JOBS_PER_FLUSH: usize = 256;

/// What the writer has made durable: how many fdatasyncs of the log file,
/// and how many appended entries they covered (the metrics
/// `keyraft_raft_log_syncs_total` and `keyraft_raft_log_entries_synced_total`;
/// their ratio is how many entries one fsync carries).
/// Each count is taken once ([`Synced::take`]), so two readers at once
/// never both add the same syncs to a counter.
#[derive(Debug, Default)]
pub struct Synced {
    syncs: AtomicU64,
    entries: AtomicU64,
}

impl Synced {
    /// The syncs and entries counted since the last take, reset to 0.
    pub fn take(&self) -> (u64, u64) {
        (
            self.syncs.swap(0, Ordering::Relaxed),
            self.entries.swap(0, Ordering::Relaxed),
        )
    }

    fn count(&self, entries: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(entries, Ordering::Relaxed);
    }
}

/// What the writer works on.
pub(super) struct Writer {
    pub(super) log: Arc<Mutex<LogFile>>,
    pub(super) meta: Shared,
    /// Synced (with `meta`) by a [`Job::Flush`].
    pub(super) others: Vec<Shared>,
    pub(super) recent: Arc<Recent>,
    pub(super) synced: Arc<Synced>,
}

/// Starts the writer on `disk`'s thread (or simulated task); it ends when
/// the last [`LogStore`](super::store::LogStore) is dropped.
pub(super) fn spawn(disk: &Arc<dyn Disk>, w: Writer) -> io::Result<mpsc::UnboundedSender<Job>> {
    let (tx, rx) = mpsc::unbounded_channel();
    disk.spawn("raft-fsync", Box::pin(w.run(disk.clone(), rx)))?;
    Ok(tx)
}

impl Writer {
    /// Group commit: writes each append's entries to the log file in
    /// order, then one fdatasync acknowledges every append written before
    /// it started. An append only hands its entries over ([`Recent`] serves
    /// reads of them until they are written), so a slow fsync holds up no
    /// append. After a failed write or fsync every later append fails too:
    /// the log must not go on past a hole.
    async fn run(self, disk: Arc<dyn Disk>, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut broken: Option<Failed> = None;
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() <= JOBS_PER_FLUSH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let (callbacks, answers, entries) = self.write(jobs, &mut broken);
            if callbacks.is_empty() && answers.is_empty() {
                continue;
            }
            disk::settle(disk.as_ref()).await;
            let synced = self.sync(&disk, !answers.is_empty(), entries, &mut broken);
            for callback in callbacks {
                callback.io_completed(synced.clone().map_err(io::Error::other));
            }
            for answer in answers {
                let _ = answer.send(synced.clone().map_err(io::Error::other));
            }
        }
    }

    /// Carries out a batch's writes; returns the callbacks and answers that
    /// wait for the sync after them, and how many entries were written.
    #[allow(clippy::type_complexity)]
    fn write(
        &self,
        jobs: Vec<Job>,
        broken: &mut Option<Failed>,
    ) -> (
        Vec<IOFlushed<TypeConfig>>,
        Vec<tokio::sync::oneshot::Sender<io::Result<()>>>,
        u64,
    ) {
        let (mut callbacks, mut answers, mut entries) = (Vec::new(), Vec::new(), 0);
        for job in jobs {
            match job {
                Job::Write {
                    records,
                    append,
                    callback,
                } => {
                    let written = match &broken {
                        Some(why) => Err(why.clone()),
                        None => locked(&self.log)
                            .and_then(|mut l| l.append(&records))
                            .map_err(Arc::new),
                    };
                    match written {
                        Ok(()) if plant::on(Plant::AckBeforeFsync) => {
                            // Planted: acknowledged as durable when written.
                            self.recent.written(append);
                            callback.io_completed(Ok(()));
                        }
                        Ok(()) => {
                            self.recent.written(append);
                            entries += records.count() as u64;
                            callbacks.push(callback);
                        }
                        Err(why) => {
                            callback.io_completed(Err(io::Error::other(why.clone())));
                            *broken = Some(why);
                        }
                    }
                }
                Job::Committed(bytes) => {
                    let put = values::locked(&self.meta).and_then(|mut m| m.put(COMMITTED, bytes));
                    if let Err(e) = put {
                        tracing::warn!("cannot record the committed log id: {e}");
                    }
                }
                Job::Flush(answer) => answers.push(answer),
                Job::Barrier(answer) => {
                    let _ = answer.send(());
                }
            }
        }
        (callbacks, answers, entries)
    }

    /// Syncs the log file, and with `all` every values file too; a log
    /// sync that succeeds is counted with the `entries` it made durable,
    /// whatever a values file's sync after it does.
    fn sync(
        &self,
        disk: &Arc<dyn Disk>,
        all: bool,
        entries: u64,
        broken: &mut Option<Failed>,
    ) -> Result<(), Failed> {
        if let Some(why) = broken {
            return Err(why.clone());
        }
        // The file as it is now: a purge that rewrote it since made what
        // was written to the old one durable in both.
        let synced = disk.sync(LOG).map_err(Arc::new);
        if synced.is_ok() {
            self.synced.count(entries);
        }
        if let Err(why) = &synced {
            // After a failed fsync the kernel may have dropped the pages it
            // could not write: a later fsync that succeeds proves nothing
            // about them, so nothing more is written.
            broken.get_or_insert_with(|| why.clone());
        }
        if !all || synced.is_err() {
            return synced;
        }
        for v in std::iter::once(&self.meta).chain(&self.others) {
            values::locked(v)
                .and_then(|mut v| v.sync())
                .map_err(Arc::new)?;
        }
        Ok(())
    }
}
