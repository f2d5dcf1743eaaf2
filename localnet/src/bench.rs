//! Benchmarks that print numbers: how fast the judge keeps up, and (with the
//! launcher) how fast keyraft fails over.
//!
//! Owns: starting the processes a benchmark needs in a scratch dir, measuring
//! and printing one JSON line of results. Must not: assert pass/fail on
//! timings; it reports, and the README quotes.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::harness::{free_addr, proc_usage, sibling_bin, ChainClient, Proc};
use crate::keys::KeyFile;

pub struct ChainBench {
    pub nodes: u64,
    pub block_ms: u64,
    pub seconds: u64,
    pub heights: u64,
    pub memory_block_ms: u64,
}

/// Phase 1: `nodes` fakenodes (one holding the key) follow a chain at
/// `block_ms` for `seconds`: heights per second and missed heights.
/// Phase 2: the same set-up at `memory_block_ms` until `heights` heights:
/// the chain's resident memory along the way.
pub async fn chain(b: &ChainBench) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let key_path = dir.path().join("validator_key.json");
    KeyFile::generate("bench.validator").write_new(&key_path)?;

    let (_procs, chain, chain_pid) =
        start_chain_and_nodes(dir.path(), &key_path, b.nodes, b.block_ms)?;
    let first = chain.wait_height(3, Duration::from_secs(10)).await?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let last = chain.totals().await?;
    let secs = t0.elapsed().as_secs_f64();
    let rate = (last.height - first.height) as f64 / secs;
    let missed = last.missed - first.missed;
    let cpu = proc_usage(chain_pid)?.cpu;
    println!(
        "chain at {} ms with {} nodes: {rate:.1} heights/s (ideal {:.1}), {missed} missed of {} heights, chain CPU {:?} total",
        b.block_ms,
        b.nodes,
        1000.0 / b.block_ms as f64,
        last.height - first.height,
        cpu
    );
    drop(_procs);

    let (_procs, chain, chain_pid) =
        start_chain_and_nodes(dir.path(), &key_path, b.nodes, b.memory_block_ms)?;
    let mut samples = Vec::new();
    let t1 = Instant::now();
    for target in [b.heights / 10, b.heights / 2, b.heights] {
        let s = chain
            .wait_height(
                target,
                Duration::from_secs(b.heights * b.memory_block_ms / 100 + 600),
            )
            .await
            .context("chain did not reach the height in time")?;
        let rss = proc_usage(chain_pid)?.rss_kib;
        println!("after {} heights: chain RSS {} KiB", s.height, rss);
        samples.push(serde_json::json!({"height": s.height, "rss_kib": rss}));
    }
    Ok(serde_json::json!({
        "bench": "chain",
        "block_ms": b.block_ms,
        "nodes": b.nodes,
        "heights_per_s": (rate * 10.0).round() / 10.0,
        "ideal_heights_per_s": 1000.0 / b.block_ms as f64,
        "missed": missed,
        "memory_block_ms": b.memory_block_ms,
        "memory_run_s": t1.elapsed().as_secs(),
        "rss": samples,
    }))
}

fn start_chain_and_nodes(
    dir: &std::path::Path,
    key_path: &std::path::Path,
    nodes: u64,
    block_ms: u64,
) -> anyhow::Result<(Vec<Proc>, ChainClient, i32)> {
    let addr = free_addr()?;
    let chain = Proc::spawn(
        "fakechain",
        Command::new(sibling_bin("fakechain")?)
            .args([
                "--listen",
                &addr.to_string(),
                "--block-ms",
                &block_ms.to_string(),
            ])
            .arg("--validator-key")
            .arg(key_path),
        dir,
    )?;
    let chain_pid = chain.pid();
    let url = format!("http://{addr}");
    let mut procs = vec![chain];
    for id in 1..=nodes {
        let home = dir.join(format!("bench-home{id}-{block_ms}"));
        std::fs::create_dir_all(&home)?;
        if id == 1 {
            std::fs::copy(key_path, home.join("validator_key.json"))?;
        }
        procs.push(Proc::spawn(
            &format!("fakenode{id}"),
            Command::new(sibling_bin("fakenode")?)
                .arg("--home")
                .arg(&home)
                .args(["--chain", &url, "--node-id", &id.to_string()])
                .args(["--rpc-listen", &free_addr()?.to_string()]),
            dir,
        )?);
    }
    Ok((procs, ChainClient::new(&url), chain_pid))
}

