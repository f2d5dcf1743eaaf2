//! The peer port as the simulation serves it: what one keyraft process
//! sends another over [`crate::net`] where a real node uses gRPC over
//! mTLS. Each message runs the receiving process's own keyraft service:
//! a Raft message its `raft::server::RaftService` ([`SimTransport`], the
//! transport under keyraft's own `raft::network` client), a forwarded
//! signature the leader's `Signer::serve` ([`SimForward`]), an operator's
//! command the leader's `Commands::serve` ([`SimRelay`]).
//!
//! Owns: the three transports, and how a service's refusal reaches the
//! caller (as keyraft's gRPC client maps it, `raft::peers`). Must not:
//! decide anything about a message; the services at both ends do.
//! What a process is stays above (`crate::node`); the network reaches it
//! through [`Port`].

use std::sync::Arc;
use std::time::Duration;

use keyraft::admin::{Commands, Relay};
use keyraft::pb;
use keyraft::raft::memory::Memory;
use keyraft::raft::network::{Stamp, Transport};
use keyraft::raft::peers::PeerError;
use keyraft::raft::server::{Answer, RaftService, Refusal};
use keyraft::raft::store::StateMachine;
use keyraft::signer::{Forward, Signer};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::BasicNode;
use tonic::Status;

use crate::host::Runs;
use crate::net::{Boxed, Net, NetError};
use crate::types::{NodeId, Types, Vote};

pub type SimSigner<P> = Signer<StateMachine, SimForward<P>>;
pub type SimCommands<P> = Commands<StateMachine, SimRelay<P>>;

/// What the network reaches on a process: its peer port's services.
pub trait Port: Runs + Sized {
    /// keyraft's Raft service, on the process's openraft and memory.
    fn raft(&self) -> &RaftService<StateMachine, Memory>;
    /// keyraft's signer (signer mode only).
    fn signer(&self) -> Option<&Arc<SimSigner<Self>>>;
    /// keyraft's operator commands.
    fn commands(&self) -> &SimCommands<Self>;
    /// keyraft's answer to the leader's confirmation ask (every member).
    fn confirm(&self, from: NodeId, ask: &pb::ConfirmRequest) -> Result<pb::ConfirmReply, Status>;
}

/// Where the simulation says member `id` listens (its network routes by
/// id; keyraft wants HOST:PORT).
pub fn addr(id: NodeId) -> String {
    format!("node-{id}:7700")
}

/// What the peer's Raft service returned, as keyraft's gRPC client maps it
/// (`raft::peers`): a passing refusal (status unavailable) and openraft's
/// own error are unreachable, any other refusal a network error.
enum Failed {
    Unreachable(String),
    Network(String),
}

fn answered<T>(r: Result<Answer<T>, Refusal>) -> Result<T, Failed> {
    match r {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Failed::Unreachable(e.to_string())),
        Err(refusal) if refusal.passing() => Err(Failed::Unreachable(refusal.to_string())),
        Err(refusal) => Err(Failed::Network(refusal.to_string())),
    }
}

fn unreachable(why: impl std::fmt::Display) -> RPCError<Types> {
    RPCError::Unreachable(Unreachable::from_string(why.to_string()))
}

/// keyraft's [`Transport`] for one process: each Raft message runs the
/// receiving process's Raft service over [`crate::net`].
pub struct SimTransport<P> {
    pub net: Net<P>,
    pub from: NodeId,
    pub inc: u64,
}

impl<P: Port> SimTransport<P> {
    async fn call<R: Send + 'static>(
        &self,
        to: NodeId,
        ttl: Duration,
        f: impl Fn(Arc<P>) -> Boxed<Result<R, Failed>> + Send + Sync + 'static,
    ) -> Result<R, RPCError<Types>> {
        match self.net.exchange(self.from, self.inc, to, ttl, f).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(Failed::Unreachable(why))) => Err(unreachable(why)),
            Ok(Err(Failed::Network(why))) => Err(RPCError::Network(NetworkError::from_string(why))),
            // No answer in time is a network error, as keyraft's own
            // deadline on a gRPC call is (`raft::peers`): openraft does
            // not back off from it.
            Err(e @ NetError::Timeout) => {
                Err(RPCError::Network(NetworkError::from_string(e.to_string())))
            }
            // Nobody listening (a connection refused) is unreachable.
            Err(e @ (NetError::Refused | NetError::SenderGone)) => Err(unreachable(e)),
        }
    }
}

impl<P: Port> Transport for SimTransport<P> {
    fn self_id(&self) -> NodeId {
        self.from
    }

    /// The simulated network finds a peer by its id.
    fn learn(&self, _target: NodeId, _node: &BasicNode) {}

    type Lane = ();

