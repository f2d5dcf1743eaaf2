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

mod watermark;
pub use watermark::{SignVerdict, SignedAt, SignerState};

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
    /// dir is then refused unless it rejoins. `mode`: the mode it runs in
    /// (absent from a keyraft from before modes were recorded); a node
    /// started in another mode registers again.
    Register {
        node: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
    },
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
    /// Signer mode, since sign-ahead: the leader's signing process `holder`
    /// (an id it drew at start) signs this (height, round, step) of
    /// `chain_id` with these bytes, and reserves every HRS up to `through`
    /// for itself, so that the next one it is asked for is signed without
    /// waiting for a commit. Committed before the signature when the HRS
    /// was not reserved already, just after it when it was. Its own variant
    /// on purpose: a keyraft from before reservations cannot decode it and
    /// stops applying, where it would otherwise ignore the reservation and
    /// could sign an HRS the holder signed.
    SignAhead {
        chain_id: String,
        height: u64,
        round: u32,
        step: u8,
        digest: String,
        timestamp: (i64, i32),
        through: (u64, u32, u8),
        holder: u64,
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
    /// Signer mode, CometBFT 1.x: the leader is about to sign raw bytes
    /// (a `SignBytesRequest`) for `chain_id`; `digest` is their SHA-256.
    /// Outside the watermark: it moves nothing, and is refused only for a
    /// chain without one. Its own variant, proposed only once every voter
    /// says it applies it (gossip feature `sign-bytes`).
    SignBytes { chain_id: String, digest: String },
    /// Validator mode: `node` runs its node with the program `path` in
    /// place of its command's first word, from its next start on (a
    /// standby restarts its node for it). `keyraft upgrade --binary`
    /// commits one per host, standbys first. Its own variant, proposed
    /// only once every voter says it applies it (gossip feature
    /// `node-binary`).
    NodeBinary { node: NodeId, path: String },
}

/// The mode a member runs in, as it registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Links the key into its node while it leads.
    Validator,
    /// keyraft is the remote signer (`--signer`).
    Signer,
    /// Votes only.
    Witness,
    /// A mode a later keyraft registered that this one does not know
    /// (read from its log entry rather than failing the log): taken for
    /// one that may sign with the key.
    #[serde(other)]
    Other,
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
            Command::Register { node, mode } => match mode {
                Some(m) => write!(f, "register node {node} ({m:?} mode)"),
                None => write!(f, "register node {node}"),
            },
            Command::Rejoined { node } => write!(f, "node {node} rejoins with an empty data dir"),
            Command::Signed {
                chain_id,
                height,
                round,
                step,
                ..
            } => write!(f, "sign {chain_id} {height}/{round}/{step}"),
            Command::SignAhead {
                chain_id,
                height,
                round,
                step,
                through,
                ..
            } => write!(
                f,
                "sign {chain_id} {height}/{round}/{step}, reserve through {}/{}/{}",
                through.0, through.1, through.2
            ),
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
            Command::SignBytes { chain_id, digest } => {
                write!(f, "sign raw bytes {digest} for {chain_id}")
            }
            Command::NodeBinary { node, path } => {
                write!(f, "node {node} runs its node as {path}")
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
    /// The mode each member last registered with (none from a keyraft
    /// from before modes were recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modes: BTreeMap<NodeId, Mode>,
    /// Signer mode: each chain's watermark, by chain id (a chain has none
    /// until its floor is imported). Read through [`ClusterState::watermark`].
    /// Stored under the one-chain name and shape while there is one chain,
    /// so that a keyraft from before chains were kept apart reads it; with
    /// two or more, as a map it cannot read (it stops rather than forget
    /// one: see [`Command::ChainFloor`]).
    #[serde(default, rename = "signer", with = "watermark::one_or_many")]
    watermarks: BTreeMap<String, SignerState>,
    /// Auto timing: the profile the cluster runs (absent: the one each
    /// member starts with, `lan` unless pinned).
    #[serde(default)]
    pub timing: Option<TimingChoice>,
    /// What validator mode's use of the key tells signer mode.
    #[serde(default, skip_serializing_if = "Linked::is_unused")]
    pub linked: Linked,
    /// Validator mode: the program each member runs its node as, where an
    /// operator's `keyraft upgrade --binary` replaced its command's first
    /// word ([`Command::NodeBinary`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub binaries: BTreeMap<NodeId, String>,
}

/// Validator mode's use of the key, as signer mode must know it: the key
/// was linked into a node, which signed whatever its chain asked. Only
/// validator mode activates, so every activation is such a use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linked {
    /// Above the last height a release reported (that height plus one):
    /// no signer floor is applied below it.
    pub floor: Option<u64>,
    /// The log index of an activation whose end is not known (not
    /// released, or released without a height) and that no floor was
    /// imported after: signer mode signs nothing while it is set.
    pub unknown_since: Option<u64>,
}

