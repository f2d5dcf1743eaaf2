//! Configuration of `keyraft run`: flags, `KEYRAFT_*` environment variables
//! and an optional TOML file, merged in that order of precedence, then
//! validated into a [`Config`].
//!
//! Owns: every default of DESIGN.md's timing table, the chain presets (which
//! key files are linked where), and the checks that must pass before anything
//! starts (ids, addresses, certificates, key file modes, the safety
//! inequality). Must not: touch the network or start processes; a bad value
//! is one [`ConfigError`] line and exit code 2.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub use crate::ledger::NodeId;

/// A configuration problem, printed as one line before exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config file {path}: {why}")]
    File { path: String, why: String },
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// A duration written as `100ms`, `1.5s` or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub Duration);

impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = s.strip_suffix('s') {
            (n, 1000.0)
        } else {
            (s, 1.0)
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("bad duration '{s}': want e.g. 600ms or 1.5s"))?;
        if !(0.0..=86_400_000.0).contains(&(v * scale)) {
            return Err(format!("bad duration '{s}': out of range"));
        }
        Ok(Millis(Duration::from_micros(
            (v * scale * 1000.0).round() as u64
        )))
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(ms) => Ok(Millis(Duration::from_millis(ms))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    /// NEAR: validator_key.json and node_key.json in the neard home.
    Near,
    /// CometBFT: config/priv_validator_key.json in the node home.
    Cometbft,
    /// Only the links given with --key-link.
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActivateBy {
    /// Stop the node, relink, start it again.
    Restart,
    /// Relink and send SIGHUP (for nodes that hot-reload keys).
    Sighup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// GET /status in neard's shape.
    Near,
    /// GET /status in CometBFT's shape.
    Cometbft,
    /// Any 2xx answer means healthy and synced.
    Http,
}

impl HealthKind {
    pub fn default_url(self) -> Option<&'static str> {
        match self {
            HealthKind::Near => Some("http://127.0.0.1:3030"),
            HealthKind::Cometbft => Some("http://127.0.0.1:26657"),
            HealthKind::Http => None,
        }
    }
}

/// Signer mode: keyraft signs for the chain's nodes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SignerKind {
    /// CometBFT's privval protocol: keyraft dials each node's
    /// `priv_validator_laddr` and signs votes and proposals.
    Cometbft,
}

/// A named set of timing defaults, one per deployment shape. Each flag of
/// the timing table still overrides its own value, and the safety
/// inequality is checked on the result either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimingProfile {
    /// One datacentre or a LAN (peer round trips under 25 ms): 50 ms
    /// heartbeats, 300..600 ms elections, fenced 300 ms after the last
    /// quorum-acked heartbeat.
    #[default]
    Lan,
    /// Nearby datacentres (peer round trips up to 100 ms): 150 ms
    /// heartbeats, 450..900 ms elections, fenced after 600 ms.
    Wan,
}

/// The defaults a profile sets.
#[derive(Debug, Clone, Copy)]
pub struct ProfileTimes {
    pub heartbeat: u64,
    pub election_min: u64,
    pub election_max: u64,
    pub fence_after: u64,
}

