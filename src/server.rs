//! Starting and stopping a node: the start-up order of docs/design.md's
//! steps 6 and 9 (data-dir lock and fence before anything else; an empty
//! data dir asks its peers before it takes part, see [`crate::join`]), the three servers (peer
//! gRPC with mTLS, admin gRPC, HTTP), the background tasks, and the
//! teardown. [`run`] is what `keyraft run` calls.
//!
//! Owns: wiring and lifetimes. Must not: hold protocol logic; once the
//! parts are up it hands control to [`crate::coordinator`] and waits.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::sync::{mpsc, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;

use crate::admin;
use crate::config::{Config, NodeId};
use crate::coordinator::{self, Coordinator};
use crate::fence::GuardError;
use crate::fence::{self, KeyLinks};
use crate::gossip;
use crate::health::{self, Prober};
use crate::join::{self, Bootstrap};
use crate::metrics::Metrics;
use crate::node::{ClusterView, Core, Local, PrivvalLinks, Shared};
use crate::pb;
use crate::raft::network::{Peers, MAX_MESSAGE};
use crate::raft::server::RaftService;
use crate::raft::{self, Gate, Raft};
use crate::shutdown::{self, Shutdown};
use crate::signer::{self, Signer};
use crate::supervisor::Validator;
use crate::tls::{self, ServerTls, TlsMaterial};
use crate::tuning;

