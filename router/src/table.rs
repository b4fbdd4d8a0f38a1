//! The routing table: a state machine replicated by the routers' Raft group
//! (the same Raft layer as the cells'). It holds the cells, the
//! active/standby pairs with their modes and epochs, the slice-to-pair map
//! and the audit log.
//!
//! Invariants, checked on apply:
//! - The table is bootstrapped once; afterwards the slice count never
//!   changes, and cells and pairs are only added (`AddPair`: new ids, new
//!   addresses, no slices), never removed. A cell's replica addresses
//!   change one at a time (`SetCellReplicas`), never to an address another
//!   cell uses.
//! - A pair's epoch only grows, by exactly one per change of active cell.
//!   A slice's epoch grows by one when its pair's active changes and when
//!   it moves to another pair (`EndMove`); a move is recorded from
//!   `BeginMove` to `EndMove`, at most one per slice.
//! - A pair with no standby is never failed over and has mode NO_STANDBY.
//! - Every admin action that applies leaves an audit record (who, what,
//!   when, why); the record's time is the proposer's clock, in the entry.

use std::sync::Arc;

use cellbank_proto::router::{
    table_command, AuditRecord, CellReplicas, Pair, PairMode, RoutingTable, SliceMove, TableBatch, TableCommand,
    TableCommandResult,
};
use cellbank_raft::{Kv, StateMachine};
use prost::Message;

const TABLE_KEY: &[u8] = &[cellbank_raft::storage::STATE_PREFIX, b'T'];
const AUDIT_PREFIX: &[u8] = &[cellbank_raft::storage::STATE_PREFIX, b'A'];

/// The table as last applied, for the front door and the coordinator.
pub type TableView = Arc<tokio::sync::watch::Sender<RoutingTable>>;

pub use cellbank_client::slices::{slice_of, SLICES_MAX};

pub fn audit_key(seq: u64) -> Vec<u8> {
    let mut key = AUDIT_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn audit_prefix() -> &'static [u8] {
    AUDIT_PREFIX
}

/// Where a user's requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub slice: u32,
    pub pair_id: u64,
    pub cell_id: u64,
    pub epoch: u64,
    /// The user's slice is moving (the table lists the move): its pair
    /// refuses writes to it until the move ends, so a call waits for the
    /// table instead (see `CellPool::call`).
    pub moving: bool,
}

pub fn route(table: &RoutingTable, user_id: u64) -> Option<Route> {
    if table.slice_count == 0 {
        return None;
    }
    let slice = slice_of(user_id, table.slice_count);
    let pair_id = *table.slice_pair.get(slice as usize)?;
    let pair = find_pair(table, pair_id)?;
    let moving = !table.moves.is_empty() && table.moves.iter().any(|m| m.slice == slice);
    Some(Route { slice, pair_id, cell_id: pair.active_cell_id, epoch: pair.epoch, moving })
}

/// A route to a pair's active cell (for what names a pair, not a user).
pub fn to_pair(pair_id: u64) -> impl Fn(&RoutingTable) -> Option<Route> + Clone {
    move |t| {
        let pair = find_pair(t, pair_id)?;
        Some(Route { slice: 0, pair_id, cell_id: pair.active_cell_id, epoch: pair.epoch, moving: false })
    }
}

pub fn find_pair(table: &RoutingTable, pair_id: u64) -> Option<&Pair> {
    table.pairs.iter().find(|p| p.pair_id == pair_id)
}

pub fn mode(pair: &Pair) -> PairMode {
    PairMode::try_from(pair.mode).unwrap_or(PairMode::Unspecified)
}

pub fn cell_addrs(table: &RoutingTable, cell_id: u64) -> Vec<String> {
    table.cells.iter().find(|c| c.cell_id == cell_id).map(|c| c.replicas.clone()).unwrap_or_default()
}

/// Why a table offered for bootstrap is not a valid table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTable {
    #[error("slice_count: {0} is not in 1..={SLICES_MAX}")]
    SliceCount(u32),
    #[error("slice_pair: one pair per slice")]
    SlicePairLength,
    #[error("cells: id {0} is zero or repeated")]
    CellId(u64),
    #[error("cells: cell {0} has no replicas")]
    NoReplicas(u64),
    #[error("pairs: pair {pair} names unknown cell {cell}")]
    UnknownCell { pair: u64, cell: u64 },
    #[error("pairs: cell {0} is in two pairs")]
    CellInTwoPairs(u64),
    #[error("pairs: pair {0} has no active cell")]
    NoActive(u64),
    #[error("slice_pair: unknown pair {0}")]
    UnknownPair(u64),
}

