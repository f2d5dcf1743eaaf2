//! Operator commands (pause, resume, switchover, members, rejoin, import
//! floor, a node's own register) run on the leader: [`Commands`], on a
//! [`Core`], reaching the leader through the [`Relay`] trait. A real node
//! relays over the peer port (mTLS gRPC, [`Peers`]); the simulator
//! (`sim/`) over its own network, so both run this code.
//!
//! Owns: what each command commits or asks of the coordinator, the
//! membership rules around it (handover before the leader's removal, a
//! live majority of the voters left, learner before voter), and who may
//! send a command to the leader ([`Commands::serve`]). Must not: check
//! certificates (the gRPC services do) or touch the validator (a
//! switchover is handed to the coordinator, which owns it).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::members;
use crate::config::NodeId;
use crate::ledger::Command;
use crate::node::{CoordinatorRequest, Core, SwitchoverRefused};
use crate::pb::{self, cluster_command::Kind};
use crate::raft::peers::Peers;
use crate::raft::store::StateMachine;
use crate::raft::TypeConfig;

/// How long an operator's command may take on the leader (a `members add`
/// waits there for the new learner to catch up).
pub const OPERATOR_DEADLINE: Duration = Duration::from_secs(30);

/// How a command reaches the leader, and what the transport learns.
pub trait Relay: Send + Sync + 'static {
    /// Sends `cmd` to `leader`; its answer, or why none came within
    /// `limit`. A refusal by the leader keeps its code.
    fn relay(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
        limit: Duration,
    ) -> impl Future<Output = Result<String, Status>> + Send;
    /// A member was added at `addr`: where to reach it from now on.
    fn learned_addr(&self, id: NodeId, addr: &str);
    /// A membership change is about to be proposed (logged on a real
    /// node; the simulator notes who was up).
    fn change_begins(&self, change: &str);
}

/// A real node relays over the peer port (mTLS gRPC).
impl Relay for Peers {
    async fn relay(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
        limit: Duration,
    ) -> Result<String, Status> {
        let channel = self
            .channel(leader)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut client = pb::cluster_client::ClusterClient::new(channel);
        let req = self.request(cmd, limit);
        self.call(leader, limit, client.forward(req))
            .await
            .map(|r| r.message)
            .map_err(|e| match e {
                // The leader's own answer keeps its code (a refusal stays one).
                crate::raft::peers::PeerError::Rpc { status, .. }
                    if status.code() != tonic::Code::Unavailable =>
                {
                    Status::new(
                        status.code(),
                        format!("node {leader}: {}", status.message()),
                    )
                }
                e => Status::unavailable(format!("forwarding to leader {leader}: {e}")),
            })
    }

    fn learned_addr(&self, id: NodeId, addr: &str) {
        self.set_addr(id, addr);
    }

    fn change_begins(&self, change: &str) {
        tracing::info!("membership change: {change}");
    }
}

/// Operator commands on one node: run here when it leads, relayed when
/// not.
pub struct Commands<SM: RaftStateMachine<TypeConfig> = StateMachine, R: Relay = Peers> {
    core: Arc<Core<SM>>,
    relay: Arc<R>,
    requests: mpsc::Sender<CoordinatorRequest>,
}

fn raft_status<E: std::fmt::Display>(e: RaftError<TypeConfig, E>) -> Status {
    Status::unavailable(e.to_string())
}

fn write_status(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership changed during the command; run it again")
        }
        other => raft_status(other),
    }
}

/// Election timeouts without progress after which a new learner is not
/// made a voter (about 10 s on a LAN, 14 s with the WAN profile).
const LEARNER_STALL: u32 = 16;

/// The ledger's mode for a registration's `mode` field.
fn mode_of(mode: Option<i32>) -> Option<crate::ledger::Mode> {
    use crate::ledger::Mode;
    // A value this keyraft does not know is a later mode's: kept as one.
    let Ok(known) = pb::NodeMode::try_from(mode?) else {
        return Some(Mode::Other);
    };
    match known {
        pb::NodeMode::Validator => Some(Mode::Validator),
        pb::NodeMode::Signer => Some(Mode::Signer),
        pb::NodeMode::Witness => Some(Mode::Witness),
        pb::NodeMode::Unknown => None,
    }
}

