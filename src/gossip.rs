//! Peer status exchange: every gossip interval, and at once when its state
//! or eligibility changes, each coordinator pushes its status record to
//! every peer and gets the peer's back, which gives the
//! cluster view (last seen, round-trip time) behind `keyraft status`,
//! `keyraft_peer_*` metrics and the choice of a handover target.
//!
//! Owns: filling the [`crate::node::ClusterView`], the Gossip service (Exchange, and Hello for a
//! node starting with an empty data dir). Must not: decide anything; gossip
//! is advisory. Safety never rests on it, only on Raft.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::config::TimingProfile;
use crate::node::{Local, Shared};
use crate::pb;
use crate::tls::peer_of;

/// Pushes this node's status to every peer, forever: on each tick, and as
/// soon as its state or eligibility changes, so that a leader choosing a
/// handover target does not pick a node that has just become unable to
/// take over (it would refuse, and the handover would wait for a lease).
pub async fn run(sh: Arc<Shared>) {
    let interval = sh.cfg.timing.gossip_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut local = sh.local.subscribe();
    let role = |l: &Local| (l.state, l.eligible);
    let mut pushed = None;
    let mut told = Told::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = local.changed() => {
                if pushed == Some(role(&local.borrow_and_update())) {
                    continue;
                }
            }
        }
        pushed = Some(role(&sh.local.borrow()));
        // Members added at runtime are dialled at their membership address.
        for (id, node) in sh.raft_metrics().membership_config.membership().nodes() {
            if sh.peers.addr(*id).is_none() {
                sh.peers.set_addr(*id, &node.addr);
            }
        }
        let mine = own_status(&sh);
        let rounds = sh.peer_ids().into_iter().map(|id| {
            let (sh, mine) = (sh.clone(), mine.clone());
            async move {
                let start = Instant::now();
                let Ok(mut client) = sh.peers.gossip_client(id) else {
                    return;
                };
                let req = sh.peers.request(mine, interval);
                match sh.peers.call(id, interval, client.exchange(req)).await {
                    Ok(theirs) if theirs.id == id => sh.view.record(theirs, Some(start.elapsed())),
                    Ok(theirs) => {
                        tracing::warn!(peer = id, "gossip answered by node {} instead", theirs.id)
                    }
                    Err(e) => tracing::debug!("gossip: {e}"),
                }
            }
        });
        futures::future::join_all(rounds).await;
        update_peer_metrics(&sh, &mut told);
    }
}

/// What the log has been told about each peer, so that it is told once.
#[derive(Default)]
struct Told {
    up: BTreeMap<u64, bool>,
    slow: BTreeSet<u64>,
}

/// Sets the peer gauges, and logs each peer going silent or coming back
/// (once per change: openraft's own per-heartbeat errors are not logged),
/// and a round trip too long for the timing profile (once per peer).
fn update_peer_metrics(sh: &Shared, told: &mut Told) {
    let t = sh.cfg.timing;
    let stale = t.gossip_interval * 3;
    let seen = sh.view.snapshot();
    for id in sh.peer_ids() {
        let label = id.to_string();
        let s = seen.get(&id);
        let up = s.is_some_and(|s| s.at.elapsed() <= stale);
        // openraft drops a heartbeat not answered within one interval.
        if let Some(rtt) = s.and_then(|s| s.rtt).filter(|r| *r * 3 > t.heartbeat * 2) {
            if told.slow.insert(id) {
                let advice = match t.profile {
                    TimingProfile::Lan => "run every node with --timing wan",
                    TimingProfile::Wan => {
                        "raise --heartbeat-interval to three round trips, and the lease with it"
                    }
                };
                tracing::warn!(
                    peer = id,
                    rtt_ms = rtt.as_millis() as u64,
                    "round trip to peer {id} takes {rtt:?}, too close to the heartbeat interval ({:?}) that each heartbeat must be answered in: leases will lapse and the validator be fenced; {advice}",
                    t.heartbeat
                );
            }
        }
        match (told.up.insert(id, up), up) {
            (Some(true), false) => {
                tracing::warn!(
                    peer = id,
                    "peer {id} silent for {stale:?}: unreachable or down"
                )
            }
            (Some(false), true) => tracing::info!(peer = id, "peer {id} reachable again"),
            _ => {}
        }
        sh.metrics
            .peer_up
            .with_label_values(&[&label])
            .set(i64::from(up));
        if let Some(rtt) = s.and_then(|s| s.rtt) {
            sh.metrics
                .peer_rtt
                .with_label_values(&[&label])
                .set(rtt.as_secs_f64());
        }
    }
}

/// This node's status record.
pub fn own_status(sh: &Shared) -> pb::NodeStatus {
    let m = sh.raft_metrics();
    let local = sh.local.borrow().clone();
    pb::NodeStatus {
        id: sh.cfg.id,
        role: sh.cfg.role().to_string(),
        state: local.state.to_string(),
        raft: sh.raft_state(&m),
        term: m.current_term,
        leader: m.current_leader,
        validator: local.validator.map(|h| pb::ValidatorHealth {
            running: h.running,
            synced: h.synced,
            height: h.height.unwrap_or(0),
        }),
        key_linked: local.key_linked,
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: sh.started.elapsed().as_millis() as u64,
        addr: sh.cfg.advertise.clone(),
        eligible: local.eligible,
    }
}

pub struct GossipService {
    sh: Arc<Shared>,
}

impl GossipService {
    pub fn new(sh: Arc<Shared>) -> Self {
        Self { sh }
    }
}

#[tonic::async_trait]
impl pb::gossip_server::Gossip for GossipService {
    async fn exchange(
        &self,
        req: Request<pb::NodeStatus>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let peer = peer_of(&req)?;
        let status = req.into_inner();
        if status.id != peer {
            return Err(Status::permission_denied(format!(
                "node {peer} sent node {}'s status",
                status.id
            )));
        }
        self.sh.view.record(status, None);
        Ok(Response::new(own_status(&self.sh)))
    }

    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let peer = peer_of(&req)?;
        if req.get_ref().id != peer {
            return Err(Status::permission_denied("hello on behalf of another node"));
        }
        let m = self.sh.raft_metrics();
        let initialized = m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_some();
        let registered = self.sh.cluster.borrow().registered.contains(&peer);
        Ok(Response::new(pb::HelloReply {
            initialized,
            term: m.current_term,
            leader: m.current_leader,
            registered,
            wall_ms: crate::node::wall_ms(),
        }))
    }
}
