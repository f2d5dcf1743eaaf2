//! The consensus messages a CometBFT validator signs, as the judge builds
//! and checks them.
//!
//! Owns: the judge's deterministic block ids, building unsigned votes and
//! proposals the way a CometBFT node hands them to its signer, and the
//! canonical sign bytes (computed by the cometbft crate, the one tmkms signs
//! with, never by hand). Must not: keep state; the books are in `ledger`.

use std::time::{SystemTime, UNIX_EPOCH};

use cometbft_proto::google::protobuf::Timestamp;
use cometbft_proto::v0_38::types::{
    BlockId, CanonicalVoteExtension, PartSetHeader, Proposal as RawProposal, Vote as RawVote,
};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `SignedMsgType` codes of CometBFT's protobufs.
pub const PREVOTE: i32 = 1;
pub const PRECOMMIT: i32 = 2;
pub const PROPOSAL: i32 = 32;

/// The three things a validator signs in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Proposal,
    Prevote,
    Precommit,
}

impl Step {
    pub fn code(self) -> i32 {
        match self {
            Step::Proposal => PROPOSAL,
            Step::Prevote => PREVOTE,
            Step::Precommit => PRECOMMIT,
        }
    }

    pub fn of_vote(code: i32) -> Option<Step> {
        match code {
            PREVOTE => Some(Step::Prevote),
            PRECOMMIT => Some(Step::Precommit),
            _ => None,
        }
    }
}

/// Sign bytes could not be computed: the message is not a valid CometBFT
/// vote or proposal.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub why: String,
}

fn malformed(what: &'static str, why: impl ToString) -> Malformed {
    Malformed {
        what,
        why: why.to_string(),
    }
}

/// The block the network proposes at (`height`, `round`): the same for every
/// node of the chain, different for every round.
pub fn block_id(chain_id: &str, height: u64, round: u32) -> BlockId {
    let hash = Sha256::new()
        .chain_update(b"keyraft-fakechain-block\0")
        .chain_update(chain_id.as_bytes())
        .chain_update(height.to_be_bytes())
        .chain_update(round.to_be_bytes())
        .finalize()
        .to_vec();
    with_parts(hash)
}

/// A conflicting block for the same height and round, as a sentry that was
/// shown a different proposal (or an amnesia attack) would ask to sign.
pub fn conflicting(block: &BlockId, node: u64) -> BlockId {
    let hash = Sha256::new()
        .chain_update(&block.hash)
        .chain_update(b"equivocate")
        .chain_update(node.to_be_bytes())
        .finalize()
        .to_vec();
    with_parts(hash)
}

fn with_parts(hash: Vec<u8>) -> BlockId {
    let parts = Sha256::digest(&hash).to_vec();
    BlockId {
        hash,
        part_set_header: Some(PartSetHeader {
            total: 1,
            hash: parts,
        }),
    }
}

/// The nil block id, as CometBFT encodes it (present but empty).
pub fn nil() -> BlockId {
    BlockId {
        hash: Vec::new(),
        part_set_header: Some(PartSetHeader::default()),
    }
}

pub fn is_nil(block: Option<&BlockId>) -> bool {
    block.is_none_or(|b| b.hash.is_empty())
}

/// What the judge compares to tell two votes apart: the block id only (two
/// signatures of the same block with different timestamps are not an
/// equivocation). Nil is the empty key.
pub fn block_key(block: Option<&BlockId>) -> Vec<u8> {
    match block {
        Some(b) if !b.hash.is_empty() => {
            let mut k = b.hash.clone();
            if let Some(p) = &b.part_set_header {
                k.extend_from_slice(&p.total.to_be_bytes());
                k.extend_from_slice(&p.hash);
            }
            k
        }
        _ => Vec::new(),
    }
}

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An unsigned vote, as a node hands it to its signer.
pub fn vote(
    step: Step,
    height: u64,
    round: u32,
    block: BlockId,
    address: [u8; 20],
    extension: Vec<u8>,
) -> RawVote {
    RawVote {
        r#type: step.code(),
        height: height as i64,
        round: round as i32,
        block_id: Some(block),
        timestamp: Some(now()),
        validator_address: address.to_vec(),
        validator_index: 0,
        signature: Vec::new(),
        extension,
        extension_signature: Vec::new(),
    }
}

