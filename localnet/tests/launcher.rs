//! `localnet up` and its fault commands, and `localnet chaos`, as a user
//! runs them: separate processes, the chain as judge.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::harness::{eventually, sibling_bin, ChainClient, Proc};
use localnet::launcher::LocalnetFile;
use nix::sys::signal::Signal;

/// `localnet` as built (without `CARGO` in its environment, it does not try
/// to build keyraft itself, which would wait on the test run's build lock).
fn localnet_cmd() -> Result<Command> {
    let mut cmd = Command::new(sibling_bin("localnet")?);
    cmd.env_remove("CARGO");
    Ok(cmd)
}

fn localnet(args: &[&str], dir: &std::path::Path) -> Result<Output> {
    Ok(localnet_cmd()?.args(args).arg("--dir").arg(dir).output()?)
}

fn ok(out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn up_runs_a_cluster_that_the_other_commands_can_break_and_ctrl_c_stops_it_all() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("net");
    let mut up = Proc::spawn(
        "localnet-up",
        localnet_cmd()?
            .args(["up", "--witness", "--block-ms", "250", "--dir"])
            .arg(&dir),
        tmp.path(),
    )?;
    let info: LocalnetFile = eventually(Duration::from_secs(30), "localnet.json", || async {
        let text = std::fs::read_to_string(dir.join("localnet.json")).ok();
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    })
    .await
    .with_context(|| up.log_tail(20))?;
    let chain = ChainClient::new(&info.chain);
    let view = eventually(
        Duration::from_secs(20),
        "a validating node in the view",
        || async {
            let v = ok(localnet(&["status"], &dir)?)?;
            Ok(v.contains("Validating").then_some(v))
        },
    )
    .await?;
    ensure!(
        view.contains("witness") && view.contains("double signs 0"),
        "{view}"
    );
    let active = eventually(Duration::from_secs(20), "a signer on the chain", || async {
        Ok(chain.stats_since(0).await?.signers.last().map(|s| s.node))
    })
    .await?;

    ensure!(
        localnet(&["kill", "9"], &dir)?.status.code() != Some(0),
        "killing a node that does not exist"
    );
    ok(localnet(&["partition", &active.to_string()], &dir)?)?;
    let at = chain.totals().await?.height;
    eventually(Duration::from_secs(20), "another signer", || async {
        let s = chain.stats_since(at + 1).await?;
        Ok(s.signers.iter().any(|x| x.node != active).then_some(()))
    })
    .await?;
    ok(localnet(&["heal"], &dir)?)?;
    let again = chain
        .stats_since(0)
        .await?
        .signers
        .last()
        .map(|s| s.node)
        .context("no signer")?;
    ok(localnet(&["kill", &again.to_string()], &dir)?)?;
    let view = ok(localnet(&["status"], &dir)?)?;
    ensure!(view.contains("killed"), "{view}");
    ok(localnet(&["start", &again.to_string()], &dir)?)?;
    ok(localnet(&["pause", &active.to_string(), "--host"], &dir)?)?;
    ok(localnet(&["resume", &active.to_string()], &dir)?)?;
    ensure!(chain.totals().await?.double_signs == 0);

    // Ctrl-C: everything it started goes away.
    let pids: Vec<i32> = (1..=3)
        .filter_map(|id| {
            std::fs::read_to_string(dir.join(format!("n{id}/data/validator.pid"))).ok()
        })
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    up.signal(Signal::SIGINT)?;
    let status = up.wait_exit(Duration::from_secs(20)).await?;
    ensure!(status.success(), "{status}: {}", up.log_tail(20));
    for pid in pids {
        ensure!(
            !localnet::cluster::alive(pid),
            "validator {pid} outlived localnet up"
        );
    }
    ensure!(
        reqwest::get(format!("{}/status", info.chain))
            .await
            .is_err(),
        "fakechain outlived localnet up"
    );
    ensure!(
        localnet(&["status"], &dir)?.status.code() != Some(0),
        "status of a stopped localnet"
    );
    Ok(())
}

/// `localnet chaos` over four seeded rounds of `faults`: exit 0, and the
/// JSON summary of its last line.
fn chaos(faults: &str) -> Result<serde_json::Value> {
    chaos_with(&["--seed", "3", "--block-ms", "250"], faults)
}

