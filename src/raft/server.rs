//! The Raft gRPC service: decodes peer requests, checks that the sender is
//! who it claims to be, applies keyraft's vote and leadership gates, and
//! hands the request to openraft.
//!
//! Owns: the rule that a node refuses every Raft message until start-up has
//! decided it may take part (see step 9), the rule that it refuses votes for
//! a while after it starts
//! (its leader lease died with the process) and while it rejoins, that a
//! vote for a leadership transfer waits out the lease of a key holder that
//! did not release (step 3), and that it refuses leadership transfers while
//! it may not validate; and it tells the
//! coordinator when it refused a candidate whose log is behind its own.
//! Must not: change
//! Raft state itself; openraft does that.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use tokio::sync::watch;

use super::memory::Memory;
use super::network::SnapshotMessage;
use super::{Gate, LogId, Raft, TypeConfig};
use crate::config::{NodeId, Timing};
use crate::ledger::ClusterState;
use crate::pb;
use crate::tls::peer_of;

pub struct RaftService {
    raft: Raft,
    gate: Arc<Gate>,
    id: NodeId,
    /// The applied ledger: who holds the key, for transfer votes.
    cluster: watch::Receiver<ClusterState>,
    timing: Timing,
    memory: Arc<Memory>,
}

impl RaftService {
    pub fn new(
        raft: Raft,
        gate: Arc<Gate>,
        id: NodeId,
        cluster: watch::Receiver<ClusterState>,
        timing: Timing,
        memory: Arc<Memory>,
    ) -> Self {
        Self {
            raft,
            gate,
            id,
            cluster,
            timing,
            memory,
        }
    }

    /// The vote refusal a leader's message asks for, when it is longer
    /// than openraft's own lease (which refuses by itself): a longer
    /// profile's.
    fn promise_asked(&self, req: &pb::RaftPayload) -> Option<Duration> {
        let promise = Duration::from_millis(req.promise_ms.min(MAX_PROMISE_MS).into());
        let (_, openraft_lease) = self.timing.raft_elections();
        (promise > openraft_lease).then_some(promise)
    }

    /// A leader's message shows its term, held durably, and what it holds
    /// of the committed log: facts about it that only grow (see [`Memory`]).
    async fn saw_leader(&self, leader: NodeId, term: u64, committed: u64) {
        if let Err(e) = self.memory.saw(leader, term, Some(committed)).await {
            tracing::warn!("cannot record what node {leader} showed: {e}");
        }
    }
}

/// The longest vote refusal a leader's message can ask for (a bound on a
/// malformed one: no profile comes near it).
const MAX_PROMISE_MS: u32 = 10_000;

fn decode<T: DeserializeOwned>(req: &pb::RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&req.json)
        .map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|json| {
            Response::new(pb::RaftPayload {
                json,
                leader_durable: 0,
                promise_ms: 0,
            })
        })
        .map_err(|e| Status::internal(e.to_string()))
}

fn same_sender(peer: NodeId, claimed: NodeId) -> Result<(), Status> {
    if peer == claimed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "node {peer} sent a message on behalf of node {claimed}"
        )))
    }
}

impl RaftService {
    /// The sender's node id, if this node takes part in Raft yet and has
    /// not refused the sender (step 9: its votes and entries count for
    /// nothing here).
    fn sender(&self, req: &Request<pb::RaftPayload>) -> Result<NodeId, Status> {
        let peer = peer_of(req)?;
        if !self.gate.joined() {
            return Err(Status::unavailable(
                "starting: not taking part in Raft until its data dir is checked with its peers",
            ));
        }
        match self.memory.of(peer).refused {
            Some(why) => Err(Status::permission_denied(format!(
                "node {} refuses node {peer}: {why}",
                self.id
            ))),
            None => Ok(peer),
        }
    }

    /// Decodes a vote or pre-vote request from the candidate that sent it,
    /// if this node may vote now.
    async fn vote_request(
        &self,
        req: &Request<pb::RaftPayload>,
    ) -> Result<VoteRequest<TypeConfig>, Status> {
        let peer = self.sender(req)?;
        let rpc: VoteRequest<TypeConfig> = decode(req.get_ref())?;
        same_sender(peer, rpc.vote.leader_id.node_id)?;
        if rpc.leadership_transfer {
            self.transfer_vote(peer).await?;
            Ok(rpc)
        } else if let Some(left) = self.gate.promised_for() {
            // A longer profile's promise than openraft's own lease (which
            // refuses by itself) is not over: refused here, where openraft
            // might grant. A candidate behind this node's log is still noted.
            let ours = self.raft.metrics().borrow_watched().last_log_index;
            if ours > rpc.last_log_id.map(|l| l.index) {
                self.gate.saw_behind_candidate(peer);
            }
            tracing::info!(
                candidate = peer,
                left_ms = left.as_millis() as u64,
                "refused a vote: promised a leader's lease beyond openraft's"
            );
            Err(Status::unavailable(format!(
                "not granting votes for another {} ms: the lease of a leader it acked (or its own) may still run",
                left.as_millis()
            )))
        } else if self.gate.may_grant_votes() {
            Ok(rpc)
        } else {
            Err(Status::unavailable(
                "not granting votes yet (recently started or rejoining)",
            ))
        }
    }

