//! The coordinator's decisions, as pure functions over a [`View`]: a
//! snapshot of everything this node sees at one instant (its state, its
//! validator's health, Raft's membership and acks, what gossip last showed
//! of each peer, the time).
//!
//! Owns: who is eligible to campaign (docs/design.md, step 1), which
//! standby may take a handover, each standby's campaign turn and when it is
//! due, when a leader that may not validate goes quiet or hands on, what
//! the `Voting` state does next, what a validating host does while its
//! node is unhealthy (at a chain's upgrade halt too), and the lease
//! deadline arithmetic (step 5). Must not: do I/O, read a clock or a channel, or log; everything it
//! needs is passed in, so every rule has a table test below (the way
//! tikv/raft-rs keeps its protocol core free of I/O).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::Timing;
use crate::health::Health;
use crate::ledger::{KeyEvent, NodeId};
use crate::node::{StateName, SwitchoverRefused, Unready};
use crate::plant::{self, Plant};
use crate::upgrade::Report;

/// A peer as gossip last showed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peer {
    /// Since its last gossip reached this node.
    pub age: Duration,
    pub witness: bool,
    /// Its validator node runs and is synced.
    pub ready: bool,
    /// It said it may campaign and validate.
    pub eligible: bool,
    pub height: u64,
    /// What it gossiped of the chain's next (or last) upgrade.
    pub upgrade: Option<Report>,
}

/// What this node sees at one instant: everything a decision reads.
#[derive(Debug, Clone)]
pub struct View {
    pub id: NodeId,
    pub timing: Timing,
    pub witness: bool,
    pub signer_mode: bool,
    /// This host's validator, `None` on a witness.
    pub health: Option<Health>,
    pub paused: bool,
    /// Just handed over: may not campaign or take leadership back yet.
    pub standing_down: bool,
    pub voters: BTreeSet<NodeId>,
    /// openraft's leader as this node knows it.
    pub leader: Option<NodeId>,
    /// This node is openraft's leader.
    pub is_leader: bool,
    pub peers: BTreeMap<NodeId, Peer>,
    /// On the leader: how long since each follower last acked a heartbeat
    /// (`None` inside: never). `None` when not leading.
    pub acks: Option<BTreeMap<NodeId, Option<Duration>>>,
    /// Signer mode: more members hold another key for one of this host's
    /// chains than hold its own (`signer::keys::outvoted`).
    pub key_outvoted: bool,
    /// Signer mode: this host's key for a chain fails to sign (its token
    /// does not answer, `Core::key_failures`).
    pub key_failing: bool,
    /// The cluster runs the other mode than this host ([`mode_conflict`]).
    pub other_mode: bool,
    /// A voter that runs (its gossip is fresh) has not registered yet: its
    /// mode is not in the ledger.
    pub unregistered: bool,
    /// What this host's cosmovisor tree and node say of the chain's next
    /// (or last) upgrade.
    pub upgrade: Option<Report>,
    /// The chain's upgrade halt this node sees ([`halt_seen`]).
    pub halt: Option<Halt>,
}

impl View {
    fn is_voter(&self) -> bool {
        self.voters.contains(&self.id)
    }

    /// Gossip younger than three gossip intervals counts.
    fn fresh(&self, p: &Peer) -> bool {
        p.age <= self.timing.gossip_interval * 3
    }

    /// At a halt, this host's node does not run the upgrade (its
    /// cosmovisor has not switched to it): it may not lead.
    fn not_upgraded(&self) -> bool {
        self.halt
            .as_ref()
            .is_some_and(|h| !h.runs(self.upgrade.as_ref()))
    }
}

