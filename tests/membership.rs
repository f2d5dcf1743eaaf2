//! Membership and memory (docs/design.md, steps 7 and 9), over real
//! processes and real sled dirs, each judged by the fake chain: removing the
//! active node, a node wiped after a whole-cluster crash, data dirs restored
//! from older copies (one node, or a majority), and the restarts that must
//! never be refused.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, Mode, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};
use nix::sys::signal::Signal;

fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

fn wan(_: u64) -> NodeOpts {
    NodeOpts {
        flags: vec!["--timing".into(), "wan".into()],
        ..NodeOpts::default()
    }
}

fn signer_mode() -> Mode {
    Mode::Signer {
        chain_id: "keyraft-membership-test".into(),
        round_every: 4,
        validators: 2,
    }
}

/// The leader, as the first running node that knows one says.
async fn leader(c: &Cluster, ids: &[u64]) -> Result<u64> {
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
async fn follows(c: &Cluster, id: u64, members: usize) -> Result<()> {
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
async fn validating(c: &Cluster, ids: &[u64]) -> Result<u64> {
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
async fn takes_part_or_waits(c: &Cluster, id: u64) -> Result<()> {
    eventually(SETTLE, &format!("node {id} to answer"), || async {
        Ok(c.status(id).await.ok().map(|_| ()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(id)))
}

/// Waits until node `id` follows or leads again after a restart.
async fn takes_part(c: &Cluster, id: u64) -> Result<()> {
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
async fn stop(c: &mut Cluster, id: u64) -> Result<()> {
    c.signal(id, Signal::SIGTERM)?;
    c.forget(id)?
        .context("not running")?
        .wait_exit(SETTLE)
        .await?;
    Ok(())
}

/// What a Raft store holds: its vote's term and last index, its log's
/// bounds, and its memory of the members. Read from a copy (sled rewrites
/// its own files when it opens a store; what they hold is what counts).
async fn contents(dir: &Path) -> Result<String> {
    let copy = tempfile::tempdir()?;
    let at = copy.path().join("raft");
    copy_dir(dir, &at)?;
    let (log, _sm, memory) = keyraft::raft::store::open(&at)?;
    let bounds = log.verify().await?;
    Ok(format!("{:?} {bounds:?} {:?}", log.holds()?, memory.all()))
}

/// What a Raft store's data dir holds (its vote's term, its last index),
/// read from a copy as [`contents`] does.
async fn holds(dir: &Path) -> Result<keyraft::raft::memory::Holds> {
    let copy = tempfile::tempdir()?;
    let at = copy.path().join("raft");
    copy_dir(dir, &at)?;
    let (log, _sm, _memory) = keyraft::raft::store::open(&at)?;
    Ok(log.holds()?)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()?;
    ensure!(out.status.success(), "cp -a: {out:?}");
    Ok(())
}

/// Puts `backup` back as node `id`'s Raft store.
fn restore(c: &Cluster, id: u64, backup: &Path) -> Result<()> {
    let raft = c.nodes[&id].data.join("raft");
    std::fs::remove_dir_all(&raft)?;
    copy_dir(backup, &raft)
}

/// Starts node `id` as a process manager would and expects a refusal:
/// exit code 2 and one `error:` line, which is returned.
async fn refused(c: &Cluster, id: u64) -> Result<String> {
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
async fn move_on(c: &Cluster, n: usize, avoid: u64, ids: &[u64]) -> Result<()> {
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
async fn chain_moves(c: &Cluster) -> Result<()> {
    let now = c.chain.totals().await?.height;
    c.chain
        .wait_height(now + 3, SETTLE)
        .await
        .with_context(|| c.logs())?;
    let s = c.chain.stats_since(now + 1).await?;
    ensure!(
        s.signed > 0,
        "nobody signed after height {now}\n{}",
        c.logs()
    );
    Ok(())
}

fn no_refusals(c: &Cluster) -> Result<()> {
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

async fn remove_the_active_node_ten_times(opts: fn(u64) -> NodeOpts) -> Result<()> {
    let c = Cluster::start(3, 250, opts).await?;
    for round in 0..10 {
        let a = validating(&c, &[1, 2, 3]).await?;
        let addr = node_entry(&c.status(a).await?, a)["addr"]
            .as_str()
            .context("no addr")?
            .to_string();
        let asked = (1..=3).find(|i| *i != a).unwrap_or(1);
        // Until a standby may take over (one that just handed over stands
        // down for a while), the removal is refused with one clear line.
        let said = eventually(SETTLE, "the removal to hand over", || async {
            let out = c.cli(asked, &["members", "remove", &a.to_string()]).await?;
            let (said, err) = (
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            );
            if out.status.success() {
                return Ok(Some(said));
            }
            ensure!(
                err.lines().count() == 1
                    && (err.contains("could not hand over")
                        || err.contains("holds the key unreleased"))
                    && err.contains("keyraft switchover"),
                "round {round}: unclear refusal: {err}"
            );
            Ok(None)
        })
        .await
        .with_context(|| c.logs())?;
        ensure!(
            said.contains("handed over") && said.contains("removed"),
            "round {round}: members remove {a}: {said}"
        );
        let others: Vec<u64> = (1..=3).filter(|i| *i != a).collect();
        let b = validating(&c, &others).await?;
        let out = c
            .cli(b, &["members", "add", &format!("{a}={addr}")])
            .await?;
        ensure!(
            out.status.success(),
            "round {round}: members add {a}: {out:?}\n{}",
            c.logs()
        );
        follows(&c, a, 3).await?;
    }
    c.assert_no_double_signs().await?;
    // Every successor found the key released: none activated inside an
    // unreleased holder's lease.
    let mut activations = 0;
    for (id, n) in &c.nodes {
        let log = n.proc.as_ref().map(|p| p.log_text()).unwrap_or_default();
        activations += log.lines().filter(|l| l.contains("VALIDATING")).count();
        ensure!(
            !log.contains("clean=false"),
            "node {id} took over without a release:\n{log}"
        );
    }
    ensure!(activations >= 11, "{activations} activations in ten rounds");
    Ok(())
}

#[tokio::test]
async fn removing_the_active_node_hands_over_first_ten_times_lan() -> Result<()> {
    remove_the_active_node_ten_times(plain).await
}

#[tokio::test]
async fn removing_the_active_node_hands_over_first_ten_times_wan() -> Result<()> {
    remove_the_active_node_ten_times(wan).await
}

/// With a voter down, removing another would leave the voters without a
/// live majority: the joint configuration could never commit and the
/// cluster would stop for good. Refused with one line that names the
/// silent voter; removing the dead voter itself goes through.
#[tokio::test]
async fn a_removal_that_would_leave_no_live_majority_is_refused() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let ids = [1, 2, 3];
    let l = validating(&c, &ids).await?;
    let (live, dead) = {
        let others: Vec<u64> = ids.into_iter().filter(|i| *i != l).collect();
        (others[0], others[1])
    };
    c.kill_host(dead)?;
    let err = eventually(SETTLE, "the removal to be refused", || async {
        let out = c.cli(l, &["members", "remove", &live.to_string()]).await?;
        ensure!(
            !out.status.success(),
            "removed node {live} with node {dead} down"
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // Until the leader notices the dead voter is silent it may say
        // nothing else; then the one line.
        Ok(err.contains("would leave voters").then_some(err))
    })
    .await
    .with_context(|| c.logs())?;
    ensure!(
        err.lines().count() == 1 && err.contains(&format!("nodes [{dead}] silent")),
        "unclear refusal: {err}"
    );
    chain_moves(&c).await?;
    let out = c.cli(l, &["members", "remove", &dead.to_string()]).await?;
    ensure!(out.status.success(), "removing the dead voter: {out:?}");
    eventually(SETTLE, "two voters", || async {
        let s = c.status(l).await?;
        Ok(
            (s["cluster"]["members"] == serde_json::json!([l.min(live), l.max(live)]))
                .then_some(()),
        )
    })
    .await?;
    chain_moves(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A node whose start is still being checked with its peers (step 9) runs
/// no operator command: standing for election then would skip the check
/// that may be about to refuse it (the simulator found a restored node
/// elected this way while it waited for its peers' answers).
#[tokio::test]
async fn a_node_still_checking_its_start_runs_no_operator_command() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let ids = [1, 2, 3];
    leader(&c, &ids).await?;
    for id in ids {
        stop(&mut c, id).await?;
    }
    c.spawn(1)?;
    eventually(SETTLE, "node 1 to wait for its peers' answers", || async {
        Ok(c.proc(1)?
            .log_text()
            .contains("checking this data dir with its peers: waiting")
            .then_some(()))
    })
    .await?;
    for cmd in ["pause", "resume"] {
        let out = c.cli(1, &[cmd]).await?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && err.lines().count() == 1
                && err.contains("this node is starting"),
            "{cmd} on a starting node: {out:?}"
        );
    }
    ensure!(
        !c.proc(1)?.log_text().contains("standing for election"),
        "a starting node stood for election"
    );
    c.spawn(2)?;
    c.spawn(3)?;
    leader(&c, &ids).await?;
    chain_moves(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_node_wiped_after_a_whole_cluster_crash_is_refused() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    for id in 1..=3 {
        eventually(SETTLE, &format!("node {id} to register"), || async {
            Ok(c.proc(id)?.log_text().contains("registered:").then_some(()))
        })
        .await?;
    }
    for id in 1..=3 {
        c.kill_host(id)?;
    }
    std::fs::remove_dir_all(&c.nodes[&3].data)?;
    c.spawn(1)?;
    c.spawn(2)?;
    let line = refused(&c, 3).await?;
    ensure!(
        line.contains("is empty") && line.contains("--rejoin"),
        "unclear refusal: {line}"
    );
    validating(&c, &[1, 2]).await?;
    chain_moves(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A standby `s` (not the leader) that registered, stopped once to copy its
/// Raft store to `backup`, and back following; returns (leader, s, backup).
async fn standby_with_backup(c: &mut Cluster) -> Result<(u64, u64, std::path::PathBuf)> {
    let ids = [1, 2, 3];
    let l = leader(c, &ids).await?;
    let s = ids.into_iter().find(|i| *i != l).context("no standby")?;
    eventually(SETTLE, "the standby to register", || async {
        Ok(c.proc(s)?.log_text().contains("registered:").then_some(()))
    })
    .await?;
    stop(c, s).await?;
    let backup = c.dir.path().join("backup");
    copy_dir(&c.nodes[&s].data.join("raft"), &backup)?;
    c.spawn(s)?;
    follows(c, s, 3).await?;
    Ok((l, s, backup))
}

/// A standby's data dir restored from a copy taken before the cluster
/// moved on (three switchovers it only voted in) is refused at every start,
/// untouched, while the cluster goes on; `--rejoin` brings it back.
async fn a_restored_standby_is_refused(mode: Option<Mode>) -> Result<()> {
    let mut c = match mode {
        Some(m) => Cluster::start_signers(3, 250, m, plain).await?,
        None => Cluster::start(3, 250, plain).await?,
    };
    let ids = [1, 2, 3];
    let (_, s, backup) = standby_with_backup(&mut c).await?;
    move_on(&c, 3, s, &ids).await?;
    stop(&mut c, s).await?;
    restore(&c, s, &backup)?;
    let before = contents(&backup).await?;
    // A process manager restarts it at once, again and again.
    for _ in 0..3 {
        let line = refused(&c, s).await?;
        ensure!(
            line.contains("is behind what node")
                && line.contains("term")
                && line.contains("--rejoin"),
            "unclear refusal: {line}"
        );
    }
    let after = contents(&c.nodes[&s].data.join("raft")).await?;
    ensure!(
        after == before,
        "a refused start changed the data dir: {before} became {after}"
    );
    chain_moves(&c).await?;
    let s_data = c.nodes[&s].data.clone();
    std::fs::rename(&s_data, s_data.with_extension("restored"))?;
    c.node_mut(s)?.opts.flags.push("--rejoin".into());
    c.spawn(s)?;
    follows(&c, s, 3).await?;
    chain_moves(&c).await?;
    let st = c.chain.stats_since(0).await?;
    ensure!(
        st.double_signs == 0 && st.equivocations.is_empty(),
        "double signs {} equivocations {:?}\n{}",
        st.double_signs,
        st.equivocations,
        c.logs()
    );
    Ok(())
}

#[tokio::test]
async fn a_restored_standby_is_refused_until_it_rejoins() -> Result<()> {
    a_restored_standby_is_refused(None).await
}

#[tokio::test]
async fn a_restored_signer_is_refused_until_it_rejoins() -> Result<()> {
    a_restored_standby_is_refused(Some(signer_mode())).await
}

#[tokio::test]
async fn a_node_behind_only_by_entries_is_refused() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let (l, s, backup) = standby_with_backup(&mut c).await?;
    let term = c.status(l).await?["cluster"]["term"].as_u64();
    let held = node_entry(&c.status(l).await?, s)["remembered"]["committed"]
        .as_u64()
        .unwrap_or(0);
    // Entries, no new term: pause and resume.
    for _ in 0..3 {
        for cmd in ["pause", "resume"] {
            let out = c.cli(l, &[cmd]).await?;
            ensure!(out.status.success(), "{cmd}: {out:?}");
        }
    }
    eventually(
        SETTLE,
        "the leader to see the standby hold more",
        || async {
            let r = node_entry(&c.status(l).await?, s)["remembered"]["committed"]
                .as_u64()
                .unwrap_or(0);
            Ok((r >= held + 6).then_some(()))
        },
    )
    .await?;
    ensure!(
        c.status(l).await?["cluster"]["term"].as_u64() == term,
        "the term changed"
    );
    stop(&mut c, s).await?;
    restore(&c, s, &backup)?;
    let line = refused(&c, s).await?;
    ensure!(
        line.contains("log up to index") && !line.contains("term "),
        "unclear refusal: {line}"
    );
    chain_moves(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A leader restored from a copy of its own data dir taken within its own
/// term: the copy holds that term, so only the entries it lost can tell.
/// Its followers remember what it held of the committed log (its fsynced
/// index, sent with every append), and refuse it.
#[tokio::test]
async fn a_leader_restored_from_a_copy_of_its_own_term_is_refused() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let ids = [1, 2, 3];
    let l = leader(&c, &ids).await?;
    eventually(SETTLE, "the leader to register", || async {
        Ok(c.proc(l)?.log_text().contains("registered:").then_some(()))
    })
    .await?;
    let term = c.status(l).await?["cluster"]["term"].as_u64();
    // A snapshot of the running leader's disk (as a VM or LVM snapshot is
    // taken): the process held still for the copy, well within its lease.
    let backup = c.dir.path().join("leader-backup");
    c.signal(l, Signal::SIGSTOP)?;
    let copied = copy_dir(&c.nodes[&l].data.join("raft"), &backup);
    c.signal(l, Signal::SIGCONT)?;
    copied?;
    // Entries in the same term: pause and resume.
    for _ in 0..3 {
        for cmd in ["pause", "resume"] {
            let out = c.cli(l, &[cmd]).await?;
            ensure!(out.status.success(), "{cmd}: {out:?}");
        }
    }
    ensure!(
        c.status(l).await?["cluster"]["term"].as_u64() == term,
        "the term changed: the copy is not of the leader's own term"
    );
    let copy_last = holds(&backup).await?.last_index;
    let others: Vec<u64> = ids.into_iter().filter(|i| *i != l).collect();
    eventually(
        SETTLE,
        "the followers to see the leader hold more than the copy",
        || async {
            for f in &others {
                let seen = node_entry(&c.status(*f).await?, l)["remembered"]["committed"]
                    .as_u64()
                    .unwrap_or(0);
                if seen <= copy_last {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .with_context(|| c.logs())?;
    stop(&mut c, l).await?;
    restore(&c, l, &backup)?;
    let line = refused(&c, l).await?;
    ensure!(
        line.contains("log up to index") && line.contains("--rejoin"),
        "unclear refusal: {line}"
    );
    chain_moves(&c).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// Two of three restored from one copy while the third is down: nothing
/// on their own disks can tell, and they run. When the third returns it
/// sees them behind what it saw and refuses them; they stop, so nobody
/// validates. The way out: the third's Raft store copied to both.
#[tokio::test]
async fn a_majority_restored_from_one_copy_is_stopped_when_the_third_returns() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let ids = [1, 2, 3];
    for id in ids {
        eventually(SETTLE, &format!("node {id} to register"), || async {
            Ok(c.proc(id)?.log_text().contains("registered:").then_some(()))
        })
        .await?;
    }
    for id in ids {
        stop(&mut c, id).await?;
    }
    for id in [1, 2] {
        copy_dir(
            &c.nodes[&id].data.join("raft"),
            &c.dir.path().join(format!("backup{id}")),
        )?;
    }
    for id in ids {
        c.spawn(id)?;
    }
    validating(&c, &ids).await?;
    move_on(&c, 6, 0, &ids).await?;
    for id in ids {
        stop(&mut c, id).await?;
    }
    for id in [1, 2] {
        restore(&c, id, &c.dir.path().join(format!("backup{id}")))?;
    }
    c.spawn(1)?;
    c.spawn(2)?;
    validating(&c, &[1, 2]).await?;
    chain_moves(&c).await?;
    c.spawn(3)?;
    // The returning member says so, in `status` (JSON and the table).
    eventually(SETTLE, "node 3 to show the refusals", || async {
        let v = c.status(3).await?;
        let both = [1, 2]
            .iter()
            .all(|&id| node_entry(&v, id)["remembered"]["refused_by"]["3"].is_string());
        let out = c.cli(3, &["status"]).await?;
        let table = String::from_utf8_lossy(&out.stdout);
        Ok((both && table.contains("REFUSED by node 3")).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    for id in [1, 2] {
        let mut p = c.forget(id)?.context("not running")?;
        let status = p
            .wait_exit(SETTLE)
            .await
            .with_context(|| format!("node {id} was not stopped\n{}", p.log_tail(60)))?;
        ensure!(
            status.code() == Some(2) && p.log_text().contains("refused this node"),
            "node {id}: {status:?}\n{}",
            p.log_tail(60)
        );
    }
    c.assert_no_double_signs().await?;
    // The way out: node 3's Raft store on every node.
    stop(&mut c, 3).await?;
    let good = c.dir.path().join("good");
    copy_dir(&c.nodes[&3].data.join("raft"), &good)?;
    for id in [1, 2] {
        restore(&c, id, &good)?;
    }
    // Node 3 first: its refusals are taken back when the others' starts
    // ask it.
    c.spawn(3)?;
    takes_part_or_waits(&c, 3).await?;
    for id in [1, 2] {
        c.spawn(id)?;
    }
    validating(&c, &ids).await?;
    chain_moves(&c).await?;
    eventually(SETTLE, "every refusal taken back", || async {
        let v = c.status(3).await?;
        let none = ids
            .iter()
            .all(|&id| node_entry(&v, id)["remembered"]["refused_by"] == serde_json::json!({}));
        Ok(none.then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    for id in ids {
        ensure!(c.running(id), "node {id} stopped\n{}", c.logs());
    }
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn restarts_kills_and_a_power_loss_are_never_refused() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    c.active().await?;
    // A kill -9 loop: twenty restarts, round robin.
    for i in 0..20u64 {
        let id = 1 + i % 3;
        c.kill_host(id)?;
        c.spawn(id)?;
        takes_part(&c, id).await?;
    }
    no_refusals(&c)?;
    // Every host loses power at once.
    for id in 1..=3 {
        c.kill_host(id)?;
    }
    for id in 1..=3 {
        c.spawn(id)?;
    }
    validating(&c, &[1, 2, 3]).await?;
    chain_moves(&c).await?;
    // Clean restarts, one by one.
    for id in 1..=3 {
        stop(&mut c, id).await?;
        c.spawn(id)?;
        takes_part(&c, id).await?;
    }
    validating(&c, &[1, 2, 3]).await?;
    chain_moves(&c).await?;
    no_refusals(&c)?;
    for id in 1..=3 {
        ensure!(c.running(id), "node {id} stopped\n{}", c.logs());
    }
    c.assert_no_double_signs().await?;
    Ok(())
}
