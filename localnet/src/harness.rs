//! Processes, ports and probes shared by the launcher and the tests.
//!
//! Owns: starting the project's binaries as child processes with their
//! output in log files, sending them signals, killing what it started, and
//! asking the fake chain and fake nodes what they see. Must not: sleep in
//! place of waiting for an event (use [`eventually`] with a deadline) or
//! leave a process behind when a [`Proc`] is dropped.

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::chain::Stats;
use crate::keys::KeyFile;

/// Ports handed out by [`free_port`], in order, by this process.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
const PORT_BASE: u32 = 10_000;
/// Below Linux's ephemeral range (32768-60999): the kernel never gives
/// these to a port-0 bind or an outgoing connection.
const PORT_SPAN: u32 = 22_000;
const BLOCK: u32 = 50;

/// A port on 127.0.0.1 that is free now and unlikely to be taken before the
/// caller's child binds it: each process draws from its own block (by pid),
/// outside the ephemeral range, so parallel tests do not race each other.
pub fn free_port() -> std::io::Result<u16> {
    let block = std::process::id() % (PORT_SPAN / BLOCK);
    for _ in 0..PORT_SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = PORT_BASE + (block * BLOCK + n) % PORT_SPAN;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            drop(l);
            return Ok(port as u16);
        }
    }
    Err(std::io::Error::other("no free port"))
}

/// A loopback address on a free port.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// Path of a binary built into the same target dir as the running program
/// (tests live in `target/<profile>/deps`, binaries one level up).
pub fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for _ in 0..2 {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    bail!(
        "binary {name} not found beside {}; build the workspace first",
        exe.display()
    )
}

/// A child process that is killed (with its process group) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` in its own process group, stdout and stderr appended to
    /// `log_dir/<name>.log`.
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the process itself.
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid()), sig).with_context(|| format!("cannot signal {}", self.name))
    }

    /// Sends `sig` to the process's whole group.
    pub fn signal_group(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(-self.pid()), sig)
            .with_context(|| format!("cannot signal group of {}", self.name))
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let name = self.name.clone();
        eventually(limit, &format!("{name} to exit"), || {
            let status = self.try_exit();
            async move { Ok(status) }
        })
        .await
    }

    /// SIGKILL of the process and reaping it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log, without openraft's warning for
    /// each heartbeat or append to a peer that is down: in a failure's
    /// report those crowd out the lines that say what the node decided.
    pub fn log_tail(&self, lines: usize) -> String {
        const REPEATED: [&str; 3] = [
            "HeartbeatWorker(",
            "ReplicationCore recv RPCError",
            "update progress error",
        ];
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !REPEATED.iter().any(|r| l.contains(r)))
            .collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Resume first, in case it was stopped, so the kill is delivered.
        let _ = kill(Pid::from_raw(-self.pid()), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(-self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Polls `probe` every 20 ms until it yields `Some`. Errors are retried too
/// (a process may not be listening yet); the last one is reported if the
/// deadline passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_every(limit, Duration::from_millis(20), what, probe).await
}

/// [`eventually`], polling every `every`: for a probe that loads the host
/// (a process started per poll) while what it waits for needs a quiet one.
pub async fn eventually_every<T, F, Fut>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            let why = last_err
                .map(|e| format!(": last error: {e:#}"))
                .unwrap_or_default();
            return Err(anyhow!("timed out after {limit:?} waiting for {what}{why}"));
        }
        tokio::time::sleep(every).await;
    }
}

/// A NEAR-mode `fakechain` in a temporary dir of its own, judging a fresh
/// validator key, with homes for `fakenode`s beside it: the judge as the
/// tests of localnet start it.
pub struct NearChain {
    pub dir: tempfile::TempDir,
    pub key: KeyFile,
    pub key_path: PathBuf,
    pub chain: ChainClient,
    _proc: Proc,
}

