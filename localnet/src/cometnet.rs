//! A CometBFT judge on loopback for tests and benchmarks: fakechain in
//! CometBFT mode, sentries (`fakenode --cometbft`) and tmkms signers.
//!
//! Owns: a scratch dir with the validator's `priv_validator_key.json`, the
//! processes it starts (killed when dropped), and the addresses that tie
//! them together. Must not: decide pass or fail; callers ask the chain.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::comet::key::ValidatorKey;
use crate::comet::node::Protocol;
use crate::comet::privval::PrivvalStats;
use crate::harness::{free_addr, get_json, sibling_bin, ChainClient, Proc};
use crate::tmkms;

/// How the chain runs.
#[derive(Debug, Clone)]
pub struct NetOpts {
    pub block_ms: u64,
    pub round_every: u64,
    pub validators: u64,
    pub vote_extensions: bool,
    /// The validator's key; a new one when `None`.
    pub key: Option<ValidatorKey>,
    /// Delay of the chain's first round (chains started together then
    /// tick apart, as independent chains do).
    pub phase_ms: u64,
}

impl Default for NetOpts {
    fn default() -> Self {
        Self {
            block_ms: 500,
            round_every: 0,
            validators: 4,
            vote_extensions: false,
            key: None,
            phase_ms: 0,
        }
    }
}

/// How a sentry runs.
#[derive(Debug, Clone)]
pub struct SentryOpts {
    /// Listen for the signer on a Unix socket instead of TCP.
    pub unix: bool,
    pub protocol: Protocol,
    pub equivocate: bool,
    /// Ask the signer for this chain id instead of the chain's.
    pub chain_id: Option<String>,
}

impl Default for SentryOpts {
    fn default() -> Self {
        Self {
            unix: false,
            protocol: Protocol::V0_38,
            equivocate: false,
            chain_id: None,
        }
    }
}

pub struct CometNet {
    pub dir: tempfile::TempDir,
    pub key: ValidatorKey,
    pub key_path: PathBuf,
    pub chain_id: String,
    pub chain: ChainClient,
    pub chain_proc: Proc,
}

pub struct Sentry {
    pub id: u64,
    pub proc: Proc,
    /// Base URL of its RPC (`/status`, `/privval`).
    pub rpc: String,
    /// Where a signer dials in: `tcp://HOST:PORT` or `unix:///PATH`.
    pub privval: String,
}

impl Sentry {
    pub async fn privval_stats(&self) -> anyhow::Result<PrivvalStats> {
        self.privval_stats_after(0).await
    }

    /// [`Sentry::privval_stats`] without the latencies of its first `skip`
    /// signatures (a benchmark's warm-up).
    pub async fn privval_stats_after(&self, skip: usize) -> anyhow::Result<PrivvalStats> {
        privval_stats(&self.rpc, skip).await
    }
}

/// What the fakenode whose RPC is `rpc` (http://HOST:PORT) saw of its
/// signer, the latencies of its first `skip` signatures left out.
pub async fn privval_stats(rpc: &str, skip: usize) -> anyhow::Result<PrivvalStats> {
    Ok(serde_json::from_value(
        get_json(&format!("{rpc}/privval?skip={skip}")).await?,
    )?)
}

impl CometNet {
    /// Starts the chain and waits for its first height.
    pub async fn start(opts: &NetOpts) -> anyhow::Result<CometNet> {
        let mut dir = tempfile::Builder::new()
            .prefix("keyraft-comet-")
            .tempdir()?;
        if std::env::var_os("KEYRAFT_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test dir kept: {}", dir.path().display());
        }
        let key = opts.key.clone().unwrap_or_else(ValidatorKey::generate);
        let key_path = dir.path().join("priv_validator_key.json");
        key.write_new(&key_path)?;
        let chain_id = format!("judge-{}", rand::random::<u32>());
        let addr = free_addr()?;
        let mut cmd = Command::new(sibling_bin("fakechain")?);
        cmd.args(["--cometbft", "--listen", &addr.to_string()])
            .args(["--block-ms", &opts.block_ms.to_string()])
            .args(["--phase-ms", &opts.phase_ms.to_string()])
            .args(["--chain-id", &chain_id])
            .args(["--round-every", &opts.round_every.to_string()])
            .args(["--validators", &opts.validators.to_string()])
            .arg("--validator-key")
            .arg(&key_path);
        if opts.vote_extensions {
            cmd.arg("--vote-extensions");
        }
        let chain_proc = Proc::spawn("fakechain", &mut cmd, dir.path())?;
        let chain = ChainClient::new(&format!("http://{addr}"));
        chain
            .wait_height(1, Duration::from_secs(10))
            .await
            .with_context(|| format!("fakechain did not start: {}", chain_proc.log_tail(5)))?;
        Ok(CometNet {
            dir,
            key,
            key_path,
            chain_id,
            chain,
            chain_proc,
        })
    }

    /// Starts sentry `id`, listening for a signer.
    pub fn sentry(&self, id: u64, opts: &SentryOpts) -> anyhow::Result<Sentry> {
        let rpc = free_addr()?;
        let privval = if opts.unix {
            format!(
                "unix://{}",
                self.dir.path().join(format!("privval{id}.sock")).display()
            )
        } else {
            format!("tcp://{}", free_addr()?)
        };
        let mut cmd = Command::new(sibling_bin("fakenode")?);
        cmd.args(["--cometbft", "--privval-listen", &privval])
            .args(["--chain", &self.chain.url])
            .args(["--node-id", &id.to_string()])
            .args(["--rpc-listen", &rpc.to_string()])
            .args([
                "--protocol",
                match opts.protocol {
                    Protocol::V0_34 => "v0.34",
                    Protocol::V0_38 => "v0.38",
                    Protocol::V1 => "v1",
                },
            ]);
        if opts.equivocate {
            cmd.arg("--equivocate");
        }
        if let Some(c) = &opts.chain_id {
            cmd.args(["--chain-id", c]);
        }
        let proc = Proc::spawn(&format!("sentry{id}"), &mut cmd, self.dir.path())?;
        Ok(Sentry {
            id,
            proc,
            rpc: format!("http://{rpc}"),
            privval,
        })
    }

    /// Starts (or restarts, keeping its state file) tmkms `name` for `sentry`.
    pub fn tmkms(
        &self,
        name: &str,
        sentry: &Sentry,
        protocol: Protocol,
        sign_extensions: bool,
    ) -> anyhow::Result<Proc> {
        self.tmkms_for(name, &[sentry], protocol, sign_extensions)
    }

    /// Starts one tmkms (one key, one watermark) serving every sentry given.
    pub fn tmkms_for(
        &self,
        name: &str,
        sentries: &[&Sentry],
        protocol: Protocol,
        sign_extensions: bool,
    ) -> anyhow::Result<Proc> {
        tmkms::start(
            name,
            &self.dir.path().join(name),
            self.dir.path(),
            &[self.tmkms_chain(sentries, protocol, sign_extensions)],
        )
    }

    /// This chain as one of a tmkms's chains, served on `sentries`.
    pub fn tmkms_chain(
        &self,
        sentries: &[&Sentry],
        protocol: Protocol,
        sign_extensions: bool,
    ) -> tmkms::Signer<'_> {
        tmkms::Signer {
            chain_id: &self.chain_id,
            key: &self.key_path,
            addrs: sentries.iter().map(|s| s.privval.clone()).collect(),
            protocol,
            sign_extensions,
        }
    }
}
