//! Fence agents (STONITH, docs/design.md step 3): before this node takes
//! the key over from a holder that did not release it, a program outside
//! that host powers it off, as Pacemaker's fencing does.
//!
//! The convention is the ClusterLabs one (Debian's `fence-agents`:
//! `fence_docker`, `fence_ipmilan`, `fence_aws`, `fence_virsh`, ...): the
//! agent runs with no arguments and reads `name=value` lines on stdin,
//! `action=off` first; exit 0 means done. Then `action=status` until it
//! exits 2 (off); 0 means still on, anything else is a failure. Every run
//! is bounded: past its timeout the agent's whole process group is killed
//! and the attempt failed.
//!
//! Owns: running one agent for one attempt or a bounded series, and
//! reading its secrets at that moment. Must not: decide whom to fence or
//! whether a takeover may go on (the coordinator does); believe anything
//! but exit codes (the agent's words only go to the log).

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::config::FenceAgent;

/// How often `status` is asked while the host is still reported on.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Why an attempt did not confirm the host off.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the secret option {name} from {path}: {why}")]
    Secret {
        name: String,
        path: String,
        why: String,
    },
    #[error("cannot start {agent}: {why}")]
    Spawn { agent: String, why: String },
    #[error("`action={action}` did not finish within {ms} ms (killed)")]
    Timeout { action: &'static str, ms: u64 },
    #[error("`action={action}` failed ({status}){said}")]
    Failed {
        action: &'static str,
        status: String,
        said: String,
    },
    #[error("`action=status` still reports the host on {ms} ms after `off`")]
    StillOn { ms: u64 },
}

impl AgentError {
    /// The metric label for this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            AgentError::Timeout { .. } => "timeout",
            AgentError::StillOn { .. } => "still_on",
            _ => "failed",
        }
    }
}

/// What one run of the agent ended with.
struct Exit {
    code: Option<i32>,
    status: String,
    said: String,
}

/// The agent's last words, for the log: its last non-empty line of
/// stderr (else stdout), shortened.
fn last_words(stdout: &[u8], stderr: &[u8]) -> String {
    let pick = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.chars().take(200).collect::<String>())
    };
    pick(stderr)
        .or_else(|| pick(stdout))
        .map(|l| format!(": {l}"))
        .unwrap_or_default()
}

