//! The `keyraft` command line: run a coordinator, or talk to one.
//! `src/main.rs` only calls [`main`]; each topic has its room:
//!
//! - [`run`]: `keyraft run`, its logging and its signals;
//! - [`admin`]: the commands that talk to a running coordinator (status,
//!   switchover, pause, resume, members, signer, check, probe) and the
//!   status table;
//! - [`certs`]: `keyraft certs ca|node|admin|show`.
//!
//! Exit codes: 0 success; 1 runtime failure (or `check`: admin unreachable);
//! 2 bad usage, bad configuration, or a start refused for safety; `check`
//! uses 3 (no quorum), 4 (no active validator), 5 (more than one),
//! 6 (active validator unhealthy), 7 (signer mode: no privval connection
//! on this host), 9 (otherwise healthy, but a member lacks the binary for
//! the chain's next upgrade).
//!
//! Owns: parsing, dispatch and what the commands print. Must not: hold
//! cluster logic; it calls [`crate::server`], the admin API and [`crate::tls`].

mod admin;
mod certs;
mod chains;
mod rolling;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};

use crate::config::{HealthKind, RunArgs};
use crate::fence;

#[derive(Parser)]
#[command(
    name = "keyraft",
    version,
    about = "Raft-coordinated failover for blockchain validators that never double-signs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Where a running coordinator's admin API is: its Unix socket (the
