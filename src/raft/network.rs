//! The peer client: one lazily connected gRPC channel per peer, shared by
//! Raft, gossip and forwarded commands, and openraft's network on top of it.
//!
//! Owns: peer addresses, channel settings (timeouts, keepalive, mTLS with the
//! peer's expected name), the `x-keyraft-node` header on every request, and
//! the mapping of transport failures to openraft's error kinds, and what an
//! answer shows of the peer ([`after_append`], [`after_vote`], [`caught`]:
//! the simulator, sim/, runs these on its own network too). Must not:
//! retry on its own (openraft and gossip decide when to call again) or wait
//! longer than the deadline the caller gives.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::memory::{behind, Holds, Memory, Records, Remembered};
use super::{TypeConfig, Vote};
use crate::config::NodeId;
use crate::pb;
use crate::tls::{TlsMaterial, NODE_HEADER};

/// Largest message any keyraft gRPC service accepts or sends.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {0} has no known address")]
    UnknownPeer(NodeId),
    #[error("bad address for node {id}: {why}")]
    BadAddress { id: NodeId, why: String },
    #[error("node {id}: {status}")]
    Rpc { id: NodeId, status: tonic::Status },
    #[error("node {id} did not answer within {after:?}")]
    Timeout { id: NodeId, after: Duration },
}

