//! Joining the cluster (docs/design.md, step 9): what a node with an empty
//! data dir asks its peers before it takes part, and the one-time
//! registration that makes a later empty start need `--rejoin`.
//!
//! Owns: the bootstrap decision (carry on, initialise, join, rejoin, or
//! refuse) and the `Register` command. Must not: start servers or touch
//! the validator; [`crate::server`] calls it during start-up.

use std::sync::Arc;
use std::time::Duration;

use crate::admin;
use crate::ledger::NodeId;
use crate::node::Shared;
use crate::pb;

/// A start refused for safety (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

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

/// Step 9 (docs/design.md): a node with an empty data dir asks its peers
/// before it takes part, so that a wiped voter cannot vote twice in a term.
pub async fn bootstrap(sh: &Arc<Shared>, fresh: bool) -> Result<Bootstrap, Refused> {
    if !fresh {
        if sh.cfg.rejoin {
            tracing::warn!("--rejoin ignored: the data dir holds Raft state");
        }
        return Ok(Bootstrap::Existing);
    }
    if sh.cfg.rejoin {
        tracing::info!("empty data dir and --rejoin: joining as a new learner");
        return Ok(Bootstrap::Rejoin);
    }
    let members = sh.cfg.members().len();
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(500);
    loop {
        let asks = sh.cfg.peers.keys().map(|&id| {
            let sh = sh.clone();
            async move {
                let mut c = sh.peers.gossip_client(id).ok()?;
                let req = sh
                    .peers
                    .request(pb::HelloRequest { id: sh.cfg.id }, Duration::from_secs(1));
                sh.peers
                    .call(id, Duration::from_secs(1), c.hello(req))
                    .await
                    .ok()
                    .map(|r| (id, r))
            }
        });
        let answers: Vec<(NodeId, pb::HelloReply)> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        if let Some((peer, r)) = answers.iter().find(|(_, r)| r.registered) {
            return Err(Refused(format!(
                "data dir {} is empty, but node {peer} knows node {} as a member that ran before (cluster term {}): a voter that lost its data could vote twice in one term; start it with --rejoin to join as a new learner",
                sh.cfg.data_dir.display(),
                sh.cfg.id,
                r.term
            )));
        }
        if answers.iter().any(|(_, r)| r.initialized) {
            return Ok(Bootstrap::Join);
        }
        if (answers.len() + 1) * 2 > members {
            return Ok(Bootstrap::Initialize);
        }
        if waited.as_millis() % 5000 == 0 {
            tracing::info!(
                "empty data dir: waiting for a majority of the {members} members to answer before forming the cluster ({} answered)",
                answers.len()
            );
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
}

/// Records, once, that this node ran with durable state (see step 9).
pub async fn register(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if sh.cluster.borrow().registered.contains(&sh.cfg.id) {
            tracing::info!("registered: a later start with an empty data dir will need --rejoin");
            return;
        }
        let m = sh.raft_metrics();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == sh.cfg.id);
        if !voter || m.current_leader.is_none() {
            continue;
        }
        let cmd = pb::ClusterCommand {
            kind: Some(pb::cluster_command::Kind::Register(sh.cfg.id)),
        };
        if let Err(e) = admin::execute(&sh, cmd, admin::NODE_REQUEST_DEADLINE).await {
            tracing::debug!("registering: {}", e.message());
        }
    }
}
