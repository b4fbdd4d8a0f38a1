//! A cell's pair state: its role in an active/standby pair, the routing
//! epoch, the replication mode, and (on a standby) the source index it
//! holds. It is ledger state, changed only through the cell's own log, so
//! every replica takes the same decisions at the same index:
//! - Client writes apply only while the cell is UNPAIRED or ACTIVE; a write
//!   that reaches the log after the cell was fenced or demoted is answered
//!   `CELL_NOT_WRITABLE` and leaves no trace (no transfer record).
//! - A configure command with an older epoch than the cell's is refused;
//!   epochs never go back.
//! - A standby applies the source's entries in source index order, each
//!   once: entries at or below its source index are skipped, a gap is
//!   refused. They replay under a copy of the source's own pair state (the
//!   "source slot"), so a write the source refused is refused again.
//! - The pair state lives under `0x04 'z'`, outside the ledger region that
//!   digests compare and source snapshots copy.
//! - Deposition is durable: a cell that learns its pair moved to a later
//!   epoch records it with a `Depose` command ([`depose`]); from then on it
//!   takes no writes and ships nothing, whatever leader or restart follows,
//!   until the coordinator configures it at that epoch or later.
//! - [`History`] remembers, in memory, which pair state was in force at
//!   which log index, so that a waiter for an entry judges the standby's
//!   acknowledgements against the configuration the entry applied under.

use std::collections::VecDeque;

use cellbank_proto::cell::{PairRole, PairState, ReplicationMode};
use prost::Message;

pub use cellbank_client::pair::{deposed, mode, role, role_writable, ships, waits_for_standby, writable};
use cellbank_raft::storage::STATE_PREFIX;
use cellbank_raft::Kv;

/// The ledger region: `[LEDGER_START, LEDGER_END)`.
pub const LEDGER_START: &[u8] = &[STATE_PREFIX];
pub const LEDGER_END: &[u8] = &[STATE_PREFIX, b'z'];
/// This cell's own pair state.
pub const OWN_PAIR_KEY: &[u8] = &[STATE_PREFIX, b'z', b'p'];
/// On a standby: the source's pair state, under which its entries replay.
pub const SOURCE_PAIR_KEY: &[u8] = &[STATE_PREFIX, b'z', b's'];

/// Which pair state an apply consults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Own,
    Source,
}

impl Slot {
    pub fn key(self) -> &'static [u8] {
        match self {
            Slot::Own => OWN_PAIR_KEY,
            Slot::Source => SOURCE_PAIR_KEY,
        }
    }
}

pub fn read(kv: &dyn Kv, slot: Slot) -> PairState {
    match kv.get(slot.key()) {
        Some(bytes) => PairState::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("corrupt pair state under {:02x?}: {e}", slot.key())),
        None => unpaired(),
    }
}

pub fn write(kv: &mut dyn Kv, slot: Slot, state: &PairState) {
    kv.put(slot.key(), &state.encode_to_vec());
}

/// The state of a cell that has never been configured: takes writes, has no
/// standby, epoch 0.
pub fn unpaired() -> PairState {
    PairState { role: PairRole::Unpaired as i32, mode: ReplicationMode::Async as i32, ..Default::default() }
}

/// Why a configure command is refused (it changes nothing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigureRefusal {
    #[error("epoch {requested} is older than the cell's epoch {current}")]
    OlderEpoch { requested: u64, current: u64 },
    #[error("epoch {requested} is older than epoch {deposed_by}, which deposed this cell")]
    DeposedBy { requested: u64, deposed_by: u64 },
    #[error("a coordinator of term {requested} was superseded (the cell follows term {current})")]
    SupersededCoordinator { requested: u64, current: u64 },
    #[error("mode change {requested} is older than mode change {current}, which configured this cell")]
    OlderModeChange { requested: u64, current: u64 },
    #[error("a paired cell cannot become unpaired")]
    Unpairing,
    #[error("a standby needs a source cell")]
    StandbyWithoutSource,
    #[error(
        "this standby holds no complete copy of cell {source_cell_id} (source index {source_index}, rebuilding \
         from {rebuild_snapshot_index}); it cannot become active"
    )]
    IncompleteCopy { source_cell_id: u64, source_index: u64, rebuild_snapshot_index: u64 },
}

