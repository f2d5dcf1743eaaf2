//! One keyraft process: real openraft with keyraft's openraft
//! configuration (`raft::openraft_config`), the real vote and leadership
//! gate (`raft::Gate`), the real heartbeat timer
//! (`raft::heartbeat_while_leading`), the real ledger, and step 9's real
//! rule (`raft::memory::behind`) at start and on every vote answer. Its
//! Raft service is keyraft's own (`raft::server::RaftService`), and its
//! client is keyraft's own too (`raft::network::PeerConnection`, with its
//! rules of what an answer shows of a peer), over [`crate::net`] instead of
//! gRPC: the simulator supplies only the transport ([`SimTransport`]).
//!
//! Its `keyraft::node::Core` is the one keyraft's coordinator runs on
//! ([`crate::coordinator`]), with keyraft's own status records (`Local`,
//! `ClusterView`) carried by this process's gossip.
//!
//! A restart runs keyraft's own step 9 (`join::bootstrap`), asking each
//! peer over [`crate::net`], whose `gossip::hello_reply` answers.
//!
//! Owns: a process's start, its Raft traffic and its gossip. Must not: touch the validator; the coordinator does, through
//! the host's model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyraft::config::Timing;
use keyraft::join::Bootstrap;
use keyraft::ledger::ClusterState;
use keyraft::node::{ClusterView, CoordinatorRequest, Core, Local};
use keyraft::pb;
use keyraft::raft::memory::{Holds, Memory, Remembered};
use keyraft::raft::network::{Network, Stamp, Transport};
use keyraft::raft::server::{Answer, RaftService, Refusal};
use keyraft::raft::store::StateMachine;
use keyraft::raft::Gate;
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::BasicNode;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::disk::Disk;
use crate::host::Host;
use crate::net::{Boxed, Net, NetError};
use crate::types::{self, Metrics, NodeId, Raft, Types, Vote};
use crate::world::World;

pub struct Process {
    pub id: NodeId,
    pub inc: u64,
    pub raft: Raft,
    pub gate: Arc<Gate>,
    pub disk: Disk,
    pub cluster: watch::Receiver<ClusterState>,
    pub timing: Timing,
    pub net: Net,
    /// keyraft's Raft service, on this process's openraft and memory.
    service: RaftService<StateMachine, Memory>,
    /// What it remembers of its peers (step 9).
    memory: Arc<Memory>,
    pub started: Instant,
    /// What its data dir held at start (its status never says less).
    start_holds: Holds,
    /// Whether its data dir was empty at start.
    start_fresh: bool,
    /// What keyraft's coordinator runs on: this process's Raft, gate,
    /// replicated state, and the status records gossip carries.
    pub core: Arc<Core<StateMachine>>,
    /// Signer mode: keyraft's own signer on this process's `core`.
    pub signer: Option<Arc<crate::signer::SimSigner>>,
    /// keyraft's own operator commands on `core`, relayed over the
    /// simulated network ([`crate::operator`]).
    pub commands: crate::operator::SimCommands,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Started with `--rejoin` on an empty data dir: its coordinator asks
    /// the leader to take it back.
    pub rejoining: bool,
}

pub type OpsRx = tokio::sync::mpsc::Receiver<CoordinatorRequest>;

/// How a process starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The cluster's first start: every node at once, on empty disks.
    First,
    /// A restart on the data dir its host holds.
    Again,
    /// A restart on an empty data dir (the disk wiped or replaced), with
    /// `--rejoin` or without.
    Wiped { rejoin: bool },
}

/// Why a process did not start.
#[derive(Debug)]
pub enum StartError {
    /// Step 9 refused it (exit code 2): it stays down.
    Refused(String),
    /// Killed (or its host lost power) while it started.
    Stopped,
}

