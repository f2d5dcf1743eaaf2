//! The flags of `keyraft run`, which are also its TOML keys and (as
//! `KEYRAFT_*`) its environment variables, and the merge of the three.
//!
//! Owns: names, help texts and precedence (flag, then environment, then
//! file). Must not: apply defaults or validate; [`super`] does, in
//! [`RunArgs::resolve`]. docs/configuration.md is generated from the help
//! texts here (`tests/config.rs` fails when it drifts).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    invalid, ActivateBy, Chain, ConfigError, HealthKind, KernelFence, Millis, NodeId, SignerKind,
    TimingProfile, UpgradesBy,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags of `keyraft run`. Every field is optional here so that flags,
/// environment and file can be merged; defaults are applied in [`RunArgs::resolve`].
#[derive(Debug, Default, Clone, clap::Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// TOML file with any of these settings (keys as the long flag names).
    #[arg(long, env = "KEYRAFT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// This coordinator's node id (1, 2, ...).
    #[arg(long, env = "KEYRAFT_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// Peer port to listen on (Raft and gossip, mTLS) [default: 0.0.0.0:7700].
    #[arg(long, env = "KEYRAFT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address peers reach this node at [default: --listen, if not a wildcard].
    #[arg(long, env = "KEYRAFT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Another member, as ID=HOST:PORT (repeat for each; never this node).
    #[arg(long = "peer", env = "KEYRAFT_PEERS", value_delimiter = ',')]
    pub peer: Vec<String>,
    /// Data dir: Raft log and vote, lock, validator pid [default: /var/lib/keyraft].
    #[arg(long, env = "KEYRAFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin socket, the CLI's way in: its mode (0660) and group decide
    /// who may drive the cluster [default: /run/keyraft/admin.sock].
    #[arg(long, env = "KEYRAFT_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Group of the admin socket, a name or a gid: its members may run
    /// operator commands [default: keyraft's own group].
    #[arg(long, env = "KEYRAFT_ADMIN_GROUP")]
    pub admin_group: Option<String>,
    /// Admin gRPC over TCP for remote operators: mTLS, and only clients
    /// with an admin certificate (`keyraft certs admin`) [default: off].
    #[arg(long, env = "KEYRAFT_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// HTTP address for /metrics /health /leader /replica /status [default: 127.0.0.1:2233].
    #[arg(long, env = "KEYRAFT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Dir with ca.pem, node.pem and node.key [default: DATA_DIR/tls].
    #[arg(long, env = "KEYRAFT_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plaintext peer traffic. For experiments only: anyone who can reach the
    /// peer port can then vote.
    #[arg(long, env = "KEYRAFT_INSECURE")]
    pub insecure: bool,
    /// A voting member with no validator; never campaigns, never validates.
    #[arg(long, env = "KEYRAFT_WITNESS")]
    pub witness: bool,
    /// Start with an empty data dir in an initialised cluster: join as a new
    /// learner, then become a voter again once caught up.
    #[arg(long, env = "KEYRAFT_REJOIN")]
    pub rejoin: bool,
    /// Log format [default: text].
    #[arg(long, env = "KEYRAFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Pins the timing profile: lan (peer round trips under 25 ms) or wan
    /// (nearby datacentres, up to 100 ms) [default: auto, the cluster picks
    /// from measured round trips; any timing flag pins].
    #[arg(long, env = "KEYRAFT_TIMING", value_enum)]
    pub timing: Option<TimingProfile>,
    /// Leader heartbeat interval [default: 100ms with --timing lan, 150ms with wan].
    #[arg(long, env = "KEYRAFT_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<Millis>,
    /// Shortest election timeout [default: 300ms lan, 450ms wan].
    #[arg(long, env = "KEYRAFT_ELECTION_TIMEOUT_MIN")]
    pub election_timeout_min: Option<Millis>,
    /// Longest election timeout; also the followers' leader lease [default: 600ms lan, 900ms wan].
    #[arg(long, env = "KEYRAFT_ELECTION_TIMEOUT_MAX")]
    pub election_timeout_max: Option<Millis>,
    /// The validator is killed this long after the last quorum-acked heartbeat was sent [default: 350ms lan, 600ms wan].
    #[arg(long, env = "KEYRAFT_FENCE_AFTER")]
    pub fence_after: Option<Millis>,
    /// Time to SIGKILL the validator's process group and see it gone [default: 100ms].
    #[arg(long, env = "KEYRAFT_KILL_BOUND")]
    pub kill_bound: Option<Millis>,
    /// Allowance for clock rate differences and scheduling delays [default: 100ms].
    #[arg(long, env = "KEYRAFT_DRIFT_MARGIN")]
    pub drift_margin: Option<Millis>,
    /// Extra wait of a new leader before it activates [default: the least the safety inequality allows].
    #[arg(long, env = "KEYRAFT_HANDOVER_DELAY")]
    pub handover_delay: Option<Millis>,
    /// How long a sick active validator is tolerated before handing over [default: 5s].
    #[arg(long, env = "KEYRAFT_UNHEALTHY_GRACE")]
    pub unhealthy_grace: Option<Millis>,
    /// Graceful stop of the validator before SIGKILL [default: 10s].
    #[arg(long, env = "KEYRAFT_STOP_TIMEOUT")]
    pub stop_timeout: Option<Millis>,

    /// Key-link preset [default: near if --validator-key is given, else generic].
    #[arg(long, env = "KEYRAFT_CHAIN", value_enum)]
    pub chain: Option<Chain>,
    /// The validator node's home dir (neard home, CometBFT home).
    #[arg(long, visible_alias = "neard-home", env = "KEYRAFT_VALIDATOR_HOME")]
    pub validator_home: Option<PathBuf>,
    /// The validator key file (linked into the home only while validating;
    /// signer mode: its priv_validator_key.json, or a pkcs11: URI of a key
    /// in a token).
    #[arg(long, env = "KEYRAFT_VALIDATOR_KEY")]
    pub validator_key: Option<PathBuf>,
    /// NEAR: node key linked while validating (the validator's network identity).
    #[arg(long, env = "KEYRAFT_VALIDATOR_NODE_KEY")]
    pub validator_node_key: Option<PathBuf>,
    /// NEAR: this host's own node key, linked while standing by.
    #[arg(long, env = "KEYRAFT_VOTER_NODE_KEY")]
    pub voter_node_key: Option<PathBuf>,
    /// Extra link SRC=DST made only while validating (repeatable).
    #[arg(long = "key-link", env = "KEYRAFT_KEY_LINKS", value_delimiter = ',')]
    pub key_link: Vec<String>,
    /// How a standby becomes the validator [default: restart].
    #[arg(long, env = "KEYRAFT_ACTIVATE_BY", value_enum)]
    pub activate_by: Option<ActivateBy>,
    /// How the validator's health is probed [default: near for --chain near, cometbft for cometbft, else http].
    #[arg(long, env = "KEYRAFT_HEALTH", value_enum)]
    pub health: Option<HealthKind>,
    /// Probe address [default: http://127.0.0.1:3030 for near, :26657 for cometbft].
    #[arg(long, env = "KEYRAFT_HEALTH_URL")]
    pub health_url: Option<String>,
    /// Accept activating without a height watermark (required with
    /// `--health http`, which reports no block heights): a successor then
    /// relies on the lease alone, not on the chain having moved past the
    /// heights the previous holder may have signed.
    #[arg(long, env = "KEYRAFT_NO_HEIGHT_WATERMARK")]
    pub no_height_watermark: bool,
    /// Track the validator's process tree without a cgroup even where one
    /// could be made (environment marker and subreaper only; see docs/safety.md).
    #[arg(long, env = "KEYRAFT_NO_CGROUP")]
    pub no_cgroup: bool,
    /// Start the validator as this user (never root): a good practice, and
    /// what the kernel fence matches on where the validator has no cgroup v2
    /// of its own (in a Docker container, say). keyraft needs root, or
    /// CAP_SETUID and CAP_SETGID, to use it.
    #[arg(long, env = "KEYRAFT_VALIDATOR_USER")]
    pub validator_user: Option<String>,
    /// Hold back the validator's outbound traffic in the kernel unless its
    /// lease lives (an nftables table of keyraft's own): auto, required or
    /// off [default: auto].
    #[arg(long, env = "KEYRAFT_KERNEL_FENCE", value_enum)]
    pub kernel_fence: Option<KernelFence>,
    /// Who switches the node's binary at the chain's upgrade halts: none
    /// (keyraft does not follow upgrades), or cosmovisor, run as the
    /// validator command (`-- cosmovisor run ...`) with its `DAEMON_HOME`
    /// and `DAEMON_NAME` in keyraft's environment: keyraft then reads the
    /// pending upgrade and its binary from cosmovisor's tree, gossips them,
    /// holds the key through the halt, and lets only an upgraded host lead
    /// after it (in signer mode: shows them, and names a host without the
    /// binary before the height) [default: none].
    #[arg(long, env = "KEYRAFT_UPGRADES", value_enum)]
    pub upgrades: Option<UpgradesBy>,
    /// With --upgrades cosmovisor: the node's Cosmos SDK REST API (its
    /// `api.address`, e.g. http://127.0.0.1:1317), asked for the scheduled
    /// upgrade plan so that a host without the upgrade's binary is known
    /// before the height. Without it, an upgrade is known only at its halt.
    #[arg(long, env = "KEYRAFT_UPGRADE_PLAN_URL")]
    pub upgrade_plan_url: Option<String>,

    /// A fence agent for another member, as ID=PATH: a ClusterLabs-style
    /// agent (`fence_docker`, `fence_ipmilan`, `fence_aws`, ...) that powers
    /// that host off before this node takes the key over from it without a
    /// release. Repeat for each member that has one.
    #[arg(
        long = "fence-agent",
        env = "KEYRAFT_FENCE_AGENTS",
        value_delimiter = ','
    )]
    pub fence_agent: Vec<String>,
    /// An option for a member's fence agent, as ID:NAME=VALUE (sent on the
    /// agent's stdin as NAME=VALUE; repeatable). Never a secret: use
    /// --fence-secret for passwords.
    #[arg(
        long = "fence-option",
        env = "KEYRAFT_FENCE_OPTIONS",
        value_delimiter = ','
    )]
    pub fence_option: Vec<String>,
    /// A secret option for a member's fence agent, as ID:NAME=FILE: the
    /// value is read from FILE (which others must not be able to read) each
    /// time the agent runs.
    #[arg(
        long = "fence-secret",
        env = "KEYRAFT_FENCE_SECRETS",
        value_delimiter = ','
    )]
    pub fence_secret: Vec<String>,
    /// Longest a fence agent may take for one `off`, and for `status` to
    /// confirm the host is off, before the attempt counts as failed [default: 30s].
    #[arg(long, env = "KEYRAFT_FENCE_TIMEOUT")]
    pub fence_timeout: Option<Millis>,
    /// Fence attempts per takeover try; after the last fails, the takeover
    /// waits and tries again, fencing first [default: 2].
    #[arg(long, env = "KEYRAFT_FENCE_ATTEMPTS")]
    pub fence_attempts: Option<u32>,

    /// Signer mode: keyraft is the chain's remote signer, and every
    /// signature is committed through Raft first. No key is linked anywhere;
    /// the command after `--`, if any, runs as a plain full node.
    #[arg(long, env = "KEYRAFT_SIGNER", value_enum)]
    pub signer: Option<SignerKind>,
    /// Signer mode: a node's privval address to dial (its
    /// `priv_validator_laddr`): tcp://HOST:PORT or unix:///PATH. Repeat for
    /// several sentries.
    #[arg(
        long = "privval-node",
        env = "KEYRAFT_PRIVVAL_NODES",
        value_delimiter = ','
    )]
    pub privval_node: Vec<String>,
    /// Signer mode: the chain id every request must carry.
    #[arg(long, env = "KEYRAFT_CHAIN_ID")]
    pub chain_id: Option<String>,
    /// Signer mode: the privval protocol the chain's nodes speak, v0.38
    /// (CometBFT 0.37 and 0.38), v1 (CometBFT 1.x), or either (around an
    /// upgrade from 0.38 to 1.x: both are answered) [default: v0.38].
    #[arg(long, env = "KEYRAFT_PROTOCOL_VERSION", value_enum)]
    pub protocol_version: Option<crate::config::ProtocolVersion>,
    /// Signer mode, CometBFT 1.x: sign a node's `SignBytesRequest` (raw
    /// bytes that are no vote, proposal or vote extension of the chain).
    #[arg(long, env = "KEYRAFT_SIGN_BYTES")]
    pub sign_bytes: bool,
    /// Signer mode, several chains: one `[[chains]]` table each in the
    /// TOML file (no flag), instead of --chain-id, --validator-key and
    /// --privval-node.
    #[arg(skip)]
    pub chains: Vec<ChainArgs>,
    /// Signer mode: this signer's SecretConnection identity (32-byte ed25519
    /// seed, base64, as tmkms's `secret_key`); made in the data dir if absent.
    #[arg(long, env = "KEYRAFT_PRIVVAL_IDENTITY_KEY")]
    pub privval_identity_key: Option<PathBuf>,

    /// The validator command and its arguments, after `--`.
    #[arg(last = true, value_name = "VALIDATOR_CMD")]
    pub command: Vec<String>,
}

