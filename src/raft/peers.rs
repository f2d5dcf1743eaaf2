//! The peer client: one lazily connected gRPC channel per peer, shared by
//! Raft, gossip and forwarded commands, and Raft's messages on it (the real
//! [`Transport`] under openraft's network, `raft::network`).
//!
//! Owns: peer addresses, channel settings (timeouts, keepalive, mTLS with the
//! peer's expected name), the `x-keyraft-node` header on every request, the
//! wire form of a Raft message (JSON in `pb::RaftPayload`), the stream each
//! openraft connection's appends go on ([`Lane`], with single calls to a
//! peer too old for it) and the mapping of transport failures to openraft's
//! error kinds. Must not: retry on its own (openraft and gossip decide when
//! to call again), wait longer than the deadline the caller gives, or judge
//! what an answer shows of a peer (`raft::network` does, on any transport).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;

use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::network::{Stamp, Transport};
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
    /// Each peer's channel, its address and the serial it was made with
    /// (a stream of appends opened on an older channel is not used again).
    channels: Mutex<HashMap<NodeId, (String, Channel, u64)>>,
    serials: AtomicU64,
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
            serials: AtomicU64::new(0),
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
            .map(|(id, (addr, _, _))| (*id, addr.clone()))
            .collect();
        for (id, addr) in open {
            let Ok(ep) = self.endpoint(id, &addr, Some(&tls)) else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), ep.connect()).await {
                Ok(Ok(ch)) => {
                    let serial = self.serials.fetch_add(1, Ordering::Relaxed);
                    lock(&self.channels).insert(id, (addr, ch, serial));
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
        self.serial_channel(id).map(|(ch, _)| ch)
    }

    /// The channel to `id` and its serial.
    fn serial_channel(&self, id: NodeId) -> Result<(Channel, u64), PeerError> {
        let addr = self.addr(id).ok_or(PeerError::UnknownPeer(id))?;
        let mut channels = lock(&self.channels);
        if let Some((a, ch, serial)) = channels.get(&id) {
            if *a == addr {
                return Ok((ch.clone(), *serial));
            }
        }
        let tls = lock(&self.tls).clone();
        let ch = self.endpoint(id, &addr, tls.as_ref())?.connect_lazy();
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        channels.insert(id, (addr, ch.clone(), serial));
        Ok((ch, serial))
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
        let mut req = self.signed(msg);
        req.set_timeout(deadline);
        req
    }

    /// Wraps `msg` with our node id.
    fn signed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.self_id.to_string().parse() {
            req.metadata_mut().insert(NODE_HEADER, v);
        }
        req
    }

    pub fn raft_client(
        &self,
        id: NodeId,
    ) -> Result<pb::raft_client::RaftClient<Channel>, PeerError> {
        Ok(raft_client(self.channel(id)?))
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

fn raft_client(channel: Channel) -> RaftClient {
    pb::raft_client::RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A snapshot on the wire.
#[derive(Serialize, Deserialize)]
pub struct SnapshotMessage {
    pub vote: Vote,
    pub meta: SnapshotMetaOf<TypeConfig>,
    pub data: Vec<u8>,
}

type RaftClient = pb::raft_client::RaftClient<Channel>;

impl Peers {
    /// Sends `req` to `target` as JSON (with its [`Stamp`], see the proto) and decodes the answer. A refusal that
    /// passes (status unavailable) and openraft's own error are
    /// unreachable, anything else a network error.
    async fn raft_rpc<Req, Resp, F, Fut>(
        &self,
        target: NodeId,
        req: &Req,
        stamp: Stamp,
        ttl: Duration,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient, tonic::Request<pb::RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftPayload>, tonic::Status>>,
    {
        let reply = self
            .payload_call(target, payload(req, stamp)?, ttl, call)
            .await?;
        answer(target, &reply.json)
    }

    async fn payload_call<F, Fut>(
        &self,
        target: NodeId,
        payload: pb::RaftPayload,
        ttl: Duration,
        call: F,
    ) -> Result<pb::RaftPayload, RPCError<TypeConfig>>
    where
        F: FnOnce(RaftClient, tonic::Request<pb::RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftPayload>, tonic::Status>>,
    {
        let client = self.raft_client(target).map_err(failed)?;
        let request = self.request(payload, ttl);
        self.call(target, ttl, call(client, request))
            .await
            .map_err(failed)
    }

    /// One append on `lane`'s stream (opened here if it has none, or has
    /// one on a channel since replaced), or as a single call to a peer
    /// that has no streams. The stream is taken out of the lane for the
    /// call and put back only once its answer came: an append that failed
    /// or was given up on (its deadline, or openraft's) leaves the lane
    /// without one, so an answer on a stream is always to the append just
    /// sent.
    async fn streamed_append(
        &self,
        lane: &Lane,
        target: NodeId,
        payload: pb::RaftPayload,
        ttl: Duration,
    ) -> Result<pb::RaftPayload, RPCError<TypeConfig>> {
        let until = tokio::time::Instant::now() + ttl;
        let taken = std::mem::take(&mut *lock(&lane.0));
        let pipe = match taken {
            Pipe::Single => {
                *lock(&lane.0) = Pipe::Single;
                return self.single_append(target, payload, ttl).await;
            }
            Pipe::Open(pipe) => Some(*pipe),
            Pipe::None => None,
        };
        let sent = tokio::time::timeout_at(until, self.round(target, pipe, payload)).await;
        match sent {
            Ok(Ok((pipe, reply))) => {
                *lock(&lane.0) = Pipe::Open(Box::new(pipe));
                Ok(reply)
            }
            Ok(Err(Round::NoStreams(payload))) => {
                tracing::info!(
                    peer = target,
                    "the peer has no stream of appends (an older keyraft): single calls"
                );
                *lock(&lane.0) = Pipe::Single;
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                self.single_append(target, payload, left).await
            }
            Ok(Err(Round::Failed(e))) => Err(failed(e)),
            Err(_) => Err(failed(PeerError::Timeout {
                id: target,
                after: ttl,
            })),
        }
    }

    async fn single_append(
        &self,
        target: NodeId,
        payload: pb::RaftPayload,
        ttl: Duration,
    ) -> Result<pb::RaftPayload, RPCError<TypeConfig>> {
        self.payload_call(target, payload, ttl, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    /// Sends `payload` on `pipe` (or on a new stream) and reads its answer.
    async fn round(
        &self,
        target: NodeId,
        pipe: Option<OpenPipe>,
        payload: pb::RaftPayload,
    ) -> Result<(OpenPipe, pb::RaftPayload), Round> {
        let (channel, serial) = self.serial_channel(target).map_err(Round::Failed)?;
        let mut payload = payload;
        if let Some(mut pipe) = pipe.filter(|p| p.serial == serial) {
            // The previous answer came, so the previous append was read
            // and there is room: a send fails only on a stream that died
            // with its connection since (the peer restarted, the link was
            // reset). Nothing of this append went out; it goes on a new
            // stream, as a call would on the channel's new connection.
            match pipe.tx.try_send(payload) {
                Ok(()) => return answer_on(target, pipe).await,
                Err(dead) => payload = dead.into_inner(),
            }
        }
        let pipe = self.open(target, channel, serial, payload).await?;
        answer_on(target, pipe).await
    }

    /// A new stream of appends to `target`, carrying `first`.
    async fn open(
        &self,
        target: NodeId,
        channel: Channel,
        serial: u64,
        first: pb::RaftPayload,
    ) -> Result<OpenPipe, Round> {
        let (mut tx, rx) = mpsc::channel(1);
        // Kept for a single call should the peer have no streams.
        let again = first.clone();
        if tx.try_send(first).is_err() {
            return Err(Round::NoStreams(again));
        }
        match raft_client(channel).appends(self.signed(rx)).await {
            Ok(answers) => Ok(OpenPipe {
                tx,
                rx: answers.into_inner(),
                serial,
            }),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                Err(Round::NoStreams(again))
            }
            Err(status) => Err(Round::Failed(PeerError::Rpc { id: target, status })),
        }
    }
}

/// The answer on `pipe` to the append just sent on it.
async fn answer_on(
    target: NodeId,
    mut pipe: OpenPipe,
) -> Result<(OpenPipe, pb::RaftPayload), Round> {
    match pipe.rx.message().await {
        Ok(Some(reply)) => Ok((pipe, reply)),
        Ok(None) => Err(Round::Failed(PeerError::Rpc {
            id: target,
            status: tonic::Status::aborted("the peer ended the stream of appends"),
        })),
        Err(status) => Err(Round::Failed(PeerError::Rpc { id: target, status })),
    }
}

/// The payload of openraft's `req`, with its [`Stamp`].
fn payload<Req: Serialize>(
    req: &Req,
    stamp: Stamp,
) -> Result<pb::RaftPayload, RPCError<TypeConfig>> {
    let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    Ok(pb::RaftPayload {
        json,
        leader_durable: stamp.leader_durable,
        promise_ms: stamp.promise_ms,
    })
}

/// Where one openraft connection's appends to a peer go: a stream of
/// them, each append and its answer one HTTP/2 data frame (a single call
/// costs its request two writes, headers then body, and the peer a task).
#[derive(Default)]
pub struct Lane(Mutex<Pipe>);

#[derive(Default)]
enum Pipe {
    /// None open: the next append opens one.
    #[default]
    None,
    Open(Box<OpenPipe>),
    /// The peer has no streams of appends (an older keyraft).
    Single,
}

struct OpenPipe {
    tx: mpsc::Sender<pb::RaftPayload>,
    rx: tonic::Streaming<pb::RaftPayload>,
    /// The serial of the channel it was opened on.
    serial: u64,
}

/// Why a round on a stream did not bring an answer.
enum Round {
    /// The peer has no streams: the append, to go as a single call.
    NoStreams(pb::RaftPayload),
    Failed(PeerError),
}

/// openraft's kind of a failed call: a peer that refuses for now (status
/// unavailable: starting, votes shut, a promise) or cannot be reached is
/// unreachable, and openraft backs off; anything else, a timeout included,
/// is a network error.
fn failed(e: PeerError) -> RPCError<TypeConfig> {
    match &e {
        PeerError::Rpc { status, .. } if status.code() == tonic::Code::Unavailable => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        PeerError::UnknownPeer(_) | PeerError::BadAddress { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

/// A peer's answer: openraft's own error in it is unreachable, an answer
/// that does not decode a network error.
fn answer<Resp: DeserializeOwned>(
    target: NodeId,
    json: &[u8],
) -> Result<Resp, RPCError<TypeConfig>> {
    let result: Result<Resp, openraft::errors::RaftError<TypeConfig>> =
        serde_json::from_slice(json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    result
        .map_err(|e| RPCError::Unreachable(Unreachable::from_string(format!("node {target}: {e}"))))
}

impl Transport for Peers {
    fn self_id(&self) -> NodeId {
        self.self_id
    }

    fn learn(&self, target: NodeId, node: &BasicNode) {
        if self.addr(target).is_none() {
            self.set_addr(target, &node.addr);
        }
    }

    type Lane = Lane;

    async fn append(
        &self,
        lane: &Lane,
        target: NodeId,
        rpc: &AppendEntriesRequest<TypeConfig>,
        stamp: Stamp,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply = self
            .streamed_append(lane, target, payload(rpc, stamp)?, ttl)
            .await?;
        answer(target, &reply.json)
    }

    async fn vote(
        &self,
        target: NodeId,
        rpc: &VoteRequest<TypeConfig>,
        pre: bool,
        ttl: Duration,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        if pre {
            self.raft_rpc(target, rpc, Stamp::NONE, ttl, |mut c, r| async move {
                c.pre_vote(r).await
            })
            .await
        } else {
            self.raft_rpc(target, rpc, Stamp::NONE, ttl, |mut c, r| async move {
                c.vote(r).await
            })
            .await
        }
    }

    async fn transfer(
        &self,
        target: NodeId,
        rpc: &TransferLeaderRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_rpc(target, rpc, Stamp::NONE, ttl, |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
    }

    async fn snapshot(
        &self,
        target: NodeId,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        promise_ms: u32,
        ttl: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, RPCError<TypeConfig>> {
        let msg = SnapshotMessage {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        self.raft_rpc(
            target,
            &msg,
            Stamp {
                leader_durable: 0,
                promise_ms,
            },
            ttl,
            |mut c, r| async move { c.install_snapshot(r).await },
        )
        .await
    }
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
