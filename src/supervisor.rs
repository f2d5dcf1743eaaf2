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
        })
    }

    /// The next start may be tried at once (the count of exits in a row
    /// stays).
    pub fn start_at_once(&mut self) {
        self.next_start = Instant::now();
    }

    /// Starts the validator now (with the key if it is linked), the count
    /// of exits in a row back to zero.
    pub async fn start(&mut self) -> Result<(), GuardError> {
        self.next_start = Instant::now();
        self.restarts = 0;
        self.sup
            .start(&self.cfg.command, self.linked)
            .await
            .map(|_| ())
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
        match self.sup.start(&self.cfg.command, self.linked).await {
            Ok(pid) => tracing::info!(pid, key = self.linked, "validator node started"),
            Err(e) => {
                tracing::error!("cannot start the validator node: {e}");
                self.backoff();
            }
        }
    }

    pub fn backoff(&mut self) {
        self.restarts = (self.restarts + 1).min(6);
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
