//! The world's hands: each fault of the schedule carried out at its time,
//! and the operator's commands (`pause`, `resume`, `members`) sent as an
//! operator would. Split from [`super`] for length.

use std::sync::Arc;
use std::time::Duration;

use keyraft::admin::members::removal_refusal;
use keyraft::ledger::Command;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ChangeMembers;
use tokio::time::Instant;

use super::World;
use crate::faults::{Fault, Kind, Target};
use crate::host::{Freeze, Host, OsFaults};
use crate::net::{Boxed, Quality};
use crate::node::Process;
use crate::types::{self, NodeId};

/// What an operator's command does on the leader it reached: true once
/// done.
type OnLeader = Arc<dyn Fn(Arc<Process>) -> Boxed<bool> + Send + Sync>;

impl World {
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

    /// An operator's command (`admin::execute_for_operator`): committed by
    /// the leader it reaches (see [`World::on_leader`]).
    pub(super) async fn operator(&self, cmd: Command) -> bool {
        let write: OnLeader = Arc::new(move |l: Arc<Process>| {
            let c = cmd.clone();
            Box::pin(async move {
                let write = l.raft.client_write(c);
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), write).await,
                    Ok(Ok(_))
                )
            })
        });
        self.on_leader(write, Duration::from_secs(1)).await
    }

    /// `keyraft members remove ID` (`admin::execute_here`): the leader
    /// hands over first if it is the one removed (`remove_the_leader`); a
    /// node that holds the key unreleased and does not lead is refused
    /// until its lease runs out or it releases; keyraft's own
    /// `members::removal_refusal` refuses a removal that would leave the
    /// voters without a live majority. Voter first, then node.
    async fn remove_member(self: &Arc<Self>, id: NodeId) -> bool {
        let w = Arc::downgrade(self);
        let remove: OnLeader = Arc::new(move |l: Arc<Process>| {
            let w = w.clone();
            Box::pin(async move {
                if l.id == id {
                    l.switchover();
                    return false;
                }
                if l.cluster.borrow().key_holder() == Some(id) {
                    return false;
                }
                // `admin::voters_left_answer`: a majority of the voters
                // left acks a heartbeat sent after the command came,
                // decided at the ack that completes it.
                let asked = Instant::now();
                let until = asked + l.timing.election_max;
                let mut metrics = l.raft.metrics();
                let _ = l.raft.trigger().heartbeat().await;
                loop {
                    let acks = keyraft::node::ack_ages(&metrics.borrow_and_update());
                    let since = asked.elapsed();
                    if removal_refusal(&l.voters(), l.id, &acks, id, since).is_none() {
                        break;
                    }
                    if Instant::now() >= until {
                        return false;
                    }
                    if let Ok(Err(_)) = tokio::time::timeout_at(until, metrics.changed()).await {
                        return false;
                    }
                }
                let voters = l.voters();
                if voters.contains(&id) {
                    if let Some(w) = w.upgrade() {
                        w.change_begins();
                    }
                    let out = ChangeMembers::RemoveVoters([id].into());
                    if l.raft.change_membership(out, false).await.is_err() {
                        return false;
                    }
                }
                let gone = ChangeMembers::RemoveNodes([id].into());
                l.raft.change_membership(gone, false).await.is_ok()
            })
        });
        self.on_leader(remove, Duration::from_secs(2)).await
    }

    /// `keyraft members add ID ADDR` (`admin::add_voter`): a learner until
    /// it has caught up, then a voter.
    async fn add_member(self: &Arc<Self>, id: NodeId) -> bool {
        let w = Arc::downgrade(self);
        let add: OnLeader = Arc::new(move |l: Arc<Process>| {
            let w = w.clone();
            Box::pin(async move {
                let node = openraft::BasicNode::new(format!("node-{id}"));
                let learner = l.raft.add_learner(id, node, true);
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(3), learner).await,
                    Ok(Ok(_))
                ) {
                    return false;
                }
                if let Some(w) = w.upgrade() {
                    w.change_begins();
                }
                let voter = ChangeMembers::AddVoterIds([id].into());
                l.raft.change_membership(voter, false).await.is_ok()
            })
        });
        self.on_leader(add, Duration::from_secs(4)).await
    }

    /// Runs `what` on the live leader, as `admin::execute_for_operator`
    /// does, asked of the first validator host that runs: with no live
    /// leader it stands for election first until any node leads (a paused
    /// cluster whose leader died elects nobody), then `what` runs on the
    /// leader, forwarded with `ttl` if need be. The operator tries again,
    /// on the next host, for up to 8 s.
    async fn on_leader(&self, what: OnLeader, ttl: Duration) -> bool {
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
            // A node still checking its start with its peers runs nothing.
            if let Some(p) = asked.filter(|p| p.gate.joined()) {
                if p.leader().is_none() {
                    let until = Instant::now() + self.timing.election_max * 6;
                    while p.leader().is_none() && Instant::now() < until {
                        let _ = p.raft.trigger().elect(true).await;
                        tokio::time::sleep(self.timing.election_min).await;
                    }
                }
                if let Some(leader) = p.leader() {
                    let done = if leader == p.id {
                        what(p.clone()).await
                    } else {
                        let w = what.clone();
                        let forwarded = p.net.exchange(p.id, p.inc, leader, ttl, move |l| w(l));
                        matches!(forwarded.await, Ok(true))
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
    pub(super) async fn apply(self: Arc<Self>, f: Fault) {
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
                    p.switchover();
                }
            }
            Kind::Pause { ms } => {
                let paused = self.operator(Command::SetPaused { paused: true }).await;
                self.note(format!("paused: {paused}"));
                sleep(ms).await;
                let resumed = self.operator(Command::SetPaused { paused: false }).await;
                self.note(format!("resumed: {resumed}"));
            }
            Kind::MemberOut { ms } => {
                let removed = self.remove_member(id).await;
                self.note(format!("node {id} removed: {removed}"));
                if removed {
                    sleep(ms).await;
                    let added = self.add_member(id).await;
                    self.note(format!("node {id} added back: {added}"));
                }
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
}
