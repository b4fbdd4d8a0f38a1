//! Slices moving between pairs: the cell's side (docs/design.md, section
//! 5.9).
//!
//! A cell serves every user the routing table sends it, except the users of
//! the slices it has marked (ledger record `0x04 'w'`, [`SliceMarks`]):
//!
//! - FROZEN (moving out): no command that writes a user of the slice
//!   applies (SLICE_MOVING, nothing recorded: the router retries it); a
//!   credit to one waits (not final). Settlements and refunds still apply:
//!   that is how the slice's outgoing credits drain.
//! - GONE (moved out, to `peer_pair_id`): as FROZEN, and a credit that was
//!   never applied here is answered with the pair to redirect it to.
//! - HELD (moved in): served like any slice.
//! - no mark, with a move id (a move rolled back): served like any slice.
//!
//! Every mark keeps the id of the last move of its slice this cell took a
//! step of; a step of an older move (a late call from a coordinator that
//! lost its place) is refused, so a move that ended never acts again.
//!
//! A move (driven by the coordinator) is four commands: `FreezeSlice` at
//! the source; `SliceOut` at the source once nothing from the slice's
//! users is in its outbox (every listed account's balance leaves for the
//! target as an outbox entry of kind SLICE_MOVE, through the clearing
//! account of the target pair, and the slice is GONE); `SliceIn` at the
//! target (the slice's records and those credits in one command: the
//! balances arrive through the clearing account of the source pair, and
//! the slice is HELD); `ThawSlice` undoes a freeze whose money has not
//! left. Money crosses exactly as a cross-cell transfer does, so the
//! clearing positions, reconciliation and settlement figures account for
//! it; the source's courier later delivers the same credits, which the
//! target answers from its inbox, and the source settles them.
//!
//! Invariants: a slice is GONE only after its balances left in the same
//! command; a SLICE_MOVE credit applies only inside its `SliceIn`; nothing
//! is ever credited or refunded to a user of a FROZEN or GONE slice
//! (except the refunds that drain it while FROZEN).

use cellbank_client::slices::{slice_of, SLICES_MAX};
use cellbank_proto::cell::{
    FreezeSliceCommand, RedirectCommand, SliceInCommand, SliceMark, SliceMarkState, SliceMarks, SliceOutCommand,
    ThawSliceCommand,
};
use cellbank_proto::v1::{ResultCode, Settlement, TransferKind, TransferRecord, TransferResult};
use cellbank_raft::Kv;
use prost::Message;

use super::clearing::{read_outbox, read_sender_epoch, update_position, validate_credit};
use super::{keys, read_record, rejection, result, AccountId, AccountKind, Currency, Ledger};

/// The transfer id of the credit that carries part `part` of a user's
/// balance in `currency` to the slice's new pair.
pub fn move_transfer_id(move_id: u64, currency: &str, part: u32) -> Vec<u8> {
    format!("slice-move/{move_id}/{currency}/{part}").into_bytes()
}

/// The families of records a `SliceIn` may carry.
pub const IMPORT_FAMILIES: &[u8] = b"ahtMegGrIB";

pub fn read_marks(kv: &dyn Kv) -> SliceMarks {
    kv.get(keys::SLICE_MARKS)
        .map(|v| SliceMarks::decode(v.as_slice()).unwrap_or_else(|e| panic!("corrupt slice marks: {e}")))
        .unwrap_or_default()
}

/// The mark of `user`'s slice, if it is marked.
pub fn mark_of_user(marks: &SliceMarks, user_id: u64) -> Option<&SliceMarkState> {
    if marks.slice_count == 0 || marks.slices.is_empty() {
        return None;
    }
    let slice = slice_of(user_id, marks.slice_count);
    marks.slices.iter().find(|m| m.slice == slice)
}

pub fn mark_of_slice(marks: &SliceMarks, slice: u32) -> Option<&SliceMarkState> {
    marks.slices.iter().find(|m| m.slice == slice)
}

fn mark(state: &SliceMarkState) -> SliceMark {
    SliceMark::try_from(state.mark).unwrap_or(SliceMark::Unspecified)
}

fn set_mark(marks: &mut SliceMarks, state: SliceMarkState) {
    marks.slices.retain(|m| m.slice != state.slice);
    marks.slices.push(state);
    marks.slices.sort_by_key(|m| m.slice);
}

/// The answer to a step applied before (a coordinator running it again).
fn done_before(index: u64) -> TransferResult {
    TransferResult { duplicate: true, ..result(ResultCode::Ok, index) }
}

