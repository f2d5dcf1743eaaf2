//! The confirmation before a signature inside a reservation: the leader
//! asks the other voters whether anything else was signed at that HRS, and
//! signs only once a quorum said no.
//!
//! Why: inside its reservation the holder signs without a commit
//! ([`super::ahead`]), trusting its own memory of what it signed there. A
//! process resumed from an earlier memory image (a VM snapshot taken with
//! its memory and reverted, a CRIU restore) holds the same reservation and
//! holder id without that memory: its sentry, resumed with it, asks again
//! with other bytes (a later timestamp, another block). Its clocks may come
//! back with the image, so nothing local can tell; the other voters can.
//! Each remembers, in memory, every HRS it confirmed and its bytes, and
//! refuses other bytes at it or anything below the holder's last; the
//! committed watermark refuses what was committed. A confirmation writes
//! nothing to disk: it costs one round trip, and once a quorum confirmed,
//! the leader waits a little longer ([`grace`]) for the others, so that a
//! resumed image meets every voter that is up and remembers. A voter that
//! restarted lost what it remembered: for a takeover after its start it
//! confirms nothing (it still remembers what it is asked).
//!
//! Owns: the voter's answer ([`answer`]), what it remembers ([`Memory`])
//! and the leader's count of the answers ([`Tally`]), as pure functions
//! with table tests. Must not: send, sign or commit; [`super::here`] asks
//! through [`super::Forward`], [`super::forward`] serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::config::NodeId;
use crate::ledger::SignerState;
use crate::pb;

use super::refusal::Hrs;

/// The gossip feature of a member that answers confirmation asks: the
/// leader reserves only while every other voter said so (an older member
/// would answer none, and nothing reserved could be signed).
pub const FEATURE: &str = "confirm";

/// HRS a voter remembers per chain: far more than one reservation holds
/// (the rest of one round, or a height's first round).
pub const REMEMBERED: usize = 256;

/// What the leader asks: may `holder`, the signing process of the leader
/// in `term`, sign `hrs` of `chain_id` with these bytes (`digest`, which
/// leaves the timestamp out) and this `timestamp`?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub chain_id: String,
    pub hrs: Hrs,
    pub digest: String,
    pub timestamp: (i64, i32),
    pub holder: u64,
    pub term: u64,
}

/// What the asked voter knows: the leader and term it follows, the
/// chain's watermark it applied, and whether it started too lately to
/// have heard every ask of this term (`fresh`: less than a takeover ago).
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub leader: Option<NodeId>,
    pub term: u64,
    pub watermark: Option<&'a SignerState>,
    pub fresh: bool,
}

/// A voter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing else known signed at or above it: sign.
    Confirmed,
    /// The asker is not the leader this voter follows in this term: no
    /// evidence either way.
    NotLeader,
    /// This voter started less than a takeover ago: what was confirmed
    /// before, while it was down, it does not know (no evidence either
    /// way).
    Fresh,
    /// Something else was signed there: never sign.
    Conflict(Conflict),
}

/// What a voter knows that the asker does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// A signature at `at`, at or above the HRS asked and with other
    /// bytes or another timestamp, is committed.
    #[error("a signature at {at:?} is committed")]
    Committed { at: Hrs },
    /// This voter confirmed `at` (the HRS asked, with other bytes or
    /// another timestamp, or a later one of the same signing process).
    #[error("{at:?} was confirmed before")]
    Confirmed { at: Hrs },
}

impl Conflict {
    pub fn at(&self) -> Hrs {
        match self {
            Conflict::Committed { at } | Conflict::Confirmed { at } => *at,
        }
    }
}

/// What one voter confirmed, per chain: HRS -> who and what, the last
/// [`REMEMBERED`].
#[derive(Debug, Default)]
pub struct Memory {
    chains: HashMap<String, BTreeMap<Hrs, Confirmed>>,
}

/// One HRS a voter confirmed: for which signing process, with which bytes
/// and timestamp. A vote's digest leaves its timestamp out (a repeat of
/// the same vote is signed with the first timestamp), so a process that
/// forgot the first would sign the same vote again with another: for the
/// chain's judges a second signature at one HRS all the same.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Confirmed {
    holder: u64,
    digest: String,
    timestamp: (i64, i32),
}

