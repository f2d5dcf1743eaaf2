//! A local keyraft cluster: real `keyraft run` processes with mTLS on
//! loopback, each supervising a real `fakenode`, a real `fakechain` as the
//! judge, and a fault proxy on every peer link. The end-to-end tests, the
//! launcher, chaos and the benchmarks all run on it. In CometBFT signer mode
//! ([`Cluster::start_signers`]) each keyraft signs for a `fakenode
//! --cometbft` sentry it supervises, and the chain counts equivocations.
//!
//! Owns: the cluster's files (keys, CA and certificates made with
//! `keyraft certs`, data dirs, logs), its ports, its processes and proxies,
//! and ways to ask a node what it sees. The faults it can suffer (kill,
//! freeze, cut off, slow links) are in [`crate::faults`]. Must not: know keyraft's internals;
//! it drives the `keyraft` binary like an operator would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::chain::Stats;
use crate::chains::{other_chains, signer_chain_args};
pub use crate::chains::{ExtraSentry, OtherChain};
pub use crate::harness::alive;
use crate::harness::{eventually, free_addr, sibling_bin, ChainClient, Proc};
use crate::keys::KeyFile;
use crate::proxy::Proxy;
pub use crate::shape::{Fencing, Launch, Mode, NodeOpts};

/// How long the helpers wait for a cluster to settle.
pub const SETTLE: Duration = Duration::from_secs(20);

/// The environment variable keyraft marks every process of a validator's
/// tree with (its value is the canonical data dir).
pub const FENCE_MARKER: &str = "KEYRAFT_FENCE";
/// Signer mode: the key a host misconfigured into validator mode links
/// (a NEAR-style key its fakenode runs with), beside the cluster's key.
const VALIDATOR_MODE_KEY: &str = "validator_mode_key.json";

pub struct Node {
    pub id: u64,
    pub listen: SocketAddr,
    /// The coordinator's admin socket.
    pub admin: PathBuf,
    pub http: SocketAddr,
    pub rpc: SocketAddr,
    /// Signer mode: the sentry's privval port (keyraft dials it).
    pub privval: SocketAddr,
    pub data: PathBuf,
    pub tls: PathBuf,
    pub home: PathBuf,
    pub opts: NodeOpts,
    pub proc: Option<Proc>,
    pub extra: Vec<ExtraSentry>,
}

/// Where a cluster keeps its files: a temp dir removed on drop, or a dir
/// the user chose (kept).
pub enum ClusterDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl ClusterDir {
    pub fn path(&self) -> &Path {
        match self {
            ClusterDir::Temp(t) => t.path(),
            ClusterDir::Kept(p) => p,
        }
    }
}

pub struct Cluster {
    pub dir: ClusterDir,
    pub keyraft: PathBuf,
    pub chain: ChainClient,
    pub key_path: PathBuf,
    pub nodes: BTreeMap<u64, Node>,
    /// (from, to) -> the proxy `from` dials to reach `to`.
    pub proxies: BTreeMap<(u64, u64), Proxy>,
    pub mode: Mode,
    /// Signer mode: the chains after the first (`Mode::Signer::more_chains`).
    pub others: Vec<OtherChain>,
    _chain: Proc,
}

