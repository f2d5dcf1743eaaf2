//! Who may reach the admin API: the Unix socket (mode 0660, keyraft's user
//! and the admin group; the CLI's default way in), the optional TCP port
//! (mTLS, admin certificates only, checked by [`crate::tls::admin`]), and
//! the admin gRPC service behind both, which logs who asked for what.
//!
//! Owns: creating, guarding and removing the socket file, and the caller
//! in the log line of every operator command. Must not: run a command
//! itself ([`super::Commands::execute_for_operator`] does), or listen on TCP without
//! TLS.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::status_json;
use crate::config::{AdminConfig, NodeId};
use crate::node::Shared;
use crate::pb::{self, cluster_command::Kind};
use crate::tls::admin::Operator;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("admin socket {path}: {why}")]
    Socket { path: String, why: String },
}

/// The socket file this process made, deleted when this is dropped (the
/// server stopped, or its task was dropped with the runtime), but only
/// while it is still that file: a successor may have made its own.
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket: refuses a path that another keyraft answers on
/// or that is not a socket, removes a dead one, then sets mode 0660 and
/// the admin group. Until the mode is set the umask's mode applies, which
/// never grants more.
pub async fn bind_socket(
    cfg: &AdminConfig,
) -> Result<(tokio::net::UnixListener, SocketFile), AccessError> {
    let path = &cfg.socket;
    let err = |why: String| AccessError::Socket {
        path: path.display().to_string(),
        why,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        // Whoever may write the directory could swap the socket for a
        // link (to a key file) between bind and chmod: nobody else may.
        let m = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
        let me = nix::unistd::geteuid().as_raw();
        if (m.uid() != me && m.uid() != 0) || m.permissions().mode() & 0o022 != 0 {
            return Err(err(format!(
                "its directory {} must belong to keyraft's user or root and be writable by no one else (mode {:o}, owner {})",
                dir.display(),
                m.permissions().mode() & 0o7777,
                m.uid()
            )));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::UnixStream::connect(path),
            )
            .await;
            if matches!(probe, Ok(Ok(_))) {
                return Err(err(
                    "another keyraft answers on it (give each coordinator of a host its own --admin-socket)".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the dead socket: {e}")))?;
        }
        Ok(_) => return Err(err("exists and is not a socket: not touching it".into())),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("cannot set its mode: {e}")))?;
    if let Some(gid) = cfg.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
            err(format!(
                "cannot give it group {gid} ({e}): keyraft's user must be a member of that group"
            ))
        })?;
    }
    let ino = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .ino();
    Ok((
        listener,
        SocketFile {
            path: path.clone(),
            ino,
        },
    ))
}

/// The CLI's endpoint to a coordinator, whatever carries it (the socket,
/// or the admin port's TLS): a short connect, and time for a `members add`.
pub fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://keyraft.admin")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
}

/// A client channel to the admin socket at `path` (the CLI's, and tests').
pub async fn connect_socket(
    path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    endpoint()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// The socket's connections, for tonic.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}

/// Who sent an admin request, for the log: a local user (by uid) on the
/// socket, or the holder of an admin certificate on the TCP port.
fn caller<T>(req: &Request<T>) -> String {
    if let Some(Operator(name)) = req.extensions().get::<Operator>() {
        return format!("admin certificate '{name}'");
    }
    match req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        Some(c) => format!("uid {} on the admin socket", c.uid()),
        None => "the admin socket".into(),
    }
}

/// The admin gRPC service, on the socket and the TCP port alike.
pub struct AdminService {
    sh: Arc<Shared>,
}

impl AdminService {
    pub fn new(sh: Arc<Shared>) -> Self {
        Self { sh }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(pb::StatusReply {
            json: status_json(&self.sh).to_string(),
        }))
    }

    async fn command(
        &self,
        req: Request<pb::ClusterCommand>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let who = caller(&req);
        let cmd = req.into_inner();
        let what = match &cmd.kind {
            Some(Kind::Register(_) | Kind::Rejoin(_)) => {
                return Err(Status::invalid_argument(
                    "register and rejoin are sent by nodes themselves",
                ))
            }
            Some(Kind::Pause(_)) => "pause",
            Some(Kind::Resume(_)) => "resume",
            Some(Kind::Switchover(_)) => "switchover",
            Some(Kind::MembersAdd(_)) => "members add",
            Some(Kind::MembersRemove(_)) => "members remove",
            Some(Kind::SignerFloor(_)) => "signer import-state",
            Some(Kind::NodeBinary(_)) => "upgrade --binary",
            None => "nothing",
        };
        if self.sh.core.cfg.witness {
            tracing::warn!(%who, "refused operator command '{what}': this node is a witness");
            return Err(Status::permission_denied(
                "a witness does not speak for the operator: run the command on a validator host",
            ));
        }
        tracing::info!(%who, "operator command '{what}'");
        let message = super::commands(&self.sh).execute_for_operator(cmd).await?;
        Ok(Response::new(pb::CommandReply { message }))
    }

    async fn members(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        let m = self.sh.core.raft_metrics();
        let membership = m.membership_config.membership();
        let member = |id: NodeId| pb::Member {
            id,
            addr: membership
                .get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
        };
        Ok(Response::new(pb::MembersReply {
            voters: membership.voter_ids().map(member).collect(),
            learners: membership.learner_ids().map(member).collect(),
        }))
    }
}

/// Whether `path`'s directories let others than its owner reach it (for
/// the start log: a group given to a socket behind a 0700 dir is moot).
pub fn reachable_by_group(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).map_or(true, |m| m.permissions().mode() & 0o011 != 0))
}
