//! Signer mode: keyraft as a CometBFT remote signer whose every signature is
//! committed through Raft before it exists.
//!
//! - [`privval`]: the connections to the nodes (keyraft dials each node's
//!   `priv_validator_laddr`, as tmkms does) and the request loop on each.
//! - [`protocol`]: CometBFT 0.38's and 1.x's privval messages as one
//!   [`protocol::Request`] and [`protocol::Reply`], and what a connection
//!   speaks.
//! - [`bytes`]: 1.x's raw-bytes requests: allowed or not, never a
//!   consensus message in disguise, each committed before it is signed.
//! - [`key`]: the consensus key, in this process or a token, and the
//!   proof a forwarding member gives that it holds it.
//! - [`token`]: a key in hardware, through PKCS#11 (the module, sessions,
//!   signing, `import-key`); `token_health`: signatures off the async
//!   workers for a token, its failures, and its probe.
//! - [`sign`]: sign bytes, digests, signed messages.
//! - [`limit`]: the highest height signed or imported now.
//! - [`forward`]: a follower's request to the leader ([`Forward`], over
//!   the peer port on a real node) and the leader's gRPC end.
//! - [`refusal`]: why a request was not signed, typed from the ledger's
//!   verdict through the forward to CometBFT's `RemoteSignerError`.
//! - [`reload`]: chains added, removed and changed by a reload, each
//!   keeping its key and its memory for the life of the process.
//! - [`keys`]: which members gossip another key for a chain (reported
//!   before any request; the leader's per-request check stays the guard).
//! - [`ahead`]: sign-ahead, the leader's choice between signing at once
//!   (its own reservation covers the request) and committing first.
//! - [`confirm`]: the other voters' confirmation before a signature
//!   inside a reservation (a resumed memory image of the leader does not
//!   remember what it signed there; they do).
//! - [`behind`]: the commit behind a signature made in the reservation,
//!   proposed in order, and after the other sentries' requests where only
//!   the next height needs it.
//! - `here`: the one sign path ([`Signer::sign_here`], only ever on the
//!   Raft leader), its checks and its two ways to a signature.
//! - this module: [`Signer`], which answers each request with that sign path
//!   ([`Signer::sign_here`], only ever on the Raft leader: commit
//!   `SignAhead{chain_id, height, round, step, digest, through, holder}`
//!   before the signature, or behind it inside a reservation) and one
//!   reply builder; a follower forwards the request to the leader over the
//!   peer port ([`SignerService`] is the leader's end) and completes its own
//!   copy with the leader's timestamp and signatures.
//!
//! Several chains: each has its own key, nodes, lock and watermark (one
//! [`Chain`] each). A request is routed by the chain of the connection it
//! came on and must carry that chain's id; a forwarded one by the chain id
//! it carries, and the leader refuses a chain it does not sign for or a
//! member whose key for the chain is not its own.
//!
//! Why this is safe without a clock: a signature exists only after a
//! quorum committed either its (height, round, step) and digest, or a
//! reservation of that HRS for this signing process ([`ahead`]); the
//! replicated state machine accepts one digest per HRS, lets nobody but
//! the holder sign in a reservation, and never signs below the watermark.
//! A deposed or partitioned leader cannot commit, so it cannot sign
//! anything beyond what it had reserved; inside that, it signs each HRS
//! once (its memory of what it signed lives as long as the process, and a
//! restarted process draws a new holder id). What else it can answer is a
//! repeat of bytes it signed, whose signature is the same bytes (ed25519
//! is deterministic).
//!
//! The signer runs on a [`Core`] (Raft, the replicated state, metrics) and
//! reaches the leader through a [`Forward`]: the peer port on a real node
//! ([`Peers`]), the simulated network in the simulator (`sim/`), which so
//! runs this very sign path. Time is tokio's clock.
//!
//! Owns: the chain-id check (once, where a request enters), the order
//! commit-then-sign, forwarding with a bounded wait, and the sign metrics.
//! Must not: sign anything the state machine did not accept, wait past
//! CometBFT's read timeout, or touch the coordinator's validator.

pub mod ahead;
mod behind;
pub mod bytes;
pub mod confirm;
mod forward;
mod here;
pub mod key;
pub mod keys;
pub mod limit;
pub mod privval;
pub mod protocol;
pub mod refusal;
pub mod reload;
pub mod sign;
pub mod token;
mod token_health;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use prost::Message as _;
use tokio::time::Instant;

