//! The fake chain's books in CometBFT mode: which (height, round) is open,
//! which block the network proposes there, and what the validator's key
//! signed.
//!
//! At an upgrade in the schedule (height H), every node of the chain halts
//! once H is committed: no round opens past (H + 1, 0) until the network
//! has upgraded (`network_upgrade` later); nodes of the new version may
//! vote in that round meanwhile.
//!
//! Owns: the round schedule, signature checks of votes and proposals over
//! CometBFT's canonical sign bytes, the signed / missed / refused totals and
//! the equivocation record. Must not: trust the submitter (every signature is
//! verified against the validator key), count identical votes from two
//! sentries as an equivocation, or miss a conflicting signature because it
//! arrived late (stale votes are refused but still judged).

use std::collections::{BTreeMap, VecDeque};

use cometbft_proto::v0_38::types::{BlockId, Proposal as RawProposal, Vote as RawVote};
use serde::{Deserialize, Serialize};

use super::consensus::{self, Step};
use super::key::PublicValidatorKey;
use crate::upgrade::{Passed, Upgrade};

/// Heights whose signatures are remembered for equivocation checks.
pub const WINDOW_HEIGHTS: u64 = 2_000;
/// Equivocations listed in `/stats` (all are counted).
const MAX_LISTED: usize = 1_000;
/// Distinct block ids remembered per (height, round, step).
const MAX_BLOCKS_PER_STEP: usize = 8;
/// Distinct sentries recorded per signed height.
const MAX_NODES_PER_HEIGHT: usize = 8;

/// Two valid signatures by the key for the same height, round and step over
/// different block ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Equivocation {
    pub height: u64,
    pub round: u32,
    #[serde(rename = "type")]
    pub step: Step,
}

/// How a chain in CometBFT mode runs.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub chain_id: String,
    /// Every this many heights, round 0 fails (the network precommits nil)
    /// and the height commits in round 1. 0: never.
    pub round_every: u64,
    /// Size of the imagined validator set; our key proposes when
    /// `(height + round) % validators == 0`.
    pub validators: u64,
    /// Non-nil precommits must carry a valid vote extension signature.
    pub extensions: bool,
    /// How long each round stays open.
    pub slot_ms: u64,
    /// Upgrades the chain halts for, after their height is committed.
    pub upgrades: crate::upgrade::Plan,
    /// How long the network takes to upgrade at such a halt.
    pub network_upgrade: std::time::Duration,
}

/// What the chain announces for the open round (`GET /status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    pub chain_id: String,
    pub height: u64,
    pub round: u32,
    pub block_hash: String,
    pub parts_total: u32,
    pub parts_hash: String,
    /// Our validator proposes in this round.
    pub proposer: bool,
    /// The network commits in this round; otherwise it precommits nil.
    pub commit: bool,
    pub extensions: bool,
    pub slot_ms: u64,
}

impl Announce {
    pub fn block_id(&self) -> Option<BlockId> {
        Some(BlockId {
            hash: hex::decode(&self.block_hash).ok()?,
            part_set_header: Some(cometbft_proto::v0_38::types::PartSetHeader {
                total: self.parts_total,
                hash: hex::decode(&self.parts_hash).ok()?,
            }),
        })
    }
}

/// Why a signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Malformed(#[from] consensus::Malformed),
    #[error("not signed by the validator key")]
    NotValidator,
    #[error("bad signature")]
    BadSignature,
    #[error("precommit without a valid vote extension signature")]
    BadExtension,
    #[error("height {height} round {round} is not open (open: {open_height}/{open_round})")]
    NotOpen {
        height: u64,
        round: u32,
        open_height: u64,
        open_round: u32,
    },
    #[error("height {0} is too old to judge")]
    TooOld(u64),
}

/// What the chain made of an accepted or judged signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// It conflicts with an earlier signature of the same height, round, step.
    pub equivocation: bool,
    /// It is the key's precommit for the block committed at the open height.
    pub counted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub height: u64,
    pub round: u32,
    pub signed: u64,
    pub missed: u64,
    pub equivocations: u64,
    pub refused: u64,
}

