//! The signer's calls between members: the forward of a sign request from
//! a follower to the leader, and the leader's confirmation asks to the
//! other voters ([`super::confirm`]). The [`Forward`] trait the signer
//! sends through, its transport on a real node (the peer port, mTLS gRPC:
//! [`Peers`]), the leader's gRPC end of a forward ([`SignerService`]) and
//! every member's end of an ask ([`ConfirmService`], [`serve_confirm`]).
//!
//! Owns: moving a request and its reply between members, and who may
//! send one, and the leader's checks of a forwarded request (a voter, a
//! chain it signs for, the same key and the sender's proof that it holds
//! it) before its one sign path. Must not:
//! decide or sign; [`super::Signer::sign_here`] does, and
//! [`super::confirm`] answers an ask.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cometbft_proto::v1::privval::v1;
use openraft::storage::RaftStateMachine;
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::confirm::{self, Answer};
use super::key::ForwardProof;
use super::protocol::{self, Request as Asked};
use super::{Done, Refusal, Signable, Signer, Work, FORWARD_DEADLINE, MAX_PRIVVAL_MESSAGE};
use crate::config::NodeId;
use crate::node::Core;
use crate::pb;
use crate::raft::peers::{PeerError, Peers};
use crate::raft::TypeConfig;
use crate::tls;

/// How a follower's sign request reaches the leader.
pub trait Forward: Send + Sync + 'static {
    /// Sends `req` to the leader `leader`; its reply, or why none came
    /// within `limit` (the leader's own refusal is a `PeerError::Rpc`).
    fn forward(
        &self,
        leader: NodeId,
        req: pb::SignRequest,
        limit: Duration,
    ) -> impl Future<Output = Result<pb::SignReply, PeerError>> + Send;

    /// Asks voter `to` to confirm a signature inside this leader's
    /// reservation ([`super::confirm`]); its answer, or why none came
    /// within `limit`.
    fn confirm(
        &self,
        to: NodeId,
        ask: pb::ConfirmRequest,
        limit: Duration,
    ) -> impl Future<Output = Result<pb::ConfirmReply, PeerError>> + Send;
}

/// A real node forwards over the peer port (mTLS gRPC).
impl Forward for Peers {
    async fn forward(
        &self,
        leader: NodeId,
        req: pb::SignRequest,
        limit: Duration,
    ) -> Result<pb::SignReply, PeerError> {
        let channel = self.channel(leader)?;
        let mut client = pb::signer_client::SignerClient::new(channel)
            .max_decoding_message_size(MAX_PRIVVAL_MESSAGE)
            .max_encoding_message_size(MAX_PRIVVAL_MESSAGE);
        self.call(leader, limit, client.sign(self.request(req, limit)))
            .await
    }

    async fn confirm(
        &self,
        to: NodeId,
        ask: pb::ConfirmRequest,
        limit: Duration,
    ) -> Result<pb::ConfirmReply, PeerError> {
        let mut client = pb::confirm_client::ConfirmClient::new(self.channel(to)?);
        self.call(to, limit, client.confirm(self.request(ask, limit)))
            .await
    }
}

/// Every member's peer-port service for the leader's confirmation asks
/// (witnesses too: a voter's memory is what counts, not its key).
pub struct ConfirmService {
    core: Arc<Core>,
    memory: Mutex<confirm::Memory>,
}

impl ConfirmService {
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            memory: Mutex::default(),
        }
    }
}

