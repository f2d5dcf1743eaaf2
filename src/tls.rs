//! Peer security: mTLS configuration for the peer port, the check that a
//! caller's certificate belongs to the node id it claims, and `keyraft certs`.
//!
//! Owns: the naming rule (node N's certificate carries the DNS name
//! `node-N.keyraft`), loading PEM files, the peer port's TLS acceptor (which
//! `reload` swaps for renewed certificates without a restart), reading a
//! certificate's names and expiry, and creating a cluster CA and node
//! certificates. Must not: decide anything about Raft; it only answers "who is
//! calling" and "is this really node N".

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
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
    /// node and no other (no wildcard), signed by the CA in `ca.pem` and
    /// valid now, for both server and client use; and the key matching it.
    /// A renewal caught half-written fails here and changes nothing.
    pub fn load_for(paths: &TlsPaths, id: NodeId) -> Result<TlsMaterial, TlsError> {
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
        m.check_chain(&leaf, id)
            .map_err(|e| TlsError::Invalid(format!("{cert}: {e}")))?;
        m.rustls_server()?;
        Ok(m)
    }

    /// The cluster CA as rustls's trust anchors.
    fn roots(&self) -> Result<std::sync::Arc<rustls::RootCertStore>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |e: &dyn std::fmt::Display| TlsError::Invalid(format!("CA certificate: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca) {
            roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        Ok(std::sync::Arc::new(roots))
    }

    /// The certificate chains to `ca.pem` and is valid now, as a server
    /// named `node-ID.keyraft` and as a client.
    fn check_chain(&self, leaf: &CertificateDer<'_>, id: NodeId) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::UnixTime;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let roots = self.roots().map_err(|e| e.to_string())?;
        let now = UnixTime::now();
        let as_client = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        as_client
            .verify_client_cert(leaf, &[], now)
            .map_err(|e| format!("not valid with ca.pem as a client certificate: {e}"))?;
        let as_server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(node_name(id)).map_err(|e| e.to_string())?;
        as_server
            .verify_server_cert(leaf, &[], &name, &[], now)
            .map_err(|e| format!("not valid with ca.pem as a server certificate: {e}"))?;
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
    /// DNS names and IP addresses it is valid for.
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
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| TlsError::Invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
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
                GeneralName::DNSName(d) => names.push(d.to_string()),
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

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The authenticated sender of a peer request, put in the request's
/// extensions by [`authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerId(pub NodeId);

/// Interceptor of every peer service: reads the claimed node id and, with
/// TLS, checks that the client certificate is node `id`'s.
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
            if !cert_names_node(leaf, claimed) {
                tracing::warn!(
                    claimed,
                    "refused a peer whose certificate is not for the node id it claims"
                );
                return Err(Status::permission_denied(format!(
                    "client certificate is not node {claimed}'s"
                )));
            }
        }
        req.extensions_mut().insert(PeerId(claimed));
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
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Some(names)
}

/// Whether the certificate is node `id`'s and no other's: it names
/// `node-ID.keyraft`, no other `.keyraft` name and no wildcard (a
/// `*.keyraft` certificate would pass for every node).
pub fn cert_names_node(der: &CertificateDer<'_>, id: NodeId) -> bool {
    match dns_names(der) {
        Some(names) if names.iter().all(|n| own_name_only(n, id)) => {}
        _ => return false,
    }
    cert_valid_for_node(der, id)
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
    req.extensions()
        .get::<PeerId>()
        .map(|p| p.0)
        .ok_or_else(|| Status::unauthenticated("unauthenticated peer"))
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "keyraft cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// `keyraft certs ca --out DIR`: writes `ca.pem` and `ca.key` (0600).
pub fn create_ca(out: &Path) -> Result<Vec<PathBuf>, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let files = [
        (out.join("ca.pem"), cert.pem(), 0o644),
        (out.join("ca.key"), key.serialize_pem(), 0o600),
    ];
    write_all_new(&files)
}

/// `keyraft certs node`: a certificate for node `id` signed by the CA in
/// `ca_dir`, valid for `node-ID.keyraft` plus the given names and addresses.
/// Writes `node.pem`, `node.key` (0600) and a copy of `ca.pem` into `out`.
pub fn create_node(
    ca_dir: &Path,
    id: NodeId,
    dns: &[String],
    ips: &[String],
    days: Option<u32>,
    out: &Path,
) -> Result<Vec<PathBuf>, TlsError> {
    if id == 0 {
        return Err(TlsError::Invalid("node ids start at 1".into()));
    }
    let ca_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.pem"))?).into_owned();
    let ca_key_path = ca_dir.join("ca.key");
    crate::config::check_private(&ca_key_path).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let ca_key = KeyPair::from_pem(&String::from_utf8_lossy(&read(&ca_key_path)?))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    for ip in ips {
        ip.parse::<std::net::IpAddr>()
            .map_err(|_| TlsError::Invalid(format!("bad --ip '{ip}'")))?;
    }
    if let Some(bad) = dns.iter().find(|d| !own_name_only(d, id)) {
        return Err(TlsError::Invalid(format!(
            "--dns {bad}: a node certificate names its own node only (node-{id}.keyraft is always in it): no wildcards, no other node's name"
        )));
    }
    let mut names = vec![node_name(id)];
    names.extend(dns.iter().cloned());
    names.extend(ips.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, node_name(id));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = match days {
        // From a day ago, so that a clock a little behind accepts it.
        Some(d) => {
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::days(1);
            now + time::Duration::days(i64::from(d))
        }
        None => rcgen::date_time_ymd(2124, 1, 1),
    };
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let files = [
        (out.join("node.pem"), cert.pem(), 0o644),
        (out.join("node.key"), key.serialize_pem(), 0o600),
        (out.join("ca.pem"), ca_pem, 0o644),
    ];
    write_all_new(&files)
}

/// Writes every file or none: refuses if any exists already.
fn write_all_new(files: &[(PathBuf, String, u32)]) -> Result<Vec<PathBuf>, TlsError> {
    for (path, _, _) in files {
        if path.exists() {
            return Err(TlsError::Invalid(format!(
                "{} exists already; not overwriting it",
                path.display()
            )));
        }
    }
    for (path, body, mode) in files {
        let err = |source| TlsError::Write {
            path: path.display().to_string(),
            source,
        };
        crate::durable::create_new(path, body.as_bytes(), *mode).map_err(err)?;
    }
    Ok(files.iter().map(|(p, _, _)| p.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_only_its_node() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let out = dir.path().join("n2");
        create_node(
            dir.path(),
            2,
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
        assert_eq!(info.names, ["node-2.keyraft", "host2", "127.0.0.1"]);
        let days = info.expires_in() / 86_400;
        assert!((29..=30).contains(&days), "expires in {days} days");
        assert!(
            create_node(dir.path(), 2, &[], &[], None, &out).is_err(),
            "overwrote an existing node key"
        );
    }

    #[test]
    fn a_node_certificate_names_one_node_and_peers_accept_no_other() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        for bad in [
            "*.keyraft",
            "node-3.keyraft",
            "NODE-3.KEYRAFT.",
            "*.example.com",
            "*",
        ] {
            let out = dir.path().join(format!("n-{}", bad.replace('*', "w")));
            let e = create_node(dir.path(), 2, &[bad.into()], &[], None, &out)
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
}
