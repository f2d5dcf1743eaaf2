//! Table tests of [`super::policy`]'s rules.
use super::*;
use crate::config::TimingProfile;

/// One change to a table row's input.
type Change<T> = Box<dyn Fn(&mut T)>;

pub(super) fn timing() -> Timing {
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

pub(super) fn healthy() -> Option<Health> {
    Some(Health {
        running: true,
        synced: true,
        height: Some(10),
    })
}

pub(super) fn ready(height: u64) -> Peer {
    Peer {
        age: Duration::from_millis(10),
        ready: true,
        eligible: true,
        height,
        ..Default::default()
    }
}

/// Node 2 of three voters, healthy, following; peers 1 and 3 ready.
pub(super) fn view() -> View {
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
        key_outvoted: false,
        key_failing: false,
        other_mode: false,
        unregistered: false,
        upgrade: None,
        halt: None,
    }
}

#[test]
fn a_validator_mode_host_may_not_lead_where_the_ledger_holds_a_watermark() {
    // (signer mode, witness, chains with a watermark, members registered
    // in signer mode) -> refused?
    for (signer, witness, chains, signers, refused) in [
        (false, false, vec!["c"], vec![], true),
        (false, false, vec![], vec![], false),
        // Before any watermark: members registered in signer mode.
        (false, false, vec![], vec![2], true),
        (true, false, vec!["c"], vec![2], false),
        (false, true, vec!["c"], vec![2], false),
    ] {
        let why = mode_conflict(signer, witness, &chains, &signers);
        assert_eq!(why.is_some(), refused, "{signer} {witness} {chains:?}");
    }
    let why = mode_conflict(false, false, &[], &[2, 3]).unwrap_or_default();
    assert!(
        why.contains("nodes [2, 3] registered in signer mode"),
        "{why}"
    );
    let why = mode_conflict(false, false, &["a", "b"], &[]).unwrap_or_default();
    assert!(
        why.contains("chain a, b") && why.contains("--signer cometbft"),
        "{why}"
    );
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
            "key outvoted",
            StateName::Voting,
            Box::new(|v| v.key_outvoted = true),
        ),
        (
            "key fails to sign",
            StateName::Voting,
            Box::new(|v| v.key_failing = true),
        ),
        (
            "standing down",
            StateName::Voting,
            Box::new(|v| v.standing_down = true),
        ),
        (
            "another mode than the cluster",
            StateName::Validating,
            Box::new(|v| v.other_mode = true),
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
    use SwitchoverRefused::*;
    let v = view();
    assert_eq!(standby(&v, None, false), Ok(3), "node 3 is higher");
    assert_eq!(standby(&v, Some(1), false), Ok(1));
    assert_eq!(standby(&v, Some(2), false), Err(NotAVoter(2)), "itself");
    assert_eq!(standby(&v, Some(9), false), Err(NotAVoter(9)));
    let reasons: Vec<(Unready, Change<Peer>)> = vec![
        (
            Unready::NotHeard,
            Box::new(|p| p.age = Duration::from_secs(60)),
        ),
        (Unready::Witness, Box::new(|p| p.witness = true)),
        (Unready::NotSynced, Box::new(|p| p.ready = false)),
        (Unready::MayNotLead, Box::new(|p| p.eligible = false)),
    ];
    for (why, change) in reasons {
        let mut v = view();
        change(v.peers.get_mut(&3).unwrap());
        assert_eq!(standby(&v, Some(3), false), Err(NotReady(3, why)));
        assert_eq!(standby(&v, None, false), Ok(1), "{why}: the other one");
    }
    let mut v = view();
    v.peers.clear();
    let err = standby(&v, None, false).unwrap_err();
    assert_eq!(
        err,
        NoneReady(vec![(1, Unready::NotHeard), (3, Unready::NotHeard)])
    );
    assert!(
        err.to_string()
            .contains("(node 1: not heard from lately; node 3: not heard from lately)"),
        "{err}"
    );
    let mut v = view();
    v.paused = true;
    assert_eq!(standby(&v, None, false), Err(Paused));
    // Signer mode: a standby whose own node is down (or that has none)
    // still signs for the others' sentries, so it may take over; a leader
    // that may not lead (its key outvoted, say) can hand on to it.
    let mut v = view();
    v.signer_mode = true;
    v.peers.values_mut().for_each(|p| p.ready = false);
    assert_eq!(standby(&v, Some(3), false), Ok(3));
    v.is_leader = true;
    v.key_outvoted = true;
    assert!(goes_quiet(StateName::Voting, false, &v));
    // A leader whose token stopped answering hands on the same way.
    v.key_outvoted = false;
    v.key_failing = true;
    assert!(!eligible(StateName::Voting, &v));
    assert!(goes_quiet(StateName::Voting, false, &v));
}

