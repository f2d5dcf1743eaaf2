//! The guard: the keyraft binary re-executed (through `/proc/self/exe`) as
//! `keyraft guard`, parent and child subreaper of the validator's whole
//! process tree. It SIGKILLs that tree when the lease deadline passes (by
//! CLOCK_MONOTONIC or CLOCK_BOOTTIME, whichever says so first), when the
//! coordinator disappears, or on any error reading its control pipe, even if
//! the coordinator is frozen. This file is the guard's own side
//! ([`guard_main`]); the coordinator's handle on it is
//! [`super::guard_client::GuardClient`].
//!
//! Its protocol, one line each way, is [`super::protocol`].
//!
//! `stop` runs beside the loop, so lease renewals and their acks go on
//! during a graceful stop; an unanswered request is the coordinator's sign
//! that the guard is broken (see
//! [`super::guard_client::GuardClient::force_kill`]).
//!
//! Must not: decide when the validator runs with the key; the guard obeys
//! only its deadline and its control pipe, the client only the coordinator.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigHandler, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::alarm::Alarm;
use super::deadline::{boot_offset, Lease};
use super::kernel::{KernelError, KernelLease, Keyed, Plan};
use super::lock::{start_time, PID_FILE};
use super::protocol::{parse_request, Done, Event, Refusal, Reply, Request};
use super::run_as::RunAs;
use super::tree::Tree;
use super::{boot_now_ns, mono_now_ns};

/// The guard's threads' stacks: small, since its memory is locked.
const THREAD_STACK: usize = 256 * 1024;

/// How long the guard itself gives a SIGKILLed tree to be confirmed dead.
pub(super) const CONFIRM: Duration = Duration::from_secs(1);

#[derive(Default)]
struct GuardState {
    pid: Option<i32>,
    lease: Option<Lease>,
    /// `boot_offset()` at the first lease since the last unlease.
    anchor: Option<u64>,
    /// Set while a requested stop or kill is under way.
    expected_exit: bool,
    /// When (CLOCK_BOOTTIME) the lease timer wakes; `None`: without a lease.
    timer_at: Option<u64>,
    last_exit: Option<String>,
}

struct Guard {
    state: Mutex<GuardState>,
    changed: Condvar,
    alarm: Alarm,
    /// Held while a validator is being spawned, so that the reaper does not
    /// reap a child std's spawn is about to wait for.
    spawning: Mutex<()>,
    tree: Tree,
    pid_file: PathBuf,
    me: i32,
    /// The kernel fence's lease element, when the coordinator installed
    /// one; apart from `state`, so that the lease timer never waits on it.
    kernel: Option<Mutex<KernelLease>>,
    /// `--validator-user`: whom the validator runs as.
    user: Option<RunAs>,
}

impl Guard {
    fn lock(&self) -> MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the kernel fence's lease, if there is one.
    fn with_kernel(
        &self,
        f: impl FnOnce(&mut KernelLease) -> Result<(), KernelError>,
    ) -> Result<Done, Refusal> {
        if let Some(k) = &self.kernel {
            f(&mut k.lock().unwrap_or_else(|p| p.into_inner()))
                .map_err(|e| Refusal::KernelFence(e.to_string()))?;
        }
        Ok(Done::Done)
    }

    /// Where a keyed start runs its validator: with the kernel fence, under
    /// a fresh key its table holds, the lease moved to it and proven there;
    /// without, in a fresh keyed leaf where the tree has a cgroup. Takes
    /// the state lock only to read the time left, under the kernel's.
    fn fresh_key(&self) -> Result<Option<Keyed>, Refusal> {
        let Some(k) = &self.kernel else {
            // Without a kernel fence a leaf only helps the kill: a start
            // outside one is still found by the marker and the subreaper.
            return Ok(self.tree.leaves().and_then(|l| match l.fresh_keyed() {
                Ok((procs, _)) => Some(Keyed::Cgroup(procs)),
                Err(e) => {
                    eprintln!("keyraft guard: starting the validator outside a keyed cgroup: {e}");
                    None
                }
            }));
        };
        let mut k = k.lock().unwrap_or_else(|p| p.into_inner());
        let left = || self.lock().lease.map_or(Duration::ZERO, |l| l.left());
        let refused = |e: KernelError| Refusal::KernelFence(e.to_string());
        let keyed = k.rekey(left).map_err(refused)?;
        k.ready().map_err(refused)?;
        Ok(Some(keyed))
    }

