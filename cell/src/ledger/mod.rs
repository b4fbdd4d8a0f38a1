//! The ledger state machine of one cell: accounts, double-entry movements,
//! idempotent transfer ids, per-account history.
//!
//! It owns every key under the state prefix (`0x04`) and keeps these
//! invariants, asserted where they are established:
//! - An account is (kind, owner, currency). User accounts hold a balance in
//!   `0..=u64::MAX` minor units and never go below zero. The settlement
//!   account of a currency (money entering and leaving the system) may go
//!   negative; balances are `i128` so no sum can wrap.
//! - Double entry: every movement debits one account and credits another by
//!   the same amount, so per currency the balances of all accounts sum to 0.
//! - A transfer id is recorded with its fields and outcome the first time it
//!   is applied. A retry with the same fields gets that outcome back
//!   (`duplicate = true`); other fields get `ID_REUSED_WITH_DIFFERENT_FIELDS`
//!   naming the first differing field; a failed id stays failed.
//! - Apply is deterministic: it reads only the command, the entry index and
//!   the state; the proposer chose the timestamp. Business failures are
//!   result codes; undecodable state is corruption and panics.

pub mod audit;
pub mod clearing;
pub mod envelope;
pub mod keys;
pub mod pair;
pub mod records;
pub mod slices;

use std::collections::BTreeMap;

use std::sync::Arc;

use cellbank_proto::cell::{
    command, Command, CommandBatch, ConfigureCommand, CreditCommand, MoveCommand, OpenAccountCommand, PairRole,
    PairState, SourceEntries, SourceSnapshotChunk,
};
use cellbank_proto::v1::{ResultCode, Settlement, TransferKind, TransferRecord, TransferResult};
use prost::Message;
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

pub use cellbank_client::currency::Currency;
pub use cellbank_client::validate;
use cellbank_raft::storage::STATE_PREFIX;
use cellbank_raft::{Kv, StateMachine};

/// Account kinds; the byte is part of the key. Only user accounts are held
/// to `0..=u64::MAX`; the system accounts may go negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum AccountKind {
    /// Money entering and leaving the system (owner 0).
    Settlement = 1,
    User = 2,
    /// Money in transit to or from a peer pair (owner: the peer's pair id).
    Clearing = 3,
    /// Money held for open envelopes (owner 0).
    Escrow = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId {
    pub kind: AccountKind,
    pub owner: u64,
    pub currency: Currency,
}

impl AccountId {
    pub fn user(user_id: u64, currency: Currency) -> AccountId {
        AccountId { kind: AccountKind::User, owner: user_id, currency }
    }

    pub fn settlement(currency: Currency) -> AccountId {
        AccountId { kind: AccountKind::Settlement, owner: 0, currency }
    }

    pub fn clearing(peer_pair_id: u64, currency: Currency) -> AccountId {
        AccountId { kind: AccountKind::Clearing, owner: peer_pair_id, currency }
    }

    pub fn escrow(currency: Currency) -> AccountId {
        AccountId { kind: AccountKind::Escrow, owner: 0, currency }
    }

    /// "user 42 CNY", "clearing for pair 2 CNY", ...
    pub fn describe(&self) -> String {
        let currency = self.currency.as_str();
        match self.kind {
            AccountKind::Settlement => format!("settlement {currency}"),
            AccountKind::User => format!("user {} {currency}", self.owner),
            AccountKind::Clearing => format!("clearing for pair {} {currency}", self.owner),
            AccountKind::Escrow => format!("escrow {currency}"),
        }
    }

    /// `0x04 'a' kind owner(be) currency`.
    pub fn key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(14);
        key.push(STATE_PREFIX);
        key.push(b'a');
        key.push(self.kind as u8);
        key.extend_from_slice(&self.owner.to_be_bytes());
        key.extend_from_slice(&self.currency.bytes());
        key
    }

    pub fn from_key(key: &[u8]) -> Option<AccountId> {
        if key.len() != 14 || key[0] != STATE_PREFIX || key[1] != b'a' {
            return None;
        }
        let kind = match key[2] {
            1 => AccountKind::Settlement,
            2 => AccountKind::User,
            3 => AccountKind::Clearing,
            4 => AccountKind::Escrow,
            _ => return None,
        };
        let owner = u64::from_be_bytes(key[3..11].try_into().ok()?);
        let currency = Currency::from_bytes(key[11..14].try_into().ok()?);
        Some(AccountId { kind, owner, currency })
    }

    /// Prefix of this account's history keys.
    pub fn history_prefix(&self) -> Vec<u8> {
        let mut key = self.key();
        key[1] = b'h';
        key
    }

    pub fn history_key(&self, seq: u64) -> Vec<u8> {
        let mut key = self.history_prefix();
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }
}

/// An account's stored state: 16-byte big-endian i128 balance, 8-byte version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Account {
    pub balance: i128,
    /// Movements applied since opening; also the next history sequence number.
    pub version: u64,
}

