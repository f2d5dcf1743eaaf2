//! The state machine: the replicated [`ClusterState`] applied from
//! committed entries, kept in the store's sled tree `sm`, and its snapshots.
//!
//! Owns: the applied state, when it is written and when fsynced (whatever
//! a peer's Hello relies on: registrations and membership), publishing it
//! to the coordinator and the signer, and building and installing
//! snapshots. Must not: interpret commands beyond [`ClusterState::apply`],
//! or block an async worker (sled calls run in `spawn_blocking`).
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

use super::flush::Disk;
use super::memory::Memory;
use super::store::{blocking, decode, encode, get, io_err};
use super::{LogId, Membership, TypeConfig};
use crate::ledger::{ClusterState, Command, Reply};

const SM_DATA: &[u8] = b"data";
const SM_SNAPSHOT: &[u8] = b"snapshot";

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
    /// The state machine as sled's tree `tree` last wrote it.
    pub(super) fn open(db: Disk, tree: sled::Tree, memory: Arc<Memory>) -> io::Result<Self> {
        let data: SmData = get(&tree, SM_DATA)?.unwrap_or_default();
        let (published, _) = watch::channel(data.state.clone());
        Ok(StateMachine {
            db,
            tree,
            data,
            published,
            memory,
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
        let mut answers = Vec::new();
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
