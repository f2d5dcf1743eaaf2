//! What a run cost keyraft between two snapshots: each host's CPU and RSS,
//! and the Raft leader's commits, fsyncs and signatures (how many entries
//! and signatures one fsync carried: the group commit across chains).
//!
//! Owns: reading `/proc` for each keyraft process and its metrics, and the
//! arithmetic between two snapshots. Must not: judge; it reports.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::harness::proc_usage;

/// One moment of every running host: its CPU time so far and its RSS, and
/// its counters.
pub(crate) struct Snapshot {
    at: Instant,
    hosts: BTreeMap<u64, Host>,
}

struct Host {
    cpu: Duration,
    rss_kib: u64,
    /// Raft entries applied, log fsyncs, entries they made durable, and
    /// requests of this host's sentries answered with a signature.
    applied: f64,
    syncs: f64,
    synced: f64,
    signed: f64,
}

impl Snapshot {
    pub(crate) async fn take(c: &Cluster) -> anyhow::Result<Snapshot> {
        let mut hosts = BTreeMap::new();
        for (id, node) in &c.nodes {
            let Some(proc) = node.proc.as_ref() else {
                continue;
            };
            let usage = proc_usage(proc.pid())?;
            let m = c.metrics(*id).await?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
            let signed = m
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("keyraft_sign_requests_total{") && k.contains("result=\"signed\"")
                })
                .map(|(_, v)| v)
                .sum();
            hosts.insert(
                *id,
                Host {
                    cpu: usage.cpu,
                    rss_kib: usage.rss_kib,
                    applied: get("keyraft_raft_applied_index"),
                    syncs: get("keyraft_raft_log_syncs_total"),
                    synced: get("keyraft_raft_log_entries_synced_total"),
                    signed,
                },
            );
        }
        Ok(Snapshot {
            at: Instant::now(),
            hosts,
        })
    }
}

/// Prints and returns what each host cost from `a` to `b`, and what the
/// leader's fsyncs carried.
pub(crate) fn report(a: &Snapshot, b: &Snapshot, leader: u64) -> serde_json::Value {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let mut hosts = serde_json::Map::new();
    for (id, end) in &b.hosts {
        let Some(start) = a.hosts.get(id) else {
            continue;
        };
        let cpu = end.cpu.saturating_sub(start.cpu).as_secs_f64() / secs * 100.0;
        let role = if *id == leader { "leader" } else { "follower" };
        println!(
            "keyraft host {id} ({role}): {cpu:.1} % of a core, RSS {:.1} MB",
            end.rss_kib as f64 / 1024.0
        );
        hosts.insert(
            id.to_string(),
            serde_json::json!({"role": role, "cpu_percent": cpu, "rss_mb": end.rss_kib as f64 / 1024.0}),
        );
    }
    let (Some(start), Some(end)) = (a.hosts.get(&leader), b.hosts.get(&leader)) else {
        return serde_json::json!({ "hosts": hosts });
    };
    let syncs = end.syncs - start.syncs;
    let per_sync = |n: f64| if syncs > 0.0 { n / syncs } else { f64::NAN };
    // Every host's sentries are answered with the leader's signatures; the
    // leader's own sentries ask for each step once.
    let signatures = end.signed - start.signed;
    let commits = end.applied - start.applied;
    println!(
        "leader {leader}: {:.0} commits/s, {:.0} fsyncs/s, {:.1} entries and {:.1} of its sentries' signatures per fsync",
        commits / secs,
        syncs / secs,
        per_sync(end.synced - start.synced),
        per_sync(signatures)
    );
    serde_json::json!({
        "hosts": hosts,
        "leader_commits_per_s": commits / secs,
        "leader_fsyncs_per_s": syncs / secs,
        "leader_entries_per_fsync": per_sync(end.synced - start.synced),
        "leader_signatures_per_fsync": per_sync(signatures),
    })
}