impl Process {
    /// Starts incarnation `inc` on `host`. A start but the cluster's first
    /// asks its peers first whether its data dir holds what they saw of it
    /// (step 9).
    pub async fn start(
        world: &Arc<World>,
        id: NodeId,
        inc: u64,
        how: Start,
    ) -> Result<(Arc<Process>, OpsRx), StartError> {
        let host = world.hosts.get(id).ok_or(StartError::Stopped)?;
        let timing = world.timing;
        // A store that cannot open (or a Raft that cannot start on it) is
        // a key that never signs here again: a violation, unless the
        // process was stopped meanwhile.
        let unopenable = |e: String| {
            if !host.disk.is_current(inc) {
                return StartError::Stopped;
            }
            world.oracle().unopenable(id, &e, world.at_ms());
            StartError::Refused(e)
        };
        let (log, sm, memory) =
            keyraft::raft::store::open_on(host.disk.process(inc), Some(world.committed_hook()))
                .map_err(|e| unopenable(e.to_string()))?;
        let start_holds = log.holds().map_err(|e| unopenable(e.to_string()))?;
        // Whether the data dir is empty, as `server::run` asks the store
        // (an empty disk restarted without `--rejoin` is one too).
        let start_fresh = log.is_fresh().map_err(|e| unopenable(e.to_string()))?;
        let acked = host.acked.last();
        if start_holds.last_index < acked {
            world
                .oracle()
                .lost(id, acked, start_holds.last_index, world.at_ms());
        }
        let log = crate::judged::JudgedLog {
            inner: log,
            acked: host.acked.clone(),
        };
        let cluster = sm.subscribe();
        let config = keyraft::raft::openraft_config(&timing)
            .map_err(|e| StartError::Refused(e.to_string()))?;
        // `--rejoin` on an empty data dir: no vote until the leader took
        // the node back (as `server::run` does for `Bootstrap::Rejoin`).
        let rejoining = how == Start::Wiped { rejoin: true };
        let gate = Arc::new(Gate::new(
            timing.longest_promise(),
            !rejoining,
            timing.start(),
        ));
        let network = Network {
            transport: Arc::new(SimTransport {
                net: world.net.clone(),
                from: id,
                inc,
            }),
            memory: memory.clone(),
            gate: gate.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| unopenable(e.to_string()))?;
        let (ops_tx, ops_rx) = tokio::sync::mpsc::channel(8);
        let service = RaftService::new(
            raft.clone(),
            gate.clone(),
            id,
            cluster.clone(),
            timing,
            memory.clone(),
        );
        let core = Arc::new(Core {
            cfg: world.config(id),
            raft: raft.clone(),
            gate: gate.clone(),
            metrics: keyraft::metrics::Metrics::new("sim", false, &[], &[])
                .map_err(|e| StartError::Refused(e.to_string()))?,
            view: ClusterView::default(),
            local: watch::channel(Local::default()).0,
            cluster: cluster.clone(),
            started: Instant::now(),
            fence_agents: Mutex::new(BTreeMap::new()),
            // One key per chain on every host: a host with another key is
            // a real-process test (tests/chains.rs), not simulated.
            signer_keys: Vec::new(),
            chain_nodes: Default::default(),
            chain_probe_errors: Default::default(),
            heights: Default::default(),
        });
        let p = Arc::new(Process {
            id,
            inc,
            raft,
            gate,
            service,
            memory,
            disk: host.disk.clone(),
            cluster,
            timing,
            net: world.net.clone(),
            started: Instant::now(),
            start_holds,
            start_fresh,
            core: core.clone(),
            signer: world
                .signer_mode
                .then(|| crate::signer::signer(&core, &world.net, id, inc)),
            commands: keyraft::admin::Commands::new(
                core.clone(),
                Arc::new(crate::operator::SimRelay {
                    net: world.net.clone(),
                    from: id,
                    inc,
                    world: Arc::downgrade(world),
                }),
                ops_tx,
            ),
            tasks: Mutex::new(Vec::new()),
            rejoining,
        });
        host.set_process(Some(p.clone()));
        let answered = if how == Start::First {
            None
        } else {
            match p.hello(world, &host, how).await {
                Ok(answered) => Some(answered),
                Err(why) => {
                    if host.is_process(inc) {
                        host.set_process(None);
                    }
                    p.stop();
                    return Err(why);
                }
            }
        };
        if !host.is_process(inc) {
            p.stop();
            return Err(StartError::Stopped);
        }
        if let Some((holds, answered, bootstrap)) = answered {
            world.check_residual(id, holds, &answered);
            // An empty data dir that no peer knew joins as `server::run`
            // has it: initialised with the configured members, its log then
            // replaced by the leader's.
            if matches!(bootstrap, Bootstrap::Initialize | Bootstrap::Join) {
                let _ = p.raft.initialize(world.members()).await;
            }
        }
        p.gate.join();
        // keyraft's own watch of its Raft core: a core that stops ends the
        // process with exit code 8, as `server::run` does.
        let (died_tx, mut died) = watch::channel(None);
        p.spawn(keyraft::raft::core_stopped(p.raft.clone(), died_tx));
        let w = world.clone();
        types::spawn(async move {
            if died.changed().await.is_ok() {
                let why = died.borrow().clone().unwrap_or_default();
                w.core_stopped(id, inc, why);
            }
        });
        // keyraft's own flusher of the member memory; a kill ends it
        // without its last flush, as SIGKILL does.
        let (keep, stop) = keyraft::shutdown::channel();
        let memory = p.memory.clone();
        p.spawn(async move {
            let _keep = keep;
            memory.run_flusher(stop).await
        });
        p.spawn(keyraft::raft::heartbeat_while_leading(
            p.raft.clone(),
            p.gate.clone(),
        ));
        let gossip = p.clone();
        p.spawn(async move { gossip.gossip(timing.gossip_interval).await });
        // keyraft's own `join::register`: once, as a voter with a leader.
        let registers = p.clone();
        p.spawn(async move { keyraft::join::register(&registers.core, &registers.commands).await });
        Ok((p, ops_rx))
    }

