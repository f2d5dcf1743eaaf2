//! The leader's one sign path ([`Signer::sign_here`]): the checks every
//! request passes (the key is signer mode's, the request is well formed,
//! within the height limit, every voter registered), the sign-ahead
//! decision ([`super::ahead::decide`]), and its two ways to a signature:
//! inside this process's own reservation, its `SignAhead` committed
//! behind it; or after the commit of `SignAhead` (or `Signed`) and the
//! ledger's verdict.
//!
//! Owns: the order of those steps, under the chain's lock. Must not: decide
//! what may be signed (the ledger and `ahead::decide` do), or sign on a
//! follower (it forwards to the leader, `super::forward`).

use openraft::errors::{ClientWriteError, RaftError};
use openraft::storage::RaftStateMachine;
use tokio::time::Instant;

use super::ahead::{self, Ahead, Path};
use super::confirm::{self, Answer, Count, Tally};
use super::{
    height_limit, keys, sign, Chain, Forward, Hrs, Refusal, Signable, Signer, Stages, SIGN_PATIENCE,
};
use crate::config::NodeId;
use crate::ledger::{Command, SignVerdict, SignedAt};
use crate::plant::{self, Plant};
use crate::raft::TypeConfig;

/// The confirmation asks of one signature, answered as they come.
struct Asks {
    tally: Tally,
    answers: tokio::sync::mpsc::UnboundedReceiver<(NodeId, Option<Answer>)>,
    /// When they were sent.
    asked: Instant,
    /// When the wait for a quorum is over.
    until: Instant,
}

/// One new signature's step: what it signs and how far its `SignAhead`
/// reserves.
struct Step<'a> {
    chain_id: &'a str,
    hrs: Hrs,
    digest: String,
    /// The last HRS its `SignAhead` reserves for this process.
    through: Hrs,
    /// Whether a `SignAhead` may reserve at all (every other voter applies
    /// it, [`ahead::FEATURE`]).
    reserve: bool,
    /// Whether only the next height needs its entry (the other sentries'
    /// requests for this step go before it).
    later: bool,
}

