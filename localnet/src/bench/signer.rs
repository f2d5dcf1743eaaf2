//! `localnet bench signer`: keyraft's signer mode next to tmkms, with
//! kills of the signer leader.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::usage::{self, Snapshot};

/// Most chains one run signs for.
pub const MAX_CHAINS: u64 = 50;
/// Above this many chains, each sentry-chain's line is left out of the
/// output (its JSON keeps it) and a summary is printed instead.
const CHAINS_LISTED: u64 = 5;

pub struct SignerBench {
    /// Round length of the latency run.
    pub block_ms: u64,
    /// Length of the latency run.
    pub seconds: u64,
    /// Leader kills in the failover run.
    pub kills: usize,
    /// Round length of the failover run (1 s by default).
    pub kill_block_ms: u64,
    /// Chains signed for at once (each with a sentry on every host).
    pub chains: u64,
    /// keyraft's sentries speak CometBFT 1.x's privval (one chain).
    pub v1: bool,
    /// Where each host's key is (the first chain's, with several).
    pub key_in: crate::token::KeyIn,
}

impl SignerBench {
    /// Which key backend the run measures, as printed.
    fn backend(&self) -> String {
        match self.key_in {
            crate::token::KeyIn::File => "key file (priv_validator_key.json) on each host".into(),
            _ => {
                let version = std::process::Command::new("softhsm2-util")
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default();
                let rest = if self.chains > 1 {
                    "; the other chains' in files"
                } else {
                    ""
                };
                format!(
                    "PKCS#11: a SoftHSM2 {version} token on each host ({}){rest}",
                    crate::token::MODULE
                )
            }
        }
    }
}