/// A registration's `mode` field for the ledger's mode.
pub fn pb_mode(mode: crate::ledger::Mode) -> i32 {
    use crate::ledger::Mode;
    let m = match mode {
        Mode::Validator => pb::NodeMode::Validator,
        Mode::Signer => pb::NodeMode::Signer,
        Mode::Witness => pb::NodeMode::Witness,
        Mode::Other => pb::NodeMode::Unknown,
    };
    m as i32
}

fn check_member(m: &pb::Member) -> Result<(), Status> {
    if m.id == 0 || !m.addr.contains(':') {
        return Err(Status::invalid_argument(
            "want a node id above 0 and HOST:PORT",
        ));
    }
    Ok(())
}

impl<SM: RaftStateMachine<TypeConfig>, R: Relay> Commands<SM, R> {
    /// Commands on `core`, relayed by `relay`; a switchover goes to the
    /// coordinator through `requests`.
    pub fn new(
        core: Arc<Core<SM>>,
        relay: Arc<R>,
        requests: mpsc::Sender<CoordinatorRequest>,
    ) -> Self {
        Self {
            core,
            relay,
            requests,
        }
    }

    /// Runs an operator's command on the leader.
    ///
    /// With no live leader (everyone ineligible, or a paused cluster whose
    /// leader died, where nobody campaigns), a validator host asked to run
    /// a command stands for election itself. Leading does not make it
    /// validate: that still takes eligibility and the activation protocol.
    /// A node whose start is still being checked with its peers (step 9)
    /// runs nothing: it might be the restored copy the check is about to
    /// refuse, and standing for election would skip the check.
    pub async fn execute_for_operator(&self, cmd: pb::ClusterCommand) -> Result<String, Status> {
        if !self.core.gate.joined() {
            return Err(Status::unavailable(
                "this node is starting: its data dir is still being checked with its peers (docs/design.md, step 9); run the command on another validator host, or once it has joined",
            ));
        }
        match self.core.leader() {
            Some(_) => {}
            None if self.core.cfg.witness => {
                return Err(Status::unavailable(
                    "no leader, and a witness does not stand for election: run the command on a validator host",
                ))
            }
            None => {
                tracing::warn!("operator command with no live leader: standing for election");
                self.take_leadership().await?;
            }
        }
        self.execute(cmd, OPERATOR_DEADLINE).await
    }

    /// Runs `cmd` on the live leader: here if this node leads, else
    /// relayed with `deadline` (the leader drops the command's wait when
    /// it passes).
    pub async fn execute(
        &self,
        cmd: pb::ClusterCommand,
        deadline: Duration,
    ) -> Result<String, Status> {
        let leader = self
            .core
            .leader()
            .ok_or_else(|| Status::unavailable("no live leader right now"))?;
        self.execute_on(leader, cmd, deadline).await
    }

    /// Runs `cmd` on `leader` (here, or relayed with `deadline`).
    pub async fn execute_on(
        &self,
        leader: NodeId,
        cmd: pb::ClusterCommand,
        deadline: Duration,
    ) -> Result<String, Status> {
        if leader == self.core.cfg.id {
            return self.execute_here(cmd).await;
        }
        self.relay.relay(leader, cmd, deadline).await
    }

    /// The leader's end of a relayed command from member `peer`, whose
    /// certificate the transport has checked: a node may register or
    /// rejoin only itself; an operator's command must come from a voter
    /// (`validator_host`: the certificate says the sender may hold the key).
    pub async fn serve(
        &self,
        peer: NodeId,
        validator_host: Result<(), Status>,
        cmd: pb::ClusterCommand,
    ) -> Result<String, Status> {
        if self.core.raft_metrics().current_leader != Some(self.core.cfg.id) {
            return Err(Status::failed_precondition("not the leader"));
        }
        match &cmd.kind {
            Some(Kind::Rejoin(pb::Member { id, .. }) | Kind::Register(id)) => {
                if *id != peer {
                    return Err(Status::permission_denied(
                        "a node may only register or rejoin itself",
                    ));
                }
            }
            // An operator's command, from a member's admin socket or port:
            // only a validator host's certificate vouches for its operator.
            _ => {
                validator_host?;
                if !self.voter_ids().contains(&peer) {
                    tracing::warn!(
                        peer,
                        "refused an operator command from a node that is not a voter"
                    );
                    return Err(Status::permission_denied(format!(
                        "node {peer} is not a voting member: it forwards no operator commands"
                    )));
                }
                tracing::info!(node = peer, "operator command forwarded by node {peer}");
            }
        }
        self.execute_here(cmd).await
    }

