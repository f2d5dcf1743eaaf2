//! A cluster at a chain's upgrade halt: in validator mode each host's
//! cosmovisor tree, in signer mode (`--cometbft`) each host's sentry
//! halting and coming back as CometBFT 1.x; `localnet upgrade-test`'s
//! scenarios, judged by the chain.
//!
//! Each host's node runs as `fakecosmovisor run` over a tree whose
//! binaries are small wrappers around the one `fakenode`: `genesis` runs
//! the chain's first version, `upgrades/NAME` (where the scenario installs
//! it) the upgraded one, with its migration or a crash. The chain halts at
//! the upgrade's height until a node of the new version signs it.
//!
//! The chain's other validators upgrade in
//! [`crate::shape::NETWORK_UPGRADE_MS`]: past that the chain makes blocks
//! without this one, as a chain where it holds less than a third of the
//! stake does.
//!
//! Owns: each scenario's hosts ([`crate::shape::Cosmovisor`] lays out
//! their trees), its faults, and its verdict from the chain's books (double
//! signs, who signed either side of the halt, heights missed after it, how
//! long it held) and from `keyraft check` before the height. Must not:
//! decide keyraft's behaviour, or know its internals.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterDir, Mode, NodeOpts};
use crate::shape::Cosmovisor;
use crate::upgrade::Upgrade;

/// One scenario: which host's tree is how, and what happens to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every host prepared.
    Prepared,
    /// One standby without the upgrade's binary.
    MissingBinary,
    /// The upgraded binary crashes on the active host only.
    CrashOnActive,
    /// The active host killed (SIGKILL of the whole host) during the halt.
    KillDuringHalt,
    /// The active host's migration takes longer than keyraft's unhealthy
    /// grace, while the standbys' are quick.
    SlowMigration,
    /// A chain without a halt (NEAR): a new node program rolled through
    /// the cluster with `keyraft upgrade --binary` (run by its own module).
    Rolling,
}

impl Scenario {
    /// Whether signer mode has it (a roll of node binaries is validator
    /// mode's).
    pub fn in_signer_mode(self) -> bool {
        self != Scenario::Rolling
    }
}

/// What the chain saw of one scenario, and whether that passes.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    /// `validator`, or `signer` (`--cometbft`).
    pub mode: &'static str,
    /// keyraft followed the upgrades (`--upgrades cosmovisor`).
    pub follows_upgrades: bool,
    pub double_signs: u64,
    /// The node that signed the height before the halt, and the first one
    /// that signed a height at or past it.
    pub signed_before: Option<u64>,
    pub signed_after: Option<u64>,
    /// 1 when those are two nodes: the key moved during the halt.
    pub handovers_during_halt: u64,
    /// The rest of the network passed the halt before this validator
    /// signed (`fakechain --network-upgrade-ms`).
    pub passed_by_network: bool,
    /// Heights missed in the 20 from the chain's first one after the halt
    /// (the upgrade's height if this validator signed it, else the next).
    pub missed_after_resume: u64,
    /// From the halt to this validator's first signature after it.
    pub resumed_ms: Option<u64>,
    /// Validator mode following upgrades: a standby's
    /// `keyraft_upgrade_halted{name}` was 1 during the halt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_metric: Option<bool>,
    /// `rolling`: how long `keyraft upgrade --binary` took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_ms: Option<u64>,
    /// `missing-binary`: `keyraft check` named the standby without the
    /// binary (exit 9) before the chain reached the upgrade's height.
    pub alert_before_height: Option<bool>,
    pub pass: bool,
    /// Why not, when it does not pass.
    pub failed: Vec<String>,
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
        (Scenario::Prepared | Scenario::KillDuringHalt | Scenario::Rolling, _)
        | (Scenario::MissingBinary, None) => return Ok(()),
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
/// Heights a clean restart of the node costs at most here (a restart
/// into a new binary, with a height watermark of one block on a
/// handover): the bound on `missed_after_resume`.
pub const CLEAN_RESTART_MISSED: u64 = 4;

