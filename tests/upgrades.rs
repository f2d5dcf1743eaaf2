//! A chain's own upgrade halt, end to end. Validator mode: three `keyraft
//! run --upgrades cosmovisor` processes, each supervising `fakecosmovisor
//! run` over a tree of fakenode versions, and the chain halting at the
//! upgrade's height (localnet's `halt::run`). Signer mode: three signers
//! whose sentries halt and come back as CometBFT 1.x nodes while the
//! CometBFT judge holds the next height (`halt::run_signer`). These are
//! the scenarios of `localnet upgrade-test [--cometbft]`. Each test asks
//! the chain: double signs, who signed (or led) either side of the halt,
//! heights missed after it; and, for a standby without the upgrade's
//! binary, whether `keyraft check` said so before the height.

use anyhow::{ensure, Result};
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
