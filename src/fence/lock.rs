//! The data dir's exclusive lock, and finding a validator left running by
//! an earlier keyraft on this data dir (safety protocol step 6).
//!
//! Must not: touch key links or a running validator of this process.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{io, FenceError};

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

pub(crate) const PID_FILE: &str = "validator.pid";

/// `/proc/<pid>/stat` start time, to tell a process from a later one with the same pid.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `started` (a zombie
/// counts as gone: it can no longer sign anything).
pub(crate) fn same_process_alive(pid: i32, started: u64) -> bool {
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
            return Err(FenceError::LeftoverAlive(pid));
        }
        killed = Some(pid);
    }
    std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

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
}
