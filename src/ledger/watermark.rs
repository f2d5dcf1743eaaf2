//! Signer mode's part of the ledger: each chain's watermark
//! ([`SignerState`]), its rule ([`SignerState::check_by`]), the
//! reservations of sign-ahead, imported floors, and the watermarks' stored
//! shape.
//!
//! Owns: what a `Signed`, `SignAhead` or floor command does to a chain's
//! watermark, as pure functions with table tests. Must not: import any
//! other module of this crate, or do I/O (as the rest of the ledger).

use serde::{Deserialize, Serialize};

use super::{ClusterState, Reply};

/// Where a (height, round, step) stands against the watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignVerdict {
    /// Sign, with this timestamp (the one committed first for this HRS).
    Sign { timestamp: (i64, i32) },
    /// Below the watermark.
    Regression,
    /// The watermark's HRS with other sign bytes (or an imported floor).
    Conflict,
    /// Reserved by another signing process (a leader before this one): it
    /// may have signed it, with bytes nobody else knows.
    Reserved,
    /// A floor for a second chain as [`Command::SignerFloor`] (the leader
    /// sends [`Command::ChainFloor`] for it).
    WrongChain,
    /// No watermark yet: nothing is signed until an operator says where the
    /// key stands (`keyraft signer import-state FILE` or `--never-signed`).
    NoWatermark,
}

/// Signer mode's replicated watermark: the highest (height, round, step)
/// signed or reserved, and what was signed there. Steps are CometBFT's: 1
/// proposal, 2 prevote, 3 precommit.
///
/// While a leader's signing process holds a reservation (`holder`), the
/// watermark's HRS is the reservation's end and has no digest: a keyraft
/// from before reservations reads it as an imported floor and signs
/// nothing at or below it, which is safe. `last` then keeps the bytes last
/// committed below it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerState {
    pub chain_id: String,
    pub height: u64,
    pub round: u32,
    pub step: u8,
    /// `None` for an imported floor or a reservation: nothing at it may be
    /// signed (but by the holder).
    pub digest: Option<String>,
    pub timestamp: (i64, i32),
    /// Signatures committed, all time.
    pub signatures: u64,
    /// The signing process that reserved every HRS above `last` up to this
    /// one: only it may sign them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u64>,
    /// With a reservation: the last HRS signed, and its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<SignedAt>,
    /// With a reservation that starts above `last` (one into the next
    /// height starts at its first step, never covering the later rounds of
    /// the height signed): the HRS it starts after. What lies between is
    /// anyone's to commit and sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_from: Option<(u64, u32, u8)>,
}

/// Where a reservation up to `through`, made by a signature at `hrs`,
/// starts (exclusive): into the next height, at its first step.
fn reservation_start(hrs: (u64, u32, u8), through: (u64, u32, u8)) -> (u64, u32, u8) {
    if through.0 > hrs.0 {
        (through.0, 0, 0)
    } else {
        hrs
    }
}

/// An HRS signed with these bytes (digest) and timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAt {
    pub height: u64,
    pub round: u32,
    pub step: u8,
    pub digest: String,
    pub timestamp: (i64, i32),
}

impl SignedAt {
    pub fn hrs(&self) -> (u64, u32, u8) {
        (self.height, self.round, self.step)
    }
}

impl SignerState {
    /// The watermark: nothing at or below it is signed anew, but by the
    /// holder of a reservation.
    pub fn hrs(&self) -> (u64, u32, u8) {
        (self.height, self.round, self.step)
    }

    /// The last HRS signed with known bytes (none for an imported floor).
    pub fn signed(&self) -> Option<SignedAt> {
        match (&self.holder, &self.digest) {
            (Some(_), _) => self.last.clone(),
            (None, Some(d)) => Some(SignedAt {
                height: self.height,
                round: self.round,
                step: self.step,
                digest: d.clone(),
                timestamp: self.timestamp,
            }),
            (None, None) => None,
        }
    }

    /// Whether `hrs` lies in the reservation of signing process `holder`,
    /// above the last signature: its to sign before the commit.
    pub fn reserved_for(&self, hrs: (u64, u32, u8), holder: u64) -> bool {
        self.holder == Some(holder)
            && hrs <= self.hrs()
            && self.reserved_from.is_none_or(|from| hrs > from)
            && self.signed().is_none_or(|s| hrs > s.hrs())
    }

    /// What a request for `hrs` with `digest` would get, without committing,
    /// from a signing process that holds no reservation.
    pub fn check(&self, chain_id: &str, hrs: (u64, u32, u8), digest: &str) -> SignVerdict {
        self.check_by(chain_id, hrs, digest, None)
    }

