//! Validator probes: what keyraft sees of the validator node through its own
//! RPC (neard's or CometBFT's `/status`, or any HTTP endpoint).
//!
//! Owns: the parsing of each node kind's status shape into [`Health`], and
//! the probe loop that publishes it. Must not: act on health; the
//! coordinator decides what an unsynced or silent node means.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::HealthKind;

/// What a probe saw: `{"running":..,"synced":..,"height":..}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    pub running: bool,
    pub synced: bool,
    pub height: Option<u64>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.running && self.synced
    }
}

/// As gossip carries it (no height: 0).
impl From<Health> for crate::pb::ValidatorHealth {
    fn from(h: Health) -> Self {
        crate::pb::ValidatorHealth {
            running: h.running,
            synced: h.synced,
            height: h.height.unwrap_or(0),
        }
    }
}

/// What this process remembers of the heights nodes reported for each
/// chain, for the signer's height limit (`signer::limit` holds the rule):
/// since when each member's node has stood at its height, and the height
/// the limit is measured from when no node speaks for the chain.
#[derive(Debug, Default)]
pub struct HeightMemory(std::sync::Mutex<BTreeMap<String, ChainHeights>>);

/// [`HeightMemory`] of one chain; times on tokio's clock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainHeights {
    /// Per member: the height its node last reported, and since when.
    pub seen: BTreeMap<u64, (u64, tokio::time::Instant)>,
    /// The height the limit stands on without a report, and when it last
    /// moved (`None` until the first look).
    pub base: Option<(u64, tokio::time::Instant)>,
}

impl HeightMemory {
    /// Runs `f` on `chain`'s memory.
    pub fn with<R>(&self, chain: &str, f: impl FnOnce(&mut ChainHeights) -> R) -> R {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(chain.to_string()).or_default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{url} unreachable: {why}")]
    Unreachable { url: String, why: String },
    #[error("{url} answered {code}")]
    Status { url: String, code: u16 },
    #[error("{url} answered something that is not {kind:?} status JSON: {why}")]
    Shape {
        url: String,
        kind: HealthKind,
        why: Missing,
    },
    #[error("{url} is a node of chain {network:?}, not of {chain}")]
    OtherChain {
        url: String,
        network: Option<String>,
        chain: String,
    },
}

#[derive(Clone)]
pub struct Prober {
    kind: HealthKind,
    url: String,
    http: reqwest::Client,
    /// The chain its node must belong to (CometBFT's
    /// `result.node_info.network`), where one is named.
    chain: Option<String>,
}

/// An HTTP client for probes that give up after `timeout`. With
/// `keep_alive` a node's connection stays open between its probes;
/// without, each probe opens its own and closes it: a connection kept
/// idle holds about 25 KB of buffers, which fifty chains' nodes probed
/// every few seconds would hold for nothing.
pub fn client(timeout: Duration, keep_alive: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(timeout);
    let builder = match keep_alive {
        true => builder,
        false => builder.pool_max_idle_per_host(0),
    };
    builder.build().unwrap_or_default()
}

impl Prober {
    /// A probe of its own client, which keeps the node's connection open.
    pub fn new(kind: HealthKind, base_url: &str, timeout: Duration) -> Prober {
        Self::with_client(kind, base_url, client(timeout, true))
    }

    /// A probe through `http` ([`client`]), which probes of other nodes
    /// may share.
    pub fn with_client(kind: HealthKind, base_url: &str, http: reqwest::Client) -> Prober {
        let base = base_url.trim_end_matches('/');
        // neard's and CometBFT's status live at /status; a URL that already
        // names it is taken as it is.
        let url = match kind {
            HealthKind::Near | HealthKind::Cometbft if !base.ends_with("/status") => {
                format!("{base}/status")
            }
            _ => base.to_string(),
        };
        Prober {
            kind,
            chain: None,
            url,
            http,
        }
    }

    /// A probe that takes an answer only from a node of chain `chain_id`:
    /// a `node-rpc` pointing at another chain's node must not bound this
    /// chain's heights.
    pub fn of_chain(mut self, chain_id: &str) -> Prober {
        self.chain = Some(chain_id.to_string());
        self
    }

