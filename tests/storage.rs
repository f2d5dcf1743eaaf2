//! The Raft store under faults. Under SIGKILL: a child process appends
//! entries and prints each index once openraft's IO callback says it is
//! durable; the parent kills it at a random moment, again and again.
//! Whatever was acknowledged must still be there, with no holes and no
//! changed entries. Under a full disk: the member whose store it is stops
//! for good and says so with its exit code (8).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use keyraft::ledger::Command as Cmd;
use keyraft::raft::store::{self, LogStore};
use keyraft::raft::{Entry, TypeConfig};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, LogId};

const CHILD_ENV: &str = "KEYRAFT_STORAGE_WRITER_DIR";
const TEST_NAME: &str = "acknowledged_entries_survive_sigkill_at_random_moments";

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: EntryPayload::Normal(Cmd::Register {
            node: index,
            mode: None,
        }),
    }
}

/// The child: append forever, printing each index once it is durable.
async fn writer(dir: &Path) -> Result<()> {
    let (mut log, _sm, _) = store::open(dir)?;
    let state = log.get_log_state().await?;
    let mut next = state.last_log_id.map_or(1, |l| l.index + 1);
    let mut out = std::io::stdout().lock();
    loop {
        let batch = 1 + rand::random_range(0..4u64);
        let entries: Vec<Entry> = (next..next + batch).map(entry).collect();
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await?;
        rx.await.context("callback dropped")??;
        next += batch;
        writeln!(out, "{}", next - 1)?;
        out.flush()?;
    }
}

/// Everything in the log must be entries 1..=last, intact.
async fn check(dir: &Path, acked: u64) -> Result<u64> {
    let (mut log, _sm, _): (LogStore, _, _) = store::open(dir)?;
    let bounds = log.verify().await?;
    let Some((first, last)) = bounds else {
        ensure!(acked == 0, "log empty, but {acked} was acknowledged");
        return Ok(0);
    };
    ensure!(first == 1, "log starts at {first}");
    ensure!(
        last >= acked,
        "acknowledged up to {acked}, log ends at {last}"
    );
    let entries = log.try_get_log_entries(1..=last).await?;
    for (i, e) in entries.iter().enumerate() {
        let want = entry(i as u64 + 1);
        ensure!(e.log_id == want.log_id, "entry {i} has log id {}", e.log_id);
        match &e.payload {
            EntryPayload::Normal(Cmd::Register { node, .. }) if *node == i as u64 + 1 => {}
            other => bail!("entry {} changed: {other:?}", i + 1),
        }
    }
    Ok(last)
}

#[tokio::test]
async fn acknowledged_entries_survive_sigkill_at_random_moments() -> Result<()> {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return writer(Path::new(&dir)).await;
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("raft");
    let mut acked = 0;
    for round in 0..12 {
        let mut child = Command::new(std::env::current_exe()?)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Read acknowledgements on a thread; kill after a random time.
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(n) = line.trim().parse::<u64>() {
                    last = n;
                }
            }
            last
        });
        tokio::time::sleep(Duration::from_millis(50 + rand::random_range(0..400u64))).await;
        child.kill()?;
        child.wait()?;
        let seen = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        acked = acked.max(seen);
        let last = check(&dir, acked)
            .await
            .with_context(|| format!("round {round}"))?;
        eprintln!("round {round}: acknowledged {acked}, log holds {last}");
    }
    ensure!(acked > 0, "the writer never acknowledged anything");
    Ok(())
}

fn entry_of_term(term: u64, index: u64) -> Entry {
    let mut e = entry(index);
    e.log_id.leader_id.term = term;
    e
}

async fn append_durably(log: &mut LogStore, entries: Vec<Entry>) -> Result<()> {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.context("callback dropped")??;
    Ok(())
}

fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

