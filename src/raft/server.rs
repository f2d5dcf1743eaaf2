//! The Raft service: what a node checks before a peer's Raft message
//! reaches openraft, and what it records after: the rule that a node
//! refuses every Raft message until start-up has decided it may take part
//! (see step 9), and any message from a member it refused; that it
//! refuses votes for a while after it starts (its leader lease died with
//! the process), while it rejoins and while a longer profile's promise to
//! a leader runs; that a vote for a leadership transfer waits out the
//! lease of a key holder that did not release (step 3); that it refuses
//! leadership transfers while it may not validate; what each accepted
//! leader message shows of that leader; and it tells the coordinator when
//! it refused a candidate whose log is behind its own.
//!
//! The rules ([`RaftService::append_entries`] and its siblings) take the
//! sender's proven id and openraft's request, whatever carried them: the
//! gRPC glue at the end of this file decodes and encodes, and the
//! simulator (sim/) calls the same methods over its simulated network.
//! Must not: change Raft state itself; openraft does that.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::SnapshotOf;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use tokio::sync::watch;

use super::memory::{Memory, Records};
use super::peers::SnapshotMessage;
use super::{store, Gate, LogId, TypeConfig, Vote};
use crate::config::{NodeId, Timing};
use crate::ledger::ClusterState;
use crate::pb;
use crate::shutdown::Shutdown;
use crate::tls::peer_of;

/// Why a Raft message was refused before it reached openraft.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("starting: not taking part in Raft until its data dir is checked with its peers")]
    Starting,
    #[error("node {me} refuses node {peer}: {why}")]
    Refused {
        me: NodeId,
        peer: NodeId,
        why: String,
    },
    #[error("node {peer} sent a message on behalf of node {claimed}")]
    NotItsOwn { peer: NodeId, claimed: NodeId },
    #[error("not granting votes for another {0} ms: the lease of a leader it acked (or its own) may still run")]
    Promised(u128),
    #[error("not granting votes yet (recently started or rejoining)")]
    VotesShut,
    #[error("not granting a transfer vote: {0}")]
    TransferVote(String),
    #[error("this node may not take leadership now")]
    NoLeadership,
    #[error(
        "cannot record the lease promise a leader asks (is the data dir writable?): not acking"
    )]
    Unrecorded,
}

impl Refusal {
    /// A passing state of this node (the sender may well be answered
    /// soon), rather than a refusal of the sender or its request.
    pub fn passing(&self) -> bool {
        matches!(
            self,
            Refusal::Starting
                | Refusal::Promised(_)
                | Refusal::VotesShut
                | Refusal::TransferVote(_)
                | Refusal::Unrecorded
        )
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        let why = r.to_string();
        match r {
            _ if r.passing() => Status::unavailable(why),
            Refusal::NoLeadership => Status::failed_precondition(why),
            _ => Status::permission_denied(why),
        }
    }
}

/// What openraft answered a message that passed the rules.
pub type Answer<T> = Result<T, RaftError<TypeConfig>>;

/// The rules around one node's openraft: its state machine `SM` is
/// keyraft's store or the simulator's, its [`Records`] `M` keyraft's
/// [`Memory`] or the simulator's.
pub struct RaftService<SM = store::StateMachine, M = Memory>
where
    SM: RaftStateMachine<TypeConfig>,
{
    raft: openraft::Raft<TypeConfig, SM>,
    gate: Arc<Gate>,
    id: NodeId,
    /// The applied ledger: who holds the key, for transfer votes.
    cluster: watch::Receiver<ClusterState>,
    timing: Timing,
    memory: Arc<M>,
    /// The servers' stop: ends every open stream of appends, which would
    /// otherwise wait for its leader's next append (a replication stream
    /// with nothing to send stays quiet) and hold the server's drain.
    streams_end: Option<Shutdown>,
}

impl<SM, M> Clone for RaftService<SM, M>
where
    SM: RaftStateMachine<TypeConfig>,
{
    fn clone(&self) -> Self {
        Self {
            raft: self.raft.clone(),
            gate: self.gate.clone(),
            id: self.id,
            cluster: self.cluster.clone(),
            timing: self.timing,
            memory: self.memory.clone(),
            streams_end: self.streams_end.clone(),
        }
    }
}

