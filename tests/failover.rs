//! The safety protocol under real faults, judged by the fake chain: every
//! test asks it for double signs, and the failover tests for how long no
//! one signed.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use localnet::cluster::{alive, Cluster, NodeOpts, SETTLE};
use localnet::harness::eventually;
use nix::sys::signal::Signal;

const BLOCK_MS: u64 = 250;

fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

fn hot_reload(_: u64) -> NodeOpts {
    NodeOpts {
        flags: vec!["--activate-by".into(), "sighup".into()],
        fakenode: vec!["--hot-reload".into()],
        ..NodeOpts::default()
    }
}

/// Waits for the validator process `pid` to be gone.
async fn wait_dead(pid: i32, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    eventually(limit, &format!("validator {pid} to die"), || async {
        Ok((!alive(pid)).then_some(()))
    })
    .await?;
    Ok(t.elapsed())
}

/// The validating node, its validator's pid, and the chain's height now.
async fn active_validator(c: &Cluster) -> Result<(u64, i32, u64)> {
    let active = c.active().await?;
    let pid = c.validator_pid(active).context("no validator pid")?;
    Ok((active, pid, c.chain.totals().await?.height))
}

/// The highest height `node` signed, per the chain's window.
async fn last_signed_by(c: &Cluster, node: u64) -> Result<u64> {
    let s = c.chain.stats_since(0).await?;
    Ok(s.last_signed_by(node).unwrap_or(0))
}

