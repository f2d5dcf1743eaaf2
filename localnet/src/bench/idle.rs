//! `localnet bench idle`: cold start to an agreed leader, and each idle
//! coordinator's RSS and CPU, its guard process's CPU counted with it;
//! with `--chains N`, also three signer hosts with N chains configured and
//! nothing to sign.

use std::time::{Duration, Instant};

use crate::harness::proc_usage;

use super::summary;
use super::usage::{self, Snapshot};

/// Rounds of the signer idle run's chains: after each chain's first, none
/// opens while it is measured, so its sentries only ping.
const IDLE_ROUND_MS: u64 = 3_600_000;

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
    let guards: Vec<Option<i32>> = pids.iter().map(|(_, p)| guard_of(*p)).collect();
    let cpu_of = |pid: Option<i32>| -> anyhow::Result<Duration> {
        Ok(match pid {
            Some(p) => proc_usage(p)?.cpu,
            None => Duration::ZERO,
        })
    };
    let before: Vec<_> = pids
        .iter()
        .zip(&guards)
        .map(|((_, p), g)| Ok::<_, anyhow::Error>((proc_usage(*p)?.cpu, cpu_of(*g)?)))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t.elapsed().as_secs_f64();
    let percent = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) / wall * 100.0;
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let mut nodes = Vec::new();
    for (((id, pid), g), (b, gb)) in pids.iter().zip(&guards).zip(before) {
        let a = proc_usage(*pid)?;
        let cpu = percent(a.cpu, b);
        let guard_cpu = percent(cpu_of(*g)?, gb);
        let state = c.own_state(*id).await.unwrap_or_default();
        println!(
            "node {id} ({state}): RSS {} KiB, CPU {:.2}% of a core (coordinator {cpu:.2}%, guard {guard_cpu:.2}%)",
            a.rss_kib,
            cpu + guard_cpu
        );
        nodes.push(serde_json::json!({
            "id": id,
            "state": state,
            "rss_kib": a.rss_kib,
            "cpu_percent": round(cpu + guard_cpu),
            "coordinator_cpu_percent": round(cpu),
            "guard_cpu_percent": round(guard_cpu),
        }));
    }
    Ok(serde_json::json!({
        "bench": "idle",
        "election_ms": summary("cold start to leader (ms)", &elections),
        "idle_seconds": seconds,
        "nodes": nodes,
    }))
}

/// Signer mode at rest: three signer hosts with `chains` chains configured
/// (a key, a judge and a sentry on every host each), every privval
/// connection up, no round open; each host's CPU and RSS over `seconds`.
pub async fn signer_idle(chains: u64, seconds: u64) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, Mode, NodeOpts};
    anyhow::ensure!(
        (1..=super::signer::MAX_CHAINS).contains(&chains),
        "--chains must be 1 to {}",
        super::signer::MAX_CHAINS
    );
    let mode = Mode::Signer {
        chain_id: "bench-idle".into(),
        round_every: 0,
        validators: 4,
        more_chains: chains - 1,
        halt: None,
    };
    let c = Cluster::start_signers(3, IDLE_ROUND_MS, mode, |_| NodeOpts {
        direct_peers: true,
        ..NodeOpts::default()
    })
    .await?;
    // Every host connected to its sentry of every chain.
    crate::harness::eventually(
        Duration::from_secs(60),
        "every privval connection up",
        || async {
            for id in c.nodes.keys() {
                let up: f64 = c
                    .metrics(*id)
                    .await?
                    .iter()
                    .filter(|(k, _)| k.starts_with("keyraft_privval_connected{"))
                    .map(|(_, v)| v)
                    .sum();
                if up < chains as f64 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    // Let the first round's signatures and their commits finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = Snapshot::take(&c).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = Snapshot::take(&c).await?;
    let leader = c.status(1).await?["cluster"]["leader"]
        .as_u64()
        .unwrap_or(0);
    println!("signer mode, {chains} chains configured, nothing to sign:");
    Ok(usage::report(&before, &after, leader))
}

/// The coordinator's guard process (`keyraft-guard`, its child), if found.
fn guard_of(coordinator: i32) -> Option<i32> {
    let parent = coordinator.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (name, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
        let ppid = rest.split_whitespace().nth(1)?;
        (name == "keyraft-guard" && ppid == parent).then_some(pid)
    })
}
