//! The state machine: the replicated [`ClusterState`] applied from
//! committed entries, kept in the store's values file `state`, and its
//! snapshots.
//!
//! Owns: the applied state, when it is written and when fsynced (whatever
//! a peer's Hello relies on: registrations and membership), publishing it
//! to the coordinator and the signer, and building and installing
//! snapshots. Must not: interpret commands beyond [`ClusterState::apply`],
//! or block an async worker (file calls run through [`disk::blocking`]).
//!
//! The applied state may lag what the log holds after a crash: openraft
//! applies the log again from the last applied entry written here, and the
//! log keeps every entry after the purge point, which is written after the
//! state it covers.

use std::io;
use std::sync::Arc;

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::disk::{self, Disk};
use super::layout::{SM_DATA, SM_SNAPSHOT};
use super::memory::Memory;
use super::values::{self, Shared};
use super::{LogId, Membership, TypeConfig};
use crate::ledger::{ClusterState, Command, Reply};

/// Told of every entry applied: its log id, and its command with the
/// ledger's reply if it carries one (the simulator's judge).
pub type Observer = Arc<dyn Fn(LogId, Option<(&Command, &Reply)>) + Send + Sync>;

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io::Error::other)
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
    disk: Arc<dyn Disk>,
    state: Shared,
    data: SmData,
    published: watch::Sender<ClusterState>,
    memory: Arc<Memory>,
    observer: Option<Observer>,
}

impl StateMachine {
    /// The state machine as the values file `state` last held it.
    pub(super) fn open(
        disk: Arc<dyn Disk>,
        state: Shared,
        memory: Arc<Memory>,
        observer: Option<Observer>,
    ) -> io::Result<Self> {
        let data: SmData = values::locked(&state)?
            .get_json(SM_DATA)?
            .unwrap_or_default();
        let (published, _) = watch::channel(data.state.clone());
        Ok(StateMachine {
            disk,
            state,
            data,
            published,
            memory,
            observer,
        })
    }

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
    /// only then published. Without, the caller published it first.
    async fn persist(&self, sync: bool) -> io::Result<()> {
        let (state, bytes) = (self.state.clone(), encode(&self.data)?);
        disk::blocking(&self.disk, move || {
            let mut state = values::locked(&state)?;
            state.put(SM_DATA, bytes)?;
            if sync {
                state.sync()?;
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
    disk: Arc<dyn Disk>,
    state: Shared,
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
        let state = self.state.clone();
        disk::blocking(&self.disk, move || {
            let mut state = values::locked(&state)?;
            state.put(SM_SNAPSHOT, stored)?;
            state.sync()
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
        let mut answers = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            self.data.last_applied = Some(entry.log_id);
            let observer = self.observer.clone();
            let observe = |cmd| {
                if let Some(observe) = &observer {
                    observe(entry.log_id, cmd);
                }
            };
            let reply = match entry.payload {
                EntryPayload::Blank => {
                    observe(None);
                    Reply::default()
                }
                EntryPayload::Normal(cmd) => {
                    tracing::debug!(index = entry.log_id.index, "applied: {cmd}");
                    match cmd {
                        Command::Register { .. } => sync = true,
                        Command::Rejoined { node } => self.memory.forget(node).await?,
                        _ => {}
                    }
                    let reply = self.data.state.apply(&cmd, entry.log_id.index);
                    observe(Some((&cmd, &reply)));
                    reply
                }
                EntryPayload::Membership(m) => {
                    observe(None);
                    sync = true;
                    self.data.membership = openraft::StoredMembership::new(Some(entry.log_id), m);
                    Reply::default()
                }
            };

            if let Some(r) = responder {
                answers.push((r, reply));
            }
        }
        // Whoever asked sees the state it changed once answered (a signer
        // deciding whether a reservation covers its request): published
        // once per batch, and with `sync` only once durable.
        if sync {
            self.persist(true).await?;
        } else {
            // Nothing unsynced is durable anyway: seen before it is written.
            self.published.send_replace(self.data.state.clone());
        }
        for (r, reply) in answers {
            r.send(reply);
        }
        if !sync {
            self.persist(false).await?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            disk: self.disk.clone(),
            state: self.state.clone(),
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
            state: serde_json::from_slice(&snapshot).map_err(io::Error::other)?,
        };
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        })?;
        let state = self.state.clone();
        disk::blocking(&self.disk, move || {
            values::locked(&state)?.put(SM_SNAPSHOT, stored)
        })
        .await?;
        self.persist(true).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        let stored: Option<StoredSnapshot> = values::locked(&self.state)?.get_json(SM_SNAPSHOT)?;
        Ok(stored.map(|s| openraft::Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}
