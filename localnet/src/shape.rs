//! How a localnet node is started: the shapes of its validator command,
//! the chain mode, a fence agent, the flags and options of one node.
//!
//! Owns: the options a test or the launcher picks per node, and a node's
//! cosmovisor tree on an upgrading chain. Must not: start anything;
//! [`crate::cluster`] turns them into command lines.

use std::path::Path;

use crate::harness::sibling_bin;
use crate::upgrade::{Upgrade, GENESIS};

/// How the validator command starts the node: the shapes real deployments
/// have (`cosmovisor run`, `sh -c`, scripts that daemonize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Launch {
    /// The node exec'd directly.
    #[default]
    Exec,
    /// `sh -c 'node ...; true'`: the node is the shell's child.
    ShellChild,
    /// A wrapper whose subshell runs the node: a grandchild.
    Grandchild,
    /// A wrapper that daemonizes the node (fork, `setsid`, parent exits:
    /// the node leaves the wrapper's process group and session) and then
    /// stays in the foreground.
    Daemonize,
    /// A node that keeps running (and signing) for an hour after SIGTERM.
    IgnoresTerm,
    /// A grandchild that drops keyraft's marker from its environment (as
    /// `sudo`, `env -i` or `su -` would).
    ClearsMarker,
}

impl Launch {
    pub const ALL: [Launch; 5] = [
        Launch::Exec,
        Launch::ShellChild,
        Launch::Grandchild,
        Launch::Daemonize,
        Launch::IgnoresTerm,
    ];

