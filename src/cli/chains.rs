//! Signer mode's chains as `keyraft status` and `keyraft check` show
//! them: a line per chain, or, past [`LISTED`] chains, a line for each
//! chain that needs the operator and one for all the others
//! (`status --all-chains` lists every one).
//!
//! Owns: which chain needs attention, and the lines that say so. Must
//! not: ask the node anything; it reads the status JSON.

use serde_json::Value;

/// Chains listed one by one, whatever their state; past this many only
/// those that need attention are.
pub(super) const LISTED: usize = 5;

fn named(c: &Value) -> &str {
    c["chain_id"].as_str().unwrap_or("?")
}

/// This host's privval connections for the chain: (up, all).
fn connections(c: &Value) -> (usize, usize) {
    let conns = c["connections"].as_array().map_or(&[][..], Vec::as_slice);
    let up = conns.iter().filter(|c| c["connected"] == true).count();
    (up, conns.len())
}

/// Whether a chain needs the operator: no watermark, a privval connection
/// down here, its key failing here, another key on a member, or its
/// node's probe failing.
fn needs_attention(c: &Value) -> bool {
    let (up, all) = connections(c);
    c["watermark"].is_null()
        || up < all
        || !c["key_error"].is_null()
        || c["other_keys"].as_array().is_some_and(|o| !o.is_empty())
        || !c["node_probe_error"].is_null()
}

/// `-` for null, else the value.
pub(super) fn or_dash(x: &Value) -> String {
    if x.is_null() {
        "-".to_string()
    } else {
        x.to_string()
    }
}

