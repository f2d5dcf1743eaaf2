//! Starting and stopping a node: the start-up order of docs/design.md's
//! steps 6 and 9 (data-dir lock and fence before anything else; an empty
//! data dir asks its peers before it takes part, see [`crate::join`]), the three servers (peer
//! gRPC with mTLS, admin gRPC, HTTP), the background tasks, and the
//! teardown. [`run`] is what `keyraft run` calls.
//!
//! Owns: wiring and lifetimes. Must not: hold protocol logic; once the
//! parts are up it hands control to [`crate::coordinator`] and waits.

mod listen;
mod reload;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use openraft::BasicNode;
use tokio::sync::{mpsc, watch};

use crate::admin;
use crate::config::{Config, NodeId};
use crate::coordinator::{self, Coordinator};
use crate::fence::GuardError;
use crate::fence::{self, KeyLinks};
use crate::gossip;
use crate::health::{self, Prober};
use crate::join::{self, Bootstrap};
use crate::metrics::Metrics;
use crate::node::{
    ClusterView, CoordinatorRequest, Core, KernelFenceState, Local, PrivvalLinks, Shared,
};
use crate::raft::peers::Peers;
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
    SignerIdentity(#[from] signer::privval::IdentityError),
}

/// What the caller read and checked before anything starts (so that a bad
/// file or token is one line and exit 2, before any log): the peer port's
/// TLS material (`None` with `--insecure`) and signer mode's keys, each
/// chain's with its configuration ([`signer::reload::load_keys`]).
pub struct Secrets {
    pub tls: Option<TlsMaterial>,
    pub keys: Vec<(crate::config::ChainConfig, signer::ConsensusKey)>,
    /// The PKCS#11 modules the keys were opened through.
    pub modules: signer::token::Modules,
}

/// Runs a coordinator until `shutdown` resolves, with `secrets`. The steps, in their order: fence the host
/// (step 6, and step 4's kernel fence), open the Raft store, assemble the
/// node, start the servers, bootstrap (step 9), spawn the background
/// tasks and the validator's supervisor, run the coordinator, tear down.
pub async fn run(
    cfg: Config,
    secrets: Secrets,
    reload: crate::config::Reload,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // SIGHUP reloads certificates; until a handler exists its default
    // action would end the process, so take it over first (a reload sent
    // while this node waits for its peers is then handled once it runs).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let fenced = fence_host(&cfg).await?;
    let (store, state_machine) = open_store(&cfg).await?;
    let (sh, signer, parts) = assemble(cfg, secrets, &fenced, &store, state_machine).await?;
    // The servers stop only after the coordinator and Raft have.
    let (stop_servers, servers_stop) = shutdown::channel();
    let servers = listen::start_servers(
        &sh,
        signer.as_ref().map(|s| s.0.clone()),
        servers_stop.clone(),
    )
    .await?;
    let bootstrap = bootstrap(&sh, &store).await?;
    let mut tasks = spawn_tasks(&sh, signer.as_ref(), &servers_stop);
    tasks.push(tokio::spawn(reload::on_sighup(
        sh.clone(),
        signer.clone(),
        reload,
        hup,
        servers_stop.clone(),
    )));
    let (node, health_rx) = supervise(&sh, &fenced, parts.probe_tx, &mut tasks)?;
    let (stop_coordinator, coordinator_stop) = shutdown::channel();
    let (core_tx, core_died) = watch::channel(None);
    tasks.push(tokio::spawn(raft::core_stopped(
        sh.core.raft.clone(),
        core_tx,
    )));
    let mut refused = sh.refused.subscribe();
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
        requests: parts.requests,
        shutdown: coordinator_stop,
        rejoining: bootstrap == Bootstrap::Rejoin,
        seed: rand::random(),
    });
    coordinator.run().await;
    tear_down(&sh, tasks, stop_servers, servers, &store, fenced).await;
    let refused = sh.refused.borrow().clone();
    let died = core_died.borrow().clone();
    match (refused, died) {
        (Some(why), _) => Err(RunError::Refused(why)),
        (None, Some(why)) => Err(RunError::RaftCore(why)),
        (None, None) => Ok(()),
    }
}

