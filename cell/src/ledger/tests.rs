//! Unit and property tests of the ledger state machine, on an in-memory Kv.

use std::collections::{BTreeMap, HashMap};

use cellbank_proto::cell::{command, Command, CreditCommand, MoveCommand, OpenAccountCommand};
use cellbank_proto::v1::{ResultCode, TransferKind, TransferResult};
use proptest::prelude::*;

use super::*;

type Memory = BTreeMap<Vec<u8>, Vec<u8>>;

fn open(user: u64, currency: &str) -> Command {
    Command { kind: Some(command::Kind::OpenAccount(OpenAccountCommand { user_id: user, currency: currency.into() })) }
}

fn movement(id: &str, kind: TransferKind, from: u64, to: u64, currency: &str, amount: u64) -> Command {
    Command {
        kind: Some(command::Kind::Move(MoveCommand {
            transfer_id: id.as_bytes().to_vec(),
            kind: kind as i32,
            from_user_id: from,
            to_user_id: to,
            currency: currency.into(),
            amount,
            ..Default::default()
        })),
    }
}

fn deposit(id: &str, user: u64, amount: u64) -> Command {
    movement(id, TransferKind::Deposit, 0, user, "CNY", amount)
}

fn transfer(id: &str, from: u64, to: u64, amount: u64) -> Command {
    movement(id, TransferKind::Transfer, from, to, "CNY", amount)
}

struct Harness {
    ledger: Ledger,
    kv: Memory,
    index: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness { ledger: Ledger::new(), kv: Memory::new(), index: 0 }
    }

    fn apply(&mut self, command: Command) -> TransferResult {
        self.index += 1;
        self.ledger.apply_command(&mut self.kv, self.index, 1_700_000_000_000, &command)
    }

    fn code(&mut self, command: Command) -> ResultCode {
        ResultCode::try_from(self.apply(command).code).unwrap()
    }

    fn balance(&self, user: u64) -> Option<i128> {
        get_user_account(&self.kv, user, Currency::parse("CNY").unwrap()).map(|a| a.balance)
    }

    fn sums(&self) -> BTreeMap<String, i128> {
        digest(self.kv.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))).balance_sum_by_currency
    }

    fn assert_conserved(&self) {
        for (currency, sum) in self.sums() {
            assert_eq!(sum, 0, "balances in {currency} must sum to zero");
        }
        for (key, value) in &self.kv {
            if let Some(id) = AccountId::from_key(key) {
                let account = Account::decode(value).unwrap();
                if id.kind == AccountKind::User {
                    assert!(account.balance >= 0, "user balance negative: {id:?}");
                }
            }
        }
    }
}

#[test]
fn deposit_transfer_withdraw_conserve_money() {
    let mut h = Harness::new();
    assert_eq!(h.code(open(1, "CNY")), ResultCode::Ok);
    assert_eq!(h.code(open(2, "CNY")), ResultCode::Ok);
    assert_eq!(h.code(open(1, "CNY")), ResultCode::AccountAlreadyExists);
    assert_eq!(h.code(deposit("d1", 1, 500)), ResultCode::Ok);
    assert_eq!(h.code(transfer("t1", 1, 2, 200)), ResultCode::Ok);
    assert_eq!(h.code(movement("w1", TransferKind::Withdraw, 2, 0, "CNY", 50)), ResultCode::Ok);
    assert_eq!((h.balance(1), h.balance(2)), (Some(300), Some(150)));
    assert_eq!(h.sums().get("CNY"), Some(&0));
    h.assert_conserved();
}

#[test]
fn business_failures_are_result_codes_and_change_nothing() {
    let mut h = Harness::new();
    h.apply(open(1, "CNY"));
    h.apply(open(2, "CNY"));
    h.apply(deposit("d1", 1, 100));
    let before = h.kv.clone();
    assert_eq!(h.code(transfer("t1", 1, 2, 101)), ResultCode::InsufficientFunds);
    assert_eq!(h.code(transfer("t2", 1, 3, 1)), ResultCode::AccountNotFound);
    assert_eq!(h.code(deposit("d2", 9, 1)), ResultCode::AccountNotFound);
    assert_eq!(h.code(movement("x", TransferKind::Transfer, 1, 2, "USD", 1)), ResultCode::AccountNotFound);
    // Only the failed transfers' records were added; no account changed.
    let accounts = |kv: &Memory| {
        kv.iter()
            .filter(|(k, _)| AccountId::from_key(k).is_some())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(accounts(&before), accounts(&h.kv));
    // A failed id stays failed even once funds arrive.
    h.apply(deposit("d3", 1, 1000));
    let retry = h.apply(transfer("t1", 1, 2, 101));
    assert_eq!(retry.code, ResultCode::InsufficientFunds as i32);
    assert!(retry.duplicate);
    assert_eq!(h.balance(2), Some(0));
}

#[test]
fn malformed_commands_are_rejected_on_apply_too() {
    let mut h = Harness::new();
    h.apply(open(1, "CNY"));
    h.apply(deposit("d", 1, 10));
    let before = h.kv.clone();
    let cases = vec![
        (transfer("z", 1, 2, 0), "amount"),
        (transfer("n", 1, 2, u64::MAX), "amount"),
        (transfer("n2", 1, 2, i64::MAX as u64 + 1), "amount"),
        (transfer("s", 1, 1, 5), "to_user_id"),
        (transfer("", 1, 2, 5), "transfer_id"),
        (transfer(&"x".repeat(129), 1, 2, 5), "transfer_id"),
        (movement("c", TransferKind::Transfer, 1, 2, "ZZZ", 5), "currency"),
        (movement("c2", TransferKind::Transfer, 1, 2, "", 5), "currency"),
        (movement("k", TransferKind::Unspecified, 1, 2, "CNY", 5), "kind"),
        (transfer("u", 0, 2, 5), "from_user_id"),
        (open(0, "CNY"), "user_id"),
        (open(3, "cny"), "currency"),
        (Command { kind: None }, "command"),
    ];
    for (command, field) in cases {
        let result = h.apply(command);
        assert_eq!(result.code, ResultCode::InvalidItem as i32);
        assert_eq!(result.field, field);
    }
    let mut non_utf8 = transfer("ok", 1, 2, 5);
    if let Some(command::Kind::Move(m)) = &mut non_utf8.kind {
        m.transfer_id = vec![0xff, 0xfe];
    }
    assert_eq!(h.apply(non_utf8).field, "transfer_id");
    assert_eq!(before, h.kv, "no malformed command may change state");
}

#[test]
fn balance_limits_at_u64_max() {
    let mut h = Harness::new();
    h.apply(open(1, "CNY"));
    h.apply(open(2, "CNY"));
    let max_amount = i64::MAX as u64;
    // Fill account 1 to exactly u64::MAX with amounts at the per-movement cap.
    assert_eq!(h.code(deposit("a", 1, max_amount)), ResultCode::Ok);
    assert_eq!(h.code(deposit("b", 1, max_amount)), ResultCode::Ok);
    assert_eq!(h.code(deposit("c", 1, 1)), ResultCode::Ok);
    assert_eq!(h.balance(1), Some(u64::MAX as i128));
    assert_eq!(h.code(deposit("d", 1, 1)), ResultCode::BalanceOverflow);
    assert_eq!(h.balance(1), Some(u64::MAX as i128));
    // Account 2 can take it all back out, one capped movement at a time.
    assert_eq!(h.code(transfer("t1", 1, 2, max_amount)), ResultCode::Ok);
    assert_eq!(h.code(transfer("t2", 1, 2, max_amount)), ResultCode::Ok);
    assert_eq!(h.code(transfer("t3", 1, 2, 1)), ResultCode::Ok);
    assert_eq!((h.balance(1), h.balance(2)), (Some(0), Some(u64::MAX as i128)));
    assert_eq!(h.code(transfer("t4", 1, 2, 1)), ResultCode::InsufficientFunds);
    h.assert_conserved();
}

#[test]
fn idempotency_every_retry_shape() {
    let mut h = Harness::new();
    h.apply(open(1, "CNY"));
    h.apply(open(2, "CNY"));
    h.apply(open(3, "CNY"));
    h.apply(open(1, "USD"));
    h.apply(open(2, "USD"));
    h.apply(deposit("seed", 1, 1000));
    let first = h.apply(transfer("t", 1, 2, 10));
    assert_eq!(first.code, ResultCode::Ok as i32);
    // Same fields: the original result, nothing applied again.
    let again = h.apply(transfer("t", 1, 2, 10));
    assert!(again.duplicate);
    assert_eq!((again.code, again.applied_index), (first.code, first.applied_index));
    assert_eq!(h.balance(2), Some(10));
    // Different fields: named.
    let differ = |h: &mut Harness, command: Command| h.apply(command).field;
    assert_eq!(differ(&mut h, transfer("t", 1, 2, 11)), "amount");
    assert_eq!(differ(&mut h, transfer("t", 1, 3, 10)), "to_user_id");
    assert_eq!(differ(&mut h, transfer("t", 3, 2, 10)), "from_user_id");
    assert_eq!(differ(&mut h, movement("t", TransferKind::Transfer, 1, 2, "USD", 10)), "currency");
    assert_eq!(differ(&mut h, movement("t", TransferKind::Withdraw, 1, 0, "CNY", 10)), "kind");
    assert_eq!(h.code(transfer("t", 1, 2, 11)), ResultCode::IdReusedWithDifferentFields);
    // The deposit id space is the same as transfers'.
    assert_eq!(differ(&mut h, deposit("seed", 1, 999)), "amount");
    assert!(h.apply(deposit("seed", 1, 1000)).duplicate);
    assert_eq!(h.balance(1), Some(990));
    h.assert_conserved();
}

#[test]
fn history_lists_movements_in_order() {
    let mut h = Harness::new();
    h.apply(open(1, "CNY"));
    h.apply(open(2, "CNY"));
    h.apply(deposit("d", 1, 100));
    h.apply(transfer("t1", 1, 2, 10));
    h.apply(transfer("t2", 2, 1, 5));
    h.apply(transfer("t3", 1, 2, 1000)); // fails: not in history
    let id = AccountId::user(1, Currency::parse("CNY").unwrap());
    let prefix = id.history_prefix();
    let ids: Vec<_> =
        h.kv.iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| {
                let (delta, key) = parse_history(v).unwrap();
                (String::from_utf8(read_record(&h.kv, key).unwrap().transfer_id).unwrap(), delta)
            })
            .collect();
    assert_eq!(ids, vec![("d".to_string(), 100), ("t1".to_string(), -10), ("t2".to_string(), 5)]);
    let account = get_user_account(&h.kv, 1, Currency::parse("CNY").unwrap()).unwrap();
    assert_eq!(account.version, 3);
}