    async fn append(
        &self,
        _: &(),
        to: NodeId,
        rpc: &AppendEntriesRequest<Types>,
        stamp: Stamp,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<Types>, RPCError<Types>> {
        let (from, req) = (self.from, rpc.clone());
        self.call(to, ttl, move |p| {
            let req = req.clone();
            Box::pin(async move {
                let r = p
                    .raft()
                    .append_entries(from, req, stamp.leader_durable, stamp.promise_ms);
                answered(r.await)
            })
        })
        .await
    }

    async fn vote(
        &self,
        to: NodeId,
        rpc: &VoteRequest<Types>,
        pre: bool,
        ttl: Duration,
    ) -> Result<VoteResponse<Types>, RPCError<Types>> {
        let (from, req) = (self.from, rpc.clone());
        self.call(to, ttl, move |p| {
            let req = req.clone();
            Box::pin(async move { answered(p.raft().vote(from, req, pre).await) })
        })
        .await
    }

    async fn transfer(
        &self,
        to: NodeId,
        rpc: &TransferLeaderRequest<Types>,
        ttl: Duration,
    ) -> Result<TransferLeaderResponse<Types>, RPCError<Types>> {
        let (from, req) = (self.from, rpc.clone());
        self.call(to, ttl, move |p| {
            let req = req.clone();
            Box::pin(async move { answered(p.raft().transfer_leader(from, req).await) })
        })
        .await
    }

    async fn snapshot(
        &self,
        to: NodeId,
        vote: Vote,
        snapshot: SnapshotOf<Types, Vec<u8>>,
        promise_ms: u32,
        ttl: Duration,
    ) -> Result<SnapshotResponse<Types>, RPCError<Types>> {
        let from = self.from;
        self.call(to, ttl, move |p| {
            let snapshot = openraft::Snapshot {
                meta: snapshot.meta.clone(),
                snapshot: snapshot.snapshot.clone(),
            };
            Box::pin(async move {
                let r = p.raft().install_snapshot(from, vote, snapshot, promise_ms);
                answered(r.await)
            })
        })
        .await
    }
}

/// A forward to the leader over the simulated network, served by the
/// leader's own `Signer::serve`.
pub struct SimForward<P> {
    pub net: Net<P>,
    pub from: NodeId,
    pub inc: u64,
}

impl<P: Port> Forward for SimForward<P> {
    async fn forward(
        &self,
        leader: NodeId,
        req: pb::SignRequest,
        limit: Duration,
    ) -> Result<pb::SignReply, PeerError> {
        let from = self.from;
        let req = Arc::new(req);
        let answer = self
            .net
            .exchange(self.from, self.inc, leader, limit, move |p: Arc<P>| {
                let req = req.clone();
                Box::pin(async move {
                    match p.signer() {
                        Some(s) => s.serve(from, &req).await,
                        None => Err(Status::unimplemented("not a signer")),
                    }
                })
            })
            .await;
        as_grpc_reports(leader, limit, answer)
    }

    async fn confirm(
        &self,
        to: NodeId,
        ask: pb::ConfirmRequest,
        limit: Duration,
    ) -> Result<pb::ConfirmReply, PeerError> {
        let from = self.from;
        let ask = Arc::new(ask);
        let answer = self
            .net
            .exchange(self.from, self.inc, to, limit, move |p: Arc<P>| {
                let ask = ask.clone();
                Box::pin(async move { p.confirm(from, &ask) })
            })
            .await;
        as_grpc_reports(to, limit, answer)
    }
}

/// A call's outcome as keyraft's gRPC client reports it (`raft::peers`).
fn as_grpc_reports<T>(
    to: NodeId,
    limit: Duration,
    answer: Result<Result<T, Status>, NetError>,
) -> Result<T, PeerError> {
    let rpc = |status| PeerError::Rpc { id: to, status };
    match answer {
        Ok(reply) => reply.map_err(rpc),
        Err(NetError::Timeout) => Err(PeerError::Timeout {
            id: to,
            after: limit,
        }),
        Err(e @ (NetError::Refused | NetError::SenderGone)) => {
            Err(rpc(Status::unavailable(e.to_string())))
        }
    }
}

/// Called when a membership change is about to be asked of openraft (the
/// judge's ground truth of who was up then).
pub type ChangeHook = Arc<dyn Fn() + Send + Sync>;

/// A command relayed to the leader over the simulated network.
pub struct SimRelay<P> {
    pub net: Net<P>,
    pub from: NodeId,
    pub inc: u64,
    pub change_begins: ChangeHook,
}

/// The relay's future is boxed (`Boxed`, not an `async fn`): the leader's
/// end may relay again (the removal of a leader goes to its successor),
/// and a boxed future's type does not contain itself.
#[allow(refining_impl_trait)]
impl<P: Port> Relay for SimRelay<P> {
    fn relay(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
        limit: Duration,
    ) -> Boxed<Result<String, Status>> {
        let (net, from, inc) = (self.net.clone(), self.from, self.inc);
        Box::pin(async move {
            let answer = net
                .exchange(from, inc, leader, limit, move |p: Arc<P>| {
                    let cmd = cmd.clone();
                    // Every simulated host is a validator host.
                    Box::pin(async move { p.commands().serve(from, Ok(()), cmd).await })
                })
                .await;
            answer
                .map_err(|e| Status::unavailable(format!("forwarding to leader {leader}: {e}")))?
        })
    }

    fn learned_addr(&self, _id: NodeId, _addr: &str) {}

    fn change_begins(&self, _change: &str) {
        (self.change_begins)();
    }
}