impl TimingProfile {
    /// Each openraft heartbeat must be answered within one heartbeat
    /// interval or it is lost, so the interval bounds the peer round trip a
    /// profile tolerates; the lease (`fence_after`) leaves room for a
    /// heartbeat interval plus a round trip plus a stall of the same size.
    /// `election_max` is 100 ms above `fence_after + kill_bound +
    /// drift_margin` (the safety inequality with no handover delay), for a
    /// kill that takes longer than `kill_bound` (a frozen guard is first
    /// given `kill_bound` to answer).
    pub fn times(self) -> ProfileTimes {
        match self {
            TimingProfile::Lan => ProfileTimes {
                heartbeat: 50,
                election_min: 300,
                election_max: 600,
                fence_after: 300,
            },
            TimingProfile::Wan => ProfileTimes {
                heartbeat: 150,
                election_min: 450,
                election_max: 900,
                fence_after: 600,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags of `keyraft run`. Every field is optional here so that flags,
/// environment and file can be merged; defaults are applied in [`RunArgs::resolve`].
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
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
    /// Admin gRPC address [default: 127.0.0.1:7701].
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

    /// Timing defaults for the deployment's shape: lan (peer round trips
    /// under 25 ms) or wan (nearby datacentres, up to 100 ms) [default: lan].
    #[arg(long, env = "KEYRAFT_TIMING", value_enum)]
    pub timing: Option<TimingProfile>,
    /// Leader heartbeat interval [default: 50ms with --timing lan, 150ms with wan].
    #[arg(long, env = "KEYRAFT_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<Millis>,
    /// Shortest election timeout [default: 300ms lan, 450ms wan].
    #[arg(long, env = "KEYRAFT_ELECTION_TIMEOUT_MIN")]
    pub election_timeout_min: Option<Millis>,
    /// Longest election timeout; also the followers' leader lease [default: 600ms lan, 900ms wan].
    #[arg(long, env = "KEYRAFT_ELECTION_TIMEOUT_MAX")]
    pub election_timeout_max: Option<Millis>,
    /// The validator is killed this long after the last quorum-acked heartbeat was sent [default: 300ms lan, 600ms wan].
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
    /// The validator key file (linked into the home only while validating).
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
    /// could be made (environment marker and subreaper only; see README).
    #[arg(long, env = "KEYRAFT_NO_CGROUP")]
    pub no_cgroup: bool,

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
    /// Signer mode: this signer's SecretConnection identity (32-byte ed25519
    /// seed, base64, as tmkms's `secret_key`); made in the data dir if absent.
    #[arg(long, env = "KEYRAFT_PRIVVAL_IDENTITY_KEY")]
    pub privval_identity_key: Option<PathBuf>,

    /// The validator command and its arguments, after `--`.
    #[arg(last = true, value_name = "VALIDATOR_CMD")]
    pub command: Vec<String>,
}

/// Programs that ask a daemon to start the node: its processes are then
/// children of dockerd, containerd, conmon or systemd, not of keyraft's guard.
const HANDS_OFF: [&str; 5] = ["docker", "podman", "nerdctl", "ctr", "systemd-run"];

/// One symlink managed by keyraft: `dst` points at `src` while it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLink {
    pub src: PathBuf,
    pub dst: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    pub command: Vec<String>,
    /// Links present only while validating.
    pub active_links: Vec<KeyLink>,
    /// Links present only while standing by (NEAR's voter node key).
    pub standby_links: Vec<KeyLink>,
    pub activate_by: ActivateBy,
    pub health: HealthKind,
    pub health_url: String,
    /// Wait for a block height above the previous holder's before signing.
    pub height_watermark: bool,
    /// Give the validator's tree a cgroup where one can be made.
    pub cgroup: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub profile: TimingProfile,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub fence_after: Duration,
    pub kill_bound: Duration,
    pub drift_margin: Duration,
    pub handover_delay: Duration,
    pub unhealthy_grace: Duration,
    pub stop_timeout: Duration,
    pub gossip_interval: Duration,
    pub health_interval: Duration,
}

impl Timing {
    /// The least handover delay for which the old validator is certainly dead
    /// before a successor activates (DESIGN.md, safety protocol step 3).
    ///
    /// A successor needs the vote of a node that acked the old leader's last
    /// quorum-acked heartbeat (sent at `t`); that node refuses votes until
    /// `election_max` after receiving it, so the successor is elected after
    /// `t + election_max` and activates after `t + election_max + handover_delay`.
    /// The old validator is dead by `t + fence_after + kill_bound`, give or
    /// take `drift_margin`.
    pub fn min_handover_delay(
        fence_after: Duration,
        kill_bound: Duration,
        drift: Duration,
        election_max: Duration,
    ) -> Duration {
        (fence_after + kill_bound + drift).saturating_sub(election_max)
    }
}

#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A validated configuration of one coordinator.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub advertise: String,
    /// Every other member's peer address.
    pub peers: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    pub admin_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub tls: Option<TlsPaths>,
    pub witness: bool,
    pub rejoin: bool,
    pub log_format: LogFormat,
    pub timing: Timing,
    pub validator: Option<ValidatorConfig>,
    pub signer: Option<SignerConfig>,
}

/// Where a signer dials a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivvalAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for PrivvalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivvalAddr::Tcp(a) => write!(f, "tcp://{a}"),
            PrivvalAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SignerConfig {
    pub chain_id: String,
    /// CometBFT's `priv_validator_key.json`.
    pub key: PathBuf,
    pub nodes: Vec<PrivvalAddr>,
    pub identity_key: PathBuf,
}

impl Config {
    /// All members' addresses, this node included.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        let mut m = self.peers.clone();
        m.insert(self.id, self.advertise.clone());
        m
    }

