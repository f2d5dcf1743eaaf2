//! The coordinator's end of the guard's protocol (see [`super::guard`] for
//! the protocol itself): spawning the guard, one request at a time with a
//! sequence number and a bound, the validator's events, and the forced
//! kill of guard and tree when the guard does not answer.
//!
//! Must not: decide when the validator runs with the key; it carries out
//! what the coordinator's custody asks.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::kernel::Plan;
use super::tree::{Tree, MARKER_VAR};

use super::guard::CONFIRM;
use super::protocol::{request_line, Done, Event, FromGuard, Refusal, Request};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot start the guard process: {0}")]
    Spawn(std::io::Error),
    #[error("the guard process is gone")]
    GuardLost,
    #[error("the guard did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guard refused: {0}")]
    Refused(Refusal),
    #[error("the guard sent {0:?} where it should have said {1}")]
    Unexpected(Done, &'static str),
    #[error("the validator's process tree could not be proven dead: {0}")]
    NotProven(#[from] NotProven),
}

/// Why the coordinator's own kill of a tree proves nothing.
#[derive(Debug, thiserror::Error)]
pub enum NotProven {
    #[error("{0}")]
    Scan(#[from] super::FenceError),
    #[error("the process scan did not finish in time")]
    ScanTimeout,
    #[error("the process scan's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Something that happened to the validator without being asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidatorEvent {
    /// Validator `pid` exited (crash, or killed from outside).
    Exited(u32, String),
    /// The guard killed validator `pid` at the lease deadline.
    Fenced(u32, String),
    /// The guard itself died; its validator's tree may not have.
    GuardLost,
}

pub struct GuardClient {
    guard: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<(u64, Result<Done, Refusal>)>,
    seq: u64,
    /// How long the guard may take to answer before it is presumed broken.
    answer: Duration,
    tree: Tree,
    running: Option<u32>,
    /// The lease the guard holds as far as this client knows: `Some` of
    /// the deadline last acknowledged (or of `None`, no lease), `None` when
    /// not known (an ask that failed or timed out, a renewal during a
    /// stop), so that the next lease or withdrawal is sent whatever it is.
    lease: Option<Option<u64>>,
    /// How long a SIGKILLed guard may take to be reaped ([`CONFIRM`]).
    confirm: Duration,
}

/// Extra time for a request whose work takes time of its own (a start).
const SLOW_ANSWER: Duration = Duration::from_secs(5);

/// Lease deadlines go to the guard rounded down to this grain (ns): a
/// deadline is the last quorum ack's sending plus the fence, computed with
/// the clock read just before the ack's age, so two readings of one ack
/// differ by the nanoseconds between the reads; rounded down, they are one
/// deadline, and never a later one.
const LEASE_GRAIN_NS: u64 = 1_000_000;

/// Least a lease deadline moves later to be sent (ns): each heartbeat's
/// quorum ack moves it by a heartbeat interval and is sent; the other
/// follower's ack of the same heartbeat reads the same lease again, and
/// sending it would cost a round trip to the guard and a kernel fence
/// write for nothing (half the idle leader's renewals).
const LEASE_STEP_NS: u64 = 20_000_000;

/// What to send a guard armed with `armed` (`None`: not known) for
/// `new`, rounded down to [`LEASE_GRAIN_NS`] (`None`: nothing): anything
/// while what the guard holds is not known; a withdrawal or a first lease
/// always; an earlier deadline always (a shorter fence in force); a later
/// one once it moves [`LEASE_STEP_NS`]. So the guard's deadline is never
/// later than the last one computed.
fn lease_to_send(armed: Option<Option<u64>>, new: Option<u64>) -> Option<Option<u64>> {
    let new = new.map(|ns| ns - ns % LEASE_GRAIN_NS);
    let moves = match (armed, new) {
        (None, _) => true,
        (Some(Some(a)), Some(n)) => n < a || n >= a.saturating_add(LEASE_STEP_NS),
        (Some(a), n) => a != n,
    };
    moves.then_some(new)
}

impl GuardClient {
    /// Starts a guard for `tree`. Validator events arrive on the returned
    /// receiver. `answer` is `kill_bound`: a guard that takes longer to
    /// answer a lease or kill is presumed broken. With `kernel`, the guard
    /// keeps the lease of the kernel fence installed for the tree (the plan
    /// whose table the coordinator installed).
    /// With `user`, it starts the validator as that user.
    pub fn spawn(
        data_dir: &Path,
        tree: Tree,
        answer: Duration,
        kernel: Option<&Plan>,
        user: Option<&str>,
    ) -> Result<(GuardClient, mpsc::Receiver<ValidatorEvent>), GuardError> {
        // Our own executable as it is now, even if its file was replaced
        // (an in-place upgrade) or removed since we started.
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        // `ps` shows "keyraft guard --data-dir ...".
        cmd.arg0("keyraft");
        cmd.arg("guard").arg("--data-dir").arg(data_dir);
        if tree.cgroup().is_none() {
            cmd.arg("--no-cgroup");
        }
        if kernel.is_some() {
            cmd.arg("--kernel-fence");
        }
        if let Some(user) = user {
            cmd.args(["--validator-user", user]);
        }
        // A session (and so a process group) of its own, from before its
        // first instruction: no signal to keyraft's group (a terminal's
        // Ctrl-Z, `kill -STOP -PGID`) can stop the coordinator and the
        // guard together while the validator, in its own group, signs on.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| match libc::setsid() {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
        Self::spawn_command(cmd, tree, answer)
    }

    /// [`GuardClient::spawn`] with any program that speaks the protocol.
    fn spawn_command(
        mut cmd: tokio::process::Command,
        tree: Tree,
        answer: Duration,
    ) -> Result<(GuardClient, mpsc::Receiver<ValidatorEvent>), GuardError> {
        let mut guard = cmd
            .env_remove(MARKER_VAR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropping the client closes the guard's stdin, and the guard
            // kills the tree on that end of input; a SIGKILL here would not.
            .kill_on_drop(false)
            .spawn()
            .map_err(GuardError::Spawn)?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (guard.stdin.take(), guard.stdout.take(), guard.stderr.take())
        else {
            return Err(GuardError::GuardLost);
        };
        let (reply_tx, replies) = mpsc::channel(64);
        let (event_tx, events) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (seq, r) = match line.parse::<FromGuard>() {
                    Ok(FromGuard::Event(ev)) => {
                        let ev = match ev {
                            Event::Fenced { pid, how } => ValidatorEvent::Fenced(pid, how),
                            Event::Exit { pid, how } => ValidatorEvent::Exited(pid, how),
                        };
                        let _ = event_tx.send(ev).await;
                        continue;
                    }
                    Ok(FromGuard::Reply(r)) => (r.seq, r.outcome),
                    Err(e) => {
                        tracing::warn!("{e}");
                        continue;
                    }
                };
                if reply_tx.send((seq, r)).await.is_err() {
                    break;
                }
            }
            let _ = event_tx.send(ValidatorEvent::GuardLost).await;
        });
        // The validator's output, read lossily: one bad byte must not stop
        // the reader and leave the validator blocked on a full pipe.
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        tracing::info!(target: "validator", "validator: {}", line.trim_end());
                    }
                }
            }
        });
        Ok((
            GuardClient {
                guard,
                stdin,
                replies,
                seq: 0,
                answer,
                tree,
                running: None,
                lease: Some(None),
                confirm: CONFIRM,
            },
            events,
        ))
    }

    /// Sends a request; returns its sequence number.
    async fn send(&mut self, req: &Request) -> Result<u64, GuardError> {
        self.seq += 1;
        let msg = format!("{}\n", request_line(self.seq, req));
        match tokio::time::timeout(self.answer, self.stdin.write_all(msg.as_bytes())).await {
            Ok(Ok(())) => Ok(self.seq),
            Ok(Err(_)) => Err(GuardError::GuardLost),
            Err(_) => Err(GuardError::Timeout(self.answer)),
        }
    }

    /// The reply to request `seq`, within `wait`; replies to earlier
    /// requests (late ones) are dropped.
    async fn reply(&mut self, seq: u64, wait: Duration) -> Result<Done, GuardError> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(until, self.replies.recv()).await {
                Ok(Some((s, r))) if s == seq => return r.map_err(GuardError::Refused),
                Ok(Some((s, _))) => tracing::debug!(seq = s, "late guard reply dropped"),
                Ok(None) => return Err(GuardError::GuardLost),
                Err(_) => return Err(GuardError::Timeout(wait)),
            }
        }
    }

    async fn ask(&mut self, req: &Request, wait: Duration) -> Result<Done, GuardError> {
        let seq = self.send(req).await?;
        self.reply(seq, wait).await
    }

    /// Starts the validator (`keyed`: with the key linked, in the tree's
    /// fresh keyed leaf); returns its pid.
    pub async fn start(&mut self, command: &[String], keyed: bool) -> Result<u32, GuardError> {
        let req = Request::Start {
            keyed,
            argv: command.to_vec(),
        };
        let pid = match self.ask(&req, self.answer + SLOW_ANSWER).await {
            Ok(Done::Started(pid)) => pid,
            // An earlier start whose reply came too late: that one runs.
            Err(GuardError::Refused(Refusal::Running(pid))) => {
                self.running = Some(pid);
                return Err(GuardError::Refused(Refusal::Running(pid)));
            }
            Ok(other) => return Err(GuardError::Unexpected(other, "a pid")),
            Err(e) => return Err(e),
        };
        self.running = Some(pid);
        Ok(pid)
    }

    /// Graceful stop: SIGTERM to the tree, SIGKILL after `grace`. Returns
    /// once the guard reports the whole tree dead. Meanwhile the lease is
    /// renewed from `renew` (`None` once it has lapsed), and each renewal
    /// must be acknowledged within `kill_bound`, or the guard is presumed
    /// broken ([`GuardError::Timeout`]).
    pub async fn stop(
        &mut self,
        grace: Duration,
        mut renew: impl FnMut() -> Option<u64>,
    ) -> Result<String, GuardError> {
        let seq = self
            .send(&Request::Stop {
                grace_ms: grace.as_millis() as u64,
            })
            .await?;
        let until = tokio::time::Instant::now() + grace + CONFIRM + self.answer;
        let tick = (self.answer / 2).max(Duration::from_millis(10));
        let mut pending: Option<(u64, tokio::time::Instant)> = None;
        let r = loop {
            tokio::select! {
                r = self.replies.recv() => match r {
                    Some((s, r)) if s == seq => break r.map_err(GuardError::Refused).and_then(stopped),
                    Some((s, _)) if pending.is_some_and(|p| p.0 == s) => pending = None,
                    Some(_) => {}
                    None => break Err(GuardError::GuardLost),
                },
                _ = tokio::time::sleep(tick) => {
                    if let Some((_, sent)) = pending {
                        if sent.elapsed() > self.answer {
                            break Err(GuardError::Timeout(self.answer));
                        }
                    } else if let Some(deadline) = renew() {
                        let s = self.send(&Request::Lease { mono_ns: deadline }).await?;
                        pending = Some((s, tokio::time::Instant::now()));
                        self.lease = None;
                    }
                }
                _ = tokio::time::sleep_until(until) => break Err(GuardError::Timeout(until.elapsed())),
            }
        };
        if r.is_ok() {
            self.running = None;
        }
        r
    }

    /// SIGKILL of the whole tree; returns once the guard confirms it dead.
    pub async fn kill(&mut self) -> Result<String, GuardError> {
        let r = self
            .ask(&Request::Kill, self.answer)
            .await
            .and_then(stopped);
        if r.is_ok() {
            self.running = None;
        }
        r
    }

    pub async fn sighup(&mut self) -> Result<(), GuardError> {
        self.ask(&Request::Signal(Signal::SIGHUP as i32), self.answer)
            .await
            .map(|_| ())
    }

    /// Sets (or with `None` clears) the deadline, in CLOCK_MONOTONIC
    /// nanoseconds, at which the guard kills the tree; the guard must
    /// acknowledge it within `kill_bound`.
    pub async fn lease(&mut self, deadline_ns: Option<u64>) -> Result<(), GuardError> {
        let Some(deadline_ns) = lease_to_send(self.lease, deadline_ns) else {
            return Ok(());
        };
        let r = match deadline_ns {
            Some(ns) => {
                let req = Request::Lease { mono_ns: ns };
                self.ask(&req, self.answer).await
            }
            None => self.ask(&Request::Unlease, self.answer).await,
        };
        self.lease = r.is_ok().then_some(deadline_ns);
        r.map(|_| ())
    }

    /// The guard presumed broken (it did not answer, or died): SIGKILL it
    /// and the whole tree from here, and confirm, within a bound. The
    /// coordinator is a child subreaper ([`become_subreaper`]), so what was
    /// below the dead guard is reparented below us and still found. The
    /// client is unusable afterwards; spawn a new one.
    ///
    /// The tree is killed whether or not the guard is reaped in time: a
    /// guard stuck in uninterruptible sleep runs no code of its own after
    /// the SIGKILL (its lease timer is gone with it), so from here on only
    /// this kill stands between its validator and a second signer. The
    /// scan finds the tree by cgroup and marker, adopted or not.
    pub async fn force_kill(&mut self) -> Result<usize, GuardError> {
        if let Some(g) = self.guard.id() {
            let _ = kill(Pid::from_raw(g as i32), Signal::SIGKILL);
        }
        // Reaped, so that its orphans have been handed to us.
        let reaped = tokio::time::timeout(self.confirm, self.guard.wait())
            .await
            .is_ok();
        if !reaped {
            tracing::error!(
                "the guard was not reaped {:?} after SIGKILL: killing its validator's tree without it",
                self.confirm
            );
        }
        let tree = self.tree.clone();
        let me = std::process::id() as i32;
        let job = tokio::task::spawn_blocking(move || {
            let r = tree.kill(Some(me), CONFIRM);
            reap_adopted();
            r
        });
        let r = match tokio::time::timeout(CONFIRM * 2, job).await {
            Ok(Ok(Ok(n))) => Ok(n),
            Ok(Ok(Err(e))) => Err(NotProven::Scan(e).into()),
            Ok(Err(e)) => Err(NotProven::Task(e).into()),
            Err(_) => Err(NotProven::ScanTimeout.into()),
        };
        if r.is_ok() {
            self.running = None;
        }
        r
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

/// How a stopped validator ended, from the guard's reply to a stop.
fn stopped(done: Done) -> Result<String, GuardError> {
    match done {
        Done::Stopped(how) => Ok(how),
        other => Err(GuardError::Unexpected(other, "how the validator ended")),
    }
}

/// Makes this process (the coordinator) a child subreaper: when a guard
/// dies, what was below it is reparented here rather than to init, so that
/// [`GuardClient::force_kill`] can still find and kill it.
pub fn become_subreaper() -> Result<(), GuardError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| GuardError::Spawn(std::io::Error::from(e)))
}

