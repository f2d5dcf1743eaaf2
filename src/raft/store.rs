//! Durable Raft storage: the log, the vote, and what opens them with the
//! state machine ([`super::machine`]).
//!
//! Owns: the on-disk layout of `DATA_DIR/raft` (the log file `log`, sled's
//! trees `meta`, `sm` and `memory`) and the durability promises openraft
//! relies on: a vote is fsynced before `save_vote` returns, appended entries
//! are fsynced before the IO callback fires, truncation and purging never
//! leave holes. Appends are handed to one writer thread, which writes them
//! to the log file ([`super::logfile`]) and acknowledges them in batches
//! after one fdatasync (group commit, in [`super::flush`]), so a slow disk
//! never stalls openraft's core, which also answers heartbeats; the
//! committed log id, which openraft lets a store lose, goes to that thread
//! without a wait too. The newest entries, and every one not yet written,
//! are kept in memory ([`Recent`]): reads take them there and the older
//! ones from the file. Must not: block an async worker (file and sled calls
//! run in `spawn_blocking` or on the writer thread), or change the log file
//! before the writer thread has written what came before.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use serde::{Deserialize, Serialize};

use super::flush::{fsync_gone, locked, spawn_fsync, Disk, Job};
use super::logfile::{LogFile, Records};
pub use super::machine::StateMachine;
use super::memory::{Holds, Memory};
use super::recent::Recent;
use super::{Entry, LogId, TypeConfig, Vote};

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
pub(super) const COMMITTED: &[u8] = b"committed";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the Raft store in {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("the Raft store in {path} is damaged: {why}")]
    Corrupt { path: String, why: String },
    #[error("cannot start the Raft store's fsync thread: {0}")]
    Flusher(io::Error),
}

pub(super) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs a sled operation off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(io_err)
}

pub(super) fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io_err)
}

pub(super) fn get<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    k: &[u8],
) -> io::Result<Option<T>> {
    tree.get(k).map_err(io_err)?.map(|v| decode(&v)).transpose()
}

/// Opens (or creates) the store in `dir`, with this node's memory of its
/// peers ([`Memory`]).
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine, Arc<Memory>), StoreError> {
    let path = dir.display().to_string();
    let open_err = |source| StoreError::Open {
        path: path.clone(),
        source,
    };
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::LowSpace)
        // Small: the vote, the applied state, the snapshot, the memory of
        // peers (the log has its own file). Flushed only when asked.
        .cache_capacity(4 << 20)
        .flush_every_ms(None)
        .open()
        .map_err(open_err)?;
    let meta = db.open_tree("meta").map_err(open_err)?;
    let sm = db.open_tree("sm").map_err(open_err)?;
    let remembered = db.open_tree("memory").map_err(open_err)?;
    let corrupt = |e: io::Error| StoreError::Corrupt {
        path: path.clone(),
        why: e.to_string(),
    };
    // The names sled created must survive a power loss too.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        crate::durable::fsync_dir(d).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            why: format!("cannot fsync {}: {e}", d.display()),
        })?;
    }
    let file = File::open(dir.join("db")).map_err(|e| StoreError::Corrupt {
        path: path.clone(),
        why: format!("no sled data file: {e}"),
    })?;
    let db = Disk {
        db,
        file: Arc::new(file),
        #[cfg(test)]
        slow: Arc::default(),
    };
    let purged: Option<LogId> = get(&meta, LAST_PURGED).map_err(corrupt)?;
    // An older keyraft's log, in sled's tree `log`, moves into the file.
    let sled_log = db.db.open_tree("log").map_err(open_err)?;
    let file = LogFile::open(dir, &sled_log, purged.map(|p| p.index)).map_err(corrupt)?;
    let file = Arc::new(Mutex::new(file));
    let recent = Arc::new(Recent::default());
    let fsync = spawn_fsync(db.clone(), file.clone(), meta.clone(), recent.clone())
        .map_err(StoreError::Flusher)?;
    let memory = Arc::new(Memory::open(db.clone(), remembered).map_err(corrupt)?);
    let sm = StateMachine::open(db.clone(), sm, memory.clone()).map_err(corrupt)?;
    Ok((
        LogStore {
            db,
            file,
            meta,
            fsync,
            recent,
        },
        sm,
        memory,
    ))
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Disk,
    /// The log file, shared with the writer thread.
    file: Arc<Mutex<LogFile>>,
    meta: sled::Tree,
    /// The writer thread (see [`spawn_fsync`]).
    fsync: mpsc::Sender<Job>,
    recent: Arc<Recent>,
}

