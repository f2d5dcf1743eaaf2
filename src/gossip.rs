//! Peer status exchange: every gossip interval, and at once when its state
//! or eligibility changes, each coordinator pushes its status record to
//! every peer and gets the peer's back, which gives the
//! cluster view (last seen, round-trip time) behind `keyraft status`,
//! `keyraft_peer_*` metrics and the choice of a handover target.
//!
//! Owns: filling the [`crate::node::ClusterView`], the Gossip service
//! (Exchange, and Hello for a starting node: what this node remembers of
//! it), passing on a peer's word that it refused this node (step 9), and
//! naming a member whose signer key differs from this host's.
//! Must not: decide anything else; gossip is advisory. Safety never rests
//! on it, only on Raft and what start-up checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use tonic::{Request, Response, Status};

use crate::config::timing::WAN_RTT;
use crate::config::TimingProfile;
use crate::ledger::NodeId;
use crate::node::{Core, Local, Shared};
use crate::pb;
use crate::raft::memory::{Holds, Records, Remembered};
use crate::raft::TypeConfig;
use crate::tls::peer_of;

/// Pushes this node's status to every peer, forever: on each tick, and as
/// soon as its state or eligibility changes, so that a leader choosing a
/// handover target does not pick a node that has just become unable to
/// take over (it would refuse, and the handover would wait for a lease).
pub async fn run(sh: Arc<Shared>) {
    let interval = sh.core.cfg.timing.gossip_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut local = sh.core.local.subscribe();
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
        pushed = Some(role(&sh.core.local.borrow()));
        // Members added at runtime are dialled at their membership address.
        for (id, node) in sh
            .core
            .raft_metrics()
            .membership_config
            .membership()
            .nodes()
        {
            if sh.peers.addr(*id).is_none() {
                sh.peers.set_addr(*id, &node.addr);
            }
        }
        let mine = own_status(&sh);
        let rounds = sh.core.peer_ids().into_iter().map(|id| {
            let (sh, mine) = (sh.clone(), mine.clone());
            async move {
                let start = Instant::now();
                let Ok(mut client) = sh.peers.gossip_client(id) else {
                    return;
                };
                let req = sh.peers.request(mine, interval);
                let before = sh.memory.of(id);
                match sh.peers.call(id, interval, client.exchange(req)).await {
                    Ok(theirs) if theirs.id == id => {
                        catch(&sh, &before, &theirs).await;
                        record(&sh, theirs, Some(start.elapsed()))
                    }
                    Ok(theirs) => {
                        tracing::warn!(peer = id, "gossip answered by node {} instead", theirs.id)
                    }
                    Err(e) => tracing::debug!("gossip: {e}"),
                }
            }
        });
        futures::future::join_all(rounds).await;
        update_peer_metrics(&sh, &mut told);
        tell_other_keys(&sh, &mut told);
    }
}