    /// Kills the whole tree: the validator and its process group at once
    /// (no scan stands before them), then the guard's descendants, the
    /// marker and the cgroup.
    fn kill_tree(&self, validator: Option<i32>) -> Result<usize, Refusal> {
        if let Some(pid) = validator {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.tree
            .kill(Some(self.me), CONFIRM)
            .map_err(|e| Refusal::NotProven(e.to_string()))
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, c) => format!("code {c}"),
        WaitStatus::Signaled(_, s, _) => format!("signal {}", s.as_str()),
        other => format!("{other:?}"),
    }
}

/// Best-effort hardening: the guard must outlive what it guards. Each step
/// needs privileges (CAP_SYS_RESOURCE, CAP_IPC_LOCK, CAP_SYS_NICE) that a
/// root service has; without them the guard says so and carries on.
fn harden() {
    let mut missing = Vec::new();
    if nix::sys::prctl::set_child_subreaper(true).is_err() {
        missing.push("child subreaper");
    }
    if std::fs::write("/proc/self/oom_score_adj", "-1000").is_err() {
        missing.push("oom_score_adj -1000");
    }
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        missing.push("locked memory");
    }
    if !missing.is_empty() {
        eprintln!("keyraft guard: running without {}", missing.join(", "));
    }
}

/// Real-time priority for the lease timer thread, so that on a busy or
/// thawing host it runs before the validator does (best effort).
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: pthread_self is always valid; the param outlives the call.
    let r = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if r != 0 {
        eprintln!("keyraft guard: lease timer without real-time priority (error {r})");
    }
}

/// `keyraft guard --data-dir DIR`: runs until its control pipe closes.
/// With `kernel_fence`, the lease is kept in the kernel fence the
/// coordinator installed for this tree too, under a fresh key for each
/// keyed start.
pub fn guard_main(
    data_dir: &Path,
    cgroup: bool,
    kernel_fence: bool,
    user: Option<&str>,
) -> std::io::Result<()> {
    // Named in `ps -e` and top (the kernel's name of a /proc/self/exe is
    // "exe"); `ps -f` shows "keyraft guard ..." from the command line.
    if let Ok(name) = std::ffi::CString::new("keyraft-guard") {
        let _ = nix::sys::prctl::set_name(&name);
    }
    // The coordinator decides when we stop: ignore terminal signals, and
    // job control (we run in a session of our own, see the client).
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: installing SIG_IGN has no handler code to run.
        unsafe {
            let _ = nix::sys::signal::signal(sig, SigHandler::SigIgn);
        }
    }
    super::ignore_job_control();
    harden();
    let user = user.map(RunAs::look_up).transpose()?;
    let tree = Tree::for_data_dir(data_dir, cgroup).owned_by(user.as_ref().map(|u| u.user.uid));
    let kernel = if kernel_fence {
        let lease = Plan::for_tree(&tree, user.as_ref().map(|u| &u.user))
            .and_then(|p| KernelLease::open(p, data_dir))
            .map_err(|e| std::io::Error::other(format!("kernel fence: {e}")))?;
        Some(Mutex::new(lease))
    } else {
        None
    };
    let guard = Arc::new(Guard {
        state: Mutex::new(GuardState::default()),
        changed: Condvar::new(),
        alarm: Alarm::new()?,
        spawning: Mutex::new(()),
        tree,
        pid_file: data_dir.join(PID_FILE),
        me: std::process::id() as i32,
        kernel,
        user,
    });
    // Without its timer or its reaper the guard cannot guard: fail closed.
    let timer = guard.clone();
    std::thread::Builder::new()
        .name("lease-timer".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            realtime_priority();
            lease_timer(&timer)
        })?;
    let reaper = guard.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(THREAD_STACK)
        .spawn(move || reap(&reaper))?;
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // End of input or any read error: the coordinator is gone or the
        // pipe is broken; either way nothing may validate without it.
        match stdin.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        let (seq, req) = match parse_request(line) {
            Ok(r) => r,
            // Answered where it has a number to answer, so the client's
            // wait ends in a refusal rather than a timeout.
            Err(e) => match line.split(' ').next().and_then(|s| s.parse::<u64>().ok()) {
                Some(seq) => {
                    say(&Reply {
                        seq,
                        outcome: Err(Refusal::BadRequest(e.to_string())),
                    }
                    .to_string());
                    continue;
                }
                None => {
                    eprintln!("keyraft guard: {e}");
                    continue;
                }
            },
        };
        serve(&guard, seq, req);
    }
    let _ = stop(&guard, None);
    Ok(())
}

