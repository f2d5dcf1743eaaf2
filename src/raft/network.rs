//! openraft's network: what a Raft message to a peer is, over any
//! [`Transport`] (gRPC for real, `raft::peers`; the simulated network in
//! sim/), and what each answer shows of the peer ([`after_append`],
//! [`after_vote`], [`caught`]), which feeds this node's [`Memory`] of it.
//!
//! Owns: an append's deadline ([`append_ttl`]), the stamp each leader
//! message carries, the refusal of a peer caught below what was seen of
//! it. Must not: know how bytes travel (the transport does), retry on its
//! own (openraft decides when to call again).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::{BasicNode, OptionalSend};

use super::memory::{behind, Behind, Holds, Memory, Records, Remembered};
use super::{TypeConfig, Vote};
use crate::config::NodeId;

/// The least time an append carrying entries gets (see [`append_ttl`]).
const MIN_APPEND_TTL: Duration = Duration::from_millis(250);

/// An append's deadline. openraft allows one heartbeat interval for any
/// append; one that carries entries also waits for the follower's fsync,
/// which a slow disk or a long round trip can push past 50 ms, and then
/// nothing would ever commit. A late ack is still safe: the lease counts
/// from when the request was sent.
pub fn append_ttl(carries_entries: bool, hard_ttl: Duration) -> Duration {
    if carries_entries {
        hard_ttl.max(MIN_APPEND_TTL)
    } else {
        hard_ttl
    }
}

/// The promise of the timing in force now, sent with every message: read
/// after openraft stamped the message's sending time, a lease counted from
/// it uses that timing's fence only if it was sent after the switch
/// (`policy::fence_in_force`).
pub fn promise_ms(gate: &super::Gate) -> u32 {
    gate.live().promise.as_millis().min(u32::MAX as u128) as u32
}

/// A peer this node refused: its messages go nowhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node} is refused: {why}")]
pub struct IsRefused {
    pub node: NodeId,
    pub why: String,
}

/// What this node remembers of `target`, unless it refused it.
pub fn not_refused<M: Records>(memory: &M, target: NodeId) -> Result<Remembered, IsRefused> {
    let r = memory.of(target);
    match r.refused {
        Some(why) => Err(IsRefused { node: target, why }),
        None => Ok(r),
    }
}

/// What an answer to an append shows of the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Shown {
    /// It held the leader's `term` and, of the committed log, up to
    /// `committed`.
    Held {
        term: u64,
        committed: u64,
    },
    /// It no longer holds what it acknowledged.
    Lost(Behind),
    Nothing,
}

/// What `resp`, an answer to `rpc`, shows of the peer, which was seen to
/// hold `before`.
pub fn after_append(
    rpc: &AppendEntriesRequest<TypeConfig>,
    resp: &AppendEntriesResponse<TypeConfig>,
    before: &Remembered,
) -> Shown {
    let held = match resp {
        AppendEntriesResponse::Success => rpc
            .entries
            .last()
            .map(|e| e.log_id.index)
            .or(rpc.prev_log_id.map(|p| p.index)),
        AppendEntriesResponse::PartialSuccess(l) => l.map(|l| l.index),
        // It lacks an entry it acknowledged holding when committed.
        AppendEntriesResponse::Conflict => match rpc.prev_log_id {
            Some(p) if p.index <= before.committed => return Shown::Lost(Behind::Lost(p.index)),
            _ => None,
        },
        AppendEntriesResponse::HigherVote(_) => None,
    };
    // Success is sent once its vote and entries are fsynced; what of
    // them was committed when sent is a fact that only grows.
    held.map_or(Shown::Nothing, |held| Shown::Held {
        term: rpc.vote.leader_id.term,
        committed: rpc.leader_commit.map_or(0, |c| c.index).min(held),
    })
}

/// The term a vote answer shows the voter holds (it is sent once the
/// voter's vote is fsynced), or how it is below what was seen of it.
pub fn after_vote(resp: &VoteResponse<TypeConfig>, before: &Remembered) -> Result<u64, Behind> {
    let theirs = Holds {
        term: resp.vote.leader_id.term,
        last_index: resp.last_log_id.map_or(0, |l| l.index),
    };
    match behind(before, theirs) {
        Some(gap) => Err(gap),
        None => Ok(theirs.term),
    }
}

