//! Benchmarks that print numbers: how fast the judge keeps up, and (with the
//! launcher) how fast keyraft fails over.
//!
//! Owns: starting the processes a benchmark needs in a scratch dir, measuring
//! and printing one JSON line of results. Must not: assert pass/fail on
//! timings; it reports, and docs/benchmarks.md quotes. One file per
//! benchmark; this module holds what they share.

use std::time::Duration;

use anyhow::Context;

mod chain;
mod comet;
mod failover;
mod idle;
mod latency;
mod signer;
mod usage;

pub use chain::{chain, ChainBench};
pub use comet::{comet, CometBench};
pub use failover::{failover, failover_budgets, BUDGET};
pub use idle::{idle, signer_idle};
pub use latency::{latency, LatencyBench};
pub use signer::{signer, SignerBench};

/// Nearest-rank percentile of `v` (sorted here), `q` in 0..=100.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// One CometBFT validator signed by tmkms alone (no HA) at `block_ms`
/// rounds, once tmkms has signed a first height: the baseline the signer
/// benchmarks measure keyraft against. Keep the three values alive.
pub(crate) async fn tmkms_baseline(
    block_ms: u64,
) -> anyhow::Result<(
    crate::cometnet::CometNet,
    crate::cometnet::Sentry,
    crate::harness::Proc,
)> {
    let mut run = tmkms_chains(block_ms, 1).await?;
    let (net, sentry) = run.chains.pop().context("no chain")?;
    Ok((net, sentry, run.kms))
}

/// One tmkms signing for `chains` chains at once, each its own judge and
/// one sentry (no HA), with one key: tmkms's software signer holds one
/// consensus key (a second is refused), so its chains share it.
pub(crate) struct TmkmsRun {
    pub chains: Vec<(crate::cometnet::CometNet, crate::cometnet::Sentry)>,
    pub kms: crate::harness::Proc,
    _dir: tempfile::TempDir,
}

/// Starts [`TmkmsRun`] and waits until tmkms has signed on every chain.
pub(crate) async fn tmkms_chains(block_ms: u64, chains: u64) -> anyhow::Result<TmkmsRun> {
    use crate::cometnet::{CometNet, NetOpts, SentryOpts};
    let key = crate::comet::key::ValidatorKey::generate();
    let mut nets = Vec::new();
    for k in 0..chains {
        let net = CometNet::start(&NetOpts {
            block_ms,
            validators: 1,
            key: Some(key.clone()),
            phase_ms: k * block_ms / chains,
            ..NetOpts::default()
        })
        .await?;
        let sentry = net.sentry(1, &SentryOpts::default())?;
        nets.push((net, sentry));
    }
    let dir = tempfile::Builder::new()
        .prefix("keyraft-tmkms-")
        .tempdir()?;
    let first_key = nets
        .first()
        .map(|(net, _)| net.key_path.clone())
        .unwrap_or_default();
    let signers: Vec<_> = nets
        .iter()
        .map(|(net, sentry)| crate::tmkms::Signer {
            key: &first_key,
            ..net.tmkms_chain(&[sentry], crate::comet::node::Protocol::V0_38, false)
        })
        .collect();
    let kms = crate::tmkms::start("tmkms", &dir.path().join("kms"), dir.path(), &signers)?;
    crate::harness::eventually(Duration::from_secs(30), "tmkms to sign", || async {
        for (net, _) in &nets {
            if net.chain.totals().await?.signed == 0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| format!("tmkms's log ends: {}", kms.log_tail(10)))?;
    Ok(TmkmsRun {
        chains: nets,
        kms,
        _dir: dir,
    })
}

pub(crate) fn summary(name: &str, v: &[f64]) -> serde_json::Value {
    let p50 = percentile(v, 50.0);
    let p99 = percentile(v, 99.0);
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "{name}: n={} p50={p50:.0} p99={p99:.0} max={max:.0}",
        v.len()
    );
    serde_json::json!({"n": v.len(), "p50": p50, "p99": p99, "max": max})
}

/// Waits until every other node is a synced standby in the leader's view.
pub(crate) async fn settle_standbys(
    c: &crate::cluster::Cluster,
    active: u64,
) -> anyhow::Result<()> {
    crate::harness::eventually(Duration::from_secs(30), "synced standbys", || async {
        let v = c.status(active).await?;
        let ok = v["nodes"].as_array().into_iter().flatten().all(|n| {
            n["id"] == active || (n["state"] == "Voting" && n["validator"]["synced"] == true)
        });
        Ok(ok.then_some(()))
    })
    .await
}
