//! Fencing: everything that keeps a validator key from being used twice on
//! one host, including when the coordinator itself is frozen or dead.
//!
//! - [`lock`]: the exclusive lock on the data dir, and a validator left
//!   running by a previous keyraft on it (safety protocol step 6).
//! - [`links`]: the key links, swapped atomically.
//! - [`tree`]: the validator's whole process tree (cgroup, inherited
//!   marker, the guard's descendants), found and killed as one; its
//!   cgroup's [`leaves`]: the standby's, a fresh one per keyed start, and
//!   the record of keyed ids the kernel fence keeps dropping.
//! - [`guard`]: the guard process that kills that tree when its lease
//!   deadline passes or the coordinator disappears; [`guard_client`] is the
//!   coordinator's end of it, [`protocol`] the lines between them; `alarm`
//!   is its lease timer's clock and `deadline` its lease on two clocks.
//! - [`kernel`]: the kernel fence, an nftables lease that holds back the
//!   keyed validator's traffic when no process is scheduled to act, over
//!   the small netlink client in [`nft`].
//! - [`agent`]: fence agents (STONITH), which power another member's host
//!   off before this node takes the key over without a release.
//! - `run_as`: the validator's user (`--validator-user`) as the guard
//!   starts it; `spawn`: its process, set up between fork and exec.
//!
//! Must not: decide when to activate; fencing obeys the coordinator, and
//! the guard obeys only its deadline and its control pipe.

pub mod agent;
mod alarm;
mod deadline;
pub mod guard;
pub mod guard_client;
pub mod kernel;
pub mod leaves;
pub mod links;
pub mod lock;
pub mod nft;
pub mod protocol;
mod run_as;
mod spawn;
pub mod tree;

use std::path::Path;

pub use guard::guard_main;
pub use guard_client::{become_subreaper, GuardClient, GuardError, NotProven, ValidatorEvent};
pub use links::KeyLinks;
pub use lock::{kill_leftover, lock_data_dir, DataDirLock};
pub use tree::Tree;

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
    #[error("{path} is not a link keyraft made (a {kind}): a node could sign with it outside keyraft's fence; move it away, keyraft links the key there only while validating")]
    NotOurLink { path: String, kind: &'static str },
    #[error("validator {0} left by a previous run does not die; stop it by hand")]
    LeftoverAlive(i32),
    #[error("validator processes {pids:?} are still alive {limit:?} after SIGKILL")]
    Survivors {
        pids: std::collections::BTreeSet<i32>,
        limit: std::time::Duration,
    },
    #[error("{0} earlier reads of /proc environments are still blocked: the scan is not proof")]
    ScanBlocked(usize),
    #[error("reading /proc/{pid}/environ did not finish within {bound:?}: the scan is not proof")]
    ScanSlow {
        pid: i32,
        bound: std::time::Duration,
    },
    #[error("the key links' task failed: {0}")]
    LinkTask(#[from] tokio::task::JoinError),
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FenceError + 'a {
    move |source| FenceError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Job-control signals (a terminal's Ctrl-Z sends SIGTSTP to the whole
/// foreground group; SIGTTIN and SIGTTOU stop a background reader or
/// writer) ignored by this process. The coordinator and the guard call it:
/// each is the other's backstop, so no signal that stops one may stop the
/// other, and neither stops on a keystroke. SIGSTOP cannot be ignored; the
/// guard's own session (see [`GuardClient::spawn`]) keeps a `kill -STOP
/// -PGID` of keyraft's group from reaching it. Children inherit the
/// ignored set; the guard resets every signal before it starts a validator.
pub fn ignore_job_control() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTSTP, Signal::SIGTTIN, Signal::SIGTTOU] {
        // SAFETY: installing SIG_IGN has no handler code to run.
        unsafe {
            let _ = signal(sig, SigHandler::SigIgn);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the one clock the coordinator and the
/// guard agree on (it is system-wide, unlike an `Instant`).
pub fn mono_now_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// CLOCK_BOOTTIME in nanoseconds: like CLOCK_MONOTONIC, but it also counts
/// time the machine was suspended.
pub fn boot_now_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_BOOTTIME)
}
