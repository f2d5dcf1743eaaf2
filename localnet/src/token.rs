//! A signer host's key in hardware: a SoftHSM2 token of its own (its own
//! token directory, named by its own `SOFTHSM2_CONF`), the validator's key
//! put into it by `keyraft signer import-key` as an operator does, and
//! `keyraft run` given the token's `pkcs11:` URI instead of the key file.
//! A token fails for real when its directory is moved away (SoftHSM2 then
//! fails every call on it) and answers again when it is moved back. A
//! token reached through the tests' own PKCS#11 module
//! (`localnet/shim/pkcs11_hang.rs`, SoftHSM2 behind it) stops answering
//! instead, its calls hanging, while [`Token::hang`] holds.
//!
//! Owns: the token's files and its URI. Must not: know how keyraft uses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Debian's SoftHSM2 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "localnet";
const PIN: &str = "4711";

/// Where a signer host's key is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyIn {
    /// `priv_validator_key.json`.
    #[default]
    File,
    /// The cluster's key in a SoftHSM2 token of this host.
    Token,
    /// Another key than the cluster's in this host's token (a host given
    /// the wrong token).
    TokenWithAnotherKey,
    /// The cluster's key in this host's token, reached through the tests'
    /// module that can make the token stop answering ([`Token::hang`]).
    HangingToken,
}

/// One host's SoftHSM2 token, under its base dir.
pub struct Token {
    dir: PathBuf,
}

impl Token {
    pub fn at(base: &Path) -> Token {
        Token {
            dir: base.join("softhsm"),
        }
    }

    /// SoftHSM2's configuration file: `SOFTHSM2_CONF` of whatever opens
    /// this token.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    fn tokens(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    fn away(&self) -> PathBuf {
        self.dir.join("tokens.away")
    }

    /// The key's URI, as `--validator-key` takes it.
    pub fn uri(&self) -> String {
        self.uri_through(Path::new(MODULE))
    }

    /// The key's URI through PKCS#11 module `module`.
    pub fn uri_through(&self, module: &Path) -> String {
        format!(
            "pkcs11:token={LABEL};object=validator?module-path={}&pin-source=file:{}",
            module.display(),
            self.dir.join("pin").display()
        )
    }

    /// The tests' module that can hang this token, once built
    /// ([`Token::build_hanging_module`]).
    pub fn hanging_module(&self) -> PathBuf {
        self.dir.join("libpkcs11_hang.so")
    }

    /// Builds the tests' hanging module (`localnet/shim/pkcs11_hang.rs`)
    /// with `rustc` alone, beside this token: about a second, and every
    /// test its own copy.
    pub fn build_hanging_module(&self) -> Result<()> {
        let source = self.dir.join("pkcs11_hang.rs");
        std::fs::write(&source, include_str!("../shim/pkcs11_hang.rs"))?;
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        crate::harness::run(
            Command::new(rustc)
                .args(["--edition", "2021", "--crate-type", "cdylib", "-O", "-o"])
                .arg(self.hanging_module())
                .arg(&source),
        )
    }

    /// Through the hanging module, every call that reaches the token
    /// waits from now on, until [`Token::answer`].
    pub fn hang(&self) -> Result<()> {
        std::fs::write(self.dir.join("hang"), b"").context("hanging the token")
    }

    /// Through the hanging module, `C_Initialize` waits from now on (a
    /// module that does not load), until [`Token::load`].
    pub fn hang_loading(&self) -> Result<()> {
        std::fs::write(self.dir.join("hang-init"), b"").context("hanging the module's loading")
    }

    /// The hanging module loads again.
    pub fn load(&self) -> Result<()> {
        std::fs::remove_file(self.dir.join("hang-init")).context("letting the module load")
    }

    /// The hanging module's calls go through again.
    pub fn answer(&self) -> Result<()> {
        std::fs::remove_file(self.dir.join("hang")).context("letting the token answer")
    }

    /// A new token holding `key` (a `priv_validator_key.json`), imported
    /// with `keyraft`.
    pub fn create(&self, keyraft: &Path, key: &Path) -> Result<()> {
        ensure!(
            Path::new(MODULE).is_file(),
            "{MODULE} is missing: install softhsm2 (scripts/test does)"
        );
        std::fs::create_dir_all(self.tokens())?;
        std::fs::write(
            self.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                self.tokens().display()
            ),
        )?;
        let pin = self.dir.join("pin");
        std::fs::write(&pin, format!("{PIN}\n"))?;
        std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        crate::harness::run(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", self.conf())
                .args(["--init-token", "--free", "--label", LABEL])
                .args(["--pin", PIN, "--so-pin", "123456"]),
        )?;
        crate::harness::run(
            Command::new(keyraft)
                .env("SOFTHSM2_CONF", self.conf())
                .args(["signer", "import-key", "--from"])
                .arg(key)
                .args(["--to", &self.uri()]),
        )
    }

    /// The token stops answering: its directory is moved away.
    pub fn fail(&self) -> Result<()> {
        std::fs::rename(self.tokens(), self.away()).context("moving the token away")
    }

    /// The token answers again.
    pub fn restore(&self) -> Result<()> {
        std::fs::rename(self.away(), self.tokens()).context("moving the token back")
    }
}

/// Lays out the token `key_in` asks for under `base` (none for a file):
/// with the cluster's `key`, or a new one.
pub fn lay_out(keyraft: &Path, base: &Path, key: &Path, key_in: KeyIn) -> Result<()> {
    match key_in {
        KeyIn::File => Ok(()),
        KeyIn::Token => Token::at(base).create(keyraft, key),
        KeyIn::HangingToken => {
            let t = Token::at(base);
            t.create(keyraft, key)?;
            t.build_hanging_module()
        }
        KeyIn::TokenWithAnotherKey => {
            let other = base.join("another_priv_validator_key.json");
            crate::comet::key::ValidatorKey::generate().write_new(&other)?;
            Token::at(base).create(keyraft, &other)
        }
    }
}

/// `keyraft run`'s key flag for a host whose key is `key_in`, and the
/// environment it needs.
pub fn key_args(base: &Path, key: &Path, key_in: KeyIn) -> (Vec<(String, PathBuf)>, [String; 2]) {
    let flag = "--validator-key".to_string();
    match key_in {
        KeyIn::File => (Vec::new(), [flag, key.display().to_string()]),
        KeyIn::HangingToken => {
            let t = Token::at(base);
            let uri = t.uri_through(&t.hanging_module());
            (vec![("SOFTHSM2_CONF".into(), t.conf())], [flag, uri])
        }
        _ => {
            let t = Token::at(base);
            (vec![("SOFTHSM2_CONF".into(), t.conf())], [flag, t.uri()])
        }
    }
}
