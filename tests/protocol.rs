//! Signer mode for CometBFT 1.x sentries, end to end: three `keyraft run
//! --signer cometbft` processes, each supervising a `fakenode --cometbft`
//! speaking `cometbft.privval.v1`, and the CometBFT judge verifying every
//! signature. Faults are real: a SIGKILL of the leader's host, and the
//! sentries' own halt and restart at a chain's upgrade to 1.x.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use localnet::cluster::{Cluster, Mode, NodeOpts};
use localnet::comet::privval::PrivvalStats;

mod common;
use common::{every_sentry_signed, kill_the_leaders_host, no_equivocations};

const BLOCK_MS: u64 = 500;
const SETTLE: Duration = Duration::from_secs(30);

fn mode() -> Mode {
    Mode::signer("keyraft-v1-test")
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

async fn sentry(c: &Cluster, id: u64) -> Result<PrivvalStats> {
    localnet::cometnet::privval_stats(&format!("http://{}", c.nodes[&id].rpc), 0).await
}

/// v1 sentries that also ask for raw bytes (and for a conflicting
/// precommit dressed as raw bytes) on a cluster that allows them.
fn v1_with_bytes(_: u64) -> NodeOpts {
    NodeOpts {
        flags: strings(&["--protocol-version", "v1", "--sign-bytes"]),
        fakenode: strings(&["--protocol", "v1", "--sign-bytes"]),
        ..NodeOpts::default()
    }
}

#[tokio::test]
async fn v1_sentries_are_signed_for_through_a_kill_of_the_leaders_host() -> Result<()> {
    let mut c = Cluster::start_signers(3, BLOCK_MS, mode(), v1_with_bytes).await?;
    every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    let (rest, missed, s) = kill_the_leaders_host(&mut c).await?;
    // An election and a reconnection: a few heights at 500 ms, not more.
    ensure!(
        missed <= 6,
        "{missed} heights missed after the kill\n{}",
        c.logs()
    );
    c.chain.wait_height(s.height + 4, SETTLE).await?;
    no_equivocations(&c).await?;
    for id in rest {
        let p = sentry(&c, id).await?;
        eprintln!("sentry {id}: {p:?}");
        ensure!(p.signed > 0 && p.bad_replies == 0, "sentry {id}: {p:?}");
        ensure!(
            p.bytes_signed > 0,
            "sentry {id} had no raw bytes signed: {p:?}"
        );
        ensure!(
            p.disguised_signed == 0,
            "sentry {id} got a conflicting precommit signed as raw bytes: {p:?}"
        );
        ensure!(
            p.bytes_refused >= p.bytes_signed / 2,
            "each disguised precommit is refused: {p:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn raw_bytes_are_refused_where_the_chain_does_not_allow_them() -> Result<()> {
    let c = Cluster::start_signers(3, BLOCK_MS, mode(), |_| NodeOpts {
        flags: strings(&["--protocol-version", "v1"]),
        fakenode: strings(&["--protocol", "v1", "--sign-bytes"]),
        ..NodeOpts::default()
    })
    .await?;
    let s = every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    c.chain.wait_height(s.height + 3, SETTLE).await?;
    for id in 1..=3 {
        let p = sentry(&c, id).await?;
        ensure!(p.signed > 0, "votes are signed: {p:?}");
        ensure!(
            p.bytes_signed == 0 && p.disguised_signed == 0 && p.bytes_refused > 0,
            "sentry {id}: raw bytes must be refused without --sign-bytes: {p:?}"
        );
    }
    no_equivocations(&c).await?;
    Ok(())
}

/// The height the chain upgrades to CometBFT 1.x at in the switch test.
const SWITCH: u64 = 16;

fn switching(homes: &Path, id: u64) -> NodeOpts {
    let home = homes.join(format!("sentry{id}"));
    NodeOpts {
        flags: strings(&["--protocol-version", "either"]),
        fakenode: vec![
            "--v1-after".into(),
            SWITCH.to_string(),
            "--home".into(),
            home.display().to_string(),
        ],
        ..NodeOpts::default()
    }
}

#[tokio::test]
async fn a_chain_switching_to_v1_at_its_upgrade_height_is_signed_on_both_sides() -> Result<()> {
    let homes = tempfile::tempdir()?;
    let dir = homes.path().to_path_buf();
    let c = Cluster::start_signers(3, BLOCK_MS, mode(), move |id| switching(&dir, id)).await?;
    let before = every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    ensure!(
        before.height < SWITCH,
        "the cluster started past the switch height ({}): raise SWITCH",
        before.height
    );
    // Every sentry halts once the chain passes SWITCH, is restarted by its
    // keyraft as a 1.x node, and signs again.
    let at_switch = c.chain.wait_height(SWITCH, SETTLE).await?;
    let after = every_sentry_signed(&c, SWITCH + 1, &[1, 2, 3]).await?;
    for id in 1..=3 {
        let marker = homes
            .path()
            .join(format!("sentry{id}/data/upgrade-info.json"));
        ensure!(marker.exists(), "sentry {id} never halted for the upgrade");
        let p = sentry(&c, id).await?;
        ensure!(p.bad_replies == 0, "sentry {id} after the switch: {p:?}");
    }
    let missed = after.missed - at_switch.missed;
    eprintln!(
        "switch at {SWITCH}: every sentry signed again by height {}, {missed} heights missed",
        after.height
    );
    // A sentry's restart costs its restart delay and a connection: a few
    // heights, not the chain (SETTLE would catch a stuck key).
    ensure!(
        missed <= 8,
        "{missed} heights missed across the switch\n{}",
        c.logs()
    );
    c.chain.wait_height(after.height + 4, SETTLE).await?;
    let s = no_equivocations(&c).await?;
    // The watermark went on from the 0.38 side: nothing at or below a
    // height signed before the switch was signed again.
    let w = c.status(1).await?["signer"]["chains"][0]["watermark"]["height"].as_u64();
    ensure!(
        w.is_some_and(|w| w > SWITCH),
        "watermark {w:?} after the switch"
    );
    ensure!(s.double_signs == 0);
    Ok(())
}