#[tokio::test]
async fn exactly_one_node_validates() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, plain).await?;
    let active = c.active().await?;
    let from = c.chain.totals().await?.height;
    c.chain.wait_height(from + 12, SETTLE).await?;
    let s = c.chain.stats_since(from + 1).await?;
    ensure!(
        s.signers.iter().all(|x| x.node == active),
        "other signers: {:?}",
        s.signers
    );
    ensure!(
        s.signers.len() >= 10,
        "only {} of 12 heights signed",
        s.signers.len()
    );
    for id in 1..=3 {
        let state = c.own_state(id).await?;
        ensure!(
            (state == "Validating") == (id == active),
            "node {id} is {state}"
        );
        let code = |path: &'static str| {
            let url = format!("http://{}/{path}", c.nodes[&id].http);
            async move { Ok::<_, anyhow::Error>(reqwest::get(url).await?.status().as_u16()) }
        };
        let (leader, replica) = (code("leader").await?, code("replica").await?);
        if id == active {
            ensure!(
                (leader, replica) == (200, 503),
                "active node {id}: /leader {leader} /replica {replica}"
            );
        } else {
            ensure!(
                (leader, replica) == (503, 200),
                "standby {id}: /leader {leader} /replica {replica}"
            );
        }
        let linked = c.metric(id, "keyraft_key_linked").await?;
        ensure!(
            (linked == 1.0) == (id == active),
            "node {id} key_linked {linked}"
        );
    }
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn sigkill_of_the_active_coordinator_fences_its_validator_and_a_standby_signs_within_3s(
) -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, plain).await?;
    let (old, pid, at) = active_validator(&c).await?;
    let killed = Instant::now();
    c.kill_coordinator(old)?;
    let died = wait_dead(pid, Duration::from_secs(3))
        .await
        .with_context(|| c.logs())?;
    let (new, s) = c.wait_signer(at + 1, &[old]).await?;
    let took = killed.elapsed();
    let first = s.first_signed_by(new, 0).unwrap_or(0);
    let gap_ms = first.saturating_sub(at) * BLOCK_MS;
    ensure!(
        gap_ms <= 3000,
        "node {new} first signed height {first}, {gap_ms} ms after height {at}"
    );
    ensure!(
        last_signed_by(&c, old).await? < first,
        "the old validator signed after the new one started"
    );
    eprintln!("validator killed after {died:?}; node {new} signing after {took:?} ({gap_ms} ms of heights)");
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_frozen_coordinator_is_fenced_by_its_guard_and_stands_down_after_thaw() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, plain).await?;
    let (old, pid, at) = active_validator(&c).await?;
    c.signal(old, Signal::SIGSTOP)?;
    wait_dead(pid, Duration::from_secs(3))
        .await
        .with_context(|| c.logs())?;
    let fenced_at = c.chain.totals().await?.height;
    let (new, s) = c.wait_signer(at + 1, &[old]).await?;
    let first = s.first_signed_by(new, 0).unwrap_or(0);
    ensure!(
        last_signed_by(&c, old).await? < first,
        "old validator signed at or after the successor's first height"
    );
    ensure!(
        fenced_at <= first,
        "successor signed height {first} before the guard fenced (height {fenced_at})"
    );
    // Stay frozen well past the lease, then thaw.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let thawed = c.chain.totals().await?.height;
    c.signal(old, Signal::SIGCONT)?;
    eventually(SETTLE, "the thawed node to stand down", || async {
        let st = c.own_state(old).await?;
        Ok((st != "Validating").then_some(st))
    })
    .await?;
    c.chain.wait_height(thawed + 12, SETTLE).await?;
    let after = c.chain.stats_since(thawed).await?;
    ensure!(
        !after.signers.iter().any(|x| x.node == old),
        "thawed node signed again: {:?}",
        after.signers
    );
    ensure!(c.own_state(new).await? == "Validating");
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn an_isolated_active_node_fences_itself_and_leadership_does_not_flap_back() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, plain).await?;
    let (old, pid, at) = active_validator(&c).await?;
    c.isolate(old);
    wait_dead(pid, Duration::from_secs(3))
        .await
        .with_context(|| c.logs())?;
    let (new, _) = c.wait_signer(at + 1, &[old]).await?;
    c.heal();
    let healed = c.chain.totals().await?.height;
    // Give a flap every chance to happen: 3 s after the heal.
    c.chain.wait_height(healed + 12, SETTLE).await?;
    let after = c.chain.stats_since(healed).await?;
    ensure!(
        after.signers.iter().all(|x| x.node == new),
        "signer changed after heal: {:?}",
        after.signers
    );
    let v = c.status(new).await?;
    ensure!(
        v["cluster"]["leader"] == new,
        "leadership moved after heal: {v}"
    );
    eventually(SETTLE, "the healed node to rejoin as a standby", || async {
        Ok((c.own_state(old).await? == "Voting").then_some(()))
    })
    .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_validator_with_a_slow_shutdown_is_still_killed_in_time() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, |_| NodeOpts {
        flags: vec!["--activate-by".into(), "sighup".into()],
        fakenode: vec![
            "--hot-reload".into(),
            "--shutdown-delay-ms".into(),
            "20000".into(),
        ],
        ..NodeOpts::default()
    })
    .await?;
    let (old, pid, at) = active_validator(&c).await?;
    c.kill_coordinator(old)?;
    // SIGTERM would keep it signing for 20 s; the guard must SIGKILL it.
    let died = wait_dead(pid, Duration::from_secs(2)).await?;
    let (new, s) = c.wait_signer(at + 1, &[old]).await?;
    let first = s.first_signed_by(new, 0).unwrap_or(0);
    ensure!(
        first.saturating_sub(at) * BLOCK_MS <= 3000,
        "successor first signed at {first}, killed at {at}"
    );
    eprintln!("slow-shutdown validator killed after {died:?}");
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_crashed_validator_is_restarted_and_one_that_stays_down_hands_over() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts {
        flags: vec!["--unhealthy-grace".into(), "2s".into()],
        ..NodeOpts::default()
    })
    .await?;
    let active = c.active().await?;
    let pid = c.validator_pid(active).context("no validator pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
    let crashed = c.chain.totals().await?.height;
    // Restarted with the key, it signs again.
    eventually(SETTLE, "the restarted validator to sign", || async {
        let s = c.chain.stats_since(crashed + 1).await?;
        Ok(s.signers.iter().any(|x| x.node == active).then_some(()))
    })
    .await?;
    ensure!(c.metric(active, "keyraft_validator_restarts_total").await? >= 1.0);
    ensure!(c.own_state(active).await? == "Validating");

    // Now it crashes and cannot come back: its RPC port is taken.
    let pid = eventually(SETTLE, "the new validator pid", || async {
        Ok(c.validator_pid(active).filter(|p| *p != pid && alive(*p)))
    })
    .await?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
    let _squatter = eventually(SETTLE, "the validator's port", || async {
        Ok(std::net::TcpListener::bind(c.nodes[&active].rpc).ok())
    })
    .await?;
    let down = c.chain.totals().await?.height;
    let (new, _) = c
        .wait_signer(down + 1, &[active])
        .await
        .with_context(|| c.logs())?;
    ensure!(new != active);
    ensure!(c.own_state(active).await? != "Validating");
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_syncing_node_never_becomes_active() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, |id| NodeOpts {
        fakenode: if id == 3 {
            vec!["--sync-delay-ms".into(), "600000".into()]
        } else {
            vec![]
        },
        ..NodeOpts::default()
    })
    .await?;
    let first = c.active().await?;
    ensure!(first != 3, "the syncing node became active");
    let out = c.cli(first, &["switchover", "--to", "3"]).await?;
    ensure!(
        !out.status.success(),
        "switchover to a syncing node accepted"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("not a healthy"),
        "{out:?}"
    );
    let at = c.chain.totals().await?.height;
    c.kill_coordinator(first)?;
    let (second, _) = c.wait_signer(at + 1, &[first]).await?;
    ensure!(second != 3, "the syncing node became active after failover");
    ensure!(c.own_state(3).await? == "Syncing");
    let all = c.chain.stats_since(0).await?;
    ensure!(
        !all.signers.iter().any(|x| x.node == 3),
        "the syncing node signed"
    );
    c.assert_no_double_signs().await?;
    Ok(())
}