#[tonic::async_trait]
impl pb::confirm_server::Confirm for ConfirmService {
    async fn confirm(
        &self,
        req: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ConfirmReply>, Status> {
        let tls::PeerId(peer, _) = tls::caller_of(&req)?;
        let reply = serve_confirm(&self.core, &self.memory, peer, req.get_ref())?;
        Ok(Response::new(reply))
    }
}

/// A member's answer to `peer`'s ask ([`confirm::answer`]), from the
/// leader and term it follows, the watermark it applied and what it
/// confirmed before (`memory`). An answer that reveals another signature
/// is logged: the asker may be a resumed memory image of the leader.
pub fn serve_confirm<SM: RaftStateMachine<TypeConfig>>(
    core: &Core<SM>,
    memory: &Mutex<confirm::Memory>,
    peer: NodeId,
    req: &pb::ConfirmRequest,
) -> Result<pb::ConfirmReply, Status> {
    let ask = confirm::Ask::from_proto(req)
        .ok_or_else(|| Status::invalid_argument(format!("step {} is no step", req.step)))?;
    let (leader, term) = core.with_raft_metrics(|m| (m.current_leader, m.current_term));
    let fresh = core.started.elapsed() < super::ahead::takeover(&core.timing());
    let answer = {
        let cluster = core.cluster.borrow();
        let seen = confirm::Seen {
            leader,
            term,
            watermark: cluster.watermark(&ask.chain_id),
            fresh,
        };
        let mut memory = memory.lock().unwrap_or_else(PoisonError::into_inner);
        confirm::answer(&ask, peer, seen, &mut memory)
    };
    if let Answer::Conflict(c) = &answer {
        tracing::error!(
            peer,
            chain_id = %ask.chain_id,
            asked = ?ask.hrs,
            holder = ask.holder,
            "refused to confirm a signature: {c}. The leader does not know what it signed there: a process resumed from an earlier memory image (a reverted VM snapshot, a restored checkpoint)?"
        );
    }
    Ok(answer.to_proto())
}

/// The leader's peer-port service for forwarded sign requests.
pub struct SignerService {
    signer: Arc<Signer>,
}

impl SignerService {
    pub fn new(signer: Arc<Signer>) -> Self {
        Self { signer }
    }
}

#[tonic::async_trait]
impl pb::signer_server::Signer for SignerService {
    async fn sign(&self, req: Request<pb::SignRequest>) -> Result<Response<pb::SignReply>, Status> {
        // Only a host that may hold the key serves sentries (its own privval
        // connections): a witness asks nothing.
        let peer = crate::tls::require_validator(&req, "forward sign requests")?;
        let reply = self.signer.serve(peer, req.get_ref()).await?;
        Ok(Response::new(reply))
    }
}

/// The leader's end of a forward.
impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// The leader's end of a forward from `peer`, a member whose identity
    /// the transport proved: refused unless `peer` is a voter (only a host
    /// that may hold the key serves sentries; a witness, or a node that is
    /// no voter, asks nothing).
    pub async fn serve(
        &self,
        peer: NodeId,
        req: &pb::SignRequest,
    ) -> Result<pb::SignReply, Status> {
        let voter = self
            .core
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == peer);
        if !voter {
            tracing::warn!(
                peer,
                "refused a sign request from a node that is not a voter"
            );
            return Err(Status::permission_denied(format!(
                "node {peer} is not a voting member: it forwards no sign requests"
            )));
        }
        self.serve_forwarded(peer, req).await
    }

    async fn serve_forwarded(
        &self,
        peer: NodeId,
        req: &pb::SignRequest,
    ) -> Result<pb::SignReply, Status> {
        let refused = |r: Refusal| pb::SignReply {
            refusal: r.to_proto() as i32,
            detail: match &r {
                Refusal::Malformed(d)
                | Refusal::NotCommitted(d)
                | Refusal::OtherKey(d)
                | Refusal::BytesRefused(d)
                | Refusal::KeyFailed(d) => d.clone(),
                r => r.to_string(),
            },
            ..Default::default()
        };
        if self.core.leader() != Some(self.core.cfg.id) {
            let why = format!("node {} is not the signer leader", self.core.cfg.id);
            return Ok(refused(Refusal::NotCommitted(why)));
        }
        let msg = v1::Message::decode(req.msg.as_slice())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (chain_id, what) = match protocol::read(msg) {
            Asked::Vote {
                chain_id,
                vote,
                extension,
            } => (
                chain_id,
                vote.map(|v| Work::Sign(Signable::Vote(v, extension))),
            ),
            Asked::Proposal { chain_id, proposal } => (
                chain_id,
                proposal.map(|p| Work::Sign(Signable::Proposal(p))),
            ),
            Asked::Bytes(b) => (req.chain_id.clone(), Some(Work::Bytes(b))),
            _ => return Err(Status::invalid_argument("only sign requests are forwarded")),
        };
        let Some(what) = what else {
            return Ok(refused(Refusal::Malformed("empty sign request".into())));
        };
        // Routed by the chain id the request carries: one this leader signs
        // for, with the key the forwarding member has for it.
        let Some(chain) = self.chain(&chain_id) else {
            tracing::warn!(
                peer,
                chain_id,
                "refused a forwarded request for a chain this node does not sign for"
            );
            return Ok(refused(Refusal::UnknownChain { asked: chain_id }));
        };
        // The key the member names, then its proof that it holds it: a
        // member given another chain's key, or none, asks nothing for
        // this chain.
        let why = if req.pub_key != chain.key.public().as_bytes() {
            Some(format!(
                "node {peer}'s key for chain {chain_id} is not the leader's ({}): check its validator-key",
                chain.key.address_hex()
            ))
        } else if !chain.key.proves_forward(
            peer,
            &chain_id,
            &req.msg,
            &ForwardProof {
                key_proof: req.key_proof.clone(),
                seed_proof: req.proof.clone(),
            },
        ) {
            Some(format!(
                "node {peer} did not prove that it holds the key for chain {chain_id} ({}): check its validator-key, and that it runs this keyraft release",
                chain.key.address_hex()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            tracing::error!(peer, chain_id, "refused a forwarded request: {why}");
            return Ok(refused(Refusal::OtherKey(why)));
        }
        let deadline = Instant::now() + FORWARD_DEADLINE;
        let mut stage = self.stages();
        let signed = self.work_here(&chain, what, deadline).await;
        stage.done("serve");
        Ok(match signed {
            Ok(Done::Bytes(signature)) => pb::SignReply {
                refusal: pb::Refusal::None as i32,
                signature,
                ..Default::default()
            },
            Ok(Done::Signed(signed)) => {
                let ((seconds, nanos), signature, extension_signature) = signed.signed_parts();
                pb::SignReply {
                    refusal: pb::Refusal::None as i32,
                    detail: String::new(),
                    timestamp_seconds: seconds,
                    timestamp_nanos: nanos,
                    signature,
                    extension_signature,
                }
            }
            Err(e) => refused(e),
        })
    }
}
