//! `localnet docker-test`: the Docker Compose cluster under host-level
//! faults, judged by the chain. With `--cometbft`, the signer-mode cluster
//! (`docker-compose.cometbft.yml`): the faults hit the signer leader, and
//! every fault, `docker pause` included, must end with 0 equivocations.
//!
//! Owns: the files the compose cluster mounts (keys, certificates), driving
//! `docker-compose` and `docker` (network disconnect, kill, pause) and
//! restoring each fault, and the verdict. Must not: leave containers or
//! networks behind; the cluster is taken down even when a check fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::harness::{eventually, free_port, sibling_bin, ChainClient};
use crate::keys::KeyFile;

pub struct DockerTestOptions {
    pub compose_file: PathBuf,
    pub image: String,
    pub rounds: usize,
    pub block_ms: u64,
    /// Failover bound: a new signer must appear within this long.
    pub bound: Duration,
    /// Signer mode (CometBFT).
    pub cometbft: bool,
    /// Busy-looping processes on the host through every round.
    pub load: usize,
}

const NODES: u64 = 3;
/// How long docker-compose waits for one answer of the engine.
const COMPOSE_HTTP_TIMEOUT_S: &str = "300";
/// How many times `up` is tried.
const COMPOSE_UP_TRIES: u32 = 3;

/// The uid (and gid) of the image's `validator` user (see the Dockerfile).
const VALIDATOR_UID: u32 = 7000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Disconnect,
    Kill,
    Pause,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Disconnect => "network_disconnect",
            Fault::Kill => "docker_kill",
            Fault::Pause => "docker_pause",
        }
    }
}

/// Takes the compose project down when dropped.
struct Project {
    name: String,
    compose_file: PathBuf,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("docker-compose")
            .args(["-p", &self.name, "-f"])
            .arg(&self.compose_file)
            .args(args)
            // docker-compose 1.x gives up on a busy engine after 60 s
            // ("An HTTP request took too long to complete").
            .env("COMPOSE_HTTP_TIMEOUT", COMPOSE_HTTP_TIMEOUT_S)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .context("cannot run docker-compose")?;
        ensure!(
            out.status.success(),
            "docker-compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `up -d` is idempotent, so a try that timed out on a busy engine is
    /// tried again, a few times.
    fn up(&self) -> Result<()> {
        let mut tries = 1;
        loop {
            match self.compose(&["up", "-d"]) {
                Err(e) if tries < COMPOSE_UP_TRIES => {
                    eprintln!("{e:#}; trying again");
                    tries += 1;
                }
                done => return done.map(|_| ()),
            }
        }
    }

    fn container(&self, node: u64) -> Result<String> {
        let id = self.compose(&["ps", "-q", &format!("node{node}")])?;
        ensure!(!id.is_empty(), "no container for node{node}");
        Ok(id)
    }

    fn network(&self) -> String {
        format!("{}_peers", self.name)
    }

    /// Each node's state and the tail of its log, for a failure report.
    fn diagnose(&self) -> String {
        let mut out = format!("states: {:?}\n", own_states(self).unwrap_or_default());
        for n in 1..=NODES {
            let Ok(c) = self.container(n) else { continue };
            if let Ok(o) = Command::new("docker")
                .args(["logs", "--tail", "40", &c])
                .output()
            {
                out.push_str(&format!("--- node{n} ---\n"));
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
            }
        }
        out
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.name),
            ])
            .output()
            .map(|o| {
                for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["unpause", id]).output();
                }
            });
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "2"]);
    }
}

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker")?;
    ensure!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The files the compose file mounts at /etc/keyraft.
