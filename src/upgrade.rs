//! The chain's own software upgrades, as this host sees them through
//! cosmovisor: the plan its node reports before the height (the Cosmos
//! SDK's `GET /cosmos/upgrade/v1beta1/current_plan`), the halt its node
//! records at the height (`$DAEMON_HOME/data/upgrade-info.json`), and
//! cosmovisor's tree (`cosmovisor/current`, and
//! `cosmovisor/upgrades/NAME/bin/$DAEMON_NAME` where the upgrade's binary
//! must be before the height).
//!
//! Owns: reading those into a [`Report`] (pure: [`report`]), and the loop
//! that publishes this host's report for gossip, status and metrics.
//! Must not: act on it; [`crate::coordinator::policy`] decides what a
//! pending, halted or applied upgrade means for who may lead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::UpgradesConfig;

/// One upgrade: at `height` the chain needs the binary named `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    #[serde(deserialize_with = "height")]
    pub height: u64,
}

/// What this host knows of the next (or the last) upgrade of its chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub name: String,
    pub height: u64,
    /// The upgrade's binary is in cosmovisor's tree (or already in use).
    pub installed: bool,
    /// cosmovisor's `current` is the upgrade's: the node runs it, or will
    /// at its next start.
    pub applied: bool,
    /// The node halted for it: `data/upgrade-info.json` names it.
    pub halted: bool,
}

impl From<&Report> for crate::pb::UpgradeReport {
    fn from(r: &Report) -> Self {
        crate::pb::UpgradeReport {
            name: r.name.clone(),
            height: r.height,
            installed: r.installed,
            applied: r.applied,
            halted: r.halted,
        }
    }
}

impl From<&crate::pb::UpgradeReport> for Report {
    fn from(r: &crate::pb::UpgradeReport) -> Self {
        Report {
            name: r.name.clone(),
            height: r.height,
            installed: r.installed,
            applied: r.applied,
            halted: r.halted,
        }
    }
}