#[test]
fn a_handover_target_must_have_acked_lately_on_the_leader() {
    let mut v = view();
    v.is_leader = true;
    let recent = Duration::from_millis(10);
    let old = v.timing.heartbeat * 6;
    v.acks = Some([(1, Some(recent)), (3, Some(old))].into());
    assert_eq!(standby(&v, None, true), Ok(1));
    assert_eq!(
        standby(&v, Some(3), true),
        Err(SwitchoverRefused::NotReady(3, Unready::NoAck))
    );
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
fn no_campaign_while_a_promise_runs() {
    let ms = Duration::from_millis;
    let table = [
        // quiet, due, promised: how long still to wait (None: campaign)
        (ms(700), ms(600), None, None),
        (ms(600), ms(600), None, None),
        (ms(400), ms(600), None, Some(ms(200))),
        // Due by the shorter profile now in force, but an ack made under
        // the longer one promised another 150 ms: its own vote waits.
        (ms(700), ms(600), Some(ms(150)), Some(ms(150))),
        (ms(500), ms(600), Some(ms(50)), Some(ms(100))),
        (ms(700), ms(600), Some(Duration::ZERO), None),
    ];
    for (quiet, due, promised, want) in table {
        assert_eq!(
            campaign_wait(quiet, due, promised),
            want,
            "{quiet:?} {due:?} {promised:?}"
        );
    }
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
    v.unregistered = true;
    assert_eq!(
        voting_step(true, true, true, &v),
        VotingStep::Lead,
        "a voter's mode not registered yet"
    );
    v.unregistered = false;
    assert_eq!(voting_step(false, true, true, &v), VotingStep::HandOn);
    v.signer_mode = true;
    assert_eq!(
        voting_step(true, true, true, &v),
        VotingStep::Lead,
        "signers never activate"
    );
}

#[test]
fn a_pause_holds_a_follower_back_only_once_its_log_is_applied() {
    // (applied paused, leading, unapplied entries) -> the pause holds.
    let table = [
        ((false, false, false), false),
        ((false, true, true), false),
        ((true, false, false), true),
        // A `resume` may sit unapplied in the log of a follower whose
        // leader froze right after committing it: it may campaign.
        ((true, false, true), false),
        // A leader goes by what it applied, committed entries or not.
        ((true, true, false), true),
        ((true, true, true), true),
    ];
    for ((paused, leader, unapplied), holds) in table {
        assert_eq!(
            pause_holds(paused, leader, unapplied),
            holds,
            "paused {paused}, leader {leader}, unapplied {unapplied}"
        );
    }
    // The witness of such a follower: it campaigns for a standby again.
    let mut v = view();
    v.witness = true;
    v.paused = pause_holds(true, false, true);
    assert_eq!(
        voting_step(false, false, true, &v),
        VotingStep::Campaign { last_resort: true }
    );
}

#[test]
fn unhealthy_validators_send_the_state_back() {
    assert_eq!(unhealthy_exit(None, false), None);
    assert_eq!(unhealthy_exit(healthy(), false), None);
    let syncing = Health {
        running: true,
        synced: false,
        height: None,
    };
    assert_eq!(
        unhealthy_exit(Some(syncing), false),
        Some(StateName::Syncing)
    );
    assert_eq!(
        unhealthy_exit(Some(Health::default()), false),
        Some(StateName::Startup)
    );
    // Signer mode: the host's own node never sends it back.
    assert_eq!(unhealthy_exit(Some(syncing), true), None);
    assert_eq!(unhealthy_exit(Some(Health::default()), true), None);
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
            takeover_wait(clean, since, None, &t),
            want,
            "clean {clean}, since {since:?}, delay {delay:?}"
        );
    }
    // Auto timing running lan: the holder's last message promised wan's
    // 900 ms refusal, 835 ms of which is left; a lan promise is over within
    // the lease already counted.
    let mut auto = timing();
    auto.auto = true;
    assert_eq!(
        takeover_wait(false, Some(ms(65)), Some(ms(835)), &auto),
        ms(835)
    );
    assert_eq!(takeover_wait(false, Some(ms(65)), None, &auto), ms(535));
    assert_eq!(
        takeover_wait(false, Some(ms(700)), Some(ms(200)), &auto),
        ms(200)
    );
    assert_eq!(
        takeover_wait(true, Some(ms(65)), Some(ms(835)), &auto),
        none
    );
}

#[test]
fn a_lease_uses_a_longer_fence_only_from_messages_sent_after_the_switch() {
    let ms = Duration::from_millis;
    // (fence now, fence before, since the switch, age of the acked send, fence)
    let table = [
        // Lengthened 100 ms ago: an ack of a message sent 150 ms ago
        // promised only the old refusal.
        (ms(600), ms(300), ms(100), ms(150), ms(300)),
        (ms(600), ms(300), ms(100), ms(100), ms(300)),
        (ms(600), ms(300), ms(100), ms(40), ms(600)),
        // Shortened: at once, whatever the ack.
        (ms(300), ms(600), ms(100), ms(150), ms(300)),
        (ms(300), ms(600), ms(100), ms(40), ms(300)),
        // No switch (both the same).
        (ms(300), ms(300), ms(5_000), ms(40), ms(300)),
    ];
    for (now, before, since, age, want) in table {
        assert_eq!(
            fence_in_force(now, before, since, age),
            want,
            "now {now:?} before {before:?} since {since:?} age {age:?}"
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

#[test]
fn the_key_is_held_only_in_the_term_it_was_taken_in_and_leased_from_own_acks() {
    // (is_leader, current_term, term) -> holds
    for (leader, current, term, holds) in [
        (true, 5, 5, true),
        (true, 6, 5, false),
        (false, 5, 5, false),
        (false, 6, 5, false),
    ] {
        assert_eq!(
            holds_term(leader, current, term),
            holds,
            "{leader} {current} {term}"
        );
    }
    let ack = Some(Duration::from_millis(40));
    assert_eq!(lease_basis(true, ack), ack);
    assert_eq!(lease_basis(true, None), None, "no quorum ack: no lease");
    assert_eq!(lease_basis(false, ack), None, "not leading that term");
}

#[test]
fn a_release_needs_the_proof_the_unlease_and_the_unlink() {
    for proven in [false, true] {
        for unleased in [false, true] {
            for unlinked in [false, true] {
                assert_eq!(
                    may_release(proven, unleased, unlinked),
                    proven && unleased && unlinked,
                    "proven {proven}, unleased {unleased}, unlinked {unlinked}"
                );
            }
        }
    }
}
