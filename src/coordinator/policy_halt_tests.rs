//! Table tests of [`super::policy`]'s rules at a chain's upgrade halt:
//! when the cluster sees one, who may lead through it, and what a
//! validating host does while its node restarts into the upgrade.
use super::tests::{healthy, view};
use super::*;

/// Upgrade `v2` at height 30, as a member reports it.
fn v2(halted: bool, applied: bool) -> Option<Report> {
    Some(Report {
        name: "v2".into(),
        height: 30,
        installed: true,
        applied,
        halted,
    })
}

/// [`view`] with the chain halted for `v2` at 30: node 3's node halted
/// (and switched, or not); this host's and node 1's nodes as given.
fn at_halt(here: Option<Report>, one: Option<Report>, three_applied: bool) -> View {
    let mut v = view();
    v.health = Some(Health {
        running: false,
        synced: false,
        height: None,
    });
    v.upgrade = here;
    let one_peer = v.peers.get_mut(&1).unwrap();
    one_peer.upgrade = one;
    one_peer.height = 30;
    let three = v.peers.get_mut(&3).unwrap();
    three.upgrade = v2(true, three_applied);
    three.height = 30;
    v.halt = halt_seen(&v, None);
    v
}

#[test]
fn a_halt_is_seen_from_any_member_until_a_node_passes_its_height() {
    let halt = Some(Halt {
        name: "v2".into(),
        height: 30,
    });
    let seen = |v: &View| halt_seen(v, None);
    // Node 3 reports the halt: everybody sees it.
    assert_eq!(seen(&at_halt(None, None, true)), halt);
    // Signer mode sees none (no key in a node; its sentries halt together).
    let mut v = at_halt(None, None, true);
    v.signer_mode = true;
    assert_eq!(seen(&v), None);
    // Only this host's own record; the nodes at the height or one below.
    let mut v = at_halt(v2(true, true), None, true);
    v.peers.get_mut(&3).unwrap().upgrade = None;
    assert_eq!(seen(&v), halt);
    v.peers.values_mut().for_each(|p| p.height = 29);
    assert_eq!(seen(&v), halt);
    // A node past the height: over (a halt record stays after it).
    let mut v = at_halt(None, None, true);
    v.peers.get_mut(&1).unwrap().height = 31;
    assert_eq!(seen(&v), None);
    let mut v = at_halt(None, None, true);
    v.health = healthy().map(|h| Health {
        height: Some(31),
        ..h
    });
    assert_eq!(seen(&v), None);
    // No node reports a height (every one restarting or migrating): not
    // seen from nothing (an old record and a cluster coming up), but a
    // halt once seen lasts.
    let mut v = at_halt(None, None, true);
    v.peers.values_mut().for_each(|p| p.height = 0);
    assert_eq!(seen(&v), None);
    assert_eq!(halt_seen(&v, halt.as_ref()), halt);
    // ... also when the gossip that showed it goes stale ...
    let mut v = at_halt(None, None, true);
    v.peers.get_mut(&3).unwrap().age = Duration::from_secs(60);
    assert_eq!(seen(&v), None);
    assert_eq!(halt_seen(&v, halt.as_ref()), halt);
    // ... until a node is past it.
    v.peers.get_mut(&1).unwrap().height = 31;
    assert_eq!(halt_seen(&v, halt.as_ref()), None);
    // A record far from the heights (written early, or an old one): none.
    let mut v = at_halt(None, None, true);
    v.peers.values_mut().for_each(|p| p.height = 12);
    assert_eq!(seen(&v), None);
    // Beside an unrelated higher record, the one at the heights.
    let mut v = at_halt(None, None, true);
    v.peers.get_mut(&1).unwrap().upgrade = Some(Report {
        name: "v9".into(),
        height: 500,
        installed: false,
        applied: false,
        halted: true,
    });
    assert_eq!(seen(&v), halt);
    // A scheduled upgrade is no halt.
    let mut v = at_halt(None, None, true);
    v.peers.get_mut(&3).unwrap().upgrade = v2(false, false);
    assert_eq!(seen(&v), None);
}

#[test]
fn at_a_halt_only_a_host_that_runs_the_upgrade_leads_or_takes_over() {
    use SwitchoverRefused::*;
    let synced = |mut v: View| {
        v.health = Some(Health {
            running: true,
            synced: true,
            height: Some(30),
        });
        v
    };
    // (this host's report, node 1's, node 3 switched) ->
    // (this host eligible, the handover target or why not)
    #[rustfmt::skip]
    type Row = (Option<Report>, Option<Report>, bool, bool, Result<NodeId, SwitchoverRefused>);
    let table: Vec<Row> = vec![
        // Everybody switched: as without a halt.
        (v2(true, true), v2(true, true), true, true, Ok(1)),
        // This host's cosmovisor has not switched (no binary): it may not
        // lead; node 1 did not either: only node 3 takes over.
        (v2(true, false), v2(true, false), true, false, Ok(3)),
        // A member without --upgrades says nothing: not upgraded.
        (None, None, true, false, Ok(3)),
        // Nobody switched: nobody.
        (
            v2(true, false),
            None,
            false,
            false,
            Err(NoneReady(vec![
                (1, Unready::NotUpgraded),
                (3, Unready::NotUpgraded),
            ])),
        ),
    ];
    for (here, one, three, eligible_here, target) in table {
        let v = synced(at_halt(here.clone(), one.clone(), three));
        assert_eq!(
            eligible(StateName::Voting, &v),
            eligible_here,
            "{here:?} {one:?} {three}"
        );
        // The most advanced ready one: 1 and 3 report the same height.
        let mut v = v;
        v.peers.get_mut(&3).unwrap().height = 29;
        assert_eq!(standby(&v, None, false), target, "{here:?} {one:?} {three}");
    }
    // Without a halt, nobody's report matters.
    let mut v = view();
    v.upgrade = v2(false, false);
    assert!(eligible(StateName::Voting, &v));
    assert_eq!(standby(&v, None, false), Ok(3));
}

#[test]
fn a_validating_host_holds_the_key_through_a_halt_unless_its_node_crash_loops() {
    use WhileUnhealthy::*;
    let s = Duration::from_secs;
    let grace = s(3);
    // (unhealthy for, at a halt, exits since it began) -> what to do
    for (for_, halt, exits, want) in [
        (s(1), false, 0, Wait),
        (s(3), false, 0, StepAside),
        (s(1), true, 0, Hold),
        // A migration far longer than the grace: still held.
        (s(600), true, 0, Hold),
        // The upgrade's own restart where cosmovisor does not restart it.
        (s(600), true, 1, Hold),
        // A crash loop: the upgraded binary fails here.
        (s(1), true, CRASHES_AT_HALT, Wait),
        (s(3), true, CRASHES_AT_HALT, StepAside),
        // A node that never comes back is taken for hung.
        (HOLD_AT_HALT, true, 0, StepAside),
    ] {
        assert_eq!(
            while_unhealthy(for_, grace, halt, exits),
            want,
            "{for_:?} {halt} {exits}"
        );
    }
}
