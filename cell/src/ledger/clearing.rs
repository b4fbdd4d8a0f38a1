//! Money between cells: the outbox of the sending cell and the inbox of the
//! receiving one (docs/design.md, section 5.5).
//!
//! - Sending debits the sender into the clearing account for the
//!   destination pair and records an outbox entry, in one command
//!   ([`Ledger::enqueue_credit`] runs inside that command's apply).
//! - A credit's identity names its history: the epoch and the source's log
//!   index of the command that created it travel with it and are kept next
//!   to the destination's record.
//! - The destination applies a credit once per (source pair, seq) and once
//!   per business key (source pair, kind, recipient, transfer id): from its
//!   clearing account for the source to the recipient. A refused credit is
//!   recorded as refused, so a redelivery gets the same answer. A seq first
//!   delivered with other fields or from another history (epoch) is refused
//!   as ID_REUSED_WITH_DIFFERENT_FIELDS and stays pending at its source,
//!   where reconciliation shows it.
//! - The destination refuses credits from a sender older than the newest
//!   epoch it has taken credits from for that source pair (STALE_SENDER:
//!   nothing recorded, never settles).
//! - The source settles the entry with the destination's answer: credited,
//!   or refunded to the sender by a compensating movement.
//!
//! Invariants: per peer and currency, the clearing account's balance equals
//! sent − refunded − received (the position totals); an outbox entry is
//! settled at most once; every command moves money between two accounts of
//! this cell, so each cell's balances sum to zero on their own.

use cellbank_proto::cell::{CreditCommand, OutboxEntry, SettleCommand};
use cellbank_proto::v1::{ResultCode, Settlement, TransferKind, TransferRecord, TransferResult};
use cellbank_proto::ShortName;
use prost::Message;

use super::{inconsistent, keys, read_record, rejection, result, validate, AccountId, Currency, Ledger};
use cellbank_raft::Kv;

/// Clearing totals with one peer in one currency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub sent: u128,
    pub refunded: u128,
    pub received: u128,
}

impl Position {
    pub fn decode(value: &[u8]) -> Position {
        let [sent, refunded, received] =
            keys::u128s::<3>(value).unwrap_or_else(|| panic!("corrupt clearing position {value:02x?}"));
        Position { sent, refunded, received }
    }

    pub fn encode(&self) -> Vec<u8> {
        keys::encode_u128s(&[self.sent, self.refunded, self.received])
    }

    /// What the clearing account must hold.
    pub fn expected_balance(&self) -> i128 {
        self.sent as i128 - self.refunded as i128 - self.received as i128
    }
}

fn read_position(kv: &dyn Kv, peer: u64, currency: Currency) -> Position {
    kv.get(&keys::position(peer, currency)).map(|v| Position::decode(&v)).unwrap_or_default()
}

pub(super) fn update_position(kv: &mut dyn Kv, peer: u64, currency: Currency, change: impl FnOnce(&mut Position)) {
    let mut position = read_position(kv, peer, currency);
    change(&mut position);
    kv.put(&keys::position(peer, currency), &position.encode());
}

pub fn read_outbox_seq(kv: &dyn Kv) -> u64 {
    kv.get(keys::OUTBOX_SEQ)
        .map(|v| u64::from_be_bytes(v.as_slice().try_into().expect("outbox seq is 8 bytes")))
        .unwrap_or(0)
}

pub fn read_outbox(kv: &dyn Kv, seq: u64) -> Option<OutboxEntry> {
    kv.get(&keys::outbox(seq))
        .map(|v| OutboxEntry::decode(v.as_slice()).unwrap_or_else(|e| panic!("corrupt outbox entry {seq}: {e}")))
}