    /// Stands for election until some leader is live, through the same
    /// gate as a campaign ([`crate::raft::Gate::may_stand`]): never within
    /// its restart quiet, inside a lease it promised, or while a leader was
    /// heard from lately. Its own vote is a vote: a node restarted a moment
    /// ago may have acked the key holder's lease and forgotten it.
    async fn take_leadership(&self) -> Result<(), Status> {
        let t = self.core.timing();
        let limit = t.election_max * 6 + self.core.gate.quiet_left();
        let until = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < until {
            // Any live leader will do: one elected meanwhile runs the command.
            if self.core.leader().is_some() {
                return Ok(());
            }
            let running = self.core.started.elapsed();
            if self.core.gate.may_stand(t.election_max, running) {
                let _ = self.core.raft.trigger().elect(true).await;
            }
            tokio::time::sleep(t.election_min).await;
        }
        Err(Status::unavailable(format!(
            "no leader could be elected within {limit:?}: is a majority of members up and connected?"
        )))
    }

    async fn write(&self, c: Command) -> Result<ClientWriteResponse<TypeConfig>, Status> {
        self.core.raft.client_write(c).await.map_err(write_status)
    }

    /// Asks the coordinator for a switchover (to `to`, or to the best
    /// standby); its answer.
    async fn switchover(&self, to: Option<NodeId>) -> Result<String, SwitchoverRefused> {
        let (reply, rx) = oneshot::channel();
        let gone = |_| SwitchoverRefused::ShuttingDown;
        self.requests
            .send(CoordinatorRequest::Switchover { to, reply })
            .await
            .map_err(|_| SwitchoverRefused::ShuttingDown)?;
        rx.await.map_err(gone)?
    }

    async fn execute_here(&self, cmd: pb::ClusterCommand) -> Result<String, Status> {
        let mode = mode_of(cmd.mode);
        match cmd
            .kind
            .ok_or_else(|| Status::invalid_argument("empty command"))?
        {
            Kind::Pause(_) => {
                self.write(Command::SetPaused { paused: true }).await?;
                Ok("cluster paused: no automatic failover until `keyraft resume`; the active validator keeps validating".into())
            }
            Kind::Resume(_) => {
                self.write(Command::SetPaused { paused: false }).await?;
                Ok("cluster resumed: automatic failover is on".into())
            }
            Kind::Register(node) => {
                self.write(Command::Register { node, mode }).await?;
                Ok(format!("node {node} registered"))
            }
            Kind::SignerFloor(f) => self.signer_floor(f).await,
            Kind::NodeBinary(b) => self.node_binary(b).await,
            Kind::Switchover(s) => self
                .switchover(s.to)
                .await
                .map_err(|e| Status::failed_precondition(e.to_string())),
            Kind::MembersAdd(m) => {
                check_member(&m)?;
                self.add_voter(&m).await?;
                self.relay.learned_addr(m.id, &m.addr);
                Ok(format!("node {} ({}) is a voter", m.id, m.addr))
            }
            Kind::MembersRemove(id) if id == self.core.cfg.id => self.remove_the_leader(id).await,
            Kind::MembersRemove(id) if self.core.cluster.borrow().key_holder() == Some(id) => {
                Err(Status::failed_precondition(format!(
                    "node {id} holds the key unreleased and does not lead (its lease is running out): run `keyraft switchover` first, or remove it once a successor validates"
                )))
            }
            Kind::MembersRemove(id) => {
                self.voters_left_answer(id).await?;
                self.relay.change_begins(&format!("remove node {id}"));
                self.change(ChangeMembers::RemoveVoters([id].into()), false)
                    .await?;
                self.change(ChangeMembers::RemoveNodes([id].into()), false)
                    .await?;
                Ok(format!("node {id} removed"))
            }
            Kind::Rejoin(m) if m.id == self.core.cfg.id => Err(Status::failed_precondition(
                "the leader cannot rejoin: it holds its data",
            )),
            Kind::Rejoin(m) => {
                check_member(&m)?;
                let voter = self.voter_ids().contains(&m.id);
                if voter {
                    // The demotion below is a membership change as a
                    // removal is: without a live majority of the voters
                    // left it could never commit and the cluster would
                    // stop. Until they are back, the node stays a voter
                    // that does not vote (its gate) and asks again.
                    self.voters_left_answer(m.id).await?;
                }
                // Every member forgets what it saw of the node's old history
                // (and any refusal of it): it starts over, without a vote.
                self.write(Command::Rejoined { node: m.id }).await?;
                if voter {
                    // Demote first: a voter that lost its data must not vote
                    // until it has caught up again. Asked again right
                    // before: a voter may have died since.
                    self.voters_left_answer(m.id).await?;
                    self.relay.change_begins(&format!("demote node {}", m.id));
                    self.change(ChangeMembers::RemoveVoters([m.id].into()), true)
                        .await?;
                }
                self.add_voter(&m).await?;
                Ok(format!(
                    "node {} rejoined as a learner, caught up and is a voter again",
                    m.id
                ))
            }
        }
    }

