//! `fakefence`: a fence agent for localnet hosts, speaking the ClusterLabs
//! convention keyraft uses with real agents (`name=value` lines on stdin;
//! `action=off` exits 0 when done, `action=status` exits 0 while the host
//! is on and 2 once it is off, 1 on error).
//!
//! A localnet "host" is a node's directory (`plug=/path/to/n1`): powering
//! it off SIGKILLs every process a dead host would lose, frozen or not:
//! those whose command line names a path inside it (the coordinator, its
//! guard, the validator and its wrappers) and those carrying keyraft's
//! fence marker for its data dir. `hang=1` makes the agent hang (to test
//! the bound on it).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use localnet::cluster::FENCE_MARKER;
use localnet::harness::{alive, processes};

/// The live processes of the host in `plug`.
fn host_pids(plug: &Path) -> Vec<i32> {
    let dir = plug.canonicalize().unwrap_or_else(|_| plug.to_path_buf());
    let inside = format!("{}/", dir.display());
    let marker = format!("{FENCE_MARKER}={}", dir.join("data").display());
    let me = std::process::id() as i32;
    processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| *pid != me && alive(*pid))
        .filter(|pid| {
            let named = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(&inside))
            });
            let marked = std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == marker.as_bytes()));
            named || marked
        })
        .collect()
}

fn main() -> ExitCode {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        eprintln!("fakefence: cannot read stdin");
        return ExitCode::from(1);
    }
    let opt = |name: &str| {
        input
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    if opt("hang") == Some("1") {
        loop {
            std::thread::park();
        }
    }
    let Some(plug) = opt("plug").map(PathBuf::from) else {
        eprintln!("fakefence: no plug= (the localnet node's directory)");
        return ExitCode::from(1);
    };
    if !plug.join("data").is_dir() {
        eprintln!(
            "fakefence: {} is not a localnet node directory",
            plug.display()
        );
        return ExitCode::from(1);
    }
    match opt("action").unwrap_or("reboot") {
        "off" => {
            // Every pid first, then the signals back to back.
            for _ in 0..10 {
                let pids = host_pids(&plug);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            eprintln!("fakefence: {} powered off", plug.display());
            ExitCode::SUCCESS
        }
        "status" | "monitor" => {
            if host_pids(&plug).is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        other => {
            eprintln!("fakefence: action {other} is not supported (off, status, monitor)");
            ExitCode::from(1)
        }
    }
}
