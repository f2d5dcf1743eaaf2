//! The Prometheus registry of one coordinator (prefix `keyraft_`).
//!
//! Owns: metric names, labels, help texts and the text encoding served on
//! `/metrics`. Must not: compute anything; the parts that know a value set it.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// The coordinator states, as labelled in `keyraft_state{type=...}`.
pub const STATES: [&str; 6] = [
    "Startup",
    "Syncing",
    "Registering",
    "Voting",
    "Validating",
    "Shutdown",
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub state: IntGaugeVec,
    pub raft_term: IntGauge,
    pub raft_leader: IntGauge,
    pub raft_last_log_index: IntGauge,
    pub raft_applied_index: IntGauge,
    /// fdatasyncs of the Raft log, and the entries they made durable.
    pub raft_log_syncs: IntCounter,
    pub raft_log_entries_synced: IntCounter,
    pub quorum: IntGauge,
    pub quorum_ack_age: Gauge,
    pub key_linked: IntGauge,
    pub activations: IntCounter,
    pub deactivations: IntCounterVec,
    pub failover_seconds: Histogram,
    pub validator_up: IntGauge,
    pub validator_synced: IntGauge,
    pub validator_height: IntGauge,
    pub validator_restarts: IntCounter,
    pub peer_up: IntGaugeVec,
    pub peer_rtt: GaugeVec,
    /// 1 for the timing profile in force, by profile and how it was chosen.
    pub timing_profile: IntGaugeVec,
    pub member_refused: IntGaugeVec,
    pub paused: IntGauge,
    /// 0 once openraft's core stopped (keyraft then exits with code 8).
    pub raft_running: IntGauge,
    pub kernel_fence: IntGauge,
    pub fence_agent_attempts: IntCounterVec,
    pub sign_requests: IntCounterVec,
    pub sign_seconds: HistogramVec,
    pub signer_watermark: IntGaugeVec,
    /// Signer mode: members whose key for the chain is not this host's.
    pub signer_other_key_members: IntGaugeVec,
    /// Where a signature's time goes (the sign budget), by stage.
    pub sign_stage_seconds: HistogramVec,
    pub privval_connected: IntGaugeVec,
    /// Signer mode: 1 while a chain's `node-rpc` answers its probe.
    pub chain_node_up: IntGaugeVec,
    /// Signer mode: 1 while the chain's key signs (a token answers).
    pub signer_key_up: IntGaugeVec,
    /// Signer mode: 1 on the member that signs (the leader), 0 on the
    /// ones that forward.
    pub signing: IntGauge,
    pub tls_cert_expiry: IntGaugeVec,
    /// `--upgrades cosmovisor`: the height of the upgrade this host's node
    /// waits for, by name, until its node passes it.
    pub upgrade_pending: IntGaugeVec,
    /// `--upgrades cosmovisor`: 1 while this host has the binary for that
    /// upgrade (or runs it), 0 while it lacks it.
    pub upgrade_ready: IntGaugeVec,
    /// Validator mode: 1 while this host sees the chain halted for the
    /// upgrade `name`.
    pub upgrade_halted: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("keyraft")
}

impl Metrics {
    /// A chain's series as it starts to be signed for (at start, or
    /// added by a reload): its key up, its counters at zero.
    pub fn chain_added(&self, chain: &str) {
        self.signer_watermark.with_label_values(&[chain]).set(-1);
        self.signer_other_key_members.with_label_values(&[chain]);
        self.signer_key_up.with_label_values(&[chain]).set(1);
        for kind in ["proposal", "prevote", "precommit"] {
            for result in [
                "signed",
                "refused_equivocation",
                "refused_regression",
                "no_leader",
            ] {
                self.sign_requests.with_label_values(&[chain, kind, result]);
            }
        }
    }

    /// A chain a reload removed: its gauges go, so that no dashboard shows
    /// a key or a node of a chain no longer signed for. Its request
    /// counters stay until the process restarts (a counter that vanishes
    /// reads as a reset).
    pub fn chain_removed(&self, chain: &str) {
        let _ = self.signer_key_up.remove_label_values(&[chain]);
        let _ = self.chain_node_up.remove_label_values(&[chain]);
        let _ = self.signer_watermark.remove_label_values(&[chain]);
        let _ = self.signer_other_key_members.remove_label_values(&[chain]);
    }

