//! The commands that talk to a running coordinator over its admin API,
//! and how their answers are printed.
//!
//! Owns: the client side of the admin API and the status table. Must not:
//! decide anything about the cluster; the coordinator it talks to does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::chains::or_dash;
use super::{certs, AdminAddr, Cmd, MembersCmd, SignerCmd};
use crate::config::RunArgs;
use crate::health;
use crate::pb::{self, cluster_command::Kind};

/// Where the CLI reaches a coordinator, resolved from [`AdminAddr`].
enum Target {
    Socket(PathBuf),
    Tcp(SocketAddr, PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "{}", p.display()),
            Target::Tcp(a, _) => write!(f, "{a}"),
        }
    }
}

impl AdminAddr {
    /// --admin-socket; else --admin with --admin-cert; else the socket of
    /// the run configuration this host uses; else the package's socket.
    fn target(&self) -> anyhow::Result<Target> {
        if let Some(p) = &self.admin_socket {
            return Ok(Target::Socket(p.clone()));
        }
        if let Some(a) = self.admin {
            let dir = self.admin_cert.clone().ok_or_else(|| {
                anyhow!("--admin {a} is the admin TCP port: it needs --admin-cert DIR (`keyraft certs admin`)")
            })?;
            return Ok(Target::Tcp(a, dir));
        }
        let file = std::env::var_os("KEYRAFT_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/keyraft/keyraft.toml"));
        Ok(Target::Socket(
            crate::config::admin_socket_of(&file)
                .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_ADMIN_SOCKET)),
        ))
    }
}

async fn admin_client(
    addr: &AdminAddr,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let target = addr.target()?;
    let ch = match &target {
        Target::Socket(path) => crate::admin::access::connect_socket(path)
            .await
            .map_err(|e| {
                let why =
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                anyhow!(
                    "cannot reach the keyraft admin socket {target}: {why} (is `keyraft run` up? is your user in keyraft's admin group? --admin-socket sets the path)"
                )
            })?,
        Target::Tcp(a, dir) => {
            let cfg = std::sync::Arc::new(crate::tls::admin::AdminCert::load(dir)?.client_config()?);
            let a = *a;
            crate::admin::access::endpoint()
                .connect_with_connector(tower::service_fn(move |_| {
                    let cfg = cfg.clone();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(a).await?;
                        let name = rustls::pki_types::ServerName::try_from("keyraft")
                            .map_err(std::io::Error::other)?;
                        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                    }
                }))
                .await
                .map_err(|e| {
                    let why = std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), |s| s.to_string());
                    anyhow!("cannot reach the keyraft admin port {target}: {why}")
                })?
        }
    };
    Ok(pb::admin_client::AdminClient::new(ch))
}

/// Sends an operator command; the leader's answer.
pub(super) async fn send(addr: &AdminAddr, kind: Kind) -> anyhow::Result<String> {
    let mut c = admin_client(addr).await?;
    let r = c
        .command(pb::ClusterCommand {
            kind: Some(kind),
            mode: None,
        })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?;
    Ok(r.into_inner().message)
}

async fn command(addr: &AdminAddr, kind: Kind) -> anyhow::Result<ExitCode> {
    println!("{}", send(addr, kind).await?);
    Ok(ExitCode::SUCCESS)
}

