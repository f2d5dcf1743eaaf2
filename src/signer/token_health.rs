//! Whether each chain's key signs on this host: a key in a token signs off
//! the async workers (a token blocks, a YubiHSM2 for milliseconds), and a
//! token that fails marks its chain's key failing (`Core::key_failures`,
//! `keyraft_signer_key_up`), which makes this host ineligible to lead
//! (`coordinator::policy::eligible`) until the token answers again: a
//! probe signs [`super::key::PROOF_MESSAGE`] every [`PROBE_EVERY`] and
//! checks the signature against the key's public key.
//!
//! Owns: where a signature is made (in place or on the blocking pool), the
//! failure record, the probe. Must not: decide to sign, or lead.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;

use super::key::SignError;
use super::sign::Signable;
use super::token::TokenError;
use super::{Chain, ConsensusKey, Forward, Refusal, Signer};
use crate::raft::TypeConfig;

/// How often a token's key is probed (a signature of a fixed message).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Longest a signature waits for a token before it counts as failed.
pub const TOKEN_PATIENCE: Duration = Duration::from_millis(1500);

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// `what` signed with `chain`'s key and `timestamp`: a whole signed
    /// message, or a refusal and nothing signed.
    pub(super) async fn signed(
        &self,
        chain: &Chain,
        what: Signable,
        timestamp: (i64, i32),
    ) -> Result<Signable, Refusal> {
        self.refuse_while_failing(chain)?;
        let id = chain.id().to_string();
        // Another sentry's request for the bytes just signed: answered in
        // place, without waking a thread of the blocking pool (on a busy
        // host that wake costs more than the token's signature).
        if chain.key.in_token() {
            if let Some(signed) = what.clone().remembered(&chain.key, &id, timestamp) {
                return Ok(signed);
            }
        }
        self.with_key(chain, move |key| what.sign(key, &id, timestamp))
            .await
    }

    /// Raw bytes signed with `chain`'s key.
    pub(super) async fn signed_bytes(
        &self,
        chain: &Chain,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, Refusal> {
        self.refuse_while_failing(chain)?;
        self.with_key(chain, move |key| key.sign(&bytes)).await
    }

    /// While `chain`'s key in a token is failing, nothing is asked of the
    /// token but the probe: a hung token would take a thread per request.
    /// (This host is not eligible to lead meanwhile; another leads soon.)
    fn refuse_while_failing(&self, chain: &Chain) -> Result<(), Refusal> {
        let failures = self
            .core
            .key_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match failures.get(chain.id()) {
            Some(why) if chain.key.in_token() => Err(Refusal::KeyFailed(why.clone())),
            _ => Ok(()),
        }
    }

    /// Runs `f` with `chain`'s key: in place for a key file (its
    /// arithmetic is shorter than a trip to another thread), on the
    /// blocking pool for a token, for at most [`TOKEN_PATIENCE`]. A
    /// token's failure (not its refusal of the bytes) is recorded.
    async fn with_key<T: Send + 'static>(
        &self,
        chain: &Chain,
        f: impl FnOnce(&ConsensusKey) -> Result<T, SignError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let done = if chain.key.in_token() {
            let key = chain.key.clone();
            let failed = |why: String| {
                Err(SignError::Token(TokenError::Failed {
                    token: chain.id().to_string(),
                    op: "sign",
                    why,
                }))
            };
            match tokio::time::timeout(TOKEN_PATIENCE, tokio::task::spawn_blocking(move || f(&key)))
                .await
            {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => failed(e.to_string()),
                Err(_) => failed(format!("no answer within {TOKEN_PATIENCE:?}")),
            }
        } else {
            f(&chain.key)
        };
        match &done {
            Err(SignError::Token(TokenError::Refused { .. })) | Ok(_) => {}
            Err(SignError::Token(e)) => self.key_answered(chain, Err(e.to_string())),
            Err(_) => {}
        }
        Ok(done?)
    }

    /// Records whether `chain`'s key signs now; a change is logged once.
    /// Nothing of a chain a reload removed: its failure would keep this
    /// host from leading with nothing left to clear it.
    fn key_answered(&self, chain: &Chain, answer: Result<(), String>) {
        let mut failures = self
            .core
            .key_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Checked under the lock a reload clears the record under.
        if chain.is_retired() {
            return;
        }
        let up = &self.core.metrics.signer_key_up;
        match answer {
            Ok(()) => {
                if failures.remove(chain.id()).is_some() {
                    tracing::info!(
                        chain = chain.id(),
                        "the key signs again: this host may lead"
                    );
                }
                up.with_label_values(&[chain.id()]).set(1);
            }
            Err(why) => {
                if failures
                    .insert(chain.id().to_string(), why.clone())
                    .is_none()
                {
                    tracing::error!(
                        chain = chain.id(),
                        "the key failed to sign, this host stands aside while it fails: {why}"
                    );
                }
                up.with_label_values(&[chain.id()]).set(0);
            }
        }
    }

    /// Probes `chain`'s key, if in a token, every [`PROBE_EVERY`] until a
    /// reload removes or replaces the chain; a probe that has not come back
    /// (a hung token) is not asked again until it does.
    pub async fn probe_token(self: Arc<Self>, chain: Arc<Chain>) {
        // No token, no probe: an idle host does not wake for nothing.
        if !chain.key.in_token() {
            return;
        }
        let mut retired = chain.retired();
        let mut every = tokio::time::interval(PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = retired.requested() => break,
                _ = every.tick() => {}
            }
            if chain.probing.swap(true, Ordering::AcqRel) {
                continue;
            }
            let (me, chain) = (self.clone(), chain.clone());
            crate::raft::spawn(async move {
                let probe = {
                    let busy = chain.probing.clone();
                    move |key: &ConsensusKey| {
                        let done = key.probe();
                        busy.store(false, Ordering::Release);
                        done
                    }
                };
                // A failure is recorded on the way.
                if me.with_key(&chain, probe).await.is_ok() {
                    me.key_answered(&chain, Ok(()));
                }
            });
        }
    }
}
