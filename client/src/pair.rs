//! What a cell's pair state says: its role, its replication mode, whether
//! it may take writes, ships its log, or must wait for its standby before
//! answering. The cell's fencing rule and the routers' coordinator read a
//! `PairState` through these, so both read it the same way.

use std::time::Duration;

use cellbank_proto::cell::{PairRole, PairState, ReplicationMode};

/// A standby promoted by failover serves nothing for this long, so that
/// the old active's read lease has surely run out.
pub const PROMOTION_SETTLE: Duration = Duration::from_millis(400);

pub fn role(state: &PairState) -> PairRole {
    PairRole::try_from(state.role).unwrap_or(PairRole::Unpaired)
}

pub fn mode(state: &PairState) -> ReplicationMode {
    ReplicationMode::try_from(state.mode).unwrap_or(ReplicationMode::Async)
}

/// True once the cell has learnt that its pair moved past its epoch.
pub fn deposed(state: &PairState) -> bool {
    state.deposed_by_epoch > state.epoch
}

/// True when client writes may apply.
pub fn writable(state: &PairState) -> bool {
    role_writable(role(state)) && !deposed(state)
}

pub fn role_writable(role: PairRole) -> bool {
    matches!(role, PairRole::Unpaired | PairRole::Active)
}

/// True for a cell whose leader ships its log to a standby: an active, or
/// an active fenced for a switchover (its last entries must still reach the
/// standby).
pub fn ships(state: &PairState) -> bool {
    matches!(role(state), PairRole::Active | PairRole::Fenced) && !deposed(state)
}

/// True when a client must not hear of a write until the standby holds it.
///
/// A FENCED cell (a switchover draining it) still waits: its writes below
/// the fence are answered only once the standby holds them.
pub fn waits_for_standby(state: &PairState) -> bool {
    ships(state) && mode(state) == ReplicationMode::Sync && state.standby_cell_id != 0
}
