//! The leaves of a validator tree's cgroup: `standby` for the keyless
//! node, and a fresh `keyed-N` for each start with the key linked, so that
//! the kernel fence ([`super::kernel`]) tells one activation's sockets
//! from the next (a socket keeps the cgroup it was made in, even after
//! its process died: the orphans of a killed validator).
//!
//! The ids of keyed leaves are recorded in the data dir
//! (`kernel-fence-keyed`) when a leaf is made, and kept for
//! [`KEYED_LEAF_LIFE`] after the leaf was found empty or gone, so that a
//! table built again (a restart, a put-back after a ruleset flush) still
//! drops those orphans, whoever removed the leaves (keyraft, a cleanup
//! tool, systemd).
//!
//! Owns: making, opening and pruning leaves, and the record of keyed ids.
//! Must not: touch nftables (the kernel fence does) or processes (the
//! tree does).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::FenceError;

/// The leaf cgroup of the keyless standby.
pub const STANDBY: &str = "standby";
/// Keyed leaves are `keyed-N` (`keyed` alone was the one leaf of earlier
/// versions, still counted as one).
const KEYED: &str = "keyed";
/// The record of keyed ids, in the data dir.
pub const RECORD_FILE: &str = "kernel-fence-keyed";
/// How long a keyed leaf's id stays dropped after the leaf was found
/// empty or gone: the orphaned sockets of its killed validator have
/// retransmitted their last by then (Linux gives up on an orphan after
/// `tcp_orphan_retries` backed-off retransmissions: about 100 s at a LAN's
/// 200 ms timeout, under 400 s at the 120 s cap).
pub const KEYED_LEAF_LIFE: Duration = Duration::from_secs(600);

/// One recorded keyed id: its leaf's cgroup id, and when (Unix seconds)
/// the leaf was first found empty or gone, if it has been.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub emptied: Option<u64>,
}

/// The record after a look at the keyed leaves there are now (`existing`)
/// at `now`: a leaf gone counts as emptied now (if not already), an id
/// emptied [`KEYED_LEAF_LIFE`] ago or more is dropped, a leaf not yet
/// recorded is added. Every id it returns must stay in the `keyed` set.
pub fn settle(record: &[Entry], existing: &BTreeSet<u64>, now: u64) -> Vec<Entry> {
    let life = KEYED_LEAF_LIFE.as_secs();
    let mut out: Vec<Entry> = record
        .iter()
        .map(|e| Entry {
            id: e.id,
            emptied: e.emptied.or((!existing.contains(&e.id)).then_some(now)),
        })
        .filter(|e| e.emptied.is_none_or(|t| now.saturating_sub(t) < life))
        .collect();
    for &id in existing {
        if !out.iter().any(|e| e.id == id) {
            out.push(Entry { id, emptied: None });
        }
    }
    out
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_record(path: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.parse().ok()?;
            let emptied = match f.next() {
                None | Some("-") => None,
                Some(t) => Some(t.parse().ok()?),
            };
            Some(Entry { id, emptied })
        })
        .collect()
}

fn write_record(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let text: String = entries
        .iter()
        .map(|e| match e.emptied {
            Some(t) => format!("{} {t}\n", e.id),
            None => format!("{} -\n", e.id),
        })
        .collect();
    crate::durable::write(path, text.as_bytes(), 0o600)
}

/// A tree cgroup's leaves, and its record of keyed ids.
#[derive(Debug, Clone)]
pub struct Leaves {
    /// The tree's cgroup.
    pub dir: PathBuf,
    /// `DATA_DIR/kernel-fence-keyed`, where there is a data dir.
    pub record: Option<PathBuf>,
}

impl Leaves {
    /// Every keyed leaf there is, with its cgroup id (its directory's
    /// inode), oldest first.
    pub fn keyed(&self) -> Vec<(PathBuf, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut found: Vec<(u64, PathBuf, u64)> = self
            .subdirs()
            .into_iter()
            .filter_map(|d| {
                let n = keyed_number(d.file_name()?.to_str()?)?;
                let id = std::fs::metadata(&d).ok()?.ino();
                Some((n, d, id))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, d, id)| (d, id)).collect()
    }