/// What step 6 leaves held until the end: the data dir's lock, the
/// validator's tree (leftovers killed), its key links (standing by) and
/// the kernel fence.
struct Fenced {
    lock: fence::DataDirLock,
    tree: fence::Tree,
    links: Option<KeyLinks>,
    kernel: fence::kernel::Status,
    table_file: PathBuf,
}

/// Step 6, before anything else: the data dir locked, every process of a
/// validator tree left by an earlier run killed, the key links standing
/// by; then step 4's kernel fence, built (a leftover replaced) and proven
/// before any validator starts (`auto` says here why it is off).
async fn fence_host(cfg: &Config) -> Result<Fenced, RunError> {
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
        // Its cgroup, its marker, its user; then the recorded pid's group.
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
    say_fenced(cfg, &tree, &kernel)?;
    Ok(Fenced {
        lock,
        tree,
        links,
        kernel,
        table_file,
    })
}

/// The start log's word on the fence, and the subreaper a validator host
/// needs.
fn say_fenced(
    cfg: &Config,
    tree: &fence::Tree,
    kernel: &fence::kernel::Status,
) -> Result<(), RunError> {
    match kernel {
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
    Ok(())
}

/// The Raft store as opened: its log, state machine and member memory,
/// and what the log held at start (for step 9).
struct Store {
    log: raft::store::LogStore,
    memory: Arc<raft::memory::Memory>,
    fresh: bool,
    holds: raft::memory::Holds,
}

async fn open_store(cfg: &Config) -> Result<(Store, raft::store::StateMachine), RunError> {
    let raft_dir = cfg.data_dir.join("raft");
    let store = blocking(move || -> Result<_, RunError> {
        let (log, state_machine, memory) = raft::store::open(&raft_dir)?;
        let fresh = log.is_fresh()?;
        let mut holds = log.holds()?;
        // A snapshot installed before a crash holds entries the log may
        // not (openraft fills the gap when it starts).
        holds.last_index = holds.last_index.max(state_machine.applied_index());
        let store = Store {
            log,
            memory,
            fresh,
            holds,
        };
        Ok((store, state_machine))
    })
    .await?;
    // A copied Raft store's memory of this node, and its refusals, are not
    // this node's word.
    let (store, state_machine) = store;
    store.memory.adopt(cfg.id).await.map_err(|e| {
        RunError::Store(raft::store::StoreError::Corrupt {
            path: cfg.data_dir.join("raft").display().to_string(),
            why: e,
        })
    })?;
    Ok((store, state_machine))
}

/// The ends of [`assemble`]'s channels that [`run`] hands on.
struct Parts {
    requests: mpsc::Receiver<CoordinatorRequest>,
    probe_tx: watch::Sender<Option<String>>,
}

/// Signer mode: the signer, and the privval identity it dials sentries
/// with.
type SignerParts = (Arc<Signer>, SigningKey);

/// The node's parts: TLS, Raft (over the store, the peers and the gate),
/// the metrics, the signer's keys, and the [`Core`] and [`Shared`]
/// everything else is handed.
async fn assemble(
    cfg: Config,
    secrets: Secrets,
    fenced: &Fenced,
    store: &Store,
    state_machine: raft::store::StateMachine,
) -> Result<(Arc<Shared>, Option<SignerParts>, Parts), RunError> {
    let timing = cfg.timing;
    let Secrets {
        tls: material,
        keys: chain_keys,
        modules,
    } = secrets;
    let (server_tls, certs) = peer_tls(&cfg, material.as_ref())?;
    let cluster_rx = state_machine.subscribe();
    let peers = Peers::new(cfg.id, material, cfg.peers.clone());
    // Votes closed while new, and for the longest lease it may have promised.
    let live = timing.live_for(cluster_rx.borrow().timing);
    let gate = Arc::new(Gate::at_start(
        &cfg.data_dir,
        timing.longest_promise(),
        store.fresh,
        live,
    ));
    let raft_cfg = raft::openraft_config(&timing).map_err(|e| RunError::Raft(e.to_string()))?;
    let network = raft::network::Network {
        transport: peers.clone(),
        memory: store.memory.clone(),
        gate: gate.clone(),
    };
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_cfg),
        network,
        store.log.clone(),
        state_machine,
    )
    .await
    .map_err(|e| RunError::Raft(e.to_string()))?;
    let fenced_nodes: Vec<u64> = cfg.fence.by_node.keys().copied().collect();
    let chains: Vec<&str> = cfg
        .signer
        .as_ref()
        .map(|s| s.chain_ids().collect())
        .unwrap_or_default();
    let metrics = Metrics::new(
        env!("CARGO_PKG_VERSION"),
        cfg.witness,
        &chains,
        &fenced_nodes,
    )
    .map_err(|e| RunError::Raft(e.to_string()))?;
    let keys = match cfg.signer.clone() {
        Some(c) => Some((
            chain_keys,
            blocking(move || signer::privval::identity(&c.identity_key)).await?,
        )),
        None => None,
    };
    let core = Arc::new(Core {
        cfg,
        raft,
        gate,
        metrics,
        view: ClusterView::default(),
        local: watch::channel(Local::default()).0,
        cluster: cluster_rx,
        started: tokio::time::Instant::now(),
        fence_agents: std::sync::Mutex::new(BTreeMap::new()),
        roster: Default::default(),
        chain_nodes: Default::default(),
        upgrade: Default::default(),
        chain_probe_errors: Default::default(),
        key_failures: Default::default(),
        heights: Default::default(),
    });
    let (req_tx, requests) = mpsc::channel(8);
    let (probe_tx, probe_rx) = watch::channel(None);
    let sh = Arc::new(Shared {
        core,
        peers,
        memory: store.memory.clone(),
        start_holds: store.holds,
        synced: store.log.synced(),
        refused: watch::channel(None).0,
        requests: req_tx,
        privval: PrivvalLinks::default(),
        probe_error: probe_rx,
        kernel_fence: match &fenced.kernel {
            fence::kernel::Status::On(_) => KernelFenceState::On,
            fence::kernel::Status::Off(why) => KernelFenceState::Off(why.to_string()),
        },
        tls: server_tls,
        certs: std::sync::Mutex::new(certs),
    });
    sh.core
        .metrics
        .kernel_fence
        .set(i64::from(fenced.kernel.plan().is_some()));
    let signer = keys.map(|(keys, identity)| {
        let signer = Signer::new(
            sh.core.clone(),
            sh.peers.clone(),
            (keys, modules),
            rand::random(),
        );
        (signer, identity)
    });
    Ok((sh, signer, Parts { requests, probe_tx }))
}

