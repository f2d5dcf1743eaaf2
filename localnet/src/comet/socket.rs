//! The privval socket, the node's end: where it listens
//! (`priv_validator_laddr`), accepting signers, and the messages' framing.
//!
//! Owns: the listener (TCP with SecretConnection under an ephemeral
//! identity, as CometBFT does, or a Unix socket without it), the handshake
//! deadline, length-delimited protobuf framing and why a connection failed.
//! Must not: choose which connection to use or send requests of its own
//! ([`super::privval::Endpoint`] does), or let one silent dialer stop the
//! node from accepting others for long.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cometbft_p2p::{AsyncReadMsg, AsyncSecretConnection, AsyncWriteMsg};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;

/// A dialer that has not finished the SecretConnection handshake by then is
/// dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest privval message accepted (CometBFT's limit is far below this).
const MAX_MSG: usize = 1 << 20;

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

pub(super) enum Conn {
    Secret(Box<AsyncSecretConnection<TcpStream>>),
    Plain(UnixStream),
}

impl Conn {
    pub(super) async fn send<M: prost::Message + Send + Sync>(
        &mut self,
        msg: M,
    ) -> Result<(), Wire> {
        match self {
            Conn::Secret(c) => Ok(c.write_msg(msg).await?),
            Conn::Plain(s) => Ok(s.write_all(&msg.encode_length_delimited_to_vec()).await?),
        }
    }

    pub(super) async fn recv<M: prost::Message + Default>(&mut self) -> Result<M, Wire> {
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

/// Binds `listen` and accepts signers in the background; each connection
/// is queued, one at a time. `identity`: the TCP listener's
/// SecretConnection seed (`None`: one made for this process, as CometBFT
/// does).
pub(super) async fn accept(
    listen: &Listen,
    identity: Option<[u8; 32]>,
) -> std::io::Result<mpsc::Receiver<Conn>> {
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
    Ok(rx)
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
}
