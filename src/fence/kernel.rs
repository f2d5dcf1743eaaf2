//! The kernel fence: while a validator holds the key, the kernel admits its
//! outbound packets only while a lease lives in an nftables set, and drops
//! them the moment it runs out, whether or not any process of this host is
//! scheduled. A host that thaws from a freeze, or a validator whose
//! coordinator and guard are both stalled, goes silent on the network when
//! the lease ends, before any user-space fence has run.
//!
//! One table per data dir (`inet keyraft_<hash>`, see [`Tree::name`]):
//!
//! ```text
//! set keyed { type cgroupsv2; }                  every keyed leaf of the tree
//! set lease { type cgroupsv2; flags timeout; }   this activation's leaf, while the lease lives
//! chain out { type filter hook output priority filter; policy accept;
//!   socket cgroupv2 level L @keyed socket cgroupv2 level L != @lease counter drop }
//! ```
//!
//! Only a validator started with the key runs in a keyed leaf, so the
//! keyless standby syncs freely, and the sockets of a killed keyed
//! validator (TCP keeps retransmitting for an orphan) stay held back. Each
//! keyed start gets a fresh key (a new leaf, [`KernelLease::rekey`]): the
//! lease admits only this activation's, so the orphans of the validator
//! killed at the last handover stay dropped when the key comes back.
//! Where there is no cgroup v2 to match (a Docker container), the match is
//! the validator's user ([`Match::User`]): the keyed validator runs with a
//! group of its own, one of [`GENERATIONS`] this data dir's table holds,
//! the next one at each keyed start; its packets mark their connections
//! with it, and marked connections pass only while their mark's lease
//! lives:
//!
//! ```text
//! set keyed { type gid; elements = { G0, ... } }  the keyed validator's groups
//! map mark_of { type gid : mark; }                each group to the same mark
//! set marks { type mark; elements = { G0, ... } } the marks
//! set lease { type mark; flags timeout; }          this activation's mark, while the lease lives
//! chain out { ...
//!   ct mark set meta skgid map @mark_of
//!   meta skgid @keyed ct state invalid,untracked counter drop
//!   meta l4proto udp ct direction original meta skgid != @keyed ct mark @marks ct mark set 0
//!   ct mark @marks ct mark != @lease counter drop }
//! ```
//!
//! (The third rule hands a UDP flow back to a live process that is not
//! keyed, the standby reusing a fixed port; TCP has orphaned sockets,
//! which have no owner to match, so a TCP connection stays marked, and a
//! new one on the same ports is a new conntrack entry.)
//!
//! The
//! table is built once with `nft -f` and proven with two probe packets; the
//! guard renews the lease element over netlink ([`super::nft`]), with the
//! guard's own lease time left minus [`MARGIN`], so the kernel's lease
//! never outlives the guard's.
//!
//! Must not: touch any other table or traffic; decide when the validator
//! holds the key (the coordinator does); outlive a clean stop (the table is
//! removed) or trust a leftover table (it is replaced at start).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::nft::{Netlink, NftError};
use super::Tree;
use crate::config::{ActivateBy, KernelFence, ValidatorUser};

const CHAIN: &str = "out";
const KEYED: &str = "keyed";
const LEASE: &str = "lease";
const MARK_OF: &str = "mark_of";
const MARKS: &str = "marks";

/// How many keyed groups (and marks) a data dir's table holds in user
/// mode: the last is the self-test probe's, the others are activations',
/// so one activation's orphans stay dropped through 254 more.
pub const GENERATIONS: u32 = 256;
const PROBE_GENERATION: u32 = GENERATIONS - 1;

/// The file in the data dir that holds the last keyed group's generation
/// (user mode), so that a restarted guard starts the next one.
pub const GENERATION_FILE: &str = "kernel-fence-generation";

/// The kernel's lease ends this much before the guard's: the kernel counts
/// timeouts in jiffies (up to 10 ms each) and rounds up.
pub const MARGIN: Duration = Duration::from_millis(25);

