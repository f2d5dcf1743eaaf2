//! Which members hold another key than this host for a chain, from what
//! each gossips (`NodeStatus.signer_keys`): a host given the wrong
//! `validator-key` is named as soon as gossip reaches it, before any of its
//! nodes asks for a signature, on every member (status, the metric
//! `keyraft_signer_other_key_members`, one log line per change).
//!
//! Owns: the comparison, and the one rule it feeds: a host whose key for a
//! chain is outvoted ([`outvoted`]) is not eligible to lead (step 1). Must
//! not: refuse a request; the leader's check of each forwarded request's
//! key (`refused_other_key`) is what keeps a wrong key from signing for the
//! cluster.

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;

use crate::ledger::NodeId;
use crate::node::Core;
use crate::pb;
use crate::raft::TypeConfig;

/// What the other members of the current membership whose certificate
/// proves the validator role last gossiped of their keys (a witness holds
/// none, and one taken over could not outvote a host by claiming some).
/// Empty outside signer mode.
pub fn of_peers<SM: RaftStateMachine<TypeConfig>>(
    core: &Core<SM>,
) -> BTreeMap<NodeId, Vec<pb::ChainKey>> {
    if core.roster().keys.is_empty() {
        return BTreeMap::new();
    }
    // Read before the view's lock is taken, not under it.
    let ids = core.peer_ids();
    core.view.with_peers(|seen| {
        of_seen(seen, &ids)
            .into_iter()
            .map(|(id, keys)| (id, keys.to_vec()))
            .collect()
    })
}

/// [`of_peers`], from the gossip `seen` of the members `ids`, borrowed
/// (the coordinator reads it at every event, fifty chains a member).
pub fn of_seen<'a>(
    seen: &'a BTreeMap<NodeId, crate::node::Seen>,
    ids: &[NodeId],
) -> BTreeMap<NodeId, &'a [pb::ChainKey]> {
    ids.iter()
        .filter_map(|id| seen.get(id).map(|s| (*id, &s.status)))
        .filter(|(_, s)| s.role == "validator")
        .map(|(id, s)| (id, s.signer_keys.as_slice()))
        .collect()
}

/// A member's key for `chain_id` among its `keys`, looked for first at
/// `i`, where this host has the chain (members list their chains in the
/// same order when their configurations agree).
fn key_for<'a>(keys: &'a [pb::ChainKey], i: usize, chain_id: &str) -> Option<&'a pb::ChainKey> {
    keys.get(i)
        .filter(|k| k.chain_id == chain_id)
        .or_else(|| keys.iter().find(|k| k.chain_id == chain_id))
}