/// Why `keyraft run` could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Refused for safety before starting; exit code 2.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Fence(#[from] fence::FenceError),
    #[error(transparent)]
    Join(#[from] join::Refused),
    /// `--kernel-fence required` on a host where it cannot be had; exit 2.
    #[error("--kernel-fence required, but {0}")]
    KernelFence(#[from] fence::kernel::KernelError),
    #[error(transparent)]
    Store(#[from] raft::store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Supervisor(#[from] GuardError),
    #[error("cannot listen on {addr} ({what}): {why}")]
    Bind {
        addr: String,
        what: &'static str,
        why: String,
    },
    #[error(transparent)]
    Admin(#[from] admin::access::AccessError),
    #[error("raft: {0}")]
    Raft(String),
    /// openraft's core stopped while running; exit code 8.
    #[error("the Raft core stopped: {0}")]
    RaftCore(String),
    #[error(transparent)]
    SignerKey(#[from] signer::sign::SignError),
    #[error(transparent)]
    SignerIdentity(#[from] signer::privval::IdentityError),
}

/// Runs a coordinator until `shutdown` resolves.
/// `material` is the peer port's TLS material, checked by the caller
/// (`None` with `--insecure`).
pub async fn run(
    cfg: Config,
    material: Option<TlsMaterial>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let timing = cfg.timing;
    // SIGHUP reloads certificates; until a handler exists its default
    // action would end the process, so take it over first (a reload sent
    // while this node waits for its peers is then handled once it runs).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // Safety protocol step 6: before anything else.
    let dir = cfg.data_dir.clone();
    let links = cfg.validator.as_ref().map(|v| KeyLinks {
        active: v.active_links.clone(),
        standby: v.standby_links.clone(),
    });
    let fence_links = links.clone();
    let cgroup = cfg.validator.as_ref().is_some_and(|v| v.cgroup);
    let uid = cfg
        .validator
        .as_ref()
        .and_then(|v| v.user.as_ref())
        .map(|u| u.uid);
    let (lock, tree) = blocking(move || -> Result<_, fence::FenceError> {
        let lock = fence::lock_data_dir(&dir)?;
        // Every process of a validator tree left by an earlier run (its
        // cgroup, its marker, its user), then the recorded pid's group.
        let tree = fence::Tree::for_data_dir(&dir, cgroup).owned_by(uid);
        let killed = tree.kill(None, Duration::from_secs(5))?;
        if killed > 0 {
            tracing::warn!(
                killed,
                "killed validator processes left running by a previous keyraft"
            );
        }
        fence::kill_leftover(&dir)?;
        tree.record(&dir).map_err(fence::io(
            "cannot write",
            &dir.join(fence::tree::CGROUP_FILE),
        ))?;
        if let Some(l) = fence_links {
            l.stand_by()?;
        }
        Ok((lock, tree))
    })
    .await?;
    // Step 4's kernel fence: built (a leftover replaced) and proven before
    // any validator starts; `auto` says here why it is off.
    let kernel = match cfg.validator.as_ref() {
        Some(v) => {
            let (mode, by, t, user) = (v.kernel_fence, v.activate_by, tree.clone(), v.user.clone());
            blocking(move || {
                let probe = std::path::Path::new("/proc/self/exe");
                fence::kernel::set_up(mode, by, &t, user.as_ref(), probe)
            })
            .await?
        }
        None => fence::kernel::Status::Off("a witness runs no validator".into()),
    };
    let table_file = cfg.data_dir.join(fence::kernel::TABLE_FILE);
    let recorded = match kernel.plan() {
        Some(plan) => {
            crate::durable::write(&table_file, format!("{}\n", plan.table).as_bytes(), 0o600)
        }
        None => std::fs::remove_file(&table_file).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        }),
    };
    recorded.map_err(fence::io("cannot write", &table_file))?;
    match &kernel {
        fence::kernel::Status::On(plan) => tracing::info!(
            table = plan.table,
            "kernel fence on: the keyed validator's packets pass only while its lease lives (nftables table inet {})",
            plan.table
        ),
        fence::kernel::Status::Off(why) if cfg.validator.is_some() => {
            tracing::warn!("kernel fence off: {why}; a frozen host may sign once on thaw (docs/safety.md)")
        }
        fence::kernel::Status::Off(_) => {}
    }
    if cfg.validator.is_some() {
        fence::become_subreaper()?;
        tracing::info!(
            fence = tree.mechanism(),
            cgroup = ?tree.cgroup(),
            "the validator's whole process tree is fenced by {}",
            if tree.cgroup().is_some() { "its own cgroup, its environment marker and the guard's subreaper" } else { "its environment marker and the guard's subreaper (no writable cgroup v2 here)" }
        );
    }

    let raft_dir = cfg.data_dir.join("raft");
    let (log_store, state_machine, memory, fresh, holds) =
        blocking(move || -> Result<_, RunError> {
            let (log, sm, memory) = raft::store::open(&raft_dir)?;
            let fresh = log.is_fresh()?;
            let mut holds = log.holds()?;
            // A snapshot installed before a crash holds entries the log may
            // not (openraft fills the gap when it starts).
            holds.last_index = holds.last_index.max(sm.applied_index());
            Ok((log, sm, memory, fresh, holds))
        })
        .await?;
    // A copied Raft store's memory of this node, and its refusals, are not
    // this node's word.
    memory.adopt(cfg.id).await.map_err(|e| {
        RunError::Store(raft::store::StoreError::Corrupt {
            path: cfg.data_dir.join("raft").display().to_string(),
            why: e.to_string(),
        })
    })?;
    let server_tls = material
        .as_ref()
        .map(ServerTls::new)
        .transpose()?
        .map(Arc::new);
    let certs = material.as_ref().map(|m| m.info()).transpose()?;
    if let Some((node, _)) = &certs {
        tracing::info!(
            expires = %node.not_after_text,
            days = node.expires_in() / 86_400,
            "peer certificate"
        );
    }
    let cluster_rx = state_machine.subscribe();
    if material.is_none() {
        tracing::warn!("INSECURE: peer traffic is plaintext and unauthenticated (--insecure); anyone who can reach {} can vote", cfg.listen);
    }
    let peers = Peers::new(cfg.id, material.clone(), cfg.peers.clone());
    // Votes closed while new, and for the longest lease it may have promised.
    let live = timing.live_for(cluster_rx.borrow().timing);
    let own = timing.longest_promise();
    let gate = Arc::new(Gate::at_start(&cfg.data_dir, own, fresh, live));
    let raft_cfg = raft::openraft_config(&timing).map_err(|e| RunError::Raft(e.to_string()))?;
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_cfg),
        raft::network::Network {
            peers: peers.clone(),
            memory: memory.clone(),
            gate: gate.clone(),
        },
        log_store.clone(),
        state_machine,
    )
    .await
    .map_err(|e| RunError::Raft(e.to_string()))?;

    let (req_tx, req_rx) = mpsc::channel(8);
    let (probe_tx, probe_rx) = watch::channel(None);
    let fenced: Vec<u64> = cfg.fence.by_node.keys().copied().collect();
    let chains: Vec<&str> = cfg
        .signer
        .as_ref()
        .map(|s| s.chain_ids().collect())
        .unwrap_or_default();
    let metrics = Metrics::new(env!("CARGO_PKG_VERSION"), cfg.witness, &chains, &fenced)
        .map_err(|e| RunError::Raft(e.to_string()))?;
    let keys = match cfg.signer.clone() {
        Some(c) => Some(
            blocking(move || {
                Ok::<_, RunError>((
                    signer::load_keys(&c)?,
                    signer::privval::identity(&c.identity_key)?,
                ))
            })
            .await?,
        ),
        None => None,
    };
    let signer_keys = keys
        .iter()
        .flat_map(|(k, _)| k)
        .map(|(c, key)| pb::ChainKey {
            chain_id: c.chain_id.clone(),
            address: key.address_hex(),
        });
    let signer_keys = signer_keys.collect();
    let core = Arc::new(Core {
        cfg,
        raft: raft.clone(),
        gate: gate.clone(),
        metrics,
        view: ClusterView::default(),
        local: watch::channel(Local::default()).0,
        cluster: cluster_rx.clone(),
        started: tokio::time::Instant::now(),
        fence_agents: std::sync::Mutex::new(BTreeMap::new()),
        signer_keys,
        chain_nodes: Default::default(),
        chain_probe_errors: Default::default(),
        heights: Default::default(),
    });
    let sh = Arc::new(Shared {
        core,
        peers,
        memory: memory.clone(),
        start_holds: holds,
        refused: watch::channel(None).0,
        requests: req_tx,
        privval: PrivvalLinks::default(),
        probe_error: probe_rx,
        kernel_fence: kernel.describe(),
        tls: server_tls,
        certs: std::sync::Mutex::new(certs),
    });
    sh.metrics
        .kernel_fence
        .set(i64::from(kernel.plan().is_some()));
    let signer = keys.map(|(keys, identity)| {
        let signer = Signer::new(sh.core.clone(), sh.peers.clone(), keys, rand::random());
        (signer, identity)
    });
    // The servers stop only after the coordinator and Raft have.
    let (stop_servers, servers_stop) = shutdown::channel();
    let servers = start_servers(
        &sh,
        signer.as_ref().map(|s| s.0.clone()),
        servers_stop.clone(),
    )
    .await?;

    let bootstrap = join::bootstrap(&sh.cfg, &*sh.peers, fresh, holds).await?;
    // A node rejoining after it lost its data dir votes only once the
    // leader took it back (and answers no Hello until then).
    if bootstrap != Bootstrap::Rejoin {
        gate.open_votes();
    }
    gate.join();
    if matches!(bootstrap, Bootstrap::Initialize | Bootstrap::Join) {
        let members: BTreeMap<NodeId, BasicNode> = sh
            .cfg
            .members()
            .into_iter()
            .map(|(id, a)| (id, BasicNode::new(a)))
            .collect();
        match (raft.initialize(members).await, bootstrap) {
            (Ok(()), Bootstrap::Join) => tracing::info!(
                "empty data dir: joining the existing cluster; its leader's log replaces this one"
            ),
            (Ok(()), _) => tracing::info!(
                "empty data dir: forming a new cluster of {} members",
                sh.cfg.members().len()
            ),
            (Err(e), _) => tracing::debug!("already initialised: {e}"),
        }
    }

    let mut tasks = vec![
        tokio::spawn(gossip::run(sh.clone())),
        tokio::spawn({
            let sh = sh.clone();
            async move { join::register(&sh.core, &crate::admin::commands(&sh)).await }
        }),
        tokio::spawn(reload_on_sighup(sh.clone(), hup)),
        tokio::spawn(raft::heartbeat_while_leading(raft.clone(), gate.clone())),
        tokio::spawn(tuning::run(sh.clone())),
    ];
    if let Some((signer, identity)) = &signer {
        tasks.extend(signer::limit::probe_nodes(&sh.core, timing.health_interval));
        for (i, chain) in signer.chains().iter().enumerate() {
            for addr in &chain.cfg.nodes {
                tasks.push(tokio::spawn(signer::privval::run(
                    signer.clone(),
                    sh.clone(),
                    i,
                    addr.clone(),
                    identity.clone(),
                    servers_stop.clone(),
                )));
            }
        }
    }
    let (node, health_rx) = match (&sh.cfg.validator, links) {
        (Some(v), Some(links)) => {
            let (htx, hrx) = watch::channel(None);
            let prober = Prober::new(
                v.health,
                &v.health_url,
                timing.health_interval.max(Duration::from_millis(500)),
            );
            tasks.push(tokio::spawn(health::run(
                prober.clone(),
                timing.health_interval,
                htx,
                probe_tx,
            )));
            let node = Validator::spawn(
                v.clone(),
                links,
                prober,
                &sh.cfg.data_dir,
                tree.clone(),
                kernel.plan().cloned(),
                timing.kill_bound,
            )?;
            (Some(node), Some(hrx))
        }
        _ => (None, None),
    };

    tasks.push(tokio::spawn(
        sh.memory.clone().run_flusher(servers_stop.clone()),
    ));
    let (stop_coordinator, coordinator_stop) = shutdown::channel();
    let mut refused = sh.refused.subscribe();
    let (core_tx, core_died) = watch::channel(None);
    tasks.push(tokio::spawn(raft::core_stopped(raft.clone(), core_tx)));
    let mut died = core_died.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            Ok(_) = refused.wait_for(Option::is_some) => {}
            Ok(_) = died.wait_for(Option::is_some) => {}
        }
        stop_coordinator.fire();
    });
    let mut coordinator = Coordinator::<coordinator::host::OnHost>::new(coordinator::Parts {
        core: sh.core.clone(),
        outside: Arc::new(coordinator::host::Real(sh.clone())),
        node,
        health_rx,
        requests: req_rx,
        shutdown: coordinator_stop,
        rejoining: bootstrap == Bootstrap::Rejoin,
        seed: rand::random(),
    });
    coordinator.run().await;

    // Teardown: Raft first (no more votes or acks), then the servers.
    for t in &tasks {
        t.abort();
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    stop_servers.fire();
    for s in servers {
        if tokio::time::timeout(Duration::from_secs(2), s)
            .await
            .is_err()
        {
            tracing::debug!("a server did not drain in time");
        }
    }
    if let Err(e) = log_store.flush().await {
        tracing::warn!("final flush: {e}");
    }
    if let Some(plan) = kernel.plan().cloned() {
        match blocking(move || plan.remove()).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&table_file);
                tracing::info!("kernel fence removed");
            }
            Err(e) => tracing::warn!("cannot remove the kernel fence: {e}"),
        }
    }
    if let Err(e) = sh.memory.persist().await {
        tracing::warn!("final flush of what this node remembers of its peers: {e}");
    }
    tree.remove_cgroup();
    drop(lock);
    tracing::info!("stopped");
    let refused = sh.refused.borrow().clone();
    let died = core_died.borrow().clone();
    match (refused, died) {
        (Some(why), _) => Err(RunError::Refused(why)),
        (None, Some(why)) => Err(RunError::RaftCore(why)),
        (None, None) => Ok(()),
    }
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, RunError>
where
    RunError: From<E>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(RunError::from),
        Err(e) => Err(RunError::Raft(format!("blocking task failed: {e}"))),
    }
}

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

