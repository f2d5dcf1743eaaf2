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

/// How long a node's or an operator's certificate lives without `--days`.
pub const LEAF_DAYS: u32 = 365;
/// How long a cluster CA lives without `--days`.
pub const CA_DAYS: u32 = 3650;

/// Validity from a day ago (a clock a little behind still accepts it) to
/// `days` from now.
fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn ca_params(days: u32) -> Result<CertificateParams, TlsError> {
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
    validity(&mut p, days);
    Ok(p)
}

/// `keyraft certs ca --out DIR`: writes `ca.pem` and `ca.key` (0600),
/// valid for `days`.
pub fn create_ca(out: &Path, days: u32) -> Result<Vec<PathBuf>, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(days)?.self_signed(&key)?;
    make_dir(out)?;
    let files = [
        (out.join("ca.pem"), cert.pem(), 0o644),
        (out.join("ca.key"), key.serialize_pem(), 0o600),
    ];
    write_all_new(&files)
}

/// The CA in `ca_dir`: an issuer, its certificate's PEM, and its end.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    not_after: super::CertInfo,
}

impl Ca {
    fn open(ca_dir: &Path) -> Result<Ca, TlsError> {
        let pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.pem"))?).into_owned();
        let key_path = ca_dir.join("ca.key");
        crate::config::check_private(&key_path).map_err(|e| TlsError::Invalid(e.to_string()))?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&read(&key_path)?))?;
        Ok(Ca {
            issuer: Issuer::from_ca_cert_pem(&pem, key)?,
            not_after: super::cert_info(pem.as_bytes())?,
            pem,
        })
    }

    /// `days` ([`LEAF_DAYS`] if `None`), refused if a certificate that
    /// long would outlive this CA: no peer would trust it past the CA's
    /// end, so its stated expiry would be a lie.
    fn leaf_days(&self, days: Option<u32>) -> Result<u32, TlsError> {
        let want = days.unwrap_or(LEAF_DAYS);
        let secs_left = self.not_after.expires_in();
        let left = secs_left.div_euclid(86_400);
        if i64::from(want) * 86_400 > secs_left {
            return Err(TlsError::Invalid(format!(
                "{want} days would outlive the CA (valid until {}, {left} days from now): pass --days {} or less, or make a new CA",
                self.not_after.not_after_text,
                left.max(0)
            )));
        }
        Ok(want)
    }
}

/// A leaf certificate's parameters: `names`, common name `cn`, the role
/// URI, valid for `days` from now.
fn leaf_params(
    names: Vec<String>,
    cn: &str,
    role: Role,
    days: u32,
) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let uri = rcgen::string::Ia5String::try_from(role.uri())?;
    p.subject_alt_names.push(SanType::URI(uri));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A member is both ends of peer connections; an operator only a client.
    p.extended_key_usages = match role {
        Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Role::Validator | Role::Witness => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
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
    let ca = Ca::open(ca_dir)?;
    let days = ca.leaf_days(days)?;
    let mut names = vec![node_name(id)];
    names.extend(dns.iter().cloned());
    names.extend(ips.iter().cloned());
    let role = if witness {
        Role::Witness
    } else {
        Role::Validator
    };
    let p = leaf_params(names, &node_name(id), role, days)?;
    let (cert, key) = sign(p, &ca)?;
    make_dir(out)?;
    write_all_new(&set(out, "node", cert, key, &ca))
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
    let ca = Ca::open(ca_dir)?;
    let p = leaf_params(Vec::new(), name, Role::Admin, ca.leaf_days(days)?)?;
    let (cert, key) = sign(p, &ca)?;
    make_dir(out)?;
    write_all_new(&set(out, "admin", cert, key, &ca))
}

/// `keyraft certs renew`: the certificate in `dir` (`node.pem`, else
/// `admin.pem`) again, from the same CA, with the same name, addresses and
/// role, a new key, and `days` of life. The old pair is kept as
/// `STEM.pem.old` and `STEM.key.old`; the new one replaces it file by file
/// (each rename atomic), so a running keyraft takes it on SIGHUP, and
/// refuses a half-written pair if it comes between the two.
pub fn renew(ca_dir: &Path, dir: &Path, days: Option<u32>) -> Result<Vec<PathBuf>, TlsError> {
    let stem = ["node", "admin"]
        .into_iter()
        .find(|s| dir.join(format!("{s}.pem")).exists())
        .ok_or_else(|| {
            TlsError::Invalid(format!("no node.pem or admin.pem in {}", dir.display()))
        })?;
    let ca = Ca::open(ca_dir)?;
    let trusted = String::from_utf8_lossy(&read(&dir.join("ca.pem"))?).into_owned();
    if !trusted.contains(ca.pem.trim()) {
        return Err(TlsError::Invalid(format!(
            "{} does not hold the CA in {}: a certificate from it would not be trusted here",
            dir.join("ca.pem").display(),
            ca_dir.display()
        )));
    }
    let old_pem = read(&dir.join(format!("{stem}.pem")))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&old_pem)
        .map_err(|e| TlsError::Invalid(format!("{stem}.pem: not a PEM certificate: {e}")))?;
    // A renewal cut short leaves a new certificate beside the old key: the
    // pair is refused before anything is written, so `*.old` keeps the
    // last pair that matched.
    let key = KeyPair::from_pem(&String::from_utf8_lossy(&read(
        &dir.join(format!("{stem}.key")),
    )?))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)
        .map_err(|e| TlsError::Invalid(format!("{stem}.pem: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(TlsError::Invalid(format!(
            "{stem}.pem and {stem}.key in {} are not a pair (a renewal cut short?): put {stem}.pem.old and {stem}.key.old back first",
            dir.display()
        )));
    }
    let info = super::cert_info_der(&pem.contents)?;
    let role = super::cert_role(&pem.contents)
        .ok_or_else(|| TlsError::Invalid(format!("{stem}.pem carries no single keyraft role")))?;
    let names = info
        .names
        .into_iter()
        .filter(|n| !n.starts_with(Role::PREFIX))
        .collect();
    let p = leaf_params(names, &info.subject, role, ca.leaf_days(days)?)?;
    let (cert, key) = sign(p, &ca)?;
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Write { path, source }
    };
    for ext in ["pem", "key"] {
        let from = dir.join(format!("{stem}.{ext}"));
        let to = dir.join(format!("{stem}.{ext}.old"));
        let body = read(&from)?;
        crate::durable::write(&to, &body, 0o600).map_err(err(&to))?;
    }
    let mut written = Vec::new();
    for (path, body, mode) in set(dir, stem, cert, key, &ca).into_iter().take(2) {
        crate::durable::write(&path, body.as_bytes(), mode).map_err(err(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// Signs `p` with a new key: (certificate PEM, key PEM).
fn sign(p: CertificateParams, ca: &Ca) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The files of one set: `STEM.pem`, `STEM.key` (0600) and the CA's
/// `ca.pem`, in `out`.
fn set(out: &Path, stem: &str, cert: String, key: String, ca: &Ca) -> [(PathBuf, String, u32); 3] {
    [
        (out.join(format!("{stem}.pem")), cert, 0o644),
        (out.join(format!("{stem}.key")), key, 0o600),
        (out.join("ca.pem"), ca.pem.clone(), 0o644),
    ]
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
