//! The guard: the keyraft binary re-executed as `keyraft guard`, parent of
//! the validator, which SIGKILLs the validator when its lease deadline
//! passes or the coordinator disappears, even if the coordinator is frozen.
//! Both ends of its protocol live here: the guard's own loop
//! ([`guard_main`]) and the coordinator's handle on it ([`GuardClient`]).
//!
//! Must not: decide when the validator runs with the key; the guard obeys
//! only its deadline and its control pipe, the client only the coordinator.

use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::lock::{start_time, PID_FILE};
use super::mono_now_ns;

// ---------------------------------------------------------------------------
// The guard process.
//
// Protocol over the guard's stdin (one command per line):
//   start <json: ["prog", "arg", ...]>   -> "ok <pid>" | "err running <pid>" | "err <why>"
//   stop <timeout_ms>                    -> "ok <exit>" (SIGTERM, then SIGKILL)
//   kill                                 -> "ok <exit>"
//   signal <signum>                      -> "ok" | "err <why>"
//   lease <deadline_ns>                  (no reply) kill the group at this CLOCK_MONOTONIC time
//   unlease                              (no reply)
// Events on stdout: "event exit <pid> <how>" (the validator died unasked),
// "event fenced <pid> <how>" (killed at the lease deadline). End of stdin
// means the coordinator is gone: kill the validator and exit.

#[derive(Default)]
struct GuardState {
    pid: Option<i32>,
    lease_ns: Option<u64>,
    /// Set while a requested stop or kill is under way.
    expected_exit: bool,
    last_exit: Option<String>,
}

struct Guard {
    state: Mutex<GuardState>,
    changed: Condvar,
    pid_file: PathBuf,
}

impl Guard {
    fn lock(&self) -> MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("code {c}"),
        (_, Some(s)) => format!(
            "signal {}",
            Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?")
        ),
        _ => "unknown".into(),
    }
}

/// `keyraft guard --data-dir DIR`: runs until its stdin closes.
pub fn guard_main(data_dir: &Path) -> std::io::Result<()> {
    // The coordinator decides when we stop: ignore terminal signals.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: installing SIG_IGN has no handler code to run.
        unsafe {
            let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    let guard = Arc::new(Guard {
        state: Mutex::new(GuardState::default()),
        changed: Condvar::new(),
        pid_file: data_dir.join(PID_FILE),
    });
    let timer = guard.clone();
    std::thread::spawn(move || lease_timer(&timer));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "start" => say(&start(&guard, arg)),
            "stop" => {
                let ms = arg.trim().parse().unwrap_or(10_000);
                say(&stop(&guard, Some(Duration::from_millis(ms))));
            }
            "kill" => say(&stop(&guard, None)),
            "signal" => {
                let pid = guard.lock().pid;
                let sig = arg
                    .trim()
                    .parse::<i32>()
                    .ok()
                    .and_then(|s| Signal::try_from(s).ok());
                match (pid, sig) {
                    (Some(pid), Some(sig)) => match kill(Pid::from_raw(pid), sig) {
                        Ok(()) => say("ok"),
                        Err(e) => say(&format!("err {e}")),
                    },
                    (None, _) => say("err no validator running"),
                    (_, None) => say("err bad signal"),
                }
            }
            "lease" => {
                guard.lock().lease_ns = arg.trim().parse().ok();
                guard.changed.notify_all();
            }
            "unlease" => {
                guard.lock().lease_ns = None;
                guard.changed.notify_all();
            }
            _ => say(&format!("err unknown command {cmd}")),
        }
    }
    // The coordinator is gone (exited, killed): nothing may validate without it.
    stop(&guard, None);
    Ok(())
}

fn start(guard: &Arc<Guard>, arg: &str) -> String {
    if let Some(pid) = guard.lock().pid {
        return format!("err running {pid}");
    }
    let argv: Vec<String> = match serde_json::from_str(arg) {
        Ok(v) => v,
        Err(e) => return format!("err bad start command: {e}"),
    };
    let Some((prog, args)) = argv.split_first() else {
        return "err empty command".into();
    };
    // The validator's output goes to our stderr, which the coordinator reads.
    let (Ok(out), Ok(err)) = (
        std::io::stderr().as_fd().try_clone_to_owned(),
        std::io::stderr().as_fd().try_clone_to_owned(),
    ) else {
        return "err cannot duplicate stderr".into();
    };
    let guard_pid = std::process::id() as i32;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    // SAFETY: prctl and getppid are async-signal-safe; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != guard_pid {
                return Err(std::io::Error::other("guard died during start"));
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return format!("err cannot start {prog}: {e}"),
    };
    let pid = child.id() as i32;
    if let Some(started) = start_time(pid) {
        let _ = std::fs::write(&guard.pid_file, format!("{pid} {started}\n"));
    }
    {
        let mut st = guard.lock();
        st.pid = Some(pid);
        st.last_exit = None;
    }
    guard.changed.notify_all();
    let waiter = guard.clone();
    std::thread::spawn(move || {
        let how = child
            .wait()
            .map(describe)
            .unwrap_or_else(|e| format!("unknown ({e})"));
        // Stragglers of its group die with it.
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        let _ = std::fs::remove_file(&waiter.pid_file);
        let mut st = waiter.lock();
        st.pid = None;
        if !st.expected_exit {
            say(&format!("event exit {pid} {how}"));
        }
        st.last_exit = Some(how);
        drop(st);
        waiter.changed.notify_all();
    });
    format!("ok {pid}")
}

