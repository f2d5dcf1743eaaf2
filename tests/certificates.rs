//! Certificates over real processes: renewals taken on SIGHUP without a
//! restart, and `keyraft check --config`, the preflight of a configuration.

use anyhow::{ensure, Result};
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, free_addr, node_entry};
use nix::sys::signal::Signal;

fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

/// A 3-second lease: what this file tests is renewal, and on a loaded
/// 2-core CI machine the LAN lease (350 ms) lapses now and then on its
/// own (round trips of 300-400 ms seen), which the chain counts as missed
/// heights that no renewal caused.
fn long_lease(_: u64) -> NodeOpts {
    NodeOpts {
        flags: localnet::shape::LONG_LEASE.map(String::from).to_vec(),
        ..NodeOpts::default()
    }
}

/// The end of validity of the certificate the peer port at `addr` presents
/// (read with openssl; the handshake stops at our missing client
/// certificate, after the server's has been sent).
fn presented_not_after(addr: std::net::SocketAddr) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -enddate"
        ))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        text.starts_with("notAfter="),
        "no server certificate: {text:?}"
    );
    Ok(text)
}

#[tokio::test]
async fn renewed_certificates_are_reloaded_on_sighup_and_their_expiry_is_shown() -> Result<()> {
    let c = Cluster::start(3, 250, plain).await?;
    eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    let expiry = || async {
        c.metric(1, r#"keyraft_tls_cert_expiry_seconds{cert="node"}"#)
            .await
    };
    ensure!(
        expiry().await? > 300.0 * 86_400.0,
        "the harness's certificates live a year"
    );
    let first = presented_not_after(c.nodes[&1].listen)?;

    // A certificate for another node, put in place: refused, nothing changes.
    let tls = c.nodes[&1].tls.clone();
    let renew = |id: &str, days: &str, out: &std::path::Path| {
        localnet::cluster::certs(
            &c.keyraft,
            &[
                "node",
                "--ca",
                &c.dir.path().join("ca").display().to_string(),
                "--id",
                id,
                "--ip",
                "127.0.0.1",
                "--days",
                days,
            ],
            out,
        )
    };
    let scratch = tempfile::tempdir()?;
    let wrong = scratch.path().join("wrong");
    renew("2", "10", &wrong)?;
    let backup = scratch.path().join("backup");
    std::fs::create_dir_all(&backup)?;
    for f in ["node.pem", "node.key"] {
        std::fs::copy(tls.join(f), backup.join(f))?;
        std::fs::copy(wrong.join(f), tls.join(f))?;
    }
    c.proc(1)?.signal(Signal::SIGHUP)?;
    let log = c.proc(1)?.log.clone();
    eventually(SETTLE, "the wrong certificate refused", || async {
        Ok(std::fs::read_to_string(&log)?
            .contains("SIGHUP: keeping the certificates in use")
            .then_some(()))
    })
    .await?;
    ensure!(
        expiry().await? > 300.0 * 86_400.0,
        "a refused certificate was taken"
    );
    ensure!(presented_not_after(c.nodes[&1].listen)? == first);

    // Node 1's own renewal, valid for 10 days, caught half-written (the new
    // certificate beside the old key): refused too.
    for f in ["node.pem", "node.key"] {
        std::fs::copy(backup.join(f), tls.join(f))?;
    }
    let renewed = scratch.path().join("renewed");
    renew("1", "10", &renewed)?;
    std::fs::copy(renewed.join("node.pem"), tls.join("node.pem"))?;
    c.proc(1)?.signal(Signal::SIGHUP)?;
    eventually(SETTLE, "the half-written renewal refused", || async {
        let log = std::fs::read_to_string(&log)?;
        Ok((log
            .matches("SIGHUP: keeping the certificates in use")
            .count()
            == 2)
            .then_some(()))
    })
    .await?;
    ensure!(presented_not_after(c.nodes[&1].listen)? == first);
    // Then whole: taken without a restart.
    std::fs::copy(renewed.join("node.key"), tls.join("node.key"))?;
    let pid = c.proc(1)?.pid();
    c.proc(1)?.signal(Signal::SIGHUP)?;
    eventually(SETTLE, "the renewed certificate's expiry", || async {
        Ok((expiry().await? < 11.0 * 86_400.0).then_some(()))
    })
    .await?;
    ensure!(c.proc(1)?.pid() == pid, "the coordinator restarted");
    let now = presented_not_after(c.nodes[&1].listen)?;
    ensure!(now != first, "the peer port still presents {first}");
    // Status says so, in JSON and in the table.
    let me = node_entry(&c.status(1).await?, 1);
    ensure!(
        matches!(me["tls_cert"]["expires_in_days"].as_i64(), Some(9 | 10)),
        "{me}"
    );
    let table = c.cli(1, &["status"]).await?;
    ensure!(
        String::from_utf8_lossy(&table.stdout).contains("certificate expires in"),
        "{table:?}"
    );
    // New connections both ways use it: cut node 1 off and heal it (the
    // proxies close connections that lived through a cut).
    c.isolate(1);
    let before_heal = std::time::Instant::now();
    c.heal();
    eventually(SETTLE, "node 1 back in its peers' view", || async {
        let v = c.status(2).await?;
        let n1 = node_entry(&v, 1);
        let fresh = n1["last_seen_ms"]
            .as_u64()
            .is_some_and(|ms| u128::from(ms) < before_heal.elapsed().as_millis());
        Ok((fresh && v["cluster"]["quorum"] == true).then_some(()))
    })
    .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// `keyraft certs renew` on every member of a live cluster, one at a time,
/// each taken on SIGHUP: the validator signs every height through it, and
/// afterwards every peer port presents its renewed certificate and the
/// members reconnect with them. A renewal from another CA, or longer than
/// the CA lives, is refused and leaves the files as they were.
#[tokio::test]
async fn every_member_renews_in_place_while_the_cluster_validates() -> Result<()> {
    let c = Cluster::start(3, 250, long_lease).await?;
    let active = c.active().await?;
    let before = c.chain.totals().await?;
    let ca = c.dir.path().join("ca").display().to_string();
    let renew = |args: &[&str]| {
        std::process::Command::new(&c.keyraft)
            .args(["certs", "renew"])
            .args(args)
            .output()
    };
    let tls1 = c.nodes[&1].tls.display().to_string();
    let pem = || std::fs::read(c.nodes[&1].tls.join("node.pem"));
    let untouched = pem()?;
    let other = tempfile::tempdir()?;
    localnet::cluster::certs(&c.keyraft, &["ca"], &other.path().join("ca"))?;
    let other_ca = other.path().join("ca").display().to_string();
    // A renewal cut short (a new certificate beside the old key).
    let half = other.path().join("half");
    std::fs::create_dir_all(&half)?;
    for (from, f) in [(1, "ca.pem"), (1, "node.key"), (2, "node.pem")] {
        std::fs::copy(c.nodes[&from].tls.join(f), half.join(f))?;
    }
    let half = half.display().to_string();
    for (args, why) in [
        (vec!["--ca", &ca, &half], "are not a pair"),
        (vec!["--ca", &other_ca, &tls1], "does not hold the CA"),
        (
            vec!["--ca", &ca, "--days", "4000", &tls1],
            "would outlive the CA",
        ),
    ] {
        let out = renew(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && err.contains(why) && err.lines().count() == 1,
            "{args:?}: {out:?}"
        );
        ensure!(pem()? == untouched, "a refused renewal changed node.pem");
        ensure!(!other.path().join("half/node.pem.old").exists());
    }

    for id in [1, 2, 3] {
        let first = presented_not_after(c.nodes[&id].listen)?;
        let tls = c.nodes[&id].tls.display().to_string();
        let out = renew(&["--ca", &ca, "--days", "30", &tls])?;
        ensure!(out.status.success(), "renew node {id}: {out:?}");
        ensure!(c.nodes[&id].tls.join("node.pem.old").exists());
        c.proc(id)?.signal(Signal::SIGHUP)?;
        eventually(SETTLE, "the renewed certificate in use", || async {
            let left = c
                .metric(id, r#"keyraft_tls_cert_expiry_seconds{cert="node"}"#)
                .await?;
            Ok((left < 31.0 * 86_400.0).then_some(()))
        })
        .await?;
        ensure!(presented_not_after(c.nodes[&id].listen)? != first);
    }
    // Fresh connections between all three, on renewed certificates only:
    // each standby is cut off and healed (the proxies drop what lived
    // through the cut), and comes back into its peers' view.
    for id in [1, 2, 3].into_iter().filter(|&id| id != active) {
        c.isolate(id);
        let cut = std::time::Instant::now();
        c.heal();
        eventually(SETTLE, "the standby back in the leader's view", || async {
            let n = node_entry(&c.status(active).await?, id);
            let fresh = n["last_seen_ms"]
                .as_u64()
                .is_some_and(|ms| u128::from(ms) < cut.elapsed().as_millis());
            Ok(fresh.then_some(()))
        })
        .await?;
    }
    // A few more heights on the renewed connections, then the judge.
    let since = c.chain.totals().await?.height;
    c.chain.wait_height(since + 4, SETTLE).await?;
    let after = c.assert_no_double_signs().await?;
    ensure!(
        after.missed == before.missed,
        "heights {}..{}, missed {} -> {}\n{}",
        before.height,
        after.height,
        before.missed,
        after.missed,
        c.logs()
    );
    ensure!(c.own_state(active).await? == "Validating");
    Ok(())
}

/// `keyraft check --config FILE`: (exit code, stdout lines, stderr).
async fn preflight(c: &Cluster, file: &std::path::Path) -> Result<(i32, Vec<String>, String)> {
    let out = tokio::process::Command::new(&c.keyraft)
        .args(["check", "--config"])
        .arg(file)
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

#[tokio::test]
async fn check_with_a_config_file_checks_certificates_peers_clocks_and_the_validator() -> Result<()>
{
    let mut c = Cluster::start(3, 250, plain).await?;
    eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    // Node 1's configuration as a first start would use it, beside the
    // running node (its own data dir, another port).
    let scratch = tempfile::tempdir()?;
    std::fs::create_dir_all(scratch.path().join("home"))?;
    let config = |tls: &std::path::Path| -> Result<String> {
        Ok(format!(
            "node-id = 1\nlisten = \"127.0.0.1:{}\"\ndata-dir = \"{}\"\ntls-dir = \"{}\"\n\
             peer = [\"2={}\", \"3={}\"]\nvalidator-home = \"{}\"\nvalidator-key = \"{}\"\n\
             health = \"near\"\nhealth-url = \"http://{}\"\ncommand = [\"/bin/true\"]\n",
            free_addr()?.port(),
            scratch.path().join("data").display(),
            tls.display(),
            c.nodes[&2].listen,
            c.nodes[&3].listen,
            scratch.path().join("home").display(),
            c.key_path.display(),
            c.nodes[&1].rpc,
        ))
    };
    // Node 2's host has a fence agent (localnet's, which sees it on).
    let agent = |node: u64, path: &std::path::Path| {
        format!(
            "fence-agent = [\"{node}={}\"]\nfence-option = [\"{node}:plug={}\"]\n",
            path.display(),
            c.nodes[&node]
                .data
                .parent()
                .unwrap_or(&c.nodes[&node].data)
                .display()
        )
    };
    let fakefence = localnet::harness::sibling_bin("fakefence")?;
    let file = scratch.path().join("keyraft.toml");
    std::fs::write(&file, config(&c.nodes[&1].tls)? + &agent(2, &fakefence))?;
    let (code, lines, err) = preflight(&c, &file).await?;
    ensure!(code == 0, "exit {code}: {lines:?} {err}");
    for want in [
        "ok   configuration: node 1",
        "ok   certificate: node-1.keyraft",
        "ok   CA certificate",
        "ok   peer 2",
        "ok   peer 3",
        "ok   fence agent for node 2: ",
        "ok   validator",
    ] {
        ensure!(
            lines.iter().any(|l| l.starts_with(want)),
            "no line {want:?} in {lines:?}"
        );
    }
    ensure!(
        lines.iter().filter(|l| l.contains("clock offset")).count() == 2,
        "{lines:?}"
    );
    ensure!(
        !scratch.path().join("data").exists(),
        "the check wrote a data dir"
    );

    // Another node's certificate: this node could not prove who it is.
    std::fs::write(&file, config(&c.nodes[&2].tls)?)?;
    let (code, lines, _) = preflight(&c, &file).await?;
    ensure!(
        code == 1
            && lines
                .iter()
                .any(|l| l.starts_with("FAIL certificate")
                    && l.contains("not a certificate for node 1")),
        "exit {code}: {lines:?}"
    );

    // A fence agent that fails: its line says so, and the exit code.
    std::fs::write(
        &file,
        config(&c.nodes[&1].tls)? + &agent(2, std::path::Path::new("/bin/false")),
    )?;
    let (code, lines, _) = preflight(&c, &file).await?;
    ensure!(
        code == 1
            && lines.iter().any(
                |l| l.starts_with("FAIL fence agent for node 2") && l.contains("exit status 1")
            ),
        "exit {code}: {lines:?}"
    );

    // A peer down: its line says so, and the exit code.
    std::fs::write(&file, config(&c.nodes[&1].tls)?)?;
    c.kill_host(3)?;
    let (code, lines, _) = preflight(&c, &file).await?;
    ensure!(
        code == 1
            && lines.iter().any(|l| l.starts_with("FAIL peer 3"))
            && lines.iter().any(|l| l.starts_with("ok   peer 2")),
        "exit {code}: {lines:?}"
    );

    // A file keyraft run would refuse: one line on stderr, exit 2.
    std::fs::write(&file, "node-id = 0\n")?;
    let (code, lines, err) = preflight(&c, &file).await?;
    ensure!(
        code == 2 && lines.is_empty() && err.lines().count() == 1,
        "exit {code}: {lines:?} {err}"
    );
    // The killed host may have been the active one.
    c.assert_no_double_signs().await?;
    Ok(())
}
