//! The guard's alarm clock: its lease timer sleeps here until the lease
//! deadline or until told that a nearer one was set. A timerfd on
//! CLOCK_BOOTTIME, which counts the time a suspended machine stood still
//! (a CLOCK_MONOTONIC sleep would oversleep it), and an eventfd to ring it.
//!
//! Must not: decide anything about the lease; the guard's timer looks at
//! both clocks itself after every wake-up, so a wake-up too early costs a
//! loop and one that fails returns at once (never late).

use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// The lease timer's wake-ups: a timer on CLOCK_BOOTTIME, which counts a
/// suspended machine's pause (a CLOCK_MONOTONIC sleep would oversleep it),
/// and an event that a nearer deadline (or a first one) was set.
pub(super) struct Alarm {
    timer: TimerFd,
    nearer: EventFd,
}

impl Alarm {
    pub(super) fn new() -> std::io::Result<Alarm> {
        Ok(Alarm {
            timer: TimerFd::new(
                ClockId::CLOCK_BOOTTIME,
                TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
            )?,
            nearer: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        })
    }

    /// Tells the timer thread to look again (never blocks: a counter).
    pub(super) fn ring(&self) {
        let _ = self.nearer.write(1);
    }

    /// Sleeps until CLOCK_BOOTTIME reads `at` (ns; for ever with `None`),
    /// or until [`Alarm::ring`]. The time is absolute, so a delay before the
    /// timer is armed does not make it late. A failing timer or poll
    /// returns at once: the caller looks at the clocks again, so an error
    /// makes the timer busier, never late.
    pub(super) fn sleep_until(&self, at: Option<u64>) {
        let armed = match at {
            // 0 would disarm the timer; any time already passed fires it.
            Some(ns) => self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(Duration::from_nanos(ns.max(1)))),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            ),
            None => self.timer.unset(),
        };
        if armed.is_err() {
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let mut fds = [
            PollFd::new(self.timer.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.nearer.as_fd(), PollFlags::POLLIN),
        ];
        if nix::poll::poll(&mut fds, PollTimeout::NONE).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Drained; the timer's count is reset by the next set.
        let _ = self.nearer.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn the_alarm_sleeps_until_its_time_or_a_ring() {
        let in_ms = |ms: u64| Some(super::super::boot_now_ns() + ms * 1_000_000);
        let alarm = Alarm::new().unwrap();
        let t = Instant::now();
        alarm.sleep_until(in_ms(30));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        // A ring before the sleep is not lost: the sleep returns at once.
        alarm.ring();
        let t = Instant::now();
        alarm.sleep_until(None);
        assert!(t.elapsed() < Duration::from_secs(5));
        // A ring from another thread ends a sleep without a deadline.
        let alarm = Arc::new(alarm);
        let ringer = alarm.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            alarm.sleep_until(None);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "slept without a ring"
        );
        ringer.ring();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        sleeper.join().unwrap();
        // A later deadline does not carry over: a new sleep uses its own.
        let t = Instant::now();
        ringer.sleep_until(in_ms(1));
        assert!(t.elapsed() < Duration::from_secs(5));
        // A time already passed returns at once.
        let t = Instant::now();
        ringer.sleep_until(Some(1));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
