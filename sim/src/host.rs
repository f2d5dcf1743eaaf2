//! One host, modelled where keyraft touches the OS: its power, its
//! freezes (the whole host, or only keyraft's coordinator and guard), its
//! disk, the keyraft process running on it, and below keyraft the guard,
//! the validator's process and the kernel fence. This is the boundary the
//! real `coordinator::custody` drives through `supervisor` and `fence`;
//! here it is a model with that boundary's faults: a guard late, frozen or
//! dead, a kill that takes time or never completes, a stop that is slow.
//!
//! Owns: what runs on the host and when it dies. Must not: decide anything
//! about the key; keyraft's coordinator does, through
//! `coordinator::SimValidator` (each call bounded, each able to
//! fail, as the real ones).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::disk::Disk;
use crate::types::NodeId;

/// What runs on a host: a keyraft process, known by its incarnation (the
/// host's model keeps it without looking inside; `crate::node` says what
/// it is).
pub trait Runs: Send + Sync + 'static {
    fn inc(&self) -> u64;
}

/// Every host of the run, by id.
pub struct Hosts<P>(BTreeMap<NodeId, Arc<Host<P>>>);

impl<P> Hosts<P> {
    /// Hosts `1..=nodes`, each with its own seed for its disk.
    pub fn new(nodes: NodeId, seed: u64) -> Hosts<P> {
        Hosts(
            (1..=nodes)
                .map(|id| (id, Arc::new(Host::new(id, seed ^ id))))
                .collect(),
        )
    }

    pub fn get(&self, id: NodeId) -> Option<Arc<Host<P>>> {
        self.0.get(&id).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Host<P>>> {
        self.0.values()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.0.keys().copied().collect()
    }
}

/// Faults planted in the host's OS boundary.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsFaults {
    /// The guard's timer fires this much after the deadline.
    pub late_timer: Duration,
    /// A kill of the validator's tree takes this long.
    pub kill_time: Duration,
    /// The tree cannot be killed at all (a process stuck in the kernel).
    pub unkillable: bool,
    /// A graceful stop takes this long before the validator exits.
    pub stop_time: Duration,
}

/// The validator's process on this host.
#[derive(Debug, Clone, Copy)]
pub struct Validator {
    pub pid: u32,
    pub keyed: bool,
    /// Killed: dies at this time (it runs, and may sign, until then).
    pub dies_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Freeze {
    /// The whole host: coordinator, guard and validator (`docker pause`).
    pub host: bool,
    /// keyraft's coordinator and guard, the validator still running.
    pub keyraft: bool,
}

/// What below keyraft is in one state.
#[derive(Debug, Default)]
pub struct Below {
    pub validator: Option<Validator>,
    pub guard_alive: bool,
    pub guard_frozen: bool,
    /// The guard's lease deadline.
    pub lease: Option<Instant>,
    /// The kernel fence's lease element expiry.
    pub kernel: Option<Instant>,
    pub linked: bool,
    pub faults: OsFaults,
    /// A kill sent while the tree could not die: it takes effect when it can.
    pub pending_kill: bool,
    /// The validator the guard's timer killed, until the coordinator hears.
    pub fenced_pid: Option<u32>,
    /// The last pid given to a validator on this host.
    pub pids: u32,
}

pub struct Host<P> {
    pub id: NodeId,
    pub disk: Disk,
    /// What the stores on `disk` acknowledged as durable (the judge's).
    pub acked: std::sync::Arc<crate::judged::Acked>,
    pub freeze: watch::Sender<Freeze>,
    /// Powered off (crashed, or fenced).
    down: watch::Sender<bool>,
    process: Mutex<Option<Arc<P>>>,
    /// The data dir's lock: one keyraft process at a time, a second start
    /// is refused while one starts or runs.
    pub starting: std::sync::atomic::AtomicBool,
    pub below: Mutex<Below>,
    /// Wakes the guard (and anyone waiting on a death).
    pub changed: Notify,
}

impl<P> Host<P> {
    pub fn new(id: NodeId, seed: u64) -> Host<P> {
        Host {
            id,
            disk: Disk::new(seed),
            acked: Default::default(),
            freeze: watch::channel(Freeze::default()).0,
            down: watch::channel(false).0,
            process: Mutex::new(None),
            starting: std::sync::atomic::AtomicBool::new(false),
            below: Mutex::new(Below {
                guard_alive: true,
                ..Below::default()
            }),
            changed: Notify::new(),
        }
    }

