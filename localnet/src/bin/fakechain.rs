//! `fakechain --listen HOST:PORT --block-ms N --validator-key FILE
//! [--upgrade NAME@HEIGHT ...]` (NEAR mode) or `fakechain --cometbft --chain-id ID --validator-key
//! priv_validator_key.json ...` (CometBFT mode).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use localnet::comet::{key, ledger::Schedule};
use localnet::upgrade::{Plan, Upgrade};
use localnet::{chain, keys};

/// A fake chain that produces heights and judges who signs them.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address of the HTTP API (/status /sign /cometbft/* /stats /metrics).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Block interval in milliseconds (in CometBFT mode: each round's).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    block_ms: u64,
    /// Delay of the first block (or round), so that chains started
    /// together do not all tick at once.
    #[arg(long, default_value_t = 0)]
    phase_ms: u64,
    /// The expected validator's key: a NEAR key file, or with --cometbft a
    /// CometBFT priv_validator_key.json.
    #[arg(long)]
    validator_key: PathBuf,
    /// Judge CometBFT votes and proposals (equivocations) instead of NEAR
    /// height signatures.
    #[arg(long)]
    cometbft: bool,
    /// CometBFT mode: the chain id every signature must cover.
    #[arg(long, default_value = "localnet-1", requires = "cometbft")]
    chain_id: String,
    /// CometBFT mode: every Nth height fails round 0 (the network precommits
    /// nil) and commits in round 1. 0: never.
    #[arg(long, default_value_t = 0, requires = "cometbft")]
    round_every: u64,
    /// CometBFT mode: size of the validator set; our key proposes one round
    /// in this many.
    #[arg(long, default_value_t = 4, requires = "cometbft", value_parser = clap::value_parser!(u64).range(1..))]
    validators: u64,
    /// CometBFT mode: refuse non-nil precommits without a valid vote
    /// extension signature (CometBFT 0.38 with extensions enabled).
    #[arg(long, requires = "cometbft")]
    vote_extensions: bool,
    /// An upgrade at HEIGHT to version NAME (repeatable). NEAR mode: the
    /// chain makes no block past HEIGHT until a node of version NAME signs
    /// it, and nodes of older versions halt there. CometBFT mode: once
    /// HEIGHT is committed, no round opens past the next height's first
    /// until the network upgraded (--network-upgrade-ms).
    #[arg(long = "upgrade", value_name = "NAME@HEIGHT")]
    upgrades: Vec<Upgrade>,
    /// At an upgrade's halt, the rest of the network upgrades in this many
    /// milliseconds; past that, blocks are made again without this
    /// validator (its heights counted missed). Without it a NEAR-mode
    /// chain waits for this validator's new version; a CometBFT-mode one
    /// does not halt.
    #[arg(long, requires = "upgrades")]
    network_upgrade_ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct PublicOnly {
    public_key: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => localnet::report(e),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mode = if args.cometbft {
        let key = key::load_public(&args.validator_key)?;
        chain::Mode::Comet {
            schedule: Schedule {
                chain_id: args.chain_id,
                round_every: args.round_every,
                validators: args.validators,
                extensions: args.vote_extensions,
                slot_ms: args.block_ms,
                upgrades: Plan::new(args.upgrades.clone())?,
                network_upgrade: Duration::from_millis(args.network_upgrade_ms.unwrap_or(0)),
            },
            key,
        }
    } else {
        let text = std::fs::read_to_string(&args.validator_key)
            .with_context(|| format!("cannot read {}", args.validator_key.display()))?;
        let key: PublicOnly = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a NEAR key file (for a CometBFT priv_validator_key.json, add --cometbft)",
                args.validator_key.display()
            )
        })?;
        chain::Mode::Near(keys::parse_public(&key.public_key)?)
    };
    let cfg = chain::ChainConfig {
        listen: args.listen,
        block: Duration::from_millis(args.block_ms),
        phase: Duration::from_millis(args.phase_ms),
        mode,
        plan: Plan::new(args.upgrades)?,
        network_upgrade: args.network_upgrade_ms.map(Duration::from_millis),
    };
    chain::run(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
