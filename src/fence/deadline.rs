//! The guard's lease deadline, on two clocks at once: a suspended VM's
//! CLOCK_MONOTONIC may not count the pause, CLOCK_BOOTTIME does, and the
//! lease runs out by whichever says so first.
//!
//! Owns: [`Lease`], the deadline and the time left on it. Must not: act on
//! it; the guard's lease timer kills the tree, its control loop renews.

use std::time::Duration;

use super::{boot_now_ns, mono_now_ns};

/// A lease deadline on both clocks: a suspended VM's CLOCK_MONOTONIC may
/// not count the pause, CLOCK_BOOTTIME does.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub(super) mono: u64,
    boot: u64,
}

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC now: grows by every suspend.
pub(super) fn boot_offset() -> u64 {
    boot_now_ns().saturating_sub(mono_now_ns())
}

impl Lease {
    /// A lease ending at `deadline` (CLOCK_MONOTONIC), whose boot-clock
    /// deadline uses the clocks' offset `anchor` taken at the activation's
    /// first lease: a suspend since then makes it end earlier, and no
    /// renewal after the thaw can win the suspended time back.
    pub(super) fn from_mono(deadline: u64, anchor: u64) -> Lease {
        Lease {
            mono: deadline,
            boot: deadline.saturating_add(anchor),
        }
    }

    /// How long until it runs out; zero once either clock has passed it.
    pub(super) fn left(&self) -> Duration {
        self.left_at(mono_now_ns(), boot_now_ns())
    }

    fn left_at(&self, mono_now: u64, boot_now: u64) -> Duration {
        let mono = self.mono.saturating_sub(mono_now);
        let boot = self.boot.saturating_sub(boot_now);
        Duration::from_nanos(mono.min(boot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_out_by_either_clock() {
        let anchor = boot_offset();
        let soon = Lease::from_mono(mono_now_ns() + 50_000_000, anchor);
        assert!(!soon.left().is_zero());
        assert!(soon.left() <= Duration::from_millis(50));
        // A deadline already passed on the monotonic clock.
        assert!(Lease::from_mono(mono_now_ns().saturating_sub(1), anchor)
            .left()
            .is_zero());
        // A suspend of a minute that CLOCK_MONOTONIC did not count: the
        // clocks' offset grew from `anchor` to `anchor + 60 s`. A renewal
        // made after the thaw keeps the activation's anchor, so the lease
        // has run out by the boot clock although the monotonic one says
        // 600 ms are left.
        let (mono, anchor) = (1_000_000_000_000u64, 5u64);
        let renewed = Lease::from_mono(mono + 600_000_000, anchor);
        assert_eq!(
            renewed.left_at(mono, mono + anchor),
            Duration::from_millis(600)
        );
        assert!(renewed
            .left_at(mono, mono + anchor + 60_000_000_000)
            .is_zero());
    }
}
