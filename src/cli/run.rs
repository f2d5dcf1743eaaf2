//! `keyraft run`: resolve the configuration, set up logging, load the
//! TLS material, and run the server until SIGTERM or SIGINT.
//!
//! Owns: the process around [`crate::server::run`] (runtime, logging,
//! signals, exit codes). Must not: hold protocol logic.

use std::io::Write;
use std::process::ExitCode;

use anyhow::anyhow;

use super::fail;
use crate::config::{LogFormat, RunArgs};
use crate::fence::FenceError;
use crate::server::{self, RunError};
use crate::tls;

pub fn run(args: RunArgs) -> ExitCode {
    let (cfg, reload) = match crate::config::Reload::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The certificate must name this node and go with its key; loaded
    // once, here, and handed to the server.
    let material = match cfg
        .tls
        .as_ref()
        .map(|p| tls::TlsMaterial::load_for(p, cfg.id, cfg.witness))
    {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Signer mode's keys: a bad file or token is one line, before any log.
    let opened = cfg.signer.as_ref().map(crate::signer::reload::load_keys);
    let (keys, modules) = match opened.unwrap_or_else(|| Ok(Default::default())) {
        Ok(opened) => opened,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.id, cfg.log_format);
    // A Ctrl-Z in the terminal that started keyraft must not stop it: a
    // stopped coordinator holds its lease and answers no peer.
    crate::fence::ignore_job_control();
    // One thread: an idle coordinator wakes often (openraft ticks every
    // fifth of a heartbeat); a second worker only adds cross-thread wakeups.
    // Blocking work (sled, fsync) runs on tokio's blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow!(e)),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        role = cfg.role(),
        "keyraft starting"
    );
    let secrets = server::Secrets {
        tls: material,
        keys,
        modules,
    };
    let ran = rt.block_on(server::run(cfg, secrets, reload, shutdown_signal()));
    // A thread stuck in a token that hangs (a signature, a probe, a
    // reload's key) must not keep the process from exiting: what the
    // server waits for is done by now, and the rest gets a moment.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (RunError::Refused(_)
            | RunError::Join(_)
            | RunError::KernelFence(_)
            | RunError::Fence(_)),
        ) if !matches!(e, RunError::Fence(FenceError::Io { .. })) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        // Said once already, as it happened (`raft::core_stopped`).
        Err(RunError::RaftCore(_)) => ExitCode::from(8),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => std::future::pending().await,
    }
}

/// Logs carry the node id on every line: `node=N` first in text, a
/// `"node":N` field in JSON.
fn init_logging(id: u64, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=error,sled=warn,h2=warn,tower=warn"));
    let json = format == LogFormat::Json;
    let writer = NodeTag { id, json };
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.with_target(false).init();
    }
}

#[derive(Clone, Copy)]
struct NodeTag {
    id: u64,
    json: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NodeTag {
    type Writer = NodeTag;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

impl Write for NodeTag {
    /// Each formatted event arrives in one call: tag it and write it whole.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(buf.len() + 16);
        match (self.json, buf.split_first()) {
            (true, Some((b'{', rest))) => {
                line.extend_from_slice(format!("{{\"node\":{},", self.id).as_bytes());
                line.extend_from_slice(rest);
            }
            _ => {
                line.extend_from_slice(format!("node={} ", self.id).as_bytes());
                line.extend_from_slice(buf);
            }
        }
        std::io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
