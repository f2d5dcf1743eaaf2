//! Fence agents per member (docs/design.md, step 3): which program powers a
//! member's host off, with which options, and how long it may take.
//!
//! Owns: parsing and checking `--fence-agent`, `--fence-option`,
//! `--fence-secret`, `--fence-timeout` and `--fence-attempts`. Must not: run
//! an agent or read a secret's value (that happens each time the agent
//! runs, so a rotated secret needs no restart); a bad value is one line.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::{check_private, invalid, ConfigError, NodeId, RunArgs};

/// One member's fence agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceAgent {
    /// The agent program (absolute path), run with no arguments.
    pub path: PathBuf,
    /// Options sent on its stdin as `name=value`, in the order given.
    pub options: Vec<(String, String)>,
    /// Options whose value is read from a file each time the agent runs.
    pub secrets: Vec<(String, PathBuf)>,
}

/// Every member's fence agent, and the bounds on running them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceAgents {
    pub by_node: BTreeMap<NodeId, FenceAgent>,
    /// Bound on one `off`, and separately on `status` confirming it.
    pub timeout: Duration,
    /// Attempts per takeover try.
    pub attempts: u32,
}

impl Default for FenceAgents {
    fn default() -> FenceAgents {
        FenceAgents {
            by_node: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            attempts: 2,
        }
    }
}

/// `ID:NAME=VALUE` split, with the id checked against the agents given.
fn split_option<'a>(
    flag: &str,
    raw: &'a str,
    agents: &BTreeMap<NodeId, FenceAgent>,
) -> Result<(NodeId, &'a str, &'a str), ConfigError> {
    let bad = |why: &str| invalid(format!("bad --{flag} '{raw}': {why}"));
    let (id, rest) = raw
        .split_once(':')
        .ok_or_else(|| bad("want ID:NAME=VALUE"))?;
    let (name, value) = rest
        .split_once('=')
        .ok_or_else(|| bad("want ID:NAME=VALUE"))?;
    let id: NodeId = id.trim().parse().map_err(|_| bad("not a node id"))?;
    if !agents.contains_key(&id) {
        return Err(bad(&format!("no --fence-agent for node {id}")));
    }
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad("option names are letters, digits, '_' and '-'"));
    }
    if name == "action" {
        return Err(bad("keyraft sets the action itself (off, then status)"));
    }
    if value.contains(['\n', '\r']) {
        return Err(bad("a value cannot span lines"));
    }
    Ok((id, name, value))
}

pub(super) fn resolve_fence_agents(
    a: &RunArgs,
    id: NodeId,
    peers: &BTreeMap<NodeId, String>,
) -> Result<FenceAgents, ConfigError> {
    let mut out = FenceAgents::default();
    if let Some(t) = a.fence_timeout {
        if t.0 < Duration::from_millis(100) {
            return Err(invalid(format!(
                "--fence-timeout {t} is too short for any agent (at least 100ms)"
            )));
        }
        out.timeout = t.0;
    }
    if let Some(n) = a.fence_attempts {
        if n == 0 {
            return Err(invalid("--fence-attempts 0: at least one attempt"));
        }
        out.attempts = n;
    }
    for raw in &a.fence_agent {
        let (node, path) = raw
            .split_once('=')
            .ok_or_else(|| invalid(format!("bad --fence-agent '{raw}': want ID=PATH")))?;
        let node: NodeId = node.trim().parse().map_err(|_| {
            invalid(format!(
                "bad --fence-agent '{raw}': '{node}' is not a node id"
            ))
        })?;
        if node == id {
            return Err(invalid(format!(
                "--fence-agent '{raw}' names this node: an agent fences the other members"
            )));
        }
        if !peers.contains_key(&node) {
            return Err(invalid(format!(
                "--fence-agent '{raw}': node {node} is not a --peer"
            )));
        }
        let path = PathBuf::from(path.trim());
        if !path.is_absolute() {
            return Err(invalid(format!(
                "--fence-agent '{raw}': give the agent's absolute path"
            )));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| invalid(format!("--fence-agent '{raw}': {}: {e}", path.display())))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(invalid(format!(
                "--fence-agent '{raw}': {} is not an executable file",
                path.display()
            )));
        }
        // The resolved file and, where it is a link, the directory of
        // the link itself (whoever may replace the link picks the agent).
        let link_dir = path.parent().filter(|_| path.is_symlink());
        let why = writable_by_others(&path).or_else(|| link_dir.and_then(writable_by_others));
        if let Some(why) = why {
            return Err(invalid(format!(
                "--fence-agent '{raw}': {why}: another user could make it fake \"off\" or run code as keyraft"
            )));
        }
        let agent = FenceAgent {
            path,
            options: Vec::new(),
            secrets: Vec::new(),
        };
        if out.by_node.insert(node, agent).is_some() {
            return Err(invalid(format!("two --fence-agent for node {node}")));
        }
    }
    for raw in &a.fence_option {
        let (node, name, value) = split_option("fence-option", raw, &out.by_node)?;
        if let Some(agent) = out.by_node.get_mut(&node) {
            agent.options.push((name.to_string(), value.to_string()));
        }
    }
    for raw in &a.fence_secret {
        let (node, name, file) = split_option("fence-secret", raw, &out.by_node)?;
        let file = PathBuf::from(file.trim());
        check_private(&file)?;
        if let Some(agent) = out.by_node.get_mut(&node) {
            agent.secrets.push((name.to_string(), file));
        }
    }
    if !out.by_node.is_empty() && a.witness {
        return Err(invalid(
            "--fence-agent on a witness does nothing (a witness never takes the key over): give the agents to the validator hosts",
        ));
    }
    if !out.by_node.is_empty() && a.signer.is_some() {
        return Err(invalid(
            "--fence-agent is for validator mode: in signer mode the signatures themselves are committed through Raft, and no host takes a key over",
        ));
    }
    Ok(out)
}

