//! A validator cluster at a chain's upgrade halt: each host's cosmovisor
//! tree, and `localnet upgrade-test`'s scenarios, judged by the chain.
//!
//! Each host's node runs as `fakecosmovisor run` over a tree whose
//! binaries are small wrappers around the one `fakenode`: `genesis` runs
//! the chain's first version, `upgrades/NAME` (where the scenario installs
//! it) the upgraded one, with its migration or a crash. The chain halts at
//! the upgrade's height until a node of the new version signs it.
//!
//! Owns: each scenario's hosts ([`crate::shape::Cosmovisor`] lays out
//! their trees) and its verdict from the chain's books (double signs, who signed
//! either side of the halt, heights missed after it, how long it held).
//! Must not: decide keyraft's behaviour, or know its internals.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterDir, Mode, NodeOpts};
use crate::shape::Cosmovisor;
use crate::upgrade::Upgrade;

/// One scenario: which host's tree is how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every host prepared.
    Prepared,
    /// One standby without the upgrade's binary.
    MissingBinary,
    /// The upgraded binary crashes on the active host only.
    CrashOnActive,
    /// The active host's migration takes longer than keyraft's unhealthy
    /// grace, while the standbys' are quick.
    SlowMigration,
}

/// What the chain saw of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub double_signs: u64,
    /// The node that signed the height before the halt, and the one that
    /// signed the halted height (the new version's first).
    pub signed_before: Option<u64>,
    pub signed_after: Option<u64>,
    /// 1 when those are two nodes: the key moved during the halt.
    pub handovers_during_halt: u64,
    /// Heights missed from the halted height on, for 20 heights.
    pub missed_after_resume: u64,
    /// How long the chain held at the halt, until the new version signed.
    pub resumed_ms: Option<u64>,
}

/// Every host's tree at start: prepared, with a quick migration.
const QUICK: Cosmovisor = Cosmovisor {
    prepared: true,
    migration_ms: 500,
    crashes: false,
};

/// Makes scenario `s` of the cluster whose node `active` validates: the
/// trees of the hosts it concerns laid out again, before the halt.
fn arrange(c: &Cluster, s: Scenario, upgrade: &Upgrade, active: u64) -> Result<()> {
    let standby = c.nodes.keys().copied().find(|id| *id != active);
    let (id, tree) = match (s, standby) {
        (Scenario::Prepared, _) | (Scenario::MissingBinary, None) => return Ok(()),
        (Scenario::MissingBinary, Some(id)) => {
            let dir = c.nodes[&id].home.join("cosmovisor/upgrades");
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
            return Ok(());
        }
        (Scenario::CrashOnActive, _) => (
            active,
            Cosmovisor {
                crashes: true,
                ..QUICK
            },
        ),
        (Scenario::SlowMigration, _) => (
            active,
            Cosmovisor {
                migration_ms: GRACE_MS * 3,
                ..QUICK
            },
        ),
    };
    crate::shape::lay_out(&c.nodes[&id].home, upgrade, tree)
}

/// keyraft's `--unhealthy-grace` in these runs.
const GRACE_MS: u64 = 3000;
const BLOCK_MS: u64 = 500;
/// Heights before the halt: long enough for the cluster to settle.
const HALT_AT: u64 = 30;

/// Runs scenario `s` on three hosts and asks the chain.
pub async fn run(s: Scenario) -> Result<Verdict> {
    let upgrade = Upgrade {
        name: "v2".into(),
        height: HALT_AT,
    };
    let mut dir = tempfile::Builder::new().prefix("keyraft-halt-").tempdir()?;
    if std::env::var_os("KEYRAFT_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test dir kept: {}", dir.path().display());
    }
    let c = Cluster::start_in_mode(
        ClusterDir::Temp(dir),
        3,
        BLOCK_MS,
        Mode::NearUpgrade(upgrade.clone()),
        |_| NodeOpts {
            cosmovisor: Some(QUICK),
            flags: vec!["--unhealthy-grace".into(), format!("{GRACE_MS}ms")],
            ..NodeOpts::default()
        },
    )
    .await?;
    // The node that validates, once the cluster settled: the scenario is
    // arranged around it.
    c.chain
        .wait_height(10, Duration::from_secs(30))
        .await
        .with_context(|| c.logs())?;
    let active = c
        .chain
        .stats_since(0)
        .await?
        .signers
        .iter()
        .max_by_key(|x| x.height)
        .map(|x| x.node)
        .context("nobody validates ten heights in")?;
    arrange(&c, s, &upgrade, active)?;
    let limit = Duration::from_millis(BLOCK_MS * (HALT_AT + 10));
    c.chain
        .wait_height(HALT_AT, limit)
        .await
        .with_context(|| c.logs())?;
    // The chain resumes once the new version signs the halted height, or
    // stays halted: give it two minutes.
    let started = Instant::now();
    let resumed = crate::harness::eventually(
        Duration::from_secs(120),
        "the chain to pass the upgrade",
        || async {
            let t = c.chain.totals().await?;
            Ok((t.height > HALT_AT + 20).then_some(t))
        },
    )
    .await;
    let stats = c.chain.stats_since(HALT_AT - 1).await?;
    let who = |h: u64| stats.signers.iter().find(|x| x.height == h).map(|x| x.node);
    let (before, after) = (who(HALT_AT - 1), who(HALT_AT));
    let signed_after_halt = stats
        .signers
        .iter()
        .map(|x| x.height)
        .filter(|h| (HALT_AT..HALT_AT + 20).contains(h))
        .collect::<std::collections::BTreeSet<u64>>()
        .len() as u64;
    let name = format!("{s:?}");
    tracing::info!(scenario = %name, ?before, ?after, resumed = resumed.is_ok(), waited_ms = started.elapsed().as_millis() as u64, "scenario over");
    Ok(Verdict {
        name,
        double_signs: stats.double_signs,
        signed_before: before,
        signed_after: after,
        handovers_during_halt: u64::from(before.is_some() && after.is_some() && before != after),
        missed_after_resume: 20 - signed_after_halt,
        resumed_ms: stats
            .upgrades
            .iter()
            .find(|p| p.upgrade == upgrade)
            .map(|p| p.halted_ms),
    })
}
