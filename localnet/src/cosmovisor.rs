//! `fakecosmovisor`: an imitation of cosmovisor, the process wrapper most
//! Cosmos operators run their node under, close enough that keyraft meets
//! at an upgrade what it meets on a real host (cosmovisor is a Go program
//! in no registry this project installs from).
//!
//! The tree under `DAEMON_HOME`: `cosmovisor/genesis/bin/NAME`,
//! `cosmovisor/upgrades/<upgrade>/bin/NAME`, and `cosmovisor/current`, a
//! link to the one in use. `run ARGS` starts `current/bin/NAME ARGS` as a
//! child and polls `data/upgrade-info.json`; when it names an upgrade
//! other than the one applied, the node is killed (SIGKILL, or SIGINT and
//! `DAEMON_SHUTDOWN_GRACE` first), `DAEMON_RESTART_DELAY` waited, `data/`
//! backed up unless `UNSAFE_SKIP_BACKUP`, `current` switched (the upgrade's
//! binary must be there: downloads are off), the plan written beside the
//! binary, `pre-upgrade` run (exit 0 done, 1 not implemented, 30 failed, 31
//! retried up to `DAEMON_PREUPGRADE_MAX_RETRIES`), and the node started
//! again if `DAEMON_RESTART_AFTER_UPGRADE`. A node that exits without an
//! upgrade ends cosmovisor: code 0 if it exited 0, else 1. SIGTERM and
//! SIGQUIT are passed to the node.
//!
//! Owns: the configuration from the environment, the tree's paths, and
//! the upgrade's steps in order. Must not: know keyraft or the chain.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::upgrade::{UpgradeInfo, GENESIS, INFO_FILE};

/// cosmovisor's `DAEMON_*` configuration (the ones this imitation keeps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub home: PathBuf,
    pub name: String,
    pub poll: Duration,
    pub restart_after_upgrade: bool,
    pub restart_delay: Duration,
    pub shutdown_grace: Duration,
    pub skip_backup: bool,
    pub backup_dir: PathBuf,
    pub preupgrade_max_retries: u32,
    /// Upgrade directories are named in lower case, unless
    /// `DAEMON_DISABLE_RECASE`.
    pub recase: bool,
}

/// A `DAEMON_*` setting that is missing or not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEnv {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{0} must be an absolute path: {1:?}")]
    NotAbsolute(&'static str, String),
    #[error("{0} must be true or false: {1:?}")]
    NotBool(&'static str, String),
    #[error("{0} must be a duration like 300ms or 2s: {1:?}")]
    NotDuration(&'static str, String),
    #[error("{0} must be a whole number: {1:?}")]
    NotNumber(&'static str, String),
}

impl Config {
    /// Reads the configuration through `var` (the environment, in the
    /// binary), with cosmovisor's defaults.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config, BadEnv> {
        let home = var("DAEMON_HOME").ok_or(BadEnv::Missing("DAEMON_HOME"))?;
        if !Path::new(&home).is_absolute() {
            return Err(BadEnv::NotAbsolute("DAEMON_HOME", home));
        }
        let name = var("DAEMON_NAME").ok_or(BadEnv::Missing("DAEMON_NAME"))?;
        let flag = |key: &'static str, default: bool| match var(key) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(BadEnv::NotBool(key, v)),
            },
        };
        let duration = |key: &'static str, default: Duration| match var(key) {
            None => Ok(default),
            Some(v) => parse_duration(&v).ok_or(BadEnv::NotDuration(key, v)),
        };
        let backup_dir = match var("DAEMON_DATA_BACKUP_DIR") {
            None => PathBuf::from(&home),
            Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
            Some(d) => return Err(BadEnv::NotAbsolute("DAEMON_DATA_BACKUP_DIR", d)),
        };
        let retries = match var("DAEMON_PREUPGRADE_MAX_RETRIES") {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| BadEnv::NotNumber("DAEMON_PREUPGRADE_MAX_RETRIES", v))?,
        };
        Ok(Config {
            home: PathBuf::from(home),
            name,
            poll: duration("DAEMON_POLL_INTERVAL", Duration::from_millis(300))?,
            restart_after_upgrade: flag("DAEMON_RESTART_AFTER_UPGRADE", true)?,
            restart_delay: duration("DAEMON_RESTART_DELAY", Duration::ZERO)?,
            shutdown_grace: duration("DAEMON_SHUTDOWN_GRACE", Duration::ZERO)?,
            skip_backup: flag("UNSAFE_SKIP_BACKUP", false)?,
            backup_dir,
            preupgrade_max_retries: retries,
            recase: !flag("DAEMON_DISABLE_RECASE", false)?,
        })
    }

    /// Where upgrade `name`'s binary goes.
    fn upgrade_dir(&self, name: &str) -> PathBuf {
        let dir = if self.recase {
            name.to_lowercase()
        } else {
            name.to_string()
        };
        self.root().join("upgrades").join(dir)
    }

    fn root(&self) -> PathBuf {
        self.home.join("cosmovisor")
    }

    /// `cosmovisor/current`, made a link to `genesis` if it is not a link.
    fn current(&self) -> std::io::Result<PathBuf> {
        let current = self.root().join("current");
        if std::fs::read_link(&current).is_err() {
            let _ = std::fs::remove_file(&current);
            std::os::unix::fs::symlink(self.root().join(GENESIS), &current)?;
        }
        Ok(current)
    }

    /// The binary `current` points to.
    fn current_bin(&self) -> std::io::Result<PathBuf> {
        Ok(self.current()?.join("bin").join(&self.name))
    }

    /// The upgrade applied last (written beside its binary), if any.
    fn applied(&self) -> Option<UpgradeInfo> {
        let text = std::fs::read(self.root().join("current").join("upgrade-info.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The upgrade `data/upgrade-info.json` asks for, if it is not the
    /// one applied.
    fn pending(&self) -> Option<UpgradeInfo> {
        let text = std::fs::read(self.home.join(INFO_FILE)).ok()?;
        let info: UpgradeInfo = serde_json::from_slice(&text).ok()?;
        let done = self
            .applied()
            .is_some_and(|a| a.name.eq_ignore_ascii_case(&info.name));
        (!done).then_some(info)
    }
}

/// `300ms`, `2s`, `1m` or `1.5s`: Go's durations, as far as cosmovisor's
/// settings use them.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, scale) = [("ms", 0.001), ("s", 1.0), ("m", 60.0)]
        .into_iter()
        .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, scale)))?;
    let v: f64 = num.parse().ok()?;
    (v >= 0.0).then(|| Duration::from_secs_f64(v * scale))
}