/// keyraft's signer next to tmkms, in one run: (1) the signature latency
/// each sentry sees (three keyraft signers on loopback, a Raft commit per
/// new signature; the leader's own sentry and the two whose requests are
/// forwarded) once every sentry has signed (the first signatures, which
/// wait for the cluster to start, left out), (2) a single tmkms on the
/// same machine, its first signatures left out the same way, (3) missed heights
/// when the signer leader's host is SIGKILLed, at `kill_block_ms` rounds.
pub async fn signer(b: &SignerBench) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, Mode, NodeOpts};

    anyhow::ensure!(
        (1..=MAX_CHAINS).contains(&b.chains),
        "--chains must be 1 to {MAX_CHAINS}"
    );
    anyhow::ensure!(!b.v1 || b.chains == 1, "--protocol v1 measures one chain");
    let mode = |validators| Mode::Signer {
        chain_id: "bench-signer".into(),
        round_every: 0,
        validators,
        more_chains: b.chains - 1,
        halt: None,
    };
    // (1) Latency through keyraft, its peers dialling each other directly
    // (no fault is injected here, so no proxy stands in the way).
    println!("keyraft's key: {}", b.backend());
    let direct = |_| NodeOpts {
        direct_peers: true,
        key_in: b.key_in,
        flags: crate::shape::protocol_flags(b.v1),
        fakenode: crate::shape::sentry_protocol(b.v1),
        ..NodeOpts::default()
    };
    let c = Cluster::start_signers(3, b.block_ms, mode(1), direct).await?;
    crate::harness::eventually(
        Duration::from_secs(30),
        "three sentries signing",
        || async {
            let s = c.chain.stats_since(0).await?;
            Ok((1..=3)
                .all(|n| s.first_signed_by(n, 0).is_some())
                .then_some(s))
        },
    )
    .await?;
    // Each chain's sentries, one per host (the first chain's are the
    // ones keyraft supervises).
    let mut per_chain = Vec::new();
    per_chain.push((
        c.judges()[0].0.to_string(),
        c.nodes
            .iter()
            .map(|(id, n)| (*id, n.rpc))
            .collect::<Vec<_>>(),
    ));
    for o in &c.others {
        per_chain.push((
            o.chain_id.clone(),
            o.sentries.iter().map(|(id, e)| (*id, e.rpc)).collect(),
        ));
    }
    // Latency is measured from here: each sentry's signatures so far (the
    // first ones waited for the cluster's first election and commits) are
    // left out, once every sentry of every chain has signed.
    let privval = |rpc: std::net::SocketAddr, skip: usize| async move {
        crate::cometnet::privval_stats(&format!("http://{rpc}"), skip).await
    };
    let all_rpcs: Vec<std::net::SocketAddr> = per_chain
        .iter()
        .flat_map(|(_, rpcs)| rpcs.iter().map(|(_, rpc)| *rpc))
        .collect();
    let warmup = crate::harness::eventually(
        Duration::from_secs(30),
        "every sentry of every chain signing",
        || async {
            let mut seen = std::collections::BTreeMap::new();
            for rpc in &all_rpcs {
                seen.insert(*rpc, privval(*rpc, 0).await?.samples);
            }
            Ok(seen.values().all(|n| *n > 0).then_some(seen))
        },
    )
    .await?;
    let warm = heights_and_missed(&c).await?;
    let before = Snapshot::take(&c).await?;
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let after = Snapshot::take(&c).await?;
    let last = heights_and_missed(&c).await?;
    let status = c.status(1).await?;
    let leader = status["cluster"]["leader"].as_u64().unwrap_or(0);
    let cost = usage::report(&before, &after, leader);
    let mut chains = serde_json::Map::new();
    for (chain, rpcs) in &per_chain {
        let mut sentries = serde_json::Map::new();
        for (id, rpc) in rpcs {
            let skip = warmup.get(rpc).copied().unwrap_or(0);
            let pv = privval(*rpc, skip).await?;
            let role = if *id == leader { "leader" } else { "follower" };
            let on = if b.chains > 1 {
                format!(" {chain}")
            } else {
                String::new()
            };
            if b.chains <= CHAINS_LISTED {
                println!(
                    "keyraft,{on} sentry {id} ({role}'s host): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} signatures",
                    pv.sign_ms_p50.unwrap_or(f64::NAN),
                    pv.sign_ms_p99.unwrap_or(f64::NAN),
                    pv.sign_ms_max.unwrap_or(f64::NAN),
                    pv.samples
                );
            }
            sentries.insert(
                id.to_string(),
                serde_json::json!({"host": role, "p50_ms": pv.sign_ms_p50, "p99_ms": pv.sign_ms_p99,
                    "max_ms": pv.sign_ms_max, "signatures": pv.samples}),
            );
        }
        chains.insert(chain.clone(), serde_json::Value::Object(sentries));
    }
    let sentries = chains.values().next().cloned().unwrap_or_default();
    let spread = spread(&chains);
    if b.chains > CHAINS_LISTED {
        print_spread("keyraft", &spread);
    }
    let mut equivocations = 0;
    for (_, judge) in c.judges() {
        equivocations += judge.totals().await?.double_signs;
    }
    let budget = sign_budget(&c, leader).await?;
    let missed_steady = last.1 - warm.1;
    println!(
        "keyraft steady state: {missed_steady} of {} heights missed (every chain's), {equivocations} equivocations on {} chains",
        last.0 - warm.0,
        b.chains
    );
    drop(c);

    // (2) tmkms, same machine, same round length, the same number of
    // chains from one process.
    let tm = tmkms_run(b).await?;

    // (3) SIGKILL of the signer leader's host.
    let kills = kill_run(b, mode(4)).await?;
    Ok(serde_json::json!({
        "backend": b.backend(),
        "chains": b.chains,
        "keyraft_sentries": sentries,
        "keyraft_sentries_by_chain": chains,
        "keyraft_steady_equivocations": equivocations,
        "keyraft_sign_budget_ms": budget,
        "keyraft_missed_steady": missed_steady,
        "keyraft_spread": spread,
        "keyraft_cost": cost,
        "tmkms_p50_ms": tm["p50_ms"],
        "tmkms_p99_ms": tm["p99_ms"],
        "tmkms": tm,
        "kills": b.kills,
        "kill_block_ms": b.kill_block_ms,
        "kill_missed_p50": kills["missed_p50"],
        "kill_missed_p99": kills["missed_p99"],
        "kill_resume_ms_p50": kills["resume_ms_p50"],
        "kill_resume_ms_p99": kills["resume_ms_p99"],
        "equivocations": kills["equivocations"],
    }))
}

