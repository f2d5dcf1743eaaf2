//! Auto timing: the cluster runs the timing profile its links call for.
//!
//! Every member puts in force the profile the cluster committed (the
//! ledger's `SetTiming`; until there is one, the profile it started with).
//! The leader, when no timing flag pins the profile, watches the round
//! trips gossip measures to each voter and commits a switch when the
//! slowest one calls for it ([`crate::config::timing::wanted`]: over 25 ms
//! for 3 s moves to `wan`, under 10 ms for 30 s back to `lan`).
//!
//! Safety does not rest on this module or on every member switching at
//! once: each leader message carries the vote refusal its sender's lease
//! needs (`promise_ms`, see `raft::server`), and a leader lengthens its
//! fence only once a quorum acked messages that promised the longer
//! refusal (`coordinator::policy::fence_in_force`).
//!
//! Owns: applying the committed profile to the gate, the round-trip
//! window, and the leader's proposal. Must not: change a pinned timing, or
//! touch the lease or the validator (the coordinator reads the gate).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::config::timing::{wanted, BACK_TO_LAN_RTT, LAN_RTT};
use crate::config::Live;
use crate::ledger::{Command, TimingChoice, TimingProfile};
use crate::node::Core;

/// How long the leader waits for a switch to commit before it tries again.
const COMMIT_WITHIN: Duration = Duration::from_secs(2);

/// The slowest fresh voter's round trip, and since when it has been over
/// [`LAN_RTT`] or under [`BACK_TO_LAN_RTT`] without a break. A run under
/// [`BACK_TO_LAN_RTT`] is broken by two slow samples in a row, not by one:
/// a single late answer is a scheduling hiccup on a busy host, not a
/// slower link, and must not hold the longer profile for another 30 s.
#[derive(Default)]
struct Window {
    slow_since: Option<Instant>,
    fast_since: Option<Instant>,
    last: Option<Duration>,
}

impl Window {
    fn note(&mut self, worst: Option<Duration>, now: Instant) {
        let Some(rtt) = worst else {
            *self = Window::default();
            return;
        };
        let fast = rtt.min(self.last.unwrap_or(rtt)) < BACK_TO_LAN_RTT;
        self.last = Some(rtt);
        self.slow_since = (rtt > LAN_RTT).then(|| self.slow_since.unwrap_or(now));
        self.fast_since = fast.then(|| self.fast_since.unwrap_or(now));
    }

    fn want(&self, current: TimingProfile, now: Instant) -> Option<TimingProfile> {
        let age = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        // A late sample does not break the run, but no switch to the
        // shorter profile is made on one.
        let fast_now = self.last.is_some_and(|l| l < BACK_TO_LAN_RTT);
        let fast_since = self.fast_since.filter(|_| fast_now);
        wanted(current, age(self.slow_since), age(fast_since))
    }
}

/// The slowest round trip to a voter heard from lately (gossip's
/// measurement, on the same peer connections as Raft's).
fn slowest_voter(core: &Core) -> Option<Duration> {
    let voters: Vec<_> = core.with_raft_metrics(|m| {
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != core.cfg.id)
            .collect()
    });
    let fresh = core.cfg.timing.gossip_interval * 3;
    // Read in place: a status is large (fifty chains' keys and heights).
    core.view.with_peers(|seen| {
        voters
            .iter()
            .filter_map(|v| seen.get(v))
            .filter(|s| s.at.elapsed() <= fresh)
            .filter_map(|s| s.rtt)
            .max()
    })
}

/// Puts `live` in force, says so, and updates the metric.
fn apply(core: &Core, live: Live, why: &str) {
    if core.gate.set_live(live) {
        tracing::info!(
            profile = %live.profile,
            heartbeat_ms = live.heartbeat.as_millis() as u64,
            fence_after_ms = live.fence_after.as_millis() as u64,
            "timing profile {} in force: {why}",
            live.profile
        );
    }
    core.metrics
        .set_timing(&live.profile.to_string(), core.cfg.timing.auto);
}

/// Why `live` is in force, in words (the start log, `status`).
fn why(auto: bool, chosen: Option<TimingChoice>) -> String {
    match chosen {
        Some(c) if auto => format!(
            "committed by the cluster (log index {}) for round trips up to {} ms",
            c.index, c.rtt_ms
        ),
        _ if auto => {
            "the start profile: the cluster has measured no round trip that calls for another"
                .into()
        }
        _ => "pinned by this node's timing flags".into(),
    }
}

