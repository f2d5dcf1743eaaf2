//! One process's PKCS#11 modules and the keys opened through them, tested
//! in this process against SoftHSM2 (each test its own token directory
//! and `SOFTHSM2_CONF`): what one token's failure or hang leaves the other
//! keys of its module, and the thread that drops a key. The cluster's
//! behaviour with tokens is `hardware.rs`'s.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::token::{KeyIn, Token};

/// Two keys in two tokens of one module (one process, as keyraft opens
/// them): while one token is gone and its probe initializes the module
/// again, the other key signs every time (its sessions of before are
/// dropped without closing a newer one that got the same handle); the
/// token that came back signs again.
#[test]
fn a_token_that_goes_and_comes_back_costs_the_other_token_of_its_module_nothing() -> Result<()> {
    use keyraft::signer::{key::ConsensusKey, token::Modules};
    let dir = tempfile::Builder::new().prefix("keyraft-hsm-").tempdir()?;
    let keyraft = localnet::harness::sibling_bin("keyraft")?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "4711\n")?;
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut uris = Vec::new();
    let mut token_dirs = Vec::new();
    for label in ["a", "b"] {
        let before: Vec<PathBuf> = std::fs::read_dir(&tokens)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        localnet::harness::run(
            std::process::Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--pin",
                    "4711",
                    "--so-pin",
                    "123456",
                ]),
        )?;
        let made = std::fs::read_dir(&tokens)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .find(|p| !before.contains(p))
            .context("no new token directory")?;
        token_dirs.push(made);
        let key = dir.path().join(format!("{label}.json"));
        localnet::comet::key::ValidatorKey::generate().write_new(&key)?;
        let uri = format!(
            "pkcs11:token={label};object=k?module-path={}&pin-source=file:{}",
            localnet::token::MODULE,
            pin.display()
        );
        localnet::harness::run(
            std::process::Command::new(&keyraft)
                .env("SOFTHSM2_CONF", &conf)
                .args(["signer", "import-key", "--from"])
                .arg(&key)
                .args(["--to", &uri]),
        )?;
        uris.push(keyraft::config::TokenUri::parse(&uri)?);
    }
    // This process opens the module: SoftHSM2 reads its configuration then.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let modules = Modules::default();
    let a = ConsensusKey::open_token(&uris[0], modules.open(&uris[0].module)?)?;
    let b = ConsensusKey::open_token(&uris[1], modules.open(&uris[1].module)?)?;
    let away = dir.path().join("a-away");
    std::fs::rename(&token_dirs[0], &away)?;
    ensure!(a.sign(b"a while gone").is_err(), "a gone token signed");
    for i in 0..20u32 {
        // The gone token's probe initializes the module again (at most
        // every 5 s); b's sessions die with it each time.
        ensure!(a.probe().is_err(), "a gone token answered the probe");
        b.sign(&i.to_be_bytes())
            .with_context(|| format!("b failed while a was gone, signature {i}"))?;
    }
    std::fs::rename(&away, &token_dirs[0])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while a.probe().is_err() {
        ensure!(
            std::time::Instant::now() < deadline,
            "a never answered again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.sign(b"a is back")?;
    b.sign(b"b after all that")?;
    Ok(())
}

/// A key dropped while its token hangs (a chain changed by a reload, or
/// shutdown) closes its sessions on a thread of their own: the thread that
/// drops it may be the one a coordinator runs on, whose heartbeats would
/// stop for as long as the token hangs. The process waits for such closes
/// before it exits, a second at most.
#[test]
fn a_key_dropped_while_its_token_hangs_does_not_hold_up_the_thread_that_drops_it() -> Result<()> {
    use keyraft::signer::{key::ConsensusKey, token::Modules};
    let dir = tempfile::Builder::new().prefix("keyraft-hsm-").tempdir()?;
    let keyraft = localnet::harness::sibling_bin("keyraft")?;
    let key = dir.path().join("priv_validator_key.json");
    localnet::comet::key::ValidatorKey::generate().write_new(&key)?;
    localnet::token::lay_out(&keyraft, dir.path(), &key, KeyIn::HangingToken)?;
    let token = Token::at(dir.path());
    // This process opens the module: SoftHSM2 and the hanging module read
    // their configuration from here.
    std::env::set_var("SOFTHSM2_CONF", token.conf());
    let uri = keyraft::config::TokenUri::parse(&token.uri_through(&token.hanging_module()))?;
    let modules = Modules::default();
    let k = ConsensusKey::open_token(&uri, modules.open(&uri.module)?)?;
    k.sign(b"a session to close")?;
    token.hang()?;
    let (dropped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(k);
        let _ = dropped.send(());
    });
    let waited = done.recv_timeout(Duration::from_secs(3));
    // The close waits for the token, and the process's exit for the close
    // (`keyraft` settles before it exits), within a limit.
    let settled_while_hung = keyraft::signer::token::settle(Duration::from_millis(200));
    token.answer()?;
    ensure!(
        waited.is_ok(),
        "dropping the key waited for its hung token to close a session"
    );
    ensure!(
        !settled_while_hung,
        "no close was seen waiting for the hung token"
    );
    ensure!(
        keyraft::signer::token::settle(Duration::from_secs(5)),
        "the close never ended once the token answered"
    );
    Ok(())
}