/// One `[[chains]]` table of the TOML file: a chain signer mode signs for,
/// with the keys of its one-chain flags.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChainArgs {
    /// The chain id its requests carry.
    pub chain_id: String,
    /// Its `priv_validator_key.json`, or a key in a PKCS#11 token:
    /// `pkcs11:token=T;object=O?module-path=M&pin-source=file:/PIN`.
    pub validator_key: PathBuf,
    /// Its nodes' privval addresses, as `--privval-node`.
    pub privval_node: Vec<String>,
    /// The CometBFT RPC (http://HOST:PORT) of a synced node of the chain
    /// on this host: the height its `/status` reports bounds the heights
    /// signed for the chain. Without it, the bound is 1,000 heights over a
    /// base that follows the watermark at most 10 heights a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_rpc: Option<String>,
    /// As `--protocol-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<crate::config::ProtocolVersion>,
    /// As `--sign-bytes`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sign_bytes: bool,
}

impl RunArgs {
    /// Fills what flags and environment left unset from the TOML file
    /// named by `--config`, if any: a setting given on the command line
    /// wins; an unset one (no value, an empty list, `false`) takes the
    /// file's. Field by field through serde, so a new flag needs no line here.
    pub fn merge_file(self) -> Result<RunArgs, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file_error = |why: String| ConfigError::File {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
        let file: RunArgs =
            toml::from_str(&text).map_err(|e| file_error(e.message().to_string()))?;
        let internal = |e: serde_json::Error| invalid(format!("merging {}: {e}", path.display()));
        let serde_json::Value::Object(mut merged) =
            serde_json::to_value(&self).map_err(internal)?
        else {
            return Err(invalid("the flags do not form a table"));
        };
        let serde_json::Value::Object(from_file) = serde_json::to_value(&file).map_err(internal)?
        else {
            return Err(invalid("the file does not form a table"));
        };
        for (key, theirs) in from_file {
            let mine = merged.entry(key).or_insert(serde_json::Value::Null);
            if unset(mine) {
                *mine = theirs;
            }
        }
        let mut out: RunArgs =
            serde_json::from_value(serde_json::Value::Object(merged)).map_err(internal)?;
        out.config = self.config;
        Ok(out)
    }
}

