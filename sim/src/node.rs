//! One keyraft process: real openraft with keyraft's openraft
//! configuration (`raft::openraft_config`), the real vote and leadership
//! gate (`raft::Gate`), the real heartbeat timer
//! (`raft::heartbeat_while_leading`), the real ledger, and step 9's real
//! rule (`raft::memory::behind`) at start and on every vote answer. Its
//! Raft service is keyraft's own (`raft::server::RaftService`), and its
//! client is keyraft's own too (`raft::network::PeerConnection`, with its
//! rules of what an answer shows of a peer), over [`crate::net`] instead of
//! gRPC: the simulator supplies only the transport
//! (`ports::SimTransport`).
//!
//! Its `keyraft::node::Core` is the one keyraft's coordinator runs on
//! (`crate::coordinator`), with keyraft's own status records (`Local`,
//! `ClusterView`) carried by this process's gossip.
//!
//! A restart runs keyraft's own step 9 (`join::bootstrap`), asking each
//! peer over [`crate::net`], whose `gossip::hello_reply` answers.
//!
//! Owns: a process's start, what the network reaches on it ([`Port`]) and
//! its gossip. Must not: touch the validator; the coordinator does,
//! through the host's model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyraft::config::{Config, Timing};
use keyraft::join::Bootstrap;
use keyraft::ledger::ClusterState;
use keyraft::node::{ClusterView, CoordinatorRequest, Core, Local};
use keyraft::pb;
use keyraft::raft::memory::{Holds, Memory, Remembered};
use keyraft::raft::network::Network;
use keyraft::raft::server::RaftService;
use keyraft::raft::store::StateMachine;
use keyraft::raft::Gate;
use openraft::BasicNode;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::disk::Disk;
use crate::host::{Host, Runs};
use crate::judge::Judge;
use crate::net::Net;
use crate::ports::{addr, ChangeHook, Port, SimCommands, SimRelay, SimSigner, SimTransport};
use crate::types::{self, Metrics, NodeId, Raft};

pub struct Process {
    pub id: NodeId,
    pub inc: u64,
    pub raft: Raft,
    pub gate: Arc<Gate>,
    pub disk: Disk,
    pub cluster: watch::Receiver<ClusterState>,
    pub timing: Timing,
    pub net: Net<Process>,
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
    pub signer: Option<Arc<SimSigner<Process>>>,
    /// What it confirmed to the leader (`signer::confirm`), in its memory.
    confirmed: std::sync::Mutex<keyraft::signer::confirm::Memory>,
    /// keyraft's own operator commands on `core`, relayed over the
    /// simulated network (`ports::SimRelay`).
    pub commands: SimCommands<Process>,
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

/// What a process is started with: its host, the network, the run's
/// judge, its configuration, and what it tells the run.
pub struct Birth {
    pub host: Arc<Host<Process>>,
    pub net: Net<Process>,
    pub judge: Arc<Judge>,
    /// Its configuration: the run's timing, its peers, a chain in signer
    /// mode.
    pub config: Config,
    /// A membership change is about to be asked of openraft.
    pub change_begins: ChangeHook,
    /// keyraft's Raft core stopped (`raft::core_stopped`), with why.
    pub core_stopped: Arc<dyn Fn(String) + Send + Sync>,
}

/// The configured members of `cfg`, as `raft.initialize` takes them.
pub fn members(cfg: &Config) -> BTreeMap<NodeId, BasicNode> {
    cfg.peers
        .iter()
        .map(|(id, a)| (*id, BasicNode::new(a.clone())))
        .chain([(cfg.id, BasicNode::new(addr(cfg.id)))])
        .collect()
}

impl Runs for Process {
    fn inc(&self) -> u64 {
        self.inc
    }
}

impl Port for Process {
    fn raft(&self) -> &RaftService<StateMachine, Memory> {
        &self.service
    }

    fn signer(&self) -> Option<&Arc<SimSigner<Process>>> {
        self.signer.as_ref()
    }

    fn commands(&self) -> &SimCommands<Process> {
        &self.commands
    }