/// Node `me` caught `target` answering below `before`, what it saw of it:
/// its data dir went back in time. From now on its votes and
/// acknowledgements count for nothing here, and gossip tells it why (it
/// then stops). Returns the reason.
pub async fn caught<M: Records>(
    memory: &M,
    me: NodeId,
    target: NodeId,
    before: &Remembered,
    gap: Behind,
) -> String {
    let why = format!(
        "node {target} answered below what node {me} saw of it ({gap}): its data dir was restored from an older copy or lost writes"
    );
    match memory.refuse(target, before, why.clone(), me).await {
        Ok(true) => tracing::error!("REFUSED: {why}; its votes and acknowledgements are ignored until it rejoins (--rejoin after moving its data dir away)"),
        Ok(false) => {}
        Err(e) => tracing::error!("cannot record the refusal of node {target}: {e}"),
    }
    why
}

/// What a leader's message carries beside it (see the proto): the log
/// index it holds fsynced, and the promise of the timing in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub leader_durable: u64,
    pub promise_ms: u32,
}

impl Stamp {
    /// For a message that is not a leader's append (its receiver reads
    /// neither).
    pub const NONE: Stamp = Stamp {
        leader_durable: 0,
        promise_ms: 0,
    };
}

/// What carries one Raft message to a peer and brings its answer back,
/// within `ttl`: gRPC over mTLS for real (`raft::peers::Peers`), the
/// simulated network in sim/. A failure is openraft's kind of it: a peer
/// that cannot be reached or refuses for now is `Unreachable` (openraft
/// backs off), anything else `Network`.
pub trait Transport: Send + Sync + 'static {
    /// The node this transport sends from.
    fn self_id(&self) -> NodeId;

    /// Learns a peer's address from the membership, unless it knows one.
    fn learn(&self, target: NodeId, node: &BasicNode);

    /// What one openraft connection keeps from one append to its next
    /// (the gRPC transport: the stream its appends go on).
    type Lane: Default + Send + Sync + 'static;

    fn append(
        &self,
        lane: &Self::Lane,
        target: NodeId,
        rpc: &AppendEntriesRequest<TypeConfig>,
        stamp: Stamp,
        ttl: Duration,
    ) -> impl Future<Output = Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>> + Send;

    /// A vote request, or a pre-vote one (`pre`).
    fn vote(
        &self,
        target: NodeId,
        rpc: &VoteRequest<TypeConfig>,
        pre: bool,
        ttl: Duration,
    ) -> impl Future<Output = Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>>> + Send;

    fn transfer(
        &self,
        target: NodeId,
        rpc: &TransferLeaderRequest<TypeConfig>,
        ttl: Duration,
    ) -> impl Future<Output = Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>>> + Send;

    fn snapshot(
        &self,
        target: NodeId,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        promise_ms: u32,
        ttl: Duration,
    ) -> impl Future<Output = Result<SnapshotResponse<TypeConfig>, RPCError<TypeConfig>>> + Send;
}

