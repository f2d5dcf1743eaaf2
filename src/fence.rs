//! Fencing: everything that keeps a validator key from being used twice on
//! one host, including when the coordinator itself is frozen or dead.
//!
//! Owns: the exclusive lock on the data dir, killing a validator left over by
//! a previous run, the key links (swapped atomically: new symlink beside,
//! rename over, fsync the directory), and the guard process: the keyraft
//! binary re-executed as `keyraft guard`, parent of the validator, which
//! SIGKILLs the validator's process group when the lease deadline passes or
//! the coordinator disappears. Must not: decide when to activate; it obeys
//! the coordinator, and the guard obeys only its deadline and its stdin.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::KeyLink;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("data dir {dir} is in use by another keyraft (lock held on {lock})")]
    Locked { dir: String, lock: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FenceError + 'a {
    move |source| FenceError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the one clock the coordinator and the
/// guard agree on (it is system-wide, unlike an `Instant`).
pub fn mono_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Held for the coordinator's lifetime: one keyraft per data dir.
pub struct DataDirLock {
    _lock: Flock<File>,
}

/// Creates the data dir (mode 0700) and takes its exclusive lock.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, FenceError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("cannot create data dir", dir))?;
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("cannot open", &path))?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| FenceError::Locked {
            dir: dir.display().to_string(),
            lock: path.display().to_string(),
        })?;
    Ok(DataDirLock { _lock: lock })
}

const PID_FILE: &str = "validator.pid";

/// `/proc/<pid>/stat` start time, to tell a process from a later one with the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `started` (a zombie
/// counts as gone: it can no longer sign anything).
fn same_process_alive(pid: i32, started: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(19).and_then(|f| f.parse().ok()) == Some(started)
}

fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Kills the validator recorded by a previous run, if it is still the same
/// process (pid and start time match) and leads its own process group.
/// Returns its pid if one was killed.
pub fn kill_leftover(dir: &Path) -> Result<Option<i32>, FenceError> {
    let path = dir.join(PID_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot read", &path)(e)),
    };
    let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
    let (Some(Some(pid)), Some(Some(started))) = (parts.next(), parts.next()) else {
        tracing::warn!("ignoring unreadable {}", path.display());
        return std::fs::remove_file(&path)
            .map(|_| None)
            .map_err(io("cannot remove", &path));
    };
    let pid = pid as i32;
    let mut killed = None;
    if same_process_alive(pid, started) && process_group(pid) == Some(pid) {
        tracing::warn!(
            pid,
            "killing the validator left running by a previous keyraft"
        );
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while same_process_alive(pid, started) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if same_process_alive(pid, started) {
            return Err(FenceError::Refused(format!(
                "validator {pid} left by a previous run does not die; stop it by hand"
            )));
        }
        killed = Some(pid);
    }
    std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
    Ok(killed)
}

fn fsync_dir(dir: &Path) -> Result<(), FenceError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync", dir))
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

/// Makes `dst` a symlink to `src` atomically: a new link beside it, renamed
/// over it, the directory fsynced.
fn link(src: &Path, dst: &Path) -> Result<(), FenceError> {
    let dir = parent(dst);
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.keyraft-new"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(src, &tmp).map_err(io("cannot create link", &tmp))?;
    std::fs::rename(&tmp, dst).map_err(io("cannot rename link over", dst))?;
    fsync_dir(dir)
}

/// Removes `dst` if it is a symlink, or a regular file with exactly the
/// content of `src` (a stray copy of the key). Anything else is left alone.
fn unlink(l: &KeyLink) -> Result<bool, FenceError> {
    let meta = match std::fs::symlink_metadata(&l.dst) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("cannot inspect", &l.dst)(e)),
    };
    let remove = if meta.file_type().is_symlink() {
        true
    } else if meta.is_file() {
        let same = std::fs::read(&l.dst).ok() == std::fs::read(&l.src).ok();
        if !same {
            tracing::debug!(
                "leaving {} alone: not a link and not a copy of the key",
                l.dst.display()
            );
        }
        same
    } else {
        false
    };
    if remove {
        std::fs::remove_file(&l.dst).map_err(io("cannot remove", &l.dst))?;
        fsync_dir(parent(&l.dst))?;
    }
    Ok(remove)
}

/// The key links of one validator: `active` exist only while validating,
/// `standby` only while not.
#[derive(Debug, Clone)]
pub struct KeyLinks {
    pub active: Vec<KeyLink>,
    pub standby: Vec<KeyLink>,
}

impl KeyLinks {
    /// Standing by: every active link removed, standby links in place.
    pub fn stand_by(&self) -> Result<(), FenceError> {
        for l in &self.active {
            if unlink(l)? {
                tracing::info!("unlinked {}", l.dst.display());
            }
        }
        for l in &self.standby {
            link(&l.src, &l.dst)?;
        }
        Ok(())
    }

    /// Validating: every active link in place (replacing standby links).
    pub fn activate(&self) -> Result<(), FenceError> {
        for l in &self.active {
            link(&l.src, &l.dst)?;
            tracing::info!("linked {} -> {}", l.dst.display(), l.src.display());
        }
        Ok(())
    }

    /// Whether any active link currently points at its key.
    pub fn any_linked(&self) -> bool {
        self.active
            .iter()
            .any(|l| std::fs::read_link(&l.dst).is_ok_and(|t| t == l.src))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn sleeper() -> std::process::Child {
        Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_recorded_validator_is_killed_and_a_stranger_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = sleeper();
        let pid = ours.id() as i32;
        std::fs::write(
            dir.path().join(PID_FILE),
            format!("{pid} {}\n", start_time(pid).unwrap()),
        )
        .unwrap();
        assert_eq!(kill_leftover(dir.path()).unwrap(), Some(pid));
        assert!(ours.wait().is_ok());
        assert!(!dir.path().join(PID_FILE).exists());

        // Same pid, different start time: a recycled pid, not ours.
        let mut stranger = sleeper();
        let pid = stranger.id() as i32;
        std::fs::write(dir.path().join(PID_FILE), format!("{pid} 1\n")).unwrap();
        assert_eq!(kill_leftover(dir.path()).unwrap(), None);
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "killed a process that was not ours"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[test]
    fn links_swap_atomically_and_only_keyraft_links_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        let voter = dir.path().join("voter.json");
        std::fs::write(&key, "secret").unwrap();
        std::fs::write(&voter, "voter").unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let links = KeyLinks {
            active: vec![
                KeyLink {
                    src: key.clone(),
                    dst: home.join("validator_key.json"),
                },
                KeyLink {
                    src: key.clone(),
                    dst: home.join("node_key.json"),
                },
            ],
            standby: vec![KeyLink {
                src: voter.clone(),
                dst: home.join("node_key.json"),
            }],
        };
        links.activate().unwrap();
        assert!(links.any_linked());
        assert_eq!(std::fs::read_link(home.join("node_key.json")).unwrap(), key);
        links.stand_by().unwrap();
        assert!(!links.any_linked());
        assert!(!home.join("validator_key.json").exists());
        assert_eq!(
            std::fs::read_link(home.join("node_key.json")).unwrap(),
            voter
        );
        // A real file that is not a copy of the key is the node's own: left alone.
        std::fs::write(home.join("validator_key.json"), "something else").unwrap();
        links.stand_by().unwrap();
        assert!(home.join("validator_key.json").exists());
        // A copy of the key is removed.
        std::fs::write(home.join("validator_key.json"), "secret").unwrap();
        links.stand_by().unwrap();
        assert!(!home.join("validator_key.json").exists());
    }
}