impl<SM, M> RaftService<SM, M>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = Vec<u8>>,
    M: Records,
{
    pub fn new(
        raft: openraft::Raft<TypeConfig, SM>,
        gate: Arc<Gate>,
        id: NodeId,
        cluster: watch::Receiver<ClusterState>,
        timing: Timing,
        memory: Arc<M>,
    ) -> Self {
        Self {
            raft,
            gate,
            id,
            cluster,
            timing,
            memory,
            streams_end: None,
        }
    }

    /// Open streams of appends end when `stop` fires (see `streams_end`).
    pub fn ending_streams_on(mut self, stop: Shutdown) -> Self {
        self.streams_end = Some(stop);
        self
    }

    /// The vote refusal a leader's message asks for (`promise_ms`, see
    /// the proto), when it is longer than openraft's own lease (which
    /// refuses by itself): a longer profile's.
    fn promise_asked(&self, promise_ms: u32) -> Option<Duration> {
        let promise = Duration::from_millis(promise_ms.into()).min(super::gate::MAX_PROMISE);
        let (_, openraft_lease) = self.timing.raft_elections();
        (promise > openraft_lease).then_some(promise)
    }

    /// A promise longer than openraft's lease is recorded before the
    /// message that asks it is handled, so its ack never outruns it.
    async fn record(&self, promise: Option<Duration>) -> Result<(), Refusal> {
        let Some(p) = promise else {
            return Ok(());
        };
        self.gate.record_promise(p).await.map_err(|e| {
            tracing::error!("cannot record a lease promise of {p:?}: {e}");
            Refusal::Unrecorded
        })
    }

    /// A leader's message shows its term, held durably, and what it holds
    /// of the committed log: facts about it that only grow (see [`Memory`]).
    async fn saw_leader(&self, leader: NodeId, term: u64, committed: u64) {
        if let Err(e) = self.memory.saw(leader, term, Some(committed)).await {
            tracing::warn!("cannot record what node {leader} showed: {e}");
        }
    }

    /// Whether this node takes part in Raft yet and has not refused
    /// `peer` (step 9: its votes and entries count for nothing here).
    pub fn sender(&self, peer: NodeId) -> Result<(), Refusal> {
        if !self.gate.joined() {
            return Err(Refusal::Starting);
        }
        match self.memory.of(peer).refused {
            Some(why) => Err(Refusal::Refused {
                me: self.id,
                peer,
                why,
            }),
            None => Ok(()),
        }
    }

    /// A vote or pre-vote request from `peer`, if this node may vote now.
    async fn may_vote(&self, peer: NodeId, rpc: &VoteRequest<TypeConfig>) -> Result<(), Refusal> {
        self.sender(peer)?;
        same_sender(peer, rpc.vote.leader_id.node_id)?;
        if rpc.leadership_transfer {
            self.transfer_vote(peer).await
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
            Err(Refusal::Promised(left.as_millis()))
        } else if self.gate.may_grant_votes() {
            Ok(())
        } else {
            Err(Refusal::VotesShut)
        }
    }

    /// A vote that comes with a leadership transfer passes only when the
    /// key's holder released it or its lease here is over (step 3 holds
    /// however the successor was elected). A clean handover commits
    /// `Released` just before it transfers, so a release not yet applied
    /// here is waited for, briefly.
    async fn transfer_vote(&self, candidate: NodeId) -> Result<(), Refusal> {
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
                    biased;
                    r = cluster.changed() => r.is_ok(),
                    r = metrics.changed() => r.is_ok(),
                }
            };
            if !matches!(tokio::time::timeout_at(until, changed).await, Ok(true)) {
                tracing::info!(candidate, "refused a transfer vote: {why}");
                return Err(Refusal::TransferVote(why));
            }
        }
    }

    /// A refused candidate whose log is behind this node's can only win
    /// once this node's entries reach it: tell the coordinator at once.
    fn note_refusal(
        &self,
        candidate: NodeId,
        theirs: Option<LogId>,
        result: &Answer<VoteResponse<TypeConfig>>,
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

    /// Entries or a heartbeat from leader `peer`, sent with the index its
    /// own store has fsynced (`leader_durable`) and the promise its
    /// timing asks (`promise_ms`).
    pub async fn append_entries(
        &self,
        peer: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
        leader_durable: u64,
        promise_ms: u32,
    ) -> Result<Answer<AppendEntriesResponse<TypeConfig>>, Refusal> {
        self.sender(peer)?;
        same_sender(peer, rpc.vote.leader_id.node_id)?;
        let term = rpc.vote.leader_id.term;
        // Only a leader sends entries, and only with its vote saved. Its
        // commit index alone is not what it holds (a quorum of followers
        // may have fsynced an entry before the leader itself did): what it
        // holds of the committed log is the lesser of that and the index
        // its own store has fsynced, which it sends alongside.
        let committed = rpc.leader_commit.map_or(0, |c| c.index).min(leader_durable);
        let promise = self.promise_asked(promise_ms);
        self.record(promise).await?;
        let result = self.raft.append_entries(rpc).await;
        if rpc_committed_vote(&result) {
            self.saw_leader(peer, term, committed).await;
            // Before the ack leaves: counted from now, which is after the
            // leader sent it, so the refusal outlasts the leader's lease.
            self.gate.acked_leader(peer, promise);
        }
        Ok(result)
    }

    /// A vote (`pre`: a pre-vote) for candidate `peer`.
    pub async fn vote(
        &self,
        peer: NodeId,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
    ) -> Result<Answer<VoteResponse<TypeConfig>>, Refusal> {
        self.may_vote(peer, &rpc).await?;
        let theirs = rpc.last_log_id;
        let result = if pre {
            self.raft.pre_vote(rpc).await
        } else {
            self.raft.vote(rpc).await
        };
        self.note_refusal(peer, theirs, &result);
        Ok(result)
    }

    /// A whole snapshot from leader `peer`.
    pub async fn install_snapshot(
        &self,
        peer: NodeId,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        promise_ms: u32,
    ) -> Result<Answer<SnapshotResponse<TypeConfig>>, Refusal> {
        self.sender(peer)?;
        same_sender(peer, vote.leader_id.node_id)?;
        let promise = self.promise_asked(promise_ms);
        self.record(promise).await?;
        let sent = vote.leader_id;
        let result = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(RaftError::<TypeConfig>::Fatal);
        // The leader counts an installed snapshot as an ack that renews its
        // lease, as it does an append: the same contact and promise.
        if matches!(&result, Ok(r) if r.vote.leader_id == sent) {
            self.gate.acked_leader(peer, promise);
        }
        Ok(result)
    }

    /// Leader `peer` hands its leadership on.
    pub async fn transfer_leader(
        &self,
        peer: NodeId,
        rpc: TransferLeaderRequest<TypeConfig>,
    ) -> Result<Answer<TransferLeaderResponse<TypeConfig>>, Refusal> {
        self.sender(peer)?;
        same_sender(peer, rpc.from_leader().leader_id.node_id)?;
        if *rpc.to_node_id() == self.id && !self.gate.accepts_leadership() {
            tracing::info!(
                from = peer,
                "refused leadership transfer: this node may not validate now"
            );
            return Err(Refusal::NoLeadership);
        }
        Ok(self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(RaftError::<TypeConfig>::Fatal))
    }
}

