//! `localnet up` and the commands that poke a running localnet from another
//! terminal (`status`, `kill`, `pause`, `resume`, `partition`, `heal`,
//! `start`).
//!
//! Owns: the launcher process, which holds the cluster (its processes and
//! fault proxies), writes `DIR/localnet.json`, serves a small control API on
//! loopback for the other commands, and draws the live view. Must not: leave
//! a process behind; Ctrl-C or SIGTERM stops everything it started.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::cluster::{Cluster, ClusterDir, Mode, NodeOpts};
use crate::harness::{free_addr, get_json, ChainClient};
use crate::proxy::Latency;

/// What `localnet up` writes for the other commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalnetFile {
    pub launcher_pid: u32,
    pub control: SocketAddr,
    pub chain: String,
    /// Signer mode with `--chains`: every chain after the first, as
    /// (chain id, judge URL).
    #[serde(default)]
    pub more_chains: Vec<(String, String)>,
    pub block_ms: u64,
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub witness: bool,
    pub peer: SocketAddr,
    /// The coordinator's admin socket.
    pub admin: PathBuf,
    pub http: SocketAddr,
    pub rpc: SocketAddr,
}

/// Fault flags the launcher tracks per node, for the view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Faults {
    pub killed: bool,
    pub paused: Option<String>,
    pub partitioned: bool,
}

pub struct UpOptions {
    pub dir: PathBuf,
    pub nodes: u64,
    pub witness: bool,
    pub block_ms: u64,
    /// CometBFT signer mode: every keyraft signs for its own sentry.
    pub cometbft: bool,
    /// Signer mode: sentries per host (the first supervised by keyraft).
    pub sentries: u64,
    /// Signer mode: chains the cluster signs for, each with its own judge.
    pub chains: u64,
    /// One-way delay on every peer link, each direction.
    pub latency: Latency,
    /// keyraft's `--timing` profile, if not its default.
    pub timing: Option<String>,
    /// Signer mode: the privval protocol of the sentries (and keyraft's
    /// `--protocol-version`).
    pub protocol: crate::comet::node::Protocol,
}

/// The default dir, shared by `up` and the other commands.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("keyraft-localnet")
}

fn info_path(dir: &Path) -> PathBuf {
    dir.join("localnet.json")
}

fn read_info(dir: &Path) -> Result<LocalnetFile> {
    let path = info_path(dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no localnet running in {} (start one with `localnet up`)",
            dir.display()
        )
    })?;
    Ok(serde_json::from_str(&text)?)
}

struct Launcher {
    cluster: Mutex<Cluster>,
    faults: Mutex<BTreeMap<u64, Faults>>,
}

