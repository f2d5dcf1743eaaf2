//! The coordinator, as the simulation runs it: the handlers of
//! `src/coordinator/mod.rs` and `leading.rs` (Voting, activation, the
//! lease, fencing, handover, campaigns), step for step, with every decision
//! taken by the real `coordinator::policy` (eligibility, the voting step,
//! campaign ranks and turns, hand-on, the takeover wait, the key's term,
//! the lease's basis and deadline, the release rule), and every effect on
//! the validator through [`Custody`], the model of the OS boundary.
//!
//! Owns: the order of the safety protocol in the simulation. Must not:
//! decide anything a policy function decides.

use std::sync::Arc;
use std::time::Duration;

use keyraft::coordinator::policy::{self, Peer, View, VotingStep};
use keyraft::health::Health;
use keyraft::ledger::{Command, KeyEvent, NodeId};
use keyraft::node::StateName;
use openraft::ServerState;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::host::Host;
use crate::node::{leads, Process, Status};
use crate::types::Metrics;
use crate::world::World;

/// Operator requests the fault schedule sends.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Switchover,
}

enum State {
    Voting,
    Validating(u64),
}

pub struct Coordinator {
    p: Arc<Process>,
    host: Arc<Host>,
    world: Arc<World>,
    ops: mpsc::UnboundedReceiver<Op>,
    raft_rx: openraft::type_config::alias::WatchReceiverOf<crate::types::Types, Metrics>,
    cluster_rx: tokio::sync::watch::Receiver<keyraft::ledger::ClusterState>,
    rng: SmallRng,
    signer_mode: bool,
    stand_down_until: Option<Instant>,
    next_campaign: Instant,
    next_activation: Instant,
    jitter: Duration,
    handed_on_in: Option<u64>,
}

impl Coordinator {
    pub fn new(
        p: Arc<Process>,
        world: Arc<World>,
        ops: mpsc::UnboundedReceiver<Op>,
        seed: u64,
    ) -> Option<Coordinator> {
        let host = world.hosts.get(p.id)?;
        let mut rng = SmallRng::seed_from_u64(seed);
        let jitter = jitter(&mut rng, world.timing.election_min);
        let mut raft_rx = p.raft.metrics();
        let mut cluster_rx = p.cluster.clone();
        {
            use openraft::async_runtime::watch::WatchReceiver;
            raft_rx.borrow_and_update();
        }
        cluster_rx.borrow_and_update();
        Some(Coordinator {
            raft_rx,
            cluster_rx,
            signer_mode: world.signer_mode,
            p,
            host,
            world,
            ops,
            rng,
            stand_down_until: None,
            next_campaign: Instant::now(),
            next_activation: Instant::now(),
            jitter,
            handed_on_in: None,
        })
    }

    pub async fn run(mut self) {
        let mut state = State::Voting;
        loop {
            self.host.running().await;
            state = match state {
                State::Voting => self.voting().await,
                State::Validating(term) => self.validating(term).await,
            };
        }
    }

    fn metrics(&self) -> Metrics {
        self.p.metrics()
    }

