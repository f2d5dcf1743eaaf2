//! The validator node as the coordinator sees it: its process (started,
//! stopped and killed through the guard), its key links, its restart
//! backoff and its health prober.
//!
//! Must not: decide when the validator runs with the key; the coordinator
//! says so. Every call here is bounded in time (the guard's client bounds
//! each request) and a dead guard is reported, never waited on forever.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::ValidatorConfig;
use crate::fence::{self, GuardClient, GuardError, KeyLinks, ValidatorEvent};
use crate::health::Prober;

/// The validator side of a host: its process, its key links, its restarts.
pub struct Validator {
    pub cfg: ValidatorConfig,
    pub links: KeyLinks,
    /// For on-demand probes (the health task probes on a timer).
    pub prober: Prober,
    pub sup: GuardClient,
    pub linked: bool,
    pub restarts: u32,
    pub next_start: Instant,
}

impl Validator {
    /// Starts the guard for a validator that is not running yet. Events
    /// about the validator arrive on the returned receiver.
    pub fn spawn(
        cfg: ValidatorConfig,
        links: KeyLinks,
        prober: Prober,
        data_dir: &Path,
    ) -> Result<(Validator, mpsc::Receiver<ValidatorEvent>), GuardError> {
        let (sup, events) = GuardClient::spawn(data_dir)?;
        let v = Validator {
            cfg,
            links,
            prober,
            sup,
            linked: false,
            restarts: 0,
            next_start: Instant::now(),
        };
        Ok((v, events))
    }

    /// Starts the validator if it is not running and its backoff allows.
    pub async fn ensure_running(&mut self) {
        if self.sup.running().is_some() || Instant::now() < self.next_start {
            return;
        }
        match self.sup.start(&self.cfg.command).await {
            Ok(pid) => tracing::info!(pid, key = self.linked, "validator node started"),
            Err(GuardError::AlreadyRunning(pid)) => {
                tracing::warn!(pid, "validator node was running already")
            }
            Err(e) => {
                tracing::error!("cannot start the validator node: {e}");
                self.backoff();
            }
        }
    }

    pub fn backoff(&mut self) {
        self.restarts = (self.restarts + 1).min(6);
        let delay = Duration::from_millis(250) * (1 << self.restarts);
        self.next_start = Instant::now() + delay.min(Duration::from_secs(10));
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
        .unwrap_or_else(|e| Err(fence::FenceError::Refused(format!("link task failed: {e}"))));
        // Whatever happened, believe the file system.
        let links = self.links.clone();
        self.linked = tokio::task::spawn_blocking(move || links.any_linked())
            .await
            .unwrap_or(true);
        r
    }
}
