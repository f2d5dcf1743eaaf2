//! The height limit of signer mode: the highest height the cluster signs,
//! or takes as an imported floor, now ([`height_limit`]).
//!
//! Owns: the limit's rule, from a chain's watermark and the heights the
//! members' synced nodes report, and the probes of each chain's node
//! (`node-rpc`). Must not: sign, commit or refuse anything itself;
//! [`super::Signer`] and the admin service ask it.

use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::task::JoinHandle;

use crate::config::HealthKind;
use crate::health::{self, Prober};
use crate::node::Core;
use crate::pb;
use crate::raft::TypeConfig;

/// A request or an imported floor this far above the watermark (or, with
/// none yet, above height 0) is refused: one bogus height (a buggy or
/// impostor sentry, a forged state file) must not lift the watermark out of
/// reach for good. About two years of 6-second blocks.
pub const MAX_HEIGHT_JUMP: u64 = 10_000_000;
/// Tighter, while members' nodes report being synced: no real node asks
/// for a height this far beyond the lowest one they report (the chain's
/// tip, give or take gossip's lag), about two hours of 6-second blocks.
pub const MAX_AHEAD_OF_CHAIN: u64 = 1_000;

/// The highest height the cluster signs or takes as a floor now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeightLimit {
    pub height: u64,
    pub why: String,
}

/// While members' nodes of the chain report being synced:
/// [`MAX_AHEAD_OF_CHAIN`] above the lower median of the heights they report
/// lately (this node's and gossip's), so that one node, lying or stuck,
/// moves it neither up nor down where three report. Never measured from
/// the watermark, which requests move: repeated requests at the limit
/// cannot walk it up. With no report, [`MAX_HEIGHT_JUMP`] above the
/// watermark (height 0 before the first signature).
///
/// Which node speaks for the chain: its `node-rpc` where the chain has one
/// ([`probe_nodes`]); else, where the cluster signs for one chain only, the
/// validator probe's node (`--health-url`); else none.
pub fn height_limit<SM: RaftStateMachine<TypeConfig>>(
    sh: &Core<SM>,
    chain_id: &str,
) -> HeightLimit {
    let watermark = sh
        .cluster
        .borrow()
        .watermark(chain_id)
        .map_or(0, |w| w.height);
    let Some(signer) = sh.cfg.signer.as_ref() else {
        return limits(watermark, None);
    };
    let own_rpc = signer.chain(chain_id).is_some_and(|c| c.node_rpc.is_some());
    let peers = sh.view.fresh(sh.cfg.timing.gossip_interval * 3);
    let reports: Vec<Option<pb::ValidatorHealth>> = if own_rpc {
        let own = sh.chain_nodes.borrow().get(chain_id).copied();
        let theirs = peers.iter().map(|s| {
            s.chain_heights
                .iter()
                .find(|c| c.chain_id == chain_id)
                .and_then(|c| c.node)
        });
        std::iter::once(own.map(Into::into)).chain(theirs).collect()
    } else if signer.chains.len() == 1 {
        let own = sh.local.borrow().validator;
        let theirs = peers.iter().map(|s| s.validator);
        std::iter::once(own.map(Into::into)).chain(theirs).collect()
    } else {
        Vec::new()
    };
    limits(watermark, median_synced(reports))
}

/// The lower median of the heights the synced nodes among `reports` give.
fn median_synced(reports: Vec<Option<pb::ValidatorHealth>>) -> Option<u64> {
    let mut synced: Vec<u64> = reports
        .into_iter()
        .flatten()
        .filter(|v| v.synced && v.height > 0)
        .map(|v| v.height)
        .collect();
    synced.sort_unstable();
    (!synced.is_empty()).then(|| synced[(synced.len() - 1) / 2])
}

/// Starts a probe of each chain's `node-rpc` (CometBFT `/status`) that
/// keeps what it reports in [`Core::chain_nodes`], where gossip and
/// [`height_limit`] read it.
pub fn probe_nodes<SM: RaftStateMachine<TypeConfig>>(
    core: &Core<SM>,
    interval: Duration,
) -> Vec<JoinHandle<()>> {
    let chains = core.cfg.signer.iter().flat_map(|s| &s.chains);
    chains
        .filter_map(|c| Some((c.chain_id.clone(), c.node_rpc.as_deref()?)))
        .map(|(chain, url)| {
            let prober = Prober::new(
                HealthKind::Cometbft,
                url,
                interval.max(Duration::from_millis(500)),
            )
            .of_chain(&chain);
            let nodes = core.chain_nodes.clone();
            tokio::spawn(health::run_for_chain(prober, interval, chain, nodes))
        })
        .collect()
}

/// [`height_limit`]'s rule on its inputs.
fn limits(watermark: u64, chain: Option<u64>) -> HeightLimit {
    match chain {
        Some(c) => HeightLimit {
            height: c.saturating_add(MAX_AHEAD_OF_CHAIN),
            why: format!(
                "{MAX_AHEAD_OF_CHAIN} heights over {c}, the height the members' synced nodes report"
            ),
        },
        None => HeightLimit {
            height: watermark.saturating_add(MAX_HEIGHT_JUMP),
            why: format!(
                "{MAX_HEIGHT_JUMP} heights over the watermark {watermark} (no member's node reports a synced height)"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heights_are_limited_from_an_empty_watermark_and_by_the_chain() {
        let table = [
            // (watermark, median synced node height) -> limit
            ((0, None), MAX_HEIGHT_JUMP),
            ((0, Some(5_000)), 5_000 + MAX_AHEAD_OF_CHAIN),
            ((100, None), 100 + MAX_HEIGHT_JUMP),
            ((100, Some(120)), 120 + MAX_AHEAD_OF_CHAIN),
            // A watermark far above the nodes (a floor taken with
            // --allow-jump): nothing signs until they reach it.
            ((9_000, Some(10)), 10 + MAX_AHEAD_OF_CHAIN),
            ((u64::MAX - 5, None), u64::MAX),
        ];
        for ((w, chain), want) in table {
            assert_eq!(
                limits(w, chain).height,
                want,
                "watermark {w}, chain {chain:?}"
            );
        }
        assert!(limits(0, None).height < 1 << 62);
    }

    #[test]
    fn the_lower_median_of_synced_reports_speaks_for_the_chain() {
        let node = |synced, height| {
            Some(pb::ValidatorHealth {
                running: true,
                synced,
                height,
            })
        };
        // (reports) -> median
        let table = [
            (vec![], None),
            (vec![None, None], None),
            (vec![node(false, 50), node(true, 0)], None),
            (vec![node(true, 50)], Some(50)),
            // One liar of three moves it neither up nor down.
            (
                vec![node(true, 50), node(true, 51), node(true, u64::MAX)],
                Some(51),
            ),
            (
                vec![node(true, 1), node(true, 50), node(true, 51)],
                Some(50),
            ),
            // Two: the lower.
            (vec![node(true, 50), None, node(true, 70)], Some(50)),
        ];
        for (reports, want) in table {
            assert_eq!(median_synced(reports.clone()), want, "{reports:?}");
        }
    }

    #[test]
    fn requests_at_the_limit_cannot_walk_it_up_while_nodes_report() {
        let mut w = 100;
        for _ in 0..20 {
            w = limits(w, Some(120)).height;
        }
        assert_eq!(w, 120 + MAX_AHEAD_OF_CHAIN);
    }
}
