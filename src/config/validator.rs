//! The validator as configured: chain presets (which key files are linked
//! where while validating), extra key links, how a standby becomes the
//! validator, how its health is probed, and its command.
//!
//! Owns: the presets and the checks on the validator's side of the
//! configuration (key file modes, a command keyraft can fence). Must not:
//! create links or start anything; [`crate::fence`] and the coordinator do.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{check_private, invalid, ConfigError, RunArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    /// NEAR: validator_key.json and node_key.json in the neard home.
    Near,
    /// CometBFT: config/priv_validator_key.json in the node home.
    Cometbft,
    /// Only the links given with --key-link.
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActivateBy {
    /// Stop the node, relink, start it again.
    Restart,
    /// Relink and send SIGHUP (for nodes that hot-reload keys).
    Sighup,
}

/// Whether the validator's traffic is held back by a lease in the kernel
/// (docs/design.md, step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelFence {
    /// Where the host allows it (root or CAP_NET_ADMIN, nftables, a cgroup
    /// v2 for the validator, --activate-by restart); said at start when not.
    Auto,
    /// Refuse to start, or to activate, without it.
    Required,
    /// Never.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
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

/// Who switches the node's binary at the chain's upgrade halts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpgradesBy {
    /// Nobody keyraft knows of: upgrades are not followed.
    None,
    /// cosmovisor, as the validator command, with `DAEMON_HOME` and
    /// `DAEMON_NAME` in keyraft's environment.
    Cosmovisor,
}

/// `--upgrades cosmovisor`: where its tree is, and the node's REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradesConfig {
    /// `DAEMON_HOME`.
    pub home: PathBuf,
    /// `DAEMON_NAME`.
    pub name: String,
    pub plan_url: Option<String>,
    /// cosmovisor lower-cases upgrade names for their directories unless
    /// `DAEMON_DISABLE_RECASE` is true.
    pub recase: bool,
}

