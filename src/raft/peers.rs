//! The peer client: one lazily connected gRPC channel per peer, shared by
//! Raft, gossip and forwarded commands, and Raft's messages on it (the real
//! [`Transport`] under openraft's network, `raft::network`).
//!
//! Owns: peer addresses, channel settings (timeouts, keepalive, mTLS with the
//! peer's expected name), the `x-keyraft-node` header on every request, the
//! wire form of a Raft message (JSON in `pb::RaftPayload`) and the mapping
//! of transport failures to openraft's error kinds. Must not: retry on its
//! own (openraft and gossip decide when to call again), wait longer than
//! the deadline the caller gives, or judge what an answer shows of a peer
//! (`raft::network` does, on any transport).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self.raft_client(target).map_err(failed)?;
        let payload = pb::RaftPayload {
            json,
            leader_durable: stamp.leader_durable,
            promise_ms: stamp.promise_ms,
        };
        let request = self.request(payload, ttl);
        let reply = self
            .call(target, ttl, call(client, request))
            .await
            .map_err(failed)?;
        answer(target, &reply.json)
    }
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

    async fn append(
        &self,
        target: NodeId,
        rpc: &AppendEntriesRequest<TypeConfig>,
        stamp: Stamp,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_rpc(target, rpc, stamp, ttl, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
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
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_is_unreachable_only_where_openraft_should_back_off() {
        use tonic::{Code, Status};
        let rpc = |code| PeerError::Rpc {
            id: 2,
            status: Status::new(code, "x"),
        };
        let timeout = PeerError::Timeout {
            id: 2,
            after: Duration::from_millis(50),
        };
        let bad = PeerError::BadAddress {
            id: 2,
            why: "x".into(),
        };
        // (failure, unreachable?)
        let table = [
            (rpc(Code::Unavailable), true),
            (PeerError::UnknownPeer(2), true),
            (bad, true),
            (rpc(Code::PermissionDenied), false),
            (rpc(Code::InvalidArgument), false),
            (rpc(Code::Cancelled), false),
            (rpc(Code::DeadlineExceeded), false),
            (timeout, false),
        ];
        for (e, want) in table {
            let what = e.to_string();
            let got = matches!(failed(e), RPCError::Unreachable(_));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn an_answer_carries_the_peers_reply_or_openraft_s_error() {
        let ok = serde_json::to_vec(&Ok::<_, openraft::errors::RaftError<TypeConfig>>(
            AppendEntriesResponse::<TypeConfig>::Success,
        ))
        .unwrap();
        let got: AppendEntriesResponse<TypeConfig> = answer(2, &ok).unwrap();
        assert_eq!(got, AppendEntriesResponse::Success);
        let fatal = serde_json::to_vec(&Err::<AppendEntriesResponse<TypeConfig>, _>(
            openraft::errors::RaftError::<TypeConfig>::Fatal(openraft::errors::Fatal::Stopped),
        ))
        .unwrap();
        let r: Result<AppendEntriesResponse<TypeConfig>, _> = answer(2, &fatal);
        assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
        let r: Result<AppendEntriesResponse<TypeConfig>, _> = answer(2, b"not json");
        assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
    }
}
