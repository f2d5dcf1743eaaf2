//! fakenode: a validator node that imitates neard closely enough to exercise
//! keyraft's NEAR support for real.
//!
//! Owns: its home dir's `validator_key.json` / `node_key.json` (read, never
//! written), following the chain head, signing each new height once while it
//! holds a key and is synced, and a neard-shaped `GET /status`. At a chain
//! upgrade it behaves as a Cosmos node does ([`crate::upgrade`]): a node of
//! an older version halts at the upgrade's height (it writes
//! `data/upgrade-info.json` and exits non-zero), and the new version runs
//! its migration (reporting syncing) before it signs. Must not: know
//! anything about keyraft; it behaves like a node an operator runs, including
//! a slow SIGTERM and a key that is only re-read on SIGHUP with `--hot-reload`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use ed25519_dalek::SigningKey;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::keys::{self, KeyFile};
use crate::upgrade::{self, Plan, Upgrade, UpgradeInfo, Verdict};
use crate::wire::{SignReply, SignRequest};

pub const VALIDATOR_KEY: &str = "validator_key.json";
pub const NODE_KEY: &str = "node_key.json";
/// A node that has not heard from the chain for this long reports syncing.
const CONTACT_STALE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub home: PathBuf,
    pub chain: String,
    pub node_id: u64,
    pub rpc_listen: SocketAddr,
    pub sync_delay: Duration,
    pub shutdown_delay: Duration,
    pub hot_reload: bool,
    /// The chain software version this node runs: `genesis` or the name of
    /// an upgrade in the chain's plan.
    pub version: String,
    /// How long this version's migration takes, the first time it runs in
    /// this home (it reports syncing meanwhile).
    pub migration: Duration,
}

