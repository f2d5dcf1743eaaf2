//! The `keyraft` command line: run a coordinator, or talk to one.
//!
//! Exit codes: 0 success; 1 runtime failure (or `check`: admin unreachable);
//! 2 bad usage, bad configuration, or a start refused for safety; `check`
//! uses 3 (no quorum), 4 (no active validator), 5 (more than one),
//! 6 (active validator unhealthy).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use keyraft::config::{HealthKind, LogFormat, RunArgs};
use keyraft::fence::FenceError;
use keyraft::pb::{self, cluster_command::Kind};
use keyraft::server::{self, RunError};
use keyraft::{fence, health, tls};

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

#[derive(clap::Args, Clone)]
struct AdminAddr {
    /// Admin address of a running coordinator.
    #[arg(
        long,
        global = true,
        env = "KEYRAFT_ADMIN",
        default_value = "127.0.0.1:7701"
    )]
    admin: SocketAddr,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator and supervise the validator: keyraft run [FLAGS] -- CMD ARGS...
    Run(Box<RunArgs>),
    /// Print the cluster as this member sees it.
    Status {
        /// DESIGN.md's JSON shape instead of a table.
        #[arg(long)]
        json: bool,
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
    },
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
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A new cluster CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long)]
        out: PathBuf,
    },
    /// A certificate for node ID, signed by the CA in --ca.
    Node {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        id: u64,
        /// Extra DNS names (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses (repeatable).
        #[arg(long)]
        ip: Vec<String>,
        /// Valid for this many days from now [default: until 2124].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        #[arg(long)]
        out: PathBuf,
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

fn main() -> ExitCode {
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
        Cmd::Guard {
            data_dir,
            no_cgroup,
        } => match fence::guard_main(&data_dir, !no_cgroup) {
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
        Cmd::Run(args) => run(*args),
        other => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(anyhow!(e)),
            };
            match rt.block_on(client(other)) {
                Ok(code) => code,
                Err(e) => fail(e),
            }
        }
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The certificate must name this node and go with its key; loaded
    // once, here, and handed to the server.
    let material = match cfg
        .tls
        .as_ref()
        .map(|p| tls::TlsMaterial::load_for(p, cfg.id))
    {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.id, cfg.log_format);
    // One thread: an idle coordinator wakes often (openraft ticks every
    // fifth of a heartbeat); a second worker only adds cross-thread wakeups.
    // Blocking work (sled, fsync) runs on tokio's blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow!(e)),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        role = cfg.role(),
        "keyraft starting"
    );
    match rt.block_on(server::run(cfg, material, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (RunError::Refused(_)
            | RunError::Join(_)
            | RunError::Fence(FenceError::Refused(_) | FenceError::Locked { .. })),
        ) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => std::future::pending().await,
    }
}

/// Logs carry the node id on every line: `node=N` first in text, a
/// `"node":N` field in JSON.
fn init_logging(id: u64, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=error,sled=warn,h2=warn,tower=warn"));
    let json = format == LogFormat::Json;
    let writer = NodeTag { id, json };
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.with_target(false).init();
    }
}

#[derive(Clone, Copy)]
struct NodeTag {
    id: u64,
    json: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NodeTag {
    type Writer = NodeTag;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

impl Write for NodeTag {
    /// Each formatted event arrives in one call: tag it and write it whole.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(buf.len() + 16);
        match (self.json, buf.split_first()) {
            (true, Some((b'{', rest))) => {
                line.extend_from_slice(format!("{{\"node\":{},", self.id).as_bytes());
                line.extend_from_slice(rest);
            }
            _ => {
                line.extend_from_slice(format!("node={} ", self.id).as_bytes());
                line.extend_from_slice(buf);
            }
        }
        std::io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

async fn admin_client(
    addr: SocketAddr,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| {
            format!("no keyraft admin at {addr} (is `keyraft run` up? --admin sets the address)")
        })?;
    Ok(pb::admin_client::AdminClient::new(ch))
}

async fn command(addr: SocketAddr, kind: Kind) -> anyhow::Result<ExitCode> {
    let mut c = admin_client(addr).await?;
    let r = c
        .command(pb::ClusterCommand { kind: Some(kind) })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?;
    println!("{}", r.into_inner().message);
    Ok(ExitCode::SUCCESS)
}

/// The height of CometBFT's `priv_validator_state.json` (a string there, as
/// CometBFT writes 64-bit integers; a number is accepted too).
fn state_file_height(path: &std::path::Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let h = &v["height"];
    h.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| h.as_u64())
        .filter(|h| *h > 0)
        .ok_or_else(|| {
            anyhow!(
                "{} has no height (is it CometBFT's priv_validator_state.json?)",
                path.display()
            )
        })
}

async fn status_value(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut c = admin_client(addr).await?;
    let r = c
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow!("{}", s.message()))?;
    Ok(serde_json::from_str(&r.into_inner().json)?)
}