/// Appends go through the store's writer thread: after appends, a
/// truncation of conflicting entries, new entries in their place and a
/// purge, what the store reads at once must be what a reopened store reads.
#[tokio::test]
async fn reads_agree_with_the_disk_after_appends_truncate_and_purge() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("raft");
    let expected: Vec<(u64, u64)> = {
        let (mut log, _sm, _) = store::open(&dir)?;
        append_durably(&mut log, (1..=10).map(entry).collect()).await?;
        ensure!(
            ids(&log.try_get_log_entries(1..=10).await?)
                == ids(&(1..=10).map(entry).collect::<Vec<_>>())
        );
        // A follower's conflicting entries 6..=10 are replaced by term 2's.
        log.truncate_after(Some(entry(5).log_id)).await?;
        ensure!(
            log.try_get_log_entries(6..).await?.is_empty(),
            "truncated entries are still read"
        );
        append_durably(&mut log, (6..=8).map(|i| entry_of_term(2, i)).collect()).await?;
        log.purge(entry(3).log_id).await?;
        let read = ids(&log.try_get_log_entries(4..=8).await?);
        let want: Vec<(u64, u64)> = (4..=5)
            .map(|i| (1, i))
            .chain((6..=8).map(|i| (2, i)))
            .collect();
        ensure!(read == want, "read {read:?}, want {want:?}");
        ensure!(
            log.try_get_log_entries(2..=4).await?.len() == 1,
            "purged entries are still read"
        );
        log.flush().await?;
        want
    };
    // The dropped store's writer thread lets go of the store's lock once it sees
    // its channel closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut reopened, _sm, _) = loop {
        match store::open(&dir) {
            Ok(opened) => break opened,
            Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let read = ids(&reopened.try_get_log_entries(4..=8).await?);
    ensure!(
        read == expected,
        "after reopening: {read:?}, want {expected:?}"
    );
    Ok(())
}

