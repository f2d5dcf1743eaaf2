//! The validator's consensus key: CometBFT's `priv_validator_key.json`
//! read into this process, or a key in a PKCS#11 token
//! ([`super::token`]); its public key and address, its signatures, and the
//! proof a forwarding member gives that it holds the same key.
//!
//! Owns: reading and checking a key file, the forward proofs, remembering
//! the last few signatures. Must not: decide whether to sign; only
//! [`super::Signer`] signs, once a commit covers the step.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use cometbft::{account, PrivateKey, PublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::token::{Module, TokenError, TokenKey};
use crate::config::TokenUri;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path} is not a CometBFT priv_validator_key.json with an ed25519 key: {why}")]
    KeyFormat { path: String, why: String },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    /// The key's token failed: nothing was signed.
    #[error(transparent)]
    Token(#[from] TokenError),
}

#[derive(Deserialize)]
struct KeyFile {
    address: account::Id,
    pub_key: PublicKey,
    priv_key: PrivateKey,
}

/// What holds the private key.
enum Holder {
    /// In this process, from `priv_validator_key.json`.
    Seed(SigningKey),
    /// In a PKCS#11 token; every signature is the token's.
    Token(TokenKey),
}

/// The validator's ed25519 consensus key, in this process or a token.
pub struct ConsensusKey {
    holder: Holder,
    public: VerifyingKey,
    /// HMAC-SHA256 keyed for forward proofs ([`ConsensusKey::forward_proof`]):
    /// by this key's signature of [`PROOF_MESSAGE`], which every holder of
    /// the key makes alike (ed25519 is deterministic) and nobody else can.
    forward: Hmac<Sha256>,
    /// The proof keyed from the seed itself, as keyraft proved a forward
    /// before keys lived in tokens; only a key file has it.
    forward_seed: Option<Hmac<Sha256>>,
    /// The last few signatures made, by the bytes signed: ed25519 is
    /// deterministic, so the same bytes asked again (another sentry's
    /// request for the same vote) get the signature a new signing would
    /// make, without its curve arithmetic on the leader's busy moment.
    made: Mutex<VecDeque<(Vec<u8>, Vec<u8>)>>,
}

/// What the key signs to key its forward proofs and to probe its token:
/// never a sign request's bytes (a length prefix larger than what follows
/// reads as no vote, proposal or extension, and raw bytes that begin with
/// it are refused, `bytes::disguise`).
pub const PROOF_MESSAGE: &[u8] = b"\xffkeyraft forward proof and token probe v2";

/// Signatures [`ConsensusKey::sign`] remembers (a non-nil precommit takes
/// two, its vote and its extension): the last few steps, as many as the
/// leader's memory of what it signed ([`super::ahead::RECENT`]).
const MADE: usize = 16;

impl ConsensusKey {
    /// Reads `priv_validator_key.json`, checking that its public key and
    /// address belong to its private key. (Its mode is checked by config.)
    pub fn load(path: &Path) -> Result<ConsensusKey, SignError> {
        let seed = read_seed(path)?;
        Ok(ConsensusKey::from_seed(seed))
    }

    /// The key `uri` names on its token, opened through `module`
    /// (blocking): its public key read from the token, and one signature
    /// made to prove that the token's private key is its pair.
    pub fn open_token(
        uri: &TokenUri,
        module: std::sync::Arc<Module>,
    ) -> Result<ConsensusKey, SignError> {
        let token = TokenKey::open(uri, module)?;
        let public = VerifyingKey::from_bytes(&token.public()).map_err(|e| {
            SignError::Token(TokenError::Failed {
                token: uri.token.clone(),
                op: "read the public key",
                why: e.to_string(),
            })
        })?;
        let proof = token.sign(PROOF_MESSAGE)?;
        if !proves(&public, &proof) {
            return Err(SignError::Token(TokenError::Mismatch {
                token: uri.token.clone(),
                key: uri.to_string(),
            }));
        }
        Ok(ConsensusKey::new(
            Holder::Token(token),
            public,
            &proof,
            None,
        ))
    }

