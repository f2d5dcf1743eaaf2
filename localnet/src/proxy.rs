//! TCP fault proxies: every peer link of a local cluster runs through one,
//! so that a link can be cut, or slowed down, without root.
//!
//! Owns: forwarding bytes between a listen port and an upstream address; the
//! cut: while cut, bytes are read and thrown away in both directions (a
//! blackhole: the sender sees silence and timeouts, not a refused
//! connection), and a connection that lived through a cut is closed when the
//! link heals, since bytes were lost; and the latency: each chunk is
//! delivered a one-way delay (plus or minus a random jitter) after it was
//! read, never before an earlier chunk (TCP does not reorder). Must not:
//! look inside the traffic (it is TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The one-way delay a link adds in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub delay: Duration,
    /// Each chunk's delay is drawn uniformly from `delay - jitter ..= delay + jitter`.
    pub jitter: Duration,
}

impl Latency {
    fn draw(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let spread = self.jitter.as_micros() as u64 * 2;
        (self.delay + Duration::from_micros(rand::random_range(0..=spread)))
            .saturating_sub(self.jitter)
    }
}

/// One proxied link.
pub struct Proxy {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    latency: Arc<watch::Sender<Latency>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0 for any) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(watch::channel(false).0);
        let latency = Arc::new(watch::channel(Latency::default()).0);
        let (state, slow) = (cut.clone(), latency.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, upstream, state.subscribe(), slow.subscribe()));
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            cut,
            latency,
            task,
        })
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Delays every chunk from now on, open connections included.
    pub fn set_latency(&self, latency: Latency) {
        self.latency.send_replace(latency);
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

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    latency: watch::Receiver<Latency>,
) {
    if *cut.borrow_and_update() {
        // Accepted while cut: swallow everything until the link heals, then close.
        swallow(&mut client, &mut cut).await;
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut up = tokio::spawn(pump(cr, sw, cut.clone(), latency.clone()));
    let mut down = tokio::spawn(pump(sr, cw, cut.clone(), latency));
    let mut tainted = false;
    loop {
        tokio::select! {
            _ = &mut up => break,
            _ = &mut down => break,
            changed = cut.changed() => {
                if changed.is_err() { break }
                let now_cut = *cut.borrow();
                if now_cut {
                    tainted = true;
                } else if tainted {
                    break;
                }
            }
        }
    }
    up.abort();
    down.abort();
}

/// One direction of a link: reads chunks and delivers each after the
/// link's latency, in order; drops what is read or due while cut.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: watch::Receiver<bool>,
    latency: watch::Receiver<Latency>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let cut_w = cut.clone();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            // tokio rounds a timer up to its next millisecond tick, so a
            // sleep to a deadline already reached would still cost up to a
            // millisecond per chunk: on a link without latency, none.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if !*cut_w.borrow() && to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return, // Dropping `tx` lets the writer drain.
                Ok(n) => n,
            };
            if *cut.borrow() {
                continue;
            }
            let due = (Instant::now() + latency.borrow().draw()).max(last);
            last = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
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
    async fn delays_each_direction_within_the_jitter_and_keeps_order() {
        let p = Proxy::start("127.0.0.1:0".parse().unwrap(), echo_server().await)
            .await
            .unwrap();
        p.set_latency(Latency {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(10),
        });
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let mut rtts = Vec::new();
        for i in 0..20u8 {
            let t = std::time::Instant::now();
            c.write_all(&[i; 4]).await.unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [i; 4], "bytes out of order");
            rtts.push(t.elapsed());
        }
        // Two one-way delays of 30..=50 ms each, plus scheduling.
        let (min, max) = (rtts.iter().min().unwrap(), rtts.iter().max().unwrap());
        assert!(
            *min >= Duration::from_millis(60),
            "fastest round trip {min:?}"
        );
        assert!(
            *max < Duration::from_millis(200),
            "slowest round trip {max:?}"
        );
        assert!(max > min, "no jitter: {rtts:?}");
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
