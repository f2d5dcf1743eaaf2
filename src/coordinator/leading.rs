//! The coordinator's handlers around leadership: campaigning, activation
//! (steps 2-4), the lease (step 5), fencing (step 6) and handover (steps 7
//! and 8). Split from [`super`] only for length; the same rules apply: the
//! decisions come from [`super::policy`], every effect on the validator
//! goes through [`super::custody`].

use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;

use super::host::Env;
use super::{campaign_jitter, custody, policy, Coordinator, Event, State, Wake};
use crate::ledger::{Command, KeyEvent, NodeId};
use crate::node::{CoordinatorRequest, StateName, SwitchoverRefused};
use crate::raft;

/// After a fence agent failed every attempt: the next takeover try.
const FENCE_RETRY: Duration = Duration::from_secs(5);

/// After the kernel fence could not be put in place: how long this node
/// stays ineligible, so that a standby with a working fence leads.
const KERNEL_FENCE_STAND_DOWN: Duration = Duration::from_secs(30);

impl<E: Env> Coordinator<E> {
    /// Requests in states where this node does not validate.
    pub(super) async fn idle_request(&mut self, req: CoordinatorRequest) {
        let CoordinatorRequest::Switchover { to, reply } = req;
        let m = self.sh.raft_metrics();
        let r = if m.state != ServerState::Leader {
            Err(SwitchoverRefused::NotLeader)
        } else if self.cluster_rx.borrow().key_holder() == Some(self.sh.cfg.id) {
            // A handover whose stop was not proven left the key unreleased.
            Err(SwitchoverRefused::StillHolds)
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

    /// A standby to hand leadership to by transfer: it must also have acked
    /// a heartbeat lately (see [`policy::standby`]).
    pub(super) fn handover_target(
        &self,
        want: Option<NodeId>,
    ) -> Result<NodeId, SwitchoverRefused> {
        policy::standby(&self.view(), want, true)
    }

    /// A leader that may not validate (a witness elected to bring a
    /// standby's log up to date, say) hands leadership to an eligible
    /// standby as soon as that standby holds every entry, once per term.
    /// Going quiet (see `publish`) would also get there, a whole lease
    /// later; it stays as the fallback if the transfer goes nowhere.
    pub(super) async fn hand_on(&mut self, m: &raft::Metrics) {
        // Never while this node holds the key unreleased: its validator's
        // death is not proven (no Released, no transfer), and a successor
        // elected by transfer would not wait out its lease.
        let holder = self.cluster_rx.borrow().key_holder() == Some(self.sh.cfg.id);
        let Ok(target) = self.handover_target(None) else {
            return;
        };
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned().flatten())
            .map(|l| l.index);
        let last = m.last_log_index;
        let handed = self.handed_on_in == Some(m.current_term);
        if !policy::may_hand_on(holder, handed, self.sh.leads(m), matched, last) {
            return; // Replication under way, or not allowed: the next change rechecks.
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
    /// lately (see [`raft::Gate::saw_behind_candidate`]), and otherwise
    /// after twice the lease without a leader.
    pub(super) async fn maybe_campaign(
        &mut self,
        m: &raft::Metrics,
        last_resort: bool,
    ) -> Duration {
        let t = self.sh.timing();
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
        let rank = policy::campaign_rank(&self.view());
        let due = policy::campaign_due(&t, last_resort, behind.is_some(), rank, self.jitter);
        if let Some(left) = policy::campaign_wait(quiet, due, self.sh.gate.promised_for()) {
            return left.max(Duration::from_millis(10));
        }
        let quiet_ms = quiet.as_millis() as u64;
        match (last_resort, behind) {
            (true, Some(candidate)) => tracing::info!(
                quiet_ms,
                candidate,
                "node {candidate} cannot win with a log behind this node's: standing for election to catch it up and hand over"
            ),
            (true, None) => tracing::warn!(
                quiet_ms,
                "no leader for twice the lease although a standby could validate: standing for election to catch it up"
            ),
            (false, _) => tracing::info!(quiet_ms, "leader silent past its lease: campaigning"),
        }
        let _ = self.sh.raft.trigger().elect(true).await;
        let rank = policy::campaign_rank(&self.view());
        self.next_campaign = Instant::now() + policy::campaign_retry(&t, rank);
        // A fresh jitter for the next round, so two standbys rarely collide.
        self.jitter = campaign_jitter(&mut self.rng, t.election_min);
        t.election_min
    }

    /// Sends the guard the lease deadline as it stands now. With the lease
    /// lapsed, or the guard unreachable, deactivates and returns the next
    /// state instead.
    pub(super) async fn renew_lease(&mut self) -> Result<u64, State> {
        let Some(deadline) = custody::lease_deadline(&self.sh, &*self.out, None) else {
            tracing::warn!(
                "lease expired: no quorum ack within {:?}",
                self.sh.timing().fence_after
            );
            return Err(self.deactivate("lease").await);
        };
        if !self.custody.has_validator() {
            return Err(State::Voting);
        }
        if let Err(e) = self.custody.arm(deadline).await {
            // A guard that does not take the lease cannot be trusted to
            // enforce it: presumed broken (deactivate replaces it).
            tracing::error!("{e}");
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
        let until = Instant::now() + d;
        loop {
            if !self.still_leader(term) {
                return Err(State::Voting);
            }
            match self
                .next_event(Wake {
                    until: Some(until),
                    ..Wake::default()
                })
                .await
            {
                Event::Shutdown => return Err(State::Shutdown),
                Event::Timer => return Ok(()),
                _ => {}
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
        prior: Option<KeyEvent>,
        previous: Option<NodeId>,
        term: u64,
    ) -> Result<(), State> {
        let Some(prior) = prior else {
            return Ok(()); // Nobody in this cluster ever held the key.
        };
        if !self.custody.height_watermark() {
            return Ok(()); // A witness, or --no-height-watermark: the lease alone.
        }
        let gossiped = previous.and_then(|p| {
            self.sh
                .view
                .snapshot()
                .get(&p)
                .and_then(|s| s.status.validator.as_ref().map(|v| v.height))
        });
        let now = self.custody.probe_height().await;
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
            // Only this host's keyless node can report the height: if it
            // died meanwhile (its death noted below), it starts again, or
            // this wait would never end while this node leads.
            self.custody.ensure_running(false).await;
            if self
                .custody
                .probe_height()
                .await
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
            let until = Instant::now() + Duration::from_millis(25);
            loop {
                match self
                    .next_event(Wake {
                        until: Some(until),
                        validator: true,
                        ..Wake::default()
                    })
                    .await
                {
                    Event::Shutdown => return Err(State::Shutdown),
                    Event::Timer => break,
                    Event::Validator(ev) => {
                        self.on_exit(&ev).await;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Step 3: before this node takes the key over from a holder that did
    /// not release it, that holder's fence agent (if it has one here)
    /// powers its host off, confirmed. Reads the ledger as of this term
    /// first. Returns the node fenced; on failure no takeover: back to
    /// `Voting`, leading, and the next try fences first again.
    async fn fence_previous(&mut self, term: u64) -> Result<Option<NodeId>, State> {
        let fence = &self.sh.cfg.fence;
        if fence.by_node.is_empty() {
            return Ok(None);
        }
        let read = self
            .sh
            .raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex);
        let t = self.sh.timing();
        let ok = tokio::select! {
            _ = self.shutdown.requested() => return Err(State::Shutdown),
            r = tokio::time::timeout(t.election_max * 2, read) => matches!(r, Ok(Ok(_))),
        };
        if !ok || !self.still_leader(term) {
            self.next_activation = Instant::now() + t.heartbeat;
            return Err(State::Voting);
        }
        let last = self.cluster_rx.borrow().last_key_event;
        let target = self.owed_fence.or_else(|| {
            policy::fence_target(last, self.sh.cfg.id, |n| fence.by_node.contains_key(&n))
        });
        let Some(node) = target else {
            return Ok(None);
        };
        // Given up (its process group killed) if this node stops leading:
        // the next leader decides again, and may be the fenced node itself.
        let sh = self.sh.clone();
        let deposed = async move {
            loop {
                tokio::time::sleep(sh.timing().heartbeat).await;
                let m = sh.raft_metrics();
                if m.state != ServerState::Leader || m.current_term != term {
                    return;
                }
            }
        };
        let done = tokio::select! {
            _ = self.shutdown.requested() => return Err(State::Shutdown),
            () = deposed => {
                tracing::warn!(node, "no longer leading: fence agent for node {node} stopped");
                return Err(State::Voting);
            }
            r = self.custody.power_off(node) => r,
        };
        match done {
            Ok(()) => {
                self.owed_fence = None;
                Ok(Some(node))
            }
            Err(why) => {
                tracing::error!(
                    node,
                    retry_in_s = FENCE_RETRY.as_secs(),
                    "NOT TAKING OVER: node {node} was not fenced ({why}); no takeover until its fence agent confirms it off"
                );
                self.next_activation = Instant::now() + FENCE_RETRY;
                Err(State::Voting)
            }
        }
    }

    /// Steps 2 to 4: commit, wait out the old lease, arm the guard, link, start.
    pub(super) async fn activate(&mut self, term: u64) -> State {
        let t = self.sh.timing();
        let id = self.sh.cfg.id;
        let previous = self.cluster_rx.borrow().key_holder().filter(|n| *n != id);
        // When the previous holder was last heard from as leader (not a
        // witness that led in between to catch this node up).
        let lost_at = previous
            .and_then(|p| self.sh.gate.since_contact_from(p))
            .or_else(|| self.sh.gate.since_leader_contact())
            .map(|d| Instant::now() - d);
        let elected = Instant::now();
        let fenced = match self.fence_previous(term).await {
            Ok(fenced) => fenced,
            Err(next) => return next,
        };
        let fenced_at = Instant::now();
        tracing::info!(term, "elected leader: committing activation");
        let write = self
            .sh
            .raft
            .client_write(Command::Activate { node: id, term });
        let prior = tokio::select! {
            _ = self.shutdown.requested() => return State::Shutdown,
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
        let has_agent = |n| self.sh.cfg.fence.by_node.contains_key(&n);
        if let Some(n) = policy::fence_target(prior, id, has_agent).filter(|n| fenced != Some(*n)) {
            // The ledger read before the fence said otherwise; cannot
            // happen while this node leads, but if it did, that host is
            // fenced before anything starts here.
            tracing::error!(
                "the key's last holder is node {n}, not the one fenced: fencing it first"
            );
            self.owed_fence = Some(n);
            return State::Voting;
        }
        let clean = prior.is_none_or(|p| p.released);
        let since_holder = prior
            .filter(|p| !p.released && p.node != id)
            .and_then(|p| self.sh.gate.since_contact_from(p.node));
        let wait = policy::takeover_wait(clean, since_holder, self.sh.gate.promised_for(), &t);
        if !wait.is_zero() {
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                "waiting out the previous holder's lease"
            );
            if let Err(next) = self.hold(wait, term).await {
                return next;
            }
        }
        let held = Instant::now();
        if let Err(next) = self.wait_for_new_height(prior, previous, term).await {
            return next;
        }
        let height_passed = Instant::now();
        if !self.custody.has_validator() {
            return State::Voting;
        }
        if let Err(e) = self.custody.stop_standby(t.stop_timeout).await {
            tracing::error!("{e}");
            return self.deactivate("validator_exit").await;
        }
        if let Err(e) = self.custody.ensure_kernel_fence().await {
            // Not eligible for a while: leadership goes to a standby that
            // has its fence, instead of this node retrying at every beat.
            tracing::error!("not activating: {e}; standing down for {KERNEL_FENCE_STAND_DOWN:?}");
            self.stand_down_until = Some(Instant::now() + KERNEL_FENCE_STAND_DOWN);
            return self.deactivate("kernel_fence").await;
        }
        // Arm the guard before the key appears: from here on, a frozen or
        // dead coordinator cannot keep the validator alive past the lease.
        if !self.still_leader(term) {
            return State::Voting;
        }
        if let Err(next) = self.renew_lease().await {
            return next;
        }
        if let Err(e) = self.custody.link_and_start().await {
            tracing::error!("{e}");
            return self.deactivate("validator_exit").await;
        }
        if let (Some(prev), Some(lost)) = (previous, lost_at) {
            let took = lost.elapsed();
            self.sh.metrics.failover_seconds.observe(took.as_secs_f64());
            // Where the time went (docs/benchmarks.md, "Failover budget").
            let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis() as u64;
            tracing::info!(
                from = prev,
                took_ms = took.as_millis() as u64,
                silent_ms = ms(lost, elected),
                fence_ms = ms(elected, fenced_at),
                commit_ms = ms(fenced_at, committed),
                hold_ms = ms(committed, held),
                height_ms = ms(held, height_passed),
                start_ms = ms(height_passed, Instant::now()),
                "failover complete"
            );
        }
        // `clean`: the previous holder released the key (no lease to wait).
        tracing::info!(term, clean, "VALIDATING");
        State::Validating { term }
    }

    /// Step 6: fencing deactivation (see [`custody::Custody::fence`]).
    pub(super) async fn deactivate(&mut self, reason: &'static str) -> State {
        if !self.custody.has_validator() {
            return State::Voting;
        }
        self.custody.fence(reason).await;
        State::Startup
    }

    /// Steps 7 and 8: release first, and only then transfer. Without the
    /// release, no transfer: this leader goes quiet (see `publish`) and the
    /// successor waits out the lease.
    pub(super) async fn handover(&mut self, term: u64, target: NodeId) -> State {
        self.handover_released(term, target).await.0
    }

    /// As [`Self::handover`], and whether the key was released.
    pub(super) async fn handover_released(&mut self, term: u64, target: NodeId) -> (State, bool) {
        tracing::info!("handing over to node {target}");
        let released = self.custody.stop_and_release(term, "handover").await;
        self.stand_down_until = Some(Instant::now() + self.sh.timing().election_max * 2);
        self.publish(StateName::Startup);
        if !released {
            tracing::error!("no release committed: not transferring leadership; the successor waits out the lease");
        } else if let Err(e) = self.sh.raft.trigger().transfer_leader(target).await {
            tracing::error!("transfer of leadership failed: {e}");
        }
        (State::Startup, released)
    }

    pub(super) async fn release_for_shutdown(&mut self, term: u64) -> State {
        if self.custody.stop_and_release(term, "shutdown").await {
            if let Ok(target) = self.handover_target(None) {
                tracing::info!("shutting down: handing leadership to node {target}");
                let _ = self.sh.raft.trigger().transfer_leader(target).await;
            }
        }
        State::Shutdown
    }
}
