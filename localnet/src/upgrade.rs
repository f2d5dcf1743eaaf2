//! A chain's software upgrades, as the Cosmos SDK's upgrade module runs
//! them: at an upgrade's height every node of the old version halts (it
//! writes `data/upgrade-info.json`, logs `UPGRADE "NAME" NEEDED at height:
//! H` and exits non-zero), and the chain makes no block until a node of the
//! new version, started after its migration, signs that height. A node of
//! a version the chain has not reached refuses to run (`BINARY UPDATED
//! BEFORE TRIGGER`).
//!
//! Owns: the plan (`NAME@HEIGHT` entries, in height order), which upgrade
//! halts a node of a given version at a given head, which version the
//! chain needs at a height, and the shape of `upgrade-info.json`. Must not:
//! produce heights, sign, or touch a process; the chain and the node do.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The version a node runs before any upgrade (cosmovisor's `genesis`).
pub const GENESIS: &str = "genesis";

/// Where a halted node writes what it halted for, under its home.
pub const INFO_FILE: &str = "data/upgrade-info.json";

/// One scheduled upgrade: at `height` the chain needs version `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    pub name: String,
    pub height: u64,
}

impl fmt::Display for Upgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.height)
    }
}

/// A plan or an upgrade that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPlan {
    #[error("{0:?} is not NAME@HEIGHT")]
    NotNameAtHeight(String),
    #[error("upgrade {0:?}: the name must be a plain word, and not {GENESIS:?}")]
    BadName(String),
    #[error("upgrade {0}: the height must be 2 or more")]
    TooLow(Upgrade),
    #[error("upgrades {0} and {1} share a name or a height")]
    Clash(Upgrade, Upgrade),
}

impl FromStr for Upgrade {
    type Err = BadPlan;

    fn from_str(s: &str) -> Result<Upgrade, BadPlan> {
        let (name, height) = s
            .split_once('@')
            .ok_or_else(|| BadPlan::NotNameAtHeight(s.to_string()))?;
        let height = height
            .parse()
            .map_err(|_| BadPlan::NotNameAtHeight(s.to_string()))?;
        let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || name == GENESIS || !name.chars().all(plain) {
            return Err(BadPlan::BadName(name.to_string()));
        }
        let up = Upgrade {
            name: name.to_string(),
            height,
        };
        if height < 2 {
            return Err(BadPlan::TooLow(up));
        }
        Ok(up)
    }
}

/// The chain's upgrades, in height order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan(Vec<Upgrade>);

/// What a node of some version must do at the head it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run (and sign, when it may).
    Run,
    /// Halt for this upgrade: the chain reached its height, and this node
    /// runs a version before it.
    Halt(Upgrade),
    /// Refuse to run: this version's upgrade is still above the head.
    Early(Upgrade),
    /// A version the plan does not know.
    Unknown,
}

impl Plan {
    pub fn new(mut ups: Vec<Upgrade>) -> Result<Plan, BadPlan> {
        ups.sort_by_key(|u| u.height);
        for pair in ups.windows(2) {
            let names_clash = ups.iter().filter(|u| u.name == pair[1].name).count() > 1;
            if pair[0].height == pair[1].height || names_clash {
                return Err(BadPlan::Clash(pair[0].clone(), pair[1].clone()));
            }
        }
        Ok(Plan(ups))
    }

    pub fn upgrades(&self) -> &[Upgrade] {
        &self.0
    }

    /// Where `version` sits in the plan: 0 for genesis, i + 1 for the i-th
    /// upgrade.
    fn rank(&self, version: &str) -> Option<usize> {
        if version == GENESIS {
            return Some(0);
        }
        self.0.iter().position(|u| u.name == version).map(|i| i + 1)
    }

    /// What a node running `version` must do when the chain's head is
    /// `head`. On a chain with no plan (NEAR's binary upgrades need no
    /// halt) every version runs.
    pub fn verdict(&self, version: &str, head: u64) -> Verdict {
        if self.0.is_empty() {
            return Verdict::Run;
        }
        let Some(rank) = self.rank(version) else {
            return Verdict::Unknown;
        };
        if let Some(own) = rank.checked_sub(1).map(|i| &self.0[i]) {
            if head < own.height {
                return Verdict::Early(own.clone());
            }
        }
        match self.0.get(rank) {
            Some(next) if head >= next.height => Verdict::Halt(next.clone()),
            _ => Verdict::Run,
        }
    }

