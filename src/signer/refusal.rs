//! Why a sign request was not signed, typed from end to end: from the
//! ledger's verdict, through the forward between members (as the proto
//! enum `keyraft.Refusal`), to the metrics label and CometBFT's
//! `RemoteSignerError`.
//!
//! Owns: the one list of refusals and their translations. Must not: decide
//! anything; [`super::Signer`] and [`crate::ledger`] do.

use std::time::Duration;

use cometbft_proto::v0_38::privval::RemoteSignerError;

use super::key::SignError;
use super::SIGN_PATIENCE;
use crate::ledger::SignVerdict;
use crate::pb;

/// A (height, round, step) in CometBFT's numbering.
pub type Hrs = (u64, u32, u8);

/// Why a request was not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("height/round/step {asked:?} is below the signed watermark")]
    Regression { asked: Hrs },
    #[error("equivocation refused: {asked:?} was signed with other sign bytes")]
    Equivocation { asked: Hrs },
    #[error("this connection serves chain {ours}, not {asked}")]
    WrongChain { ours: String, asked: String },
    #[error("the signer leader signs for no chain {asked}")]
    UnknownChain { asked: String },
    #[error("{0}")]
    OtherKey(String),
    #[error("{0}")]
    Malformed(String),
    /// Raw bytes (CometBFT 1.x's `SignBytesRequest`) not signed: not
    /// allowed for the chain or the connection, or a consensus message.
    #[error("{0}")]
    BytesRefused(String),
    /// The key's token failed to sign: nothing was signed, and the host
    /// stands aside while it fails.
    #[error("the signing key failed: {0}")]
    KeyFailed(String),
    #[error("no signing watermark yet: run `keyraft signer import-state priv_validator_state.json` (or `--never-signed` for a key that never signed)")]
    NoWatermark,
    #[error("no live signer leader within {0:?}")]
    NoLeader(Duration),
    /// Retryable: lost leadership, or Raft could not commit in time.
    #[error("not committed: {0}")]
    NotCommitted(String),
}

impl Refusal {
    /// The ledger's verdict for `asked` as a refusal (`None` for `Sign`).
    pub fn from_verdict(v: &SignVerdict, asked: Hrs, chain_id: &str) -> Option<Refusal> {
        Some(match v {
            SignVerdict::Sign { .. } => return None,
            // Reserved by an earlier leader's signing process: as good as
            // below the watermark for anyone else.
            SignVerdict::Regression | SignVerdict::Reserved => Refusal::Regression { asked },
            SignVerdict::Conflict => Refusal::Equivocation { asked },
            SignVerdict::WrongChain => Refusal::WrongChain {
                ours: chain_id.to_string(),
                asked: "another".into(),
            },
            SignVerdict::NoWatermark => Refusal::NoWatermark,
        })
    }

    /// Whether trying again (after an election, say) may succeed. A key
    /// that failed on the leader: its host stands aside, and another
    /// leader signs the same committed bytes alike (ed25519 is
    /// deterministic).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Refusal::NoLeader(_) | Refusal::NotCommitted(_) | Refusal::KeyFailed(_)
        )
    }

    /// The `result` label of `keyraft_sign_requests_total`.
    pub fn result_label(&self) -> &'static str {
        match self {
            Refusal::Regression { .. } => "refused_regression",
            Refusal::Equivocation { .. } => "refused_equivocation",
            Refusal::WrongChain { .. } | Refusal::UnknownChain { .. } => "refused_chain_id",
            Refusal::OtherKey(_) => "refused_other_key",
            Refusal::Malformed(_) => "refused_malformed",
            Refusal::BytesRefused(_) => "refused_bytes",
            Refusal::KeyFailed(_) => "key_failed",
            Refusal::NoWatermark => "refused_no_watermark",
            Refusal::NoLeader(_) => "no_leader",
            Refusal::NotCommitted(_) => "not_committed",
        }
    }

    /// As the leader sends it back to the forwarding member.
    pub fn to_proto(&self) -> pb::Refusal {
        match self {
            Refusal::Regression { .. } => pb::Refusal::Regression,
            Refusal::Equivocation { .. } => pb::Refusal::Equivocation,
            Refusal::WrongChain { .. } => pb::Refusal::WrongChain,
            Refusal::UnknownChain { .. } => pb::Refusal::UnknownChain,
            Refusal::OtherKey(_) => pb::Refusal::OtherKey,
            Refusal::Malformed(_) => pb::Refusal::Malformed,
            Refusal::BytesRefused(_) => pb::Refusal::BytesRefused,
            Refusal::KeyFailed(_) => pb::Refusal::KeyFailed,
            Refusal::NoWatermark => pb::Refusal::NoWatermark,
            Refusal::NoLeader(_) => pb::Refusal::NoLeader,
            Refusal::NotCommitted(_) => pb::Refusal::NotCommitted,
        }
    }

    /// The forwarding member's view of the leader's refusal of its request
    /// for `asked` (`None` for a signature). An unknown code is taken as
    /// retryable: a newer leader's reason this member cannot name.
    pub fn from_proto(code: i32, detail: &str, asked: Hrs, chain_id: &str) -> Option<Refusal> {
        let Ok(code) = pb::Refusal::try_from(code) else {
            return Some(Refusal::NotCommitted(format!(
                "the leader refused with an unknown reason {code}: {detail}"
            )));
        };
        Some(match code {
            pb::Refusal::None => return None,
            pb::Refusal::Regression => Refusal::Regression { asked },
            pb::Refusal::Equivocation => Refusal::Equivocation { asked },
            pb::Refusal::WrongChain => Refusal::WrongChain {
                ours: "the leader's".to_string(),
                asked: chain_id.to_string(),
            },
            pb::Refusal::UnknownChain => Refusal::UnknownChain {
                asked: chain_id.to_string(),
            },
            pb::Refusal::OtherKey => Refusal::OtherKey(detail.to_string()),
            pb::Refusal::Malformed => Refusal::Malformed(detail.to_string()),
            pb::Refusal::BytesRefused => Refusal::BytesRefused(detail.to_string()),
            pb::Refusal::KeyFailed => Refusal::KeyFailed(detail.to_string()),
            pb::Refusal::NoWatermark => Refusal::NoWatermark,
            pb::Refusal::NoLeader => Refusal::NoLeader(SIGN_PATIENCE),
            pb::Refusal::NotCommitted => Refusal::NotCommitted(detail.to_string()),
        })
    }

    /// CometBFT's `RemoteSignerError`. A node does not retry these; the
    /// code says why (tmkms uses 2 for a refused double sign).
    pub fn remote_error(&self) -> RemoteSignerError {
        let code = match self {
            Refusal::Regression { .. } | Refusal::Equivocation { .. } => 2,
            Refusal::NoLeader(_) | Refusal::NotCommitted(_) | Refusal::KeyFailed(_) => 1,
            Refusal::WrongChain { .. }
            | Refusal::UnknownChain { .. }
            | Refusal::OtherKey(_)
            | Refusal::Malformed(_)
            | Refusal::BytesRefused(_)
            | Refusal::NoWatermark => 0,
        };
        RemoteSignerError {
            code,
            description: format!("keyraft: {self}"),
        }
    }
}

