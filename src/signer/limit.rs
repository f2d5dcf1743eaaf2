//! The height limit of signer mode: the highest height the cluster signs,
//! or takes as an imported floor, now ([`height_limit`]).
//!
//! Owns: the limit's rule, from a chain's watermark and the heights the
//! members' synced nodes report (remembered in [`Core::heights`]), and the
//! probes of each chain's node (`node-rpc`). Must not: sign, commit or
//! refuse anything itself; [`super::Signer`] and the admin service ask it.

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Chain;
use crate::config::{HealthKind, NodeId};
use crate::health::{self, ChainHeights, Prober};
use crate::node::Core;
use crate::pb;
use crate::raft::TypeConfig;

/// How far above the height the chain is known to be at a request (or an
/// imported floor) may go: about two hours of 6-second blocks. Whatever
/// asks (a buggy or impostor sentry, a forged state file), no single
/// request moves the watermark further than this above a height a node
/// vouched for, so none can put it out of the chain's reach for longer.
pub const MAX_AHEAD_OF_CHAIN: u64 = 1_000;
/// A node that says it is synced but whose height has not moved for this
/// long (halted consensus, lost peers) no longer speaks for the chain.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);
/// The fastest any chain keyraft signs for makes blocks (100 ms blocks):
/// with no node speaking for the chain, the limit follows the watermark no
/// faster than this, so repeated requests cannot walk it up faster than a
/// chain could move.
pub const FASTEST_BLOCKS_PER_SEC: u64 = 10;

/// The highest height the cluster signs or takes as a floor now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeightLimit {
    pub height: u64,
    pub why: String,
}

/// [`MAX_AHEAD_OF_CHAIN`] above the height the chain is known to be at:
///
/// - while members' nodes of the chain report being synced and moving
///   (this node's and gossip's): the median of their heights (of two, the
///   upper, at most [`MAX_AHEAD_OF_CHAIN`] over the lower), so that one
///   node, lying or stuck, moves it neither up nor down where three
///   report, and a stuck one of two does not hold it down;
/// - with no such report: the base, the highest height a node vouched for
///   in this process's memory (or the watermark at its first look), which
///   follows the watermark at most [`FASTEST_BLOCKS_PER_SEC`].
///
/// Never measured from the watermark itself, which requests move: one
/// request can lift the watermark at most [`MAX_AHEAD_OF_CHAIN`] over the
/// chain, and repeated requests cannot walk it up.
///
/// Which node speaks for the chain: its `node-rpc` where the chain has one
/// ([`probe_nodes`]); else, where the cluster signs for one chain only, the
/// validator probe's node (`--health-url`); else none.
pub fn height_limit<SM: RaftStateMachine<TypeConfig>>(
    sh: &Core<SM>,
    chain_id: &str,
) -> HeightLimit {
    // An imported floor (no bytes, no reservation) is the operator's word
    // for where the chain is: it vouches as a node's report does.
    let (watermark, floor) = sh
        .cluster
        .borrow()
        .watermark(chain_id)
        .map_or((0, None), |w| {
            let floor = (w.digest.is_none() && w.holder.is_none()).then_some(w.height);
            (w.height, floor)
        });
    let reports = match sh.cfg.signer.is_some() {
        true => {
            let roster = sh.roster();
            reports(
                sh,
                chain_id,
                roster.chain(chain_id).is_some_and(|c| c.node_rpc.is_some()),
                roster.chains.len() == 1,
            )
        }
        false => Vec::new(),
    };
    let now = Instant::now();
    sh.heights.with(chain_id, |memory| {
        limit(memory, watermark, floor, &reports, now)
    })
}

