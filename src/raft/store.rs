//! Durable Raft storage: the log, the vote, and what opens them with the
//! state machine ([`super::machine`]) and the member memory
//! ([`super::memory`]).
//!
//! Owns: opening `DATA_DIR/raft` ([`super::layout`] names its files) and
//! the durability promises openraft relies on: a vote is fsynced before
//! `save_vote` returns, appended entries are fsynced before the IO
//! callback fires, truncation and purging never leave holes. Appends are
//! handed to one writer ([`super::flush`]), which writes them to the log
//! file ([`super::logfile`]) and acknowledges them in batches after one
//! fdatasync (group commit), so a slow disk never stalls openraft's core,
//! which also answers heartbeats; the committed log id, which openraft
//! lets a store lose, goes to the writer without a wait too. The newest
//! entries, and every one not yet written, are kept in memory
//! ([`Recent`]): reads take them there and the older ones from the file.
//! Every file call goes through a [`Disk`]: the real directory, or the
//! simulator's. Must not: block an async worker (file calls run through
//! [`disk::blocking`] or on the writer), or change the log file before the
//! writer has written what came before.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use tokio::sync::mpsc;

use super::disk::{self, Disk, FileDisk};
use super::flush::{fsync_gone, locked, Job, Synced, Writer};
use super::layout::{COMMITTED, LAST_PURGED, MEMORY, META, STATE, VOTE};
use super::logfile::{LogFile, Records};
pub use super::machine::{Observer, StateMachine};
use super::memory::{Holds, Memory};
use super::recent::Recent;
use super::values::{self, Shared, Values};
use super::{Entry, LogId, TypeConfig, Vote};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the Raft store in {path}: {source}")]
    Open {
        path: String,
        source: disk::OpenError,
    },
    #[error("the Raft store in {path} is damaged: {why}")]
    Corrupt { path: String, why: io::Error },
    #[error("cannot move the Raft store in {path} out of sled: {why}")]
    FromSled { path: String, why: io::Error },
    #[error("cannot start the Raft store's writer: {0}")]
    Flusher(io::Error),
}

/// Opens (or creates) the store in `dir`, with this node's memory of its
/// peers ([`Memory`]); a store an older keyraft kept in sled moves into
/// today's files first.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine, Arc<Memory>), StoreError> {
    let path = dir.display().to_string();
    let disk = FileDisk::open(dir).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    if super::from_sled::needed(dir) {
        super::from_sled::move_store(dir, &disk).map_err(|why| StoreError::FromSled {
            path: path.clone(),
            why,
        })?;
    }
    open_on(Arc::new(disk), None).map_err(|e| match e {
        StoreError::Corrupt { why, .. } => StoreError::Corrupt { path, why },
        other => other,
    })
}

/// Opens (or creates) the store on `disk`; `observer` is told of every
/// entry applied (the simulator's judge).
pub fn open_on(
    disk: Arc<dyn Disk>,
    observer: Option<Observer>,
) -> Result<(LogStore, StateMachine, Arc<Memory>), StoreError> {
    let corrupt = |why: io::Error| StoreError::Corrupt {
        path: "raft".into(),
        why,
    };
    let meta = Values::shared(disk.clone(), META).map_err(corrupt)?;
    let state = Values::shared(disk.clone(), STATE).map_err(corrupt)?;
    let remembered = Values::shared(disk.clone(), MEMORY).map_err(corrupt)?;
    let purged: Option<LogId> = values::locked(&meta)
        .and_then(|m| m.get_json(LAST_PURGED))
        .map_err(corrupt)?;
    let file = LogFile::open(disk.clone(), purged.map(|p| p.index)).map_err(corrupt)?;
    let file = Arc::new(Mutex::new(file));
    let recent = Arc::new(Recent::default());
    let synced = Arc::new(Synced::default());
    let writer = Writer {
        log: file.clone(),
        meta: meta.clone(),
        others: vec![state.clone(), remembered.clone()],
        recent: recent.clone(),
        synced: synced.clone(),
    };
    let fsync = super::flush::spawn(&disk, writer).map_err(StoreError::Flusher)?;
    let memory = Arc::new(Memory::open(disk.clone(), remembered).map_err(corrupt)?);
    let sm = StateMachine::open(disk.clone(), state, memory.clone(), observer).map_err(corrupt)?;
    Ok((
        LogStore {
            disk,
            file,
            meta,
            fsync,
            recent,
            synced,
        },
        sm,
        memory,
    ))
}

