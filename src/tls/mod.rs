//! Peer and operator security: mTLS for the peer port and the admin TCP
//! port, the check that a caller's certificate belongs to the node id it
//! claims and what role the cluster CA gave it, and `keyraft certs`.
//!
//! - [`issue`]: making the CA and the certificates it signs.
//! - [`admin`]: the admin TCP port's client check and the CLI's end of it.
//! - [`incoming`]: a TLS port's connections, each handshake apart.
//!
//! Owns: the naming rule (node N's certificate carries the DNS name
//! `node-N.keyraft`, and nothing names two nodes), the role rule (each
//! certificate carries exactly one `keyraft:role:*` URI: validator,
//! witness or admin), loading PEM files, the TLS acceptor (which `reload`
//! swaps for renewed certificates without a restart), and reading a
//! certificate's names and expiry. Must not: decide anything about Raft or
//! signing; it only answers "who is calling, in which role".

pub mod admin;
mod incoming;
mod issue;

use std::path::Path;

pub use incoming::incoming;
pub use issue::{create_admin, create_ca, create_node, renew, CA_DAYS, LEAF_DAYS};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use crate::config::{NodeId, TlsPaths};

/// Metadata header in which every peer request names its sender.
pub const NODE_HEADER: &str = "x-keyraft-node";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Why a node certificate does not chain to the cluster's CA as both
/// ends of a peer connection need.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("not valid with ca.pem as a client certificate: {0}")]
    AsClient(rustls::Error),
    #[error("not valid with ca.pem as a server certificate: {0}")]
    AsServer(rustls::Error),
    #[error("{0}")]
    Roots(#[from] Box<TlsError>),
    #[error("{0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Name(#[from] rustls::pki_types::InvalidDnsNameError),
}

/// What the cluster CA lets a certificate's holder do, written into it as
/// a URI name (`keyraft:role:validator`, `…:witness`, `…:admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A member that may hold the validator key: it may forward operator
    /// commands and (signer mode) its sentries' sign requests.
    Validator,
    /// A member that only votes: never signs, never speaks for the operator.
    Witness,
    /// An operator's client certificate for the admin TCP port; no member.
    Admin,
}

impl Role {
    const PREFIX: &'static str = "keyraft:role:";

    pub fn uri(self) -> &'static str {
        match self {
            Role::Validator => "keyraft:role:validator",
            Role::Witness => "keyraft:role:witness",
            Role::Admin => "keyraft:role:admin",
        }
    }

    pub fn name(self) -> &'static str {
        &self.uri()[Self::PREFIX.len()..]
    }
}

/// The one role a certificate carries; `None` for none, an unknown one, or
/// more than one (a certificate is never two things).
pub fn cert_role(der: &[u8]) -> Option<Role> {
    names_and_role(der)?.1
}

/// A certificate's DNS names and its one role, from one parse (a peer's
/// certificate is checked at every request); `None` if unreadable.
fn names_and_role(der: &[u8]) -> Option<(Vec<String>, Option<Role>)> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let (mut names, mut roles) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::URI(u) if u.starts_with(Role::PREFIX) => roles.push(
                    [Role::Validator, Role::Witness, Role::Admin]
                        .into_iter()
                        .find(|r| r.uri() == *u),
                ),
                _ => {}
            }
        }
    }
    let role = match roles.as_slice() {
        [Some(one)] => Some(*one),
        _ => None,
    };
    Some((names, role))
}

/// The certificates of a `ca.pem` as rustls's trust anchors.
pub(crate) fn roots_of(ca_pem: &[u8]) -> Result<std::sync::Arc<rustls::RootCertStore>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| TlsError::Invalid(format!("CA certificate: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    Ok(std::sync::Arc::new(roots))
}

/// The DNS name that identifies node `id` in its certificate.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.keyraft")
}