/// Checks the fields of a credit (the courier's and the destination's).
pub fn validate_credit(credit: &CreditCommand) -> Result<Currency, validate::Invalid> {
    let invalid = |field: &'static str, detail: &str| validate::Invalid { field, detail: detail.into() };
    if credit.source_pair_id == 0 || credit.dest_pair_id == 0 || credit.source_pair_id == credit.dest_pair_id {
        return Err(invalid("source_pair_id", "a credit goes between two different pairs"));
    }
    if credit.seq == 0 {
        return Err(invalid("seq", "must be set"));
    }
    let kind = TransferKind::try_from(credit.kind).unwrap_or(TransferKind::Unspecified);
    if kind != TransferKind::Transfer && kind != TransferKind::EnvelopeGrab && kind != TransferKind::SliceMove {
        return Err(invalid("kind", "a credit comes from a TRANSFER, an ENVELOPE_GRAB or a SLICE_MOVE"));
    }
    if credit.transfer_id.is_empty() || credit.transfer_id.len() > CREDIT_ID_BYTES_MAX {
        return Err(invalid("transfer_id", "must be 1 to 255 bytes (a transfer id or an envelope id)"));
    }
    validate::user_id("to_user_id", credit.to_user_id)?;
    validate::amount(credit.amount)?;
    validate::currency(&credit.currency)
}

/// Longest id a credit carries (a transfer id, or an envelope id for a grab).
pub const CREDIT_ID_BYTES_MAX: usize = 255;

/// The newest sender epoch this cell took credits from for `source_pair_id` (0: none).
pub fn read_sender_epoch(kv: &dyn Kv, source_pair_id: u64) -> u64 {
    kv.get(&keys::sender_epoch(source_pair_id))
        .map(|v| u64::from_be_bytes(v.as_slice().try_into().expect("a sender epoch is 8 bytes")))
        .unwrap_or(0)
}

/// (created_epoch, created_index) of a credit received under (pair, seq).
pub fn read_inbox_origin(kv: &dyn Kv, source_pair_id: u64, seq: u64) -> Option<(u64, u64)> {
    kv.get(&keys::inbox_origin(source_pair_id, seq)).map(|v| {
        let epoch = u64::from_be_bytes(v[..8].try_into().expect("an inbox origin is 16 bytes"));
        let index = u64::from_be_bytes(v[8..16].try_into().expect("an inbox origin is 16 bytes"));
        (epoch, index)
    })
}

/// Outbox seqs of epoch `e` start at `e << SEQ_EPOCH_SHIFT`: 4 billion
/// credits per epoch before a range runs into the next, and 4 billion
/// epochs (an unpaired cell, epoch 0, counts from 1). Epochs stay far below
/// 2^32: each is a failover or switchover.
pub const SEQ_EPOCH_SHIFT: u32 = 32;

/// The first outbox seq a cell uses at `epoch`.
pub fn first_seq_of_epoch(epoch: u64) -> u64 {
    (epoch << SEQ_EPOCH_SHIFT) + 1
}

/// The destination answers that settle an outbox entry: credited, or
/// refused for good (which refunds the sender). Anything else (a refusal
/// to serve, a malformed credit) leaves the entry pending.
pub fn settles(code: ResultCode) -> bool {
    matches!(code, ResultCode::Ok | ResultCode::AccountNotFound | ResultCode::BalanceOverflow)
}

impl Ledger {
    /// Records an outbox entry for a credit whose money the caller has just
    /// moved into the clearing account for `credit.dest_pair_id`.
    ///
    /// The entry's identity names its history: this cell's epoch and the
    /// log index `index` of the command (on a standby replaying its source:
    /// the source's epoch and index, so both hold the same entry).
    pub(super) fn enqueue_credit(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        mut credit: CreditCommand,
        record_key: Vec<u8>,
        refund_user_id: u64,
    ) {
        let slot = self.applying_slot.expect("an outbox entry is created inside a command's apply");
        let epoch = self.pair_epoch(kv, slot);
        // Each epoch numbers its credits from its own range: a cell promoted
        // by a forced failover never reuses a seq that its predecessor's
        // lost tail already delivered (the destination would refuse the
        // reuse as a forked history, and that credit would never settle).
        let seq = (read_outbox_seq(kv) + 1).max(first_seq_of_epoch(epoch));
        kv.put(keys::OUTBOX_SEQ, &seq.to_be_bytes());
        credit.seq = seq;
        credit.created_epoch = epoch;
        credit.created_index = index;
        credit.sender_epoch = 0;
        let currency = Currency::parse(&credit.currency).expect("validated before the debit");
        let amount = u128::from(credit.amount);
        update_position(kv, credit.dest_pair_id, currency, |p| p.sent += amount);
        let entry = OutboxEntry { seq, credit: Some(credit), created_at_ms: timestamp_ms, record_key, refund_user_id };
        kv.put(&keys::outbox(seq), &entry.encode_to_vec());
    }