/// `--upgrades`, with cosmovisor's `DAEMON_HOME` and `DAEMON_NAME` read
/// from `var` (keyraft's environment, which the validator inherits).
fn resolve_upgrades(
    a: &RunArgs,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<UpgradesConfig>, ConfigError> {
    if a.upgrades.unwrap_or(UpgradesBy::None) == UpgradesBy::None {
        return match &a.upgrade_plan_url {
            Some(_) => Err(invalid("--upgrade-plan-url needs --upgrades cosmovisor")),
            None => Ok(None),
        };
    }
    let home = var("DAEMON_HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("--upgrades cosmovisor needs DAEMON_HOME in keyraft's environment (cosmovisor's home, the node's home)"))?;
    if !Path::new(&home).is_absolute() {
        return Err(invalid(format!(
            "DAEMON_HOME must be an absolute path: {home:?}"
        )));
    }
    let name = var("DAEMON_NAME")
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| invalid("--upgrades cosmovisor needs DAEMON_NAME in keyraft's environment (the node binary's file name)"))?;
    let plan_url = match &a.upgrade_plan_url {
        Some(u) if !u.starts_with("http://") && !u.starts_with("https://") => {
            return Err(invalid(format!(
                "--upgrade-plan-url must be an http:// or https:// URL: {u:?}"
            )))
        }
        u => u.as_ref().map(|u| u.trim_end_matches('/').to_string()),
    };
    if a.no_height_watermark || a.health == Some(HealthKind::Http) {
        return Err(invalid(
            "--upgrades cosmovisor needs block heights from the node (--health cometbft or near) and the height watermark: the heights say when a halt begins and ends",
        ));
    }
    Ok(Some(UpgradesConfig {
        home: home.into(),
        name,
        plan_url,
        recase: var("DAEMON_DISABLE_RECASE").is_none_or(|v| v != "true"),
    }))
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
    pub kernel_fence: KernelFence,
    /// The user the validator runs as (`None`: keyraft's own).
    pub user: Option<ValidatorUser>,
    /// `--upgrades cosmovisor`: the chain's upgrades are followed.
    pub upgrades: Option<UpgradesConfig>,
}

/// `--validator-user`, looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatorUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The capabilities of `wanted` (bit, name) this process lacks in its
/// effective set (all of them if it cannot tell).
fn missing_capabilities(wanted: &[(u32, &'static str)]) -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    wanted
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Looks `--validator-user` up in the user database; never root.
fn resolve_user(a: &RunArgs) -> Result<Option<ValidatorUser>, ConfigError> {
    let Some(name) = &a.validator_user else {
        return Ok(None);
    };
    let user = nix::unistd::User::from_name(name)
        .map_err(|e| invalid(format!("--validator-user {name}: cannot look it up: {e}")))?
        .ok_or_else(|| invalid(format!("--validator-user {name}: no such user")))?;
    if user.uid.is_root() {
        return Err(invalid(format!(
            "--validator-user {name} is root: give the validator a user of its own"
        )));
    }
    if user.uid == nix::unistd::geteuid() {
        return Err(invalid(format!(
            "--validator-user {name} is keyraft's own user: give the validator a user of its own (every process of it is killed with the validator)"
        )));
    }
    // Starting it as that user, and killing every process of it.
    let missing = missing_capabilities(&[(5, "CAP_KILL"), (6, "CAP_SETGID"), (7, "CAP_SETUID")]);
    if !missing.is_empty() {
        return Err(invalid(format!(
            "--validator-user needs keyraft to run as root, or with {}",
            missing.join(", ")
        )));
    }
    Ok(Some(ValidatorUser {
        name: name.clone(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// Signer mode's node command: supervised as a plain full node with no key
/// links at all; its health is shown, not acted on, and so is the chain's
/// next upgrade with `--upgrades cosmovisor` (a host without its binary is
/// named before the height; nothing is held or handed over at the halt).
pub(super) fn resolve_plain_node(a: &RunArgs) -> Result<Option<ValidatorConfig>, ConfigError> {
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
        // Signer mode links no key: there is nothing to hold back.
        kernel_fence: KernelFence::Off,
        user: resolve_user(a)?,
        upgrades: resolve_upgrades(a, |k| std::env::var(k).ok())?,
    }))
}

pub(super) fn resolve_validator(a: &RunArgs) -> Result<Option<ValidatorConfig>, ConfigError> {
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
    let (active, standby) = key_links(a, chain)?;
    let (health, health_url) = health_check(a, chain)?;
    let activate_by = a.activate_by.unwrap_or(ActivateBy::Restart);
    let kernel_fence = a.kernel_fence.unwrap_or(KernelFence::Auto);
    if kernel_fence == KernelFence::Required && activate_by == ActivateBy::Sighup {
        return Err(invalid(
            "--kernel-fence required needs --activate-by restart: a node that reloads its key on SIGHUP keeps the connections it made without the key, which the kernel fence cannot tell apart",
        ));
    }
    let user = resolve_user(a)?;
    if kernel_fence == KernelFence::Required && a.no_cgroup && user.is_none() {
        return Err(invalid(
            "--kernel-fence required needs the validator's cgroup or --validator-user: drop --no-cgroup, or name the validator's user",
        ));
    }
    Ok(Some(ValidatorConfig {
        command: a.command.clone(),
        active_links: active,
        standby_links: standby,
        activate_by,
        health,
        health_url: health_url.trim_end_matches('/').to_string(),
        height_watermark: !a.no_height_watermark,
        cgroup: !a.no_cgroup,
        kernel_fence,
        user,
        upgrades: resolve_upgrades(a, |k| std::env::var(k).ok())?,
    }))
}

/// The key links: to link while validating, and (NEAR's node key) to
/// link while standing by; each source a private, existing file, each
/// path absolute, no destination written twice.
fn key_links(a: &RunArgs, chain: Chain) -> Result<(Vec<KeyLink>, Vec<KeyLink>), ConfigError> {
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
    Ok((active, standby))
}

/// How the node's health is probed, and where: the chain's default, or
/// `--health`/`--health-url`. A probe without heights needs
/// `--no-height-watermark`.
fn health_check(a: &RunArgs, chain: Chain) -> Result<(HealthKind, String), ConfigError> {
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
    Ok((health, health_url))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{keys_in, validator_args};

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

    fn with_env(
        a: &RunArgs,
        pairs: &[(&str, &str)],
    ) -> Result<Option<UpgradesConfig>, ConfigError> {
        resolve_upgrades(a, |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn upgrades_by_cosmovisor_need_its_home_and_name() {
        let args = |by: Option<UpgradesBy>, url: Option<&str>| RunArgs {
            upgrades: by,
            upgrade_plan_url: url.map(String::from),
            ..RunArgs::default()
        };
        let full = [("DAEMON_HOME", "/var/lib/simd"), ("DAEMON_NAME", "simd")];
        let cv = Some(UpgradesBy::Cosmovisor);
        assert_eq!(with_env(&args(None, None), &full).unwrap(), None);
        let got = with_env(&args(cv, Some("http://127.0.0.1:1317/")), &full)
            .unwrap()
            .unwrap();
        assert_eq!(got.home, PathBuf::from("/var/lib/simd"));
        assert_eq!(got.name, "simd");
        assert_eq!(got.plan_url.as_deref(), Some("http://127.0.0.1:1317"));
        assert!(got.recase);
        let kept = [
            ("DAEMON_HOME", "/h"),
            ("DAEMON_NAME", "simd"),
            ("DAEMON_DISABLE_RECASE", "true"),
        ];
        assert!(!with_env(&args(cv, None), &kept).unwrap().unwrap().recase);
        let relative = [("DAEMON_HOME", "rel"), ("DAEMON_NAME", "simd")];
        type Env<'a> = &'a [(&'a str, &'a str)];
        let no_heights = RunArgs {
            health: Some(HealthKind::Http),
            ..args(cv, None)
        };
        let no_watermark = RunArgs {
            no_height_watermark: true,
            ..args(cv, None)
        };
        let refused: [(RunArgs, Env, &str); 7] = [
            (no_heights, &full, "block heights"),
            (no_watermark, &full, "block heights"),
            (args(None, Some("http://x")), &full, "needs --upgrades"),
            (args(cv, None), &full[1..], "DAEMON_HOME"),
            (args(cv, None), &relative, "absolute"),
            (args(cv, None), &full[..1], "DAEMON_NAME"),
            (args(cv, Some("127.0.0.1:1317")), &full, "http://"),
        ];
        for (a, env, says) in refused {
            let e = with_env(&a, env).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
