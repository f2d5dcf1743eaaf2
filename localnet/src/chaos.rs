//! `localnet chaos`: seeded rounds of real faults against a local cluster,
//! each judged by the fake chain.
//!
//! Owns: the fault catalogue, the schedule (a seeded RNG, so a run can be
//! replayed), waiting for the cluster to settle before and after each fault,
//! and the JSON summary. Must not: hide a fault's outcome; the whole-host
//! freeze, which user space alone cannot make safe (docs/safety.md,
//! "Residual risks"), is reported in its own category unless every
//! validator host has its kernel fence on (each node's `status` says so)
//! or fence agents power frozen hosts off (`--fence-agents`).
//! With `--cometbft` the cluster runs in signer mode (three signers, each
//! with a sentry): "active" is the signer leader, a failover is every other
//! sentry signing again, and the whole-host freeze is no longer a residual
//! risk either (a thawed leader cannot commit, so it cannot sign).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::bench::{failover_budgets, percentile, BUDGET};
use crate::cluster::{Cluster, ClusterDir, Fencing, Mode, NodeOpts};
use crate::harness::{eventually, get_json, node_entry};

/// What closes the whole-host freeze in this run: signer mode, or the
/// kernel fence on every validator host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Covered {
    pub signer: bool,
    pub kernel_fence: bool,
    /// Fence agents power a frozen host off before its successor starts.
    pub fence_agents: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Fault {
    KillActiveHost,
    KillActiveCoordinator,
    FreezeActiveCoordinator,
    FreezeActiveHost,
    PartitionActive,
    PartitionStandby,
    PartitionWitness,
    CrashActiveValidator,
    Flap,
    /// SIGSTOP of the active node's guard, then `keyraft switchover`.
    FreezeActiveGuard,
    /// SIGKILL of the active node's guard, then the active node cut off.
    KillActiveGuard,
    /// SIGSTOP of the active node's coordinator and guard while its
    /// validator runs on.
    FreezeActiveKeyraft,
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::KillActiveHost,
        Fault::KillActiveCoordinator,
        Fault::FreezeActiveCoordinator,
        Fault::FreezeActiveHost,
        Fault::PartitionActive,
        Fault::PartitionStandby,
        Fault::PartitionWitness,
        Fault::CrashActiveValidator,
        Fault::Flap,
        Fault::FreezeActiveGuard,
        Fault::KillActiveGuard,
        Fault::FreezeActiveKeyraft,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillActiveHost => "kill_active_host",
            Fault::KillActiveCoordinator => "kill_active_coordinator",
            Fault::FreezeActiveCoordinator => "freeze_active_coordinator",
            Fault::FreezeActiveHost => "freeze_active_host",
            Fault::PartitionActive => "partition_active",
            Fault::PartitionStandby => "partition_standby",
            Fault::PartitionWitness => "partition_witness",
            Fault::CrashActiveValidator => "crash_active_validator",
            Fault::Flap => "flap",
            Fault::FreezeActiveGuard => "freeze_active_guard",
            Fault::KillActiveGuard => "kill_active_guard",
            Fault::FreezeActiveKeyraft => "freeze_active_keyraft",
        }
    }

    /// Faults user space alone cannot make safe: guard and validator freeze
    /// and thaw together, and the validator may sign before the guard kills
    /// it; or coordinator and guard stall while the validator runs on. Not in signer mode, where the signature itself is fenced, nor
    /// with the kernel fence on, which drops the thawed validator's packets,
    /// nor with fence agents, which power the frozen host off first.
    pub fn residual_risk(self, covered: Covered) -> bool {
        matches!(self, Fault::FreezeActiveHost | Fault::FreezeActiveKeyraft)
            && !covered.signer
            && !covered.kernel_fence
            && !covered.fence_agents
    }

    /// Whether the fault makes sense in signer mode (no witness, no guard
    /// holding a keyed validator).
    pub fn in_signer_mode(self) -> bool {
        !matches!(
            self,
            Fault::PartitionWitness
                | Fault::FreezeActiveGuard
                | Fault::KillActiveGuard
                | Fault::FreezeActiveKeyraft
        )
    }
}