impl From<SignError> for Refusal {
    fn from(e: SignError) -> Self {
        match e {
            // The token would not sign these bytes: asking again, here or
            // at another leader with the same token model, cannot help.
            e @ SignError::Token(super::token::TokenError::Refused { .. }) => {
                Refusal::Malformed(e.to_string())
            }
            SignError::Token(e) => Refusal::KeyFailed(e.to_string()),
            e => Refusal::Malformed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_survives_the_forward() {
        let asked = (7, 1, 2);
        let all = [
            Refusal::Regression { asked },
            Refusal::Equivocation { asked },
            Refusal::WrongChain {
                ours: "the leader's".into(),
                asked: "theirs".into(),
            },
            Refusal::UnknownChain {
                asked: "theirs".into(),
            },
            Refusal::OtherKey("node 2's key for chain theirs is not the leader's".into()),
            Refusal::Malformed("no timestamp".into()),
            Refusal::BytesRefused("sign-bytes is off".into()),
            Refusal::KeyFailed("token 'kr': sign: CKR_DEVICE_REMOVED".into()),
            Refusal::NoWatermark,
            Refusal::NoLeader(SIGN_PATIENCE),
            Refusal::NotCommitted("leadership moved".into()),
        ];
        for r in all {
            let detail = match &r {
                Refusal::Malformed(d)
                | Refusal::NotCommitted(d)
                | Refusal::OtherKey(d)
                | Refusal::BytesRefused(d)
                | Refusal::KeyFailed(d) => d.clone(),
                _ => r.to_string(),
            };
            let back = Refusal::from_proto(r.to_proto() as i32, &detail, asked, "theirs");
            assert_eq!(back.as_ref(), Some(&r), "{r}");
            assert_eq!(back.map(|b| b.result_label()), Some(r.result_label()));
        }
        assert_eq!(Refusal::from_proto(0, "", asked, "c"), None);
        let unknown = Refusal::from_proto(99, "new", asked, "c").unwrap();
        assert!(unknown.retryable(), "{unknown}");
    }

    #[test]
    fn verdicts_become_refusals_and_codes() {
        let asked = (5, 0, 3);
        let sign = SignVerdict::Sign { timestamp: (1, 0) };
        assert_eq!(Refusal::from_verdict(&sign, asked, "c"), None);
        let conflict = Refusal::from_verdict(&SignVerdict::Conflict, asked, "c").unwrap();
        assert_eq!(conflict, Refusal::Equivocation { asked });
        assert_eq!(conflict.remote_error().code, 2);
        let regression = Refusal::from_verdict(&SignVerdict::Regression, asked, "c").unwrap();
        assert_eq!(regression.remote_error().code, 2);
        let none = Refusal::from_verdict(&SignVerdict::NoWatermark, asked, "c").unwrap();
        assert_eq!(none.remote_error().code, 0);
        assert!(none
            .remote_error()
            .description
            .contains("no signing watermark"));
        assert_eq!(Refusal::NotCommitted("x".into()).remote_error().code, 1);
    }
}
