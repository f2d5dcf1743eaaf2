//! The gate: what the Raft server handlers need to know beyond openraft,
//! and the election bookkeeping the coordinator reads.
//!
//! Owns: whether this node may grant votes (restart quiet, rejoin) or take
//! leadership by transfer, whether it has joined at all, and when leaders
//! were last heard from. Must not: decide anything itself; the coordinator
//! sets its switches and the Raft service consults them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
// tokio's clock: the real one in a running node, the simulator's virtual
// one under `keyraft-sim` (sim/), where the same gate decides votes.
use tokio::time::Instant;

use crate::config::Live;
use crate::ledger::NodeId;

/// What the Raft server handlers need to know beyond openraft: the
/// conditions under which this node grants votes or accepts leadership.
pub struct Gate {
    started: Instant,
    /// Votes are refused for this long after start: a restarted node has
    /// forgotten the leader lease it promised before it stopped.
    restart_quiet: std::time::Duration,
    /// Cleared while this node rejoins with an empty data dir.
    votes_open: AtomicBool,
    /// Set once start-up has decided this node may take part in Raft at all.
    /// Until then every Raft message is refused: a node with an empty data
    /// dir that is about to be refused (step 9) must not accept a leader's
    /// entries and so look, at its next start, as if it had kept its data.
    joined: AtomicBool,
    /// Whether this node may take leadership by transfer (eligible to validate).
    accepts_leadership: AtomicBool,
    /// Whether this node, leading, sends heartbeats (off: a leader that
    /// may not validate goes quiet so that an eligible standby takes over).
    heartbeats: AtomicBool,
    /// When an AppendEntries (or heartbeat) from a leader last arrived.
    last_leader_contact: Mutex<Option<Instant>>,
    /// The same, per leader: when each node was last heard from as leader.
    contacts: Mutex<BTreeMap<NodeId, Instant>>,
    /// When this node was last seen leading (see [`Gate::since_any_leader`]).
    last_led: Mutex<Option<Instant>>,
    /// The last candidate refused a vote here with a log behind this
    /// node's, and when (see [`Gate::saw_behind_candidate`]).
    behind_candidate: Mutex<Option<(NodeId, Instant)>>,
    /// Wakes the coordinator when such a candidate shows up.
    nudge: tokio::sync::Notify,
    /// While this node leads, the last log index its own store has fsynced
    /// (its entry in openraft's replication progress); 0 otherwise. Sent
    /// with every append, so that followers remember what a leader held
    /// (step 9): a leader restored from a copy of its own term is caught.
    own_durable: AtomicU64,
    /// The timing in force (the cluster's profile with auto timing), the
    /// one before it, and when it changed (see [`Gate::live_change`]).
    live: Mutex<(Live, Live, Instant)>,
    /// Votes are refused until then: the longest promise this node made
    /// when it acked a leader's message, or, leading with the key, its
    /// lease plus kill bound and drift (see [`Gate::promise_until`]).
    promised: Mutex<Option<Instant>>,
    /// Where the longest promise this node ever made in an ack is kept,
    /// and that promise (see [`Gate::record_promise`]); `None` in tests
    /// and the simulator, whose processes keep nothing across a restart.
    record: Option<(PathBuf, tokio::sync::Mutex<Duration>)>,
}

/// The file in the data dir that keeps the longest promise made.
pub const PROMISE_FILE: &str = "promise";

/// The longest vote refusal a leader's message can ask for (a bound on a
/// malformed one: no profile comes near it).
pub const MAX_PROMISE: Duration = Duration::from_secs(10);

/// The promise kept in `path` by an earlier run ([`Gate::record_promise`]):
/// none where there is no file; [`MAX_PROMISE`] where it cannot be read
/// or makes no sense, since a restart quiet too long costs a few seconds
/// and one too short may elect a node inside a lease it promised.
pub fn recorded_promise(path: &Path) -> Duration {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Duration::ZERO,
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(ms) => Duration::from_millis(ms).min(MAX_PROMISE),
            Err(_) => {
                tracing::warn!(path = %path.display(), "the recorded lease promise is unreadable: presuming the longest");
                MAX_PROMISE
            }
        },
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the recorded lease promise ({e}): presuming the longest");
            MAX_PROMISE
        }
    }
}