/// Every chain's heights and missed heights, summed over their judges.
async fn heights_and_missed(c: &crate::cluster::Cluster) -> anyhow::Result<(u64, u64)> {
    let mut sum = (0, 0);
    for (_, judge) in c.judges() {
        let t = judge.totals().await?;
        sum = (sum.0 + t.height, sum.1 + t.missed);
    }
    Ok(sum)
}

/// `b.kills` SIGKILLs of the signer leader's host at `b.kill_block_ms`
/// rounds: after each, how long until every chain signs again on the other
/// hosts, and the heights every chain missed.
async fn kill_run(
    b: &SignerBench,
    mode: crate::cluster::Mode,
) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, NodeOpts};
    let mut c = Cluster::start_signers(3, b.kill_block_ms, mode, |_| NodeOpts {
        key_in: b.key_in,
        flags: crate::shape::protocol_flags(b.v1),
        fakenode: crate::shape::sentry_protocol(b.v1),
        ..NodeOpts::default()
    })
    .await?;
    let mut missed = Vec::new();
    let mut resume_ms = Vec::new();
    for round in 0..b.kills {
        // Every chain's three sentries signing at its last heights: a kill
        // while some chains still start (their sentries dialled, their
        // first commits) would count their start as the failover's.
        let all_signing = |s: &crate::chain::Stats| {
            let h = s.height.saturating_sub(2);
            (1..=3).all(|n| s.signers.iter().any(|x| x.node == n && x.height >= h))
        };
        let s =
            crate::harness::eventually(Duration::from_secs(60), "all sentries signing", || async {
                for o in &c.others {
                    if !all_signing(&o.chain.stats_since(0).await?) {
                        return Ok(None);
                    }
                }
                let s = c.chain.stats_since(0).await?;
                Ok(all_signing(&s).then_some(s))
            })
            .await?;
        let leader = c.status(1).await?["cluster"]["leader"]
            .as_u64()
            .context("no leader")?;
        // Each other chain's height and misses at the kill: it too must
        // sign again.
        let mut others_at = Vec::new();
        for o in &c.others {
            others_at.push(o.chain.totals().await?);
        }
        let t = Instant::now();
        c.kill_host(leader)?;
        let rest: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
        let resumed =
            crate::harness::eventually(Duration::from_secs(30), "signing to resume", || async {
                for (o, at) in c.others.iter().zip(&others_at) {
                    let st = o.chain.stats_since(at.height + 1).await?;
                    if !rest
                        .iter()
                        .all(|n| st.first_signed_by(*n, at.height).is_some())
                    {
                        return Ok(None);
                    }
                }
                let st = c.chain.stats_since(s.height + 1).await?;
                Ok(rest
                    .iter()
                    .all(|n| st.first_signed_by(*n, s.height).is_some())
                    .then_some(st))
            })
            .await?;
        resume_ms.push(t.elapsed().as_millis() as u64);
        // Count the heights closed since the kill once the chain is past it.
        c.chain
            .wait_height(resumed.height + 2, Duration::from_secs(10))
            .await?;
        let after = c.chain.totals().await?;
        let mut lost = after.missed - s.missed;
        // Every other chain resumed before its height now: the heights
        // it missed for the kill are closed two heights on (every chain's
        // read first, so that no chain's count runs on past its own).
        let mut now = Vec::new();
        for o in &c.others {
            now.push(o.chain.totals().await?.height);
        }
        for ((o, at), now) in c.others.iter().zip(&others_at).zip(now) {
            let closed = o
                .chain
                .wait_height(now + 2, Duration::from_secs(30))
                .await?;
            lost += closed.missed - at.missed;
        }
        missed.push(lost);
        println!(
            "kill {round}: leader {leader}, signing resumed on every chain after {} ms, {} heights missed (every chain's)",
            resume_ms.last().unwrap_or(&0),
            missed.last().unwrap_or(&0)
        );
        c.spawn(leader)?;
    }
    let mut kill_equivocations = 0;
    for (_, judge) in c.judges() {
        kill_equivocations += judge.totals().await?.double_signs;
    }
    missed.sort_unstable();
    resume_ms.sort_unstable();
    let pick = |v: &[u64], q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
    };
    println!(
        "leader SIGKILL at {} ms blocks, {} kills: missed heights p50 {:?}, p99 {:?}; resume p50 {:?} ms, p99 {:?} ms; {} equivocations",
        b.kill_block_ms,
        b.kills,
        pick(&missed, 0.5),
        pick(&missed, 0.99),
        pick(&resume_ms, 0.5),
        pick(&resume_ms, 0.99),
        kill_equivocations
    );
    Ok(serde_json::json!({
        "missed_p50": pick(&missed, 0.5),
        "missed_p99": pick(&missed, 0.99),
        "resume_ms_p50": pick(&resume_ms, 0.5),
        "resume_ms_p99": pick(&resume_ms, 0.99),
        "equivocations": kill_equivocations,
    }))
}