impl Account {
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..16].copy_from_slice(&self.balance.to_be_bytes());
        out[16..].copy_from_slice(&self.version.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Account> {
        if bytes.len() != 24 {
            return None;
        }
        Some(Account {
            balance: i128::from_be_bytes(bytes[..16].try_into().ok()?),
            version: u64::from_be_bytes(bytes[16..].try_into().ok()?),
        })
    }
}

/// A history entry: the signed change of the balance (8 bytes, big-endian
/// i64; every movement is at most `i64::MAX`) and the key of the record
/// (a `TransferRecord`) that explains it.
pub fn history_value(delta: i64, record_key: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + record_key.len());
    value.extend_from_slice(&delta.to_be_bytes());
    value.extend_from_slice(record_key);
    value
}

/// The (delta, record key) of a history entry; `None` if malformed.
pub fn parse_history(value: &[u8]) -> Option<(i64, &[u8])> {
    if value.len() < 9 {
        return None;
    }
    Some((i64::from_be_bytes(value[..8].try_into().ok()?), &value[8..]))
}

/// Reads the record a history entry names.
pub fn read_record(kv: &dyn Kv, key: &[u8]) -> Option<TransferRecord> {
    kv.get(key).map(|bytes| {
        TransferRecord::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("corrupt record {key:02x?}: {e}"))
    })
}

/// The ledger's clock: the largest entry timestamp any ledger command has
/// seen, kept in the ledger region (so the standby and a rebuilt copy hold
/// it too). A command runs at `max(its entry's timestamp, the clock)`, so
/// time never goes back across leaders whose clocks differ: an envelope
/// that one leader saw expire stays expired under the next.
/// A command that changes nothing (refused, or a retry) leaves the clock.
fn ledger_clock(kv: &dyn Kv, entry_timestamp_ms: u64) -> u64 {
    let clock = kv
        .get(keys::CLOCK)
        .map(|v| u64::from_be_bytes(v.as_slice().try_into().expect("the ledger clock is 8 bytes")))
        .unwrap_or(0);
    entry_timestamp_ms.max(clock)
}

fn advance_clock(kv: &mut dyn Kv, now: u64, result: &TransferResult) {
    if result.code == ResultCode::Ok as i32 && !result.duplicate && ledger_clock(kv, 0) < now {
        kv.put(keys::CLOCK, &now.to_be_bytes());
    }
}

pub fn transfer_key(transfer_id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + transfer_id.len());
    key.push(STATE_PREFIX);
    key.push(b't');
    key.extend_from_slice(transfer_id);
    key
}

pub fn read_account(kv: &dyn Kv, id: &AccountId) -> Option<Account> {
    kv.get(&id.key()).map(|bytes| {
        Account::decode(&bytes).unwrap_or_else(|| panic!("corrupt account record for {id:?}: {bytes:02x?}"))
    })
}

fn write_account(kv: &mut dyn Kv, id: &AccountId, account: &Account) {
    if id.kind == AccountKind::User {
        assert!(
            account.balance >= 0 && account.balance <= u64::MAX as i128,
            "user balance out of range for {id:?}: {}",
            account.balance
        );
    }
    kv.put(&id.key(), &account.encode());
}

pub fn read_transfer(kv: &dyn Kv, transfer_id: &[u8]) -> Option<TransferRecord> {
    kv.get(&transfer_key(transfer_id)).map(|bytes| {
        TransferRecord::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("corrupt transfer record {transfer_id:02x?}: {e}"))
    })
}

/// A record names another that is not there: the state was installed from a
/// snapshot that is not one this ledger could have written. Every replica
/// holds the same state and refuses the same command the same way; nothing
/// changes, and the error says where to look.
pub(crate) fn inconsistent(why: String, index: u64) -> TransferResult {
    tracing::error!(index, "inconsistent ledger state: {why}");
    rejection(ResultCode::CellNotWritable, "state", format!("inconsistent ledger state: {why}"), index)
}

fn result(code: ResultCode, applied_index: u64) -> TransferResult {
    TransferResult { code: code as i32, applied_index, ..Default::default() }
}

fn rejection(code: ResultCode, field: &str, detail: String, applied_index: u64) -> TransferResult {
    TransferResult {
        code: code as i32,
        field: field.into(),
        detail,
        applied_index,
        duplicate: false,
        ..Default::default()
    }
}

/// The answer to a transfer_id seen before: the recorded outcome
/// (`duplicate`), or ID_REUSED_WITH_DIFFERENT_FIELDS naming the field.
fn recorded_answer(recorded: &TransferRecord, differing: Option<&'static str>, index: u64) -> TransferResult {
    match differing {
        Some(field) => rejection(
            ResultCode::IdReusedWithDifferentFields,
            field,
            format!("transfer_id was first used at index {} with a different {field}", recorded.applied_index),
            index,
        ),
        None => TransferResult {
            code: recorded.result,
            applied_index: recorded.applied_index,
            duplicate: true,
            settlement: recorded.settlement,
            ..Default::default()
        },
    }
}

