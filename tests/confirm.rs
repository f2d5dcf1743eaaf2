//! The voters' confirmation before a signature leaves the leader
//! (`signer::confirm`), over the real peer port: a member answers only the
//! leader it follows, in that term, witnesses too; and once it confirmed a
//! step with one set of bytes and timestamp, it refuses the same step with
//! others (what a leader resumed from an earlier memory image would ask)
//! and any step below it of the same signing process, while the cluster
//! signs on. Real processes, real mTLS; the leader's certificate plays
//! the image.

use anyhow::{ensure, Result};
use keyraft::pb::{ConfirmAnswer, ConfirmReply, ConfirmRequest};
use localnet::cluster::{Cluster, SETTLE};
use localnet::harness::eventually;
use peer::{as_node, peer_channel, signers_with_a_witness, signing_goes_on};

mod peer;

const CHAIN: &str = "keyraft-confirm-test";

/// `ask` sent by node `from` (with its certificate) to node `to`.
async fn ask(c: &Cluster, from: u64, to: u64, ask: &ConfirmRequest) -> Result<ConfirmReply> {
    let ch = peer_channel(c, to, &c.nodes[&from].tls).await?;
    Ok(keyraft::pb::confirm_client::ConfirmClient::new(ch)
        .confirm(as_node(ask.clone(), from)?)
        .await?
        .into_inner())
}

fn answer(r: &ConfirmReply) -> ConfirmAnswer {
    ConfirmAnswer::try_from(r.answer).unwrap_or(ConfirmAnswer::Unknown)
}

#[tokio::test]
async fn a_voter_confirms_a_step_once_and_refuses_it_to_a_leader_that_forgot() -> Result<()> {
    let (c, leader, term) = signers_with_a_witness(CHAIN, 0).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    c.never_signed().await?;
    // Far above what the chain will reach in this test, for a signing
    // process of the leader's that is not its real one.
    let h = c.chain.totals().await?.height + 100_000;
    let step = |height, digest: &str, nanos| ConfirmRequest {
        chain_id: CHAIN.into(),
        height,
        round: 0,
        step: 2,
        digest: digest.into(),
        timestamp_seconds: 1_700_000_000,
        timestamp_nanos: nanos,
        holder: 77,
        term,
    };
    // Not the leader it follows (another member), or not its term.
    let r = ask(&c, follower, 3, &step(h, "a", 1)).await?;
    ensure!(answer(&r) == ConfirmAnswer::NotLeader, "{r:?}");
    let r = ask(
        &c,
        leader,
        follower,
        &ConfirmRequest {
            term: term + 1,
            ..step(h, "a", 1)
        },
    )
    .await?;
    ensure!(answer(&r) == ConfirmAnswer::NotLeader, "{r:?}");
    // The leader's ask: confirmed by the follower and by the witness (once
    // each has run a takeover: before, it says it is fresh).
    for voter in [follower, 3] {
        eventually(SETTLE, "a confirmation", || async {
            let r = ask(&c, leader, voter, &step(h, "a", 1)).await?;
            match answer(&r) {
                ConfirmAnswer::Confirmed => Ok(Some(())),
                ConfirmAnswer::Fresh => Ok(None),
                _ => anyhow::bail!("node {voter}: {r:?}"),
            }
        })
        .await?;
    }
    // Asked again, the same: confirmed again. Other bytes, another
    // timestamp, or a step below of the same process: refused, and where.
    let r = ask(&c, leader, follower, &step(h, "a", 1)).await?;
    ensure!(answer(&r) == ConfirmAnswer::Confirmed, "{r:?}");
    for (again, what) in [
        (step(h, "b", 1), "other bytes"),
        (step(h, "a", 2), "another timestamp"),
        (step(h - 1, "c", 1), "a step below"),
    ] {
        for voter in [follower, 3] {
            let r = ask(&c, leader, voter, &again).await?;
            ensure!(
                answer(&r) == ConfirmAnswer::ConfirmedBefore && r.height == h && r.step == 2,
                "node {voter}, {what}: {r:?}"
            );
        }
    }
    // Below what the cluster committed: refused as committed.
    signing_goes_on(&c).await?;
    let r = ask(
        &c,
        leader,
        follower,
        &ConfirmRequest {
            holder: 78,
            ..step(1, "d", 1)
        },
    )
    .await?;
    ensure!(answer(&r) == ConfirmAnswer::Committed, "{r:?}");
    let s = c.chain.stats_since(0).await?;
    ensure!(
        s.double_signs == 0 && s.equivocations.is_empty(),
        "equivocations: {:?}",
        s.equivocations
    );
    Ok(())
}