/// Answers request `seq` (a stop beside the loop, so that leases are
/// renewed during it).
fn serve(guard: &Arc<Guard>, seq: u64, req: Request) {
    let reply = move |outcome: Result<Done, Refusal>| say(&Reply { seq, outcome }.to_string());
    match req {
        Request::Start { keyed, argv } => reply(start(guard, keyed, &argv)),
        Request::Stop { grace_ms } => {
            let grace = Duration::from_millis(grace_ms);
            let g = guard.clone();
            // Beside the loop, so leases are renewed during the stop; if
            // no thread can be had (locked memory at its limit), inline.
            let spawned = std::thread::Builder::new()
                .stack_size(THREAD_STACK)
                .spawn(move || reply(stop(&g, Some(grace))));
            if spawned.is_err() {
                reply(stop(guard, Some(grace)));
            }
        }
        Request::Kill => reply(stop(guard, None)),
        Request::Signal(sig) => reply(signal(guard, sig)),
        Request::Lease { mono_ns } => reply(lease(guard, mono_ns)),
        Request::Unlease => {
            let mut st = guard.lock();
            st.lease = None;
            st.anchor = None;
            drop(st);
            guard.changed.notify_all();
            reply(guard.with_kernel(|k| k.clear()));
        }
    }
}

/// A new lease deadline: the kernel's lease first (a failure there leaves
/// the old deadline in force, to run out), then the guard's own.
///
/// A lease that has already run out is never renewed, even where the
/// lease timer has not killed the tree yet (a thaw lets this thread run
/// first): the renewal is refused and the timer kills it.
fn lease(guard: &Guard, ns: u64) -> Result<Done, Refusal> {
    let anchor = {
        let st = guard.lock();
        if st.lease.is_some_and(|l| l.left().is_zero()) {
            return Err(Refusal::RanOut);
        }
        st.anchor.unwrap_or_else(boot_offset)
    };
    let new = Lease::from_mono(ns, anchor);
    guard.with_kernel(|k| k.renew(|| new.left()))?;
    let mut st = guard.lock();
    if st.lease.is_some_and(|l| l.left().is_zero()) {
        drop(st);
        let _ = guard.with_kernel(|k| k.clear());
        return Err(Refusal::RanOut);
    }
    let anchor = *st.anchor.get_or_insert(anchor);
    let lease = Lease::from_mono(ns, anchor);
    st.lease = Some(lease);
    // The timer must look again only if it would wake after this deadline.
    let ends = boot_now_ns().saturating_add(lease.left().as_nanos() as u64);
    let nearer = st.timer_at.is_none_or(|at| ends < at);
    drop(st);
    if nearer {
        guard.alarm.ring();
    }
    Ok(Done::Done)
}

fn signal(guard: &Guard, sig: i32) -> Result<Done, Refusal> {
    let signal = Signal::try_from(sig).map_err(|_| Refusal::BadSignal(sig))?;
    let pid = guard.lock().pid.ok_or(Refusal::NotRunning)?;
    kill(Pid::from_raw(pid), signal).map_err(|e| match e {
        // It died between the read and the kill.
        nix::errno::Errno::ESRCH => Refusal::NotRunning,
        e => Refusal::NotSignalled(e.to_string()),
    })?;
    Ok(Done::Done)
}

