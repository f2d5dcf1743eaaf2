//! `fakechain --listen HOST:PORT --block-ms N --validator-key FILE`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use localnet::{chain, keys};

/// A fake chain that produces heights and judges who signs them.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address of the HTTP API (/status /sign /stats /metrics).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Block interval in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    block_ms: u64,
    /// NEAR-format key file whose public key is the expected validator.
    #[arg(long)]
    validator_key: PathBuf,
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
    let text = std::fs::read_to_string(&args.validator_key)
        .with_context(|| format!("cannot read {}", args.validator_key.display()))?;
    let key: PublicOnly = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a NEAR key file", args.validator_key.display()))?;
    let validator = keys::parse_public(&key.public_key)?;
    let cfg = chain::ChainConfig {
        listen: args.listen,
        block: Duration::from_millis(args.block_ms),
        validator,
    };
    chain::run(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