/// The first field in which a retry differs from the recorded transfer.
fn first_differing_field(recorded: &TransferRecord, command: &MoveCommand) -> Option<&'static str> {
    if recorded.kind != command.kind {
        return Some("kind");
    }
    if recorded.from_user_id != command.from_user_id {
        return Some("from_user_id");
    }
    if recorded.to_user_id != command.to_user_id {
        return Some("to_user_id");
    }
    if recorded.currency != command.currency {
        return Some("currency");
    }
    if recorded.amount != command.amount {
        return Some("amount");
    }
    None
}

/// Most accounts kept in the in-memory account table; past this the table
/// is emptied and refills from RocksDB as accounts are touched.
pub const ACCOUNT_CACHE_ENTRIES_MAX: usize = 1_000_000;

/// The ledger state machine.
///
/// It keeps a write-through copy of the accounts it has touched, so that
/// apply reads balances from memory; RocksDB stays the source of truth. The
/// copy changes only through apply (deterministically) and is dropped
/// whenever the state is replaced by a snapshot ([`StateMachine::restored`]).
/// The pair state as last applied, for the service (role checks, whether a
/// write waits for the standby). Published after every change.
pub type PairView = Arc<tokio::sync::watch::Sender<PairState>>;

/// Until when a replica just promoted by a failover serves nothing (see
/// `PairState.promotion_settle_ms`). Set before the promotion is published,
/// so no request sees the new role without the wait. In memory only.
pub type SettleUntil = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// Which pair state was in force at which index, shared with the waiters
/// of `replication.rs`. Updated before the new state is published.
pub type PairHistory = Arc<std::sync::Mutex<pair::History>>;

#[derive(Default)]
pub struct Ledger {
    accounts: FxHashMap<AccountId, Account>,
    /// Cached pair states (own, source); dropped on restore.
    pair_own: Option<PairState>,
    pair_source: Option<PairState>,
    view: Option<PairView>,
    history: Option<PairHistory>,
    settle: Option<SettleUntil>,
    db: Option<Arc<rocksdb::DB>>,
    /// The pair state slot of the command being applied (the epoch a new
    /// outbox entry was created under comes from it).
    applying_slot: Option<pair::Slot>,
    /// Cached slice marks (`slices`); dropped whenever the state is replaced.
    marks: Option<cellbank_proto::cell::SliceMarks>,
}

/// Why shipped entries or a snapshot chunk cannot be taken at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidShipment {
    #[error("source entry {source_index} is not a command batch: {why}")]
    NotABatch { source_index: u64, why: String },
    #[error("entries from {first_index}: {count} of them run past the last index")]
    TooMany { first_index: u64, count: usize },
    #[error("{keys} keys and {values} values")]
    Unpaired { keys: usize, values: usize },
    #[error("key {0:02x?} is outside the ledger")]
    OutsideLedger(Vec<u8>),
    #[error("key {key:02x?}: {why}")]
    BadRecord { key: Vec<u8>, why: String },
}

/// Each shipped entry decoded (`None`: an entry without commands).
fn decode_source_entries(shipped: &SourceEntries) -> Result<Vec<Option<CommandBatch>>, InvalidShipment> {
    if shipped.first_index.checked_add(shipped.entries.len() as u64).is_none() {
        return Err(InvalidShipment::TooMany { first_index: shipped.first_index, count: shipped.entries.len() });
    }
    shipped
        .entries
        .iter()
        .enumerate()
        .map(|(offset, data)| {
            if data.is_empty() {
                return Ok(None);
            }
            CommandBatch::decode(data.as_ref()).map(Some).map_err(|e| InvalidShipment::NotABatch {
                source_index: shipped.first_index + offset as u64,
                why: e.to_string(),
            })
        })
        .collect()
}

/// What the standby checks before proposing shipped entries.
pub fn check_source_entries(shipped: &SourceEntries) -> Result<(), InvalidShipment> {
    decode_source_entries(shipped).map(|_| ())
}

/// What the standby checks before proposing a shipped snapshot chunk.
pub fn check_source_snapshot(chunk: &SourceSnapshotChunk) -> Result<(), InvalidShipment> {
    if chunk.keys.len() != chunk.values.len() {
        return Err(InvalidShipment::Unpaired { keys: chunk.keys.len(), values: chunk.values.len() });
    }
    if let Some(key) = chunk.keys.iter().find(|k| k.as_slice() < pair::LEDGER_START || k.as_slice() >= pair::LEDGER_END)
    {
        return Err(InvalidShipment::OutsideLedger(key.clone()));
    }
    for (key, value) in chunk.keys.iter().zip(&chunk.values) {
        records::check_record(key, value).map_err(|why| InvalidShipment::BadRecord { key: key.clone(), why })?;
    }
    Ok(())
}

