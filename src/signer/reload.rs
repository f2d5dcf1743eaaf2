//! Chains added, removed and changed without a restart: a reload's
//! `[[chains]]` compared with the chains signed for ([`plan`]), the keys of
//! the chains that start opened, then every change made at once
//! ([`Signer::reload`]).
//!
//! Owns: which chains start, stop or stay; the rule that a chain keeps its
//! key for the life of the process ([`key_kept`]); handing a chain's memory
//! (what this process signed inside its reservation, [`super::Ahead`]) to
//! the chain that replaces it or adds it again; opening keys within a
//! limit, for a reload and at start ([`load_keys`]), so that a token that
//! does not answer is an error, not a wait. Must not: touch a chain the
//! reload leaves as it was, or change anything when a check fails.
//!
//! Why a chain's memory outlives its removal: a reservation committed for
//! this process stays in the replicated state after the chain is removed,
//! and lets this process sign inside it, so a chain added again must
//! remember what it signed there, as it would have had it stayed.

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;

use super::token::Modules;
use super::{load_chain_keys, Chain, ConsensusKey, Forward, SignError, Signer};
use crate::config::{ChainConfig, SignerConfig};
use crate::raft::TypeConfig;

/// Longest the keys may take to open, at start or in a reload: a token
/// that does not answer fails the reload, or the start in one line.
pub const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Every chain's key at start, and the PKCS#11 modules they opened through
/// (each loaded once), on a thread of their own for at most
/// [`OPEN_PATIENCE`]: a token that does not answer is an error, not a wait
/// for ever (the thread stays with the token). Blocking: `keyraft run`
/// calls it before its runtime, `keyraft check` off the async workers.
pub fn load_keys(
    cfg: &SignerConfig,
) -> Result<(Vec<(ChainConfig, ConsensusKey)>, Modules), ReloadError> {
    let chains = cfg.chains.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let modules = Modules::default();
        let keys = load_chain_keys(&chains, |path| modules.open(path));
        // The caller may have given up.
        let _ = tx.send(keys.map(|k| (k, modules)));
    });
    match rx.recv_timeout(OPEN_PATIENCE) {
        Ok(opened) => Ok(opened?),
        Err(_) => Err(ReloadError::OpenTimeout(OPEN_PATIENCE)),
    }
}

/// What a reload does to the chains, by chain id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Listed now, not before.
    pub added: Vec<String>,
    /// Listed before, not now: they stop.
    pub removed: Vec<String>,
    /// Listed before and now, configured otherwise: each stops and starts
    /// again with its new configuration, its key and its memory.
    pub changed: Vec<String>,
    /// Listed before and now, alike: not touched.
    pub kept: Vec<String>,
}

impl Plan {
    pub fn changes_nothing(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| match v {
            [] => "none".to_string(),
            v => v.join(", "),
        };
        write!(
            f,
            "added {}; removed {}; changed {}; {} untouched",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            self.kept.len()
        )
    }
}

