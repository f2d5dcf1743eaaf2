//! The CometBFT judge judged, against tmkms: a signer nobody here wrote.
//! If tmkms signs for a fakenode and the chain accepts every height, the
//! fake node speaks what real signers speak; if two tmkms with one key and
//! a split sentry are caught, the equivocation count can say no.
//!
//! Needs tmkms (`localnet/scripts/install-tmkms.sh`, which `.ci/run` runs).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::chain::Stats;
use localnet::comet::consensus::{self, Step};
use localnet::comet::ledger::Announce;
use localnet::comet::node::{Protocol, Submission};
use localnet::cometnet::{CometNet, NetOpts, Sentry, SentryOpts};
use localnet::harness::{eventually, get_json};
use nix::sys::signal::Signal;
use prost::Message;

const SETTLE: Duration = Duration::from_secs(15);
/// Heights watched after the first signed one.
const WATCH: u64 = 10;

/// Waits until the chain counts a precommit relayed by `sentry` at a height
/// above `after`; returns the stats of that moment.
async fn first_signed(net: &CometNet, sentry: u64, after: u64) -> Result<(u64, Stats)> {
    eventually(
        SETTLE,
        &format!("a height signed via sentry {sentry}"),
        || async {
            let s = net.chain.stats_since(after + 1).await?;
            Ok(s.first_signed_by(sentry, after).map(|h| (h, s)))
        },
    )
    .await
}

/// From the first height signed via `sentry`, every height is signed and
/// nothing else happens; checks `/stats` field by field.
async fn every_height_signed(net: &CometNet, sentry: &Sentry) -> Result<()> {
    let (first, _) = first_signed(net, sentry.id, 0).await?;
    net.chain.wait_height(first + WATCH + 1, SETTLE).await?;
    let s = net.chain.stats_since(0).await?;
    let closed = s.height - 1;
    for h in first..=closed {
        ensure!(
            s.signers
                .iter()
                .any(|x| x.height == h && x.node == sentry.id),
            "height {h} not signed; signers {:?}",
            s.signers
        );
    }
    ensure!(
        s.signers
            .iter()
            .all(|x| x.node == sentry.id && x.height >= first),
        "unexpected signers: {:?}",
        s.signers
    );
    // Heights before the first signed one were missed (no signer yet); none after.
    ensure!(
        s.missed == first - 1,
        "missed {} with first signed height {first}",
        s.missed
    );
    let listed = s.signers.len() as u64;
    ensure!(
        s.signed == listed,
        "signed {} but {listed} heights listed",
        s.signed
    );
    ensure!(
        s.signed > closed - first,
        "signed {} of {}..={closed}",
        s.signed,
        first
    );
    ensure!(
        s.double_signs == 0 && s.equivocations.is_empty(),
        "equivocations: {s:?}"
    );
    // Before the signer connected the sentry was still voting on height 1;
    // its late votes were refused. None after.
    let late = net.chain.stats_since(u64::MAX).await?.refused;
    ensure!(late == s.refused, "refusals still growing");
    let pv = sentry.privval_stats().await?;
    ensure!(pv.connected, "sentry reports no signer: {pv:?}");
    ensure!(
        pv.remote_errors == 0 && pv.bad_replies == 0,
        "signer errors: {pv:?}"
    );
    ensure!(
        pv.signed >= 2 * (closed - first + 1),
        "sentry saw too few signatures: {pv:?}"
    );
    let status = get_json(&format!("{}/status", sentry.rpc)).await?;
    ensure!(
        status["result"]["validator_info"]["address"] == net.key.public().address_hex(),
        "status does not show the signer's key: {status}"
    );
    ensure!(
        status["result"]["sync_info"]["catching_up"] == false,
        "{status}"
    );
    Ok(())
}

#[tokio::test]
async fn tmkms_signs_every_height_for_a_0_38_sentry_over_secret_connection() -> Result<()> {
    // Rounds (every 3rd height commits in round 1 after a nil precommit) and
    // proposals on our turn (every 2nd round) are part of the run.
    let net = CometNet::start(&NetOpts {
        round_every: 3,
        validators: 2,
        ..NetOpts::default()
    })
    .await?;
    let sentry = net.sentry(1, &SentryOpts::default())?;
    let _kms = net.tmkms("tmkms1", &sentry, Protocol::V0_38, false)?;
    every_height_signed(&net, &sentry).await
}

#[tokio::test]
async fn tmkms_signs_every_height_for_a_0_34_sentry_over_a_unix_socket() -> Result<()> {
    let net = CometNet::start(&NetOpts {
        round_every: 4,
        validators: 3,
        ..NetOpts::default()
    })
    .await?;
    let sentry = net.sentry(
        1,
        &SentryOpts {
            unix: true,
            protocol: Protocol::V0_34,
            ..SentryOpts::default()
        },
    )?;
    let _kms = net.tmkms("tmkms1", &sentry, Protocol::V0_34, false)?;
    every_height_signed(&net, &sentry).await
}

