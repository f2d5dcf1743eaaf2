//! The Raft layer: openraft's type configuration, the replicated cluster
//! state, durable storage ([`store`]: the log in its own file, `logfile`,
//! the newest entries also in memory, `recent`, written by the `flush`
//! thread; the applied state in `machine`), openraft's network over a transport
//! ([`network`]), the gRPC one ([`peers`], the client shared by every
//! peer call) and the Raft service ([`server`]).
//!
//! Owns: replication only: how [`crate::ledger`]'s commands travel, are
//! stored and are applied, and how openraft is configured from keyraft's
//! timings. What is replicated and its rules live in the ledger; the
//! election bookkeeping in [`gate`]. Must not: act on the replicated state;
//! the coordinator and the signer read it and decide.

mod codec;
pub mod disk;
mod flush;
mod from_sled;
pub mod gate;
mod layout;
mod logfile;
mod machine;
pub mod memory;
pub mod network;
pub mod peers;
mod recent;
pub mod server;
pub mod store;
mod values;

use openraft::BasicNode;

use crate::config::Timing;
use crate::ledger::{Command, NodeId, Reply};
pub use flush::Synced;
pub use gate::Gate;

/// openraft's runtime: tokio's. In the simulator's build (sim/) its random
/// draws come from the seed, so that sim/ runs keyraft's own Raft service
/// and client rules on this very type configuration.
#[cfg(not(keyraft_sim))]
type Runtime = openraft::TokioRuntime;
#[cfg(keyraft_sim)]
type Runtime = openraft_rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>;

openraft::declare_raft_types!(
    /// keyraft's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
        AsyncRuntime = Runtime,
);

/// Spawns `f` on openraft's runtime: tokio's, and in the simulator's
/// build the one whose random draws come from the seed (a task spawned
/// with plain `tokio::spawn` there draws from nothing, and panics).
pub fn spawn<F>(f: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    drop(<Runtime as openraft::AsyncRuntime>::spawn(f));
}

pub type Raft = openraft::Raft<TypeConfig, store::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Membership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type Metrics = openraft::RaftMetrics<TypeConfig>;

/// openraft's configuration for keyraft's timings.
pub fn openraft_config(t: &Timing) -> Result<openraft::Config, openraft::ConfigError> {
    let (election_min, election_max) = t.raft_elections();
    openraft::Config {
        cluster_name: "keyraft".into(),
        // With the tick off this only bounds each heartbeat's round trip
        // (keyraft's timer sends them, at the interval in force).
        heartbeat_interval: t.heartbeat_deadline().as_millis() as u64,
        election_timeout_min: election_min.as_millis() as u64,
        election_timeout_max: election_max.as_millis() as u64,
        enable_pre_vote: Some(true),
        // CheckQuorum's quiet phase: a leader without a quorum ack for the
        // lease stops heartbeating (for the shortest period openraft
        // allows), so that a follower it still reaches is not kept from
        // joining the quorum that elects a successor.
        quorum_loss_probe_interval: Some(election_max.as_millis() as u64 * 2),
        // openraft's timer never starts an election: the coordinator does,
        // once this node may campaign (eligible, up for
        // `election_timeout_max`) and it is its turn (see `maybe_campaign`).
        // A random timer racing it split votes between standbys.
        enable_elect: false,
        // A restarted leader must win a fresh election before it may act.
        enable_leader_restore: Some(false),
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        purge_batch_size: 64,
        backoff: "100ms 200ms 400ms".into(),
        // A voter that lost its data dir comes back with a shorter log; keyraft
        // refuses it until it rejoins, and the leader must tolerate the reversion.
        allow_log_reversion: Some(true),
        // A removed leader must not hand leadership on by itself: openraft
        // transfers it without a `Released`, and voters granted the transfer
        // inside the old leader's lease. keyraft never removes the leader
        // (it hands over first, step 7), so this is never needed.
        removed_leader_step_down: openraft::StepDownPolicy::Never,
        // No tick: `heartbeat_while_leading` sends the leader's heartbeats
        // (a tick would do nothing else with `enable_elect` off).
        enable_tick: false,
        ..Default::default()
    }
    .validate()
}