/// Peer gRPC (mTLS), admin gRPC and HTTP, each stopping when `stop` is set.
async fn start_servers(
    sh: &Arc<Shared>,
    signer: Option<Arc<Signer>>,
    stop: Shutdown,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    let until_stopped = |mut rx: Shutdown| async move { rx.requested().await };
    let peer_listener = bind(sh.cfg.listen, "peer port").await?;
    let http_listener = bind(sh.cfg.http_listen, "http port").await?;
    let admin_tcp = match sh.cfg.admin.listen {
        Some(addr) => Some(bind(addr, "admin port").await?),
        None => None,
    };
    let (admin_socket, socket_file) = admin::access::bind_socket(&sh.cfg.admin).await?;
    if !sh.cfg.http_listen.ip().is_loopback() {
        tracing::warn!(
            "http listens on {}, not loopback: anyone who reaches it can read status and metrics",
            sh.cfg.http_listen
        );
    }
    if sh.cfg.admin.group.is_some() && !admin::access::reachable_by_group(&sh.cfg.admin.socket) {
        tracing::warn!(socket = %sh.cfg.admin.socket.display(),
            "the admin group cannot reach the admin socket: a directory above it is closed to group and others");
    }
    tracing::info!(peer = %sh.cfg.listen, admin = %sh.cfg.admin.socket.display(),
        admin_tls = ?sh.cfg.admin.listen, http = %sh.cfg.http_listen, "listening");

    let mut peer = Server::builder()
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(Some(128))
        .timeout(Duration::from_secs(60))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)));
    let auth = tls::authenticate(sh.tls.is_some());
    let raft_svc = pb::raft_server::RaftServer::new(RaftService::new(
        sh.raft.clone(),
        sh.gate.clone(),
        sh.cfg.id,
        sh.cluster.clone(),
        sh.cfg.timing,
        sh.memory.clone(),
    ))
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
    let peer_router = peer
        .add_service(InterceptedService::new(raft_svc, auth.clone()))
        .add_service(InterceptedService::new(gossip_svc, auth.clone()))
        .add_optional_service(signer_svc)
        .add_service(InterceptedService::new(cluster_svc, auth));
    let peer_task = match &sh.tls {
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
    };

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
    let mut tasks = vec![peer_task, admin_task];
    if let (Some(listener), Some(t)) = (admin_tcp, &sh.tls) {
        let router = admin_server().add_service(InterceptedService::new(
            admin_svc(),
            tls::admin::authenticate,
        ));
        let incoming = tls::incoming(listener, t.clone(), stop.clone());
        let stopped = until_stopped(stop.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::error!("admin port server failed: {e:?}");
            }
        }));
    }

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
    tasks.push(http_task);
    Ok(tasks)
}

/// SIGHUP (`systemctl reload keyraft`): reads the TLS files again and, if
/// they are valid for this node, uses them for new peer connections both
/// ways; otherwise keeps the ones in use and says why.
async fn reload_on_sighup(sh: Arc<Shared>, hup: Option<tokio::signal::unix::Signal>) {
    let Some(mut hup) = hup else {
        tracing::warn!("cannot listen for SIGHUP: certificates reload only on restart");
        return;
    };
    while hup.recv().await.is_some() {
        let (Some(paths), Some(server)) = (sh.cfg.tls.clone(), sh.tls.clone()) else {
            tracing::info!("SIGHUP: no TLS in use (--insecure), nothing to reload");
            continue;
        };
        let (id, witness) = (sh.cfg.id, sh.cfg.witness);
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