#[tokio::test]
async fn two_tmkms_with_one_key_and_a_split_sentry_are_caught_equivocating() -> Result<()> {
    let net = CometNet::start(&NetOpts {
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let honest = net.sentry(1, &SentryOpts::default())?;
    let split = net.sentry(
        2,
        &SentryOpts {
            equivocate: true,
            ..SentryOpts::default()
        },
    )?;
    // Each tmkms keeps its own watermark, so neither can know of the other.
    let _k1 = net.tmkms("tmkms1", &honest, Protocol::V0_38, false)?;
    let _k2 = net.tmkms("tmkms2", &split, Protocol::V0_38, false)?;
    let s = eventually(SETTLE, "equivocations at three heights", || async {
        let s = net.chain.stats_since(0).await?;
        let mut heights: Vec<u64> = s.equivocations.iter().map(|e| e.height).collect();
        heights.dedup();
        Ok((heights.len() >= 3).then_some(s))
    })
    .await?;
    ensure!(s.double_signs >= 3, "{s:?}");
    for step in [Step::Proposal, Step::Prevote, Step::Precommit] {
        ensure!(
            s.equivocations.iter().any(|e| e.step == step),
            "no {step:?} equivocation in {:?}",
            s.equivocations
        );
    }
    ensure!(s.double_signs as usize >= s.equivocations.len(), "{s:?}");
    // The honest sentry's heights still count as signed; the split one's never do.
    ensure!(
        s.signed > 0 && s.signers.iter().all(|x| x.node == 1),
        "{:?}",
        s.signers
    );
    Ok(())
}

#[tokio::test]
async fn one_tmkms_for_an_honest_and_a_split_sentry_refuses_the_conflict() -> Result<()> {
    // One watermark for both sentries: tmkms refuses whichever conflicting
    // request comes second. The chain sees no equivocation, only fewer
    // signed heights.
    let net = CometNet::start(&NetOpts {
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let honest = net.sentry(1, &SentryOpts::default())?;
    let split = net.sentry(
        2,
        &SentryOpts {
            equivocate: true,
            ..SentryOpts::default()
        },
    )?;
    let _kms = net.tmkms_for("tmkms1", &[&honest, &split], Protocol::V0_38, false)?;
    // tmkms refuses a conflict at the same step with a RemoteSignerError and
    // a request below its watermark by closing the connection; which one a
    // sentry meets depends on who asks first.
    eventually(SETTLE, "a conflicting request refused by tmkms", || async {
        let (a, b) = (honest.privval_stats().await?, split.privval_stats().await?);
        let refusals = a.remote_errors + b.remote_errors + a.disconnects + b.disconnects;
        Ok((refusals >= 3).then_some(()))
    })
    .await?;
    let h = net.chain.totals().await?.height;
    net.chain.wait_height(h + 6, SETTLE).await?;
    let s = net.chain.stats_since(0).await?;
    ensure!(s.double_signs == 0 && s.equivocations.is_empty(), "{s:?}");
    let (a, b) = (honest.privval_stats().await?, split.privval_stats().await?);
    ensure!(
        a.signed + b.signed > 0,
        "nothing signed at all: {a:?} {b:?}"
    );
    Ok(())
}

/// A vote or proposal posted straight to the chain, as a sentry would.
async fn post(net: &CometNet, kind: &str, msg: Vec<u8>) -> Result<u16> {
    let body = Submission {
        node: 9,
        msg: hex::encode(msg),
    };
    Ok(reqwest::Client::new()
        .post(format!("{}/cometbft/{kind}", net.chain.url))
        .json(&body)
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test]
async fn forged_wrong_chain_and_stale_votes_are_refused_and_never_counted() -> Result<()> {
    let net = CometNet::start(&NetOpts {
        block_ms: 1000,
        ..NetOpts::default()
    })
    .await?;
    net.chain.wait_height(2, SETTLE).await?;
    let a: Announce =
        serde_json::from_value(get_json(&format!("{}/status", net.chain.url)).await?)?;
    let block = a.block_id().context("announced block id")?;
    let key = net.key.signing();
    let address = net.key.public().address;
    let precommit = |chain: &str, height: u64| -> Result<Vec<u8>> {
        let mut v = consensus::vote(
            Step::Precommit,
            height,
            a.round,
            block.clone(),
            address,
            vec![],
        );
        consensus::sign_vote(key, chain, &mut v, false)?;
        Ok(v.encode_to_vec())
    };
    let before = net.chain.totals().await?;
    // Forged: the validator's address, another key's signature.
    let forger = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let mut forged = consensus::vote(
        Step::Precommit,
        a.height,
        a.round,
        block.clone(),
        address,
        vec![],
    );
    consensus::sign_vote(&forger, &net.chain_id, &mut forged, false)?;
    ensure!(
        post(&net, "vote", forged.encode_to_vec()).await? == 403,
        "forged vote accepted"
    );
    // The real key, signing for another chain.
    ensure!(
        post(&net, "vote", precommit("another-chain", a.height)?).await? == 403,
        "wrong chain accepted"
    );
    // The real key, a height that has closed.
    ensure!(
        post(&net, "vote", precommit(&net.chain_id, a.height - 1)?).await? == 409,
        "stale vote accepted"
    );
    // Garbage.
    ensure!(
        post(&net, "vote", vec![0xff, 0x01, 0x02]).await? == 400,
        "garbage accepted"
    );
    let after = net.chain.stats_since(0).await?;
    ensure!(
        after.refused == before.refused + 4,
        "refused {} -> {}",
        before.refused,
        after.refused
    );
    ensure!(
        after.signed == 0 && after.signers.is_empty(),
        "something counted: {after:?}"
    );
    ensure!(after.double_signs == 0, "{after:?}");
    // The control: the same vote, correctly signed for this chain and height, counts.
    let now: Announce =
        serde_json::from_value(get_json(&format!("{}/status", net.chain.url)).await?)?;
    if now.height == a.height && now.round == a.round {
        ensure!(
            post(&net, "vote", precommit(&net.chain_id, a.height)?).await? == 200,
            "genuine vote refused"
        );
        ensure!(
            net.chain.totals().await?.signed == 1,
            "genuine vote not counted"
        );
    }
    Ok(())
}

#[tokio::test]
async fn tmkms_refuses_a_sentry_asking_for_another_chain_and_nothing_is_signed() -> Result<()> {
    let net = CometNet::start(&NetOpts::default()).await?;
    let sentry = net.sentry(
        1,
        &SentryOpts {
            chain_id: Some("another-chain".into()),
            ..SentryOpts::default()
        },
    )?;
    let _kms = net.tmkms("tmkms1", &sentry, Protocol::V0_38, false)?;
    let start = net.chain.totals().await?.height;
    net.chain.wait_height(start + 6, SETTLE).await?;
    let s = net.chain.stats_since(0).await?;
    ensure!(
        s.signed == 0 && s.signers.is_empty(),
        "signed for a wrong chain id: {s:?}"
    );
    ensure!(s.missed >= 5, "{s:?}");
    let pv = sentry.privval_stats().await?;
    ensure!(pv.signed == 0, "{pv:?}");
    Ok(())
}

#[tokio::test]
async fn a_signer_that_goes_away_misses_heights_and_signing_resumes_on_reconnect() -> Result<()> {
    let net = CometNet::start(&NetOpts::default()).await?;
    let sentry = net.sentry(1, &SentryOpts::default())?;
    let mut kms = net.tmkms("tmkms1", &sentry, Protocol::V0_38, false)?;
    let (first, _) = first_signed(&net, 1, 0).await?;
    kms.signal(Signal::SIGKILL)?;
    kms.wait_exit(SETTLE).await?;
    let gone = net.chain.totals().await?;
    net.chain.wait_height(gone.height + 4, SETTLE).await?;
    let during = net.chain.totals().await?;
    ensure!(
        during.missed >= gone.missed + 3,
        "no heights missed while the signer was gone: {gone:?} -> {during:?}"
    );
    let pv = sentry.privval_stats().await?;
    ensure!(!pv.connected && pv.disconnects >= 1, "{pv:?}");
    // The same tmkms, restarted with its state file, dials in again.
    let _kms = net.tmkms("tmkms1", &sentry, Protocol::V0_38, false)?;
    let (resumed, _) = first_signed(&net, 1, during.height).await?;
    net.chain.wait_height(resumed + 4, SETTLE).await?;
    let s = net.chain.stats_since(resumed).await?;
    for h in resumed..s.height {
        ensure!(
            s.signers.iter().any(|x| x.height == h),
            "height {h} not signed after reconnect: {:?}",
            s.signers
        );
    }
    ensure!(s.double_signs == 0 && first < resumed, "{s:?}");
    let pv = sentry.privval_stats().await?;
    ensure!(pv.connected && pv.connections >= 2, "{pv:?}");
    Ok(())
}

#[tokio::test]
async fn tmkms_0_15_precommits_carry_no_vote_extension_signature_and_the_chain_notices(
) -> Result<()> {
    // tmkms 0.15 signs the extension (sign_extensions = true) but answers
    // with CometBFT 0.34's vote message, which has no field for it. A chain
    // with vote extensions enabled must refuse such precommits: the judge's
    // extension check, proven on a real signer's output.
    let net = CometNet::start(&NetOpts {
        vote_extensions: true,
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let sentry = net.sentry(1, &SentryOpts::default())?;
    let _kms = net.tmkms("tmkms1", &sentry, Protocol::V0_38, true)?;
    let start = eventually(SETTLE, "the signer to answer", || async {
        let pv = sentry.privval_stats().await?;
        Ok((pv.signed >= 3).then_some(()))
    })
    .await;
    start?;
    let h = net.chain.totals().await?.height;
    net.chain.wait_height(h + 4, SETTLE).await?;
    let s = net.chain.stats_since(0).await?;
    ensure!(
        s.signed == 0,
        "precommits without extension signatures were counted: {s:?}"
    );
    ensure!(s.refused >= 3, "{s:?}");
    let pv = sentry.privval_stats().await?;
    ensure!(
        pv.signed >= 9,
        "tmkms did sign prevotes and precommits: {pv:?}"
    );
    Ok(())
}
