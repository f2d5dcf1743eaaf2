//! What the validator's key signs: canonical sign bytes (computed by the
//! `cometbft` crate tmkms signs with), the digest the watermark records,
//! and the signed messages.
//!
//! Owns: turning a vote or proposal into (height, round, step), a digest
//! that ignores the timestamp, and a signed message over the bytes with the
//! committed timestamp. Must not: decide whether to sign; only
//! [`super::Signer`] calls [`Signable::sign`], once a commit covers the
//! step (its reservation, or the step itself).

use cometbft_proto::google::protobuf::Timestamp;
use cometbft_proto::v0_38::types::{
    CanonicalVoteExtension, Proposal as RawProposal, Vote as RawVote,
};
use prost::Message as _;

pub use super::key::{ConsensusKey, SignError};

/// Whether a vote's extension is signed with it (1.x's
/// `skip_extension_signing`; 0.38 always signs a non-nil precommit's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Extension {
    #[default]
    Sign,
    Skip,
}
use sha2::{Digest, Sha256};

/// CometBFT's step numbers (its `priv_validator_state.json`).
pub const STEP_PROPOSAL: u8 = 1;
pub const STEP_PREVOTE: u8 = 2;
pub const STEP_PRECOMMIT: u8 = 3;

/// What a request asks to sign.
#[derive(Debug, Clone)]
pub enum Signable {
    /// A vote, and whether a non-nil precommit's extension is signed too.
    Vote(RawVote, Extension),
    Proposal(RawProposal),
}

