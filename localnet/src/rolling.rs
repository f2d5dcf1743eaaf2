//! `localnet upgrade-test --scenario rolling`: a new node program rolled
//! through a NEAR-style cluster with `keyraft upgrade --binary` (a chain
//! without an upgrade halt), judged by the chain.
//!
//! The new program is a wrapper around the same `fakenode` that signs as
//! another software version (the chain records which version each node
//! last signed with) and, the first time it runs in a home, migrates for
//! a while (reporting syncing), as a node restarted into a new binary may.
//!
//! Owns: the scenario's cluster, the wrapper, the roll, and its verdict
//! (double signs, heights missed while it ran, the version and host that
//! sign after it, what each host's node runs). Must not: know keyraft's
//! internals: it reads `keyraft status --json` and the chain only.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::{Cluster, NodeOpts};
use crate::halt::Verdict;

/// The version the rolled program signs as.
pub const ROLLED: &str = "rolled";
const BLOCK_MS: u64 = 500;
/// How long the rolled program migrates the first time it runs in a home.
const MIGRATION_MS: u64 = 2000;
/// Heights a switchover may cost (docs/benchmarks.md: 0 at p50, 1 at p99):
/// the bound on heights missed during the roll.
pub const SWITCHOVER_MISSED: u64 = 1;

/// Rolls a new program through three hosts and asks the chain.
pub async fn run() -> Result<Verdict> {
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    let program = c.dir.path().join("node-v2/fakenode");
    write_wrapper(&program)?;
    c.chain
        .wait_height(10, Duration::from_secs(30))
        .await
        .with_context(|| c.logs())?;
    let active = c.active().await.with_context(|| c.logs())?;
    let from = c.chain.totals().await?.height;
    let started = std::time::Instant::now();
    let out = c
        .cli(
            active,
            &[
                "upgrade",
                "--binary",
                &program.to_string_lossy(),
                "--timeout",
                "120",
            ],
        )
        .await?;
    let roll_ms = started.elapsed().as_millis() as u64;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    tracing::info!(roll_ms, "keyraft upgrade --binary said:\n{}", said.trim());
    // Ten heights signed after the roll, then the chain's books.
    let to = c.chain.totals().await?.height;
    c.chain
        .wait_height(to + 10, Duration::from_secs(30))
        .await
        .with_context(|| c.logs())?;
    let stats = c.chain.stats_since(from).await?;
    let last = stats
        .signers
        .iter()
        .max_by_key(|s| s.height)
        .map(|s| s.node);
    let signed: std::collections::BTreeSet<u64> = stats.signers.iter().map(|s| s.height).collect();
    let missed = (from..to + 10).filter(|h| !signed.contains(h)).count() as u64;
    let status = c.status(active).await?;
    let everywhere = status["nodes"].as_array().into_iter().flatten().all(|n| {
        n["binary"].as_str() == Some(&*program.to_string_lossy())
            && n["validator"]["synced"] == true
    });
    let version = last.and_then(|n| stats.versions.get(&n)).cloned();
    let mut v = Verdict {
        name: "Rolling".into(),
        mode: "validator",
        follows_upgrades: false,
        double_signs: stats.double_signs,
        signed_before: Some(active),
        signed_after: last,
        handovers_during_halt: 0,
        passed_by_network: false,
        missed_after_resume: missed,
        resumed_ms: None,
        roll_ms: Some(roll_ms),
        halt_metric: None,
        alert_before_height: None,
        pass: false,
        failed: Vec::new(),
    };
    v.failed = crate::halt::unmet(&[
        (out.status.success(), "keyraft upgrade --binary failed"),
        (v.double_signs == 0, "double signs"),
        (
            missed <= SWITCHOVER_MISSED,
            "more heights missed than a switchover costs",
        ),
        (
            version.as_deref() == Some(ROLLED),
            "the validating node does not sign as the rolled version",
        ),
        (
            last.is_some_and(|n| n != active),
            "the key did not move to an upgraded standby first",
        ),
        (
            everywhere,
            "not every host's node runs the rolled program, synced",
        ),
    ]);
    v.pass = v.failed.is_empty();
    tracing::info!(pass = v.pass, failed = ?v.failed, missed, ?version, "rolling scenario over");
    Ok(v)
}

/// The new program: the same fakenode, signing as [`ROLLED`] after a
/// first-run migration of [`MIGRATION_MS`].
fn write_wrapper(program: &std::path::Path) -> Result<()> {
    let fakenode = crate::harness::sibling_bin("fakenode")?;
    let dir = program.parent().context("the program has no directory")?;
    std::fs::create_dir_all(dir)?;
    let script = format!(
        "#!/bin/sh\nexec {} --chain-version {ROLLED} --migration-ms {MIGRATION_MS} \"$@\"\n",
        fakenode.display()
    );
    std::fs::write(program, script)?;
    std::fs::set_permissions(program, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
