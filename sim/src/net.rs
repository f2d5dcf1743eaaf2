//! The simulated network: every peer message between processes, with the
//! faults drawn for the seed: links cut (both ways or one way, steady or
//! flapping), delay and jitter (so reordering), loss and duplication, and
//! hosts frozen (their messages wait until they thaw, then arrive stale).
//!
//! Owns: link state and one exchange (request there, answer back) bounded
//! by the caller's deadline, as a gRPC call with a deadline is. Must not:
//! look inside a message; the processes do.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::host::{Hosts, Runs};
use crate::types::NodeId;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// No answer within the deadline (cut link, lost message, dead host).
    Timeout,
    /// The host answers but no keyraft process listens (connection refused).
    Refused,
    /// The sending process itself is gone.
    SenderGone,
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Link quality for the whole cluster at one time.
#[derive(Debug, Clone, Copy)]
pub struct Quality {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub dup: f64,
}

impl Default for Quality {
    fn default() -> Self {
        Quality {
            delay: Duration::from_micros(200),
            jitter: Duration::from_micros(400),
            loss: 0.0,
            dup: 0.0,
        }
    }
}

struct State {
    rng: SmallRng,
    /// Directed links that drop everything (`(from, to)`).
    cut: BTreeSet<(NodeId, NodeId)>,
    quality: Quality,
}

/// The network all hosts share; it delivers to the process `P` that runs
/// on the host a message is for.
pub struct Net<P> {
    state: Arc<Mutex<State>>,
    hosts: Arc<Hosts<P>>,
}

impl<P> Clone for Net<P> {
    fn clone(&self) -> Self {
        Net {
            state: self.state.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

pub type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

enum Fate {
    Lost,
    Arrives(Duration, bool),
}

impl<P: Runs> Net<P> {
    pub fn new(seed: u64, hosts: Arc<Hosts<P>>) -> Net<P> {
        Net {
            state: Arc::new(Mutex::new(State {
                rng: SmallRng::seed_from_u64(seed),
                cut: BTreeSet::new(),
                quality: Quality::default(),
            })),
            hosts,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cut(&self, from: NodeId, to: NodeId, cut: bool) {
        let mut s = self.lock();
        if cut {
            s.cut.insert((from, to));
        } else {
            s.cut.remove(&(from, to));
        }
    }

    pub fn heal(&self) {
        let mut s = self.lock();
        s.cut.clear();
        s.quality = Quality::default();
    }

    pub fn set_quality(&self, q: Quality) {
        self.lock().quality = q;
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().cut.contains(&(from, to))
    }

    /// One message's fate on the link `from` -> `to`.
    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut s = self.lock();
        let q = s.quality;
        if s.cut.contains(&(from, to)) || (q.loss > 0.0 && s.rng.random_bool(q.loss)) {
            return Fate::Lost;
        }
        let jitter = s.rng.random_range(0..=q.jitter.as_micros() as u64);
        let dup = q.dup > 0.0 && s.rng.random_bool(q.dup);
        Fate::Arrives(q.delay + Duration::from_micros(jitter), dup)
    }

    /// One request from process `inc` of `from` to whatever process runs
    /// on `to`, and its answer, within `ttl`. `call` runs on the receiving
    /// process; a duplicated request runs it twice (the copy's answer is
    /// dropped).
    pub async fn exchange<R, F>(
        &self,
        from: NodeId,
        inc: u64,
        to: NodeId,
        ttl: Duration,
        call: F,
    ) -> Result<R, NetError>
    where
        R: Send + 'static,
        F: Fn(Arc<P>) -> Boxed<R> + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let net = self.clone();
        let run = async move {
            let Some(src) = net.hosts.get(from) else {
                return Err(NetError::SenderGone);
            };
            src.running().await;
            if !src.is_process(inc) {
                return Err(NetError::SenderGone);
            }
            let dup = match net.fate(from, to) {
                Fate::Lost => return std::future::pending().await,
                Fate::Arrives(d, dup) => {
                    tokio::time::sleep(d).await;
                    dup
                }
            };
            let Some(dst) = net.hosts.get(to) else {
                return Err(NetError::Refused);
            };
            if dst.is_down() {
                return std::future::pending().await;
            }
            dst.running().await;
            let Some(p) = dst.process() else {
                return Err(NetError::Refused);
            };
            if dup {
                let (copy, later) = (call.clone(), p.clone());
                crate::types::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let _ = copy(later).await;
                });
            }
            let answer = call(p).await;
            match net.fate(to, from) {
                Fate::Lost => return std::future::pending().await,
                Fate::Arrives(d, _) => tokio::time::sleep(d).await,
            }
            src.running().await;
            if !src.is_process(inc) {
                return Err(NetError::SenderGone);
            }
            Ok(answer)
        };
        tokio::time::timeout(ttl, run)
            .await
            .unwrap_or(Err(NetError::Timeout))
    }
}
