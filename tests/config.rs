//! Every configuration error stops `keyraft run` before anything starts:
//! exit code 2 and exactly one line on stderr that names the problem.

use std::process::Command;

use anyhow::{ensure, Context, Result};

const KEYRAFT: &str = env!("CARGO_BIN_EXE_keyraft");

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        keyraft::tls::create_ca(&dir.path().join("ca"), keyraft::tls::CA_DAYS)?;
        keyraft::tls::create_node(
            &dir.path().join("ca"),
            1,
            false,
            &[],
            &["127.0.0.1".into()],
            None,
            &dir.path().join("tls"),
        )?;
        let key = dir.path().join("validator_key.json");
        localnet::keys::KeyFile::generate("v").write_new(&key)?;
        std::fs::create_dir_all(dir.path().join("home"))?;
        Ok(Setup { dir })
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    /// A valid command line with `args` spliced in before the validator command.
    fn run(&self, args: &[&str]) -> Result<(Option<i32>, Vec<String>)> {
        let mut cmd = Command::new(KEYRAFT);
        cmd.arg("run").args(args);
        let defaults = [
            ("--node-id", "1".to_string()),
            ("--listen", "127.0.0.1:0".to_string()),
            ("--data-dir", self.path("data")),
            ("--tls-dir", self.path("tls")),
            ("--validator-home", self.path("home")),
            ("--validator-key", self.path("validator_key.json")),
        ];
        for (flag, value) in defaults {
            if !args.contains(&flag) {
                cmd.args([flag, &value]);
            }
        }
        cmd.args(["--peer", "2=127.0.0.1:7702", "--", "/bin/false"]);
        // A configuration that is wrongly accepted starts a coordinator that
        // runs until killed: give up on it after a while, and say so.
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                anyhow::bail!("keyraft run {args:?} started instead of refusing its configuration");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let lines = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::to_string)
            .collect();
        Ok((out.status.code(), lines))
    }
}

fn expect_refusal(s: &Setup, args: &[&str], needle: &str) -> Result<()> {
    let (code, lines) = s.run(args)?;
    ensure!(code == Some(2), "{args:?}: exit {code:?}, stderr {lines:?}");
    ensure!(lines.len() == 1, "{args:?}: want one line, got {lines:?}");
    ensure!(
        lines[0].contains(needle),
        "{args:?}: {:?} does not mention {needle:?}",
        lines[0]
    );
    ensure!(
        !s.dir.path().join("data").exists(),
        "{args:?}: data dir created before validation"
    );
    Ok(())
}

#[test]
fn each_configuration_error_is_one_line_and_exit_2() -> Result<()> {
    let s = Setup::new()?;
    expect_refusal(&s, &["--node-id", "0"], "node ids start at 1")?;
    expect_refusal(&s, &["--peer", "2=127.0.0.1:7703"], "duplicate --peer id 2")?;
    expect_refusal(&s, &["--listen", "0.0.0.0:7700"], "--advertise")?;
    expect_refusal(&s, &["--peer", "1=127.0.0.1:7703"], "names this node")?;
    expect_refusal(&s, &["--peer", "x=127.0.0.1:7703"], "not a node id")?;
    expect_refusal(&s, &["--peer", "3=nohost"], "not HOST:PORT")?;
    expect_refusal(&s, &["--listen", "not-an-address"], "--listen")?;
    expect_refusal(
        &s,
        &["--tls-dir", "/nonexistent"],
        "missing certificate file",
    )?;
    expect_refusal(
        &s,
        &["--fence-after", "900ms", "--handover-delay", "0ms"],
        "safety inequality",
    )?;
    expect_refusal(
        &s,
        &[
            "--election-timeout-min",
            "1000ms",
            "--election-timeout-max",
            "500ms",
        ],
        "must be below",
    )?;
    // Another node's certificate: this node would claim an identity it
    // cannot prove, and its peers would refuse it.
    keyraft::tls::create_node(
        &s.dir.path().join("ca"),
        2,
        false,
        &[],
        &[],
        None,
        &s.dir.path().join("tls2"),
    )?;
    expect_refusal(
        &s,
        &["--tls-dir", &s.path("tls2")],
        "not a certificate for node 1",
    )?;
    expect_refusal(&s, &["--fence-after", "fast"], "bad duration")?;
    expect_refusal(&s, &["--timing", "moon"], "--timing")?;
    // The wan profile's longer lease is checked the same way.
    expect_refusal(
        &s,
        &[
            "--timing",
            "wan",
            "--fence-after",
            "800ms",
            "--handover-delay",
            "0ms",
        ],
        "safety inequality",
    )?;
    expect_refusal(&s, &["--health", "http"], "--health-url")?;
    expect_refusal(
        &s,
        &["--kernel-fence", "required", "--activate-by", "sighup"],
        "needs --activate-by restart",
    )?;
    expect_refusal(
        &s,
        &["--kernel-fence", "required", "--no-cgroup"],
        "drop --no-cgroup",
    )?;
    expect_refusal(&s, &["--kernel-fence", "maybe"], "--kernel-fence")?;
    expect_refusal(&s, &["--validator-user", "root"], "is root")?;
    expect_refusal(
        &s,
        &["--validator-user", "no-such-user-here"],
        "no such user",
    )?;
    expect_refusal(&s, &["--fence-agent", "3=/bin/true"], "not a --peer")?;
    expect_refusal(
        &s,
        &[
            "--fence-agent",
            "2=/bin/true",
            "--fence-option",
            "2:action=on",
        ],
        "sets the action",
    )?;
    Ok(())
}