/// Switches over and returns (old, new, missed heights in between).
async fn switchover(c: &Cluster) -> Result<(u64, u64, u64)> {
    let old = c.active().await?;
    // Let the standbys' health reach the leader's gossip view.
    eventually(
        SETTLE,
        "an eligible standby in the leader's view",
        || async {
            let v = c.status(old).await?;
            let ok = v["nodes"].as_array().into_iter().flatten().any(|n| {
                n["id"] != old && n["state"] == "Voting" && n["validator"]["synced"] == true
            });
            Ok(ok.then_some(()))
        },
    )
    .await?;
    let before = c.chain.totals().await?;
    // A node that has just handed over may not take over again for a
    // moment; the CLI says so and the operator runs it again.
    eventually(SETTLE, "a switchover the leader accepts", || async {
        let out = c.cli(old, &["switchover"]).await?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(Some(()));
        }
        ensure!(
            err.contains("may not validate now") || err.contains("may not lead now"),
            "switchover failed: {err}"
        );
        Ok(None)
    })
    .await?;
    let (new, _) = c.wait_signer(before.height, &[old]).await?;
    let last_old = last_signed_by(c, old).await?;
    let s = c.chain.stats_since(last_old).await?;
    let first_new = s.first_signed_by(new, 0).unwrap_or(0);
    if first_new <= last_old {
        bail!("node {new} signed height {first_new}, node {old} signed up to {last_old}");
    }
    Ok((old, new, first_new - last_old - 1))
}