impl Step<'_> {
    fn signed_at(&self, timestamp: (i64, i32)) -> SignedAt {
        SignedAt {
            height: self.hrs.0,
            round: self.hrs.1,
            step: self.hrs.2,
            digest: self.digest.clone(),
            timestamp,
        }
    }

    fn sign_ahead(&self, timestamp: (i64, i32), holder: u64) -> Command {
        Command::SignAhead {
            chain_id: self.chain_id.to_string(),
            height: self.hrs.0,
            round: self.hrs.1,
            step: self.hrs.2,
            digest: self.digest.clone(),
            timestamp,
            through: self.through,
            holder,
        }
    }

    /// `Signed` only while no member could have seen a `SignAhead` of
    /// this process (`holds`: the watermark is its): inside its own
    /// reservation a `Signed` would be refused.
    fn first_entry(&self, timestamp: (i64, i32), holder: u64, holds: bool) -> Command {
        if self.reserve || holds {
            return self.sign_ahead(timestamp, holder);
        }
        Command::Signed {
            chain_id: self.chain_id.to_string(),
            height: self.hrs.0,
            round: self.hrs.1,
            step: self.hrs.2,
            digest: self.digest.clone(),
            timestamp,
        }
    }
}

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// The leader's path, the only one that signs: check, then sign now
    /// where a commit already covers the HRS ([`ahead`]), else commit and
    /// sign. Each new signature's `SignAhead` reserves the next HRS.
    pub async fn sign_here(
        &self,
        chain: &Chain,
        what: Signable,
        deadline: Instant,
    ) -> Result<Signable, Refusal> {
        let mut stage = self.stages();
        let left = deadline.saturating_duration_since(Instant::now());
        let mut ahead = tokio::time::timeout(left, chain.lock.lock())
            .await
            .map_err(|_| Refusal::NotCommitted("busy signing other requests".into()))?;
        stage.done("lock");
        let chain_id = chain.id();
        self.key_is_signer_modes()?;
        // Everything that could make signing fail is checked before the
        // commit, so that a malformed request cannot use up an HRS.
        what.validate(chain_id)?;
        let hrs = what.hrs()?;
        let digest = what.digest(chain_id)?;
        let path = self
            .path(chain, &mut ahead, &what, &digest, deadline, &mut stage)
            .await?;
        if let Path::Repeat(timestamp) = path {
            return self.signed(chain, what, timestamp).await;
        }
        if let Path::Committed(timestamp) = path {
            let voters = self.voters();
            let signed = self
                .sign_committed(chain, what, &digest, timestamp, &voters, deadline)
                .await?;
            stage.done("confirm");
            return Ok(signed);
        }
        // A step asked of the voters before (a request given up meanwhile)
        // is asked again with the timestamp they know.
        let timestamp = ahead
            .asked_at(hrs, &digest)
            .unwrap_or_else(|| what.timestamp());
        let voters = self.checked_voters(chain_id, hrs)?;
        stage.done("check");
        let step = self.step(&mut ahead, chain_id, hrs, digest, &voters);
        if path == Path::Reserved {
            if let Some(signed) = self
                .sign_reserved(
                    chain, &mut ahead, &what, &step, timestamp, &voters, deadline,
                )
                .await?
            {
                stage.done("sign");
                return Ok(signed);
            }
        }
        // Its outcome is unknown from the moment it is proposed (the
        // request may be given up, or time out): until then, nothing at or
        // below it is signed from a reservation.
        ahead.doubt = ahead.doubt.max(Some(hrs));
        let holds = self
            .core
            .cluster
            .borrow()
            .watermark(chain_id)
            .is_some_and(|w| w.holder == Some(self.holder));
        let first = step.first_entry(timestamp, self.holder, holds);
        let verdict = self.commit(first, deadline).await?;
        stage.done("commit");
        match verdict {
            SignVerdict::Sign { timestamp } => {
                ahead.asking(hrs, &step.digest, timestamp);
                let signed = self
                    .sign_committed(chain, what, &step.digest, timestamp, &voters, deadline)
                    .await?;
                stage.done("confirm");
                ahead.signed(step.signed_at(timestamp));
                stage.done("sign");
                Ok(signed)
            }
            v => Err(Refusal::from_verdict(&v, hrs, chain_id)
                .unwrap_or_else(|| Refusal::NotCommitted("accepted without a signature".into()))),
        }
    }

    /// A step inside this process's own reservation: asked of the voters
    /// before signing, answered while it signs; the signature leaves only
    /// once they confirmed ([`confirm`]), and its `SignAhead` is committed
    /// behind it. Too few confirmations (voters down, or just started) and
    /// no voter that knows of another signature: `None`, committed first
    /// instead (the commit of the last signature first, in order).
    #[allow(clippy::too_many_arguments)]
    async fn sign_reserved(
        &self,
        chain: &Chain,
        ahead: &mut Ahead,
        what: &Signable,
        step: &Step<'_>,
        timestamp: (i64, i32),
        voters: &[NodeId],
        deadline: Instant,
    ) -> Result<Option<Signable>, Refusal> {
        let chain_id = chain.id();
        ahead.asking(step.hrs, &step.digest, timestamp);
        let asks = self.ask_to_confirm(chain_id, step.hrs, &step.digest, timestamp, voters, false);
        let signed = self.signed(chain, what.clone(), timestamp).await?;
        let confirmed =
            plant::on(Plant::SignUnconfirmed) || self.confirmed(asks, step.hrs, deadline).await?;
        if confirmed {
            ahead.signed(step.signed_at(timestamp));
            let before = ahead.pending.take();
            let entry = step.sign_ahead(timestamp, self.holder);
            ahead.pending = Some(self.commit_behind(chain, entry, before, step.later));
            return Ok(Some(signed));
        }
        if let Some(pending) = ahead.pending.as_mut() {
            chain.hurry.now();
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, pending).await.is_ok() {
                ahead.pending = None;
            }
        }
        Ok(None)
    }

    /// The key is signer mode's now: no validator-mode member holds it
    /// ([`keys::held_in_validator_mode`]), and where validator mode held it
    /// last, where that node stopped signing is known (imported).
    pub(super) fn key_is_signer_modes(&self) -> Result<(), Refusal> {
        if let Some(why) = keys::held_now(&self.core) {
            return Err(Refusal::NotCommitted(why));
        }
        let linked = self.core.cluster.borrow().linked;
        match linked.unknown_since {
            Some(index) => Err(Refusal::NotCommitted(format!(
                "the key was linked in validator mode (log index {index}) and where that node stopped signing is not known: import its priv_validator_state.json with `keyraft signer import-state`"
            ))),
            None => Ok(()),
        }
    }

    /// The sign-ahead decision for this request; where it says commit, the
    /// commit of the last signature (which may reserve this HRS) is likely
    /// under way: waited for, and the decision taken again, rather than
    /// committing twice. Kept until it ends (a request given up meanwhile
    /// leaves it for the next, so commits behind stay in order).
    async fn path(
        &self,
        chain: &Chain,
        ahead: &mut Ahead,
        what: &Signable,
        digest: &str,
        deadline: Instant,
        stage: &mut Stages<'_>,
    ) -> Result<Path, Refusal> {
        let chain_id = chain.id();
        let hrs = what.hrs()?;
        let decide = |ahead: &Ahead| {
            let applied = self.core.cluster.borrow().watermark(chain_id).cloned();
            ahead::decide(
                ahead,
                applied.as_ref(),
                chain_id,
                hrs,
                digest,
                self.holder,
                what.timestamp(),
            )
        };
        let path = decide(ahead)?;
        let Some(pending) = ahead.pending.as_mut().filter(|_| path == Path::Commit) else {
            return Ok(path);
        };
        chain.hurry.now();
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, pending).await.is_ok() {
            ahead.pending = None;
        }
        stage.done("wait");
        decide(ahead)
    }

    /// A new HRS's checks: within the height limit, and every voter
    /// registered. Returns the voters (once per request, for both checks
    /// and the reservation).
    fn checked_voters(&self, chain_id: &str, hrs: Hrs) -> Result<Vec<NodeId>, Refusal> {
        let limit = height_limit(&self.core, chain_id);
        if hrs.0 > limit.height {
            return Err(Refusal::Malformed(format!(
                "height {} is above {}: refused",
                hrs.0, limit.why
            )));
        }
        let voters = self.voters();
        self.all_voters_registered(&voters)?;
        Ok(voters)
    }

    /// The voters now.
    pub(super) fn voters(&self) -> Vec<NodeId> {
        self.core
            .with_raft_metrics(|m| m.membership_config.membership().voter_ids().collect())
    }

    /// How far this signature reserves: only while every other voter can
    /// apply a `SignAhead` (a signature in this process's own reservation
    /// is recorded with `SignAhead` in any case: a legacy `Signed` would be
    /// refused there), and, for a precommit, as far as the chain's pace
    /// allows ([`ahead::reach`]). Notes the reservation in `ahead`.
    fn step<'a>(
        &self,
        ahead: &mut Ahead,
        chain_id: &'a str,
        hrs: Hrs,
        digest: String,
        voters: &[NodeId],
    ) -> Step<'a> {
        let reserve = self.voters_sign_ahead(voters);
        let quick = hrs.2 == sign::STEP_PRECOMMIT && {
            ahead.precommit_at(hrs.0, Instant::now());
            ahead.quick(ahead::takeover(&self.core.timing()))
        };
        let through = if reserve {
            ahead::reach(hrs, quick)
        } else {
            hrs
        };
        // Before `reserves`: whether this round's precommit was reserved
        // by the last precommit, not by this signature.
        let later = ahead.needed_only_next_height(hrs);
        ahead.reserves(hrs, through);
        Step {
            chain_id,
            hrs,
            digest,
            through,
            reserve,
            later,
        }
    }

    /// Whether every other voter said it applies `SignAhead`
    /// ([`ahead::FEATURE`]) and answers confirmation asks
    /// ([`confirm::FEATURE`]): until then the leader writes `Signed`, which
    /// a keyraft from before sign-ahead applies too, and reserves nothing.
    fn voters_sign_ahead(&self, voters: &[NodeId]) -> bool {
        let me = self.core.cfg.id;
        let others = || voters.iter().copied().filter(|v| *v != me);
        self.core.view.all_have(others(), ahead::FEATURE)
            && self.core.view.all_have(others(), confirm::FEATURE)
    }

    /// A step committed (by this request, or before it: a repeat of the
    /// committed bytes), signed with the ledger's `timestamp` once the
    /// voters confirm it: a process whose Raft state came back with its
    /// memory image may have committed it in its own diverged log, and the
    /// voters know what was committed. Too few confirmations refuse it;
    /// where too few voters answer asks at all (an older keyraft, in a
    /// rolling upgrade), the commit alone covers it, as it did before.
    async fn sign_committed(
        &self,
        chain: &Chain,
        what: Signable,
        digest: &str,
        timestamp: (i64, i32),
        voters: &[NodeId],
        deadline: Instant,
    ) -> Result<Signable, Refusal> {
        let (chain_id, hrs) = (chain.id(), what.hrs()?);
        if !self.voters_confirm(voters) {
            return self.signed(chain, what, timestamp).await;
        }
        let asks = self.ask_to_confirm(chain_id, hrs, digest, timestamp, voters, true);
        let signed = self.signed(chain, what, timestamp).await?;
        self.confirmed_or_refused(asks, hrs, deadline).await?;
        Ok(signed)
    }

    /// Whether enough other voters answer confirmation asks for a quorum
    /// ([`confirm::FEATURE`]).
    fn voters_confirm(&self, voters: &[NodeId]) -> bool {
        let me = self.core.cfg.id;
        let answering = voters
            .iter()
            .filter(|v| **v != me && self.core.view.all_have([**v], confirm::FEATURE))
            .count();
        answering >= voters.len() / 2
    }

    /// Asks every other voter to confirm `hrs` with `digest` and
    /// `timestamp` ([`confirm`]), each ask spawned so that they travel
    /// while the leader signs; for a step already `committed`, a voter
    /// just started counts ([`Tally::new`]).
    fn ask_to_confirm(
        &self,
        chain_id: &str,
        hrs: Hrs,
        digest: &str,
        timestamp: (i64, i32),
        voters: &[NodeId],
        committed: bool,
    ) -> Asks {
        let me = self.core.cfg.id;
        let others: Vec<NodeId> = voters.iter().copied().filter(|v| *v != me).collect();
        let ask = confirm::Ask {
            chain_id: chain_id.to_string(),
            hrs,
            digest: digest.to_string(),
            timestamp,
            holder: self.holder,
            term: self.core.with_raft_metrics(|m| m.current_term),
        }
        .to_proto();
        let limit = self.core.timing().heartbeat;
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        for voter in &others {
            let (voter, tx, peers, ask) = (*voter, tx.clone(), self.to_leader.clone(), ask.clone());
            crate::raft::spawn(async move {
                let answer = peers
                    .confirm(voter, ask, limit)
                    .await
                    .ok()
                    .and_then(|r| Answer::from_proto(&r));
                // The leader may have stopped waiting.
                let _ = tx.send((voter, answer));
            });
        }
        let asked = Instant::now();
        Asks {
            tally: Tally::new(voters.len(), others.len(), committed),
            answers,
            asked,
            until: asked + limit,
        }
    }

    /// Waits for the answers to `asks`: until every voter answered, or a
    /// quorum did and a grace passed ([`confirm::grace`]), or a heartbeat
    /// (the deadline at most). True: confirmed; false: too few answers;
    /// a refusal where a voter knows of another signature.
    async fn confirmed(
        &self,
        mut asks: Asks,
        hrs: Hrs,
        deadline: Instant,
    ) -> Result<bool, Refusal> {
        let mut until = asks.until.min(deadline);
        let mut count = asks.tally.count();
        let mut graced = false;
        while matches!(count, Count::Wait | Count::Quorum) {
            if count == Count::Quorum && !graced {
                let now = Instant::now();
                until = until.min(now + confirm::grace(now.saturating_duration_since(asks.asked)));
                graced = true;
            }
            count = match tokio::time::timeout_at(until, asks.answers.recv()).await {
                Ok(Some((voter, answer))) => asks.tally.add(voter, answer),
                Ok(None) | Err(_) => asks.tally.last(),
            };
        }
        match count {
            Count::Sign | Count::Wait | Count::Quorum => Ok(true),
            Count::TooFew { yes, need } => {
                tracing::debug!(yes, need, asked = ?hrs, "too few voters confirmed a signature");
                Ok(false)
            }
            Count::Refuse { voter, conflict } => {
                tracing::error!(
                    voter,
                    asked = ?hrs,
                    "not signed: voter {voter} says {conflict}, which this process does not remember signing. It may be resumed from an earlier memory image (a reverted VM snapshot, a restored checkpoint): stop it if so"
                );
                Err(if conflict.at() == hrs {
                    Refusal::Equivocation { asked: hrs }
                } else {
                    Refusal::Regression { asked: hrs }
                })
            }
        }
    }

    /// [`Self::confirmed`] where too few answers refuse: a step already
    /// committed (or a repeat of committed bytes) has no other way.
    async fn confirmed_or_refused(
        &self,
        asks: Asks,
        hrs: Hrs,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        if self.confirmed(asks, hrs, deadline).await? {
            return Ok(());
        }
        Err(Refusal::NotCommitted(format!(
            "too few voters confirmed {hrs:?} within a heartbeat"
        )))
    }

    /// A voter that has not registered yet would not be recognised if it
    /// lost its data dir and came back empty (docs/design.md, step 9): sign
    /// only once every voter is known to have run with durable state.
    fn all_voters_registered(&self, voters: &[NodeId]) -> Result<(), Refusal> {
        let cluster = self.core.cluster.borrow();
        let unregistered: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| !cluster.registered.contains(v))
            .collect();
        drop(cluster);
        if unregistered.is_empty() {
            Ok(())
        } else {
            Err(Refusal::NotCommitted(format!(
                "voters {unregistered:?} have not registered yet"
            )))
        }
    }

    /// Commits `cmd` (a `SignAhead`) and returns the ledger's verdict.
    pub(super) async fn commit(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<SignVerdict, Refusal> {
        let late = || Refusal::NotCommitted(format!("no commit within {SIGN_PATIENCE:?}"));
        if Instant::now() >= deadline {
            return Err(late());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.core.raft.client_write(cmd)).await {
            Ok(Ok(r)) => r
                .data
                .sign
                .ok_or_else(|| Refusal::NotCommitted("no verdict from the state machine".into())),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(Refusal::NotCommitted("leadership moved".into()))
            }
            Ok(Err(e)) => Err(Refusal::NotCommitted(e.to_string())),
            Err(_) => Err(late()),
        }
    }
}

/// The simulator's memory image of a signing process.
#[cfg(keyraft_sim)]
impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// Makes this process what a memory image taken a moment ago would
    /// resume as: it forgets its last signature of its first chain that
    /// is not applied yet (signed after the image was taken) and the
    /// commit behind it. Returns that signature's HRS; `None` while a
    /// request holds the chain's lock, or nothing signed is unapplied.
    pub fn forget_unapplied_last(&self) -> Option<Hrs> {
        let chains = self.chains();
        let chain = chains.first()?;
        let mut ahead = chain.lock.try_lock().ok()?;
        let last = ahead.recent.back()?.hrs();
        let applied = self
            .core
            .cluster
            .borrow()
            .watermark(chain.id())
            .and_then(|w| w.signed())
            .map(|s| s.hrs());
        if applied.is_some_and(|a| a >= last) {
            return None;
        }
        ahead.recent.pop_back();
        if let Some(pending) = ahead.pending.take() {
            pending.abort();
        }
        Some(last)
    }
}