/// docs/configuration.md: every setting of `keyraft run`, generated from
/// the help texts above (the flag, its TOML key, its environment variable,
/// what it does and its default). `tests/config.rs` fails when the file
/// and this disagree; `KEYRAFT_UPDATE_DOCS=1` rewrites the file.
pub fn reference() -> String {
    use clap::Args as _;
    let cmd = RunArgs::augment_args(clap::Command::new("run"));
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the help texts of `keyraft run` (`src/config/args.rs`);\n\
         `tests/config.rs` fails when the two drift apart. Every setting can be\n\
         given as a flag, as a `KEYRAFT_*` environment variable, or as a key of\n\
         the TOML file named by `--config` (keys are the long flag names without\n\
         the dashes in front). A flag or variable wins over the file. Durations\n\
         are written `600ms`, `1.5s` or as a bare number of milliseconds.\n\n\
         | flag | TOML key | environment | what it sets |\n| --- | --- | --- | --- |\n",
    );
    for arg in cmd.get_arguments() {
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| {
                h.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "-".into());
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        let choices = if values.is_empty() {
            String::new()
        } else {
            format!(" One of {}.", values.join(", "))
        };
        let (flag, key) = match arg.get_long() {
            Some(long) if long == "config" => (format!("`--{long}`"), "-".to_string()),
            Some(long) => (format!("`--{long}`"), format!("`{}`", arg.get_id())),
            None => ("`-- CMD ARGS...`".to_string(), "`command`".to_string()),
        };
        let key = key.replace('_', "-");
        out.push_str(&format!(
            "| {flag} | {key} | {env} | {}{choices} |\n",
            help.replace('|', "\\|")
        ));
    }
    out.push_str(
        "\n## Several chains (signer mode)\n\n\
         One cluster signs for several chains when the TOML file lists them,\n\
         one `[[chains]]` table each, in place of `--chain-id`,\n\
         `--validator-key` and `--privval-node` (which serve the one-chain case\n\
         and cannot be combined with the tables). Each table takes those three\n\
         keys: `chain-id`, `validator-key` (the chain's own\n\
         `priv_validator_key.json`) and `privval-node` (a list), and may take\n\
         `node-rpc`: the CometBFT RPC (http://HOST:PORT) of a node of the\n\
         chain on this host, whose height bounds the heights signed for the\n\
         chain (without it, 1,000 over a base that follows the watermark at most\n\
         10 heights a second, docs/signer.md). No two\n\
         chains share a chain id or a privval address. docs/signer.md says how\n\
         to add or remove one.\n\n\
         ```toml\n\
         signer = \"cometbft\"\n\n\
         [[chains]]\n\
         chain-id = \"cosmoshub-4\"\n\
         validator-key = \"/etc/keyraft/cosmoshub/priv_validator_key.json\"\n\
         privval-node = [\"tcp://10.0.0.5:26659\"]\n\
         node-rpc = \"http://10.0.0.5:26657\"\n\n\
         [[chains]]\n\
         chain-id = \"osmosis-1\"\n\
         validator-key = \"/etc/keyraft/osmosis/priv_validator_key.json\"\n\
         privval-node = [\"tcp://10.0.0.6:26659\"]\n\
         node-rpc = \"http://10.0.0.6:26657\"\n\
         ```\n",
    );
    out
}