    pub fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = types::spawn(f);
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(h);
    }

    /// Ends every task of this process and its Raft (a kill: nothing flushed).
    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let raft = self.raft.clone();
        types::spawn(async move {
            let _ = raft.shutdown().await;
        });
    }

    pub fn metrics(&self) -> Metrics {
        {
            use openraft::async_runtime::watch::WatchReceiver;
            self.raft.metrics().borrow_watched().clone()
        }
    }

    /// Step 9 at start, keyraft's own `join::bootstrap`: a majority of the
    /// peers must answer, none may have seen more of this node than its
    /// data dir holds; it asks again every 500 ms until answered. Returns
    /// what the data dir holds and what each peer that answered last
    /// remembered of this node.
    #[allow(clippy::type_complexity)]
    async fn hello(
        &self,
        world: &Arc<World>,
        host: &Host,
        how: Start,
    ) -> Result<(Holds, BTreeMap<NodeId, Remembered>, Bootstrap), StartError> {
        let holds = self.start_holds;
        let ask = Ask {
            net: self.net.clone(),
            from: self.id,
            inc: self.inc,
            answers: Mutex::new(BTreeMap::new()),
        };
        let mut cfg = world.config(self.id);
        cfg.rejoin = how == Start::Wiped { rejoin: true };
        let fresh = self.start_fresh;
        let decided = keyraft::join::bootstrap(&cfg, &ask, fresh, holds);
        // A kill or a power loss ends the start (polled, as the process
        // has no other way to learn it here).
        let stopped = async {
            while host.is_process(self.inc) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            biased;
            r = decided => match r {
                Ok(b) => Ok((holds, ask.answers.into_inner().unwrap_or_else(|p| p.into_inner()), b)),
                Err(refused) => Err(StartError::Refused(refused.0)),
            },
            () = stopped => Err(StartError::Stopped),
        }
    }

    /// This process's answer to `peer`'s Hello (keyraft's own
    /// `gossip::hello_reply`).
    pub async fn hello_reply(
        &self,
        peer: NodeId,
        holds: Holds,
    ) -> Result<pb::HelloReply, &'static str> {
        keyraft::gossip::hello_reply(&self.core, &*self.memory, peer, Some(holds)).await
    }

    /// Gossip: this process's status to every peer, every interval (a
    /// peer's role is what its certificate proves, "validator" here).
    async fn gossip(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            // keyraft's own record (what a process remembers of its peers
            // reaches them by the Hello instead).
            let status = keyraft::gossip::core_status(&self.core, self.start_holds);
            for peer in self.net_peers() {
                let (s, from) = (status.clone(), self.id);
                let net = self.net.clone();
                let inc = self.inc;
                types::spawn(async move {
                    let _ = net
                        .exchange(from, inc, peer, every * 2, move |p| {
                            let s = s.clone();
                            Box::pin(async move {
                                p.core.view.prove_role(from, "validator");
                                p.core.view.record(s, None);
                            })
                        })
                        .await;
                });
            }
        }
    }

    fn net_peers(&self) -> Vec<NodeId> {
        let m = self.metrics();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id)
            .collect()
    }

    /// The leader, if alive: this node with a recent quorum ack, or the
    /// leader a follower heard from within the election timeout (as
    /// keyraft's `Shared::leader`).
    /// The voters of the membership this process holds.
    pub fn voters(&self) -> std::collections::BTreeSet<NodeId> {
        self.metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.core.leader()
    }

    // keyraft's Raft service (src/raft/server.rs); its answers as the
    // gRPC client tells them apart (see `Failed`).

    async fn serve_append(
        &self,
        peer: NodeId,
        rpc: AppendEntriesRequest<Types>,
        stamp: Stamp,
    ) -> Result<AppendEntriesResponse<Types>, Failed> {
        answered(
            self.service
                .append_entries(peer, rpc, stamp.leader_durable, stamp.promise_ms)
                .await,
        )
    }

    async fn serve_vote(
        &self,
        peer: NodeId,
        rpc: VoteRequest<Types>,
        pre: bool,
    ) -> Result<VoteResponse<Types>, Failed> {
        answered(self.service.vote(peer, rpc, pre).await)
    }

    async fn serve_transfer(
        &self,
        peer: NodeId,
        rpc: TransferLeaderRequest<Types>,
    ) -> Result<TransferLeaderResponse<Types>, Failed> {
        answered(self.service.transfer_leader(peer, rpc).await)
    }

    async fn serve_snapshot(
        &self,
        peer: NodeId,
        vote: Vote,
        snapshot: SnapshotOf<Types, Vec<u8>>,
        promise_ms: u32,
    ) -> Result<SnapshotResponse<Types>, Failed> {
        answered(
            self.service
                .install_snapshot(peer, vote, snapshot, promise_ms)
                .await,
        )
    }
}