fn stamp(at: &Mutex<Option<Instant>>) {
    *at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
}

fn age(at: &Mutex<Option<Instant>>) -> Option<std::time::Duration> {
    at.lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t.elapsed())
}

impl Gate {
    pub fn new(restart_quiet: std::time::Duration, votes_open: bool, live: Live) -> Gate {
        Gate {
            started: Instant::now(),
            restart_quiet,
            votes_open: AtomicBool::new(votes_open),
            joined: AtomicBool::new(false),
            accepts_leadership: AtomicBool::new(false),
            heartbeats: AtomicBool::new(true),
            last_leader_contact: Mutex::new(None),
            contacts: Mutex::new(BTreeMap::new()),
            last_led: Mutex::new(None),
            behind_candidate: Mutex::new(None),
            nudge: tokio::sync::Notify::new(),
            own_durable: AtomicU64::new(0),
            live: Mutex::new((live, live, Instant::now())),
            promised: Mutex::new(None),
            record: None,
        }
    }

    /// The gate of a node starting on `data_dir`: one with no Raft state
    /// (`fresh`) grants no votes until it knows it is new, and every one
    /// refuses votes for the longest lease it may have promised before it
    /// stopped: the longest its own timing promises (`own`), or the longest
    /// it recorded, whichever is longer. `live`: the timing in force.
    pub fn at_start(data_dir: &Path, own: Duration, fresh: bool, live: Live) -> Gate {
        let path = data_dir.join(PROMISE_FILE);
        let recorded = recorded_promise(&path);
        Gate::new(own.max(recorded), !fresh, live).with_promise_record(path, recorded)
    }

    /// Keeps the longest promise this node makes in an ack in `path`
    /// (`recorded`: what an earlier run kept there), so that the restart
    /// quiet of its next start covers it: a leader whose profile is longer
    /// than any of this node's may ask more than this node's timing knows.
    pub fn with_promise_record(mut self, path: PathBuf, recorded: Duration) -> Gate {
        self.record = Some((path, tokio::sync::Mutex::new(recorded)));
        self
    }

    /// Before an ack that promises `promise` leaves: where it is longer
    /// than any recorded, it is written (fsynced) first. An error means the
    /// ack must not leave: a restart would forget the promise.
    pub async fn record_promise(&self, promise: Duration) -> std::io::Result<()> {
        let Some((path, kept)) = &self.record else {
            return Ok(());
        };
        let mut kept = kept.lock().await;
        if promise <= *kept {
            return Ok(());
        }
        let (path, ms) = (path.clone(), promise.as_millis());
        tokio::task::spawn_blocking(move || {
            crate::durable::write(&path, format!("{ms}\n").as_bytes(), 0o600)
        })
        .await
        .map_err(std::io::Error::other)??;
        *kept = promise;
        Ok(())
    }

    /// How much longer this node refuses votes for its restart or for a
    /// promise it made.
    pub fn quiet_left(&self) -> Duration {
        let restart = self.restart_quiet.saturating_sub(self.started.elapsed());
        restart.max(self.promised_for().unwrap_or_default())
    }

    /// Whether this node may stand for election now, for an operator's
    /// command as for a campaign: its votes are open (its restart quiet is
    /// over and it is not rejoining), it promised no leader a lease that
    /// may still run, and no leader was heard from within `lease`
    /// (`running`: how long this node has run, for one that heard none).
    pub fn may_stand(&self, lease: Duration, running: Duration) -> bool {
        let quiet = self.since_any_leader().unwrap_or(running);
        self.may_grant_votes() && self.promised_for().is_none() && quiet >= lease
    }