    /// The URL probed.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn probe(&self) -> Result<Health, HealthError> {
        let unreachable = |e: reqwest::Error| HealthError::Unreachable {
            url: self.url.clone(),
            why: e.without_url().to_string(),
        };
        let resp = self.http.get(&self.url).send().await.map_err(unreachable)?;
        let code = resp.status();
        if self.kind == HealthKind::Http {
            return match code.is_success() {
                true => Ok(Health {
                    running: true,
                    synced: true,
                    height: None,
                }),
                false => Err(HealthError::Status {
                    url: self.url.clone(),
                    code: code.as_u16(),
                }),
            };
        }
        if !code.is_success() {
            return Err(HealthError::Status {
                url: self.url.clone(),
                code: code.as_u16(),
            });
        }
        let body: serde_json::Value = resp.json().await.map_err(unreachable)?;
        if let Some(chain) = &self.chain {
            let network = body["result"]["node_info"]["network"].as_str();
            if network != Some(chain.as_str()) {
                return Err(HealthError::OtherChain {
                    url: self.url.clone(),
                    network: network.map(str::to_string),
                    chain: chain.clone(),
                });
            }
        }
        parse(self.kind, &body).map_err(|why| HealthError::Shape {
            url: self.url.clone(),
            kind: self.kind,
            why,
        })
    }
}