/// Reaps the zombies of processes adopted after a guard died (called only
/// while no guard runs: it would otherwise take the guard's exit status).
fn reap_adopted() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lease_is_sent_when_it_moves_a_step_later_or_at_all_earlier() {
        use super::lease_to_send;
        const MS: u64 = 1_000_000;
        let armed = Some(Some(1_000 * MS));
        let cases = [
            (
                Some(None),
                Some(5 * MS + 7),
                Some(Some(5 * MS)),
                "a first lease, rounded down",
            ),
            (armed, None, Some(None), "a withdrawal"),
            (Some(None), None, None, "nothing armed, nothing to arm"),
            (
                None,
                None,
                Some(None),
                "a withdrawal when the guard's lease is not known",
            ),
            (
                None,
                Some(1_000 * MS),
                Some(Some(1_000 * MS)),
                "a lease when it is not known",
            ),
            (armed, Some(1_000 * MS), None, "the same deadline"),
            (
                armed,
                Some(1_000 * MS + 3_000),
                None,
                "the other ack of one heartbeat",
            ),
            (
                armed,
                Some(1_000 * MS - 1),
                Some(Some(999 * MS)),
                "a nanosecond earlier",
            ),
            (
                armed,
                Some(1_019 * MS + 999_999),
                None,
                "less than a step later",
            ),
            (
                armed,
                Some(1_020 * MS + 5),
                Some(Some(1_020 * MS)),
                "the next heartbeat's ack",
            ),
            (
                armed,
                Some(900 * MS),
                Some(Some(900 * MS)),
                "a shorter fence in force",
            ),
        ];
        for (armed, new, sent, why) in cases {
            assert_eq!(lease_to_send(armed, new), sent, "{why}");
        }
    }

    use super::*;

    /// Finding: `force_kill` returned as soon as the SIGKILLed guard was
    /// not reaped in time (a guard in uninterruptible sleep), leaving its
    /// validator's tree alive with nobody's lease on it. Here the guard is
    /// given no time at all to be reaped.
    #[tokio::test]
    async fn a_guard_not_reaped_in_time_still_has_its_tree_killed() {
        let marker = format!("force-kill-test-{}", std::process::id());
        let tree = Tree::marker_only(&marker);
        // A guard slow to die (256 MiB of memory to give back), whose
        // validator stand-in carries the tree's marker, and which tells the
        // stand-in's pid in an exit event (the one event that carries a
        // pid alone).
        let script = format!(
            r#"$m = "a" x (1 << 28); $| = 1;
            if (($p = fork()) == 0) {{ $ENV{{"{MARKER_VAR}"}} = "{marker}"; exec("sleep", "600"); }}
            print "event exit $p started\n"; while (<STDIN>) {{}}"#
        );
        let mut cmd = tokio::process::Command::new("perl");
        cmd.args(["-e", &script]);
        let (mut client, mut events) =
            GuardClient::spawn_command(cmd, tree.clone(), Duration::from_millis(100)).unwrap();
        // The stand-in's pid, from the guard's first line.
        let validator = match events.recv().await {
            Some(ValidatorEvent::Exited(pid, _)) => pid as i32,
            other => panic!("no pid from the fake guard: {other:?}"),
        };
        // Until its exec, the forked stand-in shows perl's environment,
        // without the marker: wait until the tree sees it.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !tree.live_members(None).unwrap().contains(&validator) {
            assert!(
                std::time::Instant::now() < until,
                "the stand-in never joined the tree"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client.confirm = Duration::ZERO;
        // Known by its start time too, so that a later process given the
        // same pid is not taken for it.
        let started = crate::fence::lock::start_time(validator).expect("the stand-in's start time");
        // Its result is only shown: a scan held up on a loaded machine
        // makes it an error (no proof, so the tree is not counted dead) while
        // the kill may still land. What must hold is the stand-in's death.
        let killed = client.force_kill().await;
        // The kill counts a process with SIGKILL pending as dead: it runs
        // no more, but may take a moment to become a zombie (the likely
        // cause of a CI failure when this test looked at once). It must
        // get there well before the stand-in's 600 s sleep would end.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while crate::fence::lock::same_process_alive(validator, started) {
            assert!(
                std::time::Instant::now() < until,
                "the tree outlived a guard that was not reaped in time (force_kill: {killed:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A guard that answers the first request only once the second has
    /// come (late), then the second.
    fn late_guard() -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            r#"read a rest; read b rest; echo "$a ok"; echo "$b err not-running"; cat >/dev/null"#,
        ]);
        cmd
    }

    /// Finding (review of the typed protocol): a start refused because an
    /// earlier one runs must record that one as running, or the node never
    /// stops it and loops on refused starts. Here the guard answers every
    /// start with `running 4242`.
    #[tokio::test]
    async fn a_start_refused_as_running_records_the_running_validator() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            r#"while read seq rest; do echo "$seq err running 4242"; done"#,
        ]);
        let tree = Tree::marker_only("running-reply-test");
        let (mut client, _events) =
            GuardClient::spawn_command(cmd, tree, Duration::from_secs(5)).unwrap();
        assert_eq!(client.running(), None);
        match client.start(&["true".to_string()], false).await {
            Err(GuardError::Refused(Refusal::Running(4242))) => {}
            other => panic!("want the running refusal, got {other:?}"),
        }
        assert_eq!(client.running(), Some(4242));
    }

    /// Finding (review of the lease's 20 ms step): a withdrawal the guard
    /// did not acknowledge in time may still be carried out late; the
    /// client must not take the earlier lease as still armed and skip the
    /// next one. Here the guard never answers a withdrawal.
    #[tokio::test]
    async fn after_an_unanswered_withdrawal_the_next_lease_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests");
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            r#"while read seq what rest; do echo "$what" >> "$0"; [ "$what" = unlease ] || echo "$seq ok"; done"#,
        ])
        .arg(&log);
        let tree = Tree::marker_only("unanswered-unlease-test");
        let (mut client, _events) =
            GuardClient::spawn_command(cmd, tree, Duration::from_millis(100)).unwrap();
        const A: u64 = 1_000_000_000_000;
        client.lease(Some(A)).await.unwrap();
        match client.lease(None).await {
            Err(GuardError::Timeout(_)) => {}
            other => panic!("want a timeout, got {other:?}"),
        }
        client.lease(Some(A + 5_000_000)).await.unwrap();
        let seen = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            seen.lines().collect::<Vec<_>>(),
            ["lease", "unlease", "lease"],
            "the lease after an unanswered withdrawal was not sent"
        );
    }

    #[tokio::test]
    async fn a_late_reply_never_answers_a_newer_request() {
        let tree = Tree::marker_only("late-reply-test");
        let (mut client, _events) =
            GuardClient::spawn_command(late_guard(), tree, Duration::from_millis(100)).unwrap();
        // Request 1 times out: the guard is presumed slow.
        match client.lease(Some(5)).await {
            Err(GuardError::Timeout(_)) => {}
            other => panic!("want a timeout, got {other:?}"),
        }
        assert_eq!(
            client.lease, None,
            "an unacknowledged lease counted as taken"
        );
        // Request 2 meets the late "1 ok" first; only "2 ..." answers it.
        match client.kill().await {
            Err(GuardError::Refused(why)) => assert_eq!(why, Refusal::NotRunning),
            other => panic!("the late reply answered a newer request: {other:?}"),
        }
    }
}
