//! What `DATA_DIR/raft` holds: the names of the store's files and of the
//! values they keep.
//!
//! Owns: those names. Must not: read or write anything.

/// The Raft log ([`super::logfile`]).
pub(super) const LOG: &str = "log";
/// The vote, the purge point and the committed log id ([`super::store`]).
pub(super) const META: &str = "meta";
/// The applied state and the snapshot ([`super::machine`]).
pub(super) const STATE: &str = "state";
/// What this node remembers of each member ([`super::memory`]).
pub(super) const MEMORY: &str = "memory";

/// In [`META`]: the vote.
pub(super) const VOTE: &[u8] = b"vote";
/// In [`META`]: the last purged log id.
pub(super) const LAST_PURGED: &[u8] = b"last_purged";
/// In [`META`]: the committed log id.
pub(super) const COMMITTED: &[u8] = b"committed";
/// In [`STATE`]: the applied state.
pub(super) const SM_DATA: &[u8] = b"data";
/// In [`STATE`]: the last snapshot.
pub(super) const SM_SNAPSHOT: &[u8] = b"snapshot";