/// The state after a configure command at `index`, or why it is refused.
/// `force_rebuild`: an operator's rebuild, which starts again even when the
/// cell already copies the requested source at the requested epoch.
pub fn configure(
    current: &PairState,
    requested: &PairState,
    index: u64,
    force_rebuild: bool,
) -> Result<PairState, ConfigureRefusal> {
    if requested.epoch < current.epoch {
        return Err(ConfigureRefusal::OlderEpoch { requested: requested.epoch, current: current.epoch });
    }
    if requested.epoch < current.deposed_by_epoch {
        return Err(ConfigureRefusal::DeposedBy { requested: requested.epoch, deposed_by: current.deposed_by_epoch });
    }
    if requested.coordinator_term < current.coordinator_term {
        return Err(ConfigureRefusal::SupersededCoordinator {
            requested: requested.coordinator_term,
            current: current.coordinator_term,
        });
    }
    let requested_role = role(requested);
    // An active's configures are ordered by the table's mode changes: one
    // from an older change (a configure that arrived late) is refused.
    if requested_role == PairRole::Active
        && requested.epoch == current.epoch
        && requested.mode_seq != 0
        && requested.mode_seq < current.mode_seq
    {
        return Err(ConfigureRefusal::OlderModeChange { requested: requested.mode_seq, current: current.mode_seq });
    }
    if requested_role == PairRole::Unpaired && current.epoch > 0 {
        return Err(ConfigureRefusal::Unpairing);
    }
    if requested_role == PairRole::Standby && requested.source_cell_id == 0 {
        return Err(ConfigureRefusal::StandbyWithoutSource);
    }
    // A standby is promoted only with a complete copy: never while it is
    // being rebuilt, never when it holds nothing.
    if role(current) == PairRole::Standby
        && requested_role == PairRole::Active
        && (current.source_index == 0 || current.rebuild_snapshot_index != 0)
    {
        return Err(ConfigureRefusal::IncompleteCopy {
            source_cell_id: current.source_cell_id,
            source_index: current.source_index,
            rebuild_snapshot_index: current.rebuild_snapshot_index,
        });
    }
    let mut next = requested.clone();
    // At or past the epoch that deposed it, the cell serves again as told.
    next.deposed_by_epoch = 0;
    next.rebuild_snapshot_index = 0;
    next.rebuild_next_chunk = 0;
    if requested_role == PairRole::Standby {
        let same_source = role(current) == PairRole::Standby && current.source_cell_id == requested.source_cell_id;
        // A standby that keeps its source keeps what it holds unless told
        // to rebuild (source_index 0); a new source brings its own index.
        // A rebuild request for a copy of this very source at this very
        // epoch was already taken (a coordinator that judged by a status
        // from before its first request sends it again): the rebuild under
        // way, or done, goes on. Starting it again would leave the copy
        // incomplete for longer, and a failover that saw it complete would
        // find it refusing to be promoted (simulator, seed 40608). Only an
        // operator's rebuild starts again.
        let rebuild_taken = same_source && requested.epoch == current.epoch && !force_rebuild;
        let keeps_copy = same_source && (requested.source_index != 0 || rebuild_taken);
        if keeps_copy {
            next.source_index = current.source_index.max(requested.source_index);
        }
        if keeps_copy && current.rebuild_snapshot_index != 0 {
            next.rebuild_snapshot_index = current.rebuild_snapshot_index;
            next.rebuild_next_chunk = current.rebuild_next_chunk;
        }
    } else {
        next.source_cell_id = 0;
        next.source_index = 0;
    }
    if !ships(&next) {
        next.standby_cell_id = 0;
        next.standby_addrs.clear();
    }
    let was_sync = waits_for_standby(current);
    next.sync_since_index = match (was_sync, waits_for_standby(&next)) {
        (true, true) => current.sync_since_index,
        (_, true) => index,
        (_, false) => 0,
    };
    Ok(next)
}