impl LogStore {
    /// True if this store has never held a vote or an entry.
    pub fn is_fresh(&self) -> Result<bool, StoreError> {
        let damaged = |e: sled::Error| StoreError::Corrupt {
            path: "raft".into(),
            why: e.to_string(),
        };
        let empty = locked(&self.file)
            .map_err(|e| StoreError::Corrupt {
                path: "raft".into(),
                why: e.to_string(),
            })?
            .bounds()
            .is_none();
        Ok(empty
            && !self.meta.contains_key(VOTE).map_err(damaged)?
            && !self.meta.contains_key(LAST_PURGED).map_err(damaged)?)
    }

    /// What this data dir holds: its saved vote's term and its last log
    /// index, for the check of step 9 (blocking; call before Raft starts).
    pub fn holds(&self) -> Result<Holds, StoreError> {
        let damaged = |e: io::Error| StoreError::Corrupt {
            path: "raft".into(),
            why: e.to_string(),
        };
        let vote: Option<Vote> = get(&self.meta, VOTE).map_err(damaged)?;
        let last_purged: Option<LogId> = get(&self.meta, LAST_PURGED).map_err(damaged)?;
        let last = locked(&self.file).map_err(damaged)?.bounds();
        Ok(Holds {
            term: vote.map_or(0, |v| v.leader_id.term),
            last_index: last.map_or(last_purged.map_or(0, |l| l.index), |(_, l)| l),
        })
    }

    /// Flushes everything to disk (on shutdown), after what the fsync
    /// thread was asked to write (the committed log id).
    pub async fn flush(&self) -> io::Result<()> {
        let (answer, flushed) = tokio::sync::oneshot::channel();
        if self.fsync.send(Job::Flush(answer)).is_ok() {
            if let Ok(result) = flushed.await {
                return result;
            }
        }
        let db = self.db.clone();
        blocking(move || db.flush().map(|_| ()).map_err(io_err)).await
    }

    /// Waits until the writer thread has written every append handed to
    /// it: the log file may then be changed here.
    async fn written(&self) -> io::Result<()> {
        let (answer, done) = tokio::sync::oneshot::channel();
        self.fsync
            .send(Job::Barrier(answer))
            .map_err(|_| fsync_gone())?;
        done.await.map_err(|_| fsync_gone())
    }

