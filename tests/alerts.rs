//! The shipped Prometheus alert rules: their promtool unit tests, promtool's
//! lint of a live coordinator's /metrics, and a real Prometheus scraping a
//! real cluster that fires "no active validator" when the active host dies
//! while the cluster is paused, and "fence agent failing" when a frozen
//! host's fence agent hangs (and nobody takes over). Needs Debian's `prometheus` package
//! (promtool and prometheus), which `.ci/run` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, Fencing, NodeOpts, SETTLE};
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

/// A real Prometheus scraping every node of `c` every second and
/// evaluating the shipped rules.
struct Prometheus {
    addr: std::net::SocketAddr,
    _proc: Proc,
}

impl Prometheus {
    async fn start(c: &Cluster) -> Result<Prometheus> {
        let addr = free_addr()?;
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
            .arg(format!("--web.listen-address={addr}"));
        let p = Prometheus {
            addr,
            _proc: Proc::spawn("prometheus", &mut cmd, c.dir.path())?,
        };
        let n = c.nodes.len();
        eventually(SETTLE, "prometheus to scrape every node", || async {
            let v: serde_json::Value = reqwest::get(format!("http://{addr}/api/v1/query?query=up"))
                .await?
                .json()
                .await?;
            let up = v["data"]["result"]
                .as_array()
                .map(|r| r.iter().filter(|s| s["value"][1] == "1").count());
            Ok((up == Some(n)).then_some(()))
        })
        .await?;
        Ok(p)
    }

    async fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = reqwest::get(format!("http://{}/api/v1/alerts", self.addr))
            .await?
            .json()
            .await?;
        Ok(v["data"]["alerts"].as_array().cloned().unwrap_or_default())
    }

    async fn firing(&self, name: &str) -> Result<bool> {
        Ok(self
            .alerts()
            .await?
            .iter()
            .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing"))
    }

    async fn wait_firing(&self, name: &str, limit: Duration) -> Result<()> {
        eventually(limit, &format!("{name} to fire"), || async {
            Ok(self.firing(name).await?.then_some(()))
        })
        .await
    }
}

#[tokio::test]
async fn prometheus_fires_no_active_validator_when_a_paused_clusters_active_host_dies() -> Result<()>
{
    let mut c = Cluster::start(3, 250, |_| NodeOpts::default()).await?;
    let prom = Prometheus::start(&c).await?;
    // Healthy, scraped and evaluated for a while: nothing about validators.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        !prom.firing("KeyraftNoActiveValidator").await?
            && !prom.firing("KeyraftMultipleActiveValidators").await?,
        "{:?}",
        prom.alerts().await?
    );

    let active = c.active().await?;
    ensure!(c.cli(active, &["pause"]).await?.status.success());
    // The node validating now: on a loaded host a lease can lapse and the
    // key move between the first look and the pause.
    let active = c.active().await?;
    c.kill_host(active)?;
    prom.wait_firing("KeyraftNoActiveValidator", Duration::from_secs(90))
        .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn prometheus_fires_fence_agent_failing_when_an_agent_hangs_and_nobody_takes_over(
) -> Result<()> {
    let c = Cluster::start(3, 250, |id| NodeOpts {
        witness: id == 3,
        fencing: Fencing::Hanging,
        flags: vec!["--fence-timeout".into(), "1s".into()],
        ..NodeOpts::default()
    })
    .await?;
    let prom = Prometheus::start(&c).await?;
    let old = c.active().await?;
    let standby = if old == 1 { 2 } else { 1 };
    let since = c.chain.totals().await?.height;
    c.freeze(old, true, true)?;
    prom.wait_firing("KeyraftFenceAgentFailing", Duration::from_secs(60))
        .await?;
    let refused = eventually(SETTLE, "the refusal in the standby's log", || async {
        let log = c.proc(standby)?.log_text();
        Ok(log
            .lines()
            .find(|l| l.contains("NOT TAKING OVER"))
            .map(str::to_string))
    })
    .await?;
    ensure!(
        refused.contains("did not finish within 1000 ms"),
        "{refused}"
    );
    let stats = c.chain.stats_since(since + 1).await?;
    ensure!(
        stats.first_signed_by(standby, since).is_none(),
        "the standby signed although its fence agent hung"
    );
    c.freeze(old, true, false)?;
    c.assert_no_double_signs().await?;
    Ok(())
}
