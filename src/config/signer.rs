//! Signer mode's configuration: each chain's id, consensus key and the
//! privval addresses keyraft dials for it, and its SecretConnection identity.
//!
//! Owns: the checks that signer mode's flags (or `[[chains]]` tables)
//! belong together, that no two chains share an id or a node, and that no
//! key link is configured beside them. Must not: read the key or dial.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{check_host_port, check_private, invalid, ConfigError, RunArgs, TokenUri};

/// Signer mode: keyraft signs for the chain's nodes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SignerKind {
    /// CometBFT's privval protocol: keyraft dials each node's
    /// `priv_validator_laddr` and signs votes and proposals.
    Cometbft,
}

/// Where a signer dials a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivvalAddr {
    /// `HOST:PORT`, and the node's SecretConnection id when pinned
    /// (`tcp://ID@HOST:PORT`): a listener with another identity is refused.
    Tcp {
        addr: String,
        pin: Option<[u8; 20]>,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for PrivvalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivvalAddr::Tcp { addr, .. } => write!(f, "tcp://{addr}"),
            PrivvalAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// The privval protocol a chain's nodes speak, and so what each connection
/// to them speaks (docs/signer.md, protocol versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
pub enum ProtocolVersion {
    /// CometBFT 0.37 and 0.38 (`tendermint.privval`), as tmkms speaks.
    #[default]
    #[value(name = "v0.38")]
    #[serde(rename = "v0.38")]
    V0_38,
    /// CometBFT 1.x (`cometbft.privval.v1`).
    #[value(name = "v1")]
    #[serde(rename = "v1")]
    V1,
    /// Around a chain's upgrade from 0.38 to 1.x: 1.x's requests are
    /// taken, and the public key is answered in one message both versions
    /// read, so whichever binary a node runs, before or after the halt,
    /// gets its key.
    #[value(name = "either")]
    #[serde(rename = "either")]
    Either,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProtocolVersion::V0_38 => "v0.38",
            ProtocolVersion::V1 => "v1",
            ProtocolVersion::Either => "either (v0.38 or v1)",
        })
    }
}

/// How keyraft speaks to a chain's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Protocol {
    pub version: ProtocolVersion,
    /// Whether 1.x's `SignBytesRequest` is signed for this chain.
    pub sign_bytes: bool,
}

/// Where a chain's consensus key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// CometBFT's `priv_validator_key.json`.
    File(PathBuf),
    /// A key in a PKCS#11 token (`pkcs11:` URI).
    Token(TokenUri),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "{}", p.display()),
            KeySource::Token(u) => write!(f, "{u}"),
        }
    }
}

impl From<&str> for KeySource {
    fn from(p: &str) -> Self {
        KeySource::File(PathBuf::from(p))
    }
}

/// One chain signer mode signs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainConfig {
    pub chain_id: String,
    /// Its consensus key: a file, or a key in a token.
    pub key: KeySource,
    pub nodes: Vec<PrivvalAddr>,
    /// A node's CometBFT RPC whose height bounds what is signed (several
    /// chains; one chain has the validator probe, `--health-url`).
    pub node_rpc: Option<String>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// At least one; no two with one chain id or one privval address.
    pub chains: Vec<ChainConfig>,
    pub identity_key: PathBuf,
}

impl SignerConfig {
    pub fn chain(&self, chain_id: &str) -> Option<&ChainConfig> {
        self.chains.iter().find(|c| c.chain_id == chain_id)
    }

    pub fn chain_ids(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().map(|c| c.chain_id.as_str())
    }
}

