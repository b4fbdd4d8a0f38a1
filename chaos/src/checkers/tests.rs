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
    Recorded { code: "OK".into(), debits, ..Default::default() }
}

fn read_balance(seq: u64, sent_ms: u64, answered_ms: u64, user: u64, balance: u64) -> Op {
    Op {
        seq,
        sent_ms,
        answered_ms,
        kind: OpKind::ReadBalance { user, currency: CNY.into(), balance: Some(balance) },
        outcome: Outcome::Ok,
        resolved: None,
    }
}

fn read_transfer(seq: u64, sent_ms: u64, id: &str, found: bool) -> Op {
    Op {
        seq,
        sent_ms,
        answered_ms: sent_ms + 3,
        kind: OpKind::ReadTransfer {
            transfer_id: id.into(),
            found,
            code: if found { "OK".into() } else { String::new() },
            settlement: if found { "LOCAL".into() } else { String::new() },
        },
        outcome: Outcome::Ok,
        resolved: None,
    }
}

/// A transfer with explicit times.
fn timed(seq: u64, id: &str, from: u64, to: u64, amount: u64, times: (u64, u64), outcome: Outcome) -> Op {
    Op { sent_ms: times.0, answered_ms: times.1, ..transfer(seq, id, from, to, amount, outcome) }
}

const READS: &str = "reads_see_acknowledged_writes";

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
        // Users 1, 2 and 3 are all in pair 1.
        user_pairs: [(1, 1), (2, 1), (3, 1)].into_iter().collect(),
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
    let mut history = history;
    history.ops.push(read_balance(10, 50, 52, 1, 750));
    history.ops.push(read_transfer(11, 50, "t1", true));
    let text = serde_json::to_string(&history).unwrap();
    assert_eq!(serde_json::from_str::<History>(&text).unwrap(), history);
    // A journal written before reads and pairs existed still reads.
    let old = r#"{"ops":[]}"#;
    assert_eq!(serde_json::from_str::<History>(old).unwrap(), History::default());
    let text = serde_json::to_string(&state.envelopes).unwrap();
    assert_eq!(
        serde_json::from_str::<BTreeMap<String, crate::history::EnvelopeState>>(&text).unwrap(),
        state.envelopes
    );
}

#[test]
fn reads_that_see_every_acknowledged_write_pass() {
    let (mut history, state) = clean();
    // t1 (seq 1) answered at 15 ms, t2 at 25, the send at 35, grab 4 at 45.
    history.ops.push(read_balance(10, 50, 52, 1, 750));
    history.ops.push(read_balance(11, 50, 52, 2, 1_210));
    history.ops.push(read_transfer(12, 30, "t2", true));
    // A read sent before t1 was answered may see it or not.
    history.ops.push(read_balance(13, 12, 13, 1, 1_000));
    history.ops.push(read_balance(14, 12, 13, 1, 900));
    // A transfer read before the write was acknowledged may find nothing.
    history.ops.push(read_transfer(15, 20, "t2", false));
    let verdicts = check_all(&history, &state);
    assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:#?}");
    let reads = verdict(&verdicts, READS);
    assert!(reads.detail.contains("4 balance and 2 transfer reads checked"), "{}", reads.detail);
}

#[test]
fn a_stale_balance_read_is_caught_and_named() {
    let (mut history, state) = clean();
    // At 50 ms t1 and t2 (150 out of user 1) and the send (100) were all
    // acknowledged: user 1 holds 750. A read answering 850 missed t1.
    history.ops.push(read_balance(10, 50, 52, 1, 850));
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec![READS]);
    let reads = verdict(&verdicts, READS);
    let first = reads.first.as_ref().unwrap();
    assert_eq!((first.seq, first.amount), (10, 100), "{first:?}");
    assert!(first.what.contains("returned 850 CNY; possible: 750..=750"), "{}", first.what);
    assert!(first.what.contains("the latest #3 at 35 ms"), "{}", first.what);
    // A balance the history cannot explain either way (too low) too.
    history.ops.push(read_balance(11, 60, 62, 2, 1_000));
    let reads = reads_see_acknowledged_writes(&history, &state);
    assert_eq!(reads.offenses, 2);
    assert_eq!((reads.first.unwrap().seq, reads.worst.unwrap().seq, reads.last.unwrap().seq), (10, 11, 11));
}

