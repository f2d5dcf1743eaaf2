//! A chain's own upgrade halt, end to end. Validator mode: three `keyraft
//! run --upgrades cosmovisor` processes, each supervising `fakecosmovisor
//! run` over a tree of fakenode versions, and the chain halting at the
//! upgrade's height (localnet's `halt::run`). Signer mode: three signers
//! whose sentries halt and come back as CometBFT 1.x nodes while the
//! CometBFT judge holds the next height (`halt::run_signer`). These are
//! the scenarios of `localnet upgrade-test [--cometbft]`. Each test asks
//! the chain: double signs, who signed (or led) either side of the halt,
//! heights missed after it; and, for a standby without the upgrade's
//! binary (both modes), whether `keyraft check` said so before the height. A chain
//! without a halt: a new node program rolled through three hosts with
//! `keyraft upgrade --binary`, and rolls that must stop before the key
//! moves (a program missing on a standby, or crashing there).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, NodeOpts};
use localnet::halt::{run, run_signer, Scenario, CLEAN_RESTART_MISSED};

async fn passes(s: Scenario) -> Result<localnet::halt::Verdict> {
    let v = run(s, true).await?;
    ensure!(v.pass, "{s:?} failed ({:?}): {v:?}", v.failed);
    ensure!(v.double_signs == 0, "{v:?}");
    ensure!(v.missed_after_resume <= CLEAN_RESTART_MISSED, "{v:?}");
    Ok(v)
}

#[tokio::test]
async fn a_prepared_cluster_keeps_its_validator_through_the_halt() -> Result<()> {
    let v = passes(Scenario::Prepared).await?;
    ensure!(
        v.handovers_during_halt == 0 && !v.passed_by_network,
        "{v:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_migration_longer_than_the_grace_is_waited_for_not_handed_over() -> Result<()> {
    // Before keyraft followed upgrades, the active host stepped aside in
    // the middle of its migration and nobody validated again.
    let v = passes(Scenario::SlowMigration).await?;
    ensure!(v.handovers_during_halt == 0, "{v:?}");
    ensure!(
        v.signed_before == v.signed_after && !v.passed_by_network,
        "{v:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_upgraded_binary_that_crashes_on_the_active_host_moves_the_key() -> Result<()> {
    let v = passes(Scenario::CrashOnActive).await?;
    ensure!(v.signed_before != v.signed_after, "{v:?}");
    Ok(())
}

#[tokio::test]
async fn the_active_host_killed_during_the_halt_leaves_the_key_to_an_upgraded_standby() -> Result<()>
{
    let v = passes(Scenario::KillDuringHalt).await?;
    ensure!(v.signed_before != v.signed_after, "{v:?}");
    Ok(())
}

#[tokio::test]
async fn a_standby_without_the_binary_is_named_before_the_height() -> Result<()> {
    let v = passes(Scenario::MissingBinary).await?;
    ensure!(v.alert_before_height == Some(true), "{v:?}");
    ensure!(v.handovers_during_halt == 0, "{v:?}");
    Ok(())
}

#[tokio::test]
async fn a_new_node_program_rolls_through_the_cluster_with_no_height_missed() -> Result<()> {
    // Standbys first, a switchover, then the old active host; the chain
    // says the key moved to an upgraded standby and signs as the new
    // version.
    let v = localnet::rolling::run().await?;
    ensure!(v.pass, "rolling failed ({:?}): {v:?}", v.failed);
    ensure!(v.double_signs == 0, "{v:?}");
    ensure!(v.signed_after != v.signed_before, "{v:?}");
    ensure!(
        v.missed_after_resume <= localnet::rolling::SWITCHOVER_MISSED,
        "{v:?}"
    );
    Ok(())
}

/// Runs `keyraft upgrade --binary PATH` against node `id`: its exit status
/// and everything it printed.
async fn upgrade(c: &Cluster, id: u64, path: &str, timeout_s: u64) -> Result<(bool, String)> {
    let t = timeout_s.to_string();
    let out = c
        .cli(id, &["upgrade", "--binary", path, "--timeout", &t])
        .await?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), said))
}

