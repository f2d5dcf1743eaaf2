//! Storage that forgets what was not synced: each host's disk, and the
//! openraft log store and state machine over it.
//!
//! Writes land in the "page cache" at once (reads see them) and become
//! durable only when a sync that started after them completes, a drawn
//! latency later. A host crash rolls every unsynced write back; a process
//! kill does not (the page cache survives it). A copy of a disk is its
//! durable image, for restoring a node from an older backup (the amnesia
//! case). The promises are keyraft's (`src/raft/store.rs`): a vote is
//! synced before `save_vote` returns, an append's callback fires only once
//! synced, truncation and purge are synced before they return. The applied
//! state is not kept: a restarted node rebuilds it from its snapshot and
//! log, as openraft replays them.
//!
//! Owns: [`Disk`] and its crash semantics. Must not: interpret commands
//! beyond the real [`ClusterState::apply`].

use std::collections::BTreeMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keyraft::ledger::{ClusterState, Command, Reply};
use keyraft::raft::memory::Remembered;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::{EntryPayload, OptionalSend};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::types::{Entry, LogId, Membership, NodeId, Types, Vote};

/// An unsynced write, and how to take it back.
#[derive(Clone)]
enum Undo {
    Log(u64, Option<Entry>),
    Vote(Option<Vote>),
    Committed(Option<LogId>),
}

/// One host's disk: what reads see, and the writes not yet durable.
#[derive(Clone)]
pub struct DiskState {
    vote: Option<Vote>,
    log: BTreeMap<u64, Entry>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    snapshot: Option<(SnapshotMetaOf<Types>, Vec<u8>)>,
    /// What this node remembers of each member (step 9); written durably
    /// at once (keyraft fsyncs a term before it counts).
    pub memory: BTreeMap<NodeId, Remembered>,
    undo: Vec<(u64, Undo)>,
    seq: u64,
    synced: u64,
    /// Bumped by every crash and restart: a store of an earlier process
    /// can no longer write.
    incarnation: u64,
    /// Extra sync latency (a slow disk fault).
    pub slow: Duration,
    rng: SmallRng,
}

/// A host's disk, shared by the world (faults) and the node's store.
#[derive(Clone)]
pub struct Disk(pub Arc<Mutex<DiskState>>);

fn gone() -> io::Error {
    io::Error::other("the process that owned this store is gone")
}

impl Disk {
    pub fn new(seed: u64) -> Disk {
        Disk(Arc::new(Mutex::new(DiskState {
            vote: None,
            log: BTreeMap::new(),
            committed: None,
            last_purged: None,
            snapshot: None,
            memory: BTreeMap::new(),
            undo: Vec::new(),
            seq: 0,
            synced: 0,
            incarnation: 0,
            slow: Duration::ZERO,
            rng: SmallRng::seed_from_u64(seed),
        })))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host crash: every unsynced write is lost. Returns the new incarnation.
    pub fn crash(&self) -> u64 {
        let mut d = self.lock();
        d.roll_back();
        d.incarnation += 1;
        d.incarnation
    }

    /// A process stop without a host crash: the page cache survives.
    pub fn new_process(&self) -> u64 {
        let mut d = self.lock();
        d.incarnation += 1;
        d.incarnation
    }

    /// The durable image, as a backup taken now would hold it.
    pub fn image(&self) -> DiskState {
        let mut copy = self.lock().clone();
        copy.roll_back();
        copy
    }

    /// Replaces the disk by an older image (a restored data dir) or an
    /// empty one; the host must be down.
    pub fn restore(&self, image: Option<DiskState>) {
        let mut d = self.lock();
        let (inc, slow, rng) = (d.incarnation + 1, d.slow, d.rng.clone());
        *d = image.unwrap_or_else(|| Disk::new(0).image());
        d.incarnation = inc;
        d.slow = slow;
        d.rng = rng;
    }

    /// What this data dir holds, for step 9's check at start.
    pub fn holds(&self) -> keyraft::raft::memory::Holds {
        self.lock().holds()
    }
}

impl DiskState {
    /// What this image holds (its vote's term, its last log index).
    pub fn holds(&self) -> keyraft::raft::memory::Holds {
        let d = self;
        keyraft::raft::memory::Holds {
            term: d.vote.map_or(0, |v| v.leader_id.term),
            last_index: d
                .log
                .keys()
                .next_back()
                .copied()
                .or(d.last_purged.map(|l| l.index))
                .unwrap_or(0),
        }
    }
}

impl Disk {
    fn write(&self, inc: u64, f: impl FnOnce(&mut DiskState) -> Undo) -> io::Result<u64> {
        let mut d = self.lock();
        if d.incarnation != inc {
            return Err(gone());
        }
        let undo = f(&mut d);
        d.seq += 1;
        let seq = d.seq;
        d.undo.push((seq, undo));
        Ok(seq)
    }