/// The state after a `Depose { by_epoch }` command, or `None` when it
/// changes nothing (not later than the cell's epoch, or already known).
pub fn depose(current: &PairState, by_epoch: u64) -> Option<PairState> {
    if by_epoch <= current.epoch || by_epoch <= current.deposed_by_epoch {
        return None;
    }
    Some(PairState { deposed_by_epoch: by_epoch, ..current.clone() })
}

/// The part of a pair state a waiter judges by: role, epoch, mode, standby,
/// deposition (not the standby's addresses or source index). Copied
/// without allocating, once per waiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticket {
    pub epoch: u64,
    pub role: i32,
    pub mode: i32,
    pub standby_cell_id: u64,
    pub deposed_by_epoch: u64,
}

impl Ticket {
    pub fn of(state: &PairState) -> Ticket {
        Ticket {
            epoch: state.epoch,
            role: state.role,
            mode: state.mode,
            standby_cell_id: state.standby_cell_id,
            deposed_by_epoch: state.deposed_by_epoch,
        }
    }

    /// As a pair state (no addresses: nothing is allocated), for the rules above.
    pub fn as_state(&self) -> PairState {
        PairState {
            epoch: self.epoch,
            role: self.role,
            mode: self.mode,
            standby_cell_id: self.standby_cell_id,
            deposed_by_epoch: self.deposed_by_epoch,
            ..Default::default()
        }
    }
}

/// Pair states remembered by [`History`]; an entry older than all of them
/// has no known configuration and is never acknowledged.
pub const HISTORY_CHANGES_MAX: usize = 64;

/// Which pair state was in force from which log index on (in memory; a
/// restart starts it again at the applied index, when no waiter exists).
#[derive(Clone, Debug, Default)]
pub struct History {
    /// (first index, state), oldest first.
    changes: VecDeque<(u64, Ticket)>,
}

impl History {
    /// Starts again: `state` is in force from `index` on, nothing before it is known.
    pub fn reset(&mut self, index: u64, state: &PairState) {
        self.changes.clear();
        self.changes.push_back((index, Ticket::of(state)));
    }

    /// Notes the state applied at `index` (a no-op unless it changes what
    /// waiters judge by).
    pub fn record(&mut self, index: u64, state: &PairState) {
        let ticket = Ticket::of(state);
        if let Some((last_index, last)) = self.changes.back() {
            assert!(index >= *last_index, "pair history goes back from {last_index} to {index}");
            if *last == ticket {
                return;
            }
        }
        if self.changes.len() >= HISTORY_CHANGES_MAX {
            self.changes.pop_front();
        }
        self.changes.push_back((index, ticket));
    }