/// `localnet up`: runs until Ctrl-C or SIGTERM.
pub async fn up(opts: UpOptions) -> Result<()> {
    if !(2..=5).contains(&opts.nodes) {
        bail!("--nodes must be 2 to 5");
    }
    if !(1..=5).contains(&opts.sentries) || (opts.sentries > 1 && !opts.cometbft) {
        bail!("--sentries must be 1 to 5, and only with --cometbft");
    }
    if !(1..=5).contains(&opts.chains) || (opts.chains > 1 && !opts.cometbft) {
        bail!("--chains must be 1 to 5, and only with --cometbft");
    }
    let v1 = opts.protocol == crate::comet::node::Protocol::V1;
    if v1 && (!opts.cometbft || opts.chains > 1 || opts.sentries > 1) {
        bail!("--protocol v1 runs with --cometbft, one chain and one sentry per host");
    }
    if opts.protocol == crate::comet::node::Protocol::V0_34 {
        bail!("--protocol is v0.38 or v1");
    }
    if let Ok(old) = read_info(&opts.dir) {
        if Path::new(&format!("/proc/{}", old.launcher_pid)).exists() {
            bail!(
                "a localnet is already running from {} (pid {}); stop it with Ctrl-C there, or use another --dir",
                opts.dir.display(),
                old.launcher_pid
            );
        }
    }
    if opts.dir.exists() {
        std::fs::remove_dir_all(&opts.dir)
            .with_context(|| format!("cannot clear {}", opts.dir.display()))?;
    }
    let witness = opts.witness.then_some(opts.nodes);
    println!(
        "starting fakechain and {} coordinators in {} ...",
        opts.nodes,
        opts.dir.display()
    );
    let mode = if opts.cometbft {
        Mode::Signer {
            chain_id: "localnet-1".into(),
            round_every: 10,
            validators: 4,
            more_chains: opts.chains - 1,
            halt: None,
        }
    } else {
        Mode::Near
    };
    let cluster = Cluster::start_in_mode(
        ClusterDir::Kept(opts.dir.clone()),
        opts.nodes,
        opts.block_ms,
        mode,
        |id| NodeOpts {
            witness: witness == Some(id),
            extra_sentries: opts.sentries.saturating_sub(1),
            flags: opts
                .timing
                .iter()
                .flat_map(|t| ["--timing".to_string(), t.clone()])
                .chain(crate::shape::protocol_flags(v1))
                .collect(),
            fakenode: crate::shape::sentry_protocol(v1),
            ..NodeOpts::default()
        },
    )
    .await?;
    cluster.set_latency(opts.latency);
    if opts.cometbft {
        cluster.never_signed().await?;
    }
    let info = LocalnetFile {
        launcher_pid: std::process::id(),
        control: free_addr()?,
        chain: cluster.chain.url.clone(),
        more_chains: cluster
            .others
            .iter()
            .map(|o| (o.chain_id.clone(), o.chain.url.clone()))
            .collect(),
        block_ms: opts.block_ms,
        nodes: cluster
            .nodes
            .values()
            .map(|n| NodeInfo {
                id: n.id,
                witness: n.opts.witness,
                peer: n.listen,
                admin: n.admin.clone(),
                http: n.http,
                rpc: n.rpc,
            })
            .collect(),
    };
    std::fs::write(info_path(&opts.dir), serde_json::to_vec_pretty(&info)?)?;
    let launcher = Arc::new(Launcher {
        cluster: Mutex::new(cluster),
        faults: Mutex::new(
            info.nodes
                .iter()
                .map(|n| (n.id, Faults::default()))
                .collect(),
        ),
    });
    let listener = tokio::net::TcpListener::bind(info.control).await?;
    let app = Router::new()
        .route("/partition/{id}", post(partition))
        .route("/heal", post(heal))
        .route("/kill/{id}", post(kill))
        .route("/pause/{id}", post(pause))
        .route("/resume/{id}", post(resume))
        .route("/start/{id}", post(start))
        .route("/faults", get(faults))
        .with_state(launcher.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let result = view_loop(&info, &launcher).await;
    server.abort();
    // Resume anything paused so that the kills land, then drop the cluster.
    let mut cluster = launcher.cluster.lock().await;
    for id in info.nodes.iter().map(|n| n.id) {
        let _ = cluster.freeze(id, true, false);
        let _ = cluster.forget(id);
    }
    let _ = std::fs::remove_file(info_path(&opts.dir));
    println!("\nstopped; logs and data are in {}", opts.dir.display());
    result
}

async fn view_loop(info: &LocalnetFile, launcher: &Launcher) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut drawn = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(if tty { 500 } else { 5000 }));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => {
                let faults = launcher.faults.lock().await.clone();
                let lines = render(info, &faults).await;
                let mut out = std::io::stdout().lock();
                if tty && drawn > 0 {
                    // Back to the top of the last frame, then overwrite it.
                    write!(out, "\x1b[{drawn}A")?;
                }
                for l in &lines {
                    writeln!(out, "\x1b[2K{l}")?;
                }
                out.flush()?;
                drawn = lines.len();
            }
        }
    }
}