/// `status`'s `timing`: the profile in force on this node, how it was
/// chosen and why, the values it runs, and the slowest voter's round trip.
pub fn status(core: &Core, chosen: Option<TimingChoice>) -> serde_json::Value {
    let live = core.gate.live();
    let auto = core.cfg.timing.auto;
    serde_json::json!({
        "profile": live.profile.to_string(),
        "chosen": if auto { "auto" } else { "pinned" },
        "why": why(auto, chosen),
        "heartbeat_ms": live.heartbeat.as_millis() as u64,
        "fence_after_ms": live.fence_after.as_millis() as u64,
        "election_timeout_max_ms": live.election_max.as_millis() as u64,
        "slowest_voter_rtt_ms": slowest_voter(core).map(|d| d.as_secs_f64() * 1000.0),
    })
}

/// Runs until the cluster's state channel closes.
pub async fn run(core: Arc<Core>) {
    let mut cluster = core.cluster.clone();
    let mut tick = tokio::time::interval(core.cfg.timing.gossip_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window = Window::default();
    loop {
        let chosen = cluster.borrow_and_update().timing;
        let live = core.cfg.timing.live_for(chosen);
        apply(&core, live, &why(core.cfg.timing.auto, chosen));
        if core.cfg.timing.auto && core.raft_metrics().state == ServerState::Leader {
            let worst = slowest_voter(&core);
            let now = Instant::now();
            window.note(worst, now);
            if let Some(profile) = window.want(live.profile, now) {
                propose(&core, profile, worst.unwrap_or_default()).await;
                window = Window::default();
            }
        } else {
            window = Window::default();
        }
        tokio::select! {
            changed = cluster.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// The leader commits `profile` for the whole cluster.
async fn propose(core: &Core, profile: TimingProfile, rtt: Duration) {
    let rtt_ms = rtt.as_millis().min(u32::MAX as u128) as u32;
    tracing::info!(
        %profile,
        rtt_ms,
        "round trips to the voters call for the {profile} timing profile: committing it"
    );
    let write = core
        .raft
        .client_write(Command::SetTiming { profile, rtt_ms });
    match tokio::time::timeout(COMMIT_WITHIN, write).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("could not commit the {profile} timing profile: {e}"),
        Err(_) => {
            tracing::warn!("the {profile} timing profile did not commit within {COMMIT_WITHIN:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_needs_an_unbroken_run() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let slow = Some(Duration::from_millis(80));
        let fast = Some(Duration::from_millis(1));
        let mut w = Window::default();
        w.note(slow, at(0));
        assert_eq!(w.want(TimingProfile::Lan, at(2_000)), None);
        w.note(slow, at(2_500));
        assert_eq!(
            w.want(TimingProfile::Lan, at(3_000)),
            Some(TimingProfile::Wan)
        );
        // One fast sample starts the count again.
        w.note(fast, at(3_100));
        w.note(slow, at(3_200));
        assert_eq!(w.want(TimingProfile::Lan, at(5_000)), None);
        // No voter heard from: nothing is known, nothing switches.
        w.note(None, at(5_100));
        assert_eq!(w.want(TimingProfile::Lan, at(9_000)), None);
        // Back to lan only after 30 s under 10 ms.
        w.note(fast, at(10_000));
        assert_eq!(w.want(TimingProfile::Wan, at(39_000)), None);
        assert_eq!(
            w.want(TimingProfile::Wan, at(40_000)),
            Some(TimingProfile::Lan)
        );
        // One late answer does not break the run; two in a row do; none
        // switches while the last answer was late.
        let mut w = Window::default();
        w.note(fast, at(0));
        w.note(Some(Duration::from_millis(40)), at(10_000));
        assert_eq!(w.want(TimingProfile::Wan, at(30_000)), None);
        w.note(fast, at(10_500));
        assert_eq!(
            w.want(TimingProfile::Wan, at(30_000)),
            Some(TimingProfile::Lan)
        );
        w.note(Some(Duration::from_millis(40)), at(31_000));
        w.note(Some(Duration::from_millis(40)), at(31_500));
        w.note(fast, at(32_000));
        assert_eq!(w.want(TimingProfile::Wan, at(61_000)), None);
        assert_eq!(
            w.want(TimingProfile::Wan, at(62_000)),
            Some(TimingProfile::Lan)
        );
        // In between (10..25 ms) neither way.
        let mut w = Window::default();
        w.note(Some(Duration::from_millis(15)), at(0));
        assert_eq!(w.want(TimingProfile::Lan, at(60_000)), None);
        assert_eq!(w.want(TimingProfile::Wan, at(60_000)), None);
    }
}
