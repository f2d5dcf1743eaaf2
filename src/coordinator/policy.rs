//! The coordinator's decisions, as pure functions over a [`View`]: a
//! snapshot of everything this node sees at one instant (its state, its
//! validator's health, Raft's membership and acks, what gossip last showed
//! of each peer, the time).
//!
//! Owns: who is eligible to campaign (docs/design.md, step 1), which
//! standby may take a handover, each standby's campaign turn and when it is
//! due, when a leader that may not validate goes quiet or hands on, what
//! the `Voting` state does next, and the lease deadline arithmetic (step
//! 5). Must not: do I/O, read a clock or a channel, or log; everything it
//! needs is passed in, so every rule has a table test below (the way
//! tikv/raft-rs keeps its protocol core free of I/O).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::Timing;
use crate::health::Health;
use crate::ledger::{KeyEvent, NodeId};
use crate::node::StateName;

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
}

impl View {
    fn is_voter(&self) -> bool {
        self.voters.contains(&self.id)
    }

    /// Gossip younger than three gossip intervals counts.
    fn fresh(&self, p: &Peer) -> bool {
        p.age <= self.timing.gossip_interval * 3
    }
}

/// Step 1: campaign (and validate) only while eligible. In signer mode
/// leading means signing, not validating: the local node's health does not
/// matter (every sentry's requests reach the leader).
pub fn eligible(state: StateName, v: &View) -> bool {
    matches!(state, StateName::Voting | StateName::Validating)
        && !v.witness
        && (v.signer_mode || v.health.is_some_and(|h| h.healthy()))
        && !v.paused
        && !v.standing_down
        && v.is_voter()
}