    /// The upgrade a node running `version` waits for: the next one in
    /// the plan (what the SDK reports as its current plan).
    pub fn next_after(&self, version: &str) -> Option<&Upgrade> {
        self.rank(version).and_then(|r| self.0.get(r))
    }

    /// The upgrade whose height is `height`, if one is: the chain makes no
    /// block past it until a node of its version signs it.
    pub fn at(&self, height: u64) -> Option<&Upgrade> {
        self.0.iter().find(|u| u.height == height)
    }
}

/// An upgrade the chain passed: after `halted_ms` without a block, its
/// height was signed by its version, or the rest of the network upgraded
/// without this validator (`by_network`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Passed {
    pub upgrade: Upgrade,
    pub halted_ms: u64,
    #[serde(default)]
    pub by_network: bool,
    /// From the halt to this validator's first signature at or past the
    /// upgrade's height (`None`: none yet).
    #[serde(default)]
    pub signed_ms: Option<u64>,
}

/// `data/upgrade-info.json`, as the upgrade module writes it at the halt
/// and cosmovisor reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeInfo {
    pub name: String,
    pub height: u64,
    #[serde(default)]
    pub info: String,
}

impl From<&Upgrade> for UpgradeInfo {
    fn from(u: &Upgrade) -> UpgradeInfo {
        UpgradeInfo {
            name: u.name.clone(),
            height: u.height,
            info: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, height: u64) -> Upgrade {
        Upgrade {
            name: name.into(),
            height,
        }
    }

    #[test]
    fn an_upgrade_is_read_as_written_and_bad_ones_say_why() {
        assert_eq!("v2@10".parse(), Ok(up("v2", 10)));
        assert_eq!(up("v2", 10).to_string(), "v2@10");
        for (s, want) in [
            ("v2", BadPlan::NotNameAtHeight("v2".into())),
            ("v2@ten", BadPlan::NotNameAtHeight("v2@ten".into())),
            ("@10", BadPlan::BadName(String::new())),
            ("genesis@10", BadPlan::BadName("genesis".into())),
            ("v 2@10", BadPlan::BadName("v 2".into())),
            ("v2@1", BadPlan::TooLow(up("v2", 1))),
        ] {
            assert_eq!(s.parse::<Upgrade>(), Err(want), "{s}");
        }
        assert!(Plan::new(vec![up("a", 5), up("b", 5)]).is_err());
        assert!(Plan::new(vec![up("a", 5), up("a", 9)]).is_err());
    }

    #[test]
    fn a_node_halts_at_the_first_upgrade_past_its_version_and_refuses_to_run_early() {
        let plan = Plan::new(vec![up("v3", 20), up("v2", 10)]).unwrap();
        // (version, head, verdict)
        let table = [
            ("genesis", 9, Verdict::Run),
            ("genesis", 10, Verdict::Halt(up("v2", 10))),
            ("genesis", 25, Verdict::Halt(up("v2", 10))),
            ("v2", 9, Verdict::Early(up("v2", 10))),
            ("v2", 10, Verdict::Run),
            ("v2", 19, Verdict::Run),
            ("v2", 20, Verdict::Halt(up("v3", 20))),
            ("v3", 19, Verdict::Early(up("v3", 20))),
            ("v3", 20, Verdict::Run),
            ("v9", 20, Verdict::Unknown),
        ];
        for (version, head, want) in table {
            assert_eq!(plan.verdict(version, head), want, "{version} at {head}");
        }
        assert_eq!(Plan::default().verdict("v9", 20), Verdict::Run);
        assert_eq!(plan.at(10), Some(&up("v2", 10)));
        assert_eq!(plan.at(11), None);
        assert_eq!(plan.next_after("genesis"), Some(&up("v2", 10)));
        assert_eq!(plan.next_after("v2"), Some(&up("v3", 20)));
        assert_eq!(plan.next_after("v3"), None);
        assert_eq!(plan.next_after("v9"), None);
    }
}