    /// Checks that every entry of the log file decodes (the file was
    /// checked for holes when opened). Returns (first, last).
    pub async fn verify(&self) -> io::Result<Option<(u64, u64)>> {
        let file = self.file.clone();
        blocking(move || {
            let log = locked(&file)?;
            let bounds = log.bounds();
            if let Some((first, last)) = bounds {
                log.read(first, last + 1)?;
            }
            Ok(bounds)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        // The newest entries (and any the writer thread has not written
        // yet) from memory, the older ones from the file.
        let (first_here, tail) = self.recent.from(start, end);
        let head_end = match (first_here, end) {
            (Some(first), _) if first <= start => return Ok(tail),
            (Some(first), Some(end)) => first.min(end),
            (Some(first), None) => first,
            (None, end) => end.unwrap_or(u64::MAX),
        };
        let file = self.file.clone();
        let mut entries = blocking(move || locked(&file)?.read(start, head_end)).await?;
        entries.extend(tail);
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let meta = self.meta.clone();
        blocking(move || get(&meta, VOTE)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let (file, meta) = (self.file.clone(), self.meta.clone());
        let last_here = self.recent.last();
        blocking(move || {
            let last_purged: Option<LogId> = get(&meta, LAST_PURGED)?;
            let last = match last_here {
                Some(here) => Some(here),
                None => {
                    let log = locked(&file)?;
                    match log.bounds() {
                        Some((_, last)) => log.read(last, last + 1)?.pop().map(|e| e.log_id),
                        None => last_purged,
                    }
                }
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let (db, meta, bytes) = (self.db.clone(), self.meta.clone(), encode(vote)?);
        blocking(move || {
            meta.insert(VOTE, bytes).map_err(io_err)?;
            db.flush().map_err(io_err)?;
            Ok(())
        })
        .await
    }

    /// Not waited for: openraft calls this between a commit and its apply,
    /// and a store may lose it (a restart then learns the commit index from
    /// the leader).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.fsync
            .send(Job::Committed(encode(&committed)?))
            .map_err(|_| fsync_gone())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let meta = self.meta.clone();
        blocking(move || Ok(get::<Option<LogId>>(&meta, COMMITTED)?.flatten())).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let records = Records::new(&entries)?;
        // Readable now (from memory); written and made durable (and counted
        // by openraft) by the writer thread.
        let append = self.recent.appended(&entries);
        let job = Job::Write {
            records,
            append,
            callback,
        };
        if let Err(mpsc::SendError(job)) = self.fsync.send(job) {
            if let Job::Write { callback, .. } = job {
                callback.io_completed(Err(fsync_gone()));
            }
            return Err(fsync_gone());
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        // Forgotten here first: a failed truncation then reads the log.
        self.recent.truncated(from);
        self.written().await?;
        let file = self.file.clone();
        blocking(move || locked(&file)?.truncate(from)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.recent.purged(log_id.index);
        self.written().await?;
        let (db, file, meta) = (self.db.clone(), self.file.clone(), self.meta.clone());
        let bytes = encode(&log_id)?;
        blocking(move || {
            // The purge point first, and durable (with the applied state
            // and snapshot written before it) before the file loses a
            // byte: a crash leaves extra entries below it, never a hole.
            meta.insert(LAST_PURGED, bytes).map_err(io_err)?;
            locked(&file)?.purge(log_id.index, || db.flush())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use openraft::type_config::TypeConfigExt;

    use super::super::recent::RECENT;
    use super::*;

    fn entry(index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    async fn append(
        log: &mut LogStore,
        index: u64,
    ) -> openraft::type_config::alias::OneshotReceiverOf<TypeConfig, Result<(), io::Error>> {
        let (tx, rx) = TypeConfig::oneshot();
        log.append(vec![entry(index)], IOFlushed::signal(tx))
            .await
            .expect("append");
        rx
    }

    /// A store whose fsync thread's next flush takes `slow_ms` more, with
    /// entry 1 appended (the returned receiver says when it is durable).
    async fn slow_store(
        slow_ms: u64,
    ) -> (
        tempfile::TempDir,
        LogStore,
        openraft::type_config::alias::OneshotReceiverOf<TypeConfig, Result<(), io::Error>>,
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _sm, _memory) = open(&dir.path().join("raft")).expect("open");
        log.db.slow.store(slow_ms, Ordering::Relaxed);
        let first = append(&mut log, 1).await;
        (dir, log, first)
    }

    /// openraft's core waits for every append to return, and answers
    /// heartbeats and votes only in between: an fsync that takes a second
    /// must not hold up the next append for that second.
    #[tokio::test]
    async fn a_slow_fsync_holds_up_no_append() {
        let (_dir, mut log, first) = slow_store(1000).await;
        let started = Instant::now();
        let second = append(&mut log, 2).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "an append waited {:?} for an earlier append's fsync",
            started.elapsed()
        );
        for durable in [first, second] {
            durable.await.expect("callback").expect("durable");
        }
    }

    /// Appends handed to the writer thread while it is in a slow flush are
    /// read whole, in order, before they are written: the newest from
    /// memory, the oldest from the log file, however many wait.
    #[tokio::test]
    async fn appends_not_yet_written_are_read_whole() {
        let (_dir, mut log, first) = slow_store(1000).await;
        // Entry 1 written: the thread is in its slow flush.
        let deadline = Instant::now() + Duration::from_secs(10);
        while locked(&log.file).expect("log").bounds().is_none() {
            assert!(Instant::now() < deadline, "entry 1 never written");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = 2 * RECENT as u64;
        let mut durable = Vec::new();
        for i in 2..=last {
            durable.push(append(&mut log, i).await);
        }
        let indexes = |v: Vec<Entry>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        for (start, end) in [(1, last), (1, 10), (last - 5, last), (100, 300)] {
            let read = log.try_get_log_entries(start..=end).await.expect("read");
            assert_eq!(
                indexes(read),
                (start..=end).collect::<Vec<_>>(),
                "{start}..={end}"
            );
        }
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(last));
        let written = locked(&log.file).expect("log").bounds().map_or(0, |b| b.1);
        assert!(
            written < last,
            "all {written} written: the reads proved nothing"
        );
        first.await.expect("callback").expect("durable");
        for d in durable {
            d.await.expect("callback").expect("durable");
        }
        assert_eq!(locked(&log.file).expect("log").bounds(), Some((1, last)));
    }

    /// A clean shutdown flushes what the fsync thread was handed before it
    /// (the committed log id), even while that thread is in a slow flush.
    #[tokio::test]
    async fn the_shutdown_flush_includes_the_committed_log_id() {
        let (_dir, mut log, durable) = slow_store(300).await;
        log.save_committed(Some(entry(1).log_id))
            .await
            .expect("save_committed");
        log.flush().await.expect("flush");
        let saved: Option<Option<LogId>> = get(&log.meta, COMMITTED).expect("read");
        assert_eq!(saved, Some(Some(entry(1).log_id)));
        durable.await.expect("callback").expect("durable");
    }

    /// What a read returns after appends, a truncation and a purge is what
    /// the log holds, whether the newest entries come from memory or from
    /// the log file (a restart empties memory).
    #[tokio::test]
    async fn reads_see_truncations_and_purges_from_memory_and_from_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raft");
        let terms = |v: Vec<Entry>| -> Vec<(u64, u64)> {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        };
        {
            let (mut log, _sm, _memory) = open(&path).expect("open");
            for i in 1..=10 {
                append(&mut log, i)
                    .await
                    .await
                    .expect("callback")
                    .expect("durable");
            }
            log.truncate_after(Some(entry(6).log_id))
                .await
                .expect("truncate");
            let read = log.try_get_log_entries(5..=9).await.expect("read");
            assert_eq!(terms(read), vec![(5, 1), (6, 1)], "truncated entries read");
            let (tx, rx) = TypeConfig::oneshot();
            let newer: Vec<Entry> = (7..=8)
                .map(|i| openraft::testing::blank_ent::<TypeConfig>(2, 1, i))
                .collect();
            log.append(newer, IOFlushed::signal(tx))
                .await
                .expect("append");
            rx.await.expect("callback").expect("durable");
            log.purge(entry(3).log_id).await.expect("purge");
            let read = log.try_get_log_entries(1..=8).await.expect("read");
            assert_eq!(terms(read), vec![(4, 1), (5, 1), (6, 1), (7, 2), (8, 2)]);
            log.flush().await.expect("flush");
        }
        // The fsync thread lets go of the database once it sees the store
        // gone: a retry with a deadline, as a restart would wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut log, _sm, _memory) = loop {
            match open(&path) {
                Ok(store) => break store,
                Err(e) if Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let read = log.try_get_log_entries(1..=8).await.expect("read");
        assert_eq!(terms(read), vec![(4, 1), (5, 1), (6, 1), (7, 2), (8, 2)]);
    }
}
