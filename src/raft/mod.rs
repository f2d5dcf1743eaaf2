//! The Raft layer: openraft's type configuration, the replicated cluster
//! state, durable storage ([`store`]), and the gRPC transport ([`network`]
//! client, [`server`] service).
//!
//! Owns: what is replicated (activation history, the paused flag, which
//! members have registered, and in signer mode the signing watermark) and
//! how openraft is configured from keyraft's timings. Must not: act on the
//! replicated state; the coordinator and the signer read it and decide.

pub mod network;
pub mod server;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::config::{NodeId, Timing};

openraft::declare_raft_types!(
    /// keyraft's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, store::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Membership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type Metrics = openraft::RaftMetrics<TypeConfig>;

/// A replicated command: one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// The leader of `term` is about to validate (safety protocol step 2).
    Activate { node: NodeId, term: u64 },
    /// The holder stopped its validator and removed the key (step 7);
    /// `height` is the last block height its node reported.
    Released {
        node: NodeId,
        term: u64,
        height: Option<u64>,
    },
    /// Operator pause: no automatic failover while set.
    SetPaused { paused: bool },
    /// `node` started with durable state; a later start with an empty data
    /// dir is then refused unless it rejoins.
    Register { node: NodeId },
    /// Signer mode: the leader is about to sign this (height, round, step)
    /// of `chain_id`. `digest` is the SHA-256 of the sign bytes with the
    /// timestamp zeroed; `timestamp` is the one that will be signed.
    Signed {
        chain_id: String,
        height: u64,
        round: u32,
        step: u8,
        digest: String,
        timestamp: (i64, i32),
    },
    /// Signer mode: never sign at or below `height` (a state file imported
    /// from the validator's previous signer; 0 for a key that never signed).
    /// Signing starts only once a floor exists.
    SignerFloor { chain_id: String, height: u64 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Activate { node, term } => write!(f, "activate node {node} in term {term}"),
            Command::Released { node, term, .. } => {
                write!(f, "node {node} released the key (term {term})")
            }
            Command::SetPaused { paused } => write!(f, "set paused={paused}"),
            Command::Register { node } => write!(f, "register node {node}"),
            Command::Signed {
                height,
                round,
                step,
                ..
            } => write!(f, "sign {height}/{round}/{step}"),
            Command::SignerFloor { height, .. } => {
                write!(f, "never sign at or below height {height}")
            }
        }
    }
}

/// One activation or release, as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    pub node: NodeId,
    pub term: u64,
    pub released: bool,
    pub index: u64,
    /// For a release: the last height the holder's node reported.
    pub height: Option<u64>,
}

/// The state machine's answer to a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// For `Activate`: the key event committed just before it.
    pub prior: Option<KeyEvent>,
    /// For `Signed`: whether the signature may be produced.
    pub sign: Option<SignVerdict>,
}

/// Where a (height, round, step) stands against the watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignVerdict {
    /// Sign, with this timestamp (the one committed first for this HRS).
    Sign { timestamp: (i64, i32) },
    /// Below the watermark.
    Regression,
    /// The watermark's HRS with other sign bytes (or an imported floor).
    Conflict,
    /// The cluster signs for another chain.
    WrongChain,
    /// No watermark yet: nothing is signed until an operator says where the
    /// key stands (`keyraft signer import-state FILE` or `--never-signed`).
    NoWatermark,
}

/// Signer mode's replicated watermark: the highest (height, round, step)
/// signed, and what was signed there. Steps are CometBFT's: 1 proposal,
/// 2 prevote, 3 precommit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerState {
    pub chain_id: String,
    pub height: u64,
    pub round: u32,
    pub step: u8,
    /// `None` for an imported floor: nothing at it may be signed.
    pub digest: Option<String>,
    pub timestamp: (i64, i32),
    /// Signatures committed, all time.
    pub signatures: u64,
}

impl SignerState {
    pub fn hrs(&self) -> (u64, u32, u8) {
        (self.height, self.round, self.step)
    }

    /// What a request for `hrs` with `digest` would get, without committing.
    pub fn check(&self, chain_id: &str, hrs: (u64, u32, u8), digest: &str) -> SignVerdict {
        if self.chain_id != chain_id {
            return SignVerdict::WrongChain;
        }
        match hrs.cmp(&self.hrs()) {
            std::cmp::Ordering::Less => SignVerdict::Regression,
            std::cmp::Ordering::Equal if self.digest.as_deref() == Some(digest) => {
                SignVerdict::Sign {
                    timestamp: self.timestamp,
                }
            }
            std::cmp::Ordering::Equal => SignVerdict::Conflict,
            std::cmp::Ordering::Greater => SignVerdict::Sign { timestamp: (0, 0) },
        }
    }
}

/// Events kept in the replicated history.
const HISTORY: usize = 64;