    /// `keyraft upgrade --binary`, one host: its node runs as `b.path`
    /// from its next start (a standby's at once). Never the key holder's:
    /// its node would restart under the key, which a switchover avoids.
    async fn node_binary(&self, b: pb::NodeBinary) -> Result<String, Status> {
        let refuse = |why: String| Err(Status::failed_precondition(why));
        let voters = self.voter_ids();
        let mode = self.core.cluster.borrow().modes.get(&b.node).copied();
        if !voters.contains(&b.node) {
            return refuse(format!("node {} is not a voter", b.node));
        }
        if mode != Some(crate::ledger::Mode::Validator) {
            return refuse(format!("node {} does not run in validator mode: `keyraft upgrade --binary` rolls validator-mode nodes only", b.node));
        }
        if !std::path::Path::new(&b.path).is_absolute() {
            return refuse(format!("{} is not an absolute path", b.path));
        }
        if self.core.cluster.borrow().key_holder() == Some(b.node) {
            return refuse(format!("node {} holds the key: run `keyraft switchover` first (its node would restart under the key)", b.node));
        }
        let others = voters.into_iter().filter(|v| *v != self.core.cfg.id);
        if !self
            .core
            .view
            .all_have(others, crate::supervisor::BINARY_FEATURE)
        {
            return refuse(
                "not every voter runs a keyraft that knows node binaries: upgrade keyraft first"
                    .into(),
            );
        }
        let (node, path) = (b.node, b.path);
        self.write(Command::NodeBinary {
            node,
            path: path.clone(),
        })
        .await?;
        Ok(format!(
            "node {node} runs its node as {path} from its next start"
        ))
    }

