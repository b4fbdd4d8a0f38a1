//! Red envelopes: the sender's total moves into the cell's escrow account;
//! grabs take shares from it in order; expiry returns the rest.
//!
//! Invariants, kept by every apply:
//! - Shares are a pure function of the envelope (its id seeds the random
//!   split) and of how many were grabbed before, so every replica and the
//!   standby compute the same shares. Each share is at least one minor unit
//!   and the shares sum exactly to the total.
//! - A user holds at most one share of an envelope.
//! - grabbed shares + refund at expiry = total; per currency, the escrow
//!   account holds exactly the `remaining` of the open envelopes.
//! - Expiry is decided by the entry's timestamp (the proposer's clock), never
//!   by a replica's own clock: a grab in an entry stamped at or after the
//!   expiry is refused, and the expire command applies only from then on.

use cellbank_proto::cell::{CreditCommand, ExpireCommand, GrabCommand, SendEnvelopeCommand};
use cellbank_proto::v1::{
    Envelope, EnvelopeSplit, EnvelopeState, ResultCode, Settlement, TransferKind, TransferRecord, TransferResult,
};
use prost::Message;
use sha2::{Digest, Sha256};

use super::{
    keys, read_record, read_transfer, recorded_answer, rejection, result, transfer_key, validate, AccountId, Currency,
    Ledger,
};
use cellbank_raft::Kv;

/// The id of the envelope a send creates: `<sender_user_id>.<transfer_id>`.
/// The sender's id routes it to the sender's cell.
pub fn envelope_id(sender_user_id: u64, transfer_id: &[u8]) -> String {
    format!("{sender_user_id}.{}", String::from_utf8_lossy(transfer_id))
}

