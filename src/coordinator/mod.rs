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
//!   and, once elected, activates (docs/design.md, steps 2-4).
//! - `Validating`: the validator runs with the key, under a lease renewed
//!   from Raft's quorum acks and enforced by the guard process (step 5).
//!   Never entered in signer mode, where the Raft leader in `Voting` signs
//!   (see [`crate::signer`]) and every node runs keyless.
//! - `Shutdown`: stopping; the key is released first.
//!
//! The rooms: this module holds the state enum, one handler per state and
//! the one place that waits for the next event ([`Coordinator::next_event`]);
//! [`policy`] decides, as pure functions over a snapshot of what this node
//! sees, which `view` assembles; [`custody`] carries out every effect on the validator, in order;
//! [`host`] is the edge of the world as two traits (this host's validator,
//! and what lies outside the process), so that the simulator (`sim/`) runs
//! these same handlers over its models. Time is tokio's clock throughout
//! (the simulator's, under it).
//!
//! Owns: the safety protocol's ordering (commit, wait, lease, link, start;
//! and kill before unlink before release). Must not: block (every slow step
//! is bounded and raced against shutdown and leadership loss) or trust
//! anything but Raft for the right to validate; gossip only picks handover
//! targets.

pub mod custody;
pub mod host;
mod leading;
pub mod policy;
mod view;

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::ServerState;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::fence::ValidatorEvent;
use crate::health::Health;
use crate::ledger::{ClusterState, NodeId};
use crate::node::{CoordinatorRequest, Core, Local, StateName, SwitchoverRefused};
use crate::pb;
use crate::raft;
use crate::shutdown::Shutdown;
use custody::Custody;
use host::{Env, Outside};

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

    fn from_name(name: StateName) -> State {
        match name {
            StateName::Startup => State::Startup,
            StateName::Syncing => State::Syncing,
            StateName::Registering => State::Registering,
            StateName::Voting | StateName::Validating => State::Voting,
            StateName::Shutdown => State::Shutdown,
        }
    }
}

/// What woke the coordinator.
enum Event {
    Shutdown,
    Validator(ValidatorEvent),
    Request(CoordinatorRequest),
    /// Health, Raft metrics, the replicated state or the gate changed.
    Changed,
    /// The deadline the handler asked for.
    Timer,
}

/// What a handler waits for, besides shutdown and Raft metrics changes.
#[derive(Default)]
struct Wake {
    until: Option<Instant>,
    validator: bool,
    health: bool,
    cluster: bool,
    nudge: bool,
    requests: bool,
}

impl Wake {
    /// Everything a state handler listens to, and a deadline.
    fn all(until: Option<Instant>) -> Wake {
        Wake {
            until,
            validator: true,
            health: true,
            cluster: true,
            nudge: true,
            requests: true,
        }
    }
}

pub struct Coordinator<E: Env> {
    sh: Arc<Core<E::Machine>>,
    out: Arc<E::Outside>,
    custody: Custody<E>,
    /// Wakes on health changes (custody reads its own copy).
    health_rx: Option<watch::Receiver<Option<Health>>>,
    raft_rx: WatchReceiverOf<raft::TypeConfig, raft::Metrics>,
    cluster_rx: watch::Receiver<ClusterState>,
    requests: mpsc::Receiver<CoordinatorRequest>,
    shutdown: Shutdown,
    rejoining: bool,
    /// After a handover: do not campaign or take leadership back until then.
    stand_down_until: Option<Instant>,
    next_campaign: Instant,
    /// After a failed activation attempt: not before then.
    next_activation: Instant,
    /// A host to fence before the next activation, whatever the ledger
    /// says (see `fence_previous`).
    owed_fence: Option<NodeId>,
    /// Heartbeats paused to hand leadership on (see `publish`).
    quiet: bool,
    /// Why this host runs another mode than the cluster, as last logged.
    said_other_mode: Option<String>,
    /// The chain's upgrade halt last seen ([`policy::halt_seen`]): it
    /// lasts until a node reports a height past it.
    halt_latch: Option<policy::Halt>,
    /// Random extra wait before campaigning, redrawn after each campaign.
    jitter: Duration,
    /// Where the jitter is drawn from (seeded by the simulator).
    rng: SmallRng,
    /// The term in which this node, leading but unable to validate, last
    /// handed leadership on (see [`Coordinator::hand_on`]).
    handed_on_in: Option<u64>,
}