/// Why `path` (resolved) could be changed by someone other than root and
/// this process's user, if it could: it, or a directory on its way from
/// `/`, is owned by another user, or writable by its group or by others
/// (but a sticky directory), as ssh refuses a writable `authorized_keys`.
fn writable_by_others(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let trusted = |uid: u32| uid == 0 || uid == me;
    for p in real.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let meta = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", p.display())),
        };
        let mode = meta.mode() & 0o7777;
        if !trusted(meta.uid()) {
            return Some(format!(
                "{} belongs to uid {}, neither root nor keyraft's user",
                p.display(),
                meta.uid()
            ));
        }
        // A sticky directory (`/tmp`) lets only an entry's owner replace
        // it, and the next entry's owner is checked above.
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_dir {
            return Some(format!(
                "{} is writable by its group or by others (mode {:o})",
                p.display(),
                mode & 0o777
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::test_support::{keys_in, validator_args};

    #[test]
    fn agents_options_and_secrets_are_checked_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("fence_test");
        std::fs::write(&agent, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = &keys_in(dir.path(), &["pw"])[0];
        let loose = dir.path().join("loose");
        std::fs::write(&loose, "x").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let peers: BTreeMap<NodeId, String> = [(2, "h:1".to_string())].into();
        let mut a = validator_args(dir.path());
        a.fence_agent = vec![format!("2={}", agent.display())];
        a.fence_option = vec!["2:plug=host-2".into(), "2:ipport=2375".into()];
        a.fence_secret = vec![format!("2:password={}", secret.display())];
        a.fence_timeout = Some("5s".parse().unwrap());
        let f = resolve_fence_agents(&a, 1, &peers).unwrap();
        assert_eq!(f.timeout, Duration::from_secs(5));
        assert_eq!(f.attempts, 2);
        let two = &f.by_node[&2];
        assert_eq!(
            two.options,
            vec![
                ("plug".to_string(), "host-2".to_string()),
                ("ipport".to_string(), "2375".to_string())
            ]
        );
        assert_eq!(two.secrets, vec![("password".to_string(), secret.clone())]);

        let refused = |change: &dyn Fn(&mut RunArgs), want: &str| {
            let mut b = a.clone();
            change(&mut b);
            let e = resolve_fence_agents(&b, 1, &peers).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        };
        refused(
            &|b| b.fence_agent = vec!["1=/bin/true".into()],
            "names this node",
        );
        refused(
            &|b| b.fence_agent = vec!["3=/bin/true".into()],
            "not a --peer",
        );
        refused(
            &|b| b.fence_agent = vec!["2=fence_x".into()],
            "absolute path",
        );
        refused(
            &|b| b.fence_agent = vec!["2=/nonexistent/fence_x".into()],
            "fence_x",
        );
        refused(
            &|b| b.fence_agent = vec![format!("2={}", dir.path().display())],
            "not an executable file",
        );
        // Writable by others, or in a directory they may write to: refused.
        let open = tempfile::tempdir().unwrap();
        let in_open = open.path().join("fence_open");
        std::fs::write(&in_open, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&in_open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        refused(
            &|b| b.fence_agent = vec![format!("2={}", in_open.display())],
            "writable by its group or by others (mode 777)",
        );
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&in_open, std::fs::Permissions::from_mode(0o775)).unwrap();
        refused(
            &|b| b.fence_agent = vec![format!("2={}", in_open.display())],
            "fake \"off\"",
        );
        refused(
            &|b| b.fence_option = vec!["3:plug=x".into()],
            "no --fence-agent for node 3",
        );
        refused(
            &|b| b.fence_option = vec!["2:action=on".into()],
            "sets the action",
        );
        refused(&|b| b.fence_option = vec!["2:plug".into()], "ID:NAME=VALUE");
        refused(
            &|b| b.fence_option = vec!["2:pl ug=x".into()],
            "option names",
        );
        refused(
            &|b| b.fence_secret = vec![format!("2:password={}", loose.display())],
            "readable by others",
        );
        refused(&|b| b.fence_attempts = Some(0), "at least one attempt");
        refused(
            &|b| b.fence_timeout = Some("10ms".parse().unwrap()),
            "too short",
        );
        refused(&|b| b.witness = true, "witness");
    }
}
