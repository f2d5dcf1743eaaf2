//! keyraft keeps one blockchain validator highly available across two or
//! three hosts without ever letting two of them sign with its key.
//!
//! The coordinators on those hosts form a Raft cluster; only the leader links
//! the validator key into its node and validates, under a lease that a
//! separate guard process enforces. `../shared/DESIGN.md` is the design.
//! A short tour, in the order a request meets the parts:
//!
//! - [`config`]: flags, `KEYRAFT_*` variables and TOML, validated into a
//!   [`config::Config`] (timings must satisfy the safety inequality).
//! - [`tls`]: mTLS for the peer port; node N's certificate names
//!   `node-N.keyraft`, and a peer claiming to be N must present it.
//! - [`raft`]: openraft's type configuration and replicated cluster state,
//!   durable sled storage ([`raft::store`]), the gRPC client
//!   ([`raft::network`]) and service ([`raft::server`]).
//! - [`coordinator`]: the state machine (Startup, Syncing, Registering,
//!   Voting, Validating, Shutdown) that activates and fences the validator,
//!   and [`coordinator::run`], which wires everything together.
//! - [`fence`]: the data-dir lock, atomic key links and the guard process
//!   that kills the validator when its lease runs out.
//! - [`supervisor`]: the coordinator's handle on the guard and validator.
//! - [`health`]: probes of the validator node (near, cometbft, http).
//! - [`gossip`]: peer status exchange, the cluster view.
//! - [`admin`]: admin gRPC, HTTP endpoints, operator commands.
//! - [`metrics`]: the Prometheus registry.

pub mod admin;
pub mod config;
pub mod coordinator;
pub mod fence;
pub mod gossip;
pub mod health;
pub mod metrics;
pub mod raft;
pub mod supervisor;
pub mod tls;

/// Code generated from `proto/keyraft.proto`.
pub mod pb {
    tonic::include_proto!("keyraft");
}
