//! The shipped Grafana dashboard (`dashboards/keyraft.json`): valid JSON in
//! Grafana's shape, and every metric its queries name is one keyraft
//! exports (in validator or signer mode), so a renamed metric cannot leave
//! a panel silently empty.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use keyraft::metrics::Metrics;

fn exported() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for chains in [&[][..], &["c"][..]] {
        let m = Metrics::new("test", false, chains, &[2])?;
        // Label families export nothing until a child exists.
        m.peer_up.with_label_values(&["2"]).set(1);
        m.peer_rtt.with_label_values(&["2"]).set(0.001);
        m.privval_connected
            .with_label_values(&["c", "tcp://n"])
            .set(1);
        m.sign_seconds.with_label_values(&["c"]).observe(0.001);
        m.tls_cert_expiry.with_label_values(&["node"]).set(86_400);
        for line in m.render().lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    Ok(names)
}

#[test]
fn every_dashboard_query_names_an_exported_metric() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/keyraft.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dash: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(
        dash["title"] == "keyraft" && dash["uid"] == "keyraft",
        "not the keyraft dashboard"
    );
    let exported = exported()?;
    let panels = dash["panels"].as_array().context("no panels")?;
    ensure!(panels.len() >= 10, "only {} panels", panels.len());
    let mut queried = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().context("a panel without targets")?;
        ensure!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().context("a target without expr")?;
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("keyraft_"))
                .collect();
            ensure!(
                !names.is_empty(),
                "panel {}: {expr} names no keyraft metric",
                p["title"]
            );
            for n in names {
                ensure!(
                    exported.contains(n),
                    "panel {}: {n} is not exported (exported: {exported:?})",
                    p["title"]
                );
                queried.insert(n.to_string());
            }
        }
    }
    // The list: who validates, term, failovers, quorum, peer RTT,
    // validator height and sync.
    for must in [
        "keyraft_state",
        "keyraft_raft_term",
        "keyraft_activations_total",
        "keyraft_quorum",
        "keyraft_peer_rtt_seconds",
        "keyraft_validator_height",
        "keyraft_validator_synced",
    ] {
        ensure!(queried.contains(must), "no panel shows {must}");
    }
    Ok(())
}