/// The sign budget: the mean of each stage of `keyraft_sign_stage_seconds`
/// on each node (lock, check, commit, sign on the leader; forward on a
/// follower; serve, the leader's part of a forwarded request), and
/// openraft's own stage table from the leader's `/debug/raft`.
async fn sign_budget(
    c: &crate::cluster::Cluster,
    leader: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for id in c.nodes.keys() {
        let m = c.metrics(*id).await?;
        let mut stages = serde_json::Map::new();
        let mut counts = std::collections::BTreeMap::new();
        for stage in [
            "lock", "wait", "check", "commit", "sign", "forward", "serve",
        ] {
            let key =
                |what: &str| format!("keyraft_sign_stage_seconds_{what}{{stage=\"{stage}\"}}");
            let (sum, n) = (m.get(&key("sum")), m.get(&key("count")));
            if let (Some(sum), Some(n)) = (sum, n.filter(|n| **n > 0.0)) {
                stages.insert(stage.into(), serde_json::json!(sum / n * 1000.0));
                counts.insert(stage, *n);
            }
        }
        // Each stage's mean is over the requests that went through it: a
        // request its leader's reservation covered has no commit stage.
        let line: Vec<String> = stages
            .iter()
            .map(|(s, ms)| {
                let n = counts.get(s.as_str()).copied().unwrap_or_default();
                format!("{s} {:.3} ms x{n}", ms.as_f64().unwrap_or(f64::NAN))
            })
            .collect();
        let role = if *id == leader { "leader" } else { "follower" };
        println!(
            "sign budget, node {id} ({role}), mean per stage: {}",
            line.join(", ")
        );
        out.insert(id.to_string(), serde_json::Value::Object(stages));
    }
    let url = format!("http://{}/debug/raft", c.nodes[&leader].http);
    let raft = reqwest::get(&url).await?.text().await?;
    let table: Vec<&str> = raft
        .lines()
        .skip_while(|l| !l.contains("Log Stage Latencies"))
        .take_while(|l| !l.contains("Distribution"))
        .collect();
    println!("openraft on the leader:\n{}", table.join("\n"));
    Ok(serde_json::Value::Object(out))
}

