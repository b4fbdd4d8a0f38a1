//! The reads behind a slice's move (see `ledger::slices`): whether a frozen
//! slice may leave, and what leaves with it. Each reads one RocksDB view.

use cellbank_client::slices::slice_of;
use cellbank_proto::cell::{OutboxEntry, SliceAccount, SliceInCommand, SliceMark, SliceMarkState};
use cellbank_proto::v1::{TransferKind, TransferRecord};
use prost::Message;
use rocksdb::DB;
use tonic::Status;

use crate::context::SnapshotKv;
use crate::ledger::{self, keys, slices};
use cellbank_raft::storage::STATE_PREFIX;

/// The most bytes one slice may carry to its new pair: its import is one
/// Raft entry at the target, which the target ships to its standby in one
/// message with other entries (at most `replication::SHIP_MESSAGE_BYTES_MAX`
/// in all). A larger slice
/// is refused before anything moves.
pub const SLICE_BYTES_MAX: usize = 2 << 20;
/// What a slice's export grows by per account when its balances leave (a
/// history entry, the moved record of the balance, its credit), at most.
const LEAVING_BYTES_PER_ACCOUNT: usize = 512;
const _: () = assert!(
    SLICE_BYTES_MAX + 2 * crate::replication::SHIP_BATCH_BYTES_MAX <= crate::replication::SHIP_MESSAGE_BYTES_MAX
);

type View<'a> = rocksdb::SnapshotWithThreadMode<'a, DB>;
/// A key and its value.
type Pair = (Vec<u8>, Vec<u8>);

fn check_not_installing(view: &View<'_>) -> Result<(), Status> {
    if cellbank_raft::storage::installing(view) {
        return Err(Status::unavailable("this replica is installing a snapshot: ask again"));
    }
    Ok(())
}

/// Every key and value under `prefix`, in key order, for which `keep` holds.
fn scan(view: &View<'_>, prefix: &[u8], mut keep: impl FnMut(&[u8], &[u8]) -> bool) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut iter = view.raw_iterator();
    iter.seek(prefix);
    while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
        if !key.starts_with(prefix) {
            break;
        }
        if keep(key, value) {
            out.push((key.to_vec(), value.to_vec()));
        }
        iter.next();
    }
    iter.status().unwrap_or_else(|e| panic!("storage failure (scan): {e}"));
    out
}

/// The user a transfer record is routed by: the one whose slice holds it.
fn routing_user(record: &TransferRecord) -> u64 {
    match TransferKind::try_from(record.kind) {
        Ok(TransferKind::Deposit) => record.to_user_id,
        _ => record.from_user_id,
    }
}

fn user_prefix(family: u8) -> [u8; 3] {
    [STATE_PREFIX, family, ledger::AccountKind::User as u8]
}

fn owner_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[3..11].try_into().expect("user keys hold an owner"))
}

/// The slice's mark in `view`.
pub fn mark_in(view: &View<'_>, slice: u32) -> Option<SliceMarkState> {
    let marks = slices::read_marks(&SnapshotKv(view));
    slices::mark_of_slice(&marks, slice).copied()
}