/// The replicated cluster state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub paused: bool,
    /// The last activation or release.
    pub last_key_event: Option<KeyEvent>,
    /// Recent key events, oldest first.
    pub history: VecDeque<KeyEvent>,
    pub registered: BTreeSet<NodeId>,
    /// Signer mode: the watermark (absent until the first signature).
    #[serde(default)]
    pub signer: Option<SignerState>,
}

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command, index: u64) -> Reply {
        let last = self.last_key_event;
        let mut key_event = |node, term, released, height| {
            let prior = self.last_key_event;
            let ev = KeyEvent {
                node,
                term,
                released,
                index,
                height,
            };
            self.last_key_event = Some(ev);
            self.history.push_back(ev);
            while self.history.len() > HISTORY {
                self.history.pop_front();
            }
            Reply { prior, sign: None }
        };
        match *cmd {
            Command::Activate { node, term } => key_event(node, term, false, None),
            // Only the holder of the last activation can release it: a stale
            // or misdirected release must not make a successor skip its wait.
            Command::Released { node, term, height } => match last {
                Some(e) if !e.released && e.node == node && e.term == term => {
                    key_event(node, term, true, height)
                }
                _ => {
                    tracing::warn!(
                        node,
                        term,
                        "ignoring a release that does not match the last activation"
                    );
                    Reply::default()
                }
            },
            Command::SetPaused { paused } => {
                self.paused = paused;
                Reply::default()
            }
            Command::Register { node } => {
                self.registered.insert(node);
                Reply::default()
            }
            Command::Signed {
                ref chain_id,
                height,
                round,
                step,
                ref digest,
                timestamp,
            } => {
                let verdict = match &self.signer {
                    None => SignVerdict::NoWatermark,
                    Some(w) => match w.check(chain_id, (height, round, step), digest) {
                        // Above the watermark: the new signature's own time.
                        SignVerdict::Sign { .. } if (height, round, step) > w.hrs() => {
                            SignVerdict::Sign { timestamp }
                        }
                        v => v,
                    },
                };
                if let SignVerdict::Sign { timestamp } = verdict {
                    let signatures = self.signer.as_ref().map_or(0, |w| w.signatures) + 1;
                    self.signer = Some(SignerState {
                        chain_id: chain_id.clone(),
                        height,
                        round,
                        step,
                        digest: Some(digest.clone()),
                        timestamp,
                        signatures,
                    });
                }
                Reply {
                    prior: None,
                    sign: Some(verdict),
                }
            }
            Command::SignerFloor {
                ref chain_id,
                height,
            } => {
                let floor = (height, u32::MAX, u8::MAX);
                match &mut self.signer {
                    Some(w) if w.chain_id != *chain_id => {
                        tracing::warn!(chain_id, "ignoring a floor for another chain");
                        return Reply {
                            prior: None,
                            sign: Some(SignVerdict::WrongChain),
                        };
                    }
                    Some(w) if w.hrs() >= floor => {}
                    w => {
                        let signatures = w.as_ref().map_or(0, |w| w.signatures);
                        *w = Some(SignerState {
                            chain_id: chain_id.clone(),
                            height,
                            round: u32::MAX,
                            step: u8::MAX,
                            digest: None,
                            timestamp: (0, 0),
                            signatures,
                        });
                    }
                }
                Reply::default()
            }
        }
    }

    /// The node that holds the key according to the log, if any.
    pub fn key_holder(&self) -> Option<NodeId> {
        self.last_key_event.filter(|e| !e.released).map(|e| e.node)
    }
}

