//! `fakenode --home DIR --chain URL --node-id N --rpc-listen HOST:PORT ...`
//! (neard), `fakenode --cometbft --privval-listen ADDR --chain URL --node-id
//! N ...` (a CometBFT node with a remote signer), and `fakenode keygen`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use localnet::comet::key::ValidatorKey;
use localnet::comet::node::{CometNodeConfig, Protocol};
use localnet::comet::socket::Listen;
use localnet::keys::KeyFile;
use localnet::node::{self, NodeConfig};

/// A validator node that imitates neard (or, with --cometbft, a CometBFT node
/// with a remote signer), for testing keyraft.
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
    /// Write a fresh key file (mode 0600; never overwrites): NEAR's format,
    /// or with --cometbft a CometBFT priv_validator_key.json.
    Keygen {
        #[arg(long, required_unless_present = "cometbft")]
        account_id: Option<String>,
        #[arg(long)]
        cometbft: bool,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Home dir holding validator_key.json and node_key.json (neard), or
    /// the upgrade marker data/upgrade-info.json (CometBFT, --v1-after).
    #[arg(long, required_unless_present = "cometbft")]
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
    /// The chain software version this node runs: genesis, or the name of
    /// an upgrade in the chain's plan (fakechain --upgrade). At an
    /// upgrade's height an older version halts, writing
    /// data/upgrade-info.json and exiting with code 1.
    #[arg(long, default_value = localnet::upgrade::GENESIS, conflicts_with = "cometbft")]
    chain_version: String,
    /// How long this version's migration takes the first time it runs in
    /// this home (the node reports syncing meanwhile). CometBFT with
    /// --v1-after: the upgraded node's migration.
    #[arg(long, default_value_t = 0)]
    migration_ms: u64,
    /// CometBFT with --v1-after: the upgraded node cannot start (it exits
    /// with code 2, as a binary that panics at start does).
    #[arg(long, requires = "v1_after")]
    crash_after_upgrade: bool,
    /// Be a CometBFT node whose votes a remote signer signs.
    #[arg(long, requires = "privval_listen")]
    cometbft: bool,
    /// CometBFT: where the signer dials in (priv_validator_laddr):
    /// tcp://HOST:PORT (SecretConnection) or unix:///PATH.
    #[arg(long, requires = "cometbft")]
    privval_listen: Option<Listen>,
    /// CometBFT: chain id put in sign requests (default: the chain's).
    #[arg(long, requires = "cometbft")]
    chain_id: Option<String>,
    /// CometBFT: the protocol version imitated.
    #[arg(long, value_enum, default_value = "v0.38", requires = "cometbft")]
    protocol: Protocol,
    /// CometBFT: ask for a different block than other sentries at every
    /// height and round (a split proposal, as a signer sees it).
    #[arg(long, requires = "cometbft")]
    equivocate: bool,
    /// CometBFT 1.x: set skip_extension_signing (no vote extensions).
    #[arg(long, requires = "cometbft")]
    skip_extension_signing: bool,
    /// CometBFT 1.x: with every precommit, ask for raw bytes to be signed
    /// (and for a conflicting precommit's sign bytes, which must not be).
    #[arg(long, requires = "cometbft")]
    sign_bytes: bool,
    /// CometBFT: the chain upgrades from 0.38 to 1.x at this height; the
    /// node halts there (exit 1, data/upgrade-info.json under --home) and,
    /// started again, speaks v1.
    #[arg(long, requires = "home")]
    v1_after: Option<u64>,
    /// CometBFT: a fixed SecretConnection identity for the privval
    /// listener (a 32-byte ed25519 seed, hex) instead of one made at start.
    #[arg(long, requires = "cometbft")]
    privval_identity_seed: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    let result = match args.command {
        Some(Command::Keygen {
            cometbft: true,
            out,
            ..
        }) => ValidatorKey::generate()
            .write_new(&out)
            .map_err(anyhow::Error::from),
        Some(Command::Keygen {
            account_id, out, ..
        }) => KeyFile::generate(&account_id.unwrap_or_default())
            .write_new(&out)
            .map_err(anyhow::Error::from),
        None if args.run.cometbft => {
            let r = args.run;
            let cfg = CometNodeConfig {
                chain: r
                    .chain
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string(),
                node_id: r.node_id.unwrap_or_default(),
                rpc_listen: r.rpc_listen,
                // clap enforces `requires`.
                privval: r
                    .privval_listen
                    .unwrap_or(Listen::Tcp(([127, 0, 0, 1], 26659).into())),
                chain_id: r.chain_id,
                protocol: r.protocol,
                equivocate: r.equivocate,
                skip_extensions: r.skip_extension_signing,
                sign_bytes: r.sign_bytes,
                v1_after: r.v1_after,
                home: r.home,
                migration: Duration::from_millis(r.migration_ms),
                crash_after_upgrade: r.crash_after_upgrade,
                privval_identity: match r.privval_identity_seed.as_deref().map(hex::decode) {
                    None => None,
                    Some(Ok(b)) => match <[u8; 32]>::try_from(b) {
                        Ok(seed) => Some(seed),
                        Err(_) => {
                            eprintln!("error: --privval-identity-seed is not 32 bytes of hex");
                            return ExitCode::from(2);
                        }
                    },
                    Some(Err(e)) => {
                        eprintln!("error: --privval-identity-seed: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            localnet::comet::node::run(cfg).await
        }
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
                version: r.chain_version,
                migration: Duration::from_millis(r.migration_ms),
            };
            node::run(cfg).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => localnet::report(e),
    }
}
