//! localnet: the judge of keyraft and its one-command demo.
//!
//! Nothing here knows keyraft's internals; it only runs keyraft's binary and
//! watches the chain. A short tour:
//!
//! - [`bench`]: benchmarks that print numbers for docs/benchmarks.md, one
//!   file each.
//! - [`keys`]: NEAR-format key files and the message a validator signs.
//! - [`chain`]: `fakechain`, which produces heights and counts signed heights,
//!   missed heights and double signs (NEAR mode) or equivocations (CometBFT
//!   mode). It is the oracle of every failover test.
//! - [`chains`]: signer mode's chains beyond the first (`--chains N`), each
//!   with its own judge, key and sentries, and the `[[chains]]` file.
//! - [`chaos`]: seeded rounds of real faults, judged by the chain.
//! - [`comet`]: the CometBFT judge: `priv_validator_key.json`, votes and
//!   their sign bytes, the chain's CometBFT books (equivocations), and
//!   `fakenode --cometbft`, which asks a remote signer (tmkms, keyraft) for
//!   every vote over the privval protocol.
//! - [`cometnet`]: chain, CometBFT sentries and signers on loopback, for
//!   tests and benchmarks; [`tmkms`]: finding, configuring and starting
//!   tmkms, the real signer the judge is proven against.
//! - [`cluster`]: a whole local keyraft cluster (chain, coordinators,
//!   fakenodes, proxies) for the launcher, chaos, benchmarks and tests;
//!   [`shape`]: how each of its nodes is started (launch shape, mode,
//!   fence agent, flags).
//! - [`cosmovisor`]: `fakecosmovisor`, an imitation of the process wrapper
//!   that switches a Cosmos node's binary at a chain upgrade.
//! - [`docker`]: the Docker Compose cluster under host-level faults.
//! - [`halt`]: a validator cluster at a chain's upgrade halt, each node
//!   under `fakecosmovisor`, and `localnet upgrade-test`'s scenarios.
//! - [`harness`]: child processes, free ports and polling with deadlines,
//!   shared by the launcher and the tests of both crates.
//! - [`launcher`]: `localnet up`, its live view and control API, and the
//!   commands that break a running localnet from another terminal.
//! - [`node`]: `fakenode`, a neard look-alike that signs each height while it
//!   holds the validator key.
//! - [`faults`]: the faults a local cluster suffers (kill, freeze, cut off,
//!   slow links), apart from the cluster facade.
//! - [`proxy`]: TCP fault proxies on every peer link, so links can be cut
//!   (blackholed) without root.
//! - [`upgrade`]: a chain's upgrade plan, as the Cosmos SDK's upgrade
//!   module runs it: where each version halts, and `upgrade-info.json`.
//! - [`wire`]: the JSON types between the chain, the nodes and the tools.

pub mod bench;
pub mod chain;
pub mod chains;
pub mod chaos;
pub mod cluster;
pub mod comet;
pub mod cometnet;
pub mod cosmovisor;
pub mod docker;
pub mod faults;
pub mod halt;
pub mod harness;
pub mod keys;
pub mod launcher;
pub mod node;
pub mod proxy;
pub mod rolling;
pub mod shape;
pub mod tmkms;
pub mod token;
pub mod upgrade;
pub mod wire;

/// Logs to stderr, human-readable, at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Prints `error: ...` (the whole cause chain on one line) and returns exit code 1.
pub fn report(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("error: {e:#}");
    std::process::ExitCode::FAILURE
}
