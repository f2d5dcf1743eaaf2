//! Faults a local cluster can suffer, as a host would: a host or one of
//! its processes killed or frozen, the validator crashed, a node cut off
//! from its peers (blackholed, not refused) and healed, slow peer links.
//!
//! Owns: the fault injection on a [`Cluster`] (its processes through
//! signals, its links through the fault proxies), and the last fault of
//! all: every host dying when the cluster is dropped. Must not: judge; the
//! chain counts double signs and missed heights.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, Result};
use nix::sys::signal::Signal;

use crate::cluster::{Cluster, FENCE_MARKER};
use crate::harness::{alive, processes};
use crate::proxy::Latency;

impl Cluster {
    /// SIGKILL of coordinator `id` only (its guard and validator are left
    /// to fend for themselves, as after a crash).
    pub fn kill_coordinator(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        if let Some(p) = &node.proc {
            p.signal(Signal::SIGKILL)?;
        }
        Ok(())
    }

    /// A whole host dies: SIGKILL of the coordinator's process group, of
    /// its guard (in a session of its own), of the validator's group, and
    /// of every process of its tree.
    pub fn kill_host(&mut self, id: u64) -> Result<()> {
        let validator = self.validator_pid(id);
        let tree = self.tree_pids(id);
        if let Some(guard) = self.guard_pid(id) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard), Signal::SIGKILL);
        }
        for e in &mut self.node_mut(id)?.extra {
            // Dropping a Proc kills its process group.
            e.proc = None;
        }
        for other in &mut self.others {
            if let Some(e) = other.sentries.get_mut(&id) {
                e.proc = None;
            }
        }
        if let Some(p) = self.forget(id)? {
            let _ = p.signal_group(Signal::SIGKILL);
        }
        if let Some(v) = validator {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-v), Signal::SIGKILL);
        }
        for p in tree {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
        }
        Ok(())
    }

    /// The pid of coordinator `id`'s guard process.
    pub fn guard_pid(&self, id: u64) -> Option<i32> {
        let coordinator = self.nodes[&id].proc.as_ref()?.pid();
        processes().into_iter().find_map(|(pid, ppid)| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let is_guard = cmdline.split(|b| *b == 0).nth(1) == Some(b"guard".as_slice());
            (ppid == coordinator && is_guard).then_some(pid)
        })
    }

    /// Every live process of node `id`'s validator tree, wherever it went:
    /// those that carry its fence marker, and those whose command line names
    /// its home (the judge's own way to see a node that dropped the marker).
    pub fn tree_pids(&self, id: u64) -> Vec<i32> {
        let data = &self.nodes[&id].data;
        let dir = data.canonicalize().unwrap_or_else(|_| data.clone());
        let needle = format!("{FENCE_MARKER}={}", dir.display());
        let home = self.nodes[&id].home.display().to_string();
        processes()
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|pid| alive(*pid))
            .filter(|pid| {
                let marked = std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == needle.as_bytes()));
                // Not the coordinator, whose own command line names the home.
                let named = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let argv: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                    let keyraft = argv.first().is_some_and(|a| {
                        Path::new(std::ffi::OsStr::from_bytes(a)).ends_with("keyraft")
                    });
                    !keyraft && argv.contains(&home.as_bytes())
                });
                marked || named
            })
            .collect()
    }

    /// SIGKILL of node `id`'s validator only (a crash).
    pub fn kill_validator(&self, id: u64) -> Result<()> {
        let pid = self
            .validator_pid(id)
            .ok_or_else(|| anyhow!("node {id} has no validator running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
        Ok(())
    }

    /// SIGSTOP (`stop`) or SIGCONT of coordinator `id`, or with `host` of its
    /// whole host: coordinator, guard and validator. On resume the validator
    /// and the guard are continued together, as when a VM thaws.
    pub fn freeze(&self, id: u64, host: bool, stop: bool) -> Result<()> {
        let sig = if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let proc = self.proc(id)?;
        if !host {
            return proc.signal(sig);
        }
        // Every pid first (the scan takes milliseconds), then the signals
        // back to back, so that no process of the host gets a head start.
        let validator = self.validator_pid(id);
        let mut tree = self.tree_pids(id);
        // The guard runs in a session of its own, outside the coordinator's group.
        tree.extend(self.guard_pid(id));
        if let Some(v) = validator {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-v), sig);
        }
        for p in tree {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
        }
        let others = self.others.iter().filter_map(|o| o.sentries.get(&id));
        for e in self.nodes[&id]
            .extra
            .iter()
            .chain(others)
            .filter_map(|e| e.proc.as_ref())
        {
            let _ = e.signal_group(sig);
        }
        proc.signal_group(sig)
    }

    pub fn signal(&self, id: u64, sig: Signal) -> Result<()> {
        self.proc(id)?.signal(sig)
    }

    /// Cuts every link to and from node `id` (blackhole).
    pub fn isolate(&self, id: u64) {
        for (&(from, to), p) in &self.proxies {
            if from == id || to == id {
                p.cut();
            }
        }
    }

    /// Cuts the link between nodes `x` and `y`, both ways.
    pub fn cut_link(&self, x: u64, y: u64) {
        for link in [(x, y), (y, x)] {
            if let Some(p) = self.proxies.get(&link) {
                p.cut();
            }
        }
    }

    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// Delays every peer link, both directions (see [`Latency`]).
    pub fn set_latency(&self, latency: Latency) {
        for p in self.proxies.values() {
            p.set_latency(latency);
        }
    }
}

impl Drop for Cluster {
    /// Every host dies: coordinators and guards first (their process
    /// groups), then whatever of each validator's tree outlived them (a
    /// daemonized node whose guard died with its coordinator has nobody
    /// left to kill it; on a real host systemd or Docker would).
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for &id in &ids {
            let tree = self.tree_pids(id);
            if let Some(n) = self.nodes.get_mut(&id) {
                drop(n.proc.take());
            }
            for p in tree.into_iter().chain(self.tree_pids(id)) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            }
            // The tree's cgroup (its leaves first) and the kernel fence's
            // nftables table, which keyraft names in its data dir.
            let data = &self.nodes[&id].data;
            if let Ok(cg) = std::fs::read_to_string(data.join("cgroup")) {
                let cg = Path::new(cg.trim());
                for _ in 0..100 {
                    for leaf in ["keyed", "standby"] {
                        let _ = std::fs::remove_dir(cg.join(leaf));
                    }
                    if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            if let Ok(table) = std::fs::read_to_string(data.join("kernel-fence")) {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", "inet", table.trim()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}