#[tokio::test]
async fn a_program_missing_or_failing_on_a_standby_stops_the_roll_before_the_key_moves(
) -> Result<()> {
    let c = Cluster::start(3, 500, |_| NodeOpts::default()).await?;
    c.chain
        .wait_height(8, Duration::from_secs(30))
        .await
        .with_context(|| c.logs())?;
    let active = c.active().await.with_context(|| c.logs())?;
    let from = c.chain.totals().await?.height;
    let status = c.status(active).await?;
    let old = status["nodes"][0]["binary"]
        .as_str()
        .context("a node without its program in the status")?
        .to_string();
    // Not on the hosts at all: the first standby refuses it, keeps its
    // node, and the roll stops at once with that host's reason.
    let (ok, said) = upgrade(&c, active, "/nonexistent/node", 60).await?;
    ensure!(!ok && said.contains("cannot be read here"), "{said}");
    // A program that exits at once: the standby's node crash-loops on it,
    // the roll waits for it to sync and gives up, the key never moved.
    let crashing = c.dir.path().join("crashing-node");
    std::fs::write(&crashing, "#!/bin/sh\nexit 3\n")?;
    std::fs::set_permissions(&crashing, std::fs::Permissions::from_mode(0o755))?;
    let (ok, said) = upgrade(&c, active, &crashing.to_string_lossy(), 8).await?;
    ensure!(!ok && said.contains("did not finish"), "{said}");
    ensure!(c.active().await? == active, "the key moved: {}", c.logs());
    // Rolled back with the old program: every host runs it again.
    let (ok, said) = upgrade(&c, active, &old, 60).await?;
    ensure!(ok, "{said}\n{}", c.logs());
    let to = c.chain.totals().await?.height;
    c.chain.wait_height(to + 4, Duration::from_secs(30)).await?;
    let stats = c.chain.stats_since(from).await?;
    ensure!(stats.double_signs == 0, "{stats:?}");
    let signed: std::collections::BTreeSet<u64> = stats.signers.iter().map(|s| s.height).collect();
    let missed = (from..to + 4).filter(|h| !signed.contains(h)).count() as u64;
    ensure!(
        missed <= localnet::rolling::SWITCHOVER_MISSED,
        "missed {missed}: {stats:?}"
    );
    Ok(())
}

async fn signs_through(s: Scenario) -> Result<localnet::halt::Verdict> {
    let v = run_signer(s).await?;
    ensure!(v.pass, "signer mode, {s:?} failed ({:?}): {v:?}", v.failed);
    ensure!(v.double_signs == 0, "{v:?}");
    Ok(v)
}

#[tokio::test]
async fn signer_mode_signs_the_first_height_after_the_halt_on_the_same_leader() -> Result<()> {
    let v = signs_through(Scenario::Prepared).await?;
    ensure!(
        v.handovers_during_halt == 0 && v.missed_after_resume == 0,
        "{v:?}"
    );
    Ok(())
}

#[tokio::test]
async fn signer_mode_keeps_its_leader_when_the_leaders_own_sentry_fails_to_upgrade() -> Result<()> {
    // Before: the leader's host stepped aside while its own sentry was
    // down, though it signs for every host's sentries.
    let v = signs_through(Scenario::CrashOnActive).await?;
    ensure!(v.handovers_during_halt == 0, "{v:?}");
    Ok(())
}

#[tokio::test]
async fn signer_mode_keeps_its_leader_through_a_slow_migration_of_its_sentry() -> Result<()> {
    let v = signs_through(Scenario::SlowMigration).await?;
    ensure!(v.handovers_during_halt == 0, "{v:?}");
    Ok(())
}

#[tokio::test]
async fn signer_mode_with_its_leader_killed_during_the_halt_signs_on_from_another() -> Result<()> {
    let v = signs_through(Scenario::KillDuringHalt).await?;
    ensure!(v.signed_after.is_some_and(|l| l != 1), "{v:?}");
    Ok(())
}

#[tokio::test]
async fn signer_mode_names_a_host_without_the_upgrades_binary_before_the_height() -> Result<()> {
    // Sentries under cosmovisor, keyraft with --upgrades cosmovisor: node
    // 2's tree lacks the upgrade; `keyraft check` says so before the
    // height, and the leader signs on through the halt.
    let v = signs_through(Scenario::MissingBinary).await?;
    ensure!(v.alert_before_height == Some(true), "{v:?}");
    ensure!(v.handovers_during_halt == 0, "{v:?}");
    Ok(())
}