/// The peer port's server TLS, and the node's and the CA's certificate
/// dates.
type PeerTls = (
    Option<Arc<ServerTls>>,
    Option<(tls::CertInfo, tls::CertInfo)>,
);

/// The peer port's TLS, and its certificates' dates (logged); none with
/// `--insecure`, said loudly.
fn peer_tls(cfg: &Config, material: Option<&TlsMaterial>) -> Result<PeerTls, RunError> {
    let server_tls = material.map(ServerTls::new).transpose()?.map(Arc::new);
    let certs = material.map(|m| m.info()).transpose()?;
    if let Some((node, _)) = &certs {
        tracing::info!(
            expires = %node.not_after_text,
            days = node.expires_in() / 86_400,
            "peer certificate"
        );
    }
    if material.is_none() {
        tracing::warn!("INSECURE: peer traffic is plaintext and unauthenticated (--insecure); anyone who can reach {} can vote", cfg.listen);
    }
    Ok((server_tls, certs))
}

/// Step 9: whether this node forms, joins or rejoins the cluster, or
/// starts on its own log; a rejoining node votes only once the leader
/// took it back (and answers no Hello until then).
async fn bootstrap(sh: &Arc<Shared>, store: &Store) -> Result<Bootstrap, RunError> {
    let bootstrap = join::bootstrap(&sh.core.cfg, &*sh.peers, store.fresh, store.holds).await?;
    if bootstrap != Bootstrap::Rejoin {
        sh.core.gate.open_votes();
    }
    sh.core.gate.join();
    if matches!(bootstrap, Bootstrap::Initialize | Bootstrap::Join) {
        let members: BTreeMap<NodeId, BasicNode> = sh
            .core
            .cfg
            .members()
            .into_iter()
            .map(|(id, a)| (id, BasicNode::new(a)))
            .collect();
        match (sh.core.raft.initialize(members).await, bootstrap) {
            (Ok(()), Bootstrap::Join) => tracing::info!(
                "empty data dir: joining the existing cluster; its leader's log replaces this one"
            ),
            (Ok(()), _) => tracing::info!(
                "empty data dir: forming a new cluster of {} members",
                sh.core.cfg.members().len()
            ),
            (Err(e), _) => tracing::debug!("already initialised: {e}"),
        }
    }
    Ok(bootstrap)
}

