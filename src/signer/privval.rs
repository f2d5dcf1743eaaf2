//! keyraft's end of the privval connections: it dials each CometBFT node's
//! `priv_validator_laddr` (as tmkms does), proves itself with its
//! SecretConnection identity, and answers the node's requests one at a time,
//! in the privval version the connection speaks ([`super::protocol`]).
//!
//! Owns: dialing with backoff, the SecretConnection handshake (TCP) or plain
//! framing (Unix socket), the idle deadline, the identity key file, and the
//! `keyraft_privval_connected{node}` gauge. Must not: sign anything itself
//! (every request goes to [`super::Signer::handle`]) or stop retrying while
//! keyraft runs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use base64::Engine;
use cometbft_p2p::{AsyncReadMsg, AsyncSecretConnection, AsyncWriteMsg};
use cometbft_proto::v1::privval::v1::Message;
use ed25519_dalek::SigningKey;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::protocol::{self, Frame};
use super::{Chain, Signer, MAX_PRIVVAL_MESSAGE};
use crate::config::PrivvalAddr;
use crate::node::{PrivvalLinks, Shared};

/// A node pings about every second; silence this long means the link is dead.
const IDLE: Duration = Duration::from_secs(10);
const CONNECT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the privval identity key {path}: {why}")]
    Read { path: String, why: String },
    #[error("cannot write the privval identity key {path}: {why}")]
    Write { path: String, why: String },
}

/// Loads the SecretConnection identity (a base64 32-byte ed25519 seed, as
/// tmkms's `secret_key`), making one on first start.
pub fn identity(path: &Path) -> Result<SigningKey, IdentityError> {
    let p = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| IdentityError::Read {
                    path: p.clone(),
                    why: e.to_string(),
                })?;
            let seed: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::Read {
                path: p.clone(),
                why: "not a 32-byte seed".into(),
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            let text = base64::engine::general_purpose::STANDARD.encode(key.to_bytes());
            crate::durable::create_new(path, text.as_bytes(), 0o600).map_err(|e| {
                IdentityError::Write {
                    path: p,
                    why: e.to_string(),
                }
            })?;
            tracing::info!(path = %path.display(), "made a privval identity key");
            Ok(key)
        }
        Err(e) => Err(IdentityError::Read {
            path: p,
            why: e.to_string(),
        }),
    }
}

/// Why a privval connection ended, or never began.
#[derive(Debug, thiserror::Error)]
pub enum PrivvalError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("SecretConnection handshake timed out")]
    HandshakeTimeout,
    #[error("SecretConnection handshake: {0}")]
    Handshake(cometbft_p2p::Error),
    #[error("the listener's identity is {theirs}, not the pinned {pinned}: refused, nothing is signed for it")]
    NotPinned { theirs: String, pinned: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Secret(cometbft_p2p::Error),
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
    #[error("nothing from the node for {0:?}")]
    Idle(Duration),
}

enum Conn {
    Secret(Box<AsyncSecretConnection<TcpStream>>),
    Plain(UnixStream),
}

impl Conn {
    async fn open(addr: &PrivvalAddr, identity: &SigningKey) -> Result<Conn, PrivvalError> {
        match addr {
            PrivvalAddr::Tcp { addr: a, pin } => {
                let stream = tokio::time::timeout(CONNECT, TcpStream::connect(a))
                    .await
                    .map_err(|_| PrivvalError::ConnectTimeout)??;
                let _ = stream.set_nodelay(true);
                let conn =
                    tokio::time::timeout(CONNECT, AsyncSecretConnection::new(stream, identity))
                        .await
                        .map_err(|_| PrivvalError::HandshakeTimeout)?
                        .map_err(PrivvalError::Handshake)?;
                let theirs = conn.peer_public_key().peer_id();
                if let Some(pin) = pin {
                    if theirs.as_bytes() != pin {
                        return Err(PrivvalError::NotPinned {
                            theirs: hex::encode(theirs.as_bytes()),
                            pinned: hex::encode(pin),
                        });
                    }
                }
                Ok(Conn::Secret(Box::new(conn)))
            }
            PrivvalAddr::Unix(p) => Ok(Conn::Plain(UnixStream::connect(p).await?)),
        }
    }