fn stale(move_id: u64, slice: u32, seen: u64) -> String {
    format!("move {move_id} of slice {slice} is stale: this cell has seen move {seen} of it")
}

/// Where a user of a marked slice may not be written: FROZEN or GONE.
pub fn blocks(state: &SliceMarkState) -> bool {
    matches!(mark(state), SliceMark::Frozen | SliceMark::Gone)
}

impl Ledger {
    pub(super) fn marks(&mut self, kv: &dyn Kv) -> &SliceMarks {
        self.marks.get_or_insert_with(|| read_marks(kv))
    }

    fn store_marks(&mut self, kv: &mut dyn Kv, marks: SliceMarks) {
        kv.put(keys::SLICE_MARKS, &marks.encode_to_vec());
        self.marks = Some(marks);
    }

    /// The refusal of a command that would write `user_id` when the user's
    /// slice is moving out or has moved (None: go ahead).
    pub(super) fn slice_refusal(&mut self, kv: &dyn Kv, user_id: u64, index: u64) -> Option<TransferResult> {
        let marks = self.marks(kv);
        let state = mark_of_user(marks, user_id).filter(|s| blocks(s))?;
        let detail = match mark(state) {
            SliceMark::Gone => {
                format!("slice {} of user {user_id} moved to pair {}", state.slice, state.peer_pair_id)
            }
            _ => format!("slice {} of user {user_id} is moving to pair {}", state.slice, state.peer_pair_id),
        };
        let moved_to = if mark(state) == SliceMark::Gone { state.peer_pair_id } else { 0 };
        let mut refusal = rejection(ResultCode::SliceMoving, "", detail, index);
        refusal.moved_to_pair_id = moved_to;
        Some(refusal)
    }

    /// The first refusal among `users` (see [`Ledger::slice_refusal`]).
    pub(super) fn slices_refusal(&mut self, kv: &dyn Kv, users: &[u64], index: u64) -> Option<TransferResult> {
        users.iter().find_map(|user| self.slice_refusal(kv, *user, index))
    }

    pub(super) fn freeze_slice(&mut self, kv: &mut dyn Kv, index: u64, freeze: &FreezeSliceCommand) -> TransferResult {
        let invalid = |field: &str, detail: String| rejection(ResultCode::InvalidItem, field, detail, index);
        if freeze.slice_count == 0 || freeze.slice_count > SLICES_MAX {
            return invalid("slice_count", format!("must be 1..={SLICES_MAX}"));
        }
        if freeze.slice >= freeze.slice_count {
            return invalid("slice", format!("slice {} of {}", freeze.slice, freeze.slice_count));
        }
        if freeze.move_id == 0 || freeze.to_pair_id == 0 {
            return invalid("move_id", "a move id and a target pair must be set".into());
        }
        let mut marks = self.marks(kv).clone();
        if marks.slice_count != 0 && marks.slice_count != freeze.slice_count {
            return invalid("slice_count", format!("this cell's slices are of {}", marks.slice_count));
        }
        match mark_of_slice(&marks, freeze.slice) {
            // Frozen by this move before, or its money already left: a
            // coordinator that runs the move again goes on from there.
            Some(state) if state.move_id == freeze.move_id && blocks(state) => {
                return done_before(index);
            }
            // A step of a move that ended (or a later one this cell saw):
            // a late call from a coordinator that lost its place.
            Some(state) if state.move_id >= freeze.move_id => {
                return invalid("move_id", stale(freeze.move_id, freeze.slice, state.move_id));
            }
            Some(state) if blocks(state) => {
                let detail =
                    format!("slice {} is {} here (move {})", freeze.slice, mark(state).as_str_name(), state.move_id);
                return invalid("slice", detail);
            }
            _ => {}
        }
        marks.slice_count = freeze.slice_count;
        set_mark(
            &mut marks,
            SliceMarkState {
                slice: freeze.slice,
                mark: SliceMark::Frozen as i32,
                move_id: freeze.move_id,
                peer_pair_id: freeze.to_pair_id,
            },
        );
        self.store_marks(kv, marks);
        result(ResultCode::Ok, index)
    }

