//! Validator probes: what keyraft sees of the validator node through its own
//! RPC (neard's or CometBFT's `/status`, or any HTTP endpoint).
//!
//! Owns: the parsing of each node kind's status shape into [`Health`], and
//! the probe loop that publishes it. Must not: act on health; the
//! coordinator decides what an unsynced or silent node means.

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
        why: String,
    },
}

#[derive(Clone)]
pub struct Prober {
    kind: HealthKind,
    url: String,
    http: reqwest::Client,
}

impl Prober {
    pub fn new(kind: HealthKind, base_url: &str, timeout: Duration) -> Prober {
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
            url,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
        }
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
        parse(self.kind, &body).map_err(|why| HealthError::Shape {
            url: self.url.clone(),
            kind: self.kind,
            why,
        })
    }
}

/// Reads a status body of the given kind.
pub fn parse(kind: HealthKind, v: &serde_json::Value) -> Result<Health, String> {
    match kind {
        HealthKind::Near => {
            let sync = &v["sync_info"];
            let syncing = sync["syncing"].as_bool().ok_or("no sync_info.syncing")?;
            let height = sync["latest_block_height"]
                .as_u64()
                .ok_or("no sync_info.latest_block_height")?;
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
                .ok_or("no result.sync_info.catching_up")?;
            let height = sync["latest_block_height"]
                .as_str()
                .and_then(|h| h.parse().ok())
                .ok_or("no result.sync_info.latest_block_height string")?;
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
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_err = String::new();
    loop {
        tick.tick().await;
        let seen = match prober.probe().await {
            Ok(h) => {
                if !last_err.is_empty() {
                    tracing::info!(url = prober.url(), "validator probe answers");
                    last_err.clear();
                    errors.send_replace(None);
                }
                Some(h)
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_err {
                    match e {
                        HealthError::Unreachable { .. } => {
                            tracing::info!("validator probe: {msg}")
                        }
                        _ => tracing::warn!(
                            "validator probe: {msg} (check --health and --health-url)"
                        ),
                    }
                    errors.send_replace(Some(msg.clone()));
                    last_err = msg;
                }
                None
            }
        };
        tx.send_if_modified(|cur| {
            let changed = *cur != seen;
            *cur = seen;
            changed
        });
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
