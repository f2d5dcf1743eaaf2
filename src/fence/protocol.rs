//! The guard's protocol, one line each way over a pipe, as values both
//! ends use: the coordinator writes a [`Request`] after a sequence number,
//! the guard answers it with a [`Reply`] carrying the same number (a late
//! reply never answers a newer request) and reports [`Event`]s on its own.
//!
//! ```text
//! SEQ start keyed|standby <json argv>
//!                        -> SEQ ok started <pid>   keyed: in a fresh keyed leaf
//!                                                  (or group), only under a live lease
//! SEQ stop <grace_ms>    -> SEQ ok stopped <how>   SIGTERM to the tree, SIGKILL after
//!                                                  grace, once the whole tree is dead
//! SEQ kill               -> SEQ ok stopped <how>   the same without the grace
//! SEQ signal <signum>    -> SEQ ok
//! SEQ lease <mono_ns>    -> SEQ ok                 kill the tree at that CLOCK_MONOTONIC
//!                                                  time (the kernel fence's lease first)
//! SEQ unlease            -> SEQ ok                 (the kernel's lease removed, verified)
//! any of them            -> SEQ err <code> [<detail>]   a [`Refusal`]
//! event exit <pid> <how>                           the validator died unasked
//! event fenced <pid> <how>                         killed at the lease deadline
//! ```
//!
//! Owns: the grammar, written ([`std::fmt::Display`]) and read
//! ([`std::str::FromStr`]) in one place. Must not: act on anything; the
//! guard and its client do.

use std::fmt;
use std::str::FromStr;

/// Why a line is not one of the protocol's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a guard protocol line ({why}): {line:?}")]
pub struct BadLine {
    pub line: String,
    pub why: &'static str,
}

fn bad(line: &str, why: &'static str) -> BadLine {
    BadLine {
        line: line.to_string(),
        why,
    }
}

/// What the coordinator asks of its guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start the validator (`keyed`: with the key linked) as `argv`.
    Start { keyed: bool, argv: Vec<String> },
    /// SIGTERM to the tree, SIGKILL after `grace_ms`.
    Stop { grace_ms: u64 },
    /// SIGKILL to the tree.
    Kill,
    /// A signal to the validator.
    Signal(i32),
    /// Kill the tree at this CLOCK_MONOTONIC time unless renewed.
    Lease { mono_ns: u64 },
    /// No lease (and none in the kernel).
    Unlease,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Start { keyed, argv } => {
                let role = if *keyed { "keyed" } else { "standby" };
                let json = serde_json::to_string(argv).map_err(|_| fmt::Error)?;
                write!(f, "start {role} {json}")
            }
            Request::Stop { grace_ms } => write!(f, "stop {grace_ms}"),
            Request::Kill => write!(f, "kill"),
            Request::Signal(sig) => write!(f, "signal {sig}"),
            Request::Lease { mono_ns } => write!(f, "lease {mono_ns}"),
            Request::Unlease => write!(f, "unlease"),
        }
    }
}

impl FromStr for Request {
    type Err = BadLine;

    fn from_str(line: &str) -> Result<Request, BadLine> {
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let arg = arg.trim();
        let number = |why| arg.parse::<u64>().map_err(|_| bad(line, why));
        Ok(match cmd {
            "start" => {
                let (role, json) = arg.split_once(' ').ok_or(bad(line, "no command"))?;
                let keyed = match role {
                    "keyed" => true,
                    "standby" => false,
                    _ => return Err(bad(line, "a start is keyed or standby")),
                };
                let argv: Vec<String> =
                    serde_json::from_str(json).map_err(|_| bad(line, "argv is not a JSON list"))?;
                if argv.is_empty() {
                    return Err(bad(line, "an empty command"));
                }
                Request::Start { keyed, argv }
            }
            "stop" => Request::Stop {
                grace_ms: number("a grace in ms")?,
            },
            "kill" => Request::Kill,
            "signal" => Request::Signal(arg.parse().map_err(|_| bad(line, "a signal number"))?),
            "lease" => Request::Lease {
                mono_ns: number("a deadline in ns")?,
            },
            "unlease" => Request::Unlease,
            _ => return Err(bad(line, "an unknown request")),
        })
    }
}

/// A request line: its sequence number and the request.
pub fn request_line(seq: u64, req: &Request) -> String {
    format!("{seq} {req}")
}