    /// `keyraft signer import-state`: the floor below which nothing of
    /// the chain is signed.
    async fn signer_floor(&self, f: pb::SignerFloor) -> Result<String, Status> {
        if self.core.cfg.signer.is_none() {
            return Err(Status::failed_precondition(
                "this cluster does not run in signer mode",
            ));
        }
        let signer = self.core.roster();
        if signer.chain(&f.chain_id).is_none() {
            let ours: Vec<&str> = signer.chains.iter().map(|c| c.chain_id.as_str()).collect();
            return Err(Status::failed_precondition(format!(
                "this member signs for {}, not {}",
                ours.join(", "),
                f.chain_id
            )));
        }
        let limit = crate::signer::height_limit(&self.core, &f.chain_id);
        if f.height > limit.height {
            if !f.allow_jump {
                return Err(Status::failed_precondition(format!(
                    "floor height {} is above {}: refused (if the state file is right, run import-state again with --allow-jump)",
                    f.height, limit.why
                )));
            }
            tracing::warn!(
                height = f.height,
                limit = limit.height,
                "operator override: a floor above the height-jump limit ({}) is imported",
                limit.why
            );
        }
        // A validator-mode holder still running may sign on: where it
        // stopped is not known until it has (review finding).
        if let (false, Some(why)) = (f.other_key, crate::signer::keys::held_now(&self.core)) {
            return Err(Status::failed_precondition(format!(
                "{why}. Its validator may still sign, so its state file is not final: import it once that node runs in signer mode or its activation is released (or pass --other-key if this chain's key is not the one it linked)"
            )));
        }
        let (before, linked, last_use) = {
            let c = self.core.cluster.borrow();
            (
                c.watermark(&f.chain_id).cloned(),
                c.linked,
                c.last_key_event,
            )
        };
        // Validator mode linked the key into a node, which signed: "never
        // signed", or a floor below where it released, would let signer
        // mode sign what it did. Which chain's key it was, the ledger does
        // not know: `--other-key` says it was not this one.
        if let (false, 0, Some(e)) = (f.other_key, f.height, last_use) {
            return Err(Status::failed_precondition(format!(
                "node {} linked the key in validator mode (term {}), so it has signed: import that node's priv_validator_state.json, not --never-signed (or pass --other-key if this chain's key is not the one it linked)",
                e.node, e.term
            )));
        }
        if let (false, Some(floor)) = (f.other_key, linked.floor.filter(|h| *h > f.height)) {
            return Err(Status::failed_precondition(format!(
                "a member released the key in validator mode with its node at height {}: import a floor of at least {floor} (or pass --other-key if this chain's key is not the one it linked)",
                floor - 1
            )));
        }
        // The one-chain floor while no other chain has a watermark, so
        // that one chain stays readable by every keyraft (`ledger`).
        let floor = self
            .core
            .cluster
            .borrow()
            .floor_command(&f.chain_id, f.height);
        let r = self.write(floor).await?;
        if let Some(crate::ledger::SignVerdict::WrongChain) = r.data.sign {
            return Err(Status::unavailable(format!(
                "another chain's floor was committed at the same time as {}'s: run import-state again",
                f.chain_id
            )));
        }
        Ok(match before {
            Some(w) if (w.height, w.round, w.step) >= (f.height, u32::MAX, u8::MAX) => format!(
                "the watermark was already at or above height {}: unchanged",
                f.height
            ),
            _ if f.height == 0 => "a key that never signed: signing starts now".to_string(),
            _ => format!(
                "nothing at or below height {} will be signed; signing starts above it",
                f.height
            ),
        })
    }

    /// Removing the leader (docs/design.md, step 7): it hands over first
    /// as in a switchover (stop, prove dead, `Released`, transfer), and
    /// the new leader removes it. openraft's own removed-leader step-down
    /// is off: it transferred leadership without a release while the old
    /// leader's validator still ran.
    async fn remove_the_leader(&self, id: NodeId) -> Result<String, Status> {
        let handed = self.switchover(None).await.map_err(|why| {
            Status::failed_precondition(format!(
                "node {id} leads and could not hand over ({why}): run `keyraft switchover` (or stop node {id}) first, then remove it"
            ))
        })?;
        // The successor takes the removal once it leads (it may still be
        // committing its activation).
        let limit = self.core.timing().election_max * 10;
        let until = tokio::time::Instant::now() + limit;
        loop {
            let cmd = pb::ClusterCommand {
                kind: Some(Kind::MembersRemove(id)),
                mode: None,
            };
            let last = match self.core.leader() {
                Some(l) if l != id => match self.relay.relay(l, cmd, OPERATOR_DEADLINE).await {
                    Ok(removed) => return Ok(format!("node {id} led: {handed}; {removed}")),
                    // Unavailable: not leading yet; FailedPrecondition: it has
                    // not applied the release yet. Both pass within the limit.
                    Err(e)
                        if matches!(
                            e.code(),
                            tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        e.message().to_string()
                    }
                    Err(e) => return Err(e),
                },
                _ => "no other leader yet".to_string(),
            };
            if tokio::time::Instant::now() >= until {
                return Err(Status::unavailable(format!(
                    "node {id} handed over ({handed}), but the removal was not taken within {limit:?} ({last}): run it again"
                )));
            }
            tokio::time::sleep(self.core.timing().heartbeat).await;
        }
    }