/// Who reported what of `chain_id`'s node: this node first, then its
/// peers by fresh gossip.
fn reports<SM: RaftStateMachine<TypeConfig>>(
    sh: &Core<SM>,
    chain_id: &str,
    own_rpc: bool,
    one_chain: bool,
) -> Vec<(NodeId, pb::ValidatorHealth)> {
    let max_age = sh.cfg.timing.gossip_interval * 3;
    let mut out = Vec::new();
    if own_rpc {
        let own = sh.chain_nodes.borrow().get(chain_id).copied();
        out.extend(own.map(|h| (sh.cfg.id, h.into())));
    } else if one_chain {
        let own = sh.local.borrow().validator;
        out.extend(own.map(|h| (sh.cfg.id, h.into())));
    }
    // Read in place, at every request: a peer's status holds a line for
    // each of its chains.
    sh.view.with_peers(|seen| {
        let fresh = seen.values().filter(|s| s.at.elapsed() <= max_age);
        let fresh = fresh.map(|s| &s.status);
        if own_rpc {
            out.extend(fresh.filter_map(|s| {
                let c = s.chain_heights.iter().find(|c| c.chain_id == chain_id)?;
                Some((s.id, c.node?))
            }));
        } else if one_chain {
            out.extend(fresh.filter_map(|s| Some((s.id, s.validator?))));
        }
    });
    out
}

/// [`height_limit`]'s rule on one chain's memory: records the reports,
/// moves the base, and says where the limit stands.
fn limit(
    memory: &mut ChainHeights,
    watermark: u64,
    floor: Option<u64>,
    reports: &[(NodeId, pb::ValidatorHealth)],
    now: Instant,
) -> HeightLimit {
    let heights: Vec<u64> = reports
        .iter()
        .filter(|(_, r)| r.synced && r.height > 0)
        .filter(|(who, r)| moving(memory, *who, r.height, now))
        .map(|(_, r)| r.height)
        .collect();
    let vouched = vouched(heights);
    let base = rebase(memory, watermark, vouched.max(floor), now);
    match vouched {
        Some(c) => HeightLimit {
            height: c.saturating_add(MAX_AHEAD_OF_CHAIN),
            why: format!(
                "{MAX_AHEAD_OF_CHAIN} heights over {c}, the height the members' synced nodes report"
            ),
        },
        None => HeightLimit {
            height: base.saturating_add(MAX_AHEAD_OF_CHAIN),
            why: format!(
                "{MAX_AHEAD_OF_CHAIN} heights over {base}, the last height a node or an imported floor vouched for, followed at most {FASTEST_BLOCKS_PER_SEC} heights a second (no member's node reports a synced, moving height: give the chain node-rpc, or import a floor)"
            ),
        },
    }
}

/// Records member `who`'s report; whether its height moved within
/// [`STALLED_AFTER`].
fn moving(memory: &mut ChainHeights, who: NodeId, height: u64, now: Instant) -> bool {
    let seen = memory.seen.entry(who).or_insert((height, now));
    if seen.0 != height {
        *seen = (height, now);
    }
    now.saturating_duration_since(seen.1) < STALLED_AFTER
}

/// The height the reports vouch for: the median (of an even count, the
/// upper one, but at most [`MAX_AHEAD_OF_CHAIN`] over the lower): with two
/// reports, one stuck or lagging does not hold the limit down, and one
/// lying high lifts it at most that much over the other.
fn vouched(mut heights: Vec<u64>) -> Option<u64> {
    heights.sort_unstable();
    let n = heights.len();
    let (lower, upper) = (*heights.get(n.checked_sub(1)? / 2)?, heights[n / 2]);
    Some(upper.min(lower.saturating_add(MAX_AHEAD_OF_CHAIN)))
}

/// Moves the base: up to a vouched height at once, towards the watermark
/// at most [`FASTEST_BLOCKS_PER_SEC`] (time spent at the watermark is not
/// banked); the watermark at the first look.
fn rebase(memory: &mut ChainHeights, watermark: u64, vouched: Option<u64>, now: Instant) -> u64 {
    let (mut base, mut at) = *memory.base.get_or_insert((watermark, now));
    if watermark > base {
        let ms = now.saturating_duration_since(at).as_millis() as u64;
        let grow = ms.saturating_mul(FASTEST_BLOCKS_PER_SEC) / 1_000;
        let step = grow.min(watermark - base);
        base += step;
        at = match step == grow {
            // Only the time the step used is spent.
            true => at + Duration::from_millis(step * 1_000 / FASTEST_BLOCKS_PER_SEC),
            false => now,
        };
    } else {
        at = now;
    }
    if let Some(v) = vouched.filter(|v| *v > base) {
        (base, at) = (v, now);
    }
    memory.base = Some((base, at));
    base
}

