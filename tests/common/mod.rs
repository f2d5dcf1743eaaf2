//! Helpers shared by the membership, restored-data-dir and signer-mode
//! suites (`tests/membership.rs`, `tests/restored.rs`, `tests/signer.rs`,
//! `tests/protocol.rs`, `tests/chains.rs`, `tests/hardware.rs`): finding
//! the leader, reloading a coordinator, stopping
//! and restarting nodes, copying and restoring Raft stores, and expecting
//! one-line refusals.
#![allow(dead_code)]

use std::path::Path;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, Mode, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};
use nix::sys::signal::Signal;

/// Sends coordinator `id` SIGHUP, as `systemctl reload keyraft` does.
pub fn sighup(c: &Cluster, id: u64) -> Result<()> {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    kill(Pid::from_raw(c.proc(id)?.pid()), Signal::SIGHUP)?;
    Ok(())
}

pub fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

pub fn wan(_: u64) -> NodeOpts {
    NodeOpts {
        flags: vec!["--timing".into(), "wan".into()],
        ..NodeOpts::default()
    }
}

pub fn signer_mode() -> Mode {
    Mode::signer("keyraft-membership-test")
}

/// The leader, as the first running node that knows one says.
pub async fn leader(c: &Cluster, ids: &[u64]) -> Result<u64> {
    eventually(SETTLE, "a leader", || async {
        for &id in ids {
            if let Ok(v) = c.status(id).await {
                if let Some(l) = v["cluster"]["leader"].as_u64() {
                    return Ok(Some(l));
                }
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| c.logs())
}

/// Waits until node `id` follows as a voter of a cluster of `members`.
pub async fn follows(c: &Cluster, id: u64, members: usize) -> Result<()> {
    eventually(
        SETTLE,
        &format!("node {id} to follow as a voter"),
        || async {
            let Ok(v) = c.status(id).await else {
                return Ok(None);
            };
            let voters = v["cluster"]["members"].as_array().map_or(0, |m| m.len());
            let me = node_entry(&v, id);
            let voter = v["cluster"]["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|x| x.as_u64() == Some(id)));
            Ok((voters == members && voter && me["raft"] == "Follower").then_some(()))
        },
    )
    .await
    .with_context(|| c.logs_ending_with(Some(id)))
}

/// The node among `ids` that validates now.
pub async fn validating(c: &Cluster, ids: &[u64]) -> Result<u64> {
    eventually(SETTLE, "a node to validate", || async {
        for &id in ids {
            if c.own_state(id).await.ok().as_deref() == Some("Validating") {
                return Ok(Some(id));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| c.logs())
}

/// Waits until node `id` answers `status` (its ports are up).
pub async fn takes_part_or_waits(c: &Cluster, id: u64) -> Result<()> {
    eventually(SETTLE, &format!("node {id} to answer"), || async {
        Ok(c.status(id).await.ok().map(|_| ()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(id)))
}

/// Waits until node `id` follows or leads again after a restart.
pub async fn takes_part(c: &Cluster, id: u64) -> Result<()> {
    eventually(SETTLE, &format!("node {id} to take part again"), || async {
        let Ok(v) = c.status(id).await else {
            return Ok(None);
        };
        let raft = node_entry(&v, id)["raft"].clone();
        Ok((raft == "Follower" || raft == "Leader").then_some(()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(id)))
}

/// Stops node `id` as an operator would (SIGTERM) and waits for it.
pub async fn stop(c: &mut Cluster, id: u64) -> Result<()> {
    c.signal(id, Signal::SIGTERM)?;
    c.forget(id)?
        .context("not running")?
        .wait_exit(SETTLE)
        .await?;
    Ok(())
}

/// What a Raft store holds: its vote's term and last index, its log's
/// bounds, and its memory of the members. Read from a copy (opening a
/// store takes its lock and drops a torn tail; what the files hold is what
/// counts).
pub async fn contents(dir: &Path) -> Result<String> {
    let copy = tempfile::tempdir()?;
    let at = copy.path().join("raft");
    copy_dir(dir, &at)?;
    let (log, _sm, memory) = keyraft::raft::store::open(&at)?;
    let bounds = log.verify().await?;
    Ok(format!("{:?} {bounds:?} {:?}", log.holds()?, memory.all()))
}

/// What a Raft store's data dir holds (its vote's term, its last index),
/// read from a copy as [`contents`] does.
pub async fn holds(dir: &Path) -> Result<keyraft::raft::memory::Holds> {
    let copy = tempfile::tempdir()?;
    let at = copy.path().join("raft");
    copy_dir(dir, &at)?;
    let (log, _sm, _memory) = keyraft::raft::store::open(&at)?;
    Ok(log.holds()?)
}

pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()?;
    ensure!(out.status.success(), "cp -a: {out:?}");
    Ok(())
}

/// Puts `backup` back as node `id`'s Raft store.
pub fn restore(c: &Cluster, id: u64, backup: &Path) -> Result<()> {
    let raft = c.nodes[&id].data.join("raft");
    std::fs::remove_dir_all(&raft)?;
    copy_dir(backup, &raft)
}

/// Starts node `id` as a process manager would and expects a refusal:
/// exit code 2 and one `error:` line, which is returned.
pub async fn refused(c: &Cluster, id: u64) -> Result<String> {
    let mut cmd = tokio::process::Command::from(c.command(id));
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(SETTLE, cmd.output())
        .await
        .with_context(|| format!("node {id} was not refused\n{}", c.logs()))??;
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    ensure!(
        out.status.code() == Some(2) && lines.len() == 1,
        "node {id} was not refused with one line: {:?}\n{err}",
        out.status
    );
    Ok(lines[0].to_string())
}

/// Moves the key on `n` times by switchover, asking for another node than
/// `avoid` (each a new term; `avoid` votes).
pub async fn move_on(c: &Cluster, n: usize, avoid: u64, ids: &[u64]) -> Result<()> {
    for _ in 0..n {
        let l = leader(c, ids).await?;
        let to = ids
            .iter()
            .copied()
            .find(|&i| i != l && i != avoid)
            .context("no target")?;
        eventually(SETTLE, &format!("a switchover to node {to}"), || async {
            let out = c.cli(l, &["switchover", "--to", &to.to_string()]).await?;
            Ok(out.status.success().then_some(()))
        })
        .await
        .with_context(|| c.logs())?;
        // The leader it asked may hand on elsewhere if `to` just stood down.
        eventually(SETTLE, "another leader", || async {
            let now = leader(c, ids).await?;
            Ok((now != l).then_some(()))
        })
        .await
        .with_context(|| c.logs())?;
    }
    Ok(())
}

/// The chain still moves: a height signed after the current one.
pub async fn chain_moves(c: &Cluster) -> Result<()> {
    let now = c.chain.totals().await?.height;
    eventually(SETTLE, &format!("a height signed after {now}"), || async {
        let s = c.chain.stats_since(now + 1).await?;
        Ok((s.signed > 0).then_some(()))
    })
    .await
    .with_context(|| c.logs())
}

pub fn no_refusals(c: &Cluster) -> Result<()> {
    for (id, n) in &c.nodes {
        let log = n.proc.as_ref().map(|p| p.log_text()).unwrap_or_default();
        ensure!(
            !log.contains("REFUSED") && !log.contains("behind what node"),
            "node {id} refused or was refused:\n{}",
            c.logs()
        );
    }
    Ok(())
}

/// Six entries committed by leader `l` without a new term: pause and
/// resume, three times.
pub async fn entries_in_this_term(c: &Cluster, l: u64) -> Result<()> {
    for _ in 0..3 {
        for cmd in ["pause", "resume"] {
            let out = c.cli(l, &[cmd]).await?;
            ensure!(out.status.success(), "{cmd}: {out:?}");
        }
    }
    Ok(())
}

/// How long the signer-mode suites wait for the sentries.
const SIGNED: std::time::Duration = std::time::Duration::from_secs(30);

/// Signer mode: waits until each of `sentries` had a precommit counted
/// above `after`.
pub async fn every_sentry_signed(
    c: &Cluster,
    after: u64,
    sentries: &[u64],
) -> Result<localnet::chain::Stats> {
    c.chain
        .wait_signed_by(after, sentries, SIGNED)
        .await
        .with_context(|| c.logs())
}

/// Signer mode: the chain's books, once it says no equivocation happened.
pub async fn no_equivocations(c: &Cluster) -> Result<localnet::chain::Stats> {
    let s = c.chain.stats_since(0).await?;
    ensure!(
        s.double_signs == 0 && s.equivocations.is_empty(),
        "equivocations: {:?}\n{}",
        s.equivocations,
        c.logs()
    );
    Ok(s)
}

/// Every chain's judge: no equivocation, no double sign.
pub async fn no_equivocations_on_any_chain(c: &Cluster) -> Result<()> {
    for (chain, judge) in c.judges() {
        let s = judge.stats_since(0).await?;
        ensure!(
            s.double_signs == 0 && s.equivocations.is_empty(),
            "{chain}: equivocations {:?}\n{}",
            s.equivocations,
            c.logs()
        );
    }
    Ok(())
}

/// Signer mode: SIGKILL of the leader's host (the leader as node 1 sees
/// it). Returns the other hosts, the heights the chain missed until every
/// one of their sentries signed again, and the chain's books then.
pub async fn kill_the_leaders_host(
    c: &mut Cluster,
) -> Result<(Vec<u64>, u64, localnet::chain::Stats)> {
    let l = leader(c, &[1]).await?;
    let killed_at = c.chain.totals().await?;
    let t = std::time::Instant::now();
    c.kill_host(l)?;
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let s = every_sentry_signed(c, killed_at.height, &rest).await?;
    let missed = s.missed - killed_at.missed;
    eprintln!(
        "signing resumed {} ms after the kill; {missed} heights missed",
        t.elapsed().as_millis()
    );
    Ok((rest, missed, s))
}
