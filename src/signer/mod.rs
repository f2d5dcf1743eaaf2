//! Signer mode: keyraft as a CometBFT remote signer whose every signature is
//! committed through Raft before it exists.
//!
//! - [`privval`]: the connections to the nodes (keyraft dials each node's
//!   `priv_validator_laddr`, as tmkms does) and the request loop on each.
//! - [`sign`]: the consensus key, sign bytes, digests, signatures.
//! - this module: [`Signer`], which answers each request: on the Raft leader
//!   by committing `Signed{chain_id, height, round, step, digest}` and only
//!   then signing; on a follower by forwarding the request to the leader over
//!   the peer port ([`SignerService`] is the leader's end).
//!
//! Why this is safe without a clock: a signature exists only after its
//! (height, round, step) and digest were committed by a quorum, and the
//! replicated state machine accepts one digest per (height, round, step),
//! never one below the watermark. A deposed or partitioned leader cannot
//! commit, so it cannot sign anything new; what it can still answer is a
//! repeat of bytes already committed, whose signature is the same bytes
//! (ed25519 is deterministic).
//!
//! Owns: the chain-id check, the order commit-then-sign, forwarding with a
//! bounded wait, and the sign metrics. Must not: sign anything the state
//! machine did not accept, wait past CometBFT's read timeout, or touch the
//! coordinator's validator.

pub mod privval;
pub mod sign;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cometbft_proto::v0_38::crypto::{public_key, PublicKey as RawPublicKey};
use cometbft_proto::v0_38::privval::{
    message::Sum, Message, PingResponse, PubKeyResponse, RemoteSignerError, SignedProposalResponse,
    SignedVoteResponse,
};
use openraft::errors::{ClientWriteError, RaftError};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::config::{NodeId, SignerConfig};
use crate::node::Shared;
use crate::pb;
use crate::raft::{Command, SignVerdict};
use sign::{ConsensusKey, SignError, Signable};

/// Longest a sign request waits for a leader (an election, a forward) before
/// it is answered with an error. Below CometBFT's 3 s read timeout, so the
/// node gets an answer rather than a dropped connection.
pub const SIGN_PATIENCE: Duration = Duration::from_millis(2000);
/// One forwarding attempt to the leader.
const FORWARD_DEADLINE: Duration = Duration::from_millis(1000);
const RETRY: Duration = Duration::from_millis(25);
/// A request this far above the watermark is refused: one bogus height
/// (a buggy or impostor sentry) must not lift the watermark out of reach
/// for good. About two years of 6-second blocks.
pub const MAX_HEIGHT_JUMP: u64 = 10_000_000;
/// Largest privval message forwarded between signers.
pub const MAX_PRIVVAL_MESSAGE: usize = 64 * 1024;

/// Why a request was not signed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("height/round/step {asked:?} is below the signed watermark")]
    Regression { asked: (u64, u32, u8) },
    #[error("equivocation refused: {asked:?} was signed with other sign bytes")]
    Equivocation { asked: (u64, u32, u8) },
    #[error("this signer signs for chain {ours}, not {asked}")]
    WrongChain { ours: String, asked: String },
    #[error("{0}")]
    Malformed(String),
    #[error("no signing watermark yet: run `keyraft signer import-state priv_validator_state.json` (or `--never-signed` for a key that never signed)")]
    NoWatermark,
    #[error("no live signer leader within {0:?}")]
    NoLeader(Duration),
    /// Retryable: lost leadership, or Raft could not commit in time.
    #[error("not committed: {0}")]
    NotCommitted(String),
}

impl Refusal {
    fn result_label(&self) -> &'static str {
        match self {
            Refusal::Regression { .. } => "refused_regression",
            Refusal::Equivocation { .. } => "refused_equivocation",
            Refusal::WrongChain { .. } => "refused_chain_id",
            Refusal::Malformed(_) => "refused_malformed",
            Refusal::NoWatermark => "refused_no_watermark",
            Refusal::NoLeader(_) => "no_leader",
            Refusal::NotCommitted(_) => "not_committed",
        }
    }
}

impl From<SignError> for Refusal {
    fn from(e: SignError) -> Self {
        Refusal::Malformed(e.to_string())
    }
}

pub struct Signer {
    sh: Arc<Shared>,
    cfg: SignerConfig,
    key: ConsensusKey,
    /// One signing at a time on the leader: one commit per new HRS, and
    /// concurrent requests for one HRS share its signature.
    lock: tokio::sync::Mutex<()>,
}