    /// [`SignerState::check`] for the signing process `holder`: an HRS of its
    /// own reservation, above the last one signed, is its to sign.
    pub fn check_by(
        &self,
        chain_id: &str,
        hrs: (u64, u32, u8),
        digest: &str,
        holder: Option<u64>,
    ) -> SignVerdict {
        use std::cmp::Ordering::*;
        if self.chain_id != chain_id {
            return SignVerdict::WrongChain;
        }
        let signed = self.signed();
        if let Some(s) = signed.as_ref().filter(|s| s.hrs() == hrs) {
            return if s.digest == digest {
                SignVerdict::Sign {
                    timestamp: s.timestamp,
                }
            } else {
                SignVerdict::Conflict
            };
        }
        let above_signed = signed.as_ref().is_none_or(|s| hrs > s.hrs());
        let reserved = self.reserved_from.is_none_or(|from| hrs > from);
        match (hrs.cmp(&self.hrs()), self.holder) {
            (Greater, _) => SignVerdict::Sign { timestamp: (0, 0) },
            (_, Some(h)) if above_signed && reserved && holder == Some(h) => {
                SignVerdict::Sign { timestamp: (0, 0) }
            }
            (_, Some(_)) if above_signed && reserved => SignVerdict::Reserved,
            // Between the last signature and a reservation that starts
            // higher: a new HRS, to commit first.
            (_, Some(_)) if above_signed => SignVerdict::Sign { timestamp: (0, 0) },
            (Equal, None) => SignVerdict::Conflict,
            _ => SignVerdict::Regression,
        }
    }
}

impl ClusterState {
    /// Applies a signature of `hrs` with `digest` by the signing process
    /// `holder` (`None`: a keyraft from before reservations), reserving up to
    /// `through` for it. The verdict is [`SignerState::check_by`]'s, with the
    /// first timestamp committed for these bytes.
    pub(super) fn sign(
        &mut self,
        chain_id: &str,
        hrs: (u64, u32, u8),
        digest: &str,
        timestamp: (i64, i32),
        through: (u64, u32, u8),
        holder: Option<u64>,
    ) -> Reply {
        let Some(w) = self.watermarks.get(chain_id).cloned() else {
            return Reply {
                prior: None,
                sign: Some(SignVerdict::NoWatermark),
            };
        };
        let repeat = w.signed().is_some_and(|s| s.hrs() == hrs);
        let verdict = match w.check_by(chain_id, hrs, digest, holder) {
            // A new signature: its own time.
            SignVerdict::Sign { .. } if !repeat => SignVerdict::Sign { timestamp },
            v => v,
        };
        let is_sign = matches!(verdict, SignVerdict::Sign { .. });
        if is_sign && repeat {
            // Signed again: counted, nothing else changes.
            if let Some(w) = self.watermarks.get_mut(chain_id) {
                w.signatures += 1;
            }
        }
        if is_sign && !repeat {
            let signed = SignedAt {
                height: hrs.0,
                round: hrs.1,
                step: hrs.2,
                digest: digest.to_string(),
                timestamp,
            };
            let plain = SignerState {
                chain_id: chain_id.to_string(),
                digest: Some(signed.digest.clone()),
                timestamp,
                signatures: w.signatures + 1,
                height: hrs.0,
                round: hrs.1,
                step: hrs.2,
                ..Default::default()
            };
            let reserving = |from: (u64, u32, u8), through: (u64, u32, u8), holder| SignerState {
                chain_id: chain_id.to_string(),
                height: through.0,
                round: through.1,
                step: through.2,
                digest: None,
                timestamp: (0, 0),
                signatures: w.signatures + 1,
                holder,
                last: Some(signed.clone()),
                reserved_from: (from > hrs).then_some(from),
            };
            let next = match (w.holder, w.reserved_from) {
                // Below a reservation that starts higher (a later round
                // of the height it reserved into): that reservation
                // stands, and this signature reserves nothing, so the
                // rest of the height never becomes one process's alone.
                (Some(h), Some(from)) if hrs <= from => reserving(from, w.hrs(), Some(h)),
                // Inside this process's own reservation, which reaches
                // further than this one would: it stands above `hrs`.
                (Some(h), _) if Some(h) == holder && w.hrs() > through => {
                    reserving(hrs, w.hrs(), holder)
                }
                _ if through > hrs && holder.is_some() => {
                    reserving(reservation_start(hrs, through), through, holder)
                }
                _ => plain,
            };
            self.watermarks.insert(chain_id.to_string(), next);
        }
        Reply {
            prior: None,
            sign: Some(verdict),
        }
    }