/// Peer channels, keyed by node id.
pub struct Peers {
    self_id: NodeId,
    tls: Mutex<Option<TlsMaterial>>,
    addrs: Mutex<BTreeMap<NodeId, String>>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl Peers {
    pub fn new(
        self_id: NodeId,
        tls: Option<TlsMaterial>,
        addrs: BTreeMap<NodeId, String>,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            self_id,
            tls: Mutex::new(tls),
            addrs: Mutex::new(addrs),
            channels: Mutex::new(HashMap::new()),
        })
    }

    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// Renewed certificates: channels made from now on use them, and each
    /// open channel is replaced once a new one has connected (so that the
    /// leader's heartbeats never wait for a fresh handshake); a peer that
    /// does not answer within 2 s gets a fresh channel on its next call.
    pub async fn set_tls(&self, tls: TlsMaterial) {
        *lock(&self.tls) = Some(tls.clone());
        let open: Vec<(NodeId, String)> = lock(&self.channels)
            .iter()
            .map(|(id, (addr, _))| (*id, addr.clone()))
            .collect();
        for (id, addr) in open {
            let Ok(ep) = self.endpoint(id, &addr, Some(&tls)) else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), ep.connect()).await {
                Ok(Ok(ch)) => {
                    lock(&self.channels).insert(id, (addr, ch));
                }
                _ => {
                    lock(&self.channels).remove(&id);
                }
            }
        }
    }

    /// Learns (or corrects) a peer's address, e.g. from the membership.
    pub fn set_addr(&self, id: NodeId, addr: &str) {
        if id != self.self_id {
            lock(&self.addrs).insert(id, addr.to_string());
        }
    }

    pub fn addr(&self, id: NodeId) -> Option<String> {
        lock(&self.addrs).get(&id).cloned()
    }

    /// The channel to `id`, created on first use (connections are lazy).
    pub fn channel(&self, id: NodeId) -> Result<Channel, PeerError> {
        let addr = self.addr(id).ok_or(PeerError::UnknownPeer(id))?;
        let mut channels = lock(&self.channels);
        if let Some((a, ch)) = channels.get(&id) {
            if *a == addr {
                return Ok(ch.clone());
            }
        }
        let tls = lock(&self.tls).clone();
        let ch = self.endpoint(id, &addr, tls.as_ref())?.connect_lazy();
        channels.insert(id, (addr, ch.clone()));
        Ok(ch)
    }

    fn endpoint(
        &self,
        id: NodeId,
        addr: &str,
        tls: Option<&TlsMaterial>,
    ) -> Result<Endpoint, PeerError> {
        let bad = |why: String| PeerError::BadAddress { id, why };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            ep = ep
                .tls_config(tls.client(id))
                .map_err(|e| bad(format!("{e:?}")))?;
        }
        Ok(ep)
    }

    /// Wraps `msg` with our node id and a deadline.
    pub fn request<T>(&self, msg: T, deadline: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.self_id.to_string().parse() {
            req.metadata_mut().insert(NODE_HEADER, v);
        }
        req.set_timeout(deadline);
        req
    }

    pub fn raft_client(
        &self,
        id: NodeId,
    ) -> Result<pb::raft_client::RaftClient<Channel>, PeerError> {
        Ok(pb::raft_client::RaftClient::new(self.channel(id)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn gossip_client(
        &self,
        id: NodeId,
    ) -> Result<pb::gossip_client::GossipClient<Channel>, PeerError> {
        Ok(pb::gossip_client::GossipClient::new(self.channel(id)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// Runs one RPC to `id` with a hard deadline.
    pub async fn call<T, F>(&self, id: NodeId, deadline: Duration, rpc: F) -> Result<T, PeerError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(deadline, rpc).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(PeerError::Rpc { id, status }),
            Err(_) => Err(PeerError::Timeout {
                id,
                after: deadline,
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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

/// What this node remembers of `target`, unless it refused it.
pub fn not_refused<M: Records>(memory: &M, target: NodeId) -> Result<Remembered, String> {
    let r = memory.of(target);
    match &r.refused {
        Some(why) => Err(format!("node {target} is refused: {why}")),
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
    /// It no longer holds what it acknowledged (in words).
    Lost(String),
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
            Some(p) if p.index <= before.committed => {
                return Shown::Lost(format!(
                    "it no longer holds log index {}, committed, which it acknowledged holding",
                    p.index
                ))
            }
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
pub fn after_vote(resp: &VoteResponse<TypeConfig>, before: &Remembered) -> Result<u64, String> {
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
    gap: String,
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

/// openraft's network factory over [`Peers`]; what peers answer feeds
/// this node's [`Memory`] of them.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<Peers>,
    pub memory: Arc<Memory>,
    /// What this node holds fsynced while it leads, sent with each append.
    pub gate: Arc<super::Gate>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        if self.peers.addr(target).is_none() {
            self.peers.set_addr(target, &node.addr);
        }
        PeerConnection {
            peers: self.peers.clone(),
            memory: self.memory.clone(),
            gate: self.gate.clone(),
            target,
        }
    }
}

pub struct PeerConnection {
    peers: Arc<Peers>,
    memory: Arc<Memory>,
    gate: Arc<super::Gate>,
    target: NodeId,
}

fn unreachable(why: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(why))
}

/// A snapshot on the wire.
#[derive(Serialize, Deserialize)]
pub struct SnapshotMessage {
    pub vote: Vote,
    pub meta: SnapshotMetaOf<TypeConfig>,
    pub data: Vec<u8>,
}

type RaftClient = pb::raft_client::RaftClient<Channel>;

impl PeerConnection {
    /// Sends `req` (with `leader_durable`, see the proto) and decodes the
    /// answer.
    async fn rpc<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        leader_durable: u64,
        ttl: Duration,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient, tonic::Request<pb::RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftPayload>, tonic::Status>>,
    {
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self
            .peers
            .raft_client(self.target)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let payload = pb::RaftPayload {
            json,
            leader_durable,
            promise_ms: promise_ms(&self.gate),
        };
        let request = self.peers.request(payload, ttl);
        let reply = self
            .peers
            .call(self.target, ttl, call(client, request))
            .await
            .map_err(|e| match &e {
                PeerError::Rpc { status, .. } if status.code() == tonic::Code::Unavailable => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        let result: Result<Resp, openraft::errors::RaftError<TypeConfig>> =
            serde_json::from_slice(&reply.json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::Unreachable(Unreachable::from_string(format!(
                "node {}: {e}",
                self.target
            )))
        })
    }
}

impl PeerConnection {
    /// What this node remembers of the target; an error if it refused it.
    fn remembered(&self) -> Result<Remembered, RPCError<TypeConfig>> {
        not_refused(&*self.memory, self.target).map_err(unreachable)
    }

    /// The target answered below what was seen of it: see [`caught`].
    async fn caught(&self, before: &Remembered, gap: String) -> RPCError<TypeConfig> {
        let me = self.peers.self_id();
        unreachable(caught(&*self.memory, me, self.target, before, gap).await)
    }

    /// Records what an answer showed of the target.
    async fn saw(&self, term: u64, committed: Option<u64>) -> Result<(), RPCError<TypeConfig>> {
        self.memory
            .saw(self.target, term, committed)
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = append_ttl(!rpc.entries.is_empty(), option.hard_ttl());
        let before = self.remembered()?;
        let resp: AppendEntriesResponse<TypeConfig> = self
            .rpc(&rpc, self.gate.own_durable(), ttl, |mut c, r| async move {
                c.append_entries(r).await
            })
            .await?;
        match after_append(&rpc, &resp, &before) {
            Shown::Held { term, committed } => self.saw(term, Some(committed)).await?,
            Shown::Lost(gap) => return Err(self.caught(&before, gap).await),
            Shown::Nothing => {}
        }
        Ok(resp)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let before = self.remembered()?;
        let resp: VoteResponse<TypeConfig> = self
            .rpc(&rpc, 0, option.hard_ttl(), |mut c, r| async move {
                c.vote(r).await
            })
            .await?;
        match after_vote(&resp, &before) {
            Ok(term) => self.saw(term, None).await?,
            Err(gap) => return Err(self.caught(&before, gap).await),
        }
        Ok(resp)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.remembered()?;
        self.rpc(&rpc, 0, option.hard_ttl(), |mut c, r| async move {
            c.pre_vote(r).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.remembered()?;
        self.rpc(&req, 0, option.hard_ttl(), |mut c, r| async move {
            c.transfer_leader(r).await
        })
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
        let msg = SnapshotMessage {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let send = self.rpc(&msg, 0, option.hard_ttl(), |mut c, r| async move {
            c.install_snapshot(r).await
        });
        tokio::select! {
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
        let lost = |i: u64| {
            Shown::Lost(format!(
                "it no longer holds log index {i}, committed, which it acknowledged holding"
            ))
        };
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

    #[test]
    fn only_an_append_that_carries_entries_waits_for_a_slow_fsync() {
        let ms = Duration::from_millis;
        assert_eq!(append_ttl(false, ms(50)), ms(50));
        assert_eq!(append_ttl(true, ms(50)), MIN_APPEND_TTL);
        assert_eq!(append_ttl(true, ms(900)), ms(900));
    }
}