/// The background tasks: gossip, registration, certificate reloads, the
/// leader's heartbeats, tuning, the member memory's flusher and, in signer
/// mode, the chain probes and a privval dialer per sentry.
fn spawn_tasks(
    sh: &Arc<Shared>,
    signer: Option<&SignerParts>,
    stop: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(gossip::run(sh.clone())),
        tokio::spawn({
            let sh = sh.clone();
            async move { join::register(&sh.core, &crate::admin::commands(&sh)).await }
        }),
        tokio::spawn(raft::heartbeat_while_leading(
            sh.core.raft.clone(),
            sh.core.gate.clone(),
        )),
        tokio::spawn(tuning::run(sh.core.clone())),
        tokio::spawn(sh.memory.clone().run_flusher(stop.clone())),
    ];
    if let Some((signer, identity)) = signer {
        let chains = signer.chains();
        tasks.extend(reload::start_chains(sh, signer, identity, &chains, stop));
    }
    tasks
}

/// The validator's supervisor and its health reports, in validator mode.
type Supervised = (
    Option<Validator>,
    Option<watch::Receiver<Option<health::Health>>>,
);

/// Validator mode: the health prober and the validator's supervisor (its
/// guard started). Nothing on a witness or in signer mode.
fn supervise(
    sh: &Arc<Shared>,
    fenced: &Fenced,
    probe_tx: watch::Sender<Option<String>>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Supervised, RunError> {
    let (Some(v), Some(links)) = (&sh.core.cfg.validator, fenced.links.clone()) else {
        return Ok((None, None));
    };
    let timing = sh.core.cfg.timing;
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
    if let Some(up) = &v.upgrades {
        tasks.push(tokio::spawn(crate::upgrade::watch_upgrades(
            up.clone(),
            timing.health_interval.max(Duration::from_millis(500)),
            sh.core.upgrade.clone(),
        )));
    }
    let node = Validator::spawn(
        v.clone(),
        links,
        prober,
        &sh.core.cfg.data_dir,
        fenced.tree.clone(),
        fenced.kernel.plan().cloned(),
        timing.kill_bound,
    )?;
    Ok((Some(node), Some(hrx)))
}

/// Teardown: Raft first (no more votes or acks), then the servers; the
/// log flushed, the kernel fence removed, the member memory persisted,
/// the tree's cgroup removed, and the data dir's lock let go last.
async fn tear_down(
    sh: &Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop_servers: shutdown::Trigger,
    servers: Vec<listen::Serving>,
    store: &Store,
    fenced: Fenced,
) {
    for t in &tasks {
        t.abort();
    }
    if let Err(e) = sh.core.raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    stop_servers.fire();
    for (server, s) in servers {
        if tokio::time::timeout(Duration::from_secs(2), s)
            .await
            .is_err()
        {
            tracing::info!(server, "a server did not drain in time");
        }
    }
    if let Err(e) = store.log.flush().await {
        tracing::warn!("final flush: {e}");
    }
    if let Some(plan) = fenced.kernel.plan().cloned() {
        match blocking(move || plan.remove()).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&fenced.table_file);
                tracing::info!("kernel fence removed");
            }
            Err(e) => tracing::warn!("cannot remove the kernel fence: {e}"),
        }
    }
    if let Err(e) = sh.memory.persist().await {
        tracing::warn!("final flush of what this node remembers of its peers: {e}");
    }
    fenced.tree.remove_cgroup();
    drop(fenced.lock);
    tracing::info!("stopped");
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