/// Why the table refused a command: it changed nothing (but the audit log,
/// which records the refusal). The text is what the proposer hears and
/// what the audit log keeps, so it is part of the table's replicated
/// output: a replica of any version writes the same words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableRefusal {
    #[error("the table is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("{0}")]
    Invalid(#[from] InvalidTable),
    #[error("the table is not bootstrapped yet")]
    NotBootstrapped,
    #[error("unknown pair {0}")]
    UnknownPair(u64),
    #[error("pair {pair} is at epoch {epoch}, not {named}")]
    StaleEpoch { pair: u64, epoch: u64, named: u64 },
    #[error("mode: unknown")]
    UnknownMode,
    #[error("pair {pair}: mode {} cannot be set", .mode.as_str_name())]
    ModeCannotBeSet { pair: u64, mode: PairMode },
    #[error("pair {0} has no standby")]
    NoStandby(u64),
    #[error("pair {pair} is at epoch {epoch}; the change must name epoch {}, not {named}", .epoch + 1)]
    NotNextEpoch { pair: u64, epoch: u64, named: u64 },
    #[error("empty command")]
    Empty,
    #[error("pair_id: must be set")]
    PairIdZero,
    #[error("pair {0} already exists")]
    PairExists(u64),
    #[error("cell {0} already exists")]
    CellExists(u64),
    #[error("{cell}: {detail}")]
    BadCell { cell: String, detail: String },
    #[error("address {addr} is already a replica of cell {cell}")]
    AddressTaken { addr: String, cell: u64 },
    #[error("slice {slice}: there are {count} slices (0 to {})", .count - 1)]
    UnknownSlice { slice: u32, count: u32 },
    #[error("slice {slice} already belongs to pair {pair}")]
    SamePair { slice: u32, pair: u64 },
    #[error("slice {slice} is already moving (move {move_id}, to pair {to})")]
    AlreadyMoving { slice: u32, move_id: u64, to: u64 },
    #[error("pair {pair} is {}: {role} pair must be SYNC (or have no standby) for a slice to move", .mode.as_str_name())]
    NotReady { pair: u64, mode: PairMode, role: &'static str },
    #[error("{0} moves are under way; one more waits until one ends")]
    TooManyMoves(usize),
    #[error("no move {0} is under way")]
    UnknownMove(u64),
    #[error("unknown cell {0}")]
    UnknownCell(u64),
    #[error("cell {cell}: {detail}")]
    BadReplicas { cell: u64, detail: String },
}

/// Most slice moves under way at once.
pub const MOVES_MAX: usize = 16;

/// Checks a move of `slice` to `to_pair_id` against `table`: the slice
/// exists and belongs to another pair, no move of it is under way, and
/// both pairs are SYNC (or without a standby). Returns the source pair.
pub fn check_move(table: &RoutingTable, slice: u32, to_pair_id: u64) -> Result<u64, TableRefusal> {
    if table.slice_count == 0 {
        return Err(TableRefusal::NotBootstrapped);
    }
    let from =
        *table.slice_pair.get(slice as usize).ok_or(TableRefusal::UnknownSlice { slice, count: table.slice_count })?;
    let target = find_pair(table, to_pair_id).ok_or(TableRefusal::UnknownPair(to_pair_id))?;
    if from == to_pair_id {
        return Err(TableRefusal::SamePair { slice, pair: from });
    }
    if let Some(moving) = table.moves.iter().find(|m| m.slice == slice) {
        return Err(TableRefusal::AlreadyMoving { slice, move_id: moving.move_id, to: moving.to_pair_id });
    }
    if table.moves.len() >= MOVES_MAX {
        return Err(TableRefusal::TooManyMoves(table.moves.len()));
    }
    let source = find_pair(table, from).ok_or(TableRefusal::UnknownPair(from))?;
    for (pair, role) in [(target, "the target"), (source, "the source")] {
        if !matches!(mode(pair), PairMode::Sync | PairMode::NoStandby) {
            return Err(TableRefusal::NotReady { pair: pair.pair_id, mode: mode(pair), role });
        }
    }
    Ok(from)
}

/// Most replicas a cell added through the table may have (a Raft group
/// larger than this buys no safety and costs every write).
pub const REPLICAS_MAX: usize = 9;
/// Longest replica address (a DNS name of 253 bytes and a port).
pub const ADDRESS_MAX: usize = 260;

/// Checks a pair to add against `table` and returns it as the table will
/// hold it (epoch 1, DEGRADED until its standby holds a copy, or
/// NO_STANDBY) with its cells. The same rule runs at the admin API (for a
/// clear error before anything is proposed) and on apply.
pub fn check_add_pair(
    table: &RoutingTable,
    add: &cellbank_proto::router::AddPair,
) -> Result<(Pair, Vec<CellReplicas>), TableRefusal> {
    if table.slice_count == 0 {
        return Err(TableRefusal::NotBootstrapped);
    }
    if add.pair_id == 0 {
        return Err(TableRefusal::PairIdZero);
    }
    if find_pair(table, add.pair_id).is_some() {
        return Err(TableRefusal::PairExists(add.pair_id));
    }
    let active = add.active.as_ref().ok_or(TableRefusal::Invalid(InvalidTable::NoActive(add.pair_id)))?;
    let cells: Vec<(&str, &CellReplicas)> =
        std::iter::once(("active", active)).chain(add.standby.as_ref().map(|s| ("standby", s))).collect();
    let mut addresses: std::collections::BTreeMap<&str, u64> =
        table.cells.iter().flat_map(|c| c.replicas.iter().map(|a| (a.as_str(), c.cell_id))).collect();
    for (i, (role, cell)) in cells.iter().enumerate() {
        let name = format!("{role} cell {}", cell.cell_id);
        let bad = |detail: String| TableRefusal::BadCell { cell: name.clone(), detail };
        if cell.cell_id == 0 {
            return Err(bad("the cell id must be set".into()));
        }
        if table.cells.iter().any(|c| c.cell_id == cell.cell_id) {
            return Err(TableRefusal::CellExists(cell.cell_id));
        }
        if i == 1 && cell.cell_id == active.cell_id {
            return Err(TableRefusal::Invalid(InvalidTable::CellInTwoPairs(cell.cell_id)));
        }
        if cell.replicas.is_empty() || cell.replicas.len() > REPLICAS_MAX {
            return Err(bad(format!("{} replicas; a cell has 1 to {REPLICAS_MAX}", cell.replicas.len())));
        }
        for addr in &cell.replicas {
            if addr.len() > ADDRESS_MAX {
                return Err(bad(format!("an address of {} bytes; at most {ADDRESS_MAX}", addr.len())));
            }
            cellbank_client::planes::check_process_addr(addr).map_err(bad)?;
            if let Some(owner) = addresses.insert(addr, cell.cell_id) {
                return Err(TableRefusal::AddressTaken { addr: addr.clone(), cell: owner });
            }
        }
    }
    let standby_cell_id = add.standby.as_ref().map(|s| s.cell_id).unwrap_or(0);
    let mode = if standby_cell_id == 0 { PairMode::NoStandby } else { PairMode::Degraded };
    let pair = Pair {
        pair_id: add.pair_id,
        active_cell_id: active.cell_id,
        standby_cell_id,
        mode: mode as i32,
        epoch: 1,
        last_failover_ms: 0,
        mode_seq: 0,
    };
    Ok((pair, cells.into_iter().map(|(_, c)| c.clone()).collect()))
}

/// Checks new replica addresses of a cell against `table`: the cell
/// exists; it keeps 1 to [`REPLICAS_MAX`] distinct, well-formed addresses
/// that no other cell uses; and exactly one address is added or one
/// removed (a replica replaced is added first and removed later, so that
/// the routers can reach the cell's leader at every step).
pub fn check_set_replicas(
    table: &RoutingTable,
    set: &cellbank_proto::router::SetCellReplicas,
) -> Result<(), TableRefusal> {
    if table.slice_count == 0 {
        return Err(TableRefusal::NotBootstrapped);
    }
    let cell = table.cells.iter().find(|c| c.cell_id == set.cell_id).ok_or(TableRefusal::UnknownCell(set.cell_id))?;
    let bad = |detail: String| TableRefusal::BadReplicas { cell: set.cell_id, detail };
    if set.replicas.is_empty() || set.replicas.len() > REPLICAS_MAX {
        return Err(bad(format!("{} replicas; a cell has 1 to {REPLICAS_MAX}", set.replicas.len())));
    }
    let mut seen = std::collections::BTreeSet::new();
    for addr in &set.replicas {
        if addr.len() > ADDRESS_MAX {
            return Err(bad(format!("an address of {} bytes; at most {ADDRESS_MAX}", addr.len())));
        }
        cellbank_client::planes::check_process_addr(addr).map_err(bad)?;
        if !seen.insert(addr.as_str()) {
            return Err(bad(format!("{addr} is listed twice")));
        }
        if let Some(owner) = table.cells.iter().find(|c| c.cell_id != set.cell_id && c.replicas.contains(addr)) {
            return Err(TableRefusal::AddressTaken { addr: addr.clone(), cell: owner.cell_id });
        }
    }
    let added = set.replicas.iter().filter(|a| !cell.replicas.contains(a)).count();
    let removed = cell.replicas.iter().filter(|a| !set.replicas.contains(a)).count();
    if added + removed != 1 {
        return Err(bad(format!(
            "{added} addresses added and {removed} removed; one replica is added or removed at a time"
        )));
    }
    Ok(())
}

/// Checks a table offered for bootstrap.
pub fn check_bootstrap(table: &RoutingTable) -> Result<(), InvalidTable> {
    if table.slice_count == 0 || table.slice_count > SLICES_MAX {
        return Err(InvalidTable::SliceCount(table.slice_count));
    }
    if table.slice_pair.len() != table.slice_count as usize {
        return Err(InvalidTable::SlicePairLength);
    }
    let mut cells = std::collections::BTreeSet::new();
    for cell in &table.cells {
        if cell.cell_id == 0 || !cells.insert(cell.cell_id) {
            return Err(InvalidTable::CellId(cell.cell_id));
        }
        if cell.replicas.is_empty() {
            return Err(InvalidTable::NoReplicas(cell.cell_id));
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for pair in &table.pairs {
        for cell in [pair.active_cell_id, pair.standby_cell_id].into_iter().filter(|c| *c != 0) {
            if !cells.contains(&cell) {
                return Err(InvalidTable::UnknownCell { pair: pair.pair_id, cell });
            }
            if !used.insert(cell) {
                return Err(InvalidTable::CellInTwoPairs(cell));
            }
        }
        if pair.active_cell_id == 0 {
            return Err(InvalidTable::NoActive(pair.pair_id));
        }
    }
    for pair_id in &table.slice_pair {
        if find_pair(table, *pair_id).is_none() {
            return Err(InvalidTable::UnknownPair(*pair_id));
        }
    }
    Ok(())
}

/// How a router's config (the table it would bootstrap) differs from the
/// table the routers hold: the config seeds the table once, and later
/// edits to it change nothing (cells and pairs are added with `AddPair`).
/// Changes of active cell are not differences: the table records them.
pub fn config_drift(seed: &RoutingTable, table: &RoutingTable) -> Vec<String> {
    let mut drift = Vec::new();
    if table.slice_count == 0 {
        return drift;
    }
    if seed.slice_count != table.slice_count {
        drift.push(format!("slice_count {} (the table has {})", seed.slice_count, table.slice_count));
    }
    for cell in &seed.cells {
        match table.cells.iter().find(|c| c.cell_id == cell.cell_id) {
            None => drift.push(format!("cell {} (not in the table)", cell.cell_id)),
            Some(held) if sorted(&held.replicas) != sorted(&cell.replicas) => drift.push(format!(
                "cell {} at {} (the table has {})",
                cell.cell_id,
                cell.replicas.join(","),
                held.replicas.join(",")
            )),
            Some(_) => {}
        }
    }
    for pair in &seed.pairs {
        if find_pair(table, pair.pair_id).is_none() {
            drift.push(format!("pair {} (not in the table)", pair.pair_id));
        }
    }
    drift
}

fn sorted(addrs: &[String]) -> Vec<&String> {
    let mut addrs: Vec<&String> = addrs.iter().collect();
    addrs.sort();
    addrs
}

/// The routing table state machine.
pub struct TableMachine {
    table: RoutingTable,
    view: TableView,
    db: Option<Arc<rocksdb::DB>>,
}

impl TableMachine {
    pub fn new(db: Option<Arc<rocksdb::DB>>, view: TableView) -> TableMachine {
        let mut machine = TableMachine { table: RoutingTable::default(), view, db };
        machine.reload();
        machine
    }

    fn reload(&mut self) {
        if let Some(db) = &self.db {
            self.table = read_table(&cellbank_raft::ReadOnlyDb(db));
            self.view.send_replace(self.table.clone());
        }
    }

    fn apply_command(
        &mut self,
        kv: &mut dyn Kv,
        timestamp_ms: u64,
        command: &TableCommand,
    ) -> Result<Option<String>, TableRefusal> {
        match &command.kind {
            Some(table_command::Kind::Bootstrap(table)) => {
                if self.table.slice_count != 0 {
                    return Err(TableRefusal::AlreadyBootstrapped);
                }
                check_bootstrap(table)?;
                let mut table = table.clone();
                table.slice_epoch = table
                    .slice_pair
                    .iter()
                    .map(|p| find_pair(&table, *p).map(|pair| pair.epoch).unwrap_or(1))
                    .collect();
                table.audit_count = 0;
                self.table = table;
                Ok(None)
            }
            Some(table_command::Kind::SetMode(set)) => {
                let pair = self.pair_mut(set.pair_id)?;
                if pair.epoch != set.epoch {
                    return Err(TableRefusal::StaleEpoch { pair: set.pair_id, epoch: pair.epoch, named: set.epoch });
                }
                let requested = PairMode::try_from(set.mode).map_err(|_| TableRefusal::UnknownMode)?;
                if pair.standby_cell_id == 0 || requested == PairMode::NoStandby || requested == PairMode::Unspecified {
                    return Err(TableRefusal::ModeCannotBeSet { pair: set.pair_id, mode: requested });
                }
                let before = mode(pair);
                pair.mode = requested as i32;
                pair.mode_seq += 1;
                Ok(Some(format!("{} -> {}", before.as_str_name(), requested.as_str_name())))
            }
            Some(table_command::Kind::ChangeActive(change)) => {
                let pair = self.pair_mut(change.pair_id)?;
                if pair.standby_cell_id == 0 {
                    return Err(TableRefusal::NoStandby(change.pair_id));
                }
                if change.new_epoch != pair.epoch + 1 {
                    return Err(TableRefusal::NotNextEpoch {
                        pair: change.pair_id,
                        epoch: pair.epoch,
                        named: change.new_epoch,
                    });
                }
                let requested = PairMode::try_from(change.mode).map_err(|_| TableRefusal::UnknownMode)?;
                std::mem::swap(&mut pair.active_cell_id, &mut pair.standby_cell_id);
                pair.epoch = change.new_epoch;
                pair.mode = requested as i32;
                pair.mode_seq += 1;
                pair.last_failover_ms = timestamp_ms;
                let (pair_id, epoch) = (pair.pair_id, pair.epoch);
                let active = pair.active_cell_id;
                for (slice, owner) in self.table.slice_pair.iter().enumerate() {
                    if *owner == pair_id {
                        self.table.slice_epoch[slice] += 1;
                    }
                }
                Ok(Some(format!("cell {active} is active at epoch {epoch}")))
            }
            Some(table_command::Kind::BeginMove(begin)) => {
                let from = check_move(&self.table, begin.slice, begin.to_pair_id)?;
                self.table.last_move_id += 1;
                let move_id = self.table.last_move_id;
                self.table.moves.push(SliceMove {
                    move_id,
                    slice: begin.slice,
                    from_pair_id: from,
                    to_pair_id: begin.to_pair_id,
                    started_ms: timestamp_ms,
                });
                Ok(Some(format!("move {move_id}: slice {} from pair {from} to pair {}", begin.slice, begin.to_pair_id)))
            }
            Some(table_command::Kind::EndMove(end)) => {
                let position = self
                    .table
                    .moves
                    .iter()
                    .position(|m| m.move_id == end.move_id)
                    .ok_or(TableRefusal::UnknownMove(end.move_id))?;
                let moved = self.table.moves.remove(position);
                let slice = moved.slice as usize;
                if !end.done {
                    return Ok(Some(format!("move {}: rolled back; slice {slice} stays", moved.move_id)))
                        .inspect(|_| write_table(kv, &self.table));
                }
                self.table.slice_pair[slice] = moved.to_pair_id;
                self.table.slice_epoch[slice] += 1;
                Ok(Some(format!(
                    "move {}: slice {slice} is served by pair {} at slice epoch {}",
                    moved.move_id, moved.to_pair_id, self.table.slice_epoch[slice]
                )))
            }
            Some(table_command::Kind::SetReplicas(set)) => {
                check_set_replicas(&self.table, set)?;
                let cell = self.table.cells.iter_mut().find(|c| c.cell_id == set.cell_id).expect("checked");
                let added: Vec<&String> = set.replicas.iter().filter(|a| !cell.replicas.contains(a)).collect();
                let text = match added.first() {
                    Some(addr) => format!("cell {}: replica at {addr} added", set.cell_id),
                    None => {
                        let gone = cell.replicas.iter().find(|a| !set.replicas.contains(a)).expect("checked");
                        format!("cell {}: replica at {gone} removed", set.cell_id)
                    }
                };
                cell.replicas = set.replicas.clone();
                Ok(Some(text))
            }
            Some(table_command::Kind::AddPair(add)) => {
                let (pair, cells) = check_add_pair(&self.table, add)?;
                let text = match pair.standby_cell_id {
                    0 => {
                        format!("pair {}: cell {} active, no standby; no slices yet", pair.pair_id, pair.active_cell_id)
                    }
                    standby => format!(
                        "pair {}: cell {} active, cell {standby} standby, DEGRADED until the standby holds a copy; \
                         no slices yet",
                        pair.pair_id, pair.active_cell_id
                    ),
                };
                self.table.cells.extend(cells);
                self.table.pairs.push(pair);
                Ok(Some(text))
            }
            None => Err(TableRefusal::Empty),
        }
        .inspect(|_| write_table(kv, &self.table))
    }

    fn pair_mut(&mut self, pair_id: u64) -> Result<&mut Pair, TableRefusal> {
        if self.table.slice_count == 0 {
            return Err(TableRefusal::NotBootstrapped);
        }
        self.table.pairs.iter_mut().find(|p| p.pair_id == pair_id).ok_or(TableRefusal::UnknownPair(pair_id))
    }

    fn audit(&mut self, kv: &mut dyn Kv, timestamp_ms: u64, record: &AuditRecord, outcome: &str) {
        self.table.audit_count += 1;
        let record = AuditRecord {
            seq: self.table.audit_count,
            time_ms: timestamp_ms,
            who: record.who.clone(),
            what: format!("{} ({outcome})", record.what),
            why: record.why.clone(),
        };
        kv.put(&audit_key(record.seq), &record.encode_to_vec());
        write_table(kv, &self.table);
    }
}

fn read_table(kv: &dyn Kv) -> RoutingTable {
    match kv.get(TABLE_KEY) {
        Some(bytes) => RoutingTable::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("corrupt routing table: {e}")),
        None => RoutingTable::default(),
    }
}

fn write_table(kv: &mut dyn Kv, table: &RoutingTable) {
    for pair in &table.pairs {
        assert!(pair.epoch >= 1, "pair {} has epoch 0", pair.pair_id);
    }
    kv.put(TABLE_KEY, &table.encode_to_vec());
}

impl StateMachine for TableMachine {
    type Command = TableCommand;
    type Output = TableCommandResult;

    fn encode_batch(&self, commands: Vec<TableCommand>, timestamp_ms: u64) -> Vec<u8> {
        TableBatch { timestamp_ms, commands }.encode_to_vec()
    }

    fn check_entry(data: &[u8]) -> Result<(), String> {
        TableBatch::decode(data).map(|_| ()).map_err(|e| format!("not a table batch: {e}"))
    }

    /// A snapshot holds the table and the audit log, nothing else: each
    /// must decode, or installing it would panic every restart.
    fn check_snapshot_pair(key: &[u8], value: &[u8]) -> Result<(), String> {
        if key == TABLE_KEY {
            let table = RoutingTable::decode(value).map_err(|e| format!("the routing table: {e}"))?;
            if let Some(pair) = table.pairs.iter().find(|p| p.epoch == 0) {
                return Err(format!("the routing table: pair {} has epoch 0", pair.pair_id));
            }
            return Ok(());
        }
        if key.starts_with(AUDIT_PREFIX) && key.len() == AUDIT_PREFIX.len() + 8 {
            return AuditRecord::decode(value).map(|_| ()).map_err(|e| format!("an audit record: {e}"));
        }
        Err(format!("a key the routing table never writes: {key:02x?}"))
    }

    fn apply(&mut self, kv: &mut dyn Kv, index: u64, data: &[u8]) -> Vec<TableCommandResult> {
        let batch = TableBatch::decode(data)
            .unwrap_or_else(|e| panic!("entry {index} is not a table batch ({e}); the log is corrupt"));
        let mut results = Vec::with_capacity(batch.commands.len());
        for command in &batch.commands {
            let outcome = self.apply_command(kv, batch.timestamp_ms, command);
            if let Some(audit) = command.audit.as_ref().filter(|a| !a.what.is_empty()) {
                let text = match &outcome {
                    Ok(Some(change)) => change.clone(),
                    Ok(None) => "done".to_string(),
                    Err(refusal) => format!("refused: {refusal}"),
                };
                self.audit(kv, batch.timestamp_ms, audit, &text);
            }
            results.push(match outcome {
                Ok(change) => TableCommandResult { ok: true, detail: change.unwrap_or_default() },
                Err(refusal) => TableCommandResult { ok: false, detail: refusal.to_string() },
            });
        }
        self.view.send_replace(self.table.clone());
        results
    }

    fn restored(&mut self) {
        self.reload();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use cellbank_proto::router::{CellReplicas, ChangeActive, SetPairMode};

    use super::*;

    fn bootstrap_table() -> RoutingTable {
        let cells = (1..=4).map(|id| CellReplicas { cell_id: id, replicas: vec![format!("127.0.0.1:{id}")] }).collect();
        let pairs = vec![
            Pair {
                pair_id: 1,
                active_cell_id: 1,
                standby_cell_id: 3,
                mode: PairMode::Degraded as i32,
                epoch: 1,
                last_failover_ms: 0,
                mode_seq: 0,
            },
            Pair {
                pair_id: 2,
                active_cell_id: 2,
                standby_cell_id: 4,
                mode: PairMode::Degraded as i32,
                epoch: 1,
                last_failover_ms: 0,
                mode_seq: 0,
            },
        ];
        RoutingTable { slice_count: 4, cells, pairs, slice_pair: vec![1, 2, 1, 2], ..Default::default() }
    }

    fn apply(
        machine: &mut TableMachine,
        kv: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        command: table_command::Kind,
    ) -> TableCommandResult {
        let audit = AuditRecord { who: "tester".into(), what: "act".into(), why: "test".into(), ..Default::default() };
        let data = machine.encode_batch(vec![TableCommand { kind: Some(command), audit: Some(audit) }], 1_000);
        machine.apply(kv, 6, &data).pop().unwrap()
    }

    /// A replica replaced: its new address is added (a host name is fine),
    /// then the old one removed, one at a time; every other change is
    /// refused with the table's words and changes nothing.
    #[test]
    fn replica_addresses_change_one_at_a_time_and_never_to_another_cells() {
        use cellbank_proto::router::SetCellReplicas;
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let mut machine = TableMachine::new(None, view.clone());
        let mut kv = BTreeMap::new();
        let set = |cell_id: u64, replicas: &[&str]| {
            table_command::Kind::SetReplicas(SetCellReplicas {
                cell_id,
                replicas: replicas.iter().map(|a| a.to_string()).collect(),
            })
        };
        let early = apply(&mut machine, &mut kv, set(1, &["127.0.0.1:1"]));
        assert_eq!(early.detail, "the table is not bootstrapped yet");
        assert!(apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(bootstrap_table())).ok);
        let before = view.borrow().cells.clone();
        let long = format!("{}:7000", "h".repeat(ADDRESS_MAX));
        for (command, refusal) in [
            (set(9, &["127.0.0.1:1", "a:1"]), "unknown cell 9".to_string()),
            (set(1, &[]), "cell 1: 0 replicas; a cell has 1 to 9".into()),
            (set(1, &["127.0.0.1:1", "127.0.0.1:2"]), "address 127.0.0.1:2 is already a replica of cell 2".into()),
            (set(1, &["127.0.0.1:1", "nowhere"]), "cell 1: \"nowhere\" is not host:port".into()),
            (set(1, &["127.0.0.1:1", "a:7000", "a:7000"]), "cell 1: a:7000 is listed twice".into()),
            (
                set(1, &["a:7000", "b:7000"]),
                "cell 1: 2 addresses added and 1 removed; one replica is added or removed at a time".into(),
            ),
            (
                set(1, &["127.0.0.1:1"]),
                "cell 1: 0 addresses added and 0 removed; one replica is added or removed at a time".into(),
            ),
            (
                set(1, &["127.0.0.1:1", &long]),
                format!("cell 1: an address of {} bytes; at most {ADDRESS_MAX}", long.len()),
            ),
        ] {
            let result = apply(&mut machine, &mut kv, command);
            assert!(!result.ok);
            assert_eq!(result.detail, refusal);
        }
        assert_eq!(view.borrow().cells, before);
        let added = apply(&mut machine, &mut kv, set(1, &["127.0.0.1:1", "cell-1-d.example:7140"]));
        assert_eq!(added.detail, "cell 1: replica at cell-1-d.example:7140 added");
        assert_eq!(cell_addrs(&view.borrow(), 1), vec!["127.0.0.1:1", "cell-1-d.example:7140"]);
        let removed = apply(&mut machine, &mut kv, set(1, &["cell-1-d.example:7140"]));
        assert_eq!(removed.detail, "cell 1: replica at 127.0.0.1:1 removed");
        assert_eq!(cell_addrs(&view.borrow(), 1), vec!["cell-1-d.example:7140"]);
        // The old address is free again, for another cell's replica too.
        assert!(apply(&mut machine, &mut kv, set(2, &["127.0.0.1:2", "127.0.0.1:1"])).ok);
    }

    #[test]
    fn slices_are_stable_and_spread() {
        assert_eq!(slice_of(1, 64), slice_of(1, 64));
        let mut counts = [0u32; 8];
        for user in 0..8_000u64 {
            counts[slice_of(user, 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "uneven spread: {counts:?}");
    }

    #[test]
    fn change_active_swaps_the_pair_and_bumps_every_slice_epoch_once() {
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let mut machine = TableMachine::new(None, view.clone());
        let mut kv = BTreeMap::new();
        assert!(apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(bootstrap_table())).ok);
        let change = ChangeActive { pair_id: 1, new_epoch: 2, mode: PairMode::Degraded as i32 };
        assert!(apply(&mut machine, &mut kv, table_command::Kind::ChangeActive(change)).ok);
        let table = view.borrow().clone();
        assert_eq!(find_pair(&table, 1).unwrap().active_cell_id, 3);
        assert_eq!(table.slice_epoch, vec![2, 1, 2, 1]);
        assert_eq!(route(&table, 0).map(|r| r.epoch), Some(table.slice_epoch[slice_of(0, 4) as usize]));
        // The same change again names a stale epoch and changes nothing.
        let again = apply(&mut machine, &mut kv, table_command::Kind::ChangeActive(change));
        assert!(!again.ok, "{}", again.detail);
        assert_eq!(find_pair(&view.borrow(), 1).unwrap().active_cell_id, 3);
        assert_eq!(view.borrow().audit_count, 3, "every action is audited, refusals too");
    }

    #[test]
    fn bad_commands_are_refused_and_change_nothing() {
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let mut machine = TableMachine::new(None, view.clone());
        let mut kv = BTreeMap::new();
        let early =
            apply(&mut machine, &mut kv, table_command::Kind::SetMode(SetPairMode { pair_id: 1, epoch: 1, mode: 1 }));
        assert!(!early.ok);
        assert_eq!(early.detail, "the table is not bootstrapped yet");
        let mut broken = bootstrap_table();
        broken.slice_pair = vec![1, 2, 1, 9];
        let refused = apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(broken));
        assert!(!refused.ok);
        assert_eq!(refused.detail, "slice_pair: unknown pair 9");
        assert!(apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(bootstrap_table())).ok);
        let before = view.borrow().pairs.clone();
        // The words are the table's replicated output (the proposer's answer
        // and the audit log): a new version must write the same ones.
        for (command, refusal) in [
            (table_command::Kind::SetMode(SetPairMode { pair_id: 9, epoch: 1, mode: 1 }), "unknown pair 9"),
            (
                table_command::Kind::SetMode(SetPairMode { pair_id: 1, epoch: 7, mode: 1 }),
                "pair 1 is at epoch 1, not 7",
            ),
            (table_command::Kind::SetMode(SetPairMode { pair_id: 1, epoch: 1, mode: 99 }), "mode: unknown"),
            (
                table_command::Kind::SetMode(SetPairMode { pair_id: 1, epoch: 1, mode: PairMode::NoStandby as i32 }),
                "pair 1: mode PAIR_MODE_NO_STANDBY cannot be set",
            ),
            (
                table_command::Kind::ChangeActive(ChangeActive { pair_id: 1, new_epoch: 5, mode: 1 }),
                "pair 1 is at epoch 1; the change must name epoch 2, not 5",
            ),
            (table_command::Kind::Bootstrap(bootstrap_table()), "the table is already bootstrapped"),
        ] {
            let result = apply(&mut machine, &mut kv, command);
            assert!(!result.ok);
            assert_eq!(result.detail, refusal);
        }
        assert_eq!(view.borrow().pairs, before);
    }

    fn cell(cell_id: u64, ports: &[u16]) -> CellReplicas {
        CellReplicas { cell_id, replicas: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect() }
    }

    fn add(pair_id: u64, active: CellReplicas, standby: Option<CellReplicas>) -> table_command::Kind {
        table_command::Kind::AddPair(cellbank_proto::router::AddPair { pair_id, active: Some(active), standby })
    }

    #[test]
    fn a_pair_is_added_with_new_cells_and_no_slices() {
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let mut machine = TableMachine::new(None, view.clone());
        let mut kv = BTreeMap::new();
        let early = apply(&mut machine, &mut kv, add(3, cell(5, &[100]), None));
        assert_eq!(early.detail, "the table is not bootstrapped yet");
        assert!(apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(bootstrap_table())).ok);
        let added = apply(&mut machine, &mut kv, add(3, cell(5, &[500, 510, 520]), Some(cell(6, &[600, 610]))));
        assert!(added.ok, "{}", added.detail);
        let table = view.borrow().clone();
        let pair = find_pair(&table, 3).unwrap();
        assert_eq!((pair.active_cell_id, pair.standby_cell_id, pair.epoch), (5, 6, 1));
        assert_eq!(mode(pair), PairMode::Degraded);
        assert_eq!(cell_addrs(&table, 5), vec!["127.0.0.1:500", "127.0.0.1:510", "127.0.0.1:520"]);
        assert_eq!(cell_addrs(&table, 6).len(), 2);
        assert!(table.slice_pair.iter().all(|p| *p != 3), "a new pair has no slices");
        assert_eq!(table.slice_count, 4);
        let lone = apply(&mut machine, &mut kv, add(4, cell(7, &[700]), None));
        assert!(lone.ok, "{}", lone.detail);
        assert_eq!(mode(find_pair(&view.borrow(), 4).unwrap()), PairMode::NoStandby);
        // What a restarted router reads back.
        assert_eq!(read_table(&kv), view.borrow().clone());

        let before = view.borrow().clone();
        let long = format!("{}.example:7000", "h".repeat(ADDRESS_MAX));
        for (command, refusal) in [
            (add(0, cell(9, &[900]), None), "pair_id: must be set".to_string()),
            (add(1, cell(9, &[900]), None), "pair 1 already exists".into()),
            (add(9, cell(2, &[900]), None), "cell 2 already exists".into()),
            (add(9, cell(9, &[900]), Some(cell(6, &[901]))), "cell 6 already exists".into()),
            (add(9, cell(9, &[900]), Some(cell(9, &[901]))), "pairs: cell 9 is in two pairs".into()),
            (add(9, cell(0, &[900]), None), "active cell 0: the cell id must be set".into()),
            (add(9, cell(9, &[]), None), "active cell 9: 0 replicas; a cell has 1 to 9".into()),
            (add(9, cell(9, &[900; 10]), None), "active cell 9: 10 replicas; a cell has 1 to 9".into()),
            (add(9, cell(9, &[500]), None), "address 127.0.0.1:500 is already a replica of cell 5".into()),
            (add(9, cell(9, &[900, 900]), None), "address 127.0.0.1:900 is already a replica of cell 9".into()),
            (add(9, cell(9, &[900]), Some(cell(10, &[900]))), "address 127.0.0.1:900 is already a replica of cell 9".into()),
            (
                add(9, CellReplicas { cell_id: 9, replicas: vec!["no-port".into()] }, None),
                "active cell 9: \"no-port\" is not host:port".into(),
            ),
            (
                add(9, CellReplicas { cell_id: 9, replicas: vec!["127.0.0.1:65535".into()] }, None),
                "active cell 9: \"127.0.0.1:65535\": the port must leave room for the peer and admin planes (at most 65533)".into(),
            ),
            (
                add(9, CellReplicas { cell_id: 9, replicas: vec![long.clone()] }, None),
                format!("active cell 9: an address of {} bytes; at most {ADDRESS_MAX}", long.len()),
            ),
            (
                table_command::Kind::AddPair(cellbank_proto::router::AddPair { pair_id: 9, active: None, standby: None }),
                "pairs: pair 9 has no active cell".into(),
            ),
        ] {
            let result = apply(&mut machine, &mut kv, command);
            assert!(!result.ok);
            assert_eq!(result.detail, refusal);
        }
        let after = view.borrow().clone();
        assert_eq!((after.cells, after.pairs, after.slice_pair), (before.cells, before.pairs, before.slice_pair));
    }

    #[test]
    fn a_move_is_recorded_from_begin_to_end_and_refused_when_it_cannot_be() {
        use cellbank_proto::router::{BeginMove, EndMove};
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let mut machine = TableMachine::new(None, view.clone());
        let mut kv = BTreeMap::new();
        let begin = |slice, to_pair_id| table_command::Kind::BeginMove(BeginMove { slice, to_pair_id });
        let end = |move_id, done| table_command::Kind::EndMove(EndMove { move_id, done });
        assert!(!apply(&mut machine, &mut kv, begin(0, 2)).ok, "no table yet");
        assert!(apply(&mut machine, &mut kv, table_command::Kind::Bootstrap(bootstrap_table())).ok);
        // Both pairs DEGRADED: neither may take or give a slice.
        let degraded = apply(&mut machine, &mut kv, begin(0, 2));
        assert_eq!(
            degraded.detail,
            "pair 2 is PAIR_MODE_DEGRADED: the target pair must be SYNC (or have no standby) for a slice to move"
        );
        for pair_id in [1, 2] {
            let sync = table_command::Kind::SetMode(SetPairMode { pair_id, epoch: 1, mode: PairMode::Sync as i32 });
            assert!(apply(&mut machine, &mut kv, sync).ok);
        }
        let before = view.borrow().clone();
        for (command, refusal) in [
            (begin(4, 2), "slice 4: there are 4 slices (0 to 3)"),
            (begin(0, 9), "unknown pair 9"),
            (begin(0, 1), "slice 0 already belongs to pair 1"),
            (end(1, true), "no move 1 is under way"),
        ] {
            let result = apply(&mut machine, &mut kv, command);
            assert!(!result.ok);
            assert_eq!(result.detail, refusal);
        }
        assert_eq!(view.borrow().slice_pair, before.slice_pair);
        let begun = apply(&mut machine, &mut kv, begin(0, 2));
        assert_eq!(begun.detail, "move 1: slice 0 from pair 1 to pair 2");
        let twice = apply(&mut machine, &mut kv, begin(0, 2));
        assert_eq!(twice.detail, "slice 0 is already moving (move 1, to pair 2)");
        assert_eq!(view.borrow().moves.len(), 1);
        assert_eq!(view.borrow().slice_pair, before.slice_pair, "the slice is served where it was until the end");
        let done = apply(&mut machine, &mut kv, end(1, true));
        assert_eq!(done.detail, "move 1: slice 0 is served by pair 2 at slice epoch 2");
        let table = view.borrow().clone();
        assert_eq!(table.slice_pair, vec![2, 2, 1, 2]);
        assert_eq!(table.slice_epoch, vec![2, 1, 1, 1]);
        assert!(table.moves.is_empty());
        assert!(!apply(&mut machine, &mut kv, end(1, true)).ok, "ended once");
        // A move rolled back leaves the slice where it was.
        assert!(apply(&mut machine, &mut kv, begin(2, 2)).ok);
        let rolled = apply(&mut machine, &mut kv, end(2, false));
        assert_eq!(rolled.detail, "move 2: rolled back; slice 2 stays");
        assert_eq!(view.borrow().slice_pair, vec![2, 2, 1, 2]);
        // A change of active grows its slices' epochs by one, moved or not.
        let change = ChangeActive { pair_id: 2, new_epoch: 2, mode: PairMode::Degraded as i32 };
        assert!(apply(&mut machine, &mut kv, table_command::Kind::ChangeActive(change)).ok);
        assert_eq!(view.borrow().slice_epoch, vec![3, 2, 1, 2]);
        // The source degraded: refused.
        let source = apply(&mut machine, &mut kv, begin(1, 1));
        assert_eq!(
            source.detail,
            "pair 2 is PAIR_MODE_DEGRADED: the source pair must be SYNC (or have no standby) for a slice to move"
        );
        assert_eq!(read_table(&kv), view.borrow().clone());
    }

    #[test]
    fn a_config_that_differs_from_the_table_is_named() {
        let table = bootstrap_table();
        assert!(config_drift(&table, &RoutingTable::default()).is_empty(), "no table yet: nothing to compare");
        assert!(config_drift(&table, &table).is_empty());
        // A failover swaps the active in the table, not a difference.
        let mut failed_over = table.clone();
        failed_over.pairs[0].active_cell_id = 3;
        failed_over.pairs[0].standby_cell_id = 1;
        assert!(config_drift(&table, &failed_over).is_empty());
        let mut edited = table.clone();
        edited.slice_count = 8;
        edited.cells[1].replicas = vec!["127.0.0.1:9".into()];
        edited.cells.push(cell(5, &[500]));
        edited.pairs.push(Pair { pair_id: 3, ..table.pairs[0] });
        assert_eq!(
            config_drift(&edited, &table),
            vec![
                "slice_count 8 (the table has 4)".to_string(),
                "cell 2 at 127.0.0.1:9 (the table has 127.0.0.1:2)".into(),
                "cell 5 (not in the table)".into(),
                "pair 3 (not in the table)".into(),
            ]
        );
    }

    #[test]
    fn a_snapshot_pair_must_be_the_table_or_an_audit_record() {
        use cellbank_raft::StateMachine;
        let table = RoutingTable { slice_count: 4, ..Default::default() };
        assert!(TableMachine::check_snapshot_pair(TABLE_KEY, &table.encode_to_vec()).is_ok());
        assert!(TableMachine::check_snapshot_pair(TABLE_KEY, &[0xff, 0xff, 0xff]).is_err());
        let zero_epoch = RoutingTable { pairs: vec![Pair { pair_id: 1, ..Default::default() }], ..Default::default() };
        assert!(TableMachine::check_snapshot_pair(TABLE_KEY, &zero_epoch.encode_to_vec()).is_err());
        let record = AuditRecord { seq: 1, what: "x".into(), ..Default::default() };
        assert!(TableMachine::check_snapshot_pair(&audit_key(1), &record.encode_to_vec()).is_ok());
        assert!(TableMachine::check_snapshot_pair(&audit_key(1), &[0xff]).is_err());
        assert!(TableMachine::check_snapshot_pair(&[cellbank_raft::storage::STATE_PREFIX, b'Q'], b"").is_err());
    }
}