    /// The destination's side: applies a delivered credit exactly once.
    pub(super) fn apply_credit(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        credit: &CreditCommand,
    ) -> TransferResult {
        self.apply_credit_of(kv, index, timestamp_ms, credit, false)
    }

    /// [`Ledger::apply_credit`]; `importing`: inside a slice's import,
    /// the only place a SLICE_MOVE credit applies.
    pub(super) fn apply_credit_of(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        credit: &CreditCommand,
        importing: bool,
    ) -> TransferResult {
        let currency = match validate_credit(credit) {
            Ok(currency) => currency,
            Err(invalid) => return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index),
        };
        let newest_sender = read_sender_epoch(kv, credit.source_pair_id);
        let checked = !cellbank_raft::mutation::active(cellbank_raft::mutation::Mutation::NoSenderEpoch);
        if checked && credit.sender_epoch < newest_sender {
            let detail = format!(
                "pair {} sent credits at epoch {newest_sender}; a sender at epoch {} was deposed",
                credit.source_pair_id, credit.sender_epoch
            );
            return rejection(ResultCode::StaleSender, "sender_epoch", detail, index);
        }
        let key = keys::inbox(credit.source_pair_id, credit.seq);
        let business =
            keys::credit_business(credit.source_pair_id, credit.kind, credit.to_user_id, &credit.transfer_id);
        // Records a slice brought from its old pair (`keys::carried`): only
        // a cell with slice marks can hold any, so no other looks for them.
        let carries = !self.marks(kv).slices.is_empty();
        let carried_key = keys::carried(&key).expect("an inbox key");
        let carried_business = keys::carried(&business).expect("a business key");
        // A credit this cell never applied (here, or for a slice that moved
        // in, at its old pair), for a slice that is moving or has moved, or
        // one carrying a slice's balance (which applies only with its
        // import), is refused before anything is written.
        let refusal = if importing {
            None
        } else if credit.kind == TransferKind::SliceMove as i32 {
            let detail = format!("credit {} moves a slice: it applies with the slice's import", credit.seq);
            Some(rejection(ResultCode::SliceMoving, "kind", detail, index))
        } else {
            self.slice_refusal(kv, credit.to_user_id, index)
        };
        if let Some(refusal) = refusal {
            let applied_before = kv.get(&key).is_some()
                || kv.get(&business).is_some()
                || (carries && (kv.get(&carried_key).is_some() || kv.get(&carried_business).is_some()));
            if !applied_before {
                return refusal;
            }
        }
        if credit.sender_epoch > newest_sender {
            kv.put(&keys::sender_epoch(credit.source_pair_id), &credit.sender_epoch.to_be_bytes());
        }
        if let Some(recorded) =
            read_record(kv, &key).or_else(|| carries.then(|| read_record(kv, &carried_key)).flatten())
        {
            if recorded.transfer_id != credit.transfer_id
                || recorded.amount != credit.amount
                || recorded.to_user_id != credit.to_user_id
                || recorded.currency != credit.currency
                || recorded.kind != credit.kind
            {
                let detail = format!(
                    "credit {} from pair {} was first delivered with other fields",
                    credit.seq, credit.source_pair_id
                );
                return rejection(ResultCode::IdReusedWithDifferentFields, "seq", detail, index);
            }
            let origin = read_inbox_origin(kv, credit.source_pair_id, credit.seq);
            if origin.is_some_and(|(epoch, _)| epoch != credit.created_epoch) {
                let (epoch, created_index) = origin.expect("checked");
                let detail = format!(
                    "credit {} from pair {} was first delivered from another history (created at epoch {epoch}, \
                     index {created_index}; this one at epoch {}, index {})",
                    credit.seq, credit.source_pair_id, credit.created_epoch, credit.created_index
                );
                return rejection(ResultCode::IdReusedWithDifferentFields, "created_epoch", detail, index);
            }
            return recorded_answer(&recorded);
        }
        let first = match kv.get(&business) {
            Some(seq) => Some((seq, false)),
            None if carries => kv.get(&carried_business).map(|seq| (seq, true)),
            None => None,
        };
        if let Some((first_seq, carried)) = first {
            // The same payment under another seq (a forked history, or a
            // sender that recreated it): the first one's answer, no money.
            let first_seq = u64::from_be_bytes(first_seq.as_slice().try_into().expect("a business key holds a seq"));
            let inbox = keys::inbox(credit.source_pair_id, first_seq);
            let first_key = if carried { keys::carried(&inbox).expect("an inbox key") } else { inbox };
            let Some(recorded) = read_record(kv, &first_key) else {
                return inconsistent(format!("a business key names credit {first_seq}, which is missing"), index);
            };
            if recorded.amount != credit.amount || recorded.currency != credit.currency {
                let detail = format!(
                    "transfer {} to user {} was first credited as seq {first_seq} with another amount or currency",
                    String::from_utf8_lossy(&credit.transfer_id),
                    credit.to_user_id
                );
                return rejection(ResultCode::IdReusedWithDifferentFields, "transfer_id", detail, index);
            }
            return recorded_answer(&recorded);
        }
        let debit = AccountId::clearing(credit.source_pair_id, currency);
        let recipient = AccountId::user(credit.to_user_id, currency);
        let (code, detail) = self.post(kv, &debit, &recipient, credit.amount, &key);
        let settlement = if code == ResultCode::Ok {
            let amount = u128::from(credit.amount);
            update_position(kv, credit.source_pair_id, currency, |p| p.received += amount);
            let bucket = keys::bucket(credit.source_pair_id, currency, timestamp_ms / 60_000);
            let [sum, count] = kv.get(&bucket).and_then(|v| keys::u128s::<2>(&v)).unwrap_or_default();
            kv.put(&bucket, &keys::encode_u128s(&[sum + amount, count + 1]));
            Settlement::Credited
        } else {
            Settlement::Unspecified
        };
        let record = TransferRecord {
            transfer_id_text: String::new(),
            transfer_id: credit.transfer_id.clone(),
            kind: credit.kind,
            from_user_id: credit.from_user_id,
            to_user_id: credit.to_user_id,
            currency: credit.currency.clone(),
            amount: credit.amount,
            result: code as i32,
            applied_index: index,
            timestamp_ms,
            settlement: settlement as i32,
            credited_at_ms: timestamp_ms,
            refund_reason: 0,
        };
        kv.put(&key, &record.encode_to_vec());
        let mut origin = credit.created_epoch.to_be_bytes().to_vec();
        origin.extend_from_slice(&credit.created_index.to_be_bytes());
        kv.put(&keys::inbox_origin(credit.source_pair_id, credit.seq), &origin);
        kv.put(&business, &credit.seq.to_be_bytes());
        let mut answer = rejection(code, "", detail, index);
        answer.settlement = settlement as i32;
        answer.timestamp_ms = timestamp_ms;
        answer
    }
}

