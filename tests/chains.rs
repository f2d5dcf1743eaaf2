//! Signer mode for several chains end to end: three `keyraft run --signer
//! cometbft` processes signing three chains (three fake chains as judges,
//! three keys, a sentry per chain on every host), with a leader killed, a
//! wrong chain id, a chain dropped from a member and a host with another key.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, Mode, NodeOpts};
use localnet::harness::eventually;

mod common;
use common::{no_equivocations_on_any_chain, sighup};

const BLOCK_MS: u64 = 500;
const SETTLE: Duration = Duration::from_secs(30);

/// The signer leader, as node `asked` sees it.
async fn leader(c: &Cluster, asked: u64) -> Result<u64> {
    eventually(SETTLE, "a signer leader", || async {
        let s = c.status(asked).await?;
        Ok(s["cluster"]["leader"].as_u64())
    })
    .await
}

/// Three chains: the first and two more, each with its own judge and key.
fn three_chains() -> Mode {
    Mode::Signer {
        chain_id: "keyraft-chains-test".into(),
        round_every: 4,
        validators: 2,
        more_chains: 2,
        halt: None,
    }
}

/// Waits until each of `sentries` signed chain number `chain` (in
/// [`Cluster::judges`]'s order) above height `after`; returns its height.
async fn chain_signed(c: &Cluster, chain: usize, after: u64, sentries: &[u64]) -> Result<u64> {
    let (name, judge) = c.judges()[chain];
    let s = judge
        .wait_signed_by(after, sentries, SETTLE)
        .await
        .with_context(|| format!("chain {name}\n{}", c.logs()))?;
    Ok(s.height)
}

/// [`chain_signed`] for every chain, above its height in `after`.
async fn every_chain_signed(c: &Cluster, after: &[u64], sentries: &[u64]) -> Result<Vec<u64>> {
    let mut heights = Vec::new();
    for (i, after) in after.iter().enumerate() {
        heights.push(chain_signed(c, i, *after, sentries).await?);
    }
    Ok(heights)
}

/// Each chain's height now.
async fn heights(c: &Cluster) -> Result<Vec<u64>> {
    let mut v = Vec::new();
    for (_, judge) in c.judges() {
        v.push(judge.totals().await?.height);
    }
    Ok(v)
}

/// Sign requests of `chain` answered with `result` on node `id`.
async fn chain_results(c: &Cluster, id: u64, chain: &str, result: &str) -> Result<f64> {
    let (chain, result) = (format!("chain=\"{chain}\""), format!("result=\"{result}\""));
    Ok(c.metrics(id)
        .await?
        .iter()
        .filter(|(k, _)| {
            k.starts_with("keyraft_sign_requests_total")
                && k.contains(&chain)
                && k.contains(&result)
        })
        .map(|(_, v)| v)
        .sum())
}

#[tokio::test]
async fn one_cluster_signs_three_chains_through_a_killed_leader() -> Result<()> {
    let mut c =
        Cluster::start_signers(3, BLOCK_MS, three_chains(), |_| NodeOpts::default()).await?;
    let chains: Vec<String> = c.judges().iter().map(|(id, _)| id.to_string()).collect();
    ensure!(chains.len() == 3, "{chains:?}");
    let before = every_chain_signed(&c, &[0, 0, 0], &[1, 2, 3]).await?;
    // Each chain is reported on its own, with its own watermark.
    let status = c.status(1).await?;
    let listed: Vec<&str> = status["signer"]["chains"]
        .as_array()
        .context("no chains in status")?
        .iter()
        .filter_map(|x| x["chain_id"].as_str())
        .collect();
    ensure!(listed == chains, "status lists {listed:?}: {status}");
    for ch in status["signer"]["chains"].as_array().into_iter().flatten() {
        ensure!(
            ch["watermark"]["height"].as_u64() > Some(0)
                && ch["connections"][0]["connected"] == true,
            "{ch}"
        );
    }
    // Each chain's heights are bounded by what its own nodes report
    // (`node-rpc`), not by its watermark plus 10,000,000.
    let now = heights(&c).await?;
    eventually(
        SETTLE,
        "each chain's height limit from its own nodes",
        || async {
            let s = c.status(1).await?;
            let limits: Vec<u64> = s["signer"]["chains"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|ch| ch["height_limit"]["height"].as_u64().unwrap_or(u64::MAX))
                .collect();
            let near = |(limit, h): (&u64, &u64)| {
                *limit > *h && *limit <= h + keyraft::signer::MAX_AHEAD_OF_CHAIN + 100
            };
            let ok = limits.len() == 3 && limits.iter().zip(&now).all(near);
            Ok(ok.then_some(()))
        },
    )
    .await
    .with_context(|| format!("chain heights {now:?}\n{}", c.logs()))?;
    probe_errors_are_shown_per_chain(&c).await?;
    // The leader's whole host dies: every chain signs again on the others.
    let l = leader(&c, 1).await?;
    c.kill_host(l)?;
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let t = Instant::now();
    let after = every_chain_signed(&c, &before, &rest).await?;
    eprintln!(
        "all three chains signed again {} ms after the kill",
        t.elapsed().as_millis()
    );
    // And once it is back, its sentries too, on every chain.
    c.spawn(l)?;
    every_chain_signed(&c, &after, &[1, 2, 3]).await?;
    no_equivocations_on_any_chain(&c).await?;
    for chain in &chains {
        ensure!(
            chain_results(&c, rest[0], chain, "signed").await? > 0.0,
            "no signatures counted for {chain}"
        );
    }
    Ok(())
}

