//! fakechain: a chain that produces one height per block interval and judges
//! who signed it, in one of two modes.
//!
//! - NEAR mode: a node signs a height by posting it to `/sign`; two nodes
//!   signing one height is a double sign.
//! - CometBFT mode (`comet::ledger`): the chain opens rounds, sentries post
//!   the votes and proposals their signer produced to `/cometbft/vote` and
//!   `/cometbft/proposal`, and two signatures of one height, round and step
//!   over different blocks are an equivocation (`double_signs`).
//!
//! NEAR mode may also run an upgrade plan ([`crate::upgrade`]): at an
//! upgrade's height the chain makes no block until a node of that version
//! signs it, as a Cosmos chain halts until its validators upgrade.
//!
//! Owns: the head, the ledger of accepted signatures (totals plus a bounded
//! recent window), and its HTTP API (`/status`, `/sign`, `/cometbft/*`,
//! `/stats`, `/metrics`). Must not: trust a signer's word (every signature
//! is checked against the validator key), forget a double sign, or grow
//! without bound.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::comet::consensus::Malformed;
use crate::comet::key::PublicValidatorKey;
use crate::comet::ledger::{Book, Equivocation, Refusal, Schedule};
use crate::keys;
use crate::upgrade::{Plan, Upgrade};
use crate::wire::Submission;
pub use crate::wire::{SignReply, SignRequest};

/// Heights kept in the `signers` window of `/stats`.
pub const WINDOW_HEIGHTS: u64 = 2_000;
/// Distinct signers of one height that the window records (all are counted).
const MAX_SIGNERS_PER_HEIGHT: usize = 8;
/// Longest a `/status?wait_after=H` request is held open.
const LONG_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Signer {
    pub height: u64,
    pub node: u64,
}

/// `GET /stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub height: u64,
    pub signed: u64,
    pub missed: u64,
    pub double_signs: u64,
    pub refused: u64,
    pub signers: Vec<Signer>,
    /// CometBFT mode: the open round.
    #[serde(default)]
    pub round: u32,
    /// CometBFT mode: the height, round and step of each equivocation
    /// (recent ones; `double_signs` counts them all).
    #[serde(default)]
    pub equivocations: Vec<Equivocation>,
    /// The upgrade the chain is halted at, waiting for a node of its
    /// version to sign its height.
    #[serde(default)]
    pub halted: Option<Upgrade>,
    /// Each upgrade passed, and how long the chain was halted for it.
    #[serde(default)]
    pub upgrades: Vec<Passed>,
    /// NEAR mode: the software version each node last signed with.
    #[serde(default)]
    pub versions: std::collections::BTreeMap<u64, String>,
}

pub use crate::upgrade::Passed;

impl Stats {
    /// The lowest height above `after` that `node` signed, within the window.
    pub fn first_signed_by(&self, node: u64, after: u64) -> Option<u64> {
        self.heights_of(node).filter(|&h| h > after).min()
    }

    /// The first of `heights` that `node` did not sign, within the window.
    pub fn first_unsigned_by(&self, node: u64, heights: std::ops::Range<u64>) -> Option<u64> {
        heights.into_iter().find(|h| {
            !self
                .signers
                .iter()
                .any(|x| x.height == *h && x.node == node)
        })
    }

    /// The highest height `node` signed, within the window.
    pub fn last_signed_by(&self, node: u64) -> Option<u64> {
        self.heights_of(node).max()
    }

    fn heights_of(&self, node: u64) -> impl Iterator<Item = u64> + '_ {
        self.signers
            .iter()
            .filter(move |x| x.node == node)
            .map(|x| x.height)
    }
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    /// Hold the request until the head is past this height (and round).
    wait_after: Option<u64>,
    wait_round: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StatsQuery {
    /// Only list signers of heights at or above this one.
    since: Option<u64>,
}

/// The judge's books. Totals never shrink; the window is bounded.
#[derive(Debug, Default)]
struct Ledger {
    height: u64,
    /// The software version each node last signed with.
    versions: std::collections::BTreeMap<u64, String>,
    /// Distinct nodes that signed the current height.
    current: Vec<u64>,
    signed: u64,
    missed: u64,
    double_signs: u64,
    refused: u64,
    window: VecDeque<Signer>,
    plan: Plan,
    /// When the chain reached the upgrade height it waits at.
    halted_since: Option<std::time::Instant>,
    passed: Vec<Passed>,
    /// How long the rest of the network takes to upgrade at a halt: past
    /// it, blocks are made again without this validator (`None`: never,
    /// a validator whose signature every block needs).
    network_upgrade: Option<std::time::Duration>,
    /// The last halt passed by the network began then, until this
    /// validator signs again.
    unsigned_since: Option<std::time::Instant>,
}

