//! Fail-closed fencing, judged by the fake chain: every launch shape of the
//! validator command (the node exec'd, a shell's child, a grandchild, a
//! daemonized node that left its process group and session, a node that
//! ignores SIGTERM) against every fault of the fence and of its host (a
//! frozen guard then a switchover, a killed guard then the host cut off, the
//! coordinator killed, the coordinator frozen, the host cut off). In each
//! case the chain counts no double sign, every process of the old
//! validator's tree is dead by the time another node signs, and another node
//! signs within the bound the design promises for that case.

use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use localnet::cluster::{alive, Cluster, Launch, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BLOCK_MS: u64 = 250;
/// The graceful-stop timeout these clusters run with.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// A failover: the followers' lease (1 s) and jitter, an election, the
/// commit, a fresh height (one block) and the validator's start, with room
/// for a busy 2-core CI host.
const FAILOVER_BOUND: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy)]
enum Fault {
    GuardFrozenThenSwitchover,
    GuardKilledThenCutOff,
    CoordinatorKilled,
    CoordinatorFrozen,
    CutOff,
}

const FAULTS: [Fault; 5] = [
    Fault::GuardFrozenThenSwitchover,
    Fault::GuardKilledThenCutOff,
    Fault::CoordinatorKilled,
    Fault::CoordinatorFrozen,
    Fault::CutOff,
];

fn opts(launch: Launch, cgroup: bool) -> impl Fn(u64) -> NodeOpts {
    move |_| {
        let mut flags = vec!["--stop-timeout".to_string(), "2s".to_string()];
        if !cgroup {
            flags.push("--no-cgroup".into());
        }
        NodeOpts {
            flags,
            launch,
            ..NodeOpts::default()
        }
    }
}

/// Waits until exactly one node validates, with its key linked, and the
/// others stand by; returns the validating one. (A node reports Validating
/// from the start of its activation; until the key is linked its tree is a
/// keyless plain node, which is not what a fault test must see fenced.)
async fn settled(c: &Cluster) -> Result<u64> {
    eventually(
        SETTLE * 2,
        "one validating node with its key linked and two standbys",
        || async {
            let mut validating = Vec::new();
            for &id in c.nodes.keys() {
                let v = c.status(id).await?;
                let me = node_entry(&v, id);
                match me["state"].as_str() {
                    Some("Validating") if me["key_linked"] == true => validating.push(id),
                    Some("Voting") => {}
                    _ => return Ok(None),
                }
            }
            Ok((validating.len() == 1).then(|| validating[0]))
        },
    )
    .await
}

/// Node `id`'s deactivations of any reason (a dead guard is seen as a
/// validator exit, or at the next lease renewal as a guard failure).
async fn deactivations(c: &Cluster, id: u64) -> Result<f64> {
    Ok(c.metrics(id)
        .await?
        .iter()
        .filter(|(k, _)| k.starts_with("keyraft_deactivations_total"))
        .map(|(_, v)| v)
        .sum())
}

/// Runs `keyraft switchover` on node `id` until the leader accepts it (it
/// refuses while the cluster is between states, as an operator would see).
async fn switchover(c: &Cluster, id: u64) -> Result<()> {
    eventually(SETTLE, "a switchover the leader accepts", || async {
        let out = c.cli(id, &["switchover"]).await?;
        Ok(out.status.success().then_some(()))
    })
    .await
}