    /// The timing in force.
    pub fn live(&self) -> Live {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The timing in force, the one before it, and how long ago it changed:
    /// a message sent before the change carried the old promise, so a lease
    /// counted from it must not use a longer fence (see
    /// `coordinator::policy::fence_in_force`).
    pub fn live_change(&self) -> (Live, Live, std::time::Duration) {
        let (now, before, at) = *self.live.lock().unwrap_or_else(|p| p.into_inner());
        (now, before, at.elapsed())
    }

    /// Puts `live` in force (the cluster committed its profile). Returns
    /// whether it changed anything.
    pub fn set_live(&self, live: Live) -> bool {
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if l.0 == live {
            return false;
        }
        *l = (live, l.0, Instant::now());
        true
    }

    /// Refuses votes until at least `until` (never shortens an earlier
    /// promise: one made in an ack must hold however the timing changes).
    pub fn promise_until(&self, until: Instant) {
        let mut p = self.promised.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none_or(|p| p < until) {
            *p = Some(until);
        }
    }

    /// How much longer this node has promised to refuse votes.
    pub fn promised_for(&self) -> Option<std::time::Duration> {
        let p = *self.promised.lock().unwrap_or_else(|p| p.into_inner());
        p.map(|p| p.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Sets what this node, leading, holds fsynced ([`Gate::own_durable`]);
    /// 0 when it does not lead.
    pub fn set_own_durable(&self, index: u64) {
        self.own_durable.store(index, Ordering::Relaxed);
    }

    /// The last log index this node holds fsynced while it leads, or 0.
    /// Only a lower bound: it is read from openraft's metrics, which lag.
    pub fn own_durable(&self) -> u64 {
        self.own_durable.load(Ordering::Relaxed)
    }

    /// Records that candidate `id` asked for a vote with a log behind this
    /// node's: it cannot win without this node's entries, so this node
    /// should lead long enough to hand them over (see the coordinator's
    /// last-resort campaign), and wakes the coordinator.
    pub fn saw_behind_candidate(&self, id: NodeId) {
        *self
            .behind_candidate
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((id, Instant::now()));
        self.nudge.notify_one();
    }

    /// The candidate behind this node's log that asked within `within`.
    pub fn behind_candidate(&self, within: std::time::Duration) -> Option<NodeId> {
        self.behind_candidate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|(_, at)| at.elapsed() < within)
            .map(|(id, _)| id)
    }

    /// Resolves after the next [`Gate::saw_behind_candidate`].
    pub async fn nudged(&self) {
        self.nudge.notified().await
    }

    pub fn may_grant_votes(&self) -> bool {
        self.started.elapsed() >= self.restart_quiet && self.votes_open.load(Ordering::Relaxed)
    }

    /// Why a vote that comes with a leadership transfer must not be passed
    /// to openraft yet, if it must not. openraft skips its leader-lease check
    /// for such votes, so keyraft checks the lease of the key's holder here:
    /// while a node holds the key unreleased (`holder`, per this node's
    /// applied ledger) and led here within `lease`, or this node restarted
    /// within the lease (it forgot when it last heard from the holder), a
    /// transfer to anyone else would skip the wait of step 3.
    pub fn transfer_vote_refusal(
        &self,
        holder: Option<NodeId>,
        unapplied: Option<u64>,
        candidate: NodeId,
        lease: std::time::Duration,
    ) -> Option<String> {
        if !self.votes_open.load(Ordering::Relaxed) {
            return Some("not granting votes while rejoining".into());
        }
        // The holder is read from the applied ledger: with entries of its
        // log not applied yet (an activation, say), it may be out of date.
        if let Some(last) = unapplied {
            return Some(format!("its log up to {last} is not applied yet"));
        }
        let h = holder.filter(|h| *h != candidate)?;
        if self.started.elapsed() < self.restart_quiet {
            return Some(format!(
                "node {h} holds the key unreleased and this node restarted within the lease"
            ));
        }
        match self.since_contact_from(h) {
            Some(d) if d < lease => Some(format!(
                "node {h} holds the key unreleased and led here {} ms ago",
                d.as_millis()
            )),
            _ => None,
        }
    }

    pub fn join(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
    }

    /// False while this node rejoins with an empty data dir.
    pub fn votes_open(&self) -> bool {
        self.votes_open.load(Ordering::Relaxed)
    }

    pub fn open_votes(&self) {
        self.votes_open.store(true, Ordering::Relaxed);
    }

    pub fn set_accepts_leadership(&self, yes: bool) {
        self.accepts_leadership.store(yes, Ordering::Relaxed);
    }

    pub fn accepts_leadership(&self) -> bool {
        self.accepts_leadership.load(Ordering::Relaxed)
    }

    /// Sets whether this node's heartbeats go out while it leads (read by
    /// [`super::heartbeat_while_leading`], which sends them).
    pub fn set_heartbeats(&self, on: bool) {
        self.heartbeats.store(on, Ordering::Relaxed);
    }

    pub fn heartbeats(&self) -> bool {
        self.heartbeats.load(Ordering::Relaxed)
    }

    /// This node accepted a message of leader `from` (entries, a
    /// heartbeat or a snapshot), whose ack may renew that leader's lease:
    /// notes the contact and, before the ack leaves, promises to refuse
    /// votes for `promise` from now (`None`: openraft's own lease is long
    /// enough). Every kind of accepted leader message goes through here,
    /// since the leader counts each of them as an ack.
    pub fn acked_leader(&self, from: NodeId, promise: Option<std::time::Duration>) {
        self.leader_contact(from);
        if let Some(p) = promise {
            self.promise_until(Instant::now() + p);
        }
    }

    /// Records a message accepted from leader `from`.
    pub fn leader_contact(&self, from: NodeId) {
        stamp(&self.last_leader_contact);
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, Instant::now());
    }

    /// How long since `id` was last heard from as leader.
    pub fn since_contact_from(&self, id: NodeId) -> Option<std::time::Duration> {
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|t| t.elapsed())
    }

