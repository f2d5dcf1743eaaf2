//! `fakenode --home DIR --chain URL --node-id N --rpc-listen HOST:PORT ...`
//! and `fakenode keygen --account-id ID --out FILE`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use localnet::keys::KeyFile;
use localnet::node::{self, NodeConfig};

/// A validator node that imitates neard, for testing keyraft.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write a fresh NEAR-format key file (mode 0600; never overwrites).
    Keygen {
        #[arg(long)]
        account_id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Home dir holding validator_key.json and node_key.json.
    #[arg(long, required = true)]
    home: Option<PathBuf>,
    /// Base URL of the fake chain, e.g. http://127.0.0.1:3000.
    #[arg(long, required = true)]
    chain: Option<String>,
    /// Node id reported with each signature.
    #[arg(long, required = true)]
    node_id: Option<u64>,
    /// Address of the neard-style RPC (GET /status).
    #[arg(long, default_value = "127.0.0.1:3030")]
    rpc_listen: SocketAddr,
    /// Report syncing (and sign nothing) for this long after start.
    #[arg(long, default_value_t = 0)]
    sync_delay_ms: u64,
    /// Keep running (and signing) this long after SIGTERM.
    #[arg(long, default_value_t = 0)]
    shutdown_delay_ms: u64,
    /// Re-read validator_key.json on SIGHUP.
    #[arg(long)]
    hot_reload: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    let result = match args.command {
        Some(Command::Keygen { account_id, out }) => KeyFile::generate(&account_id)
            .write_new(&out)
            .map_err(anyhow::Error::from),
        None => {
            let r = args.run;
            let cfg = NodeConfig {
                // clap enforces `required`; the Options exist only so that
                // `keygen` can be parsed without them.
                home: r.home.unwrap_or_default(),
                chain: r
                    .chain
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string(),
                node_id: r.node_id.unwrap_or_default(),
                rpc_listen: r.rpc_listen,
                sync_delay: Duration::from_millis(r.sync_delay_ms),
                shutdown_delay: Duration::from_millis(r.shutdown_delay_ms),
                hot_reload: r.hot_reload,
            };
            node::run(cfg).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => localnet::report(e),
    }
}
