//! The validator's whole process tree, the unit of fencing. A validator
//! command may be a wrapper (`sh -c`, `cosmovisor run`, a script that
//! daemonizes its node), so "the validator" is every process it starts:
//!
//! - a cgroup v2 per data dir where keyraft can create one (below its own
//!   cgroup): `cgroup.kill` ends every member at once, forks included. It
//!   has a leaf `standby` for the keyless node and a fresh leaf
//!   `keyed-N` for each start with the key linked, so that the kernel
//!   fence ([`super::kernel`]) can hold back the keyed one's traffic alone,
//!   and one activation's from the next (a socket keeps the cgroup it was
//!   made in, even after its process died);
//! - otherwise, and always as well, an environment marker
//!   (`KEYRAFT_FENCE=<data dir>`) that every descendant inherits, found by
//!   scanning `/proc`, and every descendant of the guard (a child subreaper,
//!   so orphans that double-forked or called `setsid` stay below it).
//!
//! A process that clears its environment and escapes the guard's subtree
//! (it would have to be reparented away from a live subreaper) is caught
//! only by the cgroup. "Dead" means every member is gone, a zombie, or has
//! a SIGKILL pending (it never runs user code again).
//!
//! Must not: decide when to kill; the guard and the coordinator do.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::leaves::{Leaves, RECORD_FILE, STANDBY};
use super::FenceError;

/// The environment variable every process of a validator's tree carries.
pub const MARKER_VAR: &str = "KEYRAFT_FENCE";
/// The file in the data dir that names the tree's cgroup, if it has one.
pub const CGROUP_FILE: &str = "cgroup";
/// One data dir's validator tree: how to find and kill all of it.
#[derive(Debug, Clone)]
pub struct Tree {
    /// `KEYRAFT_FENCE=<value>` marks the tree's processes.
    marker: String,
    /// The tree's own cgroup, when cgroup v2 lets keyraft make one.
    cgroup: Option<PathBuf>,
    /// The cgroup v2 mount the tree's cgroup is below.
    mount: Option<PathBuf>,
    /// `--validator-user`: every process of that user is the tree's.
    uid: Option<u32>,
    /// The data dir's record of keyed ids ([`super::leaves`]).
    record: Option<PathBuf>,
}

impl Tree {
    /// The tree of the validator run from `data_dir` (which must exist).
    /// With `cgroup`, makes the tree's cgroup if it can; [`Tree::mechanism`]
    /// says what it got.
    pub fn for_data_dir(data_dir: &Path, cgroup: bool) -> Tree {
        let canon = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        let marker = canon.display().to_string();
        let made = cgroup
            .then(own_cgroup_dir)
            .flatten()
            .and_then(|(mount, own)| {
                let dir = own.join(format!("keyraft-{:016x}", fnv1a(marker.as_bytes())));
                let mk = |d: &Path| match std::fs::create_dir(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                };
                match mk(&dir).and_then(|()| mk(&dir.join(STANDBY))) {
                    Ok(()) => Some((mount, dir)),
                    Err(e) => {
                        tracing::debug!("no cgroup for the validator ({}): {e}", dir.display());
                        None
                    }
                }
            });
        let (mount, cgroup) = made.unzip();
        Tree {
            marker,
            cgroup,
            mount,
            uid: None,
            record: Some(data_dir.join(RECORD_FILE)),
        }
    }

    /// The same tree, with the processes of user `uid` (the validator's
    /// own) whose environment keyraft may not read counted in it: without
    /// CAP_SYS_PTRACE (a container) the marker cannot be seen there.
    pub fn owned_by(mut self, uid: Option<u32>) -> Tree {
        self.uid = uid;
        self
    }

    /// A tree known only by its marker (tests, and where cgroups are off).
    pub fn marker_only(marker: &str) -> Tree {
        Tree {
            uid: None,
            marker: marker.to_string(),
            cgroup: None,
            mount: None,
            record: None,
        }
    }

    /// The table name and cgroup of this tree's kernel fence: stable for a
    /// data dir, distinct between data dirs on one host.
    pub fn name(&self) -> String {
        format!("keyraft_{:016x}", fnv1a(self.marker.as_bytes()))
    }