impl NearChain {
    /// Starts the chain with blocks of `block_ms` and `extra` flags;
    /// returns once it made its first height.
    pub async fn start(block_ms: u64, extra: &[&str]) -> anyhow::Result<NearChain> {
        let dir = tempfile::tempdir()?;
        let key = KeyFile::generate("validator.test");
        let key_path = dir.path().join("validator_key.json");
        key.write_new(&key_path)?;
        let addr = free_addr()?;
        let proc = Proc::spawn(
            "fakechain",
            Command::new(sibling_bin("fakechain")?)
                .args(["--listen", &addr.to_string()])
                .args(["--block-ms", &block_ms.to_string()])
                .arg("--validator-key")
                .arg(&key_path)
                .args(extra),
            dir.path(),
        )?;
        let chain = ChainClient::new(&format!("http://{addr}"));
        chain
            .wait_height(1, Duration::from_secs(10))
            .await
            .context("fakechain did not start")?;
        Ok(NearChain {
            dir,
            key,
            key_path,
            chain,
            _proc: proc,
        })
    }

    /// A home dir for node `id` with its node key, and with the validator
    /// key if `with_key`; one made earlier is kept as it is.
    pub fn home(&self, id: u64, with_key: bool) -> anyhow::Result<PathBuf> {
        let home = self.dir.path().join(format!("home{id}"));
        if home.exists() {
            return Ok(home);
        }
        std::fs::create_dir_all(&home)?;
        KeyFile::generate("node").write_new(&home.join("node_key.json"))?;
        if with_key {
            std::fs::copy(&self.key_path, home.join("validator_key.json"))?;
        }
        Ok(home)
    }

    /// Starts `fakenode` `id` in `home` with `extra` flags; returns it and
    /// its RPC base URL.
    pub fn node(&self, id: u64, home: &Path, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
        let rpc = free_addr()?;
        let proc = Proc::spawn(
            &format!("fakenode{id}"),
            Command::new(sibling_bin("fakenode")?)
                .arg("--home")
                .arg(home)
                .args(["--chain", &self.chain.url, "--node-id", &id.to_string()])
                .args(["--rpc-listen", &rpc.to_string()])
                .args(extra),
            self.dir.path(),
        )?;
        Ok((proc, format!("http://{rpc}")))
    }
}

/// A client of the fake chain's HTTP API.
#[derive(Clone)]
pub struct ChainClient {
    pub url: String,
    http: reqwest::Client,
}

impl ChainClient {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            http: http_client(),
        }
    }

    /// `GET /stats?since=H`.
    pub async fn stats_since(&self, since: u64) -> anyhow::Result<Stats> {
        let url = format!("{}/stats?since={since}", self.url);
        Ok(self
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /stats` with only the totals (no signers listed).
    pub async fn totals(&self) -> anyhow::Result<Stats> {
        self.stats_since(u64::MAX).await
    }

    /// Waits until each of `nodes` signed a height above `after`; returns
    /// the stats from `after + 1` on.
    pub async fn wait_signed_by(
        &self,
        after: u64,
        nodes: &[u64],
        limit: Duration,
    ) -> anyhow::Result<Stats> {
        let what = format!("nodes {nodes:?} signing after height {after}");
        eventually(limit, &what, || async {
            let s = self.stats_since(after + 1).await?;
            let all = nodes.iter().all(|n| s.first_signed_by(*n, after).is_some());
            Ok(all.then_some(s))
        })
        .await
    }

    /// Waits until the chain's head is at least `height`.
    pub async fn wait_height(&self, height: u64, limit: Duration) -> anyhow::Result<Stats> {
        eventually(limit, &format!("chain height {height}"), || async {
            let s = self.totals().await?;
            Ok((s.height >= height).then_some(s))
        })
        .await
    }
}

/// `GET url` as JSON.
pub async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http_client()
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default()
}

/// Resident memory and CPU time of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcUsage {
    pub rss_kib: u64,
    pub cpu: Duration,
}

/// Reads `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/stat` (utime+stime).
pub fn proc_usage(pid: i32) -> anyhow::Result<ProcUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields
            .get(12)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(ProcUsage {
        rss_kib,
        cpu: Duration::from_millis(ticks * 1000 / hz.max(1)),
    })
}

/// Node `id`'s entry in a `status --json` document (null if it is missing).
pub fn node_entry(status: &serde_json::Value, id: u64) -> serde_json::Value {
    status["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["id"] == id))
        .cloned()
        .unwrap_or_default()
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// Every process on the host, as (pid, parent pid).
pub fn processes() -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some((pid, ppid))
    })
    .collect()
}

/// Runs `cmd` to its end: an error with its output unless it succeeds.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let o = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    anyhow::ensure!(
        o.status.success(),
        "{:?} failed: {}{}",
        cmd.get_program(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
