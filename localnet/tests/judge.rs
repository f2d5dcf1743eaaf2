//! The judge judged: fakechain and fakenode as real processes on real ports.
//! If these pass, a failover test that asks the chain for double signs and
//! missed heights is asking something that can say no.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use localnet::chain::{SignRequest, Stats};
use localnet::harness::{eventually, get_json, NearChain};
use localnet::keys::{self, KeyFile};
use nix::sys::signal::Signal;

const BLOCK_MS: u64 = 200;
/// Blocks for the every-height test: long enough that a scheduling stall on
/// a busy CI host is not read as a missed height.
const SLOW_BLOCK_MS: u64 = 1000;
const SETTLE: Duration = Duration::from_secs(10);

/// Waits for a signature by `node` at or above `since`.
async fn wait_signed_by(j: &NearChain, node: u64, since: u64) -> Result<Stats> {
    eventually(SETTLE, &format!("a signature from node {node}"), || async {
        let s = j.chain.stats_since(since).await?;
        Ok(s.signers.iter().any(|x| x.node == node).then_some(s))
    })
    .await
}

#[tokio::test]
async fn one_node_with_the_key_signs_every_height() -> Result<()> {
    let j = NearChain::start(SLOW_BLOCK_MS, &[]).await?;
    let home = j.home(1, true)?;
    let (_node, _) = j.node(1, &home, &[])?;
    let first = wait_signed_by(&j, 1, 0).await?;
    // From the height that was current when the first signature was seen,
    // every closed height must be signed and the missed count must not move.
    let from = first.height;
    j.chain.wait_height(from + 6, SETTLE).await?;
    let s = j.chain.stats_since(from).await?;
    if let Some(h) = s.first_unsigned_by(1, from..s.height) {
        anyhow::bail!("height {h} not signed: {:?}", s.signers);
    }
    ensure!(
        s.missed == first.missed,
        "missed grew from {} to {}",
        first.missed,
        s.missed
    );
    ensure!(s.double_signs == 0, "double signs: {}", s.double_signs);
    Ok(())
}

#[tokio::test]
async fn two_nodes_with_the_same_key_are_caught_double_signing() -> Result<()> {
    let j = NearChain::start(BLOCK_MS, &[]).await?;
    let (home1, home2) = (j.home(1, true)?, j.home(2, true)?);
    let (_n1, _) = j.node(1, &home1, &[])?;
    let (_n2, _) = j.node(2, &home2, &[])?;
    let s = eventually(SETTLE, "three double signs", || async {
        let s = j.chain.totals().await?;
        Ok((s.double_signs >= 3).then_some(s))
    })
    .await?;
    let listed = j.chain.stats_since(0).await?;
    let doubled = listed
        .signers
        .iter()
        .filter(|a| {
            listed
                .signers
                .iter()
                .any(|b| b.height == a.height && b.node != a.node)
        })
        .count();
    ensure!(
        doubled >= 6,
        "window shows {doubled} entries of doubly signed heights; totals {s:?}"
    );
    Ok(())
}

#[tokio::test]
async fn forged_foreign_and_stale_signatures_are_refused() -> Result<()> {
    let j = NearChain::start(BLOCK_MS, &[]).await?;
    let http = reqwest::Client::new();
    let post = |req: SignRequest| {
        let http = http.clone();
        let url = format!("{}/sign", j.chain.url);
        async move { Ok::<_, anyhow::Error>(http.post(url).json(&req).send().await?.status().as_u16()) }
    };
    let before = j.chain.totals().await?;
    let forger = KeyFile::generate("forger").signing_key()?;
    let real = j.key.signing_key()?;
    let h = before.height;
    // The validator's public key, signed with another secret.
    let forged = SignRequest {
        height: h,
        public_key: j.key.public_key.clone(),
        node: 9,
        signature: keys::sign_height(&forger, h),
        version: None,
    };
    ensure!(post(forged).await? == 403, "forged signature accepted");
    // A valid signature by a key that is not the validator's.
    let foreign = SignRequest {
        height: h,
        public_key: keys::encode_public(&forger.verifying_key()),
        node: 9,
        signature: keys::sign_height(&forger, h),
        version: None,
    };
    ensure!(post(foreign).await? == 403, "foreign key accepted");
    // A genuine signature of a height that has passed.
    let stale = SignRequest {
        height: h.saturating_sub(1),
        public_key: j.key.public_key.clone(),
        node: 9,
        signature: keys::sign_height(&real, h.saturating_sub(1)),
        version: None,
    };
    ensure!(post(stale).await? == 409, "stale height accepted");
    let after = j.chain.stats_since(0).await?;
    ensure!(after.signed == 0, "something counted as signed: {after:?}");
    ensure!(
        after.refused == before.refused + 3,
        "refused {} -> {}",
        before.refused,
        after.refused
    );
    ensure!(
        after.signers.is_empty(),
        "refused signatures listed: {:?}",
        after.signers
    );
    Ok(())
}