/// Why a node stopped on its own, as a Cosmos node does at an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    #[error("UPGRADE \"{}\" NEEDED at height: {}: {}", .0.name, .0.height, .0.info)]
    UpgradeNeeded(UpgradeInfo),
    #[error("BINARY UPDATED BEFORE TRIGGER! UPGRADE \"{}\" - in binary but not executed on chain (height {})", .0.name, .0.height)]
    Early(Upgrade),
    #[error("version {0:?} is not in the chain's upgrade plan")]
    UnknownVersion(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

struct ValidatorKey {
    account_id: String,
    public_key: String,
    signing: SigningKey,
}

struct NodeState {
    validator: Option<ValidatorKey>,
    node_key: Option<String>,
    head: u64,
    last_contact: Option<Instant>,
    last_signed: u64,
    started: Instant,
    sync_delay: Duration,
    /// Until when this version's migration runs.
    migrating_until: Option<Instant>,
    /// The chain's upgrade plan, as last heard.
    plan: Plan,
}

impl NodeState {
    fn syncing(&self) -> bool {
        self.started.elapsed() < self.sync_delay
            || self.migrating_until.is_some_and(|t| Instant::now() < t)
            || self
                .last_contact
                .is_none_or(|t| t.elapsed() > CONTACT_STALE)
    }
}

struct Node {
    cfg: NodeConfig,
    state: Mutex<NodeState>,
    http: reqwest::Client,
}

impl Node {
    fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (Re)reads the key files, as neard does at start and on SIGHUP.
    fn load_keys(&self) -> Result<(), keys::KeyError> {
        let validator = read_optional(&self.cfg.home.join(VALIDATOR_KEY))?
            .map(|f| -> Result<ValidatorKey, keys::KeyError> {
                Ok(ValidatorKey {
                    signing: f.signing_key()?,
                    account_id: f.account_id,
                    public_key: f.public_key,
                })
            })
            .transpose()?;
        let node_key = read_optional(&self.cfg.home.join(NODE_KEY))?.map(|f| f.public_key);
        match &validator {
            Some(v) => {
                tracing::info!(account = %v.account_id, key = %v.public_key, "validator key loaded")
            }
            None => tracing::info!("no validator key: running as a plain node"),
        }
        let mut st = self.state();
        st.validator = validator;
        st.node_key = node_key;
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<KeyFile>, keys::KeyError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => KeyFile::load(path).map(Some),
    }
}

/// Runs the node until SIGTERM/SIGINT (plus the shutdown delay).
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let node = Arc::new(Node {
        state: Mutex::new(NodeState {
            validator: None,
            node_key: None,
            head: 0,
            last_contact: None,
            last_signed: 0,
            started: Instant::now(),
            sync_delay: cfg.sync_delay,
            migrating_until: None,
            plan: Plan::default(),
        }),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?,
        cfg,
    });
    node.load_keys()?;
    let listener = tokio::net::TcpListener::bind(node.cfg.rpc_listen).await?;
    tracing::info!(rpc = %listener.local_addr()?, node = node.cfg.node_id, "fakenode started");
    let app = Router::new()
        .route("/status", get(status))
        .route("/cosmos/upgrade/v1beta1/current_plan", get(current_plan))
        .with_state(node.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("rpc server failed: {e}");
        }
    });
    migrate(&node)?;
    let follower = tokio::spawn(follow(node.clone()));
    tokio::select! {
        stopped = signals(node) => stopped,
        halted = follower => match halted {
            Ok(halt) => {
                tracing::error!("{halt}");
                Err(halt.into())
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// The marker a finished migration leaves in the home, so that a restart
/// of the same version does not migrate again.
fn migrated_marker(node: &Node) -> PathBuf {
    node.cfg
        .home
        .join(format!("data/migrated-{}", node.cfg.version))
}

/// Starts this version's migration if it has not run in this home: the
/// node reports syncing until it is done, then leaves its marker.
fn migrate(node: &Arc<Node>) -> Result<(), Halt> {
    let marker = migrated_marker(node);
    if node.cfg.version == upgrade::GENESIS || marker.exists() {
        return Ok(());
    }
    let until = Instant::now() + node.cfg.migration;
    node.state().migrating_until = Some(until);
    tracing::info!(
        version = %node.cfg.version,
        ms = node.cfg.migration.as_millis() as u64,
        "running the upgrade's migration"
    );
    let node = node.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        match write_durably(&marker, b"") {
            Ok(()) => tracing::info!(version = %node.cfg.version, "migration done"),
            Err(e) => tracing::error!("{e}"),
        }
    });
    Ok(())
}

/// Writes `bytes` to `path` (its directory made), fsynced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Halt> {
    let failed = |source| Halt::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let mut f = std::fs::File::create(path).map_err(failed)?;
    std::io::Write::write_all(&mut f, bytes).map_err(failed)?;
    f.sync_all().map_err(failed)
}

/// What the chain's plan says this node must do at `head`: run, or stop
/// (an upgrade's halt writes `data/upgrade-info.json` first).
fn upgrade_verdict(node: &Node, plan: &Plan, head: u64) -> Result<(), Halt> {
    match plan.verdict(&node.cfg.version, head) {
        Verdict::Run => Ok(()),
        Verdict::Halt(up) => {
            let info = UpgradeInfo::from(&up);
            let json = serde_json::to_vec(&info).unwrap_or_default();
            write_durably(&node.cfg.home.join(upgrade::INFO_FILE), &json)?;
            Err(Halt::UpgradeNeeded(info))
        }
        Verdict::Early(up) => Err(Halt::Early(up)),
        Verdict::Unknown => Err(Halt::UnknownVersion(node.cfg.version.clone())),
    }
}

async fn signals(node: Arc<Node>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if !node.cfg.hot_reload {
                    tracing::info!("SIGHUP ignored (started without --hot-reload)");
                } else if let Err(e) = node.load_keys() {
                    tracing::error!("reload failed, signing stopped: {e}");
                    node.state().validator = None;
                } else {
                    let node = node.clone();
                    tokio::spawn(async move { sign_head(&node).await });
                }
            }
        }
    }
    tracing::info!(
        delay_ms = node.cfg.shutdown_delay.as_millis() as u64,
        "shutting down"
    );
    // Like a slow real node, keep running (and signing) through the delay.
    tokio::time::sleep(node.cfg.shutdown_delay).await;
    tracing::info!("stopped");
    Ok(())
}

