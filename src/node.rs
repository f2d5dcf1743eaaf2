//! What a running node is made of, as its parts see it: the handles they
//! share ([`Shared`]), what this coordinator says about itself ([`Local`],
//! [`StateName`]), what peers last said ([`ClusterView`]), and the one
//! request channel into the state machine ([`CoordinatorRequest`]).
//!
//! Owns: plain data and read-only views over Raft metrics (who leads, who
//! has quorum). Must not: start anything or decide anything; the wiring is
//! [`crate::server`], the decisions are [`crate::coordinator`]'s. `admin`,
//! `gossip` and the state machine all depend on this module, and it on none
//! of them, so that each can be read alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::storage::RaftStateMachine;
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{ChainConfig, Config, NodeId};
use crate::health::{Health, HeightMemory};
use crate::ledger::ClusterState;
use crate::metrics::Metrics;
use crate::pb;
use crate::raft::memory::{Holds, Memory};
use crate::raft::peers::Peers;
use crate::raft::store::StateMachine;
use crate::raft::{self, Gate};
use crate::tls::{CertInfo, ServerTls};

/// Whether the kernel fence is on for this host's validator: shown as
/// `on`, or `off: why`, in `keyraft status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelFenceState {
    On,
    Off(String),
}

impl fmt::Display for KernelFenceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelFenceState::On => f.write_str("on"),
            KernelFenceState::Off(why) => write!(f, "off: {why}"),
        }
    }
}

/// The coordinator's state names, as shown in status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateName {
    #[default]
    Startup,
    Syncing,
    Registering,
    Voting,
    Validating,
    Shutdown,
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What this coordinator tells the rest of the process (and, by gossip,
/// the cluster) about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Local {
    pub state: StateName,
    pub key_linked: bool,
    pub validator: Option<Health>,
    pub eligible: bool,
    /// The program the node was last started as, and why it does not run
    /// the one the cluster committed for it, if it does not.
    pub binary: Option<String>,
    pub binary_refused: Option<String>,
}

/// Operator requests that only the coordinator can carry out.
pub enum CoordinatorRequest {
    Switchover {
        to: Option<NodeId>,
        reply: oneshot::Sender<Result<String, SwitchoverRefused>>,
    },
}

/// Why a switchover was not done (`keyraft switchover`'s error line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchoverRefused {
    #[error("the cluster is paused (no handovers): run `keyraft resume` first")]
    Paused,
    #[error("this node is not the leader")]
    NotLeader,
    #[error("this node still holds the key: it was not released (its validator's stop was not proven); the next leader will wait out the lease")]
    StillHolds,
    #[error("node {0} is not another voting member")]
    NotAVoter(NodeId),
    #[error("node {0} is not a healthy, synced, eligible standby right now: {1}")]
    NotReady(NodeId, Unready),
    #[error("no healthy, synced standby to hand over to ({})", unready_list(.0))]
    NoneReady(Vec<(NodeId, Unready)>),
    #[error("the validator was stopped, but its stop was not proven or the release not committed: node {0} takes over after the lease")]
    Unproven(NodeId),
    #[error("coordinator is shutting down")]
    ShuttingDown,
}

/// Why a voter cannot take over now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unready {
    #[error("not heard from lately")]
    NotHeard,
    #[error("a witness")]
    Witness,
    #[error("its node is not running and synced")]
    NotSynced,
    #[error("it may not lead now (just handed over, not a voter yet, its signer key is outvoted or fails to sign, or it runs another mode than the cluster)")]
    MayNotLead,
    #[error("no recent heartbeat ack")]
    NoAck,
    #[error("the chain is halted for an upgrade its node does not run")]
    NotUpgraded,
}

fn unready_list(nodes: &[(NodeId, Unready)]) -> String {
    let each: Vec<String> = nodes
        .iter()
        .map(|(id, why)| format!("node {id}: {why}"))
        .collect();
    each.join("; ")
}