#[test]
fn digest_depends_on_every_key() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    for h in [&mut a, &mut b] {
        h.apply(open(1, "CNY"));
        h.apply(deposit("d", 1, 5));
    }
    let digest_of = |h: &Harness| digest(h.kv.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    assert_eq!(digest_of(&a), digest_of(&b));
    b.apply(deposit("e", 1, 1));
    assert_ne!(digest_of(&a).digest_hex, digest_of(&b).digest_hex);
}

fn arb_account() -> impl Strategy<Value = Account> {
    (any::<i128>(), any::<u64>()).prop_map(|(balance, version)| Account { balance, version })
}

/// One step of a random workload over a few users and two currencies.
#[derive(Debug, Clone)]
enum Step {
    Open(u64, &'static str),
    Deposit(u8, u64, &'static str, u64),
    Withdraw(u8, u64, &'static str, u64),
    Transfer(u8, u64, u64, &'static str, u64),
}

fn arb_amount() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..1000, Just(i64::MAX as u64), Just(i64::MAX as u64 + 1), Just(0u64), Just(u64::MAX), any::<u64>()]
}

fn arb_step() -> impl Strategy<Value = Step> {
    let user = 1u64..6;
    let currency = prop_oneof![Just("CNY"), Just("USD")];
    // Transfer ids from a small pool so that retries (same and different fields) happen.
    let id = 0u8..40;
    prop_oneof![
        (user.clone(), currency.clone()).prop_map(|(u, c)| Step::Open(u, c)),
        (id.clone(), user.clone(), currency.clone(), arb_amount()).prop_map(|(i, u, c, a)| Step::Deposit(i, u, c, a)),
        (id.clone(), user.clone(), currency.clone(), arb_amount()).prop_map(|(i, u, c, a)| Step::Withdraw(i, u, c, a)),
        (id, user.clone(), user, currency, arb_amount()).prop_map(|(i, f, t, c, a)| Step::Transfer(i, f, t, c, a)),
    ]
}

fn step_command(step: &Step) -> Command {
    match step {
        Step::Open(u, c) => open(*u, c),
        Step::Deposit(i, u, c, a) => movement(&format!("id{i}"), TransferKind::Deposit, 0, *u, c, *a),
        Step::Withdraw(i, u, c, a) => movement(&format!("id{i}"), TransferKind::Withdraw, *u, 0, c, *a),
        Step::Transfer(i, f, t, c, a) => movement(&format!("id{i}"), TransferKind::Transfer, *f, *t, c, *a),
    }
}

proptest! {
    #[test]
    fn account_encoding_round_trips(account in arb_account()) {
        prop_assert_eq!(Account::decode(&account.encode()), Some(account));
    }

    #[test]
    fn account_key_round_trips(owner in any::<u64>(), user in any::<bool>()) {
        let currency = Currency::parse("EUR").unwrap();
        let id = if user { AccountId::user(owner, currency) } else { AccountId { kind: AccountKind::Settlement, owner, currency } };
        prop_assert_eq!(AccountId::from_key(&id.key()), Some(id));
    }

    /// Over random sequences: money is conserved per currency, no user balance
    /// is negative, every retry of a recorded id returns the recorded outcome,
    /// and replaying the same commands gives the same state (determinism).
    #[test]
    fn random_sequences_conserve_money(steps in proptest::collection::vec(arb_step(), 1..200)) {
        let mut h = Harness::new();
        let mut outcomes: HashMap<Vec<u8>, (i32, Command)> = HashMap::new();
        for step in &steps {
            let command = step_command(step);
            let result = h.apply(command.clone());
            if let Some(command::Kind::Move(m)) = &command.kind {
                if result.code == ResultCode::InvalidItem as i32 {
                    continue;
                }
                match outcomes.get(&m.transfer_id) {
                    Some((code, first)) if first == &command => {
                        prop_assert!(result.duplicate);
                        prop_assert_eq!(result.code, *code);
                    }
                    Some(_) => prop_assert_eq!(result.code, ResultCode::IdReusedWithDifferentFields as i32),
                    None => {
                        prop_assert!(!result.duplicate);
                        outcomes.insert(m.transfer_id.clone(), (result.code, command.clone()));
                    }
                }
            }
            h.assert_conserved();
        }
        let mut replay = Harness::new();
        for step in &steps {
            replay.apply(step_command(step));
        }
        prop_assert_eq!(replay.kv, h.kv);
    }
}

// ---- Money between cells and red envelopes ----

const CELL_A: u64 = 1;
const CELL_B: u64 = 2;

fn cross(id: &str, from: u64, to: u64, amount: u64) -> Command {
    Command {
        kind: Some(command::Kind::Move(MoveCommand {
            transfer_id: id.as_bytes().to_vec(),
            kind: TransferKind::Transfer as i32,
            from_user_id: from,
            to_user_id: to,
            currency: "CNY".into(),
            amount,
            source_pair_id: CELL_A,
            dest_pair_id: CELL_B,
        })),
    }
}

fn pending(h: &Harness) -> Vec<cellbank_proto::cell::OutboxEntry> {
    h.kv.iter()
        .filter(|(k, _)| k.starts_with(keys::OUTBOX_PREFIX))
        .map(|(_, v)| prost::Message::decode(v.as_slice()).unwrap())
        .collect()
}

fn credit_of(entry: &cellbank_proto::cell::OutboxEntry) -> Command {
    Command { kind: Some(command::Kind::Credit(entry.credit.clone().unwrap())) }
}

fn settle(seq: u64, code: ResultCode, at: u64) -> Command {
    Command {
        kind: Some(command::Kind::Settle(cellbank_proto::cell::SettleCommand {
            seq,
            code: code as i32,
            credited_at_ms: at,
        })),
    }
}

fn audit_of(h: &Harness) -> cellbank_proto::cell::AuditResponse {
    audit::audit(|| h.kv.iter().map(|(k, v)| (k.as_slice(), v.as_slice())), 100)
}

#[test]
fn a_cross_cell_transfer_is_debited_delivered_once_and_settled() {
    let (mut a, mut b) = (Harness::new(), Harness::new());
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    b.apply(open(2, "CNY"));
    let sent = a.apply(cross("x1", 1, 2, 300));
    assert_eq!(sent.code, ResultCode::Ok as i32);
    assert_eq!(sent.settlement, Settlement::InTransit as i32);
    assert_eq!(a.balance(1), Some(700));
    a.assert_conserved();
    let outbox = pending(&a);
    assert_eq!(outbox.len(), 1);
    // Delivered twice (a courier's retry): applied once.
    let first = b.apply(credit_of(&outbox[0]));
    let again = b.apply(credit_of(&outbox[0]));
    assert_eq!((first.code, first.duplicate), (ResultCode::Ok as i32, false));
    assert_eq!((again.code, again.duplicate), (ResultCode::Ok as i32, true));
    assert_eq!(b.balance(2), Some(300));
    b.assert_conserved();
    // Settled twice (a new leader's retry): once.
    assert_eq!(a.code(settle(outbox[0].seq, ResultCode::Ok, 42)), ResultCode::Ok);
    assert!(a.apply(settle(outbox[0].seq, ResultCode::Ok, 42)).duplicate);
    assert!(pending(&a).is_empty());
    let record = read_transfer(&a.kv, b"x1").unwrap();
    assert_eq!(record.settlement, Settlement::Credited as i32);
    assert_eq!(record.credited_at_ms, 42);
    // The clearing accounts mirror each other and match the totals.
    let (audit_a, audit_b) = (audit_of(&a), audit_of(&b));
    assert!(audit_a.mismatches.is_empty() && audit_b.mismatches.is_empty(), "{audit_a:?} {audit_b:?}");
    assert_eq!(audit_a.positions[0].balance, "300");
    assert_eq!(audit_b.positions[0].balance, "-300");
    // A retry of the send answers the original, now credited.
    let retry = a.apply(cross("x1", 1, 2, 300));
    assert!(retry.duplicate);
    assert_eq!(retry.settlement, Settlement::Credited as i32);
}

#[test]
fn a_refused_credit_is_refunded_once_and_shows_in_the_history() {
    let (mut a, mut b) = (Harness::new(), Harness::new());
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    a.apply(cross("x1", 1, 99, 250));
    let entry = pending(&a).pop().unwrap();
    let refused = b.apply(credit_of(&entry));
    assert_eq!(refused.code, ResultCode::AccountNotFound as i32);
    // The refusal is recorded: redelivery gets the same answer.
    let again = b.apply(credit_of(&entry));
    assert_eq!((again.code, again.duplicate), (ResultCode::AccountNotFound as i32, true));
    // A transient answer settles nothing.
    assert_eq!(a.code(settle(entry.seq, ResultCode::CellNotWritable, 0)), ResultCode::InvalidItem);
    assert_eq!(pending(&a).len(), 1);
    assert_eq!(a.code(settle(entry.seq, ResultCode::AccountNotFound, 0)), ResultCode::Ok);
    assert!(a.apply(settle(entry.seq, ResultCode::AccountNotFound, 0)).duplicate);
    assert_eq!(a.balance(1), Some(1_000));
    let record = read_transfer(&a.kv, b"x1").unwrap();
    assert_eq!(record.settlement, Settlement::Refunded as i32);
    assert_eq!(record.refund_reason, ResultCode::AccountNotFound as i32);
    // The sender's history: deposit, debit, refund.
    let user = AccountId::user(1, Currency::parse("CNY").unwrap());
    let history: Vec<(i64, TransferRecord)> =
        a.kv.iter()
            .filter(|(k, _)| k.starts_with(&user.history_prefix()))
            .map(|(_, v)| {
                let (delta, key) = parse_history(v).unwrap();
                (delta, read_record(&a.kv, key).unwrap())
            })
            .collect();
    let kinds: Vec<(i64, i32)> = history.iter().map(|(d, r)| (*d, r.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (1_000, TransferKind::Deposit as i32),
            (-250, TransferKind::Transfer as i32),
            (250, TransferKind::Refund as i32)
        ]
    );
    assert!(audit_of(&a).mismatches.is_empty());
    assert_eq!(audit_of(&a).positions[0].balance, "0");
    a.assert_conserved();
}

fn credit_with(entry: &cellbank_proto::cell::OutboxEntry, change: impl FnOnce(&mut CreditCommand)) -> Command {
    let mut credit = entry.credit.clone().unwrap();
    change(&mut credit);
    Command { kind: Some(command::Kind::Credit(credit)) }
}

#[test]
fn an_outbox_entry_names_the_epoch_and_index_that_created_it() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    let sent = a.apply(cross("x1", 1, 2, 300));
    let credit = pending(&a).pop().unwrap().credit.unwrap();
    assert_eq!((credit.created_epoch, credit.created_index), (0, sent.applied_index));
    assert_eq!(audit_of(&a).outbox[0].created_index, sent.applied_index);
}

#[test]
fn a_credit_from_a_deposed_sender_is_refused_and_records_nothing() {
    let (mut a, mut b) = (Harness::new(), Harness::new());
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    b.apply(open(2, "CNY"));
    a.apply(cross("x1", 1, 2, 300));
    a.apply(cross("x2", 1, 2, 200));
    let outbox = pending(&a);
    let current = b.apply(credit_with(&outbox[0], |c| c.sender_epoch = 2));
    assert_eq!(current.code, ResultCode::Ok as i32);
    let stale = b.apply(credit_with(&outbox[1], |c| c.sender_epoch = 1));
    assert_eq!((stale.code, stale.field.as_str()), (ResultCode::StaleSender as i32, "sender_epoch"));
    assert_eq!(b.balance(2), Some(300), "the stale sender's credit moved no money");
    let later = b.apply(credit_with(&outbox[1], |c| c.sender_epoch = 3));
    assert_eq!(later.code, ResultCode::Ok as i32, "a later sender is taken");
    assert_eq!(b.balance(2), Some(500));
    b.assert_conserved();
}

#[test]
fn a_forked_seq_is_refused_and_one_payment_under_two_seqs_is_credited_once() {
    let (mut a, mut b) = (Harness::new(), Harness::new());
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    b.apply(open(2, "CNY"));
    a.apply(cross("x1", 1, 2, 300));
    let entry = pending(&a).pop().unwrap();
    assert_eq!(b.apply(credit_of(&entry)).code, ResultCode::Ok as i32);
    // The same seq from another history (an old active's unshipped tail).
    let forked = b.apply(credit_with(&entry, |c| c.created_epoch += 1));
    assert_eq!((forked.code, forked.field.as_str()), (ResultCode::IdReusedWithDifferentFields as i32, "created_epoch"));
    // The same seq with another payment.
    let other = b.apply(credit_with(&entry, |c| c.transfer_id = b"x9".to_vec()));
    assert_eq!((other.code, other.field.as_str()), (ResultCode::IdReusedWithDifferentFields as i32, "seq"));
    // The same payment under another seq (recreated after a fork): the
    // first one's answer, no second credit.
    let again = b.apply(credit_with(&entry, |c| {
        c.seq += 7;
        c.created_epoch += 1;
    }));
    assert_eq!((again.code, again.duplicate), (ResultCode::Ok as i32, true));
    // ... unless its amount differs.
    let changed = b.apply(credit_with(&entry, |c| {
        c.seq += 8;
        c.amount += 1;
    }));
    assert_eq!((changed.code, changed.field.as_str()), (ResultCode::IdReusedWithDifferentFields as i32, "transfer_id"));
    assert_eq!(b.balance(2), Some(300));
    b.assert_conserved();
    assert!(audit_of(&b).mismatches.is_empty());
}

#[test]
fn the_source_holds_the_debit_of_each_credit_it_sent_and_no_other() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    a.apply(cross("x1", 1, 2, 300));
    a.apply(cross("x2", 1, 3, 200));
    let outbox = pending(&a);
    let as_inbox = |entry: &cellbank_proto::cell::OutboxEntry| {
        let c = entry.credit.clone().unwrap();
        cellbank_proto::cell::InboxCredit {
            seq: c.seq,
            created_epoch: c.created_epoch,
            created_index: c.created_index,
            kind: c.kind,
            transfer_id: c.transfer_id,
            to_user_id: c.to_user_id,
            currency: c.currency,
            amount: c.amount,
        }
    };
    let first = as_inbox(&outbox[0]);
    assert!(clearing::holds_debit(&a.kv, &first));
    // Made up: another amount, recipient, or an id the source never debited.
    assert!(!clearing::holds_debit(&a.kv, &cellbank_proto::cell::InboxCredit { amount: 301, ..first.clone() }));
    assert!(!clearing::holds_debit(&a.kv, &cellbank_proto::cell::InboxCredit { to_user_id: 9, ..first.clone() }));
    assert!(!clearing::holds_debit(
        &a.kv,
        &cellbank_proto::cell::InboxCredit { transfer_id: b"never".to_vec(), ..first.clone() }
    ));
    // Settled as credited: still held. Refunded: no credit may exist.
    a.apply(settle(outbox[0].seq, ResultCode::Ok, 5));
    assert!(clearing::holds_debit(&a.kv, &first));
    let second = as_inbox(&outbox[1]);
    a.apply(settle(outbox[1].seq, ResultCode::AccountNotFound, 5));
    assert!(!clearing::holds_debit(&a.kv, &second));
}