#[tokio::test]
async fn keyless_node_signs_nothing_until_a_key_is_linked_and_sighup_sent() -> Result<()> {
    let j = NearChain::start(BLOCK_MS, &[]).await?;
    let home = j.home(1, false)?;
    let (node, rpc) = j.node(1, &home, &["--hot-reload"])?;
    let status = eventually(SETTLE, "a synced keyless node", || async {
        let v = get_json(&format!("{rpc}/status")).await?;
        Ok((v["sync_info"]["syncing"] == false).then_some(v))
    })
    .await?;
    ensure!(status["validator_account_id"].is_null(), "{status}");
    let h = j.chain.totals().await?.height;
    j.chain.wait_height(h + 5, SETTLE).await?;
    ensure!(j.chain.totals().await?.signed == 0, "a keyless node signed");

    let link = home.join("validator_key.json");
    std::os::unix::fs::symlink(&j.key_path, &link)?;
    node.signal(Signal::SIGHUP)?;
    let linked_at = j.chain.totals().await?.height;
    wait_signed_by(&j, 1, linked_at).await?;
    let v = get_json(&format!("{rpc}/status")).await?;
    ensure!(v["validator_account_id"] == "validator.test", "{v}");

    std::fs::remove_file(&link)?;
    node.signal(Signal::SIGHUP)?;
    let unlinked = eventually(SETTLE, "the node to drop its key", || async {
        let v = get_json(&format!("{rpc}/status")).await?;
        let s = j.chain.totals().await?;
        Ok(v["validator_account_id"].is_null().then_some(s))
    })
    .await?;
    j.chain.wait_height(unlinked.height + 5, SETTLE).await?;
    let s = j.chain.stats_since(unlinked.height + 1).await?;
    ensure!(
        s.signers.is_empty(),
        "signed after the key was removed: {:?}",
        s.signers
    );
    Ok(())
}

#[tokio::test]
async fn status_has_neards_shape_and_syncing_nodes_do_not_sign() -> Result<()> {
    let j = NearChain::start(BLOCK_MS, &[]).await?;
    let home = j.home(1, true)?;
    let (_node, rpc) = j.node(1, &home, &["--sync-delay-ms", "1500"])?;
    let v = eventually(SETTLE, "fakenode rpc", || async {
        Ok(Some(get_json(&format!("{rpc}/status")).await?))
    })
    .await?;
    ensure!(
        v["sync_info"]["syncing"] == true,
        "not syncing right after start: {v}"
    );
    ensure!(v["sync_info"]["latest_block_height"].is_u64(), "{v}");
    ensure!(v["sync_info"]["latest_block_hash"].is_string(), "{v}");
    ensure!(v["validator_account_id"] == "validator.test", "{v}");
    ensure!(
        v["validator_public_key"] == j.key.public_key.as_str(),
        "{v}"
    );
    ensure!(
        v["node_public_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("ed25519:")),
        "{v}"
    );
    ensure!(
        v["version"]["version"].is_string() && v["version"]["build"].is_string(),
        "{v}"
    );
    ensure!(v["chain_id"].is_string(), "{v}");
    ensure!(j.chain.totals().await?.signed == 0, "signed while syncing");

    let started = Instant::now();
    let v = eventually(SETTLE, "sync to finish", || async {
        let v = get_json(&format!("{rpc}/status")).await?;
        Ok((v["sync_info"]["syncing"] == false).then_some(v))
    })
    .await?;
    let head = j.chain.totals().await?.height;
    let reported = v["sync_info"]["latest_block_height"].as_u64().unwrap_or(0);
    ensure!(
        reported + 2 >= head && reported <= head,
        "reported {reported}, head {head}"
    );
    wait_signed_by(&j, 1, 0).await?;
    ensure!(started.elapsed() < SETTLE);
    Ok(())
}

#[tokio::test]
async fn sigterm_keeps_signing_through_the_shutdown_delay_then_exits_0() -> Result<()> {
    let j = NearChain::start(BLOCK_MS, &[]).await?;
    let home = j.home(1, true)?;
    let (mut node, _) = j.node(1, &home, &["--shutdown-delay-ms", "1500"])?;
    wait_signed_by(&j, 1, 0).await?;
    let at_term = j.chain.totals().await?.height;
    let sent = Instant::now();
    node.signal(Signal::SIGTERM)?;
    let status = node.wait_exit(SETTLE).await?;
    let took = sent.elapsed();
    ensure!(
        status.success(),
        "exit status {status}: {}",
        node.log_tail(20)
    );
    ensure!(took >= Duration::from_millis(1500), "exited after {took:?}");
    let s = j.chain.stats_since(at_term + 1).await?;
    let late = s.signers.iter().filter(|x| x.node == 1).count();
    ensure!(
        late >= 5,
        "signed only {late} heights during the 1.5 s delay"
    );
    Ok(())
}
