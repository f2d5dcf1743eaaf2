//! The privval protocol versions keyraft speaks to a chain's nodes:
//! CometBFT 0.38's (`tendermint.privval`) and 1.x's (`cometbft.privval.v1`).
//!
//! The two share every message tag and every request field; 1.x adds
//! `skip_extension_signing` to a vote request and the `SignBytes` pair,
//! and answers the public key with `pub_key_type` and `pub_key_bytes`
//! (fields 3 and 4) where 0.38 has a `PublicKey` oneof (field 1). So every
//! request is read with the 1.x schema (a 0.38 request reads the same,
//! with neither addition), and what a connection speaks ([`ProtocolVersion`])
//! decides the public key's answer and whether the 1.x-only requests are
//! taken. Around an upgrade the key is answered in both shapes at once:
//! each version reads its own fields and skips the other's.
//!
//! Owns: a frame as a [`Request`], a [`Reply`] as a frame of what the
//! connection speaks, and
//! the conversion between 1.x votes and proposals and the 0.38 types the
//! sign path works on (the same fields and tags). Must not: sign, or
//! decide what may be signed.

use cometbft_proto::v0_38::crypto::{public_key, PublicKey as RawPublicKey};
use cometbft_proto::v0_38::privval as v0;
use cometbft_proto::v0_38::types::{
    BlockId as BlockId0, PartSetHeader as Parts0, Proposal as RawProposal, Vote as RawVote,
};
use cometbft_proto::v1::privval::v1;
use cometbft_proto::v1::types::v1::{
    BlockId as BlockId1, PartSetHeader as Parts1, Proposal as Proposal1, Vote as Vote1,
};

use super::refusal::Refusal;
pub use super::sign::Extension;
use super::sign::Signable;
use crate::config::ProtocolVersion;

/// What a node asks, whichever version it speaks.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping,
    PubKey {
        chain_id: String,
    },
    Vote {
        chain_id: String,
        vote: Option<RawVote>,
        extension: Extension,
    },
    Proposal {
        chain_id: String,
        proposal: Option<RawProposal>,
    },
    /// 1.x only: arbitrary bytes (no chain id: the connection's chain).
    Bytes(Vec<u8>),
    /// Not a request (a response, or an empty message).
    Unexpected,
}

/// keyraft's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Pong,
    PubKey(Result<[u8; 32], Refusal>),
    Vote(Result<RawVote, Refusal>),
    Proposal(Result<RawProposal, Refusal>),
    Bytes(Result<Vec<u8>, Refusal>),
}

/// One frame to a node, in what its connection speaks.
pub enum Frame {
    V0_38(v0::Message),
    V1(v1::Message),
    Either(EitherMessage),
}

/// A privval message holding a public key answer that 0.38 and 1.x both
/// read: 0.38's `PublicKey` (field 1) beside 1.x's type and bytes (fields 3
/// and 4), the error (field 2) shared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EitherMessage {
    /// `Message.pub_key_response` in both versions.
    #[prost(message, optional, tag = "2")]
    pub pub_key_response: Option<EitherPubKeyResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EitherPubKeyResponse {
    #[prost(message, optional, tag = "1")]
    pub pub_key: Option<RawPublicKey>,
    #[prost(message, optional, tag = "2")]
    pub error: Option<v0::RemoteSignerError>,
    #[prost(bytes = "vec", tag = "3")]
    pub pub_key_bytes: Vec<u8>,
    #[prost(string, tag = "4")]
    pub pub_key_type: String,
}

/// A frame read with the 1.x schema, as a request.
pub fn read(msg: v1::Message) -> Request {
    use v1::message::Sum;
    match msg.sum {
        Some(Sum::PingRequest(_)) => Request::Ping,
        Some(Sum::PubKeyRequest(r)) => Request::PubKey {
            chain_id: r.chain_id,
        },
        Some(Sum::SignVoteRequest(r)) => Request::Vote {
            chain_id: r.chain_id,
            vote: r.vote.map(vote_from_v1),
            extension: if r.skip_extension_signing {
                Extension::Skip
            } else {
                Extension::Sign
            },
        },
        Some(Sum::SignProposalRequest(r)) => Request::Proposal {
            chain_id: r.chain_id,
            proposal: r.proposal.map(proposal_from_v1),
        },
        Some(Sum::SignBytesRequest(r)) => Request::Bytes(r.value),
        _ => Request::Unexpected,
    }
}