fn make_run_dir(dir: &Path, cometbft: bool) -> Result<()> {
    if cometbft {
        crate::comet::key::ValidatorKey::generate()
            .write_new(&dir.join("priv_validator_key.json"))?;
    } else {
        let key = KeyFile::generate("validator.docker");
        key.write_new(&dir.join("validator_key.json"))?;
        // The image's `validator` user runs the node and reads its key.
        let uid = nix::unistd::Uid::from_raw(VALIDATOR_UID);
        let gid = nix::unistd::Gid::from_raw(VALIDATOR_UID);
        nix::unistd::chown(&dir.join("validator_key.json"), Some(uid), Some(gid))?;
        std::fs::write(
            dir.join("validator_pub.json"),
            serde_json::to_vec(
                &json!({"account_id": key.account_id, "public_key": key.public_key}),
            )?,
        )?;
    }
    let keyraft = sibling_bin("keyraft")?;
    let ca = dir.join("ca");
    let run = |args: &[&str], out: &Path| crate::cluster::certs(&keyraft, args, out);
    run(&["ca"], &ca)?;
    for n in 1..=NODES {
        let id = n.to_string();
        let ca_arg = ca.display().to_string();
        run(
            &[
                "node",
                "--ca",
                &ca_arg,
                "--id",
                &id,
                "--dns",
                &format!("node{n}.peers"),
            ],
            &dir.join(format!("n{n}/tls")),
        )?;
    }
    // fence_docker's mTLS to the Docker API bridge, and the bridge's own,
    // from a CA of their own: a node's peer certificate opens nothing there.
    let fence_ca = dir.join("fence-ca");
    run(&["ca"], &fence_ca)?;
    let fence_ca_arg = fence_ca.display().to_string();
    run(
        &[
            "node",
            "--ca",
            &fence_ca_arg,
            "--id",
            "100",
            "--dns",
            "dockerapi",
        ],
        &dir.join("dockerapi"),
    )?;
    run(
        &["node", "--ca", &fence_ca_arg, "--id", "101"],
        &dir.join("fencer"),
    )?;
    std::fs::remove_file(fence_ca.join("ca.key"))?;
    // The CA key is not needed inside the cluster.
    std::fs::remove_file(ca.join("ca.key"))?;
    Ok(())
}

/// Each node's own view of its state (`None` if it does not answer).
fn own_states(p: &Project) -> Result<Vec<(u64, Option<String>)>> {
    let mut states = Vec::new();
    for n in 1..=NODES {
        let c = p.container(n)?;
        let state = docker(&["exec", &c, "keyraft", "status", "--json"])
            .ok()
            .and_then(|out| serde_json::from_str::<Value>(&out).ok())
            .and_then(|v| {
                v["nodes"]
                    .as_array()
                    .and_then(|ns| ns.iter().find(|x| x["id"] == n))
                    .and_then(|me| me["state"].as_str().map(str::to_string))
            });
        states.push((n, state));
    }
    Ok(states)
}

/// Whether every node says its kernel fence is on.
fn kernel_fence_everywhere(p: &Project) -> Result<bool> {
    for n in 1..=NODES {
        let c = p.container(n)?;
        let v: Value =
            serde_json::from_str(&docker(&["exec", &c, "keyraft", "status", "--json"])?)?;
        let on = v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|x| x["id"] == n))
            .is_some_and(|me| me["kernel_fence"] == "on");
        if !on {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Hosts the fence agents confirmed off, as the nodes logged it.
fn fenced(p: &Project) -> usize {
    (1..=NODES)
        .filter_map(|n| p.container(n).ok())
        .filter_map(|c| Command::new("docker").args(["logs", &c]).output().ok())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("confirmed node")
                .count()
                + String::from_utf8_lossy(&o.stderr)
                    .matches("confirmed node")
                    .count()
        })
        .sum()
}

/// Signer mode: every node in Voting, a leader, every sentry signing.
/// Returns the leader.
async fn settle_signers(p: &Project, chain: &ChainClient) -> Result<u64> {
    // Signatures made from now on only: a sentry that just died must not
    // pass for a live one by what it signed before.
    let from = chain.totals().await?.height;
    let settled = eventually(
        Duration::from_secs(90),
        "a signer leader and every sentry signing",
        || async {
            let states = own_states(p)?;
            if states.iter().any(|(_, s)| s.as_deref() != Some("Voting")) {
                return Ok(None);
            }
            let mut leader = None;
            for n in 1..=NODES {
                let c = p.container(n)?;
                leader = docker(&["exec", &c, "keyraft", "status", "--json"])
                    .ok()
                    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                    .and_then(|v| v["cluster"]["leader"].as_u64());
                if leader.is_some() {
                    break;
                }
            }
            let Some(leader) = leader else {
                return Ok(None);
            };
            let s = chain.stats_since(from + 1).await?;
            let all = (1..=NODES).all(|n| s.first_signed_by(n, from).is_some());
            Ok(all.then_some(leader))
        },
    )
    .await;
    settled.with_context(|| p.diagnose())
}