    fn view(&self) -> View {
        let m = self.metrics();
        let t = self.world.timing;
        let peers = self
            .p
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, (s, at))| {
                let peer = Peer {
                    age: at.elapsed(),
                    witness: false,
                    ready: s.ready,
                    eligible: s.eligible,
                    height: s.height,
                };
                (*id, peer)
            })
            .collect();
        let acks = m.heartbeat.as_ref().map(|acks| {
            use openraft::Instant as _;
            acks.iter()
                .map(|(id, at)| (*id, at.map(|a| a.elapsed())))
                .collect()
        });
        View {
            id: self.p.id,
            timing: t,
            witness: false,
            signer_mode: self.signer_mode,
            health: Some(Health {
                running: true,
                synced: true,
                height: Some(self.world.height()),
            }),
            paused: self.p.cluster.borrow().paused,
            standing_down: self.stand_down_until.is_some_and(|u| Instant::now() < u),
            voters: m.membership_config.membership().voter_ids().collect(),
            leader: m.current_leader,
            is_leader: m.state == ServerState::Leader,
            peers,
            acks,
        }
    }

    /// `Coordinator::publish`: eligibility to the gate and gossip, and the
    /// "go quiet" switch of a leader that may not validate.
    fn publish(&mut self, state: StateName) -> bool {
        let view = self.view();
        let eligible = policy::eligible(state, &view);
        self.p.gate.set_accepts_leadership(eligible);
        if view.is_leader {
            self.p.gate.leading();
        }
        let quiet = policy::goes_quiet(state, eligible, &view);
        self.p.gate.set_heartbeats(!quiet);
        let m = self.metrics();
        self.p.local.send_replace(Status {
            eligible,
            ready: true,
            height: self.world.height(),
            leader: m.current_leader,
            term: m.current_term,
        });
        eligible
    }

    /// The one place it waits: Raft, the ledger, the gate's nudge, an
    /// operator request, or the deadline.
    async fn next_event(&mut self, until: Instant) -> Option<Op> {
        use openraft::async_runtime::watch::WatchReceiver;
        let op = tokio::select! {
            biased;
            op = self.ops.recv() => op,
            r = self.raft_rx.changed() => gone(r.is_err()).await,
            r = self.cluster_rx.changed() => gone(r.is_err()).await,
            _ = self.p.gate.nudged() => None,
            _ = tokio::time::sleep_until(until) => None,
        };
        self.host.running().await;
        op
    }

    async fn voting(&mut self) -> State {
        let t = self.world.timing;
        let eligible = self.publish(StateName::Voting);
        let m = self.metrics();
        let view = self.view();
        let acked = leads(&m, t.election_max);
        let due = Instant::now() >= self.next_activation;
        let recheck = match policy::voting_step(eligible, acked, due, &view) {
            VotingStep::Activate => return self.activate(m.current_term).await,
            VotingStep::HandOn => {
                self.hand_on(&m).await;
                t.heartbeat
            }
            VotingStep::Campaign { last_resort } => self.maybe_campaign(&m, last_resort).await,
            VotingStep::Wait => Duration::from_secs(1),
            VotingStep::Lead if m.last_quorum_acked.is_none() => Duration::from_millis(5),
            VotingStep::Lead => t.heartbeat,
        };
        if let Some(Op::Switchover) = self.next_event(Instant::now() + recheck).await {
            self.idle_switchover().await;
        }
        State::Voting
    }

    /// `Coordinator::idle_request`: a leader that does not validate hands
    /// leadership to a standby (signer mode's switchover).
    async fn idle_switchover(&mut self) {
        let m = self.metrics();
        let holds = self.p.cluster.borrow().key_holder() == Some(self.p.id);
        if m.state != ServerState::Leader || holds {
            return;
        }
        if let Ok(target) = policy::standby(&self.view(), None, true) {
            self.world.note(format!(
                "switchover: node {} hands leadership to {target}",
                self.p.id
            ));
            let _ = self.p.raft.trigger().transfer_leader(target).await;
        }
    }

    async fn hand_on(&mut self, m: &Metrics) {
        let holder = self.p.cluster.borrow().key_holder() == Some(self.p.id);
        let Ok(target) = policy::standby(&self.view(), None, true) else {
            return;
        };
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned().flatten())
            .map(|l| l.index);
        let last = m.last_log_index;
        let handed = self.handed_on_in == Some(m.current_term);
        let leads = leads(m, self.world.timing.election_max);
        if policy::may_hand_on(holder, handed, leads, matched, last) {
            self.handed_on_in = Some(m.current_term);
            let _ = self.p.raft.trigger().transfer_leader(target).await;
        }
    }

    async fn maybe_campaign(&mut self, m: &Metrics, last_resort: bool) -> Duration {
        let t = self.world.timing;
        let now = Instant::now();
        if now < self.next_campaign {
            return self.next_campaign - now;
        }
        if !self.p.gate.may_grant_votes()
            || !matches!(m.state, ServerState::Follower | ServerState::Candidate)
        {
            return t.election_min;
        }
        let quiet = self
            .p
            .gate
            .since_any_leader()
            .unwrap_or_else(|| self.p.started.elapsed());
        let behind = self.p.gate.behind_candidate(t.election_max * 2);
        let rank = policy::campaign_rank(&self.view());
        let due = policy::campaign_due(&t, last_resort, behind.is_some(), rank, self.jitter);
        if let Some(left) = policy::campaign_wait(quiet, due, self.p.gate.promised_for()) {
            return left.max(Duration::from_millis(10));
        }
        let _ = self.p.raft.trigger().elect(true).await;
        self.next_campaign = Instant::now() + policy::campaign_retry(&t, rank);
        self.jitter = jitter(&mut self.rng, t.election_min);
        t.election_min
    }

    fn still_leader(&self, term: u64) -> bool {
        let m = self.metrics();
        m.state == ServerState::Leader && m.current_term == term
    }

    async fn hold(&mut self, d: Duration, term: u64) -> Result<(), State> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if !self.still_leader(term) {
                return Err(State::Voting);
            }
            self.next_event(until).await;
        }
        Ok(())
    }

    /// `leading::wait_for_new_height`: past every height the previous
    /// holder could have reached.
    async fn wait_for_new_height(
        &mut self,
        prior: Option<KeyEvent>,
        previous: Option<NodeId>,
        term: u64,
    ) -> Result<(), State> {
        let Some(prior) = prior else {
            return Ok(());
        };
        let gossiped = previous.and_then(|p| {
            self.p
                .view
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&p)
                .map(|(s, _)| s.height)
        });
        let watermark = [prior.height, gossiped, Some(self.world.height())]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        while self.world.height() <= watermark {
            if !self.still_leader(term) {
                return Err(State::Voting);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            self.host.running().await;
        }
        Ok(())
    }

    /// Steps 2 to 4 (`leading::activate`).
    async fn activate(&mut self, term: u64) -> State {
        let t = self.world.timing;
        let id = self.p.id;
        let previous = self.p.cluster.borrow().key_holder().filter(|n| *n != id);
        let write = self
            .p
            .raft
            .client_write(Command::Activate { node: id, term });
        let prior = match tokio::time::timeout(t.election_max * 2, write).await {
            Ok(Ok(resp)) => resp.data.prior,
            _ => {
                self.next_activation = Instant::now() + t.heartbeat;
                return State::Voting;
            }
        };
        let clean = prior.is_none_or(|p| p.released);
        let since_holder = prior
            .filter(|p| !p.released && p.node != id)
            .and_then(|p| self.p.gate.since_contact_from(p.node));
        let wait = policy::takeover_wait(clean, since_holder, self.p.gate.promised_for(), &t);
        if let Err(next) = self.hold(wait, term).await {
            return next;
        }
        if let Err(next) = self.wait_for_new_height(prior, previous, term).await {
            return next;
        }
        if !self.still_leader(term) {
            return State::Voting;
        }
        if let Err(next) = self.renew_lease(Some(term)).await {
            return next;
        }
        Custody(&self.host).start_keyed(&self.world);
        self.world.note(format!(
            "node {id} VALIDATING in term {term} (clean {clean})"
        ));
        State::Validating(term)
    }

    /// `custody::lease_deadline` and `leading::renew_lease`.
    async fn renew_lease(&mut self, term: Option<u64>) -> Result<(), State> {
        let Some(deadline) = lease_deadline(&self.p, &self.world, term) else {
            return Err(self.deactivate("lease").await);
        };
        if Custody(&self.host)
            .arm(&self.world, deadline)
            .await
            .is_err()
        {
            return Err(self.deactivate("guard").await);
        }
        Ok(())
    }

    /// Step 5 (`Coordinator::validating`).
    async fn validating(&mut self, term: u64) -> State {
        self.publish(StateName::Validating);
        let m = self.metrics();
        if !policy::holds_term(m.state == ServerState::Leader, m.current_term, term) {
            return self.deactivate("leadership").await;
        }
        if let Err(next) = self.renew_lease(None).await {
            return next;
        }
        if !self.host.validator_acts(Instant::now()) && self.host.below().validator.is_none() {
            // Fenced by the guard (its lease ran out while this node stalled).
            return self.deactivate("lease").await;
        }
        let lease_end = self.host.below().lease.unwrap_or_else(Instant::now);
        if let Some(Op::Switchover) = self.next_event(lease_end).await {
            if let Ok(target) = policy::standby(&self.view(), None, true) {
                return self.handover(term, target).await;
            }
        }
        State::Validating(term)
    }

    /// Step 6 (`custody::fence`): kill, prove, unlink, and only with the
    /// proof unlease.
    async fn deactivate(&mut self, reason: &str) -> State {
        let c = Custody(&self.host);
        let proven = c.kill_proven(&self.world).await;
        self.host.below().linked = false;
        if proven {
            c.unlease();
        }
        self.world.note(format!(
            "node {} DEACTIVATED ({reason}, proven {proven})",
            self.p.id
        ));
        State::Voting
    }

    /// Steps 7 and 8 (`leading::handover_released`).
    async fn handover(&mut self, term: u64, target: NodeId) -> State {
        let released = self.stop_and_release(term).await;
        self.stand_down_until = Some(Instant::now() + self.world.timing.election_max * 2);
        self.publish(StateName::Startup);
        self.world.note(format!(
            "node {} hands over to {target} (released {released})",
            self.p.id
        ));
        if released {
            let _ = self.p.raft.trigger().transfer_leader(target).await;
        }
        State::Voting
    }

    /// `custody::stop_and_release`.
    async fn stop_and_release(&mut self, term: u64) -> bool {
        let t = self.world.timing;
        let height = self.world.height();
        let c = Custody(&self.host);
        let proven = c
            .stop_proven(&self.world, t.stop_timeout, || {
                lease_deadline(&self.p, &self.world, Some(term))
            })
            .await;
        self.host.below().linked = false;
        let unleased = proven && {
            c.unlease();
            true
        };
        let unlinked = !self.host.below().linked;
        if !policy::may_release(proven, unleased, unlinked) {
            return false;
        }
        let release = self.p.raft.client_write(Command::Released {
            node: self.p.id,
            term,
            height: Some(height),
        });
        matches!(
            tokio::time::timeout(t.election_max, release).await,
            Ok(Ok(_))
        )
    }
}