    pub fn role(&self) -> &'static str {
        if self.witness {
            "witness"
        } else {
            "validator"
        }
    }
}

impl RunArgs {
    /// Fills unset fields from the TOML file named by `--config`, if any.
    pub fn merge_file(mut self) -> Result<RunArgs, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let file: RunArgs = toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            why: e.message().to_string(),
        })?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            node_id,
            listen,
            advertise,
            data_dir,
            admin_listen,
            http_listen,
            tls_dir,
            log_format,
            timing,
            heartbeat_interval,
            election_timeout_min,
            election_timeout_max,
            fence_after,
            kill_bound,
            drift_margin,
            handover_delay,
            unhealthy_grace,
            stop_timeout,
            chain,
            validator_home,
            validator_key,
            validator_node_key,
            voter_node_key,
            activate_by,
            health,
            health_url,
            signer,
            chain_id,
            privval_identity_key
        );
        for (mine, theirs) in [
            (&mut self.peer, file.peer),
            (&mut self.key_link, file.key_link),
            (&mut self.privval_node, file.privval_node),
            (&mut self.command, file.command),
        ] {
            if mine.is_empty() {
                *mine = theirs;
            }
        }
        self.insecure |= file.insecure;
        self.witness |= file.witness;
        self.rejoin |= file.rejoin;
        Ok(self)
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let a = self.merge_file()?;
        let id = a.node_id.ok_or_else(|| invalid("--node-id is required"))?;
        if id == 0 {
            return Err(invalid("bad --node-id 0: node ids start at 1"));
        }
        let listen = a
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7700)));
        let advertise = match a.advertise.clone() {
            Some(addr) => {
                check_host_port(&addr, "--advertise")?;
                addr
            }
            None if listen.ip().is_unspecified() => {
                return Err(invalid(format!(
                    "--listen {listen} is a wildcard address: set --advertise HOST:PORT, the address peers use for this node"
                )))
            }
            None => listen.to_string(),
        };
        let mut peers = BTreeMap::new();
        for p in &a.peer {
            let (pid, addr) = p
                .split_once('=')
                .ok_or_else(|| invalid(format!("bad --peer '{p}': want ID=HOST:PORT")))?;
            let pid: NodeId = pid
                .trim()
                .parse()
                .map_err(|_| invalid(format!("bad --peer '{p}': '{pid}' is not a node id")))?;
            if pid == 0 {
                return Err(invalid(format!("bad --peer '{p}': node ids start at 1")));
            }
            check_host_port(addr, &format!("--peer {pid}"))?;
            if pid == id {
                return Err(invalid(format!(
                    "--peer '{p}' names this node ({id}); list only the other members"
                )));
            }
            if addr == advertise {
                return Err(invalid(format!(
                    "--peer '{p}' has this node's own address {advertise}"
                )));
            }
            if peers.insert(pid, addr.to_string()).is_some() {
                return Err(invalid(format!("duplicate --peer id {pid}")));
            }
        }
        if peers.is_empty() {
            return Err(invalid(
                "no --peer given: a cluster needs at least two members (three, or two and a witness, to survive one loss)",
            ));
        }
        let data_dir = a
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/keyraft"));
        let tls = if a.insecure {
            None
        } else {
            let dir = a.tls_dir.clone().unwrap_or_else(|| data_dir.join("tls"));
            let paths = TlsPaths {
                ca: dir.join("ca.pem"),
                cert: dir.join("node.pem"),
                key: dir.join("node.key"),
            };
            for f in [&paths.ca, &paths.cert, &paths.key] {
                if !f.is_file() {
                    return Err(invalid(format!(
                        "missing certificate file {} (create them with `keyraft certs`, or run with --insecure)",
                        f.display()
                    )));
                }
            }
            check_private(&paths.key)?;
            Some(paths)
        };
        let timing = resolve_timing(&a)?;
        let signer = resolve_signer(&a, &data_dir)?;
        let validator = if signer.is_some() {
            resolve_plain_node(&a)?
        } else {
            resolve_validator(&a)?
        };
        Ok(Config {
            id,
            listen,
            advertise,
            peers,
            data_dir,
            admin_listen: a
                .admin_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7701))),
            http_listen: a
                .http_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2233))),
            tls,
            witness: a.witness,
            rejoin: a.rejoin,
            log_format: a.log_format.unwrap_or(LogFormat::Text),
            timing,
            validator,
            signer,
        })
    }
}

