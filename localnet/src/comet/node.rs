//! `fakenode --cometbft`: a CometBFT node as its remote signer sees it.
//!
//! Owns: following the chain's open (height, round), asking the signer for
//! a proposal on its turn, a prevote and a precommit (with a vote extension
//! under protocol 0.38), submitting what comes back to the chain, and a
//! CometBFT-shaped `GET /status` plus `GET /privval` with what it saw of its
//! signer. Must not: hold a key (it has none), retry a `RemoteSignerError`
//! (CometBFT gives up on that step), or keep signing a round the chain has
//! left.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use cometbft_proto::v0_38::types::{Proposal as RawProposal, Vote as RawVote};
use prost::Message as _;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use super::consensus::{self, Step};
use super::key::PublicValidatorKey;
use super::ledger::Announce;
use super::privval::{CallError, Endpoint};
use super::socket::Listen;
use crate::wire::SignReply;
pub use crate::wire::Submission;

/// Pause between sign attempts after a connection error (CometBFT's
/// `RetrySignerClient` waits 100 ms).
const SIGN_RETRY: Duration = Duration::from_millis(100);
/// Longest wait for a signer to connect per attempt (CometBFT's accept
/// timeout is 3 s; a round is usually shorter).
const ACCEPT_WAIT: Duration = Duration::from_secs(3);
const CHAIN_RETRY: Duration = Duration::from_millis(200);
/// A node that has not heard from the chain for this long is catching up.
const CONTACT_STALE: Duration = Duration::from_secs(3);

/// Which CometBFT the node imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// 0.34: no vote extensions.
    #[value(name = "v0.34")]
    V0_34,
    /// 0.37 and 0.38: non-nil precommits carry a vote extension to sign.
    #[value(name = "v0.38")]
    V0_38,
    /// 1.x: `cometbft.privval.v1`; extensions as 0.38 unless skipped
    /// (`skip_extensions`), and raw bytes (`sign_bytes`).
    #[value(name = "v1")]
    V1,
}

#[derive(Debug, Clone)]
pub struct CometNodeConfig {
    pub chain: String,
    pub node_id: u64,
    pub rpc_listen: SocketAddr,
    pub privval: Listen,
    /// Chain id to put in requests; the chain's own when `None`.
    pub chain_id: Option<String>,
    pub protocol: Protocol,
    pub equivocate: bool,
    /// The privval listener's SecretConnection seed (`None`: fresh per start).
    pub privval_identity: Option<[u8; 32]>,
    /// 1.x: set `skip_extension_signing` (extensions off on the chain).
    pub skip_extensions: bool,
    /// 1.x: with each precommit, ask the signer to sign raw bytes of the
    /// application, and bytes that are a conflicting precommit's sign
    /// bytes (which must be refused).
    pub sign_bytes: bool,
    /// The chain upgrades from 0.38 to 1.x at this height: the node halts
    /// there (writing `data/upgrade-info.json` under `home`, exit code 1)
    /// and, started again, speaks v1.
    pub v1_after: Option<u64>,
    /// The node's home (for the upgrade's marker).
    pub home: Option<std::path::PathBuf>,
    /// After the upgrade: its migration's length, the first time it runs
    /// (the node catches up, and signs nothing, meanwhile).
    pub migration: Duration,
    /// After the upgrade: the new binary cannot start.
    pub crash_after_upgrade: bool,
}

/// The upgrade marker a node halted at, under `home`.
fn upgrade_marker(home: &std::path::Path) -> std::path::PathBuf {
    home.join("data").join("upgrade-info.json")
}

#[derive(Default)]
struct NodeState {
    head: u64,
    last_contact: Option<Instant>,
    validator: Option<PublicValidatorKey>,
    chain_id: String,
    /// Until when the upgrade's migration runs.
    migrating_until: Option<Instant>,
}

impl NodeState {
    fn migrating(&self) -> bool {
        self.migrating_until.is_some_and(|t| Instant::now() < t)
    }
}

struct Node {
    cfg: CometNodeConfig,
    endpoint: Arc<Endpoint>,
    http: reqwest::Client,
    state: Mutex<NodeState>,
}