/// Injects `fault` on the validating node `old`; returns the node whose
/// validator must be fenced, the pids of its tree at that moment, and when
/// the fault that forces the handover happened.
async fn inject(c: &mut Cluster, fault: Fault, old: u64) -> Result<(u64, Vec<i32>, Instant)> {
    let tree = c.tree_pids(old);
    ensure!(
        !tree.is_empty(),
        "node {old} has no marked validator processes"
    );
    match fault {
        Fault::GuardFrozenThenSwitchover => {
            let guard = c.guard_pid(old).context("no guard")?;
            // Named for `ps`: "keyraft guard ..." and, as the kernel names
            // it (ps -e, top), keyraft-guard.
            let comm = std::fs::read_to_string(format!("/proc/{guard}/comm"))?;
            let cmdline = std::fs::read(format!("/proc/{guard}/cmdline"))?;
            ensure!(
                comm.trim() == "keyraft-guard" && cmdline.starts_with(b"keyraft\0guard\0"),
                "the guard shows as {comm:?} {:?}",
                String::from_utf8_lossy(&cmdline)
            );
            kill(Pid::from_raw(guard), Signal::SIGSTOP)?;
            let t = Instant::now();
            switchover(c, old).await?;
            // The frozen guard was presumed broken and killed, not waited on.
            eventually(SETTLE, "the frozen guard to be killed", || async {
                Ok((!alive(guard)).then_some(()))
            })
            .await?;
            Ok((old, tree, t))
        }
        Fault::GuardKilledThenCutOff => {
            let guard = c.guard_pid(old).context("no guard")?;
            let before = deactivations(c, old).await?;
            kill(Pid::from_raw(guard), Signal::SIGKILL)?;
            // The coordinator kills the orphaned tree itself, deactivates,
            // then carries on. Until it has deactivated it still reports
            // Validating, so wait for that too: the next holder's tree must
            // be the keyed one, not the keyless node restarted meanwhile.
            eventually(SETTLE, "the orphaned tree to be killed", || async {
                Ok(tree.iter().all(|p| !alive(*p)).then_some(()))
            })
            .await?;
            eventually(SETTLE, "the coordinator to deactivate", || async {
                Ok((deactivations(c, old).await? > before).then_some(()))
            })
            .await?;
            let active = settled(c).await?;
            let tree = c.tree_pids(active);
            c.isolate(active);
            Ok((active, tree, Instant::now()))
        }
        Fault::CoordinatorKilled => {
            c.kill_coordinator(old)?;
            Ok((old, tree, Instant::now()))
        }
        Fault::CoordinatorFrozen => {
            c.signal(old, Signal::SIGSTOP)?;
            Ok((old, tree, Instant::now()))
        }
        Fault::CutOff => {
            c.isolate(old);
            Ok((old, tree, Instant::now()))
        }
    }
}

/// Undoes `fault` on node `id` so that the next one starts from a healthy cluster.
async fn undo(c: &mut Cluster, fault: Fault, id: u64) -> Result<()> {
    match fault {
        Fault::GuardFrozenThenSwitchover => {}
        Fault::GuardKilledThenCutOff | Fault::CutOff => c.heal(),
        Fault::CoordinatorKilled => {
            drop(c.forget(id)?);
            c.spawn(id)?;
        }
        Fault::CoordinatorFrozen => c.signal(id, Signal::SIGCONT)?,
    }
    Ok(())
}

async fn matrix(launch: Launch, cgroup: bool) -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, opts(launch, cgroup)).await?;
    let mut report = Vec::new();
    for fault in FAULTS {
        let what = format!("{launch:?} (cgroup {cgroup}), {fault:?}");
        let old = settled(&c)
            .await
            .with_context(|| format!("{what}: before\n{}", c.logs()))?;
        let at = c.chain.totals().await?.height;
        let (fenced, tree, t) = inject(&mut c, fault, old)
            .await
            .with_context(|| format!("{what}\n{}", c.logs()))?;
        let (new, _) = c
            .wait_signer(at + 1, &[fenced])
            .await
            .with_context(|| format!("{what}: no new signer\n{}", c.logs()))?;
        let took = t.elapsed();
        let left: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
        ensure!(
            left.is_empty(),
            "{what}: node {new} signs while processes {left:?} of node {fenced}'s validator tree live\n{}",
            c.logs()
        );
        // A node that ignores SIGTERM costs the whole stop timeout at each
        // graceful stop: the successor's plain node before it restarts with
        // the key, and in a switchover the holder's node before the release.
        let stops = match (launch, fault) {
            (Launch::IgnoresTerm, Fault::GuardFrozenThenSwitchover) => 2,
            (Launch::IgnoresTerm, _) => 1,
            _ => 0,
        };
        let bound = FAILOVER_BOUND + STOP_TIMEOUT * stops;
        ensure!(
            took <= bound,
            "{what}: node {new} signed {took:?} after the fault (bound {bound:?})\n{}",
            c.logs()
        );
        c.assert_no_double_signs()
            .await
            .with_context(|| what.clone())?;
        undo(&mut c, fault, fenced).await?;
        report.push(format!("{fault:?}: node {fenced} -> {new} in {took:?}"));
    }
    settled(&c).await?;
    let s = c.assert_no_double_signs().await?;
    eprintln!(
        "{launch:?} (cgroup {cgroup}): {}; {} heights, {} missed, 0 double signs",
        report.join("; "),
        s.height,
        s.missed
    );
    Ok(())
}