    pub(super) fn thaw_slice(&mut self, kv: &mut dyn Kv, index: u64, thaw: &ThawSliceCommand) -> TransferResult {
        let mut marks = self.marks(kv).clone();
        match mark_of_slice(&marks, thaw.slice) {
            Some(state) if state.move_id == thaw.move_id && mark(state) == SliceMark::Frozen => {
                // Served here again; the move id stays, so that no late
                // step of this move (or an older one) applies.
                let served = SliceMarkState { mark: SliceMark::Unspecified as i32, ..*state };
                set_mark(&mut marks, served);
                self.store_marks(kv, marks);
                result(ResultCode::Ok, index)
            }
            Some(state) if state.move_id == thaw.move_id && mark(state) == SliceMark::Gone => rejection(
                ResultCode::InvalidItem,
                "move_id",
                format!("move {}: the slice's money has left; the move can only finish", thaw.move_id),
                index,
            ),
            // Not frozen by this move (thawed before, or never frozen).
            _ => done_before(index),
        }
    }

    pub(super) fn slice_out(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        out: &SliceOutCommand,
    ) -> TransferResult {
        let mut marks = self.marks(kv).clone();
        let state = match mark_of_slice(&marks, out.slice) {
            Some(state) if state.move_id == out.move_id && mark(state) == SliceMark::Gone => {
                return done_before(index);
            }
            Some(state) if state.move_id == out.move_id && mark(state) == SliceMark::Frozen => *state,
            _ => {
                let detail = format!("slice {} is not frozen for move {}", out.slice, out.move_id);
                return rejection(ResultCode::InvalidItem, "move_id", detail, index);
            }
        };
        if out.source_pair_id == 0 || out.source_pair_id == state.peer_pair_id {
            return rejection(ResultCode::InvalidItem, "source_pair_id", "must be this cell's pair".into(), index);
        }
        // Checked whole before anything is written.
        let mut accounts = Vec::with_capacity(out.accounts.len());
        for account in &out.accounts {
            let Ok(currency) = Currency::parse(&account.currency) else {
                return rejection(
                    ResultCode::InvalidItem,
                    "accounts",
                    format!("currency {:?}", account.currency),
                    index,
                );
            };
            if slice_of(account.user_id, marks.slice_count) != out.slice {
                let detail = format!("user {} is not of slice {}", account.user_id, out.slice);
                return rejection(ResultCode::InvalidItem, "accounts", detail, index);
            }
            let id = AccountId::user(account.user_id, currency);
            if !accounts.contains(&id) {
                accounts.push(id);
            }
        }
        let to = state.peer_pair_id;
        for id in accounts {
            let Some(account) = self.account(kv, &id) else { continue };
            let mut left = u64::try_from(account.balance).expect("user balances are in 0..=u64::MAX");
            let mut part = 0u32;
            while left > 0 {
                let amount = left.min(i64::MAX as u64);
                left -= amount;
                part += 1;
                let transfer_id = move_transfer_id(out.move_id, id.currency.as_str(), part);
                let record_key = keys::slice_move(id.owner, &transfer_id);
                let clearing = AccountId::clearing(to, id.currency);
                let (code, detail) = self.post(kv, &id, &clearing, amount, &record_key);
                assert_eq!(code, ResultCode::Ok, "a balance leaves whole for its slice's new pair: {detail}");
                let record = TransferRecord {
                    transfer_id_text: String::new(),
                    transfer_id: transfer_id.clone(),
                    kind: TransferKind::SliceMove as i32,
                    from_user_id: id.owner,
                    to_user_id: id.owner,
                    currency: id.currency.as_str().to_string(),
                    amount,
                    result: ResultCode::Ok as i32,
                    applied_index: index,
                    timestamp_ms,
                    settlement: Settlement::InTransit as i32,
                    credited_at_ms: 0,
                    refund_reason: 0,
                };
                kv.put(&record_key, &record.encode_to_vec());
                let credit = cellbank_proto::cell::CreditCommand {
                    source_pair_id: out.source_pair_id,
                    transfer_id,
                    kind: TransferKind::SliceMove as i32,
                    from_user_id: id.owner,
                    to_user_id: id.owner,
                    currency: id.currency.as_str().to_string(),
                    amount,
                    dest_pair_id: to,
                    ..Default::default()
                };
                self.enqueue_credit(kv, index, timestamp_ms, credit, record_key, id.owner);
            }
        }
        set_mark(&mut marks, SliceMarkState { mark: SliceMark::Gone as i32, ..state });
        self.store_marks(kv, marks);
        result(ResultCode::Ok, index)
    }