/// Whether a frozen slice may leave: nothing from its users is in the
/// outbox (their credits out have settled), none of their envelopes is
/// open, and it fits one import. Returns its user accounts.
pub fn ready_to_leave(db: &DB, move_id: u64, slice: u32) -> Result<(Vec<SliceAccount>, Carried), Status> {
    let view = db.snapshot();
    check_not_installing(&view)?;
    let marks = slices::read_marks(&SnapshotKv(&view));
    let frozen = slices::mark_of_slice(&marks, slice)
        .is_some_and(|m| m.move_id == move_id && m.mark == SliceMark::Frozen as i32);
    if !frozen {
        return Err(Status::failed_precondition(format!("slice {slice} is not frozen for move {move_id} here")));
    }
    let count = marks.slice_count;
    let of_slice = |user: u64| slice_of(user, count) == slice;
    let pending = scan(&view, keys::OUTBOX_PREFIX, |_, value| {
        OutboxEntry::decode(value).is_ok_and(|e| of_slice(e.refund_user_id))
    });
    if !pending.is_empty() {
        return Err(Status::unavailable(format!(
            "slice {slice}: {} credit(s) from its users are still in flight; it leaves once they settle",
            pending.len()
        )));
    }
    let open = scan(&view, keys::EXPIRY_PREFIX, |key, _| {
        keys::expiry_envelope(key)
            .and_then(|id| id.split_once('.').and_then(|(sender, _)| sender.parse::<u64>().ok()))
            .is_some_and(of_slice)
    });
    if !open.is_empty() {
        return Err(Status::failed_precondition(format!(
            "slice {slice}: {} of its users' red envelopes are open; a slice with open envelopes does not move \
             (move it after they expire)",
            open.len()
        )));
    }
    let mut accounts = Vec::new();
    for (key, _) in scan(&view, &user_prefix(b'a'), |key, _| key.len() >= 11 && of_slice(owner_of(key))) {
        let id = ledger::AccountId::from_key(&key)
            .ok_or_else(|| Status::internal(format!("an account key of the wrong shape: {key:02x?}")))?;
        accounts.push(SliceAccount { user_id: id.owner, currency: id.currency.as_str().to_string() });
    }
    // What the export will carry: these records, and what leaving adds.
    let carried = carried(&view, count, slice);
    let records = collect(&view, count, slice, 0, &carried)?;
    let bytes =
        records.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>() + accounts.len() * LEAVING_BYTES_PER_ACCOUNT;
    if bytes > SLICE_BYTES_MAX {
        return Err(Status::failed_precondition(format!(
            "slice {slice} holds about {bytes} bytes; one move carries at most {SLICE_BYTES_MAX}"
        )));
    }
    Ok((accounts, carried))
}

/// The records a frozen slice carries that its leaving does not change:
/// the transfer records its users routed, and its senders' envelopes (a
/// frozen slice writes neither).
pub struct Carried {
    transfers: Vec<Pair>,
    envelopes: Vec<Pair>,
}

fn carried(view: &View<'_>, count: u32, slice: u32) -> Carried {
    let of_slice = |user: u64| slice_of(user, count) == slice;
    let transfers = scan(view, keys::TRANSFER_PREFIX, |_, value| {
        TransferRecord::decode(value).is_ok_and(|r| of_slice(routing_user(&r)))
    });
    let mut envelopes = Vec::new();
    for family in [b'e', b'g', b'G', b'r'] {
        envelopes.extend(scan(view, &[STATE_PREFIX, family], |key, _| {
            keys::envelope_sender_of_key(key).is_some_and(of_slice)
        }));
    }
    Carried { transfers, envelopes }
}

/// What the target needs to serve a slice that has left this cell: its
/// users' accounts and histories, the transfer records its users routed,
/// the other records their histories name (kept apart at the target, under
/// the moved records' family, with the histories naming them there), the
/// envelopes of its senders, and the credits of this move still in the
/// outbox (carrying `sender_epoch`).
pub fn export(
    db: &DB,
    move_id: u64,
    slice: u32,
    source_pair_id: u64,
    sender_epoch: u64,
    carried_before: Option<Carried>,
) -> Result<SliceInCommand, Status> {
    let view = db.snapshot();
    check_not_installing(&view)?;
    let marks = slices::read_marks(&SnapshotKv(&view));
    let gone =
        slices::mark_of_slice(&marks, slice).is_some_and(|m| m.move_id == move_id && m.mark == SliceMark::Gone as i32);
    if !gone {
        return Err(Status::failed_precondition(format!("slice {slice} has not left for move {move_id} here")));
    }
    let count = marks.slice_count;
    let carried = carried_before.unwrap_or_else(|| carried(&view, count, slice));
    let pairs = collect(&view, count, slice, source_pair_id, &carried)?;
    let tag = format!("slice-move/{move_id}/").into_bytes();
    let credits = scan(&view, keys::OUTBOX_PREFIX, |_, value| {
        OutboxEntry::decode(value).is_ok_and(|e| {
            e.credit
                .as_ref()
                .is_some_and(|c| c.kind == TransferKind::SliceMove as i32 && c.transfer_id.starts_with(&tag))
        })
    })
    .into_iter()
    .filter_map(|(_, value)| OutboxEntry::decode(value.as_slice()).ok()?.credit)
    .map(|credit| cellbank_proto::cell::CreditCommand { sender_epoch, ..credit })
    .collect();
    let (keys, values) = pairs.into_iter().unzip();
    Ok(SliceInCommand { move_id, slice, slice_count: count, from_pair_id: source_pair_id, keys, values, credits })
}

