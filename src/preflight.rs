//! `keyraft check --config FILE`: what can be checked from this host before
//! a first start, one line per check. The configuration as `keyraft run`
//! would take it; this node's certificate (its own, not expired); every
//! peer, reached over mTLS and presenting its own certificate, with the
//! round trip and the offset of its wall clock; whether the kernel fence can
//! be had here; each fence agent, asked `action=status`; the validator's
//! RPC through the configured probe.
//!
//! Owns: the checks and their report. Must not: change anything (no lock,
//! no data dir, no Raft); it only connects and asks.

use std::time::{Duration, Instant};

use crate::config::{
    ChainConfig, Config, FenceAgent, KernelFence, KeySource, NodeId, TimingProfile,
};
use crate::health::Prober;
use crate::node::wall_ms;
use crate::pb;
use crate::raft::peers::Peers;
use crate::tls::TlsMaterial;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Works, but look at it (a certificate expiring soon, a slow peer).
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    pub outcome: Outcome,
    pub what: String,
    pub detail: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        write!(f, "{tag} {}: {}", self.what, self.detail)
    }
}

fn line(outcome: Outcome, what: impl Into<String>, detail: impl Into<String>) -> Line {
    Line {
        outcome,
        what: what.into(),
        detail: detail.into(),
    }
}

/// A member's fence agent, asked `action=status` (which changes nothing):
/// it must answer, and the host should be on.
async fn fence_agent(node: NodeId, agent: &FenceAgent, timeout: Duration) -> Line {
    use crate::fence::agent::{power_status, Power};
    let what = format!("fence agent for node {node}");
    let name = agent.path.display();
    match power_status(agent, timeout).await {
        Ok(Power::On) => line(Outcome::Ok, what, format!("{name} answers: the host is on")),
        Ok(Power::Off) => line(
            Outcome::Warn,
            what,
            format!("{name} answers: the host is off (is `plug` or its equivalent right?)"),
        ),
        Err(e) => line(
            Outcome::Fail,
            what,
            format!("{name}: {e}; a takeover from node {node} would wait for it"),
        ),
    }
}

/// Signer mode: each chain's key, as opened (a file read, or a token
/// logged into and its key signing once).
pub fn signer_keys(keys: &[(ChainConfig, crate::signer::ConsensusKey)]) -> Vec<Line> {
    keys.iter()
        .map(|(chain, key)| {
            let held = match &chain.key {
                KeySource::File(_) => "in its key file",
                KeySource::Token(_) => "in its token, which signs",
            };
            line(
                Outcome::Ok,
                format!("signer key for {}", chain.chain_id),
                format!("{} {held} ({})", key.address_hex(), chain.key),
            )
        })
        .collect()
}

/// Runs every check of a configuration that `keyraft run` accepts (the
/// caller reports a refused one as it would).
pub async fn run(cfg: &Config) -> Vec<Line> {
    let mut out = vec![line(
        Outcome::Ok,
        "configuration",
        format!(
            "node {} ({}), {} peers, timing {}, key files private",
            cfg.id,
            cfg.role(),
            cfg.peers.len(),
            if cfg.timing.auto {
                format!(
                    "auto (starts {}; the cluster moves to wan when round trips stay over {} ms, back under {} ms)",
                    cfg.timing.profile,
                    crate::config::timing::LAN_RTT.as_millis(),
                    crate::config::timing::BACK_TO_LAN_RTT.as_millis()
                )
            } else {
                format!("{} (pinned by flags)", cfg.timing.profile)
            }
        ),
    )];
    let material = match &cfg.tls {
        None => {
            out.push(line(
                Outcome::Warn,
                "tls",
                "--insecure: peer traffic is plaintext and unauthenticated",
            ));
            None
        }
        Some(paths) => match TlsMaterial::load_for(paths, cfg.id, cfg.witness) {
            Ok(m) => {
                out.extend(certificates(&m));
                Some(m)
            }
            Err(e) => {
                out.push(line(Outcome::Fail, "certificate", e.to_string()));
                None
            }
        },
    };
    if material.is_some() || cfg.tls.is_none() {
        let peers = Peers::new(cfg.id, material, cfg.peers.clone());
        let checks = cfg.peers.keys().map(|id| peer(&peers, *id, cfg));
        out.extend(futures::future::join_all(checks).await);
    }
    if let Some(v) = cfg.validator.as_ref().filter(|_| cfg.signer.is_none()) {
        out.push(
            match (
                v.kernel_fence,
                crate::fence::kernel::preflight(v.activate_by, v.cgroup, v.user.is_some()),
            ) {
                (KernelFence::Off, _) => line(
                    Outcome::Warn,
                    "kernel fence",
                    "off (--kernel-fence off): a frozen host may sign once on thaw",
                ),
                (_, Ok(())) => line(
                    Outcome::Ok,
                    "kernel fence",
                    if v.user.is_some() {
                        "available: nftables, CAP_NET_ADMIN, the validator's cgroup v2 or its user"
                    } else {
                        "available: nftables, CAP_NET_ADMIN, a cgroup v2 for the validator"
                    },
                ),
                (KernelFence::Required, Err(why)) => line(
                    Outcome::Fail,
                    "kernel fence",
                    format!("required, but {why}"),
                ),
                (KernelFence::Auto, Err(why)) => line(
                    Outcome::Warn,
                    "kernel fence",
                    format!("off: {why}; a frozen host may sign once on thaw"),
                ),
            },
        );
    }
    for (node, agent) in &cfg.fence.by_node {
        out.push(fence_agent(*node, agent, cfg.fence.timeout.min(Duration::from_secs(10))).await);
    }
    if let Some(v) = &cfg.validator {
        let prober = Prober::new(v.health, &v.health_url, Duration::from_secs(2));
        out.push(match prober.probe().await {
            Ok(h) => line(
                if h.healthy() {
                    Outcome::Ok
                } else {
                    Outcome::Warn
                },
                "validator",
                format!(
                    "{} answers: running {}, synced {}, height {}",
                    v.health_url,
                    h.running,
                    h.synced,
                    h.height.map_or("-".to_string(), |h| h.to_string())
                ),
            ),
            Err(e) => line(
                Outcome::Fail,
                "validator",
                format!("{e} (check --health and --health-url)"),
            ),
        });
    }
    out
}