/// Reads a request line.
pub fn parse_request(line: &str) -> Result<(u64, Request), BadLine> {
    let (seq, rest) = line.split_once(' ').unwrap_or((line, ""));
    let seq = seq.parse().map_err(|_| bad(line, "no sequence number"))?;
    Ok((seq, rest.parse()?))
}

/// What the guard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The validator runs, as this pid.
    Started(u32),
    /// The whole tree is dead; how the validator ended.
    Stopped(String),
    /// Done, with nothing to tell.
    Done,
}

/// Why the guard did not do what it was asked. Its wire form is a code
/// and, for some, a detail: `running 4242`, `kernel-fence <why>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("validator {0} still runs")]
    Running(u32),
    #[error("the lease has run out: not starting, not renewing")]
    RanOut,
    #[error("no lease: not starting with the key")]
    NoLease,
    #[error("no validator running")]
    NotRunning,
    #[error("not a signal: {0}")]
    BadSignal(i32),
    #[error("cannot signal the validator: {0}")]
    NotSignalled(String),
    #[error("cannot start the validator: {0}")]
    Spawn(String),
    #[error("kernel fence: {0}")]
    KernelFence(String),
    #[error("the validator's tree is not proven dead: {0}")]
    NotProven(String),
    #[error("{0}")]
    BadRequest(String),
}

impl Refusal {
    fn code(&self) -> (&'static str, String) {
        match self {
            Refusal::Running(pid) => ("running", pid.to_string()),
            Refusal::RanOut => ("ran-out", String::new()),
            Refusal::NoLease => ("no-lease", String::new()),
            Refusal::NotRunning => ("not-running", String::new()),
            Refusal::BadSignal(sig) => ("bad-signal", sig.to_string()),
            Refusal::NotSignalled(why) => ("not-signalled", why.clone()),
            Refusal::Spawn(why) => ("spawn", why.clone()),
            Refusal::KernelFence(why) => ("kernel-fence", why.clone()),
            Refusal::NotProven(why) => ("not-proven", why.clone()),
            Refusal::BadRequest(why) => ("bad-request", why.clone()),
        }
    }

    fn from_code(line: &str, code: &str, detail: &str) -> Result<Refusal, BadLine> {
        let text = || detail.to_string();
        Ok(match code {
            "running" => Refusal::Running(detail.parse().map_err(|_| bad(line, "a pid"))?),
            "ran-out" => Refusal::RanOut,
            "no-lease" => Refusal::NoLease,
            "not-running" => Refusal::NotRunning,
            "bad-signal" => Refusal::BadSignal(detail.parse().map_err(|_| bad(line, "a signal"))?),
            "not-signalled" => Refusal::NotSignalled(text()),
            "spawn" => Refusal::Spawn(text()),
            "kernel-fence" => Refusal::KernelFence(text()),
            "not-proven" => Refusal::NotProven(text()),
            "bad-request" => Refusal::BadRequest(text()),
            _ => return Err(bad(line, "an unknown refusal")),
        })
    }
}

/// The guard's answer to request `seq`: what it did, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub seq: u64,
    pub outcome: Result<Done, Refusal>,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, code, detail) = match &self.outcome {
            Ok(Done::Started(pid)) => ("ok", "started", pid.to_string()),
            Ok(Done::Stopped(how)) => ("ok", "stopped", how.clone()),
            Ok(Done::Done) => ("ok", "", String::new()),
            Err(e) => {
                let (code, detail) = e.code();
                ("err", code, detail)
            }
        };
        // One line each: a detail never carries a newline onto the wire.
        let detail = detail.replace('\n', " ");
        let line = [self.seq.to_string(), word.into(), code.into(), detail];
        let end = line.iter().rposition(|w| !w.is_empty()).unwrap_or(0);
        f.write_str(&line[..=end].join(" "))
    }
}

/// What the guard reports unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The validator `pid` died unasked, `how`.
    Exit { pid: u32, how: String },
    /// The validator `pid` was killed at the lease deadline, `how`.
    Fenced { pid: u32, how: String },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Exit { pid, how } => write!(f, "event exit {pid} {how}"),
            Event::Fenced { pid, how } => write!(f, "event fenced {pid} {how}"),
        }
    }
}

