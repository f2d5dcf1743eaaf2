//! The coordinator's two edges with the world, as traits, so that the same
//! handlers run on a real host and in the simulator (`sim/`):
//!
//! - [`Host`]: this host's validator side, which [`super::custody`] alone
//!   drives: the process tree (through the guard), the key links, the
//!   kernel fence, the restart backoff and the height probe. The real one
//!   is [`crate::supervisor::Validator`] (its impl is at the end).
//! - [`Outside`]: what lies beyond this process: the host's monotonic
//!   clock (the lease's), the leader to ask to be taken back (step 9), and
//!   other hosts' power through their fence agents. The real one is
//!   [`Real`].
//!
//! [`Env`] names the three types one coordinator runs over: these two and
//! the Raft state machine ([`OnHost`] on a real node).
//!
//! Owns: the shape of each effect and the errors it can end in. Must not:
//! decide anything, or order the effects; [`super`] and [`super::custody`]
//! do. Every method is bounded in time in every implementation, and says
//! when it failed: a failure the caller cannot see is a key held too long.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::time::Instant;

use crate::config::{ActivateBy, FenceAgent};
use crate::fence::agent::AgentError;
use crate::fence::kernel::KernelError;
use crate::fence::{FenceError, GuardError, ValidatorEvent};
use crate::ledger::NodeId;
use crate::node::Shared;
use crate::pb;
use crate::raft::TypeConfig;
use crate::supervisor::{ProgramRefused, Validator};

/// What one coordinator runs over.
pub trait Env: 'static {
    type Host: Host;
    type Outside: Outside;
    type Machine: RaftStateMachine<TypeConfig>;
}

/// A real node: the supervised validator, [`Real`], keyraft's ledger.
pub struct OnHost;

impl Env for OnHost {
    type Host = Validator;
    type Outside = Real;
    type Machine = crate::raft::store::StateMachine;
}

/// This host's validator, as custody touches it.
pub trait Host: Send + 'static {
    /// The running validator's pid, if one runs.
    fn running(&self) -> Option<u32>;
    /// Whether a key link exists (as the file system last said).
    fn linked(&self) -> bool;
    /// The earliest the next start may be tried (restart backoff).
    fn next_start(&self) -> Instant;
    /// Whether a successor waits for a new block height.
    fn height_watermark(&self) -> bool;
    /// How a running standby takes the key: restart, or SIGHUP.
    fn activate_by(&self) -> ActivateBy;
    /// Records that `pid` exited; false if it is not the running one.
    fn mark_exited(&mut self, pid: u32) -> bool;
    /// Backs the next start off after an exit.
    fn backoff(&mut self);
    /// The next start may be tried at once (the count of exits in a row
    /// stays).
    fn start_at_once(&mut self);
    /// The next thing that happened to the validator unasked.
    fn event(&mut self) -> impl Future<Output = ValidatorEvent> + Send;
    /// Starts the validator if it is down and its backoff allows; keyless
    /// unless `with_key` (a keyless start never happens while a link exists).
    fn ensure_running(&mut self, with_key: bool) -> impl Future<Output = ()> + Send;
    /// Starts the validator now, with the key if it is linked.
    fn start(&mut self) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// SIGHUP to the running validator (it reloads, and finds the key).
    fn sighup(&mut self) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// The height the node reports now, if it answers with one.
    fn probe_height(&self) -> impl Future<Output = Option<u64>> + Send;
    /// Gives the guard the lease deadline (CLOCK_MONOTONIC ns), or
    /// withdraws it (`None`) with the kernel fence's element.
    fn lease(
        &mut self,
        deadline_ns: Option<u64>,
    ) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// Links the key (`true`) or removes every link (`false`).
    fn links(&mut self, active: bool) -> impl Future<Output = Result<(), FenceError>> + Send;
    /// Before the key appears: the kernel fence is whole, or put back.
    fn ensure_kernel_fence(&self) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// SIGKILL of the whole tree, proven dead (a guard that does not
    /// confirm is replaced, the tree killed from here).
    fn kill_proven(&mut self) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// Graceful stop within `grace`, the lease renewed from `renew`
    /// meanwhile, then proof that the tree is dead.
    fn stop_proven(
        &mut self,
        grace: Duration,
        renew: impl FnMut() -> Option<u64> + Send,
    ) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// The guard died: kill the tree from here, prove it, start a new guard.
    fn replace_guard(&mut self) -> impl Future<Output = Result<(), GuardError>> + Send;
    /// Runs the node as `program` (in place of its command's first word)
    /// from its next start; whether that changed anything. Refused for a
    /// file that is not an executable here.
    fn use_program(
        &mut self,
        program: &str,
    ) -> impl Future<Output = Result<bool, ProgramRefused>> + Send;
    /// The program the node was last started as.
    fn started_as(&self) -> Option<String>;
}