/// The chain's upgrade halt this node sees, if one. It begins when a
/// member gossips that its node halted for an upgrade at height H (its
/// `upgrade-info.json`) while the highest height the members' nodes report
/// is H or H - 1: a record far from the heights is an old one (it stays
/// after its upgrade) or one written early, not this halt. It lasts, once
/// seen (`latched`), until a node reports a height past H, whatever gossip
/// goes stale or which nodes restart meanwhile (they report no height).
/// Signer mode shows the chain's upgrades but acts on none: no key is in a
/// node, and its sentries halt together.
pub fn halt_seen(v: &View, latched: Option<&Halt>) -> Option<Halt> {
    if v.signer_mode {
        return None;
    }
    let peers = v.peers.values().filter(|p| v.fresh(p));
    let own = v.health.and_then(|h| h.height).unwrap_or(0);
    let highest = peers.clone().map(|p| p.height).max().unwrap_or(0).max(own);
    if let Some(h) = latched.filter(|h| highest <= h.height) {
        return Some(h.clone());
    }
    peers
        .filter_map(|p| p.upgrade.as_ref())
        .chain(&v.upgrade)
        .filter(|r| r.halted && (r.height.saturating_sub(1)..=r.height).contains(&highest))
        .max_by_key(|r| r.height)
        .map(|r| Halt {
            name: r.name.clone(),
            height: r.height,
        })
}

/// The chain halted for upgrade `name` at `height` ([`halt_seen`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    pub name: String,
    pub height: u64,
}

impl Halt {
    /// Whether the host that reported `r` runs (or will at its next start)
    /// this upgrade's binary.
    pub fn runs(&self, r: Option<&Report>) -> bool {
        r.is_some_and(|r| r.name == self.name && r.applied)
    }
}

/// Whether a pause holds this node back, from the pause its applied ledger
/// shows. A follower whose log holds entries it has not applied cannot
/// trust that: a `resume` may be among them, committed by a leader that
/// froze before its next heartbeat told anyone. For a follower the pause is
/// then unsettled and does not stop a campaign: if it wins, its whole log
/// is committed and the ledger it then applies says again whether the
/// cluster is paused. A leader goes by what it has applied, so no key is
/// taken and no handover made on a pause that has not been applied.
pub fn pause_holds(applied_paused: bool, is_leader: bool, unapplied: bool) -> bool {
    applied_paused && (is_leader || !unapplied)
}

/// Step 1: campaign (and validate) only while eligible. In signer mode
/// leading means signing, not validating: the local node's health does not
/// matter (every sentry's requests reach the leader), but a host whose key
/// for a chain is outvoted does not lead: it would refuse every other
/// host's requests for that chain; nor does one whose key fails to sign
/// (its token does not answer): a host whose token works signs instead.
pub fn eligible(state: StateName, v: &View) -> bool {
    matches!(state, StateName::Voting | StateName::Validating)
        && !v.witness
        && (v.signer_mode || v.health.is_some_and(|h| h.healthy()))
        && !v.paused
        && !v.standing_down
        && !v.key_outvoted
        && !v.key_failing
        && !v.other_mode
        && !v.not_upgraded()
        && v.is_voter()
}

/// Why a validator-mode host may not lead, if it may not: the ledger holds
/// a signer watermark (`watermark_chains`), which only signer mode writes,
/// or members registered in signer mode (`signers`), so the cluster signs
/// in signer mode and this host would link the key outside every
/// watermark. (Signer mode's side, a member that linked the key, is
/// `signer::keys::held_in_validator_mode`.)
pub fn mode_conflict(
    signer_mode: bool,
    witness: bool,
    watermark_chains: &[&str],
    signers: &[NodeId],
) -> Option<String> {
    if signer_mode || witness || (watermark_chains.is_empty() && signers.is_empty()) {
        return None;
    }
    let why = if watermark_chains.is_empty() {
        format!("nodes {signers:?} registered in signer mode")
    } else {
        format!("chain {}", watermark_chains.join(", "))
    };
    Some(format!(
        "the cluster signs in signer mode ({why}) and this host runs in validator mode, where it would link the key outside every watermark: start it with --signer cometbft"
    ))
}