    /// Waits for a sync that covers every write made so far.
    async fn sync(&self, inc: u64) -> io::Result<()> {
        let (upto, latency) = {
            let mut d = self.lock();
            if d.incarnation != inc {
                return Err(gone());
            }
            let base = Duration::from_micros(d.rng.random_range(50..=1500));
            (d.seq, base + d.slow)
        };
        tokio::time::sleep(latency).await;
        let mut d = self.lock();
        if d.incarnation != inc {
            return Err(gone());
        }
        d.synced = d.synced.max(upto);
        let synced = d.synced;
        d.undo.retain(|(seq, _)| *seq > synced);
        Ok(())
    }
}

impl DiskState {
    fn roll_back(&mut self) {
        let synced = self.synced;
        while let Some((seq, undo)) = self.undo.pop() {
            if seq <= synced {
                continue;
            }
            match undo {
                Undo::Log(i, Some(e)) => {
                    self.log.insert(i, e);
                }
                Undo::Log(i, None) => {
                    self.log.remove(&i);
                }
                Undo::Vote(v) => self.vote = v,
                Undo::Committed(c) => self.committed = c,
            }
        }
        self.seq = self.synced;
    }

    /// The snapshot's applied state, or an empty one.
    fn snapshot_state(&self) -> SmData {
        match &self.snapshot {
            Some((meta, data)) => SmData {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                state: serde_json::from_slice(data).unwrap_or_default(),
            },
            None => SmData::default(),
        }
    }
}

/// The log store of one process (incarnation) over its host's disk.
#[derive(Clone)]
pub struct LogStore {
    disk: Disk,
    inc: u64,
}

/// The applied state, rebuilt from the snapshot at each start.
#[derive(Debug, Clone, Default)]
struct SmData {
    last_applied: Option<LogId>,
    membership: Membership,
    state: ClusterState,
}

/// Told of every applied entry (its index and term, its command and the
/// ledger's reply, if it carries one): the oracle's record of what Raft
/// committed.
pub type Hook = Arc<dyn Fn(u64, u64, Option<(&Command, &Reply)>) + Send + Sync>;

pub struct StateMachine {
    disk: Disk,
    inc: u64,
    data: SmData,
    published: watch::Sender<ClusterState>,
    hook: Hook,
}

/// The store of a process starting now, as incarnation `inc` of `disk`.
pub fn open(
    disk: &Disk,
    inc: u64,
    hook: Hook,
) -> (LogStore, StateMachine, watch::Receiver<ClusterState>) {
    let data = disk.lock().snapshot_state();
    let (tx, rx) = watch::channel(data.state.clone());
    (
        LogStore {
            disk: disk.clone(),
            inc,
        },
        StateMachine {
            disk: disk.clone(),
            inc,
            data,
            published: tx,
            hook,
        },
        rx,
    )
}

impl RaftLogReader<Types> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let d = self.disk.lock();
        let start = match range.start_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(d.log.range((start, end)).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.disk.lock().vote)
    }
}