/// Why a standby refuses shipped entries or a snapshot chunk: they change
/// nothing. The words are part of the entry's result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShipmentRefusal {
    #[error("this cell is {} at epoch {epoch}", .role.as_str_name())]
    NotStandby { role: PairRole, epoch: u64 },
    #[error("this standby copies cell {copies} at epoch {at_epoch}, not cell {from} at epoch {epoch}")]
    OtherSource { copies: u64, at_epoch: u64, from: u64, epoch: u64 },
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// A ledger that publishes its pair state to `view` (and each change, with
    /// its index, to `history`), reading it from `db` at start and after a
    /// snapshot replaces the state.
    pub fn with_view(db: Arc<rocksdb::DB>, view: PairView, history: PairHistory, settle: SettleUntil) -> Ledger {
        let mut ledger = Ledger {
            view: Some(view),
            history: Some(history),
            settle: Some(settle),
            db: Some(db),
            ..Ledger::default()
        };
        ledger.reload_pair_view();
        ledger
    }

    /// A ledger on a store other than RocksDB (the simulator's in-memory
    /// one) that publishes its pair state to `view` and `history` like
    /// [`Ledger::with_view`]; the caller loads the state with
    /// [`Ledger::load_pair_view`].
    pub fn detached(view: PairView, history: PairHistory) -> Ledger {
        Ledger { view: Some(view), history: Some(history), ..Ledger::default() }
    }

    /// Forgets what is cached and publishes the pair state `kv` holds, in
    /// force from `applied` (a restart, or a state replaced wholesale).
    pub fn load_pair_view(&mut self, kv: &dyn Kv, applied: u64) {
        self.accounts.clear();
        self.marks = None;
        self.pair_own = None;
        self.pair_source = None;
        let state = pair::read(kv, pair::Slot::Own);
        if let Some(history) = &self.history {
            history.lock().expect("pair history lock").reset(applied, &state);
        }
        if let Some(view) = &self.view {
            view.send_replace(state);
        }
    }

    fn reload_pair_view(&mut self) {
        if let (Some(db), Some(view)) = (&self.db, &self.view) {
            let kv = cellbank_raft::ReadOnlyDb(db);
            let state = pair::read(&kv, pair::Slot::Own);
            let applied = cellbank_raft::storage::read_u64(&db.snapshot(), cellbank_raft::storage::APPLIED_INDEX_KEY);
            if let Some(history) = &self.history {
                history.lock().expect("pair history lock").reset(applied.unwrap_or(0), &state);
            }
            view.send_replace(state);
        }
    }

    fn pair(&mut self, kv: &dyn Kv, slot: pair::Slot) -> PairState {
        let cached = match slot {
            pair::Slot::Own => &mut self.pair_own,
            pair::Slot::Source => &mut self.pair_source,
        };
        cached.get_or_insert_with(|| pair::read(kv, slot)).clone()
    }

    /// Stores a pair state applied at `index`. The cell's own state is
    /// recorded in the history before it is published, so a waiter that sees
    /// it finds its index too.
    /// The epoch in `slot`, without copying the state.
    fn pair_epoch(&mut self, kv: &dyn Kv, slot: pair::Slot) -> u64 {
        let cached = match slot {
            pair::Slot::Own => &mut self.pair_own,
            pair::Slot::Source => &mut self.pair_source,
        };
        cached.get_or_insert_with(|| pair::read(kv, slot)).epoch
    }

    fn set_pair(&mut self, kv: &mut dyn Kv, slot: pair::Slot, state: PairState, index: u64) {
        pair::write(kv, slot, &state);
        if slot == pair::Slot::Own {
            if let Some(history) = &self.history {
                history.lock().expect("pair history lock").record(index, &state);
            }
            if let Some(view) = &self.view {
                view.send_replace(state.clone());
            }
            self.pair_own = Some(state);
        } else {
            self.pair_source = Some(state);
        }
    }

    fn account(&mut self, kv: &dyn Kv, id: &AccountId) -> Option<Account> {
        if let Some(account) = self.accounts.get(id) {
            return Some(*account);
        }
        let account = read_account(kv, id)?;
        if self.accounts.len() >= ACCOUNT_CACHE_ENTRIES_MAX {
            self.accounts.clear();
        }
        self.accounts.insert(*id, account);
        Some(account)
    }

    fn store_account(&mut self, kv: &mut dyn Kv, id: &AccountId, account: &Account) {
        write_account(kv, id, account);
        if self.accounts.len() >= ACCOUNT_CACHE_ENTRIES_MAX {
            self.accounts.clear();
        }
        self.accounts.insert(*id, *account);
    }

    /// Applies one command of this cell's own log; the result is what the
    /// proposer hears.
    pub fn apply_command(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        command: &Command,
    ) -> TransferResult {
        self.apply_in_slot(kv, index, timestamp_ms, command, pair::Slot::Own)
    }

    /// Applies one command under the pair state in `slot`: the cell's own,
    /// or (replaying a source's entry on a standby) the source's.
    fn apply_in_slot(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        timestamp_ms: u64,
        command: &Command,
        slot: pair::Slot,
    ) -> TransferResult {
        self.applying_slot = Some(slot);
        match &command.kind {
            Some(command::Kind::OpenAccount(_))
            | Some(command::Kind::Move(_))
            | Some(command::Kind::Credit(_))
            | Some(command::Kind::Settle(_))
            | Some(command::Kind::SendEnvelope(_))
            | Some(command::Kind::Grab(_))
            | Some(command::Kind::Expire(_))
            | Some(command::Kind::FreezeSlice(_))
            | Some(command::Kind::ThawSlice(_))
            | Some(command::Kind::SliceOut(_))
            | Some(command::Kind::SliceIn(_))
            | Some(command::Kind::Redirect(_))
                if !pair::writable(&self.pair(kv, slot)) =>
            {
                let state = self.pair(kv, slot);
                let detail = format!("the cell is {} at epoch {}", pair::role(&state).as_str_name(), state.epoch);
                rejection(ResultCode::CellNotWritable, "", detail, index)
            }
            Some(command::Kind::OpenAccount(open)) => self.open_account(kv, index, open),
            Some(command::Kind::Move(movement)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.apply_move(kv, index, now, movement);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Credit(credit)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.apply_credit(kv, index, now, credit);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Settle(settle)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.apply_settle(kv, index, now, settle);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::SendEnvelope(send)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.send_envelope(kv, index, now, send);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Grab(grab)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.grab(kv, index, now, grab);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Expire(expire)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.expire(kv, index, now, expire);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::FreezeSlice(freeze)) => self.freeze_slice(kv, index, freeze),
            Some(command::Kind::ThawSlice(thaw)) => self.thaw_slice(kv, index, thaw),
            Some(command::Kind::SliceOut(out)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.slice_out(kv, index, now, out);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::SliceIn(import)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.slice_in(kv, index, now, import);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Redirect(redirect)) => {
                let now = ledger_clock(kv, timestamp_ms);
                let result = self.redirect(kv, index, now, redirect);
                advance_clock(kv, now, &result);
                result
            }
            Some(command::Kind::Configure(configure)) => self.configure(kv, index, configure, slot),
            Some(command::Kind::Depose(depose)) => {
                let current = self.pair(kv, slot);
                if let Some(next) = pair::depose(&current, depose.by_epoch) {
                    if slot == pair::Slot::Own {
                        tracing::warn!(
                            epoch = current.epoch,
                            by_epoch = depose.by_epoch,
                            "deposed: the pair moved to a later epoch; this cell serves nothing until reconfigured"
                        );
                    }
                    self.set_pair(kv, slot, next, index);
                }
                result(ResultCode::Ok, index)
            }
            // A source's own replication commands mean nothing to its standby.
            Some(command::Kind::SourceEntries(_)) | Some(command::Kind::SourceSnapshot(_))
                if slot == pair::Slot::Source =>
            {
                result(ResultCode::Ok, index)
            }
            Some(command::Kind::SourceEntries(entries)) => self.source_entries(kv, index, entries),
            Some(command::Kind::SourceSnapshot(chunk)) => self.source_snapshot(kv, index, chunk),
            None => rejection(ResultCode::InvalidItem, "command", "empty command".into(), index),
        }
    }

    fn configure(
        &mut self,
        kv: &mut dyn Kv,
        index: u64,
        command: &ConfigureCommand,
        slot: pair::Slot,
    ) -> TransferResult {
        let current = self.pair(kv, slot);
        let requested = command.state.clone().unwrap_or_default();
        match pair::configure(&current, &requested, index, command.force_rebuild) {
            Ok(next) => {
                let becomes_standby = slot == pair::Slot::Own && pair::role(&next) == PairRole::Standby;
                if becomes_standby && next.source_index != current.source_index {
                    let source_state = command.source_state.clone().unwrap_or_default();
                    self.set_pair(kv, pair::Slot::Source, source_state, index);
                }
                let promoted = slot == pair::Slot::Own
                    && pair::role(&current) == PairRole::Standby
                    && pair::role(&next) == PairRole::Active;
                if let (true, Some(settle)) = (promoted && next.promotion_settle_ms > 0, &self.settle) {
                    // Wall time, not state: it only delays this replica's
                    // service, and must be in place before the new role shows.
                    let until = std::time::Instant::now() + std::time::Duration::from_millis(next.promotion_settle_ms);
                    *settle.lock().expect("settle lock") = Some(until);
                    tracing::info!(
                        epoch = next.epoch,
                        settle_ms = next.promotion_settle_ms,
                        "promoted: serving nothing until the old active's read lease has run out"
                    );
                }
                self.set_pair(kv, slot, next, index);
                result(ResultCode::Ok, index)
            }
            Err(refusal) => rejection(ResultCode::CellNotWritable, "epoch", refusal.to_string(), index),
        }
    }

    /// Checks that a shipment comes from this standby's source at its epoch.
    fn check_shipment(&mut self, kv: &dyn Kv, source_cell_id: u64, epoch: u64) -> Result<PairState, ShipmentRefusal> {
        let own = self.pair(kv, pair::Slot::Own);
        if pair::role(&own) != PairRole::Standby {
            return Err(ShipmentRefusal::NotStandby { role: pair::role(&own), epoch: own.epoch });
        }
        if own.epoch != epoch || own.source_cell_id != source_cell_id {
            return Err(ShipmentRefusal::OtherSource {
                copies: own.source_cell_id,
                at_epoch: own.epoch,
                from: source_cell_id,
                epoch,
            });
        }
        Ok(own)
    }

    /// Replays the source's entries that follow the source index, in order.
    /// Entries that are not all command batches change nothing (the
    /// standby's service refuses them before proposing; this holds the line
    /// for a log written before that check).
    fn source_entries(&mut self, kv: &mut dyn Kv, index: u64, shipped: &SourceEntries) -> TransferResult {
        let mut own = match self.check_shipment(kv, shipped.source_cell_id, shipped.epoch) {
            Ok(own) => own,
            Err(refusal) => return rejection(ResultCode::CellNotWritable, "epoch", refusal.to_string(), index),
        };
        if own.source_index == 0 || own.rebuild_snapshot_index != 0 {
            return rejection(ResultCode::CellNotWritable, "first_index", "the standby needs a snapshot".into(), index);
        }
        if shipped.first_index == 0 || shipped.first_index > own.source_index + 1 {
            let detail = format!("entries start at {}, the standby holds {}", shipped.first_index, own.source_index);
            return rejection(ResultCode::CellNotWritable, "first_index", detail, index);
        }
        let batches = match decode_source_entries(shipped) {
            Ok(batches) => batches,
            Err(invalid) => return rejection(ResultCode::InvalidItem, "entries", invalid.to_string(), index),
        };
        for (offset, batch) in batches.into_iter().enumerate() {
            let source_index = shipped.first_index + offset as u64;
            if source_index <= own.source_index {
                continue;
            }
            if let Some(batch) = batch {
                for command in &batch.commands {
                    self.apply_in_slot(kv, source_index, batch.timestamp_ms, command, pair::Slot::Source);
                }
            }
            own.source_index = source_index;
        }
        self.set_pair(kv, pair::Slot::Own, own, index);
        result(ResultCode::Ok, index)
    }

    /// One chunk of a rebuild from the source's snapshot.
    fn source_snapshot(&mut self, kv: &mut dyn Kv, index: u64, chunk: &SourceSnapshotChunk) -> TransferResult {
        let mut own = match self.check_shipment(kv, chunk.source_cell_id, chunk.epoch) {
            Ok(own) => own,
            Err(refusal) => return rejection(ResultCode::CellNotWritable, "epoch", refusal.to_string(), index),
        };
        let in_order = chunk.chunk == 0
            || (own.rebuild_snapshot_index == chunk.snapshot_index && own.rebuild_next_chunk == chunk.chunk);
        if !in_order || chunk.snapshot_index == 0 || chunk.keys.len() != chunk.values.len() {
            let detail = format!(
                "chunk {} of snapshot {} does not follow chunk {} of snapshot {}",
                chunk.chunk, chunk.snapshot_index, own.rebuild_next_chunk, own.rebuild_snapshot_index
            );
            return rejection(ResultCode::CellNotWritable, "chunk", detail, index);
        }
        // The standby's service checks the same before proposing; a chunk
        // in a log written before that check is refused here, whole.
        if let Err(invalid) = check_source_snapshot(chunk) {
            return rejection(ResultCode::InvalidItem, "keys", invalid.to_string(), index);
        }
        if chunk.chunk == 0 && own.source_index > 0 && chunk.snapshot_index < own.source_index {
            let detail = format!(
                "snapshot at {} is older than the {} entries this standby holds",
                chunk.snapshot_index, own.source_index
            );
            return rejection(ResultCode::CellNotWritable, "snapshot_index", detail, index);
        }
        if chunk.chunk == 0 {
            kv.clear_range(pair::LEDGER_START, pair::LEDGER_END);
            own.source_index = 0;
            own.rebuild_snapshot_index = chunk.snapshot_index;
        }
        self.accounts.clear();
        self.marks = None;
        for (key, value) in chunk.keys.iter().zip(&chunk.values) {
            kv.put(key, value);
        }
        own.rebuild_next_chunk = chunk.chunk + 1;
        if chunk.last {
            own.source_index = chunk.snapshot_index;
            own.rebuild_snapshot_index = 0;
            own.rebuild_next_chunk = 0;
            self.set_pair(kv, pair::Slot::Source, chunk.source_state.clone().unwrap_or_default(), index);
        }
        self.set_pair(kv, pair::Slot::Own, own, index);
        result(ResultCode::Ok, index)
    }

    fn open_account(&mut self, kv: &mut dyn Kv, index: u64, open: &OpenAccountCommand) -> TransferResult {
        let currency = match validate::open_account(open.user_id, &open.currency) {
            Ok(currency) => currency,
            Err(invalid) => return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index),
        };
        if let Some(refusal) = self.slice_refusal(kv, open.user_id, index) {
            return refusal;
        }
        let id = AccountId::user(open.user_id, currency);
        if self.account(kv, &id).is_some() {
            return result(ResultCode::AccountAlreadyExists, index);
        }
        self.store_account(kv, &id, &Account::default());
        result(ResultCode::Ok, index)
    }

    fn apply_move(&mut self, kv: &mut dyn Kv, index: u64, timestamp_ms: u64, command: &MoveCommand) -> TransferResult {
        let valid = match validate::move_command(command) {
            Ok(valid) => valid,
            Err(invalid) => return rejection(ResultCode::InvalidItem, invalid.field, invalid.detail, index),
        };
        let cross_cell = command.dest_pair_id != 0;
        // A slice moving out takes no writes for its users, retries
        // included: the router asks again at the slice's new pair, which
        // holds the recorded answer.
        let users: &[u64] = match valid.kind {
            TransferKind::Deposit => &[command.to_user_id],
            TransferKind::Withdraw => &[command.from_user_id],
            _ if cross_cell => &[command.from_user_id],
            _ => &[command.from_user_id, command.to_user_id],
        };
        if let Some(refusal) = self.slices_refusal(kv, users, index) {
            return refusal;
        }
        if let Some(recorded) = read_transfer(kv, &command.transfer_id) {
            return recorded_answer(&recorded, first_differing_field(&recorded, command), index);
        }
        let (debit, credit) = match valid.kind {
            TransferKind::Deposit => {
                (AccountId::settlement(valid.currency), AccountId::user(command.to_user_id, valid.currency))
            }
            TransferKind::Withdraw => {
                (AccountId::user(command.from_user_id, valid.currency), AccountId::settlement(valid.currency))
            }
            _ if cross_cell => (
                AccountId::user(command.from_user_id, valid.currency),
                AccountId::clearing(command.dest_pair_id, valid.currency),
            ),
            _ => (
                AccountId::user(command.from_user_id, valid.currency),
                AccountId::user(command.to_user_id, valid.currency),
            ),
        };
        let record_key = transfer_key(&command.transfer_id);
        let outcome = self.post(kv, &debit, &credit, command.amount, &record_key);
        let settlement = match (outcome.0, cross_cell) {
            (ResultCode::Ok, true) => Settlement::InTransit,
            (ResultCode::Ok, false) => Settlement::Local,
            _ => Settlement::Unspecified,
        };
        if settlement == Settlement::InTransit {
            let credit = CreditCommand {
                source_pair_id: command.source_pair_id,
                seq: 0,
                transfer_id: command.transfer_id.clone(),
                kind: TransferKind::Transfer as i32,
                from_user_id: command.from_user_id,
                to_user_id: command.to_user_id,
                currency: command.currency.clone(),
                amount: command.amount,
                dest_pair_id: command.dest_pair_id,
                ..Default::default()
            };
            self.enqueue_credit(kv, index, timestamp_ms, credit, record_key.clone(), command.from_user_id);
        }
        let record = TransferRecord {
            transfer_id: command.transfer_id.clone(),
            kind: command.kind,
            from_user_id: command.from_user_id,
            to_user_id: command.to_user_id,
            currency: command.currency.clone(),
            amount: command.amount,
            result: outcome.0 as i32,
            applied_index: index,
            timestamp_ms,
            settlement: settlement as i32,
            ..Default::default()
        };
        kv.put(&record_key, &record.encode_to_vec());
        let mut answer = rejection(outcome.0, "", outcome.1, index);
        answer.settlement = settlement as i32;
        answer
    }

    /// Moves `amount` from `debit` to `credit` if both exist and the balances
    /// allow it; writes both accounts and their history entries.
    fn post(
        &mut self,
        kv: &mut dyn Kv,
        debit: &AccountId,
        credit: &AccountId,
        amount: u64,
        record_key: &[u8],
    ) -> (ResultCode, String) {
        let mut debit_account = match self.existing_or_system(kv, debit) {
            Some(account) => account,
            None => {
                return (
                    ResultCode::AccountNotFound,
                    format!("no account for user {} in {}", debit.owner, debit.currency.as_str()),
                )
            }
        };
        let mut credit_account = match self.existing_or_system(kv, credit) {
            Some(account) => account,
            None => {
                return (
                    ResultCode::AccountNotFound,
                    format!("no account for user {} in {}", credit.owner, credit.currency.as_str()),
                )
            }
        };
        let amount = amount as i128;
        let debited = debit_account.balance.checked_sub(amount);
        let debited = match debited {
            Some(balance) if debit.kind != AccountKind::User || balance >= 0 => balance,
            _ => {
                return (
                    ResultCode::InsufficientFunds,
                    format!("balance {} is less than {}", debit_account.balance, amount),
                )
            }
        };
        let credited = match credit_account.balance.checked_add(amount) {
            Some(balance) if credit.kind != AccountKind::User || balance <= u64::MAX as i128 => balance,
            _ => return (ResultCode::BalanceOverflow, "the credit would exceed the largest balance".into()),
        };
        let before = debit_account.balance + credit_account.balance;
        debit_account.balance = debited;
        credit_account.balance = credited;
        assert_eq!(before, debit_account.balance + credit_account.balance, "a movement must conserve money");
        let delta = i64::try_from(amount).expect("movements are at most i64::MAX");
        for (id, account, delta) in [(debit, &mut debit_account, -delta), (credit, &mut credit_account, delta)] {
            if id.kind == AccountKind::User {
                kv.put(&id.history_key(account.version), &history_value(delta, record_key));
            }
            account.version += 1;
            self.store_account(kv, id, account);
        }
        (ResultCode::Ok, String::new())
    }

    fn existing_or_system(&mut self, kv: &dyn Kv, id: &AccountId) -> Option<Account> {
        match (self.account(kv, id), id.kind) {
            (Some(account), _) => Some(account),
            (None, AccountKind::User) => None,
            (None, _) => Some(Account::default()),
        }
    }
}

