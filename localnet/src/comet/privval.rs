//! The CometBFT node's side of the privval protocol: it listens on
//! `priv_validator_laddr`, a remote signer dials in, and the node sends it
//! requests one at a time.
//!
//! Owns: the current connection and one queued standby connection
//! (CometBFT's `SignerListenerEndpoint` keeps the same pair), read/write
//! deadlines, pings, checking each answer against its request, and the
//! numbers a benchmark reads (round trips per signature). Must not: retry
//! on its own (the caller decides, as CometBFT's `RetrySignerClient` does),
//! or hold a connection that missed a deadline. The socket itself is
//! [`super::socket`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cometbft_proto::v0_38::crypto::public_key;
use cometbft_proto::v0_38::privval::{message::Sum, Message, RemoteSignerError};
use cometbft_proto::v0_38::types::{BlockId, Proposal as RawProposal, Vote as RawVote};
use cometbft_proto::v1::privval::v1;
use ed25519_dalek::VerifyingKey;
use prost::Message as _;
use serde::Serialize;
use tokio::sync::mpsc;

use super::consensus;
use super::socket::{self, Conn, Listen, Wire};

/// The read/write deadline on the signer connection (stricter than
/// CometBFT's 5 s).
pub const READ_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection with no exchange for this long is pinged: CometBFT's
/// signer listener pings every two thirds of its 5 s read/write timeout,
/// its ticker reset by every answer (0.34 to 1.x), so a signer that signs
/// is never pinged.
pub const PING_EVERY: Duration = Duration::from_millis(3_333);
/// Signature round trips kept for the percentiles.
const SAMPLES: usize = 10_000;

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
    /// When the last request ended, answered or not.
    last_exchange: Mutex<Instant>,
}

impl Endpoint {
    /// Binds the listener and starts accepting signers in the background
    /// ([`socket::accept`]).
    pub async fn bind(
        listen: &Listen,
        identity: Option<[u8; 32]>,
        v1: bool,
    ) -> std::io::Result<Arc<Endpoint>> {
        let rx = socket::accept(listen, identity).await?;
        Ok(Arc::new(Endpoint {
            v1,
            current: tokio::sync::Mutex::new(None),
            queued: tokio::sync::Mutex::new(rx),
            connected: AtomicBool::new(false),
            counters: Mutex::new(Counters::default()),
            last_exchange: Mutex::new(Instant::now()),
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
        let done = match tokio::time::timeout(READ_WRITE_TIMEOUT, exchange).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(self.drop_conn(&mut current, e)),
            Err(_) => Err(self.drop_conn(&mut current, Wire::Deadline)),
        };
        *self.lock_last_exchange() = Instant::now();
        done
    }

    fn lock_last_exchange(&self) -> MutexGuard<'_, Instant> {
        self.last_exchange.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pings the signer whenever the connection has been quiet for
    /// [`PING_EVERY`], as CometBFT's ping loop does; never returns.
    pub async fn keep_pinging(&self) {
        loop {
            let quiet = self.lock_last_exchange().elapsed();
            match PING_EVERY.checked_sub(quiet) {
                Some(left) if !left.is_zero() => tokio::time::sleep(left).await,
                _ => {
                    self.ping().await;
                    // A ping that found no connection ends no exchange.
                    *self.lock_last_exchange() = Instant::now();
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn a_signer_is_pinged_only_after_a_quiet_spell() {
        use cometbft_proto::v0_38::privval::PingResponse;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let listen = Listen::Unix(dir.path().join("pv.sock"));
        let ep = Endpoint::bind(&listen, None, false).await.unwrap();
        let Listen::Unix(path) = listen else {
            unreachable!()
        };
        let (pinged, mut pings) = tokio::sync::mpsc::unbounded_channel();
        let _stub = tokio::spawn(async move {
            let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
            let pong = Message {
                sum: Some(Sum::PingResponse(PingResponse {})),
            };
            while let Ok(len) = s.read_u8().await {
                let mut m = vec![0; usize::from(len)];
                s.read_exact(&mut m).await.unwrap();
                let m = Message::decode(m.as_slice()).unwrap();
                assert!(matches!(m.sum, Some(Sum::PingRequest(_))), "{m:?}");
                let _ = pinged.send(Instant::now());
                let _ = s.write_all(&pong.encode_length_delimited_to_vec()).await;
            }
        });
        // The first exchange takes the queued connection.
        let first = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                ep.ping().await;
                if ep.stats().connections == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        first.await.expect("the stub connects");
        let answered = pings.recv().await.unwrap();
        let pinger = ep.clone();
        let _pinger = tokio::spawn(async move { pinger.keep_pinging().await });
        let next = tokio::time::timeout(PING_EVERY * 2, pings.recv())
            .await
            .expect("a quiet signer is pinged")
            .unwrap();
        let quiet = next - answered;
        assert!(
            quiet >= PING_EVERY - Duration::from_millis(100),
            "pinged {quiet:?} after an answer, not {PING_EVERY:?}"
        );
    }
}
