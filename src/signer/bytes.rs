//! CometBFT 1.x's `SignBytesRequest`: raw bytes a node (its application)
//! asks the validator's key to sign. They are no consensus message, so
//! they never touch the watermark; they must not be one in disguise.
//!
//! Owns: whether raw bytes may be signed for a chain on a connection
//! ([`may_sign`], pure), which consensus message of the chain bytes read
//! as ([`disguise`]), and the leader's path for them
//! ([`Signer::sign_bytes_here`]: checked again, `SignBytes` committed,
//! then signed). Must not: sign bytes that read as this chain's vote,
//! proposal or vote extension, or sign without a commit.

use cometbft_proto::v0_38::types::{CanonicalProposal, CanonicalVote, CanonicalVoteExtension};
use openraft::storage::RaftStateMachine;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Chain, Forward, Refusal, Signer};
use crate::config::{ChainConfig, ProtocolVersion};
use crate::ledger::{Command, SignVerdict};
use crate::raft::TypeConfig;

/// What a member gossips once it applies [`Command::SignBytes`]: the
/// leader proposes one only when every other voter does.
pub const FEATURE: &str = "sign-bytes";

/// Whether `value` may be signed for `chain` on a connection speaking
/// `version`: a 1.x connection, a chain whose configuration allows raw
/// bytes (`sign-bytes`), and bytes that are no consensus message of it.
pub fn may_sign(
    chain: &ChainConfig,
    version: ProtocolVersion,
    value: &[u8],
) -> Result<(), Refusal> {
    if version == ProtocolVersion::V0_38 {
        return Err(Refusal::BytesRefused(format!(
            "this connection to a node of {} speaks v0.38, which has no raw bytes: set protocol-version v1 if the node runs CometBFT 1.x",
            chain.chain_id
        )));
    }
    allowed(chain, value)
}

/// The checks of raw bytes the leader repeats: the chain allows them, and
/// they are no consensus message of it.
fn allowed(chain: &ChainConfig, value: &[u8]) -> Result<(), Refusal> {
    if !chain.protocol.sign_bytes {
        return Err(Refusal::BytesRefused(format!(
            "raw bytes are not signed for chain {} (sign-bytes is off)",
            chain.chain_id
        )));
    }
    match disguise(value) {
        Some(what) => {
            tracing::error!(chain = %chain.chain_id, "raw bytes that read as a {what} were asked for: refused");
            Err(Refusal::BytesRefused(format!(
                "the bytes read as a {what}: a consensus message is signed only as one"
            )))
        }
        None => Ok(()),
    }
}