/// Starts a probe of the `node-rpc` (CometBFT `/status`) of each of
/// `chains` that keeps what it reports in [`Core::chain_nodes`], where
/// gossip and [`height_limit`] read it, until a reload retires the chain.
/// Each probes at the rate for the chains signed for when it starts: a
/// reload that adds chains leaves the kept chains' probes at their rate.
pub fn probe_nodes<SM: RaftStateMachine<TypeConfig>>(
    core: &Arc<Core<SM>>,
    interval: Duration,
    chains: &[Arc<Chain>],
) -> Vec<JoinHandle<()>> {
    let probed: Vec<(&Chain, &str)> = chains
        .iter()
        .filter_map(|c| Some((&**c, c.cfg.node_rpc.as_deref()?)))
        .collect();
    let all = core
        .roster()
        .chains
        .iter()
        .filter(|c| c.node_rpc.is_some())
        .count();
    let every = chain_probe_every(interval, all);
    // Probed in groups of [`PROBES_A_SECOND`] at once, the groups spread
    // over the period: one wake-up of this host for a group's timers and
    // connections, where one a probe cost more than their requests.
    let groups = u32::try_from(probed.len().div_ceil(PROBES_A_SECOND as usize))
        .unwrap_or(u32::MAX)
        .max(1);
    // One client for these chains' probes; their nodes' connections kept
    // between probes only at the full rate (a few chains).
    let keep_alive = all <= CHAINS_PROBED_AT_FULL_RATE;
    let http = health::client(interval.max(Duration::from_millis(500)), keep_alive);
    (0u32..)
        .zip(probed)
        .map(|(i, (chain, url))| {
            let id = chain.id().to_string();
            let prober = Prober::with_client(HealthKind::Cometbft, url, http.clone()).of_chain(&id);
            let (nodes, errors) = (core.chain_nodes.clone(), core.chain_probe_errors.clone());
            let offset = every.saturating_mul(i / PROBES_A_SECOND) / groups;
            let (core, mut retired) = (core.clone(), chain.retired());
            tokio::spawn(async move {
                let probe = async {
                    tokio::time::sleep(offset).await;
                    health::run_for_chain(prober, every, id.clone(), nodes, errors).await
                };
                tokio::select! {
                    biased;
                    () = retired.requested() => {}
                    () = probe => {}
                }
                // Retired: what it reported goes, unless the chain that
                // replaced it probes on.
                let probed_on = matches!(core.roster().chain(&id), Some(c) if c.node_rpc.is_some());
                if !probed_on {
                    core.chain_nodes
                        .send_if_modified(|m| m.remove(&id).is_some());
                    let mut e = core
                        .chain_probe_errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    e.remove(&id);
                }
            })
        })
        .collect()
}

/// Chains whose nodes are each probed every `health_interval`, each
/// node's connection kept open between its probes; past as many, a host
/// probes [`PROBES_A_SECOND`] nodes a second, each probe on a connection
/// of its own, and each chain's at least every [`CHAIN_PROBE_MAX`].
pub const CHAINS_PROBED_AT_FULL_RATE: usize = 5;
/// How many nodes a second a host probes past
/// [`CHAINS_PROBED_AT_FULL_RATE`] chains (up to fifty chains): each probe
/// then connects, a TCP handshake that costs more than the request.
pub const PROBES_A_SECOND: u32 = 5;
/// The longest between two probes of one chain's node: a third of
/// [`STALLED_AFTER`], so that a node whose chain makes a block every few
/// seconds never looks stalled (one of 20 s blocks or more may, between
/// two probes: its limit falls back to the base), and a few heights of
/// lag against the limit's [`MAX_AHEAD_OF_CHAIN`].
pub const CHAIN_PROBE_MAX: Duration = Duration::from_secs(10);

