//! The world of one run: the hosts, the network, the chain that judges
//! (a height every block; each host whose validator may sign signs it),
//! the oracle, the fault schedule carried out at its times, and at the
//! end the heal and the liveness judgement.
//!
//! Owns: the simulated time line of one seed. Must not: share anything
//! with another run (each runs on its own thread's runtime).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyraft::config::Timing;
use keyraft::ledger::{Command, SignVerdict};
use keyraft::signer::Hrs;
use tokio::time::Instant;

use crate::disk::DiskState;
use crate::faults::Plan;
use crate::host::{Freeze, Host};
use crate::net::Net;
use crate::node::{Process, Start, StartError};
use crate::oracle::Oracle;
use crate::types::{self, NodeId};
use keyraft::raft::store::Observer;

/// Every host of the run, by id.
pub struct Hosts(BTreeMap<NodeId, Arc<Host>>);

impl Hosts {
    pub fn get(&self, id: NodeId) -> Option<Arc<Host>> {
        self.0.get(&id).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Host>> {
        self.0.values()
    }
}

pub struct World {
    pub seed: u64,
    pub timing: Timing,
    /// What every process's configuration is made from.
    config: keyraft::config::Config,
    pub hosts: Arc<Hosts>,
    pub net: Net,
    pub epoch: Instant,
    pub signer_mode: bool,
    pub conflict: f64,
    height: AtomicU64,
    oracle: Mutex<Oracle>,
    trace: Mutex<Vec<String>>,
    backups: Mutex<BTreeMap<NodeId, DiskState>>,
    refused: Mutex<BTreeSet<NodeId>>,
    seeds: AtomicU64,
    /// Step 9's documented blind spot happened: a node started behind what
    /// a peer saw of it, that peer not among those that answered.
    residual: Mutex<Option<String>>,
    /// Nodes restored from a copy behind what they had durably held: they
    /// forgot (ground truth, for judging step 9 at their next start).
    amnesic: Mutex<BTreeSet<NodeId>>,
    /// The nodes up and joined when the last membership change was asked
    /// of openraft (ground truth, for judging a change left under way).
    change_began_with: Mutex<BTreeSet<NodeId>>,
}

/// What one run ended with.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub signatures: u64,
    pub trace: Vec<String>,
    pub panics: usize,
    /// Set when the run went through step 9's documented blind spot (see
    /// [`World::check_residual`]); its violations are reported apart.
    pub residual: Option<String>,
}

/// keyraft's default timings (the `lan` profile) in a configuration
/// resolved and checked by the real code (a member with one peer,
/// `--insecure`); each process's is made from it by
/// [`World::config`].
pub fn config() -> anyhow::Result<keyraft::config::Config> {
    let args = keyraft::config::RunArgs {
        node_id: Some(1),
        peer: vec!["2=127.0.0.1:7702".into()],
        listen: Some("127.0.0.1:7700".parse()?),
        insecure: true,
        witness: true,
        // Pinned: profile switches are not simulated (auto timing's
        // switch is covered by the real-process tests).
        timing: Some(keyraft::config::TimingProfile::Lan),
        ..Default::default()
    };
    Ok(args.resolve()?)
}

mod faults_applied;

impl World {
    pub fn ids(&self) -> Vec<NodeId> {
        self.hosts.0.keys().copied().collect()
    }

    /// Node `id`'s configuration: a validator host (a signer in signer
    /// mode) with the run's timing; no fence agents.
    pub fn config(&self, id: NodeId) -> keyraft::config::Config {
        let mut c = self.config.clone();
        c.id = id;
        c.peers = self
            .ids()
            .into_iter()
            .filter(|p| *p != id)
            .map(|p| (p, crate::operator::addr(p)))
            .collect();
        c.witness = false;
        c.timing = self.timing;
        c.signer = self.signer_mode.then(|| keyraft::config::SignerConfig {
            chains: vec![keyraft::config::ChainConfig {
                chain_id: crate::signer::CHAIN.into(),
                key: Default::default(),
                nodes: Vec::new(),
                node_rpc: None,
            }],
            identity_key: Default::default(),
        });
        c
    }

    pub fn height(&self) -> u64 {
        self.height.load(Ordering::Relaxed)
    }