/// Which consensus message `value` reads as, if any: a canonical vote,
/// proposal or vote extension carrying a chain id CometBFT accepts (of any
/// chain: a key may be shared with another chain, one this cluster does
/// not sign for), with or without the length prefix CometBFT's sign bytes
/// have. CometBFT verifies a signature against the canonical bytes it
/// rebuilds, so other encodings of one are no vote to it.
pub fn disguise(value: &[u8]) -> Option<&'static str> {
    if value == super::key::PROOF_MESSAGE {
        return Some("keyraft proof message");
    }
    let mut forms = vec![value];
    if let Ok(len) = prost::decode_length_delimiter(value) {
        let prefix = prost::length_delimiter_len(len);
        if prefix + len == value.len() {
            forms.push(&value[prefix..]);
        }
    }
    let a_chain = |id: &str| cometbft::chain::Id::try_from(id.to_string()).is_ok();
    forms.into_iter().find_map(|body| {
        if CanonicalVote::decode(body).is_ok_and(|v| a_chain(&v.chain_id)) {
            Some("vote")
        } else if CanonicalProposal::decode(body).is_ok_and(|p| a_chain(&p.chain_id)) {
            Some("proposal")
        } else if CanonicalVoteExtension::decode(body).is_ok_and(|e| a_chain(&e.chain_id)) {
            Some("vote extension")
        } else {
            None
        }
    })
}

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// The leader's path for raw bytes: checked again (a follower asked),
    /// every voter able to apply `SignBytes`, its commit, then the
    /// signature.
    pub(super) async fn sign_bytes_here(
        &self,
        chain: &Chain,
        value: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, Refusal> {
        self.key_is_signer_modes()?;
        allowed(&chain.cfg, value)?;
        if self.core.cluster.borrow().watermark(chain.id()).is_none() {
            return Err(Refusal::NoWatermark);
        }
        let me = self.core.cfg.id;
        let voters = self.voters();
        let others = voters.iter().copied().filter(|v| *v != me);
        if !self.core.view.all_have(others, FEATURE) {
            return Err(Refusal::BytesRefused(
                "not every voter runs a keyraft that commits raw-bytes signatures: upgrade them first".into(),
            ));
        }
        let cmd = Command::SignBytes {
            chain_id: chain.id().to_string(),
            digest: hex::encode(Sha256::digest(value)),
        };
        match self.commit(cmd, deadline).await? {
            SignVerdict::Sign { .. } => Ok(self.signed_bytes(chain, value.to_vec()).await?),
            v => {
                Err(Refusal::from_verdict(&v, (0, 0, 0), chain.id())
                    .unwrap_or(Refusal::NoWatermark))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Protocol, ProtocolVersion};
    use cometbft_proto::v0_38::types::CanonicalBlockId;

    fn chain(sign_bytes: bool) -> ChainConfig {
        ChainConfig {
            chain_id: "c-1".into(),
            key: "k".into(),
            nodes: Vec::new(),
            node_rpc: None,
            protocol: Protocol {
                version: ProtocolVersion::V1,
                sign_bytes,
            },
        }
    }

    fn vote_bytes(chain_id: &str) -> Vec<u8> {
        CanonicalVote {
            r#type: 2,
            height: 5,
            round: 0,
            block_id: Some(CanonicalBlockId {
                hash: vec![1; 32],
                part_set_header: None,
            }),
            timestamp: None,
            chain_id: chain_id.into(),
        }
        .encode_length_delimited_to_vec()
    }

    #[test]
    fn raw_bytes_are_signed_only_where_allowed_and_never_as_a_consensus_message() {
        let proposal = CanonicalProposal {
            r#type: 32,
            height: 5,
            chain_id: "c-1".into(),
            ..Default::default()
        };
        let extension = CanonicalVoteExtension {
            extension: b"x".to_vec(),
            height: 5,
            round: 0,
            chain_id: "c-1".into(),
        };
        // (allowed by config, version, bytes) -> signed?
        let table: [(bool, ProtocolVersion, Vec<u8>, bool); 8] = [
            (
                true,
                ProtocolVersion::V1,
                b"app attestation 7".to_vec(),
                true,
            ),
            (
                false,
                ProtocolVersion::V1,
                b"app attestation 7".to_vec(),
                false,
            ),
            (
                true,
                ProtocolVersion::V0_38,
                b"app attestation 7".to_vec(),
                false,
            ),
            (true, ProtocolVersion::V1, vote_bytes("c-1"), false),
            (
                true,
                ProtocolVersion::V1,
                vote_bytes("c-1")[1..].to_vec(),
                false,
            ),
            (
                true,
                ProtocolVersion::V1,
                proposal.encode_length_delimited_to_vec(),
                false,
            ),
            (
                true,
                ProtocolVersion::V1,
                extension.encode_length_delimited_to_vec(),
                false,
            ),
            // Another chain's vote too: a key may be shared between chains.
            (true, ProtocolVersion::V1, vote_bytes("other-2"), false),
        ];
        for (i, (allowed, version, bytes, signed)) in table.into_iter().enumerate() {
            let r = may_sign(&chain(allowed), version, &bytes);
            assert_eq!(r.is_ok(), signed, "row {i}: {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, Refusal::BytesRefused(_)), "row {i}: {e}");
            }
        }
        assert_eq!(disguise(&vote_bytes("c-1")), Some("vote"));
        assert_eq!(disguise(b""), None, "empty bytes read as nothing of c-1");
    }

    #[test]
    fn every_consensus_message_keyraft_signs_reads_as_one() {
        use super::super::sign::{Extension, Signable};
        use cometbft_proto::google::protobuf::Timestamp;
        use cometbft_proto::v0_38::types::{BlockId, PartSetHeader, Proposal, Vote};
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..500 {
            let chain_id = format!("chain-{}", rng.random_range(0..1_000_000u32));
            let height = rng.random_range(1..i64::MAX);
            let round = rng.random_range(0..1000);
            let block = BlockId {
                hash: (0..32).map(|_| rng.random()).collect(),
                part_set_header: Some(PartSetHeader {
                    total: rng.random_range(1..100),
                    hash: (0..32).map(|_| rng.random()).collect(),
                }),
            };
            let timestamp = Some(Timestamp {
                seconds: rng.random_range(0..4_000_000_000),
                nanos: rng.random_range(0..1_000_000_000),
            });
            let vote = Vote {
                r#type: if rng.random() { 1 } else { 2 },
                height,
                round,
                block_id: rng.random::<bool>().then(|| block.clone()),
                timestamp,
                validator_address: vec![7; 20],
                extension: (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
                ..Default::default()
            };
            let proposal = Proposal {
                r#type: 32,
                height,
                round,
                pol_round: -1,
                block_id: Some(block),
                timestamp,
                signature: Vec::new(),
            };
            let extension = CanonicalVoteExtension {
                extension: vote.extension.clone(),
                height,
                round: i64::from(round),
                chain_id: chain_id.clone(),
            }
            .encode_length_delimited_to_vec();
            let signed = [
                Signable::Vote(vote, Extension::Sign)
                    .sign_bytes(&chain_id)
                    .unwrap(),
                Signable::Proposal(proposal).sign_bytes(&chain_id).unwrap(),
                extension,
            ];
            for (bytes, what) in signed.iter().zip(["vote", "proposal", "vote extension"]) {
                assert!(
                    disguise(bytes).is_some(),
                    "{what} of {chain_id} at {height}/{round} not recognised"
                );
            }
        }
    }
}
