//! Which heights signer mode signs, judged by the fake chains: no single
//! request from whatever sits on a privval port moves the watermark far
//! past where the chain is known to be, with no node vouching for the
//! chain's height, and a node stuck at its height (synced by its own word)
//! does not hold every leader's limit down. Real processes, real mTLS; the
//! requests are forwarded as a member would (`tests/peer`).

use anyhow::{ensure, Context, Result};
use keyraft::signer::sign::ConsensusKey;
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::eventually;
use peer::{ask_to_sign, precommit_request, proven};

mod peer;

/// A signer cluster of three validator hosts for `chain` (and `more`
/// chains), its key never used, whose nodes' heights reach keyraft only as
/// `opts` says; its leader and another validator host, once it signs.
async fn signers(
    chain: &str,
    more: u64,
    opts: impl Fn(u64) -> NodeOpts,
) -> Result<(Cluster, u64, u64)> {
    let mode = localnet::cluster::Mode::Signer {
        chain_id: chain.into(),
        round_every: 0,
        validators: 2,
        more_chains: more,
        halt: None,
    };
    let c = Cluster::start_signers(3, 500, mode, opts).await?;
    let (leader, _) = eventually(SETTLE, "a signer leader", || async {
        c.agreed_leader(&[1, 2, 3]).await
    })
    .await
    .with_context(|| c.logs())?;
    let other = if leader == 1 { 2 } else { 1 };
    for (name, judge) in c.judges() {
        let signed = judge.totals().await?.signed;
        eventually(SETTLE, &format!("signatures on {name}"), || async {
            Ok((judge.totals().await?.signed > signed + 3).then_some(()))
        })
        .await
        .with_context(|| c.logs())?;
    }
    Ok((c, leader, other))
}

/// The height limit node `id` shows for `chain`, why, and the watermark.
async fn height_limit(c: &Cluster, id: u64, chain: &str) -> Result<(u64, String, u64)> {
    let s = c.status(id).await?;
    let chains = s["signer"]["chains"].as_array().context("no chains")?;
    let ch = chains
        .iter()
        .find(|ch| ch["chain_id"] == chain)
        .with_context(|| format!("no chain {chain} in {s}"))?;
    let limit = &ch["height_limit"];
    Ok((
        limit["height"].as_u64().context("no height limit")?,
        limit["why"].as_str().unwrap_or("").to_string(),
        ch["watermark"]["height"].as_u64().unwrap_or(0),
    ))
}

/// With no node vouching for a chain's height (a chain without
/// `node-rpc` among several), one request far above the watermark from
/// whatever sits on a privval port was signed and moved the watermark
/// there: every real request was refused after it, for good. It is
/// refused now, and the real sentries sign on.
#[tokio::test]
async fn with_no_height_report_one_request_cannot_put_the_key_out_of_reach() -> Result<()> {
    let (c, leader, other) = signers("keyraft-no-report-test", 1, |_| NodeOpts {
        no_node_rpc: true,
        ..NodeOpts::default()
    })
    .await?;
    let second = c.others[0].chain_id.clone();
    let (limit, why, w) = height_limit(&c, leader, &second).await?;
    ensure!(why.contains("no member's node reports"), "{why}");
    ensure!(
        limit <= w + 1_100,
        "limit {limit} over watermark {w}: {why}"
    );
    let key = ConsensusKey::load(&c.others[0].key_path)?;
    let public = key.public().as_bytes().to_vec();
    let far = w + 5_000_000;
    let req = proven(
        precommit_request(&second, far, &public),
        &key,
        other,
        &second,
    );
    let reply = ask_to_sign(&c, other, leader, req)
        .await?
        .context("the request itself failed")?;
    ensure!(
        reply.refusal != keyraft::pb::Refusal::None as i32 && reply.detail.contains("is above"),
        "height {far} was signed with no node vouching: {reply:?}"
    );
    let (_, _, after) = height_limit(&c, leader, &second).await?;
    ensure!(after < w + 1_100, "the watermark jumped to {after}");
    let judge = &c.others[0].chain;
    let signed = judge.totals().await?.signed;
    eventually(SETTLE, "the real sentries signing on", || async {
        Ok((judge.totals().await?.signed > signed + 3).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A CometBFT `/status` of `chain` that says synced at `height` forever:
/// a node whose consensus halted, or that lost its peers, by its own word
/// still in sync.
async fn stuck_node(chain: &'static str, height: u64) -> Result<String> {
    let status = serde_json::json!({"result": {
        "node_info": {"network": chain},
        "sync_info": {"catching_up": false, "latest_block_height": height.to_string()},
    }});
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let status = status.clone();
            async move { axum::Json(status) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Of two nodes reporting, one stuck at height 1: the limit followed the
/// lower one down (1,001), so every leader refused every real request
/// once the chain passed it. The moving node speaks for the chain now.
#[tokio::test]
async fn a_stuck_node_of_two_does_not_hold_the_height_limit_down() -> Result<()> {
    const CHAIN: &str = "keyraft-stuck-node-test";
    let stuck = stuck_node(CHAIN, 1).await?;
    // Host 3's probe reaches nothing: it never leads, and reports nothing.
    let (c, leader, _) = signers(CHAIN, 0, |id| NodeOpts {
        health_url: match id {
            1 => None,
            2 => Some(stuck.clone()),
            _ => Some("http://127.0.0.1:9".into()),
        },
        ..NodeOpts::default()
    })
    .await?;
    eventually(SETTLE, "the moving node to speak for the chain", || async {
        let (limit, why, _) = height_limit(&c, leader, CHAIN).await?;
        let h = c.chain.totals().await?.height;
        ensure!(why.contains("synced nodes report"), "{limit}: {why}");
        Ok((h > 20 && limit > 1_001 + 10 && limit + 10 >= h + 1_000).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    c.assert_no_double_signs().await?;
    Ok(())
}
