//! The run's clock and the judge's record: the simulated time since the
//! run began (as keyraft's lease arithmetic takes it), the chain's height,
//! the time line, the oracle, and the ground truth the oracle is judged
//! against (nodes restored behind what they held, who was up when a
//! membership change began, the residual risk a run went through).
//!
//! Owns: what every part of a run reports to and reads the time from.
//! Must not: act on a host or a process; the world and the models do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyraft::ledger::{Command, SignVerdict};
use keyraft::raft::store::Observer;
use keyraft::signer::Hrs;
use tokio::time::Instant;

use crate::host::Hosts;
use crate::oracle::Oracle;
use crate::types::NodeId;

thread_local! {
    /// Print the time line as it happens (`--seed S --live`).
    pub static LIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Locks `m`, a poisoned lock taken as it is (a run's panic is counted
/// apart; its record stays readable).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Judge {
    pub epoch: Instant,
    height: AtomicU64,
    oracle: Mutex<Oracle>,
    trace: Mutex<Vec<String>>,
    /// Step 9's documented blind spot happened: a node started behind what
    /// a peer saw of it, that peer not among those that answered.
    pub residual: Mutex<Option<String>>,
    /// Nodes restored from a copy behind what they had durably held: they
    /// forgot (ground truth, for judging step 9 at their next start).
    pub amnesic: Mutex<BTreeSet<NodeId>>,
    /// The nodes up and joined when the last membership change was asked
    /// of openraft (ground truth, for judging a change left under way).
    pub change_began_with: Mutex<BTreeSet<NodeId>>,
    /// A leader resumed from a memory image forgot signing this HRS, and
    /// from this time on every other process that was up then (and heard
    /// its confirmation) has lost its memory too: nobody knows of that
    /// signature (docs/safety.md, residual risks).
    pub forgotten_by_all: Mutex<Option<(Hrs, u64)>>,
}

impl Judge {
    /// A run that begins now, at height 1.
    pub fn begin() -> Judge {
        Judge {
            epoch: Instant::now(),
            height: AtomicU64::new(1),
            oracle: Mutex::new(Oracle::default()),
            trace: Mutex::new(Vec::new()),
            residual: Mutex::new(None),
            amnesic: Mutex::new(BTreeSet::new()),
            change_began_with: Mutex::new(BTreeSet::new()),
            forgotten_by_all: Mutex::new(None),
        }
    }

    /// The chain moves to its next height; returns it.
    pub fn next_height(&self) -> u64 {
        self.height.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The time line so far.
    pub fn trace(&self) -> Vec<String> {
        lock(&self.trace).clone()
    }

    pub fn height(&self) -> u64 {
        self.height.load(Ordering::Relaxed)
    }

    pub fn at_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The simulation's clock as keyraft's lease arithmetic takes it (ns).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn at_ns(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    pub fn note(&self, what: String) {
        let line = format!("{:>6} ms  {what}", self.at_ms());
        if LIVE.with(std::cell::Cell::get) {
            eprintln!("{line}");
        }
        lock(&self.trace).push(line);
    }

    pub(crate) fn oracle(&self) -> std::sync::MutexGuard<'_, Oracle> {
        lock(&self.oracle)
    }

    /// What the state machines committed, for the oracle.
    pub fn committed_hook(self: &Arc<Self>) -> Observer {
        let w = Arc::downgrade(self);
        Arc::new(move |log_id, cmd| {
            let (index, term) = (log_id.index, log_id.leader_id.term);
            let Some(w) = w.upgrade() else {
                return;
            };
            let at = w.at_ms();
            let mut o = w.oracle();
            let what = cmd.map_or_else(|| "(no command)".to_string(), |(c, _)| c.to_string());
            o.applied(index, term, &what, at);
            let Some((cmd, reply)) = cmd else {
                return;
            };
            let Some(SignVerdict::Sign { .. }) = reply.sign else {
                return;
            };
            match cmd {
                Command::Signed {
                    height,
                    round,
                    step,
                    digest,
                    ..
                } => o.committed((*height, *round, *step), digest),
                Command::SignAhead {
                    height,
                    round,
                    step,
                    digest,
                    through,
                    ..
                } => {
                    o.committed((*height, *round, *step), digest);
                    // One into the next height starts at its first step.
                    let after = if through.0 > *height {
                        (through.0, 0, 0)
                    } else {
                        (*height, *round, *step)
                    };
                    o.reserved(after, *through);
                }
                _ => {}
            }
        })
    }

    /// Step 9, judged against the ground truth: a node restored behind
    /// what it had durably held has just been let start. If a peer that
    /// answered it remembered more of it than it holds, the check should
    /// have refused it: a violation. If none did (the peers that saw more
    /// were down, for step 9 asks a majority; or what it lost only it knew
    /// it held, such as a leader's own entries, for followers remember a
    /// leader's term, not its log), the run went through step 9's
    /// documented blind spot (docs/safety.md, residual risks), and what
    /// follows is reported apart.
    pub fn check_residual(
        &self,
        id: NodeId,
        holds: keyraft::raft::memory::Holds,
        answered: &BTreeMap<NodeId, keyraft::raft::memory::Remembered>,
    ) {
        if !lock(&self.amnesic).remove(&id) {
            return;
        }
        let at = self.at_ms();
        if let Some((peer, gap)) = answered
            .iter()
            .find_map(|(p, seen)| seen.gap(holds).map(|g| (*p, g)))
        {
            self.oracle().violations.push(format!(
                "forgotten node let in at {at} ms: node {id} was restored behind what it held, and node {peer} answered its start knowing it ({gap}), yet it started (step 9 must refuse it)"
            ));
            return;
        }
        let why = format!(
            "node {id} was restored behind what it held and started: none of the peers that answered (nodes {:?}) remembered more of it",
            answered.keys().collect::<Vec<_>>()
        );
        self.note(format!("RESIDUAL RISK: {why}"));
        lock(&self.residual).get_or_insert(why);
    }

    pub fn signature(&self, node: NodeId, hrs: Hrs, digest: &str, timestamp: (i64, i32)) {
        let at = self.at_ms();
        if LIVE.with(std::cell::Cell::get) {
            self.note(format!("node {node} signs {hrs:?} {digest}"));
        }
        let mut oracle = self.oracle();
        let before = oracle.violations.len();
        oracle.signature(node, hrs, digest, timestamp, at);
        let forgotten = *lock(&self.forgotten_by_all);
        if oracle.violations.len() > before
            && forgotten.is_some_and(|(h, since)| h == hrs && since <= at)
        {
            // Not a violation of what keyraft promises: the signature it
            // repeats was known to no process alive.
            let v = oracle.violations.pop().unwrap_or_default();
            drop(oracle);
            let why = format!("{v}, when every process that heard it signed had lost its memory");
            self.note(format!("RESIDUAL RISK: {why}"));
            lock(&self.residual).get_or_insert(why);
        }
    }

    pub fn bad_signature(&self, node: NodeId, why: &str) {
        let at = self.at_ms();
        self.oracle().bad_signature(node, why, at);
    }

    /// A host's key may have just become usable: nobody else's may be,
    /// and it signs the open height at once.
    pub fn usable<P>(&self, hosts: &Hosts<P>, id: NodeId) {
        let now = Instant::now();
        let Some(host) = hosts.get(id) else {
            return;
        };
        if !host.signs(now) {
            return;
        }
        let at = self.at_ms();
        for other in hosts.all().filter(|h| h.id != id) {
            if other.signs(now) {
                self.oracle().overlap(id, other.id, at);
            }
        }
        let height = self.height();
        self.oracle().height_signed(id, height, at);
    }
}
