//! Signer mode as the simulation runs it: each host's sentry asks its own
//! keyraft process for every (height, round, step), now and then with
//! sign bytes of its own (conflicting requests for one HRS); a follower
//! forwards to the leader over [`crate::net`] (`Signer::forward`), and the
//! leader's path is `Signer::sign_here`'s: one request at a time, the real
//! `signer::before_commit` check against the applied watermark, then a
//! Raft commit of `Signed` whose verdict is the real ledger's, and only
//! then the signature.
//!
//! Owns: the sentries and the sign path's order. Must not: decide what may
//! be signed; `before_commit` and the ledger do.

use std::sync::Arc;
use std::time::Duration;

use keyraft::ledger::{Command, SignVerdict};
use keyraft::signer::{before_commit, Hrs};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::node::Process;
use crate::types::{self, NodeId};
use crate::world::World;

pub const CHAIN: &str = "sim-chain";

/// keyraft's `SIGN_PATIENCE` and `FORWARD_DEADLINE`, scaled as theirs.
const PATIENCE: Duration = Duration::from_millis(1500);
const FORWARD: Duration = Duration::from_millis(1000);

/// A host's sentry (a CometBFT node): it survives keyraft's restarts and
/// dies with its host. Every height, it asks for steps 1 to 3.
pub async fn sentry(world: Arc<World>, host: NodeId, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut asked = 0;
    loop {
        let height = world.height();
        if height > asked {
            asked = height;
            for step in 1..=3u8 {
                let hrs: Hrs = (height, 0, step);
                let digest = if rng.random_bool(world.conflict) {
                    format!("h{height}s{step}-from-{host}")
                } else {
                    format!("h{height}s{step}")
                };
                let w = world.clone();
                types::spawn(async move { ask(w, host, hrs, digest).await });
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request to the local process: signed here if it leads, else
/// forwarded, retried until `PATIENCE` runs out.
async fn ask(world: Arc<World>, host: NodeId, hrs: Hrs, digest: String) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let Some(h) = world.hosts.get(host) else {
            return;
        };
        if h.is_down() {
            return;
        }
        h.running().await;
        let Some(p) = h.process() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let done = match p.leader() {
            Some(id) if id == p.id => sign_here(&world, &p, hrs, &digest, deadline).await,
            Some(id) => {
                let (w, d) = (world.clone(), digest.clone());
                let ttl = FORWARD.min(deadline.saturating_duration_since(Instant::now()));
                let r = p
                    .net
                    .exchange(p.id, p.inc, id, ttl, move |leader| {
                        let (w, d) = (w.clone(), d.clone());
                        Box::pin(async move { serve(&w, &leader, hrs, &d).await })
                    })
                    .await;
                matches!(r, Ok(Retry::Done))
            }
            None => false,
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Retry {
    Done,
    Again,
}

/// The leader's end of a forward (`Signer::serve_forwarded`).
async fn serve(world: &World, p: &Process, hrs: Hrs, digest: &str) -> Retry {
    if p.leader() != Some(p.id) {
        return Retry::Again;
    }
    let deadline = Instant::now() + FORWARD;
    if sign_here(world, p, hrs, digest, deadline).await {
        Retry::Done
    } else {
        Retry::Again
    }
}

/// `Signer::sign_here`. True when the request is answered for good
/// (signed, or refused for a reason a retry cannot change).
async fn sign_here(world: &World, p: &Process, hrs: Hrs, digest: &str, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let Ok(_one) = tokio::time::timeout(left, p.sign_lock.lock()).await else {
        return false;
    };
    let applied = p.cluster.borrow().watermark(CHAIN).cloned();
    match before_commit(applied.as_ref(), CHAIN, hrs, digest, (hrs.0 as i64, 0)) {
        Err(_) => return true,
        Ok(Some(_)) => {
            world.signature(p.id, hrs, digest);
            return true;
        }
        Ok(None) => {}
    }
    let cmd = Command::Signed {
        chain_id: CHAIN.to_string(),
        height: hrs.0,
        round: hrs.1,
        step: hrs.2,
        digest: digest.to_string(),
        timestamp: (hrs.0 as i64, 0),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, p.raft.client_write(cmd)).await {
        Ok(Ok(r)) => match r.data.sign {
            Some(SignVerdict::Sign { .. }) => {
                world.signature(p.id, hrs, digest);
                true
            }
            Some(_) => true,
            None => false,
        },
        _ => false,
    }
}
