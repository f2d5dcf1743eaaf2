//! A member's messages over the peer port, made by hand for the suites that
//! play a member (`tests/security.rs`, `tests/heights.rs`): a client with a
//! node's certificate, the header that names the sender, and a forwarded
//! sign request with the sender's proof that it holds the chain's key.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use keyraft::signer::sign::ConsensusKey;
use localnet::cluster::{Cluster, NodeOpts, SETTLE};
use localnet::harness::eventually;

/// Three signers of `chain_id` (node 3 a witness, a round 1 every
/// `round_every` heights, 500 ms blocks) in a temp dir, and the validator
/// host that leads them, with its term.
pub async fn signers_with_a_witness(
    chain_id: &str,
    round_every: u64,
) -> Result<(Cluster, u64, u64)> {
    let dir = tempfile::Builder::new()
        .prefix("keyraft-signer-")
        .tempdir()?;
    let mode = localnet::cluster::Mode::Signer {
        chain_id: chain_id.into(),
        round_every,
        validators: 2,
        more_chains: 0,
        halt: None,
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
    let (leader, term) = eventually(SETTLE, "a signer leader", || async {
        Ok(c.agreed_leader(&[1, 2, 3]).await?.filter(|(l, _)| *l != 3))
    })
    .await?;
    Ok((c, leader, term))
}

/// `msg` as node `id` sends it (the header the peer port checks against
/// the certificate).
pub fn as_node<T>(msg: T, id: u64) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(keyraft::tls::NODE_HEADER, id.to_string().parse()?);
    Ok(req)
}

/// Waits until the chain's real sentries got three more signatures.
pub async fn signing_goes_on(c: &Cluster) -> Result<()> {
    use anyhow::Context;
    let before = c.chain.totals().await?.signed;
    eventually(SETTLE, "signatures going on", || async {
        Ok((c.chain.totals().await?.signed > before + 2).then_some(()))
    })
    .await
    .with_context(|| c.logs())
}

/// A peer-port client to node `target` presenting the certificate in `tls`.
pub async fn peer_channel(
    c: &Cluster,
    target: u64,
    tls: &Path,
) -> Result<tonic::transport::Channel> {
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

/// The cluster's validator key, as a member holds it.
pub fn cluster_key(c: &Cluster) -> Result<ConsensusKey> {
    Ok(ConsensusKey::load(&c.key_path)?)
}

/// `req` with the proof that node `sender` holds `key` for `chain_id`, as
/// a member forwards it.
pub fn proven(
    mut req: keyraft::pb::SignRequest,
    key: &ConsensusKey,
    sender: u64,
    chain_id: &str,
) -> keyraft::pb::SignRequest {
    let proof = key.forward_proof(sender, chain_id, &req.msg);
    req.proof = proof.seed_proof;
    req.key_proof = proof.key_proof;
    req
}

/// A privval sign request for a precommit at `height`, as a sentry sends it
/// and a member with `pub_key` for the chain forwards it.
pub fn precommit_request(chain_id: &str, height: u64, pub_key: &[u8]) -> keyraft::pb::SignRequest {
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
        key_proof: Vec::new(),
        chain_id: chain_id.to_string(),
    }
}

/// Node `from`'s certificate asks node `to` to sign `req`.
pub async fn ask_to_sign(
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
