//! The timing table: durations as written (`600ms`, `1.5s`), the `lan`
//! and `wan` profiles, and the safety inequality every resolved [`Timing`]
//! must satisfy (docs/design.md, step 3).
//!
//! Owns: every timing default and the check that a configuration cannot
//! let two validators overlap. Must not: read files or the environment.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, RunArgs};

/// A duration written as `100ms`, `1.5s` or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub Duration);

impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
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
            .map_err(|_| format!("bad duration '{s}': want e.g. 600ms or 1.5s"))?;
        if !(0.0..=86_400_000.0).contains(&(v * scale)) {
            return Err(format!("bad duration '{s}': out of range"));
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

/// A named set of timing defaults, one per deployment shape. Each flag of
/// the timing table still overrides its own value, and the safety
/// inequality is checked on the result either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimingProfile {
    /// One datacentre or a LAN (peer round trips under 25 ms): 50 ms
    /// heartbeats, 300..600 ms elections, fenced 300 ms after the last
    /// quorum-acked heartbeat.
    #[default]
    Lan,
    /// Nearby datacentres (peer round trips up to 100 ms): 150 ms
    /// heartbeats, 450..900 ms elections, fenced after 600 ms.
    Wan,
}

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
                heartbeat: 50,
                election_min: 300,
                election_max: 600,
                fence_after: 300,
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

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub profile: TimingProfile,
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
}

pub(super) fn resolve_timing(a: &RunArgs) -> Result<Timing, ConfigError> {
    let ms = |v: Option<Millis>, d: u64| v.map(|m| m.0).unwrap_or(Duration::from_millis(d));
    let profile = a.timing.unwrap_or_default();
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

    #[test]
    fn default_timings_need_no_handover_delay() {
        let d = Duration::from_millis;
        for profile in [TimingProfile::Lan, TimingProfile::Wan] {
            let p = profile.times();
            assert_eq!(
                // With 100 ms to spare.
                Timing::min_handover_delay(
                    d(p.fence_after + 100),
                    d(100),
                    d(100),
                    d(p.election_max)
                ),
                Duration::ZERO,
                "{profile:?}"
            );
            // Three heartbeats fit in the lease, with a round trip to spare.
            assert!(p.fence_after >= p.heartbeat * 3 + 100, "{profile:?}");
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
