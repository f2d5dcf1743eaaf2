//! keyraft's own coordinator (`keyraft::coordinator::Coordinator`: its
//! state enum, handlers, custody and policy) on a simulated host. This
//! module holds only the two edges its `host` traits name, as models:
//!
//! - [`SimValidator`], the `Host`: the validator's process tree, the guard
//!   and the kernel fence of [`crate::host`], each call bounded and able
//!   to fail as the real one is (a frozen guard times out after
//!   `kill_bound`, a dead one fails at once, a kill takes time or never
//!   completes, a stop is slow);
//! - [`SimOutside`], the `Outside`: the simulation's clock, and a rejoin
//!   asked of the leader through the process's own `admin::Commands`; no
//!   fence agents (none are configured).
//!
//! A frozen keyraft ([`crate::host::Freeze`]) is a coordinator that is not
//! polled at all until it thaws ([`while_thawed`]), as SIGSTOP does.
//!
//! Owns: the model of what custody touches. Must not: decide or order
//! anything; the real coordinator does.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use keyraft::config::{ActivateBy, FenceAgent};
use keyraft::coordinator::host::{Env, Host as CustodyHost, Outside};
use keyraft::coordinator::{Coordinator, Parts};
use keyraft::fence::agent::AgentError;
use keyraft::fence::kernel::KernelError;
use keyraft::fence::protocol::Refusal;
use keyraft::fence::{FenceError, GuardError, NotProven, ValidatorEvent};
use keyraft::health::Health;
use keyraft::ledger::NodeId;
use keyraft::node::CoordinatorRequest;
use keyraft::pb;
use keyraft::supervisor::ProgramRefused;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::host::{while_thawed, Host, Hosts};
use crate::judge::Judge;
use crate::node::Process;

/// A simulated process: the models here, the simulation's state machine.
pub struct Sim;

impl Env for Sim {
    type Host = SimValidator;
    type Outside = SimOutside;
    type Machine = keyraft::raft::store::StateMachine;
}

/// Starts the real coordinator of `p` (and its health probe), both frozen
/// with keyraft's processes.
pub fn spawn(
    p: &Arc<Process>,
    hosts: &Arc<Hosts<Process>>,
    judge: &Arc<Judge>,
    requests: mpsc::Receiver<CoordinatorRequest>,
    seed: u64,
) {
    let Some(host) = hosts.get(p.id) else {
        return;
    };
    let (health_tx, health_rx) = watch::channel(None);
    let node = SimValidator {
        host: host.clone(),
        hosts: hosts.clone(),
        judge: judge.clone(),
        timing: p.timing,
        pid: None,
        next_start: Instant::now(),
        restarts: 0,
        guard_lost_told: false,
    };
    let (_never, shutdown) = keyraft::shutdown::channel();
    let mut c = Coordinator::<Sim>::new(Parts {
        core: p.core.clone(),
        outside: Arc::new(SimOutside {
            judge: judge.clone(),
            process: Arc::downgrade(p),
        }),
        node: Some(node),
        health_rx: Some(health_rx),
        requests,
        shutdown,
        rejoining: p.rejoining,
        seed,
    });
    let span = tracing::info_span!("node", id = p.id);
    p.spawn(while_thawed(
        &host,
        tracing::Instrument::instrument(
            async move {
                // Kept alive for the coordinator's life: a dropped trigger
                // would read as a shutdown.
                let _keep = _never;
                c.run().await;
            },
            span,
        ),
    ));
    let (h, j) = (host.clone(), judge.clone());
    let every = p.timing.health_interval;
    p.spawn(while_thawed(&host, async move {
        loop {
            let seen = h.validator_acts(Instant::now()).then(|| Health {
                running: true,
                synced: true,
                height: Some(j.height()),
            });
            health_tx.send_if_modified(|cur| {
                let changed = *cur != seen;
                *cur = seen;
                changed
            });
            tokio::time::sleep(every).await;
        }
    }));
}

/// The clock of the run, and the leader, asked through the process's own
/// `admin::Commands` (a rejoin); no fence agents.
pub struct SimOutside {
    judge: Arc<Judge>,
    process: Weak<Process>,
}

impl Outside for SimOutside {
    fn mono_now_ns(&self) -> u64 {
        self.judge.now_ns()
    }

    async fn ask_leader(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
    ) -> Result<String, tonic::Status> {
        let p = self
            .process
            .upgrade()
            .ok_or_else(|| tonic::Status::unavailable("stopped"))?;
        p.commands
            .execute_on(leader, cmd, keyraft::admin::NODE_REQUEST_DEADLINE)
            .await
    }