/// A healthy, synced, eligible standby voter, per gossip (the one asked
/// for, if any), with the most advanced node first. With `acked`, on the
/// leader it must also have acked a heartbeat lately: a transfer to a node
/// that just died leaves openraft's leader stuck. The error says why not,
/// node by node.
pub fn standby(v: &View, want: Option<NodeId>, acked: bool) -> Result<NodeId, SwitchoverRefused> {
    if v.paused {
        return Err(SwitchoverRefused::Paused);
    }
    let recent = v.timing.heartbeat * 5;
    let live = |id: NodeId| match &v.acks {
        _ if !acked => true,
        None => true,
        Some(acks) => acks
            .get(&id)
            .copied()
            .flatten()
            .is_some_and(|age| age < recent),
    };
    let halt = &v.halt;
    // Every other voter, with the reason it cannot take over, if any.
    let candidates: Vec<(NodeId, u64, Option<Unready>)> = v
        .voters
        .iter()
        .filter(|id| **id != v.id)
        .map(|&id| {
            let p = v.peers.get(&id).filter(|p| v.fresh(p));
            let why = match p {
                None => Some(Unready::NotHeard),
                Some(p) if p.witness => Some(Unready::Witness),
                // Signer mode: a host's own node does not decide whether it
                // may sign (its peers' sentries reach it).
                Some(p) if !p.ready && !v.signer_mode => Some(Unready::NotSynced),
                Some(p) if !p.eligible => Some(Unready::MayNotLead),
                Some(p) if halt.as_ref().is_some_and(|h| !h.runs(p.upgrade.as_ref())) => {
                    Some(Unready::NotUpgraded)
                }
                Some(_) if !live(id) => Some(Unready::NoAck),
                Some(_) => None,
            };
            (id, p.map_or(0, |p| p.height), why)
        })
        .collect();
    match want {
        Some(id) => match candidates.iter().find(|c| c.0 == id) {
            Some((_, _, None)) => Ok(id),
            Some((_, _, Some(why))) => Err(SwitchoverRefused::NotReady(id, *why)),
            None => Err(SwitchoverRefused::NotAVoter(id)),
        },
        None => candidates
            .iter()
            .filter(|c| c.2.is_none())
            .max_by_key(|c| c.1)
            .map(|c| c.0)
            .ok_or_else(|| {
                let why = candidates
                    .iter()
                    .filter_map(|(id, _, why)| why.map(|w| (*id, w)))
                    .collect();
                SwitchoverRefused::NoneReady(why)
            }),
    }
}

/// A leader that may not validate steps down by going quiet: with its
/// heartbeats off, an eligible standby's campaign succeeds once the lease
/// runs out. With nobody able to take over, it keeps leading (harmless).
pub fn goes_quiet(state: StateName, eligible: bool, v: &View) -> bool {
    v.is_leader && !eligible && state != StateName::Validating && standby(v, None, false).is_ok()
}

/// This node's place among the standbys that could take over, by node id,
/// as gossip shows them (the silent leader left out): the first campaigns
/// as soon as the lease is over, each next one half an election timeout
/// later, so that two standbys campaigning in the same instant do not split
/// the vote. Random jitter alone let that happen in about one failover in
/// twenty.
pub fn campaign_rank(v: &View) -> u32 {
    v.peers
        .iter()
        .filter(|(id, p)| {
            **id < v.id
                && Some(**id) != v.leader
                && v.voters.contains(id)
                && v.fresh(p)
                && p.eligible
                && !p.witness
        })
        .count() as u32
}

/// How long without a leader before this node campaigns. An eligible
/// standby waits the lease plus its rank's stagger. A `last_resort`
/// campaigner (it may not validate, but a standby could once its log is
/// caught up) waits the lease if that standby was refused a vote for being
/// behind, else twice the lease.
pub fn campaign_due(
    t: &Timing,
    last_resort: bool,
    behind_seen: bool,
    rank: u32,
    jitter: Duration,
) -> Duration {
    let base = match (last_resort, behind_seen) {
        (false, _) => t.election_max + (t.election_min / 2) * rank,
        (true, true) => t.election_max,
        (true, false) => t.election_max * 2,
    };
    base + jitter
}

/// How much longer a campaign must wait, `quiet` after the last leader
/// was heard from, when it is `due` then and this node still promised to
/// refuse votes for `promised` (a leader's lease it acked, or its own):
/// `None` to campaign now. Its own vote is a vote too: a node must not
/// elect itself while a leader it acked may still hold the key (after a
/// switch to a shorter profile, `due` may come before the promise ends).
pub fn campaign_wait(
    quiet: Duration,
    due: Duration,
    promised: Option<Duration>,
) -> Option<Duration> {
    let left = due.saturating_sub(quiet).max(promised.unwrap_or_default());
    (!left.is_zero()).then_some(left)
}