fn send_envelope(id: &str, sender: u64, total: u64, shares: u32, split: EnvelopeSplit, expires_at: u64) -> Command {
    Command {
        kind: Some(command::Kind::SendEnvelope(cellbank_proto::cell::SendEnvelopeCommand {
            transfer_id: id.as_bytes().to_vec(),
            sender_user_id: sender,
            currency: "CNY".into(),
            total,
            shares,
            split: split as i32,
            expires_at_ms: expires_at,
        })),
    }
}

fn grab_cmd(envelope: &str, user: u64, grabber_pair: u64) -> Command {
    Command {
        kind: Some(command::Kind::Grab(cellbank_proto::cell::GrabCommand {
            envelope_id: envelope.into(),
            user_id: user,
            envelope_pair_id: CELL_A,
            grabber_pair_id: grabber_pair,
            forbid_own: true,
        })),
    }
}

const NOW: u64 = 1_700_000_000_000;

impl Harness {
    fn apply_at(&mut self, command: Command, timestamp_ms: u64) -> TransferResult {
        self.index += 1;
        self.ledger.apply_command(&mut self.kv, self.index, timestamp_ms, &command)
    }
}

use cellbank_proto::v1::{EnvelopeSplit, Settlement, TransferRecord};

#[test]
fn envelope_shares_are_deterministic_at_least_one_unit_and_sum_to_the_total() {
    for (total, shares, split) in [
        (10_000u64, 10_000u32, EnvelopeSplit::Random),
        (1_000_003, 7, EnvelopeSplit::Even),
        (88_888, 100, EnvelopeSplit::Random),
    ] {
        let mut envelope = cellbank_proto::v1::Envelope {
            envelope_id: format!("7.e-{total}"),
            total,
            shares,
            split: split as i32,
            remaining: total,
            ..Default::default()
        };
        let mut seen = Vec::new();
        while envelope.shares_grabbed < envelope.shares {
            let share = envelope::next_share(&envelope);
            assert!(share >= 1 && share <= envelope.remaining);
            envelope.remaining -= share;
            envelope.shares_grabbed += 1;
            seen.push(share);
        }
        assert_eq!(seen.iter().sum::<u64>(), total);
        assert_eq!(envelope.remaining, 0);
        if split == EnvelopeSplit::Even {
            assert!(seen.iter().max().unwrap() - seen.iter().min().unwrap() <= 1);
        }
    }
}