fn start(guard: &Arc<Guard>, keyed: bool, argv: &[String]) -> Result<Done, Refusal> {
    let (prog, args) = argv
        .split_first()
        .ok_or(Refusal::BadRequest("an empty command".into()))?;
    may_start(&guard.lock(), keyed)?;
    // Leftovers of an earlier validator (a straggler that had not died yet)
    // must be gone before a new one may start. Outside the state lock: a
    // scan of /proc can take long, and the lease timer must never wait.
    guard.kill_tree(None)?;
    let keyed_in = if keyed { guard.fresh_key()? } else { None };
    let mut st = guard.lock();
    may_start(&st, keyed)?;
    // The validator's output goes to our stderr, which the coordinator reads.
    let (Ok(out), Ok(err)) = (
        std::io::stderr().as_fd().try_clone_to_owned(),
        std::io::stderr().as_fd().try_clone_to_owned(),
    ) else {
        return Err(Refusal::Spawn("cannot duplicate stderr".into()));
    };
    // Keyed: in this start's fresh leaf or group; keyless: in the standby
    // leaf, and the validator's own group.
    let (cgroup, keyed_gid) = match keyed_in {
        Some(Keyed::Cgroup(procs)) => (Some(procs), None),
        Some(Keyed::Group(gid)) => (None, Some(gid)),
        None => (guard.tree.leaves().and_then(|l| l.standby_procs()), None),
    };
    let cgroup_fd = cgroup.as_ref().map(|f| f.as_raw_fd());
    // As `--validator-user`; keyed, in the keyed group the kernel fence
    // matches on where it matches by user.
    let creds = guard.user.as_ref().map(|u| {
        let gid = keyed_gid.unwrap_or(u.user.gid);
        (u.user.uid, gid, u.groups.clone())
    });
    let mut cmd = super::spawn::validator_command(
        prog,
        args,
        (guard.tree.marker(), guard.me),
        (out, err),
        cgroup_fd,
        creds,
    );
    let spawning = guard.spawning.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd
        .spawn()
        .map_err(|e| Refusal::Spawn(format!("{prog}: {e}")))?;
    drop(spawning);
    drop(cgroup);
    let pid = child.id() as i32;
    // The reaper waits for it (and for every orphan of its tree).
    drop(child);
    // Watched by the lease timer from this instant, before any disk write.
    st.pid = Some(pid);
    st.last_exit = None;
    drop(st);
    guard.changed.notify_all();
    if let Some(started) = start_time(pid) {
        let _ = crate::durable::write(
            &guard.pid_file,
            format!("{pid} {started}\n").as_bytes(),
            0o600,
        );
    }
    Ok(Done::Started(u32::try_from(pid).unwrap_or(0)))
}

/// Whether a validator may start now (`keyed`: with the key).
fn may_start(st: &GuardState, keyed: bool) -> Result<(), Refusal> {
    if let Some(pid) = st.pid {
        return Err(Refusal::Running(u32::try_from(pid).unwrap_or(0)));
    }
    if st.lease.is_some_and(|l| l.left().is_zero()) {
        return Err(Refusal::RanOut);
    }
    if keyed && st.lease.is_none() {
        return Err(Refusal::NoLease);
    }
    Ok(())
}

/// Reaps every child: the validator, and the orphans of its tree that the
/// kernel hands to us as their subreaper. When the validator itself exits,
/// the rest of its tree is killed: stragglers never outlive it.
fn reap(guard: &Guard) {
    loop {
        // Look without reaping, then reap only outside a spawn (std's spawn
        // waits for a child whose exec failed, and must find it).
        let peek = waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let pid = match peek {
            Ok(status) => match status.pid() {
                Some(p) => p,
                None => continue,
            },
            Err(_) => {
                // No children: wait until a validator starts.
                let st = guard.lock();
                let _ = guard.changed.wait_timeout(st, Duration::from_millis(200));
                continue;
            }
        };
        let status = {
            let _spawning = guard.spawning.lock().unwrap_or_else(|p| p.into_inner());
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => continue,
                Ok(s) => s,
            }
        };
        let pid = pid.as_raw();
        if guard.lock().pid != Some(pid) {
            continue; // an orphan of the tree, or an earlier validator
        }
        let how = describe(status);
        let stragglers = guard.kill_tree(None);
        let _ = std::fs::remove_file(&guard.pid_file);
        let mut st = guard.lock();
        st.pid = None;
        if !st.expected_exit {
            let note = match stragglers {
                Ok(0) => String::new(),
                Ok(n) => format!(" ({n} leftover processes killed)"),
                Err(e) => format!(" (leftovers: {e})"),
            };
            let how = format!("{how}{note}");
            let pid = u32::try_from(pid).unwrap_or(0);
            say(&Event::Exit { pid, how }.to_string());
        }
        st.last_exit = Some(how);
        drop(st);
        guard.changed.notify_all();
    }
}

