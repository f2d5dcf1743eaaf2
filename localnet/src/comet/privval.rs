//! The CometBFT node's side of the privval protocol: it listens on
//! `priv_validator_laddr`, a remote signer dials in, and the node sends it
//! requests one at a time.
//!
//! Owns: the listener (TCP with SecretConnection under an ephemeral identity,
//! as CometBFT does, or a Unix socket without it), the current connection
//! and one queued standby connection (CometBFT's `SignerListenerEndpoint`
//! keeps the same pair), length-delimited protobuf framing, read/write
//! deadlines, pings, and the numbers a benchmark reads (round trips per
//! signature). Must not: retry on its own (the caller decides, as CometBFT's
//! `RetrySignerClient` does), hold a connection that missed a deadline, or
//! let one silent dialer stop the node from accepting others for long.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cometbft_p2p::{AsyncReadMsg, AsyncSecretConnection, AsyncWriteMsg};
use cometbft_proto::v0_38::crypto::public_key;
use cometbft_proto::v0_38::privval::{message::Sum, Message, RemoteSignerError};
use cometbft_proto::v0_38::types::{BlockId, Proposal as RawProposal, Vote as RawVote};
use cometbft_proto::v1::privval::v1;
use ed25519_dalek::{SigningKey, VerifyingKey};
use prost::Message as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::consensus;

/// CometBFT's read/write deadline on the signer connection.
pub const READ_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// A dialer that has not finished the SecretConnection handshake by then is
/// dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between pings of an idle connection (CometBFT's ping loop sleeps
/// about a second between pings).
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// Largest privval message accepted (CometBFT's limit is far below this).
const MAX_MSG: usize = 1 << 20;
/// Signature round trips kept for the percentiles.
const SAMPLES: usize = 10_000;

/// Where the node listens for its signer: `tcp://HOST:PORT` (or bare
/// `HOST:PORT`) or `unix:///path`, as CometBFT's `priv_validator_laddr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A `priv_validator_laddr` that is not one.
#[derive(Debug, thiserror::Error)]
pub enum BadListen {
    #[error("unix:// needs a socket path")]
    NoPath,
    #[error("{0:?} is neither tcp://HOST:PORT nor unix:///PATH: {1}")]
    Neither(String, std::net::AddrParseError),
}

impl FromStr for Listen {
    type Err = BadListen;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(BadListen::NoPath);
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        addr.parse()
            .map(Listen::Tcp)
            .map_err(|e| BadListen::Neither(s.to_string(), e))
    }
}

/// Why a connection to the signer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Wire {
    #[error("{0}")]
    Io(Arc<std::io::Error>),
    #[error("SecretConnection: {0}")]
    Secret(Arc<cometbft_p2p::Error>),
    #[error("bad length prefix")]
    BadPrefix,
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
    #[error("read/write deadline missed")]
    Deadline,
}

impl From<std::io::Error> for Wire {
    fn from(e: std::io::Error) -> Wire {
        Wire::Io(Arc::new(e))
    }
}

impl From<cometbft_p2p::Error> for Wire {
    fn from(e: cometbft_p2p::Error) -> Wire {
        Wire::Secret(Arc::new(e))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no signer connected")]
    NoSigner,
    #[error("signer connection failed: {0}")]
    Transport(Wire),
    /// The signer answered with a `RemoteSignerError`; CometBFT does not
    /// retry these.
    #[error("signer refused (code {code}): {description}")]
    Remote { code: i32, description: String },
    #[error("unexpected reply from the signer: {0}")]
    Unexpected(String),
}

enum Conn {
    Secret(Box<AsyncSecretConnection<TcpStream>>),
    Plain(UnixStream),
}

impl Conn {
    async fn send<M: prost::Message + Send + Sync>(&mut self, msg: M) -> Result<(), Wire> {
        match self {
            Conn::Secret(c) => Ok(c.write_msg(msg).await?),
            Conn::Plain(s) => Ok(s.write_all(&msg.encode_length_delimited_to_vec()).await?),
        }
    }