/// What the store on `disk` holds (its vote's term, its last log index),
/// read without starting its writer: the simulator's judge reads a copy
/// of a disk with it.
pub fn holds_on(disk: Arc<dyn Disk>) -> Result<Holds, StoreError> {
    let corrupt = |why: io::Error| StoreError::Corrupt {
        path: "raft".into(),
        why,
    };
    let meta = Values::open(disk.clone(), META).map_err(corrupt)?;
    let vote: Option<Vote> = meta.get_json(VOTE).map_err(corrupt)?;
    let purged: Option<LogId> = meta.get_json(LAST_PURGED).map_err(corrupt)?;
    let log = LogFile::open(disk, purged.map(|p| p.index)).map_err(corrupt)?;
    Ok(held(vote, purged, log.bounds()))
}

/// What a store holds, from its vote, purge point and log bounds.
fn held(vote: Option<Vote>, purged: Option<LogId>, bounds: Option<(u64, u64)>) -> Holds {
    Holds {
        term: vote.map_or(0, |v| v.leader_id.term),
        last_index: bounds.map_or(purged.map_or(0, |l| l.index), |(_, l)| l),
    }
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    disk: Arc<dyn Disk>,
    /// The log file, shared with the writer.
    file: Arc<Mutex<LogFile>>,
    meta: Shared,
    /// The writer (see [`super::flush`]).
    fsync: mpsc::UnboundedSender<Job>,
    recent: Arc<Recent>,
    synced: Arc<Synced>,
}

impl LogStore {
    /// What the writer has made durable so far (for the metrics).
    pub fn synced(&self) -> Arc<Synced> {
        self.synced.clone()
    }

    /// True if this store has never held a vote or an entry.
    pub fn is_fresh(&self) -> Result<bool, StoreError> {
        let damaged = |why: io::Error| StoreError::Corrupt {
            path: "raft".into(),
            why,
        };
        let empty = locked(&self.file).map_err(damaged)?.bounds().is_none();
        let meta = values::locked(&self.meta).map_err(damaged)?;
        Ok(empty && !meta.contains(VOTE) && !meta.contains(LAST_PURGED))
    }

    /// What this data dir holds: its saved vote's term and its last log
    /// index, for the check of step 9 (blocking; call before Raft starts).
    pub fn holds(&self) -> Result<Holds, StoreError> {
        let damaged = |why: io::Error| StoreError::Corrupt {
            path: "raft".into(),
            why,
        };
        let (vote, last_purged): (Option<Vote>, Option<LogId>) = {
            let meta = values::locked(&self.meta).map_err(damaged)?;
            (
                meta.get_json(VOTE).map_err(damaged)?,
                meta.get_json(LAST_PURGED).map_err(damaged)?,
            )
        };
        let last = locked(&self.file).map_err(damaged)?.bounds();
        Ok(held(vote, last_purged, last))
    }

    /// Syncs everything (on shutdown), after what the writer was asked to
    /// write (the committed log id).
    pub async fn flush(&self) -> io::Result<()> {
        let (answer, flushed) = tokio::sync::oneshot::channel();
        self.fsync
            .send(Job::Flush(answer))
            .map_err(|_| fsync_gone())?;
        flushed.await.map_err(|_| fsync_gone())?
    }

