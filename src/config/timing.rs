//! The timing table: durations as written (`600ms`, `1.5s`), the `lan`
//! and `wan` profiles, and the safety inequality every resolved [`Timing`]
//! must satisfy (docs/design.md, step 3).
//!
//! With no timing flag the timing is *auto*: each member starts with
//! `lan`, and the cluster switches profile as a whole when its leader
//! measures round trips that call for another ([`wanted`], committed as
//! `SetTiming`). The values that switch are a [`Live`]; the rest of
//! [`Timing`] stays as started.
//!
//! Owns: every timing default, the profile choice from measured round
//! trips, and the check that a configuration cannot let two validators
//! overlap. Must not: read files or the environment.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, RunArgs};

/// A duration written as `100ms`, `1.5s` or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub Duration);

/// A duration that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDuration {
    #[error("bad duration '{0}': want e.g. 600ms or 1.5s")]
    NotANumber(String),
    #[error("bad duration '{0}': out of range")]
    OutOfRange(String),
}

impl FromStr for Millis {
    type Err = BadDuration;
    fn from_str(s: &str) -> Result<Self, BadDuration> {
        let s = s.trim();
        let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = s.strip_suffix('s') {
            (n, 1000.0)
        } else {
            (s, 1.0)
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| BadDuration::NotANumber(s.to_string()))?;
        if !(0.0..=86_400_000.0).contains(&(v * scale)) {
            return Err(BadDuration::OutOfRange(s.to_string()));
        }
        Ok(Millis(Duration::from_micros(
            (v * scale * 1000.0).round() as u64
        )))
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(ms) => Ok(Millis(Duration::from_millis(ms))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

/// Written back as milliseconds with their fraction (`1.5ms`), which
/// [`Millis::from_str`] reads again unchanged.
impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_micros() as f64 / 1000.0))
    }
}

pub use crate::ledger::TimingProfile;

/// The defaults a profile sets.
#[derive(Debug, Clone, Copy)]
pub struct ProfileTimes {
    pub heartbeat: u64,
    pub election_min: u64,
    pub election_max: u64,
    pub fence_after: u64,
}

impl TimingProfile {
    /// Each openraft heartbeat must be answered within one heartbeat
    /// interval or it is lost, so the interval bounds the peer round trip a
    /// profile tolerates; the lease (`fence_after`) leaves room for a
    /// heartbeat interval plus a round trip plus a stall of the same size.
    /// `election_max` is 100 ms above `fence_after + kill_bound +
    /// drift_margin` (the safety inequality with no handover delay), for a
    /// kill that takes longer than `kill_bound` (a frozen guard is first
    /// given `kill_bound` to answer).
    pub fn times(self) -> ProfileTimes {
        match self {
            TimingProfile::Lan => ProfileTimes {
                heartbeat: 100,
                election_min: 300,
                election_max: 600,
                fence_after: 350,
            },
            TimingProfile::Wan => ProfileTimes {
                heartbeat: 150,
                election_min: 450,
                election_max: 900,
                fence_after: 600,
            },
        }
    }
}

/// The round trip under which `lan` holds: each heartbeat is answered well
/// within the lease. Above it for [`SLOW_FOR`] the cluster moves to `wan`.
pub const LAN_RTT: Duration = Duration::from_millis(25);
/// How long the slowest voter's round trips must stay above [`LAN_RTT`].
pub const SLOW_FOR: Duration = Duration::from_secs(3);
/// Back to `lan` only below this, for [`FAST_FOR`]: a hysteresis, so that a
/// link near the bound does not flap between profiles.
pub const BACK_TO_LAN_RTT: Duration = Duration::from_millis(10);
pub const FAST_FOR: Duration = Duration::from_secs(30);
/// The round trip above which no profile holds (the start log and `status`
/// say so).
pub const WAN_RTT: Duration = Duration::from_millis(100);