impl Node {
    fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the node until SIGTERM/SIGINT.
pub async fn run(mut cfg: CometNodeConfig) -> anyhow::Result<()> {
    let mut migrating_until = None;
    if let (Some(_), Some(home)) = (cfg.v1_after, &cfg.home) {
        if upgrade_marker(home).exists() {
            if cfg.crash_after_upgrade {
                anyhow::bail!("panic: the upgraded binary cannot start");
            }
            tracing::info!("upgraded: this start speaks CometBFT 1.x's privval");
            cfg.protocol = Protocol::V1;
            cfg.v1_after = None;
            let migrated = home.join("data").join("migrated-v1");
            if !migrated.exists() {
                tracing::info!(
                    ms = cfg.migration.as_millis() as u64,
                    "running the upgrade's migration"
                );
                migrating_until = Some(Instant::now() + cfg.migration);
                std::fs::write(&migrated, b"")?;
            }
        }
    }
    let endpoint = Endpoint::bind(
        &cfg.privval,
        cfg.privval_identity,
        cfg.protocol == Protocol::V1,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(cfg.rpc_listen).await?;
    tracing::info!(rpc = %listener.local_addr()?, node = cfg.node_id, protocol = ?cfg.protocol,
        equivocate = cfg.equivocate, "fakenode (CometBFT) started");
    let node = Arc::new(Node {
        cfg,
        endpoint,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?,
        state: Mutex::new(NodeState {
            migrating_until,
            ..NodeState::default()
        }),
    });
    let app = Router::new()
        .route("/status", get(status))
        .route("/privval", get(privval))
        .route("/cosmos/upgrade/v1beta1/current_plan", get(current_plan))
        .with_state(node.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("rpc server failed: {e}");
        }
    });
    let pinger = node.endpoint.clone();
    tokio::spawn(async move { pinger.keep_pinging().await });
    let (halt_tx, mut halt) = tokio::sync::mpsc::channel(1);
    tokio::spawn(follow(node, halt_tx));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        Some(e) = halt.recv() => return Err(e),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Follows the chain's open round and takes part in each one once.
async fn follow(node: Arc<Node>, halt: tokio::sync::mpsc::Sender<anyhow::Error>) {
    let mut last = (0u64, 0u32);
    let mut reachable = true;
    loop {
        let url = format!(
            "{}/status?wait_after={}&wait_round={}",
            node.cfg.chain, last.0, last.1
        );
        let got = async {
            node.http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json::<Announce>()
                .await
        }
        .await;
        let a = match got {
            Ok(a) => a,
            Err(e) => {
                if reachable {
                    tracing::warn!("chain unreachable, retrying: {e}");
                    reachable = false;
                }
                tokio::time::sleep(CHAIN_RETRY).await;
                continue;
            }
        };
        if !reachable {
            tracing::info!("chain reachable again");
            reachable = true;
        }
        {
            let mut st = node.state();
            st.head = a.height;
            st.last_contact = Some(Instant::now());
            st.chain_id = node.cfg.chain_id.clone().unwrap_or(a.chain_id.clone());
        }
        if (a.height, a.round) <= last {
            continue;
        }
        if let Some(h) = node.cfg.v1_after.filter(|h| a.height > *h) {
            let _ = halt.send(upgrade_halt(&node.cfg, h)).await;
            return;
        }
        if node.state().migrating() {
            // Takes part in the round open when the migration is done.
            tokio::time::sleep(CHAIN_RETRY).await;
            continue;
        }
        last = (a.height, a.round);
        take_part(&node, &a).await;
    }
}

/// The chain finalized the upgrade height `h`: the node writes its
/// marker and stops, as a Cosmos node does ("UPGRADE NEEDED").
fn upgrade_halt(cfg: &CometNodeConfig, h: u64) -> anyhow::Error {
    let Some(home) = &cfg.home else {
        return anyhow::anyhow!("--v1-after needs --home for the upgrade marker");
    };
    let info = json!({"name": "v1", "height": h, "info": ""}).to_string();
    let marker = upgrade_marker(home);
    let written = marker
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&marker, info));
    match written {
        Ok(()) => anyhow::anyhow!("UPGRADE \"v1\" NEEDED at height: {h}: "),
        Err(e) => anyhow::anyhow!("cannot write {}: {e}", marker.display()),
    }
}

