//! The commit behind a signature made inside this process's reservation
//! ([`Signer::commit_behind`]): its `SignAhead` records the bytes signed
//! (so that a successor can sign them again) and reserves the next steps.
//!
//! Every sentry of a chain asks for the same step within about a
//! millisecond, on every host at once. Where nothing needs the entry
//! before the next height, it is proposed [`BEHIND_DELAY`] after the
//! signature, so that the other sentries' requests are served before its
//! Raft round (an append and an fsync on every member), not behind it. A
//! request that does need it (one that must commit first, and so waits
//! for the entries behind) cuts the delay short ([`Hurry`]).
//!
//! Owns: when and in what order these entries are proposed. Must not:
//! sign, or decide whether a step may be signed. A late or failed entry
//! costs liveness only: the step stays reserved to the process that signed
//! it, and the next request commits before it signs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Chain, Forward, Signer, SIGN_PATIENCE};
use crate::ledger::{Command, SignVerdict};
use crate::raft::TypeConfig;

/// How long an entry that nothing needs before the next height waits: the
/// other sentries' requests for the same step arrive within it.
pub const BEHIND_DELAY: Duration = Duration::from_millis(1);

/// Cuts short the wait of a chain's entries behind (one per chain): a
/// request that must commit first calls [`Hurry::now`] before it waits for
/// them.
#[derive(Default, Clone)]
pub struct Hurry(Arc<Hurried>);

#[derive(Default)]
struct Hurried {
    /// How many times [`Hurry::now`] was called: an entry compares it with
    /// the count when it was signed, so a call made before it listens is
    /// not lost.
    count: AtomicU64,
    notify: Notify,
}

impl Hurry {
    /// Every entry signed until now is proposed without its delay.
    pub fn now(&self) {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// From now on, [`Since::wait`] ends at the next [`Hurry::now`].
    fn since(&self) -> Since {
        Since {
            hurry: self.clone(),
            count: self.0.count.load(Ordering::SeqCst),
        }
    }
}

/// A point after which a [`Hurry::now`] counts.
struct Since {
    hurry: Hurry,
    count: u64,
}

impl Since {
    /// Waits `delay`, or until [`Hurry::now`] was called since this point.
    async fn wait(self, delay: Duration) {
        let hurried = self.hurry.0.notify.notified();
        tokio::pin!(hurried);
        hurried.as_mut().enable();
        if self.hurry.0.count.load(Ordering::SeqCst) != self.count {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = hurried => {}
        }
    }
}

/// Waits for `before` (the entry signed before this one) to end, then,
/// where `later`, [`BEHIND_DELAY`] or until hurried since `since`.
async fn in_turn(before: Option<JoinHandle<()>>, later: bool, since: Since) {
    if let Some(before) = before {
        let _ = before.await;
    }
    if later {
        since.wait(BEHIND_DELAY).await;
    }
}

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// Commits `entry`, the `SignAhead` of a signature made in this
    /// process's reservation for `chain`, behind it. Proposed once `before`
    /// (the one signed before it) ended, so that they are committed in the
    /// order they were signed; where `later`, [`BEHIND_DELAY`] after that
    /// too, unless the chain's [`Hurry`] says a request waits for it.
    pub(super) fn commit_behind(
        &self,
        chain: &Chain,
        entry: Command,
        before: Option<JoinHandle<()>>,
        later: bool,
    ) -> JoinHandle<()> {
        let raft = self.core.raft.clone();
        let chain_id = chain.id().to_string();
        let since = chain.hurry.since();
        let signed_at = match &entry {
            Command::SignAhead { timestamp, .. } => *timestamp,
            _ => (0, 0),
        };
        tokio::spawn(async move {
            in_turn(before, later, since).await;
            let what = entry.to_string();
            match tokio::time::timeout(SIGN_PATIENCE, raft.client_write(entry)).await {
                Ok(Ok(r)) => match r.data.sign {
                    Some(SignVerdict::Sign { timestamp }) if timestamp == signed_at => {}
                    Some(SignVerdict::Sign { timestamp }) => tracing::error!(
                        chain = chain_id,
                        "{what}: signed with timestamp {signed_at:?} but the ledger holds {timestamp:?}"
                    ),
                    v => tracing::error!(
                        chain = chain_id,
                        "{what}: refused after signing ({v:?}): the next request commits first"
                    ),
                },
                Ok(Err(e)) => {
                    tracing::debug!(chain = chain_id, "{what}: not committed after signing: {e}")
                }
                Err(_) => tracing::warn!(
                    chain = chain_id,
                    "{what}: not committed within {SIGN_PATIENCE:?} after signing"
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    // The clock is paused: it moves only when every task waits on a timer,
    // so a wait that ends without one took no time at all.
    #[tokio::test(start_paused = true)]
    async fn an_entry_waits_its_delay_unless_a_request_hurries_it() {
        let hurry = Hurry::default();
        let took = |t: Instant| t.elapsed();

        // Not `later`: proposed at once.
        let t = Instant::now();
        in_turn(None, false, hurry.since()).await;
        assert_eq!(took(t), Duration::ZERO);

        // `later`, nobody waiting for it: the whole delay.
        let t = Instant::now();
        in_turn(None, true, hurry.since()).await;
        assert_eq!(took(t), BEHIND_DELAY);

        // Hurried after it was signed but before it listened: not lost.
        let t = Instant::now();
        let since = hurry.since();
        hurry.now();
        in_turn(None, true, since).await;
        assert_eq!(took(t), Duration::ZERO);

        // Hurried while it waits: ends then.
        let t = Instant::now();
        let waiting = tokio::spawn(in_turn(None, true, hurry.since()));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        hurry.now();
        waiting.await.unwrap();
        assert_eq!(took(t), Duration::ZERO);

        // Two in a row, the second behind the first: one call hurries both.
        let t = Instant::now();
        let first = tokio::spawn(in_turn(None, true, hurry.since()));
        let second = tokio::spawn(in_turn(Some(first), true, hurry.since()));
        tokio::task::yield_now().await;
        hurry.now();
        second.await.unwrap();
        assert_eq!(took(t), Duration::ZERO);

        // A call before an entry was signed does not hurry it.
        hurry.now();
        let t = Instant::now();
        in_turn(None, true, hurry.since()).await;
        assert_eq!(took(t), BEHIND_DELAY);
    }
}
