//! `keyraft certs`: a cluster CA, node and admin certificates, and their
//! expiry.
//!
//! Owns: what the command prints and its exit code. Must not: hold
//! certificate rules; [`crate::tls`] does.

use std::path::PathBuf;
use std::process::ExitCode;

use super::CertsCmd;
use crate::tls;

/// `keyraft certs ca|node|admin|renew|show`.
pub(super) fn run(what: CertsCmd) -> anyhow::Result<ExitCode> {
    let files = match what {
        CertsCmd::Ca { days, out } => tls::create_ca(&out, days)?,
        CertsCmd::Node {
            ca,
            id,
            witness,
            dns,
            ip,
            days,
            out,
        } => tls::create_node(&ca, id, witness, &dns, &ip, days, &out)?,
        CertsCmd::Admin {
            ca,
            name,
            days,
            out,
        } => tls::create_admin(&ca, &name, days, &out)?,
        CertsCmd::Renew { ca, days, dirs } => {
            let mut files = Vec::new();
            for dir in dirs {
                files.extend(tls::renew(&ca, &dir, days)?);
            }
            files
        }
        CertsCmd::Show { paths, warn_days } => return show_certs(&paths, warn_days),
    };
    for f in files {
        let expiry = tls::cert_file_info(&f)
            .map(|i| format!(" (expires {})", i.not_after_text))
            .unwrap_or_default();
        println!("wrote {}{expiry}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyraft certs show`: one line per certificate; exit 1 if any has
/// expired or expires within `warn_days`.
fn show_certs(paths: &[PathBuf], warn_days: u32) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(
                ["ca.pem", "node.pem", "admin.pem"]
                    .iter()
                    .map(|f| p.join(f))
                    .filter(|f| f.exists()),
            );
        } else {
            files.push(p.clone());
        }
    }
    anyhow::ensure!(
        !files.is_empty(),
        "no ca.pem, node.pem or admin.pem in {paths:?}"
    );
    let mut ok = true;
    for f in files {
        let i = tls::cert_file_info(&f)?;
        let days = i.expires_in().div_euclid(86_400);
        let verdict = if i.expires_in() <= 0 {
            ok = false;
            "EXPIRED".to_string()
        } else if days < i64::from(warn_days) {
            ok = false;
            format!("expires in {days} days: renew it (keyraft certs renew)")
        } else {
            format!("expires in {days} days")
        };
        println!(
            "{}: {} [{}] not after {}: {verdict}",
            f.display(),
            i.subject,
            i.names.join(", "),
            i.not_after_text
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