    /// The key of a 32-byte ed25519 seed ([`ConsensusKey::load`] reads it
    /// from the key file; the simulator gives its own).
    pub fn from_seed(seed: [u8; 32]) -> ConsensusKey {
        let signing = SigningKey::from_bytes(&seed);
        let public = signing.verifying_key();
        let proof = signing.sign(PROOF_MESSAGE).to_bytes();
        // Never the private key itself: a key derived from it for this use.
        let derived = Sha256::new()
            .chain_update(b"keyraft forward proof v1\0")
            .chain_update(seed)
            .finalize();
        ConsensusKey::new(Holder::Seed(signing), public, &proof, Some(&derived))
    }

    fn new(
        holder: Holder,
        public: VerifyingKey,
        proof: &[u8],
        seed_key: Option<&[u8]>,
    ) -> ConsensusKey {
        let derived = Sha256::new()
            .chain_update(b"keyraft forward proof v2\0")
            .chain_update(proof)
            .finalize();
        ConsensusKey {
            holder,
            public,
            forward: mac_keyed(&derived),
            forward_seed: seed_key.map(mac_keyed),
            made: Mutex::new(VecDeque::with_capacity(MADE)),
        }
    }

    pub fn public(&self) -> VerifyingKey {
        self.public
    }

    /// Whether the key is in a token: its signatures block on the token
    /// (the signer makes them off the async workers).
    pub fn in_token(&self) -> bool {
        matches!(self.holder, Holder::Token(_))
    }

    /// CometBFT's validator address: the first 20 bytes of SHA-256(pubkey).
    pub fn address(&self) -> [u8; 20] {
        let mut a = [0u8; 20];
        a.copy_from_slice(&Sha256::digest(self.public().as_bytes())[..20]);
        a
    }

    pub fn address_hex(&self) -> String {
        hex::encode_upper(self.address())
    }

    /// What a member forwarding `msg` (an encoded privval request) for
    /// `chain_id` to the leader sends with it, to prove that it holds this
    /// key: HMAC-SHA256s of the sender's node id, the chain id and the
    /// request, under a key only a holder of the private key can make
    /// (`key_proof`), and for a key file also under one derived from its
    /// seed (`seed_proof`, what a leader of an earlier release checks). A
    /// member given another chain's key, or none, cannot make them; the
    /// leader, which holds the key, checks one
    /// ([`ConsensusKey::proves_forward`]). Bound to the sender (the leader
    /// compares the id its certificate proved) and to the request, so one
    /// proof serves no other.
    pub fn forward_proof(&self, sender: u64, chain_id: &str, msg: &[u8]) -> ForwardProof {
        let proof = |mac: &Hmac<Sha256>| {
            with_request(mac.clone(), sender, chain_id, msg)
                .finalize()
                .into_bytes()
                .to_vec()
        };
        ForwardProof {
            key_proof: proof(&self.forward),
            seed_proof: self.forward_seed.as_ref().map(proof).unwrap_or_default(),
        }
    }

    /// Whether `proof` is [`ConsensusKey::forward_proof`] of this key for
    /// the same sender, chain and request (compared in constant time): its
    /// `key_proof` where it has one, else its `seed_proof`, which only a
    /// key file can check.
    pub fn proves_forward(
        &self,
        sender: u64,
        chain_id: &str,
        msg: &[u8],
        proof: &ForwardProof,
    ) -> bool {
        let (mac, tag) = match (proof.key_proof.is_empty(), &self.forward_seed) {
            (false, _) => (&self.forward, &proof.key_proof),
            (true, Some(seed)) => (seed, &proof.seed_proof),
            (true, None) => return false,
        };
        with_request(mac.clone(), sender, chain_id, msg)
            .verify_slice(tag)
            .is_ok()
    }

    /// Signs `bytes`. Only after the watermark allowed it. A token's
    /// failure is an error, never a part of a signature.
    pub fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, SignError> {
        if let Some(signature) = self.remembered(bytes) {
            return Ok(signature);
        }
        let signature = match &self.holder {
            Holder::Seed(key) => key.sign(bytes).to_vec(),
            Holder::Token(token) => token.sign(bytes)?,
        };
        let mut made = self.made();
        if made.len() == MADE {
            made.pop_front();
        }
        made.push_back((bytes.to_vec(), signature.clone()));
        Ok(signature)
    }