/// A voter's answer to `ask` from `from`, given what it `seen` and
/// confirmed before (`memory`, which a confirmation updates).
pub fn answer(ask: &Ask, from: NodeId, seen: Seen<'_>, memory: &mut Memory) -> Answer {
    if seen.leader != Some(from) || seen.term != ask.term {
        return Answer::NotLeader;
    }
    if let Some(signed) = seen.watermark.and_then(SignerState::signed) {
        let at = signed.hrs();
        let other = signed.digest != ask.digest || signed.timestamp != ask.timestamp;
        if at > ask.hrs || (at == ask.hrs && other) {
            return Answer::Conflict(Conflict::Committed { at });
        }
    }
    let this = Confirmed {
        holder: ask.holder,
        digest: ask.digest.clone(),
        timestamp: ask.timestamp,
    };
    let confirmed = memory.chains.entry(ask.chain_id.clone()).or_default();
    // The same bytes and timestamp are the same signature, whichever
    // signing process asks (a new leader signing again what its
    // predecessor signed).
    let other_bytes = confirmed
        .get(&ask.hrs)
        .is_some_and(|c| c.digest != this.digest || c.timestamp != this.timestamp);
    let later = confirmed
        .range((
            std::ops::Bound::Excluded(ask.hrs),
            std::ops::Bound::Unbounded,
        ))
        .rev()
        .find(|(_, c)| c.holder == ask.holder)
        .map(|(at, _)| *at);
    if other_bytes {
        return Answer::Conflict(Conflict::Confirmed { at: ask.hrs });
    }
    if let Some(at) = later {
        return Answer::Conflict(Conflict::Confirmed { at });
    }
    // Remembered even when fresh: what it hears now it will know later.
    confirmed.insert(ask.hrs, this);
    while confirmed.len() > REMEMBERED {
        confirmed.pop_first();
    }
    if seen.fresh {
        return Answer::Fresh;
    }
    Answer::Confirmed
}

impl Ask {
    pub fn to_proto(&self) -> pb::ConfirmRequest {
        pb::ConfirmRequest {
            chain_id: self.chain_id.clone(),
            height: self.hrs.0,
            round: self.hrs.1,
            step: u32::from(self.hrs.2),
            digest: self.digest.clone(),
            timestamp_seconds: self.timestamp.0,
            timestamp_nanos: self.timestamp.1,
            holder: self.holder,
            term: self.term,
        }
    }

    /// `None` for a step that is no step.
    pub fn from_proto(r: &pb::ConfirmRequest) -> Option<Ask> {
        Some(Ask {
            chain_id: r.chain_id.clone(),
            hrs: (r.height, r.round, u8::try_from(r.step).ok()?),
            digest: r.digest.clone(),
            timestamp: (r.timestamp_seconds, r.timestamp_nanos),
            holder: r.holder,
            term: r.term,
        })
    }
}

impl Answer {
    pub fn to_proto(&self) -> pb::ConfirmReply {
        let (answer, at) = match self {
            Answer::Confirmed => (pb::ConfirmAnswer::Confirmed, (0, 0, 0)),
            Answer::NotLeader => (pb::ConfirmAnswer::NotLeader, (0, 0, 0)),
            Answer::Fresh => (pb::ConfirmAnswer::Fresh, (0, 0, 0)),
            Answer::Conflict(Conflict::Committed { at }) => (pb::ConfirmAnswer::Committed, *at),
            Answer::Conflict(Conflict::Confirmed { at }) => {
                (pb::ConfirmAnswer::ConfirmedBefore, *at)
            }
        };
        pb::ConfirmReply {
            answer: answer as i32,
            height: at.0,
            round: at.1,
            step: u32::from(at.2),
        }
    }