/// Runs scenario `s` on three hosts and asks the chain; `follow`: keyraft
/// runs with `--upgrades cosmovisor` (without it, what keyraft did before
/// it followed upgrades is measured).
pub async fn run(s: Scenario, follow: bool) -> Result<Verdict> {
    anyhow::ensure!(
        s != Scenario::Rolling,
        "the rolling scenario has no halt: localnet's rolling module runs it"
    );
    let upgrade = Upgrade {
        // Chains name upgrades in any case ("Vega", "v7-Theta");
        // cosmovisor's directory for it is in lower case.
        name: "V2".into(),
        height: HALT_AT,
    };
    let mut dir = tempfile::Builder::new().prefix("keyraft-halt-").tempdir()?;
    if std::env::var_os("KEYRAFT_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test dir kept: {}", dir.path().display());
    }
    let mut c = Cluster::start_in_mode(
        ClusterDir::Temp(dir),
        3,
        BLOCK_MS,
        Mode::NearUpgrade(upgrade.clone()),
        |_| NodeOpts {
            cosmovisor: Some(QUICK),
            follow_upgrades: follow,
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
    let active = c.active().await.with_context(|| c.logs())?;
    arrange(&c, s, &upgrade, active)?;
    let alert_before_height = match s {
        Scenario::MissingBinary => Some(warned_before_height(&c, active, HALT_AT).await?),
        _ => None,
    };
    // A standby's metrics, from before the halt: does it say the chain
    // halted for the upgrade (`keyraft_upgrade_halted`)?
    let standby = c
        .nodes
        .keys()
        .copied()
        .find(|id| *id != active)
        .unwrap_or(active);
    let metric = format!("keyraft_upgrade_halted{{name=\"{}\"}} 1", upgrade.name);
    let halt_shown = watch_metrics(format!("http://{}/metrics", c.nodes[&standby].http), metric);
    let limit = Duration::from_millis(BLOCK_MS * (HALT_AT + 10));
    c.chain
        .wait_height(HALT_AT, limit)
        .await
        .with_context(|| c.logs())?;
    if s == Scenario::KillDuringHalt {
        c.kill_host(active)?;
    }
    // The chain resumes once the new version signs the halted height, or
    // the rest of the network upgraded: give this validator two minutes
    // to sign 20 heights past it.
    let _ = crate::harness::eventually(
        Duration::from_secs(120),
        "the chain to pass the upgrade",
        || async {
            let t = c.chain.totals().await?;
            Ok((t.height > HALT_AT + 21).then_some(t))
        },
    )
    .await;
    let mut v = judge(&c, s, &upgrade, follow).await?;
    v.alert_before_height = alert_before_height;
    v.halt_metric = follow.then_some(halt_shown.await.unwrap_or(false));
    v.failed = failures(s, &v, active);
    v.pass = v.failed.is_empty();
    tracing::info!(scenario = %v.name, pass = v.pass, failed = ?v.failed, "scenario over");
    Ok(v)
}

/// The chain's books after scenario `s`.
async fn judge(c: &Cluster, s: Scenario, upgrade: &Upgrade, follow: bool) -> Result<Verdict> {
    let stats = c.chain.stats_since(HALT_AT - 1).await?;
    let passed = stats.upgrades.iter().find(|p| &p.upgrade == upgrade);
    let by_network = passed.is_some_and(|p| p.by_network);
    let who = |h: u64| stats.signers.iter().find(|x| x.height == h).map(|x| x.node);
    let first_after = stats
        .signers
        .iter()
        .filter(|x| x.height >= HALT_AT)
        .min_by_key(|x| x.height)
        .map(|x| x.node);
    let (before, after) = (who(HALT_AT - 1), first_after);
    let resume = if by_network { HALT_AT + 1 } else { HALT_AT };
    Ok(Verdict {
        name: format!("{s:?}"),
        mode: "validator",
        follows_upgrades: follow,
        double_signs: stats.double_signs,
        signed_before: before,
        signed_after: after,
        handovers_during_halt: u64::from(before.is_some() && after.is_some() && before != after),
        passed_by_network: by_network,
        missed_after_resume: missed_from(&stats, resume),
        resumed_ms: passed.and_then(|p| p.signed_ms),
        roll_ms: None,
        halt_metric: None,
        alert_before_height: None,
        pass: false,
        failed: Vec::new(),
    })
}

/// Of the 20 heights from `first`, those nobody signed, as the chain's
/// window of signers shows them.
fn missed_from(stats: &crate::chain::Stats, first: u64) -> u64 {
    let signed: std::collections::BTreeSet<u64> = stats
        .signers
        .iter()
        .map(|x| x.height)
        .filter(|h| (first..first + 20).contains(h))
        .collect();
    20 - signed.len() as u64
}

/// Whether `keyraft check` on host `active` warned (exit 9) that a member
/// lacks the upgrade's binary, before the chain reached `height`.
async fn warned_before_height(c: &Cluster, active: u64, height: u64) -> Result<bool> {
    loop {
        let out = c.cli(active, &["check"]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.code() == Some(9) && text.contains("BINARY MISSING") {
            tracing::info!(check = %text.trim(), "warned before the height");
            return Ok(c.chain.totals().await?.height < height);
        }
        if c.chain.totals().await?.height >= height {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(BLOCK_MS)).await;
    }
}

/// What scenario `s` must show (docs/operations.md, "Upgrades"); empty
/// when it passes.
fn failures(s: Scenario, v: &Verdict, active: u64) -> Vec<String> {
    let stays = matches!(
        s,
        Scenario::Prepared | Scenario::SlowMigration | Scenario::MissingBinary
    );
    unmet(&[
        (v.double_signs == 0, "double signs"),
        (v.signed_after.is_some(), "nobody signed after the halt"),
        (
            v.missed_after_resume <= CLEAN_RESTART_MISSED,
            "more heights missed after the resume than a clean restart costs",
        ),
        (
            !stays || v.handovers_during_halt == 0,
            "the key moved during the halt",
        ),
        (
            !stays || !v.passed_by_network,
            "the network passed the halt first",
        ),
        (
            stays || v.signed_after.is_some_and(|n| n != active),
            "the key is not on an upgraded standby",
        ),
        (
            s != Scenario::MissingBinary || v.alert_before_height == Some(true),
            "no warning before the height",
        ),
        (
            v.halt_metric != Some(false),
            "no keyraft_upgrade_halted on a standby during the halt",
        ),
    ])
}

/// Polls the metrics page `url` for up to a minute, until a line is
/// `sample`; whether one was.
fn watch_metrics(url: String, sample: String) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < end {
            if let Ok(page) = async { reqwest::get(&url).await?.text().await }.await {
                if page.lines().any(|l| l == sample) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    })
}

/// The reasons among `checks` whose condition does not hold.
pub(crate) fn unmet(checks: &[(bool, &str)]) -> Vec<String> {
    checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, why)| why.to_string())
        .collect()
}