pub(super) fn resolve_signer(
    a: &RunArgs,
    data_dir: &Path,
) -> Result<Option<SignerConfig>, ConfigError> {
    let Some(SignerKind::Cometbft) = a.signer else {
        if !a.privval_node.is_empty() || a.chain_id.is_some() || !a.chains.is_empty() {
            return Err(invalid(
                "--privval-node, --chain-id and [[chains]] belong to signer mode: add --signer cometbft",
            ));
        }
        return Ok(None);
    };
    if a.witness {
        return Err(invalid(
            "--witness signs nothing: drop --signer (a witness votes for the signers)",
        ));
    }
    if a.chain.is_some() || !a.key_link.is_empty() || a.validator_home.is_some() {
        return Err(invalid(
            "signer mode links no key into any node: drop --chain, --key-link and --validator-home",
        ));
    }
    let one = a.chain_id.is_some()
        || a.validator_key.is_some()
        || !a.privval_node.is_empty()
        || a.protocol_version.is_some()
        || a.sign_bytes;
    let chains = match (one, a.chains.is_empty()) {
        (true, false) => {
            return Err(invalid(
                "[[chains]] replaces --chain-id, --validator-key, --privval-node and the --protocol-*/--sign-bytes flags: give one or the other",
            ))
        }
        (_, true) => vec![resolve_chain(
            a.chain_id.as_deref(),
            a.validator_key.as_deref(),
            &a.privval_node,
            None,
            "--",
        )
        .and_then(|c| {
            with_protocol(c, a.protocol_version, a.sign_bytes, "--")
        })?],
        (false, false) => a
            .chains
            .iter()
            .map(|c| {
                resolve_chain(
                    Some(&c.chain_id),
                    Some(&c.validator_key),
                    &c.privval_node,
                    c.node_rpc.as_deref(),
                    "",
                )
                .and_then(|r| {
                    with_protocol(r, c.protocol_version, c.sign_bytes, "")
                })
                .map_err(|e| invalid(format!("[[chains]] {}: {e}", c.chain_id)))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    for (i, c) in chains.iter().enumerate() {
        for other in &chains[..i] {
            if other.chain_id == c.chain_id {
                return Err(invalid(format!(
                    "chain {} is listed twice in [[chains]]",
                    c.chain_id
                )));
            }
            // Compared as printed, without an identity pin: a pinned and an
            // unpinned address of one node are one node.
            let printed = |n: &PrivvalAddr| n.to_string();
            let theirs: Vec<String> = other.nodes.iter().map(printed).collect();
            if let Some(n) = c.nodes.iter().find(|n| theirs.contains(&printed(n))) {
                return Err(invalid(format!(
                    "privval node {n} is given for chains {} and {}: each node serves one chain",
                    other.chain_id, c.chain_id
                )));
            }
        }
    }
    let identity_key = a
        .privval_identity_key
        .clone()
        .unwrap_or_else(|| data_dir.join("privval-identity.key"));
    if identity_key.is_file() {
        check_private(&identity_key)?;
    }
    Ok(Some(SignerConfig {
        chains,
        identity_key,
    }))
}

/// One chain's id, key and nodes, checked. `dashes` is "--" where they came
/// as flags, "" in a `[[chains]]` table (the names in errors follow).
fn resolve_chain(
    chain_id: Option<&str>,
    key: Option<&Path>,
    privval_node: &[String],
    node_rpc: Option<&str>,
    dashes: &str,
) -> Result<ChainConfig, ConfigError> {
    let chain_id = chain_id
        .ok_or_else(|| invalid(format!("--signer cometbft needs {dashes}chain-id")))?
        .to_string();
    if let Err(e) = cometbft::chain::Id::try_from(chain_id.clone()) {
        return Err(invalid(format!(
            "bad {dashes}chain-id '{chain_id}': {e} (1 to 50 characters, as CometBFT allows)"
        )));
    }
    let key = key.ok_or_else(|| {
        invalid(format!(
            "--signer cometbft needs {dashes}validator-key (the validator's priv_validator_key.json, or a pkcs11: URI)"
        ))
    })?;
    let key = match key.to_str().filter(|k| TokenUri::is_uri(k)) {
        Some(uri) => {
            let uri = TokenUri::parse(uri)?;
            uri.check()?;
            KeySource::Token(uri)
        }
        None if !key.is_file() => {
            return Err(invalid(format!(
                "key file {} does not exist",
                key.display()
            )))
        }
        None => {
            check_private(key)?;
            KeySource::File(key.to_path_buf())
        }
    };
    if privval_node.is_empty() {
        return Err(invalid(format!(
            "--signer cometbft needs at least one {dashes}privval-node (tcp://HOST:PORT or unix:///PATH of a node's priv_validator_laddr)"
        )));
    }
    let mut nodes = Vec::new();
    for n in privval_node {
        let addr = if let Some(path) = n.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid(format!(
                    "bad {dashes}privval-node '{n}': unix:// needs an absolute path"
                )));
            }
            PrivvalAddr::Unix(PathBuf::from(path))
        } else {
            let hp = n.strip_prefix("tcp://").unwrap_or(n);
            // tcp://ID@HOST:PORT pins the node's SecretConnection identity.
            let (pin, hp) = match hp.split_once('@') {
                Some((id, hp)) => (Some(parse_node_id(id, n)?), hp),
                None => (None, hp),
            };
            check_host_port(hp, "--privval-node")?;
            PrivvalAddr::Tcp {
                addr: hp.to_string(),
                pin,
            }
        };
        if nodes
            .iter()
            .any(|o: &PrivvalAddr| o.to_string() == addr.to_string())
        {
            return Err(invalid(format!("{dashes}privval-node {n} is given twice")));
        }
        nodes.push(addr);
    }
    if let Some(url) = node_rpc {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "bad node-rpc '{url}': want http://HOST:PORT (a CometBFT RPC)"
            )));
        }
    }
    Ok(ChainConfig {
        chain_id,
        key,
        nodes,
        node_rpc: node_rpc.map(|u| u.trim_end_matches('/').to_string()),
        protocol: Protocol::default(),
    })
}