/// The records of `slice` in `view` as its new pair takes them (see
/// [`export`]): its users' accounts, their histories (a seek per account),
/// the records those name, and what `carried` holds.
fn collect(
    view: &View<'_>,
    count: u32,
    slice: u32,
    source_pair_id: u64,
    carried: &Carried,
) -> Result<Vec<Pair>, Status> {
    let of_slice = |user: u64| slice_of(user, count) == slice;
    let kv = SnapshotKv(view);
    let accounts = scan(view, &user_prefix(b'a'), |key, _| key.len() >= 11 && of_slice(owner_of(key)));
    let transfer_keys: std::collections::HashSet<&[u8]> = carried.transfers.iter().map(|(k, _)| k.as_slice()).collect();
    let mut moved: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
    let mut histories = Vec::new();
    for (key, _) in &accounts {
        let id = ledger::AccountId::from_key(key)
            .ok_or_else(|| Status::internal(format!("an account key of the wrong shape: {key:02x?}")))?;
        for (key, value) in scan(view, &id.history_prefix(), |_, _| true) {
            let (delta, record_key) =
                ledger::parse_history(&value).ok_or_else(|| Status::internal("a history entry is malformed"))?;
            if transfer_keys.contains(record_key) {
                histories.push((key, value));
                continue;
            }
            let at_target = keys::moved(source_pair_id, record_key);
            if let Some(record) = kv_get(&kv, record_key) {
                // A credit the user received: its inbox record and business
                // key go along, so that no late delivery applies it again.
                // (Through every pair the slice lived in: a moved record's
                // key holds the key it had.)
                let mut original = record_key;
                while original.get(1) == Some(&b'M') && original.len() > 10 {
                    original = &original[9..];
                }
                let original = [&[STATE_PREFIX][..], original.get(1..).unwrap_or_default()].concat();
                let original = if record_key.get(1) == Some(&b'M') { original } else { record_key.to_vec() };
                if let (Some(inbox), Ok(credit), true) = (
                    keys::carried(&original),
                    cellbank_proto::v1::TransferRecord::decode(record.as_slice()),
                    original.len() == 18,
                ) {
                    let source = u64::from_be_bytes(original[2..10].try_into().expect("an inbox key holds its pair"));
                    let seq = &original[10..18];
                    let business = keys::credit_business(source, credit.kind, credit.to_user_id, &credit.transfer_id);
                    moved.insert(inbox, record.clone());
                    moved.insert(keys::carried(&business).expect("a business key"), seq.to_vec());
                }
                moved.insert(at_target.clone(), record);
            }
            histories.push((key, ledger::history_value(delta, &at_target)));
        }
    }
    let mut pairs = accounts;
    pairs.extend(histories);
    pairs.extend(carried.transfers.iter().cloned());
    pairs.extend(moved);
    pairs.extend(carried.envelopes.iter().cloned());
    Ok(pairs)
}

fn kv_get(kv: &SnapshotKv<'_, '_>, key: &[u8]) -> Option<Vec<u8>> {
    cellbank_raft::Kv::get(kv, key)
}

/// Users' accounts of slices this cell no longer serves are left behind
/// (at zero) when a slice moves out: figures skip them.
pub fn gone_slices(db: &DB) -> Vec<u32> {
    let marks = slices::read_marks(&cellbank_raft::ReadOnlyDb(db));
    marks.slices.iter().filter(|m| m.mark == SliceMark::Gone as i32).map(|m| m.slice).collect()
}
