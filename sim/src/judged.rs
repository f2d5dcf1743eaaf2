//! keyraft's own log store, with what it acknowledged as durable kept for
//! the judge: a process started again on the same disk (not restored, not
//! wiped) must hold every entry its predecessors acknowledged and did not
//! truncate since. A store that acknowledges an append before it is
//! synced, or whose recovery loses a synced one, fails this at the next
//! start, whether or not Raft would have noticed.
//!
//! Owns: [`JudgedLog`] and the host's record of acknowledged entries
//! ([`Acked`]). Must not: change what the store does or answers.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use keyraft::raft::store::LogStore;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::OptionalSend;

use crate::types::{Entry, LogId, Types, Vote};

/// What a host's stores acknowledged: the highest index acknowledged as
/// durable and not truncated since, and the truncations appends still in
/// flight must respect.
#[derive(Default)]
pub struct Acked {
    state: Mutex<AckedState>,
}

#[derive(Default)]
struct AckedState {
    last: u64,
    /// Bumped by every truncation.
    generation: u64,
    /// Each truncation: its generation and the first index it removed.
    truncations: Vec<(u64, u64)>,
}

impl Acked {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest index acknowledged and still owed.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// The disk now holds `last` and no more is owed (a restored or wiped
    /// data dir, judged elsewhere).
    pub fn reset(&self, last: u64) {
        *self.lock() = AckedState {
            last,
            ..AckedState::default()
        };
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// An append issued at `generation` and ending at `last` is durable:
    /// entries a later truncation removed are not owed.
    fn durable(&self, generation: u64, last: u64) {
        let mut s = self.lock();
        let cut = s
            .truncations
            .iter()
            .filter(|(g, _)| *g > generation)
            .map(|(_, from)| from.saturating_sub(1))
            .min()
            .unwrap_or(u64::MAX);
        s.last = s.last.max(last.min(cut));
    }

    /// Entries from `from` on were truncated, durably.
    fn truncated(&self, from: u64) {
        let mut s = self.lock();
        s.generation += 1;
        let g = s.generation;
        s.truncations.push((g, from));
        s.last = s.last.min(from.saturating_sub(1));
    }
}

/// keyraft's [`LogStore`], every call passed through, its acknowledged
/// appends recorded in the host's [`Acked`].
#[derive(Clone)]
pub struct JudgedLog {
    pub inner: LogStore,
    pub acked: Arc<Acked>,
}

impl RaftLogReader<Types> for JudgedLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.inner.try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.inner.read_vote().await
    }
}

impl RaftLogStorage<Types> for JudgedLog {
    type LogReader = JudgedLog;

    async fn get_log_state(&mut self) -> Result<LogState<Types>, io::Error> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.inner.save_vote(vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.inner.read_committed().await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Types>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map_or(0, |e| e.log_id.index);
        let generation = self.acked.generation();
        let (tx, rx) = Types::oneshot();
        self.inner.append(entries, IOFlushed::signal(tx)).await?;
        let acked = self.acked.clone();
        crate::types::spawn(async move {
            let result = match rx.await {
                Ok(result) => result,
                Err(_) => Err(io::Error::other("the store dropped its callback")),
            };
            if result.is_ok() {
                acked.durable(generation, last);
            }
            callback.io_completed(result);
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner.truncate_after(last_log_id).await?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.acked.truncated(from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.inner.purge(log_id).await
    }
}
