//! The world's hands: each fault of the schedule carried out at its time;
//! the operator's commands among them (`pause`, `resume`, `switchover`,
//! `members`) go through keyraft's own (`crate::operator`). Split from
//! [`super`] for length.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyraft::pb::{self, cluster_command::Kind as Op};
use tokio::time::Instant;

use super::World;
use crate::faults::{Fault, Kind, Target};
use crate::host::{Freeze, Host, OsFaults};
use crate::judge::lock;
use crate::net::Quality;
use crate::node::{Process, Start};
use crate::types::{self, NodeId};

impl World {
    /// keyraft's Raft core stopped on `id` (`raft::core_stopped`): the
    /// process exits 8 (its guard fences the validator) and the process
    /// manager starts it again a second later.
    pub fn core_stopped(self: &Arc<Self>, id: NodeId, inc: u64, why: String) {
        let Some(host) = self.hosts.get(id) else {
            return;
        };
        if !host.is_process(inc) {
            return;
        }
        self.judge
            .note(format!("node {id}: the Raft core stopped ({why}): exit 8"));
        self.kill_keyraft(&host);
        let w = self.clone();
        types::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.start(id, Start::Again).await;
        });
    }

    fn kill_keyraft(&self, host: &Host<Process>) {
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

    fn crash(&self, host: &Host<Process>) {
        self.lose_power(host, false);
    }

    /// Power lost: with `torn`, the last write not yet synced of each
    /// file is torn for sure (otherwise by chance).
    fn lose_power(&self, host: &Host<Process>, torn: bool) {
        if let Some(p) = host.process() {
            p.stop();
        }
        host.power_off();
        host.disk.crash(torn);
    }

    fn set_faults(&self, host: &Host<Process>, f: impl FnOnce(&mut OsFaults)) {
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

    /// Carries out one fault (and, for a timed one, its end).
    pub(super) async fn apply(self: Arc<Self>, f: Fault) {
        tokio::time::sleep_until(self.judge.epoch + Duration::from_millis(f.at_ms)).await;
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
        self.judge.note(format!("fault on node {id}: {:?}", f.kind));
        let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
        match f.kind {
            Kind::Crash { down_ms } | Kind::Restore { down_ms } => {
                self.crash(&host);
                if matches!(f.kind, Kind::Restore { .. }) {
                    let had = host.disk.holds();
                    let copy = lock(&self.backups).get(&id).cloned();
                    host.disk.restore(copy);
                    let has = host.disk.holds();
                    host.acked.reset(has.as_ref().map_or(0, |h| h.last_index));
                    // A dir the store cannot read is counted as gone back:
                    // the judge then checks that nobody lets it in.
                    let back = match (&had, &has) {
                        (Ok(had), Ok(has)) => {
                            has.term < had.term || has.last_index < had.last_index
                        }
                        _ => true,
                    };
                    if let (Err(e), _) | (_, Err(e)) = (&had, &has) {
                        self.judge
                            .note(format!("node {id}'s data dir unreadable: {e}"));
                    }
                    if back {
                        lock(&self.judge.amnesic).insert(id);
                    }
                }
                sleep(down_ms).await;
                host.power_on();
                self.start(id, Start::Again).await;
            }
            Kind::TornWrite { down_ms, kill_ms } => {
                // Waits for a write not yet synced, then loses power.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                while !host.disk.unsynced() && tokio::time::Instant::now() < deadline {
                    sleep(1).await;
                }
                self.lose_power(&host, true);
                sleep(down_ms).await;
                host.power_on();
                self.start(id, Start::Again).await;
                sleep(kill_ms).await;
                self.kill_keyraft(&host);
                self.start(id, Start::Again).await;
            }
            Kind::Wipe { down_ms } => {
                self.crash(&host);
                host.disk.restore(None);
                host.acked.reset(0);
                sleep(down_ms).await;
                host.power_on();
                // keyraft refuses an empty data dir that its peers know
                // (step 9), started here or by the restart of every host;
                // the operator reads why and starts it again with --rejoin.
                self.start(id, Start::Wiped { rejoin: false }).await;
                let until = Instant::now() + Duration::from_secs(5);
                while host.starting.load(Ordering::Relaxed) && Instant::now() < until {
                    sleep(50).await;
                }
                let refused = lock(&self.refused).remove(&id);
                if refused {
                    self.start(id, Start::Wiped { rejoin: true }).await;
                }
            }
            Kind::KillKeyraft { down_ms } => {
                self.kill_keyraft(&host);
                sleep(down_ms).await;
                self.start(id, Start::Again).await;
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
                    types::spawn(async move { w.start(id, Start::Again).await });
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
                self.judge.note(format!("node {id} thawed"));
                self.judge.usable(&self.hosts, id);
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
                // `keyraft switchover` on this host, once: relayed to the
                // leader, whose coordinator hands over.
                if let Some(p) = host.process() {
                    let cmd = pb::ClusterCommand {
                        kind: Some(Op::Switchover(pb::Switchover { to: None })),
                        mode: None,
                    };
                    let said = p.commands.execute_for_operator(cmd).await;
                    let said = said.unwrap_or_else(|e| e.message().to_string());
                    self.judge.note(format!("switchover on node {id}: {said}"));
                }
            }
            Kind::Pause { ms } => {
                let paused = self.operator(Op::Pause(true)).await;
                self.judge.note(format!("paused: {paused}"));
                sleep(ms).await;
                let resumed = self.operator(Op::Resume(true)).await;
                self.judge.note(format!("resumed: {resumed}"));
            }
            Kind::MemberOut { ms } => {
                let removed = self.operator(Op::MembersRemove(id)).await;
                self.judge.note(format!("node {id} removed: {removed}"));
                if removed {
                    sleep(ms).await;
                    let back = pb::Member {
                        id,
                        addr: crate::ports::addr(id),
                    };
                    let added = self.operator(Op::MembersAdd(back)).await;
                    self.judge.note(format!("node {id} added back: {added}"));
                }
            }
            Kind::Backup => {
                let image = host.disk.image();
                lock(&self.backups).insert(id, image);
            }
            Kind::Resume { ms } => self.resume_image(&host, ms).await,
            Kind::ReloadChains { ms } => self.reload_chains(&host, ms).await,
        }
    }

    /// `host`'s process reloaded without its chain (`Signer::reload`),
    /// then with it again `ms` later; requests in flight on the removed
    /// chain run on.
    async fn reload_chains(&self, host: &Arc<Host<Process>>, ms: u64) {
        let Some(signer) = host.process().and_then(|p| p.signer.clone()) else {
            return;
        };
        let chains: Vec<_> = signer.chains().iter().map(|c| c.cfg.clone()).collect();
        for (step, list) in [(0, Vec::new()), (ms, chains)] {
            tokio::time::sleep(Duration::from_millis(step)).await;
            let done = match signer.reload(list).await {
                Ok((plan, _)) => format!("{plan}"),
                Err(e) => format!("refused: {e}"),
            };
            self.judge
                .note(format!("node {} reloaded its chains: {done}", host.id));
        }
    }

    /// `host`'s process resumed from a memory image: polled each
    /// millisecond for `ms` until it has a signature not applied yet to
    /// forget (`Signer::forget_unapplied_last`); its sentry then asks for
    /// that HRS again with bytes of its own.
    async fn resume_image(&self, host: &Arc<Host<Process>>, ms: u64) {
        let id = host.id;
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            let signer = host.process().and_then(|p| p.signer.clone());
            if let Some(hrs) = signer.and_then(|s| s.forget_unapplied_last()) {
                self.judge.note(format!(
                    "node {id} resumed from a memory image: it forgot signing {hrs:?}"
                ));
                self.watch_witnesses(id, hrs);
                let sentries = Arc::new(crate::sentry::Sentries {
                    hosts: self.hosts.clone(),
                    judge: self.judge.clone(),
                    conflict: self.conflict,
                });
                crate::sentry::ask_other(sentries, id, hrs).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Watches, for the rest of the run, the processes up besides `id` when it
    /// forgot signing `hrs`: once every one of them has died (restarted,
    /// crashed, restored), no process alive knows of that signature, and
    /// the judge is told (`Judge::forgotten_by_all`).
    fn watch_witnesses(&self, id: NodeId, hrs: (u64, u32, u8)) {
        let witnesses: Vec<(NodeId, u64)> = self
            .hosts
            .all()
            .filter(|h| h.id != id)
            .filter_map(|h| h.process().map(|p| (h.id, p.inc)))
            .collect();
        let (hosts, judge) = (self.hosts.clone(), self.judge.clone());
        types::spawn(async move {
            loop {
                let alive = witnesses
                    .iter()
                    .any(|(w, inc)| hosts.get(*w).is_some_and(|h| h.is_process(*inc)));
                if !alive {
                    let at = judge.at_ms();
                    judge.note(format!(
                        "every process that heard node {id} sign {hrs:?} has lost its memory: {witnesses:?}"
                    ));
                    *lock(&judge.forgotten_by_all) = Some((hrs, at));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
}