proptest! {
    #[test]
    fn random_splits_always_conserve(total in 1u64..=1_000_000_000_000, shares in 1u32..=500, seed in any::<u64>()) {
        let shares = shares.min(total as u32).max(1);
        let mut envelope = cellbank_proto::v1::Envelope {
            envelope_id: format!("{}.s{seed}", seed % 1000 + 1),
            total,
            shares,
            split: EnvelopeSplit::Random as i32,
            remaining: total,
            ..Default::default()
        };
        let mut sum = 0u64;
        while envelope.shares_grabbed < envelope.shares {
            let share = envelope::next_share(&envelope);
            prop_assert!(share >= 1);
            sum += share;
            envelope.remaining -= share;
            envelope.shares_grabbed += 1;
        }
        prop_assert_eq!(sum, total);
    }
}

#[test]
fn grabs_give_one_share_per_user_and_expiry_returns_the_rest_once() {
    let mut a = Harness::new();
    for user in 1..=4 {
        a.apply(open(user, "CNY"));
    }
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    let expires = NOW + 60_000;
    assert_eq!(
        a.apply_at(send_envelope("e1", 1, 900, 3, EnvelopeSplit::Random, expires), NOW).code,
        ResultCode::Ok as i32
    );
    let id = envelope::envelope_id(1, b"e1");
    assert_eq!(a.balance(1), Some(100));
    let first = a.apply_at(grab_cmd(&id, 2, CELL_A), NOW + 1);
    assert_eq!(first.code, ResultCode::Ok as i32);
    let twice = a.apply_at(grab_cmd(&id, 2, CELL_A), NOW + 2);
    assert_eq!((twice.code, twice.amount), (ResultCode::AlreadyGrabbed as i32, first.amount));
    assert_eq!(a.apply_at(grab_cmd(&id, 1, CELL_A), NOW + 2).code, ResultCode::OwnEnvelope as i32);
    assert_eq!(a.apply_at(grab_cmd(&id, 77, CELL_A), NOW + 2).code, ResultCode::AccountNotFound as i32);
    assert_eq!(a.apply_at(grab_cmd("1.nope", 3, CELL_A), NOW + 2).code, ResultCode::EnvelopeNotFound as i32);
    // A cross-cell grabber: the share goes to the clearing account and the outbox.
    let remote = a.apply_at(grab_cmd(&id, 500, CELL_B), NOW + 3);
    assert_eq!((remote.code, remote.settlement), (ResultCode::Ok as i32, Settlement::InTransit as i32));
    assert_eq!(pending(&a).len(), 1);
    // Expiry: refused before its time, then the rest goes back once.
    let early = a.apply_at(
        Command { kind: Some(command::Kind::Expire(cellbank_proto::cell::ExpireCommand { envelope_id: id.clone() })) },
        expires - 1,
    );
    assert_eq!(early.code, ResultCode::InvalidItem as i32);
    assert_eq!(a.apply_at(grab_cmd(&id, 3, CELL_A), expires).code, ResultCode::EnvelopeExpired as i32);
    let expire =
        Command { kind: Some(command::Kind::Expire(cellbank_proto::cell::ExpireCommand { envelope_id: id.clone() })) };
    let refund = a.apply_at(expire.clone(), expires + 5);
    assert_eq!(refund.code, ResultCode::Ok as i32);
    assert_eq!(refund.amount, 900 - first.amount - remote.amount);
    assert_eq!(a.apply_at(expire, expires + 6).code, ResultCode::EnvelopeExpired as i32);
    assert_eq!(a.balance(1), Some(100 + i128::from(refund.amount)));
    let state = envelope::read_envelope(&a.kv, &id).unwrap();
    assert_eq!(state.state, cellbank_proto::v1::EnvelopeState::Expired as i32);
    assert_eq!(first.amount + remote.amount + state.refunded, state.total);
    assert!(audit_of(&a).mismatches.is_empty(), "{:?}", audit_of(&a).mismatches);
    a.assert_conserved();
}

