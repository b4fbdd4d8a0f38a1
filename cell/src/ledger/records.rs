//! What a stored ledger record must look like, family by family (the key
//! layouts are in [`super::keys`]). A standby installs the source's ledger
//! from snapshot chunks as raw keys and values; each is checked here first,
//! so a chunk that is corrupt or forged is refused whole instead of leaving
//! a record that panics the replica when a later command reads it.

use cellbank_client::currency::Currency;
use cellbank_proto::cell::OutboxEntry;
use cellbank_proto::v1::{Envelope, TransferRecord};
use prost::Message;

use super::{keys, parse_history, Account, AccountId, AccountKind};

/// The largest balance magnitude of any stored account (2^120: 2^56 times
/// the largest user balance).
pub const SYSTEM_BALANCE_MAX: u128 = 1 << 120;
/// The most movements an account may have recorded.
pub const VERSION_MAX: u64 = 1 << 62;

/// `Ok` when `value` is a well-formed record for `key`.
pub fn check_record(key: &[u8], value: &[u8]) -> Result<(), String> {
    let family = *key.get(1).ok_or("a key without a family")?;
    let exact = |len: usize, what: &str| {
        if value.len() == len {
            Ok(())
        } else {
            Err(format!("{what} of {} bytes, not {len}", value.len()))
        }
    };
    let record = |what: &str| -> Result<(), String> {
        let record = TransferRecord::decode(value).map_err(|e| format!("{what}: {e}"))?;
        currency(&record.currency, what)
    };
    match family {
        b'a' => {
            let id = AccountId::from_key(key).ok_or("an account key of the wrong shape")?;
            let account = Account::decode(value).ok_or("an account value of the wrong length")?;
            if id.kind == AccountKind::User && !(0..=u64::MAX as i128).contains(&account.balance) {
                return Err(format!("a user balance out of range: {}", account.balance));
            }
            // System accounts sum many users' money, far below these bounds;
            // near i128's ends, arithmetic on them would overflow.
            if account.balance.unsigned_abs() > SYSTEM_BALANCE_MAX || account.version > VERSION_MAX {
                return Err(format!("an account out of range: {account:?}"));
            }
            Ok(())
        }
        b'h' => {
            if key.len() != 22 {
                return Err("a history key of the wrong length".into());
            }
            parse_history(value).map(|_| ()).ok_or_else(|| "a history entry too short".into())
        }
        b't' | b'f' | b'i' | b'I' | b'g' | b'r' | b'v' => record("a transfer record"),
        b'B' => exact(8, "a carried credit's business key"),
        b'M' => {
            if key.len() < 11 {
                return Err("a moved record's key of the wrong length".into());
            }
            record("a moved record")
        }
        b'w' => cellbank_proto::cell::SliceMarks::decode(value).map(|_| ()).map_err(|e| format!("slice marks: {e}")),
        b'k' => exact(8, "the ledger clock"),
        b'n' => {
            exact(8, "the outbox sequence")?;
            let seq = u64::from_be_bytes(value.try_into().expect("8 bytes"));
            if seq > VERSION_MAX {
                return Err(format!("an outbox sequence out of range: {seq}"));
            }
            Ok(())
        }
        b'p' => exact(8, "a sender epoch"),
        b'b' => exact(8, "a credit's business key"),
        b'j' => exact(16, "a credit's origin"),
        b'G' => exact(4, "a grabber's share"),
        b'c' => sums::<3>(value, "a clearing position"),
        b's' => sums::<2>(value, "a credit bucket"),
        b'o' => {
            let entry = OutboxEntry::decode(value).map_err(|e| format!("an outbox entry: {e}"))?;
            let credit = entry.credit.ok_or("an outbox entry without its credit")?;
            Currency::parse(&credit.currency).map(|_| ()).map_err(|e| format!("an outbox entry: currency {e}"))
        }
        b'e' => {
            let envelope = Envelope::decode(value).map_err(|e| format!("an envelope: {e}"))?;
            Currency::parse(&envelope.currency).map(|_| ()).map_err(|e| format!("an envelope: currency {e}"))
        }
        b'x' => {
            keys::expiry_envelope(key).ok_or("an expiry key of the wrong shape")?;
            exact(0, "an expiry marker")
        }
        other => Err(format!("no record family {:?}", other as char)),
    }
}

/// Totals (big-endian u128s), each far from overflowing when added to.
fn sums<const N: usize>(value: &[u8], what: &str) -> Result<(), String> {
    let sums = keys::u128s::<N>(value).ok_or_else(|| format!("{what} of {} bytes", value.len()))?;
    if sums.iter().any(|&sum| sum > SYSTEM_BALANCE_MAX) {
        return Err(format!("{what} out of range: {sums:?}"));
    }
    Ok(())
}

/// Records that carry a currency carry a valid one (an empty one is a
/// record that moved nothing).
fn currency(code: &str, what: &str) -> Result<(), String> {
    if code.is_empty() {
        return Ok(());
    }
    Currency::parse(code).map(|_| ()).map_err(|e| format!("{what}: currency {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_the_wrong_shape_are_refused() {
        let id = AccountId::user(7, Currency::parse("CNY").unwrap());
        let good = Account { balance: 5, version: 1 }.encode();
        assert!(check_record(&id.key(), &good).is_ok());
        assert!(check_record(&id.key(), &good[..23]).is_err());
        let negative = Account { balance: -1, version: 1 }.encode();
        assert!(check_record(&id.key(), &negative).is_err());
        assert!(check_record(keys::CLOCK, &[0; 8]).is_ok());
        assert!(check_record(keys::CLOCK, &[0; 7]).is_err());
        assert!(check_record(&keys::outbox(1), &[0xff, 0xff]).is_err());
        assert!(check_record(&keys::outbox(1), &OutboxEntry::default().encode_to_vec()).is_err());
        assert!(check_record(&[cellbank_raft::storage::STATE_PREFIX, b'Q'], &[]).is_err());
    }
}