impl Signer {
    pub fn new(sh: Arc<Shared>, cfg: SignerConfig) -> Result<Arc<Signer>, SignError> {
        let key = ConsensusKey::load(&cfg.key)?;
        tracing::info!(chain_id = %cfg.chain_id, address = %key.address_hex(),
            nodes = cfg.nodes.len(), "signer mode: signatures are committed through Raft first");
        Ok(Arc::new(Signer {
            sh,
            cfg,
            key,
            lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn chain_id(&self) -> &str {
        &self.cfg.chain_id
    }

    /// Answers one message from a node this host is connected to.
    pub async fn handle(&self, req: Message) -> Message {
        let sum = match req.sum {
            Some(Sum::PingRequest(_)) => Sum::PingResponse(PingResponse {}),
            Some(Sum::PubKeyRequest(r)) => Sum::PubKeyResponse(self.pub_key(&r.chain_id)),
            Some(Sum::SignVoteRequest(r)) => {
                let reply = self
                    .sign_request(&r.chain_id, r.vote.map(Signable::Vote), "vote")
                    .await;
                Sum::SignedVoteResponse(match reply {
                    Ok(Signable::Vote(v)) => SignedVoteResponse {
                        vote: Some(v),
                        error: None,
                    },
                    Ok(Signable::Proposal(_)) => SignedVoteResponse {
                        vote: None,
                        error: Some(remote_error(&Refusal::Malformed(
                            "a proposal came back".into(),
                        ))),
                    },
                    Err(e) => SignedVoteResponse {
                        vote: None,
                        error: Some(remote_error(&e)),
                    },
                })
            }
            Some(Sum::SignProposalRequest(r)) => {
                let reply = self
                    .sign_request(&r.chain_id, r.proposal.map(Signable::Proposal), "proposal")
                    .await;
                Sum::SignedProposalResponse(match reply {
                    Ok(Signable::Proposal(p)) => SignedProposalResponse {
                        proposal: Some(p),
                        error: None,
                    },
                    Ok(Signable::Vote(_)) => SignedProposalResponse {
                        proposal: None,
                        error: Some(remote_error(&Refusal::Malformed("a vote came back".into()))),
                    },
                    Err(e) => SignedProposalResponse {
                        proposal: None,
                        error: Some(remote_error(&e)),
                    },
                })
            }
            other => {
                tracing::warn!("unexpected privval message from a node: {other:?}");
                Sum::PingResponse(PingResponse {})
            }
        };
        Message { sum: Some(sum) }
    }

    fn pub_key(&self, chain_id: &str) -> PubKeyResponse {
        if chain_id != self.cfg.chain_id {
            return PubKeyResponse {
                pub_key: None,
                error: Some(remote_error(&Refusal::WrongChain {
                    ours: self.cfg.chain_id.clone(),
                    asked: chain_id.to_string(),
                })),
            };
        }
        PubKeyResponse {
            pub_key: Some(RawPublicKey {
                sum: Some(public_key::Sum::Ed25519(
                    self.key.public().as_bytes().to_vec(),
                )),
            }),
            error: None,
        }
    }

    /// A sign request from a local node: checked, then signed here or on
    /// the leader, with metrics.
    async fn sign_request(
        &self,
        chain_id: &str,
        what: Option<Signable>,
        expected: &'static str,
    ) -> Result<Signable, Refusal> {
        let started = Instant::now();
        let what =
            what.ok_or_else(|| Refusal::Malformed(format!("no {expected} in the request")))?;
        let kind = what.kind();
        let result = if chain_id != self.cfg.chain_id {
            Err(Refusal::WrongChain {
                ours: self.cfg.chain_id.clone(),
                asked: chain_id.to_string(),
            })
        } else {
            self.sign_anywhere(what).await
        };
        let m = &self.sh.metrics;
        let label = match &result {
            Ok(_) => "signed",
            Err(e) => e.result_label(),
        };
        m.sign_requests.with_label_values(&[kind, label]).inc();
        m.sign_seconds.observe(started.elapsed().as_secs_f64());
        match &result {
            Err(e @ Refusal::Equivocation { .. }) => tracing::error!("{e}"),
            Err(e) => tracing::warn!("{kind} not signed: {e}"),
            Ok(_) => {}
        }
        result
    }

    /// Signs on the leader: here if this node leads, else forwarded. Waits
    /// up to [`SIGN_PATIENCE`] for a leader to exist and commit.
    async fn sign_anywhere(&self, what: Signable) -> Result<Signable, Refusal> {
        let deadline = Instant::now() + SIGN_PATIENCE;
        let mut last = Refusal::NoLeader(SIGN_PATIENCE);
        while Instant::now() < deadline {
            let attempt = match self.sh.leader() {
                Some(id) if id == self.sh.cfg.id => self.sign_here(what.clone(), deadline).await,
                Some(id) => self.forward(id, &what, deadline).await,
                None => Err(Refusal::NoLeader(SIGN_PATIENCE)),
            };
            match attempt {
                Err(e @ (Refusal::NoLeader(_) | Refusal::NotCommitted(_))) => {
                    last = e;
                    tokio::time::sleep(RETRY).await;
                }
                done => return done,
            }
        }
        Err(last)
    }

    /// The leader's path: check, commit, sign. Only after Raft committed
    /// this HRS and digest (and the state machine accepted them) does a
    /// signature exist.
    pub async fn sign_here(&self, what: Signable, deadline: Instant) -> Result<Signable, Refusal> {
        let left = deadline.saturating_duration_since(Instant::now());
        let _one_at_a_time = tokio::time::timeout(left, self.lock.lock())
            .await
            .map_err(|_| Refusal::NotCommitted("busy signing other requests".into()))?;
        let chain_id = self.cfg.chain_id.as_str();
        // Everything that could make signing fail is checked before the
        // commit, so that a malformed request cannot use up an HRS.
        what.validate(chain_id)?;
        let hrs = what.hrs()?;
        let digest = what.digest(chain_id)?;
        // What this node applied: a repeat of the last HRS with the same
        // bytes needs no commit (its signature is already out there).
        let applied = self.sh.cluster.borrow().signer.clone();
        let Some(w) = &applied else {
            return Err(Refusal::NoWatermark);
        };
        match w.check(chain_id, hrs, &digest) {
            SignVerdict::Sign { timestamp } if hrs == w.hrs() => {
                return Ok(what.sign(&self.key, chain_id, timestamp)?);
            }
            SignVerdict::Sign { .. } => {}
            v => return Err(refusal(v, hrs, chain_id)),
        }
        if w.height > 0 && hrs.0 > w.height.saturating_add(MAX_HEIGHT_JUMP) {
            return Err(Refusal::Malformed(format!(
                "height {} is more than {MAX_HEIGHT_JUMP} above the watermark {}: refused",
                hrs.0, w.height
            )));
        }
        // A voter that has not registered yet would not be recognised if it
        // lost its data dir and came back empty (DESIGN step 9): sign only
        // once every voter is known to have run with durable state.
        let unregistered: Vec<NodeId> = {
            let registered = self.sh.cluster.borrow().registered.clone();
            self.sh
                .raft_metrics()
                .membership_config
                .membership()
                .voter_ids()
                .filter(|v| !registered.contains(v))
                .collect()
        };
        if !unregistered.is_empty() {
            return Err(Refusal::NotCommitted(format!(
                "voters {unregistered:?} have not registered yet"
            )));
        }
        if Instant::now() >= deadline {
            return Err(Refusal::NotCommitted(format!(
                "no commit within {SIGN_PATIENCE:?}"
            )));
        }
        let cmd = Command::Signed {
            chain_id: chain_id.to_string(),
            height: hrs.0,
            round: hrs.1,
            step: hrs.2,
            digest,
            timestamp: what.timestamp(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let written = tokio::time::timeout(left, self.sh.raft.client_write(cmd)).await;
        let reply = match written {
            Ok(Ok(r)) => r.data,
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                return Err(Refusal::NotCommitted("leadership moved".into()))
            }
            Ok(Err(e)) => return Err(Refusal::NotCommitted(e.to_string())),
            Err(_) => {
                return Err(Refusal::NotCommitted(format!(
                    "no commit within {SIGN_PATIENCE:?}"
                )))
            }
        };
        match reply.sign {
            Some(SignVerdict::Sign { timestamp }) => Ok(what.sign(&self.key, chain_id, timestamp)?),
            Some(v) => Err(refusal(v, hrs, chain_id)),
            None => Err(Refusal::NotCommitted(
                "no verdict from the state machine".into(),
            )),
        }
    }

    /// Hands the request to the leader `id` and returns its answer, within
    /// one attempt's deadline and the request's.
    async fn forward(
        &self,
        id: NodeId,
        what: &Signable,
        deadline: Instant,
    ) -> Result<Signable, Refusal> {
        let limit = FORWARD_DEADLINE.min(deadline.saturating_duration_since(Instant::now()));
        let msg = what.to_request(&self.cfg.chain_id).encode_to_vec();
        let channel = self
            .sh
            .peers
            .channel(id)
            .map_err(|e| Refusal::NotCommitted(e.to_string()))?;
        let mut client = pb::signer_client::SignerClient::new(channel)
            .max_decoding_message_size(MAX_PRIVVAL_MESSAGE)
            .max_encoding_message_size(MAX_PRIVVAL_MESSAGE);
        let req = self.sh.peers.request(pb::PrivvalMessage { msg }, limit);
        let reply = self
            .sh
            .peers
            .call(id, limit, client.sign(req))
            .await
            .map_err(|e| Refusal::NotCommitted(format!("forwarding to leader {id}: {e}")))?;
        let reply = Message::decode(reply.msg.as_slice())
            .map_err(|e| Refusal::NotCommitted(format!("leader {id} answered garbage: {e}")))?;
        match reply.sum {
            Some(Sum::SignedVoteResponse(SignedVoteResponse { vote: Some(v), .. })) => {
                Ok(Signable::Vote(v))
            }
            Some(Sum::SignedProposalResponse(SignedProposalResponse {
                proposal: Some(p), ..
            })) => Ok(Signable::Proposal(p)),
            Some(Sum::SignedVoteResponse(SignedVoteResponse { error: Some(e), .. }))
            | Some(Sum::SignedProposalResponse(SignedProposalResponse {
                error: Some(e), ..
            })) => Err(from_remote_error(e, what)),
            other => Err(Refusal::NotCommitted(format!(
                "leader {id} answered {other:?}"
            ))),
        }
    }

    /// The leader's end of [`Signer::forward`].
    async fn serve_forwarded(&self, msg: &[u8]) -> Result<Message, Status> {
        if self.sh.leader() != Some(self.sh.cfg.id) {
            return Err(Status::unavailable("not the signer leader"));
        }
        let req = Message::decode(msg).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (what, chain_id) = match req.sum {
            Some(Sum::SignVoteRequest(r)) => (r.vote.map(Signable::Vote), r.chain_id),
            Some(Sum::SignProposalRequest(r)) => (r.proposal.map(Signable::Proposal), r.chain_id),
            _ => return Err(Status::invalid_argument("only sign requests are forwarded")),
        };
        let what = what.ok_or_else(|| Status::invalid_argument("empty sign request"))?;
        if chain_id != self.cfg.chain_id {
            return Err(Status::invalid_argument("wrong chain id"));
        }
        let is_vote = matches!(what, Signable::Vote(_));
        let deadline = Instant::now() + FORWARD_DEADLINE;
        let result = self.sign_here(what, deadline).await;
        if let Err(Refusal::NotCommitted(why)) = &result {
            return Err(Status::unavailable(why.clone()));
        }
        let sum = match (result, is_vote) {
            (Ok(Signable::Vote(v)), _) => Sum::SignedVoteResponse(SignedVoteResponse {
                vote: Some(v),
                error: None,
            }),
            (Ok(Signable::Proposal(p)), _) => Sum::SignedProposalResponse(SignedProposalResponse {
                proposal: Some(p),
                error: None,
            }),
            (Err(e), true) => Sum::SignedVoteResponse(SignedVoteResponse {
                vote: None,
                error: Some(remote_error(&e)),
            }),
            (Err(e), false) => Sum::SignedProposalResponse(SignedProposalResponse {
                proposal: None,
                error: Some(remote_error(&e)),
            }),
        };
        Ok(Message { sum: Some(sum) })
    }
}

fn refusal(v: SignVerdict, asked: (u64, u32, u8), chain_id: &str) -> Refusal {
    match v {
        SignVerdict::Regression => Refusal::Regression { asked },
        SignVerdict::Conflict => Refusal::Equivocation { asked },
        SignVerdict::WrongChain => Refusal::WrongChain {
            ours: chain_id.to_string(),
            asked: "another".into(),
        },
        SignVerdict::NoWatermark => Refusal::NoWatermark,
        SignVerdict::Sign { .. } => Refusal::NotCommitted("accepted without a signature".into()),
    }
}

/// CometBFT's `RemoteSignerError` for a refusal. A node does not retry
/// these; the code says why (tmkms uses 2 for a refused double sign).
fn remote_error(e: &Refusal) -> RemoteSignerError {
    let code = match e {
        Refusal::Regression { .. } | Refusal::Equivocation { .. } => 2,
        Refusal::NoLeader(_) | Refusal::NotCommitted(_) => 1,
        Refusal::WrongChain { .. } | Refusal::Malformed(_) | Refusal::NoWatermark => 0,
    };
    RemoteSignerError {
        code,
        description: format!("keyraft: {e}"),
    }
}

fn from_remote_error(e: RemoteSignerError, what: &Signable) -> Refusal {
    let asked = what.hrs().unwrap_or_default();
    if e.description.contains("equivocation refused") {
        Refusal::Equivocation { asked }
    } else if e.description.contains("no signing watermark") {
        Refusal::NoWatermark
    } else if e.description.contains("below the signed watermark") {
        Refusal::Regression { asked }
    } else {
        Refusal::Malformed(e.description)
    }
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
    async fn sign(
        &self,
        req: Request<pb::PrivvalMessage>,
    ) -> Result<Response<pb::PrivvalMessage>, Status> {
        crate::tls::peer_of(&req)?;
        let reply = self.signer.serve_forwarded(&req.get_ref().msg).await?;
        Ok(Response::new(pb::PrivvalMessage {
            msg: reply.encode_to_vec(),
        }))
    }
}