    async fn power_off_once(
        &self,
        _agent: &FenceAgent,
        _timeout: Duration,
    ) -> Result<(), AgentError> {
        Err(AgentError::Spawn {
            agent: "none".into(),
            why: "fence agents are not simulated".into(),
        })
    }
}

/// This host's validator side, as the real custody drives it.
pub struct SimValidator {
    host: Arc<Host<Process>>,
    hosts: Arc<Hosts<Process>>,
    judge: Arc<Judge>,
    timing: keyraft::config::Timing,
    /// The validator this keyraft process started and has not seen exit
    /// (the guard client's `running`).
    pid: Option<u32>,
    next_start: Instant,
    restarts: u32,
    /// `GuardLost` was reported for the guard now dead.
    guard_lost_told: bool,
}

impl SimValidator {
    fn kill_bound(&self) -> Duration {
        self.timing.kill_bound
    }

    /// Waits, up to `kill_bound`, for a guard that answers.
    async fn guard_answers(&self) -> Result<(), GuardError> {
        let bound = Instant::now() + self.kill_bound();
        loop {
            {
                let b = self.host.below();
                if !b.guard_alive {
                    return Err(GuardError::GuardLost);
                }
                if !b.guard_frozen {
                    return Ok(());
                }
            }
            if Instant::now() >= bound {
                return Err(GuardError::Timeout(self.kill_bound()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the tree is dead, at most `bound`.
    async fn prove_dead(&self, bound: Duration) -> Result<(), GuardError> {
        let now = Instant::now();
        if self.host.reap(now) {
            return Ok(());
        }
        let until = match self.host.kill_tree(now) {
            Some(at) if at <= now + bound => at,
            _ => now + bound,
        };
        tokio::time::sleep_until(until).await;
        if self.host.reap(Instant::now()) {
            Ok(())
        } else {
            Err(GuardError::NotProven(NotProven::Scan(
                FenceError::Survivors {
                    pids: Default::default(),
                    limit: bound,
                },
            )))
        }
    }

    /// The guard starts a validator: keyed only under a live lease, never
    /// beside one still running.
    async fn start_now(&mut self) -> Result<(), GuardError> {
        self.guard_answers().await?;
        let now = Instant::now();
        let pid = {
            let mut b = self.host.below();
            if let Some(v) = b.validator.filter(|v| v.dies_at.is_none_or(|t| now < t)) {
                return Err(GuardError::Refused(Refusal::Running(v.pid)));
            }
            if b.linked && b.lease.is_none_or(|l| l <= now) {
                return Err(GuardError::Refused(Refusal::NoLease));
            }
            b.pids += 1;
            let pid = b.pids;
            b.validator = Some(crate::host::Validator {
                pid,
                keyed: b.linked,
                dies_at: None,
            });
            pid
        };
        self.pid = Some(pid);
        self.host.changed.notify_waiters();
        self.judge.usable(&self.hosts, self.host.id);
        Ok(())
    }
}

impl CustodyHost for SimValidator {
    fn running(&self) -> Option<u32> {
        self.pid
    }

    fn linked(&self) -> bool {
        self.host.below().linked
    }

    fn next_start(&self) -> Instant {
        self.next_start
    }

    fn height_watermark(&self) -> bool {
        true
    }

    fn activate_by(&self) -> ActivateBy {
        ActivateBy::Restart
    }

    fn mark_exited(&mut self, pid: u32) -> bool {
        if self.pid == Some(pid) {
            self.pid = None;
            true
        } else {
            false
        }
    }

    fn backoff(&mut self) {
        self.restarts = (self.restarts + 1).min(6);
        self.next_start = Instant::now() + keyraft::supervisor::restart_delay(self.restarts);
    }

    fn start_at_once(&mut self) {
        self.next_start = Instant::now();
    }

    /// The guard's news: its own death, or the death of the validator this
    /// process started (fenced by the guard's timer, or otherwise).
    async fn event(&mut self) -> ValidatorEvent {
        loop {
            let notified = self.host.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            self.host.reap(now);
            let dies_at = {
                let b = self.host.below();
                if !b.guard_alive && !self.guard_lost_told {
                    self.guard_lost_told = true;
                    return ValidatorEvent::GuardLost;
                }
                if b.guard_alive {
                    self.guard_lost_told = false;
                }
                b.validator.and_then(|v| v.dies_at)
            };
            if let Some(pid) = self.pid {
                let gone = self.host.below().validator.filter(|v| v.pid == pid);
                if gone.is_none() {
                    let fenced = std::mem::take(&mut self.host.below().fenced_pid) == Some(pid);
                    return if fenced {
                        ValidatorEvent::Fenced(pid, "lease expired".into())
                    } else {
                        ValidatorEvent::Exited(pid, "killed".into())
                    };
                }
            }
            let wake = async {
                match dies_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = wake => {}
            }
        }
    }

    async fn ensure_running(&mut self, with_key: bool) {
        if self.pid.is_some() || Instant::now() < self.next_start {
            return;
        }
        if !with_key && self.linked() && self.links(false).await.is_err() {
            self.backoff();
            return;
        }
        if self.start_now().await.is_err() {
            self.backoff();
        }
    }

    async fn start(&mut self) -> Result<(), GuardError> {
        self.next_start = Instant::now();
        self.restarts = 0;
        self.start_now().await
    }

    async fn sighup(&mut self) -> Result<(), GuardError> {
        Err(GuardError::Refused(Refusal::BadRequest(
            "activation by SIGHUP is not simulated".into(),
        )))
    }

    fn probe_height(&self) -> impl Future<Output = Option<u64>> + Send {
        let acts = self.host.validator_acts(Instant::now());
        let height = self.judge.height();
        async move { acts.then_some(height) }
    }

    /// The guard takes the lease and renews the kernel fence's element
    /// with it; `None` withdraws both.
    async fn lease(&mut self, deadline_ns: Option<u64>) -> Result<(), GuardError> {
        self.guard_answers().await?;
        let deadline = deadline_ns.map(|ns| self.judge.at_ns(ns));
        let was = {
            let mut b = self.host.below();
            let was = b.kernel.is_some_and(|k| Instant::now() < k);
            b.lease = deadline;
            b.kernel = deadline;
            was
        };
        self.host.changed.notify_waiters();
        if deadline.is_some() && !was {
            self.judge.usable(&self.hosts, self.host.id);
        }
        Ok(())
    }

    async fn links(&mut self, active: bool) -> Result<(), FenceError> {
        self.host.below().linked = active;
        Ok(())
    }

    async fn ensure_kernel_fence(&self) -> Result<(), KernelError> {
        Ok(())
    }

    /// The guard kills and proves; one that does not answer within
    /// `kill_bound` is replaced, the tree killed from here.
    async fn kill_proven(&mut self) -> Result<(), GuardError> {
        if self.guard_answers().await.is_err() {
            return self.replace_guard().await;
        }
        let proof = self.prove_dead(self.kill_bound()).await;
        if proof.is_ok() {
            self.pid = None;
        }
        proof
    }

    /// SIGTERM takes effect once the stop's time has passed, unless the
    /// tree ignores signals; the lease is renewed meanwhile; SIGKILL after
    /// `grace`.
    async fn stop_proven(
        &mut self,
        grace: Duration,
        mut renew: impl FnMut() -> Option<u64> + Send,
    ) -> Result<(), GuardError> {
        if self.guard_answers().await.is_err() {
            return self.replace_guard().await;
        }
        let started = Instant::now();
        let exits = started + self.host.below().faults.stop_time;
        while Instant::now() < started + grace {
            if Instant::now() >= exits && !self.host.below().faults.unkillable {
                self.host.below().validator = None;
                self.host.changed.notify_waiters();
                self.pid = None;
                return Ok(());
            }
            if let Some(d) = renew() {
                if self.lease(Some(d)).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(self.timing.heartbeat).await;
        }
        let proof = self.prove_dead(self.kill_bound()).await;
        if proof.is_ok() {
            self.pid = None;
        }
        proof
    }

    /// A new guard; the tree killed from here first, and proven dead.
    async fn replace_guard(&mut self) -> Result<(), GuardError> {
        let proof = self.prove_dead(self.kill_bound()).await;
        {
            let mut b = self.host.below();
            b.guard_alive = true;
            b.guard_frozen = false;
        }
        self.guard_lost_told = false;
        if proof.is_ok() {
            self.pid = None;
        }
        proof
    }

    /// The simulator's node has one program (no schedule rolls another).
    async fn use_program(&mut self, _program: &str) -> Result<bool, ProgramRefused> {
        Ok(false)
    }

    fn started_as(&self) -> Option<String> {
        None
    }
}
