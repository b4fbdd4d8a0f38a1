//! The wall clock every part of cellbank reads: milliseconds since the Unix
//! epoch. A replica's own reading is moved by a drill's `clock` fault
//! (`cellbank_raft::faults::wall_ms`); everything else reads this.

/// Now, in milliseconds since the Unix epoch (0 if the clock is set before
/// it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