/// The privval request asking to sign `what` for `chain_id`.
pub fn request_for(what: &Signable, chain_id: &str) -> Request {
    let chain_id = chain_id.to_string();
    match what {
        Signable::Vote(v, extension) => Request::Vote {
            chain_id,
            vote: Some(v.clone()),
            extension: *extension,
        },
        Signable::Proposal(p) => Request::Proposal {
            chain_id,
            proposal: Some(p.clone()),
        },
    }
}

/// A request as a 1.x frame: how a follower forwards it to the leader (a
/// leader from before 1.x reads it as 0.38, without 1.x's additions).
pub fn request_frame(req: &Request) -> v1::Message {
    use v1::message::Sum;
    let sum = match req.clone() {
        Request::Ping | Request::Unexpected => Sum::PingRequest(v1::PingRequest {}),
        Request::PubKey { chain_id } => Sum::PubKeyRequest(v1::PubKeyRequest { chain_id }),
        Request::Vote {
            chain_id,
            vote,
            extension,
        } => Sum::SignVoteRequest(v1::SignVoteRequest {
            vote: vote.map(vote_to_v1),
            chain_id,
            skip_extension_signing: extension == Extension::Skip,
        }),
        Request::Proposal { chain_id, proposal } => {
            Sum::SignProposalRequest(v1::SignProposalRequest {
                proposal: proposal.map(proposal_to_v1),
                chain_id,
            })
        }
        Request::Bytes(value) => Sum::SignBytesRequest(v1::SignBytesRequest { value }),
    };
    v1::Message { sum: Some(sum) }
}

/// `reply` as a connection speaking `speaks` writes it. A bytes reply
/// exists only in 1.x: on a 0.38 connection (where no node asks for one)
/// it is written as 1.x's.
pub fn write(speaks: ProtocolVersion, reply: Reply) -> Frame {
    match (speaks, reply) {
        (ProtocolVersion::V0_38, Reply::Pong) => {
            v0_frame(v0::message::Sum::PingResponse(v0::PingResponse {}))
        }
        (ProtocolVersion::V0_38, Reply::PubKey(r)) => {
            let (key, error) = split(r);
            v0_frame(v0::message::Sum::PubKeyResponse(v0::PubKeyResponse {
                pub_key: key.map(ed25519),
                error,
            }))
        }
        (ProtocolVersion::Either, Reply::PubKey(r)) => {
            let (key, error) = split(r);
            Frame::Either(EitherMessage {
                pub_key_response: Some(EitherPubKeyResponse {
                    pub_key: key.map(ed25519),
                    error,
                    pub_key_bytes: key.map(|k| k.to_vec()).unwrap_or_default(),
                    pub_key_type: key.map(|_| ED25519.to_string()).unwrap_or_default(),
                }),
            })
        }
        (ProtocolVersion::V0_38, Reply::Vote(r)) => {
            let (vote, error) = split(r);
            v0_frame(v0::message::Sum::SignedVoteResponse(
                v0::SignedVoteResponse { vote, error },
            ))
        }
        (ProtocolVersion::V0_38, Reply::Proposal(r)) => {
            let (proposal, error) = split(r);
            v0_frame(v0::message::Sum::SignedProposalResponse(
                v0::SignedProposalResponse { proposal, error },
            ))
        }
        (_, reply) => Frame::V1(v1_reply(reply)),
    }
}

/// CometBFT 1.x's name for an ed25519 key type.
const ED25519: &str = "ed25519";

fn ed25519(key: [u8; 32]) -> RawPublicKey {
    RawPublicKey {
        sum: Some(public_key::Sum::Ed25519(key.to_vec())),
    }
}

