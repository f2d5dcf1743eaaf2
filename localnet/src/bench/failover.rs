//! `localnet bench failover`: kill the active host at a random point of
//! a block, repeatedly; the time to the first new signature, and where it
//! went (the failover budget).

use std::time::{Duration, Instant};

use crate::harness::Proc;

use super::{settle_standbys, summary};

/// Failover by SIGKILL of the active coordinator, and switchover, over
/// `rounds` each, measured by the chain.
pub async fn failover(
    rounds: usize,
    block_ms: u64,
    activate_by: &str,
    timing: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, NodeOpts};
    let mut flags = vec!["--activate-by".to_string(), activate_by.to_string()];
    if let Some(t) = timing {
        flags.extend(["--timing".to_string(), t.to_string()]);
    }
    let fakenode = if activate_by == "sighup" {
        vec!["--hot-reload".to_string()]
    } else {
        vec![]
    };
    let mut c = Cluster::start(3, block_ms, |_| NodeOpts {
        flags: flags.clone(),
        fakenode: fakenode.clone(),
        ..NodeOpts::default()
    })
    .await?;
    let mut kill_missed = Vec::new();
    let mut kill_wall = Vec::new();
    let mut budget: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..rounds {
        let old = c.active().await?;
        settle_standbys(&c, old).await?;
        // A fault strikes at any point of a block, not just after one
        // (where the loop above tends to leave us): a random phase.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..block_ms))).await;
        let before = c.chain.totals().await?;
        let t0 = Instant::now();
        c.kill_coordinator(old)?;
        let (new, _) = c.wait_signer(before.height + 1, &[old]).await?;
        let wall = t0.elapsed().as_secs_f64() * 1000.0;
        let missed = c.signing_gap(old, new).await?;
        println!("failover {round}: node {old} -> {new}: {missed} missed blocks, {wall:.0} ms to the first new signature");
        kill_missed.push((missed * block_ms) as f64);
        kill_wall.push(wall);
        // Where the time went, as the new holder logged it.
        if let Some(phases) = failover_budgets(c.proc(new)?).pop() {
            let took: f64 = phases.values().sum();
            for (k, v) in phases {
                budget.entry(k).or_default().push(v);
            }
            // The rest: from the validator's start to the chain's receipt
            // of its first signature, less the kill's head start on the
            // last heartbeat it sent.
            budget.entry("sign_ms").or_default().push(wall - took);
        }
        c.forget(old)?;
        c.spawn(old)?;
    }
    let mut switch_missed = Vec::new();
    for round in 0..rounds {
        let old = c.active().await?;
        settle_standbys(&c, old).await?;
        let before = c.chain.totals().await?;
        // The node that handed over last stands down for a moment; retry.
        let out = crate::harness::eventually(Duration::from_secs(10), "a switchover", || async {
            let out = c.cli(old, &["switchover"]).await?;
            Ok(out.status.success().then_some(out))
        })
        .await?;
        println!("{}", String::from_utf8_lossy(&out.stdout).trim());
        let (new, _) = c.wait_signer(before.height, &[old]).await?;
        let missed = c.signing_gap(old, new).await?;
        println!("switchover {round}: node {old} -> {new}: {missed} missed blocks");
        switch_missed.push(missed as f64);
    }
    let totals = c.assert_no_double_signs().await?;
    Ok(serde_json::json!({
        "bench": "failover",
        "activate_by": activate_by,
        "block_ms": block_ms,
        "failover_ms_by_missed_blocks": summary("failover (missed blocks x block time, ms)", &kill_missed),
        "failover_ms_wall": summary("failover (kill to first new signature, ms)", &kill_wall),
        "failover_budget_ms": budget
            .iter()
            .map(|(k, v)| (k.to_string(), summary(&format!("  of which {k}"), v)))
            .collect::<serde_json::Map<_, _>>(),
        "switchover_missed_blocks": summary("switchover (missed blocks)", &switch_missed),
        "double_signs": totals.double_signs,
    }))
}

/// The phases of a failover the new holder logs with "failover complete"
/// (see keyraft's coordinator): leader silent until elected (lease, jitter,
/// election), Activate committed, handover delay, waiting for a height the
/// old validator cannot have signed, validator (re)started.
pub const BUDGET: [&str; 6] = [
    "silent_ms",
    "fence_ms",
    "commit_ms",
    "hold_ms",
    "height_ms",
    "start_ms",
];

/// Every failover a coordinator's log records, oldest first: its phases
/// in milliseconds (see [`BUDGET`]).
pub fn failover_budgets(p: &Proc) -> Vec<std::collections::BTreeMap<&'static str, f64>> {
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("failover complete"))
        .map(|line| {
            BUDGET
                .iter()
                .filter_map(|f| Some((*f, log_field(line, f)?)))
                .collect()
        })
        .collect()
}

/// `name=123` in a text log line.
fn log_field(line: &str, name: &str) -> Option<f64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}