/// A line from the guard: a reply or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromGuard {
    Reply(Reply),
    Event(Event),
}

impl FromStr for FromGuard {
    type Err = BadLine;

    fn from_str(line: &str) -> Result<FromGuard, BadLine> {
        if let Some(ev) = line.strip_prefix("event ") {
            let mut parts = ev.splitn(3, ' ');
            let (kind, pid, how) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            let pid = pid
                .and_then(|p| p.parse().ok())
                .ok_or(bad(line, "an event without a pid"))?;
            let how = how.to_string();
            return Ok(FromGuard::Event(match kind {
                Some("exit") => Event::Exit { pid, how },
                Some("fenced") => Event::Fenced { pid, how },
                _ => return Err(bad(line, "an unknown event")),
            }));
        }
        let mut parts = line.splitn(4, ' ');
        let seq = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(bad(line, "no sequence number"))?;
        let (word, code) = (parts.next(), parts.next().unwrap_or(""));
        let detail = parts.next().unwrap_or("");
        let outcome = match (word, code) {
            (Some("ok"), "started") => Ok(Done::Started(
                detail.parse().map_err(|_| bad(line, "a pid"))?,
            )),
            (Some("ok"), "stopped") => Ok(Done::Stopped(detail.to_string())),
            (Some("ok"), "") => Ok(Done::Done),
            (Some("err"), code) => Err(Refusal::from_code(line, code, detail)?),
            _ => return Err(bad(line, "neither ok nor err")),
        };
        Ok(FromGuard::Reply(Reply { seq, outcome }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_reads_back_as_written() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo 'a b' \"c\"".into()];
        for req in [
            Request::Start {
                keyed: true,
                argv: argv.clone(),
            },
            Request::Start { keyed: false, argv },
            Request::Stop { grace_ms: 1500 },
            Request::Kill,
            Request::Signal(1),
            Request::Lease {
                mono_ns: 123_456_789,
            },
            Request::Unlease,
        ] {
            let line = request_line(7, &req);
            assert_eq!(parse_request(&line), Ok((7, req)), "{line}");
        }
    }

    #[test]
    fn what_is_not_the_protocol_is_refused_with_why() {
        for (line, why) in [
            ("x kill", "no sequence number"),
            ("3 reboot", "an unknown request"),
            ("3 start root [\"sh\"]", "a start is keyed or standby"),
            ("3 start keyed []", "an empty command"),
            ("3 start keyed sh", "argv is not a JSON list"),
            ("3 lease soon", "a deadline in ns"),
            ("3 stop", "a grace in ms"),
        ] {
            assert_eq!(parse_request(line).map_err(|e| e.why), Err(why), "{line}");
        }
    }

    #[test]
    fn replies_and_events_read_back_as_written_and_an_unknown_event_is_refused() {
        for outcome in [
            Ok(Done::Started(4242)),
            Ok(Done::Stopped("code 0".into())),
            Ok(Done::Stopped(String::new())),
            Ok(Done::Done),
            Err(Refusal::Running(17)),
            Err(Refusal::RanOut),
            Err(Refusal::NoLease),
            Err(Refusal::NotRunning),
            Err(Refusal::BadSignal(99)),
            Err(Refusal::NotSignalled(
                "EPERM: Operation not permitted".into(),
            )),
            Err(Refusal::Spawn("no such file".into())),
            Err(Refusal::KernelFence("set gone".into())),
            Err(Refusal::NotProven("pid 5 alive".into())),
            Err(Refusal::BadRequest("x".into())),
        ] {
            let r = Reply { seq: 9, outcome };
            assert_eq!(r.to_string().parse(), Ok(FromGuard::Reply(r.clone())));
        }
        for ev in [
            Event::Exit {
                pid: 12,
                how: "exit status 1".into(),
            },
            Event::Fenced {
                pid: 13,
                how: "lease expired 3ms ago".into(),
            },
        ] {
            assert_eq!(ev.to_string().parse(), Ok(FromGuard::Event(ev.clone())));
        }
        assert!("event note hello".parse::<FromGuard>().is_err());
        assert!("9 maybe".parse::<FromGuard>().is_err());
        assert!("9 err running soon".parse::<FromGuard>().is_err());
        assert!("9 err shrug".parse::<FromGuard>().is_err());
    }
}
