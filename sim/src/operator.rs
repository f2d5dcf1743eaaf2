//! The operator's commands as the simulation sends them: keyraft's own
//! `admin::Commands` on each process's `Core` (pause, resume, register,
//! `members remove` and `members add`, with their rules: the leader hands
//! over before its own removal, a holder of the key is not removed, a
//! removal needs a live majority of the voters left, a new member is a
//! learner until it caught up), relayed to the leader over [`crate::net`]
//! ([`SimRelay`]) where a real node uses the peer port. The leader's end
//! is keyraft's own `Commands::serve`.
//!
//! Owns: the relay's transport, and the operator ([`World::operator`]):
//! a command asked of a running validator host, then of the next one,
//! until done or 8 s passed. Must not: decide anything about a command;
//! keyraft's `Commands` does.

use std::sync::{Arc, Weak};
use std::time::Duration;

use keyraft::admin::{Commands, Relay};
use keyraft::pb::{self, cluster_command::Kind};
use tokio::time::Instant;
use tonic::Status;

use crate::net::{Boxed, Net};
use crate::node::Process;
use crate::types::NodeId;
use crate::world::World;

pub type SimCommands = Commands<keyraft::raft::store::StateMachine, SimRelay>;

/// Where the simulation says member `id` listens (its network routes by
/// id; keyraft wants HOST:PORT).
pub fn addr(id: NodeId) -> String {
    format!("node-{id}:7700")
}

/// A command relayed to the leader over the simulated network.
pub struct SimRelay {
    pub net: Net,
    pub from: NodeId,
    pub inc: u64,
    pub world: Weak<World>,
}

/// The relay's future is boxed (`Boxed`, not an `async fn`): the leader's
/// end may relay again (the removal of a leader goes to its successor),
/// and a boxed future's type does not contain itself.
#[allow(refining_impl_trait)]
impl Relay for SimRelay {
    fn relay(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
        limit: Duration,
    ) -> Boxed<Result<String, Status>> {
        let (net, from, inc) = (self.net.clone(), self.from, self.inc);
        Box::pin(async move {
            let answer = net
                .exchange(from, inc, leader, limit, move |p: Arc<Process>| {
                    let cmd = cmd.clone();
                    // Every simulated host is a validator host.
                    Box::pin(async move { p.commands.serve(from, Ok(()), cmd).await })
                })
                .await;
            answer
                .map_err(|e| Status::unavailable(format!("forwarding to leader {leader}: {e}")))?
        })
    }

    fn learned_addr(&self, _id: NodeId, _addr: &str) {}

    fn change_begins(&self, _change: &str) {
        if let Some(w) = self.world.upgrade() {
            w.change_begins();
        }
    }
}

impl World {
    /// The operator runs `kind` (`keyraft pause`, `members remove 2`, ...)
    /// on the first validator host that runs, through keyraft's own
    /// `Commands::execute_for_operator`; on failure, on the next host, for
    /// up to 8 s. True once a host said it was done.
    pub async fn operator(&self, kind: Kind) -> bool {
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            let up: Vec<Arc<Process>> = self
                .hosts
                .all()
                .filter(|h| h.keyraft_runs())
                .filter_map(|h| h.process())
                .collect();
            if let Some(p) = (!up.is_empty()).then(|| up[attempt % up.len()].clone()) {
                let cmd = pb::ClusterCommand {
                    kind: Some(kind.clone()),
                    mode: None,
                };
                let tried = p.commands.execute_for_operator(cmd);
                // The CLI's own deadline on one try.
                match tokio::time::timeout_at(deadline, tried).await {
                    Ok(Ok(said)) => {
                        self.note(format!("operator on node {}: {said}", p.id));
                        return true;
                    }
                    Ok(Err(e)) => self.note(format!("operator on node {}: {}", p.id, e.message())),
                    Err(_) => return false,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}
