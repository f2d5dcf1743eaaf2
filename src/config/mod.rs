//! Configuration of `keyraft run`: flags, `KEYRAFT_*` environment variables
//! and an optional TOML file, merged in that order of precedence, then
//! validated into a [`Config`].
//!
//! The rooms, by topic: [`args`] (the flags of `keyraft run`, which are
//! also the TOML keys, and the file merge), [`timing`] (the timing table,
//! its profiles and the safety inequality), [`validator`] (chain presets,
//! key links, the validator command), [`fencing`] (fence agents per
//! member), [`signer`] (signer mode) and `reload` (what a reload may
//! change); this
//! module resolves them into one [`Config`].
//!
//! Owns: every default of the timing table (docs/design.md), the chain presets (which
//! key files are linked where), and the checks that must pass before anything
//! starts (ids, addresses, certificates, key file modes, the safety
//! inequality). Must not: touch the network or start processes; a bad value
//! is one [`ConfigError`] line and exit code 2.

mod args;
mod fencing;
mod reload;
mod signer;
pub mod timing;
mod token;
mod validator;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use crate::ledger::NodeId;
pub use args::{reference, ChainArgs, LogFormat, RunArgs};
use fencing::resolve_fence_agents;
pub use fencing::{FenceAgent, FenceAgents};
pub use reload::Reload;
use signer::resolve_signer;
pub use signer::{
    ChainConfig, KeySource, PrivvalAddr, Protocol, ProtocolVersion, SignerConfig, SignerKind,
};
use timing::resolve_timing;
pub use timing::{Live, Millis, ProfileTimes, Timing, TimingProfile};
pub use token::{PinSource, TokenUri};
use validator::{resolve_plain_node, resolve_validator};
pub use validator::{
    ActivateBy, Chain, HealthKind, KernelFence, KeyLink, UpgradesBy, UpgradesConfig,
    ValidatorConfig, ValidatorUser,
};

/// A configuration problem, printed as one line before exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config file {path}: {why}")]
    File { path: String, why: String },
}

pub(crate) fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where `keyraft run` serves its admin API when no flag says otherwise,
/// and where the CLI looks for it.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/keyraft/admin.sock";

/// Where operators reach the coordinator.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The Unix socket (mode 0660).
    pub socket: PathBuf,
    /// The socket's group (`None`: keyraft's own).
    pub group: Option<u32>,
    /// The admin TCP port, mTLS with admin certificates only.
    pub listen: Option<SocketAddr>,
}

/// The admin socket a run configuration file names, if it can be read
/// (the CLI's way to find the coordinator of this host).
pub fn admin_socket_of(file: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(file).ok()?;
    toml::from_str::<RunArgs>(&text).ok()?.admin_socket
}

/// The admin settings of `a`, checked.
fn resolve_admin(a: &RunArgs) -> Result<AdminConfig, ConfigError> {
    let socket = a
        .admin_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    // sun_path holds 108 bytes with its terminating NUL.
    if !socket.is_absolute() || socket.as_os_str().len() > 107 {
        return Err(invalid(format!(
            "bad --admin-socket {}: an absolute path of at most 107 bytes",
            socket.display()
        )));
    }
    let group = match &a.admin_group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| invalid(format!("--admin-group {g}: no such group on this host")))?
                .gid
                .as_raw(),
        }),
    };
    if a.admin_listen.is_some() && a.insecure {
        return Err(invalid(
            "--admin-listen needs TLS (its clients are known by their admin certificates): drop --insecure, or use the admin socket",
        ));
    }
    Ok(AdminConfig {
        socket,
        group,
        listen: a.admin_listen,
    })
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
    pub admin: AdminConfig,
    pub http_listen: SocketAddr,
    pub tls: Option<TlsPaths>,
    pub witness: bool,
    pub rejoin: bool,
    pub log_format: LogFormat,
    pub timing: Timing,
    pub validator: Option<ValidatorConfig>,
    pub signer: Option<SignerConfig>,
    /// Fence agents for the other members (none configured: none run).
    pub fence: FenceAgents,
}

impl Config {
    /// All members' addresses, this node included.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        let mut m = self.peers.clone();
        m.insert(self.id, self.advertise.clone());
        m
    }

    /// The mode this node runs in, as it registers it in the ledger.
    pub fn mode(&self) -> crate::ledger::Mode {
        use crate::ledger::Mode;
        if self.witness {
            Mode::Witness
        } else if self.signer.is_some() {
            Mode::Signer
        } else {
            Mode::Validator
        }
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
    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        self.merge_file()?.resolve_merged()
    }

    /// [`RunArgs::resolve`] of settings already merged with their file.
    fn resolve_merged(self) -> Result<Config, ConfigError> {
        let a = self;
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
        let fence = resolve_fence_agents(&a, id, &peers)?;
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
            admin: resolve_admin(&a)?,
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
            fence,
        })
    }
}
/// `HOST:PORT` with a non-empty host and a numeric port.
pub(super) fn check_host_port(addr: &str, what: &str) -> Result<(), ConfigError> {
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
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};

    use super::RunArgs;

    pub fn keys_in(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
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

    pub fn validator_args(dir: &Path) -> RunArgs {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert!(check_host_port("node1:7700", "x").is_ok());
        assert!(check_host_port("[::1]:7700", "x").is_ok());
        assert!(check_host_port("node1", "x").is_err());
        assert!(check_host_port(":7700", "x").is_err());
        assert!(check_host_port("a:99999", "x").is_err());
    }
}