/// The node the faults hit once the cluster has settled: the validating
/// node, or in signer mode the signer leader.
async fn settle(p: &Project, chain: &ChainClient, cometbft: bool) -> Result<u64> {
    if cometbft {
        settle_signers(p, chain).await
    } else {
        settle_validator(p, chain).await
    }
}

/// Exactly one node validating and signing, the others synced standbys.
async fn settle_validator(p: &Project, chain: &ChainClient) -> Result<u64> {
    let settled = eventually(
        Duration::from_secs(90),
        "one validating node and two standbys",
        || async {
            let states = own_states(p)?;
            let validating: Vec<u64> = states
                .iter()
                .filter(|(_, s)| s.as_deref() == Some("Validating"))
                .map(|(n, _)| *n)
                .collect();
            let voting = states
                .iter()
                .filter(|(_, s)| s.as_deref() == Some("Voting"))
                .count();
            let [active] = validating.as_slice() else {
                return Ok(None);
            };
            let h = chain.totals().await?.height;
            let signing = chain
                .stats_since(h.saturating_sub(2))
                .await?
                .signers
                .iter()
                .any(|x| x.node == *active);
            Ok((signing && voting == NODES as usize - 1).then_some(*active))
        },
    )
    .await;
    settled.with_context(|| p.diagnose())
}

