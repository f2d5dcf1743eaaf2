//! Durable Raft storage on sled: the log, the vote, and the state machine.
//!
//! Owns: the on-disk layout of `DATA_DIR/raft` (trees `log`, `meta`, `sm`)
//! and the durability promises openraft relies on: a vote is fsynced before
//! `save_vote` returns, appended entries are fsynced before the IO callback
//! fires, truncation and purging never leave holes. Appends return once
//! written and are acknowledged in batches by one fsync thread (group
//! commit, in [`super::flush`]), so a slow disk never stalls openraft's
//! core, which also answers heartbeats; the committed log id, which
//! openraft lets a store lose, is handed to that thread without a wait. The last entries appended are
//! also kept in memory ([`Recent`]): replication and apply read them there,
//! without a trip through the blocking pool. Must not: block an async worker
//! (every other sled call runs in `spawn_blocking`) or interpret commands
//! beyond [`ClusterState::apply`].

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use futures::TryStreamExt;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::flush::{fsync_gone, spawn_fsync, Disk, Job};
use super::memory::{Holds, Memory};
use super::recent::Recent;
use super::{Entry, LogId, Membership, TypeConfig, Vote};
use crate::ledger::{ClusterState, Command, Reply};

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
pub(super) const COMMITTED: &[u8] = b"committed";
const SM_DATA: &[u8] = b"data";
const SM_SNAPSHOT: &[u8] = b"snapshot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the Raft store in {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("the Raft store in {path} is damaged: {why}")]
    Corrupt { path: String, why: String },
    #[error("cannot start the Raft store's fsync thread: {0}")]
    Flusher(io::Error),
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs a sled operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(io_err)
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io_err)
}