    pub fn since_leader_contact(&self) -> Option<std::time::Duration> {
        age(&self.last_leader_contact)
    }

    /// Records that this node is the leader now.
    pub fn leading(&self) {
        stamp(&self.last_led);
    }

    /// How long there has been no leader in sight: since a leader's last
    /// message, or since this node itself last led, whichever is later. A
    /// leader that has just handed over must not count its own reign as
    /// leaderless time and campaign against the node it handed over to.
    pub fn since_any_leader(&self) -> Option<std::time::Duration> {
        match (self.since_leader_contact(), age(&self.last_led)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The restart quiet covers the longest promise recorded, whatever
    /// the file holds: missing is none, unreadable is the longest there is.
    #[tokio::test]
    async fn the_restart_quiet_covers_the_longest_promise_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::at_start(dir.path(), Duration::from_millis(600), false, live());
        assert!(gate.quiet_left() <= Duration::from_millis(600));
        gate.record_promise(Duration::from_millis(4_000))
            .await
            .unwrap();
        gate.record_promise(Duration::from_millis(900))
            .await
            .unwrap();
        let file = dir.path().join(PROMISE_FILE);
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "4000");
        let again = Gate::at_start(dir.path(), Duration::from_millis(600), false, live());
        assert!(again.quiet_left() > Duration::from_millis(3_900));
        assert!(!again.may_stand(Duration::ZERO, Duration::from_secs(60)));
        for garbage in ["", "soon", "-5"] {
            std::fs::write(&file, garbage).unwrap();
            assert_eq!(recorded_promise(&file), MAX_PROMISE, "{garbage:?}");
        }
        std::fs::write(&file, "99999999").unwrap();
        assert_eq!(recorded_promise(&file), MAX_PROMISE);
        // A promise that cannot be written is an error: the ack must not leave.
        let gone = Gate::new(Duration::ZERO, true, live())
            .with_promise_record(dir.path().join("no/such/dir/promise"), Duration::ZERO);
        assert!(gone.record_promise(Duration::from_secs(1)).await.is_err());
    }