fn same_sender(peer: NodeId, claimed: NodeId) -> Result<(), Refusal> {
    if peer == claimed {
        Ok(())
    } else {
        Err(Refusal::NotItsOwn { peer, claimed })
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

// The gRPC glue: the sender's id from its certificate, openraft's
// messages as JSON.

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

/// The sender's id, from its certificate, and its message. Whether this
/// node hears the sender at all is the rules' first check.
fn incoming<T: DeserializeOwned>(req: &Request<pb::RaftPayload>) -> Result<(NodeId, T), Status> {
    Ok((peer_of(req)?, decode(req.get_ref())?))
}

impl RaftService {
    /// One append from `peer`, whether it came alone or on a stream, and
    /// whether openraft has stopped (this node is shutting down: a
    /// stream's last answer, so that the server drains).
    async fn answer_append(
        &self,
        peer: NodeId,
        p: &pb::RaftPayload,
    ) -> Result<(pb::RaftPayload, bool), Status> {
        let rpc = decode(p)?;
        let answer = self
            .append_entries(peer, rpc, p.leader_durable, p.promise_ms)
            .await?;
        let stopped = matches!(answer, Err(RaftError::Fatal(_)));
        Ok((reply(&answer)?.into_inner(), stopped))
    }
}

/// The next append of a stream, or `None` when the stream ended or `end`
/// fired first: a stream with nothing to send ends at shutdown too.
async fn next_append<S>(
    appends: &mut S,
    end: &mut Option<Shutdown>,
) -> Option<Result<pb::RaftPayload, Status>>
where
    S: futures::Stream<Item = Result<pb::RaftPayload, Status>> + Unpin,
{
    use futures::StreamExt as _;
    let stopping = async {
        match end {
            Some(stop) => stop.requested().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = stopping => None,
        next = appends.next() => next,
    }
}

/// The answers to a stream of appends, in their order; the first refusal
/// (or a broken stream, or openraft stopped) is the last answer, and the
/// servers' stop ends it between appends.
type Answers = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::RaftPayload, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let peer = peer_of(&req)?;
        let (answer, _) = self.answer_append(peer, req.get_ref()).await?;
        Ok(Response::new(answer))
    }

    type AppendsStream = Answers;

    async fn appends(
        &self,
        req: Request<tonic::Streaming<pb::RaftPayload>>,
    ) -> Result<Response<Answers>, Status> {
        let peer = peer_of(&req)?;
        let end = self.streams_end.clone();
        let state = Some((self.clone(), req.into_inner(), end));
        let answers = futures::stream::unfold(state, move |state| async move {
            let (svc, mut appends, mut end) = state?;
            let (answer, last) = match next_append(&mut appends, &mut end).await? {
                Ok(p) => match svc.answer_append(peer, &p).await {
                    Ok((answer, stopped)) => (Ok(answer), stopped),
                    Err(refused) => (Err(refused), true),
                },
                Err(status) => (Err(status), true),
            };
            let next = (!last).then_some((svc, appends, end));
            Some((answer, next))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let (peer, rpc) = incoming(&req)?;
        reply(&RaftService::vote(self, peer, rpc, false).await?)
    }

    async fn pre_vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let (peer, rpc) = incoming(&req)?;
        reply(&RaftService::vote(self, peer, rpc, true).await?)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let (peer, msg): (_, SnapshotMessage) = incoming(&req)?;
        let snapshot = openraft::Snapshot {
            meta: msg.meta,
            snapshot: msg.data,
        };
        let promise_ms = req.get_ref().promise_ms;
        reply(&RaftService::install_snapshot(self, peer, msg.vote, snapshot, promise_ms).await?)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let (peer, rpc) = incoming(&req)?;
        reply(&RaftService::transfer_leader(self, peer, rpc).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI failure of 0c33310's day: a replication stream with nothing
    /// to send held the peer server's drain until its leader's next append.
    #[tokio::test]
    async fn a_quiet_stream_of_appends_ends_when_the_servers_stop() {
        let (trigger, stop) = crate::shutdown::channel();
        let mut quiet = futures::stream::pending::<Result<pb::RaftPayload, Status>>();
        let mut end = Some(stop);
        let waiting = next_append(&mut quiet, &mut end);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err(), "a quiet stream ended before the stop");
        trigger.fire();
        let next = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a quiet stream of appends outlived the servers' stop");
        assert!(next.is_none());
        // Without a stop (the simulator's service), appends come as sent.
        let mut one = futures::stream::iter([Ok(pb::RaftPayload::default())]);
        assert!(matches!(
            next_append(&mut one, &mut None).await,
            Some(Ok(_))
        ));
        assert!(next_append(&mut one, &mut None).await.is_none());
    }

    #[test]
    fn a_passing_refusal_is_unavailable_and_a_refused_sender_is_denied() {
        use tonic::Code;
        let table = [
            (Refusal::Starting, Code::Unavailable),
            (Refusal::Promised(40), Code::Unavailable),
            (Refusal::VotesShut, Code::Unavailable),
            (Refusal::TransferVote("lease".into()), Code::Unavailable),
            (Refusal::NoLeadership, Code::FailedPrecondition),
            (
                Refusal::Refused {
                    me: 1,
                    peer: 2,
                    why: "restored".into(),
                },
                Code::PermissionDenied,
            ),
            (
                Refusal::NotItsOwn {
                    peer: 2,
                    claimed: 3,
                },
                Code::PermissionDenied,
            ),
        ];
        for (refusal, code) in table {
            let why = refusal.to_string();
            let status = Status::from(refusal);
            assert_eq!(status.code(), code, "{why}");
            assert_eq!(status.message(), why);
        }
    }
}