/// Proposal (on its turn), prevote and precommit for the open round.
async fn take_part(node: &Node, a: &Announce) {
    let deadline = Instant::now() + Duration::from_millis(a.slot_ms.max(1));
    let chain_id = node.state().chain_id.clone();
    let Some(validator) = validator(node, &chain_id, deadline).await else {
        return;
    };
    let Some(mut block) = a.block_id() else {
        tracing::warn!("chain announced a malformed block id");
        return;
    };
    if node.cfg.equivocate {
        block = consensus::conflicting(&block, node.cfg.node_id);
    }
    if a.proposer {
        let p = consensus::proposal(a.height, a.round, block.clone());
        if let Some(signed) = sign(&node.endpoint, deadline, &chain_id, Signable::Proposal(p)).await
        {
            submit(node, "proposal", signed.encode_to_vec()).await;
        }
    }
    let prevote = consensus::vote(
        Step::Prevote,
        a.height,
        a.round,
        block.clone(),
        validator.address,
        vec![],
    );
    if let Some(signed) = sign(
        &node.endpoint,
        deadline,
        &chain_id,
        Signable::Vote(prevote, false),
    )
    .await
    {
        submit(node, "vote", signed.encode_to_vec()).await;
    }
    let target = if a.commit { block } else { consensus::nil() };
    let skip = node.cfg.protocol == Protocol::V1 && node.cfg.skip_extensions;
    let extension = match node.cfg.protocol {
        Protocol::V0_38 | Protocol::V1 if !skip && !consensus::is_nil(Some(&target)) => {
            format!("ext/{}/{}/{}", a.height, a.round, node.cfg.node_id).into_bytes()
        }
        _ => Vec::new(),
    };
    let precommit = consensus::vote(
        Step::Precommit,
        a.height,
        a.round,
        target,
        validator.address,
        extension,
    );
    let disguise = precommit.clone();
    if let Some(signed) = sign(
        &node.endpoint,
        deadline,
        &chain_id,
        Signable::Vote(precommit, skip),
    )
    .await
    {
        submit(node, "vote", signed.encode_to_vec()).await;
    }
    if node.cfg.sign_bytes && node.cfg.protocol == Protocol::V1 {
        raw_bytes(node, &chain_id, a, &validator, disguise).await;
    }
}

/// 1.x: raw bytes of the application, whose signature must verify, then
/// a precommit for another block dressed as raw bytes, which must not be
/// signed (counted as `disguised_signed` if it is).
async fn raw_bytes(
    node: &Node,
    chain_id: &str,
    a: &Announce,
    validator: &PublicValidatorKey,
    mut precommit: RawVote,
) {
    let app = format!("app/{chain_id}/{}/{}", a.height, node.cfg.node_id).into_bytes();
    match node.endpoint.sign_bytes(app.clone(), ACCEPT_WAIT).await {
        Ok(sig) if !consensus::verify(&validator.key, &app, &sig) => {
            tracing::error!("a raw-bytes signature that does not verify");
            node.endpoint.note_bad_reply();
        }
        Ok(_) => {}
        Err(e) => tracing::info!("raw bytes not signed: {e}"),
    }
    precommit.block_id = Some(consensus::conflicting(
        &consensus::block_id(chain_id, a.height, a.round),
        node.cfg.node_id + 1000,
    ));
    let Ok(bytes) = consensus::vote_sign_bytes(chain_id, &precommit) else {
        return;
    };
    if node.endpoint.sign_bytes(bytes, ACCEPT_WAIT).await.is_ok() {
        tracing::error!(
            height = a.height,
            "a conflicting precommit was signed as raw bytes"
        );
        node.endpoint.note_disguised_signed();
    }
}

/// The validator's key, asked of the signer once (as CometBFT does at start).
async fn validator(node: &Node, chain_id: &str, deadline: Instant) -> Option<PublicValidatorKey> {
    if let Some(v) = node.state().validator {
        return Some(v);
    }
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(ACCEPT_WAIT);
        match node.endpoint.pub_key(chain_id, wait).await {
            Ok(k) => {
                let v = PublicValidatorKey::new(k);
                tracing::info!(address = %v.address_hex(), "validator key from the signer");
                node.state().validator = Some(v);
                return Some(v);
            }
            Err(CallError::Remote { .. }) => return None,
            Err(_) if Instant::now() + SIGN_RETRY < deadline => {
                tokio::time::sleep(SIGN_RETRY).await
            }
            Err(_) => return None,
        }
    }
}

enum Signable {
    /// A vote, and whether its extension signature is skipped (1.x).
    Vote(RawVote, bool),
    Proposal(RawProposal),
}

