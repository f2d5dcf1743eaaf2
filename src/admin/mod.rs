//! The operator surface: admin gRPC (used by the `keyraft` CLI), the HTTP
//! endpoints (`/metrics`, `/health`, `/leader`, `/replica`, `/status`), the
//! cluster view behind `keyraft status`, and running operator commands on
//! the leader (forwarding them there from any validator host).
//!
//! - [`access`]: who may reach the admin API (the socket, the TCP port with
//!   admin certificates) and the admin service behind both.
//! - [`members`]: whether a voter may be removed now (a pure rule).
//!
//! Owns: the JSON shape of `keyraft status --json` (docs/design.md), Patroni-style
//! health codes, membership changes, and the leader's check that a
//! forwarded operator command comes from a validator host. Must not: listen
//! anywhere but where configured (HTTP on loopback by default, admin on the
//! socket), or touch the validator; a switchover is handed to the
//! coordinator, which owns the validator.

pub mod access;
pub mod members;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::config::NodeId;
use crate::ledger::Command;
use crate::node::{CoordinatorRequest, Shared, StateName};
use crate::pb::{self, cluster_command::Kind};
use crate::raft::TypeConfig;
use crate::tls::peer_of;

/// How long an operator's command may take on the leader (a `members add`
/// waits there for the new learner to catch up).
const OPERATOR_DEADLINE: Duration = Duration::from_secs(30);
/// How long one attempt of a node's own request (register, rejoin) may take.
/// Short, so that an attempt caught in a leader change or a stalled host is
/// dropped and retried rather than waited out; a retry is idempotent and the
/// learner's catch-up carries on between attempts.
pub const NODE_REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// The cluster as this node sees it, in the shape docs/design.md gives.
pub fn status_json(sh: &Shared) -> Value {
    let m = sh.raft_metrics();
    let cluster = sh.cluster.borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let mut ids: BTreeSet<NodeId> = voters.iter().copied().collect();
    ids.extend(membership.learner_ids());
    let seen = sh.view.snapshot();
    let stale = sh.cfg.timing.gossip_interval * 3;
    let local = sh.local.borrow().clone();
    let mut validating = Vec::new();
    let mut nodes = Vec::new();
    let remembered = remembered_by_all(sh, &seen);
    for id in ids {
        let addr = membership
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let node = if id == sh.cfg.id {
            if local.state == StateName::Validating {
                validating.push(id);
            }
            json!({
                "id": id, "addr": sh.cfg.advertise, "role": sh.cfg.role(),
                "state": local.state.to_string(), "raft": sh.raft_state(&m),
                "key_linked": local.key_linked, "validator": local.validator, "last_seen_ms": 0,
                "probe_error": *sh.probe_error.borrow(),
                "kernel_fence": sh.kernel_fence,
                "fence_agents": (!sh.cfg.fence.by_node.is_empty()).then(|| {
                    let last = sh.fence_agents.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    sh.cfg.fence.by_node.iter().map(|(n, a)| (n.to_string(), json!({
                        "agent": a.path.display().to_string(),
                        "last": last.get(n),
                    }))).collect::<serde_json::Map<String, Value>>()
                }),
                "tls_cert": sh.certs.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(c, _)| json!({
                    "not_after": c.not_after_text, "expires_in_days": c.expires_in().div_euclid(86_400),
                })),
            })
        } else if let Some(s) = seen.get(&id).filter(|s| s.at.elapsed() <= stale) {
            if s.status.state == "Validating" {
                validating.push(id);
            }
            let st = &s.status;
            json!({
                "id": id, "addr": if st.addr.is_empty() { addr } else { st.addr.clone() }, "role": st.role,
                "state": st.state, "raft": st.raft, "key_linked": st.key_linked,
                "validator": st.validator.as_ref().map(|v| json!({"running": v.running, "synced": v.synced, "height": v.height})),
                "last_seen_ms": s.at.elapsed().as_millis() as u64,
            })
        } else {
            // Never heard from, or not lately: what it last said may be stale.
            let last = seen.get(&id);
            json!({
                "id": id, "addr": addr, "role": last.map(|s| s.status.role.clone()), "state": "Unknown", "raft": "Unknown",
                "key_linked": Value::Null, "validator": Value::Null,
                "last_seen_ms": last.map(|s| s.at.elapsed().as_millis() as u64),
            })
        };
        let mut node = node;
        // Signer mode: the validator hosts' part, which `state` (Voting
        // everywhere) does not say: the leader signs, the others forward.
        if sh.cfg.signer.is_some() && node["role"] == "validator" {
            let part = if Some(id) == sh.leader() {
                "signing"
            } else {
                "forwarding"
            };
            node["signer_role"] = json!(part);
        }
        node["remembered"] = remembered
            .get(&id)
            .cloned()
            .unwrap_or_else(|| json!({"term": 0, "committed": 0, "refused_by": {}}));
        nodes.push(node);
    }
    let active = match validating.as_slice() {
        [one] => json!(one),
        _ => Value::Null,
    };
    let mut status = json!({
        "cluster": {
            "leader": sh.leader(), "term": m.current_term, "active_validator": active,
            "quorum": sh.has_quorum(), "paused": cluster.paused, "members": voters,
        },
        "nodes": nodes,
        "timing": crate::tuning::status(sh, cluster.timing),
    });
    if let Some(c) = &sh.cfg.signer {
        let links = sh.privval.snapshot();
        let chains: Vec<Value> = c
            .chains
            .iter()
            .map(|chain| {
                let w = cluster.watermark(&chain.chain_id);
                let limit = crate::signer::height_limit(&sh.core, &chain.chain_id);
                let nodes: Vec<String> = chain.nodes.iter().map(|n| n.to_string()).collect();
                json!({
                    "chain_id": chain.chain_id,
                    "watermark": w.map(|w| json!({
                        "height": w.height,
                        "round": (w.round != u32::MAX).then_some(w.round),
                        "step": (w.step != u8::MAX).then_some(w.step),
                        "imported_floor": w.digest.is_none(),
                    })),
                    "signatures": w.map_or(0, |w| w.signatures),
                    "height_limit": json!({"height": limit.height, "why": limit.why}),
                    "connections": links.iter()
                        .filter(|(node, _)| nodes.contains(node))
                        .map(|(node, up)| json!({"node": node, "connected": up}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        status["signer"] = json!({ "chains": chains });
    }
    status
}

/// What the members remember of each one (step 9): the highest term and
/// committed index any of them saw it hold, and who refused it, why.
fn remembered_by_all(
    sh: &Shared,
    seen: &BTreeMap<NodeId, crate::node::Seen>,
) -> BTreeMap<NodeId, Value> {
    let mut by: Vec<(NodeId, pb::Remembered)> = sh
        .memory
        .all()
        .into_iter()
        .map(|(id, r)| {
            let refused = r.refused.unwrap_or_default();
            let r = pb::Remembered {
                id,
                term: r.term,
                committed: r.committed,
                refused,
            };
            (sh.cfg.id, r)
        })
        .collect();
    for (peer, s) in seen {
        by.extend(s.status.remembered.iter().map(|r| (*peer, r.clone())));
    }
    let mut out: BTreeMap<NodeId, Value> = BTreeMap::new();
    for (who, r) in by {
        let e = out
            .entry(r.id)
            .or_insert_with(|| json!({"term": 0, "committed": 0, "refused_by": {}}));
        e["term"] = json!(e["term"].as_u64().unwrap_or(0).max(r.term));
        e["committed"] = json!(e["committed"].as_u64().unwrap_or(0).max(r.committed));
        if !r.refused.is_empty() {
            e["refused_by"][who.to_string()] = json!(r.refused);
        }
    }
    out
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

/// Runs an operator's command on the leader.
///
/// With no live leader (everyone ineligible, or a paused cluster whose
/// leader died, where nobody campaigns), a validator host asked to run a
/// command stands for election itself. Leading does not make it validate:
/// that still takes eligibility and the activation protocol. A node whose
/// start is still being checked with its peers (step 9) runs nothing: it
/// might be the restored copy the check is about to refuse, and standing
/// for election would skip the check.
pub async fn execute_for_operator(
    sh: &Arc<Shared>,
    cmd: pb::ClusterCommand,
) -> Result<String, Status> {
    if !sh.gate.joined() {
        return Err(Status::unavailable(
            "this node is starting: its data dir is still being checked with its peers (docs/design.md, step 9); run the command on another validator host, or once it has joined",
        ));
    }
    match sh.leader() {
        Some(_) => {}
        None if sh.cfg.witness => {
            return Err(Status::unavailable(
                "no leader, and a witness does not stand for election: run the command on a validator host",
            ))
        }
        None => {
            tracing::warn!("operator command with no live leader: standing for election");
            take_leadership(sh).await?;
        }
    }
    execute(sh, cmd, OPERATOR_DEADLINE).await
}

/// Runs `cmd` on the live leader: here if this node leads, else forwarded
/// with `deadline` (the leader drops the command's wait when it passes).
pub async fn execute(
    sh: &Arc<Shared>,
    cmd: pb::ClusterCommand,
    deadline: Duration,
) -> Result<String, Status> {
    let leader = sh
        .leader()
        .ok_or_else(|| Status::unavailable("no live leader right now"))?;
    execute_on(sh, leader, cmd, deadline).await
}

/// Runs `cmd` on `leader` (here, or forwarded with `deadline`).
pub async fn execute_on(
    sh: &Arc<Shared>,
    leader: NodeId,
    cmd: pb::ClusterCommand,
    deadline: Duration,
) -> Result<String, Status> {
    if leader == sh.cfg.id {
        return execute_here(sh, cmd).await;
    }
    forward(sh, leader, cmd, deadline).await
}

async fn forward(
    sh: &Arc<Shared>,
    leader: NodeId,
    cmd: pb::ClusterCommand,
    deadline: Duration,
) -> Result<String, Status> {
    let channel = sh
        .peers
        .channel(leader)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = pb::cluster_client::ClusterClient::new(channel);
    let req = sh.peers.request(cmd, deadline);
    sh.peers
        .call(leader, deadline, client.forward(req))
        .await
        .map(|r| r.message)
        .map_err(|e| match e {
            // The leader's own answer keeps its code (a refusal stays one).
            crate::raft::network::PeerError::Rpc { status, .. }
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

async fn take_leadership(sh: &Arc<Shared>) -> Result<(), Status> {
    let limit = sh.timing().election_max * 6;
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        // Any live leader will do: one elected meanwhile runs the command.
        if sh.leader().is_some() {
            return Ok(());
        }
        let _ = sh.raft.trigger().elect(true).await;
        tokio::time::sleep(sh.timing().election_min).await;
    }
    Err(Status::unavailable(format!(
        "no leader could be elected within {limit:?}: is a majority of members up and connected?"
    )))
}

async fn execute_here(sh: &Arc<Shared>, cmd: pb::ClusterCommand) -> Result<String, Status> {
    let raft = &sh.raft;
    let write = |c: Command| async move { raft.client_write(c).await.map_err(write_status) };
    match cmd
        .kind
        .ok_or_else(|| Status::invalid_argument("empty command"))?
    {
        Kind::Pause(_) => {
            write(Command::SetPaused { paused: true }).await?;
            Ok("cluster paused: no automatic failover until `keyraft resume`; the active validator keeps validating".into())
        }
        Kind::Resume(_) => {
            write(Command::SetPaused { paused: false }).await?;
            Ok("cluster resumed: automatic failover is on".into())
        }
        Kind::Register(node) => {
            write(Command::Register { node }).await?;
            Ok(format!("node {node} registered"))
        }
        Kind::SignerFloor(f) => {
            let Some(signer) = &sh.cfg.signer else {
                return Err(Status::failed_precondition(
                    "this cluster does not run in signer mode",
                ));
            };
            if signer.chain(&f.chain_id).is_none() {
                let ours: Vec<&str> = signer.chain_ids().collect();
                return Err(Status::failed_precondition(format!(
                    "this member signs for {}, not {}",
                    ours.join(", "),
                    f.chain_id
                )));
            }
            let limit = crate::signer::height_limit(&sh.core, &f.chain_id);
            if f.height > limit.height {
                if !f.allow_jump {
                    return Err(Status::failed_precondition(format!(
                        "floor height {} is above {}: refused (if the state file is right, run import-state again with --allow-jump)",
                        f.height, limit.why
                    )));
                }
                tracing::warn!(height = f.height, limit = limit.height,
                    "operator override: a floor above the height-jump limit ({}) is imported", limit.why);
            }
            let before = sh.cluster.borrow().watermark(&f.chain_id).cloned();
            // The one-chain floor while no other chain has a watermark, so
            // that one chain stays readable by every keyraft (ledger.rs).
            let floor = sh.cluster.borrow().floor_command(&f.chain_id, f.height);
            let r = write(floor).await?;
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
        Kind::Switchover(s) => {
            let (reply, rx) = oneshot::channel();
            sh.requests
                .send(CoordinatorRequest::Switchover { to: s.to, reply })
                .await
                .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
            rx.await
                .map_err(|_| Status::unavailable("coordinator is shutting down"))?
                .map_err(Status::failed_precondition)
        }
        Kind::MembersAdd(m) => {
            check_member(&m)?;
            add_voter(raft, &m).await?;
            sh.peers.set_addr(m.id, &m.addr);
            Ok(format!("node {} ({}) is a voter", m.id, m.addr))
        }
        Kind::MembersRemove(id) if id == sh.cfg.id => remove_the_leader(sh, id).await,
        Kind::MembersRemove(id) if sh.cluster.borrow().key_holder() == Some(id) => {
            Err(Status::failed_precondition(format!(
                "node {id} holds the key unreleased and does not lead (its lease is running out): run `keyraft switchover` first, or remove it once a successor validates"
            )))
        }
        Kind::MembersRemove(id) => {
            voters_left_answer(sh, id).await?;
            raft.change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map_err(write_status)?;
            raft.change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                .await
                .map_err(write_status)?;
            Ok(format!("node {id} removed"))
        }
        Kind::Rejoin(m) if m.id == sh.cfg.id => Err(Status::failed_precondition(
            "the leader cannot rejoin: it holds its data",
        )),
        Kind::Rejoin(m) => {
            check_member(&m)?;
            // Every member forgets what it saw of the node's old history
            // (and any refusal of it): it starts over, without a vote.
            write(Command::Rejoined { node: m.id }).await?;
            if voter_ids(sh).contains(&m.id) {
                // Demote first: a voter that lost its data must not vote
                // until it has caught up again.
                raft.change_membership(ChangeMembers::RemoveVoters([m.id].into()), true)
                    .await
                    .map_err(write_status)?;
            }
            add_voter(raft, &m).await?;
            Ok(format!(
                "node {} rejoined as a learner, caught up and is a voter again",
                m.id
            ))
        }
    }
}

/// Removing the leader (docs/design.md, step 7): it hands over first as in
/// a switchover (stop, prove dead, `Released`, transfer), and the new
/// leader removes it. openraft's own removed-leader step-down is off: it
/// transferred leadership without a release while the old leader's
/// validator still ran.
async fn remove_the_leader(sh: &Arc<Shared>, id: NodeId) -> Result<String, Status> {
    let (reply, rx) = oneshot::channel();
    sh.requests
        .send(CoordinatorRequest::Switchover { to: None, reply })
        .await
        .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
    let handed = rx
        .await
        .map_err(|_| Status::unavailable("coordinator is shutting down"))?
        .map_err(|why| {
            Status::failed_precondition(format!(
                "node {id} leads and could not hand over ({why}): run `keyraft switchover` (or stop node {id}) first, then remove it"
            ))
        })?;
    // The successor takes the removal once it leads (it may still be
    // committing its activation).
    let limit = sh.timing().election_max * 10;
    let until = tokio::time::Instant::now() + limit;
    loop {
        let cmd = pb::ClusterCommand {
            kind: Some(Kind::MembersRemove(id)),
        };
        let last = match sh.leader() {
            Some(l) if l != id => match forward(sh, l, cmd, OPERATOR_DEADLINE).await {
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
        tokio::time::sleep(sh.timing().heartbeat).await;
    }
}

/// Before voter `id` is removed, a majority of the voters left must show
/// they are up now: each acks a heartbeat sent after this asks (an older
/// ack may be from a voter that died since). Else the joint configuration
/// could never commit and the cluster would stop ([`members`]).
///
/// Decided at the ack that completes the majority (each ack changes
/// openraft's metrics), not a heartbeat later: the later the decision, the
/// likelier a voter it counted died in between.
async fn voters_left_answer(sh: &Arc<Shared>, id: NodeId) -> Result<(), Status> {
    use openraft::async_runtime::watch::WatchReceiver;
    let asked = tokio::time::Instant::now();
    let until = asked + sh.timing().election_max;
    let mut metrics = sh.raft.metrics();
    let _ = sh.raft.trigger().heartbeat().await;
    loop {
        let acks = crate::node::ack_ages(&metrics.borrow_and_update());
        let why = members::removal_refusal(&voter_ids(sh), sh.cfg.id, &acks, id, asked.elapsed());
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

fn voter_ids(sh: &Shared) -> BTreeSet<NodeId> {
    sh.raft_metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Joint consensus the safe way: a learner first (returns once it has
/// caught up), then a voter.
async fn add_voter(raft: &crate::raft::Raft, m: &pb::Member) -> Result<(), Status> {
    raft.add_learner(m.id, BasicNode::new(&m.addr), true)
        .await
        .map_err(write_status)?;
    raft.change_membership(ChangeMembers::AddVoterIds([m.id].into()), false)
        .await
        .map_err(write_status)?;
    Ok(())
}

fn check_member(m: &pb::Member) -> Result<(), Status> {
    if m.id == 0 || !m.addr.contains(':') {
        return Err(Status::invalid_argument(
            "want a node id above 0 and HOST:PORT",
        ));
    }
    Ok(())
}

/// Peer-facing: runs commands forwarded by followers (leader only).
pub struct ClusterService {
    sh: Arc<Shared>,
}

impl ClusterService {
    pub fn new(sh: Arc<Shared>) -> Self {
        Self { sh }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn forward(
        &self,
        req: Request<pb::ClusterCommand>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let peer = peer_of(&req)?;
        if self.sh.raft_metrics().current_leader != Some(self.sh.cfg.id) {
            return Err(Status::failed_precondition("not the leader"));
        }
        match &req.get_ref().kind {
            // A node may rejoin or register only itself.
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
                crate::tls::require_validator(&req, "speak for the operator")?;
                if !voter_ids(&self.sh).contains(&peer) {
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
        let cmd = req.into_inner();
        let message = execute_here(&self.sh, cmd).await?;
        Ok(Response::new(pb::CommandReply { message }))
    }
}

/// `/metrics`, `/health`, `/leader`, `/replica`, `/status`.
pub fn http_router(sh: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/leader", get(leader))
        .route("/replica", get(replica))
        .route("/status", get(status))
        .route("/debug/raft", get(raft_stats))
        .with_state(sh)
}

/// openraft's runtime statistics as text: batch sizes and where a log
/// entry's time goes (proposed, received, submitted, persisted, committed,
/// applied), the Raft part of the sign budget.
async fn raft_stats(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    match sh.raft.runtime_stats().await {
        Ok(s) => (StatusCode::OK, s.display().human_readable().to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn answer(ok: bool, what: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, what)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no\n")
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    sh.refresh_raft_gauges();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        sh.metrics.render(),
    )
}

/// 200 while the coordinator runs and (on a validator host) its node answers.
async fn health(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let local = sh.local.borrow().clone();
    let raft_ok = sh.raft_metrics().running_state.is_ok();
    let node_ok = sh.cfg.witness || local.validator.is_some_and(|h| h.running);
    answer(
        raft_ok && node_ok && local.state != StateName::Shutdown,
        "ok\n",
    )
}

/// 200 only on the validating node.
async fn leader(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    answer(
        sh.local.borrow().state == StateName::Validating,
        "validating\n",
    )
}

/// 200 only on a healthy, synced standby.
async fn replica(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let local = sh.local.borrow().clone();
    let ok = !sh.cfg.witness
        && local.state != StateName::Validating
        && !local.key_linked
        && local.validator.is_some_and(|h| h.healthy());
    answer(ok, "standby\n")
}

async fn status(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(status_json(&sh))
}