/// JSON heights come as numbers or, from the SDK's REST gateway, strings.
fn height<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum H {
        N(u64),
        S(String),
    }
    match H::deserialize(d)? {
        H::N(n) => Ok(n),
        H::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// The directory cosmovisor keeps upgrade `name` in, under
/// `cosmovisor/upgrades/`: the name lower-cased (unless
/// `DAEMON_DISABLE_RECASE`, `recase` false) and path-escaped as cosmovisor
/// does; `None` for a name no directory can have (`.`, `..`, empty).
pub fn dir_name(name: &str, recase: bool) -> Option<String> {
    let name = if recase {
        name.to_lowercase()
    } else {
        name.to_string()
    };
    if matches!(name.as_str(), "" | "." | "..") {
        return None;
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
    let mut out = String::new();
    for c in name.chars() {
        if plain(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    Some(out)
}

/// The report from what was read: the node's scheduled `plan`, the halt
/// record `halt`, the upgrade directory cosmovisor's `current` names
/// (`None`: genesis), and whether an upgrade directory holds its binary;
/// `recase` as [`dir_name`]. The later of plan and halt is reported (a
/// halt record stays after its upgrade); `None` when neither is known.
pub fn report(
    plan: Option<Plan>,
    halt: Option<Plan>,
    current: Option<&str>,
    recase: bool,
    installed: impl Fn(&str) -> bool,
) -> Option<Report> {
    let up = match (plan, &halt) {
        (Some(p), Some(h)) if h.height >= p.height => h.clone(),
        (Some(p), _) => p,
        (None, Some(h)) => h.clone(),
        (None, None) => return None,
    };
    let dir = dir_name(&up.name, recase);
    let applied = dir.is_some() && current == dir.as_deref();
    Some(Report {
        installed: applied || dir.as_deref().is_some_and(installed),
        applied,
        halted: halt.as_ref() == Some(&up),
        name: up.name,
        height: up.height,
    })
}

/// Where cosmovisor keeps what this module reads.
#[derive(Debug, Clone)]
pub struct Tree {
    pub home: PathBuf,
    pub name: String,
}

/// One read of the tree: the report from it and the plan last heard.
fn read_tree(t: &Tree, plan: Option<Plan>, recase: bool) -> Option<Report> {
    report(plan, t.halt_record(), t.current().as_deref(), recase, |d| {
        t.installed(d)
    })
}

impl Tree {
    fn halt_record(&self) -> Option<Plan> {
        let bytes = std::fs::read(self.home.join("data/upgrade-info.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The upgrade `current` links to (`None`: genesis, or no link yet).
    fn current(&self) -> Option<String> {
        let target = std::fs::read_link(self.home.join("cosmovisor/current")).ok()?;
        let dir = target.parent()?.file_name()?;
        (dir == "upgrades")
            .then(|| target.file_name()?.to_str().map(str::to_string))
            .flatten()
    }

    fn installed(&self, upgrade: &str) -> bool {
        let bin = self
            .home
            .join("cosmovisor/upgrades")
            .join(upgrade)
            .join("bin")
            .join(&self.name);
        is_executable(&bin)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The plan the node's REST API reports (`Ok(None)`: `{"plan": null}`,
/// none scheduled); `Err` when it does not answer with one.
async fn scheduled(http: &reqwest::Client, url: &str) -> Result<Option<Plan>, reqwest::Error> {
    #[derive(Deserialize)]
    struct Reply {
        plan: Option<Plan>,
    }
    let r: Reply = http.get(url).send().await?.json().await?;
    Ok(r.plan)
}

/// Publishes this host's [`Report`] every `every` (a task of `keyraft
/// run`'s, aborted with the others). While the node's API does not
/// answer, the plan it last reported stands (a node restarting must not
/// make its upgrade vanish); the halt record and the tree are read on
/// every round, off the runtime's threads and within a bound (a slow or
/// hung disk, during a backup of `data/` say, must not stall the lease).
pub async fn watch_upgrades(
    cfg: UpgradesConfig,
    every: Duration,
    out: Arc<watch::Sender<Option<Report>>>,
) {
    let tree = Tree {
        home: cfg.home,
        name: cfg.name,
    };
    let http = reqwest::Client::builder()
        .timeout(every.max(Duration::from_millis(500)))
        .build()
        .unwrap_or_default();
    let url = cfg
        .plan_url
        .map(|u| format!("{u}/cosmos/upgrade/v1beta1/current_plan"));
    let mut plan = None;
    // A read of the tree still running from an earlier round.
    let mut reading: Option<tokio::task::JoinHandle<Option<Report>>> = None;
    loop {
        if let Some(u) = &url {
            if let Ok(p) = scheduled(&http, u).await {
                plan = p;
            }
        }
        let mut read = reading.take().unwrap_or_else(|| {
            let (t, p) = (tree.clone(), plan.clone());
            tokio::task::spawn_blocking(move || read_tree(&t, p, cfg.recase))
        });
        let now = match tokio::time::timeout(every * 4, &mut read).await {
            Ok(Ok(now)) => now,
            Ok(Err(_)) => None,
            Err(_) => {
                reading = Some(read);
                continue;
            }
        };
        out.send_if_modified(|r| {
            let changed = *r != now;
            *r = now;
            changed
        });
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str, height: u64) -> Option<Plan> {
        Some(Plan {
            name: name.into(),
            height,
        })
    }

    #[test]
    fn the_report_is_the_later_of_plan_and_halt() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let r = |name: &str, height, installed, applied, halted| {
            Some(Report {
                name: String::from(name),
                height,
                installed,
                applied,
                halted,
            })
        };
        #[rustfmt::skip]
        let table = [
            // nothing known
            (None, None, None, false, None),
            // scheduled, binary missing / installed
            (plan("v2", 30), None, None, false, r("v2", 30, false, false, false)),
            (plan("v2", 30), None, None, true, r("v2", 30, true, false, false)),
            // halted (the plan may still be reported, or not any more)
            (plan("v2", 30), plan("v2", 30), None, true, r("v2", 30, true, false, true)),
            (None, plan("v2", 30), None, false, r("v2", 30, false, false, true)),
            // applied by cosmovisor: installed whatever the tree says
            (None, plan("v2", 30), Some("v2"), false, r("v2", 30, true, true, true)),
            // an old halt record and the next plan: the plan
            (plan("v3", 90), plan("v2", 30), Some("v2"), false, r("v3", 90, false, false, false)),
        ];
        for (p, h, current, installed, want) in table {
            let got = if installed {
                report(p.clone(), h.clone(), current, true, all)
            } else {
                report(p.clone(), h.clone(), current, true, none)
            };
            assert_eq!(got, want, "plan {p:?} halt {h:?} current {current:?}");
        }
    }

    #[test]
    fn upgrade_names_are_found_where_cosmovisor_puts_them() {
        // Lower-cased unless DAEMON_DISABLE_RECASE, path-escaped; a name no
        // directory can have is never installed.
        for (name, recase, want) in [
            ("Vega", true, Some("vega")),
            ("Vega", false, Some("Vega")),
            ("v7-Theta", true, Some("v7-theta")),
            ("a/../b", true, Some("a%2F..%2Fb")),
            ("..", true, None),
            ("", true, None),
        ] {
            assert_eq!(dir_name(name, recase).as_deref(), want, "{name}");
        }
        let only_vega = |d: &str| d == "vega";
        let got = report(plan("Vega", 30), None, None, true, only_vega).unwrap();
        assert!(got.installed && !got.applied);
        let got = report(None, plan("Vega", 30), Some("vega"), true, only_vega).unwrap();
        assert!(got.applied && got.halted && got.name == "Vega");
        let got = report(plan("..", 30), None, Some(".."), true, |_| true).unwrap();
        assert!(!got.installed && !got.applied);
    }

    #[test]
    fn heights_are_read_as_numbers_or_strings() {
        let a: Plan = serde_json::from_str(r#"{"name":"v2","height":"30","info":""}"#).unwrap();
        let b: Plan = serde_json::from_str(r#"{"name":"v2","height":30}"#).unwrap();
        assert_eq!(a, b);
        assert!(serde_json::from_str::<Plan>(r#"{"name":"v2","height":"x"}"#).is_err());
    }

    #[test]
    fn the_tree_says_what_is_installed_and_current() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree {
            home: dir.path().to_path_buf(),
            name: "simd".into(),
        };
        assert_eq!(tree.current(), None);
        assert!(!tree.installed("v2"));
        let bin = dir.path().join("cosmovisor/upgrades/v2/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(dir.path().join("cosmovisor/genesis/bin")).unwrap();
        std::fs::write(bin.join("simd"), "#!/bin/sh\n").unwrap();
        assert!(!tree.installed("v2"), "not executable");
        std::fs::set_permissions(bin.join("simd"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(tree.installed("v2"));
        let current = dir.path().join("cosmovisor/current");
        std::os::unix::fs::symlink(dir.path().join("cosmovisor/genesis"), &current).unwrap();
        assert_eq!(tree.current(), None);
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(dir.path().join("cosmovisor/upgrades/v2"), &current).unwrap();
        assert_eq!(tree.current().as_deref(), Some("v2"));
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/upgrade-info.json"),
            r#"{"name":"v2","height":30,"info":""}"#,
        )
        .unwrap();
        assert_eq!(tree.halt_record(), plan("v2", 30));
    }
}
