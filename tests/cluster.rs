//! The cluster layer over real processes, sockets, mTLS and data dirs:
//! election, restart with persisted state, peer authentication, abuse of
//! the ports, and the wiped-data-dir rule.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, free_addr, node_entry, Proc};
use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;

fn plain(_: u64) -> NodeOpts {
    NodeOpts::default()
}

#[tokio::test]
async fn three_nodes_elect_one_leader_and_all_report_it() -> Result<()> {
    let c = Cluster::start(3, 250, plain).await?;
    let (leader, term) = eventually(SETTLE, "all three to agree on a leader", || {
        c.agreed_leader(&[1, 2, 3])
    })
    .await?;
    let mut leaders = 0;
    for id in 1..=3 {
        let v = c.status(id).await?;
        let me = node_entry(&v, id);
        leaders += usize::from(me["raft"] == "Leader");
        ensure!(
            v["cluster"]["members"] == serde_json::json!([1, 2, 3]),
            "{v}"
        );
    }
    ensure!(
        leaders == 1,
        "{leaders} nodes call themselves leader (leader {leader}, term {term})"
    );
    // The leader validates and the chain agrees.
    let active = c.active().await?;
    ensure!(
        active == leader,
        "node {active} validates but node {leader} leads"
    );
    c.assert_no_double_signs().await?;
    Ok(())
}

