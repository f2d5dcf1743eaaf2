//! `keyraft certs ca|node|admin`: making a cluster CA and the certificates
//! it signs, each carrying one role.
//!
//! Owns: what goes into a certificate (names, role, key usages, validity)
//! and writing every file of a set or none. Must not: read or trust a
//! certificate; [`super`] does, with the same naming and role rules.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{node_name, own_name_only, read, Role, TlsError};
use crate::config::NodeId;

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
    make_dir(out)?;
    let files = [
        (out.join("ca.pem"), cert.pem(), 0o644),
        (out.join("ca.key"), key.serialize_pem(), 0o600),
    ];
    write_all_new(&files)
}

/// The CA in `ca_dir` as an issuer, and its certificate's PEM.
fn issuer(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), TlsError> {
    let ca_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.pem"))?).into_owned();
    let ca_key_path = ca_dir.join("ca.key");
    crate::config::check_private(&ca_key_path).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let ca_key = KeyPair::from_pem(&String::from_utf8_lossy(&read(&ca_key_path)?))?;
    Ok((Issuer::from_ca_cert_pem(&ca_pem, ca_key)?, ca_pem))
}

/// A leaf certificate's parameters: `names`, common name `cn`, the role
/// URI, and validity (to 2124, or `days` from now).
fn leaf_params(
    names: Vec<String>,
    cn: &str,
    role: Role,
    usages: Vec<ExtendedKeyUsagePurpose>,
    days: Option<u32>,
) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let uri = rcgen::string::Ia5String::try_from(role.uri())?;
    p.subject_alt_names.push(SanType::URI(uri));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = usages;
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
    Ok(p)
}

/// `keyraft certs node`: a certificate for node `id` signed by the CA in
/// `ca_dir`, valid for `node-ID.keyraft` plus the given names and addresses,
/// with the role of a validator host or (`witness`) of a witness.
/// Writes `node.pem`, `node.key` (0600) and a copy of `ca.pem` into `out`.
pub fn create_node(
    ca_dir: &Path,
    id: NodeId,
    witness: bool,
    dns: &[String],
    ips: &[String],
    days: Option<u32>,
    out: &Path,
) -> Result<Vec<PathBuf>, TlsError> {
    if id == 0 {
        return Err(TlsError::Invalid("node ids start at 1".into()));
    }
    for ip in ips {
        ip.parse::<std::net::IpAddr>()
            .map_err(|_| TlsError::Invalid(format!("bad --ip '{ip}'")))?;
    }
    if let Some(bad) = dns.iter().find(|d| !own_name_only(d, id)) {
        return Err(TlsError::Invalid(format!(
            "--dns {bad}: a node certificate names its own node only (node-{id}.keyraft is always in it): no wildcards, no other node's name"
        )));
    }
    let (issuer, ca_pem) = issuer(ca_dir)?;
    let mut names = vec![node_name(id)];
    names.extend(dns.iter().cloned());
    names.extend(ips.iter().cloned());
    let role = if witness {
        Role::Witness
    } else {
        Role::Validator
    };
    let usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let p = leaf_params(names, &node_name(id), role, usages, days)?;
    sign_and_write(p, &issuer, ca_pem, out, "node")
}

/// `keyraft certs admin`: an operator's client certificate for the admin
/// TCP port, named `name` and carrying the admin role; no node name, so no
/// peer takes it for a member. Writes `admin.pem`, `admin.key` (0600) and a
/// copy of `ca.pem` into `out`.
pub fn create_admin(
    ca_dir: &Path,
    name: &str,
    days: Option<u32>,
    out: &Path,
) -> Result<Vec<PathBuf>, TlsError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(fine) {
        return Err(TlsError::Invalid(format!(
            "bad --name '{name}': 1 to 64 letters, digits, '-', '_', '.' or '@' (who holds it, for the logs)"
        )));
    }
    let (issuer, ca_pem) = issuer(ca_dir)?;
    let usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let p = leaf_params(Vec::new(), name, Role::Admin, usages, days)?;
    sign_and_write(p, &issuer, ca_pem, out, "admin")
}

/// Signs `p` with a new key and writes `STEM.pem`, `STEM.key` (0600) and
/// the CA's `ca.pem` into `out`, all or none.
fn sign_and_write(
    p: CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
    ca_pem: String,
    out: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>, TlsError> {
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    make_dir(out)?;
    let files = [
        (out.join(format!("{stem}.pem")), cert.pem(), 0o644),
        (out.join(format!("{stem}.key")), key.serialize_pem(), 0o600),
        (out.join("ca.pem"), ca_pem, 0o644),
    ];
    write_all_new(&files)
}

fn make_dir(out: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.display().to_string(),
        source,
    })
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