/// What the coordinator reaches beyond this process.
pub trait Outside: Send + Sync + 'static {
    /// The clock every lease deadline is on (CLOCK_MONOTONIC, in ns).
    fn mono_now_ns(&self) -> u64;
    /// Sends `cmd` to the leader `leader` (step 9's rejoin); its answer,
    /// or the leader's refusal (or the transport's) as a gRPC status.
    fn ask_leader(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
    ) -> impl Future<Output = Result<String, tonic::Status>> + Send;
    /// Runs `agent` once: `Ok` only once it confirmed the host off.
    fn power_off_once(
        &self,
        agent: &FenceAgent,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
}

/// The real [`Outside`]: CLOCK_MONOTONIC, the peer port, the agents.
pub struct Real(pub Arc<Shared>);

impl Outside for Real {
    fn mono_now_ns(&self) -> u64 {
        crate::fence::mono_now_ns()
    }

    async fn ask_leader(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
    ) -> Result<String, tonic::Status> {
        crate::admin::commands(&self.0)
            .execute_on(leader, cmd, crate::admin::NODE_REQUEST_DEADLINE)
            .await
    }

    async fn power_off_once(
        &self,
        agent: &FenceAgent,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        crate::fence::agent::power_off_once(agent, timeout).await
    }
}

/// The supervised validator, as custody touches it.
impl Host for Validator {
    fn running(&self) -> Option<u32> {
        self.sup.running()
    }

    fn linked(&self) -> bool {
        self.linked
    }

    fn next_start(&self) -> Instant {
        self.next_start
    }

    fn height_watermark(&self) -> bool {
        self.cfg.height_watermark
    }

    fn activate_by(&self) -> ActivateBy {
        self.cfg.activate_by
    }

    fn mark_exited(&mut self, pid: u32) -> bool {
        self.sup.mark_exited(pid)
    }

    fn backoff(&mut self) {
        Validator::backoff(self);
    }

    fn start_at_once(&mut self) {
        Validator::start_at_once(self);
    }

    async fn event(&mut self) -> ValidatorEvent {
        Validator::event(self).await
    }

    async fn ensure_running(&mut self, with_key: bool) {
        Validator::ensure_running(self, with_key).await;
    }

    async fn start(&mut self) -> Result<(), GuardError> {
        Validator::start(self).await
    }

    async fn sighup(&mut self) -> Result<(), GuardError> {
        self.sup.sighup().await
    }

    fn probe_height(&self) -> impl Future<Output = Option<u64>> + Send {
        let prober = self.prober.clone();
        async move { prober.probe().await.ok().and_then(|h| h.height) }
    }

    async fn lease(&mut self, deadline_ns: Option<u64>) -> Result<(), GuardError> {
        self.sup.lease(deadline_ns).await
    }

    async fn links(&mut self, active: bool) -> Result<(), FenceError> {
        Validator::links(self, active).await
    }

    async fn ensure_kernel_fence(&self) -> Result<(), KernelError> {
        Validator::ensure_kernel_fence(self).await
    }

    async fn kill_proven(&mut self) -> Result<(), GuardError> {
        Validator::kill_proven(self).await
    }

    async fn stop_proven(
        &mut self,
        grace: Duration,
        renew: impl FnMut() -> Option<u64> + Send,
    ) -> Result<(), GuardError> {
        Validator::stop_proven(self, grace, renew).await
    }

    async fn replace_guard(&mut self) -> Result<(), GuardError> {
        Validator::replace_guard(self).await
    }

    async fn use_program(&mut self, program: &str) -> Result<bool, ProgramRefused> {
        Validator::use_program(self, program).await
    }

    fn started_as(&self) -> Option<String> {
        Validator::started_as(self)
    }
}