#[test]
fn envelope_bad_input_moves_no_money() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    let before = a.kv.clone();
    let cases = [
        (send_envelope("b1", 1, 10, 0, EnvelopeSplit::Random, NOW + 1000), "shares"),
        (send_envelope("b2", 1, 10, 11, EnvelopeSplit::Random, NOW + 1000), "shares"),
        (send_envelope("b3", 1, 0, 1, EnvelopeSplit::Random, NOW + 1000), "total"),
        (send_envelope("b4", 1, 10, 2, EnvelopeSplit::Random, NOW - 1), "expires_at_ms"),
        (send_envelope("b5", 1, 10, 2, EnvelopeSplit::Random, NOW + 8 * 24 * 3600 * 1000), "expires_at_ms"),
    ];
    for (command, field) in cases {
        let result = a.apply_at(command, NOW);
        assert_eq!((result.code, result.field.as_str()), (ResultCode::InvalidItem as i32, field));
    }
    assert_eq!(a.kv, before, "refused sends change nothing");
    assert_eq!(
        a.apply_at(send_envelope("b6", 1, 5_000, 2, EnvelopeSplit::Random, NOW + 1000), NOW).code,
        ResultCode::InsufficientFunds as i32
    );
}

#[test]
fn audit_names_an_account_changed_behind_the_state_machine() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply(open(2, "CNY"));
    a.apply(deposit("d1", 1, 1_000));
    a.apply(transfer("t1", 1, 2, 400));
    assert!(audit_of(&a).mismatches.is_empty());
    let id = AccountId::user(2, Currency::parse("CNY").unwrap());
    let mut account = Account::decode(&a.kv[&id.key()]).unwrap();
    account.balance += 5;
    a.kv.insert(id.key(), account.encode().to_vec());
    let audit = audit_of(&a);
    assert_eq!(audit.mismatches.len(), 1);
    assert_eq!(audit.mismatches[0].account, "user 2 CNY");
    assert_eq!((audit.mismatches[0].balance.as_str(), audit.mismatches[0].expected.as_str()), ("405", "400"));
    assert_eq!(audit.balance_sum_by_currency["CNY"], "5");
}

#[test]
fn a_send_retried_after_its_expiry_gets_the_recorded_answer() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    let send = send_envelope("late", 1, 500, 5, EnvelopeSplit::Even, NOW + 1_000);
    assert_eq!(a.apply_at(send.clone(), NOW).code, ResultCode::Ok as i32);
    let retry = a.apply_at(send, NOW + 5_000);
    assert_eq!((retry.code, retry.duplicate), (ResultCode::Ok as i32, true));
    assert_eq!(a.balance(1), Some(500), "debited once");
}

#[test]
fn a_grab_naming_one_pair_only_is_refused() {
    let mut a = Harness::new();
    a.apply(open(1, "CNY"));
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    a.apply_at(send_envelope("e", 1, 500, 5, EnvelopeSplit::Even, NOW + 60_000), NOW);
    let half = Command {
        kind: Some(command::Kind::Grab(cellbank_proto::cell::GrabCommand {
            envelope_id: envelope::envelope_id(1, b"e"),
            user_id: 2,
            envelope_pair_id: 0,
            grabber_pair_id: CELL_B,
            forbid_own: false,
        })),
    };
    let before = a.kv.clone();
    let result = a.apply_at(half, NOW + 1);
    assert_eq!((result.code, result.field.as_str()), (ResultCode::InvalidItem as i32, "grabber_pair_id"));
    assert_eq!(a.kv, before);
}

#[test]
fn an_emptied_envelope_refuses_further_grabs_and_moves_nothing() {
    let mut a = Harness::new();
    for user in 1..=4 {
        a.apply(open(user, "CNY"));
    }
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    a.apply_at(send_envelope("e", 1, 7, 2, EnvelopeSplit::Even, NOW + 60_000), NOW);
    let id = envelope::envelope_id(1, b"e");
    assert_eq!(a.apply_at(grab_cmd(&id, 2, CELL_A), NOW + 1).amount, 4);
    assert_eq!(a.apply_at(grab_cmd(&id, 3, CELL_A), NOW + 2).amount, 3);
    let before = a.kv.clone();
    assert_eq!(a.apply_at(grab_cmd(&id, 4, CELL_A), NOW + 3).code, ResultCode::EnvelopeEmpty as i32);
    assert_eq!(a.kv, before);
    let state = envelope::read_envelope(&a.kv, &id).unwrap();
    assert_eq!(state.state, cellbank_proto::v1::EnvelopeState::Emptied as i32);
    assert!(audit_of(&a).mismatches.is_empty());
}

#[test]
fn time_never_goes_back_across_leaders_whose_clocks_differ() {
    let mut a = Harness::new();
    for user in 1..=3 {
        a.apply(open(user, "CNY"));
    }
    a.apply_at(deposit("d1", 1, 1_000), NOW);
    a.apply_at(send_envelope("e", 1, 100, 5, EnvelopeSplit::Even, NOW + 1_000), NOW);
    let id = envelope::envelope_id(1, b"e");
    // A leader whose clock is ahead applies something after the expiry...
    a.apply_at(deposit("d2", 2, 1), NOW + 2_000);
    // ...and the next leader's clock is behind: the envelope stays expired.
    assert_eq!(a.apply_at(grab_cmd(&id, 3, CELL_A), NOW + 10).code, ResultCode::EnvelopeExpired as i32);
    let expire =
        Command { kind: Some(command::Kind::Expire(cellbank_proto::cell::ExpireCommand { envelope_id: id.clone() })) };
    assert_eq!(a.apply_at(expire, NOW + 20).code, ResultCode::Ok as i32);
    assert_eq!(a.balance(1), Some(1_000));
}

fn active_at(epoch: u64) -> Command {
    Command {
        kind: Some(command::Kind::Configure(cellbank_proto::cell::ConfigureCommand {
            state: Some(cellbank_proto::cell::PairState {
                epoch,
                role: cellbank_proto::cell::PairRole::Active as i32,
                mode: cellbank_proto::cell::ReplicationMode::Async as i32,
                standby_cell_id: 9,
                ..Default::default()
            }),
            source_state: None,
            force_rebuild: false,
        })),
    }
}

/// Found by the simulator (seeds 1439, 1535 and 1681 of the sweep with
/// operator actions): after a forced failover of a DEGRADED pair the
/// promoted cell numbered its credits from its copy's counter, reusing the
/// seqs of the old active's lost tail that the destination had already
/// credited; the destination refused each reuse as a forked history, and
/// those credits never settled. Each epoch now numbers from its own range.
#[test]
fn each_epoch_numbers_its_credits_from_its_own_range() {
    let (mut old, mut promoted, mut dest) = (Harness::new(), Harness::new(), Harness::new());
    for (h, epoch) in [(&mut old, 1), (&mut promoted, 2)] {
        h.apply(open(1, "CNY"));
        h.apply(deposit("d1", 1, 1_000));
        assert_eq!(h.code(active_at(epoch)), ResultCode::Ok);
    }
    dest.apply(open(2, "CNY"));
    // The old active's tail (lost with it) and the promoted cell's first
    // credit: same counter, different epochs.
    old.apply(cross("lost", 1, 2, 300));
    promoted.apply(cross("new", 1, 2, 200));
    let (lost, new) = (pending(&old).pop().unwrap(), pending(&promoted).pop().unwrap());
    assert_eq!(lost.seq, clearing::first_seq_of_epoch(1));
    assert_eq!(new.seq, clearing::first_seq_of_epoch(2));
    assert_eq!(dest.apply(credit_of(&lost)).code, ResultCode::Ok as i32);
    let taken = dest.apply(credit_of(&new));
    assert_eq!((taken.code, taken.duplicate), (ResultCode::Ok as i32, false), "{taken:?}");
    assert_eq!(dest.balance(2), Some(500));
    // Within an epoch the seqs count on.
    promoted.apply(cross("next", 1, 2, 100));
    let seqs: Vec<u64> = pending(&promoted).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![new.seq, new.seq + 1]);
    // An unpaired cell counts from 1.
    assert_eq!(clearing::first_seq_of_epoch(0), 1);
}