use crate::config::ProtocolVersion;
use crate::config::{ChainConfig, KeySource, NodeId};
use crate::node::Core;
use crate::pb;
use crate::raft::peers::Peers;
use crate::raft::store::StateMachine;
use crate::raft::TypeConfig;
use ahead::Ahead;
pub use forward::{serve_confirm, ConfirmService, Forward, SignerService};
pub use limit::{height_limit, HeightLimit, MAX_AHEAD_OF_CHAIN};
use protocol::{Extension, Reply, Request};
pub use refusal::Hrs;
pub use refusal::Refusal;
pub use sign::{ConsensusKey, SignError, Signable};

/// Longest a sign request waits for a leader (an election, a forward) before
/// it is answered with an error. Below CometBFT's 3 s read timeout, so the
/// node gets an answer rather than a dropped connection.
pub const SIGN_PATIENCE: Duration = Duration::from_millis(2000);
/// One forwarding attempt to the leader.
const FORWARD_DEADLINE: Duration = Duration::from_millis(1000);
const RETRY: Duration = Duration::from_millis(25);
/// Largest privval message forwarded between signers.
pub const MAX_PRIVVAL_MESSAGE: usize = 64 * 1024;

/// What a request gives the sign path: consensus bytes (a vote or a
/// proposal, under the watermark) or a 1.x node's raw bytes (`bytes`).
#[derive(Debug, Clone)]
enum Work {
    Sign(Signable),
    Bytes(Vec<u8>),
}

/// What the sign path gives back for a [`Work`].
#[derive(Debug, Clone)]
enum Done {
    Signed(Signable),
    Bytes(Vec<u8>),
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Work::Sign(s) => s.kind(),
            Work::Bytes(_) => "bytes",
        }
    }

    /// The request a follower forwards to the leader for this.
    fn to_request(&self, chain_id: &str) -> Request {
        match self {
            Work::Sign(s) => protocol::request_for(s, chain_id),
            Work::Bytes(b) => Request::Bytes(b.clone()),
        }
    }
}

/// One chain of signer mode: its configuration, its key, and the one
/// signing at a time of its leader.
pub struct Chain {
    pub cfg: ChainConfig,
    /// Shared with the blocking pool while a token signs.
    key: Arc<ConsensusKey>,
    /// One signing at a time on the leader, per chain: one commit per new
    /// HRS, and concurrent requests for one HRS share its signature. Holds
    /// what this process signed last ([`Ahead`]). A chain a reload
    /// replaces or adds again shares it with the one before ([`reload`]):
    /// what this process signed inside its reservation is remembered for
    /// as long as the process runs.
    lock: Arc<tokio::sync::Mutex<Ahead>>,
    /// Cuts short the wait of this chain's commits behind signatures.
    hurry: behind::Hurry,
    /// A node asked this chain's connection for another chain's key.
    said_wrong_key_chain: AtomicBool,
    /// Fired when a reload removes or replaces the chain: its connections
    /// and probes stop ([`Chain::retired`]).
    retire: crate::shutdown::Trigger,
    /// Its token's probe has not come back yet. Shared with the chain
    /// before when the key is the same: a hung token gets one stuck probe,
    /// not one per reload.
    probing: Arc<AtomicBool>,
}

impl Chain {
    /// A chain of `cfg` signed with `key`, taking over the memory of
    /// `before` (the same chain, replaced or retired) if any.
    fn new(cfg: ChainConfig, key: Arc<ConsensusKey>, before: Option<&Chain>) -> Chain {
        let same_key = before.filter(|b| Arc::ptr_eq(&b.key, &key));
        Chain {
            cfg,
            lock: before.map_or_else(Default::default, |b| b.lock.clone()),
            hurry: before.map_or_else(Default::default, |b| b.hurry.clone()),
            said_wrong_key_chain: AtomicBool::new(false),
            retire: crate::shutdown::channel().0,
            probing: same_key.map_or_else(Default::default, |b| b.probing.clone()),
            key,
        }
    }

    pub fn id(&self) -> &str {
        &self.cfg.chain_id
    }

    /// The address of this chain's key.
    pub fn address(&self) -> String {
        self.key.address_hex()
    }

    /// Resolves once a reload removed or replaced this chain.
    pub fn retired(&self) -> crate::shutdown::Shutdown {
        self.retire.subscribe()
    }

    pub fn is_retired(&self) -> bool {
        self.retired().is_requested()
    }

