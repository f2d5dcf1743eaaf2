//! Operator commands against a real cluster, judged by the fake chain
//! where a key moves: `keyraft check` and its exit codes, `keyraft probe`,
//! a pause that holds in signer mode,
//! the NEAR preset's node-key links, a health URL that answers 404, and a
//! follower stopped (SIGTERM, as `systemctl stop` does) with its servers
//! drained.

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};

const BLOCK_MS: u64 = 250;

fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

#[tokio::test]
async fn check_exit_codes_name_the_failure() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, plain).await?;
    let active = c.active().await?;
    let code = |out: std::process::Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let healthy = eventually(SETTLE, "check to pass", || async {
        let (code, line) = code(c.cli(active, &["check"]).await?);
        Ok((code == Some(0)).then_some(line))
    })
    .await?;
    ensure!(healthy.starts_with("OK"), "{healthy}");

    let standby = (1..=3).find(|i| *i != active).unwrap_or(1);
    ensure!(c.cli(standby, &["pause"]).await?.status.success());
    // The key may have moved in a start-up handover since `active` was
    // read (a flake: node 3 was killed while node 1 already validated);
    // once paused it stays put, so ask again.
    let active = c.active().await?;
    let standby = (1..=3).find(|i| *i != active).unwrap_or(1);
    c.kill_coordinator(active)?;
    // The last answer, for the message when it never changes.
    let last = std::sync::Mutex::new(None);
    let seen = eventually(SETTLE, "check to see no validator", || async {
        let (code, line) = code(c.cli(standby, &["check"]).await?);
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, line.clone()));
        Ok((code == Some(4)).then_some((code, line)))
    })
    .await;
    let (no_validator, line) = match seen {
        Ok(seen) => seen,
        Err(e) => {
            // What the standby holds: the pause flag, the key's holder, terms.
            let status = c.status(standby).await;
            return Err(e.context(format!(
                "paused, then killed node {active}; last check from node {standby}: {:?}\nits status: {status:?}\n{}",
                last.lock().ok(),
                c.logs()
            )));
        }
    };
    ensure!(
        line.contains("no node is validating"),
        "{no_validator:?} {line}"
    );

    let other = (1..=3).find(|i| *i != active && *i != standby).unwrap_or(1);
    c.kill_coordinator(other)?;
    let line = eventually(SETTLE, "check to see no quorum", || async {
        let (code, line) = code(c.cli(standby, &["check"]).await?);
        Ok((code == Some(3)).then_some(line))
    })
    .await?;
    ensure!(line.contains("no quorum"), "{line}");
    c.forget(other)?;
    let (unreachable, _) = code(c.cli(active, &["check"]).await?);
    ensure!(
        unreachable == Some(1),
        "check against a dead admin port: {unreachable:?}"
    );
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn probe_prints_what_keyraft_sees_of_a_node() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, plain).await?;
    let active = c.active().await?;
    let url = format!("http://{}", c.nodes[&active].rpc);
    let out = tokio::process::Command::new(&c.keyraft)
        .args(["probe", "--health", "near", "--url", &url, "--json"])
        .output()
        .await?;
    ensure!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["running"] == true && v["synced"] == true && v["height"].as_u64() > Some(0),
        "{v}"
    );
    let down = tokio::process::Command::new(&c.keyraft)
        .args(["probe", "--health", "near", "--url", "http://127.0.0.1:9"])
        .output()
        .await?;
    let err = String::from_utf8_lossy(&down.stderr);
    ensure!(
        !down.status.success() && err.lines().count() == 1 && err.contains("unreachable"),
        "{down:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_near_preset_links_the_node_key_by_role() -> Result<()> {
    use localnet::keys::KeyFile;
    let keys = tempfile::tempdir()?;
    let shared = keys.path().join("validator_node_key.json");
    KeyFile::generate("node").write_new(&shared)?;
    let shared_pub = KeyFile::load(&shared)?.public_key;
    for id in 1..=3 {
        KeyFile::generate("node").write_new(&keys.path().join(format!("voter{id}.json")))?;
    }
    let dir = keys.path().to_path_buf();
    let c = Cluster::start(3, BLOCK_MS, |id| NodeOpts {
        flags: vec![
            "--validator-node-key".into(),
            shared.display().to_string(),
            "--voter-node-key".into(),
            dir.join(format!("voter{id}.json")).display().to_string(),
        ],
        ..NodeOpts::default()
    })
    .await?;
    let active = c.active().await?;
    for id in 1..=3 {
        let home = &c.nodes[&id].home;
        let node_key = std::fs::read_link(home.join("node_key.json"))?;
        let status =
            localnet::harness::get_json(&format!("http://{}/status", c.nodes[&id].rpc)).await?;
        if id == active {
            ensure!(
                node_key == shared,
                "active node {id} links {}",
                node_key.display()
            );
            ensure!(home.join("validator_key.json").exists());
            ensure!(status["node_public_key"] == shared_pub.as_str(), "{status}");
        } else {
            ensure!(
                node_key == dir.join(format!("voter{id}.json")),
                "standby {id} links {}",
                node_key.display()
            );
            ensure!(!home.join("validator_key.json").exists());
            ensure!(status["node_public_key"] != shared_pub.as_str(), "{status}");
        }
    }
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_health_url_that_answers_404_shows_in_status_and_the_log_once() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    // Node 3 restarted with a probe URL its node does not serve: it can
    // never become a healthy standby, and the operator must be told why.
    let rpc = c.nodes[&3].rpc;
    let own = |v: serde_json::Value| node_entry(&v, 3);
    c.kill_host(3)?;
    c.node_mut(3)?.opts.health_url = Some(format!("http://{rpc}/rpc/v1"));
    c.spawn(3)?;
    let err = eventually(SETTLE, "node 3 to report its probe error", || async {
        // Unreachable first, while the node starts; then its answer.
        let me = own(c.status(3).await?);
        Ok(me["probe_error"]
            .as_str()
            .filter(|e| e.contains("404"))
            .map(str::to_string))
    })
    .await?;
    ensure!(
        err.contains("/rpc/v1/status") && err.contains("404"),
        "probe error: {err}"
    );
    // A few more probes later, still one warning, naming the flag to check.
    c.chain
        .wait_height(c.chain.totals().await?.height + 4, SETTLE)
        .await?;
    let log = std::fs::read_to_string(&c.proc(3)?.log)?;
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("validator probe") && l.contains("404"))
        .collect();
    ensure!(
        warnings.len() == 1,
        "want one probe warning, got {warnings:?}"
    );
    ensure!(warnings[0].contains("--health-url"), "{}", warnings[0]);
    // A URL that already ends in /status is taken as it is.
    c.kill_host(3)?;
    c.node_mut(3)?.opts.health_url = Some(format!("http://{rpc}/status"));
    c.spawn(3)?;
    eventually(
        SETTLE,
        "node 3 to stand by with a working probe",
        || async {
            let me = own(c.status(3).await?);
            Ok((me["state"] == "Voting" && me["probe_error"].is_null()).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// An operator's command on a host restarted a moment ago never elects it
/// inside a lease it promised before the restart. The key's holder (node
/// A, its links to C cut, so that its lease rests on B's acks alone) is cut
/// off as B restarts: A's validator signs on until its 3-second lease ends.
/// C, which heard no leader for long, would vote for B at once; B's
/// `keyraft resume` must wait out B's restart quiet first, as a campaign
/// does, or B validates beside A. The chain judges.
#[tokio::test]
async fn an_operator_command_never_elects_a_host_inside_a_lease_it_promised() -> Result<()> {
    use anyhow::Context;
    let long_lease = |_| NodeOpts {
        flags: localnet::shape::LONG_LEASE.map(String::from).to_vec(),
        ..NodeOpts::default()
    };
    let mut c = Cluster::start(3, BLOCK_MS, long_lease).await?;
    let a = c.active().await?;
    let (b, cc) = match a {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    // A's lease rests on B alone; C hears no leader past its own lease.
    c.cut_link(a, cc);
    tokio::time::sleep(std::time::Duration::from_millis(4_500)).await;
    // B restarts, and A is cut off from it at the same moment.
    c.cut_link(a, b);
    c.kill_coordinator(b)?;
    drop(c.forget(b)?);
    c.spawn(b)?;
    let asked = std::time::Instant::now();
    let out = eventually(SETTLE * 3, "B to run the operator's command", || async {
        let out = c.cli(b, &["resume"]).await?;
        Ok(out.status.success().then_some(out))
    })
    .await
    .with_context(|| c.logs())?;
    ensure!(out.status.success());
    let (new, _) = c.wait_signer(c.chain.totals().await?.height, &[a]).await?;
    let s = c
        .assert_no_double_signs()
        .await
        .with_context(|| format!("node {new} validated inside node {a}'s lease"))?;
    eprintln!(
        "operator command after a restart: answered in {:?}, node {new} validates; {} heights, {} missed, 0 double signs",
        asked.elapsed(),
        s.height,
        s.missed
    );
    Ok(())
}

/// A paused signer cluster does not fail over: with the leader's host
/// killed, nobody signs until an operator resumes. (After nearly every
/// signature a follower holds entries it has not applied; in validator
/// mode that unsettles its applied pause, in signer mode it must not.)
#[tokio::test]
async fn a_paused_signer_cluster_does_not_fail_over_until_resumed() -> Result<()> {
    let mode = localnet::cluster::Mode::signer("keyraft-pause-test");
    let mut c = Cluster::start_signers(3, 500, mode, plain).await?;
    c.chain.wait_signed_by(0, &[1, 2, 3], SETTLE).await?;
    let l = eventually(SETTLE, "a signer leader", || async {
        Ok(c.status(1).await?["cluster"]["leader"].as_u64())
    })
    .await?;
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    ensure!(c.cli(rest[0], &["pause"]).await?.status.success());
    let paused = c.chain.totals().await?;
    c.chain
        .wait_signed_by(paused.height, &[1, 2, 3], SETTLE)
        .await?;
    c.kill_host(l)?;
    let killed = c.chain.totals().await?.height;
    // Six heights: several times a failover's length.
    c.chain.wait_height(killed + 6, SETTLE).await?;
    let s = c.chain.stats_since(killed + 2).await?;
    ensure!(
        rest.iter()
            .all(|n| s.first_signed_by(*n, killed + 1).is_none()),
        "signed while paused: {:?}\n{}",
        s.signers,
        c.logs()
    );
    ensure!(c.cli(rest[0], &["resume"]).await?.status.success());
    c.chain.wait_signed_by(killed + 6, &rest, SETTLE).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A follower stops on SIGTERM without waiting out its servers' drain:
/// the leader's streams of appends to it end when its servers are told to
/// stop (a quiet one would keep its peer port open until the drain gave
/// up, 2 s).
#[tokio::test]
async fn a_follower_stops_on_sigterm_with_its_servers_drained() -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, plain).await?;
    let (leader, _) = eventually(SETTLE, "all three to agree on a leader", || {
        c.agreed_leader(&[1, 2, 3])
    })
    .await?;
    let follower = (1..=3).find(|i| *i != leader).context("no follower")?;
    c.signal(follower, nix::sys::signal::Signal::SIGTERM)?;
    let mut stopped = c.forget(follower)?.context("no process")?;
    let status = stopped.wait_exit(SETTLE).await?;
    let log = stopped.log_tail(200);
    ensure!(status.success(), "SIGTERM exit: {status}\n{log}");
    ensure!(
        log.contains("stopped") && !log.contains("did not drain in time"),
        "node {follower} did not drain its servers:\n{log}"
    );
    c.assert_no_double_signs().await?;
    Ok(())
}