/// `--validator-user` needs the rights to start the validator as that user
/// and to kill every process of it: refused without them, in one line.
#[test]
fn a_validator_user_without_the_rights_to_kill_it_is_refused() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new()?;
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let nobody = nix::unistd::Uid::from_raw(65534);
    nix::unistd::chown(
        s.dir.path().join("validator_key.json").as_path(),
        Some(nobody),
        None,
    )?;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(KEYRAFT)
        .args([
            "run",
            "--node-id",
            "1",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--peer", "2=127.0.0.1:7702", "--data-dir", &s.path("data")])
        .args(["--validator-home", &s.path("home")])
        .args(["--validator-key", &s.path("validator_key.json")])
        .args(["--validator-user", "daemon", "--", "/bin/false"])
        .output()
        .context("setpriv (util-linux)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{:?}: {err}", out.status);
    ensure!(err.lines().count() == 1, "{err}");
    ensure!(
        err.contains("needs keyraft to run as root, or with CAP_KILL, CAP_SETGID, CAP_SETUID"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_regular_file_at_a_key_path_is_refused_and_left_alone() -> Result<()> {
    let s = Setup::new()?;
    let planted = s.dir.path().join("home/validator_key.json");
    std::fs::write(&planted, "a copy someone left here")?;
    let (code, lines) = s.run(&[])?;
    ensure!(code == Some(2), "exit {code:?}: {lines:?}");
    let last = lines.last().context("no output")?;
    ensure!(last.contains("not a link keyraft made"), "{lines:?}");
    ensure!(
        std::fs::read_to_string(&planted)? == "a copy someone left here",
        "the planted file was changed"
    );
    Ok(())
}

#[test]
fn readable_key_files_are_refused() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new()?;
    std::fs::set_permissions(
        s.path("validator_key.json"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    expect_refusal(&s, &[], "readable by others")?;
    std::fs::set_permissions(
        s.path("validator_key.json"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::fs::set_permissions(
        s.path("tls/node.key"),
        std::fs::Permissions::from_mode(0o640),
    )?;
    expect_refusal(&s, &[], "readable by others")?;
    Ok(())
}

#[test]
fn a_toml_file_and_environment_fill_in_flags() -> Result<()> {
    let s = Setup::new()?;
    // The file sets a broken timing; the error proves it was read.
    let file = s.dir.path().join("keyraft.toml");
    std::fs::write(&file, "fence-after = \"900ms\"\nhandover-delay = 0\n")?;
    expect_refusal(
        &s,
        &["--config", &file.display().to_string()],
        "safety inequality",
    )?;
    // A flag wins over the file: with the delay fixed, the next check speaks.
    let (code, lines) = s.run(&[
        "--config",
        &file.display().to_string(),
        "--handover-delay",
        "600ms",
        "--health",
        "http",
    ])?;
    ensure!(
        code == Some(2) && lines[0].contains("--health-url"),
        "{lines:?}"
    );
    // Unknown keys are errors, not silently ignored.
    std::fs::write(&file, "fence_after = \"600ms\"\n")?;
    expect_refusal(
        &s,
        &["--config", &file.display().to_string()],
        "unknown field",
    )?;
    // Environment variables.
    let out = Command::new(KEYRAFT)
        .env("KEYRAFT_NODE_ID", "0")
        .args([
            "run",
            "--peer",
            "2=127.0.0.1:7702",
            "--insecure",
            "--witness",
        ])
        .output()?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("node ids start at 1"));
    Ok(())
}

#[test]
fn json_logs_carry_the_node_id_on_every_line() -> Result<()> {
    use localnet::harness::free_addr;
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(KEYRAFT)
        .args([
            "run",
            "--node-id",
            "7",
            "--peer",
            "8=127.0.0.1:9",
            "--insecure",
            "--witness",
            "--log-format",
            "json",
        ])
        .args(["--listen", &free_addr()?.to_string()])
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(["--http-listen", &free_addr()?.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .take(4)
        .collect::<Result<_, _>>()?;
    child.kill()?;
    child.wait()?;
    ensure!(lines.len() == 4, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)?;
        ensure!(v["node"] == 7 && v["level"].is_string(), "{l}");
    }
    ensure!(
        lines.iter().any(|l| l.contains("INSECURE")),
        "no plaintext warning: {lines:?}"
    );
    Ok(())
}

/// docs/configuration.md is generated from `keyraft run`'s help texts and
/// must not drift from them (`KEYRAFT_UPDATE_DOCS=1` rewrites it).
#[test]
fn the_configuration_reference_matches_the_flags() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let want = keyraft::config::reference();
    if std::env::var_os("KEYRAFT_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want)?;
    }
    let have = std::fs::read_to_string(&path)
        .with_context(|| format!("{} (KEYRAFT_UPDATE_DOCS=1 writes it)", path.display()))?;
    anyhow::ensure!(
        have == want,
        "docs/configuration.md is out of date: run KEYRAFT_UPDATE_DOCS=1 cargo nextest run -E 'test(the_configuration_reference_matches_the_flags)'"
    );
    for flag in [
        "--node-id",
        "--fence-after",
        "--privval-node",
        "KEYRAFT_TIMING",
    ] {
        anyhow::ensure!(have.contains(flag), "{flag} missing from the reference");
    }
    Ok(())
}
