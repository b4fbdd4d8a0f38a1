//! The checkers against known-good and known-bad histories: each bad
//! history is caught by the checker meant for it and named precisely.

use super::*;
use crate::history::{EnvelopeState, Recorded};

const CNY: &str = "CNY";

fn transfer(seq: u64, id: &str, from: u64, to: u64, amount: u64, outcome: Outcome) -> Op {
    Op {
        seq,
        sent_ms: seq * 10,
        answered_ms: seq * 10 + 5,
        kind: OpKind::Transfer { transfer_id: id.into(), from, to, currency: CNY.into(), amount },
        outcome,
        resolved: None,
    }
}

fn grab(seq: u64, envelope: &str, user: u64, amount: u64) -> Op {
    Op {
        seq,
        sent_ms: seq * 10,
        answered_ms: seq * 10 + 5,
        kind: OpKind::Grab { envelope_id: envelope.into(), user, amount: Some(amount) },
        outcome: Outcome::Ok,
        resolved: None,
    }
}

fn recorded(debits: u32) -> Recorded {
    Recorded { code: "OK".into(), debits, refunded: false }
}

/// Users 1 and 2 start with 1,000 each; 1 sends 2 two transfers; user 1
/// sends an envelope of 100 in 2 shares, grabbed by 2 (60) and 3 (40).
fn clean() -> (History, FinalState) {
    let send = Op {
        seq: 3,
        sent_ms: 30,
        answered_ms: 35,
        kind: OpKind::SendEnvelope {
            transfer_id: "e1".into(),
            envelope_id: "1.e1".into(),
            sender: 1,
            currency: CNY.into(),
            total: 100,
        },
        outcome: Outcome::Ok,
        resolved: None,
    };
    let history = History {
        ops: vec![
            transfer(1, "t1", 1, 2, 100, Outcome::Ok),
            transfer(2, "t2", 1, 2, 50, Outcome::Ok),
            send,
            grab(4, "1.e1", 2, 60),
            grab(5, "1.e1", 3, 40),
        ],
    };
    let mut state = FinalState::default();
    for (user, seed) in [(1, 1_000), (2, 1_000), (3, 0)] {
        state.seeded.insert((user, CNY.into()), seed);
    }
    state.balances.insert((1, CNY.into()), 1_000 - 150 - 100);
    state.balances.insert((2, CNY.into()), 1_000 + 150 + 60);
    state.balances.insert((3, CNY.into()), 40);
    state.sums.insert((1, CNY.into()), 0);
    state.sums.insert((2, CNY.into()), 0);
    for id in ["t1", "t2", "e1"] {
        state.recorded.insert(id.into(), recorded(1));
    }
    state.envelopes.insert(
        "1.e1".into(),
        EnvelopeState {
            sender: 1,
            currency: CNY.into(),
            total: 100,
            remaining: 0,
            refunded: 0,
            grabs: vec![(2, 60), (3, 40)],
        },
    );
    state.digests.insert(1, vec!["aa".into(), "aa".into(), "aa".into()]);
    (history, state)
}

fn verdict<'a>(verdicts: &'a [Verdict], checker: &str) -> &'a Verdict {
    verdicts.iter().find(|v| v.checker == checker).unwrap()
}

fn failing(verdicts: &[Verdict]) -> Vec<&'static str> {
    verdicts.iter().filter(|v| v.status == Status::Fail).map(|v| v.checker).collect()
}

#[test]
fn a_clean_history_passes_every_checker() {
    let (history, state) = clean();
    let verdicts = check_all(&history, &state);
    assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:#?}");
}

#[test]
fn a_lost_acknowledged_transfer_is_caught_and_named() {
    let (history, mut state) = clean();
    // The ledger lost t2 (a failover that lost an acknowledged write).
    state.recorded.remove("t2");
    *state.balances.get_mut(&(1, CNY.into())).unwrap() += 50;
    *state.balances.get_mut(&(2, CNY.into())).unwrap() -= 50;
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec!["no_lost_ack", "balances_match"]);
    let lost = verdict(&verdicts, "no_lost_ack");
    assert_eq!(lost.first.as_ref().unwrap().seq, 2);
    assert!(lost.detail.contains("t2 is not in the ledger"), "{}", lost.detail);
}

