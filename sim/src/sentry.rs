//! Each host's sentry (a CometBFT node) as the simulation runs it: it
//! asks its own keyraft process, through `Signer::handle`, for a
//! proposal, a prevote and a precommit at every height (now and then in a
//! second round too, each sentry with its own timestamps), now and then
//! for a block of its own (conflicting requests for one HRS). What comes
//! back signed is judged where it leaves the cluster: the signature must
//! verify, and its sign bytes are the oracle's record.
//!
//! Owns: the sentries and the judging of what they get back. Must not:
//! decide what may be signed; keyraft's signer and ledger do.

use std::sync::Arc;
use std::time::Duration;

use cometbft_proto::google::protobuf::Timestamp;
use cometbft_proto::v0_38::types::{BlockId, PartSetHeader, Proposal, Vote};
use ed25519_dalek::{Signer, SigningKey};
use keyraft::config::ProtocolVersion;
use keyraft::signer::protocol::{Extension, Reply};
use keyraft::signer::Signable;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::host::{while_thawed, Hosts};
use crate::judge::Judge;
use crate::node::Process;
use crate::signer::{known_key, CHAIN, SEED};
use crate::types::{self, NodeId};

/// How long a sentry keeps asking for one HRS while its keyraft process
/// is down or restarting (CometBFT's read timeout).
const PATIENCE: Duration = Duration::from_millis(3000);

/// What every sentry of a run shares: the hosts, the judge, and how often
/// a sentry asks for a block of its own.
pub struct Sentries {
    pub hosts: Arc<Hosts<Process>>,
    pub judge: Arc<Judge>,
    pub conflict: f64,
}

/// A host's sentry (a CometBFT node): it survives keyraft's restarts and
/// dies with its host. Every height, it asks for steps 1 to 3.
pub async fn sentry(all: Arc<Sentries>, host: NodeId, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut asked = 0;
    loop {
        let height = all.judge.height();
        if height > asked {
            asked = height;
            // Now and then a height takes a second round, as this sentry
            // sees it: steps of round 1, below what a precommit of round
            // 0 reserved into the next height.
            let rounds = if rng.random_bool(0.1) { 2 } else { 1 };
            for round in 0..rounds {
                for step in 1..=3u8 {
                    let own = rng.random_bool(all.conflict).then_some(host);
                    let w = all.clone();
                    let what = request(height, round, step, own, host);
                    types::spawn(async move { ask(w, host, what).await });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `host`'s sentry asks to sign at `height`, `round`, `step`: the
/// chain's block, or with `own` a block only that sentry proposes. Each
/// sentry stamps its own time, so a repeat must carry the first one.
fn request(height: u64, round: u32, step: u8, own: Option<NodeId>, host: NodeId) -> Signable {
    let mut hash = vec![0; 32];
    hash[..8].copy_from_slice(&height.to_be_bytes());
    hash[8] = own.map_or(0, |id| id as u8 + 1);
    let block_id = Some(BlockId {
        hash,
        part_set_header: Some(PartSetHeader {
            total: 1,
            hash: vec![1; 32],
        }),
    });
    // A timestamp of the height's own: deterministic, later each height,
    // and each sentry's own.
    let timestamp = Some(Timestamp {
        seconds: 1_700_000_000 + height as i64,
        nanos: host as i32,
    });
    if step == 1 {
        return Signable::Proposal(Proposal {
            r#type: 32,
            height: height as i64,
            round: round as i32,
            pol_round: -1,
            block_id,
            timestamp,
            signature: Vec::new(),
        });
    }
    let vote = Vote {
        r#type: if step == 2 { 1 } else { 2 },
        height: height as i64,
        round: round as i32,
        block_id,
        timestamp,
        validator_address: known_key().address().to_vec(),
        validator_index: 0,
        signature: Vec::new(),
        extension: Vec::new(),
        extension_signature: Vec::new(),
    };
    Signable::Vote(vote, Extension::Sign)
}

/// `host`'s sentry asks for `hrs` again, with a block no other sentry
/// proposes (as one resumed from a memory image, or a buggy one, does).
pub async fn ask_other(all: Arc<Sentries>, host: NodeId, hrs: (u64, u32, u8)) {
    const OTHER: NodeId = 0xEE;
    let (height, round, step) = hrs;
    ask(all, host, request(height, round, step, Some(OTHER), host)).await;
}

/// One request to the sentry's own keyraft process, as CometBFT makes it:
/// sent once, answered once; asked again only if the process died (or
/// its host froze past the patience) before answering.
async fn ask(all: Arc<Sentries>, host: NodeId, what: Signable) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let Some(h) = all.hosts.get(host) else {
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
        let Some(signer) = p.signer.clone() else {
            return;
        };
        // A reload removed the chain: its node waits for it.
        let Some(chain) = signer.chains().first().cloned() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The request runs inside the process: it stops when the process
        // dies and is not polled while it is frozen.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = keyraft::signer::protocol::request_for(&what, CHAIN);
        p.spawn(while_thawed(&h, async move {
            let reply = signer.handle(&chain, ProtocolVersion::V0_38, msg).await;
            let _ = tx.send(reply);
        }));
        if let Ok(reply) = rx.await {
            judge(&all.judge, host, reply);
            return;
        }
    }
}

/// A reply leaving the cluster: a signed message must verify with the key
/// and is the oracle's record of what was signed; a refusal is final.
fn judge(judge: &Judge, host: NodeId, reply: Reply) {
    let signed = match reply {
        Reply::Vote(Ok(v)) => Some(Signable::Vote(v, Extension::Sign)),
        Reply::Proposal(Ok(p)) => Some(Signable::Proposal(p)),
        _ => None,
    };
    let Some(signed) = signed else {
        return;
    };
    let (Ok(hrs), Ok(digest), Ok(bytes)) =
        (signed.hrs(), signed.digest(CHAIN), signed.sign_bytes(CHAIN))
    else {
        judge.bad_signature(host, "a signed reply whose sign bytes cannot be computed");
        return;
    };
    let (_, signature, _) = signed.signed_parts();
    if !valid(&bytes, &signature) {
        judge.bad_signature(host, &format!("{hrs:?}: a signature that does not verify"));
        return;
    }
    judge.signature(host, hrs, &digest, signed.timestamp());
}

/// Whether `signature` is the key's signature of `bytes`. ed25519 signs
/// deterministically: the key's own signature of the bytes is the only one
/// keyraft may return. Made here with ed25519-dalek itself, not keyraft's
/// key (cheaper than a verification, and independent of keyraft); the
/// pairs judged lately are remembered, for every sentry that asks for an
/// HRS gets the same signature back.
fn valid(bytes: &[u8], signature: &[u8]) -> bool {
    const REMEMBERED: usize = 32;
    static JUDGES: std::sync::LazyLock<SigningKey> =
        std::sync::LazyLock::new(|| SigningKey::from_bytes(&SEED));
    thread_local! {
        static LATELY: std::cell::RefCell<std::collections::VecDeque<(Vec<u8>, Vec<u8>)>> =
            Default::default();
    }
    let seen = |l: &std::collections::VecDeque<(Vec<u8>, Vec<u8>)>| {
        l.iter().any(|(b, s)| b == bytes && s == signature)
    };
    if LATELY.with_borrow(seen) {
        return true;
    }
    if JUDGES.sign(bytes).to_bytes().as_slice() != signature {
        return false;
    }
    LATELY.with_borrow_mut(|l| {
        if l.len() == REMEMBERED {
            l.pop_front();
        }
        l.push_back((bytes.to_vec(), signature.to_vec()));
    });
    true
}
