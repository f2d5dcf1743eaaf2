//! The rules for changing the membership (docs/design.md, step 7), as
//! pure functions with table tests, so that the admin path and the
//! simulator (`sim/`) run the same rules: when a voter may be taken out,
//! and when a learner may be made a voter.
//!
//! Owns: whether a removal may start now; whether a learner has caught up.
//! Must not: do I/O or read a clock; the caller passes the voters, how old
//! each ack is, and how long a learner has made no progress.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::ledger::NodeId;

/// Why the leader `me` must refuse to remove voter `id` now, if it must.
/// openraft removes a voter through a joint configuration that needs a
/// majority of the old voters and of the new ones: if the voters left lack
/// a majority that is up (`me`, and the ones whose last ack, per `acks`,
/// is younger than `limit`), the change can never commit and the cluster
/// stops, unable to commit even the `--rejoin` that would bring a voter
/// back. So the operator is told which voters to bring back first.
pub fn removal_refusal(
    voters: &BTreeSet<NodeId>,
    me: NodeId,
    acks: &BTreeMap<NodeId, Option<Duration>>,
    id: NodeId,
    limit: Duration,
) -> Option<String> {
    if !voters.contains(&id) {
        return None;
    }
    let left: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
    if left.is_empty() {
        return Some("cannot remove the last voter".into());
    }
    let up = |v: &NodeId| *v == me || acks.get(v).copied().flatten().is_some_and(|a| a < limit);
    let (live, silent): (Vec<NodeId>, Vec<NodeId>) = left.iter().partition(|v| up(v));
    (live.len() * 2 <= left.len()).then(|| {
        format!(
            "removing node {id} would leave voters {left:?} with {} of {} reachable (nodes {silent:?} silent): the change could not commit and the cluster would stop; bring them back first",
            live.len(),
            left.len()
        )
    })
}

/// Where a new learner stands on its way to becoming a voter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learner {
    /// It holds every entry up to the one that added it: make it a voter.
    CaughtUp,
    /// Still catching up, or not yet heard from: wait.
    Catching,
    /// No progress for the whole `stall` limit: refuse, with why.
    Stalled(String),
}

/// Whether learner `id`, which holds entries up to `matched` (`None`: not
/// one yet, as when it is unreachable), has caught up with `target` (the
/// entry that added it), after `still` without progress. openraft would
/// make it a voter as soon as it lags fewer than thousands of entries,
/// reachable or not: a mistyped address then raises the majority the
/// cluster needs by one member that never answers. A learner that moves,
/// however slowly, is waited for.
pub fn learner_step(
    id: NodeId,
    matched: Option<u64>,
    target: u64,
    still: Duration,
    stall: Duration,
) -> Learner {
    if matched.is_some_and(|m| m >= target) {
        Learner::CaughtUp
    } else if still < stall {
        Learner::Catching
    } else {
        let held = matched.map_or("nothing".to_string(), |m| format!("entries up to {m}"));
        Learner::Stalled(format!(
            "node {id} holds {held} of {target} after {} s without progress: left a learner (no vote), not made a voter; check that it runs and that this host reaches its address, then add it again (or `keyraft members remove {id}`)",
            stall.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learner_becomes_a_voter_only_once_it_holds_the_entry_that_added_it() {
        let stall = Duration::from_secs(10);
        let s = Duration::from_secs;
        // (matched, target, time without progress) -> step
        let table = [
            (Some(7), 7, s(0), Learner::CaughtUp),
            (Some(9), 7, s(30), Learner::CaughtUp),
            (Some(6), 7, s(9), Learner::Catching),
            (None, 7, s(9), Learner::Catching),
        ];
        for (matched, target, still, want) in table {
            assert_eq!(learner_step(4, matched, target, still, stall), want);
        }
        // Unreachable, or stuck partway: refused, saying which.
        for (matched, held) in [(None, "nothing"), (Some(3), "entries up to 3")] {
            match learner_step(4, matched, 7, s(10), stall) {
                Learner::Stalled(why) => assert!(
                    why.starts_with(&format!("node 4 holds {held} of 7 after 10 s")),
                    "{why}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }
    #[test]
    fn a_voter_is_removed_only_while_the_voters_left_have_a_live_majority() {
        let limit = Duration::from_millis(600);
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let acks = |ms: &[(NodeId, Option<u64>)]| {
            ms.iter()
                .map(|(id, a)| (*id, a.map(Duration::from_millis)))
                .collect::<BTreeMap<NodeId, Option<Duration>>>()
        };
        // (voters, acks on leader 1, removed, refused?)
        let table = [
            // 3 voters, all up: any one may go.
            (
                set(&[1, 2, 3]),
                acks(&[(2, Some(50)), (3, Some(50))]),
                3,
                false,
            ),
            (
                set(&[1, 2, 3]),
                acks(&[(2, Some(50)), (3, Some(50))]),
                2,
                false,
            ),
            // Node 3 down: removing 2 leaves {1, 3} with only 1 up.
            (
                set(&[1, 2, 3]),
                acks(&[(2, Some(50)), (3, Some(900))]),
                2,
                true,
            ),
            (set(&[1, 2, 3]), acks(&[(2, Some(50)), (3, None)]), 2, true),
            // Removing the down node itself leaves {1, 2}, both up.
            (set(&[1, 2, 3]), acks(&[(2, Some(50)), (3, None)]), 3, false),
            // 5 voters, two down: removing a live one leaves 2 of 4 up.
            (
                set(&[1, 2, 3, 4, 5]),
                acks(&[(2, Some(1)), (3, Some(1)), (4, None), (5, None)]),
                3,
                true,
            ),
            // 5 voters, one down: removing a live one leaves 3 of 4 up.
            (
                set(&[1, 2, 3, 4, 5]),
                acks(&[(2, Some(1)), (3, Some(1)), (4, Some(1)), (5, None)]),
                3,
                false,
            ),
            // Not a voter: nothing to refuse (removing a learner or a node).
            (set(&[1, 2]), acks(&[(2, None)]), 7, false),
            // The last voter.
            (set(&[2]), acks(&[]), 2, true),
        ];
        for (voters, a, id, refused) in table {
            let why = removal_refusal(&voters, 1, &a, id, limit);
            assert_eq!(
                why.is_some(),
                refused,
                "{voters:?} {a:?} remove {id}: {why:?}"
            );
        }
        let why = removal_refusal(
            &set(&[1, 2, 3]),
            1,
            &acks(&[(2, Some(5)), (3, None)]),
            2,
            limit,
        );
        assert_eq!(
            why.as_deref(),
            Some("removing node 2 would leave voters {1, 3} with 1 of 2 reachable (nodes [3] silent): the change could not commit and the cluster would stop; bring them back first")
        );
    }
}