/// Nearest-rank percentile of `v` (sorted here), `q` in 0..=100.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn summary(name: &str, v: &[f64]) -> serde_json::Value {
    let p50 = percentile(v, 50.0);
    let p99 = percentile(v, 99.0);
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "{name}: n={} p50={p50:.0} p99={p99:.0} max={max:.0}",
        v.len()
    );
    serde_json::json!({"n": v.len(), "p50": p50, "p99": p99, "max": max})
}

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
pub const BUDGET: [&str; 5] = ["silent_ms", "commit_ms", "hold_ms", "height_ms", "start_ms"];

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

/// Waits until every other node is a synced standby in the leader's view.
async fn settle_standbys(c: &crate::cluster::Cluster, active: u64) -> anyhow::Result<()> {
    crate::harness::eventually(Duration::from_secs(30), "synced standbys", || async {
        let v = c.status(active).await?;
        let ok = v["nodes"].as_array().into_iter().flatten().all(|n| {
            n["id"] == active || (n["state"] == "Voting" && n["validator"]["synced"] == true)
        });
        Ok(ok.then_some(()))
    })
    .await
}

pub struct CometBench {
    /// Votes for the verification measurements.
    pub votes: usize,
    /// Concurrent HTTP clients posting votes.
    pub clients: usize,
    /// Round length of the tmkms run.
    pub block_ms: u64,
    /// Length of the tmkms run.
    pub seconds: u64,
}