/// After a campaign: when the next may start (a lost or split vote's retry
/// keeps the ranks' stagger).
pub fn campaign_retry(t: &Timing, rank: u32) -> Duration {
    t.election_min + (t.election_min / 2) * rank
}

/// What the `Voting` state does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VotingStep {
    /// Leading with a quorum ack, eligible, activation not held back:
    /// commit the activation (steps 2-4).
    Activate,
    /// Leading but may not validate: hand leadership on.
    HandOn,
    /// Leading, waiting (for the first ack, or the next activation try).
    Lead,
    /// Following: campaign when the leader has been silent long enough.
    Campaign { last_resort: bool },
    /// Nothing to do but wait for news.
    Wait,
}

/// `acked`: this leader has a quorum ack younger than the lease.
/// `activation_due`: no failed activation attempt is holding it back.
/// A leader activates only once every voter that runs has registered:
/// until its mode is in the ledger, this host cannot know that it is not
/// the one validator-mode host among signers ([`mode_conflict`]).
pub fn voting_step(eligible: bool, acked: bool, activation_due: bool, v: &View) -> VotingStep {
    if v.is_leader {
        if eligible && !v.signer_mode && acked && activation_due && !v.unregistered {
            VotingStep::Activate
        } else if !eligible {
            VotingStep::HandOn
        } else {
            VotingStep::Lead
        }
    } else if eligible {
        VotingStep::Campaign { last_resort: false }
    } else if !v.paused && standby(v, None, false).is_ok() {
        VotingStep::Campaign { last_resort: true }
    } else {
        VotingStep::Wait
    }
}

/// How many exits of the validator during an upgrade halt make a crash
/// loop: its upgraded binary fails here (a crash, a failed migration or
/// pre-upgrade hook, a binary cosmovisor cannot find). One exit is an
/// upgrade's own restart where cosmovisor does not restart the node.
pub const CRASHES_AT_HALT: u32 = 2;

/// What a validating host whose node is unhealthy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileUnhealthy {
    /// Within `unhealthy_grace`: nothing yet.
    Wait,
    /// Past it: hand over to a standby, if one may take over.
    StepAside,
    /// The chain is halted for an upgrade and this node is restarting or
    /// migrating into it: keep the key. The halt is chain-wide, so a
    /// handover gains no height, kills a migration and makes the successor
    /// wait for the chain to pass heights this host may have signed.
    Hold,
}

/// The longest a host holds the key at a halt while its node does not
/// come back: a migration that takes longer is taken for a hung node.
pub const HOLD_AT_HALT: Duration = Duration::from_secs(3600);

/// [`WhileUnhealthy`] after `unhealthy_for`, at a `halt` or not, with
/// `exits_at_halt` exits of the validator since the halt began.
pub fn while_unhealthy(
    unhealthy_for: Duration,
    grace: Duration,
    halt: bool,
    exits_at_halt: u32,
) -> WhileUnhealthy {
    if halt && exits_at_halt < CRASHES_AT_HALT && unhealthy_for < HOLD_AT_HALT {
        WhileUnhealthy::Hold
    } else if unhealthy_for >= grace {
        WhileUnhealthy::StepAside
    } else {
        WhileUnhealthy::Wait
    }
}

/// Where an unhealthy validator sends a state that needs a healthy one:
/// `Syncing` while it runs, else `Startup`. `None` while healthy (or on a
/// witness), and in signer mode, where the host's own node does not decide
/// whether it may lead (it signs for every host's sentries, and keeps its
/// node running from `Voting`).
pub fn unhealthy_exit(health: Option<Health>, signer_mode: bool) -> Option<StateName> {
    let h = health.filter(|_| !signer_mode)?;
    if h.healthy() {
        None
    } else if h.running {
        Some(StateName::Syncing)
    } else {
        Some(StateName::Startup)
    }
}

/// Step 3: the host a new holder has powered off before it takes the key:
/// the last holder, if it did not release the key, is another node, and
/// has a fence agent here. A released key, or a holder without an agent,
/// needs none (the lease, the kernel fence and the height watermark still
/// apply).
pub fn fence_target(
    last: Option<KeyEvent>,
    me: NodeId,
    has_agent: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    last.filter(|e| !e.released && e.node != me && has_agent(e.node))
        .map(|e| e.node)
}