/// A read of the ledger for `GetAccount`.
pub fn get_user_account(kv: &dyn Kv, user_id: u64, currency: Currency) -> Option<Account> {
    read_account(kv, &AccountId::user(user_id, currency))
}

/// Summary of the whole ledger state, for replica comparison and checkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerDigest {
    pub digest_hex: String,
    pub accounts: u64,
    pub transfers: u64,
    pub balance_sum_by_currency: BTreeMap<String, i128>,
}

/// Digests every state key and value in key order. `pairs` must be the
/// state region in ascending key order.
pub fn digest<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: impl Iterator<Item = (K, V)>) -> LedgerDigest {
    let mut hasher = Sha256::new();
    let mut accounts = 0;
    let mut transfers = 0;
    let mut sums: BTreeMap<String, i128> = BTreeMap::new();
    for (key, value) in pairs {
        let (key, value) = (key.as_ref(), value.as_ref());
        if key >= pair::LEDGER_END {
            continue;
        }
        hasher.update((key.len() as u32).to_be_bytes());
        hasher.update(key);
        hasher.update((value.len() as u32).to_be_bytes());
        hasher.update(value);
        if let Some(id) = AccountId::from_key(key) {
            accounts += 1;
            let account = Account::decode(value).unwrap_or_else(|| panic!("corrupt account {id:?}"));
            let sum = sums.entry(id.currency.as_str().to_string()).or_default();
            *sum = sum.checked_add(account.balance).expect("sum of balances overflowed i128");
        } else if key.len() > 1 && key[1] == b't' {
            transfers += 1;
        }
    }
    LedgerDigest { digest_hex: hex::encode(hasher.finalize()), accounts, transfers, balance_sum_by_currency: sums }
}

