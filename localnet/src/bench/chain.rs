//! `localnet bench chain`: how fast the judge keeps up (NEAR mode).

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