/// A leader that may not validate hands leadership on once per term, only
/// while it leads with a quorum, never while it holds the key unreleased
/// (a successor elected by transfer would not wait out its lease), and
/// only once the target holds every entry.
pub fn may_hand_on(
    holds_key: bool,
    handed_on_this_term: bool,
    leads: bool,
    target_matched: Option<u64>,
    last_log: Option<u64>,
) -> bool {
    !holds_key && !handed_on_this_term && leads && last_log.is_some() && target_matched >= last_log
}

/// Step 3's wait before a new leader touches the key: none after a clean
/// handover; otherwise `handover_delay`, and at least until
/// `election_timeout_max + handover_delay` have passed since this node last
/// heard from the unreleased holder as leader (`since_holder`), and until
/// the vote refusal this node promised has run out (`promised`: with auto
/// timing, a leader's messages may have promised a longer profile's
/// refusal than the one in force here). An ordinary election already took
/// that long; a leader elected by transfer may not have, and must not act
/// sooner for it.
pub fn takeover_wait(
    clean: bool,
    since_holder: Option<Duration>,
    promised: Option<Duration>,
    t: &Timing,
) -> Duration {
    if clean {
        return Duration::ZERO;
    }
    let lease = t.election_max + t.handover_delay;
    let rest = since_holder.map_or(Duration::ZERO, |d| lease.saturating_sub(d));
    t.handover_delay.max(rest).max(promised.unwrap_or_default())
}

/// Step 5's lease deadline, in CLOCK_MONOTONIC ns: the sending time of the
/// last quorum-acked heartbeat (`ack_age` before `now_ns`) plus
/// `fence_after`, while it is still ahead.
pub fn lease_deadline(
    now_ns: u64,
    ack_age: Option<Duration>,
    fence_after: Duration,
) -> Option<u64> {
    let age = ack_age?;
    let deadline = now_ns.saturating_sub(age.as_nanos() as u64) + fence_after.as_nanos() as u64;
    (deadline > now_ns).then_some(deadline)
}

/// Step 5 across a timing switch: the fence a lease counted from a message
/// sent `basis_age` ago may use. That message carried the promise of the
/// timing in force when it was sent: after the switch (`since_change`
/// ago), the new one's fence (`now`); before it, the shorter of the two,
/// since a follower promised only the old one's refusal. So a leader
/// lengthens its fence only once a quorum acked messages that promised
/// the longer refusal, and shortens it at once. (Two profiles: the shorter
/// of the last two is the shortest of all.)
pub fn fence_in_force(
    now: Duration,
    before: Duration,
    since_change: Duration,
    basis_age: Duration,
) -> Duration {
    if basis_age < since_change {
        now
    } else {
        now.min(before)
    }
}

/// Step 5: whether this node still holds the key it activated in `term`:
/// only while it leads that very term.
pub fn holds_term(is_leader: bool, current_term: u64, term: u64) -> bool {
    is_leader && current_term == term
}

/// Step 5: what the lease is measured from: the age of this node's last
/// quorum-acked heartbeat (`quorum_ack_age`, counted from its sending),
/// and only while it `leads` the term it holds the key in. A leader cut off
/// from its quorum keeps believing it leads while a newer term begins on
/// the other side; its lease must run out from its last quorum ack, never
/// be renewed from the time of the renewal.
pub fn lease_basis(leads: bool, quorum_ack_age: Option<Duration>) -> Option<Duration> {
    match leads {
        true if plant::on(Plant::RenewPastTerm) => Some(Duration::ZERO),
        true => quorum_ack_age,
        false => None,
    }
}

/// Steps 7 and 8: `Released` (after which a successor starts at once) may
/// be committed only once the validator's whole tree is proven dead, its
/// lease withdrawn (the kernel fence's too) and its key unlinked.
pub fn may_release(proven_dead: bool, unleased: bool, unlinked: bool) -> bool {
    if plant::on(Plant::ReleaseUnproven) {
        return unlinked;
    }
    proven_dead && unleased && unlinked
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "policy_halt_tests.rs"]
mod halt_tests;