/// Sets `keyraft_signer_other_key_members` and logs each member whose key
/// for a chain differs from this host's, once per change, and once it
/// agrees again.
fn tell_other_keys(sh: &Shared, told: &mut Told) {
    let roster = sh.core.roster();
    if roster.keys.is_empty() {
        return;
    }
    let peers = crate::signer::keys::of_peers(&sh.core);
    let mut now = BTreeMap::new();
    for (chain, others) in crate::signer::keys::other_keys(&roster.keys, &peers) {
        sh.core
            .metrics
            .signer_other_key_members
            .with_label_values(&[&chain])
            .set(others.len() as i64);
        now.extend(others.into_iter().map(|(id, k)| ((chain.clone(), id), k)));
    }
    for ((chain, id), theirs) in &now {
        if told.other_keys.get(&(chain.clone(), *id)) == Some(theirs) {
            continue;
        }
        let mine = roster
            .keys
            .iter()
            .find(|k| &k.chain_id == chain)
            .map_or("", |k| k.address.as_str());
        let what = match theirs {
            Some(a) => format!("has the key with address {a}"),
            None => "has no key".to_string(),
        };
        tracing::error!(
            peer = id,
            chain_id = %chain,
            "node {id} {what} for chain {chain}, this host {mine}: one of them was given the wrong validator-key; whichever leads refuses the other's forwarded requests for that chain (refused_other_key)"
        );
    }
    for (chain, id) in told.other_keys.keys() {
        if !now.contains_key(&(chain.clone(), *id)) {
            tracing::info!(peer = id, chain_id = %chain, "node {id} now has this host's key for chain {chain}");
        }
    }
    told.other_keys = now;
    let outvoted = crate::signer::keys::outvoted(&roster.keys, &peers);
    if outvoted != told.outvoted {
        match &outvoted {
            Some(why) => tracing::error!(
                "this host may not lead: {why}; give it the chain's real validator-key"
            ),
            None => tracing::info!("this host's keys are no longer outvoted: it may lead again"),
        }
        told.outvoted = outvoted;
    }
}

/// What the log has been told about each peer, so that it is told once.
#[derive(Default)]
struct Told {
    up: BTreeMap<u64, bool>,
    slow: BTreeSet<u64>,
    /// Signer mode: (chain, member) with another key, and that key.
    other_keys: BTreeMap<(String, NodeId), Option<String>>,
    /// Signer mode: why this host's key is outvoted, if it is.
    outvoted: Option<String>,
}