/// SIGTERM then (after `grace`) SIGKILL, or SIGKILL at once; waits for the exit.
fn stop(guard: &Arc<Guard>, grace: Option<Duration>) -> String {
    let mut st = guard.lock();
    let Some(pid) = st.pid else {
        return "ok not running".into();
    };
    st.expected_exit = true;
    let group = Pid::from_raw(-pid);
    if let Some(grace) = grace {
        let _ = kill(group, Signal::SIGTERM);
        st = wait_gone(guard, st, grace);
    }
    if st.pid.is_some() {
        let _ = kill(group, Signal::SIGCONT);
        let _ = kill(group, Signal::SIGKILL);
    }
    st = wait_gone(guard, st, Duration::from_secs(10));
    st.expected_exit = false;
    match (st.pid, st.last_exit.clone()) {
        (Some(p), _) => format!("err validator {p} did not die"),
        (None, how) => format!("ok {}", how.unwrap_or_else(|| "exited".into())),
    }
}

/// Waits up to `limit` for the validator to be reaped.
fn wait_gone<'a>(
    guard: &'a Guard,
    mut st: MutexGuard<'a, GuardState>,
    limit: Duration,
) -> MutexGuard<'a, GuardState> {
    let deadline = Instant::now() + limit;
    while st.pid.is_some() && Instant::now() < deadline {
        let wait = deadline.saturating_duration_since(Instant::now());
        st = guard
            .changed
            .wait_timeout(st, wait)
            .map(|r| r.0)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    st
}

/// Kills the validator's group when the lease deadline passes.
fn lease_timer(guard: &Guard) {
    let mut st = guard.lock();
    loop {
        match (st.lease_ns, st.pid) {
            (Some(deadline), Some(pid)) => {
                let now = mono_now_ns();
                if now >= deadline {
                    st.expected_exit = true;
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGCONT);
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                    st.lease_ns = None;
                    let late_ms = (now - deadline) / 1_000_000;
                    say(&format!(
                        "event fenced lease expired {late_ms}ms ago, validator {pid} killed"
                    ));
                    // Reaped by its waiter thread, which clears `expected_exit`
                    // only through the next requested stop; reset it here once gone.
                    while st.pid == Some(pid) {
                        st = guard.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.expected_exit = false;
                } else {
                    let wait = Duration::from_nanos(deadline - now);
                    st = guard
                        .changed
                        .wait_timeout(st, wait)
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
            _ => st = guard.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

// ---------------------------------------------------------------------------
// The coordinator's end.

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
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

pub struct GuardClient {
    guard: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    running: Option<u32>,
    /// Last lease deadline sent, to skip repeats.
    lease: Option<u64>,
}

const ANSWER: Duration = Duration::from_secs(5);

impl GuardClient {
    /// Starts the guard. Validator events arrive on the returned receiver.
    pub fn spawn(
        data_dir: &Path,
    ) -> Result<(GuardClient, mpsc::Receiver<ValidatorEvent>), GuardError> {
        let exe = std::env::current_exe().map_err(GuardError::Spawn)?;
        let mut guard = tokio::process::Command::new(exe)
            .arg("guard")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(GuardError::Spawn)?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (guard.stdin.take(), guard.stdout.take(), guard.stderr.take())
        else {
            return Err(GuardError::GuardLost);
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
            GuardClient {
                guard,
                stdin,
                replies,
                running: None,
                lease: None,
            },
            events,
        ))
    }

    async fn send(&mut self, line: &str) -> Result<(), GuardError> {
        let msg = format!("{line}\n");
        match tokio::time::timeout(ANSWER, self.stdin.write_all(msg.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(GuardError::GuardLost),
            Err(_) => Err(GuardError::Timeout(ANSWER)),
        }
    }

    async fn ask(&mut self, line: &str, wait: Duration) -> Result<String, GuardError> {
        self.send(line).await?;
        match tokio::time::timeout(wait, self.replies.recv()).await {
            Ok(Some(r)) => match r.strip_prefix("ok") {
                Some(rest) => Ok(rest.trim().to_string()),
                None => Err(GuardError::Refused(
                    r.trim_start_matches("err ").to_string(),
                )),
            },
            Ok(None) => Err(GuardError::GuardLost),
            Err(_) => Err(GuardError::Timeout(wait)),
        }
    }

    /// Starts the validator; returns its pid.
    pub async fn start(&mut self, command: &[String]) -> Result<u32, GuardError> {
        let json =
            serde_json::to_string(command).map_err(|e| GuardError::Refused(e.to_string()))?;
        let pid: u32 = self
            .ask(&format!("start {json}"), ANSWER)
            .await?
            .parse()
            .map_err(|_| GuardError::Refused("guard sent no pid".into()))?;
        self.running = Some(pid);
        Ok(pid)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it exited.
    pub async fn stop(&mut self, grace: Duration) -> Result<String, GuardError> {
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
    pub async fn kill(&mut self) -> Result<String, GuardError> {
        let r = self.ask("kill", Duration::from_secs(15)).await;
        self.running = None;
        r
    }

    pub async fn sighup(&mut self) -> Result<(), GuardError> {
        self.ask(
            &format!("signal {}", nix::sys::signal::Signal::SIGHUP as i32),
            ANSWER,
        )
        .await
        .map(|_| ())
    }

    /// Sets (or with `None` clears) the deadline, in CLOCK_MONOTONIC
    /// nanoseconds, at which the guard kills the validator.
    pub async fn lease(&mut self, deadline_ns: Option<u64>) -> Result<(), GuardError> {
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