#[test]
fn a_transfer_read_that_misses_an_acknowledged_transfer_is_caught() {
    let (mut history, state) = clean();
    // t2 was acknowledged at 25 ms; a read sent at 40 ms finds nothing.
    history.ops.push(read_transfer(10, 40, "t2", false));
    // Another finds it with another result.
    let mut wrong = read_transfer(11, 41, "t1", true);
    if let OpKind::ReadTransfer { code, .. } = &mut wrong.kind {
        *code = "INSUFFICIENT_FUNDS".into();
    }
    history.ops.push(wrong);
    let verdicts = check_all(&history, &state);
    assert_eq!(failing(&verdicts), vec![READS]);
    let reads = verdict(&verdicts, READS);
    assert_eq!(reads.offenses, 2);
    assert!(reads.detail.contains("transfer t2, sent at 40 ms, found nothing; #2 was acknowledged OK at 25 ms"));
    assert!(reads.last.as_ref().unwrap().what.contains("recorded as INSUFFICIENT_FUNDS"));
    // The worst is the larger transfer (t1: 100).
    assert_eq!(reads.worst.as_ref().unwrap().seq, 11);
}

#[test]
fn writes_in_flight_or_unknown_widen_what_a_read_may_return() {
    let (mut history, mut state) = clean();
    // t3: 2 -> 1, 30, sent at 60, answered at 90. t4: 1 -> 2, 20, unknown,
    // resolved OK later. t5: 1 -> 3, 5, refused. t6 sent after the read.
    history.ops.push(timed(6, "t3", 2, 1, 30, (60, 90), Outcome::Ok));
    let mut t4 = timed(7, "t4", 1, 2, 20, (61, 5_061), Outcome::Unknown);
    t4.resolved = Some(Outcome::Ok);
    history.ops.push(t4);
    history.ops.push(timed(8, "t5", 1, 3, 5, (62, 64), Outcome::Refused("INSUFFICIENT_FUNDS".into())));
    history.ops.push(timed(9, "t6", 1, 2, 7, (200, 205), Outcome::Ok));
    for id in ["t3", "t4", "t6"] {
        state.recorded.insert(id.into(), recorded(1));
    }
    *state.balances.get_mut(&(1, CNY.into())).unwrap() += 30 - 20 - 7;
    *state.balances.get_mut(&(2, CNY.into())).unwrap() += -30 + 20 + 7;
    // User 1 at 750 before; a read from 70 to 80 may see t3 (+30) and t4
    // (-20) or not: 730..=780.
    for (seq, balance) in [(20, 730), (21, 750), (22, 760), (23, 780)] {
        history.ops.push(read_balance(seq, 70, 80, 1, balance));
    }
    let reads = reads_see_acknowledged_writes(&history, &state);
    assert_eq!(reads.status, Status::Pass, "{reads:?}");
    // Neither the refused t5 (-5) nor t6, sent after the read, may show.
    history.ops.push(read_balance(24, 70, 80, 1, 725));
    history.ops.push(read_balance(25, 70, 80, 1, 723));
    let reads = reads_see_acknowledged_writes(&history, &state);
    assert_eq!(reads.offenses, 2, "{reads:?}");
    assert!(reads.first.unwrap().what.contains("possible: 730..=780"));
    // After t3's acknowledgement (90 ms) it must show: 760..=780 (t4 open).
    history.ops.truncate(history.ops.len() - 2);
    history.ops.push(read_balance(26, 100, 101, 1, 750));
    let reads = reads_see_acknowledged_writes(&history, &state);
    assert_eq!(reads.offenses, 1);
    assert!(reads.first.unwrap().what.contains("possible: 760..=780"));
}

#[test]
fn a_cross_pair_credit_may_arrive_after_the_acknowledgement() {
    let (mut history, mut state) = clean();
    // User 4 lives in pair 2 and starts with 1,000; t7 (1 -> 4, 40) was
    // acknowledged at 105 ms, but the credit travels through the outbox.
    history.user_pairs.insert(4, 2);
    state.seeded.insert((4, CNY.into()), 1_000);
    state.balances.insert((4, CNY.into()), 1_040);
    *state.balances.get_mut(&(1, CNY.into())).unwrap() -= 40;
    state.recorded.insert("t7".into(), recorded(1));
    history.ops.push(timed(6, "t7", 1, 4, 40, (100, 105), Outcome::Ok));
    // The recipient may read 1,000 or 1,040 after the acknowledgement...
    history.ops.push(read_balance(7, 110, 111, 4, 1_000));
    history.ops.push(read_balance(8, 110, 111, 4, 1_040));
    let verdicts = check_all(&history, &state);
    assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:#?}");
    // ...but the sender's debit is bound by it: 750 - 40.
    history.ops.push(read_balance(9, 110, 111, 1, 750));
    let reads = reads_see_acknowledged_writes(&history, &state);
    assert_eq!((reads.status, reads.offenses), (Status::Fail, 1));
    assert!(reads.first.unwrap().what.contains("possible: 710..=710"));
    // Nothing else may show at the recipient.
    history.ops.push(read_balance(10, 110, 111, 4, 1_041));
    assert_eq!(reads_see_acknowledged_writes(&history, &state).offenses, 2);
}