/// openraft's configuration for keyraft's timings.
pub fn openraft_config(t: &Timing) -> Result<openraft::Config, openraft::ConfigError> {
    openraft::Config {
        cluster_name: "keyraft".into(),
        heartbeat_interval: t.heartbeat.as_millis() as u64,
        election_timeout_min: t.election_min.as_millis() as u64,
        election_timeout_max: t.election_max.as_millis() as u64,
        enable_pre_vote: Some(true),
        // CheckQuorum's quiet phase: a leader without a quorum ack for the
        // lease stops heartbeating (for the shortest period openraft
        // allows), so that a follower it still reaches is not kept from
        // joining the quorum that elects a successor.
        quorum_loss_probe_interval: Some(t.election_max.as_millis() as u64 * 2),
        // openraft's timer never starts an election: the coordinator does,
        // once this node may campaign (eligible, up for
        // `election_timeout_max`) and it is its turn (see `maybe_campaign`).
        // A random timer racing it split votes between standbys.
        enable_elect: false,
        // A restarted leader must win a fresh election before it may act.
        enable_leader_restore: Some(false),
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        purge_batch_size: 64,
        backoff: "100ms 200ms 400ms".into(),
        // A voter that lost its data dir comes back with a shorter log; keyraft
        // refuses it until it rejoins, and the leader must tolerate the reversion.
        allow_log_reversion: Some(true),
        ..Default::default()
    }
    .validate()
}

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
    pub fn new(restart_quiet: std::time::Duration, votes_open: bool) -> Gate {
        Gate {
            started: Instant::now(),
            restart_quiet,
            votes_open: AtomicBool::new(votes_open),
            joined: AtomicBool::new(false),
            accepts_leadership: AtomicBool::new(false),
            last_leader_contact: Mutex::new(None),
            contacts: Mutex::new(BTreeMap::new()),
            last_led: Mutex::new(None),
            behind_candidate: Mutex::new(None),
            nudge: tokio::sync::Notify::new(),
        }
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

    pub fn join(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
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

    /// Records an AppendEntries (or heartbeat) accepted from leader `from`.
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
mod tests {
    use super::*;

    #[test]
    fn activation_reports_the_prior_key_event() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&Command::Activate { node: 1, term: 2 }, 5).prior,
            None
        );
        assert_eq!(s.key_holder(), Some(1));
        s.apply(
            &Command::Released {
                node: 1,
                term: 2,
                height: Some(40),
            },
            6,
        );
        assert_eq!(s.key_holder(), None);
        let r = s.apply(&Command::Activate { node: 2, term: 3 }, 8);
        assert_eq!(
            r.prior,
            Some(KeyEvent {
                node: 1,
                term: 2,
                released: true,
                index: 6,
                height: Some(40),
            })
        );
    }

    #[test]
    fn only_the_last_activation_can_be_released() {
        let mut s = ClusterState::default();
        let release = |node, term| Command::Released {
            node,
            term,
            height: None,
        };
        // Nothing to release yet.
        s.apply(&release(1, 1), 1);
        assert_eq!(s.last_key_event, None);
        s.apply(&Command::Activate { node: 1, term: 2 }, 2);
        // Another node, or the same node in another term: ignored.
        s.apply(&release(2, 2), 3);
        s.apply(&release(1, 1), 4);
        assert_eq!(s.key_holder(), Some(1));
        s.apply(&release(1, 2), 5);
        assert_eq!(s.key_holder(), None);
        // Released twice: the second changes nothing.
        let before = s.clone();
        s.apply(&release(1, 2), 6);
        assert_eq!(s, before);
    }

    fn never_signed() -> Command {
        Command::SignerFloor {
            chain_id: "c".into(),
            height: 0,
        }
    }

    fn signed(h: u64, r: u32, step: u8, digest: &str, ts: i64) -> Command {
        Command::Signed {
            chain_id: "c".into(),
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (ts, 0),
        }
    }

    #[test]
    fn the_watermark_signs_each_hrs_once_and_never_below() {
        let mut s = ClusterState::default();
        let verdict = |s: &mut ClusterState, c| s.apply(&c, 1).sign.unwrap();
        // Nothing is signed before an operator said where the key stands.
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 10)),
            SignVerdict::NoWatermark
        );
        s.apply(&never_signed(), 1);
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 10)),
            SignVerdict::Sign { timestamp: (10, 0) }
        );
        // The same HRS and bytes, later timestamp: the first timestamp again.
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 11)),
            SignVerdict::Sign { timestamp: (10, 0) }
        );
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "b", 12)),
            SignVerdict::Conflict
        );
        assert_eq!(
            verdict(&mut s, signed(5, 0, 1, "a", 12)),
            SignVerdict::Regression
        );
        assert_eq!(
            verdict(&mut s, signed(4, 9, 3, "a", 12)),
            SignVerdict::Regression
        );
        assert_eq!(
            verdict(&mut s, signed(5, 1, 1, "c", 13)),
            SignVerdict::Sign { timestamp: (13, 0) }
        );
        let other = Command::Signed {
            chain_id: "other".into(),
            height: 9,
            round: 0,
            step: 1,
            digest: "d".into(),
            timestamp: (1, 0),
        };
        assert_eq!(verdict(&mut s, other), SignVerdict::WrongChain);
        let w = s.signer.clone().unwrap();
        assert_eq!((w.hrs(), w.signatures), ((5, 1, 1), 3));
    }

    #[test]
    fn an_imported_floor_blocks_its_whole_height_and_never_lowers() {
        let mut s = ClusterState::default();
        let floor = |h| Command::SignerFloor {
            chain_id: "c".into(),
            height: h,
        };
        s.apply(&floor(100), 1);
        for step in 1..=3 {
            for round in [0, 5] {
                let v = s.apply(&signed(100, round, step, "a", 1), 2).sign.unwrap();
                assert_ne!(v, SignVerdict::Sign { timestamp: (1, 0) }, "{round}/{step}");
            }
        }
        assert!(matches!(
            s.apply(&signed(101, 0, 1, "a", 1), 3).sign,
            Some(SignVerdict::Sign { .. })
        ));
        s.apply(&floor(50), 4);
        assert_eq!(
            s.signer.as_ref().unwrap().hrs(),
            (101, 0, 1),
            "a floor never lowers"
        );
    }

    #[test]
    fn default_timings_make_a_valid_openraft_config() {
        let t = crate::config::RunArgs {
            node_id: Some(1),
            peer: vec!["2=127.0.0.1:7702".into()],
            listen: Some("127.0.0.1:7700".parse().unwrap()),
            insecure: true,
            witness: true,
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .timing;
        let c = openraft_config(&t).unwrap();
        assert_eq!((c.election_timeout_min, c.election_timeout_max), (300, 600));
        assert_eq!(c.quorum_loss_probe_interval, Some(1200));
    }
}
