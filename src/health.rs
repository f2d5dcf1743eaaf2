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
        let url = match kind {
            HealthKind::Near | HealthKind::Cometbft => format!("{base}/status"),
            HealthKind::Http => base.to_string(),
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

/// Probes every `interval` and publishes the result (`None`: no answer).
pub async fn run(prober: Prober, interval: Duration, tx: watch::Sender<Option<Health>>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_err = String::new();
    loop {
        tick.tick().await;
        let seen = match prober.probe().await {
            Ok(h) => {
                last_err.clear();
                Some(h)
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_err {
                    tracing::debug!("validator probe: {msg}");
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
