//! The operator surface: admin gRPC (used by the `keyraft` CLI), the HTTP
//! endpoints (`/metrics`, `/health`, `/leader`, `/replica`, `/status`), the
//! cluster view behind `keyraft status`, and running operator commands on
//! the leader (forwarding them there from any validator host).
//!
//! - [`access`]: who may reach the admin API (the socket, the TCP port with
//!   admin certificates) and the admin service behind both.
//! - [`command`]: operator commands run on the leader ([`Commands`]),
//!   membership changes among them, on a `Core` and a [`Relay`] (the
//!   simulator runs it too).
//! - [`members`]: whether a voter may be removed now (a pure rule).
//!
//! Owns: the JSON shape of `keyraft status --json` (docs/reference.md), Patroni-style
//! health codes, and the certificate check of a forwarded operator command
//! (a validator host's). Must not: listen
//! anywhere but where configured (HTTP on loopback by default, admin on the
//! socket), or touch the validator; a switchover is handed to the
//! coordinator, which owns the validator.

pub mod access;
pub mod command;
pub mod members;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

pub use command::{Commands, Relay, OPERATOR_DEADLINE};

use crate::config::NodeId;
use crate::node::{Shared, StateName};
use crate::pb;
use crate::tls::peer_of;

/// How long one attempt of a node's own request (register, rejoin) may take.
/// Short, so that an attempt caught in a leader change or a stalled host is
/// dropped and retried rather than waited out; a retry is idempotent and the
/// learner's catch-up carries on between attempts.
pub const NODE_REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A real node's operator commands: on its core, relayed over the peer
/// port, a switchover handed to its coordinator.
pub fn commands(sh: &Shared) -> Commands {
    Commands::new(sh.core.clone(), sh.peers.clone(), sh.requests.clone())
}

/// The cluster as this node sees it, in the shape docs/reference.md gives.
pub fn status_json(sh: &Shared) -> Value {
    let m = sh.core.raft_metrics();
    let cluster = sh.core.cluster.borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let mut ids: BTreeSet<NodeId> = voters.iter().copied().collect();
    ids.extend(membership.learner_ids());
    let seen = sh.core.view.snapshot();
    let stale = sh.core.cfg.timing.gossip_interval * 3;
    let local = sh.core.local.borrow().clone();
    let mut validating = Vec::new();
    let mut nodes = Vec::new();
    let remembered = remembered_by_all(sh, &seen);
    for id in ids {
        let addr = membership
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let mut node = if id == sh.core.cfg.id {
            if local.state == StateName::Validating {
                validating.push(id);
            }
            own_node_json(sh, &m, &local)
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
                "upgrade": upgrade_json(
                    st.upgrade.as_ref().map(Into::into),
                    st.validator.as_ref().map(|v| v.height).filter(|h| *h > 0),
                ),
                "binary": st.binary, "binary_refused": st.binary_refused,
            })
        } else {
            // Never heard from, or not lately: what it last said may be stale.
            let last = seen.get(&id);
            json!({
                "id": id, "addr": addr, "role": last.map(|s| s.status.role.clone()), "state": "Unknown", "raft": "Unknown",
                "key_linked": Value::Null, "validator": Value::Null, "upgrade": Value::Null,
                "binary": Value::Null, "binary_refused": Value::Null,
                "last_seen_ms": last.map(|s| s.at.elapsed().as_millis() as u64),
            })
        };
        // Signer mode: the validator hosts' part, which `state` (Voting
        // everywhere) does not say: the leader signs, the others forward.
        if sh.core.cfg.signer.is_some() && node["role"] == "validator" {
            let part = if Some(id) == sh.core.leader() {
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
            "leader": sh.core.leader(), "term": m.current_term, "active_validator": active,
            "quorum": sh.core.has_quorum(), "paused": cluster.paused, "members": voters,
            "binaries": cluster.binaries.iter().map(|(n, p)| (n.to_string(), json!(p))).collect::<serde_json::Map<String, Value>>(),
        },
        "nodes": nodes,
        "timing": crate::tuning::status(&sh.core, cluster.timing),
    });
    if sh.core.cfg.signer.is_some() {
        status["signer"] = json!({ "chains": signer_chains_json(sh, &cluster) });
    }
    status
}

/// This node's own entry in `status --json`: what only it knows (its
/// Raft state and error, its kernel fence, fence agents, certificate).
fn own_node_json(sh: &Shared, m: &crate::raft::Metrics, local: &crate::node::Local) -> Value {
    json!({
        "id": sh.core.cfg.id, "addr": sh.core.cfg.advertise, "role": sh.core.cfg.role(),
        "state": local.state.to_string(), "raft": sh.core.raft_state(m),
        "raft_error": m.running_state.as_ref().err().map(|e| e.to_string()),
        "key_linked": local.key_linked, "validator": local.validator, "last_seen_ms": 0,
        "upgrade": upgrade_json(sh.core.upgrade.borrow().clone(), local.validator.and_then(|v| v.height)),
        "binary": local.binary, "binary_refused": local.binary_refused,
        "probe_error": *sh.probe_error.borrow(),
        "kernel_fence": sh.kernel_fence.to_string(),
        "fence_agents": (!sh.core.cfg.fence.by_node.is_empty()).then(|| {
            let last = sh.core.fence_agents.lock().unwrap_or_else(|p| p.into_inner()).clone();
            sh.core.cfg.fence.by_node.iter().map(|(n, a)| (n.to_string(), json!({
                "agent": a.path.display().to_string(),
                "last": last.get(n),
            }))).collect::<serde_json::Map<String, Value>>()
        }),
        "tls_cert": sh.certs.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(c, _)| json!({
            "not_after": c.not_after_text, "expires_in_days": c.expires_in().div_euclid(86_400),
        })),
    })
}

