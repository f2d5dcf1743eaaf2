//! What a reload (SIGHUP, `systemctl reload keyraft`) may change: signer
//! mode's `[[chains]]`, read again from the file and checked as at start,
//! with every other setting as it was.
//!
//! Owns: reading the file again, and the rule that nothing but `[[chains]]`
//! changed in it. Must not: open a key or touch a running chain (that is
//! `signer::reload`).

use super::{invalid, ChainConfig, Config, ConfigError, RunArgs};

/// The flags `keyraft run` was given and what they and the file said at
/// start, for a reload to compare with.
#[derive(Debug, Clone)]
pub struct Reload {
    flags: RunArgs,
    at_start: RunArgs,
}

impl Reload {
    /// Resolves `flags` and their file as [`RunArgs::resolve`] does,
    /// keeping what a reload compares with.
    pub fn resolve(flags: RunArgs) -> Result<(Config, Reload), ConfigError> {
        let at_start = flags.clone().merge_file()?;
        let cfg = at_start.clone().resolve_merged()?;
        Ok((cfg, Reload { flags, at_start }))
    }

    /// The chains the file lists now, checked as at start. Refused when
    /// anything else in it changed (a restart applies that), or when the
    /// node does not run in signer mode.
    pub fn chains(&self) -> Result<Vec<ChainConfig>, ConfigError> {
        let now = self.flags.clone().merge_file()?;
        let file = self
            .flags
            .config
            .as_ref()
            .map_or("the configuration".to_string(), |p| p.display().to_string());
        if let Some(key) = changed_besides_chains(&self.at_start, &now)? {
            return Err(invalid(format!(
                "`{key}` changed in {file}: a reload applies [[chains]] only; restart keyraft to apply the rest"
            )));
        }
        let signer = now.resolve_merged()?.signer;
        signer
            .map(|s| s.chains)
            .ok_or_else(|| invalid("not in signer mode: there are no chains to reload"))
    }
}

/// The first setting other than `chains` whose value differs between
/// `a` and `b`, by its TOML key.
fn changed_besides_chains(a: &RunArgs, b: &RunArgs) -> Result<Option<String>, ConfigError> {
    let table = |r: &RunArgs| match serde_json::to_value(r) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the settings do not form a table")),
        Err(e) => Err(invalid(format!("reading the settings: {e}"))),
    };
    let (a, b) = (table(a)?, table(b)?);
    let null = serde_json::Value::Null;
    Ok(a.keys()
        .chain(b.keys())
        .filter(|k| *k != "chains")
        .find(|k| a.get(*k).unwrap_or(&null) != b.get(*k).unwrap_or(&null))
        .cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_outside_the_chains_is_named() {
        let base = RunArgs {
            node_id: Some(1),
            ..RunArgs::default()
        };
        let chains = RunArgs {
            chains: vec![crate::config::ChainArgs {
                chain_id: "b".into(),
                ..Default::default()
            }],
            ..base.clone()
        };
        let listen = RunArgs {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..base.clone()
        };
        // (at start, now) -> the setting named
        let table = [
            (&base, &base, None),
            (&base, &chains, None),
            (&chains, &base, None),
            (&base, &listen, Some("listen")),
            (&listen, &chains, Some("listen")),
        ];
        for (a, b, want) in table {
            let got = changed_besides_chains(a, b).unwrap();
            assert_eq!(got.as_deref(), want, "{a:?} -> {b:?}");
        }
    }
}
