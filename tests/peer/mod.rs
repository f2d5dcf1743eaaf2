//! A member's messages over the peer port, made by hand for the suites that
//! play a member (`tests/security.rs`, `tests/heights.rs`): a client with a
//! node's certificate, the header that names the sender, and a forwarded
//! sign request with the sender's proof that it holds the chain's key.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use keyraft::signer::sign::ConsensusKey;
use localnet::cluster::Cluster;

/// `msg` as node `id` sends it (the header the peer port checks against
/// the certificate).
pub fn as_node<T>(msg: T, id: u64) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(keyraft::tls::NODE_HEADER, id.to_string().parse()?);
    Ok(req)
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
    req.proof = key.forward_proof(sender, chain_id, &req.msg);
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