/// Mutation fuzzing of what a replica applies from network bytes: valid
/// command batches of every kind (moves, cross-cell credits and settlements,
/// envelopes, pair configuration, shipped entries and snapshot chunks,
/// deposition) are mutated byte-wise (flips, interesting values, inserts,
/// deletions, duplicated and spliced ranges, truncation), and whatever
/// still decodes is checked the way the services check it before
/// proposing, then applied, to a plain ledger and to a standby. The
/// property: nothing panics, and while no snapshot chunk has replaced the
/// state, money is conserved after every command.
///
/// `CELLBANK_FUZZ_CASES` (default 200,000) and `CELLBANK_FUZZ_SEED`.
#[test]
fn mutated_command_batches_never_panic_and_conserve_money() {
    use rand::{Rng, SeedableRng};
    let cases: u64 = std::env::var("CELLBANK_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let seed: u64 = std::env::var("CELLBANK_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("mutated command batches: {cases} cases, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (corpus, chunk_index) = fuzz_corpus();
    let batch = |commands: Vec<Command>| CommandBatch { timestamp_ms: NOW, commands }.encode_to_vec();
    let corpus: Vec<Vec<u8>> = corpus.into_iter().map(batch).collect();
    let (mut decoded, mut applied_ok) = (0u64, 0u64);
    let mut harness = fuzz_harness(false, chunk_index);
    let mut tainted = false;
    for case in 0..cases {
        if case % 200 == 0 {
            let standby = rng.gen_bool(0.5);
            harness = fuzz_harness(standby, chunk_index);
            tainted = standby;
        }
        let mut bytes = corpus[rng.gen_range(0..corpus.len())].clone();
        let mutations = if rng.gen_bool(0.7) { 1 } else { rng.gen_range(2..5) };
        for _ in 0..mutations {
            mutate(&mut rng, &mut bytes, &corpus);
        }
        let Ok(batch) = CommandBatch::decode(bytes.as_slice()) else { continue };
        decoded += 1;
        for command in batch.commands {
            // What the standby service checks before proposing.
            match &command.kind {
                Some(command::Kind::SourceEntries(e)) if check_source_entries(e).is_err() => continue,
                Some(command::Kind::SourceSnapshot(c)) if check_source_snapshot(c).is_err() => continue,
                _ => {}
            }
            let is_chunk = matches!(command.kind, Some(command::Kind::SourceSnapshot(_)));
            let shown = format!("{command:?}");
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                harness.index += 1;
                harness.ledger.apply_command(&mut harness.kv, harness.index, batch.timestamp_ms, &command)
            }));
            let result = outcome.unwrap_or_else(|_| panic!("case {case} (seed {seed}) panicked on {shown}"));
            if result.code == ResultCode::Ok as i32 {
                applied_ok += 1;
                tainted |= is_chunk;
            }
            if !tainted {
                harness.assert_conserved();
            }
        }
    }
    println!("{cases} mutated batches: {decoded} decoded, {applied_ok} commands applied; no panic");
    assert!(decoded > cases / 10 && applied_ok > 0, "the mutations must reach apply");
}

/// Valid commands of every kind, and the source index a shipped snapshot
/// chunk in them leaves a standby at.
fn fuzz_corpus() -> (Vec<Vec<Command>>, u64) {
    let mut source = Harness::new();
    for user in 1..=4 {
        source.apply(open(user, "CNY"));
        source.apply(deposit(&format!("d{user}"), user, 1_000_000));
    }
    source.apply(cross("x1", 1, 3, 500));
    source.apply(send_envelope("env-1", 2, 1_000, 4, EnvelopeSplit::Random, NOW + 60_000));
    source.apply(grab_cmd("env-1", 3, CELL_A));
    let outbox = pending(&source);
    let keys: Vec<Vec<u8>> = source.kv.keys().filter(|k| k.as_slice() < pair::LEDGER_END).cloned().collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|k| source.kv[k].clone()).collect();
    let snapshot_index = source.index;
    let chunk = cellbank_proto::cell::SourceSnapshotChunk {
        source_cell_id: CELL_A,
        epoch: 2,
        snapshot_index,
        chunk: 0,
        keys,
        values,
        last: true,
        source_state: Some(PairState { epoch: 2, role: PairRole::Active as i32, ..Default::default() }),
        checksum: 0,
    };
    let shipped = |commands: Vec<Command>| CommandBatch { timestamp_ms: NOW, commands }.encode_to_vec();
    let entries = SourceEntries {
        source_cell_id: CELL_A,
        epoch: 2,
        first_index: snapshot_index + 1,
        entries: vec![shipped(vec![transfer("s1", 1, 2, 7), deposit("s2", 4, 9)]), Vec::new()],
        checksum: 0,
    };
    let expire = Command {
        kind: Some(command::Kind::Expire(cellbank_proto::cell::ExpireCommand { envelope_id: "env-1".into() })),
    };
    let depose = Command { kind: Some(command::Kind::Depose(cellbank_proto::cell::DeposeCommand { by_epoch: 3 })) };
    let corpus = vec![
        vec![
            open(5, "USD"),
            deposit("c1", 1, 10),
            transfer("c2", 1, 2, 5),
            movement("c3", TransferKind::Withdraw, 2, 0, "CNY", 1),
        ],
        vec![cross("c4", 1, 3, 20), cross("c5", 2, 4, u64::MAX)],
        outbox.iter().map(credit_of).collect(),
        vec![
            settle(outbox.first().map_or(1, |e| e.seq), ResultCode::Ok, NOW),
            settle(7, ResultCode::AccountNotFound, NOW),
        ],
        vec![send_envelope("env-2", 1, 100, 3, EnvelopeSplit::Even, NOW + 1_000), grab_cmd("env-2", 2, CELL_B), expire],
        vec![active_at(3)],
        vec![standby_of(CELL_A, 2)],
        vec![Command { kind: Some(command::Kind::SourceEntries(entries)) }],
        vec![Command { kind: Some(command::Kind::SourceSnapshot(chunk)) }],
        vec![depose],
    ];
    (corpus, snapshot_index)
}

fn standby_of(source_cell_id: u64, epoch: u64) -> Command {
    Command {
        kind: Some(command::Kind::Configure(cellbank_proto::cell::ConfigureCommand {
            state: Some(PairState { epoch, role: PairRole::Standby as i32, source_cell_id, ..Default::default() }),
            source_state: None,
            force_rebuild: false,
        })),
    }
}

/// A ledger with four funded users; or a standby of cell A that holds A's
/// snapshot at `snapshot_index`.
fn fuzz_harness(standby: bool, snapshot_index: u64) -> Harness {
    let mut h = Harness::new();
    if standby {
        assert_eq!(h.apply(standby_of(CELL_A, 2)).code, ResultCode::Ok as i32);
        let (corpus, _) = fuzz_corpus();
        let chunk = corpus.into_iter().flatten().find(|c| matches!(c.kind, Some(command::Kind::SourceSnapshot(_))));
        let result = h.apply(chunk.expect("a chunk in the corpus"));
        assert_eq!(result.code, ResultCode::Ok as i32, "{result:?}");
        assert_eq!(h.ledger.pair(&h.kv, pair::Slot::Own).source_index, snapshot_index);
    } else {
        for user in 1..=4 {
            h.apply(open(user, "CNY"));
            h.apply(deposit(&format!("f{user}"), user, 1_000_000));
        }
    }
    h
}