/// Over every sentry-chain of a run (`chains`: chain, then sentry, then its
/// `host`, `p50_ms` and `p99_ms`), for each kind of host: the median and
/// the highest p50 and p99, where the highest p99 was, and how many
/// sentry-chains had a p99 over 5 ms.
fn spread(chains: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let mut by_host: std::collections::BTreeMap<String, Vec<(f64, f64, String)>> =
        Default::default();
    for (chain, sentries) in chains {
        for (id, s) in sentries.as_object().into_iter().flatten() {
            let host = s["host"].as_str().unwrap_or("?").to_string();
            let (p50, p99) = (
                s["p50_ms"].as_f64().unwrap_or(f64::NAN),
                s["p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
            by_host
                .entry(host)
                .or_default()
                .push((p50, p99, format!("{chain} sentry {id}")));
        }
    }
    let mut out = serde_json::Map::new();
    for (host, v) in by_host {
        let p50s: Vec<f64> = v.iter().map(|x| x.0).collect();
        let p99s: Vec<f64> = v.iter().map(|x| x.1).collect();
        let worst = v
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|x| x.2.clone());
        out.insert(
            host,
            serde_json::json!({
                "sentry_chains": v.len(),
                "p50_median_ms": super::percentile(&p50s, 50.0),
                "p50_max_ms": super::percentile(&p50s, 100.0),
                "p99_median_ms": super::percentile(&p99s, 50.0),
                "p99_max_ms": super::percentile(&p99s, 100.0),
                "p99_max_at": worst,
                "p99_over_5ms": p99s.iter().filter(|p| **p > 5.0).count(),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// One line per kind of host of a [`spread`].
fn print_spread(who: &str, spread: &serde_json::Value) {
    for (host, s) in spread.as_object().into_iter().flatten() {
        let ms = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{who}, {} sentry-chains on the {host}'s host: p50 median {:.2} ms (highest {:.2}), p99 median {:.2} ms (highest {:.2}, {}), {} with p99 over 5 ms",
            s["sentry_chains"],
            ms("p50_median_ms"),
            ms("p50_max_ms"),
            ms("p99_median_ms"),
            ms("p99_max_ms"),
            s["p99_max_at"].as_str().unwrap_or("-"),
            s["p99_over_5ms"],
        );
    }
}

/// tmkms signing `b.chains` chains from one process (a judge and a sentry
/// each), on the same machine at the same round length: each sentry's
/// latency after its first signatures, and tmkms's CPU and RSS.
async fn tmkms_run(b: &SignerBench) -> anyhow::Result<serde_json::Value> {
    let run = super::tmkms_chains(b.block_ms, b.chains).await?;
    let mut warm = Vec::new();
    for (_, sentry) in &run.chains {
        warm.push(sentry.privval_stats().await?.samples);
    }
    let (t, cpu) = (
        Instant::now(),
        crate::harness::proc_usage(run.kms.pid())?.cpu,
    );
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let used = crate::harness::proc_usage(run.kms.pid())?;
    let cpu = used.cpu.saturating_sub(cpu).as_secs_f64() / t.elapsed().as_secs_f64() * 100.0;
    let mut chains = serde_json::Map::new();
    for ((net, sentry), skip) in run.chains.iter().zip(warm) {
        let pv = sentry.privval_stats_after(skip).await?;
        if b.chains == 1 {
            println!(
                "tmkms {} (one sentry, no HA): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} signatures",
                crate::tmkms::VERSION,
                pv.sign_ms_p50.unwrap_or(f64::NAN),
                pv.sign_ms_p99.unwrap_or(f64::NAN),
                pv.sign_ms_max.unwrap_or(f64::NAN),
                pv.samples
            );
        }
        let one = serde_json::json!({"host": "tmkms", "p50_ms": pv.sign_ms_p50,
            "p99_ms": pv.sign_ms_p99, "max_ms": pv.sign_ms_max, "signatures": pv.samples});
        chains.insert(net.chain_id.clone(), serde_json::json!({ "1": one }));
    }
    let spread = spread(&chains);
    if b.chains > 1 {
        print_spread(
            &format!(
                "tmkms {} (one sentry a chain, no HA)",
                crate::tmkms::VERSION
            ),
            &spread,
        );
    }
    let rss_mb = used.rss_kib as f64 / 1024.0;
    println!("tmkms: {cpu:.1} % of a core, RSS {rss_mb:.1} MB");
    let s = &spread["tmkms"];
    Ok(serde_json::json!({
        "p50_ms": s["p50_median_ms"],
        "p99_ms": s["p99_max_ms"],
        "cpu_percent": cpu,
        "rss_mb": rss_mb,
        "spread": spread,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_finds_the_worst_sentry_chain_of_each_host() {
        let s = |host: &str, p50: f64, p99: f64| serde_json::json!({"host": host, "p50_ms": p50, "p99_ms": p99});
        let chains: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "a": {"1": s("leader", 1.0, 2.0), "2": s("follower", 2.0, 6.0)},
                "b": {"1": s("leader", 3.0, 4.0), "2": s("follower", 1.5, 3.0)},
            }))
            .unwrap();
        let got = spread(&chains);
        assert_eq!(got["leader"]["sentry_chains"], 2);
        assert_eq!(got["leader"]["p99_max_ms"], 4.0);
        assert_eq!(got["leader"]["p99_max_at"], "b sentry 1");
        assert_eq!(got["leader"]["p99_over_5ms"], 0);
        assert_eq!(got["follower"]["p99_max_at"], "a sentry 2");
        assert_eq!(got["follower"]["p99_over_5ms"], 1);
        assert_eq!(got["follower"]["p50_median_ms"], 1.5);
    }
}
