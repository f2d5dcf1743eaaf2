//! What this node remembers of every member's history (docs/design.md,
//! step 9): facts that only grow, the highest term it saw the member use
//! and the highest committed log index the member acknowledged holding,
//! and whether this node caught the member having forgotten them.
//!
//! A member whose data dir was restored from an older copy (or wiped) has
//! forgotten votes it cast and entries it acknowledged; it could vote twice
//! in one term or help elect a leader without committed entries. Its own
//! disk cannot tell; its peers' memory can.
//!
//! Owns: the values file `memory` of the Raft store and when it is fsynced (a new
//! term at once, before the message that showed it counts; a grown index
//! within [`FLUSH_EVERY`]), and the rule that says when a member is behind
//! what was seen of it ([`behind`]). Must not: talk to peers; the network
//! client and the Raft service feed it, start-up and gossip read it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::disk::{self, Disk};
use super::values::{self, Shared};
use crate::ledger::NodeId;
use crate::shutdown::Shutdown;

/// How long a grown committed index may stay in memory only. A crash loses
/// at most this much of it: the check then sees a member a little older
/// than it was, never newer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// What this node saw of one member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// The highest term the member was seen to hold durably (its vote in a
    /// vote response, or its term as a leader).
    pub term: u64,
    /// The highest log index, committed when seen, the member acknowledged
    /// holding (as a follower) or sent as committed (as a leader).
    pub committed: u64,
    /// Set when this node caught the member answering below these facts.
    pub refused: Option<String>,
    /// The node that refused it (a store copied from another member
    /// carries that member's refusals, which are not this node's word).
    #[serde(default)]
    pub refused_by: Option<NodeId>,
    /// How many times the member rejoined with an empty data dir
    /// (`Rejoined`) while this node watched: each one starts the record
    /// over, and a judgement made before it no longer holds.
    #[serde(default)]
    pub rejoins: u64,
}

/// What a node's own data dir holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holds {
    /// The term of its saved vote.
    pub term: u64,
    /// Its last log index (purged entries included).
    pub last_index: u64,
}

/// How what a member holds is below what was seen of it: its term, its
/// log, or both (each as held < seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub term: Option<(u64, u64)>,
    pub log: Option<(u64, u64)>,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((held, seen)) = self.term {
            write!(f, "term {held} < {seen}")?;
        }
        if let Some((held, seen)) = self.log {
            let comma = if self.term.is_some() { ", " } else { "" };
            write!(
                f,
                "{comma}log up to index {held} < committed index {seen} it acknowledged"
            )?;
        }
        Ok(())
    }
}

/// How a member is found behind what was seen of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Behind {
    /// Refused earlier, for this reason.
    #[error("it was refused before: {0}")]
    Refused(String),
    /// What it holds now is below what was seen of it.
    #[error("{0}")]
    Below(Gap),
    /// It answered an append as lacking an entry it had acknowledged
    /// holding when committed.
    #[error("it no longer holds log index {0}, committed, which it acknowledged holding")]
    Lost(u64),
}

/// How a member is behind what was seen of it, if it is: a refusal counts
/// as behind.
pub fn behind(seen: &Remembered, holds: Holds) -> Option<Behind> {
    if crate::plant::on(crate::plant::Plant::RestoredVotes) {
        return None;
    }
    match &seen.refused {
        Some(why) => Some(Behind::Refused(why.clone())),
        None => seen.gap(holds).map(Behind::Below),
    }
}

impl Remembered {
    /// How `holds` is below these facts alone (a refusal aside).
    pub fn gap(&self, holds: Holds) -> Option<Gap> {
        let gap = Gap {
            term: (holds.term < self.term).then_some((holds.term, self.term)),
            log: (holds.last_index < self.committed).then_some((holds.last_index, self.committed)),
        };
        (gap.term.is_some() || gap.log.is_some()).then_some(gap)
    }

    /// Adds that the member held `term` and (if given) the committed index
    /// `committed`; facts only grow. Returns whether the term grew and
    /// whether the index did.
    pub fn see(&mut self, term: u64, committed: Option<u64>) -> (bool, bool) {
        let grew = (
            term > self.term,
            committed.is_some_and(|c| c > self.committed),
        );
        self.term = self.term.max(term);
        self.committed = self.committed.max(committed.unwrap_or(0));
        grew
    }