fn v1_reply(reply: Reply) -> v1::Message {
    use v1::message::Sum;
    let sum = match reply {
        Reply::Pong => Sum::PingResponse(v1::PingResponse {}),
        Reply::PubKey(r) => {
            let (key, error) = split(r);
            Sum::PubKeyResponse(v1::PubKeyResponse {
                error: error.map(error_v1),
                pub_key_bytes: key.map(|k| k.to_vec()).unwrap_or_default(),
                // CometBFT 1.x's name for an ed25519 key type.
                pub_key_type: if key.is_some() {
                    ED25519.into()
                } else {
                    String::new()
                },
            })
        }
        Reply::Vote(r) => {
            let (vote, error) = split(r);
            Sum::SignedVoteResponse(v1::SignedVoteResponse {
                vote: vote.map(vote_to_v1),
                error: error.map(error_v1),
            })
        }
        Reply::Proposal(r) => {
            let (proposal, error) = split(r);
            Sum::SignedProposalResponse(v1::SignedProposalResponse {
                proposal: proposal.map(proposal_to_v1),
                error: error.map(error_v1),
            })
        }
        Reply::Bytes(r) => {
            let (signature, error) = split(r);
            Sum::SignBytesResponse(v1::SignBytesResponse {
                signature: signature.unwrap_or_default(),
                error: error.map(error_v1),
            })
        }
    };
    v1::Message { sum: Some(sum) }
}

fn v0_frame(sum: v0::message::Sum) -> Frame {
    Frame::V0_38(v0::Message { sum: Some(sum) })
}

fn split<T>(r: Result<T, Refusal>) -> (Option<T>, Option<v0::RemoteSignerError>) {
    match r {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e.remote_error())),
    }
}

fn error_v1(e: v0::RemoteSignerError) -> v1::RemoteSignerError {
    v1::RemoteSignerError {
        code: e.code,
        description: e.description,
    }
}

fn block_from_v1(b: BlockId1) -> BlockId0 {
    BlockId0 {
        hash: b.hash,
        part_set_header: b.part_set_header.map(|p| Parts0 {
            total: p.total,
            hash: p.hash,
        }),
    }
}

fn block_to_v1(b: BlockId0) -> BlockId1 {
    BlockId1 {
        hash: b.hash,
        part_set_header: b.part_set_header.map(|p| Parts1 {
            total: p.total,
            hash: p.hash,
        }),
    }
}

/// A 1.x vote as 0.38's (the same fields and tags).
pub fn vote_from_v1(v: Vote1) -> RawVote {
    RawVote {
        r#type: v.r#type,
        height: v.height,
        round: v.round,
        block_id: v.block_id.map(block_from_v1),
        timestamp: v.timestamp,
        validator_address: v.validator_address,
        validator_index: v.validator_index,
        signature: v.signature,
        extension: v.extension,
        extension_signature: v.extension_signature,
    }
}

pub fn vote_to_v1(v: RawVote) -> Vote1 {
    Vote1 {
        r#type: v.r#type,
        height: v.height,
        round: v.round,
        block_id: v.block_id.map(block_to_v1),
        timestamp: v.timestamp,
        validator_address: v.validator_address,
        validator_index: v.validator_index,
        signature: v.signature,
        extension: v.extension,
        extension_signature: v.extension_signature,
    }
}

pub fn proposal_from_v1(p: Proposal1) -> RawProposal {
    RawProposal {
        r#type: p.r#type,
        height: p.height,
        round: p.round,
        pol_round: p.pol_round,
        block_id: p.block_id.map(block_from_v1),
        timestamp: p.timestamp,
        signature: p.signature,
    }
}

