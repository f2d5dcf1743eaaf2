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
//! set keyed { type cgroupsv2; }                  the tree's `keyed` leaf cgroup
//! set lease { type cgroupsv2; flags timeout; }   the same id, while the lease lives
//! chain out { type filter hook output priority filter; policy accept;
//!   socket cgroupv2 level L @keyed socket cgroupv2 level L != @lease counter drop }
//! ```
//!
//! Only a validator started with the key runs in the `keyed` leaf, so the
//! keyless standby syncs freely, and the sockets of a killed keyed
//! validator (TCP keeps retransmitting for an orphan) stay held back.
//! Where there is no cgroup v2 to match (a Docker container), the match is
//! the validator's user ([`Match::User`]): the keyed validator runs with a
//! group of its own, its packets mark their connections, and marked
//! connections pass only while the lease lives:
//!
//! ```text
//! set keyed { type gid; }                        the keyed validator's group G
//! set lease { type mark; flags timeout; }        the mark G, while the lease lives
//! chain out { ...
//!   meta skgid @keyed ct mark set G
//!   meta skgid @keyed ct state invalid,untracked counter drop
//!   meta l4proto udp ct direction original meta skgid != @keyed ct mark G ct mark set 0
//!   ct mark G ct mark != @lease counter drop }
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
use std::os::unix::fs::MetadataExt;
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
    #[error("the validator's keyed cgroup was made again (id {now}, the kernel fence holds {fenced}), so the fence would not hold it: restart keyraft to set the fence up anew")]
    Replaced { fenced: u64, now: u64 },
    #[error(
        "the validator's keyed cgroup cannot be joined, so the kernel fence would not hold it"
    )]
    NoLeaf,
}

/// What the kernel fence tells the keyed validator's packets by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Its socket's cgroup: the tree's `keyed` leaf (cgroup v2).
    Cgroup {
        /// The leaf's directory.
        keyed: PathBuf,
        /// Its depth below the cgroup v2 root.
        level: u32,
        /// Its cgroup id (the directory's inode), the sets' element.
        id: u64,
    },
    /// Without a cgroup v2 (in a container): the validator runs as
    /// `--validator-user`, and while keyed with [`Match::User::keyed_gid`]
    /// as its group, a group of its own that the keyless standby never has.
    /// Its packets mark their connection (conntrack), so the sockets of a
    /// killed keyed validator, which no longer have an owner to match,
    /// stay held back too.
    User {
        uid: u32,
        /// The keyed validator's primary group, and the connection mark.
        keyed_gid: u32,
    },
}

/// One data dir's kernel fence: its table and what it holds back.
#[derive(Debug, Clone)]
pub struct Plan {
    pub table: String,
    pub matches: Match,
}

/// The keyed group (and connection mark) of a tree in user mode: `KR` in
/// the top bytes, then 16 bits of the table's name, far above the ids
/// systems hand out.
fn keyed_gid(table: &str) -> u32 {
    let h = table
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    0x4b52_0000 | (h & 0xffff)
}

impl Plan {
    /// The plan for `tree`: by its `keyed` cgroup where there is one, else
    /// by the validator's user, if it runs as one.
    pub fn for_tree(tree: &Tree, user: Option<&ValidatorUser>) -> Result<Plan, KernelError> {
        let table = tree.name();
        let matches = match (tree.keyed_cgroup(), user) {
            (Some((keyed, level)), _) => {
                let id = std::fs::metadata(&keyed)
                    .map_err(|e| KernelError::Unavailable(format!("{}: {e}", keyed.display())))?
                    .ino();
                Match::Cgroup { keyed, level, id }
            }
            (None, Some(u)) => Match::User {
                uid: u.uid,
                keyed_gid: keyed_gid(&table),
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

    /// The `keyed` set's element.
    fn keyed_key(&self) -> Vec<u8> {
        match &self.matches {
            Match::Cgroup { id, .. } => id.to_ne_bytes().to_vec(),
            Match::User { keyed_gid, .. } => keyed_gid.to_ne_bytes().to_vec(),
        }
    }

    /// The `lease` set's element.
    fn lease_key(&self) -> Vec<u8> {
        // The same value in both modes: the cgroup id, or the mark (= gid).
        self.keyed_key()
    }

    /// The `keyed` leaf's cgroup id the table holds, in cgroup mode.
    pub fn keyed_cgroup_id(&self) -> Option<u64> {
        match self.matches {
            Match::Cgroup { id, .. } => Some(id),
            Match::User { .. } => None,
        }
    }

    /// The same plan, holding `id` (where given) as the keyed leaf's cgroup
    /// id: the one the coordinator installed in the table, whatever the
    /// leaf's id is by the time the guard starts.
    pub fn holding_cgroup_id(mut self, id: Option<u64>) -> Plan {
        if let (Match::Cgroup { id: held, .. }, Some(id)) = (&mut self.matches, id) {
            *held = id;
        }
        self
    }

    /// Where the fence matches by cgroup, whether the keyed leaf a
    /// validator would join now (its id, `joining`, `None` where it cannot
    /// be opened) is the one the table holds: a leaf removed (a cleanup
    /// tool) and made again has another id, which no rule drops.
    pub fn holds_leaf(&self, joining: Option<u64>) -> Result<(), KernelError> {
        let Some(fenced) = self.keyed_cgroup_id() else {
            return Ok(()); // matched by user
        };
        match joining {
            None => Err(KernelError::NoLeaf),
            Some(now) if now != fenced => Err(KernelError::Replaced { fenced, now }),
            Some(_) => Ok(()),
        }
    }

    /// The group a keyed validator runs with, in user mode.
    pub fn keyed_gid(&self) -> Option<u32> {
        match self.matches {
            Match::User { keyed_gid, .. } => Some(keyed_gid),
            Match::Cgroup { .. } => None,
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
            Match::User { keyed_gid, .. } => format!(
                "\tset {KEYED} {{ type gid; }}\n\
                 \tset {LEASE} {{ type mark; flags timeout; }}\n\
                 \tchain {CHAIN} {{\n\
                 \t\ttype filter hook output priority filter; policy accept;\n\
                 \t\tmeta skgid @{KEYED} ct mark set {keyed_gid:#x}\n\
                 \t\tmeta skgid @{KEYED} ct state invalid,untracked counter drop\n\
                 \t\tmeta l4proto udp ct direction original meta skgid != @{KEYED} ct mark {keyed_gid:#x} ct mark set 0\n\
                 \t\tct mark {keyed_gid:#x} ct mark != @{LEASE} counter drop\n\
                 \t}}\n"
            ),
        };
        format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n{body}}}\n")
    }

    /// Builds the table (replacing a leftover), then proves it: a probe in
    /// the `keyed` cgroup is dropped without a lease and admitted with one.
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
        nl.put_only(&self.table, KEYED, &self.keyed_key(), None)?;
        if self.probe(probe)? {
            return Err(KernelError::Probe(match &self.matches {
                Match::Cgroup { keyed, level, .. } => format!(
                    "a packet from the validator's cgroup passed without a lease (level {level} of {}; a cgroup namespace?)",
                    keyed.display()
                ),
                Match::User { .. } => "a packet of the keyed validator's user and group passed without a lease".into(),
            }));
        }
        nl.put_only(&self.table, LEASE, &self.lease_key(), Some(5_000))?;
        let passed = self.probe(probe);
        nl.flush(&self.table, LEASE)?;
        if !passed? {
            return Err(KernelError::Probe(
                "a packet of the keyed validator was dropped with a lease".into(),
            ));
        }
        Ok(())
    }