/// The raft state node `id` reports for itself in `keyraft status`.
async fn own_raft(c: &Cluster, id: u64) -> Result<String> {
    let me = node_entry(&c.status(id).await?, id);
    Ok(me["raft"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn an_isolated_leader_steps_down_within_the_lease_and_two_leaders_are_never_seen(
) -> Result<()> {
    let c = Cluster::start(3, 250, plain).await?;
    let (old, _) = eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    // election_timeout_max of the default (lan) timing profile.
    let lease = Duration::from_millis(600);
    c.isolate(old);
    let cut = std::time::Instant::now();
    let mut stepped_down = None;
    let mut two_since: Option<std::time::Instant> = None;
    let mut two_longest = Duration::ZERO;
    loop {
        // What a Prometheus scraping every node at this instant would see.
        let mut leaders = Vec::new();
        for id in 1..=3 {
            if c.metric(id, "keyraft_raft_leader").await? == 1.0 {
                leaders.push(id);
            }
        }
        if leaders.len() > 1 {
            let since = *two_since.get_or_insert_with(std::time::Instant::now);
            two_longest = two_longest.max(since.elapsed());
        } else {
            two_since = None;
        }
        if stepped_down.is_none() && !leaders.contains(&old) {
            stepped_down = Some(cut.elapsed());
        }
        if stepped_down.is_some() && leaders.len() == 1 && leaders[0] != old {
            break;
        }
        ensure!(
            cut.elapsed() < SETTLE,
            "no new leader with the old one stepped down (leaders {leaders:?}):\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stepped_down = stepped_down.unwrap_or_default();
    // The scrape loop above takes some tens of ms per round.
    ensure!(
        stepped_down < lease + Duration::from_millis(300),
        "the isolated leader claimed leadership for {stepped_down:?}"
    );
    ensure!(
        two_longest < lease,
        "two nodes had keyraft_raft_leader 1 for {two_longest:?}"
    );
    // Its own status says so too, while openraft still holds its old vote;
    // the others agree on a new leader.
    ensure!(
        own_raft(&c, old).await? == "LeaderWithoutQuorum",
        "isolated node {old} reports {}",
        own_raft(&c, old).await?
    );
    let (new, _) = eventually(SETTLE, "the others to agree on a leader", || {
        c.agreed_leader(&others)
    })
    .await?;
    ensure!(new != old);
    // Healed, it follows the new leader.
    c.heal();
    eventually(SETTLE, "the old leader to follow", || async {
        Ok((own_raft(&c, old).await? == "Follower").then_some(()))
    })
    .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

#[tokio::test]
async fn a_stopped_leader_is_replaced_and_rejoins_with_its_persisted_term_and_log() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let (old, _) = eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    // Let a few entries (activation, registrations) land on every node.
    eventually(SETTLE, "the leader's log to reach the others", || async {
        let mine = c.metric(old, "keyraft_raft_last_log_index").await?;
        let mut ok = mine >= 3.0;
        for id in (1..=3).filter(|i| *i != old) {
            ok &= c.metric(id, "keyraft_raft_applied_index").await? >= mine;
        }
        Ok(ok.then_some(()))
    })
    .await?;
    let term = c.metric(old, "keyraft_raft_term").await?;
    let log = c.metric(old, "keyraft_raft_last_log_index").await?;
    // Two scrapes at once add each fsync to the counters once: the
    // entries made durable are at most the log's entries (index 0 on),
    // as a later scrape shows its last index.
    let (a, b) = tokio::join!(c.metrics(old), c.metrics(old));
    let (a, b, third) = (a?, b?, c.metrics(old).await?);
    let last = c.metric(old, "keyraft_raft_last_log_index").await?;
    for m in [a, b, third] {
        let syncs = m["keyraft_raft_log_syncs_total"];
        let entries = m["keyraft_raft_log_entries_synced_total"];
        ensure!(
            syncs >= 1.0 && entries >= 1.0 && entries <= last + 1.0,
            "{syncs} log syncs made {entries} entries durable, last log index {last}"
        );
    }

    c.signal(old, Signal::SIGTERM)?;
    let mut stopped = c.forget(old)?.context("no process")?;
    let status = stopped.wait_exit(SETTLE).await?;
    ensure!(
        status.success(),
        "SIGTERM exit: {status}\n{}",
        stopped.log_tail(30)
    );
    let rest: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let (new, new_term) = eventually(SETTLE, "a new leader among the other two", || async {
        Ok(c.agreed_leader(&rest).await?.filter(|(l, _)| *l != old))
    })
    .await?;
    ensure!(
        new != old && new_term > term as u64,
        "leader {new} term {new_term} after {old} term {term}"
    );

    // Restart it cut off from everyone: what it reports is what it read from disk.
    c.isolate(old);
    c.spawn(old)?;
    let (t2, l2) = eventually(SETTLE, "the restarted node's metrics", || async {
        let t = c.metric(old, "keyraft_raft_term").await?;
        let l = c.metric(old, "keyraft_raft_last_log_index").await?;
        Ok((l >= 0.0).then_some((t, l)))
    })
    .await?;
    ensure!(
        t2 >= term && l2 >= log,
        "restarted with term {t2} log {l2}, had term {term} log {log}"
    );

    c.heal();
    eventually(
        SETTLE,
        "the restarted node to follow the new leader",
        || async {
            let v = c.status(old).await?;
            let me = node_entry(&v, old);
            Ok((v["cluster"]["leader"] == new && me["raft"] == "Follower").then_some(()))
        },
    )
    .await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A tonic client to node `target`'s peer port presenting `as_node`'s certificate.
async fn peer_client(
    c: &Cluster,
    target: u64,
    as_node: u64,
) -> Result<keyraft::pb::gossip_client::GossipClient<tonic::transport::Channel>> {
    client_with(c, target, &c.nodes[&as_node].tls).await
}

/// A certificate from the cluster's own CA with `names`, made without
/// `keyraft certs` (which refuses such names), in a TLS dir of its own.
fn forged_tls(c: &Cluster, names: &[&str]) -> Result<std::path::PathBuf> {
    let ca = c.dir.path().join("ca");
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem"))?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // A member's role, so that only the names are wrong.
    p.subject_alt_names.push(rcgen::SanType::URI(
        keyraft::tls::Role::Validator.uri().try_into()?,
    ));
    let key = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let dir = c
        .dir
        .path()
        .join(format!("forged-{}", names.join("-").replace('*', "w")));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.pem"), ca_pem)?;
    std::fs::write(dir.join("node.pem"), cert.pem())?;
    std::fs::write(dir.join("node.key"), key.serialize_pem())?;
    Ok(dir)
}

async fn client_with(
    c: &Cluster,
    target: u64,
    tls_dir: &std::path::Path,
) -> Result<keyraft::pb::gossip_client::GossipClient<tonic::transport::Channel>> {
    let paths = keyraft::config::TlsPaths {
        ca: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node.pem"),
        key: tls_dir.join("node.key"),
    };
    let material = keyraft::tls::TlsMaterial::load(&paths)?;
    let ch =
        tonic::transport::Endpoint::from_shared(format!("https://{}", c.nodes[&target].listen))?
            .tls_config(material.client(target))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
    Ok(keyraft::pb::gossip_client::GossipClient::new(ch))
}

fn claiming<T>(msg: T, id: u64) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(keyraft::tls::NODE_HEADER, id.to_string().parse().unwrap());
    r
}

fn status_of(id: u64) -> keyraft::pb::NodeStatus {
    keyraft::pb::NodeStatus {
        id,
        ..Default::default()
    }
}

#[tokio::test]
async fn peers_must_present_their_own_certificate() -> Result<()> {
    // One witness is enough: its peer port serves while it waits for peers.
    let c = Cluster::start(3, 500, |_| NodeOpts {
        witness: true,
        ..NodeOpts::default()
    })
    .await?;
    let mut client = eventually(SETTLE, "node 1's peer port", || async {
        Ok(Some(peer_client(&c, 1, 2).await?))
    })
    .await?;
    // Positive control: node 2 with node 2's certificate.
    client
        .exchange(claiming(status_of(2), 2))
        .await
        .context("node 2 as itself")?;
    // Node 2's certificate claiming to be node 3.
    let e = client
        .exchange(claiming(status_of(3), 3))
        .await
        .expect_err("impersonation accepted");
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
    // Node 2 pushing node 3's status under its own name.
    let e = client
        .exchange(claiming(status_of(3), 2))
        .await
        .expect_err("forged status accepted");
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");

    // A plaintext client against the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", c.nodes[&1].listen))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => keyraft::pb::gossip_client::GossipClient::new(ch)
            .exchange(claiming(status_of(2), 2))
            .await
            .is_err(),
    };
    ensure!(refused, "a plaintext client was served");

    // Certificates from the cluster's CA that name more than one node.
    for names in [
        &["*.keyraft"][..],
        &["node-2.keyraft", "node-3.keyraft"][..],
    ] {
        let mut forged = client_with(&c, 1, &forged_tls(&c, names)?).await?;
        for claim in [2, 3] {
            let e = forged
                .exchange(claiming(status_of(claim), claim))
                .await
                .expect_err("a certificate naming more than one node was accepted");
            ensure!(
                e.code() == tonic::Code::PermissionDenied,
                "{names:?} as {claim}: {e:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn garbage_and_oversized_messages_do_not_wedge_a_node() -> Result<()> {
    let c = Cluster::start(3, 500, plain).await?;
    eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    let target = &c.nodes[&1];
    // Raw garbage, a half-open TLS hello and a stalled connection on both ports.
    let mut idle = Vec::new();
    let junks = [
        &b"\x16\x03\x01\x02\x00garbage"[..],
        &[0xffu8; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\0",
    ];
    for addr in [target.listen, target.http] {
        for junk in junks {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let _ = s.write_all(junk).await;
        }
        idle.push(tokio::net::TcpStream::connect(addr).await?);
    }
    let mut idle_socket = Vec::new();
    for junk in junks {
        let mut s = tokio::net::UnixStream::connect(&target.admin).await?;
        let _ = s.write_all(junk).await;
    }
    idle_socket.push(tokio::net::UnixStream::connect(&target.admin).await?);
    // Oversized messages, authenticated, on the peer port and the admin socket.
    let mut client = peer_client(&c, 1, 2).await?;
    let mut big = status_of(2);
    big.version = "x".repeat(8 << 20);
    let e = client
        .exchange(claiming(big, 2))
        .await
        .expect_err("8 MiB gossip accepted");
    ensure!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    let mut admin = keyraft::pb::admin_client::AdminClient::new(
        keyraft::admin::access::connect_socket(&target.admin).await?,
    );
    let cmd = keyraft::pb::ClusterCommand {
        kind: Some(keyraft::pb::cluster_command::Kind::MembersAdd(
            keyraft::pb::Member {
                id: 9,
                addr: "y".repeat(8 << 20),
            },
        )),
        mode: None,
    };
    let e = admin
        .command(cmd)
        .await
        .expect_err("8 MiB admin command accepted");
    ensure!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );

    // Still serving, still part of a healthy cluster.
    client
        .exchange(claiming(status_of(2), 2))
        .await
        .context("gossip after abuse")?;
    eventually(SETTLE, "a leader after abuse", || {
        c.agreed_leader(&[1, 2, 3])
    })
    .await?;
    let metrics = reqwest::get(format!("http://{}/metrics", target.http)).await?;
    ensure!(metrics.status().is_success());
    c.assert_no_double_signs().await?;
    drop(idle);
    drop(idle_socket);
    Ok(())
}

/// Until node `id` has registered (it ran with durable state: a later
/// start with an empty data dir needs `--rejoin`).
async fn registered(c: &Cluster, id: u64) -> Result<()> {
    eventually(SETTLE, "the node to register", || async {
        Ok(c.proc(id)?
            .log_tail(400)
            .contains("registered:")
            .then_some(()))
    })
    .await
}

/// Sends `sig` to node `id` and waits for its process to exit.
async fn stop(c: &mut Cluster, id: u64, sig: Signal) -> Result<()> {
    c.signal(id, sig)?;
    c.forget(id)?
        .context("no process")?
        .wait_exit(SETTLE)
        .await?;
    Ok(())
}

/// Until node `id` is one of three voters again, following the leader.
async fn a_voter_again(c: &Cluster, id: u64) -> Result<()> {
    eventually(
        SETTLE,
        "the rejoined node to be a voter following the leader",
        || async {
            let v = c.status(id).await?;
            let members = v["cluster"]["members"]
                .as_array()
                .map(|m| m.len())
                .unwrap_or(0);
            Ok((members == 3 && node_entry(&v, id)["raft"] == "Follower").then_some(()))
        },
    )
    .await
    .with_context(|| c.logs_ending_with(Some(id)))
}

#[tokio::test]
async fn a_wiped_voter_is_refused_and_rejoins_as_a_learner_with_rejoin() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let (leader, _) = eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    let victim = (1..=3).find(|i| *i != leader).unwrap_or(1);
    registered(&c, victim).await?;
    stop(&mut c, victim, Signal::SIGTERM).await?;
    std::fs::remove_dir_all(&c.nodes[&victim].data)?;

    let mut refused = tokio::process::Command::from(c.command(victim));
    refused.kill_on_drop(true);
    let out = tokio::time::timeout(SETTLE, refused.output())
        .await
        .context("the wiped node was not refused")??;
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect::<Vec<_>>();
    ensure!(
        out.status.code() == Some(2),
        "wiped voter started: {:?}\n{err}",
        out.status
    );
    ensure!(
        last.len() == 1 && last[0].contains("--rejoin") && last[0].contains("vote twice"),
        "unclear refusal: {err}"
    );

    c.node_mut(victim)?.opts.flags.push("--rejoin".into());
    c.spawn(victim)?;
    let log = eventually(
        SETTLE,
        "the leader to take the node back as a learner, then a voter",
        || async {
            let log = c.proc(victim)?.log_tail(400);
            let done = log.contains("rejoined as a learner") || log.contains("--rejoin ignored");
            Ok(done.then_some(log))
        },
    )
    .await
    .with_context(|| c.logs_ending_with(Some(victim)))?;
    // The refused start must not have accepted a leader's entries into the
    // empty data dir, or this start would skip the rejoin as a voter.
    ensure!(
        !log.contains("--rejoin ignored"),
        "the refused start left Raft state in the data dir:\n{log}"
    );
    a_voter_again(&c, victim).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// The demotion a rejoin starts with is a membership change: with another
/// voter down it could never commit (the voters left lack a live
/// majority), and the cluster would stay in the joint configuration. The
/// leader refuses the rejoin until the voter is back; the wiped node waits
/// without a vote meanwhile. (Found by the simulator, seed 41.)
#[tokio::test]
async fn a_rejoin_waits_for_a_live_majority_of_the_voters_left() -> Result<()> {
    let mut c = Cluster::start(3, 250, plain).await?;
    let (leader, _) = eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (victim, down) = (others[0], others[1]);
    registered(&c, victim).await?;
    stop(&mut c, victim, Signal::SIGKILL).await?;
    std::fs::remove_dir_all(&c.nodes[&victim].data)?;
    stop(&mut c, down, Signal::SIGKILL).await?;

    c.node_mut(victim)?.opts.flags.push("--rejoin".into());
    c.spawn(victim)?;
    eventually(SETTLE, "the leader to refuse the demotion", || async {
        let log = c.proc(victim)?.log_tail(400);
        Ok(log
            .lines()
            .any(|l| l.contains("rejoin:") && l.contains("bring them back first"))
            .then_some(()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(victim)))?;
    ensure!(
        !c.proc(victim)?
            .log_tail(400)
            .contains("rejoined as a learner"),
        "rejoined with a voter down"
    );
    c.spawn(down)?;
    eventually(SETTLE, "the rejoin once the voter is back", || async {
        let log = c.proc(victim)?.log_tail(400);
        Ok(log.contains("rejoined as a learner").then_some(()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(victim)))?;
    a_voter_again(&c, victim).await?;
    counts_again(&mut c, leader, victim).await?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// Once node `id` has rejoined, leader `l` holds no refusal of it: while
/// the rejoin waited, `l` replicated to the empty data dir of a node still
/// a voter, and refused it; every member forgets that with the rest of the
/// old record. Its acknowledgements count again: with the third voter
/// killed, `l` and `id` alone still commit. (The simulator, seeds 665 and
/// 1402, once kept such a refusal past the rejoin, and the cluster could
/// not elect when another voter died; keyraft itself also takes a refusal
/// back at the node's next Hello once the old record is gone.)
async fn counts_again(c: &mut Cluster, l: u64, id: u64) -> Result<()> {
    let v = c.status(l).await?;
    let refused_by = &node_entry(&v, id)["remembered"]["refused_by"];
    ensure!(
        refused_by.as_object().is_some_and(|m| m.is_empty()),
        "node {id} is still refused by {l} after its rejoin: {refused_by}"
    );
    let third = (1..=3)
        .find(|i| *i != l && *i != id)
        .context("no third voter")?;
    stop(c, third, Signal::SIGKILL).await?;
    let before = c.chain.totals().await?;
    for cmd in ["pause", "resume"] {
        let out = c.cli(l, &[cmd]).await?;
        ensure!(
            out.status.success(),
            "{cmd} did not commit with node {l} and the rejoined node {id}: {out:?}\n{}",
            c.logs()
        );
    }
    // And the lease of `l`'s validator is renewed by the rejoined node's
    // acks alone: the chain misses nothing.
    c.chain.wait_height(before.height + 4, SETTLE).await?;
    let after = c.chain.totals().await?;
    let (signed, missed) = (after.signed - before.signed, after.missed - before.missed);
    ensure!(
        signed > 0 && missed == 0 && after.double_signs == 0,
        "after node {third} died: {signed} signed, {missed} missed, {} double signs\n{}",
        after.double_signs,
        c.logs()
    );
    Ok(())
}

#[tokio::test]
async fn members_are_added_as_learners_then_voters_and_removed() -> Result<()> {
    let c = Cluster::start(3, 250, plain).await?;
    let (leader, _) = eventually(SETTLE, "a leader", || c.agreed_leader(&[1, 2, 3])).await?;
    // A fourth coordinator (a witness), with a certificate from the same CA.
    let base = c.dir.path().join("n4");
    let ca = c.dir.path().join("ca");
    let certs = std::process::Command::new(&c.keyraft)
        .args([
            "certs",
            "node",
            "--id",
            "4",
            "--witness",
            "--ip",
            "127.0.0.1",
            "--ca",
        ])
        .arg(&ca)
        .arg("--out")
        .arg(base.join("tls"))
        .output()?;
    ensure!(certs.status.success(), "{certs:?}");
    let (listen, admin, http) = (free_addr()?, base.join("admin.sock"), free_addr()?);
    let mut cmd = std::process::Command::new(&c.keyraft);
    cmd.args(["run", "--node-id", "4", "--witness"])
        .args(["--listen", &listen.to_string()])
        .arg("--admin-socket")
        .arg(&admin)
        .args(["--http-listen", &http.to_string()])
        .arg("--data-dir")
        .arg(base.join("data"))
        .arg("--tls-dir")
        .arg(base.join("tls"));
    for (id, n) in &c.nodes {
        cmd.args(["--peer", &format!("{id}={}", n.listen)]);
    }
    let fourth = Proc::spawn("keyraft4", &mut cmd, c.dir.path())?;

    let out = c
        .cli(leader, &["members", "add", &format!("4={listen}")])
        .await?;
    ensure!(
        out.status.success(),
        "members add: {out:?}\n{}",
        fourth.log_tail(30)
    );
    let list = c.cli(leader, &["members", "list"]).await?;
    let text = String::from_utf8_lossy(&list.stdout);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("4\t") && l.ends_with("voter")),
        "{text}"
    );
    eventually(SETTLE, "node 4 to follow with four voters", || async {
        let out = tokio::process::Command::new(&c.keyraft)
            .args(["status", "--json", "--admin-socket"])
            .arg(&admin)
            .output()
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let me = node_entry(&v, 4);
        Ok(
            (v["cluster"]["members"] == serde_json::json!([1, 2, 3, 4])
                && me["raft"] == "Follower")
                .then_some(()),
        )
    })
    .await?;

    let out = c.cli(leader, &["members", "remove", "4"]).await?;
    ensure!(out.status.success(), "members remove: {out:?}");
    let list = c.cli(leader, &["members", "list"]).await?;
    let text = String::from_utf8_lossy(&list.stdout);
    ensure!(!text.lines().any(|l| l.starts_with("4\t")), "{text}");
    let bad = c.cli(leader, &["members", "add", "nonsense"]).await?;
    ensure!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("ID=HOST:PORT"));
    c.assert_no_double_signs().await?;
    Ok(())
}