    fn confirm(
        &self,
        from: NodeId,
        ask: &keyraft::pb::ConfirmRequest,
    ) -> Result<keyraft::pb::ConfirmReply, tonic::Status> {
        keyraft::signer::serve_confirm(&self.core, &self.confirmed, from, ask)
    }
}

impl Process {
    /// Starts incarnation `inc` on `birth.host`. A start but the cluster's
    /// first asks its peers first whether its data dir holds what they saw
    /// of it (step 9).
    pub async fn start(
        birth: Birth,
        inc: u64,
        how: Start,
    ) -> Result<(Arc<Process>, OpsRx), StartError> {
        let Birth {
            host,
            net,
            judge,
            config: cfg,
            change_begins,
            core_stopped,
        } = birth;
        let (id, timing) = (cfg.id, cfg.timing);
        // A store that cannot open (or a Raft that cannot start on it) is
        // a key that never signs here again: a violation, unless the
        // process was stopped meanwhile.
        let unopenable = |e: String| {
            if !host.disk.is_current(inc) {
                return StartError::Stopped;
            }
            judge.oracle().unopenable(id, &e, judge.at_ms());
            StartError::Refused(e)
        };
        let (log, sm, memory) =
            keyraft::raft::store::open_on(host.disk.process(inc), Some(judge.committed_hook()))
                .map_err(|e| unopenable(e.to_string()))?;
        let start_holds = log.holds().map_err(|e| unopenable(e.to_string()))?;
        // Whether the data dir is empty, as `server::run` asks the store
        // (an empty disk restarted without `--rejoin` is one too).
        let start_fresh = log.is_fresh().map_err(|e| unopenable(e.to_string()))?;
        let acked = host.acked.last();
        if start_holds.last_index < acked {
            judge
                .oracle()
                .lost(id, acked, start_holds.last_index, judge.at_ms());
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
                net: net.clone(),
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
            cfg: cfg.clone(),
            raft: raft.clone(),
            gate: gate.clone(),
            metrics: keyraft::metrics::Metrics::new("sim", false, &[], &[])
                .map_err(|e| StartError::Refused(e.to_string()))?,
            view: ClusterView::default(),
            local: watch::channel(Local::default()).0,
            cluster: cluster.clone(),
            started: Instant::now(),
            fence_agents: Mutex::new(BTreeMap::new()),
            // One key per chain on every host (the signer fills in its
            // address): a host with another key is a real-process test
            // (tests/chains.rs), not simulated.
            roster: std::sync::RwLock::new(Arc::new(keyraft::node::Roster {
                chains: cfg.signer.iter().flat_map(|s| s.chains.clone()).collect(),
                keys: Vec::new(),
            })),
            chain_nodes: Default::default(),
            upgrade: Default::default(),
            chain_probe_errors: Default::default(),
            key_failures: Default::default(),
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
            net: net.clone(),
            started: Instant::now(),
            start_holds,
            start_fresh,
            core: core.clone(),
            signer: cfg
                .signer
                .is_some()
                .then(|| crate::signer::signer(&core, &net, id, inc)),
            confirmed: Default::default(),
            commands: keyraft::admin::Commands::new(
                core.clone(),
                Arc::new(SimRelay {
                    net: net.clone(),
                    from: id,
                    inc,
                    change_begins,
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
            match p.hello(&cfg, &host, how).await {
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
            judge.check_residual(id, holds, &answered);
            // An empty data dir that no peer knew joins as `server::run`
            // has it: initialised with the configured members, its log then
            // replaced by the leader's.
            if matches!(bootstrap, Bootstrap::Initialize | Bootstrap::Join) {
                let _ = p.raft.initialize(members(&cfg)).await;
            }
        }
        p.gate.join();
        // keyraft's own watch of its Raft core: a core that stops ends the
        // process with exit code 8, as `server::run` does.
        let (died_tx, mut died) = watch::channel(None);
        p.spawn(keyraft::raft::core_stopped(p.raft.clone(), died_tx));
        types::spawn(async move {
            if died.changed().await.is_ok() {
                let why = died.borrow().clone().unwrap_or_default();
                core_stopped(why);
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
        config: &Config,
        host: &Host<Process>,
        how: Start,
    ) -> Result<(Holds, BTreeMap<NodeId, Remembered>, Bootstrap), StartError> {
        let holds = self.start_holds;
        let ask = Ask {
            net: self.net.clone(),
            from: self.id,
            inc: self.inc,
            answers: Mutex::new(BTreeMap::new()),
        };
        let mut cfg = config.clone();
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
                Err(refused) => Err(StartError::Refused(refused.to_string())),
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
}

/// A Hello over the simulated network, and each peer's last answer.
struct Ask {
    net: Net<Process>,
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
