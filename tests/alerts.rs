//! The shipped Prometheus alert rules: their promtool unit tests, promtool's
//! lint of a live coordinator's /metrics, and a real Prometheus scraping a
//! real cluster that fires "no active validator" when the active host dies
//! while the cluster is paused. Needs Debian's `prometheus` package
//! (promtool and prometheus), which `.ci/run` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, free_addr, Proc};

fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts")
}

fn tool(name: &str) -> Result<Command> {
    ensure!(
        Command::new(name).arg("--version").output().is_ok(),
        "{name} is not installed: apt-get install prometheus (Debian's package has promtool and prometheus)"
    );
    Ok(Command::new(name))
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() -> Result<()> {
    let check = tool("promtool")?
        .args(["check", "rules", "keyraft.rules.yml"])
        .current_dir(alerts_dir())
        .output()?;
    ensure!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = tool("promtool")?
        .args(["test", "rules", "keyraft.rules.test.yml"])
        .current_dir(alerts_dir())
        .output()?;
    ensure!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stdout)
    );
    Ok(())
}

#[tokio::test]
async fn live_metrics_pass_promtool_check_metrics() -> Result<()> {
    let c = Cluster::start(3, 250, |id| NodeOpts {
        witness: id == 3,
        ..NodeOpts::default()
    })
    .await?;
    let active = c.active().await?;
    for id in [active, 3] {
        let text = reqwest::get(format!("http://{}/metrics", c.nodes[&id].http))
            .await?
            .text()
            .await?;
        for name in [
            "keyraft_state",
            "keyraft_raft_term",
            "keyraft_quorum",
            "keyraft_peer_up",
            "keyraft_build_info",
        ] {
            ensure!(text.contains(name), "node {id} lacks {name}");
        }
        ensure!(
            text.contains("keyraft_validator_up") == (id != 3),
            "validator series on node {id}"
        );
        let mut lint = tool("promtool")?
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut lint.stdin.take().context("stdin")?, text.as_bytes())?;
        let out = lint.wait_with_output()?;
        ensure!(
            out.status.success(),
            "promtool check metrics on node {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn prometheus_fires_no_active_validator_when_a_paused_clusters_active_host_dies() -> Result<()>
{
    let mut c = Cluster::start(3, 250, |_| NodeOpts::default()).await?;
    let active = c.active().await?;
    let prom = free_addr()?;
    let targets: Vec<String> = c.nodes.values().map(|n| format!("'{}'", n.http)).collect();
    let config = c.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: keyraft\n    static_configs:\n      - targets: [{}]\n",
            alerts_dir().join("keyraft.rules.yml").display(),
            targets.join(", ")
        ),
    )?;
    let tsdb = c.dir.path().join("tsdb");
    let mut cmd = tool("prometheus")?;
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg(format!("--web.listen-address={prom}"));
    let _prometheus = Proc::spawn("prometheus", &mut cmd, c.dir.path())?;
    let api = format!("http://{prom}/api/v1/alerts");
    let alerts = || async {
        let v: serde_json::Value = reqwest::get(&api).await?.json().await?;
        Ok::<_, anyhow::Error>(v["data"]["alerts"].as_array().cloned().unwrap_or_default())
    };
    let firing = |alerts: &[serde_json::Value], name: &str| {
        alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
    };
    // Healthy, scraped and evaluated for a while: nothing about validators.
    eventually(SETTLE, "prometheus to scrape all three", || async {
        let v: serde_json::Value = reqwest::get(format!("http://{prom}/api/v1/query?query=up"))
            .await?
            .json()
            .await?;
        let up = v["data"]["result"]
            .as_array()
            .map(|r| r.iter().filter(|s| s["value"][1] == "1").count());
        Ok((up == Some(3)).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = alerts().await?;
    ensure!(
        !firing(&now, "KeyraftNoActiveValidator")
            && !firing(&now, "KeyraftMultipleActiveValidators"),
        "{now:?}"
    );

    ensure!(c.cli(active, &["pause"]).await?.status.success());
    // The node validating now: on a loaded host a lease can lapse and the
    // key move between the first look and the pause.
    let active = c.active().await?;
    c.kill_host(active)?;
    eventually(
        Duration::from_secs(90),
        "KeyraftNoActiveValidator to fire",
        || async {
            let now = alerts().await?;
            Ok(firing(&now, "KeyraftNoActiveValidator").then_some(()))
        },
    )
    .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}
