//! What travels between the chain, the nodes and the tools as JSON: a
//! NEAR-style signature submission, a CometBFT vote or proposal submission,
//! and the chain's answer to either.
//!
//! Owns: the wire types only, so that the chain and the nodes that talk to
//! it depend on this module and not on each other. Must not: import any
//! other module of this crate.

use serde::{Deserialize, Serialize};

/// `POST /sign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignRequest {
    pub height: u64,
    pub public_key: String,
    pub node: u64,
    pub signature: String,
    /// The software version the node runs (`genesis`, or an upgrade's
    /// name): at an upgrade's height only its version may sign.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignReply {
    pub accepted: bool,
    pub double_sign: bool,
    pub error: Option<String>,
}

impl SignReply {
    pub fn refused(why: &str) -> Self {
        SignReply {
            accepted: false,
            double_sign: false,
            error: Some(why.to_string()),
        }
    }
}

/// `POST /cometbft/vote` and `/cometbft/proposal` bodies: the signed
/// protobuf (CometBFT 0.38's encoding), hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub node: u64,
    pub msg: String,
}