/// What the coordinator needs of its node, and nothing that reaches a
/// socket or a file: its configuration, Raft, the gate, the metrics, what
/// peers last said, what it says of itself, the replicated state. Built by
/// [`crate::server`] inside [`Shared`], and by the simulator (`sim/`) on
/// its own Raft, so that both run the same [`crate::coordinator`].
pub struct Core<SM: RaftStateMachine<raft::TypeConfig> = StateMachine> {
    pub cfg: Config,
    /// keyraft's state machine on a real node; the simulator's its own.
    pub raft: openraft::Raft<raft::TypeConfig, SM>,
    pub gate: Arc<Gate>,
    pub metrics: Metrics,
    pub view: ClusterView,
    pub local: watch::Sender<Local>,
    pub cluster: watch::Receiver<ClusterState>,
    /// On tokio's clock (the simulator's, under it).
    pub started: Instant,
    /// Fence agents: what the last run for each member ended with.
    pub fence_agents: Mutex<BTreeMap<NodeId, String>>,
    /// Signer mode: the chains this host signs for now, and its key's
    /// address for each (a reload replaces them: read with
    /// [`Core::roster`], never from `cfg.signer`, which is the start's).
    pub roster: std::sync::RwLock<Arc<Roster>>,
    /// Signer mode, several chains: what each chain's node on this host
    /// (its `node-rpc`) last reported, while it answers.
    pub chain_nodes: Arc<watch::Sender<BTreeMap<String, Health>>>,
    /// What this host's cosmovisor tree and node say of the chain's next
    /// (or last) upgrade, with `--upgrades cosmovisor`.
    pub upgrade: Arc<watch::Sender<Option<crate::upgrade::Report>>>,
    /// Signer mode: why each chain's node probe last failed, while it
    /// fails (the chain's status and `keyraft_chain_node_up` show it).
    pub chain_probe_errors: Arc<Mutex<BTreeMap<String, String>>>,
    /// Signer mode: why each chain's key last failed to sign, while it
    /// fails (a token that does not answer): this host may not lead.
    pub key_failures: Arc<Mutex<BTreeMap<String, String>>>,
    /// Signer mode: what this process remembers of the heights reported
    /// for each chain (for the height limit).
    pub heights: HeightMemory,
}

/// Handles shared by the coordinator, the servers and the background
/// tasks: the [`Core`] (named as such, `sh.core.raft`: a task that needs
/// only the core takes the core, as `tuning` does) and what only a real
/// node has.
pub struct Shared {
    pub core: Arc<Core>,
    pub peers: Arc<Peers>,
    /// What this node remembers of every member's history (step 9).
    pub memory: Arc<Memory>,
    /// What this node's data dir held when it started (step 9).
    pub start_holds: Holds,
    /// What the Raft log's writer has made durable (fsyncs, entries).
    pub synced: Arc<crate::raft::Synced>,
    /// Set when a peer told this node it was refused (its data dir went
    /// back in time): the node stops, exit code 2.
    pub refused: watch::Sender<Option<String>>,
    pub requests: mpsc::Sender<CoordinatorRequest>,
    /// Signer mode: which nodes' privval ports this host is connected to.
    pub privval: PrivvalLinks,
    /// What the validator probe last failed with (`None` while it answers).
    pub probe_error: watch::Receiver<Option<String>>,
    /// The kernel fence on this host.
    pub kernel_fence: KernelFenceState,
    /// The peer port's TLS acceptor (`None` with `--insecure`).
    pub tls: Option<Arc<ServerTls>>,
    /// The certificates in use: node and CA (`None` with `--insecure`).
    pub certs: Mutex<Option<(CertInfo, CertInfo)>>,
}

/// Signer mode: the privval connections of this host, by node address.
#[derive(Debug, Default)]
pub struct PrivvalLinks(Mutex<BTreeMap<String, bool>>);

