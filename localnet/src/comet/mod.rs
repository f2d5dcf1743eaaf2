//! The CometBFT judge: a CometBFT network and node as a remote signer sees
//! them. A short tour:
//!
//! - [`key`]: `priv_validator_key.json`, CometBFT's consensus key file.
//! - [`consensus`]: block ids, the votes and proposals a node asks a signer
//!   to sign, and their canonical sign bytes (computed by the cometbft crate
//!   that tmkms signs with).
//! - [`ledger`]: the chain's books in CometBFT mode: rounds, signed and
//!   missed heights, equivocations.
//! - [`privval`]: the node's end of the privval protocol (SecretConnection
//!   over TCP, or a Unix socket).
//! - [`node`]: `fakenode --cometbft`, a sentry that follows the chain and
//!   asks its signer for every vote.
//! - [`tmkms`]: tmkms, the real signer the judge is proven against.
//! - [`net`]: chain, sentries and signers on loopback, for tests and
//!   benchmarks.
//!
//! Like the NEAR judge, none of it knows keyraft.

pub mod consensus;
pub mod key;
pub mod ledger;
pub mod net;
pub mod node;
pub mod privval;
pub mod tmkms;
