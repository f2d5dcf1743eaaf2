//! A chain's own upgrade halt, end to end in validator mode: three `keyraft
//! run --upgrades cosmovisor` processes, each supervising `fakecosmovisor
//! run` over a tree of fakenode versions, and the chain halting at the
//! upgrade's height (localnet's `halt::run`, the scenarios of `localnet
//! upgrade-test`). Each test asks the chain: double signs, who signed
//! either side of the halt, heights missed after it; and, for a standby
//! without the upgrade's binary, whether `keyraft check` said so before
//! the height.

use anyhow::{ensure, Result};
use localnet::halt::{run, Scenario, CLEAN_RESTART_MISSED};

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
