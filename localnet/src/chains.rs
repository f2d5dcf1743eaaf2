//! localnet's chains beyond the first (signer mode, `--chains N`): each
//! with its own `fakechain` judge and key, and a sentry on every validator
//! host, and the `[[chains]]` file that hands them all to keyraft.
//!
//! Owns: those chains' processes, keys and sentries, and each host's
//! chains file. Must not: know keyraft's internals; it writes the file an
//! operator would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::harness::{free_addr, sibling_bin, ChainClient, Proc};
use crate::shape::Mode;

/// Signer mode: a sentry on a host that keyraft dials but does not
/// supervise (node id `10 * host + k`).
pub struct ExtraSentry {
    pub id: u64,
    pub privval: SocketAddr,
    pub rpc: SocketAddr,
    pub proc: Option<Proc>,
}

/// Signer mode: a chain beyond the first, with its own judge and key, and
/// one sentry on each validator host (node id = host id, as on the first).
pub struct OtherChain {
    pub chain_id: String,
    pub chain: ChainClient,
    pub key_path: PathBuf,
    pub sentries: BTreeMap<u64, ExtraSentry>,
    _proc: Proc,
}

/// Every chain host `id` signs for, as `[[chains]]` tables: the first
/// chain's (`first`: its id, key, this host's nodes and the RPC of its
/// node on this host), then each other chain's with a sentry on this host
/// (with `wrong_key` for the second, where given), its sentry's RPC as
/// the chain's `node-rpc` unless `node_rpc` is false.
pub(crate) fn chains_toml(
    first: (&str, &Path, &[String], SocketAddr),
    others: &[OtherChain],
    id: u64,
    wrong_key: Option<PathBuf>,
    node_rpc: bool,
) -> Result<String> {
    let table = |chain: &str, key: &Path, nodes: &[String], rpc: Option<SocketAddr>| {
        let mut t = toml::Table::new();
        if let Some(rpc) = rpc {
            t.insert("node-rpc".into(), format!("http://{rpc}").into());
        }
        t.insert("chain-id".into(), chain.into());
        t.insert("validator-key".into(), key.display().to_string().into());
        t.insert(
            "privval-node".into(),
            toml::Value::Array(nodes.iter().map(|n| n.as_str().into()).collect()),
        );
        toml::Value::Table(t)
    };
    let mut chains = vec![table(first.0, first.1, first.2, Some(first.3))];
    for (k, o) in others.iter().enumerate() {
        if let Some(e) = o.sentries.get(&id) {
            let key = match (k, &wrong_key) {
                (0, Some(w)) => w.clone(),
                _ => o.key_path.clone(),
            };
            let nodes = [format!("tcp://{}", e.privval)];
            chains.push(table(&o.chain_id, &key, &nodes, node_rpc.then_some(e.rpc)));
        }
    }
    let mut file = toml::Table::new();
    file.insert("chains".into(), toml::Value::Array(chains));
    Ok(toml::to_string(&file)?)
}

/// A validator key of host `id`'s own, not the cluster's (made once).
pub(crate) fn wrong_key(dir: &Path, id: u64) -> Result<PathBuf> {
    let path = dir.join(format!("keys/other-key-{id}.json"));
    if !path.exists() {
        crate::comet::key::ValidatorKey::generate().write_new(&path)?;
    }
    Ok(path)
}

/// Every chain's judge: the first chain's, then the others'.
pub(crate) fn judges<'a>(
    mode: &'a Mode,
    first: &'a ChainClient,
    others: &'a [OtherChain],
) -> Vec<(&'a str, &'a ChainClient)> {
    let name = match mode {
        Mode::Signer { chain_id, .. } => chain_id.as_str(),
        Mode::Near | Mode::NearUpgrade(_) => "near",
    };
    std::iter::once((name, first))
        .chain(others.iter().map(|o| (o.chain_id.as_str(), &o.chain)))
        .collect()
}

impl ExtraSentry {
    /// Starts this sentry (a `fakenode --cometbft` for the chain at
    /// `chain`) unless it runs.
    pub fn start(&mut self, chain: &str, name: &str, log_dir: &Path) -> Result<()> {
        if self.proc.as_mut().is_some_and(|p| p.try_exit().is_none()) {
            return Ok(());
        }
        self.proc = Some(Proc::spawn(
            &format!("{name}{}", self.id),
            Command::new(sibling_bin("fakenode")?)
                .args([
                    "--cometbft",
                    "--privval-listen",
                    &format!("tcp://{}", self.privval),
                ])
                .args(["--chain", chain, "--node-id", &self.id.to_string()])
                .args(["--rpc-listen", &self.rpc.to_string()]),
            log_dir,
        )?);
        Ok(())
    }
}

/// A signer-mode `fakechain`'s flags: its (round_every, validators)
/// schedule, and the upgrade it halts for, if any.
pub(crate) fn signer_chain_args(
    cmd: &mut Command,
    chain_id: &str,
    (round_every, validators): (u64, u64),
    halt: &Option<crate::upgrade::Upgrade>,
) {
    cmd.args(["--cometbft", "--vote-extensions", "--chain-id", chain_id])
        .args(["--round-every", &round_every.to_string()])
        .args(["--validators", &validators.to_string()]);
    if let Some(u) = halt {
        cmd.args(crate::shape::upgrade_chain_args(u));
    }
}

/// Signer mode: the chains after the first, each started with its judge
/// and key, and a sentry (not yet running) on each validator host.
pub(crate) fn other_chains(
    dir: &Path,
    mode: &Mode,
    block_ms: u64,
    hosts: &[u64],
) -> Result<Vec<OtherChain>> {
    let Mode::Signer {
        chain_id,
        round_every,
        validators,
        more_chains,
        ..
    } = mode
    else {
        return Ok(vec![]);
    };
    let mut others = Vec::new();
    for k in 2..=more_chains + 1 {
        let chain_id = format!("{chain_id}-{k}");
        let key_path = dir.join(format!("keys/priv_validator_key-{k}.json"));
        crate::comet::key::ValidatorKey::generate().write_new(&key_path)?;
        let addr = free_addr()?;
        let mut cmd = Command::new(sibling_bin("fakechain")?);
        // Independent chains do not round in step: each ticks its share
        // of a round (of a second at most: each chain's first height opens
        // within a second of its start) after the one before.
        let phase = (k - 1) * block_ms.min(1000) / (more_chains + 1);
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--block-ms",
            &block_ms.to_string(),
            "--phase-ms",
            &phase.to_string(),
        ]);
        signer_chain_args(&mut cmd, &chain_id, (*round_every, *validators), &None);
        let proc = Proc::spawn(
            &format!("fakechain-{chain_id}"),
            cmd.arg("--validator-key").arg(&key_path),
            dir,
        )?;
        let mut sentries = BTreeMap::new();
        for &host in hosts {
            sentries.insert(
                host,
                ExtraSentry {
                    id: host,
                    privval: free_addr()?,
                    rpc: free_addr()?,
                    proc: None,
                },
            );
        }
        others.push(OtherChain {
            chain_id,
            chain: ChainClient::new(&format!("http://{addr}")),
            key_path,
            sentries,
            _proc: proc,
        });
    }
    Ok(others)
}