/// What the simulated peer's Raft service returned, as keyraft's gRPC
/// client maps it (`raft::peers`): a passing refusal
/// (status unavailable) and openraft's own error are unreachable, any
/// other refusal a network error.
pub enum Failed {
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

/// A Hello over the simulated network, and each peer's last answer.
struct Ask {
    net: Net,
    from: NodeId,
    inc: u64,
    answers: Mutex<BTreeMap<NodeId, Remembered>>,
}

impl keyraft::join::Ask for Ask {
    async fn hello(&self, id: NodeId, holds: Holds) -> Option<pb::HelloReply> {
        let from = self.from;
        let r = self
            .net
            .exchange(from, self.inc, id, Duration::from_secs(1), move |p| {
                Box::pin(async move { p.hello_reply(from, holds).await })
            })
            .await
            .ok()?
            .ok()?;
        let seen = keyraft::join::seen_by(id, &r);
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, seen);
        Some(r)
    }
}

pub use keyraft::node::{leads_within as leads, quorum_ack_age};

/// keyraft's [`Transport`] for one process: each Raft message runs the
/// receiving process's Raft service over [`crate::net`], its failures as
/// keyraft's gRPC client maps them ([`Failed`]).
pub struct SimTransport {
    net: Net,
    from: NodeId,
    inc: u64,
}

fn unreachable(why: impl std::fmt::Display) -> RPCError<Types> {
    RPCError::Unreachable(Unreachable::from_string(why.to_string()))
}

impl SimTransport {
    async fn call<R: Send + 'static>(
        &self,
        to: NodeId,
        ttl: Duration,
        f: impl Fn(Arc<Process>) -> Boxed<Result<R, Failed>> + Send + Sync + 'static,
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

impl Transport for SimTransport {
    fn self_id(&self) -> NodeId {
        self.from
    }

    /// The simulated network finds a peer by its id.
    fn learn(&self, _target: NodeId, _node: &BasicNode) {}

    async fn append(
        &self,
        to: NodeId,
        rpc: &AppendEntriesRequest<Types>,
        stamp: Stamp,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<Types>, RPCError<Types>> {
        let (from, req) = (self.from, rpc.clone());
        self.call(to, ttl, move |p| {
            let req = req.clone();
            Box::pin(async move { p.serve_append(from, req, stamp).await })
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
            Box::pin(async move { p.serve_vote(from, req, pre).await })
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
            Box::pin(async move { p.serve_transfer(from, req).await })
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
            Box::pin(async move { p.serve_snapshot(from, vote, snapshot, promise_ms).await })
        })
        .await
    }
}