/// `chain` with the privval protocol its nodes speak, checked: raw bytes
/// are a 1.x request.
fn with_protocol(
    chain: ChainConfig,
    version: Option<ProtocolVersion>,
    sign_bytes: bool,
    dashes: &str,
) -> Result<ChainConfig, ConfigError> {
    let version = version.unwrap_or_default();
    if sign_bytes && version == ProtocolVersion::V0_38 {
        return Err(invalid(format!(
            "{dashes}sign-bytes is a CometBFT 1.x request: set {dashes}protocol-version v1 (or either)"
        )));
    }
    Ok(ChainConfig {
        protocol: Protocol {
            version,
            sign_bytes,
        },
        ..chain
    })
}

/// A node id as CometBFT writes it: 40 hex digits (20 bytes).
fn parse_node_id(id: &str, whole: &str) -> Result<[u8; 20], ConfigError> {
    let bytes = hex::decode(id)
        .ok()
        .and_then(|b| <[u8; 20]>::try_from(b).ok());
    bytes.ok_or_else(|| {
        invalid(format!(
            "bad --privval-node '{whole}': the id before '@' must be the node's 40-hex-digit id"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{keys_in, validator_args};

    #[test]
    fn signer_mode_needs_its_flags_and_refuses_key_links() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys_in(dir.path(), &["priv_validator_key.json"]);
        let signer = RunArgs {
            signer: Some(SignerKind::Cometbft),
            chain_id: Some("cosmoshub-4".into()),
            validator_key: Some(k[0].clone()),
            privval_node: vec![
                format!("tcp://{}@127.0.0.1:26659", "ab".repeat(20)),
                "tcp://127.0.0.1:26660".into(),
                "unix:///run/pv.sock".into(),
            ],
            validator_home: None,
            data_dir: Some(dir.path().join("data")),
            ..validator_args(dir.path())
        };
        let c = signer.clone().resolve().unwrap();
        let s = c.signer.unwrap();
        assert_eq!(s.chains.len(), 1);
        assert_eq!(s.chains[0].chain_id, "cosmoshub-4");
        assert_eq!(
            s.chains[0].nodes,
            vec![
                PrivvalAddr::Tcp {
                    addr: "127.0.0.1:26659".into(),
                    pin: Some([0xab; 20])
                },
                PrivvalAddr::Tcp {
                    addr: "127.0.0.1:26660".into(),
                    pin: None
                },
                PrivvalAddr::Unix("/run/pv.sock".into())
            ]
        );
        assert_eq!(s.identity_key, dir.path().join("data/privval-identity.key"));
        let node = c.validator.unwrap();
        assert!(
            node.active_links.is_empty() && node.standby_links.is_empty(),
            "no key links"
        );
        let err = |a: RunArgs| a.resolve().unwrap_err().to_string();
        let e = err(RunArgs {
            chain_id: None,
            ..signer.clone()
        });
        assert!(e.contains("--chain-id"), "{e}");
        let e = err(RunArgs {
            privval_node: vec![],
            ..signer.clone()
        });
        assert!(e.contains("--privval-node"), "{e}");
        let e = err(RunArgs {
            privval_node: vec!["unix://rel.sock".into()],
            ..signer.clone()
        });
        assert!(e.contains("absolute"), "{e}");
        let e = err(RunArgs {
            privval_node: vec!["tcp://abcd@127.0.0.1:26659".into()],
            ..signer.clone()
        });
        assert!(e.contains("40-hex-digit"), "{e}");
        let e = err(RunArgs {
            validator_home: Some(dir.path().into()),
            ..signer.clone()
        });
        assert!(e.contains("links no key"), "{e}");
        let e = err(RunArgs {
            witness: true,
            command: vec![],
            ..signer.clone()
        });
        assert!(e.contains("--witness"), "{e}");
        let e = err(RunArgs {
            signer: None,
            validator_home: Some(dir.path().into()),
            ..signer
        });
        assert!(e.contains("--signer cometbft"), "{e}");
    }

    #[test]
    fn several_chains_come_from_chains_tables_and_never_share_an_id_or_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys_in(dir.path(), &["a.json", "b.json"]);
        let file = dir.path().join("keyraft.toml");
        let write = |body: &str| {
            std::fs::write(&file, format!("signer = \"cometbft\"\n{body}")).unwrap();
        };
        let table = |chain: &str, key: &Path, node: &str| {
            format!(
                "[[chains]]\nchain-id = \"{chain}\"\nvalidator-key = \"{}\"\nprivval-node = [\"{node}\"]\n",
                key.display()
            )
        };
        let args = RunArgs {
            config: Some(file.clone()),
            validator_home: None,
            data_dir: Some(dir.path().join("data")),
            ..validator_args(dir.path())
        };
        let resolve = |a: &RunArgs| a.clone().merge_file().and_then(RunArgs::resolve);
        write(&format!(
            "{}{}",
            table("a-1", &k[0], "tcp://127.0.0.1:1"),
            table("b-1", &k[1], "tcp://127.0.0.1:2")
        ));
        let s = resolve(&args).unwrap().signer.unwrap();
        let ids: Vec<&str> = s.chain_ids().collect();
        assert_eq!(ids, ["a-1", "b-1"]);
        assert_eq!(s.chain("b-1").unwrap().key, KeySource::File(k[1].clone()));
        assert_eq!(s.chain("b-1").unwrap().node_rpc, None);
        let err = |a: &RunArgs| resolve(a).unwrap_err().to_string();
        // A chain's node-rpc: an http(s) URL, its trailing slash dropped.
        let rpc = |url: &str| format!("node-rpc = \"{url}\"\n");
        write(&format!(
            "{}{}",
            table("a-1", &k[0], "tcp://127.0.0.1:1"),
            table("b-1", &k[1], "tcp://127.0.0.1:2") + &rpc("http://127.0.0.1:26657/")
        ));
        let s = resolve(&args).unwrap().signer.unwrap();
        let b = s.chain("b-1").unwrap().node_rpc.as_deref();
        assert_eq!(b, Some("http://127.0.0.1:26657"));
        write(&(table("a-1", &k[0], "tcp://127.0.0.1:1") + &rpc("127.0.0.1:26657")));
        let e = err(&args);
        assert!(
            e.contains("[[chains]] a-1: ") && e.contains("bad node-rpc"),
            "{e}"
        );
        // Tables and the one-chain flags together: which would win?
        let e = err(&RunArgs {
            chain_id: Some("a-1".into()),
            ..args.clone()
        });
        assert!(e.contains("one or the other"), "{e}");
        write(&format!(
            "{}{}",
            table("a-1", &k[0], "tcp://127.0.0.1:1"),
            table("a-1", &k[1], "tcp://127.0.0.1:2")
        ));
        assert!(err(&args).contains("listed twice"));
        write(&format!(
            "{}{}",
            table("a-1", &k[0], "tcp://127.0.0.1:1"),
            table("b-1", &k[1], "tcp://127.0.0.1:1")
        ));
        assert!(err(&args).contains("each node serves one chain"));
        // The same node, pinned for one chain and not for the other.
        let pinned = format!("tcp://{}@127.0.0.1:1", "ab".repeat(20));
        write(&format!(
            "{}{}",
            table("a-1", &k[0], &pinned),
            table("b-1", &k[1], "tcp://127.0.0.1:1")
        ));
        assert!(err(&args).contains("each node serves one chain"));
        // A chain id CometBFT would not parse is refused here, once.
        write(&table("a 1", &k[0], "tcp://127.0.0.1:1"));
        let e = err(&args);
        assert!(e.contains("bad chain-id 'a 1'"), "{e}");
        write(&table(
            "a-1",
            &dir.path().join("missing.json"),
            "tcp://127.0.0.1:1",
        ));
        let e = err(&args);
        assert!(
            e.contains("[[chains]] a-1") && e.contains("does not exist"),
            "{e}"
        );
        write("[[chains]]\nchain-id = \"a-1\"\nkey = \"x\"\n");
        assert!(err(&args).contains("unknown field"));
    }

    #[test]
    fn the_protocol_flags_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys_in(dir.path(), &["priv_validator_key.json"]);
        let args = |version, sign_bytes| RunArgs {
            signer: Some(SignerKind::Cometbft),
            chain_id: Some("cosmoshub-4".into()),
            validator_key: Some(k[0].clone()),
            privval_node: vec!["tcp://127.0.0.1:26659".into()],
            validator_home: None,
            data_dir: Some(dir.path().join("data")),
            protocol_version: version,
            sign_bytes,
            ..validator_args(dir.path())
        };
        use ProtocolVersion::{Either, V0_38, V1};
        // (version, sign bytes) -> refused with this, or taken
        let table: [(Option<ProtocolVersion>, bool, Option<&str>); 5] = [
            (None, false, None),
            (Some(V1), true, None),
            (Some(Either), true, None),
            (
                Some(V0_38),
                true,
                Some("sign-bytes is a CometBFT 1.x request"),
            ),
            (None, true, Some("sign-bytes is a CometBFT 1.x request")),
        ];
        for (version, bytes, refused) in table {
            match (refused, args(version, bytes).resolve()) {
                (None, Ok(c)) => {
                    let p = c.signer.unwrap().chains[0].protocol;
                    assert_eq!(
                        (p.version, p.sign_bytes),
                        (version.unwrap_or_default(), bytes)
                    );
                }
                (Some(why), Err(e)) => assert!(e.to_string().contains(why), "{e}"),
                (want, got) => panic!("{version:?} {bytes}: want {want:?}, got {got:?}"),
            }
        }
    }
}