    /// Whether this process signed, or asked to sign, anything for this
    /// chain (a chain busy signing now counts as having signed).
    fn signed_anything(&self) -> bool {
        self.lock.try_lock().map_or(true, |a| !a.signed_nothing())
    }
}

/// Reads every chain's `priv_validator_key.json`, or opens its key in its
/// token, each PKCS#11 module found or loaded by `module` (its path).
/// Blocking; [`reload::load_keys`] puts a limit on it.
pub fn load_chain_keys(
    chains: &[ChainConfig],
    mut module: impl FnMut(&std::path::Path) -> Result<Arc<token::Module>, token::TokenError>,
) -> Result<Vec<(ChainConfig, ConsensusKey)>, SignError> {
    chains
        .iter()
        .map(|c| {
            let key = match &c.key {
                KeySource::File(path) => ConsensusKey::load(path)?,
                KeySource::Token(uri) => ConsensusKey::open_token(uri, module(&uri.module)?)?,
            };
            Ok((c.clone(), key))
        })
        .collect()
}

/// Signer mode on one node: its chains, on a [`Core`], forwarding by `F`.
pub struct Signer<SM: RaftStateMachine<TypeConfig> = StateMachine, F: Forward = Peers> {
    core: Arc<Core<SM>>,
    to_leader: Arc<F>,
    /// The chains signed for now; a reload replaces the list ([`reload`]).
    chains: std::sync::RwLock<Arc<[Arc<Chain>]>>,
    /// Chains a reload removed, by id: added again, each signs on with
    /// what it remembers ([`Chain::new`]).
    retired: std::sync::Mutex<std::collections::BTreeMap<String, Arc<Chain>>>,
    /// The PKCS#11 modules loaded (a reload's keys open through them).
    modules: Arc<token::Modules>,
    /// This signing process's id in reservations ([`ahead`]): drawn anew at
    /// every start, so a restarted process never signs in an old one.
    holder: u64,
}

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// A signer for `chains`, each with its key, and the PKCS#11 `modules`
    /// those were opened through ([`reload::load_keys`]), as signing
    /// process `holder` (random, and never the same twice).
    pub fn new(
        core: Arc<Core<SM>>,
        to_leader: Arc<F>,
        (chains, modules): (Vec<(ChainConfig, ConsensusKey)>, token::Modules),
        holder: u64,
    ) -> Arc<Self> {
        let several = chains.len() > 1;
        let chains: Vec<Arc<Chain>> = chains
            .into_iter()
            .map(|(cfg, key)| {
                Self::say_started(&cfg, &key, several);
                Arc::new(Chain::new(cfg, Arc::new(key), None))
            })
            .collect();
        let signer = Arc::new(Signer {
            core,
            to_leader,
            chains: std::sync::RwLock::new(Arc::from(Vec::new())),
            retired: Default::default(),
            modules: Arc::new(modules),
            holder,
        });
        signer.set_chains(chains);
        signer
    }

    fn say_started(cfg: &ChainConfig, key: &ConsensusKey, several: bool) {
        tracing::info!(chain_id = %cfg.chain_id, address = %key.address_hex(),
            nodes = cfg.nodes.len(), "signer mode: signatures are committed through Raft first");
        if several && cfg.node_rpc.is_none() {
            tracing::warn!(chain_id = %cfg.chain_id, "no node-rpc: no node vouches for this chain's height, so it is signed at most 1,000 heights past the last vouched one (docs/signer.md, which heights are signed)");
        }
    }

    /// Makes `chains` the ones signed for, and the core's [`Roster`]
    /// (what status, gossip and the height limit read) say so.
    ///
    /// [`Roster`]: crate::node::Roster
    fn set_chains(&self, chains: Vec<Arc<Chain>>) {
        let roster = crate::node::Roster {
            chains: chains.iter().map(|c| c.cfg.clone()).collect(),
            keys: chains
                .iter()
                .map(|c| pb::ChainKey {
                    chain_id: c.id().to_string(),
                    address: c.address(),
                })
                .collect(),
        };
        *self.chains.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(chains);
        *self.core.roster.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(roster);
    }

    pub fn core(&self) -> &Core<SM> {
        &self.core
    }

    /// The chains signed for now.
    pub fn chains(&self) -> Arc<[Arc<Chain>]> {
        self.chains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn chain(&self, chain_id: &str) -> Option<Arc<Chain>> {
        self.chains().iter().find(|c| c.id() == chain_id).cloned()
    }

    /// The one chain-id check of a request from a node: it must carry the
    /// id of the chain whose connection it came on.
    fn check_chain(chain: &Chain, asked: &str) -> Result<(), Refusal> {
        if asked == chain.id() {
            Ok(())
        } else {
            Err(Refusal::WrongChain {
                ours: chain.id().to_string(),
                asked: asked.to_string(),
            })
        }
    }

    /// Answers one request from a node of `chain` this host is connected
    /// to, on a connection speaking `version`.
    pub async fn handle(&self, chain: &Chain, version: ProtocolVersion, req: Request) -> Reply {
        match req {
            Request::Ping => Reply::Pong,
            Request::PubKey { chain_id } => Reply::PubKey(Self::pub_key(chain, &chain_id)),
            Request::Vote {
                chain_id,
                vote,
                extension,
            } => {
                // 0.38 signs a non-nil precommit's extension, always.
                let extension = match version {
                    ProtocolVersion::V0_38 => Extension::Sign,
                    ProtocolVersion::V1 | ProtocolVersion::Either => extension,
                };
                let what = vote.map(|v| Work::Sign(Signable::Vote(v, extension)));
                Reply::Vote(
                    match self.sign_request(chain, &chain_id, what, "vote").await {
                        Ok(Done::Signed(Signable::Vote(v, _))) => Ok(v),
                        Ok(_) => Err(Refusal::Malformed("not a vote came back".into())),
                        Err(e) => Err(e),
                    },
                )
            }
            Request::Proposal { chain_id, proposal } => {
                let what = proposal.map(|p| Work::Sign(Signable::Proposal(p)));
                let r = self.sign_request(chain, &chain_id, what, "proposal").await;
                Reply::Proposal(match r {
                    Ok(Done::Signed(Signable::Proposal(p))) => Ok(p),
                    Ok(_) => Err(Refusal::Malformed("not a proposal came back".into())),
                    Err(e) => Err(e),
                })
            }
            Request::Bytes(value) => {
                let r = match bytes::may_sign(&chain.cfg, version, &value) {
                    Ok(()) => {
                        let chain_id = chain.id().to_string();
                        let what = Some(Work::Bytes(value));
                        self.sign_request(chain, &chain_id, what, "bytes").await
                    }
                    Err(e) => {
                        self.record(chain, "bytes", Instant::now(), &Err(e.clone()));
                        Err(e)
                    }
                };
                Reply::Bytes(match r {
                    Ok(Done::Bytes(signature)) => Ok(signature),
                    Ok(_) => Err(Refusal::Malformed("not a bytes signature came back".into())),
                    Err(e) => Err(e),
                })
            }
            Request::Unexpected => {
                tracing::warn!(
                    chain = chain.id(),
                    "a privval message from a node that is no request: answered with a ping"
                );
                Reply::Pong
            }
        }
    }

    fn pub_key(chain: &Chain, chain_id: &str) -> Result<[u8; 32], Refusal> {
        if let Err(e) = Self::check_chain(chain, chain_id) {
            // A misconfigured node asks about twice a second: said once.
            if !chain.said_wrong_key_chain.swap(true, Ordering::Relaxed) {
                tracing::warn!(chain = chain.id(), "public key not given: {e}");
            }
            return Err(e);
        }
        Ok(chain.key.public().to_bytes())
    }

    /// A sign request from a local node: checked, then signed here or on
    /// the leader, with metrics.
    async fn sign_request(
        &self,
        chain: &Chain,
        chain_id: &str,
        what: Option<Work>,
        expected: &str,
    ) -> Result<Done, Refusal> {
        let started = Instant::now();
        let what =
            what.ok_or_else(|| Refusal::Malformed(format!("no {expected} in the request")))?;
        let kind = what.kind();
        let result = match Self::check_chain(chain, chain_id) {
            Ok(()) => self.sign_anywhere(chain, what).await,
            Err(e) => Err(e),
        };
        self.record(chain, kind, started, &result);
        result
    }

    /// The metrics and log line of one request's `result`.
    fn record(&self, chain: &Chain, kind: &str, started: Instant, result: &Result<Done, Refusal>) {
        let m = &self.core.metrics;
        let label = match result {
            Ok(_) => "signed",
            Err(e) => e.result_label(),
        };
        m.sign_requests
            .with_label_values(&[chain.id(), kind, label])
            .inc();
        m.sign_seconds
            .with_label_values(&[chain.id()])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(e @ Refusal::Equivocation { .. }) => tracing::error!(chain = chain.id(), "{e}"),
            Err(e) => tracing::warn!(chain = chain.id(), "{kind} not signed: {e}"),
            Ok(_) => {}
        }
    }

    /// The leader's work: consensus bytes on the sign path, raw bytes
    /// after their own commit.
    async fn work_here(
        &self,
        chain: &Chain,
        what: Work,
        deadline: Instant,
    ) -> Result<Done, Refusal> {
        match what {
            Work::Sign(s) => self.sign_here(chain, s, deadline).await.map(Done::Signed),
            Work::Bytes(b) => self
                .sign_bytes_here(chain, &b, deadline)
                .await
                .map(Done::Bytes),
        }
    }

    /// Signs on the leader: here if this node leads, else forwarded. Waits
    /// up to [`SIGN_PATIENCE`] for a leader to exist and commit.
    async fn sign_anywhere(&self, chain: &Chain, what: Work) -> Result<Done, Refusal> {
        let deadline = Instant::now() + SIGN_PATIENCE;
        let mut last = Refusal::NoLeader(SIGN_PATIENCE);
        while Instant::now() < deadline {
            let attempt = match self.core.leader() {
                Some(id) if id == self.core.cfg.id => {
                    self.work_here(chain, what.clone(), deadline).await
                }
                // A leader from before raw bytes cannot read them: refused
                // here, not retried until the patience runs out.
                Some(id)
                    if matches!(what, Work::Bytes(_))
                        && !self.core.view.all_have([id], bytes::FEATURE) =>
                {
                    Err(Refusal::BytesRefused(format!(
                        "the leader, node {id}, runs a keyraft that does not sign raw bytes"
                    )))
                }
                Some(id) => self.forward(id, chain, &what, deadline).await,
                None => Err(Refusal::NoLeader(SIGN_PATIENCE)),
            };
            match attempt {
                Err(e) if e.retryable() => {
                    last = e;
                    tokio::time::sleep(RETRY).await;
                }
                done => return done,
            }
        }
        Err(last)
    }

    /// Hands the request to the leader `id` and completes it with the
    /// leader's signature, within one attempt's deadline and the request's.
    async fn forward(
        &self,
        id: NodeId,
        chain: &Chain,
        what: &Work,
        deadline: Instant,
    ) -> Result<Done, Refusal> {
        let limit = FORWARD_DEADLINE.min(deadline.saturating_duration_since(Instant::now()));
        let msg = protocol::request_frame(&what.to_request(chain.id())).encode_to_vec();
        let pub_key = chain.key.public().as_bytes().to_vec();
        let proof = chain.key.forward_proof(self.core.cfg.id, chain.id(), &msg);
        let (key_proof, proof) = (proof.key_proof, proof.seed_proof);
        let mut stage = self.stages();
        let r = self
            .to_leader
            .forward(
                id,
                pb::SignRequest {
                    msg,
                    pub_key,
                    proof,
                    key_proof,
                    chain_id: chain.id().to_string(),
                },
                limit,
            )
            .await
            .map_err(|e| Refusal::NotCommitted(format!("forwarding to leader {id}: {e}")))?;
        stage.done("forward");
        let asked = match what {
            Work::Sign(s) => s.hrs().unwrap_or_default(),
            Work::Bytes(_) => (0, 0, 0),
        };
        if let Some(refused) = Refusal::from_proto(r.refusal, &r.detail, asked, chain.id()) {
            return Err(refused);
        }
        Ok(match what {
            Work::Sign(s) => Done::Signed(s.clone().complete(
                (r.timestamp_seconds, r.timestamp_nanos),
                r.signature,
                r.extension_signature,
            )),
            Work::Bytes(_) => Done::Bytes(r.signature),
        })
    }

    /// A stopwatch for the sign budget (`keyraft_sign_stage_seconds`).
    fn stages(&self) -> Stages<'_> {
        Stages {
            metric: &self.core.metrics.sign_stage_seconds,
            since: Instant::now(),
        }
    }
}

/// Times the stages of one signature: each [`Stages::done`] records the
/// time since the previous one under its stage's label.
struct Stages<'a> {
    metric: &'a prometheus::HistogramVec,
    since: Instant,
}

impl Stages<'_> {
    fn done(&mut self, stage: &str) {
        let now = Instant::now();
        self.metric
            .with_label_values(&[stage])
            .observe(now.duration_since(self.since).as_secs_f64());
        self.since = now;
    }
}