/// Auto timing's choice: the profile the slowest voter's round trip calls
/// for, given how long it has been above [`LAN_RTT`] (`slow_for`) or below
/// [`BACK_TO_LAN_RTT`] (`fast_for`); `None` keeps `current`.
pub fn wanted(
    current: TimingProfile,
    slow_for: Option<Duration>,
    fast_for: Option<Duration>,
) -> Option<TimingProfile> {
    match current {
        TimingProfile::Lan if slow_for.is_some_and(|d| d >= SLOW_FOR) => Some(TimingProfile::Wan),
        TimingProfile::Wan if fast_for.is_some_and(|d| d >= FAST_FOR) => Some(TimingProfile::Lan),
        _ => None,
    }
}

/// The values a profile switch changes while the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub profile: TimingProfile,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub fence_after: Duration,
    pub handover_delay: Duration,
    /// How long a follower refuses votes after it acks this leader's
    /// message (the leader sends it with each one): at least
    /// `fence_after + kill_bound + drift_margin`, so that whatever profile
    /// the successor runs, the old validator is dead before it is elected.
    pub promise: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub profile: TimingProfile,
    /// No timing flag was given: the profile is the cluster's, switched as
    /// round trips call for (see [`wanted`]); `profile` is the first one.
    pub auto: bool,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub fence_after: Duration,
    pub kill_bound: Duration,
    pub drift_margin: Duration,
    pub handover_delay: Duration,
    pub unhealthy_grace: Duration,
    pub stop_timeout: Duration,
    pub gossip_interval: Duration,
    pub health_interval: Duration,
}

impl Timing {
    /// The least handover delay for which the old validator is certainly dead
    /// before a successor activates (docs/design.md, step 3).
    ///
    /// A successor needs the vote of a node that acked the old leader's last
    /// quorum-acked heartbeat (sent at `t`); that node refuses votes until
    /// `election_max` after receiving it, so the successor is elected after
    /// `t + election_max` and activates after `t + election_max + handover_delay`.
    /// The old validator is dead by `t + fence_after + kill_bound`, give or
    /// take `drift_margin`.
    pub fn min_handover_delay(
        fence_after: Duration,
        kill_bound: Duration,
        drift: Duration,
        election_max: Duration,
    ) -> Duration {
        (fence_after + kill_bound + drift).saturating_sub(election_max)
    }

    /// The switching values under `profile`: the profile's own with auto
    /// timing; the values this node started with when pinned.
    pub fn live(&self, profile: TimingProfile) -> Live {
        let (profile, heartbeat, election_min, election_max, fence_after, handover_delay) = if self
            .auto
        {
            let p = profile.times();
            let d = Duration::from_millis;
            let (fence, emax) = (d(p.fence_after), d(p.election_max));
            let need = Self::min_handover_delay(fence, self.kill_bound, self.drift_margin, emax);
            (
                profile,
                d(p.heartbeat),
                d(p.election_min),
                emax,
                fence,
                need,
            )
        } else {
            (
                self.profile,
                self.heartbeat,
                self.election_min,
                self.election_max,
                self.fence_after,
                self.handover_delay,
            )
        };
        Live {
            profile,
            heartbeat,
            election_min,
            election_max,
            fence_after,
            handover_delay,
            promise: election_max.max(fence_after + self.kill_bound + self.drift_margin),
        }
    }

    /// The values in force until the cluster says otherwise.
    pub fn start(&self) -> Live {
        self.live(self.profile)
    }

    /// The values in force given the cluster's committed choice, if any
    /// (ignored when this node's timing is pinned).
    pub fn live_for(&self, chosen: Option<crate::ledger::TimingChoice>) -> Live {
        match chosen {
            Some(c) if self.auto => self.live(c.profile),
            _ => self.start(),
        }
    }

    /// The longest vote refusal any profile this node may run promises: a
    /// restarted node keeps quiet this long, and a transfer is refused this
    /// long after the unreleased holder was last heard.
    pub fn longest_promise(&self) -> Duration {
        if self.auto {
            [TimingProfile::Lan, TimingProfile::Wan]
                .into_iter()
                .map(|p| self.live(p).promise)
                .max()
                .unwrap_or(self.election_max)
        } else {
            self.start().promise
        }
    }

