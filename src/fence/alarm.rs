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

    /// Sleeps until `left` has passed by CLOCK_BOOTTIME (or for ever with
    /// `None`), or until [`Alarm::ring`]. A failing timer or poll returns at
    /// once: the caller looks at the clocks again, so an error makes the
    /// timer busier, never late.
    pub(super) fn sleep(&self, left: Option<Duration>) {
        let armed = match left {
            Some(d) => self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(d.max(Duration::from_nanos(1)))),
                TimerSetTimeFlags::empty(),
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
        let alarm = Alarm::new().unwrap();
        let t = Instant::now();
        alarm.sleep(Some(Duration::from_millis(30)));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        // A ring before the sleep is not lost: the sleep returns at once.
        alarm.ring();
        let t = Instant::now();
        alarm.sleep(None);
        assert!(t.elapsed() < Duration::from_secs(5));
        // A ring from another thread ends a sleep without a deadline.
        let alarm = Arc::new(alarm);
        let ringer = alarm.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            alarm.sleep(None);
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
        ringer.sleep(Some(Duration::from_millis(1)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