    /// Before voter `id` is removed, a majority of the voters left must
    /// show they are up now: each acks a heartbeat sent after this asks (an
    /// older ack may be from a voter that died since). Else the joint
    /// configuration could never commit and the cluster would stop
    /// ([`members`]).
    ///
    /// Decided at the ack that completes the majority (each ack changes
    /// openraft's metrics), not a heartbeat later: the later the decision,
    /// the likelier a voter it counted died in between.
    async fn voters_left_answer(&self, id: NodeId) -> Result<(), Status> {
        use openraft::async_runtime::watch::WatchReceiver;
        let asked = tokio::time::Instant::now();
        let until = asked + self.core.timing().election_max;
        let mut metrics = self.core.raft.metrics();
        let _ = self.core.raft.trigger().heartbeat().await;
        loop {
            let acks = crate::node::ack_ages(&metrics.borrow_and_update());
            let why = members::removal_refusal(
                &self.voter_ids(),
                self.core.cfg.id,
                &acks,
                id,
                asked.elapsed(),
            );
            match why {
                None => return Ok(()),
                Some(why) if tokio::time::Instant::now() >= until => {
                    return Err(Status::failed_precondition(why))
                }
                Some(_) => {}
            }
            // The heartbeat timer keeps the acks coming while this leads.
            if let Ok(Err(_)) = tokio::time::timeout_at(until, metrics.changed()).await {
                return Err(Status::unavailable("Raft stopped"));
            }
        }
    }

    /// A membership change, run to its end even if the request that asked
    /// for it is dropped (its deadline, a client gone): openraft makes a
    /// change in two commits, joint then uniform, and a future dropped
    /// between them would leave the cluster needing a majority of both
    /// member sets.
    async fn change(
        &self,
        changes: ChangeMembers<NodeId, BasicNode>,
        retain: bool,
    ) -> Result<(), Status> {
        let raft = self.core.raft.clone();
        let task = tokio::spawn(async move { raft.change_membership(changes, retain).await });
        match task.await {
            Ok(done) => done.map(|_| ()).map_err(write_status),
            Err(e) => Err(Status::internal(format!(
                "the membership change stopped: {e}"
            ))),
        }
    }

    /// Waits until learner `id` holds entry `target`, as long as it makes
    /// progress ([`members::learner_step`]); a learner that stalls for
    /// [`LEARNER_STALL`] election timeouts is refused.
    async fn learner_caught_up(&self, id: NodeId, target: u64) -> Result<(), Status> {
        use openraft::async_runtime::watch::WatchReceiver;
        let stall = self.core.timing().election_max * LEARNER_STALL;
        let mut metrics = self.core.raft.metrics();
        let (mut best, mut since) = (None, tokio::time::Instant::now());
        loop {
            let matched = {
                let m = metrics.borrow_and_update();
                let Some(r) = m.replication.as_ref() else {
                    return Err(Status::unavailable(format!(
                        "this node stopped leading while node {id} caught up: run the command again"
                    )));
                };
                r.get(&id).cloned().flatten().map(|l| l.index)
            };
            if matched > best {
                (best, since) = (matched, tokio::time::Instant::now());
            }
            match members::learner_step(id, matched, target, since.elapsed(), stall) {
                members::Learner::CaughtUp => return Ok(()),
                members::Learner::Stalled(why) => return Err(Status::failed_precondition(why)),
                members::Learner::Catching => {}
            }
            // Each append the learner acks changes the metrics; otherwise
            // wake when the stall limit is reached.
            let wake = (since + stall).max(tokio::time::Instant::now() + Duration::from_millis(10));
            if let Ok(Err(_)) = tokio::time::timeout_at(wake, metrics.changed()).await {
                return Err(Status::unavailable("Raft stopped"));
            }
        }
    }

    fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.core
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Joint consensus the safe way: a learner first, then, once it holds
    /// the entry that added it, a voter.
    async fn add_voter(&self, m: &pb::Member) -> Result<(), Status> {
        let raft = &self.core.raft;
        let added = raft
            .add_learner(m.id, BasicNode::new(&m.addr), false)
            .await
            .map_err(write_status)?;
        self.learner_caught_up(m.id, added.log_id.index).await?;
        self.relay
            .change_begins(&format!("add node {} as a voter", m.id));
        self.change(ChangeMembers::AddVoterIds([m.id].into()), false)
            .await?;
        Ok(())
    }
}