/// PEM material of one node.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsMaterial {
    pub fn load(paths: &TlsPaths) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial {
            ca: read(&paths.ca)?,
            cert: read(&paths.cert)?,
            key: read(&paths.key)?,
        })
    }

    /// Loads and checks the material of node `id`, as a start or a reload
    /// needs it: the key private to its owner; the certificate naming this
    /// node and no other (no wildcard), carrying the role this node runs in
    /// (`witness` or not), signed by the CA in `ca.pem` and valid now, for
    /// both server and client use; and the key matching it. A renewal
    /// caught half-written fails here and changes nothing.
    pub fn load_for(paths: &TlsPaths, id: NodeId, witness: bool) -> Result<TlsMaterial, TlsError> {
        crate::config::check_private(&paths.key).map_err(|e| TlsError::Invalid(e.to_string()))?;
        let m = TlsMaterial::load(paths)?;
        use rustls::pki_types::pem::PemObject;
        let cert = paths.cert.display();
        let leaf = CertificateDer::from_pem_slice(&m.cert)
            .map_err(|e| TlsError::Invalid(format!("{cert}: not a PEM certificate: {e}")))?;
        let foreign = cert_info(&m.cert)?
            .names
            .into_iter()
            .filter(|n| !own_name_only(n, id))
            .collect::<Vec<_>>();
        let names_it = cert_info(&m.cert)?.names.contains(&node_name(id));
        if !names_it || !cert_valid_for_node(&leaf, id) {
            return Err(TlsError::Invalid(format!(
                "{cert} is not a certificate for node {id} (it must name {})",
                node_name(id)
            )));
        }
        if !foreign.is_empty() || !cert_names_node(&leaf, id) {
            return Err(TlsError::Invalid(format!(
                "{cert} also names {}: a node certificate must name its own node only (no wildcards)",
                foreign.join(", ")
            )));
        }
        let wanted = if witness {
            Role::Witness
        } else {
            Role::Validator
        };
        let runs_as = if witness {
            "runs as a witness"
        } else {
            "runs without --witness"
        };
        match cert_role(&leaf) {
            Some(r) if r == wanted => {}
            Some(r) => {
                return Err(TlsError::Invalid(format!(
                    "{cert} carries the {} role but this node {runs_as}: make its certificate with `keyraft certs node --id {id}{}`",
                    r.name(),
                    if witness { " --witness" } else { "" }
                )))
            }
            None => {
                return Err(TlsError::Invalid(format!(
                    "{cert} carries no keyraft role (made before roles existed, or by other means): make a new one with `keyraft certs node --id {id}{}`",
                    if witness { " --witness" } else { "" }
                )))
            }
        }
        m.check_chain(&leaf, id)
            .map_err(|e| TlsError::Invalid(format!("{cert}: {e}")))?;
        m.rustls_server()?;
        Ok(m)
    }

    /// The cluster CA as rustls's trust anchors.
    fn roots(&self) -> Result<std::sync::Arc<rustls::RootCertStore>, TlsError> {
        roots_of(&self.ca)
    }

    /// The certificate chains to `ca.pem` and is valid now, as a server
    /// named `node-ID.keyraft` and as a client.
    fn check_chain(&self, leaf: &CertificateDer<'_>, id: NodeId) -> Result<(), ChainError> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::UnixTime;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let roots = self.roots().map_err(Box::new)?;
        let now = UnixTime::now();
        let as_client = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()?;
        as_client
            .verify_client_cert(leaf, &[], now)
            .map_err(ChainError::AsClient)?;
        let as_server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        let name = ServerName::try_from(node_name(id))?;
        as_server
            .verify_server_cert(leaf, &[], &name, &[], now)
            .map_err(ChainError::AsServer)?;
        Ok(())
    }

    /// The node certificate's and the CA's names and expiry.
    pub fn info(&self) -> Result<(CertInfo, CertInfo), TlsError> {
        Ok((cert_info(&self.cert)?, cert_info(&self.ca)?))
    }

    /// The peer port's rustls configuration: this node's certificate, client
    /// certificates required and checked against the cluster CA, HTTP/2.
    fn rustls_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| bad("client verifier", &e))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("node certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad("node key", &e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad("node certificate and key", &e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }

    /// Client side towards node `peer`: its certificate must name it.
    pub fn client(&self, peer: NodeId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(node_name(peer))
            .timeout(std::time::Duration::from_secs(3))
    }
}

/// What `keyraft certs show` and the expiry metric report of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name.
    pub subject: String,
    /// DNS names and IP addresses it is valid for, and its role URI.
    pub names: Vec<String>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// The same, as the certificate spells it.
    pub not_after_text: String,
}

impl CertInfo {
    /// Seconds from now until the certificate expires (negative once it has).
    pub fn expires_in(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after - now
    }
}

/// Reads the first certificate of a PEM file's contents.
pub fn cert_info(pem: &[u8]) -> Result<CertInfo, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| TlsError::Invalid(format!("not a PEM certificate: {e}")))?;
    cert_info_der(&pem.contents)
}

/// [`cert_info`] of a DER certificate.
pub fn cert_info_der(der: &[u8]) -> Result<CertInfo, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    let subject = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) | GeneralName::URI(d) => names.push(d.to_string()),
                GeneralName::IPAddress(ip) => names.push(match ip.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                        .to_string(),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                        .to_string(),
                    _ => format!("{ip:?}"),
                }),
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after;
    Ok(CertInfo {
        subject,
        names,
        not_after: not_after.timestamp(),
        not_after_text: not_after.to_string(),
    })
}

/// [`cert_info`] of a file.
pub fn cert_file_info(path: &Path) -> Result<CertInfo, TlsError> {
    cert_info(&read(path)?).map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))
}

/// The peer port's TLS acceptor, swapped whole by [`ServerTls::reload`].
pub struct ServerTls {
    acceptor: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
}

