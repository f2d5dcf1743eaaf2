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
use tokio::time::Instant;

use crate::disk::DiskState;
use crate::faults::Plan;
use crate::host::{Freeze, Hosts};
use crate::judge::{lock, Judge};
use crate::net::Net;
use crate::node::{Birth, Process, Start, StartError};
use crate::types::{self, NodeId};

pub struct World {
    pub seed: u64,
    pub timing: Timing,
    /// What every process's configuration is made from.
    config: keyraft::config::Config,
    pub hosts: Arc<Hosts<Process>>,
    pub net: Net<Process>,
    /// The run's clock and the judge's record.
    pub judge: Arc<Judge>,
    pub signer_mode: bool,
    pub conflict: f64,
    backups: Mutex<BTreeMap<NodeId, DiskState>>,
    refused: Mutex<BTreeSet<NodeId>>,
    seeds: AtomicU64,
}

/// What one run ended with.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub signatures: u64,
    pub trace: Vec<String>,
    pub panics: usize,
    /// Set when the run went through step 9's documented blind spot (see
    /// [`Judge::check_residual`]); its violations are reported apart.
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
        self.hosts.ids()
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
            .map(|p| (p, crate::ports::addr(p)))
            .collect();
        c.witness = false;
        c.timing = self.timing;
        c.signer = self.signer_mode.then(|| keyraft::config::SignerConfig {
            chains: vec![keyraft::config::ChainConfig {
                chain_id: crate::signer::CHAIN.into(),
                key: keyraft::config::KeySource::File(Default::default()),
                nodes: Vec::new(),
                node_rpc: None,
                protocol: Default::default(),
            }],
            identity_key: Default::default(),
        });
        c
    }

    /// A new seed for a task's own randomness, drawn in a fixed order.
    fn next_seed(&self) -> u64 {
        self.seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(self.seeds.fetch_add(1, Ordering::Relaxed))
    }

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
        *lock(&self.judge.change_began_with) = up;
    }

    async fn chain(self: Arc<Self>, block: Duration) {
        loop {
            tokio::time::sleep(block).await;
            let height = self.judge.next_height();
            let now = Instant::now();
            let at = self.judge.at_ms();
            for h in self.hosts.all() {
                h.reap(now);
                if h.signs(now) {
                    self.judge.oracle().height_signed(h.id, height, at);
                }
            }
        }
    }

    /// The operator runs `kind` (`crate::operator`).
    pub async fn operator(&self, kind: keyraft::pb::cluster_command::Kind) -> bool {
        crate::operator::operate(&self.hosts, &self.judge, kind).await
    }

    /// Starts a keyraft process on `id` and its coordinator.
    pub(crate) async fn start(self: &Arc<Self>, id: NodeId, how: Start) {
        let Some(host) = self.hosts.get(id) else {
            return;
        };
        if lock(&self.refused).contains(&id)
            || host.is_down()
            || host.process().is_some()
            || host.starting.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let inc = host.disk.new_process();
        let (w, stopped) = (Arc::downgrade(self), self.clone());
        let birth = Birth {
            host: host.clone(),
            net: self.net.clone(),
            judge: self.judge.clone(),
            config: self.config(id),
            change_begins: Arc::new(move || {
                if let Some(w) = w.upgrade() {
                    w.change_begins();
                }
            }),
            core_stopped: Arc::new(move |why| stopped.core_stopped(id, inc, why)),
        };
        let started = Process::start(birth, inc, how).await;
        host.starting.store(false, Ordering::Relaxed);
        match started {
            Ok((p, ops)) => {
                crate::coordinator::spawn(&p, &self.hosts, &self.judge, ops, self.next_seed());
                p.spawn(leadership(self.clone(), p.clone()));
                self.judge.note(format!("node {id} started ({how:?})"));
            }
            Err(StartError::Refused(why)) => {
                self.judge
                    .note(format!("node {id} REFUSED at start: {why}"));
                lock(&self.refused).insert(id);
            }
            Err(StartError::Stopped) => {
                self.judge.note(format!("node {id} stopped while starting"))
            }
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
        self.judge.note("healed".into());
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
            w.judge.note(format!("resumed after the heal: {resumed}"));
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
            world
                .judge
                .note(format!("node {} leads term {}", p.id, m.current_term));
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
    let hosts = Arc::new(Hosts::new(plan.nodes, seed));
    let world = Arc::new(World {
        seed,
        timing,
        config,
        net: Net::new(seed, hosts.clone()),
        hosts,
        judge: Arc::new(Judge::begin()),
        signer_mode: plan.signer_mode,
        conflict: plan.conflict,
        backups: Mutex::new(BTreeMap::new()),
        refused: Mutex::new(BTreeSet::new()),
        seeds: AtomicU64::new(0),
    });
    world.judge.note(format!(
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
        let _ = p
            .raft
            .initialize(crate::node::members(&world.config(1)))
            .await;
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
            w.judge.note(format!("signer floor committed: {done}"));
        });
        let sentries = Arc::new(crate::sentry::Sentries {
            hosts: world.hosts.clone(),
            judge: world.judge.clone(),
            conflict: world.conflict,
        });
        for id in world.ids() {
            let seed = world.next_seed();
            types::spawn(crate::sentry::sentry(sentries.clone(), id, seed));
        }
    }
    for f in &plan.faults {
        types::spawn(world.clone().apply(f.clone()));
    }
    tokio::time::sleep_until(world.judge.epoch + Duration::from_millis(plan.heal_ms)).await;
    world.heal().await;
    let healed = (
        world.judge.height(),
        world.judge.oracle().signatures,
        world.judge.at_ms(),
    );
    tokio::time::sleep_until(world.judge.epoch + Duration::from_millis(until_ms)).await;
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
    let o = world.judge.oracle();
    if configs.len() > 1 {
        // A membership change that never committed: its joint
        // configuration waits, after the heal, on voters that stay down
        // (refused). If the nodes up when it began made a majority of the
        // new voter set, voters died during it, or the old set had lost its
        // majority already (docs/safety.md, residual risks); if not, it
        // should never have begun.
        let began_with = lock(&world.judge.change_began_with).clone();
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
            world.judge.note(format!("RESIDUAL RISK: {why}"));
            lock(&world.judge.residual)
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
    outcome.trace = world.judge.trace();
    outcome.residual = lock(&world.judge.residual).clone();
    // Stopped, and let go: a host holds its process, which holds the net,
    // which holds the hosts; left in place, that circle of `Arc`s would
    // keep every seed's world alive to the end of the run.
    for h in world.hosts.all() {
        if let Some(p) = h.process() {
            p.stop();
        }
        h.set_process(None);
    }
    outcome
}
