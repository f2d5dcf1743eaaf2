//! `localnet bench latency`: a soak over links with latency and jitter.

use std::time::{Duration, Instant};

use super::{settle_standbys, summary};

pub struct LatencyBench {
    pub seconds: u64,
    pub latency: crate::proxy::Latency,
    pub timing: Option<String>,
    pub block_ms: u64,
}

/// A three-node cluster whose peer links all carry `latency` runs for
/// `seconds` after it settles: leader changes, fences, missed heights and
/// double signs, as the coordinators' metrics and the chain count them.
pub async fn latency(b: &LatencyBench) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, NodeOpts};
    let flags: Vec<String> = b
        .timing
        .iter()
        .flat_map(|t| ["--timing".to_string(), t.clone()])
        .collect();
    let c = Cluster::start(3, b.block_ms, |_| NodeOpts {
        flags: flags.clone(),
        ..NodeOpts::default()
    })
    .await?;
    let active = c.active().await?;
    settle_standbys(&c, active).await?;
    c.set_latency(b.latency);
    let c = &c;
    let counters = || async {
        let mut activations = 0.0;
        let mut deactivations = 0.0;
        for id in c.nodes.keys() {
            let m = c.metrics(*id).await?;
            activations += m.get("keyraft_activations_total").copied().unwrap_or(0.0);
            deactivations += m
                .iter()
                .filter(|(k, _)| k.starts_with("keyraft_deactivations_total"))
                .map(|(_, v)| v)
                .sum::<f64>();
        }
        anyhow::Ok((activations, deactivations))
    };
    let rtt = |id: u64| async move {
        let m = c.metrics(id).await?;
        anyhow::Ok(
            m.iter()
                .filter(|(k, _)| k.starts_with("keyraft_peer_rtt_seconds"))
                .map(|(_, v)| v * 1000.0)
                .fold(0.0, f64::max),
        )
    };
    let (a0, d0) = counters().await?;
    let before = c.chain.totals().await?;
    let start = Instant::now();
    let mut rtts = Vec::new();
    while start.elapsed() < Duration::from_secs(b.seconds) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rtts.push(rtt(active).await?);
    }
    let (a1, d1) = counters().await?;
    let after = c.chain.totals().await?;
    // With timings too tight for the latency, nobody may be validating.
    let still = c.active().await.ok();
    let totals = c.assert_no_double_signs().await?;
    let heights = after.height - before.height;
    let missed = after.missed - before.missed;
    println!(
        "latency {:?} +- {:?}, {} s: {heights} heights, {missed} missed, {} activations, {} deactivations, active node {active} -> {still:?}",
        b.latency.delay,
        b.latency.jitter,
        b.seconds,
        a1 - a0,
        d1 - d0
    );
    Ok(serde_json::json!({
        "bench": "latency",
        "latency_ms": b.latency.delay.as_millis() as u64,
        "jitter_ms": b.latency.jitter.as_millis() as u64,
        "timing": b.timing.clone().unwrap_or_else(|| "default".into()),
        "seconds": b.seconds,
        "heights": heights,
        "missed": missed,
        "activations": a1 - a0,
        "deactivations": d1 - d0,
        "leader_kept": still == Some(active),
        "peer_rtt_ms": summary("peer round trip seen by gossip (ms)", &rtts),
        "double_signs": totals.double_signs,
    }))
}
