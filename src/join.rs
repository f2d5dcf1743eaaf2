//! Joining the cluster (docs/design.md, step 9): what a node asks its peers
//! before it takes part (does its data dir hold at least what they saw of
//! it?), and the one-time registration that makes a later empty start need
//! `--rejoin`.
//!
//! The decision reaches its peers through [`Ask`]: the peer port on a real
//! node ([`Peers`]), the simulated network in the simulator (`sim/`),
//! which so runs this very rule at every restart.
//!
//! [`register`] runs on a `Core` and `admin::Commands`, so the simulator
//! runs it too.
//!
//! Owns: the bootstrap decision (carry on, initialise, join, rejoin, or
//! refuse) and the `Register` command. Must not: start servers or touch
//! the validator; [`crate::server`] calls it during start-up.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;

use crate::admin::{self, Commands, Relay};
use crate::config::Config;
use crate::ledger::NodeId;
use crate::node::{Core, Shared};
use crate::pb;
use crate::raft::memory::{self, Holds, Remembered};
use crate::raft::peers::Peers;
use crate::raft::TypeConfig;

/// How a starting node asks a peer what it saw of it.
pub trait Ask: Send + Sync {
    /// Node `id`'s answer to a Hello with `holds`, if it came within a
    /// second.
    fn hello(
        &self,
        id: NodeId,
        holds: Holds,
    ) -> impl Future<Output = Option<pb::HelloReply>> + Send;
}

impl Ask for Peers {
    async fn hello(&self, id: NodeId, holds: Holds) -> Option<pb::HelloReply> {
        let mut c = self.gossip_client(id).ok()?;
        let req = self.request(
            pb::HelloRequest {
                id: self.self_id(),
                holds: Some(pb::Holds {
                    term: holds.term,
                    last_index: holds.last_index,
                }),
            },
            Duration::from_secs(1),
        );
        self.call(id, Duration::from_secs(1), c.hello(req))
            .await
            .ok()
    }
}

/// A start refused for safety (exit code 2): node `peer` knows this node
/// `id` as more than its data dir `dir` holds.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("data dir {dir} is empty, but node {peer} knows node {id} as a member that ran before ({why}; cluster term {term}): a voter that lost its data could vote twice in one term; start it with --rejoin to join as a new learner")]
    Forgotten {
        dir: String,
        peer: NodeId,
        id: NodeId,
        why: Known,
        term: u64,
    },
    #[error("data dir {dir} is behind what node {peer} saw of node {id} ({why}): it was restored from an older copy or lost writes, and has forgotten votes and entries (it could vote twice in one term); move it away and start with --rejoin to join as a new learner")]
    Restored {
        dir: String,
        peer: NodeId,
        id: NodeId,
        why: Known,
    },
}

/// What a peer knows of this node that its data dir does not hold.
#[derive(Debug, thiserror::Error)]
pub enum Known {
    #[error("{0}")]
    Behind(memory::Behind),
    #[error("it registered")]
    Registered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The data dir holds Raft state: carry on.
    Existing,
    /// New, and no member knows this node from before: initialise with the
    /// configured members (identical on every node, as openraft allows; a
    /// running cluster's leader replaces this log with its own).
    Initialize,
    /// As `Initialize`, but a peer answered that the cluster exists already:
    /// its leader's log will replace this one.
    Join,
    /// Join as a learner, then become a voter again (`--rejoin`).
    Rejoin,
}

/// What `peer`'s answer to a Hello says it saw of the asking node.
pub fn seen_by(peer: NodeId, r: &pb::HelloReply) -> Remembered {
    let refused = (!r.refused.is_empty()).then(|| r.refused.clone());
    Remembered {
        term: r.seen_term,
        committed: r.seen_committed,
        refused_by: refused.as_ref().map(|_| peer),
        refused,
        ..Remembered::default()
    }
}