    /// A LAN timing for tests of the gate and of what holds one.
    pub(crate) fn live() -> Live {
        let d = Duration::from_millis;
        Live {
            profile: crate::ledger::TimingProfile::Lan,
            heartbeat: d(50),
            election_min: d(300),
            election_max: d(600),
            fence_after: d(300),
            handover_delay: d(0),
            promise: d(600),
        }
    }

    #[test]
    fn a_promise_is_never_shortened_and_runs_out() {
        let gate = Gate::new(Duration::ZERO, true, live());
        assert_eq!(gate.promised_for(), None);
        gate.promise_until(Instant::now());
        assert_eq!(gate.promised_for(), None, "a promise that ran out");
        gate.promise_until(Instant::now() + Duration::from_millis(900));
        gate.promise_until(Instant::now() + Duration::from_millis(600));
        let left = gate.promised_for().unwrap();
        assert!(left > Duration::from_millis(800), "{left:?}");
    }

    #[test]
    fn an_acked_leader_message_notes_the_contact_and_any_promise() {
        let gate = Gate::new(Duration::ZERO, true, live());
        gate.acked_leader(1, None);
        assert!(gate.since_contact_from(1).is_some());
        assert_eq!(gate.promised_for(), None, "openraft's lease suffices");
        gate.acked_leader(2, Some(Duration::from_millis(800)));
        assert!(gate.since_contact_from(2).is_some());
        assert!(gate.promised_for().unwrap() > Duration::from_millis(700));
    }

    #[test]
    fn a_new_timing_remembers_the_one_before() {
        let gate = Gate::new(Duration::ZERO, true, live());
        assert!(!gate.set_live(live()), "the same timing is no change");
        let wan = Live {
            fence_after: Duration::from_millis(600),
            ..live()
        };
        assert!(gate.set_live(wan));
        let (now, before, since) = gate.live_change();
        assert_eq!((now, before), (wan, live()));
        assert!(since < Duration::from_secs(5));
        assert_eq!(gate.live(), wan);
    }

    #[test]
    fn a_transfer_vote_waits_out_an_unreleased_holders_lease() {
        let lease = Duration::from_millis(600);
        let gate = Gate::new(Duration::ZERO, true, live());
        gate.leader_contact(1);
        // (holder, log not applied up to, candidate, refused?)
        let table = [
            (None, None, 2, false),
            (Some(2), None, 2, false),
            (Some(1), None, 2, true),
            (Some(3), None, 2, false),
            // No holder applied, but the log holds more: an activation
            // among those entries would make another node the holder.
            (None, Some(7), 2, true),
            (Some(2), Some(7), 2, true),
        ];
        for (holder, unapplied, candidate, refused) in table {
            assert_eq!(
                gate.transfer_vote_refusal(holder, unapplied, candidate, lease)
                    .is_some(),
                refused,
                "holder {holder:?}, unapplied {unapplied:?}, candidate {candidate}"
            );
        }
        assert!(gate
            .transfer_vote_refusal(Some(1), None, 2, Duration::ZERO)
            .is_none());
        // Restarted within the lease: it forgot when it heard the holder.
        let quiet = Gate::new(lease, true, live());
        assert!(quiet
            .transfer_vote_refusal(Some(1), None, 2, lease)
            .is_some());
        assert!(quiet.transfer_vote_refusal(None, None, 2, lease).is_none());
        // Rejoining: no votes at all.
        let rejoining = Gate::new(Duration::ZERO, false, live());
        assert!(rejoining
            .transfer_vote_refusal(None, None, 2, lease)
            .is_some());
    }
}