/// Opens the store in `dir`, retrying while a store dropped just before
/// still holds the store's lock (its writer thread lets go once it sees that).
async fn reopen(dir: &Path) -> Result<LogStore> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match store::open(dir) {
            Ok((log, _sm, _)) => return Ok(log),
            Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A data dir an older keyraft wrote keeps its store in sled (the log in
/// the tree `log`, entries up to the purge point removed; the vote in
/// `meta`; the member memory in `memory`): after the upgrade the store
/// reads the same log, vote and memory, appends after the log, and a
/// restart reads them again, from the store's own files.
#[tokio::test]
async fn an_older_keyraft_store_in_sled_is_the_store_after_the_upgrade() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("raft");
    let vote = keyraft::raft::Vote::new_committed(4, 2);
    {
        let db = sled::Config::new()
            .path(&dir)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(4 << 20)
            .flush_every_ms(None)
            .open()?;
        let (log, meta) = (db.open_tree("log")?, db.open_tree("meta")?);
        for i in 6..=20u64 {
            log.insert(i.to_be_bytes(), serde_json::to_vec(&entry(i))?)?;
        }
        meta.insert("last_purged", serde_json::to_vec(&Some(entry(5).log_id))?)?;
        meta.insert("vote", serde_json::to_vec(&vote)?)?;
        db.open_tree("memory")?.insert(
            3u64.to_be_bytes(),
            serde_json::to_vec(&keyraft::raft::memory::Remembered {
                term: 3,
                committed: 17,
                ..Default::default()
            })?,
        )?;
        db.flush()?;
    }
    let mut log = reopen(&dir).await?;
    let state = log.get_log_state().await?;
    ensure!(state.last_purged_log_id == Some(entry(5).log_id));
    ensure!(state.last_log_id == Some(entry(20).log_id));
    ensure!(log.holds()?.last_index == 20);
    ensure!(log.read_vote().await? == Some(vote), "the vote moved");
    let want: Vec<(u64, u64)> = (6..=21).map(|i| (1, i)).collect();
    append_durably(&mut log, vec![entry(21)]).await?;
    ensure!(ids(&log.try_get_log_entries(6..=21).await?) == want);
    drop(log);
    let mut log = reopen(&dir).await?;
    let read = ids(&log.try_get_log_entries(1..=21).await?);
    ensure!(read == want, "after a restart: {read:?}");
    ensure!(log.holds()?.term == 4, "the vote's term after a restart");
    drop(log);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let memory = loop {
        match store::open(&dir) {
            Ok((_, _, memory)) => break memory.all(),
            Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    ensure!(
        memory.get(&3).map(|r| (r.term, r.committed)) == Some((3, 17)),
        "the member memory moved: {memory:?}"
    );
    ensure!(
        dir.join("log").exists() && dir.join("meta").exists() && dir.join("db.moved").exists(),
        "the store moved into its own files, sled's set aside"
    );
    ensure!(
        !dir.join("db").exists(),
        "sled's data file is not read again"
    );
    Ok(())
}

/// A tmpfs of `size` mounted over `dir`, holding what `dir` held; on drop,
/// what it holds goes back to the disk and the mount goes away.
struct SmallDisk {
    dir: std::path::PathBuf,
    disk: std::path::PathBuf,
}

impl SmallDisk {
    fn over(dir: &Path, size: &str) -> Result<SmallDisk> {
        let disk = dir.with_extension("disk");
        std::fs::rename(dir, &disk)?;
        std::fs::create_dir(dir)?;
        let sh = |cmd: String| -> Result<()> {
            let out = Command::new("sh").arg("-c").arg(&cmd).output()?;
            ensure!(out.status.success(), "{cmd}: {out:?}");
            Ok(())
        };
        sh(format!(
            "mount -t tmpfs -o size={size} tmpfs {}",
            dir.display()
        ))?;
        let d = SmallDisk {
            dir: dir.to_path_buf(),
            disk,
        };
        sh(format!("cp -a {}/. {}/", d.disk.display(), dir.display()))?;
        Ok(d)
    }

    /// Fills the tmpfs to the last byte.
    fn fill(&self) -> Result<()> {
        let mut f = std::fs::File::create(self.dir.join("filler"))?;
        let block = vec![0u8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("filler"));
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "rm -rf {disk} && cp -a {dir} {disk} && umount -l {dir} && rmdir {dir} && mv {disk} {dir}",
                disk = self.disk.display(),
                dir = self.dir.display()
            ))
            .status();
    }
}

/// A member's disk fills up: its Raft core stops on the first append that
/// fails, and the member does not linger "validating nothing": it says why
/// in one line, stops its validator and exits with code 8 (what systemd's
/// `Restart=on-failure` restarts). The cluster validates on; with the space
/// back, the member started again takes part. The chain judges.
///
/// The member is a standby: only a leader appends entries of its own, and
/// the entries an operator can make without a failover (pause, resume)
/// would leave a cluster paused if its leader died between them. A leader
/// whose store stalls or fails loses its lease for want of its own durable
/// ack (`raft::heartbeat_while_leading`) before anything else.
#[tokio::test]
async fn a_member_whose_raft_core_stops_stops_its_validator_and_exits_8() -> Result<()> {
    use localnet::cluster::{Cluster, NodeOpts, SETTLE};
    use localnet::harness::{alive, eventually};
    use nix::sys::signal::Signal;

    let mut c = Cluster::start(3, 250, |_| NodeOpts::default()).await?;
    let active = c.active().await?;
    let victim = *c
        .nodes
        .keys()
        .find(|&&id| id != active)
        .context("no standby")?;
    // The victim's Raft store on a small disk of its own: stopped cleanly,
    // moved, started again.
    c.signal(victim, Signal::SIGTERM)?;
    let mut p = c.forget(victim)?.context("no process")?;
    ensure!(p.wait_exit(SETTLE).await?.success());
    let disk = SmallDisk::over(&c.nodes[&victim].data.join("raft"), "16m")?;
    c.spawn(victim)?;
    eventually(SETTLE, "the victim back as a standby", || async {
        Ok((c.own_state(victim).await? == "Voting").then_some(()))
    })
    .await?;
    let validator = c.validator_pid(victim).context("no validator pid")?;
    let before = c.chain.totals().await?;

    // Full. A tmpfs takes small writes into a page already in use, so the
    // leader commits entries (pause, resume) until one needs a page more
    // on the victim and its append fails.
    disk.fill()?;
    let mut p = c.forget(victim)?.context("no process")?;
    for _ in 0..200 {
        if p.try_exit().is_some() {
            break;
        }
        for cmd in ["pause", "resume"] {
            let out = c.cli(active, &[cmd]).await?;
            ensure!(out.status.success(), "{cmd}: {out:?}");
        }
    }
    let status = p.wait_exit(SETTLE).await;
    let log = p.log_text();
    ensure!(
        status.as_ref().ok().and_then(|s| s.code()) == Some(8),
        "exit {status:?}\n{log}"
    );
    ensure!(
        log.lines()
            .filter(|l| l.contains("the Raft core stopped"))
            .count()
            == 1,
        "not one line says why:\n{log}"
    );
    ensure!(!alive(validator), "its validator outlived it");

    // Space back, started again: it takes part once more.
    drop(disk);
    c.spawn(victim)?;
    eventually(SETTLE, "the victim back as a standby", || async {
        Ok((c.own_state(victim).await? == "Voting").then_some(()))
    })
    .await
    .with_context(|| c.logs_ending_with(Some(victim)))?;
    let after = c.assert_no_double_signs().await?;
    ensure!(
        after.missed == before.missed && c.own_state(active).await? == "Validating",
        "the active node stopped: missed {} -> {}",
        before.missed,
        after.missed
    );
    Ok(())
}