/// A setting left unset on the command line and in the environment.
fn unset(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_fills_only_what_flags_left_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyraft.toml");
        std::fs::write(
            &path,
            "node-id = 3\nlisten = \"127.0.0.1:7000\"\npeer = [\"1=a:1\"]\nwitness = true\n\
             fence-after = \"250ms\"\ntiming = \"wan\"\nkey-link = [\"a=b\"]\n",
        )
        .unwrap();
        let flags = RunArgs {
            config: Some(path.clone()),
            node_id: Some(1),
            peer: vec!["2=b:2".into()],
            fence_after: Some("1.5ms".parse().unwrap()),
            ..Default::default()
        };
        let m = flags.merge_file().unwrap();
        assert_eq!(m.node_id, Some(1), "a flag wins");
        assert_eq!(m.peer, vec!["2=b:2".to_string()], "a list flag wins whole");
        assert_eq!(
            m.fence_after,
            "1.5ms".parse().ok(),
            "sub-millisecond flags survive"
        );
        assert_eq!(m.listen, "127.0.0.1:7000".parse().ok(), "unset: the file's");
        assert!(m.witness);
        assert_eq!(m.timing, Some(TimingProfile::Wan));
        assert_eq!(m.key_link, vec!["a=b".to_string()]);
        assert_eq!(m.config, Some(path.clone()));
        std::fs::write(&path, "no-such-key = 1\n").unwrap();
        let err = RunArgs {
            config: Some(path),
            ..Default::default()
        }
        .merge_file()
        .unwrap_err();
        assert!(err.to_string().contains("no-such-key"), "{err}");
    }
}