/// The view: each chain's verdict, then one line per node.
pub async fn render(info: &LocalnetFile, faults: &BTreeMap<u64, Faults>) -> Vec<String> {
    let mut lines = Vec::new();
    let chains = std::iter::once(("chain".to_string(), info.chain.clone()))
        .chain(info.more_chains.iter().cloned());
    for (name, url) in chains {
        let chain = ChainClient::new(&url);
        let since = chain
            .totals()
            .await
            .map(|s| s.height.saturating_sub(4))
            .unwrap_or(0);
        match chain.stats_since(since).await {
            Ok(s) => {
                let signer = s
                    .signers
                    .last()
                    .map_or("-".to_string(), |x| format!("node {}", x.node));
                lines.push(format!(
                    "{name} height {:>6}  signer {:<7}  signed {:>6}  missed {:>4}  double signs {}",
                    s.height, signer, s.signed, s.missed, s.double_signs
                ));
            }
            Err(e) => lines.push(format!("{name} unreachable: {e}")),
        }
    }
    lines.push(format!(
        "{:<5} {:<10} {:<12} {:<10} {:<4} {:>8} {:<7} FAULT",
        "NODE", "ROLE", "STATE", "RAFT", "KEY", "HEIGHT", "SYNCED"
    ));
    for n in &info.nodes {
        let f = faults.get(&n.id).cloned().unwrap_or_default();
        let fault = match (f.killed, f.paused, f.partitioned) {
            (true, _, _) => "killed".to_string(),
            (_, Some(what), true) => format!("paused ({what}), partitioned"),
            (_, Some(what), false) => format!("paused ({what})"),
            (_, None, true) => "partitioned".to_string(),
            _ => "-".to_string(),
        };
        let me = get_json(&format!("http://{}/status", n.http))
            .await
            .ok()
            .and_then(|v| {
                v["nodes"]
                    .as_array()
                    .and_then(|ns| ns.iter().find(|x| x["id"] == n.id))
                    .cloned()
            });
        let role = if n.witness { "witness" } else { "validator" };
        let line = match me {
            Some(me) => {
                let val = &me["validator"];
                let height = val["height"]
                    .as_u64()
                    .map_or("-".to_string(), |h| h.to_string());
                let synced = match val["synced"].as_bool() {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                };
                // Signer mode: which host signs and which forward.
                let state = match me["signer_role"].as_str() {
                    Some("signing") => "Signing",
                    Some("forwarding") => "Forwarding",
                    _ => me["state"].as_str().unwrap_or("?"),
                };
                format!(
                    "{:<5} {:<10} {:<12} {:<10} {:<4} {:>8} {:<7} {fault}",
                    n.id,
                    role,
                    state,
                    me["raft"].as_str().unwrap_or("?"),
                    if me["key_linked"] == true { "yes" } else { "-" },
                    height,
                    synced
                )
            }
            None => format!(
                "{:<5} {:<10} {:<12} {:<10} {:<4} {:>8} {:<7} {fault}",
                n.id, role, "(no answer)", "-", "-", "-", "-"
            ),
        };
        lines.push(line);
    }
    lines.push("break it from another terminal: localnet kill|pause|resume|partition|start N, localnet heal".to_string());
    lines
}

#[derive(Deserialize)]
struct What {
    what: Option<String>,
    host: Option<bool>,
}

type Reply = (StatusCode, String);

fn fail(e: anyhow::Error) -> Reply {
    (StatusCode::BAD_REQUEST, format!("{e:#}"))
}

async fn check_id(l: &Launcher, id: u64) -> Result<(), Reply> {
    if l.faults.lock().await.contains_key(&id) {
        Ok(())
    } else {
        Err((StatusCode::NOT_FOUND, format!("no node {id}")))
    }
}

async fn partition(
    State(l): State<Arc<Launcher>>,
    UrlPath(id): UrlPath<u64>,
) -> Result<String, Reply> {
    check_id(&l, id).await?;
    l.cluster.lock().await.isolate(id);
    if let Some(f) = l.faults.lock().await.get_mut(&id) {
        f.partitioned = true;
    }
    Ok(format!("node {id} cut off from its peers (blackholed)"))
}

async fn heal(State(l): State<Arc<Launcher>>) -> String {
    l.cluster.lock().await.heal();
    for f in l.faults.lock().await.values_mut() {
        f.partitioned = false;
    }
    "all links healed".to_string()
}

