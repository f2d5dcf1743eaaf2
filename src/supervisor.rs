//! The validator node as the coordinator sees it: its process (started,
//! stopped and killed through the guard), its key links, its restart
//! backoff and its health prober.
//!
//! Must not: decide when the validator runs with the key; the coordinator
//! says so. Every call here is bounded in time (the guard's client bounds
//! each request) and a dead guard is reported, never waited on forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::ValidatorConfig;
use crate::fence::kernel::{KernelError, Plan};
use crate::fence::nft::Netlink;
use crate::fence::{self, GuardClient, GuardError, KeyLinks, Tree, ValidatorEvent};
use crate::health::Prober;

/// How long a start waits after `restarts` exits in a row (at most six
/// count): 0.5 s doubling, at most 10 s.
pub fn restart_delay(restarts: u32) -> Duration {
    (Duration::from_millis(250) * (1 << restarts.min(6))).min(Duration::from_secs(10))
}

/// How long a node must have run for its exit to be the first in a row.
pub const RAN_CLEAN: Duration = Duration::from_secs(60);

/// The count of exits (or failed starts) in a row after one more, of a
/// node that ran for `ran` (zero for a start that failed): a node that ran
/// [`RAN_CLEAN`] or longer starts the count over, so that its restart is
/// not paced by crashes of long ago.
pub fn exits_in_a_row(before: u32, ran: Duration) -> u32 {
    if ran >= RAN_CLEAN {
        1
    } else {
        (before + 1).min(6)
    }
}

/// The gossip feature of a keyraft that applies [`crate::ledger::Command::NodeBinary`].
pub const BINARY_FEATURE: &str = "node-binary";

/// Why this host does not run its node as the program the cluster committed
/// for it (`keyraft upgrade --binary`); it keeps the one it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramRefused {
    #[error("{path} cannot be read here: {why}")]
    Missing { path: String, why: String },
    #[error("{path} is not an executable file here")]
    NotExecutable { path: String },
}

/// Whether `path` is an executable file on this host.
pub async fn check_program(path: &str) -> Result<(), ProgramRefused> {
    use std::os::unix::fs::PermissionsExt;
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| ProgramRefused::Missing {
            path: path.to_string(),
            why: e.to_string(),
        })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(ProgramRefused::NotExecutable {
            path: path.to_string(),
        });
    }
    Ok(())
}

/// The validator side of a host: its process tree (through the guard), its
/// key links, its restarts.
pub struct Validator {
    pub cfg: ValidatorConfig,
    pub links: KeyLinks,
    /// For on-demand probes (the health task probes on a timer).
    pub prober: Prober,
    pub sup: GuardClient,
    events: mpsc::Receiver<ValidatorEvent>,
    tree: Tree,
    /// The kernel fence installed for the tree, if it is on.
    kernel: Option<Plan>,
    data_dir: PathBuf,
    kill_bound: Duration,
    pub linked: bool,
    pub restarts: u32,
    pub next_start: Instant,
    /// The program the cluster committed for this node, in place of its
    /// command's first word.
    program: Option<String>,
    /// The program the running (or last) node was started as.
    started_as: Option<String>,
    /// When the node last started, until its exit is counted.
    started_at: Option<Instant>,
}

impl Validator {
    /// Starts the guard for a validator that is not running yet.
    pub fn spawn(
        cfg: ValidatorConfig,
        links: KeyLinks,
        prober: Prober,
        data_dir: &Path,
        tree: Tree,
        kernel: Option<Plan>,
        kill_bound: Duration,
    ) -> Result<Validator, GuardError> {
        let user = cfg.user.as_ref().map(|u| u.name.as_str());
        let (sup, events) =
            GuardClient::spawn(data_dir, tree.clone(), kill_bound, kernel.as_ref(), user)?;
        Ok(Validator {
            cfg,
            links,
            prober,
            sup,
            events,
            tree,
            kernel,
            data_dir: data_dir.to_path_buf(),
            kill_bound,
            linked: false,
            restarts: 0,
            next_start: Instant::now(),
            program: None,
            started_as: None,
            started_at: None,
        })
    }

    /// The next start may be tried at once (the count of exits in a row
    /// stays).
    pub fn start_at_once(&mut self) {
        self.next_start = Instant::now();
    }

    /// The node's command: the configured one, its first word replaced by
    /// the program the cluster committed for this host, if any.
    fn argv(&self) -> Vec<String> {
        let mut argv = self.cfg.command.clone();
        if let (Some(p), Some(first)) = (&self.program, argv.first_mut()) {
            *first = p.clone();
        }
        argv
    }

    /// Runs the node as `program` from its next start; whether that is a
    /// change. Refused (nothing changes) for a file that is not an
    /// executable here.
    pub async fn use_program(&mut self, program: &str) -> Result<bool, ProgramRefused> {
        if self.program.as_deref() == Some(program) {
            return Ok(false);
        }
        check_program(program).await?;
        self.program = Some(program.to_string());
        Ok(true)
    }

    /// The program the node was last started as.
    pub fn started_as(&self) -> Option<String> {
        self.started_as.clone()
    }

    async fn start_argv(&mut self) -> Result<u32, GuardError> {
        let argv = self.argv();
        let pid = self.sup.start(&argv, self.linked).await?;
        self.started_as = argv.into_iter().next();
        self.started_at = Some(Instant::now());
        Ok(pid)
    }

