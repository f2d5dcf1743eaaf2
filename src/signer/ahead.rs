//! Sign-ahead: the leader's decision, before each signature, between
//! signing at once and committing first ([`decide`]), and how far each
//! signature reserves ([`reach`]).
//!
//! Every new (height, round, step) is covered by a Raft commit before it is
//! signed. The commit that covers the next one is made one step early: a
//! `SignAhead` entry records the HRS just signed and reserves the next few
//! for this signing process alone (its `holder` id, drawn at start). When
//! the next request comes, its HRS is already committed as this process's
//! to sign: it is signed at once, and its own `SignAhead` (its bytes, the
//! next reservation) is committed behind it. A request beyond the
//! reservation (a new round, the first after an election) commits first.
//!
//! Why this is as safe as committing every HRS on the request's path: the
//! reservation is committed before any HRS in it is signed, so every later
//! leader's log has it, and the replicated state lets nobody but the
//! holder sign in it ([`crate::ledger::SignerState::check_by`]). The holder
//! signs each reserved HRS once, with one set of bytes: its memory of what
//! it signed ([`Ahead`]) lives as long as the process, and a restarted
//! process draws a new id, so it never signs in a reservation of its past.
//! What it costs: when the holder dies, what it reserved and did not sign
//! (at most the rest of one round, or the next height's proposal and
//! prevote, and on a quick chain its precommit too: [`reach`]) is refused
//! to its successor.
//!
//! Owns: the decision as a pure function with a table test, the reach,
//! and the per-chain memory's shape. Must not: sign, commit or wait; the
//! [`super::Signer`] does, under the chain's lock.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Timing;
use crate::ledger::{SignVerdict, SignedAt, SignerState};
use crate::plant::{self, Plant};

use super::refusal::{Hrs, Refusal};
use super::sign::{STEP_PRECOMMIT, STEP_PREVOTE, STEP_PROPOSAL};

/// The gossip feature of a member that applies `SignAhead`: the leader
/// writes it only while every other voter said so, and the one-step
/// `Signed` of before otherwise (a keyraft from before sign-ahead stops
/// applying at the first `SignAhead`; a rolling upgrade must not stop the
/// signing).
pub const FEATURE: &str = "sign-ahead";

/// Signatures a signing process remembers per chain, to sign again for a
/// sentry that asks late (another host's, whose request waited behind the
/// leader's own sentry's next one).
pub const RECENT: usize = 16;

/// What a signing process signed lately for one chain, committed or not
/// (the last one last), and the commit of its last signature made ahead
/// while it is under way. Held under the chain's lock.
#[derive(Default)]
pub struct Ahead {
    pub recent: std::collections::VecDeque<SignedAt>,
    pub pending: Option<tokio::task::JoinHandle<()>>,
    /// The highest HRS this process proposed commit-first: until applied
    /// its outcome is unknown (the request may time out or be given up,
    /// and the entry still be committed, with bytes this process never
    /// signed), so nothing at or below it is signed from a reservation,
    /// only after a commit of its own.
    pub doubt: Option<Hrs>,
    /// The height and time of this process's last new precommit, and the
    /// time between its precommits of the last two heights in a row: the
    /// chain's pace, for [`reach`].
    pub precommitted: Option<(u64, Instant)>,
    pub pace: Option<Duration>,
    /// The (height, round) whose precommit this process's last precommit
    /// reserved (a quick chain's reach), if it did.
    pub round_reserved: Option<(u64, u32)>,
    /// The last step this process asked the voters to confirm, its digest
    /// and timestamp (`super::confirm`): they remember it, so a request
    /// given up after the ask is asked again with that timestamp.
    pub asked: Option<(Hrs, String, (i64, i32))>,
}

impl Ahead {
    /// Whether this process never signed, nor asked to sign, anything
    /// with this memory.
    pub fn signed_nothing(&self) -> bool {
        self.recent.is_empty()
            && self.pending.is_none()
            && self.doubt.is_none()
            && self.asked.is_none()
    }

    /// Notes a new precommit at `height`, signed `now`. The pace is known
    /// only from two heights in a row: after a gap (this process did not
    /// lead, or the chain skipped) it is forgotten.
    pub fn precommit_at(&mut self, height: u64, now: Instant) {
        self.pace = match self.precommitted {
            Some((h, at)) if h.checked_add(1) == Some(height) => {
                Some(now.saturating_duration_since(at))
            }
            _ => None,
        };
        self.precommitted = Some((height, now));
    }