fn resolve_signer(a: &RunArgs, data_dir: &Path) -> Result<Option<SignerConfig>, ConfigError> {
    let Some(SignerKind::Cometbft) = a.signer else {
        if !a.privval_node.is_empty() || a.chain_id.is_some() {
            return Err(invalid(
                "--privval-node and --chain-id belong to signer mode: add --signer cometbft",
            ));
        }
        return Ok(None);
    };
    if a.witness {
        return Err(invalid(
            "--witness signs nothing: drop --signer (a witness votes for the signers)",
        ));
    }
    if a.chain.is_some() || !a.key_link.is_empty() || a.validator_home.is_some() {
        return Err(invalid(
            "signer mode links no key into any node: drop --chain, --key-link and --validator-home",
        ));
    }
    let chain_id = a
        .chain_id
        .clone()
        .ok_or_else(|| invalid("--signer cometbft needs --chain-id"))?;
    if chain_id.is_empty() || chain_id.len() > 50 {
        return Err(invalid(format!(
            "bad --chain-id '{chain_id}': 1 to 50 characters, as CometBFT allows"
        )));
    }
    let key = a.validator_key.clone().ok_or_else(|| {
        invalid("--signer cometbft needs --validator-key (the validator's priv_validator_key.json)")
    })?;
    if !key.is_file() {
        return Err(invalid(format!(
            "key file {} does not exist",
            key.display()
        )));
    }
    check_private(&key)?;
    if a.privval_node.is_empty() {
        return Err(invalid(
            "--signer cometbft needs at least one --privval-node (tcp://HOST:PORT or unix:///PATH of a node's priv_validator_laddr)",
        ));
    }
    let mut nodes = Vec::new();
    for n in &a.privval_node {
        let addr = if let Some(path) = n.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid(format!(
                    "bad --privval-node '{n}': unix:// needs an absolute path"
                )));
            }
            PrivvalAddr::Unix(PathBuf::from(path))
        } else {
            let hp = n.strip_prefix("tcp://").unwrap_or(n);
            // CometBFT writes tcp://ID@HOST:PORT; the id is not checked (a
            // CometBFT node's privval identity is made afresh at each start).
            let hp = hp.rsplit_once('@').map_or(hp, |(_, h)| h);
            check_host_port(hp, "--privval-node")?;
            PrivvalAddr::Tcp(hp.to_string())
        };
        if nodes.contains(&addr) {
            return Err(invalid(format!("--privval-node {n} is given twice")));
        }
        nodes.push(addr);
    }
    let identity_key = a
        .privval_identity_key
        .clone()
        .unwrap_or_else(|| data_dir.join("privval-identity.key"));
    if identity_key.is_file() {
        check_private(&identity_key)?;
    }
    Ok(Some(SignerConfig {
        chain_id,
        key,
        nodes,
        identity_key,
    }))
}

