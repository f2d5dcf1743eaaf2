//! The upgrade harness judged: fakechain with an upgrade plan and fakenode
//! at its versions, as real processes on real ports. A chain upgrade must
//! halt the old version where a Cosmos node halts, keep the chain at that
//! height until the new version signs it, and count nothing missed or
//! doubled meanwhile; otherwise an upgrade test that asks this chain has
//! tested nothing.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::chain::{Passed, SignRequest};
use localnet::harness::{eventually, NearChain};
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
        [Passed { upgrade, halted_ms }] if *upgrade == v2 && *halted_ms >= 500 => {}
        other => anyhow::bail!("the chain's record of the upgrade: {other:?}"),
    }
    eventually(SETTLE, "the migration's marker", || async {
        Ok(home.join("data/migrated-v2").exists().then_some(()))
    })
    .await?;
    Ok(())
}