    /// `None` for an answer this keyraft does not know (counted as no
    /// answer: never a confirmation).
    pub fn from_proto(r: &pb::ConfirmReply) -> Option<Answer> {
        let at = (r.height, r.round, u8::try_from(r.step).ok()?);
        Some(match pb::ConfirmAnswer::try_from(r.answer).ok()? {
            pb::ConfirmAnswer::Confirmed => Answer::Confirmed,
            pb::ConfirmAnswer::NotLeader => Answer::NotLeader,
            pb::ConfirmAnswer::Fresh => Answer::Fresh,
            pb::ConfirmAnswer::Committed => Answer::Conflict(Conflict::Committed { at }),
            pb::ConfirmAnswer::ConfirmedBefore => Answer::Conflict(Conflict::Confirmed { at }),
            pb::ConfirmAnswer::Unknown => return None,
        })
    }
}

/// The leader's count of the answers to one ask.
#[derive(Debug)]
pub struct Tally {
    /// Confirmations needed: with the leader's own, a majority of voters.
    need: usize,
    /// Whether a voter that just started counts as a confirmation: for a
    /// step already committed, which without it was signed on the commit
    /// alone.
    fresh_counts: bool,
    /// Voters asked.
    asked: usize,
    yes: BTreeSet<NodeId>,
    answered: BTreeSet<NodeId>,
}

/// Where a tally stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// Every voter answered, a quorum confirmed: sign.
    Sign,
    /// A quorum confirmed and some voters have not answered yet: sign
    /// once they have, or a grace has passed ([`grace`]).
    Quorum,
    /// Too few answers yet.
    Wait,
    /// Every voter answered, or the wait is over, and too few confirmed
    /// (`yes` of `need`).
    TooFew { yes: usize, need: usize },
    /// A voter knows something else was signed.
    Refuse { voter: NodeId, conflict: Conflict },
}

/// How long the leader waits for the voters that have not answered once a
/// quorum has, `quorum_after` its asks: as long again, and at least
/// [`GRACE_MIN`]. A voter that is up answers within about the same
/// round trip as the others (a resumed image cannot know which ones are
/// down: what it knew of that came back with it); one that is down costs
/// this much per signature.
pub fn grace(quorum_after: Duration) -> Duration {
    quorum_after.max(GRACE_MIN)
}

/// The least grace ([`grace`]): a loopback or LAN round trip is a tenth
/// of it.
pub const GRACE_MIN: Duration = Duration::from_millis(2);

impl Tally {
    /// A tally among `voters` voters, the leader included, of which
    /// `asked` are asked; a just-started voter's answer counts as a
    /// confirmation where `fresh_counts`.
    pub fn new(voters: usize, asked: usize, fresh_counts: bool) -> Self {
        Tally {
            need: (voters / 2 + 1).saturating_sub(1),
            fresh_counts,
            asked,
            yes: BTreeSet::new(),
            answered: BTreeSet::new(),
        }
    }

    /// Counts `voter`'s answer (`None`: it could not be asked, or did not
    /// answer in time).
    pub fn add(&mut self, voter: NodeId, answer: Option<Answer>) -> Count {
        match answer {
            Some(Answer::Conflict(conflict)) => return Count::Refuse { voter, conflict },
            Some(Answer::Confirmed) => {
                self.yes.insert(voter);
            }
            Some(Answer::Fresh) if self.fresh_counts => {
                self.yes.insert(voter);
            }
            Some(Answer::NotLeader | Answer::Fresh) | None => {}
        }
        self.answered.insert(voter);
        self.count()
    }

    /// Where it stands with the answers so far.
    pub fn count(&self) -> Count {
        let all = self.answered.len() >= self.asked;
        match (self.yes.len() >= self.need, all) {
            (true, true) => Count::Sign,
            (true, false) => Count::Quorum,
            (false, true) => self.last(),
            (false, false) => Count::Wait,
        }
    }

