//! Signer mode with the key in hardware: three signer hosts, each with a
//! SoftHSM2 token of its own (its own token directory and
//! `SOFTHSM2_CONF`) holding the same key, put there by `keyraft signer
//! import-key` as an operator does; every signature is the token's, made
//! through PKCS#11. The CometBFT judge counts equivocations and missed
//! heights. Faults are real: the leader's host SIGKILLed, frozen and cut
//! off; the leader's token directory moved away (SoftHSM2 then fails every
//! call on it) and back; a host whose token holds another key; tokens
//! configured wrong; reloads that meet a hung token or a module that
//! never loads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{Cluster, Mode, NodeOpts};
use localnet::harness::eventually;
use localnet::token::{KeyIn, Token};

mod common;
use common::{
    every_sentry_signed, kill_the_leaders_host, leader, no_equivocations,
    no_equivocations_on_any_chain, sighup,
};

const BLOCK_MS: u64 = 500;
const SETTLE: Duration = Duration::from_secs(30);
const CHAIN: &str = "keyraft-hardware-test";

/// Signer mode with two chains: `CHAIN`, whose key the hosts' tokens hold
/// (`KeyIn::Token`), and one more whose key is a file.
fn two_chains() -> Mode {
    Mode::Signer {
        chain_id: CHAIN.into(),
        round_every: 0,
        validators: 2,
        more_chains: 1,
        halt: None,
    }
}

async fn start(key_in: impl Fn(u64) -> KeyIn) -> Result<Cluster> {
    let c = Cluster::start_signers(3, BLOCK_MS, Mode::signer(CHAIN), |id| NodeOpts {
        key_in: key_in(id),
        ..NodeOpts::default()
    })
    .await?;
    Ok(c)
}

fn base(c: &Cluster, id: u64) -> PathBuf {
    let data = &c.nodes[&id].data;
    data.parent().unwrap_or(data).to_path_buf()
}

/// What node `id`'s metrics say of its key for the chain (1: it signs).
async fn key_up(c: &Cluster, id: u64) -> Result<f64> {
    c.metric(id, &format!("keyraft_signer_key_up{{chain=\"{CHAIN}\"}}"))
        .await
}

#[tokio::test]
async fn tokens_on_every_host_survive_the_leaders_kill_freeze_and_cut_without_equivocation(
) -> Result<()> {
    let mut c = start(|_| KeyIn::Token).await?;
    every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    // The key is the token's: the status names it, not a file.
    let status = c.status(1).await?;
    let key = status["signer"]["chains"][0]["key"].as_str().unwrap_or("");
    ensure!(key.starts_with("pkcs11:token=localnet"), "{status}");

    let (_, missed, s) = kill_the_leaders_host(&mut c).await?;
    eprintln!("kill: {missed} heights missed");
    let killed = (1..=3).find(|n| !c.running(*n)).context("no host killed")?;
    c.spawn(killed)?;
    every_sentry_signed(&c, s.height + 1, &[1, 2, 3]).await?;

    let l = leader(&c, &[1, 2, 3]).await?;
    let frozen_at = c.chain.totals().await?;
    c.freeze(l, true, true)?;
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let s = every_sentry_signed(&c, frozen_at.height, &rest).await?;
    c.freeze(l, true, false)?;
    let s = every_sentry_signed(&c, s.height + 1, &[1, 2, 3]).await?;

    let l = leader(&c, &[1, 2, 3]).await?;
    c.isolate(l);
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let s = every_sentry_signed(&c, s.height, &rest).await?;
    c.heal();
    every_sentry_signed(&c, s.height + 1, &[1, 2, 3]).await?;
    no_equivocations(&c).await?;
    Ok(())
}

/// How a test makes a token fail, and answer again.
struct TokenFault {
    key_in: KeyIn,
    fail: fn(&Token) -> Result<()>,
    answer: fn(&Token) -> Result<()>,
}

