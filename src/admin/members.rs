//! The rule for taking a voter out of the membership (docs/design.md,
//! step 7), as a pure function with a table test, so that the admin path
//! and the simulator (`sim/`) run the same rule.
//!
//! Owns: whether a removal may start now. Must not: do I/O or read a
//! clock; the caller passes the voters and how old each ack is.

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

#[cfg(test)]
mod tests {
    use super::*;
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