/// The node certificate and the CA: not expired, and not within 14 days.
fn certificates(m: &TlsMaterial) -> Vec<Line> {
    let Ok((node, ca)) = m.info() else {
        return vec![line(Outcome::Fail, "certificate", "unreadable")];
    };
    [("certificate", node), ("CA certificate", ca)]
        .into_iter()
        .map(|(what, c)| {
            let left = c.expires_in();
            let days = left.div_euclid(86_400);
            let outcome = if left <= 0 {
                Outcome::Fail
            } else if days < 14 {
                Outcome::Warn
            } else {
                Outcome::Ok
            };
            let state = if left <= 0 {
                "EXPIRED".to_string()
            } else {
                format!("expires in {days} days")
            };
            line(
                outcome,
                what,
                format!("{} until {}: {state}", c.subject, c.not_after_text),
            )
        })
        .collect()
}

/// Peer `id`: reachable, its certificate its own (the TLS handshake checks
/// the name), and how far its clock is from ours.
async fn peer(peers: &Peers, id: u64, cfg: &Config) -> Line {
    let what = format!("peer {id} ({})", peers.addr(id).unwrap_or_default());
    let client = match peers.gossip_client(id) {
        Ok(c) => c,
        Err(e) => return line(Outcome::Fail, what, e.to_string()),
    };
    let deadline = Duration::from_secs(3);
    let req = peers.request(
        pb::HelloRequest {
            id: cfg.id,
            holds: None,
        },
        deadline,
    );
    let sent = Instant::now();
    let sent_wall = wall_ms();
    let mut client = client;
    match peers.call(id, deadline, client.hello(req)).await {
        Ok(reply) => {
            let rtt = sent.elapsed();
            // Their clock at the midpoint of the round trip, against ours.
            let offset = reply.wall_ms - (sent_wall + rtt.as_millis() as i64 / 2);
            let mut outcome = Outcome::Ok;
            let mut notes = Vec::new();
            if offset.unsigned_abs() > 500 {
                outcome = Outcome::Warn;
                notes.push("clocks differ by more than 500 ms: run NTP (leases use monotonic clocks, logs and alerts do not)");
            }
            if cfg.timing.auto && rtt > crate::config::timing::WAN_RTT {
                outcome = Outcome::Warn;
                notes.push("round trip too long for any timing profile (wan holds up to 100 ms)");
            } else if cfg.timing.auto && rtt > crate::config::timing::LAN_RTT {
                notes
                    .push("the cluster will run the wan profile for this round trip (auto timing)");
            } else if !cfg.timing.auto && rtt * 3 > cfg.timing.heartbeat_deadline() * 2 {
                outcome = Outcome::Warn;
                notes.push(match cfg.timing.profile {
                    TimingProfile::Lan => "round trip too long for --timing lan: use --timing wan, or no timing flag (auto)",
                    TimingProfile::Wan => "round trip too long for the heartbeat interval",
                });
            }
            let how = if cfg.tls.is_some() {
                "mTLS, its own certificate"
            } else {
                "plaintext"
            };
            line(
                outcome,
                what,
                format!(
                    "reachable ({how}), round trip {} ms, clock offset {offset:+} ms{}{}",
                    rtt.as_millis(),
                    if notes.is_empty() { "" } else { ": " },
                    notes.join("; ")
                ),
            )
        }
        Err(e) => line(Outcome::Fail, what, e.to_string()),
    }
}