    async fn recv(&mut self) -> Result<Message, PrivvalError> {
        match self {
            Conn::Secret(c) => c.read_msg::<Message>().await.map_err(PrivvalError::Secret),
            Conn::Plain(s) => {
                let mut len: usize = 0;
                for shift in (0..35).step_by(7) {
                    let b = s.read_u8().await?;
                    len |= usize::from(b & 0x7f) << shift;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                if len > MAX_PRIVVAL_MESSAGE {
                    return Err(PrivvalError::TooLarge(len));
                }
                let mut buf = vec![0u8; len];
                s.read_exact(&mut buf).await?;
                Ok(Message::decode(buf.as_slice())?)
            }
        }
    }

    async fn send(&mut self, frame: Frame) -> Result<(), PrivvalError> {
        match frame {
            Frame::V0_38(m) => self.send_msg(m).await,
            Frame::V1(m) => self.send_msg(m).await,
            Frame::Either(m) => self.send_msg(m).await,
        }
    }

    async fn send_msg<M: prost::Message + Send + Sync>(
        &mut self,
        m: M,
    ) -> Result<(), PrivvalError> {
        match self {
            Conn::Secret(c) => c.write_msg(m).await.map_err(PrivvalError::Secret),
            Conn::Plain(s) => Ok(s.write_all(&m.encode_length_delimited_to_vec()).await?),
        }
    }
}

/// One connection's life: open it, then answer requests until it fails,
/// or until a reload retires its chain (between two requests: one being
/// answered is answered).
async fn session(
    signer: &Signer,
    links: &PrivvalLinks,
    chain: &Chain,
    addr: &PrivvalAddr,
    name: &str,
    identity: &SigningKey,
) -> Result<(), PrivvalError> {
    let mut conn = Conn::open(addr, identity).await?;
    // What it speaks is the connection's for its life: a node switches
    // protocols only by restarting (at its chain's upgrade halt).
    let version = chain.cfg.protocol.version;
    tracing::info!(chain = chain.id(), node = %name, protocol = %version, "connected to the node's privval port");
    links.set(name, true);
    signer
        .core()
        .metrics
        .privval_connected
        .with_label_values(&[chain.id(), name])
        .set(1);
    let mut retired = chain.retired();
    loop {
        let req = tokio::select! {
            biased;
            () = retired.requested() => return Ok(()),
            r = tokio::time::timeout(IDLE, conn.recv()) => r,
        };
        let req = req.map_err(|_| PrivvalError::Idle(IDLE))??;
        let reply = signer.handle(chain, version, protocol::read(req)).await;
        conn.send(protocol::write(version, reply)).await?;
    }
}

/// Keeps a connection to `addr`, a node of `chain`, for as long as
/// keyraft runs and a reload does not retire the chain.
pub async fn run(
    signer: Arc<Signer>,
    sh: Arc<Shared>,
    chain: Arc<Chain>,
    addr: PrivvalAddr,
    identity: SigningKey,
    mut stop: Shutdown,
) {
    let mut retired = chain.retired();
    let name = addr.to_string();
    let gauge = signer
        .core()
        .metrics
        .privval_connected
        .with_label_values(&[chain.id(), &name]);
    gauge.set(0);
    sh.privval.set(&name, false);
    let mut backoff = BACKOFF_MIN;
    // Say each failure once, not every backoff: a refused dial repeated is
    // one line, a new failure (an identity refused) is always another.
    let mut said: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.requested() => return,
            r = session(&signer, &sh.privval, &chain, &addr, &name, &identity) => {
                let was_up = sh.privval.get(&name);
                if let Err(e) = r {
                    let e = e.to_string();
                    if was_up || said.as_deref() != Some(e.as_str()) {
                        tracing::warn!(node = %name, "privval connection: {e}; retrying");
                    }
                    said = Some(e);
                }
                if was_up {
                    backoff = BACKOFF_MIN;
                }
            }
        }
        sh.privval.set(&name, false);
        gauge.set(0);
        if chain.is_retired() {
            break;
        }
        tokio::select! {
            _ = stop.requested() => return,
            () = retired.requested() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    // Retired: what it showed goes, unless the chain that replaced it
    // dials the same node.
    let dialled = signer
        .chain(chain.id())
        .is_some_and(|c| c.cfg.nodes.contains(&addr));
    if !dialled {
        sh.privval.remove(&name);
        let m = &signer.core().metrics.privval_connected;
        let _ = m.remove_label_values(&[chain.id(), &name]);
        tracing::info!(chain = chain.id(), node = %name, "a reload removed the chain: its node is no longer dialled");
    }
}