/// `keyraft members list`: one line per member, voters first.
async fn list_members(admin: &AdminAddr) -> anyhow::Result<ExitCode> {
    let mut c = admin_client(admin).await?;
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

/// `keyraft signer import-key`: the key file's seed into the token, then
/// the key opened from the token as `keyraft run` opens it, its address
/// compared with the file's. Blocking.
pub(super) fn import_key(from: &std::path::Path, to: &str) -> anyhow::Result<String> {
    use crate::signer::{key, token};
    if !crate::config::TokenUri::is_uri(to) {
        bail!("--to '{to}' is not a pkcs11: URI");
    }
    let uri = crate::config::TokenUri::parse(to)?;
    uri.check()?;
    let seed = key::read_seed(from)?;
    let file_key = key::ConsensusKey::from_seed(seed);
    let modules = token::Modules::default();
    let module = modules.open(&uri.module)?;
    let public = file_key.public().to_bytes();
    let added = token::import(&uri, &module, &seed, &public)?;
    let token_key = key::ConsensusKey::open_token(&uri, module.clone())?;
    if token_key.address() != file_key.address() {
        bail!(
            "token '{}' answers with key {}, not the file's {}",
            uri.token,
            token_key.address_hex(),
            file_key.address_hex()
        );
    }
    Ok(match added {
        true => format!(
            "imported key {} into {uri}: it signs there; the file can now leave this host",
            file_key.address_hex()
        ),
        false => format!(
            "{uri} holds key {} already: nothing changed",
            file_key.address_hex()
        ),
    })
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

pub(super) async fn status_value(addr: &AdminAddr) -> anyhow::Result<serde_json::Value> {
    let mut c = admin_client(addr).await?;
    let r = c
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow!("{}", s.message()))?;
    Ok(serde_json::from_str(&r.into_inner().json)?)
}

pub(super) async fn client(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Status {
            json,
            all_chains,
            admin,
        } => {
            let v = status_value(&admin).await?;
            if json {
                println!("{v}");
            } else {
                print_table(&v, all_chains);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Switchover { to, admin } => {
            command(&admin, Kind::Switchover(pb::Switchover { to })).await
        }
        Cmd::Pause { admin } => command(&admin, Kind::Pause(true)).await,
        Cmd::Resume { admin } => command(&admin, Kind::Resume(true)).await,
        Cmd::Members { what, admin } => match what {
            MembersCmd::List => list_members(&admin).await,
            MembersCmd::Add { member } => {
                let (id, addr) = member
                    .split_once('=')
                    .and_then(|(i, a)| Some((i.parse::<u64>().ok()?, a.to_string())))
                    .ok_or_else(|| anyhow!("bad member '{member}': want ID=HOST:PORT"))?;
                command(&admin, Kind::MembersAdd(pb::Member { id, addr })).await
            }
            MembersCmd::Remove { id } => command(&admin, Kind::MembersRemove(id)).await,
        },
        Cmd::Signer {
            what:
                SignerCmd::ImportState {
                    file,
                    never_signed,
                    allow_jump,
                    other_key,
                    chain_id,
                },
            admin,
        } => {
            let height = match (&file, never_signed) {
                (Some(f), _) => state_file_height(f)?,
                (None, _) => 0,
            };
            let status = status_value(&admin).await?;
            let ours: Vec<String> = status["signer"]["chains"]
                .as_array()
                .ok_or_else(|| anyhow!("this cluster does not run in signer mode"))?
                .iter()
                .filter_map(|c| c["chain_id"].as_str().map(str::to_string))
                .collect();
            let chain_id = match (chain_id, ours.as_slice()) {
                (Some(c), _) => c,
                (None, [one]) => one.clone(),
                (None, _) => bail!(
                    "this cluster signs for {}: name the chain with --chain-id",
                    ours.join(", ")
                ),
            };
            command(
                &admin,
                Kind::SignerFloor(pb::SignerFloor {
                    chain_id,
                    height,
                    allow_jump,
                    other_key,
                }),
            )
            .await
        }
        Cmd::Check {
            config: Some(file), ..
        } => Ok(preflight(file).await),
        Cmd::Check { admin, .. } => Ok(check(&admin).await),
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
        Cmd::Certs { what } => certs::run(what),
        // Dispatched by `super` (the roll, in `super::rolling`, uses this
        // module's client).
        Cmd::Run(_)
        | Cmd::Version
        | Cmd::Guard { .. }
        | Cmd::FenceProbe
        | Cmd::Upgrade { .. }
        | Cmd::Signer {
            what: SignerCmd::ImportKey { .. },
            ..
        } => Ok(ExitCode::SUCCESS),
    }
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
    // Signer mode's keys, opened as `keyraft run` opens them: one that
    // cannot be is the same one line and exit 2.
    let keys = match cfg.signer.clone() {
        None => Vec::new(),
        Some(s) => {
            match tokio::task::spawn_blocking(move || crate::signer::reload::load_keys(&s)).await {
                Ok(Ok((keys, _))) => keys,
                Ok(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    let mut lines = crate::preflight::signer_keys(&keys);
    lines.extend(crate::preflight::run(&cfg).await);
    for l in &lines {
        println!("{l}");
    }
    if lines
        .iter()
        .any(|l| l.outcome == crate::preflight::Outcome::Fail)
    {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `keyraft check`: one line, and an exit code per failure.
async fn check(addr: &AdminAddr) -> ExitCode {
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
    let chains = v["signer"]["chains"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (code, line) = if v["cluster"]["quorum"] != true {
        (
            3,
            "CRITICAL: no quorum: this member does not see a majority of the voters up and connected".to_string(),
        )
    } else if !chains.is_empty() {
        // Signer mode: nobody validates; the leader signs, for each chain.
        super::chains::check(&v)
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
    // Only once nothing worse is wrong: a member that may validate lacks
    // the binary for a coming upgrade.
    let missing: Vec<String> = nodes
        .iter()
        .filter(|n| n["upgrade"]["installed"] == false && n["upgrade"]["passed"] == false)
        .filter_map(upgrade_note)
        .collect();
    let (code, line) = match (code, missing.as_slice()) {
        (0, [_, ..]) => (9, format!("WARNING: {}", missing.join("; "))),
        _ => (code, line),
    };
    println!("{line}");
    ExitCode::from(code)
}

fn print_table(v: &serde_json::Value, all_chains: bool) {
    let c = &v["cluster"];
    println!(
        "leader {}  term {}  active validator {}  quorum {}  paused {}",
        or_dash(&c["leader"]),
        c["term"],
        or_dash(&c["active_validator"]),
        if c["quorum"] == true { "yes" } else { "NO" },
        if c["paused"] == true { "YES" } else { "no" }
    );
    for line in super::chains::lines(v, all_chains) {
        println!("{line}");
    }
    print_nodes(v);
    print_notes(v);
}

/// A member's upgrade it has not passed: name, height, blocks left and
/// whether it has the binary (`None` without one, or once passed).
fn upgrade_note(n: &serde_json::Value) -> Option<String> {
    let u = &n["upgrade"];
    if u.is_null() || u["passed"] == true {
        return None;
    }
    let left = match u["blocks_left"].as_u64() {
        Some(b) => format!("{b} blocks left"),
        None => "height unknown here".to_string(),
    };
    let binary = match (u["applied"] == true, u["installed"] == true) {
        (true, _) => "running it",
        (false, true) => "binary installed",
        (false, false) => "BINARY MISSING (cosmovisor add-upgrade)",
    };
    let halted = if u["halted"] == true { ", halted" } else { "" };
    Some(format!(
        "node {} upgrade {} at height {} ({left}{halted}): {binary}",
        n["id"],
        u["name"].as_str().unwrap_or("?"),
        u["height"]
    ))
}

/// The members' table.
fn print_nodes(v: &serde_json::Value) {
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
        // Signer mode: a voting validator host signs or forwards.
        let state = match (n["state"].as_str(), n["signer_role"].as_str()) {
            (Some("Voting"), Some("signing")) => "Signing",
            (Some("Voting"), Some("forwarding")) => "Forwarding",
            (s, _) => s.unwrap_or("-"),
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
            state,
            n["raft"].as_str().unwrap_or("-"),
            if n["key_linked"] == true { "yes" } else { "-" },
            validator,
            seen
        );
    }
}

/// What the operator should act on, per member: a certificate near its
/// end, a stopped Raft core, probe failures, fence agents, refusals.
fn print_notes(v: &serde_json::Value) {
    for n in v["nodes"].as_array().into_iter().flatten() {
        if let Some(line) = upgrade_note(n) {
            println!("{line}");
        }
        if let Some(days) = n["tls_cert"]["expires_in_days"]
            .as_i64()
            .filter(|d| *d < 30)
        {
            println!(
                "node {} certificate expires in {days} days ({}): renew it (keyraft certs renew) and send keyraft SIGHUP",
                n["id"],
                n["tls_cert"]["not_after"].as_str().unwrap_or("?")
            );
        }
        if let Some(e) = n["raft_error"].as_str() {
            println!(
                "node {} Raft core stopped: {e} (keyraft exits with code 8 for its process manager to restart it)",
                n["id"]
            );
        }
        if let Some(e) = n["probe_error"].as_str() {
            println!("node {} validator probe: {e}", n["id"]);
        }
        if n["last_seen_ms"] == 0 {
            for chain in v["signer"]["chains"].as_array().into_iter().flatten() {
                if let Some(e) = chain["node_probe_error"].as_str() {
                    let id = chain["chain_id"].as_str().unwrap_or("?");
                    println!("node {} chain {id}'s node probe: {e}", n["id"]);
                }
            }
        }
        for (peer, agent) in n["fence_agents"].as_object().into_iter().flatten() {
            if let Some(last) = agent["last"].as_str() {
                println!("node {} fence agent for node {peer}: {last}", n["id"]);
            }
        }
        for (by, why) in n["remembered"]["refused_by"]
            .as_object()
            .into_iter()
            .flatten()
        {
            println!(
                "node {} REFUSED by node {by}: {} (move its data dir away, start it with --rejoin)",
                n["id"],
                why.as_str().unwrap_or("?")
            );
        }
    }
}