/// The lines of one chain: watermark, signatures, privval connections
/// here, and what is wrong with it.
fn chain_lines(sg: &Value) -> Vec<String> {
    let w = &sg["watermark"];
    let watermark = if w.is_null() {
        "NONE (run `keyraft signer import-state`)".to_string()
    } else {
        format!(
            "height {} round {} step {}",
            w["height"],
            or_dash(&w["round"]),
            or_dash(&w["step"])
        )
    };
    let conns: Vec<String> = sg["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let up = if c["connected"] == true { "up" } else { "DOWN" };
            format!("{} {up}", c["node"].as_str().unwrap_or("?"))
        })
        .collect();
    let mut out = vec![format!(
        "signer: chain {}  watermark {watermark}  signatures {}  privval here: {}",
        named(sg),
        sg["signatures"],
        conns.join(", ")
    )];
    if let Some(e) = sg["key_error"].as_str() {
        out.push(format!(
            "        KEY FAILS here (this host may not lead): {e}"
        ));
    }
    for o in sg["other_keys"].as_array().into_iter().flatten() {
        let theirs = o["address"].as_str().unwrap_or("none");
        out.push(format!(
            "        ANOTHER KEY on node {}: {theirs} (this host: {})",
            o["node"],
            sg["address"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// The `signer:` lines of `status`: every chain's with `all` or up to
/// [`LISTED`] chains; else those of the chains that need attention, then
/// one line for the rest.
pub(super) fn lines(v: &Value, all: bool) -> Vec<String> {
    let chains = v["signer"]["chains"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if all || chains.len() <= LISTED {
        return chains.iter().flat_map(chain_lines).collect();
    }
    let (attention, fine): (Vec<&Value>, Vec<&Value>) =
        chains.iter().partition(|c| needs_attention(c));
    let mut out: Vec<String> = attention.iter().flat_map(|c| chain_lines(c)).collect();
    if !fine.is_empty() {
        out.push(format!(
            "signer: {} more chains with a watermark, every privval connection here up and their key signing (`keyraft status --all-chains` lists them)",
            fine.len()
        ));
    }
    out
}

/// `check`'s verdict in signer mode, whose leader signs for each chain:
/// its exit code and line.
pub(super) fn check(v: &Value) -> (u8, String) {
    let chains = v["signer"]["chains"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if let Some(c) = chains.iter().find(|c| c["watermark"].is_null()) {
        let c = named(c);
        return (4, format!("CRITICAL: chain {c} has no watermark: nothing is signed for it until `keyraft signer import-state --chain-id {c} FILE` (or `--never-signed`)"));
    }
    if let Some(c) = chains.iter().find(|c| connections(c).0 == 0) {
        return (
            7,
            format!(
                "CRITICAL: this signer is connected to none of chain {}'s privval ports",
                named(c)
            ),
        );
    }
    let leader = &v["cluster"]["leader"];
    if chains.len() > LISTED {
        let lowest = chains
            .iter()
            .min_by_key(|c| c["watermark"]["height"].as_u64().unwrap_or(0))
            .map_or_else(String::new, |c| {
                format!(
                    " (the lowest watermark: {} at height {})",
                    named(c),
                    c["watermark"]["height"]
                )
            });
        let partly = chains.iter().filter(|c| needs_attention(c)).count();
        return (
            0,
            format!(
                "OK: node {leader} leads the signers; {} chains, each with a watermark and a privval connection up, {partly} needing attention{lowest}",
                chains.len()
            ),
        );
    }
    let each: Vec<String> = chains
        .iter()
        .map(|c| {
            let (up, all) = connections(c);
            format!(
                "{} at height {} ({up} of {all} privval up)",
                named(c),
                c["watermark"]["height"]
            )
        })
        .collect();
    (
        0,
        format!("OK: node {leader} leads the signers; {}", each.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(id: &str, height: u64, up: bool) -> Value {
        serde_json::json!({
            "chain_id": id, "address": "AA", "signatures": 3,
            "watermark": {"height": height, "round": 0, "step": 3},
            "connections": [{"node": "tcp://a:1", "connected": true}, {"node": "tcp://b:1", "connected": up}],
            "key_error": null, "other_keys": [], "node_probe_error": null,
        })
    }

    fn status(chains: Vec<Value>) -> Value {
        serde_json::json!({"cluster": {"leader": 2}, "signer": {"chains": chains}})
    }

    #[test]
    fn past_five_chains_only_those_that_need_attention_get_a_line() {
        let mut chains: Vec<Value> = (0..7)
            .map(|k| chain(&format!("c{k}"), 10 + k, true))
            .collect();
        chains[3] = chain("c3", 13, false);
        chains[5]["key_error"] = "the token did not answer".into();
        let v = status(chains);
        let got = lines(&v, false);
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(got[0].starts_with("signer: chain c3 ") && got[0].contains("tcp://b:1 DOWN"));
        assert!(got[1].starts_with("signer: chain c5 "));
        assert!(got[2].contains("KEY FAILS here"));
        assert!(got[3].starts_with("signer: 5 more chains"), "{}", got[3]);
        assert_eq!(lines(&v, true).len(), 8, "every chain with --all-chains");
        let (code, line) = check(&v);
        assert_eq!(code, 0);
        assert!(
            line.contains("7 chains") && line.contains("2 needing attention"),
            "{line}"
        );
        assert!(
            line.contains("the lowest watermark: c0 at height 10"),
            "{line}"
        );
    }

    #[test]
    fn up_to_five_chains_each_gets_its_line_and_check_names_each() {
        let v = status(vec![chain("a", 5, true), chain("b", 6, false)]);
        assert_eq!(lines(&v, false).len(), 2);
        let (code, line) = check(&v);
        assert_eq!(code, 0);
        assert!(
            line.ends_with("a at height 5 (2 of 2 privval up), b at height 6 (1 of 2 privval up)"),
            "{line}"
        );
    }

    #[test]
    fn a_chain_without_a_watermark_or_any_connection_fails_the_check() {
        let mut none = chain("a", 5, true);
        none["watermark"] = Value::Null;
        assert_eq!(check(&status(vec![none])).0, 4);
        let mut cut = chain("a", 5, false);
        cut["connections"][0]["connected"] = false.into();
        assert_eq!(check(&status(vec![cut])).0, 7);
    }
}