    /// Lifts `chain_id`'s watermark to cover all of `height`; never lowers it.
    pub(super) fn raise_floor(&mut self, chain_id: &str, height: u64) {
        let mut floor = (height, u32::MAX, u8::MAX);
        let w = self.watermarks.get(chain_id);
        match w {
            // A reservation reaching past the floor still lets its holder
            // sign below it: it ends, and the floor covers its end.
            Some(w) if w.holder.is_some() => floor = floor.max(w.hrs()),
            Some(w) if w.hrs() >= floor => return,
            _ => {}
        }
        let signatures = w.map_or(0, |w| w.signatures);
        self.watermarks.insert(
            chain_id.to_string(),
            SignerState {
                chain_id: chain_id.to_string(),
                height: floor.0,
                round: floor.1,
                step: floor.2,
                digest: None,
                timestamp: (0, 0),
                signatures,
                ..Default::default()
            },
        );
    }
}

/// The watermarks' stored shape: nothing, one [`SignerState`] (the shape
/// every keyraft reads), or a map by chain id once there are two.
pub(super) mod one_or_many {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SignerState;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        One(SignerState),
        Many(BTreeMap<String, SignerState>),
    }

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, SignerState>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match m.len() {
            0 => s.serialize_none(),
            1 => m.values().next().serialize(s),
            _ => m.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, SignerState>, D::Error> {
        Ok(match Option::<Stored>::deserialize(d)? {
            None => BTreeMap::new(),
            Some(Stored::One(w)) => BTreeMap::from([(w.chain_id.clone(), w)]),
            Some(Stored::Many(m)) => m,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn never_signed() -> Command {
        Command::SignerFloor {
            chain_id: "c".into(),
            height: 0,
        }
    }

    fn signed(h: u64, r: u32, step: u8, digest: &str, ts: i64) -> Command {
        Command::Signed {
            chain_id: "c".into(),
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (ts, 0),
        }
    }

    #[test]
    fn the_watermark_signs_each_hrs_once_and_never_below() {
        let mut s = ClusterState::default();
        let verdict = |s: &mut ClusterState, c| s.apply(&c, 1).sign.unwrap();
        // Nothing is signed before an operator said where the key stands.
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 10)),
            SignVerdict::NoWatermark
        );
        s.apply(&never_signed(), 1);
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 10)),
            SignVerdict::Sign { timestamp: (10, 0) }
        );
        // The same HRS and bytes, later timestamp: the first timestamp again.
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "a", 11)),
            SignVerdict::Sign { timestamp: (10, 0) }
        );
        assert_eq!(
            verdict(&mut s, signed(5, 0, 2, "b", 12)),
            SignVerdict::Conflict
        );
        assert_eq!(
            verdict(&mut s, signed(5, 0, 1, "a", 12)),
            SignVerdict::Regression
        );
        assert_eq!(
            verdict(&mut s, signed(4, 9, 3, "a", 12)),
            SignVerdict::Regression
        );
        assert_eq!(
            verdict(&mut s, signed(5, 1, 1, "c", 13)),
            SignVerdict::Sign { timestamp: (13, 0) }
        );
        let other = Command::Signed {
            chain_id: "other".into(),
            height: 9,
            round: 0,
            step: 1,
            digest: "d".into(),
            timestamp: (1, 0),
        };
        // Another chain has no watermark of its own yet.
        assert_eq!(verdict(&mut s, other), SignVerdict::NoWatermark);
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!((w.hrs(), w.signatures), ((5, 1, 1), 3));
    }

    /// A `SignAhead` of chain "c" at `h/r/step`, timestamped `h`.
    fn ahead(h: u64, r: u32, step: u8, digest: &str, through: Hrs3, holder: u64) -> Command {
        Command::SignAhead {
            chain_id: "c".into(),
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (h as i64, 0),
            through,
            holder,
        }
    }

    type Hrs3 = (u64, u32, u8);

    #[test]
    fn a_reservation_is_signed_in_by_its_holder_alone() {
        let mut s = ClusterState::default();
        let verdict = |s: &mut ClusterState, c| s.apply(&c, 1).sign.unwrap();
        s.apply(&never_signed(), 1);
        let sign = |ts| SignVerdict::Sign { timestamp: (ts, 0) };
        // Holder 1 signs 5/0/3 and reserves 6/0/1 and 6/0/2.
        assert_eq!(verdict(&mut s, ahead(5, 0, 3, "a", (6, 0, 2), 1)), sign(5));
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!(
            (w.hrs(), w.holder, w.digest.clone()),
            ((6, 0, 2), Some(1), None)
        );
        assert_eq!(w.signed().map(|s| s.hrs()), Some((5, 0, 3)));
        // Nobody else signs in it, with a reservation or without one ...
        assert_eq!(
            verdict(&mut s, ahead(6, 0, 1, "p", (6, 0, 3), 2)),
            SignVerdict::Reserved
        );
        assert_eq!(
            verdict(&mut s, signed(6, 0, 2, "v", 6)),
            SignVerdict::Reserved
        );
        assert_eq!(w.check("c", (6, 0, 2), "v"), SignVerdict::Reserved);
        // ... but a repeat of the bytes committed below it is signed again.
        assert_eq!(verdict(&mut s, signed(5, 0, 3, "a", 9)), sign(5));
        assert_eq!(
            verdict(&mut s, signed(5, 0, 3, "b", 9)),
            SignVerdict::Conflict
        );
        // The holder records what it signed there, and reserves further.
        assert_eq!(verdict(&mut s, ahead(6, 0, 2, "v", (6, 0, 3), 1)), sign(6));
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!((w.hrs(), w.holder, w.signatures), ((6, 0, 3), Some(1), 3));
        // Once, and never below what it recorded.
        assert_eq!(
            verdict(&mut s, ahead(6, 0, 2, "x", (6, 0, 3), 1)),
            SignVerdict::Conflict
        );
        assert_eq!(
            verdict(&mut s, ahead(6, 0, 1, "p", (6, 0, 3), 1)),
            SignVerdict::Regression
        );
        // Above the reservation, anyone: the new signer holds what it reserves.
        assert_eq!(verdict(&mut s, ahead(6, 1, 2, "r", (6, 1, 3), 2)), sign(6));
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!((w.hrs(), w.holder), ((6, 1, 3), Some(2)));
        assert_eq!(
            verdict(&mut s, ahead(6, 1, 3, "q", (7, 0, 2), 1)),
            SignVerdict::Reserved
        );
        // A reservation that reaches no further than its own HRS leaves a
        // plain watermark, which a keyraft before reservations reads as one.
        assert_eq!(verdict(&mut s, ahead(6, 1, 3, "q", (6, 1, 3), 2)), sign(6));
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!(
            (w.hrs(), w.holder, w.digest.as_deref()),
            ((6, 1, 3), None, Some("q"))
        );
        // An imported floor above a reservation ends it.
        s.apply(&ahead(7, 0, 2, "v", (7, 0, 3), 2), 1);
        s.apply(&s.floor_command("c", 8), 1);
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!((w.height, w.holder, w.last.clone()), (8, None, None));
    }

    #[test]
    fn a_reservation_into_the_next_height_leaves_the_later_rounds_to_anyone() {
        let mut s = ClusterState::default();
        let verdict = |s: &mut ClusterState, c| s.apply(&c, 1).sign.unwrap();
        let sign = |ts| SignVerdict::Sign { timestamp: (ts, 0) };
        s.apply(&never_signed(), 1);
        // Holder 1's precommit at 5/0 reserves 6/0/1 and 6/0/2 only.
        assert_eq!(verdict(&mut s, ahead(5, 0, 3, "a", (6, 0, 2), 1)), sign(5));
        // Round 1 of height 5 is anyone's (committed first), and leaves
        // holder 1's reservation standing without one of its own.
        assert_eq!(verdict(&mut s, ahead(5, 1, 2, "g", (5, 1, 3), 2)), sign(5));
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!(
            (w.hrs(), w.holder, w.reserved_from),
            ((6, 0, 2), Some(1), Some((6, 0, 0)))
        );
        assert_eq!(w.signed().map(|s| s.hrs()), Some((5, 1, 2)));
        assert_eq!(verdict(&mut s, ahead(5, 1, 3, "h", (6, 0, 2), 2)), sign(5));
        assert_eq!(
            verdict(&mut s, ahead(6, 0, 1, "p", (6, 0, 3), 2)),
            SignVerdict::Reserved
        );
        assert_eq!(verdict(&mut s, ahead(6, 0, 1, "p", (6, 0, 3), 1)), sign(6));
        // An imported floor at height 6 ends the reservation that reached
        // into it, and covers its end: its holder signs nothing below.
        assert_eq!(verdict(&mut s, ahead(6, 0, 3, "q", (7, 0, 2), 1)), sign(6));
        s.apply(&s.floor_command("c", 6), 1);
        let w = s.watermark("c").cloned().unwrap();
        assert_eq!(
            (w.hrs(), w.holder, w.digest.clone()),
            ((7, 0, 2), None, None)
        );
        assert_eq!(
            verdict(&mut s, ahead(7, 0, 1, "p", (7, 0, 3), 1)),
            SignVerdict::Regression
        );
        assert_eq!(verdict(&mut s, ahead(7, 0, 3, "v", (8, 0, 2), 1)), sign(7));
    }

    #[test]
    fn each_chain_keeps_its_own_watermark() {
        let mut s = ClusterState::default();
        let on = |chain: &str, h, r, step, digest: &str| Command::Signed {
            chain_id: chain.into(),
            height: h,
            round: r,
            step,
            digest: digest.into(),
            timestamp: (1, 0),
        };
        s.apply(&s.floor_command("c", 0), 1);
        s.apply(&signed(10, 0, 2, "x", 1), 2);
        // The one-chain floor for a second chain is refused ...
        let one_chain = Command::SignerFloor {
            chain_id: "b".into(),
            height: 0,
        };
        assert_eq!(s.apply(&one_chain, 3).sign, Some(SignVerdict::WrongChain));
        assert_eq!(s.watermark("b"), None);
        assert_eq!(
            s.apply(&on("b", 1, 0, 1, "y"), 4).sign,
            Some(SignVerdict::NoWatermark)
        );
        // ... the leader sends the chain floor, which every member that
        // can keep chains apart applies.
        let floor = s.floor_command("b", 0);
        assert!(matches!(floor, Command::ChainFloor { .. }), "{floor:?}");
        s.apply(&floor, 5);
        assert!(matches!(
            s.apply(&on("b", 1, 0, 1, "y"), 6).sign,
            Some(SignVerdict::Sign { .. })
        ));
        // One chain's heights, conflicts and floors never touch another's.
        assert!(matches!(
            s.apply(&on("b", 10, 0, 2, "other"), 7).sign,
            Some(SignVerdict::Sign { .. })
        ));
        assert_eq!(
            s.apply(&on("c", 10, 0, 2, "z"), 8).sign,
            Some(SignVerdict::Conflict)
        );
        s.apply(&s.floor_command("b", 500), 9);
        assert_eq!(s.watermark("c").unwrap().hrs(), (10, 0, 2));
        assert_eq!(s.watermark("b").unwrap().height, 500);
        assert_eq!(s.watermark("b").unwrap().signatures, 2);
    }

    #[test]
    fn one_chain_is_stored_as_before_and_two_as_a_shape_old_members_refuse() {
        /// The replicated state as a keyraft from before chains were kept
        /// apart declares it (the part that matters here).
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Old {
            #[serde(default)]
            signer: Option<SignerState>,
        }
        let mut s = ClusterState::default();
        let json = serde_json::to_string(&s).unwrap();
        assert!(serde_json::from_str::<Old>(&json).unwrap().signer.is_none());
        s.apply(&s.floor_command("c", 0), 1);
        s.apply(&signed(10, 0, 2, "x", 1), 2);
        let json = serde_json::to_string(&s).unwrap();
        let old = serde_json::from_str::<Old>(&json).unwrap().signer.unwrap();
        assert_eq!(old.hrs(), (10, 0, 2));
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
        s.apply(&s.floor_command("b", 7), 3);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            serde_json::from_str::<Old>(&json).is_err(),
            "an old member must fail on two chains, not keep one: {json}"
        );
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
        // And the chain floor is an entry an old member cannot decode.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        #[allow(dead_code)]
        enum OldCommand {
            SignerFloor { chain_id: String, height: u64 },
        }
        let entry = serde_json::to_string(&s.floor_command("a", 1)).unwrap();
        assert!(
            serde_json::from_str::<OldCommand>(&entry).is_err(),
            "{entry}"
        );
    }

    #[test]
    fn an_imported_floor_blocks_its_whole_height_and_never_lowers() {
        let mut s = ClusterState::default();
        let floor = |h| Command::SignerFloor {
            chain_id: "c".into(),
            height: h,
        };
        s.apply(&floor(100), 1);
        for step in 1..=3 {
            for round in [0, 5] {
                let v = s.apply(&signed(100, round, step, "a", 1), 2).sign.unwrap();
                assert_ne!(v, SignVerdict::Sign { timestamp: (1, 0) }, "{round}/{step}");
            }
        }
        assert!(matches!(
            s.apply(&signed(101, 0, 1, "a", 1), 3).sign,
            Some(SignVerdict::Sign { .. })
        ));
        s.apply(&floor(50), 4);
        assert_eq!(
            s.watermark("c").unwrap().hrs(),
            (101, 0, 1),
            "a floor never lowers"
        );
    }
}