    /// A witness has no validator, so it exports no `keyraft_validator_*`
    /// series (a zero there would read as a node that is down).
    ///
    /// The `keyraft_sign_*` and `keyraft_privval_*` series exist in signer
    /// mode only.
    ///
    /// `fenced`: the members this node has a fence agent for (their
    /// `keyraft_fence_agent_attempts_total` series start at 0).
    ///
    /// `chains`: signer mode's chain ids (none outside signer mode).
    pub fn new(
        version: &str,
        witness: bool,
        chains: &[&str],
        fenced: &[u64],
    ) -> Result<Metrics, prometheus::Error> {
        let signer = !chains.is_empty();
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            opts("build_info", "Build information and role; always 1."),
            &["version", "role"],
        )?;
        let role = match (witness, signer) {
            (true, _) => "witness",
            (false, true) => "signer",
            (false, false) => "validator",
        };
        build.with_label_values(&[version, role]).set(1);
        let m = Metrics::defined(registry)?;
        m.register(witness, signer, chains, fenced)?;
        m.registry.register(Box::new(build))?;
        m.set_state("Startup");
        Ok(m)
    }

    /// Every metric, defined (none registered yet).
    fn defined(registry: Registry) -> Result<Metrics, prometheus::Error> {
        Ok(Metrics {
            state: IntGaugeVec::new(opts("state", "Coordinator state, one-hot."), &["type"])?,
            raft_term: IntGauge::with_opts(opts("raft_term", "Current Raft term."))?,
            raft_leader: IntGauge::with_opts(opts("raft_leader", "1 on the Raft leader."))?,
            raft_last_log_index: IntGauge::with_opts(opts("raft_last_log_index", "Index of the last Raft log entry stored here."))?,
            raft_applied_index: IntGauge::with_opts(opts("raft_applied_index", "Index of the last Raft log entry applied here."))?,
            raft_log_syncs: IntCounter::with_opts(opts("raft_log_syncs_total", "fdatasyncs of the Raft log file (each makes every append written before it durable)."))?,
            raft_log_entries_synced: IntCounter::with_opts(opts("raft_log_entries_synced_total", "Raft log entries made durable by those fdatasyncs (entries per sync: this over raft_log_syncs_total)."))?,
            quorum: IntGauge::with_opts(opts("quorum", "1 while this node sees a leader backed by a quorum."))?,
            quorum_ack_age: Gauge::with_opts(opts(
                "quorum_ack_age_seconds",
                "Leader: age of the last quorum-acked heartbeat. Follower: time since the leader was last heard.",
            ))?,
            key_linked: IntGauge::with_opts(opts("key_linked", "1 while the validator key is linked on this host."))?,
            activations: IntCounter::with_opts(opts("activations_total", "Times this node started validating."))?,
            deactivations: IntCounterVec::new(
                opts("deactivations_total", "Times this node stopped validating, by reason."),
                &["reason"],
            )?,
            failover_seconds: Histogram::with_opts(
                HistogramOpts::new("failover_seconds", "From losing the old leader to this node's validator started.")
                    .namespace("keyraft")
                    .buckets(vec![0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0]),
            )?,
            validator_up: IntGauge::with_opts(opts("validator_up", "1 while the validator node runs and answers."))?,
            validator_synced: IntGauge::with_opts(opts("validator_synced", "1 while the validator node is synced."))?,
            validator_height: IntGauge::with_opts(opts("validator_height", "Latest block height the validator node reports."))?,
            validator_restarts: IntCounter::with_opts(opts(
                "validator_restarts_total",
                "Unplanned restarts of the validator node.",
            ))?,
            peer_up: IntGaugeVec::new(opts("peer_up", "1 while gossip from the peer is fresh."), &["peer"])?,
            peer_rtt: GaugeVec::new(opts("peer_rtt_seconds", "Gossip round-trip time to the peer."), &["peer"])?,
            timing_profile: IntGaugeVec::new(
                opts("timing_profile", "1 for the timing profile in force (lan, wan); chosen=auto when the cluster picks it from measured round trips, pinned when this node's flags set it."),
                &["profile", "chosen"],
            )?,
            member_refused: IntGaugeVec::new(
                opts("member_refused", "1 while this node refuses the member: it answered below what this node saw of it (a data dir restored from an older copy or wiped), docs/design.md step 9."),
                &["node"],
            )?,
            paused: IntGauge::with_opts(opts("paused", "1 while the cluster is paused (no automatic failover)."))?,
            raft_running: IntGauge::with_opts(opts("raft_running", "1 while the Raft core runs; 0 once it stopped (a fatal storage error or a bug): keyraft then fences its validator and exits with code 8 for its process manager to restart it."))?,
            kernel_fence: IntGauge::with_opts(opts("kernel_fence", "1 while the kernel fence (an nftables lease on the keyed validator's traffic) is on for this host's validator."))?,
            fence_agent_attempts: IntCounterVec::new(
                opts("fence_agent_attempts_total", "Fence agent attempts to power a member's host off before a takeover, by member and result (off, failed, timeout, still_on)."),
                &["node", "result"],
            )?,
            sign_requests: IntCounterVec::new(
                opts("sign_requests_total", "Sign requests from this host's nodes, by chain, type (proposal, prevote, precommit) and result."),
                &["chain", "type", "result"],
            )?,
            sign_seconds: HistogramVec::new(
                HistogramOpts::new("sign_seconds", "From a node's sign request to the answer (commit through Raft included), by chain.")
                    .namespace("keyraft")
                    .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
                &["chain"],
            )?,
            signer_watermark: IntGaugeVec::new(
                opts("signer_watermark_height", "Signer mode: the height of each chain's replicated watermark as this member applied it (-1 before its floor is imported)."),
                &["chain"],
            )?,
            signer_other_key_members: IntGaugeVec::new(
                opts("signer_other_key_members", "Signer mode: members (heard from by gossip) whose key for the chain is not this host's, another key or none; whichever leads refuses the other's forwarded requests for it (refused_other_key)."),
                &["chain"],
            )?,
            sign_stage_seconds: HistogramVec::new(
                HistogramOpts::new("sign_stage_seconds", "Where a signature's time goes, by stage: lock (waiting for the one signing at a time), wait (for the commit of the last signature, which may reserve this one), check, commit (Raft: propose to applied, a majority's fsync included; none where a reservation covers the request), sign (ed25519), forward (a follower's round trip to the leader), serve (the leader's part of a forwarded request).")
                    .namespace("keyraft")
                    .buckets(vec![0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05, 0.25, 1.0, 2.0]),
                &["stage"],
            )?,
            privval_connected: IntGaugeVec::new(
                opts("privval_connected", "1 while this host is connected to the node's privval port, by chain and node."),
                &["chain", "node"],
            )?,
            chain_node_up: IntGaugeVec::new(
                opts("chain_node_up", "Signer mode: 1 while the chain's node on this host (its node-rpc) answers its probe, 0 while it fails (status shows why); only for chains with a node-rpc."),
                &["chain"],
            )?,
            signer_key_up: IntGaugeVec::new(
                opts("signer_key_up", "Signer mode: 1 while the chain's key on this host signs, 0 while it fails (a PKCS#11 token that does not answer, or holds another key): the host may not lead meanwhile. A key file is always 1."),
                &["chain"],
            )?,
            signing: IntGauge::with_opts(opts("signing", "Signer mode: 1 on the member that signs (the Raft leader), 0 on one that forwards its nodes' requests."))?,
            tls_cert_expiry: IntGaugeVec::new(
                opts("tls_cert_expiry_seconds", "Seconds until the certificate in use expires (negative once it has), cert node or ca."),
                &["cert"],
            )?,
            upgrade_pending: IntGaugeVec::new(
                opts("upgrade_pending", "With --upgrades cosmovisor: the height of the chain upgrade this host's node has not passed yet, by upgrade name (scheduled, or halted at)."),
                &["name"],
            )?,
            upgrade_ready: IntGaugeVec::new(
                opts("upgrade_ready", "With --upgrades cosmovisor, while an upgrade is pending: 1 when this host (node) has its binary in cosmovisor's tree or runs it, 0 when it lacks it."),
                &["node"],
            )?,
            upgrade_halted: IntGaugeVec::new(
                opts("upgrade_halted", "Validator mode with --upgrades cosmovisor: 1 while this host sees the chain halted for the upgrade (name), until a node is past it."),
                &["name"],
            )?,
            registry,
        })
    }

    /// Registers the metrics this node's role has (a witness no
    /// validator's, validator mode no signer's), with their label values
    /// present from the start.
    fn register(
        &self,
        witness: bool,
        signer: bool,
        chains: &[&str],
        fenced: &[u64],
    ) -> Result<(), prometheus::Error> {
        let m = self;
        let r = &m.registry;
        r.register(Box::new(m.state.clone()))?;
        r.register(Box::new(m.raft_term.clone()))?;
        r.register(Box::new(m.raft_leader.clone()))?;
        r.register(Box::new(m.raft_last_log_index.clone()))?;
        r.register(Box::new(m.raft_applied_index.clone()))?;
        r.register(Box::new(m.raft_log_syncs.clone()))?;
        r.register(Box::new(m.raft_log_entries_synced.clone()))?;
        r.register(Box::new(m.quorum.clone()))?;
        r.register(Box::new(m.quorum_ack_age.clone()))?;
        r.register(Box::new(m.key_linked.clone()))?;
        r.register(Box::new(m.activations.clone()))?;
        r.register(Box::new(m.deactivations.clone()))?;
        r.register(Box::new(m.failover_seconds.clone()))?;
        if !witness {
            r.register(Box::new(m.validator_up.clone()))?;
            r.register(Box::new(m.validator_synced.clone()))?;
            r.register(Box::new(m.validator_height.clone()))?;
            r.register(Box::new(m.validator_restarts.clone()))?;
            if !signer {
                r.register(Box::new(m.kernel_fence.clone()))?;
            }
            if !fenced.is_empty() {
                r.register(Box::new(m.fence_agent_attempts.clone()))?;
                for node in fenced {
                    for result in ["off", "failed", "timeout", "still_on"] {
                        m.fence_agent_attempts
                            .with_label_values(&[&node.to_string(), result]);
                    }
                }
            }
        }
        r.register(Box::new(m.peer_up.clone()))?;
        r.register(Box::new(m.peer_rtt.clone()))?;
        r.register(Box::new(m.timing_profile.clone()))?;
        r.register(Box::new(m.member_refused.clone()))?;
        r.register(Box::new(m.paused.clone()))?;
        r.register(Box::new(m.raft_running.clone()))?;
        m.raft_running.set(1);
        r.register(Box::new(m.tls_cert_expiry.clone()))?;
        if !witness {
            r.register(Box::new(m.upgrade_pending.clone()))?;
            r.register(Box::new(m.upgrade_ready.clone()))?;
            r.register(Box::new(m.upgrade_halted.clone()))?;
        }
        if signer {
            r.register(Box::new(m.sign_requests.clone()))?;
            r.register(Box::new(m.sign_seconds.clone()))?;
            r.register(Box::new(m.sign_stage_seconds.clone()))?;
            r.register(Box::new(m.privval_connected.clone()))?;
            r.register(Box::new(m.chain_node_up.clone()))?;
            r.register(Box::new(m.signer_key_up.clone()))?;
            r.register(Box::new(m.signing.clone()))?;
            r.register(Box::new(m.signer_watermark.clone()))?;
            r.register(Box::new(m.signer_other_key_members.clone()))?;
            for chain in chains {
                m.chain_added(chain);
            }
        }
        for reason in [
            "leadership",
            "lease",
            "handover",
            "shutdown",
            "validator_exit",
        ] {
            m.deactivations.with_label_values(&[reason]);
        }
        Ok(())
    }

    /// Sets the one-hot state gauge (only when the state changes).
    pub fn set_state(&self, name: &str) {
        if self.state.with_label_values(&[name]).get() == 1 {
            return;
        }
        for s in STATES {
            self.state.with_label_values(&[s]).set(i64::from(s == name));
        }
    }

    /// Sets the one-hot timing profile gauge.
    pub fn set_timing(&self, profile: &str, auto: bool) {
        let chosen = if auto { "auto" } else { "pinned" };
        for p in ["lan", "wan"] {
            self.timing_profile
                .with_label_values(&[p, chosen])
                .set(i64::from(p == profile));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