#[test]
fn a_transfer_applied_twice_is_caught() {
    let (history, mut state) = clean();
    state.recorded.insert("t1".into(), recorded(2));
    *state.balances.get_mut(&(1, CNY.into())).unwrap() -= 100;
    *state.balances.get_mut(&(2, CNY.into())).unwrap() += 100;
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec!["no_duplicates", "balances_match"]);
    assert_eq!(verdict(&verdicts, "no_duplicates").first.as_ref().unwrap().seq, 1);
}

#[test]
fn money_that_does_not_conserve_is_caught() {
    let (history, mut state) = clean();
    // A credit applied in cell 2 with no debit anywhere.
    state.sums.insert((2, CNY.into()), 500);
    *state.balances.get_mut(&(2, CNY.into())).unwrap() += 500;
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec!["conservation", "balances_match"]);
    let conservation = verdict(&verdicts, "conservation");
    assert!(conservation.detail.contains("cell 2: CNY balances sum to 500"), "{}", conservation.detail);
}

#[test]
fn a_double_grab_is_caught() {
    let (mut history, mut state) = clean();
    history.ops.push(grab(6, "1.e1", 2, 0));
    let envelope = state.envelopes.get_mut("1.e1").unwrap();
    // User 2 got the second share too (and user 3 none).
    envelope.grabs = vec![(2, 60), (2, 40)];
    *state.balances.get_mut(&(2, CNY.into())).unwrap() += 40;
    *state.balances.get_mut(&(3, CNY.into())).unwrap() -= 40;
    let verdicts = check_all(&history, &state);
    assert!(failing(&verdicts).contains(&"no_duplicates"), "{verdicts:#?}");
    let duplicate = verdict(&verdicts, "no_duplicates");
    assert!(duplicate.detail.contains("user 2 holds two shares of 1.e1"), "{}", duplicate.detail);
    // User 3 was told of a share the ledger does not hold.
    assert_eq!(verdict(&verdicts, "no_lost_ack").first.as_ref().unwrap().seq, 5);
}

#[test]
fn an_unresolved_operation_makes_the_balance_verdict_unknown() {
    let (mut history, mut state) = clean();
    history.ops.push(transfer(6, "t3", 2, 1, 30, Outcome::Unknown));
    // t3 applied, but nobody found out.
    state.recorded.insert("t3".into(), recorded(1));
    *state.balances.get_mut(&(1, CNY.into())).unwrap() += 30;
    *state.balances.get_mut(&(2, CNY.into())).unwrap() -= 30;
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec!["unknown_resolved"]);
    assert_eq!(verdict(&verdicts, "balances_match").status, Status::Unknown);
    // Resolved by a retry: everything passes.
    history.ops.last_mut().unwrap().resolved = Some(Outcome::Ok);
    assert!(check_all(&history, &state).iter().all(|v| v.status == Status::Pass));
}

#[test]
fn offenders_are_ranked_first_worst_last() {
    let (mut history, mut state) = clean();
    history.ops.push(transfer(6, "t4", 1, 2, 7, Outcome::Ok));
    history.ops.push(transfer(7, "t5", 1, 2, 300, Outcome::Ok));
    history.ops.push(transfer(8, "t6", 1, 2, 9, Outcome::Ok));
    state.recorded.remove("t2");
    let lost = no_lost_ack(&history, &state);
    assert_eq!(lost.offenses, 4);
    assert_eq!(
        (lost.first.unwrap().seq, lost.worst.unwrap().seq, lost.last.unwrap().seq),
        (2, 7, 8),
        "first by order, worst by amount, last by order"
    );
}

#[test]
fn envelopes_that_leak_and_replicas_that_differ_are_caught() {
    let (history, mut state) = clean();
    state.envelopes.get_mut("1.e1").unwrap().remaining = 1;
    state.digests.insert(2, vec!["aa".into(), "ab".into()]);
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec!["envelopes", "replicas_identical"]);
}

#[test]
fn a_history_round_trips_through_json() {
    let (history, state) = clean();
    let text = serde_json::to_string(&history).unwrap();
    assert_eq!(serde_json::from_str::<History>(&text).unwrap(), history);
    let text = serde_json::to_string(&state.envelopes).unwrap();
    assert_eq!(
        serde_json::from_str::<BTreeMap<String, crate::history::EnvelopeState>>(&text).unwrap(),
        state.envelopes
    );
}
