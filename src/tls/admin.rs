//! The admin TCP port's mTLS, both ends: the coordinator accepts only
//! client certificates that the cluster CA made with the admin role
//! (`keyraft certs admin`), and the CLI dials a member it knows by address
//! only, accepting any member certificate of the cluster.
//!
//! Owns: the admin-role check and the CLI's TLS connector. Must not: run
//! commands; [`crate::admin`] does, after this has said who is calling.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::{Request, Status};

use super::{cert_role, dns_names, read, Role, TlsError};

/// The operator behind an admin TCP request: the common name of its
/// admin certificate, put in the request's extensions by [`authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator(pub String);

/// Interceptor of the admin TCP port: the client certificate (already
/// checked against the cluster CA by the handshake) must carry the admin
/// role; a member's certificate is refused.
pub fn authenticate(mut req: Request<()>) -> Result<Request<()>, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    if cert_role(leaf) != Some(Role::Admin) {
        tracing::warn!("admin port: refused a client certificate without the admin role");
        return Err(Status::permission_denied(
            "this client certificate carries no admin role: make one with `keyraft certs admin`",
        ));
    }
    let name = super::cert_info_der(leaf)
        .map(|i| i.subject)
        .unwrap_or_default();
    req.extensions_mut().insert(Operator(name));
    Ok(req)
}

/// What the CLI presents to the admin TCP port: a directory with
/// `ca.pem`, `admin.pem` and `admin.key`.
pub struct AdminCert {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl AdminCert {
    pub fn load(dir: &Path) -> Result<AdminCert, TlsError> {
        let key_path: PathBuf = dir.join("admin.key");
        crate::config::check_private(&key_path).map_err(|e| TlsError::Invalid(e.to_string()))?;
        Ok(AdminCert {
            ca: read(&dir.join("ca.pem"))?,
            cert: read(&dir.join("admin.pem"))?,
            key: read(&key_path)?,
        })
    }

    /// The rustls client configuration: this admin certificate, and any
    /// member of the cluster as the server.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            super::roots_of(&self.ca)?,
            provider.clone(),
        )
        .build()
        .map_err(|e| bad("ca.pem", &e))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("admin.pem", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad("admin.key", &e))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyMember { inner }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("admin.pem and admin.key", &e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// Accepts a server certificate that chains to the cluster CA, names one
/// node (`node-N.keyraft`) and carries a member role: the CLI is given an
/// address, not a node id.
#[derive(Debug)]
struct AnyMember {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyMember {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: &str| rustls::Error::General(why.to_string());
        if !matches!(cert_role(end_entity), Some(Role::Validator | Role::Witness)) {
            return Err(refuse("the server's certificate is not a keyraft member's"));
        }
        let names = dns_names(end_entity).unwrap_or_default();
        let node = names
            .iter()
            .find(|n| {
                n.strip_prefix("node-")
                    .and_then(|r| r.strip_suffix(".keyraft"))
                    .is_some_and(|id| id.parse::<u64>().is_ok())
            })
            .ok_or_else(|| refuse("the server's certificate names no keyraft node"))?;
        let name = ServerName::try_from(node.clone()).map_err(|e| refuse(&e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
