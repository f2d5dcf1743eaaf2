//! The ledger: what the cluster agrees on, and the rules that decide it.
//!
//! Every Raft log entry is a [`Command`]; applying it to [`ClusterState`]
//! is the whole replicated state machine: the key's activation history
//! (who may validate, and whether the last holder released), the operator's
//! pause, which members registered with durable state, and in signer mode
//! one signing watermark per chain with its double-sign rule
//! ([`SignerState::check`]).
//!
//! Owns: the domain types of the replicated state and their transitions,
//! as pure functions with table tests. Must not: import any other module
//! of this crate (it is the bottom of the import graph), do I/O, or know
//! how the entries are replicated (that is [`crate::raft`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A member's id in the cluster (also in its certificate, `node-N.keyraft`).
pub type NodeId = u64;

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
    /// `node` rejoins with an empty data dir (`--rejoin`): every member
    /// forgets what it saw of its history (it starts over as a learner).
    Rejoined { node: NodeId },
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
    /// Signing starts only once a floor exists. The cluster's first chain
    /// only: with another chain's watermark present it is refused.
    SignerFloor { chain_id: String, height: u64 },
    /// Signer mode: [`Command::SignerFloor`] for a chain beside others.
    /// Its own variant on purpose: a keyraft from before chains were kept
    /// apart cannot decode it and stops applying, where it would otherwise
    /// skip the second chain's entries and could hand a snapshot without
    /// that chain's watermark to a member that then signs below it.
    ChainFloor { chain_id: String, height: u64 },
    /// Auto timing: the cluster runs `profile` from here on, chosen by the
    /// leader from the round trips it measured (`rtt_ms`, the slowest
    /// voter's). Every member applies it (docs/design.md, step 3).
    SetTiming { profile: TimingProfile, rtt_ms: u32 },
}

/// A named set of timing defaults, one per deployment shape (the values are
/// in `config::timing`). Replicated: with auto timing the whole cluster
/// runs the one the log says.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TimingProfile {
    /// One datacentre or a LAN (peer round trips under 25 ms): 50 ms
    /// heartbeats, 300..600 ms elections, fenced 300 ms after the last
    /// quorum-acked heartbeat.
    #[default]
    Lan,
    /// Nearby datacentres (peer round trips up to 100 ms): 150 ms
    /// heartbeats, 450..900 ms elections, fenced after 600 ms.
    Wan,
}

impl fmt::Display for TimingProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimingProfile::Lan => "lan",
            TimingProfile::Wan => "wan",
        })
    }
}

/// The committed timing profile and the round trip it was chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingChoice {
    pub profile: TimingProfile,
    pub rtt_ms: u32,
    /// The log index that chose it.
    pub index: u64,
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
            Command::Rejoined { node } => write!(f, "node {node} rejoins with an empty data dir"),
            Command::Signed {
                chain_id,
                height,
                round,
                step,
                ..
            } => write!(f, "sign {chain_id} {height}/{round}/{step}"),
            Command::SignerFloor { chain_id, height }
            | Command::ChainFloor { chain_id, height } => {
                write!(f, "never sign {chain_id} at or below height {height}")
            }
            Command::SetTiming { profile, rtt_ms } => {
                write!(
                    f,
                    "run the {profile} timing profile (round trips up to {rtt_ms} ms)"
                )
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
    /// A floor for a second chain as [`Command::SignerFloor`] (the leader
    /// sends [`Command::ChainFloor`] for it).
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
    /// Signer mode: each chain's watermark, by chain id (a chain has none
    /// until its floor is imported). Read through [`ClusterState::watermark`].
    /// Stored under the one-chain name and shape while there is one chain,
    /// so that a keyraft from before chains were kept apart reads it; with
    /// two or more, as a map it cannot read (it stops rather than forget
    /// one: see [`Command::ChainFloor`]).
    #[serde(default, rename = "signer", with = "one_or_many")]
    watermarks: BTreeMap<String, SignerState>,
    /// Auto timing: the profile the cluster runs (absent: the one each
    /// member starts with, `lan` unless pinned).
    #[serde(default)]
    pub timing: Option<TimingChoice>,
}

impl ClusterState {
    /// Signer mode: the watermark of `chain_id`, if it has one.
    pub fn watermark(&self, chain_id: &str) -> Option<&SignerState> {
        self.watermarks.get(chain_id)
    }

    /// Signer mode: every chain's watermark, by chain id.
    pub fn watermarks(&self) -> &BTreeMap<String, SignerState> {
        &self.watermarks
    }