/// True when this cell holds the debit of `credit` (a credit another
/// cell received from this cell's pair): the transfer or grab it names,
/// applied, to that recipient, of that amount and currency, and not
/// refunded. Reconciliation asks it of every credit a destination applied:
/// a credit without its debit is money made from nothing.
pub fn holds_debit(kv: &dyn Kv, credit: &cellbank_proto::cell::InboxCredit) -> bool {
    let record = match TransferKind::try_from(credit.kind) {
        Ok(TransferKind::Transfer) => read_record(kv, &super::transfer_key(&credit.transfer_id)),
        Ok(TransferKind::SliceMove) => read_record(kv, &keys::slice_move(credit.to_user_id, &credit.transfer_id)),
        Ok(TransferKind::EnvelopeGrab) => {
            let Ok(envelope_id) = std::str::from_utf8(&credit.transfer_id) else { return false };
            kv.get(&keys::grabber(envelope_id, credit.to_user_id))
                .and_then(|share| share.as_slice().try_into().ok().map(u32::from_be_bytes))
                .and_then(|share| read_record(kv, &keys::grab(envelope_id, share)))
        }
        _ => None,
    };
    record.is_some_and(|r| {
        r.result == ResultCode::Ok as i32
            && r.to_user_id == credit.to_user_id
            && r.amount == credit.amount
            && r.currency == credit.currency
            && (r.settlement == Settlement::InTransit as i32 || r.settlement == Settlement::Credited as i32)
    })
}