enum Signed {
    Vote(RawVote),
    Proposal(RawProposal),
}

impl Signed {
    fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Signed::Vote(v) => v.encode_to_vec(),
            Signed::Proposal(p) => p.encode_to_vec(),
        }
    }
}

/// Asks the signer, retrying connection errors until the round's deadline
/// and giving up at once on a `RemoteSignerError`, as CometBFT does.
async fn sign(
    endpoint: &Endpoint,
    deadline: Instant,
    chain_id: &str,
    what: Signable,
) -> Option<Signed> {
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(ACCEPT_WAIT);
        let got = match &what {
            Signable::Vote(v, skip) => endpoint
                .sign_vote(chain_id, v.clone(), *skip, wait)
                .await
                .map(Signed::Vote),
            Signable::Proposal(p) => endpoint
                .sign_proposal(chain_id, p.clone(), wait)
                .await
                .map(Signed::Proposal),
        };
        match got {
            Ok(s) => return Some(s),
            Err(e @ (CallError::Remote { .. } | CallError::Unexpected(_))) => {
                tracing::warn!("{e}; this step is missed");
                return None;
            }
            Err(e) if Instant::now() + SIGN_RETRY < deadline => {
                tracing::debug!("{e}; retrying");
                tokio::time::sleep(SIGN_RETRY).await;
            }
            Err(e) => {
                tracing::warn!("{e}; the round ended before a signer answered");
                return None;
            }
        }
    }
}

async fn submit(node: &Node, kind: &str, msg: Vec<u8>) {
    let url = format!("{}/cometbft/{kind}", node.cfg.chain);
    let body = Submission {
        node: node.cfg.node_id,
        msg: hex::encode(msg),
    };
    match node.http.post(&url).json(&body).send().await {
        Ok(resp) => {
            let code = resp.status();
            match resp.json::<SignReply>().await {
                Ok(r) if r.accepted => {}
                Ok(r) => {
                    tracing::warn!(%code, "{kind} refused by the chain: {}", r.error.unwrap_or_default())
                }
                Err(e) => tracing::warn!(%code, "bad reply to {kind}: {e}"),
            }
        }
        Err(e) => tracing::warn!("submitting {kind} failed: {e}"),
    }
}

/// The Cosmos SDK's `GET /cosmos/upgrade/v1beta1/current_plan`: the
/// upgrade to 1.x (`--v1-after`) until this node runs it, with the height
/// its marker will name; `{"plan": null}` after, or without one.
async fn current_plan(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let plan = node.cfg.v1_after.map(|h| {
        json!({"name": "v1", "time": "0001-01-01T00:00:00Z", "height": h.to_string(), "info": ""})
    });
    Json(json!({ "plan": plan }))
}

async fn status(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let st = node.state();
    let catching_up = st.migrating() || st.last_contact.is_none_or(|t| t.elapsed() > CONTACT_STALE);
    let validator = st.validator.map(|v| {
        json!({
            "address": v.address_hex(),
            "pub_key": serde_json::to_value(cometbft::PublicKey::from_ed25519_dalek(v.key))
                .unwrap_or_default(),
            "voting_power": "10",
        })
    });
    Json(json!({
        "jsonrpc": "2.0",
        "id": -1,
        "result": {
            "node_info": {
                "network": st.chain_id,
                "moniker": format!("fakenode-{}", node.cfg.node_id),
                "version": match node.cfg.protocol {
                    Protocol::V0_34 => "0.34.35",
                    Protocol::V0_38 => "0.38.17",
                    Protocol::V1 => "1.0.1",
                },
            },
            "sync_info": {
                "latest_block_height": st.head.to_string(),
                "catching_up": catching_up,
            },
            "validator_info": validator,
        }
    }))
}

/// `GET /privval[?skip=N]`: what the node saw of its signer, the latencies
/// of its first N signatures left out.
async fn privval(
    State(node): State<Arc<Node>>,
    axum::extract::Query(q): axum::extract::Query<Skip>,
) -> Json<super::privval::PrivvalStats> {
    Json(node.endpoint.stats_after(q.skip))
}