/// Why an upgrade could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("binary not present, downloading disabled: {0}")]
    NoBinary(String),
    #[error("cannot back up {from} to {to}: {source}")]
    Backup {
        from: String,
        to: String,
        source: std::io::Error,
    },
    #[error("cannot switch cosmovisor/current to {to}: {source}")]
    Switch { to: String, source: std::io::Error },
    #[error("pre-upgrade command failed: {0}")]
    PreUpgrade(String),
}

/// The upgrade's steps after the node is gone, in cosmovisor's order.
async fn apply(cfg: &Config, info: &UpgradeInfo) -> Result<(), UpgradeError> {
    tokio::time::sleep(cfg.restart_delay).await;
    if !cfg.skip_backup {
        let to = cfg.backup_dir.join(format!("data-backup-{}", today()));
        let from = cfg.home.join("data");
        copy_dir(&from, &to).map_err(|source| UpgradeError::Backup {
            from: from.display().to_string(),
            to: to.display().to_string(),
            source,
        })?;
    }
    let dir = cfg.upgrade_dir(&info.name);
    let bin = dir.join("bin").join(&cfg.name);
    if !bin.is_file() {
        return Err(UpgradeError::NoBinary(bin.display().to_string()));
    }
    let switch = |source| UpgradeError::Switch {
        to: dir.display().to_string(),
        source,
    };
    let tmp = cfg.root().join("current.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&dir, &tmp).map_err(switch)?;
    std::fs::rename(&tmp, cfg.root().join("current")).map_err(switch)?;
    let plan = serde_json::to_vec(info).unwrap_or_default();
    std::fs::write(dir.join("upgrade-info.json"), plan).map_err(switch)?;
    pre_upgrade(cfg, &bin).await
}

/// `<new binary> pre-upgrade`: 0 done, 1 not implemented, 30 failed, 31
/// again (up to the retries allowed); anything else counts as done.
async fn pre_upgrade(cfg: &Config, bin: &Path) -> Result<(), UpgradeError> {
    let mut tries = 0;
    loop {
        let code = Command::new(bin)
            .arg("pre-upgrade")
            .status()
            .await
            .map_err(|e| UpgradeError::PreUpgrade(e.to_string()))?
            .code();
        match code {
            Some(30) => return Err(UpgradeError::PreUpgrade("exit code 30".into())),
            Some(31) if tries >= cfg.preupgrade_max_retries => {
                return Err(UpgradeError::PreUpgrade(format!(
                    "reached max attempt of retries - {tries}"
                )))
            }
            Some(31) => tries += 1,
            _ => return Ok(()),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Today as cosmovisor names a backup: `Y-M-D`, not zero-padded (UTC).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year}-{month}-{day}")
}

/// How one run of the node ended.
enum Ended {
    /// It exited (or was stopped by a signal passed on).
    Exited(ExitStatus),
    /// An upgrade is due: the node was killed for it.
    Upgrade(UpgradeInfo),
}

/// Runs the node once, until it exits or an upgrade is due.
async fn run_once(cfg: &Config, args: &[String]) -> anyhow::Result<Ended> {
    let bin = cfg.current_bin()?;
    let mut child = Command::new(&bin).args(args).kill_on_drop(true).spawn()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut poll = tokio::time::interval(cfg.poll);
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok(match (status.success(), cfg.pending()) {
                    (false, Some(info)) => Ended::Upgrade(info),
                    _ => Ended::Exited(status),
                });
            }
            _ = poll.tick() => {
                if let Some(info) = cfg.pending() {
                    stop_for_upgrade(cfg, &mut child).await;
                    return Ok(Ended::Upgrade(info));
                }
            }
            _ = term.recv() => pass(&child, Signal::SIGTERM),
            _ = quit.recv() => pass(&child, Signal::SIGQUIT),
        }
    }
}

