//! The coordinator: one state machine per host that decides, with Raft, when
//! this host's validator runs with the key. [`crate::server`] builds it and
//! calls [`Coordinator::run`].
//!
//! States (kuutamod's names, so dashboards carry over):
//!
//! - `Startup`: the validator node is starting as a plain full node.
//! - `Syncing`: it answers but is not synced; this node may not campaign.
//! - `Registering`: synced, but not (yet, or any more) a voter: a fresh node
//!   waiting for the leader's log, or one rejoining after losing its data.
//! - `Voting`: an eligible standby. It campaigns when the leader goes quiet
//!   and, once elected, activates (DESIGN.md steps 2-4).
//! - `Validating`: the validator runs with the key, under a lease renewed
//!   from Raft's quorum acks and enforced by the guard process (step 5).
//!   Never entered in signer mode, where the Raft leader in `Voting` signs
//!   (see [`crate::signer`]) and every node runs keyless.
//! - `Shutdown`: stopping; the key is released first.
//!
//! Owns: the safety protocol's ordering (commit, wait, lease, link, start;
//! and kill before unlink before release). Must not: block (every slow step
//! is bounded and raced against shutdown and leadership loss) or trust
//! anything but Raft for the right to validate; gossip only picks handover
//! targets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::ServerState;
use tokio::sync::{mpsc, watch};

use crate::admin;
use crate::config::{ActivateBy, NodeId};
use crate::fence;
use crate::fence::ValidatorEvent;
use crate::health::Health;
use crate::node::{quorum_ack_age, CoordinatorRequest, Local, Shared, StateName};
use crate::pb;
use crate::raft::{self, ClusterState, Command};
use crate::supervisor::Validator;

enum State {
    Startup,
    Syncing,
    Registering,
    Voting,
    Validating { term: u64 },
    Shutdown,
}

impl State {
    fn name(&self) -> StateName {
        match self {
            State::Startup => StateName::Startup,
            State::Syncing => StateName::Syncing,
            State::Registering => StateName::Registering,
            State::Voting => StateName::Voting,
            State::Validating { .. } => StateName::Validating,
            State::Shutdown => StateName::Shutdown,
        }
    }
}

pub struct Coordinator {
    sh: Arc<Shared>,
    node: Option<Validator>,
    health_rx: Option<watch::Receiver<Option<Health>>>,
    raft_rx: WatchReceiverOf<raft::TypeConfig, raft::Metrics>,
    cluster_rx: watch::Receiver<ClusterState>,
    requests: mpsc::Receiver<CoordinatorRequest>,
    shutdown: watch::Receiver<bool>,
    rejoining: bool,
    /// After a handover: do not campaign or take leadership back until then.
    stand_down_until: Option<Instant>,
    next_campaign: Instant,
    /// After a failed activation attempt: not before then.
    next_activation: Instant,
    /// Heartbeats paused to hand leadership on (see `publish`).
    quiet: std::cell::Cell<bool>,
    /// Random extra wait before campaigning, redrawn after each campaign.
    jitter: Duration,
    /// The term in which this node, leading but unable to validate, last
    /// handed leadership on (see [`Coordinator::hand_on`]).
    handed_on_in: Option<u64>,
}

/// The next unasked validator event (never resolves on a witness).
async fn validator_event(node: &mut Option<Validator>) -> ValidatorEvent {
    match node {
        Some(n) => n.event().await,
        None => std::future::pending().await,
    }
}