/// Node 1's node for the second chain stops answering (SIGSTOP): node 1's
/// status, status table and `keyraft_chain_node_up` say so for that chain
/// alone, and clear once it answers again.
async fn probe_errors_are_shown_per_chain(c: &Cluster) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let other = &c.others[0];
    let sentry = other.sentries[&1].proc.as_ref().context("no sentry")?;
    let pid = Pid::from_raw(sentry.pid());
    let up = || async {
        c.metric(
            1,
            &format!("keyraft_chain_node_up{{chain=\"{}\"}}", other.chain_id),
        )
        .await
    };
    ensure!(up().await? == 1.0);
    let errors = || async {
        let s = c.status(1).await?;
        let v: Vec<(String, Option<String>)> = s["signer"]["chains"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|ch| {
                let id = ch["chain_id"].as_str().unwrap_or("").to_string();
                (id, ch["node_probe_error"].as_str().map(str::to_string))
            })
            .collect();
        anyhow::Ok(v)
    };
    kill(pid, Signal::SIGSTOP)?;
    let failing = async {
        eventually(SETTLE, "the probe error in status", || async {
            let v = errors().await?;
            let only = v
                .iter()
                .all(|(id, e)| e.is_some() == (*id == other.chain_id));
            Ok((only && up().await? == 0.0).then_some(()))
        })
        .await?;
        let table = c.cli(1, &["status"]).await?;
        let text = String::from_utf8_lossy(&table.stdout);
        let line = format!("node 1 chain {}'s node probe: ", other.chain_id);
        ensure!(text.contains(&line), "no {line:?} in the table: {text}");
        anyhow::Ok(())
    }
    .await;
    kill(pid, Signal::SIGCONT)?;
    failing?;
    eventually(SETTLE, "the probe error cleared", || async {
        let clear = errors().await?.iter().all(|(_, e)| e.is_none());
        Ok((clear && up().await? == 1.0).then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_wrong_chain_id_and_a_chain_the_leader_dropped_are_refused_and_the_rest_sign(
) -> Result<()> {
    // Host 3's sentry of the first chain asks with the second chain's id.
    let second = "keyraft-chains-test-2";
    let mut c = Cluster::start_signers(3, BLOCK_MS, three_chains(), |id| NodeOpts {
        fakenode: if id == 3 {
            vec!["--chain-id".into(), second.into()]
        } else {
            vec![]
        },
        ..NodeOpts::default()
    })
    .await?;
    let first = c.judges()[0].0.to_string();
    chain_signed(&c, 0, 0, &[1, 2]).await?;
    // Its own chain's connection refuses it (the key, and so every
    // signature); its other chains sign.
    let refused = format!("this connection serves chain {first}, not {second}");
    eventually(SETTLE, "host 3's wrong chain id refused", || async {
        let log = std::fs::read_to_string(c.dir.path().join("keyraft3.log"))?;
        Ok(log.contains(&refused).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    chain_signed(&c, 1, 0, &[1, 2, 3]).await?;
    chain_signed(&c, 2, 0, &[1, 2, 3]).await?;
    ensure!(
        c.chain
            .stats_since(0)
            .await?
            .first_signed_by(3, 0)
            .is_none(),
        "a request with another chain's id was signed"
    );

    // A rolling change drops the third chain from host 3 (its sentry goes
    // too); host 3 then leads: the others' requests for that chain are
    // refused as a chain it does not sign for, the first two sign on.
    let third = c.judges()[2].0.to_string();
    c.others[1].sentries.remove(&3);
    c.kill_coordinator(3)?;
    c.forget(3)?;
    c.spawn(3)?;
    eventually(SETTLE, "node 3 to lead", || async {
        if let Some((3, _)) = c.agreed_leader(&[1, 2, 3]).await? {
            return Ok(Some(()));
        }
        c.cli(1, &["switchover", "--to", "3"]).await?;
        Ok(None)
    })
    .await
    .with_context(|| c.logs())?;
    let now = heights(&c).await?;
    eventually(
        SETTLE,
        "requests for the dropped chain refused by leader 3",
        || async {
            let n = chain_results(&c, 1, &third, "refused_chain_id").await?
                + chain_results(&c, 2, &third, "refused_chain_id").await?;
            Ok((n > 0.0).then_some(()))
        },
    )
    .await
    .with_context(|| c.logs())?;
    chain_signed(&c, 0, now[0], &[1, 2]).await?;
    chain_signed(&c, 1, now[1], &[1, 2, 3]).await?;
    no_equivocations_on_any_chain(&c).await?;
    let log = std::fs::read_to_string(c.dir.path().join("keyraft3.log"))?;
    ensure!(
        log.contains("does not sign for"),
        "no log line on leader 3 names the refused chain"
    );
    Ok(())
}

#[tokio::test]
async fn a_host_with_another_key_for_one_chain_is_refused_for_it_alone() -> Result<()> {
    // Host 3 was given another key for the second chain.
    let mut c = Cluster::start_signers(3, BLOCK_MS, three_chains(), |id| NodeOpts {
        other_key: id == 3,
        ..NodeOpts::default()
    })
    .await?;
    // Led by a host with the cluster's keys.
    eventually(SETTLE, "node 1 to lead", || async {
        if let Some((1, _)) = c.agreed_leader(&[1, 2, 3]).await? {
            return Ok(Some(()));
        }
        c.cli(2, &["switchover", "--to", "1"]).await?;
        Ok(None)
    })
    .await
    .with_context(|| c.logs())?;
    let now = heights(&c).await?;
    let second = c.judges()[1].0.to_string();
    // Gossip names host 3 on every member, node 2 included (a follower:
    // no forwarded request of host 3 ever reaches it), for the second
    // chain alone, before and apart from any refused request.
    let chains: Vec<String> = c.judges().iter().map(|(id, _)| id.to_string()).collect();
    eventually(SETTLE, "every member to name host 3's key", || async {
        for (id, want) in [
            (1, [0.0, 1.0, 0.0]),
            (2, [0.0, 1.0, 0.0]),
            (3, [0.0, 2.0, 0.0]),
        ] {
            let m = c.metrics(id).await?;
            for (chain, want) in chains.iter().zip(want) {
                let got = m
                    .iter()
                    .find(|(k, _)| {
                        k.starts_with("keyraft_signer_other_key_members")
                            && k.contains(&format!("chain=\"{chain}\""))
                    })
                    .map(|(_, v)| *v);
                if got != Some(want) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let v = c.status(2).await?;
    let second_status = &v["signer"]["chains"][1];
    let named = second_status["other_keys"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        named.len() == 1
            && named[0]["node"] == 3
            && named[0]["address"].is_string()
            && named[0]["address"] != second_status["address"],
        "node 2's status does not name host 3's key: {second_status}"
    );
    // Host 3's key is outvoted (two members hold the other one): it may
    // not lead, so a switchover to it is refused, and it says why.
    let out = c.cli(1, &["switchover", "--to", "3"]).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("node 3") && err.contains("may not"),
        "a switchover to host 3 was not refused: {out:?}"
    );
    let log3 = std::fs::read_to_string(c.dir.path().join("keyraft3.log"))?;
    ensure!(
        log3.contains("this host may not lead: 2 members hold key"),
        "host 3 did not say why it may not lead"
    );
    let table = String::from_utf8_lossy(&c.cli(2, &["status"]).await?.stdout).to_string();
    ensure!(
        table.matches("ANOTHER KEY on node 3").count() == 1,
        "node 2's status table does not name host 3's key once:\n{table}"
    );
    eventually(
        SETTLE,
        "host 3's requests for the second chain refused",
        || async {
            Ok((chain_results(&c, 3, &second, "refused_other_key").await? > 0.0).then_some(()))
        },
    )
    .await
    .with_context(|| c.logs())?;
    // Every chain signs on; host 3 signs the first and third.
    chain_signed(&c, 0, now[0], &[1, 2, 3]).await?;
    chain_signed(&c, 1, now[1], &[1, 2]).await?;
    chain_signed(&c, 2, now[2], &[1, 2, 3]).await?;
    let s = c.judges()[1].1.stats_since(now[1] + 1).await?;
    ensure!(
        s.first_signed_by(3, now[1]).is_none(),
        "host 3 got a second-chain signature with another key"
    );
    no_equivocations_on_any_chain(&c).await?;
    let log = std::fs::read_to_string(c.dir.path().join("keyraft1.log"))?;
    ensure!(
        log.contains(&format!(
            "node 3's key for chain {second} is not the leader's"
        )),
        "no log line on the leader names host 3's key"
    );
    let log = std::fs::read_to_string(c.dir.path().join("keyraft2.log"))?;
    ensure!(
        log.contains("node 3 has the key with address")
            && log.contains(&format!("for chain {second}, this host")),
        "no log line on node 2 names host 3's key"
    );

    // The operator gives host 3 the right key and reloads it. Host 3 may
    // have led, and signed with the wrong key, before gossip outvoted it:
    // then the reload is refused (a key signed with stays for the life of
    // the process). Else the reload takes the key: no member names host 3
    // any more, and its second-chain sentry signs.
    let signed_wrong = chain_results(&c, 3, &second, "signed").await? > 0.0;
    let file = c.chains_file(3);
    let wrong = key_of(&std::fs::read_to_string(&file)?, &second)?;
    let right = c.others[0].key_path.display().to_string();
    let text = std::fs::read_to_string(&file)?.replace(&wrong, &right);
    std::fs::write(&file, text)?;
    sighup(&c, 3)?;
    if signed_wrong {
        let refused = "SIGHUP: chains not reloaded, nothing changed: chain ";
        return eventually(SETTLE, "the reload refused", || async {
            let log = std::fs::read_to_string(c.dir.path().join("keyraft3.log"))?;
            Ok(
                (log.contains(refused)
                    && log.contains("a chain's key changes only with a restart"))
                .then_some(()),
            )
        })
        .await
        .with_context(|| c.logs());
    }
    eventually(SETTLE, "no member to name host 3's key", || async {
        for id in 1..=3 {
            let named = c
                .metrics(id)
                .await?
                .iter()
                .filter(|(k, _)| k.starts_with("keyraft_signer_other_key_members"))
                .map(|(_, v)| *v)
                .sum::<f64>();
            if named != 0.0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let log3 = std::fs::read_to_string(c.dir.path().join("keyraft3.log"))?;
    let changed =
        format!("SIGHUP: chains reloaded: added none; removed none; changed {second}; 2 untouched");
    ensure!(log3.contains(&changed), "no {changed:?} in host 3's log");
    // Its node read the wrong public key when it connected, as CometBFT
    // does at start: the operator restarts it.
    let log_dir = c.dir.path().to_path_buf();
    let other = &mut c.others[0];
    let (url, name) = (
        other.chain.url.clone(),
        format!("{}-sentry", other.chain_id),
    );
    let sentry = other.sentries.get_mut(&3).context("no sentry 3")?;
    sentry.proc = None;
    sentry.start(&url, &name, &log_dir)?;
    let now = heights(&c).await?;
    chain_signed(&c, 1, now[1], &[1, 2, 3]).await?;
    no_equivocations_on_any_chain(&c).await?;
    Ok(())
}

/// The `validator-key` of `chain` in a `[[chains]]` file's `text`.
fn key_of(text: &str, chain: &str) -> Result<String> {
    let file: toml::Table = toml::from_str(text)?;
    file["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t.get("chain-id").and_then(toml::Value::as_str) == Some(chain))
        .and_then(|t| t.get("validator-key")?.as_str().map(String::from))
        .with_context(|| format!("no {chain} in {text}"))
}

/// The chain ids node `id`'s status lists.
async fn listed(c: &Cluster, id: u64) -> Result<Vec<String>> {
    let status = c.status(id).await?;
    Ok(status["signer"]["chains"]
        .as_array()
        .context("no chains in status")?
        .iter()
        .filter_map(|x| x["chain_id"].as_str().map(String::from))
        .collect())
}

/// Writes node `id`'s `[[chains]]` file again without the chains
/// `left_out`, and reloads it.
fn reload_chains(c: &Cluster, id: u64, left_out: &[&str]) -> Result<()> {
    let mut file: toml::Table = toml::from_str(&c.chains_toml(id)?)?;
    if let Some(toml::Value::Array(chains)) = file.get_mut("chains") {
        chains.retain(|t| {
            let chain = t.get("chain-id").and_then(toml::Value::as_str);
            !left_out.iter().any(|l| chain == Some(*l))
        });
    }
    std::fs::write(c.chains_file(id), toml::to_string(&file)?)?;
    sighup(c, id)
}

/// Reloads every member with `left_out` left out of its file, and waits
/// until each lists `want`.
async fn reload_every_member(c: &Cluster, left_out: &[&str], want: &[&str]) -> Result<()> {
    for id in 1..=3 {
        reload_chains(c, id, left_out)?;
    }
    for id in 1..=3 {
        eventually(SETTLE, "the reload applied", || async {
            Ok((listed(c, id).await? == want).then_some(()))
        })
        .await
        .with_context(|| format!("node {id}\n{}", c.logs()))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_reload_adds_and_removes_chains_while_the_others_sign_on() -> Result<()> {
    let c = Cluster::start_signers(3, BLOCK_MS, three_chains(), |_| NodeOpts::default()).await?;
    let ids: Vec<String> = c.judges().iter().map(|(id, _)| id.to_string()).collect();
    let (first, second, third) = (ids[0].as_str(), ids[1].as_str(), ids[2].as_str());
    every_chain_signed(&c, &[0, 0, 0], &[1, 2, 3]).await?;
    let missed = c.judges()[0].1.totals().await?.missed;

    // A file changed outside [[chains]] changes nothing, in one line.
    let file = c.chains_file(1);
    let text = std::fs::read_to_string(&file)?;
    std::fs::write(&file, format!("log-format = \"json\"\n{text}"))?;
    sighup(&c, 1)?;
    let refused = "SIGHUP: chains not reloaded, nothing changed: `log-format` changed";
    eventually(SETTLE, "the reload refused", || async {
        let log = std::fs::read_to_string(c.dir.path().join("keyraft1.log"))?;
        Ok(log.contains(refused).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    std::fs::write(&file, text)?;
    ensure!(
        listed(&c, 1).await? == ids,
        "a refused reload changed the chains"
    );

    // The third chain removed on every member: its nodes are no longer
    // signed for, the first two sign on.
    reload_every_member(&c, &[third], &[first, second]).await?;
    let third_judge = c.judges()[2].1;
    let stopped = third_judge.totals().await?.height;
    let now = heights(&c).await?;
    chain_signed(&c, 0, now[0] + 3, &[1, 2, 3]).await?;
    chain_signed(&c, 1, now[1] + 3, &[1, 2, 3]).await?;
    let s = third_judge.stats_since(0).await?;
    let last = (1..=3)
        .filter_map(|n| s.last_signed_by(n))
        .max()
        .unwrap_or(0);
    ensure!(
        last <= stopped + 1,
        "the removed chain was signed at {last}, after its removal at {stopped}"
    );
    let m = c.metrics(1).await?;
    let shown = |chain: &str| {
        m.iter().any(|(k, _)| {
            k.starts_with("keyraft_privval_connected") && k.contains(&format!("\"{chain}\""))
        })
    };
    ensure!(
        !shown(third),
        "the removed chain's connections are still shown"
    );

    // In one reload the third chain is added again and the second removed:
    // the third signs again, the first signs on.
    reload_every_member(&c, &[second], &[first, third]).await?;
    let now = heights(&c).await?;
    chain_signed(&c, 2, now[2], &[1, 2, 3]).await?;
    chain_signed(&c, 0, now[0] + 3, &[1, 2, 3]).await?;
    // The added chain's series start again; the removed one's go.
    let m = c.metrics(1).await?;
    let key_up = |chain: &str| {
        m.iter()
            .find(|(k, _)| {
                k.starts_with("keyraft_signer_key_up") && k.contains(&format!("\"{chain}\""))
            })
            .map(|(_, v)| *v)
    };
    ensure!(
        key_up(third) == Some(1.0) && key_up(second).is_none(),
        "key_up after the reload: {third} {:?}, {second} {:?}",
        key_up(third),
        key_up(second)
    );
    let log = std::fs::read_to_string(c.dir.path().join("keyraft1.log"))?;
    let applied = format!(
        "SIGHUP: chains reloaded: added {third}; removed {second}; changed none; 1 untouched"
    );
    ensure!(log.contains(&applied), "no {applied:?} in node 1's log");

    // Not one height of the first chain went unsigned through the reloads.
    ensure!(
        c.judges()[0].1.totals().await?.missed == missed,
        "the first chain missed heights during the reloads\n{}",
        c.logs()
    );
    no_equivocations_on_any_chain(&c).await
}
