//! Deliberate bugs for the simulator's mutation checks: each reverts one
//! safety rule, so that a run can show the simulator's checkers catch it.
//! All are off unless a simulator run (`cellbank sim --mutate NAME`) turns
//! one on, in its own process; nothing else sets them.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutation {
    None = 0,
    /// The replication wait releases a write as soon as the cell's pair
    /// state no longer waits for a standby (a demotion, a deposition), the
    /// hole the acknowledgement rule closed.
    EarlyRelease = 1,
    /// A deposition is kept in memory only (no `Depose` command in the
    /// cell's log), so a restart or a new leader forgets it.
    VolatileDeposition = 2,
    /// Credits carry no sender epoch check at the destination: a deposed
    /// active's credits are applied.
    NoSenderEpoch = 3,
    /// An off-by-one in the acknowledgement rule: entry `i` is released
    /// when the standby holds `i - 1` (acknowledging before the standby
    /// holds the entry). No end-to-end test would notice.
    AckOffByOne = 4,
}

pub const ALL: [Mutation; 4] =
    [Mutation::EarlyRelease, Mutation::VolatileDeposition, Mutation::NoSenderEpoch, Mutation::AckOffByOne];

static ACTIVE: AtomicU8 = AtomicU8::new(0);

impl Mutation {
    pub fn name(self) -> &'static str {
        match self {
            Mutation::None => "none",
            Mutation::EarlyRelease => "early-release",
            Mutation::VolatileDeposition => "volatile-deposition",
            Mutation::NoSenderEpoch => "no-sender-epoch",
            Mutation::AckOffByOne => "ack-off-by-one",
        }
    }

    pub fn parse(name: &str) -> Option<Mutation> {
        std::iter::once(Mutation::None).chain(ALL).find(|m| m.name() == name)
    }
}

/// Turns one mutation on for this process (`Mutation::None`: all off).
pub fn set(mutation: Mutation) {
    ACTIVE.store(mutation as u8, Ordering::Relaxed);
}

/// True when `mutation` is on.
#[inline]
pub fn active(mutation: Mutation) -> bool {
    ACTIVE.load(Ordering::Relaxed) == mutation as u8 && mutation != Mutation::None
}
