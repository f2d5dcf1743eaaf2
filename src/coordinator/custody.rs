//! Key custody: every effect on this host's validator, in the order the
//! safety protocol needs (docs/design.md, steps 4 to 8).
//!
//! - taking the key: arm the guard with the lease, then link, then start
//!   (or SIGHUP) the validator;
//! - fencing: SIGKILL of the whole tree, proven dead, then unlink, then
//!   unlease (only once proven);
//! - releasing: graceful stop with the lease kept alive, proven dead,
//!   unlink, unlease, and only then commit `Released`;
//! - fencing another host: its fence agent powers it off, confirmed,
//!   before a takeover that was not handed over.
//!
//! Owns: the only handle on this host's validator (a [`Host`]: the real
//! [`crate::supervisor::Validator`], or the simulator's model; no other
//! module of the coordinator touches it), the validator's health channel,
//! and the deactivation and restart metrics. Must not: decide whether to
//! take or give up the key; [`super`] decides, with [`super::policy`].

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::ServerState;
use tokio::sync::watch;
use tokio::time::Instant;

use super::host::{Env, Host, Outside};
use super::policy;
use crate::config::ActivateBy;
use crate::fence::agent::AgentError;
use crate::fence::{FenceError, GuardError, ValidatorEvent};
use crate::health::Health;
use crate::ledger::{Command, NodeId};
use crate::node::{quorum_ack_age, Core};
use crate::raft::TypeConfig;
use crate::supervisor::ProgramRefused;

/// Why a custody step failed; the caller fences.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("this node has no validator (a witness)")]
    NoValidator,
    #[error("cannot stop the standby node: {0}")]
    StopStandby(GuardError),
    #[error("the guard did not take the lease: {0}")]
    Lease(GuardError),
    #[error("cannot link the key: {0}")]
    Link(FenceError),
    #[error("cannot start the validator with the key: {0}")]
    Start(GuardError),
    #[error("the kernel fence is not in place: {0}")]
    KernelFence(crate::fence::kernel::KernelError),
    #[error("no fence agent for node {0}")]
    NoFenceAgent(NodeId),
    #[error("{agent} could not fence node {node} in {attempts} attempts (the last took {last_ms} ms): {last}")]
    NotFenced {
        node: NodeId,
        agent: String,
        attempts: u32,
        last_ms: u64,
        last: AgentError,
    },
    /// `--fence-attempts 0`, which the configuration refuses.
    #[error("no attempt was made to fence node {0}")]
    NoAttempt(NodeId),
}

/// The validator side of this host, as the coordinator may touch it.
pub struct Custody<E: Env> {
    sh: Arc<Core<E::Machine>>,
    out: Arc<E::Outside>,
    node: Option<E::Host>,
    health_rx: Option<watch::Receiver<Option<Health>>>,
    /// The program the cluster committed for this host's node, as last
    /// followed, and why it was refused if it was.
    program: Option<String>,
    refused: Option<ProgramRefused>,
}

impl<E: Env> Custody<E> {
    /// `node` and `health_rx` are `None` on a witness.
    pub fn new(
        sh: Arc<Core<E::Machine>>,
        out: Arc<E::Outside>,
        node: Option<E::Host>,
        health_rx: Option<watch::Receiver<Option<Health>>>,
    ) -> Custody<E> {
        Custody {
            sh,
            out,
            node,
            health_rx,
            program: None,
            refused: None,
        }
    }

    pub fn has_validator(&self) -> bool {
        self.node.is_some()
    }

    /// The validator's health as this host sees it: `None` on a witness,
    /// not running if the process is down or does not answer.
    pub fn health(&self) -> Option<Health> {
        let node = self.node.as_ref()?;
        let probed = self.health_rx.as_ref().and_then(|h| *h.borrow());
        Some(match (node.running(), probed) {
            (Some(_), Some(h)) => h,
            _ => Health::default(),
        })
    }