impl PrivvalLinks {
    pub fn set(&self, node: &str, up: bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), up);
    }

    pub fn remove(&self, node: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    pub fn get(&self, node: &str) -> bool {
        self.snapshot().get(node).copied().unwrap_or(false)
    }

    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Signer mode: the chains this host signs for, in the configuration's
/// order, and the address of its key for each (what gossip compares).
/// Empty outside signer mode.
#[derive(Debug, Default)]
pub struct Roster {
    pub chains: Vec<ChainConfig>,
    pub keys: Vec<pb::ChainKey>,
}

impl Roster {
    pub fn chain(&self, chain_id: &str) -> Option<&ChainConfig> {
        self.chains.iter().find(|c| c.chain_id == chain_id)
    }
}

impl<SM: RaftStateMachine<raft::TypeConfig>> Core<SM> {
    /// Signer mode's chains and keys now ([`Roster`]).
    pub fn roster(&self) -> Arc<Roster> {
        self.roster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This node's timing with the values in force now (the cluster's
    /// profile, with auto timing) in place of those it started with.
    pub fn timing(&self) -> crate::config::Timing {
        let l = self.gate.live();
        crate::config::Timing {
            profile: l.profile,
            heartbeat: l.heartbeat,
            election_min: l.election_min,
            election_max: l.election_max,
            fence_after: l.fence_after,
            handover_delay: l.handover_delay,
            ..self.cfg.timing
        }
    }

    /// A copy of openraft's latest metrics (never hold the borrow).
    pub fn raft_metrics(&self) -> raft::Metrics {
        self.with_raft_metrics(raft::Metrics::clone)
    }

    /// Runs `f` on openraft's metrics in place, without a copy (they hold
    /// the membership and every replication's progress). `f` must not
    /// wait or read another watch: a borrow held while a second is taken
    /// waits forever on a queued writer.
    pub fn with_raft_metrics<R>(&self, f: impl FnOnce(&raft::Metrics) -> R) -> R {
        f(&self.raft.metrics().borrow_watched())
    }

    /// Every other node we know of: configured peers and members.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        let mut ids: BTreeSet<NodeId> = self.cfg.peers.keys().copied().collect();
        self.with_raft_metrics(|m| {
            ids.extend(m.membership_config.membership().nodes().map(|(id, _)| *id))
        });
        ids.remove(&self.cfg.id);
        ids.into_iter().collect()
    }

    /// Whether this node leads with a quorum behind it: openraft's leader,
    /// with a quorum ack younger than the lease (`election_timeout_max`).
    ///
    /// openraft keeps a leader cut off from its peers in `Leader` until it
    /// hears a higher term, even with CheckQuorum (it only refuses new
    /// proposals). Such a node can commit nothing and its validator is
    /// fenced by then, so keyraft stops counting it as leader everywhere it
    /// reports one (status, gossip, `keyraft_raft_leader`, `/leader`).
    pub fn leads(&self, m: &raft::Metrics) -> bool {
        leads_within(m, self.timing().election_max)
    }

    /// openraft's server state as keyraft reports it: `LeaderWithoutQuorum`
    /// for a leader that [`Self::leads`] no more.
    pub fn raft_state(&self, m: &raft::Metrics) -> String {
        if m.running_state.is_err() {
            "Stopped".to_string()
        } else if m.state == ServerState::Leader && !self.leads(m) {
            "LeaderWithoutQuorum".to_string()
        } else {
            format!("{:?}", m.state)
        }
    }

    /// The leader, if it is alive: this node with a recent quorum ack, or
    /// the leader a follower heard from within the election timeout.
    pub fn leader(&self) -> Option<NodeId> {
        let m = self.raft_metrics();
        let limit = self.timing().election_max;
        if m.state == ServerState::Leader {
            self.leads(&m).then_some(self.cfg.id)
        } else {
            m.current_leader
                .filter(|_| self.gate.since_leader_contact().is_some_and(|d| d < limit))
        }
    }

    /// Whether a majority of the voters (this node included) is up and
    /// connected, as seen by gossip. It says nothing about who leads.
    pub fn has_quorum(&self) -> bool {
        let voters: Vec<NodeId> = self
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.is_empty() {
            return false;
        }
        let fresh = self.view.fresh_ids(self.cfg.timing.gossip_interval * 3);
        let up = voters
            .iter()
            .filter(|v| **v == self.cfg.id || fresh.contains(v))
            .count();
        up * 2 > voters.len()
    }
}

impl Shared {
    /// `keyraft_upgrade_*`: present while this host's node has not passed
    /// the upgrade it reports.
    fn refresh_upgrade_gauges(&self) {
        let g = &self.core.metrics;
        g.upgrade_pending.reset();
        g.upgrade_ready.reset();
        let height = self.core.local.borrow().validator.and_then(|h| h.height);
        if let Some(r) = self.core.upgrade.borrow().as_ref() {
            if height.is_none_or(|h| h <= r.height) {
                g.upgrade_pending
                    .with_label_values(&[&r.name])
                    .set(r.height as i64);
                g.upgrade_ready
                    .with_label_values(&[&self.core.cfg.id.to_string()])
                    .set(i64::from(r.installed));
            }
        }
    }

    /// Sets the Raft gauges (called when `/metrics` is scraped, rather than
    /// on every heartbeat).
    pub fn refresh_raft_gauges(&self) {
        let m = self.core.raft_metrics();
        let g = &self.core.metrics;
        g.raft_term.set(m.current_term as i64);
        g.raft_leader.set(i64::from(self.core.leads(&m)));
        g.signing.set(i64::from(
            self.core.cfg.signer.is_some() && self.core.leads(&m),
        ));
        if self.core.cfg.signer.is_some() {
            let roster = self.core.roster();
            let cluster = self.core.cluster.borrow();
            let answering = self.core.chain_nodes.borrow();
            for c in roster.chains.iter().filter(|c| c.node_rpc.is_some()) {
                let up = answering.contains_key(&c.chain_id);
                g.chain_node_up
                    .with_label_values(&[&c.chain_id])
                    .set(i64::from(up));
            }
            for chain in roster.chains.iter().map(|c| c.chain_id.as_str()) {
                let height = cluster
                    .watermark(chain)
                    .map_or(-1, |w| w.signed().map_or(w.height, |s| s.height) as i64);
                g.signer_watermark.with_label_values(&[chain]).set(height);
            }
        }
        self.refresh_upgrade_gauges();
        g.raft_last_log_index
            .set(m.last_log_index.map_or(-1, |i| i as i64));
        g.raft_applied_index
            .set(m.last_applied.map_or(-1, |l| l.index as i64));
        let (syncs, entries) = self.synced.take();
        g.raft_log_syncs.inc_by(syncs);
        g.raft_log_entries_synced.inc_by(entries);
        g.quorum.set(i64::from(self.core.has_quorum()));
        g.raft_running.set(i64::from(m.running_state.is_ok()));
        let age = if m.state == ServerState::Leader {
            quorum_ack_age(&m)
        } else {
            self.core.gate.since_leader_contact()
        };
        g.quorum_ack_age
            .set(age.map_or(f64::NAN, |a| a.as_secs_f64()));
        if let Some((node, ca)) = &*self.certs.lock().unwrap_or_else(|p| p.into_inner()) {
            for (label, c) in [("node", node), ("ca", ca)] {
                g.tls_cert_expiry
                    .with_label_values(&[label])
                    .set(c.expires_in());
            }
        }
    }
}

/// How long since the heartbeat a quorum last acked was sent (`None`
/// when not leading). Generic so that the simulator (`sim/`) reads its
/// own nodes' metrics with it.
pub fn quorum_ack_age<C: openraft::RaftTypeConfig>(
    m: &openraft::RaftMetrics<C>,
) -> Option<Duration> {
    use openraft::Instant as _;
    m.last_quorum_acked.as_ref().map(|t| t.elapsed())
}

/// On a leader, how long since each member last acked a heartbeat or an
/// append (`None` inside: never); empty when not leading. Generic for the
/// simulator, as [`quorum_ack_age`] is.
pub fn ack_ages<C: openraft::RaftTypeConfig>(
    m: &openraft::RaftMetrics<C>,
) -> std::collections::BTreeMap<C::NodeId, Option<Duration>> {
    use openraft::Instant as _;
    m.heartbeat
        .iter()
        .flatten()
        .map(|(id, t)| (id.clone(), t.as_ref().map(|t| t.elapsed())))
        .collect()
}

/// Leading with a quorum ack younger than `limit` ([`Shared::leads`]).
pub fn leads_within<C: openraft::RaftTypeConfig>(
    m: &openraft::RaftMetrics<C>,
    limit: Duration,
) -> bool {
    m.state == ServerState::Leader && quorum_ack_age(m).is_some_and(|age| age < limit)
}

/// Milliseconds since the Unix epoch on this host's wall clock (for
/// comparing clocks only: leases use monotonic time).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What this node last heard from a peer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: pb::NodeStatus,
    pub at: Instant,
    pub rtt: Option<Duration>,
}