/// The leader's token fails (SoftHSM2 fails every call): it refuses to
/// sign (never half a signature), stands aside, and a host whose token
/// works leads; its own sentry keeps signing through the new leader. It
/// may lead again only once its token answers.
#[tokio::test]
async fn a_leader_whose_token_fails_hands_over_and_leads_again_only_once_it_answers() -> Result<()>
{
    token_fails_and_answers(TokenFault {
        key_in: KeyIn::Token,
        fail: Token::fail,
        answer: Token::restore,
    })
    .await
}

/// The same, with a token that stops answering instead: every call to it
/// hangs (the tests' PKCS#11 module in front of SoftHSM2), as a wedged HSM
/// does. A signature waits for it at most `TOKEN_PATIENCE` and is then
/// refused; its probe hangs with it and marks it failing.
#[tokio::test]
async fn a_leader_whose_token_hangs_hands_over_and_leads_again_only_once_it_answers() -> Result<()>
{
    token_fails_and_answers(TokenFault {
        key_in: KeyIn::HangingToken,
        fail: Token::hang,
        answer: Token::answer,
    })
    .await
}

async fn token_fails_and_answers(fault: TokenFault) -> Result<()> {
    let c = start(|_| fault.key_in).await?;
    every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    let l = leader(&c, &[1, 2, 3]).await?;
    let token = Token::at(&base(&c, l));
    let before = c.chain.totals().await?;
    let t = std::time::Instant::now();
    (fault.fail)(&token)?;
    let others: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let new = eventually(SETTLE, "another host leading", || async {
        let now = leader(&c, &others).await?;
        Ok((now != l).then_some(now))
    })
    .await
    .with_context(|| c.logs())?;
    // Every sentry signs again, the failed host's through the new leader.
    let s = every_sentry_signed(&c, before.height + 1, &[1, 2, 3]).await?;
    let missed = s.missed - before.missed;
    eprintln!(
        "token of leader {l} failed: node {new} leads, every sentry signed again {} ms later; {missed} heights missed",
        t.elapsed().as_millis()
    );
    ensure!(
        missed <= 10,
        "{missed} heights missed for a failed token\n{}",
        c.logs()
    );
    ensure!(key_up(&c, l).await? == 0.0, "node {l} says its key signs");
    // While its token fails, it may not lead.
    let out = c.cli(new, &["switchover", "--to", &l.to_string()]).await?;
    ensure!(
        !out.status.success(),
        "a switchover to the host whose token fails was taken: {out:?}"
    );
    // Its token answers again: the probe sees it, and it may lead.
    (fault.answer)(&token)?;
    eventually(SETTLE, "the restored token answering", || async {
        Ok((key_up(&c, l).await? == 1.0).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    eventually(SETTLE, "a switchover back to the restored host", || async {
        let out = c
            .cli(
                leader(&c, &others).await?,
                &["switchover", "--to", &l.to_string()],
            )
            .await?;
        Ok(out.status.success().then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let back = c.chain.totals().await?;
    eventually(SETTLE, "the restored host leading", || async {
        Ok((leader(&c, &[1, 2, 3]).await? == l).then_some(()))
    })
    .await?;
    every_sentry_signed(&c, back.height + 1, &[1, 2, 3]).await?;
    let s = no_equivocations(&c).await?;
    ensure!(s.double_signs == 0);
    Ok(())
}

/// A host given a token with another key: every member names it, it never
/// leads (a switchover to it is refused, and after the leader's kill the
/// other host leads), and its sentry gets no signature.
#[tokio::test]
async fn a_token_holding_another_key_is_named_and_its_host_never_leads() -> Result<()> {
    let mut c = start(|id| match id {
        3 => KeyIn::TokenWithAnotherKey,
        _ => KeyIn::Token,
    })
    .await?;
    every_sentry_signed(&c, 0, &[1, 2]).await?;
    let other_keys = format!("keyraft_signer_other_key_members{{chain=\"{CHAIN}\"}}");
    eventually(SETTLE, "node 1 naming host 3's other key", || async {
        Ok((c.metric(1, &other_keys).await? == 1.0).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let l = leader(&c, &[1, 2]).await?;
    ensure!(l != 3, "host 3 leads with another key");
    let out = c.cli(l, &["switchover", "--to", "3"]).await?;
    ensure!(
        !out.status.success(),
        "a switchover to host 3 was taken: {out:?}"
    );
    // The leader's host killed: the one other host with the key leads.
    let killed_at = c.chain.totals().await?;
    c.kill_host(l)?;
    let good = if l == 1 { 2 } else { 1 };
    let s = every_sentry_signed(&c, killed_at.height, &[good]).await?;
    let now = leader(&c, &[good, 3]).await?;
    ensure!(now == good, "node {now} leads, not node {good}");
    c.chain.wait_height(s.height + 4, SETTLE).await?;
    let s = no_equivocations(&c).await?;
    ensure!(
        s.first_signed_by(3, 0).is_none(),
        "host 3's sentry got a signature"
    );
    Ok(())
}

/// Two chains from one cluster, each with its own backend: the first's key
/// in each host's token, the second's in a file. Both sign through every
/// sentry, through the leader's kill, with no equivocation on either.
#[tokio::test]
async fn a_token_chain_and_a_file_chain_sign_side_by_side() -> Result<()> {
    let mut c = Cluster::start_signers(3, BLOCK_MS, two_chains(), |_| NodeOpts {
        key_in: KeyIn::Token,
        ..NodeOpts::default()
    })
    .await?;
    let keys: Vec<String> = c.status(1).await?["signer"]["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ch| ch["key"].as_str().unwrap_or("").to_string())
        .collect();
    ensure!(
        keys.len() == 2 && keys[0].starts_with("pkcs11:") && keys[1].ends_with(".json"),
        "{keys:?}"
    );
    let signed = |c: &Cluster, after: Vec<u64>, sentries: Vec<u64>| {
        let judges: Vec<_> = c.judges().into_iter().map(|(_, j)| j.clone()).collect();
        async move {
            let mut heights = Vec::new();
            for (judge, after) in judges.iter().zip(after) {
                heights.push(judge.wait_signed_by(after, &sentries, SETTLE).await?.height);
            }
            anyhow::Ok(heights)
        }
    };
    let at = signed(&c, vec![0, 0], vec![1, 2, 3])
        .await
        .with_context(|| c.logs())?;
    let l = leader(&c, &[1, 2, 3]).await?;
    c.kill_host(l)?;
    let rest: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    signed(&c, at, rest).await.with_context(|| c.logs())?;
    no_equivocations_on_any_chain(&c).await
}

/// The leader's token fails and its host hands over; a reload on that host
/// moves the chain's key from the token to the same key in a file (a
/// changed chain: its key opened again). The failure the token left is
/// cleared with it: the host may lead again, and leads, though its token
/// is still gone. Both chains' judges count no equivocation, and at most
/// ten heights missed from the reload through the switchover back.
#[tokio::test]
async fn a_host_whose_token_failed_leads_again_once_a_reload_moves_its_key_to_a_file() -> Result<()>
{
    let c = Cluster::start_signers(3, BLOCK_MS, two_chains(), |_| NodeOpts {
        key_in: KeyIn::Token,
        ..NodeOpts::default()
    })
    .await?;
    let l = leader(&c, &[1, 2, 3]).await?;
    every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    Token::at(&base(&c, l)).fail()?;
    let others: Vec<u64> = (1..=3).filter(|n| *n != l).collect();
    let new = eventually(SETTLE, "another host leading", || async {
        let now = leader(&c, &others).await?;
        Ok((now != l).then_some(now))
    })
    .await
    .with_context(|| c.logs())?;
    ensure!(key_up(&c, l).await? == 0.0, "node {l} says its key signs");

    // The chain's key moves to a file on the failed host alone.
    let mut file: toml::Table = toml::from_str(&c.chains_toml(l)?)?;
    let table = file
        .get_mut("chains")
        .and_then(toml::Value::as_array_mut)
        .and_then(|a| {
            a.iter_mut()
                .find(|t| t.get("chain-id").and_then(toml::Value::as_str) == Some(CHAIN))
        })
        .and_then(toml::Value::as_table_mut)
        .context("no [[chains]] table of the token chain")?;
    table.insert(
        "validator-key".into(),
        c.key_path.display().to_string().into(),
    );
    std::fs::write(c.chains_file(l), toml::to_string(&file)?)?;
    sighup(&c, l)?;
    eventually(SETTLE, "the key opened again signing", || async {
        Ok((key_up(&c, l).await? == 1.0).then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    let mut from = Vec::new();
    for (_, judge) in c.judges() {
        from.push(judge.totals().await?.height);
    }
    eventually(SETTLE, "the reloaded host leading", || async {
        let now = leader(&c, &[1, 2, 3]).await?;
        if now != l {
            c.cli(now, &["switchover", "--to", &l.to_string()]).await?;
            return Ok(None);
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| format!("node {new} led\n{}", c.logs()))?;
    let back = c.chain.totals().await?;
    every_sentry_signed(&c, back.height + 1, &[1, 2, 3]).await?;
    for ((chain, judge), from) in c.judges().into_iter().zip(from) {
        let missed = judge.stats_since(from + 1).await?.missed;
        eprintln!("{chain}: {missed} heights missed through the switchover back");
        ensure!(
            missed <= 10,
            "{chain}: {missed} heights missed\n{}",
            c.logs()
        );
    }
    no_equivocations_on_any_chain(&c).await
}

/// A reload that opens a key in a token that has stopped answering (its
/// calls hang) gives up after its limit and changes nothing, in one line;
/// the chains already signed for sign on, and a later reload that opens
/// only a key file goes through while the token still hangs. SIGTERM
/// then stops the host, its threads still stuck in the token.
#[tokio::test]
async fn a_reload_that_meets_a_hung_token_changes_nothing_and_the_next_one_goes_through(
) -> Result<()> {
    let (mut c, f, token) = two_chains_signing(KeyIn::HangingToken).await?;
    let before = listed(c.status(f).await?);
    let missed = missed_by_chain(&c).await?;
    token.hang()?;

    // A chain added with its key in the hung token.
    with_chain(&c, f, token.uri_through(&token.hanging_module()))?;
    reload_given_up(&c, f).await?;
    ensure!(
        listed(c.status(f).await?) == before,
        "a reload given up changed the chains"
    );
    let now = c.chain.totals().await?;
    every_sentry_signed(&c, now.height, &[1, 2, 3]).await?;

    // The same chain with its key in a file: opened, though the token
    // still hangs.
    with_chain(&c, f, c.key_path.display().to_string())?;
    chain_added(&c, f).await?;
    let now = c.chain.totals().await?;
    every_sentry_signed(&c, now.height, &[1, 2, 3]).await?;
    no_equivocations_on_any_chain(&c).await?;
    // A follower's hung token is its own business: the leader signed
    // every height of every chain throughout.
    none_missed_since(&c, missed).await?;

    // Its threads stuck in the token (the probe, the reload given up) do
    // not keep it from stopping.
    stops_on_sigterm(&mut c, f).await?;
    token.answer()
}

/// Three signers for [`two_chains`], their keys where `key_in` says,
/// every sentry signing: the cluster, a follower and its token.
async fn two_chains_signing(key_in: KeyIn) -> Result<(Cluster, u64, Token)> {
    let c = Cluster::start_signers(3, BLOCK_MS, two_chains(), |_| NodeOpts {
        key_in,
        ..NodeOpts::default()
    })
    .await?;
    every_sentry_signed(&c, 0, &[1, 2, 3]).await?;
    let l = leader(&c, &[1, 2, 3]).await?;
    let f = (1..=3).find(|n| *n != l).context("no follower")?;
    let token = Token::at(&base(&c, f));
    Ok((c, f, token))
}

/// Node `f` stops within 10 s of SIGTERM, its threads stuck in a token
/// or a module as they may be.
async fn stops_on_sigterm(c: &mut Cluster, f: u64) -> Result<()> {
    c.signal(f, nix::sys::signal::Signal::SIGTERM)?;
    c.forget(f)?
        .context("not running")?
        .wait_exit(Duration::from_secs(10))
        .await
        .with_context(|| format!("node {f} did not stop on SIGTERM"))?;
    Ok(())
}

/// The chain id [`with_chain`] adds.
const ADDED: &str = "keyraft-hardware-added";

/// Node `f`'s chains file with one more chain, [`ADDED`], its key at
/// `key` and its node one that is not up (its connection retries), and
/// the file applied with SIGHUP.
fn with_chain(c: &Cluster, f: u64, key: String) -> Result<()> {
    let mut file: toml::Table = toml::from_str(&c.chains_toml(f)?)?;
    let chains = file
        .get_mut("chains")
        .and_then(toml::Value::as_array_mut)
        .context("no [[chains]]")?;
    let mut added = chains
        .first()
        .and_then(toml::Value::as_table)
        .cloned()
        .context("no chain")?;
    added.insert("chain-id".into(), ADDED.into());
    added.insert("validator-key".into(), key.into());
    added.insert("privval-node".into(), vec!["tcp://127.0.0.1:1"].into());
    added.remove("node-rpc");
    chains.push(added.into());
    std::fs::write(c.chains_file(f), toml::to_string(&file)?)?;
    sighup(c, f)
}

/// Waits for node `f` to say that a reload gave up on a key that did not
/// open.
async fn reload_given_up(c: &Cluster, f: u64) -> Result<()> {
    let log = c.dir.path().join(format!("keyraft{f}.log"));
    let gave_up =
        "SIGHUP: chains not reloaded, nothing changed: opening the keys: they did not open within";
    eventually(SETTLE, "the reload given up", || async {
        Ok(std::fs::read_to_string(&log)?
            .contains(gave_up)
            .then_some(()))
    })
    .await
    .with_context(|| c.logs())
}

/// Waits for node `f`'s status to list [`ADDED`].
async fn chain_added(c: &Cluster, f: u64) -> Result<()> {
    eventually(SETTLE, "the added chain listed", || async {
        Ok(listed(c.status(f).await?)
            .iter()
            .any(|id| id == ADDED)
            .then_some(()))
    })
    .await
    .with_context(|| c.logs())
}

/// The chain ids a node's status lists.
fn listed(status: serde_json::Value) -> Vec<String> {
    status["signer"]["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["chain_id"].as_str().map(String::from))
        .collect()
}

/// Each chain's judge's count of missed heights so far.
async fn missed_by_chain(c: &Cluster) -> Result<Vec<u64>> {
    let mut missed = Vec::new();
    for (_, judge) in c.judges() {
        missed.push(judge.totals().await?.missed);
    }
    Ok(missed)
}

/// No chain's judge counted a missed height since `before`
/// ([`missed_by_chain`]): a follower's trouble with its token or module
/// is its own business.
async fn none_missed_since(c: &Cluster, before: Vec<u64>) -> Result<()> {
    for ((chain, judge), before) in c.judges().into_iter().zip(before) {
        let now = judge.totals().await?.missed;
        ensure!(
            now == before,
            "{chain}: {} heights missed while a follower's token or module hung\n{}",
            now - before,
            c.logs()
        );
    }
    Ok(())
}

/// A reload that meets a PKCS#11 module that does not load (its
/// `C_Initialize` never returns) gives up after its limit; a later reload
/// whose key is in another module, already loaded, still opens it: the
/// hung module holds its own slot, not every module's. One that needs the
/// hung module again is refused at once.
#[tokio::test]
async fn a_module_that_never_loads_keeps_no_other_modules_key_from_opening() -> Result<()> {
    let (mut c, f, token) = two_chains_signing(KeyIn::Token).await?;
    let missed = missed_by_chain(&c).await?;
    token.build_hanging_module()?;
    token.hang_loading()?;
    with_chain(&c, f, token.uri_through(&token.hanging_module()))?;
    reload_given_up(&c, f).await?;
    // Through SoftHSM2's own module, which the host loaded at start.
    with_chain(&c, f, token.uri())?;
    chain_added(&c, f).await?;
    // The hung module again: refused at once, no thread left waiting
    // behind the first.
    with_chain(&c, f, token.uri_through(&token.hanging_module()))?;
    let log = c.dir.path().join(format!("keyraft{f}.log"));
    let at_once = "an earlier load of it has not returned";
    eventually(
        Duration::from_secs(5),
        "the reload refused at once",
        || async {
            Ok(std::fs::read_to_string(&log)?
                .contains(at_once)
                .then_some(()))
        },
    )
    .await
    .with_context(|| c.logs())?;
    let now = c.chain.totals().await?;
    every_sentry_signed(&c, now.height, &[1, 2, 3]).await?;
    no_equivocations_on_any_chain(&c).await?;
    none_missed_since(&c, missed).await?;
    stops_on_sigterm(&mut c, f).await?;
    token.load()
}

/// `keyraft run` with a token configured wrong, or one that does not
/// answer: one line and exit 2, before anything else starts; `keyraft
/// check --config` says the same.
#[tokio::test]
async fn tokens_configured_wrong_are_refused_at_start_with_one_line() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("keyraft-hsm-").tempdir()?;
    let keyraft = localnet::harness::sibling_bin("keyraft")?;
    let key = dir.path().join("priv_validator_key.json");
    localnet::comet::key::ValidatorKey::generate().write_new(&key)?;
    let token = Token::at(dir.path());
    token.create(&keyraft, &key)?;
    let pin = dir.path().join("softhsm/pin");
    let good = token.uri();
    let wrong_pin = dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "0000\n")?;
    std::fs::set_permissions(
        &wrong_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let readable = dir.path().join("readable-pin");
    std::fs::copy(&pin, &readable)?;
    std::fs::set_permissions(
        &readable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let with_pin = |p: &Path| good.replace(&pin.display().to_string(), &p.display().to_string());
    // (the key's URI, words of the one line)
    let cases = [
        (
            with_pin(&readable),
            "is readable by others (mode 644): chmod 600 it",
        ),
        (
            good.replace("libsofthsm2.so", "libnothere.so"),
            "libnothere.so does not exist",
        ),
        (
            with_pin(&wrong_pin),
            "the PIN for token 'localnet' is wrong",
        ),
        (
            good.replace("token=localnet", "token=elsewhere"),
            "no token labelled 'elsewhere'",
        ),
        (
            good.replace("object=validator", "object=nokey"),
            "holds no Ed25519 private key object=nokey",
        ),
        // A token that does not answer (only through the tests' module).
        (
            token.uri_through(&token.hanging_module()),
            "opening the keys: they did not open within 10s",
        ),
    ];
    token.build_hanging_module()?;
    token.hang()?;
    for (i, (uri, words)) in cases.iter().enumerate() {
        let conf = dir.path().join(format!("keyraft-{i}.toml"));
        let data = dir.path().join(format!("data-{i}"));
        std::fs::write(
            &conf,
            format!(
                "node-id = 1\ninsecure = true\nlisten = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nsigner = \"cometbft\"\nchain-id = \"{CHAIN}\"\nvalidator-key = \"{uri}\"\nprivval-node = [\"tcp://127.0.0.1:9\"]\npeer = [\"2=127.0.0.1:9\", \"3=127.0.0.1:9\"]\n",
                data.display()
            ),
        )?;
        for args in [vec!["run", "--config"], vec!["check", "--config"]] {
            let out = std::process::Command::new(&keyraft)
                .args(&args)
                .arg(&conf)
                .env("SOFTHSM2_CONF", token.conf())
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            ensure!(
                out.status.code() == Some(2) && lines.len() == 1 && lines[0].contains(words),
                "{args:?} with {uri}: exit {:?}, want one line with '{words}':\n{err}",
                out.status.code()
            );
        }
    }
    token.answer()
}