/// Signer mode: the upgrade the sentries halt for (`fakenode --v1-after`
/// names it `v1`), after this height is committed.
const SIGNER_HALT_AFTER: u64 = 20;

/// Runs scenario `s` in signer mode: three signers, each supervising a
/// sentry that halts once height [`SIGNER_HALT_AFTER`] is committed and,
/// started again, speaks CometBFT 1.x; the chain makes no round past the
/// first after it until the network upgraded. Node 1 leads when the chain
/// halts, and its sentry is the one the scenario concerns; in
/// `missing-binary` each sentry runs under `fakecosmovisor` (keyraft with
/// `--upgrades cosmovisor`) and node 2's tree lacks the upgrade.
pub async fn run_signer(s: Scenario) -> Result<Verdict> {
    anyhow::ensure!(s.in_signer_mode(), "{s:?} is a validator-mode scenario");
    let upgrade = Upgrade {
        name: "v1".into(),
        height: SIGNER_HALT_AFTER,
    };
    let homes = tempfile::tempdir()?;
    let dir = homes.path().to_path_buf();
    let mode = Mode::Signer {
        chain_id: "keyraft-upgrade-test".into(),
        round_every: 4,
        validators: 2,
        more_chains: 0,
        halt: Some(upgrade.clone()),
    };
    let cosmovisor = s == Scenario::MissingBinary;
    let mut c = Cluster::start_signers(3, BLOCK_MS, mode, |id| {
        let mut fakenode = vec!["--v1-after".to_string(), SIGNER_HALT_AFTER.to_string()];
        // Under cosmovisor the sentry's home is its tree's (the cluster's).
        if !cosmovisor {
            let home = dir.join(format!("sentry{id}")).display().to_string();
            fakenode.extend(["--home".into(), home]);
        }
        fakenode.push("--migration-ms".into());
        fakenode.push(match (s, id) {
            (Scenario::SlowMigration, 1) => (GRACE_MS * 3).to_string(),
            _ => QUICK.migration_ms.to_string(),
        });
        if (s, id) == (Scenario::CrashOnActive, 1) {
            fakenode.push("--crash-after-upgrade".into());
        }
        NodeOpts {
            flags: vec!["--protocol-version".into(), "either".into()],
            fakenode,
            cosmovisor: cosmovisor.then_some(Cosmovisor {
                prepared: id != 2,
                ..QUICK
            }),
            follow_upgrades: cosmovisor,
            ..NodeOpts::default()
        }
    })
    .await?;
    let before = lead_with(&c, 1).await?;
    let alert_before_height = match s {
        Scenario::MissingBinary => Some(warned_before_height(&c, 1, SIGNER_HALT_AFTER).await?),
        _ => None,
    };
    let limit = Duration::from_millis(BLOCK_MS * (SIGNER_HALT_AFTER + 10));
    c.chain
        .wait_height(SIGNER_HALT_AFTER + 1, limit)
        .await
        .with_context(|| c.logs())?;
    if s == Scenario::KillDuringHalt {
        c.kill_host(1)?;
    }
    let live: Vec<u64> = match s {
        Scenario::KillDuringHalt => vec![2, 3],
        _ => vec![1, 2, 3],
    };
    // Half-way through the halt: what the signers' watermark says.
    tokio::time::sleep(Duration::from_millis(crate::shape::NETWORK_UPGRADE_MS / 2)).await;
    let during = watermark(&c, &live).await;
    let _ = crate::harness::eventually(
        Duration::from_secs(120),
        "the chain to pass the upgrade",
        || async {
            let t = c.chain.totals().await?;
            Ok((t.height > SIGNER_HALT_AFTER + 21).then_some(t))
        },
    )
    .await;
    let after = c.agreed_leader(&live).await?.map(|(l, _)| l);
    let mut v = judge_signer(&c, s, &upgrade, (Some(before), after)).await?;
    v.alert_before_height = alert_before_height;
    v.failed = signer_failures(s, &v, during);
    v.pass = v.failed.is_empty();
    tracing::info!(scenario = %v.name, pass = v.pass, failed = ?v.failed, ?during, "signer scenario over");
    Ok(v)
}