impl StateMachine for Ledger {
    type Command = Command;
    type Output = TransferResult;

    fn encode_batch(&self, commands: Vec<Command>, timestamp_ms: u64) -> Vec<u8> {
        CommandBatch { timestamp_ms, commands }.encode_to_vec()
    }

    fn restored(&mut self) {
        self.accounts.clear();
        self.marks = None;
        self.pair_own = None;
        self.pair_source = None;
        self.reload_pair_view();
    }

    fn check_entry(data: &[u8]) -> Result<(), String> {
        CommandBatch::decode(data).map(|_| ()).map_err(|e| format!("not a command batch: {e}"))
    }

    /// The ledger's records are checked family by family as the standby's
    /// snapshot chunks are, and the pair states must decode (a replica
    /// reads them at every start).
    fn check_snapshot_pair(key: &[u8], value: &[u8]) -> Result<(), String> {
        if key >= pair::LEDGER_START && key < pair::LEDGER_END {
            return records::check_record(key, value);
        }
        if key == pair::OWN_PAIR_KEY || key == pair::SOURCE_PAIR_KEY {
            return PairState::decode(value).map(|_| ()).map_err(|e| format!("a pair state: {e}"));
        }
        Err(format!("a key the ledger never writes: {key:02x?}"))
    }

    fn apply(&mut self, kv: &mut dyn Kv, index: u64, data: &[u8]) -> Vec<TransferResult> {
        let batch = CommandBatch::decode(data)
            .unwrap_or_else(|e| panic!("entry {index} is not a command batch ({e}); the log is corrupt"));
        batch
            .commands
            .iter()
            .map(|command| {
                let mut result = self.apply_command(kv, index, batch.timestamp_ms, command);
                result.entry_index = index;
                result
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
