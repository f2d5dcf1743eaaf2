//! The CometBFT judge: a CometBFT network and node as a remote signer sees
//! them. A short tour:
//!
//! - [`key`]: `priv_validator_key.json`, CometBFT's consensus key file.
//! - [`consensus`]: block ids, the votes and proposals a node asks a signer
//!   to sign, and their canonical sign bytes (computed by the cometbft crate
//!   that tmkms signs with).
//! - [`ledger`]: the chain's books in CometBFT mode: rounds, signed and
//!   missed heights, equivocations.
//! - [`socket`]: the node's end of the privval socket: where it listens,
//!   accepting signers (SecretConnection over TCP, or a Unix socket), the
//!   messages' framing.
//! - [`privval`]: the node's requests to its signer over that socket, one
//!   at a time, and what it saw of them.
//! - [`node`]: `fakenode --cometbft`, a sentry that follows the chain and
//!   asks its signer for every vote.
//!
//! The local network of sentries and signers is [`crate::cometnet`], and
//! tmkms is [`crate::tmkms`]: both start processes, which this judge does not.
//!
//! Like the NEAR judge, none of it knows keyraft.

pub mod consensus;
pub mod key;
pub mod ledger;
pub mod node;
pub mod privval;
pub mod socket;
