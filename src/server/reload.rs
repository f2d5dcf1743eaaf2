//! SIGHUP (`systemctl reload keyraft`): the peer certificates read again,
//! and in signer mode the `[[chains]]` of the configuration file applied
//! (chains added and removed, the others untouched); and each chain's
//! tasks: a privval dialer per node, its node probe and its token probe.
//!
//! Owns: the order of a reload (certificates, then chains: the file read
//! and checked, the keys opened, then the change made and the new chains'
//! tasks started) and its one log line. Must not: change anything when a
//! check fails; the rules are `config::Reload` and `signer::reload`'s.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio::task::JoinHandle;

use crate::config::Reload;
use crate::node::Shared;
use crate::shutdown::Shutdown;
use crate::signer::{self, Chain, Signer};
use crate::tls::{self, TlsMaterial};

/// The tasks of `chains`: a privval dialer for each of their nodes, their
/// node probes and their token probes; each ends when a reload retires
/// its chain.
pub(super) fn start_chains(
    sh: &Arc<Shared>,
    signer: &Arc<Signer>,
    identity: &SigningKey,
    chains: &[Arc<Chain>],
    stop: &Shutdown,
) -> Vec<JoinHandle<()>> {
    let mut tasks =
        signer::limit::probe_nodes(&sh.core, sh.core.cfg.timing.health_interval, chains);
    for chain in chains {
        tasks.push(tokio::spawn(signer.clone().probe_token(chain.clone())));
        for addr in &chain.cfg.nodes {
            tasks.push(tokio::spawn(signer::privval::run(
                signer.clone(),
                sh.clone(),
                chain.clone(),
                addr.clone(),
                identity.clone(),
                stop.clone(),
            )));
        }
    }
    tasks
}

/// Handles every SIGHUP until the node stops: the certificates, then (in
/// signer mode) the chains. The tasks of chains it adds are its own, and
/// end with it.
pub(super) async fn on_sighup(
    sh: Arc<Shared>,
    signer: Option<(Arc<Signer>, SigningKey)>,
    reload: Reload,
    hup: Option<tokio::signal::unix::Signal>,
    stop: Shutdown,
) {
    let Some(mut hup) = hup else {
        tracing::warn!("cannot listen for SIGHUP: certificates and chains reload only on restart");
        return;
    };
    // Dropped with this task (at teardown): the added chains' tasks stop.
    let mut added = Tasks(Vec::new());
    while hup.recv().await.is_some() {
        certificates(&sh).await;
        if let Some((signer, identity)) = &signer {
            let started = chains(&sh, signer, identity, &reload, &stop).await;
            added.0.retain(|t| !t.is_finished());
            added.0.extend(started);
        }
    }
}

/// Tasks aborted when this is dropped.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Reads the TLS files again and, if they are valid for this node, uses
/// them for new peer connections both ways; otherwise keeps the ones in
/// use and says why.
async fn certificates(sh: &Shared) {
    let (Some(paths), Some(server)) = (sh.core.cfg.tls.clone(), sh.tls.clone()) else {
        tracing::info!("SIGHUP: no TLS in use (--insecure), no certificate to reload");
        return;
    };
    let (id, witness) = (sh.core.cfg.id, sh.core.cfg.witness);
    let loaded = tokio::task::spawn_blocking(move || {
        let m = TlsMaterial::load_for(&paths, id, witness)?;
        let info = m.info()?;
        Ok::<_, tls::TlsError>((m, info))
    })
    .await;
    match loaded {
        Ok(Ok((m, info))) => match server.reload(&m) {
            Ok(()) => {
                sh.peers.set_tls(m).await;
                tracing::info!(
                    expires = %info.0.not_after_text,
                    days = info.0.expires_in() / 86_400,
                    "SIGHUP: reloaded the peer certificate"
                );
                *sh.certs.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            }
            Err(e) => tracing::error!("SIGHUP: keeping the certificates in use: {e}"),
        },
        Ok(Err(e)) => tracing::error!("SIGHUP: keeping the certificates in use: {e}"),
        Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
    }
}

/// Applies the file's `[[chains]]`: returns the tasks of the chains that
/// start; a file or key refused changes nothing and is one line.
async fn chains(
    sh: &Arc<Shared>,
    signer: &Arc<Signer>,
    identity: &SigningKey,
    reload: &Reload,
    stop: &Shutdown,
) -> Vec<JoinHandle<()>> {
    let r = reload.clone();
    let new = match tokio::task::spawn_blocking(move || r.chains()).await {
        Ok(Ok(new)) => new,
        Ok(Err(e)) => {
            tracing::error!("SIGHUP: chains not reloaded, nothing changed: {e}");
            return Vec::new();
        }
        Err(e) => {
            tracing::error!("SIGHUP: chains not reloaded, nothing changed: {e}");
            return Vec::new();
        }
    };
    match signer.reload(new).await {
        Ok((plan, _)) if plan.changes_nothing() => {
            tracing::info!("SIGHUP: [[chains]] unchanged");
            Vec::new()
        }
        Ok((plan, started)) => {
            tracing::info!("SIGHUP: chains reloaded: {plan}");
            start_chains(sh, signer, identity, &started, stop)
        }
        Err(e) => {
            tracing::error!("SIGHUP: chains not reloaded, nothing changed: {e}");
            Vec::new()
        }
    }
}