/// Sets the peer gauges, and logs each peer going silent or coming back
/// (once per change: openraft's own per-heartbeat errors are not logged),
/// and a round trip too long for the timing profile (once per peer).
fn update_peer_metrics(sh: &Shared, told: &mut Told) {
    let t = sh.core.timing();
    let stale = t.gossip_interval * 3;
    // When each peer was heard from and its round trip, not its status
    // (fifty chains' keys and heights, copied twice a second for nothing).
    let seen: BTreeMap<NodeId, (tokio::time::Instant, Option<std::time::Duration>)> = sh
        .core
        .view
        .with_peers(|seen| seen.iter().map(|(id, s)| (*id, (s.at, s.rtt))).collect());
    // openraft drops a heartbeat not answered within its deadline; auto
    // timing moves to wan by itself, so only a round trip beyond what wan
    // holds is worth a warning there.
    let limit = if t.auto {
        WAN_RTT
    } else {
        t.heartbeat_deadline() * 2 / 3
    };
    for id in sh.core.peer_ids() {
        let label = id.to_string();
        let s = seen.get(&id);
        let up = s.is_some_and(|(at, _)| at.elapsed() <= stale);
        let rtt = s.and_then(|(_, rtt)| *rtt);
        if let Some(rtt) = rtt.filter(|r| *r > limit) {
            if told.slow.insert(id) {
                let advice = match (t.auto, t.profile) {
                    (true, _) => "no timing profile holds for it: bring the hosts closer, or pin longer timings (--heartbeat-interval, --fence-after, --election-timeout-*)",
                    (false, TimingProfile::Lan) => "run every node with --timing wan, or with no timing flag (auto)",
                    (false, TimingProfile::Wan) => {
                        "raise --heartbeat-interval to three round trips, and the lease with it"
                    }
                };
                tracing::warn!(
                    peer = id,
                    rtt_ms = rtt.as_millis() as u64,
                    "round trip to peer {id} takes {rtt:?}, more than the timing in force holds ({limit:?}): leases will lapse and the validator be fenced; {advice}"
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
        sh.core
            .metrics
            .peer_up
            .with_label_values(&[&label])
            .set(i64::from(up));
        sh.core
            .metrics
            .member_refused
            .with_label_values(&[&label])
            .set(i64::from(sh.memory.of(id).refused.is_some()));
        if let Some(rtt) = rtt {
            sh.core
                .metrics
                .peer_rtt
                .with_label_values(&[&label])
                .set(rtt.as_secs_f64());
        }
    }
}

/// This node's status record.
pub fn own_status(sh: &Shared) -> pb::NodeStatus {
    pb::NodeStatus {
        remembered: sh
            .memory
            .all()
            .into_iter()
            .map(|(id, r)| pb::Remembered {
                id,
                term: r.term,
                committed: r.committed,
                refused: r.refused.unwrap_or_default(),
            })
            .collect(),
        signer_keys: sh.core.roster().keys.clone(),
        ..core_status(&sh.core, sh.start_holds)
    }
}

/// The status record as far as a [`Core`] shows it (all but what this
/// node remembers of its peers), never below `holds`, what its data dir
/// held at start: openraft reports term 0 and no log until its core has
/// loaded them, and a peer judging that would refuse an honest node. The
/// simulator's gossip carries the same record.
pub fn core_status<SM: RaftStateMachine<TypeConfig>>(
    core: &Core<SM>,
    holds: Holds,
) -> pb::NodeStatus {
    let m = core.raft_metrics();
    let local = core.local.borrow().clone();
    pb::NodeStatus {
        id: core.cfg.id,
        role: core.cfg.role().to_string(),
        state: local.state.to_string(),
        raft: core.raft_state(&m),
        term: m.current_term.max(holds.term),
        leader: m.current_leader,
        validator: local.validator.map(Into::into),
        key_linked: local.key_linked,
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: core.started.elapsed().as_millis() as u64,
        addr: core.cfg.advertise.clone(),
        eligible: local.eligible,
        last_log_index: m.last_log_index.unwrap_or(0).max(holds.last_index),
        remembered: Vec::new(),
        signer_keys: Vec::new(),
        features: vec![
            crate::signer::ahead::FEATURE.to_string(),
            crate::signer::confirm::FEATURE.to_string(),
            crate::signer::bytes::FEATURE.to_string(),
            crate::supervisor::BINARY_FEATURE.to_string(),
        ],
        binary: local.binary.clone(),
        binary_refused: local.binary_refused.clone(),
        upgrade: core.upgrade.borrow().as_ref().map(Into::into),
        chain_heights: core
            .chain_nodes
            .borrow()
            .iter()
            .map(|(chain, h)| pb::ChainHeight {
                chain_id: chain.clone(),
                node: Some((*h).into()),
            })
            .collect(),
    }
}

/// A peer whose answer shows a term or a log below what this node saw of
/// it before asking has gone back in time (its data dir was restored while
/// this node was away): refused here from now on, and told so.
async fn catch(sh: &Shared, before: &Remembered, theirs: &pb::NodeStatus) {
    if !sh.core.gate.votes_open() {
        return;
    }
    let holds = Holds {
        term: theirs.term,
        last_index: theirs.last_log_index,
    };
    // A refusal is taken back only by a start's Hello (what its data dir
    // holds before it takes any message): a running node's term rises with
    // any message from a higher term, this node's own included.
    if before.refused.is_some() {
        return;
    }
    if let Some(gap) = before.gap(holds) {
        let why = format!(
            "node {} answered below what node {} saw of it ({gap}): its data dir was restored from an older copy or lost writes",
            theirs.id, sh.core.cfg.id
        );
        match sh.memory.refuse(theirs.id, before, why.clone(), sh.core.cfg.id).await {
            Ok(true) => tracing::error!("REFUSED: {why}; its votes and acknowledgements are ignored until it starts with a data dir that holds what was seen of it"),
            Ok(false) => {}
            Err(e) => tracing::error!("cannot record the refusal of node {}: {e}", theirs.id),
        }
    }
}

/// Records a peer's status, and hears it if the peer says it refused this
/// node (step 9): the node then stops, unless it is rejoining.
fn record(sh: &Arc<Shared>, theirs: pb::NodeStatus, rtt: Option<std::time::Duration>) {
    // A refusal is heard only if what this node's data dir held when it
    // started is behind what the peer saw of it: one that started on a good
    // copy is not (the peer made the refusal of an older start, and takes
    // it back at this node's next Hello to it).
    let holds = sh.start_holds;
    let refusal = theirs
        .remembered
        .iter()
        .find(|r| r.id == sh.core.cfg.id && !r.refused.is_empty());
    let behind = refusal.is_some_and(|r| {
        let seen = Remembered {
            term: r.term,
            committed: r.committed,
            ..Remembered::default()
        };
        seen.gap(holds).is_some()
    });
    if refusal.is_some() && !behind {
        // A refusal of an earlier start: this start's Hello takes it back.
        tokio::spawn(crate::join::hello_again(sh.clone(), theirs.id));
    }
    let told = refusal
        .filter(|_| behind)
        .map(|r| format!("node {} refused this node: {}", theirs.id, r.refused));
    sh.core.view.record(theirs, rtt);
    if let Some(why) = told.filter(|_| sh.core.gate.votes_open()) {
        sh.refused.send_if_modified(|r| {
            if r.is_none() {
                tracing::error!(
                    "REFUSED: {why}; stopping (move the data dir away and start with --rejoin)"
                );
                *r = Some(why);
                true
            } else {
                false
            }
        });
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
        let crate::tls::PeerId(peer, role) = crate::tls::caller_of(&req)?;
        let status = req.into_inner();
        if status.id != peer {
            return Err(Status::permission_denied(format!(
                "node {peer} sent node {}'s status",
                status.id
            )));
        }
        // The role is the certificate's (`--insecure`: the peer's word).
        let role = role.map_or(status.role.as_str(), |r| r.name());
        self.sh.core.view.prove_role(peer, role);
        record(&self.sh, status, None);
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
        let holds = req.get_ref().holds.map(|h| Holds {
            term: h.term,
            last_index: h.last_index,
        });
        hello_reply(&self.sh.core, &*self.sh.memory, peer, holds)
            .await
            .map(Response::new)
            .map_err(Status::unavailable)
    }
}

/// This node's answer to `peer`'s Hello at its start (step 9): what this
/// node saw of it, and, judged against what its data dir `holds`, whether
/// it is refused (behind) or any earlier refusal is taken back (a good
/// copy put back). The simulator's processes answer with it too.
///
/// A node that lost its own data dir and waits to be taken back
/// (`--rejoin`, its votes closed) does not answer: it remembers nothing of
/// anyone, and its answer would count toward the majority a restored copy
/// needs to start.
pub async fn hello_reply<SM: RaftStateMachine<TypeConfig>>(
    core: &Core<SM>,
    memory: &impl Records,
    peer: NodeId,
    holds: Option<Holds>,
) -> Result<pb::HelloReply, &'static str> {
    if core.gate.joined() && !core.gate.votes_open() {
        return Err(
            "this node lost its data dir and is rejoining: it cannot say what it saw of anyone",
        );
    }
    let m = core.raft_metrics();
    let initialized = m
        .membership_config
        .membership()
        .voter_ids()
        .next()
        .is_some();
    let registered = core.cluster.borrow().registered.contains(&peer);
    let mut seen = memory.of(peer);
    if let Some(holds) = holds {
        match seen.gap(holds) {
            Some(gap) => seen.refused = Some(gap.to_string()),
            None => {
                seen.refused = None;
                if let Err(e) = memory.clear_refusal(peer).await {
                    tracing::warn!("cannot take back the refusal of node {peer}: {e}");
                }
            }
        }
    }
    Ok(pb::HelloReply {
        initialized,
        term: m.current_term,
        leader: m.current_leader,
        registered,
        wall_ms: crate::node::wall_ms(),
        seen_term: seen.term,
        seen_committed: seen.committed,
        refused: seen.refused.unwrap_or_default(),
    })
}