fn mutate(rng: &mut impl rand::Rng, bytes: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let at =
        |rng: &mut dyn rand::RngCore, len: usize| if len == 0 { 0 } else { (rng.next_u64() % len as u64) as usize };
    let len = bytes.len();
    match rng.gen_range(0..8) {
        0 if len > 0 => {
            let i = at(rng, len);
            bytes[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = at(rng, len);
            bytes[i] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.gen_range(0..5)];
        }
        2 => {
            let i = at(rng, len + 1);
            bytes.insert(i, rng.gen());
        }
        3 if len > 0 => {
            let i = at(rng, len);
            let n = rng.gen_range(1..=8).min(len - i);
            bytes.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = at(rng, len);
            let n = rng.gen_range(1..=16).min(len - i);
            let piece: Vec<u8> = bytes[i..i + n].to_vec();
            let j = at(rng, len + 1);
            bytes.splice(j..j, piece);
        }
        5 => {
            let other = &corpus[rng.gen_range(0..corpus.len())];
            let i = at(rng, other.len());
            let n = rng.gen_range(1..=32).min(other.len() - i);
            let j = at(rng, len + 1);
            bytes.splice(j..j, other[i..i + n].iter().copied());
        }
        6 if len > 0 => bytes.truncate(at(rng, len)),
        _ if len >= 8 => {
            // A varint-sized field overwritten with an extreme value.
            let i = at(rng, len - 7);
            let value: u64 = [u64::MAX, u64::MAX / 2, 1 << 32, 0][rng.gen_range(0..4)];
            bytes[i..i + 8].copy_from_slice(&value.to_le_bytes());
        }
        _ => bytes.push(rng.gen()),
    }
}

/// A Raft snapshot's pairs: ledger records checked family by family, the
/// pair states decoded (every start reads them), nothing else allowed.
#[test]
fn a_snapshot_pair_must_be_a_valid_ledger_record_or_pair_state() {
    use cellbank_raft::StateMachine;
    let account = AccountId::user(3, Currency::parse("CNY").unwrap());
    let stored = Account { balance: 10, version: 1 }.encode();
    assert!(Ledger::check_snapshot_pair(&account.key(), &stored).is_ok());
    assert!(Ledger::check_snapshot_pair(&account.key(), &stored[..5]).is_err());
    let state = pair::unpaired();
    assert!(Ledger::check_snapshot_pair(pair::OWN_PAIR_KEY, &state.encode_to_vec()).is_ok());
    assert!(Ledger::check_snapshot_pair(pair::SOURCE_PAIR_KEY, &[0xff, 0xff, 0xff]).is_err());
    assert!(Ledger::check_snapshot_pair(&[STATE_PREFIX, b'z', b'q'], b"").is_err());
}

// ---- Slices moving between pairs ----

const SLICES: u32 = 4;

fn slice_cmd(kind: command::Kind) -> Command {
    Command { kind: Some(kind) }
}

/// Users of `slice` (of [`SLICES`]) and of other slices, among 1..=200.
fn users_of(slice: u32, n: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for user in 1..=200u64 {
        if cellbank_client::slices::slice_of(user, SLICES) == slice {
            inside.push(user);
        } else {
            outside.push(user);
        }
    }
    inside.truncate(n);
    outside.truncate(n);
    (inside, outside)
}