/// The CometBFT judge's numbers: (1) votes per second the chain's books
/// verify in-process and (2) over HTTP from `clients` posters; (3) a
/// sentry's round trip to tmkms per signature, p50/p99, the baseline of a
/// remote signer with no HA at all.
pub async fn comet(b: &CometBench) -> anyhow::Result<serde_json::Value> {
    use crate::comet::consensus::{self, Step};
    use crate::comet::key::ValidatorKey;
    use crate::comet::ledger::{Book, Schedule};
    use crate::comet::net::{CometNet, NetOpts, SentryOpts};
    use crate::comet::node::{Protocol, Submission};
    use prost::Message;

    // (1) In-process: sign bytes and an ed25519 verification per vote.
    let key = ValidatorKey::generate();
    let schedule = Schedule {
        chain_id: "bench".into(),
        round_every: 0,
        validators: 1,
        extensions: false,
        slot_ms: 1000,
    };
    let mut book = Book::new(schedule.clone(), key.public());
    book.tick();
    let block = book.announce().block_id().context("block id")?;
    let votes: Vec<_> = (0..b.votes)
        .map(|_| {
            let mut v = consensus::vote(
                Step::Prevote,
                1,
                0,
                block.clone(),
                key.public().address,
                vec![],
            );
            consensus::sign_vote(key.signing(), "bench", &mut v, false).map(|_| v)
        })
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for v in &votes {
        book.submit_vote(1, v)?;
    }
    let in_process = b.votes as f64 / t.elapsed().as_secs_f64();
    println!(
        "chain books: {in_process:.0} votes/s verified in-process ({} votes)",
        b.votes
    );

    // (2) Over HTTP, against a real fakechain, `clients` posters at once.
    let net = CometNet::start(&NetOpts {
        block_ms: 60_000,
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let addr = net.key.public().address;
    let bodies: Vec<Submission> = (0..b.votes)
        .map(|i| {
            let mut v = consensus::vote(
                Step::Prevote,
                1,
                0,
                consensus::block_id(&net.chain_id, 1, 0),
                addr,
                vec![],
            );
            consensus::sign_vote(net.key.signing(), &net.chain_id, &mut v, false).map(|_| {
                Submission {
                    node: i as u64,
                    msg: hex::encode(v.encode_to_vec()),
                }
            })
        })
        .collect::<Result<_, _>>()?;
    let bodies = std::sync::Arc::new(bodies);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..b.clients.max(1) {
        let (bodies, next, url) = (
            bodies.clone(),
            next.clone(),
            format!("{}/cometbft/vote", net.chain.url),
        );
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut refused = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                if !http
                    .post(&url)
                    .json(body)
                    .send()
                    .await?
                    .status()
                    .is_success()
                {
                    refused += 1;
                }
            }
            Ok::<_, anyhow::Error>(refused)
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await??;
    }
    let over_http = b.votes as f64 / t.elapsed().as_secs_f64();
    let chain_cpu = proc_usage(net.chain_proc.pid())?;
    println!(
        "fakechain over HTTP: {over_http:.0} votes/s with {} clients ({refused} refused), chain CPU {:?}, RSS {} KiB",
        b.clients, chain_cpu.cpu, chain_cpu.rss_kib
    );
    drop(net);

    // (3) A sentry and tmkms: the signer's round trip as the node sees it.
    let net = CometNet::start(&NetOpts {
        block_ms: b.block_ms,
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let sentry = net.sentry(1, &SentryOpts::default())?;
    let _kms = net.tmkms("tmkms", &sentry, Protocol::V0_38, false)?;
    let first = crate::harness::eventually(Duration::from_secs(20), "tmkms to sign", || async {
        let s = net.chain.totals().await?;
        Ok((s.signed > 0).then_some(s))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let last = net.chain.totals().await?;
    let pv = sentry.privval_stats().await?;
    let closed = last.height.saturating_sub(first.height);
    let missed = last.missed - first.missed;
    println!(
        "tmkms {} round trip per signature: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} signatures; {missed} of {closed} heights missed",
        crate::comet::tmkms::VERSION,
        pv.sign_ms_p50.unwrap_or(f64::NAN),
        pv.sign_ms_p99.unwrap_or(f64::NAN),
        pv.sign_ms_max.unwrap_or(f64::NAN),
        pv.samples
    );
    Ok(serde_json::json!({
        "verify_votes_per_s_in_process": in_process.round(),
        "verify_votes_per_s_http": over_http.round(),
        "http_clients": b.clients,
        "tmkms_sign_ms_p50": pv.sign_ms_p50,
        "tmkms_sign_ms_p99": pv.sign_ms_p99,
        "tmkms_sign_ms_max": pv.sign_ms_max,
        "tmkms_signatures": pv.samples,
        "tmkms_heights": closed,
        "tmkms_missed": missed,
    }))
}

pub struct SignerBench {
    /// Round length of the latency run.
    pub block_ms: u64,
    /// Length of the latency run.
    pub seconds: u64,
    /// Leader kills in the failover run (at 1 s blocks).
    pub kills: usize,
}

/// keyraft's signer next to tmkms, in one run: (1) the signature latency
/// each sentry sees (three keyraft signers on loopback, a Raft commit per
/// new signature; the leader's own sentry and the two whose requests are
/// forwarded), (2) a single tmkms on the same machine, (3) missed heights
/// when the signer leader's host is SIGKILLed, at 1 s blocks.
pub async fn signer(b: &SignerBench) -> anyhow::Result<serde_json::Value> {
    use crate::cluster::{Cluster, Mode, NodeOpts};
    use crate::comet::net::{CometNet, NetOpts, SentryOpts};
    use crate::comet::node::Protocol;
    use crate::comet::privval::PrivvalStats;

    let mode = |validators| Mode::Signer {
        chain_id: "bench-signer".into(),
        round_every: 0,
        validators,
    };
    // (1) Latency through keyraft.
    let c = Cluster::start_signers(3, b.block_ms, mode(1), |_| NodeOpts::default()).await?;
    let warm = crate::harness::eventually(
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
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let last = c.chain.totals().await?;
    let status = c.status(1).await?;
    let leader = status["cluster"]["leader"].as_u64().unwrap_or(0);
    let mut sentries = serde_json::Map::new();
    for (id, node) in &c.nodes {
        let pv: PrivvalStats = serde_json::from_value(
            crate::harness::get_json(&format!("http://{}/privval", node.rpc)).await?,
        )?;
        let role = if *id == leader { "leader" } else { "follower" };
        println!(
            "keyraft, sentry {id} ({role}'s host): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} signatures",
            pv.sign_ms_p50.unwrap_or(f64::NAN),
            pv.sign_ms_p99.unwrap_or(f64::NAN),
            pv.sign_ms_max.unwrap_or(f64::NAN),
            pv.samples
        );
        sentries.insert(
            id.to_string(),
            serde_json::json!({"host": role, "p50_ms": pv.sign_ms_p50, "p99_ms": pv.sign_ms_p99,
                "max_ms": pv.sign_ms_max, "signatures": pv.samples}),
        );
    }
    let missed_steady = last.missed - warm.missed;
    println!(
        "keyraft steady state: {missed_steady} of {} heights missed, {} equivocations",
        last.height - warm.height,
        last.double_signs
    );
    drop(c);

    // (2) tmkms, same machine, same round length.
    let net = CometNet::start(&NetOpts {
        block_ms: b.block_ms,
        validators: 1,
        ..NetOpts::default()
    })
    .await?;
    let sentry = net.sentry(1, &SentryOpts::default())?;
    let _kms = net.tmkms("tmkms", &sentry, Protocol::V0_38, false)?;
    crate::harness::eventually(Duration::from_secs(20), "tmkms to sign", || async {
        Ok((net.chain.totals().await?.signed > 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(b.seconds)).await;
    let tm = sentry.privval_stats().await?;
    println!(
        "tmkms {} (one sentry, no HA): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} signatures",
        crate::comet::tmkms::VERSION,
        tm.sign_ms_p50.unwrap_or(f64::NAN),
        tm.sign_ms_p99.unwrap_or(f64::NAN),
        tm.sign_ms_max.unwrap_or(f64::NAN),
        tm.samples
    );
    drop(net);

    // (3) SIGKILL of the signer leader's host, at 1 s blocks.
    let mut c = Cluster::start_signers(3, 1000, mode(4), |_| NodeOpts::default()).await?;
    let mut missed = Vec::new();
    let mut resume_ms = Vec::new();
    for round in 0..b.kills {
        let s =
            crate::harness::eventually(Duration::from_secs(30), "all sentries signing", || async {
                let s = c.chain.stats_since(0).await?;
                let h = s.height.saturating_sub(2);
                Ok((1..=3)
                    .all(|n| s.signers.iter().any(|x| x.node == n && x.height >= h))
                    .then_some(s))
            })
            .await?;
        let leader = c.status(1).await?["cluster"]["leader"]
            .as_u64()
            .context("no leader")?;
        let t = Instant::now();
        c.kill_host(leader)?;
        let rest: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
        let resumed =
            crate::harness::eventually(Duration::from_secs(30), "signing to resume", || async {
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
        missed.push(after.missed - s.missed);
        println!(
            "kill {round}: leader {leader}, signing resumed after {} ms, {} heights missed",
            resume_ms.last().unwrap_or(&0),
            missed.last().unwrap_or(&0)
        );
        c.spawn(leader)?;
    }
    let totals = c.chain.totals().await?;
    missed.sort_unstable();
    resume_ms.sort_unstable();
    let pick = |v: &[u64], q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
    };
    println!(
        "leader SIGKILL at 1 s blocks, {} kills: missed heights p50 {:?}, p99 {:?}; resume p50 {:?} ms, p99 {:?} ms; {} equivocations",
        b.kills,
        pick(&missed, 0.5),
        pick(&missed, 0.99),
        pick(&resume_ms, 0.5),
        pick(&resume_ms, 0.99),
        totals.double_signs
    );
    Ok(serde_json::json!({
        "keyraft_sentries": sentries,
        "keyraft_missed_steady": missed_steady,
        "tmkms_p50_ms": tm.sign_ms_p50,
        "tmkms_p99_ms": tm.sign_ms_p99,
        "kills": b.kills,
        "kill_missed_p50": pick(&missed, 0.5),
        "kill_missed_p99": pick(&missed, 0.99),
        "kill_resume_ms_p50": pick(&resume_ms, 0.5),
        "kill_resume_ms_p99": pick(&resume_ms, 0.99),
        "equivocations": totals.double_signs,
    }))
}