impl Cluster {
    /// Starts the chain and `n` coordinators (options per node id) in a
    /// temp dir (kept if `KEYRAFT_KEEP_TEST_DIR` is set).
    pub async fn start(n: u64, block_ms: u64, opts: impl Fn(u64) -> NodeOpts) -> Result<Cluster> {
        let mut dir = tempfile::Builder::new().prefix("keyraft-e2e-").tempdir()?;
        if std::env::var_os("KEYRAFT_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test dir kept: {}", dir.path().display());
        }
        Self::start_in(ClusterDir::Temp(dir), n, block_ms, opts).await
    }

    /// Like [`Cluster::start`], in CometBFT signer mode: `n` keyraft signers
    /// (or witnesses), each supervising a sentry it signs for.
    pub async fn start_signers(
        n: u64,
        block_ms: u64,
        mode: Mode,
        opts: impl Fn(u64) -> NodeOpts,
    ) -> Result<Cluster> {
        let mut dir = tempfile::Builder::new()
            .prefix("keyraft-signer-")
            .tempdir()?;
        if std::env::var_os("KEYRAFT_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test dir kept: {}", dir.path().display());
        }
        let c = Self::start_in_mode(ClusterDir::Temp(dir), n, block_ms, mode, opts).await?;
        c.never_signed().await?;
        Ok(c)
    }

    /// Signer mode: `keyraft signer import-state --never-signed` (a fresh
    /// key), retried until a leader takes it. Signing starts after it.
    pub async fn never_signed(&self) -> Result<()> {
        let id = *self.nodes.keys().next().context("no nodes")?;
        for (chain, _) in self.judges() {
            eventually(
                SETTLE,
                &format!("the watermark of {chain}'s new key to be committed"),
                || async {
                    let out = self
                        .cli(
                            id,
                            &[
                                "signer",
                                "import-state",
                                "--never-signed",
                                "--chain-id",
                                chain,
                            ],
                        )
                        .await?;
                    Ok(out.status.success().then_some(()))
                },
            )
            .await
            .with_context(|| self.logs())?;
        }
        Ok(())
    }

    /// Like [`Cluster::start`], in a given (empty or new) dir.
    pub async fn start_in(
        dir: ClusterDir,
        n: u64,
        block_ms: u64,
        opts: impl Fn(u64) -> NodeOpts,
    ) -> Result<Cluster> {
        Self::start_in_mode(dir, n, block_ms, Mode::Near, opts).await
    }

    /// Like [`Cluster::start_in`], validating (NEAR) or signing (CometBFT).
    pub async fn start_in_mode(
        dir: ClusterDir,
        n: u64,
        block_ms: u64,
        mode: Mode,
        opts: impl Fn(u64) -> NodeOpts,
    ) -> Result<Cluster> {
        let keyraft = sibling_bin("keyraft")?;
        std::fs::create_dir_all(dir.path())?;
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys)?;
        let chain_addr = free_addr()?;
        let mut chain_cmd = Command::new(sibling_bin("fakechain")?);
        chain_cmd.args([
            "--listen",
            &chain_addr.to_string(),
            "--block-ms",
            &block_ms.to_string(),
        ]);
        if let Mode::NearUpgrade(u) = &mode {
            chain_cmd.args(crate::shape::upgrade_chain_args(u));
        }
        let key_path = match &mode {
            Mode::Near | Mode::NearUpgrade(_) => {
                let key_path = keys.join("validator_key.json");
                KeyFile::generate("validator.test").write_new(&key_path)?;
                key_path
            }
            Mode::Signer {
                chain_id,
                round_every,
                validators,
                halt,
                ..
            } => {
                let key_path = keys.join("priv_validator_key.json");
                crate::comet::key::ValidatorKey::generate().write_new(&key_path)?;
                // What a host misconfigured into validator mode links
                // (`NodeOpts::validator_mode`): a key its fakenode runs with.
                KeyFile::generate("validator.test").write_new(&keys.join(VALIDATOR_MODE_KEY))?;
                signer_chain_args(&mut chain_cmd, chain_id, (*round_every, *validators), halt);
                key_path
            }
        };
        let chain_proc = Proc::spawn(
            "fakechain",
            chain_cmd.arg("--validator-key").arg(&key_path),
            dir.path(),
        )?;
        let chain = ChainClient::new(&format!("http://{chain_addr}"));
        let ca = dir.path().join("ca");
        certs(&keyraft, &["ca"], &ca)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let base = dir.path().join(format!("n{id}"));
            let tls = base.join("tls");
            let id_arg = id.to_string();
            let ca_arg = ca.display().to_string();
            let node_opts = opts(id);
            let mut args = vec![
                "node",
                "--ca",
                &ca_arg,
                "--id",
                &id_arg,
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
            ];
            if node_opts.witness {
                args.push("--witness");
            }
            certs(&keyraft, &args, &tls)?;
            let home = base.join("home");
            std::fs::create_dir_all(&home)?;
            crate::shape::lay_out_for(&mode, &home, node_opts.cosmovisor)?;
            crate::token::lay_out(&keyraft, &base, &key_path, node_opts.key_in)?;
            if let Some(name) = &node_opts.validator_user {
                let user = nix::unistd::User::from_name(name)?
                    .with_context(|| format!("no user {name} on this host"))?;
                for path in [&home, &key_path] {
                    nix::unistd::chown(path.as_path(), Some(user.uid), Some(user.gid))
                        .with_context(|| format!("chown {name} {}", path.display()))?;
                }
            }
            let mut extra = Vec::new();
            if matches!(mode, Mode::Signer { .. }) && !node_opts.witness {
                for k in 1..=node_opts.extra_sentries {
                    extra.push(ExtraSentry {
                        id: 10 * id + k,
                        privval: free_addr()?,
                        rpc: free_addr()?,
                        proc: None,
                    });
                }
            }
            nodes.insert(
                id,
                Node {
                    id,
                    listen: free_addr()?,
                    admin: base.join("admin.sock"),
                    http: free_addr()?,
                    rpc: free_addr()?,
                    privval: free_addr()?,
                    data: base.join("data"),
                    tls,
                    home,
                    opts: node_opts,
                    proc: None,
                    extra,
                },
            );
        }
        let mut proxies = BTreeMap::new();
        for from in 1..=n {
            for to in 1..=n {
                if from != to {
                    let upstream = nodes[&to].listen;
                    proxies.insert(
                        (from, to),
                        Proxy::start("127.0.0.1:0".parse()?, upstream).await?,
                    );
                }
            }
        }
        let hosts: Vec<u64> = nodes
            .values()
            .filter(|n| !n.opts.witness)
            .map(|n| n.id)
            .collect();
        let others = other_chains(dir.path(), &mode, block_ms, &hosts)?;
        let mut c = Cluster {
            dir,
            keyraft,
            chain,
            key_path,
            nodes,
            proxies,
            mode,
            others,
            _chain: chain_proc,
        };
        for judge in std::iter::once(&c.chain).chain(c.others.iter().map(|o| &o.chain)) {
            judge
                .wait_height(1, SETTLE)
                .await
                .context("fakechain did not start")?;
        }
        for id in 1..=n {
            c.spawn(id)?;
        }
        Ok(c)
    }

    /// The `keyraft run` command line of node `id`.
    pub fn command(&self, id: u64) -> Command {
        let node = &self.nodes[&id];
        let mut cmd = Command::new(&self.keyraft);
        cmd.env("RUST_LOG", "info,openraft=warn")
            .arg("run")
            .args(["--node-id", &id.to_string()])
            .args(["--listen", &node.listen.to_string()])
            .arg("--admin-socket")
            .arg(&node.admin)
            .args(["--http-listen", &node.http.to_string()])
            .arg("--data-dir")
            .arg(&node.data)
            .arg("--tls-dir")
            .arg(&node.tls);
        for (&(from, to), p) in &self.proxies {
            if from == id {
                let addr = match node.opts.direct_peers {
                    true => self.nodes[&to].listen,
                    false => p.addr,
                };
                cmd.args(["--peer", &format!("{to}={addr}")]);
            }
        }
        cmd.args(&node.opts.flags);
        cmd.envs(node.opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(user) = &node.opts.validator_user {
            cmd.args(["--validator-user", user]);
        }
        if node.opts.fencing != Fencing::None && !node.opts.witness {
            for other in self
                .nodes
                .values()
                .filter(|o| o.id != id && !o.opts.witness)
            {
                let agent = match node.opts.fencing {
                    Fencing::Failing => PathBuf::from("/bin/false"),
                    _ => sibling_bin("fakefence").unwrap_or_default(),
                };
                let plug = other.data.parent().unwrap_or(&other.data);
                cmd.arg("--fence-agent")
                    .arg(format!("{}={}", other.id, agent.display()))
                    .arg("--fence-option")
                    .arg(format!("{}:plug={}", other.id, plug.display()));
                if node.opts.fencing == Fencing::Hanging {
                    cmd.args(["--fence-option", &format!("{}:hang=1", other.id)]);
                }
            }
        }
        let signer = match &self.mode {
            Mode::Signer { chain_id, .. } if !node.opts.validator_mode => Some(chain_id),
            _ => None,
        };
        if node.opts.witness {
            cmd.arg("--witness");
        } else if let Some(chain_id) = signer {
            let privval = format!("tcp://{}", node.privval);
            let dial = match &node.opts.privval_pin {
                Some(id) => format!("tcp://{id}@{}", node.privval),
                None => privval.clone(),
            };
            let base = node.data.parent().unwrap_or(&node.data);
            let (env, key) = crate::token::key_args(base, &self.key_path, node.opts.key_in);
            cmd.args(["--signer", "cometbft"]).envs(env);
            if self.others.is_empty() {
                cmd.args(["--chain-id", chain_id])
                    .args(["--privval-node", &dial]);
                for e in &node.extra {
                    cmd.args(["--privval-node", &format!("tcp://{}", e.privval)]);
                }
                cmd.args(key);
            } else {
                // Several chains: every one in `[[chains]]` ([`Cluster::spawn`]
                // writes the file).
                cmd.arg("--config").arg(self.chains_file(id));
            }
            let health_url = node
                .opts
                .health_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", node.rpc));
            let (env, program) = crate::shape::sentry_command(&node.opts, &node.home);
            cmd.args(["--health", "cometbft"])
                .args(["--health-url", &health_url])
                .args(crate::shape::follow_flags(&node.opts, node.rpc))
                .arg("--")
                .envs(env)
                .args(program)
                .args(["--cometbft", "--privval-listen", &privval])
                .args(["--chain", &self.chain.url, "--node-id", &id.to_string()])
                .args(["--rpc-listen", &node.rpc.to_string()])
                .args(&node.opts.fakenode);
        } else {
            let health_url = node
                .opts
                .health_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", node.rpc));
            let key = match self.mode {
                Mode::Signer { .. } => self.key_path.with_file_name(VALIDATOR_MODE_KEY),
                _ => self.key_path.clone(),
            };
            cmd.args(crate::shape::follow_flags(&node.opts, node.rpc))
                .arg("--validator-home")
                .arg(&node.home)
                .arg("--validator-key")
                .arg(&key)
                .args(["--health-url", &health_url])
                .arg("--")
                .args(node.opts.launch.prefix());
            // Under cosmovisor, its `run` takes the node's arguments and
            // picks the binary from its tree.
            if node.opts.cosmovisor.is_some() {
                cmd.envs(crate::shape::cosmovisor_env(&node.home))
                    .arg(sibling_bin("fakecosmovisor").unwrap_or_default())
                    .arg("run");
            } else {
                cmd.arg(sibling_bin("fakenode").unwrap_or_default());
            }
            cmd.arg("--home")
                .arg(&node.home)
                .args(["--chain", &self.chain.url, "--node-id", &id.to_string()])
                .args(["--rpc-listen", &node.rpc.to_string()])
                .args(&node.opts.fakenode)
                .args(node.opts.launch.fakenode());
        }
        cmd
    }

    /// Starts (or restarts) coordinator `id` (and, in signer mode, the
    /// host's extra sentries that are not running).
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let chain = self.chain.url.clone();
        let log_dir = self.dir.path().to_path_buf();
        for e in &mut self.node_mut(id)?.extra {
            e.start(&chain, "sentry", &log_dir)?;
        }
        for other in &mut self.others {
            if let Some(e) = other.sentries.get_mut(&id) {
                e.start(
                    &other.chain.url,
                    &format!("{}-sentry", other.chain_id),
                    &log_dir,
                )?;
            }
        }
        if !self.others.is_empty() {
            let toml = self.chains_toml(id)?;
            std::fs::write(self.chains_file(id), toml)?;
        }
        let mut cmd = self.command(id);
        let proc = Proc::spawn(&format!("keyraft{id}"), &mut cmd, self.dir.path())?;
        self.node_mut(id)?.proc = Some(proc);
        Ok(())
    }

    /// Signer mode with several chains: node `id`'s `[[chains]]` file.
    pub fn chains_file(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}/chains.toml"))
    }

    /// Every chain host `id` signs for, as `[[chains]]` tables.
    pub fn chains_toml(&self, id: u64) -> Result<String> {
        let node = &self.nodes[&id];
        let Mode::Signer { chain_id, .. } = &self.mode else {
            bail!("chains belong to signer mode");
        };
        let mut first = vec![match &node.opts.privval_pin {
            Some(pin) => format!("tcp://{pin}@{}", node.privval),
            None => format!("tcp://{}", node.privval),
        }];
        first.extend(node.extra.iter().map(|e| format!("tcp://{}", e.privval)));
        let wrong = match node.opts.other_key {
            true => Some(crate::chains::wrong_key(self.dir.path(), id)?),
            false => None,
        };
        let base = node.data.parent().unwrap_or(&node.data);
        let [_, key] = crate::token::key_args(base, &self.key_path, node.opts.key_in).1;
        let first = (
            chain_id.as_str(),
            Path::new(&key),
            first.as_slice(),
            node.rpc,
        );
        crate::chains::chains_toml(first, &self.others, id, wrong, !node.opts.no_node_rpc)
    }

    /// Every chain's judge: the first chain's, then the others'.
    pub fn judges(&self) -> Vec<(&str, &ChainClient)> {
        crate::chains::judges(&self.mode, &self.chain, &self.others)
    }

    pub fn node_mut(&mut self, id: u64) -> Result<&mut Node> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    pub fn proc(&self, id: u64) -> Result<&Proc> {
        self.nodes[&id]
            .proc
            .as_ref()
            .ok_or_else(|| anyhow!("node {id} is not running"))
    }

    /// Whether coordinator `id` is running (not killed, not exited).
    pub fn running(&mut self, id: u64) -> bool {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.proc.as_mut())
            .is_some_and(|p| p.try_exit().is_none())
    }

    /// Forgets a coordinator process (after it exited or was killed).
    pub fn forget(&mut self, id: u64) -> Result<Option<Proc>> {
        Ok(self.node_mut(id)?.proc.take())
    }

    /// Heights nobody signed between `old`'s last signature and `new`'s
    /// first, as the chain recorded them.
    pub async fn signing_gap(&self, old: u64, new: u64) -> Result<u64> {
        let s = self.chain.stats_since(0).await?;
        let last_old = s.last_signed_by(old).unwrap_or(0);
        let first_new = s.first_signed_by(new, last_old).unwrap_or(last_old + 1);
        Ok(first_new.saturating_sub(last_old + 1))
    }

    /// (leader, term) if every node's status agrees and has quorum.
    pub async fn agreed_leader(&self, ids: &[u64]) -> Result<Option<(u64, u64)>> {
        let mut seen = std::collections::BTreeSet::new();
        for &id in ids {
            let v = self.status(id).await?;
            let cl = &v["cluster"];
            if cl["quorum"] != true {
                return Ok(None);
            }
            match (cl["leader"].as_u64(), cl["term"].as_u64()) {
                (Some(l), Some(t)) => seen.insert((l, t)),
                _ => return Ok(None),
            };
        }
        Ok((seen.len() == 1).then(|| seen.into_iter().next()).flatten())
    }

    /// `keyraft status --json` as answered by node `id`.
    pub async fn status(&self, id: u64) -> Result<Value> {
        let out = tokio::process::Command::new(&self.keyraft)
            .args(["status", "--json", "--admin-socket"])
            .arg(&self.nodes[&id].admin)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "status from node {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs a `keyraft` CLI subcommand against node `id`'s admin port.
    pub async fn cli(&self, id: u64, args: &[&str]) -> Result<std::process::Output> {
        Ok(tokio::process::Command::new(&self.keyraft)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.nodes[&id].admin)
            .output()
            .await?)
    }

    /// `GET /metrics` of node `id`, parsed into name{labels} -> value.
    pub async fn metrics(&self, id: u64) -> Result<BTreeMap<String, f64>> {
        let text = reqwest::get(format!("http://{}/metrics", self.nodes[&id].http))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    pub async fn metric(&self, id: u64, name: &str) -> Result<f64> {
        self.metrics(id)
            .await?
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("node {id} has no metric {name}"))
    }

    /// Node `id`'s own view of its coordinator state.
    pub async fn own_state(&self, id: u64) -> Result<String> {
        let me = crate::harness::node_entry(&self.status(id).await?, id);
        anyhow::ensure!(!me.is_null(), "node {id} missing from its own status");
        Ok(me["state"].as_str().unwrap_or("").to_string())
    }

    /// Waits until some node signs on the chain and exactly that node
    /// reports Validating; returns its id and the chain stats then.
    pub async fn wait_signer(&self, since: u64, not: &[u64]) -> Result<(u64, Stats)> {
        eventually(SETTLE, "a new signer on the chain", || async {
            let s = self.chain.stats_since(since).await?;
            Ok(s.signers
                .iter()
                .rev()
                .find(|x| !not.contains(&x.node))
                .map(|x| (x.node, s.clone())))
        })
        .await
    }

    /// The node that validates, once the chain has seen it sign.
    pub async fn active(&self) -> Result<u64> {
        let (id, _) = self.wait_signer(0, &[]).await?;
        eventually(SETTLE, "the signer to report Validating", || async {
            Ok((self.own_state(id).await? == "Validating").then_some(id))
        })
        .await
    }

    /// The pid of the validator (fakenode) that node `id`'s guard runs.
    pub fn validator_pid(&self, id: u64) -> Option<i32> {
        let text = std::fs::read_to_string(self.nodes[&id].data.join("validator.pid")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// The chain's verdict: no double signs, ever.
    /// With several chains, every chain's judge is asked; the first
    /// chain's totals are returned.
    pub async fn assert_no_double_signs(&self) -> Result<Stats> {
        for (chain, judge) in self.judges().into_iter().rev() {
            let s = judge.totals().await?;
            if s.double_signs != 0 {
                let all = judge.stats_since(0).await?;
                bail!(
                    "{} double signs on {chain}; signers: {:?}\n{}",
                    s.double_signs,
                    all.signers,
                    self.logs()
                );
            }
        }
        self.chain.totals().await
    }

    /// The tail of every coordinator log, for failure messages.
    pub fn logs(&self) -> String {
        self.logs_ending_with(None)
    }

    /// As [`Cluster::logs`], with node `last`'s log at the end, where a
    /// truncated CI report still shows it.
    pub fn logs_ending_with(&self, last: Option<u64>) -> String {
        let mut order: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| Some(id) != last)
            .collect();
        order.extend(last);
        order
            .iter()
            .filter_map(|id| self.nodes[id].proc.as_ref())
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `keyraft certs ARGS --out OUT`.
pub fn certs(keyraft: &Path, args: &[&str], out: &Path) -> Result<()> {
    crate::harness::run(
        Command::new(keyraft)
            .arg("certs")
            .args(args)
            .arg("--out")
            .arg(out),
    )
}
