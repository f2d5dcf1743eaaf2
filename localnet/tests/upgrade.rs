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
use localnet::harness::{eventually, free_addr, sibling_bin, ChainClient, Proc};
use localnet::keys::{self, KeyFile};
use localnet::upgrade::{Upgrade, UpgradeInfo};

const BLOCK_MS: u64 = 200;
const UPGRADE_AT: u64 = 15;
const SETTLE: Duration = Duration::from_secs(10);

struct Chain {
    dir: tempfile::TempDir,
    key: KeyFile,
    key_path: PathBuf,
    client: ChainClient,
    _proc: Proc,
}

async fn chain_with(upgrade: &str) -> Result<Chain> {
    let dir = tempfile::tempdir()?;
    let key = KeyFile::generate("validator.test");
    let key_path = dir.path().join("validator_key.json");
    key.write_new(&key_path)?;
    let addr = free_addr()?;
    let proc = Proc::spawn(
        "fakechain",
        Command::new(sibling_bin("fakechain")?)
            .args(["--listen", &addr.to_string()])
            .args(["--block-ms", &BLOCK_MS.to_string()])
            .args(["--upgrade", upgrade])
            .arg("--validator-key")
            .arg(&key_path),
        dir.path(),
    )?;
    let client = ChainClient::new(&format!("http://{addr}"));
    client
        .wait_height(1, SETTLE)
        .await
        .context("fakechain did not start")?;
    Ok(Chain {
        dir,
        key,
        key_path,
        client,
        _proc: proc,
    })
}

impl Chain {
    fn home(&self, id: u64) -> Result<PathBuf> {
        let home = self.dir.path().join(format!("home{id}"));
        std::fs::create_dir_all(&home)?;
        if !home.join("node_key.json").exists() {
            KeyFile::generate("node").write_new(&home.join("node_key.json"))?;
            std::fs::copy(&self.key_path, home.join("validator_key.json"))?;
        }
        Ok(home)
    }

    fn node(&self, id: u64, home: &Path, extra: &[&str]) -> Result<Proc> {
        Proc::spawn(
            &format!("fakenode{id}"),
            Command::new(sibling_bin("fakenode")?)
                .arg("--home")
                .arg(home)
                .args(["--chain", &self.client.url, "--node-id", &id.to_string()])
                .args(["--rpc-listen", &free_addr()?.to_string()])
                .args(extra),
            self.dir.path(),
        )
    }
}

#[tokio::test]
async fn an_upgrade_halts_the_old_version_and_the_chain_waits_for_the_new_one() -> Result<()> {
    let chain = chain_with(&format!("v2@{UPGRADE_AT}")).await?;
    let home = chain.home(1)?;

    // The new version started before the upgrade height refuses to run.
    let mut early = chain.node(2, &chain.home(2)?, &["--chain-version", "v2"])?;
    let status = early.wait_exit(SETTLE).await?;
    ensure!(!status.success(), "v2 ran before its upgrade height");
    ensure!(
        early.log_text().contains("BINARY UPDATED BEFORE TRIGGER"),
        "no early-binary line: {}",
        early.log_tail(5)
    );
    ensure!(
        chain.client.totals().await?.height < UPGRADE_AT,
        "the chain passed the upgrade height before the test could ask (slow host)"
    );

    // The old version signs up to the upgrade height, then halts there.
    let mut old = chain.node(1, &home, &[])?;
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
    let halted = chain.client.totals().await?;
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
    let url = format!("{}/sign", chain.client.url);
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
        .client
        .wait_height(UPGRADE_AT + 5, SETTLE)
        .await
        .context("the chain did not resume after the upgrade")?;
    let s = chain.client.stats_since(UPGRADE_AT).await?;
    for h in UPGRADE_AT..UPGRADE_AT + 4 {
        ensure!(
            s.signers.iter().any(|x| x.height == h && x.node == 1),
            "height {h} not signed by the new version: {:?}",
            s.signers
        );
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