    /// The signature of `bytes` if it is among the last [`MADE`] made,
    /// with no trip to the token.
    pub fn remembered(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        self.made()
            .iter()
            .find(|(b, _)| b == bytes)
            .map(|(_, s)| s.clone())
    }

    /// Whether the token answers with this key now: it signs
    /// [`PROOF_MESSAGE`] as the key does (a file key always does).
    /// Blocking.
    pub fn probe(&self) -> Result<(), SignError> {
        let Holder::Token(token) = &self.holder else {
            return Ok(());
        };
        let signature = token
            .sign_or_reinitialize(PROOF_MESSAGE)
            .map_err(probe_failure)?;
        match proves(&self.public, &signature) {
            true => Ok(()),
            false => Err(SignError::Token(TokenError::Mismatch {
                token: token.uri().token.clone(),
                key: token.uri().to_string(),
            })),
        }
    }

    fn made(&self) -> std::sync::MutexGuard<'_, VecDeque<(Vec<u8>, Vec<u8>)>> {
        self.made.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A probe's error as the token's failure: a token that refuses to sign
/// [`PROOF_MESSAGE`] (40 bytes, never too long) refuses everything, and
/// must not keep its host leading while every request is refused.
fn probe_failure(e: TokenError) -> TokenError {
    match e {
        TokenError::Refused { token, why } => TokenError::Failed {
            token,
            op: "probe",
            why,
        },
        e => e,
    }
}

/// Whether `signature` is `public`'s of [`PROOF_MESSAGE`].
fn proves(public: &VerifyingKey, signature: &[u8]) -> bool {
    ed25519_dalek::Signature::from_slice(signature)
        .is_ok_and(|s| public.verify_strict(PROOF_MESSAGE, &s).is_ok())
}

/// A forwarding member's proofs that it holds the key
/// ([`ConsensusKey::forward_proof`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardProof {
    pub key_proof: Vec<u8>,
    pub seed_proof: Vec<u8>,
}

