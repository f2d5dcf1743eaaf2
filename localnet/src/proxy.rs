//! TCP fault proxies: every peer link of a local cluster runs through one,
//! so that a link can be cut without root.
//!
//! Owns: forwarding bytes between a listen port and an upstream address, and
//! the cut: while cut, bytes are read and thrown away in both directions (a
//! blackhole: the sender sees silence and timeouts, not a refused
//! connection). A connection that lived through a cut is closed when the
//! link heals, since bytes were lost; the client reconnects. Must not: look
//! inside the traffic (it is TLS).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied link.
pub struct Proxy {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0 for any) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(watch::channel(false).0);
        let state = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, upstream, state.subscribe()));
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            cut,
            task,
        })
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections notice the closed channel and end.
        self.cut.send_replace(true);
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        // Accepted while cut: swallow everything until the link heals, then close.
        swallow(&mut client, &mut cut).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut a, mut b) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    let mut tainted = false;
    loop {
        tokio::select! {
            r = cr.read(&mut a) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if !*cut.borrow() && sw.write_all(&a[..n]).await.is_err() { return },
            },
            r = sr.read(&mut b) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if !*cut.borrow() && cw.write_all(&b[..n]).await.is_err() { return },
            },
            changed = cut.changed() => {
                if changed.is_err() { return }
                let now_cut = *cut.borrow();
                if now_cut {
                    tainted = true;
                } else if tainted {
                    return;
                }
            }
        }
    }
}

async fn swallow(client: &mut TcpStream, cut: &mut watch::Receiver<bool>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            changed = cut.changed() => if changed.is_err() || !*cut.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_blackholes_and_closes_on_heal() {
        let p = Proxy::start("127.0.0.1:0".parse().unwrap(), echo_server().await)
            .await
            .unwrap();
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 5];
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        p.cut();
        c.write_all(b"lost!").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
        assert!(silent.is_err(), "a cut link answered");

        p.heal();
        let closed = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "a connection that lived through a cut stayed open"
        );

        let mut d = TcpStream::connect(p.addr).await.unwrap();
        d.write_all(b"again").await.unwrap();
        d.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    }
}