/// Kills the agent's whole process group (its helpers too: ssh, curl,
/// ipmitool) when dropped before the agent was reaped: past the timeout,
/// or when the caller gives up (leadership lost, shutdown).
struct Group(Option<nix::unistd::Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The agent's stdin: the action, its options, its secrets read now.
async fn input(agent: &FenceAgent, action: &str) -> Result<String, AgentError> {
    let mut input = format!("action={action}\n");
    for (name, value) in &agent.options {
        input.push_str(&format!("{name}={value}\n"));
    }
    for (name, path) in &agent.secrets {
        let value = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| AgentError::Secret {
                name: name.clone(),
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
        input.push_str(&format!(
            "{name}={}\n",
            value.trim_end_matches(['\n', '\r'])
        ));
    }
    Ok(input)
}

/// One run of `agent` with `action`, bounded by `timeout` (reading its
/// secrets included).
async fn run(
    agent: &FenceAgent,
    action: &'static str,
    timeout: Duration,
) -> Result<Exit, AgentError> {
    let spawn_error = |e: std::io::Error| AgentError::Spawn {
        agent: agent.path.display().to_string(),
        why: e.to_string(),
    };
    let once = async {
        let input = input(agent, action).await?;
        let mut child = tokio::process::Command::new(&agent.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let mut group = Group(child.id().map(|p| nix::unistd::Pid::from_raw(p as i32)));
        if let Some(mut stdin) = child.stdin.take() {
            // An agent that exits without reading all of it is judged by
            // its exit status, not by the broken pipe.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let out = child.wait_with_output().await.map_err(spawn_error)?;
        // Reaped: its group id may be reused from now on.
        group.0 = None;
        Ok(Exit {
            code: out.status.code(),
            status: match (out.status.code(), out.status.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => out.status.to_string(),
            },
            said: last_words(&out.stdout, &out.stderr),
        })
    };
    tokio::time::timeout(timeout, once)
        .await
        .unwrap_or(Err(AgentError::Timeout {
            action,
            ms: timeout.as_millis() as u64,
        }))
}

/// What `action=status` says of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    On,
    Off,
}

/// One `action=status` (read-only: `keyraft check` asks it too).
pub async fn power_status(agent: &FenceAgent, timeout: Duration) -> Result<Power, AgentError> {
    let status = run(agent, "status", timeout).await?;
    match status.code {
        Some(0) => Ok(Power::On),
        Some(2) => Ok(Power::Off),
        _ => Err(AgentError::Failed {
            action: "status",
            status: status.status,
            said: status.said,
        }),
    }
}

/// One attempt: `off`, then `status` until it says off, each within
/// `timeout`.
pub async fn power_off_once(agent: &FenceAgent, timeout: Duration) -> Result<(), AgentError> {
    let off = run(agent, "off", timeout).await?;
    if off.code != Some(0) {
        return Err(AgentError::Failed {
            action: "off",
            status: off.status,
            said: off.said,
        });
    }
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(AgentError::StillOn {
                ms: started.elapsed().as_millis() as u64,
            });
        }
        match power_status(agent, left).await? {
            Power::Off => return Ok(()),
            Power::On => tokio::time::sleep(STATUS_EVERY.min(left)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use super::*;

    /// A shell agent that records its stdin and answers per action.
    fn agent(dir: &Path, name: &str, body: &str) -> FenceAgent {
        let path = dir.join(name);
        let script = format!(
            "#!/bin/sh\nin=$(cat)\necho \"$in\" >> {}/{name}.calls\naction=$(echo \"$in\" | sed -n 's/^action=//p')\n{body}\n",
            dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FenceAgent {
            path,
            options: vec![("plug".into(), "host-2".into())],
            secrets: vec![],
        }
    }

    fn calls(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(format!("{name}.calls"))).unwrap_or_default()
    }

    #[tokio::test]
    async fn off_then_status_until_off_with_options_and_secrets_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        // Reports on twice after `off`, then off.
        let mut a = agent(
            dir.path(),
            "slow",
            &format!(
                "case $action in off) exit 0;; status) n=$(cat {d}/n 2>/dev/null || echo 0); echo $((n+1)) > {d}/n; [ $n -ge 2 ] && exit 2; exit 0;; esac; exit 1",
                d = dir.path().display()
            ),
        );
        let secret: PathBuf = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        a.secrets.push(("password".into(), secret));
        power_off_once(&a, Duration::from_secs(10)).await.unwrap();
        let c = calls(dir.path(), "slow");
        assert!(
            c.starts_with("action=off\nplug=host-2\npassword=s3cret\n"),
            "{c}"
        );
        assert_eq!(c.matches("action=status").count(), 3, "{c}");
    }

    #[tokio::test]
    async fn a_failing_a_hanging_and_a_lying_agent_each_fail_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let failing = agent(dir.path(), "failing", "echo 'cannot reach API' >&2; exit 1");
        let e = power_off_once(&failing, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AgentError::Failed { action: "off", said, .. } if said.contains("cannot reach API")),
            "{e}"
        );
        let hanging = agent(dir.path(), "hanging", "sleep 3599 & wait");
        let started = Instant::now();
        let e = power_off_once(&hanging, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentError::Timeout { action: "off", .. }),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Its background child went with its process group.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::process::Command::new("pgrep")
            .args(["-f", "sleep 3599"])
            .output()
            .unwrap()
            .stdout
            .is_empty()
        {
            assert!(Instant::now() < deadline, "the agent's child outlived it");
            std::thread::sleep(Duration::from_millis(20));
        }
        let still_on = agent(dir.path(), "still_on", "exit 0");
        let e = power_off_once(&still_on, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::StillOn { .. }), "{e}");
        let odd = agent(dir.path(), "odd", "[ $action = off ] && exit 0; exit 1");
        let e = power_off_once(&odd, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Failed {
                    action: "status",
                    ..
                }
            ),
            "{e}"
        );
        // Given up on (leadership lost): the agent and its helpers go.
        let slow = agent(dir.path(), "slow_off", "sleep 3598 & wait");
        let attempt = power_off_once(&slow, Duration::from_secs(60));
        assert!(tokio::time::timeout(Duration::from_millis(300), attempt)
            .await
            .is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::process::Command::new("pgrep")
            .args(["-f", "sleep 3598"])
            .output()
            .unwrap()
            .stdout
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "a dropped attempt left its agent running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut unreadable = agent(dir.path(), "unreadable", "exit 0");
        unreadable
            .secrets
            .push(("password".into(), dir.path().join("missing")));
        let e = power_off_once(&unreadable, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Secret { .. }), "{e}");
        assert!(
            calls(dir.path(), "unreadable").is_empty(),
            "not run without its secret"
        );
    }
}