    /// openraft's election timeouts (its leader lease is the second): with
    /// auto timing the shortest profile's, since a longer promise is
    /// enforced by keyraft itself (`raft::server`) and openraft's cannot
    /// change while it runs.
    pub fn raft_elections(&self) -> (Duration, Duration) {
        if self.auto {
            let p = TimingProfile::Lan.times();
            (
                Duration::from_millis(p.election_min),
                Duration::from_millis(p.election_max),
            )
        } else {
            (self.election_min, self.election_max)
        }
    }

    /// How long one heartbeat may take before openraft gives up on it:
    /// half the shortest lease, so that a round trip several heartbeats
    /// long still renews it (the lease counts from the sending, so a late
    /// answer never lengthens it).
    pub fn heartbeat_deadline(&self) -> Duration {
        let shortest = if self.auto {
            Duration::from_millis(TimingProfile::Lan.times().fence_after)
        } else {
            self.fence_after
        };
        (shortest / 2).max(self.heartbeat)
    }
}

pub(super) fn resolve_timing(a: &RunArgs) -> Result<Timing, ConfigError> {
    let ms = |v: Option<Millis>, d: u64| v.map(|m| m.0).unwrap_or(Duration::from_millis(d));
    let profile = a.timing.unwrap_or_default();
    let auto = a.timing.is_none()
        && a.heartbeat_interval.is_none()
        && a.election_timeout_min.is_none()
        && a.election_timeout_max.is_none()
        && a.fence_after.is_none()
        && a.handover_delay.is_none();
    let p = profile.times();
    let heartbeat = ms(a.heartbeat_interval, p.heartbeat);
    let election_min = ms(a.election_timeout_min, p.election_min);
    let election_max = ms(a.election_timeout_max, p.election_max);
    let fence_after = ms(a.fence_after, p.fence_after);
    let kill_bound = ms(a.kill_bound, 100);
    let drift_margin = ms(a.drift_margin, 100);
    let need = Timing::min_handover_delay(fence_after, kill_bound, drift_margin, election_max);
    let handover_delay = a.handover_delay.map(|m| m.0).unwrap_or(need);
    let show = |d: Duration| format!("{}ms", d.as_millis());
    if heartbeat.is_zero() {
        return Err(invalid("--heartbeat-interval must be above 0"));
    }
    if election_min >= election_max {
        return Err(invalid(format!(
            "--election-timeout-min ({}) must be below --election-timeout-max ({})",
            show(election_min),
            show(election_max)
        )));
    }
    if heartbeat >= election_min {
        return Err(invalid(format!(
            "--heartbeat-interval ({}) must be below --election-timeout-min ({})",
            show(heartbeat),
            show(election_min)
        )));
    }
    if fence_after < heartbeat * 3 {
        return Err(invalid(format!(
            "--fence-after ({}) must be at least three heartbeats ({}), or the lease lapses between heartbeats",
            show(fence_after),
            show(heartbeat * 3)
        )));
    }
    if handover_delay < need {
        return Err(invalid(format!(
            "timings break the safety inequality: fence_after ({}) + kill_bound ({}) + drift_margin ({}) must be at most election_timeout_max ({}) + handover_delay ({}); raise --handover-delay to {} or more",
            show(fence_after),
            show(kill_bound),
            show(drift_margin),
            show(election_max),
            show(handover_delay),
            show(need)
        )));
    }
    Ok(Timing {
        profile,
        auto,
        heartbeat,
        election_min,
        election_max,
        fence_after,
        kill_bound,
        drift_margin,
        handover_delay,
        unhealthy_grace: ms(a.unhealthy_grace, 5000),
        stop_timeout: ms(a.stop_timeout, 10_000),
        gossip_interval: Duration::from_millis(500),
        health_interval: Duration::from_millis(500),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            "600ms".parse::<Millis>().unwrap().0,
            Duration::from_millis(600)
        );
        assert_eq!(
            "1.5s".parse::<Millis>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!(
            "250".parse::<Millis>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("fast".parse::<Millis>().is_err());
        assert!("-1s".parse::<Millis>().is_err());
    }

    fn args(flags: &[&str]) -> Timing {
        let mut all = vec![
            "keyraft",
            "--node-id",
            "1",
            "--peer",
            "2=127.0.0.1:7702",
            "--listen",
            "127.0.0.1:7700",
            "--insecure",
            "--witness",
        ];
        all.extend_from_slice(flags);
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        Cli::parse_from(all).run.resolve().unwrap().timing
    }

    #[test]
    fn auto_timing_without_flags_and_a_promise_that_covers_each_profile() {
        let d = Duration::from_millis;
        let auto = args(&[]);
        assert!(auto.auto);
        assert_eq!(auto.start().profile, TimingProfile::Lan);
        let (lan, wan) = (auto.live(TimingProfile::Lan), auto.live(TimingProfile::Wan));
        assert_eq!(
            (lan.heartbeat, lan.fence_after, lan.promise),
            (d(100), d(350), d(600))
        );
        assert_eq!(
            (wan.heartbeat, wan.fence_after, wan.promise),
            (d(150), d(600), d(900))
        );
        assert_eq!(auto.longest_promise(), d(900));
        // openraft runs lan's lease (keyraft enforces a longer promise) and
        // allows a heartbeat half of lan's lease.
        assert_eq!(auto.raft_elections(), (d(300), d(600)));
        assert_eq!(auto.heartbeat_deadline(), d(175));
        // A longer kill bound lengthens every promise with it.
        let slow_kill = args(&["--kill-bound", "400ms"]);
        assert!(slow_kill.auto);
        assert_eq!(slow_kill.live(TimingProfile::Lan).promise, d(850));
        assert_eq!(slow_kill.live(TimingProfile::Wan).promise, d(1100));
        // Any timing flag pins the profile: the live values are the flags'.
        for flags in [
            &["--timing", "wan"][..],
            &["--fence-after", "320ms"],
            &["--heartbeat-interval", "60ms"],
        ] {
            let pinned = args(flags);
            assert!(!pinned.auto, "{flags:?}");
            assert_eq!(
                pinned.live(TimingProfile::Lan),
                pinned.live(TimingProfile::Wan),
                "{flags:?}"
            );
        }
        assert_eq!(
            args(&["--timing", "wan"]).live(TimingProfile::Lan).profile,
            TimingProfile::Wan
        );
    }

    #[test]
    fn the_profile_follows_the_slowest_round_trip_with_hysteresis() {
        let s = Duration::from_secs;
        use TimingProfile::*;
        // (current, slow for, fast for, wanted)
        let table = [
            (Lan, None, None, None),
            (Lan, Some(s(2)), None, None),
            (Lan, Some(s(3)), None, Some(Wan)),
            (Wan, Some(s(60)), None, None),
            (Wan, None, Some(s(29)), None),
            (Wan, None, Some(s(30)), Some(Lan)),
            (Lan, None, Some(s(60)), None),
        ];
        for (current, slow, fast, want) in table {
            assert_eq!(
                wanted(current, slow, fast),
                want,
                "{current:?} {slow:?} {fast:?}"
            );
        }
    }

    #[test]
    fn default_timings_need_no_handover_delay() {
        let d = Duration::from_millis;
        // (profile, the inequality's spare time)
        for (profile, spare) in [(TimingProfile::Lan, 50), (TimingProfile::Wan, 100)] {
            let p = profile.times();
            assert_eq!(
                Timing::min_handover_delay(
                    d(p.fence_after + spare),
                    d(100),
                    d(100),
                    d(p.election_max)
                ),
                Duration::ZERO,
                "{profile:?}"
            );
            assert_eq!(
                Timing::min_handover_delay(
                    d(p.fence_after + spare + 1),
                    d(100),
                    d(100),
                    d(p.election_max)
                ),
                d(1),
                "{profile:?}: exactly {spare} ms to spare"
            );
            // Three heartbeats fit in the lease, with a 50 ms round trip to
            // spare; and a leader survives 250 ms of silence or more (one
            // lost TCP segment costs a 200 ms retransmission timeout).
            assert!(p.fence_after >= p.heartbeat * 3 + 50, "{profile:?}");
            assert!(p.fence_after - p.heartbeat >= 250, "{profile:?}");
        }
        assert_eq!(
            Timing::min_handover_delay(d(600), d(100), d(100), d(1000)),
            Duration::ZERO
        );
        assert_eq!(
            Timing::min_handover_delay(d(900), d(100), d(100), d(1000)),
            d(100)
        );
    }
}
