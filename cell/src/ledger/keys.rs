//! Keys of the ledger's records besides accounts (`'a'`), histories (`'h'`)
//! and transfers (`'t'`). Every key lies in the ledger region
//! `[0x04, 0x04 'z')`, so digests, snapshots and standby copies carry it.
//!
//! - `'k'` the ledger's clock (largest entry timestamp seen, ms).
//! - `'n'` the last outbox sequence number assigned.
//! - `'o' seq` a pending outbox entry (`OutboxEntry`), deleted once settled.
//! - `'f' seq` the refund record of a refused credit (`TransferRecord`).
//! - `'i' source_pair seq` a credit received (`TransferRecord`), applied or
//!   refused, exactly once per key.
//! - `'j' source_pair seq` the history of that credit: the epoch and the
//!   source's log index of the command that debited the sender (two u64).
//! - `'b' source_pair kind to_user len transfer_id` the business key of a
//!   credit received: the seq it came under (u64). A second credit with one
//!   business key is the first one's duplicate, under any seq.
//! - `'p' source_pair` the newest epoch of a sender this cell took credits
//!   from (u64); older senders are refused.
//! - `'c' peer currency` clearing totals with a peer: sent, refunded,
//!   received (three big-endian u128).
//! - `'s' peer currency minute` credits received from a peer in one minute
//!   of the receiving cell's clock: amount (u128) and count (u64).
//! - `'e' len id` an envelope (`cellbank.v1.Envelope`).
//! - `'g' len id share` a grab, by share position (`TransferRecord`).
//! - `'G' len id user` the share position a user holds (u32).
//! - `'r' len id` the refund record of an expired envelope.
//! - `'x' expires_at len id` an open envelope, by expiry.
//! - `'w'` the slices moving out of, gone from or moved into this cell
//!   (`SliceMarks`).
//! - `'v' user transfer_id` the record of a balance leaving with its slice
//!   (`TransferRecord`, kind SLICE_MOVE).
//! - `'I' source_pair seq`, `'B' …` the inbox records and business keys
//!   of credits a moved slice's users received at their old pair
//!   ([`carried`]).
//! - `'M' source_pair key` a record a moved slice brought from its old
//!   pair (the key it had there, without its prefix byte), kept apart from
//!   this cell's own records; the slice's histories name it.

use super::Currency;
use cellbank_raft::storage::STATE_PREFIX;

pub const CLOCK: &[u8] = &[STATE_PREFIX, b'k'];
pub const OUTBOX_SEQ: &[u8] = &[STATE_PREFIX, b'n'];
pub const OUTBOX_PREFIX: &[u8] = &[STATE_PREFIX, b'o'];
pub const INBOX_PREFIX: &[u8] = &[STATE_PREFIX, b'i'];
pub const POSITION_PREFIX: &[u8] = &[STATE_PREFIX, b'c'];
pub const BUCKET_PREFIX: &[u8] = &[STATE_PREFIX, b's'];
pub const ENVELOPE_PREFIX: &[u8] = &[STATE_PREFIX, b'e'];
pub const EXPIRY_PREFIX: &[u8] = &[STATE_PREFIX, b'x'];
pub const ACCOUNT_PREFIX: &[u8] = &[STATE_PREFIX, b'a'];
pub const HISTORY_PREFIX: &[u8] = &[STATE_PREFIX, b'h'];
pub const SLICE_MARKS: &[u8] = &[STATE_PREFIX, b'w'];
pub const MOVED_PREFIX: &[u8] = &[STATE_PREFIX, b'M'];
pub const TRANSFER_PREFIX: &[u8] = &[STATE_PREFIX, b't'];

/// The record of part of a user's balance leaving with its slice.
pub fn slice_move(user_id: u64, transfer_id: &[u8]) -> Vec<u8> {
    with(&[STATE_PREFIX, b'v'], &[&user_id.to_be_bytes(), transfer_id])
}

/// Where a record that came with a moved slice from `source_pair_id`
/// (under `key` there) is kept.
pub fn moved(source_pair_id: u64, key: &[u8]) -> Vec<u8> {
    with(MOVED_PREFIX, &[&source_pair_id.to_be_bytes(), key.get(1..).unwrap_or_default()])
}

/// Where a pair that took in a slice keeps the inbox record (`'i'`) or the
/// business key (`'b'`) of a credit its old pair applied to one of the
/// slice's users (the same key, family `'I'` or `'B'`): a late delivery of
/// that credit gets its recorded answer here too, and the inbox's own sums
/// (what this pair credited) leave them out.
pub fn carried(key: &[u8]) -> Option<Vec<u8>> {
    let family = match key.get(1)? {
        b'i' => b'I',
        b'b' => b'B',
        _ => return None,
    };
    let mut carried = key.to_vec();
    carried[1] = family;
    Some(carried)
}