pub fn proposal_to_v1(p: RawProposal) -> Proposal1 {
    Proposal1 {
        r#type: p.r#type,
        height: p.height,
        round: p.round,
        pol_round: p.pol_round,
        block_id: p.block_id.map(block_to_v1),
        timestamp: p.timestamp,
        signature: p.signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cometbft_proto::google::protobuf::Timestamp;
    use prost::Message as _;

    fn vote() -> RawVote {
        RawVote {
            r#type: 2,
            height: 9,
            round: 1,
            block_id: Some(BlockId0 {
                hash: vec![1; 32],
                part_set_header: Some(Parts0 {
                    total: 2,
                    hash: vec![3; 32],
                }),
            }),
            timestamp: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            validator_address: vec![7; 20],
            validator_index: 4,
            signature: vec![8; 64],
            extension: b"ext".to_vec(),
            extension_signature: vec![9; 64],
        }
    }

    #[test]
    fn a_0_38_request_reads_the_same_under_the_1_x_schema() {
        let asked = v0::Message {
            sum: Some(v0::message::Sum::SignVoteRequest(v0::SignVoteRequest {
                vote: Some(vote()),
                chain_id: "c".into(),
            })),
        };
        let read_as_v1 = v1::Message::decode(asked.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            read(read_as_v1),
            Request::Vote {
                chain_id: "c".into(),
                vote: Some(vote()),
                extension: Extension::Sign,
            }
        );
        // And a 1.x request, written as keyraft forwards it, reads back.
        let skip = Request::Vote {
            chain_id: "c".into(),
            vote: Some(vote()),
            extension: Extension::Skip,
        };
        assert_eq!(read(request_frame(&skip)), skip);
        let bytes = Request::Bytes(b"app".to_vec());
        assert_eq!(read(request_frame(&bytes)), bytes);
        let p = RawProposal {
            r#type: 32,
            height: 3,
            round: 0,
            pol_round: -1,
            block_id: vote().block_id,
            timestamp: vote().timestamp,
            signature: vec![],
        };
        assert_eq!(proposal_from_v1(proposal_to_v1(p.clone())), p);
    }

    #[test]
    fn each_version_gets_its_own_public_key_shape() {
        let key = [5u8; 32];
        let Frame::V0_38(old) = write(ProtocolVersion::V0_38, Reply::PubKey(Ok(key))) else {
            panic!("0.38 answers in 0.38's shape")
        };
        let Frame::V1(new) = write(ProtocolVersion::V1, Reply::PubKey(Ok(key))) else {
            panic!("1.x answers in 1.x's shape")
        };
        // A 1.x node reading 0.38's answer finds no key ("unsupported
        // key"), and the other way round: the shapes are not interchangeable.
        let as_v1 = v1::Message::decode(old.encode_to_vec().as_slice()).unwrap();
        let Some(v1::message::Sum::PubKeyResponse(r)) = as_v1.sum else {
            panic!()
        };
        assert!(r.pub_key_bytes.is_empty());
        let Some(v1::message::Sum::PubKeyResponse(r)) = new.sum else {
            panic!()
        };
        assert_eq!(
            (r.pub_key_bytes, r.pub_key_type.as_str()),
            (key.to_vec(), "ed25519")
        );
        // A refusal keeps each version's shape: an error, no key.
        let refused = Refusal::Malformed("x".into());
        let Frame::V1(m) = write(ProtocolVersion::V1, Reply::Bytes(Err(refused))) else {
            panic!()
        };
        let Some(v1::message::Sum::SignBytesResponse(r)) = m.sum else {
            panic!()
        };
        assert!(r.signature.is_empty() && r.error.is_some_and(|e| e.code == 0));
        // Signed votes are the same bytes in both versions.
        let Frame::V0_38(a) = write(ProtocolVersion::V0_38, Reply::Vote(Ok(vote()))) else {
            panic!()
        };
        let Frame::V1(b) = write(ProtocolVersion::V1, Reply::Vote(Ok(vote()))) else {
            panic!()
        };
        assert_eq!(a.encode_to_vec(), b.encode_to_vec());
    }

    #[test]
    fn around_an_upgrade_both_versions_read_the_key_from_one_answer() {
        let key = [6u8; 32];
        let Frame::Either(m) = write(ProtocolVersion::Either, Reply::PubKey(Ok(key))) else {
            panic!()
        };
        let bytes = m.encode_to_vec();
        let Some(v0::message::Sum::PubKeyResponse(old)) =
            v0::Message::decode(bytes.as_slice()).unwrap().sum
        else {
            panic!("0.38 reads a public key answer")
        };
        assert_eq!(old.pub_key, Some(ed25519(key)));
        assert!(old.error.is_none());
        let Some(v1::message::Sum::PubKeyResponse(new)) =
            v1::Message::decode(bytes.as_slice()).unwrap().sum
        else {
            panic!("1.x reads a public key answer")
        };
        assert_eq!(
            (new.pub_key_bytes, new.pub_key_type.as_str()),
            (key.to_vec(), ED25519)
        );
        // A refusal reads as a refusal in both, with no key.
        let Frame::Either(m) = write(
            ProtocolVersion::Either,
            Reply::PubKey(Err(Refusal::Malformed("x".into()))),
        ) else {
            panic!()
        };
        let bytes = m.encode_to_vec();
        let Some(v1::message::Sum::PubKeyResponse(new)) =
            v1::Message::decode(bytes.as_slice()).unwrap().sum
        else {
            panic!()
        };
        assert!(new.pub_key_bytes.is_empty() && new.error.is_some());
        let Some(v0::message::Sum::PubKeyResponse(old)) =
            v0::Message::decode(bytes.as_slice()).unwrap().sum
        else {
            panic!()
        };
        assert!(old.pub_key.is_none() && old.error.is_some());
    }
}