impl RaftLogStorage<Types> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<Types>, io::Error> {
        let d = self.disk.lock();
        let last = d
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(d.last_purged);
        Ok(LogState {
            last_purged_log_id: d.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        self.disk
            .write(self.inc, |d| Undo::Vote(d.vote.replace(vote)))?;
        self.disk.sync(self.inc).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Lost on a crash unless a later sync covers it, as keyraft allows.
        self.disk.write(self.inc, |d| {
            Undo::Committed(std::mem::replace(&mut d.committed, committed))
        })?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.disk.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Types>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        for e in entries {
            let index = e.log_id.index;
            self.disk
                .write(self.inc, move |d| Undo::Log(index, d.log.insert(index, e)))?;
        }
        let (disk, inc) = (self.disk.clone(), self.inc);
        crate::types::spawn(async move {
            // The callback fires only once synced; a crash first drops it.
            if disk.sync(inc).await.is_ok() {
                callback.io_completed(Ok(()));
            }
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let doomed: Vec<u64> = self
            .disk
            .lock()
            .log
            .range(from..)
            .map(|(i, _)| *i)
            .collect();
        for i in doomed {
            self.disk
                .write(self.inc, move |d| Undo::Log(i, d.log.remove(&i)))?;
        }
        self.disk.sync(self.inc).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        {
            let mut d = self.disk.lock();
            if d.incarnation != self.inc {
                return Err(gone());
            }
            // Purged entries are in the snapshot, which is durable: no undo.
            d.last_purged = Some(log_id);
            let keep = d.log.split_off(&(log_id.index + 1));
            d.log = keep;
        }
        self.disk.sync(self.inc).await
    }
}

pub struct SnapshotBuilder {
    disk: Disk,
    inc: u64,
    data: SmData,
}

impl RaftSnapshotBuilder<Types> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<Types, Vec<u8>>, io::Error> {
        let meta = openraft::SnapshotMeta {
            last_log_id: self.data.last_applied,
            last_membership: self.data.membership.clone(),
        };
        let data = serde_json::to_vec(&self.data.state).map_err(io::Error::other)?;
        store_snapshot(&self.disk, self.inc, &meta, &data)?;
        Ok(openraft::Snapshot {
            meta,
            snapshot: data,
        })
    }
}

/// A snapshot is written durably at once (keyraft flushes it).
fn store_snapshot(
    disk: &Disk,
    inc: u64,
    meta: &SnapshotMetaOf<Types>,
    data: &[u8],
) -> io::Result<()> {
    let mut d = disk.lock();
    if d.incarnation != inc {
        return Err(gone());
    }
    d.snapshot = Some((meta.clone(), data.to_vec()));
    Ok(())
}

impl RaftStateMachine<Types> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), io::Error> {
        Ok((self.data.last_applied, self.data.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm:
            futures::Stream<Item = Result<EntryResponder<Types>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            self.data.last_applied = Some(entry.log_id);
            let (index, term) = (entry.log_id.index, entry.log_id.leader_id.term);
            let reply = match entry.payload {
                EntryPayload::Blank => {
                    (self.hook)(index, term, None);
                    Reply::default()
                }
                EntryPayload::Normal(cmd) => {
                    if let keyraft::ledger::Command::Rejoined { node } = cmd {
                        // As keyraft's state machine does: every member
                        // starts its record of the node over.
                        self.disk.lock().memory.entry(node).or_default().forget();
                    }
                    let reply = self.data.state.apply(&cmd, index);
                    (self.hook)(index, term, Some((&cmd, &reply)));
                    reply
                }
                EntryPayload::Membership(m) => {
                    (self.hook)(index, term, None);
                    self.data.membership = openraft::StoredMembership::new(Some(entry.log_id), m);
                    Reply::default()
                }
            };
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        self.published.send_replace(self.data.state.clone());
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            disk: self.disk.clone(),
            inc: self.inc,
            data: self.data.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<Types>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        self.data = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: serde_json::from_slice(&snapshot).map_err(io::Error::other)?,
        };
        store_snapshot(&self.disk, self.inc, meta, &snapshot)?;
        self.published.send_replace(self.data.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<Types, Vec<u8>>>, io::Error> {
        Ok(self
            .disk
            .lock()
            .snapshot
            .clone()
            .map(|(meta, data)| openraft::Snapshot {
                meta,
                snapshot: data,
            }))
    }
}