async fn client(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Status { json, admin } => {
            let v = status_value(admin.admin).await?;
            if json {
                println!("{v}");
            } else {
                print_table(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Switchover { to, admin } => {
            command(admin.admin, Kind::Switchover(pb::Switchover { to })).await
        }
        Cmd::Pause { admin } => command(admin.admin, Kind::Pause(true)).await,
        Cmd::Resume { admin } => command(admin.admin, Kind::Resume(true)).await,
        Cmd::Members { what, admin } => match what {
            MembersCmd::List => {
                let mut c = admin_client(admin.admin).await?;
                let r = c
                    .members(pb::StatusRequest {})
                    .await
                    .map_err(|s| anyhow!("{}", s.message()))?
                    .into_inner();
                for m in &r.voters {
                    println!("{}\t{}\tvoter", m.id, m.addr);
                }
                for m in &r.learners {
                    println!("{}\t{}\tlearner", m.id, m.addr);
                }
                Ok(ExitCode::SUCCESS)
            }
            MembersCmd::Add { member } => {
                let (id, addr) = member
                    .split_once('=')
                    .and_then(|(i, a)| Some((i.parse::<u64>().ok()?, a.to_string())))
                    .ok_or_else(|| anyhow!("bad member '{member}': want ID=HOST:PORT"))?;
                command(admin.admin, Kind::MembersAdd(pb::Member { id, addr })).await
            }
            MembersCmd::Remove { id } => command(admin.admin, Kind::MembersRemove(id)).await,
        },
        Cmd::Signer {
            what: SignerCmd::ImportState { file, never_signed },
            admin,
        } => {
            let height = match (&file, never_signed) {
                (Some(f), _) => state_file_height(f)?,
                (None, _) => 0,
            };
            let status = status_value(admin.admin).await?;
            let chain_id = status["signer"]["chain_id"]
                .as_str()
                .ok_or_else(|| {
                    anyhow!("the cluster at {} does not run in signer mode", admin.admin)
                })?
                .to_string();
            command(
                admin.admin,
                Kind::SignerFloor(pb::SignerFloor { chain_id, height }),
            )
            .await
        }
        Cmd::Check {
            config: Some(file), ..
        } => Ok(preflight(file).await),
        Cmd::Check { admin, .. } => Ok(check(admin.admin).await),
        Cmd::Probe {
            health: kind,
            url,
            json,
        } => {
            let url = url
                .or_else(|| kind.default_url().map(str::to_string))
                .ok_or_else(|| anyhow!("--health http needs --url"))?;
            let h = health::Prober::new(kind, &url, Duration::from_secs(3))
                .probe()
                .await?;
            if json {
                println!("{}", serde_json::to_string(&h)?);
            } else {
                let height = h.height.map_or("-".to_string(), |x| x.to_string());
                println!(
                    "running: {}  synced: {}  height: {height}",
                    h.running, h.synced
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs { what } => {
            let files = match what {
                CertsCmd::Ca { out } => tls::create_ca(&out)?,
                CertsCmd::Node {
                    ca,
                    id,
                    dns,
                    ip,
                    days,
                    out,
                } => tls::create_node(&ca, id, &dns, &ip, days, &out)?,
                CertsCmd::Show { paths, warn_days } => return show_certs(&paths, warn_days),
            };
            for f in files {
                let expiry = tls::cert_file_info(&f)
                    .map(|i| format!(" (expires {})", i.not_after_text))
                    .unwrap_or_default();
                println!("wrote {}{expiry}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(_) | Cmd::Version | Cmd::Guard { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// `keyraft certs show`: one line per certificate; exit 1 if any has
/// expired or expires within `warn_days`.
fn show_certs(paths: &[PathBuf], warn_days: u32) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(
                ["ca.pem", "node.pem"]
                    .iter()
                    .map(|f| p.join(f))
                    .filter(|f| f.exists()),
            );
        } else {
            files.push(p.clone());
        }
    }
    anyhow::ensure!(!files.is_empty(), "no ca.pem or node.pem in {paths:?}");
    let mut ok = true;
    for f in files {
        let i = tls::cert_file_info(&f)?;
        let days = i.expires_in().div_euclid(86_400);
        let verdict = if i.expires_in() <= 0 {
            ok = false;
            "EXPIRED".to_string()
        } else if days < i64::from(warn_days) {
            ok = false;
            format!("expires in {days} days: renew it")
        } else {
            format!("expires in {days} days")
        };
        println!(
            "{}: {} [{}] not after {}: {verdict}",
            f.display(),
            i.subject,
            i.names.join(", "),
            i.not_after_text
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `keyraft check --config FILE`: the preflight, one line per check.
async fn preflight(file: PathBuf) -> ExitCode {
    let args = RunArgs {
        config: Some(file),
        ..RunArgs::default()
    };
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let lines = keyraft::preflight::run(&cfg).await;
    for l in &lines {
        println!("{l}");
    }
    if lines
        .iter()
        .any(|l| l.outcome == keyraft::preflight::Outcome::Fail)
    {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `keyraft check`: one line, and an exit code per failure.
async fn check(addr: SocketAddr) -> ExitCode {
    let v = match status_value(addr).await {
        Ok(v) => v,
        Err(e) => {
            println!("CRITICAL: {e:#}");
            return ExitCode::from(1);
        }
    };
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let validating: Vec<&serde_json::Value> = nodes
        .iter()
        .filter(|n| n["state"] == "Validating")
        .collect();
    let signer = &v["signer"];
    let (code, line) = if v["cluster"]["quorum"] != true {
        (
            3,
            "CRITICAL: no quorum: this member sees no leader backed by a majority".to_string(),
        )
    } else if !signer.is_null() {
        // Signer mode: nobody validates; the leader signs.
        let conns = signer["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = conns.iter().filter(|c| c["connected"] == true).count();
        if signer["watermark"].is_null() {
            (4, "CRITICAL: signer mode without a watermark: nothing is signed until `keyraft signer import-state FILE` (or `--never-signed`)".to_string())
        } else if up == 0 {
            (
                7,
                "CRITICAL: this signer is connected to none of its nodes' privval ports"
                    .to_string(),
            )
        } else {
            (
                0,
                format!(
                    "OK: node {} leads the signers at height {}; {up} of {} privval connections up here",
                    v["cluster"]["leader"],
                    signer["watermark"]["height"],
                    conns.len()
                ),
            )
        }
    } else if validating.is_empty() {
        (4, "CRITICAL: no node is validating".to_string())
    } else if validating.len() > 1 {
        let ids: Vec<String> = validating.iter().map(|n| n["id"].to_string()).collect();
        (
            5,
            format!(
                "CRITICAL: more than one node reports validating: {}",
                ids.join(", ")
            ),
        )
    } else {
        let n = validating[0];
        let healthy = n["validator"]["running"] == true && n["validator"]["synced"] == true;
        if healthy {
            (
                0,
                format!(
                    "OK: node {} validates at height {}",
                    n["id"], n["validator"]["height"]
                ),
            )
        } else {
            (
                6,
                format!(
                    "CRITICAL: node {} validates but its node is not healthy and synced",
                    n["id"]
                ),
            )
        }
    };
    println!("{line}");
    ExitCode::from(code)
}

fn print_table(v: &serde_json::Value) {
    let c = &v["cluster"];
    let or_dash = |x: &serde_json::Value| {
        if x.is_null() {
            "-".to_string()
        } else {
            x.to_string()
        }
    };
    println!(
        "leader {}  term {}  active validator {}  quorum {}  paused {}",
        or_dash(&c["leader"]),
        c["term"],
        or_dash(&c["active_validator"]),
        if c["quorum"] == true { "yes" } else { "NO" },
        if c["paused"] == true { "YES" } else { "no" }
    );
    let sg = &v["signer"];
    if !sg.is_null() {
        let w = &sg["watermark"];
        let watermark = if w.is_null() {
            "NONE (run `keyraft signer import-state`)".to_string()
        } else {
            format!(
                "height {} round {} step {}",
                w["height"],
                or_dash(&w["round"]),
                or_dash(&w["step"])
            )
        };
        let conns: Vec<String> = sg["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let up = if c["connected"] == true { "up" } else { "DOWN" };
                format!("{} {up}", c["node"].as_str().unwrap_or("?"))
            })
            .collect();
        println!(
            "signer: chain {}  watermark {watermark}  signatures {}  privval here: {}",
            sg["chain_id"].as_str().unwrap_or("?"),
            sg["signatures"],
            conns.join(", ")
        );
    }
    println!(
        "{:<4} {:<22} {:<10} {:<12} {:<10} {:<4} {:<24} SEEN",
        "ID", "ADDR", "ROLE", "STATE", "RAFT", "KEY", "VALIDATOR"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let val = &n["validator"];
        let validator = if val.is_null() {
            "-".to_string()
        } else {
            let state = match (val["running"] == true, val["synced"] == true) {
                (false, _) => "down",
                (true, false) => "syncing",
                (true, true) => "synced",
            };
            format!("{state} h={}", or_dash(&val["height"]))
        };
        let seen = match n["last_seen_ms"].as_u64() {
            Some(0) => "self".to_string(),
            Some(ms) => format!("{ms}ms"),
            None => "never".to_string(),
        };
        println!(
            "{:<4} {:<22} {:<10} {:<12} {:<10} {:<4} {:<24} {}",
            n["id"].to_string(),
            n["addr"].as_str().unwrap_or("-"),
            n["role"].as_str().unwrap_or("-"),
            n["state"].as_str().unwrap_or("-"),
            n["raft"].as_str().unwrap_or("-"),
            if n["key_linked"] == true { "yes" } else { "-" },
            validator,
            seen
        );
    }
    for n in v["nodes"].as_array().into_iter().flatten() {
        if let Some(days) = n["tls_cert"]["expires_in_days"]
            .as_i64()
            .filter(|d| *d < 30)
        {
            println!(
                "node {} certificate expires in {days} days ({}): renew it and send keyraft SIGHUP",
                n["id"],
                n["tls_cert"]["not_after"].as_str().unwrap_or("?")
            );
        }
        if let Some(e) = n["probe_error"].as_str() {
            println!("node {} validator probe: {e}", n["id"]);
        }
    }
}
