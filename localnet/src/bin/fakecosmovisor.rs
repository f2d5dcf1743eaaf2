//! `fakecosmovisor run ARGS...` and `fakecosmovisor add-upgrade NAME EXE
//! [--force]`, configured by cosmovisor's `DAEMON_*` environment: see
//! `localnet::cosmovisor`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use localnet::cosmovisor::{self, Config};

/// An imitation of cosmovisor: runs a node, switches its binary at a chain
/// upgrade and starts it again.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node (`cosmovisor/current/bin/$DAEMON_NAME ARGS`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Put EXE where upgrade NAME's binary goes.
    AddUpgrade {
        name: String,
        exe: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    let cfg = match Config::from_vars(|k| std::env::var(k).ok()) {
        Ok(cfg) => cfg,
        Err(e) => return localnet::report(e.into()),
    };
    match args.command {
        Cmd::Run { args } => match cosmovisor::run(cfg, args).await {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => localnet::report(e),
        },
        Cmd::AddUpgrade { name, exe, force } => {
            match cosmovisor::add_upgrade(&cfg, &name, &exe, force) {
                Ok(bin) => {
                    println!("{}", bin.display());
                    ExitCode::SUCCESS
                }
                Err(e) => localnet::report(e),
            }
        }
    }
}
