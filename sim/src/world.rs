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

use crate::coordinator::{Coordinator, Op};
use crate::disk::{DiskState, Hook};
use crate::faults::{Fault, Kind, Plan, Target};
use crate::host::{Freeze, Host, OsFaults};
use crate::net::{Net, Quality};
use crate::node::{Process, StartError};
use crate::oracle::Oracle;
use crate::types::{self, NodeId};

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

/// keyraft's default timings (the `lan` profile), resolved and checked by
/// the real configuration code.
pub fn timing() -> anyhow::Result<Timing> {
    let args = keyraft::config::RunArgs {
        node_id: Some(1),
        peer: vec!["2=127.0.0.1:7702".into()],
        listen: Some("127.0.0.1:7700".parse()?),
        insecure: true,
        witness: true,
        ..Default::default()
    };
    Ok(args.resolve()?.timing)
}

impl World {
    pub fn ids(&self) -> Vec<NodeId> {
        self.hosts.0.keys().copied().collect()
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

    fn oracle(&self) -> std::sync::MutexGuard<'_, Oracle> {
        self.oracle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new seed for a task's own randomness, drawn in a fixed order.
    fn next_seed(&self) -> u64 {
        self.seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(self.seeds.fetch_add(1, Ordering::Relaxed))
    }

    /// What the state machines committed, for the oracle.
    pub fn committed_hook(self: &Arc<Self>) -> Hook {
        let w = Arc::downgrade(self);
        Arc::new(move |index, term, cmd| {
            let Some(w) = w.upgrade() else {
                return;
            };
            let at = w.at_ms();
            let mut o = w.oracle();
            let what = cmd.map_or_else(|| "(no command)".to_string(), |(c, _)| c.to_string());
            o.applied(index, term, &what, at);
            if let Some((
                Command::Signed {
                    height,
                    round,
                    step,
                    digest,
                    ..
                },
                reply,
            )) = cmd
            {
                if let Some(SignVerdict::Sign { .. }) = reply.sign {
                    o.committed((*height, *round, *step), digest);
                }
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

    pub fn signature(&self, node: NodeId, hrs: Hrs, digest: &str) {
        let at = self.at_ms();
        if crate::LIVE.with(std::cell::Cell::get) {
            self.note(format!("node {node} signs {hrs:?} {digest}"));
        }
        self.oracle().signature(node, hrs, digest, at);
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

    /// Starts a keyraft process on `id` and its coordinator.
    async fn start(self: &Arc<Self>, id: NodeId, fresh: bool) {
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
        let started = Process::start(self, id, inc, fresh).await;
        host.starting.store(false, Ordering::Relaxed);
        match started {
            Ok((p, ops)) => {
                if let Some(c) = Coordinator::new(p.clone(), self.clone(), ops, self.next_seed()) {
                    p.spawn(c.run());
                }
                p.spawn(leadership(self.clone(), p.clone()));
                self.note(format!("node {id} started"));
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

    fn kill_keyraft(&self, host: &Host) {
        if let Some(p) = host.process() {
            p.stop();
        }
        host.set_process(None);
        // The guard sees its coordinator gone and kills the tree.
        if host.below().guard_alive {
            host.kill_tree(Instant::now());
        }
        host.below().lease = None;
    }

    fn crash(&self, host: &Host) {
        if let Some(p) = host.process() {
            p.stop();
        }
        host.power_off();
        host.disk.crash();
    }

    fn set_faults(&self, host: &Host, f: impl FnOnce(&mut OsFaults)) {
        f(&mut host.below().faults);
    }

    fn cut_all(&self, id: NodeId, out: bool, inbound: bool, cut: bool) {
        for other in self.ids().into_iter().filter(|o| *o != id) {
            if out {
                self.net.cut(id, other, cut);
            }
            if inbound {
                self.net.cut(other, id, cut);
            }
        }
    }

    /// An operator's command (`admin::execute_for_operator`), asked of the
    /// first validator host that runs: with no live leader it stands for
    /// election first (a paused cluster whose leader died elects nobody),
    /// then the command runs on the leader, forwarded if need be. The
    /// operator tries again, on the next host, for up to 8 s.
    async fn operator(&self, cmd: Command) -> bool {
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut attempt = 0;
        while Instant::now() < deadline {
            // Each try asks the next validator host that runs (one whose
            // log is behind cannot win the election it stands for).
            attempt += 1;
            let up: Vec<Arc<Process>> = self
                .hosts
                .all()
                .filter(|h| h.keyraft_runs())
                .filter_map(|h| h.process())
                .collect();
            let asked = (!up.is_empty()).then(|| up[attempt % up.len()].clone());
            if let Some(p) = asked {
                if p.leader().is_none() {
                    let until = Instant::now() + self.timing.election_max * 6;
                    while p.leader().is_none() && Instant::now() < until {
                        let _ = p.raft.trigger().elect(true).await;
                        tokio::time::sleep(self.timing.election_min).await;
                    }
                }
                if let Some(leader) = p.leader() {
                    let c = cmd.clone();
                    let done =
                        p.net
                            .exchange(p.id, p.inc, leader, Duration::from_secs(1), move |l| {
                                let c = c.clone();
                                Box::pin(async move {
                                    let write = l.raft.client_write(c);
                                    matches!(
                                        tokio::time::timeout(Duration::from_secs(1), write).await,
                                        Ok(Ok(_))
                                    )
                                })
                            });
                    let done = if leader == p.id {
                        let write = p.raft.client_write(cmd.clone());
                        matches!(
                            tokio::time::timeout(Duration::from_secs(1), write).await,
                            Ok(Ok(_))
                        )
                    } else {
                        matches!(done.await, Ok(true))
                    };
                    if done {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Carries out one fault (and, for a timed one, its end).
    async fn apply(self: Arc<Self>, f: Fault) {
        tokio::time::sleep_until(self.epoch + Duration::from_millis(f.at_ms)).await;
        let id = match f.target {
            Target::Node(n) => n,
            Target::Leader => match self.leader() {
                Some(l) => l,
                None => return,
            },
        };
        let Some(host) = self.hosts.get(id) else {
            return;
        };
        self.note(format!("fault on node {id}: {:?}", f.kind));
        let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
        match f.kind {
            Kind::Crash { down_ms } | Kind::Restore { down_ms } => {
                self.crash(&host);
                if matches!(f.kind, Kind::Restore { .. }) {
                    let had = host.disk.holds();
                    let copy = self
                        .backups
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&id)
                        .cloned();
                    host.disk.restore(copy);
                    let has = host.disk.holds();
                    if has.term < had.term || has.last_index < had.last_index {
                        self.amnesic
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id);
                    }
                }
                sleep(down_ms).await;
                host.power_on();
                self.start(id, false).await;
            }
            Kind::KillKeyraft { down_ms } => {
                self.kill_keyraft(&host);
                sleep(down_ms).await;
                self.start(id, false).await;
            }
            Kind::CrashAll { down_ms } => {
                for h in self.hosts.all() {
                    self.crash(h);
                }
                sleep(down_ms).await;
                for h in self.hosts.all() {
                    h.power_on();
                }
                for id in self.ids() {
                    let w = self.clone();
                    types::spawn(async move { w.start(id, false).await });
                }
            }
            Kind::Partition { ms } | Kind::OneWayOut { ms } => {
                let inbound = matches!(f.kind, Kind::Partition { .. });
                self.cut_all(id, true, inbound, true);
                sleep(ms).await;
                self.cut_all(id, true, inbound, false);
            }
            Kind::Flap { ms, every_ms } => {
                let end = Instant::now() + Duration::from_millis(ms);
                let mut cut = true;
                while Instant::now() < end {
                    self.cut_all(id, true, true, cut);
                    cut = !cut;
                    sleep(every_ms).await;
                }
                self.cut_all(id, true, true, false);
            }
            Kind::BadNet {
                ms,
                delay_ms,
                jitter_ms,
                loss,
                dup,
            } => {
                self.net.set_quality(Quality {
                    delay: Duration::from_millis(delay_ms),
                    jitter: Duration::from_millis(jitter_ms),
                    loss,
                    dup,
                });
                sleep(ms).await;
                self.net.set_quality(Quality::default());
            }
            Kind::FreezeHost { ms } | Kind::FreezeKeyraft { ms } => {
                let whole = matches!(f.kind, Kind::FreezeHost { .. });
                host.freeze.send_replace(Freeze {
                    host: whole,
                    keyraft: !whole,
                });
                sleep(ms).await;
                host.freeze.send_replace(Freeze::default());
                self.note(format!("node {id} thawed"));
                self.usable(id);
            }
            Kind::FreezeGuard { ms } => {
                host.below().guard_frozen = true;
                sleep(ms).await;
                host.below().guard_frozen = false;
                host.changed.notify_waiters();
            }
            Kind::KillGuard => {
                // Its parent-death signal kills the validator's first process.
                host.below().guard_alive = false;
                host.kill_tree(Instant::now());
            }
            Kind::LateTimer { ms, late_ms } => {
                self.set_faults(&host, |o| o.late_timer = Duration::from_millis(late_ms));
                sleep(ms).await;
                self.set_faults(&host, |o| o.late_timer = Duration::ZERO);
            }
            Kind::SlowKill {
                ms,
                kill_ms,
                unkillable,
            } => {
                self.set_faults(&host, |o| {
                    o.kill_time = Duration::from_millis(kill_ms);
                    o.unkillable = unkillable;
                });
                sleep(ms).await;
                self.set_faults(&host, |o| o.kill_time = Duration::ZERO);
                host.killable_again(Instant::now());
            }
            Kind::Hang { ms } => {
                self.set_faults(&host, |o| o.unkillable = true);
                sleep(ms).await;
                host.killable_again(Instant::now());
            }
            Kind::SlowStop { ms, stop_ms } => {
                self.set_faults(&host, |o| o.stop_time = Duration::from_millis(stop_ms));
                sleep(ms).await;
                self.set_faults(&host, |o| o.stop_time = Duration::ZERO);
            }
            Kind::SlowDisk { ms, slow_ms } => {
                host.disk.lock().slow = Duration::from_millis(slow_ms);
                sleep(ms).await;
                host.disk.lock().slow = Duration::ZERO;
            }
            Kind::Switchover => {
                if let Some(p) = host.process() {
                    let _ = p.ops.send(Op::Switchover);
                }
            }
            Kind::Pause { ms } => {
                let paused = self.operator(Command::SetPaused { paused: true }).await;
                self.note(format!("paused: {paused}"));
                sleep(ms).await;
                let resumed = self.operator(Command::SetPaused { paused: false }).await;
                self.note(format!("resumed: {resumed}"));
            }
            Kind::Backup => {
                let image = host.disk.image();
                self.backups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, image);
            }
        }
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
                types::spawn(async move { w.start(id, false).await });
            }
        }
        let w = self.clone();
        types::spawn(async move {
            let resumed = w.operator(Command::SetPaused { paused: false }).await;
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
pub async fn run(seed: u64, plan: &Plan, timing: Timing, until_ms: u64) -> Outcome {
    let hosts = Hosts(
        (1..=plan.nodes)
            .map(|id| (id, Arc::new(Host::new(id, seed ^ id))))
            .collect(),
    );
    let hosts = Arc::new(hosts);
    let world = Arc::new(World {
        seed,
        timing,
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
        world.start(id, true).await;
    }
    if let Some(p) = world.hosts.get(1).and_then(|h| h.process()) {
        let members: BTreeMap<NodeId, openraft::BasicNode> = world
            .ids()
            .into_iter()
            .map(|id| (id, openraft::BasicNode::new(format!("node-{id}"))))
            .collect();
        let _ = p.raft.initialize(members).await;
    }
    types::spawn(world.clone().chain(Duration::from_millis(plan.block_ms)));
    if plan.signer_mode {
        let w = world.clone();
        types::spawn(async move {
            let floor = Command::SignerFloor {
                chain_id: crate::signer::CHAIN.into(),
                height: 0,
            };
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
    let quorum = world.ids().len() / 2 + 1;
    let up = world
        .hosts
        .all()
        .filter(|h| h.process().is_some_and(|p| p.gate.joined()))
        .count();
    let o = world.oracle();
    if up >= quorum && o.signatures == healed.1 {
        outcome.violations.push(format!(
            "liveness: healed at {} ms with {up} of {} nodes up, and nothing signed by {} ms",
            healed.2,
            world.ids().len(),
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
