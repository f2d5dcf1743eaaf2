//! The faults of one seed: drawn from it, applied by the world at their
//! times, and shrunk when a run fails (the smallest schedule that still
//! fails is the one to read).
//!
//! Owns: the fault list and its drawing. Must not: apply anything; the
//! world does.

use std::fmt;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::types::NodeId;

/// Whom a fault hits: a fixed node, or whichever leads when it starts
/// (the active host, where faults matter most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Node(NodeId),
    Leader,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Power loss; back after `down_ms` (unsynced writes lost).
    Crash {
        down_ms: u64,
    },
    /// keyraft SIGKILLed (its guard kills the validator); restarted.
    KillKeyraft {
        down_ms: u64,
    },
    /// Every host loses power, then all come back.
    CrashAll {
        down_ms: u64,
    },
    /// Cut off from every peer, both ways.
    Partition {
        ms: u64,
    },
    /// Its messages to the others are dropped, theirs still arrive.
    OneWayOut {
        ms: u64,
    },
    /// Its links go down and up every `every_ms`.
    Flap {
        ms: u64,
        every_ms: u64,
    },
    /// The whole network slow, lossy, duplicating.
    BadNet {
        ms: u64,
        delay_ms: u64,
        jitter_ms: u64,
        loss: f64,
        dup: f64,
    },
    /// Host frozen (coordinator, guard, validator), its clock running on.
    FreezeHost {
        ms: u64,
    },
    /// keyraft's coordinator and guard frozen, the validator running.
    FreezeKeyraft {
        ms: u64,
    },
    FreezeGuard {
        ms: u64,
    },
    KillGuard,
    /// The guard's lease timer fires late.
    LateTimer {
        ms: u64,
        late_ms: u64,
    },
    /// Kills take time, or never complete.
    SlowKill {
        ms: u64,
        kill_ms: u64,
        unkillable: bool,
    },
    /// A graceful stop takes this long.
    SlowStop {
        ms: u64,
        stop_ms: u64,
    },
    SlowDisk {
        ms: u64,
        slow_ms: u64,
    },
    /// `keyraft switchover` on the leader.
    Switchover,
    /// `keyraft pause`, then `resume` after `ms`.
    Pause {
        ms: u64,
    },
    /// `keyraft members remove` (a leader hands over first), then
    /// `members add` back after `ms`.
    MemberOut {
        ms: u64,
    },
    /// A copy of the node's data dir, taken now.
    Backup,
    /// Power loss and the disk lost (wiped, or replaced by an empty one):
    /// keyraft refuses the empty data dir its peers know, and the operator
    /// starts it again with `--rejoin`.
    Wipe {
        down_ms: u64,
    },
    /// Power loss while the host's disk has writes not yet synced (waited
    /// for, up to a second): the last of them torn. keyraft comes back
    /// after `down_ms`, is killed `kill_ms` later (its page cache kept)
    /// and starts again, so that what its store acknowledged after the
    /// torn write is read once more from the disk.
    TornWrite {
        down_ms: u64,
        kill_ms: u64,
    },
    /// Power loss, and the data dir restored from the last backup (or
    /// wiped, without one) before it comes back.
    Restore {
        down_ms: u64,
    },
    /// Part of the validator's tree escapes keyraft's kill (outside the
    /// tree it scans): it runs on, ignoring SIGTERM and SIGKILL, until the
    /// fault ends, then dies of the kill.
    Hang {
        ms: u64,
    },
    /// Signer mode: the process resumed from a memory image taken a
    /// moment before (a reverted VM snapshot, a restored checkpoint): at
    /// the first moment within `ms` when it signed something not applied
    /// yet, it forgets that signature, and its sentry, resumed with it,
    /// asks for that HRS again with other bytes.
    Resume {
        ms: u64,
    },
    /// Signer mode: a reload (SIGHUP) removes the chain, and another adds
    /// it back `ms` later, while its requests are in flight: the chain
    /// added again signs on with what the removed one signed.
    ReloadChains {
        ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub at_ms: u64,
    pub target: Target,
    pub kind: Kind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.target {
            Target::Node(n) => format!("node {n}"),
            Target::Leader => "the leader".to_string(),
        };
        write!(f, "{:>6} ms  {who}: {:?}", self.at_ms, self.kind)
    }
}

