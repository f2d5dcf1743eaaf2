//! The validator child process, as the coordinator sees it: start it, stop
//! it gracefully, kill it, signal it, and renew the guard's lease deadline.
//!
//! Owns: the guard process (spawned from our own executable, see
//! [`crate::fence`]) and the conversation with it, and forwarding the
//! validator's output to keyraft's log. Must not: decide when the validator
//! runs with the key; the coordinator says so. Every call here is bounded in
//! time and a dead guard is reported, never waited on forever.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot start the guard process: {0}")]
    Spawn(std::io::Error),
    #[error("the guard process is gone")]
    GuardLost,
    #[error("the guard did not answer within {0:?}")]
    Timeout(Duration),
    #[error("a validator (pid {0}) is running already")]
    AlreadyRunning(u32),
    #[error("{0}")]
    Refused(String),
}

/// Something that happened to the validator without being asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidatorEvent {
    /// Validator `pid` exited (crash, or killed from outside).
    Exited(u32, String),
    /// The guard killed validator `pid` at the lease deadline.
    Fenced(u32, String),
    /// The guard itself died; the validator died with it.
    GuardLost,
}

pub struct Supervisor {
    guard: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    running: Option<u32>,
    /// Last lease deadline sent, to skip repeats.
    lease: Option<u64>,
}

const ANSWER: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Starts the guard. Validator events arrive on the returned receiver.
    pub fn spawn(
        data_dir: &Path,
    ) -> Result<(Supervisor, mpsc::Receiver<ValidatorEvent>), SupervisorError> {
        let exe = std::env::current_exe().map_err(SupervisorError::Spawn)?;
        let mut guard = Command::new(exe)
            .arg("guard")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(SupervisorError::Spawn)?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (guard.stdin.take(), guard.stdout.take(), guard.stderr.take())
        else {
            return Err(SupervisorError::GuardLost);
        };
        let (reply_tx, replies) = mpsc::channel(16);
        let (event_tx, events) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ev) = line.strip_prefix("event ") {
                    let mut parts = ev.splitn(3, ' ');
                    let (kind, pid, how) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
                    let pid = pid.and_then(|p| p.parse().ok()).unwrap_or(0);
                    let ev = match kind {
                        Some("fenced") => ValidatorEvent::Fenced(pid, how.to_string()),
                        _ => ValidatorEvent::Exited(pid, how.to_string()),
                    };
                    let _ = event_tx.send(ev).await;
                } else if reply_tx.send(line).await.is_err() {
                    break;
                }
            }
            let _ = event_tx.send(ValidatorEvent::GuardLost).await;
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "validator", "validator: {line}");
            }
        });
        Ok((
            Supervisor {
                guard,
                stdin,
                replies,
                running: None,
                lease: None,
            },
            events,
        ))
    }

    async fn send(&mut self, line: &str) -> Result<(), SupervisorError> {
        let msg = format!("{line}\n");
        match tokio::time::timeout(ANSWER, self.stdin.write_all(msg.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SupervisorError::GuardLost),
            Err(_) => Err(SupervisorError::Timeout(ANSWER)),
        }
    }

    async fn ask(&mut self, line: &str, wait: Duration) -> Result<String, SupervisorError> {
        self.send(line).await?;
        match tokio::time::timeout(wait, self.replies.recv()).await {
            Ok(Some(r)) => match r.strip_prefix("ok") {
                Some(rest) => Ok(rest.trim().to_string()),
                None => Err(SupervisorError::Refused(
                    r.trim_start_matches("err ").to_string(),
                )),
            },
            Ok(None) => Err(SupervisorError::GuardLost),
            Err(_) => Err(SupervisorError::Timeout(wait)),
        }
    }

    /// Starts the validator; returns its pid.
    pub async fn start(&mut self, command: &[String]) -> Result<u32, SupervisorError> {
        let json =
            serde_json::to_string(command).map_err(|e| SupervisorError::Refused(e.to_string()))?;
        let pid: u32 = self
            .ask(&format!("start {json}"), ANSWER)
            .await?
            .parse()
            .map_err(|_| SupervisorError::Refused("guard sent no pid".into()))?;
        self.running = Some(pid);
        Ok(pid)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it exited.
    pub async fn stop(&mut self, grace: Duration) -> Result<String, SupervisorError> {
        let r = self
            .ask(
                &format!("stop {}", grace.as_millis()),
                grace + Duration::from_secs(15),
            )
            .await;
        self.running = None;
        r
    }

    /// SIGKILL of the validator's process group; returns once it is gone.
    pub async fn kill(&mut self) -> Result<String, SupervisorError> {
        let r = self.ask("kill", Duration::from_secs(15)).await;
        self.running = None;
        r
    }

    pub async fn sighup(&mut self) -> Result<(), SupervisorError> {
        self.ask(
            &format!("signal {}", nix::sys::signal::Signal::SIGHUP as i32),
            ANSWER,
        )
        .await
        .map(|_| ())
    }

    /// Sets (or with `None` clears) the deadline, in CLOCK_MONOTONIC
    /// nanoseconds, at which the guard kills the validator.
    pub async fn lease(&mut self, deadline_ns: Option<u64>) -> Result<(), SupervisorError> {
        if self.lease == deadline_ns {
            return Ok(());
        }
        self.lease = deadline_ns;
        match deadline_ns {
            Some(ns) => self.send(&format!("lease {ns}")).await,
            None => self.send("unlease").await,
        }
    }

    /// Whether a validator process is believed to be running.
    pub fn running(&self) -> Option<u32> {
        self.running
    }

    /// Records that validator `pid` is gone (after an exit event). Returns
    /// false for news about an earlier validator, which changes nothing.
    pub fn mark_exited(&mut self, pid: u32) -> bool {
        if self.running == Some(pid) {
            self.running = None;
            true
        } else {
            false
        }
    }

    pub fn guard_pid(&self) -> Option<u32> {
        self.guard.id()
    }
}