impl Ledger {
    /// The upgrade whose height is current and not yet signed by its
    /// version: no block is made past it.
    fn halted(&self) -> Option<&Upgrade> {
        self.plan
            .at(self.height)
            .filter(|_| self.current.is_empty())
    }

    /// A tick: the next height, unless halted at an upgrade and the rest
    /// of the network has not upgraded yet.
    fn tick(&mut self) -> u64 {
        let network_upgraded = self
            .halted_since
            .zip(self.network_upgrade)
            .is_some_and(|(t, n)| t.elapsed() >= n);
        match self.halted().cloned() {
            None => {
                self.advance();
            }
            Some(up) if network_upgraded => {
                let since = self.halted_since.take();
                self.passed.push(Passed {
                    upgrade: up,
                    halted_ms: since.map_or(0, |t| t.elapsed().as_millis() as u64),
                    by_network: true,
                    signed_ms: None,
                });
                self.unsigned_since = since;
                self.advance();
            }
            Some(_) => {}
        }
        // Halted from the moment the upgrade's height opens.
        if self.halted().is_some() {
            self.halted_since
                .get_or_insert_with(std::time::Instant::now);
        }
        self.height
    }

    /// Why a verified signature of the current height by a node running
    /// `version` is refused, if it is: at an upgrade's height only that
    /// upgrade's version signs.
    fn wrong_version(&self, version: Option<&str>) -> Option<String> {
        let up = self.plan.at(self.height)?;
        let version = version.unwrap_or(crate::upgrade::GENESIS);
        (version != up.name).then(|| {
            format!(
                "height {} is upgrade {}'s: signed by version {version}",
                self.height, up.name
            )
        })
    }

    /// Closes the current height and opens the next one.
    fn advance(&mut self) -> u64 {
        if self.height > 0 && self.current.is_empty() {
            self.missed += 1;
        }
        self.current.clear();
        self.height += 1;
        let floor = self.height.saturating_sub(WINDOW_HEIGHTS);
        while self.window.front().is_some_and(|s| s.height < floor) {
            self.window.pop_front();
        }
        self.height
    }

    /// Records a verified signature of the current height by `node`.
    /// Returns whether it was a double sign.
    fn record(&mut self, node: u64) -> bool {
        if self.current.contains(&node) {
            return false;
        }
        let double = !self.current.is_empty();
        if let (false, Some(up)) = (double, self.plan.at(self.height)) {
            let halted_ms = self
                .halted_since
                .take()
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            self.passed.push(Passed {
                upgrade: up.clone(),
                halted_ms,
                by_network: false,
                signed_ms: Some(halted_ms),
            });
        } else if let Some(t) = self.unsigned_since.take() {
            if let Some(p) = self.passed.last_mut() {
                p.signed_ms = Some(t.elapsed().as_millis() as u64);
            }
        }
        if double {
            self.double_signs += 1;
        } else {
            self.signed += 1;
        }
        if self.current.len() < MAX_SIGNERS_PER_HEIGHT {
            self.current.push(node);
            self.window.push_back(Signer {
                height: self.height,
                node,
            });
        }
        double
    }

    fn stats(&self, since: u64) -> Stats {
        Stats {
            height: self.height,
            signed: self.signed,
            missed: self.missed,
            double_signs: self.double_signs,
            refused: self.refused,
            signers: self
                .window
                .iter()
                .filter(|s| s.height >= since)
                .copied()
                .collect(),
            round: 0,
            equivocations: Vec::new(),
            halted: self.halted().cloned(),
            upgrades: self.passed.clone(),
            versions: self.versions.clone(),
        }
    }
}

/// The books of the chain's mode.
enum Judge {
    Near(Box<Ledger>),
    Comet(Box<Book>),
}

impl Judge {
    /// Produces the next height (or round); returns the head.
    fn tick(&mut self) -> (u64, u32) {
        match self {
            Judge::Near(l) => (l.tick(), 0),
            Judge::Comet(b) => b.tick(),
        }
    }

    fn stats(&self, since: u64) -> Stats {
        match self {
            Judge::Near(l) => l.stats(since),
            Judge::Comet(b) => {
                let t = b.totals();
                Stats {
                    height: t.height,
                    signed: t.signed,
                    missed: t.missed,
                    double_signs: t.equivocations,
                    refused: t.refused,
                    signers: b
                        .signers(since)
                        .map(|(height, node)| Signer { height, node })
                        .collect(),
                    round: t.round,
                    equivocations: b.equivocations().copied().collect(),
                    halted: b.upgrades().0,
                    upgrades: b.upgrades().1,
                    versions: Default::default(),
                }
            }
        }
    }

