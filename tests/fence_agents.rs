//! Fence agents (docs/design.md, step 3), judged by the fake chain: a
//! frozen active host is powered off by its fence agent (localnet's
//! `fakefence`, which speaks the ClusterLabs stdin protocol) before its
//! successor takes the key, and an agent that fails stops the takeover.

use anyhow::{ensure, Context, Result};
use localnet::cluster::{alive, Cluster, Fencing, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};

const BLOCK_MS: u64 = 250;

fn with_agents(fencing: Fencing) -> impl Fn(u64) -> NodeOpts {
    move |id| NodeOpts {
        witness: id == 3,
        fencing,
        ..NodeOpts::default()
    }
}

#[tokio::test]
async fn a_frozen_active_host_is_powered_off_by_its_fence_agent_before_the_takeover() -> Result<()>
{
    let mut c = Cluster::start(3, BLOCK_MS, with_agents(Fencing::Fakefence)).await?;
    let old = c.active().await?;
    let validator = c.validator_pid(old).context("no validator")?;
    let since = c.chain.totals().await?.height;
    c.freeze(old, true, true)?;
    let (new, _) = c.wait_signer(since, &[old]).await?;
    ensure!(new != old);
    // The old host is off: nothing of it runs, frozen or not.
    ensure!(!alive(validator), "the frozen validator still exists");
    ensure!(c.tree_pids(old).is_empty(), "{:?}", c.tree_pids(old));
    ensure!(!c.running(old), "the frozen coordinator still exists");
    // The successor confirmed the fence before it started its validator.
    let log = c.proc(new)?.log_text();
    let confirmed = log
        .find(&format!("confirmed node {old} off"))
        .context("no fence confirmation in the successor's log")?;
    let validating = log[confirmed..].find("VALIDATING");
    ensure!(
        validating.is_some(),
        "not VALIDATING after the fence: {log}"
    );
    ensure!(
        c.metric(
            new,
            &format!("keyraft_fence_agent_attempts_total{{node=\"{old}\",result=\"off\"}}")
        )
        .await?
            == 1.0
    );
    let me = node_entry(&c.status(new).await?, new);
    let last = me["fence_agents"][old.to_string()]["last"]
        .as_str()
        .unwrap_or_default();
    ensure!(last.starts_with("off:"), "{me}");
    // Power back on: the old host rejoins as a standby.
    c.forget(old)?;
    c.spawn(old)?;
    eventually(SETTLE, "the old host back as a standby", || async {
        Ok((c.own_state(old).await? == "Voting").then_some(()))
    })
    .await?;
    let stats = c.assert_no_double_signs().await?;
    ensure!(stats.double_signs == 0);
    Ok(())
}

#[tokio::test]
async fn a_fence_agent_that_fails_stops_the_takeover_with_one_line_per_try() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, with_agents(Fencing::Failing)).await?;
    let old = c.active().await?;
    let standby = if old == 1 { 2 } else { 1 };
    let since = c.chain.totals().await?.height;
    c.freeze(old, true, true)?;
    // The standby leads, tries its agent twice, refuses, and tries again.
    eventually(SETTLE, "two refused takeovers", || async {
        let log = c.proc(standby)?.log_text();
        Ok((log.matches("NOT TAKING OVER").count() >= 2).then_some(()))
    })
    .await?;
    let failed = c
        .metric(
            standby,
            &format!("keyraft_fence_agent_attempts_total{{node=\"{old}\",result=\"failed\"}}"),
        )
        .await?;
    ensure!(failed >= 4.0, "{failed} failed attempts counted");
    let stats = c.chain.stats_since(since + 1).await?;
    ensure!(
        stats.first_signed_by(standby, since).is_none(),
        "the standby signed although its fence agent failed"
    );
    let me = node_entry(&c.status(standby).await?, standby);
    ensure!(
        me["fence_agents"][old.to_string()]["last"]
            .as_str()
            .is_some_and(|l| l.starts_with("failed:")),
        "{me}"
    );
    ensure!(me["state"] != "Validating", "{me}");
    // The thawed host is fenced by its own guard; still nobody signs.
    let validator = c.validator_pid(old);
    c.freeze(old, true, false)?;
    eventually(
        SETTLE,
        "the thawed validator killed by its guard",
        || async { Ok(validator.is_none_or(|v| !alive(v)).then_some(())) },
    )
    .await?;
    let stats = c.chain.stats_since(since + 1).await?;
    ensure!(stats.first_signed_by(standby, since).is_none());
    let stats = c.assert_no_double_signs().await?;
    ensure!(stats.double_signs == 0);
    Ok(())
}