#[tokio::test]
async fn the_node_execd_directly_is_fenced_under_every_fault() -> Result<()> {
    matrix(Launch::Exec, true).await
}

#[tokio::test]
async fn a_shells_child_is_fenced_under_every_fault() -> Result<()> {
    matrix(Launch::ShellChild, true).await
}

#[tokio::test]
async fn a_grandchild_is_fenced_under_every_fault() -> Result<()> {
    matrix(Launch::Grandchild, true).await
}

#[tokio::test]
async fn a_daemonized_node_is_fenced_under_every_fault() -> Result<()> {
    matrix(Launch::Daemonize, true).await
}

#[tokio::test]
async fn a_daemonized_node_is_fenced_under_every_fault_without_a_cgroup() -> Result<()> {
    matrix(Launch::Daemonize, false).await
}

#[tokio::test]
async fn a_node_that_drops_the_marker_is_fenced_under_every_fault_without_a_cgroup() -> Result<()> {
    matrix(Launch::ClearsMarker, false).await
}

#[tokio::test]
async fn a_node_that_ignores_sigterm_is_fenced_under_every_fault() -> Result<()> {
    matrix(Launch::IgnoresTerm, true).await
}

/// A keyed restart whose guard blocks writing the pid file (a FIFO nobody
/// reads, where the pid file's temp file goes, stands for a stalled disk)
/// while the host is cut off: the guard's
/// timer must still see the new validator and kill it at the lease's end,
/// although the coordinator waits on the start's reply meanwhile.
#[tokio::test]
async fn a_keyed_restart_stuck_on_a_slow_disk_is_still_fenced() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, opts(Launch::Exec, true)).await?;
    let active = settled(&c).await?;
    let pid_file = c.nodes[&active].data.join("validator.pid");
    let stalled = c.nodes[&active].data.join(".validator.pid.keyraft-tmp");
    let at = c.chain.totals().await?.height;
    c.kill_validator(active)?;
    eventually(SETTLE, "the crashed validator's pid file to go", || async {
        Ok((!pid_file.exists()).then_some(()))
    })
    .await?;
    let _ = std::fs::remove_file(&stalled);
    nix::unistd::mkfifo(&stalled, nix::sys::stat::Mode::S_IRWXU)?;
    // The restart with the key is under way once its process exists.
    eventually(SETTLE, "the keyed restart", || async {
        Ok((!c.tree_pids(active).is_empty()).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    c.isolate(active);
    let cut = Instant::now();
    let (new, _) = c
        .wait_signer(at + 1, &[active])
        .await
        .with_context(|| c.logs())?;
    let left: Vec<i32> = c.tree_pids(active);
    // Let the blocked writer go, and the file be a file again.
    let reader = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&stalled);
    let _ = std::fs::remove_file(&stalled);
    drop(reader);
    ensure!(
        left.is_empty(),
        "node {new} signs {:?} after the cut while node {active}'s validator {left:?} lives\n{}",
        cut.elapsed(),
        c.logs()
    );
    c.heal();
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn start_up_kills_a_daemonized_node_left_by_a_dead_coordinator_and_guard() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, opts(Launch::Daemonize, false)).await?;
    let active = settled(&c).await?;
    let standby = *c
        .nodes
        .keys()
        .find(|&&id| id != active)
        .context("no standby")?;
    let tree = c.tree_pids(standby);
    ensure!(tree.len() >= 2, "want the wrapper and its daemon: {tree:?}");
    // Coordinator and guard die together (the coordinator frozen first, so
    // that it cannot act on its guard's death; then both SIGKILLed): nobody
    // is left to kill the daemon, which lives on as an orphan.
    let guard = c.guard_pid(standby).context("no guard")?;
    let coordinator = c.proc(standby)?.pid();
    c.signal(standby, Signal::SIGSTOP)?;
    // A signal is delivered when the kernel next schedules its target: had
    // the guard died first, the coordinator would kill the daemon itself.
    eventually(SETTLE, "the coordinator to stop", || async {
        Ok((proc_state(coordinator) == Some('T')).then_some(()))
    })
    .await?;
    kill(Pid::from_raw(guard), Signal::SIGKILL)?;
    drop(c.forget(standby)?);
    let orphans: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    ensure!(!orphans.is_empty(), "the daemon did not survive its guard");
    c.spawn(standby)?;
    eventually(SETTLE, "start-up to kill the leftover daemon", || async {
        Ok(orphans.iter().all(|p| !alive(*p)).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    settled(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// The process state letter of `pid` (`T`: stopped), from /proc.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A terminal's Ctrl-Z (SIGTSTP to keyraft's process group) stops neither
/// the coordinator nor its guard; a `kill -STOP` of that group stops the
/// coordinator alone, and the guard, in a session of its own, kills the
/// validator at its lease's end before a standby signs. With the kernel
/// fence off, the guard is all that stands between them: had one signal
/// stopped both, the validator (in its own group) would sign on beside
/// the new holder.
#[tokio::test]
async fn a_stop_of_keyrafts_process_group_never_stops_its_guard() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts {
        flags: ["--stop-timeout", "2s", "--kernel-fence", "off"]
            .map(String::from)
            .to_vec(),
        ..NodeOpts::default()
    })
    .await?;
    let old = settled(&c).await?;
    let coordinator = c.proc(old)?.pid();
    let guard = c.guard_pid(old).context("no guard")?;
    ensure!(
        nix::unistd::getpgid(Some(Pid::from_raw(guard)))? != Pid::from_raw(coordinator),
        "the guard shares the coordinator's process group"
    );

    // Ctrl-Z: nothing stops, node `old` validates on and nobody else signs.
    let at = c.chain.totals().await?.height;
    c.proc(old)?.signal_group(Signal::SIGTSTP)?;
    eventually(
        SETTLE,
        "four more heights signed by the same node",
        || async {
            let s = c.chain.stats_since(at + 1).await?;
            ensure!(
                s.signers.iter().all(|x| x.node == old),
                "another node signed after a Ctrl-Z: {:?}",
                s.signers
            );
            Ok((s.signers.len() >= 4).then_some(()))
        },
    )
    .await
    .with_context(|| c.logs())?;
    for pid in [coordinator, guard] {
        ensure!(
            proc_state(pid) != Some('T'),
            "process {pid} stopped on SIGTSTP"
        );
    }
    ensure!(c.own_state(old).await? == "Validating");

    // SIGSTOP of the group: the coordinator stops, its guard does not.
    let tree = c.tree_pids(old);
    let at = c.chain.totals().await?.height;
    c.proc(old)?.signal_group(Signal::SIGSTOP)?;
    let t = Instant::now();
    let (new, _) = c
        .wait_signer(at + 1, &[old])
        .await
        .with_context(|| c.logs())?;
    let left: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    ensure!(
        left.is_empty(),
        "node {new} signs {:?} after the stop while {left:?} of node {old}'s tree live\n{}",
        t.elapsed(),
        c.logs()
    );
    ensure!(
        proc_state(guard) != Some('T'),
        "the guard stopped with its coordinator's group"
    );
    c.proc(old)?.signal_group(Signal::SIGCONT)?;
    settled(&c).await?;
    let s = c.assert_no_double_signs().await?;
    eprintln!(
        "group stop: node {old} -> {new} in {:?}; {} heights, {} missed, 0 double signs",
        t.elapsed(),
        s.height,
        s.missed
    );
    Ok(())
}
