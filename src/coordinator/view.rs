//! What this node sees now, as [`super::policy`]'s [`View`]: assembled
//! from openraft's metrics, the peers' gossip and the applied ledger, and
//! whether this host runs the cluster's mode. Split from [`super`] by
//! topic: reading, not deciding.

use openraft::ServerState;
use tokio::time::Instant;

use super::host::Env;
use super::policy::{self, View};
use super::Coordinator;
use crate::ledger::{Mode, NodeId};

impl<E: Env> Coordinator<E> {
    /// What this node sees now, for [`policy`].
    pub(super) fn view(&self) -> View {
        self.view_and_mode().0
    }

    /// [`Self::view`], and why this host runs another mode than the
    /// cluster, if it does ([`policy::mode_conflict`]): the view's
    /// `other_mode` is whether there is a reason.
    pub(super) fn view_and_mode(&self) -> (View, Option<String>) {
        let (voters, acks, unapplied_entries, is_leader, leader) = self.sh.with_raft_metrics(|m| {
            (
                m.membership_config
                    .membership()
                    .voter_ids()
                    .collect::<Vec<_>>(),
                m.heartbeat.is_some().then(|| crate::node::ack_ages(m)),
                m.last_log_index > m.last_applied.map(|l| l.index),
                m.state == ServerState::Leader,
                m.current_leader,
            )
        });
        // Voters that run now (their gossip is fresh) but have not
        // registered: this host cannot know yet that they do not sign. One
        // that is down signs nothing and holds nothing back.
        let stale = self.sh.timing().gossip_interval * 3;
        // Read in place, all under one lock: a view is made at every
        // event, and the statuses are large. The members are read first,
        // not under it.
        let roster = self.sh.roster();
        let members = if roster.keys.is_empty() {
            Vec::new()
        } else {
            self.sh.peer_ids()
        };
        let (running, peers, key_outvoted) = self.sh.view.with_peers(|seen| {
            let running: Vec<NodeId> = seen
                .iter()
                .filter(|(_, s)| s.at.elapsed() < stale)
                .map(|(id, _)| *id)
                .collect();
            let peers = seen
                .iter()
                .map(|(id, s)| {
                    let v = s.status.validator.as_ref();
                    let peer = policy::Peer {
                        age: s.at.elapsed(),
                        witness: s.status.role != "validator",
                        ready: v.is_some_and(|v| v.running && v.synced),
                        eligible: s.status.eligible,
                        height: v.map_or(0, |v| v.height),
                        upgrade: s.status.upgrade.as_ref().map(Into::into),
                    };
                    (*id, peer)
                })
                .collect();
            // Compared in place, not copied out: fifty chains a member.
            let keys = crate::signer::keys::of_seen(seen, &members);
            let outvoted = crate::signer::keys::outvoted(&roster.keys, &keys).is_some();
            (running, peers, outvoted)
        });
        // Each read of the cluster's state is its own statement: a borrow
        // held while a second is taken waits forever on a queued writer.
        let applied_paused = self.cluster_rx.borrow().paused;
        // In signer mode every signature writes entries, so a follower
        // nearly always holds some not yet applied: there the pause holds
        // as applied, or it would not hold at all.
        let unapplied = self.sh.cfg.signer.is_none() && unapplied_entries;
        let paused = policy::pause_holds(applied_paused, is_leader, unapplied);
        let other_mode = self.other_mode_among(&voters);
        let unregistered = {
            let cluster = self.cluster_rx.borrow();
            voters
                .iter()
                .any(|v| running.contains(v) && !cluster.registered.contains(v))
        };
        let mut view = View {
            id: self.sh.cfg.id,
            timing: self.sh.timing(),
            witness: self.sh.cfg.witness,
            signer_mode: self.sh.cfg.signer.is_some(),
            health: self.custody.health(),
            paused,
            standing_down: self.stand_down_until.is_some_and(|t| Instant::now() < t),
            voters: voters.into_iter().collect(),
            leader,
            is_leader,
            peers,
            acks,
            key_outvoted,
            key_failing: !self
                .sh
                .key_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty(),
            other_mode: other_mode.is_some(),
            unregistered,
            upgrade: self.sh.upgrade.borrow().clone(),
            halt: None,
        };
        view.halt = policy::halt_seen(&view, self.halt_latch.as_ref());
        (view, other_mode)
    }

    /// Why this host runs another mode than the cluster, if it does, with
    /// the current `voters`.
    fn other_mode_among(&self, voters: &[NodeId]) -> Option<String> {
        let cluster = self.cluster_rx.borrow();
        let chains: Vec<&str> = cluster.watermarks().keys().map(String::as_str).collect();
        let signers: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|id| *id != self.sh.cfg.id)
            // A mode this keyraft does not know may sign too.
            .filter(|id| matches!(cluster.modes.get(id), Some(Mode::Signer | Mode::Other)))
            .collect();
        policy::mode_conflict(
            self.sh.cfg.signer.is_some(),
            self.sh.cfg.witness,
            &chains,
            &signers,
        )
    }
}