/// Follows the chain head and signs it, until the chain's upgrade plan
/// stops this node (returned).
async fn follow(node: Arc<Node>) -> Halt {
    let mut reachable = true;
    loop {
        let head = node.state().head;
        let url = format!("{}/status?wait_after={head}", node.cfg.chain);
        let got = async {
            let v: serde_json::Value = node
                .http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let plan: Plan = serde_json::from_value(v["upgrades"].clone()).unwrap_or_default();
            Ok::<_, reqwest::Error>((v["height"].as_u64().unwrap_or(0), plan))
        }
        .await;
        let height = match got {
            Ok((h, plan)) => {
                if let Err(halt) = upgrade_verdict(&node, &plan, h) {
                    return halt;
                }
                node.state().plan = plan;
                h
            }
            Err(e) => {
                if reachable {
                    tracing::warn!("chain unreachable, retrying: {e}");
                    reachable = false;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if !reachable {
            tracing::info!("chain reachable again");
            reachable = true;
        }
        {
            let mut st = node.state();
            st.head = height;
            st.last_contact = Some(Instant::now());
        }
        sign_head(&node).await;
    }
}

/// Signs the head it knows, once, if it holds a key and is synced: on each
/// new height, and right after a key is loaded on SIGHUP (a validator handed
/// its key mid-height can still sign that height).
async fn sign_head(node: &Node) {
    let request = {
        let mut st = node.state();
        let height = st.head;
        let due = !st.syncing() && height > st.last_signed;
        let req = st.validator.as_ref().filter(|_| due).map(|v| SignRequest {
            height,
            public_key: v.public_key.clone(),
            node: node.cfg.node_id,
            signature: keys::sign_height(&v.signing, height),
            version: Some(node.cfg.version.clone()),
        });
        if req.is_some() {
            st.last_signed = height;
        }
        req
    };
    if let Some(req) = request {
        submit(node, &req).await;
    }
}

async fn submit(node: &Node, req: &SignRequest) {
    let url = format!("{}/sign", node.cfg.chain);
    match node.http.post(&url).json(req).send().await {
        Ok(resp) => {
            let code = resp.status();
            match resp.json::<SignReply>().await {
                Ok(r) if r.accepted => {}
                Ok(r) => {
                    tracing::warn!(height = req.height, %code, "signature refused: {}", r.error.unwrap_or_default())
                }
                Err(e) => tracing::warn!(height = req.height, %code, "bad reply to sign: {e}"),
            }
        }
        Err(e) => tracing::warn!(height = req.height, "sign failed: {e}"),
    }
}

/// The Cosmos SDK's `GET /cosmos/upgrade/v1beta1/current_plan`: the
/// upgrade this node's version waits for (heights as strings, as the SDK's
/// REST gateway writes them), `{"plan": null}` when none.
async fn current_plan(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let st = node.state();
    let plan = st.plan.next_after(&node.cfg.version).map(|u| {
        json!({
            "name": u.name,
            "time": "0001-01-01T00:00:00Z",
            "height": u.height.to_string(),
            "info": "",
            "upgraded_client_state": null,
        })
    });
    Json(json!({ "plan": plan }))
}

async fn status(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let st = node.state();
    Json(json!({
        "chain_id": "localnet",
        "protocol_version": 73,
        "latest_protocol_version": 73,
        "version": {
            "version": env!("CARGO_PKG_VERSION"),
            "build": "fakenode",
            "rustc_version": "",
        },
        "node_public_key": st.node_key,
        "validator_account_id": st.validator.as_ref().map(|v| v.account_id.clone()),
        "validator_public_key": st.validator.as_ref().map(|v| v.public_key.clone()),
        // Deprecated in neard and equal to validator_public_key there.
        "node_key": st.validator.as_ref().map(|v| v.public_key.clone()),
        "validators": [],
        "sync_info": {
            "latest_block_height": st.head,
            "latest_block_hash": format!("fake{:060}", st.head),
            "syncing": st.syncing(),
            "earliest_block_height": 1,
        },
        "uptime_sec": st.started.elapsed().as_secs(),
    }))
}
