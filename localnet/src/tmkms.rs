//! tmkms, the remote signer nobody here wrote, run against the judge: the
//! proof that `fakenode --cometbft` speaks what real signers speak, and the
//! baseline keyraft's signer is measured against.
//!
//! Owns: finding the `tmkms` binary, writing its config, identity key and
//! state file path for one signer, and starting it. Must not: install tmkms
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
/// with its log in `log_dir/<name>.log`. Starting it again with the same
/// `dir` keeps its state file, as a restarted tmkms would.
pub fn start(name: &str, dir: &Path, log_dir: &Path, s: &Signer) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let identity = dir.join("kms-identity.key");
    if !identity.exists() {
        let seed = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        write_private(&identity, seed.as_bytes())?;
    }
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

[[providers.softsign]]
chain_ids = ["{chain}"]
key_type = "consensus"
key_format = "json"
path = "{key}"
"#,
        chain = s.chain_id,
        state = dir.join("priv_validator_state.json").display(),
        ext = s.sign_extensions,
        key = s.key.display(),
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
    let path = dir.join("tmkms.toml");
    std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
    Proc::spawn(
        name,
        Command::new(binary()?).arg("start").arg("-c").arg(&path),
        log_dir,
    )
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