/// The recorded answer to a credit delivered again.
fn recorded_answer(recorded: &TransferRecord) -> TransferResult {
    TransferResult {
        code: recorded.result,
        applied_index: recorded.applied_index,
        duplicate: true,
        settlement: recorded.settlement,
        timestamp_ms: recorded.credited_at_ms,
        ..Default::default()
    }
}

impl Ledger {
    /// The source's side: the destination answered outbox entry `seq`.
    pub(super) fn apply_settle(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        settle: &SettleCommand,
    ) -> TransferResult {
        let Some(entry) = read_outbox(kv, settle.seq) else {
            // Settled before (a courier's retry after a leader change).
            return TransferResult {
                code: ResultCode::Ok as i32,
                applied_index: index,
                duplicate: true,
                ..Default::default()
            };
        };
        let credit = entry.credit.clone().expect("an outbox entry holds its credit");
        let currency = Currency::parse(&credit.currency).expect("outbox currencies were validated");
        let Some(mut record) = read_record(kv, &entry.record_key) else {
            return inconsistent(format!("outbox entry {} names a missing record", settle.seq), index);
        };
        let code = ResultCode::try_from(settle.code).unwrap_or(ResultCode::Unspecified);
        if !settles(code) {
            let detail = format!("{} is not a final answer to a credit", code.short_name());
            return rejection(ResultCode::InvalidItem, "code", detail, index);
        }
        if code == ResultCode::Ok {
            record.settlement = Settlement::Credited as i32;
            record.credited_at_ms = settle.credited_at_ms;
        } else {
            // Never into a slice that left (its money went with it); a
            // frozen one takes its refunds, which is how it drains.
            let gone = super::slices::mark_of_user(self.marks(kv), entry.refund_user_id)
                .is_some_and(|m| m.mark == cellbank_proto::cell::SliceMark::Gone as i32);
            if gone {
                let detail = format!("user {}'s slice moved to another pair", entry.refund_user_id);
                return rejection(ResultCode::SliceMoving, "refund_user_id", detail, index);
            }
            let refund_key = keys::refund(settle.seq);
            let clearing = AccountId::clearing(credit.dest_pair_id, currency);
            let sender = AccountId::user(entry.refund_user_id, currency);
            let (refunded, detail) = self.post(kv, &clearing, &sender, credit.amount, &refund_key);
            if refunded != ResultCode::Ok {
                // The entry stays pending; the courier asks again later.
                return rejection(refunded, "refund_user_id", format!("the refund could not apply: {detail}"), index);
            }
            let amount = u128::from(credit.amount);
            update_position(kv, credit.dest_pair_id, currency, |p| p.refunded += amount);
            let refund = TransferRecord {
                transfer_id_text: String::new(),
                transfer_id: credit.transfer_id.clone(),
                kind: TransferKind::Refund as i32,
                from_user_id: credit.to_user_id,
                to_user_id: entry.refund_user_id,
                currency: credit.currency.clone(),
                amount: credit.amount,
                result: ResultCode::Ok as i32,
                applied_index: index,
                timestamp_ms,
                settlement: Settlement::Local as i32,
                credited_at_ms: 0,
                refund_reason: code as i32,
            };
            kv.put(&refund_key, &refund.encode_to_vec());
            record.settlement = Settlement::Refunded as i32;
            record.refund_reason = code as i32;
        }
        kv.put(&entry.record_key, &record.encode_to_vec());
        kv.delete(&keys::outbox(settle.seq));
        let mut answer = result(ResultCode::Ok, index);
        answer.settlement = record.settlement;
        answer
    }
}