    fn refused(&mut self) {
        if let Judge::Near(l) = self {
            l.refused += 1;
        }
    }
}

struct Chain {
    /// NEAR mode: the validator key signatures are checked against.
    validator: Option<VerifyingKey>,
    judge: Mutex<Judge>,
    head: watch::Sender<(u64, u32)>,
}

impl Chain {
    fn judge(&self) -> MutexGuard<'_, Judge> {
        // A panic while holding this lock would be a bug in a few lines of
        // arithmetic; keep serving rather than poison every later request.
        self.judge.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the chain judges.
pub enum Mode {
    /// NEAR-style: one signature per height, by this key.
    Near(VerifyingKey),
    /// CometBFT: votes and proposals by this key, on this schedule.
    Comet {
        schedule: Schedule,
        key: PublicValidatorKey,
    },
}

pub struct ChainConfig {
    pub listen: SocketAddr,
    pub block: Duration,
    /// Delay of the first tick.
    pub phase: Duration,
    pub mode: Mode,
    /// NEAR mode: the upgrades the chain halts at.
    pub plan: Plan,
    /// NEAR mode: how long the rest of the network takes to upgrade at a
    /// halt (`None`: the chain waits for this validator).
    pub network_upgrade: Option<Duration>,
}

/// Binds, then produces heights and serves the API until `shutdown` resolves.
pub async fn run(
    cfg: ChainConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, block_ms = cfg.block.as_millis() as u64, "fakechain listening");
    let (head, _) = watch::channel((0, 0));
    let (validator, judge) = match cfg.mode {
        Mode::Near(key) => {
            for up in cfg.plan.upgrades() {
                tracing::info!(upgrade = %up, "upgrade scheduled");
            }
            let ledger = Ledger {
                plan: cfg.plan,
                network_upgrade: cfg.network_upgrade,
                ..Ledger::default()
            };
            (Some(key), Judge::Near(Box::new(ledger)))
        }
        Mode::Comet { schedule, key } => {
            tracing::info!(chain_id = %schedule.chain_id, address = %key.address_hex(),
                round_every = schedule.round_every, validators = schedule.validators,
                extensions = schedule.extensions, "CometBFT mode");
            (None, Judge::Comet(Box::new(Book::new(schedule, key))))
        }
    };
    let chain = Arc::new(Chain {
        validator,
        judge: Mutex::new(judge),
        head,
    });
    let producer = tokio::spawn(produce(chain.clone(), cfg.block, cfg.phase));
    let app = Router::new()
        .route("/status", get(status))
        .route("/sign", post(sign))
        .route("/cometbft/vote", post(comet_vote))
        .route("/cometbft/proposal", post(comet_proposal))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(chain);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    producer.abort();
    Ok(served?)
}

async fn produce(chain: Arc<Chain>, block: Duration, phase: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, block);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let head = chain.judge().tick();
        chain.head.send_replace(head);
    }
}

async fn status(
    State(chain): State<Arc<Chain>>,
    Query(q): Query<StatusQuery>,
) -> Json<serde_json::Value> {
    if let Some(after) = q.wait_after {
        let mut rx = chain.head.subscribe();
        let past = |&(h, r): &(u64, u32)| match q.wait_round {
            Some(round) => (h, r) > (after, round),
            None => h > after,
        };
        let _ = tokio::time::timeout(LONG_POLL, rx.wait_for(past)).await;
    }
    match &*chain.judge() {
        Judge::Comet(b) => Json(serde_json::to_value(b.announce()).unwrap_or_default()),
        Judge::Near(l) => Json(serde_json::json!({
            "height": l.height,
            "upgrades": l.plan,
            "halted": l.halted(),
        })),
    }
}

