//! `localnet bench cometbft`: the CometBFT judge's throughput and a
//! sentry's round trip to tmkms.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::harness::proc_usage;

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

    use crate::cometnet::{CometNet, NetOpts};
    use crate::wire::Submission;
    use prost::Message;

    // (1) In-process: sign bytes and an ed25519 verification per vote.
    let key = ValidatorKey::generate();
    let schedule = Schedule {
        chain_id: "bench".into(),
        round_every: 0,
        validators: 1,
        extensions: false,
        slot_ms: 1000,
        upgrades: Default::default(),
        network_upgrade: Default::default(),
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
    let (net, sentry, _kms) = super::tmkms_baseline(b.block_ms).await?;
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
        crate::tmkms::VERSION,
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