pub struct Book {
    schedule: Schedule,
    key: PublicValidatorKey,
    height: u64,
    round: u32,
    /// Sentries whose precommit for the committed block of the open height
    /// was accepted.
    current: Vec<u64>,
    signed: u64,
    missed: u64,
    refused: u64,
    equivocations: u64,
    listed: VecDeque<Equivocation>,
    seen: BTreeMap<(u64, u32, Step), Vec<Vec<u8>>>,
    /// (height, sentry) of counted precommits, oldest first.
    window: VecDeque<(u64, u64)>,
    /// The halt in progress: the upgrade, since when, and when the key's
    /// first precommit after it was counted.
    halt: Option<(Upgrade, std::time::Instant, Option<u64>)>,
    /// The upgrades passed.
    passed: Vec<Passed>,
}

impl Book {
    pub fn new(schedule: Schedule, key: PublicValidatorKey) -> Self {
        Self {
            schedule,
            key,
            height: 0,
            round: 0,
            current: Vec::new(),
            signed: 0,
            missed: 0,
            refused: 0,
            equivocations: 0,
            listed: VecDeque::new(),
            seen: BTreeMap::new(),
            window: VecDeque::new(),
            halt: None,
            passed: Vec::new(),
        }
    }

    /// Whether the chain is halted for an upgrade (the open round is the
    /// first past its height, and the network has not upgraded yet); ends
    /// the halt, recording it, once the network has.
    fn halted(&mut self) -> bool {
        if self.halt.is_none() && self.round == 0 {
            let after = self.height.checked_sub(1);
            let up = after.and_then(|h| self.schedule.upgrades.at(h)).cloned();
            if let Some(up) = up.filter(|u| !self.passed.iter().any(|p| p.upgrade == *u)) {
                self.halt = Some((up, std::time::Instant::now(), None));
            }
        }
        let Some((up, since, signed_ms)) = &self.halt else {
            return false;
        };
        if since.elapsed() < self.schedule.network_upgrade {
            return true;
        }
        self.passed.push(Passed {
            upgrade: up.clone(),
            halted_ms: since.elapsed().as_millis() as u64,
            by_network: true,
            signed_ms: *signed_ms,
        });
        self.halt = None;
        false
    }

    /// The halt in progress, and the upgrades passed.
    pub fn upgrades(&self) -> (Option<Upgrade>, Vec<Passed>) {
        (self.halt.as_ref().map(|h| h.0.clone()), self.passed.clone())
    }

    fn two_rounds(&self, height: u64) -> bool {
        self.schedule.round_every > 0 && height % self.schedule.round_every == 0
    }

    fn commits(&self, height: u64, round: u32) -> bool {
        !self.two_rounds(height) || round >= 1
    }

    /// Opens the next round, or closes the height and opens the next one.
    /// Returns the open (height, round).
    pub fn tick(&mut self) -> (u64, u32) {
        if self.halted() {
            return (self.height, self.round);
        }
        if self.height > 0 && !self.commits(self.height, self.round) {
            self.round += 1;
            return (self.height, self.round);
        }
        if self.height > 0 && self.current.is_empty() {
            self.missed += 1;
        }
        self.current.clear();
        self.height += 1;
        self.round = 0;
        let floor = self.height.saturating_sub(WINDOW_HEIGHTS);
        self.seen = self.seen.split_off(&(floor, 0, Step::Proposal));
        while self.window.front().is_some_and(|(h, _)| *h < floor) {
            self.window.pop_front();
        }
        (self.height, self.round)
    }

    pub fn announce(&self) -> Announce {
        let block = consensus::block_id(&self.schedule.chain_id, self.height, self.round);
        let parts = block.part_set_header.unwrap_or_default();
        Announce {
            chain_id: self.schedule.chain_id.clone(),
            height: self.height,
            round: self.round,
            block_hash: hex::encode(&block.hash),
            parts_total: parts.total,
            parts_hash: hex::encode(&parts.hash),
            proposer: self.schedule.validators <= 1
                || (self.height + self.round as u64) % self.schedule.validators == 0,
            commit: self.commits(self.height, self.round),
            extensions: self.schedule.extensions,
            slot_ms: self.schedule.slot_ms,
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            height: self.height,
            round: self.round,
            signed: self.signed,
            missed: self.missed,
            equivocations: self.equivocations,
            refused: self.refused,
        }
    }

    pub fn equivocations(&self) -> impl Iterator<Item = &Equivocation> {
        self.listed.iter()
    }

    /// (height, sentry) of counted precommits at or above `since`.
    pub fn signers(&self, since: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.window
            .iter()
            .copied()
            .filter(move |(h, _)| *h >= since)
    }

    /// Counts a submission that could not even be decoded.
    pub fn refuse_undecodable(&mut self) {
        self.refused += 1;
    }