fn seed(envelope_id: &str) -> u64 {
    let digest = Sha256::digest(envelope_id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A splitmix64 step: a well-mixed, portable function of its input.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The next share of an open envelope with shares left.
pub fn next_share(envelope: &Envelope) -> u64 {
    let left = u64::from(envelope.shares - envelope.shares_grabbed);
    let remaining = envelope.remaining;
    assert!(left >= 1 && remaining >= left, "an open envelope holds a unit per share left");
    if left == 1 {
        return remaining;
    }
    match EnvelopeSplit::try_from(envelope.split).unwrap_or(EnvelopeSplit::Random) {
        EnvelopeSplit::Even => {
            let position = u64::from(envelope.shares_grabbed);
            let shares = u64::from(envelope.shares);
            envelope.total / shares + u64::from(position < envelope.total % shares)
        }
        _ => {
            // At most twice the mean of what is left, and never so much
            // that a later share would get nothing.
            let cap = (remaining / left).saturating_mul(2).min(remaining - (left - 1)).max(1);
            1 + mix(seed(&envelope.envelope_id) ^ u64::from(envelope.shares_grabbed)) % cap
        }
    }
}

pub fn read_envelope(kv: &dyn Kv, envelope_id: &str) -> Option<Envelope> {
    kv.get(&keys::envelope(envelope_id))
        .map(|v| Envelope::decode(v.as_slice()).unwrap_or_else(|e| panic!("corrupt envelope {envelope_id}: {e}")))
}

fn write_envelope(kv: &mut dyn Kv, envelope: &Envelope) {
    kv.put(&keys::envelope(&envelope.envelope_id), &envelope.encode_to_vec());
}

fn state(envelope: &Envelope) -> EnvelopeState {
    EnvelopeState::try_from(envelope.state).unwrap_or(EnvelopeState::Unspecified)
}

impl Ledger {
    pub(super) fn send_envelope(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        send: &SendEnvelopeCommand,
    ) -> TransferResult {
        let currency = match validate::send_envelope_fields(send) {
            Ok(currency) => currency,
            Err(invalid) => return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index),
        };
        if let Some(refusal) = self.slice_refusal(kv, send.sender_user_id, index) {
            return refusal;
        }
        let id = envelope_id(send.sender_user_id, &send.transfer_id);
        // A retry is answered before the clock is looked at: the expiry it
        // names may have passed since the send.
        if let Some(recorded) = read_transfer(kv, &send.transfer_id) {
            let envelope = read_envelope(kv, &id);
            let field = if recorded.kind != TransferKind::EnvelopeSend as i32 {
                Some("kind")
            } else if recorded.from_user_id != send.sender_user_id {
                Some("sender_user_id")
            } else if recorded.currency != send.currency {
                Some("currency")
            } else if recorded.amount != send.total {
                Some("total")
            } else if envelope.as_ref().is_some_and(|e| e.shares != send.shares) {
                Some("shares")
            } else if envelope.as_ref().is_some_and(|e| e.split != send.split.max(1)) {
                Some("split")
            } else {
                None
            };
            return recorded_answer(&recorded, field, index);
        }
        if let Err(invalid) = validate::expiry(send.expires_at_ms, timestamp_ms) {
            return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index);
        }
        let record_key = transfer_key(&send.transfer_id);
        let sender = AccountId::user(send.sender_user_id, currency);
        let (code, detail) = self.post(kv, &sender, &AccountId::escrow(currency), send.total, &record_key);
        if code == ResultCode::Ok {
            let envelope = Envelope {
                envelope_id: id.clone(),
                sender_user_id: send.sender_user_id,
                currency: send.currency.clone(),
                total: send.total,
                shares: send.shares,
                split: send.split.max(1),
                state: EnvelopeState::Open as i32,
                shares_grabbed: 0,
                remaining: send.total,
                refunded: 0,
                created_at_ms: timestamp_ms,
                expires_at_ms: send.expires_at_ms,
            };
            write_envelope(kv, &envelope);
            kv.put(&keys::expiry(send.expires_at_ms, &id), &[]);
        }
        let record = TransferRecord {
            transfer_id: send.transfer_id.clone(),
            kind: TransferKind::EnvelopeSend as i32,
            from_user_id: send.sender_user_id,
            to_user_id: 0,
            currency: send.currency.clone(),
            amount: send.total,
            result: code as i32,
            applied_index: index,
            timestamp_ms,
            settlement: if code == ResultCode::Ok { Settlement::Local as i32 } else { 0 },
            ..Default::default()
        };
        kv.put(&record_key, &record.encode_to_vec());
        let mut answer = rejection(code, "", detail, index);
        answer.settlement = record.settlement;
        answer.timestamp_ms = timestamp_ms;
        answer
    }

    pub(super) fn grab(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        grab: &GrabCommand,
    ) -> TransferResult {
        let sender = match validate::grab(grab) {
            Ok(sender) => sender,
            Err(invalid) => return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index),
        };
        // The envelope lives with its sender's slice; a grabber of this
        // pair is credited here.
        let local = grab.grabber_pair_id == grab.envelope_pair_id;
        let users: &[u64] = if local { &[sender, grab.user_id] } else { &[sender] };
        if let Some(refusal) = self.slices_refusal(kv, users, index) {
            return refusal;
        }
        let Some(mut envelope) = read_envelope(kv, &grab.envelope_id) else {
            return rejection(ResultCode::EnvelopeNotFound, "envelope_id", "no such envelope".into(), index);
        };
        debug_assert_eq!(envelope.sender_user_id, sender);
        if grab.forbid_own && grab.user_id == envelope.sender_user_id {
            return rejection(
                ResultCode::OwnEnvelope,
                "user_id",
                "senders may not grab their own envelope".into(),
                index,
            );
        }
        if let Some(position) = kv.get(&keys::grabber(&grab.envelope_id, grab.user_id)) {
            let share_index = u32::from_be_bytes(position.as_slice().try_into().expect("share position is 4 bytes"));
            let Some(record) = read_record(kv, &keys::grab(&grab.envelope_id, share_index)) else {
                let why = format!("user {} holds share {share_index}, which has no record", grab.user_id);
                return super::inconsistent(why, index);
            };
            let mut answer = rejection(
                ResultCode::AlreadyGrabbed,
                "user_id",
                format!("user {} already holds share {share_index}", grab.user_id),
                index,
            );
            answer.amount = record.amount;
            answer.share_index = share_index;
            answer.duplicate = true;
            answer.settlement = record.settlement;
            return answer;
        }
        match state(&envelope) {
            EnvelopeState::Expired => {
                return rejection(ResultCode::EnvelopeExpired, "envelope_id", "the envelope expired".into(), index)
            }
            EnvelopeState::Emptied => {
                return rejection(ResultCode::EnvelopeEmpty, "envelope_id", "every share was grabbed".into(), index)
            }
            _ => {}
        }
        if timestamp_ms >= envelope.expires_at_ms {
            return rejection(ResultCode::EnvelopeExpired, "envelope_id", "the envelope expired".into(), index);
        }
        let currency = Currency::parse(&envelope.currency).expect("envelope currencies were validated");
        if local && self.account(kv, &AccountId::user(grab.user_id, currency)).is_none() {
            return rejection(
                ResultCode::AccountNotFound,
                "user_id",
                format!("user {} has no {} account", grab.user_id, envelope.currency),
                index,
            );
        }
        let amount = next_share(&envelope);
        let share_index = envelope.shares_grabbed + 1;
        let record_key = keys::grab(&grab.envelope_id, share_index);
        let credit = if local {
            AccountId::user(grab.user_id, currency)
        } else {
            AccountId::clearing(grab.grabber_pair_id, currency)
        };
        let (code, detail) = self.post(kv, &AccountId::escrow(currency), &credit, amount, &record_key);
        if code != ResultCode::Ok {
            return rejection(code, "user_id", detail, index);
        }
        envelope.shares_grabbed = share_index;
        envelope.remaining -= amount;
        if envelope.shares_grabbed == envelope.shares {
            assert_eq!(envelope.remaining, 0, "the last share takes what is left");
            envelope.state = EnvelopeState::Emptied as i32;
            kv.delete(&keys::expiry(envelope.expires_at_ms, &envelope.envelope_id));
        }
        write_envelope(kv, &envelope);
        kv.put(&keys::grabber(&grab.envelope_id, grab.user_id), &share_index.to_be_bytes());
        let settlement = if local { Settlement::Local } else { Settlement::InTransit };
        let record = TransferRecord {
            transfer_id: grab.envelope_id.as_bytes().to_vec(),
            kind: TransferKind::EnvelopeGrab as i32,
            from_user_id: envelope.sender_user_id,
            to_user_id: grab.user_id,
            currency: envelope.currency.clone(),
            amount,
            result: ResultCode::Ok as i32,
            applied_index: index,
            timestamp_ms,
            settlement: settlement as i32,
            ..Default::default()
        };
        kv.put(&record_key, &record.encode_to_vec());
        if !local {
            let credit = CreditCommand {
                source_pair_id: grab.envelope_pair_id,
                seq: 0,
                transfer_id: grab.envelope_id.as_bytes().to_vec(),
                kind: TransferKind::EnvelopeGrab as i32,
                from_user_id: envelope.sender_user_id,
                to_user_id: grab.user_id,
                currency: envelope.currency.clone(),
                amount,
                dest_pair_id: grab.grabber_pair_id,
                ..Default::default()
            };
            self.enqueue_credit(kv, index, timestamp_ms, credit, record_key, envelope.sender_user_id);
        }
        let mut answer = result(ResultCode::Ok, index);
        answer.amount = amount;
        answer.share_index = share_index;
        answer.settlement = settlement as i32;
        answer.timestamp_ms = timestamp_ms;
        answer
    }

    pub(super) fn expire(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        expire: &ExpireCommand,
    ) -> TransferResult {
        if let Err(invalid) = validate::envelope_id(&expire.envelope_id) {
            return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index);
        }
        let Some(mut envelope) = read_envelope(kv, &expire.envelope_id) else {
            return rejection(ResultCode::EnvelopeNotFound, "envelope_id", "no such envelope".into(), index);
        };
        if let Some(refusal) = self.slice_refusal(kv, envelope.sender_user_id, index) {
            return refusal;
        }
        match state(&envelope) {
            EnvelopeState::Expired => {
                return rejection(ResultCode::EnvelopeExpired, "", "expired before".into(), index)
            }
            EnvelopeState::Emptied => return rejection(ResultCode::EnvelopeEmpty, "", "nothing left".into(), index),
            _ => {}
        }
        if timestamp_ms < envelope.expires_at_ms {
            let detail = format!("expires at {}, the entry is stamped {timestamp_ms}", envelope.expires_at_ms);
            return rejection(ResultCode::InvalidItem, "envelope_id", detail, index);
        }
        let currency = Currency::parse(&envelope.currency).expect("envelope currencies were validated");
        let refund_key = keys::envelope_refund(&envelope.envelope_id);
        let sender = AccountId::user(envelope.sender_user_id, currency);
        let (code, detail) = self.post(kv, &AccountId::escrow(currency), &sender, envelope.remaining, &refund_key);
        if code != ResultCode::Ok {
            // The envelope stays open; the leader proposes the expiry again.
            return rejection(code, "", format!("the refund could not apply: {detail}"), index);
        }
        let record = TransferRecord {
            transfer_id: envelope.envelope_id.as_bytes().to_vec(),
            kind: TransferKind::EnvelopeRefund as i32,
            from_user_id: 0,
            to_user_id: envelope.sender_user_id,
            currency: envelope.currency.clone(),
            amount: envelope.remaining,
            result: ResultCode::Ok as i32,
            applied_index: index,
            timestamp_ms,
            settlement: Settlement::Local as i32,
            ..Default::default()
        };
        kv.put(&refund_key, &record.encode_to_vec());
        kv.delete(&keys::expiry(envelope.expires_at_ms, &envelope.envelope_id));
        envelope.refunded = envelope.remaining;
        envelope.remaining = 0;
        envelope.state = EnvelopeState::Expired as i32;
        write_envelope(kv, &envelope);
        let mut answer = result(ResultCode::Ok, index);
        answer.amount = envelope.refunded;
        answer
    }
}