/// How many late writes a renewal makes before it takes the element back.
pub const RENEW_TRIES: u32 = 3;

/// What the probe process exits with when its packet was dropped.
const PROBE_DROPPED: u8 = 10;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("nft -f refused keyraft's table: {0}")]
    Install(String),
    #[error("the kernel fence failed its self-test: {0}")]
    Probe(String),
    #[error(
        "keyraft's nftables table {0} is incomplete (a ruleset flush or another tool removed it)"
    )]
    Missing(String),
    #[error("the lease's element landed later than the margin after its time left was measured, {0} times in a row (a freeze, a stalled netlink): taken back")]
    Stalled(u32),
    #[error("no fresh keyed cgroup for the validator: {0}")]
    NoLeaf(super::FenceError),
    #[error(
        "the fresh keyed cgroup {0} is not in the kernel fence's keyed set after it was added"
    )]
    NotHeld(u64),
    #[error("no keyed start has a key yet")]
    NoKey,
    #[error("cannot record the keyed group's generation in {path}: {source}")]
    Generation {
        path: String,
        source: std::io::Error,
    },
}

/// What the kernel fence tells the keyed validator's packets by.
#[derive(Debug, Clone)]
pub enum Match {
    /// Its socket's cgroup: one of the tree's keyed leaves (cgroup v2),
    /// a fresh one per keyed start.
    Cgroup {
        tree: Tree,
        /// The leaves' depth below the cgroup v2 root.
        level: u32,
    },
    /// Without a cgroup v2 (in a container): the validator runs as
    /// `--validator-user`, and while keyed with one of the groups
    /// `keyed_gids | 0..GENERATIONS` as its group, a group of its own that
    /// the keyless standby never has, the next one at each keyed start.
    /// Its packets mark their connection (conntrack), so the sockets of a
    /// killed keyed validator, which no longer have an owner to match,
    /// stay held back too.
    User {
        uid: u32,
        /// The first keyed group; the others follow it.
        keyed_gids: u32,
    },
}

/// One activation's key: the keyed leaf's cgroup id, or the keyed group
/// (and its mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Cgroup(u64),
    Group(u32),
}

impl Key {
    fn bytes(self) -> Vec<u8> {
        match self {
            Key::Cgroup(id) => id.to_ne_bytes().to_vec(),
            Key::Group(gid) => gid.to_ne_bytes().to_vec(),
        }
    }
}

/// Where a keyed start runs its validator: a fresh leaf (its
/// `cgroup.procs`, opened), or a fresh group.
#[derive(Debug)]
pub enum Keyed {
    Cgroup(std::fs::File),
    Group(u32),
}

/// One data dir's kernel fence: its table and what it holds back.
#[derive(Debug, Clone)]
pub struct Plan {
    pub table: String,
    pub matches: Match,
}

/// The first keyed group (and connection mark) of a tree in user mode:
/// `K` in the top byte, then 16 bits of the table's name, then the
/// generation: far above the ids systems hand out.
fn keyed_gids(table: &str) -> u32 {
    let h = table
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    0x4b00_0000 | ((h & 0xffff) << 8)
}

impl Plan {
    /// The plan for `tree`: by its keyed cgroups where there is one, else
    /// by the validator's user, if it runs as one.
    pub fn for_tree(tree: &Tree, user: Option<&ValidatorUser>) -> Result<Plan, KernelError> {
        let table = tree.name();
        let matches = match (tree.leaf_level(), user) {
            (Some(level), _) => Match::Cgroup {
                tree: tree.clone(),
                level,
            },
            (None, Some(u)) => Match::User {
                uid: u.uid,
                keyed_gids: keyed_gids(&table),
            },
            (None, None) => {
                return Err(KernelError::Unavailable(
                    "the validator has no cgroup v2 of its own here and no --validator-user (the kernel fence matches on one of them)"
                        .into(),
                ))
            }
        };
        Ok(Plan { table, matches })
    }