/// A small random extra wait before campaigning, for when two standbys
/// disagree on their ranks (see [`policy::campaign_rank`]).
fn campaign_jitter(rng: &mut SmallRng, election_min: Duration) -> Duration {
    Duration::from_millis(rng.random_range(0..=(election_min.as_millis() as u64 / 10).max(1)))
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

/// What a [`Coordinator`] is built from.
pub struct Parts<E: Env> {
    pub core: Arc<Core<E::Machine>>,
    pub outside: Arc<E::Outside>,
    /// `None` on a witness, with `health_rx`.
    pub node: Option<E::Host>,
    pub health_rx: Option<watch::Receiver<Option<Health>>>,
    pub requests: mpsc::Receiver<CoordinatorRequest>,
    pub shutdown: Shutdown,
    /// Step 9: this node lost its data dir and asks to be taken back.
    pub rejoining: bool,
    /// Seeds the campaign jitter (random on a real host).
    pub seed: u64,
}

impl<E: Env> Coordinator<E> {
    /// A coordinator in `Startup`.
    pub fn new(p: Parts<E>) -> Coordinator<E> {
        let Parts {
            core: sh,
            outside,
            node,
            health_rx,
            requests,
            shutdown,
            rejoining,
            seed,
        } = p;
        let mut rng = SmallRng::seed_from_u64(seed);
        let jitter = campaign_jitter(&mut rng, sh.timing().election_min);
        Coordinator {
            raft_rx: sh.raft.metrics(),
            cluster_rx: sh.cluster.clone(),
            custody: Custody::new(sh.clone(), outside.clone(), node, health_rx.clone()),
            out: outside,
            health_rx,
            sh,
            requests,
            shutdown,
            rejoining,
            stand_down_until: None,
            next_campaign: Instant::now(),
            next_activation: Instant::now(),
            owed_fence: None,
            quiet: false,
            said_other_mode: None,
            halt_latch: None,
            jitter,
            rng,
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

    /// The one place the coordinator waits: for shutdown, a Raft metrics
    /// change, and whatever else `w` asks for.
    async fn next_event(&mut self, w: Wake) -> Event {
        let timer = async {
            match w.until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.shutdown.requested() => Event::Shutdown,
            ev = self.custody.event(), if w.validator => Event::Validator(ev),
            _ = health_changed(&mut self.health_rx), if w.health => Event::Changed,
            _ = self.raft_rx.changed() => Event::Changed,
            _ = self.cluster_rx.changed(), if w.cluster => Event::Changed,
            _ = self.sh.gate.nudged(), if w.nudge => Event::Changed,
            Some(req) = self.requests.recv(), if w.requests => Event::Request(req),
            _ = timer => Event::Timer,
        }
    }

    /// The event arms every state shares: shutdown, a validator exit (back
    /// to `Startup` if it changed anything, but in signer mode, whose
    /// states keep the node running themselves), a request. `None`: go on.
    async fn common(&mut self, ev: Event) -> Option<State> {
        let signer = self.sh.cfg.signer.is_some();
        self.custody.follow_program().await;
        match ev {
            Event::Shutdown => Some(State::Shutdown),
            // Signer mode keeps its node running from any state: its exit
            // changes nothing else.
            Event::Validator(ev) => (self.on_exit(&ev).await && !signer).then_some(State::Startup),
            Event::Request(req) => {
                self.idle_request(req).await;
                None
            }
            Event::Changed | Event::Timer => None,
        }
    }

    async fn on_exit(&mut self, ev: &ValidatorEvent) -> bool {
        self.custody.on_exit(ev).await
    }

    /// Signer mode: the states past `Startup` keep the host's node running
    /// (started again after its backoff), since its exits send them nowhere.
    async fn keep_signer_node(&mut self) {
        if self.sh.cfg.signer.is_some() {
            self.custody.ensure_running(false).await;
        }
    }

    fn is_voter(&self) -> bool {
        let id = self.sh.cfg.id;
        self.sh.with_raft_metrics(|m| {
            m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id)
        })
    }

    /// Publishes state, eligibility and health to gossip, status and metrics,
    /// and sets the gate's leadership switch. Returns eligibility.
    fn publish(&mut self, state: StateName) -> bool {
        let (view, other_mode) = self.view_and_mode();
        if view.halt != self.halt_latch {
            self.sh.metrics.upgrade_halted.reset();
            match &view.halt {
                Some(h) => {
                    tracing::info!(upgrade = %h.name, height = h.height, "the chain halted for an upgrade: only a host that runs it may lead until a node is past it");
                    self.sh
                        .metrics
                        .upgrade_halted
                        .with_label_values(&[&h.name])
                        .set(1);
                }
                None => tracing::info!("the chain is past its upgrade halt"),
            }
            self.halt_latch = view.halt.clone();
        }
        let eligible = policy::eligible(state, &view);
        if other_mode != self.said_other_mode {
            match &other_mode {
                Some(why) => tracing::error!("this host may not lead: {why}"),
                None => tracing::info!("this host runs the cluster's mode again: it may lead"),
            }
            self.said_other_mode = other_mode;
        }
        // openraft's own election timer stays off (`enable_elect: false`):
        // only `maybe_campaign` starts elections, when this node is
        // eligible, its restart quiet is over (a restarted node has
        // forgotten the lease it promised: it neither votes, by the gate,
        // nor campaigns until `election_timeout_max` has passed) and its
        // turn among the standbys has come.
        self.sh.gate.set_accepts_leadership(eligible);
        if view.is_leader {
            self.sh.gate.leading();
        }
        // A leader that may not validate steps down by going quiet. (A
        // leadership transfer is faster, see `hand_on`, but openraft never
        // abandons a transfer to a node that then dies.)
        let quiet = policy::goes_quiet(state, eligible, &view);
        // Read by the heartbeat timer (`raft::heartbeat_while_leading`);
        // openraft's own switch only governs its tick, which is off.
        self.sh.gate.set_heartbeats(!quiet);
        if quiet && !self.quiet {
            tracing::info!("leader but not eligible to validate: pausing heartbeats so that an eligible standby takes over");
        }
        self.quiet = quiet;
        let health = view.health;
        let key_linked = self.custody.key_linked();
        let (binary, refused) = self.custody.program();
        let binary_refused = refused.map(ToString::to_string);
        self.sh.local.send_if_modified(|l| {
            let new = Local {
                state,
                key_linked,
                validator: health,
                eligible,
                binary,
                binary_refused,
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

    async fn startup(&mut self) -> State {
        if !self.custody.has_validator() {
            return State::Registering;
        }
        loop {
            // Before the first start, so that a restarted keyraft starts
            // its node as the program the cluster committed for it.
            self.custody.follow_program().await;
            self.custody.ensure_running(false).await;
            self.publish(StateName::Startup);
            // Signer mode: started is enough (docs/signer.md: a host's own
            // node does not decide whether it may lead).
            if self.sh.cfg.signer.is_some() {
                return State::Registering;
            }
            if self.custody.health().is_some_and(|h| h.running) {
                return State::Syncing;
            }
            let retry = self
                .custody
                .next_start()
                .max(Instant::now() + Duration::from_millis(200));
            let ev = self
                .next_event(Wake {
                    cluster: false,
                    nudge: false,
                    ..Wake::all(Some(retry))
                })
                .await;
            match ev {
                // A validator exit here only backs the next start off.
                Event::Validator(ev) => {
                    self.on_exit(&ev).await;
                }
                ev => {
                    if let Some(next) = self.common(ev).await {
                        return next;
                    }
                }
            }
        }
    }

    async fn syncing(&mut self) -> State {
        loop {
            self.publish(StateName::Syncing);
            match self.custody.health() {
                Some(h) if h.healthy() => return State::Registering,
                Some(h) if !h.running && !self.custody.running() => return State::Startup,
                _ => {}
            }
            let ev = self
                .next_event(Wake {
                    cluster: false,
                    nudge: false,
                    ..Wake::all(None)
                })
                .await;
            if let Some(next) = self.common(ev).await {
                return next;
            }
        }
    }

    async fn registering(&mut self) -> State {
        let mut next_try = Instant::now();
        loop {
            self.publish(StateName::Registering);
            if policy::unhealthy_exit(self.custody.health(), self.sh.cfg.signer.is_some()).is_some()
            {
                return State::Syncing;
            }
            self.keep_signer_node().await;
            let m = self.sh.raft_metrics();
            if self.rejoining {
                // Its peers may refuse its Raft messages until the leader
                // takes it back (step 9), so gossip may be all it hears.
                let leader = m.current_leader.or_else(|| {
                    let fresh = self.sh.view.fresh(self.sh.cfg.timing.gossip_interval * 3);
                    // A cut-off old leader may still say it leads: the
                    // claim of the highest term wins.
                    fresh
                        .iter()
                        .filter(|s| s.leader == Some(s.id))
                        .max_by_key(|s| s.term)
                        .map(|s| s.id)
                });
                if let Some(leader) = leader.filter(|_| Instant::now() >= next_try) {
                    next_try = Instant::now() + Duration::from_secs(2);
                    self.ask_to_rejoin(leader).await;
                }
            } else if self.is_voter() {
                return State::Voting;
            }
            let until = Instant::now() + Duration::from_millis(500);
            let ev = self
                .next_event(Wake {
                    cluster: false,
                    nudge: false,
                    ..Wake::all(Some(until))
                })
                .await;
            if let Some(next) = self.common(ev).await {
                return next;
            }
        }
    }

    /// Step 9: a node that lost its data dir asks the leader to take it
    /// back as a learner; it votes again once it is one.
    async fn ask_to_rejoin(&mut self, leader: NodeId) {
        let cmd = pb::ClusterCommand {
            kind: Some(pb::cluster_command::Kind::Rejoin(pb::Member {
                id: self.sh.cfg.id,
                addr: self.sh.cfg.advertise.clone(),
            })),
            mode: None,
        };
        tracing::info!("asking leader {leader} to take this node back as a learner");
        match self.out.ask_leader(leader, cmd).await {
            Ok(msg) => {
                tracing::info!("{msg}");
                self.rejoining = false;
                self.sh.gate.open_votes();
            }
            Err(e) => tracing::warn!("rejoin: {}", e.message()),
        }
    }

    async fn voting(&mut self) -> State {
        loop {
            let eligible = self.publish(StateName::Voting);
            if let Some(next) =
                policy::unhealthy_exit(self.custody.health(), self.sh.cfg.signer.is_some())
            {
                return State::from_name(next);
            }
            self.keep_signer_node().await;
            if !self.is_voter() {
                return State::Registering;
            }
            let m = self.sh.raft_metrics();
            let view = self.view();
            let acked = self.sh.leads(&m);
            let due = Instant::now() >= self.next_activation;
            let recheck = match policy::voting_step(eligible, acked, due, &view) {
                policy::VotingStep::Activate => return self.activate(m.current_term).await,
                step => {
                    if step == policy::VotingStep::HandOn {
                        self.hand_on(&m).await;
                    }
                    match step {
                        policy::VotingStep::Campaign { last_resort } => {
                            self.maybe_campaign(&m, last_resort).await
                        }
                        policy::VotingStep::Wait => Duration::from_secs(1),
                        // Fresh from its election: the first ack is a round trip away.
                        _ if m.last_quorum_acked.is_none() => Duration::from_millis(5),
                        _ => self.sh.timing().heartbeat,
                    }
                }
            };
            // A node to start again (signer mode) wakes this state too.
            let until = [Some(Instant::now() + recheck), self.custody.restart_at()]
                .into_iter()
                .flatten()
                .min();
            let ev = self.next_event(Wake::all(until)).await;
            if let Some(next) = self.common(ev).await {
                return next;
            }
        }
    }

    /// Step 5: hold the lease while validating.
    async fn validating(&mut self, term: u64) -> State {
        let t = self.sh.timing();
        let mut unhealthy_since: Option<Instant> = None;
        // The chain's upgrade halt, and the validator's exits since it
        // began.
        let mut at_halt: Option<policy::Halt> = None;
        let mut exits_at_halt: u32 = 0;
        loop {
            self.publish(StateName::Validating);
            let m = self.sh.raft_metrics();
            if !policy::holds_term(m.state == ServerState::Leader, m.current_term, term) {
                tracing::warn!("lost leadership of term {term}");
                return self.deactivate("leadership").await;
            }
            let deadline = match self.renew_lease().await {
                Ok(d) => d,
                Err(next) => return next,
            };
            let now = self.out.mono_now_ns();
            self.custody.ensure_running(true).await;
            // As `publish` saw it at the top of this turn.
            let halt = self.halt_latch.clone();
            if halt != at_halt {
                if halt.is_some() {
                    tracing::info!("validating at the chain's upgrade halt: holding the key while the node restarts and migrates");
                }
                at_halt = halt.clone();
                exits_at_halt = 0;
            }
            if self.custody.health().is_some_and(|h| h.healthy()) {
                unhealthy_since = None;
            } else {
                let since = *unhealthy_since.get_or_insert_with(Instant::now);
                let step = policy::while_unhealthy(
                    since.elapsed(),
                    t.unhealthy_grace,
                    halt.is_some(),
                    exits_at_halt,
                );
                if step == policy::WhileUnhealthy::StepAside {
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
            let lease_end = Instant::now() + Duration::from_nanos(deadline.saturating_sub(now));
            let until = [
                Some(lease_end),
                self.custody.restart_at(),
                unhealthy_since.map(|_| Instant::now() + Duration::from_millis(250)),
            ]
            .into_iter()
            .flatten()
            .min();
            match self.next_event(Wake::all(until)).await {
                Event::Shutdown => return self.release_for_shutdown(term).await,
                Event::Validator(ev) => {
                    if self.on_exit(&ev).await {
                        match ev {
                            ValidatorEvent::Fenced(..) => return self.deactivate("lease").await,
                            ValidatorEvent::GuardLost => {
                                return self.deactivate("validator_exit").await
                            }
                            ValidatorEvent::Exited(..) if halt.is_some() => {
                                exits_at_halt += 1;
                                tracing::warn!(
                                    exits_at_halt,
                                    ?halt,
                                    "the validator exited during the chain's upgrade halt"
                                );
                            }
                            ValidatorEvent::Exited(..) => {}
                        }
                    }
                }
                Event::Request(CoordinatorRequest::Switchover { to, reply }) => {
                    match self.handover_target(to) {
                        Ok(target) => {
                            let (next, released) = self.handover_released(term, target).await;
                            let _ = reply.send(if released {
                                Ok(format!("handed over to node {target}"))
                            } else {
                                Err(SwitchoverRefused::Unproven(target))
                            });
                            return next;
                        }
                        Err(why) => {
                            let _ = reply.send(Err(why));
                        }
                    }
                }
                Event::Changed | Event::Timer => {}
            }
        }
    }

    async fn shutdown(&mut self) {
        self.publish(StateName::Shutdown);
        self.sh.raft.runtime_config().elect(false);
        self.custody.stop_for_shutdown().await;
    }
}