    /// Whether the chain is quick: two of its heights pass before a
    /// successor could take over (`takeover`), so that a successor could
    /// never sign the next height's precommit in time for it to count.
    pub fn quick(&self, takeover: Duration) -> bool {
        self.pace.is_some_and(|p| p.saturating_mul(2) < takeover)
    }
}

impl Ahead {
    /// Notes how far this process's new signature at `hrs` reserves
    /// (`through`, the end of its `SignAhead`).
    pub fn reserves(&mut self, hrs: Hrs, through: Hrs) {
        if hrs.2 == STEP_PRECOMMIT {
            self.round_reserved = (through.0 > hrs.0 && through.2 == STEP_PRECOMMIT)
                .then_some((through.0, through.1));
        }
    }

    /// Whether nothing needs the entry of a new signature at `hrs` before
    /// the next height: a precommit's (it reserves that height), or one in
    /// a round whose precommit the last precommit already reserved. Such
    /// an entry may wait for the other sentries' requests (`super::behind`);
    /// a request that needs it after all cuts that short.
    pub fn needed_only_next_height(&self, hrs: Hrs) -> bool {
        hrs.2 == STEP_PRECOMMIT || self.round_reserved == Some((hrs.0, hrs.1))
    }
}

/// The least time from a leader's last heartbeat to its successor's first
/// signature: followers refuse votes for `election_max` after it, and the
/// successor waits `handover_delay` once elected.
pub fn takeover(t: &Timing) -> Duration {
    t.election_max + t.handover_delay
}

impl Ahead {
    /// Notes the step asked of the voters ([`Ahead::asked`]).
    pub fn asking(&mut self, hrs: Hrs, digest: &str, timestamp: (i64, i32)) {
        self.asked = Some((hrs, digest.to_string(), timestamp));
    }

    /// The timestamp asked for `hrs` with `digest`, if it was the last
    /// step asked.
    pub fn asked_at(&self, hrs: Hrs, digest: &str) -> Option<(i64, i32)> {
        self.asked
            .as_ref()
            .filter(|(h, d, _)| *h == hrs && d == digest)
            .map(|(_, _, t)| *t)
    }

    /// Remembers a signature this process made.
    pub fn signed(&mut self, s: SignedAt) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
    }
}

/// How the leader goes on with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Sign now with this timestamp: bytes this process signed at this
    /// HRS (its own memory).
    Repeat((i64, i32)),
    /// Sign with this timestamp once the other voters confirm it: bytes
    /// the applied watermark holds at this HRS. A process whose memory and
    /// log went back may hold there what it committed in its own diverged
    /// log (`super::confirm`).
    Committed((i64, i32)),
    /// Sign now: this process's own reservation covers the HRS. Its
    /// `SignAhead` is committed after.
    Reserved,
    /// Commit `SignAhead` first, then sign.
    Commit,
}

/// The last HRS a signature at `hrs` reserves: the rest of the round after
/// a proposal or a prevote; after a precommit, the next height's proposal
/// and prevote (its precommit only once one of those is signed), or on a
/// `quick` chain ([`Ahead::quick`]) its whole first round.
///
/// Why the precommit only on a quick chain: reserving it saves its commit
/// from waiting behind the prevote's (a node asks for both within a
/// millisecond when it sees the other votes at once), but a leader that
/// dies after a precommit leaves the next height's first round reserved
/// to no one. On a slow chain its successor would be up in time to sign
/// that precommit, so it stays free; on a quick one the height is over
/// before a successor is, after a failure (a switchover, or a leader
/// change while the chain halts, does lose it: docs/signer.md).
pub fn reach(hrs: Hrs, quick: bool) -> Hrs {
    let (h, r, step) = hrs;
    match step {
        STEP_PROPOSAL | STEP_PREVOTE => (h, r, STEP_PRECOMMIT),
        STEP_PRECOMMIT if quick => (h.saturating_add(1), 0, STEP_PRECOMMIT),
        STEP_PRECOMMIT => (h.saturating_add(1), 0, STEP_PREVOTE),
        _ => hrs,
    }
}