pub async fn run(o: DockerTestOptions) -> Result<(Value, bool)> {
    docker(&["version", "--format", "{{.Server.Version}}"]).context("no Docker engine")?;
    docker(&["image", "inspect", &o.image])
        .with_context(|| format!("no image {} (run localnet/docker/build-image.sh)", o.image))?;
    let run_dir = tempfile::Builder::new()
        .prefix("keyraft-docker-")
        .tempdir()?;
    make_run_dir(run_dir.path(), o.cometbft)?;
    let chain_port = free_port()?;
    let mut project = Project {
        name: format!("keyraft{}", std::process::id()),
        compose_file: o.compose_file.clone(),
        env: vec![
            ("RUN_DIR".into(), run_dir.path().display().to_string()),
            ("CHAIN_PORT".into(), chain_port.to_string()),
            ("IMAGE".into(), o.image.clone()),
            ("BLOCK_MS".into(), o.block_ms.to_string()),
        ],
    };
    let project_name = project.name.clone();
    project.env.push(("PROJECT".into(), project_name));
    project.up()?;
    let chain = ChainClient::new(&format!("http://127.0.0.1:{chain_port}"));
    if o.cometbft {
        // A new key: tell the cluster so (nothing is signed before).
        let c = project.container(1)?;
        eventually(
            Duration::from_secs(60),
            "the new key's watermark",
            || async {
                Ok(docker(&[
                    "exec",
                    &c,
                    "keyraft",
                    "signer",
                    "import-state",
                    "--never-signed",
                ])
                .ok()
                .map(|_| ()))
            },
        )
        .await
        .with_context(|| project.diagnose())?;
    }
    let first = settle(&project, &chain, o.cometbft)
        .await
        .context("the cluster did not come up")?;
    let kernel_fence = !o.cometbft && kernel_fence_everywhere(&project)?;
    if !o.cometbft && !kernel_fence {
        bail!(
            "the kernel fence is off in a container: {}",
            project.diagnose()
        );
    }
    let _load = (0..o.load)
        .map(|i| {
            crate::harness::Proc::spawn(
                &format!("load{i}"),
                Command::new("sh").args(["-c", "while :; do :; done"]),
                run_dir.path(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    println!(
        "docker cluster up; node {first} {}",
        if o.cometbft {
            "leads the signers"
        } else {
            "validates"
        }
    );

    let mut rounds = Vec::new();
    let mut failed = Vec::new();
    for round in 0..o.rounds {
        for fault in [Fault::Disconnect, Fault::Kill, Fault::Pause] {
            let active = settle(&project, &chain, o.cometbft).await?;
            let container = project.container(active)?;
            let before = chain.totals().await?;
            let t0 = Instant::now();
            match fault {
                Fault::Disconnect => {
                    docker(&["network", "disconnect", &project.network(), &container])?
                }
                Fault::Kill => docker(&["kill", &container])?,
                Fault::Pause => docker(&["pause", &container])?,
            };
            let new = eventually(Duration::from_secs(60), "a new signer", || async {
                let s = chain.stats_since(before.height + 1).await?;
                if o.cometbft {
                    // Every other sentry signing again.
                    let others: Vec<u64> = (1..=NODES).filter(|n| *n != active).collect();
                    let all = others
                        .iter()
                        .all(|n| s.first_signed_by(*n, before.height).is_some());
                    return Ok(all.then_some(others[0]));
                }
                Ok(s.signers.iter().find(|x| x.node != active).map(|x| x.node))
            })
            .await;
            let took = t0.elapsed();
            // Undo the fault; the successor's fence agent may have powered
            // the container off meanwhile (then it is started again).
            match fault {
                Fault::Disconnect => {
                    let alias = format!("node{active}.peers");
                    docker(&[
                        "network",
                        "connect",
                        "--alias",
                        &alias,
                        &project.network(),
                        &container,
                    ])?;
                }
                Fault::Kill => {}
                Fault::Pause => {
                    if docker(&["inspect", "-f", "{{.State.Paused}}", &container])? == "true" {
                        docker(&["unpause", &container])?;
                    }
                }
            };
            for n in 1..=NODES {
                let c = project.container(n)?;
                if docker(&["inspect", "-f", "{{.State.Running}}", &c])? != "true" {
                    docker(&["start", &c])?;
                }
            }
            let after_active = settle(&project, &chain, o.cometbft)
                .await
                .with_context(|| format!("no recovery after {}", fault.name()))?;
            let after = chain.totals().await?;
            let double = after.double_signs - before.double_signs;
            let ms = took.as_millis() as u64;
            println!(
                "round {round} {:<18} node {active} -> {}: {ms} ms, missed {}, double signs {double}; after recovery node {after_active} {}",
                fault.name(),
                new.as_ref().map_or("none".to_string(), |n| n.to_string()),
                after.missed - before.missed,
                if o.cometbft { "leads the signers" } else { "validates" }
            );
            if new.is_err() || took > o.bound {
                failed.push(format!(
                    "{}: no new signer within {:?}",
                    fault.name(),
                    o.bound
                ));
            }
            // Every fault, `docker pause` included: signer mode fences the
            // signature; validator mode the kernel fence in the container
            // and the successor's fence agent, which stops the container.
            if double > 0 {
                failed.push(format!("{}: {double} double signs", fault.name()));
            }
            rounds.push(json!({
                "fault": fault.name(), "from": active, "to": new.ok(), "failover_ms": ms,
                "missed": after.missed - before.missed, "double_signs": double,
            }));
        }
    }
    let total = chain.totals().await?;
    let summary = json!({
        "mode": if o.cometbft { "signer" } else { "validator" },
        "rounds": rounds,
        "double_signs": total.double_signs,
        "kernel_fence": kernel_fence,
        "fenced": if o.cometbft { 0 } else { fenced(&project) },
        "load": o.load,
        "failures": failed,
    });
    if !failed.is_empty() {
        eprintln!("docker test failed: {}", failed.join("; "));
    }
    drop(project);
    Ok((summary, failed.is_empty()))
}

/// The compose file shipped beside this crate (the signer-mode one with
/// `cometbft`).
pub fn default_compose_file(cometbft: bool) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(if cometbft {
        "docker/docker-compose.cometbft.yml"
    } else {
        "docker/docker-compose.yml"
    })
}

/// For error messages of the CLI.
pub fn check_tools() -> Result<()> {
    for tool in ["docker", "docker-compose"] {
        if Command::new(tool).arg("version").output().is_err() {
            bail!("{tool} is not installed");
        }
    }
    Ok(())
}