impl ServerTls {
    pub fn new(m: &TlsMaterial) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            acceptor: std::sync::RwLock::new(acceptor(m)?),
        })
    }

    /// New connections use `m` from now on; open ones keep theirs.
    pub fn reload(&self, m: &TlsMaterial) -> Result<(), TlsError> {
        let next = acceptor(m)?;
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn acceptor(m: &TlsMaterial) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        m.rustls_server()?,
    )))
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The authenticated sender of a peer request, put in the request's
/// extensions by [`authenticate`]: its node id and, with TLS, the role its
/// certificate carries (`None` under `--insecure`, where nothing is proven).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerId(pub NodeId, pub Option<Role>);

/// Interceptor of every peer service: reads the claimed node id and, with
/// TLS, checks that the client certificate is node `id`'s and a member's
/// (validator or witness role; an admin certificate is no member).
pub fn authenticate(tls: bool) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let claimed: NodeId = req
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Status::unauthenticated("missing x-keyraft-node header"))?;
        if tls {
            let certs = req
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
            let leaf = certs
                .first()
                .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
            let (names, role) = names_and_role(leaf).unwrap_or_default();
            if !names_node(&names, leaf, claimed) {
                tracing::warn!(
                    claimed,
                    "refused a peer whose certificate is not for the node id it claims"
                );
                return Err(Status::permission_denied(format!(
                    "client certificate is not node {claimed}'s"
                )));
            }
            let role = match role {
                Some(r @ (Role::Validator | Role::Witness)) => r,
                _ => {
                    tracing::warn!(
                        claimed,
                        "refused a peer whose certificate carries no member role"
                    );
                    return Err(Status::permission_denied(
                        "client certificate carries no member role (validator or witness)",
                    ));
                }
            };
            req.extensions_mut().insert(PeerId(claimed, Some(role)));
            return Ok(req);
        }
        req.extensions_mut().insert(PeerId(claimed, None));
        Ok(req)
    }
}

/// Whether a name in node `id`'s certificate is one it may carry: no
/// wildcard, and no `.keyraft` name but its own.
fn own_name_only(name: &str, id: NodeId) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    !n.contains('*') && (!n.ends_with(".keyraft") || n == node_name(id))
}

/// The DNS names a DER certificate carries (none if it cannot be read).
fn dns_names(der: &CertificateDer<'_>) -> Option<Vec<String>> {
    names_and_role(der).map(|(names, _)| names)
}

/// Whether the certificate is node `id`'s and no other's: it names
/// `node-ID.keyraft`, no other `.keyraft` name and no wildcard (a
/// `*.keyraft` certificate would pass for every node).
pub fn cert_names_node(der: &CertificateDer<'_>, id: NodeId) -> bool {
    dns_names(der).is_some_and(|names| names_node(&names, der, id))
}

/// [`cert_names_node`] given the certificate's DNS names.
fn names_node(names: &[String], der: &CertificateDer<'_>, id: NodeId) -> bool {
    !names.is_empty() && names.iter().all(|n| own_name_only(n, id)) && cert_valid_for_node(der, id)
}

/// Whether the certificate is valid for node `id`'s name.
fn cert_valid_for_node(der: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The sender put in the extensions by [`authenticate`].
pub fn peer_of<T>(req: &Request<T>) -> Result<NodeId, Status> {
    caller_of(req).map(|p| p.0)
}

/// The sender and its certificate's role.
pub fn caller_of<T>(req: &Request<T>) -> Result<PeerId, Status> {
    req.extensions()
        .get::<PeerId>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("unauthenticated peer"))
}

