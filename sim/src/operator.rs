//! The operator as the simulation has one: keyraft's own operator
//! commands (`admin::Commands`: pause, resume, register, `members remove`
//! and `members add`, with their rules: the leader hands over before its
//! own removal, a holder of the key is not removed, a removal needs a
//! live majority of the voters left, a new member is a learner until it
//! caught up), asked of a running validator host and relayed by it to the
//! leader (`ports::SimRelay`), whose end is keyraft's own
//! `Commands::serve`.
//!
//! Owns: the operator's persistence ([`operate`]): a command asked of a
//! running validator host, then of the next one, until done or 8 s passed.
//! Must not: decide anything about a command; keyraft's `Commands` does.

use std::sync::Arc;
use std::time::Duration;

use keyraft::pb::{self, cluster_command::Kind};
use tokio::time::Instant;

use crate::host::Hosts;
use crate::judge::Judge;
use crate::node::Process;

/// The operator runs `kind` (`keyraft pause`, `members remove 2`, ...)
/// on the first validator host that runs, through keyraft's own
/// `Commands::execute_for_operator`; on failure, on the next host, for
/// up to 8 s. True once a host said it was done.
pub async fn operate(hosts: &Hosts<Process>, judge: &Judge, kind: Kind) -> bool {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut attempt = 0;
    while Instant::now() < deadline {
        attempt += 1;
        let up: Vec<Arc<Process>> = hosts
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
                    judge.note(format!("operator on node {}: {said}", p.id));
                    return true;
                }
                Ok(Err(e)) => judge.note(format!("operator on node {}: {}", p.id, e.message())),
                Err(_) => return false,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