/// Step 9 (docs/design.md): before it takes any Raft message, a node asks
/// its peers what they saw of it. A data dir behind what any of them saw
/// (restored from an older copy, or wiped) is refused: it has forgotten
/// votes it cast and entries it acknowledged. A data dir with state needs
/// answers from a majority of the members (itself included); an empty one
/// joining a cluster that exists needs every other member's, since the
/// one that saw it may be any of them. No answers: it waits, never guesses.
pub async fn bootstrap(
    cfg: &Config,
    ask: &impl Ask,
    fresh: bool,
    holds: Holds,
) -> Result<Bootstrap, Refused> {
    if !fresh && cfg.rejoin {
        tracing::warn!("--rejoin ignored: the data dir holds Raft state");
    }
    if fresh && cfg.rejoin {
        tracing::info!("empty data dir and --rejoin: joining as a new learner");
        return Ok(Bootstrap::Rejoin);
    }
    let members = cfg.members().len();
    let peers = cfg.peers.len();
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(500);
    loop {
        let answers = ask_all(cfg, ask, holds).await;
        for (peer, r) in &answers {
            let seen = seen_by(*peer, r);
            if let Some(gap) = memory::behind(&seen, holds) {
                return Err(refusal(cfg, fresh, *peer, r, Known::Behind(gap)));
            }
            if fresh && r.registered {
                return Err(refusal(cfg, fresh, *peer, r, Known::Registered));
            }
        }
        // A peer on an empty data dir (wiped, or new) remembers nothing of
        // anyone: its answer vouches for no data dir. Only a new cluster's
        // first start counts such answers.
        let witnesses = answers
            .iter()
            .filter(|(_, r)| fresh || r.initialized)
            .count();
        let majority = (witnesses + 1) * 2 > members;
        let exists = answers.iter().any(|(_, r)| r.initialized);
        let waiting_for = match (fresh, exists) {
            (false, _) if majority => return Ok(Bootstrap::Existing),
            (true, true) if answers.len() == peers => return Ok(Bootstrap::Join),
            (true, false) if majority => return Ok(Bootstrap::Initialize),
            (true, true) => "every other member (one of them may have seen this node before)",
            _ => "a majority of the members",
        };
        if waited.as_millis() % 5000 == 0 {
            tracing::info!(
                "{}: waiting for {waiting_for} to answer before taking part ({} of {peers} answered)",
                if fresh { "empty data dir" } else { "checking this data dir with its peers" },
                answers.len()
            );
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
}

/// Every peer's answer to Hello that came within a second.
async fn ask_all(cfg: &Config, ask: &impl Ask, holds: Holds) -> Vec<(NodeId, pb::HelloReply)> {
    let asks = cfg
        .peers
        .keys()
        .map(|&id| async move { ask.hello(id, holds).await.map(|r| (id, r)) });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Asks node `id` again with what this node's data dir held at its start:
/// `id` still refuses an earlier start of this node (it did not answer
/// this start's Hello), and takes the refusal back if this start holds what
/// it saw.
pub async fn hello_again(sh: Arc<Shared>, id: NodeId) {
    let _ = sh.peers.hello(id, sh.start_holds).await;
}

/// The one line a refused start ends with (exit code 2).
fn refusal(cfg: &Config, fresh: bool, peer: NodeId, r: &pb::HelloReply, why: Known) -> Refused {
    let (dir, id) = (cfg.data_dir.display().to_string(), cfg.id);
    if fresh {
        let term = r.term;
        Refused::Forgotten {
            dir,
            peer,
            id,
            why,
            term,
        }
    } else {
        Refused::Restored { dir, peer, id, why }
    }
}

/// Records, once, that this node ran with durable state (see step 9), and
/// the mode it runs in (again when that changed): asks the leader, through
/// `commands`, once a voter that knows a leader.
pub async fn register<SM: RaftStateMachine<TypeConfig>, R: Relay>(
    core: &Core<SM>,
    commands: &Commands<SM, R>,
) {
    // Soon: a validator-mode leader activates only once every voter that
    // runs has registered. Registered but without this mode (a leader from
    // before modes were recorded drops it), less and less often.
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::time::sleep(pause).await;
        let mode = core.cfg.mode();
        let (registered, done) = {
            let c = core.cluster.borrow();
            let registered = c.registered.contains(&core.cfg.id);
            (
                registered,
                registered && c.modes.get(&core.cfg.id) == Some(&mode),
            )
        };
        if registered {
            pause = (pause * 2).min(Duration::from_secs(30));
        }
        if done {
            tracing::info!("registered: a later start with an empty data dir will need --rejoin");
            return;
        }
        let m = core.raft_metrics();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == core.cfg.id);
        if !voter || m.current_leader.is_none() {
            continue;
        }
        let cmd = pb::ClusterCommand {
            kind: Some(pb::cluster_command::Kind::Register(core.cfg.id)),
            mode: Some(admin::command::pb_mode(mode)),
        };
        if let Err(e) = commands.execute(cmd, admin::NODE_REQUEST_DEADLINE).await {
            tracing::debug!("registering: {}", e.message());
        }
    }
}