    /// Judges a vote submitted by sentry `node`.
    pub fn submit_vote(&mut self, node: u64, vote: &RawVote) -> Result<Verdict, Refusal> {
        let r = self.judge_vote(node, vote);
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    /// Judges a proposal submitted by sentry `node`.
    pub fn submit_proposal(&mut self, proposal: &RawProposal) -> Result<Verdict, Refusal> {
        let r = self.judge_proposal(proposal);
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    fn judge_vote(&mut self, node: u64, vote: &RawVote) -> Result<Verdict, Refusal> {
        let step = Step::of_vote(vote.r#type).ok_or_else(|| consensus::Malformed {
            what: "vote",
            why: format!("type {} is not a prevote or precommit", vote.r#type),
        })?;
        if vote.validator_address != self.key.address {
            return Err(Refusal::NotValidator);
        }
        let bytes = consensus::vote_sign_bytes(&self.schedule.chain_id, vote)?;
        if !consensus::verify(&self.key.key, &bytes, &vote.signature) {
            return Err(Refusal::BadSignature);
        }
        let (height, round) = hr(vote.height, vote.round)?;
        let block = consensus::block_key(vote.block_id.as_ref());
        let equivocation = self.book(height, round, step, block.clone())?;
        self.check_open(height, round)?;
        if self.schedule.extensions
            && consensus::wants_extension(vote)
            && !consensus::verify(
                &self.key.key,
                &consensus::extension_sign_bytes(&self.schedule.chain_id, vote),
                &vote.extension_signature,
            )
        {
            return Err(Refusal::BadExtension);
        }
        let committed = consensus::block_key(Some(&consensus::block_id(
            &self.schedule.chain_id,
            height,
            round,
        )));
        let counted = step == Step::Precommit && self.commits(height, round) && block == committed;
        if counted && !self.current.contains(&node) {
            if self.current.is_empty() {
                self.signed += 1;
            }
            if let Some((_, since, signed_ms @ None)) = &mut self.halt {
                *signed_ms = Some(since.elapsed().as_millis() as u64);
            }
            if self.current.len() < MAX_NODES_PER_HEIGHT {
                self.current.push(node);
                self.window.push_back((height, node));
            }
        }
        Ok(Verdict {
            equivocation,
            counted,
        })
    }

    fn judge_proposal(&mut self, p: &RawProposal) -> Result<Verdict, Refusal> {
        if p.r#type != consensus::PROPOSAL {
            return Err(consensus::Malformed {
                what: "proposal",
                why: format!("type {} is not a proposal", p.r#type),
            }
            .into());
        }
        let bytes = consensus::proposal_sign_bytes(&self.schedule.chain_id, p)?;
        if !consensus::verify(&self.key.key, &bytes, &p.signature) {
            return Err(Refusal::BadSignature);
        }
        let (height, round) = hr(p.height, p.round)?;
        let block = consensus::block_key(p.block_id.as_ref());
        let equivocation = self.book(height, round, Step::Proposal, block)?;
        self.check_open(height, round)?;
        Ok(Verdict {
            equivocation,
            counted: false,
        })
    }

    /// Remembers a validly signed block id for (height, round, step);
    /// returns whether it conflicts with one signed before.
    fn book(
        &mut self,
        height: u64,
        round: u32,
        step: Step,
        block: Vec<u8>,
    ) -> Result<bool, Refusal> {
        if height + WINDOW_HEIGHTS < self.height {
            return Err(Refusal::TooOld(height));
        }
        let blocks = self.seen.entry((height, round, step)).or_default();
        if blocks.contains(&block) {
            return Ok(false);
        }
        let conflict = !blocks.is_empty();
        if blocks.len() < MAX_BLOCKS_PER_STEP {
            blocks.push(block);
        }
        if conflict {
            self.equivocations += 1;
            if self.listed.len() == MAX_LISTED {
                self.listed.pop_front();
            }
            self.listed.push_back(Equivocation {
                height,
                round,
                step,
            });
            tracing::warn!(height, round, ?step, "EQUIVOCATION");
        }
        Ok(conflict)
    }

    fn check_open(&self, height: u64, round: u32) -> Result<(), Refusal> {
        if height == self.height && round <= self.round {
            Ok(())
        } else {
            Err(Refusal::NotOpen {
                height,
                round,
                open_height: self.height,
                open_round: self.round,
            })
        }
    }
}

fn hr(height: i64, round: i32) -> Result<(u64, u32), consensus::Malformed> {
    match (u64::try_from(height), u32::try_from(round)) {
        (Ok(h), Ok(r)) if h > 0 => Ok((h, r)),
        _ => Err(consensus::Malformed {
            what: "height/round",
            why: format!("{height}/{round}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comet::key::ValidatorKey;
    use ed25519_dalek::SigningKey;

    const CHAIN: &str = "judge-test";

    fn book(round_every: u64, extensions: bool) -> (Book, SigningKey) {
        let key = ValidatorKey::generate();
        let schedule = Schedule {
            chain_id: CHAIN.into(),
            round_every,
            validators: 1,
            extensions,
            slot_ms: 100,
            upgrades: Default::default(),
            network_upgrade: Default::default(),
        };
        (Book::new(schedule, key.public()), key.signing().clone())
    }

    fn signed(b: &Book, k: &SigningKey, step: Step, block: BlockId) -> RawVote {
        let a = b.announce();
        let mut v = consensus::vote(step, a.height, a.round, block, b.key.address, vec![]);
        consensus::sign_vote(k, CHAIN, &mut v, b.schedule.extensions).unwrap();
        v
    }

    #[test]
    fn an_upgrade_halts_the_rounds_past_its_height_until_the_network_upgraded() {
        let (mut b, k) = book(0, false);
        b.schedule.upgrades = crate::upgrade::Plan::new(vec!["v1@2".parse().unwrap()]).unwrap();
        b.schedule.network_upgrade = std::time::Duration::from_secs(3600);
        assert_eq!(b.tick(), (1, 0));
        assert_eq!(b.tick(), (2, 0));
        assert_eq!(b.tick(), (3, 0), "2 committed: the halt opens at 3");
        assert_eq!(b.tick(), (3, 0), "no round past it meanwhile");
        assert!(b.upgrades().0.is_some());
        // A node of the new version votes in the open round meanwhile.
        let block = b.announce().block_id().unwrap();
        let pc = signed(&b, &k, Step::Precommit, block);
        assert!(b.submit_vote(1, &pc).unwrap().counted);
        b.schedule.network_upgrade = std::time::Duration::ZERO;
        assert_eq!(b.tick(), (4, 0), "the network upgraded");
        let (halted, passed) = b.upgrades();
        assert!(halted.is_none());
        assert_eq!(passed.len(), 1);
        assert!(passed[0].by_network && passed[0].signed_ms.is_some());
        assert_eq!(b.tick(), (5, 0), "once");
    }

    #[test]
    fn counts_signed_missed_and_equivocations() {
        let (mut b, k) = book(0, false);
        b.tick(); // height 1
        let block = b.announce().block_id().unwrap();
        assert!(b
            .submit_vote(1, &signed(&b, &k, Step::Prevote, block.clone()))
            .is_ok());
        let pc = signed(&b, &k, Step::Precommit, block.clone());
        assert!(b.submit_vote(1, &pc).unwrap().counted);
        // The same block from a second sentry, later timestamp: not an equivocation.
        let again = signed(&b, &k, Step::Precommit, block.clone());
        assert_ne!(again.signature, pc.signature);
        assert!(!b.submit_vote(2, &again).unwrap().equivocation);
        // A different block for the same height, round, step: an equivocation.
        let other = signed(&b, &k, Step::Precommit, consensus::conflicting(&block, 2));
        let v = b.submit_vote(2, &other).unwrap();
        assert!(v.equivocation && !v.counted);
        b.tick(); // height 2, nobody signs
        b.tick(); // height 3
        let t = b.totals();
        assert_eq!(
            (t.signed, t.missed, t.equivocations, t.refused),
            (1, 1, 1, 0)
        );
        assert_eq!(b.signers(0).collect::<Vec<_>>(), vec![(1, 1), (1, 2)]);
        let e = b.equivocations().next().unwrap();
        assert_eq!((e.height, e.round, e.step), (1, 0, Step::Precommit));
    }

    #[test]
    fn forged_foreign_stale_and_wrong_chain_are_refused() {
        let (mut b, k) = book(0, false);
        b.tick();
        let block = b.announce().block_id().unwrap();
        let mut forged = signed(&b, &k, Step::Precommit, block.clone());
        forged.signature[0] ^= 1;
        assert!(matches!(
            b.submit_vote(1, &forged),
            Err(Refusal::BadSignature)
        ));
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let mut foreign =
            consensus::vote(Step::Precommit, 1, 0, block.clone(), b.key.address, vec![]);
        consensus::sign_vote(&stranger, CHAIN, &mut foreign, false).unwrap();
        assert!(matches!(
            b.submit_vote(1, &foreign),
            Err(Refusal::BadSignature)
        ));
        let mut other_chain =
            consensus::vote(Step::Precommit, 1, 0, block.clone(), b.key.address, vec![]);
        consensus::sign_vote(&k, "another-chain", &mut other_chain, false).unwrap();
        assert!(matches!(
            b.submit_vote(1, &other_chain),
            Err(Refusal::BadSignature)
        ));
        let stale = signed(&b, &k, Step::Precommit, block.clone());
        b.tick();
        assert!(matches!(
            b.submit_vote(1, &stale),
            Err(Refusal::NotOpen { .. })
        ));
        let t = b.totals();
        assert_eq!((t.signed, t.equivocations, t.refused), (0, 0, 4));
    }

    #[test]
    fn a_late_conflicting_vote_is_refused_but_still_an_equivocation() {
        let (mut b, k) = book(0, false);
        b.tick();
        let block = b.announce().block_id().unwrap();
        let first = signed(&b, &k, Step::Prevote, block.clone());
        let late = signed(&b, &k, Step::Prevote, consensus::conflicting(&block, 7));
        b.submit_vote(1, &first).unwrap();
        b.tick();
        assert!(matches!(
            b.submit_vote(2, &late),
            Err(Refusal::NotOpen { .. })
        ));
        assert_eq!(b.totals().equivocations, 1);
    }

    #[test]
    fn rounds_commit_only_in_round_one_and_nil_is_a_block_of_its_own() {
        let (mut b, k) = book(2, false);
        b.tick(); // 1/0
        assert_eq!(b.tick(), (2, 0));
        assert!(!b.announce().commit);
        let r0 = b.announce().block_id().unwrap();
        b.submit_vote(1, &signed(&b, &k, Step::Prevote, r0.clone()))
            .unwrap();
        let nil = b
            .submit_vote(1, &signed(&b, &k, Step::Precommit, consensus::nil()))
            .unwrap();
        assert!(!nil.counted);
        // Precommitting the round-0 block too is a conflict with the nil precommit.
        let v = b
            .submit_vote(1, &signed(&b, &k, Step::Precommit, r0.clone()))
            .unwrap();
        assert!(v.equivocation);
        assert_eq!(b.tick(), (2, 1));
        assert!(b.announce().commit);
        let r1 = b.announce().block_id().unwrap();
        assert_ne!(r0, r1);
        let v = b
            .submit_vote(1, &signed(&b, &k, Step::Precommit, r1))
            .unwrap();
        assert!(
            v.counted && !v.equivocation,
            "a new round is not an equivocation"
        );
        assert_eq!(b.tick(), (3, 0));
        let t = b.totals();
        assert_eq!((t.signed, t.missed, t.equivocations), (1, 1, 1));
    }

    #[test]
    fn extensions_are_required_on_non_nil_precommits_when_enabled() {
        let (mut b, k) = book(0, true);
        b.tick();
        let block = b.announce().block_id().unwrap();
        let a = b.announce();
        let mut without = consensus::vote(
            Step::Precommit,
            a.height,
            a.round,
            block.clone(),
            b.key.address,
            b"ext".to_vec(),
        );
        consensus::sign_vote(&k, CHAIN, &mut without, false).unwrap();
        assert!(matches!(
            b.submit_vote(1, &without),
            Err(Refusal::BadExtension)
        ));
        let mut with = without.clone();
        consensus::sign_vote(&k, CHAIN, &mut with, true).unwrap();
        assert!(b.submit_vote(1, &with).unwrap().counted);
        // Nil precommits and prevotes need none.
        assert!(b
            .submit_vote(1, &signed(&b, &k, Step::Prevote, block))
            .is_ok());
    }

    #[test]
    fn proposals_are_judged_too() {
        let (mut b, k) = book(0, false);
        b.tick();
        let block = b.announce().block_id().unwrap();
        let mut p = consensus::proposal(1, 0, block.clone());
        consensus::sign_proposal(&k, CHAIN, &mut p).unwrap();
        assert!(!b.submit_proposal(&p).unwrap().equivocation);
        let mut q = consensus::proposal(1, 0, consensus::conflicting(&block, 3));
        consensus::sign_proposal(&k, CHAIN, &mut q).unwrap();
        assert!(b.submit_proposal(&q).unwrap().equivocation);
        let e = b.equivocations().next().unwrap();
        assert_eq!(e.step, Step::Proposal);
    }
}
