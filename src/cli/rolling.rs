//! `keyraft upgrade --binary PATH`: a new program for the validator node,
//! rolled through a validator-mode cluster the way a switchover moves the
//! key: each standby first (one at a time, until its node is synced as the
//! new program), then a switchover to an upgraded standby, then the old
//! active host. For chains that upgrade without a halt (NEAR); a chain
//! that halts for its upgrades uses `--upgrades cosmovisor` instead.
//!
//! Owns: the order of the roll, as a pure decision over `status --json`
//! ([`next`]), and the loop that carries it out through the leader's
//! operator commands. Must not: change anything but through those commands
//! (the leader checks each), or wait without a deadline.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use tokio::time::Instant;

use super::AdminAddr;
use crate::pb::{self, cluster_command::Kind};

/// `status --json`, as far as the roll reads it.
#[derive(Debug, Deserialize)]
pub struct Status {
    cluster: Cluster,
    nodes: Vec<Member>,
}

#[derive(Debug, Deserialize)]
struct Cluster {
    active_validator: Option<u64>,
    #[serde(default)]
    binaries: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Member {
    id: u64,
    role: Option<String>,
    state: String,
    validator: Option<Node>,
    binary: Option<String>,
    binary_refused: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Node {
    running: bool,
    synced: bool,
}

/// What the roll does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Commit the program for this host (a standby restarts its node).
    Set(u64),
    /// Hand the key to this upgraded standby.
    Switchover(u64),
    /// Nothing to do until this is so.
    Wait(String),
    /// Every host runs its node as the program, synced, and one validates.
    Done(u64),
    /// Waiting will not help.
    Stuck(String),
}

/// The next step of rolling `path` through the cluster `s` describes.
pub fn next(s: &Status, path: &str) -> Step {
    // Validator hosts, and members not heard from (their role unknown).
    let hosts: Vec<&Member> = s
        .nodes
        .iter()
        .filter(|m| m.role.as_deref() == Some("validator") || m.state == "Unknown")
        .collect();
    let committed = |m: &Member| {
        s.cluster
            .binaries
            .get(&m.id.to_string())
            .map(String::as_str)
            == Some(path)
    };
    let synced = |m: &Member| m.validator.as_ref().is_some_and(|v| v.running && v.synced);
    let upgraded = |m: &Member| m.binary.as_deref() == Some(path) && synced(m);
    if let Some(m) = hosts.iter().find(|m| m.state == "Unknown") {
        return Step::Wait(format!("node {} to be heard from", m.id));
    }
    // A refusal of this path (one of another path is an earlier roll's).
    let refused =
        |m: &&&Member| committed(m) && m.binary_refused.as_ref().is_some_and(|w| w.contains(path));
    if let Some(m) = hosts.iter().find(refused) {
        let why = m.binary_refused.as_deref().unwrap_or_default();
        return Step::Stuck(format!("node {}: {why}", m.id));
    }
    // Every host already runs it, none by a roll: its file was replaced in
    // place, which cannot be told from the old one by its path.
    if hosts
        .iter()
        .all(|m| m.binary.as_deref() == Some(path) && !committed(m))
    {
        return Step::Stuck(format!(
            "every host already runs {path} as configured: install the new binary at a new path and roll that"
        ));
    }
    let Some(holder) = s
        .cluster
        .active_validator
        .and_then(|h| hosts.iter().find(|m| m.id == h))
    else {
        // Mid-handover or failover, who is a standby is not known: only a
        // host whose node is not synced anyway is given the program (a
        // roll back, when the last one fails everywhere).
        return match hosts.iter().find(|m| !committed(m) && !synced(m)) {
            Some(m) => Step::Set(m.id),
            None => Step::Wait("a host to validate".into()),
        };
    };
    let standbys: Vec<&&Member> = hosts.iter().filter(|m| m.id != holder.id).collect();
    if let Some(m) = standbys.iter().find(|m| committed(m) && !upgraded(m)) {
        return Step::Wait(format!("node {}'s node to run synced as {path}", m.id));
    }
    if let Some(m) = standbys.iter().find(|m| !committed(m)) {
        return Step::Set(m.id);
    }
    if upgraded(holder) {
        return Step::Done(holder.id);
    }
    if holder.binary.as_deref() == Some(path) {
        return Step::Wait(format!("the active node {} to run synced", holder.id));
    }
    match standbys.first() {
        Some(to) => Step::Switchover(to.id),
        None => Step::Stuck(format!(
            "node {} validates alone: with no standby to hand the key to, the roll would stop the validator (add a member first)",
            holder.id
        )),
    }
}

/// How long a repeated step is taken for the last one still on its way
/// (gossip and the handover take this long to show in the status).
const SETTLE: Duration = Duration::from_secs(15);

/// How long a step must stay the one to take before it is taken: a
/// restarted node's first probe may still show its predecessor's health.
const CONFIRM: Duration = Duration::from_secs(2);

/// Rolls `path` through the cluster within `timeout_s` seconds; exit 0
/// once [`Step::Done`].
pub async fn roll(addr: &AdminAddr, path: &str, timeout_s: u64) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(timeout_s);
    if !std::path::Path::new(path).is_absolute() {
        bail!("--binary {path}: give an absolute path (the same on every host)");
    }
    let deadline = Instant::now() + timeout;
    let mut last: Option<(Step, Instant)> = None;
    let mut seen: Option<(Step, Instant)> = None;
    let mut said = String::new();
    loop {
        let s: Status = serde_json::from_value(super::admin::status_value(addr).await?)
            .context("this member's status is not what `keyraft upgrade` reads: is it the same keyraft version?")?;
        let step = next(&s, path);
        let repeated = last
            .as_ref()
            .is_some_and(|(l, at)| *l == step && at.elapsed() < SETTLE);
        if seen.as_ref().is_none_or(|(s, _)| *s != step) {
            seen = Some((step.clone(), Instant::now()));
        }
        let confirmed = seen.as_ref().is_some_and(|(_, at)| at.elapsed() >= CONFIRM);
        match &step {
            Step::Done(_) | Step::Set(_) | Step::Switchover(_) if !confirmed => {}
            Step::Done(active) => {
                println!("every host runs its node as {path}, synced; node {active} validates");
                return Ok(ExitCode::SUCCESS);
            }
            Step::Stuck(why) => bail!("the roll stopped: {why}"),
            Step::Wait(why) if *why != said => {
                println!("waiting for {why}");
                said = why.clone();
            }
            Step::Wait(_) => {}
            _ if repeated => {}
            Step::Set(node) => {
                let b = pb::NodeBinary {
                    node: *node,
                    path: path.to_string(),
                };
                println!("{}", super::admin::send(addr, Kind::NodeBinary(b)).await?);
                last = Some((step, Instant::now()));
            }
            Step::Switchover(to) => {
                let s = pb::Switchover { to: Some(*to) };
                println!("{}", super::admin::send(addr, Kind::Switchover(s)).await?);
                last = Some((step, Instant::now()));
            }
        }
        if Instant::now() >= deadline {
            bail!("the roll did not finish within {timeout:?} (it was waiting for {said}): `keyraft status` shows where it stands; the same command goes on, and one with the old program rolls back");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NEW: &str = "/opt/node-2/bin/node";

    /// A member: `binary` it runs, synced or not.
    fn member(id: u64, binary: &str, synced: bool) -> serde_json::Value {
        json!({"id": id, "role": "validator", "state": "Voting",
               "validator": {"running": true, "synced": synced},
               "binary": binary, "binary_refused": null})
    }

    fn status(active: Option<u64>, binaries: &[u64], nodes: Vec<serde_json::Value>) -> Status {
        let binaries: serde_json::Map<String, serde_json::Value> = binaries
            .iter()
            .map(|n| (n.to_string(), json!(NEW)))
            .collect();
        serde_json::from_value(json!({
            "cluster": {"active_validator": active, "binaries": binaries},
            "nodes": nodes,
        }))
        .unwrap()
    }

    /// Hosts 1 to 3, each running a program (`N`: the new one), synced or
    /// not; `active` validates, the new program committed for `binaries`.
    fn three(active: Option<u64>, binaries: &[u64], nodes: [(&str, bool); 3]) -> Status {
        let members = (1..)
            .zip(nodes)
            .map(|(id, (b, synced))| member(id, b, synced));
        status(active, binaries, members.collect())
    }

    #[test]
    fn the_roll_goes_standby_by_standby_then_hands_over_then_the_old_active() {
        const O: &str = "/opt/node-1/bin/node";
        const N: &str = NEW;
        let wait2 = Step::Wait(format!("node 2's node to run synced as {NEW}"));
        let table = [
            // Nothing rolled: the first standby.
            (
                three(Some(1), &[], [(O, true), (O, true), (O, true)]),
                Step::Set(2),
            ),
            // Committed, its node not yet restarted: wait, no second host.
            (
                three(Some(1), &[2], [(O, true), (O, true), (O, true)]),
                wait2.clone(),
            ),
            // Restarted but still syncing: wait.
            (
                three(Some(1), &[2], [(O, true), (N, false), (O, true)]),
                wait2,
            ),
            // Synced: the next standby.
            (
                three(Some(1), &[2], [(O, true), (N, true), (O, true)]),
                Step::Set(3),
            ),
            // Every standby synced on it: the key moves to one.
            (
                three(Some(1), &[2, 3], [(O, true), (N, true), (N, true)]),
                Step::Switchover(2),
            ),
            // Mid-handover nobody validates: wait.
            (
                three(None, &[2, 3], [(O, true), (N, true), (N, true)]),
                Step::Wait("a host to validate".into()),
            ),
            // Then the old active host, now a standby.
            (
                three(Some(2), &[2, 3], [(O, true), (N, true), (N, true)]),
                Step::Set(1),
            ),
            (
                three(Some(2), &[1, 2, 3], [(N, true), (N, true), (N, true)]),
                Step::Done(2),
            ),
        ];
        for (i, (s, want)) in table.into_iter().enumerate() {
            assert_eq!(next(&s, NEW), want, "row {i}");
        }
        // A witness is no host to roll.
        let mut s = three(Some(1), &[], [(O, true), (O, true), (O, true)]);
        let witness = json!({"id": 9, "role": "witness", "state": "Voting", "validator": null});
        s.nodes.push(serde_json::from_value(witness).unwrap());
        assert_eq!(next(&s, NEW), Step::Set(2));
    }

    #[test]
    fn the_roll_stops_where_waiting_cannot_help_and_waits_for_a_silent_host() {
        let old = "/opt/node-1/bin/node";
        let refusing = |id, path: &str| {
            let mut m = member(id, old, true);
            m["binary_refused"] = json!(format!("{path} is not an executable file here"));
            m
        };
        // A refusal of this path, on whichever host: stop.
        let s = status(
            Some(1),
            &[2, 3],
            vec![member(1, old, true), member(2, NEW, true), refusing(3, NEW)],
        );
        assert!(
            matches!(next(&s, NEW), Step::Stuck(w) if w.contains("node 3") && w.contains("not an executable"))
        );
        // One left from an earlier roll of another path: not this roll's.
        let s = status(
            Some(1),
            &[2],
            vec![
                member(1, old, true),
                refusing(2, "/opt/bad"),
                member(3, old, true),
            ],
        );
        assert_eq!(
            next(&s, NEW),
            Step::Wait(format!("node 2's node to run synced as {NEW}"))
        );
        // A lone validator: no standby to hand over to.
        let s = status(Some(1), &[], vec![member(1, old, true)]);
        assert!(matches!(next(&s, NEW), Step::Stuck(w) if w.contains("alone")));
        // Every host runs the path as configured: replaced in place.
        let s = status(
            Some(1),
            &[],
            vec![member(1, NEW, true), member(2, NEW, true)],
        );
        assert!(matches!(next(&s, NEW), Step::Stuck(w) if w.contains("new path")));
        // A host not heard from (its role unknown): wait rather than roll
        // past it.
        let gone =
            json!({"id": 3, "role": null, "state": "Unknown", "validator": null, "binary": null});
        let s = status(
            Some(1),
            &[],
            vec![member(1, old, true), member(2, old, true), gone],
        );
        assert_eq!(next(&s, NEW), Step::Wait("node 3 to be heard from".into()));
    }

    #[test]
    fn with_nobody_validating_only_a_host_whose_node_is_down_anyway_is_rolled() {
        // The last roll's program fails everywhere: rolling back reaches
        // the hosts whose nodes are down, never a synced one.
        let bad = "/opt/node-bad/bin/node";
        let down = |id| {
            let mut m = member(id, bad, false);
            m["validator"]["running"] = json!(false);
            m
        };
        let s = status(None, &[], vec![down(1), member(2, bad, true), down(3)]);
        assert_eq!(next(&s, NEW), Step::Set(1));
        let s = status(
            None,
            &[1, 3],
            vec![member(1, NEW, false), member(2, bad, true), down(3)],
        );
        assert_eq!(next(&s, NEW), Step::Wait("a host to validate".into()));
    }
}