/// Waits until openraft's core has stopped for good (a fatal storage
/// error such as a full disk, a panic, a broken invariant), says why in one
/// line and sends it on `died`. A stopped core never starts again in this
/// process: the server then stops the coordinator (which fences the
/// validator) and exits with code 8, so that the process manager restarts
/// keyraft and the start-up checks run again.
pub async fn core_stopped(raft: Raft, died: tokio::sync::watch::Sender<Option<String>>) {
    use openraft::async_runtime::watch::WatchReceiver;
    let mut metrics = raft.metrics();
    let why = loop {
        match &metrics.borrow_watched().running_state {
            // Asked for (`Raft::shutdown`): a stop, not a death.
            Err(openraft::errors::Fatal::Stopped) => return,
            Err(fatal) => break fatal.to_string(),
            Ok(()) => {}
        }
        if metrics.changed().await.is_err() {
            break "its task ended without saying why (a panic)".to_string();
        }
    };
    tracing::error!(
        "the Raft core stopped ({why}): fencing the validator, then exiting with code 8 for the process manager to restart keyraft"
    );
    let _ = died.send(Some(why));
}

/// The leader's heartbeats, from a timer of keyraft's own instead of
/// openraft's tick. The tick (every 13/64 of a heartbeat: 100 wakeups a
/// second with the lan profile, on every node) only sends the leader's
/// heartbeats here, since elections are the coordinator's (`enable_elect`
/// is off); so it stays off (`enable_tick: false`), and while this node
/// leads this sends one heartbeat per `interval` through openraft's
/// trigger, which takes the same path as the tick's: skipped during a
/// leadership transfer and in CheckQuorum's quiet phase. The trigger is
/// not stopped by openraft's `heartbeat(false)`, so the coordinator's
/// "go quiet" (a leader that may not validate) is read from the gate
/// before each one. A follower, candidate or learner sleeps until a
/// message comes. If this timer is late the heartbeats are, the quorum
/// acks are, and the lease lapses: late fails safe.
///
/// It also keeps [`Gate::own_durable`]: while leading, the last log index
/// this node's own store has fsynced, as openraft's replication progress
/// for this node says; 0 otherwise.
///
/// Generic over the type configuration and state machine so that the
/// simulator (`sim/`) runs this same timer over its own storage.
pub async fn heartbeat_while_leading<C, SM>(raft: openraft::Raft<C, SM>, gate: std::sync::Arc<Gate>)
where
    C: openraft::RaftTypeConfig,
    SM: openraft::storage::RaftStateMachine<C>,
{
    use openraft::async_runtime::watch::WatchReceiver;
    let mut metrics = raft.metrics();
    loop {
        let leads = {
            let m = metrics.borrow_and_update();
            gate.set_own_durable(own_durable(&m));
            m.state == openraft::ServerState::Leader
        };
        if leads {
            // At the interval in force; a profile switch restarts the timer.
            let mut interval = gate.live().heartbeat;
            let mut beat = tokio::time::interval(interval);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Biased: a deterministic order for the simulator's replays.
                tokio::select! {
                    biased;
                    _ = beat.tick() => {
                        if gate.heartbeats() && raft.trigger().heartbeat().await.is_err() {
                            return;
                        }
                        if gate.live().heartbeat != interval {
                            interval = gate.live().heartbeat;
                            beat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    changed = metrics.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let m = metrics.borrow_and_update();
                        gate.set_own_durable(own_durable(&m));
                        if m.state != openraft::ServerState::Leader {
                            break;
                        }
                    }
                }
            }
        } else if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// While `m` is a leader's, the last log index its own store has fsynced:
/// openraft counts the leader's own flushed log in its replication
/// progress, as it counts a follower's acknowledgement. 0 otherwise.
pub fn own_durable<C: openraft::RaftTypeConfig>(m: &openraft::RaftMetrics<C>) -> u64 {
    if m.state != openraft::ServerState::Leader {
        return 0;
    }
    m.replication
        .as_ref()
        .and_then(|r| r.get(&m.id))
        .and_then(|l| l.as_ref())
        .map_or(0, |l| l.index)
}

/// The last log index of `m` when its log holds entries not applied yet
/// (what its applied ledger says may then be out of date), else `None`.
pub fn unapplied<C: openraft::RaftTypeConfig>(m: &openraft::RaftMetrics<C>) -> Option<u64> {
    let applied = m.last_applied.as_ref().map(|l| l.index);
    (applied < m.last_log_index).then_some(m.last_log_index.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timings_make_a_valid_openraft_config() {
        let t = crate::config::RunArgs {
            node_id: Some(1),
            peer: vec!["2=127.0.0.1:7702".into()],
            listen: Some("127.0.0.1:7700".parse().unwrap()),
            insecure: true,
            witness: true,
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .timing;
        let c = openraft_config(&t).unwrap();
        assert_eq!((c.election_timeout_min, c.election_timeout_max), (300, 600));
        assert_eq!(c.quorum_loss_probe_interval, Some(1200));
        assert_eq!(c.removed_leader_step_down, openraft::StepDownPolicy::Never);
        assert!(!c.enable_elect && !c.enable_tick);
    }
}