    /// Starts the record over: the member rejoined with an empty data dir.
    /// Only the count of rejoins stays, so that an answer judged against
    /// the old record cannot refuse the new one, even once the new one has
    /// grown past the old.
    pub fn forget(&mut self) {
        *self = Remembered {
            rejoins: self.rejoins + 1,
            ..Remembered::default()
        };
    }

    /// Refuses the member (`by` caught it answering below `before`, what
    /// was seen of it), unless the record was started over meanwhile (a
    /// `Rejoined`) or went down: the judgement was of facts that no longer
    /// hold. Returns whether it refused.
    pub fn refuse(&mut self, before: &Remembered, why: String, by: NodeId) -> bool {
        if self.rejoins != before.rejoins
            || self.term < before.term
            || self.committed < before.committed
        {
            return false;
        }
        self.refused = Some(why);
        self.refused_by = Some(by);
        true
    }
}

/// What a node remembers of its peers, as the Raft service and client use
/// it: keyraft's [`Memory`], or the simulator's model of it (sim/).
pub trait Records: Send + Sync + 'static {
    /// What this node remembers of `id`.
    fn of(&self, id: NodeId) -> Remembered;
    /// Records that `id` held `term` and (if given) the committed index
    /// `committed`: facts that only grow.
    fn saw(
        &self,
        id: NodeId,
        term: u64,
        committed: Option<u64>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Records that node `by` (this one) caught `id` answering below
    /// `before`, unless the record went down meanwhile; returns whether it
    /// refused.
    fn refuse(
        &self,
        id: NodeId,
        before: &Remembered,
        why: String,
        by: NodeId,
    ) -> impl std::future::Future<Output = io::Result<bool>> + Send;
    /// Takes back a refusal of `id`: it started again with a data dir
    /// that holds at least what was seen of it (a good copy put back).
    fn clear_refusal(&self, id: NodeId)
        -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// This node's memory of every member, backed by the Raft store.
pub struct Memory {
    disk: Arc<dyn Disk>,
    file: Shared,
    map: Mutex<BTreeMap<NodeId, Remembered>>,
    dirty: Mutex<BTreeSet<NodeId>>,
    /// Told of every record marked dirty: the flusher sleeps on it, so an
    /// idle node does not wake every [`FLUSH_EVERY`] to find nothing.
    grown: tokio::sync::Notify,
    writing: tokio::sync::Mutex<()>,
}

fn key(id: NodeId) -> [u8; 8] {
    id.to_be_bytes()
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Memory {
    pub(super) fn open(disk: Arc<dyn Disk>, file: Shared) -> io::Result<Memory> {
        let mut map = BTreeMap::new();
        for (k, v) in values::locked(&file)?.iter() {
            let id = <[u8; 8]>::try_from(k)
                .map(NodeId::from_be_bytes)
                .map_err(|_| io_err("bad key in the memory file"))?;
            map.insert(id, serde_json::from_slice(v).map_err(io_err)?);
        }
        Ok(Memory {
            disk,
            file,
            map: Mutex::new(map),
            dirty: Mutex::new(BTreeSet::new()),
            grown: tokio::sync::Notify::new(),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Remembered>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, id: NodeId) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        self.grown.notify_one();
    }

    /// Everything this node remembers.
    pub fn all(&self) -> BTreeMap<NodeId, Remembered> {
        self.map().clone()
    }

    /// Makes this store node `me`'s own: a Raft store copied from another
    /// member (the way out in docs/operations.md) carries that member's
    /// memory of `me`, and its refusals, which are not `me`'s word. The
    /// facts about the others are facts whoever saw them, and stay.
    pub async fn adopt(&self, me: NodeId) -> io::Result<()> {
        let changed: Vec<NodeId> = {
            let mut map = self.map();
            let own = map.remove(&me).is_some();
            let mut changed: Vec<NodeId> = own.then_some(me).into_iter().collect();
            for (id, r) in map.iter_mut() {
                if r.refused.is_some() && r.refused_by != Some(me) {
                    r.refused = None;
                    r.refused_by = None;
                    changed.push(*id);
                }
            }
            changed
        };
        if changed.is_empty() {
            return Ok(());
        }
        let file = self.file.clone();
        disk::blocking(&self.disk, move || {
            let mut file = values::locked(&file)?;
            file.remove(&key(me))?;
            file.sync()
        })
        .await?;
        changed
            .into_iter()
            .filter(|id| *id != me)
            .for_each(|id| self.mark(id));
        self.persist().await
    }

    /// Forgets everything about `id`: it rejoined with an empty data dir
    /// (`--rejoin`), demoted to a learner until it has caught up again.
    pub async fn forget(&self, id: NodeId) -> io::Result<()> {
        self.map().entry(id).or_default().forget();
        self.mark(id);
        self.persist().await
    }

    /// Writes every changed record and fsyncs. One at a time: a caller
    /// returns only once what it changed is on disk.
    pub async fn persist(&self) -> io::Result<()> {
        let _one = self.writing.lock().await;
        let changed: Vec<(NodeId, Vec<u8>)> = {
            let ids = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
            let map = self.map();
            ids.into_iter()
                .map(|id| {
                    let r = map.get(&id).cloned().unwrap_or_default();
                    serde_json::to_vec(&r).map(|v| (id, v)).map_err(io_err)
                })
                .collect::<io::Result<_>>()?
        };
        if changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<NodeId> = changed.iter().map(|(id, _)| *id).collect();
        let file = self.file.clone();
        let written = disk::blocking(&self.disk, move || {
            let mut file = values::locked(&file)?;
            for (id, v) in changed {
                file.put(&key(id), v)?;
            }
            file.sync()
        })
        .await;
        if written.is_err() {
            // Try again next time; the caller learns it failed now.
            ids.into_iter().for_each(|id| self.mark(id));
        }
        written
    }

    /// Flushes grown indexes about [`FLUSH_EVERY`] after one grew (one
    /// fsync for all that grew meanwhile; sooner where one grew during the
    /// last wait), and once more when `shutdown` fires (the server's
    /// teardown persists on its own as well).
    pub async fn run_flusher(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.requested() => break,
                () = self.grown.notified() => {}
            }
            tokio::select! {
                _ = shutdown.requested() => break,
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
            }
            if let Err(e) = self.persist().await {
                tracing::warn!("cannot write what this node remembers of its peers: {e}");
            }
        }
        if let Err(e) = self.persist().await {
            tracing::warn!("cannot write what this node remembers of its peers: {e}");
        }
    }
}

impl Records for Memory {
    fn of(&self, id: NodeId) -> Remembered {
        self.map().get(&id).cloned().unwrap_or_default()
    }

    /// Records that `id` held `term` and (if given) the committed index
    /// `committed`. A higher term is fsynced before this returns; a higher
    /// index within [`FLUSH_EVERY`].
    async fn saw(&self, id: NodeId, term: u64, committed: Option<u64>) -> io::Result<()> {
        let (new_term, new_index) = self.map().entry(id).or_default().see(term, committed);
        if !(new_term || new_index) {
            return Ok(());
        }
        self.mark(id);
        if new_term {
            self.persist().await?;
        }
        Ok(())
    }

    /// Records that node `by` (this one) caught `id` answering below
    /// `before`, what was seen of it; fsynced. Nothing is refused if the
    /// record changed meanwhile (a `Rejoined` reset it): the judgement was
    /// of facts that no longer hold. Returns whether it refused.
    async fn refuse(
        &self,
        id: NodeId,
        before: &Remembered,
        why: String,
        by: NodeId,
    ) -> io::Result<bool> {
        if !self.map().entry(id).or_default().refuse(before, why, by) {
            return Ok(false);
        }
        self.mark(id);
        self.persist().await.map(|()| true)
    }

    async fn clear_refusal(&self, id: NodeId) -> io::Result<()> {
        let had = self.map().get_mut(&id).and_then(|r| {
            r.refused_by = None;
            r.refused.take()
        });
        if had.is_none() {
            return Ok(());
        }
        tracing::warn!("node {id} starts with a data dir that holds what was seen of it: its refusal is taken back");
        self.mark(id);
        self.persist().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_behind_when_it_holds_less_than_was_seen() {
        let seen = |term, committed, refused: Option<&str>| Remembered {
            term,
            committed,
            refused: refused.map(String::from),
            refused_by: refused.map(|_| 2),
            rejoins: 0,
        };
        let holds = |term, last_index| Holds { term, last_index };
        // (seen, holds, behind?)
        let table = [
            (seen(0, 0, None), holds(0, 0), None),
            (seen(5, 40, None), holds(5, 40), None),
            (seen(5, 40, None), holds(7, 90), None),
            (seen(5, 40, None), holds(4, 40), Some("term 4 < 5")),
            (
                seen(5, 40, None),
                holds(5, 39),
                Some("log up to index 39 < committed index 40 it acknowledged"),
            ),
            (
                seen(5, 40, None),
                holds(0, 0),
                Some("term 0 < 5, log up to index 0 < committed index 40 it acknowledged"),
            ),
            (
                seen(1, 1, Some("x")),
                holds(9, 99),
                Some("it was refused before: x"),
            ),
        ];
        for (s, h, want) in table {
            let got = behind(&s, h).map(|b| b.to_string());
            assert_eq!(got.as_deref(), want, "{s:?} {h:?}");
        }
    }

    #[test]
    fn facts_only_grow_and_a_refusal_needs_them_unchanged() {
        let mut r = Remembered::default();
        assert_eq!(r.see(3, Some(10)), (true, true));
        assert_eq!(r.see(2, Some(8)), (false, false));
        assert_eq!(r.see(3, None), (false, false));
        assert_eq!(r.see(3, Some(11)), (false, true));
        assert_eq!((r.term, r.committed), (3, 11));
        let before = r.clone();
        // Reset meanwhile (a `Rejoined`): the judgement no longer holds.
        let mut reset = Remembered::default();
        assert!(!reset.refuse(&before, "x".into(), 1));
        assert_eq!(reset.refused, None);
        // Started over, then grown past the old record again (the member
        // caught up as a learner): an answer judged against the old record
        // (a late reply from before the rejoin) still refuses nothing.
        let mut again = r.clone();
        again.forget();
        assert_eq!((again.term, again.committed, again.rejoins), (0, 0, 1));
        again.see(4, Some(30));
        assert!(!again.refuse(&before, "x".into(), 1));
        assert_eq!(again.refused, None);
        let now = again.clone();
        assert!(again.refuse(&now, "y".into(), 1));
        assert!(r.refuse(&before, "x".into(), 1));
        assert_eq!((r.refused.as_deref(), r.refused_by), (Some("x"), Some(1)));
        // A refusal is forgotten with the rest.
        r.forget();
        assert_eq!((r.refused, r.rejoins), (None, 1));
    }

    /// The flusher sleeps until a record grows, then writes it within
    /// [`FLUSH_EVERY`]: a grown index that never woke it would stay in
    /// memory only.
    #[tokio::test]
    async fn a_grown_index_reaches_the_disk_within_the_flush_interval() -> anyhow::Result<()> {
        use super::super::disk::FileDisk;
        use super::super::layout::MEMORY;
        use super::super::values::Values;
        let dir = tempfile::tempdir()?;
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(dir.path())?);
        let memory = Arc::new(Memory::open(
            disk.clone(),
            Values::shared(disk.clone(), MEMORY)?,
        )?);
        let on_disk = || -> anyhow::Result<u64> {
            let seen: Option<Remembered> = Values::open(disk.clone(), MEMORY)?.get_json(&key(2))?;
            Ok(seen.map_or(0, |r| r.committed))
        };
        let (stop, listen) = crate::shutdown::channel();
        let flusher = tokio::spawn(memory.clone().run_flusher(listen));
        // A new term is written before `saw` returns.
        memory.saw(2, 1, Some(40)).await?;
        assert_eq!(on_disk()?, 40);
        // A grown index alone, by the flusher, once it sleeps again (the
        // first mark's wake is spent): only this mark can wake it.
        tokio::time::sleep(FLUSH_EVERY * 3).await;
        memory.saw(2, 1, Some(41)).await?;
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 10;
        while on_disk()? != 41 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "index 41 not on disk after {:?}",
                FLUSH_EVERY * 10
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.fire();
        flusher.await?;
        Ok(())
    }
}