#[tokio::test]
async fn switchover_with_hot_reload_misses_at_most_one_block() -> Result<()> {
    let c = Cluster::start(3, 500, hot_reload).await?;
    // Back to back: each node handing over has led for a while, which once
    // made it count its own reign as leaderless time and campaign against
    // the node it had just handed over to (2-3 missed blocks).
    for round in 0..3 {
        let (old, new, missed) = switchover(&c).await?;
        eprintln!("switchover {round} (sighup) {old} -> {new}: {missed} missed blocks at 500 ms");
        ensure!(missed <= 1, "round {round}: {missed} blocks missed");
        ensure!(c.own_state(old).await? != "Validating");
    }
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn switchover_with_restart_is_bounded() -> Result<()> {
    let c = Cluster::start(3, 500, plain).await?;
    let (old, new, missed) = switchover(&c).await?;
    eprintln!("switchover (restart) {old} -> {new}: {missed} missed blocks at 500 ms");
    ensure!(missed <= 4, "{missed} blocks missed");
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_witness_never_validates() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, |id| NodeOpts {
        witness: id == 3,
        ..NodeOpts::default()
    })
    .await?;
    let first = c.active().await?;
    ensure!(first != 3);
    let at = c.chain.totals().await?.height;
    c.kill_coordinator(first)?;
    let (second, _) = c.wait_signer(at + 1, &[first]).await?;
    ensure!(second != 3 && second != first);
    ensure!(c.own_state(3).await? != "Validating");
    let v = c.status(3).await?;
    ensure!(
        v["cluster"]["leader"] == second,
        "witness sees leader {}",
        v["cluster"]["leader"]
    );
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_paused_cluster_does_not_fail_over_until_resumed() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, plain).await?;
    let old = c.active().await?;
    let standby = (1..=3).find(|i| *i != old).unwrap_or(1);
    let out = c.cli(standby, &["pause"]).await?;
    ensure!(out.status.success(), "pause: {out:?}");
    eventually(SETTLE, "everyone to see the pause", || async {
        let mut all = true;
        for id in 1..=3 {
            all &= c.status(id).await?["cluster"]["paused"] == true;
        }
        Ok(all.then_some(()))
    })
    .await?;
    // Paused, the active node keeps validating.
    let at = c.chain.totals().await?.height;
    c.chain.wait_height(at + 4, SETTLE).await?;
    ensure!(
        last_signed_by(&c, old).await? > at,
        "the active node stopped validating when paused"
    );

    c.kill_coordinator(old)?;
    let killed = c.chain.totals().await?.height;
    c.chain.wait_height(killed + 16, SETTLE).await?;
    let s = c.chain.stats_since(killed + 2).await?;
    ensure!(
        s.signers.is_empty(),
        "a paused cluster failed over: {:?}",
        s.signers
    );

    let out = c.cli(standby, &["resume"]).await?;
    ensure!(out.status.success(), "resume: {out:?}");
    let (new, _) = c.wait_signer(killed + 1, &[old]).await?;
    ensure!(new != old);
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn stale_key_links_are_removed_before_the_validators_start() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, plain).await?;
    c.active().await?;
    for id in 1..=3 {
        drop(c.forget(id)?); // SIGKILL of the coordinator's group
    }
    // Everything is down; plant a link to the key in every home and start again.
    for id in 1..=3 {
        let link = c.nodes[&id].home.join("validator_key.json");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&c.key_path, &link)?;
    }
    let planted = c.chain.totals().await?.height;
    for id in 1..=3 {
        c.spawn(id)?;
    }
    let (active, _) = c.wait_signer(planted + 1, &[]).await?;
    c.chain.wait_height(planted + 12, SETTLE).await?;
    let s = c.chain.stats_since(planted + 1).await?;
    ensure!(
        s.signers.iter().all(|x| x.node == active),
        "a stale link signed: {:?}",
        s.signers
    );
    for id in (1..=3).filter(|i| *i != active) {
        ensure!(
            !c.nodes[&id].home.join("validator_key.json").exists(),
            "stale link left on node {id}"
        );
    }
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_standby_behind_the_witness_still_takes_over() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |id| NodeOpts {
        witness: id == 3,
        ..NodeOpts::default()
    })
    .await?;
    let active = c.active().await?;
    let standby = if active == 1 { 2 } else { 1 };
    // The standby misses entries that the leader and the witness commit.
    c.isolate(standby);
    for cmd in ["pause", "resume"] {
        let out = c.cli(active, &[cmd]).await?;
        ensure!(out.status.success(), "{cmd}: {out:?}");
    }
    // Then the leader freezes as the standby comes back: only the witness
    // holds the entries the standby lacks, so the witness must step in.
    let at = c.chain.totals().await?.height;
    c.signal(active, Signal::SIGSTOP)?;
    c.heal();
    let (new, _) = match c.wait_signer(at + 1, &[active]).await {
        Ok(signer) => signer,
        Err(e) => {
            // What the witness saw: whether it counted the standby as one
            // that could take over. Under load the leader can freeze before
            // its next heartbeat tells the witness that `resume` committed;
            // the witness must still stand (`policy::pause_holds`).
            let status = c.status(3).await;
            return Err(e.context(format!(
                "node {active} frozen, node {standby} healed; the witness's status: {status:?}\n{}",
                c.logs()
            )));
        }
    };
    ensure!(new == standby, "node {new} signs");
    c.signal(active, Signal::SIGCONT)?;
    c.assert_no_double_signs().await?;
    // The standby's refused vote told the witness why at once: the witness
    // stood as soon as the lease was over, not after twice the lease, and
    // handed leadership on as soon as the standby held its entries.
    let witness = std::fs::read_to_string(&c.proc(3)?.log)?;
    ensure!(
        witness.contains(&format!("node {standby} cannot win with a log behind"))
            && witness.contains(&format!("node {standby} holds every entry now")),
        "the witness did not take the fast path:\n{witness}"
    );
    ensure!(
        !witness.contains("twice the lease"),
        "the witness waited twice the lease"
    );
    // How fast is the failover benchmark's to measure; these lines say
    // which path was taken (a wall-clock bound here flaked on a loaded
    // 2-core host: 1.74 s against 1.7 s in 2 runs of 8).
    Ok(())
}