/// default; file permissions decide who may use it), or its admin TCP port
/// with an admin certificate.
#[derive(clap::Args, Clone, Default)]
struct AdminAddr {
    /// The coordinator's admin socket [default: the `admin-socket` of the
    /// run configuration in $KEYRAFT_CONFIG or /etc/keyraft/keyraft.toml
    /// when readable, else /run/keyraft/admin.sock].
    #[arg(long, global = true, env = "KEYRAFT_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// A coordinator's admin TCP port (HOST:PORT, its `admin-listen`)
    /// instead of a socket; needs --admin-cert.
    #[arg(
        long,
        global = true,
        env = "KEYRAFT_ADMIN",
        conflicts_with = "admin_socket"
    )]
    admin: Option<SocketAddr>,
    /// Dir with admin.pem, admin.key and ca.pem (`keyraft certs admin`)
    /// for --admin.
    #[arg(long, global = true, env = "KEYRAFT_ADMIN_CERT")]
    admin_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator and supervise the validator: keyraft run [FLAGS] -- CMD ARGS...
    Run(Box<RunArgs>),
    /// Print the cluster as this member sees it.
    Status {
        /// The JSON shape of docs/reference.md instead of a table.
        #[arg(long)]
        json: bool,
        /// Signer mode: a line for every chain, not only (past five) for
        /// those that need attention.
        #[arg(long)]
        all_chains: bool,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Hand validation to another node cleanly (the successor starts without waiting).
    Switchover {
        /// The node to hand over to [default: the healthiest synced standby].
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Roll a new program for the validator node through the cluster
    /// (validator mode, chains without an upgrade halt): each standby's
    /// node restarts as it, one at a time until synced, then a switchover
    /// to one, then the old active host's.
    Upgrade {
        /// The new program, at this absolute path on every host: it
        /// replaces the first word of each host's validator command.
        #[arg(long)]
        binary: String,
        /// Give up (changing nothing more) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Stop automatic failover (the active validator keeps validating).
    Pause {
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Resume automatic failover.
    Resume {
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// List, add or remove members.
    Members {
        #[command(subcommand)]
        what: MembersCmd,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Signer mode: seed the signing watermark.
    Signer {
        #[command(subcommand)]
        what: SignerCmd,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Exit 0 when the cluster has quorum and exactly one healthy validating node.
    /// With --config: a preflight of that configuration before a first start.
    Check {
        /// Check this `keyraft run` configuration file from this host instead
        /// (certificates, peers over mTLS, clocks, the validator's RPC): one
        /// line per check; exit 1 if one fails, 2 if the file is refused.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Print what keyraft sees of a validator node.
    Probe {
        #[arg(long, value_enum)]
        health: HealthKind,
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create a cluster CA or a node certificate.
    Certs {
        #[command(subcommand)]
        what: CertsCmd,
    },
    /// Print the version.
    Version,
    /// The guard process (started by `keyraft run`, not by hand).
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        data_dir: PathBuf,
        /// Track the tree without a cgroup.
        #[arg(long)]
        no_cgroup: bool,
        /// Keep the kernel fence's lease element with the guard's lease.
        #[arg(long)]
        kernel_fence: bool,
        /// Start the validator as this user.
        #[arg(long)]
        validator_user: Option<String>,
    },
    /// The kernel fence's self-test packet (run by `keyraft run`).
    #[command(hide = true)]
    FenceProbe,
}

#[derive(Subcommand)]
enum MembersCmd {
    /// Voters and learners with their addresses.
    List,
    /// Add a node: as a learner, then a voter once caught up. ID=HOST:PORT
    Add { member: String },
    /// Remove a node from the cluster.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum SignerCmd {
    /// Say where the key stands; nothing is signed until then. FILE: never
    /// sign at or below the height of CometBFT's priv_validator_state.json
    /// (from the validator's previous signer). --never-signed: a new key.
    ImportState {
        #[arg(required_unless_present = "never_signed")]
        file: Option<PathBuf>,
        /// The key has never signed anything (a new validator).
        #[arg(long, conflicts_with = "file")]
        never_signed: bool,
        /// Take FILE's height even when it is far above what the watermark
        /// and the members' nodes say (the leader logs the override).
        #[arg(long, requires = "file")]
        allow_jump: bool,
        /// This chain's key is not the one members in validator mode
        /// linked into their nodes: their use of the key does not bound
        /// this floor.
        #[arg(long)]
        other_key: bool,
        /// The chain whose watermark this is [default: the cluster's one
        /// chain; required where it signs for several].
        #[arg(long)]
        chain_id: Option<String>,
    },
    /// Put a CometBFT priv_validator_key.json into a PKCS#11 token, once
    /// per host, as a key that never leaves it (sensitive, not
    /// extractable); the PIN from the URI's pin-source. Nothing is changed
    /// where the token holds this key under that name already; a token
    /// holding another key under it is refused. Needs no running keyraft.
    ImportKey {
        /// The key file.
        #[arg(long)]
        from: PathBuf,
        /// Where to: pkcs11:token=LABEL;object=NAME?module-path=MODULE&pin-source=file:/PIN
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A new cluster CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        /// Valid for this many days from now.
        #[arg(long, default_value_t = crate::tls::CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// A certificate for node ID, signed by the CA in --ca, with the role
    /// of a validator host (or, with --witness, of a witness).
    Node {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        id: u64,
        /// For a witness (`keyraft run --witness`): it votes, and may
        /// neither sign nor speak for the operator.
        #[arg(long)]
        witness: bool,
        /// Extra DNS names (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses (repeatable).
        #[arg(long)]
        ip: Vec<String>,
        /// Valid for this many days from now [default: 365]; refused if
        /// longer than the CA has left.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// An operator's certificate for the admin TCP port (`admin-listen`),
    /// signed by the CA in --ca: DIR/admin.pem, admin.key, ca.pem.
    Admin {
        #[arg(long)]
        ca: PathBuf,
        /// Who holds it (written into the logs of every command it runs).
        #[arg(long)]
        name: String,
        /// Valid for this many days from now [default: 365]; refused if
        /// longer than the CA has left.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Renew the certificate in each TLS dir (its node.pem, else its
    /// admin.pem) from the CA in --ca: the same names, addresses and role,
    /// a new key; the old pair kept as *.old. Send keyraft SIGHUP after.
    Renew {
        #[arg(long)]
        ca: PathBuf,
        /// Valid for this many days from now [default: 365]; refused if
        /// longer than the CA has left.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Print each certificate's names and expiry: PEM files, or TLS dirs
    /// (their ca.pem and node.pem). Exit 1 if one has expired or expires
    /// within --warn-days.
    Show {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value_t = 14)]
        warn_days: u32,
    },
}

/// The whole command line: parse, dispatch, exit code.
pub fn main() -> ExitCode {
    let code = command();
    // A dropped token key's sessions close on a thread of their own:
    // exiting under them would tear the module down mid-call.
    crate::signer::token::settle(std::time::Duration::from_secs(1));
    code
}

fn command() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: the first line of clap's message.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad usage"));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Cmd::FenceProbe => ExitCode::from(fence::kernel::probe_main()),
        Cmd::Guard {
            data_dir,
            no_cgroup,
            kernel_fence,
            validator_user,
        } => match fence::guard_main(
            &data_dir,
            !no_cgroup,
            kernel_fence,
            validator_user.as_deref(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("guard: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Version => {
            println!("keyraft {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => run::run(*args),
        // Local and blocking: no runtime, no running keyraft.
        Cmd::Signer {
            what: SignerCmd::ImportKey { from, to },
            ..
        } => match admin::import_key(&from, &to) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        other => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(anyhow!(e)),
            };
            let run = async {
                match other {
                    Cmd::Upgrade {
                        binary,
                        timeout,
                        admin,
                    } => rolling::roll(&admin, &binary, timeout).await,
                    other => admin::client(other).await,
                }
            };
            let ran = rt.block_on(run);
            // A thread stuck in a token that does not answer (`check`
            // opening the keys) must not keep the command from exiting.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            match ran {
                Ok(code) => code,
                Err(e) => fail(e),
            }
        }
    }
}

pub(crate) fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}