#[test]
fn unanswered_reads_need_no_resolution() {
    let (mut history, state) = clean();
    let mut read = read_balance(10, 50, 5_050, 1, 0);
    read.kind = OpKind::ReadBalance { user: 1, currency: CNY.into(), balance: None };
    read.outcome = Outcome::Unknown;
    history.ops.push(read);
    let verdicts = check_all(&history, &state);
    assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:#?}");
    assert!(verdict(&verdicts, READS).detail.contains("(1 unanswered)"));
}

#[test]
fn a_cell_lost_for_good_is_not_compared_but_its_pair_is() {
    let (history, mut state) = clean();
    // Pair 1: cell 3 took over from cell 1, which was lost for good; pair 2:
    // cells 2 and 4 both compared.
    state.digests.clear();
    state.digests.insert(3, vec!["aa".into(), "aa".into(), "aa".into()]);
    state.digests.insert(2, vec!["bb".into(), "bb".into(), "bb".into()]);
    state.digests.insert(4, vec!["bb".into(), "bb".into(), "bb".into()]);
    state.pairs.insert(1, (3, 1));
    state.pairs.insert(2, (2, 4));
    state.lost_cells.insert(1);
    let verdicts = check_all(&history, &state);
    assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:#?}");
    assert!(verdict(&verdicts, "replicas_identical").detail.contains("cell(s) [1] lost for good"));
    // Its survivor's replicas still must agree.
    state.digests.insert(3, vec!["aa".into(), "ab".into(), "aa".into()]);
    assert_eq!(replicas_identical(&state).status, Status::Fail);
    // A survivor whose digests were not read leaves the verdict unknown.
    state.digests.remove(&3);
    assert_eq!(replicas_identical(&state).status, Status::Unknown);
    // Without the lost cell declared, its missing digests are not excused.
    state.digests.insert(3, vec!["aa".into(); 3]);
    state.lost_cells.clear();
    assert_eq!(replicas_identical(&state).status, Status::Unknown);
    // A pair still served by its lost cell fails.
    state.lost_cells.insert(1);
    state.pairs.insert(1, (1, 3));
    let lost = replicas_identical(&state);
    assert_eq!(lost.status, Status::Fail);
    assert!(lost.detail.contains("pair 1 is served by cell 1, which was lost for good"), "{}", lost.detail);
}

#[test]
fn credit_delays_of_acknowledged_cross_pair_transfers() {
    let (mut history, mut state) = clean();
    let mut credited = |id: &str, delay: i64| {
        let r = Recorded { settlement: "CREDITED".into(), credit_delay_ms: Some(delay), ..recorded(1) };
        state.recorded.insert(id.into(), r);
    };
    for (i, delay) in (1..=100).enumerate() {
        let id = format!("x{i}");
        credited(&id, delay * 10);
        history.ops.push(transfer(100 + i as u64, &id, 1, 4, 1, Outcome::Ok));
    }
    // Not acknowledged (resolved later): not counted.
    credited("late", 99_999);
    let mut late = transfer(300, "late", 1, 4, 1, Outcome::Unknown);
    late.resolved = Some(Outcome::Ok);
    history.ops.push(late);
    state.recorded.insert("stuck".into(), Recorded { settlement: "IN_TRANSIT".into(), ..recorded(1) });
    history.ops.push(transfer(301, "stuck", 1, 4, 1, Outcome::Ok));
    state.recorded.insert("back".into(), Recorded { settlement: "REFUNDED".into(), refunded: true, ..recorded(1) });
    history.ops.push(transfer(302, "back", 1, 4, 1, Outcome::Ok));
    let d = credit_delays(&history, &state);
    assert_eq!((d.count, d.p50_ms, d.p99_ms, d.max_ms), (100, Some(500), Some(990), Some(1_000)));
    assert_eq!(d.slowest, vec![(199, 1_000), (198, 990), (197, 980), (196, 970), (195, 960)]);
    assert_eq!((d.in_transit, d.refunded), (1, 1));
    // Local transfers (t1, t2) have no credit delay.
    assert_eq!(credit_delays(&clean().0, &clean().1), CreditDelays::default());
}