/// SIGTERM to every process of the tree, then (after `grace`) or at once
/// SIGKILL of all of it; replies once the whole tree is proven dead.
fn stop(guard: &Guard, grace: Option<Duration>) -> Result<Done, Refusal> {
    let pid = {
        let mut st = guard.lock();
        st.expected_exit = true;
        st.pid
    };
    // No lock is held across a /proc scan: the lease timer must not wait.
    if let (Some(pid), Some(grace)) = (pid, grace) {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
        // Best effort: the SIGKILL below is what must reach everything.
        for member in guard.tree.live_members(Some(guard.me)).unwrap_or_default() {
            let _ = kill(Pid::from_raw(member), Signal::SIGTERM);
        }
        drop(wait_gone(guard, guard.lock(), grace));
    }
    let pid = guard.lock().pid;
    let killed = guard.kill_tree(pid);
    let mut st = wait_gone(guard, guard.lock(), CONFIRM);
    st.expected_exit = false;
    let left = st.pid;
    let how = st.last_exit.clone().unwrap_or_else(|| "not running".into());
    drop(st);
    match (killed, left) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(p)) => Err(Refusal::NotProven(format!("validator {p} was not reaped"))),
        (Ok(_), None) => Ok(Done::Stopped(how)),
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

/// Kills the validator's tree when the lease deadline passes. Sleeps until
/// the deadline by the boot clock, which runs out first (see [`Lease`]); a
/// later deadline does not wake it: it finds that at the old one.
fn lease_timer(guard: &Guard) {
    let mut st = guard.lock();
    loop {
        match st.lease {
            // Armed: whatever of the tree exists dies at the deadline, with
            // or without a recorded validator pid.
            Some(lease) => {
                let left = lease.left();
                if left.is_zero() {
                    let pid = st.pid;
                    st.expected_exit = true;
                    st.lease = None;
                    st.anchor = None;
                    st.timer_at = None;
                    let late_ms = mono_now_ns().saturating_sub(lease.mono) / 1_000_000;
                    let killed = guard.kill_tree(pid);
                    let how = format!(
                        "lease expired {late_ms}ms ago, validator tree killed ({killed:?})"
                    );
                    say(&Event::Fenced {
                        pid: pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                        how,
                    }
                    .to_string());
                    // Until that validator is reaped; a new start ends the wait.
                    let until = Instant::now() + CONFIRM;
                    while pid.is_some() && st.pid == pid && Instant::now() < until {
                        st = guard
                            .changed
                            .wait_timeout(st, until.saturating_duration_since(Instant::now()))
                            .map(|r| r.0)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    st.expected_exit = false;
                } else {
                    let at = boot_now_ns().saturating_add(left.as_nanos() as u64);
                    st.timer_at = Some(at);
                    drop(st);
                    guard.alarm.sleep_until(Some(at));
                    st = guard.lock();
                }
            }
            None => {
                st.timer_at = None;
                drop(st);
                guard.alarm.sleep_until(None);
                st = guard.lock();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding: a renewal that came after the deadline, before the lease
    /// timer had run (a thaw wakes both), extended a lease that had run
    /// out. No timer thread runs here, so the renewal always comes first.
    #[test]
    fn a_lease_that_ran_out_is_never_renewed() {
        let guard = Guard {
            state: Mutex::new(GuardState::default()),
            changed: Condvar::new(),
            alarm: Alarm::new().unwrap(),
            spawning: Mutex::new(()),
            tree: Tree::marker_only("renew-test"),
            pid_file: PathBuf::from("/nonexistent/validator.pid"),
            me: std::process::id() as i32,
            kernel: None,
            user: None,
        };
        let soon = mono_now_ns() + 1_000_000_000;
        assert!(lease(&guard, soon).is_ok());
        let ran_out = Lease::from_mono(mono_now_ns().saturating_sub(1), boot_offset());
        guard.lock().lease = Some(ran_out);
        let later = mono_now_ns() + 5_000_000_000;
        assert!(
            lease(&guard, later).is_err(),
            "a lease that ran out was renewed"
        );
        assert!(guard.lock().lease.is_some_and(|l| l.left().is_zero()));
    }
}