/// The leader's decision for `hrs` with `digest`, from what this process
/// signed lately and doubts (`mine`) and the watermark it applied, as signing process
/// `holder`. Never a new HRS without a commit that covers it: two leaders
/// of a moment would sign it twice. `asked` is the request's own timestamp
/// (only a planted bug uses it).
pub fn decide(
    mine: &Ahead,
    applied: Option<&SignerState>,
    chain_id: &str,
    hrs: Hrs,
    digest: &str,
    holder: u64,
    asked: (i64, i32),
) -> Result<Path, Refusal> {
    // What this process signed, even if not committed yet: the same bytes
    // again (the same signature), never others, and nothing new below it.
    let doubt = mine.doubt;
    let last = mine.recent.back().map(|m| m.hrs());
    if let Some(m) = mine.recent.iter().rev().find(|m| m.hrs() == hrs) {
        return if m.digest == digest {
            Ok(Path::Repeat(m.timestamp))
        } else {
            Err(Refusal::Equivocation { asked: hrs })
        };
    }
    if last.is_some_and(|last| hrs < last) {
        return Err(Refusal::Regression { asked: hrs });
    }
    let Some(w) = applied else {
        return Err(Refusal::NoWatermark);
    };
    let repeat = w.signed().is_some_and(|s| s.hrs() == hrs);
    match w.check_by(chain_id, hrs, digest, Some(holder)) {
        SignVerdict::Sign { timestamp } if repeat => Ok(Path::Committed(timestamp)),
        SignVerdict::Sign { .. }
            if w.reserved_for(hrs, holder) && doubt.is_none_or(|d| hrs > d) =>
        {
            Ok(Path::Reserved)
        }
        SignVerdict::Sign { .. } if plant::on(Plant::SignBeforeCommit) => Ok(Path::Repeat(asked)),
        SignVerdict::Sign { .. } => Ok(Path::Commit),
        v => Err(Refusal::from_verdict(&v, hrs, chain_id)
            .unwrap_or_else(|| Refusal::NotCommitted("no verdict".into()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u64, r: u32, step: u8, digest: &str, ts: i64) -> SignedAt {
        SignedAt {
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (ts, 0),
        }
    }

    fn eq(h: u64, r: u32, step: u8) -> Refusal {
        Refusal::Equivocation {
            asked: (h, r, step),
        }
    }

    fn reg(h: u64, r: u32, step: u8) -> Refusal {
        Refusal::Regression {
            asked: (h, r, step),
        }
    }

    fn memory(recent: Vec<SignedAt>, doubt: Option<Hrs>) -> Ahead {
        Ahead {
            recent: recent.into(),
            doubt,
            ..Ahead::default()
        }
    }

    fn committed(h: u64, r: u32, step: u8) -> SignerState {
        SignerState {
            chain_id: "c".into(),
            height: h,
            round: r,
            step,
            digest: Some("d".into()),
            timestamp: (7, 0),
            signatures: 1,
            ..Default::default()
        }
    }

    fn reserved(through: Hrs, holder: u64, last: SignedAt) -> SignerState {
        SignerState {
            chain_id: "c".into(),
            height: through.0,
            round: through.1,
            step: through.2,
            digest: None,
            signatures: 1,
            holder: Some(holder),
            last: Some(last),
            ..Default::default()
        }
    }

    #[test]
    fn a_signature_reserves_the_rest_of_its_round_or_the_next_heights_prevote() {
        for quick in [false, true] {
            assert_eq!(reach((5, 0, STEP_PROPOSAL), quick), (5, 0, STEP_PRECOMMIT));
            assert_eq!(reach((5, 2, STEP_PREVOTE), quick), (5, 2, STEP_PRECOMMIT));
        }
        assert_eq!(reach((5, 2, STEP_PRECOMMIT), false), (6, 0, STEP_PREVOTE));
        assert_eq!(reach((5, 2, STEP_PRECOMMIT), true), (6, 0, STEP_PRECOMMIT));
    }

    #[test]
    fn only_an_entry_no_step_of_this_height_needs_may_wait() {
        // (precommit signed before, as (hrs, through); the new signature)
        // -> needed only at the next height?
        type Row = (Option<(Hrs, Hrs)>, Hrs, bool);
        let table: [Row; 7] = [
            // A precommit's entry: the next height's.
            (None, (5, 0, STEP_PRECOMMIT), true),
            // Nothing reserved this round's precommit: a proposal's or a
            // prevote's entry is what reserves it.
            (None, (6, 0, STEP_PREVOTE), false),
            (
                Some(((5, 0, 3), (6, 0, STEP_PREVOTE))),
                (6, 0, STEP_PREVOTE),
                false,
            ),
            (
                Some(((5, 0, 3), (6, 0, STEP_PREVOTE))),
                (6, 0, STEP_PROPOSAL),
                false,
            ),
            // A quick chain's precommit reserved it.
            (
                Some(((5, 0, 3), (6, 0, STEP_PRECOMMIT))),
                (6, 0, STEP_PREVOTE),
                true,
            ),
            (
                Some(((5, 0, 3), (6, 0, STEP_PRECOMMIT))),
                (6, 0, STEP_PROPOSAL),
                true,
            ),
            // ... only that height's first round.
            (
                Some(((5, 0, 3), (6, 0, STEP_PRECOMMIT))),
                (6, 1, STEP_PREVOTE),
                false,
            ),
        ];
        for (before, hrs, want) in table {
            let mut a = Ahead::default();
            if let Some((at, through)) = before {
                a.reserves(at, through);
            }
            assert_eq!(a.needed_only_next_height(hrs), want, "{before:?} {hrs:?}");
        }
        // A precommit that reserves only the next prevote (a slow chain,
        // or no reservation at all) leaves the next round unreserved.
        let mut a = Ahead::default();
        a.reserves((5, 0, 3), (6, 0, STEP_PRECOMMIT));
        a.reserves((6, 0, 3), (6, 0, 3));
        assert!(!a.needed_only_next_height((7, 0, STEP_PREVOTE)));
    }

    #[test]
    fn a_chain_is_quick_when_two_heights_pass_before_a_takeover() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let takeover = ms(600);
        // (precommits as (height, ms after t0)) -> quick?
        let table: [(&[(u64, u64)], bool); 9] = [
            (&[], false),
            (&[(5, 0)], false),
            (&[(5, 0), (6, 200)], true),
            (&[(5, 0), (6, 300)], false),
            // Heights not in a row tell nothing: the pace is unknown, and
            // one known before (a reign ago) is forgotten.
            (&[(5, 0), (7, 100)], false),
            (&[(5, 0), (6, 100), (9, 150)], false),
            (&[(5, 0), (6, 100), (9, 150), (10, 250)], true),
            // A process frozen between two precommits: slow, not quick.
            (&[(5, 0), (6, 10_000)], false),
            // The last pair decides: slowed down.
            (&[(5, 0), (6, 100), (7, 1_100)], false),
        ];
        for (precommits, want) in table {
            let mut a = Ahead::default();
            for (h, at) in precommits {
                a.precommit_at(*h, t0 + ms(*at));
            }
            assert_eq!(a.quick(takeover), want, "{precommits:?}");
        }
    }

    #[test]
    fn only_the_holders_reservation_or_a_repeat_signs_before_a_commit() {
        let asked = (9, 0);
        let me = 1;
        let plain = committed(10, 0, 2);
        let mine = reserved((11, 0, 2), me, at(10, 0, 3, "d", 8));
        let theirs = reserved((11, 0, 2), 2, at(10, 0, 3, "d", 8));
        let gapped = |holder| SignerState {
            reserved_from: Some((11, 0, 0)),
            ..reserved((11, 0, 2), holder, at(10, 0, 3, "d", 8))
        };
        let (gapped_mine, gapped_theirs) = (gapped(me), gapped(2));
        use Path::*;
        // (what this process signed, applied, hrs, digest) -> decision
        type Row<'a> = (
            Vec<SignedAt>,
            Option<&'a SignerState>,
            Hrs,
            &'a str,
            Result<Path, Refusal>,
        );
        let table: Vec<Row> = vec![
            // A repeat of committed bytes: signed again, with their
            // timestamp, once confirmed.
            (vec![], Some(&plain), (10, 0, 2), "d", Ok(Committed((7, 0)))),
            (vec![], Some(&plain), (10, 0, 2), "x", Err(eq(10, 0, 2))),
            (vec![], Some(&plain), (9, 0, 3), "d", Err(reg(9, 0, 3))),
            // Above a plain watermark: commit first.
            (vec![], Some(&plain), (10, 0, 3), "d", Ok(Commit)),
            // In this process's reservation: sign now.
            (vec![], Some(&mine), (11, 0, 1), "p", Ok(Reserved)),
            (vec![], Some(&mine), (11, 0, 2), "v", Ok(Reserved)),
            (vec![], Some(&mine), (11, 0, 3), "v", Ok(Commit)),
            (vec![], Some(&mine), (10, 0, 3), "d", Ok(Committed((8, 0)))),
            (vec![], Some(&mine), (10, 0, 3), "x", Err(eq(10, 0, 3))),
            // In another process's: refused, whatever the bytes.
            (vec![], Some(&theirs), (11, 0, 1), "p", Err(reg(11, 0, 1))),
            (vec![], Some(&theirs), (11, 0, 2), "v", Err(reg(11, 0, 2))),
            (vec![], Some(&theirs), (11, 0, 3), "v", Ok(Commit)),
            // What this process signed and has not seen committed yet wins.
            (
                vec![at(11, 0, 1, "p", 9)],
                Some(&mine),
                (11, 0, 1),
                "p",
                Ok(Repeat((9, 0))),
            ),
            (
                vec![at(11, 0, 1, "p", 9)],
                Some(&mine),
                (11, 0, 1),
                "q",
                Err(eq(11, 0, 1)),
            ),
            (
                vec![at(11, 0, 2, "v", 9)],
                Some(&mine),
                (11, 0, 1),
                "p",
                Err(reg(11, 0, 1)),
            ),
            (
                vec![at(11, 0, 1, "p", 9)],
                Some(&mine),
                (11, 0, 2),
                "v",
                Ok(Reserved),
            ),
            (vec![], None, (11, 0, 1), "p", Err(Refusal::NoWatermark)),
            // Between the last signature and a reservation that starts at
            // the next height (a later round): committed first, by anyone.
            (vec![], Some(&gapped_mine), (10, 1, 1), "r", Ok(Commit)),
            (vec![], Some(&gapped_theirs), (10, 1, 1), "r", Ok(Commit)),
            (vec![], Some(&gapped_mine), (11, 0, 1), "p", Ok(Reserved)),
            (
                vec![],
                Some(&gapped_theirs),
                (11, 0, 1),
                "p",
                Err(reg(11, 0, 1)),
            ),
            // A late sentry gets the same bytes signed again, never others.
            (
                vec![at(11, 0, 1, "p", 9), at(11, 0, 2, "v", 9)],
                Some(&mine),
                (11, 0, 1),
                "p",
                Ok(Repeat((9, 0))),
            ),
            (
                vec![at(11, 0, 1, "p", 9), at(11, 0, 2, "v", 9)],
                Some(&mine),
                (11, 0, 1),
                "q",
                Err(eq(11, 0, 1)),
            ),
        ];
        for (mine_last, applied, hrs, digest, want) in table {
            assert_eq!(
                decide(
                    &memory(mine_last.clone(), None),
                    applied,
                    "c",
                    hrs,
                    digest,
                    me,
                    asked
                ),
                want,
                "{mine_last:?} {hrs:?} {digest}"
            );
        }
    }

    #[test]
    fn a_commit_of_unknown_outcome_is_never_signed_from_the_reservation_nor_another_chain() {
        let asked = (9, 0);
        let me = 1;
        let plain = committed(10, 0, 2);
        let mine = reserved((11, 0, 2), me, at(10, 0, 3, "d", 8));
        use Path::*;
        // A commit of this HRS (or one above) whose outcome is unknown:
        // committed first, never from the reservation.
        let doubt = decide(
            &memory(vec![], Some((11, 0, 1))),
            Some(&mine),
            "c",
            (11, 0, 1),
            "p",
            me,
            asked,
        );
        assert_eq!(doubt, Ok(Commit));
        let above = decide(
            &memory(vec![], Some((11, 0, 1))),
            Some(&mine),
            "c",
            (11, 0, 2),
            "v",
            me,
            asked,
        );
        assert_eq!(above, Ok(Reserved));
        let other_chain = decide(
            &Ahead::default(),
            Some(&plain),
            "other",
            (11, 0, 1),
            "d",
            me,
            asked,
        );
        assert!(matches!(other_chain, Err(Refusal::WrongChain { .. })));
    }
}
