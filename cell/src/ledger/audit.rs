//! Reconciliation figures of one replica's ledger, computed from one
//! consistent view of it (a RocksDB snapshot, or a test's map).
//!
//! Besides the digest and the per-currency sums, each account is checked
//! against what explains it: a user account against the sum of its history,
//! a clearing account against its position totals (sent − refunded −
//! received), the escrow of a currency against the open envelopes'
//! `remaining`. A balance changed behind the state machine's back fails one
//! of these, and the mismatch names the account.

use std::collections::BTreeMap;

use cellbank_proto::cell::{AccountMismatch, AuditResponse, ClearingPosition, OutboxEntry, OutboxItem};
use cellbank_proto::v1::{Envelope, EnvelopeState};
use prost::Message;
use rustc_hash::FxHashMap;

use super::clearing::Position;
use super::{digest, keys, pair, parse_history, Account, AccountId, AccountKind, Currency};

/// Most mismatches listed.
pub const MISMATCHES_MAX: usize = 100;

/// Audits the ledger region. `pairs` must be the state region in key order
/// (it is walked twice: once for the digest, once for the checks).
pub fn audit<K, V, I>(pairs: impl Fn() -> I, outbox_limit: usize) -> AuditResponse
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
    I: Iterator<Item = (K, V)>,
{
    let summary = digest(pairs());
    let mut accounts: FxHashMap<AccountId, Account> = FxHashMap::default();
    let mut history: FxHashMap<AccountId, i128> = FxHashMap::default();
    let mut positions: BTreeMap<(u64, Currency), Position> = BTreeMap::new();
    let mut remaining: BTreeMap<Currency, i128> = BTreeMap::new();
    let mut response = AuditResponse {
        digest: summary.digest_hex,
        accounts: summary.accounts,
        balance_sum_by_currency: summary
            .balance_sum_by_currency
            .iter()
            .map(|(c, s)| (c.clone(), s.to_string()))
            .collect(),
        ..Default::default()
    };
    for (key, value) in pairs() {
        let (key, value) = (key.as_ref(), value.as_ref());
        if key >= pair::LEDGER_END {
            break;
        }
        if key.starts_with(keys::ACCOUNT_PREFIX) {
            if let Some(id) = AccountId::from_key(key) {
                accounts.insert(id, Account::decode(value).unwrap_or_else(|| panic!("corrupt account {id:?}")));
            }
        } else if key.starts_with(keys::HISTORY_PREFIX) && key.len() == 22 {
            let mut account_key = key[..14].to_vec();
            account_key[1] = b'a';
            let id =
                AccountId::from_key(&account_key).unwrap_or_else(|| panic!("history key {key:02x?} names no account"));
            let (delta, _) = parse_history(value).unwrap_or_else(|| panic!("corrupt history entry {key:02x?}"));
            *history.entry(id).or_default() += i128::from(delta);
        } else if key.starts_with(keys::POSITION_PREFIX) && key.len() == 13 {
            let peer = u64::from_be_bytes(key[2..10].try_into().expect("8 bytes"));
            let currency = Currency::from_bytes(key[10..13].try_into().expect("3 bytes"));
            positions.insert((peer, currency), Position::decode(value));
        } else if key.starts_with(keys::ENVELOPE_PREFIX) {
            let envelope = Envelope::decode(value).unwrap_or_else(|e| panic!("corrupt envelope {key:02x?}: {e}"));
            if envelope.state == EnvelopeState::Open as i32 {
                response.envelopes_open += 1;
            }
            let currency = Currency::parse(&envelope.currency).expect("envelope currencies were validated");
            *remaining.entry(currency).or_default() += i128::from(envelope.remaining);
        } else if key.starts_with(keys::OUTBOX_PREFIX) {
            let entry = OutboxEntry::decode(value).unwrap_or_else(|e| panic!("corrupt outbox entry {key:02x?}: {e}"));
            response.outbox_pending += 1;
            if response.outbox.len() < outbox_limit {
                let credit = entry.credit.unwrap_or_default();
                response.outbox.push(OutboxItem {
                    seq: entry.seq,
                    dest_pair_id: credit.dest_pair_id,
                    currency: credit.currency,
                    amount: credit.amount,
                    created_at_ms: entry.created_at_ms,
                    transfer_id: credit.transfer_id,
                    created_epoch: credit.created_epoch,
                    created_index: credit.created_index,
                    kind: credit.kind,
                    to_user_id: credit.to_user_id,
                });
            }
        } else if key == keys::OUTBOX_SEQ {
            response.outbox_seq = u64::from_be_bytes(value.try_into().expect("outbox seq is 8 bytes"));
        }
    }
    let mut mismatch = |id: &AccountId, balance: i128, expected: i128| {
        if balance != expected && response.mismatches.len() < MISMATCHES_MAX {
            response.mismatches.push(AccountMismatch {
                account: id.describe(),
                balance: balance.to_string(),
                expected: expected.to_string(),
            });
        }
    };
    let mut ids: Vec<&AccountId> = accounts.keys().collect();
    ids.sort();
    for id in ids {
        let balance = accounts[id].balance;
        match id.kind {
            AccountKind::User => mismatch(id, balance, history.get(id).copied().unwrap_or(0)),
            AccountKind::Clearing => mismatch(
                id,
                balance,
                positions.get(&(id.owner, id.currency)).map(Position::expected_balance).unwrap_or(0),
            ),
            AccountKind::Escrow => mismatch(id, balance, remaining.get(&id.currency).copied().unwrap_or(0)),
            AccountKind::Settlement => {}
        }
    }
    for ((peer, currency), position) in &positions {
        let id = AccountId::clearing(*peer, *currency);
        if !accounts.contains_key(&id) {
            mismatch(&id, 0, position.expected_balance());
        }
        response.positions.push(ClearingPosition {
            peer_pair_id: *peer,
            currency: currency.as_str().to_string(),
            balance: accounts.get(&id).map(|a| a.balance).unwrap_or(0).to_string(),
            sent: position.sent.to_string(),
            refunded: position.refunded.to_string(),
            received: position.received.to_string(),
        });
    }
    for (currency, held) in &remaining {
        let id = AccountId::escrow(*currency);
        if !accounts.contains_key(&id) {
            mismatch(&id, 0, *held);
        }
    }
    response
}