async fn kill(
    State(l): State<Arc<Launcher>>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<What>,
) -> Result<String, Reply> {
    check_id(&l, id).await?;
    let mut c = l.cluster.lock().await;
    match q.what.as_deref().unwrap_or("host") {
        "host" => {
            c.kill_host(id).map_err(fail)?;
            set_killed(&l, id, true).await;
            Ok(format!("host {id} killed (coordinator, guard and validator); `localnet start {id}` brings it back"))
        }
        "coordinator" => {
            c.kill_coordinator(id).map_err(fail)?;
            c.forget(id).map_err(fail)?;
            set_killed(&l, id, true).await;
            Ok(format!("coordinator {id} killed; its guard kills its validator; `localnet start {id}` brings it back"))
        }
        "validator" => {
            c.kill_validator(id).map_err(fail)?;
            Ok(format!(
                "validator of node {id} killed; its coordinator restarts it"
            ))
        }
        other => Err((StatusCode::BAD_REQUEST, format!("kill what? {other}"))),
    }
}

async fn set_killed(l: &Launcher, id: u64, killed: bool) {
    if let Some(f) = l.faults.lock().await.get_mut(&id) {
        f.killed = killed;
        f.paused = None;
    }
}

async fn pause(
    State(l): State<Arc<Launcher>>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<What>,
) -> Result<String, Reply> {
    check_id(&l, id).await?;
    let host = q.host.unwrap_or(false);
    l.cluster
        .lock()
        .await
        .freeze(id, host, true)
        .map_err(fail)?;
    if let Some(f) = l.faults.lock().await.get_mut(&id) {
        f.paused = Some(if host { "host" } else { "coordinator" }.to_string());
    }
    Ok(format!(
        "{} {id} paused (SIGSTOP)",
        if host { "host" } else { "coordinator" }
    ))
}

async fn resume(
    State(l): State<Arc<Launcher>>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<What>,
) -> Result<String, Reply> {
    check_id(&l, id).await?;
    let host = q.host.unwrap_or(true);
    l.cluster
        .lock()
        .await
        .freeze(id, host, false)
        .map_err(fail)?;
    if let Some(f) = l.faults.lock().await.get_mut(&id) {
        f.paused = None;
    }
    Ok(format!("node {id} resumed (SIGCONT)"))
}

async fn start(State(l): State<Arc<Launcher>>, UrlPath(id): UrlPath<u64>) -> Result<String, Reply> {
    check_id(&l, id).await?;
    let mut c = l.cluster.lock().await;
    if c.running(id) {
        return Err((StatusCode::CONFLICT, format!("coordinator {id} is running")));
    }
    c.spawn(id).map_err(fail)?;
    drop(c);
    set_killed(&l, id, false).await;
    Ok(format!("coordinator {id} started"))
}

async fn faults(State(l): State<Arc<Launcher>>) -> axum::Json<BTreeMap<u64, Faults>> {
    axum::Json(l.faults.lock().await.clone())
}

/// A command for a running launcher, e.g. `kill/2?what=validator`.
pub async fn control(dir: &Path, path: &str) -> Result<()> {
    let info = read_info(dir)?;
    let url = format!("http://{}/{path}", info.control);
    let resp = reqwest::Client::new()
        .post(&url)
        .send()
        .await
        .map_err(|e| anyhow!("the localnet in {} does not answer: {e}", dir.display()))?;
    let ok = resp.status().is_success();
    let text = resp.text().await.unwrap_or_default();
    if !ok {
        bail!("{text}");
    }
    println!("{text}");
    Ok(())
}

/// `localnet status`: the view, once.
pub async fn status(dir: &Path) -> Result<()> {
    let info = read_info(dir)?;
    let faults: BTreeMap<u64, Faults> = reqwest::get(format!("http://{}/faults", info.control))
        .await?
        .json()
        .await
        .unwrap_or_default();
    for l in render(&info, &faults).await {
        println!("{l}");
    }
    Ok(())
}