/// What the source's export carries, built from its memory the way
/// `service::moves::export` builds it from a RocksDB view: the slice's
/// accounts and histories, the transfer records its users routed, the
/// other records its histories name (moved apart), and the move's credits.
fn export_of(h: &Harness, move_id: u64, slice: u32, from_pair: u64) -> cellbank_proto::cell::SliceInCommand {
    let of_slice = |user: u64| cellbank_client::slices::slice_of(user, SLICES) == slice;
    let user = |key: &[u8], family: u8| {
        key[1] == family
            && key[2] == AccountKind::User as u8
            && of_slice(u64::from_be_bytes(key[3..11].try_into().unwrap()))
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> =
        h.kv.iter().filter(|(k, _)| user(k, b'a')).map(|(k, v)| (k.clone(), v.clone())).collect();
    let transfers: Vec<(Vec<u8>, Vec<u8>)> =
        h.kv.iter()
            .filter(|(k, v)| {
                k[1] == b't'
                    && {
                        let r = read_record(&h.kv, k).unwrap();
                        of_slice(if r.kind == TransferKind::Deposit as i32 { r.to_user_id } else { r.from_user_id })
                    }
                    && !v.is_empty()
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    for (key, value) in h.kv.iter().filter(|(k, _)| user(k, b'h')) {
        let (delta, record) = parse_history(value).unwrap();
        if transfers.iter().any(|(k, _)| k.as_slice() == record) {
            pairs.push((key.clone(), value.clone()));
        } else {
            let moved = keys::moved(from_pair, record);
            pairs.push((moved.clone(), h.kv[record].clone()));
            pairs.push((key.clone(), history_value(delta, &moved)));
            if let Some(inbox) = keys::carried(record) {
                let credit = read_record(&h.kv, record).unwrap();
                let source = u64::from_be_bytes(record[2..10].try_into().unwrap());
                let business = keys::credit_business(source, credit.kind, credit.to_user_id, &credit.transfer_id);
                pairs.push((inbox, h.kv[record].clone()));
                pairs.push((keys::carried(&business).unwrap(), record[10..18].to_vec()));
            }
        }
    }
    pairs.extend(transfers);
    let credits =
        pending(h).into_iter().filter_map(|e| e.credit).filter(|c| c.kind == TransferKind::SliceMove as i32).collect();
    let (keys, values) = pairs.into_iter().unzip();
    cellbank_proto::cell::SliceInCommand {
        move_id,
        slice,
        slice_count: SLICES,
        from_pair_id: from_pair,
        keys,
        values,
        credits,
    }
}

fn no_mismatch(h: &Harness) {
    let audit = audit_of(h);
    assert!(audit.mismatches.is_empty(), "{:#?}", audit.mismatches);
    h.assert_conserved();
}

#[test]
fn a_slice_moves_with_its_money_records_and_answers() {
    use cellbank_proto::cell::{FreezeSliceCommand, SliceAccount, SliceOutCommand, ThawSliceCommand};
    let (mut a, mut b) = (Harness::new(), Harness::new());
    let slice = 1;
    let (inside, outside) = users_of(slice, 3);
    for user in inside.iter().chain(&outside) {
        a.apply(open(*user, "CNY"));
        a.apply(deposit(&format!("d{user}"), *user, 1_000));
    }
    let (s1, s2, o1) = (inside[0], inside[1], outside[0]);
    assert_eq!(a.code(transfer("local", o1, s1, 10)), ResultCode::Ok);
    assert_eq!(a.code(transfer("broke", s2, o1, 1_000_000)), ResultCode::InsufficientFunds);
    // A credit from pair 3 to a user of the slice.
    let from_c = CreditCommand {
        source_pair_id: 3,
        seq: 9,
        transfer_id: b"far".to_vec(),
        kind: TransferKind::Transfer as i32,
        from_user_id: 77,
        to_user_id: s2,
        currency: "CNY".into(),
        amount: 5,
        dest_pair_id: CELL_A,
        created_epoch: 1,
        ..Default::default()
    };
    assert_eq!(a.code(slice_cmd(command::Kind::Credit(from_c.clone()))), ResultCode::Ok);
    let freeze = FreezeSliceCommand { move_id: 7, slice, slice_count: SLICES, to_pair_id: CELL_B };

    // Frozen: the slice's users take no writes; others do; credits wait.
    assert_eq!(a.code(slice_cmd(command::Kind::FreezeSlice(freeze))), ResultCode::Ok);
    assert!(a.apply(slice_cmd(command::Kind::FreezeSlice(freeze))).duplicate);
    let before = a.kv.clone();
    for refused in [deposit("late", s1, 1), transfer("late2", o1, s1, 1), transfer("late3", s1, o1, 1), open(s1, "USD")]
    {
        let answer = a.apply(refused);
        assert_eq!(answer.code, ResultCode::SliceMoving as i32, "{}", answer.detail);
        assert_eq!(answer.moved_to_pair_id, 0);
    }
    let waiting = CreditCommand { seq: 10, transfer_id: b"far2".to_vec(), ..from_c.clone() };
    assert_eq!(a.code(slice_cmd(command::Kind::Credit(waiting.clone()))), ResultCode::SliceMoving);
    assert_eq!(a.kv, before, "nothing refused was recorded");
    // A redelivery of a credit applied before the freeze gets its answer.
    let again = a.apply(slice_cmd(command::Kind::Credit(from_c.clone())));
    assert!(again.duplicate && again.code == ResultCode::Ok as i32);
    assert_eq!(a.code(transfer("other", o1, outside[1], 1)), ResultCode::Ok);

    // Out: every balance leaves through the clearing account of pair 2.
    let accounts: Vec<SliceAccount> =
        inside.iter().map(|u| SliceAccount { user_id: *u, currency: "CNY".into() }).collect();
    let out = SliceOutCommand { move_id: 7, slice, source_pair_id: CELL_A, accounts: accounts.clone() };
    let wrong = SliceOutCommand { accounts: vec![SliceAccount { user_id: o1, currency: "CNY".into() }], ..out.clone() };
    assert_eq!(a.code(slice_cmd(command::Kind::SliceOut(wrong))), ResultCode::InvalidItem);
    let held: i128 = inside.iter().map(|u| a.balance(*u).unwrap()).sum();
    assert_eq!(a.code(slice_cmd(command::Kind::SliceOut(out.clone()))), ResultCode::Ok);
    assert!(a.apply(slice_cmd(command::Kind::SliceOut(out))).duplicate, "out once");
    assert!(inside.iter().all(|u| a.balance(*u) == Some(0)));
    no_mismatch(&a);
    let gone = a.apply(slice_cmd(command::Kind::Credit(waiting.clone())));
    assert_eq!((gone.code, gone.moved_to_pair_id), (ResultCode::SliceMoving as i32, CELL_B));
    let thaw = a.apply(slice_cmd(command::Kind::ThawSlice(ThawSliceCommand { move_id: 7, slice })));
    assert_eq!(thaw.code, ResultCode::InvalidItem as i32, "no thaw once the money left");
    let credits: i128 = pending(&a).iter().map(|e| e.credit.as_ref().unwrap().amount as i128).sum();
    assert_eq!(credits, held);

    // In: one command; the balances arrive through the clearing account of
    // pair 1; the slice's answers come with it.
    let import = export_of(&a, 7, slice, CELL_A);
    let mut stray = import.clone();
    stray.keys.push(AccountId::user(o1, Currency::parse("CNY").unwrap()).key());
    stray.values.push(Account::default().encode().to_vec());
    let before = b.kv.clone();
    assert_eq!(b.code(slice_cmd(command::Kind::SliceIn(stray))), ResultCode::InvalidItem);
    assert_eq!(b.kv, before, "a refused import writes nothing");
    assert_eq!(b.code(slice_cmd(command::Kind::SliceIn(import.clone()))), ResultCode::Ok);
    assert!(b.apply(slice_cmd(command::Kind::SliceIn(import.clone()))).duplicate, "in once");
    let arrived: i128 = inside.iter().map(|u| b.balance(*u).unwrap()).sum();
    assert_eq!(arrived, held);
    assert_eq!(b.balance(s1), Some(1_010));
    assert_eq!(b.balance(s2), Some(1_005));
    no_mismatch(&b);
    // A retry of a failed transfer of the slice answers as first recorded.
    let retry = b.apply(transfer("broke", s2, o1, 1_000_000));
    assert!(retry.duplicate && retry.code == ResultCode::InsufficientFunds as i32);
    // The source's courier delivers the same credits: answered from the inbox.
    for entry in pending(&a) {
        let answer = b.apply(credit_of(&entry));
        assert!(answer.duplicate && answer.code == ResultCode::Ok as i32, "{}", answer.detail);
        assert_eq!(a.code(settle(entry.seq, ResultCode::Ok, 5)), ResultCode::Ok);
    }
    assert!(pending(&a).is_empty());
    no_mismatch(&a);
    // A late delivery of a credit the old pair applied: its recorded
    // answer, no money (under its seq, or under another one).
    let late = b.apply(slice_cmd(command::Kind::Credit(from_c.clone())));
    assert!(late.duplicate && late.code == ResultCode::Ok as i32, "{}", late.detail);
    let forked = b.apply(slice_cmd(command::Kind::Credit(CreditCommand { seq: 11, ..from_c.clone() })));
    assert!(forked.duplicate && forked.code == ResultCode::Ok as i32, "{}", forked.detail);
    assert_eq!(b.balance(s2), Some(1_005));
    no_mismatch(&b);
    // The new pair serves the slice.
    assert_eq!(b.code(transfer("after", s1, s2, 3)), ResultCode::Ok);
    // A SLICE_MOVE credit through the courier never applies on its own.
    let forged = CreditCommand {
        seq: 99,
        kind: TransferKind::SliceMove as i32,
        transfer_id: b"slice-move/8/CNY/1".to_vec(),
        ..from_c
    };
    assert_eq!(b.code(slice_cmd(command::Kind::Credit(forged))), ResultCode::SliceMoving);
}

#[test]
fn a_credit_to_a_moved_slice_is_redirected_by_its_source() {
    let mut c = Harness::new();
    c.apply(open(1, "CNY"));
    c.apply(deposit("d1", 1, 1_000));
    assert_eq!(c.apply(cross("x1", 1, 2, 300)).code, ResultCode::Ok as i32);
    let entry = pending(&c).pop().unwrap();
    let redirect = |to: u64| {
        slice_cmd(command::Kind::Redirect(cellbank_proto::cell::RedirectCommand {
            seq: entry.seq,
            from_pair_id: CELL_B,
            to_pair_id: to,
        }))
    };
    assert_eq!(c.code(redirect(CELL_B)), ResultCode::InvalidItem);
    assert_eq!(c.code(redirect(5)), ResultCode::Ok);
    assert!(c.apply(redirect(6)).duplicate, "redirected once");
    let moved = pending(&c).pop().unwrap();
    assert_eq!(moved.credit.as_ref().unwrap().dest_pair_id, 5);
    no_mismatch(&c);
    let positions = audit_of(&c).positions;
    let of = |peer: u64| positions.iter().find(|p| p.peer_pair_id == peer).cloned().unwrap();
    assert_eq!((of(CELL_B).sent.as_str(), of(CELL_B).refunded.as_str()), ("300", "300"));
    assert_eq!(of(5).sent, "300");
    // Settled by pair 5's answer; nothing is left in transit.
    assert_eq!(c.code(settle(entry.seq, ResultCode::Ok, 9)), ResultCode::Ok);
    assert!(pending(&c).is_empty());
    no_mismatch(&c);
}

#[test]
fn a_step_of_an_older_move_never_applies() {
    use cellbank_proto::cell::{FreezeSliceCommand, SliceInCommand, ThawSliceCommand};
    let mut h = Harness::new();
    let freeze = |move_id| {
        slice_cmd(command::Kind::FreezeSlice(FreezeSliceCommand {
            move_id,
            slice: 1,
            slice_count: SLICES,
            to_pair_id: 2,
        }))
    };
    let thaw = |move_id| slice_cmd(command::Kind::ThawSlice(ThawSliceCommand { move_id, slice: 1 }));
    let import = |move_id| {
        slice_cmd(command::Kind::SliceIn(SliceInCommand {
            move_id,
            slice: 1,
            slice_count: SLICES,
            from_pair_id: 3,
            ..Default::default()
        }))
    };
    assert_eq!(h.code(freeze(3)), ResultCode::Ok);
    assert_eq!(h.code(thaw(3)), ResultCode::Ok);
    // A late freeze of the move that was rolled back: refused.
    let late = h.apply(freeze(3));
    assert_eq!(late.code, ResultCode::InvalidItem as i32);
    assert!(late.detail.contains("stale"), "{}", late.detail);
    assert_eq!(h.code(freeze(4)), ResultCode::Ok);
    assert_eq!(h.code(thaw(4)), ResultCode::Ok);
    // An import of an older move: refused; of a newer one: taken, once.
    assert_eq!(h.code(import(2)), ResultCode::InvalidItem);
    assert_eq!(h.code(import(5)), ResultCode::Ok);
    assert!(h.apply(import(5)).duplicate);
    assert_eq!(h.code(freeze(4)), ResultCode::InvalidItem);
    assert_eq!(h.code(import(4)), ResultCode::InvalidItem);
    // A thaw of an older move changes nothing.
    let before = h.kv.clone();
    assert!(h.apply(thaw(3)).duplicate);
    assert_eq!(h.kv, before);
}