pub struct ChaosOptions {
    pub rounds: usize,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    pub block_ms: u64,
    pub faults: Vec<Fault>,
    /// Signer mode (CometBFT), judged by equivocations.
    pub cometbft: bool,
    /// Signer mode: chains signed for at once, each judged by its own
    /// fake chain.
    pub chains: u64,
    /// Busy-looping processes kept running through every round.
    pub load: usize,
    /// Fence agents (`fakefence`) on the validator hosts.
    pub fence_agents: bool,
}

struct RoundResult {
    fault: Fault,
    failover_ms: Option<f64>,
    missed: u64,
    double_signs: u64,
    /// Where the failover's time went, as the new holder logged it.
    budget: Option<BTreeMap<&'static str, f64>>,
}

/// How many failovers each node's log has recorded so far.
fn budgets_logged(c: &Cluster) -> BTreeMap<u64, usize> {
    (1..=NODES)
        .filter_map(|id| Some((id, failover_budgets(c.proc(id).ok()?).len())))
        .collect()
}

/// Nodes: 1 and 2 validate, 3 is a witness.
const NODES: u64 = 3;
const WITNESS: u64 = 3;
const SETTLE: Duration = Duration::from_secs(60);

pub async fn run(o: ChaosOptions) -> Result<(serde_json::Value, bool)> {
    let dir = match &o.dir {
        Some(d) => {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
            ClusterDir::Kept(d.clone())
        }
        None => ClusterDir::Temp(
            tempfile::Builder::new()
                .prefix("keyraft-chaos-")
                .tempdir()?,
        ),
    };
    let faults: Vec<Fault> = if o.faults.is_empty() {
        Fault::ALL
            .into_iter()
            .filter(|f| !o.cometbft || f.in_signer_mode())
            .collect()
    } else {
        o.faults.clone()
    };
    if let Some(f) = faults.iter().find(|f| o.cometbft && !f.in_signer_mode()) {
        anyhow::bail!(
            "{} does not apply in signer mode (no witness, no keyed validator)",
            f.name()
        );
    }
    if !(1..=5).contains(&o.chains) || (o.chains > 1 && !o.cometbft) {
        anyhow::bail!("--chains must be 1 to 5, and only with --cometbft");
    }
    let mut rng = StdRng::seed_from_u64(o.seed);
    let mut c = if o.cometbft {
        let mode = Mode::Signer {
            chain_id: "chaos-1".into(),
            round_every: 5,
            validators: 3,
            more_chains: o.chains - 1,
            halt: None,
        };
        let c =
            Cluster::start_in_mode(dir, NODES, o.block_ms, mode, |_| NodeOpts::default()).await?;
        c.never_signed().await?;
        c
    } else {
        Cluster::start_in(dir, NODES, o.block_ms, |id| NodeOpts {
            witness: id == WITNESS,
            fencing: if o.fence_agents {
                Fencing::Fakefence
            } else {
                Fencing::None
            },
            ..NodeOpts::default()
        })
        .await?
    };
    let _load = (0..o.load)
        .map(|i| {
            crate::harness::Proc::spawn(
                &format!("load{i}"),
                std::process::Command::new("sh").args(["-c", "while :; do :; done"]),
                c.dir.path(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    settle(&mut c)
        .await
        .context("the cluster did not settle at start")?;
    let covered = Covered {
        signer: o.cometbft,
        kernel_fence: !o.cometbft && kernel_fence_everywhere(&c).await?,
        fence_agents: o.fence_agents,
    };
    println!(
        "chaos: {} rounds, seed {}, {} busy processes, kernel fence {}, fence agents {}, cluster in {}",
        o.rounds,
        o.seed,
        o.load,
        if covered.kernel_fence { "on" } else { "off" },
        if o.fence_agents { "on" } else { "off" },
        c.dir.path().display()
    );
    let mut results = Vec::new();
    let at_start = every_chain(&c).await?;
    for round in 0..o.rounds {
        let fault = faults[rng.random_range(0..faults.len())];
        let before = c.chain.totals().await?;
        let doubles_before = every_chain(&c).await?;
        let logged = budgets_logged(&c);
        let failover_ms = inject(&mut c, fault, &mut rng, o.block_ms)
            .await
            .with_context(|| format!("round {round}: {}", fault.name()))?;
        settle(&mut c).await.with_context(|| {
            format!(
                "round {round}: the cluster did not settle after {}",
                fault.name()
            )
        })?;
        let after = c.chain.totals().await?;
        let doubles_after = every_chain(&c).await?;
        let mut budget = None;
        if failover_ms.is_some() && !signer_mode(&c) {
            let now = active(&c).await?;
            let mut all = failover_budgets(c.proc(now)?);
            if all.len() > logged.get(&now).copied().unwrap_or(0) {
                budget = all.pop();
            }
        }
        let r = RoundResult {
            fault,
            failover_ms,
            missed: after.missed - before.missed,
            double_signs: doubles_after
                .iter()
                .zip(&doubles_before)
                .map(|((_, a), (_, b))| a.double_signs - b.double_signs)
                .sum(),
            budget,
        };
        println!(
            "round {round:>3}: {:<26} failover {:>6}  missed {:>3}  double signs {}",
            fault.name(),
            r.failover_ms
                .map_or("-".to_string(), |ms| format!("{ms:.0}ms")),
            r.missed,
            r.double_signs
        );
        results.push(r);
    }
    let (mut summary, clean) = summarize(&results, covered);
    // Each chain judged on its own: what it signed, missed and saw
    // signed twice over the whole run.
    let at_end = every_chain(&c).await?;
    summary["chains"] = json!(at_end.len());
    summary["per_chain"] = at_end
        .iter()
        .zip(&at_start)
        .map(|((chain, e), (_, s))| {
            (
                chain.clone(),
                json!({
                    "signed": e.signed - s.signed,
                    "missed": e.missed - s.missed,
                    "double_signs": e.double_signs - s.double_signs,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    // Hosts the agents confirmed off, as the new holders logged it.
    summary["fenced"] = json!((1..=NODES)
        .filter_map(|id| c.proc(id).ok())
        .map(|p| p.log_text().matches("confirmed node").count())
        .sum::<usize>());
    Ok((summary, clean))
}

/// Every chain's judge's totals, by chain id.
async fn every_chain(c: &Cluster) -> Result<Vec<(String, crate::chain::Stats)>> {
    let mut all = Vec::new();
    for (chain, judge) in c.judges() {
        all.push((chain.to_string(), judge.totals().await?));
    }
    Ok(all)
}

/// Whether every validator host says its kernel fence is on.
async fn kernel_fence_everywhere(c: &Cluster) -> Result<bool> {
    for id in 1..=NODES {
        let status = c.status(id).await?;
        let me = node_entry(&status, id);
        if me["role"] == "validator" && me["kernel_fence"] != "on" {
            return Ok(false);
        }
    }
    Ok(true)
}

fn signer_mode(c: &Cluster) -> bool {
    matches!(c.mode, Mode::Signer { .. })
}

/// The node whose loss is a failover: the validating node, or in signer
/// mode the Raft leader (which signs).
async fn active(c: &Cluster) -> Result<u64> {
    if !signer_mode(c) {
        return c.active().await;
    }
    eventually(SETTLE, "a signer leader", || async {
        for id in 1..=NODES {
            if let Ok(v) = get_json(&format!("http://{}/status", c.nodes[&id].http)).await {
                if let Some(l) = v["cluster"]["leader"].as_u64() {
                    return Ok(Some(l));
                }
            }
        }
        Ok(None)
    })
    .await
}

/// Injects `fault`, waits for its effect, restores the cluster. Returns the
/// failover time if the signer changed: from the fault to the first new
/// signature, or for a flap (many faults) from the chain's signing gap.
async fn inject(
    c: &mut Cluster,
    fault: Fault,
    rng: &mut StdRng,
    block_ms: u64,
) -> Result<Option<f64>> {
    let signer = signer_mode(c);
    let active = active(c).await?;
    let standby = (1..=NODES)
        .find(|i| *i != active && (signer || *i != WITNESS))
        .unwrap_or(1);
    let at = c.chain.totals().await?.height;
    let t0 = Instant::now();
    let ms = match fault {
        Fault::KillActiveHost => {
            c.kill_host(active)?;
            let ms = failover(c, at, active, t0).await?;
            c.spawn(active)?;
            Some(ms)
        }
        Fault::KillActiveCoordinator => {
            c.kill_coordinator(active)?;
            let ms = failover(c, at, active, t0).await?;
            c.forget(active)?;
            c.spawn(active)?;
            Some(ms)
        }
        Fault::FreezeActiveCoordinator | Fault::FreezeActiveHost => {
            let host = fault == Fault::FreezeActiveHost;
            c.freeze(active, host, true)?;
            let ms = failover(c, at, active, t0).await?;
            tokio::time::sleep(Duration::from_millis(500 + rng.random_range(0..1000))).await;
            c.freeze(active, host, false)?;
            Some(ms)
        }
        Fault::PartitionActive => {
            c.isolate(active);
            let ms = failover(c, at, active, t0).await?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
            c.heal();
            Some(ms)
        }
        Fault::PartitionStandby | Fault::PartitionWitness => {
            let victim = if fault == Fault::PartitionWitness {
                WITNESS
            } else {
                standby
            };
            c.isolate(victim);
            tokio::time::sleep(Duration::from_millis(2000 + rng.random_range(0..1000))).await;
            c.heal();
            None
        }
        Fault::CrashActiveValidator if signer => {
            // The leader's sentry dies: the other sentries keep signing.
            c.kill_validator(active)?;
            c.wait_signer(at + 1, &[active]).await?;
            None
        }
        Fault::CrashActiveValidator => {
            c.kill_validator(active)?;
            let (new, _) = c.wait_signer(at + 1, &[]).await?;
            (new != active).then(|| t0.elapsed().as_secs_f64() * 1000.0)
        }
        Fault::FreezeActiveGuard => {
            let guard = c.guard_pid(active).context("no guard process")?;
            signal(guard, Signal::SIGSTOP)?;
            // The operator's switchover, retried while the cluster is between
            // states (the coordinator replaces a guard that stopped answering).
            eventually(
                Duration::from_secs(20),
                "a switchover the leader accepts",
                || async {
                    Ok(c.cli(active, &["switchover"])
                        .await?
                        .status
                        .success()
                        .then_some(()))
                },
            )
            .await?;
            let ms = failover(c, at, active, t0).await?;
            let _ = signal(guard, Signal::SIGCONT);
            Some(ms)
        }
        Fault::FreezeActiveKeyraft => {
            let guard = c.guard_pid(active).context("no guard process")?;
            c.freeze(active, false, true)?;
            signal(guard, Signal::SIGSTOP)?;
            let ms = failover(c, at, active, t0).await?;
            tokio::time::sleep(Duration::from_millis(500 + rng.random_range(0..1000))).await;
            let _ = signal(guard, Signal::SIGCONT);
            c.freeze(active, false, false)?;
            Some(ms)
        }
        Fault::KillActiveGuard => {
            let guard = c.guard_pid(active).context("no guard process")?;
            signal(guard, Signal::SIGKILL)?;
            c.isolate(active);
            let ms = failover(c, at, active, t0).await?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
            c.heal();
            Some(ms)
        }
        Fault::Flap => {
            for _ in 0..6 {
                c.isolate(active);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
                c.heal();
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
            }
            // The faults span seconds, so the time since the first one says
            // little: the chain's signing gap, plus one block for the wait
            // inside the last signed height, measures the failover itself.
            let (now, _) = c.wait_signer(at + 1, &[]).await?;
            if now != active && !signer {
                let gap = c.signing_gap(active, now).await?;
                Some(((gap + 1) * block_ms) as f64)
            } else {
                None
            }
        }
    };
    Ok(ms)
}

fn signal(pid: i32, sig: Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?;
    Ok(())
}

/// Milliseconds from `t0` until a node other than `old` signs after `at`
/// (in signer mode: until every other node's sentry has).
async fn failover(c: &Cluster, at: u64, old: u64, t0: Instant) -> Result<f64> {
    if signer_mode(c) {
        let others: Vec<u64> = (1..=NODES).filter(|n| *n != old).collect();
        c.chain.wait_signed_by(at, &others, SETTLE).await?;
    } else {
        c.wait_signer(at + 1, &[old]).await?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Every coordinator running, exactly one node validating and signing, the
/// other validator a synced standby.
async fn settle(c: &mut Cluster) -> Result<()> {
    for id in 1..=NODES {
        if !c.running(id) {
            c.forget(id)?;
            c.spawn(id)?;
        }
    }
    let c: &Cluster = c;
    if signer_mode(c) {
        // Signatures made from now on, so that a sentry that just died is
        // not taken for a live one by what it signed before.
        // Every chain's, with several.
        for (chain, judge) in c.judges() {
            let from = judge.totals().await?.height;
            eventually(
                SETTLE,
                &format!("every sentry signing {chain} again"),
                || async {
                    let s = judge.stats_since(from + 1).await?;
                    Ok((1..=NODES)
                        .all(|n| s.first_signed_by(n, from).is_some())
                        .then_some(()))
                },
            )
            .await?;
        }
        return Ok(());
    }
    eventually(
        SETTLE,
        "one validating node and a synced standby",
        || async {
            let mut validating = Vec::new();
            let mut standby_ok = true;
            for id in 1..=NODES {
                let v = get_json(&format!("http://{}/status", c.nodes[&id].http)).await?;
                let me = node_entry(&v, id);
                match me["state"].as_str() {
                    Some("Validating") => validating.push(id),
                    Some("Voting") if id == WITNESS || me["validator"]["synced"] == true => {}
                    _ => standby_ok = false,
                }
            }
            let [active] = validating.as_slice() else {
                return Ok(None);
            };
            let h = c.chain.totals().await?.height;
            let s = c.chain.stats_since(h.saturating_sub(2)).await?;
            Ok((standby_ok && s.signers.iter().any(|x| x.node == *active)).then_some(()))
        },
    )
    .await
}

fn summarize(results: &[RoundResult], covered: Covered) -> (serde_json::Value, bool) {
    let cometbft = covered.signer;
    let mut per_fault: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    for f in Fault::ALL {
        let rs: Vec<&RoundResult> = results.iter().filter(|r| r.fault == f).collect();
        if rs.is_empty() {
            continue;
        }
        let ms: Vec<f64> = rs.iter().filter_map(|r| r.failover_ms).collect();
        // The p50 of each phase the new holders logged.
        let mut budget = serde_json::Map::new();
        for phase in BUDGET {
            let v: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.budget.as_ref()?.get(phase).copied())
                .collect();
            if !v.is_empty() {
                budget.insert(phase.to_string(), json!(percentile(&v, 50.0)));
            }
        }
        per_fault.insert(
            f.name(),
            json!({
                "rounds": rs.len(),
                "failovers": ms.len(),
                "budget_ms_p50": budget,
                "failover_ms_p50": percentile(&ms, 50.0),
                "failover_ms_p99": percentile(&ms, 99.0),
                "missed": rs.iter().map(|r| r.missed).sum::<u64>(),
                "double_signs": rs.iter().map(|r| r.double_signs).sum::<u64>(),
                "residual_risk": f.residual_risk(covered),
            }),
        );
    }
    let safe: Vec<&RoundResult> = results
        .iter()
        .filter(|r| !r.fault.residual_risk(covered))
        .collect();
    let residual: Vec<&RoundResult> = results
        .iter()
        .filter(|r| r.fault.residual_risk(covered))
        .collect();
    let ms: Vec<f64> = safe.iter().filter_map(|r| r.failover_ms).collect();
    let double_safe: u64 = safe.iter().map(|r| r.double_signs).sum();
    let double_residual: u64 = residual.iter().map(|r| r.double_signs).sum();
    let residual_faults: Vec<&str> = [Fault::FreezeActiveHost, Fault::FreezeActiveKeyraft]
        .into_iter()
        .filter(|f| f.residual_risk(covered))
        .map(Fault::name)
        .collect();
    let summary = json!({
        "rounds": results.len(),
        "failovers": ms.len(),
        "failover_ms_p50": percentile(&ms, 50.0),
        "failover_ms_p99": percentile(&ms, 99.0),
        "missed": safe.iter().map(|r| r.missed).sum::<u64>(),
        "double_signs": double_safe + double_residual,
        "double_signs_outside_residual_risk": double_safe,
        "mode": if cometbft { "signer" } else { "validator" },
        "kernel_fence": covered.kernel_fence,
        "fence_agents": covered.fence_agents,
        "residual_risk": {
            "faults": residual_faults,
            "rounds": residual.len(),
            "double_signs": double_residual,
            "missed": residual.iter().map(|r| r.missed).sum::<u64>(),
        },
        "per_fault": per_fault,
    });
    (summary, double_safe + double_residual == 0)
}