/// Refuses a member whose certificate does not carry the validator role:
/// only a host that may hold the key may `act` (speak for the operator,
/// forward sign requests). Under `--insecure` nothing is proven, and
/// nothing is refused here either.
pub fn require_validator<T>(req: &Request<T>, act: &str) -> Result<NodeId, Status> {
    let PeerId(id, role) = caller_of(req)?;
    match role {
        Some(Role::Validator) | None => Ok(id),
        Some(r) => {
            tracing::warn!(
                peer = id,
                role = r.name(),
                "refused: a {} may not {act}",
                r.name()
            );
            Err(Status::permission_denied(format!(
                "node {id}'s certificate carries the {} role: a {} may not {act}",
                r.name(),
                r.name()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair};

    #[test]
    fn node_certificate_names_only_its_node() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), CA_DAYS).unwrap();
        let out = dir.path().join("n2");
        create_node(
            dir.path(),
            2,
            false,
            &["host2".into()],
            &["127.0.0.1".into()],
            Some(30),
            &out,
        )
        .unwrap();
        let pem = std::fs::read(out.join("node.pem")).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert!(cert_names_node(&der, 2));
        assert!(!cert_names_node(&der, 3));
        let info = cert_file_info(&out.join("node.pem")).unwrap();
        assert_eq!(info.subject, "node-2.keyraft");
        assert_eq!(
            info.names,
            [
                "node-2.keyraft",
                "host2",
                "127.0.0.1",
                "keyraft:role:validator"
            ]
        );
        assert_eq!(cert_role(&der), Some(Role::Validator));
        let days = info.expires_in() / 86_400;
        assert!((29..=30).contains(&days), "expires in {days} days");
        assert!(
            create_node(dir.path(), 2, false, &[], &[], None, &out).is_err(),
            "overwrote an existing node key"
        );
    }

    #[test]
    fn a_node_certificate_names_one_node_and_peers_accept_no_other() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), CA_DAYS).unwrap();
        for bad in [
            "*.keyraft",
            "node-3.keyraft",
            "NODE-3.KEYRAFT.",
            "*.example.com",
            "*",
        ] {
            let out = dir.path().join(format!("n-{}", bad.replace('*', "w")));
            let e = create_node(dir.path(), 2, false, &[bad.into()], &[], None, &out)
                .expect_err(bad)
                .to_string();
            assert!(e.contains("its own node only"), "{bad}: {e}");
            assert!(!out.join("node.key").exists(), "{bad}: wrote a key");
        }
        // Made with the CA by other means: peers still take it for no node.
        use rustls::pki_types::pem::PemObject;
        let ca_pem = String::from_utf8(std::fs::read(dir.path().join("ca.pem")).unwrap()).unwrap();
        let ca_key = KeyPair::from_pem(
            &String::from_utf8(std::fs::read(dir.path().join("ca.key")).unwrap()).unwrap(),
        )
        .unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        for names in [
            vec!["*.keyraft".to_string()],
            vec!["node-2.keyraft".to_string(), "node-3.keyraft".to_string()],
            vec!["node-2.keyraft".to_string(), "*.keyraft".to_string()],
        ] {
            let p = CertificateParams::new(names.clone()).unwrap();
            let key = KeyPair::generate().unwrap();
            let pem = p.signed_by(&key, &issuer).unwrap().pem();
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            for id in [2, 3] {
                assert!(!cert_names_node(&der, id), "{names:?} passed as node {id}");
            }
        }
    }

    #[test]
    fn each_certificate_carries_one_role_and_a_node_starts_only_with_its_own() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), CA_DAYS).unwrap();
        let der = |p: &Path| CertificateDer::from_pem_file(p).unwrap();
        let (v, w, a) = (
            dir.path().join("v"),
            dir.path().join("w"),
            dir.path().join("a"),
        );
        create_node(dir.path(), 1, false, &[], &[], None, &v).unwrap();
        create_node(dir.path(), 3, true, &[], &[], None, &w).unwrap();
        create_admin(dir.path(), "alice", Some(30), &a).unwrap();
        assert_eq!(cert_role(&der(&v.join("node.pem"))), Some(Role::Validator));
        assert_eq!(cert_role(&der(&w.join("node.pem"))), Some(Role::Witness));
        let admin = der(&a.join("admin.pem"));
        assert_eq!(cert_role(&admin), Some(Role::Admin));
        for id in [1, 2, 3] {
            assert!(
                !cert_names_node(&admin, id),
                "an admin certificate passed as node {id}"
            );
        }
        assert!(create_admin(dir.path(), "*", None, &dir.path().join("b")).is_err());
        let paths = |d: &Path| TlsPaths {
            ca: d.join("ca.pem"),
            cert: d.join("node.pem"),
            key: d.join("node.key"),
        };
        assert!(TlsMaterial::load_for(&paths(&v), 1, false).is_ok());
        assert!(TlsMaterial::load_for(&paths(&w), 3, true).is_ok());
        let e = TlsMaterial::load_for(&paths(&w), 3, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("witness role") && e.contains("--witness"), "{e}");
        let e = TlsMaterial::load_for(&paths(&v), 1, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("validator role"), "{e}");
        // Signed by the CA but made without a role, or with two: no role.
        let issuer = || {
            let pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
            let key = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();
            Issuer::from_ca_cert_pem(&pem, KeyPair::from_pem(&key).unwrap()).unwrap()
        };
        let mut two = CertificateParams::new(vec!["node-2.keyraft".to_string()]).unwrap();
        for r in [Role::Validator, Role::Admin] {
            two.subject_alt_names
                .push(rcgen::SanType::URI(r.uri().try_into().unwrap()));
        }
        let none = CertificateParams::new(vec!["node-2.keyraft".to_string()]).unwrap();
        for p in [two, none] {
            let pem = p
                .signed_by(&KeyPair::generate().unwrap(), &issuer())
                .unwrap()
                .pem();
            assert_eq!(
                cert_role(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()),
                None
            );
        }
    }
}