/// A member's `upgrade` in `status --json`: the chain's next (or last)
/// upgrade as it reported it, and the blocks left until it from the
/// height its node reports (`null` once that is past the upgrade).
fn upgrade_json(r: Option<crate::upgrade::Report>, height: Option<u64>) -> Value {
    let Some(r) = r else {
        return Value::Null;
    };
    json!({
        "name": r.name, "height": r.height, "installed": r.installed,
        "applied": r.applied, "halted": r.halted,
        "blocks_left": height.map(|h| r.height.saturating_sub(h)),
        "passed": height.is_some_and(|h| h > r.height),
    })
}

/// Signer mode's chains in `status --json`: each chain's key, the other
/// keys members gossip for it, its watermark, height limit, node probe
/// and privval connections.
fn signer_chains_json(sh: &Shared, cluster: &crate::ledger::ClusterState) -> Vec<Value> {
    if sh.core.cfg.signer.is_none() {
        return Vec::new();
    }
    let c = sh.core.roster();
    let links = sh.privval.snapshot();
    let peers = crate::signer::keys::of_peers(&sh.core);
    let mut other_keys = crate::signer::keys::other_keys(&c.keys, &peers);
    let probe_errors = sh
        .core
        .chain_probe_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let key_failures = sh
        .core
        .key_failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    c.chains
        .iter()
        .map(|chain| {
            let w = cluster.watermark(&chain.chain_id);
            let limit = crate::signer::height_limit(&sh.core, &chain.chain_id);
            let nodes: Vec<String> = chain.nodes.iter().map(|n| n.to_string()).collect();
            json!({
                "chain_id": chain.chain_id,
                "address": c.keys.iter().find(|k| k.chain_id == chain.chain_id).map(|k| &k.address),
                "key": chain.key.to_string(),
                "key_error": key_failures.get(&chain.chain_id),
                "other_keys": other_keys.remove(&chain.chain_id).unwrap_or_default().into_iter()
                    .map(|(node, address)| json!({"node": node, "address": address}))
                    .collect::<Vec<_>>(),
                "watermark": w.map(|w| {
                    // The last signature (or the floor); a reservation
                    // beyond it is shown apart.
                    let (h, r, s) = w.signed().map_or(w.hrs(), |s| s.hrs());
                    json!({
                        "height": h,
                        "round": (r != u32::MAX).then_some(r),
                        "step": (s != u8::MAX).then_some(s),
                        "imported_floor": w.signed().is_none(),
                        "reserved_through": w.holder.map(|_| json!({
                            "height": w.height, "round": w.round, "step": w.step,
                        })),
                    })
                }),
                "signatures": w.map_or(0, |w| w.signatures),
                "height_limit": json!({"height": limit.height, "why": limit.why}),
                "node_probe_error": probe_errors.get(&chain.chain_id),
                "connections": links.iter()
                    .filter(|(node, _)| nodes.contains(node))
                    .map(|(node, up)| json!({"node": node, "connected": up}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
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
            (sh.core.cfg.id, r)
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
        let validator_host =
            crate::tls::require_validator(&req, "speak for the operator").map(|_| ());
        let message = commands(&self.sh)
            .serve(peer, validator_host, req.into_inner())
            .await?;
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
    match sh.core.raft.runtime_stats().await {
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
        sh.core.metrics.render(),
    )
}

/// 200 while the coordinator runs and (on a validator host) its node answers.
async fn health(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let local = sh.core.local.borrow().clone();
    let raft_ok = sh.core.raft_metrics().running_state.is_ok();
    let node_ok = sh.core.cfg.witness || local.validator.is_some_and(|h| h.running);
    answer(
        raft_ok && node_ok && local.state != StateName::Shutdown,
        "ok\n",
    )
}

/// 200 only on the validating node.
async fn leader(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    answer(
        sh.core.local.borrow().state == StateName::Validating,
        "validating\n",
    )
}

/// 200 only on a healthy, synced standby.
async fn replica(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let local = sh.core.local.borrow().clone();
    let ok = !sh.core.cfg.witness
        && local.state != StateName::Validating
        && !local.key_linked
        && local.validator.is_some_and(|h| h.healthy());
    answer(ok, "standby\n")
}

async fn status(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(status_json(&sh))
}