    /// Whether the validator process runs (false on a witness).
    pub fn running(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.running().is_some())
    }

    pub fn key_linked(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.linked())
    }

    /// When a stopped validator may be started again (backoff), if there
    /// is one that is not running.
    pub fn restart_at(&self) -> Option<Instant> {
        self.node
            .as_ref()
            .filter(|n| n.running().is_none())
            .map(|n| n.next_start())
    }

    /// The earliest a start may be tried (now on a witness).
    pub fn next_start(&self) -> Instant {
        self.node
            .as_ref()
            .map_or(Instant::now(), |n| n.next_start())
    }

    /// The next unasked validator event (never resolves on a witness).
    pub async fn event(&mut self) -> ValidatorEvent {
        match &mut self.node {
            Some(n) => n.event().await,
            None => std::future::pending().await,
        }
    }

    /// Starts the validator if it is down and its backoff allows; keyless
    /// unless `with_key`.
    pub async fn ensure_running(&mut self, with_key: bool) {
        if let Some(node) = &mut self.node {
            node.ensure_running(with_key).await;
        }
    }

    /// A validator exit nobody asked for. Returns false if the news is
    /// about a validator already replaced (nothing changed).
    pub async fn on_exit(&mut self, ev: &ValidatorEvent) -> bool {
        let Some(node) = &mut self.node else {
            return false;
        };
        match ev {
            ValidatorEvent::Fenced(pid, how) => {
                tracing::error!(pid, "guard fenced the validator: {how}");
                if !node.mark_exited(*pid) {
                    return false;
                }
            }
            ValidatorEvent::Exited(pid, how) => {
                if !node.mark_exited(*pid) {
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

    /// The program the cluster committed for this host's node (`keyraft
    /// upgrade --binary`), taken from the node's next start. A running
    /// node without the key is stopped (proven) and started again as it at
    /// once; a keyed one keeps running until its next start. A file that
    /// is not an executable here is refused (tried again each call).
    pub async fn follow_program(&mut self) {
        let committed = self
            .sh
            .cluster
            .borrow()
            .binaries
            .get(&self.sh.cfg.id)
            .cloned();
        let (Some(node), Some(program)) = (&mut self.node, committed) else {
            return;
        };
        let program = program.as_str();
        if self.program.as_deref() == Some(program) && self.refused.is_none() {
            return;
        }
        self.program = Some(program.to_string());
        let was_refused = self.refused.take();
        match node.use_program(program).await {
            Ok(false) => {}
            Ok(true) if node.running().is_some() && !node.linked() => {
                tracing::info!(
                    program,
                    "restarting this standby's node as the program the cluster committed for it"
                );
                let grace = self.sh.cfg.timing.stop_timeout;
                if let Err(e) = node.stop_proven(grace, || None).await {
                    tracing::error!("cannot stop the standby node for its new program: {e}");
                }
                node.start_at_once();
                node.ensure_running(false).await;
            }
            Ok(true) => {
                tracing::info!(program, "the node runs as this program from its next start")
            }
            Err(e) => {
                if was_refused.as_ref() != Some(&e) {
                    tracing::error!("keeping the node's program: {e}");
                }
                self.refused = Some(e);
            }
        }
    }

    /// The program this host's node was last started as, and why it does
    /// not run the one the cluster committed, if it does not.
    pub fn program(&self) -> (Option<String>, Option<&ProgramRefused>) {
        let started = self.node.as_ref().and_then(|n| n.started_as());
        (started, self.refused.as_ref())
    }

    /// Whether a successor waits for a new block height (`--no-height-watermark` turns it off).
    pub fn height_watermark(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.height_watermark())
    }

    /// The height this host's node reports now, if it answers with one.
    pub async fn probe_height(&self) -> Option<u64> {
        self.node.as_ref()?.probe_height().await
    }

    /// Step 4, first part: in restart mode, the keyless standby node stops
    /// (proven) before the key appears.
    pub async fn stop_standby(&mut self, grace: Duration) -> Result<(), CustodyError> {
        let node = self.node.as_mut().ok_or(CustodyError::NoValidator)?;
        if node.activate_by() == ActivateBy::Restart && node.running().is_some() {
            node.stop_proven(grace, || None)
                .await
                .map_err(CustodyError::StopStandby)?;
        }
        Ok(())
    }

    /// Step 4, before the lease is armed: the kernel fence is whole (put
    /// back if something removed it); nothing to do without one.
    pub async fn ensure_kernel_fence(&mut self) -> Result<(), CustodyError> {
        let node = self.node.as_ref().ok_or(CustodyError::NoValidator)?;
        node.ensure_kernel_fence()
            .await
            .map_err(CustodyError::KernelFence)
    }

    /// Arms (or renews) the guard's lease: from here on, a frozen or dead
    /// coordinator cannot keep the validator alive past `deadline_ns`.
    pub async fn arm(&mut self, deadline_ns: u64) -> Result<(), CustodyError> {
        let node = self.node.as_mut().ok_or(CustodyError::NoValidator)?;
        node.lease(Some(deadline_ns))
            .await
            .map_err(CustodyError::Lease)
    }

    /// Step 4, last part (after [`Self::arm`]): link the key, then start the
    /// validator with it (or SIGHUP a running one).
    pub async fn link_and_start(&mut self) -> Result<(), CustodyError> {
        let node = self.node.as_mut().ok_or(CustodyError::NoValidator)?;
        node.links(true).await.map_err(CustodyError::Link)?;
        match (node.activate_by(), node.running()) {
            (ActivateBy::Sighup, Some(_)) => node.sighup().await,
            _ => node.start().await,
        }
        .map_err(CustodyError::Start)?;
        self.sh.metrics.activations.inc();
        Ok(())
    }

    /// Step 6, fencing: SIGKILL of the whole tree, proven, then unlink,
    /// then (only with the proof) unlease. Nothing is released: a
    /// successor waits out the lease.
    pub async fn fence(&mut self, reason: &'static str) {
        let Some(node) = &mut self.node else {
            return;
        };
        let proven = node.kill_proven().await;
        if let Err(e) = node.links(false).await {
            tracing::error!("cannot unlink the key: {e}");
        }
        match proven {
            // The lease may be disarmed only once the tree is proven dead.
            Ok(()) => {
                let _ = node.lease(None).await;
            }
            Err(e) => tracing::error!("{e}"),
        }
        node.start_at_once();
        self.count_deactivation(reason);
        tracing::warn!(reason, "DEACTIVATED: validator killed, key unlinked");
    }

    fn count_deactivation(&self, reason: &str) {
        self.sh
            .metrics
            .deactivations
            .with_label_values(&[reason])
            .inc();
    }

    /// Steps 7 and 8: stops the validator gracefully (the lease kept alive
    /// while this node leads `term` with quorum acks), proves its tree
    /// dead, unlinks, unleases, and commits `Released` with the last height
    /// the chain reached. Returns whether the release was committed; it is
    /// not even tried without the proof and the unlink.
    pub async fn stop_and_release(&mut self, term: u64, reason: &'static str) -> bool {
        let t = self.sh.timing();
        // The last height the node reached, fresh, for the successor's watermark.
        let mut height = self.health().and_then(|h| h.height);
        if let Some(node) = &mut self.node {
            height = height.max(node.probe_height().await);
            let (sh, out) = (self.sh.clone(), self.out.clone());
            let renew = move || lease_deadline(&sh, &*out, Some(term));
            let proven = node.stop_proven(t.stop_timeout, renew).await;
            if let Err(e) = node.links(false).await {
                tracing::error!("cannot unlink the key: {e}");
            }
            if let Err(e) = &proven {
                tracing::error!("not releasing the key: {e}");
            }
            // The kernel fence's lease too, verified (and only with the
            // proof): a successor starts at once after `Released`.
            let unleased = proven.is_ok() && {
                let withdrawn = node.lease(None).await;
                if let Err(e) = &withdrawn {
                    tracing::error!(
                        "not releasing the key: the lease could not be withdrawn ({e})"
                    );
                }
                withdrawn.is_ok()
            };
            if node.linked() {
                tracing::error!("not releasing the key: it is still linked");
            }
            if !policy::may_release(proven.is_ok(), unleased, !node.linked()) {
                return false;
            }
            node.start_at_once();
            // The node may have signed on through a long graceful stop: the
            // successor must wait past what the chain had reached at its
            // death, which this host's peers now report.
            let seen = self
                .sh
                .view
                .snapshot()
                .values()
                .filter_map(|p| p.status.validator.as_ref().map(|v| v.height))
                .max();
            height = height.max(seen);
        }
        self.count_deactivation(reason);
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

    /// Step 3: powers `node`'s host off with its fence agent before this
    /// node takes the key over from it, up to the configured attempts.
    /// Every attempt is logged, counted and shown in `status`. `Ok` only
    /// once the agent's `status` said off; without an agent for `node`,
    /// an error (the caller asks [`policy::fence_target`] first).
    pub async fn power_off(&self, node: NodeId) -> Result<(), CustodyError> {
        let fence = &self.sh.cfg.fence;
        let Some(agent) = fence.by_node.get(&node) else {
            return Err(CustodyError::NoFenceAgent(node));
        };
        let name = agent.path.file_name().map_or_else(
            || agent.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut failed = None;
        for attempt in 1..=fence.attempts {
            let started = Instant::now();
            tracing::warn!(node, attempt, agent = %name, "fencing node {node}: its host is powered off before this node takes the key over");
            let outcome = self.out.power_off_once(agent, fence.timeout).await;
            let ms = started.elapsed().as_millis() as u64;
            let result = outcome.as_ref().map_or_else(|e| e.label(), |()| "off");
            self.sh
                .metrics
                .fence_agent_attempts
                .with_label_values(&[&node.to_string(), result])
                .inc();
            let last = match &outcome {
                Ok(()) => format!("off: {name} confirmed node {node} off (attempt {attempt}, {ms} ms)"),
                Err(e) => format!(
                    "failed: {name} could not fence node {node} (attempt {attempt} of {}, {ms} ms): {e}",
                    fence.attempts
                ),
            };
            self.sh
                .fence_agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node, last.clone());
            match outcome {
                Ok(()) => {
                    tracing::info!(node, attempt, took_ms = ms, "{last}");
                    return Ok(());
                }
                Err(e) => {
                    tracing::error!(node, attempt, took_ms = ms, "{last}");
                    failed = Some((e, ms));
                }
            }
        }
        Err(match failed {
            Some((last, last_ms)) => CustodyError::NotFenced {
                node,
                agent: name,
                attempts: fence.attempts,
                last_ms,
                last,
            },
            None => CustodyError::NoAttempt(node),
        })
    }

    /// Shutdown without the key (or after releasing it): stop, prove, unlink.
    pub async fn stop_for_shutdown(&mut self) {
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

/// The lease deadline, in CLOCK_MONOTONIC ns, while this node leads (in
/// `term`, if given): see [`policy::lease_deadline`]. Every deadline the
/// guard or the kernel fence is given comes from here, so this is also
/// where this node promises not to vote before it has passed (plus the
/// kill bound and drift): the leader's own vote must not elect a successor
/// while its validator may still run, whatever openraft's own lease says.
pub fn lease_deadline<SM: RaftStateMachine<TypeConfig>>(
    sh: &Core<SM>,
    out: &impl Outside,
    term: Option<u64>,
) -> Option<u64> {
    let m = sh.raft_metrics();
    let (live, before, since_change) = sh.gate.live_change();
    let fence =
        |basis| policy::fence_in_force(live.fence_after, before.fence_after, since_change, basis);
    let deadline = lease_deadline_of(&m, term, || out.mono_now_ns(), fence)?;
    // openraft's leader refuses votes for its lease after the last quorum
    // ack by itself; only a longer fence (a longer profile's) needs more.
    let t = &sh.cfg.timing;
    let (_, openraft_lease) = t.raft_elections();
    if live.fence_after + t.kill_bound + t.drift_margin > openraft_lease {
        // The clock read first: the time left is then over-, never
        // under-stated.
        let now_ns = out.mono_now_ns();
        let left = Duration::from_nanos(deadline.saturating_sub(now_ns));
        sh.gate
            .promise_until(tokio::time::Instant::now() + left + t.kill_bound + t.drift_margin);
    }
    Some(deadline)
}

/// [`lease_deadline`] over any node's Raft metrics and clock (`now_ns`,
/// the simulator passes its own): the deadline while `m` shows this node
/// leading (in `term`, if given), from its last quorum ack, with the fence
/// `fence_after` gives for that ack's age.
pub fn lease_deadline_of<C: openraft::RaftTypeConfig<Term = u64>>(
    m: &openraft::RaftMetrics<C>,
    term: Option<u64>,
    now_ns: impl FnOnce() -> u64,
    fence_after: impl FnOnce(Duration) -> Duration,
) -> Option<u64> {
    let leads = m.state == ServerState::Leader && term.is_none_or(|t| t == m.current_term);
    // `now` before `age`: a stall between the two reads then moves the
    // deadline earlier, never later.
    let now = now_ns();
    let basis = policy::lease_basis(leads, quorum_ack_age(m));
    policy::lease_deadline(now, basis, fence_after(basis?))
}