async fn sign(State(chain): State<Arc<Chain>>, Json(req): Json<SignRequest>) -> impl IntoResponse {
    let refuse = |chain: &Chain, code: StatusCode, why: String| {
        chain.judge().refused();
        let reply = SignReply {
            accepted: false,
            double_sign: false,
            error: Some(why),
        };
        (code, Json(reply))
    };
    let Some(validator) = chain.validator else {
        return refuse(
            &chain,
            StatusCode::NOT_FOUND,
            "this chain runs in CometBFT mode: post to /cometbft/vote".into(),
        );
    };
    match keys::parse_public(&req.public_key) {
        Ok(k) if k == validator => {}
        Ok(_) => {
            return refuse(
                &chain,
                StatusCode::FORBIDDEN,
                "not the validator key".into(),
            )
        }
        Err(e) => return refuse(&chain, StatusCode::BAD_REQUEST, e.to_string()),
    }
    if !keys::verify_height(&validator, req.height, &req.signature) {
        return refuse(&chain, StatusCode::FORBIDDEN, "bad signature".into());
    }
    let mut judge = chain.judge();
    let Judge::Near(ledger) = &mut *judge else {
        return (
            StatusCode::NOT_FOUND,
            Json(SignReply::refused("not a NEAR chain")),
        );
    };
    if req.height != ledger.height {
        let why = format!("height {} is not current ({})", req.height, ledger.height);
        drop(judge);
        return refuse(&chain, StatusCode::CONFLICT, why);
    }
    if let Some(why) = ledger.wrong_version(req.version.as_deref()) {
        drop(judge);
        return refuse(&chain, StatusCode::CONFLICT, why);
    }
    let double_sign = ledger.record(req.node);
    let version = req.version.clone();
    ledger.versions.insert(
        req.node,
        version.unwrap_or_else(|| crate::upgrade::GENESIS.to_string()),
    );
    drop(judge);
    if double_sign {
        tracing::warn!(height = req.height, node = req.node, "DOUBLE SIGN");
    }
    let reply = SignReply {
        accepted: true,
        double_sign,
        error: None,
    };
    (StatusCode::OK, Json(reply))
}

#[derive(Clone, Copy)]
enum CometKind {
    Vote,
    Proposal,
}

async fn comet_vote(
    State(chain): State<Arc<Chain>>,
    Json(sub): Json<Submission>,
) -> impl IntoResponse {
    comet_submit(&chain, CometKind::Vote, &sub)
}

async fn comet_proposal(
    State(chain): State<Arc<Chain>>,
    Json(sub): Json<Submission>,
) -> impl IntoResponse {
    comet_submit(&chain, CometKind::Proposal, &sub)
}

/// Decodes a signed vote or proposal and has the book judge it.
fn comet_submit(chain: &Chain, kind: CometKind, sub: &Submission) -> (StatusCode, Json<SignReply>) {
    use prost::Message as _;
    let mut judge = chain.judge();
    let Judge::Comet(book) = &mut *judge else {
        return (
            StatusCode::NOT_FOUND,
            Json(SignReply::refused(
                "this chain runs in NEAR mode: post to /sign",
            )),
        );
    };
    let bytes = hex::decode(&sub.msg).map_err(|e| Malformed {
        what: "submission",
        why: format!("not hex: {e}"),
    });
    let verdict = bytes.and_then(|b| match kind {
        CometKind::Vote => cometbft_proto::v0_38::types::Vote::decode(b.as_slice())
            .map_err(|e| Malformed {
                what: "vote",
                why: e.to_string(),
            })
            .map(|v| book.submit_vote(sub.node, &v)),
        CometKind::Proposal => cometbft_proto::v0_38::types::Proposal::decode(b.as_slice())
            .map_err(|e| Malformed {
                what: "proposal",
                why: e.to_string(),
            })
            .map(|p| book.submit_proposal(&p)),
    });
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => {
            book.refuse_undecodable();
            Err(Refusal::Malformed(e))
        }
    };
    drop(judge);
    match verdict {
        Ok(v) => (
            StatusCode::OK,
            Json(SignReply {
                accepted: true,
                double_sign: v.equivocation,
                error: None,
            }),
        ),
        Err(e) => {
            let code = match e {
                Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
                Refusal::NotValidator | Refusal::BadSignature | Refusal::BadExtension => {
                    StatusCode::FORBIDDEN
                }
                Refusal::NotOpen { .. } | Refusal::TooOld(_) => StatusCode::CONFLICT,
            };
            tracing::debug!(node = sub.node, "refused: {e}");
            (code, Json(SignReply::refused(&e.to_string())))
        }
    }
}

async fn stats(State(chain): State<Arc<Chain>>, Query(q): Query<StatsQuery>) -> Json<Stats> {
    Json(chain.judge().stats(q.since.unwrap_or(0)))
}

async fn metrics(State(chain): State<Arc<Chain>>) -> String {
    let l = chain.judge().stats(u64::MAX);
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "fakechain_height",
            "gauge",
            "Current head height.",
            l.height,
        ),
        (
            "fakechain_signed_total",
            "counter",
            "Heights signed by the validator key.",
            l.signed,
        ),
        (
            "fakechain_missed_total",
            "counter",
            "Heights closed with no signature.",
            l.missed,
        ),
        (
            "fakechain_double_signs_total",
            "counter",
            "Extra signers of an already signed height (NEAR), equivocations (CometBFT).",
            l.double_signs,
        ),
        (
            "fakechain_refused_total",
            "counter",
            "Signatures refused (forged, stale or foreign).",
            l.refused,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
