//! What a drill's workload did, and what the ledger holds afterwards.
//!
//! Every operation the workload sent is recorded with what its client
//! heard: a final result, or nothing (`Unknown`: a timeout, a broken
//! connection, a leader change). After the drill a resolution phase retries
//! each unknown operation with the same idempotency key and records what it
//! learnt in `resolved`. The final state is read from the cluster once the
//! faults are healed.

use std::collections::BTreeMap;

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
        }
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
}