    /// The argv before the node's own command.
    pub fn prefix(self) -> Vec<String> {
        let sh = |script: &str| vec!["sh".into(), "-c".into(), script.into(), "sh".into()];
        match self {
            Launch::Exec | Launch::IgnoresTerm => vec![],
            Launch::ShellChild => sh(r#""$@"; true"#),
            Launch::Grandchild => sh(r#"( "$@"; true ); true"#),
            Launch::Daemonize => sh(r#"setsid sh -c '"$@" &' daemon "$@"; exec sleep 1000000"#),
            Launch::ClearsMarker => sh(r#"( env -u KEYRAFT_FENCE "$@"; true ); true"#),
        }
    }

    /// Extra `fakenode` flags for the shape.
    pub fn fakenode(self) -> Vec<String> {
        match self {
            Launch::IgnoresTerm => vec!["--shutdown-delay-ms".into(), "3600000".into()],
            _ => vec![],
        }
    }
}

/// What the cluster validates for.
#[derive(Clone, Debug)]
pub enum Mode {
    /// NEAR-style: the active node's fakenode holds the key.
    Near,
    /// NEAR-style, on a chain that halts for `0` (`fakechain --upgrade`)
    /// until a node of its version signs that height.
    NearUpgrade(crate::upgrade::Upgrade),
    /// CometBFT signer mode: every keyraft signs for its sentry (a
    /// `fakenode --cometbft` it supervises) after committing through Raft.
    Signer {
        chain_id: String,
        /// Every Nth height commits in round 1 (see `fakechain --round-every`).
        round_every: u64,
        /// Our key proposes one round in this many.
        validators: u64,
        /// Further chains the cluster signs for, each with its own
        /// `fakechain` judge, key and one sentry per validator host; their
        /// ids are `{chain_id}-2`, `{chain_id}-3`, ... (0: one chain, set
        /// with flags; more: every chain in `[[chains]]` of a TOML file).
        more_chains: u64,
        /// The first chain halts for this upgrade once its height is
        /// committed, until the network upgraded
        /// ([`NETWORK_UPGRADE_MS`]).
        halt: Option<Upgrade>,
    },
}

impl Mode {
    /// Signer mode for one chain `chain_id`, as most tests run it: round 1
    /// commits every 4th height, our key proposes one round in 2, no halt.
    pub fn signer(chain_id: &str) -> Mode {
        Mode::Signer {
            chain_id: chain_id.into(),
            round_every: 4,
            validators: 2,
            more_chains: 0,
            halt: None,
        }
    }
}

/// How one node is started.
#[derive(Clone, Default)]
pub struct NodeOpts {
    pub witness: bool,
    /// Extra `keyraft run` flags.
    pub flags: Vec<String>,
    /// Extra `fakenode` flags.
    pub fakenode: Vec<String>,
    /// How the validator command wraps the node.
    pub launch: Launch,
    /// Signer mode: more sentries on this host beside the one keyraft
    /// supervises; keyraft dials them all.
    pub extra_sentries: u64,
    /// A `--health-url` other than the fakenode's RPC (to misconfigure it).
    pub health_url: Option<String>,
    /// A fence agent for every other validator host.
    pub fencing: Fencing,
    /// `--validator-user`: its home and the key are handed to that user.
    pub validator_user: Option<String>,
    /// Extra environment of `keyraft run`.
    pub env: Vec<(String, String)>,
    /// Signer mode: the node id pinned in `--privval-node tcp://ID@…` for
    /// the supervised sentry.
    pub privval_pin: Option<String>,
    /// Signer mode with several chains: this host's key for the second
    /// chain is another one than the cluster's (a misconfigured host).
    pub other_key: bool,
    /// Signer mode: where this host's key is (a file, or a SoftHSM2 token
    /// of its own).
    pub key_in: crate::token::KeyIn,
    /// Signer mode with several chains: the chains beyond the first get no
    /// `node-rpc`, so that no node vouches for their heights.
    pub no_node_rpc: bool,
    /// Dial the other nodes directly, not through the fault proxies (which
    /// cost a hop through localnet's own process): for benchmarks that
    /// cut no link and measure keyraft alone.
    pub direct_peers: bool,
    /// Signer mode: this host runs in validator mode instead (it would
    /// link the key into its node: a misconfigured member).
    pub validator_mode: bool,
    /// Validator mode on an upgrading chain: the node runs under
    /// `fakecosmovisor`, with this tree (`None`: the node alone).
    pub cosmovisor: Option<Cosmovisor>,
    /// Under cosmovisor: keyraft follows the chain's upgrades
    /// (`--upgrades cosmovisor`, the plan from the fakenode's RPC).
    pub follow_upgrades: bool,
}

/// A host's cosmovisor tree for the chain's upgrade
/// ([`Mode::NearUpgrade`]): `genesis/bin/fakenode` always, the upgrade's
/// binary when prepared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cosmovisor {
    /// `cosmovisor/upgrades/NAME/bin/fakenode` is installed.
    pub prepared: bool,
    /// The upgraded version's migration the first time it runs.
    pub migration_ms: u64,
    /// The upgraded binary exits at once with an error, every time.
    pub crashes: bool,
}

/// Signer mode: `keyraft run`'s flags for sentries speaking CometBFT 1.x's
/// privval (`v1`), or none (0.38, keyraft's default).
pub fn protocol_flags(v1: bool) -> Vec<String> {
    if v1 {
        vec!["--protocol-version".into(), "v1".into()]
    } else {
        Vec::new()
    }
}

/// The supervised sentry's flags for the same.
pub fn sentry_protocol(v1: bool) -> Vec<String> {
    if v1 {
        vec!["--protocol".into(), "v1".into()]
    } else {
        Vec::new()
    }
}

/// `keyraft run` flags for a 3-second lease (elections after 3.4-3.8 s):
/// long enough that a takeover inside it is plain to the chain.
pub const LONG_LEASE: [&str; 6] = [
    "--fence-after",
    "3000ms",
    "--election-timeout-min",
    "3400ms",
    "--election-timeout-max",
    "3800ms",
];

/// Which fence agent a node has for the other validator hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fencing {
    #[default]
    None,
    /// `fakefence`: powers a localnet host off (kills its processes).
    Fakefence,
    /// `fakefence` with `hang=1`: never answers.
    Hanging,
    /// `/bin/false`: fails every action.
    Failing,
}

/// At an upgrade's halt, how long the rest of the chain's validators take
/// to upgrade (`fakechain --network-upgrade-ms`): past it the chain makes
/// blocks without this validator, as a chain where it holds less than a
/// third of the stake does.
pub const NETWORK_UPGRADE_MS: u64 = 15_000;

/// `fakechain`'s flags for a chain that halts at `u`, whose other
/// validators upgrade in [`NETWORK_UPGRADE_MS`].
pub fn upgrade_chain_args(u: &Upgrade) -> Vec<String> {
    vec![
        "--upgrade".into(),
        u.to_string(),
        "--network-upgrade-ms".into(),
        NETWORK_UPGRADE_MS.to_string(),
    ]
}

/// `keyraft run`'s flags for a node under cosmovisor that follows its
/// upgrades (the plan from the fakenode's RPC at `rpc`); none otherwise.
pub fn follow_flags(opts: &NodeOpts, rpc: std::net::SocketAddr) -> Vec<String> {
    if opts.cosmovisor.is_none() || !opts.follow_upgrades {
        return Vec::new();
    }
    ["--upgrades", "cosmovisor", "--upgrade-plan-url"]
        .map(String::from)
        .into_iter()
        .chain([format!("http://{rpc}")])
        .collect()
}

/// The binary's name in the tree (cosmovisor's `DAEMON_NAME`).
pub const DAEMON_NAME: &str = "fakenode";

/// Writes `dir/bin/fakenode`, a shell script running `body`.
fn wrapper(dir: &Path, body: String) -> anyhow::Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let path = bin.join(DAEMON_NAME);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Lays out `home/cosmovisor` for `upgrade` as `c` says.
pub fn lay_out(home: &Path, upgrade: &Upgrade, c: Cosmovisor) -> anyhow::Result<()> {
    let fakenode = sibling_bin("fakenode")?;
    let root = home.join("cosmovisor");
    let exe = fakenode.display();
    wrapper(
        &root.join(GENESIS),
        format!("exec {exe} --chain-version {GENESIS} \"$@\""),
    )?;
    if c.prepared {
        let body = if c.crashes {
            "echo 'panic: the upgraded binary cannot start' >&2; exit 2".to_string()
        } else {
            format!(
                "exec {exe} --chain-version {} --migration-ms {} \"$@\"",
                upgrade.name, c.migration_ms
            )
        };
        // cosmovisor's directory for it: the name in lower case.
        let dir = upgrade.name.to_lowercase();
        wrapper(&root.join("upgrades").join(dir), body)?;
    }
    Ok(())
}

/// Lays out a host's cosmovisor tree in `home` where its node runs under
/// one (`c`): a validator's for [`Mode::NearUpgrade`], a sentry's in
/// signer mode.
pub fn lay_out_for(mode: &Mode, home: &Path, c: Option<Cosmovisor>) -> anyhow::Result<()> {
    match (mode, c) {
        (Mode::NearUpgrade(u), Some(c)) => lay_out(home, u, c),
        (Mode::Signer { .. }, Some(c)) => lay_out_sentry(home, c.prepared),
        _ => Ok(()),
    }
}

/// Signer mode: how a host's sentry starts: its environment, then its
/// program and first arguments: `fakecosmovisor run --home HOME` over the
/// tree in `home` where `opts` says so, else `fakenode`.
pub fn sentry_command(opts: &NodeOpts, home: &Path) -> (Vec<(String, String)>, Vec<String>) {
    let bin = |name| sibling_bin(name).unwrap_or_default().display().to_string();
    match opts.cosmovisor {
        Some(_) => (
            cosmovisor_env(home),
            vec![
                bin("fakecosmovisor"),
                "run".into(),
                "--home".into(),
                home.display().to_string(),
            ],
        ),
        None => (Vec::new(), vec![bin("fakenode")]),
    }
}

/// Signer mode: lays out a sentry's `home/cosmovisor` for the upgrade to
/// CometBFT 1.x (`fakenode --cometbft --v1-after`), whose binary is the
/// same fakenode (its home's marker makes it speak 1.x): `genesis` always,
/// `upgrades/v1` when `prepared`.
pub fn lay_out_sentry(home: &Path, prepared: bool) -> anyhow::Result<()> {
    let fakenode = sibling_bin("fakenode")?;
    let root = home.join("cosmovisor");
    let mut dirs = vec![root.join(GENESIS)];
    if prepared {
        dirs.push(root.join("upgrades").join("v1"));
    }
    for dir in dirs {
        wrapper(&dir, format!("exec {} \"$@\"", fakenode.display()))?;
    }
    Ok(())
}

/// cosmovisor's environment for the host whose node lives in `home`.
pub fn cosmovisor_env(home: &Path) -> Vec<(String, String)> {
    [
        ("DAEMON_HOME", home.display().to_string()),
        ("DAEMON_NAME", DAEMON_NAME.to_string()),
        ("DAEMON_POLL_INTERVAL", "100ms".to_string()),
        ("DAEMON_RESTART_AFTER_UPGRADE", "true".to_string()),
        ("UNSAFE_SKIP_BACKUP", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