    /// The depth of the tree's leaves below the cgroup v2 root (what
    /// nftables' `socket cgroupv2 level` compares), if there is a cgroup.
    pub fn leaf_level(&self) -> Option<u32> {
        let rel = self
            .cgroup
            .as_ref()?
            .strip_prefix(self.mount.as_ref()?)
            .ok()?;
        Some(rel.components().count() as u32 + 1)
    }

    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// `cgroup` or `marker`: what this host's fence rests on.
    pub fn mechanism(&self) -> &'static str {
        if self.cgroup.is_some() {
            "cgroup"
        } else {
            "marker"
        }
    }

    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Its cgroup's leaves and the record of keyed ids, if it has a
    /// cgroup.
    pub fn leaves(&self) -> Option<Leaves> {
        Some(Leaves {
            dir: self.cgroup.clone()?,
            record: self.record.clone(),
        })
    }

    /// Every live member: in the cgroup, carrying the marker, or below
    /// `root` (the guard, excluded itself). Zombies and processes with a
    /// SIGKILL pending are not live. Fails closed: what cannot be read is
    /// an error, never an empty tree. (A process of another user whose
    /// environment this one may not read is not taken for a member,
    /// unless it runs as the validator's user, whose processes are then
    /// taken for members; a validator that changes user is found by the
    /// cgroup or as a descendant.)
    ///
    /// The marker counts only on a process all of whose uids may be the
    /// validator's (root, keyraft's own, `--validator-user`): anyone can
    /// put `KEYRAFT_FENCE=...` in an environment, and another local user
    /// who kept such processes alive would keep the tree from ever being
    /// proven dead (and have them killed). Environments are read on a
    /// worker thread, within [`SCAN_BOUND`] for the whole scan: one held up
    /// (memory behind a stalled FUSE mount) fails the scan, closed, where
    /// there is no cgroup; with one, the cgroup is the tree (a warning).
    pub fn live_members(&self, root: Option<i32>) -> Result<BTreeSet<i32>, FenceError> {
        let me = std::process::id() as i32;
        let mut found = self.cgroup_members()?;
        let table = processes()?;
        // Members of the cgroup, and processes already dying, need no read
        // of their environment (a dying one stuck on a stalled disk could
        // hold it up).
        let keyraft = nix::unistd::geteuid().as_raw();
        let candidates: Vec<i32> = table
            .iter()
            .map(|&(pid, _)| pid)
            .filter(|pid| !found.contains(pid) && !dead_or_dying(*pid).unwrap_or(false))
            .filter(|&pid| {
                process_uids(pid).is_some_and(|ids| {
                    ids.iter()
                        .all(|u| u.is_some_and(|u| u == 0 || u == keyraft || Some(u) == self.uid))
                })
            })
            .collect();
        match self.marked(candidates) {
            Ok(marked) => found.extend(marked),
            // With a cgroup, membership is the cgroup's: a marker scan
            // held up by some other process (one stuck on a hung mount)
            // must not keep the tree from being proven dead for good.
            Err(e) if self.cgroup.is_some() => {
                tracing::warn!("the marker scan failed ({e}): the validator's tree is its cgroup");
            }
            Err(e) => return Err(e),
        }
        if let Some(root) = root {
            found.extend(descendants(&table, root));
        }
        found.remove(&me);
        let mut live = BTreeSet::new();
        for pid in found {
            if !dead_or_dying(pid)? {
                live.insert(pid);
            }
        }
        Ok(live)
    }

    /// Which of `candidates` carry the marker (or, unreadable, run as the
    /// validator's user). Fails closed on any other read error, or a scan
    /// slower than [`SCAN_BOUND`].
    fn marked(&self, candidates: Vec<i32>) -> Result<BTreeSet<i32>, FenceError> {
        let needle = format!("{MARKER_VAR}={}", self.marker);
        let mut found = BTreeSet::new();
        for (pid, env) in environments(candidates, SCAN_BOUND)? {
            match env {
                Ok(env) => {
                    if env.split(|b| *b == 0).any(|e| e == needle.as_bytes()) {
                        found.insert(pid);
                    }
                }
                // Unreadable (no CAP_SYS_PTRACE, as in a container): a
                // process of the validator's user is taken for a member.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    if self.uid.is_some()
                        && process_uids(pid).is_some_and(|u| u.contains(&self.uid))
                    {
                        found.insert(pid);
                    }
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(proc_error(pid, e)),
            }
        }
        Ok(found)
    }

    fn cgroup_members(&self) -> Result<BTreeSet<i32>, FenceError> {
        let Some(dir) = &self.cgroup else {
            return Ok(BTreeSet::new());
        };
        let mut found = BTreeSet::new();
        let leaves = self.leaves().map(|l| l.subdirs()).unwrap_or_default();
        for d in std::iter::once(dir.clone()).chain(leaves) {
            let procs = d.join("cgroup.procs");
            match std::fs::read_to_string(&procs) {
                Ok(text) => found.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(super::io("cannot read", &procs)(e)),
            }
        }
        Ok(found)
    }

    /// SIGKILLs every member and confirms, within `limit`, that none is
    /// left alive. The cgroup (atomically) and `root`'s descendants (found
    /// from `/proc/*/stat` alone) are killed before the slower environment
    /// scan. Returns how many were killed; an error names the ones that
    /// would not die, or what could not be read.
    pub fn kill(&self, root: Option<i32>, limit: Duration) -> Result<usize, FenceError> {
        let deadline = Instant::now() + limit;
        let mut killed = BTreeSet::new();
        if let Some(root) = root {
            for pid in descendants(&processes()?, root) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.insert(pid);
            }
        }
        // A process in the middle of a fork or exec can show an empty
        // environ for a moment, and so no marker: the tree counts as gone
        // only after two scans in a row find nothing.
        let mut empty_scans = 0;
        loop {
            if let Some(dir) = &self.cgroup {
                // Atomic against forks; absent on kernels before 5.14.
                if let Ok(mut f) = File::options().write(true).open(dir.join("cgroup.kill")) {
                    let _ = f.write_all(b"1");
                }
            }
            let live = self.live_members(root)?;
            if live.is_empty() {
                empty_scans += 1;
                if empty_scans >= 2 {
                    return Ok(killed.len());
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            empty_scans = 0;
            for &pid in &live {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.insert(pid);
            }
            if Instant::now() >= deadline {
                let left = self.live_members(root)?;
                if left.is_empty() {
                    return Ok(killed.len());
                }
                return Err(FenceError::Survivors { pids: left, limit });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the (empty) cgroup, e.g. at shutdown; a busy one stays.
    pub fn remove_cgroup(&self) {
        if let Some(dir) = &self.cgroup {
            for leaf in self.leaves().map(|l| l.subdirs()).unwrap_or_default() {
                let _ = std::fs::remove_dir(leaf);
            }
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Writes the cgroup's path to `DATA_DIR/cgroup` (removed without
    /// one), for operators and tools that clean up after a killed keyraft.
    pub fn record(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(CGROUP_FILE);
        match &self.cgroup {
            Some(dir) => {
                crate::durable::write(&path, format!("{}\n", dir.display()).as_bytes(), 0o600)
            }
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// How long one scan may take to read the environments it needs.
pub const SCAN_BOUND: Duration = Duration::from_millis(500);

/// The most environment-reading threads out at once ([`environments`]).
const MAX_READERS: usize = 8;
static READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A process and what reading its environment gave.
type Environ = (i32, std::io::Result<Vec<u8>>);

/// `/proc/<pid>/environ` of each of `pids`, read on a thread of its own
/// (reading another process's environment reads its memory, which can
/// block); an error when they are not all read within `bound`. A read that
/// never returns leaves its thread behind, blocked in the kernel.
///
/// At most [`MAX_READERS`] such threads run at once: where that many are
/// still out (blocked for good, say), the scan fails at once instead of
/// leaving one more behind.
fn environments(pids: Vec<i32>, bound: Duration) -> Result<Vec<Environ>, FenceError> {
    use std::sync::atomic::Ordering;
    let (tx, rx) = std::sync::mpsc::channel();
    let n = pids.len();
    let order = pids.clone();
    if READERS.fetch_add(1, Ordering::SeqCst) >= MAX_READERS {
        READERS.fetch_sub(1, Ordering::SeqCst);
        return Err(FenceError::ScanBlocked(MAX_READERS));
    }
    /// Counts its thread out however it ends.
    struct Out;
    impl Drop for Out {
        fn drop(&mut self) {
            READERS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let spawned = std::thread::Builder::new()
        .name("environ".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _out = Out;
            for pid in pids {
                let env = std::fs::read(format!("/proc/{pid}/environ"));
                if tx.send((pid, env)).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        READERS.fetch_sub(1, Ordering::SeqCst);
        return Err(super::io(
            "cannot start a thread to read",
            Path::new("/proc"),
        )(e));
    }
    let until = Instant::now() + bound;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(read) => out.push(read),
            Err(_) => {
                let pid = order[out.len()];
                return Err(FenceError::ScanSlow { pid, bound });
            }
        }
    }
    Ok(out)
}

/// A process's real, effective, saved and file-system uids (`None` once
/// it is gone).
fn process_uids(pid: i32) -> Option<[Option<u32>; 4]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse().ok());
    Some([(); 4].map(|()| ids.next().flatten()))
}

/// Whether this process could make the validator a cgroup (nothing is made).
pub fn cgroup_available() -> bool {
    own_cgroup_dir().is_some()
}

/// FNV-1a: a stable short name for a data dir's cgroup.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The cgroup v2 mount and this process's directory in it, if cgroup v2 is mounted and the
/// directory is writable (a systemd unit with `Delegate=yes`, a root shell,
/// a privileged container).
fn own_cgroup_dir() -> Option<(PathBuf, PathBuf)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = mount.join(rel.trim_start_matches('/'));
    // Making the child needs the directory; moving the validator into it
    // needs our own cgroup.procs too (the common ancestor's), or every start
    // would fail: then there is no cgroup and the marker does the work.
    let w = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
    (w(&dir) && w(&dir.join("cgroup.procs"))).then_some((mount, dir))
}

/// Whether an error reading `/proc/<pid>/...` means the process is gone.
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

fn proc_error(pid: i32, e: std::io::Error) -> FenceError {
    FenceError::Io {
        what: "cannot read",
        path: format!("/proc/{pid}"),
        source: e,
    }
}

/// Every process, as (pid, parent pid), from `/proc/*/stat` alone.
fn processes() -> Result<Vec<(i32, i32)>, FenceError> {
    let dir = std::fs::read_dir("/proc").map_err(super::io("cannot list", Path::new("/proc")))?;
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(super::io("cannot list", Path::new("/proc")))?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse().ok());
                if let Some(ppid) = ppid {
                    out.push((pid, ppid));
                }
            }
            Err(e) if gone(&e) => {}
            Err(e) => return Err(proc_error(pid, e)),
        }
    }
    Ok(out)
}

/// Every descendant of `root` in `table` (not `root` itself).
fn descendants(table: &[(i32, i32)], root: i32) -> BTreeSet<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &(pid, ppid) in table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut found = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &child in children.get(&p).into_iter().flatten() {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found
}

/// Gone, a zombie, or with a SIGKILL pending: it will not run again.
/// A read error other than "no such process" is an error, not a death.
pub fn dead_or_dying(pid: i32) -> Result<bool, FenceError> {
    let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => s,
        Err(e) if gone(&e) => return Ok(true),
        Err(e) => return Err(proc_error(pid, e)),
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    if field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X')) {
        return Ok(true);
    }
    let sigkill = 1u64 << (Signal::SIGKILL as u64 - 1);
    Ok(["SigPnd:", "ShdPnd:"].iter().any(|f| {
        field(f)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .is_some_and(|mask| mask & sigkill != 0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn marked(marker: &str, script: &str) -> std::process::Child {
        Command::new("sh")
            .args(["-c", script])
            .env(MARKER_VAR, marker)
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_daemonized_grandchild_is_found_by_its_marker_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("test-{}", dir.path().display());
        let tree = Tree::marker_only(&marker);
        // A wrapper whose node double-forks into its own session, then exits.
        let pidfile = dir.path().join("pid");
        let script = format!(
            "setsid sh -c 'sleep 60 & echo $! > {}' ; exit 0",
            pidfile.display()
        );
        let mut wrapper = marked(&marker, &script);
        wrapper.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        // The pid is written right after the fork; until the child's exec
        // settles its environ can be unreadable for a moment (seen once in
        // CI): the tree must find it before the deadline.
        while !tree.live_members(None).unwrap().contains(&pid) {
            assert!(Instant::now() < deadline, "the daemon was never found");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(tree.kill(None, Duration::from_secs(2)).unwrap(), 1);
        assert!(dead_or_dying(pid).unwrap());
        assert!(tree.live_members(None).unwrap().is_empty());
        // Another tree's marker finds nothing of this one.
        assert!(Tree::marker_only("someone-else")
            .live_members(None)
            .unwrap()
            .is_empty());
    }

    /// Review finding: with a cgroup, a marker scan held up by some other
    /// process (its environment behind a hung mount) kept the tree from
    /// being proven dead for good (start-up exited, every kill unproven).
    /// The scan is held up here by taking every reader slot; the cgroup
    /// is a directory whose `cgroup.procs` names a running process. (Each
    /// test runs in a process of its own under nextest, so the slots taken
    /// are this test's alone.)
    #[test]
    fn with_a_cgroup_a_held_up_marker_scan_leaves_the_tree_its_cgroup() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let mut member = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = member.id() as i32;
        std::fs::write(dir.path().join("cgroup.procs"), format!("{pid}\n")).unwrap();
        let with_cgroup = Tree {
            cgroup: Some(dir.path().to_path_buf()),
            ..Tree::marker_only("held-up")
        };
        READERS.fetch_add(MAX_READERS, Ordering::SeqCst);
        let scanned = with_cgroup.live_members(None);
        let without = Tree::marker_only("held-up").live_members(None);
        READERS.fetch_sub(MAX_READERS, Ordering::SeqCst);
        member.kill().unwrap();
        member.wait().unwrap();
        assert_eq!(scanned.unwrap(), BTreeSet::from([pid]));
        // Without a cgroup the scan is all there is: it fails closed.
        assert!(
            matches!(without, Err(FenceError::ScanBlocked(_))),
            "{without:?}"
        );
    }

    /// Finding: another local user's process that carries the marker
    /// counted as the validator's (and a user who kept starting them kept
    /// the tree from ever being proven dead). Needs root, to start it as
    /// nobody.
    #[test]
    fn another_users_process_with_the_marker_is_not_the_validators() {
        use std::os::unix::process::CommandExt;
        let marker = format!("forged-{}", std::process::id());
        let mut forged = Command::new("sleep")
            .arg("60")
            .env(MARKER_VAR, &marker)
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        let pid = forged.id() as i32;
        let tree = Tree::marker_only(&marker);
        // Once its environment shows the marker, it is still not a member.
        let needle = format!("{MARKER_VAR}={marker}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        {
            assert!(
                Instant::now() < deadline,
                "the forged process did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!tree.live_members(None).unwrap().contains(&pid));
        assert_eq!(tree.kill(None, Duration::from_secs(1)).unwrap(), 0);
        assert!(
            !dead_or_dying(pid).unwrap(),
            "another user's process was killed"
        );
        let _ = forged.kill();
        let _ = forged.wait();
    }

    #[test]
    fn descendants_of_the_root_count_even_without_the_marker() {
        let mut parent = Command::new("sh")
            .args(["-c", "env -i sleep 60 & wait"])
            .spawn()
            .unwrap();
        let root = parent.id() as i32;
        let tree = Tree::marker_only("nobody-has-this-marker");
        let deadline = Instant::now() + Duration::from_secs(5);
        while tree.live_members(Some(root)).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the child did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(tree.kill(Some(root), Duration::from_secs(2)).unwrap(), 1);
        parent.wait().unwrap();
    }
}
