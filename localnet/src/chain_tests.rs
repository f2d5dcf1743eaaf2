//! Table tests of the judge's books ([`super::Ledger`]).
use super::*;

#[test]
fn ledger_counts_missed_signed_and_double() {
    let mut l = Ledger::default();
    l.advance(); // height 1
    assert!(!l.record(7));
    assert!(!l.record(7), "same node twice is not a double sign");
    assert!(l.record(8));
    l.advance(); // height 2, nobody signs
    l.advance(); // height 3
    assert_eq!((l.signed, l.missed, l.double_signs), (1, 1, 1));
    assert_eq!(l.window.len(), 2);
}

#[test]
fn an_upgrade_height_holds_the_chain_until_its_version_signs_it() {
    let plan = Plan::new(vec!["v2@3".parse().unwrap()]).unwrap();
    let mut l = Ledger {
        plan,
        ..Ledger::default()
    };
    assert_eq!(l.tick(), 1);
    l.record(1);
    assert_eq!(l.tick(), 2);
    assert!(
        l.wrong_version(Some("genesis")).is_none(),
        "no upgrade at 2"
    );
    l.record(1);
    assert_eq!(l.tick(), 3);
    assert_eq!(l.tick(), 3, "no block past the upgrade's height");
    assert!(l.halted().is_some() && l.halted_since.is_some());
    assert!(l.wrong_version(Some("genesis")).is_some());
    assert!(l.wrong_version(None).is_some(), "no version is genesis");
    assert!(l.wrong_version(Some("v2")).is_none());
    l.record(1);
    assert_eq!(l.tick(), 4);
    assert_eq!((l.missed, l.signed, l.passed.len()), (0, 3, 1));
    assert_eq!(l.stats(0).halted, None);
    assert!(!l.passed[0].by_network && l.passed[0].signed_ms.is_some());
}

#[test]
fn the_rest_of_the_network_passes_a_halt_without_this_validator() {
    let plan = Plan::new(vec!["v2@2".parse().unwrap()]).unwrap();
    let mut l = Ledger {
        plan,
        network_upgrade: Some(std::time::Duration::ZERO),
        ..Ledger::default()
    };
    assert_eq!(l.tick(), 1);
    assert_eq!(l.tick(), 2, "halted at 2");
    assert!(l.halted_since.is_some());
    assert_eq!(l.tick(), 3, "the network upgraded: 2 missed");
    assert_eq!(l.passed.len(), 1);
    assert!(l.passed[0].by_network && l.passed[0].signed_ms.is_none());
    l.record(1);
    assert!(l.passed[0].signed_ms.is_some(), "signed again at 3");
    assert_eq!((l.missed, l.signed), (2, 1));
}

#[test]
fn window_is_bounded() {
    let mut l = Ledger::default();
    for _ in 0..(WINDOW_HEIGHTS * 3) {
        l.advance();
        l.record(1);
    }
    assert!(l.window.len() as u64 <= WINDOW_HEIGHTS + 1);
    assert_eq!(l.signed, WINDOW_HEIGHTS * 3);
}