    /// Runs the probe as a keyed validator would run (in the `keyed`
    /// cgroup, or as the validator's user in the keyed group): whether its
    /// packet was sent.
    fn probe(&self, probe: &Path) -> Result<bool, KernelError> {
        let mut cmd = Command::new(probe);
        cmd.arg("fence-probe")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Held open until the probe has started.
        let _procs = match &self.matches {
            Match::Cgroup { keyed, .. } => {
                let procs = std::fs::File::options()
                    .write(true)
                    .open(keyed.join("cgroup.procs"))
                    .map_err(|e| KernelError::Probe(format!("{}: {e}", keyed.display())))?;
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
                Some(procs)
            }
            Match::User { uid, keyed_gid } => {
                // std clears the supplementary groups when root changes uid.
                cmd.uid(*uid).gid(*keyed_gid);
                None
            }
        };
        let status = cmd
            .status()
            .map_err(|e| KernelError::Probe(format!("cannot run {}: {e}", probe.display())))?;
        match status.code() {
            Some(0) => Ok(true),
            Some(c) if c == i32::from(PROBE_DROPPED) => Ok(false),
            other => Err(KernelError::Probe(format!("the probe failed ({other:?})"))),
        }
    }

    /// Whether the table, its rule and the `keyed` element are in place.
    pub fn check(&self, nl: &mut Netlink) -> Result<(), KernelError> {
        let missing = || KernelError::Missing(self.table.clone());
        let rules = match self.matches {
            Match::Cgroup { .. } => 1,
            Match::User { .. } => 4,
        };
        match nl.count_rules(&self.table, CHAIN) {
            Ok(n) if n == rules => {}
            Ok(_) | Err(NftError::Refused { .. }) => return Err(missing()),
            Err(e) => return Err(e.into()),
        }
        match nl.count_elements(&self.table, KEYED) {
            Ok(1) => Ok(()),
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

    /// `on`, or `off: why`.
    pub fn describe(&self) -> String {
        match self {
            Status::On(_) => "on".into(),
            Status::Off(why) => format!("off: {why}"),
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
pub fn preflight(activate_by: ActivateBy, cgroup: bool, user: bool) -> Result<(), String> {
    if activate_by == ActivateBy::Sighup {
        return Err(
            "--activate-by sighup keeps the keyless node's connections when the key arrives".into(),
        );
    }
    if !user && (!cgroup || !super::tree::cgroup_available()) {
        return Err("no writable cgroup v2 for the validator here, and no --validator-user".into());
    }
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Err("the nft command is not installed (Debian: apt install nftables)".into()),
    }
    match Netlink::open().and_then(|mut nl| nl.count_rules("keyraft_preflight", CHAIN)) {
        Err(NftError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            Err("nftables needs root or CAP_NET_ADMIN".into())
        }
        Err(e) if !matches!(e, NftError::Refused { .. }) => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// The guard's end: renews and clears the lease element.
pub struct KernelLease {
    nl: Netlink,
    plan: Plan,
}

impl KernelLease {
    pub fn open(plan: Plan) -> Result<KernelLease, KernelError> {
        Ok(KernelLease {
            nl: Netlink::open()?,
            plan,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
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
    pub fn renew(&mut self, mut left: impl FnMut() -> Duration) -> Result<(), KernelError> {
        let key = self.plan.lease_key();
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

    /// No lease in the kernel, verified.
    pub fn clear(&mut self) -> Result<(), KernelError> {
        self.nl.flush(&self.plan.table, LEASE)?;
        match self.nl.count_elements(&self.plan.table, LEASE)? {
            0 => Ok(()),
            n => Err(KernelError::Install(format!(
                "{n} lease elements left after a flush"
            ))),
        }
    }

    /// Ready for a keyed start: the table is whole and a lease lives.
    pub fn ready(&mut self) -> Result<(), KernelError> {
        self.plan.check(&mut self.nl)?;
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