    pub fn at_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The simulation's clock as keyraft's lease arithmetic takes it (ns).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn at_ns(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    pub fn note(&self, what: String) {
        let line = format!("{:>6} ms  {what}", self.at_ms());
        if crate::LIVE.with(std::cell::Cell::get) {
            eprintln!("{line}");
        }
        self.trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    pub(crate) fn oracle(&self) -> std::sync::MutexGuard<'_, Oracle> {
        self.oracle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new seed for a task's own randomness, drawn in a fixed order.
    fn next_seed(&self) -> u64 {
        self.seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(self.seeds.fetch_add(1, Ordering::Relaxed))
    }

    /// What the state machines committed, for the oracle.
    pub fn committed_hook(self: &Arc<Self>) -> Observer {
        let w = Arc::downgrade(self);
        Arc::new(move |log_id, cmd| {
            let (index, term) = (log_id.index, log_id.leader_id.term);
            let Some(w) = w.upgrade() else {
                return;
            };
            let at = w.at_ms();
            let mut o = w.oracle();
            let what = cmd.map_or_else(|| "(no command)".to_string(), |(c, _)| c.to_string());
            o.applied(index, term, &what, at);
            let Some((cmd, reply)) = cmd else {
                return;
            };
            let Some(SignVerdict::Sign { .. }) = reply.sign else {
                return;
            };
            match cmd {
                Command::Signed {
                    height,
                    round,
                    step,
                    digest,
                    ..
                } => o.committed((*height, *round, *step), digest),
                Command::SignAhead {
                    height,
                    round,
                    step,
                    digest,
                    through,
                    ..
                } => {
                    o.committed((*height, *round, *step), digest);
                    // One into the next height starts at its first step.
                    let after = if through.0 > *height {
                        (through.0, 0, 0)
                    } else {
                        (*height, *round, *step)
                    };
                    o.reserved(after, *through);
                }
                _ => {}
            }
        })
    }

    /// Step 9, judged against the ground truth: a node restored behind
    /// what it had durably held has just been let start. If a peer that
    /// answered it remembered more of it than it holds, the check should
    /// have refused it: a violation. If none did (the peers that saw more
    /// were down, for step 9 asks a majority; or what it lost only it knew
    /// it held, such as a leader's own entries, for followers remember a
    /// leader's term, not its log), the run went through step 9's
    /// documented blind spot (docs/safety.md, residual risks), and what
    /// follows is reported apart.
    /// A membership change is about to be asked of openraft: remember who
    /// is up and joined now.
    pub fn change_begins(&self) {
        let up = self
            .hosts
            .all()
            .filter(|h| h.keyraft_runs())
            .filter_map(|h| h.process())
            .filter(|p| p.gate.joined())
            .map(|p| p.id)
            .collect();
        *self
            .change_began_with
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = up;
    }

    pub fn check_residual(
        &self,
        id: NodeId,
        holds: keyraft::raft::memory::Holds,
        answered: &BTreeMap<NodeId, keyraft::raft::memory::Remembered>,
    ) {
        if !self
            .amnesic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            return;
        }
        let at = self.at_ms();
        if let Some((peer, gap)) = answered
            .iter()
            .find_map(|(p, seen)| seen.gap(holds).map(|g| (*p, g)))
        {
            self.oracle().violations.push(format!(
                "forgotten node let in at {at} ms: node {id} was restored behind what it held, and node {peer} answered its start knowing it ({gap}), yet it started (step 9 must refuse it)"
            ));
            return;
        }
        let why = format!(
            "node {id} was restored behind what it held and started: none of the peers that answered (nodes {:?}) remembered more of it",
            answered.keys().collect::<Vec<_>>()
        );
        self.note(format!("RESIDUAL RISK: {why}"));
        self.residual
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    pub fn signature(&self, node: NodeId, hrs: Hrs, digest: &str, timestamp: (i64, i32)) {
        let at = self.at_ms();
        if crate::LIVE.with(std::cell::Cell::get) {
            self.note(format!("node {node} signs {hrs:?} {digest}"));
        }
        self.oracle().signature(node, hrs, digest, timestamp, at);
    }

    pub fn bad_signature(&self, node: NodeId, why: &str) {
        let at = self.at_ms();
        self.oracle().bad_signature(node, why, at);
    }

    /// A host's key may have just become usable: nobody else's may be,
    /// and it signs the open height at once.
    pub fn usable(&self, id: NodeId) {
        let now = Instant::now();
        let Some(host) = self.hosts.get(id) else {
            return;
        };
        if !host.signs(now) {
            return;
        }
        let at = self.at_ms();
        for other in self.hosts.all().filter(|h| h.id != id) {
            if other.signs(now) {
                self.oracle().overlap(id, other.id, at);
            }
        }
        let height = self.height();
        self.oracle().height_signed(id, height, at);
    }

    async fn chain(self: Arc<Self>, block: Duration) {
        loop {
            tokio::time::sleep(block).await;
            let height = self.height.fetch_add(1, Ordering::Relaxed) + 1;
            let now = Instant::now();
            let at = self.at_ms();
            for h in self.hosts.all() {
                h.reap(now);
                if h.signs(now) {
                    self.oracle().height_signed(h.id, height, at);
                }
            }
        }
    }

    /// The configured members, as `raft.initialize` takes them.
    pub fn members(&self) -> BTreeMap<NodeId, openraft::BasicNode> {
        self.ids()
            .into_iter()
            .map(|id| (id, openraft::BasicNode::new(crate::operator::addr(id))))
            .collect()
    }

    /// Starts a keyraft process on `id` and its coordinator.
    pub(crate) async fn start(self: &Arc<Self>, id: NodeId, how: Start) {
        let Some(host) = self.hosts.get(id) else {
            return;
        };
        if self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
            || host.is_down()
            || host.process().is_some()
            || host.starting.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let inc = host.disk.new_process();
        let started = Process::start(self, id, inc, how).await;
        host.starting.store(false, Ordering::Relaxed);
        match started {
            Ok((p, ops)) => {
                crate::coordinator::spawn(&p, self, ops, self.next_seed());
                p.spawn(leadership(self.clone(), p.clone()));
                self.note(format!("node {id} started ({how:?})"));
            }
            Err(StartError::Refused(why)) => {
                self.note(format!("node {id} REFUSED at start: {why}"));
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
            }
            Err(StartError::Stopped) => self.note(format!("node {id} stopped while starting")),
        }
    }

    fn leader(&self) -> Option<NodeId> {
        self.hosts
            .all()
            .filter_map(|h| h.process())
            .filter(|p| p.leader() == Some(p.id))
            .map(|p| p.id)
            .next()
    }

    /// The end of the faults: every link healed, every host powered and
    /// thawed with a sound guard, every stopped process started again, the
    /// cluster resumed.
    async fn heal(self: &Arc<Self>) {
        self.net.heal();
        for h in self.hosts.all() {
            h.freeze.send_replace(Freeze::default());
            {
                let mut b = h.below();
                b.faults.late_timer = Duration::ZERO;
                b.faults.kill_time = Duration::ZERO;
                b.guard_frozen = false;
                b.guard_alive = true;
            }
            h.killable_again(Instant::now());
            h.disk.lock().slow = Duration::ZERO;
            if h.is_down() {
                h.power_on();
            }
        }
        self.note("healed".into());
        for id in self.ids() {
            let up = self.hosts.get(id).is_some_and(|h| h.process().is_some());
            if !up {
                let w = self.clone();
                types::spawn(async move { w.start(id, Start::Again).await });
            }
        }
        let w = self.clone();
        types::spawn(async move {
            let resumed = w
                .operator(keyraft::pb::cluster_command::Kind::Resume(true))
                .await;
            w.note(format!("resumed after the heal: {resumed}"));
        });
    }
}

/// Notes each leadership a process takes, for the time line.
async fn leadership(world: Arc<World>, p: Arc<Process>) {
    use openraft::async_runtime::watch::WatchReceiver;
    let mut rx = p.raft.metrics();
    let mut led = None;
    loop {
        let m = rx.borrow_watched().clone();
        let now = (m.state == openraft::ServerState::Leader).then_some(m.current_term);
        if now != led && now.is_some() {
            world.note(format!("node {} leads term {}", p.id, m.current_term));
        }
        led = now;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Runs one plan on the current (paused, seeded) runtime.
pub async fn run(
    seed: u64,
    plan: &Plan,
    config: keyraft::config::Config,
    timing: Timing,
    until_ms: u64,
) -> Outcome {
    let hosts = Hosts(
        (1..=plan.nodes)
            .map(|id| (id, Arc::new(Host::new(id, seed ^ id))))
            .collect(),
    );
    let hosts = Arc::new(hosts);
    let world = Arc::new(World {
        seed,
        timing,
        config,
        net: Net::new(seed, hosts.clone()),
        hosts,
        epoch: Instant::now(),
        signer_mode: plan.signer_mode,
        conflict: plan.conflict,
        height: AtomicU64::new(1),
        oracle: Mutex::new(Oracle::default()),
        trace: Mutex::new(Vec::new()),
        backups: Mutex::new(BTreeMap::new()),
        refused: Mutex::new(BTreeSet::new()),
        seeds: AtomicU64::new(0),
        residual: Mutex::new(None),
        amnesic: Mutex::new(BTreeSet::new()),
        change_began_with: Mutex::new(BTreeSet::new()),
    });
    world.note(format!(
        "{} nodes, {} mode, blocks every {} ms",
        plan.nodes,
        if plan.signer_mode {
            "signer"
        } else {
            "validator"
        },
        plan.block_ms
    ));
    for h in world.hosts.all() {
        types::spawn(crate::host::guard(h.clone()));
    }
    for id in world.ids() {
        world.start(id, Start::First).await;
    }
    if let Some(p) = world.hosts.get(1).and_then(|h| h.process()) {
        let _ = p.raft.initialize(world.members()).await;
    }
    types::spawn(world.clone().chain(Duration::from_millis(plan.block_ms)));
    if plan.signer_mode {
        let w = world.clone();
        types::spawn(async move {
            // `keyraft signer import-state` for a key that never signed.
            // (Each node registers itself, `join::register`; keyraft's
            // signer signs only once every voter has.)
            let floor = keyraft::pb::SignerFloor {
                chain_id: crate::signer::CHAIN.into(),
                height: 0,
                allow_jump: false,
                other_key: false,
            };
            let floor = keyraft::pb::cluster_command::Kind::SignerFloor(floor);
            let done = w.operator(floor).await;
            w.note(format!("signer floor committed: {done}"));
        });
        for id in world.ids() {
            let seed = world.next_seed();
            types::spawn(crate::signer::sentry(world.clone(), id, seed));
        }
    }
    for f in &plan.faults {
        types::spawn(world.clone().apply(f.clone()));
    }
    tokio::time::sleep_until(world.epoch + Duration::from_millis(plan.heal_ms)).await;
    world.heal().await;
    let healed = (world.height(), world.oracle().signatures, world.at_ms());
    tokio::time::sleep_until(world.epoch + Duration::from_millis(until_ms)).await;
    let mut outcome = Outcome::default();
    // A quorum of the voters as the most advanced process up knows them
    // (a removed member not added back does not count). During a joint
    // configuration (a membership change under way) that is a majority of
    // each of its voter sets: openraft commits nothing without both.
    // A node that lost its data dir and waits to be taken back does not
    // vote (`--rejoin`): it is no part of a quorum that can elect.
    let joined: Vec<Arc<Process>> = world
        .hosts
        .all()
        .filter_map(|h| h.process())
        .filter(|p| p.gate.joined() && p.gate.votes_open())
        .collect();
    let configs: Vec<BTreeSet<NodeId>> = joined
        .iter()
        .map(|p| p.metrics())
        .max_by_key(|m| m.last_log_index)
        .map(|m| m.membership_config.membership().get_joint_config().clone())
        .unwrap_or_default();
    let up_of =
        |voters: &BTreeSet<NodeId>| joined.iter().filter(|p| voters.contains(&p.id)).count();
    let quorum_up = !configs.is_empty()
        && configs
            .iter()
            .all(|voters| up_of(voters) > voters.len() / 2);
    let o = world.oracle();
    if configs.len() > 1 {
        // A membership change that never committed: its joint
        // configuration waits, after the heal, on voters that stay down
        // (refused). If the nodes up when it began made a majority of the
        // new voter set, voters died during it, or the old set had lost its
        // majority already (docs/safety.md, residual risks); if not, it
        // should never have begun.
        let began_with = world
            .change_began_with
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The new voter set must have had a majority up (a node being added
        // is a learner that caught up). Whether the old one had is not the
        // change's doing: without it nothing commits, change or not.
        let (old, new) = (&configs[0], &configs[configs.len() - 1]);
        let could_commit = new
            .iter()
            .filter(|v| began_with.contains(v) || !old.contains(v))
            .count()
            * 2
            > new.len();
        let up: Vec<NodeId> = joined.iter().map(|p| p.id).collect();
        let why = format!(
            "a membership change still under way at {until_ms} ms, 10 s after the heal: voter sets {configs:?}, nodes up {up:?}, up when it began {began_with:?}"
        );
        if could_commit {
            world.note(format!("RESIDUAL RISK: {why}"));
            world
                .residual
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(format!("{why}: voters died during the change"));
        } else {
            outcome
                .violations
                .push(format!("liveness: {why}: it began without a live majority"));
        }
    }
    if quorum_up && o.signatures == healed.1 {
        let sets: Vec<String> = configs
            .iter()
            .map(|v| format!("{} of voters {v:?}", up_of(v)))
            .collect();
        outcome.violations.push(format!(
            "liveness: healed at {} ms with {} up, and nothing signed by {} ms",
            healed.2,
            sets.join(" and "),
            until_ms
        ));
    }
    outcome.violations.extend(o.violations.iter().cloned());
    outcome.signatures = o.signatures;
    drop(o);
    outcome.trace = world
        .trace
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    outcome.residual = world
        .residual
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for h in world.hosts.all() {
        if let Some(p) = h.process() {
            p.stop();
        }
    }
    outcome
}
