//! The upgrade harness judged: fakechain with an upgrade plan and fakenode
//! at its versions, as real processes on real ports. A chain upgrade must
//! halt the old version where a Cosmos node halts, keep the chain at that
//! height until the new version signs it, and count nothing missed or
//! doubled meanwhile; otherwise an upgrade test that asks this chain has
//! tested nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::chain::{Passed, SignRequest};
use localnet::harness::{eventually, free_addr, sibling_bin, NearChain, Proc};
use localnet::keys;
use localnet::upgrade::{Upgrade, UpgradeInfo};

const BLOCK_MS: u64 = 200;
const UPGRADE_AT: u64 = 15;
const SETTLE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn an_upgrade_halts_the_old_version_and_the_chain_waits_for_the_new_one() -> Result<()> {
    let upgrade = format!("v2@{UPGRADE_AT}");
    let chain = NearChain::start(BLOCK_MS, &["--upgrade", &upgrade]).await?;
    let home = chain.home(1, true)?;
    let node = |extra: &[&str]| chain.node(1, &home, extra).map(|(p, _)| p);

    // The new version started before the upgrade height refuses to run.
    let mut early = chain
        .node(2, &chain.home(2, true)?, &["--chain-version", "v2"])?
        .0;
    let status = early.wait_exit(SETTLE).await?;
    ensure!(!status.success(), "v2 ran before its upgrade height");
    ensure!(
        early.log_text().contains("BINARY UPDATED BEFORE TRIGGER"),
        "no early-binary line: {}",
        early.log_tail(5)
    );
    ensure!(
        chain.chain.totals().await?.height < UPGRADE_AT,
        "the chain passed the upgrade height before the test could ask (slow host)"
    );

    // The old version signs up to the upgrade height, then halts there.
    let mut old = node(&[])?;
    let status = old
        .wait_exit(Duration::from_millis(BLOCK_MS * UPGRADE_AT) + SETTLE)
        .await?;
    ensure!(status.code() == Some(1), "the old version ended {status:?}");
    let line = format!("UPGRADE \"v2\" NEEDED at height: {UPGRADE_AT}");
    ensure!(
        old.log_text().contains(&line),
        "no {line:?}: {}",
        old.log_tail(5)
    );
    let info: UpgradeInfo = serde_json::from_slice(
        &std::fs::read(home.join("data/upgrade-info.json")).context("no upgrade-info.json")?,
    )?;
    ensure!(
        (info.name.as_str(), info.height) == ("v2", UPGRADE_AT),
        "{info:?}"
    );
    let halted = chain.chain.totals().await?;
    let v2 = Upgrade {
        name: "v2".into(),
        height: UPGRADE_AT,
    };
    ensure!(
        halted.height == UPGRADE_AT && halted.halted.as_ref() == Some(&v2),
        "not halted at the upgrade: {halted:?}"
    );

    // Nothing but the new version may sign the halted height.
    let real = chain.key.signing_key()?;
    let stale = SignRequest {
        height: UPGRADE_AT,
        public_key: chain.key.public_key.clone(),
        node: 9,
        signature: keys::sign_height(&real, UPGRADE_AT),
        version: Some("genesis".into()),
    };
    let url = format!("{}/sign", chain.chain.url);
    let code = reqwest::Client::new()
        .post(url)
        .json(&stale)
        .send()
        .await?
        .status();
    ensure!(code.as_u16() == 409, "the old version's signature: {code}");

    // The new version migrates (500 ms), signs the upgrade height, and the
    // chain goes on, with nothing missed or doubled since the halt.
    let _new = chain.node(
        1,
        &home,
        &["--chain-version", "v2", "--migration-ms", "500"],
    )?;
    let after = chain
        .chain
        .wait_height(UPGRADE_AT + 5, SETTLE)
        .await
        .context("the chain did not resume after the upgrade")?;
    let s = chain.chain.stats_since(UPGRADE_AT).await?;
    if let Some(h) = s.first_unsigned_by(1, UPGRADE_AT..UPGRADE_AT + 4) {
        anyhow::bail!("height {h} not signed by the new version: {:?}", s.signers);
    }
    ensure!(
        after.missed == halted.missed,
        "missed grew from {} to {} across the upgrade",
        halted.missed,
        after.missed
    );
    ensure!(after.double_signs == 0, "double signs: {after:?}");
    match after.upgrades.as_slice() {
        [Passed {
            upgrade,
            halted_ms,
            by_network: false,
            ..
        }] if *upgrade == v2 && *halted_ms >= 500 => {}
        other => anyhow::bail!("the chain's record of the upgrade: {other:?}"),
    }
    eventually(SETTLE, "the migration's marker", || async {
        Ok(home.join("data/migrated-v2").exists().then_some(()))
    })
    .await?;
    Ok(())
}