    pub(super) fn slice_in(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        import: &SliceInCommand,
    ) -> TransferResult {
        let invalid = |field: &str, detail: String| rejection(ResultCode::InvalidItem, field, detail, index);
        let mut marks = self.marks(kv).clone();
        match mark_of_slice(&marks, import.slice) {
            Some(state) if state.move_id == import.move_id && mark(state) == SliceMark::Held => {
                return done_before(index);
            }
            Some(state) if mark(state) == SliceMark::Frozen => {
                return invalid("slice", format!("slice {} is moving out of this cell", import.slice));
            }
            Some(state) if state.move_id >= import.move_id => {
                return invalid("move_id", stale(import.move_id, import.slice, state.move_id));
            }
            _ => {}
        }
        if let Err((field, detail)) = check_import(kv, &marks, import) {
            return invalid(field, detail);
        }
        // Transfer records first: one whose id this cell already holds for
        // another transfer is kept under the moved records' family instead
        // (a retry of that id here then meets the other transfer's fields
        // and is refused as a reused id: never applied twice).
        let mut relocated: Vec<Vec<u8>> = Vec::new();
        for (key, value) in import.keys.iter().zip(&import.values) {
            if key[1] != b't' {
                continue;
            }
            match kv.get(key) {
                Some(held) if held != *value => {
                    kv.put(&keys::moved(import.from_pair_id, key), value);
                    relocated.push(key.clone());
                }
                _ => kv.put(key, value),
            }
        }
        for (key, value) in import.keys.iter().zip(&import.values) {
            match key[1] {
                b't' => {}
                b'a' => {
                    let id = AccountId::from_key(key).expect("checked");
                    let account = super::Account::decode(value).expect("checked");
                    self.store_account(kv, &id, &account);
                }
                b'h' => {
                    let (delta, record_key) = super::parse_history(value).expect("checked");
                    if relocated.iter().any(|r| r.as_slice() == record_key) {
                        let moved = keys::moved(import.from_pair_id, record_key);
                        kv.put(key, &super::history_value(delta, &moved));
                    } else {
                        kv.put(key, value);
                    }
                }
                _ => kv.put(key, value),
            }
        }
        for credit in &import.credits {
            let applied = self.apply_credit_of(kv, index, timestamp_ms, credit, true);
            assert_eq!(
                applied.code,
                ResultCode::Ok as i32,
                "a checked slice credit applies: {} ({})",
                applied.detail,
                String::from_utf8_lossy(&credit.transfer_id)
            );
        }
        marks.slice_count = import.slice_count;
        set_mark(
            &mut marks,
            SliceMarkState {
                slice: import.slice,
                mark: SliceMark::Held as i32,
                move_id: import.move_id,
                peer_pair_id: import.from_pair_id,
            },
        );
        self.store_marks(kv, marks);
        result(ResultCode::Ok, index)
    }

    pub(super) fn redirect(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        redirect: &RedirectCommand,
    ) -> TransferResult {
        let Some(mut entry) = read_outbox(kv, redirect.seq) else {
            return done_before(index);
        };
        let mut credit = entry.credit.clone().expect("an outbox entry holds its credit");
        if credit.dest_pair_id != redirect.from_pair_id {
            // Redirected before.
            return done_before(index);
        }
        if redirect.to_pair_id == 0 || redirect.to_pair_id == redirect.from_pair_id {
            return rejection(ResultCode::InvalidItem, "to_pair_id", "another pair must be named".into(), index);
        }
        let currency = Currency::parse(&credit.currency).expect("outbox currencies were validated");
        let amount = u128::from(credit.amount);
        let from = AccountId::clearing(redirect.from_pair_id, currency);
        if redirect.to_pair_id == credit.source_pair_id {
            // The recipient's slice moved to this very pair: credited here.
            if let Some(refusal) = self.slice_refusal(kv, credit.to_user_id, index) {
                return refusal;
            }
            let recipient = AccountId::user(credit.to_user_id, currency);
            let (code, _) = self.post(kv, &from, &recipient, credit.amount, &entry.record_key);
            if code != ResultCode::Ok {
                // Refunded as the destination's refusal would have been.
                let settle =
                    cellbank_proto::cell::SettleCommand { seq: redirect.seq, code: code as i32, credited_at_ms: 0 };
                return self.apply_settle(kv, index, timestamp_ms, &settle);
            }
            update_position(kv, redirect.from_pair_id, currency, |p| p.refunded += amount);
            if let Some(mut record) = read_record(kv, &entry.record_key) {
                record.settlement = Settlement::Credited as i32;
                record.credited_at_ms = timestamp_ms;
                kv.put(&entry.record_key, &record.encode_to_vec());
            }
            kv.delete(&keys::outbox(redirect.seq));
            return result(ResultCode::Ok, index);
        }
        let to = AccountId::clearing(redirect.to_pair_id, currency);
        let (code, detail) = self.post(kv, &from, &to, credit.amount, &entry.record_key);
        assert_eq!(code, ResultCode::Ok, "clearing accounts take any amount: {detail}");
        update_position(kv, redirect.from_pair_id, currency, |p| p.refunded += amount);
        update_position(kv, redirect.to_pair_id, currency, |p| p.sent += amount);
        credit.dest_pair_id = redirect.to_pair_id;
        entry.credit = Some(credit);
        kv.put(&keys::outbox(redirect.seq), &entry.encode_to_vec());
        result(ResultCode::Ok, index)
    }
}

