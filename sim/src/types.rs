//! openraft's type configuration for the simulation: keyraft's own (its
//! commands and replies, the real ledger), on tokio's paused clock, with
//! openraft's randomness drawn from the seed (`DeterministicRng`).
//!
//! Owns: the type aliases the other rooms share. Must not: hold state.

/// keyraft's own type configuration: built with `--cfg keyraft_sim`, it
/// draws openraft's randomness from the seed (see keyraft's
/// `src/raft/mod.rs`).
pub use keyraft::raft::TypeConfig as Types;

pub type NodeId = u64;
pub type Raft = openraft::Raft<Types, keyraft::raft::store::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<Types>;
pub type Vote = openraft::type_config::alias::VoteOf<Types>;
pub type Entry = openraft::type_config::alias::EntryOf<Types>;
pub type Membership = openraft::type_config::alias::StoredMembershipOf<Types>;
pub type Metrics = openraft::RaftMetrics<Types>;
pub type Rt = openraft_rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>;

/// Spawns a task that inherits the seeded RNG context (openraft's runtime
/// panics on a task spawned outside one).
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    <Rt as openraft_rt::AsyncRuntime>::spawn(f)
}
