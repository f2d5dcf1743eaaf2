//! CometBFT's `priv_validator_key.json`: the consensus key a remote signer
//! holds and the judge checks signatures against.
//!
//! Owns: reading and writing the file in CometBFT's layout (`address`,
//! `pub_key` and `priv_key` as amino-JSON `{"type", "value"}` objects), with
//! the (de)serialisation of the cometbft crate tmkms uses. Must not: accept a
//! key type other than ed25519, a file whose address or public key does not
//! match its private key, or overwrite an existing file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use cometbft::{account, PrivateKey, PublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a CometBFT priv_validator_key.json with an ed25519 key (tendermint/PrivKeyEd25519): {why}")]
    Format { path: String, why: String },
}

/// The file as CometBFT writes it.
#[derive(Serialize, Deserialize)]
struct PrivValidatorKeyFile {
    address: account::Id,
    pub_key: PublicKey,
    priv_key: PrivateKey,
}

/// A validator's consensus key.
#[derive(Clone)]
pub struct ValidatorKey {
    signing: SigningKey,
}

/// Its address only: a secret key is never printed.
impl std::fmt::Debug for ValidatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ValidatorKey({})", self.public().address_hex())
    }
}

/// The public half, as the chain needs it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicValidatorKey {
    pub key: VerifyingKey,
    pub address: [u8; 20],
}

impl PublicValidatorKey {
    pub fn new(key: VerifyingKey) -> Self {
        let id = account::Id::from(PublicKey::from_ed25519_dalek(key));
        let mut address = [0u8; 20];
        address.copy_from_slice(id.as_bytes());
        Self { key, address }
    }

    /// The address as CometBFT prints it (upper-case hex).
    pub fn address_hex(&self) -> String {
        hex::encode_upper(self.address)
    }
}

impl ValidatorKey {
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
        }
    }

    pub fn from_signing(signing: SigningKey) -> Self {
        Self { signing }
    }

    pub fn signing(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> PublicValidatorKey {
        PublicValidatorKey::new(self.signing.verifying_key())
    }

    /// Reads and checks a `priv_validator_key.json`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let file = read(path)?;
        let bad = |why: &str| KeyError::Format {
            path: path.display().to_string(),
            why: why.to_string(),
        };
        let seed: [u8; 32] = file
            .priv_key
            .ed25519_signing_key()
            .ok_or_else(|| bad("priv_key is not ed25519"))?
            .as_bytes()
            .try_into()
            .map_err(|_| bad("priv_key is not a 32-byte ed25519 seed"))?;
        let key = Self::from_signing(SigningKey::from_bytes(&seed));
        let public = key.public();
        if PublicKey::from_ed25519_dalek(public.key) != file.pub_key {
            return Err(bad("pub_key does not match priv_key"));
        }
        if file.address.as_bytes() != public.address {
            return Err(bad("address does not match pub_key"));
        }
        Ok(key)
    }

    /// Writes the key in CometBFT's layout, mode 0600; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let public = self.public();
        let file = PrivValidatorKeyFile {
            address: account::Id::new(public.address),
            pub_key: PublicKey::from_ed25519_dalek(public.key),
            priv_key: PrivateKey::from_ed25519_dalek(self.signing.clone()),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|e| err(e.into()))?;
        json.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)
    }
}

/// Reads only the public half of a `priv_validator_key.json` (what a chain
/// knows of a validator), still checking that the file is self-consistent.
pub fn load_public(path: &Path) -> Result<PublicValidatorKey, KeyError> {
    ValidatorKey::load(path).map(|k| k.public())
}

fn read(path: &Path) -> Result<PrivValidatorKeyFile, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| KeyError::Format {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_cometbfts_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("priv_validator_key.json");
        let key = ValidatorKey::generate();
        key.write_new(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["pub_key"]["type"], "tendermint/PubKeyEd25519");
        assert_eq!(v["priv_key"]["type"], "tendermint/PrivKeyEd25519");
        assert_eq!(v["address"], key.public().address_hex());
        let back = ValidatorKey::load(&path).unwrap();
        assert_eq!(back.public().key, key.public().key);
        assert!(key.write_new(&path).is_err(), "never overwrites");
    }

    #[test]
    fn refuses_mismatched_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        ValidatorKey::generate().write_new(&path).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let other = dir.path().join("other.json");
        ValidatorKey::generate().write_new(&other).unwrap();
        let o: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&other).unwrap()).unwrap();
        v["pub_key"] = o["pub_key"].clone();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, v.to_string()).unwrap();
        let e = ValidatorKey::load(&bad).err().unwrap().to_string();
        assert!(e.contains("does not match"), "{e}");
        v["priv_key"]["type"] = "tendermint/PrivKeySecp256k1".into();
        std::fs::write(&bad, v.to_string()).unwrap();
        let e = ValidatorKey::load(&bad).err().unwrap().to_string();
        assert!(e.contains("ed25519"), "{e}");
    }
}
