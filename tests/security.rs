//! Only who should drives the cluster: the admin socket's file permissions
//! decide which local users may run operator commands, the admin TCP port
//! serves only admin certificates, and a witness's certificate carries no
//! operator authority, neither on its own socket nor forwarded to the
//! leader. Real processes, real users (`setpriv`), real mTLS.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keyraft::signer::sign::ConsensusKey;
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, free_addr};

/// The gid given to node 1's admin socket; it need not name a group.
const OPERATORS: u32 = 4242;
const NOBODY: &str = "65534";

/// `keyraft ARGS` as uid 65534, in `groups` only.
async fn as_other_user(
    c: &Cluster,
    groups: Option<u32>,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--reuid", NOBODY, "--regid", NOBODY]);
    match groups {
        Some(g) => cmd.args(["--groups", &g.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    Ok(cmd
        .arg(&c.keyraft)
        .args(args)
        .arg("--admin-socket")
        .arg(&c.nodes[&1].admin)
        .output()
        .await?)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `msg` as node `id` sends it (the header the peer port checks against
/// the certificate).
fn as_node<T>(msg: T, id: u64) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(keyraft::tls::NODE_HEADER, id.to_string().parse()?);
    Ok(req)
}

/// `resume`, forwarded to `leader` by node `id` with the certificate in `tls`.
async fn forward_resume(
    c: &Cluster,
    leader: u64,
    tls: &Path,
    id: u64,
) -> Result<Result<tonic::Response<keyraft::pb::CommandReply>, tonic::Status>> {
    let mut client =
        keyraft::pb::cluster_client::ClusterClient::new(peer_channel(c, leader, tls).await?);
    let cmd = keyraft::pb::ClusterCommand {
        kind: Some(keyraft::pb::cluster_command::Kind::Resume(true)),
    };
    Ok(client.forward(as_node(cmd, id)?).await)
}

/// Waits until every node applied `paused` (a command returns once the
/// leader committed it; the others apply it a moment later).
async fn paused_everywhere(c: &Cluster, paused: bool) -> Result<()> {
    eventually(
        SETTLE,
        &format!("paused={paused} on every node"),
        || async {
            for id in 1..=3 {
                if c.status(id).await?["cluster"]["paused"] != paused {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
}

/// A peer-port client to node `target` presenting the certificate in `tls`.
async fn peer_channel(c: &Cluster, target: u64, tls: &Path) -> Result<tonic::transport::Channel> {
    let paths = keyraft::config::TlsPaths {
        ca: tls.join("ca.pem"),
        cert: tls.join("node.pem"),
        key: tls.join("node.key"),
    };
    let material = keyraft::tls::TlsMaterial::load(&paths)?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://{}", c.nodes[&target].listen))?
            .tls_config(material.client(target))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?,
    )
}

#[tokio::test]
async fn only_the_operator_drives_the_cluster() -> Result<()> {
    let admin_port = free_addr()?;
    let c = Cluster::start(3, 500, |id| NodeOpts {
        witness: id == 3,
        flags: match id {
            1 => vec![
                "--admin-group".into(),
                OPERATORS.to_string(),
                "--admin-listen".into(),
                admin_port.to_string(),
            ],
            _ => vec![],
        },
        ..NodeOpts::default()
    })
    .await?;
    // The active validator leads (a witness may lead first, briefly).
    let leader = c.active().await?;
    eventually(SETTLE, "all to agree on the leader", || async {
        Ok(c.agreed_leader(&[1, 2, 3])
            .await?
            .filter(|(l, _)| *l == leader))
    })
    .await?;
    // Let other users reach the socket's directory: its own mode decides.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let socket = std::fs::metadata(&c.nodes[&1].admin)?;
    ensure!(
        socket.permissions().mode() & 0o777 == 0o660,
        "admin socket mode {:o}",
        socket.permissions().mode()
    );
    ensure!(
        std::os::unix::fs::MetadataExt::gid(&socket) == OPERATORS,
        "group"
    );

    // Another user, in no group of the socket: every command refused, even status.
    for args in [
        &["pause"][..],
        &["resume"],
        &["switchover"],
        &["members", "remove", "2"],
        &["status"],
    ] {
        let out = as_other_user(&c, None, args).await?;
        ensure!(
            out.status.code() == Some(1)
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied")
                && String::from_utf8_lossy(&out.stderr).lines().count() == 1,
            "{args:?} by another user: {}",
            text(&out)
        );
    }
    let v = c.status(1).await?;
    ensure!(
        v["cluster"]["paused"] == false
            && v["cluster"]["members"] == serde_json::json!([1, 2, 3])
            && v["cluster"]["leader"] == leader,
        "the cluster changed: {v}"
    );

    // An operator: the same user in the socket's group.
    let out = as_other_user(&c, Some(OPERATORS), &["pause"]).await?;
    ensure!(out.status.success(), "operator pause: {}", text(&out));
    paused_everywhere(&c, true).await?;

    // A witness speaks for no operator: not on its own socket, and not
    // when it forwards a command to the leader with its certificate.
    let out = c.cli(3, &["resume"]).await?;
    ensure!(
        out.status.code() == Some(1) && text(&out).contains("witness does not speak"),
        "resume on the witness: {}",
        text(&out)
    );
    let e = forward_resume(&c, leader, &c.nodes[&3].tls, 3)
        .await?
        .expect_err("the leader ran a witness's forwarded command");
    ensure!(
        e.code() == tonic::Code::PermissionDenied && e.message().contains("witness"),
        "{e:?}"
    );
    ensure!(
        c.status(1).await?["cluster"]["paused"] == true,
        "resumed by a witness"
    );
    // A validator certificate of a node that is no voter (removed, or
    // never added): no operator authority either.
    let ca = c.dir.path().join("ca");
    let stranger = c.dir.path().join("n4-tls");
    let made = tokio::process::Command::new(&c.keyraft)
        .args(["certs", "node", "--id", "4", "--ip", "127.0.0.1", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&stranger)
        .output()
        .await?;
    ensure!(made.status.success(), "certs node 4: {}", text(&made));
    let e = forward_resume(&c, leader, &stranger, 4)
        .await?
        .expect_err("the leader ran a non-member's forwarded command");
    ensure!(
        e.code() == tonic::Code::PermissionDenied && e.message().contains("not a voting member"),
        "{e:?}"
    );
    // The witness says it is a validator host: its certificate says not,
    // and the view (which picks handover targets) believes the certificate.
    let mut gossip = keyraft::pb::gossip_client::GossipClient::new(
        peer_channel(&c, leader, &c.nodes[&3].tls).await?,
    );
    let req = as_node(
        keyraft::pb::NodeStatus {
            id: 3,
            role: "validator".into(),
            eligible: true,
            ..Default::default()
        },
        3,
    )?;
    gossip.exchange(req).await?;
    let v = c.status(leader).await?;
    let witness = localnet::harness::node_entry(&v, 3);
    ensure!(witness["role"] == "witness", "{witness}");

    // The admin TCP port: an admin certificate is served, a member's is not.
    let admin_dir = c.dir.path().join("alice");
    // Async commands only: the cluster's link proxies run on this runtime.
    let made = tokio::process::Command::new(&c.keyraft)
        .args(["certs", "admin", "--name", "alice", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&admin_dir)
        .output()
        .await?;
    ensure!(made.status.success(), "certs admin: {}", text(&made));
    let tcp = |dir: &Path, args: &[&str]| {
        tokio::process::Command::new(&c.keyraft)
            .args(args)
            .args(["--admin", &admin_port.to_string(), "--admin-cert"])
            .arg(dir)
            .output()
    };
    let out = tcp(&admin_dir, &["resume"]).await?;
    ensure!(
        out.status.success(),
        "resume with an admin certificate: {}",
        text(&out)
    );
    paused_everywhere(&c, false).await?;
    let member = c.dir.path().join("member-as-admin");
    std::fs::create_dir_all(&member)?;
    for (from, to) in [
        ("node.pem", "admin.pem"),
        ("node.key", "admin.key"),
        ("ca.pem", "ca.pem"),
    ] {
        std::fs::copy(c.nodes[&2].tls.join(from), member.join(to))?;
    }
    std::fs::set_permissions(
        member.join("admin.key"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let out = tcp(&member, &["pause"]).await?;
    ensure!(
        out.status.code() == Some(1) && text(&out).contains("no admin role"),
        "pause with a member's certificate: {}",
        text(&out)
    );
    // No client certificate at all: the handshake itself fails.
    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            ca.join("ca.pem"),
        )?))
        .domain_name("node-1.keyraft");
    let refused = match tonic::transport::Endpoint::from_shared(format!("https://{admin_port}"))?
        .tls_config(anonymous)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => keyraft::pb::admin_client::AdminClient::new(ch)
            .command(keyraft::pb::ClusterCommand {
                kind: Some(keyraft::pb::cluster_command::Kind::Pause(true)),
            })
            .await
            .is_err(),
    };
    ensure!(refused, "a client without a certificate was served");
    let v = c.status(1).await?;
    ensure!(
        v["cluster"]["paused"] == false,
        "paused by a refused client: {v}"
    );
    c.assert_no_double_signs().await.context("the judge")?;
    Ok(())
}

/// The cluster's validator key, as a member holds it.
fn cluster_key(c: &Cluster) -> Result<ConsensusKey> {
    Ok(ConsensusKey::load(&c.key_path)?)
}

/// `req` with the proof that node `sender` holds `key` for `chain_id`, as
/// a member forwards it.
fn proven(
    mut req: keyraft::pb::SignRequest,
    key: &ConsensusKey,
    sender: u64,
    chain_id: &str,
) -> keyraft::pb::SignRequest {
    req.proof = key.forward_proof(sender, chain_id, &req.msg);
    req
}

/// A privval sign request for a precommit at `height`, as a sentry sends it
/// and a member with `pub_key` for the chain forwards it.
fn precommit_request(chain_id: &str, height: u64, pub_key: &[u8]) -> keyraft::pb::SignRequest {
    use cometbft_proto::v0_38::privval::{message::Sum, Message, SignVoteRequest};
    use localnet::comet::consensus::{block_id, vote, Step};
    use prost::Message as _;
    let v = vote(
        Step::Precommit,
        height,
        0,
        block_id("chosen-by-the-caller", height, 0),
        [0; 20],
        b"extension".to_vec(),
    );
    let msg = Message {
        sum: Some(Sum::SignVoteRequest(SignVoteRequest {
            vote: Some(v),
            chain_id: chain_id.to_string(),
        })),
    };
    keyraft::pb::SignRequest {
        msg: msg.encode_to_vec(),
        pub_key: pub_key.to_vec(),
        proof: Vec::new(),
    }
}

/// Node `from`'s certificate asks node `to` to sign `req`.
async fn ask_to_sign(
    c: &Cluster,
    from: u64,
    to: u64,
    req: keyraft::pb::SignRequest,
) -> Result<Result<keyraft::pb::SignReply, tonic::Status>> {
    let ch = peer_channel(c, to, &c.nodes[&from].tls).await?;
    let req = as_node(req, from)?;
    Ok(keyraft::pb::signer_client::SignerClient::new(ch)
        .sign(req)
        .await
        .map(|r| r.into_inner()))
}

async fn watermark(c: &Cluster) -> Result<u64> {
    Ok(
        c.status(1).await?["signer"]["chains"][0]["watermark"]["height"]
            .as_u64()
            .unwrap_or(0),
    )
}

#[tokio::test]
async fn only_a_validator_hosts_sentries_get_signatures_and_no_height_jumps() -> Result<()> {
    const CHAIN: &str = "keyraft-security-test";
    let dir = tempfile::Builder::new()
        .prefix("keyraft-signer-")
        .tempdir()?;
    let mode = localnet::cluster::Mode::Signer {
        chain_id: CHAIN.into(),
        round_every: 4,
        validators: 2,
        more_chains: 0,
    };
    let c = Cluster::start_in_mode(
        localnet::cluster::ClusterDir::Temp(dir),
        3,
        500,
        mode,
        |id| NodeOpts {
            witness: id == 3,
            ..NodeOpts::default()
        },
    )
    .await?;
    // A validator host leads (a witness may lead first, briefly).
    let (leader, _) = eventually(SETTLE, "a signer leader", || async {
        Ok(c.agreed_leader(&[1, 2, 3]).await?.filter(|(l, _)| *l != 3))
    })
    .await?;
    let other = if leader == 1 { 2 } else { 1 };
    c.never_signed().await?;
    // Right after --never-signed, a far-future request from a real
    // validator host (as its sentry's request arrives forwarded): refused,
    // and the watermark stays where it is.
    let key = cluster_key(&c)?;
    let public = key.public().as_bytes().to_vec();
    let ask = |height| {
        proven(
            precommit_request(CHAIN, height, &public),
            &key,
            other,
            CHAIN,
        )
    };
    let reply = ask_to_sign(&c, other, leader, ask(1 << 62))
        .await?
        .context("the request itself failed")?;
    ensure!(
        reply.refusal != keyraft::pb::Refusal::None as i32 && reply.detail.contains("is above"),
        "a height of 2^62 was not refused: {reply:?}"
    );
    ensure!(watermark(&c).await? < 1 << 40, "the watermark jumped");
    // A witness asking for a plausible height: refused outright.
    let h = c.chain.totals().await?.height;
    let e = ask_to_sign(
        &c,
        3,
        leader,
        proven(precommit_request(CHAIN, h + 1, &public), &key, 3, CHAIN),
    )
    .await?
    .expect_err("a witness's sign request was served");
    ensure!(
        e.code() == tonic::Code::PermissionDenied && e.message().contains("witness"),
        "{e:?}"
    );
    // A real validator host whose key for the chain is another, that
    // names the chain's key without proving it holds it (no proof, one
    // made with another key, for another sender or for another chain), or
    // that asks for a chain the leader does not sign for: refused, typed.
    let stranger = ConsensusKey::from_seed([7u8; 32]);
    let unproven = || precommit_request(CHAIN, h + 1, &public);
    use keyraft::pb::Refusal::{OtherKey, UnknownChain};
    for (req, want, says) in [
        (
            proven(
                precommit_request(CHAIN, h + 1, stranger.public().as_bytes()),
                &stranger,
                other,
                CHAIN,
            ),
            OtherKey,
            "is not the leader's",
        ),
        (unproven(), OtherKey, "did not prove"),
        (
            proven(unproven(), &stranger, other, CHAIN),
            OtherKey,
            "did not prove",
        ),
        (
            proven(unproven(), &key, 3, CHAIN),
            OtherKey,
            "did not prove",
        ),
        (
            proven(unproven(), &key, other, "not-our-chain"),
            OtherKey,
            "did not prove",
        ),
        (
            proven(
                precommit_request("not-our-chain", h + 1, &public),
                &key,
                other,
                "not-our-chain",
            ),
            UnknownChain,
            "",
        ),
    ] {
        let reply = ask_to_sign(&c, other, leader, req)
            .await?
            .context("the request itself failed")?;
        ensure!(
            reply.refusal == want as i32 && reply.detail.contains(says),
            "wanted {want:?} ({says}): {reply:?}"
        );
    }
    // Signing goes on through the real sentries.
    let before = c.chain.totals().await?.signed;
    eventually(SETTLE, "signatures after the refusals", || async {
        Ok((c.chain.totals().await?.signed > before + 2).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let at = watermark(&c).await?;
    ensure!(at > 0 && at < 1 << 40, "watermark {at}");

    // A real host asking at the limit, again and again: the first moves
    // the watermark there, the limit does not follow it.
    let limit = c.status(leader).await?["signer"]["chains"][0]["height_limit"]["height"]
        .as_u64()
        .context("no height limit in status")?;
    let chain = c.chain.totals().await?.height;
    ensure!(
        limit <= chain + 1_100,
        "limit {limit} with the chain at {chain}"
    );
    for height in [limit, limit + 500, limit + 1_000] {
        let reply = ask_to_sign(&c, other, leader, ask(height))
            .await?
            .context("the request itself failed")?;
        let signed = reply.refusal == keyraft::pb::Refusal::None as i32;
        ensure!(signed == (height == limit), "height {height}: {reply:?}");
    }
    ensure!(
        watermark(&c).await? == limit,
        "the watermark walked past the limit"
    );

    // A floor far above the chain: refused without the override, taken with it.
    let far = c.chain.totals().await?.height + 5_000;
    let file = c.dir.path().join("priv_validator_state.json");
    for height in [1u64 << 62, far] {
        std::fs::write(
            &file,
            format!(r#"{{"height": "{height}", "round": "0", "step": 3}}"#),
        )?;
        let out = c
            .cli(
                other,
                &["signer", "import-state", &file.display().to_string()],
            )
            .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1)
                && err.contains("--allow-jump")
                && err.lines().count() == 1,
            "floor {height}: {}",
            text(&out)
        );
    }
    ensure!(
        watermark(&c).await? < far,
        "a refused floor moved the watermark"
    );
    let path = file.display().to_string();
    let out = c
        .cli(other, &["signer", "import-state", &path, "--allow-jump"])
        .await?;
    ensure!(out.status.success(), "with --allow-jump: {}", text(&out));
    ensure!(watermark(&c).await? == far, "the override was not taken");
    let s = c.chain.stats_since(0).await?;
    ensure!(
        s.double_signs == 0 && s.equivocations.is_empty(),
        "equivocations: {:?}",
        s.equivocations
    );
    Ok(())
}

/// A signer cluster of three validator hosts for `chain` (and `more`
/// chains), its key never used, whose nodes' heights reach keyraft only as
/// `opts` says; its leader and another validator host, once it signs.
async fn signers(
    chain: &str,
    more: u64,
    opts: impl Fn(u64) -> NodeOpts,
) -> Result<(Cluster, u64, u64)> {
    let mode = localnet::cluster::Mode::Signer {
        chain_id: chain.into(),
        round_every: 0,
        validators: 2,
        more_chains: more,
    };
    let c = Cluster::start_signers(3, 250, mode, opts).await?;
    let (leader, _) = eventually(SETTLE, "a signer leader", || async {
        c.agreed_leader(&[1, 2, 3]).await
    })
    .await
    .with_context(|| c.logs())?;
    let other = if leader == 1 { 2 } else { 1 };
    for (name, judge) in c.judges() {
        let signed = judge.totals().await?.signed;
        eventually(SETTLE, &format!("signatures on {name}"), || async {
            Ok((judge.totals().await?.signed > signed + 3).then_some(()))
        })
        .await
        .with_context(|| c.logs())?;
    }
    Ok((c, leader, other))
}

/// The height limit node `id` shows for `chain`, why, and the watermark.
async fn height_limit(c: &Cluster, id: u64, chain: &str) -> Result<(u64, String, u64)> {
    let s = c.status(id).await?;
    let chains = s["signer"]["chains"].as_array().context("no chains")?;
    let ch = chains
        .iter()
        .find(|ch| ch["chain_id"] == chain)
        .with_context(|| format!("no chain {chain} in {s}"))?;
    let limit = &ch["height_limit"];
    Ok((
        limit["height"].as_u64().context("no height limit")?,
        limit["why"].as_str().unwrap_or("").to_string(),
        ch["watermark"]["height"].as_u64().unwrap_or(0),
    ))
}

/// With no node vouching for a chain's height (a chain without
/// `node-rpc` among several), one request far above the watermark from
/// whatever sits on a privval port was signed and moved the watermark
/// there: every real request was refused after it, for good. It is
/// refused now, and the real sentries sign on.
#[tokio::test]
async fn with_no_height_report_one_request_cannot_put_the_key_out_of_reach() -> Result<()> {
    let (c, leader, other) = signers("keyraft-no-report-test", 1, |_| NodeOpts {
        no_node_rpc: true,
        ..NodeOpts::default()
    })
    .await?;
    let second = c.others[0].chain_id.clone();
    let (limit, why, w) = height_limit(&c, leader, &second).await?;
    ensure!(why.contains("no member's node reports"), "{why}");
    ensure!(
        limit <= w + 1_100,
        "limit {limit} over watermark {w}: {why}"
    );
    let key = ConsensusKey::load(&c.others[0].key_path)?;
    let public = key.public().as_bytes().to_vec();
    let far = w + 5_000_000;
    let req = proven(
        precommit_request(&second, far, &public),
        &key,
        other,
        &second,
    );
    let reply = ask_to_sign(&c, other, leader, req)
        .await?
        .context("the request itself failed")?;
    ensure!(
        reply.refusal != keyraft::pb::Refusal::None as i32 && reply.detail.contains("is above"),
        "height {far} was signed with no node vouching: {reply:?}"
    );
    let (_, _, after) = height_limit(&c, leader, &second).await?;
    ensure!(after < w + 1_100, "the watermark jumped to {after}");
    let judge = &c.others[0].chain;
    let signed = judge.totals().await?.signed;
    eventually(SETTLE, "the real sentries signing on", || async {
        Ok((judge.totals().await?.signed > signed + 3).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A CometBFT `/status` of `chain` that says synced at `height` forever:
/// a node whose consensus halted, or that lost its peers, by its own word
/// still in sync.
async fn stuck_node(chain: &'static str, height: u64) -> Result<String> {
    let status = serde_json::json!({"result": {
        "node_info": {"network": chain},
        "sync_info": {"catching_up": false, "latest_block_height": height.to_string()},
    }});
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let status = status.clone();
            async move { axum::Json(status) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Of two nodes reporting, one stuck at height 1: the limit followed the
/// lower one down (1,001), so every leader refused every real request
/// once the chain passed it. The moving node speaks for the chain now.
#[tokio::test]
async fn a_stuck_node_of_two_does_not_hold_the_height_limit_down() -> Result<()> {
    const CHAIN: &str = "keyraft-stuck-node-test";
    let stuck = stuck_node(CHAIN, 1).await?;
    // Host 3's probe reaches nothing: it never leads, and reports nothing.
    let (c, leader, _) = signers(CHAIN, 0, |id| NodeOpts {
        health_url: match id {
            1 => None,
            2 => Some(stuck.clone()),
            _ => Some("http://127.0.0.1:9".into()),
        },
        ..NodeOpts::default()
    })
    .await?;
    eventually(SETTLE, "the moving node to speak for the chain", || async {
        let (limit, why, _) = height_limit(&c, leader, CHAIN).await?;
        let h = c.chain.totals().await?.height;
        ensure!(why.contains("synced nodes report"), "{limit}: {why}");
        Ok((h > 20 && limit > 1_001 + 10 && limit + 10 >= h + 1_000).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    c.assert_no_double_signs().await?;
    Ok(())
}
