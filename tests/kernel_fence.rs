//! The kernel fence (docs/design.md, step 4), judged by the fake chain: a
//! validator whose coordinator and guard are both frozen keeps running but
//! signs nothing the chain sees once its lease has run out in the kernel;
//! the table of a killed run is replaced at start, put back when removed
//! under a running node, and gone after a clean stop. Needs root (or
//! CAP_NET_ADMIN), nftables and a writable cgroup v2, as CI has.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localnet::cluster::{alive, Cluster, NodeOpts, SETTLE};
use localnet::harness::{eventually, node_entry};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BLOCK_MS: u64 = 250;

/// The nftables table node `id`'s keyraft names in its data dir.
fn table(c: &Cluster, id: u64) -> Result<String> {
    let file = c.nodes[&id].data.join("kernel-fence");
    Ok(std::fs::read_to_string(&file)
        .with_context(|| format!("{}", file.display()))?
        .trim()
        .to_string())
}

fn nft(args: &[&str]) -> Result<String> {
    let out = Command::new("nft").args(args).output().context("nft")?;
    ensure!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn table_exists(name: &str) -> Result<bool> {
    Ok(nft(&["list", "tables"])?
        .lines()
        .any(|l| l.trim() == format!("table inet {name}")))
}

/// Packets the table's rules have dropped.
fn dropped(name: &str) -> Result<u64> {
    let text = nft(&["list", "chain", "inet", name, "out"])?;
    let counters: Vec<u64> = text
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    ensure!(!counters.is_empty(), "no counter in {text}");
    Ok(counters.iter().sum())
}

/// Waits until every node reports its kernel fence on and one validates;
/// returns that one.
async fn fenced_cluster(c: &Cluster) -> Result<u64> {
    eventually(SETTLE, "every node's kernel fence on", || async {
        for &id in c.nodes.keys() {
            let me = node_entry(&c.status(id).await?, id);
            if me["kernel_fence"] != "on" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    for &id in c.nodes.keys() {
        ensure!(c.metric(id, "keyraft_kernel_fence").await? == 1.0);
    }
    c.active().await
}

/// [`fenced_cluster`], and a standby beside the validating node.
async fn fenced_standby(c: &Cluster) -> Result<u64> {
    let active = fenced_cluster(c).await?;
    let standby = *c
        .nodes
        .keys()
        .find(|&&id| id != active)
        .context("standby")?;
    Ok(standby)
}

/// Hands the key to `standby` by a switchover (asked again of whoever
/// validates, where the leader handed it to another node meanwhile), and
/// waits for the standby to refuse it with a log line containing
/// `refusal`; then for a node that is not the standby to sign. Returns
/// that node.
async fn switchover_refused(c: &Cluster, standby: u64, refusal: &str) -> Result<u64> {
    eventually(SETTLE, "the standby's refusal", || async {
        let log = c.proc(standby)?.log_text();
        if log.lines().any(|l| l.contains(refusal)) {
            return Ok(Some(()));
        }
        for &id in c.nodes.keys().filter(|&&id| id != standby) {
            let me = node_entry(&c.status(id).await?, id);
            if me["state"] == "Validating" {
                c.cli(id, &["switchover", "--to", &standby.to_string()])
                    .await?;
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| c.logs())?;
    let refused_at = c.chain.totals().await?.height;
    let (now, _) = c
        .wait_signer(refused_at + 1, &[])
        .await
        .with_context(|| c.logs())?;
    ensure!(now != standby, "node {standby} signs outside its fence");
    Ok(now)
}

#[tokio::test]
async fn a_validator_whose_coordinator_and_guard_are_frozen_is_silenced_by_the_kernel() -> Result<()>
{
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    frozen_keyraft_cannot_let_its_validator_sign(c).await
}

/// No cgroup for the validator, which runs as nobody: the kernel fence
/// matches it by user, as in a Docker container.
fn as_in_a_container() -> NodeOpts {
    NodeOpts {
        validator_user: Some("nobody".into()),
        flags: vec!["--no-cgroup".into()],
        ..NodeOpts::default()
    }
}

/// The first (real) value of a `/proc/PID/status` field such as `Uid:`.
fn status_field(pid: i32, name: &str) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {name} in {status}"))
}

/// As in a Docker container: no cgroup v2 for the validator, which runs as
/// its own user; the kernel fence holds it back by its keyed group and the
/// marks on its connections.
#[tokio::test]
async fn without_a_cgroup_the_kernel_fence_matches_the_validator_user_and_its_connections(
) -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| as_in_a_container()).await?;
    let active = fenced_cluster(&c).await?;
    let nft_text = nft(&["list", "table", "inet", &table(&c, active)?])?;
    ensure!(
        nft_text.contains("ct mark set meta skgid map @mark_of"),
        "not matched by user: {nft_text}"
    );
    // The validator runs as nobody, keyed in the group of its own.
    let pid = c.validator_pid(active).context("no validator")?;
    ensure!(status_field(pid, "Uid:")? == 65534, "not run as nobody");
    let gid = status_field(pid, "Gid:")?;
    ensure!(gid >> 24 == 0x4b, "keyed group {gid:#x}");
    frozen_keyraft_cannot_let_its_validator_sign(c).await
}

async fn frozen_keyraft_cannot_let_its_validator_sign(c: Cluster) -> Result<()> {
    let old = fenced_cluster(&c).await?;
    let name = table(&c, old)?;
    let validator = c.validator_pid(old).context("no validator pid")?;
    let guard = c.guard_pid(old).context("no guard")?;
    let before = dropped(&name)?;
    let since = c.chain.totals().await?.height;
    // Both keyraft processes stall; the validator runs on with its key.
    c.freeze(old, false, true)?;
    kill(Pid::from_raw(guard), Signal::SIGSTOP)?;
    let (new, _) = c.wait_signer(since, &[old]).await?;
    // Let the successor sign for a while beside the running old validator.
    let from = c.chain.totals().await?.height;
    c.chain.wait_height(from + 10, SETTLE).await?;
    let stats = c.assert_no_double_signs().await?;
    ensure!(
        alive(validator),
        "the old validator was killed, so this proves nothing of the kernel fence"
    );
    let now = dropped(&name)?;
    ensure!(
        now > before,
        "keyraft's rule dropped none of the old validator's packets ({before} -> {now})"
    );
    kill(Pid::from_raw(guard), Signal::SIGCONT)?;
    c.freeze(old, false, false)?;
    eventually(SETTLE, "the thawed node to fence its validator", || async {
        Ok((!alive(validator)).then_some(()))
    })
    .await?;
    let after = c.assert_no_double_signs().await?;
    ensure!(after.double_signs == 0 && stats.double_signs == 0);
    ensure!(new != old);
    Ok(())
}

#[tokio::test]
async fn the_table_is_replaced_at_start_put_back_when_removed_and_gone_after_a_clean_stop(
) -> Result<()> {
    let mut c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    let standby = fenced_standby(&c).await?;
    let name = table(&c, standby)?;

    // A killed run leaves its table; something else adds to it meanwhile.
    c.kill_host(standby)?;
    ensure!(table_exists(&name)?, "the table vanished with a SIGKILL");
    nft(&["add", "chain", "inet", &name, "leftover"])?;
    c.spawn(standby)?;
    eventually(SETTLE, "the restarted node's fence on", || async {
        let me = node_entry(&c.status(standby).await?, standby);
        Ok((me["kernel_fence"] == "on").then_some(()))
    })
    .await?;
    ensure!(
        !nft(&["list", "table", "inet", &name])?.contains("leftover"),
        "the leftover table was kept, not replaced"
    );

    // A ruleset reload removes it under the running standby: taking over
    // puts it back before the key appears.
    nft(&["delete", "table", "inet", &name])?;
    eventually(SETTLE, "a switchover to the standby", || async {
        let out = c
            .cli(standby, &["switchover", "--to", &standby.to_string()])
            .await?;
        Ok(out.status.success().then_some(()))
    })
    .await?;
    eventually(SETTLE, "the standby validating", || async {
        let me = node_entry(&c.status(standby).await?, standby);
        Ok((me["state"] == "Validating" && me["key_linked"] == true).then_some(()))
    })
    .await?;
    ensure!(table_exists(&name)?, "the table was not put back");
    let lease = nft(&["list", "set", "inet", &name, "lease"])?;
    ensure!(lease.contains("expires"), "no lease element: {lease}");
    c.assert_no_double_signs().await?;

    // A clean stop leaves nothing behind.
    let other = *c
        .nodes
        .keys()
        .find(|&&id| id != standby)
        .context("another node")?;
    let other_table = table(&c, other)?;
    let data = c.nodes[&other].data.clone();
    c.signal(other, Signal::SIGTERM)?;
    let mut proc = c.forget(other)?.context("no process")?;
    proc.wait_exit(Duration::from_secs(20)).await?;
    ensure!(
        !table_exists(&other_table)?,
        "the table outlived a clean stop"
    );
    ensure!(!Path::new(&data.join("kernel-fence")).exists());
    Ok(())
}

/// The kernel fence's own faults while a node validates: its table deleted
/// under it (the next renewal fails, the node fences itself), and its guard
/// frozen alone (nothing renews the kernel's lease; the coordinator kills
/// guard and tree itself). Either way someone else signs, never two.
#[tokio::test]
async fn a_validating_node_whose_table_vanishes_or_whose_guard_freezes_fences_itself() -> Result<()>
{
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    let first = fenced_cluster(&c).await?;
    let validator = c.validator_pid(first).context("no validator")?;
    nft(&["delete", "table", "inet", &table(&c, first)?])?;
    eventually(SETTLE, "the old validator killed", || async {
        Ok((!alive(validator)).then_some(()))
    })
    .await?;
    let dead_at = c.chain.totals().await?.height;
    let (next, _) = c.wait_signer(dead_at + 1, &[]).await?;
    let renewal_failed = c
        .proc(first)?
        .log_text()
        .contains("the guard did not take the lease");
    ensure!(renewal_failed, "no refused renewal in node {first}'s log");
    ensure!(
        table_exists(&table(&c, next)?)?,
        "node {next} validates without its table"
    );

    // The guard alone freezes: its kernel lease is not renewed.
    let validator = c.validator_pid(next).context("no validator")?;
    let guard = c.guard_pid(next).context("no guard")?;
    kill(Pid::from_raw(guard), Signal::SIGSTOP)?;
    eventually(
        SETTLE,
        "the validator killed by its coordinator",
        || async { Ok((!alive(validator)).then_some(())) },
    )
    .await?;
    let dead_at = c.chain.totals().await?.height;
    c.wait_signer(dead_at + 1, &[]).await?;
    let _ = kill(Pid::from_raw(guard), Signal::SIGCONT);
    let stats = c.assert_no_double_signs().await?;
    ensure!(stats.double_signs == 0);
    Ok(())
}

#[tokio::test]
async fn required_without_nft_is_refused_at_start_with_one_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keyraft = localnet::harness::sibling_bin("keyraft")?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    let key = dir.path().join("key");
    std::fs::write(&key, "k")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let listen = localnet::harness::free_addr()?.to_string();
    let out = Command::new(&keyraft)
        .env("PATH", dir.path())
        .args(["run", "--node-id", "1", "--insecure", "--listen", &listen])
        .args(["--peer", "2=127.0.0.1:9", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--kernel-fence", "required", "--key-link"])
        .arg(format!("{}={}", key.display(), home.join("k").display()))
        .args(["--health", "http", "--health-url", "http://127.0.0.1:9"])
        .args(["--no-height-watermark", "--", "/bin/true"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    ensure!(out.status.code() == Some(2), "{:?}: {err}", out.status);
    ensure!(last.contains("nft"), "{err}");
    Ok(())
}

/// `--kernel-fence required`: a standby whose table vanished and cannot be
/// put back (its `nft` gone meanwhile) does not take the key; it says so in
/// one line, stands down, and a node whose fence is whole validates.
#[tokio::test]
async fn required_and_a_table_that_cannot_be_put_back_means_no_key_there() -> Result<()> {
    let tools = tempfile::tempdir()?;
    let nft_link = tools.path().join("nft");
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no nft")?;
    std::os::unix::fs::symlink(real, &nft_link)?;
    let path = format!("{}:/usr/bin:/bin", tools.path().display());
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts {
        flags: vec!["--kernel-fence".into(), "required".into()],
        env: vec![("PATH".into(), path.clone())],
        ..NodeOpts::default()
    })
    .await?;
    let standby = fenced_standby(&c).await?;
    std::fs::remove_file(&nft_link)?;
    nft(&["delete", "table", "inet", &table(&c, standby)?])?;
    let refusal = "not activating: the kernel fence is not in place";
    switchover_refused(&c, standby, refusal).await?;
    let me = node_entry(&c.status(standby).await?, standby);
    ensure!(me["key_linked"] != true, "{me}");
    c.assert_no_double_signs().await?;
    Ok(())
}

/// A renewal whose write lands later than the margin after its time left
/// was measured (a freeze between the two, as a thaw sees it) is written
/// again at once with what is left then, and taken back when every write
/// lands late: the kernel element never outlives the guard's lease by a
/// freeze, and a slow netlink commit is no reason to fence. Against the real kernel, with a table of the validator-user
/// kind (no cgroup needed), the time left told by a stand-in clock.
#[test]
fn a_renewal_that_lands_late_is_written_again_and_taken_back_when_always_late() -> Result<()> {
    use keyraft::fence::kernel::{KernelError, KernelLease, Keyed, Match, Plan, RENEW_TRIES};
    let plan = Plan {
        table: format!("keyraft_renewtest{:08x}", std::process::id()),
        matches: Match::User {
            uid: 65534,
            keyed_gids: 0x4b7e_5700,
        },
    };
    plan.install(Path::new(env!("CARGO_BIN_EXE_keyraft")))?;
    let dir = tempfile::tempdir()?;
    let run = || -> Result<()> {
        let mut lease = KernelLease::open(plan.clone(), dir.path())?;
        // In time: the element lives, under the first keyed start's key;
        // the next keyed start has another.
        let first = lease.rekey(|| Duration::from_secs(2))?;
        let second = lease.rekey(|| Duration::from_secs(2))?;
        match (first, second) {
            (Keyed::Group(a), Keyed::Group(b)) => {
                ensure!(
                    a != b && a >> 8 == b >> 8,
                    "keyed groups {a:#x} then {b:#x}"
                )
            }
            other => anyhow::bail!("not keyed by group: {other:?}"),
        }
        // Unleased at a handover, then leased again before the next keyed
        // start (step 4 arms the lease first): the old key is not admitted
        // again meanwhile; only the next start's rekey makes one.
        lease.clear()?;
        lease.renew(|| Duration::from_secs(2))?;
        ensure!(
            matches!(lease.ready(), Err(KernelError::NoKey)),
            "a lease renewed after an unlease admits the last activation's key"
        );
        lease.rekey(|| Duration::from_secs(2))?;
        ensure!(lease.ready().is_ok(), "a timely renewal left no element");
        // Measured at 2 s left, written after a 300 ms stall: written again
        // at once with what is left then, and kept.
        let mut reads = [2_000, 1_700, 1_690].map(Duration::from_millis).into_iter();
        lease.renew(|| reads.next().unwrap_or_default())?;
        ensure!(lease.ready().is_ok(), "a renewal written again was lost");
        ensure!(
            reads.next().is_none(),
            "the time left was not measured again after the late write"
        );
        // Late every time (a freeze at each write): taken back.
        let mut t = 2_000u64;
        let stalled = lease.renew(|| {
            t = t.saturating_sub(300);
            Duration::from_millis(t)
        });
        ensure!(
            matches!(stalled, Err(KernelError::Stalled(n)) if n == RENEW_TRIES),
            "a renewal late every time was kept: {stalled:?}"
        );
        ensure!(
            lease.ready().is_err(),
            "the stalled renewal's element lives on"
        );
        // A lease that has run out is never written.
        lease.renew(|| Duration::from_secs(2))?;
        lease.renew(|| Duration::ZERO)?;
        ensure!(
            lease.ready().is_err(),
            "a lease with no time left was renewed"
        );
        Ok(())
    };
    let r = run().and_then(|()| {
        // A keyed start that cannot record its group's generation does
        // not start: the next one might reuse it.
        let mut lost = KernelLease::open(plan.clone(), &dir.path().join("gone"))?;
        ensure!(
            matches!(
                lost.rekey(|| Duration::from_secs(2)),
                Err(KernelError::Generation { .. })
            ),
            "a keyed group was handed out without its generation recorded"
        );
        ensure!(
            lost.ready().is_err(),
            "a lease lives without a recorded key"
        );
        Ok(())
    });
    plan.remove()?;
    r
}

/// Hands the key to `to` by switchovers (asked of whoever validates) and
/// waits for `to` to sign.
async fn switch_to(c: &Cluster, to: u64) -> Result<()> {
    let since = c.chain.totals().await?.height;
    eventually(SETTLE, "the switchover", || async {
        if node_entry(&c.status(to).await?, to)["state"] == "Validating" {
            return Ok(Some(()));
        }
        for &id in c.nodes.keys().filter(|&&id| id != to) {
            if node_entry(&c.status(id).await?, id)["state"] == "Validating" {
                c.cli(id, &["switchover", "--to", &to.to_string()]).await?;
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| c.logs())?;
    let others: Vec<u64> = c.nodes.keys().copied().filter(|&id| id != to).collect();
    let (now, _) = c.wait_signer(since, &others).await?;
    ensure!(now == to, "node {now} signs, not {to}");
    Ok(())
}

/// How `join` puts a process where the active validator's packets are
/// held: into its keyed cgroup, or under its user and keyed group.
enum Join {
    Cgroup(std::path::PathBuf),
    Group(u32),
}

/// The orphaned TCP connection of a validator killed at a handover (its
/// unacknowledged data keeps being retransmitted) must stay dropped when
/// the key comes back to the same host: each activation's key is fresh,
/// and the lease admits only the new one. A process placed as the
/// validator is (`join`) sends data to a listener that a rule of the test
/// blackholes; the key moves away and back; the blackhole is lifted, and
/// the listener must receive nothing while the orphan retransmits.
async fn an_orphan_stays_dropped(
    c: &Cluster,
    rebuild: bool,
    join: impl Fn(u64, i32) -> Result<Join>,
) -> Result<()> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let active = fenced_cluster(c).await?;
    let other = *c
        .nodes
        .keys()
        .find(|&&id| id != active)
        .context("standby")?;
    let validator = c.validator_pid(active).context("no validator pid")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = received.clone();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 256];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        }
    });
    // Counts every attempt of the orphan, before keyraft's chain judges it,
    // and blackholes what reaches the listener.
    let t = format!("kr_orphan_{}", std::process::id());
    let script = format!(
        "table inet {t} {{\n chain early {{ type filter hook output priority -10; tcp dport {port} counter; }}\n chain hole {{ type filter hook input priority 0; tcp dport {port} counter drop; }}\n}}\n"
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!(
        "until [ -e {d}/connect ]; do sleep 0.02; done; exec 3<>/dev/tcp/127.0.0.1/{port}; \
         touch {d}/connected; until [ -e {d}/send ]; do sleep 0.02; done; \
         printf orphaned-payload >&3; touch {d}/sent; sleep 1000"
    ));
    let placed = join(active, validator)?;
    if let Join::Group(gid) = placed {
        cmd.uid(65534).gid(gid);
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
    }
    let mut holder = cmd.spawn()?;
    if let Join::Cgroup(leaf) = &placed {
        std::fs::write(leaf.join("cgroup.procs"), holder.id().to_string())?;
    }
    let wait_file = |name: &'static str| {
        let path = dir.path().join(name);
        async move { eventually(SETTLE, name, || async { Ok(path.exists().then_some(())) }).await }
    };
    std::fs::write(dir.path().join("connect"), "")?;
    wait_file("connected").await?;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, script.as_bytes())?;
    ensure!(child.wait()?.success(), "nft refused the test's table");
    let run = async {
        std::fs::write(dir.path().join("send"), "")?;
        wait_file("sent").await?;
        switch_to(c, other).await?;
        // Where the tree kill did not take it (user mode), the test does.
        let _ = holder.kill();
        let _ = holder.wait();
        if let (true, Join::Cgroup(leaf)) = (rebuild, &placed) {
            // A cleanup tool removes the emptied leaf (its orphans do not
            // keep it) and a firewall reload the table: the table put back
            // before the key returns must drop them still.
            std::fs::remove_dir(leaf).with_context(|| format!("{}", leaf.display()))?;
            nft(&["delete", "table", "inet", &table(c, active)?])?;
        }
        switch_to(c, active).await?;
        let attempts = || -> Result<u64> {
            let text = nft(&["list", "chain", "inet", &t, "early"])?;
            text.split("counter packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .context("no counter")
        };
        let before = attempts()?;
        nft(&["delete", "chain", "inet", &t, "hole"])?;
        // Two retransmissions after the lift (backing off, seconds apart).
        eventually(
            Duration::from_secs(60),
            "the orphan to retransmit",
            || async { Ok((attempts()? >= before + 2).then_some(())) },
        )
        .await?;
        let got = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ensure!(
            got.is_empty(),
            "the killed validator's orphaned connection sent {:?} after the key came back",
            String::from_utf8_lossy(&got)
        );
        c.assert_no_double_signs().await?;
        Ok(())
    };
    let r = run.await;
    let _ = holder.kill();
    let _ = nft(&["delete", "table", "inet", &t]);
    r
}

/// The keyed leaf the validator of node `id` (pid `validator`) runs in.
fn keyed_leaf(validator: i32) -> Result<Join> {
    let text = std::fs::read_to_string(format!("/proc/{validator}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
        })
        .context("no cgroup v2 mount")?;
    let leaf = Path::new(mount).join(rel.trim_start_matches('/'));
    ensure!(
        leaf.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("keyed-")),
        "the validator runs in {}",
        leaf.display()
    );
    Ok(Join::Cgroup(leaf))
}

#[tokio::test]
async fn a_killed_validators_orphaned_connection_stays_dropped_when_the_key_comes_back(
) -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    an_orphan_stays_dropped(&c, false, |_, pid| keyed_leaf(pid)).await
}

/// The same, with the killed validator's emptied leaf removed and the
/// table deleted while the host stands by: the table is put back from the
/// data dir's record of keyed ids, which still holds the removed leaf's.
#[tokio::test]
async fn an_orphan_stays_dropped_after_its_leaf_is_removed_and_the_table_rebuilt() -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| NodeOpts::default()).await?;
    an_orphan_stays_dropped(&c, true, |_, pid| keyed_leaf(pid)).await
}

#[tokio::test]
async fn without_a_cgroup_an_orphaned_connection_stays_dropped_when_the_key_comes_back(
) -> Result<()> {
    let c = Cluster::start(3, BLOCK_MS, |_| as_in_a_container()).await?;
    an_orphan_stays_dropped(&c, false, |_, pid| {
        Ok(Join::Group(status_field(pid, "Gid:")?))
    })
    .await
}
