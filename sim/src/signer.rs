//! Signer mode as the simulation runs it: keyraft's own
//! `keyraft::signer::Signer` on each process's `Core`, the one sign path
//! of a real node (one request at a time per chain, the sign-ahead
//! decision, a Raft commit of `SignAhead` whose verdict is the ledger's
//! before the signature unless an earlier one reserved its HRS for this
//! process; a follower forwards to the leader, whose end checks
//! that the sender is a voter and holds the same key). Forwards travel
//! over [`crate::net`] (`ports::SimForward`) instead of the peer port.
//! The sentries that ask it are `crate::sentry`.
//!
//! Owns: the simulated chain's id and key, and each process's signing
//! identity. Must not: decide what may be signed; keyraft's signer and
//! ledger do.

use std::sync::Arc;

use keyraft::config::ChainConfig;
use keyraft::signer::{ConsensusKey, Signer};

use crate::net::Net;
use crate::ports::{Port, SimForward, SimSigner};
use crate::types::NodeId;

pub const CHAIN: &str = "sim-chain";

/// The signing-process id of process `id`'s incarnation `inc`: its own,
/// as a real process draws a random one at every start.
fn holder(id: NodeId, inc: u64) -> u64 {
    (id << 32) | (inc & 0xffff_ffff)
}

/// The one consensus key's seed.
pub const SEED: [u8; 32] = [7; 32];

/// Every host's copy of the one consensus key.
pub fn key() -> ConsensusKey {
    ConsensusKey::from_seed(SEED)
}

/// The key as the sentries and the judge know it, made once (making one
/// is a scalar multiplication, and they ask for it at every request).
pub fn known_key() -> &'static ConsensusKey {
    static KEY: std::sync::LazyLock<ConsensusKey> = std::sync::LazyLock::new(key);
    &KEY
}

/// Process `id`'s signer, incarnation `inc`, on its `core`.
pub fn signer<P: Port>(
    core: &Arc<keyraft::node::Core<keyraft::raft::store::StateMachine>>,
    net: &Net<P>,
    id: NodeId,
    inc: u64,
) -> Arc<SimSigner<P>> {
    let chain = ChainConfig {
        chain_id: CHAIN.into(),
        key: keyraft::config::KeySource::File(Default::default()),
        nodes: Vec::new(),
        node_rpc: None,
        protocol: Default::default(),
    };
    let to_leader = SimForward {
        net: net.clone(),
        from: id,
        inc,
    };
    // One signing process per incarnation, as a real start draws anew.
    Signer::new(
        core.clone(),
        Arc::new(to_leader),
        (vec![(chain, key())], Default::default()),
        holder(id, inc),
    )
}