/// The latest status of every peer, as gossiped. Advisory only: it picks
/// handover targets and feeds `status`; safety never rests on it.
#[derive(Default)]
pub struct ClusterView {
    peers: Mutex<BTreeMap<NodeId, Seen>>,
    /// The role each peer's certificate carries, as its last call here
    /// proved it (under `--insecure`, what it says of itself).
    roles: Mutex<BTreeMap<NodeId, String>>,
}

impl ClusterView {
    /// Remembers the role peer `id`'s certificate carries.
    pub fn prove_role(&self, id: NodeId, role: &str) {
        let mut roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        if roles.get(&id).map(String::as_str) != Some(role) {
            roles.insert(id, role.to_string());
        }
    }

    /// Records what peer `status.id` said, keeping its last round-trip time
    /// when this answer brought none. Its role is the one its certificate
    /// proved, never what it says ("unproven" until it called here once).
    pub fn record(&self, mut status: pb::NodeStatus, rtt: Option<Duration>) {
        status.role = self
            .roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&status.id)
            .cloned()
            .unwrap_or_else(|| "unproven".into());
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let rtt = rtt.or_else(|| peers.get(&status.id).and_then(|s| s.rtt));
        peers.insert(
            status.id,
            Seen {
                status,
                at: Instant::now(),
                rtt,
            },
        );
    }

    pub fn snapshot(&self) -> BTreeMap<NodeId, Seen> {
        self.with_peers(BTreeMap::clone)
    }

    /// Runs `f` on every peer's latest status, in place (under the view's
    /// lock: `f` must not wait or take another of the view's locks).
    pub fn with_peers<R>(&self, f: impl FnOnce(&BTreeMap<NodeId, Seen>) -> R) -> R {
        f(&self.peers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether each of `ids` said, when last heard from (however long
    /// ago), that it has `feature`. A peer never heard from has not.
    pub fn all_have(&self, ids: impl IntoIterator<Item = NodeId>, feature: &str) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        ids.into_iter().all(|id| {
            peers
                .get(&id)
                .is_some_and(|s| s.status.features.iter().any(|f| f == feature))
        })
    }

    /// Whether peer `id`, when last heard from, said what `f` looks for.
    pub fn said(&self, id: NodeId, f: impl Fn(&pb::NodeStatus) -> bool) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&id).is_some_and(|s| f(&s.status))
    }

    /// The ids of the peers heard from within `max_age`.
    pub fn fresh_ids(&self, max_age: Duration) -> BTreeSet<NodeId> {
        self.with_peers(|seen| {
            seen.iter()
                .filter(|(_, s)| s.at.elapsed() <= max_age)
                .map(|(id, _)| *id)
                .collect()
        })
    }

    /// Peers heard from within `max_age` (copied: a status is large).
    pub fn fresh(&self, max_age: Duration) -> Vec<pb::NodeStatus> {
        self.snapshot()
            .into_values()
            .filter(|s| s.at.elapsed() <= max_age)
            .map(|s| s.status)
            .collect()
    }
}