    /// Starts the validator now (with the key if it is linked), the count
    /// of exits in a row back to zero.
    pub async fn start(&mut self) -> Result<(), GuardError> {
        self.next_start = Instant::now();
        self.restarts = 0;
        self.start_argv().await.map(|_| ())
    }

    /// The next thing that happened to the validator unasked.
    pub async fn event(&mut self) -> ValidatorEvent {
        self.events
            .recv()
            .await
            .unwrap_or(ValidatorEvent::GuardLost)
    }

    /// Starts the validator if it is not running and its backoff allows.
    /// A plain (keyless) node never starts while a key link exists.
    pub async fn ensure_running(&mut self, with_key: bool) {
        if self.sup.running().is_some() || Instant::now() < self.next_start {
            return;
        }
        if !with_key && self.linked {
            if let Err(e) = self.links(false).await {
                tracing::error!("not starting the standby node: the key is still linked ({e})");
                self.backoff();
                return;
            }
        }
        match self.start_argv().await {
            Ok(pid) => tracing::info!(pid, key = self.linked, "validator node started"),
            Err(e) => {
                tracing::error!("cannot start the validator node: {e}");
                self.backoff();
            }
        }
    }

    /// Paces the next start after an exit or a failed start.
    pub fn backoff(&mut self) {
        let ran = self
            .started_at
            .take()
            .map_or(Duration::ZERO, |t| t.elapsed());
        self.restarts = exits_in_a_row(self.restarts, ran);
        self.next_start = Instant::now() + restart_delay(self.restarts);
    }

    /// SIGKILL of the whole tree, proven. If the guard does not confirm
    /// within `kill_bound`, it is presumed broken: killed with the tree from
    /// here, and replaced. An error means the tree could not be proven dead.
    pub async fn kill_proven(&mut self) -> Result<(), GuardError> {
        match self.sup.kill().await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!("guard did not confirm the kill ({e}): presuming it broken");
                self.replace_guard().await
            }
        }
    }

    /// Graceful stop, then proof that the whole tree is dead, with the
    /// lease renewed from `renew` meanwhile. Falls back as [`Self::kill_proven`].
    pub async fn stop_proven(
        &mut self,
        grace: Duration,
        renew: impl FnMut() -> Option<u64> + Send,
    ) -> Result<(), GuardError> {
        match self.sup.stop(grace, renew).await {
            Ok(how) => {
                tracing::info!("validator node stopped ({how})");
                Ok(())
            }
            Err(e) => {
                tracing::error!("guard did not confirm the stop ({e}): presuming it broken");
                self.replace_guard().await
            }
        }
    }

    /// The guard is broken or gone: SIGKILL it and the whole tree from
    /// here, confirm, and start a new guard. The result is the proof.
    pub async fn replace_guard(&mut self) -> Result<(), GuardError> {
        let proof = self.sup.force_kill().await;
        match &proof {
            Ok(n) => tracing::warn!(
                killed = n,
                "guard and validator tree killed by the coordinator"
            ),
            Err(e) => tracing::error!("{e}"),
        }
        match GuardClient::spawn(
            &self.data_dir,
            self.tree.clone(),
            self.kill_bound,
            self.kernel.as_ref(),
            self.cfg.user.as_ref().map(|u| u.name.as_str()),
        ) {
            Ok((sup, events)) => {
                self.sup = sup;
                self.events = events;
            }
            Err(e) => {
                // The old client reports `GuardLost` again at once: pace it.
                tracing::error!("cannot restart the guard: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        proof.map(|_| ())
    }

    /// Before the key appears: the kernel fence's table is whole, or is
    /// put back (a firewall reload that flushed the ruleset removes it).
    /// The guard holds the keyed start's fresh key in it. Nothing to do
    /// without a kernel fence.
    pub async fn ensure_kernel_fence(&self) -> Result<(), KernelError> {
        let Some(plan) = self.kernel.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || match plan.check(&mut Netlink::open()?) {
            Err(KernelError::Missing(table)) => {
                tracing::warn!(
                    table,
                    "the kernel fence's nftables table was gone: putting it back"
                );
                plan.install(Path::new("/proc/self/exe"))
            }
            r => r,
        })
        .await
        .unwrap_or_else(|e| Err(KernelError::Install(format!("task failed: {e}"))))
    }

    pub async fn links(&mut self, active: bool) -> Result<(), fence::FenceError> {
        let links = self.links.clone();
        let r = tokio::task::spawn_blocking(move || {
            if active {
                links.activate()
            } else {
                links.stand_by()
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.into()));
        // Whatever happened, believe the file system.
        let links = self.links.clone();
        self.linked = tokio::task::spawn_blocking(move || links.any_linked())
            .await
            .unwrap_or(true);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_ran_a_minute_starts_its_count_of_exits_over() {
        let s = Duration::from_secs;
        let table = [
            (0, s(0), 1),
            (3, s(5), 4),
            (6, s(59), 6),
            (6, s(60), 1),
            (2, s(3600), 1),
        ];
        for (before, ran, want) in table {
            assert_eq!(exits_in_a_row(before, ran), want, "{before} after {ran:?}");
        }
        // Six crashes long ago no longer hold a restart back 10 s.
        assert_eq!(restart_delay(6), s(10));
        assert_eq!(
            restart_delay(exits_in_a_row(6, s(600))),
            Duration::from_millis(500)
        );
    }
}