/// Why this host may not lead, if its key for a chain is outvoted: more
/// of the members that gossip keys (this host counted) hold one other key
/// for the chain than hold this host's. Then this host is the one given
/// the wrong key, most likely, and as leader it would refuse every other
/// host's requests for that chain; it stands aside (not eligible) until
/// the keys agree. A tie (two hosts, one key each) decides nothing: both
/// stay eligible and the alert says which chain.
pub fn outvoted(
    mine: &[pb::ChainKey],
    peers: &BTreeMap<NodeId, impl AsRef<[pb::ChainKey]>>,
) -> Option<String> {
    mine.iter().enumerate().find_map(|(i, m)| {
        let mut held: BTreeMap<&str, usize> = BTreeMap::new();
        for keys in peers.values() {
            if let Some(k) = key_for(keys.as_ref(), i, &m.chain_id) {
                *held.entry(k.address.as_str()).or_default() += 1;
            }
        }
        let ours = 1 + held.get(m.address.as_str()).copied().unwrap_or(0);
        let (theirs, n) = held
            .into_iter()
            .filter(|(a, _)| *a != m.address)
            .max_by_key(|(_, n)| *n)?;
        (n > ours).then(|| {
            format!(
                "{n} members hold key {theirs} for chain {}, {ours} (this host included) hold this host's {}",
                m.chain_id, m.address
            )
        })
    })
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
        .enumerate()
        .map(|(i, m)| {
            let others = peers
                .iter()
                .filter(|(_, keys)| !keys.is_empty())
                .filter_map(|(id, keys)| {
                    let theirs = key_for(keys, i, &m.chain_id);
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

/// Why nothing may be signed (or imported) now, if a member holds the key
/// in validator mode: the ledger's last activation (`holder`, signer mode
/// never writes one) is not released, and the holder was not last heard
/// from in signer mode (`holder_signs`: this host runs a signer, another
/// gossips signer keys; a host restarted in signer mode left its validator
/// of before to die with its coordinator). Its validator may be running
/// with the key.
pub fn held_in_validator_mode(holder: Option<NodeId>, holder_signs: bool) -> Option<String> {
    let h = holder.filter(|_| !holder_signs)?;
    Some(format!(
        "node {h} holds the key in validator mode (its activation is not released): nothing is signed beside it; start it with --signer cometbft, or stop it after a switchover"
    ))
}

/// [`held_in_validator_mode`] as this node sees it now: the ledger's
/// last unreleased activation, and whether its holder runs in signer mode
/// (this host: its own configuration; another: what it last gossiped).
pub fn held_now<SM: openraft::storage::RaftStateMachine<crate::raft::TypeConfig>>(
    core: &crate::node::Core<SM>,
) -> Option<String> {
    let holder = core.cluster.borrow().key_holder();
    let holder_signs = holder.is_some_and(|h| {
        if h == core.cfg.id {
            return core.cfg.signer.is_some();
        }
        core.view
            .said(h, |s| s.role == "validator" && !s.signer_keys.is_empty())
    });
    held_in_validator_mode(holder, holder_signs)
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

    #[test]
    fn a_host_whose_key_more_members_do_not_hold_is_outvoted() {
        let mine = [key("a", "AA"), key("b", "BB")];
        let peers = |p: Vec<(NodeId, Vec<pb::ChainKey>)>| p.into_iter().collect::<BTreeMap<_, _>>();
        // (peers, outvoted?)
        let table = [
            // Two others agree with each other on b, not with this host.
            (
                peers(vec![
                    (2, vec![key("a", "AA"), key("b", "XX")]),
                    (3, vec![key("a", "AA"), key("b", "XX")]),
                ]),
                true,
            ),
            // One other, another key: a tie decides nothing.
            (
                peers(vec![(2, vec![key("a", "AA"), key("b", "XX")])]),
                false,
            ),
            // The odd one is the other host.
            (
                peers(vec![
                    (2, vec![key("a", "AA"), key("b", "BB")]),
                    (3, vec![key("a", "AA"), key("b", "XX")]),
                ]),
                false,
            ),
            // Three keys, one each: nobody is outvoted.
            (
                peers(vec![
                    (2, vec![key("a", "YY"), key("b", "BB")]),
                    (3, vec![key("a", "ZZ"), key("b", "BB")]),
                ]),
                false,
            ),
            // Members without the chain, or a witness, hold no key for it.
            (peers(vec![(2, vec![key("a", "AA")]), (3, vec![])]), false),
            // Chains listed in another order are still matched by id.
            (
                peers(vec![
                    (2, vec![key("b", "XX"), key("a", "AA")]),
                    (3, vec![key("b", "XX"), key("a", "AA")]),
                ]),
                true,
            ),
            (
                peers(vec![
                    (2, vec![key("b", "BB"), key("a", "AA")]),
                    (3, vec![key("b", "BB"), key("a", "XX")]),
                ]),
                false,
            ),
        ];
        for (p, want) in table {
            assert_eq!(outvoted(&mine, &p).is_some(), want, "{p:?}");
        }
        let why = outvoted(
            &mine,
            &peers(vec![(2, vec![key("b", "XX")]), (3, vec![key("b", "XX")])]),
        );
        assert_eq!(
            why.as_deref(),
            Some("2 members hold key XX for chain b, 1 (this host included) hold this host's BB")
        );
    }

    #[test]
    fn nothing_is_signed_beside_a_validator_mode_holder() {
        // (holder, holder runs in signer mode) -> refused?
        for (holder, signs, refused) in [
            (None, false, false),
            (Some(2), true, false),
            (Some(2), false, true),
        ] {
            let why = held_in_validator_mode(holder, signs);
            assert_eq!(why.is_some(), refused, "{holder:?} {signs}");
        }
    }
}