impl Linked {
    fn is_unused(&self) -> bool {
        *self == Linked::default()
    }
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
            Command::Activate { node, term } => {
                self.linked.unknown_since = Some(index);
                key_event(node, term, false, None)
            }
            // Only the holder of the last activation can release it: a stale
            // or misdirected release must not make a successor skip its wait.
            Command::Released { node, term, height } => match last {
                Some(e) if !e.released && e.node == node && e.term == term => {
                    let r = key_event(node, term, true, height);
                    self.released_at(height);
                    r
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
            Command::Register { node, mode } => {
                self.registered.insert(node);
                if let Some(m) = mode {
                    self.modes.insert(node, m);
                }
                Reply::default()
            }
            Command::Rejoined { .. } => Reply::default(),
            Command::NodeBinary { node, ref path } => {
                self.binaries.insert(node, path.clone());
                Reply::default()
            }
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
                let hrs = (height, round, step);
                self.sign(chain_id, hrs, digest, timestamp, hrs, None)
            }
            Command::SignAhead {
                ref chain_id,
                height,
                round,
                step,
                ref digest,
                timestamp,
                through,
                holder,
            } => {
                let hrs = (height, round, step);
                self.sign(chain_id, hrs, digest, timestamp, through, Some(holder))
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
                self.import_floor(chain_id, height);
                Reply::default()
            }
            Command::ChainFloor {
                ref chain_id,
                height,
            } => {
                self.import_floor(chain_id, height);
                Reply::default()
            }
            Command::SignBytes { ref chain_id, .. } => Reply {
                prior: None,
                sign: Some(match self.watermarks.get(chain_id) {
                    Some(_) => SignVerdict::Sign { timestamp: (0, 0) },
                    None => SignVerdict::NoWatermark,
                }),
            },
        }
    }

    /// A validator-mode release at `height` (`None`: not known): signer
    /// mode never signs at or below it. With one chain's watermark, that
    /// chain's floor rises at once; with none yet, an import below it is
    /// refused by the leader unless the operator says the chain's key is
    /// another (`import-state --other-key`); with several, which chain the
    /// validator signed for is not known, and the floors stay.
    fn released_at(&mut self, height: Option<u64>) {
        let Some(h) = height else {
            return; // the activation's end stays unknown
        };
        let above = h.saturating_add(1);
        self.linked.floor = self.linked.floor.max(Some(above));
        self.linked.unknown_since = None;
        if let [chain] = self
            .watermarks
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .as_slice()
        {
            self.raise_floor(chain, above);
        }
    }

    /// An imported floor. One that moves a watermark settles an
    /// activation whose end was not known (the operator said where the key
    /// stands); one that changes nothing (a command run again) does not.
    fn import_floor(&mut self, chain_id: &str, height: u64) {
        let before = self.watermarks.get(chain_id).map(|w| w.hrs());
        self.raise_floor(chain_id, height);
        if self.watermarks.get(chain_id).map(|w| w.hrs()) != before {
            self.linked.unknown_since = None;
        }
    }

    /// The node that holds the key according to the log, if any.
    pub fn key_holder(&self) -> Option<NodeId> {
        self.last_key_event.filter(|e| !e.released).map(|e| e.node)
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
    fn a_mode_a_later_keyraft_registered_is_read_as_another_not_a_broken_log() {
        let entry = r#"{"type":"register","node":3,"mode":"hardware-signer"}"#;
        let cmd: Command = serde_json::from_str(entry).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cmd,
            Command::Register {
                node: 3,
                mode: Some(Mode::Other)
            }
        );
        let mut s = ClusterState::default();
        s.apply(&cmd, 1);
        assert_eq!(s.modes.get(&3), Some(&Mode::Other));
        assert!(s.registered.contains(&3));
    }

    #[test]
    fn signer_mode_signs_only_above_what_validator_mode_may_have_signed() {
        let floor = |s: &ClusterState, c: &str| s.watermark(c).map(|w| w.height);
        let release = |height| Command::Released {
            node: 3,
            term: 2,
            height,
        };
        // Validator mode released at height 40: the ledger keeps it (the
        // leader refuses an import below it unless told the key is another).
        let mut s = ClusterState::default();
        s.apply(&Command::Activate { node: 3, term: 2 }, 1);
        assert_eq!(s.linked.unknown_since, Some(1));
        s.apply(&release(Some(40)), 2);
        assert_eq!((s.linked.floor, s.linked.unknown_since), (Some(41), None));
        s.apply(&s.floor_command("a", 7), 3);
        assert_eq!(floor(&s, "a"), Some(7));

        // With one chain signing, a release raises its floor at once.
        let mut s = ClusterState::default();
        s.apply(&s.floor_command("a", 10), 1);
        s.apply(&Command::Activate { node: 3, term: 2 }, 2);
        s.apply(&release(Some(90)), 3);
        assert_eq!(floor(&s, "a"), Some(91));

        // An end not known (no release, or one without a height) stops
        // signing until a floor is imported after it.
        let mut s = ClusterState::default();
        s.apply(&s.floor_command("a", 10), 1);
        s.apply(&Command::Activate { node: 3, term: 2 }, 2);
        s.apply(&release(None), 3);
        assert_eq!(s.linked.unknown_since, Some(2));
        // The old import run again moves nothing and settles nothing.
        s.apply(&s.floor_command("a", 10), 4);
        assert_eq!(s.linked.unknown_since, Some(2));
        s.apply(&s.floor_command("a", 120), 5);
        assert_eq!((s.linked.unknown_since, floor(&s, "a")), (None, Some(120)));
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
}