    /// Waits until the writer has written every append handed to it: the
    /// log file may then be changed here.
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
        disk::blocking(&self.disk, move || {
            let log = locked(&file)?;
            let bounds = log.bounds();
            if let Some((first, last)) = bounds {
                log.read(first, last + 1)?;
            }
            Ok(bounds)
        })
        .await
    }

    /// A value of `meta`.
    fn meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        values::locked(&self.meta)?.get_json(key)
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
        // The newest entries (and any the writer has not written yet) from
        // memory, the older ones from the file.
        let (first_here, tail) = self.recent.from(start, end);
        let head_end = match (first_here, end) {
            (Some(first), _) if first <= start => return Ok(tail),
            (Some(first), Some(end)) => first.min(end),
            (Some(first), None) => first,
            (None, end) => end.unwrap_or(u64::MAX),
        };
        let file = self.file.clone();
        let mut entries =
            disk::blocking(&self.disk, move || locked(&file)?.read(start, head_end)).await?;
        entries.extend(tail);
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let file = self.file.clone();
        let last_here = self.recent.last();
        let last_purged: Option<LogId> = self.meta(LAST_PURGED)?;
        disk::blocking(&self.disk, move || {
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
        let (meta, vote) = (self.meta.clone(), *vote);
        disk::blocking(&self.disk, move || {
            let mut meta = values::locked(&meta)?;
            meta.put_json(VOTE, &vote)?;
            meta.sync()
        })
        .await
    }

    /// Not waited for: openraft calls this between a commit and its apply,
    /// and a store may lose it (a restart then learns the commit index from
    /// the leader).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let bytes = serde_json::to_vec(&committed).map_err(io::Error::other)?;
        self.fsync
            .send(Job::Committed(bytes))
            .map_err(|_| fsync_gone())
    }

    /// The committed log id is written before the sync of the log in the
    /// same batch, and any sync of `meta` makes it durable: a crash may
    /// leave it past the log's end. It is then lost, as openraft allows.
    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let committed = self.meta::<Option<LogId>>(COMMITTED)?.flatten();
        let last = self.get_log_state().await?.last_log_id;
        Ok(committed.filter(|c| last.is_some_and(|l| l.index >= c.index)))
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
        // by openraft) by the writer.
        let append = self.recent.appended(&entries);
        let job = Job::Write {
            records,
            append,
            callback,
        };
        if let Err(mpsc::error::SendError(job)) = self.fsync.send(job) {
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
        disk::blocking(&self.disk, move || locked(&file)?.truncate(from)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.recent.purged(log_id.index);
        self.written().await?;
        let (file, meta) = (self.file.clone(), self.meta.clone());
        disk::blocking(&self.disk, move || {
            // The purge point first, and durable (with the applied state
            // and snapshot written before it) before the file loses a
            // byte: a crash leaves extra entries below it, never a hole.
            values::locked(&meta)?.put_json(LAST_PURGED, &log_id)?;
            locked(&file)?.purge(log_id.index, || values::locked(&meta)?.sync())
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

    /// A real directory whose next sync takes `slow` milliseconds more.
    struct SlowDisk {
        real: FileDisk,
        slow: std::sync::atomic::AtomicU64,
    }

    impl Disk for SlowDisk {
        fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
            self.real.read(name)
        }
        fn read_at(&self, name: &str, at: u64, buf: &mut [u8]) -> io::Result<()> {
            self.real.read_at(name, at, buf)
        }
        fn write_at(&self, name: &str, at: u64, bytes: &[u8]) -> io::Result<()> {
            self.real.write_at(name, at, bytes)
        }
        fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
            self.real.set_len(name, len)
        }
        fn sync(&self, name: &str) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(self.slow.swap(0, Ordering::Relaxed)));
            self.real.sync(name)
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.real.rename(from, to)
        }
        fn sync_dir(&self) -> io::Result<()> {
            self.real.sync_dir()
        }
        fn latency(&self) -> Option<Duration> {
            None
        }
        fn spawn(&self, name: &str, task: disk::Task) -> io::Result<()> {
            self.real.spawn(name, task)
        }
    }

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
        let disk = Arc::new(SlowDisk {
            real: FileDisk::open(&dir.path().join("raft")).expect("disk"),
            slow: Default::default(),
        });
        let (mut log, _sm, _memory) = open_on(disk.clone(), None).expect("open");
        disk.slow.store(slow_ms, Ordering::Relaxed);
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
        let saved: Option<Option<LogId>> = log.meta(COMMITTED).expect("read");
        assert_eq!(saved, Some(Some(entry(1).log_id)));
        durable.await.expect("callback").expect("durable");
    }

    /// A committed log id made durable ahead of the log (with a sync of
    /// `meta` before the log's) is forgotten, not handed to openraft, which
    /// could not start on it.
    #[tokio::test]
    async fn a_committed_log_id_past_the_log_is_forgotten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _sm, _memory) = open(&dir.path().join("raft")).expect("open");
        append(&mut log, 1)
            .await
            .await
            .expect("callback")
            .expect("durable");
        log.save_committed(Some(entry(1).log_id))
            .await
            .expect("save");
        log.flush().await.expect("flush");
        assert_eq!(
            log.read_committed().await.expect("read"),
            Some(entry(1).log_id)
        );
        log.save_committed(Some(entry(5).log_id))
            .await
            .expect("save");
        log.flush().await.expect("flush");
        assert_eq!(log.read_committed().await.expect("read"), None);
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
