//! keyraft keeps one blockchain validator highly available across two or
//! three hosts without ever letting two of them sign with its key.
//!
//! The coordinators on those hosts form a Raft cluster; only the leader links
//! the validator key into its node and validates, under a lease that a
//! separate guard process enforces. `docs/design.md` is the design (the
//! safety protocol's numbered steps that comments here cite), and
//! `docs/architecture.md` the workspace, how the parts meet, the layering
//! rule and the coding rules.
//! A short tour, from the outside in; each module's opening comment says
//! what it owns and what it must not do, and no module imports one that
//! imports it back (`tests/layering.rs` keeps it so):
//!
//! - [`cli`]: the `keyraft` command line, by topic (run, admin commands,
//!   certificates, the roll of a new node binary); `src/main.rs` only
//!   calls it.
//! - [`config`]: flags, `KEYRAFT_*` variables and TOML, by topic, validated
//!   into a [`config::Config`] (timings must satisfy the safety inequality).
//! - [`server`]: `keyraft run` itself: start-up order (lock and fence
//!   first, then storage, servers, bootstrap), the background tasks, a
//!   reload (SIGHUP: certificates, signer mode's chains), and teardown. It
//!   builds everything below and hands over to the coordinator.
//! - [`join`]: step 9, what every starting node asks its peers before it
//!   takes part (does its data dir hold what they saw of it?), and its
//!   one-time registration.
//! - [`shutdown`]: the one shutdown signal threaded through every task.
//! - [`node`]: the handles the running parts share ([`node::Shared`]), what
//!   this node says about itself and what peers last said. Plain data; the
//!   parts below depend on it, never on each other's internals.
//! - [`coordinator`]: the state machine (Startup, Syncing, Registering,
//!   Voting, Validating, Shutdown), one handler per state and one place that
//!   waits; its decisions are pure functions in [`coordinator::policy`],
//!   its effects on the validator all in [`coordinator::custody`].
//! - [`supervisor`]: the validator node as custody drives it: its process,
//!   key links, restart backoff and prober.
//! - [`fence`]: what keeps a key from being used twice even when keyraft
//!   itself fails: the data-dir lock, atomic key links, the guard process
//!   that kills the validator when its lease runs out (both ends of its
//!   protocol), the kernel fence, and fence agents for other hosts.
//! - [`signer`]: signer mode (CometBFT): keyraft dials the nodes' privval
//!   ports and signs only what the Raft leader committed first, once the
//!   other voters confirmed nothing else was signed there; followers
//!   forward requests to the leader; refusals are typed end to end; the
//!   key is a file or in a PKCS#11 token; chains are added and removed by
//!   a reload ([`signer::reload`]).
//! - [`raft`]: replication only: openraft's type configuration, the vote
//!   and leadership gate ([`raft::gate`]), durable storage
//!   ([`raft::store`]) in files of its own over a [`raft::disk::Disk`]
//!   (the real directory, or the simulator's), what this node remembers of each member's history
//!   ([`raft::memory`], step 9), openraft's network over a transport
//!   ([`raft::network`]), the gRPC client ([`raft::peers`], the real
//!   transport) and service ([`raft::server`]).
//! - [`ledger`]: what is replicated and its rules (key events, pause,
//!   registrations, the signing watermark), at the bottom of the graph.
//! - [`durable`]: how a file keyraft trusts later is written (temp file,
//!   fsync, rename, directory fsync), also at the bottom.
//! - [`plant`]: the simulator's planted bugs (`sim/`), compiled only into
//!   its own build; a constant "off" everywhere else.
//! - [`gossip`]: peer status exchange, which fills the cluster view.
//! - [`tuning`]: auto timing: the profile the cluster committed, put in
//!   force on every member; the leader commits a switch when the round
//!   trips gossip measures call for one.
//! - [`admin`]: admin gRPC, HTTP endpoints, operator commands.
//! - [`health`]: probes of the validator node (near, cometbft, http).
//! - [`upgrade`]: the chain's own upgrades as cosmovisor's tree and the
//!   node show them (scheduled, halted, binary installed, switched), which
//!   gossip carries and the policy reads at a halt.
//! - [`preflight`]: `keyraft check --config`, checks before a first start.
//! - [`metrics`]: the Prometheus registry.
//! - [`tls`]: mTLS for the peer port; node N's certificate names
//!   `node-N.keyraft`, and a peer claiming to be N must present it.

pub mod admin;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod durable;
pub mod fence;
pub mod gossip;
pub mod health;
pub mod join;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod plant;
pub mod preflight;
pub mod raft;
pub mod server;
pub mod shutdown;
pub mod signer;
pub mod supervisor;
pub mod tls;
pub mod tuning;
pub mod upgrade;

/// Code generated from `proto/keyraft.proto`.
pub mod pb {
    tonic::include_proto!("keyraft");
}