/// Compares the chains signed for (`now`) with a reload's (`new`).
pub fn plan(now: &[ChainConfig], new: &[ChainConfig]) -> Plan {
    let mut p = Plan::default();
    for c in new {
        match now.iter().find(|n| n.chain_id == c.chain_id) {
            None => p.added.push(c.chain_id.clone()),
            Some(n) if n == c => p.kept.push(c.chain_id.clone()),
            Some(_) => p.changed.push(c.chain_id.clone()),
        }
    }
    p.removed = now
        .iter()
        .filter(|n| !new.iter().any(|c| c.chain_id == n.chain_id))
        .map(|n| n.chain_id.clone())
        .collect();
    p
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Key(#[from] SignError),
    #[error("chain {chain}: its key would be {now}, but this process signed it with {was}; a chain's key changes only with a restart")]
    OtherKey {
        chain: String,
        was: String,
        now: String,
    },
    #[error("opening the keys: no key was opened for {0}")]
    NotOpened(String),
    #[error("opening the keys: they did not open within {0:?} (a token that does not answer?)")]
    OpenTimeout(std::time::Duration),
    #[error("opening the keys: {0}")]
    OpenPanicked(#[from] tokio::task::JoinError),
}

/// The rule for a chain that starts: its key is the one this process
/// signed it with, if it ever did (`was`, its address).
pub fn key_kept(chain: &str, was: Option<&str>, now: &str) -> Result<(), ReloadError> {
    match was {
        Some(was) if was != now => Err(ReloadError::OtherKey {
            chain: chain.to_string(),
            was: was.to_string(),
            now: now.to_string(),
        }),
        _ => Ok(()),
    }
}

impl<SM: RaftStateMachine<TypeConfig>, F: Forward> Signer<SM, F> {
    /// Makes `new` the chains signed for: the added and changed ones'
    /// keys opened (blocking, off the async workers) and checked first;
    /// then, at once, the removed and the changed ones' old selves retired
    /// (their connections and probes stop between two requests) and the
    /// new list in place. Returns the plan and the chains that start,
    /// whose connections and probes the caller starts. An error changes
    /// nothing.
    pub async fn reload(
        &self,
        new: Vec<ChainConfig>,
    ) -> Result<(Plan, Vec<Arc<Chain>>), ReloadError> {
        let live = self.chains();
        let now: Vec<ChainConfig> = live.iter().map(|c| c.cfg.clone()).collect();
        let plan = plan(&now, &new);
        if plan.changes_nothing() {
            return Ok((plan, Vec::new()));
        }
        let before = |id: &str| -> Option<Arc<Chain>> {
            let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            live.iter()
                .find(|c| c.id() == id)
                .or_else(|| retired.get(id))
                .cloned()
        };
        // A changed chain with the same key source keeps its opened key.
        let mut keys: BTreeMap<String, Arc<ConsensusKey>> = BTreeMap::new();
        let (mut to_open, mut reused) = (Vec::new(), Vec::new());
        for c in new.iter().filter(|c| !plan.kept.contains(&c.chain_id)) {
            match before(&c.chain_id).filter(|b| b.cfg.key == c.key) {
                Some(b) => {
                    keys.insert(c.chain_id.clone(), b.key.clone());
                    reused.push(c.chain_id.clone());
                }
                None => to_open.push(c.clone()),
            }
        }
        let opened = self.open_keys(to_open).await?;
        keys.extend(opened.into_iter().map(|(c, k)| (c.chain_id, Arc::new(k))));
        for (id, key) in &keys {
            let was = before(id)
                .filter(|b| b.signed_anything())
                .map(|b| b.address());
            key_kept(id, was.as_deref(), &key.address_hex())?;
        }
        let mut started = Vec::new();
        let mut chains = Vec::new();
        for cfg in new {
            if let Some(kept) = live.iter().find(|c| c.cfg == cfg) {
                chains.push(kept.clone());
                continue;
            }
            let key = keys
                .remove(&cfg.chain_id)
                .ok_or_else(|| ReloadError::NotOpened(cfg.chain_id.clone()))?;
            Self::say_started(&cfg, &key, true);
            let b = before(&cfg.chain_id);
            let c = Arc::new(Chain::new(cfg, key, b.as_deref()));
            started.push(c.clone());
            chains.push(c);
        }
        // Checked: from here on, nothing waits and nothing fails. The new
        // list first, so that what a retired chain's tasks read on their
        // way out is the new one.
        let old: Vec<Arc<Chain>> = live
            .iter()
            .filter(|c| !plan.kept.contains(&c.cfg.chain_id))
            .cloned()
            .collect();
        self.set_chains(chains);
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            for c in &old {
                c.retire.fire();
                if plan.removed.contains(&c.cfg.chain_id) {
                    retired.insert(c.id().to_string(), c.clone());
                }
            }
            for c in &started {
                retired.remove(c.id());
            }
        }
        self.forget(&plan, &started, &reused);
        Ok((plan, started))
    }

    /// The keys of `chains`, opened off the async workers (none: no
    /// thread woken); a token that hangs fails the reload, not every
    /// later one.
    async fn open_keys(
        &self,
        chains: Vec<ChainConfig>,
    ) -> Result<Vec<(ChainConfig, ConsensusKey)>, ReloadError> {
        if chains.is_empty() {
            return Ok(Vec::new());
        }
        let modules = self.modules.clone();
        let opening = tokio::task::spawn_blocking(move || {
            // A token that hangs while its key opens, or a module while it
            // loads, holds nothing a later reload of other modules needs.
            load_chain_keys(&chains, |path| modules.open(path))
        });
        let opened = tokio::time::timeout(OPEN_PATIENCE, opening)
            .await
            .map_err(|_| ReloadError::OpenTimeout(OPEN_PATIENCE))???;
        Ok(opened)
    }

    /// What this host showed of chains it no longer signs for as they
    /// were: a removed chain's key failure (which would keep the host from
    /// leading) and gauges; a changed chain's key failure where its key
    /// was opened again (and so just signed), and its node's gauge where
    /// it has no node to probe now. An added chain's series start.
    fn forget(&self, plan: &Plan, started: &[Arc<Chain>], reused: &[String]) {
        let mut failures = self
            .core
            .key_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let m = &self.core.metrics;
        for id in &plan.removed {
            failures.remove(id);
            m.chain_removed(id);
        }
        for id in &plan.added {
            m.chain_added(id);
        }
        for c in started
            .iter()
            .filter(|c| plan.changed.contains(&c.cfg.chain_id))
        {
            if !reused.contains(&c.cfg.chain_id) && failures.remove(c.id()).is_some() {
                tracing::info!(
                    chain = c.id(),
                    "the key opened again signs: this host may lead"
                );
                m.signer_key_up.with_label_values(&[c.id()]).set(1);
            }
            if c.cfg.node_rpc.is_none() {
                let _ = m.chain_node_up.remove_label_values(&[c.id()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeySource, PrivvalAddr};

    fn chain(id: &str, node: &str) -> ChainConfig {
        ChainConfig {
            chain_id: id.into(),
            key: KeySource::File(format!("/keys/{id}.json").into()),
            nodes: vec![PrivvalAddr::Unix(node.into())],
            node_rpc: None,
            protocol: Default::default(),
        }
    }

    #[test]
    fn a_reload_starts_stops_and_leaves_chains_by_their_configuration() {
        let (a, b, c) = (chain("a", "/a"), chain("b", "/b"), chain("c", "/c"));
        let b2 = chain("b", "/b2");
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (now, new) -> (added, removed, changed, kept)
        let table = [
            (
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                (
                    [].as_slice(),
                    [].as_slice(),
                    [].as_slice(),
                    ["a", "b"].as_slice(),
                ),
            ),
            (
                vec![a.clone()],
                vec![a.clone(), c.clone()],
                (&["c"], &[], &[], &["a"]),
            ),
            (
                vec![a.clone(), b.clone()],
                vec![a.clone()],
                (&[], &["b"], &[], &["a"]),
            ),
            (
                vec![a.clone(), b.clone()],
                vec![c.clone(), b2.clone()],
                (&["c"], &["a"], &["b"], &[]),
            ),
            // Order alone is no change.
            (
                vec![a.clone(), b.clone()],
                vec![b.clone(), a.clone()],
                (&[], &[], &[], &["b", "a"]),
            ),
        ];
        for (now, new, (added, removed, changed, kept)) in table {
            let p = plan(&now, &new);
            assert_eq!(
                p,
                Plan {
                    added: ids(added),
                    removed: ids(removed),
                    changed: ids(changed),
                    kept: ids(kept),
                },
                "{now:?} -> {new:?}"
            );
            assert_eq!(
                p.changes_nothing(),
                added.is_empty() && removed.is_empty() && changed.is_empty()
            );
        }
    }

    #[test]
    fn a_chain_signs_with_one_key_for_the_life_of_the_process() {
        // (the key it was signed with, if ever; the key now) -> allowed
        let table = [
            (None, "AA", true),
            (Some("AA"), "AA", true),
            (Some("AA"), "BB", false),
        ];
        for (was, now, ok) in table {
            let r = key_kept("c", was, now);
            assert_eq!(r.is_ok(), ok, "{was:?} -> {now}: {r:?}");
        }
    }

    #[test]
    fn a_chain_started_again_keeps_what_the_one_before_holds() {
        let key = Arc::new(ConsensusKey::from_seed([7; 32]));
        let before = Chain::new(chain("a", "/a"), key.clone(), None);
        before
            .probing
            .store(true, std::sync::atomic::Ordering::Release);
        // The same key: its probe still out is the new chain's too, and
        // the lock (what was signed) is shared.
        let same = Chain::new(chain("a", "/a2"), key, Some(&before));
        assert!(same.probing.load(std::sync::atomic::Ordering::Acquire));
        assert!(Arc::ptr_eq(&same.lock, &before.lock));
        // Another key: no probe of it is out yet; the lock is still shared.
        let other = Arc::new(ConsensusKey::from_seed([8; 32]));
        let moved = Chain::new(chain("a", "/a3"), other, Some(&before));
        assert!(!moved.probing.load(std::sync::atomic::Ordering::Acquire));
        assert!(Arc::ptr_eq(&moved.lock, &before.lock));
    }
}