fn get<T: for<'de> Deserialize<'de>>(tree: &sled::Tree, k: &[u8]) -> io::Result<Option<T>> {
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
        // The log is small: a few activation, membership and registration
        // entries. Keep the page cache small, and flush only when asked
        // (appends and votes fsync explicitly).
        .cache_capacity(4 << 20)
        .flush_every_ms(None)
        .open()
        .map_err(open_err)?;
    let log = db.open_tree("log").map_err(open_err)?;
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
    let data: SmData = get(&sm, SM_DATA).map_err(corrupt)?.unwrap_or_default();
    let (tx, _) = watch::channel(data.state.clone());
    let fsync = spawn_fsync(db.clone(), meta.clone()).map_err(StoreError::Flusher)?;
    let memory = Arc::new(Memory::open(db.clone(), remembered).map_err(corrupt)?);
    Ok((
        LogStore {
            db: db.clone(),
            log,
            meta,
            fsync,
            recent: Arc::default(),
        },
        StateMachine {
            db,
            tree: sm,
            data,
            published: tx,
            memory: memory.clone(),
        },
        memory,
    ))
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Disk,
    log: sled::Tree,
    meta: sled::Tree,
    /// The fsync thread (see [`spawn_fsync`]).
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
        Ok(self.log.is_empty()
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
        let last = match self.log.last().map_err(|e| damaged(io_err(e)))? {
            Some((_, v)) => Some(decode::<Entry>(&v).map_err(damaged)?.log_id),
            None => last_purged,
        };
        Ok(Holds {
            term: vote.map_or(0, |v| v.leader_id.term),
            last_index: last.map_or(0, |l| l.index),
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

    /// Checks that the log has no holes: every index from the first to the
    /// last present entry is there and decodes. Returns (first, last).
    pub async fn verify(&self) -> io::Result<Option<(u64, u64)>> {
        let log = self.log.clone();
        blocking(move || {
            let mut bounds: Option<(u64, u64)> = None;
            for item in log.iter() {
                let (k, v) = item.map_err(io_err)?;
                let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
                let entry: Entry = decode(&v)?;
                if entry.log_id.index != idx {
                    return Err(io_err(format!(
                        "entry under key {idx} has index {}",
                        entry.log_id.index
                    )));
                }
                bounds = match bounds {
                    None => Some((idx, idx)),
                    Some((first, last)) if idx == last + 1 => Some((first, idx)),
                    Some((_, last)) => {
                        return Err(io_err(format!("hole in the log after index {last}")))
                    }
                };
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
            Bound::Included(e) => Bound::Included(key(*e)),
            Bound::Excluded(e) => Bound::Excluded(key(*e)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let recent_end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        if let Some(entries) = self.recent.get(start, recent_end) {
            return Ok(entries);
        }
        let log = self.log.clone();
        blocking(move || {
            log.range((Bound::Included(key(start)), end))
                .values()
                .map(|v| decode(&v.map_err(io_err)?))
                .collect()
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let meta = self.meta.clone();
        blocking(move || get(&meta, VOTE)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let (log, meta) = (self.log.clone(), self.meta.clone());
        blocking(move || {
            let last_purged: Option<LogId> = get(&meta, LAST_PURGED)?;
            let last = match log.last().map_err(io_err)? {
                Some((_, v)) => Some(decode::<Entry>(&v)?.log_id),
                None => last_purged,
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
        let mut batch = sled::Batch::default();
        for e in &entries {
            batch.insert(&key(e.log_id.index), encode(e)?);
        }
        let log = self.log.clone();
        if let Err(e) = blocking(move || log.apply_batch(batch).map_err(io_err)).await {
            callback.io_completed(Err(io::Error::other(e.to_string())));
            return Err(e);
        }
        self.recent.appended(&entries);
        // Readable now; durable (and counted by openraft) once the fsync
        // thread has flushed.
        if let Err(mpsc::SendError(job)) = self.fsync.send(Job::Flushed(callback)) {
            if let Job::Flushed(callback) = job {
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
        let (db, log) = (self.db.clone(), self.log.clone());
        blocking(move || {
            let mut batch = sled::Batch::default();
            for k in log.range(key(from)..).keys() {
                batch.remove(k.map_err(io_err)?);
            }
            log.apply_batch(batch).map_err(io_err)?;
            db.flush().map_err(io_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.recent.purged(log_id.index);
        let (log, meta, bytes) = (self.log.clone(), self.meta.clone(), encode(&log_id)?);
        blocking(move || {
            // Record the purge point first: a crash in between leaves extra
            // entries below it, never a hole above it.
            meta.insert(LAST_PURGED, bytes).map_err(io_err)?;
            let mut batch = sled::Batch::default();
            for k in log.range(..=key(log_id.index)).keys() {
                batch.remove(k.map_err(io_err)?);
            }
            log.apply_batch(batch).map_err(io_err)
        })
        .await
    }
}

/// What the state machine persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId>,
    membership: Membership,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// The replicated [`ClusterState`], applied from committed entries.
pub struct StateMachine {
    db: Disk,
    tree: sled::Tree,
    data: SmData,
    published: watch::Sender<ClusterState>,
    memory: Arc<Memory>,
}

impl StateMachine {
    /// The index of the last applied entry (a snapshot installed counts:
    /// its entries may not be in the log).
    pub fn applied_index(&self) -> u64 {
        self.data.last_applied.map_or(0, |l| l.index)
    }

    /// Follows the applied cluster state.
    pub fn subscribe(&self) -> watch::Receiver<ClusterState> {
        self.published.subscribe()
    }

    /// Writes the applied state; with `sync`, fsynced before it returns and
    /// only then published. Without, published first: nothing unsynced is
    /// durable anyway, and whoever waits on the state (a second sentry's
    /// request for the HRS just committed) sees it at once.
    async fn persist(&self, sync: bool) -> io::Result<()> {
        if !sync {
            self.published.send_replace(self.data.state.clone());
        }
        let (db, tree, bytes) = (self.db.clone(), self.tree.clone(), encode(&self.data)?);
        blocking(move || {
            tree.insert(SM_DATA, bytes).map_err(io_err)?;
            if sync {
                db.flush()?;
            }
            Ok(())
        })
        .await?;
        if sync {
            self.published.send_replace(self.data.state.clone());
        }
        Ok(())
    }
}

pub struct SnapshotBuilder {
    db: Disk,
    tree: sled::Tree,
    data: SmData,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let meta = openraft::SnapshotMeta {
            last_log_id: self.data.last_applied,
            last_membership: self.data.membership.clone(),
        };
        let data = encode(&self.data.state)?;
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })?;
        let (db, tree) = (self.db.clone(), self.tree.clone());
        blocking(move || {
            tree.insert(SM_SNAPSHOT, stored).map_err(io_err)?;
            db.flush().map(|_| ()).map_err(io_err)
        })
        .await?;
        Ok(openraft::Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), io::Error> {
        Ok((self.data.last_applied, self.data.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        // What answers a peer's Hello (registrations, membership) is
        // fsynced before it is relied on: a crash of every member at once
        // must not forget that a node registered.
        let mut sync = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            self.data.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Reply::default(),
                EntryPayload::Normal(cmd) => {
                    tracing::debug!(index = entry.log_id.index, "applied: {cmd}");
                    match cmd {
                        Command::Register { .. } => sync = true,
                        Command::Rejoined { node } => self.memory.forget(node).await?,
                        _ => {}
                    }
                    self.data.state.apply(&cmd, entry.log_id.index)
                }
                EntryPayload::Membership(m) => {
                    sync = true;
                    self.data.membership = openraft::StoredMembership::new(Some(entry.log_id), m);
                    Reply::default()
                }
            };
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        self.persist(sync).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            tree: self.tree.clone(),
            data: self.data.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        self.data = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: decode(&snapshot)?,
        };
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        })?;
        let tree = self.tree.clone();
        blocking(move || tree.insert(SM_SNAPSHOT, stored).map(|_| ()).map_err(io_err)).await?;
        self.persist(true).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        let tree = self.tree.clone();
        let stored: Option<StoredSnapshot> = blocking(move || get(&tree, SM_SNAPSHOT)).await?;
        Ok(stored.map(|s| openraft::Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use openraft::type_config::TypeConfigExt;

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
    /// sled (a restart empties memory).
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