/// Makes node `id` the Raft leader (the signer), by switchover if needed.
async fn lead_with(c: &Cluster, id: u64) -> Result<u64> {
    crate::harness::eventually(
        Duration::from_secs(30),
        &format!("node {id} to lead"),
        || async {
            match c.agreed_leader(&[1, 2, 3]).await? {
                Some((l, _)) if l == id => Ok(Some(l)),
                Some(_) => {
                    c.cli(id, &["switchover", "--to", &id.to_string()]).await?;
                    Ok(None)
                }
                None => Ok(None),
            }
        },
    )
    .await
    .with_context(|| c.logs())
}

/// The highest watermark height members in `ids` report (`None`: none
/// answered).
async fn watermark(c: &Cluster, ids: &[u64]) -> Option<u64> {
    let mut best = None;
    for &id in ids {
        if let Ok(v) = c.status(id).await {
            let h = v["signer"]["chains"][0]["watermark"]["height"].as_u64();
            best = best.max(h);
        }
    }
    best
}

/// The CometBFT judge's books after signer scenario `s`; `leaders` before
/// the halt and after it.
async fn judge_signer(
    c: &Cluster,
    s: Scenario,
    upgrade: &Upgrade,
    leaders: (Option<u64>, Option<u64>),
) -> Result<Verdict> {
    let first = SIGNER_HALT_AFTER + 1;
    let stats = c.chain.stats_since(first).await?;
    let passed = stats.upgrades.iter().find(|p| &p.upgrade == upgrade);
    Ok(Verdict {
        name: format!("{s:?}"),
        mode: "signer",
        follows_upgrades: true,
        double_signs: stats.double_signs,
        signed_before: leaders.0,
        signed_after: leaders.1,
        handovers_during_halt: u64::from(leaders.0 != leaders.1),
        passed_by_network: passed.is_some_and(|p| p.by_network),
        missed_after_resume: missed_from(&stats, first),
        resumed_ms: passed.and_then(|p| p.signed_ms),
        roll_ms: None,
        halt_metric: None,
        alert_before_height: None,
        pass: false,
        failed: Vec::new(),
    })
}

/// What signer scenario `s` must show: 0 equivocations, signing again at
/// the first height after the halt, the watermark not moved past it
/// during the halt, no handover (but for the killed leader), and no more
/// heights missed than a sentry's restart costs.
fn signer_failures(s: Scenario, v: &Verdict, during: Option<u64>) -> Vec<String> {
    let killed = s == Scenario::KillDuringHalt;
    unmet(&[
        (v.double_signs == 0, "equivocations"),
        (v.resumed_ms.is_some(), "nothing signed after the halt"),
        (
            v.missed_after_resume <= CLEAN_RESTART_MISSED,
            "more heights missed after the halt than a sentry's restart costs",
        ),
        (
            during.is_some_and(|h| h <= SIGNER_HALT_AFTER + 1),
            "the watermark moved past the halt during it (or nobody answered)",
        ),
        (
            !killed || v.signed_after.is_some_and(|l| l != 1),
            "no other signer leads after the killed one",
        ),
        (
            killed || v.handovers_during_halt == 0,
            "the signer changed during the halt",
        ),
        (
            s != Scenario::MissingBinary || v.alert_before_height == Some(true),
            "no warning before the height",
        ),
    ])
}
