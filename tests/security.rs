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
use peer::{
    as_node, ask_to_sign, cluster_key, peer_channel, precommit_request, proven,
    signers_with_a_witness, signing_goes_on,
};

mod peer;

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
        mode: None,
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
                mode: None,
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
    let (c, leader, _) = signers_with_a_witness(CHAIN, 4).await?;
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
    signing_goes_on(&c).await?;
    let at = watermark(&c).await?;
    ensure!(at > 0 && at < 1 << 40, "watermark {at}");

    // A real host asking at the limit, again and again: the first moves
    // the watermark there, the limit does not follow it. (The limit moves
    // with the nodes' reports, a height or so either way as gossip comes
    // and goes: the first request is asked again at the limit as it
    // stands until one is signed.)
    let signed =
        |reply: &keyraft::pb::SignReply| reply.refusal == keyraft::pb::Refusal::None as i32;
    let limit = eventually(SETTLE, "a request at the limit signed", || async {
        let limit = c.status(leader).await?["signer"]["chains"][0]["height_limit"]["height"]
            .as_u64()
            .context("no height limit in status")?;
        let chain = c.chain.totals().await?.height;
        ensure!(
            limit <= chain + 1_100,
            "limit {limit} with the chain at {chain}"
        );
        let reply = ask_to_sign(&c, other, leader, ask(limit))
            .await?
            .context("the request itself failed")?;
        ensure!(
            signed(&reply) || reply.detail.contains("is above"),
            "height {limit}: {reply:?}"
        );
        Ok(signed(&reply).then_some(limit))
    })
    .await?;
    for height in [limit + 500, limit + 1_000] {
        let reply = ask_to_sign(&c, other, leader, ask(height))
            .await?
            .context("the request itself failed")?;
        ensure!(!signed(&reply), "height {height}: {reply:?}");
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
    // Node 1, whose status is read, may apply the floor a moment after the
    // leader committed it.
    eventually(SETTLE, "the override on node 1", || async {
        Ok((watermark(&c).await? == far).then_some(()))
    })
    .await
    .context("the override was not taken")?;
    let s = c.chain.stats_since(0).await?;
    ensure!(
        s.double_signs == 0 && s.equivocations.is_empty(),
        "equivocations: {:?}",
        s.equivocations
    );
    Ok(())
}
