//! Membership and memory (docs/design.md, steps 7 and 9), over real
//! processes and real data dirs, each judged by the fake chain: removing the
//! active node, a removal refused while the voters left lack a live
//! majority, operator commands on a node still checking its start, a node
//! wiped after a whole-cluster crash, and the restarts that must never be
//! refused. Data dirs restored from older copies: `tests/restored.rs`.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};

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

/// `members add` of an address nobody answers at (a typo, a host not yet
/// up) is refused once the learner makes no progress, and leaves it a
/// learner: the voters stay three, so the cluster still outlives one of
/// them. openraft alone made it a voter at once (it lags fewer entries than
/// its threshold), and the next host down left no majority.
#[tokio::test]
async fn a_member_nobody_answers_for_is_never_made_a_voter() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let l = validating(&c, &[1, 2, 3]).await?;
    let nobody = localnet::harness::free_addr()?;
    let out = c
        .cli(l, &["members", "add", &format!("4={nobody}")])
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("node 4 holds nothing of")
            && err.lines().count() == 1,
        "{out:?}"
    );
    let s = c.status(l).await?;
    ensure!(
        s["cluster"]["members"] == serde_json::json!([1, 2, 3]),
        "voters {}",
        s["cluster"]["members"]
    );
    // One voter down: the other two still make a majority.
    let down = if l == 1 { 2 } else { 1 };
    c.kill_host(down)?;
    chain_moves(&c).await.with_context(|| c.logs())?;
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