/// `localnet chaos --rounds 4 ARGS --faults FAULTS`: exit 0, and its JSON
/// summary.
fn chaos_with(args: &[&str], faults: &str) -> Result<serde_json::Value> {
    let out = localnet_cmd()?
        .args(["chaos", "--rounds", "4"])
        .args(args)
        .args(["--faults", faults])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().context("no output")?;
    Ok(serde_json::from_str(last)?)
}

#[tokio::test]
async fn chaos_prints_a_json_summary_and_exits_0_without_double_signs() -> Result<()> {
    let v = chaos("kill-active-host,partition-active,partition-witness,crash-active-validator")?;
    ensure!(v["rounds"] == 4 && v["double_signs"] == 0, "{v}");
    for key in [
        "failovers",
        "failover_ms_p50",
        "failover_ms_p99",
        "missed",
        "per_fault",
        "residual_risk",
    ] {
        ensure!(v.get(key).is_some(), "summary lacks {key}: {v}");
    }
    Ok(())
}

#[tokio::test]
async fn chaos_in_signer_mode_freezes_kills_and_cuts_off_the_leader_without_equivocations(
) -> Result<()> {
    // Two chains at once, each judged by its own fake chain.
    let v = chaos_with(
        &[
            "--cometbft",
            "--chains",
            "2",
            "--seed",
            "5",
            "--block-ms",
            "300",
        ],
        "kill-active-host,freeze-active-host,partition-active",
    )?;
    ensure!(v["mode"] == "signer" && v["rounds"] == 4, "{v}");
    ensure!(v["double_signs"] == 0, "equivocations: {v}");
    let chains = v["per_chain"].as_object().context("no per_chain")?;
    ensure!(v["chains"] == 2 && chains.len() == 2, "{v}");
    for (chain, c) in chains {
        ensure!(
            c["double_signs"] == 0 && c["signed"].as_u64() > Some(0),
            "{chain}: {c}"
        );
    }
    ensure!(
        v["residual_risk"]["rounds"] == 0,
        "signer mode has no residual-risk faults: {v}"
    );
    ensure!(v["failovers"].as_u64() >= Some(3), "{v}");
    Ok(())
}

#[tokio::test]
async fn chaos_freezes_and_kills_the_guard_without_double_signs() -> Result<()> {
    // Seed 3 draws both guard faults in four rounds.
    let v = chaos("freeze-active-guard,kill-active-guard")?;
    ensure!(v["double_signs"] == 0, "{v}");
    for fault in ["freeze_active_guard", "kill_active_guard"] {
        let f = &v["per_fault"][fault];
        ensure!(
            f["rounds"].as_u64() > Some(0) && f["failovers"] == f["rounds"],
            "{fault}: every round must move the key to another node: {v}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn chaos_freezes_whole_hosts_under_load_and_the_kernel_fence_keeps_them_from_signing(
) -> Result<()> {
    let v = chaos_with(
        &["--seed", "5", "--block-ms", "250", "--load", "1"],
        "freeze-active-host",
    )?;
    ensure!(
        v["kernel_fence"] == true,
        "the kernel fence is off on this host (root, nftables and cgroup v2 are needed): {v}"
    );
    ensure!(v["double_signs"] == 0, "double signs: {v}");
    ensure!(
        v["residual_risk"]["rounds"] == 0 && v["failovers"] == v["rounds"],
        "with the kernel fence every freeze is an ordinary, counted failover: {v}"
    );
    Ok(())
}

#[tokio::test]
async fn chaos_with_fence_agents_powers_the_old_host_off_before_each_takeover() -> Result<()> {
    let v = chaos_with(
        &["--seed", "7", "--block-ms", "250", "--fence-agents"],
        "freeze-active-host,partition-active,kill-active-coordinator",
    )?;
    ensure!(v["fence_agents"] == true && v["double_signs"] == 0, "{v}");
    ensure!(v["failovers"] == v["rounds"], "every round a failover: {v}");
    // Every takeover went through the agent.
    ensure!(
        v["fenced"] == v["rounds"],
        "not every old host was fenced: {v}"
    );
    Ok(())
}
