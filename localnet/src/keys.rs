//! NEAR-format key files (`validator_key.json`, `node_key.json`) and the one
//! message a fake validator signs.
//!
//! Owns: parsing and writing `{"account_id", "public_key", "secret_key"}` with
//! `ed25519:<base58>` strings, exactly as neard lays them out (the secret is
//! the 32-byte seed followed by the 32-byte public key). Must not: know
//! anything about keyraft, or hold a key in memory longer than its caller does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ed25519:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not NEAR key JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("bad key {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

/// The JSON layout neard uses for `validator_key.json` and `node_key.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub account_id: String,
    pub public_key: String,
    pub secret_key: String,
}

impl KeyFile {
    /// A fresh key for `account_id`.
    pub fn generate(account_id: &str) -> Self {
        let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        Self {
            account_id: account_id.to_string(),
            public_key: encode_public(&signing.verifying_key()),
            secret_key: format!(
                "{PREFIX}{}",
                bs58::encode(signing.to_keypair_bytes()).into_string()
            ),
        }
    }

    /// Reads and checks a key file (symlinks are followed).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|source| KeyError::Json {
            path: path.display().to_string(),
            source,
        })?;
        file.signing_key()?;
        Ok(file)
    }

    /// Writes the key with mode 0600; refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        json.push(b'\n');
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)
    }

    /// The secret key, checked against the stated public key.
    pub fn signing_key(&self) -> Result<SigningKey, KeyError> {
        let bytes = decode(&self.secret_key, "secret_key")?;
        // neard stores seed || public key and refuses anything else.
        let n = bytes.len();
        let pair: [u8; 64] = bytes.try_into().map_err(|_| {
            malformed(
                "secret_key",
                &format!("{n} bytes, want 64 (seed and public key)"),
            )
        })?;
        let signing = SigningKey::from_keypair_bytes(&pair)
            .map_err(|e| malformed("secret_key", &e.to_string()))?;
        if signing.verifying_key() != parse_public(&self.public_key)? {
            return Err(malformed("secret_key", "does not match public_key"));
        }
        Ok(signing)
    }
}

/// `ed25519:<base58>` of a public key.
pub fn encode_public(key: &VerifyingKey) -> String {
    format!("{PREFIX}{}", bs58::encode(key.as_bytes()).into_string())
}

/// Parses `ed25519:<base58>` into a public key.
pub fn parse_public(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes: [u8; 32] = decode(text, "public_key")?
        .try_into()
        .map_err(|_| malformed("public_key", "want 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| malformed("public_key", &e.to_string()))
}

/// What a validator signs to claim a height: `fakechain/height/<h>`.
pub fn height_message(height: u64) -> Vec<u8> {
    format!("fakechain/height/{height}").into_bytes()
}

/// Signs a height, returning the base58 signature.
pub fn sign_height(key: &SigningKey, height: u64) -> String {
    bs58::encode(key.sign(&height_message(height)).to_bytes()).into_string()
}

/// Checks a base58 signature of `height` by `key`.
pub fn verify_height(key: &VerifyingKey, height: u64, signature: &str) -> bool {
    let Ok(bytes) = bs58::decode(signature).into_vec() else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify(&height_message(height), &sig).is_ok()
}

fn decode(text: &str, what: &'static str) -> Result<Vec<u8>, KeyError> {
    let body = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| malformed(what, "missing ed25519: prefix"))?;
    bs58::decode(body)
        .into_vec()
        .map_err(|e| malformed(what, &e.to_string()))
}

fn malformed(what: &'static str, why: &str) -> KeyError {
    KeyError::Malformed {
        what,
        why: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_signs() {
        let file = KeyFile::generate("val.test");
        let signing = file.signing_key().unwrap();
        let public = parse_public(&file.public_key).unwrap();
        let sig = sign_height(&signing, 42);
        assert!(verify_height(&public, 42, &sig));
        assert!(!verify_height(&public, 43, &sig));
    }

    #[test]
    fn reads_nearcores_published_test_vector() {
        let file: KeyFile = serde_json::from_str(
            r#"{"account_id": "example",
                "public_key": "ed25519:6DSjZ8mvsRZDvFqFxo8tCKePG96omXW7eVYVSySmDk8e",
                "secret_key": "ed25519:3D4YudUahN1nawWogh8pAKSj92sUNMdbZGjn7kERKzYoTy8tnFQuwoGUC51DowKqorvkr2pytJSnwuSbsNVfqygr"}"#,
        )
        .unwrap();
        let signing = file.signing_key().unwrap();
        assert_eq!(encode_public(&signing.verifying_key()), file.public_key);
    }

    #[test]
    fn mismatched_public_key_is_refused() {
        let mut a = KeyFile::generate("a");
        a.public_key = KeyFile::generate("b").public_key;
        assert!(a.signing_key().is_err());
    }
}