/// Signer mode's node command: supervised as a plain full node with no key
/// links at all; its health is shown, not acted on.
fn resolve_plain_node(a: &RunArgs) -> Result<Option<ValidatorConfig>, ConfigError> {
    if a.command.is_empty() {
        return Ok(None);
    }
    check_hands_on(&a.command)?;
    let health = a.health.unwrap_or(HealthKind::Cometbft);
    let health_url = match (&a.health_url, health.default_url()) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => return Err(invalid("--health http needs --health-url")),
    };
    Ok(Some(ValidatorConfig {
        command: a.command.clone(),
        active_links: Vec::new(),
        standby_links: Vec::new(),
        activate_by: ActivateBy::Restart,
        health,
        health_url: health_url.trim_end_matches('/').to_string(),
        height_watermark: false,
        cgroup: !a.no_cgroup,
    }))
}

fn resolve_timing(a: &RunArgs) -> Result<Timing, ConfigError> {
    let ms = |v: Option<Millis>, d: u64| v.map(|m| m.0).unwrap_or(Duration::from_millis(d));
    let profile = a.timing.unwrap_or_default();
    let p = profile.times();
    let heartbeat = ms(a.heartbeat_interval, p.heartbeat);
    let election_min = ms(a.election_timeout_min, p.election_min);
    let election_max = ms(a.election_timeout_max, p.election_max);
    let fence_after = ms(a.fence_after, p.fence_after);
    let kill_bound = ms(a.kill_bound, 100);
    let drift_margin = ms(a.drift_margin, 100);
    let need = Timing::min_handover_delay(fence_after, kill_bound, drift_margin, election_max);
    let handover_delay = a.handover_delay.map(|m| m.0).unwrap_or(need);
    let show = |d: Duration| format!("{}ms", d.as_millis());
    if heartbeat.is_zero() {
        return Err(invalid("--heartbeat-interval must be above 0"));
    }
    if election_min >= election_max {
        return Err(invalid(format!(
            "--election-timeout-min ({}) must be below --election-timeout-max ({})",
            show(election_min),
            show(election_max)
        )));
    }
    if heartbeat >= election_min {
        return Err(invalid(format!(
            "--heartbeat-interval ({}) must be below --election-timeout-min ({})",
            show(heartbeat),
            show(election_min)
        )));
    }
    if fence_after < heartbeat * 3 {
        return Err(invalid(format!(
            "--fence-after ({}) must be at least three heartbeats ({}), or the lease lapses between heartbeats",
            show(fence_after),
            show(heartbeat * 3)
        )));
    }
    if handover_delay < need {
        return Err(invalid(format!(
            "timings break the safety inequality: fence_after ({}) + kill_bound ({}) + drift_margin ({}) must be at most election_timeout_max ({}) + handover_delay ({}); raise --handover-delay to {} or more",
            show(fence_after),
            show(kill_bound),
            show(drift_margin),
            show(election_max),
            show(handover_delay),
            show(need)
        )));
    }
    Ok(Timing {
        profile,
        heartbeat,
        election_min,
        election_max,
        fence_after,
        kill_bound,
        drift_margin,
        handover_delay,
        unhealthy_grace: ms(a.unhealthy_grace, 5000),
        stop_timeout: ms(a.stop_timeout, 10_000),
        gossip_interval: Duration::from_millis(500),
        health_interval: Duration::from_millis(500),
    })
}