#[derive(serde::Deserialize)]
struct Skip {
    #[serde(default)]
    skip: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use cometbft_proto::v0_38::privval::{
        message::Sum, Message, RemoteSignerError, SignedVoteResponse,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// Reads one length-delimited privval message (a stub signer's side).
    async fn read(s: &mut UnixStream) -> Message {
        let len = s.read_u8().await.unwrap() as usize;
        assert!(len < 128, "test messages fit a one-byte length");
        let mut buf = vec![0; len];
        s.read_exact(&mut buf).await.unwrap();
        Message::decode(buf.as_slice()).unwrap()
    }

    async fn write(s: &mut UnixStream, m: Message) {
        s.write_all(&m.encode_length_delimited_to_vec())
            .await
            .unwrap();
    }

    fn prevote() -> RawVote {
        let block = consensus::block_id("c", 1, 0);
        consensus::vote(Step::Prevote, 1, 0, block, [1; 20], vec![])
    }

    async fn endpoint(dir: &tempfile::TempDir) -> (Arc<Endpoint>, std::path::PathBuf) {
        let path = dir.path().join("pv.sock");
        (
            Endpoint::bind(&Listen::Unix(path.clone()), None, false)
                .await
                .unwrap(),
            path,
        )
    }

    #[tokio::test]
    async fn a_remote_signer_error_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, path) = endpoint(&dir).await;
        let stub = tokio::spawn(async move {
            let mut s = UnixStream::connect(path).await.unwrap();
            let mut asked = 0;
            // Answer every sign request with an error; count them until the
            // node hangs up or goes quiet.
            while let Ok(m) = tokio::time::timeout(Duration::from_millis(700), read(&mut s)).await {
                assert!(matches!(m.sum, Some(Sum::SignVoteRequest(_))));
                asked += 1;
                let err = RemoteSignerError {
                    code: 2,
                    description: "double signing".into(),
                };
                write(
                    &mut s,
                    Message {
                        sum: Some(Sum::SignedVoteResponse(SignedVoteResponse {
                            vote: None,
                            error: Some(err),
                        })),
                    },
                )
                .await;
            }
            asked
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        let got = sign(&ep, deadline, "c", Signable::Vote(prevote(), false)).await;
        assert!(got.is_none());
        assert_eq!(stub.await.unwrap(), 1, "asked once, not retried");
        assert_eq!(ep.stats().remote_errors, 1);
    }

    #[tokio::test]
    async fn a_dropped_connection_is_retried_on_the_next_signer() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, path) = endpoint(&dir).await;
        let stub = tokio::spawn(async move {
            // The first signer hangs up on the request; the second signs.
            let mut first = UnixStream::connect(&path).await.unwrap();
            read(&mut first).await;
            drop(first);
            let mut second = UnixStream::connect(&path).await.unwrap();
            let m = read(&mut second).await;
            let Some(Sum::SignVoteRequest(r)) = m.sum else {
                panic!("{m:?}")
            };
            let mut v = r.vote.unwrap();
            v.signature = vec![7; 64];
            write(
                &mut second,
                Message {
                    sum: Some(Sum::SignedVoteResponse(SignedVoteResponse {
                        vote: Some(v),
                        error: None,
                    })),
                },
            )
            .await;
            second
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = sign(&ep, deadline, "c", Signable::Vote(prevote(), false)).await;
        assert!(matches!(got, Some(Signed::Vote(v)) if v.signature == vec![7; 64]));
        let _keep = stub.await.unwrap();
        let st = ep.stats();
        assert_eq!(
            (st.signed, st.disconnects, st.connections),
            (1, 1, 2),
            "{st:?}"
        );
    }

    #[tokio::test]
    async fn a_reply_for_another_vote_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, path) = endpoint(&dir).await;
        let stub = tokio::spawn(async move {
            let mut s = UnixStream::connect(&path).await.unwrap();
            let m = read(&mut s).await;
            let Some(Sum::SignVoteRequest(r)) = m.sum else {
                panic!("{m:?}")
            };
            let mut v = r.vote.unwrap();
            v.block_id = Some(consensus::conflicting(v.block_id.as_ref().unwrap(), 1));
            v.signature = vec![7; 64];
            write(
                &mut s,
                Message {
                    sum: Some(Sum::SignedVoteResponse(SignedVoteResponse {
                        vote: Some(v),
                        error: None,
                    })),
                },
            )
            .await;
            s
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        assert!(sign(&ep, deadline, "c", Signable::Vote(prevote(), false))
            .await
            .is_none());
        let _keep = stub.await.unwrap();
        assert_eq!((ep.stats().bad_replies, ep.stats().signed), (1, 0));
    }
}
