//! The oracle: what must never happen, checked at every step that could
//! make it happen.
//!
//! - Validator mode: no height is signed by two hosts' validators (the
//!   chain's judge), and at the instant a host's key becomes usable
//!   (started with the key, thawed, or its kernel lease renewed after it
//!   lapsed) no other host's key is usable: any two usable intervals that
//!   overlap would overlap at the later one's start.
//! - Signer mode: at most one distinct sign-bytes per (chain, height,
//!   round, step) ever leaves the cluster (its timestamp included), and every signature is of an
//!   HRS and bytes Raft committed, or of an HRS a committed `SignAhead`
//!   reserved (so never below the committed watermark with other bytes);
//!   every signed reply a sentry gets verifies with the key.
//! - Both modes: every node applies the same entry at each log index
//!   (Raft's state machine safety, which the rest rests on).
//! - Liveness, checked by the world at the end: with the faults healed
//!   and a quorum up, someone signs within the bound.
//!
//! Owns: the records and the verdict. Must not: influence the run.

use std::collections::{BTreeMap, BTreeSet};

use keyraft::signer::Hrs;

use crate::types::NodeId;

#[derive(Debug, Default)]
pub struct Oracle {
    /// Validator mode: who signed each height.
    heights: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Signer mode: the bytes (digest) and timestamp signed at each HRS.
    signed: BTreeMap<Hrs, (String, (i64, i32))>,
    /// Signer mode: what Raft committed at each HRS.
    committed: BTreeMap<Hrs, String>,
    /// Signer mode: the HRS a committed `SignAhead` reserved, each range
    /// from after the HRS it signed to the last reserved, by its end.
    reserved: BTreeMap<Hrs, Hrs>,
    /// Every applied log entry (term and command) by index, as the first
    /// node applied it: any node applying another there breaks Raft.
    applied: BTreeMap<u64, (u64, String)>,
    pub violations: Vec<String>,
    pub signatures: u64,
}

impl Oracle {
    pub fn height_signed(&mut self, host: NodeId, height: u64, at_ms: u64) {
        self.signatures += 1;
        let by = self.heights.entry(height).or_default();
        by.insert(host);
        if by.len() == 2 {
            self.violations.push(format!(
                "double sign at {at_ms} ms: height {height} signed by nodes {by:?}"
            ));
        }
    }

    /// A process started on `host`'s disk holds entries up to `holds` but
    /// its predecessors acknowledged entries up to `acked` as durable.
    pub fn lost(&mut self, host: NodeId, acked: u64, holds: u64, at_ms: u64) {
        self.violations.push(format!(
            "{at_ms} ms: node {host} restarted holding entries up to {holds}, but acknowledged up to {acked} as durable"
        ));
    }

    /// The store on `host`'s disk cannot be opened: its key never signs
    /// there again.
    pub fn unopenable(&mut self, host: NodeId, why: &str, at_ms: u64) {
        self.violations.push(format!(
            "{at_ms} ms: node {host}'s Raft store cannot be opened: {why}"
        ));
    }

    pub fn overlap(&mut self, host: NodeId, other: NodeId, at_ms: u64) {
        self.violations.push(format!(
            "overlapping keys at {at_ms} ms: node {host}'s key became usable while node {other}'s was"
        ));
    }

    /// A node applied the entry at `index`: the same entry as every node
    /// that applied that index before it.
    pub fn applied(&mut self, index: u64, term: u64, what: &str, at_ms: u64) {
        match self.applied.get(&index) {
            None => {
                self.applied.insert(index, (term, what.to_string()));
            }
            Some((t, w)) if *t == term && w == what => {}
            Some((t, w)) => self.violations.push(format!(
                "two committed logs at {at_ms} ms: index {index} applied as term {term} {what}, and elsewhere as term {t} {w}"
            )),
        }
    }

    pub fn committed(&mut self, hrs: Hrs, digest: &str) {
        self.committed
            .entry(hrs)
            .or_insert_with(|| digest.to_string());
    }

    /// A committed `SignAhead` signed `after` and reserved up to `through`.
    pub fn reserved(&mut self, after: Hrs, through: Hrs) {
        if through > after {
            let start = self.reserved.entry(through).or_insert(after);
            *start = (*start).min(after);
        }
    }

    /// Whether a committed reservation covers `hrs`.
    fn is_reserved(&self, hrs: Hrs) -> bool {
        self.reserved.range(hrs..).any(|(_, after)| *after < hrs)
    }

    pub fn signature(
        &mut self,
        node: NodeId,
        hrs: Hrs,
        digest: &str,
        timestamp: (i64, i32),
        at_ms: u64,
    ) {
        self.signatures += 1;
        match self.signed.get(&hrs) {
            Some((d, _)) if d != digest => self.violations.push(format!(
                "equivocation at {at_ms} ms: node {node} signed {hrs:?} as {digest}, already signed as {d}"
            )),
            // The same bytes at another time: a second signature of one
            // HRS (CometBFT's own signer gives the first timestamp again).
            Some((_, t)) if *t != timestamp => self.violations.push(format!(
                "two signatures at {at_ms} ms: node {node} signed {hrs:?} at {timestamp:?}, already signed at {t:?}"
            )),
            Some(_) => {}
            None => {
                self.signed.insert(hrs, (digest.to_string(), timestamp));
            }
        }
        if self.committed.get(&hrs).map(String::as_str) != Some(digest) && !self.is_reserved(hrs) {
            self.violations.push(format!(
                "signature without a commit at {at_ms} ms: node {node} signed {hrs:?} as {digest}, neither committed nor reserved"
            ));
        }
    }

    /// A signed reply left the cluster that is no signature of the key.
    pub fn bad_signature(&mut self, node: NodeId, why: &str, at_ms: u64) {
        self.violations.push(format!(
            "bad signature at {at_ms} ms: node {node} answered its sentry with {why}"
        ));
    }

    /// Heights from `from` on that nobody signed.
    pub fn missed(&self, from: u64, to: u64) -> u64 {
        (from..=to)
            .filter(|h| !self.heights.contains_key(h))
            .count() as u64
    }

    pub fn last_signed_height(&self) -> Option<u64> {
        self.heights.keys().next_back().copied()
    }

    pub fn signer_count(&self) -> usize {
        self.signed.len()
    }
}
