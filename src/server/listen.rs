//! The three servers of a node: peer gRPC (mTLS: Raft, gossip, the
//! cluster's commands, forwarded sign requests), admin gRPC (the socket,
//! and the admin port with mTLS) and HTTP (status and metrics), each
//! stopping when told.
//!
//! Owns: binding and serving. Must not: decide anything; the services do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;

use super::RunError;
use crate::admin;
use crate::gossip;
use crate::node::Shared;
use crate::pb;
use crate::raft::peers::MAX_MESSAGE;
use crate::raft::server::RaftService;
use crate::shutdown::Shutdown;
use crate::signer::{self, Signer};
use crate::tls;

async fn bind(
    addr: std::net::SocketAddr,
    what: &'static str,
) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RunError::Bind {
            addr: addr.to_string(),
            what,
            why: e.to_string(),
        })
}

/// A running server: what it serves, and its task.
pub(super) type Serving = (&'static str, tokio::task::JoinHandle<()>);

/// Peer gRPC (mTLS), admin gRPC and HTTP, each stopping when `stop` is set.
pub(super) async fn start_servers(
    sh: &Arc<Shared>,
    signer: Option<Arc<Signer>>,
    stop: Shutdown,
) -> Result<Vec<Serving>, RunError> {
    let until_stopped = |mut rx: Shutdown| async move { rx.requested().await };
    let peer_listener = bind(sh.core.cfg.listen, "peer port").await?;
    let http_listener = bind(sh.core.cfg.http_listen, "http port").await?;
    let admin_tcp = match sh.core.cfg.admin.listen {
        Some(addr) => Some(bind(addr, "admin port").await?),
        None => None,
    };
    let (admin_socket, socket_file) = admin::access::bind_socket(&sh.core.cfg.admin).await?;
    if !sh.core.cfg.http_listen.ip().is_loopback() {
        tracing::warn!(
            "http listens on {}, not loopback: anyone who reaches it can read status and metrics",
            sh.core.cfg.http_listen
        );
    }
    if sh.core.cfg.admin.group.is_some()
        && !admin::access::reachable_by_group(&sh.core.cfg.admin.socket)
    {
        tracing::warn!(socket = %sh.core.cfg.admin.socket.display(),
            "the admin group cannot reach the admin socket: a directory above it is closed to group and others");
    }
    tracing::info!(peer = %sh.core.cfg.listen, admin = %sh.core.cfg.admin.socket.display(),
        admin_tls = ?sh.core.cfg.admin.listen, http = %sh.core.cfg.http_listen, "listening");

    let peer_task = serve_peers(sh, signer, peer_listener, &stop);
    let mut tasks = vec![("peer port", peer_task)];
    tasks.extend(serve_admin(sh, admin_socket, socket_file, admin_tcp, &stop));
    let app = admin::http_router(sh.clone());
    let stopped = until_stopped(stop);
    let http_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!("http server failed: {e}");
        }
    });
    tasks.push(("http port", http_task));
    Ok(tasks)
}

/// The peer port: Raft, gossip, the cluster's commands and (signer mode)
/// forwarded sign requests, each behind the peer authentication.
fn serve_peers(
    sh: &Arc<Shared>,
    signer: Option<Arc<Signer>>,
    peer_listener: tokio::net::TcpListener,
    stop: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    let until_stopped = |mut rx: Shutdown| async move { rx.requested().await };
    let mut peer = Server::builder()
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(Some(128))
        .timeout(Duration::from_secs(60))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)));
    let auth = tls::authenticate(sh.tls.is_some());
    let raft_svc = pb::raft_server::RaftServer::new(
        RaftService::new(
            sh.core.raft.clone(),
            sh.core.gate.clone(),
            sh.core.cfg.id,
            sh.core.cluster.clone(),
            sh.core.cfg.timing,
            sh.memory.clone(),
        )
        .ending_streams_on(stop.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let gossip_svc = pb::gossip_server::GossipServer::new(gossip::GossipService::new(sh.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let cluster_svc =
        pb::cluster_server::ClusterServer::new(admin::ClusterService::new(sh.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
    let signer_svc = signer.map(|s| {
        InterceptedService::new(
            pb::signer_server::SignerServer::new(signer::SignerService::new(s))
                .max_decoding_message_size(signer::MAX_PRIVVAL_MESSAGE)
                .max_encoding_message_size(signer::MAX_PRIVVAL_MESSAGE),
            auth.clone(),
        )
    });
    let confirm_svc =
        pb::confirm_server::ConfirmServer::new(signer::ConfirmService::new(sh.core.clone()));
    let peer_router = peer
        .add_service(InterceptedService::new(raft_svc, auth.clone()))
        .add_service(InterceptedService::new(gossip_svc, auth.clone()))
        .add_optional_service(signer_svc)
        .add_service(InterceptedService::new(confirm_svc, auth.clone()))
        .add_service(InterceptedService::new(cluster_svc, auth));
    match &sh.tls {
        Some(t) => {
            let incoming = tls::incoming(peer_listener, t.clone(), stop.clone());
            let stopped = until_stopped(stop.clone());
            tokio::spawn(async move {
                if let Err(e) = peer_router
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await
                {
                    tracing::error!("peer server failed: {e:?}");
                }
            })
        }
        None => spawn_grpc(
            "peer",
            peer_router,
            peer_listener,
            until_stopped(stop.clone()),
        ),
    }
}

/// The admin socket, and the admin port with mTLS where one is set.
fn serve_admin(
    sh: &Arc<Shared>,
    admin_socket: tokio::net::UnixListener,
    socket_file: admin::access::SocketFile,
    admin_tcp: Option<tokio::net::TcpListener>,
    stop: &Shutdown,
) -> Vec<Serving> {
    let until_stopped = |mut rx: Shutdown| async move { rx.requested().await };
    let admin_svc = || {
        pb::admin_server::AdminServer::new(admin::access::AdminService::new(sh.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    };
    let admin_server = || {
        Server::builder()
            .concurrency_limit_per_connection(16)
            .timeout(Duration::from_secs(60))
    };
    let socket_router = admin_server().add_service(admin_svc());
    let stopped = until_stopped(stop.clone());
    let admin_task = tokio::spawn(async move {
        let _removed_when_done = socket_file;
        let incoming = admin::access::incoming(admin_socket);
        if let Err(e) = socket_router
            .serve_with_incoming_shutdown(incoming, stopped)
            .await
        {
            tracing::error!("admin socket server failed: {e:?}");
        }
    });
    let mut tasks = vec![("admin socket", admin_task)];
    if let (Some(listener), Some(t)) = (admin_tcp, &sh.tls) {
        let router = admin_server().add_service(InterceptedService::new(
            admin_svc(),
            tls::admin::authenticate,
        ));
        let incoming = tls::incoming(listener, t.clone(), stop.clone());
        let stopped = until_stopped(stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::error!("admin port server failed: {e:?}");
            }
        });
        tasks.push(("admin port", task));
    }
    tasks
}

/// Serves a gRPC router on `listener` until `stopped` completes.
fn spawn_grpc(
    what: &'static str,
    router: Router,
    listener: tokio::net::TcpListener,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
            tracing::error!("{what} server failed: {e:?}");
        }
    })
}
