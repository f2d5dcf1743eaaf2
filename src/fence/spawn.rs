//! The validator's process as the guard starts it: between fork and exec
//! (only async-signal-safe calls there) it joins its cgroup leaf, takes
//! the validator's user and group, drops keyraft's capabilities and
//! ignored signals, and dies with the guard.
//!
//! Owns: that command. Must not: decide whether or where to start (the
//! guard does, [`super::guard`]).

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal};

use super::tree::MARKER_VAR;

/// The validator's command as the guard starts it: its own process group,
/// the tree's marker, output to the guard's stderr, and between fork and
/// exec the cgroup join (`cgroup_fd`), the validator's user and group
/// (`creds`), no capabilities, default signals, death with the guard.
pub(super) fn validator_command(
    prog: &str,
    args: &[String],
    (marker, guard_pid): (&str, i32),
    (out, err): (OwnedFd, OwnedFd),
    cgroup_fd: Option<RawFd>,
    creds: Option<(u32, u32, Vec<libc::gid_t>)>,
) -> Command {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env(MARKER_VAR, marker)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    // SAFETY: between fork and exec only async-signal-safe calls: write,
    // setgroups, setgid, setuid, open, sigaction, sigprocmask, prctl,
    // getppid; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_fd {
                // Join the tree's cgroup before anything else can fork.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Then the validator's user (groups, group, user, in that
            // order, and after the join, which needs keyraft's rights).
            // No set-id program may hand it a group the kernel fence does
            // not match, or privileges back.
            if let Some((uid, gid, groups)) = &creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nor keyraft's ambient capabilities (CAP_NET_ADMIN for the
            // kernel fence, where the unit grants it): a validator that
            // could edit nftables could lift its own fence.
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(std::io::Error::last_os_error());
            }
            // The validator must not inherit the guard's ignored signals,
            // or a wrapper would ignore every graceful stop.
            for sig in Signal::iterator() {
                if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                    let _ = nix::sys::signal::signal(sig, SigHandler::SigDfl);
                }
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)?;
            let oom = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if oom >= 0 {
                libc::write(oom, b"0".as_ptr().cast(), 1);
                libc::close(oom);
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != guard_pid {
                return Err(std::io::Error::other("guard died during start"));
            }
            Ok(())
        });
    }
    cmd
}