    /// A fresh key, added to the `keyed` set (where it is not there from
    /// the start), and where the validator runs with it. `generation` is
    /// the user mode's next one.
    fn fresh_key(&self, nl: &mut Netlink, generation: u32) -> Result<(Key, Keyed), KernelError> {
        match &self.matches {
            Match::Cgroup { tree, .. } => {
                let leaves = tree.leaves().ok_or_else(|| {
                    KernelError::Unavailable("the validator's cgroup is gone".into())
                })?;
                let (procs, id) = leaves.fresh_keyed().map_err(KernelError::NoLeaf)?;
                let key = Key::Cgroup(id);
                nl.add(&self.table, KEYED, &key.bytes())?;
                if !nl.elements(&self.table, KEYED)?.contains(&key.bytes()) {
                    return Err(KernelError::NotHeld(id));
                }
                Ok((key, Keyed::Cgroup(procs)))
            }
            Match::User { keyed_gids, .. } => {
                let gid = keyed_gids | (generation % GENERATIONS);
                Ok((Key::Group(gid), Keyed::Group(gid)))
            }
        }
    }

    /// The `nft -f` script: creates the table if missing, deletes it (and
    /// whatever a crashed run left in it), and builds it anew, atomically.
    fn script(&self) -> String {
        let t = &self.table;
        let body = match &self.matches {
            Match::Cgroup { level: l, .. } => format!(
                "\tset {KEYED} {{ type cgroupsv2; }}\n\
                 \tset {LEASE} {{ type cgroupsv2; flags timeout; }}\n\
                 \tchain {CHAIN} {{\n\
                 \t\ttype filter hook output priority filter; policy accept;\n\
                 \t\tsocket cgroupv2 level {l} @{KEYED} socket cgroupv2 level {l} != @{LEASE} counter drop\n\
                 \t}}\n"
            ),
            Match::User { keyed_gids, .. } => {
                let gids: Vec<String> = (0..GENERATIONS)
                    .map(|g| format!("{:#x}", keyed_gids | g))
                    .collect();
                let pairs: Vec<String> = gids.iter().map(|g| format!("{g} : {g}")).collect();
                let (gids, pairs) = (gids.join(", "), pairs.join(", "));
                format!(
                    "\tset {KEYED} {{ type gid; elements = {{ {gids} }}; }}\n\
                     \tmap {MARK_OF} {{ type gid : mark; elements = {{ {pairs} }}; }}\n\
                     \tset {MARKS} {{ type mark; elements = {{ {gids} }}; }}\n\
                     \tset {LEASE} {{ type mark; flags timeout; }}\n\
                     \tchain {CHAIN} {{\n\
                     \t\ttype filter hook output priority filter; policy accept;\n\
                     \t\tct mark set meta skgid map @{MARK_OF}\n\
                     \t\tmeta skgid @{KEYED} ct state invalid,untracked counter drop\n\
                     \t\tmeta l4proto udp ct direction original meta skgid != @{KEYED} ct mark @{MARKS} ct mark set 0\n\
                     \t\tct mark @{MARKS} ct mark != @{LEASE} counter drop\n\
                     \t}}\n"
                )
            }
        };
        format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n{body}}}\n")
    }

    /// Builds the table (replacing a leftover), then proves it: a probe in
    /// a fresh keyed leaf (or group) is dropped without a lease and admitted with one.
    /// `probe` is a keyraft binary (its hidden `fence-probe` command). On
    /// any failure the table is removed again.
    pub fn install(&self, probe: &Path) -> Result<(), KernelError> {
        let r = self.install_inner(probe);
        if r.is_err() {
            let _ = self.remove();
        }
        r
    }

    fn install_inner(&self, probe: &Path) -> Result<(), KernelError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => KernelError::Unavailable(
                    "the nft command is not installed (Debian: apt install nftables)".into(),
                ),
                _ => KernelError::Install(format!("cannot run nft: {e}")),
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.script().as_bytes())
                .map_err(|e| KernelError::Install(format!("cannot feed nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| KernelError::Install(format!("nft: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            return Err(if first.contains("Operation not permitted") {
                KernelError::Unavailable("nftables needs root or CAP_NET_ADMIN".into())
            } else {
                KernelError::Install(first.trim().to_string())
            });
        }
        let mut nl = Netlink::open()?;
        // Every keyed leaf there is stays dropped: the orphans of a
        // validator killed before this start are in one of them.
        if let Some(leaves) = match &self.matches {
            Match::Cgroup { tree, .. } => tree.leaves(),
            Match::User { .. } => None,
        } {
            for id in leaves.keyed_ids().map_err(KernelError::NoLeaf)? {
                nl.add(&self.table, KEYED, &Key::Cgroup(id).bytes())?;
            }
        }
        let (key, keyed) = self.fresh_key(&mut nl, PROBE_GENERATION)?;
        if self.probe(probe, &keyed)? {
            return Err(KernelError::Probe(match &self.matches {
                Match::Cgroup { level, .. } => format!(
                    "a packet from the validator's cgroup passed without a lease (level {level}; a cgroup namespace?)"
                ),
                Match::User { .. } => "a packet of the keyed validator's user and group passed without a lease".into(),
            }));
        }
        nl.put_only(&self.table, LEASE, &key.bytes(), Some(5_000))?;
        let passed = self.probe(probe, &keyed);
        nl.flush(&self.table, LEASE)?;
        if !passed? {
            return Err(KernelError::Probe(
                "a packet of the keyed validator was dropped with a lease".into(),
            ));
        }
        Ok(())
    }

    /// Runs the probe as a keyed validator would run (in a keyed leaf, or
    /// as the validator's user in a keyed group): whether its packet was
    /// sent.
    fn probe(&self, probe: &Path, keyed: &Keyed) -> Result<bool, KernelError> {
        let mut cmd = Command::new(probe);
        cmd.arg("fence-probe")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match (keyed, &self.matches) {
            (Keyed::Cgroup(procs), _) => {
                let fd = procs.as_raw_fd();
                // SAFETY: only write(2) between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            (Keyed::Group(gid), Match::User { uid, .. }) => {
                // std clears the supplementary groups when root changes uid.
                cmd.uid(*uid).gid(*gid);
            }
            (Keyed::Group(_), Match::Cgroup { .. }) => {
                return Err(KernelError::Probe(
                    "a keyed group where the fence matches by cgroup".into(),
                ))
            }
        }
        let status = cmd
            .status()
            .map_err(|e| KernelError::Probe(format!("cannot run {}: {e}", probe.display())))?;
        match status.code() {
            Some(0) => Ok(true),
            Some(c) if c == i32::from(PROBE_DROPPED) => Ok(false),
            other => Err(KernelError::Probe(format!("the probe failed ({other:?})"))),
        }
    }

    /// Whether the table, its rules and its `keyed` elements are in place.
    pub fn check(&self, nl: &mut Netlink) -> Result<(), KernelError> {
        let missing = || KernelError::Missing(self.table.clone());
        let (rules, keyed) = match self.matches {
            Match::Cgroup { .. } => (1, 1..=usize::MAX),
            Match::User { .. } => (4, GENERATIONS as usize..=GENERATIONS as usize),
        };
        match nl.count_rules(&self.table, CHAIN) {
            Ok(n) if n == rules => {}
            Ok(_) | Err(NftError::Refused { .. }) => return Err(missing()),
            Err(e) => return Err(e.into()),
        }
        match nl.count_elements(&self.table, KEYED) {
            Ok(n) if keyed.contains(&n) => Ok(()),
            Ok(_) | Err(NftError::Refused { .. }) => Err(missing()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the table (nothing to do if it is gone).
    pub fn remove(&self) -> Result<(), KernelError> {
        match Netlink::open()?.delete_table(&self.table) {
            Err(NftError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => Ok(r?),
        }
    }
}

/// The file in the data dir that names the kernel fence's table while it
/// is installed, for tools that clean up after a killed keyraft.
pub const TABLE_FILE: &str = "kernel-fence";

/// What the kernel fence is on this host.
#[derive(Debug, Clone)]
pub enum Status {
    On(Plan),
    /// Off, and why (for the start log, `status` and the metric).
    Off(String),
}

impl Status {
    pub fn plan(&self) -> Option<&Plan> {
        match self {
            Status::On(p) => Some(p),
            Status::Off(_) => None,
        }
    }
}

/// Sets the kernel fence up for `tree` as `mode` asks: `auto` turns it off
/// (saying why) where the host does not allow it, `required` fails.
/// `probe` is a keyraft binary for the self-test.
pub fn set_up(
    mode: KernelFence,
    activate_by: ActivateBy,
    tree: &Tree,
    user: Option<&ValidatorUser>,
    probe: &Path,
) -> Result<Status, KernelError> {
    if mode == KernelFence::Off {
        return Ok(Status::Off("--kernel-fence off".into()));
    }
    let r = if activate_by == ActivateBy::Sighup {
        Err(KernelError::Unavailable(
            "--activate-by sighup keeps the keyless node's connections when the key arrives".into(),
        ))
    } else {
        Plan::for_tree(tree, user).and_then(|plan| plan.install(probe).map(|()| plan))
    };
    match (r, mode) {
        (Ok(plan), _) => Ok(Status::On(plan)),
        (Err(e), KernelFence::Required) => Err(e),
        (Err(e), _) => Ok(Status::Off(e.to_string())),
    }
}

/// What `keyraft check --config` can tell without changing anything:
/// whether `set_up` would find what it needs on this host (it still proves
/// the table with its probe at start).
pub fn preflight(activate_by: ActivateBy, cgroup: bool, user: bool) -> Result<(), KernelError> {
    let unavailable = |why: &str| Err(KernelError::Unavailable(why.into()));
    if activate_by == ActivateBy::Sighup {
        return unavailable(
            "--activate-by sighup keeps the keyless node's connections when the key arrives",
        );
    }
    if !user && (!cgroup || !super::tree::cgroup_available()) {
        return unavailable(
            "no writable cgroup v2 for the validator here, and no --validator-user",
        );
    }
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return unavailable("the nft command is not installed (Debian: apt install nftables)"),
    }
    match Netlink::open().and_then(|mut nl| nl.count_rules("keyraft_preflight", CHAIN)) {
        Err(NftError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            unavailable("nftables needs root or CAP_NET_ADMIN")
        }
        Err(e) if !matches!(e, NftError::Refused { .. }) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The guard's end: renews and clears the lease element.
pub struct KernelLease {
    nl: Netlink,
    plan: Plan,
    /// This activation's key, from a keyed start's [`Self::rekey`] until
    /// the lease is cleared: a lease armed before the next keyed start
    /// admits nothing, least of all the last activation's orphans.
    key: Option<Key>,
    /// Where the last keyed group's generation is kept (user mode).
    generation_file: PathBuf,
    /// The last generation used by this guard.
    generation: Option<u32>,
}

impl KernelLease {
    /// The lease end of `plan`, for the tree run from `data_dir`.
    pub fn open(plan: Plan, data_dir: &Path) -> Result<KernelLease, KernelError> {
        Ok(KernelLease {
            nl: Netlink::open()?,
            plan,
            key: None,
            generation_file: data_dir.join(GENERATION_FILE),
            generation: None,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Before a keyed start (the tree's last validator dead): a fresh key,
    /// held in the `keyed` set, and the lease moved to it with the guard's
    /// time left `left`. The lease no longer admits the last activation's
    /// key, so the orphaned sockets of a validator killed at a handover
    /// stay dropped when the key comes back here. Returns where the
    /// validator runs with it.
    pub fn rekey(&mut self, left: impl FnMut() -> Duration) -> Result<Keyed, KernelError> {
        self.clear()?;
        let generation = self.next_generation()?;
        let (key, keyed) = self.plan.fresh_key(&mut self.nl, generation)?;
        self.key = Some(key);
        self.renew(left)?;
        Ok(keyed)
    }

    /// The next keyed group's generation (user mode), recorded (fsync'd)
    /// before it is used: a start that cannot record it does not start,
    /// or the next might reuse it. With no record (a first start, a wiped
    /// data dir) it starts from the clock.
    fn next_generation(&mut self) -> Result<u32, KernelError> {
        if !matches!(self.plan.matches, Match::User { .. }) {
            return Ok(0);
        }
        let last = self
            .generation
            .or_else(|| {
                std::fs::read_to_string(&self.generation_file)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok())
            })
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            });
        let next = last.wrapping_add(1) % PROBE_GENERATION;
        crate::durable::write(&self.generation_file, format!("{next}\n").as_bytes(), 0o600)
            .map_err(|source| KernelError::Generation {
                path: self.generation_file.display().to_string(),
                source,
            })?;
        self.generation = Some(next);
        Ok(next)
    }

    /// The kernel's lease now ends `MARGIN` before the guard's, whose time
    /// left `left` measures (or at once, where it has run out).
    ///
    /// The element's timeout counts from when the kernel takes it, so a
    /// freeze between measuring and writing would give a thawed tree the
    /// whole measured time again. `left` is measured once more after each
    /// write; where more than the margin went by, the element is written
    /// again at once with what is left then (a slow netlink commit on a
    /// busy host is no reason to fence), and after [`RENEW_TRIES`] late
    /// writes it is taken back ([`KernelError::Stalled`]): the guard's own
    /// lease, never extended, runs out as it would have.
    /// Before the first keyed start there is no key, and nothing to renew.
    pub fn renew(&mut self, mut left: impl FnMut() -> Duration) -> Result<(), KernelError> {
        let Some(key) = self.key.map(Key::bytes) else {
            return Ok(());
        };
        let mut before = left();
        for _ in 0..RENEW_TRIES {
            let ms = before.saturating_sub(MARGIN).as_millis() as u64;
            if ms == 0 {
                return self.clear();
            }
            self.nl.put_only(&self.plan.table, LEASE, &key, Some(ms))?;
            let now = left();
            if before.saturating_sub(now) <= MARGIN {
                return Ok(());
            }
            before = now;
        }
        self.clear()?;
        Err(KernelError::Stalled(RENEW_TRIES))
    }

    /// No lease in the kernel, verified; no key until the next keyed
    /// start's [`Self::rekey`].
    pub fn clear(&mut self) -> Result<(), KernelError> {
        self.key = None;
        self.nl.flush(&self.plan.table, LEASE)?;
        match self.nl.count_elements(&self.plan.table, LEASE)? {
            0 => Ok(()),
            n => Err(KernelError::Install(format!(
                "{n} lease elements left after a flush"
            ))),
        }
    }

    /// Ready for a keyed start: the table is whole and this activation's
    /// lease lives.
    pub fn ready(&mut self) -> Result<(), KernelError> {
        self.plan.check(&mut self.nl)?;
        if self.key.is_none() {
            return Err(KernelError::NoKey);
        }
        match self.nl.count_elements(&self.plan.table, LEASE)? {
            1 => Ok(()),
            _ => Err(KernelError::Unavailable(
                "no lease in the kernel fence".into(),
            )),
        }
    }
}

/// `keyraft fence-probe`: one UDP datagram to the discard port on
/// loopback. Exits 0 if it was sent, [`PROBE_DROPPED`] if the kernel
/// dropped it (EPERM), 1 on any other failure.
pub fn probe_main() -> u8 {
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 1;
    };
    match sock.send_to(b"keyraft kernel fence probe", "127.0.0.1:9") {
        Ok(_) => 0,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => PROBE_DROPPED,
        Err(_) => 1,
    }
}