    pub fn below(&self) -> std::sync::MutexGuard<'_, Below> {
        self.below.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn process(&self) -> Option<Arc<P>> {
        self.process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_process(&self, p: Option<Arc<P>>) {
        *self.process.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    pub fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// keyraft's processes (coordinator, guard) are not frozen.
    pub fn keyraft_runs(&self) -> bool {
        let f = *self.freeze.borrow();
        !f.host && !f.keyraft
    }

    /// Waits while keyraft's processes are frozen.
    pub async fn running(&self) {
        let mut rx = self.freeze.subscribe();
        while rx.borrow_and_update().host || rx.borrow().keyraft {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the validator process can act now (alive and not frozen).
    pub fn validator_acts(&self, now: Instant) -> bool {
        let b = self.below();
        let alive = b
            .validator
            .is_some_and(|v| v.dies_at.is_none_or(|t| now < t));
        alive && !self.freeze.borrow().host
    }

    /// Whether a signature of this host's validator leaves the host now:
    /// it runs with the key, is not frozen, and the kernel fence's lease
    /// (always on in the simulation, as by default with root) holds.
    pub fn signs(&self, now: Instant) -> bool {
        let keyed = self.below().validator.is_some_and(|v| v.keyed);
        let kernel = self.below().kernel.is_some_and(|k| now < k);
        keyed && kernel && self.validator_acts(now)
    }

    /// Kills the validator's tree; it is dead `kill_time` later (never,
    /// if unkillable). Returns when it will be dead.
    pub fn kill_tree(&self, now: Instant) -> Option<Instant> {
        let mut b = self.below();
        let f = b.faults;
        b.validator?;
        if f.unkillable {
            b.pending_kill = true;
            return None;
        }
        let v = b.validator.as_mut()?;
        let at = now + f.kill_time;
        v.dies_at = Some(v.dies_at.map_or(at, |t| t.min(at)));
        drop(b);
        self.changed.notify_waiters();
        Some(at)
    }

    /// The tree can die again: a kill sent meanwhile takes effect now.
    pub fn killable_again(&self, now: Instant) {
        let pending = {
            let mut b = self.below();
            b.faults.unkillable = false;
            b.faults.stop_time = Duration::ZERO;
            std::mem::take(&mut b.pending_kill)
        };
        if pending {
            self.kill_tree(now);
        }
    }

    /// Drops a validator whose death time has passed; true if none runs.
    pub fn reap(&self, now: Instant) -> bool {
        let mut b = self.below();
        if b.validator
            .is_some_and(|v| v.dies_at.is_some_and(|t| t <= now))
        {
            b.validator = None;
        }
        b.validator.is_none()
    }

    /// A power loss: everything on the host stops at once.
    pub fn power_off(&self) {
        self.set_down(true);
        self.set_process(None);
        let mut b = self.below();
        b.validator = None;
        b.lease = None;
        b.kernel = None;
        b.linked = false;
        b.guard_alive = false;
        b.pending_kill = false;
        drop(b);
        self.changed.notify_waiters();
    }

    /// Power back on: a new guard, no validator yet.
    pub fn power_on(&self) {
        let mut b = self.below();
        b.guard_alive = true;
        b.guard_frozen = false;
        drop(b);
        self.freeze.send_replace(Freeze::default());
        self.set_down(false);
    }
}

impl<P: Runs> Host<P> {
    /// Whether incarnation `inc` is the process running here.
    pub fn is_process(&self, inc: u64) -> bool {
        self.process().is_some_and(|p| p.inc() == inc)
    }
}

/// The guard process: kills the tree when its lease runs out (late by
/// `late_timer`), unless frozen or dead. One task per host for the run.
pub async fn guard<P: Send + Sync>(host: Arc<Host<P>>) {
    loop {
        let now = Instant::now();
        let (wake, fire) = {
            let b = host.below();
            let frozen =
                b.guard_frozen || host.freeze.borrow().host || host.freeze.borrow().keyraft;
            match (b.guard_alive && !frozen, b.lease) {
                (true, Some(deadline)) => {
                    let at = deadline + b.faults.late_timer;
                    (Some(at), now >= at)
                }
                _ => (None, false),
            }
        };
        if fire {
            host.kill_tree(now);
            let mut b = host.below();
            b.lease = None;
            b.fenced_pid = b.validator.map(|v| v.pid);
            continue;
        }
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut freeze = host.freeze.subscribe();
        tokio::select! {
            biased;
            _ = host.changed.notified() => {}
            _ = freeze.changed() => {}
            _ = sleep => {}
        }
    }
}

/// Runs `f` only while keyraft's processes on `host` are not frozen: a
/// frozen process is not polled at all, its timers expire meanwhile.
pub fn while_thawed<P, F>(host: &Host<P>, f: F) -> impl Future<Output = ()> + Send
where
    F: Future<Output = ()> + Send + 'static,
{
    type Wait = Pin<Box<dyn Future<Output = watch::Receiver<Freeze>> + Send>>;
    let mut f = Box::pin(f);
    let mut rx = Some(host.freeze.subscribe());
    let mut waiting: Option<Wait> = None;
    std::future::poll_fn(move |cx| loop {
        if let Some(w) = waiting.as_mut() {
            match w.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    rx = Some(r);
                    waiting = None;
                }
            }
        }
        let Some(mut r) = rx.take() else {
            return Poll::Pending;
        };
        let frozen = {
            let now = r.borrow_and_update();
            now.host || now.keyraft
        };
        if !frozen {
            rx = Some(r);
            return f.as_mut().poll(cx);
        }
        waiting = Some(Box::pin(async move {
            if r.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            r
        }));
    })
}