/// Checks a slice import whole: its records are of the slice (accounts and
/// histories of its users, transfer records, moved records, envelopes of
/// its senders) and well formed; its credits are the slice's balances from
/// the source pair, none applied here yet, from a sender epoch this cell
/// takes, each to an account the import holds.
fn check_import(kv: &dyn Kv, marks: &SliceMarks, import: &SliceInCommand) -> Result<(), (&'static str, String)> {
    if import.slice_count == 0 || import.slice_count > SLICES_MAX || import.slice >= import.slice_count {
        return Err(("slice", format!("slice {} of {}", import.slice, import.slice_count)));
    }
    if marks.slice_count != 0 && marks.slice_count != import.slice_count {
        return Err(("slice_count", format!("this cell's slices are of {}", marks.slice_count)));
    }
    if import.move_id == 0 || import.from_pair_id == 0 {
        return Err(("move_id", "a move id and the source pair must be set".into()));
    }
    if import.keys.len() != import.values.len() {
        return Err(("keys", format!("{} keys and {} values", import.keys.len(), import.values.len())));
    }
    let of_slice = |user: u64| slice_of(user, import.slice_count) == import.slice;
    let mut accounts = Vec::new();
    for (key, value) in import.keys.iter().zip(&import.values) {
        let family = key.get(1).copied().unwrap_or(0);
        if key.first() != Some(&cellbank_raft::storage::STATE_PREFIX) || !IMPORT_FAMILIES.contains(&family) {
            return Err(("keys", format!("a key a slice does not hold: {key:02x?}")));
        }
        super::records::check_record(key, value).map_err(|e| ("values", format!("{key:02x?}: {e}")))?;
        match family {
            b'a' => {
                let id = AccountId::from_key(key).ok_or(("keys", "an account key of the wrong shape".to_string()))?;
                if id.kind != AccountKind::User || !of_slice(id.owner) {
                    return Err(("keys", format!("{} is not of slice {}", id.describe(), import.slice)));
                }
                accounts.push(id);
            }
            b'h' => {
                let owner = u64::from_be_bytes(key.get(3..11).and_then(|o| o.try_into().ok()).unwrap_or([0; 8]));
                if key.get(2) != Some(&(AccountKind::User as u8)) || !of_slice(owner) {
                    return Err(("keys", format!("a history not of slice {}: {key:02x?}", import.slice)));
                }
            }
            b'e' | b'g' | b'G' | b'r' => {
                let sender = keys::envelope_sender_of_key(key)
                    .ok_or(("keys", format!("an envelope key of the wrong shape: {key:02x?}")))?;
                if !of_slice(sender) {
                    return Err(("keys", format!("an envelope not of slice {}: {key:02x?}", import.slice)));
                }
            }
            _ => {}
        }
    }
    let newest_sender = read_sender_epoch(kv, import.from_pair_id);
    for credit in &import.credits {
        validate_credit(credit).map_err(|e| ("credits", format!("{}: {}", e.field, e.detail)))?;
        if credit.kind != TransferKind::SliceMove as i32
            || credit.source_pair_id != import.from_pair_id
            || !of_slice(credit.to_user_id)
        {
            return Err(("credits", format!("credit {} is not of this slice's move", credit.seq)));
        }
        if credit.sender_epoch < newest_sender {
            return Err(("credits", format!("sender epoch {} is older than {newest_sender}", credit.sender_epoch)));
        }
        if kv.get(&keys::inbox(credit.source_pair_id, credit.seq)).is_some() {
            return Err((
                "credits",
                format!("credit {} from pair {} is applied already", credit.seq, credit.source_pair_id),
            ));
        }
        let currency = Currency::parse(&credit.currency).expect("validated");
        if !accounts.contains(&AccountId::user(credit.to_user_id, currency)) {
            return Err(("credits", format!("credit {} names an account the import does not hold", credit.seq)));
        }
    }
    Ok(())
}