/// The shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: u64,
    pub signer_mode: bool,
    /// Signer mode: how often a sentry asks with bytes of its own.
    pub conflict: f64,
    pub block_ms: u64,
    pub faults: Vec<Fault>,
    /// Faults end (and everything heals) here; liveness is judged after.
    pub heal_ms: u64,
    /// `--stop-timeout`, as an operator may set it (the graceful stop's
    /// grace before SIGKILL).
    pub stop_timeout_ms: u64,
}

pub fn draw(seed: u64) -> Plan {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_fa17);
    let nodes = if rng.random_bool(0.2) { 5 } else { 3 };
    let signer_mode = rng.random_bool(0.5);
    let conflict = if signer_mode {
        rng.random_range(0.0..0.3)
    } else {
        0.0
    };
    let block_ms = rng.random_range(100..=400);
    let heal_ms = 12_000;
    let stop_timeout_ms = [1_000, 2_000, 5_000, 10_000][rng.random_range(0..4)];
    let count = rng.random_range(2..=9);
    let mut faults = Vec::new();
    for _ in 0..count {
        let at_ms = rng.random_range(1_500..heal_ms - 1_000);
        let target = if rng.random_bool(0.6) {
            Target::Leader
        } else {
            Target::Node(rng.random_range(1..=nodes))
        };
        let ms = rng.random_range(100..=3_000);
        let kind = match rng.random_range(0..21) {
            0 => Kind::Crash {
                down_ms: rng.random_range(200..=4_000),
            },
            1 => Kind::KillKeyraft {
                down_ms: rng.random_range(100..=3_000),
            },
            2 if rng.random_bool(0.3) => Kind::CrashAll {
                down_ms: rng.random_range(200..=2_000),
            },
            2 | 3 => Kind::Partition { ms },
            4 => Kind::OneWayOut { ms },
            5 => Kind::Flap {
                ms,
                every_ms: rng.random_range(20..=400),
            },
            6 => Kind::BadNet {
                ms,
                delay_ms: rng.random_range(0..=60),
                jitter_ms: rng.random_range(0..=40),
                loss: rng.random_range(0.0..0.3),
                dup: rng.random_range(0.0..0.2),
            },
            7 | 8 => Kind::FreezeHost { ms },
            9 => Kind::FreezeKeyraft { ms },
            10 => Kind::FreezeGuard { ms },
            11 => Kind::KillGuard,
            12 => Kind::LateTimer {
                ms,
                late_ms: rng.random_range(1..=200),
            },
            13 => Kind::SlowKill {
                ms,
                kill_ms: rng.random_range(1..=2_000),
                unkillable: rng.random_bool(0.2),
            },
            14 => Kind::SlowStop {
                ms,
                stop_ms: rng.random_range(1..=3_000),
            },
            15 => Kind::SlowDisk {
                ms,
                slow_ms: rng.random_range(1..=400),
            },
            16 => Kind::Switchover,
            17 => Kind::Pause { ms },
            18 => {
                // An operator switches over while the validator hangs.
                faults.push(Fault {
                    at_ms: at_ms + rng.random_range(0..=ms / 2),
                    target: Target::Leader,
                    kind: Kind::Switchover,
                });
                Kind::Hang {
                    ms: rng.random_range(500..=6_000),
                }
            }
            19 => {
                // A backup, and later a restore from it of the same node.
                let node = rng.random_range(1..=nodes);
                let restore_at = rng.random_range(at_ms + 500..heal_ms - 500);
                faults.push(Fault {
                    at_ms: restore_at,
                    target: Target::Node(node),
                    kind: Kind::Restore {
                        down_ms: rng.random_range(100..=2_000),
                    },
                });
                faults.push(Fault {
                    at_ms,
                    target: Target::Node(node),
                    kind: Kind::Backup,
                });
                continue;
            }
            _ => {
                // Amnesia during an outage: a backup of one node; another
                // down for a while; the first restored from its backup
                // meanwhile; then the leader lost.
                let restored = rng.random_range(1..=nodes);
                let down = restored % nodes + 1;
                let t1 = at_ms.min(heal_ms - 6_000).max(1_500) + 1_000;
                let outage = rng.random_range(1_500..=4_000);
                let t2 = t1 + rng.random_range(200..=outage - 200);
                let t3 = t2 + rng.random_range(300..=2_000);
                for (at_ms, target, kind) in [
                    (at_ms.min(t1 - 500), Target::Node(restored), Kind::Backup),
                    (t1, Target::Node(down), Kind::Crash { down_ms: outage }),
                    (t2, Target::Node(restored), Kind::Restore { down_ms: 200 }),
                    (t3, Target::Leader, Kind::Crash { down_ms: 2_000 }),
                ] {
                    faults.push(Fault {
                        at_ms,
                        target,
                        kind,
                    });
                }
                continue;
            }
        };
        faults.push(Fault {
            at_ms,
            target,
            kind,
        });
    }
    // Membership changes come from a stream of their own, so that the
    // schedules drawn above (and the regression seeds that name them) stay
    // as they were.
    let mut members = SmallRng::seed_from_u64(seed ^ 0x3e3b_e125);
    if members.random_bool(0.3) {
        faults.push(Fault {
            at_ms: members.random_range(1_500..heal_ms - 3_000),
            target: if members.random_bool(0.6) {
                Target::Leader
            } else {
                Target::Node(members.random_range(1..=nodes))
            },
            kind: Kind::MemberOut {
                ms: members.random_range(100..=3_000),
            },
        });
    }
    // So do lost disks: a host whose disk is wiped as it loses power,
    // alone or in a crash of every host.
    let mut disks = SmallRng::seed_from_u64(seed ^ 0x71fe_d15c);
    if disks.random_bool(0.15) {
        let at_ms = disks.random_range(1_500..heal_ms - 4_000);
        let node = Target::Node(disks.random_range(1..=nodes));
        let down_ms = disks.random_range(100..=2_000);
        let target = if disks.random_bool(0.3) {
            // Every host loses power; one of them its disk too.
            faults.push(Fault {
                at_ms,
                target: node,
                kind: Kind::CrashAll { down_ms },
            });
            node
        } else if disks.random_bool(0.5) {
            Target::Leader
        } else {
            node
        };
        faults.push(Fault {
            at_ms: at_ms + 1,
            target,
            kind: Kind::Wipe { down_ms },
        });
    }
    // And power lost in the middle of a write.
    let mut torn = SmallRng::seed_from_u64(seed ^ 0x70e1_a5d0);
    if torn.random_bool(0.3) {
        faults.push(Fault {
            at_ms: torn.random_range(1_500..heal_ms - 4_000),
            target: if torn.random_bool(0.5) {
                Target::Leader
            } else {
                Target::Node(torn.random_range(1..=nodes))
            },
            kind: Kind::TornWrite {
                down_ms: torn.random_range(100..=1_000),
                kill_ms: torn.random_range(200..=1_500),
            },
        });
    }
    // And, in signer mode, a leader resumed from a memory image.
    let mut images = SmallRng::seed_from_u64(seed ^ 0x1a6e_5a7e);
    if signer_mode && images.random_bool(0.4) {
        faults.push(Fault {
            at_ms: images.random_range(1_500..heal_ms - 2_000),
            target: Target::Leader,
            kind: Kind::Resume {
                ms: images.random_range(100..=1_000),
            },
        });
    }
    // And, in signer mode, the chain removed and added again by reloads.
    let mut reloads = SmallRng::seed_from_u64(seed ^ 0x4e10_adc4);
    if signer_mode && reloads.random_bool(0.3) {
        faults.push(Fault {
            at_ms: reloads.random_range(1_500..heal_ms - 5_000),
            target: if reloads.random_bool(0.7) {
                Target::Leader
            } else {
                Target::Node(reloads.random_range(1..=nodes))
            },
            kind: Kind::ReloadChains {
                ms: reloads.random_range(0..=2_000),
            },
        });
    }
    faults.sort_by_key(|f| f.at_ms);
    Plan {
        nodes,
        signer_mode,
        conflict,
        block_ms,
        faults,
        heal_ms,
        stop_timeout_ms,
    }
}

/// The smallest sub-list of `faults` for which `fails` still holds,
/// removing one fault at a time until no single removal keeps it failing.
pub fn shrink(faults: &[Fault], mut fails: impl FnMut(&[Fault]) -> bool) -> Vec<Fault> {
    let mut kept = faults.to_vec();
    loop {
        let mut removed = false;
        let mut i = 0;
        while i < kept.len() {
            let mut fewer = kept.clone();
            fewer.remove(i);
            if fails(&fewer) {
                kept = fewer;
                removed = true;
            } else {
                i += 1;
            }
        }
        if !removed {
            return kept;
        }
    }
}