    /// A vote that comes with a leadership transfer passes only when the
    /// key's holder released it or its lease here is over (step 3 holds
    /// however the successor was elected). A clean handover commits
    /// `Released` just before it transfers, so a release not yet applied
    /// here is waited for, briefly.
    async fn transfer_vote(&self, candidate: NodeId) -> Result<(), Status> {
        let mut cluster = self.cluster.clone();
        let mut metrics = self.raft.metrics();
        let until = tokio::time::Instant::now() + self.timing.heartbeat * 4;
        loop {
            let unapplied = super::unapplied(&metrics.borrow_and_update());
            // Read after the metrics: the ledger is published before
            // openraft counts an entry applied.
            let holder = cluster.borrow_and_update().key_holder();
            let Some(why) = self.gate.transfer_vote_refusal(
                holder,
                unapplied,
                candidate,
                self.timing.longest_promise(),
            ) else {
                return Ok(());
            };
            let changed = async {
                tokio::select! {
                    r = cluster.changed() => r.is_ok(),
                    r = metrics.changed() => r.is_ok(),
                }
            };
            if !matches!(tokio::time::timeout_at(until, changed).await, Ok(true)) {
                tracing::info!(candidate, "refused a transfer vote: {why}");
                return Err(Status::unavailable(format!(
                    "not granting a transfer vote: {why}"
                )));
            }
        }
    }

    /// A refused candidate whose log is behind this node's can only win
    /// once this node's entries reach it: tell the coordinator at once.
    fn note_refusal<E>(
        &self,
        candidate: NodeId,
        theirs: Option<LogId>,
        result: &Result<VoteResponse<TypeConfig>, E>,
    ) {
        if let Ok(r) = result {
            if !r.vote_granted && r.last_log_id > theirs {
                tracing::debug!(
                    candidate,
                    "refused a candidate whose log is behind this node's"
                );
                self.gate.saw_behind_candidate(candidate);
            }
        }
    }
}

/// Whether openraft took an append as from a leader (not a stale one).
fn rpc_committed_vote<E>(result: &Result<AppendEntriesResponse<TypeConfig>, E>) -> bool {
    matches!(
        result,
        Ok(AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict)
    )
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let peer = self.sender(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        same_sender(peer, rpc.vote.leader_id.node_id)?;
        let term = rpc.vote.leader_id.term;
        // Only a leader sends entries, and only with its vote saved. Its
        // commit index alone is not what it holds (a quorum of followers
        // may have fsynced an entry before the leader itself did): what it
        // holds of the committed log is the lesser of that and the index
        // its own store has fsynced, which it sends alongside.
        let committed = rpc
            .leader_commit
            .map_or(0, |c| c.index)
            .min(req.get_ref().leader_durable);
        let promise = self.promise_asked(req.get_ref());
        let result = self.raft.append_entries(rpc).await;
        if rpc_committed_vote(&result) {
            self.saw_leader(peer, term, committed).await;
            // Before the ack leaves: counted from now, which is after the
            // leader sent it, so the refusal outlasts the leader's lease.
            self.gate.acked_leader(peer, promise);
        }
        reply(&result)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc = self.vote_request(&req).await?;
        let (candidate, theirs) = (rpc.vote.leader_id.node_id, rpc.last_log_id);
        let result = self.raft.vote(rpc).await;
        self.note_refusal(candidate, theirs, &result);
        reply(&result)
    }

    async fn pre_vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc = self.vote_request(&req).await?;
        let (candidate, theirs) = (rpc.vote.leader_id.node_id, rpc.last_log_id);
        let result = self.raft.pre_vote(rpc).await;
        self.note_refusal(candidate, theirs, &result);
        reply(&result)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let peer = self.sender(&req)?;
        let msg: SnapshotMessage = decode(req.get_ref())?;
        same_sender(peer, msg.vote.leader_id.node_id)?;
        let promise = self.promise_asked(req.get_ref());
        let sent = msg.vote.leader_id;
        let result = self
            .raft
            .install_full_snapshot(
                msg.vote,
                openraft::Snapshot {
                    meta: msg.meta,
                    snapshot: msg.data,
                },
            )
            .await
            .map_err(openraft::errors::RaftError::<TypeConfig>::Fatal);
        // The leader counts an installed snapshot as an ack that renews its
        // lease, as it does an append: the same contact and promise.
        if matches!(&result, Ok(r) if r.vote.leader_id == sent) {
            self.gate.acked_leader(peer, promise);
        }
        reply(&result)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let peer = self.sender(&req)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode(req.get_ref())?;
        same_sender(peer, rpc.from_leader().leader_id.node_id)?;
        if *rpc.to_node_id() == self.id && !self.gate.accepts_leadership() {
            tracing::info!(
                from = peer,
                "refused leadership transfer: this node may not validate now"
            );
            return Err(Status::failed_precondition(
                "this node may not take leadership now",
            ));
        }
        let result = self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(openraft::errors::RaftError::<TypeConfig>::Fatal);
        reply(&result)
    }
}