/// The next health change (never resolves on a witness).
async fn health_changed(rx: &mut Option<watch::Receiver<Option<Health>>>) {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// A small random extra wait before campaigning, for when two standbys
/// disagree on their ranks (see [`Coordinator::campaign_rank`]).
fn campaign_jitter(election_min: Duration) -> Duration {
    Duration::from_millis(rand::random_range(
        0..=(election_min.as_millis() as u64 / 10).max(1),
    ))
}

async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Coordinator {
    /// A coordinator in `Startup`; `node` and its channels are `None` on a witness.
    pub fn new(
        sh: Arc<Shared>,
        node: Option<Validator>,
        health_rx: Option<watch::Receiver<Option<Health>>>,
        requests: mpsc::Receiver<CoordinatorRequest>,
        shutdown: watch::Receiver<bool>,
        rejoining: bool,
    ) -> Coordinator {
        let election_min = sh.cfg.timing.election_min;
        Coordinator {
            raft_rx: sh.raft.metrics(),
            cluster_rx: sh.cluster.clone(),
            sh,
            node,
            health_rx,
            requests,
            shutdown,
            rejoining,
            stand_down_until: None,
            next_campaign: Instant::now(),
            next_activation: Instant::now(),
            quiet: std::cell::Cell::new(false),
            jitter: campaign_jitter(election_min),
            handed_on_in: None,
        }
    }

    /// Runs the state machine until shutdown has released the key.
    pub async fn run(&mut self) {
        let mut state = State::Startup;
        loop {
            self.publish(state.name());
            tracing::info!(state = %state.name(), "coordinator state");
            state = match state {
                State::Startup => self.startup().await,
                State::Syncing => self.syncing().await,
                State::Registering => self.registering().await,
                State::Voting => self.voting().await,
                State::Validating { term } => self.validating(term).await,
                State::Shutdown => {
                    self.shutdown().await;
                    return;
                }
            };
        }
    }

    /// The validator's health as this host sees it: `None` on a witness,
    /// not running if the process is down or does not answer.
    fn health(&self) -> Option<Health> {
        let node = self.node.as_ref()?;
        let probed = self.health_rx.as_ref().and_then(|h| *h.borrow());
        Some(match (node.sup.running(), probed) {
            (Some(_), Some(h)) => h,
            _ => Health::default(),
        })
    }

    fn is_voter(&self) -> bool {
        self.sh
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.sh.cfg.id)
    }

    /// Safety protocol step 1: campaign only while eligible. In signer
    /// mode leading means signing, not validating: the local node's health
    /// does not matter (every sentry's requests reach the leader), and its
    /// death only moves this host back to Startup, from where it hands
    /// leadership on.
    fn eligible(&self, state: StateName) -> bool {
        matches!(state, StateName::Voting | StateName::Validating)
            && !self.sh.cfg.witness
            && (self.sh.cfg.signer.is_some() || self.health().is_some_and(|h| h.healthy()))
            && !self.cluster_rx.borrow().paused
            && self.stand_down_until.is_none_or(|t| Instant::now() >= t)
            && self.is_voter()
    }

    /// Publishes state, eligibility and health to gossip, status and metrics,
    /// and sets openraft's election switch. Returns eligibility.
    fn publish(&self, state: StateName) -> bool {
        let eligible = self.eligible(state);
        // openraft's own election timer stays off (`enable_elect: false`):
        // only `maybe_campaign` starts elections, when this node is
        // eligible, its restart quiet is over (a restarted node has
        // forgotten the lease it promised: it neither votes, by the gate,
        // nor campaigns until `election_timeout_max` has passed) and its
        // turn among the standbys has come.
        self.sh.gate.set_accepts_leadership(eligible);
        // A leader that may not validate steps down by going quiet: with its
        // heartbeats off, an eligible standby's campaign succeeds once the
        // lease runs out. (A leadership transfer could do it faster, but
        // openraft never abandons a transfer to a node that then dies.)
        // With nobody able to take over, it keeps leading: that is harmless.
        let leader = self.sh.raft_metrics().state == ServerState::Leader;
        if leader {
            self.sh.gate.leading();
        }
        let quiet = leader
            && !eligible
            && state != StateName::Validating
            && self.standby(None, false).is_ok();
        self.sh.raft.runtime_config().heartbeat(!quiet);
        if quiet != self.quiet.replace(quiet) && quiet {
            tracing::info!("leader but not eligible to validate: pausing heartbeats so that an eligible standby takes over");
        }
        let health = self.health();
        let key_linked = self.node.as_ref().is_some_and(|n| n.linked);
        self.sh.local.send_if_modified(|l| {
            let new = Local {
                state,
                key_linked,
                validator: health,
                eligible,
            };
            let changed = *l != new;
            *l = new;
            changed
        });
        let m = &self.sh.metrics;
        m.set_state(&state.to_string());
        m.key_linked.set(i64::from(key_linked));
        m.paused.set(i64::from(self.cluster_rx.borrow().paused));
        if let Some(h) = health {
            m.validator_up.set(i64::from(h.running));
            m.validator_synced.set(i64::from(h.synced));
            if let Some(height) = h.height {
                m.validator_height.set(height as i64);
            }
        }
        eligible
    }

    /// A validator exit nobody asked for. Returns false if the news is
    /// about a validator already replaced (nothing changed).
    async fn on_exit(&mut self, ev: &ValidatorEvent) -> bool {
        let Some(node) = &mut self.node else {
            return false;
        };
        match ev {
            ValidatorEvent::Fenced(pid, how) => {
                tracing::error!(pid, "guard fenced the validator: {how}");
                if !node.sup.mark_exited(*pid) {
                    return false;
                }
            }
            ValidatorEvent::Exited(pid, how) => {
                if !node.sup.mark_exited(*pid) {
                    tracing::debug!(pid, "exit of an earlier validator ({how})");
                    return false;
                }
                tracing::warn!(pid, "validator node exited ({how})");
            }
            ValidatorEvent::GuardLost => {
                // Its parent-death signal killed only the validator's first
                // process; a wrapper's node may live on. Kill the tree here.
                tracing::error!("the guard process died: killing the validator's tree from here");
                if let Err(e) = node.replace_guard().await {
                    tracing::error!("{e}");
                }
            }
        }
        self.sh.metrics.validator_restarts.inc();
        node.backoff();
        true
    }

    /// Requests in states where this node does not validate.
    async fn idle_request(&mut self, req: CoordinatorRequest) {
        let CoordinatorRequest::Switchover { to, reply } = req;
        let m = self.sh.raft_metrics();
        let r = if m.state != ServerState::Leader {
            Err("this node is not the leader".to_string())
        } else if self.cluster_rx.borrow().key_holder() == Some(self.sh.cfg.id) {
            // A handover whose stop was not proven left the key unreleased.
            Err("this node still holds the key: it was not released (its validator's stop was not proven); the next leader will wait out the lease".to_string())
        } else {
            match self.handover_target(to) {
                Ok(t) => {
                    let _ = self.sh.raft.trigger().transfer_leader(t).await;
                    Ok(if self.sh.cfg.signer.is_some() {
                        format!("signing leadership handed to node {t}")
                    } else {
                        format!("no node was validating; leadership handed to node {t}")
                    })
                }
                Err(e) => Err(e),
            }
        };
        let _ = reply.send(r);
    }

    /// A standby to hand leadership to by transfer: see [`Self::standby`].
    fn handover_target(&self, want: Option<NodeId>) -> Result<NodeId, String> {
        self.standby(want, true)
    }

    /// A healthy, synced, eligible standby voter, per gossip (the one asked
    /// for, if any). With `acked`, on the leader it must also have acked a
    /// heartbeat lately: a transfer to a node that just died leaves
    /// openraft's leader stuck.
    fn standby(&self, want: Option<NodeId>, acked: bool) -> Result<NodeId, String> {
        if self.cluster_rx.borrow().paused {
            return Err("the cluster is paused (no handovers): run `keyraft resume` first".into());
        }
        let m = self.sh.raft_metrics();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let recent = self.sh.cfg.timing.heartbeat * 5;
        let live = |id: NodeId| match &m.heartbeat {
            _ if !acked => true,
            None => true,
            Some(acks) => {
                use openraft::Instant as _;
                acks.get(&id)
                    .copied()
                    .flatten()
                    .is_some_and(|t| t.elapsed() < recent)
            }
        };
        let seen = self.sh.view.snapshot();
        let stale = self.sh.cfg.timing.gossip_interval * 3;
        // Every other voter, with the reason it cannot take over, if any.
        let mut candidates: Vec<(NodeId, u64, Option<&'static str>)> = Vec::new();
        for &id in voters.iter().filter(|v| **v != self.sh.cfg.id) {
            let s = seen
                .get(&id)
                .filter(|s| s.at.elapsed() <= stale)
                .map(|s| &s.status);
            let height = s.and_then(|s| s.validator.as_ref()).map_or(0, |v| v.height);
            let why = match s {
                None => Some("not heard from lately"),
                Some(s) if s.role == "witness" => Some("a witness"),
                Some(s) if !s.validator.as_ref().is_some_and(|v| v.running && v.synced) => {
                    Some("its node is not running and synced")
                }
                Some(s) if !s.eligible => {
                    Some("it may not validate now (just handed over, or not a voter yet)")
                }
                Some(_) if !live(id) => Some("no recent heartbeat ack"),
                Some(_) => None,
            };
            candidates.push((id, height, why));
        }
        let explain = || {
            candidates
                .iter()
                .filter_map(|(id, _, why)| why.map(|w| format!("node {id}: {w}")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match want {
            Some(id) => match candidates.iter().find(|c| c.0 == id) {
                Some((_, _, None)) => Ok(id),
                Some((_, _, Some(why))) => Err(format!(
                    "node {id} is not a healthy, synced, eligible standby right now: {why}"
                )),
                None => Err(format!("node {id} is not another voting member")),
            },
            None => candidates
                .iter()
                .filter(|c| c.2.is_none())
                .max_by_key(|c| c.1)
                .map(|c| c.0)
                .ok_or_else(|| {
                    format!("no healthy, synced standby to hand over to ({})", explain())
                }),
        }
    }

    async fn startup(&mut self) -> State {
        if self.node.is_none() {
            return State::Registering;
        }
        loop {
            if let Some(node) = &mut self.node {
                node.ensure_running(false).await;
            }
            self.publish(StateName::Startup);
            if self.health().is_some_and(|h| h.running) {
                return State::Syncing;
            }
            let retry = self
                .node
                .as_ref()
                .map_or(Instant::now(), |n| n.next_start)
                .max(Instant::now() + Duration::from_millis(200));
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return State::Shutdown,
                ev = validator_event(&mut self.node) => { self.on_exit(&ev).await; }
                _ = health_changed(&mut self.health_rx) => {}
                _ = self.raft_rx.changed() => {}
                Some(req) = self.requests.recv() => self.idle_request(req).await,
                _ = tokio::time::sleep_until(retry.into()) => {}
            }
        }
    }

    async fn syncing(&mut self) -> State {
        loop {
            self.publish(StateName::Syncing);
            match self.health() {
                Some(h) if h.healthy() => return State::Registering,
                Some(h)
                    if !h.running
                        && self
                            .node
                            .as_ref()
                            .is_some_and(|n| n.sup.running().is_none()) =>
                {
                    return State::Startup
                }
                _ => {}
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return State::Shutdown,
                ev = validator_event(&mut self.node) => if self.on_exit(&ev).await { return State::Startup },
                _ = health_changed(&mut self.health_rx) => {}
                _ = self.raft_rx.changed() => {}
                Some(req) = self.requests.recv() => self.idle_request(req).await,
            }
        }
    }

    async fn registering(&mut self) -> State {
        let mut next_try = Instant::now();
        loop {
            self.publish(StateName::Registering);
            if let Some(h) = self.health() {
                if !h.healthy() {
                    return State::Syncing;
                }
            }
            let m = self.sh.raft_metrics();
            if self.rejoining {
                if Instant::now() >= next_try && m.current_leader.is_some() {
                    next_try = Instant::now() + Duration::from_secs(2);
                    let cmd = pb::ClusterCommand {
                        kind: Some(pb::cluster_command::Kind::Rejoin(pb::Member {
                            id: self.sh.cfg.id,
                            addr: self.sh.cfg.advertise.clone(),
                        })),
                    };
                    tracing::info!(
                        "asking leader {:?} to take this node back as a learner",
                        m.current_leader
                    );
                    match admin::execute(&self.sh, cmd, admin::NODE_REQUEST_DEADLINE).await {
                        Ok(msg) => {
                            tracing::info!("{msg}");
                            self.rejoining = false;
                            self.sh.gate.open_votes();
                        }
                        Err(e) => tracing::warn!("rejoin: {}", e.message()),
                    }
                }
            } else if self.is_voter() {
                return State::Voting;
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return State::Shutdown,
                ev = validator_event(&mut self.node) => if self.on_exit(&ev).await { return State::Startup },
                _ = health_changed(&mut self.health_rx) => {}
                _ = self.raft_rx.changed() => {}
                Some(req) = self.requests.recv() => self.idle_request(req).await,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn voting(&mut self) -> State {
        loop {
            let eligible = self.publish(StateName::Voting);
            if let Some(h) = self.health() {
                if !h.healthy() {
                    return if h.running {
                        State::Syncing
                    } else {
                        State::Startup
                    };
                }
            }
            if !self.is_voter() {
                return State::Registering;
            }
            let m = self.sh.raft_metrics();
            let mut recheck = Duration::from_secs(1);
            if m.state == ServerState::Leader {
                // Signer mode: the leader signs; no key is ever linked.
                let signer = self.sh.cfg.signer.is_some();
                // A leader fresh from its election has no quorum ack yet,
                // and openraft refuses proposals until it has one.
                let acked = self.sh.leads(&m);
                if eligible && !signer && acked && Instant::now() >= self.next_activation {
                    return self.activate(m.current_term).await;
                }
                if !eligible {
                    self.hand_on(&m).await;
                }
                // Fresh from its election: the first ack is a round trip away.
                recheck = if m.last_quorum_acked.is_none() {
                    Duration::from_millis(5)
                } else {
                    self.sh.cfg.timing.heartbeat
                };
            } else if eligible {
                recheck = self.maybe_campaign(&m, false).await;
            } else if !self.cluster_rx.borrow().paused && self.standby(None, false).is_ok() {
                recheck = self.maybe_campaign(&m, true).await;
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return State::Shutdown,
                ev = validator_event(&mut self.node) => if self.on_exit(&ev).await { return State::Startup },
                _ = health_changed(&mut self.health_rx) => {}
                _ = self.raft_rx.changed() => {}
                _ = self.cluster_rx.changed() => {}
                _ = self.sh.gate.nudged() => {}
                Some(req) = self.requests.recv() => self.idle_request(req).await,
                _ = tokio::time::sleep(recheck) => {}
            }
        }
    }

    /// A leader that may not validate (a witness elected to bring a
    /// standby's log up to date, say) hands leadership to an eligible
    /// standby as soon as that standby holds every entry, once per term.
    /// Going quiet (see `publish`) would also get there, a whole lease
    /// later; it stays as the fallback if the transfer goes nowhere.
    async fn hand_on(&mut self, m: &raft::Metrics) {
        // Never while this node holds the key unreleased: its validator's
        // death is not proven (DESIGN.md: no Released, no transfer), and a
        // successor elected by transfer would not wait out its lease.
        let holder = self.cluster_rx.borrow().key_holder() == Some(self.sh.cfg.id);
        if holder || self.handed_on_in == Some(m.current_term) || !self.sh.leads(m) {
            return;
        }
        let Ok(target) = self.handover_target(None) else {
            return;
        };
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned().flatten())
            .map(|l| l.index);
        if m.last_log_index.is_none() || matched < m.last_log_index {
            return; // Replication is under way; the next metrics change rechecks.
        }
        self.handed_on_in = Some(m.current_term);
        tracing::info!(
            target,
            term = m.current_term,
            "leading without being able to validate: node {target} holds every entry now, handing leadership to it"
        );
        let _ = self.sh.raft.trigger().transfer_leader(target).await;
    }

    /// Campaigns (with pre-vote) as soon as the leader's lease on this node
    /// has run out, instead of waiting another random election timeout.
    /// Returns how long until it is worth checking again.
    ///
    /// With `last_resort`, this node may not validate (a witness, or one
    /// standing down) but an eligible standby exists: it can lose every
    /// vote to a node holding entries it lacks (a witness's, say). Then this
    /// node stands, leads just long enough to bring the standby's log up to
    /// date, and hands leadership to it ([`Self::hand_on`]). It stands as
    /// soon as the lease is over if such a standby asked it for a vote
    /// lately (the refusal says why: see [`raft::Gate::saw_behind_candidate`]),
    /// and otherwise after twice the lease without a leader.
    async fn maybe_campaign(&mut self, m: &raft::Metrics, last_resort: bool) -> Duration {
        let t = self.sh.cfg.timing;
        let now = Instant::now();
        if now < self.next_campaign {
            return self.next_campaign - now;
        }
        if !self.sh.gate.may_grant_votes()
            || !matches!(m.state, ServerState::Follower | ServerState::Candidate)
        {
            return t.election_min;
        }
        let quiet = self
            .sh
            .gate
            .since_any_leader()
            .unwrap_or_else(|| self.sh.started.elapsed());
        let behind = self.sh.gate.behind_candidate(t.election_max * 2);
        let due = match (last_resort, behind) {
            (false, _) => t.election_max + (t.election_min / 2) * self.campaign_rank(m),
            (true, Some(_)) => t.election_max,
            (true, None) => t.election_max * 2,
        } + self.jitter;
        if quiet < due {
            return (due - quiet).max(Duration::from_millis(10));
        }
        if let (true, Some(candidate)) = (last_resort, behind) {
            tracing::info!(
                quiet_ms = quiet.as_millis() as u64,
                candidate,
                "node {candidate} cannot win with a log behind this node's: standing for election to catch it up and hand over"
            );
        } else if last_resort {
            tracing::warn!(
                quiet_ms = quiet.as_millis() as u64,
                "no leader for twice the lease although a standby could validate: standing for election to catch it up"
            );
        } else {
            tracing::info!(
                quiet_ms = quiet.as_millis() as u64,
                "leader silent past its lease: campaigning"
            );
        }
        let _ = self.sh.raft.trigger().elect(true).await;
        // The retry after a lost or split vote keeps the ranks' stagger.
        self.next_campaign =
            Instant::now() + t.election_min + (t.election_min / 2) * self.campaign_rank(m);
        // A fresh jitter for the next round, so two standbys rarely collide.
        self.jitter = campaign_jitter(t.election_min);
        t.election_min
    }

    /// This node's place among the standbys that could take over, by node
    /// id, as gossip shows them (the silent leader left out): the first
    /// campaigns as soon as the lease is over, each next one half an
    /// election timeout later, so that two standbys campaigning in the same
    /// instant do not split the vote and both wait another round. Random
    /// jitter alone let that happen in about one failover in twenty.
    fn campaign_rank(&self, m: &raft::Metrics) -> u32 {
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let stale = self.sh.cfg.timing.gossip_interval * 3;
        let ahead = self.sh.view.snapshot().into_iter().filter(|(id, s)| {
            *id < self.sh.cfg.id
                && Some(*id) != m.current_leader
                && voters.contains(id)
                && s.at.elapsed() <= stale
                && s.status.eligible
                && s.status.role != "witness"
        });
        ahead.count() as u32
    }

    /// Sends the guard the lease deadline as it stands now. With the lease
    /// lapsed, or the guard unreachable, deactivates and returns the next
    /// state instead.
    async fn renew_lease(&mut self) -> Result<u64, State> {
        let deadline = match lease_deadline(&self.sh, None) {
            Some(d) => d,
            None => {
                tracing::warn!(
                    "lease expired: no quorum ack within {:?}",
                    self.sh.cfg.timing.fence_after
                );
                return Err(self.deactivate("lease").await);
            }
        };
        let Some(node) = &mut self.node else {
            return Err(State::Voting);
        };
        if let Err(e) = node.sup.lease(Some(deadline)).await {
            // A guard that does not take the lease cannot be trusted to
            // enforce it: presumed broken (deactivate replaces it).
            tracing::error!("the guard did not take the lease: {e}");
            return Err(self.deactivate("guard").await);
        }
        Ok(deadline)
    }

    fn still_leader(&self, term: u64) -> bool {
        let m = self.sh.raft_metrics();
        m.state == ServerState::Leader && m.current_term == term
    }

    /// Waits `d` unless leadership of `term` is lost or shutdown comes first.
    async fn hold(&mut self, d: Duration, term: u64) -> Result<(), State> {
        let until = tokio::time::Instant::now() + d;
        loop {
            if !self.still_leader(term) {
                return Err(State::Voting);
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return Err(State::Shutdown),
                _ = tokio::time::sleep_until(until) => return Ok(()),
                _ = self.raft_rx.changed() => {}
            }
        }
    }

    /// A height watermark on top of the lease: the new validator must not
    /// sign a block height the previous holder may have signed. Waits until
    /// this host's node reports a height above every height the previous
    /// holder could have reached: the one it released at, the last it
    /// gossiped, and the one this node saw now that the handover is
    /// committed (the old validator was dead before that).
    async fn wait_for_new_height(
        &mut self,
        prior: Option<raft::KeyEvent>,
        previous: Option<NodeId>,
        term: u64,
    ) -> Result<(), State> {
        let Some(prior) = prior else {
            return Ok(()); // Nobody in this cluster ever held the key.
        };
        let Some(node) = &self.node else {
            return Ok(());
        };
        if !node.cfg.height_watermark {
            return Ok(()); // --no-height-watermark: the lease alone.
        }
        let prober = node.prober.clone();
        let gossiped = previous.and_then(|p| {
            self.sh
                .view
                .snapshot()
                .get(&p)
                .and_then(|s| s.status.validator.as_ref().map(|v| v.height))
        });
        let now = prober.probe().await.ok().and_then(|h| h.height);
        let Some(watermark) = [prior.height, gossiped, now].into_iter().flatten().max() else {
            tracing::warn!("no block heights known (health probe without heights): activating without a height watermark");
            return Ok(());
        };
        let started = Instant::now();
        let mut warned = Duration::ZERO;
        loop {
            if !self.still_leader(term) {
                return Err(State::Voting);
            }
            if prober
                .probe()
                .await
                .ok()
                .and_then(|h| h.height)
                .is_some_and(|h| h > watermark)
            {
                tracing::info!(
                    watermark,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "chain is past the previous holder's heights"
                );
                return Ok(());
            }
            if started.elapsed() >= warned + Duration::from_secs(10) {
                warned = started.elapsed();
                tracing::warn!(
                    watermark,
                    "waiting for the chain to pass height {watermark} before signing (a chain that only advances when this validator signs stalls here)"
                );
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return Err(State::Shutdown),
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }

    /// Steps 2 to 4: commit, wait out the old lease, arm the guard, link, start.
    async fn activate(&mut self, term: u64) -> State {
        let t = self.sh.cfg.timing;
        let id = self.sh.cfg.id;
        let previous = self.cluster_rx.borrow().key_holder().filter(|n| *n != id);
        // When the previous holder was last heard from as leader (not a
        // witness that led in between to catch this node up).
        let lost_at = previous
            .and_then(|p| self.sh.gate.since_contact_from(p))
            .or_else(|| self.sh.gate.since_leader_contact())
            .map(|d| Instant::now() - d);
        let elected = Instant::now();
        tracing::info!(term, "elected leader: committing activation");
        let write = self
            .sh
            .raft
            .client_write(Command::Activate { node: id, term });
        let prior = tokio::select! {
            _ = shutdown_requested(&mut self.shutdown) => return State::Shutdown,
            r = tokio::time::timeout(t.election_max * 2, write) => match r {
                Ok(Ok(resp)) => resp.data.prior,
                Ok(Err(e)) => {
                    tracing::warn!("activation not committed: {e}");
                    self.next_activation = Instant::now() + t.heartbeat;
                    return State::Voting;
                }
                Err(_) => {
                    tracing::warn!("activation not committed in time");
                    self.next_activation = Instant::now() + t.heartbeat;
                    return State::Voting;
                }
            },
        };
        let committed = Instant::now();
        let clean = prior.is_none_or(|p| p.released);
        if !clean && !t.handover_delay.is_zero() {
            tracing::info!(
                wait_ms = t.handover_delay.as_millis() as u64,
                "waiting out the previous holder's lease"
            );
            if let Err(next) = self.hold(t.handover_delay, term).await {
                return next;
            }
        }
        let held = Instant::now();
        if let Err(next) = self.wait_for_new_height(prior, previous, term).await {
            return next;
        }
        let height_passed = Instant::now();
        let Some(node) = &mut self.node else {
            return State::Voting;
        };
        if node.cfg.activate_by == ActivateBy::Restart && node.sup.running().is_some() {
            if let Err(e) = node.stop_proven(t.stop_timeout, || None).await {
                tracing::error!("cannot stop the standby node: {e}");
                return self.deactivate("validator_exit").await;
            }
        }
        // Arm the guard before the key appears: from here on, a frozen or
        // dead coordinator cannot keep the validator alive past the lease.
        if !self.still_leader(term) {
            return State::Voting;
        }
        if let Err(next) = self.renew_lease().await {
            return next;
        }
        let Some(node) = &mut self.node else {
            return State::Voting;
        };
        if let Err(e) = node.links(true).await {
            tracing::error!("cannot link the key: {e}");
            return self.deactivate("validator_exit").await;
        }
        let started = match (node.cfg.activate_by, node.sup.running()) {
            (ActivateBy::Sighup, Some(_)) => node.sup.sighup().await.map(|_| ()),
            _ => {
                node.next_start = Instant::now();
                node.restarts = 0;
                node.sup.start(&node.cfg.command).await.map(|_| ())
            }
        };
        if let Err(e) = started {
            tracing::error!("cannot start the validator with the key: {e}");
            return self.deactivate("validator_exit").await;
        }
        self.sh.metrics.activations.inc();
        if let (Some(prev), Some(lost)) = (previous, lost_at) {
            let took = lost.elapsed();
            self.sh.metrics.failover_seconds.observe(took.as_secs_f64());
            // Where the time went (README, "Failover budget").
            let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis() as u64;
            tracing::info!(
                from = prev,
                took_ms = took.as_millis() as u64,
                silent_ms = ms(lost, elected),
                commit_ms = ms(elected, committed),
                hold_ms = ms(committed, held),
                height_ms = ms(held, height_passed),
                start_ms = ms(height_passed, Instant::now()),
                "failover complete"
            );
        }
        tracing::info!(term, "VALIDATING");
        State::Validating { term }
    }

    /// Step 5: hold the lease while validating.
    async fn validating(&mut self, term: u64) -> State {
        let t = self.sh.cfg.timing;
        let mut unhealthy_since: Option<Instant> = None;
        loop {
            self.publish(StateName::Validating);
            let m = self.sh.raft_metrics();
            if m.state != ServerState::Leader || m.current_term != term {
                tracing::warn!("lost leadership of term {term}");
                return self.deactivate("leadership").await;
            }
            let deadline = match self.renew_lease().await {
                Ok(d) => d,
                Err(next) => return next,
            };
            let now = fence::mono_now_ns();
            if let Some(node) = &mut self.node {
                node.ensure_running(true).await;
            }
            let healthy = self.health().is_some_and(|h| h.healthy());
            if healthy {
                unhealthy_since = None;
            } else {
                let since = *unhealthy_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= t.unhealthy_grace {
                    match self.handover_target(None) {
                        Ok(target) => {
                            tracing::warn!(
                                "validator unhealthy for {:?}: stepping aside for node {target}",
                                since.elapsed()
                            );
                            return self.handover(term, target).await;
                        }
                        Err(why) => tracing::debug!("validator unhealthy, but {why}"),
                    }
                }
            }
            // The awaits since the renewal can outlast the lease (a thawed
            // host): then wake at once, and the next renewal deactivates.
            let lease_end = Duration::from_nanos(deadline.saturating_sub(now));
            let restart_at = self
                .node
                .as_ref()
                .map(|n| n.next_start)
                .unwrap_or_else(Instant::now);
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return self.release_for_shutdown(term).await,
                ev = validator_event(&mut self.node) => {
                    if self.on_exit(&ev).await {
                        match ev {
                            ValidatorEvent::Fenced(..) => return self.deactivate("lease").await,
                            ValidatorEvent::GuardLost => return self.deactivate("validator_exit").await,
                            ValidatorEvent::Exited(..) => {}
                        }
                    }
                }
                _ = self.raft_rx.changed() => {}
                _ = tokio::time::sleep(lease_end) => {}
                _ = health_changed(&mut self.health_rx) => {}
                _ = self.cluster_rx.changed() => {}
                _ = tokio::time::sleep_until(restart_at.into()), if self.node.as_ref().is_some_and(|n| n.sup.running().is_none()) => {}
                _ = tokio::time::sleep(Duration::from_millis(250)), if unhealthy_since.is_some() => {}
                Some(req) = self.requests.recv() => {
                    let CoordinatorRequest::Switchover { to, reply } = req;
                    match self.handover_target(to) {
                        Ok(target) => {
                            let next = self.handover(term, target).await;
                            let _ = reply.send(Ok(format!("handed over to node {target}")));
                            return next;
                        }
                        Err(why) => { let _ = reply.send(Err(why)); }
                    }
                }
            }
        }
    }

    /// Fencing deactivation: SIGKILL of the whole tree, proven, then
    /// unlink, then a plain full node again. Nothing is released here: a
    /// successor waits out the lease.
    async fn deactivate(&mut self, reason: &'static str) -> State {
        let Some(node) = &mut self.node else {
            return State::Voting;
        };
        let proven = node.kill_proven().await;
        if let Err(e) = node.links(false).await {
            tracing::error!("cannot unlink the key: {e}");
        }
        match proven {
            // The lease may be disarmed only once the tree is proven dead.
            Ok(()) => {
                let _ = node.sup.lease(None).await;
            }
            Err(e) => tracing::error!("{e}"),
        }
        node.next_start = Instant::now();
        self.sh
            .metrics
            .deactivations
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(reason, "DEACTIVATED: validator killed, key unlinked");
        State::Startup
    }

    /// Steps 7 and 8: graceful stop, proof, unlink, commit `Released`, and
    /// only then transfer. Without the release, no transfer: this leader
    /// goes quiet (see `publish`) and the successor waits out the lease.
    async fn handover(&mut self, term: u64, target: NodeId) -> State {
        tracing::info!("handing over to node {target}");
        let released = self.stop_and_release(term, "handover").await;
        self.stand_down_until = Some(Instant::now() + self.sh.cfg.timing.election_max * 2);
        self.publish(StateName::Startup);
        if !released {
            tracing::error!("no release committed: not transferring leadership; the successor waits out the lease");
        } else if let Err(e) = self.sh.raft.trigger().transfer_leader(target).await {
            tracing::error!("transfer of leadership failed: {e}");
        }
        State::Startup
    }

    /// Stops the validator gracefully, proves its tree dead, unlinks, and
    /// commits `Released`. Returns whether the release was committed; it is
    /// not even tried without the proof and the unlink.
    async fn stop_and_release(&mut self, term: u64, reason: &'static str) -> bool {
        let t = self.sh.cfg.timing;
        // The last height the node reached, fresh, for the successor's watermark.
        let mut height = self.health().and_then(|h| h.height);
        if let Some(node) = &mut self.node {
            if let Ok(h) = node.prober.probe().await {
                height = height.max(h.height);
            }
            // Keep the lease alive through a slow graceful stop, as long as
            // this node still leads in `term` with quorum acks.
            let sh = self.sh.clone();
            let renew = move || lease_deadline(&sh, Some(term));
            let proven = node.stop_proven(t.stop_timeout, renew).await;
            if let Err(e) = node.links(false).await {
                tracing::error!("cannot unlink the key: {e}");
            }
            if let Err(e) = proven {
                tracing::error!("not releasing the key: {e}");
                return false;
            }
            let _ = node.sup.lease(None).await;
            if node.linked {
                tracing::error!("not releasing the key: it is still linked");
                return false;
            }
            node.next_start = Instant::now();
            // The node may have signed on through a long graceful stop: the
            // successor must wait past what the chain had reached at its
            // death, which this host's peers now report.
            let peers = self.sh.view.snapshot();
            let seen = peers
                .values()
                .filter_map(|p| p.status.validator.as_ref().map(|v| v.height))
                .max();
            height = height.max(seen);
        }
        self.sh
            .metrics
            .deactivations
            .with_label_values(&[reason])
            .inc();
        let release = self.sh.raft.client_write(Command::Released {
            node: self.sh.cfg.id,
            term,
            height,
        });
        match tokio::time::timeout(t.election_max, release).await {
            Ok(Ok(_)) => {
                tracing::info!("released the key (committed)");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!("release not committed: {e}");
                false
            }
            Err(_) => {
                tracing::warn!("release not committed in time");
                false
            }
        }
    }

    async fn release_for_shutdown(&mut self, term: u64) -> State {
        if self.stop_and_release(term, "shutdown").await {
            if let Ok(target) = self.handover_target(None) {
                tracing::info!("shutting down: handing leadership to node {target}");
                let _ = self.sh.raft.trigger().transfer_leader(target).await;
            }
        }
        State::Shutdown
    }

    async fn shutdown(&mut self) {
        self.publish(StateName::Shutdown);
        self.sh.raft.runtime_config().elect(false);
        if let Some(node) = &mut self.node {
            if let Err(e) = node
                .stop_proven(self.sh.cfg.timing.stop_timeout, || None)
                .await
            {
                tracing::error!("{e}");
            }
            let _ = node.links(false).await;
        }
    }
}

/// The lease deadline, in CLOCK_MONOTONIC ns: the sending time of the last
/// quorum-acked heartbeat plus `fence_after` (step 5), while this node leads
/// (in `term`, if given) and the deadline is still ahead.
fn lease_deadline(sh: &Shared, term: Option<u64>) -> Option<u64> {
    let m = sh.raft_metrics();
    if m.state != ServerState::Leader || term.is_some_and(|t| t != m.current_term) {
        return None;
    }
    // `now` before `age`: a stall between the two reads then moves the
    // deadline earlier, never later.
    let now = fence::mono_now_ns();
    let age = quorum_ack_age(&m)?;
    let deadline =
        now.saturating_sub(age.as_nanos() as u64) + sh.cfg.timing.fence_after.as_nanos() as u64;
    (deadline > now).then_some(deadline)
}