    /// The state an entry at `index` applied under. A change at `index`
    /// itself counts (a command before it in the same entry applied under
    /// the older state, which can only make the waiter stricter: see the
    /// acknowledgement rule in `replication.rs`). `None` when the history no
    /// longer reaches back that far.
    pub fn at(&self, index: u64) -> Option<Ticket> {
        self.changes.iter().rev().find(|(from, _)| *from <= index).map(|(_, ticket)| *ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: u64, role: PairRole, mode: ReplicationMode) -> PairState {
        PairState { epoch, role: role as i32, mode: mode as i32, ..Default::default() }
    }

    #[test]
    fn epochs_never_go_back() {
        let current = state(3, PairRole::Active, ReplicationMode::Sync);
        let older = state(2, PairRole::Standby, ReplicationMode::Sync);
        assert_eq!(
            configure(&current, &older, 10, false),
            Err(ConfigureRefusal::OlderEpoch { requested: 2, current: 3 })
        );
    }

    #[test]
    fn a_superseded_coordinator_is_refused() {
        let mut current = state(2, PairRole::Active, ReplicationMode::Sync);
        current.coordinator_term = 9;
        let mut stale = current.clone();
        stale.coordinator_term = 8;
        stale.mode = ReplicationMode::Async as i32;
        assert_eq!(
            configure(&current, &stale, 10, false),
            Err(ConfigureRefusal::SupersededCoordinator { requested: 8, current: 9 })
        );
        stale.coordinator_term = 10;
        assert_eq!(configure(&current, &stale, 10, false).unwrap().coordinator_term, 10);
    }

    #[test]
    fn sync_since_marks_the_switch_to_sync() {
        let mut degraded = state(1, PairRole::Active, ReplicationMode::Async);
        degraded.standby_cell_id = 2;
        let mut sync = degraded.clone();
        sync.mode = ReplicationMode::Sync as i32;
        let next = configure(&degraded, &sync, 42, false).unwrap();
        assert_eq!(next.sync_since_index, 42);
        assert!(waits_for_standby(&next));
        let again = configure(&next, &sync, 50, false).unwrap();
        assert_eq!(again.sync_since_index, 42, "staying in sync keeps the index it started at");
        let back = configure(&again, &degraded, 60, false).unwrap();
        assert_eq!(back.sync_since_index, 0);
        assert!(!waits_for_standby(&back));
    }

    #[test]
    fn a_standby_keeps_its_copy_unless_told_to_rebuild() {
        let mut standby = state(1, PairRole::Standby, ReplicationMode::Sync);
        standby.source_cell_id = 1;
        standby.source_index = 500;
        let mut again = standby.clone();
        again.source_index = 7;
        assert_eq!(configure(&standby, &again, 9, false).unwrap().source_index, 500);
        // An operator's rebuild starts again.
        again.source_index = 0;
        assert_eq!(configure(&standby, &again, 9, true).unwrap().source_index, 0);
        // The coordinator's rebuild of a copy of this source at this epoch
        // was already taken: the copy, or the rebuild under way, stays.
        assert_eq!(configure(&standby, &again, 9, false).unwrap().source_index, 500);
        let mut rebuilding = standby.clone();
        rebuilding.source_index = 0;
        rebuilding.rebuild_snapshot_index = 640;
        rebuilding.rebuild_next_chunk = 3;
        let next = configure(&rebuilding, &again, 9, false).unwrap();
        assert_eq!((next.source_index, next.rebuild_snapshot_index, next.rebuild_next_chunk), (0, 640, 3));
        let next = configure(&rebuilding, &again, 9, true).unwrap();
        assert_eq!((next.source_index, next.rebuild_snapshot_index, next.rebuild_next_chunk), (0, 0, 0));
        // The same source at a later epoch (its history may have forked
        // since): rebuilt.
        let mut later = again.clone();
        later.epoch = 3;
        assert_eq!(configure(&standby, &later, 9, false).unwrap().source_index, 0);
        let mut other_source = standby.clone();
        other_source.epoch = 2;
        other_source.source_cell_id = 3;
        other_source.source_index = 77;
        assert_eq!(configure(&standby, &other_source, 9, false).unwrap().source_index, 77);
    }

    #[test]
    fn a_standby_without_a_complete_copy_is_never_promoted() {
        let mut standby = state(1, PairRole::Standby, ReplicationMode::Sync);
        standby.source_cell_id = 1;
        let promote = state(2, PairRole::Active, ReplicationMode::Async);
        assert!(matches!(
            configure(&standby, &promote, 9, false),
            Err(ConfigureRefusal::IncompleteCopy { source_cell_id: 1, source_index: 0, .. })
        ));
        standby.source_index = 40;
        standby.rebuild_snapshot_index = 90;
        assert!(configure(&standby, &promote, 9, false).is_err(), "mid-rebuild");
        standby.rebuild_snapshot_index = 0;
        assert_eq!(role(&configure(&standby, &promote, 9, false).unwrap()), PairRole::Active);
    }

    #[test]
    fn a_fenced_active_still_waits_for_its_standby() {
        let mut fenced = state(1, PairRole::Fenced, ReplicationMode::Sync);
        fenced.standby_cell_id = 2;
        assert!(waits_for_standby(&fenced));
        assert!(!writable(&fenced));
    }

    #[test]
    fn a_deposition_is_kept_until_a_configure_reaches_its_epoch() {
        let mut active = state(1, PairRole::Active, ReplicationMode::Sync);
        active.standby_cell_id = 3;
        assert!(depose(&active, 1).is_none(), "not later than the cell's epoch");
        let gone = depose(&active, 2).expect("a later epoch deposes");
        assert!(deposed(&gone) && !writable(&gone) && !ships(&gone) && !waits_for_standby(&gone));
        assert!(depose(&gone, 2).is_none(), "already known");
        // A stale coordinator's view (the old epoch) cannot revive it.
        let mut stale = active.clone();
        stale.coordinator_term = 7;
        assert!(matches!(configure(&gone, &stale, 9, false), Err(ConfigureRefusal::DeposedBy { .. })));
        // The coordinator's configure at the new epoch (as a standby) clears it.
        let mut standby = state(2, PairRole::Standby, ReplicationMode::Sync);
        standby.source_cell_id = 3;
        let next = configure(&gone, &standby, 10, false).unwrap();
        assert_eq!(next.deposed_by_epoch, 0);
        assert_eq!(role(&next), PairRole::Standby);
    }

    #[test]
    fn the_history_answers_the_state_an_index_applied_under() {
        let mut history = History::default();
        assert!(history.at(5).is_none());
        let sync = PairState { standby_cell_id: 3, ..state(1, PairRole::Active, ReplicationMode::Sync) };
        history.reset(10, &sync);
        assert!(history.at(9).is_none(), "before the start nothing is known");
        assert_eq!(history.at(10), Some(Ticket::of(&sync)));
        // A standby's source index moving is not a change for waiters.
        history.record(12, &PairState { source_index: 99, ..sync.clone() });
        let degraded = PairState { mode: ReplicationMode::Async as i32, ..sync.clone() };
        history.record(20, &degraded);
        assert_eq!(history.at(19), Some(Ticket::of(&sync)));
        assert_eq!(history.at(20), Some(Ticket::of(&degraded)), "a change at the index itself counts");
        assert_eq!(history.at(1000), Some(Ticket::of(&degraded)));
        assert_eq!(history.at(20).unwrap().as_state(), degraded, "a ticket is the state without addresses");
        for index in 0..HISTORY_CHANGES_MAX as u64 {
            let epoch = PairState { epoch: 2 + index, ..degraded.clone() };
            history.record(30 + index, &epoch);
        }
        assert!(history.at(20).is_none(), "the oldest changes were forgotten");
    }

    #[test]
    fn only_writable_roles_take_writes() {
        assert!(writable(&unpaired()));
        assert!(writable(&state(1, PairRole::Active, ReplicationMode::Sync)));
        assert!(!writable(&state(1, PairRole::Standby, ReplicationMode::Sync)));
        assert!(!writable(&state(1, PairRole::Fenced, ReplicationMode::Sync)));
    }

    #[test]
    fn an_active_refuses_a_configure_from_an_older_mode_change() {
        let mut current = state(2, PairRole::Active, ReplicationMode::Sync);
        current.standby_cell_id = 4;
        current.mode_seq = 5;
        let mut late = PairState { mode: ReplicationMode::Async as i32, ..current.clone() };
        late.mode_seq = 4;
        assert_eq!(
            configure(&current, &late, 10, false),
            Err(ConfigureRefusal::OlderModeChange { requested: 4, current: 5 })
        );
        // The same or a later change applies; 0 (an operator's own
        // configure) is not sequenced.
        late.mode_seq = 6;
        assert_eq!(configure(&current, &late, 10, false).unwrap().mode_seq, 6);
        late.mode_seq = 0;
        assert!(configure(&current, &late, 10, false).is_ok());
        // A later epoch starts over (a promotion carries the table's sequence).
        let promoted = PairState { epoch: 3, mode_seq: 1, ..current.clone() };
        assert!(configure(&current, &promoted, 10, false).is_ok());
    }
}