    /// Where it stands once nothing more will come (every voter answered,
    /// or the wait is over): a quorum is enough then.
    pub fn last(&self) -> Count {
        if self.yes.len() >= self.need {
            Count::Sign
        } else {
            Count::TooFew {
                yes: self.yes.len(),
                need: self.need,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = "c";
    const HOLDER: u64 = 7;

    fn ask(hrs: Hrs, digest: &str, holder: u64) -> Ask {
        Ask {
            chain_id: CHAIN.into(),
            hrs,
            digest: digest.into(),
            timestamp: (100, 1),
            holder,
            term: 3,
        }
    }

    fn signed_at(hrs: Hrs, digest: &str) -> SignerState {
        SignerState {
            chain_id: CHAIN.into(),
            height: hrs.0,
            round: hrs.1,
            step: hrs.2,
            digest: Some(digest.into()),
            timestamp: (100, 1),
            ..Default::default()
        }
    }

    /// The voter follows leader 1 in term 3.
    fn seen(w: Option<&SignerState>) -> Seen<'_> {
        Seen {
            leader: Some(1),
            term: 3,
            watermark: w,
            fresh: false,
        }
    }

    #[test]
    fn a_voter_answers_only_its_leader_and_confirms_each_hrs_once() {
        let w = signed_at((10, 0, 1), "a");
        let fresh = Seen {
            fresh: true,
            ..seen(Some(&w))
        };
        let later = Ask {
            term: 2,
            ..ask((10, 0, 2), "a", HOLDER)
        };
        let mut m = Memory::default();
        // (what is asked, of whom, what it answers), in order, on one memory.
        let table: &[(Ask, NodeId, Seen<'_>, Answer)] = &[
            // Another leader, or another term: no evidence either way.
            (
                ask((10, 0, 2), "b", HOLDER),
                2,
                seen(Some(&w)),
                Answer::NotLeader,
            ),
            (later, 1, seen(Some(&w)), Answer::NotLeader),
            // Just started: it may have missed what was confirmed; it
            // remembers what it hears all the same.
            (ask((10, 0, 2), "b", HOLDER), 1, fresh, Answer::Fresh),
            (
                ask((10, 0, 2), "b", HOLDER),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
            (ask((10, 0, 2), "x", HOLDER), 1, fresh, conflict((10, 0, 2))),
            // The same again, or the same bytes and timestamp asked by
            // another process (a new leader signing again what was
            // signed): the same signature.
            (
                ask((10, 0, 2), "b", HOLDER),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
            (
                ask((10, 0, 2), "b", 8),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
        ];
        answers(table, &mut m);
    }

    #[test]
    fn a_voter_refuses_other_bytes_a_lower_step_and_what_is_committed() {
        let w = signed_at((10, 0, 1), "a");
        let mut m = Memory::default();
        let other_time = |a: Ask| Ask {
            timestamp: (100, 2),
            ..a
        };
        let table: &[(Ask, NodeId, Seen<'_>, Answer)] = &[
            (
                ask((10, 0, 2), "b", HOLDER),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
            // A resumed image of the holder: other bytes, another
            // timestamp (another sentry's request, which the holder would
            // have signed as a repeat), or another process's other bytes.
            (
                ask((10, 0, 2), "x", HOLDER),
                1,
                seen(Some(&w)),
                conflict((10, 0, 2)),
            ),
            (
                other_time(ask((10, 0, 2), "b", HOLDER)),
                1,
                seen(Some(&w)),
                conflict((10, 0, 2)),
            ),
            (
                ask((10, 0, 2), "x", 9),
                1,
                seen(Some(&w)),
                conflict((10, 0, 2)),
            ),
            // The holder went on; its image asks below where it went.
            (
                ask((10, 0, 3), "c", HOLDER),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
            (
                ask((10, 0, 1), "z", HOLDER),
                1,
                seen(None),
                conflict((10, 0, 3)),
            ),
            // What is committed: other bytes or another timestamp at it,
            // or anything below it.
            (
                ask((10, 0, 1), "z", 9),
                1,
                seen(Some(&w)),
                committed((10, 0, 1)),
            ),
            (
                other_time(ask((10, 0, 1), "a", 9)),
                1,
                seen(Some(&w)),
                committed((10, 0, 1)),
            ),
            (
                ask((9, 0, 3), "z", 9),
                1,
                seen(Some(&w)),
                committed((10, 0, 1)),
            ),
            // Another process's lower HRS is not this holder's going back.
            (
                ask((10, 0, 1), "a", 9),
                1,
                seen(Some(&w)),
                Answer::Confirmed,
            ),
        ];
        answers(table, &mut m);
    }

    fn conflict(at: Hrs) -> Answer {
        Answer::Conflict(Conflict::Confirmed { at })
    }

    fn committed(at: Hrs) -> Answer {
        Answer::Conflict(Conflict::Committed { at })
    }

    /// Asks each row's question in order of one memory, and checks the
    /// answer.
    fn answers(table: &[(Ask, NodeId, Seen<'_>, Answer)], m: &mut Memory) {
        for (i, (a, from, s, want)) in table.iter().enumerate() {
            assert_eq!(&answer(a, *from, *s, m), want, "row {i}: {a:?}");
        }
    }

    #[test]
    fn asks_and_answers_cross_the_wire_unchanged() {
        let a = ask((5, 2, 3), "d", HOLDER);
        assert_eq!(Ask::from_proto(&a.to_proto()), Some(a));
        for an in [
            Answer::Confirmed,
            Answer::NotLeader,
            Answer::Fresh,
            Answer::Conflict(Conflict::Committed { at: (4, 1, 2) }),
            Answer::Conflict(Conflict::Confirmed { at: (4, 1, 3) }),
        ] {
            assert_eq!(Answer::from_proto(&an.to_proto()), Some(an));
        }
        let unknown = pb::ConfirmReply {
            answer: 99,
            ..Default::default()
        };
        assert_eq!(Answer::from_proto(&unknown), None);
    }

    #[test]
    fn a_voter_remembers_a_bounded_number_of_hrs() {
        let mut m = Memory::default();
        for h in 0..(REMEMBERED as u64 + 10) {
            let a = ask((h, 0, 1), "d", HOLDER);
            assert_eq!(answer(&a, 1, seen(None), &mut m), Answer::Confirmed);
        }
        assert_eq!(m.chains[CHAIN].len(), REMEMBERED);
    }

    #[test]
    fn the_leader_signs_once_a_quorum_confirmed_and_every_voter_answered() {
        let c = Conflict::Confirmed { at: (1, 0, 1) };
        let yes = || Some(Answer::Confirmed);
        // (voters, answers in order) -> where the tally stands after them
        type Row = (usize, Vec<(NodeId, Option<Answer>)>, Count);
        let table: Vec<Row> = vec![
            // Three voters: one other's yes is a quorum; the other is
            // waited for (a grace) before signing.
            (3, vec![(2, yes())], Count::Quorum),
            (3, vec![(2, yes()), (3, None)], Count::Sign),
            (3, vec![(2, None), (3, yes())], Count::Sign),
            (3, vec![(2, Some(Answer::Fresh)), (3, yes())], Count::Sign),
            // A conflict refuses, whatever else said yes.
            (
                3,
                vec![(2, yes()), (3, Some(Answer::Conflict(c.clone())))],
                Count::Refuse {
                    voter: 3,
                    conflict: c.clone(),
                },
            ),
            // Nobody confirmed.
            (
                3,
                vec![(2, Some(Answer::NotLeader)), (3, None)],
                Count::TooFew { yes: 0, need: 1 },
            ),
            // Five voters: two yes needed.
            (5, vec![(2, yes())], Count::Wait),
            (5, vec![(2, yes()), (3, yes())], Count::Quorum),
            (
                5,
                vec![(2, yes()), (3, None), (4, None), (5, None)],
                Count::TooFew { yes: 1, need: 2 },
            ),
            // One voter: nothing to ask.
            (1, vec![], Count::Sign),
        ];
        for (i, (voters, answers, want)) in table.into_iter().enumerate() {
            let mut t = Tally::new(voters, voters - 1, false);
            let mut got = t.count();
            for (v, a) in answers {
                got = t.add(v, a);
            }
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn for_a_committed_step_a_just_started_voter_counts() {
        let mut t = Tally::new(3, 2, true);
        t.add(2, Some(Answer::Fresh));
        assert_eq!(t.add(3, None), Count::Sign);
        let mut t = Tally::new(3, 2, false);
        t.add(2, Some(Answer::Fresh));
        assert_eq!(t.add(3, None), Count::TooFew { yes: 0, need: 1 });
    }

    #[test]
    fn the_grace_is_the_quorums_wait_and_never_under_two_milliseconds() {
        assert_eq!(grace(Duration::from_micros(300)), GRACE_MIN);
        assert_eq!(grace(Duration::from_millis(5)), Duration::from_millis(5));
    }
}
