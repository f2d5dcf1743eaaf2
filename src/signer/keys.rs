//! Which members hold another key than this host for a chain, from what
//! each gossips (`NodeStatus.signer_keys`): a host given the wrong
//! `validator-key` is named as soon as gossip reaches it, before any of its
//! nodes asks for a signature, on every member (status, the metric
//! `keyraft_signer_other_key_members`, one log line per change).
//!
//! Owns: the comparison. Must not: refuse or decide anything; the leader's
//! check of each forwarded request's key (`refused_other_key`) is what
//! keeps a wrong key from signing for the cluster. This only says so early.

use std::collections::BTreeMap;

use crate::ledger::NodeId;
use crate::node::Shared;
use crate::pb;

/// [`other_keys`] of node `sh`: this host's keys against what the members
/// of the current membership last gossiped.
pub fn on(sh: &Shared) -> BTreeMap<String, Vec<(NodeId, Option<String>)>> {
    let mut seen = sh.view.snapshot();
    let peers = sh
        .peer_ids()
        .into_iter()
        .filter_map(|id| seen.remove(&id).map(|s| (id, s.status.signer_keys)))
        .collect();
    other_keys(&sh.signer_keys, &peers)
}

/// For each chain this host signs for, the members running signer mode
/// (those that gossip any key) whose key for it is another (its address)
/// or none. Members that gossip no key (witnesses, nodes not in signer
/// mode, or not heard from) are left out. Every chain of `mine` is in the
/// answer, with no members when all agree.
pub fn other_keys(
    mine: &[pb::ChainKey],
    peers: &BTreeMap<NodeId, Vec<pb::ChainKey>>,
) -> BTreeMap<String, Vec<(NodeId, Option<String>)>> {
    mine.iter()
        .map(|m| {
            let others = peers
                .iter()
                .filter(|(_, keys)| !keys.is_empty())
                .filter_map(|(id, keys)| {
                    let theirs = keys.iter().find(|k| k.chain_id == m.chain_id);
                    match theirs {
                        Some(k) if k.address == m.address => None,
                        _ => Some((*id, theirs.map(|k| k.address.clone()))),
                    }
                })
                .collect();
            (m.chain_id.clone(), others)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(chain: &str, address: &str) -> pb::ChainKey {
        pb::ChainKey {
            chain_id: chain.into(),
            address: address.into(),
        }
    }

    #[test]
    fn members_with_another_key_or_none_are_named_per_chain() {
        let mine = [key("a", "AA"), key("b", "BB")];
        // (peers, want for a, want for b)
        type Want = Vec<(NodeId, Option<String>)>;
        type Peers = Vec<(NodeId, Vec<pb::ChainKey>)>;
        let some = |id, a: &str| (id, Some(a.to_string()));
        let table: [(Peers, Want, Want); 5] = [
            // Everyone agrees; a witness gossips no key.
            (
                vec![(2, vec![key("a", "AA"), key("b", "BB")]), (3, vec![])],
                vec![],
                vec![],
            ),
            // Node 3 has another key for b only.
            (
                vec![
                    (2, vec![key("a", "AA"), key("b", "BB")]),
                    (3, vec![key("a", "AA"), key("b", "XX")]),
                ],
                vec![],
                vec![some(3, "XX")],
            ),
            // Node 2 does not sign for b at all.
            (vec![(2, vec![key("a", "AA")])], vec![], vec![(2, None)]),
            // Two others, both with another key for a.
            (
                vec![
                    (2, vec![key("a", "YY"), key("b", "BB")]),
                    (3, vec![key("a", "ZZ"), key("b", "BB")]),
                ],
                vec![some(2, "YY"), some(3, "ZZ")],
                vec![],
            ),
            // A chain only a peer signs for says nothing here.
            (
                vec![(2, vec![key("a", "AA"), key("b", "BB"), key("c", "CC")])],
                vec![],
                vec![],
            ),
        ];
        for (peers, want_a, want_b) in table {
            let peers: BTreeMap<_, _> = peers.into_iter().collect();
            let got = other_keys(&mine, &peers);
            assert_eq!(got.len(), 2, "{peers:?}");
            assert_eq!(got["a"], want_a, "{peers:?}");
            assert_eq!(got["b"], want_b, "{peers:?}");
        }
    }
}