/// cosmovisor's tree in `home` for a node named `fakenoded`: genesis, and
/// upgrade v2 if `with_v2`, each a small wrapper around fakenode at its
/// version (v2 with a 300 ms migration).
fn cosmovisor_tree(home: &Path, with_v2: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let fakenode = sibling_bin("fakenode")?;
    let wrap = |dir: PathBuf, flags: &str| -> Result<()> {
        std::fs::create_dir_all(dir.join("bin"))?;
        let bin = dir.join("bin/fakenoded");
        let script = format!("#!/bin/sh\nexec {} {flags} \"$@\"\n", fakenode.display());
        std::fs::write(&bin, script)?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    wrap(home.join("cosmovisor/genesis"), "--chain-version genesis")?;
    if with_v2 {
        wrap(
            home.join("cosmovisor/upgrades/v2"),
            "--chain-version v2 --migration-ms 300",
        )?;
    }
    Ok(())
}

/// fakecosmovisor running node 1 in `home` (its DAEMON_HOME) on `chain`.
fn cosmovisor(chain: &NearChain, home: &Path) -> Result<Proc> {
    Proc::spawn(
        "fakecosmovisor",
        Command::new(sibling_bin("fakecosmovisor")?)
            .env("DAEMON_HOME", home)
            .env("DAEMON_NAME", "fakenoded")
            .env("DAEMON_POLL_INTERVAL", "100ms")
            .arg("run")
            .arg("--home")
            .arg(home)
            .args(["--chain", &chain.chain.url, "--node-id", "1"])
            .args(["--rpc-listen", &free_addr()?.to_string()]),
        chain.dir.path(),
    )
}

#[tokio::test]
async fn cosmovisor_switches_to_the_upgrades_binary_at_the_halt_and_the_chain_goes_on() -> Result<()>
{
    let upgrade = format!("v2@{UPGRADE_AT}");
    let chain = NearChain::start(BLOCK_MS, &["--upgrade", &upgrade]).await?;
    let home = chain.home(1, true)?;
    cosmovisor_tree(&home, true)?;
    let mut visor = cosmovisor(&chain, &home)?;
    let first = eventually(SETTLE, "a first signature", || async {
        let s = chain.chain.stats_since(0).await?;
        Ok(s.signers.iter().map(|x| x.height).min())
    })
    .await?;
    let after = chain
        .chain
        .wait_height(
            UPGRADE_AT + 5,
            Duration::from_millis(BLOCK_MS * UPGRADE_AT) + SETTLE,
        )
        .await
        .with_context(|| format!("the chain did not pass the upgrade: {}", visor.log_tail(8)))?;
    ensure!(
        visor.try_exit().is_none(),
        "cosmovisor ended: {}",
        visor.log_tail(8)
    );
    let s = chain.chain.stats_since(first).await?;
    if let Some(h) = s.first_unsigned_by(1, first..UPGRADE_AT + 4) {
        anyhow::bail!("height {h} not signed: {:?}", s.signers);
    }
    ensure!(after.double_signs == 0, "double signs: {after:?}");
    ensure!(
        after.upgrades.len() == 1 && after.upgrades[0].halted_ms >= 300,
        "the chain's record of the upgrade: {:?}",
        after.upgrades
    );
    let current = std::fs::read_link(home.join("cosmovisor/current"))?;
    ensure!(current.ends_with("upgrades/v2"), "current is {current:?}");
    let backups = std::fs::read_dir(&home)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("data-backup-"))
        .count();
    ensure!(backups == 1, "{backups} backups of data/");
    Ok(())
}

#[tokio::test]
async fn cosmovisor_without_the_upgrades_binary_stops_at_the_halt() -> Result<()> {
    let upgrade = format!("v2@{UPGRADE_AT}");
    let chain = NearChain::start(BLOCK_MS, &["--upgrade", &upgrade]).await?;
    let home = chain.home(1, true)?;
    cosmovisor_tree(&home, false)?;
    let mut visor = cosmovisor(&chain, &home)?;
    let status = visor
        .wait_exit(Duration::from_millis(BLOCK_MS * UPGRADE_AT) + SETTLE)
        .await?;
    ensure!(status.code() == Some(1), "cosmovisor ended {status:?}");
    ensure!(
        visor
            .log_text()
            .contains("binary not present, downloading disabled"),
        "{}",
        visor.log_tail(5)
    );
    let s = chain.chain.totals().await?;
    ensure!(
        s.height == UPGRADE_AT && s.halted.is_some(),
        "the chain did not wait at the upgrade: {s:?}"
    );
    Ok(())
}