/// An unsigned proposal (no proof-of-lock round).
pub fn proposal(height: u64, round: u32, block: BlockId) -> RawProposal {
    RawProposal {
        r#type: PROPOSAL,
        height: height as i64,
        round: round as i32,
        pol_round: -1,
        block_id: Some(block),
        timestamp: Some(now()),
        signature: Vec::new(),
    }
}

fn chain(chain_id: &str) -> Result<cometbft::chain::Id, Malformed> {
    cometbft::chain::Id::try_from(chain_id.to_string()).map_err(|e| malformed("chain id", e))
}

/// CometBFT's canonical sign bytes of a vote for `chain_id`.
pub fn vote_sign_bytes(chain_id: &str, vote: &RawVote) -> Result<Vec<u8>, Malformed> {
    let v = cometbft::Vote::try_from(vote.clone()).map_err(|e| malformed("vote", e))?;
    Ok(v.into_signable_vec(chain(chain_id)?))
}

/// CometBFT's canonical sign bytes of a proposal for `chain_id`.
pub fn proposal_sign_bytes(chain_id: &str, p: &RawProposal) -> Result<Vec<u8>, Malformed> {
    let p = cometbft::Proposal::try_from(p.clone()).map_err(|e| malformed("proposal", e))?;
    Ok(p.into_signable_vec(chain(chain_id)?))
}

/// The bytes a vote extension signature covers (CometBFT 0.38+).
pub fn extension_sign_bytes(chain_id: &str, vote: &RawVote) -> Vec<u8> {
    CanonicalVoteExtension {
        extension: vote.extension.clone(),
        height: vote.height,
        round: vote.round as i64,
        chain_id: chain_id.to_string(),
    }
    .encode_length_delimited_to_vec()
}

/// Whether a vote extension must be signed: non-nil precommits only.
pub fn wants_extension(vote: &RawVote) -> bool {
    vote.r#type == PRECOMMIT && !is_nil(vote.block_id.as_ref())
}

pub fn verify(key: &VerifyingKey, msg: &[u8], signature: &[u8]) -> bool {
    Signature::from_slice(signature).is_ok_and(|s| key.verify(msg, &s).is_ok())
}

/// Signs a vote (and its extension when one is due and `extensions` is on),
/// as a signer does. For tests and benchmarks; the judge never signs.
pub fn sign_vote(
    key: &SigningKey,
    chain_id: &str,
    vote: &mut RawVote,
    extensions: bool,
) -> Result<(), Malformed> {
    vote.signature = key.sign(&vote_sign_bytes(chain_id, vote)?).to_vec();
    if extensions && wants_extension(vote) {
        vote.extension_signature = key.sign(&extension_sign_bytes(chain_id, vote)).to_vec();
    }
    Ok(())
}

/// Signs a proposal, as a signer does. For tests and benchmarks.
pub fn sign_proposal(
    key: &SigningKey,
    chain_id: &str,
    p: &mut RawProposal,
) -> Result<(), Malformed> {
    p.signature = key.sign(&proposal_sign_bytes(chain_id, p)?).to_vec();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_bytes_ignore_the_signature_and_cover_the_chain_id() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let block = block_id("c", 5, 0);
        let mut v = vote(Step::Prevote, 5, 0, block, [1; 20], vec![]);
        let before = vote_sign_bytes("c", &v).unwrap();
        sign_vote(&key, "c", &mut v, false).unwrap();
        assert_eq!(vote_sign_bytes("c", &v).unwrap(), before);
        assert_ne!(vote_sign_bytes("other", &v).unwrap(), before);
        assert!(verify(&key.verifying_key(), &before, &v.signature));
    }

    #[test]
    fn nil_and_conflicting_blocks_have_distinct_keys() {
        let b = block_id("c", 1, 0);
        assert_eq!(block_key(Some(&nil())), Vec::<u8>::new());
        assert_ne!(block_key(Some(&b)), block_key(Some(&conflicting(&b, 2))));
        assert_ne!(block_key(Some(&b)), block_key(Some(&block_id("c", 1, 1))));
        assert_eq!(block_key(Some(&b)), block_key(Some(&block_id("c", 1, 0))));
    }
}