/// The sender of the envelope an envelope record (`'e'`, `'g'`, `'G'`,
/// `'r'`) belongs to: ids are `<sender>.<transfer id>`.
pub fn envelope_sender_of_key(key: &[u8]) -> Option<u64> {
    let rest = key.get(2..)?;
    let len = *rest.first()? as usize;
    let id = std::str::from_utf8(rest.get(1..1 + len)?).ok()?;
    id.split_once('.')?.0.parse().ok()
}

fn with(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    key.extend_from_slice(prefix);
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// An envelope id with its length first, so that one id is never a prefix
/// of another's keys.
fn id_part(envelope_id: &str) -> Vec<u8> {
    let bytes = envelope_id.as_bytes();
    let mut part = Vec::with_capacity(1 + bytes.len());
    part.push(u8::try_from(bytes.len()).expect("envelope ids are validated to fit"));
    part.extend_from_slice(bytes);
    part
}

pub fn outbox(seq: u64) -> Vec<u8> {
    with(OUTBOX_PREFIX, &[&seq.to_be_bytes()])
}

pub fn refund(seq: u64) -> Vec<u8> {
    with(&[STATE_PREFIX, b'f'], &[&seq.to_be_bytes()])
}

pub fn inbox(source_pair_id: u64, seq: u64) -> Vec<u8> {
    with(INBOX_PREFIX, &[&source_pair_id.to_be_bytes(), &seq.to_be_bytes()])
}

pub fn inbox_prefix(source_pair_id: u64) -> Vec<u8> {
    with(INBOX_PREFIX, &[&source_pair_id.to_be_bytes()])
}

pub fn inbox_origin(source_pair_id: u64, seq: u64) -> Vec<u8> {
    with(&[STATE_PREFIX, b'j'], &[&source_pair_id.to_be_bytes(), &seq.to_be_bytes()])
}

/// The business key of a credit: who sent what to whom under which id.
pub fn credit_business(source_pair_id: u64, kind: i32, to_user_id: u64, transfer_id: &[u8]) -> Vec<u8> {
    let kind = u8::try_from(kind).expect("credit kinds are validated");
    let len = u8::try_from(transfer_id.len()).expect("transfer ids are validated to fit");
    with(
        &[STATE_PREFIX, b'b'],
        &[&source_pair_id.to_be_bytes(), &[kind], &to_user_id.to_be_bytes(), &[len], transfer_id],
    )
}

pub fn sender_epoch(source_pair_id: u64) -> Vec<u8> {
    with(&[STATE_PREFIX, b'p'], &[&source_pair_id.to_be_bytes()])
}

pub fn position(peer_pair_id: u64, currency: Currency) -> Vec<u8> {
    with(POSITION_PREFIX, &[&peer_pair_id.to_be_bytes(), &currency.bytes()])
}

pub fn bucket(peer_pair_id: u64, currency: Currency, minute: u64) -> Vec<u8> {
    with(BUCKET_PREFIX, &[&peer_pair_id.to_be_bytes(), &currency.bytes(), &minute.to_be_bytes()])
}

pub fn envelope(envelope_id: &str) -> Vec<u8> {
    with(ENVELOPE_PREFIX, &[&id_part(envelope_id)])
}

pub fn grab(envelope_id: &str, share_index: u32) -> Vec<u8> {
    with(&[STATE_PREFIX, b'g'], &[&id_part(envelope_id), &share_index.to_be_bytes()])
}

pub fn grabs_prefix(envelope_id: &str) -> Vec<u8> {
    with(&[STATE_PREFIX, b'g'], &[&id_part(envelope_id)])
}

pub fn grabber(envelope_id: &str, user_id: u64) -> Vec<u8> {
    with(&[STATE_PREFIX, b'G'], &[&id_part(envelope_id), &user_id.to_be_bytes()])
}

pub fn envelope_refund(envelope_id: &str) -> Vec<u8> {
    with(&[STATE_PREFIX, b'r'], &[&id_part(envelope_id)])
}

pub fn expiry(expires_at_ms: u64, envelope_id: &str) -> Vec<u8> {
    with(EXPIRY_PREFIX, &[&expires_at_ms.to_be_bytes(), &id_part(envelope_id)])
}

/// The envelope id of an expiry key.
pub fn expiry_envelope(key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(EXPIRY_PREFIX)?.get(8..)?;
    let len = *rest.first()? as usize;
    String::from_utf8(rest.get(1..1 + len)?.to_vec()).ok()
}

pub fn expiry_time(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(EXPIRY_PREFIX)?;
    Some(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?))
}

pub fn u128s<const N: usize>(value: &[u8]) -> Option<[u128; N]> {
    if value.len() != 16 * N {
        return None;
    }
    let mut out = [0u128; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u128::from_be_bytes(value[16 * i..16 * (i + 1)].try_into().ok()?);
    }
    Some(out)
}

pub fn encode_u128s(values: &[u128]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}