impl Signable {
    /// (height, round, step) in CometBFT's numbering.
    pub fn hrs(&self) -> Result<(u64, u32, u8), SignError> {
        let (h, r, step) = match self {
            Signable::Vote(v, _) => (
                v.height,
                v.round,
                match v.r#type {
                    1 => STEP_PREVOTE,
                    2 => STEP_PRECOMMIT,
                    t => {
                        return Err(SignError::Malformed {
                            what: "vote",
                            why: format!("type {t} is not a prevote or precommit"),
                        })
                    }
                },
            ),
            Signable::Proposal(p) => (p.height, p.round, STEP_PROPOSAL),
        };
        match (u64::try_from(h), u32::try_from(r)) {
            (Ok(h), Ok(r)) if h > 0 => Ok((h, r, step)),
            _ => Err(SignError::Malformed {
                what: "request",
                why: format!("height {h} round {r}"),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Signable::Vote(v, _) if v.r#type == 1 => "prevote",
            Signable::Vote(..) => "precommit",
            Signable::Proposal(_) => "proposal",
        }
    }

    fn set_timestamp(&mut self, t: Timestamp) {
        match self {
            Signable::Vote(v, _) => v.timestamp = Some(t),
            Signable::Proposal(p) => p.timestamp = Some(t),
        }
    }

    pub fn timestamp(&self) -> (i64, i32) {
        let t = match self {
            Signable::Vote(v, _) => v.timestamp.as_ref(),
            Signable::Proposal(p) => p.timestamp.as_ref(),
        };
        t.map_or((0, 0), |t| (t.seconds, t.nanos))
    }

    /// Canonical sign bytes for `chain_id`, as they stand.
    pub fn sign_bytes(&self, chain_id: &str) -> Result<Vec<u8>, SignError> {
        let chain = cometbft::chain::Id::try_from(chain_id.to_string()).map_err(|e| {
            SignError::Malformed {
                what: "chain id",
                why: e.to_string(),
            }
        })?;
        match self {
            Signable::Vote(v, _) => cometbft::Vote::try_from(v.clone())
                .map(|v| v.into_signable_vec(chain))
                .map_err(|e| SignError::Malformed {
                    what: "vote",
                    why: e.to_string(),
                }),
            Signable::Proposal(p) => cometbft::Proposal::try_from(p.clone())
                .map(|p| p.into_signable_vec(chain))
                .map_err(|e| SignError::Malformed {
                    what: "proposal",
                    why: e.to_string(),
                }),
        }
    }

    /// Refuses what could not be signed as asked: no timestamp (CometBFT
    /// always sends one), or sign bytes that cannot be computed (a bad
    /// chain id, block id or timestamp).
    pub fn validate(&self, chain_id: &str) -> Result<(), SignError> {
        let has_ts = match self {
            Signable::Vote(v, _) => v.timestamp.is_some(),
            Signable::Proposal(p) => p.timestamp.is_some(),
        };
        if !has_ts {
            return Err(SignError::Malformed {
                what: "request",
                why: "no timestamp".into(),
            });
        }
        self.stripped().sign_bytes(chain_id).map(|_| ())
    }

    /// SHA-256 of the sign bytes with the timestamp zeroed: two requests
    /// that differ only in their timestamp have the same digest (as
    /// CometBFT's FilePV treats them).
    pub fn digest(&self, chain_id: &str) -> Result<String, SignError> {
        let mut zeroed = self.stripped();
        zeroed.set_timestamp(Timestamp::default());
        Ok(hex::encode(Sha256::digest(zeroed.sign_bytes(chain_id)?)))
    }

    /// The request without what the signer fills in (signatures) or what the
    /// vote's sign bytes do not cover (the extension).
    fn stripped(&self) -> Signable {
        match self {
            Signable::Vote(v, extension) => {
                let mut v = v.clone();
                // Extensions are not part of the vote's sign bytes; CometBFT
                // re-signs them at will.
                v.extension.clear();
                v.extension_signature.clear();
                v.signature.clear();
                Signable::Vote(v, *extension)
            }
            Signable::Proposal(p) => {
                let mut p = p.clone();
                p.signature.clear();
                Signable::Proposal(p)
            }
        }
    }

    /// What a forwarding member needs to complete its own copy of this
    /// signed request: the timestamp, the signature, and the vote
    /// extension's signature (empty where there is none).
    pub fn signed_parts(&self) -> ((i64, i32), Vec<u8>, Vec<u8>) {
        match self {
            Signable::Vote(v, _) => (
                self.timestamp(),
                v.signature.clone(),
                v.extension_signature.clone(),
            ),
            Signable::Proposal(p) => (self.timestamp(), p.signature.clone(), Vec::new()),
        }
    }

    /// This request, completed with the leader's [`Self::signed_parts`].
    pub fn complete(
        mut self,
        timestamp: (i64, i32),
        signature: Vec<u8>,
        extension_signature: Vec<u8>,
    ) -> Signable {
        self.set_timestamp(Timestamp {
            seconds: timestamp.0,
            nanos: timestamp.1,
        });
        match &mut self {
            Signable::Vote(v, extension) => {
                v.signature = signature;
                // A leader from before 1.x signs every extension.
                v.extension_signature = match extension {
                    Extension::Sign => extension_signature,
                    Extension::Skip => Vec::new(),
                };
            }
            Signable::Proposal(p) => p.signature = signature,
        }
        self
    }

    /// Signs with `timestamp` (the one committed for this HRS) and, for a
    /// non-nil precommit, the vote extension too. Returns the signed message.
    pub fn sign(
        self,
        key: &ConsensusKey,
        chain_id: &str,
        timestamp: (i64, i32),
    ) -> Result<Signable, SignError> {
        self.sign_with(chain_id, timestamp, |bytes| key.sign(bytes))
    }

    /// This request as `key` signed it already (another sentry's request
    /// for the bytes just signed): every signature it needs is among the
    /// key's last ones, or `None`.
    pub fn remembered(
        self,
        key: &ConsensusKey,
        chain_id: &str,
        timestamp: (i64, i32),
    ) -> Option<Signable> {
        self.sign_with(chain_id, timestamp, |bytes| {
            key.remembered(bytes).ok_or(None::<SignError>)
        })
        .ok()
    }

    /// [`Self::sign`] with `sign` making each signature.
    fn sign_with<E: From<SignError>>(
        mut self,
        chain_id: &str,
        timestamp: (i64, i32),
        mut sign: impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Signable, E> {
        match &mut self {
            Signable::Vote(v, _) => {
                v.signature.clear();
                v.extension_signature.clear();
            }
            Signable::Proposal(p) => p.signature.clear(),
        }
        self.set_timestamp(Timestamp {
            seconds: timestamp.0,
            nanos: timestamp.1,
        });
        // A non-nil precommit's extension is signed too, unless skipped.
        let ext = match &self {
            Signable::Vote(v, Extension::Sign)
                if v.r#type == 2 && v.block_id.as_ref().is_some_and(|b| !b.hash.is_empty()) =>
            {
                let ext = CanonicalVoteExtension {
                    extension: v.extension.clone(),
                    height: v.height,
                    round: v.round as i64,
                    chain_id: chain_id.to_string(),
                };
                Some(ext.encode_length_delimited_to_vec())
            }
            _ => None,
        };
        let signature = sign(&self.sign_bytes(chain_id)?)?;
        let ext_signature = ext.map(|ext| sign(&ext)).transpose()?;
        match &mut self {
            Signable::Vote(v, _) => {
                v.signature = signature;
                v.extension_signature = ext_signature.unwrap_or_default();
            }
            Signable::Proposal(p) => p.signature = signature,
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cometbft_proto::v0_38::types::{BlockId, PartSetHeader};

    fn key() -> ConsensusKey {
        ConsensusKey::from_seed([3; 32])
    }

    fn precommit(block: u8, ts: i64) -> Signable {
        Signable::Vote(
            RawVote {
                r#type: 2,
                height: 7,
                round: 1,
                block_id: Some(BlockId {
                    hash: vec![block; 32],
                    part_set_header: Some(PartSetHeader {
                        total: 1,
                        hash: vec![9; 32],
                    }),
                }),
                timestamp: Some(Timestamp {
                    seconds: ts,
                    nanos: 0,
                }),
                validator_address: key().address().to_vec(),
                extension: b"ext".to_vec(),
                ..Default::default()
            },
            Extension::Sign,
        )
    }

    #[test]
    fn digest_ignores_timestamp_and_extension_but_not_the_block() {
        let a = precommit(1, 100).digest("c").unwrap();
        assert_eq!(a, precommit(1, 200).digest("c").unwrap());
        assert_ne!(a, precommit(2, 100).digest("c").unwrap());
        assert_ne!(a, precommit(1, 100).digest("d").unwrap());
        assert_eq!(precommit(1, 1).hrs().unwrap(), (7, 1, STEP_PRECOMMIT));
    }

    #[test]
    fn requests_that_could_not_be_signed_are_refused_before_any_commit() {
        let Signable::Vote(mut v, _) = precommit(1, 100) else {
            panic!()
        };
        v.signature = vec![1, 2, 3];
        assert!(
            Signable::Vote(v.clone(), Extension::Sign)
                .validate("c")
                .is_ok(),
            "signature fields are ours to fill"
        );
        v.timestamp = None;
        assert!(Signable::Vote(v.clone(), Extension::Sign)
            .validate("c")
            .is_err());
        v.timestamp = Some(Timestamp {
            seconds: 1,
            nanos: 2_000_000_000,
        });
        assert!(Signable::Vote(v, Extension::Sign).validate("c").is_err());
        assert!(precommit(1, 100).validate("").is_err(), "empty chain id");
    }

    #[test]
    fn a_forwarded_signature_completes_the_same_message() {
        let k = key();
        let signed = precommit(1, 100).sign(&k, "c", (50, 0)).unwrap();
        let (ts, sig, ext) = signed.signed_parts();
        let Signable::Vote(here, _) = signed else {
            panic!()
        };
        let Signable::Vote(there, _) = precommit(1, 999).complete(ts, sig, ext) else {
            panic!()
        };
        assert_eq!(here, there);
    }

    #[test]
    fn signing_uses_the_committed_timestamp_and_is_deterministic() {
        let k = key();
        let Signable::Vote(a, _) = precommit(1, 100).sign(&k, "c", (50, 0)).unwrap() else {
            panic!()
        };
        let Signable::Vote(b, _) = precommit(1, 999).sign(&k, "c", (50, 0)).unwrap() else {
            panic!()
        };
        assert_eq!(
            a.timestamp,
            Some(Timestamp {
                seconds: 50,
                nanos: 0
            })
        );
        assert_eq!(a.signature, b.signature, "same bytes, same signature");
        assert_eq!(
            a.extension_signature.len(),
            64,
            "non-nil precommits sign their extension"
        );
    }

    #[test]
    fn a_skipped_extension_is_not_signed_and_the_vote_is_the_same() {
        let k = key();
        let Signable::Vote(signed, _) = precommit(1, 100).sign(&k, "c", (50, 0)).unwrap() else {
            panic!()
        };
        let Signable::Vote(mut skip, _) = precommit(1, 100) else {
            panic!()
        };
        skip.extension.clear();
        let Signable::Vote(skipped, _) = Signable::Vote(skip, Extension::Skip)
            .sign(&k, "c", (50, 0))
            .unwrap()
        else {
            panic!()
        };
        assert!(skipped.extension_signature.is_empty());
        assert_eq!(skipped.signature, signed.signature);
    }

    /// Another sentry's request is answered from the key's last signatures
    /// only when every signature it needs was made: the same vote with its
    /// own extension (each node extends its own vote) is not.
    #[test]
    fn a_request_is_remembered_only_when_each_of_its_signatures_was_made() {
        let k = key();
        assert!(precommit(1, 100).remembered(&k, "c", (100, 0)).is_none());
        let signed = precommit(1, 100).sign(&k, "c", (100, 0)).unwrap();
        let again = precommit(1, 200).remembered(&k, "c", (100, 0));
        assert_eq!(
            again.map(|s| s.signed_parts()),
            Some(signed.signed_parts()),
            "the same bytes, at the committed timestamp"
        );
        assert!(precommit(1, 100).remembered(&k, "c", (101, 0)).is_none());
        let Signable::Vote(mut other, _) = precommit(1, 100) else {
            panic!()
        };
        other.extension = b"another node's".to_vec();
        assert!(Signable::Vote(other, Extension::Sign)
            .remembered(&k, "c", (100, 0))
            .is_none());
    }
}
