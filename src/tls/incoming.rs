//! A TLS port's incoming connections: each handshake on a task of its
//! own, with the acceptor current when the connection arrived.
//!
//! Owns: accepting, the handshake's time limit, and handing on finished
//! handshakes. Must not: decide who may call; the services' interceptors
//! ([`super::authenticate`], [`super::admin::authenticate`]) do.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::ServerTls;
use crate::shutdown::Shutdown;

/// The peer port's connections after the TLS handshake, each with the
/// acceptor current when it arrived (which SIGHUP swaps, see [`ServerTls::reload`]). Handshakes
/// run apart, so a slow or silent client holds up nobody else.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerTls>,
    mut stop: Shutdown,
) -> impl futures::Stream<
    Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut stopped = std::pin::pin!(async move {
            stop.requested().await;
        });
        loop {
            let tcp = tokio::select! {
                _ = &mut stopped => return,
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!("peer port: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (tls.current(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("peer TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("peer TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