fn resolve_validator(a: &RunArgs) -> Result<Option<ValidatorConfig>, ConfigError> {
    if a.witness {
        if !a.command.is_empty() || a.validator_key.is_some() || !a.key_link.is_empty() {
            return Err(invalid(
                "--witness runs no validator: drop the validator command and key flags",
            ));
        }
        return Ok(None);
    }
    if a.command.is_empty() {
        return Err(invalid(
            "no validator command: give it after `--` (keyraft run [FLAGS] -- CMD ARGS...), or run with --witness",
        ));
    }
    check_hands_on(&a.command)?;
    let chain = a.chain.unwrap_or(if a.validator_key.is_some() {
        Chain::Near
    } else {
        Chain::Generic
    });
    let mut active = Vec::new();
    let mut standby = Vec::new();
    let home = || {
        a.validator_home
            .clone()
            .ok_or_else(|| invalid("--validator-home is required with --chain near or cometbft"))
    };
    let key = || {
        a.validator_key
            .clone()
            .ok_or_else(|| invalid("--validator-key is required with --chain near or cometbft"))
    };
    match chain {
        Chain::Near => {
            let home = home()?;
            active.push(KeyLink {
                src: key()?,
                dst: home.join("validator_key.json"),
            });
            match (&a.validator_node_key, &a.voter_node_key) {
                (Some(v), Some(s)) => {
                    active.push(KeyLink {
                        src: v.clone(),
                        dst: home.join("node_key.json"),
                    });
                    standby.push(KeyLink {
                        src: s.clone(),
                        dst: home.join("node_key.json"),
                    });
                }
                (None, None) => {}
                _ => {
                    return Err(invalid(
                        "--validator-node-key and --voter-node-key go together (the node key while validating, and this host's own while standing by)",
                    ))
                }
            }
        }
        Chain::Cometbft => active.push(KeyLink {
            src: key()?,
            dst: home()?.join("config").join("priv_validator_key.json"),
        }),
        Chain::Generic => {}
    }
    for l in &a.key_link {
        let (src, dst) = l
            .split_once('=')
            .ok_or_else(|| invalid(format!("bad --key-link '{l}': want SRC=DST")))?;
        active.push(KeyLink {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
        });
    }
    if active.is_empty() {
        return Err(invalid(
            "no key to manage: give --validator-key and --validator-home (near, cometbft) or --key-link SRC=DST",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for l in &active {
        if !seen.insert(&l.dst) {
            return Err(invalid(format!("two key links write {}", l.dst.display())));
        }
    }
    for l in active.iter().chain(&standby) {
        if !l.src.is_file() {
            return Err(invalid(format!(
                "key file {} does not exist",
                l.src.display()
            )));
        }
        check_private(&l.src)?;
        if !l.src.is_absolute() || !l.dst.is_absolute() {
            return Err(invalid(format!(
                "key link paths must be absolute: {} -> {}",
                l.dst.display(),
                l.src.display()
            )));
        }
    }
    let health = a.health.unwrap_or(match chain {
        Chain::Near => HealthKind::Near,
        Chain::Cometbft => HealthKind::Cometbft,
        Chain::Generic => HealthKind::Http,
    });
    let health_url = match (&a.health_url, health.default_url()) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => return Err(invalid("--health http needs --health-url")),
    };
    if !(health_url.starts_with("http://") || health_url.starts_with("https://")) {
        return Err(invalid(format!(
            "bad --health-url '{health_url}': want http://HOST:PORT"
        )));
    }
    if health == HealthKind::Http && !a.no_height_watermark {
        return Err(invalid(
            "--health http reports no block heights, so a new validator cannot wait until the chain is past what the previous one may have signed; pass --no-height-watermark to accept relying on the lease alone",
        ));
    }
    Ok(Some(ValidatorConfig {
        command: a.command.clone(),
        active_links: active,
        standby_links: standby,
        activate_by: a.activate_by.unwrap_or(ActivateBy::Restart),
        health,
        health_url: health_url.trim_end_matches('/').to_string(),
        height_watermark: !a.no_height_watermark,
        cgroup: !a.no_cgroup,
    }))
}

/// Refuses a command that hands the node to a daemon (`docker run`,
/// `systemd-run`, ...), which starts it outside keyraft's process tree.
fn check_hands_on(command: &[String]) -> Result<(), ConfigError> {
    let program = command
        .first()
        .and_then(|c| Path::new(c).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if HANDS_OFF.contains(&program) {
        return Err(invalid(format!(
            "the validator command '{program}' hands the node to a daemon that starts it outside keyraft's process tree, where keyraft cannot find or kill it, so it cannot be fenced; run keyraft where the node runs (inside its container, or on its host) with the node's own command"
        )));
    }
    Ok(())
}

/// `HOST:PORT` with a non-empty host and a numeric port.
fn check_host_port(addr: &str, what: &str) -> Result<(), ConfigError> {
    let bad = || invalid(format!("bad address for {what}: '{addr}' is not HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty()
        || host.contains(char::is_whitespace)
        || port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    Ok(())
}

/// Refuses key files that the group or others can read.
pub fn check_private(path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "key file {} is readable by others (mode {mode:o}): chmod 600 it",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            "600ms".parse::<Millis>().unwrap().0,
            Duration::from_millis(600)
        );
        assert_eq!(
            "1.5s".parse::<Millis>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!(
            "250".parse::<Millis>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("fast".parse::<Millis>().is_err());
        assert!("-1s".parse::<Millis>().is_err());
    }

    #[test]
    fn default_timings_need_no_handover_delay() {
        let d = Duration::from_millis;
        for profile in [TimingProfile::Lan, TimingProfile::Wan] {
            let p = profile.times();
            assert_eq!(
                // With 100 ms to spare.
                Timing::min_handover_delay(
                    d(p.fence_after + 100),
                    d(100),
                    d(100),
                    d(p.election_max)
                ),
                Duration::ZERO,
                "{profile:?}"
            );
            // Three heartbeats fit in the lease, with a round trip to spare.
            assert!(p.fence_after >= p.heartbeat * 3 + 100, "{profile:?}");
        }
        assert_eq!(
            Timing::min_handover_delay(d(600), d(100), d(100), d(1000)),
            Duration::ZERO
        );
        assert_eq!(
            Timing::min_handover_delay(d(900), d(100), d(100), d(1000)),
            d(100)
        );
    }

    fn keys_in(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&p)
                    .unwrap();
                p
            })
            .collect()
    }

    fn validator_args(dir: &Path) -> RunArgs {
        RunArgs {
            node_id: Some(1),
            listen: Some("127.0.0.1:7700".parse().unwrap()),
            peer: vec!["2=127.0.0.1:7702".into()],
            insecure: true,
            validator_home: Some(dir.join("home")),
            command: vec!["node".into()],
            ..Default::default()
        }
    }

    #[test]
    fn signer_mode_needs_its_flags_and_refuses_key_links() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys_in(dir.path(), &["priv_validator_key.json"]);
        let signer = RunArgs {
            signer: Some(SignerKind::Cometbft),
            chain_id: Some("cosmoshub-4".into()),
            validator_key: Some(k[0].clone()),
            privval_node: vec![
                "tcp://abcd@127.0.0.1:26659".into(),
                "unix:///run/pv.sock".into(),
            ],
            validator_home: None,
            data_dir: Some(dir.path().join("data")),
            ..validator_args(dir.path())
        };
        let c = signer.clone().resolve().unwrap();
        let s = c.signer.unwrap();
        assert_eq!(
            s.nodes,
            vec![
                PrivvalAddr::Tcp("127.0.0.1:26659".into()),
                PrivvalAddr::Unix("/run/pv.sock".into())
            ]
        );
        assert_eq!(s.identity_key, dir.path().join("data/privval-identity.key"));
        let node = c.validator.unwrap();
        assert!(
            node.active_links.is_empty() && node.standby_links.is_empty(),
            "no key links"
        );
        let err = |a: RunArgs| a.resolve().unwrap_err().to_string();
        let e = err(RunArgs {
            chain_id: None,
            ..signer.clone()
        });
        assert!(e.contains("--chain-id"), "{e}");
        let e = err(RunArgs {
            privval_node: vec![],
            ..signer.clone()
        });
        assert!(e.contains("--privval-node"), "{e}");
        let e = err(RunArgs {
            privval_node: vec!["unix://rel.sock".into()],
            ..signer.clone()
        });
        assert!(e.contains("absolute"), "{e}");
        let e = err(RunArgs {
            validator_home: Some(dir.path().into()),
            ..signer.clone()
        });
        assert!(e.contains("links no key"), "{e}");
        let e = err(RunArgs {
            witness: true,
            command: vec![],
            ..signer.clone()
        });
        assert!(e.contains("--witness"), "{e}");
        let e = err(RunArgs {
            signer: None,
            validator_home: Some(dir.path().into()),
            ..signer
        });
        assert!(e.contains("--signer cometbft"), "{e}");
    }

    #[test]
    fn chain_presets_link_the_right_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys_in(dir.path(), &["v.json", "vn.json", "voter.json", "extra"]);
        let home = dir.path().join("home");

        let near = RunArgs {
            validator_key: Some(k[0].clone()),
            validator_node_key: Some(k[1].clone()),
            voter_node_key: Some(k[2].clone()),
            ..validator_args(dir.path())
        };
        let v = near.resolve().unwrap().validator.unwrap();
        assert_eq!(v.health, HealthKind::Near);
        assert_eq!(
            v.active_links[0],
            KeyLink {
                src: k[0].clone(),
                dst: home.join("validator_key.json")
            }
        );
        assert_eq!(
            v.active_links[1],
            KeyLink {
                src: k[1].clone(),
                dst: home.join("node_key.json")
            }
        );
        assert_eq!(
            v.standby_links,
            vec![KeyLink {
                src: k[2].clone(),
                dst: home.join("node_key.json")
            }]
        );

        let comet = RunArgs {
            chain: Some(Chain::Cometbft),
            validator_key: Some(k[0].clone()),
            ..validator_args(dir.path())
        };
        let v = comet.resolve().unwrap().validator.unwrap();
        assert_eq!(v.health, HealthKind::Cometbft);
        assert_eq!(v.health_url, "http://127.0.0.1:26657");
        assert_eq!(
            v.active_links,
            vec![KeyLink {
                src: k[0].clone(),
                dst: home.join("config/priv_validator_key.json")
            }]
        );

        let generic = RunArgs {
            key_link: vec![format!("{}=/srv/node/key", k[3].display())],
            health_url: Some("http://127.0.0.1:9/health".into()),
            ..validator_args(dir.path())
        };
        let docker = RunArgs {
            command: vec!["/usr/bin/docker".into(), "run".into(), "near".into()],
            ..generic.clone()
        };
        let err = docker.resolve().unwrap_err().to_string();
        assert!(err.contains("hands the node to a daemon"), "{err}");
        let err = generic.clone().resolve().unwrap_err().to_string();
        assert!(err.contains("--no-height-watermark"), "{err}");
        let generic = RunArgs {
            no_height_watermark: true,
            ..generic
        };
        let v = generic.resolve().unwrap().validator.unwrap();
        assert!(!v.height_watermark);
        assert_eq!(v.health, HealthKind::Http);
        assert_eq!(
            v.active_links,
            vec![KeyLink {
                src: k[3].clone(),
                dst: PathBuf::from("/srv/node/key")
            }]
        );

        let half = RunArgs {
            validator_key: Some(k[0].clone()),
            validator_node_key: Some(k[1].clone()),
            ..validator_args(dir.path())
        };
        assert!(half
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("go together"));
    }

    #[test]
    fn host_port() {
        assert!(check_host_port("node1:7700", "x").is_ok());
        assert!(check_host_port("[::1]:7700", "x").is_ok());
        assert!(check_host_port("node1", "x").is_err());
        assert!(check_host_port(":7700", "x").is_err());
        assert!(check_host_port("a:99999", "x").is_err());
    }
}