    async fn recv<M: prost::Message + Default>(&mut self) -> Result<M, Wire> {
        match self {
            Conn::Secret(c) => Ok(c.read_msg::<M>().await?),
            Conn::Plain(s) => read_delimited(s).await,
        }
    }
}

/// Reads one varint-length-prefixed protobuf message.
async fn read_delimited<M: prost::Message + Default>(s: &mut UnixStream) -> Result<M, Wire> {
    let mut len: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = s.read_u8().await?;
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        if shift >= 63 {
            return Err(Wire::BadPrefix);
        }
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_MSG {
        return Err(Wire::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

/// A signer's answer as the node reads it.
#[derive(Debug)]
enum Reply {
    /// A 0.38 answer, or a 1.x one of the same shape read as 0.38's.
    Old(Message),
    /// 1.x's public key answer.
    Key(v1::PubKeyResponse),
    /// 1.x's raw-bytes answer.
    Bytes(v1::SignBytesResponse),
}

impl Reply {
    fn from_v1(m: v1::Message) -> Result<Reply, Wire> {
        Ok(match m.sum {
            Some(v1::message::Sum::PubKeyResponse(r)) => Reply::Key(r),
            Some(v1::message::Sum::SignBytesResponse(r)) => Reply::Bytes(r),
            _ => Reply::Old(Message::decode(m.encode_to_vec().as_slice())?),
        })
    }
}

fn request(sum: v1::message::Sum) -> v1::Message {
    v1::Message { sum: Some(sum) }
}

/// A message as another with the same fields and tags (0.38's vote as
/// 1.x's).
fn recode<A: prost::Message, B: prost::Message + Default>(a: &A) -> Result<B, CallError> {
    B::decode(a.encode_to_vec().as_slice()).map_err(|e| CallError::Unexpected(e.to_string()))
}

/// What the node saw of its signer, for `/privval` and benchmarks.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PrivvalStats {
    pub connected: bool,
    /// Connections taken into use.
    pub connections: u64,
    /// Connections dropped after an error or a missed deadline.
    pub disconnects: u64,
    pub sign_requests: u64,
    pub signed: u64,
    pub remote_errors: u64,
    pub transport_errors: u64,
    pub bad_replies: u64,
    /// 1.x raw bytes signed and refused (`--sign-bytes`).
    #[serde(default)]
    pub bytes_signed: u64,
    #[serde(default)]
    pub bytes_refused: u64,
    /// Raw bytes that read as one of the chain's votes and were signed
    /// anyway: a signer that lets a vote through as bytes (must stay 0).
    #[serde(default)]
    pub disguised_signed: u64,
    pub last_error: Option<String>,
    pub sign_ms_p50: Option<f64>,
    pub sign_ms_p99: Option<f64>,
    pub sign_ms_max: Option<f64>,
    pub samples: usize,
}

#[derive(Default)]
struct Counters {
    stats: PrivvalStats,
    samples: std::collections::VecDeque<Duration>,
}

pub struct Endpoint {
    /// Speaks CometBFT 1.x's `cometbft.privval.v1` (else 0.38's).
    v1: bool,
    current: tokio::sync::Mutex<Option<Conn>>,
    queued: tokio::sync::Mutex<mpsc::Receiver<Conn>>,
    connected: AtomicBool,
    counters: Mutex<Counters>,
}

impl Endpoint {
    /// Binds the listener and starts accepting signers in the background.
    /// `identity`: the TCP listener's SecretConnection seed (`None`: one
    /// made for this process, as CometBFT does).
    pub async fn bind(
        listen: &Listen,
        identity: Option<[u8; 32]>,
        v1: bool,
    ) -> std::io::Result<Arc<Endpoint>> {
        let (tx, rx) = mpsc::channel(1);
        match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).await?;
                tracing::info!(addr = %l.local_addr()?, "privval listening (tcp, SecretConnection)");
                let seed = identity.unwrap_or_else(rand::random::<[u8; 32]>);
                tokio::spawn(accept_tcp(l, SigningKey::from_bytes(&seed), tx));
            }
            Listen::Unix(path) => {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let l = UnixListener::bind(path)?;
                tracing::info!(path = %path.display(), "privval listening (unix)");
                tokio::spawn(accept_unix(l, tx));
            }
        }
        Ok(Arc::new(Endpoint {
            v1,
            current: tokio::sync::Mutex::new(None),
            queued: tokio::sync::Mutex::new(rx),
            connected: AtomicBool::new(false),
            counters: Mutex::new(Counters::default()),
        }))
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> PrivvalStats {
        self.stats_after(0)
    }

    /// [`Endpoint::stats`] with the latencies of the first `skip` signatures
    /// left out (a benchmark's warm-up: the first ones wait for the signer's
    /// cluster to start). Counted from the oldest sample kept.
    pub fn stats_after(&self, skip: usize) -> PrivvalStats {
        let c = self.counters();
        let mut s = c.stats.clone();
        s.connected = self.connected.load(Ordering::Relaxed);
        let mut v: Vec<f64> = c
            .samples
            .iter()
            .skip(skip)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        s.sign_ms_p50 = pick(0.5);
        s.sign_ms_p99 = pick(0.99);
        s.sign_ms_max = v.last().copied();
        s.samples = v.len();
        s
    }

    fn note_error(&self, e: &CallError) {
        let mut c = self.counters();
        match e {
            CallError::Remote { .. } => c.stats.remote_errors += 1,
            CallError::Unexpected(_) => c.stats.bad_replies += 1,
            CallError::NoSigner | CallError::Transport(_) => c.stats.transport_errors += 1,
        }
        c.stats.last_error = Some(e.to_string());
    }

    /// Sends one request and waits for its reply, in the endpoint's
    /// version: a 1.x endpoint writes the request with the 1.x schema and
    /// reads the reply with it, then gives it back as 0.38's message (the
    /// same tags) where one exists; a 1.x public key answer is
    /// [`Reply::Key`].
    async fn call(&self, req: v1::Message, wait: Duration) -> Result<Reply, CallError> {
        let mut current = self.current.lock().await;
        if current.is_none() {
            let mut queued = self.queued.lock().await;
            let got = if wait.is_zero() {
                queued.try_recv().ok()
            } else {
                tokio::time::timeout(wait, queued.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let conn = got.ok_or(CallError::NoSigner)?;
            *current = Some(conn);
            self.connected.store(true, Ordering::Relaxed);
            self.counters().stats.connections += 1;
        }
        let Some(conn) = current.as_mut() else {
            return Err(CallError::NoSigner);
        };
        let v1 = self.v1;
        let exchange = async {
            if v1 {
                conn.send(req).await?;
                Reply::from_v1(conn.recv::<v1::Message>().await?)
            } else {
                let old = Message::decode(req.encode_to_vec().as_slice())?;
                conn.send(old).await?;
                Ok(Reply::Old(conn.recv::<Message>().await?))
            }
        };
        match tokio::time::timeout(READ_WRITE_TIMEOUT, exchange).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(self.drop_conn(&mut current, e)),
            Err(_) => Err(self.drop_conn(&mut current, Wire::Deadline)),
        }
    }

    fn drop_conn(&self, current: &mut Option<Conn>, why: Wire) -> CallError {
        *current = None;
        self.connected.store(false, Ordering::Relaxed);
        self.counters().stats.disconnects += 1;
        tracing::warn!("signer connection dropped: {why}");
        CallError::Transport(why)
    }

    /// Pings the signer (taking a queued connection if there is one and
    /// none is in use). A failed ping drops the connection.
    pub async fn ping(&self) {
        let req = request(v1::message::Sum::PingRequest(v1::PingRequest {}));
        let _ = self.call(req, Duration::ZERO).await;
    }

    /// Asks the signer for the validator's public key, and reads it as the
    /// endpoint's version does: a 1.x node finds no key in a 0.38 answer
    /// (CometBFT 1.x: "can't get pubkey: encoding: unsupported key").
    pub async fn pub_key(&self, chain_id: &str, wait: Duration) -> Result<VerifyingKey, CallError> {
        let req = request(v1::message::Sum::PubKeyRequest(v1::PubKeyRequest {
            chain_id: chain_id.to_string(),
        }));
        let r = self.call(req, wait).await;
        let (bytes, error) = match self.checked(r)? {
            Reply::Key(r) => (
                (r.pub_key_type == "ed25519").then_some(r.pub_key_bytes),
                r.error.map(|e| RemoteSignerError {
                    code: e.code,
                    description: e.description,
                }),
            ),
            Reply::Old(Message {
                sum: Some(Sum::PubKeyResponse(r)),
            }) => match r.pub_key.and_then(|k| k.sum) {
                Some(public_key::Sum::Ed25519(bytes)) => (Some(bytes), r.error),
                _ => (None, r.error),
            },
            other => return Err(self.failed(CallError::Unexpected(format!("{other:?}")))),
        };
        if let Some(e) = error {
            return Err(self.failed(CallError::Remote {
                code: e.code,
                description: e.description,
            }));
        }
        bytes
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or_else(|| {
                self.failed(CallError::Unexpected(
                    "can't get pubkey: encoding: unsupported key".into(),
                ))
            })
    }

    /// Asks the signer to sign `vote`; returns the vote it signed, which
    /// must be the one asked for (step, height, round, block). A 1.x node
    /// with `skip_extension` asks for no extension signature, and takes
    /// one in the answer as a bad reply.
    pub async fn sign_vote(
        &self,
        chain_id: &str,
        vote: RawVote,
        skip_extension: bool,
        wait: Duration,
    ) -> Result<RawVote, CallError> {
        let asked = vote.clone();
        let req = request(v1::message::Sum::SignVoteRequest(v1::SignVoteRequest {
            vote: Some(recode(&vote)?),
            chain_id: chain_id.to_string(),
            skip_extension_signing: skip_extension,
        }));
        self.counters().stats.sign_requests += 1;
        let started = Instant::now();
        let r = self.call(req, wait).await;
        match self.checked(r)? {
            Reply::Old(Message {
                sum: Some(Sum::SignedVoteResponse(r)),
            }) => match (r.vote, r.error) {
                (_, Some(e)) => Err(self.failed(CallError::Remote {
                    code: e.code,
                    description: e.description,
                })),
                (Some(v), None) => {
                    let v = same_vote(&asked, v, skip_extension).map_err(|e| self.failed(e))?;
                    self.signed(started.elapsed());
                    Ok(v)
                }
                (None, None) => {
                    Err(self.failed(CallError::Unexpected("empty vote response".into())))
                }
            },
            other => Err(self.failed(CallError::Unexpected(format!("{other:?}")))),
        }
    }

    /// Asks the signer to sign `proposal`; returns the proposal it signed,
    /// which must be the one asked for.
    pub async fn sign_proposal(
        &self,
        chain_id: &str,
        proposal: RawProposal,
        wait: Duration,
    ) -> Result<RawProposal, CallError> {
        let asked = proposal.clone();
        let req = request(v1::message::Sum::SignProposalRequest(
            v1::SignProposalRequest {
                proposal: Some(recode(&proposal)?),
                chain_id: chain_id.to_string(),
            },
        ));
        self.counters().stats.sign_requests += 1;
        let started = Instant::now();
        let r = self.call(req, wait).await;
        match self.checked(r)? {
            Reply::Old(Message {
                sum: Some(Sum::SignedProposalResponse(r)),
            }) => match (r.proposal, r.error) {
                (_, Some(e)) => Err(self.failed(CallError::Remote {
                    code: e.code,
                    description: e.description,
                })),
                (Some(p), None) => {
                    let p = same_proposal(&asked, p).map_err(|e| self.failed(e))?;
                    self.signed(started.elapsed());
                    Ok(p)
                }
                (None, None) => {
                    Err(self.failed(CallError::Unexpected("empty proposal response".into())))
                }
            },
            other => Err(self.failed(CallError::Unexpected(format!("{other:?}")))),
        }
    }

    /// 1.x: asks the signer to sign raw `value`; returns the signature.
    /// Counted apart from votes and proposals (`bytes_*` in the stats).
    pub async fn sign_bytes(&self, value: Vec<u8>, wait: Duration) -> Result<Vec<u8>, CallError> {
        let req = request(v1::message::Sum::SignBytesRequest(v1::SignBytesRequest {
            value,
        }));
        let r = self.call(req, wait).await;
        let got = match self.checked(r)? {
            Reply::Bytes(r) => match r.error {
                Some(e) => Err(CallError::Remote {
                    code: e.code,
                    description: e.description,
                }),
                None if r.signature.len() == 64 => Ok(r.signature),
                None => Err(CallError::Unexpected(
                    "a bytes signature of the wrong size".into(),
                )),
            },
            other => Err(CallError::Unexpected(format!("{other:?}"))),
        };
        let mut c = self.counters();
        match &got {
            Ok(_) => c.stats.bytes_signed += 1,
            Err(CallError::Remote { .. }) => c.stats.bytes_refused += 1,
            Err(_) => c.stats.bad_replies += 1,
        }
        got
    }

    /// A reply the node found wrong after reading it (a signature that
    /// does not verify).
    pub fn note_bad_reply(&self) {
        self.counters().stats.bad_replies += 1;
    }

    /// Raw bytes that are a vote of the chain came back signed.
    pub fn note_disguised_signed(&self) {
        self.counters().stats.disguised_signed += 1;
    }

    fn checked(&self, r: Result<Reply, CallError>) -> Result<Reply, CallError> {
        r.map_err(|e| self.failed(e))
    }

    fn failed(&self, e: CallError) -> CallError {
        self.note_error(&e);
        e
    }

    fn signed(&self, took: Duration) {
        let mut c = self.counters();
        c.stats.signed += 1;
        if c.samples.len() == SAMPLES {
            c.samples.pop_front();
        }
        c.samples.push_back(took);
    }
}

fn same_block(a: Option<&BlockId>, b: Option<&BlockId>) -> bool {
    consensus::block_key(a) == consensus::block_key(b)
}

fn same_vote(asked: &RawVote, got: RawVote, skip_extension: bool) -> Result<RawVote, CallError> {
    if skip_extension && !got.extension_signature.is_empty() {
        return Err(CallError::Unexpected(
            "an extension signature came back where none was asked for".into(),
        ));
    }
    if got.r#type != asked.r#type
        || got.height != asked.height
        || got.round != asked.round
        || !same_block(asked.block_id.as_ref(), got.block_id.as_ref())
        || got.signature.is_empty()
    {
        return Err(CallError::Unexpected(format!(
            "signed vote {}/{}/{} is not the one asked for ({}/{}/{}) or unsigned",
            got.height, got.round, got.r#type, asked.height, asked.round, asked.r#type
        )));
    }
    Ok(got)
}

fn same_proposal(asked: &RawProposal, got: RawProposal) -> Result<RawProposal, CallError> {
    if got.height != asked.height
        || got.round != asked.round
        || !same_block(asked.block_id.as_ref(), got.block_id.as_ref())
        || got.signature.is_empty()
    {
        return Err(CallError::Unexpected(format!(
            "signed proposal {}/{} is not the one asked for ({}/{}) or unsigned",
            got.height, got.round, asked.height, asked.round
        )));
    }
    Ok(got)
}

/// Accepts signers over TCP: one SecretConnection handshake at a time, under
/// `identity`.
async fn accept_tcp(listener: TcpListener, identity: SigningKey, queue: mpsc::Sender<Conn>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("privval accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handshake = AsyncSecretConnection::new(stream, &identity);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(conn)) => {
                tracing::info!(%peer, signer = %conn.peer_public_key(), "signer connected");
                if queue.send(Conn::Secret(Box::new(conn))).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!(%peer, "SecretConnection handshake failed: {e}"),
            Err(_) => tracing::warn!(%peer, "SecretConnection handshake timed out"),
        }
    }
}

async fn accept_unix(listener: UnixListener, queue: mpsc::Sender<Conn>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tracing::info!("signer connected (unix)");
                if queue.send(Conn::Plain(stream)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("privval accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_like_cometbft() {
        assert_eq!(
            "tcp://127.0.0.1:26659".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:26659".parse().unwrap())
        );
        assert_eq!(
            "127.0.0.1:1".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            "unix:///run/pv.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/pv.sock".into())
        );
        assert!("unix://".parse::<Listen>().is_err());
        assert!("tcp://nowhere".parse::<Listen>().is_err());
    }

    #[tokio::test]
    async fn a_warm_up_can_be_left_out_of_the_latencies() {
        let dir = tempfile::tempdir().unwrap();
        let listen = Listen::Unix(dir.path().join("pv.sock"));
        let ep = Endpoint::bind(&listen, None, false).await.unwrap();
        for ms in [900, 800, 1, 2, 3] {
            ep.signed(Duration::from_millis(ms));
        }
        let all = ep.stats();
        assert_eq!((all.samples, all.sign_ms_max), (5, Some(900.0)));
        let after = ep.stats_after(2);
        assert_eq!((after.samples, after.sign_ms_max), (3, Some(3.0)));
        assert_eq!(after.signed, 5, "the count of signatures stays whole");
        assert_eq!(ep.stats_after(9).samples, 0);
    }
}
