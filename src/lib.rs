//! keyraft keeps one blockchain validator highly available across two or
//! three hosts without ever letting two of them sign with its key.
//!
//! The coordinators on those hosts form a Raft cluster; only the leader links
//! the validator key into its node and validates, under a lease that a
//! separate guard process enforces. `../shared/DESIGN.md` is the design.
//! A short tour, from the outside in; each module's opening comment says
//! what it owns and what it must not do, and no module imports one that
//! imports it back (`tests/layering.rs` keeps it so):
//!
//! - [`config`]: flags, `KEYRAFT_*` variables and TOML, validated into a
//!   [`config::Config`] (timings must satisfy the safety inequality).
//! - [`server`]: `keyraft run` itself: start-up order (lock and fence
//!   first, then storage, servers, bootstrap), the background tasks, and
//!   teardown. It builds everything below and hands over to the coordinator.
//! - [`node`]: the handles the running parts share ([`node::Shared`]), what
//!   this node says about itself and what peers last said. Plain data; the
//!   parts below depend on it, never on each other's internals.
//! - [`coordinator`]: the state machine (Startup, Syncing, Registering,
//!   Voting, Validating, Shutdown), one handler per state, which decides with
//!   Raft when this host's validator runs with the key.
//! - [`supervisor`]: the validator node as the coordinator drives it: its
//!   process, key links, restart backoff and prober.
//! - [`fence`]: what keeps a key from being used twice even when keyraft
//!   itself fails: the data-dir lock, atomic key links, and the guard process
//!   that kills the validator when its lease runs out (both ends of its
//!   protocol).
//! - [`raft`]: openraft's type configuration and replicated cluster state,
//!   durable sled storage ([`raft::store`]), the gRPC client
//!   ([`raft::network`]) and service ([`raft::server`]).
//! - [`signer`]: signer mode (CometBFT): keyraft dials the nodes' privval
//!   ports and signs only what the Raft leader committed first; followers
//!   forward requests to the leader.
//! - [`gossip`]: peer status exchange, which fills the cluster view.
//! - [`admin`]: admin gRPC, HTTP endpoints, operator commands.
//! - [`health`]: probes of the validator node (near, cometbft, http).
//! - [`preflight`]: `keyraft check --config`, checks before a first start.
//! - [`metrics`]: the Prometheus registry.
//! - [`tls`]: mTLS for the peer port; node N's certificate names
//!   `node-N.keyraft`, and a peer claiming to be N must present it.

pub mod admin;
pub mod config;
pub mod coordinator;
pub mod fence;
pub mod gossip;
pub mod health;
pub mod join;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod preflight;
pub mod raft;
pub mod server;
pub mod shutdown;
pub mod signer;
pub mod supervisor;
pub mod tls;

/// Code generated from `proto/keyraft.proto`.
pub mod pb {
    tonic::include_proto!("keyraft");
}