/// An HMAC-SHA256 keyed with `key` (32 bytes).
fn mac_keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC pads a short key to SHA-256's 64-byte block: done here, so
    // that no error path is left to handle.
    let mut block = [0u8; 64];
    block[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

fn with_request(mut mac: Hmac<Sha256>, sender: u64, chain_id: &str, msg: &[u8]) -> Hmac<Sha256> {
    mac.update(&sender.to_be_bytes());
    mac.update(&(chain_id.len() as u64).to_be_bytes());
    mac.update(chain_id.as_bytes());
    mac.update(msg);
    mac
}

/// The seed of a CometBFT `priv_validator_key.json`, checked against its
/// public key and address.
pub fn read_seed(path: &Path) -> Result<[u8; 32], SignError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SignError::Read {
        path: p.clone(),
        why: e.to_string(),
    })?;
    let bad = |why: String| SignError::KeyFormat {
        path: p.clone(),
        why,
    };
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let seed: [u8; 32] = file
        .priv_key
        .ed25519_signing_key()
        .ok_or_else(|| bad("priv_key is not ed25519".into()))?
        .as_bytes()
        .try_into()
        .map_err(|_| bad("priv_key is not a 32-byte seed".into()))?;
    let public = SigningKey::from_bytes(&seed).verifying_key();
    if PublicKey::from_ed25519_dalek(public) != file.pub_key {
        return Err(bad("pub_key does not match priv_key".into()));
    }
    if file.address.as_bytes() != &Sha256::digest(public.as_bytes())[..20] {
        return Err(bad("address does not match pub_key".into()));
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    /// Review finding: a token that refused every signature (the bytes'
    /// fault, not the token's, by its error code) was never taken as
    /// failing, so its host led on and refused every request.
    #[test]
    fn a_token_refusing_the_probe_counts_as_failing() {
        let refused = TokenError::Refused {
            token: "t".into(),
            why: "CKR_ARGUMENTS_BAD".into(),
        };
        assert!(matches!(
            probe_failure(refused),
            TokenError::Failed { op: "probe", .. }
        ));
        let pin = TokenError::Pin {
            token: "t".into(),
            why: "refused".into(),
        };
        assert!(matches!(probe_failure(pin), TokenError::Pin { .. }));
    }

    use super::*;

    fn key() -> ConsensusKey {
        ConsensusKey::from_seed([3; 32])
    }

    #[test]
    fn only_the_key_proves_a_forward_for_its_sender_chain_and_request() {
        let k = key();
        let proof = k.forward_proof(2, "a-1", b"request");
        assert!(k.proves_forward(2, "a-1", b"request", &proof));
        // Either proof alone will do: a token's (no seed) or an earlier
        // release's (the seed's only).
        let key_only = ForwardProof {
            seed_proof: Vec::new(),
            ..proof.clone()
        };
        let seed_only = ForwardProof {
            key_proof: Vec::new(),
            ..proof.clone()
        };
        assert!(k.proves_forward(2, "a-1", b"request", &key_only));
        assert!(k.proves_forward(2, "a-1", b"request", &seed_only));
        let stranger = ConsensusKey::from_seed([4; 32]);
        let cut = ForwardProof {
            key_proof: proof.key_proof[..31].to_vec(),
            ..proof.clone()
        };
        // A wrong key proof is not saved by a right seed proof.
        let wrong_key_proof = ForwardProof {
            key_proof: stranger.forward_proof(2, "a-1", b"request").key_proof,
            ..proof.clone()
        };
        // (key checking, sender, chain, request, proof) -> not proved
        type Row<'a> = (&'a ConsensusKey, u64, &'a str, &'a [u8], &'a ForwardProof);
        let none = ForwardProof::default();
        let table: [Row; 7] = [
            (&stranger, 2, "a-1", b"request", &proof),
            (&k, 3, "a-1", b"request", &proof),
            (&k, 2, "a-2", b"request", &proof),
            (&k, 2, "a-1", b"another", &proof),
            (&k, 2, "a-1", b"request", &none),
            (&k, 2, "a-1", b"request", &cut),
            (&k, 2, "a-1", b"request", &wrong_key_proof),
        ];
        for (checker, sender, chain, msg, p) in table {
            assert!(
                !checker.proves_forward(sender, chain, msg, p),
                "{sender} {chain}"
            );
        }
        // The chain id's length is bound in: ("a", "b...") is not ("ab", "...").
        assert_ne!(
            k.forward_proof(2, "a", b"bc"),
            k.forward_proof(2, "ab", b"c")
        );
    }

    #[test]
    fn a_remembered_signature_is_the_one_the_key_makes_and_only_for_its_bytes() {
        let k = key();
        let fresh = |bytes: &[u8]| {
            let seed = SigningKey::from_bytes(&[3; 32]);
            ed25519_dalek::Signer::sign(&seed, bytes)
                .to_bytes()
                .to_vec()
        };
        let first = k.sign(b"vote at 5").unwrap();
        assert_eq!(first, fresh(b"vote at 5"));
        // Asked again: the remembered one, identical to a new signature.
        assert_eq!(k.sign(b"vote at 5").unwrap(), first);
        // Other bytes, even a prefix or one byte apart, are signed anew.
        for other in [&b"vote at 6"[..], b"vote at ", b"vote at 55"] {
            let sig = k.sign(other).unwrap();
            assert_eq!(sig, fresh(other));
            assert_ne!(sig, first);
            let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
            assert!(ed25519_dalek::Verifier::verify(&k.public(), other, &sig).is_ok());
        }
        // More signatures than it keeps: the oldest is forgotten, and still
        // signed right when asked again.
        for h in 0..20u8 {
            k.sign(&[h]).unwrap();
        }
        assert_eq!(k.made.lock().unwrap().len(), MADE);
        assert_eq!(k.sign(b"vote at 5").unwrap(), first);
    }
}