/// A process whose Raft is gone has no next event (it is being stopped).
async fn gone(gone: bool) -> Option<Op> {
    if gone {
        std::future::pending::<()>().await;
    }
    None
}

fn jitter(rng: &mut SmallRng, election_min: Duration) -> Duration {
    Duration::from_millis(rng.random_range(0..=(election_min.as_millis() as u64 / 10).max(1)))
}

/// `custody::lease_deadline`, on the simulation's clock.
fn lease_deadline(p: &Process, world: &World, term: Option<u64>) -> Option<Instant> {
    let fence_after = world.timing.fence_after;
    keyraft::coordinator::custody::lease_deadline_of(
        &p.metrics(),
        term,
        || world.now_ns(),
        |_| fence_after,
    )
    .map(|ns| world.at_ns(ns))
}

/// The coordinator's calls across the OS boundary (`custody.rs` over
/// `supervisor.rs` and `guard_client.rs`), each bounded as theirs are.
pub struct Custody<'a>(pub &'a Host);

impl Custody<'_> {
    /// The guard takes the lease (and renews the kernel fence's element);
    /// a frozen guard is given `kill_bound` to answer, a dead one fails.
    pub async fn arm(&self, world: &World, deadline: Instant) -> Result<(), ()> {
        let bound = Instant::now() + world.timing.kill_bound;
        loop {
            {
                let mut b = self.0.below();
                if !b.guard_alive {
                    return Err(());
                }
                if !b.guard_frozen {
                    let was = b.kernel.is_some_and(|k| Instant::now() < k);
                    b.lease = Some(deadline);
                    b.kernel = Some(deadline);
                    drop(b);
                    self.0.changed.notify_waiters();
                    if !was {
                        world.usable(self.0.id);
                    }
                    return Ok(());
                }
            }
            if Instant::now() >= bound {
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Link the key and start the validator with it (the guard starts it
    /// only under a live lease).
    pub fn start_keyed(&self, world: &World) {
        {
            let mut b = self.0.below();
            b.linked = true;
            b.validator = Some(crate::host::Validator {
                keyed: true,
                dies_at: None,
            });
        }
        world.usable(self.0.id);
    }

    /// Kill the tree and prove it dead: by the guard, or after
    /// `kill_bound` without its answer by the coordinator itself (which
    /// replaces the guard). False if it is not proven dead in time.
    pub async fn kill_proven(&self, world: &World) -> bool {
        let bound = world.timing.kill_bound;
        let guard_ok = {
            let b = self.0.below();
            b.guard_alive && !b.guard_frozen
        };
        if !guard_ok {
            tokio::time::sleep(bound).await;
            let mut b = self.0.below();
            b.guard_alive = true;
            b.guard_frozen = false;
        }
        self.prove_dead(bound).await
    }

    async fn prove_dead(&self, bound: Duration) -> bool {
        let now = Instant::now();
        if self.0.reap(now) {
            return true;
        }
        match self.0.kill_tree(now) {
            Some(at) if at <= now + bound => {
                tokio::time::sleep_until(at).await;
                self.0.reap(Instant::now())
            }
            _ => {
                tokio::time::sleep(bound).await;
                self.0.reap(Instant::now())
            }
        }
    }

    /// A graceful stop with the lease kept alive (`renew`), proven dead;
    /// SIGKILL after `grace`.
    pub async fn stop_proven(
        &self,
        world: &World,
        grace: Duration,
        mut renew: impl FnMut() -> Option<Instant>,
    ) -> bool {
        let started = Instant::now();
        let exits = started + self.0.below().faults.stop_time;
        while Instant::now() < started + grace {
            // SIGTERM takes effect once the stop's time has passed, unless
            // the tree ignores signals (part of it escaped).
            if Instant::now() >= exits && !self.0.below().faults.unkillable {
                self.0.below().validator = None;
                return true;
            }
            if let Some(d) = renew() {
                if self.arm(world, d).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(world.timing.heartbeat).await;
        }
        self.prove_dead(world.timing.kill_bound).await
    }

    /// Withdraw the guard's lease and the kernel fence's element.
    pub fn unlease(&self) {
        let mut b = self.0.below();
        b.lease = None;
        b.kernel = None;
    }
}
