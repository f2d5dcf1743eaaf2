//! One shutdown signal, threaded through every task that must stop: the
//! coordinator (which releases the key first), the privval connections,
//! and the servers (which drain after Raft has stopped).
//!
//! Owns: the [`Trigger`] and its [`Shutdown`] listeners. Must not: decide
//! when to stop; `keyraft run` fires on SIGINT/SIGTERM, the server's
//! teardown fires the servers' own trigger once the coordinator is done.

use tokio::sync::watch;

/// Fires a shutdown; every [`Shutdown`] made from it hears it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Listens for a shutdown; cheap to clone, one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and a first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every listener to stop (idempotent).
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Resolves once the trigger fired (or was dropped without firing,
    /// which only happens when its owner is gone).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_hears_one_trigger() {
        let (trigger, mut a) = channel();
        let mut b = trigger.subscribe();
        assert!(!a.is_requested());
        trigger.fire();
        trigger.fire();
        a.requested().await;
        b.requested().await;
        assert!(a.is_requested() && b.is_requested());
    }
}
