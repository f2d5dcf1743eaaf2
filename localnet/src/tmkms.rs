//! tmkms, the remote signer nobody here wrote, run against the judge: the
//! proof that `fakenode --cometbft` speaks what real signers speak, and the
//! baseline keyraft's signer is measured against.
//!
//! Owns: finding the `tmkms` binary, writing its config, identity key and
//! state file paths for one signer of one or more chains, and starting it. Must not: install tmkms
//! (`localnet/scripts/install-tmkms.sh` does, at a pinned version), or share
//! a state file between two signers (each tmkms keeps its own watermark).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use base64::Engine;

use crate::comet::node::Protocol;
use crate::harness::Proc;

/// The tmkms release the interop tests are written against.
pub const VERSION: &str = "0.15.0";

/// `$TMKMS`, else `tmkms` on `PATH`, else `~/.cargo/bin/tmkms`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TMKMS") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tmkms")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        candidates.push(Path::new(&home).join("bin").join("tmkms"));
    }
    match candidates.into_iter().find(|c| c.is_file()) {
        Some(p) => Ok(p),
        None => bail!(
            "tmkms is not installed: run localnet/scripts/install-tmkms.sh \
             (cargo install tmkms --version {VERSION} --features softsign --locked), \
             or point TMKMS at the binary"
        ),
    }
}

/// One tmkms, with one key and one watermark, serving one or more nodes.
pub struct Signer<'a> {
    pub chain_id: &'a str,
    /// The validator's `priv_validator_key.json`.
    pub key: &'a Path,
    /// The nodes' privval addresses: `tcp://HOST:PORT` or `unix:///PATH`.
    pub addrs: Vec<String>,
    pub protocol: Protocol,
    pub sign_extensions: bool,
}

/// Writes `dir/tmkms.toml` (and an identity key, once) and starts tmkms
/// with its log in `log_dir/<name>.log`, signing for every chain in
/// `chains` (a state file each). Starting it again with the same `dir`
/// keeps its state files, as a restarted tmkms would.
pub fn start(name: &str, dir: &Path, log_dir: &Path, chains: &[Signer]) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let identity = dir.join("kms-identity.key");
    if !identity.exists() {
        let seed = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        write_private(&identity, seed.as_bytes())?;
    }
    let mut config = String::new();
    for s in chains {
        config.push_str(&chain_tables(s, dir, &identity)?);
    }
    // One software key serves every chain that names it (tmkms refuses a
    // second consensus key in its software signer).
    let mut by_key: Vec<(&Path, Vec<&str>)> = Vec::new();
    for s in chains {
        match by_key.iter_mut().find(|(k, _)| *k == s.key) {
            Some((_, ids)) => ids.push(s.chain_id),
            None => by_key.push((s.key, vec![s.chain_id])),
        }
    }
    for (key, ids) in by_key {
        let ids: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
        config.push_str(&format!(
            "[[providers.softsign]]\nchain_ids = [{}]\nkey_type = \"consensus\"\nkey_format = \"json\"\npath = \"{}\"\n\n",
            ids.join(", "),
            key.display()
        ));
    }
    let path = dir.join("tmkms.toml");
    std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
    Proc::spawn(
        name,
        Command::new(binary()?).arg("start").arg("-c").arg(&path),
        log_dir,
    )
}

/// One chain's `[[chain]]` and `[[validator]]` tables.
fn chain_tables(s: &Signer, dir: &Path, identity: &Path) -> anyhow::Result<String> {
    let protocol = match s.protocol {
        Protocol::V0_34 => "v0.34",
        Protocol::V0_38 => "v0.38",
        // tmkms has no 1.x support (its issue #1152).
        Protocol::V1 => anyhow::bail!("tmkms does not speak CometBFT 1.x's privval"),
    };
    let mut config = format!(
        r#"[[chain]]
id = "{chain}"
key_format = {{ type = "hex" }}
state_file = "{state}"
sign_extensions = {ext}
"#,
        chain = s.chain_id,
        state = dir
            .join(format!("priv_validator_state-{}.json", s.chain_id))
            .display(),
        ext = s.sign_extensions,
    );
    for addr in &s.addrs {
        config.push_str(&format!(
            r#"
[[validator]]
chain_id = "{chain}"
addr = "{addr}"
secret_key = "{identity}"
protocol_version = "{protocol}"
reconnect = true
"#,
            chain = s.chain_id,
            identity = identity.display(),
        ));
    }
    Ok(config + "\n")
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two chains with one key: one software signer serving both (tmkms
    /// refuses a second consensus key), a state file and a validator each.
    #[test]
    fn chains_sharing_a_key_get_one_provider() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        let chain = |id| Signer {
            chain_id: id,
            key: &key,
            addrs: vec![format!("tcp://127.0.0.1:1{}", id.len())],
            protocol: Protocol::V0_38,
            sign_extensions: false,
        };
        // tmkms itself need not exist: the config is written first.
        let _ = start(
            "kms",
            &dir.path().join("kms"),
            dir.path(),
            &[chain("a"), chain("bb")],
        );
        let config = std::fs::read_to_string(dir.path().join("kms/tmkms.toml")).unwrap();
        let t: toml::Table = config.parse().unwrap();
        let providers = t["providers"]["softsign"].as_array().unwrap();
        assert_eq!(providers.len(), 1, "{config}");
        assert_eq!(providers[0]["chain_ids"].as_array().unwrap().len(), 2);
        assert_eq!(t["chain"].as_array().unwrap().len(), 2);
        assert_eq!(t["validator"].as_array().unwrap().len(), 2);
        let states: Vec<_> = t["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state_file"].as_str().unwrap().to_string())
            .collect();
        assert_ne!(states[0], states[1]);
    }
}