    /// Every keyed id the kernel fence must drop: the leaves there are and
    /// those recorded within [`KEYED_LEAF_LIFE`] of being emptied (the
    /// record settled and written back).
    pub fn keyed_ids(&self) -> Result<Vec<u64>, FenceError> {
        let existing: BTreeSet<u64> = self.keyed().into_iter().map(|(_, id)| id).collect();
        let Some(path) = &self.record else {
            return Ok(existing.into_iter().collect());
        };
        let settled = settle(&read_record(path), &existing, now_secs());
        write_record(path, &settled).map_err(super::io("cannot write", path))?;
        Ok(settled.into_iter().map(|e| e.id).collect())
    }

    /// A keyed leaf no validator has run in, for the next keyed start (the
    /// last one's validator is dead by now): its `cgroup.procs`, opened,
    /// and its cgroup id, read from the very directory the file is in,
    /// and recorded before it is returned. Empty keyed leaves are removed
    /// on the way (their ids stay recorded); the tree's cgroup is made
    /// again where something removed it.
    pub fn fresh_keyed(&self) -> Result<(File, u64), FenceError> {
        // Recorded before any is removed (a leaf of an earlier version).
        self.keyed_ids()?;
        let leaves = self.keyed();
        let mut n = leaves
            .iter()
            .filter_map(|(d, _)| keyed_number(d.file_name()?.to_str()?))
            .max()
            .map_or(1, |n| n + 1);
        for (leaf, _) in &leaves {
            let _ = std::fs::remove_dir(leaf); // a busy one stays
        }
        std::fs::create_dir_all(self.dir.join(STANDBY))
            .map_err(super::io("cannot make", &self.dir))?;
        let (procs, id) = loop {
            let leaf = self.dir.join(format!("{KEYED}-{n}"));
            match std::fs::create_dir(&leaf) {
                Ok(()) => break open_procs(&leaf).map_err(super::io("cannot open", &leaf))?,
                // Made meanwhile by another start (a probe): the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(super::io("cannot make", &leaf)(e)),
            }
        };
        self.keyed_ids()?;
        Ok((procs, id))
    }

    /// The file a new keyless validator process writes "0" to, to join
    /// the standby leaf before it execs (opened here, written after fork).
    pub fn standby_procs(&self) -> Option<File> {
        open_procs(&self.dir.join(STANDBY)).ok().map(|(f, _)| f)
    }

    /// The tree cgroup's child directories.
    pub fn subdirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `N` of a keyed leaf's name `keyed-N` (0 for `keyed`).
fn keyed_number(name: &str) -> Option<u64> {
    match name.strip_prefix(KEYED)? {
        "" => Some(0),
        rest => rest.strip_prefix('-')?.parse().ok(),
    }
}

/// A leaf's `cgroup.procs` (opened for writing) and its cgroup id, both
/// from one open of the directory: a leaf removed and made again between
/// them cannot hand out the old id with the new file.
fn open_procs(leaf: &Path) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(leaf)?;
    let id = dir.metadata()?.ino();
    let fd = nix::fcntl::openat(
        std::os::fd::AsFd::as_fd(&dir),
        "cgroup.procs",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok((File::from(fd), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u64, emptied: Option<u64>) -> Entry {
        Entry { id, emptied }
    }

    #[test]
    fn an_id_stays_held_for_the_orphans_life_after_its_leaf_emptied_whoever_removed_it() {
        let life = KEYED_LEAF_LIFE.as_secs();
        let existing: BTreeSet<u64> = [3].into();
        // 1: removed by someone else, unnoticed: emptied now, still held.
        // 2: emptied long ago: dropped. 3: there, in use. 4: new, added.
        let record = [e(1, None), e(2, Some(1_000)), e(3, None)];
        let now = 1_000 + life;
        let mut existing4 = existing.clone();
        existing4.insert(4);
        let settled = settle(&record, &existing4, now);
        assert_eq!(
            settled,
            vec![e(1, Some(now)), e(3, None), e(4, None)],
            "{settled:?}"
        );
        // Id 1 is held until a whole life after it was found gone.
        let later = settle(&settled, &existing4, now + life - 1);
        assert!(later.iter().any(|x| x.id == 1));
        let gone = settle(&settled, &existing4, now + life);
        assert!(!gone.iter().any(|x| x.id == 1));
    }

    #[test]
    fn the_record_reads_back_what_was_written_and_skips_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(RECORD_FILE);
        let entries = [e(7, None), e(9, Some(42))];
        write_record(&path, &entries).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_record(&path), entries.to_vec());
        std::fs::write(&path, "7 -\ngarbage\n9 x\n11 5\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_record(&path), vec![e(7, None), e(11, Some(5))]);
    }
}