/// A field a status body lacks, or holds as another JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no {0}")]
pub struct Missing(pub &'static str);

/// Reads a status body of the given kind.
pub fn parse(kind: HealthKind, v: &serde_json::Value) -> Result<Health, Missing> {
    match kind {
        HealthKind::Near => {
            let sync = &v["sync_info"];
            let syncing = sync["syncing"]
                .as_bool()
                .ok_or(Missing("sync_info.syncing"))?;
            let height = sync["latest_block_height"]
                .as_u64()
                .ok_or(Missing("sync_info.latest_block_height"))?;
            Ok(Health {
                running: true,
                synced: !syncing,
                height: Some(height),
            })
        }
        HealthKind::Cometbft => {
            let sync = &v["result"]["sync_info"];
            let catching_up = sync["catching_up"]
                .as_bool()
                .ok_or(Missing("result.sync_info.catching_up"))?;
            let height = sync["latest_block_height"]
                .as_str()
                .and_then(|h| h.parse().ok())
                .ok_or(Missing("result.sync_info.latest_block_height string"))?;
            Ok(Health {
                running: true,
                synced: !catching_up,
                height: Some(height),
            })
        }
        HealthKind::Http => Ok(Health {
            running: true,
            synced: true,
            height: None,
        }),
    }
}

/// Probes every `interval` and publishes the result (`None`: no answer),
/// and what went wrong, if anything, on `errors` (for status). Each new
/// failure is logged once: a node that is not up yet as info, an answer
/// that is not a status (a wrong URL or probe kind) as a warning.
pub async fn run(
    prober: Prober,
    interval: Duration,
    tx: watch::Sender<Option<Health>>,
    errors: watch::Sender<Option<String>>,
) {
    let hint = "check --health and --health-url";
    probe_every(prober, interval, "validator probe", hint, |seen, error| {
        if let Some(e) = error {
            errors.send_replace(e);
        }
        tx.send_if_modified(|cur| {
            let changed = *cur != seen;
            *cur = seen;
            changed
        });
    })
    .await
}

/// Signer mode, several chains: probes chain `chain_id`'s node (its
/// `node-rpc`) every `interval` and keeps what it reports in `nodes`
/// under the chain id (removed while it does not answer), where the
/// chain's height limit and gossip read it, and why it fails in `errors`
/// while it does, where status reads it.
pub async fn run_for_chain(
    prober: Prober,
    interval: Duration,
    chain_id: String,
    nodes: Arc<watch::Sender<BTreeMap<String, Health>>>,
    errors: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
) {
    let what = format!("chain {chain_id}'s node probe");
    probe_every(
        prober,
        interval,
        &what,
        "check its node-rpc",
        |seen, error| {
            if let Some(error) = error {
                let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                match error {
                    Some(e) => errors.insert(chain_id.clone(), e),
                    None => errors.remove(&chain_id),
                };
            }
            nodes.send_if_modified(|m| match seen {
                Some(h) => m.insert(chain_id.clone(), h) != Some(h),
                None => m.remove(&chain_id).is_some(),
            });
        },
    )
    .await
}

/// The loop of both probes: `publish` gets each result, and the error to
/// report when it changed (`Some(None)`: answering again). Each new failure
/// is logged once.
async fn probe_every(
    prober: Prober,
    interval: Duration,
    what: &str,
    hint: &str,
    mut publish: impl FnMut(Option<Health>, Option<Option<String>>),
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_err = String::new();
    loop {
        tick.tick().await;
        match prober.probe().await {
            Ok(h) => {
                let cleared = !last_err.is_empty();
                if cleared {
                    tracing::info!(url = prober.url(), "{what} answers");
                    last_err.clear();
                }
                publish(Some(h), cleared.then_some(None));
            }
            Err(e) => {
                let msg = e.to_string();
                let changed = msg != last_err;
                if changed {
                    match e {
                        HealthError::Unreachable { .. } => tracing::info!("{what}: {msg}"),
                        _ => tracing::warn!("{what}: {msg} ({hint})"),
                    }
                    last_err.clone_from(&msg);
                }
                publish(None, changed.then_some(Some(msg)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_url_that_names_the_status_path_is_taken_as_it_is() {
        let t = Duration::from_secs(1);
        for url in [
            "http://127.0.0.1:3030",
            "http://127.0.0.1:3030/",
            "http://127.0.0.1:3030/status",
        ] {
            assert_eq!(
                Prober::new(HealthKind::Near, url, t).url(),
                "http://127.0.0.1:3030/status"
            );
        }
        assert_eq!(
            Prober::new(HealthKind::Http, "http://h:1/health", t).url(),
            "http://h:1/health"
        );
    }

    #[tokio::test]
    async fn a_probe_that_gets_a_404_says_so() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, axum::Router::new()).await });
        let prober = Prober::new(
            HealthKind::Near,
            &format!("http://{addr}/wrong"),
            Duration::from_secs(2),
        );
        let (tx, _rx) = watch::channel(None);
        let (etx, mut erx) = watch::channel(None);
        tokio::spawn(run(prober, Duration::from_millis(50), tx, etx));
        let err = tokio::time::timeout(Duration::from_secs(5), erx.wait_for(|e| e.is_some()))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
        assert!(
            err.contains("/wrong/status") && err.contains("404"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_chain_probe_takes_only_a_node_of_its_chain() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = json!({"result": {
            "node_info": {"network": "osmosis-1"},
            "sync_info": {"catching_up": false, "latest_block_height": "77"},
        }});
        let app = axum::Router::new().route(
            "/status",
            axum::routing::get(move || async move { axum::Json(status) }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let probe = |chain: &str| {
            Prober::new(
                HealthKind::Cometbft,
                &format!("http://{addr}"),
                Duration::from_secs(2),
            )
            .of_chain(chain)
        };
        let h = probe("osmosis-1").probe().await.unwrap();
        assert_eq!(h.height, Some(77));
        let err = probe("cosmoshub-4").probe().await.unwrap_err().to_string();
        assert!(
            err.contains("\"osmosis-1\"") && err.contains("not of cosmoshub-4"),
            "{err}"
        );
    }

    /// A status endpoint that counts the connections made to it.
    async fn counting_node() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // One request per read is enough for these probes.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/health"), accepted)
    }

    #[tokio::test]
    async fn probes_without_keep_alive_hold_no_connection_between_them() {
        use std::sync::atomic::Ordering;
        for (keep_alive, connections) in [(true, 1), (false, 3)] {
            let (url, accepted) = counting_node().await;
            let http = client(Duration::from_secs(2), keep_alive);
            let a = Prober::with_client(HealthKind::Http, &url, http.clone());
            let b = Prober::with_client(HealthKind::Http, &url, http);
            for p in [&a, &b, &a] {
                assert!(p.probe().await.unwrap().healthy());
            }
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                connections,
                "keep_alive {keep_alive}"
            );
        }
    }

    #[test]
    fn near_shape() {
        let v = json!({"sync_info": {"syncing": false, "latest_block_height": 42}});
        assert_eq!(
            parse(HealthKind::Near, &v).unwrap(),
            Health {
                running: true,
                synced: true,
                height: Some(42)
            }
        );
        assert!(parse(HealthKind::Near, &json!({"sync_info": {}})).is_err());
    }

    #[test]
    fn cometbft_shape_has_string_heights() {
        let v = json!({"result": {"sync_info": {"catching_up": true, "latest_block_height": "5622165"}}});
        assert_eq!(
            parse(HealthKind::Cometbft, &v).unwrap(),
            Health {
                running: true,
                synced: false,
                height: Some(5622165)
            }
        );
        let numeric =
            json!({"result": {"sync_info": {"catching_up": true, "latest_block_height": 5}}});
        assert!(parse(HealthKind::Cometbft, &numeric).is_err());
    }
}
