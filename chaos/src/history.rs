//! What a drill's workload did, and what the ledger holds afterwards.
//!
//! Every operation the workload sent is recorded with what its client
//! heard: a final result, or nothing (`Unknown`: a timeout, a broken
//! connection, a leader change). After the drill a resolution phase retries
//! each unknown operation with the same idempotency key and records what it
//! learnt in `resolved`. Reads (a balance, a transfer) are recorded with
//! what they returned; they change nothing, so they are never retried. The
//! final state is read from the cluster once the faults are healed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What a client heard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied (result code OK).
    Ok,
    /// A final business answer other than OK (the code's name), or
    /// ALREADY_GRABBED for a grab, which carries the share held.
    Refused(String),
    /// No answer: the operation may or may not have applied.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Transfer {
        transfer_id: String,
        from: u64,
        to: u64,
        currency: String,
        amount: u64,
    },
    SendEnvelope {
        transfer_id: String,
        envelope_id: String,
        sender: u64,
        currency: String,
        total: u64,
    },
    /// `amount`: the share the answer named (OK or ALREADY_GRABBED).
    Grab {
        envelope_id: String,
        user: u64,
        amount: Option<u64>,
    },
    /// A balance read (GetAccount through the routers): the balance it
    /// returned (none without an answer).
    ReadBalance {
        user: u64,
        currency: String,
        balance: Option<u64>,
    },
    /// A GetTransfer through the routers: whether the transfer was found
    /// and, when it was, its recorded result code and settlement (names).
    ReadTransfer {
        transfer_id: String,
        found: bool,
        code: String,
        settlement: String,
    },
}

impl OpKind {
    /// A read: it moves nothing and is never retried.
    pub fn is_read(&self) -> bool {
        matches!(self, OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Order in which the workload sent it.
    pub seq: u64,
    /// Send and answer times, ms since the drill started.
    pub sent_ms: u64,
    pub answered_ms: u64,
    pub kind: OpKind,
    pub outcome: Outcome,
    /// For an `Unknown` outcome: what the resolution phase learnt.
    pub resolved: Option<Outcome>,
}

impl Op {
    /// What finally counts: the answer, or the resolution of an unknown.
    pub fn effective(&self) -> &Outcome {
        match (&self.outcome, &self.resolved) {
            (Outcome::Unknown, Some(resolved)) => resolved,
            (outcome, _) => outcome,
        }
    }

    /// The money an operation moves, for ranking offenders by size.
    pub fn amount(&self) -> u64 {
        match &self.kind {
            OpKind::Transfer { amount, .. } => *amount,
            OpKind::SendEnvelope { total, .. } => *total,
            OpKind::Grab { amount, .. } => amount.unwrap_or(0),
            OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. } => 0,
        }
    }

    pub fn is_read(&self) -> bool {
        self.kind.is_read()
    }
}

/// A transfer as the ledger recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Its result code's name ("OK", "INSUFFICIENT_FUNDS", ...).
    pub code: String,
    /// Times its debit appears among the users' movements (1 if applied).
    pub debits: u32,
    /// A cross-cell transfer whose credit was refused and refunded.
    pub refunded: bool,
    /// The sender's record's settlement ("LOCAL", "IN_TRANSIT",
    /// "CREDITED", "REFUNDED"; empty when not applied).
    #[serde(default)]
    pub settlement: String,
    /// CREDITED: the recipient cell's clock when it credited minus the
    /// sender cell's clock when it debited (ms; the two clocks may differ).
    #[serde(default)]
    pub credit_delay_ms: Option<i64>,
}

/// One envelope as the ledger holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeState {
    pub sender: u64,
    pub currency: String,
    pub total: u64,
    pub remaining: u64,
    pub refunded: u64,
    /// (user, amount) of every grab, as recorded.
    pub grabs: Vec<(u64, u64)>,
}

/// The ledger after the drill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Each user's balance per currency, as read.
    pub balances: BTreeMap<(u64, String), i128>,
    /// What each user started with (the drill's seeding).
    pub seeded: BTreeMap<(u64, String), i128>,
    /// Per cell and currency, the sum of all balances, system accounts
    /// included (the replicas' audit figures).
    pub sums: BTreeMap<(u64, String), i128>,
    /// Transfer id -> how the ledger recorded it.
    pub recorded: BTreeMap<String, Recorded>,
    pub envelopes: BTreeMap<String, EnvelopeState>,
    /// Per cell: the digests of its replicas (and standby) at one index.
    pub digests: BTreeMap<u64, Vec<String>>,
    /// Per pair: (active cell, standby cell; 0 for none) as the routing
    /// table says at the end.
    pub pairs: BTreeMap<u64, (u64, u64)>,
    /// Cells the drill killed for good: never restarted, so they hold no
    /// digest to compare.
    pub lost_cells: BTreeSet<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    /// user -> the pair that serves it (fixed for a drill): which movements
    /// cross pairs, so which credits arrive asynchronously.
    #[serde(default)]
    pub user_pairs: BTreeMap<u64, u64>,
}

impl History {
    /// The pair of a user (0 when unknown).
    pub fn pair_of(&self, user: u64) -> u64 {
        self.user_pairs.get(&user).copied().unwrap_or(0)
    }

    /// Whether a movement from `from` to `to` crosses pairs (its credit
    /// arrives later, through the sender cell's outbox). Unknown pairs
    /// count as crossing: the check that depends on it is then the weaker.
    pub fn crosses(&self, from: u64, to: u64) -> bool {
        let (a, b) = (self.pair_of(from), self.pair_of(to));
        a == 0 || b == 0 || a != b
    }
}