/// openraft's network factory over a [`Transport`]; what peers answer
/// feeds this node's [`Memory`] of them.
pub struct Network<T> {
    pub transport: Arc<T>,
    pub memory: Arc<Memory>,
    /// What this node holds fsynced while it leads, sent with each append.
    pub gate: Arc<super::Gate>,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = PeerConnection<T>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection<T> {
        self.transport.learn(target, node);
        PeerConnection {
            transport: self.transport.clone(),
            memory: self.memory.clone(),
            gate: self.gate.clone(),
            me: self.transport.self_id(),
            target,
            lane: T::Lane::default(),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerConnection<T: Transport> {
    transport: Arc<T>,
    memory: Arc<Memory>,
    gate: Arc<super::Gate>,
    me: NodeId,
    target: NodeId,
    lane: T::Lane,
}

fn unreachable(why: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(why.to_string()))
}

impl<T: Transport> PeerConnection<T> {
    /// What this node remembers of the target; an error if it refused it.
    fn remembered(&self) -> Result<Remembered, RPCError<TypeConfig>> {
        not_refused(&*self.memory, self.target).map_err(unreachable)
    }

    /// The target answered below what was seen of it: see [`caught`].
    async fn caught(&self, before: &Remembered, gap: Behind) -> RPCError<TypeConfig> {
        unreachable(caught(&*self.memory, self.me, self.target, before, gap).await)
    }

    /// Records what an answer showed of the target.
    async fn saw(&self, term: u64, committed: Option<u64>) -> Result<(), RPCError<TypeConfig>> {
        self.memory
            .saw(self.target, term, committed)
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl<T: Transport> RaftNetworkV2<TypeConfig> for PeerConnection<T> {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = append_ttl(!rpc.entries.is_empty(), option.hard_ttl());
        let before = self.remembered()?;
        let stamp = Stamp {
            leader_durable: self.gate.own_durable(),
            promise_ms: promise_ms(&self.gate),
        };
        let resp = self
            .transport
            .append(&self.lane, self.target, &rpc, stamp, ttl)
            .await?;
        match after_append(&rpc, &resp, &before) {
            Shown::Held { term, committed } => self.saw(term, Some(committed)).await?,
            Shown::Lost(gap) => return Err(self.caught(&before, gap).await),
            Shown::Nothing => {}
        }
        // Refused while the message was out (another connection or gossip
        // caught it): its answer counts for nothing either.
        self.remembered()?;
        Ok(resp)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let before = self.remembered()?;
        let resp = self
            .transport
            .vote(self.target, &rpc, false, option.hard_ttl())
            .await?;
        match after_vote(&resp, &before) {
            Ok(term) => self.saw(term, None).await?,
            Err(gap) => return Err(self.caught(&before, gap).await),
        }
        self.remembered()?;
        Ok(resp)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.remembered()?;
        let resp = self
            .transport
            .vote(self.target, &rpc, true, option.hard_ttl())
            .await?;
        self.remembered()?;
        Ok(resp)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.remembered()?;
        self.transport
            .transfer(self.target, &req, option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        self.remembered()?;
        let promise = promise_ms(&self.gate);
        let send = self
            .transport
            .snapshot(self.target, vote, snapshot, promise, option.hard_ttl());
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(StreamingError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    fn append(
        prev: Option<u64>,
        entries: &[u64],
        commit: Option<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(7, 1),
            prev_log_id: prev.map(|i| log_id::<TypeConfig>(7, 1, i)),
            entries: entries
                .iter()
                .map(|&i| blank_ent::<TypeConfig>(7, 1, i))
                .collect(),
            leader_commit: commit.map(|i| log_id::<TypeConfig>(7, 1, i)),
        }
    }

    fn seen(committed: u64) -> Remembered {
        Remembered {
            term: 7,
            committed,
            ..Remembered::default()
        }
    }

    #[test]
    fn an_answer_to_an_append_shows_what_the_peer_holds_of_the_committed_log() {
        use AppendEntriesResponse::{Conflict, PartialSuccess, Success};
        let held = |committed| Shown::Held { term: 7, committed };
        let lost = |i: u64| Shown::Lost(Behind::Lost(i));
        // (request, answer, committed index seen of the peer before, shown)
        let table = [
            // Entries 5..=6 held; of them, committed up to the leader's 5.
            (append(Some(4), &[5, 6], Some(5)), Success, 0, held(5)),
            // The leader committed past what was sent: only what it holds.
            (append(Some(4), &[5, 6], Some(9)), Success, 0, held(6)),
            // A heartbeat shows its previous entry held.
            (append(Some(4), &[], Some(4)), Success, 0, held(4)),
            // Nothing sent and nothing held before it: nothing shown.
            (append(None, &[], None), Success, 0, Shown::Nothing),
            (
                append(Some(4), &[5, 6], Some(6)),
                PartialSuccess(Some(log_id::<TypeConfig>(7, 1, 5))),
                0,
                held(5),
            ),
            (
                append(Some(4), &[5], Some(5)),
                PartialSuccess(None),
                0,
                Shown::Nothing,
            ),
            // A conflict below what it acknowledged as committed: lost.
            (append(Some(4), &[5], Some(5)), Conflict, 4, lost(4)),
            (append(Some(4), &[5], Some(5)), Conflict, 9, lost(4)),
            // A conflict past it is Raft's ordinary catch-up.
            (append(Some(4), &[5], Some(5)), Conflict, 3, Shown::Nothing),
            (append(None, &[1], Some(1)), Conflict, 3, Shown::Nothing),
        ];
        for (rpc, resp, committed, want) in table {
            let got = after_append(&rpc, &resp, &seen(committed));
            assert_eq!(got, want, "{resp:?} to {rpc:?}, seen {committed}");
        }
    }

    #[test]
    fn a_vote_answer_below_what_was_seen_of_the_voter_is_caught() {
        let answer = |term, last: Option<u64>| VoteResponse::<TypeConfig> {
            vote: Vote::new(term, 2),
            vote_granted: false,
            last_log_id: last.map(|i| log_id::<TypeConfig>(term, 2, i)),
        };
        assert_eq!(after_vote(&answer(8, Some(9)), &seen(9)), Ok(8));
        assert_eq!(after_vote(&answer(7, Some(12)), &seen(9)), Ok(7));
        assert!(after_vote(&answer(6, Some(12)), &seen(9)).is_err(), "term");
        assert!(after_vote(&answer(8, Some(8)), &seen(9)).is_err(), "log");
        assert!(after_vote(&answer(8, None), &seen(9)).is_err(), "empty log");
    }

    /// A transport whose peer, node 2, grants every vote and acknowledges
    /// every append, and which (when `refuse_meanwhile`) has node 1 refuse
    /// node 2 while the message is out, as another connection or gossip
    /// that caught it would.
    struct Racing {
        memory: Arc<Memory>,
        refuse_meanwhile: bool,
    }

    impl Racing {
        async fn meanwhile(&self) {
            if self.refuse_meanwhile {
                let before = self.memory.of(2);
                let why = "caught by another connection".to_string();
                assert!(self.memory.refuse(2, &before, why, 1).await.unwrap());
            }
        }
    }

    impl Transport for Racing {
        fn self_id(&self) -> NodeId {
            1
        }
        fn learn(&self, _: NodeId, _: &BasicNode) {}
        type Lane = ();
        async fn append(
            &self,
            _: &(),
            _: NodeId,
            _: &AppendEntriesRequest<TypeConfig>,
            _: Stamp,
            _: Duration,
        ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
            self.meanwhile().await;
            Ok(AppendEntriesResponse::Success)
        }
        async fn vote(
            &self,
            _: NodeId,
            rpc: &VoteRequest<TypeConfig>,
            _: bool,
            _: Duration,
        ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
            self.meanwhile().await;
            Ok(VoteResponse {
                vote: rpc.vote,
                vote_granted: true,
                last_log_id: None,
            })
        }
        async fn transfer(
            &self,
            _: NodeId,
            _: &TransferLeaderRequest<TypeConfig>,
            _: Duration,
        ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
            unreachable!("not asked")
        }
        async fn snapshot(
            &self,
            _: NodeId,
            _: Vote,
            _: SnapshotOf<TypeConfig, Vec<u8>>,
            _: u32,
            _: Duration,
        ) -> Result<SnapshotResponse<TypeConfig>, RPCError<TypeConfig>> {
            unreachable!("not asked")
        }
    }

    /// Node 1's connection to node 2 over [`Racing`].
    async fn racing(dir: &std::path::Path, refuse_meanwhile: bool) -> PeerConnection<Racing> {
        let (_, _, memory) = super::super::store::open(dir).unwrap();
        let live = super::super::gate::tests::live();
        let mut network = Network {
            transport: Arc::new(Racing {
                memory: memory.clone(),
                refuse_meanwhile,
            }),
            memory,
            gate: Arc::new(super::super::Gate::new(Duration::ZERO, true, live)),
        };
        network.new_client(2, &BasicNode::default()).await
    }

    #[tokio::test]
    async fn an_answer_from_a_peer_refused_while_it_was_out_counts_for_nothing() {
        let ttl = RPCOption::new(Duration::from_millis(100));
        let vote = || VoteRequest::<TypeConfig>::new(Vote::new(7, 1), None);
        for refuse_meanwhile in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = racing(dir.path(), refuse_meanwhile).await;
            let voted = c.vote(vote(), ttl.clone()).await;
            let pre = c.pre_vote(vote(), ttl.clone()).await;
            let dir = tempfile::tempdir().unwrap();
            let mut c = racing(dir.path(), refuse_meanwhile).await;
            let acked = c
                .append_entries(append(None, &[1], None), ttl.clone())
                .await;
            for (what, r) in [("vote", voted.is_ok()), ("pre-vote", pre.is_ok())] {
                assert_eq!(
                    r, !refuse_meanwhile,
                    "{what}, refused meanwhile: {refuse_meanwhile}"
                );
            }
            assert_eq!(acked.is_ok(), !refuse_meanwhile, "append: {acked:?}");
            if refuse_meanwhile {
                assert!(matches!(voted, Err(RPCError::Unreachable(_))), "{voted:?}");
            }
        }
    }

    #[test]
    fn only_an_append_that_carries_entries_waits_for_a_slow_fsync() {
        let ms = Duration::from_millis;
        assert_eq!(append_ttl(false, ms(50)), ms(50));
        assert_eq!(append_ttl(true, ms(50)), MIN_APPEND_TTL);
        assert_eq!(append_ttl(true, ms(900)), ms(900));
    }
}