fn pass(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// SIGKILL, or SIGINT and the grace first.
async fn stop_for_upgrade(cfg: &Config, child: &mut Child) {
    if !cfg.shutdown_grace.is_zero() {
        pass(child, Signal::SIGINT);
        if tokio::time::timeout(cfg.shutdown_grace, child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// `fakecosmovisor run ARGS`: the node under cosmovisor until it exits
/// without an upgrade (its code: 0, or 1) or an upgrade fails (1).
pub async fn run(cfg: Config, args: Vec<String>) -> anyhow::Result<i32> {
    loop {
        match run_once(&cfg, &args).await? {
            Ended::Exited(status) => return Ok(if status.success() { 0 } else { 1 }),
            Ended::Upgrade(info) => {
                tracing::info!(upgrade = %info.name, height = info.height, "upgrade detected, applying");
                apply(&cfg, &info).await?;
                if !cfg.restart_after_upgrade {
                    tracing::info!(
                        "upgrade detected, DAEMON_RESTART_AFTER_UPGRADE is off: exiting"
                    );
                    return Ok(0);
                }
                tracing::info!(upgrade = %info.name, "upgrade applied, starting the new binary");
            }
        }
    }
}

/// `fakecosmovisor add-upgrade NAME EXE [--force]`: puts `exe` where the
/// upgrade's binary goes.
pub fn add_upgrade(cfg: &Config, name: &str, exe: &Path, force: bool) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = cfg.upgrade_dir(name).join("bin");
    let bin = dir.join(&cfg.name);
    anyhow::ensure!(
        force || !bin.exists(),
        "file already exists at {}",
        bin.display()
    );
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(exe, &bin)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_configuration_has_cosmovisors_defaults_and_bad_values_say_which() {
        let base = [("DAEMON_HOME", "/h"), ("DAEMON_NAME", "simd")];
        let cfg = Config::from_vars(vars(&base)).unwrap();
        assert_eq!(cfg.poll, Duration::from_millis(300));
        assert!(cfg.restart_after_upgrade && !cfg.skip_backup && cfg.recase);
        assert_eq!(
            cfg.upgrade_dir("Vega"),
            Path::new("/h/cosmovisor/upgrades/vega")
        );
        assert_eq!(
            (cfg.backup_dir.as_path(), cfg.preupgrade_max_retries),
            (Path::new("/h"), 0)
        );
        let with = |k: &'static str, v: &'static str| {
            let mut all = base.to_vec();
            all.push((k, v));
            Config::from_vars(vars(&all))
        };
        let kept = with("DAEMON_DISABLE_RECASE", "true").unwrap();
        assert_eq!(
            kept.upgrade_dir("Vega"),
            Path::new("/h/cosmovisor/upgrades/Vega")
        );
        assert_eq!(
            with("DAEMON_POLL_INTERVAL", "1.5s").unwrap().poll,
            Duration::from_millis(1500)
        );
        assert!(
            !with("DAEMON_RESTART_AFTER_UPGRADE", "FALSE")
                .unwrap()
                .restart_after_upgrade
        );
        for (k, v, want) in [
            (
                "DAEMON_RESTART_AFTER_UPGRADE",
                "yes",
                BadEnv::NotBool("DAEMON_RESTART_AFTER_UPGRADE", "yes".into()),
            ),
            (
                "DAEMON_POLL_INTERVAL",
                "300",
                BadEnv::NotDuration("DAEMON_POLL_INTERVAL", "300".into()),
            ),
            (
                "DAEMON_DATA_BACKUP_DIR",
                "rel",
                BadEnv::NotAbsolute("DAEMON_DATA_BACKUP_DIR", "rel".into()),
            ),
            (
                "DAEMON_PREUPGRADE_MAX_RETRIES",
                "-1",
                BadEnv::NotNumber("DAEMON_PREUPGRADE_MAX_RETRIES", "-1".into()),
            ),
        ] {
            assert_eq!(with(k, v), Err(want), "{k}={v}");
        }
        assert_eq!(
            Config::from_vars(vars(&[("DAEMON_NAME", "simd")])),
            Err(BadEnv::Missing("DAEMON_HOME"))
        );
        assert_eq!(
            Config::from_vars(vars(&[("DAEMON_HOME", "h"), ("DAEMON_NAME", "simd")])),
            Err(BadEnv::NotAbsolute("DAEMON_HOME", "h".into()))
        );
    }

    #[test]
    fn a_backup_is_named_by_the_day_without_padding() {
        let t = today();
        let parts: Vec<u32> = t.split('-').map(|p| p.parse().unwrap()).collect();
        assert!(parts.len() == 3 && parts[0] >= 2024 && (1..=12).contains(&parts[1]));
        assert!((1..=31).contains(&parts[2]) && !t.contains("-0"), "{t}");
    }
}