/// How often each of `chains` chains' node is probed, given the
/// `health_interval`: at that rate up to [`CHAINS_PROBED_AT_FULL_RATE`]
/// chains, past it [`PROBES_A_SECOND`] nodes a second in all, at most
/// [`CHAIN_PROBE_MAX`] apart (never faster than the interval asked).
pub fn chain_probe_every(interval: Duration, chains: usize) -> Duration {
    if chains <= CHAINS_PROBED_AT_FULL_RATE {
        return interval;
    }
    let chains = u32::try_from(chains).unwrap_or(u32::MAX);
    (Duration::from_secs(1) * chains / PROBES_A_SECOND)
        .min(CHAIN_PROBE_MAX)
        .max(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slowest probe leaves a report far inside the limit's margin on
    /// the fastest chain, and a moving node is never taken for a stalled
    /// one (a peer's report reaches here up to three gossip periods late).
    #[test]
    fn the_slowest_probe_lags_far_inside_the_limits_margins() {
        let gossip_late = Duration::from_millis(500) * 3;
        let probe_timeout = Duration::from_millis(500);
        let oldest = CHAIN_PROBE_MAX + probe_timeout + gossip_late;
        let lag_heights = oldest.as_secs().saturating_add(1) * FASTEST_BLOCKS_PER_SEC;
        assert!(lag_heights * 4 < MAX_AHEAD_OF_CHAIN, "{lag_heights}");
        assert!(oldest * 2 < STALLED_AFTER, "{oldest:?}");
    }

    #[test]
    fn many_chains_nodes_are_probed_less_often_each() {
        let ms = Duration::from_millis;
        // (health_interval, chains) -> each chain's probe interval
        let table = [
            (ms(500), 1, ms(500)),
            (ms(500), 5, ms(500)),
            (ms(500), 6, ms(1200)),
            (ms(500), 10, ms(2000)),
            (ms(500), 50, ms(10_000)),
            (ms(500), 500, ms(10_000)),
            (ms(2000), 6, ms(2000)),
            (ms(2000), 50, ms(10_000)),
            // An interval longer than the cap is kept.
            (ms(20_000), 50, ms(20_000)),
            (ms(500), 0, ms(500)),
        ];
        for (interval, chains, want) in table {
            assert_eq!(
                chain_probe_every(interval, chains),
                want,
                "{interval:?} {chains}"
            );
        }
    }

    fn node(synced: bool, height: u64) -> pb::ValidatorHealth {
        pb::ValidatorHealth {
            running: true,
            synced,
            height,
        }
    }

    #[test]
    fn the_median_of_synced_reports_speaks_for_the_chain() {
        // (heights of synced, moving reports) -> vouched
        let table = [
            (vec![], None),
            (vec![50], Some(50)),
            // One liar of three moves it neither up nor down.
            (vec![50, 51, u64::MAX], Some(51)),
            (vec![1, 50, 51], Some(50)),
            // Two: the upper, at most the margin over the lower.
            (vec![50, 70], Some(70)),
            (vec![10, 5_000], Some(1_010)),
            (vec![5_000, u64::MAX], Some(6_000)),
            (vec![1, 2, 3, 4], Some(3)),
        ];
        for (heights, want) in table {
            assert_eq!(vouched(heights.clone()), want, "{heights:?}");
        }
    }

    #[test]
    fn heights_are_limited_by_the_chain_and_without_it_by_the_base() {
        let t0 = Instant::now();
        // (watermark, reports) -> limit, each on a fresh memory.
        let table = [
            (0, vec![], MAX_AHEAD_OF_CHAIN),
            (0, vec![(1, node(true, 5_000))], 5_000 + MAX_AHEAD_OF_CHAIN),
            (100, vec![], 100 + MAX_AHEAD_OF_CHAIN),
            (
                100,
                vec![(2, node(false, 9_000)), (3, node(true, 0))],
                100 + MAX_AHEAD_OF_CHAIN,
            ),
            (100, vec![(1, node(true, 120))], 120 + MAX_AHEAD_OF_CHAIN),
            // A watermark far above the nodes (a floor taken with
            // --allow-jump): nothing signs until they reach it.
            (9_000, vec![(1, node(true, 10))], 10 + MAX_AHEAD_OF_CHAIN),
            (u64::MAX - 5, vec![], u64::MAX),
        ];
        for (w, reports, want) in table {
            let got = limit(&mut ChainHeights::default(), w, None, &reports, t0);
            assert_eq!(
                got.height, want,
                "watermark {w}, reports {reports:?}: {}",
                got.why
            );
        }
    }

    /// Finding: with no report, one request 10,000,000 heights over the
    /// watermark was signed and moved it there for good.
    #[test]
    fn without_a_report_no_request_jumps_and_repeated_ones_walk_no_faster_than_a_chain() {
        let t0 = Instant::now();
        let mut memory = ChainHeights::default();
        let first = limit(&mut memory, 100, None, &[], t0);
        assert_eq!(first.height, 100 + MAX_AHEAD_OF_CHAIN);
        // A request at the limit is signed: the watermark is there now. A
        // moment later the limit has not followed it.
        let w = first.height;
        let t = t0 + Duration::from_millis(50);
        assert_eq!(limit(&mut memory, w, None, &[], t).height, first.height);
        // It follows at the fastest chain's pace, never faster.
        let t = t0 + Duration::from_secs(10);
        assert_eq!(
            limit(&mut memory, w, None, &[], t).height,
            100 + 10 * FASTEST_BLOCKS_PER_SEC + MAX_AHEAD_OF_CHAIN
        );
        // Many small looks add up to the same pace (nothing lost to rounding).
        let mut memory = ChainHeights::default();
        limit(&mut memory, 100, None, &[], t0);
        let mut t = t0;
        for _ in 0..1_000 {
            t += Duration::from_millis(10);
            limit(&mut memory, 100_000, None, &[], t);
        }
        assert_eq!(
            memory.base.map(|b| b.0),
            Some(100 + 10 * FASTEST_BLOCKS_PER_SEC)
        );
        // Time at the watermark is not banked for a later jump.
        let mut memory = ChainHeights::default();
        limit(&mut memory, 100, None, &[], t0);
        limit(&mut memory, 100, None, &[], t0 + Duration::from_secs(3_600));
        let later = limit(
            &mut memory,
            50_000,
            None,
            &[],
            t0 + Duration::from_secs(3_601),
        );
        assert_eq!(
            later.height,
            100 + FASTEST_BLOCKS_PER_SEC + MAX_AHEAD_OF_CHAIN
        );
        // An imported floor vouches at once (`--allow-jump` while nodes
        // sync, or after an outage longer than the margin).
        let mut memory = ChainHeights::default();
        limit(&mut memory, 100, None, &[], t0);
        let got = limit(&mut memory, 5_000_000, Some(5_000_000), &[], t0);
        assert_eq!(got.height, 5_000_000 + MAX_AHEAD_OF_CHAIN);
        // A height a node vouched for is kept when the reports stop.
        let mut memory = ChainHeights::default();
        limit(&mut memory, 100, None, &[(1, node(true, 7_000))], t0);
        assert_eq!(
            limit(&mut memory, 100, None, &[], t0).height,
            7_000 + MAX_AHEAD_OF_CHAIN
        );
    }

    /// Finding: of two reports, one node stuck at its height (synced by its
    /// own word) held the limit for every leader.
    #[test]
    fn a_node_that_stopped_moving_no_longer_speaks_for_the_chain() {
        let t0 = Instant::now();
        let mut memory = ChainHeights::default();
        let at = |s| t0 + Duration::from_secs(s);
        // Node 2 stuck at 100, node 1 moving on.
        for s in 0..=40 {
            let reports = [(1, node(true, 100 + 10 * s)), (2, node(true, 100))];
            let got = limit(&mut memory, 0, None, &reports, at(s));
            let want = match Duration::from_secs(s) < STALLED_AFTER {
                // The lower of two, while it might still be moving...
                true => (100 + 10 * s).min(100 + MAX_AHEAD_OF_CHAIN),
                // ...then the one that moves.
                false => 100 + 10 * s,
            };
            assert_eq!(got.height, want + MAX_AHEAD_OF_CHAIN, "at {s} s");
        }
        // Every node stuck (a chain-wide halt): the base, which kept the
        // last height a node vouched for.
        let reports = [(1, node(true, 500)), (2, node(true, 100))];
        let got = limit(&mut memory, 0, None, &reports, at(100));
        assert_eq!(got.height, 500 + MAX_AHEAD_OF_CHAIN, "{}", got.why);
    }

    #[test]
    fn requests_at_the_limit_cannot_walk_it_up_while_nodes_report() {
        let t0 = Instant::now();
        let mut memory = ChainHeights::default();
        let mut w = 100;
        for i in 0..20 {
            let t = t0 + Duration::from_millis(i * 100);
            w = limit(&mut memory, w, None, &[(1, node(true, 120))], t).height;
        }
        assert_eq!(w, 120 + MAX_AHEAD_OF_CHAIN);
    }
}