/// A healthy, synced, eligible standby voter, per gossip (the one asked
/// for, if any), with the most advanced node first. With `acked`, on the
/// leader it must also have acked a heartbeat lately: a transfer to a node
/// that just died leaves openraft's leader stuck. The error says why not,
/// node by node.
pub fn standby(v: &View, want: Option<NodeId>, acked: bool) -> Result<NodeId, String> {
    if v.paused {
        return Err("the cluster is paused (no handovers): run `keyraft resume` first".into());
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
    // Every other voter, with the reason it cannot take over, if any.
    let candidates: Vec<(NodeId, u64, Option<&'static str>)> = v
        .voters
        .iter()
        .filter(|id| **id != v.id)
        .map(|&id| {
            let p = v.peers.get(&id).filter(|p| v.fresh(p));
            let why = match p {
                None => Some("not heard from lately"),
                Some(p) if p.witness => Some("a witness"),
                Some(p) if !p.ready => Some("its node is not running and synced"),
                Some(p) if !p.eligible => {
                    Some("it may not validate now (just handed over, or not a voter yet)")
                }
                Some(_) if !live(id) => Some("no recent heartbeat ack"),
                Some(_) => None,
            };
            (id, p.map_or(0, |p| p.height), why)
        })
        .collect();
    match want {
        Some(id) => match candidates.iter().find(|c| c.0 == id) {
            Some((_, _, None)) => Ok(id),
            Some((_, _, Some(why))) => Err(format!(
                "node {id} is not a healthy, synced, eligible standby right now: {why}"
            )),
            None => Err(format!("node {id} is not another voting member")),
        },
        None => candidates
            .iter()
            .filter(|c| c.2.is_none())
            .max_by_key(|c| c.1)
            .map(|c| c.0)
            .ok_or_else(|| {
                let why: Vec<String> = candidates
                    .iter()
                    .filter_map(|(id, _, why)| why.map(|w| format!("node {id}: {w}")))
                    .collect();
                format!(
                    "no healthy, synced standby to hand over to ({})",
                    why.join("; ")
                )
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
pub fn voting_step(eligible: bool, acked: bool, activation_due: bool, v: &View) -> VotingStep {
    if v.is_leader {
        if eligible && !v.signer_mode && acked && activation_due {
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

/// Where an unhealthy validator sends a state that needs a healthy one:
/// `Syncing` while it runs, else `Startup`. `None` while healthy (or on a
/// witness).
pub fn unhealthy_exit(health: Option<Health>) -> Option<StateName> {
    let h = health?;
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
/// heard from the unreleased holder as leader (`since_holder`). An ordinary
/// election already took that long; a leader elected by transfer may not
/// have, and must not act sooner for it.
pub fn takeover_wait(clean: bool, since_holder: Option<Duration>, t: &Timing) -> Duration {
    if clean {
        return Duration::ZERO;
    }
    let lease = t.election_max + t.handover_delay;
    let rest = since_holder.map_or(Duration::ZERO, |d| lease.saturating_sub(d));
    t.handover_delay.max(rest)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimingProfile;

    /// One change to a table row's input.
    type Change<T> = Box<dyn Fn(&mut T)>;

    fn timing() -> Timing {
        crate::config::RunArgs {
            node_id: Some(1),
            peer: vec!["2=127.0.0.1:7702".into()],
            listen: Some("127.0.0.1:7700".parse().unwrap()),
            insecure: true,
            witness: true,
            timing: Some(TimingProfile::Lan),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .timing
    }

    fn healthy() -> Option<Health> {
        Some(Health {
            running: true,
            synced: true,
            height: Some(10),
        })
    }

    fn ready(height: u64) -> Peer {
        Peer {
            age: Duration::from_millis(10),
            ready: true,
            eligible: true,
            height,
            ..Default::default()
        }
    }

    /// Node 2 of three voters, healthy, following; peers 1 and 3 ready.
    fn view() -> View {
        View {
            id: 2,
            timing: timing(),
            witness: false,
            signer_mode: false,
            health: healthy(),
            paused: false,
            standing_down: false,
            voters: [1, 2, 3].into(),
            leader: Some(1),
            is_leader: false,
            peers: [(1, ready(10)), (3, ready(12))].into(),
            acks: None,
        }
    }

    #[test]
    fn eligibility_needs_every_condition() {
        let ok = view();
        assert!(eligible(StateName::Voting, &ok));
        assert!(eligible(StateName::Validating, &ok));
        let cases: Vec<(&str, StateName, Change<View>)> = vec![
            ("syncing", StateName::Syncing, Box::new(|_| {})),
            ("registering", StateName::Registering, Box::new(|_| {})),
            ("witness", StateName::Voting, Box::new(|v| v.witness = true)),
            ("paused", StateName::Voting, Box::new(|v| v.paused = true)),
            (
                "standing down",
                StateName::Voting,
                Box::new(|v| v.standing_down = true),
            ),
            (
                "not a voter",
                StateName::Voting,
                Box::new(|v| {
                    v.voters.remove(&2);
                }),
            ),
            (
                "unhealthy",
                StateName::Voting,
                Box::new(|v| v.health = Some(Health::default())),
            ),
            (
                "no validator",
                StateName::Voting,
                Box::new(|v| v.health = None),
            ),
        ];
        for (name, state, change) in cases {
            let mut v = view();
            change(&mut v);
            assert!(!eligible(state, &v), "{name}");
        }
        // Signer mode: the local node's health does not matter.
        let mut v = view();
        v.signer_mode = true;
        v.health = Some(Health::default());
        assert!(eligible(StateName::Voting, &v));
    }

    #[test]
    fn standby_picks_the_most_advanced_ready_voter_and_says_why_not() {
        let v = view();
        assert_eq!(standby(&v, None, false), Ok(3), "node 3 is higher");
        assert_eq!(standby(&v, Some(1), false), Ok(1));
        assert!(standby(&v, Some(2), false)
            .unwrap_err()
            .contains("not another voting member"));
        assert!(standby(&v, Some(9), false)
            .unwrap_err()
            .contains("not another voting member"));
        let reasons: Vec<(&str, Change<Peer>)> = vec![
            (
                "not heard from lately",
                Box::new(|p| p.age = Duration::from_secs(60)),
            ),
            ("a witness", Box::new(|p| p.witness = true)),
            ("not running and synced", Box::new(|p| p.ready = false)),
            ("may not validate now", Box::new(|p| p.eligible = false)),
        ];
        for (why, change) in reasons {
            let mut v = view();
            change(v.peers.get_mut(&3).unwrap());
            let err = standby(&v, Some(3), false).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
            assert_eq!(standby(&v, None, false), Ok(1), "{why}: the other one");
        }
        let mut v = view();
        v.peers.clear();
        let err = standby(&v, None, false).unwrap_err();
        assert!(
            err.contains("node 1: not heard from lately; node 3: not heard"),
            "{err}"
        );
        let mut v = view();
        v.paused = true;
        assert!(standby(&v, None, false).unwrap_err().contains("paused"));
    }

    #[test]
    fn a_handover_target_must_have_acked_lately_on_the_leader() {
        let mut v = view();
        v.is_leader = true;
        let recent = Duration::from_millis(10);
        let old = v.timing.heartbeat * 6;
        v.acks = Some([(1, Some(recent)), (3, Some(old))].into());
        assert_eq!(standby(&v, None, true), Ok(1));
        assert!(standby(&v, Some(3), true)
            .unwrap_err()
            .contains("no recent heartbeat ack"));
        assert_eq!(
            standby(&v, Some(3), false),
            Ok(3),
            "without `acked`, gossip alone"
        );
        v.acks = Some([(1, None), (3, None)].into());
        assert!(standby(&v, None, true).is_err(), "never acked");
        v.acks = None;
        assert_eq!(standby(&v, None, true), Ok(3), "not leading: no ack map");
    }

    #[test]
    fn quiet_only_for_a_leader_that_may_not_validate_with_a_standby_ready() {
        let mut v = view();
        assert!(!goes_quiet(StateName::Voting, false, &v), "not leader");
        v.is_leader = true;
        assert!(goes_quiet(StateName::Voting, false, &v));
        assert!(goes_quiet(StateName::Startup, false, &v));
        assert!(!goes_quiet(StateName::Voting, true, &v), "eligible");
        assert!(!goes_quiet(StateName::Validating, false, &v), "validating");
        v.peers.clear();
        assert!(
            !goes_quiet(StateName::Voting, false, &v),
            "nobody to take over"
        );
    }

    #[test]
    fn ranks_count_eligible_lower_standbys_but_not_the_silent_leader() {
        let mut v = view();
        v.id = 3;
        v.voters = [1, 2, 3, 4].into();
        v.peers = [(1, ready(0)), (2, ready(0)), (4, ready(0))].into();
        v.leader = Some(1);
        assert_eq!(
            campaign_rank(&v),
            1,
            "node 2 only: 1 is the leader, 4 is higher"
        );
        v.leader = None;
        assert_eq!(campaign_rank(&v), 2);
        v.peers.get_mut(&2).unwrap().witness = true;
        assert_eq!(campaign_rank(&v), 1);
        v.peers.get_mut(&1).unwrap().age = Duration::from_secs(60);
        assert_eq!(campaign_rank(&v), 0);
        v.id = 1;
        assert_eq!(campaign_rank(&v), 0, "the lowest id goes first");
    }

    #[test]
    fn campaigns_are_due_after_the_lease_in_rank_order() {
        let t = timing();
        let j = Duration::from_millis(7);
        let half = t.election_min / 2;
        assert_eq!(campaign_due(&t, false, false, 0, j), t.election_max + j);
        assert_eq!(
            campaign_due(&t, false, true, 2, j),
            t.election_max + half * 2 + j
        );
        assert_eq!(campaign_due(&t, true, true, 5, j), t.election_max + j);
        assert_eq!(campaign_due(&t, true, false, 0, j), t.election_max * 2 + j);
        assert_eq!(campaign_retry(&t, 0), t.election_min);
        assert_eq!(campaign_retry(&t, 1), t.election_min + half);
    }

    #[test]
    fn voting_steps() {
        let mut v = view();
        assert_eq!(
            voting_step(true, false, true, &v),
            VotingStep::Campaign { last_resort: false }
        );
        assert_eq!(
            voting_step(false, false, true, &v),
            VotingStep::Campaign { last_resort: true }
        );
        v.paused = true;
        assert_eq!(voting_step(false, false, true, &v), VotingStep::Wait);
        v.paused = false;
        v.peers.clear();
        assert_eq!(
            voting_step(false, false, true, &v),
            VotingStep::Wait,
            "no standby"
        );
        let mut v = view();
        v.is_leader = true;
        assert_eq!(voting_step(true, true, true, &v), VotingStep::Activate);
        assert_eq!(
            voting_step(true, false, true, &v),
            VotingStep::Lead,
            "no quorum ack yet"
        );
        assert_eq!(
            voting_step(true, true, false, &v),
            VotingStep::Lead,
            "activation held back"
        );
        assert_eq!(voting_step(false, true, true, &v), VotingStep::HandOn);
        v.signer_mode = true;
        assert_eq!(
            voting_step(true, true, true, &v),
            VotingStep::Lead,
            "signers never activate"
        );
    }

    #[test]
    fn unhealthy_validators_send_the_state_back() {
        assert_eq!(unhealthy_exit(None), None);
        assert_eq!(unhealthy_exit(healthy()), None);
        let syncing = Health {
            running: true,
            synced: false,
            height: None,
        };
        assert_eq!(unhealthy_exit(Some(syncing)), Some(StateName::Syncing));
        assert_eq!(
            unhealthy_exit(Some(Health::default())),
            Some(StateName::Startup)
        );
    }

    #[test]
    fn hand_on_rules() {
        let all = |h, t, l, m, last| may_hand_on(h, t, l, m, last);
        assert!(all(false, false, true, Some(5), Some(5)));
        assert!(all(false, false, true, Some(6), Some(5)));
        assert!(
            !all(true, false, true, Some(5), Some(5)),
            "holds the key unreleased"
        );
        assert!(!all(false, true, true, Some(5), Some(5)), "once per term");
        assert!(!all(false, false, false, Some(5), Some(5)), "no quorum");
        assert!(!all(false, false, true, Some(4), Some(5)), "target behind");
        assert!(!all(false, false, true, None, Some(5)), "target unknown");
        assert!(!all(false, false, true, None, None), "empty log");
    }

    #[test]
    fn the_lease_counts_from_the_acked_send_time() {
        let ms = |n: u64| Duration::from_millis(n);
        let now = 10_000_000_000;
        assert_eq!(lease_deadline(now, None, ms(300)), None, "no ack");
        assert_eq!(
            lease_deadline(now, Some(ms(100)), ms(300)),
            Some(now + 200_000_000)
        );
        assert_eq!(
            lease_deadline(now, Some(ms(300)), ms(300)),
            None,
            "exactly over"
        );
        assert_eq!(
            lease_deadline(now, Some(ms(900)), ms(300)),
            None,
            "long over"
        );
        assert_eq!(
            lease_deadline(5, Some(ms(1)), ms(300)),
            Some(300_000_000),
            "no underflow"
        );
    }

    #[test]
    fn a_takeover_waits_out_the_holders_lease_however_it_was_elected() {
        let mut t = timing();
        let ms = Duration::from_millis;
        let none = Duration::ZERO;
        // (clean, since last heard from the holder, handover_delay, wait)
        let table = [
            (true, Some(ms(10)), none, none),
            (true, None, ms(100), none),
            // Elected by an ordinary election: the lease is over already.
            (false, Some(ms(700)), none, none),
            (false, None, none, none),
            (false, None, ms(100), ms(100)),
            // Elected by transfer 65 ms after the holder's last heartbeat.
            (false, Some(ms(65)), none, ms(535)),
            (false, Some(ms(65)), ms(100), ms(635)),
            (false, Some(ms(0)), none, ms(600)),
        ];
        for (clean, since, delay, want) in table {
            t.handover_delay = delay;
            assert_eq!(
                takeover_wait(clean, since, &t),
                want,
                "clean {clean}, since {since:?}, delay {delay:?}"
            );
        }
    }

    #[test]
    fn fence_target_is_an_unreleased_other_holder_with_an_agent() {
        let ev = |node, released| {
            Some(KeyEvent {
                node,
                term: 4,
                released,
                index: 9,
                height: None,
            })
        };
        let agents = |n: NodeId| n == 1 || n == 2;
        // (last key event, expected target) as seen by node 2.
        let table = [
            (None, None),
            (ev(1, false), Some(1)),
            (ev(1, true), None),
            (ev(2, false), None),
            (ev(3, false), None),
        ];
        for (last, want) in table {
            assert_eq!(fence_target(last, 2, agents), want, "{last:?}");
        }
    }
}
