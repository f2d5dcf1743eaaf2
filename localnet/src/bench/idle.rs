//! `localnet bench idle`: cold start to an agreed leader, and each idle
//! coordinator's RSS and CPU.

use std::time::{Duration, Instant};

use crate::harness::proc_usage;

use super::summary;

/// Cold starts: time from spawning three coordinators to a leader that all
/// agree on. Then the idle footprint of each coordinator over `seconds`.
pub async fn idle(starts: usize, seconds: u64) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, NodeOpts};
    let mut elections = Vec::new();
    for _ in 0..starts {
        let t0 = Instant::now();
        let c = Cluster::start(3, 500, |_| NodeOpts::default()).await?;
        crate::harness::eventually(Duration::from_secs(30), "a leader all agree on", || async {
            let mut leaders = std::collections::BTreeSet::new();
            for id in 1..=3 {
                match c
                    .status(id)
                    .await
                    .ok()
                    .and_then(|v| v["cluster"]["leader"].as_u64())
                {
                    Some(l) => leaders.insert(l),
                    None => return Ok(None),
                };
            }
            Ok((leaders.len() == 1).then_some(()))
        })
        .await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        println!("cold start to agreed leader: {ms:.0} ms");
        elections.push(ms);
    }
    let c = Cluster::start(3, 500, |_| NodeOpts::default()).await?;
    c.active().await?;
    // Let start-up work finish before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<(u64, i32)> = c
        .nodes
        .values()
        .filter_map(|n| n.proc.as_ref().map(|p| (n.id, p.pid())))
        .collect();
    let before: Vec<_> = pids
        .iter()
        .map(|(_, p)| proc_usage(*p))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t.elapsed().as_secs_f64();
    let mut nodes = Vec::new();
    for ((id, pid), b) in pids.iter().zip(before) {
        let a = proc_usage(*pid)?;
        let cpu = (a.cpu.as_secs_f64() - b.cpu.as_secs_f64()) / wall * 100.0;
        let state = c.own_state(*id).await.unwrap_or_default();
        println!(
            "node {id} ({state}): RSS {} KiB, CPU {cpu:.2}% of a core",
            a.rss_kib
        );
        nodes.push(serde_json::json!({"id": id, "state": state, "rss_kib": a.rss_kib, "cpu_percent": (cpu * 100.0).round() / 100.0}));
    }
    Ok(serde_json::json!({
        "bench": "idle",
        "election_ms": summary("cold start to leader (ms)", &elections),
        "idle_seconds": seconds,
        "nodes": nodes,
    }))
}