    /// The floor command for `chain_id` that every member can apply: the
    /// one-chain [`Command::SignerFloor`] while no other chain has a
    /// watermark, else [`Command::ChainFloor`].
    pub fn floor_command(&self, chain_id: &str, height: u64) -> Command {
        let chain_id = chain_id.to_string();
        if self.watermarks.keys().all(|c| *c == chain_id) {
            Command::SignerFloor { chain_id, height }
        } else {
            Command::ChainFloor { chain_id, height }
        }
    }

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
            Command::Rejoined { .. } => Reply::default(),
            Command::SetTiming { profile, rtt_ms } => {
                self.timing = Some(TimingChoice {
                    profile,
                    rtt_ms,
                    index,
                });
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
                let verdict = match self.watermarks.get(chain_id) {
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
                    let signatures = self.watermarks.get(chain_id).map_or(0, |w| w.signatures) + 1;
                    self.watermarks.insert(
                        chain_id.clone(),
                        SignerState {
                            chain_id: chain_id.clone(),
                            height,
                            round,
                            step,
                            digest: Some(digest.clone()),
                            timestamp,
                            signatures,
                        },
                    );
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
                if self.watermarks.keys().any(|c| c != chain_id) {
                    tracing::warn!(chain_id, "ignoring a one-chain floor beside another chain");
                    return Reply {
                        prior: None,
                        sign: Some(SignVerdict::WrongChain),
                    };
                }
                self.raise_floor(chain_id, height);
                Reply::default()
            }
            Command::ChainFloor {
                ref chain_id,
                height,
            } => {
                self.raise_floor(chain_id, height);
                Reply::default()
            }
        }
    }

    /// Lifts `chain_id`'s watermark to cover all of `height`; never lowers it.
    fn raise_floor(&mut self, chain_id: &str, height: u64) {
        let floor = (height, u32::MAX, u8::MAX);
        let w = self.watermarks.get(chain_id);
        if w.is_some_and(|w| w.hrs() >= floor) {
            return;
        }
        let signatures = w.map_or(0, |w| w.signatures);
        self.watermarks.insert(
            chain_id.to_string(),
            SignerState {
                chain_id: chain_id.to_string(),
                height,
                round: u32::MAX,
                step: u8::MAX,
                digest: None,
                timestamp: (0, 0),
                signatures,
            },
        );
    }

    /// The node that holds the key according to the log, if any.
    pub fn key_holder(&self) -> Option<NodeId> {
        self.last_key_event.filter(|e| !e.released).map(|e| e.node)
    }
}

/// The watermarks' stored shape: nothing, one [`SignerState`] (the shape
/// every keyraft reads), or a map by chain id once there are two.
mod one_or_many {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SignerState;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        One(SignerState),
        Many(BTreeMap<String, SignerState>),
    }

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, SignerState>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match m.len() {
            0 => s.serialize_none(),
            1 => m.values().next().serialize(s),
            _ => m.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, SignerState>, D::Error> {
        Ok(match Option::<Stored>::deserialize(d)? {
            None => BTreeMap::new(),
            Some(Stored::One(w)) => BTreeMap::from([(w.chain_id.clone(), w)]),
            Some(Stored::Many(m)) => m,
        })
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
        // Another chain has no watermark of its own yet.
        assert_eq!(verdict(&mut s, other), SignVerdict::NoWatermark);
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!((w.hrs(), w.signatures), ((5, 1, 1), 3));
    }

    #[test]
    fn each_chain_keeps_its_own_watermark() {
        let mut s = ClusterState::default();
        let on = |chain: &str, h, r, step, digest: &str| Command::Signed {
            chain_id: chain.into(),
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (1, 0),
        };
        s.apply(&s.floor_command("c", 0), 1);
        s.apply(&signed(10, 0, 2, "x", 1), 2);
        // The one-chain floor for a second chain is refused ...
        let one_chain = Command::SignerFloor {
            chain_id: "b".into(),
            height: 0,
        };
        assert_eq!(s.apply(&one_chain, 3).sign, Some(SignVerdict::WrongChain));
        assert_eq!(s.watermark("b"), None);
        assert_eq!(
            s.apply(&on("b", 1, 0, 1, "y"), 4).sign,
            Some(SignVerdict::NoWatermark)
        );
        // ... the leader sends the chain floor, which every member that
        // can keep chains apart applies.
        let floor = s.floor_command("b", 0);
        assert!(matches!(floor, Command::ChainFloor { .. }), "{floor:?}");
        s.apply(&floor, 5);
        assert!(matches!(
            s.apply(&on("b", 1, 0, 1, "y"), 6).sign,
            Some(SignVerdict::Sign { .. })
        ));
        // One chain's heights, conflicts and floors never touch another's.
        assert!(matches!(
            s.apply(&on("b", 10, 0, 2, "other"), 7).sign,
            Some(SignVerdict::Sign { .. })
        ));
        assert_eq!(
            s.apply(&on("c", 10, 0, 2, "z"), 8).sign,
            Some(SignVerdict::Conflict)
        );
        s.apply(&s.floor_command("b", 500), 9);
        assert_eq!(s.watermark("c").unwrap().hrs(), (10, 0, 2));
        assert_eq!(s.watermark("b").unwrap().height, 500);
        assert_eq!(s.watermark("b").unwrap().signatures, 2);
    }

    #[test]
    fn one_chain_is_stored_as_before_and_two_as_a_shape_old_members_refuse() {
        /// The replicated state as a keyraft from before chains were kept
        /// apart declares it (the part that matters here).
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Old {
            #[serde(default)]
            signer: Option<SignerState>,
        }
        let mut s = ClusterState::default();
        let json = serde_json::to_string(&s).unwrap();
        assert!(serde_json::from_str::<Old>(&json).unwrap().signer.is_none());
        s.apply(&s.floor_command("c", 0), 1);
        s.apply(&signed(10, 0, 2, "x", 1), 2);
        let json = serde_json::to_string(&s).unwrap();
        let old = serde_json::from_str::<Old>(&json).unwrap().signer.unwrap();
        assert_eq!(old.hrs(), (10, 0, 2));
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
        s.apply(&s.floor_command("b", 7), 3);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            serde_json::from_str::<Old>(&json).is_err(),
            "an old member must fail on two chains, not keep one: {json}"
        );
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
        // And the chain floor is an entry an old member cannot decode.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        #[allow(dead_code)]
        enum OldCommand {
            SignerFloor { chain_id: String, height: u64 },
        }
        let entry = serde_json::to_string(&s.floor_command("a", 1)).unwrap();
        assert!(
            serde_json::from_str::<OldCommand>(&entry).is_err(),
            "{entry}"
        );
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
            s.watermark("c").unwrap().hrs(),
            (101, 0, 1),
            "a floor never lowers"
        );
    }
}
